//! Managers for `stream`: each of `--streams` streams goes to its own device;
//! the manager sends `--payload`-byte data frames under the device's credit
//! while the device sends data back under the manager's, both for `--duration`.
//! Bytes received on each side are counted (the device side by the workers).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use devgate_client::{Body, Mux};

use super::Traffic;
use super::steady::Manager;
use crate::args::Args;
use crate::fleet::unit_name;
use crate::report::Stats;
use crate::stream::{read_counting, send_until};

/// How long streams may take to be accepted.
const ACCEPT_TIMEOUT: Duration = Duration::from_secs(10);

/// Opens the streams, runs them for `--duration`, closes them.
pub(crate) async fn drive(
    args: &Args,
    managers: Vec<Manager>,
    stats: Arc<Stats>,
) -> Result<Traffic> {
    let stop_at = Instant::now() + Duration::from_secs_f64(args.duration);
    let mut conns = Vec::new();
    for m in managers {
        conns.push(m.receiver().await?);
    }
    let mut per_manager: Vec<Vec<String>> = vec![Vec::new(); conns.len()];
    for s in 0..args.streams {
        // Spread the streams over the fleet (and so over worker processes).
        let device = s * args.devices / args.streams;
        per_manager[s % conns.len()].push(unit_name(device));
    }
    let mut joins = Vec::new();
    for ((tx, rx), units) in conns.into_iter().zip(per_manager) {
        joins.push(tokio::spawn(one_manager(
            Mux::from_parts(tx, rx),
            units,
            args.payload_bytes(),
            stop_at,
            stats.clone(),
        )));
    }
    let mut total = Traffic::default();
    for j in joins {
        let t = j.await??;
        total.bytes += t.bytes;
        total.data_frames += t.data_frames;
    }
    Ok(total)
}

/// One manager's streams: open, send and count what comes back until `stop_at`, close.
async fn one_manager(
    mux: Mux,
    units: Vec<String>,
    chunk: usize,
    stop_at: Instant,
    stats: Arc<Stats>,
) -> Result<Traffic> {
    let mux = Arc::new(mux);
    let accept_by = Instant::now() + ACCEPT_TIMEOUT;
    let give_up = stop_at + Duration::from_millis(500);
    let mut streams = Vec::new();
    for unit in units {
        let (mux, stats) = (mux.clone(), stats.clone());
        streams.push(tokio::spawn(async move {
            one_stream(&mux, &unit, chunk, (accept_by, stop_at, give_up), &stats).await
        }));
    }
    // Meanwhile read the other frames (presence, errors), so that they never hold up the
    // stream data behind them.
    let mut done = std::pin::pin!(async move {
        let mut traffic = Traffic::default();
        for s in streams {
            if let Ok(t) = s.await {
                traffic.bytes += t.bytes;
                traffic.data_frames += t.data_frames;
            }
        }
        traffic
    });
    let traffic = loop {
        tokio::select! {
            t = &mut done => break t,
            r = super::next_mux_frame(&mux, give_up, &stats) => match r {
                Some(r) => if let Body::Error { code, .. } = r.frame().body {
                    stats.error(&format!("error frame: {}", code.as_str()));
                },
                None => break done.await,
            }
        }
    };
    Ok(traffic)
}

/// One stream: opened by `times.0`, data both ways until `times.1`, counted until
/// `times.2`; then closed (dropped).
async fn one_stream(
    mux: &Mux,
    unit: &str,
    chunk: usize,
    (accept_by, stop_at, give_up): (Instant, Instant, Instant),
    stats: &Arc<Stats>,
) -> Traffic {
    let mut traffic = Traffic::default();
    let wait = tokio::time::Instant::from_std(accept_by);
    let stream = match tokio::time::timeout_at(wait, mux.open_stream(unit, b"loadgen")).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            stats.error(&format!(
                "stream open: {}",
                crate::device::error_kind(&e.to_string())
            ));
            return traffic;
        }
        Err(_) => {
            stats.error("stream not accepted within 10 s");
            return traffic;
        }
    };
    let (rd, wr) = tokio::io::split(stream);
    let sender = {
        let stats = stats.clone();
        tokio::spawn(async move { send_until(wr, chunk, stop_at, &stats).await })
    };
    let ended = read_counting(rd, chunk, give_up, |bytes, frames| {
        if Instant::now() < stop_at {
            traffic.bytes += bytes;
            traffic.data_frames += frames;
        }
    })
    .await;
    if let Some(e) = ended
        && Instant::now() < stop_at
    {
        stats.error(&format!("stream closed by the gateway: {e}"));
    }
    let _ = sender.await;
    traffic
}
