//! The epoll driver: one thread per worker, each with a mio `Poll` and, if the worker
//! accepts, its own `SO_REUSEPORT` listener so that the kernel spreads new connections
//! over the listening workers.
//!
//! Handshake workers (`Worker::handshake_worker`) always run on this driver, whatever
//! the data path: a connection that asks for a session leaves with its socket as an
//! ordinary descriptor ([`crate::shared::Handover`]), which the routing worker's driver
//! (epoll or io_uring) registers as its own.

use std::io::{self, Read};
use std::net::TcpListener as StdListener;
use std::os::fd::AsFd;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token, Waker};
use tracing::debug;

use crate::ktls::FdSocket;
use crate::shared::{Handover, Wake};
use crate::worker::{Flush, Worker};

const LISTENER: Token = Token(0);
const WAKER: Token = Token(1);
const FIRST_CONN: usize = 2;
/// Bytes read from one socket per loop turn before others get their turn.
const READ_BUDGET: usize = 1024 * 1024;
/// Connections accepted per loop turn.
const ACCEPT_BUDGET: usize = 512;
/// Connections accepted per loop turn even when the handshake budget is spent.
const ACCEPT_MIN: usize = 16;
/// Time per loop turn spent on connections that are not yet sessions (accepts, TLS
/// handshakes, request heads). What is left waits for the next turn, after the sessions'
/// reads: a flood of handshakes then delays routed frames by about this much, not by the
/// flood's whole cost.
const HANDSHAKE_BUDGET: Duration = Duration::from_micros(500);

struct MioWake(Waker);

impl Wake for MioWake {
    fn wake(&self) {
        if let Err(e) = self.0.wake() {
            crate::warn_limited!("cannot wake worker: {e}");
        }
    }
}

fn token(slot: u32) -> Token {
    Token(slot as usize + FIRST_CONN)
}

struct Socket {
    stream: TcpStream,
    /// WRITABLE interest is registered (a write would have blocked).
    write_interest: bool,
}

