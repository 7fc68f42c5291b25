//! Credential commands: `devgate keys …`, `devgate devices …`, `devgate managers …`,
//! `devgate reload`. They work on the store and PKI files in the data dir directly, so
//! they run whether or not the gateway is up; a running gateway picks up revocations
//! within a second (it polls the store's revocation log).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use devgate_pki::{ClientCa, IssuedCert, PkiPaths};
use serde_json::json;

use std::sync::Arc;

use crate::store::{self, Store};
use crate::tls::unix_now;

/// Credential subcommands (flattened into the top-level command).
#[derive(Subcommand, Debug)]
pub enum CredsCommand {
    /// First-authentication keys for enrolling devices.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Device credentials.
    Devices {
        #[command(subcommand)]
        command: DevicesCommand,
    },
    /// Manager credentials and pairing tokens.
    Managers {
        #[command(subcommand)]
        command: ManagersCommand,
    },
    /// Tell a running gateway to reload its certificates (as SIGHUP does); sessions survive.
    Reload {
        /// State directory of the running gateway.
        #[arg(long, env = "DEVGATE_DATA_DIR")]
        data_dir: PathBuf,
    },
}

/// `devgate keys …`
#[derive(Subcommand, Debug)]
pub enum KeysCommand {
    /// Create keys; prints one key per line (the only time the secret is shown).
    Create {
        /// State directory.
        #[arg(long, env = "DEVGATE_DATA_DIR")]
        data_dir: PathBuf,
        /// N one-time keys, each usable by any one device.
        #[arg(long, value_name = "N", conflicts_with_all = ["unit", "multi"])]
        one_time: Option<u64>,
        /// One-time keys bound to these unit IDs (one key per unit, in the order given).
        #[arg(long, value_name = "UNIT", num_args = 1.., conflicts_with = "multi")]
        unit: Vec<String>,
        /// One multi-use (mass-deployment) key.
        #[arg(long)]
        multi: bool,
        /// The multi-use key's value (at least 12 characters); random if omitted.
        #[arg(long, requires = "multi")]
        value: Option<String>,
        /// Expiry: a duration (90s, 30m, 12h, 7d) or an RFC 3339 time.
        #[arg(long)]
        expires: Option<String>,
        /// Print JSON (ids, kinds, units and keys) instead of one key per line.
        #[arg(long)]
        json: bool,
    },
    /// List keys (never their secrets).
    List {
        /// State directory.
        #[arg(long, env = "DEVGATE_DATA_DIR")]
        data_dir: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a key by its id (from `keys list`).
    Revoke {
        /// State directory.
        #[arg(long, env = "DEVGATE_DATA_DIR")]
        data_dir: PathBuf,
        /// Key id.
        id: String,
    },
}

/// `devgate devices …`
#[derive(Subcommand, Debug)]
pub enum DevicesCommand {
    /// Issue a device certificate offline (signed by the device CA) and register it as the
    /// unit's only valid certificate (earlier ones of the unit stop working).
    Issue {
        /// State directory.
        #[arg(long, env = "DEVGATE_DATA_DIR")]
        data_dir: PathBuf,
        /// The device's unit ID (1–64 printable ASCII characters, e.g. its MAC address).
        #[arg(long)]
        unit: String,
        /// Directory to write `<unit>.pem` and `<unit>.key` into.
        #[arg(long)]
        out: PathBuf,
    },
    /// Revoke a device: a connected device is disconnected within a second and the unit is
    /// refused (also for re-enrollment) until `unrevoke`; its certificates stay revoked for
    /// good. With --cert, revoke one certificate (device or manager) by its SHA-256.
    Revoke {
        /// State directory.
        #[arg(long, env = "DEVGATE_DATA_DIR")]
        data_dir: PathBuf,
        /// Unit ID.
        #[arg(required_unless_present = "cert", conflicts_with = "cert")]
        unit: Option<String>,
        /// SHA-256 of the certificate to revoke (64 hex digits; spaces or colons allowed).
        #[arg(long, value_name = "SHA256")]
        cert: Option<String>,
    },
    /// Lift a unit's revocation. Its revoked certificates stay revoked: the unit is left
    /// reset and enrolls again with a key bound to it, created after this command.
    Unrevoke {
        /// State directory.
        #[arg(long, env = "DEVGATE_DATA_DIR")]
        data_dir: PathBuf,
        /// Unit ID.
        unit: String,
    },
    /// Reset an enrolled unit (e.g. a replaced or factory-reset device): its certificates
    /// stop working within a second, and it may enroll again with a key bound to it and
    /// created after the reset (`devgate keys create --unit UNIT`).
    Reset {
        /// State directory.
        #[arg(long, env = "DEVGATE_DATA_DIR")]
        data_dir: PathBuf,
        /// Unit ID.
        unit: String,
    },
    /// List enrolled devices.
    List {
        /// State directory.
        #[arg(long, env = "DEVGATE_DATA_DIR")]
        data_dir: PathBuf,
    },
}

/// `devgate managers …`
#[derive(Subcommand, Debug)]
pub enum ManagersCommand {
    /// Issue a manager certificate offline (signed by the manager CA).
    Issue {
        /// State directory.
        #[arg(long, env = "DEVGATE_DATA_DIR")]
        data_dir: PathBuf,
        /// Manager name (becomes the certificate's CN).
        #[arg(long)]
        name: String,
        /// Directory to write `<name>.pem` and `<name>.key` into.
        #[arg(long)]
        out: PathBuf,
    },
    /// List recorded manager certificates (from `init`, `managers issue` and pairing).
    List {
        /// State directory.
        #[arg(long, env = "DEVGATE_DATA_DIR")]
        data_dir: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Revoke every certificate of a manager (connected ones are disconnected within a
    /// second), or with --cert one certificate by its SHA-256.
    Revoke {
        /// State directory.
        #[arg(long, env = "DEVGATE_DATA_DIR")]
        data_dir: PathBuf,
        /// Manager name.
        #[arg(required_unless_present = "cert", conflicts_with = "cert")]
        name: Option<String>,
        /// SHA-256 of the certificate to revoke (64 hex digits; spaces or colons allowed).
        #[arg(long, value_name = "SHA256")]
        cert: Option<String>,
    },
    /// Create a one-time pairing token for a new manager (`POST /v1/pair`).
    Token {
        /// State directory.
        #[arg(long, env = "DEVGATE_DATA_DIR")]
        data_dir: PathBuf,
        /// Expiry: a duration (e.g. 7d) or an RFC 3339 time; default 7 days.
        #[arg(long, default_value = "7d")]
        expires: String,
    },
}

/// The store `devgate serve` would use with this data dir, with a clear error when
/// `data_dir` is not one: `[store] url` of the effective configuration (`DEVGATE_CONFIG`
/// or /etc/devgate/devgate.toml, and `DEVGATE_STORE__URL`) selects PostgreSQL, else the
/// data dir's SQLite file.
pub(crate) fn open_store(data_dir: &Path) -> Result<Arc<dyn Store>> {
    if !PkiPaths::new(data_dir).root_cert().exists() {
        bail!(
            "{} is not a devgate data dir (no pki/root.pem): run `devgate init --data-dir {} --name <host>` first",
            data_dir.display(),
            data_dir.display()
        );
    }
    let (config, source) = crate::config::Config::load_effective(None)
        .context("reading the configuration to find the credential store ([store] url)")?;
    let url = config.store.url.as_deref();
    crate::store::open(url, data_dir).with_context(|| match url {
        Some(url) => format!(
            "opening the PostgreSQL store {} (from {source})",
            crate::config::redact_url(url)
        ),
        None => format!("opening the SQLite store in {}", data_dir.display()),
    })
}

/// Records `pki/manager.pem` (made by `devgate init`) in the store of `data_dir`.
pub fn record_init_manager(data_dir: &Path) -> Result<()> {
    let store = open_store(data_dir)?;
    let pem = PkiPaths::new(data_dir).manager_cert();
    let fp = devgate_pki::fingerprint_file(&pem)?;
    store.record_manager_cert(devgate_pki::FIRST_MANAGER_NAME, &fp, unix_now(), "init")?;
    Ok(())
}

/// Creates a pairing token in the store of `data_dir`; returns the secret.
pub fn create_pairing_token(data_dir: &Path, expires: &str) -> Result<String> {
    let store = open_store(data_dir)?;
    let now = unix_now();
    let expires_at = store::parse_expiry(expires, now).map_err(anyhow::Error::msg)?;
    let token = store::generate_secret();
    store.create_pairing_token(&store::new_key(
        &token,
        store::KeyKind::OneTime,
        None,
        Some(expires_at),
        now,
    ))?;
    Ok(token)
}

/// Runs a credential subcommand.
pub fn run(cmd: CredsCommand) -> Result<()> {
    match cmd {
        CredsCommand::Keys { command } => keys(command),
        CredsCommand::Devices { command } => devices(command),
        CredsCommand::Managers { command } => managers(command),
        CredsCommand::Reload { data_dir } => reload(&data_dir),
    }
}

fn keys(cmd: KeysCommand) -> Result<()> {
    match cmd {
        KeysCommand::Create {
            data_dir,
            one_time,
            unit,
            multi,
            value,
            expires,
            json,
        } => {
            let store = open_store(&data_dir)?;
            let mut req = if multi {
                json!({"kind": "multi", "value": value})
            } else if !unit.is_empty() {
                json!({"kind": "bound", "units": unit})
            } else if let Some(n) = one_time {
                json!({"kind": "one-time", "count": n})
            } else {
                bail!("say which keys: --one-time N, --unit ID…, or --multi");
            };
            if let Some(e) = expires {
                req["expires"] = json!(e);
            }
            let created = crate::store_thread::create_keys_from_json(&*store, &req, unix_now())
                .map_err(anyhow::Error::msg)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&created)?);
            } else {
                for k in created {
                    println!("{}", k.key);
                }
            }
            Ok(())
        }
        KeysCommand::List { data_dir, json } => {
            let store = open_store(&data_dir)?;
            match list_keys(&*store, json) {
                // `devgate keys list | head`: the reader left; not an error.
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
                other => other.context("writing the key list"),
            }
        }
        KeysCommand::Revoke { data_dir, id } => {
            if open_store(&data_dir)?.revoke_key(&id, unix_now())? {
                println!("key {id} revoked");
                Ok(())
            } else {
                bail!("no key with id {id} (see `devgate keys list`)")
            }
        }
    }
}

