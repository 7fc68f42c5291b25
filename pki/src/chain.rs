//! "Bring your own chain": checking an operator-supplied server certificate chain and key before
//! the gateway uses them, and a minimal CA for operators who have no PKI of their own.
//!
//! The checks are those a TLS client (rustls/webpki on devices and managers) applies, plus the
//! ones only devgate can know about (the names it is configured to be reached under, whether
//! the key belongs to the certificate). They run once, at configuration time, so that a broken
//! chain is reported as a list of concrete fixes instead of as handshake failures on every
//! device. Every fault is collected; nothing stops at the first one.

use std::fmt;
use std::fs;
use std::io;
use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use rcgen::{BasicConstraints, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls_pki_types::pem::{self, PemObject as _};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use x509_parser::asn1_rs::{Any, Class, FromDer as _, Tag};
use x509_parser::error::X509Error;
use x509_parser::extensions::{GeneralName, SubjectAlternativeName};
use x509_parser::prelude::X509Certificate;
use x509_parser::public_key::PublicKey;

use crate::files::{CERT_MODE, KEY_MODE, certs_pem, pem_encode, sync_dir, write_atomic};
use crate::issue::{base_params, end_entity_params};
use crate::names::server_sans;
use crate::{CertSummary, IssuedCert, PkiError, fingerprint, load_certs, load_key, summarize};

/// Default lifetime, in days, of a root made by [`create_root`]: 10 years.
pub const DEFAULT_ROOT_DAYS: u32 = 3652;
/// Default lifetime, in days, of a server certificate made by [`create_server`]: 1 year.
pub const DEFAULT_SERVER_DAYS: u32 = 365;

/// One problem found in an operator-supplied certificate chain, phrased as one line an operator
/// can act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainFault {
    /// What kind of problem, for programs.
    pub kind: FaultKind,
    /// What is wrong and, where it is not obvious, what to do; names the certificate by its
    /// position in the chain (1 = server certificate) and its CN.
    pub message: String,
}

impl fmt::Display for ChainFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// The kinds of [`ChainFault`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FaultKind {
    /// Not PEM, a PEM section that does not decode, or a certificate that is not valid X.509
    /// (including a malformed extension that the checks need).
    Unparsable,
    /// No certificate at all.
    Empty,
    /// A file could not be read (only from [`validate_server_chain_files`]).
    Unreadable,
    /// The first certificate is a CA, not the gateway's own (end-entity) certificate.
    NotEndEntity,
    /// An issuing certificate has no BasicConstraints or has CA=false.
    CaNotCa,
    /// A CA has more intermediate CAs below it than its pathLenConstraint allows.
    PathLenExceeded,
    /// A CA without keyCertSign, or a server certificate whose KeyUsage lacks digitalSignature.
    KeyUsage,
    /// ExtendedKeyUsage present without serverAuth (on the server certificate or an
    /// intermediate).
    MissingServerAuth,
    /// A configured name is not covered by the server certificate's SANs.
    SanMissingName,
    /// The server certificate has no subjectAltName extension.
    NoSan,
    /// A certificate's notBefore is in the future.
    NotYetValid,
    /// A certificate's notAfter has passed.
    Expired,
    /// Certificate N is not issued by certificate N+1 (issuer name ≠ next subject).
    WrongOrder,
    /// A signature does not verify with the issuer's key, or uses an unsupported algorithm.
    BadSignature,
    /// The private key does not belong to the server certificate.
    KeyMismatch,
    /// The private key is missing, encrypted, malformed or of an unsupported type.
    KeyUnparsable,
    /// The last certificate is not self-signed: the root is missing from the chain.
    UntrustedRoot,
}

/// The outcome of [`validate_server_chain`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainReport {
    /// Every problem found, roughly in chain order, key problems last. Empty means usable.
    pub faults: Vec<ChainFault>,
    /// Subject and expiry of the first certificate, if it parses.
    pub end_entity: Option<CertSummary>,
    /// [`fingerprint`] of the last certificate if it is a self-signed root (and not the server
    /// certificate itself): what devices pin on first contact.
    pub root_fingerprint: Option<String>,
}

impl ChainReport {
    /// Whether no fault was found.
    pub fn is_ok(&self) -> bool {
        self.faults.is_empty()
    }

    /// Whether some fault is of `kind`.
    pub fn has(&self, kind: FaultKind) -> bool {
        self.faults.iter().any(|f| f.kind == kind)
    }
}

/// One fault per line.
impl fmt::Display for ChainReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for fault in &self.faults {
            writeln!(f, "{fault}")?;
        }
        Ok(())
    }
}

/// Validates a PEM chain (end-entity first, then intermediates, then optionally the root) and
/// its PEM private key for use as the gateway's server certificate reachable under `names` (DNS
/// names and IP literals) at time `now_unix` (Unix seconds).
///
/// Reports every fault found, not just the first. Never panics on any input.
pub fn validate_server_chain(
    chain_pem: &[u8],
    key_pem: &[u8],
    names: &[String],
    now_unix: i64,
) -> ChainReport {
    validate(Some(chain_pem), Some(key_pem), names, now_unix, Vec::new())
}

