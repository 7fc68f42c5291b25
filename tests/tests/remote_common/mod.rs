//! Shared by the remote-access suites (`remote.rs`, `remote_forward.rs`): a gateway, an
//! enrolled `devgate-agent run` with a given allow-list, and `devgate-ctl` invocations
//! with the gateway's manager credential. All real binaries.

#![allow(dead_code)] // each suite uses a different subset

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use devgate_pki::PkiPaths;
use devgate_tests::{Gateway, binary};

/// Whether an external tool is installed; see `ops_common::have_tool`.
pub(crate) fn have_tool(path: &str, why: &str) -> Result<bool> {
    let found = if path.contains('/') {
        Path::new(path).is_file()
    } else {
        std::env::var_os("PATH")
            .is_some_and(|ps| std::env::split_paths(&ps).any(|d| d.join(path).is_file()))
    };
    if found {
        return Ok(true);
    }
    if std::env::var_os("DEVGATE_REQUIRE_TOOLS").is_some() {
        bail!("{path} is required ({why}) but not installed: run scripts/setup.sh");
    }
    eprintln!("SKIPPED: {path} is not installed ({why}); scripts/setup.sh installs it");
    Ok(false)
}

/// A child process killed when dropped.
#[derive(Debug)]
pub(crate) struct Proc {
    pub(crate) child: Child,
    pub(crate) log: Arc<Mutex<String>>,
}

