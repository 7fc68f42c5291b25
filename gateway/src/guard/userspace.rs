//! The user-space guard: the same limits as the XDP program, enforced when the kernel
//! has already accepted the connection (where XDP cannot be loaded), and the exact
//! per-source counts that the XDP guard mirrors into its maps.
//!
//! [`Limiter`] holds the truth: established connections per source and a GCRA rate state
//! per source, in sharded tables so that workers on different cores rarely meet on a
//! lock. [`UserspaceGuard`] is a [`Guard`] made of a limiter alone.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::IpAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use serde_json::json;

use super::Guard;
use super::config::{Cidr, GuardConfig, mask, source_bytes};

/// Why a connection was refused in user space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The device limit is reached and the source is not a manager network.
    DeviceLimit = 0,
    /// The source holds `max_conns_per_ip` connections.
    PerIp = 1,
    /// The source exceeds `new_conns_per_sec`.
    Rate = 2,
}

impl Refusal {
    const ALL: [Self; 3] = [Self::DeviceLimit, Self::PerIp, Self::Rate];

    /// Name in status and metrics (the same as the XDP drop reasons).
    pub fn name(self) -> &'static str {
        match self {
            Self::DeviceLimit => "device_limit",
            Self::PerIp => "per_ip",
            Self::Rate => "rate",
        }
    }
}

/// Per-source state.
#[derive(Debug, Default, Clone, Copy)]
struct Source {
    /// Established (admitted, not yet closed) connections.
    conns: u32,
    /// GCRA theoretical arrival time, nanoseconds after the limiter's epoch.
    tat: u64,
}

const SHARDS: usize = 16;

/// One shard of the per-source table.
type Shard = Mutex<HashMap<[u8; 16], Source>>;

/// Called with a source key and its new connection count while the source's shard is
/// locked, so that mirrored copies see the updates in the order they happened.
pub type Mirror<'a> = &'a dyn Fn(&[u8; 16], u32);

/// Per-source connection counts and rates, and the admit flag.
#[derive(Debug)]
pub struct Limiter {
    max_conns_per_ip: u32,
    /// GCRA emission interval in ns (0 = no rate limit) and burst tolerance.
    interval_ns: u64,
    tau_ns: u64,
    v6_prefix: u32,
    shed_at_device_limit: bool,
    managers: Vec<Cidr>,
    exempt: Vec<Cidr>,
    max_per_shard: usize,
    shards: Box<[Shard]>,
    accepting: AtomicBool,
    epoch: Instant,
    refused: [AtomicU64; 3],
    /// Admissions whose source could not be tracked because the table was full.
    untracked: AtomicU64,
}

impl Limiter {
    /// A limiter for `cfg` (already validated).
    pub fn new(cfg: &GuardConfig) -> Self {
        let (interval_ns, tau_ns) = gcra(cfg);
        Self {
            max_conns_per_ip: cfg.max_conns_per_ip,
            interval_ns,
            tau_ns,
            v6_prefix: u32::from(cfg.ipv6_prefix_len),
            shed_at_device_limit: cfg.shed_at_device_limit,
            managers: cfg.managers().unwrap_or_default(),
            exempt: cfg.exempt().unwrap_or_default(),
            max_per_shard: (cfg.max_sources as usize).div_ceil(SHARDS),
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            accepting: AtomicBool::new(true),
            epoch: Instant::now(),
            refused: Default::default(),
            untracked: AtomicU64::new(0),
        }
    }

    /// The key a source is counted under: IPv4 as is (mapped), IPv6 masked to its prefix.
    pub fn key(&self, ip: IpAddr) -> [u8; 16] {
        let bytes = source_bytes(ip);
        let v4_mapped = bytes[..10] == [0; 10] && bytes[10..12] == [0xff, 0xff];
        if v4_mapped {
            bytes
        } else {
            mask(bytes, self.v6_prefix)
        }
    }

    fn shard(&self, key: &[u8; 16]) -> &Shard {
        // Fibonacci hashing of both halves: spreads IPv4 (low bytes vary) and masked IPv6
        // (high bytes vary) sources alike.
        let mut halves = [0u8; 8];
        halves.copy_from_slice(&key[..8]);
        let hi = u64::from_ne_bytes(halves);
        halves.copy_from_slice(&key[8..]);
        let lo = u64::from_ne_bytes(halves);
        let h = (hi ^ lo.rotate_left(29)).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 60;
        &self.shards[h as usize % SHARDS]
    }

    /// Whether `ip` is in a manager network.
    pub fn is_manager(&self, ip: IpAddr) -> bool {
        self.managers.iter().any(|c| c.contains(ip))
    }

