//! devgate's XDP guard: runs on every packet the public interface receives, before the
//! kernel allocates anything for it.
//!
//! - TCP to one of the gateway's ports: a SYN (SYN without ACK, a new connection) is
//!   dropped while the device limit is reached (unless its source is a manager range),
//!   when its source already holds `max_conns_per_ip` established connections, or when it
//!   exceeds its source's new-connection rate (sources in an exempt network skip the
//!   last two); anything else (established traffic) passes.
//! - TCP or UDP to any other port: passes if the allow-list has (protocol, port, source);
//!   passes if it is a reply to the host's own outbound traffic (ephemeral destination
//!   port, and for TCP the ACK flag); otherwise it is dropped.
//! - Everything else (ARP, ICMP, IPv6 neighbour discovery, other protocols) passes.
//!
//! Every decision increments one per-CPU counter ([`Counter`]). User space owns the truth
//! (limits, the admit flag, established counts per source) and writes it into the maps;
//! this program only reads it, except for the per-source rate state, which only it keeps.
//!
//! Packets the program cannot fully parse are dropped, never passed: a truncated or
//! inconsistent Ethernet/IP/TCP/UDP header (the kernel would drop it anyway), an IPv6
//! packet with more extension headers than it walks, and any fragment of a TCP packet (a
//! non-first fragment has no TCP header to check, and Linux sends TCP with DF set, so a
//! fragmented TCP segment is either a broken path or an evasion attempt). Non-first
//! fragments of other protocols pass: without their first fragment, which was checked,
//! the kernel cannot reassemble them.

#![no_std]
#![no_main]

use core::mem::size_of;

use aya_ebpf::bindings::BPF_F_NO_PREALLOC;
use aya_ebpf::bindings::xdp_action::{XDP_DROP, XDP_PASS};
use aya_ebpf::helpers::bpf_ktime_get_ns;
use aya_ebpf::macros::{map, xdp};
use aya_ebpf::maps::lpm_trie::Key;
use aya_ebpf::maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray};
use aya_ebpf::programs::XdpContext;
use gateway_common::{
    ALLOW_KEY_HEAD_BITS, AllowKey, COUNTERS, Counter, MAX_PORTS, MAX_RULES, MAX_SOURCES,
    SOURCE_EXEMPT, SOURCE_MANAGER, SourceKey, XdpConfig, mapped_v4,
};

#[map]
static CONFIG: Array<XdpConfig> = Array::with_max_entries(1, 0);
#[map]
static PORTS: HashMap<u16, u8> = HashMap::with_max_entries(MAX_PORTS, 0);
#[map]
static ALLOW: LpmTrie<AllowKey, u8> = LpmTrie::with_max_entries(MAX_RULES, 0);
#[map]
static SOURCES: LpmTrie<SourceKey, u8> = LpmTrie::with_max_entries(MAX_RULES, 0);
/// Not preallocated: only user space inserts (sources with connections), so memory follows
/// the sources actually connected, and entries are freed by RCU (a lookup never sees a
/// recycled element).
#[map]
static CONNS: HashMap<SourceKey, u32> = HashMap::with_max_entries(MAX_SOURCES, BPF_F_NO_PREALLOC);
#[map]
static RATE: LruHashMap<SourceKey, u64> = LruHashMap::with_max_entries(MAX_SOURCES, 0);
#[map]
static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTERS, 0);

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;
/// IPv6 extension headers walked before giving up (and dropping the packet).
const MAX_EXT_HEADERS: usize = 6;

#[repr(C)]
struct Eth {
    dst: [u8; 6],
    src: [u8; 6],
    proto: [u8; 2],
}

#[repr(C)]
struct Vlan {
    tci: [u8; 2],
    proto: [u8; 2],
}

