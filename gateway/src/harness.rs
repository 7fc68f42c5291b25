//! An in-memory harness for the sans-IO [`Worker`]: several workers over one [`Shared`], a
//! virtual clock, and TLS clients (rustls, in memory) holding device and manager
//! certificates from a throwaway PKI. No sockets and no threads: [`Harness::run`] moves
//! bytes between the clients and the workers, and messages between the workers, until
//! nothing moves. The routing tests (`gateway/tests/routing*.rs`) and the routing
//! instruction-count workloads of `devgate-bench` drive the real `Worker` through it, the
//! way a driver does (the order of one loop turn is the epoll driver's).
//!
//! The clock only moves when a test says so ([`Harness::advance`]), so timeouts are
//! exercised in microseconds of real time.

use std::collections::{HashMap, VecDeque};
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use devgate_pki::{ClientCa, PkiPaths};
use devgate_proto::frame::{self, Frame};
use devgate_proto::http;
use devgate_proto::ws::{self, Decoded, Message, Opcode};
use rustls::{ClientConfig, ClientConnection, RootCertStore};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use crate::config::Config;
use crate::shared::Shared;
use crate::worker::Worker;

/// Which side of the gateway a client is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// `GET /v1/device`.
    Device,
    /// `GET /v1/manager`.
    Manager,
}

impl Side {
    fn path(self) -> &'static str {
        match self {
            Self::Device => "/v1/device",
            Self::Manager => "/v1/manager",
        }
    }
}

/// A client, by its index in the harness.
pub type ClientId = usize;

/// What a client received, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Received {
    /// A binary message: one devgate frame (decode it with [`Received::frame`]).
    Frame(Vec<u8>),
    /// A WebSocket close frame.
    Close {
        /// Its status code, if it had one.
        code: Option<u16>,
        /// Its reason.
        reason: String,
    },
    /// Any other WebSocket message (text, pong): the opcode's name and the payload.
    Other(&'static str, Vec<u8>),
}

impl Received {
    /// The devgate frame in a binary message; an error for anything else.
    pub fn frame(&self) -> Result<Frame<'_>> {
        match self {
            Self::Frame(bytes) => Frame::decode(bytes).context("the gateway sent a bad frame"),
            other => bail!("expected a devgate frame, got {other:?}"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Handshake and HTTP: waiting for the response head.
    Http,
    /// Upgraded: WebSocket messages.
    Open,
}

/// One in-memory TLS client.
pub struct Client {
    tls: ClientConnection,
    side: Option<Side>,
    worker: usize,
    slot: u32,
    stage: Stage,
    /// Ciphertext the gateway wrote, not yet read by rustls.
    from_gateway: Vec<u8>,
    /// Plaintext not yet parsed.
    plain: Vec<u8>,
    decoder: ws::Decoder,
    /// Everything received since the last [`Harness::take`].
    pub received: VecDeque<Received>,
    /// The HTTP status of the response to the upgrade (or other request), once seen.
    pub status: Option<u16>,
    /// The HTTP response (head and body) when it was not a 101.
    pub response: Vec<u8>,
    /// The gateway closed this connection (the socket, not only a WebSocket close).
    pub closed: bool,
    /// The TLS layer failed (the alert or error rustls reported).
    pub tls_error: Option<String>,
    /// Pings the gateway sent (each answered with a pong unless `answer_pings` is off).
    pub pings: usize,
    /// Whether pings are answered.
    pub answer_pings: bool,
    mask: u32,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("side", &self.side)
            .field("worker", &self.worker)
            .field("slot", &self.slot)
            .field("stage", &self.stage)
            .field("status", &self.status)
            .field("closed", &self.closed)
            .finish_non_exhaustive()
    }
}

impl Client {
    fn next_mask(&mut self) -> [u8; 4] {
        // A different mask per frame, as a client should; its value does not matter here.
        self.mask = self
            .mask
            .wrapping_mul(1_664_525)
            .wrapping_add(1_013_904_223);
        self.mask.to_le_bytes()
    }

