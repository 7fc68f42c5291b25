//! `devgate-ctl push FILE --to UNIT… | --all`: sends a file to many devices at once
//! (PROTOCOL.md section 11.5). Each transfer asks the device where to start (what it
//! already holds of this file), so one dropped by a gateway restart or a lost connection
//! resumes instead of starting over; each is retried with backoff, a bounded number of
//! times in a row without progress.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use devgate_client::{Backoff, DevgateStream};
use devgate_proto::remote::{OpenParams, PutStart, sha256_hex};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

use crate::link::{Link, OpenFailure};
use crate::progress::{DeviceResult, Progress};

/// Attempts in a row that moved no bytes before a device counts as failed.
pub(crate) const MAX_IDLE_ATTEMPTS: u32 = 12;
/// Attempts in all, however much each moved.
pub(crate) const MAX_ATTEMPTS: u32 = 40;
/// Longest wait for the device's answer or its next credit.
pub(crate) const STALL_TIMEOUT: Duration = Duration::from_secs(60);
/// Bytes per read of the local file.
const CHUNK: usize = 256 * 1024;

/// The backoff between attempts: a restarted gateway takes a few seconds and its devices up
/// to 30 s to come back, so the ceiling reaches 10 s and the idle tries in a row span about
/// 45 s on average (at most about 90 s).
pub(crate) fn retry_backoff() -> Backoff {
    Backoff::new(Duration::from_millis(500), Duration::from_secs(10))
}

/// What is sent.
#[derive(Debug)]
pub(crate) struct Source {
    pub(crate) path: std::path::PathBuf,
    pub(crate) name: String,
    pub(crate) size: u64,
    pub(crate) sha256: String,
}

impl Source {
    /// Reads `path` once for its size and SHA-256.
    pub(crate) async fn open(path: &Path, name: Option<String>) -> Result<Self> {
        let name = match name {
            Some(n) => n,
            None => path
                .file_name()
                .and_then(|n| n.to_str())
                .with_context(|| {
                    format!(
                        "{}: give the name on the device with --name",
                        path.display()
                    )
                })?
                .to_owned(),
        };
        let p = path.to_owned();
        let (size, digest) = tokio::task::spawn_blocking(move || -> Result<(u64, [u8; 32])> {
            let mut f =
                std::fs::File::open(&p).with_context(|| format!("opening {}", p.display()))?;
            let mut h = Sha256::new();
            let size = std::io::copy(&mut f, &mut h)
                .with_context(|| format!("reading {}", p.display()))?;
            Ok((size, h.finalize().into()))
        })
        .await??;
        let params = OpenParams::FilePut {
            name: name.clone(),
            size,
            sha256: sha256_hex(&digest),
            offset: size,
        }
        .encode();
        // Names with ';' or control characters cannot be said in open parameters.
        if OpenParams::parse(params.as_bytes()).ok()
            != Some(OpenParams::FilePut {
                name: name.clone(),
                size,
                sha256: sha256_hex(&digest),
                offset: size,
            })
        {
            bail!("{name:?} cannot be a file name on the device (no ';' or control characters)");
        }
        Ok(Self {
            path: path.to_owned(),
            name,
            size,
            sha256: sha256_hex(&digest),
        })
    }

    /// Open parameters: the device may skip all it already holds of this file.
    fn params(&self) -> String {
        OpenParams::FilePut {
            name: self.name.clone(),
            size: self.size,
            sha256: self.sha256.clone(),
            offset: self.size,
        }
        .encode()
    }
}

/// Sends `source` to every unit, `parallel` at a time; one result per unit, in order.
pub(crate) async fn run(
    link: Arc<Link>,
    source: Arc<Source>,
    units: Vec<String>,
    parallel: usize,
    progress: Arc<Progress>,
) -> Vec<DeviceResult> {
    let slots = Arc::new(tokio::sync::Semaphore::new(parallel.max(1)));
    let tasks: Vec<_> = units
        .into_iter()
        .map(|unit| {
            let (link, source, slots, progress) = (
                link.clone(),
                source.clone(),
                slots.clone(),
                progress.clone(),
            );
            tokio::spawn(async move {
                let _slot = slots.acquire_owned().await;
                let r = push_one(&link, &source, unit, &progress).await;
                progress.done.fetch_add(1, Ordering::Relaxed);
                if r.error.is_some() {
                    progress.failed.fetch_add(1, Ordering::Relaxed);
                }
                r
            })
        })
        .collect();
    let mut out = Vec::with_capacity(tasks.len());
    for t in tasks {
        match t.await {
            Ok(r) => out.push(r),
            Err(e) => out.push(DeviceResult {
                unit: String::new(),
                error: Some(format!("the transfer task failed: {e}")),
                bytes: 0,
                resumed_at: 0,
                attempts: 0,
                elapsed: Duration::ZERO,
            }),
        }
    }
    out
}

