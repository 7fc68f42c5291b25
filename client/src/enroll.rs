//! Enrollment: a device trades its unit ID and one-time enrollment key for a
//! client certificate.
//!
//! The device generates its key pair itself (ECDSA P-256, the key never
//! leaves it) and sends a certificate signing request:
//!
//! ```text
//! POST /v1/enroll                      (TLS, no client certificate)
//! {"unit_id": "...", "key": "...", "csr": "-----BEGIN CERTIFICATE REQUEST-----..."}
//!
//! 200 {"certificate_chain": "<PEM: device certificate, device CA>"}
//! 401 {"error": "enrollment refused"}
//! 429 {"error": "too many attempts; retry later"}     Retry-After: <seconds>
//! 400 {"error": "..."}
//! ```

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;

use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, PKCS_ECDSA_P256_SHA256};
use rustls::crypto::CryptoProvider;
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::connect::{Request, http_request};
use crate::proxy::Proxy;
use crate::tls::base_provider;
use crate::{ClientError, MAX_ENROLL_BODY, certs_from_pem, tls_config};

/// The gateway's enrollment path.
pub const ENROLL_PATH: &str = "/v1/enroll";

/// The identity enrollment produced: pass `(chain, key)` to
/// [`tls_config`](crate::tls_config), and store `chain_pem` and `key_pem`
/// (the key with owner-only permissions).
#[non_exhaustive]
pub struct Enrolled {
    /// The device certificate followed by the device CA.
    pub chain: Vec<CertificateDer<'static>>,
    /// The device's private key (PKCS#8).
    pub key: PrivateKeyDer<'static>,
    /// `chain` as the gateway sent it (PEM).
    pub chain_pem: String,
    /// `key` as PKCS#8 PEM.
    pub key_pem: String,
}

impl Enrolled {
    /// The identity for [`tls_config`](crate::tls_config).
    pub fn identity(&self) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        (self.chain.clone(), self.key.clone_key())
    }
}

impl fmt::Debug for Enrolled {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Enrolled")
            .field("certificates", &self.chain.len())
            .finish_non_exhaustive()
    }
}

