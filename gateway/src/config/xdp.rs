//! The `[xdp]` section of the configuration: where the guard runs and which limits it
//! enforces. The same limits apply whether the XDP program enforces them or, where it
//! cannot be loaded, the user-space guard does.

use std::net::IpAddr;
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::config::ConfigError;

/// How the XDP program is attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Native (driver) mode where the driver supports it, generic mode otherwise.
    #[default]
    Auto,
    /// Driver mode only: runs before the kernel allocates a socket buffer.
    Native,
    /// Generic (SKB) mode: works on every interface, after the socket buffer exists.
    Generic,
    /// Do not load XDP; enforce the limits in user space only (containers, tests).
    Userspace,
}

impl FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "native" => Ok(Self::Native),
            "generic" => Ok(Self::Generic),
            "userspace" => Ok(Self::Userspace),
            other => Err(format!(
                "unknown XDP mode \"{other}\" (use auto, native, generic or userspace)"
            )),
        }
    }
}

/// The guard's configuration (`[xdp]`).
///
/// The guard is on when `interface` is set (or `mode = "userspace"`); with neither, the
/// gateway admits every TCP connection (the session layer still enforces the device
/// limit, with an HTTP 503 and a log line per rejected device).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GuardConfig {
    /// Public interface to attach the XDP program to (`--xdp IFACE`); empty = no guard.
    pub interface: String,
    /// `auto`, `native`, `generic` or `userspace` (`--xdp-mode`).
    pub mode: Mode,
    /// The XDP object; empty = look next to the binary, in the workspace's
    /// `target/xdp/devgate-xdp.o`, then in `/usr/lib/devgate/devgate-xdp.o`.
    pub object: String,
    /// Concurrent connections per source IP (IPv6: per `ipv6_prefix_len` prefix);
    /// 0 = unlimited. Devices behind one NAT share a source: size this for the largest site.
    pub max_conns_per_ip: u32,
    /// New connections per second per source; 0 = unlimited.
    pub new_conns_per_sec: u32,
    /// New connections a source may open at once before the rate applies; 0 = one
    /// second's worth (`new_conns_per_sec`).
    pub new_conns_burst: u32,
    /// While the device limit is reached, refuse new connections before TLS (XDP drops
    /// the SYN). Managers are refused too unless their source is in `manager_sources`.
    pub shed_at_device_limit: bool,
    /// Source networks (CIDR, e.g. "10.0.0.0/8") that may connect while the device limit
    /// is reached: the managers' addresses.
    pub manager_sources: Vec<String>,
    /// Source networks exempt from `max_conns_per_ip` and `new_conns_per_sec`: e.g. a
    /// site whose devices all come through one NAT address.
    pub exempt_sources: Vec<String>,
    /// Other traffic let through, e.g. "tcp/22 from 10.0.0.0/8", "udp/123".
    /// Everything else to a port that is not the gateway's is dropped, except replies to
    /// the host's own outbound traffic (ephemeral destination ports).
    pub allow: Vec<String>,
    /// IPv6 sources are counted per prefix of this length (one host often has a /64).
    pub ipv6_prefix_len: u8,
    /// Sources tracked at once (per-source counts and rate state, in user space and in
    /// the BPF maps). The program's rate map is preallocated: about 100 bytes of kernel
    /// memory per entry (~25 MiB at the default).
    pub max_sources: u32,
}

impl Default for GuardConfig {
    fn default() -> Self {
        Self {
            interface: String::new(),
            mode: Mode::Auto,
            object: String::new(),
            max_conns_per_ip: 0,
            new_conns_per_sec: 0,
            new_conns_burst: 0,
            shed_at_device_limit: true,
            manager_sources: Vec::new(),
            exempt_sources: Vec::new(),
            // DHCP client replies (v4 and v6) go to fixed ports, not ephemeral ones;
            // dropping them would lose the host's address lease.
            allow: vec!["udp/68".into(), "udp/546".into()],
            ipv6_prefix_len: 64,
            max_sources: 262_144,
        }
    }
}

/// An IP network: an address (IPv4 as IPv4-mapped IPv6) and a prefix length in bits of
/// the 128-bit form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    /// Network address bytes (host bits cleared).
    pub addr: [u8; 16],
    /// Prefix length over the 16 bytes (IPv4 /n is 96 + n).
    pub prefix: u32,
}