/// [`validate_server_chain`] on files. A missing or unreadable file is a fault naming the path
/// (kind [`FaultKind::Unreadable`]); the other file is still checked. Every message is prefixed
/// with the path of the file it concerns.
pub fn validate_server_chain_files(
    chain: &Path,
    key: &Path,
    names: &[String],
    now_unix: i64,
) -> ChainReport {
    let mut early = Vec::new();
    let chain_bytes = read_for_check(chain, "server certificate chain", &mut early);
    let key_bytes = read_for_check(key, "server private key", &mut early);
    let mut report = validate(
        chain_bytes.as_deref(),
        key_bytes.as_deref(),
        names,
        now_unix,
        early,
    );
    for fault in &mut report.faults {
        let path = match fault.kind {
            FaultKind::Unreadable => continue,
            FaultKind::KeyMismatch | FaultKind::KeyUnparsable => key,
            _ => chain,
        };
        fault.message = format!("{}: {}", path.display(), fault.message);
    }
    report
}

fn read_for_check(path: &Path, what: &str, faults: &mut Vec<ChainFault>) -> Option<Vec<u8>> {
    match fs::read(path) {
        Ok(bytes) => Some(bytes),
        Err(e) => {
            let why = match e.kind() {
                io::ErrorKind::NotFound => {
                    format!("file not found; check the path configured for the {what}")
                }
                io::ErrorKind::PermissionDenied => format!(
                    "permission denied; the {what} must be readable by the user devgate runs as"
                ),
                _ => format!("cannot read the {what}: {e}"),
            };
            faults.push(ChainFault {
                kind: FaultKind::Unreadable,
                message: format!("{}: {why}", path.display()),
            });
            None
        }
    }
}

/// `None` for an input that could not be read (already reported in `faults`).
fn validate(
    chain_pem: Option<&[u8]>,
    key_pem: Option<&[u8]>,
    names: &[String],
    now_unix: i64,
    faults: Vec<ChainFault>,
) -> ChainReport {
    let mut f = Faults(faults);
    let ders = chain_pem
        .map(|p| read_chain_pem(p, &mut f))
        .unwrap_or_default();
    let certs: Vec<Option<Cert<'_>>> = ders
        .iter()
        .enumerate()
        .map(|(i, der)| parse_cert(i, der, &mut f))
        .collect();

    // Path lengths count positions, which mean nothing in a misordered chain; the order
    // faults say what to fix first.
    let in_order = certs.windows(2).all(|pair| match pair {
        [Some(child), Some(parent)] => {
            !child.self_signed() && child.x509.issuer().as_raw() == parent.x509.subject().as_raw()
        }
        _ => true,
    });
    for (i, cert) in certs.iter().enumerate() {
        let Some(cert) = cert else { continue };
        if i == 0 {
            check_end_entity(cert, names, &mut f);
        } else {
            check_issuer_role(cert, i, i + 1 == certs.len(), in_order, &mut f);
        }
    }
    for cert in certs.iter().flatten() {
        check_validity(cert, now_unix, &mut f);
    }
    for (i, pair) in certs.windows(2).enumerate() {
        if let [Some(child), Some(parent)] = pair {
            check_link(child, parent, &certs, i, &mut f);
        }
    }
    // A root that is present but misplaced is reported as an order fault, not as missing.
    let root_misplaced = certs
        .iter()
        .skip(1)
        .rev()
        .skip(1)
        .flatten()
        .any(Cert::self_signed);
    let root_fingerprint = match certs.last() {
        Some(Some(last)) => check_last(last, certs.len(), root_misplaced, &mut f),
        _ => None,
    };

    let end_entity = certs.first().and_then(Option::as_ref);
    if let Some(key_pem) = key_pem {
        match key_public(key_pem) {
            Err(why) => f.push(FaultKind::KeyUnparsable, why),
            Ok(key) => {
                if let Some(ee) = end_entity
                    && !key.matches(&ee.x509)
                {
                    let owner = certs
                        .iter()
                        .skip(1)
                        .flatten()
                        .find(|c| key.matches(&c.x509))
                        .map(|c| format!("; it is the key of {}", c.label()))
                        .unwrap_or_default();
                    f.push(
                        FaultKind::KeyMismatch,
                        format!(
                            "private key does not match the server certificate (its public key \
                             differs){owner}"
                        ),
                    );
                }
            }
        }
    }

    ChainReport {
        end_entity: ders.first().and_then(|d| summarize(d).ok()),
        faults: f.0,
        root_fingerprint,
    }
}

struct Faults(Vec<ChainFault>);

impl Faults {
    fn push(&mut self, kind: FaultKind, message: String) {
        self.0.push(ChainFault { kind, message });
    }
}

/// A parsed certificate and where it sits in the chain.
struct Cert<'a> {
    /// 1-based position: 1 is the server certificate.
    pos: usize,
    der: &'a [u8],
    x509: X509Certificate<'a>,
    name: String,
}

impl Cert<'_> {
    /// `certificate 2 ("Example Intermediate")`.
    fn label(&self) -> String {
        format!("certificate {} ({:?})", self.pos, self.name)
    }

    fn self_signed(&self) -> bool {
        self.x509.issuer().as_raw() == self.x509.subject().as_raw()
    }
}

/// The CN, else the whole subject DN, else a placeholder: how operators recognise a certificate.
fn display_name(name: &x509_parser::x509::X509Name<'_>) -> String {
    if let Some(cn) = name
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
    {
        return cn.to_owned();
    }
    let dn = name.to_string();
    if dn.is_empty() {
        "empty subject".into()
    } else {
        dn
    }
}

