//! The gateway's configuration: a TOML file whose every key has a default, so that
//! `devgate serve --data-dir DIR` runs on embedded defaults alone.
//!
//! Durations are given in milliseconds or seconds (the key says which) rather than as
//! strings: one less parser, and no ambiguity about units in an operator's file.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Effective configuration of one gateway instance.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Public TLS listener (devices, managers, `/usg/check-status`).
    pub listen: SocketAddr,
    /// Admin listener (`/v1/status`, `/metrics`); keep it on loopback.
    pub admin: SocketAddr,
    /// State directory (PKI, later the store).
    pub data_dir: PathBuf,
    /// Data-path worker threads; 0 means one per available core.
    pub workers: usize,
    /// Connection limits and protocol bounds.
    pub limits: Limits,
    /// Keep-alive and dead-peer detection.
    pub keepalive: Keepalive,
    /// Behaviour while no manager is connected.
    pub managers: Managers,
    /// The connection guard: XDP program, per-source limits (`[xdp]`).
    pub xdp: crate::guard::config::GuardConfig,
}

/// Limits that keep a gateway alive under load and abuse.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Maximum connected devices; 0 = unlimited. Changeable at run time by a manager.
    pub device_limit: u64,
    /// Maximum open connections of any kind (handshakes included); 0 = derived from RLIMIT_NOFILE.
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
}

/// Keep-alive settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Keepalive {
    /// A peer silent for this long is sent a ping; silent for twice this long, it is dead.
    pub ping_interval_ms: u64,
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

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 8443)),
            admin: SocketAddr::from(([127, 0, 0, 1], 9180)),
            data_dir: PathBuf::from("/var/lib/devgate"),
            workers: 0,
            limits: Limits::default(),
            keepalive: Keepalive::default(),
            managers: Managers::default(),
            xdp: Default::default(),
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            device_limit: 0,
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

/// A configuration problem, naming the key and what is wrong with it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("config file {path}: {source}")]
    Read {
        /// File that failed.
        path: PathBuf,
        /// Underlying error.
        source: std::io::Error,
    },
    /// The file is not valid TOML or has an unknown key or a wrong type.
    #[error("config file {path}: {message}")]
    Parse {
        /// File that failed.
        path: PathBuf,
        /// What the TOML parser reported (it names the key).
        message: String,
    },
    /// A value is out of its allowed range.
    #[error("config key {key}: {message}")]
    Invalid {
        /// Dotted key name.
        key: &'static str,
        /// What is wrong and what is allowed.
        message: String,
    },
}

impl Config {
    /// Reads and validates a TOML file; keys not given keep their defaults.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let cfg: Self = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string().trim_end().replace('\n', " "),
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks value ranges that the type system cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        fn invalid(key: &'static str, message: impl Into<String>) -> ConfigError {
            ConfigError::Invalid {
                key,
                message: message.into(),
            }
        }
        let l = &self.limits;
        if l.handshake_timeout_ms < 100 {
            return Err(invalid(
                "limits.handshake_timeout_ms",
                "must be at least 100 ms",
            ));
        }
        if !(1024..=1024 * 1024).contains(&l.max_header_bytes) {
            return Err(invalid(
                "limits.max_header_bytes",
                "must be between 1024 and 1048576",
            ));
        }
        if !(1024..=64 * 1024 * 1024).contains(&l.max_message_bytes) {
            return Err(invalid(
                "limits.max_message_bytes",
                "must be between 1024 and 67108864",
            ));
        }
        if l.queue_bytes < l.max_message_bytes {
            return Err(invalid(
                "limits.queue_bytes",
                "must be at least limits.max_message_bytes so that one largest frame fits",
            ));
        }
        if l.queue_hard_bytes < l.queue_bytes {
            return Err(invalid(
                "limits.queue_hard_bytes",
                "must be at least limits.queue_bytes",
            ));
        }
        if l.max_pending_requests == 0 {
            return Err(invalid("limits.max_pending_requests", "must be at least 1"));
        }
        if l.request_timeout_ms < 100 {
            return Err(invalid(
                "limits.request_timeout_ms",
                "must be at least 100 ms",
            ));
        }
        if l.stream_window_cap < 1024 {
            return Err(invalid("limits.stream_window_cap", "must be at least 1024"));
        }
        if self.keepalive.ping_interval_ms < 100 {
            return Err(invalid(
                "keepalive.ping_interval_ms",
                "must be at least 100 ms",
            ));
        }
        self.xdp.validate()?;
        if self.workers > 1024 {
            return Err(invalid(
                "workers",
                "must be at most 1024 (0 = one per core)",
            ));
        }
        Ok(())
    }

    /// Worker threads to start.
    pub fn worker_count(&self) -> usize {
        if self.workers > 0 {
            return self.workers;
        }
        std::thread::available_parallelism().map_or(1, |n| n.get())
    }

    /// The configuration as TOML, for `devgate config show`.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_roundtrip() {
        let cfg = Config::default();
        cfg.validate().expect("defaults valid");
        let back: Config = toml::from_str(&cfg.to_toml()).expect("roundtrip");
        assert_eq!(back.listen, cfg.listen);
        assert_eq!(back.limits.queue_bytes, cfg.limits.queue_bytes);
    }

    #[test]
    fn unknown_key_is_named() {
        let err = toml::from_str::<Config>("[limits]\ndevice_limt = 3\n").expect_err("typo");
        assert!(err.to_string().contains("device_limt"), "{err}");
    }

    #[test]
    fn out_of_range_value_names_key() {
        let mut cfg = Config::default();
        cfg.keepalive.ping_interval_ms = 1;
        let err = cfg.validate().expect_err("too small");
        assert!(
            err.to_string().contains("keepalive.ping_interval_ms"),
            "{err}"
        );
    }
}
