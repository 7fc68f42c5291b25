//! `devgate-agent run`: keeps the device's session with the gateway, reconnecting with
//! jittered backoff, and serves what managers ask for, within the allow-lists.

use std::sync::Arc;

use anyhow::Result;
use devgate_client::{
    Backoff, Body, ConnectOptions, DevgateStream, ErrorCode, Frame, IncomingStream, Mux, Role,
    TrustBundle,
};
use devgate_proto::remote::OpenParams;
use tokio::net::TcpStream;

use crate::config::{Config, join_host_port};
use crate::state::StateDir;

pub(crate) async fn run(config: Config) -> Result<()> {
    let config = Arc::new(config);
    let state = StateDir::new(&config.state_dir);
    let gateway = state.gateway()?;
    let mut backoff = Backoff::default();
    tracing::info!(
        unit = %gateway.unit,
        gateway = %format!("{}:{}", gateway.host, gateway.port),
        commands = config.commands.len(),
        pty = config.pty.is_some(),
        tcp_targets = config.tcp.allow.len(),
        receive_dirs = config.files.receive_dirs.len(),
        send_paths = config.files.send.len(),
        "agent starting"
    );
    loop {
        match connect(&state, &gateway.host, gateway.port, config.proxy.as_deref()).await {
            Ok((mux, via)) => {
                tracing::info!(gateway = %format!("{}:{}", gateway.host, gateway.port), unit = %gateway.unit, via = %via, "connected to the gateway");
                backoff.reset();
                let why = serve(mux, &config, &state).await;
                tracing::warn!(reason = %why, "disconnected from the gateway");
            }
            Err(e) => tracing::warn!(
                "could not connect to the gateway: {e:#}{}",
                state.untrusted_root_hint(&e)
            ),
        }
        let delay = backoff.next_delay();
        tracing::info!(delay_ms = delay.as_millis(), "reconnecting");
        tokio::time::sleep(delay).await;
    }
}

/// Connects; returns the session and how it went ("direct" or "proxy HOST:PORT").
async fn connect(
    state: &StateDir,
    host: &str,
    port: u16,
    proxy: Option<&str>,
) -> Result<(Mux, String)> {
    // Read anew on every attempt: roots from a trust bundle take effect on the next one.
    let tls = state.tls()?;
    let addr = crate::enroll::resolve(host, port).await?;
    let mut opts = ConnectOptions::new(addr, host, Role::Device);
    // Also anew: HTTPS_PROXY/NO_PROXY are read when the configuration names no proxy.
    opts.proxy = crate::proxy::select(proxy, host, addr)?;
    let via = crate::proxy::describe(opts.proxy.as_ref());
    let conn = devgate_client::connect(&opts, tls).await?;
    Ok((Mux::new(conn), via))
}

/// Serves one connection; returns why it ended.
async fn serve(mut mux: Mux, config: &Arc<Config>, state: &StateDir) -> String {
    let mut streams = mux.incoming_streams();
    loop {
        tokio::select! {
            frame = mux.next_frame() => {
                let received = match frame {
                    Ok(r) => r,
                    Err(e) => return e.to_string(),
                };
                let f = received.frame();
                match f.body {
                    Body::Command { payload } => {
                        let id = f.id;
                        let payload = payload.to_vec();
                        let config = config.clone();
                        let sender = mux.sender().clone();
                        tokio::spawn(async move {
                            let reply = crate::commands::answer(&config, &payload).await;
                            if let Err(e) = sender.send(&Frame::response("", id, &reply)).await {
                                tracing::warn!("could not send a command's response: {e}");
                            }
                        });
                    }
                    Body::Control { payload } if f.id == 0 => {
                        trust_bundle(&mux, state, payload).await;
                    }
                    Body::Error { code, message } => {
                        tracing::debug!(code = code.as_str(), message, "error from the gateway");
                    }
                    _ => {}
                }
            }
            incoming = streams.next() => {
                let Some(incoming) = incoming else {
                    return "the connection ended".into();
                };
                let config = config.clone();
                tokio::spawn(async move { open(incoming, &config).await });
            }
        }
    }
}