/// Runs `worker` on the calling thread until shutdown completes; it accepts from
/// `listener` if it has one (routing workers behind handshake workers have none).
pub fn run(mut worker: Worker, listener: Option<StdListener>) -> io::Result<()> {
    let shared = worker.shared().clone();
    let id = usize::from(worker.id());
    let mut poll = Poll::new()?;
    let waker = Waker::new(poll.registry(), WAKER)?;
    shared.inboxes[id].set_waker(Box::new(MioWake(waker)));
    let mut listener = match listener {
        Some(l) => {
            l.set_nonblocking(true)?;
            let mut l = TcpListener::from_std(l);
            poll.registry()
                .register(&mut l, LISTENER, Interest::READABLE)?;
            Some(l)
        }
        None => None,
    };
    let mut listening = listener.is_some();
    let mut arrivals: Vec<Handover> = Vec::new();
    let mut leaving: Vec<u32> = Vec::new();

    let mut sockets: Vec<Option<Socket>> = Vec::new();
    let mut events = Events::with_capacity(1024);
    let mut read_buf = vec![0u8; 64 * 1024];
    let mut dirty = Vec::new();
    let mut released = Vec::new();
    let mut fd_work = Vec::new();
    let mut read_again: Vec<u32> = Vec::new();
    let mut accept_again = false;
    shared.workers_ready.fetch_add(1, Ordering::AcqRel);

    loop {
        let now = Instant::now();
        let next_tick = worker.tick(now);
        let mut timeout = next_tick.saturating_duration_since(now);
        if !read_again.is_empty()
            || accept_again
            || worker.has_output()
            || !shared.inboxes[id].prepare_sleep()
        {
            timeout = Duration::ZERO;
        }
        match poll.poll(&mut events, Some(timeout)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
        shared.inboxes[id].woke();
        let now = Instant::now();

        if shared.shutting_down.load(Ordering::Relaxed) && listening {
            if let Some(l) = listener.as_mut() {
                let _ = poll.registry().deregister(l);
            }
            listening = false;
        }
        shared.take_handovers(worker.id(), &mut arrivals);
        for handover in arrivals.drain(..) {
            adopt(&mut worker, handover, &poll, &mut sockets, now);
        }

        let mut to_read = std::mem::take(&mut read_again);
        let mut writable: Vec<u32> = Vec::new();
        let mut accept_now = std::mem::take(&mut accept_again);
        for ev in events.iter() {
            match ev.token() {
                LISTENER => accept_now = true,
                WAKER => {}
                Token(t) => {
                    let Some(slot) = t
                        .checked_sub(FIRST_CONN)
                        .and_then(|s| u32::try_from(s).ok())
                    else {
                        continue;
                    };
                    if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                        to_read.push(slot);
                    }
                    if ev.is_writable() {
                        writable.push(slot);
                    }
                }
            }
        }

        // Sessions first; then accepts and handshakes while the turn's budget lasts (the
        // rest is remembered: readiness is edge-triggered).
        let mut handshaking = Vec::new();
        for slot in to_read {
            if !worker.is_established(slot) {
                handshaking.push(slot);
                continue;
            }
            let Some(Some(sock)) = sockets.get_mut(slot as usize) else {
                continue;
            };
            if read_socket(&mut worker, slot, &mut sock.stream, &mut read_buf, now) {
                read_again.push(slot);
            }
        }
        let budget_end = Instant::now() + HANDSHAKE_BUDGET;
        for slot in handshaking {
            if Instant::now() >= budget_end {
                read_again.push(slot);
                continue;
            }
            let Some(Some(sock)) = sockets.get_mut(slot as usize) else {
                continue;
            };
            if read_socket(&mut worker, slot, &mut sock.stream, &mut read_buf, now) {
                read_again.push(slot);
            }
        }
        if accept_now
            && listening
            && let Some(l) = listener.as_ref()
        {
            accept_again = accept_batch(&mut worker, l, &poll, &mut sockets, budget_end, now);
        }
        worker.poll_inbox(now);

        worker.take_dirty(&mut dirty);
        dirty.extend_from_slice(&writable);
        for &slot in &dirty {
            let Some(Some(sock)) = sockets.get_mut(slot as usize) else {
                continue;
            };
            flush(&mut worker, slot, sock, &poll, now);
        }
        // Connections that asked for a session go to a routing worker, after their
        // pending bytes had this turn's flush.
        worker.take_leaving(&mut leaving);
        for &slot in &leaving {
            hand_over(&mut worker, slot, &poll, &mut sockets);
        }
        // Socket work (kTLS hand-over, close_notify): writes are synchronous here, so
        // nothing is in flight; a hand-over leaves the slot dirty for a plaintext flush.
        worker.take_fd_work(&mut fd_work);
        for &slot in &fd_work {
            if let Some(Some(sock)) = sockets.get_mut(slot as usize) {
                worker.fd_work(slot, &mut FdSocket(sock.stream.as_fd()), now);
            }
        }
        worker.take_dirty(&mut dirty);
        for &slot in &dirty {
            let Some(Some(sock)) = sockets.get_mut(slot as usize) else {
                continue;
            };
            flush(&mut worker, slot, sock, &poll, now);
        }
        // Messages that came in during this turn: what they queued goes out now, not
        // when the next event or tick wakes this thread (up to a second later: the
        // stalls of cross-worker streams on epoll).
        worker.poll_inbox(now);
        worker.take_dirty(&mut dirty);
        for &slot in &dirty {
            let Some(Some(sock)) = sockets.get_mut(slot as usize) else {
                continue;
            };
            flush(&mut worker, slot, sock, &poll, now);
        }

        worker.take_released(&mut released);
        for &slot in &released {
            if let Some(mut sock) = sockets.get_mut(slot as usize).and_then(Option::take) {
                // Last words (a close frame, an HTTP response, a TLS alert), best effort;
                // on a kTLS socket the alert is a control message (fd work).
                let _ = worker.flush_to(slot, &mut sock.stream);
                worker.take_fd_work(&mut fd_work);
                if fd_work.contains(&slot) {
                    worker.fd_work(slot, &mut FdSocket(sock.stream.as_fd()), now);
                }
                for &other in fd_work.iter().filter(|s| **s != slot) {
                    if let Some(Some(o)) = sockets.get(other as usize) {
                        worker.fd_work(other, &mut FdSocket(o.stream.as_fd()), now);
                    }
                }
                let _ = poll.registry().deregister(&mut sock.stream);
            }
            worker.release(slot);
        }
        if worker.finished() {
            debug!(worker = id, "worker stopped");
            return Ok(());
        }
    }
}

/// Registers a connection a handshake worker handed over and gives it to `worker`.
fn adopt(
    worker: &mut Worker,
    handover: Handover,
    poll: &Poll,
    sockets: &mut Vec<Option<Socket>>,
    now: Instant,
) {
    let Handover { fd, conn } = handover;
    let mut stream = TcpStream::from(fd);
    let Some(slot) = worker.adopt(conn, now) else {
        return; // dropping the stream closes it
    };
    // Edge-triggered readiness still reports bytes that arrived before registration.
    if let Err(e) = poll
        .registry()
        .register(&mut stream, token(slot), Interest::READABLE)
    {
        crate::warn_limited!("cannot register a handed-over connection: {e}");
        worker.on_error(slot, &e, now);
    }
    let idx = slot as usize;
    if sockets.len() <= idx {
        sockets.resize_with(idx + 1, || None);
    }
    sockets[idx] = Some(Socket {
        stream,
        write_interest: false,
    });
}

