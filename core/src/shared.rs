//! State shared by all data-path workers and the control plane: the session map, the
//! manager list, the per-worker inboxes and the counters.
//!
//! Each connection is owned by exactly one worker; nothing here holds a connection.
//! Workers find each other's connections through [`ConnHandle`]s and reach them by pushing
//! a [`Msg`] into the owner's [`Inbox`].

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering, fence};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use crossbeam_queue::ArrayQueue;
use crossbeam_utils::CachePadded;
use dashmap::DashMap;

use crate::guard::Guard;
use crate::msg::Msg;
use crate::settings::Settings;
use crate::stats::{WorkerLatencies, WorkerStats};
use crate::tls_material::TlsMaterial;

pub use crate::handle::ConnHandle;

/// Wakes a worker that sleeps in its driver's wait call (an eventfd or mio waker).
pub trait Wake: Send + Sync {
    /// Interrupts the worker's wait; must be cheap and callable from any thread.
    fn wake(&self);
}

/// The I/O driver in use, for status and metrics.
#[derive(Debug, Clone)]
pub struct DataPath {
    /// `io_uring` or `epoll`.
    pub name: &'static str,
    /// Why epoll runs although io_uring was wanted (`auto`), if it does.
    pub reason: Option<String>,
}

impl Default for DataPath {
    fn default() -> Self {
        Self {
            name: "epoll",
            reason: None,
        }
    }
}

/// A worker's bounded, lock-free inbox.
///
/// Wake-ups are batched: a sender only wakes the worker if it announced that it is about
/// to sleep, so a burst of messages costs one wake-up (~25–30 µs across vCPUs here).
pub struct Inbox {
    queue: ArrayQueue<Msg>,
    asleep: AtomicBool,
    waker: OnceLock<Box<dyn Wake>>,
}

impl std::fmt::Debug for Inbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inbox")
            .field("len", &self.queue.len())
            .field("asleep", &self.asleep.load(Ordering::Relaxed))
            .finish()
    }
}

impl Inbox {
    fn new(capacity: usize) -> Self {
        Self {
            queue: ArrayQueue::new(capacity),
            asleep: AtomicBool::new(false),
            waker: OnceLock::new(),
        }
    }

    /// Installs the driver's waker; called once when the worker starts.
    pub fn set_waker(&self, waker: Box<dyn Wake>) {
        let _ = self.waker.set(waker);
    }

    /// Queues a message; gives it back if the inbox is full.
    pub fn push(&self, msg: Msg) -> Result<(), Msg> {
        self.queue.push(msg)?;
        // Pairs with the fence in `prepare_sleep`: either the worker sees the message
        // when it re-checks, or we see its `asleep` flag and wake it.
        fence(Ordering::SeqCst);
        if self.asleep.load(Ordering::Relaxed)
            && self.asleep.swap(false, Ordering::AcqRel)
            && let Some(w) = self.waker.get()
        {
            w.wake();
        }
        Ok(())
    }

    /// Wakes the worker whether or not it announced sleep (shutdown, reload).
    pub fn wake_now(&self) {
        self.asleep.store(false, Ordering::Relaxed);
        if let Some(w) = self.waker.get() {
            w.wake();
        }
    }

    /// Takes the next message.
    pub fn pop(&self) -> Option<Msg> {
        self.queue.pop()
    }

    /// Announces that the worker is about to wait; returns false if messages arrived
    /// meanwhile, in which case the worker must not block.
    pub fn prepare_sleep(&self) -> bool {
        self.asleep.store(true, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        if self.queue.is_empty() {
            true
        } else {
            self.asleep.store(false, Ordering::Relaxed);
            false
        }
    }

    /// Called after the wait returns.
    pub fn woke(&self) {
        self.asleep.store(false, Ordering::Relaxed);
    }
}

/// What the public `/usg/check-status` reports (ICG-compatible).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckStatus {
    /// Starting up: workers not all ready, or waiting for managers to reconnect.
    Init,
    /// Serving with at least one manager.
    Ok,
    /// No manager connected.
    Warn,
    /// No valid certificate, or start-up took longer than 30 s.
    Err,
}

