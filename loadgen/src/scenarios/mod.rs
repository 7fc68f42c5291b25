//! The parent's side of every scenario: connect the managers, start the
//! workers that own the devices, wait until they are connected, give the go,
//! drive what the scenario needs (manager traffic, the restart, the clock),
//! then collect the workers' reports into one [`Report`].

mod enroll;
mod steady;
mod stream;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio::sync::mpsc;

use crate::args::{Args, Scenario};
use crate::fleet::Fleet;
use crate::process::{WorkerHandle, spawn_workers};
use crate::progress::Progress;
use crate::report::{Report, Stats, WorkerReport, rss_kib, unix_ms};
use crate::worker::{Down, Up};

/// Runs `args.scenario` to the end.
pub(crate) async fn run(args: &Args) -> Result<Report> {
    if args.scenario == Scenario::Enroll {
        return enroll::run(args).await;
    }
    let epoch_ms = unix_ms();
    let own = Arc::new(Stats::new());
    let p = args.process_count();
    let mut report = Report {
        scenario: args.scenario.name().to_owned(),
        devices: args.devices,
        processes: p,
        sources: args.source_count(),
        duration_secs: args.duration,
        ..Report::default()
    };
    // Managers first, so that the no-manager grace period never refuses the fleet.
    let managers = if matches!(args.scenario, Scenario::Steady | Scenario::Stream) {
        let fleet = Fleet::load(&args.data_dir, false, 0)?;
        steady::connect_managers(args, &fleet, own.clone()).await?
    } else {
        Vec::new()
    };
    report.managers = managers.len();
    let rss_before = args.gateway_pid.and_then(rss_kib);

    let (workers, mut up) = spawn_workers(args, p, epoch_ms)?;
    let mut run = Run {
        workers,
        up: &mut up,
        progress: Progress::new(args.progress, args.devices, p),
        reports: vec![None; p],
        back: Vec::new(),
    };
    let connect_secs = run.wait_ready(args).await?;
    report.connect_secs = connect_secs;
    let mut rss_after = args.gateway_pid.and_then(rss_kib);
    // Go on a whole second of the shared clock: the timeline's seconds then fall
    // either before or after it, and the storm's peak second is its own.
    let into_second = unix_ms().saturating_sub(epoch_ms) % 1000;
    tokio::time::sleep(Duration::from_millis(1000 - into_second)).await;
    let go_t = (unix_ms().saturating_sub(epoch_ms) + 500) / 1000;
    run.say(Down::Go).await;
    let go = Instant::now();
    let mut traffic = Traffic::default();
    match args.scenario {
        Scenario::Connect => {
            run.pump_for(Duration::from_secs_f64(args.hold_secs()))
                .await;
            // After the hold the gateway's handshake buffers are freed: the memory of idle sessions.
            rss_after = args.gateway_pid.and_then(rss_kib);
        }
        Scenario::Steady => {
            let traffic_of = steady::drive(args, managers, own.clone());
            traffic = run.pump_while(traffic_of).await?;
        }
        Scenario::Stream => {
            let traffic_of = stream::drive(args, managers, own.clone());
            traffic = run.pump_while(traffic_of).await?;
        }
        Scenario::Storm => {
            if let Some(cmd) = &args.restart_cmd {
                run_restart(cmd).await?;
            }
            run.wait_back(Duration::from_secs_f64(args.timeout + 10.0))
                .await;
        }
        Scenario::Churn => run.pump_for(Duration::from_secs_f64(args.duration)).await,
        // Run by `attack::run` before any scenario starts.
        Scenario::Enroll | Scenario::Attack => {}
    }
    let scenario_secs = go.elapsed().as_secs_f64();
    run.say(Down::Stop).await;
    let workers = run.collect().await?;
    report.absorb(&workers, &own, &[])?;
    report.connect_secs = connect_secs;
    report.connects_per_sec = report.sessions as f64 / connect_secs.max(1e-9);
    report.set_rss(rss_before, rss_after);
    traffic.apply(&mut report, args.duration);
    match args.scenario {
        Scenario::Storm => storm_figures(&mut report, &workers, go_t),
        Scenario::Churn => {
            report.handshakes_per_sec = report.handshakes as f64 / scenario_secs.max(1e-9);
            report.peak_handshakes_per_sec = peak_after(&report, go_t);
        }
        _ => {}
    }
    Ok(report)
}

