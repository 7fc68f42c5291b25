//! Keys, enrollment and manager pairing tokens: the single-use guarantees. Each consuming
//! operation runs under the fleet-wide write lock (see the module docs of `postgres`), so
//! of several instances racing for one key exactly one sees it unused.

use postgres::error::SqlState;

use super::{DeviceRow, PgStore, count, device_row, insert_manager_cert, is_revoked, log_change};
use crate::store::{
    KeyCheck, KeyInfo, KeyKind, NewKey, RefusalReason, StoreError, hash_secret, hashes_equal,
    key_id,
};

const KEY_COLUMNS: &str = "id, kind, unit, created_at, expires_at, revoked_at, uses, used_by";

/// A [`KeyInfo`] from a row whose columns `at..` are [`KEY_COLUMNS`].
fn key_info(row: &postgres::Row, at: usize) -> Result<KeyInfo, StoreError> {
    let kind: String = row.try_get(at + 1)?;
    Ok(KeyInfo {
        id: row.try_get(at)?,
        kind: KeyKind::parse(&kind).map_or("unknown", KeyKind::as_str),
        unit: row.try_get(at + 2)?,
        created_at: row.try_get(at + 3)?,
        expires_at: row.try_get(at + 4)?,
        revoked_at: row.try_get(at + 5)?,
        uses: count(row.try_get(at + 6)?),
        used_by: row.try_get(at + 7)?,
    })
}

fn salt_of(bytes: Vec<u8>) -> [u8; 16] {
    bytes.try_into().unwrap_or([0; 16])
}

impl PgStore {
    pub(super) fn create_keys_impl(&self, keys: &[NewKey]) -> Result<(), StoreError> {
        self.write(|tx| {
            for k in keys {
                tx.execute(
                    "INSERT INTO keys (id, salt, hash, kind, unit, created_at, expires_at) VALUES ($1, $2, $3, $4, $5, $6, $7)",
                    &[&k.id, &&k.salt[..], &&k.hash[..], &k.kind.as_str(), &k.unit, &k.created_at, &k.expires_at],
                )
                .map_err(|e| {
                    if e.code() == Some(&SqlState::UNIQUE_VIOLATION) {
                        StoreError("a key with this value already exists; choose another value".into())
                    } else {
                        e.into()
                    }
                })?;
            }
            Ok(())
        })
    }

    pub(super) fn list_keys_impl(&self) -> Result<Vec<KeyInfo>, StoreError> {
        self.with(|c| {
            let sql = format!("SELECT {KEY_COLUMNS} FROM keys ORDER BY created_at DESC, id");
            c.query(sql.as_str(), &[])?
                .iter()
                .map(|r| key_info(r, 0))
                .collect()
        })
    }

    pub(super) fn list_keys_page_impl(
        &self,
        before: Option<i64>,
        limit: usize,
    ) -> Result<(Vec<KeyInfo>, Option<i64>), StoreError> {
        // Keyset paging on `rid` (insertion order), as the SQLite store does on its rowid.
        let fetch = i64::try_from(limit.saturating_add(1)).unwrap_or(i64::MAX);
        let before = before.unwrap_or(i64::MAX);
        let mut page = self.with(|c| {
            let sql = format!(
                "SELECT rid, {KEY_COLUMNS} FROM keys WHERE rid < $1 ORDER BY rid DESC LIMIT $2"
            );
            c.query(sql.as_str(), &[&before, &fetch])?
                .iter()
                .map(|r| Ok((r.try_get::<_, i64>(0)?, key_info(r, 1)?)))
                .collect::<Result<Vec<_>, StoreError>>()
        })?;
        let more = page.len() > limit;
        page.truncate(limit);
        let next = if more {
            page.last().map(|(rid, _)| *rid)
        } else {
            None
        };
        Ok((page.into_iter().map(|(_, k)| k).collect(), next))
    }

    pub(super) fn revoke_key_impl(&self, id: &str, now: i64) -> Result<bool, StoreError> {
        self.write(|tx| {
            let n = tx.execute(
                "UPDATE keys SET revoked_at = COALESCE(revoked_at, $2) WHERE id = $1",
                &[&id, &now],
            )?;
            Ok(n > 0)
        })
    }

