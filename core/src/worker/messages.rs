//! Messages between workers and within one (the inbox and the local queue): delivery,
//! queueing with its limits, errors back to the sender.

use super::*;

impl Worker {
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

    /// Sends `msg` to its connection: through the local queue if it is ours, else
    /// through the owner's inbox.
    pub(super) fn deliver(&mut self, msg: Msg) {
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

    pub(super) fn run_local(&mut self, now: Instant) {
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
    pub(super) fn queue(
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

    pub(super) fn send_error(
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

    pub(super) fn handle_msg(&mut self, msg: Msg, now: Instant) {
        let to = msg.to;
        if self.lookup(to).is_none() {
            let gone = match msg.kind {
                // The request ended with its manager: for the device, its id is no longer
                // outstanding (PROTOCOL.md §4).
                MsgKind::Response {
                    device,
                    device_request_id,
                    ..
                } => Some(Msg {
                    to: device,
                    kind: MsgKind::Error {
                        code: ErrorCode::UnknownRequest,
                        id: device_request_id,
                        unit: None,
                        message: "the manager that sent this request has disconnected",
                    },
                }),
                _ => msg.bounce(ErrorCode::DeviceNotConnected, "the device is not connected"),
            };
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
                        w.stream_crossed_close(from, stream_id, Some(dev.unit.clone()));
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
                        w.stream_crossed_close(from, stream_id, Some(dev.unit.clone()));
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
                device,
                device_stream,
            } => {
                self.with_manager(slot, |w, mgr| {
                    let cap = w.shared.config.limits.stream_window_cap;
                    let Some(stream) = mgr.streams.get_mut(&stream_id) else {
                        w.stream_crossed_close(device, device_stream, None);
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
            MsgKind::StreamDataToManager {
                stream_id,
                bytes,
                device,
                device_stream,
            } => {
                self.with_manager(slot, |w, mgr| {
                    if mgr.streams.contains_key(&stream_id) {
                        let _ = w.queue(slot, bytes, Priority::Essential, now);
                    } else {
                        w.stream_crossed_close(device, device_stream, None);
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

    /// A stream frame reached a side whose end of the stream is already closed (the close
    /// crossed it): its sender `to` gets `unknown_stream` for its stream id, as it would
    /// had the frame reached the gateway after the close.
    pub(super) fn stream_crossed_close(&mut self, to: ConnHandle, id: u32, unit: Option<Arc<str>>) {
        self.deliver(Msg {
            to,
            kind: MsgKind::Error {
                code: ErrorCode::UnknownStream,
                id,
                unit,
                message: "no open stream has this id (it was closed)",
            },
        });
    }

    pub(super) fn command_to_device(
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
}
