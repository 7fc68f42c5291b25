//! `devgate-ctl`: the manager side of devgate remote access, for an operator.
//!
//! Exit status: `run` and `shell` exit with the device's command or shell status; every
//! subcommand exits with 255 when the device could not be reached or refused, and `push`
//! and `pull` when any device failed (so a non-zero status always means some addressed
//! device failed), 2 on usage errors.

use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use devgate_client::{FleetEvent, FleetOptions, OfflineCause, PresenceChange, PresenceReason};
use serde_json::{Value, json};

mod forward;
mod gateways;
mod link;
mod progress;
mod pull;
mod push;
mod shell;

use gateways::ConnArgs;

/// Exit status when ctl itself failed or the device could not be reached or refused.
const FAILED: u8 = 255;

#[derive(Debug, Parser)]
#[command(
    name = "devgate-ctl",
    version,
    about = "devgate manager tool: devices, commands, shells, port forwarding, file transfer"
)]
struct Cli {
    #[command(flatten)]
    conn: ConnArgs,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// List connected devices (and follow presence with --watch).
    Devices {
        /// Keep running and print each device that comes or goes.
        #[arg(long)]
        watch: bool,
    },
    /// Run an allow-listed command on a device; prints its output, exits with its status.
    Run {
        unit: String,
        name: String,
        /// Arguments (only if the device's configuration allows them for this command).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// An interactive shell on a device; exits with the shell's status.
    Shell { unit: String },
    /// Forward a local port to a TCP target on a device: each accepted connection is one
    /// stream.
    Forward {
        unit: String,
        /// HOST:PORT as the device sees it (must be on its allow-list), or tcp:HOST:PORT.
        target: String,
        /// Local address to listen on.
        #[arg(long)]
        listen: String,
        /// Streams open at once; further connections wait. Each may have 1 MiB in flight, and
        /// the gateway's limits (max_streams_per_device, default 8; queue_hard_bytes, 16 MiB)
        /// bound what one manager can have.
        #[arg(long, default_value_t = 8)]
        max_streams: usize,
    },
    /// Send a file to devices (into their receive directory), resuming dropped transfers;
    /// prints a table with one row per device, exits non-zero when any failed.
    Push {
        file: std::path::PathBuf,
        /// Devices to send to.
        #[arg(long, num_args = 1.., required_unless_present = "all", conflicts_with = "all")]
        to: Vec<String>,
        /// Every device connected to the gateways.
        #[arg(long)]
        all: bool,
        /// Devices sent to at once. Each has up to 1 MiB in flight through the gateway.
        #[arg(long, default_value_t = 16)]
        parallel: usize,
        /// Name on the device: a file name (into its first receive directory) or an absolute
        /// path inside one of its receive directories; default: FILE's name.
        #[arg(long)]
        name: Option<String>,
    },
    /// Fetch an allow-listed file from a device, resuming a dropped transfer.
    Pull {
        unit: String,
        /// Absolute path on the device.
        path: String,
        /// Where to store it; default: PATH's file name in the current directory.
        #[arg(long)]
        out: Option<std::path::PathBuf>,
    },
    /// Enrollment keys, through the manager connection.
    Keys {
        #[command(subcommand)]
        command: KeysCmd,
    },
}

#[derive(Debug, Subcommand)]
enum KeysCmd {
    /// Create keys; prints one key per line (the only time the secret is shown).
    Create {
        /// N one-time keys, each usable by any one device.
        #[arg(long, conflicts_with_all = ["unit", "multi"])]
        one_time: Option<u32>,
        /// One-time keys bound to these unit IDs.
        #[arg(long, num_args = 1.., conflicts_with = "multi")]
        unit: Vec<String>,
        /// One multi-use key.
        #[arg(long)]
        multi: bool,
        /// The multi-use key's value.
        #[arg(long, requires = "multi")]
        value: Option<String>,
        /// Expiry: 90s, 30m, 12h, 7d or an RFC 3339 time.
        #[arg(long)]
        expires: Option<String>,
        /// Print the gateway's JSON reply.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("devgate-ctl: cannot start the runtime: {e}");
            return ExitCode::from(FAILED);
        }
    };
    let result = runtime.block_on(run(cli));
    // A read of stdin may still be waiting in a blocking thread; do not wait for it.
    runtime.shutdown_timeout(std::time::Duration::from_millis(100));
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("devgate-ctl: {e:#}");
            ExitCode::from(FAILED)
        }
    }
}

