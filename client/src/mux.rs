//! Streams as tokio I/O objects: [`Mux`] runs a connection with two small tasks (one reads
//! and sorts frames, one writes) so that each devgate stream becomes a [`DevgateStream`]
//! that implements [`AsyncRead`] and [`AsyncWrite`], with the protocol's credit handled
//! inside (docs/PROTOCOL.md section 5):
//!
//! - reading returns the stream's bytes in order; credit goes back to the sender
//!   (`StreamWindow`) once half the window has been read, so a reader that stops reading
//!   stops the sender after at most one window. The streams of one connection share
//!   [`CONNECTION_WINDOW`] (each gets at most [`STREAM_WINDOW`] and at least [`MIN_WINDOW`]),
//!   because the gateway queues up to the granted credit towards a slow reader and
//!   disconnects it past its hard limit;
//! - writing waits for credit and splits writes into frames of at most [`MAX_CHUNK`];
//! - a `StreamClose` with code 0 is end of file, any other code an error naming it; the
//!   protocol has no half-close, so `poll_shutdown` (and dropping the stream) closes the
//!   stream in both directions after what was written.
//!
//! Frames that are not stream frames (commands, responses, events, presence, errors,
//! control) come out of [`Mux::next_frame`] in order.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{mpsc, oneshot};

use crate::{
    Body, ClientError, Connection, ErrorCode, Frame, Incoming, Received, Receiver, Sender,
};

/// Credit one side grants per stream at most: the gateway's cap (PROTOCOL.md section 5).
pub const STREAM_WINDOW: u32 = 1024 * 1024;
/// Credit one connection grants over all its streams, as long as each gets at least
/// [`MIN_WINDOW`]. What the gateway queues towards a connection is bounded only by the credit
/// that connection granted, and the gateway disconnects a connection whose queue passes its
/// hard limit (`limits.queue_hard_bytes`, 16 MiB by default): a manager with 20 streams at
/// a full window each would be dropped as soon as it read a little slower than its devices
/// send.
pub const CONNECTION_WINDOW: u64 = 8 * 1024 * 1024;
/// Smallest window a stream gets, however many are open.
pub const MIN_WINDOW: u32 = 16 * 1024;
/// Largest StreamData payload sent.
pub const MAX_CHUNK: usize = 64 * 1024;
/// Payload bytes the writer task hands the connection in one write (see `write_loop`).
const BATCH_BYTES: usize = 48 * 1024;
/// Non-stream frames held for [`Mux::next_frame`] before the reader waits for the caller.
const FRAME_BACKLOG: usize = 1024;

/// Why a stream ended, as its reader and writer see it.
#[derive(Debug, Clone)]
struct Ended {
    code: u16,
    reason: String,
}

impl Ended {
    fn to_io(&self) -> io::Error {
        let kind = match self.code {
            0 => io::ErrorKind::BrokenPipe,
            _ => io::ErrorKind::ConnectionReset,
        };
        io::Error::new(
            kind,
            format!(
                "stream closed with code {} ({}){}",
                self.code,
                code_name(self.code),
                if self.reason.is_empty() {
                    String::new()
                } else {
                    format!(": {}", self.reason)
                }
            ),
        )
    }
}

fn code_name(code: u16) -> &'static str {
    match code {
        0 => "normal",
        c => ErrorCode::from(c).as_str(),
    }
}

#[derive(Debug, Default)]
struct StreamState {
    /// Received data not yet read.
    data: VecDeque<Bytes>,
    /// Bytes read since credit was last returned.
    consumed: u32,
    /// The credit the peer has when everything read is returned: this side's receive
    /// window, [`window_for`] the streams open when it was last set.
    window: u32,
    /// Credit the other side granted that this side has not used.
    credit: u64,
    /// The peer (or the connection) ended the stream.
    ended: Option<Ended>,
    /// This side closed it.
    closed_locally: bool,
    read_waker: Option<Waker>,
    write_waker: Option<Waker>,
    /// A manager's open waits for the device's first StreamWindow (accept) or StreamClose.
    opened: Option<oneshot::Sender<Result<(), Ended>>>,
}

type Shared = Arc<Mutex<StreamState>>;

fn lock(s: &Shared) -> std::sync::MutexGuard<'_, StreamState> {
    s.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A frame for the writer task (owned, so that poll functions can queue without waiting).
