//! The PostgreSQL store, shared by every instance of a fleet (`[store] url =
//! "postgres://…"`).
//!
//! Consistency across instances rests on one rule: every transaction that writes takes
//! the same transaction-scoped advisory lock first ([`WRITE_LOCK`]). Writers therefore
//! serialise fleet-wide exactly like SQLite's `BEGIN IMMEDIATE` serialises them on one
//! file, and the logic of each operation is the SQLite store's, statement for statement:
//! a one-time key or pairing token is consumed once however many instances race for it.
//! The lock also makes the change logs (`cred_changes`, `revocations`) safe to poll by
//! sequence number: a sequence number is drawn under the lock and the lock is held until
//! commit, so no entry with a lower number can become visible after a higher one (with
//! concurrent writers a poller could otherwise skip an entry for good).
//!
//! The connection is re-established on demand: when the database is unreachable a call
//! fails at once with a [`StoreError`] (the control plane answers 503 to enrollment and
//! keeps routing), attempts are spaced by [`RECONNECT_EVERY`] so that a store thread
//! polling every second does not stall on connects, and the first call after the
//! database is back reconnects.
//!
//! TLS to the database is optional: `sslmode=require` in the URL makes every connection
//! TLS (rustls), verifying the server's certificate and name against the CA certificates
//! in `sslrootcert=FILE` (PEM; required with `sslmode=require`, since a TLS connection
//! to a server nobody checked protects nothing). Without it (`disable`, or the default
//! `prefer`), connections are plain, as over a unix socket.

mod devices;
mod fleet;
mod keys;
mod managers;
mod url;

use std::sync::Mutex;
use std::time::{Duration, Instant};

use postgres::{Client, GenericClient, NoTls};

use url::describe;
pub use url::{Transport, parse_url, parse_url_tls};

use super::{
    CredChange, DeviceCreds, DeviceRecord, FleetView, KeyCheck, KeyInfo, ManagerCert, NewKey,
    Store, StoreError, TrustAck, TrustProgress, UnitRevocation,
};

/// Key of the advisory lock every writing transaction holds (`"devgate"` in ASCII).
const WRITE_LOCK: i64 = 0x0064_6576_6761_7465;

/// Time between connection attempts while the database is unreachable.
const RECONNECT_EVERY: Duration = Duration::from_secs(1);

/// Bounds on a connection attempt and on a dead peer, so that the store thread (which
/// also keeps the identity mirror fresh) is never stuck on a database that vanished
/// without closing its sockets.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const TCP_USER_TIMEOUT: Duration = Duration::from_secs(10);