async fn run(cli: Cli) -> Result<u8> {
    // `devices` merges presence over the whole fleet; the others ask instance by instance.
    let command = match cli.command {
        Cmd::Devices { watch } => return devices(&cli.conn, watch).await,
        other => other,
    };
    let mut gateways = gateways::connect_all(&cli.conn).await?;
    match command {
        Cmd::Devices { watch } => devices(&cli.conn, watch).await,
        Cmd::Run { unit, name, args } => run_command(&mut gateways, &unit, &name, &args).await,
        Cmd::Shell { unit } => shell::run(&mut gateways, &unit).await,
        Cmd::Forward {
            unit,
            target,
            listen,
            max_streams,
        } => forward::run(gateways, &unit, &target, &listen, max_streams).await,
        Cmd::Push {
            file,
            to,
            all,
            parallel,
            name,
        } => {
            let source = std::sync::Arc::new(push::Source::open(&file, name).await?);
            let units = if all {
                push::all_units(&mut gateways).await?
            } else {
                // A unit named twice would race itself for the same partial file.
                let mut seen = std::collections::HashSet::new();
                to.into_iter().filter(|u| seen.insert(u.clone())).collect()
            };
            if units.is_empty() {
                bail!("no device to send to (none is connected)");
            }
            let link = std::sync::Arc::new(link::Link::new(
                cli.conn.labels(),
                gateways,
                gateways::tls(&cli.conn)?,
                cli.conn.proxy.clone(),
            ));
            let progress = std::sync::Arc::new(progress::Progress::default());
            let line = progress::start_line(
                format!("push {}", source.name),
                units.len(),
                source.size.saturating_mul(units.len() as u64),
                progress.clone(),
            );
            let results = push::run(link, source.clone(), units, parallel, progress).await;
            drop(line);
            Ok(finish(&format!("push {}", source.name), &results))
        }
        Cmd::Pull { unit, path, out } => {
            let out = match out {
                Some(o) => o,
                None => std::path::PathBuf::from(
                    std::path::Path::new(&path)
                        .file_name()
                        .with_context(|| format!("{path:?} names no file; give --out"))?,
                ),
            };
            let link = link::Link::new(
                cli.conn.labels(),
                gateways,
                gateways::tls(&cli.conn)?,
                cli.conn.proxy.clone(),
            );
            let progress = std::sync::Arc::new(progress::Progress::default());
            let line = progress::start_line(format!("pull {path}"), 1, 0, progress.clone());
            let result = pull::run(&link, &unit, &path, &out, &progress).await;
            drop(line);
            Ok(finish(
                &format!("pull {path} to {}", out.display()),
                &[result],
            ))
        }
        Cmd::Keys {
            command:
                KeysCmd::Create {
                    one_time,
                    unit,
                    multi,
                    value,
                    expires,
                    json,
                },
        } => {
            let mut req = if multi {
                json!({"op": "create_keys", "kind": "multi"})
            } else if !unit.is_empty() {
                json!({"op": "create_keys", "kind": "bound", "units": unit})
            } else {
                json!({"op": "create_keys", "kind": "one-time", "count": one_time.unwrap_or(1)})
            };
            if let Some(v) = value {
                req["value"] = json!(v);
            }
            if let Some(e) = expires {
                req["expires"] = json!(e);
            }
            let gw = gateways.first_mut().context("no gateway")?;
            let reply = gw.control(&req).await?;
            if json {
                println!("{reply}");
            } else {
                for k in reply["keys"].as_array().into_iter().flatten() {
                    println!("{}", k["key"].as_str().unwrap_or_default());
                }
            }
            Ok(0)
        }
    }
}

