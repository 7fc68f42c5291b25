//! Manager certificates and the root exchange's acknowledgements.

use super::{PgStore, count, log_change};
use crate::store::{ManagerCert, StoreError, TrustAck, TrustProgress};

impl PgStore {
    pub(super) fn manager_certs_impl(&self) -> Result<Vec<ManagerCert>, StoreError> {
        self.with(|c| {
            c.query(
                "SELECT name, fingerprint, issued_at, revoked_at, source FROM manager_certs ORDER BY name, issued_at, id",
                &[],
            )?
            .iter()
            .map(|r| {
                Ok(ManagerCert {
                    name: r.try_get(0)?,
                    fingerprint: r.try_get(1)?,
                    issued_at: r.try_get(2)?,
                    revoked_at: r.try_get(3)?,
                    source: r.try_get(4)?,
                })
            })
            .collect()
        })
    }

    pub(super) fn revoke_manager_impl(&self, name: &str, now: i64) -> Result<usize, StoreError> {
        self.write(|tx| {
            let fps: Vec<String> = tx
                .query(
                    "SELECT fingerprint FROM manager_certs WHERE name = $1 AND fingerprint IS NOT NULL AND revoked_at IS NULL",
                    &[&name],
                )?
                .iter()
                .map(|r| r.try_get(0))
                .collect::<Result<_, _>>()?;
            let known = tx
                .query_opt("SELECT 1 FROM manager_certs WHERE name = $1 LIMIT 1", &[&name])?
                .is_some();
            tx.execute(
                "UPDATE manager_certs SET revoked_at = $2 WHERE name = $1 AND revoked_at IS NULL",
                &[&name, &now],
            )?;
            for fp in &fps {
                tx.execute(
                    "INSERT INTO revoked_certs (fingerprint, at) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                    &[fp, &now],
                )?;
                log_change(tx, "cert", fp, now)?;
            }
            if !known {
                // A placeholder makes a never-recorded name known with nothing accepted
                // (see the SQLite store).
                tx.execute(
                    "INSERT INTO manager_certs (name, fingerprint, issued_at, revoked_at, source) VALUES ($1, NULL, $2, $2, 'revoke')",
                    &[&name, &now],
                )?;
            }
            log_change(tx, "manager", name, now)?;
            Ok(fps.len())
        })
    }

    pub(super) fn manager_creds_impl(&self, name: &str) -> Result<Option<Vec<String>>, StoreError> {
        self.with(|c| {
            let mut known = false;
            let mut accepted = Vec::new();
            for row in c.query(
                "SELECT fingerprint, revoked_at FROM manager_certs WHERE name = $1 ORDER BY id",
                &[&name],
            )? {
                known = true;
                let fp: Option<String> = row.try_get(0)?;
                let revoked_at: Option<i64> = row.try_get(1)?;
                if let (Some(fp), None) = (fp, revoked_at) {
                    accepted.push(fp);
                }
            }
            Ok(known.then_some(accepted))
        })
    }

    pub(super) fn record_trust_acks_impl(
        &self,
        acks: &[TrustAck],
        now: i64,
    ) -> Result<(), StoreError> {
        // No write lock: acknowledgements are not part of any change log, and a repeat
        // keeps the first time whoever writes it.
        self.with(|c| {
            let mut tx = c.transaction()?;
            let stmt = tx.prepare(
                "INSERT INTO trust_acks (bundle, kind, name, acked_at) VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
            )?;
            for ack in acks {
                tx.execute(&stmt, &[&&*ack.bundle, &ack.kind, &&*ack.name, &now])?;
            }
            tx.commit()?;
            Ok(())
        })
    }

    pub(super) fn trust_progress_impl(&self, bundle: &str) -> Result<TrustProgress, StoreError> {
        // A device counts while it holds a credential and its latest revocation event (if
        // any) does not revoke it.
        let unrevoked = "d.cert_fingerprint <> '' AND NOT EXISTS (SELECT 1 FROM revocations r WHERE r.unit = d.unit AND r.revoked
                 AND r.seq = (SELECT MAX(seq) FROM revocations WHERE unit = d.unit))";
        self.with(|c| {
            let total: i64 = c
                .query_one(
                    format!("SELECT COUNT(*) FROM devices d WHERE {unrevoked}").as_str(),
                    &[],
                )?
                .try_get(0)?;
            let acked: i64 = c
                .query_one(
                    format!(
                        "SELECT COUNT(*) FROM devices d JOIN trust_acks a
                           ON a.kind = 'device' AND a.name = d.unit AND a.bundle = $1
                         WHERE {unrevoked}"
                    )
                    .as_str(),
                    &[&bundle],
                )?
                .try_get(0)?;
            let managers_acked = c
                .query(
                    "SELECT name FROM trust_acks WHERE bundle = $1 AND kind = 'manager' ORDER BY name",
                    &[&bundle],
                )?
                .iter()
                .map(|r| r.try_get(0))
                .collect::<Result<_, _>>()?;
            Ok(TrustProgress {
                bundle: bundle.to_owned(),
                devices_acked: count(acked),
                devices_total: count(total),
                managers_acked,
            })
        })
    }
}
