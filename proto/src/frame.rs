//! The devgate frame: what one binary WebSocket message carries.
//!
//! Every frame starts with the same 8-byte header, followed by the unit ID
//! (which device the frame is about) and a part whose layout depends on the
//! frame type. All integers are big-endian:
//!
//! ```text
//! offset size field
//! 0      1    version   = 1
//! 1      1    type      FrameType
//! 2      1    flags     = 0 in version 1
//! 3      1    unit_len  0..=64
//! 4      4    id        request id, stream id, or 0
//! 8      n    unit      unit ID, printable ASCII 0x21..=0x7E
//! 8+n    ...  type-specific fields, then payload (rest of the message)
//! ```
//!
//! The WebSocket message already delimits the frame, so there is no length
//! field: the payload is "the rest". [`Frame::decode`] borrows everything
//! (unit, payload, messages) from the message buffer and allocates nothing;
//! [`Frame::encode`] appends to a caller-owned `Vec` so the gateway can
//! build the WebSocket header and the frame in one buffer ([`encode_ws`]) and
//! hand it to the kernel in one write.
//!
//! Decoding is canonical: any byte string that decodes re-encodes to exactly
//! the same bytes. The golden vectors in `tests/vectors.json` and the
//! byte-by-byte description in `docs/PROTOCOL.md` are the contract with agents
//! written in other languages.

use std::fmt;

use crate::ws;

/// The only frame version this crate speaks.
pub const VERSION: u8 = 1;

/// Length of the fixed header that precedes the unit ID.
pub const HEADER_LEN: usize = 8;

/// Longest unit ID, in bytes.
pub const MAX_UNIT_ID_LEN: usize = 64;

/// The frame type byte (offset 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameType {
    /// Manager → device request, forwarded by the gateway.
    Command = 0x01,
    /// Device → manager answer to a command.
    Response = 0x02,
    /// Unsolicited device → managers message.
    Event = 0x03,
    /// Gateway → managers: a device came online or went offline.
    Presence = 0x04,
    /// Something the sender asked for failed.
    Error = 0x05,
    /// Opens a flow-controlled byte stream.
    StreamOpen = 0x10,
    /// Bytes on an open stream.
    StreamData = 0x11,
    /// Grants the other side more stream credit.
    StreamWindow = 0x12,
    /// Ends a stream.
    StreamClose = 0x13,
    /// Manager → gateway administrative request and its reply (JSON).
    Control = 0x20,
}

impl FrameType {
    /// The type for a type byte, `None` if unknown in version 1.
    pub const fn from_u8(value: u8) -> Option<Self> {
        Some(match value {
            0x01 => Self::Command,
            0x02 => Self::Response,
            0x03 => Self::Event,
            0x04 => Self::Presence,
            0x05 => Self::Error,
            0x10 => Self::StreamOpen,
            0x11 => Self::StreamData,
            0x12 => Self::StreamWindow,
            0x13 => Self::StreamClose,
            0x20 => Self::Control,
            _ => return None,
        })
    }

    /// snake_case name for logs and metric labels.
    pub const fn as_str(&self) -> &'static str {
        match self {
            Self::Command => "command",
            Self::Response => "response",
            Self::Event => "event",
            Self::Presence => "presence",
            Self::Error => "error",
            Self::StreamOpen => "stream_open",
            Self::StreamData => "stream_data",
            Self::StreamWindow => "stream_window",
            Self::StreamClose => "stream_close",
            Self::Control => "control",
        }
    }
}

impl fmt::Display for FrameType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a device went online or offline (the `reason` byte of a Presence
/// frame).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PresenceReason {
    /// 0: the device connected (online).
    Connected,
    /// 1: the device closed its connection or the connection was lost.
    Disconnected,
    /// 2: the device stopped answering keep-alives and was declared dead.
    Dead,
    /// 3: online; a new connection with the same unit ID replaced an older
    /// one (no offline presence is sent in between).
    Reconnected,
    /// 4: the gateway closed the connection (grace period expired,
    /// connection limit, certificate revoked, shutdown).
    ClosedByGateway,
    /// A reason this version does not know; receivers must accept it.
    Other(u8),
}

