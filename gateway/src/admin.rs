//! The control plane's admin listener (loopback by default): `GET /v1/status` (JSON) and
//! `GET /metrics` (Prometheus text). It runs on its own small tokio runtime, off the data
//! path, together with signal handling.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use devgate_proto::http::{self, Parsed};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tracing::{debug, info, warn};

use crate::daemon::Daemon;
use crate::stats::{LATENCY_BOUNDS_US, LatencyHistogram, StatsSnapshot, WorkerLatencies};

/// The addresses actually bound (the configured ones may say port 0), for status.
static BOUND: std::sync::OnceLock<(std::net::SocketAddr, std::net::SocketAddr)> =
    std::sync::OnceLock::new();

pub use crate::admin_token::{AdminToken, create_token, load_token};

/// Starts the admin thread (HTTP listener, signal handlers, readiness and watchdog).
/// `public` is the bound public listener address; with `token`, every request must carry
/// it as `Authorization: Bearer …` (401 otherwise).
pub fn start(
    shared: Arc<Daemon>,
    listener: std::net::TcpListener,
    public: std::net::SocketAddr,
    token: Option<AdminToken>,
) -> Result<()> {
    let _ = BOUND.set((public, listener.local_addr()?));
    listener.set_nonblocking(true)?;
    std::thread::Builder::new()
        .name("devgate-admin".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!("cannot start the admin runtime: {e}");
                    return;
                }
            };
            rt.block_on(async move {
                let listener = match tokio::net::TcpListener::from_std(listener) {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::error!("admin listener: {e}");
                        return;
                    }
                };
                tokio::spawn(signals(shared.clone()));
                tokio::spawn(crate::ops::watchdog::run(shared.clone()));
                tokio::spawn(async {
                    loop {
                        tokio::time::sleep(crate::ops::ratelimit::WINDOW).await;
                        crate::ops::ratelimit::roll_window();
                    }
                });
                loop {
                    match listener.accept().await {
                        Ok((stream, _)) => {
                            tokio::spawn(serve_one(shared.clone(), stream, token.clone()));
                        }
                        Err(e) => {
                            crate::warn_limited!("admin accept: {e}");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                }
            });
        })
        .context("starting the admin thread")?;
    Ok(())
}

async fn signals(shared: Arc<Daemon>) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        warn!("cannot install signal handlers");
        return;
    };
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            // `systemctl reload` (ExecReload=/bin/kill -HUP $MAINPID). Without a handler
            // SIGHUP would terminate the process.
            _ = hup.recv() => reload(&shared),
        }
    }
    crate::ops::shutdown::begin_shutdown(&shared);
}

/// Graceful reload on SIGHUP: re-reads the TLS material (server chain, client CAs) from
/// the data directory and swaps it in. New connections use it; established sessions keep
/// theirs. On any error the current material stays. The service manager sees
/// `RELOADING=1` … `READY=1` around it. (Certificate rotation with root exchange, issue 3,
/// replaces the body with its own reload.)
fn reload(shared: &Daemon) {
    crate::ops::notify::reloading();
    info!("SIGHUP: reloading the TLS material");
    crate::reload::reload(shared);
    crate::ops::notify::ready("serving (reloaded)");
}

async fn serve_one(shared: Arc<Daemon>, mut stream: TcpStream, token: Option<AdminToken>) {
    let mut buf = Vec::with_capacity(1024);
    let deadline = tokio::time::sleep(Duration::from_secs(5));
    tokio::pin!(deadline);
    let path = loop {
        let mut chunk = [0u8; 1024];
        let n = tokio::select! {
            r = stream.read(&mut chunk) => match r { Ok(0) | Err(_) => return, Ok(n) => n },
            () = &mut deadline => return,
        };
        buf.extend_from_slice(&chunk[..n]);
        match http::parse_request(&buf, 8192) {
            Ok(Parsed::Incomplete) => {}
            Ok(Parsed::Complete { request, .. }) => {
                if token.as_ref().is_some_and(|t| !t.authorizes(&buf)) {
                    let _ = stream.write_all(&unauthorized()).await;
                    let _ = stream.shutdown().await;
                    return;
                }
                if request.method != "GET" {
                    break None;
                }
                break Some(request.path.to_owned());
            }
            Err(e) => {
                debug!("admin request: {e}");
                break None;
            }
        }
    };
    let resp = match path.as_deref() {
        Some("/v1/status") => {
            let body = status_json(&shared).to_string();
            http::response(200, "OK", Some("application/json"), body.as_bytes(), true)
        }
        Some("/metrics") => http::response(
            200,
            "OK",
            Some("text/plain; version=0.0.4; charset=utf-8"),
            metrics_text(&shared).as_bytes(),
            true,
        ),
        Some(_) => http::response(404, "Not Found", Some("text/plain"), b"not found\n", true),
        None => http::response(
            400,
            "Bad Request",
            Some("text/plain"),
            b"bad request\n",
            true,
        ),
    };
    let _ = stream.write_all(&resp).await;
    let _ = stream.shutdown().await;
}

