//! The sd_notify protocol against a socket the test listens on, as systemd would:
//! READY=1 only once the listeners answer, WATCHDOG=1 at the requested rate and only while
//! the data path runs, RELOADING=1/READY=1 around SIGHUP, STOPPING=1 on SIGTERM.
//! (`ops_systemd.rs` runs the same binary under a real systemd.)

mod ops_common;

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use devgate_tests::{DataDir, Gateway};

/// Messages received on a notify socket.
struct Listener {
    sock: UnixDatagram,
}

impl Listener {
    fn recv(&self, timeout: Duration) -> Result<Option<String>> {
        self.sock.set_read_timeout(Some(timeout))?;
        let mut buf = [0u8; 4096];
        match self.sock.recv(&mut buf) {
            Ok(n) => Ok(Some(String::from_utf8_lossy(&buf[..n]).into_owned())),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                Ok(None)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Waits for a message containing `needle`; returns it and the messages before it.
    fn wait_for(&self, needle: &str, timeout: Duration) -> Result<(String, Vec<String>)> {
        let deadline = Instant::now() + timeout;
        let mut before = Vec::new();
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.recv(left)? {
                Some(m) if m.contains(needle) => return Ok((m, before)),
                Some(m) => before.push(m),
                None => break,
            }
        }
        bail!("no {needle:?} within {timeout:?}; got {before:?}")
    }

    /// Counts WATCHDOG=1 messages during `d`.
    fn count_pings(&self, d: Duration) -> Result<usize> {
        let deadline = Instant::now() + d;
        let mut n = 0;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.recv(left)? {
                Some(m) if m == "WATCHDOG=1" => n += 1,
                Some(_) => {}
                None => break,
            }
        }
        Ok(n)
    }
}

fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) on our own child's pid.
    unsafe {
        libc::kill(i32::try_from(pid).unwrap_or(0), sig);
    }
}

#[test]
fn ready_watchdog_reload_and_stopping_over_a_path_socket() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("notify.sock");
    let l = Listener {
        sock: UnixDatagram::bind(&path)?,
    };
    let gw = Gateway::start_in_env(
        DataDir::init()?,
        "",
        &[
            ("NOTIFY_SOCKET", path.to_str().context("utf-8 path")?),
            ("WATCHDOG_USEC", "400000"),
        ],
    )?;
    let (ready, before) = l.wait_for("READY=1", Duration::from_secs(10))?;
    assert!(before.is_empty(), "messages before READY: {before:?}");
    assert!(ready.contains("STATUS=serving"), "{ready}");
    // READY means serving: both listeners answer now.
    std::net::TcpStream::connect(gw.addr).context("public listener after READY")?;
    assert_eq!(gw.admin_get("/v1/status")?.0, 200);

    // 400 ms watchdog → a ping every 100 ms.
    let pings = l.count_pings(Duration::from_secs(1))?;
    assert!((5..=15).contains(&pings), "{pings} pings in 1 s");
    let s = gw.status()?;
    assert_eq!(s["watchdog"]["interval_ms"], 400);
    assert_eq!(s["watchdog"]["notify_socket"], true);

    // SIGHUP: RELOADING=1 (with MONOTONIC_USEC for Type=notify-reload), then READY=1;
    // the gateway keeps running.
    signal(gw.pid(), libc::SIGHUP);
    let (reloading, _) = l.wait_for("RELOADING=1", Duration::from_secs(5))?;
    assert!(reloading.contains("MONOTONIC_USEC="), "{reloading}");
    l.wait_for("READY=1", Duration::from_secs(5))?;
    assert!(gw.wait_for_log("reloaded certificates", Duration::from_secs(5)));
    let check = gw.status()?["check_status"].clone();
    assert!(
        check == "init" || check == "warn",
        "still serving after reload: {check}"
    );

    // SIGTERM: STOPPING=1, then a clean exit.
    let pid = gw.pid();
    let stopper = std::thread::spawn(move || gw.stop());
    let (stopping, _) = l.wait_for("STOPPING=1", Duration::from_secs(5))?;
    assert!(stopping.contains("STATUS=shutting down"), "{stopping}");
    let code = stopper
        .join()
        .map_err(|_| anyhow::anyhow!("stop panicked"))??;
    assert_eq!(code, Some(0), "pid {pid} exit");
    Ok(())
}

