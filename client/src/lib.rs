//! Client library for devgate: connect to a gateway over TLS, upgrade to a
//! WebSocket as a device or a manager, and exchange devgate frames.
//!
//! It serves the end-to-end tests and the load generator, which runs tens of
//! thousands of simulated devices in one tokio runtime. So a [`Connection`]
//! starts no task and owns little: the TLS stream, a read buffer that starts
//! at 1 KiB and shrinks back after large messages, the decoder, and an output
//! buffer. Beyond the [`Received`] frame it returns, receiving allocates
//! nothing.
//!
//! The modules, in the order a connection meets them:
//!
//! * `tls` builds the shared [`rustls::ClientConfig`] ([`tls_config`],
//!   [`tls_config_with`] for single-version or single-suite clients) and
//!   reads PEM files ([`certs_from_pem`], [`key_from_pem`]).
//! * `connect` opens TCP (optionally from a chosen source address), runs the
//!   TLS handshake and the HTTP upgrade ([`connect`], [`ConnectOptions`]),
//!   and does single HTTPS requests ([`http_get`], [`http_post`]). HTTP and WebSocket
//!   parsing are `devgate_proto`'s; this crate only moves bytes.
//! * `proxy` tunnels that TCP connection through an HTTP CONNECT proxy when
//!   [`ConnectOptions::proxy`] is set ([`Proxy`], `http://[user:pass@]host:port`;
//!   [`Proxy::from_env`] and [`ConnectOptions::with_env_proxy`] honour `HTTPS_PROXY` and
//!   [`NoProxy`] lists from `NO_PROXY`; [`Proxy::select`] for programs with a `--proxy`
//!   setting of their own). The one-shot requests take a proxy in their
//!   `_via` forms ([`http_get_via`], [`http_post_via`], [`enroll_via`], [`renew_via`],
//!   [`fetch_gateway_root_via`]).
//! * `conn` is the upgraded connection: [`Connection::send`] and
//!   [`Connection::recv`] (which answers pings and the gateway's Close on the
//!   way), and [`Connection::split`] into a cloneable [`Sender`] and a
//!   [`Receiver`]. `recv` is cancel-safe, so it can sit in a `select!`.
//! * `discover`, `first_contact` and `enroll` are a device's first steps,
//!   in that order: find the gateway from the person's e-mail address
//!   through a DNS TXT record ([`discover`]), learn its root certificate and
//!   have the person confirm its fingerprint ([`fetch_gateway_root`],
//!   [`FirstContact`]), then trade the unit ID and enrollment key for a
//!   client certificate ([`enroll`]), which [`tls_config`] then presents.
//! * `mux` runs a connection with a reader and a writer task so that streams are
//!   tokio I/O objects ([`Mux`], [`DevgateStream`]: `AsyncRead` + `AsyncWrite`, credit
//!   handled inside, the streams of a connection sharing [`CONNECTION_WINDOW`]) — what
//!   agents, operator tools and the load generator build on. [`Mux::next_frame`] and
//!   [`Mux::accept_stream`] take `&self`, so one task can wait on both and tasks can share
//!   an `Arc<Mux>`.
//! * `fleet` is a manager's connection to every instance of a fleet ([`Fleet`]): one
//!   connection per instance (a list, or every address of a name: [`resolve_all`]),
//!   presence merged into one view ([`PresenceMerge`], sans-IO) and commands and streams
//!   routed to the instance that holds the device.
//! * `backoff` is the reconnect policy for agents ([`Backoff`]).
//! * `trust` reads the trust bundle the gateway sends during a root exchange and
//!   builds its acknowledgement ([`TrustBundle`]).
//! * `error` is [`ClientError`], whose variants say which side failed: the
//!   gateway (refused, closed, sent garbage), TLS, the network, or the
//!   caller's configuration.
//!
//! ```no_run
//! # async fn demo(roots: Vec<rustls_pki_types::CertificateDer<'static>>) -> Result<(), devgate_client::ClientError> {
//! use devgate_client::{ConnectOptions, Incoming, Role};
//! let tls = devgate_client::tls_config(&roots, None)?;
//! let opts = ConnectOptions::new("127.0.0.1:8443".parse().unwrap(), "gw.example.com", Role::Manager);
//! let mut conn = devgate_client::connect(&opts, tls).await?;
//! if let Incoming::Frame(received) = conn.recv().await? {
//!     println!("{:?}", received.frame());
//! }
//! conn.close(1000, "done").await
//! # }
//! ```

#![forbid(unsafe_code)]
#![warn(missing_docs)]

use std::time::Duration;

mod backoff;
mod conn;
mod connect;
mod discover;
mod enroll;
mod error;
mod first_contact;
mod fleet;
mod mux;
mod proxy;
mod tls;
mod trust;

pub use backoff::Backoff;
pub use conn::{Connection, Incoming, Received, Receiver, Sender};
pub use connect::{
    ConnectOptions, Role, connect, http_get, http_get_via, http_post, http_post_via,
};
pub use devgate_proto::frame::{Body, ErrorCode, Frame, FrameType, PresenceReason};
pub use discover::{DEFAULT_GATEWAY_PORT, Discovered, ResolverConfigChoice, discover};
pub use enroll::{ENROLL_PATH, Enrolled, RENEW_PATH, enroll, enroll_via, renew, renew_via};
pub use error::ClientError;
pub use first_contact::{FirstContact, fetch_gateway_root, fetch_gateway_root_via};
pub use fleet::{
    Answer, Fleet, FleetEvent, FleetOptions, InstanceIndex, OfflineCause, PresenceChange,
    PresenceMerge, Routed, resolve_all,
};
pub use mux::{
    CONNECTION_WINDOW, DevgateStream, Frames, IncomingStream, IncomingStreams, MAX_CHUNK,
    MIN_WINDOW, Mux, STREAM_WINDOW,
};
pub use proxy::{NoProxy, Proxy, parse_connect_response};
pub use tls::{certs_from_pem, key_from_pem, tls_config, tls_config_with};
pub use trust::TrustBundle;

// Limits and liveness constants, in one place.

/// Default largest WebSocket message accepted from the gateway: a 1 MiB frame
/// payload plus room for the frame header and unit ID.
pub const DEFAULT_MAX_MESSAGE: usize = 1024 * 1024 + 64;
/// Default limit on TCP connect + TLS handshake + upgrade.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long [`Connection::close`] waits for the gateway's Close.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// First reconnect delay ceiling of [`Backoff::default`].
pub const DEFAULT_BACKOFF_BASE: Duration = Duration::from_millis(100);
/// Largest reconnect delay of [`Backoff::default`].
pub const DEFAULT_BACKOFF_CAP: Duration = Duration::from_secs(30);
/// Longest HTTP response head accepted.
const MAX_RESPONSE_HEAD: usize = 8 * 1024;
/// How much of a refused upgrade's body is kept.
const MAX_REFUSAL_BODY: usize = 4 * 1024;
/// How long to wait for a refusal's body once the status is known.
const REFUSAL_BODY_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest body [`http_get`] and [`http_post`] return.
const MAX_HTTP_BODY: usize = 16 * 1024 * 1024;
/// Largest enrollment answer [`enroll`] accepts.
const MAX_ENROLL_BODY: usize = 64 * 1024;
/// Limit on a whole [`http_get`], [`http_post`] or [`enroll`] exchange.
const HTTP_TIMEOUT: Duration = Duration::from_secs(30);
