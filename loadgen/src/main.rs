//! `devgate-loadgen`: simulated devices and managers against a real gateway.
//!
//! Scenarios (this version): `connect` ramps to N device sessions and reports the rate,
//! the time and the gateway's memory per session; `steady` adds managers that send
//! commands to random devices, which answer them, and reports routed frames per second
//! and round-trip latency percentiles from an HDR histogram.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Parser, ValueEnum};
use devgate_client::{Body, ConnectOptions, Connection, Frame, Incoming, Role, tls_config};
use devgate_pki::{ClientCa, PkiPaths};
use hdrhistogram::Histogram;
use rand::Rng;
use serde::Serialize;
use tokio::sync::Semaphore;

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Scenario {
    /// Ramp to N device sessions; report connect rate and gateway RSS per session.
    Connect,
    /// Devices plus managers exchanging commands and responses.
    Steady,
    /// N devices enroll with a first-authentication key (`--key`); reports enrollments/s.
    Enroll,
}

#[derive(Parser, Debug)]
#[command(
    name = "devgate-loadgen",
    version,
    about = "Load generator for devgate"
)]
struct Args {
    /// Scenario to run.
    scenario: Scenario,
    /// Gateway address (host:port).
    #[arg(long)]
    gateway: SocketAddr,
    /// A gateway data dir from `devgate init` (root CA, manager credentials, device CA).
    #[arg(long)]
    data_dir: PathBuf,
    /// Name to verify the gateway's certificate against.
    #[arg(long, default_value = "localhost")]
    server_name: String,
    /// Simulated devices.
    #[arg(long, default_value_t = 1000)]
    devices: usize,
    /// Simulated managers (steady).
    #[arg(long, default_value_t = 1)]
    managers: usize,
    /// Seconds of measured traffic (steady) or of holding the sessions (connect).
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Commands per second over all managers; 0 = closed loop with `--window` outstanding.
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Commands outstanding per manager in closed-loop mode.
    #[arg(long, default_value_t = 64)]
    window: usize,
    /// Command payload bytes.
    #[arg(long, default_value_t = 64)]
    payload: usize,
    /// Handshakes in flight while connecting.
    #[arg(long, default_value_t = 128)]
    concurrency: usize,
    /// Spread device connections over 127.0.0.1 … 127.0.0.K as source addresses.
    #[arg(long, default_value_t = 1)]
    sources: u8,
    /// PID of a local gateway, to read its RSS from /proc.
    #[arg(long)]
    gateway_pid: Option<u32>,
    /// Write every figure as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// First-authentication key for `enroll` (a multi-use key: `devgate keys create --multi`).
    #[arg(long)]
    key: Option<String>,
}

#[derive(Debug, Default, Serialize)]
struct Report {
    scenario: String,
    sessions: usize,
    devices: usize,
    managers: usize,
    errors: u64,
    errors_by_kind: BTreeMap<String, u64>,
    connect_secs: f64,
    connects_per_sec: f64,
    commands: u64,
    responses: u64,
    frames_per_sec: f64,
    commands_per_sec: f64,
    rtt_p50_us: u64,
    rtt_p90_us: u64,
    rtt_p99_us: u64,
    rtt_p999_us: u64,
    rtt_max_us: u64,
    enrollments_per_sec: f64,
    gateway_rss_before_kib: Option<u64>,
    gateway_rss_after_kib: Option<u64>,
    gateway_rss_per_session_bytes: Option<f64>,
}

#[derive(Default)]
struct Errors(Mutex<BTreeMap<String, u64>>);

impl Errors {
    fn add(&self, kind: &str) {
        if let Ok(mut m) = self.0.lock() {
            *m.entry(kind.to_owned()).or_default() += 1;
        }
    }
    fn snapshot(&self) -> BTreeMap<String, u64> {
        self.0.lock().map(|m| m.clone()).unwrap_or_default()
    }
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn main() -> Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let report = rt.block_on(run(&args))?;
    print_summary(&report);
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    // Sessions are dropped with the runtime; don't wait for orderly closes.
    rt.shutdown_timeout(Duration::from_secs(1));
    Ok(())
}

