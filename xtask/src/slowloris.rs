//! `cargo xtask slowloris-bench`: what slow and silent connections cost established devices.
//!
//! For each data path it starts one release gateway and, in turn: no attack, then each
//! attack kind of `devgate-loadgen attack` (its own process, so that its descriptors do not
//! count against the load generator's) holding N connections from 127.0.1.x — `silent` TCP
//! connections, `partial-hello` ClientHellos that never finish, `slow-head` TLS connections
//! sending their HTTP head at one byte per second — while `devgate-loadgen steady --rate
//! 1000 --devices 200` measures the devices' command round trip. Each phase gets a fresh
//! steady run against the same gateway, so the figures are side by side in one run.
//! Output: a table of p50/p99 per phase and the ratio to the no-attack phase, in
//! `target/slowloris-bench/report.md` and `report.json`.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use super::{Running, bin, run, wait_for_port};

const LISTEN: &str = "127.0.0.1:18843";
const ADMIN: &str = "127.0.0.1:18880";
const ATTACKS: [(&str, u64); 3] = [
    ("silent", 8000),
    ("partial-hello", 8000),
    ("slow-head", 5000),
];

struct Options {
    seconds: u64,
    drivers: Vec<String>,
    /// Multiplies the attack sizes (0.1 for a quick look).
    scale: f64,
    /// Attack kinds to run (all by default).
    attacks: Vec<String>,
    /// Run the attacker at `nice 19`: on a small shared machine its own TLS handshakes
    /// (a real attacker spends those on its own machines) otherwise take the CPU the
    /// gateway and load generator need, which is not what this benchmark is about.
    nice: bool,
    /// `handshake_workers` settings to run with (each a gateway of its own per data
    /// path): `auto` by default; `auto,0` compares with handshakes on the routing workers.
    handshake_workers: Vec<String>,
}

pub(crate) fn task(args: &[String]) -> Result<()> {
    let mut o = Options {
        seconds: 15,
        drivers: vec!["io_uring".into(), "epoll".into()],
        scale: 1.0,
        attacks: ATTACKS.iter().map(|(k, _)| (*k).to_owned()).collect(),
        nice: false,
        handshake_workers: vec!["auto".into()],
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--seconds" => o.seconds = it.next().context("--seconds S")?.parse()?,
            "--driver" => o.drivers = vec![it.next().context("--driver NAME")?.clone()],
            "--scale" => o.scale = it.next().context("--scale F")?.parse()?,
            "--attack" => o.attacks = vec![it.next().context("--attack KIND")?.clone()],
            "--nice-attacker" => o.nice = true,
            "--handshake-workers" => {
                o.handshake_workers = it
                    .next()
                    .context("--handshake-workers auto|N[,…]")?
                    .split(',')
                    .map(str::to_owned)
                    .collect()
            }
            other => bail!(
                "unknown option {other} (slowloris-bench [--seconds S] [--driver io_uring|epoll] [--scale F] [--attack silent|partial-hello|slow-head] [--nice-attacker] [--handshake-workers auto|N[,…]])"
            ),
        }
    }
    let (out, data) = super::release_with_data_dir("target/slowloris-bench")?;
    let mut results = Vec::new();
    for (driver, hs) in runs(&o) {
        let mut cmd = Command::new(bin("devgate"));
        cmd.args(["serve", "--data-dir"])
            .arg(&data)
            .args(["--listen", LISTEN, "--admin", ADMIN, "--data-path", &driver])
            .env("DEVGATE_LOG", "warn")
            .env("DEVGATE_HANDSHAKE_WORKERS", &hs)
            .stderr(Stdio::null());
        let gateway = Running(cmd.spawn().context("starting devgate")?);
        wait_for_port(LISTEN, Duration::from_secs(10))?;
        let status: Value = serde_json::from_str(&super::http_get(ADMIN, "/v1/status")?)?;
        if status["data_path"] != driver.as_str() {
            bail!(
                "asked for {driver} but the gateway runs {} ({})",
                status["data_path"],
                status["data_path_reason"]
            );
        }
        let pid = gateway.0.id();
        let mut phases = vec![("none".to_owned(), 0u64)];
        phases.extend(
            ATTACKS
                .iter()
                .filter(|(k, _)| o.attacks.iter().any(|a| a == k))
                .map(|(k, n)| ((*k).to_owned(), (*n as f64 * o.scale) as u64)),
        );
        for (kind, n) in phases {
            eprintln!("== {driver}: attack {kind} ({n} connections)");
            let attacker = if n > 0 {
                let mut a = if o.nice {
                    let mut c = Command::new("nice");
                    c.args(["-n", "19"]).arg(bin("devgate-loadgen"));
                    c
                } else {
                    Command::new(bin("devgate-loadgen"))
                };
                a.args(["attack", "--gateway", LISTEN, "--data-dir"])
                    .arg(&data)
                    .args(["--attack", &kind, "--devices", &n.to_string()])
                    // Longer than the warm-up and the measured run together.
                    .args(["--duration", &(o.seconds + 60).to_string()])
                    .stdout(Stdio::null());
                let child = Running(a.spawn().context("starting the attacker")?);
                // Let the attack reach its size (slow-head needs its TLS handshakes).
                std::thread::sleep(Duration::from_secs(if kind == "slow-head" {
                    12
                } else {
                    5
                }));
                Some(child)
            } else {
                None
            };
            let before: Value = serde_json::from_str(&super::http_get(ADMIN, "/v1/status")?)?;
            let steady = steady(&data, &out, pid, o.seconds)?;
            let after: Value = serde_json::from_str(&super::http_get(ADMIN, "/v1/status")?)?;
            drop(attacker);
            let timeouts = after["counters"]["handshakes_failed_timeout"]
                .as_u64()
                .unwrap_or(0)
                .saturating_sub(
                    before["counters"]["handshakes_failed_timeout"]
                        .as_u64()
                        .unwrap_or(0),
                );
            results.push(json!({
                "driver": driver,
                "handshake_workers": hs,
                "attack": kind,
                "connections": n,
                "open_connections_during": before["connections"],
                "handshake_timeouts_during": timeouts,
                "steady": steady,
            }));
            // Let the attack's sockets drain before the next phase.
            std::thread::sleep(Duration::from_secs(3));
        }
        drop(gateway);
        std::thread::sleep(Duration::from_secs(2));
    }
    let report = summarize(&results, &o);
    std::fs::write(
        out.join("report.json"),
        serde_json::to_string_pretty(&results)?,
    )?;
    std::fs::write(out.join("report.md"), &report)?;
    println!("{report}");
    println!("written: {}/report.md, report.json", out.display());
    Ok(())
}

