//! Benchmarks: `cargo xtask bench-check` and `cargo xtask bench-report` (docs/BENCHMARKS.md).
//!
//! - **bench-check** counts the instructions of the hot-path workloads under callgrind
//!   (`devgate-bench icount`) and compares them with `bench/baseline/instructions.json`.
//!   More than [`TOLERANCE`] above the baseline fails: instruction counts do not move with
//!   the load of a shared machine, so a change that large is a change in the code (or in the
//!   toolchain, which is a reason to re-baseline with `--update-baseline`).
//! - **bench-report** builds release binaries, measures the micro-benchmarks and the raw
//!   rustls handshake rate, then drives three servers with the same `devgate-loadgen`
//!   scenarios in one run: devgate, `devgate-echo` (the no-relay floor: one TLS WebSocket
//!   hop), and nginx as a TLS WebSocket reverse proxy in front of `devgate-echo --plain`
//!   (what an operator would deploy instead). Every figure stands next to the baselines as a
//!   ratio. Output: `target/bench-report/report.md`, `report.json` and SVG plots.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use super::{Running, bin, cargo, run, wait_for_port};

/// A workload more than 3 % above its baseline instruction count fails `bench-check`.
pub(crate) const TOLERANCE: f64 = 0.03;
const BASELINE: &str = "bench/baseline/instructions.json";

const GW_LISTEN: &str = "127.0.0.1:18943";
const GW_ADMIN: &str = "127.0.0.1:18980";
const ECHO_LISTEN: &str = "127.0.0.1:18944";
const NGINX_LISTEN: &str = "127.0.0.1:18945";
const BACKEND_LISTEN: &str = "127.0.0.1:18946";

// ---------------------------------------------------------------- bench-check

pub(crate) fn check(args: &[String]) -> Result<()> {
    let mut update = false;
    for a in args {
        match a.as_str() {
            "--update-baseline" => update = true,
            other => bail!("unknown option {other} (bench-check [--update-baseline])"),
        }
    }
    run(cargo().args([
        "build",
        "--release",
        "-p",
        "bench",
        "--bin",
        "devgate-bench",
    ]))?;
    let out = PathBuf::from("target/bench-check");
    std::fs::create_dir_all(&out)?;
    let measured = icount(&out)?;
    if update {
        std::fs::write(BASELINE, serde_json::to_string_pretty(&measured)? + "\n")
            .with_context(|| format!("writing {BASELINE}"))?;
        println!("bench-check: baseline written to {BASELINE}");
        return Ok(());
    }
    let baseline: Value = serde_json::from_str(
        &std::fs::read_to_string(BASELINE)
            .with_context(|| format!("reading {BASELINE} (create it with --update-baseline)"))?,
    )
    .with_context(|| format!("parsing {BASELINE}"))?;
    let (table, regressions) = compare(&baseline, &measured);
    print!("{table}");
    std::fs::write(out.join("comparison.md"), &table)?;
    if !regressions.is_empty() {
        bail!(
            "instruction counts regressed beyond +{:.0} %: {} (if intended, run `cargo xtask bench-check --update-baseline` and commit {BASELINE})",
            TOLERANCE * 100.0,
            regressions.join(", ")
        );
    }
    println!(
        "bench-check: {} workloads within +{:.0} % of the baseline",
        measured.as_object().map_or(0, serde_json::Map::len),
        TOLERANCE * 100.0
    );
    Ok(())
}

/// Runs `devgate-bench icount` and returns its JSON.
fn icount(out: &Path) -> Result<Value> {
    let file = out.join("instructions.json");
    run(Command::new(bin("devgate-bench"))
        .args(["icount", "--json"])
        .arg(&file))?;
    Ok(serde_json::from_str(&std::fs::read_to_string(&file)?)?)
}

