//! `devgate cert …`: bring-your-own chains (import, check), server-certificate renewal and
//! the root exchange (stage, activate, finish) — all without downtime: the commands write
//! files, `devgate reload` (or SIGHUP) swaps them in, established sessions stay.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use devgate_pki::{ChainReport, PkiPaths};

use crate::tls::unix_now;

/// `devgate cert …`
#[derive(Subcommand, Debug)]
pub enum CertCommand {
    /// Validate and install an operator's chain (server certificate, intermediates, root)
    /// and key. Prints one line per fault and exits non-zero on a bad chain.
    Import {
        /// State directory.
        #[arg(long, env = "DEVGATE_DATA_DIR")]
        data_dir: PathBuf,
        /// PEM chain: server certificate first, then intermediates, then the root.
        #[arg(long)]
        chain: PathBuf,
        /// PEM private key of the server certificate.
        #[arg(long)]
        key: PathBuf,
        /// Names the certificate must cover (default: the SANs of the installed one).
        #[arg(long, value_delimiter = ',')]
        name: Vec<String>,
        /// Stage it as the next chain of a root exchange instead of installing it now.
        #[arg(long)]
        stage: bool,
        /// Install a chain with a new root that is not staged (devices that do not trust
        /// it yet will refuse the gateway until they are given the new root).
        #[arg(long, conflicts_with = "stage")]
        force: bool,
    },
    /// Validate the installed server chain and key.
    Check {
        /// State directory.
        #[arg(long, env = "DEVGATE_DATA_DIR")]
        data_dir: PathBuf,
        /// Names the certificate must cover (default: its own SANs).
        #[arg(long, value_delimiter = ',')]
        name: Vec<String>,
    },
    /// Issue a new server certificate from the installed root (same names unless given).
    Renew {
        /// State directory.
        #[arg(long, env = "DEVGATE_DATA_DIR")]
        data_dir: PathBuf,
        /// Names for the new certificate (default: those of the current one).
        #[arg(long, value_delimiter = ',')]
        name: Vec<String>,
        /// Validity in days.
        #[arg(long, default_value_t = devgate_pki::DEFAULT_SERVER_DAYS)]
        days: u32,
    },
    /// Root exchange, step 1: create the next root and server chain under pki/next/ and
    /// a trust bundle (current + next root) that devices are sent on the next reload.
    StageRoot {
        /// State directory.
        #[arg(long, env = "DEVGATE_DATA_DIR")]
        data_dir: PathBuf,
        /// Validity of the new root in days.
        #[arg(long, default_value_t = devgate_pki::DEFAULT_ROOT_DAYS)]
        days: u32,
    },
    /// Root exchange, step 2: switch to the staged root and chain (after devices got the bundle).
    ActivateRoot {
        /// State directory.
        #[arg(long, env = "DEVGATE_DATA_DIR")]
        data_dir: PathBuf,
        /// Refuse unless at least this percentage of the enrolled devices acknowledged the
        /// trust bundle (`devgate status` shows how many have).
        #[arg(long, default_value_t = 100.0)]
        min_acked: f64,
        /// Activate whatever the acknowledgements say (devices without the new root will
        /// have to enroll again).
        #[arg(long)]
        force: bool,
    },
    /// Root exchange, step 3: stop sending the trust bundle (the old root is retired).
    FinishRoot {
        /// State directory.
        #[arg(long, env = "DEVGATE_DATA_DIR")]
        data_dir: PathBuf,
    },
    /// Create a root CA for operators without a PKI.
    CreateRoot {
        /// Certificate output (PEM).
        #[arg(long)]
        cert: PathBuf,
        /// Key output (PEM, mode 0600).
        #[arg(long)]
        key: PathBuf,
        /// Common name.
        #[arg(long, default_value = "devgate root CA")]
        cn: String,
        /// Validity in days.
        #[arg(long, default_value_t = devgate_pki::DEFAULT_ROOT_DAYS)]
        days: u32,
    },
    /// Create a server chain signed by a root (or intermediate) for operators without a PKI.
    CreateServer {
        /// Issuing CA certificate (PEM; further CA certificates in the file are appended to the chain).
        #[arg(long)]
        ca_cert: PathBuf,
        /// Issuing CA key.
        #[arg(long)]
        ca_key: PathBuf,
        /// Host names and IPs (SANs).
        #[arg(long, value_delimiter = ',', required = true)]
        name: Vec<String>,
        /// Chain output.
        #[arg(long)]
        chain: PathBuf,
        /// Key output.
        #[arg(long)]
        key: PathBuf,
        /// Validity in days.
        #[arg(long, default_value_t = devgate_pki::DEFAULT_SERVER_DAYS)]
        days: u32,
    },
}

