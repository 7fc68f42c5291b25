//! The connection guard: per-source-IP and global admission of new connections.
//!
//! User space owns the truth (exact per-IP counts, the device count); a guard enforces it.
//! The data path calls the guard on every accept and close and whenever the device limit
//! is reached or released. Implementations:
//!
//! - [`xdp::XdpGuard`] — loads the XDP program (`gateway-ebpf`, built by `cargo xtask
//!   build-ebpf`) onto the public interface and mirrors the truth into its maps; the
//!   program drops SYNs over the limits and packets to other ports before the kernel
//!   spends anything on them. It also checks in user space what the program cannot see
//!   (connections whose SYN passed before a count or the admit flag changed).
//! - [`userspace::UserspaceGuard`] — the same limits enforced at accept, where XDP cannot
//!   be loaded (no CAP_BPF/CAP_NET_ADMIN/CAP_PERFMON, no such interface, old kernel, no
//!   object) or is not wanted (`xdp.mode = "userspace"`). Status says which and why.
//! - [`Unguarded`] — no guard configured (`xdp.interface` unset): admits everything.
//!
//! [`build`] picks one from the `[xdp]` configuration ([`config::GuardConfig`]).

/// The `[xdp]` settings, kept with the rest of the configuration.
pub use crate::config::xdp as config;
/// Unauthenticated connections per source: in the core, where the workers count them.
pub use devgate_core::unauth;
pub mod userspace;
pub mod xdp;

use std::net::IpAddr;
use std::time::Instant;

use gateway_common::Counter;
use tracing::{info, warn};

use self::config::{GuardConfig, Mode};
use self::userspace::{Refusal, UserspaceGuard};

pub use devgate_core::guard::Guard;

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
        serde_json::json!({
            "mode": "off",
            "reason": "no guard configured (set xdp.interface or --xdp IFACE)",
            "enforcement": "none",
            "drops": drops_object(&[], &[]),
        })
    }
    fn metrics(&self, _out: &mut String) {}
}

/// Builds the guard the configuration asks for. `ports` are the gateway's TCP ports (the
/// public listener's, resolved after binding). Never fails: where XDP cannot be loaded,
/// one line is logged and the user-space guard enforces the same limits.
pub fn build(cfg: &GuardConfig, ports: &[u16]) -> Box<dyn Guard> {
    if !cfg.enabled() {
        return Box::new(Unguarded);
    }
    let reason = if cfg.mode == Mode::Userspace {
        "xdp.mode is \"userspace\"".to_owned()
    } else if cfg.interface.is_empty() {
        "no interface configured (set xdp.interface or --xdp IFACE)".to_owned()
    } else {
        match xdp::XdpGuard::load(cfg, ports) {
            Ok(guard) => {
                info!(
                    interface = %cfg.interface,
                    mode = guard.mode_name(),
                    object = %guard.object().display(),
                    "XDP guard attached"
                );
                return Box::new(guard);
            }
            Err(reason) => reason,
        }
    };
    warn!("XDP guard off: {reason}; enforcing the same limits in user space");
    Box::new(UserspaceGuard::new(cfg, reason))
}

/// The `"drops"` object: every drop reason with its count, from XDP counters (`xdp`,
/// indexed by [`Counter`]) and/or user-space refusals.
pub(crate) fn drops_object(xdp: &[u64], refused: &[(Refusal, u64)]) -> serde_json::Value {
    let mut out = serde_json::Map::new();
    for c in Counter::ALL.iter().filter(|c| c.is_drop()) {
        let n = xdp.get(*c as usize).copied().unwrap_or(0);
        out.insert(c.name().to_owned(), serde_json::json!(n));
    }
    for (r, n) in refused {
        if let Some(v) = out.get_mut(r.name()) {
            *v = serde_json::json!(v.as_u64().unwrap_or(0) + n);
        }
    }
    serde_json::Value::Object(out)
}
