//! A real tinyproxy (Debian's) as the HTTP CONNECT proxy between clients and the gateway,
//! for the proxy suites (`proxy.rs`: the client library, `remote_proxy.rs`: the agent and
//! ctl programs).

#![allow(dead_code)] // each suite uses a different subset

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

const STEP: Duration = Duration::from_secs(20);
const TINYPROXY: &str = "/usr/bin/tinyproxy";

/// A tinyproxy process on a loopback port; killed when dropped.
pub(crate) struct Tinyproxy {
    child: Child,
    pub(crate) port: u16,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Tinyproxy {
    /// Whether tinyproxy is installed: without it the test is skipped, unless
    /// `DEVGATE_REQUIRE_TOOLS` is set (CI), where that is a failure.
    pub(crate) fn available() -> Result<bool> {
        if std::path::Path::new(TINYPROXY).is_file() {
            return Ok(true);
        }
        if std::env::var_os("DEVGATE_REQUIRE_TOOLS").is_some() {
            bail!(
                "tinyproxy is required (the HTTP CONNECT proxy) but not installed: run scripts/setup.sh"
            );
        }
        eprintln!("SKIPPED: tinyproxy is not installed; scripts/setup.sh installs it");
        Ok(false)
    }

    /// Starts tinyproxy in the foreground, with `BasicAuth user pass` when `auth` is given.
    pub(crate) fn start(auth: Option<(&str, &str)>) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        // A port the kernel just handed out and released; tinyproxy binds it right away.
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let mut config = format!(
            "Port {port}\nListen 127.0.0.1\nTimeout 60\nMaxClients 64\nAllow 127.0.0.1\n\
             LogLevel Connect\n"
        );
        // tinyproxy drops root itself once it has its port; as another user it stays that user.
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            config.push_str("User nobody\nGroup nogroup\n");
        }
        if let Some((user, pass)) = auth {
            config.push_str(&format!("BasicAuth {user} {pass}\n"));
        }
        let conf = dir.path().join("tinyproxy.conf");
        std::fs::write(&conf, config)?;
        let log = dir.path().join("tinyproxy.log");
        let child = Command::new(TINYPROXY)
            .arg("-d")
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log)?)
            .stderr(std::fs::File::create(dir.path().join("stderr"))?)
            .spawn()
            .context("starting tinyproxy")?;
        let mut proxy = Self {
            child,
            port,
            log,
            _dir: dir,
        };
        let until = Instant::now() + STEP;
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(status) = proxy.child.try_wait()? {
                bail!("tinyproxy exited with {status}: {}", proxy.logs());
            }
            if Instant::now() > until {
                bail!("tinyproxy not listening on port {port}: {}", proxy.logs());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(proxy)
    }

    pub(crate) fn url(&self, userinfo: &str) -> String {
        format!("http://{userinfo}127.0.0.1:{}", self.port)
    }

    pub(crate) fn logs(&self) -> String {
        let mut all = std::fs::read_to_string(&self.log).unwrap_or_default();
        if let Some(dir) = self.log.parent() {
            all.push_str(&std::fs::read_to_string(dir.join("stderr")).unwrap_or_default());
        }
        all
    }

    /// How many CONNECT requests tinyproxy has logged (`Request (file descriptor N):
    /// CONNECT host:port HTTP/1.1`).
    pub(crate) fn connects(&self) -> usize {
        self.logs().matches("): CONNECT ").count()
    }
}

impl Drop for Tinyproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
