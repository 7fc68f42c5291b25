//! The sending side of a byte stream, shared by managers and devices: send
//! `chunk`-byte StreamData frames while the peer's credit allows, until a
//! deadline. Credit is a semaphore of bytes; StreamWindow frames add permits.

use std::sync::Arc;
use std::time::Instant;

use devgate_client::{Frame, Sender};
use tokio::sync::Semaphore;

use crate::report::Stats;

/// Credit each receiver grants (the gateway caps it at 1 MiB).
pub(crate) const WINDOW: u32 = 512 * 1024;
/// Receivers return credit once they have consumed this many bytes.
pub(crate) const CHUNK_GRANT: usize = 128 * 1024;

/// One direction of one stream.
#[derive(Debug)]
pub(crate) struct StreamPump {
    pub(crate) tx: Sender,
    /// Empty on a device connection; the device's unit ID on a manager's.
    pub(crate) unit: String,
    pub(crate) id: u32,
    pub(crate) credit: Arc<Semaphore>,
    pub(crate) chunk: usize,
    pub(crate) stop_at: Instant,
    /// Kept for the sender's own failure counts.
    pub(crate) stats: Arc<Stats>,
}

impl StreamPump {
    /// Sends until `stop_at` or until the connection fails.
    pub(crate) async fn run(self) {
        let data = vec![0xa5u8; self.chunk.max(1)];
        let want = u32::try_from(data.len()).unwrap_or(u32::MAX);
        let deadline = tokio::time::Instant::from_std(self.stop_at);
        loop {
            let permit = tokio::time::timeout_at(deadline, self.credit.acquire_many(want)).await;
            match permit {
                Ok(Ok(p)) => p.forget(),
                _ => return,
            }
            if let Err(e) = self
                .tx
                .send(&Frame::stream_data(&self.unit, self.id, &data))
                .await
            {
                if self.stop_at > Instant::now() {
                    self.stats.error(&format!(
                        "stream send: {}",
                        crate::device::error_kind(&e.to_string())
                    ));
                }
                return;
            }
        }
    }
}
