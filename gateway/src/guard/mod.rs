//! The connection guard: per-source-IP and global admission of new connections.
//!
//! User space owns the truth (exact per-IP counts, the device count); a guard enforces it.
//! The data path calls the guard on every accept and close and whenever the device limit
//! is reached or released. Implementations: [`Unguarded`] (no limits) and, with the XDP
//! issue, an XDP guard that mirrors the counts into BPF maps and a user-space guard that
//! enforces the same limits when XDP cannot be loaded.

use std::net::IpAddr;
use std::time::Instant;

/// Admission decisions for new connections; shared by all workers.
pub trait Guard: Send + Sync + std::fmt::Debug {
    /// A TCP connection from `ip` was accepted; return false to refuse (close) it.
    fn admit(&self, ip: IpAddr, now: Instant) -> bool;
    /// A connection from `ip` that was admitted has closed.
    fn closed(&self, ip: IpAddr);
    /// Whether new connections are admitted at all (false while the device limit is reached).
    fn set_accepting(&self, accepting: bool);
    /// The `"xdp"` object of `/v1/status`.
    fn status(&self) -> serde_json::Value;
    /// Appends the guard's Prometheus metrics.
    fn metrics(&self, out: &mut String);
}

/// No limits beyond the gateway's own (device limit, `max_connections`).
#[derive(Debug, Default)]
pub struct Unguarded;

impl Guard for Unguarded {
    fn admit(&self, _ip: IpAddr, _now: Instant) -> bool {
        true
    }
    fn closed(&self, _ip: IpAddr) {}
    fn set_accepting(&self, _accepting: bool) {}
    fn status(&self) -> serde_json::Value {
        serde_json::json!({ "mode": "off", "reason": "no guard configured" })
    }
    fn metrics(&self, _out: &mut String) {}
}
