//! `devgate-ctl pull UNIT PATH [--out FILE]`: fetches an allow-listed file from a device
//! (PROTOCOL.md section 11.5) into a partial file next to FILE, resuming it after a dropped
//! connection, and renames it into place once its SHA-256 matches what the device said.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use devgate_proto::remote::{GetHeader, OpenParams, sha256_hex};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

use crate::link::{Link, OpenFailure};
use crate::progress::{DeviceResult, Progress};
use crate::push::{MAX_ATTEMPTS, MAX_IDLE_ATTEMPTS, retry_backoff, stalled};

const CHUNK: usize = 256 * 1024;

/// The partial file for `out`: hidden, in the same directory (so the rename is atomic).
pub(crate) fn partial_for(out: &Path) -> PathBuf {
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    out.with_file_name(format!(".{name}.part"))
}

/// Fetches `path` from `unit` into `out`.
pub(crate) async fn run(
    link: &Link,
    unit: &str,
    path: &str,
    out: &Path,
    progress: &Progress,
) -> DeviceResult {
    let started = Instant::now();
    let part = partial_for(out);
    let mut r = DeviceResult {
        unit: unit.to_owned(),
        error: None,
        bytes: 0,
        resumed_at: 0,
        attempts: 0,
        elapsed: Duration::ZERO,
    };
    // The whole file's SHA-256 as the device first said it: a resume only continues the
    // same content.
    let mut expected: Option<[u8; 32]> = None;
    let mut backoff = retry_backoff();
    let mut idle = 0;
    loop {
        r.attempts += 1;
        let before = r.bytes;
        let have = match expected {
            Some(_) => tokio::fs::metadata(&part)
                .await
                .map(|m| m.len())
                .unwrap_or(0),
            None => 0,
        };
        let params = OpenParams::FileGet {
            path: path.to_owned(),
            offset: have,
        }
        .encode();
        let outcome = match link.open(unit, &params).await {
            Ok(stream) => attempt(stream, &part, out, &mut expected, &mut r, progress).await,
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

async fn attempt(
    mut stream: devgate_client::DevgateStream,
    part: &Path,
    out: &Path,
    expected: &mut Option<[u8; 32]>,
    r: &mut DeviceResult,
    progress: &Progress,
) -> Result<(), String> {
    let mut head = [0u8; GetHeader::LEN];
    stalled(stream.read_exact(&mut head), "the file's header").await?;
    let h = GetHeader::decode(&head)
        .map_err(|e| e.to_string())?
        .ok_or("the file's header is incomplete")?;
    if expected.is_some_and(|e| e != h.sha256) {
        // The file changed on the device since the first attempt: start over.
        *expected = None;
        let _ = tokio::fs::remove_file(part).await;
        return Err("the file changed on the device; fetching it again from the start".into());
    }
    let start = h.start;
    *expected = Some(h.sha256);
    r.resumed_at = start;
    let io = |e: std::io::Error| format!("{}: {e}", part.display());
    let mut file = tokio::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(false)
        .open(part)
        .await
        .map_err(io)?;
    file.set_len(start).await.map_err(io)?;
    let mut hasher = hash_prefix(part, start).await.map_err(io)?;
    file.seek(std::io::SeekFrom::Start(start))
        .await
        .map_err(io)?;
    let received = receive(
        &mut stream,
        &mut file,
        &mut hasher,
        h.size - start,
        r,
        progress,
    )
    .await;
    // A write may still be running in the background: the next attempt must find the
    // partial file as this one leaves it.
    file.flush().await.map_err(io)?;
    received?;
    file.sync_all().await.map_err(io)?;
    drop(file);
    let got: [u8; 32] = hasher.finalize().into();
    if got != h.sha256 {
        let _ = tokio::fs::remove_file(part).await;
        *expected = None;
        return Err(format!(
            "SHA-256 mismatch (received {}, the device said {}); fetching it again",
            sha256_hex(&got),
            sha256_hex(&h.sha256)
        ));
    }
    tokio::fs::rename(part, out)
        .await
        .map_err(|e| format!("renaming {} to {}: {e}", part.display(), out.display()))?;
    Ok(())
}

/// Reads `left` bytes of the file from the stream into the partial file and the hash.
async fn receive(
    stream: &mut devgate_client::DevgateStream,
    file: &mut tokio::fs::File,
    hasher: &mut Sha256,
    mut left: u64,
    r: &mut DeviceResult,
    progress: &Progress,
) -> Result<(), String> {
    let mut buf = vec![0u8; CHUNK];
    while left > 0 {
        let want = usize::try_from(left.min(CHUNK as u64)).unwrap_or(CHUNK);
        let n = stalled(stream.read(&mut buf[..want]), "file bytes").await?;
        if n == 0 {
            return Err(format!("the device ended the file {left} bytes early"));
        }
        file.write_all(&buf[..n])
            .await
            .map_err(|e| format!("writing the partial file: {e}"))?;
        hasher.update(&buf[..n]);
        left -= n as u64;
        r.bytes += n as u64;
        progress.bytes.fetch_add(n as u64, Ordering::Relaxed);
    }
    Ok(())
}

async fn hash_prefix(path: &Path, len: u64) -> std::io::Result<Sha256> {
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || {
        let mut h = Sha256::new();
        if len > 0 {
            let f = std::fs::File::open(&path)?;
            std::io::copy(&mut std::io::Read::take(f, len), &mut h)?;
        }
        Ok(h)
    })
    .await
    .map_err(std::io::Error::other)?
}
