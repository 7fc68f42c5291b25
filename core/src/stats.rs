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
    /// Connections refused at accept by the guard (per-IP or rate limits, admission off).
    refused_by_guard,
    /// Connections refused at accept because their source holds
    /// `limits.max_handshakes_per_source` unauthenticated connections.
    refused_handshakes_per_source,
    /// Connections from a `proxy_protocol_from` network refused for a missing or invalid
    /// PROXY header.
    refused_proxy_header,
    /// Unauthenticated connections closed to make room for a newer one (table full).
    evicted_unauthenticated,
    /// Connections a handshake worker handed to a routing worker after their TLS
    /// handshake, when they asked for a session (counted by the routing worker).
    handed_over,
    /// Timer entries a worker examined (handshake deadlines, session sweeps): grows with
    /// the timers that fall due, not with the connections held.
    timer_checks,
    /// TLS handshakes completed.
    handshakes_ok,
    /// Of those, handshakes that resumed a session from a ticket (no signature, no
    /// certificate checks); ticket keys persist in the data dir, so also after a restart.
    handshakes_resumed,
    /// TLS handshakes that failed (bad client hello, certificate, protocol).
    handshakes_failed_tls,
    /// Sessions whose record layer was handed to the kernel (kTLS).
    ktls_offloaded,
    /// Sessions that stayed in rustls although kTLS is on (cipher the kernel lacks, ULP refused).
    ktls_not_offloaded,
    /// Sessions closed because installing kTLS keys failed after rustls gave them up.
    ktls_install_failed,
    /// TLS 1.3 KeyUpdates applied to a kTLS socket.
    ktls_key_updates,
    /// kTLS sessions closed because the peer asked for a KeyUpdate this kernel cannot do.
    tls_rekey_unsupported,
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
    /// Messages for a connection of the same worker (no queue hop, no wake-up).
    messages_local,
    /// Messages handed to another worker's inbox (a cross-core hop).
    messages_cross_worker,
    /// Commands answered with a response routed back to the asking manager.
    responses_routed,
    /// Commands failed by the request timeout.
    request_timeouts,
    /// Devices enrolled with a first-authentication key.
    enrollments,
    /// Enrollments refused (bad, used, expired or revoked key, revoked unit).
    enrollments_refused,
    /// Enrollment or pairing attempts refused by the per-IP failure limit.
    enroll_rate_limited,
    /// Device connections refused because the credential is revoked.
    rejected_revoked,
}

/// Upper bounds (µs) of the latency histogram buckets; the last bucket is +Inf.
pub const LATENCY_BOUNDS_US: [u64; 16] = [
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 2_500_000, 10_000_000,
];

/// A fixed-bucket latency histogram written by one worker (Prometheus-style cumulative
/// rendering is done when read).
#[derive(Debug, Default)]
pub struct LatencyHistogram {
    /// Observations per bucket (non-cumulative); index 16 is +Inf.
    pub buckets: [AtomicU64; 17],
    /// Sum of observations in µs.
    pub sum_us: AtomicU64,
    /// Number of observations.
    pub count: AtomicU64,
}

impl LatencyHistogram {
    /// Records one observation.
    pub fn record(&self, d: std::time::Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        let idx = LATENCY_BOUNDS_US
            .iter()
            .position(|b| us <= *b)
            .unwrap_or(LATENCY_BOUNDS_US.len());
        self.buckets[idx].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }
}

/// One worker's latency histograms.
#[derive(Debug, Default)]
pub struct WorkerLatencies {
    /// From forwarding a command to a device until its response arrives at the gateway.
    pub device_response: LatencyHistogram,
    /// From TCP accept until the WebSocket upgrade (TLS handshake + HTTP head).
    pub handshake: LatencyHistogram,
}
