//! `devgate-loadgen` against a real gateway: every scenario at small scale, the
//! JSON contract, worker processes and TLS resumption. The load generator is the
//! real binary (`target/<profile>/devgate-loadgen`, built by `cargo xtask test`).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use devgate_tests::{Gateway, binary};
use serde_json::Value;

/// No single load generator run may take longer than this.
const RUN_LIMIT: Duration = Duration::from_secs(90);

/// Runs `devgate-loadgen SCENARIO --gateway … --data-dir … EXTRA… --json FILE` and
/// returns the JSON report; fails with the loadgen's output when it fails.
fn loadgen(gw: &Gateway, scenario: &str, extra: &[&str]) -> Result<Value> {
    let out = tempfile::tempdir()?;
    let json = out.path().join("report.json");
    let mut child = Command::new(binary("devgate-loadgen"))
        .arg(scenario)
        .args(["--gateway", &gw.addr.to_string(), "--data-dir", &gw.data_arg()])
        .args(extra)
        .arg("--json")
        .arg(&json)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting devgate-loadgen (is it built? run `cargo xtask test`)")?;
    let deadline = Instant::now() + RUN_LIMIT;
    while child.try_wait()?.is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!("devgate-loadgen {scenario} ran longer than {RUN_LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let output = child.wait_with_output()?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        bail!("devgate-loadgen {scenario} failed: {}\n{stdout}\n{stderr}", output.status);
    }
    eprintln!("{stdout}");
    let text = std::fs::read_to_string(&json).context("no --json report written")?;
    Ok(serde_json::from_str(&text)?)
}

fn u(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or_else(|| panic!("{key} is not a number in {v}"))
}

fn f(v: &Value, key: &str) -> f64 {
    v[key].as_f64().unwrap_or_else(|| panic!("{key} is not a number in {v}"))
}

/// The fields the contract promises, in every scenario's report.
fn assert_contract(v: &Value) {
    for key in ["sessions", "errors", "frames_per_sec", "rtt_p50_us", "rtt_p99_us"] {
        assert!(v[key].is_number(), "{key} missing in {v}");
    }
    assert!(v["timeline"].is_array(), "no timeline");
    assert!(v["rtt_cdf"].is_array(), "no rtt_cdf");
    assert!(v["errors_by_kind"].is_object(), "no errors_by_kind");
}

fn assert_no_errors(v: &Value) {
    assert_eq!(u(v, "errors"), 0, "errors: {}", v["errors_by_kind"]);
}

#[test]
fn connect_holds_every_session_and_reads_the_gateways_memory() -> Result<()> {
    let gw = Gateway::start("")?;
    let pid = gw.pid().to_string();
    let v = loadgen(&gw, "connect", &["--devices", "150", "--hold", "1", "--gateway-pid", &pid])?;
    assert_contract(&v);
    assert_no_errors(&v);
    assert_eq!(u(&v, "sessions"), 150);
    assert!(f(&v, "connects_per_sec") > 0.0);
    assert!(v["gateway_rss_per_session_bytes"].is_number(), "{v}");
    let peak = v["timeline"]
        .as_array()
        .map(|t| t.iter().filter_map(|e| e["sessions"].as_u64()).max().unwrap_or(0));
    assert_eq!(peak, Some(150), "timeline: {}", v["timeline"]);
    Ok(())
}

#[test]
fn steady_routes_commands_responses_and_events() -> Result<()> {
    let gw = Gateway::start("")?;
    let v = loadgen(
        &gw,
        "steady",
        &[
            "--devices", "100", "--managers", "2", "--duration", "2", "--window", "16",
            "--payload", "256", "--event-rate", "200",
        ],
    )?;
    assert_contract(&v);
    assert_no_errors(&v);
    assert_eq!(u(&v, "sessions"), 100);
    assert_eq!(u(&v, "managers"), 2);
    assert!(f(&v, "frames_per_sec") > 0.0);
    assert!(u(&v, "rtt_p50_us") > 0 && u(&v, "rtt_p99_us") >= u(&v, "rtt_p50_us"));
    assert!(u(&v, "events") > 0, "no events reached the managers");
    assert!(v["rtt_cdf"].as_array().is_some_and(|c| c.len() > 10));
    Ok(())
}

#[test]
fn steady_at_a_fixed_rate_sends_about_that_many_commands() -> Result<()> {
    let gw = Gateway::start("")?;
    let v = loadgen(&gw, "steady", &["--devices", "50", "--duration", "2", "--rate", "500"])?;
    assert_no_errors(&v);
    let per_sec = f(&v, "commands_per_sec");
    assert!((350.0..=650.0).contains(&per_sec), "commands/s {per_sec}");
    Ok(())
}

#[test]
fn stream_moves_bytes_both_ways_under_flow_control() -> Result<()> {
    let gw = Gateway::start("")?;
    let v = loadgen(&gw, "stream", &["--devices", "20", "--streams", "2", "--duration", "2"])?;
    assert_contract(&v);
    assert_no_errors(&v);
    assert!(f(&v, "bytes_per_sec") > 1e6, "{v}");
    assert!(f(&v, "frames_per_sec") > 0.0);
    Ok(())
}

