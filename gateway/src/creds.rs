//! Credential commands: `devgate keys …`, `devgate devices …`, `devgate managers …`,
//! `devgate reload`. They work on the store and PKI files in the data dir directly, so
//! they run whether or not the gateway is up; a running gateway picks up revocations
//! within a second (it polls the store's revocation log).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use devgate_pki::{ClientCa, IssuedCert, PkiPaths};
use serde_json::json;

use crate::store::sqlite::SqliteStore;
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
    /// Issue a device certificate offline (signed by the device CA) and register it.
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
    /// Revoke a device's credential: a connected device is disconnected within a second
    /// and the unit is refused (also for re-enrollment) until `unrevoke`.
    Revoke {
        /// State directory.
        #[arg(long, env = "DEVGATE_DATA_DIR")]
        data_dir: PathBuf,
        /// Unit ID.
        unit: String,
    },
    /// Lift a revocation (the device must enroll again with a key).
    Unrevoke {
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

fn open_store(data_dir: &Path) -> Result<SqliteStore> {
    if !PkiPaths::new(data_dir).root_cert().exists() {
        bail!(
            "{} is not a devgate data dir (no pki/root.pem): run `devgate init --data-dir {} --name <host>` first",
            data_dir.display(),
            data_dir.display()
        );
    }
    Ok(SqliteStore::open(data_dir)?)
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
            let created = crate::control::create_keys_from_json(&store, &req, unix_now())
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
            match list_keys(&store, json) {
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
            let paths = PkiPaths::new(&data_dir);
            let ca = ClientCa::load(&paths.device_ca_cert(), &paths.device_ca_key())?;
            let issued = ca.issue_device(&unit)?;
            if let Some(leaf) = issued.chain.first() {
                open_store(&data_dir)?.register_device(
                    &unit,
                    &devgate_pki::fingerprint(leaf.as_ref()),
                    unix_now(),
                )?;
            }
            write_credential(&issued, &out, &unit)
        }
        DevicesCommand::Revoke { data_dir, unit } => {
            if open_store(&data_dir)?.revoke_device(&unit, unix_now())? {
                println!("device {unit} revoked; a running gateway disconnects it within a second");
            } else {
                println!("device {unit} was already revoked");
            }
            Ok(())
        }
        DevicesCommand::Unrevoke { data_dir, unit } => {
            if open_store(&data_dir)?.unrevoke_device(&unit)? {
                println!("revocation of {unit} lifted; it must enroll again");
            } else {
                println!("device {unit} was not revoked");
            }
            Ok(())
        }
        DevicesCommand::List { data_dir } => {
            for d in open_store(&data_dir)?.devices()? {
                let state = if d.revoked_at.is_some() {
                    "revoked"
                } else {
                    "enrolled"
                };
                println!(
                    "{:<24}  {:<8}  enrolled {}  certificate {}",
                    d.unit,
                    state,
                    rfc3339(d.enrolled_at),
                    d.cert_fingerprint
                );
            }
            Ok(())
        }
    }
}

fn managers(cmd: ManagersCommand) -> Result<()> {
    match cmd {
        ManagersCommand::Issue {
            data_dir,
            name,
            out,
        } => {
            let paths = PkiPaths::new(&data_dir);
            let ca = ClientCa::load(&paths.manager_ca_cert(), &paths.manager_ca_key())?;
            let issued = ca.issue_manager(&name)?;
            write_credential(&issued, &out, &name)
        }
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
fn list_keys(store: &crate::store::sqlite::SqliteStore, json: bool) -> std::io::Result<()> {
    use crate::store::Store as _;
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
