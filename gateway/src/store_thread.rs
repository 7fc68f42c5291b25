//! The control plane's store thread: enrollment, manager pairing, key management and
//! revocation — everything that touches the store (disk, fsync) or signs certificates,
//! kept off the data path.
//!
//! Workers hand it [`Job`]s over a bounded channel and get answers back as [`Msg`]s in
//! their inboxes. It also polls the store's revocation log once a second, so revocations
//! made by `devgate devices revoke` (another process), by a manager, or by another gateway
//! instance sharing the store disconnect the device within a second.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender};
use std::time::{Duration, Instant};

use bytes::Bytes;
use devgate_pki::{ClientCa, PkiPaths};
use devgate_proto::frame::{ErrorCode, Frame};
use devgate_proto::http;
use serde_json::{Value, json};
use tracing::info;

use crate::daemon::Daemon;
use crate::msg::{CloseReason, Msg, MsgKind, Priority};
use crate::shared::ConnHandle;
use crate::store::{self, KeyCheck, KeyKind, Store};
use crate::tls::unix_now;

/// A one-time key consumed by a unit may be presented again by that unit for this long
/// (it lost our answer, e.g. because the gateway crashed right after the commit).
const RETRY_WINDOW_SECS: i64 = 900;
/// Failed enrollments allowed per source IP in a burst, and the refill interval.
const FAILURE_BURST: f64 = 10.0;
const FAILURE_REFILL: Duration = Duration::from_secs(6);
/// Tracked source IPs at most (oldest forgotten first).
const MAX_TRACKED_IPS: usize = 100_000;
/// Trust bundle acknowledgements held before they are written early (a fleet acknowledging
/// at once is written in batches this size, not one transaction each).
const MAX_PENDING_ACKS: usize = 10_000;

pub use devgate_core::store_jobs::{Job, MAX_BODY};

