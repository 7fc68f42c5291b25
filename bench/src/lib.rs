//! devgate's benchmark workloads, shared by the criterion benches (`benches/`), the
//! instruction-count runner (`devgate-bench icount`, what CI compares against
//! `baseline/instructions.json`) and the in-process handshake rate of the benchmark report.
//!
//! Each workload is set up once ([`Workload::new`]) and then run `iters` times
//! ([`Workload::run`]); only the run is measured. Nothing here does network I/O: the TLS
//! workloads move records between an in-memory client and server, with the same rustls
//! configuration the gateway builds from a `devgate init` data dir.

use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use devgate_pki::PkiPaths;
use devgate_proto::frame::{self, Frame};
use devgate_proto::ws::{self, Decoded, Decoder, Opcode, Role};
use rustls::{ClientConfig, ClientConnection, ServerConfig, ServerConnection};

/// Every workload `devgate-bench icount` measures, in report order.
pub const WORKLOADS: &[&str] = &[
    "frame_encode_ws_64",
    "frame_decode_64",
    "ws_decode_masked_1k",
    "ws_header_parse",
    "ws_mask_16k",
    "tls_seal_open_64",
    "tls_handshake_mtls",
    "map_lookup",
    "map_insert_remove",
    "route_command_cross_worker",
    "route_response_same_worker",
    "route_response_cross_worker",
];

pub mod routing;

/// The function callgrind counts for workload `name` (`--toggle-collect`): the routing
/// workloads count only the gateway's calls ([`routing::icount_gateway`]), the others
/// their whole run (`icount_measure` in `devgate-bench`).
pub fn icount_toggle(name: &str) -> &'static str {
    if routing::ROUTING_WORKLOADS.contains(&name) {
        "icount_gateway"
    } else {
        "icount_measure"
    }
}

/// Iterations per workload for instruction counts: enough that per-iteration figures are
/// not dominated by the first call's cache misses in callgrind's model, few enough that the
/// whole set runs in well under a minute under valgrind.
pub fn icount_iterations(name: &str) -> u64 {
    match name {
        "tls_handshake_mtls" => 20,
        n if routing::ROUTING_WORKLOADS.contains(&n) => 2_000,
        "ws_mask_16k" | "tls_seal_open_64" => 2_000,
        _ => 20_000,
    }
}

/// Client and server TLS configurations as the gateway and a device use them.
#[derive(Debug, Clone)]
pub struct TlsConfigs {
    /// The gateway's server configuration (`gateway::tls::load`).
    pub server: Arc<ServerConfig>,
    /// A device with its own certificate; session resumption off, so every handshake is
    /// a full one.
    pub device: Arc<ClientConfig>,
    _dir: Arc<tempfile::TempDir>,
}

impl TlsConfigs {
    /// Creates a throwaway PKI (`devgate init`) and one device credential.
    pub fn new() -> Result<Self> {
        let dir = tempfile::tempdir().context("temporary data dir")?;
        devgate_pki::init(
            dir.path(),
            &devgate_pki::InitOptions {
                names: vec!["localhost".into()],
                force: false,
            },
        )?;
        let path = dir.path().to_path_buf();
        Self::from_data_dir(&path, Arc::new(dir))
    }

    fn from_data_dir(data: &Path, dir: Arc<tempfile::TempDir>) -> Result<Self> {
        let material = gateway::tls::load(data)?;
        let paths = PkiPaths::new(data);
        let roots = devgate_pki::load_certs(&paths.root_cert())?;
        let ca = devgate_pki::ClientCa::load(&paths.device_ca_cert(), &paths.device_ca_key())?;
        let issued = ca.issue_device("00:E0:C5:12:34:56")?;
        let device = devgate_client::tls_config(&roots, Some((issued.chain, issued.key)))?;
        let mut device = (*device).clone();
        device.resumption = rustls::client::Resumption::disabled();
        Ok(Self {
            server: material.server_config,
            device: Arc::new(device),
            _dir: dir,
        })
    }

    /// Runs one full mutual-TLS handshake in memory; returns the connected pair.
    pub fn handshake(&self) -> Result<(ClientConnection, ServerConnection)> {
        let name = rustls_pki_types::ServerName::try_from("localhost")?;
        let mut c = ClientConnection::new(self.device.clone(), name)?;
        let mut s = ServerConnection::new(self.server.clone())?;
        let mut buf = Vec::with_capacity(16 * 1024);
        for _ in 0..16 {
            if !c.is_handshaking() && !s.is_handshaking() {
                return Ok((c, s));
            }
            transfer(&mut buf, &mut c, &mut s)?;
            transfer(&mut buf, &mut s, &mut c)?;
        }
        bail!("handshake did not finish in 16 flights")
    }
}

