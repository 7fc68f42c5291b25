//! Types shared by devgate's XDP program (`gateway-ebpf`, kernel side) and the gateway's
//! loader (`gateway::guard::xdp`, user space). Everything here is `#[repr(C)]` plain data
//! with no padding holes, because both sides read the same bytes out of BPF maps.
//!
//! The maps, by name (the loader finds them by these names, so they are part of the
//! object's interface):
//!
//! | map | kind | key → value | written by |
//! |---|---|---|---|
//! | [`MAP_CONFIG`] | array[1] | 0 → [`XdpConfig`] | user space (limits, admit flag) |
//! | [`MAP_PORTS`] | hash | port (host order, `u16`) → 1 | user space: the gateway's ports |
//! | [`MAP_ALLOW`] | LPM trie | [`AllowKey`] → 1 | user space: the allow-list |
//! | [`MAP_SOURCES`] | LPM trie | [`SourceKey`] → `SOURCE_*` flags | user space: manager and exempt networks |
//! | [`MAP_CONNS`] | hash | [`SourceKey`] → established connections (`u32`) | user space |
//! | [`MAP_RATE`] | LRU hash | [`SourceKey`] → GCRA theoretical arrival time (ns) | XDP |
//! | [`MAP_STATS`] | per-CPU array | [`Counter`] index → packets (`u64`) | XDP |
//!
//! Source addresses are 16 bytes: IPv6 as is (masked with `XdpConfig::v6_mask` where
//! sources are counted),
//! IPv4 as an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`), so one map serves both families.

#![cfg_attr(not(test), no_std)]

/// Name of the XDP program in the object.
pub const PROGRAM: &str = "devgate_xdp";
/// [`XdpConfig`] at index 0.
pub const MAP_CONFIG: &str = "CONFIG";
/// The gateway's own TCP ports.
pub const MAP_PORTS: &str = "PORTS";
/// The allow-list (other ports, optionally from a source range).
pub const MAP_ALLOW: &str = "ALLOW";
/// Source networks with special treatment: `SOURCE_*` flags. A longest-prefix match
/// returns one entry, so user space stores in each the flags of every configured
/// network that contains it.
pub const MAP_SOURCES: &str = "SOURCES";
/// A manager network: its SYNs pass while the device limit is reached.
pub const SOURCE_MANAGER: u8 = 1;
/// Exempt from the per-source limits (a site's NAT with many devices behind it).
pub const SOURCE_EXEMPT: u8 = 2;
/// Established connections per source.
pub const MAP_CONNS: &str = "CONNS";
/// New-connection rate state per source.
pub const MAP_RATE: &str = "RATE";
/// Per-CPU decision counters.
pub const MAP_STATS: &str = "STATS";

/// Capacity of [`MAP_PORTS`].
pub const MAX_PORTS: u32 = 64;
/// Capacity of [`MAP_ALLOW`] and [`MAP_SOURCES`].
pub const MAX_RULES: u32 = 1024;
/// Capacity of [`MAP_CONNS`] and [`MAP_RATE`]; a BTF map's size is fixed in the object.
pub const MAX_SOURCES: u32 = 65_536;

/// Limits and the admit flag, written whole by user space.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct XdpConfig {
    /// 1 while new connections are admitted; 0 while the device limit is reached (SYNs to
    /// the gateway's ports are dropped unless the source is a [`SOURCE_MANAGER`]).
    pub accepting: u32,
    /// A SYN is dropped when its source already has this many established connections
    /// (0 = no limit).
    pub max_conns_per_ip: u32,
    /// New connections per source: one token every `interval_ns` (0 = no rate limit).
    pub interval_ns: u64,
    /// Burst tolerance: how far ahead of now a source's theoretical arrival time may run,
    /// `(burst - 1) * interval_ns` (GCRA, the single-timestamp form of a token bucket).
    pub tau_ns: u64,
    /// IPv6 sources are counted per prefix: the source is ANDed with this mask
    /// (precomputed from `xdp.ipv6_prefix_len`; a /64 by default, because one host
    /// usually holds a whole /64).
    pub v6_mask: [u8; 16],
    /// The host's ephemeral port range (`net.ipv4.ip_local_port_range`): TCP with ACK
    /// and UDP to these ports are replies to the host's own outbound traffic and pass.
    pub reply_port_lo: u16,
    /// Upper end (inclusive) of the ephemeral port range; 0 disables the reply rule.
    pub reply_port_hi: u16,
    /// Always 0 (makes the size a multiple of 8 without hidden padding).
    pub pad: u32,
}

