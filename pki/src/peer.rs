//! Who is on the other end of a mutually authenticated connection, and certificate summaries
//! for status output.

use rustls_pki_types::CertificateDer;
use time::format_description::well_known::Rfc3339;
use x509_parser::prelude::{FromDer as _, X509Certificate, X509Name};

use crate::PkiError;
use crate::names::is_valid_unit_id;

/// Who a verified client certificate belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerRole {
    /// A device; `unit_id` is the CN of its certificate.
    Device {
        /// The device's unit ID.
        unit_id: String,
    },
    /// A manager; `name` is the CN of its certificate.
    Manager {
        /// The manager's name.
        name: String,
    },
}

/// Tells devices from managers by the issuer of their (already verified) certificate.
///
/// The issuer DN is compared byte for byte with the subject DN of the device CA and the manager
/// CA, the same comparison the TLS verifier used to build the chain, so the role is that of the
/// CA the chain was actually verified against.
#[derive(Debug, Clone)]
pub struct PeerClassifier {
    device_ca_subject: Vec<u8>,
    manager_ca_subject: Vec<u8>,
}

impl PeerClassifier {
    /// From the two client CA certificates. Fails if either does not parse or if both have the
    /// same subject, in which case a device could pose as a manager.
    pub fn new(
        device_ca: &CertificateDer<'_>,
        manager_ca: &CertificateDer<'_>,
    ) -> Result<Self, PkiError> {
        let device_ca_subject = subject_raw("device CA certificate", device_ca)?;
        let manager_ca_subject = subject_raw("manager CA certificate", manager_ca)?;
        if device_ca_subject == manager_ca_subject {
            return Err(PkiError::Certificate {
                what: "device CA and manager CA certificates".into(),
                why: "both have the same subject name, so devices and managers could not be told \
                      apart; give the two CAs distinct names (init does)"
                    .into(),
            });
        }
        Ok(Self {
            device_ca_subject,
            manager_ca_subject,
        })
    }

    /// The role of the peer presenting `end_entity`. `None` if it was issued by neither CA, or
    /// its CN is missing, repeated, or not a valid identity (1..=64 bytes of printable ASCII
    /// 0x21..=0x7E); the connection should then be refused.
    pub fn classify(&self, end_entity: &CertificateDer<'_>) -> Option<PeerRole> {
        let (_, cert) = X509Certificate::from_der(end_entity).ok()?;
        let issuer = cert.issuer().as_raw();
        let is_device = issuer == self.device_ca_subject.as_slice();
        let is_manager = issuer == self.manager_ca_subject.as_slice();
        if !is_device && !is_manager {
            return None;
        }
        let cn = single_common_name(cert.subject())?;
        if !is_valid_unit_id(cn) {
            return None;
        }
        let id = cn.to_owned();
        Some(if is_device {
            PeerRole::Device { unit_id: id }
        } else {
            PeerRole::Manager { name: id }
        })
    }
}

/// The CN, if there is exactly one and it is a string. Two CNs would make the identity depend
/// on which one a reader picks.
fn single_common_name<'a>(name: &'a X509Name<'_>) -> Option<&'a str> {
    let mut cns = name.iter_common_name();
    let cn = cns.next()?.as_str().ok()?;
    cns.next().is_none().then_some(cn)
}

fn subject_raw(what: &str, cert: &CertificateDer<'_>) -> Result<Vec<u8>, PkiError> {
    let (_, x509) = parse(what, cert)?;
    Ok(x509.subject().as_raw().to_vec())
}

fn parse<'a>(
    what: &str,
    cert: &'a CertificateDer<'_>,
) -> Result<(&'a [u8], X509Certificate<'a>), PkiError> {
    X509Certificate::from_der(cert).map_err(|e| PkiError::Certificate {
        what: what.to_owned(),
        why: format!("not a valid X.509 certificate: {e}"),
    })
}

/// Certificate summary for status output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertSummary {
    /// The subject's CN, or the whole subject DN (RFC 4514 form) if it has no CN.
    pub subject: String,
    /// notAfter as seconds since the Unix epoch.
    pub not_after_unix: i64,
    /// notAfter in RFC 3339, UTC, e.g. `2035-06-01T12:00:00Z`.
    pub not_after: String,
}

/// Subject and expiry of a certificate.
pub fn summarize(cert: &CertificateDer<'_>) -> Result<CertSummary, PkiError> {
    let (_, x509) = parse("certificate", cert)?;
    let subject = match single_common_name(x509.subject()) {
        Some(cn) => cn.to_owned(),
        None => x509.subject().to_string(),
    };
    let not_after = x509.validity().not_after;
    let rfc3339 = not_after
        .to_datetime()
        .format(&Rfc3339)
        .map_err(|e| PkiError::Certificate {
            what: format!("certificate {subject:?}"),
            why: format!("notAfter cannot be written as RFC 3339: {e}"),
        })?;
    Ok(CertSummary {
        subject,
        not_after_unix: not_after.timestamp(),
        not_after: rfc3339,
    })
}
