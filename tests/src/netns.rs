//! Network namespaces for tests that need a real interface (the XDP tests and the flood
//! benchmark): a server namespace and a client namespace joined by a veth pair, with
//! addresses in a private range that exists only inside the two namespaces. Nothing is
//! routed out of them; dropping a [`NetPair`] deletes both (and with them the veth).
//!
//! Code runs "in" a namespace by running it on a thread that has joined it
//! ([`in_netns`]): sockets created there belong to that namespace for their whole life,
//! whichever thread uses them later.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// True when running as root (CI does); the namespace tests skip otherwise.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Interface names inside the namespaces (names are per namespace, so fixed ones do).
pub const SERVER_IF: &str = "veth-gw";
/// The client side's interface.
pub const CLIENT_IF: &str = "veth-cl";
/// The server's address on the veth.
pub const SERVER_V4: Ipv4Addr = Ipv4Addr::new(10, 211, 0, 1);
/// The client's first address; more follow (`client_v4(i)`).
pub const CLIENT_V4: Ipv4Addr = Ipv4Addr::new(10, 211, 0, 2);
/// The server's IPv6 address.
pub const SERVER_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x211, 0, 0, 0, 0, 0, 1);

/// The client's `i`-th IPv4 address (0 = [`CLIENT_V4`]).
pub fn client_v4(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 211, 0, 2 + i)
}

/// The client's `i`-th IPv6 address, all in one /64.
pub fn client_v6(i: u16) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x211, 0, 0, 0, 0, 0, 2 + i)
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Output of `ip ARGS`.
pub fn ip_output(args: &[&str]) -> Result<String> {
    let out = Command::new("ip").args(args).output()?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Two namespaces joined by a veth pair.
#[derive(Debug)]
pub struct NetPair {
    /// The gateway's namespace.
    pub server: String,
    /// The clients' namespace.
    pub client: String,
}

impl NetPair {
    /// Creates `dg-<tag>-<pid>-<n>-{s,c}` with the veth pair, [`SERVER_V4`]/16 and
    /// [`SERVER_V6`]/64 on the server side, `extra_v4 + 1` IPv4 and `extra_v6` IPv6
    /// addresses on the client side.
    pub fn create(tag: &str, extra_v4: u8, extra_v6: u16) -> Result<Self> {
        static N: AtomicU32 = AtomicU32::new(0);
        let base = format!(
            "dg-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let pair = Self {
            server: format!("{base}-s"),
            client: format!("{base}-c"),
        };
        // From here on, Drop cleans up whatever was created.
        ip(&["netns", "add", &pair.server])?;
        ip(&["netns", "add", &pair.client])?;
        let (s, c) = (pair.server.as_str(), pair.client.as_str());
        ip(&[
            "-n", s, "link", "add", SERVER_IF, "type", "veth", "peer", "name", CLIENT_IF, "netns",
            c,
        ])?;
        ip(&[
            "-n",
            s,
            "addr",
            "add",
            &format!("{SERVER_V4}/16"),
            "dev",
            SERVER_IF,
        ])?;
        ip(&[
            "-n",
            s,
            "addr",
            "add",
            &format!("{SERVER_V6}/64"),
            "dev",
            SERVER_IF,
            "nodad",
        ])?;
        for i in 0..=extra_v4 {
            ip(&[
                "-n",
                c,
                "addr",
                "add",
                &format!("{}/16", client_v4(i)),
                "dev",
                CLIENT_IF,
            ])?;
        }
        for i in 0..extra_v6 {
            ip(&[
                "-n",
                c,
                "addr",
                "add",
                &format!("{}/64", client_v6(i)),
                "dev",
                CLIENT_IF,
                "nodad",
            ])?;
        }
        for (ns, dev) in [(s, SERVER_IF), (c, CLIENT_IF)] {
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
        }
        Ok(pair)
    }

    /// Whether an XDP program is attached to the server's interface (`ip link` says so).
    pub fn server_has_xdp(&self) -> Result<bool> {
        let out = ip_output(&["-n", &self.server, "-d", "link", "show", SERVER_IF])?;
        Ok(out.contains("prog/xdp"))
    }
}

impl Drop for NetPair {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.client]);
        let _ = ip(&["netns", "del", &self.server]);
    }
}