#[derive(Debug)]
enum Out {
    Open {
        unit: Arc<str>,
        id: u32,
        window: u32,
        params: Bytes,
    },
    Data {
        unit: Arc<str>,
        id: u32,
        bytes: Bytes,
    },
    Window {
        unit: Arc<str>,
        id: u32,
        increment: u32,
    },
    Close {
        unit: Arc<str>,
        id: u32,
        code: u16,
        reason: String,
    },
    /// The `Mux` was dropped: close the connection after everything queued before (a
    /// stream closed just before must not be overtaken by the connection's end, or the
    /// peer sees "went away" instead of a normal close).
    Goodbye,
}

impl Out {
    /// Payload bytes of the frame (what counts towards a write's size).
    fn payload_len(&self) -> usize {
        match self {
            Self::Open { params, .. } => params.len(),
            Self::Data { bytes, .. } => bytes.len(),
            Self::Window { .. } => 4,
            Self::Close { reason, .. } => reason.len(),
            Self::Goodbye => 0,
        }
    }

    /// The frame to send; `None` for [`Out::Goodbye`].
    fn frame(&self) -> Option<Frame<'_>> {
        Some(match self {
            Self::Open {
                unit,
                id,
                window,
                params,
            } => Frame::stream_open(unit, *id, *window, params),
            Self::Data { unit, id, bytes } => Frame::stream_data(unit, *id, bytes),
            Self::Window {
                unit,
                id,
                increment,
            } => Frame::stream_window(unit, *id, *increment),
            Self::Close {
                unit,
                id,
                code,
                reason,
            } => Frame::stream_close(unit, *id, *code, reason),
            Self::Goodbye => return None,
        })
    }
}

struct Streams {
    /// Open streams by (unit, id): a manager's ids are its own per device connection
    /// (the unit is part of the key), a device's are the gateway's (unit empty).
    map: HashMap<(Arc<str>, u32), Shared>,
    next_id: u32,
}

/// A connection whose streams are I/O objects (see the module docs).
#[derive(Debug)]
pub struct Mux {
    sender: Sender,
    out: mpsc::UnboundedSender<Out>,
    streams: Arc<Mutex<Streams>>,
    // Behind async mutexes so that both can be awaited through `&self`: one task can
    // select on them together, or several tasks share an `Arc<Mux>`.
    frames: tokio::sync::Mutex<mpsc::Receiver<Result<Received, ClientError>>>,
    incoming: tokio::sync::Mutex<mpsc::UnboundedReceiver<IncomingStream>>,
}

impl std::fmt::Debug for Streams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Streams")
            .field("open", &self.map.len())
            .finish_non_exhaustive()
    }
}

impl Mux {
    /// Takes over `conn`, starting its reader and writer tasks on the current tokio runtime.
    /// They end when the connection ends; dropping the `Mux` closes the connection.
    pub fn new(conn: Connection) -> Self {
        let (sender, receiver) = conn.split();
        Self::from_parts(sender, receiver)
    }

    /// [`Mux::new`] for a connection already split (e.g. one whose frames were read
    /// before its streams began). No other task may use `receiver`'s connection for
    /// receiving any more; `sender` clones stay usable.
    pub fn from_parts(sender: Sender, mut receiver: Receiver) -> Self {
        let (out_tx, out_rx) = mpsc::unbounded_channel();
        let (frames_tx, frames) = mpsc::channel(FRAME_BACKLOG);
        let (incoming_tx, incoming) = mpsc::unbounded_channel();
        let streams = Arc::new(Mutex::new(Streams {
            map: HashMap::new(),
            next_id: 1,
        }));
        tokio::spawn(write_loop(sender.clone(), out_rx));
        let reader = Reader {
            streams: streams.clone(),
            out: out_tx.clone(),
            frames: frames_tx,
            incoming: incoming_tx,
        };
        tokio::spawn(async move {
            let end = loop {
                match receiver.recv().await {
                    Ok(Incoming::Frame(r)) => {
                        if !reader.on_frame(r).await {
                            break Ended {
                                code: ErrorCode::Internal.into(),
                                reason: "the Mux was dropped".into(),
                            };
                        }
                    }
                    Ok(Incoming::Closed { code, reason }) => {
                        let _ = reader
                            .frames
                            .send(Err(ClientError::Closed {
                                code,
                                reason: reason.clone(),
                            }))
                            .await;
                        break Ended {
                            code: ErrorCode::ShuttingDown.into(),
                            reason: format!("the gateway closed the connection: {reason}"),
                        };
                    }
                    Err(e) => {
                        let reason = e.to_string();
                        let _ = reader.frames.send(Err(e)).await;
                        break Ended {
                            code: ErrorCode::Internal.into(),
                            reason: format!("the connection failed: {reason}"),
                        };
                    }
                }
            };
            reader.end_all(&end);
        });
        Self {
            sender,
            out: out_tx,
            streams,
            frames: tokio::sync::Mutex::new(frames),
            incoming: tokio::sync::Mutex::new(incoming),
        }
    }

