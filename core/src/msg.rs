//! Messages between workers (and from a worker to itself): the router's vocabulary.
//!
//! Frames bound for a manager are encoded by the sender and travel as ready WebSocket
//! bytes, so a broadcast is encoded once. Frames bound for a device travel structured,
//! because the device's worker assigns the request and stream ids the device sees.

use std::sync::Arc;

use bytes::Bytes;
use devgate_proto::frame::ErrorCode;

use crate::handle::ConnHandle;

/// A message for the connection `to`.
#[derive(Debug)]
pub struct Msg {
    /// Recipient connection.
    pub to: ConnHandle,
    /// What to do.
    pub kind: MsgKind,
}

/// How the recipient treats a ready frame when its queue is over the soft limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Priority {
    /// May be refused: the original sender is told `queue_full` (`bounce_to`).
    Droppable,
    /// Must be delivered (presence, errors, control replies, stream credit): only the
    /// hard limit applies, past which the recipient is disconnected as too slow.
    Essential,
}

/// Why the gateway closes a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// A newer connection with the same unit ID took over.
    Replaced,
    /// No manager for the grace period.
    NoManager,
    /// The gateway is shutting down.
    Shutdown,
    /// The device's credential was revoked.
    Revoked,
}

/// What the recipient does.
#[derive(Debug)]
pub enum MsgKind {
    /// Queue an encoded WebSocket frame; if refused, tell `bounce_to` about request `bounce_id`.
    Frame {
        /// The encoded WebSocket frame.
        bytes: Bytes,
        /// Whether the soft queue limit applies.
        priority: Priority,
        /// Who is told `queue_full` if the frame is refused.
        bounce_to: Option<ConnHandle>,
        /// Request id for that error.
        bounce_id: u32,
        /// Unit ID for that error (the device the frame came from or went to).
        bounce_unit: Option<Arc<str>>,
    },
    /// A device's response for the manager `to` that asked. If the manager's queue refuses
    /// it, both ends are told: the device (`queue_full` for its id) and the manager
    /// (`queue_full` for its own request id), so no manager waits for a request timeout.
    Response {
        /// The encoded Response frame (the manager's request id and the unit inside).
        bytes: Bytes,
        /// The answering device.
        device: ConnHandle,
        /// The request id the device answered (its side of the rewritten ids).
        device_request_id: u32,
        /// The manager's own request id.
        request_id: u32,
        /// The device's unit ID.
        unit: Arc<str>,
    },
    /// A manager's command for the device `to`.
    Command {
        /// Asking manager.
        from: ConnHandle,
        /// The device's unit ID (for errors back to the manager).
        unit: Arc<str>,
        /// The manager's own request id.
        request_id: u32,
        /// Command payload.
        payload: Bytes,
    },
    /// A manager opens a stream to the device `to`.
    StreamOpen {
        /// Opening manager.
        from: ConnHandle,
        /// The device's unit ID.
        unit: Arc<str>,
        /// The manager's stream id.
        stream_id: u32,
        /// Credit the manager grants the device.
        window: u32,
        /// Open parameters.
        payload: Bytes,
    },
    /// Stream data from a manager for the device `to`.
    StreamDataToDevice {
        /// Sending manager.
        from: ConnHandle,
        /// The manager's stream id.
        stream_id: u32,
        /// Data.
        payload: Bytes,
    },
    /// Credit from a manager for the device `to`.
    StreamWindowToDevice {
        /// Granting manager.
        from: ConnHandle,
        /// The manager's stream id.
        stream_id: u32,
        /// Credit returned.
        increment: u32,
    },
    /// A manager closes a stream at the device `to`.
    StreamCloseToDevice {
        /// Closing manager.
        from: ConnHandle,
        /// The manager's stream id.
        stream_id: u32,
        /// Close code.
        code: u16,
        /// Reason text.
        reason: Bytes,
    },
    /// Credit from a device for the manager `to` (the manager's worker counts it).
    StreamWindowToManager {
        /// The manager's stream id.
        stream_id: u32,
        /// Credit returned.
        increment: u32,
        /// The granting device (told `unknown_stream` if the stream closed meanwhile).
        device: ConnHandle,
        /// The device's stream id.
        device_stream: u32,
    },
    /// The device side of a stream is gone; the manager `to` is told and forgets it.
    StreamClosedToManager {
        /// The manager's stream id.
        stream_id: u32,
        /// Close code.
        code: u16,
        /// Reason text.
        reason: Bytes,
        /// The device's unit ID.
        unit: Arc<str>,
    },
    /// Stream data from a device for the manager `to` (under credit the device holds).
    StreamDataToManager {
        /// The manager's stream id.
        stream_id: u32,
        /// Encoded WebSocket frame.
        bytes: Bytes,
        /// The sending device (told `unknown_stream` if the stream closed meanwhile).
        device: ConnHandle,
        /// The device's stream id.
        device_stream: u32,
    },
    /// The gateway closes `to`.
    Close(CloseReason),
    /// The control plane's answer to an HTTP request (enrollment, pairing): send it and
    /// close the connection.
    HttpResponse(Bytes),
    /// Send an error frame to `to`.
    Error {
        /// Error code.
        code: ErrorCode,
        /// Request or stream id it refers to.
        id: u32,
        /// Device it concerns, if any.
        unit: Option<Arc<str>>,
        /// Human-readable explanation.
        message: &'static str,
    },
}

impl Msg {
    /// A failure notice for the original sender of this message, if it had one, used
    /// when the message cannot be delivered (recipient gone or inbox full).
    pub fn bounce(self, code_if_gone: ErrorCode, message: &'static str) -> Option<Self> {
        match self.kind {
            MsgKind::Command {
                from,
                unit,
                request_id,
                ..
            } => Some(Self {
                to: from,
                kind: MsgKind::Error {
                    code: code_if_gone,
                    id: request_id,
                    unit: Some(unit),
                    message,
                },
            }),
            // The manager's worker holds an entry for the stream: close it there.
            MsgKind::StreamOpen {
                from,
                unit,
                stream_id,
                ..
            } => Some(Self {
                to: from,
                kind: MsgKind::StreamClosedToManager {
                    stream_id,
                    code: code_if_gone.into(),
                    reason: Bytes::from_static(message.as_bytes()),
                    unit,
                },
            }),
            // The manager's worker cannot be reached now; the device hears of it, and the
            // manager's request ends with its request timeout.
            MsgKind::Response {
                device,
                device_request_id,
                ..
            } => Some(Self {
                to: device,
                kind: MsgKind::Error {
                    code: ErrorCode::QueueFull,
                    id: device_request_id,
                    unit: None,
                    message,
                },
            }),
            MsgKind::Frame {
                bounce_to: Some(to),
                bounce_id,
                bounce_unit,
                ..
            } => Some(Self {
                to,
                kind: MsgKind::Error {
                    code: ErrorCode::QueueFull,
                    id: bounce_id,
                    unit: bounce_unit,
                    message: "the receiver's queue is full; retry later",
                },
            }),
            _ => None,
        }
    }
}
