//! PEM files: reading certificates and keys, writing them atomically with the right modes.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write as _};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use rustls_pki_types::pem::{self, PemObject as _};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::PkiError;

/// Mode of private key files: readable by the owner only.
pub(crate) const KEY_MODE: u32 = 0o600;
/// Mode of certificate files: public material, readable by anyone (the umask still applies).
pub(crate) const CERT_MODE: u32 = 0o644;

/// Reads every certificate of a PEM file. Other PEM sections (e.g. a key in the same file) are
/// skipped. An error if the file holds no certificate at all.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    let bytes = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(path, "certificates", &e))?;
    if certs.is_empty() {
        return Err(PkiError::Pem {
            path: path.to_owned(),
            why: "no \"-----BEGIN CERTIFICATE-----\" section found; expected PEM certificates"
                .into(),
        });
    }
    Ok(certs)
}

/// Reads the first private key (PKCS#8, SEC1 or PKCS#1) of a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, PkiError> {
    let bytes = read(path)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| match e {
        pem::Error::NoItemsFound => PkiError::Pem {
            path: path.to_owned(),
            why: "no \"-----BEGIN PRIVATE KEY-----\" section found; expected a PEM private key"
                .into(),
        },
        e => pem_error(path, "a private key", &e),
    })
}

fn pem_error(path: &Path, what: &str, e: &pem::Error) -> PkiError {
    PkiError::Pem {
        path: path.to_owned(),
        why: format!("not a valid PEM file with {what}: {e}"),
    }
}

fn read(path: &Path) -> Result<Vec<u8>, PkiError> {
    fs::read(path).map_err(|e| PkiError::io(path, e))
}

/// PEM text of DER blocks, all under the same label, 64 base64 characters a line.
pub(crate) fn pem_encode<'a>(label: &str, ders: impl IntoIterator<Item = &'a [u8]>) -> String {
    let mut out = String::new();
    for der in ders {
        out.push_str("-----BEGIN ");
        out.push_str(label);
        out.push_str("-----\n");
        let b64 = base64(der);
        for line in b64.as_bytes().chunks(64) {
            // base64 output is ASCII, so every chunk boundary is a char boundary.
            out.extend(line.iter().map(|&b| char::from(b)));
            out.push('\n');
        }
        out.push_str("-----END ");
        out.push_str(label);
        out.push_str("-----\n");
    }
    out
}

pub(crate) fn key_pem(key: &PrivateKeyDer<'_>) -> String {
    let label = match key {
        PrivateKeyDer::Pkcs1(_) => "RSA PRIVATE KEY",
        PrivateKeyDer::Sec1(_) => "EC PRIVATE KEY",
        _ => "PRIVATE KEY",
    };
    pem_encode(label, [key.secret_der()])
}

pub(crate) fn certs_pem(certs: &[CertificateDer<'_>]) -> String {
    pem_encode("CERTIFICATE", certs.iter().map(|c| c.as_ref()))
}

/// Standard base64 with padding (RFC 4648 §4). Small enough not to warrant a dependency.
fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        let sextet = |shift: u32| char::from(ALPHABET[((n >> shift) & 0x3f) as usize]);
        out.push(sextet(18));
        out.push(sextet(12));
        out.push(if chunk.len() > 1 { sextet(6) } else { '=' });
        out.push(if chunk.len() > 2 { sextet(0) } else { '=' });
    }
    out
}

/// Writes `contents` to `path` so that readers see either the old or the new file, never a
/// half-written one: the data goes to `<path>.tmp` (created fresh with `mode`, so a key is
/// never readable by others, not even for a moment), is synced, and is renamed over `path`.
/// This matters on a forced re-init or a SIGHUP reload racing with the write.
pub(crate) fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<(), PkiError> {
    let tmp = tmp_path(path);
    let io_err = |p: &Path| {
        let p = p.to_owned();
        move |source: io::Error| PkiError::Io { path: p, source }
    };
    // A leftover from an interrupted write may have other permissions; `mode` only applies
    // to files we create, so start from scratch.
    match fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(&tmp)(e)),
    }
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io_err(&tmp))?;
    file.write_all(contents).map_err(io_err(&tmp))?;
    file.sync_all().map_err(io_err(&tmp))?;
    drop(file);
    fs::rename(&tmp, path).map_err(io_err(path))?;
    Ok(())
}