/// (data path, handshake_workers) pairs, one gateway each.
fn runs(o: &Options) -> Vec<(String, String)> {
    o.drivers
        .iter()
        .flat_map(|d| {
            o.handshake_workers
                .iter()
                .map(move |h| (d.clone(), h.clone()))
        })
        .collect()
}

fn steady(data: &Path, out: &Path, pid: u32, seconds: u64) -> Result<Value> {
    let json_path = out.join("steady.json");
    let mut cmd = Command::new(bin("devgate-loadgen"));
    cmd.args(["steady", "--gateway", LISTEN, "--data-dir"])
        .arg(data)
        .args(["--gateway-pid", &pid.to_string(), "--sources", "8"])
        .args(["--devices", "200", "--managers", "1", "--rate", "1000"])
        .args(["--duration", &seconds.to_string(), "--json"])
        .arg(&json_path);
    run(&mut cmd)?;
    Ok(serde_json::from_str(&std::fs::read_to_string(&json_path)?)?)
}

fn summarize(results: &[Value], o: &Options) -> String {
    use std::fmt::Write;
    let mut md = String::from("# Slowloris: established devices under attack (same run)\n\n");
    let _ = writeln!(
        md,
        "200 devices, 1 manager, 1,000 commands/s for {} s per phase; gateway, load generator and attacker share the machine{}. Command: `cargo xtask slowloris-bench --seconds {} --scale {}{} --handshake-workers {}`.\n",
        o.seconds,
        if o.nice { " (attacker at nice 19)" } else { "" },
        o.seconds,
        o.scale,
        if o.nice { " --nice-attacker" } else { "" },
        o.handshake_workers.join(",")
    );
    md.push_str("| data path | handshake workers | attack | connections | p50 µs | p99 µs | p50 ratio | p99 ratio | handshake timeouts | errors |\n|---|---|---|---|---|---|---|---|---|---|\n");
    for (driver, hs) in runs(o) {
        let this =
            |r: &&Value| r["driver"] == driver.as_str() && r["handshake_workers"] == hs.as_str();
        let base = results.iter().filter(this).find(|r| r["attack"] == "none");
        let base50 = base.and_then(|b| b["steady"]["rtt_p50_us"].as_f64());
        let base99 = base.and_then(|b| b["steady"]["rtt_p99_us"].as_f64());
        for r in results.iter().filter(this) {
            let p50 = r["steady"]["rtt_p50_us"].as_f64();
            let p99 = r["steady"]["rtt_p99_us"].as_f64();
            let ratio = |x: Option<f64>, b: Option<f64>| match (x, b) {
                (Some(x), Some(b)) if b > 0.0 => format!("{:.2}", x / b),
                _ => "—".to_owned(),
            };
            let fmt = |x: Option<f64>| x.map_or_else(|| "—".to_owned(), |x| format!("{x:.0}"));
            let _ = writeln!(
                md,
                "| {driver} | {hs} | {} | {} | {} | {} | {} | {} | {} | {} |",
                r["attack"].as_str().unwrap_or("?"),
                r["connections"],
                fmt(p50),
                fmt(p99),
                ratio(p50, base50),
                ratio(p99, base99),
                r["handshake_timeouts_during"],
                r["steady"]["errors"].as_f64().unwrap_or(0.0)
            );
        }
    }
    md
}