    /// Reads what the gateway wrote: TLS, then the HTTP head or WebSocket messages.
    fn absorb(&mut self) {
        let mut input = &self.from_gateway[..];
        while !input.is_empty() {
            match self.tls.read_tls(&mut input) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) => {
                    self.tls_error = Some(e.to_string());
                    break;
                }
            }
            if let Err(e) = self.tls.process_new_packets() {
                self.tls_error = Some(e.to_string());
                break;
            }
        }
        self.from_gateway.clear();
        let mut buf = [0u8; 16 * 1024];
        loop {
            match self.tls.reader().read(&mut buf) {
                Ok(0) => break,
                Ok(n) => self.plain.extend_from_slice(&buf[..n]),
                Err(_) => break, // WouldBlock, or close_notify seen: nothing more now
            }
        }
        self.parse();
    }

    fn parse(&mut self) {
        if self.stage == Stage::Http {
            match http::parse_response_head(&self.plain) {
                Ok(Some((status, head_len, _accept, _len))) => {
                    self.status = Some(status);
                    if status == 101 {
                        self.plain.drain(..head_len);
                        self.stage = Stage::Open;
                    } else {
                        self.response.extend_from_slice(&self.plain);
                        self.plain.clear();
                        return;
                    }
                }
                Ok(None) => return,
                Err(_) => {
                    self.response.extend_from_slice(&self.plain);
                    self.plain.clear();
                    return;
                }
            }
        }
        let mut pongs = Vec::new();
        loop {
            let (consumed, got) = match self.decoder.decode(&mut self.plain) {
                Ok(Decoded::Incomplete) => break,
                Ok(Decoded::Frame { consumed, message }) => {
                    let got = match message {
                        None => None,
                        Some(Message::Binary(b)) => Some(Received::Frame(b.to_vec())),
                        Some(Message::Close { code, reason }) => Some(Received::Close {
                            code,
                            reason: reason.to_owned(),
                        }),
                        Some(Message::Ping(p)) => {
                            self.pings += 1;
                            pongs.push(p.to_vec());
                            None
                        }
                        Some(Message::Pong(p)) => Some(Received::Other("pong", p.to_vec())),
                        Some(Message::Text(t)) => Some(Received::Other("text", t.to_vec())),
                    };
                    (consumed, got)
                }
                Err(e) => {
                    self.received.push_back(Received::Other(
                        "protocol error",
                        e.to_string().into_bytes(),
                    ));
                    self.plain.clear();
                    break;
                }
            };
            self.plain.drain(..consumed);
            if let Some(got) = got {
                self.received.push_back(got);
            }
        }
        if self.answer_pings {
            for p in pongs {
                let mut out = Vec::new();
                let mask = self.next_mask();
                ws::encode_frame(&mut out, Opcode::Pong, &p, Some(mask));
                let _ = self.tls.writer().write_all(&out);
            }
        }
    }
}

/// Certificates for harness clients: the gateway's PKI in a data dir.
struct Pki {
    roots: Vec<CertificateDer<'static>>,
    device_ca: ClientCa,
    manager_ca: ClientCa,
}

/// Makes or reuses a PKI in `dir` (`devgate init`).
fn pki(dir: &Path) -> Result<Pki> {
    let paths = PkiPaths::new(dir);
    if !paths.server_cert().exists() {
        devgate_pki::init(
            dir,
            &devgate_pki::InitOptions {
                names: vec!["localhost".into()],
                force: false,
            },
        )?;
    }
    Ok(Pki {
        roots: devgate_pki::load_certs(&paths.root_cert())?,
        device_ca: ClientCa::load(&paths.device_ca_cert(), &paths.device_ca_key())?,
        manager_ca: ClientCa::load(&paths.manager_ca_cert(), &paths.manager_ca_key())?,
    })
}

/// Several workers over one shared state, clients, and a clock (see the module docs).
pub struct Harness {
    shared: Arc<Shared>,
    workers: Vec<Worker>,
    now: Instant,
    clients: Vec<Client>,
    by_slot: HashMap<(usize, u32), ClientId>,
    pki: Pki,
    scratch: Vec<u8>,
    dirty: Vec<u32>,
    released: Vec<u32>,
    hook: fn(&mut dyn FnMut()),
}

impl std::fmt::Debug for Harness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Harness")
            .field("workers", &self.workers.len())
            .field("clients", &self.clients.len())
            .finish_non_exhaustive()
    }
}

fn run_directly(f: &mut dyn FnMut()) {
    f();
}