#[repr(C)]
struct Ipv4 {
    version_ihl: u8,
    tos: u8,
    tot_len: [u8; 2],
    id: [u8; 2],
    frag_off: [u8; 2],
    ttl: u8,
    proto: u8,
    check: [u8; 2],
    src: [u8; 4],
    dst: [u8; 4],
}

#[repr(C)]
struct Ipv6 {
    version_class_flow: [u8; 4],
    payload_len: [u8; 2],
    next: u8,
    hop_limit: u8,
    src: [u8; 16],
    dst: [u8; 16],
}

/// The first two bytes every IPv6 extension header shares.
#[repr(C)]
struct Ext {
    next: u8,
    len: u8,
}

#[repr(C)]
struct Frag6 {
    next: u8,
    reserved: u8,
    offset_flags: [u8; 2],
    id: [u8; 4],
}

#[repr(C)]
struct Tcp {
    src: [u8; 2],
    dst: [u8; 2],
    seq: [u8; 4],
    ack: [u8; 4],
    data_off: u8,
    flags: u8,
    window: [u8; 2],
    check: [u8; 2],
    urgent: [u8; 2],
}

#[repr(C)]
struct Udp {
    src: [u8; 2],
    dst: [u8; 2],
    len: [u8; 2],
    check: [u8; 2],
}

/// The packet could not be parsed: dropped and counted as malformed.
struct Malformed;

#[xdp]
pub fn devgate_xdp(ctx: XdpContext) -> u32 {
    match try_xdp(&ctx) {
        Ok(action) => action,
        Err(Malformed) => drop(Counter::DropMalformed),
    }
}

#[inline(always)]
fn count(c: Counter) {
    if let Some(p) = STATS.get_ptr_mut(c as u32) {
        // SAFETY: a per-CPU slot; XDP runs with preemption disabled, so nothing else
        // writes it meanwhile.
        unsafe { *p += 1 };
    }
}

#[inline(always)]
fn pass(c: Counter) -> u32 {
    count(c);
    XDP_PASS
}

#[inline(always)]
fn drop(c: Counter) -> u32 {
    count(c);
    XDP_DROP
}

/// A pointer to a `T` at `off` bytes into the packet, if the packet is that long.
#[inline(always)]
fn ptr_at<T>(ctx: &XdpContext, off: usize) -> Result<*const T, Malformed> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + off + size_of::<T>() > end {
        return Err(Malformed);
    }
    Ok((start + off) as *const T)
}

#[inline(always)]
fn be16(b: [u8; 2]) -> u16 {
    u16::from_be_bytes(b)
}

#[inline(always)]
fn try_xdp(ctx: &XdpContext) -> Result<u32, Malformed> {
    let eth = ptr_at::<Eth>(ctx, 0)?;
    // SAFETY: `ptr_at` checked that the header lies inside the packet.
    let mut proto = be16(unsafe { (*eth).proto });
    let mut off = size_of::<Eth>();
    // Up to two VLAN tags (802.1Q, 802.1ad), in case the program sits on a trunk.
    for _ in 0..2 {
        if proto != ETH_P_8021Q && proto != ETH_P_8021AD {
            break;
        }
        let vlan = ptr_at::<Vlan>(ctx, off)?;
        // SAFETY: bounds checked by `ptr_at`.
        proto = be16(unsafe { (*vlan).proto });
        off += size_of::<Vlan>();
    }
    let Some(cfg) = CONFIG.get(0) else {
        return Ok(pass(Counter::PassOther));
    };
    match proto {
        ETH_P_IP => ipv4(ctx, off, cfg),
        ETH_P_IPV6 => ipv6(ctx, off, cfg),
        _ => Ok(pass(Counter::PassOther)),
    }
}

