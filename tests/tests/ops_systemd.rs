//! devgate under a real service manager: the Debian package is installed into a
//! throwaway systemd (scripts/systemd-sandbox.sh: systemd as PID 1 of its own namespaces
//! on an overlay of this machine's root) and run as the packaged, hardened service.
//!
//! Checked: `systemctl start` returns only once both listeners answer (Type=notify,
//! READY); the process runs as user devgate with exactly the four capabilities, no new
//! privileges and a seccomp filter; watchdog pings keep it alive with WatchdogSec=2s;
//! `systemctl reload` reloads in place; journald gets priorities; `systemctl stop` tells
//! the manager and closes with 1001; a frozen data path makes systemd's watchdog restart
//! the gateway; `systemd-analyze security` rates the unit.

mod ops_common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use devgate_client::{Body, ConnectOptions, ErrorCode, Incoming, Role};
use ops_common::{have_tool, run_ok, workspace_root};

/// A running sandbox; powered off on drop.
struct Sandbox {
    dir: tempfile::TempDir,
    pid: u32,
}

impl Sandbox {
    fn script() -> PathBuf {
        workspace_root().join("scripts/systemd-sandbox.sh")
    }

    fn start() -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let started = run_ok(Command::new(Self::script()).arg("start").arg(dir.path()))
            .and_then(|out| Ok(String::from_utf8_lossy(&out.stdout).trim().parse::<u32>()?));
        match started {
            Ok(pid) => Ok(Self { dir, pid }),
            Err(e) => {
                // Half-started: power off whatever came up and remove its cgroups.
                let _ = Command::new(Self::script())
                    .arg("stop")
                    .arg(dir.path())
                    .status();
                Err(e.context("starting the systemd sandbox"))
            }
        }
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(Self::script());
        c.arg("exec").arg(self.dir.path()).args(args);
        c
    }

    /// Runs a command inside; returns its stdout.
    fn run(&self, args: &[&str]) -> Result<String> {
        let out = run_ok(&mut self.cmd(args))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// A path inside the sandbox, as seen from here.
    fn path(&self, inside: &str) -> PathBuf {
        PathBuf::from(format!("/proc/{}/root", self.pid)).join(inside.trim_start_matches('/'))
    }

    fn show(&self, prop: &str) -> Result<String> {
        Ok(self
            .run(&["systemctl", "show", "devgate", "-p", prop, "--value"])?
            .trim()
            .to_owned())
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let _ = Command::new(Self::script())
            .arg("stop")
            .arg(self.dir.path())
            .status();
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn admin_status(admin: &str) -> Result<serde_json::Value> {
    let out = run_ok(ops_common::devgate().args(["status", "--json", "--admin", admin]))?;
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// Host PID of the process that is `ns_pid` inside the sandbox.
fn host_pid(ns_pid: &str) -> Result<u32> {
    for entry in std::fs::read_dir("/proc")? {
        let Ok(pid) = entry?.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
            continue;
        };
        let is_devgate = status.lines().any(|l| l == "Name:\tdevgate");
        let nspid = status.lines().find_map(|l| l.strip_prefix("NSpid:"));
        if is_devgate
            && let Some(ids) = nspid
            && ids.split_whitespace().last() == Some(ns_pid)
            && ids.split_whitespace().count() > 1
        {
            return Ok(pid);
        }
    }
    bail!("no devgate process with namespace pid {ns_pid}")
}

fn can_run() -> Result<bool> {
    if !ops_common::is_root() {
        eprintln!("SKIPPED: booting a sandboxed systemd needs root");
        return Ok(false);
    }
    let fs = std::fs::read_to_string("/proc/filesystems").unwrap_or_default();
    if !fs.contains("overlay") {
        eprintln!("SKIPPED: no overlayfs for the systemd sandbox");
        return Ok(false);
    }
    Ok(have_tool("cargo-deb", "builds the .deb")?
        && have_tool("unshare", "creates the sandbox namespaces")?
        && have_tool("nsenter", "enters the sandbox")?
        && Path::new("/lib/systemd/systemd").exists())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_package_runs_under_a_real_systemd() -> Result<()> {
    if !can_run()? {
        return Ok(());
    }
    let work = tempfile::tempdir()?;
    let deb = ops_common::build_deb(work.path())?;
    let sb = Sandbox::start()?;

    // Install the package as an operator would, then create the PKI as the service user.
    let installed = sb.run(&["dpkg", "-i", deb.to_str().context("deb path")?])?;
    assert!(installed.contains("no certificates yet"), "{installed}");
    assert_eq!(
        sb.run(&["systemctl", "is-enabled", "devgate"])?.trim(),
        "enabled"
    );
    assert_eq!(
        sb.show("ActiveState")?,
        "inactive",
        "not started without a PKI"
    );
    sb.run(&[
        "runuser",
        "-u",
        "devgate",
        "--",
        "devgate",
        "init",
        "--data-dir",
        "/var/lib/devgate",
        "--name",
        "localhost,127.0.0.1",
    ])?;
    // Ports of our own (the sandbox shares this machine's network), set the way an
    // operator overrides configuration: /etc/default/devgate. A short watchdog.
    let (public, admin) = (free_port()?, free_port()?);
    let admin_addr = format!("127.0.0.1:{admin}");
    std::fs::write(
        sb.path("/etc/default/devgate"),
        format!(
            "DEVGATE_LISTEN=127.0.0.1:{public}\nDEVGATE_ADMIN={admin_addr}\nDEVGATE_WORKERS=2\n"
        ),
    )?;
    std::fs::create_dir_all(sb.path("/etc/systemd/system/devgate.service.d"))?;
    std::fs::write(
        sb.path("/etc/systemd/system/devgate.service.d/test.conf"),
        "[Service]\nWatchdogSec=2s\nRestartSec=1s\n",
    )?;
    sb.run(&["systemctl", "daemon-reload"])?;

    // Type=notify: `start` returns once READY=1 came, i.e. once both listeners answer.
    let started = Instant::now();
    sb.run(&["systemctl", "start", "devgate"])?;
    let start_time = started.elapsed();
    std::net::TcpStream::connect(("127.0.0.1", public)).context("public listener after start")?;
    let status = admin_status(&admin_addr)?;
    eprintln!("systemctl start took {start_time:?}");
    assert_eq!(sb.show("ActiveState")?, "active");
    assert!(
        sb.show("StatusText")?.starts_with("serving"),
        "STATUS= reaches systemd"
    );
    assert_eq!(status["watchdog"]["interval_ms"], 2000);

    // Credentials of the running service.
    let main_pid = sb.show("MainPID")?;
    let proc_status = sb.run(&["cat", &format!("/proc/{main_pid}/status")])?;
    let field = |name: &str| -> String {
        proc_status
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}:")))
            .unwrap_or("")
            .trim()
            .to_owned()
    };
    let uid = sb.run(&["id", "-u", "devgate"])?;
    assert!(
        field("Uid").starts_with(uid.trim()),
        "runs as devgate: {}",
        field("Uid")
    );
    // CAP_NET_BIND_SERVICE (10), CAP_NET_ADMIN (12), CAP_PERFMON (38), CAP_BPF (39).
    let caps = format!("{:016x}", (1u64 << 10) | (1 << 12) | (1 << 38) | (1 << 39));
    assert_eq!(field("CapEff"), caps);
    assert_eq!(field("CapBnd"), caps);
    assert_eq!(field("NoNewPrivs"), "1");
    assert_eq!(field("Seccomp"), "2", "SystemCallFilter applies");

    // A manager and a device, with the credentials `devgate init` made in the sandbox.
    let pki = sb.path("/var/lib/devgate/pki");
    let roots = devgate_pki::load_certs(&pki.join("root.pem"))?;
    let mgr_tls = devgate_client::tls_config(
        &roots,
        Some((
            devgate_pki::load_certs(&pki.join("manager.pem"))?,
            devgate_pki::load_key(&pki.join("manager.key"))?,
        )),
    )?;
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], public));
    let mut mgr = devgate_client::connect(
        &ConnectOptions::new(addr, "localhost", Role::Manager),
        mgr_tls,
    )
    .await?;
    let ca = devgate_pki::ClientCa::load(&pki.join("device-ca.pem"), &pki.join("device-ca.key"))?;
    let issued = ca.issue_device("sd-dev-1")?;
    let dev_tls = devgate_client::tls_config(&roots, Some((issued.chain, issued.key)))?;
    let dev = devgate_client::connect(
        &ConnectOptions::new(addr, "localhost", Role::Device),
        dev_tls,
    )
    .await?;

    // The watchdog (2 s) keeps it alive for longer than its interval.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(sb.show("NRestarts")?, "0");
    assert_eq!(sb.show("MainPID")?, main_pid);
    let status = admin_status(&admin_addr)?;
    assert_eq!(status["devices"], 1);
    assert_eq!(status["managers"], 1);
    assert!(
        status["watchdog"]["pings"].as_u64().unwrap_or(0) >= 8,
        "{}",
        status["watchdog"]
    );
    let summary = run_ok(ops_common::devgate().args(["status", "--admin", &admin_addr]))?;
    eprintln!("{}", String::from_utf8_lossy(&summary.stdout));

    // Reload in place: same process, sessions survive.
    sb.run(&["systemctl", "reload", "devgate"])?;
    assert_eq!(sb.show("MainPID")?, main_pid);
    assert_eq!(sb.show("ActiveState")?, "active");
    assert_eq!(admin_status(&admin_addr)?["devices"], 1);

    // journald: info lines at priority 6, no duplicated timestamps.
    let journal = sb.run(&["journalctl", "-u", "devgate", "-o", "json", "--no-pager"])?;
    let entries: Vec<serde_json::Value> = journal
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let serving = entries
        .iter()
        .find(|e| e["MESSAGE"].as_str().is_some_and(|m| m.contains("serving")))
        .context("no serving line in the journal")?;
    assert_eq!(serving["PRIORITY"], "6", "{serving}");
    let msg = serving["MESSAGE"].as_str().unwrap_or("");
    assert!(
        msg.starts_with("INFO "),
        "no prefix, timestamp or padding left: {msg:?}"
    );
    assert!(entries.iter().any(|e| {
        e["MESSAGE"]
            .as_str()
            .is_some_and(|m| m.contains("reloaded certificates"))
    }));

    // systemd-analyze security: report the exposure score of the hardened unit.
    let security = sb.run(&["systemd-analyze", "security", "devgate", "--no-pager"])?;
    let overall = security
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or("")
        .to_owned();
    eprintln!("{overall}");
    let score: f64 = overall
        .split("devgate.service:")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .context("no exposure score")?;
    assert!(
        score <= 3.0,
        "exposure {score} (0 = locked down, 10 = unprotected)"
    );

    // A frozen data path: pings stop, systemd's watchdog fires, the gateway is restarted.
    let tids: Vec<String> = std::fs::read_dir(format!("/proc/{}/task", host_pid(&main_pid)?))?
        .filter_map(|e| e.ok())
        .filter(|e| {
            std::fs::read_to_string(e.path().join("comm")).is_ok_and(|c| c.starts_with("devgate-w"))
        })
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(tids.len(), 2);
    let freezer = Path::new("/sys/fs/cgroup/freezer");
    if freezer.join("tasks").exists() {
        let group = freezer.join(format!("devgate-sd-test-{}", std::process::id()));
        std::fs::create_dir_all(&group)?;
        for t in &tids {
            std::fs::write(group.join("tasks"), t)?;
        }
        std::fs::write(group.join("freezer.state"), "FROZEN")?;
        // Stall bound 3 s + WatchdogSec 2 s: systemd gives up on the last ping by ~5 s.
        let deadline = Instant::now() + Duration::from_secs(15);
        let mut fired = false;
        while Instant::now() < deadline {
            let log = sb.run(&["journalctl", "-u", "devgate", "--no-pager", "-o", "cat"])?;
            if log.contains("Watchdog timeout") {
                fired = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        // Thaw so that the signalled process can die, then let systemd restart it.
        std::fs::write(group.join("freezer.state"), "THAWED")?;
        for t in &tids {
            let _ = std::fs::write(freezer.join("tasks"), t);
        }
        let _ = std::fs::remove_dir(&group);
        assert!(
            fired,
            "systemd's watchdog did not fire while the data path was frozen"
        );
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline
            && !(sb.show("NRestarts")? == "1" && sb.show("ActiveState")? == "active")
        {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert_eq!(
            sb.show("NRestarts")?,
            "1",
            "restarted after the watchdog fired"
        );
        assert_ne!(sb.show("MainPID")?, main_pid);
        // The old sessions died with the old process; reconnect for the stop check.
        let _ = mgr.recv_timeout(Duration::from_millis(100)).await;
        let mgr_tls = devgate_client::tls_config(
            &roots,
            Some((
                devgate_pki::load_certs(&pki.join("manager.pem"))?,
                devgate_pki::load_key(&pki.join("manager.key"))?,
            )),
        )?;
        let deadline = Instant::now() + Duration::from_secs(10);
        mgr = loop {
            match devgate_client::connect(
                &ConnectOptions::new(addr, "localhost", Role::Manager),
                mgr_tls.clone(),
            )
            .await
            {
                Ok(m) => break m,
                Err(e) if Instant::now() > deadline => bail!("manager reconnect: {e}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        };
        drop(dev);
    } else {
        eprintln!("SKIPPED (part): no cgroup-v1 freezer to stall the data path");
        drop(dev);
    }

    // Stop: the manager is told, then closed with 1001; the unit ends cleanly.
    let stopper = sb.cmd(&["systemctl", "stop", "devgate"]).spawn()?;
    let mut told = false;
    let code = loop {
        match mgr.recv_timeout(Duration::from_secs(10)).await? {
            Some(Incoming::Frame(r)) => {
                if let Body::Error {
                    code: ErrorCode::ShuttingDown,
                    ..
                } = r.frame().body
                {
                    told = true;
                }
            }
            Some(Incoming::Closed { code, .. }) => break code,
            None => bail!("manager not closed on systemctl stop"),
        }
    };
    let out = stopper.wait_with_output()?;
    assert!(out.status.success());
    assert!(told, "no shutting_down error before the close");
    assert_eq!(code, Some(1001));
    assert_eq!(sb.show("ActiveState")?, "inactive");
    assert_eq!(sb.show("Result")?, "success");
    Ok(())
}
