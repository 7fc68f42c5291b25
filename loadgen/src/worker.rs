//! A worker owns a share of the devices: it issues their certificates,
//! connects them, and runs their side of the scenario on the parent's word.
//! The same code runs in-process (one worker) or in a child process (several,
//! see `process`), so both paths are tested by the same suites.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use rand::Rng;
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, Semaphore, mpsc, watch};

use crate::args::{Args, Scenario};
use crate::device::{self, Behaviour, DeviceCtx, Phase};
use crate::fleet::Fleet;
use crate::report::{Sampler, Stats, TimelineEntry, WorkerReport, secs_since};

/// Worker → parent.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "msg", rename_all = "snake_case")]
pub(crate) enum Up {
    /// The connect phase is over.
    Ready { sessions: usize, connect_secs: f64 },
    /// Once a second, for the progress display.
    Tick { entry: TimelineEntry },
    /// Storm: every device that was connected is back (or the timeout passed).
    Back { secs: f64, back: usize },
    /// The end.
    Report { report: Box<WorkerReport> },
}

/// Parent → worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Down {
    Go,
    Stop,
}

/// Devices `[i·n/p, (i+1)·n/p)`: worker `i` of `p`.
pub(crate) fn share(devices: usize, i: usize, p: usize) -> Vec<usize> {
    (i * devices / p..(i + 1) * devices / p).collect()
}

fn behaviour(args: &Args) -> Behaviour {
    match args.scenario {
        Scenario::Steady => Behaviour::Echo {
            event_every: (args.event_rate > 0).then(|| {
                Duration::from_secs_f64(args.devices as f64 / args.event_rate as f64)
            }),
        },
        Scenario::Stream => Behaviour::Stream {
            chunk: args.payload_bytes(),
            until: Duration::ZERO,
        },
        _ => Behaviour::Idle,
    }
}

/// Runs one worker to the end; `down` carries the parent's words, `up` ours.
pub(crate) async fn run(
    args: Args,
    indices: Vec<usize>,
    epoch_ms: u64,
    share_of: f64,
    mut down: mpsc::Receiver<Down>,
    up: mpsc::Sender<Up>,
) -> Result<()> {
    let fleet = Fleet::load(&args.data_dir, args.resume, args.devices)?;
    let tls = fleet.issue(&indices).context("issuing device certificates")?;
    let stats = Arc::new(Stats::new());
    let (phase_tx, phase_rx) = watch::channel(Phase::Setup);
    let epoch = Instant::now();
    let mut behaviour = behaviour(&args);
    if let Behaviour::Stream { until, .. } = &mut behaviour {
        // Streams run from the go until the end of --duration (plus the connect phase,
        // which the parent measures separately); the parent closes them anyway.
        *until = Duration::from_secs_f64(args.timeout + args.duration);
    }
    let ctx = Arc::new(DeviceCtx {
        stats: stats.clone(),
        opts: DeviceCtx::new_options(args.gateway, &args.server_name),
        sources: args.source_count(),
        backoff: (
            Duration::from_millis(args.backoff_min_ms),
            Duration::from_millis(args.backoff_max_ms),
        ),
        timeout: Duration::from_secs_f64(args.timeout),
        behaviour,
        phase: phase_rx,
        gate: Semaphore::new(args.concurrency.max(1)),
        back: Default::default(),
        back_notify: Notify::new(),
        epoch,
    });
    let timeline = Arc::new(std::sync::Mutex::new(Sampler::new(epoch_ms)));
    let sampler = spawn_sampler(epoch_ms, stats.clone(), timeline.clone(), up.clone());

    let started = Instant::now();
    let (ready_tx, mut ready_rx) = mpsc::channel::<bool>(indices.len().max(1));
    let churn: Vec<Arc<Notify>> = indices.iter().map(|_| Arc::new(Notify::new())).collect();
    let mut tasks = Vec::with_capacity(indices.len());
    for ((&idx, tls), churn) in indices.iter().zip(tls).zip(&churn) {
        tasks.push(tokio::spawn(device::run(
            ctx.clone(),
            idx,
            tls,
            churn.clone(),
            ready_tx.clone(),
        )));
    }
    drop(ready_tx);
    let mut sessions = 0;
    while let Some(ok) = ready_rx.recv().await {
        sessions += usize::from(ok);
    }
    let connect_secs = secs_since(started);
    let _ = up.send(Up::Ready { sessions, connect_secs }).await;

    let mut at_go = Snapshot::default();
    let mut stopped = false;
    if wait_for(&mut down, Down::Go).await {
        if matches!(args.scenario, Scenario::Storm | Scenario::Churn) {
            at_go = Snapshot::take(&stats);
        }
        match args.scenario {
            Scenario::Storm => {
                let _ = phase_tx.send(Phase::Storm { drop: args.drop });
                let (secs, back) = wait_all_back(&ctx, sessions, Duration::from_secs_f64(args.timeout)).await;
                let _ = up.send(Up::Back { secs, back }).await;
            }
            Scenario::Churn => {
                if let Ok(mut h) = stats.connect_hist.lock() {
                    *h = Some(crate::report::new_hist());
                }
                let _ = phase_tx.send(Phase::Running);
                let rate = args.rate as f64 * share_of;
                let duration = Duration::from_secs_f64(args.duration);
                if !churn_for(&churn, rate, duration, &mut down).await {
                    stopped = true;
                }
            }
            _ => {
                let _ = phase_tx.send(Phase::Running);
            }
        }
        if !stopped {
            wait_for(&mut down, Down::Stop).await;
        }
    }
    // The last sample before the devices go: the timeline ends with the fleet as it was.
    if let Ok(mut t) = timeline.lock() {
        t.sample(&stats);
    }
    let _ = phase_tx.send(Phase::Stop);
    // Devices notice Stop at their next await; give them a moment, then cut.
    tokio::time::sleep(Duration::from_millis(100)).await;
    for t in &tasks {
        t.abort();
    }
    sampler.abort();
    let timeline = match timeline.lock() {
        Ok(mut t) => std::mem::replace(&mut *t, Sampler::new(epoch_ms)),
        Err(_) => Sampler::new(epoch_ms),
    };
    let mut report = WorkerReport::from_stats(&stats, timeline)?;
    report.devices = indices.len();
    report.sessions = sessions;
    report.connect_secs = connect_secs;
    at_go.subtract_from(&mut report);
    let _ = up.send(Up::Report { report: Box::new(report) }).await;
    Ok(())
}

