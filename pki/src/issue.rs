//! Certificate parameters shared by `init` and the client CAs, and the client CAs themselves.

use std::path::Path;
use std::time::Duration;

use rand::RngCore as _;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SerialNumber, SubjectPublicKeyInfo,
};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, CertificateSigningRequestDer, PrivateKeyDer};
use time::OffsetDateTime;
use x509_parser::prelude::{FromDer as _, X509Certificate, X509CertificationRequest};

use crate::files::{CERT_MODE, KEY_MODE, certs_pem, key_pem, write_atomic};
use crate::names::{check_identity, identity_urn};
use crate::{PkiError, load_certs, load_key};

const DAY: u64 = 24 * 60 * 60;
/// Lifetime of the root and of the device and manager CAs: 10 years.
pub const CA_VALIDITY: Duration = Duration::from_secs(3652 * DAY);
/// Lifetime of the server certificate: 1 year.
pub const SERVER_VALIDITY: Duration = Duration::from_secs(365 * DAY);
/// Default lifetime of a device certificate: 5 years.
pub const DEVICE_VALIDITY: Duration = Duration::from_secs(1826 * DAY);
/// Lifetime of a manager certificate: 2 years.
pub const MANAGER_VALIDITY: Duration = Duration::from_secs(730 * DAY);
/// How far notBefore is backdated, so that a peer whose clock is a little behind accepts a
/// certificate issued a moment ago (typical for devices right after enrolment).
pub const CLOCK_SKEW: Duration = Duration::from_secs(5 * 60);

/// Parameters common to every certificate we issue: CN only, random serial, backdated
/// notBefore, and an authority key identifier so verifiers can pick the right issuer when a
/// root is being exchanged and two generations are trusted side by side.
pub(crate) fn base_params(
    common_name: &str,
    lifetime: Duration,
) -> Result<CertificateParams, PkiError> {
    let now = OffsetDateTime::now_utc();
    let not_after = time::Duration::try_from(lifetime)
        .ok()
        .and_then(|d| now.checked_add(d))
        .ok_or_else(|| PkiError::Certificate {
            what: format!("certificate for {common_name:?}"),
            why: format!("a lifetime of {lifetime:?} reaches beyond the year 9999"),
        })?;
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    p.distinguished_name = dn;
    p.serial_number = Some(random_serial());
    // CLOCK_SKEW is a small constant; subtracting it from the current time cannot overflow.
    p.not_before = now - CLOCK_SKEW;
    p.not_after = not_after;
    p.use_authority_key_identifier_extension = true;
    Ok(p)
}

pub(crate) fn ca_params(common_name: &str, path_len: u8) -> Result<CertificateParams, PkiError> {
    let mut p = base_params(common_name, CA_VALIDITY)?;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(path_len));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    Ok(p)
}

pub(crate) fn end_entity_params(
    common_name: &str,
    lifetime: Duration,
    eku: ExtendedKeyUsagePurpose,
) -> Result<CertificateParams, PkiError> {
    let mut p = base_params(common_name, lifetime)?;
    // An explicit cA=false rather than no BasicConstraints at all: some verifiers treat a
    // certificate without the extension as a possible (v1-style) CA.
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![eku];
    Ok(p)
}

/// 16 random bytes, top bit cleared so the INTEGER is positive, second bit set so the DER
/// encoding is always exactly 16 bytes (126 bits of randomness; RFC 5280 asks for ≥ 64).
fn random_serial() -> SerialNumber {
    let mut b = [0u8; 16];
    rand::rng().fill_bytes(&mut b);
    b[0] = (b[0] & 0x7f) | 0x40;
    SerialNumber::from_slice(&b)
}

/// A private key and the certificate chain for it (end entity first, then its CA).
#[derive(Debug)]
pub struct IssuedCert {
    /// `[end entity, issuing CA]`, DER.
    pub chain: Vec<CertificateDer<'static>>,
    /// The end entity's private key, PKCS#8 DER.
    pub key: PrivateKeyDer<'static>,
}

