//! `cargo xtask datapath-bench`: the io_uring driver against the epoll driver in one run.
//!
//! For each driver it starts a fresh release gateway and drives it with `devgate-loadgen`:
//! - **sessions**: ramps idle device sessions (default 50,000 on io_uring; epoll is capped by
//!   `RLIMIT_NOFILE`, so it gets as many as it can hold) and reports the time to establish them
//!   and the gateway's RSS per idle session;
//! - **throughput**: 1,000 devices and one manager in closed loop (saturation), frames/s and
//!   p50/p99;
//! - **latency**: the same fleet at a fixed 5,000 commands/s, p50/p99.
//!
//! The two drivers alternate (io_uring, epoll, io_uring, epoll, …) `--rounds` times and the
//! report gives medians and the io_uring/epoll ratio, because these machines are shared and a
//! single run is noise. Output: `target/datapath-bench/report.md` and `report.json`.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use super::{Running, bin, run, wait_for_port};

const LISTEN: &str = "127.0.0.1:18743";
const ADMIN: &str = "127.0.0.1:18780";
const DRIVERS: [&str; 2] = ["io_uring", "epoll"];

struct Options {
    sessions: u64,
    rounds: usize,
    seconds: u64,
    skip_sessions: bool,
}

pub(crate) fn task(args: &[String]) -> Result<()> {
    let mut o = Options {
        sessions: 50_000,
        rounds: 3,
        seconds: 10,
        skip_sessions: false,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--sessions" => o.sessions = it.next().context("--sessions N")?.parse()?,
            "--rounds" => o.rounds = it.next().context("--rounds N")?.parse()?,
            "--seconds" => o.seconds = it.next().context("--seconds S")?.parse()?,
            "--no-sessions" => o.skip_sessions = true,
            other => bail!(
                "unknown option {other} (datapath-bench [--sessions N] [--rounds N] [--seconds S] [--no-sessions])"
            ),
        }
    }
    let (out, data) = super::release_with_data_dir("target/datapath-bench")?;

    let mut results: Vec<Value> = Vec::new();
    for round in 0..o.rounds {
        for driver in DRIVERS {
            eprintln!("== round {}/{}: {driver}", round + 1, o.rounds);
            let mut r = json!({ "driver": driver, "round": round });
            let base = ["--devices", "1000", "--managers", "1", "--duration"];
            let secs = o.seconds.to_string();
            r["throughput"] = with_gateway(&data, driver, 0, |pid| {
                loadgen(
                    &data,
                    &out,
                    "steady",
                    pid,
                    &[&base[..], &[&secs, "--window", "128"]].concat(),
                )
            })?;
            r["latency"] = with_gateway(&data, driver, 0, |pid| {
                loadgen(
                    &data,
                    &out,
                    "steady",
                    pid,
                    &[&base[..], &[&secs, "--rate", "5000"]].concat(),
                )
            })?;
            if !o.skip_sessions && round == 0 {
                let n = if driver == "epoll" {
                    // One process's descriptor table holds the epoll driver's sockets; leave
                    // room below RLIMIT_NOFILE for its listeners and files.
                    o.sessions.min(nofile_hard().saturating_sub(1000))
                } else {
                    o.sessions
                };
                let sessions = n.to_string();
                r["sessions"] = with_gateway(&data, driver, n + 1000, |pid| {
                    loadgen(
                        &data,
                        &out,
                        "connect",
                        pid,
                        &[
                            "--devices",
                            &sessions,
                            "--duration",
                            "5",
                            "--concurrency",
                            "256",
                            // 50,000 handshakes on a shared 2-core box can take minutes.
                            "--timeout",
                            "600",
                        ],
                    )
                })?;
            }
            results.push(r);
        }
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

fn nofile_hard() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes only the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return 1024;
    }
    lim.rlim_max
}