/// Schema migrations; `devgate_schema.version` is the number applied.
const MIGRATIONS: &[&str] = &[
    // 1: the SQLite store's schema at its version 3, in PostgreSQL types.
    "CREATE TABLE keys (
        rid BIGSERIAL UNIQUE,
        id TEXT PRIMARY KEY,
        salt BYTEA NOT NULL,
        hash BYTEA NOT NULL,
        kind TEXT NOT NULL,
        unit TEXT,
        created_at BIGINT NOT NULL,
        expires_at BIGINT,
        revoked_at BIGINT,
        uses BIGINT NOT NULL DEFAULT 0,
        used_by TEXT,
        used_at BIGINT
    );
    CREATE TABLE devices (
        unit TEXT PRIMARY KEY,
        cert_fingerprint TEXT NOT NULL,
        enrolled_at BIGINT NOT NULL,
        updated_at BIGINT NOT NULL,
        key_id TEXT,
        prev_fingerprint TEXT,
        prev_until BIGINT,
        cert_used_at BIGINT,
        reset_at BIGINT
    );
    CREATE TABLE revocations (
        seq BIGSERIAL PRIMARY KEY,
        unit TEXT NOT NULL,
        revoked BOOLEAN NOT NULL,
        at BIGINT NOT NULL
    );
    CREATE INDEX revocations_unit ON revocations(unit, seq);
    CREATE TABLE pairing_tokens (
        id TEXT PRIMARY KEY,
        salt BYTEA NOT NULL,
        hash BYTEA NOT NULL,
        created_at BIGINT NOT NULL,
        expires_at BIGINT,
        used_by TEXT,
        used_at BIGINT
    );
    CREATE TABLE managers (
        name TEXT PRIMARY KEY,
        cert_fingerprint TEXT NOT NULL,
        paired_at BIGINT NOT NULL
    );
    CREATE TABLE revoked_certs (
        fingerprint TEXT PRIMARY KEY,
        at BIGINT NOT NULL
    );
    CREATE TABLE cred_changes (
        seq BIGSERIAL PRIMARY KEY,
        kind TEXT NOT NULL,
        name TEXT NOT NULL,
        at BIGINT NOT NULL
    );
    CREATE TABLE manager_certs (
        id BIGSERIAL PRIMARY KEY,
        name TEXT NOT NULL,
        fingerprint TEXT UNIQUE,
        issued_at BIGINT NOT NULL,
        revoked_at BIGINT,
        source TEXT NOT NULL
    );
    CREATE INDEX manager_certs_name ON manager_certs(name);
    CREATE TABLE trust_acks (
        bundle TEXT NOT NULL,
        kind TEXT NOT NULL,
        name TEXT NOT NULL,
        acked_at BIGINT NOT NULL,
        PRIMARY KEY (bundle, kind, name)
    );",
    // 2: the fleet-wide device limit: each instance's device count, and the limit.
    "CREATE TABLE fleet_instances (
        id TEXT PRIMARY KEY,
        devices BIGINT NOT NULL,
        seen_at BIGINT NOT NULL
    );
    CREATE TABLE fleet_settings (
        name TEXT PRIMARY KEY,
        value BIGINT NOT NULL,
        set_at BIGINT NOT NULL
    );",
];

impl From<postgres::Error> for StoreError {
    fn from(e: postgres::Error) -> Self {
        // `Display` of a server error is only "db error"; the source has the message.
        match e.as_db_error() {
            Some(db) => Self(format!("PostgreSQL: {}", db.message())),
            None => {
                // Connection errors keep their cause (e.g. why a TLS handshake failed) in
                // the source chain.
                let mut text = format!("PostgreSQL: {e}");
                let mut source = std::error::Error::source(&e);
                while let Some(cause) = source {
                    let more = cause.to_string();
                    if !text.contains(&more) {
                        text.push_str(": ");
                        text.push_str(&more);
                    }
                    source = cause.source();
                }
                Self(text)
            }
        }
    }
}

/// The PostgreSQL implementation of [`Store`].
pub struct PgStore {
    config: postgres::Config,
    transport: Transport,
    /// Where it points, without the password (status and logs).
    location: String,
    conn: Mutex<Conn>,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("location", &self.location)
            .finish_non_exhaustive()
    }
}

#[derive(Default)]
struct Conn {
    client: Option<Client>,
    /// The last failed connection attempt and why.
    failed: Option<(Instant, String)>,
}

impl PgStore {
    /// Connects and brings the schema up to date; fails if the database cannot be
    /// reached now (an instance does not start without its credential store).
    pub fn open(url: &str) -> Result<Self, StoreError> {
        let (config, transport) = parse_url_tls(url).map_err(StoreError)?;
        let location = describe(&config);
        let store = Self {
            config,
            transport,
            location,
            conn: Mutex::new(Conn::default()),
        };
        store
            .with(migrate)
            .map_err(|e| StoreError(format!("{}: {}", store.location, e.0)))?;
        Ok(store)
    }

    /// Runs `f` on the connection, connecting first if there is none. A failure that
    /// closed the connection drops it, so the next call reconnects.
    fn with<T: Send>(
        &self,
        f: impl FnOnce(&mut Client) -> Result<T, StoreError> + Send,
    ) -> Result<T, StoreError> {
        // The sync client drives its own runtime and panics inside another one; the
        // admin listener (a tokio runtime) asks for the store's health.
        if tokio::runtime::Handle::try_current().is_ok() {
            return std::thread::scope(|scope| {
                scope
                    .spawn(|| self.with_here(f))
                    .join()
                    .unwrap_or_else(|_| Err(StoreError("the store call panicked".into())))
            });
        }
        self.with_here(f)
    }