fn rfc3339(ts: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(ts)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| ts.to_string())
}

fn devices(cmd: DevicesCommand) -> Result<()> {
    match cmd {
        DevicesCommand::Issue {
            data_dir,
            unit,
            out,
        } => {
            devgate_pki::check_unit_id("unit ID", &unit).map_err(anyhow::Error::msg)?;
            let store = open_store(&data_dir)?;
            let paths = PkiPaths::new(&data_dir);
            let ca = ClientCa::load(&paths.device_ca_cert(), &paths.device_ca_key())?;
            let issued = ca.issue_device(&unit)?;
            let leaf = issued
                .chain
                .first()
                .context("the device CA returned an empty chain")?;
            store.register_device(&unit, &devgate_pki::fingerprint(leaf.as_ref()), unix_now())?;
            write_credential(&issued, &out, &unit)
        }
        DevicesCommand::Revoke {
            data_dir,
            unit,
            cert,
        } => revoke(&data_dir, unit.as_deref(), cert.as_deref(), "unit ID"),
        DevicesCommand::Unrevoke { data_dir, unit } => {
            devgate_pki::check_unit_id("unit ID", &unit).map_err(anyhow::Error::msg)?;
            if open_store(&data_dir)?.unrevoke_device(&unit, unix_now())? {
                println!(
                    "revocation of {unit} lifted; its old certificates stay revoked: enroll it with a key bound to it (devgate keys create --unit {unit})"
                );
                Ok(())
            } else {
                bail!("device {unit} is not revoked")
            }
        }
        DevicesCommand::Reset { data_dir, unit } => {
            devgate_pki::check_unit_id("unit ID", &unit).map_err(anyhow::Error::msg)?;
            if open_store(&data_dir)?.reset_device(&unit, unix_now())? {
                println!(
                    "device {unit} reset: its certificates stop working within a second; enroll it again with a key bound to it (devgate keys create --unit {unit})"
                );
                Ok(())
            } else {
                bail!("device {unit} is not enrolled (see `devgate devices list`)")
            }
        }
        DevicesCommand::List { data_dir } => {
            for d in open_store(&data_dir)?.devices()? {
                let state = if d.revoked_at.is_some() {
                    "revoked"
                } else if d.cert_fingerprint.is_empty() {
                    "reset"
                } else {
                    "enrolled"
                };
                let cert = if d.cert_fingerprint.is_empty() {
                    "-"
                } else {
                    d.cert_fingerprint.as_str()
                };
                let previous = match (&d.previous_fingerprint, d.previous_until) {
                    (Some(p), Some(until)) if until > unix_now() => {
                        format!("  previous {p} until {}", rfc3339(until))
                    }
                    _ => String::new(),
                };
                println!(
                    "{:<24}  {:<8}  enrolled {}  certificate {cert}{previous}",
                    d.unit,
                    state,
                    rfc3339(d.enrolled_at),
                );
            }
            Ok(())
        }
    }
}

