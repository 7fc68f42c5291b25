//! `cargo xtask …`: project automation that needs more than one cargo command.
//!
//! - `test`  — builds the binaries the end-to-end tests start, then runs every test.
//! - `ci`    — what `.ci/run` runs: formatting, clippy with warnings denied, `test`.
//! - `build-ebpf`, `flood-bench` — the XDP program and its benchmark (see `ebpf.rs`).
//! - `demo`  — builds release binaries, creates a data dir under `target/demo`, starts
//!   the gateway on embedded defaults, runs a small fleet against it with the load
//!   generator, prints what happened and stops the gateway.
//! - `deb`   — the Debian package (`package.rs`).
//! - `datapath-bench` — io_uring against epoll in one run (`datapath.rs`).
//! - `slowloris-bench` — established devices' round trip with and without slow/silent
//!   connection floods, side by side (`slowloris.rs`, docs/BENCHMARKS.md).
//! - `bench-check [--update-baseline]` — instruction counts of the hot paths under callgrind
//!   against `bench/baseline/instructions.json` (fails beyond +3 %); `bench-report [--quick]`
//!   — devgate against an echo floor and nginx in one run (`bench.rs`, docs/BENCHMARKS.md).
//! - `core-check` — the routing core (`devgate-core`) depends on no I/O crate, has no
//!   `unsafe`, calls no `libc` and reads no clock (`core_check.rs`; part of `ci`).

mod package;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

mod bench;
mod core_check;
mod datapath;
mod ebpf;
mod slowloris;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let root = workspace_root();
    std::env::set_current_dir(&root)?;
    match args.first().map(String::as_str) {
        Some("test") => test(&args[1..]),
        Some("ci") => ci(),
        Some("demo") => demo(&args[1..]),
        Some(t @ ("build-ebpf" | "flood-bench")) => ebpf::task(t, &args[1..]),
        Some("deb") => package::deb(&args[1..]),
        Some("datapath-bench") => datapath::task(&args[1..]),
        Some("slowloris-bench") => slowloris::task(&args[1..]),
        Some("bench-check") => bench::check(&args[1..]),
        Some("core-check") => core_check::check(),
        Some("bench-report") => bench::report(&args[1..]),
        _ => {
            eprintln!(
                "usage: cargo xtask <test|ci|demo|deb> [args]\n  test [cargo test args]  build the binaries and run all tests\n  ci                      fmt check, clippy -D warnings, test\n  demo [--devices N] [--seconds S]  run the gateway with a demo fleet\n  deb                     build the Debian package (target/debian/)\n  bench-check [--update-baseline]  instruction counts against bench/baseline (callgrind)\n  bench-report [--quick]  devgate vs echo vs nginx, target/bench-report/report.md"
            );
            bail!("unknown or missing task");
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

/// A release binary of this workspace.
fn bin(name: &str) -> PathBuf {
    Path::new("target/release").join(name)
}

/// Builds the release binaries and returns `out` with a `devgate init` data dir inside it
/// (made once, kept between runs), for the benchmarks that start real gateways.
fn release_with_data_dir(out: &str) -> Result<(PathBuf, PathBuf)> {
    run(cargo().args(["build", "--release", "--bins"]))?;
    let out = PathBuf::from(out);
    std::fs::create_dir_all(&out)?;
    let data = out.join("data");
    if !data.join("pki/root.pem").exists() {
        run(Command::new(bin("devgate"))
            .args(["init", "--data-dir"])
            .arg(&data)
            .args(["--name", "localhost,127.0.0.1"]))?;
    }
    Ok((out, data))
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("$ {cmd:?}");
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

fn test(extra: &[String]) -> Result<()> {
    // The end-to-end tests start target/debug/devgate: build it (and the loadgen) first.
    run(cargo().args(["build", "--bins"]))?;
    let mut cmd = cargo();
    cmd.args(["test", "--workspace", "--color", "never"])
        .args(extra);
    let mut totals = run_counting(&mut cmd)?;
    if extra.is_empty() && totals.success {
        // The suites that drive the data path run a second time on the epoll driver, so
        // both drivers are held to the same tests (the first pass used the default,
        // io_uring where the kernel has it).
        let mut cmd = cargo();
        cmd.args(["test", "-p", "devgate-tests", "--color", "never"]);
        for suite in EPOLL_SUITES {
            cmd.args(["--test", suite]);
        }
        cmd.env("DEVGATE_DATA_PATH", "epoll");
        let epoll = run_counting(&mut cmd)?;
        println!(
            "epoll data path: {} passed, {} failed",
            epoll.passed, epoll.failed
        );
        totals.add(&epoll);
    }
    // One closing line over all test binaries (cargo's last one is often an empty doc-test run).
    println!(
        "tests: {} passed, {} failed, {} skipped",
        totals.passed, totals.failed, totals.ignored
    );
    if !totals.success {
        bail!("cargo test failed");
    }
    Ok(())
}

/// End-to-end suites run on both data-path drivers.
const EPOLL_SUITES: &[&str] = &[
    "abuse",
    "e2e",
    "stream",
    "certificates",
    "enroll",
    "rotation",
    "ops_status",
    "identity",
    "rails",
    "proxy",
    "proxy_protocol",
];

#[derive(Default)]
struct TestCounts {
    passed: u64,
    failed: u64,
    ignored: u64,
    success: bool,
}

impl TestCounts {
    fn add(&mut self, other: &Self) {
        self.passed += other.passed;
        self.failed += other.failed;
        self.ignored += other.ignored;
        self.success &= other.success;
    }
}

/// Runs a `cargo test` command, echoing its output and adding up its result lines.
fn run_counting(cmd: &mut Command) -> Result<TestCounts> {
    eprintln!("$ {cmd:?}");
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .context("running cargo test")?;
    let stdout = child.stdout.take().context("no stdout")?;
    let mut counts = TestCounts::default();
    for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)) {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            let count = |word: &str| -> u64 {
                rest.split(';')
                    .find_map(|part| part.trim().strip_suffix(word).map(str::trim))
                    .and_then(|n| n.rsplit(' ').next().and_then(|n| n.parse().ok()))
                    .unwrap_or(0)
            };
            counts.passed += count("passed");
            counts.failed += count("failed");
            counts.ignored += count("ignored");
        }
    }
    counts.success = child.wait()?.success();
    Ok(counts)
}

