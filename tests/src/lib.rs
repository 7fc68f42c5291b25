//! Harness for end-to-end tests: starts the real `devgate` binary on loopback with a fresh
//! data directory, and connects real TLS WebSocket clients to it.
//!
//! The binary is found next to the test executable (`target/<profile>/devgate`), or at
//! `$DEVGATE_BIN`; `cargo xtask test` builds it first.
//!
//! [`netns`] adds network namespaces with a veth pair, for the XDP tests: a gateway
//! started with [`Gateway::start_in_netns`] runs inside one.

pub mod netns;
pub mod postgres;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use devgate_client::{ClientError, ConnectOptions, Connection, Role, tls_config};
use devgate_pki::{ClientCa, PkiPaths};
use rustls::ClientConfig;

/// Path of a binary built by this workspace (`devgate`, `devgate-loadgen`).
pub fn binary(name: &str) -> PathBuf {
    let var = format!("{}_BIN", name.to_uppercase().replace('-', "_"));
    if let Ok(p) = std::env::var(&var) {
        return PathBuf::from(p);
    }
    // target/<profile>/deps/<test-exe> → target/<profile>/<name>
    let exe = std::env::current_exe().unwrap_or_default();
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_default();
    profile_dir.join(name)
}

/// A data directory with a PKI made by `devgate init`.
#[derive(Debug)]
pub struct DataDir {
    /// Keeps the directory alive.
    pub dir: tempfile::TempDir,
    /// Root fingerprint as printed by `devgate init`.
    pub fingerprint: String,
    /// The manager pairing token printed by `devgate init`.
    pub pairing_token: String,
}