/// Starts a gateway on `driver`, runs `f` with its pid, stops it.
fn with_gateway(
    data: &Path,
    driver: &str,
    max_connections: u64,
    f: impl FnOnce(u32) -> Result<Value>,
) -> Result<Value> {
    let mut cmd = Command::new(bin("devgate"));
    cmd.args(["serve", "--data-dir"])
        .arg(data)
        .args(["--listen", LISTEN, "--admin", ADMIN, "--data-path", driver])
        .env("DEVGATE_LOG", "warn")
        .stderr(Stdio::inherit());
    if max_connections > 0 {
        cmd.env(
            "DEVGATE_LIMITS__MAX_CONNECTIONS",
            max_connections.to_string(),
        );
    }
    let gateway = Running(cmd.spawn().context("starting devgate")?);
    wait_for_port(LISTEN, Duration::from_secs(10))?;
    let status = super::http_get(ADMIN, "/v1/status")?;
    let status: Value = serde_json::from_str(&status)?;
    if status["data_path"] != driver {
        bail!(
            "asked for {driver} but the gateway runs {} ({})",
            status["data_path"],
            status["data_path_reason"]
        );
    }
    let result = f(gateway.0.id());
    drop(gateway);
    // Let TIME_WAIT sockets and the kernel's memory settle between runs.
    std::thread::sleep(Duration::from_secs(2));
    result
}

fn loadgen(data: &Path, out: &Path, scenario: &str, pid: u32, extra: &[&str]) -> Result<Value> {
    let json_path = out.join(format!("{scenario}.json"));
    let mut cmd = Command::new(bin("devgate-loadgen"));
    cmd.args([scenario, "--gateway", LISTEN, "--data-dir"])
        .arg(data)
        .args([
            "--gateway-pid",
            &pid.to_string(),
            "--sources",
            "8",
            "--json",
        ])
        .arg(&json_path)
        .args(extra);
    run(&mut cmd)?;
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&json_path)?)?;
    Ok(v)
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    Some(v[v.len() / 2])
}

fn figure(results: &[Value], driver: &str, part: &str, key: &str) -> Option<f64> {
    median(
        results
            .iter()
            .filter(|r| r["driver"] == driver)
            .filter_map(|r| r[part][key].as_f64())
            .collect(),
    )
}

fn summarize(results: &[Value], o: &Options) -> String {
    use std::fmt::Write;
    let mut md = String::from("# io_uring vs epoll (same run)\n\n");
    let _ = writeln!(
        md,
        "Medians of {} alternating rounds; gateway and load generator share the machine. Command: `cargo xtask datapath-bench --rounds {} --seconds {} --sessions {}`.\n",
        o.rounds, o.rounds, o.seconds, o.sessions
    );
    md.push_str("| figure | io_uring | epoll | io_uring / epoll |\n|---|---|---|---|\n");
    let rows: [(&str, &str, &str, &str); 9] = [
        (
            "routed frames/s, closed loop",
            "throughput",
            "frames_per_sec",
            "",
        ),
        ("p50 µs, closed loop", "throughput", "rtt_p50_us", ""),
        ("p99 µs, closed loop", "throughput", "rtt_p99_us", ""),
        ("p50 µs at 5,000 commands/s", "latency", "rtt_p50_us", ""),
        ("p99 µs at 5,000 commands/s", "latency", "rtt_p99_us", ""),
        ("idle sessions held", "sessions", "sessions", ""),
        ("seconds to establish them", "sessions", "connect_secs", ""),
        (
            "handshakes/s while establishing",
            "sessions",
            "connects_per_sec",
            "",
        ),
        (
            "gateway RSS per idle session, bytes",
            "sessions",
            "gateway_rss_per_session_bytes",
            "",
        ),
    ];
    for (label, part, key, _) in rows {
        let a = figure(results, "io_uring", part, key);
        let b = figure(results, "epoll", part, key);
        let fmt = |x: Option<f64>| x.map_or_else(|| "—".to_owned(), |x| format!("{x:.0}"));
        let ratio = match (a, b) {
            (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
            _ => "—".to_owned(),
        };
        let _ = writeln!(md, "| {label} | {} | {} | {ratio} |", fmt(a), fmt(b));
    }
    let errors: f64 = results
        .iter()
        .flat_map(|r| ["throughput", "latency", "sessions"].map(|p| r[p]["errors"].as_f64()))
        .flatten()
        .sum();
    let _ = writeln!(md, "\nload generator errors over all runs: {errors:.0}");
    md
}
