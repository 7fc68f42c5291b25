//! Several instances on one PostgreSQL store: the store contract on PostgreSQL, one-time
//! keys consumed once when instances race, revocations reaching every instance, and a
//! database outage that established sessions do not notice.
//!
//! Each test starts its own PostgreSQL cluster (Debian's `postgresql`, from
//! scripts/setup.sh) in a temp dir. Without it the tests are skipped with the reason,
//! unless `DEVGATE_REQUIRE_TOOLS` is set (CI), where that is a failure.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use devgate_client::{
    Body, ClientError, ConnectOptions, Connection, Frame, Incoming, Role, tls_config,
};
use devgate_tests::postgres::Postgres;
use devgate_tests::{DataDir, Gateway, binary};
use gateway::store::postgres::PgStore;
use gateway::store::{KeyCheck, KeyKind, Store, contract, generate_secret, new_key};

/// A cluster, or `None` (skip) with the reason printed.
fn postgres() -> Result<Option<Postgres>> {
    if let Some(why) = Postgres::missing() {
        if std::env::var_os("DEVGATE_REQUIRE_TOOLS").is_some() {
            bail!("{why}");
        }
        eprintln!("skipped: {why}");
        return Ok(None);
    }
    Ok(Some(Postgres::start()?))
}

/// One behaviour of `gateway::store::contract`.
type ContractCase = fn(&dyn Store);

#[test]
fn the_store_contract_holds_on_postgres() -> Result<()> {
    let Some(pg) = postgres()? else { return Ok(()) };
    let cases: [(&str, ContractCase); 7] = [
        (
            "one_time",
            contract::one_time_key_is_consumed_once_and_retry_by_same_unit_is_allowed,
        ),
        (
            "kinds",
            contract::bound_multi_expired_revoked_and_wrong_secret,
        ),
        (
            "revocation",
            contract::revocation_log_and_revoked_units_cannot_enroll,
        ),
        (
            "takeover",
            contract::enrolled_units_cannot_be_taken_over_and_reset_needs_a_fresh_bound_key,
        ),
        (
            "renewal",
            contract::renewal_needs_the_current_certificate_and_keeps_the_previous_for_the_overlap,
        ),
        (
            "managers",
            contract::manager_certificates_are_recorded_listed_and_revoked,
        ),
        (
            "trust",
            contract::trust_progress_counts_enrolled_unrevoked_devices_and_managers,
        ),
    ];
    for (name, case) in cases {
        let store = PgStore::open(&pg.create_db(name)?)?;
        case(&store);
        // Opening again finds the schema current and keeps the data.
        let again = PgStore::open(&pg.url(name))?;
        again.health()?;
    }
    Ok(())
}

#[test]
fn fifty_connections_racing_for_one_key_and_one_token_have_one_winner_each() -> Result<()> {
    let Some(pg) = postgres()? else { return Ok(()) };
    let url = pg.create_db("race")?;
    let first = PgStore::open(&url)?;
    let key = generate_secret();
    let token = generate_secret();
    first.create_keys(&[new_key(&key, KeyKind::OneTime, None, None, 1)])?;
    first.create_pairing_token(&new_key(&token, KeyKind::OneTime, None, None, 1))?;
    // One connection each, as 50 instances would have; all start together.
    let stores: Vec<PgStore> = (0..50)
        .map(|_| PgStore::open(&url))
        .collect::<Result<_, _>>()?;
    let barrier = Arc::new(std::sync::Barrier::new(stores.len()));
    let handles: Vec<_> = stores
        .into_iter()
        .enumerate()
        .map(|(i, s)| {
            let (key, token, barrier) = (key.clone(), token.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                let unit = format!("racer-{i}");
                let enrolled = s.enroll(&key, &unit, &format!("fp-{i}"), 2, 600);
                let paired = s.pair_manager(&token, &format!("mgr-{i}"), &format!("m-{i}"), 2);
                (enrolled, paired)
            })
        })
        .collect();
    let (mut enrolled, mut paired) = (0, 0);
    for h in handles {
        let (e, p) = h.join().map_err(|_| anyhow::anyhow!("racer panicked"))?;
        enrolled += usize::from(e? == KeyCheck::Accepted);
        paired += usize::from(p?);
    }
    assert_eq!(enrolled, 1, "a one-time key enrolled more than one unit");
    assert_eq!(paired, 1, "a pairing token paired more than one manager");
    assert_eq!(first.devices()?.len(), 1);
    Ok(())
}

