//! RFC 6455 WebSocket framing, without the handshake (see [`crate::http`]).
//!
//! A WebSocket frame is a 2- to 14-byte header (FIN bit, opcode, mask bit,
//! a 7-, 16- or 64-bit payload length and, from clients, a 4-byte masking
//! key) followed by the payload. [`Decoder::decode`] takes the front of the
//! connection's read buffer and answers in the mini-redis way: either
//! [`Decoded::Incomplete`] ("read more and call again", an expected state) or
//! one frame plus how many bytes it used, so the driver can advance its
//! buffer. The payload is unmasked where it lies and handed back as a borrowed
//! slice; nothing is copied for the common case of an unfragmented message.
//!
//! The decoder is deliberately strict, because devgate negotiates nothing:
//!
//! * masking must match the [`Role`] (clients mask, servers do not);
//! * RSV bits must be clear, since no extension (permessage-deflate in
//!   particular) is ever accepted;
//! * lengths must use the shortest encoding, and a declared length larger than
//!   the message limit is refused as soon as the header is in, before any of
//!   the body is buffered, so a peer cannot make the gateway wait for (or
//!   allocate) gigabytes;
//! * control frames are at most 125 bytes and never fragmented, and close
//!   frames must carry a valid code and a UTF-8 reason.
//!
//! Fragmented data messages are the one place that allocates: their pieces are
//! copied into a buffer owned by the decoder (bounded by the message limit)
//! and the last fragment yields the whole message. Control frames may arrive
//! between fragments. The buffer is released once the message has been
//! delivered, so a connection that once received a large fragmented message
//! does not keep that memory for the rest of its life.
//!
//! Every [`WsError`] maps to the close code to send before dropping the
//! connection ([`WsError::close_code`]).

use std::fmt;

/// A WebSocket frame opcode (RFC 6455 section 5.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Opcode {
    /// Continuation of a fragmented message.
    Continuation = 0,
    /// UTF-8 text message (devgate rejects these with close code 1003).
    Text = 1,
    /// Binary message: carries one devgate frame.
    Binary = 2,
    /// Close handshake.
    Close = 8,
    /// Keep-alive probe; must be answered with a pong.
    Ping = 9,
    /// Answer to a ping (or an unsolicited heartbeat).
    Pong = 10,
}

impl Opcode {
    /// The opcode for a 4-bit value, `None` for reserved values.
    pub const fn from_u8(value: u8) -> Option<Self> {
        Some(match value {
            0 => Self::Continuation,
            1 => Self::Text,
            2 => Self::Binary,
            8 => Self::Close,
            9 => Self::Ping,
            10 => Self::Pong,
            _ => return None,
        })
    }

    /// Whether this is a control opcode (close, ping, pong).
    pub const fn is_control(self) -> bool {
        (self as u8) & 0x08 != 0
    }
}

/// Which end of the connection the decoder/encoder is on; it decides masking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The gateway side: expects masked input, writes unmasked frames.
    Server,
    /// The device/manager side: expects unmasked input, writes masked frames.
    Client,
}

/// Largest payload of a control frame (close, ping, pong).
pub const MAX_CONTROL_PAYLOAD: usize = 125;

/// Largest possible frame header: 2 bytes, an 8-byte length, a 4-byte mask.
pub const MAX_HEADER_LEN: usize = 14;

/// Close code 1000: normal closure.
pub const CLOSE_NORMAL: u16 = 1000;
/// Close code 1001: the endpoint is going away (gateway shutdown).
pub const CLOSE_GOING_AWAY: u16 = 1001;
/// Close code 1002: protocol error.
pub const CLOSE_PROTOCOL_ERROR: u16 = 1002;
/// Close code 1003: data of a type the endpoint cannot accept (text messages).
pub const CLOSE_UNSUPPORTED_DATA: u16 = 1003;
/// Close code 1007: payload data inconsistent with the message type.
pub const CLOSE_INVALID_PAYLOAD: u16 = 1007;
/// Close code 1008: policy violation.
pub const CLOSE_POLICY_VIOLATION: u16 = 1008;
/// Close code 1009: message too big.
pub const CLOSE_MESSAGE_TOO_BIG: u16 = 1009;
/// Close code 1011: unexpected condition inside the endpoint.
pub const CLOSE_INTERNAL_ERROR: u16 = 1011;
/// Close code 1013: try again later (overload, connection limit).
pub const CLOSE_TRY_AGAIN_LATER: u16 = 1013;