impl From<u8> for PresenceReason {
    fn from(v: u8) -> Self {
        match v {
            0 => Self::Connected,
            1 => Self::Disconnected,
            2 => Self::Dead,
            3 => Self::Reconnected,
            4 => Self::ClosedByGateway,
            other => Self::Other(other),
        }
    }
}

impl From<PresenceReason> for u8 {
    fn from(r: PresenceReason) -> Self {
        match r {
            PresenceReason::Connected => 0,
            PresenceReason::Disconnected => 1,
            PresenceReason::Dead => 2,
            PresenceReason::Reconnected => 3,
            PresenceReason::ClosedByGateway => 4,
            PresenceReason::Other(v) => v,
        }
    }
}

impl PresenceReason {
    /// snake_case name for logs and metric labels.
    pub const fn as_str(&self) -> &'static str {
        match self {
            Self::Connected => "connected",
            Self::Disconnected => "disconnected",
            Self::Dead => "dead",
            Self::Reconnected => "reconnected",
            Self::ClosedByGateway => "closed_by_gateway",
            Self::Other(_) => "other",
        }
    }
}

impl fmt::Display for PresenceReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The code of an Error frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// 1: the command's unit is not connected.
    DeviceNotConnected,
    /// 2: a response or stream frame names an id the gateway does not know.
    UnknownRequest,
    /// 3: the target connection's send queue is full.
    QueueFull,
    /// 4: the frame could not be decoded.
    MalformedFrame,
    /// 5: the frame version is not supported.
    UnsupportedVersion,
    /// 6: this kind of peer may not send this frame type.
    NotPermitted,
    /// 7: too many requests outstanding for this connection.
    TooManyRequests,
    /// 8: the device did not answer within the request timeout.
    RequestTimeout,
    /// 9: the device went away with the request outstanding.
    DeviceDisconnected,
    /// 10: the stream id is not open.
    UnknownStream,
    /// 11: a stream sender exceeded its credit.
    FlowControl,
    /// 12: too many streams open.
    TooManyStreams,
    /// 13: a control request failed.
    ControlFailed,
    /// 14: a configured limit was reached (e.g. the device limit).
    LimitReached,
    /// 15: the gateway is shutting down.
    ShuttingDown,
    /// 16: an internal gateway error.
    Internal,
    /// A code this version does not know; receivers must accept it.
    Other(u16),
}

impl From<u16> for ErrorCode {
    fn from(v: u16) -> Self {
        match v {
            1 => Self::DeviceNotConnected,
            2 => Self::UnknownRequest,
            3 => Self::QueueFull,
            4 => Self::MalformedFrame,
            5 => Self::UnsupportedVersion,
            6 => Self::NotPermitted,
            7 => Self::TooManyRequests,
            8 => Self::RequestTimeout,
            9 => Self::DeviceDisconnected,
            10 => Self::UnknownStream,
            11 => Self::FlowControl,
            12 => Self::TooManyStreams,
            13 => Self::ControlFailed,
            14 => Self::LimitReached,
            15 => Self::ShuttingDown,
            16 => Self::Internal,
            other => Self::Other(other),
        }
    }
}

impl From<ErrorCode> for u16 {
    fn from(c: ErrorCode) -> Self {
        match c {
            ErrorCode::DeviceNotConnected => 1,
            ErrorCode::UnknownRequest => 2,
            ErrorCode::QueueFull => 3,
            ErrorCode::MalformedFrame => 4,
            ErrorCode::UnsupportedVersion => 5,
            ErrorCode::NotPermitted => 6,
            ErrorCode::TooManyRequests => 7,
            ErrorCode::RequestTimeout => 8,
            ErrorCode::DeviceDisconnected => 9,
            ErrorCode::UnknownStream => 10,
            ErrorCode::FlowControl => 11,
            ErrorCode::TooManyStreams => 12,
            ErrorCode::ControlFailed => 13,
            ErrorCode::LimitReached => 14,
            ErrorCode::ShuttingDown => 15,
            ErrorCode::Internal => 16,
            ErrorCode::Other(v) => v,
        }
    }
}

