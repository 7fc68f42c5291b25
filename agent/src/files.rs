//! File streams (PROTOCOL.md section 11.5): `file-put` writes into a receive directory
//! through a partial file that a dropped transfer resumes from, checks the SHA-256 and
//! renames the file into place; `file-get` sends an allow-listed file with its size and
//! SHA-256 first. What may be touched is decided in `file_policy.rs` before anything is
//! opened.

use std::collections::HashSet;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use devgate_client::{DevgateStream, ErrorCode, IncomingStream};
use devgate_proto::remote::{GetHeader, PutStart, sha256_hex};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

use crate::config::FilesSpec;
use crate::file_policy::{allowed_to_send, get_allowed, put_start, put_target};

/// Bytes moved per read or write.
const CHUNK: usize = 256 * 1024;

/// Partial files a transfer is writing right now: a second transfer of the same file (a
/// manager retrying before the device noticed the first one's connection is gone) is told
/// to retry instead of writing the same file at once.
static ACTIVE: Mutex<Option<HashSet<PathBuf>>> = Mutex::new(None);

/// Holds a partial file for one transfer; released when dropped.
struct Claim(PathBuf);

impl Claim {
    fn take(part: &Path) -> Option<Self> {
        let mut active = ACTIVE.lock().unwrap_or_else(PoisonError::into_inner);
        active
            .get_or_insert_with(HashSet::new)
            .insert(part.to_owned())
            .then(|| Self(part.to_owned()))
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        let mut active = ACTIVE.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(set) = active.as_mut() {
            set.remove(&self.0);
        }
    }
}

/// A `file-put` stream: receives `size` bytes with SHA-256 `sha256` as `name`.
pub(crate) async fn put(
    incoming: IncomingStream,
    spec: &FilesSpec,
    name: &str,
    size: u64,
    sha256: &str,
    offset: u64,
) {
    let target = match put_target(spec, name, sha256) {
        Ok(t) => t,
        Err(reason) => {
            tracing::warn!("refused stream: {reason}");
            incoming.refuse(ErrorCode::NotPermitted, &reason);
            return;
        }
    };
    let Some(_claim) = Claim::take(&target.part) else {
        incoming.refuse(
            ErrorCode::TooManyRequests,
            &format!("file-put of {name}: another transfer of this file is running; retry later"),
        );
        return;
    };
    let prepared = async {
        let have = match tokio::fs::metadata(&target.part).await {
            Ok(m) => m.len(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(format!("reading {}: {e}", target.part.display())),
        };
        let start = put_start(offset, have, size);
        let free = rustix::fs::statvfs(&target.dir)
            .map(|s| s.f_bavail.saturating_mul(s.f_frsize))
            .map_err(|e| format!("receive directory {}: {e}", target.dir.display()))?;
        if size - start > free {
            return Err(format!(
                "not enough space in {}: {} bytes needed, {free} free",
                target.dir.display(),
                size - start
            ));
        }
        let mut file = tokio::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(false)
            .open(&target.part)
            .await
            .map_err(|e| format!("creating {}: {e}", target.part.display()))?;
        file.set_len(start)
            .await
            .map_err(|e| format!("truncating {}: {e}", target.part.display()))?;
        file.seek(SeekFrom::Start(start))
            .await
            .map_err(|e| format!("seeking in {}: {e}", target.part.display()))?;
        let prefix = hash_prefix(&target.part, start)
            .await
            .map_err(|e| format!("reading {}: {e}", target.part.display()))?;
        Ok((file, start, prefix))
    }
    .await;
    let (mut file, start, mut hasher) = match prepared {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!("file-put of {name} failed: {e}");
            incoming.refuse(ErrorCode::Internal, &format!("file-put of {name}: {e}"));
            return;
        }
    };
    let mut stream = incoming.accept();
    if let Err(e) = stream.write_all(&PutStart(start).encode()).await {
        tracing::info!("file-put of {name}: the manager went away: {e}");
        return;
    }
    let want = size - start;
    let received = receive(&mut stream, &mut file, &mut hasher, want).await;
    // A write may still be running in the background: the next transfer of this file must
    // find the partial file as this one leaves it.
    let flushed = file.flush().await;
    match (received, flushed) {
        (Ok(()), Ok(())) => {}
        (Err(Dropped(why)), _) => {
            tracing::info!(
                name,
                start,
                "file-put dropped ({why}); the partial file is kept for a resume"
            );
            return;
        }
        (Ok(()) | Err(WriteFailed(_)), Err(e)) | (Err(WriteFailed(e)), Ok(())) => {
            let reason = format!("file-put of {name}: writing {}: {e}", target.part.display());
            tracing::warn!("{reason}");
            stream.close_with(u16::from(ErrorCode::Internal), &reason);
            return;
        }
    }
    let digest: [u8; 32] = hasher.finalize().into();
    let actual = sha256_hex(&digest);
    if actual != sha256 {
        drop(file);
        let _ = tokio::fs::remove_file(&target.part).await;
        let reason = format!(
            "file-put of {name}: SHA-256 mismatch (received {actual}, expected {sha256}); \
             the partial file was removed, send it again"
        );
        tracing::warn!("{reason}");
        stream.close_with(u16::from(ErrorCode::Internal), &reason);
        return;
    }
    let done = async {
        file.flush().await?;
        file.sync_all().await?;
        drop(file);
        tokio::fs::rename(&target.part, &target.path).await?;
        // The rename itself is durable once the directory is synced.
        tokio::fs::File::open(&target.dir).await?.sync_all().await
    }
    .await;
    match done {
        Ok(()) => {
            tracing::info!(path = %target.path.display(), size, resumed_at = start, "received a file");
            stream.close_with(0, "");
        }
        Err(e) => {
            let reason = format!("file-put of {name}: storing {}: {e}", target.path.display());
            tracing::warn!("{reason}");
            stream.close_with(u16::from(ErrorCode::Internal), &reason);
        }
    }
}

