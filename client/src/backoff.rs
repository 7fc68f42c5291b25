//! Reconnect delays for agents: exponential backoff with full jitter.
//!
//! "Full jitter" (each delay uniform in `[0, min(cap, base·2ⁿ)]`) is what
//! spreads 50,000 devices out after a gateway restart; without jitter they
//! would all come back in the same millisecond, attempt after attempt.

use std::fmt;
use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use crate::{DEFAULT_BACKOFF_BASE, DEFAULT_BACKOFF_CAP};

/// Exponential backoff with full jitter.
pub struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
    rng: SmallRng,
}

impl fmt::Debug for Backoff {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Backoff")
            .field("base", &self.base)
            .field("cap", &self.cap)
            .field("attempt", &self.attempt)
            .finish_non_exhaustive()
    }
}

impl Default for Backoff {
    /// Base 100 ms, cap 30 s.
    fn default() -> Self {
        Self::new(DEFAULT_BACKOFF_BASE, DEFAULT_BACKOFF_CAP)
    }
}

impl Backoff {
    /// Delays start below `base` and double per attempt up to `cap`.
    pub fn new(base: Duration, cap: Duration) -> Self {
        Self {
            base,
            cap,
            attempt: 0,
            rng: SmallRng::from_rng(&mut rand::rng()),
        }
    }

    /// The ceiling of the next delay: `min(cap, base·2ⁿ)`.
    pub fn current_ceiling(&self) -> Duration {
        let factor = 1u32 << self.attempt.min(31);
        self.base.saturating_mul(factor).min(self.cap)
    }

    /// The delay before the next attempt, uniform in `[0, min(cap, base·2ⁿ)]`.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.current_ceiling();
        self.attempt = self.attempt.saturating_add(1);
        let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(self.rng.random_range(0..=nanos))
    }

    /// Back to the first attempt (after a connection that worked).
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}