/// Markdown table of measured against baseline, and the workloads over tolerance.
fn compare(baseline: &Value, measured: &Value) -> (String, Vec<String>) {
    let mut md = String::from(
        "| workload | baseline instr/iter | measured | change |\n|---|---:|---:|---:|\n",
    );
    let mut regressions = Vec::new();
    if let Some(m) = measured.as_object() {
        for (name, v) in m {
            let now = v["instructions"].as_f64().unwrap_or(0.0);
            match baseline[name]["instructions"].as_f64() {
                Some(base) if base > 0.0 => {
                    let change = now / base - 1.0;
                    let flag = if change > TOLERANCE {
                        regressions.push(format!("{name} {:+.1} %", change * 100.0));
                        " ✗"
                    } else {
                        ""
                    };
                    let _ = writeln!(
                        md,
                        "| {name} | {base:.0} | {now:.0} | {:+.2} %{flag} |",
                        change * 100.0
                    );
                }
                _ => {
                    let _ = writeln!(md, "| {name} | — (new) | {now:.0} | — |");
                }
            }
        }
    }
    (md, regressions)
}

// ---------------------------------------------------------------- bench-report

#[derive(Clone, Copy)]
struct Sizes {
    /// Devices in the latency and throughput scenarios.
    fleet: usize,
    /// Seconds of measured traffic per scenario.
    secs: u64,
    /// Devices in the connect (sessions held) scenario.
    connect: usize,
    /// Devices in the storm scenario.
    storm: usize,
    /// Commands per second in the rate-limited scenario.
    rate: u64,
}

/// One server under test, running.
struct Target {
    name: &'static str,
    addr: &'static str,
    /// Processes whose RSS is the target's memory.
    pids: Vec<u32>,
    _procs: Vec<Running>,
}

