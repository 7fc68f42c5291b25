//! The `devgate` command: `init`, `serve`, `fingerprint`, offline credential issuance and
//! configuration checks.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};
use devgate_pki::{InitOptions, PkiPaths};
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
    #[command(flatten)]
    Creds(gateway::creds::CredsCommand),
    /// Server certificates: import and check chains, renew, exchange the root.
    Cert {
        #[command(subcommand)]
        command: gateway::certcmd::CertCommand,
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
    /// I/O driver (overrides `data_path`): auto = io_uring where the kernel allows it,
    /// else epoll.
    #[arg(long, value_parser = ["auto", "io_uring", "epoll"])]
    data_path: Option<String>,
    /// Log format (plain lines; under systemd without timestamps, with journal priorities).
    #[arg(long, env = "DEVGATE_LOG_FORMAT", default_value = "plain", value_parser = ["plain", "json"])]
    log_format: String,
    /// Attach the XDP guard to this public interface (overrides `xdp.interface`).
    #[arg(long, value_name = "IFACE")]
    xdp: Option<String>,
    /// XDP attach mode (overrides `xdp.mode`; default: native, else generic).
    #[arg(long, value_parser = ["auto", "native", "generic", "userspace"])]
    xdp_mode: Option<String>,
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
            // The first manager's certificate is recorded like every issued one (it can
            // be listed and revoked by name or SHA-256).
            gateway::creds::record_init_manager(&data_dir)?;
            let token = gateway::creds::create_pairing_token(&data_dir, "7d")?;
            // Ready for an admin listener off loopback, which refuses to start without it.
            gateway::admin::create_token(&data_dir.join(gateway::config::ADMIN_TOKEN_FILE), force)?;
            println!("Created the PKI in {}", report.paths.dir.display());
            println!("Root fingerprint: {}", report.fingerprint);
            println!("Manager pairing token (one use, valid 7 days): {token}");
            Ok(())
        }
        Command::Serve { opts } => serve(opts),
        Command::Ops(cmd) => gateway::ops::run(cmd),
        Command::Fingerprint { data_dir } => {
            let fp = devgate_pki::fingerprint_file(&PkiPaths::new(&data_dir).root_cert())?;
            println!("Root fingerprint: {fp}");
            Ok(())
        }
        Command::Creds(cmd) => gateway::creds::run(cmd),
        Command::Cert { command } => gateway::certcmd::run(command),
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
    if let Some(d) = opts.data_path {
        config.data_path = d.parse().map_err(anyhow::Error::msg)?;
    }
    if let Some(i) = opts.xdp {
        config.xdp.interface = i;
    }
    if let Some(m) = opts.xdp_mode {
        config.xdp.mode = m.parse().map_err(anyhow::Error::msg)?;
    }
    config.validate()?;
    gateway::server::serve(config)
}
