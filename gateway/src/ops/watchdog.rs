//! Readiness and the watchdog, run on the admin thread.
//!
//! `READY=1` is sent once the listeners are bound (they are before the admin thread
//! starts) and every data-path worker has entered its loop. After that the task pings
//! `WATCHDOG=1` at a quarter of the interval the service manager asked for, but only while
//! every worker's loop heartbeat ([`Shared::oldest_heartbeat_age`](crate::shared::Shared::oldest_heartbeat_age)) is younger than half
//! that interval. A worker stuck in a loop or blocked in a syscall stops its heartbeat;
//! the pings stop, and systemd restarts the gateway after `WatchdogSec`. A ping from a
//! timer alone would prove only that the admin thread runs, which is not the part that
//! serves devices.
//!
//! Workers tick at least once a second even when idle (`Worker::tick` asks to be called
//! again within 1 s), so a healthy heartbeat is never older than about a second.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::daemon::Daemon;

/// The stall bound is never below this, whatever `WatchdogSec` says: a busy loop turn
/// of a second or two under a reconnect storm is not a hang.
pub const MIN_STALL_BOUND: Duration = Duration::from_secs(3);
/// How often `STATUS=` is refreshed for `systemctl status`.
const STATUS_EVERY: Duration = Duration::from_secs(10);

static PINGS: AtomicU64 = AtomicU64::new(0);
static WITHHELD: AtomicU64 = AtomicU64::new(0);

/// Heartbeats older than this mean the data path is stuck, for a watchdog `interval`.
pub fn stall_bound(interval: Duration) -> Duration {
    (interval / 2).max(MIN_STALL_BOUND)
}

/// How often to check and ping for a watchdog `interval` (a quarter of it, so that one
/// late wake-up of the admin thread does not miss the deadline).
pub fn ping_every(interval: Duration) -> Duration {
    (interval / 4).max(Duration::from_millis(50))
}

/// Whether the data path is alive enough to ping.
pub fn should_ping(oldest_heartbeat_age: Duration, interval: Duration) -> bool {
    oldest_heartbeat_age < stall_bound(interval)
}

/// The `"watchdog"` object of `/v1/status`.
pub fn status(shared: &Daemon, now: Instant) -> serde_json::Value {
    let interval = super::notify::watchdog_interval();
    serde_json::json!({
        "notify_socket": super::notify::enabled(),
        "interval_ms": interval.map(|d| d.as_millis()),
        "stall_bound_ms": interval.map(|d| stall_bound(d).as_millis()),
        "oldest_heartbeat_age_ms": shared.oldest_heartbeat_age(now).as_millis(),
        "pings": PINGS.load(Ordering::Relaxed),
        "withheld": WITHHELD.load(Ordering::Relaxed),
    })
}

/// One line for `systemctl status`.
fn status_line(shared: &Daemon) -> String {
    format!(
        "serving: {} devices, {} managers",
        shared.device_count.load(Ordering::Relaxed),
        shared.manager_count()
    )
}

/// Sends READY once the workers run, then pings the watchdog and refreshes the status
/// line until shutdown. Runs forever on the admin runtime.
pub async fn run(shared: Arc<Daemon>) {
    while shared.workers_ready.load(Ordering::Acquire) < shared.worker_count() {
        if shared.shutting_down.load(Ordering::Relaxed) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    if super::notify::ready(&status_line(&shared)) {
        tracing::info!("notified the service manager: ready");
    }
    let interval = super::notify::watchdog_interval();
    if let Some(i) = interval {
        tracing::info!(
            "watchdog: pinging every {} ms while worker heartbeats are younger than {} ms",
            ping_every(i).as_millis(),
            stall_bound(i).as_millis()
        );
    }
    let every = interval.map_or(STATUS_EVERY, ping_every).min(STATUS_EVERY);
    let mut last_status = Instant::now();
    loop {
        tokio::time::sleep(every).await;
        if shared.shutting_down.load(Ordering::Relaxed) {
            // Workers are closing sessions and leaving their loops: their heartbeats stop
            // on purpose. systemd no longer expects pings once STOPPING=1 was sent.
            return;
        }
        let now = Instant::now();
        if let Some(i) = interval {
            let age = shared.oldest_heartbeat_age(now);
            if should_ping(age, i) {
                super::notify::watchdog();
                PINGS.fetch_add(1, Ordering::Relaxed);
            } else {
                WITHHELD.fetch_add(1, Ordering::Relaxed);
                crate::warn_limited!(
                    "data path stalled: a worker's last loop turn was {} ms ago; withholding the watchdog ping",
                    age.as_millis()
                );
            }
        }
        if now.duration_since(last_status) >= STATUS_EVERY && super::notify::enabled() {
            super::notify::status(&status_line(&shared));
            last_status = now;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pings_only_while_heartbeats_are_fresh() {
        let interval = Duration::from_secs(30);
        assert_eq!(stall_bound(interval), Duration::from_secs(15));
        assert_eq!(ping_every(interval), Duration::from_millis(7500));
        assert!(should_ping(Duration::from_millis(900), interval));
        assert!(!should_ping(Duration::from_secs(15), interval));
        // A short WatchdogSec does not turn one slow loop turn into a restart.
        assert_eq!(stall_bound(Duration::from_secs(2)), MIN_STALL_BOUND);
    }
}
