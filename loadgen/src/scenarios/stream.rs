//! Managers for `stream`: each of `--streams` streams goes to its own device;
//! the manager sends `--payload`-byte data frames under the device's credit
//! while the device sends data back under the manager's, both for `--duration`.
//! Bytes received on each side are counted (the device side by the workers).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use devgate_client::{Body, Frame, Receiver, Sender};
use tokio::sync::Semaphore;

use super::Traffic;
use super::steady::Manager;
use crate::args::Args;
use crate::fleet::unit_name;
use crate::report::Stats;
use crate::stream::{CHUNK_GRANT, StreamPump, WINDOW};

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
    let mut per_manager: Vec<Vec<(String, u32)>> = vec![Vec::new(); conns.len()];
    for s in 0..args.streams {
        // Spread the streams over the fleet (and so over worker processes).
        let device = s * args.devices / args.streams;
        let id = u32::try_from(s + 1).unwrap_or(u32::MAX);
        per_manager[s % conns.len()].push((unit_name(device), id));
    }
    let mut joins = Vec::new();
    for ((tx, rx), streams) in conns.into_iter().zip(per_manager) {
        joins.push(tokio::spawn(one_manager(
            tx,
            rx,
            streams,
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

/// One manager's streams: open, pump, count what comes back, close.
async fn one_manager(
    tx: Sender,
    mut rx: Receiver,
    streams: Vec<(String, u32)>,
    chunk: usize,
    stop_at: Instant,
    stats: Arc<Stats>,
) -> Result<Traffic> {
    let mut credit: HashMap<u32, (Arc<Semaphore>, String, usize)> = HashMap::new();
    for (unit, id) in &streams {
        tx.send(&Frame::stream_open(unit, *id, WINDOW, b"loadgen"))
            .await?;
        credit.insert(*id, (Arc::new(Semaphore::new(0)), unit.clone(), 0));
    }
    let mut pumps = Vec::new();
    let mut started = std::collections::HashSet::new();
    let mut traffic = Traffic::default();
    let accept_by = Instant::now() + ACCEPT_TIMEOUT;
    let give_up = stop_at + Duration::from_millis(500);
    loop {
        let Some(r) = super::next_manager_frame(&mut rx, give_up, &stats).await else {
            break;
        };
        let f = r.frame();
        let Some((sem, unit, owed)) = credit.get_mut(&f.id) else {
            continue;
        };
        match f.body {
            Body::StreamWindow { increment } => {
                sem.add_permits(increment as usize);
                if started.insert(f.id) {
                    pumps.push(tokio::spawn(
                        StreamPump {
                            tx: tx.clone(),
                            unit: unit.clone(),
                            id: f.id,
                            credit: sem.clone(),
                            chunk,
                            stop_at,
                            stats: stats.clone(),
                        }
                        .run(),
                    ));
                }
            }
            Body::StreamData { payload } => {
                if Instant::now() < stop_at {
                    traffic.bytes += payload.len() as u64;
                    traffic.data_frames += 1;
                }
                *owed += payload.len();
                if *owed >= CHUNK_GRANT {
                    let grant = u32::try_from(*owed).unwrap_or(u32::MAX);
                    *owed = 0;
                    tx.send(&Frame::stream_window(unit, f.id, grant)).await?;
                }
            }
            Body::StreamClose { code, reason } => {
                stats.error(&format!(
                    "stream closed by the gateway: code {code} {reason}"
                ));
            }
            Body::Error { code, .. } => stats.error(&format!("error frame: {}", code.as_str())),
            _ => {}
        }
        if Instant::now() > accept_by && started.len() < streams.len() {
            stats.error("stream not accepted within 10 s");
            break;
        }
    }
    for p in pumps {
        let _ = p.await;
    }
    for (unit, id) in &streams {
        let _ = tx.send(&Frame::stream_close(unit, *id, 0, "done")).await;
    }
    Ok(traffic)
}