/// Whether `code` may appear in a close frame received from a peer.
///
/// Allowed: 1000-1003 and 1007-1014 (RFC 6455 section 7.4.1 plus the codes
/// IANA registered since: 1012 service restart, 1013 try again later, 1014
/// bad gateway), and 3000-4999 (registered and private use). Codes 1004-1006
/// and 1015 are reserved and must never be sent; below 1000 and 1016-2999 are
/// unassigned.
pub const fn is_valid_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// One decoded message or control frame, borrowing its payload from the read
/// buffer (or from the decoder's reassembly buffer for fragmented messages).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Message<'a> {
    /// A complete binary message.
    Binary(&'a [u8]),
    /// A complete text message; not UTF-8 validated (devgate refuses text).
    Text(&'a [u8]),
    /// A ping with its application data.
    Ping(&'a [u8]),
    /// A pong with its application data.
    Pong(&'a [u8]),
    /// A close frame; `code` is `None` for an empty close payload.
    Close {
        /// The close status code, validated with [`is_valid_close_code`].
        code: Option<u16>,
        /// The UTF-8 close reason (empty if none).
        reason: &'a str,
    },
}

/// Result of [`Decoder::decode`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decoded<'a> {
    /// The buffer does not hold a whole frame yet; read more and call again.
    Incomplete,
    /// One frame was decoded.
    Frame {
        /// Bytes of the buffer the frame used; drop them before the next call.
        consumed: usize,
        /// The message, or `None` for a non-final fragment (buffered inside
        /// the decoder until the final one arrives).
        message: Option<Message<'a>>,
    },
}

/// A WebSocket protocol violation by the peer. The connection cannot continue:
/// send a close frame with [`WsError::close_code`] and drop it.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum WsError {
    /// A server received a frame without the mask bit.
    #[error(
        "received an unmasked WebSocket frame; every frame a client sends \
         must be masked with a random 4-byte key (RFC 6455 section 5.1)"
    )]
    UnmaskedFrame,
    /// A client received a frame with the mask bit.
    #[error(
        "received a masked WebSocket frame; frames sent by a server \
         must not be masked (RFC 6455 section 5.1)"
    )]
    MaskedFrame,
    /// One of RSV1-3 was set.
    #[error(
        "WebSocket frame has RSV1, RSV2 or RSV3 set, but no extension was negotiated \
         (devgate refuses permessage-deflate and all other extensions)"
    )]
    ReservedBits,
    /// A reserved opcode.
    #[error(
        "WebSocket opcode {0:#x} is reserved; valid opcodes are \
         0 (continuation), 1 (text), 2 (binary), 8 (close), 9 (ping) and 10 (pong)"
    )]
    UnknownOpcode(u8),
    /// A control frame longer than 125 bytes.
    #[error("WebSocket close/ping/pong frame carries more than 125 bytes of payload")]
    ControlTooLong,
    /// A control frame with FIN clear.
    #[error("WebSocket close/ping/pong frame has FIN clear; control frames cannot be fragmented")]
    FragmentedControl,
    /// The message (all its fragments together) exceeds the limit.
    #[error("WebSocket message of {len} bytes exceeds this endpoint's limit of {max} bytes")]
    MessageTooBig {
        /// Declared size of the message so far, in bytes.
        len: u64,
        /// The limit.
        max: usize,
    },
    /// A continuation frame arrived with no fragmented message in progress.
    #[error("WebSocket continuation frame received, but no fragmented message was started")]
    UnexpectedContinuation,
    /// A new data message started before the fragmented one was finished.
    #[error(
        "new WebSocket text/binary frame received while a fragmented message is unfinished; \
         the next data frame must be a continuation (opcode 0)"
    )]
    ExpectedContinuation,
    /// A length that would have fit a shorter encoding.
    #[error(
        "WebSocket payload length is not in its shortest encoding \
         (use 7 bits up to 125, 16 bits up to 65535, 64 bits above; RFC 6455 section 5.2)"
    )]
    NonMinimalLength,
    /// A 64-bit length with the most significant bit set.
    #[error("WebSocket 64-bit payload length has its most significant bit set")]
    InvalidLength,
    /// A close payload of 1 byte, or a close code that may not be sent.
    #[error(
        "WebSocket close frame is invalid: its payload must be empty or start with \
         a 2-byte close code from 1000-1003, 1007-1014 or 3000-4999 (RFC 6455 section 7.4)"
    )]
    InvalidClosePayload,
    /// A close reason that is not UTF-8.
    #[error("WebSocket close reason is not valid UTF-8")]
    InvalidUtf8,
}

impl WsError {
    /// The close code to send the peer before dropping the connection: 1009
    /// for an oversized message, 1007 for invalid UTF-8, 1002 (protocol error)
    /// for everything else, including invalid close payloads.
    pub fn close_code(&self) -> u16 {
        match self {
            Self::MessageTooBig { .. } => CLOSE_MESSAGE_TOO_BIG,
            Self::InvalidUtf8 => CLOSE_INVALID_PAYLOAD,
            Self::UnmaskedFrame
            | Self::MaskedFrame
            | Self::ReservedBits
            | Self::UnknownOpcode(_)
            | Self::ControlTooLong
            | Self::FragmentedControl
            | Self::UnexpectedContinuation
            | Self::ExpectedContinuation
            | Self::NonMinimalLength
            | Self::InvalidLength
            | Self::InvalidClosePayload => CLOSE_PROTOCOL_ERROR,
        }
    }
}

/// Incremental WebSocket frame decoder for one connection.
///
/// It keeps only what must survive between frames: the role, the message size
/// limit and, while a fragmented message is in progress, its opcode and the
/// fragments received so far.
pub struct Decoder {
    role: Role,
    max_message: usize,
    /// Opcode of the fragmented message in progress (Text or Binary).
    fragmented: Option<Opcode>,
    reassembly: Vec<u8>,
}

impl fmt::Debug for Decoder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The buffer contents are payload; its size is what matters in logs.
        f.debug_struct("Decoder")
            .field("role", &self.role)
            .field("max_message", &self.max_message)
            .field("fragmented", &self.fragmented)
            .field("reassembled", &self.reassembly.len())
            .finish()
    }
}

