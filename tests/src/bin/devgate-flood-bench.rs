//! `devgate-flood-bench`: how much a SYN flood disturbs 1,000 established devices, with
//! the XDP guard and with the user-space fallback. Not a test: run it with
//! `cargo xtask flood-bench` (root; about two minutes).
//!
//! Two network namespaces joined by a veth pair (created here, deleted at the end; no
//! traffic leaves them). The gateway runs in one with the guard on its veth. In the
//! other, `devgate-loadgen steady` drives devices and a manager from 10.211.0.2 (an
//! exempt source, so the per-source limits do not throttle the load generator's own
//! ramp), while a raw-socket sender floods the gateway's port with SYNs from spoofed
//! addresses 10.211.1.0 … (nobody owns them, so no handshake ever completes).
//!
//! For each guard mode it runs the load twice, without and with the flood, and reports
//! frames/s and p99 round trip of both, the flood's rate, and what XDP dropped.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use devgate_tests::netns::{self, CLIENT_V4, Flood, NetPair, SERVER_IF, SERVER_V4};
use devgate_tests::{DataDir, Gateway, binary};
use serde_json::{Value, json};

const PORT: u16 = 8443;

#[derive(Debug, Clone)]
struct Args {
    devices: usize,
    seconds: f64,
    pps: u64,
    flood_sources: u32,
    rate: u64,
    window: usize,
    modes: Vec<String>,
    json: Option<PathBuf>,
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        devices: 1000,
        seconds: 10.0,
        pps: 100_000,
        flood_sources: 256,
        // Paced well below saturation (~46k frames/s here), so that p99 shows what the
        // flood does to latency rather than the queueing of a closed loop.
        rate: 10_000,
        window: 64,
        modes: vec!["auto".into(), "userspace".into()],
        json: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--devices" => a.devices = value()?.parse()?,
            "--seconds" => a.seconds = value()?.parse()?,
            "--pps" => a.pps = value()?.parse()?,
            "--flood-sources" => a.flood_sources = value()?.parse()?,
            "--rate" => a.rate = value()?.parse()?,
            "--window" => a.window = value()?.parse()?,
            "--modes" => a.modes = value()?.split(',').map(str::to_owned).collect(),
            "--json" => a.json = Some(PathBuf::from(value()?)),
            "-h" | "--help" => {
                println!(
                    "devgate-flood-bench [--devices 1000] [--seconds 10] [--pps 100000] [--flood-sources 256] [--rate 10000 (commands/s; 0 = closed loop)] [--window 64] [--modes auto,generic,native,userspace] [--json FILE]"
                );
                std::process::exit(0);
            }
            other => bail!("unknown option {other} (try --help)"),
        }
    }
    ensure!(
        a.seconds > 0.0 && a.seconds <= 120.0,
        "--seconds must be in (0, 120]"
    );
    ensure!(
        (1..=20_000).contains(&a.devices),
        "--devices must be 1..=20000"
    );
    for m in &a.modes {
        ensure!(
            ["auto", "native", "generic", "userspace"].contains(&m.as_str()),
            "--modes: unknown mode {m}"
        );
    }
    ensure!(
        (1..=60_000).contains(&a.flood_sources),
        "--flood-sources must be 1..=60000"
    );
    Ok(a)
}

/// Busy and softirq jiffies of the whole machine (`/proc/stat`).
fn cpu_jiffies() -> (u64, u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let fields: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    let total: u64 = fields.iter().sum();
    let idle = fields.get(3).copied().unwrap_or(0) + fields.get(4).copied().unwrap_or(0);
    let softirq = fields.get(6).copied().unwrap_or(0);
    (total, total.saturating_sub(idle), softirq)
}

fn loadgen(args: &Args, net: &NetPair, data: &Path, out: &Path) -> Result<Value> {
    let status = Command::new("ip")
        .args(["netns", "exec", &net.client])
        .arg(binary("devgate-loadgen"))
        .arg("steady")
        // The gateway is in the bench's own network namespace, not on loopback.
        .arg("--allow-remote")
        .args([
            "--gateway",
            &SocketAddr::new(SERVER_V4.into(), PORT).to_string(),
        ])
        .arg("--data-dir")
        .arg(data)
        .args(["--devices", &args.devices.to_string(), "--managers", "1"])
        .args(["--duration", &args.seconds.to_string()])
        .args(["--rate", &args.rate.to_string()])
        .args(["--window", &args.window.to_string()])
        .arg("--json")
        .arg(out)
        .stdout(std::process::Stdio::null())
        .status()
        .context("running devgate-loadgen")?;
    ensure!(status.success(), "devgate-loadgen failed: {status}");
    let text = std::fs::read_to_string(out)?;
    Ok(serde_json::from_str(&text)?)
}

fn drops_total(xdp: &Value) -> u64 {
    xdp["drops"]
        .as_object()
        .map_or(0, |o| o.values().filter_map(Value::as_u64).sum())
}

