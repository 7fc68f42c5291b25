//! Managers for `steady`: commands to random devices, closed loop (`--window`
//! outstanding per manager) or open loop (`--rate` over all managers); round
//! trips into an HDR histogram; events from devices counted.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Result;
use devgate_client::{Body, ConnectOptions, Frame, Receiver, Role, Sender};
use rand::Rng;
use tokio::sync::Semaphore;

use super::Traffic;
use crate::args::Args;
use crate::fleet::{Fleet, unit_name};
use crate::report::{Stats, new_hist, record};

/// Measurement starts this long after the go, once every device is answering.
const WARMUP: Duration = Duration::from_secs(1);
/// Answers still in flight at the end get this long.
const GRACE: Duration = Duration::from_millis(500);
/// Request ids are looked up in a table of this many send times.
const INFLIGHT_SLOTS: usize = 1 << 16;

/// A connected manager whose reader drains presence frames until the traffic starts.
pub(crate) struct Manager {
    pub(crate) tx: Sender,
    drain: tokio::task::JoinHandle<Receiver>,
    stop_drain: Arc<tokio::sync::Notify>,
}

impl Manager {
    /// Stops draining; returns the receiver for the traffic.
    pub(crate) async fn receiver(self) -> Result<(Sender, Receiver)> {
        self.stop_drain.notify_one();
        let rx = self.drain.await?;
        Ok((self.tx, rx))
    }
}

/// Connects `--managers` managers with the data dir's manager certificate. Each
/// reads (and drops) presence frames from the start, so a fleet connecting does
/// not fill the gateway's queue towards it.
pub(crate) async fn connect_managers(
    args: &Args,
    fleet: &Fleet,
    stats: Arc<Stats>,
) -> Result<Vec<Manager>> {
    let tls = fleet.manager_tls(&args.data_dir)?;
    let mut out = Vec::with_capacity(args.managers);
    for _ in 0..args.managers {
        let opts = ConnectOptions::new(args.gateway, &args.server_name, Role::Manager);
        let t = Instant::now();
        let conn = devgate_client::connect(&opts, tls.clone()).await?;
        stats.record_connect(t.elapsed());
        let (tx, mut rx) = conn.split();
        let stop_drain = Arc::new(tokio::sync::Notify::new());
        let stop = stop_drain.clone();
        let drain = tokio::spawn(async move {
            loop {
                let done = tokio::select! {
                    () = stop.notified() => true,
                    r = rx.recv() => r.is_err(),
                };
                if done {
                    return rx;
                }
            }
        });
        out.push(Manager {
            tx,
            drain,
            stop_drain,
        });
    }
    Ok(out)
}

/// Send times of outstanding commands, indexed by request id modulo the table size.
struct InFlight {
    sent: Vec<AtomicU64>,
    epoch: Instant,
}

