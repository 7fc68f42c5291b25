//! check-status says err without a valid server certificate, and the gateway explains
//! a missing one at start.

use std::process::Command;
use std::time::Duration;

use anyhow::Result;
use devgate_pki::PkiPaths;
use devgate_tests::{DataDir, Gateway, binary};
use rcgen::{CertificateParams, DnType, Issuer, KeyPair};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};

/// A monitoring probe that, like `curl -k`, does not judge the certificate.
#[derive(Debug)]
struct AcceptAnything(Vec<rustls::SignatureScheme>);

impl ServerCertVerifier for AcceptAnything {
    fn verify_server_cert(
        &self,
        _: &rustls_pki_types::CertificateDer<'_>,
        _: &[rustls_pki_types::CertificateDer<'_>],
        _: &rustls_pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls_pki_types::UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &rustls_pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &rustls_pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.clone()
    }
}

/// The TLS configuration of a monitoring probe.
fn probe_tls() -> std::sync::Arc<rustls::ClientConfig> {
    let provider = rustls::crypto::aws_lc_rs::default_provider();
    let schemes = provider
        .signature_verification_algorithms
        .supported_schemes();
    std::sync::Arc::new(
        rustls::ClientConfig::builder()
            .dangerous()
            .with_custom_certificate_verifier(std::sync::Arc::new(AcceptAnything(schemes)))
            .with_no_client_auth(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_status_is_err_with_an_expired_server_certificate() -> Result<()> {
    let data = DataDir::init()?;
    let paths = PkiPaths::new(data.path());
    // Replace the server certificate with one that expired yesterday, signed by the same root.
    let root_key = KeyPair::from_pem(&std::fs::read_to_string(paths.root_key())?)?;
    let issuer = Issuer::from_ca_cert_pem(&std::fs::read_to_string(paths.root_cert())?, root_key)?;
    let mut params = CertificateParams::new(vec!["localhost".to_owned()])?;
    params
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    params.not_before = time::OffsetDateTime::now_utc() - time::Duration::days(30);
    params.not_after = time::OffsetDateTime::now_utc() - time::Duration::days(1);
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    std::fs::write(
        paths.server_cert(),
        cert.pem() + &std::fs::read_to_string(paths.root_cert())?,
    )?;
    std::fs::write(paths.server_key(), key.serialize_pem())?;

    let gw = Gateway::start_in(data, "[managers]\nstartup_wait_secs = 0\n")?;
    let (status, body) =
        devgate_client::http_get(gw.addr, "localhost", probe_tls(), "/usg/check-status").await?;
    assert_eq!(status, 200);
    assert_eq!(String::from_utf8(body)?, r#"{"status":"err"}"#);
    assert!(
        gw.wait_for_log("outside its validity dates", Duration::from_secs(2)),
        "{}",
        gw.logs()
    );
    // Managers and devices verify the certificate and refuse the expired one.
    assert!(gw.manager().await.is_err());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_status_is_err_when_the_server_certificate_is_missing() -> Result<()> {
    let data = DataDir::init()?;
    let paths = PkiPaths::new(data.path());
    std::fs::remove_file(paths.server_cert())?;
    let gw = Gateway::start_in(data, "[managers]\nstartup_wait_secs = 0\n")?;
    let (status, body) =
        devgate_client::http_get(gw.addr, "localhost", probe_tls(), "/usg/check-status").await?;
    assert_eq!(status, 200);
    assert_eq!(String::from_utf8(body)?, r#"{"status":"err"}"#);
    assert!(
        gw.wait_for_log("no usable server certificate", Duration::from_secs(2)),
        "{}",
        gw.logs()
    );
    assert!(
        gw.manager().await.is_err(),
        "a manager accepted the temporary certificate"
    );
    Ok(())
}

#[test]
fn serve_without_a_pki_explains_what_to_do() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let out = Command::new(binary("devgate"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(dir.path())
        .output()?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("devgate init"), "{err}");
    Ok(())
}

#[test]
fn init_prints_the_fingerprint_line_and_writes_the_contract_files() -> Result<()> {
    let data = DataDir::init()?;
    let re_ok = data.fingerprint.len() == 67
        && data.fingerprint.split(' ').count() == 4
        && data
            .fingerprint
            .split(' ')
            .all(|g| g.len() == 16 && g.chars().all(|c| c.is_ascii_hexdigit()));
    assert!(re_ok, "fingerprint {:?}", data.fingerprint);
    let paths = PkiPaths::new(data.path());
    for p in [paths.root_cert(), paths.manager_cert(), paths.manager_key()] {
        assert!(p.exists(), "{} missing", p.display());
    }
    let out = Command::new(binary("devgate"))
        .args(["fingerprint", "--data-dir"])
        .arg(data.path())
        .output()?;
    assert_eq!(
        String::from_utf8(out.stdout)?.trim(),
        format!("Root fingerprint: {}", data.fingerprint)
    );
    Ok(())
}
