//! devgate's certificate authority: creating the PKI, issuing client certificates, the root
//! fingerprint people check on first contact, and telling devices from managers.
//!
//! # The PKI devgate uses
//!
//! There are two trust domains, deliberately separate.
//!
//! **1. The server chain** is what devices and managers verify the gateway with.
//!
//! ```text
//! root        self-signed CA, 10 years, BasicConstraints CA pathlen 1,
//!             KeyUsage keyCertSign + cRLSign, CN "devgate root CA"
//!  └ server   end entity, 1 year, CN = first name, SAN = every name given to init
//!             (IP literals as IP SANs, the rest as DNS SANs), EKU serverAuth,
//!             KeyUsage digitalSignature
//! ```
//!
//! Devices pin the root: on first contact the person compares its SHA-256
//! [`fingerprint`] (four groups of 16 hex digits) by typing the one group that is not shown
//! ([`fingerprint_matches`]).
//!
//! **2. The client CAs** are what the gateway verifies clients with. Both are signed by the root
//! (so an auditor can see they belong to this gateway), but the gateway uses them directly as
//! its trust anchors for client authentication. The root and the server certificate can
//! therefore be renewed or exchanged without touching a single device or manager credential:
//! devices never need to enrol again.
//!
//! ```text
//! root
//!  ├ device-ca    CA pathlen 0, 10 years, CN "devgate device CA"
//!  │  └ device    CN = unit ID, SAN URI urn:devgate:device:<unit>, EKU clientAuth, 5 years
//!  └ manager-ca   CA pathlen 0, 10 years, CN "devgate manager CA"
//!     └ manager   CN = manager name, SAN URI urn:devgate:manager:<name>, EKU clientAuth, 2 years
//! ```
//!
//! After the TLS layer has verified a client chain against those two anchors,
//! [`PeerClassifier`] decides the peer's role from the issuer of its certificate and takes the
//! identity from its CN.
//!
//! All keys are ECDSA P-256, all signatures ECDSA with SHA-256. Every certificate gets a random
//! positive 16-byte serial number and a notBefore five minutes in the past ([`CLOCK_SKEW`]), so
//! a device whose clock lags slightly accepts a certificate issued a moment ago.
//!
//! # Files
//!
//! [`init`] creates, in `<data_dir>/pki/` ([`PkiPaths`]); the names are a contract:
//!
//! | file | content |
//! |---|---|
//! | `root.pem`, `root.key` | the root |
//! | `server.pem`, `server.key` | server certificate followed by the root: the chain the gateway presents |
//! | `device-ca.pem`, `device-ca.key` | the device CA |
//! | `manager-ca.pem`, `manager-ca.key` | the manager CA |
//! | `manager.pem`, `manager.key` | a first manager certificate (CN "manager") followed by the manager CA |
//!
//! Keys are PKCS#8 PEM with mode 0600, certificates mode 0644. Every file is written to a
//! temporary name and renamed into place, and `root.pem` is written last, so an interrupted
//! `init` never leaves a PKI that looks complete.
//!
//! # Modules
//!
//! - `init`: [`init`] and the file layout [`PkiPaths`].
//! - `issue`: [`ClientCa`], which loads a client CA from disk and issues device and manager
//!   certificates ([`IssuedCert`]) or certifies a device's CSR during enrolment; the validity
//!   constants.
//! - `peer`: [`PeerClassifier`] / [`PeerRole`] for authenticated connections, and [`summarize`]
//!   for status output.
//! - `fingerprint`: the human-comparable root fingerprint.
//! - `files`: PEM reading ([`load_certs`], [`load_key`]) and atomic writes with the right modes.
//! - `names`: validation of server names and unit IDs ([`is_valid_unit_id`]).
//! - `chain`: "bring your own chain": [`validate_server_chain`] checks an operator-supplied
//!   server chain and key and reports every fault ([`ChainReport`]); [`create_root`] and
//!   [`create_server`] are a minimal CA for operators without a PKI.
//! - `error`: [`PkiError`], whose messages name the file or name at fault and what to do.
//!
//! This crate is control-plane code: it reads the clock and the file system directly and is
//! never called on the data path, except [`PeerClassifier::classify`] once per handshake.

#![warn(missing_docs)]

mod chain;
mod error;
mod files;
mod fingerprint;
mod init;
mod issue;
mod names;
mod peer;

pub use chain::{
    ChainFault, ChainReport, DEFAULT_ROOT_DAYS, DEFAULT_SERVER_DAYS, FaultKind, create_root,
    create_server, validate_server_chain, validate_server_chain_files,
};
pub use error::PkiError;
pub use files::{
    DATA_DIR_MODE, PRIVATE_DIR_MODE, create_dir_with_mode, load_certs, load_key, write_file,
};
pub use fingerprint::{
    bundle_id, fingerprint, fingerprint_bytes, fingerprint_file, fingerprint_matches,
    format_fingerprint, parse_fingerprint,
};
pub use init::{FIRST_MANAGER_NAME, InitOptions, InitReport, PkiPaths, init};
pub use issue::{
    CA_VALIDITY, CLOCK_SKEW, ClientCa, DEVICE_VALIDITY, IssuedCert, MANAGER_VALIDITY,
    SERVER_VALIDITY,
};
pub use names::{MAX_IDENTITY_LEN, check_unit_id, is_valid_unit_id};
pub use peer::{CertSummary, PeerClassifier, PeerRole, summarize};

/// Re-exported so callers can name the types of this crate's API without depending on
/// `rustls-pki-types` themselves.
pub use rustls_pki_types::{CertificateDer, PrivateKeyDer};
