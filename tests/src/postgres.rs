//! A throwaway PostgreSQL server for the fleet tests: Debian's `postgresql` binaries
//! (installed by scripts/setup.sh), a cluster made by `initdb` in a temp dir, listening on
//! a free loopback port and on a unix socket in that dir. PostgreSQL refuses to run as
//! root, so as root the server runs as the `postgres` user (`runuser`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// The user the cluster is created for (trust authentication on loopback only).
const USER: &str = "devgate";

/// A running (or stopped) test cluster; dropped, it is stopped and deleted.
#[derive(Debug)]
pub struct Postgres {
    bin: PathBuf,
    dir: tempfile::TempDir,
    port: u16,
    running: bool,
}

/// Where Debian installs the server binaries (`/usr/lib/postgresql/<major>/bin`), newest
/// major first.
fn find_bin() -> Option<PathBuf> {
    let mut majors: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|e| {
            let major = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("postgres").exists().then_some((major, bin))
        })
        .collect();
    majors.sort();
    majors.pop().map(|(_, bin)| bin)
}

/// Runs `f` on a thread of its own: the sync PostgreSQL client starts a runtime of its own,
/// which panics on a thread that already drives one (an async test).
fn off_runtime<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| match s.spawn(f).join() {
        Ok(v) => v,
        Err(panic) => std::panic::resume_unwind(panic),
    })
}

