//! Building the rustls client configuration, and reading PEM files into the
//! types it wants.
//!
//! One `Arc<ClientConfig>` is meant to be shared by every connection of a
//! process (the load generator runs tens of thousands with one), which also
//! shares rustls' session-resumption cache between them.

use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::{ClientConfig, RootCertStore, SupportedCipherSuite, SupportedProtocolVersion};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::ClientError;

/// The only application protocol the gateway speaks before the upgrade.
pub(crate) const ALPN_HTTP11: &[u8] = b"http/1.1";

/// A TLS client configuration that trusts `roots`, presents `identity`
/// (certificate chain and key) when given, speaks TLS 1.2 and 1.3 and offers
/// ALPN `http/1.1`.
///
/// `roots` may be empty; every handshake then fails with an unknown-issuer
/// error, which is occasionally what a test wants. Use [`certs_from_pem`] and
/// [`key_from_pem`] to read PEM files.
pub fn tls_config(
    roots: &[CertificateDer<'static>],
    identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> Result<Arc<ClientConfig>, ClientError> {
    tls_config_with(roots, identity, rustls::ALL_VERSIONS, None)
}

/// Like [`tls_config`], restricted to `versions` (e.g. `&[&rustls::version::TLS12]`)
/// and, when `suites` is given, to those cipher suites.
pub fn tls_config_with(
    roots: &[CertificateDer<'static>],
    identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    versions: &[&'static SupportedProtocolVersion],
    suites: Option<Vec<SupportedCipherSuite>>,
) -> Result<Arc<ClientConfig>, ClientError> {
    let mut store = RootCertStore::empty();
    for (i, cert) in roots.iter().enumerate() {
        store.add(cert.clone()).map_err(|e| {
            ClientError::Config(format!("trusted root certificate #{i} is unusable: {e}"))
        })?;
    }

    let mut provider = base_provider();
    if let Some(suites) = suites {
        if suites.is_empty() {
            return Err(ClientError::Config("empty cipher suite list".to_owned()));
        }
        provider.cipher_suites = suites;
    }
    let builder = ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(versions)
        .map_err(|e| {
            ClientError::Config(format!(
                "protocol versions {versions:?} do not fit the cipher suites: {e}"
            ))
        })?
        .with_root_certificates(store);
    let mut config = match identity {
        Some((chain, key)) => builder.with_client_auth_cert(chain, key).map_err(|e| {
            ClientError::Config(format!("client certificate or key is unusable: {e}"))
        })?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![ALPN_HTTP11.to_vec()];
    Ok(Arc::new(config))
}

/// The process-wide provider when the application installed one, otherwise
/// aws-lc-rs (the provider rustls is built with in this workspace). Asking
/// explicitly avoids rustls' panic when several providers are compiled in.
pub(crate) fn base_provider() -> CryptoProvider {
    match CryptoProvider::get_default() {
        Some(p) => CryptoProvider::clone(p),
        None => rustls::crypto::aws_lc_rs::default_provider(),
    }
}

/// Every certificate in a PEM file (other PEM sections are skipped).
pub fn certs_from_pem(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, ClientError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ClientError::Config(format!("PEM certificates: {e}")))?;
    if certs.is_empty() {
        return Err(ClientError::Config(
            "PEM data contains no CERTIFICATE section".to_owned(),
        ));
    }
    Ok(certs)
}

/// The first private key (PKCS#8, PKCS#1 or SEC1) in a PEM file.
pub fn key_from_pem(pem: &[u8]) -> Result<PrivateKeyDer<'static>, ClientError> {
    PrivateKeyDer::from_pem_slice(pem)
        .map_err(|e| ClientError::Config(format!("PEM private key: {e}")))
}
