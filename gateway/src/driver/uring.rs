//! The io_uring driver: one ring per worker thread, running the same sans-IO
//! [`Worker`] as the epoll driver.
//!
//! What it uses io_uring for, and why:
//! - **Multishot accept** on the worker's own `SO_REUSEPORT` listener: one submission
//!   accepts until the kernel says otherwise.
//! - **Direct descriptors**: an accepted socket is moved into the ring's file table at
//!   the index of its worker slot and its process fd is closed at once. All threads of a
//!   process share one `RLIMIT_NOFILE`, but each ring's table holds up to that many
//!   sockets, so one gateway holds `workers × RLIMIT_NOFILE` connections.
//! - **Multishot recv with a provided buffer ring**: one submission per connection for
//!   its whole life, and the kernel picks a buffer only when bytes arrive, so an idle
//!   connection owns no read buffer. Buffers go back to the ring as soon as the worker has
//!   consumed them (it copies what it keeps).
//! - **Batched submissions**: everything a loop turn wants (sends, re-arms, closes) goes
//!   out in the one `io_uring_enter` that also waits for the next completions.
//!
//! A connection's send buffer exists only while a send is in flight; it comes from a
//! small per-worker pool. Closing waits for the connection's in-flight operations to
//! complete before the slot (and with it the file-table index) is reused, so a late
//! completion can never be taken for another connection's.

use std::io::{self, Write};
use std::net::TcpListener as StdListener;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, IntoRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

use io_uring::types::{BufRingEntry, Fd, Fixed, SubmitArgs, Timespec};
use io_uring::{IoUring, Probe, cqueue, opcode, squeue};
use tracing::debug;

use crate::ktls::FdSocket;
use crate::shared::{Handover, Wake};
use crate::worker::{Flush, Worker};

/// Submission queue entries; the completion queue is four times larger.
const RING_ENTRIES: u32 = 4096;
/// Buffer group id of the receive buffer ring.
const RECV_GROUP: u16 = 0;
/// Receive buffers in the ring (a power of two) and their size: 256 × 8 KiB = 2 MiB per
/// worker, shared by all its connections. The kernel hands them out in ring order, so
/// all of them get touched under traffic; more would only cost memory (a batch that
/// needs more re-arms after `ENOBUFS`), larger ones only help bulk streams.
const RECV_BUFFERS: u16 = 256;
const RECV_BUFFER_SIZE: usize = 8 * 1024;
/// Largest single send; larger queues go out in several.
const SEND_CHUNK: usize = 256 * 1024;
/// Send buffers kept for reuse (larger ones are freed).
const SEND_POOL: usize = 256;
const SEND_POOL_KEEP_CAPACITY: usize = 64 * 1024;
/// After accept fails for lack of file descriptors, wait this long before re-arming.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);
/// Time per loop turn spent on bytes for connections that are not yet sessions (TLS
/// handshakes, request heads); later ones are kept for the next turn while sessions'
/// bytes go on being handled at once. A flood of handshakes then delays routed frames by
/// about this much, not by the flood's whole cost.
const HANDSHAKE_BUDGET: Duration = Duration::from_micros(500);
/// Bytes kept for one handshaking connection before they are handed over regardless of
/// the budget (a handshake and request head need far fewer).
const DEFERRED_MAX: usize = 64 * 1024;

// What a completion is for: the kind in the top byte of `user_data`, the slot below.
const OP_ACCEPT: u8 = 1;
const OP_RECV: u8 = 2;
const OP_SEND: u8 = 3;
const OP_CLOSE: u8 = 4;
const OP_WAKE: u8 = 5;
const OP_CANCEL: u8 = 6;
/// A closing socket's last words, sent without waiting: tagged apart from `OP_SEND` so
/// that a cancel aimed at an earlier, blocking send cannot catch them.
const OP_LAST_SEND: u8 = 7;

fn user_data(op: u8, slot: u32) -> u64 {
    (u64::from(op) << 56) | u64::from(slot)
}

fn split_user_data(ud: u64) -> (u8, u32) {
    ((ud >> 56) as u8, ud as u32)
}

