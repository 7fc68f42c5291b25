//! `enroll`: `--devices` devices trade a first-authentication key (`--key`) for
//! a certificate, `--concurrency` at a time; enrollments/s and latency.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use anyhow::{Context, Result};
use devgate_pki::PkiPaths;
use tokio::sync::Semaphore;

use crate::args::Args;
use crate::device::error_kind;
use crate::report::{Report, Stats, secs_since};

/// Enrolls `--devices` devices with `--key`.
pub(crate) async fn run(args: &Args) -> Result<Report> {
    let key = args.key.clone().context("enroll needs --key (a multi-use key)")?;
    let roots = devgate_pki::load_certs(&PkiPaths::new(&args.data_dir).root_cert())
        .context("reading the root certificate of --data-dir")?;
    let stats = Arc::new(Stats::new());
    let gate = Arc::new(Semaphore::new(args.concurrency.max(1)));
    let ok = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(args.devices);
    for i in 0..args.devices {
        let (gate, stats, ok, roots, key) = (
            gate.clone(),
            stats.clone(),
            ok.clone(),
            roots.clone(),
            key.clone(),
        );
        let (addr, name) = (args.gateway, args.server_name.clone());
        tasks.push(tokio::spawn(async move {
            let Ok(_permit) = gate.acquire().await else {
                return;
            };
            let t = Instant::now();
            match devgate_client::enroll(addr, &name, &roots, &format!("enr-{i:06}"), &key).await {
                Ok(_) => {
                    ok.fetch_add(1, Ordering::Relaxed);
                    stats.record_connect(t.elapsed());
                }
                Err(e) => stats.error(&format!("enroll: {}", error_kind(&e.to_string()))),
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let secs = secs_since(started);
    let mut report = Report {
        scenario: "enroll".into(),
        devices: args.devices,
        processes: 1,
        sources: 1,
        sessions: usize::try_from(ok.load(Ordering::Relaxed)).unwrap_or(usize::MAX),
        connect_secs: secs,
        ..Report::default()
    };
    report.enrollments_per_sec = report.sessions as f64 / secs.max(1e-9);
    report.connects_per_sec = report.enrollments_per_sec;
    if let Ok(g) = stats.connect_hist.lock()
        && let Some(h) = g.as_ref()
    {
        // The enrollment round trip is this scenario's latency.
        report.set_rtt(h);
        report.set_connect(h);
    }
    report.errors_by_kind = stats.errors_by_kind();
    report.finish_errors();
    Ok(report)
}
