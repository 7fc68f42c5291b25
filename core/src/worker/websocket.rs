//! WebSocket messages of a session: control frames, and binary messages decoded as
//! devgate frames for the router.

use super::*;

impl Worker {
    /// Decodes and handles WebSocket frames; returns bytes consumed.
    pub(super) fn on_websocket(&mut self, slot: u32, buf: &mut [u8], now: Instant) -> usize {
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

    pub(super) fn on_message(
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

    pub(super) fn on_devgate_frame(
        &mut self,
        slot: u32,
        role: &mut Role,
        data: &[u8],
        now: Instant,
    ) -> Outcome {
        let frame = match Frame::decode(data) {
            Ok(f) => f,
            Err(frame::FrameError::UnsupportedVersion(v)) => {
                return Outcome::Close(Ending::UnsupportedVersion(v));
            }
            Err(e) => {
                // The id is the frame's when its header was readable (PROTOCOL.md §7).
                let id = frame::header_id(data).unwrap_or(0);
                self.send_error(slot, ErrorCode::MalformedFrame, id, "", &e.to_string(), now);
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
}