const RELOAD_HINT: &str = "run `devgate reload --data-dir DIR` (or send SIGHUP) to take it into use; sessions stay connected";

/// Refuses a root activation that would strand devices: fewer than `min_acked` percent of
/// the enrolled, unrevoked devices acknowledged the staged trust bundle (a device
/// acknowledges the bundle frame when it has stored the roots).
fn check_acknowledgements(data_dir: &Path, min_acked: f64, force: bool) -> Result<()> {
    if !(0.0..=100.0).contains(&min_acked) {
        bail!("--min-acked {min_acked}: give a percentage between 0 and 100");
    }
    let bundle_path = crate::reload::trust_bundle_path(data_dir);
    let roots = devgate_pki::load_certs(&bundle_path).with_context(|| {
        format!(
            "reading the trust bundle {} (written by `devgate cert stage-root`)",
            bundle_path.display()
        )
    })?;
    let bundle = devgate_pki::bundle_id(&roots);
    let store = crate::creds::open_store(data_dir)?;
    let progress = store.trust_progress(&bundle)?;
    let (acked, total) = (progress.devices_acked, progress.devices_total);
    #[allow(clippy::cast_precision_loss)] // device counts are far below 2^52
    let share = if total == 0 {
        100.0
    } else {
        acked as f64 * 100.0 / total as f64
    };
    println!(
        "{acked} of {total} enrolled devices have the new root ({share:.1} %); {} manager(s) acknowledged it",
        progress.managers_acked.len()
    );
    if share + 1e-9 < min_acked {
        if force {
            println!(
                "--force: activating anyway; the {} devices without the new root must enroll again",
                total - acked
            );
        } else {
            bail!(
                "only {acked} of {total} enrolled devices acknowledged the new root (need {min_acked} %): \
                 wait until `devgate status` shows more (devices receive it when they connect), \
                 lower the bar with `devgate cert activate-root --min-acked`, or pass --force"
            );
        }
    }
    Ok(())
}

fn next_dir(data_dir: &Path) -> PathBuf {
    PkiPaths::new(data_dir).dir.join("next")
}

/// The DNS and IP SANs of the first certificate in `pem_path`.
pub fn names_of(pem_path: &Path) -> Result<Vec<String>> {
    let certs = devgate_pki::load_certs(pem_path)?;
    let cert = certs.first().context("no certificate")?;
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| anyhow::anyhow!("{}: {e}", pem_path.display()))?;
    let mut names = Vec::new();
    if let Ok(Some(san)) = parsed.subject_alternative_name() {
        for n in &san.value.general_names {
            match n {
                x509_parser::extensions::GeneralName::DNSName(d) => names.push((*d).to_owned()),
                x509_parser::extensions::GeneralName::IPAddress(b) => match b.len() {
                    4 => names.push(std::net::Ipv4Addr::new(b[0], b[1], b[2], b[3]).to_string()),
                    16 => {
                        let mut a = [0u8; 16];
                        a.copy_from_slice(b);
                        names.push(std::net::Ipv6Addr::from(a).to_string());
                    }
                    _ => {}
                },
                _ => {}
            }
        }
    }
    Ok(names)
}

/// The names given on the command line, or else those of the installed server certificate.
fn names_or_installed(paths: &PkiPaths, given: Vec<String>) -> Result<Vec<String>> {
    if given.is_empty() {
        names_of(&paths.server_cert())
    } else {
        Ok(given)
    }
}