fn print_summary(r: &Report) {
    println!("scenario            {}", r.scenario);
    println!(
        "sessions            {} devices + {} managers",
        r.sessions, r.managers
    );
    println!(
        "connect             {:.2} s ({:.0}/s)",
        r.connect_secs, r.connects_per_sec
    );
    if r.scenario == "enroll" {
        println!(
            "enrollments         {} in {:.2} s ({:.0}/s)",
            r.sessions, r.connect_secs, r.enrollments_per_sec
        );
        println!(
            "enrollment latency  p50 {} µs  p99 {} µs",
            r.rtt_p50_us, r.rtt_p99_us
        );
    }
    if r.scenario == "steady" {
        println!("commands answered   {} of {}", r.responses, r.commands);
        println!("frames routed/s     {:.0}", r.frames_per_sec);
        println!(
            "round trip          p50 {} µs  p90 {} µs  p99 {} µs  p99.9 {} µs  max {} µs",
            r.rtt_p50_us, r.rtt_p90_us, r.rtt_p99_us, r.rtt_p999_us, r.rtt_max_us
        );
    }
    if let (Some(b), Some(a)) = (r.gateway_rss_before_kib, r.gateway_rss_after_kib) {
        println!(
            "gateway RSS         {b} KiB → {a} KiB ({:.0} bytes per session)",
            r.gateway_rss_per_session_bytes.unwrap_or(0.0)
        );
    }
    println!("errors              {} {:?}", r.errors, r.errors_by_kind);
}

struct Fleet {
    tls_roots: Vec<rustls_pki_types::CertificateDer<'static>>,
    device_ca: Arc<ClientCa>,
}

fn load_fleet(data_dir: &Path) -> Result<Fleet> {
    let paths = PkiPaths::new(data_dir);
    Ok(Fleet {
        tls_roots: devgate_pki::load_certs(&paths.root_cert())?,
        device_ca: Arc::new(
            ClientCa::load(&paths.device_ca_cert(), &paths.device_ca_key())
                .context("loading the device CA (is --data-dir a gateway data dir?)")?,
        ),
    })
}

/// Issues device credentials on all cores (ECDSA signing dominates).
fn issue_devices(fleet: &Fleet, n: usize) -> Result<Vec<Arc<rustls::ClientConfig>>> {
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let chunk = n.div_ceil(threads).max(1);
    let results: Vec<Result<Vec<Arc<rustls::ClientConfig>>>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..n)
            .step_by(chunk)
            .map(|start| {
                let end = (start + chunk).min(n);
                s.spawn(move || {
                    (start..end)
                        .map(|i| {
                            let issued = fleet.device_ca.issue_device(&unit_name(i))?;
                            Ok(tls_config(
                                &fleet.tls_roots,
                                Some((issued.chain, issued.key)),
                            )?)
                        })
                        .collect()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("issuer thread panicked")))
            })
            .collect()
    });
    let mut all = Vec::with_capacity(n);
    for r in results {
        all.extend(r?);
    }
    Ok(all)
}

fn unit_name(i: usize) -> String {
    format!("lg-{i:06}")
}

fn source(args: &Args, i: usize) -> Option<IpAddr> {
    if args.sources <= 1 {
        return None;
    }
    let k = u8::try_from(i % usize::from(args.sources)).unwrap_or(0) + 1;
    Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, k)))
}

