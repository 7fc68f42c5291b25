//! The router, manager side: frames a manager sends (commands, stream frames, control
//! requests).

use super::*;

impl Worker {
    pub(super) fn on_manager_frame(
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

    pub(super) fn find_device(&self, unit: &str) -> Option<(Arc<str>, ConnHandle)> {
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
    pub(super) fn control(
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
                let job = crate::store_jobs::Job::Manager {
                    reply_to: me,
                    request_id,
                    request: req,
                };
                if shared.submit(job) {
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
}
