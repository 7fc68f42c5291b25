//! An upgraded WebSocket connection to the gateway and its two halves.
//!
//! The state is split along the stream's two directions so that the same code
//! serves a whole [`Connection`] and a [`Sender`]/[`Receiver`] pair:
//!
//! * [`ReadState`] owns the read buffer and the WebSocket decoder. Turning
//!   buffered bytes into events is synchronous; the only await on the read
//!   path is `read_buf`, which is cancel-safe, so dropping a `recv` future
//!   never loses bytes: whatever arrived stays in the buffer for the next call.
//! * [`WriteState`] owns an output buffer that outlives each call. A frame is
//!   encoded into it first and written afterwards, so a write interrupted by
//!   cancellation is finished by the next write instead of leaving half a
//!   WebSocket frame on the wire.
//!
//! Pings are answered from inside `recv`: the pong is remembered in the read
//! state until it has been moved into the output buffer, again so that
//! cancellation cannot lose it or tear it.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use devgate_proto::frame::{self, Frame};
use devgate_proto::ws::{self, Decoded, Decoder, Message, Opcode};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use rustls_pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::Mutex;

use crate::error::from_io;
use crate::{CLOSE_TIMEOUT, ClientError};

/// The TLS stream under every connection.
pub(crate) type Stream = tokio_rustls::client::TlsStream<TcpStream>;

/// Free space below which the read buffer is grown before a read.
const MIN_READ_SPACE: usize = 256;
/// How much the read buffer grows by at least when it must.
const READ_CHUNK: usize = 2048;
/// Buffers larger than this (after a big message) are given back once they
/// are empty, so that 50,000 idle connections do not each keep a megabyte.
const SHRINK_ABOVE: usize = 64 * 1024;
/// RFC 6455 §5.5: control frame payloads are at most 125 bytes.
const MAX_CONTROL_PAYLOAD: usize = ws::MAX_CONTROL_PAYLOAD;

/// A devgate frame received from the gateway. It owns the WebSocket payload
/// in one [`Bytes`] (validated on receipt) and decodes it on access, which is
/// cheap: the header is fixed-size and the body borrows from the bytes.
#[derive(Clone)]
pub struct Received {
    bytes: Bytes,
}

impl Received {
    /// The frame, borrowing from these bytes.
    pub fn frame(&self) -> Frame<'_> {
        match Frame::decode(&self.bytes) {
            Ok(frame) => frame,
            // `recv` only builds a `Received` from bytes that decoded.
            Err(e) => unreachable!("a received frame decoded once and not a second time: {e}"),
        }
    }

    /// The encoded frame (the WebSocket message payload).
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The encoded frame, without copying.
    pub fn into_bytes(self) -> Bytes {
        self.bytes
    }
}

impl fmt::Debug for Received {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Received")
            .field("len", &self.bytes.len())
            .field("frame", &self.frame())
            .finish()
    }
}

/// What [`Connection::recv`] hands back.
#[derive(Debug, Clone)]
pub enum Incoming {
    /// A devgate frame.
    Frame(Received),
    /// The gateway closed the WebSocket; its Close has already been answered.
    /// Reported once; later calls return [`ClientError::Closed`].
    Closed {
        /// The gateway's close code, if it sent one.
        code: Option<u16>,
        /// The gateway's reason text.
        reason: String,
    },
}

/// What the decoder made of the buffered bytes.
enum Step {
    /// Something to hand to the caller.
    Ready(Incoming),
    /// A frame was consumed that the caller does not see (ping, pong,
    /// fragment, close); look again.
    Again,
    /// The buffer holds no complete frame.
    NeedData,
}

/// The read direction: buffered bytes, the decoder, and control frames owed
/// to the gateway.
pub(crate) struct ReadState {
    buf: BytesMut,
    decoder: Decoder,
    auto_pong: bool,
    /// Payload of the latest ping not yet answered (RFC 6455 allows answering
    /// only the latest). Its allocation is reused.
    pong: Vec<u8>,
    pong_pending: bool,
    /// The gateway's Close, once received.
    peer_close: Option<(Option<u16>, String)>,
    /// The gateway's Close still needs our Close in answer.
    echo_pending: bool,
    /// `Incoming::Closed` has been returned.
    close_reported: bool,
    /// The gateway broke WebSocket framing; the decoder cannot continue.
    broken: bool,
    /// Close code owed to the gateway after it broke the protocol.
    close_owed: Option<u16>,
}

