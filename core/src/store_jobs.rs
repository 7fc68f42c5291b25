//! Work the workers hand to the store thread (the daemon's, `gateway::store_thread`): what
//! needs the store (disk, a database) or a CA key, kept off the data path. Answers come
//! back as messages in the asking worker's inbox; `Shared::submit` hands a job over.

use std::net::IpAddr;
use std::sync::Arc;

use serde_json::Value;

use crate::handle::ConnHandle;

/// Largest enrollment or pairing request body.
pub const MAX_BODY: usize = 16 * 1024;

/// Work for the store thread.
#[derive(Debug)]
pub enum Job {
    /// `POST /v1/enroll` from a device without a credential.
    Enroll {
        /// The waiting connection.
        reply_to: ConnHandle,
        /// Source address (rate limiting).
        ip: IpAddr,
        /// Request body (JSON).
        body: Vec<u8>,
    },
    /// `POST /v1/pair` from a manager with a pairing token.
    Pair {
        /// The waiting connection.
        reply_to: ConnHandle,
        /// Source address (rate limiting).
        ip: IpAddr,
        /// Request body (JSON).
        body: Vec<u8>,
    },
    /// `POST /v1/renew` from a device over mutual TLS: `presented` is the SHA-256 of the
    /// certificate it connected with, `unit` the unit that certificate names.
    Renew {
        /// The waiting connection.
        reply_to: ConnHandle,
        /// Source address (rate limiting).
        ip: IpAddr,
        /// The unit the presented certificate names.
        unit: Arc<str>,
        /// SHA-256 of the presented certificate.
        presented: crate::identity::Fp,
        /// Request body (JSON).
        body: Vec<u8>,
    },
    /// A connection presented `unit`'s current certificate for the first time.
    CertUsed {
        /// The unit.
        unit: Arc<str>,
        /// SHA-256 of its current certificate.
        fingerprint: crate::identity::Fp,
    },
    /// A manager's control request that needs the store.
    Manager {
        /// The manager connection.
        reply_to: ConnHandle,
        /// Its request id.
        request_id: u32,
        /// The parsed request.
        request: Value,
    },
    /// A device or manager acknowledged the trust bundle (recorded in batches).
    TrustAck {
        /// The bundle id it acknowledged.
        bundle: Box<str>,
        /// `"device"` or `"manager"`.
        kind: &'static str,
        /// Unit ID or manager name.
        name: Arc<str>,
    },
}