/// Whether io_uring can run the data path here, and if not, why (for logs and status).
pub fn probe() -> Result<(), String> {
    if let Ok(v) = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
        && v.trim() == "2"
    {
        return Err("io_uring is disabled (sysctl kernel.io_uring_disabled = 2)".into());
    }
    let ring = build_ring(8).map_err(|e| {
        format!("io_uring_setup failed: {e} (io_uring disabled, blocked by seccomp, or a kernel without it)")
    })?;
    let mut probe = Probe::new();
    ring.submitter()
        .register_probe(&mut probe)
        .map_err(|e| format!("io_uring opcode probe failed: {e} (kernel older than 5.6)"))?;
    for (code, name) in [
        (opcode::AcceptMulti::CODE, "accept"),
        (opcode::RecvMulti::CODE, "recv"),
        (opcode::Send::CODE, "send"),
        (opcode::Close::CODE, "close"),
        (opcode::AsyncCancel::CODE, "async_cancel"),
        (opcode::Read::CODE, "read"),
    ] {
        if !probe.is_supported(code) {
            return Err(format!("the kernel's io_uring lacks the {name} operation"));
        }
    }
    ring.submitter()
        .register_files_sparse(4)
        .map_err(|e| format!("io_uring sparse file tables unsupported: {e} (needs kernel 5.19)"))?;
    probe_multishot_recv().map_err(|e| {
        format!("io_uring multishot recv with a buffer ring does not work: {e} (needs kernel 6.0)")
    })
}

/// Whether rings here get deferred task work: then io_uring touches a socket only inside
/// `io_uring_enter`, never behind the worker's back, which is what makes a kTLS hand-over
/// safe on this driver (no ciphertext can be read between the last completion the worker
/// saw and the `setsockopt` that switches the socket to plaintext).
pub fn defers_task_work() -> bool {
    build_ring(8).is_ok_and(|r| r.params().is_setup_single_issuer())
}

/// A ring for this thread: single issuer with deferred task work (completions are
/// processed only when the worker asks, which saves interrupts) where the kernel has it.
/// The task-run flag matters: deferred work runs only in an enter that asks for events,
/// and the flag is how a non-waiting submit learns that it must ask.
fn build_ring(entries: u32) -> io::Result<IoUring> {
    IoUring::builder()
        .setup_cqsize(entries * 4)
        .setup_single_issuer()
        .setup_defer_taskrun()
        .setup_taskrun_flag()
        .build(entries)
        .or_else(|_| {
            IoUring::builder()
                .setup_cqsize(entries * 4)
                .setup_coop_taskrun()
                .setup_taskrun_flag()
                .build(entries)
        })
}

/// Receives on a socket pair through a multishot recv and a buffer ring: the whole
/// mechanism the driver relies on, tried once.
fn probe_multishot_recv() -> io::Result<()> {
    let mut ring = build_ring(8)?;
    let mut bufs = BufRing::new(&ring, RECV_GROUP, 2, 64)?;
    let (a, b) = std::os::unix::net::UnixStream::pair()?;
    (&a).write_all(b"probe")?;
    let recv = opcode::RecvMulti::new(Fd(b.as_raw_fd()), RECV_GROUP)
        .build()
        .user_data(7);
    // SAFETY: the entry refers to no user memory but the registered buffer ring.
    unsafe { ring.submission().push(&recv) }.map_err(|_| io::Error::other("queue full"))?;
    ring.submit_and_wait(1)?;
    let cqe = ring
        .completion()
        .next()
        .ok_or_else(|| io::Error::other("no completion"))?;
    let result = cqe.result();
    let flags = cqe.flags();
    drop(a);
    drop(b);
    // The recv ends once the socket is closed; drain it so the ring can go.
    let _ = ring.submit_and_wait(1);
    let _ = ring.submitter().unregister_buf_ring(RECV_GROUP);
    if result < 0 {
        return Err(io::Error::from_raw_os_error(-result));
    }
    if cqueue::buffer_select(flags).is_none() || !cqueue::more(flags) {
        return Err(io::Error::other(
            "completion without a selected buffer or not multishot",
        ));
    }
    bufs.recycle_all();
    Ok(())
}

/// A provided-buffer ring: `count` buffers of `size` bytes the kernel picks from.
struct BufRing {
    entries: *mut BufRingEntry,
    layout: std::alloc::Layout,
    memory: Vec<u8>,
    size: usize,
    count: u16,
    tail: u16,
}

impl BufRing {
    fn new(ring: &IoUring, group: u16, count: u16, size: usize) -> io::Result<Self> {
        debug_assert!(count.is_power_of_two());
        let layout = std::alloc::Layout::from_size_align(
            usize::from(count) * std::mem::size_of::<BufRingEntry>(),
            4096,
        )
        .map_err(io::Error::other)?;
        // SAFETY: the layout has a non-zero size; the memory is freed in Drop with it.
        let entries = unsafe { std::alloc::alloc_zeroed(layout) }.cast::<BufRingEntry>();
        if entries.is_null() {
            return Err(io::Error::from(io::ErrorKind::OutOfMemory));
        }
        let mut bufs = Self {
            entries,
            layout,
            memory: vec![0; usize::from(count) * size],
            size,
            count,
            tail: 0,
        };
        // SAFETY: `entries` is page aligned, `count` entries long and outlives the
        // registration (unregistered before the ring or this struct goes away).
        unsafe {
            ring.submitter()
                .register_buf_ring_with_flags(entries as u64, count, group, 0)?;
        }
        for bid in 0..count {
            bufs.push(bid);
        }
        bufs.publish();
        Ok(bufs)
    }

