//! The one error type of the crate.
//!
//! Every message says which thing is wrong (a file, a name, a request) and what the operator or the
//! peer has to do about it, because these errors end up verbatim in the gateway's log and in the
//! output of the operator's CLI.

use std::io;
use std::path::PathBuf;

/// Why a PKI operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PkiError {
    /// Reading or writing a file of the PKI failed.
    #[error("{}: {source}{hint}", path.display(), hint = io_hint(source))]
    Io {
        /// The file or directory that could not be accessed.
        path: PathBuf,
        /// What the operating system said.
        #[source]
        source: io::Error,
    },

    /// `init` found an existing PKI and was not told to replace it.
    #[error(
        "{}: a PKI already exists here (root.pem is present); refusing to overwrite it. \
         Re-run with force to replace it; that invalidates every device and manager \
         certificate issued so far, so all devices would have to enrol again",
        dir.display()
    )]
    AlreadyInitialised {
        /// The PKI directory (`<data_dir>/pki`).
        dir: PathBuf,
    },

    /// A server name given to `init` is neither a host name nor an IP address.
    #[error(
        "invalid server name {name:?}: {why}. Give the DNS names (RFC 1123, no wildcards) and \
         IPv4/IPv6 addresses by which devices and managers reach the gateway"
    )]
    InvalidName {
        /// The name as given.
        name: String,
        /// What is wrong with it.
        why: String,
    },

    /// `init` was given no server names at all.
    #[error(
        "no server names given: the server certificate needs at least one DNS name or IP address \
         by which devices and managers reach the gateway"
    )]
    NoNames,

    /// A unit ID or manager name that cannot be put into (or taken from) a certificate.
    #[error("invalid {kind} {value:?}: {why}; use 1 to 64 printable ASCII characters, no spaces")]
    InvalidIdentity {
        /// `"unit ID"` or `"manager name"`.
        kind: &'static str,
        /// The value as given.
        value: String,
        /// What is wrong with it.
        why: &'static str,
    },

    /// rcgen refused to create a key or certificate. With the key types this crate uses this
    /// points to a bug or to a CA key of a type rcgen cannot sign with.
    #[error("could not {what}: {source}")]
    Rcgen {
        /// What was being done, e.g. "sign the device certificate for unit 1234".
        what: String,
        /// rcgen's error.
        #[source]
        source: rcgen::Error,
    },

    /// A PEM file is malformed or holds nothing of the expected kind.
    #[error("{}: {why}", path.display())]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong and what to do.
        why: String,
    },

    /// A file the PKI needs does not exist.
    #[error(
        "{}: file not found; create the PKI with init, or point the data directory at the \
         one that holds it",
        path.display()
    )]
    NotFound {
        /// The missing file.
        path: PathBuf,
    },

    /// A certificate could not be parsed or is unfit for its job.
    #[error("{what}: {why}")]
    Certificate {
        /// Which certificate: a file name or a role such as "device CA certificate".
        what: String,
        /// What is wrong and what to do.
        why: String,
    },

    /// A private key file does not hold a key this crate can sign with.
    #[error("{}: {why}", path.display())]
    Key {
        /// The key file.
        path: PathBuf,
        /// What is wrong and what to do.
        why: String,
    },

    /// A CA key file does not belong to the CA certificate next to it.
    #[error(
        "{}: this private key does not belong to the certificate in {}; the two files come from \
         different generations of the PKI. Restore the key that matches the certificate",
        key.display(),
        cert.display()
    )]
    KeyMismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
    },

    /// Creating a file would replace an existing one whose loss cannot be undone (a root key).
    #[error(
        "{}: already exists; refusing to overwrite it (a new root changes the fingerprint every \
         device has pinned). Move the file away first, or choose another path",
        path.display()
    )]
    WouldOverwrite {
        /// The existing file.
        path: PathBuf,
    },

    /// A certificate signing request sent by a device was rejected. The device is at fault.
    #[error(
        "certificate signing request rejected: {why}; the device must send a PKCS#10 request \
         (PEM or DER) signed with the private key it wants certified"
    )]
    InvalidCsr {
        /// What is wrong with the request.
        why: String,
    },
}

impl PkiError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: io::Error) -> Self {
        let path = path.into();
        if source.kind() == io::ErrorKind::NotFound {
            Self::NotFound { path }
        } else {
            Self::Io { path, source }
        }
    }

    pub(crate) fn rcgen(what: impl Into<String>) -> impl FnOnce(rcgen::Error) -> Self {
        let what = what.into();
        move |source| Self::Rcgen { what, source }
    }
}

/// What an operator most likely has to do about an I/O error on a PKI file.
fn io_hint(e: &io::Error) -> &'static str {
    match e.kind() {
        io::ErrorKind::PermissionDenied => {
            " (run devgate as the user that owns the PKI directory, or fix its permissions)"
        }
        io::ErrorKind::ReadOnlyFilesystem => {
            " (the data directory must be on a writable file system)"
        }
        io::ErrorKind::StorageFull => " (free some disk space and retry)",
        _ => "",
    }
}
