//! Counters written by one worker each (relaxed atomics on the worker's own cache line)
//! and summed by the admin listener.

use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! counters {
    ($( $(#[$doc:meta])* $name:ident ),* $(,)?) => {
        /// One worker's counters.
        #[derive(Debug, Default)]
        pub struct WorkerStats { $( $(#[$doc])* pub $name: AtomicU64, )* }

        /// A summed snapshot of all workers' counters.
        #[derive(Debug, Default, Clone, serde::Serialize)]
        pub struct StatsSnapshot { $( $(#[$doc])* pub $name: u64, )* }

        impl StatsSnapshot {
            /// Adds one worker's counters.
            pub fn add(&mut self, w: &WorkerStats) {
                $( self.$name += w.$name.load(Ordering::Relaxed); )*
            }

            /// (name, value) pairs in declaration order, for the metrics page.
            pub fn fields(&self) -> Vec<(&'static str, u64)> {
                vec![ $( (stringify!($name), self.$name), )* ]
            }
        }
    };
}

counters! {
    /// TCP connections accepted.
    accepted,
    /// Connections refused at accept because `max_connections` was reached.
    refused_max_connections,
    /// TLS handshakes completed.
    handshakes_ok,
    /// TLS handshakes that failed (bad client hello, certificate, protocol).
    handshakes_failed_tls,
    /// Handshakes (TLS plus HTTP head) that ran past the handshake timeout.
    handshakes_failed_timeout,
    /// Requests refused at the HTTP layer (bad request, wrong path, missing credential).
    http_refused,
    /// `/usg/check-status` requests answered.
    check_status_requests,
    /// Devices upgraded to WebSocket.
    device_sessions,
    /// Managers upgraded to WebSocket.
    manager_sessions,
    /// Devices rejected by the device limit.
    rejected_device_limit,
    /// Devices rejected or disconnected because no manager was connected for the grace period.
    rejected_no_manager,
    /// Device connections replaced by a newer connection with the same unit ID.
    replaced,
    /// Peers declared dead after missing keep-alives.
    dead_peers,
    /// Devgate frames received from devices.
    frames_from_devices,
    /// Devgate frames received from managers.
    frames_from_managers,
    /// Frames queued towards devices.
    frames_to_devices,
    /// Frames queued towards managers.
    frames_to_managers,
    /// Plaintext bytes received on WebSocket sessions.
    bytes_in,
    /// Plaintext bytes sent on WebSocket sessions.
    bytes_out,
    /// Frames refused because the receiver's queue was full (the sender got `queue_full`).
    queue_full,
    /// Connections closed because their queue passed the hard limit (too slow a reader).
    slow_consumers,
    /// Error frames sent to peers.
    error_frames,
    /// Peers closed for protocol violations (WebSocket or devgate frame).
    protocol_errors,
    /// Messages that could not be handed to another worker (inbox full).
    inbox_full,
    /// Commands answered with a response routed back to the asking manager.
    responses_routed,
    /// Commands failed by the request timeout.
    request_timeouts,
}
