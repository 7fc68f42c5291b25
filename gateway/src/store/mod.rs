//! The credential store: first-authentication keys (hashed), the device registry,
//! revocations and manager pairing tokens.
//!
//! [`Store`] is the seam: SQLite ([`sqlite::SqliteStore`], in the data dir) is the
//! default; PostgreSQL ([`postgres::PgStore`], `[store] url`) is the store several
//! instances of one fleet share. Store calls block (disk, fsync), so the data path never makes
//! them: it hands enrollment and key management to the control plane's store thread.
//!
//! Secrets are never stored or logged: a key is kept as a salted SHA-256 hash, found by a
//! separate lookup id derived from it, and compared in constant time.

#[doc(hidden)]
pub mod contract;
pub mod postgres;
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
    /// When the unit was last reset (`devices reset`, or `devices unrevoke`); while
    /// `cert_fingerprint` is empty it has no valid certificate and may enroll again with a
    /// key bound to it and created since.
    pub reset_at: Option<i64>,
    /// The certificate replaced by the last renewal, valid until `previous_until` or until
    /// the new one is first used.
    pub previous_fingerprint: Option<String>,
    /// End of the renewal overlap (unix seconds).
    pub previous_until: Option<i64>,
}

/// Which certificates the gateway accepts for one unit in the registry (mirrored into
/// memory for the workers; see `devgate_core::identity`).
pub use devgate_core::identity::DeviceCreds;

/// A change of accepted certificates, from the store's change log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CredChange {
    /// A unit's accepted certificates changed (enroll, renew, issue, reset, revoke).
    Device(String),
    /// A manager name's accepted certificates changed.
    Manager(String),
    /// A certificate (this SHA-256) was revoked.
    Cert(String),
}

/// A recorded manager certificate (`devgate managers list`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct ManagerCert {
    /// Manager name (the certificate's CN).
    pub name: String,
    /// SHA-256 of the certificate; `None` for the placeholder that `managers revoke NAME`
    /// records for a name without recorded certificates.
    pub fingerprint: Option<String>,
    /// When it was issued or recorded (unix seconds).
    pub issued_at: i64,
    /// When it was revoked.
    pub revoked_at: Option<i64>,
    /// `init`, `issue`, `pair` or `migrated`.
    pub source: String,
}

/// What [`Store::fleet_sync`] reads back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FleetView {
    /// Devices on the other instances (those that reported recently).
    pub devices_elsewhere: u64,
    /// The fleet's device limit (0 = unlimited), if one was ever set through the store.
    pub limit: Option<u64>,
}

/// Outcome of revoking a unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnitRevocation {
    /// Revoked now.
    Revoked,
    /// It already was.
    AlreadyRevoked,
    /// The registry has no such unit.
    Unknown,
}

/// A peer's acknowledgement of a trust bundle (root exchange).
#[derive(Debug, Clone)]
pub struct TrustAck {
    /// The bundle id it acknowledged (`devgate_pki::bundle_id`).
    pub bundle: Box<str>,
    /// `"device"` or `"manager"`.
    pub kind: &'static str,
    /// Unit ID or manager name.
    pub name: std::sync::Arc<str>,
}