#[test]
fn abstract_notify_socket_and_foreign_watchdog_pid() -> Result<()> {
    let name = format!("devgate-ops-test-{}", std::process::id());
    let l = Listener {
        sock: UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes())?)?,
    };
    // WATCHDOG_PID names another process: the watchdog is not ours, READY still is.
    let _gw = Gateway::start_in_env(
        DataDir::init()?,
        "",
        &[
            ("NOTIFY_SOCKET", &format!("@{name}")),
            ("WATCHDOG_USEC", "200000"),
            ("WATCHDOG_PID", "1"),
        ],
    )?;
    l.wait_for("READY=1", Duration::from_secs(10))?;
    assert_eq!(l.count_pings(Duration::from_millis(600))?, 0);
    Ok(())
}

/// Thread ids of the gateway's data-path workers (`devgate-w<N>`).
fn worker_tids(pid: u32) -> Result<Vec<u32>> {
    let mut tids = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let entry = entry?;
        let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
        if comm.trim().starts_with("devgate-w") {
            tids.push(entry.file_name().to_string_lossy().parse()?);
        }
    }
    Ok(tids)
}

/// A cgroup-v1 freezer group holding only the given threads: the admin thread keeps
/// running while the data path is frozen, which is exactly a stuck data path.
struct FrozenThreads {
    dir: std::path::PathBuf,
}

impl FrozenThreads {
    fn freeze(tids: &[u32]) -> Result<Option<Self>> {
        let root = std::path::Path::new("/sys/fs/cgroup/freezer");
        if !ops_common::is_root() || !root.join("tasks").exists() {
            return Ok(None);
        }
        let dir = root.join(format!("devgate-ops-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        for tid in tids {
            std::fs::write(dir.join("tasks"), tid.to_string())?;
        }
        std::fs::write(dir.join("freezer.state"), "FROZEN")?;
        Ok(Some(Self { dir }))
    }

    fn thaw(&self) -> Result<()> {
        std::fs::write(self.dir.join("freezer.state"), "THAWED")?;
        Ok(())
    }
}

impl Drop for FrozenThreads {
    fn drop(&mut self) {
        let _ = self.thaw();
        // Move the threads back to the root group so the directory can go.
        let root = std::path::Path::new("/sys/fs/cgroup/freezer/tasks");
        if let Ok(tasks) = std::fs::read_to_string(self.dir.join("tasks")) {
            for tid in tasks.lines() {
                let _ = std::fs::write(root, tid);
            }
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}

#[test]
fn watchdog_pings_stop_while_the_data_path_is_frozen_and_resume_after() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("notify.sock");
    let l = Listener {
        sock: UnixDatagram::bind(&path)?,
    };
    let gw = Gateway::start_in_env(
        DataDir::init()?,
        "",
        &[
            ("NOTIFY_SOCKET", path.to_str().context("utf-8 path")?),
            ("WATCHDOG_USEC", "1000000"),
        ],
    )?;
    l.wait_for("READY=1", Duration::from_secs(10))?;
    assert!(l.count_pings(Duration::from_secs(1))? >= 2);
    let tids = worker_tids(gw.pid())?;
    assert_eq!(tids.len(), 2, "two workers");
    let Some(frozen) = FrozenThreads::freeze(&tids)? else {
        eprintln!("SKIPPED: needs root and the cgroup-v1 freezer to stall the data path");
        return Ok(());
    };
    // The stall bound is max(interval/2, 3 s): within 3 s of freezing the pings stop.
    std::thread::sleep(Duration::from_millis(3500));
    while l.recv(Duration::from_millis(10))?.is_some() {} // drain pings sent before
    let during = l.count_pings(Duration::from_millis(1500))?;
    let status = gw.status()?; // the admin thread still answers
    frozen.thaw()?;
    drop(frozen);
    assert_eq!(during, 0, "pinged while the data path was frozen");
    assert!(
        status["watchdog"]["withheld"].as_u64().unwrap_or(0) > 0,
        "{}",
        status["watchdog"]
    );
    assert!(
        status["watchdog"]["oldest_heartbeat_age_ms"]
            .as_u64()
            .unwrap_or(0)
            >= 3000
    );
    assert!(gw.wait_for_log("data path stalled", Duration::from_secs(2)));
    // Thawed: heartbeats are fresh again and so are the pings.
    assert!(
        l.count_pings(Duration::from_secs(2))? >= 2,
        "pings did not resume"
    );
    Ok(())
}
