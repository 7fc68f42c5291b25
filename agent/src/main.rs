//! `devgate-agent`: the device side of devgate remote access.
//!
//! - `enroll`: first contact and enrollment (`enroll.rs`), credential into the state
//!   directory (`state.rs`);
//! - `run`: keeps the session (`session.rs`) and serves the allow-lists of the
//!   configuration (`config.rs`): commands (`commands.rs`), terminals (`pty.rs`), TCP
//!   targets and file transfer (`files.rs`, its allow-list in `file_policy.rs`).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod commands;
mod config;
mod enroll;
mod file_policy;
mod files;
mod proxy;
mod pty;
mod pty_user;
mod session;
mod state;

#[derive(Debug, Parser)]
#[command(name = "devgate-agent", version, about = "devgate device agent")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Find the gateway, confirm its fingerprint and enroll this device.
    Enroll(enroll::EnrollArgs),
    /// Keep the session with the gateway and serve what the configuration allows.
    Run {
        /// The configuration file.
        #[arg(long, default_value = config::DEFAULT_CONFIG, env = "DEVGATE_AGENT_CONFIG")]
        config: PathBuf,
        /// Reach the gateway through this HTTP proxy (CONNECT), http://[user:pass@]host:port;
        /// overrides the configuration's `proxy`, which overrides $HTTPS_PROXY. NO_PROXY
        /// bypasses any of them for the gateways it lists.
        #[arg(long, value_name = "URL")]
        proxy: Option<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("DEVGATE_AGENT_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // No colour codes in the journal or a log file.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("devgate-agent: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Cmd::Enroll(args) => enroll::run(args).await,
            Cmd::Run { config, proxy } => {
                let mut config = config::Config::load(&config)?;
                if let Some(url) = proxy {
                    proxy::check(&url, "--proxy")?;
                    config.proxy = Some(url);
                }
                session::run(config).await
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("devgate-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}
