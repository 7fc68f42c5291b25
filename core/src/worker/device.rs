//! The router, device side: frames a device sends (responses, events, stream frames,
//! trust-bundle acknowledgements).

use super::*;

impl Worker {
    pub(super) fn on_device_frame(
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
                    kind: MsgKind::StreamDataToManager {
                        stream_id,
                        bytes,
                        device: me,
                        device_stream: frame.id,
                    },
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
                        device: me,
                        device_stream: frame.id,
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
    pub(super) fn on_trust_ack(
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
        let job = crate::store_jobs::Job::TrustAck {
            bundle: bundle.id.clone(),
            kind,
            name: name.clone(),
        };
        if !self.shared.submit(job) {
            // Not recorded: the store thread is overloaded. Forget that it was seen, so
            // the peer's next acknowledgement (it acknowledges every bundle frame) counts.
            *acked = 0;
        }
    }

    /// Ends a stream at the device side and tells both ends.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn end_device_stream(
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
}