#[inline(always)]
fn ipv4(ctx: &XdpContext, off: usize, cfg: &XdpConfig) -> Result<u32, Malformed> {
    let ip = ptr_at::<Ipv4>(ctx, off)?;
    // SAFETY: bounds checked by `ptr_at`.
    let (version_ihl, tot_len, frag_off, proto, src) = unsafe {
        (
            (*ip).version_ihl,
            be16((*ip).tot_len),
            be16((*ip).frag_off),
            (*ip).proto,
            (*ip).src,
        )
    };
    let ihl = usize::from(version_ihl & 0x0f) * 4;
    if version_ihl >> 4 != 4 || ihl < size_of::<Ipv4>() || usize::from(tot_len) < ihl {
        return Err(Malformed);
    }
    // A packet shorter than its IP total length is truncated (the kernel drops it too).
    if ctx.data() + off + usize::from(tot_len) > ctx.data_end() {
        return Err(Malformed);
    }
    let more_fragments = frag_off & 0x2000 != 0;
    let fragment_offset = frag_off & 0x1fff;
    if more_fragments || fragment_offset != 0 {
        if proto == IPPROTO_TCP {
            return Ok(drop(Counter::DropFragment));
        }
        if fragment_offset != 0 {
            return Ok(pass(Counter::PassOther));
        }
    }
    let src = mapped_v4(src);
    l4(ctx, off + ihl, proto, src, src, cfg)
}

#[inline(always)]
fn ipv6(ctx: &XdpContext, off: usize, cfg: &XdpConfig) -> Result<u32, Malformed> {
    let ip = ptr_at::<Ipv6>(ctx, off)?;
    // SAFETY: bounds checked by `ptr_at`.
    let (version, mut next, src) =
        unsafe { ((*ip).version_class_flow[0] >> 4, (*ip).next, (*ip).src) };
    if version != 6 {
        return Err(Malformed);
    }
    let mut l4_off = off + size_of::<Ipv6>();
    let mut walked = 0;
    while walked < MAX_EXT_HEADERS {
        match next {
            // Hop-by-hop, routing, destination options: length in 8-byte units, + 8.
            0 | 43 | 60 => {
                let ext = ptr_at::<Ext>(ctx, l4_off)?;
                // SAFETY: bounds checked by `ptr_at`.
                let (n, len) = unsafe { ((*ext).next, (*ext).len) };
                next = n;
                l4_off += (usize::from(len) + 1) * 8;
            }
            // Authentication header: length in 4-byte units, + 8.
            51 => {
                let ext = ptr_at::<Ext>(ctx, l4_off)?;
                // SAFETY: bounds checked by `ptr_at`.
                let (n, len) = unsafe { ((*ext).next, (*ext).len) };
                next = n;
                l4_off += (usize::from(len) + 2) * 4;
            }
            44 => {
                let frag = ptr_at::<Frag6>(ctx, l4_off)?;
                // SAFETY: bounds checked by `ptr_at`.
                let (n, offset_flags) = unsafe { ((*frag).next, be16((*frag).offset_flags)) };
                if n == IPPROTO_TCP {
                    return Ok(drop(Counter::DropFragment));
                }
                if offset_flags & 0xfff8 != 0 {
                    return Ok(pass(Counter::PassOther));
                }
                next = n;
                l4_off += size_of::<Frag6>();
            }
            _ => break,
        }
        walked += 1;
    }
    if matches!(next, 0 | 43 | 44 | 51 | 60) {
        // More extension headers than we walk: we cannot see the ports.
        return Err(Malformed);
    }
    let mut key = src;
    let mut i = 0;
    while i < 16 {
        key[i] &= cfg.v6_mask[i];
        i += 1;
    }
    l4(ctx, l4_off, next, src, key, cfg)
}

