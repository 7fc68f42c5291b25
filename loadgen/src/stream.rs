//! Both ends of a load-generator byte stream, shared by managers and devices. The streams
//! are `devgate_client`'s [`DevgateStream`]s (the library every program uses, so this
//! measures it): the sender writes `chunk`-byte buffers until a deadline and the library
//! waits for credit; the receiver reads and counts, and the library returns credit as it
//! reads.

use std::time::Instant;

use devgate_client::{DevgateStream, MAX_CHUNK};
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};

use crate::report::Stats;

/// Writes `chunk`-byte buffers until `stop_at`. A failure before then is counted as an
/// error of kind `stream send: …`.
pub(crate) async fn send_until(
    mut wr: WriteHalf<DevgateStream>,
    chunk: usize,
    stop_at: Instant,
    stats: &Stats,
) {
    let data = vec![0xa5u8; chunk.max(1)];
    let deadline = tokio::time::Instant::from_std(stop_at);
    loop {
        match tokio::time::timeout_at(deadline, wr.write_all(&data)).await {
            Ok(Ok(())) => {}
            // The peer closed the stream normally: its side of the run is over.
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => return,
            Ok(Err(e)) => {
                if stop_at > Instant::now() {
                    stats.error(&format!(
                        "stream send: {}",
                        crate::device::error_kind(&e.to_string())
                    ));
                }
                return;
            }
            Err(_) => return,
        }
    }
}

/// Reads until end of file, an error, or `give_up`, handing `(bytes, frames)` to `count`
/// as they arrive. A stream hides frame boundaries, so frames are counted as the data
/// frames the sender's `chunk`-byte writes become (the library sends at most
/// [`MAX_CHUNK`] bytes per frame). Returns the error that ended the stream, if one did.
pub(crate) async fn read_counting(
    mut rd: ReadHalf<DevgateStream>,
    chunk: usize,
    give_up: Instant,
    mut count: impl FnMut(u64, u64),
) -> Option<std::io::Error> {
    let frame = chunk.clamp(1, MAX_CHUNK);
    let mut buf = vec![0u8; MAX_CHUNK];
    // Bytes of a frame begun but not yet complete.
    let mut partial = 0usize;
    let deadline = tokio::time::Instant::from_std(give_up);
    loop {
        match tokio::time::timeout_at(deadline, rd.read(&mut buf)).await {
            Ok(Ok(0)) | Err(_) => return None,
            Ok(Ok(n)) => {
                partial += n;
                let frames = partial / frame;
                partial %= frame;
                count(n as u64, frames as u64);
            }
            Ok(Err(e)) => return Some(e),
        }
    }
}