impl Clone for IssuedCert {
    fn clone(&self) -> Self {
        Self {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl IssuedCert {
    /// The chain as PEM, end entity first: the content of a `*.pem` file a client presents.
    pub fn cert_pem(&self) -> String {
        certs_pem(&self.chain)
    }

    /// The private key as PEM (`-----BEGIN PRIVATE KEY-----`, PKCS#8).
    pub fn key_pem(&self) -> String {
        key_pem(&self.key)
    }

    /// Writes the chain (mode 0644) and the key (mode 0600), each atomically. The key is written
    /// first so that a reader never finds a new certificate next to an old key.
    pub fn write(&self, cert_path: &Path, key_path: &Path) -> Result<(), PkiError> {
        write_atomic(key_path, self.key_pem().as_bytes(), KEY_MODE)?;
        write_atomic(cert_path, self.cert_pem().as_bytes(), CERT_MODE)
    }
}

/// A CA loaded from disk that can issue client certificates: `device-ca` for devices,
/// `manager-ca` for managers. The CA does not know which of the two it is; the caller picks
/// the method that matches the CA it loaded.
///
/// `ClientCa` is `Send + Sync`; issuing from several threads at once needs no lock.
#[derive(Debug)]
pub struct ClientCa {
    issuer: Issuer<'static, KeyPair>,
    cert_der: CertificateDer<'static>,
}

impl ClientCa {
    /// Loads the CA certificate (first certificate in `cert`) and its private key (PKCS#8 PEM),
    /// and checks that they belong together and can issue certificates that chain to the CA.
    pub fn load(cert: &Path, key: &Path) -> Result<Self, PkiError> {
        let cert_what = || cert.display().to_string();
        let cert_der =
            load_certs(cert)?
                .into_iter()
                .next()
                .ok_or_else(|| PkiError::Certificate {
                    what: cert_what(),
                    why: "no certificate in the file".into(),
                })?;
        let (_, x509) =
            X509Certificate::from_der(&cert_der).map_err(|e| PkiError::Certificate {
                what: cert_what(),
                why: format!("not a valid X.509 certificate: {e}"),
            })?;
        if !x509.is_ca() {
            return Err(PkiError::Certificate {
                what: cert_what(),
                why: "this is not a CA certificate (BasicConstraints cA is not set); expected \
                      device-ca.pem or manager-ca.pem"
                    .into(),
            });
        }

        let key_der = load_key(key)?;
        let key_pair = KeyPair::try_from(&key_der).map_err(|e| PkiError::Key {
            path: key.to_owned(),
            why: format!(
                "cannot sign with this key ({e}); expected an unencrypted PKCS#8 ECDSA P-256 \
                 key (\"BEGIN PRIVATE KEY\"); convert others with \
                 `openssl pkcs8 -topk8 -nocrypt`"
            ),
        })?;
        if key_pair.public_key_raw() != x509.public_key().subject_public_key.data.as_ref() {
            return Err(PkiError::KeyMismatch {
                cert: cert.to_owned(),
                key: key.to_owned(),
            });
        }
        let ca_subject = x509.subject().as_raw().to_vec();
        drop(x509);

        let issuer = Issuer::from_ca_cert_der(&cert_der, key_pair).map_err(PkiError::rcgen(
            format!("use {} as an issuer", cert.display()),
        ))?;
        let ca = Self { issuer, cert_der };

        // rcgen re-encodes the CA's subject from its parsed form when it writes the issuer field.
        // Verifiers link certificates by comparing those bytes exactly, so a CA from another
        // tool whose name rcgen encodes differently would issue certificates that never verify.
        // Find out now rather than when the first device fails to connect.
        let probe = base_params("devgate issuer probe", Duration::from_secs(60))?
            .signed_by(ca.issuer.key(), &ca.issuer)
            .map_err(PkiError::rcgen(format!(
                "sign a test certificate with {}",
                cert.display()
            )))?;
        let (_, probe) =
            X509Certificate::from_der(probe.der()).map_err(|e| PkiError::Certificate {
                what: cert_what(),
                why: format!("test certificate signed with this CA does not parse: {e}"),
            })?;
        if probe.issuer().as_raw() != ca_subject.as_slice() {
            return Err(PkiError::Certificate {
                what: cert_what(),
                why: "the CA's subject name cannot be reproduced byte for byte in issued \
                      certificates, so they would not chain to it; re-create the CA with init \
                      or with a plain CN-only subject"
                    .into(),
            });
        }
        Ok(ca)
    }

    pub(crate) fn from_parts(
        issuer: Issuer<'static, KeyPair>,
        cert_der: CertificateDer<'static>,
    ) -> Self {
        Self { issuer, cert_der }
    }

    /// The CA certificate, DER.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// New key pair + certificate for a device, valid for [`DEVICE_VALIDITY`]: CN = unit ID,
    /// EKU clientAuth, SAN `urn:devgate:device:<unit>`. The chain is `[device cert, CA cert]`,
    /// the key PKCS#8.
    pub fn issue_device(&self, unit_id: &str) -> Result<IssuedCert, PkiError> {
        self.issue_device_valid_for(unit_id, DEVICE_VALIDITY)
    }

    /// [`issue_device`](Self::issue_device) with another lifetime (loadgen and tests use short
    /// ones to exercise expiry).
    pub fn issue_device_valid_for(
        &self,
        unit_id: &str,
        lifetime: Duration,
    ) -> Result<IssuedCert, PkiError> {
        check_identity("unit ID", unit_id)?;
        self.issue_client("device", unit_id, lifetime)
    }

    /// New key pair + certificate for a manager, valid for [`MANAGER_VALIDITY`]: CN = name, EKU
    /// clientAuth, SAN `urn:devgate:manager:<name>`.
    pub fn issue_manager(&self, name: &str) -> Result<IssuedCert, PkiError> {
        check_identity("manager name", name)?;
        self.issue_client("manager", name, MANAGER_VALIDITY)
    }

    fn issue_client(
        &self,
        role: &str,
        id: &str,
        lifetime: Duration,
    ) -> Result<IssuedCert, PkiError> {
        let key = KeyPair::generate()
            .map_err(PkiError::rcgen(format!("generate a key for {role} {id:?}")))?;
        let params = client_params(role, id, lifetime)?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(PkiError::rcgen(format!(
                "sign the certificate for {role} {id:?}"
            )))?;
        Ok(IssuedCert {
            chain: vec![cert.into(), self.cert_der.clone()],
            key: key.into(),
        })
    }

    /// For enrolment: certifies the public key of a device's CSR (PEM or DER). Subject, SANs,
    /// extensions and lifetime come from us, exactly as in [`issue_device`](Self::issue_device);
    /// of the CSR only the public key is used, after checking the CSR's signature (proof that
    /// the device holds the private key). Returns `[device cert, CA cert]`.
    pub fn sign_device_csr(
        &self,
        unit_id: &str,
        csr: &[u8],
    ) -> Result<Vec<CertificateDer<'static>>, PkiError> {
        check_identity("unit ID", unit_id)?;
        let public_key = csr_public_key(csr)?;
        self.sign_csr_public_key("device", unit_id, DEVICE_VALIDITY, &public_key)
    }

    /// For manager pairing: like [`sign_device_csr`](Self::sign_device_csr), but the
    /// certificate is a manager's (CN = `name`, SAN `urn:devgate:manager:<name>`).
    pub fn sign_manager_csr(
        &self,
        name: &str,
        csr: &[u8],
    ) -> Result<Vec<CertificateDer<'static>>, PkiError> {
        check_identity("manager name", name)?;
        let public_key = csr_public_key(csr)?;
        self.sign_csr_public_key("manager", name, MANAGER_VALIDITY, &public_key)
    }

    fn sign_csr_public_key(
        &self,
        role: &str,
        id: &str,
        lifetime: Duration,
        public_key: &SubjectPublicKeyInfo,
    ) -> Result<Vec<CertificateDer<'static>>, PkiError> {
        let params = client_params(role, id, lifetime)?;
        let cert = params
            .signed_by(public_key, &self.issuer)
            .map_err(PkiError::rcgen(format!("sign the CSR of {role} {id:?}")))?;
        Ok(vec![cert.into(), self.cert_der.clone()])
    }
}

