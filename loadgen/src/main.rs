//! `devgate-loadgen`: simulated devices and managers against a real gateway.
//!
//! `devgate-loadgen <connect|steady|stream|storm|churn|enroll|attack> --gateway ADDR
//! --data-dir DIR … --json FILE` (see docs/OPERATIONS.md, "Load testing").
//!
//! How the parts fit:
//! * `args`: the command line and its checks.
//! * `fleet`: credentials made offline from the gateway's data dir (device
//!   certificates from its device CA, the manager certificate) and the
//!   per-device TLS configs over one shared session cache.
//! * `device`: one simulated device: connect with jittered exponential
//!   backoff, live the scenario's session, come back after a loss.
//! * `stream`: the sending side of a flow-controlled byte stream.
//! * `worker`: a share of the devices and their side of the scenario.
//! * `process`: workers as child processes (JSON lines on stdin/stdout), to get
//!   past the per-process descriptor limit; or one worker in-process.
//! * `scenarios`: the parent's side: managers, the go, the restart, the clock,
//!   and the merged report.
//! * `report`: counters, timelines, HDR histograms, the JSON and the table.
//! * `progress`: the live display. `sys`: two system calls.
//! * `attack`: hostile connections (slowloris and kin) held beside a measured run.

mod args;
mod attack;
mod device;
mod fleet;
mod process;
mod progress;
mod report;
mod scenarios;
mod stream;
mod sys;
mod worker;

use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;

use crate::args::Args;

fn main() -> Result<()> {
    let args = Args::parse();
    args.validate()?;
    let slot = args.worker_slot()?;
    // A worker process owns up to 18,000 sockets: it needs the whole hard limit.
    if let Err(e) = sys::raise_nofile() {
        eprintln!("devgate-loadgen: cannot raise RLIMIT_NOFILE to the hard limit: {e}");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    if let Some((i, p)) = slot {
        let r = rt.block_on(process::child_main(args, i, p));
        rt.shutdown_timeout(Duration::from_secs(1));
        return r;
    }
    if args.scenario == args::Scenario::Attack {
        let r = rt.block_on(attack::run(&args));
        rt.shutdown_timeout(Duration::from_secs(1));
        return r;
    }
    let report = rt.block_on(scenarios::run(&args))?;
    print!("{}", report.summary());
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    // Sessions are dropped with the runtime; don't wait for orderly closes.
    rt.shutdown_timeout(Duration::from_secs(1));
    Ok(())
}
