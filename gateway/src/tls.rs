//! TLS configuration: rustls with TLS 1.2 and 1.3 only (or 1.3 only, `[tls] min_version`),
//! AEAD suites only (or the operator's list, `[tls] cipher_suites`), and client
//! certificates verified against devgate's device CA and manager CA.
//!
//! Client certificates are optional at the TLS layer (`allow_unauthenticated`) because
//! `/usg/check-status` must answer monitoring probes that have none; the HTTP layer then
//! refuses every other path without the right role. Which role a verified certificate has
//! is decided by its issuer ([`devgate_pki::PeerClassifier`]).

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use devgate_pki::{PeerClassifier, PkiPaths};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};

use crate::config::{TlsMinVersion, TlsSection};

/// Whether server configs allow traffic-secret extraction (set once at start-up when
/// kernel TLS is on; rustls refuses to hand out secrets otherwise).
static SECRET_EXTRACTION: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Lets sessions built from configs loaded from now on hand their secrets to the kernel.
pub fn set_secret_extraction(on: bool) {
    SECRET_EXTRACTION.store(on, std::sync::atomic::Ordering::Relaxed);
}

pub use devgate_core::tls_material::TlsMaterial;

pub use crate::clock::unix_now;

/// A server config builder for the `[tls]` settings: the protocol versions from
/// `min_version` up, and the configured cipher suites (already validated by
/// `Config::validate`; checked again here for callers that skip it).
fn builder(
    settings: &TlsSection,
) -> Result<rustls::ConfigBuilder<ServerConfig, rustls::WantsVerifier>> {
    let suites = settings.suites()?;
    // Offer only versions that have a suite: a TLS 1.3-only suite list means TLS 1.3 only.
    let versions: Vec<&'static rustls::SupportedProtocolVersion> =
        [&rustls::version::TLS13, &rustls::version::TLS12]
            .into_iter()
            .filter(|v| {
                (settings.min_version == TlsMinVersion::Tls12
                    || v.version == rustls::ProtocolVersion::TLSv1_3)
                    && suites.iter().any(|s| s.version().version == v.version)
            })
            .collect();
    let provider = rustls::crypto::CryptoProvider {
        cipher_suites: suites,
        ..rustls::crypto::aws_lc_rs::default_provider()
    };
    ServerConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&versions)
        .context("[tls] min_version and cipher_suites leave no usable protocol version")
}

/// Loads the server chain, its key and the client CAs from `<data_dir>/pki`, with the
/// default `[tls]` settings (for tools such as the benchmarks).
pub fn load(data_dir: &Path) -> Result<TlsMaterial> {
    load_with(data_dir, &TlsSection::default())
}

/// Loads the server chain, its key and the client CAs from `<data_dir>/pki`, with the
/// protocol versions and cipher suites of `settings`.
pub fn load_with(data_dir: &Path, settings: &TlsSection) -> Result<TlsMaterial> {
    let paths = PkiPaths::new(data_dir);
    if !paths.server_cert().exists() {
        bail!(
            "no server certificate at {}: run `devgate init --data-dir {} --name <host>` first",
            paths.server_cert().display(),
            data_dir.display()
        );
    }
    let chain = devgate_pki::load_certs(&paths.server_cert())?;
    let key = devgate_pki::load_key(&paths.server_key())?;
    let client = ClientSide::load(&paths)?;
    let (device_ca, manager_ca, verifier) = (client.device_ca, client.manager_ca, client.verifier);

    let server_cert = chain
        .first()
        .cloned()
        .with_context(|| format!("{} holds no certificate", paths.server_cert().display()))?;
    let (server_not_before, server_not_after) = validity(&server_cert)
        .with_context(|| format!("server certificate {}", paths.server_cert().display()))?;

    let mut config = builder(settings)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain.clone(), key)
        .with_context(|| {
            format!(
                "server certificate {} and key {} do not match or are unusable",
                paths.server_cert().display(),
                paths.server_key().display()
            )
        })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    config.enable_secret_extraction = SECRET_EXTRACTION.load(std::sync::atomic::Ordering::Relaxed);
    // One ticket is enough for a device's next reconnect; each costs a write and a seal.
    config.send_tls13_tickets = 1;
    // Keys from the data dir: tickets survive restarts and reloads (`tickets.rs`).
    config.ticketer = crate::tickets::for_data_dir(data_dir)?;

    let mut certificates = Vec::new();
    for (what, cert) in [
        ("server", &server_cert),
        ("device_ca", &device_ca),
        ("manager_ca", &manager_ca),
    ] {
        certificates.push((what.to_owned(), devgate_pki::summarize(cert)?));
    }
    if let Ok(root) = first_cert(&paths.root_cert()) {
        certificates.push(("root".to_owned(), devgate_pki::summarize(&root)?));
    }

    Ok(TlsMaterial {
        server_config: Arc::new(config),
        classifier: PeerClassifier::new(&device_ca, &manager_ca)?,
        certificates,
        server_not_before,
        server_not_after,
    })
}