impl ErrorCode {
    /// snake_case name for logs and metric labels.
    pub const fn as_str(&self) -> &'static str {
        match self {
            Self::DeviceNotConnected => "device_not_connected",
            Self::UnknownRequest => "unknown_request",
            Self::QueueFull => "queue_full",
            Self::MalformedFrame => "malformed_frame",
            Self::UnsupportedVersion => "unsupported_version",
            Self::NotPermitted => "not_permitted",
            Self::TooManyRequests => "too_many_requests",
            Self::RequestTimeout => "request_timeout",
            Self::DeviceDisconnected => "device_disconnected",
            Self::UnknownStream => "unknown_stream",
            Self::FlowControl => "flow_control",
            Self::TooManyStreams => "too_many_streams",
            Self::ControlFailed => "control_failed",
            Self::LimitReached => "limit_reached",
            Self::ShuttingDown => "shutting_down",
            Self::Internal => "internal",
            Self::Other(_) => "other",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The type-specific part of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Body<'a> {
    /// 0x01: opaque request bytes for the device.
    Command {
        /// Opaque bytes.
        payload: &'a [u8],
    },
    /// 0x02: opaque answer bytes from the device.
    Response {
        /// Opaque bytes.
        payload: &'a [u8],
    },
    /// 0x03: opaque event bytes from the device.
    Event {
        /// Opaque bytes.
        payload: &'a [u8],
    },
    /// 0x04: state u8 (0 offline, 1 online), reason u8.
    Presence {
        /// Whether the device is now online.
        online: bool,
        /// Why.
        reason: PresenceReason,
    },
    /// 0x05: code u16, then a UTF-8 message.
    Error {
        /// What failed.
        code: ErrorCode,
        /// Human-readable detail (may be empty).
        message: &'a str,
    },
    /// 0x10: window u32, then opaque open parameters.
    StreamOpen {
        /// Initial credit, in payload bytes, the opener grants the other side.
        window: u32,
        /// Opaque open parameters, e.g. `b"terminal"`.
        payload: &'a [u8],
    },
    /// 0x11: stream bytes.
    StreamData {
        /// Stream bytes; consumes `payload.len()` credit.
        payload: &'a [u8],
    },
    /// 0x12: increment u32 (> 0).
    StreamWindow {
        /// Credit returned to the other side, in bytes.
        increment: u32,
    },
    /// 0x13: code u16, then a UTF-8 reason.
    StreamClose {
        /// 0 for a normal close, otherwise an [`ErrorCode`] value.
        code: u16,
        /// Human-readable detail (may be empty).
        reason: &'a str,
    },
    /// 0x20: a UTF-8 JSON object (not parsed by the codec).
    Control {
        /// The JSON text.
        payload: &'a [u8],
    },
}

/// A decoded devgate frame, borrowing from the message it was decoded from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame<'a> {
    /// Request id (command, response, control, error), stream id (stream
    /// frames), 0 otherwise.
    pub id: u32,
    /// Unit ID: empty on the device side of the gateway, the device's unit ID
    /// on the manager side.
    pub unit: &'a str,
    /// The type-specific part.
    pub body: Body<'a>,
}

/// Why a message is not a valid version 1 devgate frame. The sender is at
/// fault; the gateway answers with an Error frame ([`FrameError::error_code`]).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum FrameError {
    /// The message ends inside the header, the unit ID or a type-specific field.
    #[error(
        "frame is truncated: the message ends before the 8-byte header, \
         the unit ID or the type's fixed fields are complete"
    )]
    Truncated,
    /// The version byte is not 1.
    #[error("frame version {0} is not supported (this gateway speaks version 1)")]
    UnsupportedVersion(u8),
    /// The type byte is not a known type.
    #[error("frame type {0:#04x} is unknown (version 1 defines 0x01-0x05, 0x10-0x13 and 0x20)")]
    UnknownType(u8),
    /// The flags byte is not 0.
    #[error("frame flags byte is {0:#04x}, but must be 0 in version 1")]
    ReservedFlags(u8),
    /// The unit length byte exceeds 64.
    #[error("unit ID length is {0} bytes; the maximum is 64")]
    UnitTooLong(usize),
    /// The unit ID has a byte outside 0x21..=0x7E.
    #[error(
        "unit ID contains a byte outside printable ASCII 0x21..=0x7E \
         (no spaces, control characters or non-ASCII)"
    )]
    InvalidUnit,
    /// A type-specific field is invalid; the text says which.
    #[error("malformed frame: {0}")]
    Malformed(&'static str),
}