/// The parsed, validated fixed part of a frame.
struct Header {
    fin: bool,
    opcode: Opcode,
    mask: Option<[u8; 4]>,
    header_len: usize,
    payload_len: usize,
}

impl Decoder {
    /// A decoder for the given role that refuses messages larger than
    /// `max_message` bytes (after reassembly).
    pub fn new(role: Role, max_message: usize) -> Self {
        Self {
            role,
            max_message,
            fragmented: None,
            reassembly: Vec::new(),
        }
    }

    /// The role this decoder was created with.
    pub fn role(&self) -> Role {
        self.role
    }

    /// The message size limit, in bytes.
    pub fn max_message(&self) -> usize {
        self.max_message
    }

    /// Decodes the frame at the front of `buf`, unmasking its payload in place.
    ///
    /// Returns [`Decoded::Incomplete`] if `buf` does not hold the whole frame.
    /// The declared length is checked against the message limit as soon as
    /// the header is in, before waiting for the body, so a huge declared
    /// length is rejected at once.
    ///
    /// A frame that is part of a fragmented message returns
    /// `Frame { message: None }` and is buffered internally (the reassembled
    /// size is limited by the message limit); the final fragment returns the
    /// whole message, borrowing the internal buffer. Control frames may be
    /// interleaved between fragments. Text messages are not UTF-8 validated
    /// (the gateway refuses text anyway), but close reasons are.
    ///
    /// After an error the connection must be closed; the decoder's state is
    /// unspecified.
    pub fn decode<'a>(&'a mut self, buf: &'a mut [u8]) -> Result<Decoded<'a>, WsError> {
        if self.fragmented.is_none() && self.reassembly.capacity() != 0 {
            // The previous fragmented message has been delivered (the caller's
            // borrow of it ended when it called us again): give the memory back.
            self.reassembly = Vec::new();
        }
        let Some(h) = self.parse_header(buf)? else {
            return Ok(Decoded::Incomplete);
        };
        let Some(end) = h.header_len.checked_add(h.payload_len) else {
            return Err(self.too_big(h.payload_len));
        };
        let Some(payload) = buf.get_mut(h.header_len..end) else {
            return Ok(Decoded::Incomplete);
        };
        if let Some(key) = h.mask {
            apply_mask(payload, key);
        }
        let payload: &'a [u8] = payload;

        let message = match h.opcode {
            Opcode::Ping => Some(Message::Ping(payload)),
            Opcode::Pong => Some(Message::Pong(payload)),
            Opcode::Close => Some(parse_close(payload)?),
            Opcode::Text | Opcode::Binary if h.fin => Some(if h.opcode == Opcode::Text {
                Message::Text(payload)
            } else {
                Message::Binary(payload)
            }),
            Opcode::Text | Opcode::Binary => {
                self.fragmented = Some(h.opcode);
                self.reassembly.clear();
                self.reassembly.extend_from_slice(payload);
                None
            }
            Opcode::Continuation => {
                self.reassembly.extend_from_slice(payload);
                if h.fin {
                    let whole: &'a [u8] = &self.reassembly;
                    match self.fragmented.take() {
                        Some(Opcode::Text) => Some(Message::Text(whole)),
                        _ => Some(Message::Binary(whole)),
                    }
                } else {
                    None
                }
            }
        };
        Ok(Decoded::Frame {
            consumed: end,
            message,
        })
    }

    fn too_big(&self, len: usize) -> WsError {
        WsError::MessageTooBig {
            len: u64::try_from(len).unwrap_or(u64::MAX),
            max: self.max_message,
        }
    }