/// Samples the counters once a second into `timeline` and tells the parent.
fn spawn_sampler(
    epoch_ms: u64,
    stats: Arc<Stats>,
    timeline: Arc<std::sync::Mutex<Sampler>>,
    up: mpsc::Sender<Up>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        // Sample on the shared clock's whole seconds, so that every process's
        // entry `t` covers the same second.
        let into_second = crate::report::unix_ms().saturating_sub(epoch_ms) % 1000;
        let first = tokio::time::Instant::now() + Duration::from_millis(1000 - into_second);
        let mut tick = tokio::time::interval_at(first, Duration::from_secs(1));
        loop {
            tick.tick().await;
            let entry = match timeline.lock() {
                Ok(mut t) => {
                    t.sample(&stats);
                    t.entries.last().copied()
                }
                Err(_) => None,
            };
            if let Some(entry) = entry {
                let _ = up.try_send(Up::Tick { entry });
            }
        }
    })
}

/// Waits for `want`; false when the parent said Stop first or went away.
async fn wait_for(down: &mut mpsc::Receiver<Down>, want: Down) -> bool {
    loop {
        match down.recv().await {
            Some(w) if w == want => return true,
            Some(Down::Stop) | None => return false,
            Some(_) => {}
        }
    }
}

/// Storm: until `expected` devices are back or `timeout` passed; returns the
/// seconds it took and how many came back.
async fn wait_all_back(ctx: &DeviceCtx, expected: usize, timeout: Duration) -> (f64, usize) {
    let t0 = Instant::now();
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let back = ctx.back.load(Ordering::Relaxed);
        if back >= expected {
            return (secs_since(t0), back);
        }
        if tokio::time::timeout_at(deadline, ctx.back_notify.notified())
            .await
            .is_err()
        {
            return (secs_since(t0), ctx.back.load(Ordering::Relaxed));
        }
    }
}

/// Churn: `rate` reconnects per second over random devices for `duration`;
/// false when the parent said Stop (or went away) meanwhile.
async fn churn_for(
    devices: &[Arc<Notify>],
    rate: f64,
    duration: Duration,
    down: &mut mpsc::Receiver<Down>,
) -> bool {
    if devices.is_empty() || rate <= 0.0 {
        return true;
    }
    let step = Duration::from_millis(10);
    let mut tick = tokio::time::interval(step);
    let stop_at = tokio::time::Instant::now() + duration;
    let mut owed = 0.0f64;
    while tokio::time::Instant::now() < stop_at {
        tokio::select! {
            _ = tick.tick() => {}
            w = down.recv() => if matches!(w, Some(Down::Stop) | None) { return false },
        }
        owed += rate * step.as_secs_f64();
        let n = owed.floor();
        owed -= n;
        let mut rng = rand::rng();
        for _ in 0..n as usize {
            devices[rng.random_range(0..devices.len())].notify_one();
        }
    }
    true
}

/// Counters at the go: storm and churn report what happened after it.
#[derive(Debug, Default)]
struct Snapshot {
    handshakes: u64,
    resumed: u64,
    full_handshakes: u64,
    retries: u64,
}

impl Snapshot {
    fn take(s: &Stats) -> Self {
        Self {
            handshakes: s.handshakes.load(Ordering::Relaxed),
            resumed: s.resumed.load(Ordering::Relaxed),
            full_handshakes: s.full_handshakes.load(Ordering::Relaxed),
            retries: s.retries.load(Ordering::Relaxed),
        }
    }

    fn subtract_from(&self, r: &mut WorkerReport) {
        r.handshakes_at_go = self.handshakes;
        r.handshakes = r.handshakes.saturating_sub(self.handshakes);
        r.resumed = r.resumed.saturating_sub(self.resumed);
        r.full_handshakes = r.full_handshakes.saturating_sub(self.full_handshakes);
        r.retries = r.retries.saturating_sub(self.retries);
    }
}