/// Whether the server at `url` accepts a connection.
fn ping(url: &str) -> Result<()> {
    off_runtime(|| postgres::Client::connect(url, postgres::NoTls).map(drop))
        .context("connecting to the test PostgreSQL")
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

impl Postgres {
    /// Why the fleet tests cannot run here, if they cannot.
    pub fn missing() -> Option<String> {
        if find_bin().is_none() {
            return Some(
                "PostgreSQL server binaries not found in /usr/lib/postgresql/*/bin (scripts/setup.sh installs Debian's postgresql)".into(),
            );
        }
        if is_root()
            && !Command::new("id")
                .arg("postgres")
                .output()
                .is_ok_and(|o| o.status.success())
        {
            return Some(
                "running as root but there is no postgres user to run the server as".into(),
            );
        }
        None
    }

    /// Creates and starts a cluster.
    pub fn start() -> Result<Self> {
        let bin = find_bin().context("PostgreSQL binaries not found (run scripts/setup.sh)")?;
        let dir = tempfile::Builder::new().prefix("devgate-pg").tempdir()?;
        if is_root() {
            let status = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir.path())
                .status()?;
            if !status.success() {
                bail!("chown of {} to postgres failed", dir.path().display());
            }
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let pg = Self {
            bin,
            dir,
            port,
            running: false,
        };
        let data = pg.data_dir();
        let out = pg
            .command("initdb")
            .arg("-D")
            .arg(&data)
            .args(["-U", USER, "--auth=trust", "--no-sync", "-E", "UTF8"])
            .output()?;
        if !out.status.success() {
            bail!("initdb failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let mut pg = pg;
        pg.resume()?;
        Ok(pg)
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn command(&self, tool: &str) -> Command {
        let exe = self.bin.join(tool);
        if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(exe);
            c
        } else {
            Command::new(exe)
        }
    }

    /// The loopback port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The directory of its unix socket.
    pub fn socket_dir(&self) -> &Path {
        self.dir.path()
    }

    /// A URL for database `db` over TCP.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://{USER}@127.0.0.1:{}/{db}", self.port)
    }

    /// Creates database `name` (empty) and returns its URL.
    pub fn create_db(&self, name: &str) -> Result<String> {
        let url = self.url("postgres");
        off_runtime(|| -> Result<()> {
            let mut admin = postgres::Client::connect(&url, postgres::NoTls)
                .context("connecting to the test PostgreSQL")?;
            admin.batch_execute(&format!("CREATE DATABASE \"{name}\""))?;
            Ok(())
        })?;
        Ok(self.url(name))
    }

    /// Stops the server (fast shutdown: sessions are cut, as in an outage).
    pub fn stop(&mut self) -> Result<()> {
        let out = self
            .command("pg_ctl")
            .arg("-D")
            .arg(self.data_dir())
            .args(["stop", "-m", "fast", "-w", "-t", "30"])
            .output()?;
        if !out.status.success() {
            bail!(
                "pg_ctl stop failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        self.running = false;
        Ok(())
    }

    /// Starts the (stopped) server again on the same port and data.
    pub fn resume(&mut self) -> Result<()> {
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c max_connections=200",
            self.port,
            self.dir.path().display()
        );
        let out = self
            .command("pg_ctl")
            .arg("-D")
            .arg(self.data_dir())
            .args(["-o", &opts, "-l"])
            .arg(self.dir.path().join("server.log"))
            .args(["start", "-w", "-t", "30"])
            .output()?;
        if !out.status.success() {
            bail!(
                "pg_ctl start failed: {}{}",
                String::from_utf8_lossy(&out.stderr),
                std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
            );
        }
        self.running = true;
        // `-w` waits for the postmaster; make sure connections are accepted.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match ping(&self.url("postgres")) {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() > deadline => {
                    bail!("PostgreSQL did not accept connections: {e}")
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }
}

impl Postgres {
    /// Turns TLS on with this certificate chain and key (PEM), by reloading the server;
    /// plain connections keep working (`pg_hba` trusts both).
    pub fn enable_tls(&self, cert_pem: &str, key_pem: &str) -> Result<()> {
        let data = self.data_dir();
        std::fs::write(data.join("server.crt"), cert_pem)?;
        std::fs::write(data.join("server.key"), key_pem)?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(
            data.join("server.key"),
            std::fs::Permissions::from_mode(0o600),
        )?;
        if is_root() {
            let status = Command::new("chown")
                .arg("postgres:postgres")
                .arg(data.join("server.crt"))
                .arg(data.join("server.key"))
                .status()?;
            if !status.success() {
                bail!("chown of the server certificate to postgres failed");
            }
        }
        let mut conf = std::fs::OpenOptions::new()
            .append(true)
            .open(data.join("postgresql.conf"))?;
        std::io::Write::write_all(&mut conf, b"\nssl = on\n")?;
        let out = self
            .command("pg_ctl")
            .arg("-D")
            .arg(&data)
            .arg("reload")
            .output()?;
        if !out.status.success() {
            bail!("pg_ctl reload: {}", String::from_utf8_lossy(&out.stderr));
        }
        // The reload is asynchronous: wait until the server says TLS is on.
        let url = self.url("postgres");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let on = off_runtime(|| -> Result<bool> {
                let mut c = postgres::Client::connect(&url, postgres::NoTls)?;
                let row = c.query_one("SHOW ssl", &[])?;
                Ok(row.get::<_, String>(0) == "on")
            })?;
            if on {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "PostgreSQL did not turn TLS on; its log:\n{}",
                    std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Whether every connection of `application_name` uses TLS, and how many there are.
    pub fn tls_connections(&self, application_name: &str) -> Result<(i64, i64)> {
        let url = self.url("postgres");
        off_runtime(|| -> Result<(i64, i64)> {
            let mut c = postgres::Client::connect(&url, postgres::NoTls)?;
            let row = c.query_one(
                "SELECT count(*), count(*) FILTER (WHERE s.ssl) FROM pg_stat_activity a \
                 JOIN pg_stat_ssl s USING (pid) WHERE a.application_name = $1",
                &[&application_name],
            )?;
            Ok((row.get(0), row.get(1)))
        })
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if self.running {
            let _ = self
                .command("pg_ctl")
                .arg("-D")
                .arg(self.data_dir())
                .args(["stop", "-m", "immediate", "-w", "-t", "10"])
                .output();
        }
    }
}