/// One more namespace joined to an existing one (`peer`) by a veth pair: e.g. a gateway
/// instance of its own behind a balancer that runs in `peer`. Dropping it deletes the
/// namespace and, with it, both ends of the veth.
#[derive(Debug)]
pub struct LinkedNs {
    /// The new namespace.
    pub name: String,
}

impl LinkedNs {
    /// Creates `dg-<tag>-<pid>-<n>` with `addr/prefix` on its side of the veth (named
    /// [`SERVER_IF`]) and `peer_addrs` (each `/prefix`) on `peer`'s side, named `peer_if`.
    pub fn create(
        tag: &str,
        peer: &str,
        peer_if: &str,
        peer_addrs: &[Ipv4Addr],
        addr: Ipv4Addr,
        prefix: u8,
    ) -> Result<Self> {
        static N: AtomicU32 = AtomicU32::new(0);
        let ns = Self {
            name: format!(
                "dg-{tag}-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ),
        };
        // From here on, Drop cleans up whatever was created.
        ip(&["netns", "add", &ns.name])?;
        ip(&[
            "-n", &ns.name, "link", "add", SERVER_IF, "type", "veth", "peer", "name", peer_if,
            "netns", peer,
        ])?;
        ip(&[
            "-n",
            &ns.name,
            "addr",
            "add",
            &format!("{addr}/{prefix}"),
            "dev",
            SERVER_IF,
        ])?;
        for a in peer_addrs {
            ip(&[
                "-n",
                peer,
                "addr",
                "add",
                &format!("{a}/{prefix}"),
                "dev",
                peer_if,
            ])?;
        }
        for (n, dev) in [(ns.name.as_str(), SERVER_IF), (peer, peer_if)] {
            ip(&["-n", n, "link", "set", "lo", "up"])?;
            ip(&["-n", n, "link", "set", dev, "up"])?;
        }
        Ok(ns)
    }
}

impl Drop for LinkedNs {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.name]);
    }
}

/// Runs `f` on a thread that has joined network namespace `ns`.
pub fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    let path = format!("/run/netns/{ns}");
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let file = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
                // SAFETY: setns on a namespace fd we hold; CLONE_NEWNET changes only
                // this thread's network namespace.
                let rc = unsafe {
                    libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET)
                };
                if rc != 0 {
                    bail!("setns({path}): {}", std::io::Error::last_os_error());
                }
                f()
            })
            .join()
            .map_err(|_| anyhow::anyhow!("thread in {ns} panicked"))?
    })
}

/// Runs an async block on a current-thread runtime inside namespace `ns`.
pub fn block_on_in<T: Send, F: std::future::Future<Output = Result<T>>>(
    ns: &str,
    f: impl FnOnce() -> F + Send,
) -> Result<T> {
    in_netns(ns, || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(f())
    })
}

/// Plain TCP connect from `from` (bound first) inside the current namespace; `Ok(true)`
/// if it connected within `timeout`, `Ok(false)` if it timed out (SYN dropped).
pub fn tcp_probe(from: Option<IpAddr>, to: SocketAddr, timeout: Duration) -> Result<bool> {
    let domain = socket2::Domain::for_address(to);
    let s = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    if let Some(a) = from {
        s.bind(&SocketAddr::new(a, 0).into())?;
    }
    match s.connect_timeout(&to.into(), timeout) {
        Ok(()) => Ok(true),
        Err(e)
            if e.kind() == std::io::ErrorKind::TimedOut
                || e.raw_os_error() == Some(libc::EINPROGRESS) =>
        {
            Ok(false)
        }
        Err(e) => Err(e).with_context(|| format!("connecting to {to}")),
    }
}

