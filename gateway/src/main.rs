//! The `devgate` command: `init`, `serve`, `fingerprint`, offline credential issuance and
//! configuration checks.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use devgate_pki::{ClientCa, InitOptions, PkiPaths};
use gateway::config::Config;

#[derive(Parser, Debug)]
#[command(
    name = "devgate",
    version,
    about = "A rendezvous gateway between management servers and devices"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create a development PKI: root CA, server certificate, device CA, manager CA and a
    /// first manager certificate; prints the root fingerprint.
    Init {
        /// State directory.
        #[arg(long, env = "DEVGATE_DATA_DIR")]
        data_dir: PathBuf,
        /// Host names and IP addresses by which devices and managers reach the gateway
        /// (comma-separated; all become SANs of the server certificate).
        #[arg(long, value_delimiter = ',', required = true)]
        name: Vec<String>,
        /// Overwrite an existing PKI (all issued credentials become invalid).
        #[arg(long)]
        force: bool,
    },
    /// Run the gateway.
    Serve {
        #[command(flatten)]
        opts: ServeOpts,
    },
    /// Print the root certificate's SHA-256 fingerprint (four groups of 16 hex digits).
    Fingerprint {
        /// State directory.
        #[arg(long, env = "DEVGATE_DATA_DIR")]
        data_dir: PathBuf,
    },
    /// Device credentials.
    Devices {
        #[command(subcommand)]
        command: DevicesCommand,
    },
    /// Manager credentials.
    Managers {
        #[command(subcommand)]
        command: ManagersCommand,
    },
    /// Configuration file tools.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    #[command(flatten)]
    Ops(gateway::ops::OpsCommand),
}

#[derive(clap::Args, Debug)]
struct ServeOpts {
    /// State directory (overrides `data_dir` in the config file).
    #[arg(long, env = "DEVGATE_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Public TLS listener address (default 0.0.0.0:8443).
    #[arg(long, env = "DEVGATE_LISTEN")]
    listen: Option<SocketAddr>,
    /// Admin listener address (default 127.0.0.1:9180).
    #[arg(long, env = "DEVGATE_ADMIN")]
    admin: Option<SocketAddr>,
    /// TOML configuration file.
    #[arg(long, env = "DEVGATE_CONFIG")]
    config: Option<PathBuf>,
    /// Data-path worker threads (default: one per core).
    #[arg(long)]
    workers: Option<usize>,
    /// Log format (plain lines; under systemd without timestamps, with journal priorities).
    #[arg(long, env = "DEVGATE_LOG_FORMAT", default_value = "plain", value_parser = ["plain", "json"])]
    log_format: String,
}

#[derive(Subcommand, Debug)]
enum DevicesCommand {
    /// Issue a device certificate offline (signed by the device CA).
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
}

#[derive(Subcommand, Debug)]
enum ManagersCommand {
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
}

#[derive(Subcommand, Debug)]
enum ConfigCommand {
    /// Print the effective configuration (defaults, FILE or /etc/devgate/devgate.toml if
    /// present, environment overrides DEVGATE_<KEY> / DEVGATE_<SECTION>__<KEY>).
    Show {
        /// Configuration file.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Validate a configuration file; errors name the key.
    Check {
        /// Configuration file.
        file: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("devgate: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Init {
            data_dir,
            name,
            force,
        } => {
            let report = devgate_pki::init(&data_dir, &InitOptions { names: name, force })?;
            println!("Created the PKI in {}", report.paths.dir.display());
            println!("Root fingerprint: {}", report.fingerprint);
            Ok(())
        }
        Command::Serve { opts } => serve(opts),
        Command::Ops(cmd) => gateway::ops::run(cmd),
        Command::Fingerprint { data_dir } => {
            let fp = devgate_pki::fingerprint_file(&PkiPaths::new(&data_dir).root_cert())?;
            println!("Root fingerprint: {fp}");
            Ok(())
        }
        Command::Devices {
            command:
                DevicesCommand::Issue {
                    data_dir,
                    unit,
                    out,
                },
        } => {
            let paths = PkiPaths::new(&data_dir);
            let ca = ClientCa::load(&paths.device_ca_cert(), &paths.device_ca_key())?;
            let issued = ca.issue_device(&unit)?;
            write_credential(&issued, &out, &unit)
        }
        Command::Managers {
            command:
                ManagersCommand::Issue {
                    data_dir,
                    name,
                    out,
                },
        } => {
            let paths = PkiPaths::new(&data_dir);
            let ca = ClientCa::load(&paths.manager_ca_cert(), &paths.manager_ca_key())?;
            let issued = ca.issue_manager(&name)?;
            write_credential(&issued, &out, &name)
        }
        Command::Config {
            command: ConfigCommand::Show { config },
        } => {
            let (cfg, source) = Config::load_effective(config.as_deref())?;
            println!("# effective configuration: {source}");
            print!("{}", cfg.to_toml());
            Ok(())
        }
        Command::Config {
            command: ConfigCommand::Check { file },
        } => {
            Config::load(&file)?;
            println!("{}: ok", file.display());
            Ok(())
        }
    }
}

fn write_credential(issued: &devgate_pki::IssuedCert, out: &Path, name: &str) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
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

fn serve(opts: ServeOpts) -> Result<()> {
    gateway::ops::logging::init(&opts.log_format);
    let (mut config, source) = Config::load_effective(opts.config.as_deref())?;
    tracing::info!("configuration: {source}");
    if let Some(d) = opts.data_dir {
        config.data_dir = d;
    }
    if let Some(l) = opts.listen {
        config.listen = l;
    }
    if let Some(a) = opts.admin {
        config.admin = a;
    }
    if let Some(w) = opts.workers {
        config.workers = w;
    }
    config.validate()?;
    gateway::server::serve(config)
}