    /// The connection's sender, for commands, responses, events and control requests.
    pub fn sender(&self) -> &Sender {
        &self.sender
    }

    /// The next frame that is not a stream frame; `Err` once the connection has ended (the
    /// first time with what ended it). Cancel-safe, like [`Mux::accept_stream`]; the
    /// frames wait for it (up to 1024, then the connection's reader waits too), so a
    /// program must keep calling it while streams run.
    pub async fn next_frame(&self) -> Result<Received, ClientError> {
        match self.frames.lock().await.recv().await {
            Some(r) => r,
            None => Err(ClientError::Protocol("the connection has ended".into())),
        }
    }

    /// Manager side: opens a stream to `unit` with the open parameters `params` and waits
    /// until the device accepts it (its first StreamWindow). A refusal is
    /// [`ClientError::StreamRefused`] with the device's code and reason.
    pub async fn open_stream(
        &self,
        unit: &str,
        params: &[u8],
    ) -> Result<DevgateStream, ClientError> {
        let unit: Arc<str> = Arc::from(unit);
        let (tx, rx) = oneshot::channel();
        let shared = Arc::new(Mutex::new(StreamState {
            opened: Some(tx),
            ..StreamState::default()
        }));
        let (id, window) = {
            let mut streams = self.streams.lock().unwrap_or_else(PoisonError::into_inner);
            let mut id = streams.next_id;
            while streams.map.contains_key(&(unit.clone(), id)) || id == 0 {
                id = id.wrapping_add(1);
            }
            streams.next_id = id.wrapping_add(1);
            streams.map.insert((unit.clone(), id), shared.clone());
            (id, window_for(streams.map.len()))
        };
        lock(&shared).window = window;
        let stream = DevgateStream {
            unit: unit.clone(),
            id,
            shared,
            out: self.out.clone(),
            streams: self.streams.clone(),
        };
        self.out
            .send(Out::Open {
                unit,
                id,
                window,
                params: Bytes::copy_from_slice(params),
            })
            .map_err(|_| ClientError::Protocol("the connection has ended".into()))?;
        match rx.await {
            Ok(Ok(())) => Ok(stream),
            Ok(Err(ended)) => Err(ClientError::StreamRefused {
                code: ended.code,
                reason: ended.reason,
            }),
            Err(_) => Err(ClientError::Protocol("the connection has ended".into())),
        }
    }

    /// Device side: the next stream a manager opened; `None` once the connection has ended
    /// ([`Mux::next_frame`] then says how).
    pub async fn accept_stream(&self) -> Option<IncomingStream> {
        self.incoming.lock().await.recv().await
    }

    /// Hands the non-stream frames to their own owner (e.g. a task that drains them while
    /// streams run: the reader waits once [`FRAME_BACKLOG`] frames are unread, which would
    /// stall the streams too). [`Mux::next_frame`] returns an error afterwards.
    pub fn frames(&mut self) -> Frames {
        let (_, closed) = mpsc::channel(1);
        Frames(std::mem::replace(self.frames.get_mut(), closed))
    }

    /// Device side: hands the incoming streams to their own owner (a task of their own,
    /// while another waits for frames with [`Mux::next_frame`]). [`Mux::accept_stream`]
    /// returns `None` afterwards.
    pub fn incoming_streams(&mut self) -> IncomingStreams {
        let (_, closed) = mpsc::unbounded_channel();
        IncomingStreams(std::mem::replace(self.incoming.get_mut(), closed))
    }
}