impl ReadState {
    /// `buf` holds whatever arrived after the HTTP response head.
    pub(crate) fn new(buf: BytesMut, max_message: usize) -> Self {
        Self {
            buf,
            decoder: Decoder::new(ws::Role::Client, max_message),
            auto_pong: true,
            pong: Vec::new(),
            pong_pending: false,
            peer_close: None,
            echo_pending: false,
            close_reported: false,
            broken: false,
            close_owed: None,
        }
    }

    fn has_control(&self) -> bool {
        self.pong_pending || self.echo_pending || self.close_owed.is_some()
    }

    /// Moves owed control frames into the output buffer (synchronously, so
    /// that they are either still owed or queued, never lost).
    fn move_control(&mut self, wr: &mut WriteState) {
        if self.pong_pending {
            self.pong_pending = false;
            if wr.close_sent.is_none() {
                let mask = wr.mask();
                ws::encode_frame(&mut wr.out, Opcode::Pong, &self.pong, Some(mask));
                wr.dirty = true;
            }
        }
        if self.echo_pending {
            self.echo_pending = false;
            if wr.close_sent.is_none() {
                // The gateway closed first: later sends report its Close.
                wr.peer_close.clone_from(&self.peer_close);
                // Echo the gateway's code, as RFC 6455 §5.5.1 suggests; a Close
                // without a code is answered by one without a code.
                match self.peer_close.as_ref().and_then(|(code, _)| *code) {
                    Some(code) => wr.push_close(code, ""),
                    None => {
                        let mask = wr.mask();
                        ws::encode_frame(&mut wr.out, Opcode::Close, &[], Some(mask));
                        wr.close_sent = Some(1005);
                        wr.dirty = true;
                    }
                }
            }
        }
        if let Some(code) = self.close_owed.take()
            && wr.close_sent.is_none()
        {
            wr.push_close(code, "invalid WebSocket framing from the gateway");
        }
    }

    /// Decodes the next event out of the buffer, without I/O.
    fn next_step(&mut self) -> Result<Step, ClientError> {
        if let Some((code, reason)) = &self.peer_close {
            if self.close_reported {
                return Err(ClientError::Closed {
                    code: *code,
                    reason: reason.clone(),
                });
            }
            self.close_reported = true;
            return Ok(Step::Ready(Incoming::Closed {
                code: *code,
                reason: reason.clone(),
            }));
        }
        if self.broken {
            return Err(ClientError::Protocol(
                "the connection is unusable after the gateway broke WebSocket framing".to_owned(),
            ));
        }
        let decoded = match self.decoder.decode(&mut self.buf[..]) {
            Ok(decoded) => decoded,
            Err(e) => {
                // The decoder's state is unspecified after an error: tell the
                // gateway why (on the caller's way out) and stop decoding.
                self.broken = true;
                self.close_owed = Some(e.close_code());
                return Err(ClientError::Ws(e));
            }
        };
        let (consumed, outcome) = match decoded {
            Decoded::Incomplete => return Ok(Step::NeedData),
            Decoded::Frame { consumed, message } => {
                let outcome = match message {
                    None => Ok(Step::Again),
                    Some(Message::Binary(payload)) => match Frame::decode(payload) {
                        Ok(_) => Ok(Step::Ready(Incoming::Frame(Received {
                            bytes: Bytes::copy_from_slice(payload),
                        }))),
                        Err(e) => Err(ClientError::Frame(e)),
                    },
                    Some(Message::Text(payload)) => Err(ClientError::Protocol(format!(
                        "text message of {} bytes on a devgate frame channel (only binary \
                         messages are allowed)",
                        payload.len()
                    ))),
                    Some(Message::Ping(payload)) => {
                        if self.auto_pong {
                            self.pong.clear();
                            self.pong.extend_from_slice(payload);
                            self.pong_pending = true;
                        }
                        Ok(Step::Again)
                    }
                    Some(Message::Pong(_)) => Ok(Step::Again),
                    Some(Message::Close { code, reason }) => {
                        self.peer_close = Some((code, reason.to_owned()));
                        self.echo_pending = true;
                        Ok(Step::Again)
                    }
                };
                (consumed, outcome)
            }
        };
        // Consume the frame even when it was refused, so that the next call
        // looks at the following one.
        self.buf.advance(consumed);
        if self.buf.is_empty() && self.buf.capacity() > SHRINK_ABOVE {
            self.buf = BytesMut::new();
        }
        outcome
    }