    /// Admits a connection from `ip` or says why not. With `check_rate` false the rate
    /// is not checked (the XDP program already charged the SYN).
    pub fn admit(
        &self,
        ip: IpAddr,
        now: Instant,
        check_rate: bool,
        mirror: Mirror<'_>,
    ) -> Result<(), Refusal> {
        let result = self.admit_inner(ip, now, check_rate, mirror);
        if let Err(r) = result {
            self.refused[r as usize].fetch_add(1, Ordering::Relaxed);
        }
        result
    }

    fn admit_inner(
        &self,
        ip: IpAddr,
        now: Instant,
        check_rate: bool,
        mirror: Mirror<'_>,
    ) -> Result<(), Refusal> {
        if !self.accepting.load(Ordering::Acquire) && !self.is_manager(ip) {
            return Err(Refusal::DeviceLimit);
        }
        let rate = check_rate && self.interval_ns != 0;
        let key = self.key(ip);
        let now_ns =
            u64::try_from(now.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX);
        let mut table = self
            .shard(&key)
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !table.contains_key(&key) && table.len() >= self.max_per_shard {
            // Make room: sources with no connection whose rate state has run out.
            table.retain(|_, s| s.conns > 0 || s.tat > now_ns);
            if table.len() >= self.max_per_shard {
                // Fail open: refusing devices because of table pressure would be worse
                // than letting one source's connections go uncounted.
                self.untracked.fetch_add(1, Ordering::Relaxed);
                return Ok(());
            }
        }
        let exempt = !self.exempt.is_empty() && self.exempt.iter().any(|c| c.contains(ip));
        let source = table.entry(key).or_default();
        if !exempt && self.max_conns_per_ip != 0 && source.conns >= self.max_conns_per_ip {
            return Err(Refusal::PerIp);
        }
        if rate && !exempt {
            let tat = source.tat.max(now_ns);
            if tat - now_ns > self.tau_ns {
                return Err(Refusal::Rate);
            }
            source.tat = tat + self.interval_ns;
        }
        source.conns += 1;
        mirror(&key, source.conns);
        Ok(())
    }

    /// A connection admitted from `ip` has closed.
    pub fn closed(&self, ip: IpAddr, mirror: Mirror<'_>) {
        let key = self.key(ip);
        let now_ns = u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
        let mut table = self
            .shard(&key)
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(source) = table.get_mut(&key) else {
            // Admitted while the table was full (untracked).
            return;
        };
        source.conns = source.conns.saturating_sub(1);
        let conns = source.conns;
        if conns == 0 && source.tat <= now_ns {
            table.remove(&key);
        }
        mirror(&key, conns);
    }

    /// Sets the admit flag; returns the value actually in force (always true when
    /// shedding at the device limit is off).
    pub fn set_accepting(&self, accepting: bool) -> bool {
        let effective = accepting || !self.shed_at_device_limit;
        self.accepting.store(effective, Ordering::Release);
        effective
    }

    /// Whether new connections are admitted.
    pub fn accepting(&self) -> bool {
        self.accepting.load(Ordering::Acquire)
    }

    /// Connections refused, by reason.
    pub fn refused(&self) -> [(Refusal, u64); 3] {
        Refusal::ALL.map(|r| (r, self.refused[r as usize].load(Ordering::Relaxed)))
    }

    /// Sources currently tracked, and the connections they hold.
    pub fn tracked(&self) -> (usize, u64) {
        self.shards.iter().fold((0, 0), |(n, c), s| {
            let t = s.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            (
                n + t.len(),
                c + t.values().map(|s| u64::from(s.conns)).sum::<u64>(),
            )
        })
    }

