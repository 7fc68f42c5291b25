//! Validation of the names that go into certificates: server names (SANs of the server
//! certificate) and peer identities (unit IDs, manager names).

use std::fmt::Write as _;
use std::net::IpAddr;

use rcgen::SanType;
use rcgen::string::Ia5String;

use crate::PkiError;

/// Longest unit ID or manager name, in bytes. Unit IDs are also keys of the session map and
/// appear in every manager-side frame header, so they are kept short.
pub const MAX_IDENTITY_LEN: usize = 64;

/// Whether `id` is acceptable as a unit ID or manager name: 1..=64 bytes of printable ASCII
/// (0x21..=0x7E), i.e. no spaces, no control characters, nothing that needs escaping in a log
/// line or a certificate's CommonName.
pub fn is_valid_unit_id(id: &str) -> bool {
    identity_problem(id).is_none()
}

/// The one validator for unit IDs (and manager names) wherever they enter — enrollment,
/// the `devgate devices …` / `managers …` commands and manager control ops: `Err` carries one
/// line saying what is wrong, with the value shown escaped and shortened (it may hold a
/// newline or be thousands of characters long).
pub fn check_unit_id(kind: &str, id: &str) -> Result<(), String> {
    match identity_problem(id) {
        None => Ok(()),
        Some(why) => {
            let shown: String = id.chars().take(40).flat_map(char::escape_default).collect();
            let more = if id.chars().count() > 40 { "…" } else { "" };
            Err(format!(
                "invalid {kind} \"{shown}{more}\": {why} (a {kind} is 1-{MAX_IDENTITY_LEN} printable ASCII characters without spaces, e.g. 00:E0:C5:12:34:56)"
            ))
        }
    }
}

fn identity_problem(id: &str) -> Option<&'static str> {
    if id.is_empty() {
        Some("it is empty")
    } else if id.len() > MAX_IDENTITY_LEN {
        Some("it is longer than 64 bytes")
    } else if !id.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
        Some("it contains a space, a control character or a non-ASCII character")
    } else {
        None
    }
}

pub(crate) fn check_identity(kind: &'static str, id: &str) -> Result<(), PkiError> {
    match identity_problem(id) {
        None => Ok(()),
        Some(why) => Err(PkiError::InvalidIdentity {
            kind,
            value: id.to_owned(),
            why,
        }),
    }
}

/// `urn:devgate:<role>:<id>` with `id` percent-encoded where RFC 8141 does not allow the
/// character in a namespace-specific string. Unit IDs may contain any printable ASCII, and a
/// SAN URI that is not a valid URI makes some TLS stacks reject the whole certificate. The CN
/// keeps the identity verbatim; the URI is for tools that key on SANs.
pub(crate) fn identity_urn(role: &str, id: &str) -> Result<SanType, PkiError> {
    let mut urn = format!("urn:devgate:{role}:");
    for b in id.bytes() {
        let allowed = b.is_ascii_alphanumeric()
            || matches!(
                b,
                b'-' | b'.'
                    | b'_'
                    | b'~'
                    | b'!'
                    | b'$'
                    | b'&'
                    | b'\''
                    | b'('
                    | b')'
                    | b'*'
                    | b'+'
                    | b','
                    | b';'
                    | b'='
                    | b':'
                    | b'@'
            );
        if allowed {
            urn.push(char::from(b));
        } else {
            // Writing to a String cannot fail.
            let _ = write!(urn, "%{b:02X}");
        }
    }
    let ia5 = Ia5String::try_from(urn).map_err(|e| PkiError::Rcgen {
        what: format!("encode the {role} URI for {id:?}"),
        source: e,
    })?;
    Ok(SanType::URI(ia5))
}

/// Turns the operator's server names into SANs: IP literals become IP SANs, everything else
/// must be an RFC 1123 host name and becomes a DNS SAN. Duplicates are dropped (DNS names
/// compared case-insensitively), order is kept, so the first name stays the CN.
pub(crate) fn server_sans(names: &[String]) -> Result<Vec<SanType>, PkiError> {
    if names.is_empty() {
        return Err(PkiError::NoNames);
    }
    let mut out: Vec<SanType> = Vec::with_capacity(names.len());
    for name in names {
        let san = server_san(name)?;
        let duplicate = out.iter().any(|seen| match (seen, &san) {
            (SanType::DnsName(a), SanType::DnsName(b)) => {
                a.as_str().eq_ignore_ascii_case(b.as_str())
            }
            (a, b) => a == b,
        });
        if !duplicate {
            out.push(san);
        }
    }
    Ok(out)
}