fn read_chain_pem(pem: &[u8], f: &mut Faults) -> Vec<CertificateDer<'static>> {
    let mut out = Vec::new();
    for item in CertificateDer::pem_slice_iter(pem) {
        match item {
            Ok(der) => out.push(der),
            Err(e) => {
                let after = match out.len() {
                    0 => String::new(),
                    n => format!(" after certificate {n}"),
                };
                f.push(
                    FaultKind::Unparsable,
                    format!("the chain is not valid PEM{after}: {}", pem_problem(&e)),
                );
                return out;
            }
        }
    }
    if out.is_empty() {
        let text = String::from_utf8_lossy(pem);
        if pem.trim_ascii().is_empty() {
            f.push(
                FaultKind::Empty,
                "the certificate chain is empty; expected PEM certificates, the server \
                 certificate first, then its intermediates and the root"
                    .into(),
            );
        } else if text.contains("-----BEGIN") {
            let hint = if text.contains("PRIVATE KEY-----") {
                " (it holds a private key: are the certificate and key files swapped?)"
            } else {
                ""
            };
            f.push(
                FaultKind::Empty,
                format!(
                    "the chain holds no \"-----BEGIN CERTIFICATE-----\" section{hint}; expected \
                     PEM certificates, the server certificate first"
                ),
            );
        } else if X509Certificate::from_der(pem).is_ok() {
            f.push(
                FaultKind::Unparsable,
                "the chain is a DER (binary) certificate, not PEM; convert it with \
                 `openssl x509 -inform der -in FILE -out FILE.pem` and append the intermediates \
                 and root in PEM"
                    .into(),
            );
        } else {
            f.push(
                FaultKind::Unparsable,
                "the chain is not PEM: no \"-----BEGIN CERTIFICATE-----\" section found".into(),
            );
        }
    }
    out
}

fn pem_problem(e: &pem::Error) -> String {
    match e {
        pem::Error::MissingSectionEnd { .. } => {
            "a section has no matching \"-----END ...-----\" line (truncated file?)".into()
        }
        pem::Error::IllegalSectionStart { .. } => "a \"-----BEGIN\" line is malformed".into(),
        pem::Error::Base64Decode(e) => format!("a section is not valid base64 ({e})"),
        e => e.to_string(),
    }
}

fn parse_cert<'a>(i: usize, der: &'a CertificateDer<'_>, f: &mut Faults) -> Option<Cert<'a>> {
    let pos = i + 1;
    match X509Certificate::from_der(der) {
        Err(e) => {
            f.push(
                FaultKind::Unparsable,
                format!("certificate {pos}: not a valid X.509 certificate ({e})"),
            );
            None
        }
        Ok((rest, x509)) => {
            let cert = Cert {
                pos,
                der,
                name: display_name(x509.subject()),
                x509,
            };
            if rest.is_empty() {
                Some(cert)
            } else {
                f.push(
                    FaultKind::Unparsable,
                    format!(
                        "{}: {} bytes of trailing data after the certificate; the PEM section \
                         is corrupt",
                        cert.label(),
                        rest.len()
                    ),
                );
                None
            }
        }
    }
}

fn malformed(cert: &Cert<'_>, ext: &str, e: &X509Error, f: &mut Faults) {
    f.push(
        FaultKind::Unparsable,
        format!("{}: its {ext} extension cannot be read ({e})", cert.label()),
    );
}

/// The server certificate: an end entity with KeyUsage/EKU fit for a TLS server and SANs
/// covering every configured name.
fn check_end_entity(cert: &Cert<'_>, names: &[String], f: &mut Faults) {
    let x = &cert.x509;
    let server = format!("server certificate ({:?})", cert.name);
    match x.basic_constraints() {
        Err(e) => malformed(cert, "BasicConstraints", &e, f),
        Ok(Some(bc)) if bc.value.ca => f.push(
            FaultKind::NotEndEntity,
            format!(
                "{} is a CA certificate (BasicConstraints CA=true), but the first certificate \
                 must be the gateway's own server certificate (an end entity); put the server \
                 certificate first, followed by its issuers",
                cert.label()
            ),
        ),
        Ok(_) => {}
    }
    match x.key_usage() {
        Err(e) => malformed(cert, "KeyUsage", &e, f),
        Ok(Some(ku)) if !ku.value.digital_signature() => f.push(
            FaultKind::KeyUsage,
            format!(
                "{server} has a KeyUsage without digitalSignature, so TLS clients refuse its key \
                 for the handshake; re-issue it with KeyUsage digitalSignature"
            ),
        ),
        Ok(_) => {}
    }
    match x.extended_key_usage() {
        Err(e) => malformed(cert, "ExtendedKeyUsage", &e, f),
        Ok(Some(eku)) if !eku.value.server_auth => f.push(
            FaultKind::MissingServerAuth,
            format!(
                "{server} has an ExtendedKeyUsage without serverAuth, so TLS clients refuse it \
                 as a server certificate; re-issue it with EKU serverAuth"
            ),
        ),
        Ok(_) => {}
    }
    match x.subject_alternative_name() {
        Err(e) => malformed(cert, "subjectAltName", &e, f),
        Ok(None) => {
            let wanted = if names.is_empty() {
                String::new()
            } else {
                format!(" ({})", names.join(", "))
            };
            f.push(
                FaultKind::NoSan,
                format!(
                    "{server} has no subjectAltName extension; TLS clients match the server \
                     name against SANs only, never the CN, so re-issue it with every name the \
                     gateway is reached under{wanted} as a DNS or IP SAN"
                ),
            );
        }
        Ok(Some(san)) => {
            for name in names {
                if !covers(san.value, name) {
                    f.push(
                        FaultKind::SanMissingName,
                        format!(
                            "{server} does not cover the name {name:?}: {}",
                            describe_sans(san.value, name)
                        ),
                    );
                }
            }
        }
    }
}