/// What the gateway verifies clients with: the device CA and the manager CA.
struct ClientSide {
    device_ca: rustls_pki_types::CertificateDer<'static>,
    manager_ca: rustls_pki_types::CertificateDer<'static>,
    verifier: Arc<dyn rustls::server::danger::ClientCertVerifier>,
}

impl ClientSide {
    fn load(paths: &PkiPaths) -> Result<Self> {
        let device_ca = first_cert(&paths.device_ca_cert())?;
        let manager_ca = first_cert(&paths.manager_ca_cert())?;
        let mut roots = RootCertStore::empty();
        roots
            .add(device_ca.clone())
            .with_context(|| format!("device CA {}", paths.device_ca_cert().display()))?;
        roots
            .add(manager_ca.clone())
            .with_context(|| format!("manager CA {}", paths.manager_ca_cert().display()))?;
        let verifier = WebPkiClientVerifier::builder(Arc::new(roots))
            .allow_unauthenticated()
            .build()
            .context("building the client certificate verifier")?;
        Ok(Self {
            device_ca,
            manager_ca,
            verifier,
        })
    }
}

/// TLS material for a gateway whose server certificate is missing or unusable: a
/// temporary self-signed certificate, so that `/usg/check-status` can still answer `err`
/// (monitoring probes do not verify it; devices and managers refuse it).
pub fn without_server_certificate(data_dir: &Path, settings: &TlsSection) -> Result<TlsMaterial> {
    let paths = PkiPaths::new(data_dir);
    let client = ClientSide::load(&paths)?;
    let key = rcgen::KeyPair::generate().context("generating a temporary key")?;
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .context("temporary certificate")?;
    params.distinguished_name.push(
        rcgen::DnType::CommonName,
        "devgate without a valid certificate",
    );
    let cert = params.self_signed(&key).context("temporary certificate")?;
    let key_der = rustls_pki_types::PrivateKeyDer::try_from(key.serialize_der())
        .map_err(|e| anyhow::anyhow!("temporary key: {e}"))?;
    let mut config = builder(settings)?
        .with_client_cert_verifier(client.verifier)
        .with_single_cert(vec![cert.der().clone()], key_der)
        .context("temporary certificate")?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsMaterial {
        server_config: Arc::new(config),
        classifier: PeerClassifier::new(&client.device_ca, &client.manager_ca)?,
        certificates: Vec::new(),
        // Never valid: check-status says err.
        server_not_before: i64::MAX,
        server_not_after: i64::MIN,
    })
}

fn first_cert(path: &Path) -> Result<rustls_pki_types::CertificateDer<'static>> {
    devgate_pki::load_certs(path)?
        .into_iter()
        .next()
        .with_context(|| format!("{} holds no certificate", path.display()))
}

fn validity(cert: &rustls_pki_types::CertificateDer<'_>) -> Result<(i64, i64)> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| anyhow::anyhow!("cannot parse certificate: {e}"))?;
    let v = parsed.validity();
    Ok((v.not_before.timestamp(), v.not_after.timestamp()))
}

/// One certificate as PEM text.
pub fn cert_pem(der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}
