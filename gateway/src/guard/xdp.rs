//! The XDP guard: loads `gateway-ebpf`'s object with aya, writes the limits, the ports,
//! the allow-list and the manager networks into its maps, attaches it to the public
//! interface, and from then on mirrors every change of the user-space truth (per-source
//! connection counts, the admit flag) into the maps.
//!
//! The object is read at run time (`xdp.object`, or the default places), so building
//! the gateway never needs the eBPF toolchain. aya attaches through a bpf_link: the
//! program detaches when the link's file descriptor closes, so a crashed gateway leaves
//! nothing attached, and the maps (never pinned) go with it; a restart starts clean.

use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{Array, HashMap, MapData, MapError, PerCpuArray};
use aya::programs::{ProgramError, Xdp, XdpMode};
use aya::{Ebpf, EbpfLoader};
use gateway_common::{
    ALLOW_KEY_HEAD_BITS, AllowKey, COUNTERS, Counter, MAP_ALLOW, MAP_CONFIG, MAP_CONNS, MAP_PORTS,
    MAP_RATE, MAP_SOURCES, MAP_STATS, PROGRAM, SOURCE_EXEMPT, SOURCE_MANAGER, SourceKey, XdpConfig,
};
use serde_json::json;
use tracing::{debug, info, warn};

use super::Guard;
use super::config::{Cidr, GuardConfig, Mode, mask};
use super::userspace::{Limiter, gcra};

/// The mode the program is attached in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attached {
    /// In the driver, before a socket buffer is allocated.
    Native,
    /// In the kernel's generic XDP hook.
    Generic,
}

/// The loaded program and the maps user space writes or reads.
struct Loaded {
    /// Owns the program and its link; dropping it detaches.
    ebpf: Ebpf,
    config: Array<MapData, XdpConfig>,
    value: XdpConfig,
    conns: HashMap<MapData, SourceKey, u32>,
    stats: PerCpuArray<MapData, u64>,
}

impl std::fmt::Debug for Loaded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loaded")
            .field("config", &self.value)
            .finish()
    }
}

/// XDP in front, exact counts in user space.
#[derive(Debug)]
pub struct XdpGuard {
    cfg: GuardConfig,
    limiter: Limiter,
    mode: Attached,
    object: PathBuf,
    /// `None` once detached (shutdown).
    loaded: Mutex<Option<Loaded>>,
    /// Counters as they were when the program was detached.
    last_counts: Mutex<[u64; COUNTERS as usize]>,
    /// Map updates the kernel refused (a full map); the user-space check still holds.
    mirror_errors: AtomicU64,
}

/// A problem, as one line for the log and status.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        let text = inner.to_string();
        if !s.contains(&text) {
            let _ = write!(s, ": {text}");
        }
        src = inner.source();
    }
    s
}

/// Capabilities loading and attaching need, missing from this process.
fn missing_capabilities() -> Vec<&'static str> {
    const CAP_NET_ADMIN: u32 = 12;
    const CAP_SYS_ADMIN: u32 = 21;
    const CAP_PERFMON: u32 = 38;
    const CAP_BPF: u32 = 39;
    let Some(eff) = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
    else {
        return Vec::new(); // Cannot tell; let the kernel say.
    };
    let has = |cap: u32| eff & (1u64 << cap) != 0;
    let mut missing = Vec::new();
    if !has(CAP_NET_ADMIN) {
        missing.push("CAP_NET_ADMIN");
    }
    // CAP_SYS_ADMIN covers BPF and PERFMON (kernels before 5.8 know only it).
    if !has(CAP_SYS_ADMIN) {
        if !has(CAP_BPF) {
            missing.push("CAP_BPF");
        }
        if !has(CAP_PERFMON) {
            missing.push("CAP_PERFMON");
        }
    }
    missing
}

/// The host's ephemeral port range (replies to its own outbound connections).
fn ephemeral_ports() -> (u16, u16) {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut it = s.split_whitespace().map(|p| p.parse::<u16>().ok());
            Some((it.next()??, it.next()??))
        })
        .unwrap_or((32768, 60999))
}

fn raise_memlock() {
    // Kernels since 5.11 charge BPF memory to the cgroup and ignore RLIMIT_MEMLOCK;
    // older ones need it raised. Failing (no CAP_SYS_RESOURCE) is not fatal.
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit only reads the struct we pass.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } != 0 {
        debug!(
            "cannot raise RLIMIT_MEMLOCK ({}); fine on kernels ≥ 5.11",
            std::io::Error::last_os_error()
        );
    }
}

