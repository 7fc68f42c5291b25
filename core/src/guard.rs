//! The admission guard as the workers call it: on every accept (and PROXY header) and
//! close. The daemon implements it (XDP maps or user-space counters, `gateway::guard`).

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
    /// The gateway is stopping: detach from the kernel (the XDP program).
    fn shutdown(&self) {}
}