    fn push(&mut self, bid: u16) {
        let index = usize::from(self.tail & (self.count - 1));
        // SAFETY: index < count; the kernel reads only entries below the published tail.
        let entry = unsafe { &mut *self.entries.add(index) };
        let addr = self.memory[usize::from(bid) * self.size..].as_ptr();
        entry.set_addr(addr as u64);
        entry.set_len(self.size as u32);
        entry.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
    }

    /// Makes pushed buffers visible to the kernel.
    fn publish(&self) {
        // SAFETY: the tail field lives in the first entry, which is valid for the ring's
        // life; the kernel reads it with acquire semantics.
        unsafe {
            let tail = BufRingEntry::tail(self.entries).cast::<AtomicU16>();
            (*tail).store(self.tail, Ordering::Release);
        }
    }

    fn data(&self, bid: u16, len: usize) -> &[u8] {
        let start = usize::from(bid) * self.size;
        &self.memory[start..start + len.min(self.size)]
    }

    fn recycle_all(&mut self) {
        // Only used by the probe, whose ring is about to go away.
        self.tail = 0;
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.entries.cast(), self.layout) };
    }
}

/// Wakes a worker waiting in `io_uring_enter` from another thread: a write to an
/// eventfd the ring has a read outstanding on.
struct EventFdWake(Arc<OwnedFd>);

impl Wake for EventFdWake {
    fn wake(&self) {
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a live buffer to an fd we own.
        let n = unsafe { libc::write(self.0.as_raw_fd(), one.as_ptr().cast(), one.len()) };
        if n < 0 {
            let e = io::Error::last_os_error();
            // A saturated counter already means "wake up".
            if e.kind() != io::ErrorKind::WouldBlock {
                crate::warn_limited!("cannot wake worker: {e}");
            }
        }
    }
}

/// How the ring refers to a socket.
enum Target {
    /// Direct descriptor at this index of the ring's file table (the worker slot).
    Fixed(u32),
    /// An ordinary descriptor (when the table could not take it).
    Fd(OwnedFd),
}

impl Target {
    fn recv(&self) -> squeue::Entry {
        match self {
            Self::Fixed(i) => opcode::RecvMulti::new(Fixed(*i), RECV_GROUP).build(),
            Self::Fd(fd) => opcode::RecvMulti::new(Fd(fd.as_raw_fd()), RECV_GROUP).build(),
        }
    }

    fn send(&self, buf: &[u8], flags: i32) -> squeue::Entry {
        let len = u32::try_from(buf.len()).unwrap_or(u32::MAX);
        match self {
            Self::Fixed(i) => opcode::Send::new(Fixed(*i), buf.as_ptr(), len)
                .flags(flags)
                .build(),
            Self::Fd(fd) => opcode::Send::new(Fd(fd.as_raw_fd()), buf.as_ptr(), len)
                .flags(flags)
                .build(),
        }
    }
}

/// The driver's side of one connection.
struct Socket {
    target: Option<Target>,
    recv_armed: bool,
    /// The bytes of the send in flight and how many of them went out already.
    send: Option<(Vec<u8>, usize)>,
    /// Worker asked to close; the socket goes once its operations have completed.
    closing: bool,
    /// The send in flight may wait for the peer (it is not `MSG_DONTWAIT`).
    send_blocking: bool,
    send_cancelled: bool,
    /// What the worker queued up to the close (a response, close_notify) has been
    /// handed to the kernel, or could not be.
    last_words_sent: bool,
    close_submitted: bool,
    closed: bool,
    /// Received bytes of a handshaking connection waiting for a turn's budget (in order;
    /// later bytes queue behind them).
    deferred: Vec<u8>,
    /// The peer's EOF arrived behind `deferred`.
    deferred_eof: bool,
}

/// A `Write` that takes at most `cap` bytes and then says "would block", so the worker
/// keeps the rest (still encrypted in rustls, or queued) until this send is done.
struct SendSink<'a> {
    buf: &'a mut Vec<u8>,
    cap: usize,
}