    /// Reads more bytes into the buffer. Cancel-safe (`read_buf` is).
    async fn fill<R: AsyncRead + Unpin>(&mut self, io: &mut R) -> Result<(), ClientError> {
        // For a large frame whose header is in, make room for all of it at
        // once instead of growing step by step. `decode` has already checked
        // the declared length against the message limit.
        let want = self
            .decoder
            .needed(&self.buf)
            .unwrap_or(0)
            .max(MIN_READ_SPACE);
        if self.buf.capacity() - self.buf.len() < want {
            self.buf.reserve(want.max(READ_CHUNK));
        }
        match io.read_buf(&mut self.buf).await {
            Ok(0) => Err(ClientError::Io(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "gateway closed the connection without a WebSocket Close",
            ))),
            Ok(_) => Ok(()),
            Err(e) => Err(from_io(e, "reading from the gateway")),
        }
    }
}

/// The write direction: a per-connection mask generator and an output buffer
/// that keeps unwritten bytes across cancelled calls.
pub(crate) struct WriteState {
    out: Vec<u8>,
    written: usize,
    /// `out` holds bytes not yet written and flushed.
    dirty: bool,
    /// Masks need to be unpredictable to intermediaries, not secret: a small
    /// fast generator, seeded once per connection, is enough.
    rng: SmallRng,
    close_sent: Option<u16>,
    peer_close: Option<(Option<u16>, String)>,
}

impl WriteState {
    pub(crate) fn new() -> Self {
        Self {
            out: Vec::new(),
            written: 0,
            dirty: false,
            rng: SmallRng::from_rng(&mut rand::rng()),
            close_sent: None,
            peer_close: None,
        }
    }

    fn mask(&mut self) -> [u8; 4] {
        self.rng.random()
    }

    fn check_open(&self) -> Result<(), ClientError> {
        if let Some((code, reason)) = &self.peer_close {
            return Err(ClientError::Closed {
                code: *code,
                reason: reason.clone(),
            });
        }
        if let Some(code) = self.close_sent {
            return Err(ClientError::ClosedLocally { code });
        }
        Ok(())
    }

    fn push_frame(&mut self, frame: &Frame<'_>) {
        let mask = self.mask();
        frame::encode_ws(&mut self.out, frame, Some(mask));
        self.dirty = true;
    }

    fn push_ping(&mut self, payload: &[u8]) -> Result<(), ClientError> {
        if payload.len() > MAX_CONTROL_PAYLOAD {
            return Err(ClientError::Config(format!(
                "ping payload of {} bytes exceeds the 125 bytes RFC 6455 allows",
                payload.len()
            )));
        }
        let mask = self.mask();
        ws::encode_frame(&mut self.out, Opcode::Ping, payload, Some(mask));
        self.dirty = true;
        Ok(())
    }

    fn push_close(&mut self, code: u16, reason: &str) {
        let mask = self.mask();
        // encode_close cuts the reason to fit the control frame limit.
        ws::encode_close(&mut self.out, code, reason, Some(mask));
        self.close_sent = Some(code);
        self.dirty = true;
    }