fn server_san(name: &str) -> Result<SanType, PkiError> {
    if let Ok(ip) = name.parse::<IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    check_dns_name(name).map_err(|why| PkiError::InvalidName {
        name: name.to_owned(),
        why,
    })?;
    let ia5 = Ia5String::try_from(name).map_err(|e| PkiError::InvalidName {
        name: name.to_owned(),
        why: e.to_string(),
    })?;
    Ok(SanType::DnsName(ia5))
}

/// RFC 1123 host name check. Returns why the name is rejected, phrased for the operator.
fn check_dns_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("it is empty".into());
    }
    if name.trim() != name {
        return Err("it has leading or trailing whitespace".into());
    }
    if name.starts_with('[') && name.ends_with(']') {
        return Err("write IPv6 addresses without brackets, e.g. 2001:db8::1".into());
    }
    if name.contains('*') {
        return Err("wildcards are not supported; list every host name explicitly".into());
    }
    if name.ends_with('.') {
        return Err("remove the trailing dot".into());
    }
    if name.len() > 253 {
        return Err(format!(
            "it is {} characters long, at most 253 are allowed",
            name.len()
        ));
    }
    let mut last_label = "";
    for label in name.split('.') {
        if label.is_empty() {
            return Err("it has an empty label (a leading dot or two dots in a row)".into());
        }
        if label.len() > 63 {
            return Err(format!("label {label:?} is longer than 63 characters"));
        }
        if let Some(c) = label
            .chars()
            .find(|c| !c.is_ascii_alphanumeric() && *c != '-')
        {
            return Err(format!(
                "it contains {c:?}; only letters, digits, hyphens and dots are allowed"
            ));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(format!("label {label:?} starts or ends with a hyphen"));
        }
        last_label = label;
    }
    // A numeric top label means the operator meant an address, e.g. "10.0.0.256" or
    // "192.168.1"; a DNS SAN of that would never match what clients connect to.
    if last_label.bytes().all(|b| b.is_ascii_digit()) {
        return Err("it looks like an IPv4 address but is not a valid one".into());
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests fail loudly by design")]
mod tests {
    use super::*;

    #[test]
    fn dns_names() {
        for ok in [
            "gw",
            "gw.example.com",
            "a-b.c0",
            "xn--bcher-kva.example",
            "1gw.example",
        ] {
            assert!(check_dns_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            " gw",
            "*.example.com",
            "gw.example.com.",
            "-gw.example",
            "gw-.example",
            "gw..example",
            ".gw",
            "gw_1.example",
            "gw example",
            "10.0.0.256",
            "192.168.1",
            "[::1]",
            "bücher.example",
        ] {
            assert!(check_dns_name(bad).is_err(), "{bad}");
        }
        assert!(check_dns_name(&format!("{}.example", "a".repeat(64))).is_err());
        assert!(check_dns_name(&format!("{}.example", "a".repeat(63))).is_ok());
        let long = vec!["abcdefghi"; 26].join(".");
        assert!(long.len() > 253);
        assert!(check_dns_name(&long).is_err());
    }

    #[test]
    fn identities() {
        assert!(is_valid_unit_id("A"));
        assert!(is_valid_unit_id("unit-0001/%?#"));
        assert!(is_valid_unit_id(&"x".repeat(64)));
        assert!(!is_valid_unit_id(&"x".repeat(65)));
        assert!(!is_valid_unit_id(""));
        assert!(!is_valid_unit_id("a b"));
        assert!(!is_valid_unit_id("a\u{7f}"));
        assert!(!is_valid_unit_id("ä"));
    }

    #[test]
    fn urn_escapes_what_rfc8141_forbids() {
        let SanType::URI(u) = identity_urn("device", "ab/c%d?e#f:g").unwrap() else {
            panic!("not a URI SAN");
        };
        assert_eq!(u.as_str(), "urn:devgate:device:ab%2Fc%25d%3Fe%23f:g");
    }

    #[test]
    fn server_sans_dedupe_and_classify() {
        let names: Vec<String> = ["gw.example", "GW.example", "10.0.0.1", "::1", "10.0.0.1"]
            .map(String::from)
            .to_vec();
        let sans = server_sans(&names).unwrap();
        assert_eq!(sans.len(), 3);
        assert!(matches!(sans[0], SanType::DnsName(_)));
        assert!(matches!(sans[1], SanType::IpAddress(IpAddr::V4(_))));
        assert!(matches!(sans[2], SanType::IpAddress(IpAddr::V6(_))));
        assert!(matches!(server_sans(&[]), Err(PkiError::NoNames)));
    }
}