async fn devices(conn: &ConnArgs, watch: bool) -> Result<u8> {
    let fleet = gateways::connect_fleet(
        conn,
        FleetOptions {
            events: watch,
            ..FleetOptions::default()
        },
    )
    .await?;
    for at in 0..fleet.len() {
        if !fleet.is_up(at) {
            eprintln!(
                "devgate-ctl: gateway {} not reached; its devices are missing",
                fleet.label(at)
            );
        }
    }
    for (unit, at) in fleet.devices_then_events().await {
        println!("{unit}\tonline\t{}", fleet.label(at));
    }
    if !watch {
        return Ok(0);
    }
    // One view of the fleet: a device that moves between instances is one `moved` line.
    while let Some(ev) = fleet.next_event().await {
        match ev {
            FleetEvent::Presence(PresenceChange::Online { unit, at }) => {
                println!("{unit}\tonline\tconnected\t{}", fleet.label(at));
            }
            FleetEvent::Presence(PresenceChange::Moved { unit, to, .. }) => {
                println!("{unit}\tonline\tmoved\t{}", fleet.label(to));
            }
            FleetEvent::Presence(PresenceChange::Offline { unit, last, cause }) => {
                let why = match cause {
                    OfflineCause::Reported(r) => reason_name(r),
                    OfflineCause::InstanceLost => "gateway_lost",
                };
                println!("{unit}\toffline\t{why}\t{}", fleet.label(last));
            }
            FleetEvent::InstanceDown { at, error } => {
                eprintln!(
                    "devgate-ctl: gateway {} lost: {error}; reconnecting",
                    fleet.label(at)
                );
            }
            FleetEvent::InstanceUp(at) => {
                eprintln!("devgate-ctl: gateway {} connected", fleet.label(at));
            }
            _ => {}
        }
    }
    bail!("lost every gateway")
}

/// Prints the per-device table and a summary; the exit status (non-zero when any failed).
fn finish(what: &str, results: &[progress::DeviceResult]) -> u8 {
    progress::print_table(results);
    let failed = results.iter().filter(|r| r.error.is_some()).count();
    let bytes: u64 = results.iter().map(|r| r.bytes).sum();
    let resumed = results.iter().filter(|r| r.resumed_at > 0).count();
    eprintln!(
        "devgate-ctl: {what}: {} of {} devices ok, {failed} failed; {} transferred, {resumed} resumed",
        results.len() - failed,
        results.len(),
        progress::human(bytes)
    );
    if failed == 0 { 0 } else { FAILED }
}

fn reason_name(r: PresenceReason) -> &'static str {
    r.as_str()
}

async fn run_command(
    gateways: &mut [gateways::Gateway],
    unit: &str,
    name: &str,
    args: &[String],
) -> Result<u8> {
    let payload = json!({"op": "run", "name": name, "args": args}).to_string();
    for gw in gateways.iter_mut() {
        let Some(reply) = gw.command(unit, payload.as_bytes()).await? else {
            continue;
        };
        let v: Value = serde_json::from_slice(&reply)
            .with_context(|| format!("device {unit} answered something that is not JSON"))?;
        if let Some(out) = v["stdout"].as_str() {
            print!("{out}");
        }
        if let Some(err) = v["stderr"].as_str() {
            eprint!("{err}");
        }
        if v["ok"] != json!(true) {
            bail!(
                "device {unit}: {}",
                v["error"].as_str().unwrap_or("the command failed")
            );
        }
        if v["truncated"] == json!(true) {
            eprintln!("devgate-ctl: device {unit}: output was cut at the device's limit");
        }
        let code = v["exit_code"].as_i64().unwrap_or(i64::from(FAILED));
        return Ok(u8::try_from(code).unwrap_or(FAILED));
    }
    bail!(
        "device {unit} is not connected to {}",
        gateways
            .iter()
            .map(|g| g.label.as_str())
            .collect::<Vec<_>>()
            .join(" or ")
    )
}
