//! The device registry, certificate revocations and the two change logs every instance
//! polls (`cred_changes` for its identity mirror, `revocations` to disconnect units).

use postgres::GenericClient;

use super::{DeviceRow, PgStore, device_row, is_revoked, log_change};
use crate::store::{
    CredChange, DeviceCreds, DeviceRecord, KeyCheck, RefusalReason, StoreError, UnitRevocation,
};

/// Empties a unit's accepted certificates (reset); returns the rows changed.
fn reset_row(tx: &mut impl GenericClient, unit: &str, now: i64) -> Result<u64, StoreError> {
    let n = tx.execute(
        "UPDATE devices SET cert_fingerprint = '', cert_used_at = NULL, prev_fingerprint = NULL, prev_until = NULL,
             reset_at = $2, updated_at = $2 WHERE unit = $1",
        &[&unit, &now],
    )?;
    if n > 0 {
        log_change(tx, "device", unit, now)?;
    }
    Ok(n)
}

fn cert_revoked(c: &mut impl GenericClient, fingerprint: &str) -> Result<bool, StoreError> {
    Ok(c.query_opt(
        "SELECT 1 FROM revoked_certs WHERE fingerprint = $1",
        &[&fingerprint],
    )?
    .is_some())
}

/// Revokes one certificate; true if it was not revoked before.
fn insert_revoked_cert(
    tx: &mut impl GenericClient,
    fingerprint: &str,
    now: i64,
) -> Result<bool, StoreError> {
    let n = tx.execute(
        "INSERT INTO revoked_certs (fingerprint, at) VALUES ($1, $2) ON CONFLICT DO NOTHING",
        &[&fingerprint, &now],
    )?;
    Ok(n > 0)
}

impl PgStore {
    pub(super) fn register_device_impl(
        &self,
        unit: &str,
        cert_fingerprint: &str,
        now: i64,
    ) -> Result<(), StoreError> {
        self.write(|tx| {
            tx.execute(
                "INSERT INTO devices (unit, cert_fingerprint, enrolled_at, updated_at) VALUES ($1, $2, $3, $3)
                 ON CONFLICT (unit) DO UPDATE SET cert_fingerprint = excluded.cert_fingerprint, updated_at = excluded.updated_at,
                     key_id = NULL, cert_used_at = NULL, prev_fingerprint = NULL, prev_until = NULL",
                &[&unit, &cert_fingerprint, &now],
            )?;
            log_change(tx, "device", unit, now)
        })
    }

    pub(super) fn renew_impl(
        &self,
        unit: &str,
        presented: &str,
        new_fingerprint: &str,
        now: i64,
        overlap_secs: i64,
    ) -> Result<KeyCheck, StoreError> {
        let until = now.saturating_add(overlap_secs);
        self.write(|tx| {
            if is_revoked(tx, unit)? {
                return Ok(KeyCheck::Refused(RefusalReason::UnitRevoked));
            }
            if cert_revoked(tx, presented)? {
                return Ok(KeyCheck::Refused(RefusalReason::Revoked));
            }
            match device_row(tx, unit)? {
                // A unit the registry never saw, with a certificate of our device CA:
                // renewal registers it.
                None => {
                    tx.execute(
                        "INSERT INTO devices (unit, cert_fingerprint, enrolled_at, updated_at, prev_fingerprint, prev_until)
                         VALUES ($1, $2, $3, $3, $4, $5)",
                        &[&unit, &new_fingerprint, &now, &presented, &until],
                    )?;
                }
                Some(d) if d.current == presented => {
                    tx.execute(
                        "UPDATE devices SET cert_fingerprint = $2, updated_at = $3, cert_used_at = NULL,
                             prev_fingerprint = $4, prev_until = $5 WHERE unit = $1",
                        &[&unit, &new_fingerprint, &now, &presented, &until],
                    )?;
                }
                // The renewal's answer was lost: the device still holds the previous
                // certificate (valid in the overlap) and the new one never connected.
                Some(DeviceRow {
                    used_at: None,
                    prev: Some(prev),
                    prev_until: Some(prev_until),
                    ..
                }) if prev == presented && now < prev_until => {
                    tx.execute(
                        "UPDATE devices SET cert_fingerprint = $2, updated_at = $3 WHERE unit = $1",
                        &[&unit, &new_fingerprint, &now],
                    )?;
                }
                Some(_) => return Ok(KeyCheck::Refused(RefusalReason::NotCurrent)),
            }
            log_change(tx, "device", unit, now)?;
            Ok(KeyCheck::Accepted)
        })
    }

    pub(super) fn mark_cert_used_impl(
        &self,
        unit: &str,
        fingerprint: &str,
        now: i64,
    ) -> Result<(), StoreError> {
        self.write(|tx| {
            let had_previous = device_row(tx, unit)?
                .is_some_and(|d| d.current == fingerprint && d.prev.is_some());
            let n = tx.execute(
                "UPDATE devices SET cert_used_at = COALESCE(cert_used_at, $3), prev_fingerprint = NULL, prev_until = NULL
                 WHERE unit = $1 AND cert_fingerprint = $2",
                &[&unit, &fingerprint, &now],
            )?;
            if n > 0 && had_previous {
                log_change(tx, "device", unit, now)?;
            }
            Ok(())
        })
    }

