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
use tracing::{debug, warn};

use crate::shared::Shared;
use crate::stats::StatsSnapshot;

/// Starts the admin thread (HTTP listener and signal handlers).
pub fn start(shared: Arc<Shared>, listener: std::net::TcpListener) -> Result<()> {
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
                loop {
                    match listener.accept().await {
                        Ok((stream, _)) => {
                            tokio::spawn(serve_one(shared.clone(), stream));
                        }
                        Err(e) => {
                            warn!("admin accept: {e}");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                }
            });
        })
        .context("starting the admin thread")?;
    Ok(())
}

async fn signals(shared: Arc<Shared>) {
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
            _ = hup.recv() => {
                // Reading certificates is quick file I/O; the data path is not involved.
                let shared = shared.clone();
                let _ = tokio::task::spawn_blocking(move || crate::reload::reload(&shared)).await;
            }
        }
    }
    crate::server::begin_shutdown(&shared);
}

async fn serve_one(shared: Arc<Shared>, mut stream: TcpStream) {
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
            Some("text/plain; version=0.0.4"),
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

fn snapshot(shared: &Shared) -> StatsSnapshot {
    let mut s = StatsSnapshot::default();
    for w in shared.stats.iter() {
        s.add(w);
    }
    s
}

/// The `/v1/status` document.
pub fn status_json(shared: &Shared) -> serde_json::Value {
    let now = Instant::now();
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
            })
        })
        .collect();
    let cfg = &shared.config;
    serde_json::json!({
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_secs": shared.started.elapsed().as_secs(),
        "check_status": shared.check_status(now).as_str(),
        "data_path": "epoll",
        "tls_offload": "user",
        "tls_offload_reason": "kernel TLS offload is not part of the epoll data path; records are sealed by rustls in user space",
        "xdp": shared.guard.status(),
        "workers": shared.worker_count(),
        "devices": shared.device_count.load(Ordering::Relaxed),
        "managers": shared.manager_count(),
        "connections": shared.connection_count.load(Ordering::Relaxed),
        "limits": {
            "device_limit": shared.device_limit.load(Ordering::Relaxed),
            "max_connections": shared.max_connections,
            "queue_bytes": cfg.limits.queue_bytes,
            "max_message_bytes": cfg.limits.max_message_bytes,
            "handshake_timeout_ms": cfg.limits.handshake_timeout_ms,
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
        "revoked_units": shared.revoked.len(),
        "counters": snapshot(shared),
    })
}

fn store_status(shared: &Shared) -> serde_json::Value {
    match shared.store.get() {
        None => serde_json::json!({ "backend": "sqlite", "healthy": false, "error": "not opened" }),
        Some(store) => match store.health() {
            Ok(()) => serde_json::json!({
                "backend": "sqlite",
                "path": crate::store::sqlite::SqliteStore::path_in(&shared.config.data_dir),
                "healthy": true,
            }),
            Err(e) => {
                serde_json::json!({ "backend": "sqlite", "healthy": false, "error": e.to_string() })
            }
        },
    }
}

/// The `/metrics` page in Prometheus text format.
pub fn metrics_text(shared: &Shared) -> String {
    let mut out = String::with_capacity(4096);
    let gauge = |out: &mut String, name: &str, help: &str, labels: &str, v: u64| {
        let _ = writeln!(
            out,
            "# HELP devgate_{name} {help}\n# TYPE devgate_{name} gauge\ndevgate_{name}{labels} {v}"
        );
    };
    let _ = writeln!(
        out,
        "# HELP devgate_connections Open sessions by role.\n# TYPE devgate_connections gauge"
    );
    let _ = writeln!(
        out,
        "devgate_connections{{role=\"device\"}} {}",
        shared.device_count.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        out,
        "devgate_connections{{role=\"manager\"}} {}",
        shared.manager_count()
    );
    gauge(
        &mut out,
        "open_sockets",
        "Open TCP connections of any kind, handshakes included.",
        "",
        shared.connection_count.load(Ordering::Relaxed) as u64,
    );
    gauge(
        &mut out,
        "device_limit",
        "Current device limit (0 = unlimited).",
        "",
        shared.device_limit.load(Ordering::Relaxed),
    );
    gauge(
        &mut out,
        "uptime_seconds",
        "Seconds since start.",
        "",
        shared.started.elapsed().as_secs(),
    );
    shared.guard.metrics(&mut out);
    for (name, value) in snapshot(shared).fields() {
        let _ = writeln!(
            out,
            "# HELP devgate_{name}_total Counter {name}.\n# TYPE devgate_{name}_total counter\ndevgate_{name}_total {value}"
        );
    }
    out
}
