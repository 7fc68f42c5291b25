//! The agent's configuration file (TOML): where its state is, and the allow-lists of what a
//! manager may run and open on this device. Nothing that is not listed here is run or
//! connected.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::Deserialize;

/// Default state directory (credential, trust bundle, gateway address).
pub(crate) const DEFAULT_STATE_DIR: &str = "/var/lib/devgate-agent";
/// Default configuration file.
pub(crate) const DEFAULT_CONFIG: &str = "/etc/devgate/agent.toml";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Config {
    /// Where `devgate-agent enroll` stored the credential.
    #[serde(default = "default_state_dir")]
    pub(crate) state_dir: PathBuf,
    /// HTTP proxy (CONNECT) to reach the gateway through, `http://[user:pass@]host:port`;
    /// absent: `HTTPS_PROXY`. `NO_PROXY` bypasses either (`crate::proxy`).
    pub(crate) proxy: Option<String>,
    /// Commands a manager may run: name → what to run.
    #[serde(default)]
    pub(crate) commands: BTreeMap<String, CommandSpec>,
    /// The terminal (`pty` streams); absent: refused.
    pub(crate) pty: Option<PtySpec>,
    /// TCP targets (`tcp:HOST:PORT` streams).
    #[serde(default)]
    pub(crate) tcp: TcpSpec,
    /// File transfer (`file-put` / `file-get` streams).
    #[serde(default)]
    pub(crate) files: FilesSpec,
}

fn default_state_dir() -> PathBuf {
    PathBuf::from(DEFAULT_STATE_DIR)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CommandSpec {
    /// Program and arguments, run directly (no shell).
    pub(crate) argv: Vec<String>,
    /// Seconds before the command is killed.
    #[serde(default = "default_timeout")]
    pub(crate) timeout_secs: u64,
    /// Bytes of stdout and of stderr kept each; the rest is dropped and the answer says so.
    #[serde(default = "default_max_output")]
    pub(crate) max_output_bytes: usize,
    /// Whether the manager may append arguments.
    #[serde(default)]
    pub(crate) allow_args: bool,
}

fn default_timeout() -> u64 {
    30
}

fn default_max_output() -> usize {
    MAX_OUTPUT
}

/// Largest output kept per stream: JSON escaping may grow a byte to six, and stdout and
/// stderr share one Response frame of at most 1 MiB.
const MAX_OUTPUT: usize = 64 * 1024;

impl CommandSpec {
    pub(crate) fn timeout(&self) -> Duration {
        Duration::from_secs(self.timeout_secs)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PtySpec {
    /// The shell to run on the terminal.
    #[serde(default = "default_shell")]
    pub(crate) shell: String,
    /// Its arguments.
    #[serde(default)]
    pub(crate) args: Vec<String>,
    /// Run it as this user (the agent must run as root for that); absent: the agent's user.
    pub(crate) user: Option<String>,
    /// TERM when the manager sends none.
    #[serde(default = "default_term")]
    pub(crate) term: String,
}

fn default_shell() -> String {
    "/bin/sh".into()
}

fn default_term() -> String {
    "xterm-256color".into()
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TcpSpec {
    /// `HOST:PORT` targets a manager may connect to, exactly as they appear in the open
    /// parameters (`127.0.0.1:22`, `[::1]:5900`, `printer.lan:80`).
    #[serde(default)]
    pub(crate) allow: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FilesSpec {
    /// Directories a manager may put files into (absolute). A bare file name goes into the
    /// first; an absolute name must be a file directly inside one of them.
    #[serde(default)]
    pub(crate) receive_dirs: Vec<PathBuf>,
    /// Files a manager may get (absolute); an entry ending in `/` allows every file below
    /// that directory.
    #[serde(default)]
    pub(crate) send: Vec<String>,
}

impl Config {
    pub(crate) fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| {
            format!(
                "reading the agent configuration {} (create it, see docs/OPERATIONS.md \
                 \"Remote access\", or pass --config)",
                path.display()
            )
        })?;
        let config: Self = toml::from_str(&text)
            .with_context(|| format!("the agent configuration {} is invalid", path.display()))?;
        config.check()?;
        Ok(config)
    }

    fn check(&self) -> Result<()> {
        if let Some(url) = &self.proxy {
            crate::proxy::check(url, "proxy")?;
        }
        for (name, spec) in &self.commands {
            if spec.argv.is_empty() {
                bail!("command {name:?}: argv is empty; give the program and its arguments");
            }
            if spec.timeout_secs == 0 {
                bail!("command {name:?}: timeout_secs must be at least 1");
            }
            if spec.max_output_bytes > MAX_OUTPUT {
                bail!(
                    "command {name:?}: max_output_bytes is at most {MAX_OUTPUT} (the answer, \
                     stdout and stderr escaped as JSON, must fit one 1 MiB frame)"
                );
            }
        }
        for target in &self.tcp.allow {
            let ok = match target.rsplit_once(':') {
                Some((host, port)) => !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0),
                None => false,
            };
            if !ok {
                bail!("tcp.allow entry {target:?} is not HOST:PORT (e.g. 127.0.0.1:22)");
            }
        }
        for dir in &self.files.receive_dirs {
            if !dir.is_absolute() {
                bail!(
                    "files.receive_dirs entry {} is not an absolute path",
                    dir.display()
                );
            }
        }
        for path in &self.files.send {
            if !path.starts_with('/') {
                bail!("files.send entry {path:?} is not an absolute path");
            }
        }
        Ok(())
    }

    /// Whether `host:port` (as the manager asked for it) is on the allow-list. Addresses are
    /// compared as addresses (so `127.0.0.1:22` matches however it is written), names as
    /// written.
    pub(crate) fn tcp_allowed(&self, host: &str, port: u16) -> bool {
        let asked = join_host_port(host, port);
        let asked_addr: Option<SocketAddr> = asked.parse().ok();
        self.tcp.allow.iter().any(|t| {
            t.eq_ignore_ascii_case(&asked)
                || (asked_addr.is_some() && t.parse::<SocketAddr>().ok() == asked_addr)
        })
    }
}

/// `host:port`, with brackets around an IPv6 host.
pub(crate) fn join_host_port(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}
