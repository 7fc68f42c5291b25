//! Accepting connections, per-source admission, the PROXY header, and the hand-over of
//! connections between a handshake worker and a routing worker.

use super::*;

impl Worker {
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

    pub(super) fn alloc_slot(&mut self) -> Option<u32> {
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
    pub(super) fn admit_source(&self, peer: SocketAddr, now: Instant) -> bool {
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
    pub(super) fn take_proxy_header(
        &mut self,
        slot: u32,
        data: &[u8],
        now: Instant,
    ) -> Option<Vec<u8>> {
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

    /// Closes this worker's oldest unauthenticated connection to make room for a new one;
    /// false if it holds none.
    pub(super) fn evict_oldest_unauthenticated(&mut self, now: Instant) -> bool {
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
}