/// The storm's own figures: time until the slowest worker had all its devices
/// back, and the handshake rate over that time and at its peak second.
fn storm_figures(report: &mut Report, workers: &[WorkerReport], go_t: u64) {
    let all_back = workers.iter().map(|w| w.back).sum::<usize>() >= report.sessions;
    let secs = workers
        .iter()
        .filter_map(|w| w.all_back_secs)
        .fold(0.0f64, f64::max);
    report.all_back_secs = all_back.then_some(secs);
    report.handshakes_per_sec = report.handshakes as f64 / secs.max(1e-9);
    report.peak_handshakes_per_sec = peak_after(report, go_t);
}

fn peak_after(report: &Report, go_t: u64) -> u64 {
    report
        .timeline
        .iter()
        .filter(|e| e.t > go_t)
        .map(|e| e.handshakes)
        .max()
        .unwrap_or(0)
}

/// Runs the operator's restart command through `sh -c` and checks it worked.
async fn run_restart(cmd: &str) -> Result<()> {
    let shell = cmd.to_owned();
    let status = tokio::task::spawn_blocking(move || {
        std::process::Command::new("sh")
            .arg("-c")
            .arg(&shell)
            .stdin(std::process::Stdio::null())
            .status()
    })
    .await
    .context("the restart command's thread panicked")?
    .with_context(|| format!("running --restart-cmd {cmd:?}"))?;
    if !status.success() {
        bail!("--restart-cmd {cmd:?} failed with {status}");
    }
    Ok(())
}

/// Figures a manager-side driver hands back.
#[derive(Debug, Default)]
pub(crate) struct Traffic {
    pub(crate) commands: u64,
    pub(crate) responses: u64,
    pub(crate) events: u64,
    pub(crate) bytes: u64,
    pub(crate) data_frames: u64,
}

impl Traffic {
    fn apply(&self, r: &mut Report, secs: f64) {
        r.commands = self.commands;
        r.responses = self.responses;
        r.events = self.events;
        if r.scenario == "stream" {
            // Workers count what devices received; managers what came back.
            r.bytes += self.bytes;
            r.bytes_per_sec = r.bytes as f64 / secs;
            r.frames_per_sec = (self.data_frames + r.device_frames) as f64 / secs;
        } else {
            // Each answered command is two routed frames: the command and its response.
            r.frames_per_sec = (2 * self.responses + self.events) as f64 / secs;
            r.commands_per_sec = self.responses as f64 / secs;
        }
    }
}

/// The parent's view of the workers during a run.
struct Run<'a> {
    workers: Vec<WorkerHandle>,
    up: &'a mut mpsc::Receiver<(usize, Up)>,
    progress: Progress,
    reports: Vec<Option<WorkerReport>>,
    back: Vec<(usize, f64, usize)>,
}