/// Raw IPv4 packets sent with `IP_HDRINCL`: the kernel routes them by destination and
/// sends them as they are (it only fills in the IP total length and checksum), so the
/// source address may be one the sender does not own.
#[derive(Debug)]
pub struct RawSender {
    fd: std::os::fd::OwnedFd,
}

impl RawSender {
    /// Opens the raw socket (needs CAP_NET_RAW) in the current namespace.
    pub fn new() -> Result<Self> {
        // SAFETY: plain socket(2); the fd is owned below.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
        if fd < 0 {
            bail!(
                "raw socket: {} (needs CAP_NET_RAW)",
                std::io::Error::last_os_error()
            );
        }
        // SAFETY: fd is a fresh descriptor we own.
        let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        Ok(Self { fd })
    }

    /// Sends one packet (a whole IPv4 datagram) to its destination address.
    pub fn send(&self, packet: &[u8]) -> Result<()> {
        if packet.len() < 20 {
            bail!("packet shorter than an IPv4 header");
        }
        let dst = [packet[16], packet[17], packet[18], packet[19]];
        // SAFETY: a zeroed sockaddr_in is valid; we fill in family and address.
        let mut sa: libc::sockaddr_in = unsafe { std::mem::zeroed() };
        sa.sin_family = libc::AF_INET as libc::sa_family_t;
        sa.sin_addr.s_addr = u32::from_ne_bytes(dst);
        // SAFETY: buffer and address are valid for the duration of the call.
        let n = unsafe {
            libc::sendto(
                std::os::fd::AsRawFd::as_raw_fd(&self.fd),
                packet.as_ptr().cast(),
                packet.len(),
                0,
                std::ptr::addr_of!(sa).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENOBUFS) {
                // The veth queue is full: the packet is lost, like on a real wire.
                return Ok(());
            }
            return Err(e).context("sendto on the raw socket");
        }
        Ok(())
    }
}