/// Starts the store thread; returns the job sender the workers use.
pub fn start(shared: Arc<Daemon>, store: Arc<dyn Store>) -> anyhow::Result<SyncSender<Job>> {
    let paths = PkiPaths::new(&shared.config.data_dir);
    let device_ca = ClientCa::load(&paths.device_ca_cert(), &paths.device_ca_key())?;
    let manager_ca = ClientCa::load(&paths.manager_ca_cert(), &paths.manager_ca_key())?;
    let (tx, rx) = std::sync::mpsc::sync_channel(1024);
    let shared_limit = shared
        .device_limit
        .load(std::sync::atomic::Ordering::Relaxed);
    let mut plane = ControlPlane {
        shared,
        store,
        device_ca,
        manager_ca,
        failures: HashMap::new(),
        revocation_seq: 0,
        trust_acks: Vec::new(),
        change_seq: 0,
        overlaps: Vec::new(),
        memory: crate::ops::memory::TrimPolicy::default(),
        fleet_limit: Some(shared_limit),
    };
    plane.load_identity()?;
    plane.poll_revocations();
    plane.refresh_trust_progress();
    std::thread::Builder::new()
        .name("devgate-store".into())
        .spawn(move || plane.run(&rx))?;
    Ok(tx)
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

struct ControlPlane {
    shared: Arc<Daemon>,
    store: Arc<dyn Store>,
    device_ca: ClientCa,
    manager_ca: ClientCa,
    failures: HashMap<IpAddr, Bucket>,
    revocation_seq: i64,
    /// Acknowledgements not yet written (flushed once a second, in one transaction).
    trust_acks: Vec<store::TrustAck>,
    /// Last applied entry of the store's credential change log.
    change_seq: i64,
    /// Units in a renewal overlap and when it ends: their sessions on the previous
    /// certificate are closed then.
    overlaps: Vec<(Arc<str>, i64)>,
    /// When to give freed memory back to the OS (after a large drop in connections).
    memory: crate::ops::memory::TrimPolicy,
    /// Fleet scope: the device limit as last exchanged with the store; a different local
    /// value means a manager changed it here, and it goes to the fleet.
    fleet_limit: Option<u64>,
}

/// Fleet scope: another instance's device count is believed while it reported within
/// this many seconds (an instance that died stops counting after it).
const FLEET_FRESH_SECS: i64 = 5;

fn json_response(status: u16, reason: &str, body: &Value, extra: Option<(&str, String)>) -> Bytes {
    let body = body.to_string();
    let mut resp = http::response(
        status,
        reason,
        Some("application/json"),
        body.as_bytes(),
        true,
    );
    if let Some((name, value)) = extra {
        // Insert the header after the status line.
        if let Some(pos) = resp.windows(2).position(|w| w == b"\r\n") {
            let header = format!("\r\n{name}: {value}");
            resp.splice(pos..pos, header.into_bytes());
        }
    }
    Bytes::from(resp)
}

fn refused() -> Bytes {
    json_response(
        401,
        "Unauthorized",
        &json!({"error": "enrollment refused"}),
        None,
    )
}

fn bad_request(why: &str) -> Bytes {
    json_response(400, "Bad Request", &json!({"error": why}), None)
}

impl ControlPlane {
    fn run(mut self, rx: &Receiver<Job>) {
        let mut next_poll = Instant::now() + Duration::from_secs(1);
        loop {
            let wait = next_poll.saturating_duration_since(Instant::now());
            match rx.recv_timeout(wait) {
                Ok(job) => self.handle(job),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
            if Instant::now() >= next_poll || self.trust_acks.len() >= MAX_PENDING_ACKS {
                self.poll_revocations();
                self.refresh_trust_progress();
                self.poll_changes();
                self.trim_memory();
                self.sync_fleet();
                crate::daemon::refresh_certificate_validity(&self.shared);
                next_poll = Instant::now() + Duration::from_secs(1);
            }
        }
    }

    fn trim_memory(&mut self) {
        let open = self
            .shared
            .connection_count
            .load(std::sync::atomic::Ordering::Relaxed);
        if !self.memory.due(open, Instant::now()) {
            return;
        }
        let (before, after) = crate::ops::memory::trim();
        self.shared
            .memory_trims
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        info!(
            "connections fell to {open}: returned {} MiB of freed memory to the OS ({} MiB resident now)",
            before.saturating_sub(after) / 1024,
            after / 1024
        );
    }

    fn reply(&self, to: ConnHandle, kind: MsgKind) {
        if let Some(inbox) = self.shared.inboxes.get(usize::from(to.worker)) {
            // An answer that cannot be delivered (inbox full) is lost; the client times
            // out and retries. Nothing here blocks the store thread.
            let _ = inbox.push(Msg { to, kind });
        }
    }

    fn handle(&mut self, job: Job) {
        match job {
            Job::Enroll { reply_to, ip, body } => {
                let resp = self.enroll(ip, &body);
                self.reply(reply_to, MsgKind::HttpResponse(resp));
            }
            Job::Pair { reply_to, ip, body } => {
                let resp = self.pair(ip, &body);
                self.reply(reply_to, MsgKind::HttpResponse(resp));
            }
            Job::TrustAck { bundle, kind, name } => {
                self.trust_acks.push(store::TrustAck { bundle, kind, name });
            }
            Job::Renew {
                reply_to,
                ip,
                unit,
                presented,
                body,
            } => {
                let resp = self.renew(ip, &unit, &presented, &body);
                self.reply(reply_to, MsgKind::HttpResponse(resp));
            }
            Job::CertUsed { unit, fingerprint } => {
                let fp = devgate_pki::format_fingerprint(&fingerprint);
                if let Err(e) = self.store.mark_cert_used(&unit, &fp, unix_now()) {
                    crate::warn_limited!(
                        "cannot record the first use of {unit}'s certificate: {e}"
                    );
                }
                self.poll_changes();
            }
            Job::Manager {
                reply_to,
                request_id,
                request,
            } => {
                let frame = match self.manager_op(&request) {
                    Ok(result) => {
                        let text = result.to_string();
                        encode(&Frame::control(request_id, text.as_bytes()))
                    }
                    Err(msg) => encode(&Frame::error(
                        "",
                        request_id,
                        ErrorCode::ControlFailed,
                        &msg,
                    )),
                };
                self.reply(
                    reply_to,
                    MsgKind::Frame {
                        bytes: frame,
                        priority: Priority::Essential,
                        bounce_to: None,
                        bounce_id: 0,
                        bounce_unit: None,
                    },
                );
            }
        }
    }

    /// Whether `ip` may try again; a refusal costs a token, successes cost nothing.
    fn blocked(&mut self, ip: IpAddr, now: Instant) -> Option<Duration> {
        let b = self.failures.get_mut(&ip)?;
        let refill =
            now.saturating_duration_since(b.at).as_secs_f64() / FAILURE_REFILL.as_secs_f64();
        b.tokens = (b.tokens + refill).min(FAILURE_BURST);
        b.at = now;
        if b.tokens >= 1.0 {
            None
        } else {
            Some(FAILURE_REFILL.mul_f64(1.0 - b.tokens))
        }
    }

    fn record_failure(&mut self, ip: IpAddr, now: Instant) {
        if self.failures.len() >= MAX_TRACKED_IPS
            && !self.failures.contains_key(&ip)
            && let Some(oldest) = self
                .failures
                .iter()
                .min_by_key(|(_, b)| b.at)
                .map(|(ip, _)| *ip)
        {
            self.failures.remove(&oldest);
        }
        let b = self.failures.entry(ip).or_insert(Bucket {
            tokens: FAILURE_BURST,
            at: now,
        });
        b.tokens = (b.tokens - 1.0).max(0.0);
    }

    fn too_many(wait: Duration) -> Bytes {
        json_response(
            429,
            "Too Many Requests",
            &json!({"error": "too many failed attempts from this address; retry later"}),
            Some(("Retry-After", retry_after_secs(wait).to_string())),
        )
    }

    fn enroll(&mut self, ip: IpAddr, body: &[u8]) -> Bytes {
        let now_i = Instant::now();
        if let Some(wait) = self.blocked(ip, now_i) {
            bump(&self.shared, |s| &s.enroll_rate_limited);
            return Self::too_many(wait);
        }
        let req: Value = match serde_json::from_slice(body) {
            Ok(v) => v,
            Err(e) => return bad_request(&format!("body is not JSON: {e}")),
        };
        let (Some(unit), Some(key), Some(csr)) = (
            req.get("unit_id").and_then(Value::as_str),
            req.get("key").and_then(Value::as_str),
            req.get("csr").and_then(Value::as_str),
        ) else {
            return bad_request("expected {\"unit_id\": …, \"key\": …, \"csr\": \"<PEM CSR>\"}");
        };
        if let Err(why) = devgate_pki::check_unit_id("unit ID", unit) {
            return bad_request(&why);
        }
        let chain = match self.device_ca.sign_device_csr(unit, csr.as_bytes()) {
            Ok(chain) => chain,
            Err(e) => return bad_request(&format!("the CSR cannot be used: {e}")),
        };
        let Some(leaf) = chain.first() else {
            return bad_request("the CSR cannot be used");
        };
        let fingerprint = devgate_pki::fingerprint(leaf.as_ref());
        match self
            .store
            .enroll(key, unit, &fingerprint, unix_now(), RETRY_WINDOW_SECS)
        {
            Ok(KeyCheck::Accepted) => {
                bump(&self.shared, |s| &s.enrollments);
                info!(unit, %ip, certificate = %fingerprint, "device enrolled");
                // Mirror the new certificate at once: the device connects right away.
                self.poll_changes();
                let pem = pem_chain(&chain);
                json_response(200, "OK", &json!({"certificate_chain": pem}), None)
            }
            Ok(KeyCheck::Refused(reason)) => {
                bump(&self.shared, |s| &s.enrollments_refused);
                self.record_failure(ip, now_i);
                // The reason is for the operator; the device learns only "refused".
                // Unauthenticated peers trigger this line: rate-limited.
                crate::warn_limited!(unit, %ip, reason = reason.as_str(), "enrollment refused");
                refused()
            }
            Err(e) => {
                crate::warn_limited!(%ip, "enrollment answered 503 (retry later): the credential store is unavailable: {e}");
                json_response(
                    503,
                    "Service Unavailable",
                    &json!({"error": "the credential store is unavailable; retry later"}),
                    Some(("Retry-After", "5".into())),
                )
            }
        }
    }

    /// Renewal: the device proved possession of `presented` over mutual TLS; it gets a
    /// new certificate for the CSR, and `presented` stays valid for the overlap.
    fn renew(
        &mut self,
        ip: IpAddr,
        unit: &str,
        presented: &crate::identity::Fp,
        body: &[u8],
    ) -> Bytes {
        let now_i = Instant::now();
        if let Some(wait) = self.blocked(ip, now_i) {
            bump(&self.shared, |s| &s.enroll_rate_limited);
            return Self::too_many(wait);
        }
        let req: Value = match serde_json::from_slice(body) {
            Ok(v) => v,
            Err(e) => return bad_request(&format!("body is not JSON: {e}")),
        };
        let Some(csr) = req.get("csr").and_then(Value::as_str) else {
            return bad_request("expected {\"csr\": \"<PEM CSR>\"}");
        };
        if let Some(named) = req.get("unit_id").and_then(Value::as_str)
            && named != unit
        {
            return bad_request("unit_id differs from the unit the client certificate names");
        }
        let chain = match self.device_ca.sign_device_csr(unit, csr.as_bytes()) {
            Ok(chain) => chain,
            Err(e) => return bad_request(&format!("the CSR cannot be used: {e}")),
        };
        let Some(leaf) = chain.first() else {
            return bad_request("the CSR cannot be used");
        };
        let fingerprint = devgate_pki::fingerprint(leaf.as_ref());
        let presented_text = devgate_pki::format_fingerprint(presented);
        match self.store.renew(
            unit,
            &presented_text,
            &fingerprint,
            unix_now(),
            crate::identity::RENEW_OVERLAP_SECS,
        ) {
            Ok(KeyCheck::Accepted) => {
                bump(&self.shared, |s| &s.enrollments);
                info!(unit, %ip, certificate = %fingerprint, previous = %presented_text, "device certificate renewed");
                self.poll_changes();
                json_response(
                    200,
                    "OK",
                    &json!({"certificate_chain": pem_chain(&chain)}),
                    None,
                )
            }
            Ok(KeyCheck::Refused(reason)) => {
                bump(&self.shared, |s| &s.enrollments_refused);
                self.record_failure(ip, now_i);
                crate::warn_limited!(unit, %ip, reason = reason.as_str(), "renewal refused");
                json_response(
                    401,
                    "Unauthorized",
                    &json!({"error": "renewal refused"}),
                    None,
                )
            }
            Err(e) => {
                crate::warn_limited!("renewal failed: {e}");
                json_response(
                    503,
                    "Service Unavailable",
                    &json!({"error": "the credential store is unavailable; retry later"}),
                    Some(("Retry-After", "5".into())),
                )
            }
        }
    }

    fn pair(&mut self, ip: IpAddr, body: &[u8]) -> Bytes {
        let now_i = Instant::now();
        if let Some(wait) = self.blocked(ip, now_i) {
            return Self::too_many(wait);
        }
        let req: Value = match serde_json::from_slice(body) {
            Ok(v) => v,
            Err(e) => return bad_request(&format!("body is not JSON: {e}")),
        };
        let (Some(name), Some(token), Some(csr)) = (
            req.get("name").and_then(Value::as_str),
            req.get("token").and_then(Value::as_str),
            req.get("csr").and_then(Value::as_str),
        ) else {
            return bad_request("expected {\"name\": …, \"token\": …, \"csr\": \"<PEM CSR>\"}");
        };
        if let Err(why) = devgate_pki::check_unit_id("manager name", name) {
            return bad_request(&why);
        }
        let chain = match self.manager_ca.sign_manager_csr(name, csr.as_bytes()) {
            Ok(chain) => chain,
            Err(e) => return bad_request(&format!("the CSR cannot be used: {e}")),
        };
        let Some(leaf) = chain.first() else {
            return bad_request("the CSR cannot be used");
        };
        match self.store.pair_manager(
            token,
            name,
            &devgate_pki::fingerprint(leaf.as_ref()),
            unix_now(),
        ) {
            Ok(true) => {
                info!(manager = name, %ip, "manager paired");
                self.poll_changes();
                json_response(
                    200,
                    "OK",
                    &json!({"certificate_chain": pem_chain(&chain)}),
                    None,
                )
            }
            Ok(false) => {
                self.record_failure(ip, now_i);
                crate::warn_limited!(manager = name, %ip, "manager pairing refused");
                refused()
            }
            Err(e) => {
                crate::warn_limited!("pairing failed: {e}");
                json_response(
                    503,
                    "Service Unavailable",
                    &json!({"error": "the credential store is unavailable; retry later"}),
                    None,
                )
            }
        }
    }

    fn manager_op(&mut self, req: &Value) -> Result<Value, String> {
        let op = req.get("op").and_then(Value::as_str).unwrap_or_default();
        let now = unix_now();
        let store_err = |e: store::StoreError| e.to_string();
        match op {
            "create_keys" => {
                check_create_keys_size(req, self.reply_budget())?;
                let created = create_keys_from_json(&*self.store, req, now)?;
                Ok(json!({"ok": true, "keys": created}))
            }
            "list_keys" => {
                let (limit, before) = list_keys_page_args(req)?;
                // Fewer per page where the operator made the send queue small.
                let limit = limit.min(self.reply_budget() / KEY_INFO_MAX_JSON).max(1);
                let (keys, next) = self
                    .store
                    .list_keys_page(before, limit)
                    .map_err(store_err)?;
                Ok(json!({
                    "ok": true,
                    "keys": keys,
                    "next_cursor": next.map(|rowid| rowid.to_string()),
                }))
            }
            "revoke_key" => {
                let id = req
                    .get("id")
                    .and_then(Value::as_str)
                    .ok_or("revoke_key needs \"id\"")?;
                Ok(
                    json!({"ok": true, "revoked": self.store.revoke_key(id, now).map_err(store_err)?}),
                )
            }
            "revoke_device" => {
                let unit = req
                    .get("unit")
                    .and_then(Value::as_str)
                    .ok_or("revoke_device needs \"unit\"")?;
                devgate_pki::check_unit_id("unit ID", unit)?;
                let outcome = self.store.revoke_device(unit, now).map_err(store_err)?;
                if outcome == store::UnitRevocation::Unknown {
                    return Err(format!("unit {unit} is not enrolled (see list_enrolled)"));
                }
                self.poll_revocations();
                self.poll_changes();
                Ok(json!({"ok": true, "revoked": outcome == store::UnitRevocation::Revoked}))
            }
            "unrevoke_device" => {
                let unit = req
                    .get("unit")
                    .and_then(Value::as_str)
                    .ok_or("unrevoke_device needs \"unit\"")?;
                devgate_pki::check_unit_id("unit ID", unit)?;
                let lifted = self.store.unrevoke_device(unit, now).map_err(store_err)?;
                self.poll_revocations();
                self.poll_changes();
                Ok(json!({"ok": true, "unrevoked": lifted}))
            }
            "reset_device" => {
                let unit = req
                    .get("unit")
                    .and_then(Value::as_str)
                    .ok_or("reset_device needs \"unit\"")?;
                devgate_pki::check_unit_id("unit ID", unit)?;
                if !self.store.reset_device(unit, now).map_err(store_err)? {
                    return Err(format!("unit {unit} is not enrolled (see list_enrolled)"));
                }
                self.poll_changes();
                Ok(json!({"ok": true, "reset": true}))
            }
            "revoke_certificate" => {
                let text = req
                    .get("sha256")
                    .and_then(Value::as_str)
                    .ok_or("revoke_certificate needs \"sha256\"")?;
                let fp = devgate_pki::parse_fingerprint(text)
                    .ok_or("\"sha256\" must be 64 hex digits (spaces or colons allowed)")?;
                let fp = devgate_pki::format_fingerprint(&fp);
                let revoked = self.store.revoke_cert(&fp, now).map_err(store_err)?;
                self.poll_changes();
                Ok(json!({"ok": true, "revoked": revoked}))
            }
            "list_enrolled" => {
                Ok(json!({"ok": true, "devices": self.store.devices().map_err(store_err)?}))
            }
            other => Err(format!("unknown control op \"{other}\"")),
        }
    }

    /// Writes the acknowledgements gathered since the last call, then publishes how far the
    /// root exchange has got for status (only while a trust bundle is loaded).
    fn refresh_trust_progress(&mut self) {
        if !self.trust_acks.is_empty() {
            let acks = std::mem::take(&mut self.trust_acks);
            if let Err(e) = self.store.record_trust_acks(&acks, unix_now()) {
                // Lost acknowledgements only delay the count: peers acknowledge every
                // bundle frame, and reconnecting peers are sent it again.
                crate::warn_limited!(
                    count = acks.len(),
                    "cannot record trust bundle acknowledgements: {e}"
                );
            }
        }
        let Some(bundle) = self.shared.trust_bundle.load_full() else {
            self.shared.trust_progress.store(None);
            return;
        };
        match self.store.trust_progress(&bundle.id) {
            Ok(progress) => self.shared.trust_progress.store(Some(Arc::new(progress))),
            Err(e) => crate::warn_limited!("cannot read the root exchange progress: {e}"),
        }
    }

    /// Fleet scope (`limits.device_limit_scope = "fleet"`): reports this instance's devices
    /// and learns the others' and the fleet's limit. Staleness: a device counted here is
    /// seen by the others after at most this second's exchange plus theirs (about 2 s).
    fn sync_fleet(&mut self) {
        use std::sync::atomic::Ordering::Relaxed;
        if self.shared.config.limits.device_limit_scope != crate::config::DeviceLimitScope::Fleet {
            return;
        }
        let shared = &self.shared;
        let local = shared.device_limit.load(Relaxed);
        let set = (Some(local) != self.fleet_limit).then_some(local);
        let devices = shared.device_count.load(Relaxed) as u64;
        match self.store.fleet_sync(
            &shared.instance_id,
            devices,
            set,
            unix_now(),
            FLEET_FRESH_SECS,
        ) {
            Ok(view) => {
                shared
                    .fleet_devices_elsewhere
                    .store(view.devices_elsewhere, Relaxed);
                let limit = view.limit.unwrap_or(local);
                if limit != local && set.is_none() {
                    shared.device_limit.store(limit, Relaxed);
                    info!(
                        limit,
                        "device limit changed for the fleet (by another instance)"
                    );
                }
                self.fleet_limit = Some(if set.is_some() { local } else { limit });
                shared.refresh_accepting();
            }
            Err(e) => crate::warn_limited!("cannot exchange device counts with the fleet: {e}"),
        }
    }

    /// Applies new revocation events: revoked units are refused and disconnected now.
    fn poll_revocations(&mut self) {
        let (events, last) = match self.store.revocations_since(self.revocation_seq) {
            Ok(r) => r,
            Err(e) => {
                crate::warn_limited!("cannot read revocations: {e}");
                return;
            }
        };
        self.revocation_seq = last;
        for event in events {
            if let Some(unit) = event.strip_prefix('-') {
                self.shared.revoked.remove(unit);
                continue;
            }
            let unit: Arc<str> = Arc::from(event.as_str());
            self.shared.revoked.insert(unit.clone(), ());
            if let Some(handle) = self.shared.devices.get(&*unit).map(|e| *e.value()) {
                info!(unit = %unit, "device credential revoked: disconnecting it");
                self.reply(handle, MsgKind::Close(CloseReason::Revoked));
            }
        }
    }
}

impl ControlPlane {
    /// Loads the accepted certificates into the mirror (at start, before any worker runs).
    fn load_identity(&mut self) -> anyhow::Result<()> {
        let store = &*self.store;
        // The head first: changes made while loading are applied again by the first poll.
        self.change_seq = store.cred_change_head()?;
        let id = &self.shared.identity;
        for (unit, creds) in store.all_device_creds()? {
            id.set_device(&unit, Some(&creds));
        }
        for (name, accepted) in store.all_manager_creds()? {
            id.set_manager(&name, Some(accepted.as_slice()));
        }
        for fp in store.revoked_certs()? {
            id.add_revoked(&fp);
        }
        self.overlaps = id.overlaps();
        Ok(())
    }

    /// Applies new entries of the store's credential change log to the mirror and closes
    /// sessions whose certificate is no longer accepted; also ends renewal overlaps.
    fn poll_changes(&mut self) {
        let (changes, last) = match self.store.cred_changes_since(self.change_seq) {
            Ok(r) => r,
            Err(e) => {
                crate::warn_limited!("cannot read credential changes: {e}");
                return;
            }
        };
        self.change_seq = last;
        let now = unix_now();
        let mut devices = std::collections::BTreeSet::new();
        let mut managers = std::collections::BTreeSet::new();
        let mut certs = Vec::new();
        for c in changes {
            match c {
                store::CredChange::Device(u) => {
                    devices.insert(u);
                }
                store::CredChange::Manager(m) => {
                    managers.insert(m);
                }
                store::CredChange::Cert(fp) => certs.push(fp),
            }
        }
        let mut close: Vec<(ConnHandle, String)> = Vec::new();
        for fp in certs {
            if let Some(raw) = self.shared.identity.add_revoked(&fp) {
                for h in self.shared.identity.sessions_with(&raw) {
                    close.push((h, format!("certificate {fp} revoked")));
                }
            }
        }
        for unit in devices {
            match self.store.device_creds(&unit) {
                Ok(creds) => {
                    self.shared.identity.set_device(&unit, creds.as_ref());
                    if let Some((_, until)) = creds.as_ref().and_then(|c| c.previous.as_ref()) {
                        self.overlaps.push((Arc::from(unit.as_str()), *until));
                    }
                }
                Err(e) => {
                    crate::warn_limited!("cannot read the credentials of {unit}: {e}");
                    continue;
                }
            }
            if let Some(h) = self.shared.identity.stale_device_session(&unit, now) {
                close.push((h, format!("device {unit}'s certificate is no longer valid")));
            }
        }
        for name in managers {
            match self.store.manager_creds(&name) {
                Ok(accepted) => self.shared.identity.set_manager(&name, accepted.as_deref()),
                Err(e) => {
                    crate::warn_limited!("cannot read the credentials of manager {name}: {e}");
                    continue;
                }
            }
            for h in self.shared.identity.stale_manager_sessions(&name) {
                close.push((
                    h,
                    format!("manager {name}'s certificate is no longer valid"),
                ));
            }
        }
        // Renewal overlaps that ended: sessions still on the previous certificate go.
        let mut ended = Vec::new();
        self.overlaps.retain(|(unit, until)| {
            if now >= *until {
                ended.push(unit.clone());
                false
            } else {
                true
            }
        });
        for unit in ended {
            if let Some(h) = self.shared.identity.stale_device_session(&unit, now) {
                close.push((
                    h,
                    format!("device {unit}'s previous certificate expired (renewal overlap over)"),
                ));
            }
        }
        for (h, why) in close {
            info!("{why}: disconnecting it");
            self.reply(h, MsgKind::Close(CloseReason::Revoked));
        }
    }
}

/// Whole seconds a client must wait for a retry to be accepted: rounded up (a header
/// that rounded down would announce a time after which the bucket still holds less than
/// one token, so an obedient client would get another 429), at least 1.
fn retry_after_secs(wait: Duration) -> u64 {
    let whole = wait.as_secs();
    let secs = if wait.subsec_nanos() > 0 {
        whole.saturating_add(1)
    } else {
        whole
    };
    secs.max(1)
}

fn bump(shared: &Daemon, f: impl Fn(&crate::stats::WorkerStats) -> &std::sync::atomic::AtomicU64) {
    // The store thread has no worker slot; it counts on worker 0's line (rare events).
    if let Some(s) = shared.stats.first() {
        f(s).fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

fn encode(frame: &Frame<'_>) -> Bytes {
    let mut out = Vec::new();
    devgate_proto::frame::encode_ws(&mut out, frame, None);
    Bytes::from(out)
}

fn pem_chain(chain: &[rustls_pki_types::CertificateDer<'_>]) -> String {
    chain
        .iter()
        .map(|c| crate::tls::cert_pem(c.as_ref()))
        .collect()
}

/// Keys per `list_keys` page, by default and at most. A key entry is at most
/// [`KEY_INFO_MAX_JSON`] bytes, so a full page (~350 KB) stays far below the 1 MiB frame
/// limit of managers and the per-connection send queue: a large store must not get its
/// manager disconnected as a slow consumer.
pub const LIST_KEYS_MAX_LIMIT: usize = 1000;

/// Keys one `create_keys` control request may create. The reply carries every secret
/// (at most [`CREATED_KEY_MAX_JSON`] bytes each), so 1000 keep it far below the frame
/// limits; the CLI (`devgate keys create`), which writes to the store directly, has no
/// such cap.
pub const CREATE_KEYS_MAX_PER_REQUEST: u64 = 1000;

/// Upper bound of one `list_keys` entry in JSON: 16-character id, 64-character unit and
/// used-by, four timestamps, field names.
const KEY_INFO_MAX_JSON: usize = 350;
/// Upper bound of one `create_keys` entry in JSON (id, secret, kind, 64-character unit).
const CREATED_KEY_MAX_JSON: usize = 200;

impl ControlPlane {
    /// Bytes one control reply may take: half the send queue's soft limit (which is at
    /// least one largest frame), so a reply never pushes a manager towards the hard limit
    /// at which it is disconnected.
    fn reply_budget(&self) -> usize {
        self.shared.config.limits.queue_bytes / 2
    }
}

/// `list_keys` arguments: `limit` (1 to [`LIST_KEYS_MAX_LIMIT`], default the maximum) and
/// `cursor` (the `next_cursor` of the previous page; absent for the first page).
fn list_keys_page_args(req: &Value) -> Result<(usize, Option<i64>), String> {
    let limit = match req.get("limit") {
        None | Some(Value::Null) => LIST_KEYS_MAX_LIMIT,
        Some(v) => v
            .as_u64()
            .and_then(|n| usize::try_from(n).ok())
            .filter(|n| (1..=LIST_KEYS_MAX_LIMIT).contains(n))
            .ok_or_else(|| {
                format!(
                    "list_keys: \"limit\" must be an integer from 1 to {LIST_KEYS_MAX_LIMIT} (got {v}); page with \"cursor\""
                )
            })?,
    };
    let before = match req.get("cursor") {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            v.as_str()
                .and_then(|c| c.parse::<i64>().ok())
                .filter(|n| *n > 0)
                .ok_or_else(|| {
                    format!("list_keys: \"cursor\" {v} is not a next_cursor returned by list_keys")
                })?,
        ),
    };
    Ok((limit, before))
}

/// Refuses a `create_keys` control request that would create more than
/// [`CREATE_KEYS_MAX_PER_REQUEST`] keys, or more than a reply of `budget` bytes holds.
fn check_create_keys_size(req: &Value, budget: usize) -> Result<(), String> {
    let max = CREATE_KEYS_MAX_PER_REQUEST
        .min(u64::try_from(budget / CREATED_KEY_MAX_JSON).unwrap_or(u64::MAX))
        .max(1);
    let count = req.get("count").and_then(Value::as_u64).unwrap_or(0);
    let units = req
        .get("units")
        .and_then(Value::as_array)
        .map_or(0, Vec::len);
    let asked = count.max(u64::try_from(units).unwrap_or(u64::MAX));
    if asked > max {
        return Err(format!(
            "create_keys creates at most {max} keys per request (asked for {asked}): send several requests, or use `devgate keys create` on the gateway host"
        ));
    }
    Ok(())
}

/// A created key as reported once to whoever created it (the secret is never shown again).
#[derive(Debug, serde::Serialize)]
pub struct CreatedKey {
    /// Lookup id (for `keys revoke`).
    pub id: String,
    /// The secret to hand to the device's installer.
    pub key: String,
    /// Kind.
    pub kind: &'static str,
    /// Bound unit.
    pub unit: Option<String>,
}

/// Creates keys as described by a JSON request (`kind`, `count`, `units`, `value`,
/// `expires`) — shared by the CLI and the manager control op.
pub fn create_keys_from_json(
    store: &dyn Store,
    req: &Value,
    now: i64,
) -> Result<Vec<CreatedKey>, String> {
    let kind = match req
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or("one-time")
    {
        "one-time" => KeyKind::OneTime,
        "bound" => KeyKind::Bound,
        "multi" => KeyKind::Multi,
        other => {
            return Err(format!(
                "unknown key kind \"{other}\" (one-time, bound, multi)"
            ));
        }
    };
    let expires = match req.get("expires").and_then(Value::as_str) {
        Some(text) => Some(store::parse_expiry(text, now)?),
        None => None,
    };
    let mut planned: Vec<(String, Option<String>)> = Vec::new();
    match kind {
        KeyKind::OneTime => {
            let n = match req.get("count") {
                None => 1,
                Some(v) => v
                    .as_u64()
                    .filter(|n| (1..=100_000).contains(n))
                    .ok_or_else(|| {
                        format!(
                            "count {v} is invalid: it must be a whole number between 1 and 100000"
                        )
                    })?,
            };
            planned.extend((0..n).map(|_| (store::generate_secret(), None)));
        }
        KeyKind::Bound => {
            let units: Vec<String> = req
                .get("units")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(|u| u.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default();
            if units.is_empty() {
                return Err("bound keys need \"units\": [unit IDs]".into());
            }
            for u in units {
                devgate_pki::check_unit_id("unit ID", &u)?;
                planned.push((store::generate_secret(), Some(u)));
            }
        }
        KeyKind::Multi => {
            let secret = match req.get("value").and_then(Value::as_str) {
                Some(v) if store::normalise_secret(v).len() >= 12 => v.to_owned(),
                Some(_) => {
                    return Err("a multi-use key value must have at least 12 characters".into());
                }
                None => store::generate_secret(),
            };
            planned.push((secret, None));
        }
    }
    let new: Vec<store::NewKey> = planned
        .iter()
        .map(|(secret, unit)| store::new_key(secret, kind, unit.clone(), expires, now))
        .collect();
    store.create_keys(&new).map_err(|e| e.to_string())?;
    Ok(planned
        .into_iter()
        .zip(new)
        .map(|((secret, unit), k)| CreatedKey {
            id: k.id,
            key: secret,
            kind: kind.as_str(),
            unit,
        })
        .collect())
}