impl Run<'_> {
    async fn say(&self, word: Down) {
        for w in &self.workers {
            w.send(word).await;
        }
    }

    /// Handles one message; `None` when every worker is gone.
    fn handle(&mut self, i: usize, m: Up, phase: &str) -> Option<(usize, f64)> {
        match m {
            Up::Tick { entry } => self.progress.tick(i, entry, phase),
            Up::Back { secs, back } => self.back.push((i, secs, back)),
            Up::Report { report } => {
                if let Some(slot) = self.reports.get_mut(i) {
                    *slot = Some(*report);
                }
            }
            Up::Ready {
                sessions,
                connect_secs,
            } => return Some((sessions, connect_secs)),
        }
        None
    }

    /// Until every worker has connected its devices; returns the slowest's time.
    async fn wait_ready(&mut self, args: &Args) -> Result<f64> {
        let mut ready = 0;
        let mut secs = 0.0f64;
        // Certificates are issued first; allow for them on top of the connect timeout.
        let deadline = tokio::time::Instant::now()
            + Duration::from_secs_f64(args.timeout)
            + Duration::from_secs(60 + args.devices as u64 / 500);
        while ready < self.workers.len() {
            let m = tokio::time::timeout_at(deadline, self.up.recv()).await;
            let Ok(Some((i, m))) = m else {
                bail!(
                    "{} of {} workers never finished connecting (see their errors above)",
                    self.workers.len() - ready,
                    self.workers.len()
                );
            };
            if let Some((_, s)) = self.handle(i, m, "connecting") {
                ready += 1;
                secs = secs.max(s);
            }
        }
        Ok(secs)
    }

    /// Keeps the display going for `d`.
    async fn pump_for(&mut self, d: Duration) {
        let until = tokio::time::Instant::now() + d;
        while let Ok(Some((i, m))) = tokio::time::timeout_at(until, self.up.recv()).await {
            self.handle(i, m, "running");
        }
    }

    /// Keeps the display going while `f` runs; returns its result.
    async fn pump_while<F: std::future::Future<Output = Result<Traffic>>>(
        &mut self,
        f: F,
    ) -> Result<Traffic> {
        tokio::pin!(f);
        loop {
            tokio::select! {
                r = &mut f => return r,
                Some((i, m)) = self.up.recv() => { self.handle(i, m, "running"); }
            }
        }
    }

    /// Storm: until every worker says its devices are back.
    async fn wait_back(&mut self, limit: Duration) {
        let until = tokio::time::Instant::now() + limit;
        while self.back.len() < self.workers.len() {
            match tokio::time::timeout_at(until, self.up.recv()).await {
                Ok(Some((i, m))) => {
                    self.handle(i, m, "storm");
                }
                _ => return,
            }
        }
    }

    /// Every worker's report, after Stop.
    async fn collect(mut self) -> Result<Vec<WorkerReport>> {
        let until = tokio::time::Instant::now() + Duration::from_secs(30);
        while self.reports.iter().any(Option::is_none) {
            match tokio::time::timeout_at(until, self.up.recv()).await {
                Ok(Some((i, m))) => {
                    self.handle(i, m, "stopping");
                }
                _ => break,
            }
        }
        self.progress.finish();
        for w in self.workers.drain(..) {
            w.finish().await?;
        }
        let back = std::mem::take(&mut self.back);
        let mut out = Vec::new();
        for (i, r) in self.reports.into_iter().enumerate() {
            let mut r = r.with_context(|| format!("worker {i} sent no report"))?;
            if let Some((_, secs, n)) = back.iter().find(|(w, _, _)| *w == i) {
                r.all_back_secs = Some(*secs);
                r.back = *n;
            }
            out.push(r);
        }
        Ok(out)
    }
}

/// The next frame a manager receives before `give_up`; `None` when the time is up or the
/// connection ended (counted as an error by kind).
pub(crate) async fn next_manager_frame(
    rx: &mut devgate_client::Receiver,
    give_up: std::time::Instant,
    stats: &crate::report::Stats,
) -> Option<devgate_client::Received> {
    use devgate_client::Incoming;
    let wait = give_up.saturating_duration_since(std::time::Instant::now());
    if wait.is_zero() {
        return None;
    }
    match rx.recv_timeout(wait).await {
        Ok(Some(Incoming::Frame(r))) => Some(r),
        Ok(Some(Incoming::Closed { code, .. })) => {
            stats.error(&format!("manager closed by gateway ({code:?})"));
            None
        }
        Err(e) => {
            stats.error(&format!(
                "manager: {}",
                crate::device::error_kind(&e.to_string())
            ));
            None
        }
        Ok(None) => None,
    }
}

/// [`next_manager_frame`] for a manager whose connection runs under a [`devgate_client::Mux`]
/// (stream frames go to its streams; this returns the others).
pub(crate) async fn next_mux_frame(
    mux: &devgate_client::Mux,
    give_up: std::time::Instant,
    stats: &crate::report::Stats,
) -> Option<devgate_client::Received> {
    let wait = give_up.saturating_duration_since(std::time::Instant::now());
    match tokio::time::timeout(wait, mux.next_frame()).await {
        Ok(Ok(r)) => Some(r),
        Ok(Err(devgate_client::ClientError::Closed { code, .. })) => {
            stats.error(&format!("manager closed by gateway ({code:?})"));
            None
        }
        Ok(Err(e)) => {
            stats.error(&format!(
                "manager: {}",
                crate::device::error_kind(&e.to_string())
            ));
            None
        }
        Err(_) => None,
    }
}