fn checksum(chunks: &[&[u8]]) -> u16 {
    let mut sum: u32 = 0;
    for chunk in chunks {
        for pair in chunk.chunks(2) {
            let word = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
            sum += u32::from(word);
        }
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// TCP flags.
pub mod flags {
    /// SYN.
    pub const SYN: u8 = 0x02;
    /// ACK.
    pub const ACK: u8 = 0x10;
}

/// Options for a hand-made IPv4/TCP packet.
#[derive(Debug, Clone, Copy)]
pub struct TcpPacket {
    /// Source address (need not be the sender's).
    pub src: Ipv4Addr,
    /// Destination address.
    pub dst: Ipv4Addr,
    /// Source port.
    pub sport: u16,
    /// Destination port.
    pub dport: u16,
    /// TCP flags.
    pub flags: u8,
    /// Sequence number.
    pub seq: u32,
    /// The IPv4 fragment field (flags and offset); 0 = not fragmented.
    pub frag: u16,
    /// Bytes of the TCP header to include (20 = whole; fewer = truncated).
    pub tcp_len: usize,
}

impl TcpPacket {
    /// A SYN from `src:sport` to `dst:dport`.
    pub fn syn(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16) -> Self {
        Self {
            src,
            dst,
            sport,
            dport,
            flags: flags::SYN,
            seq: u32::from(sport).wrapping_mul(2_654_435_761),
            frag: 0,
            tcp_len: 20,
        }
    }

    /// The whole IPv4 datagram, checksums computed.
    pub fn build(&self) -> Vec<u8> {
        let mut tcp = [0u8; 20];
        tcp[0..2].copy_from_slice(&self.sport.to_be_bytes());
        tcp[2..4].copy_from_slice(&self.dport.to_be_bytes());
        tcp[4..8].copy_from_slice(&self.seq.to_be_bytes());
        tcp[12] = 5 << 4;
        tcp[13] = self.flags;
        tcp[14..16].copy_from_slice(&64240u16.to_be_bytes());
        let pseudo = {
            let mut p = [0u8; 12];
            p[0..4].copy_from_slice(&self.src.octets());
            p[4..8].copy_from_slice(&self.dst.octets());
            p[9] = 6;
            p[10..12].copy_from_slice(&20u16.to_be_bytes());
            p
        };
        let sum = checksum(&[&pseudo, &tcp]);
        tcp[16..18].copy_from_slice(&sum.to_be_bytes());
        let tcp_len = self.tcp_len.min(20);
        let total = 20 + tcp_len;
        let mut ip = vec![0u8; total];
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        ip[4..6].copy_from_slice(&(self.sport ^ 0x5a5a).to_be_bytes());
        ip[6..8].copy_from_slice(&self.frag.to_be_bytes());
        ip[8] = 64;
        ip[9] = 6;
        ip[12..16].copy_from_slice(&self.src.octets());
        ip[16..20].copy_from_slice(&self.dst.octets());
        let sum = checksum(&[&ip[..20]]);
        ip[10..12].copy_from_slice(&sum.to_be_bytes());
        ip[20..].copy_from_slice(&tcp[..tcp_len]);
        ip
    }
}

/// A SYN flood: SYNs to `dst:dport` from `sources` addresses starting at `first_src`
/// (round robin, source ports varying), paced to `pps` packets per second, bounded by
/// `secs` seconds and `max` packets.
#[derive(Debug, Clone, Copy)]
pub struct Flood {
    /// First spoofed source address.
    pub first_src: Ipv4Addr,
    /// How many consecutive source addresses to use.
    pub sources: u32,
    /// Target address.
    pub dst: Ipv4Addr,
    /// Target port.
    pub dport: u16,
    /// Packets per second (0 = as fast as the sender can).
    pub pps: u64,
    /// At most this many seconds.
    pub secs: f64,
    /// At most this many packets.
    pub max: u64,
}

impl Flood {
    /// Sends until a bound is reached or `stop` is set; returns the packets sent. Runs in
    /// the calling thread's namespace.
    pub fn run(&self, stop: &std::sync::atomic::AtomicBool) -> Result<u64> {
        let sender = RawSender::new()?;
        let start = Instant::now();
        let deadline = start + Duration::from_secs_f64(self.secs);
        let base = u32::from(self.first_src);
        let sources = u64::from(self.sources.max(1));
        let mut sent = 0u64;
        let mut packet = TcpPacket::syn(self.first_src, self.dst, 1024, self.dport);
        // Pace in batches of 64 so the clock is not read for every packet.
        while sent < self.max && Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
            for _ in 0..64 {
                packet.src = Ipv4Addr::from(base.wrapping_add((sent % sources) as u32));
                packet.sport = 1024 + (sent % 60_000) as u16;
                packet.seq = (sent as u32).wrapping_mul(2_654_435_761);
                sender.send(&packet.build())?;
                sent += 1;
                if sent >= self.max {
                    break;
                }
            }
            if self.pps > 0 {
                let due = start + Duration::from_secs_f64(sent as f64 / self.pps as f64);
                let now = Instant::now();
                if due > now {
                    std::thread::sleep(due - now);
                }
            }
        }
        Ok(sent)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_verify_to_zero() {
        let p = TcpPacket::syn(
            Ipv4Addr::new(10, 0, 0, 1),
            Ipv4Addr::new(10, 0, 0, 2),
            40000,
            8443,
        )
        .build();
        assert_eq!(p.len(), 40);
        assert_eq!(checksum(&[&p[..20]]), 0);
        let mut pseudo = [0u8; 12];
        pseudo[0..8].copy_from_slice(&p[12..20]);
        pseudo[9] = 6;
        pseudo[10..12].copy_from_slice(&20u16.to_be_bytes());
        assert_eq!(checksum(&[&pseudo, &p[20..]]), 0);
    }
}
