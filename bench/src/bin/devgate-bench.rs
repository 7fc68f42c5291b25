//! `devgate-bench`: benchmark figures that are not criterion's.
//!
//! - `icount [--json FILE] [WORKLOAD…]`: runs each hot-path workload a fixed number of
//!   iterations under `valgrind --tool=callgrind` (one valgrind process per workload) and
//!   reports the instructions executed per iteration. Only the measured function is counted
//!   (`--toggle-collect`), so setup (PKI creation, map filling) is not. Instruction counts
//!   do not depend on what else the machine is doing: CI compares them against
//!   `bench/baseline/instructions.json` (`cargo xtask bench-check`).
//! - `handshake-rate [--secs S] [--json FILE]`: full mutual-TLS handshakes in process, one
//!   thread, with the gateway's rustls configuration: the server's CPU time per handshake
//!   (thread CPU time, so other load on the machine does not inflate it) gives the raw
//!   handshake rate per core, the ceiling for a reconnect storm.
//! - `icount-run WORKLOAD ITERS` is what the valgrind child runs.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bench::{TlsConfigs, WORKLOADS, Workload, icount_iterations};
use serde_json::json;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("icount") => icount(&args[1..]),
        Some("icount-run") => {
            let name = args.get(1).context("icount-run WORKLOAD ITERS")?;
            let iters: u64 = args
                .get(2)
                .context("icount-run WORKLOAD ITERS")?
                .parse()
                .context("ITERS must be a number")?;
            let mut w = Workload::new(name)?;
            // One untimed iteration: lazily initialised state (allocator arenas, rustls'
            // provider statics) is not part of the steady-state cost.
            w.run(1)?;
            icount_measure(&mut w, iters)
        }
        Some("handshake-rate") => handshake_rate(&args[1..]),
        _ => bail!(
            "usage: devgate-bench icount [--json FILE] [WORKLOAD…] | handshake-rate [--secs S] [--json FILE]\nworkloads: {}",
            WORKLOADS.join(", ")
        ),
    }
}

/// The only function whose instructions callgrind counts (see `--toggle-collect`).
#[inline(never)]
#[unsafe(no_mangle)]
pub extern "Rust" fn icount_measure(w: &mut Workload, iters: u64) -> Result<()> {
    w.run(iters)
}

fn icount(args: &[String]) -> Result<()> {
    let mut json_out: Option<PathBuf> = None;
    let mut names: Vec<String> = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--json" => json_out = Some(it.next().context("--json FILE")?.into()),
            w => names.push(w.to_owned()),
        }
    }
    if names.is_empty() {
        names = WORKLOADS.iter().map(|s| (*s).to_owned()).collect();
    }
    let exe = std::env::current_exe().context("locating devgate-bench")?;
    let mut results = BTreeMap::new();
    for name in &names {
        let iters = icount_iterations(name);
        let out = Command::new("valgrind")
            .args([
                "--tool=callgrind",
                "--collect-atstart=no",
                &format!("--toggle-collect={}", bench::icount_toggle(name)),
                "--callgrind-out-file=/dev/null",
            ])
            .arg(&exe)
            .args(["icount-run", name, &iters.to_string()])
            .output()
            .context("running valgrind (is it installed? scripts/setup.sh installs it)")?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() {
            bail!("valgrind on {name} failed ({}):\n{stderr}", out.status);
        }
        let total: u64 = stderr
            .lines()
            .find_map(|l| l.split_once("Collected :").map(|(_, n)| n.trim()))
            .and_then(|n| n.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .with_context(|| {
                format!("no 'Collected :' line from callgrind for {name}:\n{stderr}")
            })?;
        let per_iter = total / iters.max(1);
        println!("{name:<24} {per_iter:>12} instructions/iteration ({iters} iterations)");
        results.insert(
            name.clone(),
            json!({ "iterations": iters, "instructions": per_iter }),
        );
    }
    if let Some(path) = json_out {
        std::fs::write(&path, serde_json::to_string_pretty(&results)? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

fn handshake_rate(args: &[String]) -> Result<()> {
    let mut secs = 3.0f64;
    let mut json_out: Option<PathBuf> = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--secs" => secs = it.next().context("--secs S")?.parse()?,
            "--json" => json_out = Some(it.next().context("--json FILE")?.into()),
            other => bail!("unknown option {other}"),
        }
    }
    let cfg = TlsConfigs::new()?;
    // Warm up (first handshake loads keys into the provider's caches).
    for _ in 0..20 {
        bench::timed_server_handshake(&cfg)?;
    }
    let mut server = Duration::ZERO;
    let mut n = 0u64;
    let started = Instant::now();
    let cpu_start = bench::thread_cpu_time();
    while started.elapsed().as_secs_f64() < secs {
        server += bench::timed_server_handshake(&cfg)?;
        n += 1;
    }
    // Both sides in one thread, per CPU second (not per wall second: the machine is shared).
    let cpu = (bench::thread_cpu_time().saturating_sub(cpu_start)).as_secs_f64();
    let wall = cpu.max(1e-9);
    let server_us = server.as_secs_f64() * 1e6 / n as f64;
    let v = json!({
        "handshakes": n,
        "server_us_per_handshake": server_us,
        "server_handshakes_per_sec_per_core": 1e6 / server_us,
        "pair_handshakes_per_cpu_sec": n as f64 / wall,
        "protocol": "TLS 1.3 mutual TLS, gateway's rustls configuration, in memory",
    });
    println!(
        "raw rustls handshake: server {server_us:.0} µs CPU → {:.0}/s per core (client and server together: {:.0} per CPU second)",
        1e6 / server_us,
        n as f64 / wall
    );
    if let Some(path) = json_out {
        std::fs::write(&path, serde_json::to_string_pretty(&v)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
