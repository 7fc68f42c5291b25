//! The credential store: first-authentication keys (hashed), the device registry,
//! revocations and manager pairing tokens.
//!
//! [`Store`] is the seam: SQLite ([`sqlite::SqliteStore`], in the data dir) is the
//! default; a PostgreSQL implementation for several instances sharing one fleet plugs in
//! behind the same trait. Store calls block (disk, fsync), so the data path never makes
//! them: it hands enrollment and key management to the control plane's store thread.
//!
//! Secrets are never stored or logged: a key is kept as a salted SHA-256 hash, found by a
//! separate lookup id derived from it, and compared in constant time.

pub mod sqlite;

use std::fmt;

use rand::Rng;
use sha2::{Digest, Sha256};

/// The three kinds of first-authentication key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    /// Usable once, by any one device.
    OneTime,
    /// Usable once, only by the named unit ID.
    Bound,
    /// Mass deployment: usable by any number of devices until revoked or expired.
    Multi,
}

impl KeyKind {
    /// Name stored and printed.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::OneTime => "one-time",
            Self::Bound => "bound",
            Self::Multi => "multi",
        }
    }

    /// Parses a stored name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "one-time" => Some(Self::OneTime),
            "bound" => Some(Self::Bound),
            "multi" => Some(Self::Multi),
            _ => None,
        }
    }
}

/// A key to create (the secret itself is only in the caller's hands).
#[derive(Debug, Clone)]
pub struct NewKey {
    /// Lookup id (derived from the secret; not secret itself).
    pub id: String,
    /// Random salt.
    pub salt: [u8; 16],
    /// SHA-256(salt ‖ normalised secret).
    pub hash: [u8; 32],
    /// Kind.
    pub kind: KeyKind,
    /// The unit ID a bound key is for.
    pub unit: Option<String>,
    /// Expiry (unix seconds), if any.
    pub expires_at: Option<i64>,
    /// Creation time (unix seconds).
    pub created_at: i64,
}

/// What `keys list` shows about a key (never the secret or its hash).
#[derive(Debug, Clone, serde::Serialize)]
pub struct KeyInfo {
    /// Lookup id.
    pub id: String,
    /// Kind name.
    pub kind: &'static str,
    /// Bound unit ID.
    pub unit: Option<String>,
    /// Creation time (unix seconds).
    pub created_at: i64,
    /// Expiry (unix seconds).
    pub expires_at: Option<i64>,
    /// When revoked.
    pub revoked_at: Option<i64>,
    /// Enrollments made with it.
    pub uses: u64,
    /// For one-time and bound keys: the unit that used it.
    pub used_by: Option<String>,
}

/// A device in the registry.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DeviceRecord {
    /// Unit ID.
    pub unit: String,
    /// SHA-256 of the device's current certificate.
    pub cert_fingerprint: String,
    /// First enrollment (unix seconds).
    pub enrolled_at: i64,
    /// Last (re-)enrollment (unix seconds).
    pub updated_at: i64,
    /// Revocation time, if revoked.
    pub revoked_at: Option<i64>,
}

/// Outcome of presenting a key for enrollment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyCheck {
    /// Accepted; for one-time keys it is now consumed, and the enrollment is recorded.
    Accepted,
    /// Refused: unknown, wrong secret, wrong unit, expired, revoked, already used, or the
    /// unit is revoked. Deliberately one value: the device is never told which.
    Refused(RefusalReason),
}

/// Why a key was refused — for the operator's log and metrics only, never for the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusalReason {
    /// No key with this id, or the secret does not match.
    UnknownKey,
    /// A bound key presented by another unit.
    WrongUnit,
    /// Past its expiry.
    Expired,
    /// Revoked by the operator.
    Revoked,
    /// A one-time key already used by another unit.
    AlreadyUsed,
    /// The unit itself is revoked.
    UnitRevoked,
}