/// CPU time of the calling thread: unlike wall-clock time it does not grow when other
/// processes take the core, so the handshake rate stays meaningful on a busy machine.
pub fn thread_cpu_time() -> std::time::Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes only the timespec we pass.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return std::time::Duration::ZERO;
    }
    std::time::Duration::new(
        u64::try_from(ts.tv_sec).unwrap_or(0),
        u32::try_from(ts.tv_nsec).unwrap_or(0),
    )
}

/// Like [`TlsConfigs::handshake`], but adds up the CPU time spent in the server's calls
/// only: the gateway's share of a handshake, which is what bounds a reconnect storm.
pub fn timed_server_handshake(cfg: &TlsConfigs) -> Result<std::time::Duration> {
    use std::time::Duration;
    let name = rustls_pki_types::ServerName::try_from("localhost")?;
    let mut c = ClientConnection::new(cfg.device.clone(), name)?;
    let t = thread_cpu_time();
    let mut s = ServerConnection::new(cfg.server.clone())?;
    let mut server = thread_cpu_time().saturating_sub(t);
    let mut buf = Vec::with_capacity(16 * 1024);
    for _ in 0..16 {
        if !c.is_handshaking() && !s.is_handshaking() {
            return Ok(server);
        }
        buf.clear();
        while c.wants_write() {
            c.write_tls(&mut buf)?;
        }
        let t = thread_cpu_time();
        feed(&mut s, &buf)?;
        buf.clear();
        while s.wants_write() {
            s.write_tls(&mut buf)?;
        }
        server += thread_cpu_time().saturating_sub(t);
        feed(&mut c, &buf)?;
    }
    let _: Duration = server;
    bail!("handshake did not finish in 16 flights")
}

fn feed<C: std::ops::DerefMut<Target = rustls::ConnectionCommon<D>>, D: rustls::SideData>(
    to: &mut C,
    mut data: &[u8],
) -> Result<()> {
    while !data.is_empty() {
        to.read_tls(&mut data)?;
        to.process_new_packets()?;
    }
    Ok(())
}

/// Moves everything `from` wants to send into `to` and lets `to` process it.
fn transfer<A, B, DA, DB>(buf: &mut Vec<u8>, from: &mut A, to: &mut B) -> Result<()>
where
    A: std::ops::DerefMut<Target = rustls::ConnectionCommon<DA>>,
    B: std::ops::DerefMut<Target = rustls::ConnectionCommon<DB>>,
    DA: rustls::SideData,
    DB: rustls::SideData,
{
    buf.clear();
    while from.wants_write() {
        from.write_tls(buf)?;
    }
    feed(to, buf)
}

/// A prepared workload: state built outside the measured region.
#[allow(missing_debug_implementations)]
pub enum Workload {
    /// devgate frame → WebSocket binary frame (server side: unmasked), 64 B payload.
    FrameEncodeWs(Frame<'static>, Vec<u8>),
    /// devgate frame decode, 64 B payload.
    FrameDecode(Vec<u8>),
    /// WebSocket decode of a masked 1 KiB client frame, unmasking in place.
    WsDecodeMasked(Decoder, Vec<u8>, Vec<u8>),
    /// WebSocket header parse only (`Decoder::needed`), 16-bit length, masked.
    WsHeader(Decoder, Vec<u8>),
    /// XOR mask over 16 KiB.
    WsMask(Vec<u8>),
    /// A device seals a 64 B application-data record, the gateway opens it.
    TlsSealOpen(Box<(ClientConnection, ServerConnection)>, Vec<u8>),
    /// Full TLS 1.3 mutual-TLS handshake, both sides, in memory.
    TlsHandshake(TlsConfigs),
    /// dashmap (the gateway's session map) lookup by unit ID among 10,000 sessions.
    MapLookup(dashmap::DashMap<Arc<str>, u64>, Vec<String>),
    /// dashmap insert then remove of a session (a device connecting and leaving).
    MapInsertRemove(dashmap::DashMap<Arc<str>, u64>, Vec<Arc<str>>),
    /// A command round trip through the workers (`gateway::harness`), one leg counted.
    Route(Box<routing::Routing>),
}

/// The static payload the frame workloads carry.
static PAYLOAD_64: [u8; 64] = [0xa5; 64];

/// Unit IDs of the map workloads.
pub fn unit_ids(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            let b = i.to_be_bytes();
            format!("00:E0:C5:{:02X}:{:02X}:{:02X}", b[5], b[6], b[7])
        })
        .collect()
}