/// The non-stream frames of a [`Mux`], taken out with [`Mux::frames`].
#[derive(Debug)]
pub struct Frames(mpsc::Receiver<Result<Received, ClientError>>);

impl Frames {
    /// As [`Mux::next_frame`].
    pub async fn next(&mut self) -> Result<Received, ClientError> {
        match self.0.recv().await {
            Some(r) => r,
            None => Err(ClientError::Protocol("the connection has ended".into())),
        }
    }
}

/// The streams managers open on this device, taken out of a [`Mux`] with
/// [`Mux::incoming_streams`].
#[derive(Debug)]
pub struct IncomingStreams(mpsc::UnboundedReceiver<IncomingStream>);

impl IncomingStreams {
    /// The next stream a manager opened; `None` once the connection has ended.
    pub async fn next(&mut self) -> Option<IncomingStream> {
        self.0.recv().await
    }
}

impl Drop for Mux {
    /// Dropping the `Mux` ends the connection (a WebSocket Close, code 1000): its streams
    /// end with it.
    fn drop(&mut self) {
        if self.out.send(Out::Goodbye).is_err()
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            // The writer task is gone (the connection failed): close directly.
            let sender = self.sender.clone();
            rt.spawn(async move {
                let _ = sender.close(1000, "").await;
            });
        }
    }
}

/// A stream a manager opened, before this side accepts or refuses it.
#[derive(Debug)]
pub struct IncomingStream {
    params: Bytes,
    stream: DevgateStream,
}

impl IncomingStream {
    /// The open parameters (e.g. `pty` or `tcp:127.0.0.1:22`).
    pub fn params(&self) -> &[u8] {
        &self.params
    }

    /// Accepts: grants the manager credit and returns the stream.
    pub fn accept(self) -> DevgateStream {
        let s = self.stream;
        let window = window_for(
            s.streams
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .map
                .len(),
        );
        lock(&s.shared).window = window;
        let _ = s.out.send(Out::Window {
            unit: s.unit.clone(),
            id: s.id,
            increment: window,
        });
        s
    }

    /// Refuses with an error `code` (see PROTOCOL.md section 7) and a reason for the manager.
    pub fn refuse(self, code: ErrorCode, reason: &str) {
        let s = self.stream;
        lock(&s.shared).closed_locally = true;
        s.forget();
        let _ = s.out.send(Out::Close {
            unit: s.unit.clone(),
            id: s.id,
            code: code.into(),
            reason: reason.to_owned(),
        });
    }
}

struct Reader {
    streams: Arc<Mutex<Streams>>,
    out: mpsc::UnboundedSender<Out>,
    frames: mpsc::Sender<Result<Received, ClientError>>,
    incoming: mpsc::UnboundedSender<IncomingStream>,
}

impl Reader {
    fn find(&self, unit: &str, id: u32) -> Option<Shared> {
        let streams = self.streams.lock().unwrap_or_else(PoisonError::into_inner);
        streams.map.get(&(Arc::from(unit), id)).cloned()
    }