    /// Writes and flushes everything buffered. Cancel-safe in the sense that
    /// matters: what was not written stays buffered and goes out first on the
    /// next call, so frames are never torn or reordered.
    async fn flush<W: AsyncWrite + Unpin>(&mut self, io: &mut W) -> Result<(), ClientError> {
        if !self.dirty {
            return Ok(());
        }
        while let Some(rest) = self.out.get(self.written..).filter(|r| !r.is_empty()) {
            let n = io
                .write(rest)
                .await
                .map_err(|e| from_io(e, "writing to the gateway"))?;
            if n == 0 {
                return Err(ClientError::Io(std::io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        io.flush()
            .await
            .map_err(|e| from_io(e, "writing to the gateway"))?;
        self.out.clear();
        self.written = 0;
        self.dirty = false;
        if self.out.capacity() > SHRINK_ABOVE {
            self.out = Vec::new();
        }
        Ok(())
    }
}

/// An upgraded WebSocket connection to the gateway. It owns no task: all work
/// happens inside the calls, so tens of thousands fit in one runtime.
pub struct Connection {
    stream: Stream,
    rd: ReadState,
    wr: WriteState,
}

impl fmt::Debug for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connection")
            .field("peer", &self.stream.get_ref().0.peer_addr().ok())
            .field("buffered", &self.rd.buf.len())
            .field("close_sent", &self.wr.close_sent)
            .field("peer_close", &self.rd.peer_close)
            .finish_non_exhaustive()
    }
}

impl Connection {
    pub(crate) fn new(stream: Stream, leftover: BytesMut, max_message: usize) -> Self {
        Self {
            stream,
            rd: ReadState::new(leftover, max_message),
            wr: WriteState::new(),
        }
    }

    /// Sends one frame as a masked binary WebSocket message and flushes it.
    ///
    /// If the future is dropped before it finishes, the frame (or its rest)
    /// stays buffered and goes out ahead of the next write; the wire never
    /// sees half a frame followed by another one.
    pub async fn send(&mut self, frame: &Frame<'_>) -> Result<(), ClientError> {
        self.wr.check_open()?;
        self.wr.push_frame(frame);
        self.wr.flush(&mut self.stream).await
    }

    /// Sends several frames with a single flush.
    pub async fn send_batch(&mut self, frames: &[Frame<'_>]) -> Result<(), ClientError> {
        self.wr.check_open()?;
        for frame in frames {
            self.wr.push_frame(frame);
        }
        self.wr.flush(&mut self.stream).await
    }

    /// The next devgate frame from the gateway.
    ///
    /// Pings are answered with pongs on the way (unless
    /// [`set_auto_pong`](Self::set_auto_pong) turned that off); a Close is
    /// answered with a Close and returned once as [`Incoming::Closed`]. A text
    /// message or an undecodable frame is an error, after which the next call
    /// continues with the following message.
    ///
    /// Cancel-safe: dropping the future loses no data; partially received
    /// bytes stay buffered in the connection.
    pub async fn recv(&mut self) -> Result<Incoming, ClientError> {
        loop {
            if self.rd.has_control() {
                self.rd.move_control(&mut self.wr);
            }
            // Errors writing a pong or Close are not the caller's business
            // here: if the connection is broken the read below says so, and
            // a Close already received must still be reported.
            let _ = self.wr.flush(&mut self.stream).await;
            let step = match self.rd.next_step() {
                Ok(step) => step,
                Err(e) => {
                    if self.rd.has_control() {
                        self.rd.move_control(&mut self.wr);
                        let _ = self.wr.flush(&mut self.stream).await;
                    }
                    return Err(e);
                }
            };
            match step {
                Step::Ready(incoming) => return Ok(incoming),
                Step::Again => {}
                Step::NeedData => self.rd.fill(&mut self.stream).await?,
            }
        }
    }

    /// [`recv`](Self::recv) with a time limit; `Ok(None)` when it expired.
    pub async fn recv_timeout(&mut self, d: Duration) -> Result<Option<Incoming>, ClientError> {
        match tokio::time::timeout(d, self.recv()).await {
            Ok(r) => r.map(Some),
            Err(_) => Ok(None),
        }
    }

    /// Sends a ping (at most 125 bytes of payload). The gateway's pong is
    /// consumed silently by `recv`.
    pub async fn ping(&mut self, payload: &[u8]) -> Result<(), ClientError> {
        self.wr.check_open()?;
        self.wr.push_ping(payload)?;
        self.wr.flush(&mut self.stream).await
    }

    /// Whether `recv` answers pings (the default). Turning it off makes the
    /// connection look dead to the gateway while staying open.
    pub fn set_auto_pong(&mut self, on: bool) {
        self.rd.auto_pong = on;
        if !on {
            self.rd.pong_pending = false;
        }
    }

    /// Closes the WebSocket: sends a Close with `code` and `reason` (cut to
    /// 123 bytes), waits up to 2 s for the gateway's Close (discarding frames
    /// that arrive meanwhile) and shuts TLS down.
    ///
    /// Returns [`ClientError::Timeout`] when the gateway did not answer in
    /// time; the connection is shut down either way.
    pub async fn close(mut self, code: u16, reason: &str) -> Result<(), ClientError> {
        let mut outcome = Ok(());
        if self.wr.close_sent.is_none() && self.rd.peer_close.is_none() {
            self.wr.push_close(code, reason);
            self.wr.flush(&mut self.stream).await?;
            let wait_for_peer = async {
                loop {
                    match self.recv().await {
                        Ok(Incoming::Closed { .. }) => return Ok(()),
                        Ok(Incoming::Frame(_)) => {}
                        // A frame we cannot use does not matter any more.
                        Err(ClientError::Frame(_)) => {}
                        Err(ClientError::Protocol(_)) if !self.rd.broken => {}
                        Err(e) => return Err(e),
                    }
                }
            };
            outcome = match tokio::time::timeout(CLOSE_TIMEOUT, wait_for_peer).await {
                Ok(r) => r,
                Err(_) => Err(ClientError::Timeout("waiting for the gateway's Close")),
            };
        } else {
            // The gateway closed first; make sure our answer went out.
            let _ = self.recv().await;
        }
        // The gateway may already have dropped TCP after the Close handshake.
        let _ = self.stream.shutdown().await;
        outcome
    }

    /// Splits the connection into a [`Sender`] (cloneable) and a
    /// [`Receiver`]. They share the write direction behind a tokio mutex, so
    /// the receiver keeps answering pings.
    pub fn split(self) -> (Sender, Receiver) {
        let (read, write) = tokio::io::split(self.stream);
        let shared = Arc::new(Mutex::new(SharedWriter {
            io: write,
            st: self.wr,
        }));
        (
            Sender {
                shared: Arc::clone(&shared),
            },
            Receiver {
                io: read,
                rd: self.rd,
                shared,
            },
        )
    }

    /// The certificate chain the gateway presented.
    pub fn peer_certificates(&self) -> Option<Vec<CertificateDer<'static>>> {
        self.stream
            .get_ref()
            .1
            .peer_certificates()
            .map(<[_]>::to_vec)
    }

    /// The negotiated TLS version.
    pub fn protocol_version(&self) -> Option<rustls::ProtocolVersion> {
        self.stream.get_ref().1.protocol_version()
    }

    /// Whether the TLS handshake was full or resumed a previous session.
    pub fn handshake_kind(&self) -> Option<rustls::HandshakeKind> {
        self.stream.get_ref().1.handshake_kind()
    }

    /// The negotiated cipher suite.
    pub fn cipher_suite(&self) -> Option<rustls::SupportedCipherSuite> {
        self.stream.get_ref().1.negotiated_cipher_suite()
    }

    /// The negotiated ALPN protocol.
    pub fn alpn_protocol(&self) -> Option<&[u8]> {
        self.stream.get_ref().1.alpn_protocol()
    }

    /// This side's socket address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.stream.get_ref().0.local_addr()
    }

    /// The gateway's socket address.
    pub fn peer_addr(&self) -> std::io::Result<SocketAddr> {
        self.stream.get_ref().0.peer_addr()
    }
}

struct SharedWriter {
    io: WriteHalf<Stream>,
    st: WriteState,
}

/// The sending half of a split [`Connection`]. Clones share one connection;
/// each frame goes out whole.
#[derive(Clone)]
pub struct Sender {
    shared: Arc<Mutex<SharedWriter>>,
}

impl fmt::Debug for Sender {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sender").finish_non_exhaustive()
    }
}

