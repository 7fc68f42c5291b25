//! The protocol core of devgate: everything the gateway, the client library
//! and the load generator need to speak to each other, with no I/O in it.
//!
//! devgate routes frames between management servers ("managers") and tens of
//! thousands of devices over TLS WebSockets. A connection goes through three
//! layers, and this crate has one module per layer:
//!
//! * [`http`] parses the HTTP/1.1 request that opens every connection and
//!   writes the `101 Switching Protocols` answer (or a plain error response).
//!   It borrows the request head straight out of the read buffer and enforces
//!   a size limit on it, because a peer that never finishes its headers must
//!   not make the gateway buffer without bound.
//!
//! * [`ws`] is RFC 6455 framing. [`ws::Decoder`] looks at the front of a read
//!   buffer and either says "not all there yet" ([`ws::Decoded::Incomplete`]
//!   is an expected state, not an error) or returns one frame, unmasking the
//!   payload in place. The only allocation it ever makes is for the rare
//!   message that a peer splits into several fragments.
//!
//! * [`frame`] is devgate's own frame: one binary WebSocket message carries
//!   exactly one frame, an 8-byte header, a unit ID naming the device, and a
//!   body whose shape depends on the frame type (command, response, event,
//!   presence, error, stream frames, control). `docs/PROTOCOL.md` describes
//!   the same layout for implementers in other languages, and
//!   `tests/vectors.json` holds golden byte strings for them.
//!
//! The crate is sans-IO in the quinn-proto / rustls sense: it owns no sockets,
//! reads no clocks and starts no threads. Callers hand it bytes and get back
//! values and bytes to send, which is what lets the same code run under the
//! io_uring and epoll drivers and be fuzzed directly (see `tests/fuzz_props.rs`
//! and the cargo-fuzz targets in `fuzz/`).
//!
//! Everything on the decode path runs on every byte the gateway receives from
//! 50,000 connections, so the parsers take borrowed slices, never panic on
//! any input (no unchecked indexing or arithmetic that input controls), and
//! report problems as `thiserror` enums whose messages tell the implementer of
//! the misbehaving peer what to fix.

#![forbid(unsafe_code)]
#![warn(missing_docs)]
// The parsers face untrusted input: indexing and unwrapping are banned outside
// tests so that no byte sequence can turn into a panic.
#![cfg_attr(
    not(test),
    deny(
        clippy::indexing_slicing,
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic
    )
)]

pub mod frame;
pub mod http;
pub mod remote;
pub mod ws;
