//! Per-connection timers of a worker, so that a tick touches only what is due.
//!
//! A worker used to sweep every slot it held on each tick; with thousands of handshaking
//! (or silent) connections that sweep stole the loop from established sessions. Every
//! per-connection timer of a worker has a fixed delay — the handshake timeout from accept,
//! the sweep period from a session's last check — so entries are pushed in deadline order
//! and a FIFO queue is a complete timer structure: O(1) to arm, and a tick pops only the
//! entries at the front that are due. Entries are keyed by slot and generation and never
//! cancelled: one whose connection has gone or moved on is dropped when it comes up
//! (its memory is bounded by the arm rate times the delay).

use std::collections::VecDeque;
use std::time::Instant;

/// One armed timer: `slot`'s connection of `generation` is due at `due`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timer {
    /// When the timer fires.
    pub due: Instant,
    /// The worker slot.
    pub slot: u32,
    /// The slot's generation when the timer was armed.
    pub generation: u32,
}

/// Timers with one fixed delay each, in arming (= deadline) order.
#[derive(Debug, Default)]
pub struct FifoTimers {
    queue: VecDeque<Timer>,
}

impl FifoTimers {
    /// Arms a timer. `due` must not be earlier than that of any timer armed before it
    /// (true when every timer of this queue has the same delay from a monotonic `now`);
    /// an earlier one would merely fire late, behind those.
    pub fn push(&mut self, due: Instant, slot: u32, generation: u32) {
        self.queue.push_back(Timer {
            due,
            slot,
            generation,
        });
    }

    /// The front timer, if it is due at `now`.
    pub fn pop_due(&mut self, now: Instant) -> Option<Timer> {
        if self.queue.front().is_some_and(|t| t.due <= now) {
            self.queue.pop_front()
        } else {
            None
        }
    }

    /// The oldest timer, due or not (eviction of the oldest connection).
    pub fn pop_oldest(&mut self) -> Option<Timer> {
        self.queue.pop_front()
    }

    /// When the front timer fires.
    pub fn next_due(&self) -> Option<Instant> {
        self.queue.front().map(|t| t.due)
    }

    /// Armed timers (including ones whose connection has gone).
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// Whether no timer is armed.
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }
}