    /// Parses and validates the header, `Ok(None)` if it is not all there.
    ///
    /// Every check that the first two bytes allow is made before looking at
    /// the rest, so garbage is refused as early as possible.
    fn parse_header(&self, buf: &[u8]) -> Result<Option<Header>, WsError> {
        let (&b0, &b1) = match (buf.first(), buf.get(1)) {
            (Some(b0), Some(b1)) => (b0, b1),
            _ => return Ok(None),
        };
        let fin = b0 & 0x80 != 0;
        if b0 & 0x70 != 0 {
            return Err(WsError::ReservedBits);
        }
        let raw_opcode = b0 & 0x0F;
        let opcode = Opcode::from_u8(raw_opcode).ok_or(WsError::UnknownOpcode(raw_opcode))?;
        let masked = b1 & 0x80 != 0;
        match (self.role, masked) {
            (Role::Server, false) => return Err(WsError::UnmaskedFrame),
            (Role::Client, true) => return Err(WsError::MaskedFrame),
            _ => {}
        }
        let len7 = b1 & 0x7F;
        if opcode.is_control() {
            if !fin {
                return Err(WsError::FragmentedControl);
            }
            if usize::from(len7) > MAX_CONTROL_PAYLOAD {
                return Err(WsError::ControlTooLong);
            }
        } else {
            match (opcode, self.fragmented) {
                (Opcode::Continuation, None) => return Err(WsError::UnexpectedContinuation),
                (Opcode::Text | Opcode::Binary, Some(_)) => {
                    return Err(WsError::ExpectedContinuation);
                }
                _ => {}
            }
        }

        let (declared, mut pos): (u64, usize) = match len7 {
            126 => {
                let Some(&[a, b]) = buf.get(2..4).and_then(|s| <&[u8; 2]>::try_from(s).ok()) else {
                    return Ok(None);
                };
                let n = u16::from_be_bytes([a, b]);
                if n < 126 {
                    return Err(WsError::NonMinimalLength);
                }
                (u64::from(n), 4)
            }
            127 => {
                let Some(bytes) = buf.get(2..10).and_then(|s| <[u8; 8]>::try_from(s).ok()) else {
                    return Ok(None);
                };
                let n = u64::from_be_bytes(bytes);
                if n >> 63 != 0 {
                    return Err(WsError::InvalidLength);
                }
                if n <= 0xFFFF {
                    return Err(WsError::NonMinimalLength);
                }
                (n, 10)
            }
            n => (u64::from(n), 2),
        };

        // Refuse oversized messages from the header alone: waiting for the
        // body first would let a peer pin max-sized buffers for free.
        if !opcode.is_control() {
            let buffered = if opcode == Opcode::Continuation {
                u64::try_from(self.reassembly.len()).unwrap_or(u64::MAX)
            } else {
                0
            };
            let total = buffered.saturating_add(declared);
            if total > u64::try_from(self.max_message).unwrap_or(u64::MAX) {
                return Err(WsError::MessageTooBig {
                    len: total,
                    max: self.max_message,
                });
            }
        }
        let Ok(payload_len) = usize::try_from(declared) else {
            return Err(WsError::MessageTooBig {
                len: declared,
                max: self.max_message,
            });
        };

        let mask = if masked {
            let Some(key) = pos
                .checked_add(4)
                .and_then(|end| buf.get(pos..end))
                .and_then(|s| <[u8; 4]>::try_from(s).ok())
            else {
                return Ok(None);
            };
            pos = pos.saturating_add(4);
            Some(key)
        } else {
            None
        };
        Ok(Some(Header {
            fin,
            opcode,
            mask,
            header_len: pos,
            payload_len,
        }))
    }

    /// How many more bytes are needed before the frame at the front of `buf`
    /// is complete: `Some(0)` if it already is, `None` if even the header is
    /// incomplete. Lets a driver size its read buffer for a large frame.
    ///
    /// This does not validate the header; [`Decoder::decode`] does.
    pub fn needed(&self, buf: &[u8]) -> Option<usize> {
        let b1 = *buf.get(1)?;
        let masked = b1 & 0x80 != 0;
        let (declared, len_bytes): (u64, u64) = match b1 & 0x7F {
            126 => (
                u64::from(u16::from_be_bytes(
                    buf.get(2..4).and_then(|s| s.try_into().ok())?,
                )),
                2,
            ),
            127 => (
                u64::from_be_bytes(buf.get(2..10).and_then(|s| s.try_into().ok())?),
                8,
            ),
            n => (u64::from(n), 0),
        };
        let header = 2 + len_bytes + if masked { 4 } else { 0 };
        let have = u64::try_from(buf.len()).unwrap_or(u64::MAX);
        if have < header {
            return None;
        }
        let missing = header.saturating_add(declared).saturating_sub(have);
        Some(usize::try_from(missing).unwrap_or(usize::MAX))
    }

    /// Whether a fragmented message has been started but not finished.
    pub fn is_mid_message(&self) -> bool {
        self.fragmented.is_some()
    }
}

fn parse_close(payload: &[u8]) -> Result<Message<'_>, WsError> {
    if payload.is_empty() {
        return Ok(Message::Close {
            code: None,
            reason: "",
        });
    }
    let Some((code, reason)) = payload.split_first_chunk::<2>() else {
        return Err(WsError::InvalidClosePayload);
    };
    let code = u16::from_be_bytes(*code);
    if !is_valid_close_code(code) {
        return Err(WsError::InvalidClosePayload);
    }
    let reason = std::str::from_utf8(reason).map_err(|_| WsError::InvalidUtf8)?;
    Ok(Message::Close {
        code: Some(code),
        reason,
    })
}

/// Size of the header of a frame with the given payload length.
pub const fn header_len(payload_len: usize, masked: bool) -> usize {
    let len = if payload_len < 126 {
        2
    } else if payload_len <= 0xFFFF {
        4
    } else {
        10
    };
    if masked { len + 4 } else { len }
}

/// Appends a frame header using the shortest length encoding.
///
/// `mask` is the masking key for frames a client sends; the caller masks the
/// payload (see [`apply_mask`]) or uses [`encode_frame`], which does both.
pub fn encode_header(
    out: &mut Vec<u8>,
    fin: bool,
    opcode: Opcode,
    payload_len: usize,
    mask: Option<[u8; 4]>,
) {
    let b0 = if fin { 0x80 } else { 0 } | opcode as u8;
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    out.push(b0);
    if payload_len < 126 {
        // Truncation is impossible: the value is below 126.
        out.push(mask_bit | payload_len as u8);
    } else if let Ok(len16) = u16::try_from(payload_len) {
        out.push(mask_bit | 126);
        out.extend_from_slice(&len16.to_be_bytes());
    } else {
        out.push(mask_bit | 127);
        let len64 = u64::try_from(payload_len).unwrap_or(u64::MAX);
        out.extend_from_slice(&len64.to_be_bytes());
    }
    if let Some(key) = mask {
        out.extend_from_slice(&key);
    }
}

