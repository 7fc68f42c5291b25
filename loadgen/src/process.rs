//! Several worker processes, to get past the per-process descriptor limit.
//!
//! The parent re-executes itself with the same arguments plus `--worker I/P`
//! and `--epoch-ms`. A worker speaks JSON lines: it writes [`Up`] messages on
//! stdout (ready, a tick a second, storm back, the final report with its HDR
//! histograms in V2 + base64) and reads [`Down`] words (`"go"`, `"stop"`) on
//! stdin. With one worker the same [`worker::run`] runs as a task instead.

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
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
            return t.await.context("worker task panicked")?;
        }
        if let Some(mut c) = self.child.take() {
            let status = tokio::time::timeout(std::time::Duration::from_secs(10), c.wait()).await;
            match status {
                Ok(Ok(s)) if s.success() => {}
                Ok(Ok(s)) => bail!("worker process exited with {s}"),
                Ok(Err(e)) => bail!("waiting for a worker process: {e}"),
                Err(_) => {
                    let _ = c.kill().await;
                    bail!("worker process did not exit within 10 s of its report");
                }
            }
        }
        Ok(())
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
            spawn_child(args, i, p, epoch_ms, up_tx.clone())?
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
    args: &Args,
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
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .context("starting a worker process")?;
    let stdout = child.stdout.take().context("worker has no stdout")?;
    let mut stdin = child.stdin.take().context("worker has no stdin")?;
    tokio::spawn(async move {
        let mut lines = BufReader::new(stdout).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            match serde_json::from_str::<Up>(&line) {
                Ok(m) => {
                    if all_up.send((i, m)).await.is_err() {
                        break;
                    }
                }
                Err(e) => eprintln!("worker {i}: unreadable message ({e}): {line:.200}"),
            }
        }
    });
    let (down_tx, mut down_rx) = mpsc::channel::<Down>(8);
    tokio::spawn(async move {
        while let Some(word) = down_rx.recv().await {
            let Ok(mut line) = serde_json::to_string(&word) else {
                break;
            };
            line.push('\n');
            if stdin.write_all(line.as_bytes()).await.is_err() || stdin.flush().await.is_err() {
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
    tokio::spawn(async move {
        let mut lines = BufReader::new(tokio::io::stdin()).lines();
        loop {
            let word = match lines.next_line().await {
                Ok(Some(line)) => serde_json::from_str::<Down>(&line).unwrap_or(Down::Stop),
                // The parent went away: stop.
                _ => Down::Stop,
            };
            let stop = word == Down::Stop;
            if down_tx.send(word).await.is_err() || stop {
                break;
            }
        }
    });
    let writer = tokio::spawn(async move {
        let mut out = tokio::io::stdout();
        while let Some(m) = up_rx.recv().await {
            let Ok(mut line) = serde_json::to_string(&m) else {
                continue;
            };
            line.push('\n');
            if out.write_all(line.as_bytes()).await.is_err() || out.flush().await.is_err() {
                break;
            }
        }
    });
    let result = worker::run(args, indices, epoch_ms, share_of, down_rx, up_tx).await;
    let _ = writer.await;
    result
}