impl DataDir {
    /// Runs `devgate init --name localhost,127.0.0.1`.
    pub fn init() -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let out = Command::new(binary("devgate"))
            .args(["init", "--data-dir"])
            .arg(dir.path())
            .args(["--name", "localhost,127.0.0.1"])
            .output()
            .context("running devgate init (is the binary built? run `cargo xtask test`)")?;
        if !out.status.success() {
            bail!(
                "devgate init failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let stdout = String::from_utf8_lossy(&out.stdout);
        let fingerprint = stdout
            .lines()
            .find_map(|l| l.strip_prefix("Root fingerprint: "))
            .context("no fingerprint line")?
            .to_owned();
        let pairing_token = stdout
            .lines()
            .find_map(|l| {
                l.split_once("token (one use, valid 7 days): ")
                    .map(|(_, t)| t)
            })
            .context("no pairing token line")?
            .to_owned();
        Ok(Self {
            dir,
            fingerprint,
            pairing_token,
        })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// Runs `devgate ARGS…` to completion; returns (exit success, stdout, stderr).
pub fn devgate(args: &[&str]) -> Result<(bool, String, String)> {
    let out = Command::new(binary("devgate")).args(args).output()?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// A running gateway process.
#[derive(Debug)]
pub struct Gateway {
    child: Child,
    /// Public TLS address.
    pub addr: SocketAddr,
    /// Admin address.
    pub admin: SocketAddr,
    /// Its data directory.
    pub data: DataDir,
    logs: Arc<Mutex<String>>,
    roots: Vec<rustls_pki_types::CertificateDer<'static>>,
    device_ca: Arc<ClientCa>,
    /// The network namespace it runs in, if not the test's own.
    netns: Option<String>,
}

/// The trust anchors a client of `data` uses.
pub fn roots(data: &Path) -> Result<Vec<rustls_pki_types::CertificateDer<'static>>> {
    Ok(devgate_pki::load_certs(&PkiPaths::new(data).root_cert())?)
}

impl Gateway {
    /// Starts a gateway with the given TOML configuration appended to the test defaults.
    pub fn start(config: &str) -> Result<Self> {
        Self::start_in(DataDir::init()?, config)
    }

    /// Starts a gateway on an existing data directory.
    pub fn start_in(data: DataDir, config: &str) -> Result<Self> {
        Self::start_in_env(data, config, &[])
    }

    /// Starts a gateway on an existing data directory with extra environment variables
    /// (e.g. `NOTIFY_SOCKET`, `DEVGATE_LIMITS__DEVICE_LIMIT`).
    pub fn start_in_env(data: DataDir, config: &str, env: &[(&str, &str)]) -> Result<Self> {
        let text =
            format!("listen = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\nworkers = 2\n{config}\n");
        Self::spawn(data, &text, None, env, &[], None)
    }

    /// Like [`Gateway::start_in`] with extra `devgate serve` arguments.
    pub fn start_with_args(data: DataDir, config: &str, args: &[&str]) -> Result<Self> {
        let text =
            format!("listen = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\nworkers = 2\n{config}\n");
        Self::spawn(data, &text, None, &[], args, None)
    }

    /// Like [`Gateway::start`] in a process whose `RLIMIT_NOFILE` (soft and hard) is
    /// `nofile`, as on a machine with a low descriptor limit.
    pub fn start_with_nofile(config: &str, nofile: u64) -> Result<Self> {
        let text =
            format!("listen = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\nworkers = 2\n{config}\n");
        Self::spawn(DataDir::init()?, &text, None, &[], &[], Some(nofile))
    }

    /// Starts a gateway inside network namespace `ns` (`ip netns exec`) with the whole
    /// configuration file `config` (it must set `listen` and `admin`). The admin
    /// listener is reached from inside the namespace; clients must connect from a
    /// namespace that routes to the listener (see [`netns::block_on_in`]).
    pub fn start_in_netns(data: DataDir, ns: &str, config: &str) -> Result<Self> {
        Self::spawn(data, config, Some(ns), &[], &[], None)
    }

    fn spawn(
        data: DataDir,
        text: &str,
        netns: Option<&str>,
        env: &[(&str, &str)],
        args: &[&str],
        nofile: Option<u64>,
    ) -> Result<Self> {
        let cfg_path = data.path().join("devgate.toml");
        std::fs::write(&cfg_path, text)?;
        let mut command = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(binary("devgate"));
                c
            }
            None => Command::new(binary("devgate")),
        };
        if let Some(limit) = nofile {
            use std::os::unix::process::CommandExt;
            // SAFETY: only setrlimit (async-signal-safe) runs between fork and exec.
            unsafe {
                command.pre_exec(move || {
                    let lim = libc::rlimit {
                        rlim_cur: limit,
                        rlim_max: limit,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let mut child = command
            .arg("serve")
            .arg("--data-dir")
            .arg(data.path())
            .arg("--config")
            .arg(&cfg_path)
            .args(args)
            .env("DEVGATE_LOG", "info")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting devgate serve")?;
        let stderr = child.stderr.take().context("no stderr")?;
        let logs = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        {
            let logs = logs.clone();
            std::thread::spawn(move || {
                let mut tx = Some(tx);
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    if line.contains("serving")
                        && line.contains("listen=")
                        && let Some(tx) = tx.take()
                    {
                        let _ = tx.send(line.clone());
                    }
                    if let Ok(mut l) = logs.lock() {
                        l.push_str(&line);
                        l.push('\n');
                    }
                }
            });
        }
        let line = match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(line) => line,
            Err(_) => {
                let _ = child.kill();
                let logs = logs.lock().map(|l| l.clone()).unwrap_or_default();
                bail!("gateway did not start within 20 s; its log:\n{logs}");
            }
        };
        let field = |name: &str| -> Result<SocketAddr> {
            let start = line
                .find(&format!("{name}="))
                .with_context(|| format!("no {name}= in {line}"))?;
            let rest = &line[start + name.len() + 1..];
            let end = rest.find(' ').unwrap_or(rest.len());
            Ok(rest[..end].parse()?)
        };
        let addr = field("listen")?;
        let admin = field("admin")?;
        let paths = PkiPaths::new(data.path());
        let device_ca = Arc::new(ClientCa::load(
            &paths.device_ca_cert(),
            &paths.device_ca_key(),
        )?);
        let roots = roots(data.path())?;
        Ok(Self {
            child,
            addr,
            admin,
            data,
            logs,
            roots,
            device_ca,
            netns: netns.map(str::to_owned),
        })
    }

    /// The gateway's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the gateway logged so far.
    pub fn logs(&self) -> String {
        self.logs.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// Waits until the log contains `needle`.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.logs().contains(needle) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// TLS configuration of the first manager (`pki/manager.pem`).
    pub fn manager_tls(&self) -> Result<Arc<ClientConfig>> {
        let paths = PkiPaths::new(self.data.path());
        let chain = devgate_pki::load_certs(&paths.manager_cert())?;
        let key = devgate_pki::load_key(&paths.manager_key())?;
        Ok(tls_config(&self.roots, Some((chain, key)))?)
    }

    /// TLS configuration of a device with a freshly issued certificate.
    pub fn device_tls(&self, unit: &str) -> Result<Arc<ClientConfig>> {
        let issued = self.device_ca.issue_device(unit)?;
        Ok(tls_config(&self.roots, Some((issued.chain, issued.key)))?)
    }

    /// A freshly issued device certificate chain and key for `unit`.
    pub fn device_identity(
        &self,
        unit: &str,
    ) -> Result<(
        Vec<rustls_pki_types::CertificateDer<'static>>,
        rustls_pki_types::PrivateKeyDer<'static>,
    )> {
        let issued = self.device_ca.issue_device(unit)?;
        Ok((issued.chain, issued.key))
    }

    /// The manager certificate chain and key (`pki/manager.pem`).
    pub fn manager_identity(
        &self,
    ) -> Result<(
        Vec<rustls_pki_types::CertificateDer<'static>>,
        rustls_pki_types::PrivateKeyDer<'static>,
    )> {
        let paths = PkiPaths::new(self.data.path());
        Ok((
            devgate_pki::load_certs(&paths.manager_cert())?,
            devgate_pki::load_key(&paths.manager_key())?,
        ))
    }

    /// The trust anchors its clients use.
    pub fn client_roots(&self) -> &[rustls_pki_types::CertificateDer<'static>] {
        &self.roots
    }

    /// TLS configuration without a client certificate.
    pub fn anonymous_tls(&self) -> Result<Arc<ClientConfig>> {
        Ok(tls_config(&self.roots, None)?)
    }

    /// Connection options for `role`.
    pub fn options(&self, role: Role) -> ConnectOptions {
        ConnectOptions::new(self.addr, "localhost", role)
    }

    /// Connects the first manager.
    pub async fn manager(&self) -> Result<Connection> {
        Ok(devgate_client::connect(&self.options(Role::Manager), self.manager_tls()?).await?)
    }

    /// Connects a device with a new certificate for `unit`.
    pub async fn device(&self, unit: &str) -> Result<Connection, ClientError> {
        let tls = self
            .device_tls(unit)
            .map_err(|e| ClientError::Config(e.to_string()))?;
        devgate_client::connect(&self.options(Role::Device), tls).await
    }

    /// GET on the admin listener; returns status and body.
    pub fn admin_get(&self, path: &str) -> Result<(u16, String)> {
        let mut s = match &self.netns {
            Some(ns) => netns::in_netns(ns, || Ok(TcpStream::connect(self.admin)?))?,
            None => TcpStream::connect(self.admin)?,
        };
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        )?;
        let mut resp = String::new();
        s.read_to_string(&mut resp)?;
        let status: u16 = resp.split(' ').nth(1).context("no status")?.parse()?;
        let body = resp
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        Ok((status, body))
    }

    /// `/v1/status` as JSON.
    pub fn status(&self) -> Result<serde_json::Value> {
        let (_, body) = self.admin_get("/v1/status")?;
        Ok(serde_json::from_str(&body)?)
    }

    /// Resident set size of the gateway process in KiB.
    pub fn rss_kib(&self) -> Result<u64> {
        rss_kib(self.pid())
    }

    /// Kills the process with SIGKILL (a crash) and waits for it.
    pub fn kill9(mut self) -> Result<DataDir> {
        self.child.kill()?;
        self.child.wait()?;
        // Move the data dir out; Drop then has nothing left to kill.
        let data = std::mem::replace(
            &mut self.data,
            DataDir {
                dir: tempfile::tempdir()?,
                fingerprint: String::new(),
                pairing_token: String::new(),
            },
        );
        Ok(data)
    }

    /// Sends SIGHUP (reload).
    pub fn reload(&self) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGHUP);
        }
    }

    /// The data dir path as a string (for CLI arguments).
    pub fn data_arg(&self) -> String {
        self.data.path().display().to_string()
    }

    /// Sends SIGTERM and waits for the process to exit; returns its exit code.
    pub fn stop(mut self) -> Result<Option<i32>> {
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status.code());
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                bail!("gateway did not exit within 15 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// VmRSS of a process in KiB.
pub fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .context("no VmRSS")?;
    Ok(line
        .split_whitespace()
        .nth(1)
        .context("bad VmRSS")?
        .parse()?)
}
