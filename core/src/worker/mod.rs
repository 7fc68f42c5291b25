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
//! Socket work (kernel TLS, [`crate::kernel_tls`]): a few steps need a syscall on the
//! connection's own socket, which the sans-IO core never holds. `take_fd_work` lists those
//! slots (hand the session to the kernel; send close_notify as an alert record); the driver
//! calls `fd_work(slot, &mut socket, now)` for each, with the socket as a
//! [`KernelTlsSocket`](crate::kernel_tls::KernelTlsSocket), but only when no send on that socket is in
//! flight and no received bytes wait to be handed in (the hand-over switches the socket from
//! ciphertext to plaintext). Once `is_offloaded(slot)`, reads and writes on that socket are
//! plaintext (`on_received` and `flush_to` handle that themselves), and a read that fails
//! with EIO means a control record: the driver calls `on_control_record(slot, &mut socket, now)` and
//! reads on.
//!
//! Where things are: `admission.rs` (accept, per-source admission, PROXY header, hand-over
//! between workers), `transport.rs` (bytes in and out, TLS records, release),
//! `kernel_tls.rs` (the steps that need a syscall on the socket), `http_routes.rs` (requests
//! before the upgrade), `upgrade.rs` (credentials, registration, presence), `websocket.rs`
//! (messages of a session), `device.rs` and `manager.rs` (the router, one side each),
//! `messages.rs` (inbox and local queue), `timeouts.rs` (every timer), `ending.rs` (how a
//! connection ends and what its session leaves behind).
//!
//! Routing: a frame for a connection this worker owns is handled through a local queue
//! (no atomics, no wake-up); one for another worker's connection goes into that worker's
//! [`Inbox`](crate::shared::Inbox) as a [`Msg`].

use std::collections::VecDeque;
use std::io::{self, Write};
use std::net::SocketAddr;
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

mod admission;
mod device;
mod ending;
mod http_routes;
mod kernel_tls;
mod manager;
mod messages;
mod timeouts;
mod transport;
mod upgrade;
mod websocket;

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

pub use crate::conn::Detached;

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
        let unauthenticated_cap = crate::unauth::unauthenticated_cap(
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

    pub(super) fn stats(&self) -> &WorkerStats {
        &self.shared.stats[usize::from(self.id)]
    }

    /// Connections this worker holds.
    pub fn live(&self) -> usize {
        self.live
    }

    // ----- driver interface -------------------------------------------------------------

    pub(super) fn conn_mut(&mut self, slot: u32) -> Option<&mut Conn> {
        self.slots.get_mut(slot as usize)?.conn.as_mut()
    }

    pub(super) fn conn_ref(&self, slot: u32) -> Option<&Conn> {
        self.slots.get(slot as usize)?.conn.as_ref()
    }

    /// The live (not closing) connection behind `handle`, if it still exists here.
    pub(super) fn lookup(&mut self, handle: ConnHandle) -> Option<&mut Conn> {
        let entry = self.slots.get_mut(handle.slot as usize)?;
        if entry.generation != handle.generation {
            return None;
        }
        entry
            .conn
            .as_mut()
            .filter(|c| !matches!(c.phase, Phase::Closing))
    }

    pub(super) fn occupied_slots(&self) -> Vec<u32> {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.conn.is_some())
            .filter_map(|(i, _)| u32::try_from(i).ok())
            .collect()
    }

    pub(super) fn mark_dirty(&mut self, slot: u32) {
        if let Some(conn) = self.conn_mut(slot)
            && !conn.dirty
        {
            conn.dirty = true;
            self.dirty.push(slot);
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
    /// A devgate frame of another version (this one): an `unsupported_version` Error, then
    /// close 1002.
    UnsupportedVersion(u8),
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
            Self::UnsupportedVersion(_) => Some((1002, "unsupported devgate frame version")),
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