pub use devgate_core::shared::TrustProgress;

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
    /// The unit is already enrolled: only `devgate devices reset`, renewal over mutual TLS
    /// or the lost-answer retry (see [`Store::enroll`]) give it a new credential.
    AlreadyEnrolled,
    /// The unit was reset (or its revocation lifted): only a key bound to it and created
    /// at or after the reset may enroll it.
    ResetNeedsBoundKey,
    /// Renewal: the presented certificate is not the unit's current one.
    NotCurrent,
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
            Self::AlreadyEnrolled => "already_enrolled",
            Self::ResetNeedsBoundKey => "reset_needs_bound_key",
            Self::NotCurrent => "not_current_certificate",
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
    /// `"sqlite"` or `"postgres"` (status, logs).
    fn kind(&self) -> &'static str;
    /// Where it is: the database file, or `user@host:port/db` (never a password).
    fn location(&self) -> String;
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
    /// commit) and retries with a new key pair. Another unit never gets it, and only while
    /// the certificate of that enrollment has never connected (a device that saw its
    /// answer connects at once; after that the key cannot replace the credential).
    ///
    /// A unit already in the registry is refused ([`RefusalReason::AlreadyEnrolled`])
    /// unless it was reset, and then only with a key bound to it and created since the
    /// reset ([`RefusalReason::ResetNeedsBoundKey`]).
    fn enroll(
        &self,
        secret: &str,
        unit: &str,
        cert_fingerprint: &str,
        now: i64,
        retry_window_secs: i64,
    ) -> Result<KeyCheck, StoreError>;
    /// Registers (or re-registers) a device credential issued offline: it becomes the
    /// unit's only accepted certificate (an operator action, so it may replace an enrolled
    /// unit's credential).
    fn register_device(
        &self,
        unit: &str,
        cert_fingerprint: &str,
        now: i64,
    ) -> Result<(), StoreError>;
    /// Renewal: `presented` must be the unit's current certificate (the device proved
    /// possession over mutual TLS); `new_fingerprint` becomes current and `presented` stays
    /// valid until `now + overlap_secs` or until the new one is first used.
    fn renew(
        &self,
        unit: &str,
        presented: &str,
        new_fingerprint: &str,
        now: i64,
        overlap_secs: i64,
    ) -> Result<KeyCheck, StoreError>;
    /// Records that a connection presented `fingerprint`, the unit's current certificate:
    /// ends the renewal overlap and the lost-answer retry.
    fn mark_cert_used(&self, unit: &str, fingerprint: &str, now: i64) -> Result<(), StoreError>;
    /// Resets an enrolled unit: no certificate of it is accepted any more, and it may
    /// enroll again with a key bound to it and created since. False if the registry has no
    /// such unit.
    fn reset_device(&self, unit: &str, now: i64) -> Result<bool, StoreError>;
    /// Revokes a unit and, by certificate, its current and previous certificates.
    fn revoke_device(&self, unit: &str, now: i64) -> Result<UnitRevocation, StoreError>;
    /// Lifts a unit's revocation and leaves it reset (its certificates stay revoked); false
    /// if it was not revoked.
    fn unrevoke_device(&self, unit: &str, now: i64) -> Result<bool, StoreError>;
    /// Revokes one certificate (device or manager) by SHA-256; false if it already was.
    fn revoke_cert(&self, fingerprint: &str, now: i64) -> Result<bool, StoreError>;
    /// All revoked certificate fingerprints.
    fn revoked_certs(&self) -> Result<Vec<String>, StoreError>;
    /// Changes of accepted certificates with a sequence number above `after`, and the
    /// highest one.
    fn cred_changes_since(&self, after: i64) -> Result<(Vec<CredChange>, i64), StoreError>;
    /// The highest sequence number of the change log (0 if empty).
    fn cred_change_head(&self) -> Result<i64, StoreError>;
    /// Accepted certificates of one unit; `None` if the registry has no such unit.
    fn device_creds(&self, unit: &str) -> Result<Option<DeviceCreds>, StoreError>;
    /// Accepted certificates of every unit in the registry.
    fn all_device_creds(&self) -> Result<Vec<(String, DeviceCreds)>, StoreError>;
    /// Records an issued manager certificate (idempotent per fingerprint).
    fn record_manager_cert(
        &self,
        name: &str,
        fingerprint: &str,
        now: i64,
        source: &str,
    ) -> Result<(), StoreError>;
    /// Every recorded manager certificate, by name then issue time.
    fn manager_certs(&self) -> Result<Vec<ManagerCert>, StoreError>;
    /// Revokes every certificate of manager `name` (and keeps the name known, so that a
    /// certificate never recorded is refused too); returns how many were revoked.
    fn revoke_manager(&self, name: &str, now: i64) -> Result<usize, StoreError>;
    /// Unrevoked certificates of manager `name`; `None` if nothing is recorded under it.
    fn manager_creds(&self, name: &str) -> Result<Option<Vec<String>>, StoreError>;
    /// Unrevoked certificates of every recorded manager name.
    fn all_manager_creds(&self) -> Result<Vec<(String, Vec<String>)>, StoreError>;
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
    /// Records acknowledgements of trust bundles (one transaction for the batch; a repeat
    /// keeps the first time).
    fn record_trust_acks(&self, acks: &[TrustAck], now: i64) -> Result<(), StoreError>;
    /// Who acknowledged trust bundle `bundle`.
    fn trust_progress(&self, bundle: &str) -> Result<TrustProgress, StoreError>;
    /// A cheap liveness check for status.
    fn health(&self) -> Result<(), StoreError>;
    /// The fleet-wide device limit's exchange, once a second per instance: records that
    /// `instance` holds `devices` now, sets the fleet's limit to `set_limit` if given (a
    /// manager changed it on this instance), and returns the devices of the other
    /// instances seen within `fresh_secs` and the fleet's limit (`None` if never set).
    fn fleet_sync(
        &self,
        instance: &str,
        devices: u64,
        set_limit: Option<u64>,
        now: i64,
        fresh_secs: i64,
    ) -> Result<FleetView, StoreError> {
        let _ = (instance, devices, set_limit, now, fresh_secs);
        Err(StoreError(format!(
            "a fleet-wide device limit needs the PostgreSQL store, not {}",
            self.kind()
        )))
    }
}

/// Opens the store a configuration names: PostgreSQL when `[store] url` is set, else the
/// SQLite file in `data_dir`.
pub fn open(
    url: Option<&str>,
    data_dir: &std::path::Path,
) -> Result<std::sync::Arc<dyn Store>, StoreError> {
    Ok(match url {
        Some(url) => std::sync::Arc::new(postgres::PgStore::open(url)?),
        None => std::sync::Arc::new(sqlite::SqliteStore::open(data_dir)?),
    })
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