/// Why receiving stopped before the last byte.
enum Stopped {
    /// The stream ended (the manager or the connection went away).
    Dropped(String),
    /// The partial file could not be written.
    WriteFailed(std::io::Error),
}
use Stopped::{Dropped, WriteFailed};

/// Reads `want` bytes from the stream into the file and the hash.
async fn receive(
    stream: &mut DevgateStream,
    file: &mut tokio::fs::File,
    hasher: &mut Sha256,
    want: u64,
) -> Result<(), Stopped> {
    let mut got = 0u64;
    let mut buf = vec![0u8; CHUNK];
    while got < want {
        let room = usize::try_from((want - got).min(CHUNK as u64)).unwrap_or(CHUNK);
        let n = match stream.read(&mut buf[..room]).await {
            Ok(0) => return Err(Dropped(format!("the manager ended it after {got} bytes"))),
            Ok(n) => n,
            Err(e) => return Err(Dropped(format!("{e}, after {got} bytes"))),
        };
        file.write_all(&buf[..n]).await.map_err(WriteFailed)?;
        hasher.update(&buf[..n]);
        got += n as u64;
    }
    Ok(())
}

/// SHA-256 state over the first `len` bytes of `path` (what a resumed transfer already has).
async fn hash_prefix(path: &Path, len: u64) -> std::io::Result<Sha256> {
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || {
        let mut h = Sha256::new();
        if len > 0 {
            let f = std::fs::File::open(&path)?;
            let copied = std::io::copy(&mut f.take(len), &mut h)?;
            if copied != len {
                return Err(std::io::Error::other("the partial file shrank while read"));
            }
        }
        Ok(h)
    })
    .await
    .map_err(std::io::Error::other)?
}

/// A `file-get` stream: sends `path` from `offset`, after its size and SHA-256.
pub(crate) async fn get(incoming: IncomingStream, spec: &FilesSpec, path: &str, offset: u64) {
    let allowed = match get_allowed(spec, path) {
        Ok(p) => p,
        Err(reason) => {
            tracing::warn!("refused stream: {reason}");
            incoming.refuse(ErrorCode::NotPermitted, &reason);
            return;
        }
    };
    // A symlink below an allowed directory must not lead outside the allow-list.
    let real = match tokio::fs::canonicalize(&allowed).await {
        Ok(r) => r,
        Err(e) => {
            incoming.refuse(ErrorCode::Internal, &format!("file-get of {path}: {e}"));
            return;
        }
    };
    if !allowed_to_send(spec, &real) {
        let reason = format!(
            "file-get of {path}: it resolves to {}, which is not on this device's allow-list \
             (files.send)",
            real.display()
        );
        tracing::warn!("refused stream: {reason}");
        incoming.refuse(ErrorCode::NotPermitted, &reason);
        return;
    }
    let opened = tokio::task::spawn_blocking(move || -> std::io::Result<_> {
        let mut f = std::fs::File::open(&real)?;
        if !f.metadata()?.is_file() {
            return Err(std::io::Error::other("not a regular file"));
        }
        let mut h = Sha256::new();
        let size = std::io::copy(&mut f, &mut h)?;
        let digest: [u8; 32] = h.finalize().into();
        let start = offset.min(size);
        f.seek(SeekFrom::Start(start))?;
        Ok((f, size, start, digest))
    })
    .await
    .map_err(std::io::Error::other)
    .and_then(|r| r);
    let (file, size, start, sha256) = match opened {
        Ok(o) => o,
        Err(e) => {
            incoming.refuse(ErrorCode::Internal, &format!("file-get of {path}: {e}"));
            return;
        }
    };
    let mut stream = incoming.accept();
    let header = GetHeader {
        size,
        start,
        sha256,
    };
    let mut file = tokio::fs::File::from_std(file).take(size - start);
    let sent = async {
        stream.write_all(&header.encode()).await?;
        tokio::io::copy(&mut file, &mut stream).await
    }
    .await;
    match sent {
        Ok(n) if n == size - start => {
            tracing::info!(path, size, from = start, "sent a file");
            stream.close_with(0, "");
        }
        Ok(n) => {
            let reason = format!("file-get of {path}: the file shrank while sent ({n} bytes)");
            stream.close_with(u16::from(ErrorCode::Internal), &reason);
        }
        Err(e) => tracing::info!(path, "file-get dropped: {e}"),
    }
}