/// 401 with the challenge RFC 6750 prescribes.
fn unauthorized() -> Vec<u8> {
    let mut resp = http::response(
        401,
        "Unauthorized",
        Some("text/plain"),
        b"this admin listener requires Authorization: Bearer <token> (the token file, by default <data_dir>/admin.token)\n",
        true,
    );
    if let Some(pos) = resp.windows(2).position(|w| w == b"\r\n") {
        resp.splice(
            pos..pos,
            b"\r\nWWW-Authenticate: Bearer realm=\"devgate-admin\""
                .iter()
                .copied(),
        );
    }
    resp
}

fn snapshot(shared: &Daemon) -> StatsSnapshot {
    let mut s = StatsSnapshot::default();
    for w in shared.stats.iter() {
        s.add(w);
    }
    s
}

/// A latency histogram summed over all workers.
#[derive(Debug, Clone, Copy, Default)]
pub struct HistogramSnapshot {
    /// Observations per bucket (non-cumulative); the last is +Inf.
    pub buckets: [u64; LATENCY_BOUNDS_US.len() + 1],
    /// Sum of observations in µs.
    pub sum_us: u64,
}

impl HistogramSnapshot {
    /// Sums one histogram of every worker.
    fn collect(shared: &Daemon, pick: fn(&WorkerLatencies) -> &LatencyHistogram) -> Self {
        let mut s = Self::default();
        for w in shared.latencies.iter() {
            let h = pick(w);
            for (acc, b) in s.buckets.iter_mut().zip(h.buckets.iter()) {
                *acc += b.load(Ordering::Relaxed);
            }
            s.sum_us += h.sum_us.load(Ordering::Relaxed);
        }
        s
    }

    /// Observations. Taken from the buckets rather than the separate counter so that
    /// `_count` always equals the `+Inf` bucket, even while workers are recording.
    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }

    /// Upper bound (µs) of the bucket holding quantile `q`; `None` if empty or if it
    /// falls into the +Inf bucket.
    pub fn quantile_bound_us(&self, q: f64) -> Option<u64> {
        let count = self.count();
        if count == 0 {
            return None;
        }
        // Rank of the q-quantile, 1-based; the cast is exact for any realistic count.
        let rank = ((count as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return LATENCY_BOUNDS_US.get(i).copied();
            }
        }
        None
    }

    fn status(&self) -> serde_json::Value {
        let count = self.count();
        serde_json::json!({
            "count": count,
            "mean_us": self.sum_us.checked_div(count),
            "p50_le_us": self.quantile_bound_us(0.5),
            "p99_le_us": self.quantile_bound_us(0.99),
        })
    }
}

/// Health of the state directory and the credential store: the directory must exist, be a
/// directory we can write into, and hold the server certificate; the store (SQLite or
/// PostgreSQL) must answer.
fn store_status(shared: &Daemon) -> serde_json::Value {
    let dir = &shared.config.data_dir;
    let paths = devgate_pki::PkiPaths::new(dir);
    let mut problems: Vec<String> = Vec::new();
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => problems.push(format!("{} is not a directory", dir.display())),
        Err(e) => problems.push(format!("{}: {e}", dir.display())),
    }
    if !paths.server_cert().exists() {
        problems.push(format!("{} is missing", paths.server_cert().display()));
    }
    let (kind, database) = match shared.store.get() {
        None => {
            problems.push("the credential store is not open".to_owned());
            ("unknown", String::new())
        }
        Some(store) => {
            if let Err(e) = store.health() {
                problems.push(format!("credential store: {e}"));
            }
            (store.kind(), store.location())
        }
    };
    let free_bytes = free_bytes(dir);
    if free_bytes == Some(0) {
        problems.push(format!("no space left on {}", dir.display()));
    }
    serde_json::json!({
        "kind": kind,
        "data_dir": dir.display().to_string(),
        "database": database,
        "ok": problems.is_empty(),
        "problems": problems,
        "free_bytes": free_bytes,
    })
}

