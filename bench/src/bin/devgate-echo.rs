//! `devgate-echo`: the no-relay baseline of the benchmark report.
//!
//! A minimal rustls + tokio WebSocket server that accepts exactly the connections
//! `devgate-loadgen` makes: mutual TLS with the gateway's own rustls configuration (loaded
//! from a `devgate init` data dir, so the same certificates, versions and suites), an HTTP
//! upgrade on `/v1/device` or `/v1/manager`, then devgate frames over WebSocket.
//!
//! It does not relay. A device connection is held and answers pings; a **command on a manager
//! connection is answered at once, on the same connection**, with a response carrying the
//! command's id, unit and payload. So a round trip measured against it is one TLS WebSocket
//! hop (manager ↔ server), where through devgate it is two (manager ↔ gateway ↔ device) plus
//! routing: the ratio shows what the relay costs on top of the floor that TLS, WebSocket
//! framing and loopback TCP set.
//!
//! `--plain` serves WebSocket without TLS: the backend behind nginx in the report's reverse
//! proxy baseline (nginx terminates the mutual TLS).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use devgate_proto::frame::{self, Body, Frame};
use devgate_proto::http::{self, Parsed};
use devgate_proto::ws::{self, Decoded, Decoder, Message, Opcode, Role};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;

const MAX_HEAD: usize = 8 * 1024;
const MAX_MESSAGE: usize = 1 << 20;

fn main() -> Result<()> {
    let mut listen: SocketAddr = "127.0.0.1:18843".parse()?;
    let mut data_dir: Option<PathBuf> = None;
    let mut plain = false;
    let mut threads = 0usize;
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--listen" => listen = it.next().context("--listen ADDR")?.parse()?,
            "--data-dir" => data_dir = Some(it.next().context("--data-dir DIR")?.into()),
            "--plain" => plain = true,
            "--threads" => threads = it.next().context("--threads N")?.parse()?,
            other => bail!(
                "unknown option {other}\nusage: devgate-echo --listen ADDR (--data-dir DIR | --plain) [--threads N]"
            ),
        }
    }
    let acceptor = if plain {
        None
    } else {
        let dir = data_dir.context("--data-dir DIR is needed for TLS (or --plain)")?;
        let material = gateway::tls::load(&dir)?;
        Some(tokio_rustls::TlsAcceptor::from(material.server_config))
    };
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if threads > 0 {
        rt.worker_threads(threads);
    }
    rt.enable_all().build()?.block_on(serve(listen, acceptor))
}

async fn serve(listen: SocketAddr, tls: Option<tokio_rustls::TlsAcceptor>) -> Result<()> {
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    eprintln!("devgate-echo listening on {listen}");
    let tls = tls.map(Arc::new);
    loop {
        let (tcp, _) = match listener.accept().await {
            Ok(x) => x,
            // Out of descriptors and the like: keep serving the sessions we have.
            Err(_) => {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let tls = tls.clone();
        tokio::spawn(async move {
            let _ = match tls {
                Some(acceptor) => match acceptor.accept(tcp).await {
                    Ok(s) => session(s).await,
                    Err(e) => Err(e.into()),
                },
                None => session(tcp).await,
            };
        });
    }
}

/// One connection: upgrade, then frames until the peer closes.
async fn session<S: AsyncRead + AsyncWrite + Unpin>(mut s: S) -> Result<()> {
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    let mut chunk = vec![0u8; 16 * 1024];
    let manager = loop {
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        match http::parse_request(&buf, MAX_HEAD)? {
            Parsed::Incomplete => continue,
            Parsed::Complete {
                request,
                header_len,
            } => {
                let manager = match request.path {
                    "/v1/manager" => true,
                    "/v1/device" => false,
                    other => bail!("unknown path {other}"),
                };
                let key = request
                    .websocket_key
                    .filter(|_| request.is_websocket_upgrade())
                    .context("not a WebSocket upgrade")?;
                s.write_all(&http::switching_protocols(key)).await?;
                buf.drain(..header_len);
                break manager;
            }
        }
    };
    let mut dec = Decoder::new(Role::Server, MAX_MESSAGE);
    let mut out: Vec<u8> = Vec::with_capacity(4096);
    loop {
        // Answer everything buffered, then write once: batched commands get batched answers.
        let mut used = 0;
        let mut close = false;
        loop {
            let consumed = match dec.decode(&mut buf[used..])? {
                Decoded::Incomplete => break,
                Decoded::Frame { consumed, message } => {
                    match message {
                        Some(Message::Binary(m)) if manager => answer(m, &mut out),
                        Some(Message::Ping(p)) => ws::encode_frame(&mut out, Opcode::Pong, p, None),
                        Some(Message::Close { .. }) => {
                            ws::encode_close(&mut out, 1000, "", None);
                            close = true;
                        }
                        _ => {}
                    }
                    consumed
                }
            };
            used += consumed;
            if close {
                break;
            }
        }
        buf.drain(..used);
        if !out.is_empty() {
            s.write_all(&out).await?;
            out.clear();
        }
        if close {
            return Ok(());
        }
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// A manager's command comes straight back as the device's response would.
fn answer(message: &[u8], out: &mut Vec<u8>) {
    if let Ok(f) = Frame::decode(message)
        && let Body::Command { payload } = f.body
    {
        frame::encode_ws(out, &Frame::response(f.unit, f.id, payload), None);
    }
}