/// Hands the connection in `slot` (a handshake worker's) to a routing worker.
fn hand_over(worker: &mut Worker, slot: u32, poll: &Poll, sockets: &mut [Option<Socket>]) {
    let Some(entry) = sockets.get_mut(slot as usize) else {
        return;
    };
    if entry.is_none() {
        return;
    }
    let Some(conn) = worker.detach(slot) else {
        return; // it closed meanwhile: released as usual
    };
    let Some(mut sock) = entry.take() else {
        return;
    };
    let _ = poll.registry().deregister(&mut sock.stream);
    let fd = std::os::fd::OwnedFd::from(sock.stream);
    if let Err(lost) = worker.shared().hand_over(Handover { fd, conn }) {
        crate::warn_limited!(peer = %lost.conn.conn.peer, "no routing worker takes connections: closing one");
        worker.forget(&lost.conn);
    }
}

/// Accepts pending connections until `budget_end` (at least [`ACCEPT_MIN`]); returns true
/// if more may be waiting.
fn accept_batch(
    worker: &mut Worker,
    listener: &TcpListener,
    poll: &Poll,
    sockets: &mut Vec<Option<Socket>>,
    budget_end: Instant,
    now: Instant,
) -> bool {
    for n in 0..ACCEPT_BUDGET {
        // A few accepts every turn whatever the handshakes took, so that new
        // connections are never starved by the ones already in their handshake.
        if n >= ACCEPT_MIN && Instant::now() >= budget_end {
            return true;
        }
        match listener.accept() {
            Ok((mut stream, peer)) => {
                let _ = stream.set_nodelay(true);
                let Some(slot) = worker.accept(peer, now) else {
                    continue; // dropping the stream closes it
                };
                if let Err(e) =
                    poll.registry()
                        .register(&mut stream, token(slot), Interest::READABLE)
                {
                    crate::warn_limited!(%peer, "cannot register connection: {e}");
                    worker.on_error(slot, &e, now);
                    continue;
                }
                let idx = slot as usize;
                if sockets.len() <= idx {
                    sockets.resize_with(idx + 1, || None);
                }
                sockets[idx] = Some(Socket {
                    stream,
                    write_interest: false,
                });
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                // EMFILE/ENFILE/ENOBUFS: back off until the next turn rather than spin.
                crate::warn_limited!("accept failed: {e}");
                return false;
            }
        }
    }
    true
}

/// Reads until the socket would block or the budget is spent; returns true if the
/// budget ran out (edge-triggered readiness: the driver must come back by itself).
fn read_socket(
    worker: &mut Worker,
    slot: u32,
    stream: &mut TcpStream,
    buf: &mut [u8],
    now: Instant,
) -> bool {
    let mut total = 0;
    while worker.is_active(slot) {
        match stream.read(buf) {
            Ok(0) => {
                worker.on_eof(slot, now);
                return false;
            }
            Ok(n) => {
                worker.on_received(slot, &buf[..n], now);
                total += n;
                if total >= READ_BUDGET {
                    return worker.is_active(slot);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // kTLS: the next record is an alert or a handshake message, not data.
            Err(e) if e.raw_os_error() == Some(libc::EIO) && worker.is_offloaded(slot) => {
                worker.on_control_record(slot, &mut FdSocket(stream.as_fd()), now);
            }
            Err(e) => {
                worker.on_error(slot, &e, now);
                return false;
            }
        }
    }
    false
}

fn flush(worker: &mut Worker, slot: u32, sock: &mut Socket, poll: &Poll, now: Instant) {
    let blocked = match worker.flush_to(slot, &mut sock.stream) {
        Ok(Flush::Done) => false,
        Ok(Flush::Blocked) => true,
        Err(e) => {
            worker.on_error(slot, &e, now);
            return;
        }
    };
    if blocked == sock.write_interest {
        return;
    }
    // Readiness is edge-triggered: WRITABLE is reported once space frees up after a
    // blocked write, and dropped again when the queue is drained to save wake-ups.
    let interest = if blocked {
        Interest::READABLE | Interest::WRITABLE
    } else {
        Interest::READABLE
    };
    match poll
        .registry()
        .reregister(&mut sock.stream, token(slot), interest)
    {
        Ok(()) => sock.write_interest = blocked,
        Err(e) => worker.on_error(slot, &e, now),
    }
}