    fn with_here<T>(
        &self,
        f: impl FnOnce(&mut Client) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut conn = self
            .conn
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if conn.client.as_ref().is_some_and(Client::is_closed) {
            conn.client = None;
        }
        if conn.client.is_none() {
            if let Some((at, why)) = &conn.failed
                && at.elapsed() < RECONNECT_EVERY
            {
                return Err(StoreError(format!(
                    "PostgreSQL at {} is unreachable: {why}",
                    self.location
                )));
            }
            let connected = match &self.transport {
                Transport::Plain => self.config.connect(NoTls),
                Transport::Tls(tls) => self.config.connect(tls.clone()),
            };
            match connected {
                Ok(client) => {
                    if conn.failed.take().is_some() {
                        tracing::info!(store = %self.location, "PostgreSQL reachable again");
                    }
                    conn.client = Some(client);
                }
                Err(e) => {
                    let why = StoreError::from(e).0;
                    conn.failed = Some((Instant::now(), why.clone()));
                    return Err(StoreError(format!(
                        "cannot connect to PostgreSQL at {}: {why}",
                        self.location
                    )));
                }
            }
        }
        let Some(client) = conn.client.as_mut() else {
            return Err(StoreError("no PostgreSQL connection".into()));
        };
        let result = f(client);
        if result.is_err() && client.is_closed() {
            conn.client = None;
            conn.failed = Some((Instant::now(), "the connection was closed".into()));
        }
        result
    }

    /// Runs `f` in a transaction that holds the fleet-wide write lock; commits if it
    /// returns `Ok` (a refusal that wrote nothing commits nothing).
    fn write<T: Send>(
        &self,
        f: impl FnOnce(&mut postgres::Transaction<'_>) -> Result<T, StoreError> + Send,
    ) -> Result<T, StoreError> {
        self.with(|client| {
            let mut tx = client.transaction()?;
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&WRITE_LOCK])?;
            let out = f(&mut tx)?;
            tx.commit()?;
            Ok(out)
        })
    }
}

/// Applies migrations under the write lock (instances starting together migrate once).
fn migrate(client: &mut Client) -> Result<(), StoreError> {
    let mut tx = client.transaction()?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&WRITE_LOCK])?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS devgate_schema (version INTEGER NOT NULL)")?;
    let version: i32 = match tx.query_opt("SELECT version FROM devgate_schema", &[])? {
        Some(row) => row.try_get(0)?,
        None => {
            tx.execute("INSERT INTO devgate_schema (version) VALUES (0)", &[])?;
            0
        }
    };
    let known = i32::try_from(MIGRATIONS.len()).unwrap_or(i32::MAX);
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
        tx.batch_execute(sql).map_err(|e| {
            StoreError(format!(
                "migration {} failed: {}",
                i + 1,
                StoreError::from(e).0
            ))
        })?;
        let v = i32::try_from(i + 1).unwrap_or(i32::MAX);
        tx.execute("UPDATE devgate_schema SET version = $1", &[&v])?;
    }
    tx.commit()?;
    Ok(())
}

/// Appends to the change log the instances poll.
fn log_change(
    tx: &mut impl GenericClient,
    kind: &str,
    name: &str,
    now: i64,
) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO cred_changes (kind, name, at) VALUES ($1, $2, $3)",
        &[&kind, &name, &now],
    )?;
    Ok(())
}

/// Whether the latest revocation event of `unit` revokes it.
fn is_revoked(c: &mut impl GenericClient, unit: &str) -> Result<bool, StoreError> {
    Ok(
        match c.query_opt(
            "SELECT revoked FROM revocations WHERE unit = $1 ORDER BY seq DESC LIMIT 1",
            &[&unit],
        )? {
            Some(row) => row.try_get::<_, bool>(0)?,
            None => false,
        },
    )
}