/// An IP literal (optionally in brackets) or `None` for a DNS name.
fn ip_literal(name: &str) -> Option<IpAddr> {
    let bare = name
        .strip_prefix('[')
        .and_then(|n| n.strip_suffix(']'))
        .unwrap_or(name);
    bare.parse().ok()
}

fn san_ip(bytes: &[u8]) -> Option<IpAddr> {
    match bytes.len() {
        4 => <[u8; 4]>::try_from(bytes).ok().map(IpAddr::from),
        16 => <[u8; 16]>::try_from(bytes).ok().map(IpAddr::from),
        _ => None,
    }
}

fn covers(san: &SubjectAlternativeName<'_>, name: &str) -> bool {
    if let Some(ip) = ip_literal(name) {
        return san.general_names.iter().any(|g| match g {
            GeneralName::IPAddress(b) => san_ip(b) == Some(ip),
            _ => false,
        });
    }
    san.general_names.iter().any(|g| match g {
        GeneralName::DNSName(pattern) => dns_matches(pattern, name),
        _ => false,
    })
}

/// Exact match ignoring ASCII case and one trailing dot; a leftmost `*.` label matches exactly
/// one non-empty label (as in RFC 6125 and webpki; `*.example.com` does not cover
/// `example.com` or `a.b.example.com`).
fn dns_matches(pattern: &str, name: &str) -> bool {
    let pattern = pattern.strip_suffix('.').unwrap_or(pattern);
    let name = name.strip_suffix('.').unwrap_or(name);
    if pattern.eq_ignore_ascii_case(name) {
        return true;
    }
    match (pattern.strip_prefix("*."), name.split_once('.')) {
        (Some(suffix), Some((label, rest))) => {
            !label.is_empty() && !suffix.is_empty() && suffix.eq_ignore_ascii_case(rest)
        }
        _ => false,
    }
}

/// `its SANs are gw.example.com, 10.0.0.1`, plus a hint for the classic mistake of an IP
/// address entered as a DNS SAN.
fn describe_sans(san: &SubjectAlternativeName<'_>, missing: &str) -> String {
    let mut listed = Vec::new();
    let mut ip_as_dns = false;
    for g in &san.general_names {
        match g {
            GeneralName::DNSName(d) => {
                ip_as_dns |= ip_literal(missing).is_some() && d.eq_ignore_ascii_case(missing);
                listed.push((*d).to_owned());
            }
            GeneralName::IPAddress(b) => match san_ip(b) {
                Some(ip) => listed.push(ip.to_string()),
                None => listed.push("(malformed IP address)".into()),
            },
            GeneralName::URI(u) => listed.push(format!("URI:{u}")),
            GeneralName::RFC822Name(e) => listed.push(format!("email:{e}")),
            _ => {}
        }
    }
    let mut out = if listed.is_empty() {
        "it has no DNS or IP SANs".to_owned()
    } else {
        format!("its SANs are {}", listed.join(", "))
    };
    if ip_as_dns {
        out.push_str(
            " (the address is listed as a DNS name; TLS clients only match IP addresses against \
             IP SANs, e.g. subjectAltName = IP:10.0.0.1 in openssl)",
        );
    }
    out
}

/// Certificate at 0-based index `i ≥ 1`: it issues the one before it, so it must be a CA with
/// room for the CAs below it.
fn check_issuer_role(cert: &Cert<'_>, i: usize, is_last: bool, in_order: bool, f: &mut Faults) {
    let x = &cert.x509;
    match x.basic_constraints() {
        Err(e) => malformed(cert, "BasicConstraints", &e, f),
        Ok(None) => f.push(
            FaultKind::CaNotCa,
            format!(
                "{} has no BasicConstraints extension, but it issues certificate {i}; an \
                 issuing certificate must be a CA (BasicConstraints CA=true)",
                cert.label()
            ),
        ),
        Ok(Some(bc)) if !bc.value.ca => f.push(
            FaultKind::CaNotCa,
            format!(
                "{}: BasicConstraints CA=false, but it issues certificate {i}; an issuing \
                 certificate must be a CA",
                cert.label()
            ),
        ),
        Ok(Some(bc)) => {
            // Intermediate CAs between this one and the server certificate.
            let below = i - 1;
            if in_order
                && let Some(max) = bc.value.path_len_constraint
                && u64::try_from(below).unwrap_or(u64::MAX) > u64::from(max)
            {
                let verb = if below == 1 { "follows" } else { "follow" };
                f.push(
                    FaultKind::PathLenExceeded,
                    format!(
                        "{} allows {max} intermediate CAs below it (pathlen {max}) but {below} \
                         {verb}",
                        cert.label()
                    ),
                );
            }
        }
    }
    match x.key_usage() {
        Err(e) => malformed(cert, "KeyUsage", &e, f),
        Ok(Some(ku)) if !ku.value.key_cert_sign() => f.push(
            FaultKind::KeyUsage,
            format!(
                "{} has a KeyUsage without keyCertSign, so it may not sign certificates; \
                 re-issue it with KeyUsage keyCertSign",
                cert.label()
            ),
        ),
        Ok(_) => {}
    }
    // webpki applies EKU to intermediates too; a self-signed last certificate is the trust
    // anchor, whose extensions it ignores.
    if !(is_last && cert.self_signed()) {
        match x.extended_key_usage() {
            Err(e) => malformed(cert, "ExtendedKeyUsage", &e, f),
            Ok(Some(eku)) if !eku.value.server_auth => f.push(
                FaultKind::MissingServerAuth,
                format!(
                    "{} has an ExtendedKeyUsage without serverAuth, so TLS clients refuse every \
                     server certificate below it; use an intermediate without EKU or with \
                     serverAuth",
                    cert.label()
                ),
            ),
            Ok(_) => {}
        }
    }
}