/// Stores the roots of a root exchange, then acknowledges them (PROTOCOL.md section 8a),
/// so that the next connection verifies the gateway's new root.
async fn trust_bundle(mux: &Mux, state: &StateDir, payload: &[u8]) {
    match TrustBundle::parse(payload) {
        Ok(Some(bundle)) => match state.store_roots(&bundle.pem) {
            Ok(()) => {
                tracing::info!(bundle = %bundle.id, roots = bundle.roots.len(), "stored the gateway's trust bundle");
                let ack = bundle.ack_payload();
                if let Err(e) = mux.sender().send(&TrustBundle::ack_frame(&ack)).await {
                    tracing::warn!("could not acknowledge the trust bundle: {e}");
                }
            }
            Err(e) => tracing::error!("could not store the gateway's trust bundle: {e:#}"),
        },
        Ok(None) => {}
        Err(e) => tracing::warn!("ignoring an unreadable trust bundle: {e}"),
    }
}

/// Decides on one stream a manager opened: serve it if the allow-list has it, else refuse
/// with a reason that names what was asked for (and connect or run nothing).
async fn open(incoming: IncomingStream, config: &Config) {
    let text = String::from_utf8_lossy(incoming.params()).into_owned();
    let refuse = |incoming: IncomingStream, reason: String| {
        tracing::warn!(params = %text, "refused stream: {reason}");
        incoming.refuse(ErrorCode::NotPermitted, &reason);
    };
    match OpenParams::parse(incoming.params()) {
        Err(e) => refuse(incoming, e.to_string()),
        Ok(OpenParams::Pty { cols, rows, term }) => match &config.pty {
            None => refuse(incoming, "pty is not on this device's allow-list".into()),
            Some(spec) => {
                // Before accepting: a user that cannot be switched to is the manager's answer.
                let user = match spec
                    .user
                    .as_deref()
                    .map(crate::pty_user::lookup)
                    .transpose()
                {
                    Ok(user) => user,
                    Err(e) => {
                        tracing::warn!(params = %text, "refused stream: {e:#}");
                        incoming.refuse(ErrorCode::Internal, &format!("pty: {e:#}"));
                        return;
                    }
                };
                let stream = incoming.accept();
                if let Err(e) =
                    crate::pty::serve(spec, user.as_ref(), cols, rows, &term, stream).await
                {
                    tracing::warn!("terminal failed: {e:#}");
                }
            }
        },
        Ok(OpenParams::Tcp { host, port }) => {
            let target = join_host_port(&host, port);
            if !config.tcp_allowed(&host, port) {
                refuse(
                    incoming,
                    format!("tcp target {target} is not on this device's allow-list"),
                );
                return;
            }
            match TcpStream::connect((host.as_str(), port)).await {
                Ok(tcp) => {
                    let _ = tcp.set_nodelay(true);
                    forward(tcp, incoming.accept()).await;
                }
                Err(e) => {
                    tracing::warn!(%target, "tcp target unreachable: {e}");
                    incoming.refuse(
                        ErrorCode::Internal,
                        &format!("tcp target {target}: connect failed: {e}"),
                    );
                }
            }
        }
        Ok(OpenParams::FilePut {
            name,
            size,
            sha256,
            offset,
        }) => crate::files::put(incoming, &config.files, &name, size, &sha256, offset).await,
        Ok(OpenParams::FileGet { path, offset }) => {
            crate::files::get(incoming, &config.files, &path, offset).await;
        }
    }
}

async fn forward(mut tcp: TcpStream, mut stream: DevgateStream) {
    match tokio::io::copy_bidirectional_with_sizes(&mut tcp, &mut stream, 64 * 1024, 64 * 1024)
        .await
    {
        Ok((up, down)) => tracing::debug!(to_manager = up, from_manager = down, "forward ended"),
        Err(e) => tracing::info!("forward ended: {e}"),
    }
}