/// The public key of a CSR (PEM or DER), after checking the CSR's signature: proof that
/// the requester holds the private key.
fn csr_public_key(csr: &[u8]) -> Result<SubjectPublicKeyInfo, PkiError> {
    let csr_der = csr_der(csr)?;
    let (rest, req) =
        X509CertificationRequest::from_der(&csr_der).map_err(|e| PkiError::InvalidCsr {
            why: format!("not a PKCS#10 request: {e}"),
        })?;
    if !rest.is_empty() {
        return Err(PkiError::InvalidCsr {
            why: format!("{} bytes of trailing data after the request", rest.len()),
        });
    }
    req.verify_signature().map_err(|e| PkiError::InvalidCsr {
        why: format!("its signature does not verify with its own public key ({e})"),
    })?;
    SubjectPublicKeyInfo::from_der(req.certification_request_info.subject_pki.raw).map_err(|e| {
        PkiError::InvalidCsr {
            why: format!("unsupported public key ({e}); use ECDSA P-256/P-384, Ed25519 or RSA"),
        }
    })
}

fn client_params(role: &str, id: &str, lifetime: Duration) -> Result<CertificateParams, PkiError> {
    let mut p = end_entity_params(id, lifetime, ExtendedKeyUsagePurpose::ClientAuth)?;
    p.subject_alt_names = vec![identity_urn(role, id)?];
    Ok(p)
}

fn csr_der(csr: &[u8]) -> Result<CertificateSigningRequestDer<'static>, PkiError> {
    let trimmed = csr.trim_ascii_start();
    if trimmed.starts_with(b"-----BEGIN") {
        CertificateSigningRequestDer::from_pem_slice(trimmed).map_err(|e| PkiError::InvalidCsr {
            why: format!("no \"BEGIN CERTIFICATE REQUEST\" PEM section could be read ({e})"),
        })
    } else {
        Ok(CertificateSigningRequestDer::from(csr.to_vec()))
    }
}