fn rfc3339(unix: i64) -> String {
    OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_else(|| format!("{unix} (Unix time)"))
}

fn check_validity(cert: &Cert<'_>, now: i64, f: &mut Faults) {
    let v = cert.x509.validity();
    let not_before = v.not_before.timestamp();
    let not_after = v.not_after.timestamp();
    if now < not_before {
        f.push(
            FaultKind::NotYetValid,
            format!(
                "{} is not valid before {} (it is now {}); check this machine's clock, or wait",
                cert.label(),
                rfc3339(not_before),
                rfc3339(now)
            ),
        );
    }
    if now >= not_after {
        f.push(
            FaultKind::Expired,
            format!("{} expired on {}", cert.label(), rfc3339(not_after)),
        );
    }
}

/// `child` (0-based index `i`) must name `parent` as issuer and carry its signature.
fn check_link(
    child: &Cert<'_>,
    parent: &Cert<'_>,
    all: &[Option<Cert<'_>>],
    i: usize,
    f: &mut Faults,
) {
    let issuer = child.x509.issuer();
    if child.self_signed() {
        f.push(
            FaultKind::WrongOrder,
            format!(
                "{} is self-signed (a root), but {} follows it; the root must be the last \
                 certificate of the chain",
                child.label(),
                parent.label()
            ),
        );
        return;
    }
    if issuer.as_raw() != parent.x509.subject().as_raw() {
        let elsewhere = all
            .iter()
            .enumerate()
            .filter(|&(j, _)| j != i && j != i + 1)
            .find_map(|(_, c)| {
                c.as_ref()
                    .filter(|c| c.x509.subject().as_raw() == issuer.as_raw())
            });
        let hint = match elsewhere {
            Some(c) => format!(
                "its issuer is {}; order the chain server certificate first, then each \
                 certificate's issuer, root last",
                c.label()
            ),
            None => "each certificate must be followed by the one that issued it (server \
                     certificate first, root last)"
                .to_owned(),
        };
        f.push(
            FaultKind::WrongOrder,
            format!(
                "{} is issued by {:?}, not by the next one, {}; {hint}",
                child.label(),
                display_name(issuer),
                parent.label()
            ),
        );
        return;
    }
    match child.x509.verify_signature(Some(parent.x509.public_key())) {
        Ok(()) => {}
        Err(X509Error::SignatureUnsupportedAlgorithm) => f.push(
            FaultKind::BadSignature,
            format!(
                "{} is signed with an algorithm devgate cannot verify ({}); use ECDSA \
                 (P-256/P-384), Ed25519 or RSA (2048 bits or more) with SHA-256 or stronger",
                child.label(),
                child.x509.signature_algorithm.algorithm.to_id_string()
            ),
        ),
        Err(e) => f.push(
            FaultKind::BadSignature,
            format!(
                "{}: its signature does not verify with the key of {} ({e}), although it names \
                 it as issuer; the issuer has probably been re-keyed: use the issuer \
                 certificate that actually signed it, or re-issue it",
                child.label(),
                parent.label()
            ),
        ),
    }
}

/// The end of the chain must be a self-signed root, whose own signature verifies. Returns its
/// fingerprint.
fn check_last(last: &Cert<'_>, len: usize, root_misplaced: bool, f: &mut Faults) -> Option<String> {
    if !last.self_signed() {
        if root_misplaced {
            return None;
        }
        let issuer = display_name(last.x509.issuer());
        let message = if len == 1 {
            format!(
                "the chain ends at the server certificate ({:?}), issued by {issuer:?}; append \
                 the intermediate certificates and the root certificate (the one devices pin)",
                last.name
            )
        } else {
            format!(
                "{} is not self-signed: the chain ends at an intermediate issued by \
                 {issuer:?}; append the root certificate (the one devices pin)",
                last.label()
            )
        };
        f.push(FaultKind::UntrustedRoot, message);
        return None;
    }
    match last.x509.verify_signature(None) {
        Ok(()) => {}
        Err(X509Error::SignatureUnsupportedAlgorithm) => f.push(
            FaultKind::BadSignature,
            format!(
                "{} is self-signed with an algorithm devgate cannot verify ({})",
                last.label(),
                last.x509.signature_algorithm.algorithm.to_id_string()
            ),
        ),
        Err(e) => f.push(
            FaultKind::BadSignature,
            format!(
                "{} is self-signed, but its signature does not verify with its own key ({e}); \
                 the certificate is corrupt",
                last.label()
            ),
        ),
    }
    if len == 1 {
        f.push(
            FaultKind::UntrustedRoot,
            format!(
                "the chain holds only the self-signed server certificate ({:?}); devices pin a \
                 root CA, so issue the server certificate from a CA and append the CA's \
                 certificate (create one with `create_root`/`create_server` if you have none)",
                last.name
            ),
        );
        return None;
    }
    Some(fingerprint(last.der))
}

/// The public half of a private key, in the form it takes in a certificate.
enum PublicHalf {
    /// The subjectPublicKey BIT STRING contents (EC point, Ed25519 key, DER RSAPublicKey).
    Raw(Vec<u8>),
    /// RSA from PKCS#1 fields, compared numerically (leading zeros ignored).
    Rsa { modulus: Vec<u8>, exponent: Vec<u8> },
}

impl PublicHalf {
    fn matches(&self, cert: &X509Certificate<'_>) -> bool {
        let spki = cert.public_key();
        match self {
            Self::Raw(raw) => spki.subject_public_key.data.as_ref() == raw.as_slice(),
            Self::Rsa { modulus, exponent } => match spki.parsed() {
                Ok(PublicKey::RSA(rsa)) => {
                    strip_zeros(rsa.modulus) == strip_zeros(modulus)
                        && strip_zeros(rsa.exponent) == strip_zeros(exponent)
                }
                _ => false,
            },
        }
    }
}

fn strip_zeros(b: &[u8]) -> &[u8] {
    let start = b.iter().position(|&x| x != 0).unwrap_or(b.len());
    &b[start..]
}

/// Reads the key and derives its public half: with rcgen where it can load the key (PKCS#8
/// ECDSA P-256/P-384, Ed25519, RSA; this also checks the key's internal consistency), else
/// from the key's own structure (SEC1 and PKCS#1 files, other curves), which the TLS stack may
/// still accept.
fn key_public(pem: &[u8]) -> Result<PublicHalf, String> {
    let der = match PrivateKeyDer::from_pem_slice(pem) {
        Ok(der) => der,
        Err(pem::Error::NoItemsFound) => return Err(no_key_found(pem)),
        Err(e) => {
            return Err(format!(
                "the private key is not valid PEM: {}",
                pem_problem(&e)
            ));
        }
    };
    if let Ok(pair) = KeyPair::try_from(&der) {
        return Ok(PublicHalf::Raw(pair.public_key_raw().to_vec()));
    }
    let structural = match &der {
        PrivateKeyDer::Pkcs8(k) => pkcs8_public(k.secret_pkcs8_der()),
        PrivateKeyDer::Sec1(k) => sec1_public(k.secret_sec1_der()).map(PublicHalf::Raw),
        PrivateKeyDer::Pkcs1(k) => pkcs1_public(k.secret_pkcs1_der()),
        _ => None,
    };
    structural.ok_or_else(|| {
        "the private key cannot be read: it is corrupt or of an unsupported type; use an \
         unencrypted ECDSA P-256/P-384, Ed25519 or RSA (2048 bits or more) key, ideally PKCS#8 \
         (`openssl pkcs8 -topk8 -nocrypt -in OLD -out NEW`)"
            .to_owned()
    })
}

fn no_key_found(pem: &[u8]) -> String {
    let text = String::from_utf8_lossy(pem);
    if text.contains("ENCRYPTED PRIVATE KEY") || text.contains("Proc-Type: 4,ENCRYPTED") {
        "the private key is encrypted; the gateway needs it unencrypted: decrypt it with \
         `openssl pkey -in KEY -out PLAIN.key` and keep that file mode 0600"
            .into()
    } else if pem.trim_ascii().is_empty() {
        "the private key is empty; expected a PEM \"-----BEGIN PRIVATE KEY-----\" section".into()
    } else if text.contains("BEGIN CERTIFICATE") {
        "no private key found, only certificates: are the certificate and key files swapped?".into()
    } else {
        "no private key found; expected a PEM \"-----BEGIN PRIVATE KEY-----\" (PKCS#8), \
         \"BEGIN EC PRIVATE KEY\" or \"BEGIN RSA PRIVATE KEY\" section"
            .into()
    }
}

/// The elements of a DER SEQUENCE that spans all of `der`.
fn sequence(der: &[u8]) -> Option<Vec<Any<'_>>> {
    let (rest, seq) = Any::from_der(der).ok()?;
    if !rest.is_empty() || seq.tag() != Tag::Sequence || seq.class() != Class::Universal {
        return None;
    }
    let mut items = Vec::new();
    let mut data = seq.data;
    while !data.is_empty() {
        let (rest, item) = Any::from_der(data).ok()?;
        items.push(item);
        data = rest;
    }
    Some(items)
}