fn load_error(e: &ProgramError) -> String {
    match e {
        ProgramError::LoadError {
            io_error,
            verifier_log,
        } => {
            let log = verifier_log.to_string();
            debug!("verifier log:\n{log}");
            let tail: Vec<&str> = log.lines().rev().take(3).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            format!(
                "the kernel refused the XDP program ({io_error}); verifier: {}",
                tail.join(" | ")
            )
        }
        other => chain(other),
    }
}

fn take<T: TryFrom<aya::maps::Map, Error = MapError>>(
    ebpf: &mut Ebpf,
    name: &str,
) -> Result<T, String> {
    let map = ebpf
        .take_map(name)
        .ok_or_else(|| format!("the XDP object has no map {name} (wrong or old object?)"))?;
    T::try_from(map).map_err(|e| format!("map {name}: {}", chain(&e)))
}

impl XdpGuard {
    /// Loads and attaches the program; the error is the reason XDP is off, as one line.
    pub fn load(cfg: &GuardConfig, ports: &[u16]) -> Result<Self, String> {
        let candidates = cfg.object_candidates();
        let Some(object) = candidates.iter().find(|p| p.is_file()).cloned() else {
            let looked: Vec<String> = candidates.iter().map(|p| p.display().to_string()).collect();
            return Err(format!(
                "XDP object not found (looked in {}); build it with `cargo xtask build-ebpf` or set xdp.object",
                looked.join(", ")
            ));
        };
        let missing = missing_capabilities();
        if !missing.is_empty() {
            return Err(format!(
                "missing {} (XDP needs CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON, or root)",
                missing.join(", ")
            ));
        }
        let iface = cfg.interface.as_str();
        let c_iface = std::ffi::CString::new(iface)
            .map_err(|_| format!("interface name {iface:?} contains a NUL byte"))?;
        // SAFETY: if_nametoindex reads a NUL-terminated string we own.
        if unsafe { libc::if_nametoindex(c_iface.as_ptr()) } == 0 {
            return Err(format!(
                "no interface named {iface} in this network namespace"
            ));
        }
        raise_memlock();
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(MAP_CONNS, cfg.max_sources)
            .map_max_entries(MAP_RATE, cfg.max_sources)
            .load_file(&object)
            .map_err(|e| {
                let text = chain(&e);
                if text.contains("Operation not permitted") {
                    format!("the kernel refused to create the XDP maps ({text}); needs CAP_BPF and CAP_PERFMON")
                } else {
                    format!("cannot load {}: {text} (old kernel, or an object from another version?)", object.display())
                }
            })?;

        let (interval_ns, tau_ns) = gcra(cfg);
        let (reply_lo, reply_hi) = ephemeral_ports();
        let value = XdpConfig {
            accepting: 1,
            max_conns_per_ip: cfg.max_conns_per_ip,
            interval_ns,
            tau_ns,
            v6_mask: mask([0xff; 16], u32::from(cfg.ipv6_prefix_len)),
            reply_port_lo: reply_lo,
            reply_port_hi: reply_hi,
            pad: 0,
        };
        let mut config: Array<MapData, XdpConfig> = take(&mut ebpf, MAP_CONFIG)?;
        config
            .set(0, value, 0)
            .map_err(|e| format!("writing the XDP config: {}", chain(&e)))?;
        let mut port_map: HashMap<MapData, u16, u8> = take(&mut ebpf, MAP_PORTS)?;
        for port in ports {
            port_map
                .insert(port, 1, 0)
                .map_err(|e| format!("writing port {port}: {}", chain(&e)))?;
        }
        let mut allow: LpmTrie<MapData, AllowKey, u8> = take(&mut ebpf, MAP_ALLOW)?;
        for rule in cfg.allow_rules()? {
            let (bits, addr) = rule.from.map_or((0, [0; 16]), |c| (c.prefix, c.addr));
            let key = Key::new(
                ALLOW_KEY_HEAD_BITS + bits,
                AllowKey {
                    proto: rule.proto,
                    pad: 0,
                    port: rule.port.to_be_bytes(),
                    addr,
                },
            );
            allow
                .insert(&key, 1, 0)
                .map_err(|e| format!("writing the allow-list: {}", chain(&e)))?;
        }
        let mut sources: LpmTrie<MapData, SourceKey, u8> = take(&mut ebpf, MAP_SOURCES)?;
        let nets: Vec<(Cidr, u8)> = cfg
            .managers()?
            .into_iter()
            .map(|c| (c, SOURCE_MANAGER))
            .chain(cfg.exempt()?.into_iter().map(|c| (c, SOURCE_EXEMPT)))
            .collect();
        for (net, _) in &nets {
            // The trie returns only the longest match: give it the flags of every
            // configured network that contains it.
            let flags = nets
                .iter()
                .filter(|(outer, _)| outer.covers(net))
                .fold(0, |f, (_, flag)| f | flag);
            sources
                .insert(
                    &Key::new(net.prefix, SourceKey { addr: net.addr }),
                    flags,
                    0,
                )
                .map_err(|e| format!("writing the manager/exempt networks: {}", chain(&e)))?;
        }
        let conns: HashMap<MapData, SourceKey, u32> = take(&mut ebpf, MAP_CONNS)?;
        let stats: PerCpuArray<MapData, u64> = take(&mut ebpf, MAP_STATS)?;

        let program: &mut Xdp = ebpf
            .program_mut(PROGRAM)
            .ok_or_else(|| format!("the XDP object has no program {PROGRAM}"))?
            .try_into()
            .map_err(|e: ProgramError| chain(&e))?;
        program.load().map_err(|e| load_error(&e))?;
        let attempts: &[(XdpMode, Attached)] = match cfg.mode {
            Mode::Native => &[(XdpMode::Driver, Attached::Native)],
            Mode::Generic => &[(XdpMode::Skb, Attached::Generic)],
            Mode::Auto | Mode::Userspace => &[
                (XdpMode::Driver, Attached::Native),
                (XdpMode::Skb, Attached::Generic),
            ],
        };
        let mut errors = Vec::new();
        let mut mode = None;
        for (xdp_mode, attached) in attempts {
            match program.attach(iface, *xdp_mode) {
                Ok(_link) => {
                    mode = Some(*attached);
                    break;
                }
                Err(e) => {
                    let what = match attached {
                        Attached::Native => "native",
                        Attached::Generic => "generic",
                    };
                    let text = chain(&e);
                    let hint = if text.contains("busy") {
                        " (another XDP program is attached: another devgate?)"
                    } else if *attached == Attached::Native && cfg.mode == Mode::Native {
                        " (the driver may lack native XDP: try --xdp-mode generic)"
                    } else {
                        ""
                    };
                    errors.push(format!("{what} mode: {text}{hint}"));
                }
            }
        }
        let Some(mode) = mode else {
            return Err(format!(
                "cannot attach XDP to {iface}: {}",
                errors.join("; ")
            ));
        };
        if !errors.is_empty() {
            info!(
                "native XDP not available on {iface} ({}); attached in generic mode",
                errors.join("; ")
            );
        }
        Ok(Self {
            cfg: cfg.clone(),
            limiter: Limiter::new(cfg),
            mode,
            object,
            loaded: Mutex::new(Some(Loaded {
                ebpf,
                config,
                value,
                conns,
                stats,
            })),
            last_counts: Mutex::new([0; COUNTERS as usize]),
            mirror_errors: AtomicU64::new(0),
        })
    }

