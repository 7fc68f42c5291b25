//! A `pty` stream: the configured shell on a real pseudo-terminal. The stream carries
//! terminal records (PROTOCOL.md section 11.3): data both ways, window size changes from
//! the manager, and the shell's exit status from the device before the device closes.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result};
use devgate_client::DevgateStream;
use devgate_proto::remote::PtyRecord;
use rustix::termios::Winsize;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::config::PtySpec;
use crate::pty_user::User;

/// Size when the manager sends none.
const DEFAULT_COLS: u16 = 80;
const DEFAULT_ROWS: u16 = 24;
/// After the shell exits, output still in the terminal is forwarded until it has been
/// quiet this long (a background job may keep the terminal open for ever).
const DRAIN_QUIET: Duration = Duration::from_millis(200);

/// Opens a terminal pair: the master (non-blocking, for the agent) and the slave (for the
/// shell).
fn open_pair(cols: u16, rows: u16) -> Result<(OwnedFd, OwnedFd)> {
    use rustix::pty::{OpenptFlags, grantpt, openpt, ptsname, unlockpt};
    let master = openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC)
        .context("opening a pseudo-terminal")?;
    grantpt(&master).context("grantpt")?;
    unlockpt(&master).context("unlockpt")?;
    let name = ptsname(&master, Vec::new()).context("ptsname")?;
    let slave = rustix::fs::open(
        name.as_c_str(),
        rustix::fs::OFlags::RDWR | rustix::fs::OFlags::NOCTTY,
        rustix::fs::Mode::empty(),
    )
    .context("opening the terminal's slave side")?;
    set_size(&master, cols, rows)?;
    let flags = rustix::fs::fcntl_getfl(&master)?;
    rustix::fs::fcntl_setfl(&master, flags | rustix::fs::OFlags::NONBLOCK)?;
    Ok((master, slave))
}

fn set_size(fd: impl AsFd, cols: u16, rows: u16) -> Result<()> {
    rustix::termios::tcsetwinsize(
        fd,
        Winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        },
    )
    .context("setting the terminal size")
}