impl Harness {
    /// `workers` routing workers over a PKI in `dir` (created there if missing), with the
    /// default configuration changed by `configure`.
    pub fn new(dir: &Path, workers: usize, configure: impl FnOnce(&mut Config)) -> Result<Self> {
        let mut config = Config {
            data_dir: dir.to_path_buf(),
            workers,
            ..Config::default()
        };
        configure(&mut config);
        let pki = pki(dir)?;
        let tls = crate::tls::load_with(dir, &config.tls)?;
        // 0 means "from the file limit" to the daemon; the harness has no files to count.
        let max = match usize::try_from(config.limits.max_connections) {
            Ok(0) | Err(_) => 10_000,
            Ok(n) => n,
        };
        let now = Instant::now();
        let shared = Arc::new(Shared::new(
            config.settings(),
            tls,
            workers,
            max,
            Box::new(crate::guard::Unguarded),
            now,
            crate::tls::unix_now(),
        ));
        let workers = (0..workers)
            .map(|i| Worker::new(u16::try_from(i).unwrap_or(u16::MAX), shared.clone(), now))
            .collect();
        Ok(Self {
            shared,
            workers,
            now,
            clients: Vec::new(),
            by_slot: HashMap::new(),
            pki,
            scratch: Vec::with_capacity(64 * 1024),
            dirty: Vec::new(),
            released: Vec::new(),
            hook: run_directly,
        })
    }

    /// Every call into a worker goes through `hook` (the instruction-count workloads
    /// count only what runs inside it).
    pub fn set_hook(&mut self, hook: fn(&mut dyn FnMut())) {
        self.hook = hook;
    }

    /// The state all workers share.
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// The virtual clock.
    pub fn now(&self) -> Instant {
        self.now
    }

    /// Worker `i`.
    pub fn worker(&self, i: usize) -> &Worker {
        &self.workers[i]
    }

    /// Client `id`.
    pub fn client(&self, id: ClientId) -> &Client {
        &self.clients[id]
    }

    /// Client `id`, to change how it behaves (e.g. `answer_pings`).
    pub fn client_mut(&mut self, id: ClientId) -> &mut Client {
        &mut self.clients[id]
    }

    /// A TLS configuration presenting a fresh device certificate for `unit`.
    pub fn device_config(&self, unit: &str) -> Result<Arc<ClientConfig>> {
        let issued = self.pki.device_ca.issue_device(unit)?;
        self.client_config(Some((issued.chain, issued.key)))
    }

    /// A TLS configuration presenting a fresh manager certificate named `name`.
    pub fn manager_config(&self, name: &str) -> Result<Arc<ClientConfig>> {
        let issued = self.pki.manager_ca.issue_manager(name)?;
        self.client_config(Some((issued.chain, issued.key)))
    }