async fn push_one(link: &Link, source: &Source, unit: String, progress: &Progress) -> DeviceResult {
    let started = Instant::now();
    let mut r = DeviceResult {
        unit,
        error: None,
        bytes: 0,
        resumed_at: 0,
        attempts: 0,
        elapsed: Duration::ZERO,
    };
    let mut backoff = retry_backoff();
    let mut idle = 0;
    let params = source.params();
    loop {
        r.attempts += 1;
        let before = r.bytes;
        let outcome = match link.open(&r.unit, &params).await {
            Ok(stream) => attempt(stream, source, &mut r, progress).await,
            Err(OpenFailure::Refused(why)) => {
                r.error = Some(why);
                break;
            }
            Err(OpenFailure::Transient(why)) => Err(why),
        };
        match outcome {
            Ok(()) => break,
            Err(why) => {
                idle = if r.bytes > before { 0 } else { idle + 1 };
                if idle >= MAX_IDLE_ATTEMPTS || r.attempts >= MAX_ATTEMPTS {
                    r.error = Some(format!("gave up after {} attempts: {why}", r.attempts));
                    break;
                }
            }
        }
        tokio::time::sleep(backoff.next_delay()).await;
    }
    r.elapsed = started.elapsed();
    r
}

/// One stream: learn where to start, send the rest, wait for the device's verdict.
async fn attempt(
    mut stream: DevgateStream,
    source: &Source,
    r: &mut DeviceResult,
    progress: &Progress,
) -> Result<(), String> {
    let mut head = [0u8; PutStart::LEN];
    stalled(stream.read_exact(&mut head), "the device's start offset").await?;
    let start = PutStart::decode(&head).map_or(0, |s| s.0);
    if start > source.size {
        return Err(format!(
            "the device asked to start at {start}, past the file's end"
        ));
    }
    r.resumed_at = start;
    let mut file = tokio::fs::File::open(&source.path)
        .await
        .map_err(|e| format!("opening {}: {e}", source.path.display()))?;
    file.seek(std::io::SeekFrom::Start(start))
        .await
        .map_err(|e| format!("reading {}: {e}", source.path.display()))?;
    let mut left = source.size - start;
    let mut buf = vec![0u8; CHUNK];
    while left > 0 {
        let want = usize::try_from(left.min(CHUNK as u64)).unwrap_or(CHUNK);
        let n = file
            .read(&mut buf[..want])
            .await
            .map_err(|e| format!("reading {}: {e}", source.path.display()))?;
        if n == 0 {
            return Err(format!(
                "{} shrank while it was sent",
                source.path.display()
            ));
        }
        stalled(stream.write_all(&buf[..n]), "credit from the device").await?;
        left -= n as u64;
        r.bytes += n as u64;
        progress.bytes.fetch_add(n as u64, Ordering::Relaxed);
    }
    // The device closes with code 0 once the SHA-256 matched and the file is in place.
    let mut rest = [0u8; 1];
    match stalled(stream.read(&mut rest), "the device's verdict").await? {
        0 => Ok(()),
        _ => Err("the device sent unexpected bytes after the start offset".into()),
    }
}

/// `io` with [`STALL_TIMEOUT`], errors as text.
pub(crate) async fn stalled<T>(
    io: impl std::future::Future<Output = std::io::Result<T>>,
    waiting_for: &str,
) -> Result<T, String> {
    match tokio::time::timeout(STALL_TIMEOUT, io).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no {waiting_for} within {STALL_TIMEOUT:?}")),
    }
}

/// Asks each gateway for its connected devices (for `--all`).
pub(crate) async fn all_units(gateways: &mut [crate::gateways::Gateway]) -> Result<Vec<String>> {
    let mut units = Vec::new();
    for gw in gateways.iter_mut() {
        let mut offset = 0u64;
        loop {
            let reply = gw
                .control(
                    &serde_json::json!({"op": "list_devices", "offset": offset, "limit": 10000}),
                )
                .await?;
            let page = reply["devices"].as_array().cloned().unwrap_or_default();
            units.extend(page.iter().filter_map(|u| u.as_str().map(str::to_owned)));
            offset += page.len() as u64;
            if page.is_empty() || offset >= reply["total"].as_u64().unwrap_or(0) {
                break;
            }
        }
    }
    units.sort();
    units.dedup();
    Ok(units)
}
