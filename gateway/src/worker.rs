//! A data-path worker: owns a set of connections and runs the protocol core and the router
//! for them. It never touches a socket, a thread or the clock: the I/O driver hands it
//! received bytes and the current time, and asks it for bytes to send. The epoll driver
//! and the io_uring driver run the same `Worker`.
//!
//! Driver interface, in the order a loop turn calls it: `accept` a socket (→ slot),
//! `on_received` / `on_eof` / `on_error` for what the socket did, `poll_inbox` and `tick`,
//! then `take_dirty` and `flush_to(slot, impl Write)` for every slot with bytes to send,
//! then the socket work below, and last `take_released` (flush once more, close the socket)
//! and `release`.
//!
//! Socket work (kernel TLS, [`crate::ktls`]): a few steps need a syscall on the
//! connection's own fd, which the sans-IO core never holds. `take_fd_work` lists those slots
//! (hand the session to the kernel; send close_notify as an alert record); the driver calls
//! `fd_work(slot, BorrowedFd, now)` for each, but only when no send on that socket is in
//! flight and no received bytes wait to be handed in (the hand-over switches the socket from
//! ciphertext to plaintext). Once `is_offloaded(slot)`, reads and writes on that socket are
//! plaintext (`on_received` and `flush_to` handle that themselves), and a read that fails
//! with EIO means a control record: the driver calls `on_control_record(slot, fd, now)` and
//! reads on.
//!
//! Routing: a frame for a connection this worker owns is handled through a local queue
//! (no atomics, no wake-up); one for another worker's connection goes into that worker's
//! [`Inbox`](crate::shared::Inbox) as a [`Msg`].

use std::collections::VecDeque;
use std::io::{self, Write};
use std::net::SocketAddr;
use std::os::fd::BorrowedFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use dashmap::mapref::entry::Entry;
use devgate_pki::PeerRole;
use devgate_proto::frame::{self, Body, ErrorCode, Frame, PresenceReason};
use devgate_proto::http::{self, Parsed};
use devgate_proto::ws::{self, Decoded, Message, Opcode};
use tracing::{debug, info, warn};

use crate::conn::{
    Conn, DeviceSession, DeviceStream, KernelTls, ManagerSession, ManagerStream, OutQueue,
    PeerKind, Pending, Phase, QueueRefusal, Role, Session, Tls,
};
use crate::msg::{CloseReason, Msg, MsgKind, Priority};
use crate::shared::{ConnHandle, Shared};
use crate::stats::WorkerStats;
use crate::timers::{FifoTimers, Timer};

/// Largest plaintext chunk handed to rustls at once (one TLS record).
const RECORD_PLAINTEXT: usize = 16 * 1024;
/// Messages taken from the inbox per call, so that sockets are served in between.
const INBOX_BATCH: usize = 4096;
/// WebSocket close code for "a newer connection with your unit ID replaced you".
const CLOSE_REPLACED: u16 = 4001;
/// Most streams one manager connection may hold open.
const MAX_STREAMS_PER_MANAGER: usize = 4096;
/// Timers handled per tick: a burst of handshake timeouts (a flood's connections all
/// accepted at once expire at once) is spread over loop turns, with the sockets served in
/// between, instead of closing thousands in one turn.
const TIMERS_PER_TICK: usize = 64;

/// A connection on its way from a handshake worker to a routing worker (see
/// [`Worker::detach`], [`Worker::adopt`]).
#[derive(Debug)]
pub struct Detached {
    /// The connection as the handshake worker left it.
    pub conn: Box<Conn>,
    /// Whether it still counts as unauthenticated (`shared.unauthenticated`).
    pub unauthenticated: bool,
}

/// What a driver should do with a connection after a write attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flush {
    /// Everything queued went out.
    Done,
    /// The socket would block; wait for writability.
    Blocked,
}

struct Slot {
    generation: u32,
    conn: Option<Conn>,
    /// The connection counts in `shared.unauthenticated` (accepted, not yet a session).
    unauthenticated: bool,
}

/// A data-path worker (see the module docs).
pub struct Worker {
    id: u16,
    shared: Arc<Shared>,
    slots: Vec<Slot>,
    free: Vec<u32>,
    live: usize,
    /// Plaintext rustls decrypted from one read; complete frames are handled straight
    /// from here.
    plain_in: Vec<u8>,
    /// Plaintext gathered from a queue for one TLS record.
    record_buf: Vec<u8>,
    local: VecDeque<Msg>,
    dirty: Vec<u32>,
    /// Slots that need a syscall on their socket (kTLS hand-over, close_notify).
    fd_pending: Vec<u32>,
    to_release: Vec<u32>,
    deferred_close: Vec<(u32, Ending)>,
    /// Handshake deadlines in accept order (the oldest unauthenticated connection first).
    handshake_timers: FifoTimers,
    /// Sessions' next keep-alive / request-timeout check.
    session_timers: FifoTimers,
    /// How many unauthenticated connections the gateway's table may hold (the rest of
    /// `max_connections` is reserved for sessions).
    unauthenticated_cap: usize,
    /// Next check of the worker-wide conditions (shutdown, no manager, trust bundle).
    next_sweep: Instant,
    refusing_devices: bool,
    shutdown_started: bool,
    /// The trust-bundle generation this worker's devices have been sent.
    trust_generation: u64,
    /// A handshake worker: connections that ask for a session are handed to a routing
    /// worker instead of becoming sessions here.
    hands_over: bool,
    /// Slots waiting for the driver to hand them over.
    leaving: Vec<u32>,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("id", &self.id)
            .field("live", &self.live)
            .finish_non_exhaustive()
    }
}

fn encode_ws_frame(frame: &Frame<'_>) -> Bytes {
    let mut out = Vec::with_capacity(frame.encoded_len() + ws::MAX_HEADER_LEN);
    frame::encode_ws(&mut out, frame, None);
    Bytes::from(out)
}

fn control_frame(opcode: Opcode, payload: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(payload.len() + 2);
    ws::encode_frame(&mut out, opcode, payload, None);
    Bytes::from(out)
}