impl Cidr {
    /// Parses "10.0.0.0/8", "2001:db8::/32" or a single address.
    pub fn parse(s: &str) -> Result<Self, String> {
        let (addr, len) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let ip: IpAddr = addr
            .trim()
            .parse()
            .map_err(|_| format!("\"{s}\" is not an IP address or network"))?;
        let max = if ip.is_ipv4() { 32 } else { 128 };
        let len = match len {
            Some(l) => l
                .trim()
                .parse::<u32>()
                .ok()
                .filter(|l| *l <= max)
                .ok_or_else(|| format!("\"{s}\": prefix length must be 0..={max}"))?,
            None => max,
        };
        let prefix = if ip.is_ipv4() { 96 + len } else { len };
        Ok(Self {
            addr: mask(source_bytes(ip), prefix),
            prefix,
        })
    }

    /// Whether `ip` lies in this network.
    pub fn contains(&self, ip: IpAddr) -> bool {
        mask(source_bytes(ip), self.prefix) == self.addr
    }

    /// Whether `other` lies wholly in this network.
    pub fn covers(&self, other: &Self) -> bool {
        self.prefix <= other.prefix && mask(other.addr, self.prefix) == self.addr
    }
}

/// One allow-list rule: protocol, port, and the sources it applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AllowRule {
    /// 6 (TCP) or 17 (UDP).
    pub proto: u8,
    /// Destination port.
    pub port: u16,
    /// Sources; `None` = any source of either family.
    pub from: Option<Cidr>,
}

impl AllowRule {
    /// Parses "tcp/22", "udp/123", "tcp/22 from 10.0.0.0/8".
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let (what, from) = match s.split_once(" from ") {
            Some((w, f)) => (w.trim(), Some(Cidr::parse(f.trim())?)),
            None => (s, None),
        };
        let (proto, port) = what.split_once('/').ok_or_else(|| {
            format!("\"{s}\": expected PROTO/PORT [from CIDR], e.g. \"tcp/22 from 10.0.0.0/8\"")
        })?;
        let proto = match proto {
            "tcp" => 6,
            "udp" => 17,
            other => return Err(format!("\"{s}\": protocol \"{other}\" is not tcp or udp")),
        };
        let port = port
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("\"{s}\": port must be 1..=65535"))?;
        Ok(Self { proto, port, from })
    }
}