impl Proc {
    /// Starts `cmd` with stderr (and stdout) collected into the log.
    pub(crate) fn spawn(cmd: &mut Command) -> Result<Self> {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {cmd:?}"))?;
        let log = Arc::new(Mutex::new(String::new()));
        for pipe in [
            child
                .stdout
                .take()
                .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
            child
                .stderr
                .take()
                .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    if let Ok(mut l) = log.lock() {
                        l.push_str(&line);
                        l.push('\n');
                    }
                }
            });
        }
        Ok(Self { child, log })
    }

    pub(crate) fn log(&self) -> String {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// Waits until the log has `needle` (at most `timeout`).
    pub(crate) fn wait_for(&self, needle: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.log().contains(needle) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!("no {needle:?} within {timeout:?}; log:\n{}", self.log())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A gateway with one enrolled, running agent.
#[derive(Debug)]
pub(crate) struct Remote {
    pub(crate) agent: Proc,
    pub(crate) unit: String,
    pub(crate) dir: tempfile::TempDir,
    pub(crate) gateway: Gateway,
}

impl Remote {
    /// Starts a gateway, creates a key through `devgate-ctl keys create`, enrolls
    /// `devgate-agent` unattended (--fingerprint) and runs it with `allow` (agent TOML
    /// without `state_dir`).
    pub(crate) fn start(allow: &str) -> Result<Self> {
        Self::start_with(allow, "")
    }

    /// As [`Remote::start`], with `gateway_config` for the gateway.
    pub(crate) fn start_with(allow: &str, gateway_config: &str) -> Result<Self> {
        Self::start_gateway(allow, Gateway::start(gateway_config)?)
    }

    /// As [`Remote::start`] on a gateway already started.
    pub(crate) fn start_gateway(allow: &str, gateway: Gateway) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let unit = "dev-remote-1".to_owned();
        let mut r = Self {
            agent: Proc::spawn(&mut Command::new("true"))?,
            unit,
            dir,
            gateway,
        };
        let key = r.create_key()?;
        let state = r.dir.path().join("state");
        let out = without_proxy_env(&mut Command::new(binary("devgate-agent")))
            .args([
                "enroll",
                "--gateway",
                &r.gateway.addr.to_string(),
                "--key",
                &key,
            ])
            .args([
                "--unit",
                &r.unit,
                "--fingerprint",
                &r.gateway.data.fingerprint,
            ])
            .arg("--state-dir")
            .arg(&state)
            .output()?;
        if !out.status.success() {
            bail!("enroll failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let config = r.dir.path().join("agent.toml");
        std::fs::write(
            &config,
            format!("state_dir = {:?}\n{allow}\n", state.display().to_string()),
        )?;
        r.agent = Proc::spawn(
            without_proxy_env(&mut Command::new(binary("devgate-agent")))
                .arg("run")
                .arg("--config")
                .arg(&config),
        )?;
        r.agent
            .wait_for("connected to the gateway", Duration::from_secs(20))?;
        Ok(r)
    }

    /// One one-time key, made through the manager connection.
    pub(crate) fn create_key(&self) -> Result<String> {
        let out = self.ctl(&["keys", "create", "--one-time", "1"]).output()?;
        if !out.status.success() {
            bail!(
                "keys create failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// `devgate-ctl` with the gateway's first manager credential and ARGS.
    pub(crate) fn ctl(&self, args: &[&str]) -> Command {
        let mut c = Command::new(binary("devgate-ctl"));
        c.args(self.ctl_conn_args()).args(args);
        without_proxy_env(&mut c);
        c
    }

    pub(crate) fn ctl_conn_args(&self) -> Vec<String> {
        let paths = PkiPaths::new(self.gateway.data.path());
        vec![
            "--gateway".into(),
            self.gateway.addr.to_string(),
            "--cert".into(),
            paths.manager_cert().display().to_string(),
            "--key".into(),
            paths.manager_key().display().to_string(),
            "--ca".into(),
            paths.root_cert().display().to_string(),
        ]
    }

    /// Starts `devgate-ctl forward UNIT TARGET` on a free loopback port; returns the port.
    pub(crate) fn forward(&self, target: &str) -> Result<(Proc, u16)> {
        let port = free_port()?;
        let listen = format!("127.0.0.1:{port}");
        let p = Proc::spawn(&mut self.ctl(&["forward", &self.unit, target, "--listen", &listen]))?;
        p.wait_for("forwarding", Duration::from_secs(10))?;
        Ok((p, port))
    }

    pub(crate) fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// `cmd` without the proxy variables of the environment the tests run in: agent and ctl
/// honour them, and the gateway is on loopback.
pub(crate) fn without_proxy_env(cmd: &mut Command) -> &mut Command {
    for var in ["https_proxy", "HTTPS_PROXY", "no_proxy", "NO_PROXY"] {
        cmd.env_remove(var);
    }
    cmd
}

/// A loopback port nobody listens on right now.
pub(crate) fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Waits until something accepts on `port`.
pub(crate) fn wait_port(port: u16, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("nothing listens on 127.0.0.1:{port} after {timeout:?}")
}

pub(crate) fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// SHA-256 of a file, hex.
pub(crate) fn sha256_file(path: &Path) -> Result<String> {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    let mut f = std::fs::File::open(path)?;
    std::io::copy(&mut f, &mut h)?;
    Ok(format!("{:x}", h.finalize()))
}

/// A tmux server of its own (socket in `dir`), for driving programs through a real pty.
#[derive(Debug)]
pub(crate) struct Tmux {
    socket: PathBuf,
}

impl Tmux {
    /// Starts a session running `command` (a shell command line) in a COLSxROWS window.
    pub(crate) fn start(dir: &Path, command: &str, cols: u16, rows: u16) -> Result<Self> {
        let t = Self {
            socket: dir.join("tmux.sock"),
        };
        let out = t
            .cmd()
            .args([
                "new-session",
                "-d",
                "-s",
                "t",
                "-x",
                &cols.to_string(),
                "-y",
            ])
            .arg(rows.to_string())
            .arg(command)
            .output()?;
        if !out.status.success() {
            bail!("tmux new-session: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(t)
    }

    fn cmd(&self) -> Command {
        let mut c = Command::new("tmux");
        c.arg("-S").arg(&self.socket).env_remove("TMUX");
        c
    }

    /// What the pane shows (with its scrollback).
    pub(crate) fn capture(&self) -> String {
        self.cmd()
            .args(["capture-pane", "-p", "-J", "-S", "-200", "-t", "t"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    }

    /// Types `keys` (tmux key names, e.g. `Enter`).
    pub(crate) fn send(&self, keys: &[&str]) -> Result<()> {
        let out = self
            .cmd()
            .args(["send-keys", "-t", "t"])
            .args(keys)
            .output()?;
        if !out.status.success() {
            bail!("tmux send-keys: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }

    pub(crate) fn resize(&self, cols: u16, rows: u16) -> Result<()> {
        let out = self
            .cmd()
            .args(["resize-window", "-t", "t", "-x", &cols.to_string(), "-y"])
            .arg(rows.to_string())
            .output()?;
        if !out.status.success() {
            bail!(
                "tmux resize-window: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// Waits until the pane shows something that `pred` accepts.
    pub(crate) fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let screen = self.capture();
            if pred(&screen) {
                return Ok(screen);
            }
            if Instant::now() > deadline {
                bail!("the pane never showed {what} within {timeout:?}; it shows:\n{screen}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.cmd().arg("kill-server").output();
    }
}

/// Starts a real sshd on 127.0.0.1:`port` with its own host key and an `authorized_keys`
/// holding a fresh client key (`DIR/id`), all in `dir`.
pub(crate) fn start_sshd(dir: &Path, port: u16) -> Result<Proc> {
    for (name, file) in [("host", "host_key"), ("client", "id")] {
        let out = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", name, "-f"])
            .arg(dir.join(file))
            .output()?;
        if !out.status.success() {
            bail!("ssh-keygen: {:?}", text(&out));
        }
    }
    std::fs::copy(dir.join("id.pub"), dir.join("authorized_keys"))?;
    // sshd insists on its privilege separation directory.
    std::fs::create_dir_all("/run/sshd")?;
    let config = dir.join("sshd_config");
    std::fs::write(
        &config,
        format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {}\nAuthorizedKeysFile {}\n\
             PidFile none\nUsePAM no\nStrictModes no\nPasswordAuthentication no\n\
             KbdInteractiveAuthentication no\nPermitRootLogin yes\n\
             Subsystem sftp internal-sftp\n",
            dir.join("host_key").display(),
            dir.join("authorized_keys").display()
        ),
    )?;
    let sshd = Proc::spawn(
        Command::new("/usr/sbin/sshd")
            .args(["-D", "-e", "-f"])
            .arg(&config),
    )?;
    wait_port(port, Duration::from_secs(10))?;
    Ok(sshd)
}

/// ssh/scp options for the sshd of [`start_sshd`]: its client key, no host key checks, no
/// prompts.
pub(crate) fn ssh_options(dir: &Path) -> Vec<String> {
    vec![
        "-i".into(),
        dir.join("id").display().to_string(),
        "-o".into(),
        "StrictHostKeyChecking=no".into(),
        "-o".into(),
        "UserKnownHostsFile=/dev/null".into(),
        "-o".into(),
        "BatchMode=yes".into(),
        "-o".into(),
        "LogLevel=ERROR".into(),
    ]
}
