//! The one error type of the client library.
//!
//! Every variant says which side is at fault: the gateway (it refused the
//! upgrade, closed the connection, or sent bytes that break the protocol),
//! the network (I/O, timeouts) or the caller's own configuration; the
//! enrollment variants say what the person at the device should do.

use std::time::Duration;

use devgate_proto::frame::FrameError;
use devgate_proto::ws::WsError;

/// What went wrong while talking to a devgate gateway.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The socket failed (connection refused or reset, the gateway closed the
    /// TCP connection without a WebSocket Close, …).
    #[error("I/O error talking to the gateway: {0}")]
    Io(#[from] std::io::Error),
    /// TLS failed: the handshake (certificate not trusted, name mismatch,
    /// version or cipher suite not shared) or a fatal alert later on, such as
    /// the gateway rejecting this client's certificate. The string names the
    /// gateway and the rustls reason.
    #[error("TLS: {0}")]
    Tls(String),
    /// The gateway answered a request with a status the caller cannot use: a
    /// WebSocket upgrade with anything but 101 (the body, at most 4 KiB,
    /// lossily decoded as UTF-8, usually says why), or an enrollment with a
    /// status other than 200, 401 and 429.
    #[error("gateway refused the request with HTTP {status}: {body}")]
    Refused {
        /// The HTTP status code.
        status: u16,
        /// The start of the response body.
        body: String,
    },
    /// The gateway's HTTP response to the upgrade is malformed (wrong
    /// `Sec-WebSocket-Accept`, head too large, connection closed early, …).
    #[error("bad upgrade response from the gateway: {0}")]
    BadHandshake(String),
    /// The gateway sent bytes that are not valid RFC 6455 framing (or a
    /// message larger than `ConnectOptions::max_message`).
    #[error("gateway sent an invalid WebSocket frame: {0}")]
    Ws(#[from] WsError),
    /// The gateway sent a binary message that is not a valid devgate frame.
    #[error("gateway sent an undecodable devgate frame: {0}")]
    Frame(#[from] FrameError),
    /// The gateway sent something the devgate protocol does not allow on a
    /// frame channel, such as a text message.
    #[error("gateway violated the devgate protocol: {0}")]
    Protocol(String),
    /// The gateway closed the WebSocket (its Close has already been answered
    /// and reported once as [`Incoming::Closed`](crate::Incoming::Closed));
    /// nothing more can be sent or received.
    #[error("WebSocket closed by the gateway with {}: {reason}", fmt_code(*.code))]
    Closed {
        /// The close code the gateway sent, if any.
        code: Option<u16>,
        /// The reason text the gateway sent.
        reason: String,
    },
    /// This side already sent a WebSocket Close, so it may send no more
    /// messages.
    #[error("WebSocket already closed by this client (code {code})")]
    ClosedLocally {
        /// The code this side sent.
        code: u16,
    },
    /// An operation did not finish in time; the string names the phase.
    #[error("timed out during {0}")]
    Timeout(&'static str),
    /// The HTTP proxy did not open a tunnel to the gateway: it asked for credentials
    /// (407) or rejected them, refused the destination, could not reach the gateway, or
    /// answered with something that is not HTTP. The string says what the proxy answered.
    #[error("HTTP proxy: {0}")]
    Proxy(String),
    /// The caller's configuration is unusable (bad certificate or key,
    /// invalid server name, protocol versions without cipher suites, …).
    #[error("client configuration: {0}")]
    Config(String),
    /// Finding the gateway through DNS failed: the address given is not an
    /// e-mail address or domain, the domain publishes no `_devgate` TXT
    /// record, the record is not a devgate URL, or the DNS lookup itself
    /// failed. The string says which and what to do.
    #[error("gateway discovery: {0}")]
    Discovery(String),
    /// The first-contact check failed: the part of the root fingerprint the
    /// person typed does not match the root the gateway presented. This may
    /// not be the intended gateway, or someone is intercepting the
    /// connection: do not connect, ask the administrator.
    #[error("gateway fingerprint check failed: {0}")]
    Fingerprint(String),
    /// The device (or the gateway on its behalf) refused a stream this manager opened; the
    /// code is an error code (PROTOCOL.md section 7) and the reason says why, e.g. that the
    /// target is not on the device's allow-list.
    #[error("stream refused with code {code}: {reason}")]
    StreamRefused {
        /// The StreamClose code.
        code: u16,
        /// The StreamClose reason.
        reason: String,
    },
    /// A fleet ([`Fleet`](crate::Fleet)) could not do what was asked: no instance is
    /// connected, an instance name does not resolve, an instance is shutting down. The
    /// string says which instance and why.
    #[error("fleet: {0}")]
    Fleet(String),
    /// The connection to the fleet instance a request was sent to ended before its answer:
    /// the device may or may not have received it, so it was not sent again elsewhere.
    #[error(
        "the connection to instance {instance} ended with the request in flight ({reason}); \
         the device may or may not have acted on it"
    )]
    InstanceLost {
        /// The instance.
        instance: String,
        /// What ended the connection.
        reason: String,
    },
    /// The gateway refused the enrollment (HTTP 401). It deliberately does
    /// not say whether the unit ID or the enrollment key was wrong, or the
    /// key is no longer valid.
    #[error(
        "the gateway refused the enrollment: check the unit ID and the enrollment key with \
         your administrator (a key may also have expired or been used already)"
    )]
    EnrollmentRefused,
    /// The gateway refused the enrollment because of too many attempts
    /// (HTTP 429). Wait `retry_after` (when the gateway said) and try again.
    #[error("too many enrollment attempts: retry {}", fmt_retry(*.retry_after))]
    RateLimited {
        /// How long the gateway asks to wait (its `Retry-After` header).
        retry_after: Option<Duration>,
    },
}

fn fmt_retry(retry_after: Option<Duration>) -> String {
    match retry_after {
        Some(d) => format!("in {} s", d.as_secs()),
        None => "later".to_owned(),
    }
}

fn fmt_code(code: Option<u16>) -> String {
    match code {
        Some(c) => format!("code {c}"),
        None => "no code".to_owned(),
    }
}

/// Turns an I/O error from the TLS stream into the error that names its real
/// cause: rustls reports fatal alerts and certificate failures as `io::Error`
/// wrapping a `rustls::Error`, and those are TLS failures, not network ones.
pub(crate) fn from_io(e: std::io::Error, context: &str) -> ClientError {
    match e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        Some(tls) => ClientError::Tls(format!("{context}: {tls}")),
        None => ClientError::Io(e),
    }
}