/// A unit's registry row (see the SQLite store's `DeviceRow`).
struct DeviceRow {
    current: String,
    used_at: Option<i64>,
    reset_at: Option<i64>,
    key_id: Option<String>,
    prev: Option<String>,
    prev_until: Option<i64>,
}

impl DeviceRow {
    const COLUMNS: &'static str =
        "cert_fingerprint, cert_used_at, reset_at, key_id, prev_fingerprint, prev_until";

    /// From a row whose columns `at..` are [`Self::COLUMNS`].
    fn from_row(row: &postgres::Row, at: usize) -> Result<Self, StoreError> {
        Ok(Self {
            current: row.try_get(at)?,
            used_at: row.try_get(at + 1)?,
            reset_at: row.try_get(at + 2)?,
            key_id: row.try_get(at + 3)?,
            prev: row.try_get(at + 4)?,
            prev_until: row.try_get(at + 5)?,
        })
    }

    fn creds(&self) -> DeviceCreds {
        DeviceCreds {
            current: (!self.current.is_empty()).then(|| self.current.clone()),
            current_used: self.used_at.is_some(),
            previous: match (&self.prev, self.prev_until) {
                (Some(p), Some(u)) => Some((p.clone(), u)),
                _ => None,
            },
        }
    }
}

fn device_row(c: &mut impl GenericClient, unit: &str) -> Result<Option<DeviceRow>, StoreError> {
    let sql = format!("SELECT {} FROM devices WHERE unit = $1", DeviceRow::COLUMNS);
    c.query_opt(sql.as_str(), &[&unit])?
        .map(|row| DeviceRow::from_row(&row, 0))
        .transpose()
}

fn insert_manager_cert(
    tx: &mut impl GenericClient,
    name: &str,
    fingerprint: &str,
    now: i64,
    source: &str,
) -> Result<(), StoreError> {
    let n = tx.execute(
        "INSERT INTO manager_certs (name, fingerprint, issued_at, source) VALUES ($1, $2, $3, $4)
         ON CONFLICT (fingerprint) DO NOTHING",
        &[&name, &fingerprint, &now, &source],
    )?;
    if n > 0 {
        log_change(tx, "manager", name, now)?;
    }
    Ok(())
}

