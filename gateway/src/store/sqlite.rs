//! The SQLite store (`<data_dir>/devgate.db`): WAL journal, `synchronous=FULL` (a
//! consumed one-time key stays consumed across a crash or power cut), schema migrations
//! by `user_version`, and `BEGIN IMMEDIATE` transactions so that racing enrollments —
//! from two workers or two gateway processes on one data dir — serialise.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

use super::{
    CredChange, DeviceCreds, DeviceRecord, KeyCheck, KeyInfo, KeyKind, ManagerCert, NewKey,
    RefusalReason, Store, StoreError, TrustAck, TrustProgress, UnitRevocation, hash_secret,
    hashes_equal, key_id,
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
    // 2: certificate-bound credentials. A unit accepts only its current certificate (and
    // the previous one during a renewal overlap); certificates can be revoked one by one;
    // every issued manager certificate is recorded; `cred_changes` is the change log the
    // gateway polls (like `revocations`). Certificates enrolled before this version count
    // as used: the lost-answer retry can no longer replace them.
    "ALTER TABLE devices ADD COLUMN prev_fingerprint TEXT;
    ALTER TABLE devices ADD COLUMN prev_until INTEGER;
    ALTER TABLE devices ADD COLUMN cert_used_at INTEGER;
    ALTER TABLE devices ADD COLUMN reset_at INTEGER;
    UPDATE devices SET cert_used_at = updated_at;
    CREATE TABLE revoked_certs (
        fingerprint TEXT PRIMARY KEY,
        at INTEGER NOT NULL
    );
    CREATE TABLE cred_changes (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        kind TEXT NOT NULL,
        name TEXT NOT NULL,
        at INTEGER NOT NULL
    );
    CREATE TABLE manager_certs (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        name TEXT NOT NULL,
        fingerprint TEXT UNIQUE,
        issued_at INTEGER NOT NULL,
        revoked_at INTEGER,
        source TEXT NOT NULL
    );
    CREATE INDEX manager_certs_name ON manager_certs(name);
    INSERT OR IGNORE INTO manager_certs (name, fingerprint, issued_at, source)
        SELECT name, cert_fingerprint, paired_at, 'pair' FROM managers;",
    // 3: who acknowledged which trust bundle (root exchange progress).
    "CREATE TABLE trust_acks (
        bundle TEXT NOT NULL,
        kind TEXT NOT NULL,
        name TEXT NOT NULL,
        acked_at INTEGER NOT NULL,
        PRIMARY KEY (bundle, kind, name)
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
        let before = migrate(&conn)
            .map_err(|e| StoreError(format!("{}: migration failed: {}", path.display(), e.0)))?;
        if before < 2 {
            // Managers issued before certificates were recorded: `devgate init`'s first
            // manager is known by its file, so it stays accepted. (Others, issued offline
            // with `managers issue`, stay accepted by the unknown-name policy; see
            // docs/OPERATIONS.md, Credentials.)
            record_init_manager(&conn, data_dir)?;
        }
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

/// Empties a unit's accepted certificates (reset); returns the rows changed.
fn reset_row(conn: &Connection, unit: &str, now: i64) -> Result<usize, StoreError> {
    let n = conn.execute(
        "UPDATE devices SET cert_fingerprint = '', cert_used_at = NULL, prev_fingerprint = NULL, prev_until = NULL,
             reset_at = ?2, updated_at = ?2 WHERE unit = ?1",
        params![unit, now],
    )?;
    if n > 0 {
        log_change(conn, "device", unit, now)?;
    }
    Ok(n)
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

/// Records `pki/manager.pem` (the first manager, made by `devgate init`) if it exists.
pub(crate) fn record_init_manager(conn: &Connection, data_dir: &Path) -> Result<(), StoreError> {
    let pem = devgate_pki::PkiPaths::new(data_dir).manager_cert();
    if !pem.exists() {
        return Ok(());
    }
    let fp = devgate_pki::fingerprint_file(&pem)
        .map_err(|e| StoreError(format!("cannot record {}: {e}", pem.display())))?;
    let now = crate::clock::unix_now();
    insert_manager_cert(conn, devgate_pki::FIRST_MANAGER_NAME, &fp, now, "init")
}

fn insert_manager_cert(
    conn: &Connection,
    name: &str,
    fingerprint: &str,
    now: i64,
    source: &str,
) -> Result<(), StoreError> {
    let n = conn.execute(
        "INSERT OR IGNORE INTO manager_certs (name, fingerprint, issued_at, source) VALUES (?1, ?2, ?3, ?4)",
        params![name, fingerprint, now, source],
    )?;
    if n > 0 {
        log_change(conn, "manager", name, now)?;
    }
    Ok(())
}

/// Appends to the change log the gateway polls.
fn log_change(conn: &Connection, kind: &str, name: &str, now: i64) -> Result<(), StoreError> {
    conn.execute(
        "INSERT INTO cred_changes (kind, name, at) VALUES (?1, ?2, ?3)",
        params![kind, name, now],
    )?;
    Ok(())
}

/// A unit's registry row: (current fingerprint, cert used at, reset at, key id, previous
/// fingerprint, previous until).
type DeviceRow = (
    String,
    Option<i64>,
    Option<i64>,
    Option<String>,
    Option<String>,
    Option<i64>,
);

fn device_row(conn: &Connection, unit: &str) -> Result<Option<DeviceRow>, StoreError> {
    Ok(conn
        .query_row(
            "SELECT cert_fingerprint, cert_used_at, reset_at, key_id, prev_fingerprint, prev_until FROM devices WHERE unit = ?1",
            params![unit],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?)),
        )
        .optional()?)
}