    pub(super) fn reset_device_impl(&self, unit: &str, now: i64) -> Result<bool, StoreError> {
        self.write(|tx| Ok(reset_row(tx, unit, now)? > 0))
    }

    pub(super) fn revoke_device_impl(
        &self,
        unit: &str,
        now: i64,
    ) -> Result<UnitRevocation, StoreError> {
        self.write(|tx| {
            if is_revoked(tx, unit)? {
                return Ok(UnitRevocation::AlreadyRevoked);
            }
            let Some(d) = device_row(tx, unit)? else {
                return Ok(UnitRevocation::Unknown);
            };
            tx.execute(
                "INSERT INTO revocations (unit, revoked, at) VALUES ($1, TRUE, $2)",
                &[&unit, &now],
            )?;
            // By certificate too: lifting the unit's revocation later does not revive these.
            for fp in std::iter::once(d.current).chain(d.prev) {
                if !fp.is_empty() {
                    insert_revoked_cert(tx, &fp, now)?;
                    log_change(tx, "cert", &fp, now)?;
                }
            }
            log_change(tx, "device", unit, now)?;
            Ok(UnitRevocation::Revoked)
        })
    }

    pub(super) fn unrevoke_device_impl(&self, unit: &str, now: i64) -> Result<bool, StoreError> {
        self.write(|tx| {
            if !is_revoked(tx, unit)? {
                return Ok(false);
            }
            tx.execute(
                "INSERT INTO revocations (unit, revoked, at) VALUES ($1, FALSE, $2)",
                &[&unit, &now],
            )?;
            reset_row(tx, unit, now)?;
            Ok(true)
        })
    }

    pub(super) fn revoke_cert_impl(&self, fingerprint: &str, now: i64) -> Result<bool, StoreError> {
        self.write(|tx| {
            let new = insert_revoked_cert(tx, fingerprint, now)?;
            tx.execute(
                "UPDATE manager_certs SET revoked_at = COALESCE(revoked_at, $2) WHERE fingerprint = $1",
                &[&fingerprint, &now],
            )?;
            if new {
                log_change(tx, "cert", fingerprint, now)?;
            }
            Ok(new)
        })
    }

    pub(super) fn revoked_certs_impl(&self) -> Result<Vec<String>, StoreError> {
        self.with(|c| {
            c.query("SELECT fingerprint FROM revoked_certs", &[])?
                .iter()
                .map(|r| Ok(r.try_get(0)?))
                .collect()
        })
    }

    pub(super) fn cred_changes_since_impl(
        &self,
        after: i64,
    ) -> Result<(Vec<CredChange>, i64), StoreError> {
        self.with(|c| {
            let mut last = after;
            let mut out = Vec::new();
            for row in c.query(
                "SELECT seq, kind, name FROM cred_changes WHERE seq > $1 ORDER BY seq",
                &[&after],
            )? {
                let seq: i64 = row.try_get(0)?;
                let kind: &str = row.try_get(1)?;
                let name: String = row.try_get(2)?;
                last = last.max(seq);
                out.push(match kind {
                    "device" => CredChange::Device(name),
                    "manager" => CredChange::Manager(name),
                    _ => CredChange::Cert(name),
                });
            }
            Ok((out, last))
        })
    }

    pub(super) fn all_device_creds_impl(&self) -> Result<Vec<(String, DeviceCreds)>, StoreError> {
        self.with(|c| {
            let sql = format!("SELECT unit, {} FROM devices", DeviceRow::COLUMNS);
            c.query(sql.as_str(), &[])?
                .iter()
                .map(|r| Ok((r.try_get(0)?, DeviceRow::from_row(r, 1)?.creds())))
                .collect()
        })
    }

    pub(super) fn revocations_since_impl(
        &self,
        after: i64,
    ) -> Result<(Vec<String>, i64), StoreError> {
        self.with(|c| {
            let mut last = after;
            let mut events = Vec::new();
            for row in c.query(
                "SELECT seq, unit, revoked FROM revocations WHERE seq > $1 ORDER BY seq",
                &[&after],
            )? {
                let seq: i64 = row.try_get(0)?;
                let unit: String = row.try_get(1)?;
                let revoked: bool = row.try_get(2)?;
                last = last.max(seq);
                // A lifted revocation is reported as "-unit" (as the SQLite store does).
                events.push(if revoked { unit } else { format!("-{unit}") });
            }
            Ok((events, last))
        })
    }

    pub(super) fn devices_impl(&self) -> Result<Vec<DeviceRecord>, StoreError> {
        self.with(|c| {
            c.query(
                "SELECT d.unit, d.cert_fingerprint, d.enrolled_at, d.updated_at,
                        (SELECT CASE WHEN r.revoked THEN r.at END FROM revocations r WHERE r.unit = d.unit ORDER BY r.seq DESC LIMIT 1),
                        d.reset_at, d.prev_fingerprint, d.prev_until
                 FROM devices d ORDER BY d.unit",
                &[],
            )?
            .iter()
            .map(|r| {
                Ok(DeviceRecord {
                    unit: r.try_get(0)?,
                    cert_fingerprint: r.try_get(1)?,
                    enrolled_at: r.try_get(2)?,
                    updated_at: r.try_get(3)?,
                    revoked_at: r.try_get(4)?,
                    reset_at: r.try_get(5)?,
                    previous_fingerprint: r.try_get(6)?,
                    previous_until: r.try_get(7)?,
                })
            })
            .collect()
        })
    }
}
