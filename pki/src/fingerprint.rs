//! The root fingerprint in the form people compare on a device screen.

use std::path::Path;

use sha2::{Digest as _, Sha256};

use crate::{PkiError, load_certs};

/// SHA-256 of the certificate DER as 64 UPPERCASE hex digits in four groups of 16 separated by
/// single spaces, e.g. `0123456789ABCDEF 0123456789ABCDEF 0123456789ABCDEF 0123456789ABCDEF`.
///
/// This is the digest `openssl x509 -fingerprint -sha256` prints, regrouped.
pub fn fingerprint(cert_der: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let digest = Sha256::digest(cert_der);
    let mut out = String::with_capacity(64 + 3);
    for (i, b) in digest.iter().enumerate() {
        if i > 0 && i % 8 == 0 {
            out.push(' ');
        }
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 0x0f)]));
    }
    out
}

/// The id of a trust bundle: the first 16 bytes of SHA-256 over the roots' DER, in order, as
/// 32 lower-case hex digits. The gateway puts it in the trust bundle frame and peers echo it in
/// their acknowledgement, so an acknowledgement names exactly the roots it is for.
pub fn bundle_id<C: AsRef<[u8]>>(roots: &[C]) -> String {
    let mut h = Sha256::new();
    for root in roots {
        h.update(root.as_ref());
    }
    h.finalize()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// SHA-256 of the certificate DER as raw bytes (the gateway's in-memory form of
/// [`fingerprint`]).
pub fn fingerprint_bytes(cert_der: &[u8]) -> [u8; 32] {
    Sha256::digest(cert_der).into()
}

/// Parses a SHA-256 fingerprint as people paste it: 64 hex digits, upper or lower case,
/// optionally separated by spaces or colons (the [`fingerprint`] form, `openssl x509
/// -fingerprint -sha256`'s `AB:CD:…` form, or `sha256sum`'s plain hex). `None` if it is not
/// exactly 32 bytes of hex.
pub fn parse_fingerprint(text: &str) -> Option<[u8; 32]> {
    let text = text.trim();
    let text = text
        .strip_prefix("sha256:")
        .or_else(|| text.strip_prefix("SHA256:"))
        .or_else(|| text.strip_prefix("sha256 Fingerprint="))
        .unwrap_or(text);
    let mut out = [0u8; 32];
    let mut n = 0usize;
    let mut high: Option<u8> = None;
    for c in text.chars() {
        if matches!(c, ' ' | ':' | '\t') {
            continue;
        }
        let v = u8::try_from(c.to_digit(16)?).ok()?;
        match high.take() {
            None => high = Some(v),
            Some(h) => {
                *out.get_mut(n)? = (h << 4) | v;
                n += 1;
            }
        }
    }
    (n == 32 && high.is_none()).then_some(out)
}

/// The [`fingerprint`] form of raw SHA-256 bytes.
pub fn format_fingerprint(digest: &[u8; 32]) -> String {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut out = String::with_capacity(64 + 3);
    for (i, b) in digest.iter().enumerate() {
        if i > 0 && i % 8 == 0 {
            out.push(' ');
        }
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 0x0f)]));
    }
    out
}

/// Fingerprint of the first certificate in a PEM file.
pub fn fingerprint_file(pem_path: &Path) -> Result<String, PkiError> {
    let certs = load_certs(pem_path)?;
    // load_certs never returns an empty list, but an empty slice must not panic here either.
    let first = certs.first().ok_or_else(|| PkiError::Pem {
        path: pem_path.to_owned(),
        why: "no certificate found".into(),
    })?;
    Ok(fingerprint(first))
}

/// The device-side first-contact check: the person is shown three of the four groups and types
/// the missing one. `candidate` is the full fingerprint string with exactly one group replaced
/// by the user's input; compare case-insensitively, ignoring surrounding whitespace.
///
/// Fails closed: false if `expected` is not a well-formed fingerprint, if the candidate does
/// not have exactly four groups (e.g. the person typed a space inside the group) or if any group
/// differs.
pub fn fingerprint_matches(expected: &str, candidate: &str) -> bool {
    let Some(expected) = groups(expected) else {
        return false;
    };
    // Splitting on whitespace ignores whitespace around the typed group and around the whole
    // string; spaces inside a group produce a fifth group and fail the check.
    let mut typed = candidate.split_whitespace();
    let all_equal = expected.iter().all(|want| {
        typed
            .next()
            .is_some_and(|got| got.eq_ignore_ascii_case(want))
    });
    all_equal && typed.next().is_none()
}

fn groups(fp: &str) -> Option<[&str; 4]> {
    let mut it = fp.split_whitespace();
    let mut out = [""; 4];
    for slot in &mut out {
        let g = it.next()?;
        if g.len() != 16 || !g.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        *slot = g;
    }
    it.next().is_none().then_some(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests fail loudly by design")]
mod tests {
    use super::*;

    #[test]
    fn format() {
        let fp = fingerprint(b"abc");
        // SHA-256("abc"), FIPS 180-2 test vector.
        assert_eq!(
            fp,
            "BA7816BF8F01CFEA 414140DE5DAE2223 B00361A396177A9C B410FF61F20015AD"
        );
    }

    #[test]
    fn parse_and_format_round_trip() {
        let fp = fingerprint(b"abc");
        let raw = parse_fingerprint(&fp).unwrap();
        assert_eq!(raw, fingerprint_bytes(b"abc"));
        assert_eq!(format_fingerprint(&raw), fp);
        let colons = raw
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":");
        assert_eq!(parse_fingerprint(&colons), Some(raw));
        assert_eq!(parse_fingerprint(&fp.replace(' ', "")), Some(raw));
        assert_eq!(parse_fingerprint(&fp[..60]), None);
        assert_eq!(parse_fingerprint(&format!("{fp}0")), None);
        assert_eq!(parse_fingerprint("zz"), None);
    }

    #[test]
    fn typed_group_in_any_position() {
        let fp = fingerprint(b"abc");
        let parts: Vec<&str> = fp.split(' ').collect();
        for i in 0..4 {
            let mut shown: Vec<String> = parts.iter().map(|s| s.to_string()).collect();
            shown[i] = format!("  {}\t", parts[i].to_ascii_lowercase());
            let candidate = shown.join(" ");
            assert!(
                fingerprint_matches(&fp, &candidate),
                "group {i}: {candidate:?}"
            );

            let mut wrong = parts.iter().map(|s| s.to_string()).collect::<Vec<_>>();
            wrong[i] = "0000000000000000".into();
            assert!(!fingerprint_matches(&fp, &wrong.join(" ")), "group {i}");

            let mut short = parts.iter().map(|s| s.to_string()).collect::<Vec<_>>();
            short[i].pop();
            assert!(!fingerprint_matches(&fp, &short.join(" ")), "group {i}");

            let mut split = parts.iter().map(|s| s.to_string()).collect::<Vec<_>>();
            split[i].insert(8, ' ');
            assert!(!fingerprint_matches(&fp, &split.join(" ")), "group {i}");
        }
        assert!(fingerprint_matches(&fp, &format!(" {fp}\n")));
        assert!(!fingerprint_matches(&fp, ""));
        assert!(!fingerprint_matches(&fp, &format!("{fp} 00")));
        assert!(!fingerprint_matches("garbage", "garbage"));
    }
}
