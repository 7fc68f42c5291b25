//! devgate's routing core, sans I/O. The daemon (`gateway`) owns the sockets, threads,
//! clocks, kernel and store; this crate owns what happens to the bytes. A driver hands a
//! [`worker::Worker`] received bytes and the current time and asks it for bytes to send;
//! the worker runs TLS (rustls, fed bytes), the HTTP upgrade, WebSocket framing and
//! devgate frames, and routes frames between devices and managers. Cargo keeps it honest:
//! this crate depends on no I/O crate, and CI checks that it has no `unsafe`, no `libc`
//! and reads no clock.
//!
//! From the connection inwards:
//!
//! - [`tls_conn`] — one connection's TLS (the only file that names rustls' connection
//!   types); [`kernel_tls`] — what the kernel can take and the socket operations a kTLS
//!   connection needs (implemented by the daemon).
//! - [`conn`] — what a worker keeps per connection (TLS, phase, output queue, session).
//! - [`worker`] — a worker: slots, the driver contract, and the router, one file per concern
//!   (see its module docs for the map).
//! - [`timers`] — a worker's deadline queues.
//! - [`shared`] — what all workers share: the session map, managers, inboxes through
//!   which workers hand each other [`msg`]s, limits and counters ([`stats`]).
//! - [`identity`] — which certificates are accepted, mirrored from the store.
//! - [`guard`], [`unauth`] — admission per source (the guard is the daemon's).
//! - [`proxy_proto`] — the PROXY protocol header a balancer puts before TLS.
//! - [`store_jobs`] — work handed to the daemon's store thread.
//! - [`settings`] — the configuration sections the core reads.
//! - [`ratelimit`] — rate-limited warnings for what unauthenticated peers can trigger.

pub mod conn;
pub mod guard;
pub mod handle;
pub mod identity;
pub mod kernel_tls;
pub mod msg;
pub mod proxy_proto;
pub mod ratelimit;
pub mod settings;
pub mod shared;
pub mod stats;
pub mod store_jobs;
pub mod timers;
pub mod tls_conn;
pub mod tls_material;
pub mod unauth;
pub mod worker;