impl Workload {
    /// Builds workload `name` (one of [`WORKLOADS`]).
    pub fn new(name: &str) -> Result<Self> {
        Ok(match name {
            "frame_encode_ws_64" => Self::FrameEncodeWs(
                Frame::command("00:E0:C5:12:34:56", 42, &PAYLOAD_64),
                Vec::with_capacity(256),
            ),
            "frame_decode_64" => {
                let mut v = Vec::new();
                Frame::command("00:E0:C5:12:34:56", 42, &PAYLOAD_64).encode(&mut v);
                Self::FrameDecode(v)
            }
            "ws_decode_masked_1k" => {
                let mut wire = Vec::new();
                ws::encode_frame(&mut wire, Opcode::Binary, &[0x3c; 1024], Some([1, 2, 3, 4]));
                let buf = wire.clone();
                Self::WsDecodeMasked(Decoder::new(Role::Server, 1 << 20), wire, buf)
            }
            "ws_header_parse" => {
                let mut wire = Vec::new();
                ws::encode_frame(&mut wire, Opcode::Binary, &[0x3c; 1024], Some([1, 2, 3, 4]));
                Self::WsHeader(Decoder::new(Role::Server, 1 << 20), wire)
            }
            "ws_mask_16k" => Self::WsMask(vec![0x3c; 16 * 1024]),
            "tls_seal_open_64" => {
                let cfg = TlsConfigs::new()?;
                Self::TlsSealOpen(Box::new(cfg.handshake()?), Vec::with_capacity(256))
            }
            "tls_handshake_mtls" => Self::TlsHandshake(TlsConfigs::new()?),
            "map_lookup" => {
                let ids = unit_ids(10_000);
                let map = dashmap::DashMap::new();
                for (i, id) in ids.iter().enumerate() {
                    map.insert(Arc::<str>::from(id.as_str()), i as u64);
                }
                Self::MapLookup(map, ids)
            }
            "map_insert_remove" => {
                let ids: Vec<Arc<str>> = unit_ids(20_000)
                    .into_iter()
                    .map(|s| Arc::from(s.as_str()))
                    .collect();
                let map = dashmap::DashMap::new();
                for (i, id) in ids.iter().take(10_000).enumerate() {
                    map.insert(id.clone(), i as u64);
                }
                Self::MapInsertRemove(map, ids)
            }
            n if routing::ROUTING_WORKLOADS.contains(&n) => {
                Self::Route(Box::new(routing::Routing::new(n)?))
            }
            other => bail!(
                "unknown workload {other:?} (known: {})",
                WORKLOADS.join(", ")
            ),
        })
    }

    /// Runs the workload `iters` times.
    #[inline(never)]
    pub fn run(&mut self, iters: u64) -> Result<()> {
        match self {
            Self::FrameEncodeWs(f, out) => {
                for _ in 0..iters {
                    out.clear();
                    frame::encode_ws(out, black_box(f), None);
                    black_box(out.len());
                }
            }
            Self::FrameDecode(v) => {
                for _ in 0..iters {
                    black_box(Frame::decode(black_box(v)).map(|f| f.id).ok());
                }
            }
            Self::WsDecodeMasked(dec, wire, buf) => {
                for _ in 0..iters {
                    buf.copy_from_slice(wire);
                    match dec.decode(black_box(buf))? {
                        Decoded::Frame { consumed, .. } => black_box(consumed),
                        _ => bail!("ws_decode_masked_1k: frame not decoded"),
                    };
                }
            }
            Self::WsHeader(dec, wire) => {
                for _ in 0..iters {
                    black_box(dec.needed(black_box(wire)));
                }
            }
            Self::WsMask(buf) => {
                for i in 0..iters {
                    ws::apply_mask(black_box(buf), (i as u32).to_be_bytes());
                }
            }
            Self::TlsSealOpen(pair, wire) => {
                let (c, s) = &mut **pair;
                let mut plain = [0u8; 64];
                for _ in 0..iters {
                    use std::io::{Read, Write};
                    c.writer().write_all(&PAYLOAD_64)?;
                    wire.clear();
                    while c.wants_write() {
                        c.write_tls(wire)?;
                    }
                    feed(s, wire)?;
                    s.reader().read_exact(&mut plain)?;
                    black_box(&plain);
                }
            }
            Self::TlsHandshake(cfg) => {
                for _ in 0..iters {
                    black_box(cfg.handshake()?);
                }
            }
            Self::MapLookup(map, ids) => {
                let n = ids.len() as u64;
                for i in 0..iters {
                    // A fixed stride through the keys: the same sequence on every run.
                    let id = &ids[((i * 7919) % n) as usize];
                    black_box(map.get(id.as_str()).map(|v| *v));
                }
            }
            Self::MapInsertRemove(map, ids) => {
                for i in 0..iters {
                    let id = &ids[10_000 + (i % 10_000) as usize];
                    map.insert(id.clone(), i);
                    black_box(map.remove(id));
                }
            }
            Self::Route(r) => {
                for _ in 0..iters {
                    r.round_trip()?;
                }
            }
        }
        Ok(())
    }
}