    /// Sorts one frame; false when nobody listens any more.
    async fn on_frame(&self, r: Received) -> bool {
        let f = r.frame();
        match f.body {
            Body::StreamOpen { window, payload } => {
                let unit: Arc<str> = Arc::from(f.unit);
                let shared = Arc::new(Mutex::new(StreamState {
                    credit: u64::from(window),
                    ..StreamState::default()
                }));
                self.streams
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .map
                    .insert((unit.clone(), f.id), shared.clone());
                let params = r.clone().into_bytes().slice_ref(payload);
                let incoming = IncomingStream {
                    params,
                    stream: DevgateStream {
                        unit,
                        id: f.id,
                        shared,
                        out: self.out.clone(),
                        streams: self.streams.clone(),
                    },
                };
                if let Err(refused) = self.incoming.send(incoming) {
                    refused
                        .0
                        .refuse(ErrorCode::NotPermitted, "this client accepts no streams");
                }
                true
            }
            Body::StreamData { payload } => {
                if let Some(s) = self.find(f.unit, f.id) {
                    let data = r.clone().into_bytes().slice_ref(payload);
                    let mut st = lock(&s);
                    if st.ended.is_none() && !st.closed_locally {
                        st.data.push_back(data);
                        if let Some(w) = st.read_waker.take() {
                            w.wake();
                        }
                    }
                }
                true
            }
            Body::StreamWindow { increment } => {
                if let Some(s) = self.find(f.unit, f.id) {
                    let mut st = lock(&s);
                    st.credit += u64::from(increment);
                    if let Some(tx) = st.opened.take() {
                        let _ = tx.send(Ok(()));
                    }
                    if let Some(w) = st.write_waker.take() {
                        w.wake();
                    }
                }
                true
            }
            Body::StreamClose { code, reason } => {
                let key = (Arc::from(f.unit), f.id);
                let removed = self
                    .streams
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .map
                    .remove(&key);
                if let Some(s) = removed {
                    end(
                        &s,
                        &Ended {
                            code,
                            reason: reason.to_owned(),
                        },
                    );
                }
                true
            }
            // Frames for a stream that this side closed meanwhile (PROTOCOL.md section 5).
            Body::Error {
                code: ErrorCode::UnknownStream,
                ..
            } => true,
            // A StreamOpen the gateway refused itself (device not connected, too many
            // streams, …) is answered with an Error for the stream id: it ends that open.
            Body::Error { code, message } if self.fail_open(f.unit, f.id, code, message) => true,
            _ => self.frames.send(Ok(r.clone())).await.is_ok(),
        }
    }

    /// Ends a stream whose open is still waiting for the device, if `unit`/`id` names one.
    fn fail_open(&self, unit: &str, id: u32, code: ErrorCode, message: &str) -> bool {
        let Some(s) = self.find(unit, id) else {
            return false;
        };
        if lock(&s).opened.is_none() {
            return false;
        }
        self.streams
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .map
            .remove(&(Arc::from(unit), id));
        end(
            &s,
            &Ended {
                code: code.into(),
                reason: message.to_owned(),
            },
        );
        true
    }

    fn end_all(&self, why: &Ended) {
        let all: Vec<Shared> = self
            .streams
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .map
            .drain()
            .map(|(_, s)| s)
            .collect();
        for s in all {
            end(&s, why);
        }
    }
}

/// The receive window of each of `open` streams on one connection.
fn window_for(open: usize) -> u32 {
    let share = CONNECTION_WINDOW / u64::try_from(open.max(1)).unwrap_or(u64::MAX);
    u32::try_from(share.clamp(u64::from(MIN_WINDOW), u64::from(STREAM_WINDOW)))
        .unwrap_or(STREAM_WINDOW)
}

/// Marks a stream ended and wakes whoever waits on it.
fn end(s: &Shared, why: &Ended) {
    let mut st = lock(s);
    if st.ended.is_none() {
        st.ended = Some(why.clone());
    }
    if let Some(tx) = st.opened.take() {
        let _ = tx.send(Err(why.clone()));
    }
    if let Some(w) = st.read_waker.take() {
        w.wake();
    }
    if let Some(w) = st.write_waker.take() {
        w.wake();
    }
}

async fn write_loop(sender: Sender, mut out: mpsc::UnboundedReceiver<Out>) {
    let mut batch = Vec::new();
    while out.recv_many(&mut batch, 64).await > 0 {
        let mut frames: Vec<Frame<'_>> = Vec::with_capacity(batch.len());
        // Each write takes at most about BATCH_BYTES of payload (or one frame): the
        // connection gives its output buffer back after any write that grew it past
        // 64 KiB (so idle connections stay small), and a whole 1 MiB batch would make it
        // allocate and grow that buffer again for every write.
        let mut bytes = 0usize;
        for o in &batch {
            let size = o.payload_len();
            let Some(frame) = o.frame() else {
                // Goodbye: what came before it, then the WebSocket Close.
                let _ = sender.send_batch(&frames).await;
                let _ = sender.close(1000, "").await;
                return;
            };
            if !frames.is_empty() && bytes + size > BATCH_BYTES {
                if sender.send_batch(&frames).await.is_err() {
                    // The reader sees the connection end and ends every stream.
                    return;
                }
                frames.clear();
                bytes = 0;
            }
            frames.push(frame);
            bytes += size;
        }
        if sender.send_batch(&frames).await.is_err() {
            return;
        }
        drop(frames);
        batch.clear();
    }
}

