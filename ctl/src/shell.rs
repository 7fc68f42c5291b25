//! `devgate-ctl shell`: the device's shell on this terminal. The terminal is put in raw
//! mode (restored on every way out), keystrokes go to the device as data records, window
//! size changes (SIGWINCH) as resize records, and the device's exit record becomes this
//! program's exit status (PROTOCOL.md section 11.3).

use anyhow::Result;
use devgate_proto::remote::{OpenParams, PtyRecord};
use rustix::termios::{self, OptionalActions, Termios};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::signal::unix::{SignalKind, signal};

use crate::gateways::{self, Gateway};

/// Ctrl-D: what the end of a non-terminal stdin is sent as, so the shell sees end of input.
const EOT: u8 = 0x04;

/// Restores the terminal's mode when dropped.
struct RawMode(Option<Termios>);

impl RawMode {
    fn enter() -> Self {
        let stdin = std::io::stdin();
        if !termios::isatty(&stdin) {
            return Self(None);
        }
        let Ok(saved) = termios::tcgetattr(&stdin) else {
            return Self(None);
        };
        let mut raw = saved.clone();
        raw.make_raw();
        if termios::tcsetattr(&stdin, OptionalActions::Now, &raw).is_err() {
            return Self(None);
        }
        Self(Some(saved))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        if let Some(saved) = &self.0 {
            let _ = termios::tcsetattr(std::io::stdin(), OptionalActions::Now, saved);
        }
    }
}

fn window_size() -> (u16, u16) {
    termios::tcgetwinsize(std::io::stdout())
        .or_else(|_| termios::tcgetwinsize(std::io::stdin()))
        .map(|w| (w.ws_col, w.ws_row))
        .unwrap_or((0, 0))
}

pub(crate) async fn run(gateways: &mut [Gateway], unit: &str) -> Result<u8> {
    let (cols, rows) = window_size();
    let term = std::env::var("TERM")
        .ok()
        .filter(|t| OpenParams::parse(format!("pty;term={t}").as_bytes()).is_ok())
        .unwrap_or_default();
    let params = OpenParams::Pty { cols, rows, term }.encode();
    for gw in gateways.iter_mut() {
        let mut frames = gw.mux.frames();
        tokio::spawn(async move { while frames.next().await.is_ok() {} });
    }
    let (_, stream) = gateways::open_stream(gateways, 0, unit, &params).await?;
    let (mut rd, mut wr) = tokio::io::split(stream);
    let raw = RawMode::enter();
    let mut winch = signal(SignalKind::window_change())?;
    let input = tokio::spawn(async move {
        let mut stdin = tokio::io::stdin();
        let mut buf = vec![0u8; 4096];
        let mut out = Vec::with_capacity(buf.len() + 8);
        let mut stdin_open = true;
        loop {
            out.clear();
            tokio::select! {
                r = stdin.read(&mut buf), if stdin_open => match r {
                    Ok(n) if n > 0 => PtyRecord::Data(&buf[..n]).encode_into(&mut out),
                    _ => {
                        stdin_open = false;
                        PtyRecord::Data(&[EOT]).encode_into(&mut out);
                    }
                },
                _ = winch.recv() => {
                    let (cols, rows) = window_size();
                    PtyRecord::Resize { cols, rows }.encode_into(&mut out);
                }
            }
            if wr.write_all(&out).await.is_err() {
                return;
            }
        }
    });

    let mut stdout = tokio::io::stdout();
    let mut pending = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut status = None;
    let ended = loop {
        match rd.read(&mut buf).await {
            Ok(0) => break None,
            Ok(n) => pending.extend_from_slice(&buf[..n]),
            Err(e) => break Some(e.to_string()),
        }
        let mut at = 0;
        while let Some((record, used)) = PtyRecord::decode(&pending[at..])? {
            match record {
                PtyRecord::Data(bytes) => stdout.write_all(bytes).await?,
                PtyRecord::Exit(s) => status = Some(s),
                PtyRecord::Resize { .. } | PtyRecord::Unknown(_) => {}
            }
            at += used;
        }
        pending.drain(..at);
        stdout.flush().await?;
    };
    input.abort();
    drop(raw);
    match (status, ended) {
        (Some(s), _) => Ok(u8::try_from(s).unwrap_or(crate::FAILED)),
        (None, Some(e)) => anyhow::bail!("the shell on device {unit} ended: {e}"),
        (None, None) => anyhow::bail!("the shell on device {unit} ended without an exit status"),
    }
}