impl CheckStatus {
    /// The JSON value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Init => "init",
            Self::Ok => "ok",
            Self::Warn => "warn",
            Self::Err => "err",
        }
    }
}

/// Start-up longer than this turns `init` into `err` (as the ICG does).
const INIT_DEADLINE: Duration = Duration::from_secs(30);
const NEVER: u64 = u64::MAX;

/// State shared by all workers and the control plane.
pub struct Shared {
    /// Effective configuration.
    pub config: Settings,
    /// This instance's id (`instance_id`, else host name and public port; set at start).
    pub instance_id: String,
    /// Devices connected to the other instances of the fleet, as last read from the store
    /// (`device_limit_scope = "fleet"`; 0 otherwise).
    pub fleet_devices_elsewhere: AtomicU64,
    /// Balancer networks whose connections start with a PROXY header
    /// (`proxy_protocol_from`, checked by `Config::validate`).
    pub proxy_from: crate::proxy_proto::Networks,
    /// Which I/O driver runs the data path, and why not io_uring if it does not.
    pub data_path: DataPath,
    /// Whether records are sealed by the kernel (kTLS) or rustls, and why.
    pub tls_offload: crate::kernel_tls::TlsOffload,
    /// TLS configuration and certificate facts (swapped whole on reload).
    pub tls: ArcSwap<TlsMaterial>,
    /// The session map: unit ID → the connection that currently owns it.
    pub devices: DashMap<Arc<str>, ConnHandle>,
    /// Connected managers (few; read on every event, written on connect/disconnect).
    pub managers: ArcSwap<Vec<ConnHandle>>,
    managers_write: Mutex<()>,
    /// One inbox per worker, indexed by worker id.
    pub inboxes: Box<[Inbox]>,
    /// Per-worker counters (cache-padded: each worker writes only its own).
    pub stats: Box<[CachePadded<WorkerStats>]>,
    /// Per-worker latency histograms.
    pub latencies: Box<[CachePadded<WorkerLatencies>]>,
    /// Devices currently connected (the limit is checked against this).
    pub device_count: AtomicUsize,
    /// Current device limit (0 = unlimited); managers may change it at run time.
    pub device_limit: AtomicU64,
    /// Open connections of any kind.
    pub connection_count: AtomicUsize,
    /// Upper bound on `connection_count`.
    pub max_connections: usize,
    /// Workers that have started their loop.
    pub workers_ready: AtomicUsize,
    /// Set once on shutdown; workers close their connections and stop.
    pub shutting_down: AtomicBool,
    /// When the gateway started.
    pub started: Instant,
    /// The wall clock (unix seconds) at `started`, for certificate validity and the
    /// renewal overlap ([`crate::identity::unix_at`]).
    pub wall_clock: (Instant, i64),
    /// Whether the server certificate is within its validity dates; the daemon checks it
    /// against the wall clock every second (check-status says `err` when it is not).
    pub server_cert_valid: AtomicBool,
    /// Milliseconds after `started` since when no manager is connected, or `NEVER`.
    no_manager_since_ms: AtomicU64,
    /// Whether any manager has connected since start.
    manager_seen: AtomicBool,
    /// Admission of new connections (XDP or user space).
    pub guard: Box<dyn Guard>,
    /// Unauthenticated connections per source and in total (limited by default).
    pub unauthenticated: crate::unauth::Unauthenticated,
    /// Per worker: milliseconds after `started` of its last loop turn (the watchdog's
    /// proof that the data path is alive).
    pub heartbeats: Box<[AtomicU64]>,
    /// Whether the guard was last told to accept new connections. A mutex, not an
    /// atomic: the guard must be told the changes in the order they happened.
    accepting: Mutex<bool>,
    /// Units whose credentials are revoked (mirrored from the store's revocation log).
    pub revoked: DashMap<Arc<str>, ()>,
    /// Which certificates are accepted per unit and manager, and revoked certificates
    /// (mirrored from the store; see [`crate::identity`]).
    pub identity: crate::identity::Identity,
    /// Jobs for the control plane's store thread.
    pub jobs: OnceLock<std::sync::mpsc::SyncSender<crate::store_jobs::Job>>,
    /// The trust bundle devices and managers are sent during a root exchange.
    pub trust_bundle: arc_swap::ArcSwapOption<TrustBundle>,
    /// Bumped whenever `trust_bundle` changes; workers resend it to their peers.
    pub trust_generation: AtomicU64,
    /// How far the root exchange has got (acknowledgements in the store), refreshed by the
    /// store thread about once a second while a bundle is loaded.
    pub trust_progress: arc_swap::ArcSwapOption<TrustProgress>,
    /// Workers `0..routing_workers` hold sessions; the rest (if any) are handshake
    /// workers, which accept, run TLS handshakes and HTTP requests, and hand each
    /// connection that asks for a WebSocket session to a routing worker ([`Handover`]).
    pub routing_workers: usize,
    /// Per worker: connections handed to it by a handshake worker, for its driver to
    /// register and its worker to adopt.
    pub handovers: Box<[Mutex<Vec<Handover>>]>,
    /// Round robin over the routing workers for handovers.
    next_router: AtomicUsize,
    /// Times freed memory was given back to the OS (`ops::memory`).
    pub memory_trims: AtomicU64,
}

