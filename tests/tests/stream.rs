//! Streams: 64 MiB from a manager to a device and back through a real gateway, with slow
//! readers on both ends. Flow control must keep the gateway's memory bounded.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Result, bail};
use devgate_client::{Body, Frame, Incoming};
use devgate_tests::Gateway;
use sha2::{Digest, Sha256};
use tokio::sync::{Semaphore, mpsc};

const TOTAL: usize = 64 * 1024 * 1024;
const CHUNK: usize = 16 * 1024;
const WINDOW: u32 = 256 * 1024;
/// Receivers return credit in steps of this many bytes, sleeping between steps.
const GRANT: usize = 64 * 1024;
const SLOW: Duration = Duration::from_millis(2);

fn pattern(offset: usize) -> Vec<u8> {
    (0..CHUNK)
        .map(|i| ((offset + i) as u64 * 2_654_435_761 % 251) as u8)
        .collect()
}

fn expected_digest() -> Vec<u8> {
    let mut h = Sha256::new();
    for off in (0..TOTAL).step_by(CHUNK) {
        h.update(pattern(off));
    }
    h.finalize().to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_carries_64_mib_each_way_with_slow_readers_and_bounded_gateway_memory() -> Result<()>
{
    let gw = Gateway::start("")?;
    let mgr = gw.manager().await?;
    let dev = gw.device("stream-dev").await?;
    let (mtx, mut mrx) = mgr.split();
    let (dtx, mut drx) = dev.split();
    let baseline = gw.rss_kib()?;
    let peak = Arc::new(AtomicU64::new(baseline));
    let sampler = {
        let peak = peak.clone();
        let pid = gw.pid();
        tokio::spawn(async move {
            loop {
                if let Ok(rss) = devgate_tests::rss_kib(pid) {
                    peak.fetch_max(rss, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };

    // Device: accept the stream and echo everything back under the manager's credit. It
    // returns credit to the manager only once it has echoed the data (slowly), so what it
    // holds is bounded by the window — and its reader never waits on the echo, so credit
    // frames from the manager are always read.
    let device = tokio::spawn(async move {
        let credit = Arc::new(Semaphore::new(0));
        let (echo_tx, echo_rx) = mpsc::unbounded_channel::<Vec<u8>>();
        let mut echo_rx = Some(echo_rx);
        let mut got = 0usize;
        let mut hasher = Sha256::new();
        let mut echo_task = None;
        loop {
            let r = match drx.recv_timeout(Duration::from_secs(30)).await? {
                Some(Incoming::Frame(r)) => r,
                Some(Incoming::Closed { code, reason }) => {
                    bail!("device closed: {code:?} {reason}")
                }
                None => bail!("device: nothing for 30 s after {got} bytes"),
            };
            let f = r.frame();
            match f.body {
                Body::StreamOpen { window, payload } => {
                    assert_eq!(payload, b"echo");
                    let stream_id = f.id;
                    credit.add_permits(window as usize);
                    dtx.send(&Frame::stream_window("", stream_id, WINDOW))
                        .await?;
                    let (dtx, credit) = (dtx.clone(), credit.clone());
                    let Some(mut echo_rx) = echo_rx.take() else {
                        bail!("second StreamOpen")
                    };
                    echo_task = Some(tokio::spawn(async move {
                        let mut since_grant = 0usize;
                        while let Some(data) = echo_rx.recv().await {
                            credit.acquire_many(data.len() as u32).await?.forget();
                            dtx.send(&Frame::stream_data("", stream_id, &data)).await?;
                            since_grant += data.len();
                            if since_grant >= GRANT {
                                tokio::time::sleep(SLOW).await;
                                dtx.send(&Frame::stream_window("", stream_id, since_grant as u32))
                                    .await?;
                                since_grant = 0;
                            }
                        }
                        anyhow::Ok(())
                    }));
                }
                Body::StreamWindow { increment } => credit.add_permits(increment as usize),
                Body::StreamData { payload } => {
                    hasher.update(payload);
                    got += payload.len();
                    echo_tx.send(payload.to_vec())?;
                }
                Body::StreamClose { .. } => break,
                other => bail!("device got {other:?}"),
            }
        }
        assert_eq!(got, TOTAL);
        drop(echo_tx);
        if let Some(t) = echo_task {
            t.await??;
        }
        anyhow::Ok(hasher.finalize().to_vec())
    });

    // Manager: open, send 64 MiB under the device's credit, read the echo slowly.
    let credit = Arc::new(Semaphore::new(0));
    let sender = {
        let (mtx, credit) = (mtx.clone(), credit.clone());
        tokio::spawn(async move {
            mtx.send(&Frame::stream_open("stream-dev", 1, WINDOW, b"echo"))
                .await?;
            for off in (0..TOTAL).step_by(CHUNK) {
                credit.acquire_many(CHUNK as u32).await?.forget();
                mtx.send(&Frame::stream_data("stream-dev", 1, &pattern(off)))
                    .await?;
            }
            anyhow::Ok(())
        })
    };
    let mut back = 0usize;
    let mut since_grant = 0usize;
    let mut hasher = Sha256::new();
    while back < TOTAL {
        let r = match tokio::time::timeout(Duration::from_secs(30), mrx.recv()).await?? {
            Incoming::Frame(r) => r,
            Incoming::Closed { code, reason } => bail!("manager closed: {code:?} {reason}"),
        };
        let f = r.frame();
        match f.body {
            Body::StreamWindow { increment } => credit.add_permits(increment as usize),
            Body::StreamData { payload } => {
                assert_eq!(f.unit, "stream-dev");
                hasher.update(payload);
                back += payload.len();
                since_grant += payload.len();
                if since_grant >= GRANT {
                    tokio::time::sleep(SLOW).await;
                    mtx.send(&Frame::stream_window("stream-dev", 1, since_grant as u32))
                        .await?;
                    since_grant = 0;
                }
            }
            Body::Presence { .. } => {}
            other => bail!("manager got {other:?}"),
        }
    }
    sender.await??;
    mtx.send(&Frame::stream_close("stream-dev", 1, 0, "done"))
        .await?;
    let device_digest = device.await??;
    sampler.abort();
    let expected = expected_digest();
    assert_eq!(device_digest, expected, "manager → device data corrupted");
    assert_eq!(
        hasher.finalize().to_vec(),
        expected,
        "device → manager data corrupted"
    );
    let grown_mib = peak.load(Ordering::Relaxed).saturating_sub(baseline) as f64 / 1024.0;
    eprintln!(
        "gateway RSS: baseline {baseline} KiB, peak growth {grown_mib:.1} MiB while moving 128 MiB"
    );
    assert!(
        grown_mib < 24.0,
        "gateway RSS grew by {grown_mib:.1} MiB: flow control is not bounding memory"
    );
    Ok(())
}

/// Bulk data from a device to a manager on another worker, the manager granting credit as
/// it reads, so the transfer waits on data and credit frames crossing between the workers
/// thousands of times. A worker that leaves bytes queued for a socket and goes to sleep
/// (the epoll driver once did with what its last inbox batch of a loop turn queued: the
/// device has spent its credit, the manager has not been sent what would make it grant
/// more) stalls the stream until its next tick, up to a second each time. Four rounds of
/// 64 MiB; no gap between two data frames may reach [`STALL`] (a tick-length stall, a
/// hundred times the gaps of a healthy transfer even on a loaded machine), and the whole
/// is bounded in time. Before the fix a round stalled about one time in three on epoll.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_data_crossing_workers_never_waits_for_a_tick() -> Result<()> {
    const ROUNDS: u32 = 4;
    const ROUND_BYTES: usize = 64 * 1024 * 1024;
    const STALL_WINDOW: u32 = 64 * 1024;
    const STALL_GRANT: usize = 16 * 1024;
    const STALL: Duration = Duration::from_millis(500);
    const BOUND: Duration = Duration::from_secs(60);
    let gw = Gateway::start("")?;
    let mgr = gw.manager().await?;
    // With handshake workers, sessions go round robin over the routing workers: the
    // manager and the device land on different ones.
    let dev = gw.device("bulk-dev").await?;
    let (mtx, mut mrx) = mgr.split();
    let (dtx, mut drx) = dev.split();
    let started = std::time::Instant::now();
    // Device: sends ROUND_BYTES on every stream opened, under the manager's credit.
    let device = tokio::spawn(async move {
        let chunk = vec![0x5a; CHUNK];
        for _ in 0..ROUNDS {
            let (mut stream, mut sent, mut credit) = (None, 0usize, 0usize);
            while sent < ROUND_BYTES {
                while stream.is_none() || credit < CHUNK {
                    let Some(Incoming::Frame(r)) = drx.recv_timeout(BOUND).await? else {
                        bail!("device: no credit after {sent} bytes");
                    };
                    let f = r.frame();
                    match f.body {
                        Body::StreamOpen { window, .. } => {
                            stream = Some(f.id);
                            credit += window as usize;
                            dtx.send(&Frame::stream_window("", f.id, STALL_WINDOW))
                                .await?;
                        }
                        Body::StreamWindow { increment } if stream == Some(f.id) => {
                            credit += increment as usize
                        }
                        _ => {}
                    }
                }
                let Some(id) = stream else { continue };
                dtx.send(&Frame::stream_data("", id, &chunk)).await?;
                sent += CHUNK;
                credit -= CHUNK;
            }
        }
        anyhow::Ok(())
    });
    let mut gaps = Vec::new();
    for round in 1..=ROUNDS {
        mtx.send(&Frame::stream_open(
            "bulk-dev",
            round,
            STALL_WINDOW,
            b"source",
        ))
        .await?;
        let (mut got, mut since_grant) = (0usize, 0usize);
        let mut longest_gap = Duration::ZERO;
        let mut last = std::time::Instant::now();
        while got < ROUND_BYTES {
            let left = BOUND.saturating_sub(started.elapsed());
            let Some(Incoming::Frame(r)) = mrx.recv_timeout(left).await? else {
                bail!("round {round}: {got} bytes after {BOUND:?}: the stream stalls");
            };
            let f = r.frame();
            if let Body::StreamData { payload } = f.body
                && f.id == round
            {
                longest_gap = longest_gap.max(last.elapsed());
                last = std::time::Instant::now();
                got += payload.len();
                since_grant += payload.len();
                if since_grant >= STALL_GRANT {
                    mtx.send(&Frame::stream_window("bulk-dev", round, since_grant as u32))
                        .await?;
                    since_grant = 0;
                }
            }
        }
        mtx.send(&Frame::stream_close("bulk-dev", round, 0, ""))
            .await?;
        gaps.push(longest_gap);
    }
    tokio::time::timeout(BOUND, device).await???;
    println!(
        "{ROUNDS} × 64 MiB in {:?}; longest gap between data frames per round {gaps:?}",
        started.elapsed()
    );
    assert!(
        gaps.iter().all(|g| *g < STALL),
        "the stream stalled for a tick: longest gaps per round {gaps:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sending_beyond_the_window_closes_the_stream_with_flow_control() -> Result<()> {
    let gw = Gateway::start("")?;
    let mut mgr = gw.manager().await?;
    let mut dev = gw.device("greedy").await?;
    mgr.send(&Frame::stream_open("greedy", 7, 1024, b"x"))
        .await?;
    let r = loop {
        let r = match dev.recv_timeout(Duration::from_secs(10)).await? {
            Some(Incoming::Frame(r)) => r,
            other => bail!("device: {other:?}"),
        };
        if matches!(r.frame().body, Body::StreamOpen { .. }) {
            break r;
        }
    };
    let id = r.frame().id;
    // The device grants 100 bytes; the manager sends 200.
    dev.send(&Frame::stream_window("", id, 100)).await?;
    loop {
        let r = match mgr.recv_timeout(Duration::from_secs(10)).await? {
            Some(Incoming::Frame(r)) => r,
            other => bail!("manager: {other:?}"),
        };
        if matches!(r.frame().body, Body::StreamWindow { increment: 100 }) {
            break;
        }
    }
    mgr.send(&Frame::stream_data("greedy", 7, &[0u8; 200]))
        .await?;
    for conn in [&mut mgr, &mut dev] {
        loop {
            let r = match conn.recv_timeout(Duration::from_secs(10)).await? {
                Some(Incoming::Frame(r)) => r,
                other => bail!("no stream close: {other:?}"),
            };
            if let Body::StreamClose { code, .. } = r.frame().body {
                assert_eq!(code, 11, "flow_control");
                break;
            }
        }
    }
    Ok(())
}

/// The client library's streams as tokio I/O objects (`Mux`, `DevgateStream`): what the
/// agent and operator tools build on.
mod mux {
    use std::time::Duration;

    use anyhow::{Context, Result, bail};
    use devgate_client::{ClientError, ErrorCode, Mux};
    use devgate_tests::Gateway;
    use sha2::{Digest, Sha256};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const STEP: Duration = Duration::from_secs(20);

    /// A device that echoes `echo` streams, says hello and closes on `hello`, and refuses
    /// anything else with a reason naming it.
    fn serve(dev: Mux) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            while let Some(incoming) = dev.accept_stream().await {
                match incoming.params() {
                    b"echo" => {
                        let stream = incoming.accept();
                        tokio::spawn(async move {
                            let (mut rd, mut wr) = tokio::io::split(stream);
                            let _ = tokio::io::copy(&mut rd, &mut wr).await;
                            let _ = wr.shutdown().await;
                        });
                    }
                    b"hello" => {
                        let mut stream = incoming.accept();
                        let _ = stream.write_all(b"hello from the device").await;
                        let _ = stream.shutdown().await;
                    }
                    other => {
                        let what = String::from_utf8_lossy(other).into_owned();
                        incoming.refuse(
                            ErrorCode::NotPermitted,
                            &format!("\"{what}\" is not on this device's allow-list"),
                        );
                    }
                }
            }
        })
    }

    async fn pair(gw: &Gateway, unit: &str) -> Result<(Mux, tokio::task::JoinHandle<()>)> {
        let mut mgr = gw.manager().await?;
        let dev = gw.device(unit).await?;
        // Wait for the device's presence, so the opens below find it.
        loop {
            let Some(devgate_client::Incoming::Frame(r)) = mgr.recv_timeout(STEP).await? else {
                bail!("no presence for {unit}");
            };
            if r.frame().unit == unit {
                break;
            }
        }
        Ok((Mux::new(mgr), serve(Mux::new(dev))))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn streams_are_async_read_write_with_credit_eof_and_refusals() -> Result<()> {
        let gw = Gateway::start("")?;
        let (mgr, device) = pair(&gw, "mux-1").await?;

        // 16 MiB through an echo stream, written and read at once: credit keeps both
        // directions moving without either side buffering it all.
        const TOTAL: usize = 16 * 1024 * 1024;
        let data: Vec<u8> = (0..TOTAL).map(|i| (i * 7 % 251) as u8).collect();
        let want = Sha256::digest(&data);
        let stream = tokio::time::timeout(STEP, mgr.open_stream("mux-1", b"echo"))
            .await
            .context("open timed out")??;
        let (mut rd, mut wr) = tokio::io::split(stream);
        let writer = tokio::spawn(async move {
            wr.write_all(&data).await?;
            Ok::<_, std::io::Error>(wr)
        });
        let mut got = vec![0u8; TOTAL];
        tokio::time::timeout(Duration::from_secs(60), rd.read_exact(&mut got))
            .await
            .context("echo timed out")??;
        assert_eq!(Sha256::digest(&got), want, "echoed bytes differ");
        let mut wr = writer.await??;
        // Shutting down closes the stream (no half-close): the echo side sees end of file,
        // and this side reads end of file too.
        wr.shutdown().await?;
        let mut rest = Vec::new();
        let n = tokio::time::timeout(STEP, rd.read_to_end(&mut rest)).await??;
        assert_eq!(n, 0);

        // End of file after the device's last bytes.
        let mut hello = tokio::time::timeout(STEP, mgr.open_stream("mux-1", b"hello")).await??;
        let mut text = String::new();
        tokio::time::timeout(STEP, hello.read_to_string(&mut text)).await??;
        assert_eq!(text, "hello from the device");

        // A refusal names what was refused.
        match tokio::time::timeout(STEP, mgr.open_stream("mux-1", b"tcp:10.9.9.9:22")).await? {
            Err(ClientError::StreamRefused { code, reason }) => {
                assert_eq!(code, u16::from(ErrorCode::NotPermitted));
                assert!(reason.contains("tcp:10.9.9.9:22"), "{reason}");
            }
            other => bail!("expected a refusal, got {other:?}"),
        }
        // A stream to a device that is not connected fails at once.
        let absent = tokio::time::timeout(STEP, mgr.open_stream("nobody", b"echo")).await?;
        assert!(
            matches!(&absent, Err(ClientError::StreamRefused { code, .. }) if *code == u16::from(ErrorCode::DeviceNotConnected)),
            "{absent:?}"
        );

        // The device goes away: an open stream's reader gets an error, not a hang.
        let mut open = tokio::time::timeout(STEP, mgr.open_stream("mux-1", b"echo")).await??;
        device.abort();
        let mut buf = [0u8; 16];
        let r = tokio::time::timeout(STEP, open.read(&mut buf)).await?;
        assert!(r.is_err(), "read after the device left: {r:?}");
        Ok(())
    }
}