/// A 16-byte source key (IPv4-mapped for IPv4).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SourceKey {
    /// Address bytes in network order.
    pub addr: [u8; 16],
}

/// Key of the allow-list trie. The trie matches a prefix of these bits in order, so a
/// rule's prefix length says how much of it must match: 8 = protocol only, 32 = protocol
/// and port from anywhere, `32 + 96 + n` = protocol, port and an IPv4 /n, `32 + n` =
/// protocol, port and an IPv6 /n.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AllowKey {
    /// IP protocol number (6 = TCP, 17 = UDP).
    pub proto: u8,
    /// Always 0 (keeps `port` aligned and the layout free of padding).
    pub pad: u8,
    /// Destination port in network order.
    pub port: [u8; 2],
    /// Source address (IPv4-mapped for IPv4), network order.
    pub addr: [u8; 16],
}

/// Bits of an [`AllowKey`] before the address.
pub const ALLOW_KEY_HEAD_BITS: u32 = 32;

/// Every decision the program takes is counted in [`MAP_STATS`] at one of these indexes.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// A SYN to a gateway port that passed every check.
    PassSyn = 0,
    /// Other TCP to a gateway port (established connections, handshakes' ACKs).
    PassGateway = 1,
    /// Matched the allow-list.
    PassAllowed = 2,
    /// A reply to the host's own outbound traffic (ephemeral destination port).
    PassReply = 3,
    /// Not TCP/UDP over IP (ARP, ICMP, ND, other protocols), or a non-first UDP fragment.
    PassOther = 4,
    /// TCP/UDP to a port that is neither the gateway's nor allowed.
    DropPort = 5,
    /// A SYN while the device limit is reached.
    DropDeviceLimit = 6,
    /// A SYN from a source at its concurrent-connection limit.
    DropPerIp = 7,
    /// A SYN above its source's new-connection rate.
    DropRate = 8,
    /// Truncated or inconsistent headers.
    DropMalformed = 9,
    /// A fragmented TCP packet (TCP sets DF; a fragment cannot be checked by port).
    DropFragment = 10,
}

/// Number of counters in [`MAP_STATS`].
pub const COUNTERS: u32 = 11;

impl Counter {
    /// All counters, in index order.
    pub const ALL: [Self; COUNTERS as usize] = [
        Self::PassSyn,
        Self::PassGateway,
        Self::PassAllowed,
        Self::PassReply,
        Self::PassOther,
        Self::DropPort,
        Self::DropDeviceLimit,
        Self::DropPerIp,
        Self::DropRate,
        Self::DropMalformed,
        Self::DropFragment,
    ];

    /// Whether this counts dropped packets.
    pub const fn is_drop(self) -> bool {
        self as u32 >= Self::DropPort as u32
    }

    /// The reason's name in status and metrics.
    pub const fn name(self) -> &'static str {
        match self {
            Self::PassSyn => "syn",
            Self::PassGateway => "gateway",
            Self::PassAllowed => "allowed",
            Self::PassReply => "reply",
            Self::PassOther => "other",
            Self::DropPort => "port",
            Self::DropDeviceLimit => "device_limit",
            Self::DropPerIp => "per_ip",
            Self::DropRate => "rate",
            Self::DropMalformed => "malformed",
            Self::DropFragment => "fragment",
        }
    }
}

/// IPv4-mapped form of an IPv4 address (`::ffff:a.b.c.d`).
pub const fn mapped_v4(octets: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, octets[0], octets[1], octets[2], octets[3],
    ]
}

#[cfg(feature = "user")]
mod user {
    // SAFETY (all four): plain `#[repr(C)]` data of integers and byte arrays without
    // padding; every bit pattern is a valid value.
    unsafe impl aya::Pod for super::XdpConfig {}
    unsafe impl aya::Pod for super::SourceKey {}
    unsafe impl aya::Pod for super::AllowKey {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_have_no_padding() {
        assert_eq!(
            core::mem::size_of::<XdpConfig>(),
            4 + 4 + 8 + 8 + 16 + 2 + 2 + 4
        );
        assert_eq!(core::mem::size_of::<SourceKey>(), 16);
        assert_eq!(core::mem::size_of::<AllowKey>(), 20);
    }

    #[test]
    fn counters_are_indexed_in_order() {
        for (i, c) in Counter::ALL.iter().enumerate() {
            assert_eq!(*c as usize, i);
        }
        assert!(Counter::DropPort.is_drop() && !Counter::PassOther.is_drop());
    }
}