/// The 16-byte form of an address (IPv4-mapped for IPv4). An IPv4-mapped IPv6 address
/// (an IPv4 peer on a dual-stack listener) already is in that form.
pub fn source_bytes(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => gateway_common::mapped_v4(v4.octets()),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// `addr` with all bits after the first `prefix` cleared.
pub fn mask(mut addr: [u8; 16], prefix: u32) -> [u8; 16] {
    for (i, b) in addr.iter_mut().enumerate() {
        let start = i as u32 * 8;
        let keep = prefix.saturating_sub(start).min(8);
        *b &= if keep == 0 { 0 } else { 0xffu8 << (8 - keep) };
    }
    addr
}

impl GuardConfig {
    /// Whether a guard (XDP or its user-space fallback) runs at all.
    pub fn enabled(&self) -> bool {
        !self.interface.is_empty() || self.mode == Mode::Userspace
    }

    /// The burst actually used.
    pub fn burst(&self) -> u32 {
        match self.new_conns_burst {
            0 => self.new_conns_per_sec.max(1),
            b => b,
        }
    }

    /// Parsed `manager_sources`.
    pub fn managers(&self) -> Result<Vec<Cidr>, String> {
        self.manager_sources
            .iter()
            .map(|s| Cidr::parse(s))
            .collect()
    }

    /// Parsed `exempt_sources`.
    pub fn exempt(&self) -> Result<Vec<Cidr>, String> {
        self.exempt_sources.iter().map(|s| Cidr::parse(s)).collect()
    }

    /// Parsed `allow`.
    pub fn allow_rules(&self) -> Result<Vec<AllowRule>, String> {
        self.allow.iter().map(|s| AllowRule::parse(s)).collect()
    }

    /// The configured object path, or the places searched by default.
    pub fn object_candidates(&self) -> Vec<PathBuf> {
        if !self.object.is_empty() {
            return vec![PathBuf::from(&self.object)];
        }
        let mut out = Vec::new();
        if let Some(dir) = std::env::current_exe()
            .ok()
            .and_then(|e| e.parent().map(std::path::Path::to_path_buf))
        {
            out.push(dir.join("devgate-xdp.o"));
            // A binary in target/{debug,release} of the workspace: `cargo xtask build-ebpf`.
            out.push(dir.join("../xdp/devgate-xdp.o"));
        }
        out.push(PathBuf::from("/usr/lib/devgate/devgate-xdp.o"));
        out
    }

    /// Checks the section; errors name the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        fn invalid(key: &'static str, message: impl Into<String>) -> ConfigError {
            ConfigError::Invalid {
                key,
                message: message.into(),
            }
        }
        let iface = &self.interface;
        if iface.len() >= 16 || iface.contains(['/', '\0', ' ']) {
            return Err(invalid(
                "xdp.interface",
                format!(
                    "\"{iface}\" is not an interface name (at most 15 characters, no '/' or spaces)"
                ),
            ));
        }
        if self.mode != Mode::Userspace && self.mode != Mode::Auto && iface.is_empty() {
            return Err(invalid(
                "xdp.mode",
                "native and generic need xdp.interface (or --xdp IFACE)",
            ));
        }
        if !(32..=128).contains(&self.ipv6_prefix_len) {
            return Err(invalid("xdp.ipv6_prefix_len", "must be between 32 and 128"));
        }
        if !(1024..=16 * 1024 * 1024).contains(&self.max_sources) {
            return Err(invalid(
                "xdp.max_sources",
                "must be between 1024 and 16777216",
            ));
        }
        if self.new_conns_per_sec > 1_000_000 {
            return Err(invalid(
                "xdp.new_conns_per_sec",
                "must be at most 1000000 (0 = unlimited)",
            ));
        }
        if self.new_conns_burst > 1_000_000 {
            return Err(invalid("xdp.new_conns_burst", "must be at most 1000000"));
        }
        if let Err(e) = self.managers() {
            return Err(invalid("xdp.manager_sources", e));
        }
        if let Err(e) = self.exempt() {
            return Err(invalid("xdp.exempt_sources", e));
        }
        match self.allow_rules() {
            Err(e) => return Err(invalid("xdp.allow", e)),
            Ok(rules) if rules.len() > gateway_common::MAX_RULES as usize => {
                return Err(invalid("xdp.allow", "too many rules (at most 1024)"));
            }
            Ok(_) => {}
        }
        if self.manager_sources.len() + self.exempt_sources.len()
            > gateway_common::MAX_RULES as usize
        {
            return Err(invalid(
                "xdp.manager_sources",
                "too many networks (at most 1024 with xdp.exempt_sources)",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs_parse_and_match_both_families() {
        let net = Cidr::parse("10.1.0.0/16").expect("v4");
        assert_eq!(net.prefix, 112);
        assert!(net.contains("10.1.200.3".parse().expect("ip")));
        assert!(!net.contains("10.2.0.1".parse().expect("ip")));
        assert!(!net.contains("::a01:1".parse().expect("ip")));
        let net6 = Cidr::parse("2001:db8::/32").expect("v6");
        assert!(net6.contains("2001:db8:1::1".parse().expect("ip")));
        assert!(!net6.contains("2001:db9::1".parse().expect("ip")));
        assert_eq!(Cidr::parse("192.0.2.7").expect("host").prefix, 128);
        assert!(Cidr::parse("10.0.0.0/33").is_err());
        assert!(Cidr::parse("nonsense/8").is_err());
    }

    #[test]
    fn allow_rules_parse_with_clear_errors() {
        let r = AllowRule::parse("tcp/22 from 10.0.0.0/8").expect("rule");
        assert_eq!((r.proto, r.port), (6, 22));
        assert_eq!(r.from.map(|c| c.prefix), Some(104));
        assert_eq!(AllowRule::parse("udp/123").expect("rule").from, None);
        let err = AllowRule::parse("icmp/1").expect_err("proto");
        assert!(err.contains("icmp"), "{err}");
        assert!(AllowRule::parse("tcp/0").is_err());
        assert!(AllowRule::parse("tcp22").is_err());
    }

    #[test]
    fn validation_names_the_key() {
        let mut cfg = GuardConfig {
            allow: vec!["tcp/22 from 10.0.0.0/99".into()],
            ..GuardConfig::default()
        };
        let err = cfg.validate().expect_err("bad allow").to_string();
        assert!(err.contains("xdp.allow"), "{err}");
        cfg.allow.clear();
        cfg.mode = Mode::Native;
        let err = cfg
            .validate()
            .expect_err("native without iface")
            .to_string();
        assert!(err.contains("xdp.mode"), "{err}");
        cfg.interface = "eth0".into();
        cfg.validate().expect("valid");
        assert!(GuardConfig::default().validate().is_ok());
    }

    #[test]
    fn masks_clear_host_bits() {
        let a = source_bytes("2001:db8:1:2:3:4:5:6".parse().expect("ip"));
        let m = mask(a, 64);
        assert_eq!(&m[..8], &a[..8]);
        assert_eq!(&m[8..], &[0; 8]);
        assert_eq!(mask(a, 0), [0; 16]);
        assert_eq!(mask(a, 128), a);
    }
}