/// `devices revoke` / `managers revoke`: by unit (or manager name) or by certificate.
fn revoke(data_dir: &Path, name: Option<&str>, cert: Option<&str>, kind: &str) -> Result<()> {
    let store = open_store(data_dir)?;
    let now = unix_now();
    if let Some(cert) = cert {
        let fp = devgate_pki::parse_fingerprint(cert).with_context(|| {
            format!("--cert \"{}\" is not a SHA-256 fingerprint (64 hex digits, e.g. from `devgate devices list` or `openssl x509 -noout -fingerprint -sha256`)", cert.escape_default())
        })?;
        let fp = devgate_pki::format_fingerprint(&fp);
        if store.revoke_cert(&fp, now)? {
            println!(
                "certificate {fp} revoked; a running gateway disconnects its sessions within a second"
            );
        } else {
            println!("certificate {fp} was already revoked");
        }
        return Ok(());
    }
    let Some(name) = name else {
        bail!("say what to revoke: a {kind} or --cert SHA256");
    };
    devgate_pki::check_unit_id(kind, name).map_err(anyhow::Error::msg)?;
    if kind == "manager name" {
        let n = store.revoke_manager(name, now)?;
        println!(
            "manager {name}: {n} certificate(s) revoked; a running gateway disconnects it within a second and refuses every certificate of this name not issued after now"
        );
        return Ok(());
    }
    match store.revoke_device(name, now)? {
        store::UnitRevocation::Revoked => {
            println!("device {name} revoked; a running gateway disconnects it within a second");
            Ok(())
        }
        store::UnitRevocation::AlreadyRevoked => {
            println!("device {name} was already revoked");
            Ok(())
        }
        store::UnitRevocation::Unknown => bail!(
            "device {name} is not enrolled (see `devgate devices list`); to refuse a certificate issued outside the registry, revoke it with --cert SHA256"
        ),
    }
}