pub(crate) fn report(args: &[String]) -> Result<()> {
    let mut quick = false;
    let mut icount_from: Option<PathBuf> = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--quick" => quick = true,
            // CI has just measured them in bench-check: don't spend another minute.
            "--icount-from" => icount_from = Some(it.next().context("--icount-from FILE")?.into()),
            // An earlier build of `devgate` measured in the same run (e.g. before a refactor).
            "--baseline-bin" => {
                let path: PathBuf = it.next().context("--baseline-bin PATH")?.into();
                if !path.is_file() {
                    bail!("--baseline-bin {}: no such file", path.display());
                }
                let _ = BASELINE_BIN.set(path);
            }
            other => bail!(
                "unknown option {other} (bench-report [--quick] [--icount-from FILE] [--baseline-bin PATH])"
            ),
        }
    }
    let sizes = if quick {
        Sizes {
            fleet: 200,
            secs: 3,
            connect: 1_000,
            storm: 1_000,
            rate: 1_000,
        }
    } else {
        Sizes {
            fleet: 1_000,
            secs: 10,
            connect: 10_000,
            storm: 10_000,
            rate: 2_000,
        }
    };
    let started = Instant::now();
    let (out, data) = super::release_with_data_dir("target/bench-report")?;
    let loadgen_help = Command::new(bin("devgate-loadgen"))
        .arg("--help")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let has = |s: &str| loadgen_help.contains(s);

    let mut report = json!({
        "mode": if quick { "quick" } else { "full" },
        "command": if quick { "cargo xtask bench-report --quick" } else { "cargo xtask bench-report" },
        "commit": git_head(),
        "date": utc_now(),
    });

    // Micro-benchmarks: instruction counts (both modes), criterion (full mode).
    report["icount"] = match &icount_from {
        Some(f) => serde_json::from_str(
            &std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?,
        )?,
        None => {
            eprintln!("== instruction counts (callgrind)");
            icount(&out)?
        }
    };
    if let Ok(base) = std::fs::read_to_string(BASELINE)
        && let Ok(base) = serde_json::from_str::<Value>(&base)
    {
        report["icount_baseline"] = base;
    }
    eprintln!("== raw rustls handshake rate (in process)");
    let hs_file = out.join("handshake-rate.json");
    run(Command::new(bin("devgate-bench"))
        .args([
            "handshake-rate",
            "--secs",
            if quick { "2" } else { "5" },
            "--json",
        ])
        .arg(&hs_file))?;
    report["rustls_handshake"] = serde_json::from_str(&std::fs::read_to_string(&hs_file)?)?;
    if !quick {
        eprintln!("== criterion micro-benchmarks");
        run(cargo().args([
            "bench", "-p", "bench", "--bench", "codec", "--bench", "tls", "--bench", "map", "--",
            "--quick", "--noplot",
        ]))?;
        report["criterion"] = criterion_estimates(Path::new("target/criterion"));
    }

    // Load: the same scenarios against each server.
    let mut scenarios: Vec<(&str, &str, Vec<String>)> = vec![
        (
            "latency_1",
            "steady",
            strings(&[
                "--devices",
                &sizes.fleet.to_string(),
                "--managers",
                "1",
                "--window",
                "1",
                "--duration",
                &sizes.secs.to_string(),
            ]),
        ),
        (
            "throughput",
            "steady",
            strings(&[
                "--devices",
                &sizes.fleet.to_string(),
                "--managers",
                "2",
                "--window",
                "64",
                "--duration",
                &sizes.secs.to_string(),
            ]),
        ),
        (
            "rate_limited",
            "steady",
            strings(&[
                "--devices",
                &sizes.fleet.to_string(),
                "--managers",
                "1",
                "--rate",
                &sizes.rate.to_string(),
                "--duration",
                &sizes.secs.to_string(),
            ]),
        ),
        (
            "connect",
            "connect",
            strings(&[
                "--devices",
                &sizes.connect.to_string(),
                "--concurrency",
                "128",
                "--sources",
                "4",
                "--duration",
                "2",
            ]),
        ),
    ];
    if has("storm") {
        scenarios.push((
            "storm",
            "storm",
            strings(&[
                "--devices",
                &sizes.storm.to_string(),
                "--drop",
                "--concurrency",
                "128",
                "--sources",
                "4",
            ]),
        ));
    }
    let stream = has("stream");

    let mut results: BTreeMap<String, BTreeMap<String, Value>> = BTreeMap::new();
    let mut ramps: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    let mut flows: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    let targets: &[&'static str] = if BASELINE_BIN.get().is_some() {
        &["devgate-before", "devgate", "echo", "nginx"]
    } else {
        &["devgate", "echo", "nginx"]
    };
    for &target in targets {
        if target == "nginx" && !nginx_available() {
            eprintln!(
                "== nginx: not installed (scripts/setup.sh installs nginx-light as root); skipped"
            );
            continue;
        }
        for (label, scenario, extra) in &scenarios {
            eprintln!("== {target}: {label}");
            let t = start_target(target, &data, &out, sizes)?;
            let sampler = Sampler::start(target, &t);
            let r = loadgen(&data, &out, &t, label, scenario, extra);
            let samples = sampler.finish();
            let mut v = match r {
                Ok(v) => v,
                Err(e) => json!({ "failed": format!("{e:#}") }),
            };
            if *label == "connect" {
                let before = samples.first().map_or(0.0, |s| s.rss_kib);
                let peak = samples.iter().map(|s| s.rss_kib).fold(0.0, f64::max);
                let sessions = v["sessions"].as_f64().unwrap_or(0.0);
                if sessions > 0.0 && peak > before {
                    v["rss_per_session_bytes"] = json!((peak - before) * 1024.0 / sessions);
                }
                if target == "devgate" {
                    ramps.insert(
                        "devgate (status)".into(),
                        samples
                            .iter()
                            .filter_map(|s| s.devices.map(|d| (s.t, d)))
                            .collect(),
                    );
                }
                if let Some(tl) = v["timeline"].as_array() {
                    ramps.insert(
                        target.into(),
                        tl.iter()
                            .filter_map(|p| Some((p["t"].as_f64()?, p["sessions"].as_f64()?)))
                            .collect(),
                    );
                }
            }
            if *label == "throughput" {
                if target == "devgate" {
                    let pts: Vec<(f64, f64)> = samples
                        .windows(2)
                        .filter_map(|w| {
                            let (a, b) = (w[0].frames?, w[1].frames?);
                            Some((w[1].t, (b - a) / (w[1].t - w[0].t).max(1e-3)))
                        })
                        .collect();
                    flows.insert("devgate (metrics)".into(), pts);
                }
                if let Some(tl) = v["timeline"].as_array() {
                    flows.insert(
                        target.into(),
                        tl.iter()
                            .filter_map(|p| Some((p["t"].as_f64()?, p["frames"].as_f64()?)))
                            .collect(),
                    );
                }
            }
            drop(t);
            // Let TIME_WAIT sockets and the kernel's memory settle between runs.
            std::thread::sleep(Duration::from_millis(if quick { 300 } else { 1500 }));
            results
                .entry(target.into())
                .or_default()
                .insert((*label).into(), v);
        }
        if stream && target == "devgate" {
            eprintln!("== devgate: stream");
            let t = start_target(target, &data, &out, sizes)?;
            let v = loadgen(
                &data,
                &out,
                &t,
                "stream",
                "stream",
                &strings(&[
                    "--devices",
                    "20",
                    "--streams",
                    "20",
                    "--managers",
                    "1",
                    "--duration",
                    &sizes.secs.to_string(),
                ]),
            )
            .unwrap_or_else(|e| json!({ "failed": format!("{e:#}") }));
            drop(t);
            results
                .entry(target.into())
                .or_default()
                .insert("stream".into(), v);
        }
    }
    report["load"] = serde_json::to_value(&results)?;
    report["elapsed_secs"] = json!(started.elapsed().as_secs_f64());

    let md = summarize(&report, sizes);
    std::fs::write(
        out.join("report.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    std::fs::write(out.join("report.md"), &md)?;
    plots(&out, &results, &ramps, &flows)?;
    println!("{md}");
    println!(
        "written: {0}/report.md, {0}/report.json, {0}/*.svg ({1:.0} s)",
        out.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn strings(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| (*s).to_owned()).collect()
}

fn git_head() -> String {
    Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

fn utc_now() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

fn nginx_available() -> bool {
    Command::new("nginx")
        .arg("-v")
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn spawn(cmd: &mut Command) -> Result<Running> {
    Ok(Running(
        cmd.stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting {cmd:?}"))?,
    ))
}

/// `--baseline-bin`: the earlier `devgate` build measured as target `devgate-before`.
static BASELINE_BIN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

fn start_target(name: &'static str, data: &Path, out: &Path, sizes: Sizes) -> Result<Target> {
    let limit = (sizes.connect.max(sizes.storm) + 1000).to_string();
    match name {
        "devgate" | "devgate-before" => {
            let exe = match (name, BASELINE_BIN.get()) {
                ("devgate-before", Some(path)) => path.clone(),
                _ => bin("devgate"),
            };
            let gw = spawn(
                Command::new(exe)
                    .args(["serve", "--data-dir"])
                    .arg(data)
                    .args(["--listen", GW_LISTEN, "--admin", GW_ADMIN])
                    .env("DEVGATE_LOG", "warn")
                    .env("DEVGATE_LIMITS__MAX_CONNECTIONS", &limit),
            )?;
            wait_for_port(GW_LISTEN, Duration::from_secs(10))?;
            Ok(Target {
                name,
                addr: GW_LISTEN,
                pids: vec![gw.0.id()],
                _procs: vec![gw],
            })
        }
        "echo" => {
            let echo = spawn(
                Command::new(bin("devgate-echo"))
                    .args(["--listen", ECHO_LISTEN, "--data-dir"])
                    .arg(data),
            )?;
            wait_for_port(ECHO_LISTEN, Duration::from_secs(10))?;
            Ok(Target {
                name,
                addr: ECHO_LISTEN,
                pids: vec![echo.0.id()],
                _procs: vec![echo],
            })
        }
        "nginx" => {
            let backend = spawn(Command::new(bin("devgate-echo")).args([
                "--listen",
                BACKEND_LISTEN,
                "--plain",
            ]))?;
            wait_for_port(BACKEND_LISTEN, Duration::from_secs(10))?;
            let conf = nginx_conf(data, out)?;
            let nginx = spawn(
                Command::new("nginx")
                    .args(["-e", "stderr", "-c"])
                    .arg(&conf),
            )?;
            wait_for_port(NGINX_LISTEN, Duration::from_secs(10))?;
            let mut pids = vec![backend.0.id(), nginx.0.id()];
            pids.extend(children_of(nginx.0.id()));
            Ok(Target {
                name,
                addr: NGINX_LISTEN,
                pids,
                _procs: vec![nginx, backend],
            })
        }
        other => bail!("unknown target {other}"),
    }
}

/// nginx as operators would put it in front of a WebSocket service: it terminates mutual
/// TLS (same server certificate, same client CAs as devgate) and proxies the upgraded
/// connection to the echo backend over plain TCP on loopback.
fn nginx_conf(data: &Path, out: &Path) -> Result<PathBuf> {
    let dir = std::fs::canonicalize(out)?.join("nginx");
    std::fs::create_dir_all(dir.join("tmp"))?;
    let data = std::fs::canonicalize(data)?;
    let pki = data.join("pki");
    // Trust anchors for client certificates: the device and manager CAs and their root.
    let mut cas = String::new();
    for f in ["device-ca.pem", "manager-ca.pem", "root.pem"] {
        cas.push_str(
            &std::fs::read_to_string(pki.join(f))
                .with_context(|| format!("{}", pki.join(f).display()))?,
        );
    }
    std::fs::write(dir.join("client-cas.pem"), cas)?;
    let d = dir.display();
    let conf = format!(
        r#"# Written by cargo xtask bench-report: nginx as a TLS WebSocket reverse proxy.
daemon off;
master_process on;
worker_processes 2;
worker_rlimit_nofile {nofile};
pid {d}/nginx.pid;
error_log stderr error;
events {{ worker_connections {nofile}; }}
http {{
    access_log off;
    client_body_temp_path {d}/tmp/body;
    proxy_temp_path {d}/tmp/proxy;
    fastcgi_temp_path {d}/tmp/fastcgi;
    uwsgi_temp_path {d}/tmp/uwsgi;
    scgi_temp_path {d}/tmp/scgi;
    upstream echo {{ server {BACKEND_LISTEN}; }}
    server {{
        listen {NGINX_LISTEN} ssl;
        ssl_certificate {server_cert};
        ssl_certificate_key {server_key};
        ssl_client_certificate {d}/client-cas.pem;
        ssl_verify_client on;
        ssl_verify_depth 2;
        ssl_protocols TLSv1.2 TLSv1.3;
        location / {{
            proxy_pass http://echo;
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection "upgrade";
            proxy_buffering off;
            proxy_read_timeout 1h;
            tcp_nodelay on;
        }}
    }}
}}
"#,
        server_cert = pki.join("server.pem").display(),
        server_key = pki.join("server.key").display(),
        nofile = nofile_hard(),
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, conf)?;
    Ok(path)
}

/// The hard descriptor limit: nginx raises its workers' soft limit to it.
fn nofile_hard() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes only the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return 1024;
    }
    lim.rlim_max.min(1 << 20)
}

fn children_of(pid: u32) -> Vec<u32> {
    // nginx forks its workers just after it listens: give it a moment.
    std::thread::sleep(Duration::from_millis(200));
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

fn rss_kib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()
        })
        .unwrap_or(0.0)
}

