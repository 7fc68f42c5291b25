//! Operator commands that talk to a running gateway or to the system: `devgate status`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Subcommand;

/// Operations subcommands (flattened into the top-level `devgate` command).
#[derive(Subcommand, Debug)]
pub enum OpsCommand {
    /// Print a one-screen summary of a running gateway (from its admin listener).
    Status {
        /// Admin listener address.
        #[arg(long, env = "DEVGATE_ADMIN", default_value = "127.0.0.1:9180")]
        admin: SocketAddr,
    },
}

/// Runs an operations subcommand.
pub fn run(cmd: OpsCommand) -> Result<()> {
    match cmd {
        OpsCommand::Status { admin } => {
            let body = admin_get(admin, "/v1/status")?;
            let v: serde_json::Value =
                serde_json::from_str(&body).context("the admin listener returned invalid JSON")?;
            print!("{}", summary(&v));
            Ok(())
        }
    }
}

/// GET `path` on the admin listener; returns the body.
pub fn admin_get(admin: SocketAddr, path: &str) -> Result<String> {
    let mut s = TcpStream::connect_timeout(&admin, Duration::from_secs(3)).with_context(|| {
        format!(
            "cannot reach the admin listener at {admin}: is devgate running, and is --admin right?"
        )
    })?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let (head, body) = resp
        .split_once("\r\n\r\n")
        .context("malformed admin response")?;
    if !head.starts_with("HTTP/1.1 200") {
        anyhow::bail!(
            "admin listener answered: {}",
            head.lines().next().unwrap_or(head)
        );
    }
    Ok(body.to_owned())
}

/// The human summary of a status document.
pub fn summary(v: &serde_json::Value) -> String {
    let s = |k: &str| v[k].to_string().trim_matches('"').to_owned();
    format!(
        "devgate {}  status {}  up {} s\n\
         data path {}  TLS {}  XDP {}\n\
         devices {}  managers {}  connections {}  device limit {}\n",
        s("version"),
        s("check_status"),
        s("uptime_secs"),
        s("data_path"),
        s("tls_offload"),
        v["xdp"]["mode"].to_string().trim_matches('"'),
        s("devices"),
        s("managers"),
        s("connections"),
        v["limits"]["device_limit"],
    )
}