/// One devgate stream as an I/O object (see the module docs).
#[derive(Debug)]
pub struct DevgateStream {
    unit: Arc<str>,
    id: u32,
    shared: Shared,
    out: mpsc::UnboundedSender<Out>,
    streams: Arc<Mutex<Streams>>,
}

impl DevgateStream {
    /// This side's stream id.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// The device's unit ID (manager side; empty on the device side).
    pub fn unit(&self) -> &str {
        &self.unit
    }

    /// Closes the stream with an error `code` and `reason` (code 0: normal close; this is
    /// what `poll_shutdown` and dropping do).
    pub fn close_with(&self, code: u16, reason: &str) {
        let mut st = lock(&self.shared);
        if st.closed_locally || st.ended.is_some() {
            return;
        }
        st.closed_locally = true;
        drop(st);
        self.forget();
        let _ = self.out.send(Out::Close {
            unit: self.unit.clone(),
            id: self.id,
            code,
            reason: reason.to_owned(),
        });
    }

    fn forget(&self) {
        self.streams
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .map
            .remove(&(self.unit.clone(), self.id));
    }
}

impl Drop for DevgateStream {
    fn drop(&mut self) {
        self.close_with(0, "");
    }
}

impl AsyncRead for DevgateStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let mut st = lock(&this.shared);
        if st.data.is_empty() {
            return match &st.ended {
                Some(e) if e.code == 0 => Poll::Ready(Ok(())),
                Some(e) => Poll::Ready(Err(e.to_io())),
                None if st.closed_locally => Poll::Ready(Ok(())),
                None => {
                    st.read_waker = Some(cx.waker().clone());
                    Poll::Pending
                }
            };
        }
        let mut read = 0usize;
        while buf.remaining() > 0 {
            let Some(front) = st.data.front_mut() else {
                break;
            };
            let n = front.len().min(buf.remaining());
            buf.put_slice(&front[..n]);
            read += n;
            if n == front.len() {
                st.data.pop_front();
            } else {
                bytes::Buf::advance(front, n);
            }
        }
        st.consumed = st
            .consumed
            .saturating_add(u32::try_from(read).unwrap_or(u32::MAX));
        if st.consumed >= st.window / 2 && st.ended.is_none() && !st.closed_locally {
            // Streams share the connection's window: return what was read, less when more
            // streams opened since (the window shrinks as the peer uses up its credit), more
            // when some closed. The lock order is always stream state, then the map.
            let open = this
                .streams
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .map
                .len();
            let target = window_for(open);
            let left = st.window.saturating_sub(std::mem::take(&mut st.consumed));
            st.window = target.max(left);
            if target > left {
                let _ = this.out.send(Out::Window {
                    unit: this.unit.clone(),
                    id: this.id,
                    increment: target - left,
                });
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for DevgateStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let mut st = lock(&this.shared);
        if let Some(e) = &st.ended {
            return Poll::Ready(Err(e.to_io()));
        }
        if st.closed_locally {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the stream was closed by this side",
            )));
        }
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if st.credit == 0 {
            st.write_waker = Some(cx.waker().clone());
            return Poll::Pending;
        }
        let n = buf
            .len()
            .min(MAX_CHUNK)
            .min(usize::try_from(st.credit).unwrap_or(usize::MAX));
        st.credit -= n as u64;
        drop(st);
        this.out
            .send(Out::Data {
                unit: this.unit.clone(),
                id: this.id,
                bytes: Bytes::copy_from_slice(&buf[..n]),
            })
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the connection has ended"))?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Frames are handed to the writer task in order; credit bounds what is in flight.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.close_with(0, "");
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_share_the_connection_window_within_bounds() {
        assert_eq!(window_for(0), STREAM_WINDOW);
        assert_eq!(window_for(8), STREAM_WINDOW);
        assert_eq!(window_for(16), 512 * 1024);
        assert_eq!(window_for(20), 419_430);
        assert_eq!(window_for(100_000), MIN_WINDOW);
        for open in 1..2000 {
            let w = u64::from(window_for(open));
            assert!(w * open as u64 <= CONNECTION_WINDOW || w == u64::from(MIN_WINDOW));
        }
    }
}
