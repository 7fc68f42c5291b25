//! The start of a graceful shutdown (SIGTERM, SIGINT): workers close their sessions.

use crate::shared::Shared;

/// Starts a graceful shutdown: workers stop accepting, close every session with
/// "going away" (devices reconnect with backoff, possibly to another instance), and exit.
pub fn begin_shutdown(shared: &Shared) {
    if shared
        .shutting_down
        .swap(true, std::sync::atomic::Ordering::AcqRel)
    {
        return;
    }
    tracing::info!("shutting down: closing sessions");
    crate::ops::notify::stopping();
    for inbox in shared.inboxes.iter() {
        inbox.wake_now();
    }
    // A worker stuck behind a peer that never reads must not hold the process forever.
    std::thread::spawn(|| {
        std::thread::sleep(std::time::Duration::from_secs(10));
        tracing::warn!("shutdown took longer than 10 s; exiting anyway");
        std::process::exit(0);
    });
}