/// Appends a single final frame carrying `payload`. With a mask, the copy in
/// `out` is masked; `payload` itself is left untouched.
pub fn encode_frame(out: &mut Vec<u8>, opcode: Opcode, payload: &[u8], mask: Option<[u8; 4]>) {
    out.reserve(header_len(payload.len(), mask.is_some()).saturating_add(payload.len()));
    encode_header(out, true, opcode, payload.len(), mask);
    let start = out.len();
    out.extend_from_slice(payload);
    mask_tail(out, start, mask);
}

/// Appends a close frame. The reason is truncated, at a character boundary,
/// so that code and reason fit the 125-byte control frame limit.
///
/// `code` should be a code that may be sent (not 1005, 1006 or 1015).
pub fn encode_close(out: &mut Vec<u8>, code: u16, reason: &str, mask: Option<[u8; 4]>) {
    let mut end = reason.len().min(MAX_CONTROL_PAYLOAD - 2);
    while !reason.is_char_boundary(end) {
        end = end.saturating_sub(1);
    }
    let reason = reason.get(..end).unwrap_or("");
    encode_header(out, true, Opcode::Close, 2 + reason.len(), mask);
    let start = out.len();
    out.extend_from_slice(&code.to_be_bytes());
    out.extend_from_slice(reason.as_bytes());
    mask_tail(out, start, mask);
}

fn mask_tail(out: &mut [u8], start: usize, mask: Option<[u8; 4]>) {
    if let (Some(key), Some(tail)) = (mask, out.get_mut(start..)) {
        apply_mask(tail, key);
    }
}