fn print_report(report: &ChainReport) {
    for f in &report.faults {
        eprintln!("{}", f.message);
    }
}

fn copy_atomic(from: &Path, to: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let tmp = to.with_extension("tmp");
    std::fs::copy(from, &tmp)
        .with_context(|| format!("copying {} to {}", from.display(), tmp.display()))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
    std::fs::rename(&tmp, to).with_context(|| format!("installing {}", to.display()))?;
    Ok(())
}

fn write_bundle(data_dir: &Path, roots: &[&Path]) -> Result<()> {
    let mut pem = String::new();
    for r in roots {
        pem.push_str(
            &std::fs::read_to_string(r).with_context(|| format!("reading {}", r.display()))?,
        );
    }
    let path = crate::reload::trust_bundle_path(data_dir);
    devgate_pki::write_file(&path, pem.as_bytes(), 0o644)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Whether `root` is the staged next root (`pki/next/root.pem`) or in the trust bundle
/// that devices are being sent.
fn is_staged(data_dir: &Path, root: &rustls_pki_types::CertificateDer<'_>) -> bool {
    [
        next_dir(data_dir).join("root.pem"),
        crate::reload::trust_bundle_path(data_dir),
    ]
    .iter()
    .filter_map(|p| devgate_pki::load_certs(p).ok())
    .flatten()
    .any(|c| c.as_ref() == root.as_ref())
}

/// After importing the staged root without `--stage`: the staged exchange is complete, so
/// `pki/next/` goes (its root key, if `stage-root` made one, becomes the root key, as
/// `activate-root` would do).
fn finish_staging(data_dir: &Path, root: &rustls_pki_types::CertificateDer<'_>) -> Result<()> {
    let paths = PkiPaths::new(data_dir);
    let next = next_dir(data_dir);
    let staged_root = devgate_pki::load_certs(&next.join("root.pem"))
        .ok()
        .and_then(|c| c.into_iter().next());
    if staged_root.as_ref().map(|r| r.as_ref()) != Some(root.as_ref()) {
        return Ok(());
    }
    if next.join("root.key").exists() {
        if paths.root_key().exists() {
            copy_atomic(
                &paths.root_key(),
                &paths.dir.join("previous-root.key"),
                0o600,
            )?;
        }
        std::fs::rename(next.join("root.key"), paths.root_key())?;
    }
    std::fs::remove_dir_all(&next).with_context(|| format!("removing {}", next.display()))?;
    Ok(())
}

/// Runs a `cert` subcommand.
pub fn run(cmd: CertCommand) -> Result<()> {
    let now = unix_now();
    match cmd {
        CertCommand::Import {
            data_dir,
            chain,
            key,
            name,
            stage,
            force,
        } => {
            let paths = PkiPaths::new(&data_dir);
            let names = names_or_installed(&paths, name)?;
            let report = devgate_pki::validate_server_chain_files(&chain, &key, &names, now);
            if !report.is_ok() {
                print_report(&report);
                bail!(
                    "{} fault(s): the chain was not installed",
                    report.faults.len()
                );
            }
            let certs = devgate_pki::load_certs(&chain)?;
            // Decide before writing anything: a new root that devices were never sent
            // would strand every enrolled device (they trust the installed root only).
            let new_root = certs.last().context("the chain holds no certificate")?;
            let current_root = devgate_pki::load_certs(&paths.root_cert())
                .ok()
                .and_then(|c| c.first().cloned());
            let root_changes = current_root.as_ref() != Some(new_root);
            let root_staged = root_changes && is_staged(&data_dir, new_root);
            if !stage && root_changes && !root_staged && !force {
                bail!(
                    "{} has a different root (fingerprint {}) than the installed one ({}): installing it would strand every enrolled device, which trusts only the installed root. Nothing was installed. Stage it first: `devgate cert import --stage --data-dir {} --chain … --key …`, reload, let the devices receive the trust bundle, then `devgate cert activate-root` (see \"Root exchange\" under Certificates in docs/OPERATIONS.md); or pass --force to install it anyway",
                    chain.display(),
                    devgate_pki::fingerprint(new_root.as_ref()),
                    current_root.as_ref().map_or_else(
                        || "none".to_owned(),
                        |r| devgate_pki::fingerprint(r.as_ref())
                    ),
                    data_dir.display(),
                );
            }
            if !stage && root_staged {
                // Installing a staged root is the activation step: the same bar applies.
                check_acknowledgements(&data_dir, 100.0, force)?;
            }
            let root_path = if stage {
                next_dir(&data_dir).join("root.pem")
            } else {
                paths.root_cert()
            };
            let (server_out, key_out) = if stage {
                devgate_pki::create_dir_with_mode(
                    &next_dir(&data_dir),
                    devgate_pki::PRIVATE_DIR_MODE,
                )?;
                (
                    next_dir(&data_dir).join("server.pem"),
                    next_dir(&data_dir).join("server.key"),
                )
            } else {
                (paths.server_cert(), paths.server_key())
            };
            copy_atomic(&chain, &server_out, 0o644)?;
            copy_atomic(&key, &key_out, 0o600)?;
            // The last certificate is the root (validation insists on it): keep it where
            // `devgate fingerprint` and the trust bundle look.
            let root = new_root;
            if stage {
                devgate_pki::write_file(
                    &root_path,
                    crate::tls::cert_pem(root.as_ref()).as_bytes(),
                    0o644,
                )?;
                write_bundle(&data_dir, &[&paths.root_cert(), &root_path])?;
                println!(
                    "staged; devices are sent the trust bundle on reload; then run `devgate cert activate-root`"
                );
            } else if root_changes {
                let prev = paths.dir.join("previous-root.pem");
                let _ = std::fs::copy(paths.root_cert(), &prev);
                if root_staged {
                    // Devices have been sent this root: the import is the activation
                    // step; keep sending both roots until `cert finish-root`.
                    finish_staging(&data_dir, root)?;
                }
                devgate_pki::write_file(
                    &root_path,
                    crate::tls::cert_pem(root.as_ref()).as_bytes(),
                    0o644,
                )?;
                if root_staged {
                    write_bundle(&data_dir, &[&paths.root_cert(), &prev])?;
                    println!(
                        "the staged root is now active; run `devgate cert finish-root` once no device needs the old root"
                    );
                } else {
                    eprintln!(
                        "warning: --force: this chain has a root that was not staged; devices that do not trust it yet will refuse the gateway"
                    );
                }
            }
            if let Some(fp) = report.root_fingerprint {
                println!("Root fingerprint: {fp}");
            }
            println!("installed {}; {RELOAD_HINT}", server_out.display());
            Ok(())
        }
        CertCommand::Check { data_dir, name } => {
            let paths = PkiPaths::new(&data_dir);
            let names = names_or_installed(&paths, name)?;
            let report = devgate_pki::validate_server_chain_files(
                &paths.server_cert(),
                &paths.server_key(),
                &names,
                now,
            );
            if !report.is_ok() {
                print_report(&report);
                bail!("{} fault(s) in the installed chain", report.faults.len());
            }
            if let Some(ee) = report.end_entity {
                println!(
                    "ok: {} valid until {}, covers {}",
                    ee.subject,
                    ee.not_after,
                    names.join(", ")
                );
            }
            Ok(())
        }
        CertCommand::Renew {
            data_dir,
            name,
            days,
        } => {
            let paths = PkiPaths::new(&data_dir);
            let names = names_or_installed(&paths, name)?;
            let tmp = paths.dir.join("renew");
            devgate_pki::create_dir_with_mode(&tmp, devgate_pki::PRIVATE_DIR_MODE)?;
            let (chain, key) = (tmp.join("server.pem"), tmp.join("server.key"));
            let _ = std::fs::remove_file(&chain);
            let _ = std::fs::remove_file(&key);
            devgate_pki::create_server(
                &paths.root_cert(),
                &paths.root_key(),
                &names,
                days,
                &chain,
                &key,
            )?;
            std::fs::rename(&key, paths.server_key())?;
            std::fs::rename(&chain, paths.server_cert())?;
            let _ = std::fs::remove_dir(&tmp);
            println!(
                "renewed the server certificate for {} ({days} days); {RELOAD_HINT}",
                names.join(", ")
            );
            Ok(())
        }
        CertCommand::StageRoot { data_dir, days } => {
            let paths = PkiPaths::new(&data_dir);
            let names = names_of(&paths.server_cert())?;
            let next = next_dir(&data_dir);
            if next.exists() {
                bail!(
                    "{} exists: a root exchange is already staged (activate it, or remove the directory to start over)",
                    next.display()
                );
            }
            devgate_pki::create_dir_with_mode(&next, devgate_pki::PRIVATE_DIR_MODE)?;
            let fp = devgate_pki::create_root(
                &next.join("root.pem"),
                &next.join("root.key"),
                "devgate root CA",
                days,
            )?;
            devgate_pki::create_server(
                &next.join("root.pem"),
                &next.join("root.key"),
                &names,
                devgate_pki::DEFAULT_SERVER_DAYS,
                &next.join("server.pem"),
                &next.join("server.key"),
            )?;
            write_bundle(&data_dir, &[&paths.root_cert(), &next.join("root.pem")])?;
            println!("Next root fingerprint: {fp}");
            println!(
                "staged; {RELOAD_HINT}; devices are then sent the trust bundle. When they have it, run `devgate cert activate-root`."
            );
            Ok(())
        }
        CertCommand::ActivateRoot {
            data_dir,
            min_acked,
            force,
        } => {
            let paths = PkiPaths::new(&data_dir);
            let next = next_dir(&data_dir);
            if !next.join("server.pem").exists() {
                bail!(
                    "nothing staged in {}: run `devgate cert stage-root` (or `cert import --stage`) first",
                    next.display()
                );
            }
            check_acknowledgements(&data_dir, min_acked, force)?;
            let prev_cert = paths.dir.join("previous-root.pem");
            std::fs::copy(paths.root_cert(), &prev_cert)?;
            if paths.root_key().exists() && next.join("root.key").exists() {
                copy_atomic(
                    &paths.root_key(),
                    &paths.dir.join("previous-root.key"),
                    0o600,
                )?;
                std::fs::rename(next.join("root.key"), paths.root_key())?;
            }
            std::fs::rename(next.join("server.key"), paths.server_key())?;
            std::fs::rename(next.join("server.pem"), paths.server_cert())?;
            std::fs::rename(next.join("root.pem"), paths.root_cert())?;
            let _ = std::fs::remove_dir_all(&next);
            write_bundle(&data_dir, &[&paths.root_cert(), &prev_cert])?;
            println!(
                "Root fingerprint: {}",
                devgate_pki::fingerprint_file(&paths.root_cert())?
            );
            println!(
                "activated; {RELOAD_HINT}. Run `devgate cert finish-root` once no device needs the old root."
            );
            Ok(())
        }
        CertCommand::FinishRoot { data_dir } => {
            let bundle = crate::reload::trust_bundle_path(&data_dir);
            if bundle.exists() {
                std::fs::remove_file(&bundle)?;
            }
            println!("trust bundle removed; {RELOAD_HINT}");
            Ok(())
        }
        CertCommand::CreateRoot {
            cert,
            key,
            cn,
            days,
        } => {
            let fp = devgate_pki::create_root(&cert, &key, &cn, days)?;
            println!("Root fingerprint: {fp}");
            Ok(())
        }
        CertCommand::CreateServer {
            ca_cert,
            ca_key,
            name,
            chain,
            key,
            days,
        } => {
            devgate_pki::create_server(&ca_cert, &ca_key, &name, days, &chain, &key)?;
            println!("{}\n{}", chain.display(), key.display());
            Ok(())
        }
    }
}
