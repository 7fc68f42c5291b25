//! What the data path needs of the PKI, as the daemon loaded it from the data dir.

use std::sync::Arc;

use devgate_pki::{CertSummary, PeerClassifier};
use rustls::ServerConfig;

/// Everything loaded from the PKI directory that the data path needs.
#[derive(Debug)]
pub struct TlsMaterial {
    /// The rustls server configuration handed to every new connection.
    pub server_config: Arc<ServerConfig>,
    /// Maps a verified client certificate to a device or manager.
    pub classifier: PeerClassifier,
    /// Subject and expiry of the certificates, for status.
    pub certificates: Vec<(String, CertSummary)>,
    /// Validity window of the server certificate (unix seconds).
    pub server_not_before: i64,
    /// Expiry of the server certificate (unix seconds).
    pub server_not_after: i64,
}

impl TlsMaterial {
    /// Whether the server certificate is within its validity dates at `unix` (seconds).
    pub fn server_cert_valid_at(&self, unix: i64) -> bool {
        self.server_not_before <= unix && unix < self.server_not_after
    }
}