/// A shell command that restarts the gateway `gw` on the same port: TERM, wait
/// for the exit, start `devgate serve` again in the background. The pid of the
/// new gateway is written to `pidfile` (the test kills it at the end).
fn restart_script(gw: &Gateway, dir: &Path) -> Result<(String, std::path::PathBuf)> {
    let config = dir.join("restarted.toml");
    std::fs::write(
        &config,
        format!("listen = \"{}\"\nadmin = \"127.0.0.1:0\"\nworkers = 2\n", gw.addr),
    )?;
    let pidfile = dir.join("gateway.pid");
    let log = dir.join("restarted.log");
    let script = format!(
        "kill -TERM {pid}; for i in $(seq 100); do kill -0 {pid} 2>/dev/null || break; sleep 0.1; done; \
         kill -KILL {pid} 2>/dev/null; \
         DEVGATE_LOG=warn {bin} serve --data-dir {data} --config {config} >{log} 2>&1 & echo $! > {pidfile}",
        pid = gw.pid(),
        bin = binary("devgate").display(),
        data = gw.data_arg(),
        config = config.display(),
        log = log.display(),
        pidfile = pidfile.display(),
    );
    Ok((script, pidfile))
}

/// Kills the restarted gateway on drop.
struct Restarted(std::path::PathBuf);

impl Drop for Restarted {
    fn drop(&mut self) {
        if let Some(pid) = std::fs::read_to_string(&self.0)
            .ok()
            .and_then(|p| p.trim().parse::<i32>().ok())
        {
            // SAFETY: kill(2) on the gateway this test started.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
    }
}

#[test]
fn storm_brings_every_device_back_after_a_real_gateway_restart() -> Result<()> {
    let gw = Gateway::start("")?;
    let dir = tempfile::tempdir()?;
    let (script, pidfile) = restart_script(&gw, dir.path())?;
    let _restarted = Restarted(pidfile);
    let v = loadgen(
        &gw,
        "storm",
        &[
            "--devices", "150", "--restart-cmd", &script, "--backoff-min-ms", "50",
            "--backoff-max-ms", "1000", "--timeout", "30",
        ],
    )?;
    assert_contract(&v);
    assert_no_errors(&v);
    assert_eq!(u(&v, "sessions"), 150);
    assert!(v["all_back_secs"].is_number(), "not all back: {v}");
    assert!(u(&v, "handshakes") >= 150, "{v}");
    assert!(u(&v, "peak_handshakes_per_sec") > 0);
    assert!(f(&v, "handshakes_per_sec") > 0.0);
    Ok(())
}

#[test]
fn storm_with_drop_and_resume_resumes_tls_sessions() -> Result<()> {
    let gw = Gateway::start("")?;
    let v = loadgen(
        &gw,
        "storm",
        &["--devices", "100", "--drop", "--resume", "--backoff-min-ms", "20", "--backoff-max-ms", "500"],
    )?;
    assert_no_errors(&v);
    assert!(v["all_back_secs"].is_number(), "not all back: {v}");
    assert_eq!(u(&v, "handshakes"), 100, "{v}");
    assert!(u(&v, "resumed") > 0, "no handshake was resumed: {v}");
    assert_eq!(u(&v, "resumed") + u(&v, "full_handshakes"), 100);
    Ok(())
}

#[test]
fn churn_reconnects_continuously_without_errors() -> Result<()> {
    let gw = Gateway::start("")?;
    let v = loadgen(&gw, "churn", &["--devices", "100", "--rate", "50", "--duration", "2"])?;
    assert_contract(&v);
    assert_no_errors(&v);
    assert!(u(&v, "handshakes") >= 50, "{v}");
    assert!(u(&v, "connect_p50_us") > 0);
    Ok(())
}

#[test]
fn two_worker_processes_add_up_to_the_whole_fleet() -> Result<()> {
    let gw = Gateway::start("")?;
    let v = loadgen(
        &gw,
        "steady",
        &[
            "--devices", "200", "--processes", "2", "--sources", "2", "--duration", "2",
            "--window", "16",
        ],
    )?;
    assert_no_errors(&v);
    assert_eq!(u(&v, "processes"), 2);
    assert_eq!(u(&v, "sessions"), 200);
    assert!(f(&v, "frames_per_sec") > 0.0);
    let status = gw.status()?;
    assert!(status["devices"].as_u64().is_some(), "{status}");
    let peak = v["timeline"]
        .as_array()
        .map(|t| t.iter().filter_map(|e| e["sessions"].as_u64()).max().unwrap_or(0));
    assert_eq!(peak, Some(200), "timeline: {}", v["timeline"]);
    Ok(())
}

#[test]
fn bad_flags_get_a_clear_message() -> Result<()> {
    let out = Command::new(binary("devgate-loadgen"))
        .args(["storm", "--gateway", "127.0.0.1:1", "--data-dir", "/nonexistent"])
        .output()?;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--restart-cmd") && stderr.contains("--drop"), "{stderr}");
    let out = Command::new(binary("devgate-loadgen"))
        .args(["connect", "--gateway", "10.1.2.3:8443", "--data-dir", "/nonexistent"])
        .output()?;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("loopback"));
    Ok(())
}