impl RefusalReason {
    /// Name for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::UnknownKey => "unknown_key",
            Self::WrongUnit => "wrong_unit",
            Self::Expired => "expired",
            Self::Revoked => "revoked",
            Self::AlreadyUsed => "already_used",
            Self::UnitRevoked => "unit_revoked",
        }
    }
}

/// A store failure (disk, corruption, schema); carries what to check.
#[derive(Debug, thiserror::Error)]
#[error("store: {0}")]
pub struct StoreError(pub String);

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        Self(e.to_string())
    }
}

/// The credential store (see the module docs).
pub trait Store: Send + Sync + fmt::Debug {
    /// Adds keys.
    fn create_keys(&self, keys: &[NewKey]) -> Result<(), StoreError>;
    /// All keys, newest first.
    fn list_keys(&self) -> Result<Vec<KeyInfo>, StoreError>;
    /// One page of keys, newest first: at most `limit` keys created before the position
    /// `before` (from the newest without one), and the position to continue from if more
    /// keys follow. Positions are opaque to callers (`list_keys`' cursor); each page costs
    /// an index walk of `limit` rows, not a scan of the table.
    fn list_keys_page(
        &self,
        before: Option<i64>,
        limit: usize,
    ) -> Result<(Vec<KeyInfo>, Option<i64>), StoreError>;
    /// Revokes a key by id; false if there is no such key.
    fn revoke_key(&self, id: &str, now: i64) -> Result<bool, StoreError>;
    /// Checks `secret` for `unit` and, if it is accepted, consumes it (one-time kinds) and
    /// records the enrollment with `cert_fingerprint` — all in one transaction, so that
    /// two racing devices cannot both win and a crash leaves either both or neither.
    ///
    /// A one-time key already consumed by the *same* unit within `retry_window_secs` is
    /// accepted again: the device lost the response (e.g. the gateway crashed after the
    /// commit) and retries with a new key pair. Another unit never gets it.
    fn enroll(
        &self,
        secret: &str,
        unit: &str,
        cert_fingerprint: &str,
        now: i64,
        retry_window_secs: i64,
    ) -> Result<KeyCheck, StoreError>;
    /// Registers (or re-registers) a device credential issued offline.
    fn register_device(
        &self,
        unit: &str,
        cert_fingerprint: &str,
        now: i64,
    ) -> Result<(), StoreError>;
    /// Revokes a unit; false if it was already revoked.
    fn revoke_device(&self, unit: &str, now: i64) -> Result<bool, StoreError>;
    /// Lifts a unit's revocation; false if it was not revoked.
    fn unrevoke_device(&self, unit: &str) -> Result<bool, StoreError>;
    /// Revoked units with a revocation sequence number above `after`, and the highest one.
    fn revocations_since(&self, after: i64) -> Result<(Vec<String>, i64), StoreError>;
    /// The device registry.
    fn devices(&self) -> Result<Vec<DeviceRecord>, StoreError>;
    /// Adds a manager pairing token (hashed like keys).
    fn create_pairing_token(&self, key: &NewKey) -> Result<(), StoreError>;
    /// Consumes a pairing token for manager `name`; true if it was valid and unused.
    fn pair_manager(
        &self,
        token: &str,
        name: &str,
        cert_fingerprint: &str,
        now: i64,
    ) -> Result<bool, StoreError>;
    /// A cheap liveness check for status.
    fn health(&self) -> Result<(), StoreError>;
}

/// Characters of generated keys: Crockford's base32 (no I, L, O, U: nothing to misread
/// when a person types the key at a device).
const ALPHABET: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";

/// A new random key, `XXXX-XXXX-XXXX-XXXX-XXXX` (100 bits).
pub fn generate_secret() -> String {
    let mut rng = rand::rng();
    let chars: Vec<char> = (0..20)
        .map(|_| char::from(ALPHABET[rng.random_range(0..ALPHABET.len())]))
        .collect();
    chars
        .chunks(4)
        .map(|c| c.iter().collect::<String>())
        .collect::<Vec<_>>()
        .join("-")
}

