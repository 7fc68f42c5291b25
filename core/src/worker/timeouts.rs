//! Timers: handshake deadlines, keep-alives and dead peers, request timeouts, and the
//! worker-wide sweep (shutdown, the no-manager grace period, the trust bundle).

use super::*;

impl Worker {
    /// Timers: handshake timeouts, keep-alives, dead peers, request timeouts, the
    /// no-manager grace period and shutdown. Returns when it wants to be called next.
    ///
    /// Per-connection timers come from queues in deadline order ([`crate::timers`]), so a
    /// tick touches only the connections that are due, at most `TIMERS_PER_TICK` of them
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

    pub(super) fn ping_interval(&self) -> Duration {
        Duration::from_millis(self.shared.config.keepalive.ping_interval_ms)
    }

    /// How often a session is checked for keep-alives and request timeouts.
    pub(super) fn sweep_period(interval: Duration) -> Duration {
        (interval / 4).clamp(Duration::from_millis(25), Duration::from_secs(1))
    }

    /// The connection a timer was armed for, if the slot still holds it.
    pub(super) fn timer_conn(&self, t: Timer) -> Option<&Conn> {
        let entry = self.slots.get(t.slot as usize)?;
        if entry.generation != t.generation {
            return None;
        }
        entry.conn.as_ref()
    }

    /// A handshake deadline came up: the connection times out unless it became a session
    /// (or closed) meanwhile.
    pub(super) fn handshake_timer(&mut self, t: Timer, now: Instant) {
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

    /// A connection finished its handshake and HTTP upgrade: it no longer counts as
    /// unauthenticated, and its keep-alive checks start.
    pub(super) fn became_session(&mut self, slot: u32, now: Instant) {
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
    pub(super) fn sweep_worker(&mut self, now: Instant) {
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

    pub(super) fn sweep_conn(&mut self, slot: u32, now: Instant, interval: Duration) {
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
}
