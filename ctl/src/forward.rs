//! `devgate-ctl forward`: a local listener whose every accepted connection becomes one
//! `tcp:HOST:PORT` stream to the device, so ordinary clients (ssh, scp, curl, a VNC viewer)
//! work through it.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{Context, Result};
use devgate_client::ErrorCode;
use tokio::net::{TcpListener, TcpStream};

use crate::gateways::{self, Gateway, Refused};

pub(crate) async fn run(
    mut gateways: Vec<Gateway>,
    unit: &str,
    target: &str,
    listen: &str,
    max_streams: usize,
) -> Result<u8> {
    let target = target.strip_prefix("tcp:").unwrap_or(target);
    let params = format!("tcp:{target}");
    devgate_proto::remote::OpenParams::parse(params.as_bytes())?;
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("listening on {listen}"))?;
    // Nobody reads the other frames while streams run: drain them so they never back up.
    for gw in &mut gateways {
        let mut frames = gw.mux.frames();
        tokio::spawn(async move { while frames.next().await.is_ok() {} });
    }
    eprintln!(
        "devgate-ctl: forwarding {} to {target} on device {unit}",
        listener.local_addr()?
    );
    let gateways = Arc::new(gateways);
    let last = Arc::new(AtomicUsize::new(0));
    // Each open stream may have a whole window (1 MiB) in flight towards this manager, and the
    // gateway disconnects a manager whose queue passes limits.queue_hard_bytes (16 MiB by
    // default): so connections beyond `max_streams` wait for a free stream.
    let slots = Arc::new(tokio::sync::Semaphore::new(max_streams.max(1)));
    let (fatal_tx, mut fatal) = tokio::sync::mpsc::unbounded_channel::<anyhow::Error>();
    loop {
        let (tcp, peer) = tokio::select! {
            a = listener.accept() => a.context("accepting a local connection")?,
            Some(e) = fatal.recv() => return Err(e),
        };
        let gateways = gateways.clone();
        let last = last.clone();
        let unit = unit.to_owned();
        let params = params.clone();
        let fatal_tx = fatal_tx.clone();
        let slots = slots.clone();
        tokio::spawn(async move {
            let Ok(_slot) = slots.acquire_owned().await else {
                return;
            };
            let _ = tcp.set_nodelay(true);
            match gateways::open_stream(&gateways, last.load(Ordering::Relaxed), &unit, &params)
                .await
            {
                Ok((i, stream)) => {
                    last.store(i, Ordering::Relaxed);
                    pump(tcp, stream).await;
                }
                Err(e) => {
                    // A target the device does not allow will never work: stop, non-zero.
                    let permanent = matches!(
                        e.downcast_ref::<Refused>(),
                        Some(r) if r.0 == ErrorCode::NotPermitted
                    );
                    let hint = match e.downcast_ref::<Refused>() {
                        Some(r) if r.0 == ErrorCode::TooManyStreams => {
                            " (the gateway's limits.max_streams_per_device caps parallel \
                             connections to one device)"
                        }
                        _ => "",
                    };
                    eprintln!("devgate-ctl: connection from {peer}: {e:#}{hint}");
                    if permanent {
                        let _ = fatal_tx.send(e);
                    }
                }
            }
        });
    }
}

async fn pump(mut tcp: TcpStream, mut stream: devgate_client::DevgateStream) {
    if let Err(e) =
        tokio::io::copy_bidirectional_with_sizes(&mut tcp, &mut stream, 64 * 1024, 64 * 1024).await
    {
        eprintln!("devgate-ctl: stream {} ended: {e}", stream.id());
    }
}
