//! Operations: what an operator runs against a gateway or a machine, and what makes the
//! gateway behave like a well-made Linux daemon.
//!
//! - `devgate status` (here): a one-screen summary of a running gateway, read from its
//!   admin listener's `/v1/status`.
//! - [`install`]: `devgate install` / `devgate uninstall` (systemd unit, user, config).
//! - [`notify`]: the systemd notification protocol (READY, WATCHDOG, RELOADING, STOPPING).
//! - [`watchdog`]: READY once the data path runs; watchdog pings only while every worker's
//!   loop heartbeat is fresh.
//! - [`logging`]: plain or JSON log lines, journald priorities under systemd.
//! - [`ratelimit`]: [`warn_limited!`](crate::warn_limited) for repetitive data-path warnings.
//! - [`memory`]: freed memory given back to the OS after a large drop in connections.

pub mod install;
pub mod logging;
pub mod memory;
pub mod notify;
pub mod ratelimit;
pub mod shutdown;
pub mod watchdog;

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Subcommand;
use serde_json::Value;

/// Operations subcommands (flattened into the top-level `devgate` command).
#[derive(Subcommand, Debug)]
pub enum OpsCommand {
    /// Print a one-screen summary of a running gateway (from its admin listener).
    Status {
        /// Admin listener address (default: `admin` from /etc/devgate/devgate.toml if
        /// present, else 127.0.0.1:9180).
        #[arg(long, env = "DEVGATE_ADMIN")]
        admin: Option<SocketAddr>,
        /// Print the raw `/v1/status` JSON instead.
        #[arg(long)]
        json: bool,
        /// Bearer token for an admin listener that requires one (default:
        /// `admin_token_file` of the configuration, else DATA_DIR/admin.token, if readable).
        #[arg(long, value_name = "FILE")]
        token_file: Option<PathBuf>,
        /// State directory whose admin.token to send.
        #[arg(long, env = "DEVGATE_DATA_DIR")]
        data_dir: Option<PathBuf>,
    },
    /// Create the admin listener's bearer token (DATA_DIR/admin.token, mode 0600) if there
    /// is none, and print its path. An admin listener off loopback requires it.
    AdminToken {
        /// State directory.
        #[arg(long, env = "DEVGATE_DATA_DIR")]
        data_dir: PathBuf,
        /// Replace an existing token (restart the gateway, then update Prometheus).
        #[arg(long)]
        rotate: bool,
    },
    /// Install devgate as a systemd service: binary in /usr/local/bin, user `devgate`,
    /// /etc/devgate/devgate.toml (kept if present), the unit; enables and starts it.
    /// Idempotent.
    Install(install::InstallOpts),
    /// Remove the service installed by `devgate install`; keeps /var/lib/devgate and
    /// /etc/devgate unless --purge. Idempotent.
    Uninstall(install::UninstallOpts),
}

/// Runs an operations subcommand.
pub fn run(cmd: OpsCommand) -> Result<()> {
    match cmd {
        OpsCommand::Status {
            admin,
            json,
            token_file,
            data_dir,
        } => {
            let admin = admin.unwrap_or_else(default_admin);
            let token = status_token(token_file, data_dir)?;
            let body = admin_get(admin, "/v1/status", token.as_deref())?;
            let v: Value =
                serde_json::from_str(&body).context("the admin listener returned invalid JSON")?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print!("{}", summary(&v));
            }
            Ok(())
        }
        OpsCommand::AdminToken { data_dir, rotate } => {
            let path = data_dir.join(crate::config::ADMIN_TOKEN_FILE);
            let created = crate::admin_token::create_token(&path, rotate)?;
            println!(
                "{} {} (mode 0600); clients send it as `Authorization: Bearer <token>`{}",
                if created { "wrote" } else { "kept" },
                path.display(),
                if created && rotate {
                    "; restart the gateway to use it"
                } else {
                    ""
                }
            );
            Ok(())
        }
        OpsCommand::Install(opts) => install::install(&opts),
        OpsCommand::Uninstall(opts) => install::uninstall(&opts),
    }
}