/// Decides on a TCP or UDP packet whose transport header starts at `off`. `src` is the
/// full source address (for the allow-list and manager ranges), `key` the one its
/// counters are kept under (an IPv6 source masked to its prefix).
///
/// Everything is inlined into one function: BPF calls take at most five arguments.
#[inline(always)]
fn l4(
    ctx: &XdpContext,
    off: usize,
    proto: u8,
    src: [u8; 16],
    key: [u8; 16],
    cfg: &XdpConfig,
) -> Result<u32, Malformed> {
    let (port, flags) = match proto {
        IPPROTO_TCP => {
            let tcp = ptr_at::<Tcp>(ctx, off)?;
            // SAFETY: bounds checked by `ptr_at`.
            let (dst, data_off, flags) = unsafe { ((*tcp).dst, (*tcp).data_off, (*tcp).flags) };
            if data_off >> 4 < 5 {
                return Err(Malformed);
            }
            let port = be16(dst);
            // SAFETY: the value is a plain u8 read once.
            if unsafe { PORTS.get(&port) }.is_some() {
                if flags & TCP_SYN != 0 && flags & TCP_ACK == 0 {
                    return Ok(syn(src, key, cfg));
                }
                return Ok(pass(Counter::PassGateway));
            }
            (port, flags)
        }
        IPPROTO_UDP => {
            let udp = ptr_at::<Udp>(ctx, off)?;
            // SAFETY: bounds checked by `ptr_at`.
            (be16(unsafe { (*udp).dst }), 0)
        }
        _ => return Ok(pass(Counter::PassOther)),
    };
    let allow = Key::new(
        ALLOW_KEY_HEAD_BITS + 128,
        AllowKey {
            proto,
            pad: 0,
            port: port.to_be_bytes(),
            addr: src,
        },
    );
    if ALLOW.get(&allow).is_some() {
        return Ok(pass(Counter::PassAllowed));
    }
    let reply_port =
        cfg.reply_port_hi != 0 && port >= cfg.reply_port_lo && port <= cfg.reply_port_hi;
    // A TCP reply carries ACK (a SYN-ACK too); a bare SYN to an ephemeral port is a scan.
    if reply_port && (proto == IPPROTO_UDP || flags & TCP_ACK != 0) {
        return Ok(pass(Counter::PassReply));
    }
    Ok(drop(Counter::DropPort))
}

/// A new connection to a gateway port.
#[inline(always)]
fn syn(src: [u8; 16], key: [u8; 16], cfg: &XdpConfig) -> u32 {
    let flags = SOURCES
        .get(Key::new(128, SourceKey { addr: src }))
        .copied()
        .unwrap_or(0);
    if cfg.accepting == 0 && flags & SOURCE_MANAGER == 0 {
        return drop(Counter::DropDeviceLimit);
    }
    if flags & SOURCE_EXEMPT != 0 {
        return pass(Counter::PassSyn);
    }
    let key = SourceKey { addr: key };
    if cfg.max_conns_per_ip != 0 {
        // SAFETY: a u32 written whole by user space (no torn read), in a map without
        // preallocation (no element reuse while we hold the pointer).
        if let Some(n) = unsafe { CONNS.get(&key) }
            && *n >= cfg.max_conns_per_ip
        {
            return drop(Counter::DropPerIp);
        }
    }
    if cfg.interval_ns != 0 {
        // GCRA: `tat` is when the source's bucket will be full again. Two CPUs may race
        // on one source's entry; the worst case is one extra SYN let through.
        // SAFETY: `ktime_get_ns` has no preconditions.
        let now = unsafe { bpf_ktime_get_ns() };
        match RATE.get_ptr_mut(&key) {
            Some(p) => {
                // SAFETY: the entry stays valid for this program run (RCU).
                let tat = unsafe { *p }.max(now);
                if tat - now > cfg.tau_ns {
                    return drop(Counter::DropRate);
                }
                // SAFETY: as above.
                unsafe { *p = tat + cfg.interval_ns };
            }
            None => {
                // A full LRU evicts its oldest source; an insert cannot fail for room.
                let _ = RATE.insert(&key, &(now + cfg.interval_ns), 0);
            }
        }
    }
    pass(Counter::PassSyn)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any path that could reach this; it is never called.
    loop {}
}

/// The kernel requires a license string; no GPL-only helper is used.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 11] = *b"Apache-2.0\0";