    /// Connections from one source (as counted under its key).
    pub fn conns_of(&self, ip: IpAddr) -> u32 {
        let key = self.key(ip);
        self.shard(&key)
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&key)
            .map_or(0, |s| s.conns)
    }

    /// The `"refused_in_user_space"` object and the figures shared by every status.
    pub fn status_fields(&self, cfg: &GuardConfig) -> serde_json::Value {
        let (sources, conns) = self.tracked();
        let refused: serde_json::Map<String, serde_json::Value> = self
            .refused()
            .iter()
            .map(|(r, n)| (r.name().to_owned(), json!(n)))
            .collect();
        json!({
            "accepting": self.accepting(),
            "limits": {
                "max_conns_per_ip": cfg.max_conns_per_ip,
                "new_conns_per_sec": cfg.new_conns_per_sec,
                "new_conns_burst": if cfg.new_conns_per_sec == 0 { 0 } else { cfg.burst() },
                "shed_at_device_limit": cfg.shed_at_device_limit,
                "manager_sources": cfg.manager_sources,
                "exempt_sources": cfg.exempt_sources,
                "ipv6_prefix_len": cfg.ipv6_prefix_len,
            },
            "tracked_sources": sources,
            "tracked_connections": conns,
            "untracked_admissions": self.untracked.load(Ordering::Relaxed),
            "refused_in_user_space": refused,
        })
    }

    /// Prometheus lines for the user-space side.
    pub fn metrics(&self, out: &mut String) {
        let _ = writeln!(
            out,
            "# HELP devgate_guard_refused_total Connections the guard refused in user space, by reason.\n# TYPE devgate_guard_refused_total counter"
        );
        for (r, n) in self.refused() {
            let _ = writeln!(
                out,
                "devgate_guard_refused_total{{reason=\"{}\"}} {n}",
                r.name()
            );
        }
        let (sources, _) = self.tracked();
        let _ = writeln!(
            out,
            "# HELP devgate_guard_accepting 1 while new connections are admitted (0 at the device limit).\n# TYPE devgate_guard_accepting gauge\ndevgate_guard_accepting {}",
            u8::from(self.accepting())
        );
        let _ = writeln!(
            out,
            "# HELP devgate_guard_tracked_sources Sources with connections or rate state.\n# TYPE devgate_guard_tracked_sources gauge\ndevgate_guard_tracked_sources {sources}"
        );
    }
}

/// GCRA parameters for the configured rate: (emission interval, burst tolerance) in ns.
pub fn gcra(cfg: &GuardConfig) -> (u64, u64) {
    if cfg.new_conns_per_sec == 0 {
        return (0, 0);
    }
    let interval = 1_000_000_000 / u64::from(cfg.new_conns_per_sec);
    (interval, u64::from(cfg.burst() - 1) * interval)
}

/// Enforces the limits in user space only: XDP is off (not configured, or not loadable
/// here — `reason` says which).
#[derive(Debug)]
pub struct UserspaceGuard {
    cfg: GuardConfig,
    limiter: Limiter,
    reason: String,
}

impl UserspaceGuard {
    /// A guard for `cfg`; `reason` is why XDP is off (shown in status).
    pub fn new(cfg: &GuardConfig, reason: String) -> Self {
        Self {
            cfg: cfg.clone(),
            limiter: Limiter::new(cfg),
            reason,
        }
    }

    /// The limiter (for tests).
    pub fn limiter(&self) -> &Limiter {
        &self.limiter
    }
}