impl FrameError {
    /// The Error frame code the gateway answers with.
    pub fn error_code(&self) -> ErrorCode {
        match self {
            Self::UnsupportedVersion(_) => ErrorCode::UnsupportedVersion,
            Self::Truncated
            | Self::UnknownType(_)
            | Self::ReservedFlags(_)
            | Self::UnitTooLong(_)
            | Self::InvalidUnit
            | Self::Malformed(_) => ErrorCode::MalformedFrame,
        }
    }
}

/// Whether `s` is a valid unit ID: 1 to 64 bytes of printable ASCII
/// 0x21..=0x7E.
pub fn is_valid_unit_id(s: &str) -> bool {
    (1..=MAX_UNIT_ID_LEN).contains(&s.len()) && is_unit_bytes(s.as_bytes())
}

fn is_unit_bytes(b: &[u8]) -> bool {
    b.iter().all(|c| (0x21..=0x7E).contains(c))
}

/// Splits a fixed-size field off the front of `rest`.
fn take<const N: usize>(rest: &[u8]) -> Result<([u8; N], &[u8]), FrameError> {
    rest.split_first_chunk::<N>()
        .map(|(head, tail)| (*head, tail))
        .ok_or(FrameError::Truncated)
}

fn utf8<'a>(bytes: &'a [u8], what: &'static str) -> Result<&'a str, FrameError> {
    std::str::from_utf8(bytes).map_err(|_| FrameError::Malformed(what))
}

/// The id field of a message whose 8-byte header is there, whatever else is wrong with it
/// (for the `malformed_frame` Error's id).
pub fn header_id(buf: &[u8]) -> Option<u32> {
    match buf.get(..HEADER_LEN)? {
        [_, _, _, _, i0, i1, i2, i3] => Some(u32::from_be_bytes([*i0, *i1, *i2, *i3])),
        _ => None,
    }
}

impl<'a> Frame<'a> {
    /// Decodes one frame from a whole binary WebSocket message.
    ///
    /// The version byte is checked first, so a message from a newer protocol
    /// version is reported as [`FrameError::UnsupportedVersion`] whatever its
    /// length.
    pub fn decode(buf: &'a [u8]) -> Result<Self, FrameError> {
        let version = *buf.first().ok_or(FrameError::Truncated)?;
        if version != VERSION {
            return Err(FrameError::UnsupportedVersion(version));
        }
        let ([_, ty, flags, unit_len, i0, i1, i2, i3], rest) = take::<HEADER_LEN>(buf)?;
        let frame_type = FrameType::from_u8(ty).ok_or(FrameError::UnknownType(ty))?;
        if flags != 0 {
            return Err(FrameError::ReservedFlags(flags));
        }
        let unit_len = usize::from(unit_len);
        if unit_len > MAX_UNIT_ID_LEN {
            return Err(FrameError::UnitTooLong(unit_len));
        }
        let id = u32::from_be_bytes([i0, i1, i2, i3]);
        if rest.len() < unit_len {
            return Err(FrameError::Truncated);
        }
        let (unit, rest) = rest.split_at(unit_len);
        if !is_unit_bytes(unit) {
            return Err(FrameError::InvalidUnit);
        }
        let unit = std::str::from_utf8(unit).map_err(|_| FrameError::InvalidUnit)?;

        let body = match frame_type {
            FrameType::Command => Body::Command { payload: rest },
            FrameType::Response => Body::Response { payload: rest },
            FrameType::Event => Body::Event { payload: rest },
            FrameType::StreamData => Body::StreamData { payload: rest },
            FrameType::Control => Body::Control { payload: rest },
            FrameType::Presence => {
                let ([state, reason], tail) = take::<2>(rest)?;
                if !tail.is_empty() {
                    return Err(FrameError::Malformed(
                        "presence frame has bytes after the reason byte",
                    ));
                }
                let online = match state {
                    0 => false,
                    1 => true,
                    _ => {
                        return Err(FrameError::Malformed(
                            "presence state must be 0 (offline) or 1 (online)",
                        ));
                    }
                };
                Body::Presence {
                    online,
                    reason: PresenceReason::from(reason),
                }
            }
            FrameType::Error => {
                let (code, tail) = take::<2>(rest)?;
                Body::Error {
                    code: ErrorCode::from(u16::from_be_bytes(code)),
                    message: utf8(tail, "error message is not valid UTF-8")?,
                }
            }
            FrameType::StreamOpen => {
                let (window, tail) = take::<4>(rest)?;
                Body::StreamOpen {
                    window: u32::from_be_bytes(window),
                    payload: tail,
                }
            }
            FrameType::StreamWindow => {
                let (increment, tail) = take::<4>(rest)?;
                if !tail.is_empty() {
                    return Err(FrameError::Malformed(
                        "stream window frame has bytes after the increment",
                    ));
                }
                let increment = u32::from_be_bytes(increment);
                if increment == 0 {
                    return Err(FrameError::Malformed(
                        "stream window increment must be greater than 0",
                    ));
                }
                Body::StreamWindow { increment }
            }
            FrameType::StreamClose => {
                let (code, tail) = take::<2>(rest)?;
                Body::StreamClose {
                    code: u16::from_be_bytes(code),
                    reason: utf8(tail, "stream close reason is not valid UTF-8")?,
                }
            }
        };
        Ok(Self { id, unit, body })
    }

