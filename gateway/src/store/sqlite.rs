//! The SQLite store (`<data_dir>/devgate.db`): WAL journal, `synchronous=FULL` (a
//! consumed one-time key stays consumed across a crash or power cut), schema migrations
//! by `user_version`, and `BEGIN IMMEDIATE` transactions so that racing enrollments —
//! from two workers or two gateway processes on one data dir — serialise.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

use super::{
    DeviceRecord, KeyCheck, KeyInfo, KeyKind, NewKey, RefusalReason, Store, StoreError,
    hash_secret, hashes_equal, key_id,
};

/// Schema migrations; `user_version` is the number applied.
const MIGRATIONS: &[&str] = &[
    // 1: keys, device registry, revocation log, manager pairing.
    "CREATE TABLE keys (
        id TEXT PRIMARY KEY,
        salt BLOB NOT NULL,
        hash BLOB NOT NULL,
        kind TEXT NOT NULL,
        unit TEXT,
        created_at INTEGER NOT NULL,
        expires_at INTEGER,
        revoked_at INTEGER,
        uses INTEGER NOT NULL DEFAULT 0,
        used_by TEXT,
        used_at INTEGER
    );
    CREATE TABLE devices (
        unit TEXT PRIMARY KEY,
        cert_fingerprint TEXT NOT NULL,
        enrolled_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL,
        key_id TEXT
    );
    CREATE TABLE revocations (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        unit TEXT NOT NULL,
        revoked INTEGER NOT NULL,
        at INTEGER NOT NULL
    );
    CREATE INDEX revocations_unit ON revocations(unit, seq);
    CREATE TABLE pairing_tokens (
        id TEXT PRIMARY KEY,
        salt BLOB NOT NULL,
        hash BLOB NOT NULL,
        created_at INTEGER NOT NULL,
        expires_at INTEGER,
        used_by TEXT,
        used_at INTEGER
    );
    CREATE TABLE managers (
        name TEXT PRIMARY KEY,
        cert_fingerprint TEXT NOT NULL,
        paired_at INTEGER NOT NULL
    );",
];

/// The SQLite implementation of [`Store`].
#[derive(Debug)]
pub struct SqliteStore {
    path: PathBuf,
    conn: Mutex<Connection>,
}

impl SqliteStore {
    /// The database file in a data dir.
    pub fn path_in(data_dir: &Path) -> PathBuf {
        data_dir.join("devgate.db")
    }