/// The admin address an operator most likely means: the configured one (connecting to
/// loopback if it listens on all addresses), or the default.
fn default_admin() -> SocketAddr {
    let configured = crate::config::Config::load_effective(None)
        .map(|(cfg, _)| cfg.admin)
        .unwrap_or_else(|_| crate::config::Config::default().admin);
    if configured.ip().is_unspecified() {
        SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), configured.port())
    } else {
        configured
    }
}

/// The admin token `devgate status` sends: `--token-file` (which must be readable), else
/// the token file of `--data-dir` or of the configuration if this user can read it (a
/// loopback listener needs none, so an unreadable default is no error).
fn status_token(token_file: Option<PathBuf>, data_dir: Option<PathBuf>) -> Result<Option<String>> {
    if let Some(file) = token_file {
        let text = std::fs::read_to_string(&file)
            .with_context(|| format!("cannot read the admin token {}", file.display()))?;
        return Ok(Some(text.trim().to_owned()));
    }
    let path = match data_dir {
        Some(dir) => dir.join(crate::config::ADMIN_TOKEN_FILE),
        None => crate::config::Config::load_effective(None)
            .map(|(cfg, _)| cfg)
            .unwrap_or_default()
            .admin_token_path(),
    };
    Ok(std::fs::read_to_string(path)
        .ok()
        .map(|t| t.trim().to_owned())
        .filter(|t| !t.is_empty()))
}

/// The soft `RLIMIT_NOFILE` of this process.
pub fn nofile_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return 0;
    }
    lim.rlim_cur
}

/// GET `path` on the admin listener (with the bearer token, if given); returns the body.
pub fn admin_get(admin: SocketAddr, path: &str, token: Option<&str>) -> Result<String> {
    let mut s = TcpStream::connect_timeout(&admin, Duration::from_secs(3)).with_context(|| {
        format!(
            "cannot reach the admin listener at {admin}: is devgate running, and is --admin right?"
        )
    })?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let auth = token.map_or_else(String::new, |t| format!("Authorization: Bearer {t}\r\n"));
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\n{auth}Connection: close\r\n\r\n"
    )?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let (head, body) = resp
        .split_once("\r\n\r\n")
        .context("malformed admin response")?;
    if head.starts_with("HTTP/1.1 401") {
        anyhow::bail!(
            "the admin listener at {admin} requires a bearer token and {}: pass --token-file FILE or --data-dir DIR (its admin.token), as a user that can read it",
            if token.is_some() {
                "refused the one sent"
            } else {
                "none was found"
            }
        );
    }
    if !head.starts_with("HTTP/1.1 200") {
        anyhow::bail!(
            "admin listener answered: {}",
            head.lines().next().unwrap_or(head)
        );
    }
    Ok(body.to_owned())
}

/// `12345` → `12,345`.
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

fn num(v: &Value) -> String {
    v.as_u64().map_or_else(|| "?".to_owned(), thousands)
}

fn text(v: &Value) -> &str {
    v.as_str().unwrap_or("?")
}

fn duration(secs: u64) -> String {
    let (d, h, m, s) = (
        secs / 86_400,
        secs % 86_400 / 3_600,
        secs % 3_600 / 60,
        secs % 60,
    );
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m {s:02}s"),
        (0, _, _) => format!("{h}h {m:02}m"),
        _ => format!("{d}d {h:02}h"),
    }
}

fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

fn micros(us: &Value) -> String {
    match us.as_u64() {
        None => "?".to_owned(),
        Some(us) if us < 1_000 => format!("{us} µs"),
        Some(us) if us < 1_000_000 => format!("{} ms", us as f64 / 1_000.0),
        Some(us) => format!("{} s", us as f64 / 1_000_000.0),
    }
}

