//! How a connection ends: close frames, the cleanup of a session's pending requests and
//! streams, presence, and the slot's release.

use super::*;

impl Worker {
    /// Runs `f` on the device session of `slot` (taken out of the connection meanwhile).
    pub(super) fn with_device(&mut self, slot: u32, f: impl FnOnce(&mut Self, &mut DeviceSession)) {
        self.with_role(slot, |w, role| {
            if let Role::Device(dev) = role {
                f(w, dev);
            }
        });
    }

    pub(super) fn with_manager(
        &mut self,
        slot: u32,
        f: impl FnOnce(&mut Self, &mut ManagerSession),
    ) {
        self.with_role(slot, |w, role| {
            if let Role::Manager(mgr) = role {
                f(w, mgr);
            }
        });
    }

    pub(super) fn with_role(&mut self, slot: u32, f: impl FnOnce(&mut Self, &mut Role)) {
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

    /// Ends a connection: routing state is cleaned up at once (map, presence, pending
    /// requests, streams); a last frame may still be flushed before the socket closes.
    pub(super) fn close(&mut self, slot: u32, now: Instant, ending: Ending) {
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
                    // The peer learns why before the close (PROTOCOL.md §9).
                    if let Ending::UnsupportedVersion(v) = ending {
                        let why = format!(
                            "frame version {v} is not supported (this gateway speaks version {})",
                            frame::VERSION
                        );
                        let f = encode_ws_frame(&Frame::error(
                            "",
                            0,
                            ErrorCode::UnsupportedVersion,
                            &why,
                        ));
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
                // The gateway ended it: its own decision, a protocol violation or a full
                // queue (PROTOCOL.md §4).
                Ending::Gateway(_) | Ending::Protocol(..) | Ending::UnsupportedVersion(_) => {
                    PresenceReason::ClosedByGateway
                }
                _ => PresenceReason::Disconnected,
            };
            self.cleanup_role_with(session.role, handle, presence_reason, now);
        }
    }

    pub(super) fn cleanup_role_with(
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