/// Enrolls the device `unit_id` with the one-time enrollment `key`:
/// generates an ECDSA P-256 key pair and a CSR with the unit ID as common
/// name, posts them to the gateway at `addr` (verified with `roots`, for
/// `server_name`) and returns the issued certificate chain with the key.
///
/// The gateway's refusals: HTTP 401 is [`ClientError::EnrollmentRefused`]
/// (unit ID or key wrong, deliberately not saying which), 429 is
/// [`ClientError::RateLimited`], any other status but 200 is
/// [`ClientError::Refused`] with the body. A 200 answer whose chain is
/// missing, unreadable or not for the generated key is
/// [`ClientError::Protocol`]. The exchange is limited to 30 s and the answer
/// to 64 KiB.
pub async fn enroll(
    addr: SocketAddr,
    server_name: &str,
    roots: &[CertificateDer<'static>],
    unit_id: &str,
    key: &str,
) -> Result<Enrolled, ClientError> {
    enroll_via(None, addr, server_name, roots, unit_id, key).await
}

/// [`enroll`] through `proxy` when given.
pub async fn enroll_via(
    proxy: Option<&Proxy>,
    addr: SocketAddr,
    server_name: &str,
    roots: &[CertificateDer<'static>],
    unit_id: &str,
    key: &str,
) -> Result<Enrolled, ClientError> {
    if unit_id.trim().is_empty() {
        return Err(ClientError::Config("the unit ID is empty".to_owned()));
    }
    if key.trim().is_empty() {
        return Err(ClientError::Config(
            "the enrollment key is empty".to_owned(),
        ));
    }
    let tls = tls_config(roots, None)?;
    let (key_pair, csr_pem) = key_and_csr(unit_id)?;
    let body = serde_json::json!({
        "unit_id": unit_id,
        "key": key,
        "csr": csr_pem,
    })
    .to_string();
    request_certificate(
        proxy,
        addr,
        server_name,
        tls,
        Kind::Enroll,
        &body,
        &key_pair,
    )
    .await
}

/// The gateway's renewal path.
pub const RENEW_PATH: &str = "/v1/renew";

/// Renews the device's certificate: proves possession of the current one (`current`,
/// presented over mutual TLS), sends a CSR for a fresh P-256 key pair and returns the new
/// chain with its key.
///
/// ```text
/// POST /v1/renew                       (TLS with the current device certificate)
/// {"csr": "-----BEGIN CERTIFICATE REQUEST-----..."}
///
/// 200 {"certificate_chain": "<PEM>"}   401 {"error": "renewal refused"}
/// ```
///
/// The certificate used for the request stays valid until the new one is first used or
/// the gateway's overlap ends (one hour), so a lost answer can be retried with it.
/// Errors as for [`enroll`]; a certificate the gateway no longer accepts is
/// [`ClientError::Refused`] with status 403.
pub async fn renew(
    addr: SocketAddr,
    server_name: &str,
    roots: &[CertificateDer<'static>],
    unit_id: &str,
    current: (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>),
) -> Result<Enrolled, ClientError> {
    renew_via(None, addr, server_name, roots, unit_id, current).await
}

/// [`renew`] through `proxy` when given.
pub async fn renew_via(
    proxy: Option<&Proxy>,
    addr: SocketAddr,
    server_name: &str,
    roots: &[CertificateDer<'static>],
    unit_id: &str,
    current: (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>),
) -> Result<Enrolled, ClientError> {
    let tls = tls_config(roots, Some(current))?;
    let (key_pair, csr_pem) = key_and_csr(unit_id)?;
    let body = serde_json::json!({ "unit_id": unit_id, "csr": csr_pem }).to_string();
    request_certificate(proxy, addr, server_name, tls, Kind::Renew, &body, &key_pair).await
}

/// Which certificate request [`request_certificate`] makes.
#[derive(Clone, Copy)]
enum Kind {
    Enroll,
    Renew,
}

/// POSTs an enrollment or renewal request and turns the answer into the new credential.
async fn request_certificate(
    proxy: Option<&Proxy>,
    addr: SocketAddr,
    server_name: &str,
    tls: std::sync::Arc<rustls::ClientConfig>,
    kind: Kind,
    body: &str,
    key_pair: &rcgen::KeyPair,
) -> Result<Enrolled, ClientError> {
    let (path, what) = match kind {
        Kind::Enroll => (ENROLL_PATH, "enrollment"),
        Kind::Renew => (RENEW_PATH, "renewal"),
    };
    let response = http_request(
        proxy,
        addr,
        server_name,
        tls,
        &Request {
            method: "POST",
            path,
            body: Some(("application/json", body.as_bytes())),
        },
        MAX_ENROLL_BODY,
    )
    .await?;
    match response.status {
        200 => {}
        401 => return Err(ClientError::EnrollmentRefused),
        429 => {
            return Err(ClientError::RateLimited {
                retry_after: response.retry_after,
            });
        }
        status => {
            return Err(ClientError::Refused {
                status,
                body: String::from_utf8_lossy(&response.body).into_owned(),
            });
        }
    }
    let chain_pem = certificate_chain(&response.body)?;
    let chain = certs_from_pem(chain_pem.as_bytes()).map_err(|e| {
        ClientError::Protocol(format!("the {what} answer's certificate_chain: {e}"))
    })?;
    let key_der = PrivateKeyDer::Pkcs8(key_pair.serialize_der().into());
    check_key_matches(&chain, &key_der, &base_provider())?;
    Ok(Enrolled {
        chain,
        key: key_der,
        chain_pem,
        key_pem: key_pair.serialize_pem(),
    })
}

/// A fresh P-256 key pair and a PEM CSR whose subject is `CN=<unit_id>`.
fn key_and_csr(unit_id: &str) -> Result<(KeyPair, String), ClientError> {
    let key_pair = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
        .map_err(|e| ClientError::Config(format!("generating the device key: {e}")))?;
    let mut params = CertificateParams::default();
    // The default subject is rcgen's placeholder name.
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, unit_id);
    let csr = params
        .serialize_request(&key_pair)
        .and_then(|csr| csr.pem())
        .map_err(|e| {
            ClientError::Config(format!(
                "building the certificate request for unit {unit_id:?}: {e}"
            ))
        })?;
    Ok((key_pair, csr))
}

/// The `certificate_chain` string of a 200 answer.
fn certificate_chain(body: &[u8]) -> Result<String, ClientError> {
    let value: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| ClientError::Protocol(format!("the enrollment answer is not JSON: {e}")))?;
    match value.get("certificate_chain") {
        Some(serde_json::Value::String(pem)) => Ok(pem.clone()),
        _ => Err(ClientError::Protocol(
            "the enrollment answer has no certificate_chain string".to_owned(),
        )),
    }
}

/// The issued leaf must carry the generated key, or the identity is useless.
fn check_key_matches(
    chain: &[CertificateDer<'static>],
    key: &PrivateKeyDer<'static>,
    provider: &CryptoProvider,
) -> Result<(), ClientError> {
    let signing_key = provider
        .key_provider
        .load_private_key(key.clone_key())
        .map_err(|e| ClientError::Config(format!("loading the generated device key: {e}")))?;
    match CertifiedKey::new(chain.to_vec(), Arc::clone(&signing_key)).keys_match() {
        Ok(()) => Ok(()),
        Err(e) => Err(ClientError::Protocol(format!(
            "the certificate the gateway issued is not for the key this device generated: {e}"
        ))),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use rcgen::PublicKeyData as _;

    #[test]
    fn csr_carries_the_unit_id_and_a_p256_key() {
        let (key, pem) = key_and_csr("unit-42").unwrap();
        assert!(
            pem.starts_with("-----BEGIN CERTIFICATE REQUEST-----"),
            "{pem}"
        );
        let params = rcgen::CertificateSigningRequestParams::from_pem(&pem).unwrap();
        let cn = params
            .params
            .distinguished_name
            .get(&DnType::CommonName)
            .unwrap();
        assert_eq!(cn, &rcgen::DnValue::Utf8String("unit-42".to_owned()));
        assert_eq!(params.public_key.der_bytes(), key.der_bytes());
        assert!(key.is_compatible(&PKCS_ECDSA_P256_SHA256));
    }

    #[test]
    fn answers_without_a_chain_are_protocol_errors() {
        for body in [&b"not json"[..], b"{}", br#"{"certificate_chain": 5}"#] {
            assert!(
                matches!(certificate_chain(body), Err(ClientError::Protocol(_))),
                "{body:?}"
            );
        }
        assert_eq!(
            certificate_chain(br#"{"certificate_chain":"x"}"#).unwrap(),
            "x"
        );
    }

    #[test]
    fn a_certificate_for_another_key_is_refused() {
        let other = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec!["x.test".to_owned()])
            .unwrap()
            .self_signed(&other)
            .unwrap();
        let (mine, _) = key_and_csr("unit-1").unwrap();
        let provider = base_provider();
        let chain = vec![cert.der().clone()];
        let mine = PrivateKeyDer::Pkcs8(mine.serialize_der().into());
        let theirs = PrivateKeyDer::Pkcs8(other.serialize_der().into());
        assert!(matches!(
            check_key_matches(&chain, &mine, &provider),
            Err(ClientError::Protocol(_))
        ));
        check_key_matches(&chain, &theirs, &provider).unwrap();
    }
}