async fn run(args: &Args) -> Result<Report> {
    if !args.duration.is_finite() || args.duration <= 0.0 {
        bail!("--duration must be a positive number of seconds");
    }
    if args.scenario == Scenario::Enroll {
        return enroll_scenario(args).await;
    }
    let fleet = load_fleet(&args.data_dir)?;
    let errors = Arc::new(Errors::default());
    let device_tls = issue_devices(&fleet, args.devices)?;
    let paths = PkiPaths::new(&args.data_dir);
    let manager_tls = tls_config(
        &fleet.tls_roots,
        Some((
            devgate_pki::load_certs(&paths.manager_cert())?,
            devgate_pki::load_key(&paths.manager_key())?,
        )),
    )?;

    let mut report = Report {
        scenario: format!("{:?}", args.scenario).to_lowercase(),
        devices: args.devices,
        managers: if args.scenario == Scenario::Steady {
            args.managers
        } else {
            0
        },
        ..Report::default()
    };

    // Managers first, so that the no-manager grace period never refuses the fleet.
    let mut managers = Vec::new();
    if args.scenario == Scenario::Steady {
        for _ in 0..args.managers {
            let opts = ConnectOptions::new(args.gateway, &args.server_name, Role::Manager);
            managers.push(devgate_client::connect(&opts, manager_tls.clone()).await?);
        }
    }

    report.gateway_rss_before_kib = args.gateway_pid.and_then(rss_kib);
    let started = Instant::now();
    let gate = Arc::new(Semaphore::new(args.concurrency.max(1)));
    let connected = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::with_capacity(args.devices);
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<bool>(args.devices.max(1));
    for (i, tls) in device_tls.into_iter().enumerate() {
        let mut opts = ConnectOptions::new(args.gateway, &args.server_name, Role::Device);
        opts.bind = source(args, i);
        let (gate, errors, connected, ready) = (
            gate.clone(),
            errors.clone(),
            connected.clone(),
            ready_tx.clone(),
        );
        let payload_echo = args.scenario == Scenario::Steady;
        tasks.push(tokio::spawn(async move {
            let conn = {
                let Ok(_permit) = gate.acquire().await else {
                    return;
                };
                match devgate_client::connect(&opts, tls).await {
                    Ok(c) => c,
                    Err(e) => {
                        errors.add(&format!("connect: {}", error_kind(&e.to_string())));
                        let _ = ready.send(false).await;
                        return;
                    }
                }
            };
            connected.fetch_add(1, Ordering::Relaxed);
            let _ = ready.send(true).await;
            drop(ready);
            device_loop(conn, payload_echo, errors).await;
        }));
    }
    drop(ready_tx);
    let mut ok = 0;
    for _ in 0..args.devices {
        match ready_rx.recv().await {
            Some(true) => ok += 1,
            Some(false) => {}
            None => break,
        }
    }
    report.connect_secs = started.elapsed().as_secs_f64();
    report.sessions = ok;
    report.connects_per_sec = ok as f64 / report.connect_secs.max(1e-9);

    match args.scenario {
        Scenario::Connect | Scenario::Enroll => {
            // Let the gateway settle (handshake buffers freed), then read its memory.
            tokio::time::sleep(Duration::from_secs_f64(args.duration.clamp(1.0, 5.0))).await;
            report.gateway_rss_after_kib = args.gateway_pid.and_then(rss_kib);
        }
        Scenario::Steady => {
            report.gateway_rss_after_kib = args.gateway_pid.and_then(rss_kib);
            steady(args, managers, &errors, &mut report).await?;
        }
    }
    if let (Some(b), Some(a)) = (report.gateway_rss_before_kib, report.gateway_rss_after_kib)
        && report.sessions > 0
    {
        report.gateway_rss_per_session_bytes =
            Some((a.saturating_sub(b) * 1024) as f64 / report.sessions as f64);
    }
    report.errors_by_kind = errors.snapshot();
    report.errors = report.errors_by_kind.values().sum();
    for t in tasks {
        t.abort();
    }
    Ok(report)
}

fn error_kind(msg: &str) -> String {
    msg.split(':')
        .next()
        .unwrap_or(msg)
        .chars()
        .take(60)
        .collect()
}

/// A device: answers every command with its payload; pings are answered inside `recv`.
async fn device_loop(mut conn: Connection, echo: bool, errors: Arc<Errors>) {
    loop {
        let r = match conn.recv().await {
            Ok(Incoming::Frame(r)) => r,
            Ok(Incoming::Closed { code, .. }) => {
                errors.add(&format!("device closed by gateway ({code:?})"));
                return;
            }
            Err(e) => {
                errors.add(&format!("device: {}", error_kind(&e.to_string())));
                return;
            }
        };
        let f = r.frame();
        if let (true, Body::Command { payload }) = (echo, f.body)
            && let Err(e) = conn.send(&Frame::response("", f.id, payload)).await
        {
            errors.add(&format!("device send: {}", error_kind(&e.to_string())));
            return;
        }
    }
}

