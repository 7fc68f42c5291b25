//! `devgate-loadgen attack`: holds N hostile connections of one kind against a gateway
//! for `--duration` seconds, reconnecting each as soon as the gateway ends it (as a
//! slowloris attacker does). Meant to run as its own process beside a `steady` run, to
//! see what the attack costs the established fleet (`cargo xtask slowloris-bench`).
//!
//! Kinds (`--attack`):
//! - `silent`: a TCP connection that never sends a byte;
//! - `partial-hello`: the first 64 bytes of a TLS ClientHello, then silence;
//! - `slow-head`: a full TLS handshake, then the HTTP request head at one byte per second.
//!
//! Connections come from 127.0.1.1 … 127.0.1.K, K = one per 100 connections (`--sources`
//! overrides), so that the gateway's per-source handshake cap does not turn the attack
//! away and it measures what the data path pays for holding them.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::ValueEnum;
use devgate_pki::PkiPaths;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::args::Args;

/// What each hostile connection does.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub(crate) enum Kind {
    /// TCP connect, then nothing.
    Silent,
    /// Part of a ClientHello, then nothing.
    PartialHello,
    /// TLS handshake, then the HTTP head at one byte per second.
    SlowHead,
}

/// Connections per source address.
const PER_SOURCE: usize = 100;

#[derive(Default)]
struct Counts {
    opened: AtomicU64,
    ended_by_gateway: AtomicU64,
    failed: AtomicU64,
}

/// Runs the attack until `--duration` has passed; prints what happened.
pub(crate) async fn run(args: &Args) -> Result<()> {
    let kind = args
        .attack
        .context("attack needs --attack silent|partial-hello|slow-head")?;
    let n = args.devices;
    let sources = if args.sources > 0 {
        usize::from(args.sources)
    } else {
        n.div_ceil(PER_SOURCE).clamp(1, 254)
    };
    let roots = devgate_pki::load_certs(&PkiPaths::new(&args.data_dir).root_cert())
        .context("reading the root certificate of --data-dir")?;
    let tls = devgate_client::tls_config(&roots, None)?;
    let name = rustls_pki_types::ServerName::try_from(args.server_name.clone())
        .context("--server-name")?;
    let counts = Arc::new(Counts::default());
    let end = Instant::now() + Duration::from_secs_f64(args.duration);
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let src = IpAddr::V4(Ipv4Addr::new(127, 0, 1, 1 + (i % sources) as u8));
        let (gateway, tls, name, counts) =
            (args.gateway, tls.clone(), name.clone(), counts.clone());
        tasks.push(tokio::spawn(async move {
            // Spread the first connects a little, as a real attacker's arrive.
            tokio::time::sleep(Duration::from_micros((i as u64 * 997) % 2_000_000)).await;
            while Instant::now() < end {
                match one(kind, gateway, src, &tls, &name, end, &counts).await {
                    Ok(()) => {}
                    Err(_) => {
                        counts.failed.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        }));
    }
    let report = {
        let counts = counts.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(5)).await;
                eprintln!(
                    "attack {kind:?}: {} opened, {} ended by the gateway, {} failed",
                    counts.opened.load(Ordering::Relaxed),
                    counts.ended_by_gateway.load(Ordering::Relaxed),
                    counts.failed.load(Ordering::Relaxed)
                );
            }
        })
    };
    for t in tasks {
        let _ = t.await;
    }
    report.abort();
    println!(
        "attack {kind:?} with {n} connections from {sources} sources: {} opened, {} ended by the gateway, {} failed",
        counts.opened.load(Ordering::Relaxed),
        counts.ended_by_gateway.load(Ordering::Relaxed),
        counts.failed.load(Ordering::Relaxed)
    );
    Ok(())
}

async fn connect(gateway: SocketAddr, src: IpAddr) -> Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    crate::sys::bind_address_no_port(&socket)?;
    socket.bind(SocketAddr::new(src, 0))?;
    Ok(socket.connect(gateway).await?)
}

/// Waits until the gateway closes `read` (or the attack ends).
async fn until_closed<R: AsyncReadExt + Unpin>(read: &mut R, end: Instant, counts: &Counts) {
    let mut buf = [0u8; 1024];
    let left = end.saturating_duration_since(Instant::now());
    let closed = tokio::time::timeout(left, async {
        loop {
            match read.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    if closed.is_ok() {
        counts.ended_by_gateway.fetch_add(1, Ordering::Relaxed);
    }
}

/// The start of a TLS 1.2/1.3 ClientHello: a record that promises 512 bytes.
fn partial_client_hello() -> Vec<u8> {
    let mut v = vec![
        0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
    ];
    v.extend((0..32u8).map(|i| i.wrapping_mul(37)));
    v.push(0x20);
    v.extend((0..20u8).map(|i| i.wrapping_mul(11)));
    v
}

async fn one(
    kind: Kind,
    gateway: SocketAddr,
    src: IpAddr,
    tls: &Arc<rustls::ClientConfig>,
    name: &rustls_pki_types::ServerName<'static>,
    end: Instant,
    counts: &Counts,
) -> Result<()> {
    let mut tcp = connect(gateway, src).await?;
    counts.opened.fetch_add(1, Ordering::Relaxed);
    match kind {
        Kind::Silent => until_closed(&mut tcp, end, counts).await,
        Kind::PartialHello => {
            tcp.write_all(&partial_client_hello()).await?;
            until_closed(&mut tcp, end, counts).await;
        }
        Kind::SlowHead => {
            let connector = tokio_rustls::TlsConnector::from(tls.clone());
            let mut s = connector.connect(name.clone(), tcp).await?;
            let head = b"GET /v1/device HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
            for b in head {
                if Instant::now() >= end {
                    return Ok(());
                }
                if s.write_all(&[*b]).await.is_err() || s.flush().await.is_err() {
                    counts.ended_by_gateway.fetch_add(1, Ordering::Relaxed);
                    return Ok(());
                }
                // A byte a second, and notice the close meanwhile.
                let mut buf = [0u8; 512];
                if let Ok(Ok(0) | Err(_)) =
                    tokio::time::timeout(Duration::from_secs(1), s.read(&mut buf)).await
                {
                    counts.ended_by_gateway.fetch_add(1, Ordering::Relaxed);
                    return Ok(());
                }
            }
            until_closed(&mut s, end, counts).await;
        }
    }
    Ok(())
}