    /// `"native"` or `"generic"`.
    pub fn mode_name(&self) -> &'static str {
        match self.mode {
            Attached::Native => "native",
            Attached::Generic => "generic",
        }
    }

    /// The object that was loaded.
    pub fn object(&self) -> &Path {
        &self.object
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Loaded>> {
        self.loaded
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Writes one source's count into the map (0 removes the entry).
    fn mirror(&self, key: &[u8; 16], conns: u32) {
        let mut loaded = self.lock();
        let Some(l) = loaded.as_mut() else {
            return;
        };
        let key = SourceKey { addr: *key };
        let result = if conns == 0 {
            match l.conns.remove(&key) {
                Err(MapError::KeyNotFound) => Ok(()),
                other => other,
            }
        } else {
            l.conns.insert(key, conns, 0)
        };
        if let Err(e) = result {
            // A full map: the program lets this source's SYNs through, and the
            // user-space check still refuses them. Logged once per 1,000.
            if self
                .mirror_errors
                .fetch_add(1, Ordering::Relaxed)
                .is_multiple_of(1000)
            {
                warn!(
                    "cannot update the XDP connection map ({}); per-IP limits hold in user space only for some sources (raise xdp.max_sources?)",
                    chain(&e)
                );
            }
        }
    }

    /// Per-reason packet counters, summed over CPUs.
    pub fn counts(&self) -> [u64; COUNTERS as usize] {
        let loaded = self.lock();
        let Some(l) = loaded.as_ref() else {
            return *self
                .last_counts
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        };
        let mut out = [0u64; COUNTERS as usize];
        for (i, slot) in out.iter_mut().enumerate() {
            if let Ok(values) = l.stats.get(&(i as u32), 0) {
                *slot = values.iter().sum();
            }
        }
        out
    }
}

impl Guard for XdpGuard {
    fn admit(&self, ip: IpAddr, now: Instant) -> bool {
        // The program already charged this SYN against the rate; per-IP counts and the
        // admit flag are checked again because a SYN may have passed just before a
        // count or the flag changed (or arrived on another interface).
        self.limiter
            .admit(ip, now, false, &|key, n| self.mirror(key, n))
            .is_ok()
    }

    fn closed(&self, ip: IpAddr) {
        self.limiter.closed(ip, &|key, n| self.mirror(key, n));
    }

    fn set_accepting(&self, accepting: bool) {
        let effective = self.limiter.set_accepting(accepting);
        let mut loaded = self.lock();
        if let Some(l) = loaded.as_mut() {
            l.value.accepting = u32::from(effective);
            let value = l.value;
            if let Err(e) = l.config.set(0, value, 0) {
                warn!(
                    "cannot update the XDP admit flag ({}); enforced in user space",
                    chain(&e)
                );
            }
        }
    }

    fn status(&self) -> serde_json::Value {
        let counts = self.counts();
        let attached = self.lock().is_some();
        let mut v = self.limiter.status_fields(&self.cfg);
        let passed: serde_json::Map<String, serde_json::Value> = Counter::ALL
            .iter()
            .filter(|c| !c.is_drop())
            .map(|c| (c.name().to_owned(), json!(counts[*c as usize])))
            .collect();
        if let Some(o) = v.as_object_mut() {
            if attached {
                o.insert("mode".into(), json!(self.mode_name()));
            } else {
                o.insert("mode".into(), json!("off"));
                o.insert("reason".into(), json!("detached: the gateway is stopping"));
            }
            o.insert("interface".into(), json!(self.cfg.interface));
            o.insert("object".into(), json!(self.object.display().to_string()));
            o.insert("enforcement".into(), json!("xdp"));
            o.insert("drops".into(), super::drops_object(&counts, &[]));
            o.insert("passed".into(), json!(passed));
            o.insert(
                "map_update_errors".into(),
                json!(self.mirror_errors.load(Ordering::Relaxed)),
            );
        }
        v
    }

    fn metrics(&self, out: &mut String) {
        let counts = self.counts();
        let attached = self.lock().is_some();
        let _ = writeln!(
            out,
            "# HELP devgate_xdp_attached 1 if the XDP program is attached.\n# TYPE devgate_xdp_attached gauge\ndevgate_xdp_attached{{mode=\"{}\"}} {}",
            self.mode_name(),
            u8::from(attached)
        );
        let _ = writeln!(
            out,
            "# HELP devgate_xdp_packets_total Packets the XDP program decided on, by action and reason.\n# TYPE devgate_xdp_packets_total counter"
        );
        for c in Counter::ALL {
            let action = if c.is_drop() { "drop" } else { "pass" };
            let _ = writeln!(
                out,
                "devgate_xdp_packets_total{{action=\"{action}\",reason=\"{}\"}} {}",
                c.name(),
                counts[c as usize]
            );
        }
        self.limiter.metrics(out);
    }

    fn shutdown(&self) {
        let counts = self.counts();
        let taken = self.lock().take();
        if let Some(loaded) = taken {
            *self
                .last_counts
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = counts;
            // Dropping the program closes its link: the kernel detaches it.
            drop(loaded.ebpf);
            info!(interface = %self.cfg.interface, "XDP program detached");
        }
    }
}
