//! The configuration sections the routing core reads (`[limits]`, `[keepalive]`,
//! `[managers]`, `[credentials]`), with their defaults. The daemon's configuration file
//! embeds them; [`Settings`] is the part of it the shared state holds.

use serde::{Deserialize, Serialize};

/// What the core needs from the configuration.
#[derive(Debug, Clone, Default)]
pub struct Settings {
    /// `[limits]`.
    pub limits: Limits,
    /// `[keepalive]`.
    pub keepalive: Keepalive,
    /// `[managers]`.
    pub managers: Managers,
    /// `[credentials]`.
    pub credentials: Credentials,
    /// Source networks allowed to send a PROXY protocol header (`proxy_protocol_from`).
    pub proxy_protocol_from: Vec<String>,
}
/// Limits that keep a gateway alive under load and abuse.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Maximum connected devices; 0 = unlimited. Changeable at run time by a manager.
    pub device_limit: u64,
    /// Whom `device_limit` counts: `instance` (this process) or `fleet` (every instance
    /// on the shared PostgreSQL store, counts exchanged through it every second).
    pub device_limit_scope: DeviceLimitScope,
    /// Maximum open connections of any kind (handshakes included); 0 = derived from
    /// RLIMIT_NOFILE (per worker on io_uring, whose workers each own a file table).
    pub max_connections: u64,
    /// Time allowed for the TLS handshake plus the HTTP request head.
    pub handshake_timeout_ms: u64,
    /// Largest HTTP request head accepted.
    pub max_header_bytes: usize,
    /// Largest WebSocket message (one devgate frame) accepted.
    pub max_message_bytes: usize,
    /// Bytes queued towards one connection before senders get `queue_full`.
    pub queue_bytes: usize,
    /// Bytes queued towards one connection before it is disconnected as too slow
    /// (frames that must not be dropped, such as presence, count against this).
    pub queue_hard_bytes: usize,
    /// Commands outstanding at one device before managers get `too_many_requests`.
    pub max_pending_requests: usize,
    /// A command not answered within this time is failed with `request_timeout`.
    pub request_timeout_ms: u64,
    /// Streams open at one device at once.
    pub max_streams_per_device: usize,
    /// Credit outstanding per stream direction is capped at this many bytes.
    pub stream_window_cap: u32,
    /// Unauthenticated connections (TLS handshake or HTTP head not finished) one source
    /// (IPv4 address, IPv6 /64) may hold at once; more are refused at accept. 0 = no cap.
    pub max_handshakes_per_source: u32,
    /// Share of `max_connections`, in percent, that only sessions may use: unauthenticated
    /// connections fill at most the rest, and a newcomer past that evicts the oldest one.
    pub session_reserve_percent: u8,
}

/// What `limits.device_limit` counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeviceLimitScope {
    /// The devices of this instance.
    #[default]
    #[serde(rename = "instance")]
    Instance,
    /// The devices of every instance sharing the PostgreSQL store.
    #[serde(rename = "fleet")]
    Fleet,
}

/// Keep-alive settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Keepalive {
    /// A peer silent for this long is sent a ping; silent for twice this long, it is dead.
    pub ping_interval_ms: u64,
}

/// The `[credentials]` section.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Credentials {
    /// Refuse device certificates of units the registry has never seen and manager
    /// certificates of names nothing is recorded under. Off by default: certificates made
    /// directly with the CA key (the load generator, test fleets, managers issued before
    /// certificates were recorded) are then accepted on the CA's signature alone.
    pub require_registered: bool,
}

/// Manager presence policy (the ICG's "no UMS connected" grace period).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Managers {
    /// With no manager connected for this long, devices are disconnected and refused.
    pub grace_secs: u64,
    /// After start, `check-status` says `init` until a manager connects or this elapses.
    pub startup_wait_secs: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            device_limit: 0,
            device_limit_scope: DeviceLimitScope::Instance,
            max_connections: 0,
            handshake_timeout_ms: 10_000,
            max_header_bytes: 8192,
            max_message_bytes: 1024 * 1024 + 64,
            queue_bytes: 2 * 1024 * 1024,
            queue_hard_bytes: 16 * 1024 * 1024,
            max_pending_requests: 256,
            request_timeout_ms: 60_000,
            max_streams_per_device: 8,
            stream_window_cap: 1024 * 1024,
            max_handshakes_per_source: 128,
            session_reserve_percent: 10,
        }
    }
}

impl Default for Keepalive {
    fn default() -> Self {
        Self {
            ping_interval_ms: 30_000,
        }
    }
}

impl Default for Managers {
    fn default() -> Self {
        Self {
            grace_secs: 300,
            startup_wait_secs: 10,
        }
    }
}