/// One guard mode: a run without and one with the flood.
fn bench_mode(args: &Args, net: &NetPair, mode: &str, object: &Path) -> Result<Vec<Value>> {
    let config = format!(
        "listen = \"0.0.0.0:{PORT}\"\nadmin = \"127.0.0.1:9180\"\n\
         [xdp]\ninterface = \"{SERVER_IF}\"\nmode = \"{mode}\"\nobject = \"{}\"\n\
         max_conns_per_ip = 64\nnew_conns_per_sec = 20\nnew_conns_burst = 40\n\
         exempt_sources = [\"{CLIENT_V4}/32\"]\n",
        object.display()
    );
    let gw = Gateway::start_in_netns(DataDir::init()?, &net.server, &config)?;
    let attached = gw.status()?["xdp"]["mode"]
        .as_str()
        .unwrap_or("?")
        .to_owned();
    eprintln!("guard {mode}: XDP mode {attached}");
    let tmp = tempfile::tempdir()?;
    let mut rows = Vec::new();
    for flood_on in [false, true] {
        let before = gw.status()?["xdp"].clone();
        let cpu0 = cpu_jiffies();
        let stop = AtomicBool::new(false);
        let started = Instant::now();
        let (report, sent) = std::thread::scope(|s| -> Result<(Value, u64)> {
            let flooder = flood_on.then(|| {
                let flood = Flood {
                    first_src: Ipv4Addr::new(10, 211, 1, 0),
                    sources: args.flood_sources,
                    dst: SERVER_V4,
                    dport: PORT,
                    pps: args.pps,
                    // Covers the load generator's ramp and run, and no more.
                    secs: args.seconds * 3.0 + 30.0,
                    max: args.pps.max(1) * (args.seconds as u64 * 3 + 30),
                };
                let stop = &stop;
                let ns = net.client.clone();
                s.spawn(move || netns::in_netns(&ns, || flood.run(stop)))
            });
            let out = tmp.path().join(format!("{mode}-{flood_on}.json"));
            let report = loadgen(args, net, gw.data.path(), &out);
            stop.store(true, Ordering::Relaxed);
            let sent = match flooder {
                Some(h) => h
                    .join()
                    .map_err(|_| anyhow::anyhow!("flood thread panicked"))??,
                None => 0,
            };
            Ok((report?, sent))
        })?;
        let secs = started.elapsed().as_secs_f64();
        let cpu1 = cpu_jiffies();
        let after = gw.status()?["xdp"].clone();
        let dropped = drops_total(&after) - drops_total(&before);
        let busy = (cpu1.1 - cpu0.1) as f64 / (cpu1.0 - cpu0.0).max(1) as f64;
        let softirq = (cpu1.2 - cpu0.2) as f64 / (cpu1.0 - cpu0.0).max(1) as f64;
        let row = json!({
            "guard": mode,
            "xdp_mode": attached,
            "flood": flood_on,
            "frames_per_sec": report["frames_per_sec"],
            "rtt_p50_us": report["rtt_p50_us"],
            "rtt_p99_us": report["rtt_p99_us"],
            "sessions": report["sessions"],
            "errors": report["errors"],
            "syn_sent": sent,
            "syn_pps": sent as f64 / secs,
            "xdp_dropped": dropped,
            "xdp_drop_rate": if sent > 0 { dropped as f64 / sent as f64 } else { 0.0 },
            "cpu_busy": busy,
            "cpu_softirq": softirq,
        });
        eprintln!("  {row}");
        rows.push(row);
        // Let the kernel's SYN queue drain before the next run.
        std::thread::sleep(Duration::from_secs(2));
    }
    gw.stop()?;
    Ok(rows)
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or(0.0)
}

fn main() -> Result<()> {
    let args = parse_args()?;
    ensure!(
        netns::is_root(),
        "needs root (network namespaces, XDP, raw sockets)"
    );
    let object = match std::env::var_os("DEVGATE_XDP_OBJECT") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from("target/xdp/devgate-xdp.o"),
    };
    ensure!(
        object.is_file(),
        "XDP object {} missing: cargo xtask build-ebpf",
        object.display()
    );
    let object = object.canonicalize()?;
    let net = NetPair::create("flood", 0, 0)?;
    let mut rows = Vec::new();
    for mode in &args.modes {
        rows.extend(bench_mode(&args, &net, mode, &object)?);
    }
    println!(
        "\nSYN flood vs {} devices + 1 manager ({} s per run, flood target {} pps from {} spoofed sources; {})\n",
        args.devices,
        args.seconds,
        args.pps,
        args.flood_sources,
        if args.rate == 0 {
            format!("closed loop, window {}", args.window)
        } else {
            format!("{} commands/s", args.rate)
        }
    );
    println!(
        "| guard | flood | frames/s | vs no flood | p99 µs | vs no flood | errors | SYNs/s sent | XDP dropped | drop rate | CPU busy | softirq |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    for pair in rows.chunks(2) {
        let base = &pair[0];
        for r in pair {
            let guard = match r["xdp_mode"].as_str() {
                Some("off") | None => "user space".to_owned(),
                Some(m) => format!("XDP ({m})"),
            };
            println!(
                "| {guard} | {} | {:.0} | {:.2} | {:.0} | {:.2} | {} | {:.0} | {} | {:.1} % | {:.0} % | {:.0} % |",
                if r["flood"] == true { "yes" } else { "no" },
                f(&r["frames_per_sec"]),
                f(&r["frames_per_sec"]) / f(&base["frames_per_sec"]).max(1.0),
                f(&r["rtt_p99_us"]),
                f(&r["rtt_p99_us"]) / f(&base["rtt_p99_us"]).max(1.0),
                r["errors"],
                f(&r["syn_pps"]),
                r["xdp_dropped"],
                100.0 * f(&r["xdp_drop_rate"]),
                100.0 * f(&r["cpu_busy"]),
                100.0 * f(&r["cpu_softirq"]),
            );
        }
    }
    if let Some(path) = &args.json {
        std::fs::write(
            path,
            serde_json::to_string_pretty(&json!({ "runs": rows }))?,
        )?;
        println!("\nJSON: {}", path.display());
    }
    Ok(())
}