/// A connection on its way from a handshake worker to a routing worker: the socket and
/// everything the sans-IO core knows about it (TLS state, unread plaintext, queued bytes).
pub struct Handover {
    /// The socket (an ordinary descriptor; the receiving driver registers it).
    pub fd: std::os::fd::OwnedFd,
    /// The connection as the handshake worker left it.
    pub conn: crate::conn::Detached,
}

impl std::fmt::Debug for Handover {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handover")
            .field("fd", &self.fd)
            .field("peer", &self.conn.conn.peer)
            .finish()
    }
}

/// A loaded trust bundle: the ready-encoded Control frame and its id (which peers echo
/// in their acknowledgement, see docs/PROTOCOL.md section 8a).
#[derive(Debug)]
pub struct TrustBundle {
    /// The Control frame `{"op":"trust_bundle","bundle":id,"roots":[…]}`, WebSocket-framed.
    pub frame: bytes::Bytes,
    /// `devgate_pki::bundle_id` of the roots.
    pub id: Box<str>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("devices", &self.device_count.load(Ordering::Relaxed))
            .field("managers", &self.managers.load().len())
            .finish_non_exhaustive()
    }
}

/// Capacity of each worker's inbox, in messages.
const INBOX_CAPACITY: usize = 32 * 1024;

impl Shared {
    /// Hands a job to the store thread; false if it is overloaded (the caller answers
    /// 503) or not running.
    pub fn submit(&self, job: crate::store_jobs::Job) -> bool {
        match self.jobs.get() {
            Some(tx) => tx.try_send(job).is_ok(),
            None => false,
        }
    }

