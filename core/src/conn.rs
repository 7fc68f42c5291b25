//! One connection's state as its worker holds it: TLS, the phase (handshake, WebSocket
//! session, closing), the outbound queue and the routing tables of its session.
//!
//! Memory matters here: tens of thousands of these sit idle. Everything that grows does so
//! only while there is traffic: the inbound buffer holds only a partial frame and is freed
//! when empty, the queue is a `VecDeque` that allocates nothing while empty, and the
//! per-session tables are `HashMap`s that allocate nothing until first use.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use devgate_proto::ws;

use crate::handle::ConnHandle;
use crate::msg::Priority;

/// A connection owned by a worker.
pub struct Conn {
    /// This connection's handle (worker, slot, generation).
    pub handle: ConnHandle,
    /// Remote address.
    pub peer: SocketAddr,
    /// TLS state: rustls (fed bytes by the worker; owns no buffer while idle) or, once
    /// handed over, the kernel.
    pub tls: Tls,
    /// Plaintext received but not yet consumed (a partial HTTP head or WebSocket frame).
    pub inbuf: Vec<u8>,
    /// Frames waiting to be encrypted and sent.
    pub out: OutQueue,
    /// Where the connection is in its life.
    pub phase: Phase,
    /// Last time any byte arrived.
    pub last_rx: Instant,
    /// When the last unanswered keep-alive ping was sent.
    pub ping_sent: Option<Instant>,
    /// Handshake (TLS + HTTP head) deadline.
    pub handshake_deadline: Instant,
    /// When the TCP connection was accepted.
    pub accepted_at: Instant,
    /// In the worker's dirty list already.
    pub dirty: bool,
    /// Send TLS close_notify once the queue has drained (the connection is closing).
    pub notify_on_drain: bool,
    /// Hand the record layer to the kernel once the session is upgraded and idle.
    pub offload_wanted: bool,
    /// In the worker's fd-work list already.
    pub fd_queued: bool,
    /// Who the peer turned out to be (kept outside `phase`, which the router briefly
    /// empties while it works on a session).
    pub kind: PeerKind,
    /// A handshake worker is handing this connection to a routing worker: nothing more is
    /// read or parsed here (the request head waits in `inbuf` for the new owner).
    pub leaving: bool,
    /// A connection from a load balancer whose PROXY header has not been taken yet:
    /// `peer` is still the balancer's address, and the source limits have not counted it.
    pub proxy: Option<Box<crate::proxy_proto::HeaderWait>>,
}

/// Where a connection's TLS records are sealed and opened.
pub enum Tls {
    /// rustls in user space.
    User(Box<crate::tls_conn::TlsConn>),
    /// The kernel (kTLS); rustls keeps only what a KeyUpdate needs.
    Kernel(Box<KernelTls>),
    /// rustls gave the session up but the kernel did not take it: the connection closes.
    Gone,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::User(t) => t.fmt(f),
            Self::Kernel(_) => f.write_str("Kernel"),
            Self::Gone => f.write_str("Gone"),
        }
    }
}

impl std::fmt::Debug for KernelTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelTls")
            .field("close_notify_pending", &self.close_notify_pending)
            .finish_non_exhaustive()
    }
}

impl Tls {
    /// Whether the handshake is still under way.
    pub fn is_handshaking(&self) -> bool {
        matches!(self, Self::User(t) if t.is_handshaking())
    }
}

/// A session whose records the kernel seals and opens.
pub struct KernelTls {
    /// Derives the next traffic keys on a TLS 1.3 KeyUpdate.
    pub conn: rustls::kernel::KernelConnection<rustls::server::ServerConnectionData>,
    /// Send close_notify (an alert record through a control message) at the next fd work.
    pub close_notify_pending: bool,
}

/// Who is on the other end of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerKind {
    /// Not (yet) upgraded to a session.
    Unknown,
    /// A device session.
    Device,
    /// A manager session.
    Manager,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("handle", &self.handle)
            .field("peer", &self.peer)
            .field("phase", &self.phase.name())
            .field("kind", &self.kind)
            .field("queued", &self.out.bytes)
            .finish_non_exhaustive()
    }
}

/// Life cycle of a connection.
#[derive(Debug)]
pub enum Phase {
    /// TLS handshake and HTTP request head.
    Handshake,
    /// An HTTP request (enrollment, pairing) is with the control plane; its answer comes
    /// back as a message.
    Waiting,
    /// An upgraded WebSocket session.
    Session(Box<Session>),
    /// Closed logically; the driver drops the socket once the last bytes are out.
    Closing,
}

impl Phase {
    /// Short name for logs.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Handshake => "handshake",
            Self::Waiting => "waiting",
            Self::Session(s) => match s.role {
                Role::Device(_) => "device",
                Role::Manager(_) => "manager",
            },
            Self::Closing => "closing",
        }
    }
}

/// A WebSocket session.
#[derive(Debug)]
pub struct Session {
    /// WebSocket frame decoder (holds a reassembly buffer only mid-message).
    pub decoder: ws::Decoder,
    /// Who is on the other end.
    pub role: Role,
}