/// Bytes available to the gateway's user on the file system of `dir`.
fn free_bytes(dir: &std::path::Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs reads the NUL-terminated path and writes only into `st`.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    Some(st.f_bavail.saturating_mul(st.f_frsize))
}

/// The `/v1/status` document. Field names are a contract (see README "Contract" and
/// `tests/tests/ops_status.rs`); add fields, never rename them.
pub fn status_json(shared: &Daemon) -> serde_json::Value {
    let now = Instant::now();
    let unix_now = crate::tls::unix_now();
    let tls = shared.tls.load();
    let certificates: Vec<serde_json::Value> = tls
        .certificates
        .iter()
        .map(|(role, c)| {
            serde_json::json!({
                "role": role,
                "subject": c.subject,
                "not_after": c.not_after,
                "not_after_unix": c.not_after_unix,
                "expires_in_days": (c.not_after_unix - unix_now).div_euclid(86_400),
            })
        })
        .collect();
    let cfg = &shared.config;
    let uptime = shared.started.elapsed().as_secs();
    serde_json::json!({
        "version": env!("CARGO_PKG_VERSION"),
        "instance": shared.instance_id,
        "pid": std::process::id(),
        "uptime_secs": uptime,
        "started_at_unix": unix_now.saturating_sub(i64::try_from(uptime).unwrap_or(0)),
        "check_status": shared.check_status(now).as_str(),
        "shutting_down": shared.shutting_down.load(Ordering::Relaxed),
        "data_path": shared.data_path.name,
        "data_path_reason": shared.data_path.reason,
        "tls_offload": shared.tls_offload.mode,
        "tls_offload_reason": shared.tls_offload.reason,
        "tls_offload_ciphers": shared.tls_offload.ciphers.names(),
        "tls_offload_rekey": shared.tls_offload.rekey,
        "xdp": shared.guard.status(),
        "workers": shared.routing_workers,
        "handshake_workers": shared.worker_count() - shared.routing_workers,
        "memory_trims": shared.memory_trims.load(Ordering::Relaxed),
        "devices": shared.device_count.load(Ordering::Relaxed),
        "managers": shared.manager_count(),
        "connections": shared.connection_count.load(Ordering::Relaxed),
        "listen": BOUND.get().map_or(cfg.listen, |b| b.0).to_string(),
        "admin": BOUND.get().map_or(cfg.admin, |b| b.1).to_string(),
        "limits": {
            "device_limit": shared.device_limit.load(Ordering::Relaxed),
            "device_limit_scope": cfg.limits.device_limit_scope,
            "fleet_devices_elsewhere": shared.fleet_devices_elsewhere.load(Ordering::Relaxed),
            "max_connections": shared.max_connections,
            "queue_bytes": cfg.limits.queue_bytes,
            "queue_hard_bytes": cfg.limits.queue_hard_bytes,
            "max_message_bytes": cfg.limits.max_message_bytes,
            "handshake_timeout_ms": cfg.limits.handshake_timeout_ms,
            "max_pending_requests": cfg.limits.max_pending_requests,
            "max_streams_per_device": cfg.limits.max_streams_per_device,
            "nofile": crate::ops::nofile_limit(),
        },
        "keepalive": { "ping_interval_ms": cfg.keepalive.ping_interval_ms },
        "grace": {
            "grace_secs": cfg.managers.grace_secs,
            "without_manager_secs": shared.without_manager_for(now).map(|d| d.as_secs()),
            "devices_refused": shared.devices_refused(now),
        },
        "certificates": certificates,
        "store": store_status(shared),
        "trust_bundle": shared.trust_bundle.load().is_some(),
        "root_exchange": root_exchange_status(shared),
        "revoked_units": shared.revoked.len(),
        "watchdog": crate::ops::watchdog::status(shared, now),
        "latency": {
            "device_response": HistogramSnapshot::collect(shared, |l| &l.device_response).status(),
            "handshake": HistogramSnapshot::collect(shared, |l| &l.handshake).status(),
        },
        "log_messages_suppressed": crate::ops::ratelimit::suppressed_total(),
        "counters": snapshot(shared),
    })
}

