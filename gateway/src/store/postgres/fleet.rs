//! The fleet-wide device limit: every instance reports its device count once a second
//! and reads the others' back; the limit a manager sets on any instance is kept here.

use super::{PgStore, count};
use crate::store::{FleetView, StoreError};

impl PgStore {
    pub(super) fn fleet_sync_impl(
        &self,
        instance: &str,
        devices: u64,
        set_limit: Option<u64>,
        now: i64,
        fresh_secs: i64,
    ) -> Result<FleetView, StoreError> {
        let devices = i64::try_from(devices).unwrap_or(i64::MAX);
        let set_limit = set_limit.map(|l| i64::try_from(l).unwrap_or(i64::MAX));
        // No write lock: these rows are in no change log, and each instance writes only
        // its own row; the limit is last-writer-wins.
        self.with(|c| {
            let mut tx = c.transaction()?;
            tx.execute(
                "INSERT INTO fleet_instances (id, devices, seen_at) VALUES ($1, $2, $3)
                 ON CONFLICT (id) DO UPDATE SET devices = excluded.devices, seen_at = excluded.seen_at",
                &[&instance, &devices, &now],
            )?;
            if let Some(limit) = set_limit {
                tx.execute(
                    "INSERT INTO fleet_settings (name, value, set_at) VALUES ('device_limit', $1, $2)
                     ON CONFLICT (name) DO UPDATE SET value = excluded.value, set_at = excluded.set_at",
                    &[&limit, &now],
                )?;
            }
            let elsewhere: i64 = tx
                .query_one(
                    "SELECT COALESCE(SUM(devices), 0)::BIGINT FROM fleet_instances WHERE id <> $1 AND seen_at >= $2",
                    &[&instance, &now.saturating_sub(fresh_secs)],
                )?
                .try_get(0)?;
            let limit: Option<i64> = tx
                .query_opt(
                    "SELECT value FROM fleet_settings WHERE name = 'device_limit'",
                    &[],
                )?
                .map(|r| r.try_get(0))
                .transpose()?;
            tx.commit()?;
            Ok(FleetView {
                devices_elsewhere: count(elsewhere),
                limit: limit.map(count),
            })
        })
    }
}