struct Sample {
    t: f64,
    rss_kib: f64,
    /// devgate only: connected devices from /v1/status.
    devices: Option<f64>,
    /// devgate only: routed frames so far from /metrics.
    frames: Option<f64>,
}

/// Samples the target's memory (and devgate's own counters) every 200 ms while a scenario
/// runs: the connection ramp and the frames-over-time plots for devgate come from here when
/// the load generator has no timeline.
struct Sampler {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handle: std::thread::JoinHandle<Vec<Sample>>,
}

impl Sampler {
    fn start(name: &str, t: &Target) -> Self {
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let pids = t.pids.clone();
        let devgate = name == "devgate";
        let s = stop.clone();
        let handle = std::thread::spawn(move || {
            let started = Instant::now();
            let mut out = Vec::new();
            loop {
                let rss = pids.iter().map(|p| rss_kib(*p)).sum();
                let (devices, frames) = if devgate {
                    let devices = super::http_get(GW_ADMIN, "/v1/status")
                        .ok()
                        .and_then(|b| serde_json::from_str::<Value>(&b).ok())
                        .and_then(|v| v["devices"].as_f64());
                    let frames = super::http_get(GW_ADMIN, "/metrics").ok().map(|m| {
                        m.lines()
                            .filter(|l| l.starts_with("devgate_frames_total{"))
                            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                            .sum::<f64>()
                    });
                    (devices, frames)
                } else {
                    (None, None)
                };
                out.push(Sample {
                    t: started.elapsed().as_secs_f64(),
                    rss_kib: rss,
                    devices,
                    frames,
                });
                if s.load(Ordering::Relaxed) {
                    return out;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        });
        Self { stop, handle }
    }

    fn finish(self) -> Vec<Sample> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.handle.join().unwrap_or_default()
    }
}

fn loadgen(
    data: &Path,
    out: &Path,
    t: &Target,
    label: &str,
    scenario: &str,
    extra: &[String],
) -> Result<Value> {
    let json_path = out.join(format!("{}-{label}.json", t.name));
    let _ = std::fs::remove_file(&json_path);
    let mut cmd = Command::new(bin("devgate-loadgen"));
    cmd.args([scenario, "--gateway", t.addr, "--data-dir"])
        .arg(data)
        .arg("--json")
        .arg(&json_path)
        .args(extra);
    if let Some(pid) = t.pids.first()
        && t.name != "nginx"
    {
        cmd.args(["--gateway-pid", &pid.to_string()]);
    }
    let mut child: Child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting devgate-loadgen")?;
    let status = child.wait()?;
    if !status.success() {
        bail!(
            "devgate-loadgen {scenario} against {} failed with {status}",
            t.name
        );
    }
    Ok(serde_json::from_str(&std::fs::read_to_string(&json_path)?)?)
}

/// Mean estimates of every criterion benchmark under `dir`, in ns.
fn criterion_estimates(dir: &Path) -> Value {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                if p.file_name().is_some_and(|n| n == "new") {
                    let bench = std::fs::read_to_string(p.join("benchmark.json"))
                        .ok()
                        .and_then(|s| serde_json::from_str::<Value>(&s).ok());
                    let est = std::fs::read_to_string(p.join("estimates.json"))
                        .ok()
                        .and_then(|s| serde_json::from_str::<Value>(&s).ok());
                    if let (Some(b), Some(e)) = (bench, est)
                        && let Some(id) = b["full_id"].as_str()
                    {
                        out.insert(id.to_owned(), json!(e["mean"]["point_estimate"]));
                    }
                } else {
                    stack.push(p);
                }
            }
        }
    }
    serde_json::to_value(out).unwrap_or_default()
}