    pub(super) fn enroll_impl(
        &self,
        secret: &str,
        unit: &str,
        cert_fingerprint: &str,
        now: i64,
        retry_window_secs: i64,
    ) -> Result<KeyCheck, StoreError> {
        let id = key_id(secret);
        self.write(|tx| {
            let unit_revoked = is_revoked(tx, unit)?;
            let Some(row) = tx.query_opt(
                "SELECT salt, hash, kind, unit, expires_at, revoked_at, used_by, used_at, created_at FROM keys WHERE id = $1",
                &[&id],
            )?
            else {
                return Ok(KeyCheck::Refused(RefusalReason::UnknownKey));
            };
            let salt = salt_of(row.try_get(0)?);
            let hash: Vec<u8> = row.try_get(1)?;
            if !hashes_equal(&hash, &hash_secret(&salt, secret)) {
                return Ok(KeyCheck::Refused(RefusalReason::UnknownKey));
            }
            let kind: String = row.try_get(2)?;
            let kind = KeyKind::parse(&kind).unwrap_or(KeyKind::OneTime);
            let bound_unit: Option<String> = row.try_get(3)?;
            let expires_at: Option<i64> = row.try_get(4)?;
            let revoked_at: Option<i64> = row.try_get(5)?;
            let used_by: Option<String> = row.try_get(6)?;
            let used_at: Option<i64> = row.try_get(7)?;
            let created_at: i64 = row.try_get(8)?;
            let device = device_row(tx, unit)?;
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
                // The lost-answer retry (see `Store::enroll` and the SQLite store).
                let retry = consumed
                    && used_by.as_deref() == Some(unit)
                    && used_at.is_some_and(|at| now - at <= retry_window_secs)
                    && device.as_ref().is_some_and(|d: &DeviceRow| {
                        !d.current.is_empty()
                            && d.used_at.is_none()
                            && d.key_id.as_deref() == Some(id.as_str())
                    });
                if consumed && !retry {
                    Some(RefusalReason::AlreadyUsed)
                } else if retry {
                    None
                } else {
                    match &device {
                        None => None,
                        Some(d) if !d.current.is_empty() => Some(RefusalReason::AlreadyEnrolled),
                        Some(d) => {
                            let fresh_enough = d.reset_at.is_none_or(|r| created_at >= r);
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
                "UPDATE keys SET uses = uses + 1, used_by = COALESCE(used_by, $2), used_at = COALESCE(used_at, $3) WHERE id = $1",
                &[&id, &unit, &now],
            )?;
            tx.execute(
                "INSERT INTO devices (unit, cert_fingerprint, enrolled_at, updated_at, key_id) VALUES ($1, $2, $3, $3, $4)
                 ON CONFLICT (unit) DO UPDATE SET cert_fingerprint = excluded.cert_fingerprint, updated_at = excluded.updated_at,
                     key_id = excluded.key_id, cert_used_at = NULL, prev_fingerprint = NULL, prev_until = NULL",
                &[&unit, &cert_fingerprint, &now, &id],
            )?;
            log_change(tx, "device", unit, now)?;
            Ok(KeyCheck::Accepted)
        })
    }

    pub(super) fn create_pairing_token_impl(&self, key: &NewKey) -> Result<(), StoreError> {
        self.write(|tx| {
            tx.execute(
                "INSERT INTO pairing_tokens (id, salt, hash, created_at, expires_at) VALUES ($1, $2, $3, $4, $5)",
                &[&key.id, &&key.salt[..], &&key.hash[..], &key.created_at, &key.expires_at],
            )?;
            Ok(())
        })
    }

    pub(super) fn pair_manager_impl(
        &self,
        token: &str,
        name: &str,
        cert_fingerprint: &str,
        now: i64,
    ) -> Result<bool, StoreError> {
        let id = key_id(token);
        self.write(|tx| {
            let Some(row) = tx.query_opt(
                "SELECT salt, hash, expires_at, used_at FROM pairing_tokens WHERE id = $1",
                &[&id],
            )?
            else {
                return Ok(false);
            };
            let salt = salt_of(row.try_get(0)?);
            let hash: Vec<u8> = row.try_get(1)?;
            let expires_at: Option<i64> = row.try_get(2)?;
            let used_at: Option<i64> = row.try_get(3)?;
            if !hashes_equal(&hash, &hash_secret(&salt, token))
                || used_at.is_some()
                || expires_at.is_some_and(|e| now >= e)
            {
                return Ok(false);
            }
            tx.execute(
                "UPDATE pairing_tokens SET used_by = $2, used_at = $3 WHERE id = $1",
                &[&id, &name, &now],
            )?;
            tx.execute(
                "INSERT INTO managers (name, cert_fingerprint, paired_at) VALUES ($1, $2, $3)
                 ON CONFLICT (name) DO UPDATE SET cert_fingerprint = excluded.cert_fingerprint, paired_at = excluded.paired_at",
                &[&name, &cert_fingerprint, &now],
            )?;
            insert_manager_cert(tx, name, cert_fingerprint, now, "pair")?;
            Ok(true)
        })
    }
}