/// How far a root exchange has got, `null` when no trust bundle is loaded. The counts come
/// from the store (refreshed once a second), so they include devices that are offline now.
fn root_exchange_status(shared: &Daemon) -> serde_json::Value {
    let Some(bundle) = shared.trust_bundle.load_full() else {
        return serde_json::Value::Null;
    };
    let progress = shared
        .trust_progress
        .load_full()
        .filter(|p| p.bundle == *bundle.id);
    match progress {
        Some(p) => serde_json::json!({
            "bundle": bundle.id,
            "devices_acked": p.devices_acked,
            "devices_total": p.devices_total,
            "managers_acked": p.managers_acked,
        }),
        None => serde_json::json!({
            "bundle": bundle.id,
            "devices_acked": null,
            "devices_total": null,
            "managers_acked": [],
        }),
    }
}

/// Writes Prometheus text exposition format 0.0.4: one `# HELP`/`# TYPE` pair per family
/// followed by its samples. Names follow the Prometheus conventions that
/// `promtool check metrics` lints: base units (seconds, bytes), `_total` on counters only,
/// snake_case, labels instead of name variants.
struct Exposition {
    out: String,
}

impl Exposition {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(
            self.out,
            "# HELP devgate_{name} {help}\n# TYPE devgate_{name} {kind}"
        );
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        let _ = write!(self.out, "devgate_{name}");
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{k}=\"{}\"", escape_label(v));
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
    }

    fn single(&mut self, name: &str, kind: &str, help: &str, value: impl std::fmt::Display) {
        self.family(name, kind, help);
        self.sample(name, &[], value);
    }

    fn histogram(&mut self, name: &str, help: &str, h: &HistogramSnapshot) {
        self.family(name, "histogram", help);
        let mut cumulative = 0;
        for (i, n) in h.buckets.iter().enumerate() {
            cumulative += n;
            let le = LATENCY_BOUNDS_US
                .get(i)
                .map_or_else(|| "+Inf".to_owned(), |us| seconds(*us));
            let _ = writeln!(
                self.out,
                "devgate_{name}_bucket{{le=\"{le}\"}} {cumulative}"
            );
        }
        let _ = writeln!(self.out, "devgate_{name}_sum {}", seconds(h.sum_us));
        let _ = writeln!(self.out, "devgate_{name}_count {}", h.count());
    }
}

/// µs as decimal seconds without float rounding noise (`250` → `0.00025`).
fn seconds(us: u64) -> String {
    let whole = us / 1_000_000;
    let frac = us % 1_000_000;
    if frac == 0 {
        return whole.to_string();
    }
    let digits = format!("{frac:06}");
    format!("{whole}.{}", digits.trim_end_matches('0'))
}

/// Label values escape backslash, double quote and newline.
fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Counters that `metrics_text` exports under a family of their own; every other
/// counter of [`StatsSnapshot`] is exported generically as `devgate_<name>_total`, so
/// that counters added later show up without touching this file.
const MAPPED_COUNTERS: &[&str] = &[
    "accepted",
    "refused_max_connections",
    "refused_by_guard",
    "handshakes_ok",
    "handshakes_failed_tls",
    "handshakes_failed_timeout",
    "http_refused",
    "device_sessions",
    "manager_sessions",
    "rejected_device_limit",
    "rejected_no_manager",
    "frames_from_devices",
    "frames_from_managers",
    "frames_to_devices",
    "frames_to_managers",
    "bytes_in",
    "bytes_out",
];