impl Sender {
    /// See [`Connection::send`].
    pub async fn send(&self, frame: &Frame<'_>) -> Result<(), ClientError> {
        let mut guard = self.shared.lock().await;
        let w = &mut *guard;
        w.st.check_open()?;
        w.st.push_frame(frame);
        w.st.flush(&mut w.io).await
    }

    /// See [`Connection::send_batch`].
    pub async fn send_batch(&self, frames: &[Frame<'_>]) -> Result<(), ClientError> {
        let mut guard = self.shared.lock().await;
        let w = &mut *guard;
        w.st.check_open()?;
        for frame in frames {
            w.st.push_frame(frame);
        }
        w.st.flush(&mut w.io).await
    }

    /// See [`Connection::ping`].
    pub async fn ping(&self, payload: &[u8]) -> Result<(), ClientError> {
        let mut guard = self.shared.lock().await;
        let w = &mut *guard;
        w.st.check_open()?;
        w.st.push_ping(payload)?;
        w.st.flush(&mut w.io).await
    }

    /// Sends a Close. The gateway's answering Close arrives through the
    /// [`Receiver`] as [`Incoming::Closed`]. Closing twice, or after the
    /// gateway closed, does nothing.
    pub async fn close(&self, code: u16, reason: &str) -> Result<(), ClientError> {
        let mut guard = self.shared.lock().await;
        let w = &mut *guard;
        if w.st.close_sent.is_none() && w.st.peer_close.is_none() {
            w.st.push_close(code, reason);
        }
        w.st.flush(&mut w.io).await
    }
}

/// The receiving half of a split [`Connection`].
pub struct Receiver {
    io: ReadHalf<Stream>,
    rd: ReadState,
    shared: Arc<Mutex<SharedWriter>>,
}

impl fmt::Debug for Receiver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Receiver")
            .field("buffered", &self.rd.buf.len())
            .field("peer_close", &self.rd.peer_close)
            .finish_non_exhaustive()
    }
}