    /// Creates the shared state for `workers` workers.
    /// `started` and `unix_at_start` are the clocks' readings at start, taken by the daemon
    /// (the core never reads a clock; see [`Self::wall_clock`]).
    pub fn new(
        config: Settings,
        tls: TlsMaterial,
        workers: usize,
        max_connections: usize,
        guard: Box<dyn Guard>,
        started: Instant,
        unix_at_start: i64,
    ) -> Self {
        let device_limit = config.limits.device_limit;
        let identity = crate::identity::Identity::new(config.credentials.require_registered);
        let unauthenticated =
            crate::unauth::Unauthenticated::new(config.limits.max_handshakes_per_source);
        let proxy_from =
            crate::proxy_proto::Networks::parse(&config.proxy_protocol_from).unwrap_or_default();
        Self {
            instance_id: String::new(),
            fleet_devices_elsewhere: AtomicU64::new(0),
            proxy_from,
            config,
            data_path: DataPath::default(),
            tls_offload: crate::kernel_tls::TlsOffload::default(),
            tls: ArcSwap::from_pointee(tls),
            devices: DashMap::new(),
            managers: ArcSwap::from_pointee(Vec::new()),
            managers_write: Mutex::new(()),
            inboxes: (0..workers).map(|_| Inbox::new(INBOX_CAPACITY)).collect(),
            stats: (0..workers)
                .map(|_| CachePadded::new(WorkerStats::default()))
                .collect(),
            latencies: (0..workers)
                .map(|_| CachePadded::new(WorkerLatencies::default()))
                .collect(),
            device_count: AtomicUsize::new(0),
            device_limit: AtomicU64::new(device_limit),
            connection_count: AtomicUsize::new(0),
            max_connections,
            workers_ready: AtomicUsize::new(0),
            shutting_down: AtomicBool::new(false),
            started,
            wall_clock: (started, unix_at_start),
            server_cert_valid: AtomicBool::new(true),
            no_manager_since_ms: AtomicU64::new(0),
            manager_seen: AtomicBool::new(false),
            guard,
            unauthenticated,
            heartbeats: (0..workers).map(|_| AtomicU64::new(0)).collect(),
            accepting: Mutex::new(true),
            revoked: DashMap::new(),
            identity,
            jobs: OnceLock::new(),
            trust_bundle: arc_swap::ArcSwapOption::empty(),
            trust_generation: AtomicU64::new(0),
            trust_progress: arc_swap::ArcSwapOption::empty(),
            routing_workers: workers,
            handovers: (0..workers).map(|_| Mutex::new(Vec::new())).collect(),
            next_router: AtomicUsize::new(0),
            memory_trims: AtomicU64::new(0),
        }
    }

    /// Whether handshakes run on their own workers (see [`Shared::routing_workers`]).
    pub fn has_handshake_workers(&self) -> bool {
        self.routing_workers < self.worker_count()
    }

    /// Hands a connection to the next routing worker and wakes it. Returns the
    /// connection if the receiving worker's queue is poisoned (a panicked worker; the
    /// process is exiting anyway).
    pub fn hand_over(&self, handover: Handover) -> Result<(), Handover> {
        let routers = self.routing_workers.max(1);
        let to = self.next_router.fetch_add(1, Ordering::Relaxed) % routers;
        let Some(queue) = self.handovers.get(to) else {
            return Err(handover);
        };
        match queue.lock() {
            Ok(mut q) => q.push(handover),
            Err(_) => return Err(handover),
        }
        self.inboxes[to].wake_now();
        Ok(())
    }

    /// Connections handed to worker `id` since the last call.
    pub fn take_handovers(&self, id: u16, into: &mut Vec<Handover>) {
        if let Some(queue) = self.handovers.get(usize::from(id))
            && let Ok(mut q) = queue.lock()
        {
            into.append(&mut q);
        }
    }

    /// Records that worker `id` completed a loop turn at `now`.
    pub fn heartbeat(&self, id: u16, now: Instant) {
        if let Some(h) = self.heartbeats.get(usize::from(id)) {
            h.store(self.ms_since_start(now), Ordering::Relaxed);
        }
    }

    /// The oldest worker heartbeat's age: the data path is alive if this is small.
    pub fn oldest_heartbeat_age(&self, now: Instant) -> Duration {
        let now_ms = self.ms_since_start(now);
        let oldest = self
            .heartbeats
            .iter()
            .map(|h| h.load(Ordering::Relaxed))
            .min()
            .unwrap_or(now_ms);
        Duration::from_millis(now_ms.saturating_sub(oldest))
    }

    /// Tells the guard whether new connections are admitted, on every change of
    /// "device limit reached".
    pub fn refresh_accepting(&self) {
        let mut last = self
            .accepting
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Read under the lock: the last caller sees the last count and tells the guard.
        let elsewhere = self.fleet_devices_elsewhere.load(Ordering::Relaxed);
        let at_limit = self.device_limit().is_some_and(|limit| {
            (self.device_count.load(Ordering::Acquire) as u64).saturating_add(elsewhere) >= limit
        });
        let accepting = !at_limit;
        if *last != accepting {
            *last = accepting;
            self.guard.set_accepting(accepting);
        }
    }

    /// Number of workers.
    pub fn worker_count(&self) -> usize {
        self.inboxes.len()
    }

