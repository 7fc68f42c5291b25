//! The WebSocket upgrade: which certificate is accepted for which role, registration of
//! a device in the session map, and presence to the managers.

use super::*;

impl Worker {
    /// The client certificate the peer presented, if any.
    pub(super) fn peer_certificate(
        &self,
        slot: u32,
    ) -> Option<rustls_pki_types::CertificateDer<'static>> {
        self.conn_ref(slot).and_then(|c| match &c.tls {
            Tls::User(tls) => tls
                .peer_certificates()
                .and_then(|certs| certs.first().cloned()),
            _ => None,
        })
    }

    /// Whether the registry accepts certificate `fp` for device `unit` or manager
    /// `manager` (see [`crate::identity`]); refuses the request with 403 if not.
    pub(super) fn certificate_accepted(
        &mut self,
        slot: u32,
        unit: Option<&Arc<str>>,
        manager: Option<&str>,
        fp: &crate::identity::Fp,
        now: Instant,
    ) -> bool {
        let identity = &self.shared.identity;
        let verdict = match (unit, manager) {
            (Some(unit), _) => identity.check_device(
                unit,
                fp,
                crate::identity::unix_at(self.shared.wall_clock, now),
            ),
            (None, Some(name)) => identity.check_manager(name, fp),
            (None, None) => return false,
        };
        let body = match verdict {
            crate::identity::Verdict::Accepted => return true,
            crate::identity::Verdict::FirstUse => {
                if let Some(unit) = unit {
                    // The store ends the renewal overlap and the enrollment retry window;
                    // if its queue is full, the next connection tells it again.
                    let job = crate::store_jobs::Job::CertUsed {
                        unit: unit.clone(),
                        fingerprint: *fp,
                    };
                    if self.shared.submit(job) {
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
    pub(super) fn renewal_identity(
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
    pub(super) fn device_credential_accepted(
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

    pub(super) fn upgrade(
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
    pub(super) fn register_device(
        &mut self,
        unit: &Arc<str>,
        handle: ConnHandle,
        now: Instant,
    ) -> bool {
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

    pub(super) fn broadcast_presence(
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
}