/// The `/metrics` page in Prometheus text format.
pub fn metrics_text(shared: &Daemon) -> String {
    let now = Instant::now();
    let c = snapshot(shared);
    let mut m = Exposition {
        out: String::with_capacity(8192),
    };

    m.family(
        "build_info",
        "gauge",
        "Version, instance id and data-path modes of this gateway (always 1).",
    );
    m.sample(
        "build_info",
        &[
            ("version", env!("CARGO_PKG_VERSION")),
            ("instance", &shared.instance_id),
            ("data_path", shared.data_path.name),
            ("tls_offload", shared.tls_offload.mode),
        ],
        1,
    );
    let uptime = shared.started.elapsed();
    m.single(
        "start_time_seconds",
        "gauge",
        "Start time of the process since the Unix epoch in seconds.",
        crate::tls::unix_now().saturating_sub(i64::try_from(uptime.as_secs()).unwrap_or(0)),
    );
    m.single(
        "uptime_seconds",
        "gauge",
        "Seconds since start.",
        uptime.as_secs(),
    );
    let check = shared.check_status(now).as_str();
    m.family(
        "check_status",
        "gauge",
        "The public check-status answer: 1 for the current one of init, ok, warn, err.",
    );
    for s in ["init", "ok", "warn", "err"] {
        m.sample("check_status", &[("status", s)], u8::from(s == check));
    }

    m.family("connections", "gauge", "Open WebSocket sessions by role.");
    m.sample(
        "connections",
        &[("role", "device")],
        shared.device_count.load(Ordering::Relaxed),
    );
    m.sample(
        "connections",
        &[("role", "manager")],
        shared.manager_count(),
    );
    m.single(
        "open_sockets",
        "gauge",
        "Open TCP connections of any kind, handshakes included.",
        shared.connection_count.load(Ordering::Relaxed),
    );
    m.single(
        "max_connections",
        "gauge",
        "Limit on open TCP connections (derived from RLIMIT_NOFILE unless configured).",
        shared.max_connections,
    );
    m.single(
        "device_limit",
        "gauge",
        "Current device limit (0 = unlimited).",
        shared.device_limit.load(Ordering::Relaxed),
    );
    m.single(
        "workers",
        "gauge",
        "Data-path worker threads that route sessions.",
        shared.routing_workers,
    );
    m.single(
        "memory_trims_total",
        "counter",
        "Times freed memory was returned to the OS after a large drop in connections.",
        shared.memory_trims.load(Ordering::Relaxed),
    );
    m.single(
        "handshake_workers",
        "gauge",
        "Worker threads that run TLS handshakes and HTTP requests at a lower priority (0 = the routing workers do).",
        shared.worker_count() - shared.routing_workers,
    );
    m.single(
        "manager_absent_seconds",
        "gauge",
        "Seconds without any manager connected (0 while one is).",
        shared.without_manager_for(now).map_or(0, |d| d.as_secs()),
    );

    m.family(
        "certificate_expiry_timestamp_seconds",
        "gauge",
        "Expiry (notAfter) of the gateway's certificates since the Unix epoch in seconds.",
    );
    let tls = shared.tls.load();
    for (role, cert) in &tls.certificates {
        m.sample(
            "certificate_expiry_timestamp_seconds",
            &[("role", role), ("subject", &cert.subject)],
            cert.not_after_unix,
        );
    }

    m.single(
        "connections_accepted_total",
        "counter",
        "TCP connections accepted.",
        c.accepted,
    );
    m.family(
        "rejections_total",
        "counter",
        "Connections or upgrades refused, by reason.",
    );
    for (reason, v) in [
        ("max_connections", c.refused_max_connections),
        ("guard", c.refused_by_guard),
        ("device_limit", c.rejected_device_limit),
        ("no_manager", c.rejected_no_manager),
        ("http", c.http_refused),
    ] {
        m.sample("rejections_total", &[("reason", reason)], v);
    }
    m.family(
        "handshakes_total",
        "counter",
        "TLS handshakes (plus HTTP request head) by result.",
    );
    for (result, v) in [
        ("ok", c.handshakes_ok),
        ("tls_error", c.handshakes_failed_tls),
        ("timeout", c.handshakes_failed_timeout),
    ] {
        m.sample("handshakes_total", &[("result", result)], v);
    }
    m.family(
        "sessions_total",
        "counter",
        "WebSocket sessions established, by role.",
    );
    m.sample("sessions_total", &[("role", "device")], c.device_sessions);
    m.sample("sessions_total", &[("role", "manager")], c.manager_sessions);
    m.family(
        "frames_total",
        "counter",
        "Devgate frames by direction (in = received from, out = queued to) and peer role.",
    );
    for (direction, role, v) in [
        ("in", "device", c.frames_from_devices),
        ("in", "manager", c.frames_from_managers),
        ("out", "device", c.frames_to_devices),
        ("out", "manager", c.frames_to_managers),
    ] {
        m.sample(
            "frames_total",
            &[("direction", direction), ("role", role)],
            v,
        );
    }
    m.family(
        "bytes_total",
        "counter",
        "WebSocket plaintext bytes by direction.",
    );
    m.sample("bytes_total", &[("direction", "in")], c.bytes_in);
    m.sample("bytes_total", &[("direction", "out")], c.bytes_out);

    for (name, value) in c.fields() {
        if MAPPED_COUNTERS.contains(&name) {
            continue;
        }
        let help = counter_help(name);
        m.single(&format!("{name}_total"), "counter", help, value);
    }

    m.single(
        "log_messages_suppressed_total",
        "counter",
        "Repetitive warnings not logged because of the per-call-site rate limit.",
        crate::ops::ratelimit::suppressed_total(),
    );
    m.single(
        "watchdog_heartbeat_age_seconds",
        "gauge",
        "Age of the oldest data-path worker loop heartbeat.",
        seconds(u64::try_from(shared.oldest_heartbeat_age(now).as_micros()).unwrap_or(u64::MAX)),
    );

    m.histogram(
        "device_response_duration_seconds",
        "Time from forwarding a command to a device until its response arrives.",
        &HistogramSnapshot::collect(shared, |l| &l.device_response),
    );
    m.histogram(
        "handshake_duration_seconds",
        "Time from TCP accept until the WebSocket upgrade (TLS handshake and HTTP head).",
        &HistogramSnapshot::collect(shared, |l| &l.handshake),
    );

    // The guard (XDP or user space) appends its own families, e.g. drops by reason.
    shared.guard.metrics(&mut m.out);
    m.out
}