fn cert_revoked(conn: &Connection, fingerprint: &str) -> Result<bool, StoreError> {
    Ok(conn
        .query_row(
            "SELECT 1 FROM revoked_certs WHERE fingerprint = ?1",
            params![fingerprint],
            |_| Ok(()),
        )
        .optional()?
        .is_some())
}

fn creds_of(row: &DeviceRow) -> DeviceCreds {
    let (current, used_at, _, _, prev, prev_until) = row;
    DeviceCreds {
        current: (!current.is_empty()).then(|| current.clone()),
        current_used: used_at.is_some(),
        previous: match (prev, prev_until) {
            (Some(p), Some(u)) => Some((p.clone(), *u)),
            _ => None,
        },
    }
}

/// Applies migrations; returns the schema version found.
fn migrate(conn: &Connection) -> Result<i64, StoreError> {
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
    Ok(version)
}

impl Store for SqliteStore {
    fn kind(&self) -> &'static str {
        "sqlite"
    }

    fn location(&self) -> String {
        self.path.display().to_string()
    }

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
                "SELECT salt, hash, kind, unit, expires_at, revoked_at, used_by, used_at, created_at FROM keys WHERE id = ?1",
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
                        r.get::<_, i64>(8)?,
                    ))
                },
            )
            .optional()?;
        let Some((
            salt,
            hash,
            kind,
            bound_unit,
            expires_at,
            revoked_at,
            used_by,
            used_at,
            created_at,
        )) = row
        else {
            return Ok(KeyCheck::Refused(RefusalReason::UnknownKey));
        };
        let salt: [u8; 16] = salt.try_into().unwrap_or([0; 16]);
        if !hashes_equal(&hash, &hash_secret(&salt, secret)) {
            return Ok(KeyCheck::Refused(RefusalReason::UnknownKey));
        }
        let kind = KeyKind::parse(&kind).unwrap_or(KeyKind::OneTime);
        let device = device_row(&tx, unit)?;
        let refusal = if revoked_at.is_some() {
            Some(RefusalReason::Revoked)
        } else if expires_at.is_some_and(|e| now >= e) {
            Some(RefusalReason::Expired)
        } else if kind == KeyKind::Bound && bound_unit.as_deref() != Some(unit) {
            Some(RefusalReason::WrongUnit)
        } else if unit_revoked {
            Some(RefusalReason::UnitRevoked)
        } else {
            let consumed = kind != KeyKind::Multi && used_by.is_some();
            // The lost-answer retry: this unit consumed this key moments ago, the registry
            // still holds that enrollment, and its certificate never connected (a device
            // that received its answer connects at once). Only then may the same key
            // replace the credential; anything else would let a key holder take over.
            let retry = consumed
                && used_by.as_deref() == Some(unit)
                && used_at.is_some_and(|at| now - at <= retry_window_secs)
                && device.as_ref().is_some_and(|(fp, used, _, dev_key, _, _)| {
                    !fp.is_empty() && used.is_none() && dev_key.as_deref() == Some(id.as_str())
                });
            if consumed && !retry {
                Some(RefusalReason::AlreadyUsed)
            } else if retry {
                None
            } else {
                match &device {
                    None => None,
                    Some((fp, ..)) if !fp.is_empty() => Some(RefusalReason::AlreadyEnrolled),
                    // Reset: only a key bound to this unit and made since the reset.
                    Some((_, _, reset_at, ..)) => {
                        let fresh_enough = reset_at.is_none_or(|r| created_at >= r);
                        if kind == KeyKind::Bound && fresh_enough {
                            None
                        } else {
                            Some(RefusalReason::ResetNeedsBoundKey)
                        }
                    }
                }
            }
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
             ON CONFLICT(unit) DO UPDATE SET cert_fingerprint = excluded.cert_fingerprint, updated_at = excluded.updated_at,
                 key_id = excluded.key_id, cert_used_at = NULL, prev_fingerprint = NULL, prev_until = NULL",
            params![unit, cert_fingerprint, now, id],
        )?;
        log_change(&tx, "device", unit, now)?;
        tx.commit()?;
        Ok(KeyCheck::Accepted)
    }

    fn register_device(
        &self,
        unit: &str,
        cert_fingerprint: &str,
        now: i64,
    ) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute(
            "INSERT INTO devices (unit, cert_fingerprint, enrolled_at, updated_at) VALUES (?1, ?2, ?3, ?3)
             ON CONFLICT(unit) DO UPDATE SET cert_fingerprint = excluded.cert_fingerprint, updated_at = excluded.updated_at,
                 key_id = NULL, cert_used_at = NULL, prev_fingerprint = NULL, prev_until = NULL",
            params![unit, cert_fingerprint, now],
        )?;
        log_change(&tx, "device", unit, now)?;
        tx.commit()?;
        Ok(())
    }

    fn renew(
        &self,
        unit: &str,
        presented: &str,
        new_fingerprint: &str,
        now: i64,
        overlap_secs: i64,
    ) -> Result<KeyCheck, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        if is_revoked(&tx, unit)? {
            return Ok(KeyCheck::Refused(RefusalReason::UnitRevoked));
        }
        if cert_revoked(&tx, presented)? {
            return Ok(KeyCheck::Refused(RefusalReason::Revoked));
        }
        match device_row(&tx, unit)? {
            // A unit the registry never saw, with a certificate of our device CA (issued
            // directly with the CA key): renewal registers it.
            None => {
                tx.execute(
                    "INSERT INTO devices (unit, cert_fingerprint, enrolled_at, updated_at, prev_fingerprint, prev_until)
                     VALUES (?1, ?2, ?3, ?3, ?4, ?5)",
                    params![unit, new_fingerprint, now, presented, now.saturating_add(overlap_secs)],
                )?;
            }
            Some((current, ..)) if current == presented => {
                tx.execute(
                    "UPDATE devices SET cert_fingerprint = ?2, updated_at = ?3, cert_used_at = NULL,
                         prev_fingerprint = ?4, prev_until = ?5 WHERE unit = ?1",
                    params![unit, new_fingerprint, now, presented, now.saturating_add(overlap_secs)],
                )?;
            }
            // The renewal's answer was lost: the device still holds the previous
            // certificate (valid in the overlap) and the new one never connected.
            Some((_, None, _, _, Some(prev), Some(until))) if prev == presented && now < until => {
                tx.execute(
                    "UPDATE devices SET cert_fingerprint = ?2, updated_at = ?3 WHERE unit = ?1",
                    params![unit, new_fingerprint, now],
                )?;
            }
            Some(_) => return Ok(KeyCheck::Refused(RefusalReason::NotCurrent)),
        }
        log_change(&tx, "device", unit, now)?;
        tx.commit()?;
        Ok(KeyCheck::Accepted)
    }

    fn mark_cert_used(&self, unit: &str, fingerprint: &str, now: i64) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let had_previous = device_row(&tx, unit)?
            .is_some_and(|(fp, _, _, _, prev, _)| fp == fingerprint && prev.is_some());
        let n = tx.execute(
            "UPDATE devices SET cert_used_at = COALESCE(cert_used_at, ?3), prev_fingerprint = NULL, prev_until = NULL
             WHERE unit = ?1 AND cert_fingerprint = ?2",
            params![unit, fingerprint, now],
        )?;
        if n > 0 && had_previous {
            log_change(&tx, "device", unit, now)?;
        }
        tx.commit()?;
        Ok(())
    }

    fn reset_device(&self, unit: &str, now: i64) -> Result<bool, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let n = reset_row(&tx, unit, now)?;
        tx.commit()?;
        Ok(n > 0)
    }

    fn revoke_device(&self, unit: &str, now: i64) -> Result<UnitRevocation, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        if is_revoked(&tx, unit)? {
            return Ok(UnitRevocation::AlreadyRevoked);
        }
        let Some((current, _, _, _, prev, _)) = device_row(&tx, unit)? else {
            return Ok(UnitRevocation::Unknown);
        };
        tx.execute(
            "INSERT INTO revocations (unit, revoked, at) VALUES (?1, 1, ?2)",
            params![unit, now],
        )?;
        // By certificate too: lifting the unit's revocation later does not revive these.
        for fp in std::iter::once(current).chain(prev) {
            if !fp.is_empty() {
                tx.execute(
                    "INSERT OR IGNORE INTO revoked_certs (fingerprint, at) VALUES (?1, ?2)",
                    params![fp, now],
                )?;
                log_change(&tx, "cert", &fp, now)?;
            }
        }
        log_change(&tx, "device", unit, now)?;
        tx.commit()?;
        Ok(UnitRevocation::Revoked)
    }

    fn unrevoke_device(&self, unit: &str, now: i64) -> Result<bool, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let revoked = is_revoked(&tx, unit)?;
        if !revoked {
            return Ok(false);
        }
        tx.execute(
            "INSERT INTO revocations (unit, revoked, at) VALUES (?1, 0, ?2)",
            params![unit, now],
        )?;
        reset_row(&tx, unit, now)?;
        tx.commit()?;
        Ok(true)
    }

    fn revoke_cert(&self, fingerprint: &str, now: i64) -> Result<bool, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let n = tx.execute(
            "INSERT OR IGNORE INTO revoked_certs (fingerprint, at) VALUES (?1, ?2)",
            params![fingerprint, now],
        )?;
        tx.execute(
            "UPDATE manager_certs SET revoked_at = COALESCE(revoked_at, ?2) WHERE fingerprint = ?1",
            params![fingerprint, now],
        )?;
        if n > 0 {
            log_change(&tx, "cert", fingerprint, now)?;
        }
        tx.commit()?;
        Ok(n > 0)
    }

    fn revoked_certs(&self) -> Result<Vec<String>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT fingerprint FROM revoked_certs")?;
        let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn cred_changes_since(&self, after: i64) -> Result<(Vec<CredChange>, i64), StoreError> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare("SELECT seq, kind, name FROM cred_changes WHERE seq > ?1 ORDER BY seq")?;
        let rows = stmt.query_map(params![after], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
            ))
        })?;
        let mut last = after;
        let mut out = Vec::new();
        for row in rows {
            let (seq, kind, name) = row?;
            last = last.max(seq);
            out.push(match kind.as_str() {
                "device" => CredChange::Device(name),
                "manager" => CredChange::Manager(name),
                _ => CredChange::Cert(name),
            });
        }
        Ok((out, last))
    }

    fn cred_change_head(&self) -> Result<i64, StoreError> {
        Ok(self
            .conn()
            .query_row("SELECT COALESCE(MAX(seq), 0) FROM cred_changes", [], |r| {
                r.get(0)
            })?)
    }

    fn device_creds(&self, unit: &str) -> Result<Option<DeviceCreds>, StoreError> {
        Ok(device_row(&self.conn(), unit)?.as_ref().map(creds_of))
    }

    fn all_device_creds(&self) -> Result<Vec<(String, DeviceCreds)>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT unit, cert_fingerprint, cert_used_at, reset_at, key_id, prev_fingerprint, prev_until FROM devices",
        )?;
        let rows = stmt.query_map([], |r| {
            let row: DeviceRow = (
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
                r.get(6)?,
            );
            Ok((r.get::<_, String>(0)?, creds_of(&row)))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn record_manager_cert(
        &self,
        name: &str,
        fingerprint: &str,
        now: i64,
        source: &str,
    ) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        insert_manager_cert(&tx, name, fingerprint, now, source)?;
        tx.commit()?;
        Ok(())
    }

    fn manager_certs(&self) -> Result<Vec<ManagerCert>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT name, fingerprint, issued_at, revoked_at, source FROM manager_certs ORDER BY name, issued_at, id",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(ManagerCert {
                name: r.get(0)?,
                fingerprint: r.get(1)?,
                issued_at: r.get(2)?,
                revoked_at: r.get(3)?,
                source: r.get(4)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn revoke_manager(&self, name: &str, now: i64) -> Result<usize, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let fps: Vec<String> = {
            let mut stmt = tx.prepare(
                "SELECT fingerprint FROM manager_certs WHERE name = ?1 AND fingerprint IS NOT NULL AND revoked_at IS NULL",
            )?;
            let rows = stmt.query_map(params![name], |r| r.get::<_, String>(0))?;
            rows.collect::<Result<_, _>>()?
        };
        let known: bool = tx
            .query_row(
                "SELECT 1 FROM manager_certs WHERE name = ?1 LIMIT 1",
                params![name],
                |_| Ok(()),
            )
            .optional()?
            .is_some();
        tx.execute(
            "UPDATE manager_certs SET revoked_at = ?2 WHERE name = ?1 AND revoked_at IS NULL",
            params![name, now],
        )?;
        for fp in &fps {
            tx.execute(
                "INSERT OR IGNORE INTO revoked_certs (fingerprint, at) VALUES (?1, ?2)",
                params![fp, now],
            )?;
            log_change(&tx, "cert", fp, now)?;
        }
        if !known {
            // Nothing recorded under this name (certificates issued before they were
            // recorded): a placeholder makes the name known with no accepted certificate,
            // so every certificate of it is refused.
            tx.execute(
                "INSERT INTO manager_certs (name, fingerprint, issued_at, revoked_at, source) VALUES (?1, NULL, ?2, ?2, 'revoke')",
                params![name, now],
            )?;
        }
        log_change(&tx, "manager", name, now)?;
        tx.commit()?;
        Ok(fps.len())
    }

    fn manager_creds(&self, name: &str) -> Result<Option<Vec<String>>, StoreError> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare("SELECT fingerprint, revoked_at FROM manager_certs WHERE name = ?1")?;
        let rows = stmt.query_map(params![name], |r| {
            Ok((r.get::<_, Option<String>>(0)?, r.get::<_, Option<i64>>(1)?))
        })?;
        let mut known = false;
        let mut accepted = Vec::new();
        for row in rows {
            let (fp, revoked_at) = row?;
            known = true;
            if let (Some(fp), None) = (fp, revoked_at) {
                accepted.push(fp);
            }
        }
        Ok(known.then_some(accepted))
    }

    fn all_manager_creds(&self) -> Result<Vec<(String, Vec<String>)>, StoreError> {
        let mut by_name: std::collections::BTreeMap<String, Vec<String>> = Default::default();
        for c in self.manager_certs()? {
            let entry = by_name.entry(c.name).or_default();
            if let (Some(fp), None) = (c.fingerprint, c.revoked_at) {
                entry.push(fp);
            }
        }
        Ok(by_name.into_iter().collect())
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
                    (SELECT CASE WHEN r.revoked = 1 THEN r.at END FROM revocations r WHERE r.unit = d.unit ORDER BY r.seq DESC LIMIT 1),
                    d.reset_at, d.prev_fingerprint, d.prev_until
             FROM devices d ORDER BY d.unit",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(DeviceRecord {
                unit: r.get(0)?,
                cert_fingerprint: r.get(1)?,
                enrolled_at: r.get(2)?,
                updated_at: r.get(3)?,
                revoked_at: r.get(4)?,
                reset_at: r.get(5)?,
                previous_fingerprint: r.get(6)?,
                previous_until: r.get(7)?,
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
        insert_manager_cert(&tx, name, cert_fingerprint, now, "pair")?;
        tx.commit()?;
        Ok(true)
    }

    fn record_trust_acks(&self, acks: &[TrustAck], now: i64) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        {
            let mut stmt = tx.prepare(
                "INSERT OR IGNORE INTO trust_acks (bundle, kind, name, acked_at) VALUES (?1, ?2, ?3, ?4)",
            )?;
            for ack in acks {
                stmt.execute(params![&*ack.bundle, ack.kind, &*ack.name, now])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    fn trust_progress(&self, bundle: &str) -> Result<TrustProgress, StoreError> {
        let conn = self.conn();
        // A device counts while it holds a credential (a reset unit has none) and its latest
        // revocation event (if any) does not revoke it.
        let unrevoked = "d.cert_fingerprint <> '' AND NOT EXISTS (SELECT 1 FROM revocations r WHERE r.unit = d.unit AND r.revoked = 1
                 AND r.seq = (SELECT MAX(seq) FROM revocations WHERE unit = d.unit))";
        let devices_total: i64 = conn.query_row(
            &format!("SELECT COUNT(*) FROM devices d WHERE {unrevoked}"),
            [],
            |r| r.get(0),
        )?;
        let devices_acked: i64 = conn.query_row(
            &format!(
                "SELECT COUNT(*) FROM devices d JOIN trust_acks a
                   ON a.kind = 'device' AND a.name = d.unit AND a.bundle = ?1
                 WHERE {unrevoked}"
            ),
            params![bundle],
            |r| r.get(0),
        )?;
        let mut stmt = conn.prepare(
            "SELECT name FROM trust_acks WHERE bundle = ?1 AND kind = 'manager' ORDER BY name",
        )?;
        let managers_acked = stmt
            .query_map(params![bundle], |r| r.get::<_, String>(0))?
            .collect::<Result<_, _>>()?;
        Ok(TrustProgress {
            bundle: bundle.to_owned(),
            devices_acked: u64::try_from(devices_acked).unwrap_or(0),
            devices_total: u64::try_from(devices_total).unwrap_or(0),
            managers_acked,
        })
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
    use crate::store::{contract, generate_secret, new_key};

    fn store() -> (tempfile::TempDir, SqliteStore) {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = SqliteStore::open(dir.path()).expect("open");
        (dir, s)
    }

    #[test]
    fn one_time_key_is_consumed_once_and_retry_by_same_unit_is_allowed() {
        let (_d, s) = store();
        contract::one_time_key_is_consumed_once_and_retry_by_same_unit_is_allowed(&s);
    }

    #[test]
    fn bound_multi_expired_revoked_and_wrong_secret() {
        let (_d, s) = store();
        contract::bound_multi_expired_revoked_and_wrong_secret(&s);
    }

    #[test]
    fn revocation_log_and_revoked_units_cannot_enroll() {
        let (_d, s) = store();
        contract::revocation_log_and_revoked_units_cannot_enroll(&s);
    }

    #[test]
    fn enrolled_units_cannot_be_taken_over_and_reset_needs_a_fresh_bound_key() {
        let (_d, s) = store();
        contract::enrolled_units_cannot_be_taken_over_and_reset_needs_a_fresh_bound_key(&s);
    }

    #[test]
    fn renewal_needs_the_current_certificate_and_keeps_the_previous_for_the_overlap() {
        let (_d, s) = store();
        contract::renewal_needs_the_current_certificate_and_keeps_the_previous_for_the_overlap(&s);
    }

    #[test]
    fn manager_certificates_are_recorded_listed_and_revoked() {
        let (_d, s) = store();
        contract::manager_certificates_are_recorded_listed_and_revoked(&s);
    }

    #[test]
    fn a_version_1_data_dir_keeps_its_managers_and_enrolled_devices() {
        let dir = tempfile::tempdir().expect("tempdir");
        devgate_pki::init(
            dir.path(),
            &devgate_pki::InitOptions {
                names: vec!["localhost".into()],
                force: false,
            },
        )
        .expect("pki");
        {
            let conn = Connection::open(SqliteStore::path_in(dir.path())).expect("db");
            conn.execute_batch(MIGRATIONS[0]).expect("v1");
            conn.pragma_update(None, "user_version", 1)
                .expect("version");
            conn.execute_batch(
                "INSERT INTO devices (unit, cert_fingerprint, enrolled_at, updated_at) VALUES ('old', 'f0', 1, 1);
                 INSERT INTO managers (name, cert_fingerprint, paired_at) VALUES ('ums-2', 'p0', 1);",
            )
            .expect("rows");
        }
        let s = SqliteStore::open(dir.path()).expect("migrate");
        let init_fp =
            devgate_pki::fingerprint_file(&devgate_pki::PkiPaths::new(dir.path()).manager_cert())
                .expect("fp");
        assert_eq!(
            s.manager_creds(devgate_pki::FIRST_MANAGER_NAME).expect("m"),
            Some(vec![init_fp])
        );
        assert_eq!(
            s.manager_creds("ums-2").expect("m"),
            Some(vec!["p0".into()])
        );
        let old = s.device_creds("old").expect("c").expect("known");
        assert_eq!(old.current.as_deref(), Some("f0"));
        assert!(old.current_used, "enrolled before: no retry may replace it");
    }

    #[test]
    fn trust_progress_counts_enrolled_unrevoked_devices_and_managers() {
        let (_d, s) = store();
        contract::trust_progress_counts_enrolled_unrevoked_devices_and_managers(&s);
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
