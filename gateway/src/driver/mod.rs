//! I/O drivers: thin loops that move bytes between sockets and a [`Worker`](crate::worker::Worker).
//!
//! `epoll` (via mio) is the portable driver; it runs everywhere. An io_uring driver plugs
//! into the same `Worker` interface.

pub mod epoll;
pub mod uring;