/// The human summary of a status document: one screen, most important first, and a
/// list of problems at the end. Missing fields print as `?` (an older or newer gateway).
pub fn summary(v: &Value) -> String {
    let mut o = String::new();
    let c = &v["counters"];
    let cu = |k: &str| c[k].as_u64().unwrap_or(0);
    let mut problems: Vec<String> = Vec::new();

    let _ = writeln!(
        o,
        "devgate {}  status {}  up {}  pid {}{}",
        text(&v["version"]),
        text(&v["check_status"]).to_uppercase(),
        v["uptime_secs"]
            .as_u64()
            .map_or_else(|| "?".into(), duration),
        v["pid"]
            .as_u64()
            .map_or_else(|| "?".into(), |p| p.to_string()),
        if v["shutting_down"].as_bool() == Some(true) {
            "  (shutting down)"
        } else {
            ""
        },
    );
    let _ = writeln!(
        o,
        "  listen {}  admin {}  workers {} (+{} for handshakes)",
        text(&v["listen"]),
        text(&v["admin"]),
        num(&v["workers"]),
        num(&v["handshake_workers"]),
    );
    let tls = match v["tls_offload"].as_str() {
        Some("user") => "user space (rustls)".to_owned(),
        Some("ktls") | Some("kernel") => "kTLS".to_owned(),
        other => other.unwrap_or("?").to_owned(),
    };
    let mut xdp = text(&v["xdp"]["mode"]).to_owned();
    if let Some(reason) = v["xdp"]["reason"].as_str() {
        let _ = write!(xdp, " ({reason})");
    }
    let _ = writeln!(
        o,
        "  data path {}  TLS {}  XDP {}",
        text(&v["data_path"]),
        tls,
        xdp
    );
    if let Some(obj) = v["xdp"].as_object() {
        let counts: Vec<String> = obj
            .iter()
            .filter_map(|(k, x)| x.as_u64().map(|n| format!("{k} {}", thousands(n))))
            .collect();
        if !counts.is_empty() {
            let _ = writeln!(o, "  XDP counters: {}", counts.join(", "));
        }
    }
    let limit = match v["limits"]["device_limit"].as_u64() {
        Some(0) => "unlimited".to_owned(),
        Some(n) => thousands(n),
        None => "?".to_owned(),
    };
    let _ = writeln!(
        o,
        "  devices {} (limit {})  managers {}  sockets {} of {}",
        num(&v["devices"]),
        limit,
        num(&v["managers"]),
        num(&v["connections"]),
        num(&v["limits"]["max_connections"]),
    );
    let _ = writeln!(
        o,
        "  handshakes {} ok, {} failed (tls {}, timeout {})  refused: device limit {}, no manager {}, max connections {}, guard {}",
        thousands(cu("handshakes_ok")),
        thousands(cu("handshakes_failed_tls") + cu("handshakes_failed_timeout")),
        thousands(cu("handshakes_failed_tls")),
        thousands(cu("handshakes_failed_timeout")),
        thousands(cu("rejected_device_limit")),
        thousands(cu("rejected_no_manager")),
        thousands(cu("refused_max_connections")),
        thousands(cu("refused_by_guard")),
    );
    let _ = writeln!(
        o,
        "  frames in {} / out {}  bytes in {} / out {}  queue full {}  slow consumers {}",
        thousands(cu("frames_from_devices") + cu("frames_from_managers")),
        thousands(cu("frames_to_devices") + cu("frames_to_managers")),
        bytes(cu("bytes_in")),
        bytes(cu("bytes_out")),
        thousands(cu("queue_full")),
        thousands(cu("slow_consumers")),
    );
    let rt = &v["latency"]["device_response"];
    if rt["count"].as_u64().unwrap_or(0) > 0 {
        let _ = writeln!(
            o,
            "  command round trip at the gateway: p50 ≤ {}, p99 ≤ {} ({} answered, {} timed out)",
            micros(&rt["p50_le_us"]),
            micros(&rt["p99_le_us"]),
            num(&rt["count"]),
            thousands(cu("request_timeouts")),
        );
    }
    if let Some(certs) = v["certificates"].as_array() {
        let parts: Vec<String> = certs
            .iter()
            .map(|cert| {
                let days = cert["expires_in_days"].as_i64();
                let role = text(&cert["role"]);
                if let Some(d) = days
                    && d < 30
                    && (role == "server" || role == "root")
                {
                    problems.push(format!(
                        "the {role} certificate expires in {d} days ({})",
                        text(&cert["not_after"])
                    ));
                }
                format!(
                    "    {role:<10} {:<28} until {} ({} days)",
                    format!("\"{}\"", text(&cert["subject"])),
                    text(&cert["not_after"]).get(..10).unwrap_or("?"),
                    days.map_or_else(|| "?".to_owned(), |d| d.to_string()),
                )
            })
            .collect();
        let _ = writeln!(o, "  certificates:");
        for p in parts {
            let _ = writeln!(o, "{p}");
        }
    }
    let store = &v["store"];
    let _ = writeln!(
        o,
        "  store {} {}: {}{}",
        text(&store["kind"]),
        // The shared store is somewhere else than the data dir: say where.
        if store["kind"] == "postgres" {
            text(&store["database"])
        } else {
            text(&store["data_dir"])
        },
        match store["ok"].as_bool() {
            Some(true) => "ok",
            Some(false) => "PROBLEM",
            None => "?",
        },
        store["free_bytes"]
            .as_u64()
            .map_or_else(String::new, |b| format!(", {} free", bytes(b))),
    );
    if let Some(list) = store["problems"].as_array() {
        problems.extend(list.iter().map(|p| format!("store: {}", text(p))));
    }
    let rx = &v["root_exchange"];
    if rx.is_object() {
        let managers = rx["managers_acked"].as_array().map_or(0, Vec::len);
        let _ = writeln!(
            o,
            "  root exchange: {} of {} devices have the new root, {managers} manager(s) acknowledged",
            num(&rx["devices_acked"]),
            num(&rx["devices_total"]),
        );
    }
    let wd = &v["watchdog"];
    let _ = writeln!(
        o,
        "  watchdog {}  oldest worker heartbeat {} ms ago",
        match wd["interval_ms"].as_u64() {
            Some(ms) => format!(
                "every {} s ({} pings, {} withheld)",
                ms / 1000,
                num(&wd["pings"]),
                num(&wd["withheld"])
            ),
            None if wd["notify_socket"].as_bool() == Some(true) => {
                "off (systemd: notify only)".to_owned()
            }
            None => "off (not under systemd)".to_owned(),
        },
        num(&wd["oldest_heartbeat_age_ms"]),
    );
    if let Some(secs) = v["grace"]["without_manager_secs"].as_u64() {
        if v["grace"]["devices_refused"].as_bool() == Some(true) {
            problems.push(format!(
                "no manager for {}: devices are being refused (grace period over)",
                duration(secs)
            ));
        } else if v["check_status"].as_str() == Some("warn") {
            problems.push(format!("no manager connected for {}", duration(secs)));
        }
    }
    if v["check_status"].as_str() == Some("err") {
        problems.push(
            "check-status is err: the server certificate is outside its validity dates, or start-up hung"
                .to_owned(),
        );
    }
    if wd["withheld"].as_u64().unwrap_or(0) > 0 {
        problems.push("the watchdog withheld pings: a data-path worker stalled".to_owned());
    }
    if problems.is_empty() {
        let _ = writeln!(o, "  no problems");
    } else {
        for p in problems {
            let _ = writeln!(o, "  ! {p}");
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_readable() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1_000), "1,000");
        assert_eq!(thousands(1_048_512), "1,048,512");
        assert_eq!(duration(59), "59s");
        assert_eq!(duration(3_725), "1h 02m");
        assert_eq!(duration(90_000), "1d 01h");
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(1536), "1.5 KiB");
    }

    #[test]
    fn summary_of_an_empty_document_does_not_panic() {
        let s = summary(&serde_json::json!({}));
        assert!(s.starts_with("devgate ?"), "{s}");
    }

    #[test]
    fn summary_flags_problems() {
        let v = serde_json::json!({
            "version": "0.1.0", "check_status": "warn", "uptime_secs": 100,
            "grace": { "without_manager_secs": 40, "devices_refused": false },
            "certificates": [{ "role": "server", "subject": "gw", "not_after": "2026-01-02T00:00:00Z", "expires_in_days": 3 }],
            "store": { "kind": "files", "data_dir": "/x", "ok": false, "problems": ["/x: missing"] },
        });
        let s = summary(&v);
        assert!(s.contains("! no manager connected for 40s"), "{s}");
        assert!(
            s.contains("! the server certificate expires in 3 days"),
            "{s}"
        );
        assert!(s.contains("! store: /x: missing"), "{s}");
    }
}