fn close_frame(code: u16, reason: &str) -> Bytes {
    let mut out = Vec::with_capacity(reason.len() + 4);
    ws::encode_close(&mut out, code, reason, None);
    Bytes::from(out)
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

impl Worker {
    /// A worker with id `id` (its index in `shared.inboxes`).
    pub fn new(id: u16, shared: Arc<Shared>, now: Instant) -> Self {
        let unauthenticated_cap = crate::guard::unauth::unauthenticated_cap(
            shared.max_connections,
            shared.config.limits.session_reserve_percent,
        );
        Self {
            id,
            shared,
            slots: Vec::new(),
            free: Vec::new(),
            live: 0,
            plain_in: Vec::with_capacity(64 * 1024),
            record_buf: Vec::with_capacity(RECORD_PLAINTEXT),
            local: VecDeque::new(),
            dirty: Vec::new(),
            fd_pending: Vec::new(),
            to_release: Vec::new(),
            deferred_close: Vec::new(),
            handshake_timers: FifoTimers::default(),
            session_timers: FifoTimers::default(),
            unauthenticated_cap,
            next_sweep: now,
            refusing_devices: false,
            shutdown_started: false,
            trust_generation: 0,
            hands_over: false,
            leaving: Vec::new(),
        }
    }

    /// A handshake worker with id `id`: it accepts connections, runs their TLS handshakes
    /// and HTTP requests, and hands every connection that asks for a WebSocket session to
    /// a routing worker (`take_leaving`, `detach`; the routing worker's `adopt`). Its
    /// thread runs at a lower priority, so that handshakes, honest or a flood's, take only
    /// the CPU that routing leaves.
    pub fn handshake_worker(id: u16, shared: Arc<Shared>, now: Instant) -> Self {
        let mut worker = Self::new(id, shared, now);
        worker.hands_over = true;
        worker
    }

    /// This worker's id.
    pub fn id(&self) -> u16 {
        self.id
    }

    /// The shared state.
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    fn stats(&self) -> &WorkerStats {
        &self.shared.stats[usize::from(self.id)]
    }

    /// Connections this worker holds.
    pub fn live(&self) -> usize {
        self.live
    }

    // ----- driver interface -------------------------------------------------------------

    /// Takes a freshly accepted TCP connection; returns its slot, or `None` if the
    /// gateway is at `max_connections` or shutting down (the driver closes the socket).
    pub fn accept(&mut self, peer: SocketAddr, now: Instant) -> Option<u32> {
        bump(&self.stats().accepted);
        if self.shared.shutting_down.load(Ordering::Relaxed) {
            return None;
        }
        let ip = peer.ip();
        // A balancer's connection is counted under the client address its PROXY header
        // names, once it has arrived (`take_proxy_header`).
        let proxied = self.shared.proxy_from.contains(ip);
        if !proxied && !self.admit_source(peer, now) {
            return None;
        }
        let undo = |shared: &Shared| {
            shared.connection_count.fetch_sub(1, Ordering::AcqRel);
            if !proxied {
                shared.unauthenticated.remove(ip);
                shared.guard.closed(ip);
            }
        };
        let open = self.shared.connection_count.fetch_add(1, Ordering::AcqRel);
        let full = open >= self.shared.max_connections
            || self.shared.unauthenticated.total() > self.unauthenticated_cap;
        // A full table takes the newcomer in place of this worker's oldest unauthenticated
        // connection (its slot comes free at the end of this loop turn), so that a flood of
        // silent connections cannot lock new devices out; a table full of sessions refuses.
        if full && !self.evict_oldest_unauthenticated(now) {
            undo(&self.shared);
            bump(&self.stats().refused_max_connections);
            return None;
        }
        let tls_config = self.shared.tls.load().server_config.clone();
        let tls = match crate::tls_conn::TlsConn::new(tls_config) {
            Ok(tls) => tls,
            Err(e) => {
                crate::warn_limited!(%peer, "cannot start TLS session: {e}");
                undo(&self.shared);
                return None;
            }
        };
        let Some(slot) = self.alloc_slot() else {
            undo(&self.shared);
            return None;
        };
        let entry = &mut self.slots[slot as usize];
        let handle = ConnHandle {
            worker: self.id,
            slot,
            generation: entry.generation,
        };
        let handshake = Duration::from_millis(self.shared.config.limits.handshake_timeout_ms);
        self.handshake_timers
            .push(now + handshake, slot, entry.generation);
        entry.unauthenticated = !proxied;
        entry.conn = Some(Conn {
            handle,
            peer,
            tls: Tls::User(Box::new(tls)),
            inbuf: Vec::new(),
            out: OutQueue::default(),
            phase: Phase::Handshake,
            last_rx: now,
            ping_sent: None,
            handshake_deadline: now + handshake,
            accepted_at: now,
            dirty: false,
            notify_on_drain: false,
            offload_wanted: false,
            fd_queued: false,
            kind: PeerKind::Unknown,
            leaving: false,
            proxy: proxied.then(Box::default),
        });
        self.live += 1;
        Some(slot)
    }

    fn alloc_slot(&mut self) -> Option<u32> {
        if let Some(s) = self.free.pop() {
            return Some(s);
        }
        let s = u32::try_from(self.slots.len()).ok()?;
        self.slots.push(Slot {
            generation: 0,
            conn: None,
            unauthenticated: false,
        });
        Some(s)
    }

    /// Whether some connection has bytes to send that no flush has taken yet (the
    /// driver must not sleep on them).
    pub fn has_output(&self) -> bool {
        !self.dirty.is_empty()
            || !self.to_release.is_empty()
            || !self.leaving.is_empty()
            || !self.fd_pending.is_empty()
    }

    /// Slots of connections to hand over (a handshake worker's); for each, the driver
    /// takes the socket out of its poller and calls `detach`.
    pub fn take_leaving(&mut self, into: &mut Vec<u32>) {
        into.clear();
        into.append(&mut self.leaving);
    }

    /// Takes a connection that is leaving out of its slot, for `Shared::hand_over`. It
    /// still counts as an open, unauthenticated connection: the adopting worker goes on
    /// counting it. `None` if it closed meanwhile (the driver then releases it as usual).
    pub fn detach(&mut self, slot: u32) -> Option<Detached> {
        let entry = self.slots.get_mut(slot as usize)?;
        let conn = entry.conn.as_ref()?;
        if !conn.leaving || matches!(conn.phase, Phase::Closing) {
            return None;
        }
        let conn = entry.conn.take()?;
        entry.generation = entry.generation.wrapping_add(1);
        let unauthenticated = std::mem::take(&mut entry.unauthenticated);
        self.free.push(slot);
        self.live -= 1;
        Some(Detached {
            conn: Box::new(conn),
            unauthenticated,
        })
    }

    /// Takes over a connection a handshake worker detached; its request head (still
    /// unread in `inbuf`) is handled at once. `None` if the gateway is shutting down (the
    /// driver closes the socket).
    pub fn adopt(&mut self, detached: Detached, now: Instant) -> Option<u32> {
        let slot = if self.shared.shutting_down.load(Ordering::Relaxed) {
            None
        } else {
            self.alloc_slot()
        };
        let Some(slot) = slot else {
            self.forget(&detached);
            return None;
        };
        let Detached {
            mut conn,
            unauthenticated,
        } = detached;
        let entry = &mut self.slots[slot as usize];
        conn.handle = ConnHandle {
            worker: self.id,
            slot,
            generation: entry.generation,
        };
        conn.leaving = false;
        conn.dirty = false;
        conn.fd_queued = false;
        let mut head = std::mem::take(&mut conn.inbuf);
        self.handshake_timers
            .push(conn.handshake_deadline, slot, entry.generation);
        entry.unauthenticated = unauthenticated;
        entry.conn = Some(*conn);
        self.live += 1;
        bump(&self.stats().handed_over);
        // rustls may hold bytes for the peer (session tickets) that the handshake worker
        // had no turn to send.
        self.mark_dirty(slot);
        if !head.is_empty() {
            self.read_plaintext(slot, &mut head, now);
        }
        self.run_local(now);
        Some(slot)
    }

    /// Gives up a connection that no worker holds (its socket is being closed).
    pub fn forget(&self, detached: &Detached) {
        let ip = detached.conn.peer.ip();
        self.shared.connection_count.fetch_sub(1, Ordering::AcqRel);
        if detached.unauthenticated {
            self.shared.unauthenticated.remove(ip);
        }
        self.shared.guard.closed(ip);
    }

    /// The per-source admission of a new connection from `peer` (guard, then the
    /// unauthenticated-per-source cap); false if refused, with nothing left counted.
    fn admit_source(&self, peer: SocketAddr, now: Instant) -> bool {
        let ip = peer.ip();
        if !self.shared.guard.admit(ip, now) {
            bump(&self.stats().refused_by_guard);
            return false;
        }
        if self.shared.unauthenticated.try_add(ip).is_err() {
            self.shared.guard.closed(ip);
            bump(&self.stats().refused_handshakes_per_source);
            debug!(%peer, "refused: the source holds limits.max_handshakes_per_source handshakes");
            return false;
        }
        true
    }

    /// A balancer's connection: takes its PROXY header (see [`crate::proxy_proto`]) and
    /// admits the client address it names. Returns the bytes after the header once
    /// admitted; `None` while the header is incomplete or when the connection is refused
    /// (closed here, with `conn.proxy` left set so that release counts nothing off).
    fn take_proxy_header(&mut self, slot: u32, data: &[u8], now: Instant) -> Option<Vec<u8>> {
        let conn = self.conn_mut(slot)?;
        if matches!(conn.phase, Phase::Closing) {
            return None;
        }
        let step = conn.proxy.as_mut()?.feed(data);
        let (source, rest) = match step {
            crate::proxy_proto::Step::More => return None,
            crate::proxy_proto::Step::Refused(why) => {
                let peer = conn.peer;
                bump(&self.stats().refused_proxy_header);
                crate::warn_limited!(%peer, "refused: {why}");
                self.close(slot, now, Ending::Lost);
                return None;
            }
            crate::proxy_proto::Step::Done { source, rest } => (source, rest),
        };
        if let Some(source) = source {
            conn.peer = source;
        }
        let peer = conn.peer;
        if !self.admit_source(peer, now) {
            self.close(slot, now, Ending::Lost);
            return None;
        }
        if let Some(entry) = self.slots.get_mut(slot as usize) {
            entry.unauthenticated = true;
            if let Some(conn) = entry.conn.as_mut() {
                conn.proxy = None;
            }
        }
        Some(rest)
    }

    /// Bytes received from the socket of `slot`.
    pub fn on_received(&mut self, slot: u32, data: &[u8], now: Instant) {
        let mut plain = std::mem::take(&mut self.plain_in);
        plain.clear();
        self.on_received_inner(slot, data, &mut plain, now);
        plain.clear();
        if plain.capacity() > 256 * 1024 {
            // One huge burst should not pin memory in an idle worker.
            plain = Vec::new();
        }
        self.plain_in = plain;
        self.run_local(now);
    }

    fn on_received_inner(&mut self, slot: u32, data: &[u8], plain: &mut Vec<u8>, now: Instant) {
        let after_header;
        let data = if self.conn_ref(slot).is_some_and(|c| c.proxy.is_some()) {
            match self.take_proxy_header(slot, data, now) {
                // Nothing after the header yet: an empty read would look like EOF to TLS.
                Some(rest) if rest.is_empty() => return,
                Some(rest) => {
                    after_header = rest;
                    &after_header[..]
                }
                None => return,
            }
        } else {
            data
        };
        let Some(conn) = self.conn_mut(slot) else {
            return;
        };
        if matches!(conn.phase, Phase::Closing) {
            return;
        }
        conn.last_rx = now;
        conn.ping_sent = None;
        let tls = match &mut conn.tls {
            Tls::User(tls) => tls,
            Tls::Kernel(_) => {
                // The kernel already opened the records: this is plaintext.
                plain.extend_from_slice(data);
                self.read_plaintext(slot, plain, now);
                return;
            }
            Tls::Gone => return,
        };
        let was_handshaking = tls.is_handshaking();
        if let Err(e) = tls.feed(data, plain) {
            let peer = conn.peer;
            if was_handshaking {
                bump(&self.stats().handshakes_failed_tls);
            }
            debug!(%peer, "TLS error: {e}");
            // rustls sealed an alert; let it go out before the socket closes.
            self.mark_dirty(slot);
            self.close(slot, now, Ending::Lost);
            return;
        }
        let handshake_done = was_handshaking && !tls.is_handshaking();
        let resumed = handshake_done && tls.is_resumed();
        let wants_write = tls.wants_write();
        let peer_closed = tls.peer_has_closed();
        if handshake_done {
            bump(&self.stats().handshakes_ok);
        }
        if resumed {
            bump(&self.stats().handshakes_resumed);
        }
        if wants_write {
            self.mark_dirty(slot);
        }
        if !plain.is_empty() {
            self.read_plaintext(slot, plain, now);
        }
        if peer_closed {
            self.close(slot, now, Ending::PeerClosed);
            return;
        }
        self.check_offload(slot);
    }

    /// The peer closed its side of the TCP connection.
    pub fn on_eof(&mut self, slot: u32, now: Instant) {
        self.close(slot, now, Ending::PeerClosed);
        self.run_local(now);
    }

    /// The socket failed.
    pub fn on_error(&mut self, slot: u32, err: &io::Error, now: Instant) {
        if let Some(conn) = self.conn_mut(slot) {
            debug!(peer = %conn.peer, "socket error: {err}");
        }
        self.close(slot, now, Ending::Lost);
        self.run_local(now);
    }

    /// Handles queued messages from other workers; returns how many.
    pub fn poll_inbox(&mut self, now: Instant) -> usize {
        let shared = self.shared.clone();
        let inbox = &shared.inboxes[usize::from(self.id)];
        let mut n = 0;
        while n < INBOX_BATCH {
            let Some(msg) = inbox.pop() else { break };
            self.handle_msg(msg, now);
            n += 1;
        }
        self.run_local(now);
        n
    }

    /// Timers: handshake timeouts, keep-alives, dead peers, request timeouts, the
    /// no-manager grace period and shutdown. Returns when it wants to be called next.
    ///
    /// Per-connection timers come from queues in deadline order ([`crate::timers`]), so a
    /// tick touches only the connections that are due, at most [`TIMERS_PER_TICK`] of them
    /// (it asks to be called again at once when more are due): thousands of connections
    /// sitting in their handshake cost the loop nothing until their deadline.
    pub fn tick(&mut self, now: Instant) -> Instant {
        self.shared.heartbeat(self.id, now);
        let interval = self.ping_interval();
        let mut budget = TIMERS_PER_TICK;
        while budget > 0 {
            let Some(t) = self.handshake_timers.pop_due(now) else {
                break;
            };
            budget -= 1;
            bump(&self.stats().timer_checks);
            self.handshake_timer(t, now);
        }
        while budget > 0 {
            let Some(t) = self.session_timers.pop_due(now) else {
                break;
            };
            budget -= 1;
            bump(&self.stats().timer_checks);
            if self
                .timer_conn(t)
                .is_some_and(|c| matches!(c.phase, Phase::Session(_)))
            {
                self.sweep_conn(t.slot, now, interval);
                if self
                    .timer_conn(t)
                    .is_some_and(|c| matches!(c.phase, Phase::Session(_)))
                {
                    self.session_timers.push(
                        now + Self::sweep_period(interval),
                        t.slot,
                        t.generation,
                    );
                }
            }
        }
        if now >= self.next_sweep {
            self.next_sweep = now + Self::sweep_period(interval);
            self.sweep_worker(now);
        }
        self.run_local(now);
        if budget == 0 {
            return now; // more timers are due: come back after serving the sockets
        }
        [
            self.handshake_timers.next_due(),
            self.session_timers.next_due(),
        ]
        .into_iter()
        .flatten()
        .fold(self.next_sweep, Instant::min)
    }

    fn ping_interval(&self) -> Duration {
        Duration::from_millis(self.shared.config.keepalive.ping_interval_ms)
    }

    /// How often a session is checked for keep-alives and request timeouts.
    fn sweep_period(interval: Duration) -> Duration {
        (interval / 4).clamp(Duration::from_millis(25), Duration::from_secs(1))
    }

    /// The connection a timer was armed for, if the slot still holds it.
    fn timer_conn(&self, t: Timer) -> Option<&Conn> {
        let entry = self.slots.get(t.slot as usize)?;
        if entry.generation != t.generation {
            return None;
        }
        entry.conn.as_ref()
    }

    /// A handshake deadline came up: the connection times out unless it became a session
    /// (or closed) meanwhile.
    fn handshake_timer(&mut self, t: Timer, now: Instant) {
        let Some(conn) = self.timer_conn(t) else {
            return;
        };
        if matches!(conn.phase, Phase::Handshake | Phase::Waiting)
            && !conn.leaving
            && now >= conn.handshake_deadline
        {
            debug!(peer = %conn.peer, "handshake timeout");
            bump(&self.stats().handshakes_failed_timeout);
            self.close(t.slot, now, Ending::Lost);
        }
    }

    /// Closes this worker's oldest unauthenticated connection to make room for a new one;
    /// false if it holds none.
    fn evict_oldest_unauthenticated(&mut self, now: Instant) -> bool {
        while let Some(t) = self.handshake_timers.pop_oldest() {
            bump(&self.stats().timer_checks);
            let Some(conn) = self.timer_conn(t) else {
                continue;
            };
            if !matches!(conn.phase, Phase::Handshake | Phase::Waiting) {
                continue;
            }
            debug!(peer = %conn.peer, "table full: evicting the oldest unauthenticated connection");
            bump(&self.stats().evicted_unauthenticated);
            self.close(t.slot, now, Ending::Lost);
            return true;
        }
        false
    }

    /// The driver refused a connection because this worker's share of descriptors is
    /// full (io_uring's file table): counted like `max_connections`, and the oldest
    /// unauthenticated connection makes room for the next attempt.
    pub fn refuse_at_capacity(&mut self, now: Instant) {
        bump(&self.stats().refused_max_connections);
        self.evict_oldest_unauthenticated(now);
    }

    /// A connection finished its handshake and HTTP upgrade: it no longer counts as
    /// unauthenticated, and its keep-alive checks start.
    fn became_session(&mut self, slot: u32, now: Instant) {
        let period = Self::sweep_period(self.ping_interval());
        let Some(entry) = self.slots.get_mut(slot as usize) else {
            return;
        };
        let Some(conn) = entry.conn.as_ref() else {
            return;
        };
        if !matches!(conn.phase, Phase::Session(_)) {
            return;
        }
        if std::mem::take(&mut entry.unauthenticated) {
            self.shared.unauthenticated.remove(conn.peer.ip());
        }
        self.session_timers
            .push(now + period, slot, entry.generation);
    }

    /// Worker-wide conditions, checked once per sweep period: shutdown, the no-manager
    /// grace period and a new trust bundle. Each walks the connections only when its
    /// condition changes.
    fn sweep_worker(&mut self, now: Instant) {
        if self.shared.shutting_down.load(Ordering::Relaxed) && !self.shutdown_started {
            self.shutdown_started = true;
            for slot in self.occupied_slots() {
                self.close(slot, now, Ending::Gateway(CloseReason::Shutdown));
            }
        }

        let refuse = self.shared.devices_refused(now);
        if refuse && !self.refusing_devices {
            let devices: Vec<u32> = self
                .occupied_slots()
                .into_iter()
                .filter(|s| {
                    self.conn_ref(*s).is_some_and(|c| {
                        c.kind == PeerKind::Device && !matches!(c.phase, Phase::Closing)
                    })
                })
                .collect();
            if !devices.is_empty() {
                warn!(
                    worker = self.id,
                    devices = devices.len(),
                    "no manager connected for the grace period: disconnecting devices"
                );
            }
            for slot in devices {
                bump(&self.stats().rejected_no_manager);
                self.close(slot, now, Ending::Gateway(CloseReason::NoManager));
            }
        }
        self.refusing_devices = refuse;

        let generation = self.shared.trust_generation.load(Ordering::Acquire);
        if generation != self.trust_generation {
            self.trust_generation = generation;
            if let Some(bundle) = self.shared.trust_bundle.load_full() {
                for slot in self.occupied_slots() {
                    if self
                        .conn_ref(slot)
                        .is_some_and(|c| matches!(c.kind, PeerKind::Device | PeerKind::Manager))
                    {
                        let frame = Bytes::clone(&bundle.frame);
                        let _ = self.queue(slot, frame, Priority::Essential, now);
                    }
                }
            }
        }
    }

    /// Slots with bytes to send since the last call.
    pub fn take_dirty(&mut self, into: &mut Vec<u32>) {
        into.clear();
        std::mem::swap(into, &mut self.dirty);
        for slot in into.iter() {
            if let Some(c) = self
                .slots
                .get_mut(*slot as usize)
                .and_then(|s| s.conn.as_mut())
            {
                c.dirty = false;
            }
        }
    }

    /// Encrypts queued frames and writes them to `sink` until done or it would block.
    pub fn flush_to<W: Write>(&mut self, slot: u32, sink: &mut W) -> io::Result<Flush> {
        let mut plain = std::mem::take(&mut self.record_buf);
        let result = self.flush_inner(slot, sink, &mut plain);
        plain.clear();
        self.record_buf = plain;
        result
    }

    fn flush_inner<W: Write>(
        &mut self,
        slot: u32,
        sink: &mut W,
        plain: &mut Vec<u8>,
    ) -> io::Result<Flush> {
        let Some(conn) = self.conn_mut(slot) else {
            return Ok(Flush::Done);
        };
        let tls = match &mut conn.tls {
            Tls::User(tls) => tls,
            Tls::Kernel(k) => {
                let k = &mut **k;
                return Self::flush_plain(&mut conn.out, &mut conn.notify_on_drain, k, sink, plain)
                    .map(|(flush, fd_work)| {
                        if fd_work {
                            self.queue_fd_work(slot);
                        }
                        flush
                    });
            }
            Tls::Gone => return Ok(Flush::Done),
        };
        loop {
            if conn.offload_wanted
                && matches!(conn.phase, Phase::Session(_))
                && tls.ready_for_kernel()
            {
                // Hand over before sealing more: the queue then goes out as plaintext.
                self.queue_fd_work(slot);
                return Ok(Flush::Done);
            }
            if !tls.wants_write() && !conn.out.is_empty() && !tls.is_handshaking() {
                plain.clear();
                conn.out.drain_into(plain, RECORD_PLAINTEXT);
                tls.encrypt(plain)
                    .map_err(|e| io::Error::other(format!("TLS: {e}")))?;
            }
            if conn.out.is_empty() && conn.notify_on_drain {
                conn.notify_on_drain = false;
                tls.send_close_notify();
            }
            if !tls.wants_write() {
                return Ok(Flush::Done);
            }
            match tls.write_to(sink) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Flush::Blocked),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Writes queued frames as plaintext to a kTLS socket (the kernel seals them). Returns
    /// whether fd work (close_notify) is wanted.
    fn flush_plain<W: Write>(
        out: &mut OutQueue,
        notify_on_drain: &mut bool,
        k: &mut KernelTls,
        sink: &mut W,
        plain: &mut Vec<u8>,
    ) -> io::Result<(Flush, bool)> {
        while !out.is_empty() {
            plain.clear();
            out.drain_into(plain, RECORD_PLAINTEXT);
            let mut done = 0;
            while done < plain.len() {
                match sink.write(&plain[done..]) {
                    Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                    Ok(n) => done += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        out.push_front(Bytes::copy_from_slice(&plain[done..]));
                        return Ok((Flush::Blocked, false));
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        if *notify_on_drain {
            *notify_on_drain = false;
            k.close_notify_pending = true;
            return Ok((Flush::Done, true));
        }
        Ok((Flush::Done, false))
    }

    /// Slots whose sockets the driver should close now (after a last flush).
    pub fn take_released(&mut self, into: &mut Vec<u32>) {
        into.clear();
        std::mem::swap(into, &mut self.to_release);
    }

    /// Slots that need a syscall on their own socket since the last call: hand-over to
    /// kernel TLS, or a close_notify alert on a kTLS socket. The driver calls
    /// [`Self::fd_work`] for each once nothing else is writing to that socket.
    pub fn take_fd_work(&mut self, into: &mut Vec<u32>) {
        into.clear();
        std::mem::swap(into, &mut self.fd_pending);
        for slot in into.iter() {
            if let Some(c) = self
                .slots
                .get_mut(*slot as usize)
                .and_then(|s| s.conn.as_mut())
            {
                c.fd_queued = false;
            }
        }
    }

    /// Whether the record layer of `slot` is in the kernel (reads and writes on its
    /// socket are plaintext; EIO on a read means a control record, see
    /// [`Self::on_control_record`]).
    pub fn is_offloaded(&self, slot: u32) -> bool {
        self.conn_ref(slot)
            .is_some_and(|c| matches!(c.tls, Tls::Kernel(_)))
    }

    /// Does the socket work `take_fd_work` listed for `slot`, on its fd. The driver must
    /// call it only when no send on that socket is in flight and no received bytes are
    /// waiting to be handed to [`Self::on_received`].
    pub fn fd_work(&mut self, slot: u32, fd: BorrowedFd<'_>, now: Instant) {
        let Some(conn) = self.conn_mut(slot) else {
            return;
        };
        match &mut conn.tls {
            Tls::User(tls)
                if conn.offload_wanted
                    && matches!(conn.phase, Phase::Session(_))
                    && tls.ready_for_kernel() =>
            {
                conn.offload_wanted = false;
                self.offload(slot, fd, now);
            }
            Tls::Kernel(k) if k.close_notify_pending => {
                k.close_notify_pending = false;
                if let Err(e) = crate::ktls::send_close_notify(fd) {
                    debug!(peer = %conn.peer, "close_notify on kTLS socket: {e}");
                }
            }
            _ => {}
        }
        self.run_local(now);
    }

    /// A read on the kTLS socket of `slot` failed with EIO: the next record is not
    /// application data (an alert, a KeyUpdate). Reads it with its type and acts on it.
    pub fn on_control_record(&mut self, slot: u32, fd: BorrowedFd<'_>, now: Instant) {
        let mut buf = std::mem::take(&mut self.plain_in);
        buf.clear();
        buf.resize(RECORD_PLAINTEXT + 256, 0);
        let result = crate::ktls::recv_record(fd, &mut buf);
        match result {
            Ok((_, 0)) => self.close(slot, now, Ending::PeerClosed),
            Ok((crate::ktls::RECORD_APPLICATION_DATA, n)) => {
                let mut data = buf[..n].to_vec();
                self.read_plaintext(slot, &mut data, now);
            }
            Ok((crate::ktls::RECORD_ALERT, n)) => {
                let description = if n >= 2 { buf[1] } else { 255 };
                if description == 0 {
                    self.close(slot, now, Ending::PeerClosed);
                } else {
                    if let Some(conn) = self.conn_ref(slot) {
                        debug!(peer = %conn.peer, "TLS alert {description} on kTLS socket");
                    }
                    self.close(slot, now, Ending::Lost);
                }
            }
            Ok((crate::ktls::RECORD_HANDSHAKE, n)) => {
                let msg = buf[..n].to_vec();
                self.on_post_handshake(slot, fd, &msg, now);
            }
            Ok((other, _)) => {
                if let Some(conn) = self.conn_ref(slot) {
                    debug!(peer = %conn.peer, "unexpected TLS record type {other} on kTLS socket");
                }
                self.close(slot, now, Ending::Lost);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => {
                if let Some(conn) = self.conn_ref(slot) {
                    debug!(peer = %conn.peer, "kTLS control record: {e}");
                }
                self.close(slot, now, Ending::Lost);
            }
        }
        buf.clear();
        self.plain_in = buf;
        self.run_local(now);
    }

    /// The driver closed the socket of `slot`; the slot may be reused.
    pub fn release(&mut self, slot: u32) {
        if let Some(entry) = self.slots.get_mut(slot as usize)
            && let Some(conn) = entry.conn.take()
        {
            entry.generation = entry.generation.wrapping_add(1);
            self.free.push(slot);
            self.live -= 1;
            self.shared.connection_count.fetch_sub(1, Ordering::AcqRel);
            if std::mem::take(&mut entry.unauthenticated) {
                self.shared.unauthenticated.remove(conn.peer.ip());
            }
            // A balancer's connection refused before its header was admitted counted nothing.
            if conn.proxy.is_none() {
                self.shared.guard.closed(conn.peer.ip());
            }
        }
    }

    /// Whether `slot` holds a connection that still reads (not closing).
    pub fn is_active(&self, slot: u32) -> bool {
        self.conn_ref(slot)
            .is_some_and(|c| !c.leaving && !matches!(c.phase, Phase::Closing))
    }

    /// Whether `slot` holds an established session (a device or manager past its TLS
    /// handshake and upgrade). Drivers serve these first: a handshake costs a hundred
    /// routed frames, and handshakes (honest or a flood's) must not delay the fleet.
    pub fn is_established(&self, slot: u32) -> bool {
        self.conn_ref(slot)
            .is_some_and(|c| matches!(c.phase, Phase::Session(_)))
    }

    /// True when shutdown is under way and every connection is gone.
    pub fn finished(&self) -> bool {
        self.shutdown_started && self.live == 0
    }

    // ----- internals --------------------------------------------------------------------

    fn conn_mut(&mut self, slot: u32) -> Option<&mut Conn> {
        self.slots.get_mut(slot as usize)?.conn.as_mut()
    }

    fn conn_ref(&self, slot: u32) -> Option<&Conn> {
        self.slots.get(slot as usize)?.conn.as_ref()
    }

    /// The live (not closing) connection behind `handle`, if it still exists here.
    fn lookup(&mut self, handle: ConnHandle) -> Option<&mut Conn> {
        let entry = self.slots.get_mut(handle.slot as usize)?;
        if entry.generation != handle.generation {
            return None;
        }
        entry
            .conn
            .as_mut()
            .filter(|c| !matches!(c.phase, Phase::Closing))
    }

    fn occupied_slots(&self) -> Vec<u32> {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.conn.is_some())
            .filter_map(|(i, _)| u32::try_from(i).ok())
            .collect()
    }

    fn queue_fd_work(&mut self, slot: u32) {
        if let Some(conn) = self.conn_mut(slot)
            && !conn.fd_queued
        {
            conn.fd_queued = true;
            self.fd_pending.push(slot);
        }
    }

    /// Queues the kTLS hand-over once a session that wants it is idle in rustls.
    fn check_offload(&mut self, slot: u32) {
        if let Some(conn) = self.conn_ref(slot)
            && conn.offload_wanted
            && matches!(conn.phase, Phase::Session(_))
            && matches!(&conn.tls, Tls::User(t) if t.ready_for_kernel())
        {
            self.queue_fd_work(slot);
        }
    }

    /// Moves the record layer of `slot` into the kernel. The ULP goes on first: if the
    /// kernel refuses it, rustls keeps the session. Once rustls has given up its keys,
    /// a failure can only end the connection.
    fn offload(&mut self, slot: u32, fd: BorrowedFd<'_>, now: Instant) {
        let ciphers = self.shared.tls_offload.ciphers;
        let stats = &self.shared.stats[usize::from(self.id)];
        let Some(conn) = self
            .slots
            .get_mut(slot as usize)
            .and_then(|s| s.conn.as_mut())
        else {
            return;
        };
        let Tls::User(tls) = &conn.tls else {
            return;
        };
        if !tls.kernel_takes(ciphers) {
            bump(&stats.ktls_not_offloaded);
            return;
        }
        if let Err(e) = crate::ktls::attach_ulp(fd) {
            bump(&stats.ktls_not_offloaded);
            crate::warn_limited!(peer = %conn.peer, "kernel refused the tls ULP ({e}); this session stays in rustls");
            return;
        }
        let Tls::User(tls) = std::mem::replace(&mut conn.tls, Tls::Gone) else {
            return;
        };
        let installed = tls
            .into_kernel()
            .map_err(|e| e.to_string())
            .and_then(|(secrets, kc)| {
                crate::ktls::install_keys(fd, kc.protocol_version(), &secrets)
                    .map(|()| kc)
                    .map_err(|e| e.to_string())
            });
        match installed {
            Ok(kc) => {
                conn.tls = Tls::Kernel(Box::new(KernelTls {
                    conn: kc,
                    close_notify_pending: false,
                }));
                bump(&stats.ktls_offloaded);
                // Frames queued meanwhile now go out as plaintext.
                self.mark_dirty(slot);
            }
            Err(e) => {
                bump(&stats.ktls_install_failed);
                let peer = conn.peer;
                crate::warn_limited!(%peer, "installing kernel TLS keys failed ({e}); closing the session (the device reconnects; set [tls] offload = \"off\" if this repeats)");
                self.close(slot, now, Ending::Lost);
            }
        }
    }

    /// A post-handshake handshake record on a kTLS socket: a TLS 1.3 KeyUpdate gets new
    /// keys (both directions if the peer asked for ours too); anything else ends it.
    fn on_post_handshake(&mut self, slot: u32, fd: BorrowedFd<'_>, msg: &[u8], now: Instant) {
        let rekey = self.shared.tls_offload.rekey;
        let stats = &self.shared.stats[usize::from(self.id)];
        let Some(conn) = self
            .slots
            .get_mut(slot as usize)
            .and_then(|s| s.conn.as_mut())
        else {
            return;
        };
        let peer = conn.peer;
        let Tls::Kernel(k) = &mut conn.tls else {
            return;
        };
        // One handshake message per record is what peers send after the handshake.
        let (kind, body) = match msg {
            [kind, a, b, c, body @ ..]
                if body.len()
                    == ((usize::from(*a) << 16) | (usize::from(*b) << 8) | usize::from(*c)) =>
            {
                (*kind, body)
            }
            _ => {
                debug!(%peer, "malformed post-handshake message on kTLS socket");
                self.close(slot, now, Ending::Lost);
                return;
            }
        };
        const KEY_UPDATE: u8 = 24;
        match (kind, body) {
            (KEY_UPDATE, [requested]) if *requested <= 1 => {
                if !rekey {
                    bump(&stats.tls_rekey_unsupported);
                    crate::warn_limited!(%peer, "peer sent a TLS KeyUpdate, which this kernel cannot apply to a kTLS socket (needs Linux 6.14+); closing the session (set [tls] offload = \"off\" to keep such peers in rustls)");
                    // The close frame goes out under the old key, then close_notify.
                    self.close(
                        slot,
                        now,
                        Ending::Protocol(
                            1011,
                            "TLS key update not supported by the gateway's kernel",
                        ),
                    );
                    return;
                }
                let version = k.conn.protocol_version();
                let rx = k
                    .conn
                    .update_rx_secret()
                    .map_err(|e| e.to_string())
                    .and_then(|(seq, s)| {
                        crate::ktls::set_key(fd, crate::ktls::Dir::Rx, version, seq, &s)
                            .map_err(|e| e.to_string())
                    });
                let tx = rx.and_then(|()| {
                    if *requested == 0 {
                        return Ok(());
                    }
                    // Our KeyUpdate goes out under the old key, then the new key is set.
                    crate::ktls::send_record(
                        fd,
                        crate::ktls::RECORD_HANDSHAKE,
                        &[KEY_UPDATE, 0, 0, 1, 0],
                    )
                    .map_err(|e| e.to_string())?;
                    let (seq, s) = k.conn.update_tx_secret().map_err(|e| e.to_string())?;
                    crate::ktls::set_key(fd, crate::ktls::Dir::Tx, version, seq, &s)
                        .map_err(|e| e.to_string())
                });
                match tx {
                    Ok(()) => bump(&stats.ktls_key_updates),
                    Err(e) => {
                        bump(&stats.tls_rekey_unsupported);
                        crate::warn_limited!(%peer, "applying a TLS KeyUpdate to the kTLS socket failed ({e}); closing the session");
                        self.close(slot, now, Ending::Lost);
                    }
                }
            }
            _ => {
                debug!(%peer, kind, "unexpected post-handshake message on kTLS socket");
                self.close(
                    slot,
                    now,
                    Ending::Protocol(1002, "unexpected TLS handshake message"),
                );
            }
        }
    }

    fn mark_dirty(&mut self, slot: u32) {
        if let Some(conn) = self.conn_mut(slot)
            && !conn.dirty
        {
            conn.dirty = true;
            self.dirty.push(slot);
        }
    }

    /// Sends `msg` to its connection: through the local queue if it is ours, else
    /// through the owner's inbox.
    fn deliver(&mut self, msg: Msg) {
        if msg.to.worker == self.id {
            bump(&self.stats().messages_local);
            self.local.push_back(msg);
            return;
        }
        bump(&self.stats().messages_cross_worker);
        let Some(inbox) = self.shared.inboxes.get(usize::from(msg.to.worker)) else {
            return;
        };
        if let Err(msg) = inbox.push(msg) {
            bump(&self.stats().inbox_full);
            if let Some(bounce) = msg.bounce(
                ErrorCode::QueueFull,
                "the gateway is overloaded; retry later",
            ) {
                // A bounce is an Error, which never bounces again: this recursion ends.
                self.deliver(bounce);
            }
        }
    }

    fn run_local(&mut self, now: Instant) {
        loop {
            while let Some(msg) = self.local.pop_front() {
                self.handle_msg(msg, now);
            }
            if self.deferred_close.is_empty() {
                return;
            }
            for (slot, ending) in std::mem::take(&mut self.deferred_close) {
                self.close(slot, now, ending);
            }
        }
    }

    /// Queues an encoded frame to `slot`'s peer; on overflow disconnects it as too slow.
    fn queue(
        &mut self,
        slot: u32,
        frame: Bytes,
        priority: Priority,
        now: Instant,
    ) -> Result<(), QueueRefusal> {
        let limits = &self.shared.config.limits;
        let (soft, hard) = (limits.queue_bytes, limits.queue_hard_bytes);
        let Some(conn) = self.conn_mut(slot) else {
            return Err(QueueRefusal::Full);
        };
        let len = frame.len();
        let is_device = conn.kind == PeerKind::Device;
        match conn.out.push(frame, priority, soft, hard) {
            Ok(()) => {
                let stats = &self.shared.stats[usize::from(self.id)];
                stats.bytes_out.fetch_add(len as u64, Ordering::Relaxed);
                if is_device {
                    bump(&stats.frames_to_devices);
                } else {
                    bump(&stats.frames_to_managers);
                }
                self.mark_dirty(slot);
                Ok(())
            }
            Err(QueueRefusal::Full) => {
                bump(&self.stats().queue_full);
                Err(QueueRefusal::Full)
            }
            Err(QueueRefusal::Overflow) => {
                let peer = conn.peer;
                bump(&self.stats().slow_consumers);
                crate::warn_limited!(%peer, "peer reads too slowly: {hard} bytes queued, disconnecting it");
                let _ = now;
                self.deferred_close.push((
                    slot,
                    Ending::Protocol(1008, "too slow: outbound queue overflow"),
                ));
                Err(QueueRefusal::Overflow)
            }
        }
    }

    fn send_error(
        &mut self,
        slot: u32,
        code: ErrorCode,
        id: u32,
        unit: &str,
        message: &str,
        now: Instant,
    ) {
        bump(&self.stats().error_frames);
        let frame = encode_ws_frame(&Frame::error(unit, id, code, message));
        let _ = self.queue(slot, frame, Priority::Essential, now);
    }

    // ----- reading ----------------------------------------------------------------------

    /// Handles plaintext rustls has just decrypted. Complete frames are handled straight
    /// from the worker's buffer; only a trailing partial frame is copied into the
    /// connection's own buffer, which is freed again once it has been consumed.
    fn read_plaintext(&mut self, slot: u32, plain: &mut [u8], now: Instant) {
        let Some(conn) = self.conn_mut(slot) else {
            return;
        };
        if conn.inbuf.is_empty() {
            let used = self.consume(slot, plain, now);
            if used < plain.len()
                && let Some(conn) = self.conn_mut(slot)
                && !matches!(conn.phase, Phase::Closing)
            {
                conn.inbuf.extend_from_slice(&plain[used..]);
            }
        } else {
            let mut inbuf = std::mem::take(&mut conn.inbuf);
            inbuf.extend_from_slice(plain);
            let used = self.consume(slot, &mut inbuf, now);
            if let Some(conn) = self.conn_mut(slot) {
                inbuf.drain(..used.min(inbuf.len()));
                conn.inbuf = if inbuf.is_empty() { Vec::new() } else { inbuf };
            }
        }
    }

    /// Consumes complete units (HTTP head, WebSocket frames) from `buf`; returns bytes used.
    fn consume(&mut self, slot: u32, buf: &mut [u8], now: Instant) -> usize {
        let mut used = 0;
        loop {
            let Some(conn) = self.conn_mut(slot) else {
                return buf.len();
            };
            if conn.leaving {
                return used;
            }
            match conn.phase {
                // Nothing more is read from a closing connection or one whose request is
                // with the control plane (HTTP/1.1 without pipelining).
                Phase::Closing | Phase::Waiting => return buf.len(),
                Phase::Handshake => match self.on_http(slot, &buf[used..], now) {
                    Some(n) if n > 0 => used += n,
                    _ => return used,
                },
                Phase::Session(_) => {
                    return used + self.on_websocket(slot, &mut buf[used..], now);
                }
            }
        }
    }

    // ----- HTTP -------------------------------------------------------------------------

    /// Handles the request head; returns bytes consumed (0 while incomplete).
    fn on_http(&mut self, slot: u32, buf: &[u8], now: Instant) -> Option<usize> {
        let max = self.shared.config.limits.max_header_bytes;
        let parsed = match http::parse_request(buf, max) {
            Ok(p) => p,
            Err(e) => {
                let status = if matches!(e, http::HttpError::HeadersTooLarge { .. }) {
                    (431, "Request Header Fields Too Large")
                } else {
                    (400, "Bad Request")
                };
                self.refuse(slot, status.0, status.1, &format!("{e}\n"), now);
                return None;
            }
        };
        let (request, header_len) = match parsed {
            Parsed::Incomplete => return Some(0),
            Parsed::Complete {
                request,
                header_len,
            } => (request, header_len),
        };
        let path = request.path;
        match path {
            "/v1/enroll" | "/v1/pair" | "/v1/renew" if request.method == "POST" => {
                let Some(len) = request.content_length else {
                    self.refuse(
                        slot,
                        411,
                        "Length Required",
                        "a Content-Length is required\n",
                        now,
                    );
                    return None;
                };
                let len = usize::try_from(len).unwrap_or(usize::MAX);
                if len > crate::control::MAX_BODY {
                    self.refuse(
                        slot,
                        413,
                        "Content Too Large",
                        "the request body is too large\n",
                        now,
                    );
                    return None;
                }
                let Some(body) = buf.get(header_len..header_len + len) else {
                    return Some(0); // the body has not all arrived yet
                };
                // Renewal: the device proves possession of its current certificate.
                let renewal = if path == "/v1/renew" {
                    Some(self.renewal_identity(slot, now)?)
                } else {
                    None
                };
                let conn = self.conn_mut(slot)?;
                let (reply_to, ip, body) = (conn.handle, conn.peer.ip(), body.to_vec());
                let job = match (path, renewal) {
                    (_, Some((unit, presented))) => crate::control::Job::Renew {
                        reply_to,
                        ip,
                        unit,
                        presented,
                        body,
                    },
                    ("/v1/enroll", None) => crate::control::Job::Enroll { reply_to, ip, body },
                    _ => crate::control::Job::Pair { reply_to, ip, body },
                };
                if !crate::control::submit(&self.shared, job) {
                    self.refuse(
                        slot,
                        503,
                        "Service Unavailable",
                        "enrollment is busy; retry later\n",
                        now,
                    );
                    return None;
                }
                conn_phase_waiting(self.conn_mut(slot)?);
                Some(header_len + len)
            }
            "/usg/check-status" if request.method == "GET" => {
                bump(&self.stats().check_status_requests);
                let status = self.shared.check_status(now);
                let body = format!("{{\"status\":\"{}\"}}", status.as_str());
                let resp =
                    http::response(200, "OK", Some("application/json"), body.as_bytes(), true);
                self.respond_and_close(slot, resp, now);
                None
            }
            "/v1/device" | "/v1/manager" => {
                if !request.is_websocket_upgrade() {
                    self.refuse(slot, 400, "Bad Request", "expected a WebSocket upgrade (GET with Upgrade: websocket, Sec-WebSocket-Version: 13)\n", now);
                    return None;
                }
                if request.content_length.is_some_and(|n| n > 0) {
                    self.refuse(
                        slot,
                        400,
                        "Bad Request",
                        "an upgrade request carries no body\n",
                        now,
                    );
                    return None;
                }
                if self.hands_over {
                    // The session belongs on a routing worker, which reads this head
                    // again (a few µs) and does the upgrade.
                    let conn = self.conn_mut(slot)?;
                    conn.leaving = true;
                    self.leaving.push(slot);
                    return Some(0);
                }
                let key = request.websocket_key.unwrap_or_default().to_owned();
                let want_device = path == "/v1/device";
                let used = self.upgrade(slot, &key, want_device, header_len, now);
                if used.is_some() {
                    self.became_session(slot, now);
                }
                used
            }
            _ => {
                self.refuse(slot, 404, "Not Found", "not found\n", now);
                None
            }
        }
    }

    fn refuse(&mut self, slot: u32, status: u16, reason: &str, body: &str, now: Instant) {
        bump(&self.stats().http_refused);
        if let Some(conn) = self.conn_ref(slot) {
            debug!(peer = %conn.peer, status, "refused: {}", body.trim_end());
        }
        let resp = http::response(status, reason, Some("text/plain"), body.as_bytes(), true);
        self.respond_and_close(slot, resp, now);
    }

    fn respond_and_close(&mut self, slot: u32, resp: Vec<u8>, now: Instant) {
        if let Some(conn) = self.conn_mut(slot) {
            conn.out
                .push(
                    Bytes::from(resp),
                    Priority::Essential,
                    usize::MAX,
                    usize::MAX,
                )
                .ok();
        }
        self.mark_dirty(slot);
        self.close(slot, now, Ending::Quiet);
    }

    /// The client certificate the peer presented, if any.
    fn peer_certificate(&self, slot: u32) -> Option<rustls_pki_types::CertificateDer<'static>> {
        self.conn_ref(slot).and_then(|c| match &c.tls {
            Tls::User(tls) => tls
                .peer_certificates()
                .and_then(|certs| certs.first().cloned()),
            _ => None,
        })
    }

    /// Whether the registry accepts certificate `fp` for device `unit` or manager
    /// `manager` (see [`crate::identity`]); refuses the request with 403 if not.
    fn certificate_accepted(
        &mut self,
        slot: u32,
        unit: Option<&Arc<str>>,
        manager: Option<&str>,
        fp: &crate::identity::Fp,
        now: Instant,
    ) -> bool {
        let identity = &self.shared.identity;
        let verdict = match (unit, manager) {
            (Some(unit), _) => identity.check_device(unit, fp, crate::identity::unix_at(now)),
            (None, Some(name)) => identity.check_manager(name, fp),
            (None, None) => return false,
        };
        let body = match verdict {
            crate::identity::Verdict::Accepted => return true,
            crate::identity::Verdict::FirstUse => {
                if let Some(unit) = unit {
                    // The store ends the renewal overlap and the enrollment retry window;
                    // if its queue is full, the next connection tells it again.
                    let job = crate::control::Job::CertUsed {
                        unit: unit.clone(),
                        fingerprint: *fp,
                    };
                    if crate::control::submit(&self.shared, job) {
                        self.shared.identity.note_used(unit, fp);
                    }
                }
                return true;
            }
            crate::identity::Verdict::Revoked => "this credential has been revoked\n",
            crate::identity::Verdict::Superseded => {
                "this certificate is no longer valid: it was replaced, reset or revoked\n"
            }
            crate::identity::Verdict::Unregistered => {
                "this certificate is not registered with this gateway\n"
            }
        };
        bump(&self.stats().rejected_revoked);
        let who = unit.map_or_else(
            || format!("manager {}", manager.unwrap_or_default()),
            |u| format!("device {u}"),
        );
        crate::warn_limited!(
            certificate = %devgate_pki::format_fingerprint(fp),
            "{who} refused: {}",
            body.trim_end()
        );
        self.refuse(slot, 403, "Forbidden", body, now);
        false
    }

    /// For `POST /v1/renew`: the unit and certificate SHA-256 of a device connected with a
    /// certificate the registry accepts; refuses the request otherwise.
    fn renewal_identity(
        &mut self,
        slot: u32,
        now: Instant,
    ) -> Option<(Arc<str>, crate::identity::Fp)> {
        let Some(cert) = self.peer_certificate(slot) else {
            self.refuse(
                slot,
                401,
                "Unauthorized",
                "renewal needs the device's current certificate (mutual TLS)\n",
                now,
            );
            return None;
        };
        let fp = devgate_pki::fingerprint_bytes(cert.as_ref());
        let Some(PeerRole::Device { unit_id }) = self.shared.tls.load().classifier.classify(&cert)
        else {
            self.refuse(
                slot,
                403,
                "Forbidden",
                "only a device certificate of this gateway can be renewed\n",
                now,
            );
            return None;
        };
        let unit: Arc<str> = Arc::from(unit_id.as_str());
        if !self.device_credential_accepted(slot, &unit, &fp, now) {
            return None;
        }
        Some((unit, fp))
    }

    /// A device's credential at upgrade and renewal: its unit is not revoked and the
    /// registry accepts this certificate; refuses the request with 403 otherwise. The log
    /// line is rate-limited: whoever holds a revoked certificate can repeat it at will.
    fn device_credential_accepted(
        &mut self,
        slot: u32,
        unit: &Arc<str>,
        fp: &crate::identity::Fp,
        now: Instant,
    ) -> bool {
        if self.shared.revoked.contains_key(&**unit) {
            bump(&self.stats().rejected_revoked);
            crate::warn_limited!("revoked device {unit} refused");
            self.refuse(
                slot,
                403,
                "Forbidden",
                "this credential has been revoked\n",
                now,
            );
            return false;
        }
        self.certificate_accepted(slot, Some(unit), None, fp, now)
    }

    fn upgrade(
        &mut self,
        slot: u32,
        key: &str,
        want_device: bool,
        header_len: usize,
        now: Instant,
    ) -> Option<usize> {
        let tls = self.shared.tls.load();
        let cert = self.peer_certificate(slot);
        // SHA-256 of the presented certificate: the registry accepts certificates, not
        // just the names they carry.
        let fp = cert
            .as_ref()
            .map(|c| devgate_pki::fingerprint_bytes(c.as_ref()))
            .unwrap_or_default();
        let role = cert.map(|cert| tls.classifier.classify(&cert));
        let role = match role {
            None => {
                self.refuse(
                    slot,
                    401,
                    "Unauthorized",
                    "a client certificate issued by this gateway is required\n",
                    now,
                );
                return None;
            }
            Some(None) => {
                self.refuse(
                    slot,
                    403,
                    "Forbidden",
                    "the client certificate does not name a device or manager of this gateway\n",
                    now,
                );
                return None;
            }
            Some(Some(role)) => role,
        };
        let handle = self.conn_ref(slot)?.handle;
        let max_message = self.shared.config.limits.max_message_bytes;
        let session = match (role, want_device) {
            (PeerRole::Device { unit_id }, true) => {
                let unit: Arc<str> = Arc::from(unit_id.as_str());
                if self.shared.shutting_down.load(Ordering::Relaxed) {
                    self.refuse(
                        slot,
                        503,
                        "Service Unavailable",
                        "the gateway is shutting down\n",
                        now,
                    );
                    return None;
                }
                if !self.device_credential_accepted(slot, &unit, &fp, now) {
                    return None;
                }
                if self.shared.devices_refused(now) {
                    bump(&self.stats().rejected_no_manager);
                    info!("no manager connected: device {unit} rejected");
                    self.refuse(
                        slot,
                        503,
                        "Service Unavailable",
                        "no manager connected; retry later\n",
                        now,
                    );
                    return None;
                }
                if !self.register_device(&unit, handle, now) {
                    bump(&self.stats().rejected_device_limit);
                    warn!("connection limit reached: device {unit} rejected");
                    self.refuse(
                        slot,
                        503,
                        "Service Unavailable",
                        "connection limit reached\n",
                        now,
                    );
                    return None;
                }
                bump(&self.stats().device_sessions);
                self.shared
                    .identity
                    .device_connected(unit.clone(), handle, fp);
                Role::Device(DeviceSession::new(unit))
            }
            (PeerRole::Manager { name }, false) => {
                if !self.certificate_accepted(slot, None, Some(&name), &fp, now) {
                    return None;
                }
                info!(manager = %name, peer = %self.conn_ref(slot)?.peer, "manager connected");
                self.shared
                    .identity
                    .manager_connected(handle, Arc::from(name.as_str()), fp);
                self.shared.add_manager(handle);
                bump(&self.stats().manager_sessions);
                Role::Manager(ManagerSession {
                    name: name.into_boxed_str(),
                    streams: std::collections::HashMap::new(),
                    trust_acked: 0,
                })
            }
            _ => {
                self.refuse(
                    slot,
                    403,
                    "Forbidden",
                    "this certificate is not valid for this path\n",
                    now,
                );
                return None;
            }
        };
        let latencies = self.shared.clone();
        let id = usize::from(self.id);
        let offload = self.shared.tls_offload.is_kernel();
        let conn = self.conn_mut(slot)?;
        latencies.latencies[id]
            .handshake
            .record(now.saturating_duration_since(conn.accepted_at));
        conn.kind = match session {
            Role::Device(_) => PeerKind::Device,
            Role::Manager(_) => PeerKind::Manager,
        };
        conn.phase = Phase::Session(Box::new(Session {
            decoder: ws::Decoder::new(ws::Role::Server, max_message),
            role: session,
        }));
        // Sessions live long: their records go to the kernel once the 101 is out.
        conn.offload_wanted = offload;
        conn.last_rx = now;
        let accept = http::switching_protocols(key);
        conn.out
            .push(
                Bytes::from(accept),
                Priority::Essential,
                usize::MAX,
                usize::MAX,
            )
            .ok();
        if let Some(bundle) = latencies.trust_bundle.load_full() {
            conn.out
                .push(
                    Bytes::clone(&bundle.frame),
                    Priority::Essential,
                    usize::MAX,
                    usize::MAX,
                )
                .ok();
        }
        self.mark_dirty(slot);
        Some(header_len)
    }

    /// Puts a device into the session map (replacing an older connection with the same
    /// unit ID) and tells managers it is online. Presence is sent while the map entry is
    /// locked so that managers see a unit's presence changes in map order.
    fn register_device(&mut self, unit: &Arc<str>, handle: ConnHandle, now: Instant) -> bool {
        let shared = self.shared.clone();
        match shared.devices.entry(unit.clone()) {
            Entry::Occupied(mut e) => {
                let old = e.insert(handle);
                bump(&self.stats().replaced);
                info!("device {unit} reconnected: replacing its older connection");
                self.deliver(Msg {
                    to: old,
                    kind: MsgKind::Close(CloseReason::Replaced),
                });
                self.broadcast_presence(unit, true, PresenceReason::Reconnected, now);
                true
            }
            Entry::Vacant(e) => {
                if !shared.reserve_device() {
                    return false;
                }
                e.insert(handle);
                self.broadcast_presence(unit, true, PresenceReason::Connected, now);
                true
            }
        }
    }

    fn broadcast_presence(
        &mut self,
        unit: &str,
        online: bool,
        reason: PresenceReason,
        _now: Instant,
    ) {
        let managers = self.shared.managers.load_full();
        if managers.is_empty() {
            return;
        }
        let bytes = encode_ws_frame(&Frame::presence(unit, online, reason));
        for m in managers.iter() {
            self.deliver(Msg {
                to: *m,
                kind: MsgKind::Frame {
                    bytes: bytes.clone(),
                    priority: Priority::Essential,
                    bounce_to: None,
                    bounce_id: 0,
                    bounce_unit: None,
                },
            });
        }
    }

    // ----- WebSocket --------------------------------------------------------------------

    /// Decodes and handles WebSocket frames; returns bytes consumed.
    fn on_websocket(&mut self, slot: u32, buf: &mut [u8], now: Instant) -> usize {
        let mut used = 0;
        while used < buf.len() {
            let Some(conn) = self.conn_mut(slot) else {
                return buf.len();
            };
            let Phase::Session(session) = &mut conn.phase else {
                return buf.len();
            };
            // The session is taken out for the duration of one frame so that handling it
            // can reach the rest of the worker; it goes back unless the frame closed us.
            let mut session = std::mem::replace(session, placeholder_session());
            let outcome = match session.decoder.decode(&mut buf[used..]) {
                Ok(Decoded::Incomplete) => Outcome::Incomplete,
                Ok(Decoded::Frame { consumed, message }) => {
                    let stats = &self.shared.stats[usize::from(self.id)];
                    stats.bytes_in.fetch_add(consumed as u64, Ordering::Relaxed);
                    used += consumed;
                    match message {
                        None => Outcome::Continue,
                        Some(m) => self.on_message(slot, &mut session.role, m, now),
                    }
                }
                Err(e) => {
                    bump(&self.stats().protocol_errors);
                    Outcome::Close(Ending::Protocol(e.close_code(), ws_error_text(&e)))
                }
            };
            if let Some(conn) = self.conn_mut(slot)
                && let Phase::Session(s) = &mut conn.phase
            {
                *s = session;
            }
            match outcome {
                Outcome::Continue => {}
                Outcome::Incomplete => return used,
                Outcome::Close(ending) => {
                    self.close(slot, now, ending);
                    return buf.len();
                }
            }
        }
        used
    }

    fn on_message(
        &mut self,
        slot: u32,
        role: &mut Role,
        msg: Message<'_>,
        now: Instant,
    ) -> Outcome {
        match msg {
            Message::Binary(data) => self.on_devgate_frame(slot, role, data, now),
            Message::Text(_) => Outcome::Close(Ending::Protocol(1003, "binary frames only")),
            Message::Ping(payload) => {
                let pong = control_frame(Opcode::Pong, payload);
                let _ = self.queue(slot, pong, Priority::Essential, now);
                Outcome::Continue
            }
            Message::Pong(_) => Outcome::Continue,
            Message::Close { code, .. } => Outcome::Close(Ending::CloseReceived(code)),
        }
    }

    fn on_devgate_frame(
        &mut self,
        slot: u32,
        role: &mut Role,
        data: &[u8],
        now: Instant,
    ) -> Outcome {
        let frame = match Frame::decode(data) {
            Ok(f) => f,
            Err(frame::FrameError::UnsupportedVersion(v)) => {
                let msg = format!(
                    "frame version {v} is not supported (this gateway speaks version {})",
                    frame::VERSION
                );
                self.send_error(slot, ErrorCode::UnsupportedVersion, 0, "", &msg, now);
                return Outcome::Close(Ending::Protocol(1002, "unsupported devgate frame version"));
            }
            Err(e) => {
                self.send_error(slot, ErrorCode::MalformedFrame, 0, "", &e.to_string(), now);
                return Outcome::Continue;
            }
        };
        match role {
            Role::Device(dev) => {
                bump(&self.stats().frames_from_devices);
                self.on_device_frame(slot, dev, frame, now);
            }
            Role::Manager(mgr) => {
                bump(&self.stats().frames_from_managers);
                self.on_manager_frame(slot, mgr, frame, now);
            }
        }
        Outcome::Continue
    }

    // ----- router: frames from devices ---------------------------------------------------

    fn on_device_frame(
        &mut self,
        slot: u32,
        dev: &mut DeviceSession,
        frame: Frame<'_>,
        now: Instant,
    ) {
        let Some(me) = self.conn_ref(slot).map(|c| c.handle) else {
            return;
        };
        if !frame.unit.is_empty() {
            self.send_error(
                slot,
                ErrorCode::MalformedFrame,
                frame.id,
                "",
                "frames from a device carry no unit ID (the gateway knows it from the certificate)",
                now,
            );
            return;
        }
        let unit = dev.unit.clone();
        match frame.body {
            Body::Response { payload } => {
                let Some(p) = dev.pending.remove(&frame.id) else {
                    self.send_error(slot, ErrorCode::UnknownRequest, frame.id, "", "no outstanding request has this id (answered already, timed out, or never sent)", now);
                    return;
                };
                bump(&self.stats().responses_routed);
                self.shared.latencies[usize::from(self.id)]
                    .device_response
                    .record(now.saturating_duration_since(p.sent_at));
                let bytes = encode_ws_frame(&Frame::response(&unit, p.request_id, payload));
                self.deliver(Msg {
                    to: p.manager,
                    kind: MsgKind::Response {
                        bytes,
                        device: me,
                        device_request_id: frame.id,
                        request_id: p.request_id,
                        unit,
                    },
                });
            }
            Body::Event { payload } => {
                let managers = self.shared.managers.load_full();
                if managers.is_empty() {
                    return;
                }
                let bytes = encode_ws_frame(&Frame::event(&unit, payload));
                for m in managers.iter() {
                    self.deliver(Msg {
                        to: *m,
                        kind: MsgKind::Frame {
                            bytes: bytes.clone(),
                            priority: Priority::Droppable,
                            bounce_to: Some(me),
                            bounce_id: frame.id,
                            bounce_unit: None,
                        },
                    });
                }
            }
            Body::StreamData { payload } => {
                let Some(stream) = dev.streams.get_mut(&frame.id) else {
                    self.send_error(
                        slot,
                        ErrorCode::UnknownStream,
                        frame.id,
                        "",
                        "no open stream has this id",
                        now,
                    );
                    return;
                };
                let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
                if len > stream.credit_to_manager {
                    let stream = stream.clone();
                    self.end_device_stream(
                        slot,
                        dev,
                        frame.id,
                        &stream,
                        u16::from(ErrorCode::FlowControl),
                        "flow control violated: data beyond the granted window",
                        true,
                        now,
                    );
                    return;
                }
                stream.credit_to_manager -= len;
                let bytes = encode_ws_frame(&Frame::stream_data(
                    &unit,
                    stream.manager_stream_id,
                    payload,
                ));
                let (to, stream_id) = (stream.manager, stream.manager_stream_id);
                self.deliver(Msg {
                    to,
                    kind: MsgKind::StreamDataToManager { stream_id, bytes },
                });
            }
            Body::StreamWindow { increment } => {
                let Some(stream) = dev.streams.get(&frame.id) else {
                    self.send_error(
                        slot,
                        ErrorCode::UnknownStream,
                        frame.id,
                        "",
                        "no open stream has this id",
                        now,
                    );
                    return;
                };
                let (to, stream_id) = (stream.manager, stream.manager_stream_id);
                self.deliver(Msg {
                    to,
                    kind: MsgKind::StreamWindowToManager {
                        stream_id,
                        increment,
                    },
                });
            }
            Body::StreamClose { code, reason } => {
                let Some(stream) = dev.streams.remove(&frame.id) else {
                    return; // closing an unknown stream is harmless: both ends may close at once
                };
                dev.streams_by_manager
                    .remove(&(stream.manager, stream.manager_stream_id));
                self.deliver(Msg {
                    to: stream.manager,
                    kind: MsgKind::StreamClosedToManager {
                        stream_id: stream.manager_stream_id,
                        code,
                        reason: Bytes::copy_from_slice(reason.as_bytes()),
                        unit,
                    },
                });
            }
            Body::Control { payload } if trust_ack_bundle(payload).is_some() => {
                let unit = dev.unit.clone();
                self.on_trust_ack(&unit, "device", &mut dev.trust_acked, payload);
            }
            Body::Command { .. }
            | Body::Presence { .. }
            | Body::Error { .. }
            | Body::Control { .. }
            | Body::StreamOpen { .. } => {
                self.send_error(
                    slot,
                    ErrorCode::NotPermitted,
                    frame.id,
                    "",
                    "devices may send only response, event, stream data/window/close and trust_bundle_ack frames",
                    now,
                );
            }
        }
    }

    /// A peer acknowledged the trust bundle: the store records it once per session and
    /// bundle (a peer repeating itself costs nothing). An acknowledgement of a bundle that is
    /// no longer the current one is ignored: the peer is sent the new one anyway.
    fn on_trust_ack(
        &mut self,
        name: &Arc<str>,
        kind: &'static str,
        acked: &mut u64,
        payload: &[u8],
    ) {
        let Some(bundle) = self.shared.trust_bundle.load_full() else {
            return;
        };
        let generation = self.shared.trust_generation.load(Ordering::Acquire);
        if *acked == generation || trust_ack_bundle(payload).as_deref() != Some(&*bundle.id) {
            return;
        }
        *acked = generation;
        let job = crate::control::Job::TrustAck {
            bundle: bundle.id.clone(),
            kind,
            name: name.clone(),
        };
        if !crate::control::submit(&self.shared, job) {
            // Not recorded: the store thread is overloaded. Forget that it was seen, so
            // the peer's next acknowledgement (it acknowledges every bundle frame) counts.
            *acked = 0;
        }
    }

    /// Ends a stream at the device side and tells both ends.
    #[allow(clippy::too_many_arguments)]
    fn end_device_stream(
        &mut self,
        slot: u32,
        dev: &mut DeviceSession,
        device_stream_id: u32,
        stream: &DeviceStream,
        code: u16,
        reason: &'static str,
        tell_device: bool,
        now: Instant,
    ) {
        dev.streams.remove(&device_stream_id);
        dev.streams_by_manager
            .remove(&(stream.manager, stream.manager_stream_id));
        self.deliver(Msg {
            to: stream.manager,
            kind: MsgKind::StreamClosedToManager {
                stream_id: stream.manager_stream_id,
                code,
                reason: Bytes::from_static(reason.as_bytes()),
                unit: dev.unit.clone(),
            },
        });
        if tell_device {
            let bytes = encode_ws_frame(&Frame::stream_close("", device_stream_id, code, reason));
            let _ = self.queue(slot, bytes, Priority::Essential, now);
        }
    }

    // ----- router: frames from managers --------------------------------------------------

    fn on_manager_frame(
        &mut self,
        slot: u32,
        mgr: &mut ManagerSession,
        frame: Frame<'_>,
        now: Instant,
    ) {
        let Some(me) = self.conn_ref(slot).map(|c| c.handle) else {
            return;
        };
        match frame.body {
            Body::Command { payload } => {
                let Some((unit, device)) = self.find_device(frame.unit) else {
                    self.send_error(
                        slot,
                        ErrorCode::DeviceNotConnected,
                        frame.id,
                        frame.unit,
                        "the device is not connected",
                        now,
                    );
                    return;
                };
                self.deliver(Msg {
                    to: device,
                    kind: MsgKind::Command {
                        from: me,
                        unit,
                        request_id: frame.id,
                        payload: Bytes::copy_from_slice(payload),
                    },
                });
            }
            Body::Control { payload } if trust_ack_bundle(payload).is_some() => {
                let name: Arc<str> = Arc::from(&*mgr.name);
                self.on_trust_ack(&name, "manager", &mut mgr.trust_acked, payload);
            }
            Body::Control { payload } => {
                let reply = self.control(me, frame.id, payload);
                match reply {
                    Ok(None) => {} // answered later by the control plane
                    Ok(Some(json)) => {
                        let bytes = encode_ws_frame(&Frame::control(frame.id, json.as_bytes()));
                        let _ = self.queue(slot, bytes, Priority::Essential, now);
                    }
                    Err(msg) => {
                        self.send_error(slot, ErrorCode::ControlFailed, frame.id, "", &msg, now)
                    }
                }
            }
            Body::StreamOpen { window, payload } => {
                if mgr.streams.contains_key(&frame.id) {
                    self.send_error(
                        slot,
                        ErrorCode::MalformedFrame,
                        frame.id,
                        frame.unit,
                        "this stream id is already open",
                        now,
                    );
                    return;
                }
                if mgr.streams.len() >= MAX_STREAMS_PER_MANAGER {
                    self.send_error(
                        slot,
                        ErrorCode::TooManyStreams,
                        frame.id,
                        frame.unit,
                        "too many streams open on this manager connection",
                        now,
                    );
                    return;
                }
                let Some((unit, device)) = self.find_device(frame.unit) else {
                    self.send_error(
                        slot,
                        ErrorCode::DeviceNotConnected,
                        frame.id,
                        frame.unit,
                        "the device is not connected",
                        now,
                    );
                    return;
                };
                mgr.streams.insert(
                    frame.id,
                    ManagerStream {
                        device,
                        unit: unit.clone(),
                        credit_to_device: 0,
                    },
                );
                self.deliver(Msg {
                    to: device,
                    kind: MsgKind::StreamOpen {
                        from: me,
                        unit,
                        stream_id: frame.id,
                        window,
                        payload: Bytes::copy_from_slice(payload),
                    },
                });
            }
            Body::StreamData { payload } => {
                let Some(stream) = mgr.streams.get_mut(&frame.id) else {
                    self.send_error(
                        slot,
                        ErrorCode::UnknownStream,
                        frame.id,
                        frame.unit,
                        "no open stream has this id",
                        now,
                    );
                    return;
                };
                let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
                if len > stream.credit_to_device {
                    let stream = stream.clone();
                    mgr.streams.remove(&frame.id);
                    let code = u16::from(ErrorCode::FlowControl);
                    let reason = "flow control violated: data beyond the granted window";
                    self.deliver(Msg {
                        to: stream.device,
                        kind: MsgKind::StreamCloseToDevice {
                            from: me,
                            stream_id: frame.id,
                            code,
                            reason: Bytes::from_static(reason.as_bytes()),
                        },
                    });
                    let bytes =
                        encode_ws_frame(&Frame::stream_close(&stream.unit, frame.id, code, reason));
                    let _ = self.queue(slot, bytes, Priority::Essential, now);
                    return;
                }
                stream.credit_to_device -= len;
                let device = stream.device;
                self.deliver(Msg {
                    to: device,
                    kind: MsgKind::StreamDataToDevice {
                        from: me,
                        stream_id: frame.id,
                        payload: Bytes::copy_from_slice(payload),
                    },
                });
            }
            Body::StreamWindow { increment } => {
                let Some(stream) = mgr.streams.get(&frame.id) else {
                    self.send_error(
                        slot,
                        ErrorCode::UnknownStream,
                        frame.id,
                        frame.unit,
                        "no open stream has this id",
                        now,
                    );
                    return;
                };
                let device = stream.device;
                self.deliver(Msg {
                    to: device,
                    kind: MsgKind::StreamWindowToDevice {
                        from: me,
                        stream_id: frame.id,
                        increment,
                    },
                });
            }
            Body::StreamClose { code, reason } => {
                let Some(stream) = mgr.streams.remove(&frame.id) else {
                    return;
                };
                self.deliver(Msg {
                    to: stream.device,
                    kind: MsgKind::StreamCloseToDevice {
                        from: me,
                        stream_id: frame.id,
                        code,
                        reason: Bytes::copy_from_slice(reason.as_bytes()),
                    },
                });
            }
            Body::Response { .. }
            | Body::Event { .. }
            | Body::Presence { .. }
            | Body::Error { .. } => {
                self.send_error(
                    slot,
                    ErrorCode::NotPermitted,
                    frame.id,
                    frame.unit,
                    "managers may send only command, control and stream frames",
                    now,
                );
            }
        }
    }

    fn find_device(&self, unit: &str) -> Option<(Arc<str>, ConnHandle)> {
        if unit.is_empty() {
            return None;
        }
        self.shared
            .devices
            .get(unit)
            .map(|e| (e.key().clone(), *e.value()))
    }

    /// Runs a manager's control request (a JSON object) and returns the JSON reply.
    /// Runs a manager's control request (a JSON object); `Ok(None)` when the control
    /// plane will answer it (operations on the store).
    fn control(
        &self,
        me: ConnHandle,
        request_id: u32,
        payload: &[u8],
    ) -> Result<Option<String>, String> {
        let req: serde_json::Value = serde_json::from_slice(payload)
            .map_err(|e| format!("control payload is not JSON: {e}"))?;
        let op = req
            .get("op")
            .and_then(serde_json::Value::as_str)
            .ok_or("control request needs a string field \"op\"")?;
        let shared = &self.shared;
        match op {
            "set_device_limit" => {
                let limit = req.get("limit").and_then(serde_json::Value::as_u64).ok_or(
                    "set_device_limit needs a non-negative integer \"limit\" (0 = unlimited)",
                )?;
                shared.device_limit.store(limit, Ordering::Relaxed);
                shared.refresh_accepting();
                info!(limit, "device limit changed by a manager");
                Ok(Some(
                    serde_json::json!({"ok": true, "device_limit": limit}).to_string(),
                ))
            }
            "get_status" => Ok(Some(
                serde_json::json!({
                    "ok": true,
                    "devices": shared.device_count.load(Ordering::Relaxed),
                    "managers": shared.manager_count(),
                    "device_limit": shared.device_limit.load(Ordering::Relaxed),
                })
                .to_string(),
            )),
            "list_devices" => {
                let offset = req
                    .get("offset")
                    .and_then(serde_json::Value::as_u64)
                    .unwrap_or(0);
                let limit = req
                    .get("limit")
                    .and_then(serde_json::Value::as_u64)
                    .unwrap_or(1000)
                    .min(10_000);
                let units: Vec<String> = shared
                    .devices
                    .iter()
                    .skip(usize::try_from(offset).unwrap_or(usize::MAX))
                    .take(usize::try_from(limit).unwrap_or(usize::MAX))
                    .map(|e| e.key().to_string())
                    .collect();
                Ok(Some(serde_json::json!({"ok": true, "total": shared.device_count.load(Ordering::Relaxed), "devices": units}).to_string()))
            }
            "create_keys" | "list_keys" | "revoke_key" | "revoke_device" | "unrevoke_device"
            | "reset_device" | "revoke_certificate" | "list_enrolled" => {
                let job = crate::control::Job::Manager {
                    reply_to: me,
                    request_id,
                    request: req,
                };
                if crate::control::submit(shared, job) {
                    Ok(None)
                } else {
                    Err("the control plane is busy; retry later".into())
                }
            }
            other => Err(format!(
                "unknown control op \"{other}\" (known: set_device_limit, get_status, list_devices, create_keys, list_keys, revoke_key, revoke_device, unrevoke_device, reset_device, revoke_certificate, list_enrolled)"
            )),
        }
    }

    // ----- messages ---------------------------------------------------------------------

    fn handle_msg(&mut self, msg: Msg, now: Instant) {
        let to = msg.to;
        if self.lookup(to).is_none() {
            let gone = msg.bounce(ErrorCode::DeviceNotConnected, "the device is not connected");
            if let Some(b) = gone {
                self.deliver(b);
            }
            return;
        }
        let slot = to.slot;
        match msg.kind {
            MsgKind::Frame {
                bytes,
                priority,
                bounce_to,
                bounce_id,
                bounce_unit,
            } => {
                if self.queue(slot, bytes, priority, now) == Err(QueueRefusal::Full)
                    && let Some(to) = bounce_to
                {
                    self.deliver(Msg {
                        to,
                        kind: MsgKind::Error {
                            code: ErrorCode::QueueFull,
                            id: bounce_id,
                            unit: bounce_unit,
                            message: "the receiver's queue is full; retry later",
                        },
                    });
                }
            }
            MsgKind::Response {
                bytes,
                device,
                device_request_id,
                request_id,
                unit,
            } => {
                if self.queue(slot, bytes, Priority::Droppable, now) == Err(QueueRefusal::Full) {
                    self.send_error(
                        slot,
                        ErrorCode::QueueFull,
                        request_id,
                        &unit,
                        "the response was refused: your queue is full (read faster or keep fewer requests outstanding)",
                        now,
                    );
                    self.deliver(Msg {
                        to: device,
                        kind: MsgKind::Error {
                            code: ErrorCode::QueueFull,
                            id: device_request_id,
                            unit: None,
                            message: "the manager's queue is full; it was told the response was refused",
                        },
                    });
                }
            }
            MsgKind::Error {
                code,
                id,
                unit,
                message,
            } => {
                let unit = unit.as_deref().unwrap_or("");
                self.send_error(slot, code, id, unit, message, now);
            }
            MsgKind::Close(reason) => self.close(slot, now, Ending::Gateway(reason)),
            MsgKind::HttpResponse(bytes) => self.respond_and_close(slot, bytes.to_vec(), now),
            MsgKind::Command {
                from,
                unit,
                request_id,
                payload,
            } => self.command_to_device(slot, from, unit, request_id, payload, now),
            MsgKind::StreamOpen {
                from,
                unit,
                stream_id,
                window,
                payload,
            } => {
                self.with_device(slot, |w, dev| {
                    if dev.streams.len() >= w.shared.config.limits.max_streams_per_device {
                        w.deliver(Msg {
                            to: from,
                            kind: MsgKind::StreamClosedToManager {
                                stream_id,
                                code: u16::from(ErrorCode::TooManyStreams),
                                reason: Bytes::from_static(b"too many streams open at this device"),
                                unit,
                            },
                        });
                        return;
                    }
                    let cap = w.shared.config.limits.stream_window_cap;
                    let id = DeviceSession::allocate_id(&mut dev.next_stream_id, &dev.streams);
                    let window = window.min(cap);
                    dev.streams.insert(
                        id,
                        DeviceStream {
                            manager: from,
                            manager_stream_id: stream_id,
                            credit_to_manager: window,
                        },
                    );
                    dev.streams_by_manager.insert((from, stream_id), id);
                    let bytes = encode_ws_frame(&Frame::stream_open("", id, window, &payload));
                    let _ = w.queue(slot, bytes, Priority::Essential, now);
                });
            }
            MsgKind::StreamDataToDevice {
                from,
                stream_id,
                payload,
            } => {
                self.with_device(slot, |w, dev| {
                    let Some(id) = dev.streams_by_manager.get(&(from, stream_id)).copied() else {
                        return;
                    };
                    let bytes = encode_ws_frame(&Frame::stream_data("", id, &payload));
                    let _ = w.queue(slot, bytes, Priority::Essential, now);
                });
            }
            MsgKind::StreamWindowToDevice {
                from,
                stream_id,
                increment,
            } => {
                self.with_device(slot, |w, dev| {
                    let cap = w.shared.config.limits.stream_window_cap;
                    let Some(id) = dev.streams_by_manager.get(&(from, stream_id)).copied() else {
                        return;
                    };
                    let Some(stream) = dev.streams.get_mut(&id) else {
                        return;
                    };
                    let granted = increment.min(cap.saturating_sub(stream.credit_to_manager));
                    if granted == 0 {
                        return;
                    }
                    stream.credit_to_manager += granted;
                    let bytes = encode_ws_frame(&Frame::stream_window("", id, granted));
                    let _ = w.queue(slot, bytes, Priority::Essential, now);
                });
            }
            MsgKind::StreamCloseToDevice {
                from,
                stream_id,
                code,
                reason,
            } => {
                self.with_device(slot, |w, dev| {
                    let Some(id) = dev.streams_by_manager.remove(&(from, stream_id)) else {
                        return;
                    };
                    dev.streams.remove(&id);
                    let reason = std::str::from_utf8(&reason).unwrap_or("");
                    let bytes = encode_ws_frame(&Frame::stream_close("", id, code, reason));
                    let _ = w.queue(slot, bytes, Priority::Essential, now);
                });
            }
            MsgKind::StreamWindowToManager {
                stream_id,
                increment,
            } => {
                self.with_manager(slot, |w, mgr| {
                    let cap = w.shared.config.limits.stream_window_cap;
                    let Some(stream) = mgr.streams.get_mut(&stream_id) else {
                        return;
                    };
                    let granted = increment.min(cap.saturating_sub(stream.credit_to_device));
                    if granted == 0 {
                        return;
                    }
                    stream.credit_to_device += granted;
                    let bytes =
                        encode_ws_frame(&Frame::stream_window(&stream.unit, stream_id, granted));
                    let _ = w.queue(slot, bytes, Priority::Essential, now);
                });
            }
            MsgKind::StreamDataToManager { stream_id, bytes } => {
                self.with_manager(slot, |w, mgr| {
                    if mgr.streams.contains_key(&stream_id) {
                        let _ = w.queue(slot, bytes, Priority::Essential, now);
                    }
                });
            }
            MsgKind::StreamClosedToManager {
                stream_id,
                code,
                reason,
                unit,
            } => {
                self.with_manager(slot, |w, mgr| {
                    if mgr.streams.remove(&stream_id).is_none() {
                        return;
                    }
                    let reason = std::str::from_utf8(&reason).unwrap_or("");
                    let bytes =
                        encode_ws_frame(&Frame::stream_close(&unit, stream_id, code, reason));
                    let _ = w.queue(slot, bytes, Priority::Essential, now);
                });
            }
        }
    }

    fn command_to_device(
        &mut self,
        slot: u32,
        from: ConnHandle,
        unit: Arc<str>,
        request_id: u32,
        payload: Bytes,
        now: Instant,
    ) {
        let limits = &self.shared.config.limits;
        let (max_pending, timeout) = (
            limits.max_pending_requests,
            Duration::from_millis(limits.request_timeout_ms),
        );
        self.with_device(slot, |w, dev| {
            if dev.pending.len() >= max_pending {
                w.deliver(Msg {
                    to: from,
                    kind: MsgKind::Error {
                        code: ErrorCode::TooManyRequests,
                        id: request_id,
                        unit: Some(unit),
                        message: "too many requests outstanding at this device",
                    },
                });
                return;
            }
            let id = DeviceSession::allocate_id(&mut dev.next_request_id, &dev.pending);
            let bytes = encode_ws_frame(&Frame::command("", id, &payload));
            match w.queue(slot, bytes, Priority::Droppable, now) {
                Ok(()) => {
                    dev.pending.insert(
                        id,
                        Pending {
                            manager: from,
                            request_id,
                            sent_at: now,
                            deadline: now + timeout,
                        },
                    );
                }
                Err(_) => {
                    w.deliver(Msg {
                        to: from,
                        kind: MsgKind::Error {
                            code: ErrorCode::QueueFull,
                            id: request_id,
                            unit: Some(unit),
                            message: "the device's queue is full; retry later",
                        },
                    });
                }
            }
        });
    }

    /// Runs `f` on the device session of `slot` (taken out of the connection meanwhile).
    fn with_device(&mut self, slot: u32, f: impl FnOnce(&mut Self, &mut DeviceSession)) {
        self.with_role(slot, |w, role| {
            if let Role::Device(dev) = role {
                f(w, dev);
            }
        });
    }

    fn with_manager(&mut self, slot: u32, f: impl FnOnce(&mut Self, &mut ManagerSession)) {
        self.with_role(slot, |w, role| {
            if let Role::Manager(mgr) = role {
                f(w, mgr);
            }
        });
    }

    fn with_role(&mut self, slot: u32, f: impl FnOnce(&mut Self, &mut Role)) {
        let Some(conn) = self.conn_mut(slot) else {
            return;
        };
        let Phase::Session(session) = &mut conn.phase else {
            return;
        };
        // Taken out so that `f` can use the whole worker. Nothing in `f` can close this
        // connection (closes are deferred to `run_local`), so the session always goes back.
        let mut taken = std::mem::replace(session, placeholder_session());
        f(self, &mut taken.role);
        if let Some(conn) = self.conn_mut(slot)
            && let Phase::Session(s) = &mut conn.phase
        {
            *s = taken;
        }
    }

    // ----- timers -----------------------------------------------------------------------

    fn sweep_conn(&mut self, slot: u32, now: Instant, interval: Duration) {
        let id = usize::from(self.id);
        let Some(conn) = self
            .slots
            .get_mut(slot as usize)
            .and_then(|s| s.conn.as_mut())
        else {
            return;
        };
        let session = match &mut conn.phase {
            Phase::Closing => return,
            Phase::Handshake | Phase::Waiting => {
                if now >= conn.handshake_deadline {
                    debug!(peer = %conn.peer, "handshake timeout");
                    bump(&self.shared.stats[id].handshakes_failed_timeout);
                    self.close(slot, now, Ending::Lost);
                }
                return;
            }
            Phase::Session(session) => session,
        };
        let idle = now.saturating_duration_since(conn.last_rx);
        if idle >= interval * 2 {
            let what = match session.role {
                Role::Device(_) => "device",
                Role::Manager(_) => "manager",
            };
            info!(peer = %conn.peer, "{what} missed its keep-alives for {} ms: declaring it dead", idle.as_millis());
            bump(&self.shared.stats[id].dead_peers);
            self.close(slot, now, Ending::Dead);
            return;
        }
        let mut expired = Vec::new();
        if let Role::Device(dev) = &mut session.role
            && !dev.pending.is_empty()
        {
            dev.pending.retain(|_, p| {
                let keep = p.deadline > now;
                if !keep {
                    expired.push((p.clone(), dev.unit.clone()));
                }
                keep
            });
        }
        let ping_due = idle >= interval
            && conn
                .ping_sent
                .is_none_or(|t| now.saturating_duration_since(t) >= interval);
        if ping_due {
            conn.ping_sent = Some(now);
            let _ = self.queue(
                slot,
                control_frame(Opcode::Ping, b""),
                Priority::Essential,
                now,
            );
        }
        for (p, unit) in expired {
            bump(&self.shared.stats[id].request_timeouts);
            self.deliver(Msg {
                to: p.manager,
                kind: MsgKind::Error {
                    code: ErrorCode::RequestTimeout,
                    id: p.request_id,
                    unit: Some(unit),
                    message: "the device did not answer within the request timeout",
                },
            });
        }
    }

    // ----- closing ----------------------------------------------------------------------

    /// Ends a connection: routing state is cleaned up at once (map, presence, pending
    /// requests, streams); a last frame may still be flushed before the socket closes.
    fn close(&mut self, slot: u32, now: Instant, ending: Ending) {
        let Some(conn) = self.conn_mut(slot) else {
            return;
        };
        let phase = std::mem::replace(&mut conn.phase, Phase::Closing);
        let handle = conn.handle;
        match &phase {
            Phase::Closing => return,
            Phase::Handshake | Phase::Waiting => {}
            Phase::Session(session) => {
                if let Some((code, reason)) = ending.close_frame() {
                    // The close frame and close_notify go out ahead of anything still queued.
                    conn.out = OutQueue::default();
                    // A manager is told why before the close, so it can fail over at once.
                    if ending == Ending::Gateway(CloseReason::Shutdown)
                        && matches!(session.role, Role::Manager(_))
                    {
                        let why = "the gateway is shutting down; reconnect to another instance";
                        let f = encode_ws_frame(&Frame::error("", 0, ErrorCode::ShuttingDown, why));
                        conn.out
                            .push(f, Priority::Essential, usize::MAX, usize::MAX)
                            .ok();
                    }
                    conn.out
                        .push(
                            close_frame(code, reason),
                            Priority::Essential,
                            usize::MAX,
                            usize::MAX,
                        )
                        .ok();
                }
            }
        }
        conn.inbuf = Vec::new();
        // close_notify must follow the last queued bytes: `flush_inner` sends it once the
        // queue is empty (rustls drops data written after it).
        conn.notify_on_drain = !matches!(ending, Ending::Dead | Ending::Lost);
        self.mark_dirty(slot);
        self.to_release.push(slot);
        if let Phase::Session(session) = phase {
            let presence_reason = match ending {
                Ending::Dead => PresenceReason::Dead,
                Ending::Gateway(_) => PresenceReason::ClosedByGateway,
                _ => PresenceReason::Disconnected,
            };
            self.cleanup_role_with(session.role, handle, presence_reason, now);
        }
    }

    fn cleanup_role_with(
        &mut self,
        role: Role,
        handle: ConnHandle,
        reason: PresenceReason,
        now: Instant,
    ) {
        match role {
            Role::Device(dev) => {
                let shared = self.shared.clone();
                // Only the connection the map points at may take the unit offline: a
                // replaced connection leaves quietly (the newer one already said online).
                if let Entry::Occupied(e) = shared.devices.entry(dev.unit.clone())
                    && *e.get() == handle
                {
                    e.remove();
                    shared.release_device();
                    self.broadcast_presence(&dev.unit, false, reason, now);
                }
                for (_, p) in dev.pending {
                    self.deliver(Msg {
                        to: p.manager,
                        kind: MsgKind::Error {
                            code: ErrorCode::DeviceDisconnected,
                            id: p.request_id,
                            unit: Some(dev.unit.clone()),
                            message: "the device disconnected before answering",
                        },
                    });
                }
                for (_, s) in dev.streams {
                    self.deliver(Msg {
                        to: s.manager,
                        kind: MsgKind::StreamClosedToManager {
                            stream_id: s.manager_stream_id,
                            code: u16::from(ErrorCode::DeviceDisconnected),
                            reason: Bytes::from_static(b"the device disconnected"),
                            unit: dev.unit.clone(),
                        },
                    });
                }
            }
            Role::Manager(mgr) => {
                info!(manager = %mgr.name, "manager disconnected");
                self.shared.remove_manager(handle, now);
                for (stream_id, s) in mgr.streams {
                    self.deliver(Msg {
                        to: s.device,
                        kind: MsgKind::StreamCloseToDevice {
                            from: handle,
                            stream_id,
                            code: u16::from(ErrorCode::ShuttingDown),
                            reason: Bytes::from_static(b"the manager disconnected"),
                        },
                    });
                }
            }
        }
    }
}

/// How a connection ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    /// The peer closed (TCP FIN, TLS close_notify).
    PeerClosed,
    /// The peer sent a WebSocket close frame (echoed back).
    CloseReceived(Option<u16>),
    /// The connection broke.
    Lost,
    /// Missed keep-alives.
    Dead,
    /// Protocol violation: close code and reason.
    Protocol(u16, &'static str),
    /// The gateway ends it.
    Gateway(CloseReason),
    /// After an HTTP response: no WebSocket close.
    Quiet,
}

impl Ending {
    fn close_frame(self) -> Option<(u16, &'static str)> {
        match self {
            Self::CloseReceived(code) => Some((code.filter(|c| *c != 1005).unwrap_or(1000), "")),
            Self::Protocol(code, reason) => Some((code, reason)),
            Self::Gateway(CloseReason::Replaced) => {
                Some((CLOSE_REPLACED, "replaced by a newer connection"))
            }
            Self::Gateway(CloseReason::NoManager) => Some((1001, "no manager connected")),
            Self::Gateway(CloseReason::Shutdown) => Some((1001, "gateway shutting down")),
            Self::Gateway(CloseReason::Revoked) => Some((1008, "credential revoked")),
            Self::PeerClosed | Self::Lost | Self::Dead | Self::Quiet => None,
        }
    }
}

enum Outcome {
    Continue,
    Incomplete,
    Close(Ending),
}

fn conn_phase_waiting(conn: &mut Conn) {
    conn.phase = Phase::Waiting;
}

/// The bundle id of a `{"op":"trust_bundle_ack","bundle":ID}` Control payload, if it is one.
fn trust_ack_bundle(payload: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Ack {
        op: String,
        bundle: String,
    }
    // A cheap test first: this runs for every Control frame a manager sends.
    if !payload.windows(16).any(|w| w == b"trust_bundle_ack") {
        return None;
    }
    let ack: Ack = serde_json::from_slice(payload).ok()?;
    (ack.op == "trust_bundle_ack").then_some(ack.bundle)
}

fn placeholder_session() -> Box<Session> {
    Box::new(Session {
        decoder: ws::Decoder::new(ws::Role::Server, 0),
        role: Role::Manager(ManagerSession {
            name: Box::from(""),
            streams: std::collections::HashMap::new(),
            trust_acked: 0,
        }),
    })
}

fn ws_error_text(e: &ws::WsError) -> &'static str {
    match e.close_code() {
        1009 => "message too big",
        1007 => "invalid payload data",
        _ => "WebSocket protocol error",
    }
}