fn universal(item: &Any<'_>, tag: Tag) -> bool {
    item.class() == Class::Universal && item.tag() == tag
}

fn context(item: &Any<'_>, tag: u32) -> bool {
    item.class() == Class::ContextSpecific && item.tag() == Tag(tag)
}

/// BIT STRING contents without the unused-bits octet; keys are whole octets.
fn bit_string_octets(content: &[u8]) -> Option<Vec<u8>> {
    match content.split_first() {
        Some((0, bits)) if !bits.is_empty() => Some(bits.to_vec()),
        _ => None,
    }
}

/// PKCS#8 PrivateKeyInfo / OneAsymmetricKey (RFC 5958): the v2 publicKey field if present,
/// else from the embedded SEC1 or PKCS#1 key.
fn pkcs8_public(der: &[u8]) -> Option<PublicHalf> {
    let items = sequence(der)?;
    if let Some(public) = items.iter().skip(3).find(|i| context(i, 1)) {
        return bit_string_octets(public.data).map(PublicHalf::Raw);
    }
    let inner = items.get(2).filter(|i| universal(i, Tag::OctetString))?;
    sec1_public(inner.data)
        .map(PublicHalf::Raw)
        .or_else(|| pkcs1_public(inner.data))
}

/// SEC1 ECPrivateKey (RFC 5915): the optional `[1] publicKey BIT STRING`.
fn sec1_public(der: &[u8]) -> Option<Vec<u8>> {
    let items = sequence(der)?;
    if !items.first().is_some_and(|v| universal(v, Tag::Integer))
        || !items.get(1).is_some_and(|k| universal(k, Tag::OctetString))
    {
        return None;
    }
    let wrapped = items.iter().skip(2).find(|i| context(i, 1))?;
    let (_, bits) = Any::from_der(wrapped.data).ok()?;
    if !universal(&bits, Tag::BitString) {
        return None;
    }
    bit_string_octets(bits.data)
}