    /// A TLS configuration trusting the gateway's root, with `identity` if given.
    pub fn client_config(
        &self,
        identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    ) -> Result<Arc<ClientConfig>> {
        let mut roots = RootCertStore::empty();
        for root in &self.pki.roots {
            roots.add(root.clone())?;
        }
        let builder = ClientConfig::builder().with_root_certificates(roots);
        let mut config = match identity {
            Some((chain, key)) => builder.with_client_auth_cert(chain, key)?,
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }

    /// A connection from `peer` to worker `worker` with `config`; nothing is sent yet
    /// beyond the ClientHello. `None` when the worker refused it at accept.
    pub fn connect_from(
        &mut self,
        worker: usize,
        peer: SocketAddr,
        config: Arc<ClientConfig>,
    ) -> Result<Option<ClientId>> {
        let now = self.now;
        let w = &mut self.workers[worker];
        let mut slot = None;
        (self.hook)(&mut || slot = w.accept(peer, now));
        let Some(slot) = slot else { return Ok(None) };
        let tls = ClientConnection::new(config, ServerName::try_from("localhost")?)?;
        let id = self.clients.len();
        self.clients.push(Client {
            tls,
            side: None,
            worker,
            slot,
            stage: Stage::Http,
            from_gateway: Vec::new(),
            plain: Vec::new(),
            decoder: ws::Decoder::new(ws::Role::Client, 16 * 1024 * 1024),
            received: VecDeque::new(),
            status: None,
            response: Vec::new(),
            closed: false,
            tls_error: None,
            pings: 0,
            answer_pings: true,
            mask: u32::try_from(id).unwrap_or(0) ^ 0x9e37_79b9,
        });
        self.by_slot.insert((worker, slot), id);
        Ok(Some(id))
    }

    /// A source address of its own for client number `n`.
    fn peer_for(n: usize) -> SocketAddr {
        let n = u32::try_from(n).unwrap_or(u32::MAX);
        let ip = Ipv4Addr::from(0x0a00_0000 | (n & 0x00ff_ffff));
        SocketAddr::new(IpAddr::V4(ip), 40_000)
    }

    /// Opens a WebSocket session as `side` with `config` on worker `worker` and runs until
    /// the gateway answered the upgrade. The client is returned whatever the answer; see
    /// [`Client::status`].
    pub fn open(
        &mut self,
        worker: usize,
        side: Side,
        config: Arc<ClientConfig>,
    ) -> Result<ClientId> {
        let peer = Self::peer_for(self.clients.len());
        let id = self
            .connect_from(worker, peer, config)?
            .context("the worker refused the connection at accept")?;
        self.clients[id].side = Some(side);
        let request = http::upgrade_request("localhost", side.path(), "dGhlIHNhbXBsZSBub25jZQ==");
        self.write_plain(id, &request)?;
        self.run();
        Ok(id)
    }

    /// A device `unit` on worker `worker`, upgraded (an error if the gateway refused it).
    pub fn device(&mut self, unit: &str, worker: usize) -> Result<ClientId> {
        let config = self.device_config(unit)?;
        let id = self.open(worker, Side::Device, config)?;
        self.expect_open(id)
    }

    /// A manager `name` on worker `worker`, upgraded (an error if the gateway refused it).
    pub fn manager(&mut self, name: &str, worker: usize) -> Result<ClientId> {
        let config = self.manager_config(name)?;
        let id = self.open(worker, Side::Manager, config)?;
        self.expect_open(id)
    }

    fn expect_open(&self, id: ClientId) -> Result<ClientId> {
        let c = &self.clients[id];
        match c.status {
            Some(101) => Ok(id),
            other => bail!(
                "upgrade answered {other:?}: {} (TLS: {:?})",
                String::from_utf8_lossy(&c.response),
                c.tls_error
            ),
        }
    }

    /// Queues plaintext on client `id` (sent at the next [`Self::run`]).
    pub fn write_plain(&mut self, id: ClientId, bytes: &[u8]) -> Result<()> {
        self.clients[id]
            .tls
            .writer()
            .write_all(bytes)
            .context("client TLS writer")
    }

    /// Queues a devgate frame on client `id`, masked as a client must.
    pub fn send(&mut self, id: ClientId, f: &Frame<'_>) -> Result<()> {
        let mut out = Vec::new();
        let mask = self.clients[id].next_mask();
        frame::encode_ws(&mut out, f, Some(mask));
        self.write_plain(id, &out)
    }

    /// Queues a WebSocket message of any opcode on client `id`.
    pub fn send_ws(&mut self, id: ClientId, opcode: Opcode, payload: &[u8]) -> Result<()> {
        let mut out = Vec::new();
        let mask = self.clients[id].next_mask();
        ws::encode_frame(&mut out, opcode, payload, Some(mask));
        self.write_plain(id, &out)
    }

    /// Client `id` closes its socket (the driver sees EOF).
    pub fn hang_up(&mut self, id: ClientId) {
        let c = &mut self.clients[id];
        if c.closed {
            return;
        }
        c.closed = true;
        let (worker, slot) = (c.worker, c.slot);
        let now = self.now;
        let w = &mut self.workers[worker];
        (self.hook)(&mut || w.on_eof(slot, now));
        self.run();
    }

    /// Takes what client `id` received so far.
    pub fn take(&mut self, id: ClientId) -> Vec<Received> {
        self.clients[id].received.drain(..).collect()
    }

    /// Moves the clock by `d` and runs until nothing moves.
    pub fn advance(&mut self, d: Duration) {
        self.now += d;
        self.run();
    }

    /// Moves the clock in steps of `step` for `total`, running after each step (timers fire
    /// in the order a real loop would see them).
    pub fn advance_by_steps(&mut self, total: Duration, step: Duration) {
        let mut left = total;
        while !left.is_zero() {
            let d = step.min(left);
            self.advance(d);
            left -= d;
        }
    }

    /// Client → gateway: hands client `id`'s pending TLS bytes to its worker. Returns
    /// whether there were any.
    pub fn feed(&mut self, id: ClientId) -> bool {
        let c = &mut self.clients[id];
        if c.closed {
            return false;
        }
        self.scratch.clear();
        while c.tls.wants_write() {
            if c.tls.write_tls(&mut self.scratch).is_err() {
                break;
            }
        }
        if self.scratch.is_empty() {
            return false;
        }
        let (worker, slot) = (c.worker, c.slot);
        let now = self.now;
        let w = &mut self.workers[worker];
        let data = &self.scratch;
        (self.hook)(&mut || w.on_received(slot, data, now));
        true
    }

    /// Runs worker `i`'s inbox and local queue. Returns the number of messages.
    pub fn deliver(&mut self, i: usize) -> usize {
        let now = self.now;
        let w = &mut self.workers[i];
        let mut n = 0;
        (self.hook)(&mut || n = w.poll_inbox(now));
        n
    }

    /// Gateway → clients: writes worker `i`'s queued output into its clients' buffers
    /// (not yet read by them; see [`Self::absorb_all`]) and closes what it released.
    /// Returns whether anything was written or closed.
    pub fn flush(&mut self, i: usize) -> bool {
        self.flush_skipping(i, &[])
    }

    /// [`Self::flush`], leaving the output for the clients in `stalled` queued in the
    /// worker (released connections get their last flush all the same).
    fn flush_skipping(&mut self, i: usize, stalled: &[ClientId]) -> bool {
        let mut dirty = std::mem::take(&mut self.dirty);
        let mut released = std::mem::take(&mut self.released);
        let w = &mut self.workers[i];
        let clients = &mut self.clients;
        let by_slot = &self.by_slot;
        let mut moved = false;
        (self.hook)(&mut || {
            w.take_dirty(&mut dirty);
            for &slot in &dirty {
                if let Some(&id) = by_slot.get(&(i, slot))
                    && !stalled.contains(&id)
                {
                    let before = clients[id].from_gateway.len();
                    let _ = w.flush_to(slot, &mut clients[id].from_gateway);
                    moved |= clients[id].from_gateway.len() > before;
                }
            }
            w.take_released(&mut released);
            for &slot in &released {
                if let Some(&id) = by_slot.get(&(i, slot)) {
                    let _ = w.flush_to(slot, &mut clients[id].from_gateway);
                    clients[id].closed = true;
                }
                w.release(slot);
                moved = true;
            }
        });
        for &slot in &released {
            self.by_slot.remove(&(i, slot));
        }
        self.dirty = dirty;
        self.released = released;
        moved
    }

    /// Every client reads what the gateway wrote to it.
    pub fn absorb_all(&mut self) {
        for c in &mut self.clients {
            if !c.from_gateway.is_empty() {
                c.absorb();
            }
        }
    }

    /// Client `id` reads what the gateway wrote to it.
    pub fn absorb(&mut self, id: ClientId) {
        self.clients[id].absorb();
    }

    /// Runs loop turns until nothing moves: clients' bytes in, inboxes, timers, output
    /// out, clients read. Bounded: a livelock is a bug the caller sees as a failed
    /// expectation, not a hang.
    pub fn run(&mut self) {
        self.run_stalled(&[]);
    }
}

// ===== Slow readers ======================================================================
//
// Added for the routing tests of queue limits (gateway/tests/routing_limits.rs): a client
// that stops reading. [`Harness::run`] hands every byte a worker queued to its client at
// once, so a queue never fills there; these run the same loop but leave what a worker
// queued for the stalled clients where it is, as a socket whose send buffer is full does.

impl Harness {
    /// Runs like [`Self::run`], except that the clients in `stalled` read nothing: the
    /// gateway's queues towards them keep growing, up to their limits. A connection the
    /// gateway closes still gets its last flush (so its close frame can be checked).
    pub fn run_stalled(&mut self, stalled: &[ClientId]) {
        for _ in 0..10_000 {
            let mut moved = false;
            for id in 0..self.clients.len() {
                moved |= self.feed(id);
            }
            for i in 0..self.workers.len() {
                moved |= self.deliver(i) > 0;
                let now = self.now;
                let w = &mut self.workers[i];
                (self.hook)(&mut || {
                    w.tick(now);
                });
                moved |= self.flush_skipping(i, stalled);
            }
            self.absorb_all();
            if !moved
                && !self
                    .clients
                    .iter()
                    .any(|c| !c.closed && c.tls.wants_write())
            {
                return;
            }
        }
    }

    /// Client `id` reads again: everything its worker queued for it is flushed, then the
    /// harness runs as usual.
    pub fn resume(&mut self, id: ClientId) {
        let (i, slot) = (self.clients[id].worker, self.clients[id].slot);
        if self.by_slot.get(&(i, slot)) == Some(&id) {
            let w = &mut self.workers[i];
            let sink = &mut self.clients[id].from_gateway;
            (self.hook)(&mut || {
                let _ = w.flush_to(slot, sink);
            });
        }
        self.absorb(id);
        self.run();
    }
}
