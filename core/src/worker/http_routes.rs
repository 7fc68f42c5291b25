//! HTTP before the upgrade: routes, enrollment and renewal requests for the store thread,
//! refusals.

use super::*;

impl Worker {
    /// Handles the request head; returns bytes consumed (0 while incomplete).
    pub(super) fn on_http(&mut self, slot: u32, buf: &[u8], now: Instant) -> Option<usize> {
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
                if len > crate::store_jobs::MAX_BODY {
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
                    (_, Some((unit, presented))) => crate::store_jobs::Job::Renew {
                        reply_to,
                        ip,
                        unit,
                        presented,
                        body,
                    },
                    ("/v1/enroll", None) => crate::store_jobs::Job::Enroll { reply_to, ip, body },
                    _ => crate::store_jobs::Job::Pair { reply_to, ip, body },
                };
                if !self.shared.submit(job) {
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

    pub(super) fn refuse(
        &mut self,
        slot: u32,
        status: u16,
        reason: &str,
        body: &str,
        now: Instant,
    ) {
        bump(&self.stats().http_refused);
        if let Some(conn) = self.conn_ref(slot) {
            debug!(peer = %conn.peer, status, "refused: {}", body.trim_end());
        }
        let resp = http::response(status, reason, Some("text/plain"), body.as_bytes(), true);
        self.respond_and_close(slot, resp, now);
    }

    pub(super) fn respond_and_close(&mut self, slot: u32, resp: Vec<u8>, now: Instant) {
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
}