    /// The frame's type.
    pub const fn frame_type(&self) -> FrameType {
        match self.body {
            Body::Command { .. } => FrameType::Command,
            Body::Response { .. } => FrameType::Response,
            Body::Event { .. } => FrameType::Event,
            Body::Presence { .. } => FrameType::Presence,
            Body::Error { .. } => FrameType::Error,
            Body::StreamOpen { .. } => FrameType::StreamOpen,
            Body::StreamData { .. } => FrameType::StreamData,
            Body::StreamWindow { .. } => FrameType::StreamWindow,
            Body::StreamClose { .. } => FrameType::StreamClose,
            Body::Control { .. } => FrameType::Control,
        }
    }

    /// Length of the encoded frame in bytes.
    pub const fn encoded_len(&self) -> usize {
        let body = match self.body {
            Body::Command { payload }
            | Body::Response { payload }
            | Body::Event { payload }
            | Body::StreamData { payload }
            | Body::Control { payload } => payload.len(),
            Body::Presence { .. } => 2,
            Body::Error { message, .. } => 2 + message.len(),
            Body::StreamOpen { payload, .. } => 4 + payload.len(),
            Body::StreamWindow { .. } => 4,
            Body::StreamClose { reason, .. } => 2 + reason.len(),
        };
        HEADER_LEN + self.unit.len() + body
    }

    /// Appends the encoded frame to `out`.
    ///
    /// The unit must be empty or a valid unit ID (checked in debug builds);
    /// a longer one would not fit the length byte and is cut to 64 bytes.
    pub fn encode(&self, out: &mut Vec<u8>) {
        debug_assert!(
            self.unit.is_empty() || is_valid_unit_id(self.unit),
            "invalid unit ID {:?}",
            self.unit
        );
        let unit = self
            .unit
            .as_bytes()
            .get(..MAX_UNIT_ID_LEN)
            .unwrap_or(self.unit.as_bytes());
        out.reserve(self.encoded_len());
        out.push(VERSION);
        out.push(self.frame_type() as u8);
        out.push(0);
        // At most 64 after the cut above, so the cast cannot truncate.
        out.push(unit.len() as u8);
        out.extend_from_slice(&self.id.to_be_bytes());
        out.extend_from_slice(unit);
        match self.body {
            Body::Command { payload }
            | Body::Response { payload }
            | Body::Event { payload }
            | Body::StreamData { payload }
            | Body::Control { payload } => out.extend_from_slice(payload),
            Body::Presence { online, reason } => {
                out.push(u8::from(online));
                out.push(reason.into());
            }
            Body::Error { code, message } => {
                out.extend_from_slice(&u16::from(code).to_be_bytes());
                out.extend_from_slice(message.as_bytes());
            }
            Body::StreamOpen { window, payload } => {
                out.extend_from_slice(&window.to_be_bytes());
                out.extend_from_slice(payload);
            }
            Body::StreamWindow { increment } => {
                debug_assert!(increment > 0, "stream window increment must be > 0");
                out.extend_from_slice(&increment.to_be_bytes());
            }
            Body::StreamClose { code, reason } => {
                out.extend_from_slice(&code.to_be_bytes());
                out.extend_from_slice(reason.as_bytes());
            }
        }
    }

