//! Kernel TLS as the core sees it: what the kernel can take ([`TlsOffload`], probed by
//! the daemon at start-up), and the socket operations a kTLS connection needs
//! ([`KernelTlsSocket`]). The core decides when and in which order they happen (hand the
//! session over once rustls is idle, answer a KeyUpdate, send close_notify); the driver
//! implements the trait with the system calls on the connection's own socket, so this
//! crate never holds a file descriptor.

use std::io;

use rustls::{ConnectionTrafficSecrets, ProtocolVersion};

/// The system calls on one connection's socket that kernel TLS needs; the daemon
/// implements it on the socket's fd.
pub trait KernelTlsSocket {
    /// Attaches the `tls` upper-layer protocol.
    fn attach_ulp(&mut self) -> io::Result<()>;
    /// Installs one direction's key (`seq` is the next record's sequence number).
    fn set_key(
        &mut self,
        dir: Dir,
        version: ProtocolVersion,
        seq: u64,
        secrets: &ConnectionTrafficSecrets,
    ) -> io::Result<()>;
    /// Sends one record of type `record_type` (an alert, a handshake message).
    fn send_record(&mut self, record_type: u8, payload: &[u8]) -> io::Result<usize>;
    /// Receives one record with its type (after a read failed with EIO, the next record
    /// is not application data). Returns `(type, bytes)`; 0 bytes = EOF.
    fn recv_record(&mut self, buf: &mut [u8]) -> io::Result<(u8, usize)>;

    /// Installs both directions' keys.
    fn install_keys(
        &mut self,
        version: ProtocolVersion,
        secrets: &rustls::ExtractedSecrets,
    ) -> io::Result<()> {
        let (tx_seq, tx) = &secrets.tx;
        let (rx_seq, rx) = &secrets.rx;
        self.set_key(Dir::Tx, version, *tx_seq, tx)?;
        self.set_key(Dir::Rx, version, *rx_seq, rx)
    }

    /// Sends a close_notify alert.
    fn send_close_notify(&mut self) -> io::Result<()> {
        self.send_record(RECORD_ALERT, &[1, 0]).map(drop)
    }
}

/// TLS record content types.
pub const RECORD_ALERT: u8 = 21;
/// A handshake record (post-handshake: KeyUpdate, NewSessionTicket).
pub const RECORD_HANDSHAKE: u8 = 22;
/// Application data.
pub const RECORD_APPLICATION_DATA: u8 = 23;

/// The AEADs kTLS handles for devgate, as a bit set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Ciphers(pub u8);

impl Ciphers {
    /// AES-128-GCM.
    pub const AES128: u8 = 1;
    /// AES-256-GCM.
    pub const AES256: u8 = 2;
    /// ChaCha20-Poly1305.
    pub const CHACHA: u8 = 4;

    fn bit(secrets: &ConnectionTrafficSecrets) -> u8 {
        match secrets {
            ConnectionTrafficSecrets::Aes128Gcm { .. } => Self::AES128,
            ConnectionTrafficSecrets::Aes256Gcm { .. } => Self::AES256,
            ConnectionTrafficSecrets::Chacha20Poly1305 { .. } => Self::CHACHA,
            _ => 0,
        }
    }

    /// Whether the kernel takes these secrets' cipher.
    pub fn supports(self, secrets: &ConnectionTrafficSecrets) -> bool {
        let bit = Self::bit(secrets);
        bit != 0 && self.0 & bit != 0
    }

    /// Whether the kernel takes the AEAD of a negotiated suite.
    pub fn supports_suite(self, suite: rustls::SupportedCipherSuite) -> bool {
        let name = format!("{:?}", suite.suite());
        let bit = if name.contains("AES_128_GCM") {
            Self::AES128
        } else if name.contains("AES_256_GCM") {
            Self::AES256
        } else if name.contains("CHACHA20_POLY1305") {
            Self::CHACHA
        } else {
            0
        };
        bit != 0 && self.0 & bit != 0
    }

    /// Names, for logs and status.
    pub fn names(self) -> Vec<&'static str> {
        [
            (Self::AES128, "AES-128-GCM"),
            (Self::AES256, "AES-256-GCM"),
            (Self::CHACHA, "CHACHA20-POLY1305"),
        ]
        .into_iter()
        .filter(|(b, _)| self.0 & b != 0)
        .map(|(_, n)| n)
        .collect()
    }
}

/// Where TLS records are sealed and opened, as status and metrics report it.
#[derive(Debug, Clone)]
pub struct TlsOffload {
    /// `kernel` or `user`.
    pub mode: &'static str,
    /// Why records stay in rustls, when `mode` is `user`.
    pub reason: Option<String>,
    /// Ciphers the kernel accepted in the probe.
    pub ciphers: Ciphers,
    /// Whether the kernel takes new TLS 1.3 keys on a socket that has keys (KeyUpdate;
    /// Linux 6.14 and later). Without it a peer's KeyUpdate ends the session.
    pub rekey: bool,
}

impl Default for TlsOffload {
    fn default() -> Self {
        Self::user("not probed")
    }
}

impl TlsOffload {
    /// User-space TLS for `reason`.
    pub fn user(reason: impl Into<String>) -> Self {
        Self {
            mode: "user",
            reason: Some(reason.into()),
            ciphers: Ciphers::default(),
            rekey: false,
        }
    }

    /// Whether connections are handed to the kernel after their handshake.
    pub fn is_kernel(&self) -> bool {
        self.mode == "kernel"
    }
}

/// Direction of a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    /// Keys we seal with (`TLS_TX`).
    Tx,
    /// Keys we open with (`TLS_RX`).
    Rx,
}