/// A stored count (never negative) as `u64`.
fn count(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

impl Store for PgStore {
    fn kind(&self) -> &'static str {
        "postgres"
    }
    fn location(&self) -> String {
        self.location.clone()
    }
    fn create_keys(&self, keys: &[NewKey]) -> Result<(), StoreError> {
        self.create_keys_impl(keys)
    }
    fn list_keys(&self) -> Result<Vec<KeyInfo>, StoreError> {
        self.list_keys_impl()
    }
    fn list_keys_page(
        &self,
        before: Option<i64>,
        limit: usize,
    ) -> Result<(Vec<KeyInfo>, Option<i64>), StoreError> {
        self.list_keys_page_impl(before, limit)
    }
    fn revoke_key(&self, id: &str, now: i64) -> Result<bool, StoreError> {
        self.revoke_key_impl(id, now)
    }
    fn enroll(
        &self,
        secret: &str,
        unit: &str,
        cert_fingerprint: &str,
        now: i64,
        retry_window_secs: i64,
    ) -> Result<KeyCheck, StoreError> {
        self.enroll_impl(secret, unit, cert_fingerprint, now, retry_window_secs)
    }
    fn register_device(&self, unit: &str, fp: &str, now: i64) -> Result<(), StoreError> {
        self.register_device_impl(unit, fp, now)
    }
    fn renew(
        &self,
        unit: &str,
        presented: &str,
        new_fingerprint: &str,
        now: i64,
        overlap_secs: i64,
    ) -> Result<KeyCheck, StoreError> {
        self.renew_impl(unit, presented, new_fingerprint, now, overlap_secs)
    }
    fn mark_cert_used(&self, unit: &str, fingerprint: &str, now: i64) -> Result<(), StoreError> {
        self.mark_cert_used_impl(unit, fingerprint, now)
    }
    fn reset_device(&self, unit: &str, now: i64) -> Result<bool, StoreError> {
        self.reset_device_impl(unit, now)
    }
    fn revoke_device(&self, unit: &str, now: i64) -> Result<UnitRevocation, StoreError> {
        self.revoke_device_impl(unit, now)
    }
    fn unrevoke_device(&self, unit: &str, now: i64) -> Result<bool, StoreError> {
        self.unrevoke_device_impl(unit, now)
    }
    fn revoke_cert(&self, fingerprint: &str, now: i64) -> Result<bool, StoreError> {
        self.revoke_cert_impl(fingerprint, now)
    }
    fn revoked_certs(&self) -> Result<Vec<String>, StoreError> {
        self.revoked_certs_impl()
    }
    fn cred_changes_since(&self, after: i64) -> Result<(Vec<CredChange>, i64), StoreError> {
        self.cred_changes_since_impl(after)
    }
    fn cred_change_head(&self) -> Result<i64, StoreError> {
        self.with(|c| {
            Ok(c.query_one(
                "SELECT COALESCE(MAX(seq), 0)::BIGINT FROM cred_changes",
                &[],
            )?
            .try_get(0)?)
        })
    }
    fn device_creds(&self, unit: &str) -> Result<Option<DeviceCreds>, StoreError> {
        self.with(|c| Ok(device_row(c, unit)?.as_ref().map(DeviceRow::creds)))
    }
    fn all_device_creds(&self) -> Result<Vec<(String, DeviceCreds)>, StoreError> {
        self.all_device_creds_impl()
    }
    fn record_manager_cert(
        &self,
        name: &str,
        fingerprint: &str,
        now: i64,
        source: &str,
    ) -> Result<(), StoreError> {
        self.write(|tx| insert_manager_cert(tx, name, fingerprint, now, source))
    }
    fn manager_certs(&self) -> Result<Vec<ManagerCert>, StoreError> {
        self.manager_certs_impl()
    }
    fn revoke_manager(&self, name: &str, now: i64) -> Result<usize, StoreError> {
        self.revoke_manager_impl(name, now)
    }
    fn manager_creds(&self, name: &str) -> Result<Option<Vec<String>>, StoreError> {
        self.manager_creds_impl(name)
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
        self.revocations_since_impl(after)
    }
    fn devices(&self) -> Result<Vec<DeviceRecord>, StoreError> {
        self.devices_impl()
    }
    fn create_pairing_token(&self, key: &NewKey) -> Result<(), StoreError> {
        self.create_pairing_token_impl(key)
    }
    fn pair_manager(
        &self,
        token: &str,
        name: &str,
        cert_fingerprint: &str,
        now: i64,
    ) -> Result<bool, StoreError> {
        self.pair_manager_impl(token, name, cert_fingerprint, now)
    }
    fn record_trust_acks(&self, acks: &[TrustAck], now: i64) -> Result<(), StoreError> {
        self.record_trust_acks_impl(acks, now)
    }
    fn trust_progress(&self, bundle: &str) -> Result<TrustProgress, StoreError> {
        self.trust_progress_impl(bundle)
    }
    fn fleet_sync(
        &self,
        instance: &str,
        devices: u64,
        set_limit: Option<u64>,
        now: i64,
        fresh_secs: i64,
    ) -> Result<FleetView, StoreError> {
        self.fleet_sync_impl(instance, devices, set_limit, now, fresh_secs)
    }
    fn health(&self) -> Result<(), StoreError> {
        self.with(|c| {
            let ok: i32 = c.query_one("SELECT 1", &[])?.try_get(0)?;
            if ok == 1 {
                Ok(())
            } else {
                Err(StoreError(
                    "health query returned an unexpected value".into(),
                ))
            }
        })
    }
}
