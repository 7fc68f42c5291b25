//! A simulated device: connect (with jittered exponential backoff, as a real
//! agent does), then live a session that depends on the scenario, and come back
//! when the gateway goes away, when the storm drops it, or when churn says so.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use devgate_client::{
    Backoff, Body, ClientError, ConnectOptions, Connection, DevgateStream, Frame, Incoming, Mux,
    Role,
};
use rustls::{ClientConfig, HandshakeKind};
use tokio::sync::{Notify, Semaphore, mpsc, watch};

use crate::report::Stats;
use crate::stream::{read_counting, send_until};

/// What the whole worker is doing; every device watches it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Connecting and waiting for the parent's go.
    Setup,
    /// The scenario runs.
    Running,
    /// Storm: the gateway restarts (devices notice on their own) or, with
    /// `drop`, each device drops its connection now.
    Storm { drop: bool },
    /// The end: close everything.
    Stop,
}

/// What devices of one scenario do once connected.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Behaviour {
    /// Stay connected, answer pings.
    Idle,
    /// Answer commands with their payload; send an event every `event_every`.
    Echo { event_every: Option<Duration> },
    /// Accept streams: count what arrives, return credit, send `chunk`-byte data back.
    Stream { chunk: usize, until: Duration },
}

/// What every device of a worker shares.
#[derive(Debug)]
pub(crate) struct DeviceCtx {
    pub(crate) stats: Arc<Stats>,
    pub(crate) opts: ConnectOptions,
    pub(crate) sources: u8,
    pub(crate) backoff: (Duration, Duration),
    pub(crate) timeout: Duration,
    pub(crate) behaviour: Behaviour,
    pub(crate) phase: watch::Receiver<Phase>,
    pub(crate) gate: Semaphore,
    /// Storm: devices back since the storm began, and when the last came back.
    pub(crate) back: AtomicUsize,
    pub(crate) back_notify: Notify,
    pub(crate) epoch: Instant,
}

impl DeviceCtx {
    pub(crate) fn new_options(gateway: std::net::SocketAddr, server_name: &str) -> ConnectOptions {
        ConnectOptions::new(gateway, server_name, Role::Device)
    }

    fn options_for(&self, idx: usize) -> ConnectOptions {
        let mut opts = self.opts.clone();
        if self.sources > 1 {
            let k = u8::try_from(idx % usize::from(self.sources)).unwrap_or(0) + 1;
            opts.bind = Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, k)));
            opts.before_bind = Some(crate::sys::bind_address_no_port);
        }
        opts
    }
}

/// Why a session ended.
enum End {
    Stop,
    Churn,
    Dropped,
    Lost(String),
}

/// One device from first connect to the end of the run. `ready` hears once
/// whether its first connect worked.
pub(crate) async fn run(
    ctx: Arc<DeviceCtx>,
    idx: usize,
    tls: Arc<ClientConfig>,
    churn: Arc<Notify>,
    ready: mpsc::Sender<bool>,
) {
    let opts = ctx.options_for(idx);
    let mut backoff = Backoff::new(ctx.backoff.0, ctx.backoff.1);
    let mut first = Some(ready);
    let mut storm_pending = false;
    loop {
        let Some(conn) = connect_retrying(&ctx, &opts, &tls, &mut backoff).await else {
            if let Some(r) = first.take() {
                let _ = r.send(false).await;
            }
            if storm_pending {
                ctx.stats.error("storm: device not back within --timeout");
            }
            return;
        };
        if let Some(r) = first.take() {
            let _ = r.send(true).await;
        }
        if storm_pending {
            storm_pending = false;
            ctx.back.fetch_add(1, Ordering::Relaxed);
            ctx.back_notify.notify_one();
        }
        ctx.stats.sessions.fetch_add(1, Ordering::Relaxed);
        let end = match ctx.behaviour {
            Behaviour::Stream { chunk, until } => stream_session(&ctx, conn, chunk, until).await,
            _ => session(&ctx, conn, &churn).await,
        };
        ctx.stats.sessions.fetch_sub(1, Ordering::Relaxed);
        match end {
            End::Stop => return,
            End::Churn => {}
            End::Dropped => {
                storm_pending = true;
                tokio::time::sleep(backoff.next_delay()).await;
            }
            End::Lost(kind) => {
                if matches!(*ctx.phase.borrow(), Phase::Storm { .. }) {
                    storm_pending = true;
                } else if *ctx.phase.borrow() == Phase::Stop {
                    return;
                } else {
                    ctx.stats.error(&kind);
                }
                // Like an agent: wait a jittered moment before the first retry too,
                // or the whole fleet hits the restarted gateway in the same millisecond.
                tokio::time::sleep(backoff.next_delay()).await;
            }
        }
    }
}

/// Connects, retrying with backoff until `--timeout`. Failed attempts are
/// errors outside a storm and retries inside one (a restarting gateway refuses
/// connections; that is the point of the exercise).
async fn connect_retrying(
    ctx: &DeviceCtx,
    opts: &ConnectOptions,
    tls: &Arc<ClientConfig>,
    backoff: &mut Backoff,
) -> Option<Connection> {
    let give_up = Instant::now() + ctx.timeout;
    loop {
        if *ctx.phase.borrow() == Phase::Stop {
            return None;
        }
        let attempt = {
            let _permit = ctx.gate.acquire().await.ok()?;
            let t = Instant::now();
            devgate_client::connect(opts, tls.clone())
                .await
                .map(|c| (c, t.elapsed()))
        };
        match attempt {
            Ok((conn, took)) => {
                backoff.reset();
                let s = &ctx.stats;
                s.record_connect(took);
                s.add(&s.handshakes, 1);
                match conn.handshake_kind() {
                    Some(HandshakeKind::Resumed) => s.add(&s.resumed, 1),
                    _ => s.add(&s.full_handshakes, 1),
                }
                return Some(conn);
            }
            Err(e) => {
                ctx.stats.add(&ctx.stats.retries, 1);
                if !matches!(*ctx.phase.borrow(), Phase::Storm { .. }) {
                    ctx.stats
                        .error(&format!("connect: {}", error_kind(&e.to_string())));
                }
            }
        }
        let delay = backoff.next_delay();
        if Instant::now() + delay >= give_up {
            return None;
        }
        tokio::time::sleep(delay).await;
    }
}