/// The authenticated peer of a session.
#[derive(Debug)]
pub enum Role {
    /// An endpoint device.
    Device(DeviceSession),
    /// A management server.
    Manager(ManagerSession),
}

/// Routing state a device's connection keeps.
#[derive(Debug)]
pub struct DeviceSession {
    /// The unit ID (shared with the session map key).
    pub unit: Arc<str>,
    /// Next request id handed to the device.
    pub next_request_id: u32,
    /// Device-side request id → who asked.
    pub pending: HashMap<u32, Pending>,
    /// Next stream id handed to the device.
    pub next_stream_id: u32,
    /// Device-side stream id → the manager end.
    pub streams: HashMap<u32, DeviceStream>,
    /// (manager, manager's stream id) → device-side stream id.
    pub streams_by_manager: HashMap<(ConnHandle, u32), u32>,
    /// The trust generation whose bundle this device acknowledged (0: none).
    pub trust_acked: u64,
}

impl DeviceSession {
    /// A fresh session for `unit`.
    pub fn new(unit: Arc<str>) -> Self {
        Self {
            unit,
            next_request_id: 1,
            pending: HashMap::new(),
            next_stream_id: 1,
            streams: HashMap::new(),
            streams_by_manager: HashMap::new(),
            trust_acked: 0,
        }
    }

    /// Allocates an id not in use in `table`; ids wrap and skip 0.
    pub fn allocate_id<V>(next: &mut u32, table: &HashMap<u32, V>) -> u32 {
        loop {
            let id = *next;
            *next = next.wrapping_add(1).max(1);
            if id != 0 && !table.contains_key(&id) {
                return id;
            }
        }
    }
}

/// A command forwarded to a device and not yet answered.
#[derive(Debug, Clone)]
pub struct Pending {
    /// The manager that asked.
    pub manager: ConnHandle,
    /// The manager's own request id.
    pub request_id: u32,
    /// When the command was queued to the device.
    pub sent_at: Instant,
    /// When the request fails with `request_timeout`.
    pub deadline: Instant,
}

/// The device end of a stream.
#[derive(Debug, Clone)]
pub struct DeviceStream {
    /// The manager at the other end.
    pub manager: ConnHandle,
    /// The manager's stream id.
    pub manager_stream_id: u32,
    /// Bytes the device may still send towards the manager.
    pub credit_to_manager: u32,
}

/// Routing state a manager's connection keeps.
#[derive(Debug)]
pub struct ManagerSession {
    /// Name from the manager's certificate.
    pub name: Box<str>,
    /// Manager's stream id → the device end.
    pub streams: HashMap<u32, ManagerStream>,
    /// The trust generation whose bundle this manager acknowledged (0: none).
    pub trust_acked: u64,
}

/// The manager end of a stream.
#[derive(Debug, Clone)]
pub struct ManagerStream {
    /// The device's connection.
    pub device: ConnHandle,
    /// The device's unit ID.
    pub unit: Arc<str>,
    /// Bytes the manager may still send towards the device.
    pub credit_to_device: u32,
}

/// Frames waiting to be encrypted, bounded in bytes.
#[derive(Debug, Default)]
pub struct OutQueue {
    frames: VecDeque<Bytes>,
    /// Bytes queued.
    pub bytes: usize,
}

/// Why a frame was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueRefusal {
    /// Over the soft limit; the frame was droppable.
    Full,
    /// Over the hard limit: the reader is too slow and must be disconnected.
    Overflow,
}

impl OutQueue {
    /// Queues a frame under the soft limit (droppable frames) or the hard limit.
    pub fn push(
        &mut self,
        frame: Bytes,
        priority: Priority,
        soft: usize,
        hard: usize,
    ) -> Result<(), QueueRefusal> {
        let after = self.bytes + frame.len();
        if after > hard {
            return Err(QueueRefusal::Overflow);
        }
        if priority == Priority::Droppable && after > soft {
            return Err(QueueRefusal::Full);
        }
        self.bytes = after;
        self.frames.push_back(frame);
        Ok(())
    }

    /// Puts back the unsent tail of a frame (a short write), ahead of everything else.
    pub fn push_front(&mut self, rest: Bytes) {
        self.bytes += rest.len();
        self.frames.push_front(rest);
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// Copies queued frames into `buf` until it would pass `max` bytes (at least one
    /// frame is taken). Small frames are coalesced so that many share one TLS record.
    pub fn drain_into(&mut self, buf: &mut Vec<u8>, max: usize) {
        while let Some(front) = self.frames.front() {
            if !buf.is_empty() && buf.len() + front.len() > max {
                break;
            }
            buf.extend_from_slice(front);
            self.bytes -= front.len();
            self.frames.pop_front();
        }
        if self.frames.is_empty() && self.frames.capacity() > 16 {
            // A burst grew the ring; an idle connection should not keep it.
            self.frames = VecDeque::new();
        }
    }
}

/// A connection on its way from a handshake worker to a routing worker (see
/// `Worker::detach`, `Worker::adopt`).
#[derive(Debug)]
pub struct Detached {
    /// The connection as the handshake worker left it.
    pub conn: Box<Conn>,
    /// Whether it still counts as unauthenticated (`shared.unauthenticated`).
    pub unauthenticated: bool,
}