fn f(v: &Value) -> Option<f64> {
    v.as_f64().filter(|x| x.is_finite())
}

fn fmt_num(x: Option<f64>) -> String {
    match x {
        None => "—".into(),
        Some(x) if x.abs() >= 100.0 => format!("{x:.0}"),
        Some(x) => format!("{x:.2}"),
    }
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}×", a / b),
        _ => "—".into(),
    }
}

fn summarize(report: &Value, sizes: Sizes) -> String {
    let mut md = format!(
        "# devgate benchmark report ({})\n\n`{}` at {} on commit {}; all figures from this one run, on one machine shared by the servers and the load generator ({} CPUs).\n\n",
        report["mode"].as_str().unwrap_or(""),
        report["command"].as_str().unwrap_or(""),
        report["date"].as_str().unwrap_or(""),
        report["commit"].as_str().unwrap_or(""),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
    );
    md.push_str("Baselines: **echo** = `devgate-echo`, a minimal rustls WebSocket server that answers a manager's command itself (one TLS hop, no relay: the floor); **nginx** = Debian's nginx terminating the same mutual TLS and proxying the WebSocket to `devgate-echo --plain` (the alternative deployment). A devgate round trip crosses two TLS hops (manager → gateway → device and back); the echo's crosses one, nginx's one TLS hop plus one plain proxy hop.\n\n");
    let load = &report["load"];
    let g = |t: &str, s: &str, k: &str| f(&load[t][s][k]);
    let rows: &[(&str, &str, &str)] = &[
        ("1 outstanding: p50 µs", "latency_1", "rtt_p50_us"),
        ("1 outstanding: p99 µs", "latency_1", "rtt_p99_us"),
        (
            "closed loop (2 managers × 64): frames/s",
            "throughput",
            "frames_per_sec",
        ),
        ("closed loop: p50 µs", "throughput", "rtt_p50_us"),
        ("closed loop: p99 µs", "throughput", "rtt_p99_us"),
        ("rate-limited: p50 µs", "rate_limited", "rtt_p50_us"),
        ("rate-limited: p99 µs", "rate_limited", "rtt_p99_us"),
        ("rate-limited: frames/s", "rate_limited", "frames_per_sec"),
        ("connect: sessions held", "connect", "sessions"),
        ("connect: handshakes/s", "connect", "connects_per_sec"),
        (
            "connect: RSS per session, bytes",
            "connect",
            "rss_per_session_bytes",
        ),
        ("storm: sessions back", "storm", "sessions"),
        ("storm: seconds to all back", "storm", "all_back_secs"),
        ("storm: handshakes/s", "storm", "handshakes_per_sec"),
        (
            "storm: peak handshakes/s",
            "storm",
            "peak_handshakes_per_sec",
        ),
    ];
    let _ = writeln!(
        md,
        "## Load ({} devices, {} s per scenario; connect {} devices; rate-limited at {} commands/s)\n",
        sizes.fleet, sizes.secs, sizes.connect, sizes.rate
    );
    md.push_str("| figure | devgate | echo | nginx | devgate / echo | devgate / nginx |\n|---|---:|---:|---:|---:|---:|\n");
    for (label, s, k) in rows {
        let (d, e, n) = (g("devgate", s, k), g("echo", s, k), g("nginx", s, k));
        if d.is_none() && e.is_none() && n.is_none() {
            continue;
        }
        let _ = writeln!(
            md,
            "| {label} | {} | {} | {} | {} | {} |",
            fmt_num(d),
            fmt_num(e),
            fmt_num(n),
            ratio(d, e),
            ratio(d, n)
        );
    }
    if load["devgate-before"].is_object() {
        md.push_str("\n## devgate against the `--baseline-bin` build (same run)\n\n| figure | before | now | now / before |\n|---|---:|---:|---:|\n");
        for (label, s, k) in rows {
            let (b, d) = (g("devgate-before", s, k), g("devgate", s, k));
            if b.is_none() && d.is_none() {
                continue;
            }
            let _ = writeln!(
                md,
                "| {label} | {} | {} | {} |",
                fmt_num(b),
                fmt_num(d),
                ratio(d, b)
            );
        }
        md.push('\n');
    }
    if let Some(bps) = g("devgate", "stream", "bytes_per_sec") {
        let _ = writeln!(
            md,
            "| stream: MB/s through devgate | {:.1} | — | — | — | — |",
            bps / 1e6
        );
    }
    let errors: f64 = load
        .as_object()
        .into_iter()
        .flat_map(|m| m.values())
        .flat_map(|t| t.as_object().into_iter().flat_map(|m| m.values()))
        .filter_map(|s| s["errors"].as_f64())
        .sum();
    let failed: Vec<String> = load
        .as_object()
        .into_iter()
        .flat_map(|m| m.iter())
        .flat_map(|(t, sc)| {
            sc.as_object()
                .into_iter()
                .flat_map(|m| m.iter())
                .filter(|(_, v)| v.get("failed").is_some())
                .map(move |(s, v)| format!("{t}/{s}: {}", v["failed"].as_str().unwrap_or("")))
        })
        .collect();
    let _ = writeln!(md, "\nload generator errors over all runs: {errors:.0}");
    for f in &failed {
        let _ = writeln!(md, "- failed: {f}");
    }

    let hs = &report["rustls_handshake"];
    let raw = f(&hs["server_handshakes_per_sec_per_core"]);
    md.push_str(
        "\n## Handshakes\n\n| figure | handshakes/s | / raw rustls per core |\n|---|---:|---:|\n",
    );
    let _ = writeln!(
        md,
        "| raw rustls, server side, one core (in process, {:.0} µs each) | {} | 1.00× |",
        f(&hs["server_us_per_handshake"]).unwrap_or(0.0),
        fmt_num(raw)
    );
    for (label, s, k) in [
        ("devgate connect ramp", "connect", "connects_per_sec"),
        ("devgate storm", "storm", "handshakes_per_sec"),
        (
            "devgate storm, peak second",
            "storm",
            "peak_handshakes_per_sec",
        ),
        ("echo connect ramp", "connect", "connects_per_sec"),
        ("nginx connect ramp", "connect", "connects_per_sec"),
    ] {
        let (t, _) = label.split_once(' ').unwrap_or((label, ""));
        if let Some(x) = g(t, s, k) {
            let _ = writeln!(md, "| {label} | {x:.0} | {} |", ratio(Some(x), raw));
        }
    }

    md.push_str("\n## Instruction counts (callgrind, per iteration)\n\n");
    if report["icount_baseline"].is_object() {
        let (table, regressions) = compare(&report["icount_baseline"], &report["icount"]);
        md.push_str(&table);
        if !regressions.is_empty() {
            let _ = writeln!(
                md,
                "\nover tolerance (+{:.0} %): {}",
                TOLERANCE * 100.0,
                regressions.join(", ")
            );
        }
    } else if let Some(m) = report["icount"].as_object() {
        md.push_str("| workload | instr/iter |\n|---|---:|\n");
        for (k, v) in m {
            let _ = writeln!(md, "| {k} | {} |", fmt_num(f(&v["instructions"])));
        }
    }
    if let Some(c) = report["criterion"].as_object() {
        md.push_str("\n## Criterion (quick mode, mean ns per iteration)\n\n| benchmark | ns |\n|---|---:|\n");
        for (k, v) in c {
            let _ = writeln!(md, "| {k} | {} |", fmt_num(f(v)));
        }
    }
    md.push_str(
        "\nPlots: `latency_cdf.svg`, `connection_ramp.svg`, `throughput.svg` beside this file.\n",
    );
    md
}

