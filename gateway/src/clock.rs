//! The wall clock, read by the daemon only (the routing core is handed what it needs).

use std::time::{SystemTime, UNIX_EPOCH};

/// Current time in unix seconds.
pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}