/// Mode of the data directory: the gateway's user, and its group for reading (backups).
pub const DATA_DIR_MODE: u32 = 0o750;
/// Mode of directories holding private keys (`pki/`, credential `--out` folders).
pub const PRIVATE_DIR_MODE: u32 = 0o700;

/// Creates `dir` (and missing parents) with `mode`, whatever the umask: under `umask 000`
/// a plain `create_dir_all` would leave a world-writable directory in which anyone could
/// swap a key or certificate. Parents are created with `mode` too (the umask can only
/// remove bits from it); the directory itself is then set to exactly `mode`. An existing
/// directory is left as the operator made it.
pub fn create_dir_with_mode(dir: &Path, mode: u32) -> Result<(), PkiError> {
    use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
    let io_err = |source: io::Error| PkiError::Io {
        path: dir.to_owned(),
        source,
    };
    if dir.is_dir() {
        return Ok(());
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(dir)
        .map_err(io_err)?;
    fs::set_permissions(dir, fs::Permissions::from_mode(mode)).map_err(io_err)
}

/// Writes `contents` to `path` atomically with exactly `mode` (not widened by the umask;
/// see [`write_atomic`]): for files beside the keys such as the trust bundle or the pid file.
pub fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), PkiError> {
    write_atomic(path, contents, mode)
}

/// Makes the renames in `dir` durable. Without this a power cut right after `init` can leave
/// the directory without the files even though every file was synced.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), PkiError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| PkiError::Io {
            path: dir.to_owned(),
            source,
        })
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests fail loudly by design")]
mod tests {
    use super::*;

    #[test]
    fn base64_rfc4648_vectors() {
        for (plain, enc) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(plain.as_bytes()), enc);
        }
    }

    #[test]
    fn pem_roundtrip() {
        let blobs: Vec<Vec<u8>> = vec![(0..=255).collect(), vec![1, 2, 3], (0..100).collect()];
        let text = pem_encode("CERTIFICATE", blobs.iter().map(Vec::as_slice));
        assert!(text.lines().all(|l| l.len() <= 64));
        let back: Vec<Vec<u8>> = CertificateDer::pem_slice_iter(text.as_bytes())
            .map(|c| c.unwrap().to_vec())
            .collect();
        assert_eq!(back, blobs);
    }

    #[test]
    fn write_atomic_sets_mode_and_replaces() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k.key");
        // A stale temp file with loose permissions must not leak its mode into the key.
        fs::write(tmp_path(&p), b"stale").unwrap();
        fs::set_permissions(tmp_path(&p), fs::Permissions::from_mode(0o666)).unwrap();
        write_atomic(&p, b"one", KEY_MODE).unwrap();
        write_atomic(&p, b"two", KEY_MODE).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(!tmp_path(&p).exists());
    }

    #[test]
    fn load_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.pem");
        let e = load_certs(&missing).unwrap_err();
        assert!(matches!(e, PkiError::NotFound { .. }), "{e}");
        assert!(e.to_string().contains("nope.pem"));

        let empty = dir.path().join("empty.pem");
        fs::write(&empty, "hello\n").unwrap();
        let e = load_certs(&empty).unwrap_err();
        assert!(e.to_string().contains("empty.pem"), "{e}");
        assert!(e.to_string().contains("BEGIN CERTIFICATE"), "{e}");
        let e = load_key(&empty).unwrap_err();
        assert!(e.to_string().contains("PRIVATE KEY"), "{e}");
    }
}
