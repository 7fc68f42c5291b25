//! Giving memory back to the operating system after many connections have gone.
//!
//! Each connection's TLS state and buffers are freed when it closes, but glibc's allocator
//! keeps freed pages in its arenas (one per thread that allocated), so a gateway that once
//! held 24,000 devices kept ~150 MB resident after they left. `malloc_trim(0)` hands the
//! free pages of every arena back (`madvise(MADV_DONTNEED)`, also from the middle of a
//! heap). It walks the arenas under their locks, so a worker that allocates meanwhile
//! waits: it runs only after a large drop, at most once per [`MIN_INTERVAL`], from the
//! store thread.

use std::time::{Duration, Instant};

/// Connections that must have gone since the peak (and at least half of it).
pub const MIN_DROP: usize = 1000;
/// Least time between two trims.
pub const MIN_INTERVAL: Duration = Duration::from_secs(30);

/// When to trim: after the open connections fell by at least [`MIN_DROP`] and by half
/// from their peak since the last trim.
#[derive(Debug, Default)]
pub struct TrimPolicy {
    peak: usize,
    last: Option<Instant>,
}

impl TrimPolicy {
    /// Called about once a second with the open connections; true if a trim is due now
    /// (the policy then starts counting from `open`).
    pub fn due(&mut self, open: usize, now: Instant) -> bool {
        self.peak = self.peak.max(open);
        let dropped = self.peak - open;
        let spaced = self
            .last
            .is_none_or(|t| now.saturating_duration_since(t) >= MIN_INTERVAL);
        if dropped >= MIN_DROP && dropped * 2 >= self.peak && spaced {
            self.peak = open;
            self.last = Some(now);
            return true;
        }
        false
    }
}

/// Resident set size of this process in KiB (0 if unknown).
pub fn rss_kib() -> u64 {
    let Ok(statm) = std::fs::read_to_string("/proc/self/statm") else {
        return 0;
    };
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    pages * u64::try_from(page).unwrap_or(4096) / 1024
}

/// Returns free allocator memory to the OS; returns the resident KiB before and after.
pub fn trim() -> (u64, u64) {
    let before = rss_kib();
    // SAFETY: malloc_trim only walks the allocator's own structures.
    unsafe {
        libc::malloc_trim(0);
    }
    (before, rss_kib())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trims_after_a_large_drop_and_not_again_within_the_interval() {
        let mut p = TrimPolicy::default();
        let t0 = Instant::now();
        assert!(!p.due(24_000, t0));
        assert!(!p.due(13_000, t0), "a drop of less than half");
        assert!(p.due(100, t0 + Duration::from_secs(1)));
        // Up again and down again, but too soon.
        assert!(!p.due(5_000, t0 + Duration::from_secs(2)));
        assert!(!p.due(0, t0 + Duration::from_secs(3)));
        assert!(p.due(0, t0 + Duration::from_secs(1) + MIN_INTERVAL));
    }

    #[test]
    fn small_fleets_are_left_alone() {
        let mut p = TrimPolicy::default();
        let t0 = Instant::now();
        assert!(!p.due(900, t0));
        assert!(!p.due(0, t0 + MIN_INTERVAL));
    }

    #[test]
    fn trim_reports_resident_sizes() {
        let (before, after) = trim();
        assert!(before > 0 && after > 0);
    }
}