/// Runs the shell on a fresh terminal and pumps it through `stream` until the shell exits
/// (the exit status is sent) or the manager goes away (the shell is killed).
pub(crate) async fn serve(
    spec: &PtySpec,
    user: Option<&User>,
    cols: u16,
    rows: u16,
    term: &str,
    stream: DevgateStream,
) -> Result<()> {
    let cols = if cols == 0 { DEFAULT_COLS } else { cols };
    let rows = if rows == 0 { DEFAULT_ROWS } else { rows };
    let term = if term.is_empty() { &spec.term } else { term };
    let (master, slave) = open_pair(cols, rows)?;
    let mut cmd = tokio::process::Command::new(&spec.shell);
    cmd.args(&spec.args)
        .env("TERM", term)
        .stdin(Stdio::from(slave.try_clone()?))
        .stdout(Stdio::from(slave.try_clone()?))
        .kill_on_drop(true);
    // SAFETY: only async-signal-safe system calls (setsid, ioctl) run between fork and exec,
    // and nothing allocates; fd 0 is the terminal's slave side by then.
    unsafe {
        cmd.pre_exec(|| {
            rustix::process::setsid()?;
            rustix::process::ioctl_tiocsctty(std::os::fd::BorrowedFd::borrow_raw(0))?;
            Ok(())
        });
    }
    // After the pre_exec above: the identity changes last.
    if let Some(user) = user {
        crate::pty_user::run_as(&mut cmd, &slave, user, &spec.shell, term)?;
    }
    cmd.stderr(Stdio::from(slave));
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting the shell {:?}", spec.shell))?;
    // The Command holds the slave side open; the shell must be its only holder.
    drop(cmd);
    tracing::info!(shell = %spec.shell, user = spec.user.as_deref().unwrap_or("(the agent's)"), cols, rows, "terminal opened");
    // SAFETY: the AsyncFd owns the OwnedFd, which stays open and the same descriptor until
    // the AsyncFd is dropped.
    let master = unsafe { AsyncFd::register(master) }
        .map_err(|e| anyhow::anyhow!("registering the terminal with tokio: {e}"))?;
    let (mut rd, mut wr) = tokio::io::split(stream);

    let mut from_manager = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    let mut inbuf = vec![0u8; 16 * 1024];
    let mut out = Vec::with_capacity(buf.len() + 8);
    let manager_gone = loop {
        tokio::select! {
            r = read_master(&master, &mut buf) => {
                match r {
                    Ok(n) if n > 0 => {
                        out.clear();
                        PtyRecord::Data(&buf[..n]).encode_into(&mut out);
                        if wr.write_all(&out).await.is_err() {
                            break true;
                        }
                    }
                    // EIO: every process closed the terminal; the shell is ending.
                    _ => break false,
                }
            }
            r = rd.read(&mut inbuf) => {
                match r {
                    Ok(n) if n > 0 => {
                        from_manager.extend_from_slice(&inbuf[..n]);
                        if let Err(e) = apply(&master, &mut from_manager).await {
                            tracing::warn!("terminal stream: {e:#}");
                            break true;
                        }
                    }
                    _ => break true,
                }
            }
            _ = child.wait() => break false,
        }
    };
    if manager_gone {
        let _ = child.kill().await;
        tracing::info!("terminal closed by the manager");
        return Ok(());
    }
    // The shell ended: forward what it left in the terminal, then its status.
    loop {
        match tokio::time::timeout(DRAIN_QUIET, read_master(&master, &mut buf)).await {
            Ok(Ok(n)) if n > 0 => {
                out.clear();
                PtyRecord::Data(&buf[..n]).encode_into(&mut out);
                if wr.write_all(&out).await.is_err() {
                    return Ok(());
                }
            }
            _ => break,
        }
    }
    let code = match child.wait().await {
        Ok(s) => crate::commands::exit_code(s),
        Err(_) => 255,
    };
    out.clear();
    PtyRecord::Exit(code).encode_into(&mut out);
    let _ = wr.write_all(&out).await;
    let _ = wr.shutdown().await;
    tracing::info!(status = code, "terminal ended");
    Ok(())
}

async fn read_master(master: &AsyncFd<OwnedFd>, buf: &mut [u8]) -> std::io::Result<usize> {
    loop {
        let mut guard = master.readable().await?;
        match guard.try_io(|fd| Ok(rustix::io::read(fd.get_ref(), &mut *buf)?)) {
            Ok(r) => return r,
            Err(_would_block) => {}
        }
    }
}

async fn write_master(master: &AsyncFd<OwnedFd>, mut data: &[u8]) -> std::io::Result<()> {
    while !data.is_empty() {
        let mut guard = master.writable().await?;
        match guard.try_io(|fd| Ok(rustix::io::write(fd.get_ref(), data)?)) {
            Ok(Ok(n)) => data = &data[n..],
            Ok(Err(e)) => return Err(e),
            Err(_would_block) => {}
        }
    }
    Ok(())
}

/// Applies the complete records at the front of `pending` to the terminal.
async fn apply(master: &AsyncFd<OwnedFd>, pending: &mut Vec<u8>) -> Result<()> {
    let mut at = 0;
    while let Some((record, used)) = PtyRecord::decode(&pending[at..])? {
        match record {
            PtyRecord::Data(bytes) => write_master(master, bytes).await?,
            PtyRecord::Resize { cols, rows } => {
                set_size(master.get_ref(), cols, rows)?;
                tracing::debug!(cols, rows, fd = master.as_raw_fd(), "terminal resized");
            }
            // Exit comes only from devices; unknown kinds are skipped (PROTOCOL.md 11.3).
            PtyRecord::Exit(_) | PtyRecord::Unknown(_) => {}
        }
        at += used;
    }
    pending.drain(..at);
    Ok(())
}
