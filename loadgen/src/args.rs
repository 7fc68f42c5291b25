//! Command line: the scenarios and every flag, and the checks that turn a bad
//! combination into one clear message before anything connects.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::{Parser, ValueEnum};

/// Devices one worker process owns at most: below the 20,000-descriptor limit
/// with room for the runtime's own files.
pub(crate) const DEVICES_PER_PROCESS: usize = 18_000;
/// Source addresses give each at most this many connections (one ephemeral
/// port range per destination is about 28,000 ports; leave headroom).
pub(crate) const CONNECTIONS_PER_SOURCE: usize = 25_000;

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Scenario {
    /// Ramp to N device sessions; report connect rate and gateway RSS per session.
    Connect,
    /// Managers send commands to random devices, which answer; devices send events.
    Steady,
    /// Bulk byte streams manager ↔ device under the protocol's flow control.
    Stream,
    /// All devices reconnect at once: after `--restart-cmd` or `--drop`.
    Storm,
    /// Devices disconnect and reconnect continuously at `--rate` per second.
    Churn,
    /// N devices enroll with a first-authentication key (`--key`); reports enrollments/s.
    Enroll,
    /// `--devices` hostile connections of one `--attack` kind held for `--duration` s.
    Attack,
}

impl Scenario {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Connect => "connect",
            Self::Steady => "steady",
            Self::Stream => "stream",
            Self::Storm => "storm",
            Self::Churn => "churn",
            Self::Enroll => "enroll",
            Self::Attack => "attack",
        }
    }
}

#[derive(Parser, Debug, Clone)]
#[command(
    name = "devgate-loadgen",
    version,
    about = "Load generator for devgate: simulated devices and managers against a real gateway"
)]
pub(crate) struct Args {
    /// Scenario to run.
    pub(crate) scenario: Scenario,
    /// Gateway address (host:port).
    #[arg(long)]
    pub(crate) gateway: SocketAddr,
    /// A gateway data dir from `devgate init` (root CA, manager credentials, device CA).
    #[arg(long)]
    pub(crate) data_dir: PathBuf,
    /// Name to verify the gateway's certificate against.
    #[arg(long, default_value = "localhost")]
    pub(crate) server_name: String,
    /// Simulated devices.
    #[arg(long, default_value_t = 1000)]
    pub(crate) devices: usize,
    /// Simulated managers (steady, stream).
    #[arg(long, default_value_t = 1)]
    pub(crate) managers: usize,
    /// Seconds of measured traffic (steady, stream, churn) or of holding the sessions (connect).
    #[arg(long, default_value_t = 10.0)]
    pub(crate) duration: f64,
    /// steady: commands per second over all managers (0 = closed loop with `--window`);
    /// churn: reconnects per second.
    #[arg(long, default_value_t = 0)]
    pub(crate) rate: u64,
    /// Commands outstanding per manager in closed-loop mode.
    #[arg(long, default_value_t = 64)]
    pub(crate) window: usize,
    /// Command payload bytes (steady); data frame bytes (stream, default 16 KiB there).
    #[arg(long)]
    pub(crate) payload: Option<usize>,
    /// Device events per second over all devices (steady).
    #[arg(long, default_value_t = 100)]
    pub(crate) event_rate: u64,
    /// Concurrent byte streams (stream), one device each.
    #[arg(long, default_value_t = 4)]
    pub(crate) streams: usize,
    /// Handshakes in flight while connecting (per process).
    #[arg(long, default_value_t = 128)]
    pub(crate) concurrency: usize,
    /// Spread device connections over 127.0.0.1 … 127.0.0.K (0 = auto: one per 25,000).
    #[arg(long, default_value_t = 0)]
    pub(crate) sources: u8,
    /// Worker processes owning the devices (0 = auto: one per 18,000 devices).
    #[arg(long, default_value_t = 0)]
    pub(crate) processes: usize,
    /// PID of a local gateway, to read its RSS from /proc.
    #[arg(long)]
    pub(crate) gateway_pid: Option<u32>,
    /// connect: keep the sessions open this many seconds after the ramp (default: `--duration`
    /// clamped to 1–5 s, enough for the gateway's memory to settle).
    #[arg(long)]
    pub(crate) hold: Option<f64>,
    /// storm: shell command that restarts the gateway (run once all devices are connected).
    #[arg(long)]
    pub(crate) restart_cmd: Option<String>,
    /// storm: the load generator drops every device connection itself, at once.
    #[arg(long)]
    pub(crate) drop: bool,
    /// storm, churn: reconnect with TLS session resumption.
    #[arg(long)]
    pub(crate) resume: bool,
    /// Smallest reconnect backoff ceiling, ms (delays are jittered in [0, ceiling]).
    #[arg(long, default_value_t = 100)]
    pub(crate) backoff_min_ms: u64,
    /// Largest reconnect backoff ceiling, ms.
    #[arg(long, default_value_t = 5000)]
    pub(crate) backoff_max_ms: u64,
    /// Give up on devices that are not connected (or back, in a storm) after this many seconds.
    #[arg(long, default_value_t = 120.0)]
    pub(crate) timeout: f64,
    /// Allow a gateway address outside 127.0.0.0/8 and ::1 (a gateway you own, e.g. in a
    /// test network namespace). Without it the load generator refuses, so that a typo
    /// cannot aim a load test at somebody else's machine.
    #[arg(long)]
    pub(crate) allow_remote: bool,
    /// Show a progress display even when stderr is not a terminal.
    #[arg(long)]
    pub(crate) progress: bool,
    /// Write every figure as JSON to this file.
    #[arg(long)]
    pub(crate) json: Option<PathBuf>,
    /// First-authentication key for `enroll` (a multi-use key: `devgate keys create --multi`).
    #[arg(long)]
    pub(crate) key: Option<String>,
    /// attack: what each hostile connection does.
    #[arg(long, value_enum)]
    pub(crate) attack: Option<crate::attack::Kind>,
    /// Internal: run as worker I of P (`I/P`), talking JSON lines on stdin/stdout.
    #[arg(long, hide = true)]
    pub(crate) worker: Option<String>,
    /// Internal: the parent's start time (ms since the Unix epoch), for the shared timeline.
    #[arg(long, hide = true)]
    pub(crate) epoch_ms: Option<u64>,
}