/// Send times of outstanding commands, indexed by request id modulo the table size.
struct InFlight {
    sent: Vec<AtomicU64>,
    epoch: Instant,
}

impl InFlight {
    fn new(size: usize) -> Self {
        Self {
            sent: (0..size).map(|_| AtomicU64::new(0)).collect(),
            epoch: Instant::now(),
        }
    }
    fn mark(&self, id: u32) {
        let ns = u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.sent[id as usize % self.sent.len()].store(ns, Ordering::Relaxed);
    }
    fn rtt_us(&self, id: u32) -> u64 {
        let sent = self.sent[id as usize % self.sent.len()].load(Ordering::Relaxed);
        let now = u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
        now.saturating_sub(sent) / 1000
    }
}

async fn steady(
    args: &Args,
    managers: Vec<Connection>,
    errors: &Arc<Errors>,
    report: &mut Report,
) -> Result<()> {
    if managers.is_empty() || report.sessions == 0 {
        bail!("steady needs at least one manager and one connected device");
    }
    let duration = Duration::from_secs_f64(args.duration);
    let warmup = Duration::from_secs(1);
    let commands = Arc::new(AtomicU64::new(0));
    let responses = Arc::new(AtomicU64::new(0));
    let hist = Arc::new(Mutex::new(Histogram::<u64>::new_with_bounds(
        1, 60_000_000, 3,
    )?));
    let per_manager_rate = args.rate as f64 / managers.len() as f64;
    let mut joins = Vec::new();
    let start = Instant::now();
    let measure_from = start + warmup;
    let stop_at = measure_from + duration;
    for m in managers {
        let (tx, mut rx) = m.split();
        let inflight = Arc::new(InFlight::new(1 << 16));
        let window = Arc::new(Semaphore::new(args.window.max(1)));
        let (commands, responses, hist, errors) = (
            commands.clone(),
            responses.clone(),
            hist.clone(),
            errors.clone(),
        );
        let reader = {
            let (inflight, window, responses, errors) = (
                inflight.clone(),
                window.clone(),
                responses.clone(),
                errors.clone(),
            );
            tokio::spawn(async move {
                let mut local = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).ok();
                // Responses still in flight at the end get a short grace, then we stop.
                let give_up = stop_at + Duration::from_millis(500);
                loop {
                    let wait = give_up.saturating_duration_since(Instant::now());
                    if wait.is_zero() {
                        break;
                    }
                    let r = match rx.recv_timeout(wait).await {
                        Ok(Some(Incoming::Frame(r))) => r,
                        Ok(Some(Incoming::Closed { .. })) | Err(_) | Ok(None) => break,
                    };
                    let f = r.frame();
                    match f.body {
                        Body::Response { .. } => {
                            window.add_permits(1);
                            if Instant::now() >= measure_from && Instant::now() < stop_at {
                                responses.fetch_add(1, Ordering::Relaxed);
                                if let Some(h) = local.as_mut() {
                                    let _ = h.record(inflight.rtt_us(f.id).max(1));
                                }
                            }
                        }
                        Body::Error { code, .. } => {
                            window.add_permits(1);
                            errors.add(&format!("error frame: {}", code.as_str()));
                        }
                        _ => {}
                    }
                }
                if let (Some(l), Ok(mut h)) = (local, hist.lock()) {
                    let _ = h.add(&l);
                }
            })
        };
        let devices = report.sessions.max(args.devices);
        let payload = vec![0x5au8; args.payload];
        let rate = per_manager_rate;
        let writer = tokio::spawn(async move {
            let mut id: u32 = 0;
            let units: Vec<String> = (0..devices).map(unit_name).collect();
            let mut tick = tokio::time::interval(Duration::from_millis(1));
            let mut owed = 0.0f64;
            while Instant::now() < stop_at {
                let batch = if rate > 0.0 {
                    tick.tick().await;
                    owed += rate / 1000.0;
                    let n = owed.floor();
                    owed -= n;
                    n as usize
                } else {
                    match window.clone().acquire_many_owned(1).await {
                        Ok(p) => p.forget(),
                        Err(_) => break,
                    }
                    1 + (0..16)
                        .take_while(|_| window.try_acquire().map(|p| p.forget()).is_ok())
                        .count()
                };
                if batch == 0 {
                    continue;
                }
                let targets: Vec<usize> = {
                    let mut rng = rand::rng();
                    (0..batch)
                        .map(|_| rng.random_range(0..units.len()))
                        .collect()
                };
                let ids: Vec<u32> = (0..batch)
                    .map(|_| {
                        id = id.wrapping_add(1);
                        id
                    })
                    .collect();
                let frames: Vec<Frame<'_>> = targets
                    .iter()
                    .zip(&ids)
                    .map(|(t, id)| Frame::command(&units[*t], *id, &payload))
                    .collect();
                for id in &ids {
                    inflight.mark(*id);
                }
                if tx.send_batch(&frames).await.is_err() {
                    errors.add("manager send failed");
                    break;
                }
                if Instant::now() >= measure_from {
                    commands.fetch_add(batch as u64, Ordering::Relaxed);
                }
            }
        });
        joins.push((writer, reader));
    }
    for (w, r) in joins {
        let _ = w.await;
        let _ = r.await;
    }
    let secs = duration.as_secs_f64();
    report.commands = commands.load(Ordering::Relaxed);
    report.responses = responses.load(Ordering::Relaxed);
    // Each answered command is two routed frames: the command and its response.
    report.frames_per_sec = 2.0 * report.responses as f64 / secs;
    report.commands_per_sec = report.responses as f64 / secs;
    if let Ok(h) = hist.lock() {
        report.rtt_p50_us = h.value_at_quantile(0.50);
        report.rtt_p90_us = h.value_at_quantile(0.90);
        report.rtt_p99_us = h.value_at_quantile(0.99);
        report.rtt_p999_us = h.value_at_quantile(0.999);
        report.rtt_max_us = h.max();
    }
    Ok(())
}

