//! devgate: a rendezvous gateway. Managers and devices both dial out to it over TLS
//! WebSocket; it authenticates both with client certificates and routes devgate frames
//! between them.
//!
//! The routing core — workers, per-connection TLS/HTTP/WebSocket, the router, the session
//! map — is the `devgate-core` crate, sans I/O; its modules are re-exported here under
//! their old paths ([`worker`], [`shared`], [`conn`], [`msg`], [`timers`], [`identity`],
//! [`proxy_proto`], [`tls_conn`], [`stats`]). This crate is everything around it, from the
//! socket outwards:
//!
//! - [`driver`] — thin I/O loops (io_uring, or epoll via mio) that move bytes between
//!   sockets and a worker; one thread per worker. The handshake workers (at a lower CPU
//!   priority) own the `SO_REUSEPORT` listeners and hand each new session, socket and
//!   state, to a routing worker ([`shared::Handover`]).
//! - [`ktls`] — kernel TLS: the probe at start and the system calls the core's
//!   `KernelTlsSocket` stands for.
//! - [`guard`] — admission of new connections per source IP and globally (XDP or user space).
//! - [`server`] — start-up: listeners, workers, the store thread, admin.
//! - [`daemon`] — what the daemon's threads share: the core's state, the configuration, the
//!   store.
//! - [`store`] — the credential store (SQLite by default, PostgreSQL for several
//!   instances): keys, device registry, revocations.
//! - [`store_thread`] — the thread that serves the workers' store jobs (enrollment,
//!   pairing, key management, manager control operations that need the store) and polls
//!   revocations, off the data path.
//! - [`certcmd`] — `devgate cert …`: import/check chains, renewal, root exchange.
//! - [`creds`] — credential commands (`keys`, `devices`, `managers`, `reload`).
//! - [`tls`] — rustls configuration from the data dir; [`tickets`] — TLS session ticket keys
//!   kept in the data dir and rotated, so that sessions resume across restarts and reloads.
//! - [`admin`] — the admin listener: `/v1/status` and `/metrics`; [`admin_token`] — its
//!   bearer token.
//! - [`ops`] — what makes it a well-behaved daemon and what operators run: systemd
//!   notification and the data-path watchdog, shutdown, rate-limited warnings, journald-
//!   friendly logs, `devgate status`, `devgate install` / `uninstall`.
//! - [`reload`] — SIGHUP: certificates and the trust bundle swapped in, sessions kept.
//! - [`config`] — the TOML configuration and its defaults; [`clock`] — the wall clock.
//! - [`harness`] — the core's workers driven in memory, for the routing tests and the
//!   routing instruction counts.

pub mod admin;
pub mod admin_token;
pub mod certcmd;
pub mod clock;
pub mod config;
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
pub mod store_thread;
pub mod tickets;
pub mod tls;

// The routing core (`devgate-core`), under the paths the daemon's modules use.
pub use devgate_core::warn_limited;
pub use devgate_core::{conn, identity, msg, proxy_proto, shared, stats, timers, tls_conn, worker};