impl Args {
    /// Checks combinations clap cannot express.
    pub(crate) fn validate(&self) -> Result<()> {
        if !self.duration.is_finite() || self.duration <= 0.0 {
            bail!("--duration must be a positive number of seconds");
        }
        if !self.timeout.is_finite() || self.timeout <= 0.0 {
            bail!("--timeout must be a positive number of seconds");
        }
        if let Some(h) = self.hold
            && (!h.is_finite() || h < 0.0)
        {
            bail!("--hold must be zero or a positive number of seconds");
        }
        if self.devices == 0 {
            bail!("--devices must be at least 1");
        }
        if self.backoff_min_ms == 0 || self.backoff_max_ms < self.backoff_min_ms {
            bail!("--backoff-min-ms must be at least 1 and at most --backoff-max-ms");
        }
        if !self.gateway.ip().is_loopback() && !self.allow_remote {
            bail!(
                "--gateway {} is not a loopback address: load is only sent to 127.0.0.0/8 or ::1 \
                 unless --allow-remote says the target is yours (e.g. a test network namespace)",
                self.gateway
            );
        }
        match self.scenario {
            Scenario::Steady | Scenario::Stream if self.managers == 0 => {
                bail!(
                    "{} needs at least one manager (--managers)",
                    self.scenario.name()
                )
            }
            Scenario::Storm => match (&self.restart_cmd, self.drop) {
                (Some(_), true) => bail!("storm takes either --restart-cmd or --drop, not both"),
                (None, false) => bail!(
                    "storm needs --restart-cmd \"SHELL CMD\" (a real gateway restart) or --drop"
                ),
                _ => {}
            },
            Scenario::Churn if self.rate == 0 => {
                bail!("churn needs --rate (reconnects per second)")
            }
            Scenario::Stream if self.streams == 0 || self.streams > self.devices => {
                bail!("--streams must be between 1 and --devices")
            }
            Scenario::Attack if self.attack.is_none() => {
                bail!("attack needs --attack silent|partial-hello|slow-head")
            }
            Scenario::Enroll if self.key.is_none() => {
                bail!("enroll needs --key (a multi-use key: `devgate keys create --multi`)")
            }
            _ => {}
        }
        if self.sources > 1 && !self.gateway.is_ipv4() {
            bail!("--sources needs an IPv4 gateway address");
        }
        Ok(())
    }

    /// Worker processes: the flag, or one per [`DEVICES_PER_PROCESS`] devices.
    pub(crate) fn process_count(&self) -> usize {
        let p = if self.processes == 0 {
            self.devices.div_ceil(DEVICES_PER_PROCESS)
        } else {
            self.processes
        };
        p.clamp(1, self.devices.max(1))
    }

    /// Source addresses: the flag, or one per [`CONNECTIONS_PER_SOURCE`] devices.
    pub(crate) fn source_count(&self) -> u8 {
        if self.sources > 0 || !self.gateway.is_ipv4() {
            return self.sources.max(1);
        }
        u8::try_from(self.devices.div_ceil(CONNECTIONS_PER_SOURCE)).unwrap_or(u8::MAX)
    }

    /// Payload bytes: the flag, or 64 for commands and 16 KiB for stream data.
    pub(crate) fn payload_bytes(&self) -> usize {
        self.payload.unwrap_or(match self.scenario {
            Scenario::Stream => 16 * 1024,
            _ => 64,
        })
    }

    /// How long `connect` keeps the sessions after the ramp.
    pub(crate) fn hold_secs(&self) -> f64 {
        self.hold.unwrap_or(self.duration.clamp(1.0, 5.0))
    }

    /// `--worker I/P` parsed.
    pub(crate) fn worker_slot(&self) -> Result<Option<(usize, usize)>> {
        let Some(w) = &self.worker else {
            return Ok(None);
        };
        let parsed = w
            .split_once('/')
            .and_then(|(i, p)| Some((i.parse().ok()?, p.parse().ok()?)));
        match parsed {
            Some((i, p)) if i < p => Ok(Some((i, p))),
            _ => bail!("--worker must be I/P with I < P, got {w:?}"),
        }
    }
}