/// HELP text of the generically exported counters.
fn counter_help(name: &str) -> &'static str {
    match name {
        "check_status_requests" => "Public /usg/check-status requests answered.",
        "refused_proxy_header" => {
            "Connections from a proxy_protocol_from network without a valid PROXY header."
        }
        "replaced" => "Device connections replaced by a newer one with the same unit ID.",
        "dead_peers" => "Peers declared dead after missing keep-alives.",
        "queue_full" => {
            "Frames refused because the receiver's queue was full (the sender got queue_full)."
        }
        "slow_consumers" => "Connections closed because their queue passed the hard limit.",
        "error_frames" => "Error frames sent to peers.",
        "protocol_errors" => "Peers closed for WebSocket or devgate protocol violations.",
        "inbox_full" => "Messages that could not be handed to another worker (inbox full).",
        "messages_local" => "Routed messages that stayed on their worker.",
        "messages_cross_worker" => "Routed messages handed to another worker (a cross-core hop).",
        "responses_routed" => "Command responses routed back to the asking manager.",
        "request_timeouts" => "Commands failed by the request timeout.",
        "handshakes_resumed" => {
            "TLS handshakes that resumed a session from a ticket (ticket keys persist in the data dir)."
        }
        "handed_over" => "Connections a handshake worker handed to a data-path worker as sessions.",
        _ => "Gateway counter (see docs/OPERATIONS.md).",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_render_without_float_noise() {
        assert_eq!(seconds(50), "0.00005");
        assert_eq!(seconds(250), "0.00025");
        assert_eq!(seconds(1_000_000), "1");
        assert_eq!(seconds(2_500_000), "2.5");
        assert_eq!(seconds(0), "0");
    }

    #[test]
    fn labels_are_escaped() {
        assert_eq!(escape_label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }

    #[test]
    fn quantile_bounds_come_from_buckets() {
        let mut h = HistogramSnapshot::default();
        h.buckets[0] = 90; // ≤ 50 µs
        h.buckets[4] = 9; // ≤ 1 ms
        h.buckets[LATENCY_BOUNDS_US.len()] = 1; // +Inf
        assert_eq!(h.count(), 100);
        assert_eq!(h.quantile_bound_us(0.5), Some(50));
        assert_eq!(h.quantile_bound_us(0.99), Some(1_000));
        assert_eq!(h.quantile_bound_us(1.0), None);
    }
}
