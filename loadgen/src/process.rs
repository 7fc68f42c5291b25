//! Several worker processes, to get past the per-process descriptor limit.
//!
//! The parent re-executes itself with the same arguments plus `--worker I/P`
//! and `--epoch-ms`. A worker speaks JSON lines: it writes [`Up`] messages on
//! stdout (ready, a tick a second, storm back, the final report with its HDR
//! histograms in V2 + base64) and reads [`Down`] words (`"go"`, `"stop"`) on
//! stdin. With one worker the same [`worker::run`] runs as a task instead.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio::sync::mpsc;

use crate::args::Args;
use crate::worker::{self, Down, Up};

/// One worker, in-process or a child, as the parent sees it.
#[derive(Debug)]
pub(crate) struct WorkerHandle {
    down: mpsc::Sender<Down>,
    child: Option<Child>,
    task: Option<tokio::task::JoinHandle<Result<()>>>,
}

impl WorkerHandle {
    /// Tells the worker `word`; a worker that is gone is not an error here (its
    /// missing report is).
    pub(crate) async fn send(&self, word: Down) {
        let _ = self.down.send(word).await;
    }

    /// Waits for the worker to end, and says how it ended.
    pub(crate) async fn finish(mut self) -> Result<()> {
        if let Some(t) = self.task.take() {
            let abort = t.abort_handle();
            return match tokio::time::timeout(EXIT_TIMEOUT, t).await {
                Ok(r) => r.context("worker task panicked")?,
                Err(_) => {
                    abort.abort();
                    bail!("worker did not finish within 10 s of its report")
                }
            };
        }
        if let Some(mut c) = self.child.take() {
            let deadline = Instant::now() + EXIT_TIMEOUT;
            loop {
                match c.try_wait() {
                    Ok(Some(s)) if s.success() => break,
                    Ok(Some(s)) => bail!("worker process exited with {s}"),
                    Ok(None) if Instant::now() < deadline => {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    Ok(None) => {
                        let _ = c.kill();
                        let _ = c.wait();
                        bail!("worker process did not exit within 10 s of its report");
                    }
                    Err(e) => bail!("waiting for a worker process: {e}"),
                }
            }
        }
        Ok(())
    }
}

/// How long a worker process may take to exit after its report.
const EXIT_TIMEOUT: Duration = Duration::from_secs(10);

impl Drop for WorkerHandle {
    /// A worker process never outlives its parent's interest in it.
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Starts `p` workers; all their messages arrive on the returned receiver,
/// tagged with the worker's number.
pub(crate) fn spawn_workers(
    args: &Args,
    p: usize,
    epoch_ms: u64,
) -> Result<(Vec<WorkerHandle>, mpsc::Receiver<(usize, Up)>)> {
    let (up_tx, up_rx) = mpsc::channel(1024);
    let mut handles = Vec::with_capacity(p);
    for i in 0..p {
        let h = if p == 1 {
            spawn_local(args, epoch_ms, up_tx.clone())
        } else {
            spawn_child(i, p, epoch_ms, up_tx.clone())?
        };
        handles.push(h);
    }
    Ok((handles, up_rx))
}

fn spawn_local(args: &Args, epoch_ms: u64, all_up: mpsc::Sender<(usize, Up)>) -> WorkerHandle {
    let (down_tx, down_rx) = mpsc::channel(8);
    let (up_tx, mut up_rx) = mpsc::channel(1024);
    let indices = worker::share(args.devices, 0, 1);
    let task = tokio::spawn(worker::run(args.clone(), indices, epoch_ms, 1.0, down_rx, up_tx));
    tokio::spawn(async move {
        while let Some(m) = up_rx.recv().await {
            if all_up.send((0, m)).await.is_err() {
                break;
            }
        }
    });
    WorkerHandle {
        down: down_tx,
        child: None,
        task: Some(task),
    }
}

fn spawn_child(
    i: usize,
    p: usize,
    epoch_ms: u64,
    all_up: mpsc::Sender<(usize, Up)>,
) -> Result<WorkerHandle> {
    let exe = std::env::current_exe().context("finding the load generator's own executable")?;
    let mut child = Command::new(exe)
        .args(std::env::args_os().skip(1))
        .arg("--worker")
        .arg(format!("{i}/{p}"))
        .arg("--epoch-ms")
        .arg(epoch_ms.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting a worker process")?;
    let stdout = child.stdout.take().context("worker has no stdout")?;
    let mut stdin = child.stdin.take().context("worker has no stdin")?;
    // Plain threads for the pipes: a few lines a second, no need for async I/O.
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            match serde_json::from_str::<Up>(&line) {
                Ok(m) => {
                    if all_up.blocking_send((i, m)).is_err() {
                        break;
                    }
                }
                Err(e) => eprintln!("worker {i}: unreadable message ({e}): {line:.200}"),
            }
        }
    });
    let (down_tx, mut down_rx) = mpsc::channel::<Down>(8);
    std::thread::spawn(move || {
        while let Some(word) = down_rx.blocking_recv() {
            let Ok(line) = serde_json::to_string(&word) else {
                break;
            };
            if writeln!(stdin, "{line}").and_then(|()| stdin.flush()).is_err() {
                break;
            }
        }
    });
    Ok(WorkerHandle {
        down: down_tx,
        child: Some(child),
        task: None,
    })
}

/// The main of a worker process: devices `share(devices, i, p)`, messages on
/// stdout, words on stdin.
pub(crate) async fn child_main(args: Args, i: usize, p: usize) -> Result<()> {
    let epoch_ms = args.epoch_ms.unwrap_or_else(crate::report::unix_ms);
    let indices = worker::share(args.devices, i, p);
    let share_of = indices.len() as f64 / args.devices.max(1) as f64;
    let (down_tx, down_rx) = mpsc::channel(8);
    let (up_tx, mut up_rx) = mpsc::channel::<Up>(1024);
    std::thread::spawn(move || {
        let mut lines = std::io::stdin().lock().lines();
        loop {
            let word = match lines.next() {
                Some(Ok(line)) => serde_json::from_str::<Down>(&line).unwrap_or(Down::Stop),
                // The parent went away: stop.
                _ => Down::Stop,
            };
            let stop = word == Down::Stop;
            if down_tx.blocking_send(word).is_err() || stop {
                break;
            }
        }
    });
    let writer = std::thread::spawn(move || {
        let mut out = std::io::stdout().lock();
        while let Some(m) = up_rx.blocking_recv() {
            let Ok(line) = serde_json::to_string(&m) else {
                continue;
            };
            if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
                break;
            }
        }
    });
    let result = worker::run(args, indices, epoch_ms, share_of, down_rx, up_tx).await;
    // `run` dropped its sender: the writer ends once the report is out.
    let _ = tokio::task::spawn_blocking(move || writer.join()).await;
    result
}