fn managers(cmd: ManagersCommand) -> Result<()> {
    match cmd {
        ManagersCommand::Issue {
            data_dir,
            name,
            out,
        } => {
            devgate_pki::check_unit_id("manager name", &name).map_err(anyhow::Error::msg)?;
            let store = open_store(&data_dir)?;
            let paths = PkiPaths::new(&data_dir);
            let ca = ClientCa::load(&paths.manager_ca_cert(), &paths.manager_ca_key())?;
            let issued = ca.issue_manager(&name)?;
            let leaf = issued
                .chain
                .first()
                .context("the manager CA returned an empty chain")?;
            store.record_manager_cert(
                &name,
                &devgate_pki::fingerprint(leaf.as_ref()),
                unix_now(),
                "issue",
            )?;
            write_credential(&issued, &out, &name)
        }
        ManagersCommand::List { data_dir, json } => {
            let certs = open_store(&data_dir)?.manager_certs()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&certs)?);
                return Ok(());
            }
            println!(
                "{:<20}  {:<8}  {:<7}  {:<20}  certificate",
                "name", "state", "source", "issued"
            );
            for c in certs {
                let state = if c.revoked_at.is_some() {
                    "revoked"
                } else {
                    "valid"
                };
                println!(
                    "{:<20}  {:<8}  {:<7}  {:<20}  {}",
                    c.name,
                    state,
                    c.source,
                    rfc3339(c.issued_at),
                    c.fingerprint.as_deref().unwrap_or("-")
                );
            }
            Ok(())
        }
        ManagersCommand::Revoke {
            data_dir,
            name,
            cert,
        } => revoke(&data_dir, name.as_deref(), cert.as_deref(), "manager name"),
        ManagersCommand::Token { data_dir, expires } => {
            println!("{}", create_pairing_token(&data_dir, &expires)?);
            Ok(())
        }
    }
}