impl Write for SendSink<'_> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let room = self.cap.saturating_sub(self.buf.len());
        if room == 0 {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = room.min(data.len());
        self.buf.extend_from_slice(&data[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

struct Driver {
    // Field order is drop order: the ring (and its registrations) goes before the
    // memory it points at.
    ring: IoUring,
    bufs: BufRing,
    worker: Worker,
    /// None on a routing worker behind handshake workers: its connections are handed
    /// over ([`Handover`]).
    listener: Option<StdListener>,
    /// Connections handed over this turn.
    arrivals: Vec<Handover>,
    wake_fd: Arc<OwnedFd>,
    wake_buf: Box<[u8; 8]>,
    sockets: Vec<Option<Socket>>,
    /// Size of the ring's file table: the most connections this worker may hold.
    capacity: u32,
    send_pool: Vec<Vec<u8>>,
    accept_armed: bool,
    accept_retry_at: Option<Instant>,
    listening: bool,
    /// Connections whose multishot recv ended (no buffer free) and must be re-armed.
    rearm: Vec<u32>,
    /// Operations in flight that are not tied to a socket (accept, wake read, cancels).
    dirty: Vec<u32>,
    released: Vec<u32>,
    /// Kernel TLS is on: sockets stay ordinary descriptors (`setsockopt` and the record
    /// type control messages need one) instead of direct descriptors.
    ktls: bool,
    /// Socket work (kTLS hand-over, close_notify) waiting for a send in flight to finish.
    fd_deferred: Vec<u32>,
    fd_work: Vec<u32>,
    /// Connections with `deferred` bytes, oldest first.
    deferred_slots: std::collections::VecDeque<u32>,
    /// End of this turn's time for handshaking connections.
    budget_end: Instant,
}

/// Runs `worker` on the calling thread until shutdown completes. `table_size` is the
/// number of direct descriptors the ring's file table holds.
pub fn run(worker: Worker, listener: Option<StdListener>, table_size: u32) -> io::Result<()> {
    let ring = build_ring(RING_ENTRIES)?;
    ring.submitter().register_files_sparse(table_size)?;
    let bufs = BufRing::new(&ring, RECV_GROUP, RECV_BUFFERS, RECV_BUFFER_SIZE)?;
    // SAFETY: eventfd returns a new descriptor or -1.
    let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh descriptor nobody else owns.
    let wake_fd = Arc::new(unsafe { OwnedFd::from_raw_fd(raw) });
    let shared = worker.shared().clone();
    let id = usize::from(worker.id());
    shared.inboxes[id].set_waker(Box::new(EventFdWake(wake_fd.clone())));
    let mut driver = Driver {
        ring,
        bufs,
        worker,
        listening: listener.is_some(),
        listener,
        arrivals: Vec::new(),
        wake_fd,
        wake_buf: Box::new([0; 8]),
        sockets: Vec::new(),
        capacity: table_size,
        send_pool: Vec::new(),
        accept_armed: false,
        accept_retry_at: None,
        rearm: Vec::new(),
        dirty: Vec::new(),
        released: Vec::new(),
        ktls: shared.tls_offload.is_kernel(),
        fd_deferred: Vec::new(),
        fd_work: Vec::new(),
        deferred_slots: std::collections::VecDeque::new(),
        budget_end: Instant::now(),
    };
    if driver.listening {
        driver.arm_accept()?;
    }
    driver.arm_wake()?;
    shared.workers_ready.fetch_add(1, Ordering::AcqRel);
    let result = driver.run_loop();
    let _ = driver.ring.submitter().unregister_buf_ring(RECV_GROUP);
    result
}

impl Driver {
    fn push(&mut self, entry: &squeue::Entry) -> io::Result<()> {
        loop {
            // SAFETY: every entry's buffers (send buffers, the wake buffer, the buffer
            // ring) stay alive and unmoved until its completion arrives.
            if unsafe { self.ring.submission().push(entry) }.is_ok() {
                return Ok(());
            }
            // Queue full: hand what is there to the kernel and retry.
            self.ring.submit()?;
        }
    }

    fn arm_accept(&mut self) -> io::Result<()> {
        let Some(listener) = &self.listener else {
            return Ok(());
        };
        let entry = opcode::AcceptMulti::new(Fd(listener.as_raw_fd()))
            .flags(libc::SOCK_CLOEXEC)
            .build()
            .user_data(user_data(OP_ACCEPT, 0));
        self.push(&entry)?;
        self.accept_armed = true;
        Ok(())
    }

    fn arm_wake(&mut self) -> io::Result<()> {
        let entry = opcode::Read::new(Fd(self.wake_fd.as_raw_fd()), self.wake_buf.as_mut_ptr(), 8)
            .build()
            .user_data(user_data(OP_WAKE, 0));
        self.push(&entry)
    }

    fn run_loop(&mut self) -> io::Result<()> {
        let shared = self.worker.shared().clone();
        let id = usize::from(self.worker.id());
        let mut completions: Vec<(u64, i32, u32)> = Vec::with_capacity(1024);
        loop {
            let now = Instant::now();
            let next_tick = self.worker.tick(now);
            let mut deadline = next_tick;
            if let Some(at) = self.accept_retry_at {
                deadline = deadline.min(at);
            }
            let timeout = deadline.saturating_duration_since(now);
            // Never sleep with work at hand: re-arms pending, or messages that arrived
            // before the inbox saw us announce the sleep.
            let wait = self.rearm.is_empty()
                && self.deferred_slots.is_empty()
                && !self.worker.has_output()
                && shared.inboxes[id].prepare_sleep()
                && !timeout.is_zero();
            self.submit(wait, timeout)?;
            shared.inboxes[id].woke();
            let now = Instant::now();

            if shared.shutting_down.load(Ordering::Relaxed) && self.listening {
                self.listening = false;
                if self.accept_armed {
                    let cancel = opcode::AsyncCancel::new(user_data(OP_ACCEPT, 0))
                        .build()
                        .user_data(user_data(OP_CANCEL, 0));
                    self.push(&cancel)?;
                }
            }
            if self.listening
                && !self.accept_armed
                && self.accept_retry_at.is_some_and(|at| now >= at)
            {
                self.accept_retry_at = None;
                self.arm_accept()?;
            }

            shared.take_handovers(self.worker.id(), &mut self.arrivals);
            for handover in std::mem::take(&mut self.arrivals) {
                self.adopt(handover, now)?;
            }
            // Handshake bytes left from earlier turns first (they are older), then this
            // turn's completions; sessions' bytes are never held back.
            self.budget_end = Instant::now() + HANDSHAKE_BUDGET;
            self.run_deferred(now);
            completions.clear();
            completions.extend(
                self.ring
                    .completion()
                    .map(|c| (c.user_data(), c.result(), c.flags())),
            );
            for &(ud, result, flags) in &completions {
                self.complete(ud, result, flags, now)?;
            }
            self.bufs.publish();
            for slot in std::mem::take(&mut self.rearm) {
                self.arm_recv(slot)?;
            }

            self.worker.poll_inbox(now);
            self.flush_dirty(now)?;
            self.run_fd_work(now);
            self.worker.poll_inbox(now);
            self.flush_dirty(now)?;

            let mut released = std::mem::take(&mut self.released);
            self.worker.take_released(&mut released);
            for &slot in &released {
                self.begin_close(slot, now)?;
            }
            self.released = released;
            if self.worker.finished() && self.sockets.iter().all(Option::is_none) {
                debug!(worker = id, "worker stopped");
                return Ok(());
            }
        }
    }

    /// Submits queued entries and, if `wait`, sleeps until a completion or the timeout.
    fn submit(&mut self, wait: bool, timeout: Duration) -> io::Result<()> {
        let result = if wait {
            let ts = Timespec::new()
                .sec(timeout.as_secs())
                .nsec(timeout.subsec_nanos());
            let args = SubmitArgs::new().timespec(&ts);
            self.ring.submitter().submit_with_args(1, &args)
        } else {
            self.ring.submit()
        };
        match result {
            Ok(_) => Ok(()),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ETIME | libc::EINTR | libc::EBUSY | libc::EAGAIN)
                ) =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    fn complete(&mut self, ud: u64, result: i32, flags: u32, now: Instant) -> io::Result<()> {
        let (op, slot) = split_user_data(ud);
        match op {
            OP_ACCEPT => self.accepted(result, flags, now),
            OP_RECV => self.received(slot, result, flags, now),
            OP_SEND | OP_LAST_SEND => self.sent(slot, result, now),
            OP_CLOSE => {
                if let Some(Some(sock)) = self.sockets.get_mut(slot as usize) {
                    sock.closed = true;
                }
                self.finish_close(slot, now)
            }
            OP_WAKE => self.arm_wake(),
            _ => Ok(()), // cancellations report nothing we act on
        }
    }

    fn accepted(&mut self, result: i32, flags: u32, now: Instant) -> io::Result<()> {
        if !cqueue::more(flags) {
            self.accept_armed = false;
        }
        if result < 0 {
            let err = io::Error::from_raw_os_error(-result);
            if result != -libc::ECANCELED {
                // EMFILE/ENFILE/ENOBUFS: pause accepting rather than spin.
                crate::warn_limited!("accept failed: {err}");
                self.accept_retry_at = Some(now + ACCEPT_RETRY);
            }
        } else {
            // SAFETY: a successful accept completion carries a new descriptor we own.
            let fd = unsafe { OwnedFd::from_raw_fd(result) };
            self.take_connection(fd, now)?;
        }
        if !self.accept_armed && self.listening && self.accept_retry_at.is_none() {
            self.arm_accept()?;
        }
        Ok(())
    }

    fn take_connection(&mut self, fd: OwnedFd, now: Instant) -> io::Result<()> {
        let sock = socket2::SockRef::from(&fd);
        let Some(peer) = sock.peer_addr().ok().and_then(|a| a.as_socket()) else {
            return Ok(()); // gone already
        };
        let _ = sock.set_tcp_nodelay(true);
        if self.worker.live() >= self.capacity as usize {
            self.worker.refuse_at_capacity(now);
            crate::warn_limited!(
                %peer,
                "worker {} holds {} connections, its file table's size: refusing (raise workers or RLIMIT_NOFILE)",
                self.worker.id(),
                self.capacity
            );
            return Ok(());
        }
        let Some(slot) = self.worker.accept(peer, now) else {
            return Ok(()); // dropping the descriptor closes it
        };
        self.install(slot, fd, now)
    }

    /// Takes a connection a handshake worker handed over.
    fn adopt(&mut self, handover: Handover, now: Instant) -> io::Result<()> {
        let Handover { fd, conn } = handover;
        if self.worker.live() >= self.capacity as usize {
            let peer = conn.conn.peer;
            self.worker.forget(&conn);
            self.worker.refuse_at_capacity(now);
            crate::warn_limited!(
                %peer,
                "worker {} holds {} connections, its file table's size: refusing (raise workers or RLIMIT_NOFILE)",
                self.worker.id(),
                self.capacity
            );
            return Ok(());
        }
        let Some(slot) = self.worker.adopt(conn, now) else {
            return Ok(()); // dropping the descriptor closes it
        };
        self.install(slot, fd, now)
    }

    /// Puts a connection's socket into the ring (at its slot) and starts receiving.
    fn install(&mut self, slot: u32, fd: OwnedFd, now: Instant) -> io::Result<()> {
        if slot >= self.capacity {
            self.worker.release(slot);
            self.worker.refuse_at_capacity(now);
            return Ok(());
        }
        let registered = if self.ktls {
            Err(io::Error::other("kernel TLS needs an ordinary descriptor"))
        } else {
            self.ring
                .submitter()
                .register_files_update(slot, &[fd.as_raw_fd()])
        };
        let target = match registered {
            // The table holds its own reference now; the process descriptor can go.
            Ok(_) => Target::Fixed(slot),
            Err(_) if self.ktls => Target::Fd(fd),
            Err(e) => {
                crate::warn_limited!("cannot make a direct descriptor ({e}): using the fd");
                Target::Fd(fd)
            }
        };
        let idx = slot as usize;
        if self.sockets.len() <= idx {
            self.sockets.resize_with(idx + 1, || None);
        }
        self.sockets[idx] = Some(Socket {
            target: Some(target),
            recv_armed: false,
            send: None,
            closing: false,
            send_blocking: false,
            send_cancelled: false,
            last_words_sent: false,
            close_submitted: false,
            closed: false,
            deferred: Vec::new(),
            deferred_eof: false,
        });
        self.arm_recv(slot)
    }

    fn arm_recv(&mut self, slot: u32) -> io::Result<()> {
        let Some(Some(sock)) = self.sockets.get_mut(slot as usize) else {
            return Ok(());
        };
        if sock.closing || sock.recv_armed {
            return Ok(());
        }
        let Some(target) = &sock.target else {
            return Ok(());
        };
        let entry = target.recv().user_data(user_data(OP_RECV, slot));
        sock.recv_armed = true;
        self.push(&entry)
    }

    fn received(&mut self, slot: u32, result: i32, flags: u32, now: Instant) -> io::Result<()> {
        let more = cqueue::more(flags);
        let bid = cqueue::buffer_select(flags);
        let Some(Some(sock)) = self.sockets.get_mut(slot as usize) else {
            if let Some(bid) = bid {
                self.bufs.push(bid);
            }
            return Ok(());
        };
        if !more {
            sock.recv_armed = false;
        }
        let closing = sock.closing;
        if result > 0 {
            if let Some(bid) = bid {
                if !closing {
                    let len = usize::try_from(result).unwrap_or(0);
                    // The buffer ring and the worker are distinct fields: no copy here,
                    // the worker copies only what it keeps.
                    let data = self.bufs.data(bid, len);
                    let defer = !sock.deferred.is_empty()
                        || (!self.worker.is_established(slot) && Instant::now() >= self.budget_end);
                    if defer && sock.deferred.len() + len <= DEFERRED_MAX {
                        if sock.deferred.is_empty() {
                            self.deferred_slots.push_back(slot);
                        }
                        sock.deferred.extend_from_slice(data);
                    } else if defer {
                        // Past the cap: hand everything over now, in order.
                        let mut pending = std::mem::take(&mut sock.deferred);
                        pending.extend_from_slice(data);
                        self.worker.on_received(slot, &pending, now);
                    } else {
                        self.worker.on_received(slot, data, now);
                    }
                }
                self.bufs.push(bid);
            }
            if !more && !closing {
                self.rearm.push(slot);
            }
        } else if result == 0 {
            if !closing && !sock.deferred.is_empty() {
                sock.deferred_eof = true;
            } else if !closing {
                self.worker.on_eof(slot, now);
            }
        } else if result == -libc::ENOBUFS {
            // Every buffer was in use in this batch; they are back by the end of it.
            if !closing {
                self.rearm.push(slot);
            }
        } else if result == -libc::EIO && !closing && self.worker.is_offloaded(slot) {
            // kTLS: the next record is an alert or a handshake message, not data.
            if let Some(Target::Fd(fd)) = &sock.target {
                self.worker
                    .on_control_record(slot, &mut FdSocket(fd.as_fd()), now);
            }
            if !more && self.worker.is_active(slot) {
                self.rearm.push(slot);
            }
        } else if result != -libc::ECANCELED && !closing {
            self.worker
                .on_error(slot, &io::Error::from_raw_os_error(-result), now);
        }
        if closing {
            return self.finish_close(slot, now);
        }
        Ok(())
    }

    /// Hands deferred handshake bytes to the worker, oldest connection first, while the
    /// turn's budget lasts.
    fn run_deferred(&mut self, now: Instant) {
        while Instant::now() < self.budget_end {
            let Some(slot) = self.deferred_slots.pop_front() else {
                return;
            };
            let Some(Some(sock)) = self.sockets.get_mut(slot as usize) else {
                continue; // closed meanwhile; a reused slot starts with nothing deferred
            };
            let data = std::mem::take(&mut sock.deferred);
            let eof = std::mem::take(&mut sock.deferred_eof);
            if sock.closing || data.is_empty() {
                continue;
            }
            self.worker.on_received(slot, &data, now);
            if eof {
                self.worker.on_eof(slot, now);
            }
        }
    }

    /// Socket work the worker asked for (kTLS hand-over, close_notify), on the socket's
    /// own descriptor. Only with no send in flight: a hand-over while ciphertext waits in a
    /// send would have the kernel seal it again. Received data cannot be pending here:
    /// with deferred task work the ring reads sockets only inside `io_uring_enter`, and
    /// every completion of the last one has been handed to the worker.
    fn run_fd_work(&mut self, now: Instant) {
        let mut work = std::mem::take(&mut self.fd_work);
        self.worker.take_fd_work(&mut work);
        work.append(&mut self.fd_deferred);
        work.sort_unstable();
        work.dedup();
        for &slot in &work {
            let Some(Some(sock)) = self.sockets.get(slot as usize) else {
                continue;
            };
            let Some(Target::Fd(fd)) = &sock.target else {
                continue; // closed already, or not a socket kTLS can have
            };
            if sock.send.is_some() {
                self.fd_deferred.push(slot);
            } else {
                self.worker.fd_work(slot, &mut FdSocket(fd.as_fd()), now);
            }
        }
        self.fd_work = work;
    }

    fn flush_dirty(&mut self, now: Instant) -> io::Result<()> {
        let mut dirty = std::mem::take(&mut self.dirty);
        self.worker.take_dirty(&mut dirty);
        for &slot in &dirty {
            self.start_send(slot, 0, now)?;
        }
        self.dirty = dirty;
        Ok(())
    }

    /// Encrypts what the worker has queued for `slot` into a send buffer and submits it,
    /// unless a send is already in flight (its completion comes back here).
    fn start_send(&mut self, slot: u32, flags: i32, now: Instant) -> io::Result<()> {
        let Some(Some(sock)) = self.sockets.get(slot as usize) else {
            return Ok(());
        };
        if sock.send.is_some() || sock.target.is_none() || sock.close_submitted {
            return Ok(());
        }
        let mut buf = self.send_pool.pop().unwrap_or_default();
        buf.clear();
        let outcome = self.worker.flush_to(
            slot,
            &mut SendSink {
                buf: &mut buf,
                cap: SEND_CHUNK,
            },
        );
        if let Err(e) = outcome {
            self.recycle(buf);
            self.worker.on_error(slot, &e, now);
            return Ok(());
        }
        debug_assert!(matches!(outcome, Ok(Flush::Done | Flush::Blocked)));
        if buf.is_empty() {
            self.recycle(buf);
            return Ok(());
        }
        let Some(Some(sock)) = self.sockets.get_mut(slot as usize) else {
            return Ok(());
        };
        let Some(target) = &sock.target else {
            return Ok(());
        };
        let blocking = flags & libc::MSG_DONTWAIT == 0;
        let op = if blocking { OP_SEND } else { OP_LAST_SEND };
        let entry = target.send(&buf, flags).user_data(user_data(op, slot));
        // The Vec's heap block does not move when the Vec itself is moved.
        sock.send = Some((buf, 0));
        sock.send_blocking = blocking;
        self.push(&entry)
    }

    fn sent(&mut self, slot: u32, result: i32, now: Instant) -> io::Result<()> {
        let Some(Some(sock)) = self.sockets.get_mut(slot as usize) else {
            return Ok(());
        };
        let Some((buf, mut done)) = sock.send.take() else {
            return Ok(());
        };
        if result < 0 {
            let closing = sock.closing;
            // Bytes after a gap would only garble the stream: no last words then.
            sock.last_words_sent |= closing;
            self.recycle(buf);
            if closing {
                return self.finish_close(slot, now);
            }
            if result != -libc::ECANCELED {
                self.worker
                    .on_error(slot, &io::Error::from_raw_os_error(-result), now);
            }
            return Ok(());
        }
        done += usize::try_from(result).unwrap_or(0);
        if done < buf.len() && !sock.closing {
            // A short send: the rest goes next, from the same (unmoved) buffer.
            if let Some(target) = &sock.target {
                let entry = target
                    .send(&buf[done..], 0)
                    .user_data(user_data(OP_SEND, slot));
                sock.send = Some((buf, done));
                return self.push(&entry);
            }
        }
        let closing = sock.closing;
        sock.last_words_sent |= closing && done < buf.len();
        self.recycle(buf);
        if closing {
            return self.finish_close(slot, now);
        }
        // More may have been queued (or held back by the cap) meanwhile.
        self.start_send(slot, 0, now)
    }

    fn recycle(&mut self, mut buf: Vec<u8>) {
        if self.send_pool.len() < SEND_POOL && buf.capacity() <= SEND_POOL_KEEP_CAPACITY {
            buf.clear();
            self.send_pool.push(buf);
        }
    }

    /// The worker is done with `slot`: send its last words (without waiting for a
    /// reader that does not read), then close once nothing is in flight.
    fn begin_close(&mut self, slot: u32, now: Instant) -> io::Result<()> {
        let Some(Some(sock)) = self.sockets.get_mut(slot as usize) else {
            self.worker.release(slot);
            return Ok(());
        };
        if sock.closing {
            return Ok(());
        }
        sock.closing = true;
        self.finish_close(slot, now)
    }

    /// Moves a closing socket along: cancel a send that may wait forever, send the last
    /// words once nothing else is in flight (they were queued behind that send), close the
    /// descriptor, and hand the slot back once every operation has completed.
    fn finish_close(&mut self, slot: u32, now: Instant) -> io::Result<()> {
        let Some(Some(sock)) = self.sockets.get_mut(slot as usize) else {
            return Ok(());
        };
        if !sock.closing {
            return Ok(());
        }
        if sock.send.is_some() {
            // A send to a peer that stopped reading would wait forever.
            if sock.send_blocking && !sock.send_cancelled {
                sock.send_cancelled = true;
                let cancel = opcode::AsyncCancel::new(user_data(OP_SEND, slot))
                    .build()
                    .user_data(user_data(OP_CANCEL, slot));
                return self.push(&cancel);
            }
            return Ok(());
        }
        if !sock.last_words_sent {
            sock.last_words_sent = true;
            self.start_send(slot, libc::MSG_DONTWAIT, now)?;
            if self
                .sockets
                .get(slot as usize)
                .and_then(Option::as_ref)
                .is_some_and(|s| s.send.is_some())
            {
                return Ok(()); // its completion comes back here
            }
        }
        if let Some(i) = self.fd_deferred.iter().position(|&s| s == slot) {
            // close_notify on a kTLS socket, after the last words it must follow.
            self.fd_deferred.swap_remove(i);
            if let Some(Some(Socket {
                target: Some(Target::Fd(fd)),
                ..
            })) = self.sockets.get(slot as usize)
            {
                self.worker.fd_work(slot, &mut FdSocket(fd.as_fd()), now);
            }
        }
        let Some(Some(sock)) = self.sockets.get_mut(slot as usize) else {
            return Ok(());
        };
        let mut entries = Vec::new();
        if !sock.close_submitted {
            sock.close_submitted = true;
            if sock.recv_armed {
                entries.push(
                    opcode::AsyncCancel::new(user_data(OP_RECV, slot))
                        .build()
                        .user_data(user_data(OP_CANCEL, slot)),
                );
            }
            let close = match sock.target.take() {
                Some(Target::Fixed(i)) => opcode::Close::new(Fixed(i)).build(),
                // The close op owns the descriptor from here.
                Some(Target::Fd(fd)) => opcode::Close::new(Fd(fd.into_raw_fd())).build(),
                None => opcode::Nop::new().build(),
            };
            entries.push(close.user_data(user_data(OP_CLOSE, slot)));
        } else if sock.closed && !sock.recv_armed {
            self.sockets[slot as usize] = None;
            self.worker.release(slot);
            return Ok(());
        }
        for entry in &entries {
            self.push(entry)?;
        }
        Ok(())
    }
}