/// PKCS#1 RSAPrivateKey (RFC 8017): version, modulus, publicExponent, …
fn pkcs1_public(der: &[u8]) -> Option<PublicHalf> {
    let items = sequence(der)?;
    if items.len() < 9 || !items.iter().take(9).all(|i| universal(i, Tag::Integer)) {
        return None;
    }
    Some(PublicHalf::Rsa {
        modulus: items.get(1)?.data.to_vec(),
        exponent: items.get(2)?.data.to_vec(),
    })
}

fn lifetime(days: u32, what: &str) -> Result<Duration, PkiError> {
    if days == 0 {
        return Err(PkiError::Certificate {
            what: what.to_owned(),
            why: "a validity of 0 days was requested; give at least 1 day".into(),
        });
    }
    Ok(Duration::from_secs(u64::from(days) * 24 * 60 * 60))
}

/// The directory a file is written to, for [`sync_dir`].
fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Creates a self-signed root CA for operators without a PKI and writes its certificate (mode
/// 0644) and PKCS#8 key (mode 0600), both atomically, the key first. Returns the root's
/// [`fingerprint`], which devices pin.
///
/// The root is ECDSA P-256, BasicConstraints CA pathlen 1 (one level of intermediates may sit
/// below it, as with [`init`](crate::init)'s root), KeyUsage keyCertSign + cRLSign, valid for
/// `days` days ([`DEFAULT_ROOT_DAYS`] is the usual choice). Refuses to overwrite an existing
/// file: replacing a root changes the fingerprint every device has pinned.
pub fn create_root(
    cert: &Path,
    key: &Path,
    common_name: &str,
    days: u32,
) -> Result<String, PkiError> {
    let what = format!("root CA {common_name:?}");
    if common_name.trim().is_empty() {
        return Err(PkiError::Certificate {
            what: "root CA".into(),
            why: "the common name is empty; give the root a name people recognise, e.g. \
                  \"Example Corp devgate root\""
                .into(),
        });
    }
    for path in [cert, key] {
        match fs::symlink_metadata(path) {
            Ok(_) => return Err(PkiError::WouldOverwrite { path: path.into() }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(PkiError::io(path, e)),
        }
    }
    let mut params = base_params(common_name, lifetime(days, &what)?)?;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let key_pair =
        KeyPair::generate().map_err(PkiError::rcgen(format!("generate a key for the {what}")))?;
    let root = params
        .self_signed(&key_pair)
        .map_err(PkiError::rcgen(format!("self-sign the {what}")))?;
    write_atomic(key, key_pair.serialize_pem().as_bytes(), KEY_MODE)?;
    write_atomic(
        cert,
        pem_encode("CERTIFICATE", [root.der().as_ref()]).as_bytes(),
        CERT_MODE,
    )?;
    sync_dir(parent_dir(key))?;
    sync_dir(parent_dir(cert))?;
    Ok(fingerprint(root.der()))
}

/// Creates a server certificate for `names` (DNS names and IP literals; the first is the CN),
/// signed by the CA in `root_cert`/`root_key`, valid for `days` days ([`DEFAULT_SERVER_DAYS`]
/// is the usual choice), and writes the key (PKCS#8, mode 0600) and then the chain: the new
/// certificate followed by every certificate of `root_cert` in order (so a file holding an
/// intermediate followed by its root works too).
///
/// The result is checked with [`validate_server_chain`] before anything is written; any fault
/// (e.g. the issuer file lacks the root, or the issuer has expired) is an error.
pub fn create_server(
    root_cert: &Path,
    root_key: &Path,
    names: &[String],
    days: u32,
    chain_out: &Path,
    key_out: &Path,
) -> Result<(), PkiError> {
    let sans = server_sans(names)?;
    let cert_what = || root_cert.display().to_string();
    let issuer_chain = load_certs(root_cert)?;
    let issuer_der = issuer_chain.first().ok_or_else(|| PkiError::Certificate {
        what: cert_what(),
        why: "no certificate in the file".into(),
    })?;
    let (_, issuer_x509) =
        X509Certificate::from_der(issuer_der).map_err(|e| PkiError::Certificate {
            what: cert_what(),
            why: format!("not a valid X.509 certificate: {e}"),
        })?;
    if !issuer_x509.is_ca() {
        return Err(PkiError::Certificate {
            what: cert_what(),
            why: "this is not a CA certificate (BasicConstraints CA is not set), so it cannot \
                  issue the server certificate; give the root (or intermediate) CA certificate"
                .into(),
        });
    }
    let issuer_key = KeyPair::try_from(&load_key(root_key)?).map_err(|e| PkiError::Key {
        path: root_key.to_owned(),
        why: format!(
            "cannot sign with this key ({e}); expected an unencrypted PKCS#8 ECDSA P-256/P-384, \
             Ed25519 or RSA key (\"BEGIN PRIVATE KEY\"); convert others with \
             `openssl pkcs8 -topk8 -nocrypt`"
        ),
    })?;
    if issuer_key.public_key_raw() != issuer_x509.public_key().subject_public_key.data.as_ref() {
        return Err(PkiError::KeyMismatch {
            cert: root_cert.to_owned(),
            key: root_key.to_owned(),
        });
    }
    let issuer_subject = issuer_x509.subject().as_raw().to_vec();
    drop(issuer_x509);
    let issuer = Issuer::from_ca_cert_der(issuer_der, issuer_key).map_err(PkiError::rcgen(
        format!("use {} as an issuer", root_cert.display()),
    ))?;

    let common_name = names.first().map(String::as_str).unwrap_or_default();
    let mut params = end_entity_params(
        common_name,
        lifetime(days, "server certificate")?,
        ExtendedKeyUsagePurpose::ServerAuth,
    )?;
    params.subject_alt_names = sans;
    let key = KeyPair::generate()
        .map_err(PkiError::rcgen("generate a key for the server certificate"))?;
    let cert = params
        .signed_by(&key, &issuer)
        .map_err(PkiError::rcgen("sign the server certificate"))?;
    let (_, x509) = X509Certificate::from_der(cert.der()).map_err(|e| PkiError::Certificate {
        what: "new server certificate".into(),
        why: format!("does not parse: {e}"),
    })?;
    // rcgen writes the issuer name re-encoded from its parsed form; verifiers compare bytes.
    if x509.issuer().as_raw() != issuer_subject.as_slice() {
        return Err(PkiError::Certificate {
            what: cert_what(),
            why: "the CA's subject name cannot be reproduced byte for byte in issued \
                  certificates, so they would not chain to it; issue the server certificate \
                  with the tool that made the CA, or create a root with create_root"
                .into(),
        });
    }
    drop(x509);

    let mut chain = vec![CertificateDer::from(cert)];
    chain.extend(issuer_chain);
    let issued = IssuedCert {
        chain,
        key: key.into(),
    };
    let now = OffsetDateTime::now_utc().unix_timestamp();
    let report = validate_server_chain(
        certs_pem(&issued.chain).as_bytes(),
        issued.key_pem().as_bytes(),
        names,
        now,
    );
    if !report.is_ok() {
        let faults: Vec<&str> = report.faults.iter().map(|f| f.message.as_str()).collect();
        return Err(PkiError::Certificate {
            what: format!("server certificate issued by {}", root_cert.display()),
            why: format!("the resulting chain is unusable: {}", faults.join("; ")),
        });
    }
    issued.write(chain_out, key_out)?;
    sync_dir(parent_dir(key_out))?;
    sync_dir(parent_dir(chain_out))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_matching() {
        assert!(dns_matches("gw.example.com", "GW.Example.com"));
        assert!(dns_matches("gw.example.com.", "gw.example.com"));
        assert!(dns_matches("*.example.com", "gw.example.com"));
        assert!(dns_matches("*.example.com", "*.example.com"));
        assert!(!dns_matches("*.example.com", "example.com"));
        assert!(!dns_matches("*.example.com", "a.gw.example.com"));
        assert!(!dns_matches("*.example.com", ".example.com"));
        assert!(!dns_matches("*.", "gw."));
        assert!(!dns_matches("g*.example.com", "gw.example.com"));
        assert!(!dns_matches("", "gw"));
    }

    #[test]
    fn ip_literals() {
        assert_eq!(ip_literal("10.0.0.1"), "10.0.0.1".parse().ok());
        assert_eq!(ip_literal("[2001:db8::1]"), "2001:db8::1".parse().ok());
        assert_eq!(ip_literal("gw.example.com"), None);
        assert_eq!(san_ip(&[10, 0, 0, 1]), "10.0.0.1".parse().ok());
        assert_eq!(san_ip(&[10, 0, 0]), None);
    }

    #[test]
    fn key_structures_never_panic() {
        for der in [
            &[][..],
            &[0x30],
            &[0x30, 0x00],
            &[0x30, 0x03, 0x02, 0x01, 0x01],
        ] {
            assert!(pkcs8_public(der).is_none());
            assert!(sec1_public(der).is_none());
            assert!(pkcs1_public(der).is_none());
        }
        assert!(bit_string_octets(&[]).is_none());
        assert!(bit_string_octets(&[0]).is_none());
        assert!(bit_string_octets(&[1, 0xff]).is_none());
        assert_eq!(bit_string_octets(&[0, 4, 1]), Some(vec![4, 1]));
        assert_eq!(strip_zeros(&[0, 0, 1, 0]), &[1, 0]);
        assert_eq!(strip_zeros(&[0, 0]), &[] as &[u8]);
    }
}