impl InFlight {
    fn new() -> Self {
        Self {
            sent: (0..INFLIGHT_SLOTS).map(|_| AtomicU64::new(0)).collect(),
            epoch: Instant::now(),
        }
    }
    fn now_ns(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
    fn mark(&self, id: u32) {
        self.sent[id as usize % INFLIGHT_SLOTS].store(self.now_ns(), Ordering::Relaxed);
    }
    fn rtt(&self, id: u32) -> Duration {
        let sent = self.sent[id as usize % INFLIGHT_SLOTS].load(Ordering::Relaxed);
        Duration::from_nanos(self.now_ns().saturating_sub(sent))
    }
}

/// Counters of the measured window, shared by a manager's reader and writer.
#[derive(Default)]
struct Counts {
    commands: AtomicU64,
    responses: AtomicU64,
    events: AtomicU64,
}

/// The measured window.
#[derive(Clone, Copy)]
struct Window {
    from: Instant,
    to: Instant,
}

impl Window {
    fn contains(&self, t: Instant) -> bool {
        t >= self.from && t < self.to
    }
}

/// Runs the traffic for `--duration` after a warm-up; returns the counts.
pub(crate) async fn drive(
    args: &Args,
    managers: Vec<Manager>,
    stats: Arc<Stats>,
) -> Result<Traffic> {
    if managers.is_empty() {
        anyhow::bail!("steady needs at least one manager");
    }
    let start = Instant::now();
    let window = Window {
        from: start + WARMUP,
        to: start + WARMUP + Duration::from_secs_f64(args.duration),
    };
    let counts = Arc::new(Counts::default());
    let per_manager_rate = args.rate as f64 / managers.len() as f64;
    let units: Arc<Vec<String>> = Arc::new((0..args.devices).map(unit_name).collect());
    let mut joins = Vec::new();
    for m in managers {
        let (tx, rx) = m.receiver().await?;
        let inflight = Arc::new(InFlight::new());
        let credit = Arc::new(Semaphore::new(args.window.max(1)));
        let reader = tokio::spawn(read_answers(
            rx,
            inflight.clone(),
            credit.clone(),
            counts.clone(),
            stats.clone(),
            window,
        ));
        let writer = tokio::spawn(send_commands(Writer {
            tx,
            units: units.clone(),
            payload: vec![0x5a; args.payload_bytes()],
            rate: per_manager_rate,
            inflight,
            credit,
            counts: counts.clone(),
            stats: stats.clone(),
            window,
        }));
        joins.push((writer, reader));
    }
    for (w, r) in joins {
        let _ = w.await;
        let _ = r.await;
    }
    Ok(Traffic {
        commands: counts.commands.load(Ordering::Relaxed),
        responses: counts.responses.load(Ordering::Relaxed),
        events: counts.events.load(Ordering::Relaxed),
        ..Traffic::default()
    })
}

async fn read_answers(
    mut rx: Receiver,
    inflight: Arc<InFlight>,
    credit: Arc<Semaphore>,
    counts: Arc<Counts>,
    stats: Arc<Stats>,
    window: Window,
) {
    let mut hist = new_hist();
    let give_up = window.to + GRACE;
    loop {
        let Some(r) = super::next_manager_frame(&mut rx, give_up, &stats).await else {
            break;
        };
        let f = r.frame();
        let now = Instant::now();
        match f.body {
            Body::Response { .. } => {
                credit.add_permits(1);
                if window.contains(now) {
                    counts.responses.fetch_add(1, Ordering::Relaxed);
                    record(&mut hist, inflight.rtt(f.id));
                }
            }
            Body::Event { .. } if window.contains(now) => {
                counts.events.fetch_add(1, Ordering::Relaxed);
            }
            Body::Error { code, .. } => {
                credit.add_permits(1);
                stats.error(&format!("error frame: {}", code.as_str()));
            }
            _ => {}
        }
    }
    stats.merge_rtt(&hist);
}

struct Writer {
    tx: Sender,
    units: Arc<Vec<String>>,
    payload: Vec<u8>,
    rate: f64,
    inflight: Arc<InFlight>,
    credit: Arc<Semaphore>,
    counts: Arc<Counts>,
    stats: Arc<Stats>,
    window: Window,
}

/// Sends commands until the end of the window: `rate` per second, or whenever
/// the window of outstanding commands has room.
async fn send_commands(w: Writer) {
    let mut id: u32 = 0;
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    let mut owed = 0.0f64;
    let stop = tokio::time::Instant::from_std(w.window.to);
    while Instant::now() < w.window.to {
        let batch = if w.rate > 0.0 {
            tick.tick().await;
            owed += w.rate / 1000.0;
            let n = owed.floor();
            owed -= n;
            n as usize
        } else {
            match tokio::time::timeout_at(stop, w.credit.acquire()).await {
                Ok(Ok(p)) => p.forget(),
                _ => break,
            }
            1 + (0..16)
                .take_while(|_| w.credit.try_acquire().map(|p| p.forget()).is_ok())
                .count()
        };
        if batch == 0 {
            continue;
        }
        let ids: Vec<(u32, usize)> = {
            let mut rng = rand::rng();
            (0..batch)
                .map(|_| {
                    id = id.wrapping_add(1);
                    (id, rng.random_range(0..w.units.len()))
                })
                .collect()
        };
        let frames: Vec<Frame<'_>> = ids
            .iter()
            .map(|(id, t)| Frame::command(&w.units[*t], *id, &w.payload))
            .collect();
        for (id, _) in &ids {
            w.inflight.mark(*id);
        }
        if let Err(e) = w.tx.send_batch(&frames).await {
            w.stats.error(&format!(
                "manager send: {}",
                crate::device::error_kind(&e.to_string())
            ));
            break;
        }
        if w.window.contains(Instant::now()) {
            w.counts.commands.fetch_add(batch as u64, Ordering::Relaxed);
        }
    }
}