/// Keys read from the store per page by `keys list`.
const LIST_PAGE: usize = 10_000;

/// Prints every key, newest first, a page at a time: a store of 300,000 keys is never
/// held in memory at once (nor rendered as one JSON string).
fn list_keys(store: &dyn Store, json: bool) -> std::io::Result<()> {
    use std::io::Write as _;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    if json {
        write!(out, "[")?;
    } else {
        writeln!(
            out,
            "{:<16}  {:<8}  {:<20}  {:>5}  {:<10}  expires",
            "id", "kind", "unit / used by", "uses", "state"
        )?;
    }
    let now = unix_now();
    let (mut before, mut first) = (None, true);
    loop {
        let (keys, next) = store
            .list_keys_page(before, LIST_PAGE)
            .map_err(std::io::Error::other)?;
        for k in keys {
            if json {
                // The same document `to_string_pretty` of the whole list would be.
                let item = serde_json::to_string_pretty(&k).map_err(std::io::Error::other)?;
                write!(out, "{}\n  ", if first { "" } else { "," })?;
                write!(out, "{}", item.replace('\n', "\n  "))?;
                first = false;
                continue;
            }
            let state = if k.revoked_at.is_some() {
                "revoked"
            } else if k.expires_at.is_some_and(|e| e <= now) {
                "expired"
            } else if k.kind != "multi" && k.used_by.is_some() {
                "used"
            } else {
                "valid"
            };
            let who = k.unit.as_deref().or(k.used_by.as_deref()).unwrap_or("-");
            let expires = k.expires_at.map_or_else(|| "never".to_owned(), rfc3339);
            writeln!(
                out,
                "{:<16}  {:<8}  {:<20}  {:>5}  {:<10}  {expires}",
                k.id, k.kind, who, k.uses, state
            )?;
        }
        match next {
            Some(n) => before = Some(n),
            None => break,
        }
    }
    if json {
        writeln!(out, "{}]", if first { "" } else { "\n" })?;
    }
    out.flush()
}

/// Writes `<name>.pem` and `<name>.key` into `out`.
pub fn write_credential(issued: &IssuedCert, out: &Path, name: &str) -> Result<()> {
    // 0700 whatever the umask: the folder receives a private key.
    devgate_pki::create_dir_with_mode(out, devgate_pki::PRIVATE_DIR_MODE)
        .with_context(|| format!("creating {}", out.display()))?;
    let safe: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let cert = out.join(format!("{safe}.pem"));
    let key = out.join(format!("{safe}.key"));
    issued.write(&cert, &key)?;
    println!("{}\n{}", cert.display(), key.display());
    Ok(())
}

fn reload(data_dir: &Path) -> Result<()> {
    let pidfile = crate::server::pidfile(data_dir);
    let text = std::fs::read_to_string(&pidfile).with_context(|| {
        format!(
            "cannot read {}: is devgate running with --data-dir {}?",
            pidfile.display(),
            data_dir.display()
        )
    })?;
    let pid: i32 = text
        .trim()
        .parse()
        .with_context(|| format!("{} does not hold a pid", pidfile.display()))?;
    // SAFETY: kill(2) with a pid read from our own pidfile and SIGHUP.
    let rc = unsafe { libc::kill(pid, libc::SIGHUP) };
    if rc != 0 {
        bail!(
            "cannot signal devgate (pid {pid}): {}",
            std::io::Error::last_os_error()
        );
    }
    println!("reload requested (pid {pid}); the gateway logs the outcome");
    Ok(())
}
