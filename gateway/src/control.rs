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
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use devgate_pki::{ClientCa, PkiPaths};
use devgate_proto::frame::{ErrorCode, Frame};
use devgate_proto::http;
use serde_json::{Value, json};
use tracing::{info, warn};

use crate::msg::{CloseReason, Msg, MsgKind, Priority};
use crate::shared::{ConnHandle, Shared};
use crate::store::{self, KeyCheck, KeyKind, Store};
use crate::tls::unix_now;

/// Largest enrollment or pairing request body.
pub const MAX_BODY: usize = 16 * 1024;
/// A one-time key consumed by a unit may be presented again by that unit for this long
/// (it lost our answer, e.g. because the gateway crashed right after the commit).
const RETRY_WINDOW_SECS: i64 = 900;
/// Failed enrollments allowed per source IP in a burst, and the refill interval.
const FAILURE_BURST: f64 = 10.0;
const FAILURE_REFILL: Duration = Duration::from_secs(6);
/// Tracked source IPs at most (oldest forgotten first).
const MAX_TRACKED_IPS: usize = 100_000;

/// Work for the store thread.
#[derive(Debug)]
pub enum Job {
    /// `POST /v1/enroll` from a device without a credential.
    Enroll {
        /// The waiting connection.
        reply_to: ConnHandle,
        /// Source address (rate limiting).
        ip: IpAddr,
        /// Request body (JSON).
        body: Vec<u8>,
    },
    /// `POST /v1/pair` from a manager with a pairing token.
    Pair {
        /// The waiting connection.
        reply_to: ConnHandle,
        /// Source address (rate limiting).
        ip: IpAddr,
        /// Request body (JSON).
        body: Vec<u8>,
    },
    /// A manager's control request that needs the store.
    Manager {
        /// The manager connection.
        reply_to: ConnHandle,
        /// Its request id.
        request_id: u32,
        /// The parsed request.
        request: Value,
    },
}

/// Starts the store thread; returns the job sender the workers use.
pub fn start(shared: Arc<Shared>, store: Arc<dyn Store>) -> anyhow::Result<SyncSender<Job>> {
    let paths = PkiPaths::new(&shared.config.data_dir);
    let device_ca = ClientCa::load(&paths.device_ca_cert(), &paths.device_ca_key())?;
    let manager_ca = ClientCa::load(&paths.manager_ca_cert(), &paths.manager_ca_key())?;
    let (tx, rx) = std::sync::mpsc::sync_channel(1024);
    let mut plane = ControlPlane {
        shared,
        store,
        device_ca,
        manager_ca,
        failures: HashMap::new(),
        revocation_seq: 0,
    };
    plane.poll_revocations();
    std::thread::Builder::new()
        .name("devgate-store".into())
        .spawn(move || plane.run(&rx))?;
    Ok(tx)
}

/// Hands a job to the store thread; false if it is overloaded (the caller answers 503).
pub fn submit(shared: &Shared, job: Job) -> bool {
    match shared.jobs.get() {
        Some(tx) => match tx.try_send(job) {
            Ok(()) => true,
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => false,
        },
        None => false,
    }
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

struct ControlPlane {
    shared: Arc<Shared>,
    store: Arc<dyn Store>,
    device_ca: ClientCa,
    manager_ca: ClientCa,
    failures: HashMap<IpAddr, Bucket>,
    revocation_seq: i64,
}

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
            if Instant::now() >= next_poll {
                self.poll_revocations();
                next_poll = Instant::now() + Duration::from_secs(1);
            }
        }
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
            Some(("Retry-After", wait.as_secs().max(1).to_string())),
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
        if !devgate_pki::is_valid_unit_id(unit) {
            return bad_request("unit_id must be 1-64 printable ASCII characters without spaces");
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
                info!(unit, %ip, "device enrolled");
                let pem = pem_chain(&chain);
                json_response(200, "OK", &json!({"certificate_chain": pem}), None)
            }
            Ok(KeyCheck::Refused(reason)) => {
                bump(&self.shared, |s| &s.enrollments_refused);
                self.record_failure(ip, now_i);
                // The reason is for the operator; the device learns only "refused".
                crate::warn_limited!(unit, %ip, reason = reason.as_str(), "enrollment refused");
                refused()
            }
            Err(e) => {
                crate::warn_limited!("enrollment failed: {e}");
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
        if !devgate_pki::is_valid_unit_id(name) {
            return bad_request("name must be 1-64 printable ASCII characters without spaces");
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
                let created = create_keys_from_json(&*self.store, req, now)?;
                Ok(json!({"ok": true, "keys": created}))
            }
            "list_keys" => {
                Ok(json!({"ok": true, "keys": self.store.list_keys().map_err(store_err)?}))
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
                let revoked = self.store.revoke_device(unit, now).map_err(store_err)?;
                self.poll_revocations();
                Ok(json!({"ok": true, "revoked": revoked}))
            }
            "unrevoke_device" => {
                let unit = req
                    .get("unit")
                    .and_then(Value::as_str)
                    .ok_or("unrevoke_device needs \"unit\"")?;
                let lifted = self.store.unrevoke_device(unit).map_err(store_err)?;
                self.poll_revocations();
                Ok(json!({"ok": true, "unrevoked": lifted}))
            }
            "list_enrolled" => {
                Ok(json!({"ok": true, "devices": self.store.devices().map_err(store_err)?}))
            }
            other => Err(format!("unknown control op \"{other}\"")),
        }
    }

    /// Applies new revocation events: revoked units are refused and disconnected now.
    fn poll_revocations(&mut self) {
        let (events, last) = match self.store.revocations_since(self.revocation_seq) {
            Ok(r) => r,
            Err(e) => {
                warn!("cannot read revocations: {e}");
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

fn bump(shared: &Shared, f: impl Fn(&crate::stats::WorkerStats) -> &std::sync::atomic::AtomicU64) {
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
            let n = req.get("count").and_then(Value::as_u64).unwrap_or(1);
            if !(1..=100_000).contains(&n) {
                return Err("count must be between 1 and 100000".into());
            }
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
                if !devgate_pki::is_valid_unit_id(&u) {
                    return Err(format!(
                        "\"{u}\" is not a valid unit ID (1-64 printable ASCII characters)"
                    ));
                }
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