    fn ms_since_start(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.started).as_millis()).unwrap_or(NEVER - 1)
    }

    /// Registers a manager connection.
    pub fn add_manager(&self, handle: ConnHandle) {
        let _guard = self
            .managers_write
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut list = Vec::clone(&self.managers.load());
        list.push(handle);
        self.managers.store(Arc::new(list));
        self.no_manager_since_ms.store(NEVER, Ordering::Release);
        self.manager_seen.store(true, Ordering::Release);
    }

    /// Removes a manager connection; starts the grace period when it was the last one.
    pub fn remove_manager(&self, handle: ConnHandle, now: Instant) {
        let _guard = self
            .managers_write
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut list = Vec::clone(&self.managers.load());
        list.retain(|h| *h != handle);
        self.identity.manager_disconnected(handle);
        if list.is_empty() {
            self.no_manager_since_ms
                .store(self.ms_since_start(now), Ordering::Release);
        }
        self.managers.store(Arc::new(list));
    }

    /// Connected managers.
    pub fn manager_count(&self) -> usize {
        self.managers.load().len()
    }

    /// How long no manager has been connected, if none is.
    pub fn without_manager_for(&self, now: Instant) -> Option<Duration> {
        let since = self.no_manager_since_ms.load(Ordering::Acquire);
        if since == NEVER {
            return None;
        }
        Some(Duration::from_millis(
            self.ms_since_start(now).saturating_sub(since),
        ))
    }

    /// True once the no-manager grace period has run out: devices are disconnected and
    /// refused until a manager connects.
    pub fn devices_refused(&self, now: Instant) -> bool {
        self.without_manager_for(now)
            .is_some_and(|d| d >= Duration::from_secs(self.config.managers.grace_secs))
    }

    /// The current device limit, `None` if unlimited.
    pub fn device_limit(&self) -> Option<u64> {
        match self.device_limit.load(Ordering::Relaxed) {
            0 => None,
            n => Some(n),
        }
    }

    /// Reserves a device slot under the limit; false if the limit is reached.
    pub fn reserve_device(&self) -> bool {
        let before = self.device_count.fetch_add(1, Ordering::AcqRel);
        // In fleet scope the other instances' devices count too, as of the last exchange
        // through the store (at most about two seconds old).
        let elsewhere = self.fleet_devices_elsewhere.load(Ordering::Relaxed);
        match self.device_limit() {
            Some(limit) if (before as u64).saturating_add(elsewhere) >= limit => {
                self.device_count.fetch_sub(1, Ordering::AcqRel);
                false
            }
            _ => {
                self.refresh_accepting();
                true
            }
        }
    }

    /// Gives a device slot back.
    pub fn release_device(&self) {
        self.device_count.fetch_sub(1, Ordering::AcqRel);
        self.refresh_accepting();
    }

    /// What `/usg/check-status` says now.
    pub fn check_status(&self, now: Instant) -> CheckStatus {
        if !self.server_cert_valid.load(Ordering::Relaxed) {
            return CheckStatus::Err;
        }
        let age = now.saturating_duration_since(self.started);
        let ready = self.workers_ready.load(Ordering::Acquire) >= self.worker_count();
        if !ready {
            return if age > INIT_DEADLINE {
                CheckStatus::Err
            } else {
                CheckStatus::Init
            };
        }
        if self.manager_count() > 0 {
            return CheckStatus::Ok;
        }
        let waiting_for_first_manager = !self.manager_seen.load(Ordering::Acquire)
            && age < Duration::from_secs(self.config.managers.startup_wait_secs);
        if waiting_for_first_manager {
            CheckStatus::Init
        } else {
            CheckStatus::Warn
        }
    }
}

/// How far a root exchange has got: who acknowledged the trust bundle.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct TrustProgress {
    /// The bundle id.
    pub bundle: String,
    /// Enrolled, unrevoked devices that acknowledged it.
    pub devices_acked: u64,
    /// Enrolled, unrevoked devices (the registry).
    pub devices_total: u64,
    /// Managers (by certificate name) that acknowledged it.
    pub managers_acked: Vec<String>,
}
