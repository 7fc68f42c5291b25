//! Accounting of unauthenticated connections: those accepted whose TLS handshake and HTTP
//! request head have not yet made them a device or manager session.
//!
//! An unauthenticated peer costs the gateway a slot and a descriptor while giving nothing
//! back, so they are limited apart from sessions, by default and without any guard
//! configured (the guards of this module's siblings limit *all* connections per source,
//! and only when `[xdp]` asks for them):
//!
//! - `limits.max_handshakes_per_source`: one source (IPv4 address, IPv6 /64) holds at most
//!   this many unauthenticated connections at once; more are refused at accept.
//! - `limits.session_reserve_percent`: that share of `max_connections` is kept for
//!   sessions; unauthenticated connections may fill only the rest. When a new connection
//!   finds the table (or the unauthenticated share) full, the worker evicts its oldest
//!   unauthenticated connection instead of refusing the newcomer, so a flood of silent
//!   connections cannot lock new devices out: each gets the handshake timeout at most,
//!   and honest handshakes (tens of milliseconds) outlive a flood's oldest entries.
//!
//! Workers on different cores touch the table at accept and when a connection leaves the
//! unauthenticated state; it is sharded so that they rarely meet on a lock.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

const SHARDS: usize = 16;

/// Per-source counts of unauthenticated connections, and their total.
#[derive(Debug)]
pub struct Unauthenticated {
    per_source_cap: u32,
    shards: Box<[Mutex<HashMap<u128, u32>>]>,
    total: AtomicUsize,
}

/// Why [`Unauthenticated::try_add`] refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourceFull;

impl Unauthenticated {
    /// A table allowing `per_source_cap` unauthenticated connections per source
    /// (0 = no per-source cap; the total is still counted).
    pub fn new(per_source_cap: u32) -> Self {
        Self {
            per_source_cap,
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            total: AtomicUsize::new(0),
        }
    }

    /// The key a source is counted under: an IPv4 address (also when mapped into IPv6),
    /// or an IPv6 /64, which one host or site usually owns whole.
    fn key(ip: IpAddr) -> u128 {
        match ip {
            IpAddr::V4(v4) => u128::from(u32::from(v4)),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => u128::from(u32::from(v4)),
                None => u128::from(v6) & !((1u128 << 64) - 1),
            },
        }
    }

    fn shard(&self, key: u128) -> &Mutex<HashMap<u128, u32>> {
        // Fibonacci hashing over both halves: IPv4 varies in the low bits, a /64 in the high.
        let folded = (key as u64) ^ ((key >> 64) as u64);
        let h = folded.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 60;
        &self.shards[usize::try_from(h).unwrap_or(0) % SHARDS]
    }

    /// A connection from `ip` was accepted: counts it, or refuses if its source holds the
    /// per-source cap already.
    pub fn try_add(&self, ip: IpAddr) -> Result<(), SourceFull> {
        let key = Self::key(ip);
        let mut shard = self
            .shard(key)
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = shard.entry(key).or_insert(0);
        if self.per_source_cap > 0 && *n >= self.per_source_cap {
            if *n == 0 {
                shard.remove(&key);
            }
            return Err(SourceFull);
        }
        *n += 1;
        self.total.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    /// A connection from `ip` counted by [`Self::try_add`] became a session or closed.
    pub fn remove(&self, ip: IpAddr) {
        let key = Self::key(ip);
        let mut shard = self
            .shard(key)
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = shard.get_mut(&key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                shard.remove(&key);
            }
            self.total.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Unauthenticated connections open now, all sources together.
    pub fn total(&self) -> usize {
        self.total.load(Ordering::Acquire)
    }

    /// Unauthenticated connections from `ip`'s source.
    pub fn from_source(&self, ip: IpAddr) -> u32 {
        let key = Self::key(ip);
        self.shard(key)
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&key)
            .copied()
            .unwrap_or(0)
    }
}

/// How many of `max_connections` unauthenticated connections may fill, keeping
/// `reserve_percent` of the table for sessions (at least one slot each way).
pub fn unauthenticated_cap(max_connections: usize, reserve_percent: u8) -> usize {
    let reserve = max_connections.saturating_mul(usize::from(reserve_percent)) / 100;
    max_connections.saturating_sub(reserve).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn v6(s: [u16; 8]) -> IpAddr {
        IpAddr::V6(Ipv6Addr::new(
            s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7],
        ))
    }

    #[test]
    fn per_source_cap_and_release() {
        let t = Unauthenticated::new(2);
        let a = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1));
        let b = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
        assert!(t.try_add(a).is_ok());
        assert!(t.try_add(a).is_ok());
        assert_eq!(t.try_add(a), Err(SourceFull));
        assert!(t.try_add(b).is_ok());
        assert_eq!(t.total(), 3);
        t.remove(a);
        assert!(t.try_add(a).is_ok());
        t.remove(a);
        t.remove(a);
        t.remove(b);
        assert_eq!(t.total(), 0);
        // A stray remove of a source never counted does not underflow the total.
        t.remove(b);
        assert_eq!(t.total(), 0);
    }

    #[test]
    fn ipv6_counts_per_64_and_mapped_ipv4_as_ipv4() {
        let t = Unauthenticated::new(1);
        assert!(t.try_add(v6([0x2001, 0xdb8, 0, 0, 0, 0, 0, 1])).is_ok());
        assert_eq!(
            t.try_add(v6([0x2001, 0xdb8, 0, 0, 0, 0, 0, 2])),
            Err(SourceFull)
        );
        assert!(t.try_add(v6([0x2001, 0xdb8, 0, 1, 0, 0, 0, 1])).is_ok());
        assert!(t.try_add(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1))).is_ok());
        assert_eq!(
            t.try_add(IpAddr::V6(Ipv4Addr::new(10, 0, 0, 1).to_ipv6_mapped())),
            Err(SourceFull)
        );
    }

    #[test]
    fn reserve_keeps_a_share_for_sessions() {
        assert_eq!(unauthenticated_cap(100, 10), 90);
        assert_eq!(unauthenticated_cap(32, 10), 29);
        assert_eq!(unauthenticated_cap(5, 10), 5);
        assert_eq!(unauthenticated_cap(1, 100), 1);
    }
}
