//! Rate-limited warnings for the data path: a flood of the same failure (accept errors
//! under fd exhaustion, slow consumers during a storm) must not fill the disk.
//!
//! Each call site of [`warn_limited!`](crate::warn_limited) owns a static [`RateLimit`]
//! that lets [`BURST`] messages through per window and counts the rest. The control plane
//! calls [`roll_window`] every [`WINDOW`]; it starts a new window everywhere and logs, per
//! call site, one summary line "N similar messages suppressed". The data path therefore
//! never reads the clock for this: a window is just a number the admin thread advances.
//!
//! Events that must be logged one by one (the device-limit rejection line) do not use it.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

/// Messages let through per call site per window.
pub const BURST: u32 = 10;
/// Length of a window; [`roll_window`] is called at this interval.
pub const WINDOW: Duration = Duration::from_secs(10);

static EPOCH: AtomicU64 = AtomicU64::new(0);
static SUPPRESSED_TOTAL: AtomicU64 = AtomicU64::new(0);
static SITES: Mutex<Vec<&'static RateLimit>> = Mutex::new(Vec::new());

/// The limiter of one call site.
#[derive(Debug)]
pub struct RateLimit {
    site: &'static str,
    epoch: AtomicU64,
    used: AtomicU32,
    suppressed: AtomicU64,
    registered: AtomicBool,
}

impl RateLimit {
    /// A limiter for the call site named `site` (file and line).
    pub const fn new(site: &'static str) -> Self {
        Self {
            site,
            epoch: AtomicU64::new(0),
            used: AtomicU32::new(0),
            suppressed: AtomicU64::new(0),
            registered: AtomicBool::new(false),
        }
    }

    /// Whether this occurrence may be logged; counts it as suppressed otherwise.
    pub fn admit(&'static self) -> bool {
        if !self.registered.load(Ordering::Relaxed) && !self.registered.swap(true, Ordering::AcqRel)
        {
            // Once per call site per process.
            SITES
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(self);
        }
        let epoch = EPOCH.load(Ordering::Relaxed);
        if self.epoch.load(Ordering::Relaxed) != epoch {
            // Two threads may both reset: the window then admits a few extra, which is fine.
            self.epoch.store(epoch, Ordering::Relaxed);
            self.used.store(0, Ordering::Relaxed);
        }
        if self.used.fetch_add(1, Ordering::Relaxed) < BURST {
            return true;
        }
        self.suppressed.fetch_add(1, Ordering::Relaxed);
        SUPPRESSED_TOTAL.fetch_add(1, Ordering::Relaxed);
        false
    }
}

/// Starts a new window and logs how many messages each call site suppressed in the last
/// one; returns the number of summary lines written.
pub fn roll_window() -> usize {
    EPOCH.fetch_add(1, Ordering::Relaxed);
    let sites = SITES
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut lines = 0;
    for site in sites.iter() {
        let n = site.suppressed.swap(0, Ordering::Relaxed);
        if n > 0 {
            tracing::warn!(
                site = site.site,
                suppressed = n,
                "{n} similar messages suppressed in the last {} s",
                WINDOW.as_secs()
            );
            lines += 1;
        }
    }
    lines
}

/// Messages suppressed since start (for `/metrics`).
pub fn suppressed_total() -> u64 {
    SUPPRESSED_TOTAL.load(Ordering::Relaxed)
}

/// `tracing::warn!` with a per-call-site budget of [`BURST`] messages per [`WINDOW`];
/// the rest are counted and summarised (see [`crate::ratelimit`]).
#[macro_export]
macro_rules! warn_limited {
    ($($arg:tt)+) => {{
        static LIMIT: $crate::ratelimit::RateLimit =
            $crate::ratelimit::RateLimit::new(concat!(file!(), ":", line!()));
        if LIMIT.admit() {
            ::tracing::warn!($($arg)+);
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_suppressed_then_summarised_and_a_new_window_admits_again() {
        static LIMIT: RateLimit = RateLimit::new("test:1");
        let before = suppressed_total();
        let admitted = (0..25).filter(|_| LIMIT.admit()).count();
        assert_eq!(admitted, BURST as usize);
        assert!(suppressed_total() - before >= 15);
        assert!(roll_window() >= 1);
        assert_eq!(LIMIT.suppressed.load(Ordering::Relaxed), 0);
        assert!(LIMIT.admit(), "a new window admits again");
    }

    #[test]
    fn macro_compiles_with_fields() {
        let peer = "192.0.2.1:4000";
        for _ in 0..3 {
            crate::warn_limited!(%peer, "accept failed: {}", "EMFILE");
        }
    }
}