/// The canonical form a secret is hashed in: upper case, without separators, with the
/// look-alike letters a person may type mapped to the digits they stand for.
pub fn normalise_secret(secret: &str) -> String {
    secret
        .chars()
        .filter(|c| !matches!(c, '-' | ' ' | '\t'))
        .map(|c| match c.to_ascii_uppercase() {
            'O' => '0',
            'I' | 'L' => '1',
            other => other,
        })
        .collect()
}

/// The lookup id of a secret (not secret: a hash prefix, 16 hex digits).
pub fn key_id(secret: &str) -> String {
    let mut h = Sha256::new();
    h.update(b"devgate key id v1\0");
    h.update(normalise_secret(secret).as_bytes());
    h.finalize()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Salted hash of a secret.
pub fn hash_secret(salt: &[u8; 16], secret: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(salt);
    h.update(normalise_secret(secret).as_bytes());
    h.finalize().into()
}

/// A [`NewKey`] for `secret`.
pub fn new_key(
    secret: &str,
    kind: KeyKind,
    unit: Option<String>,
    expires_at: Option<i64>,
    now: i64,
) -> NewKey {
    let salt: [u8; 16] = rand::rng().random();
    NewKey {
        id: key_id(secret),
        salt,
        hash: hash_secret(&salt, secret),
        kind,
        unit,
        expires_at,
        created_at: now,
    }
}

/// Constant-time comparison of two hashes.
pub fn hashes_equal(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Parses an expiry given on the command line or in a control request: a duration
/// (`90s`, `30m`, `12h`, `7d`) from `now`, or an RFC 3339 time.
pub fn parse_expiry(text: &str, now: i64) -> Result<i64, String> {
    let text = text.trim();
    if let Some(num) = text.strip_suffix(['s', 'm', 'h', 'd']) {
        let unit = match text.chars().last() {
            Some('s') => 1,
            Some('m') => 60,
            Some('h') => 3600,
            _ => 86_400,
        };
        let n: i64 = num.parse().map_err(|_| {
            format!("expiry \"{text}\": expected e.g. 90s, 30m, 12h, 7d or an RFC 3339 time")
        })?;
        if n <= 0 {
            return Err(format!("expiry \"{text}\" must be in the future"));
        }
        return Ok(now.saturating_add(n.saturating_mul(unit)));
    }
    let t = time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .map_err(|e| {
            format!("expiry \"{text}\": {e} (expected e.g. 7d or 2027-01-31T00:00:00Z)")
        })?;
    let ts = t.unix_timestamp();
    if ts <= now {
        return Err(format!("expiry \"{text}\" is in the past"));
    }
    Ok(ts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_secrets_have_the_typed_form_and_normalise() {
        let s = generate_secret();
        assert_eq!(s.len(), 24);
        assert_eq!(s.matches('-').count(), 4);
        assert_eq!(key_id(&s), key_id(&s.to_lowercase().replace('-', " ")));
        assert_eq!(normalise_secret("ab-cd o1"), "ABCD01");
        assert_eq!(normalise_secret("IL"), "11");
    }

    #[test]
    fn hashes_depend_on_salt_and_secret() {
        let a = hash_secret(&[1; 16], "K1");
        assert!(hashes_equal(&a, &hash_secret(&[1; 16], "k1")));
        assert!(!hashes_equal(&a, &hash_secret(&[2; 16], "K1")));
        assert!(!hashes_equal(&a, &hash_secret(&[1; 16], "K2")));
    }

    #[test]
    fn expiry_parsing() {
        assert_eq!(parse_expiry("7d", 1000), Ok(1000 + 7 * 86_400));
        assert_eq!(parse_expiry("90s", 0), Ok(90));
        assert!(parse_expiry("-1h", 0).is_err());
        assert!(parse_expiry("soon", 0).is_err());
        assert_eq!(parse_expiry("2030-01-01T00:00:00Z", 0), Ok(1_893_456_000));
        assert!(parse_expiry("2000-01-01T00:00:00Z", 1_000_000_000).is_err());
    }
}