/// A second data dir with the same PKI (a fleet shares its CAs and server certificate).
fn same_pki(data: &DataDir) -> Result<DataDir> {
    let dir = tempfile::tempdir()?;
    copy_tree(data.path(), dir.path())?;
    // The instance's own state stays its own: no SQLite file, pid file or lock.
    for name in ["devgate.db", "devgate.pid", "devgate.lock"] {
        let _ = std::fs::remove_file(dir.path().join(name));
    }
    Ok(DataDir {
        dir,
        fingerprint: data.fingerprint.clone(),
        pairing_token: data.pairing_token.clone(),
    })
}

fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            std::fs::create_dir_all(&target)?;
            copy_tree(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}

/// Runs `devgate ARGS…` against the PostgreSQL store at `url`.
fn devgate_pg(url: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(binary("devgate"))
        .args(args)
        .env("DEVGATE_STORE__URL", url)
        .env_remove("DEVGATE_CONFIG")
        .output()?;
    if !out.status.success() {
        bail!(
            "devgate {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Two instances on one PostgreSQL database.
fn two_instances(pg: &Postgres, db: &str) -> Result<(String, Gateway, Gateway)> {
    let url = pg.create_db(db)?;
    let first = DataDir::init()?;
    let second = same_pki(&first)?;
    let config = format!("[store]\nurl = \"{url}\"\n");
    let a = Gateway::start_in(first, &config)?;
    let b = Gateway::start_in(second, &config)?;
    Ok((url, a, b))
}

async fn enroll(
    gw: &Gateway,
    unit: &str,
    key: &str,
) -> Result<devgate_client::Enrolled, ClientError> {
    let roots =
        devgate_tests::roots(gw.data.path()).map_err(|e| ClientError::Config(e.to_string()))?;
    devgate_client::enroll(gw.addr, "localhost", &roots, unit, key).await
}

async fn connect_enrolled(gw: &Gateway, e: &devgate_client::Enrolled) -> Result<Connection> {
    let tls = tls_config(&devgate_tests::roots(gw.data.path())?, Some(e.identity()))?;
    Ok(devgate_client::connect(
        &ConnectOptions::new(gw.addr, "localhost", Role::Device),
        tls,
    )
    .await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_share_keys_and_revocations() -> Result<()> {
    let Some(pg) = postgres()? else { return Ok(()) };
    let (url, a, b) = two_instances(&pg, "shared")?;
    let status = a.status()?;
    assert_eq!(status["store"]["kind"], "postgres", "{status}");
    assert_eq!(status["store"]["ok"], true, "{status}");

    // 50 devices race for one one-time key, half through each instance.
    let key = devgate_pg(
        &url,
        &[
            "keys",
            "create",
            "--data-dir",
            &a.data_arg(),
            "--one-time",
            "1",
        ],
    )?;
    let key = key.trim().to_owned();
    let tasks: Vec<_> = (0..50)
        .map(|i| {
            let gw = if i % 2 == 0 { &a } else { &b };
            let (addr, roots) = (gw.addr, devgate_tests::roots(gw.data.path()));
            let key = key.clone();
            tokio::spawn(async move {
                let roots = roots.map_err(|e| ClientError::Config(e.to_string()))?;
                devgate_client::enroll(addr, "localhost", &roots, &format!("race-{i}"), &key).await
            })
        })
        .collect();
    let mut winners = Vec::new();
    for (i, t) in tasks.into_iter().enumerate() {
        match t.await? {
            Ok(e) => winners.push((i, e)),
            Err(ClientError::EnrollmentRefused | ClientError::RateLimited { .. }) => {}
            Err(e) => bail!("racer {i}: unexpected {e}"),
        }
    }
    assert_eq!(winners.len(), 1, "one key, several winners");
    let (winner_index, winner) = winners.remove(0);
    let unit = format!("race-{winner_index}");
    // The CLI reads the shared registry.
    let listed = devgate_pg(&url, &["devices", "list", "--data-dir", &b.data_arg()])?;
    assert!(listed.contains(&unit), "{listed}");

    // The winner connects to the instance that did not enroll it (its mirror learnt the
    // certificate from the store), and is revoked through the other one.
    let (holder, revoker) = if winner_index % 2 == 0 {
        (&b, &a)
    } else {
        (&a, &b)
    };
    let mut dev = connect_enrolled(holder, &winner).await?;
    let mut mgr = revoker.manager().await?;
    let request = format!(r#"{{"op":"revoke_device","unit":"{unit}"}}"#);
    mgr.send(&Frame::control(7, request.as_bytes())).await?;
    let asked = Instant::now();
    loop {
        let Some(Incoming::Frame(r)) = mgr.recv_timeout(Duration::from_secs(10)).await? else {
            bail!("no answer to revoke_device");
        };
        if r.frame().id == 7 {
            assert!(
                matches!(r.frame().body, Body::Control { .. }),
                "{:?}",
                r.frame().body
            );
            break;
        }
    }
    match dev.recv_timeout(Duration::from_secs(5)).await? {
        Some(Incoming::Closed { code, .. }) => assert_eq!(code, Some(1008)),
        other => bail!("revoked device not disconnected by the other instance: {other:?}"),
    }
    let took = asked.elapsed();
    eprintln!("revocation through one instance closed the session on the other in {took:?}");
    assert!(
        connect_enrolled(holder, &winner).await.is_err(),
        "revoked device reconnected"
    );
    Ok(())
}

/// Sends a command to `unit` and waits for its answer; the device side echoes.
async fn round_trip(mgr: &mut Connection, unit: &str, id: u32) -> Result<()> {
    mgr.send(&Frame::command(unit, id, b"ping")).await?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let Some(Incoming::Frame(r)) = mgr.recv_timeout(Duration::from_secs(10)).await? else {
            bail!("manager connection ended");
        };
        let f = r.frame();
        if f.id == id && f.unit == unit {
            return match f.body {
                Body::Response { .. } => Ok(()),
                other => bail!("command {id} to {unit}: {other:?}"),
            };
        }
    }
    bail!("no answer to command {id} for {unit}")
}

type Devices = Vec<(usize, String, tokio::task::JoinHandle<Result<()>>)>;

/// One command to every device through the manager on its instance.
async fn sweep(managers: &mut [Connection], devices: &Devices, id: &mut u32) -> Result<()> {
    for (g, unit, _) in devices {
        *id += 1;
        round_trip(&mut managers[*g], unit, *id).await?;
    }
    Ok(())
}

/// A device that answers every command with its payload until its connection ends.
fn echo(mut dev: Connection) -> tokio::task::JoinHandle<Result<()>> {
    tokio::spawn(async move {
        loop {
            match dev.recv_timeout(Duration::from_secs(120)).await? {
                Some(Incoming::Frame(r)) => {
                    let f = r.frame();
                    if let Body::Command { payload } = f.body {
                        dev.send(&Frame::response("", f.id, payload)).await?;
                    }
                }
                Some(Incoming::Closed { code, reason }) => {
                    bail!("device closed: {code:?} {reason}")
                }
                None => bail!("device idle for 120 s"),
            }
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_outage_keeps_sessions_and_enrollment_answers_503_until_it_is_back() -> Result<()>
{
    let Some(mut pg) = postgres()? else {
        return Ok(());
    };
    let (url, a, b) = two_instances(&pg, "outage")?;
    let keys = devgate_pg(
        &url,
        &["keys", "create", "--data-dir", &a.data_arg(), "--multi"],
    )?;
    let key = keys.trim().to_owned();
    let mut managers = vec![a.manager().await?, b.manager().await?];
    let mut devices: Devices = Vec::new();
    for (g, gw) in [&a, &b].into_iter().enumerate() {
        for i in 0..10 {
            let unit = format!("dev-{g}-{i}");
            let e = enroll(gw, &unit, &key).await?;
            devices.push((g, unit, echo(connect_enrolled(gw, &e).await?)));
        }
    }
    let mut id = 0u32;
    sweep(&mut managers, &devices, &mut id).await?;

    pg.stop()?;
    let outage = Instant::now();
    let mut refused_503 = 0;
    let mut sweeps = 0;
    // 30 s without the database: commands keep flowing, enrollment says 503.
    while outage.elapsed() < Duration::from_secs(30) {
        sweep(&mut managers, &devices, &mut id).await?;
        sweeps += 1;
        match enroll(&a, &format!("late-{sweeps}"), &key).await {
            Err(ClientError::Refused { status: 503, .. }) => refused_503 += 1,
            other => bail!("enrollment during the outage: {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(refused_503 > 0);
    let status = a.status()?;
    assert_eq!(
        status["store"]["ok"], false,
        "status during the outage: {status}"
    );
    for (_, unit, task) in &devices {
        assert!(
            !task.is_finished(),
            "{unit}'s session ended during the outage"
        );
    }
    assert!(
        a.logs().contains("enrollment answered 503"),
        "no log line says why enrollment fails"
    );

    pg.resume()?;
    // Back by itself: the next attempts reconnect (spaced a second apart).
    let back = Instant::now();
    let mut enrolled = None;
    for attempt in 0..20 {
        match enroll(&b, &format!("after-{attempt}"), &key).await {
            Ok(e) => {
                enrolled = Some(e);
                break;
            }
            Err(ClientError::Refused { status: 503, .. }) => {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => bail!("enrollment after the outage: {e}"),
        }
    }
    let e = enrolled.context("enrollment still failing 10 s after the database came back")?;
    eprintln!(
        "outage of 30 s: {sweeps} command sweeps over {} devices, {refused_503} enrollments answered 503; enrollment worked again {:?} after the restart",
        devices.len(),
        back.elapsed()
    );
    // The new device is known to the other instance too.
    drop(connect_enrolled(&a, &e).await?);
    sweep(&mut managers, &devices, &mut id).await?;
    for (_, unit, task) in &devices {
        assert!(!task.is_finished(), "{unit}'s session ended");
    }
    // Instance a reconnects by itself too (its store thread polls every second).
    wait_status(&a, "a's store healthy again", |v| v["store"]["ok"] == true)?;
    Ok(())
}

/// Enrollments per second against each store, in the same run: `cargo build --bins &&
/// cargo test -p devgate-tests --test fleet -- --ignored --nocapture enrollment_rate` (a
/// figure, not a check; docs/OPERATIONS.md quotes it).
#[ignore = "a measurement: run it by name"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrollment_rate_postgres_versus_sqlite() -> Result<()> {
    let Some(pg) = postgres()? else { return Ok(()) };
    let url = pg.create_db("rate")?;
    const N: usize = 400;
    const PARALLEL: usize = 8;
    for (name, config) in [
        ("sqlite", String::new()),
        ("postgres", format!("[store]\nurl = \"{url}\"\n")),
    ] {
        let gw = Gateway::start(&config)?;
        let keys = if name == "postgres" {
            devgate_pg(
                &url,
                &[
                    "keys",
                    "create",
                    "--data-dir",
                    &gw.data_arg(),
                    "--one-time",
                    &N.to_string(),
                ],
            )?
        } else {
            let (ok, out, err) = devgate_tests::devgate(&[
                "keys",
                "create",
                "--data-dir",
                &gw.data_arg(),
                "--one-time",
                &N.to_string(),
            ])?;
            if !ok {
                bail!("keys create: {err}");
            }
            out
        };
        let keys: Vec<String> = keys.lines().map(str::to_owned).collect();
        let roots = devgate_tests::roots(gw.data.path())?;
        let started = Instant::now();
        let chunks: Vec<Vec<(usize, String)>> = (0..PARALLEL)
            .map(|p| {
                keys.iter()
                    .cloned()
                    .enumerate()
                    .filter(|(i, _)| i % PARALLEL == p)
                    .collect()
            })
            .collect();
        let tasks: Vec<_> = chunks
            .into_iter()
            .map(|chunk| {
                let (addr, roots) = (gw.addr, roots.clone());
                tokio::spawn(async move {
                    for (i, key) in chunk {
                        devgate_client::enroll(
                            addr,
                            "localhost",
                            &roots,
                            &format!("rate-{i}"),
                            &key,
                        )
                        .await?;
                    }
                    Ok::<_, ClientError>(())
                })
            })
            .collect();
        for t in tasks {
            t.await??;
        }
        let secs = started.elapsed().as_secs_f64();
        eprintln!(
            "{name}: {N} enrollments ({PARALLEL} in parallel) in {secs:.2} s = {:.0}/s",
            N as f64 / secs
        );
    }
    Ok(())
}

/// Waits until `f` holds for `gw`'s status (at most 10 s).
fn wait_status(gw: &Gateway, what: &str, f: impl Fn(&serde_json::Value) -> bool) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let v = gw.status()?;
        if f(&v) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{what}: not within 10 s; status: {v}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_device_limit_can_span_the_fleet_and_a_manager_changes_it_everywhere() -> Result<()> {
    let Some(pg) = postgres()? else { return Ok(()) };
    let url = pg.create_db("limit")?;
    let first = DataDir::init()?;
    let second = same_pki(&first)?;
    let config = format!(
        "[limits]\ndevice_limit = 4\ndevice_limit_scope = \"fleet\"\n[store]\nurl = \"{url}\"\n"
    );
    let a = Gateway::start_in(first, &format!("instance_id = \"gw-a\"\n{config}"))?;
    let b = Gateway::start_in(second, &format!("instance_id = \"gw-b\"\n{config}"))?;
    assert_eq!(a.status()?["instance"], "gw-a");
    let (_, metrics) = b.admin_get("/metrics")?;
    assert!(
        metrics.contains("instance=\"gw-b\""),
        "no instance label in /metrics"
    );
    let _mgr_a = a.manager().await?;
    let mut mgr_b = b.manager().await?;
    let mut on_a = Vec::new();
    for i in 0..3 {
        on_a.push(a.device(&format!("lim-a{i}")).await?);
    }
    wait_status(&b, "b sees a's 3 devices", |v| {
        v["limits"]["fleet_devices_elsewhere"] == 3
    })?;
    let fourth = b.device("lim-b0").await?;
    match b.device("lim-b1").await {
        Err(ClientError::Refused { status: 503, .. }) => {}
        other => bail!(
            "a fifth device in a fleet limited to 4: {:?}",
            other.map(|_| ())
        ),
    }
    // A manager on b raises the limit: a applies it too.
    mgr_b
        .send(&Frame::control(
            1,
            br#"{"op":"set_device_limit","limit":6}"#,
        ))
        .await?;
    wait_status(&a, "the new limit reaches a", |v| {
        v["limits"]["device_limit"] == 6
    })?;
    wait_status(&a, "a sees b's device", |v| {
        v["limits"]["fleet_devices_elsewhere"] == 1
    })?;
    on_a.push(a.device("lim-a3").await?);
    on_a.push(a.device("lim-a4").await?);
    match a.device("lim-a5").await {
        Err(ClientError::Refused { status: 503, .. }) => {}
        other => bail!(
            "a seventh device in a fleet limited to 6: {:?}",
            other.map(|_| ())
        ),
    }
    drop(fourth);
    Ok(())
}