/// Enrolls `--devices` devices with `--key`, `--concurrency` at a time.
async fn enroll_scenario(args: &Args) -> Result<Report> {
    let key = args
        .key
        .clone()
        .context("enroll needs --key (a multi-use key)")?;
    let roots = devgate_pki::load_certs(&PkiPaths::new(&args.data_dir).root_cert())?;
    let errors = Arc::new(Errors::default());
    let hist = Arc::new(Mutex::new(Histogram::<u64>::new_with_bounds(
        1, 60_000_000, 3,
    )?));
    let gate = Arc::new(Semaphore::new(args.concurrency.max(1)));
    let ok = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(args.devices);
    for i in 0..args.devices {
        let (gate, errors, hist, ok, roots, key) = (
            gate.clone(),
            errors.clone(),
            hist.clone(),
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
                    if let Ok(mut h) = hist.lock() {
                        let _ = h.record(
                            u64::try_from(t.elapsed().as_micros())
                                .unwrap_or(u64::MAX)
                                .max(1),
                        );
                    }
                }
                Err(e) => errors.add(&format!("enroll: {}", error_kind(&e.to_string()))),
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let secs = started.elapsed().as_secs_f64();
    let mut report = Report {
        scenario: "enroll".into(),
        devices: args.devices,
        sessions: usize::try_from(ok.load(Ordering::Relaxed)).unwrap_or(usize::MAX),
        connect_secs: secs,
        ..Report::default()
    };
    report.enrollments_per_sec = report.sessions as f64 / secs.max(1e-9);
    report.connects_per_sec = report.enrollments_per_sec;
    if let Ok(h) = hist.lock() {
        report.rtt_p50_us = h.value_at_quantile(0.50);
        report.rtt_p90_us = h.value_at_quantile(0.90);
        report.rtt_p99_us = h.value_at_quantile(0.99);
        report.rtt_p999_us = h.value_at_quantile(0.999);
        report.rtt_max_us = h.max();
    }
    report.errors_by_kind = errors.snapshot();
    report.errors = report.errors_by_kind.values().sum();
    Ok(report)
}