/// The first words of an error message: its kind, without addresses or ids.
pub(crate) fn error_kind(msg: &str) -> String {
    let head: String = msg.chars().take(80).collect();
    head.split(" at ")
        .next()
        .unwrap_or(&head)
        .split(':')
        .take(2)
        .collect::<Vec<_>>()
        .join(":")
        .trim()
        .to_owned()
}

/// An idle or echoing session.
async fn session(ctx: &DeviceCtx, mut conn: Connection, churn: &Notify) -> End {
    let mut phase = ctx.phase.clone();
    // React to changes from now on only: a device back from a storm must not see
    // the storm again.
    phase.borrow_and_update();
    let event_every = match ctx.behaviour {
        Behaviour::Echo { event_every } => event_every,
        _ => None,
    };
    // Spread the first event over one period, so events do not come in waves.
    let mut next_event =
        event_every.map(|p| tokio::time::Instant::now() + p.mul_f64(rand::random::<f64>()));
    let stats = &ctx.stats;
    loop {
        let event_at =
            next_event.unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            r = conn.recv() => match r {
                Ok(Incoming::Frame(r)) => {
                    stats.add(&stats.frames, 1);
                    let f = r.frame();
                    if let Body::Command { payload } = f.body {
                        if let Err(e) = conn.send(&Frame::response("", f.id, payload)).await {
                            return End::Lost(format!("device send: {}", error_kind(&e.to_string())));
                        }
                        stats.add(&stats.frames, 1);
                    }
                }
                Ok(Incoming::Closed { code, .. }) => {
                    return End::Lost(format!("device closed by gateway ({code:?})"));
                }
                Err(e) => return End::Lost(format!("device: {}", error_kind(&e.to_string()))),
            },
            changed = phase.changed() => {
                let now = if changed.is_err() { Phase::Stop } else { *phase.borrow_and_update() };
                match now {
                    Phase::Stop => return End::Stop,
                    Phase::Storm { drop: true } => return End::Dropped,
                    _ => {}
                }
            }
            () = churn.notified() => {
                let _ = conn.close(1000, "churn").await;
                return End::Churn;
            }
            () = tokio::time::sleep_until(event_at), if next_event.is_some() => {
                // Events only while the scenario runs: before the go nobody reads them.
                if *ctx.phase.borrow() == Phase::Running {
                    if let Err(e) = conn.send(&Frame::event("", b"loadgen event")).await {
                        return End::Lost(format!("device send: {}", error_kind(&e.to_string())));
                    }
                    stats.add(&stats.frames, 1);
                }
                next_event = event_every.map(|p| event_at + p);
            }
        }
    }
}

/// A stream session: accept whatever streams the manager opens, count the bytes (the
/// library returns credit as they are read), and send data back under the manager's
/// credit until `until` (from the worker's epoch).
async fn stream_session(ctx: &DeviceCtx, conn: Connection, chunk: usize, until: Duration) -> End {
    let mux = Mux::new(conn);
    let mut phase = ctx.phase.clone();
    phase.borrow_and_update();
    let stop_at = ctx.epoch + until;
    let mut tasks = Vec::new();
    let end = loop {
        tokio::select! {
            incoming = mux.accept_stream() => match incoming {
                Some(incoming) => tasks.push(tokio::spawn(serve_stream(
                    incoming.accept(),
                    ctx.stats.clone(),
                    chunk,
                    stop_at,
                ))),
                // The connection ended; next_frame says how.
                None => break lost(mux.next_frame().await.err()),
            },
            r = mux.next_frame() => if let Err(e) = r {
                break lost(Some(e));
            },
            changed = phase.changed() => {
                if changed.is_err() || *phase.borrow_and_update() == Phase::Stop {
                    break End::Stop;
                }
            }
        }
    };
    for t in tasks {
        t.abort();
    }
    end
}

/// Why a device's connection ended, as [`session`] words it.
fn lost(e: Option<ClientError>) -> End {
    match e {
        Some(ClientError::Closed { code, .. }) => {
            End::Lost(format!("device closed by gateway ({code:?})"))
        }
        Some(e) => End::Lost(format!("device: {}", error_kind(&e.to_string()))),
        None => End::Lost("device: connection ended".to_owned()),
    }
}

/// One accepted stream: count what arrives, send `chunk`-byte data back until `stop_at`.
async fn serve_stream(stream: DevgateStream, stats: Arc<Stats>, chunk: usize, stop_at: Instant) {
    let (rd, wr) = tokio::io::split(stream);
    // Both directions in this one task, so that ending the session (which aborts it)
    // stops both at once, before the connection closes under them. The reader runs until
    // the manager closes the stream (or the connection ends, which the session reports);
    // the sender then stops at its next write.
    let forever = Instant::now() + Duration::from_secs(86_400);
    tokio::join!(
        send_until(wr, chunk, stop_at, &stats),
        read_counting(rd, chunk, forever, |bytes, frames| {
            stats.add(&stats.frames, frames);
            stats.add(&stats.bytes, bytes);
        })
    );
}