    /// A Command with request id `id`.
    pub const fn command(unit: &'a str, id: u32, payload: &'a [u8]) -> Self {
        Self {
            id,
            unit,
            body: Body::Command { payload },
        }
    }

    /// A Response to request `id`.
    pub const fn response(unit: &'a str, id: u32, payload: &'a [u8]) -> Self {
        Self {
            id,
            unit,
            body: Body::Response { payload },
        }
    }

    /// An Event (id 0).
    pub const fn event(unit: &'a str, payload: &'a [u8]) -> Self {
        Self {
            id: 0,
            unit,
            body: Body::Event { payload },
        }
    }

    /// A Presence frame (id 0).
    pub const fn presence(unit: &'a str, online: bool, reason: PresenceReason) -> Self {
        Self {
            id: 0,
            unit,
            body: Body::Presence { online, reason },
        }
    }

    /// An Error about request or stream `id`.
    pub const fn error(unit: &'a str, id: u32, code: ErrorCode, message: &'a str) -> Self {
        Self {
            id,
            unit,
            body: Body::Error { code, message },
        }
    }

    /// A StreamOpen for stream `id` granting `window` bytes of initial credit.
    pub const fn stream_open(unit: &'a str, id: u32, window: u32, payload: &'a [u8]) -> Self {
        Self {
            id,
            unit,
            body: Body::StreamOpen { window, payload },
        }
    }

    /// StreamData on stream `id`.
    pub const fn stream_data(unit: &'a str, id: u32, payload: &'a [u8]) -> Self {
        Self {
            id,
            unit,
            body: Body::StreamData { payload },
        }
    }

    /// A StreamWindow returning `increment` (> 0) bytes of credit on stream `id`.
    pub const fn stream_window(unit: &'a str, id: u32, increment: u32) -> Self {
        Self {
            id,
            unit,
            body: Body::StreamWindow { increment },
        }
    }

    /// A StreamClose ending stream `id` (`code` 0 is a normal close).
    pub const fn stream_close(unit: &'a str, id: u32, code: u16, reason: &'a str) -> Self {
        Self {
            id,
            unit,
            body: Body::StreamClose { code, reason },
        }
    }

    /// A Control request or reply with request id `id` (unit empty: control
    /// frames address the gateway itself).
    pub const fn control(id: u32, payload: &'a [u8]) -> Self {
        Self {
            id,
            unit: "",
            body: Body::Control { payload },
        }
    }
}