// ---------------------------------------------------------------- plots

fn plots(
    out: &Path,
    results: &BTreeMap<String, BTreeMap<String, Value>>,
    ramps: &BTreeMap<String, Vec<(f64, f64)>>,
    flows: &BTreeMap<String, Vec<(f64, f64)>>,
) -> Result<()> {
    // Latency CDF of the 1-outstanding scenario: the load generator's full CDF when it has
    // one, else the percentiles it reports.
    let mut cdf = BTreeMap::new();
    for (target, sc) in results {
        let v = &sc["latency_1"];
        let pts: Vec<(f64, f64)> = match v["rtt_cdf"].as_array() {
            Some(a) if !a.is_empty() => a
                .iter()
                .filter_map(|p| Some((p[1].as_f64()?, p[0].as_f64()?)))
                // The load generator gives percentiles (0–100).
                .map(|(us, pct)| (us, pct / 100.0))
                .collect(),
            _ => [
                (0.5, "rtt_p50_us"),
                (0.9, "rtt_p90_us"),
                (0.99, "rtt_p99_us"),
                (0.999, "rtt_p999_us"),
            ]
            .iter()
            .filter_map(|(q, k)| Some((v[*k].as_f64()?, *q)))
            .collect(),
        };
        if !pts.is_empty() {
            cdf.insert(target.clone(), pts);
        }
    }
    line_chart(
        &out.join("latency_cdf.svg"),
        "Round-trip latency CDF, 1 outstanding command",
        "µs",
        "fraction",
        &cdf,
    )?;
    line_chart(
        &out.join("connection_ramp.svg"),
        "Connection ramp (connect scenario)",
        "s",
        "sessions",
        ramps,
    )?;
    line_chart(
        &out.join("throughput.svg"),
        "Routed frames per second (closed loop)",
        "s",
        "frames/s",
        flows,
    )?;
    Ok(())
}

fn line_chart(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &BTreeMap<String, Vec<(f64, f64)>>,
) -> Result<()> {
    use plotters::prelude::*;
    let all = series.values().flatten();
    let (mut x_max, mut y_max) = (1e-9f64, 1e-9f64);
    for (x, y) in all {
        x_max = x_max.max(*x);
        y_max = y_max.max(*y);
    }
    let root = SVGBackend::new(path, (800, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..x_max * 1.05, 0f64..y_max * 1.1)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc(y_label)
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    for (i, (name, pts)) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .label(name.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    root.present().map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}