impl Guard for UserspaceGuard {
    fn admit(&self, ip: IpAddr, now: Instant) -> bool {
        self.limiter.admit(ip, now, true, &|_, _| {}).is_ok()
    }
    fn closed(&self, ip: IpAddr) {
        self.limiter.closed(ip, &|_, _| {});
    }
    fn set_accepting(&self, accepting: bool) {
        self.limiter.set_accepting(accepting);
    }
    fn status(&self) -> serde_json::Value {
        let mut v = self.limiter.status_fields(&self.cfg);
        // Without XDP, the user-space refusals are the guard's drops.
        let drops = super::drops_object(&[], &self.limiter.refused());
        if let Some(o) = v.as_object_mut() {
            o.insert("mode".into(), json!("off"));
            o.insert("reason".into(), json!(self.reason));
            o.insert("enforcement".into(), json!("user space"));
            o.insert("interface".into(), json!(self.cfg.interface));
            o.insert("drops".into(), drops);
        }
        v
    }
    fn metrics(&self, out: &mut String) {
        let _ = writeln!(
            out,
            "# HELP devgate_xdp_attached 1 if the XDP program is attached.\n# TYPE devgate_xdp_attached gauge\ndevgate_xdp_attached{{mode=\"off\"}} 0"
        );
        self.limiter.metrics(out);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn cfg(per_ip: u32, rate: u32, burst: u32) -> GuardConfig {
        GuardConfig {
            mode: super::super::config::Mode::Userspace,
            max_conns_per_ip: per_ip,
            new_conns_per_sec: rate,
            new_conns_burst: burst,
            manager_sources: vec!["192.0.2.0/24".into()],
            exempt_sources: vec!["203.0.113.0/24".into()],
            ..GuardConfig::default()
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn per_ip_limit_counts_exactly_and_releases() {
        let l = Limiter::new(&cfg(2, 0, 0));
        let now = Instant::now();
        let a = ip("198.51.100.1");
        assert!(l.admit(a, now, true, &|_, _| {}).is_ok());
        assert!(l.admit(a, now, true, &|_, _| {}).is_ok());
        assert_eq!(l.admit(a, now, true, &|_, _| {}), Err(Refusal::PerIp));
        assert!(l.admit(ip("198.51.100.2"), now, true, &|_, _| {}).is_ok());
        l.closed(a, &|_, _| {});
        assert!(l.admit(a, now, true, &|_, _| {}).is_ok());
        assert_eq!(l.conns_of(a), 2);
        for _ in 0..5 {
            l.closed(a, &|_, _| {});
        }
        assert_eq!(l.conns_of(a), 0);
        assert_eq!(l.tracked().0, 1, "only the other source is left");
        assert_eq!(l.refused()[1].1, 1);
    }

    #[test]
    fn exempt_networks_skip_the_per_source_limits() {
        let l = Limiter::new(&cfg(1, 1, 1));
        let now = Instant::now();
        let nat = ip("203.0.113.7");
        for _ in 0..10 {
            assert!(l.admit(nat, now, true, &|_, _| {}).is_ok());
        }
        assert_eq!(l.conns_of(nat), 10, "still counted");
        l.set_accepting(false);
        assert_eq!(
            l.admit(nat, now, true, &|_, _| {}),
            Err(Refusal::DeviceLimit),
            "exempt from per-source limits, not from shedding"
        );
    }

    #[test]
    fn rate_allows_the_burst_then_one_per_interval() {
        let l = Limiter::new(&cfg(0, 10, 3));
        let t0 = Instant::now();
        let a = ip("198.51.100.1");
        for _ in 0..3 {
            assert!(l.admit(a, t0, true, &|_, _| {}).is_ok());
        }
        assert_eq!(l.admit(a, t0, true, &|_, _| {}), Err(Refusal::Rate));
        // Without the rate check (XDP charged the SYN) it is admitted.
        assert!(l.admit(a, t0, false, &|_, _| {}).is_ok());
        let later = t0 + Duration::from_millis(100);
        assert!(l.admit(a, later, true, &|_, _| {}).is_ok());
        assert_eq!(l.admit(a, later, true, &|_, _| {}), Err(Refusal::Rate));
    }

    #[test]
    fn shedding_spares_manager_networks_and_can_be_off() {
        let l = Limiter::new(&cfg(0, 0, 0));
        let now = Instant::now();
        assert!(!l.set_accepting(false));
        assert_eq!(
            l.admit(ip("198.51.100.1"), now, true, &|_, _| {}),
            Err(Refusal::DeviceLimit)
        );
        assert!(l.admit(ip("192.0.2.9"), now, true, &|_, _| {}).is_ok());
        let off = Limiter::new(&GuardConfig {
            shed_at_device_limit: false,
            ..cfg(0, 0, 0)
        });
        assert!(off.set_accepting(false));
        assert!(off.admit(ip("198.51.100.1"), now, true, &|_, _| {}).is_ok());
    }

    #[test]
    fn ipv6_sources_share_their_prefix_and_mirror_sees_every_count() {
        let l = Limiter::new(&cfg(2, 0, 0));
        let now = Instant::now();
        let seen = Mutex::new(Vec::new());
        let mirror = |k: &[u8; 16], n: u32| {
            seen.lock().expect("lock").push((*k, n));
        };
        assert!(l.admit(ip("2001:db8:0:1::1"), now, true, &mirror).is_ok());
        assert!(l.admit(ip("2001:db8:0:1::2"), now, true, &mirror).is_ok());
        assert_eq!(
            l.admit(ip("2001:db8:0:1::3"), now, true, &mirror),
            Err(Refusal::PerIp)
        );
        assert!(l.admit(ip("2001:db8:0:2::1"), now, true, &mirror).is_ok());
        l.closed(ip("2001:db8:0:1::7"), &mirror);
        let seen = seen.into_inner().expect("lock");
        let counts: Vec<u32> = seen.iter().map(|(_, n)| *n).collect();
        assert_eq!(counts, [1, 2, 1, 1]);
        assert_eq!(seen[0].0, seen[1].0);
        // IPv4 keeps its mapped form, unmasked.
        assert_eq!(
            l.key(ip("203.0.113.5")),
            gateway_common::mapped_v4([203, 0, 113, 5])
        );
    }

    #[test]
    fn a_full_table_fails_open_and_stays_bounded() {
        let l = Limiter::new(&GuardConfig {
            max_sources: 1024,
            ..cfg(1, 0, 0)
        });
        let now = Instant::now();
        for i in 0..5000u32 {
            let a = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            assert!(l.admit(a, now, true, &|_, _| {}).is_ok());
        }
        assert!(l.tracked().0 <= 1024 + SHARDS);
        assert!(l.untracked.load(Ordering::Relaxed) > 0);
    }
}