/// XORs `buf` with the repeating 4-byte masking `key`, starting at key byte 0.
/// Masking and unmasking are the same operation.
///
/// This runs over every byte the gateway receives, so it works on 8 bytes at
/// a time; an 8-byte chunk covers the key exactly twice, which keeps the key
/// phase aligned for the byte-wise tail.
pub fn apply_mask(buf: &mut [u8], key: [u8; 4]) {
    let [k0, k1, k2, k3] = key;
    let key64 = u64::from_ne_bytes([k0, k1, k2, k3, k0, k1, k2, k3]);
    let mut chunks = buf.chunks_exact_mut(8);
    for chunk in &mut chunks {
        if let Ok(bytes) = <&mut [u8; 8]>::try_from(chunk) {
            *bytes = (u64::from_ne_bytes(*bytes) ^ key64).to_ne_bytes();
        }
    }
    for (b, k) in chunks.into_remainder().iter_mut().zip(key.iter().cycle()) {
        *b ^= k;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HELLO_MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

    fn frame(d: &mut Decoder, buf: &mut [u8]) -> (usize, Option<Vec<u8>>, Option<&'static str>) {
        // Returns (consumed, payload, kind) so tests can hold results across calls.
        match d.decode(buf).expect("valid frame") {
            Decoded::Incomplete => panic!("unexpectedly incomplete"),
            Decoded::Frame { consumed, message } => {
                let (kind, data) = match message {
                    None => return (consumed, None, None),
                    Some(Message::Binary(p)) => ("binary", p.to_vec()),
                    Some(Message::Text(p)) => ("text", p.to_vec()),
                    Some(Message::Ping(p)) => ("ping", p.to_vec()),
                    Some(Message::Pong(p)) => ("pong", p.to_vec()),
                    Some(Message::Close { .. }) => ("close", Vec::new()),
                };
                (consumed, Some(data), Some(kind))
            }
        }
    }

    fn decode_err(role: Role, bytes: &[u8]) -> WsError {
        let mut buf = bytes.to_vec();
        Decoder::new(role, 1 << 20)
            .decode(&mut buf)
            .expect_err("frame must be rejected")
    }

    #[test]
    fn rfc6455_single_frame_unmasked_text() {
        // RFC 6455 section 5.7.
        let bytes = [0x81, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f];
        let mut buf = bytes.to_vec();
        let mut d = Decoder::new(Role::Client, 1024);
        assert_eq!(
            d.decode(&mut buf),
            Ok(Decoded::Frame {
                consumed: 7,
                message: Some(Message::Text(b"Hello"))
            })
        );
        let mut out = Vec::new();
        encode_frame(&mut out, Opcode::Text, b"Hello", None);
        assert_eq!(out, bytes);
    }

    #[test]
    fn rfc6455_single_frame_masked_text() {
        let bytes = [
            0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58,
        ];
        let mut buf = bytes.to_vec();
        let mut d = Decoder::new(Role::Server, 1024);
        assert_eq!(
            d.decode(&mut buf),
            Ok(Decoded::Frame {
                consumed: 11,
                message: Some(Message::Text(b"Hello"))
            })
        );
        // Unmasked in place.
        assert_eq!(&buf[6..], b"Hello");
        let mut out = Vec::new();
        encode_frame(&mut out, Opcode::Text, b"Hello", Some(HELLO_MASK));
        assert_eq!(out, bytes);
    }

    #[test]
    fn rfc6455_fragmented_unmasked_text() {
        let mut buf = vec![0x01, 0x03, 0x48, 0x65, 0x6c, 0x80, 0x02, 0x6c, 0x6f];
        let mut d = Decoder::new(Role::Client, 1024);
        assert!(!d.is_mid_message());
        assert_eq!(
            d.decode(&mut buf),
            Ok(Decoded::Frame {
                consumed: 5,
                message: None
            })
        );
        assert!(d.is_mid_message());
        assert_eq!(
            d.decode(&mut buf[5..]),
            Ok(Decoded::Frame {
                consumed: 4,
                message: Some(Message::Text(b"Hello"))
            })
        );
        assert!(!d.is_mid_message());

        let mut out = Vec::new();
        encode_header(&mut out, false, Opcode::Text, 3, None);
        out.extend_from_slice(b"Hel");
        encode_header(&mut out, true, Opcode::Continuation, 2, None);
        out.extend_from_slice(b"lo");
        assert_eq!(out, [0x01, 0x03, 0x48, 0x65, 0x6c, 0x80, 0x02, 0x6c, 0x6f]);
    }

    #[test]
    fn rfc6455_ping_and_masked_pong() {
        let ping = [0x89, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f];
        let mut buf = ping.to_vec();
        let mut d = Decoder::new(Role::Client, 1024);
        assert_eq!(
            d.decode(&mut buf),
            Ok(Decoded::Frame {
                consumed: 7,
                message: Some(Message::Ping(b"Hello"))
            })
        );
        let pong = [
            0x8a, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58,
        ];
        let mut buf = pong.to_vec();
        let mut d = Decoder::new(Role::Server, 1024);
        assert_eq!(
            d.decode(&mut buf),
            Ok(Decoded::Frame {
                consumed: 11,
                message: Some(Message::Pong(b"Hello"))
            })
        );
        let mut out = Vec::new();
        encode_frame(&mut out, Opcode::Ping, b"Hello", None);
        assert_eq!(out, ping);
        out.clear();
        encode_frame(&mut out, Opcode::Pong, b"Hello", Some(HELLO_MASK));
        assert_eq!(out, pong);
    }

    #[test]
    fn rfc6455_extended_lengths() {
        // 256 bytes: 16-bit length; 65536 bytes: 64-bit length.
        let mut out = Vec::new();
        encode_header(&mut out, true, Opcode::Binary, 256, None);
        assert_eq!(out, [0x82, 0x7E, 0x01, 0x00]);
        out.clear();
        encode_header(&mut out, true, Opcode::Binary, 65536, None);
        assert_eq!(out, [0x82, 0x7F, 0, 0, 0, 0, 0, 1, 0, 0]);
        for (len, masked) in [
            (0, false),
            (125, true),
            (126, false),
            (65535, true),
            (65536, true),
        ] {
            out.clear();
            encode_header(
                &mut out,
                true,
                Opcode::Binary,
                len,
                masked.then_some([1, 2, 3, 4]),
            );
            assert_eq!(out.len(), header_len(len, masked), "len {len}");
        }
        assert_eq!(header_len(usize::MAX, true), MAX_HEADER_LEN);

        let payload = vec![7u8; 65536];
        let mut buf = Vec::new();
        encode_frame(&mut buf, Opcode::Binary, &payload, None);
        let mut d = Decoder::new(Role::Client, 65536);
        let (consumed, data, kind) = frame(&mut d, &mut buf);
        assert_eq!(consumed, 65546);
        assert_eq!(data.as_deref(), Some(&payload[..]));
        assert_eq!(kind, Some("binary"));
    }

    #[test]
    fn incomplete_and_needed() {
        let mut full = Vec::new();
        encode_frame(&mut full, Opcode::Binary, &[9u8; 300], Some([1, 2, 3, 4]));
        let d = Decoder::new(Role::Server, 1024);
        for cut in 0..full.len() {
            let mut d = Decoder::new(Role::Server, 1024);
            let mut part = full[..cut].to_vec();
            assert_eq!(d.decode(&mut part), Ok(Decoded::Incomplete), "cut {cut}");
            // Header is 2 + 2 + 4 bytes.
            let expect = if cut < 8 {
                None
            } else {
                Some(full.len() - cut)
            };
            assert_eq!(d.needed(&full[..cut]), expect, "cut {cut}");
        }
        assert_eq!(d.needed(&full), Some(0));
        // 64-bit length: the header needs 10 bytes before `needed` can answer.
        let mut hdr = Vec::new();
        encode_header(&mut hdr, true, Opcode::Binary, 70_000, None);
        assert_eq!(Decoder::new(Role::Client, 1 << 20).needed(&hdr[..9]), None);
        assert_eq!(
            Decoder::new(Role::Client, 1 << 20).needed(&hdr),
            Some(70_000)
        );
    }

    #[test]
    fn reassembly_with_interleaved_ping() {
        let key = [0xde, 0xad, 0xbe, 0xef];
        let mut wire = Vec::new();
        let parts: [&[u8]; 3] = [b"first ", b"second ", b"third"];
        for (i, part) in parts.iter().enumerate() {
            let op = if i == 0 {
                Opcode::Binary
            } else {
                Opcode::Continuation
            };
            encode_header(&mut wire, i == 2, op, part.len(), Some(key));
            let start = wire.len();
            wire.extend_from_slice(part);
            apply_mask(&mut wire[start..], key);
            if i == 0 {
                encode_frame(&mut wire, Opcode::Ping, b"are you there", Some(key));
            }
        }
        let mut d = Decoder::new(Role::Server, 64);
        let mut pos = 0;
        let mut seen = Vec::new();
        while pos < wire.len() {
            let (consumed, data, kind) = frame(&mut d, &mut wire[pos..]);
            pos += consumed;
            seen.push((kind, data));
            if kind == Some("ping") {
                assert!(
                    d.is_mid_message(),
                    "ping must not end the fragmented message"
                );
            }
        }
        assert_eq!(
            seen,
            vec![
                (None, None),
                (Some("ping"), Some(b"are you there".to_vec())),
                (None, None),
                (Some("binary"), Some(b"first second third".to_vec())),
            ]
        );
        assert!(!d.is_mid_message());
        // The reassembly buffer is released on the next call.
        let mut next = Vec::new();
        encode_frame(&mut next, Opcode::Binary, b"x", Some(key));
        let _ = frame(&mut d, &mut next);
        assert_eq!(d.reassembly.capacity(), 0);
    }

    #[test]
    fn message_too_big_from_header_alone() {
        // Declared length 2^40, only the 10-byte header (+ mask) present.
        let mut buf = vec![0x82, 0xFF, 0, 0, 0x01, 0, 0, 0, 0, 0];
        let mut d = Decoder::new(Role::Server, 1 << 20);
        let err = d.decode(&mut buf).expect_err("too big");
        assert_eq!(
            err,
            WsError::MessageTooBig {
                len: 1 << 40,
                max: 1 << 20
            }
        );
        assert_eq!(err.close_code(), 1009);
        assert_eq!(
            err.to_string(),
            "WebSocket message of 1099511627776 bytes exceeds this endpoint's limit of 1048576 bytes"
        );
    }

    #[test]
    fn message_too_big_across_fragments() {
        let mut wire = Vec::new();
        encode_header(&mut wire, false, Opcode::Binary, 60, None);
        wire.extend_from_slice(&[0; 60]);
        encode_header(&mut wire, true, Opcode::Continuation, 60, None);
        let mut d = Decoder::new(Role::Client, 100);
        let (consumed, _, _) = frame(&mut d, &mut wire);
        // The second header alone is enough to refuse: 60 + 60 > 100.
        assert_eq!(
            d.decode(&mut wire[consumed..]),
            Err(WsError::MessageTooBig { len: 120, max: 100 })
        );
        // A single frame exactly at the limit is fine.
        let mut ok = Vec::new();
        encode_frame(&mut ok, Opcode::Binary, &[1; 100], None);
        assert!(Decoder::new(Role::Client, 100).decode(&mut ok).is_ok());
        let mut over = Vec::new();
        encode_frame(&mut over, Opcode::Binary, &[1; 101], None);
        assert_eq!(
            Decoder::new(Role::Client, 100).decode(&mut over),
            Err(WsError::MessageTooBig { len: 101, max: 100 })
        );
    }

    #[test]
    fn every_error_variant() {
        use WsError::*;
        let cases: &[(Role, &[u8], WsError, u16)] = &[
            (Role::Server, &[0x82, 0x00], UnmaskedFrame, 1002),
            (Role::Client, &[0x82, 0x80, 1, 2, 3, 4], MaskedFrame, 1002),
            (Role::Client, &[0xC2, 0x00], ReservedBits, 1002),
            (Role::Client, &[0xA2, 0x00], ReservedBits, 1002),
            (Role::Client, &[0x92, 0x00], ReservedBits, 1002),
            (Role::Client, &[0x83, 0x00], UnknownOpcode(3), 1002),
            (Role::Client, &[0x8B, 0x00], UnknownOpcode(0xB), 1002),
            (
                Role::Client,
                &[0x89, 0x7E, 0x00, 0x7E],
                ControlTooLong,
                1002,
            ),
            (Role::Client, &[0x09, 0x00], FragmentedControl, 1002),
            (Role::Client, &[0x80, 0x00], UnexpectedContinuation, 1002),
            (Role::Client, &[0x00, 0x00], UnexpectedContinuation, 1002),
            (
                Role::Client,
                &[0x82, 0x7E, 0x00, 0x7D],
                NonMinimalLength,
                1002,
            ),
            (
                Role::Client,
                &[0x82, 0x7F, 0, 0, 0, 0, 0, 0, 0xFF, 0xFF],
                NonMinimalLength,
                1002,
            ),
            (
                Role::Client,
                &[0x82, 0x7F, 0x80, 0, 0, 0, 0, 0, 0, 0],
                InvalidLength,
                1002,
            ),
            (Role::Client, &[0x88, 0x01, 0x03], InvalidClosePayload, 1002),
            (
                Role::Client,
                &[0x88, 0x02, 0x03, 0xED],
                InvalidClosePayload,
                1002,
            ), // 1005
            (
                Role::Client,
                &[0x88, 0x02, 0x03, 0xEE],
                InvalidClosePayload,
                1002,
            ), // 1006
            (
                Role::Client,
                &[0x88, 0x02, 0x03, 0xE7],
                InvalidClosePayload,
                1002,
            ), // 999
            (
                Role::Client,
                &[0x88, 0x02, 0x13, 0x88],
                InvalidClosePayload,
                1002,
            ), // 5000
            (
                Role::Client,
                &[0x88, 0x04, 0x03, 0xE8, 0xC3, 0x28],
                InvalidUtf8,
                1007,
            ),
        ];
        for (role, bytes, want, code) in cases {
            let got = decode_err(*role, bytes);
            assert_eq!(&got, want, "{bytes:02x?}");
            assert_eq!(got.close_code(), *code, "{want:?}");
            assert!(!got.to_string().is_empty());
        }
        // ExpectedContinuation needs a fragmented message in progress.
        let mut buf = vec![0x02, 0x01, b'a', 0x82, 0x00];
        let mut d = Decoder::new(Role::Client, 1024);
        assert!(matches!(
            d.decode(&mut buf),
            Ok(Decoded::Frame {
                consumed: 3,
                message: None
            })
        ));
        assert_eq!(d.decode(&mut buf[3..]), Err(ExpectedContinuation));
        assert_eq!(ExpectedContinuation.close_code(), 1002);
        // MessageTooBig is covered above; check its code here too.
        assert_eq!(MessageTooBig { len: 2, max: 1 }.close_code(), 1009);
        assert_eq!(
            UnknownOpcode(3).to_string(),
            "WebSocket opcode 0x3 is reserved; valid opcodes are 0 (continuation), 1 (text), \
             2 (binary), 8 (close), 9 (ping) and 10 (pong)"
        );
    }

    #[test]
    fn errors_are_detected_from_two_bytes() {
        // A bad first two bytes is refused without waiting for the rest.
        assert_eq!(
            decode_err(Role::Server, &[0x82, 0x7F]),
            WsError::UnmaskedFrame
        );
        assert_eq!(
            decode_err(Role::Client, &[0xF2, 0x7F]),
            WsError::ReservedBits
        );
        let mut short = vec![0x82];
        assert_eq!(
            Decoder::new(Role::Client, 10).decode(&mut short),
            Ok(Decoded::Incomplete)
        );
        assert_eq!(Decoder::new(Role::Client, 10).needed(&short), None);
    }

    #[test]
    fn close_frames() {
        let mut d = Decoder::new(Role::Client, 1024);
        let mut empty = vec![0x88, 0x00];
        assert_eq!(
            d.decode(&mut empty),
            Ok(Decoded::Frame {
                consumed: 2,
                message: Some(Message::Close {
                    code: None,
                    reason: ""
                })
            })
        );
        for code in [1000u16, 1001, 1003, 1007, 1011, 1013, 1014, 3000, 4999] {
            let mut buf = Vec::new();
            encode_close(&mut buf, code, "bye", None);
            assert_eq!(
                d.decode(&mut buf),
                Ok(Decoded::Frame {
                    consumed: 7,
                    message: Some(Message::Close {
                        code: Some(code),
                        reason: "bye"
                    })
                }),
                "code {code}"
            );
        }
        for code in [
            0u16,
            999,
            1004,
            1005,
            1006,
            1015,
            1016,
            2999,
            5000,
            u16::MAX,
        ] {
            assert!(!is_valid_close_code(code), "{code}");
        }
    }

    #[test]
    fn encode_close_truncates_at_char_boundary() {
        // 'é' is two bytes; 62 of them are 124 bytes, one more than fits.
        let reason = "é".repeat(62);
        let mut buf = Vec::new();
        encode_close(&mut buf, 1001, &reason, Some([9, 8, 7, 6]));
        assert!(buf.len() - header_len(0, true) <= MAX_CONTROL_PAYLOAD);
        let mut d = Decoder::new(Role::Server, 1024);
        match d.decode(&mut buf) {
            Ok(Decoded::Frame {
                message: Some(Message::Close { code, reason: r }),
                ..
            }) => {
                assert_eq!(code, Some(1001));
                assert_eq!(r, "é".repeat(61));
            }
            other => panic!("{other:?}"),
        }
        // ASCII: exactly 123 bytes of reason kept.
        let mut buf = Vec::new();
        encode_close(&mut buf, 1000, &"x".repeat(500), None);
        assert_eq!(buf.len(), 2 + 125);
    }

    #[test]
    fn apply_mask_matches_naive_loop() {
        let key = [0x12, 0x34, 0x56, 0x78];
        let data: Vec<u8> = (0..80u8).map(|i| i.wrapping_mul(37)).collect();
        for offset in 0..8 {
            for len in 0..64 {
                let mut fast = data.clone();
                apply_mask(&mut fast[offset..offset + len], key);
                let mut naive = data.clone();
                for (i, b) in naive[offset..offset + len].iter_mut().enumerate() {
                    *b ^= key[i % 4];
                }
                assert_eq!(fast, naive, "offset {offset} len {len}");
                // Masking twice restores the data.
                apply_mask(&mut fast[offset..offset + len], key);
                assert_eq!(fast, data);
            }
        }
    }

    #[test]
    fn opcode_helpers() {
        for v in 0..16u8 {
            match Opcode::from_u8(v) {
                Some(op) => {
                    assert_eq!(op as u8, v);
                    assert_eq!(op.is_control(), v >= 8);
                }
                None => assert!(matches!(v, 3..=7 | 11..=15)),
            }
        }
        let d = Decoder::new(Role::Server, 5);
        assert_eq!(d.role(), Role::Server);
        assert_eq!(d.max_message(), 5);
        assert!(format!("{d:?}").contains("reassembled: 0"));
    }
}