fn ci() -> Result<()> {
    // System packages and cargo-deb the tests need (idempotent; root installs them).
    run(&mut Command::new("scripts/setup.sh"))?;
    // The XDP object the XDP tests attach (setup.sh installed its toolchain).
    ebpf::task("build-ebpf", &[])?;
    run(cargo().args(["fmt", "--all", "--", "--check"]))?;
    core_check::check()?;
    run(cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    test(&[])
}

struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc_kill(self.0.id());
        }
        let _ = self.0.wait();
    }
}

unsafe fn libc_kill(pid: u32) {
    unsafe extern "C" {
        fn kill(pid: i32, sig: i32) -> i32;
    }
    // SIGTERM: a graceful shutdown, as systemd would do it.
    unsafe {
        kill(pid as i32, 15);
    }
}

fn demo(args: &[String]) -> Result<()> {
    let mut devices = 2000u32;
    let mut seconds = 10u32;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--devices" => devices = it.next().context("--devices N")?.parse()?,
            "--seconds" => seconds = it.next().context("--seconds S")?.parse()?,
            other => bail!("unknown demo option {other}"),
        }
    }
    run(cargo().args(["build", "--release", "--bins"]))?;
    let bin = Path::new("target/release");
    let data = Path::new("target/demo");
    if !data.join("pki/root.pem").exists() {
        run(Command::new(bin.join("devgate"))
            .args(["init", "--data-dir"])
            .arg(data)
            .args(["--name", "localhost,127.0.0.1"]))?;
    } else {
        run(Command::new(bin.join("devgate"))
            .args(["fingerprint", "--data-dir"])
            .arg(data))?;
    }
    let listen = "127.0.0.1:8443";
    let admin = "127.0.0.1:9180";
    eprintln!(
        "$ devgate serve --data-dir {} (embedded defaults: port 8443, admin 127.0.0.1:9180)",
        data.display()
    );
    let gateway = Running(
        Command::new(bin.join("devgate"))
            .args(["serve", "--data-dir"])
            .arg(data)
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting devgate")?,
    );
    wait_for_port(listen, Duration::from_secs(10))?;
    let pid = gateway.0.id().to_string();
    let report = data.join("loadgen.json");
    let mut loadgen = Command::new(bin.join("devgate-loadgen"));
    loadgen
        .args(["steady", "--gateway", listen, "--data-dir"])
        .arg(data)
        .args([
            "--devices",
            &devices.to_string(),
            "--managers",
            "1",
            "--rate",
            "2000",
        ])
        .args([
            "--duration",
            &seconds.to_string(),
            "--gateway-pid",
            &pid,
            "--json",
        ])
        .arg(&report);
    eprintln!("$ {loadgen:?}");
    let mut loadgen = loadgen.spawn().context("starting the load generator")?;
    // What an operator sees while the fleet is connected: the one-screen summary.
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline && loadgen.try_wait()?.is_none() {
        let connected = http_get(admin, "/v1/status")
            .ok()
            .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
            .is_some_and(|v| v["devices"] == devices && v["managers"] == 1);
        if connected {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    println!("\n$ devgate status    (while the fleet is connected)");
    run(Command::new(bin.join("devgate")).args(["status", "--admin", admin]))?;
    let done = loadgen.wait()?;
    if !done.success() {
        bail!("the load generator failed with {done}");
    }
    let metrics = http_get(admin, "/metrics")?;
    println!("\nfrom http://{admin}/metrics:");
    for line in metrics.lines().filter(|l| {
        l.starts_with("devgate_connections{")
            || l.starts_with("devgate_frames_total{")
            || l.starts_with("devgate_device_response_duration_seconds_count")
            || l.starts_with("devgate_handshakes_total{result=\"ok\"}")
    }) {
        println!("  {line}");
    }
    println!("\nloadgen report: {}", report.display());
    drop(gateway);
    Ok(())
}

fn wait_for_port(addr: &str, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(addr).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("gateway did not listen on {addr} within {timeout:?} (is the port in use?)")
}

fn http_get(addr: &str, path: &str) -> Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    Ok(resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or(resp))
}
