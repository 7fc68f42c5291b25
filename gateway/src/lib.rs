//! devgate: a rendezvous gateway. Managers and devices both dial out to it over TLS
//! WebSocket; it authenticates both with client certificates and routes devgate frames
//! between them.
//!
//! How the pieces fit, from the socket inwards:
//!
//! - [`driver`] — thin I/O loops (io_uring, or epoll via mio) that move bytes between
//!   sockets and a worker; one thread per worker. The handshake workers (at a lower CPU
//!   priority) own the `SO_REUSEPORT` listeners and hand each new session, socket and
//!   state, to a routing worker ([`shared::Handover`]).
//! - [`worker`] — the sans-IO core of one core's connections: TLS (rustls, fed bytes),
//!   the HTTP upgrade, WebSocket framing and devgate frames (from `devgate-proto`), keep-
//!   alives, and the router. It never touches a socket or reads the clock itself.
//! - [`timers`] — a worker's per-connection timers (handshake deadlines, session sweeps),
//!   so that a tick touches only what is due.
//! - [`conn`] — what the worker keeps per connection, sized for tens of thousands idle.
//! - [`shared`] — the session map (unit ID → connection), the manager list, the per-worker
//!   inboxes through which workers hand each other [`msg`]s, limits and counters.
//! - [`guard`] — admission of new connections per source IP and globally (XDP or user space).
//! - [`proxy_proto`] — the PROXY protocol header a load balancer puts before TLS.
//! - [`store`] — the credential store (SQLite by default, PostgreSQL for several
//!   instances): keys, device registry, revocations.
//! - [`identity`] — which certificates are accepted (current, renewal overlap, revoked),
//!   mirrored from the store for the workers.
//! - [`control`] — the control plane's store thread: enrollment, pairing, key management,
//!   revocation, off the data path.
//! - [`certcmd`] — `devgate cert …`: import/check chains, renewal, root exchange.
//! - [`creds`] — credential commands (`keys`, `devices`, `managers`, `reload`).
//! - [`tls`] — rustls configuration and the certificate facts status reports.
//! - [`tickets`] — TLS session ticket keys kept in the data dir and rotated, so that
//!   sessions resume across restarts and reloads.
//! - [`admin`] — the control plane's admin listener: `/v1/status` and `/metrics`.
//! - [`ops`] — what makes it a well-behaved daemon and what operators run: systemd
//!   notification and the data-path watchdog, rate-limited warnings, journald-friendly
//!   logs, `devgate status`, `devgate install` / `uninstall`.
//! - [`reload`] — SIGHUP: certificates and the trust bundle swapped in, sessions kept.
//! - [`server`] — start-up (listeners, workers, admin) and graceful shutdown.
//! - [`config`] — the TOML configuration and its defaults.

pub mod admin;
pub mod admin_token;
pub mod certcmd;
pub mod clock;
pub mod config;
pub mod control;
pub mod creds;
pub mod daemon;
pub mod driver;
pub mod guard;
pub mod harness;
pub mod ktls;
pub mod ops;
pub mod reload;
pub mod server;
pub mod store;
pub mod tickets;
pub mod tls;

// The routing core (`devgate-core`), under the paths the daemon's modules use.
pub use devgate_core::warn_limited;
pub use devgate_core::{conn, identity, msg, proxy_proto, shared, stats, timers, tls_conn, worker};