/// Encodes a complete WebSocket binary frame (unmasked when `mask` is `None`)
/// carrying `frame`, header and body in one buffer: what the gateway sends.
pub fn encode_ws(out: &mut Vec<u8>, frame: &Frame<'_>, mask: Option<[u8; 4]>) {
    let len = frame.encoded_len();
    out.reserve(ws::header_len(len, mask.is_some()).saturating_add(len));
    ws::encode_header(out, true, ws::Opcode::Binary, len, mask);
    let start = out.len();
    frame.encode(out);
    if let (Some(key), Some(body)) = (mask, out.get_mut(start..)) {
        ws::apply_mask(body, key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(frame: Frame<'_>) -> Vec<u8> {
        let mut out = Vec::new();
        frame.encode(&mut out);
        assert_eq!(out.len(), frame.encoded_len());
        assert_eq!(Frame::decode(&out), Ok(frame));
        out
    }

    #[test]
    fn command_layout() {
        let bytes = roundtrip(Frame::command("dev-1", 0x0102_0304, b"hi"));
        assert_eq!(
            bytes,
            [
                1, 0x01, 0, 5, 1, 2, 3, 4, b'd', b'e', b'v', b'-', b'1', b'h', b'i'
            ]
        );
    }

    #[test]
    fn every_type_roundtrips() {
        let frames = [
            Frame::command("a", 1, b"x"),
            Frame::command("", 1, b""),
            Frame::response("a", 2, b"yz"),
            Frame::event("sensor-9", b"{\"t\":21}"),
            Frame::presence("a", true, PresenceReason::Reconnected),
            Frame::presence("a", false, PresenceReason::Other(200)),
            Frame::error("a", 7, ErrorCode::QueueFull, "queue full"),
            Frame::error("", 7, ErrorCode::Other(999), ""),
            Frame::stream_open("a", 3, 65536, b"terminal"),
            Frame::stream_data("", 3, &[0, 1, 2]),
            Frame::stream_window("a", 3, 1),
            Frame::stream_close("a", 3, 0, "done"),
            Frame::control(9, br#"{"op":"get_status"}"#),
        ];
        for f in frames {
            roundtrip(f);
        }
        let max_unit = "u".repeat(MAX_UNIT_ID_LEN);
        roundtrip(Frame::event(&max_unit, b""));
    }

    #[test]
    fn frame_types() {
        for ty in 0..=u8::MAX {
            if let Some(t) = FrameType::from_u8(ty) {
                assert_eq!(t as u8, ty);
                assert!(!t.as_str().is_empty());
            }
        }
        assert_eq!(Frame::control(1, b"").frame_type(), FrameType::Control);
        assert_eq!(FrameType::StreamWindow.to_string(), "stream_window");
    }

    fn err(bytes: &[u8]) -> FrameError {
        Frame::decode(bytes).expect_err("must be rejected")
    }

    #[test]
    fn every_error_variant() {
        assert_eq!(err(&[]), FrameError::Truncated);
        assert_eq!(err(&[1, 1, 0, 0, 0, 0, 0]), FrameError::Truncated);
        // Unit shorter than unit_len.
        assert_eq!(
            err(&[1, 1, 0, 3, 0, 0, 0, 0, b'a', b'b']),
            FrameError::Truncated
        );
        // Type-specific fields cut short.
        assert_eq!(err(&[1, 4, 0, 0, 0, 0, 0, 0, 1]), FrameError::Truncated);
        assert_eq!(err(&[1, 5, 0, 0, 0, 0, 0, 0, 0]), FrameError::Truncated);
        assert_eq!(
            err(&[1, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 1]),
            FrameError::Truncated
        );
        assert_eq!(
            err(&[1, 0x12, 0, 0, 0, 0, 0, 0, 0, 0, 1]),
            FrameError::Truncated
        );
        assert_eq!(err(&[1, 0x13, 0, 0, 0, 0, 0, 0, 0]), FrameError::Truncated);

        assert_eq!(err(&[7]), FrameError::UnsupportedVersion(7));
        assert_eq!(
            err(&[0, 1, 0, 0, 0, 0, 0, 0]),
            FrameError::UnsupportedVersion(0)
        );
        assert_eq!(
            FrameError::UnsupportedVersion(7).to_string(),
            "frame version 7 is not supported (this gateway speaks version 1)"
        );
        assert_eq!(
            err(&[1, 0x06, 0, 0, 0, 0, 0, 0]),
            FrameError::UnknownType(6)
        );
        assert_eq!(
            err(&[1, 0x00, 0, 0, 0, 0, 0, 0]),
            FrameError::UnknownType(0)
        );
        assert_eq!(
            err(&[1, 0x01, 0x80, 0, 0, 0, 0, 0]),
            FrameError::ReservedFlags(0x80)
        );
        assert_eq!(
            err(&[1, 0x01, 0, 65, 0, 0, 0, 0]),
            FrameError::UnitTooLong(65)
        );
        assert_eq!(
            err(&[1, 0x01, 0, 1, 0, 0, 0, 0, b' ']),
            FrameError::InvalidUnit
        );
        assert_eq!(
            err(&[1, 0x01, 0, 1, 0, 0, 0, 0, 0x7F]),
            FrameError::InvalidUnit
        );
        assert_eq!(
            err(&[1, 0x01, 0, 1, 0, 0, 0, 0, 0xC3]),
            FrameError::InvalidUnit
        );

        let malformed: &[(&[u8], &str)] = &[
            (
                &[1, 4, 0, 0, 0, 0, 0, 0, 2, 0],
                "presence state must be 0 (offline) or 1 (online)",
            ),
            (
                &[1, 4, 0, 0, 0, 0, 0, 0, 1, 0, 0],
                "presence frame has bytes after the reason byte",
            ),
            (
                &[1, 5, 0, 0, 0, 0, 0, 1, 0, 1, 0xFF],
                "error message is not valid UTF-8",
            ),
            (
                &[1, 0x12, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0],
                "stream window increment must be greater than 0",
            ),
            (
                &[1, 0x12, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1, 0],
                "stream window frame has bytes after the increment",
            ),
            (
                &[1, 0x13, 0, 0, 0, 0, 0, 1, 0, 0, 0xC0],
                "stream close reason is not valid UTF-8",
            ),
        ];
        for (bytes, what) in malformed {
            assert_eq!(err(bytes), FrameError::Malformed(what));
        }
        for e in [
            FrameError::Truncated,
            FrameError::UnknownType(9),
            FrameError::ReservedFlags(1),
            FrameError::UnitTooLong(65),
            FrameError::InvalidUnit,
            FrameError::Malformed("x"),
        ] {
            assert_eq!(e.error_code(), ErrorCode::MalformedFrame);
        }
        assert_eq!(
            FrameError::UnsupportedVersion(2).error_code(),
            ErrorCode::UnsupportedVersion
        );
    }

    #[test]
    fn code_conversions() {
        for v in 0..=u16::from(u8::MAX) {
            let v8 = u8::try_from(v).expect("fits");
            let reason = PresenceReason::from(v8);
            assert_eq!(u8::from(reason), v8);
            assert_eq!(matches!(reason, PresenceReason::Other(_)), v8 > 4);
        }
        for v in 0..=1000u16 {
            let code = ErrorCode::from(v);
            assert_eq!(u16::from(code), v);
            assert_eq!(matches!(code, ErrorCode::Other(_)), v == 0 || v > 16);
        }
        assert_eq!(
            ErrorCode::DeviceNotConnected.as_str(),
            "device_not_connected"
        );
        assert_eq!(ErrorCode::FlowControl.to_string(), "flow_control");
        assert_eq!(
            PresenceReason::ClosedByGateway.as_str(),
            "closed_by_gateway"
        );
        // Every known name is distinct.
        let names: std::collections::HashSet<_> =
            (1..=16u16).map(|v| ErrorCode::from(v).as_str()).collect();
        assert_eq!(names.len(), 16);
    }

    #[test]
    fn unit_ids() {
        assert!(is_valid_unit_id("a"));
        assert!(is_valid_unit_id("!~"));
        assert!(is_valid_unit_id(&"x".repeat(64)));
        assert!(!is_valid_unit_id(""));
        assert!(!is_valid_unit_id(&"x".repeat(65)));
        assert!(!is_valid_unit_id("a b"));
        assert!(!is_valid_unit_id("é"));
        assert!(!is_valid_unit_id("a\n"));
    }

    #[test]
    fn encode_ws_wraps_in_one_binary_frame() {
        let frame = Frame::event("dev", b"payload");
        let mut plain = Vec::new();
        encode_ws(&mut plain, &frame, None);
        let len = frame.encoded_len();
        assert_eq!(plain[..2], [0x82, u8::try_from(len).expect("small")]);
        let mut masked = Vec::new();
        encode_ws(&mut masked, &frame, Some([1, 2, 3, 4]));

        let mut d = ws::Decoder::new(ws::Role::Client, 1024);
        match d.decode(&mut plain) {
            Ok(ws::Decoded::Frame {
                message: Some(ws::Message::Binary(m)),
                consumed,
            }) => {
                assert_eq!(consumed, 2 + len);
                assert_eq!(Frame::decode(m), Ok(frame));
            }
            other => panic!("{other:?}"),
        }
        let mut d = ws::Decoder::new(ws::Role::Server, 1024);
        match d.decode(&mut masked) {
            Ok(ws::Decoded::Frame {
                message: Some(ws::Message::Binary(m)),
                ..
            }) => assert_eq!(Frame::decode(m), Ok(frame)),
            other => panic!("{other:?}"),
        }
    }
}