    /// Opens (creating and migrating if needed) the store in `data_dir`.
    pub fn open(data_dir: &Path) -> Result<Self, StoreError> {
        let path = Self::path_in(data_dir);
        // Create the file 0600 before SQLite does (it would use 0644 minus the umask, and
        // its -wal and -shm files copy the database's mode): it holds key hashes.
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            let _ = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(&path);
        }
        let conn = Connection::open(&path)
            .map_err(|e| StoreError(format!("cannot open {}: {e}", path.display())))?;
        conn.busy_timeout(Duration::from_secs(10))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        migrate(&conn)
            .map_err(|e| StoreError(format!("{}: migration failed: {}", path.display(), e.0)))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600));
        }
        Ok(Self {
            path,
            conn: Mutex::new(conn),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Whether the latest revocation event of `unit` revokes it.
fn is_revoked(conn: &Connection, unit: &str) -> Result<bool, StoreError> {
    Ok(conn
        .query_row(
            "SELECT revoked FROM revocations WHERE unit = ?1 ORDER BY seq DESC LIMIT 1",
            params![unit],
            |r| r.get::<_, i64>(0),
        )
        .optional()?
        .is_some_and(|r| r != 0))
}

fn migrate(conn: &Connection) -> Result<(), StoreError> {
    let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    let known = i64::try_from(MIGRATIONS.len()).unwrap_or(i64::MAX);
    if version > known {
        return Err(StoreError(format!(
            "the database has schema version {version}, newer than this devgate knows ({known}); run the newer devgate or restore a backup"
        )));
    }
    for (i, sql) in MIGRATIONS
        .iter()
        .enumerate()
        .skip(usize::try_from(version).unwrap_or(0))
    {
        let tx = conn.unchecked_transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(
            None,
            "user_version",
            i64::try_from(i + 1).unwrap_or(i64::MAX),
        )?;
        tx.commit()?;
    }
    Ok(())
}

impl Store for SqliteStore {
    fn create_keys(&self, keys: &[NewKey]) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        for k in keys {
            tx.execute(
                "INSERT INTO keys (id, salt, hash, kind, unit, created_at, expires_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![k.id, &k.salt[..], &k.hash[..], k.kind.as_str(), k.unit, k.created_at, k.expires_at],
            )
            .map_err(|e| match e {
                rusqlite::Error::SqliteFailure(f, _) if f.code == rusqlite::ErrorCode::ConstraintViolation => {
                    StoreError("a key with this value already exists; choose another value".into())
                }
                other => other.into(),
            })?;
        }
        tx.commit()?;
        Ok(())
    }

    fn list_keys(&self) -> Result<Vec<KeyInfo>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT id, kind, unit, created_at, expires_at, revoked_at, uses, used_by FROM keys ORDER BY created_at DESC, id",
        )?;
        let rows = stmt.query_map([], |r| {
            let kind: String = r.get(1)?;
            Ok(KeyInfo {
                id: r.get(0)?,
                kind: KeyKind::parse(&kind).map_or("unknown", KeyKind::as_str),
                unit: r.get(2)?,
                created_at: r.get(3)?,
                expires_at: r.get(4)?,
                revoked_at: r.get(5)?,
                uses: r.get::<_, i64>(6)?.try_into().unwrap_or(0),
                used_by: r.get(7)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn list_keys_page(
        &self,
        before: Option<i64>,
        limit: usize,
    ) -> Result<(Vec<KeyInfo>, Option<i64>), StoreError> {
        // Keyset paging on the rowid (insertion order, so newest first): one B-tree walk
        // per page however many keys there are, and stable while keys are added (keys
        // are never deleted and the store never VACUUMs, the two things that could
        // renumber rowids under a cursor).
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT rowid, id, kind, unit, created_at, expires_at, revoked_at, uses, used_by FROM keys WHERE rowid < ?1 ORDER BY rowid DESC LIMIT ?2",
        )?;
        let fetch = i64::try_from(limit.saturating_add(1)).unwrap_or(i64::MAX);
        let rows = stmt.query_map(params![before.unwrap_or(i64::MAX), fetch], |r| {
            let kind: String = r.get(2)?;
            Ok((
                r.get::<_, i64>(0)?,
                KeyInfo {
                    id: r.get(1)?,
                    kind: KeyKind::parse(&kind).map_or("unknown", KeyKind::as_str),
                    unit: r.get(3)?,
                    created_at: r.get(4)?,
                    expires_at: r.get(5)?,
                    revoked_at: r.get(6)?,
                    uses: r.get::<_, i64>(7)?.try_into().unwrap_or(0),
                    used_by: r.get(8)?,
                },
            ))
        })?;
        let mut page: Vec<(i64, KeyInfo)> = rows.collect::<Result<_, _>>()?;
        // One row more than asked for tells whether another page follows.
        let more = page.len() > limit;
        page.truncate(limit);
        let next = if more {
            page.last().map(|(rowid, _)| *rowid)
        } else {
            None
        };
        Ok((page.into_iter().map(|(_, k)| k).collect(), next))
    }

    fn revoke_key(&self, id: &str, now: i64) -> Result<bool, StoreError> {
        let n = self.conn().execute(
            "UPDATE keys SET revoked_at = COALESCE(revoked_at, ?2) WHERE id = ?1",
            params![id, now],
        )?;
        Ok(n > 0)
    }

    fn enroll(
        &self,
        secret: &str,
        unit: &str,
        cert_fingerprint: &str,
        now: i64,
        retry_window_secs: i64,
    ) -> Result<KeyCheck, StoreError> {
        let id = key_id(secret);
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let unit_revoked = is_revoked(&tx, unit)?;
        let row = tx
            .query_row(
                "SELECT salt, hash, kind, unit, expires_at, revoked_at, used_by, used_at FROM keys WHERE id = ?1",
                params![id],
                |r| {
                    Ok((
                        r.get::<_, Vec<u8>>(0)?,
                        r.get::<_, Vec<u8>>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, Option<String>>(3)?,
                        r.get::<_, Option<i64>>(4)?,
                        r.get::<_, Option<i64>>(5)?,
                        r.get::<_, Option<String>>(6)?,
                        r.get::<_, Option<i64>>(7)?,
                    ))
                },
            )
            .optional()?;
        let Some((salt, hash, kind, bound_unit, expires_at, revoked_at, used_by, used_at)) = row
        else {
            return Ok(KeyCheck::Refused(RefusalReason::UnknownKey));
        };
        let salt: [u8; 16] = salt.try_into().unwrap_or([0; 16]);
        if !hashes_equal(&hash, &hash_secret(&salt, secret)) {
            return Ok(KeyCheck::Refused(RefusalReason::UnknownKey));
        }
        let kind = KeyKind::parse(&kind).unwrap_or(KeyKind::OneTime);
        let refusal = if revoked_at.is_some() {
            Some(RefusalReason::Revoked)
        } else if expires_at.is_some_and(|e| now >= e) {
            Some(RefusalReason::Expired)
        } else if kind == KeyKind::Bound && bound_unit.as_deref() != Some(unit) {
            Some(RefusalReason::WrongUnit)
        } else if unit_revoked {
            Some(RefusalReason::UnitRevoked)
        } else if kind != KeyKind::Multi {
            match (used_by.as_deref(), used_at) {
                (None, _) => None,
                // The same unit retrying shortly after: it never saw our answer.
                (Some(u), Some(at)) if u == unit && now - at <= retry_window_secs => None,
                _ => Some(RefusalReason::AlreadyUsed),
            }
        } else {
            None
        };
        if let Some(reason) = refusal {
            return Ok(KeyCheck::Refused(reason));
        }
        tx.execute(
            "UPDATE keys SET uses = uses + 1, used_by = COALESCE(used_by, ?2), used_at = COALESCE(used_at, ?3) WHERE id = ?1",
            params![id, unit, now],
        )?;
        tx.execute(
            "INSERT INTO devices (unit, cert_fingerprint, enrolled_at, updated_at, key_id) VALUES (?1, ?2, ?3, ?3, ?4)
             ON CONFLICT(unit) DO UPDATE SET cert_fingerprint = excluded.cert_fingerprint, updated_at = excluded.updated_at, key_id = excluded.key_id",
            params![unit, cert_fingerprint, now, id],
        )?;
        tx.commit()?;
        Ok(KeyCheck::Accepted)
    }

    fn register_device(
        &self,
        unit: &str,
        cert_fingerprint: &str,
        now: i64,
    ) -> Result<(), StoreError> {
        self.conn().execute(
            "INSERT INTO devices (unit, cert_fingerprint, enrolled_at, updated_at) VALUES (?1, ?2, ?3, ?3)
             ON CONFLICT(unit) DO UPDATE SET cert_fingerprint = excluded.cert_fingerprint, updated_at = excluded.updated_at",
            params![unit, cert_fingerprint, now],
        )?;
        Ok(())
    }

    fn revoke_device(&self, unit: &str, now: i64) -> Result<bool, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let revoked = is_revoked(&tx, unit)?;
        if revoked {
            return Ok(false);
        }
        tx.execute(
            "INSERT INTO revocations (unit, revoked, at) VALUES (?1, 1, ?2)",
            params![unit, now],
        )?;
        tx.commit()?;
        Ok(true)
    }

    fn unrevoke_device(&self, unit: &str) -> Result<bool, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let revoked = is_revoked(&tx, unit)?;
        if !revoked {
            return Ok(false);
        }
        tx.execute(
            "INSERT INTO revocations (unit, revoked, at) VALUES (?1, 0, strftime('%s','now'))",
            params![unit],
        )?;
        tx.commit()?;
        Ok(true)
    }

    fn revocations_since(&self, after: i64) -> Result<(Vec<String>, i64), StoreError> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare("SELECT seq, unit, revoked FROM revocations WHERE seq > ?1 ORDER BY seq")?;
        let mut last = after;
        let mut events = Vec::new();
        let rows = stmt.query_map(params![after], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
            ))
        })?;
        for row in rows {
            let (seq, unit, revoked) = row?;
            last = last.max(seq);
            // A lifted revocation is reported as "-unit" so that callers can apply events in order.
            events.push(if revoked != 0 {
                unit
            } else {
                format!("-{unit}")
            });
        }
        Ok((events, last))
    }

    fn devices(&self) -> Result<Vec<DeviceRecord>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT d.unit, d.cert_fingerprint, d.enrolled_at, d.updated_at,
                    (SELECT CASE WHEN r.revoked = 1 THEN r.at END FROM revocations r WHERE r.unit = d.unit ORDER BY r.seq DESC LIMIT 1)
             FROM devices d ORDER BY d.unit",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(DeviceRecord {
                unit: r.get(0)?,
                cert_fingerprint: r.get(1)?,
                enrolled_at: r.get(2)?,
                updated_at: r.get(3)?,
                revoked_at: r.get(4)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn create_pairing_token(&self, key: &NewKey) -> Result<(), StoreError> {
        self.conn().execute(
            "INSERT INTO pairing_tokens (id, salt, hash, created_at, expires_at) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![key.id, &key.salt[..], &key.hash[..], key.created_at, key.expires_at],
        )?;
        Ok(())
    }

    fn pair_manager(
        &self,
        token: &str,
        name: &str,
        cert_fingerprint: &str,
        now: i64,
    ) -> Result<bool, StoreError> {
        let id = key_id(token);
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let row = tx
            .query_row(
                "SELECT salt, hash, expires_at, used_at FROM pairing_tokens WHERE id = ?1",
                params![id],
                |r| {
                    Ok((
                        r.get::<_, Vec<u8>>(0)?,
                        r.get::<_, Vec<u8>>(1)?,
                        r.get::<_, Option<i64>>(2)?,
                        r.get::<_, Option<i64>>(3)?,
                    ))
                },
            )
            .optional()?;
        let Some((salt, hash, expires_at, used_at)) = row else {
            return Ok(false);
        };
        let salt: [u8; 16] = salt.try_into().unwrap_or([0; 16]);
        if !hashes_equal(&hash, &hash_secret(&salt, token))
            || used_at.is_some()
            || expires_at.is_some_and(|e| now >= e)
        {
            return Ok(false);
        }
        tx.execute(
            "UPDATE pairing_tokens SET used_by = ?2, used_at = ?3 WHERE id = ?1",
            params![id, name, now],
        )?;
        tx.execute(
            "INSERT INTO managers (name, cert_fingerprint, paired_at) VALUES (?1, ?2, ?3)
             ON CONFLICT(name) DO UPDATE SET cert_fingerprint = excluded.cert_fingerprint, paired_at = excluded.paired_at",
            params![name, cert_fingerprint, now],
        )?;
        tx.commit()?;
        Ok(true)
    }

    fn health(&self) -> Result<(), StoreError> {
        let ok: i64 = self.conn().query_row("SELECT 1", [], |r| r.get(0))?;
        if ok == 1 {
            Ok(())
        } else {
            Err(StoreError(
                "health query returned an unexpected value".into(),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{generate_secret, new_key};

    fn store() -> (tempfile::TempDir, SqliteStore) {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = SqliteStore::open(dir.path()).expect("open");
        (dir, s)
    }

    #[test]
    fn one_time_key_is_consumed_once_and_retry_by_same_unit_is_allowed() {
        let (_d, s) = store();
        let secret = generate_secret();
        s.create_keys(&[new_key(&secret, KeyKind::OneTime, None, None, 100)])
            .expect("create");
        assert_eq!(
            s.enroll(&secret, "u1", "fp1", 101, 600).expect("enroll"),
            KeyCheck::Accepted
        );
        assert_eq!(
            s.enroll(&secret, "u2", "fp2", 102, 600).expect("enroll"),
            KeyCheck::Refused(RefusalReason::AlreadyUsed)
        );
        assert_eq!(
            s.enroll(&secret, "u1", "fp3", 103, 600).expect("retry"),
            KeyCheck::Accepted
        );
        assert_eq!(
            s.enroll(&secret, "u1", "fp4", 10_000, 600)
                .expect("late retry"),
            KeyCheck::Refused(RefusalReason::AlreadyUsed)
        );
        let keys = s.list_keys().expect("list");
        assert_eq!(keys[0].uses, 2);
        assert_eq!(keys[0].used_by.as_deref(), Some("u1"));
    }

    #[test]
    fn bound_multi_expired_revoked_and_wrong_secret() {
        let (_d, s) = store();
        let bound = generate_secret();
        let multi = generate_secret();
        let expiring = generate_secret();
        s.create_keys(&[
            new_key(&bound, KeyKind::Bound, Some("u9".into()), None, 0),
            new_key(&multi, KeyKind::Multi, None, None, 0),
            new_key(&expiring, KeyKind::Multi, None, Some(50), 0),
        ])
        .expect("create");
        assert_eq!(
            s.enroll(&bound, "u8", "f", 1, 0).expect("e"),
            KeyCheck::Refused(RefusalReason::WrongUnit)
        );
        assert_eq!(
            s.enroll(&bound, "u9", "f", 1, 0).expect("e"),
            KeyCheck::Accepted
        );
        for i in 0..5 {
            assert_eq!(
                s.enroll(&multi, &format!("m{i}"), "f", 1, 0).expect("e"),
                KeyCheck::Accepted
            );
        }
        assert_eq!(
            s.enroll(&expiring, "x", "f", 60, 0).expect("e"),
            KeyCheck::Refused(RefusalReason::Expired)
        );
        assert_eq!(
            s.enroll("WRONG-WRONG", "x", "f", 1, 0).expect("e"),
            KeyCheck::Refused(RefusalReason::UnknownKey)
        );
        assert!(s.revoke_key(&key_id(&multi), 2).expect("revoke"));
        assert_eq!(
            s.enroll(&multi, "m9", "f", 3, 0).expect("e"),
            KeyCheck::Refused(RefusalReason::Revoked)
        );
        assert_eq!(s.devices().expect("devices").len(), 6);
    }

    #[test]
    fn revocation_log_and_revoked_units_cannot_enroll() {
        let (_d, s) = store();
        let multi = generate_secret();
        s.create_keys(&[new_key(&multi, KeyKind::Multi, None, None, 0)])
            .expect("create");
        assert!(s.revoke_device("bad", 5).expect("revoke"));
        assert!(!s.revoke_device("bad", 6).expect("again"));
        assert_eq!(
            s.enroll(&multi, "bad", "f", 7, 0).expect("e"),
            KeyCheck::Refused(RefusalReason::UnitRevoked)
        );
        let (events, last) = s.revocations_since(0).expect("since");
        assert_eq!(events, vec!["bad".to_owned()]);
        assert!(s.unrevoke_device("bad").expect("lift"));
        let (events, _) = s.revocations_since(last).expect("since");
        assert_eq!(events, vec!["-bad".to_owned()]);
        assert_eq!(
            s.enroll(&multi, "bad", "f", 8, 0).expect("e"),
            KeyCheck::Accepted
        );
    }

    #[test]
    fn reopening_keeps_state_and_migrations_are_idempotent() {
        let dir = tempfile::tempdir().expect("tempdir");
        let secret = generate_secret();
        {
            let s = SqliteStore::open(dir.path()).expect("open");
            s.create_keys(&[new_key(&secret, KeyKind::OneTime, None, None, 0)])
                .expect("create");
            assert_eq!(
                s.enroll(&secret, "u", "f", 1, 0).expect("e"),
                KeyCheck::Accepted
            );
        }
        let s = SqliteStore::open(dir.path()).expect("reopen");
        assert_eq!(
            s.enroll(&secret, "v", "f", 2, 0).expect("e"),
            KeyCheck::Refused(RefusalReason::AlreadyUsed)
        );
        s.health().expect("healthy");
    }
}