impl Receiver {
    /// See [`Connection::recv`]; equally cancel-safe.
    ///
    /// A pong owed while the [`Sender`] holds the write direction is sent as
    /// soon as the sender lets go; the receiver keeps reading meanwhile, so
    /// a sender stalled on a full socket and a gateway stalled on writing to
    /// this client cannot wait on each other.
    pub async fn recv(&mut self) -> Result<Incoming, ClientError> {
        loop {
            if self.rd.echo_pending || self.rd.close_owed.is_some() {
                // The end of the connection: the Close goes out before the
                // caller hears of it, whatever the sender is doing.
                let mut guard = self.shared.lock().await;
                let w = &mut *guard;
                self.rd.move_control(&mut w.st);
                let _ = w.st.flush(&mut w.io).await;
            } else if let Ok(mut guard) = self.shared.try_lock() {
                // Answer a ping, or finish a write a cancelled call left.
                let w = &mut *guard;
                self.rd.move_control(&mut w.st);
                let _ = w.st.flush(&mut w.io).await;
            }
            let step = match self.rd.next_step() {
                Ok(step) => step,
                Err(e) => {
                    if self.rd.has_control() {
                        let mut guard = self.shared.lock().await;
                        let w = &mut *guard;
                        self.rd.move_control(&mut w.st);
                        let _ = w.st.flush(&mut w.io).await;
                    }
                    return Err(e);
                }
            };
            match step {
                Step::Ready(incoming) => return Ok(incoming),
                Step::Again => {}
                Step::NeedData if self.rd.has_control() => {
                    // Both futures are cancel-safe; whichever loses is dropped.
                    let writer = tokio::select! {
                        guard = self.shared.lock() => Some(guard),
                        read = self.rd.fill(&mut self.io) => {
                            read?;
                            None
                        }
                    };
                    if let Some(mut guard) = writer {
                        let w = &mut *guard;
                        self.rd.move_control(&mut w.st);
                        let _ = w.st.flush(&mut w.io).await;
                    }
                }
                Step::NeedData => self.rd.fill(&mut self.io).await?,
            }
        }
    }

    /// See [`Connection::recv_timeout`].
    pub async fn recv_timeout(&mut self, d: Duration) -> Result<Option<Incoming>, ClientError> {
        match tokio::time::timeout(d, self.recv()).await {
            Ok(r) => r.map(Some),
            Err(_) => Ok(None),
        }
    }

    /// See [`Connection::set_auto_pong`].
    pub fn set_auto_pong(&mut self, on: bool) {
        self.rd.auto_pong = on;
        if !on {
            self.rd.pong_pending = false;
        }
    }
}
