//! Enrollment, key kinds, revocation, pairing and first contact against the real binary.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use devgate_client::{
    Body, ClientError, ConnectOptions, Frame, Incoming, PresenceReason, Role, tls_config,
};
use devgate_tests::{DataDir, Gateway, devgate};

/// Creates keys with the CLI; returns them (one per line).
fn keys(gw_dir: &str, args: &[&str]) -> Result<Vec<String>> {
    let mut all = vec!["keys", "create", "--data-dir", gw_dir];
    all.extend_from_slice(args);
    let (ok, out, err) = devgate(&all)?;
    if !ok {
        bail!("keys create failed: {err}");
    }
    Ok(out.lines().map(str::to_owned).collect())
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

async fn connect_enrolled(
    gw: &Gateway,
    e: &devgate_client::Enrolled,
) -> Result<devgate_client::Connection> {
    let roots = devgate_tests::roots(gw.data.path())?;
    let tls = tls_config(&roots, Some(e.identity()))?;
    Ok(devgate_client::connect(
        &ConnectOptions::new(gw.addr, "localhost", Role::Device),
        tls,
    )
    .await?)
}

fn refused(r: &Result<devgate_client::Enrolled, ClientError>) -> bool {
    matches!(
        r,
        Err(ClientError::EnrollmentRefused | ClientError::RateLimited { .. })
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_key_kind_behaves_and_enrolled_devices_connect_with_mutual_tls() -> Result<()> {
    let gw = Gateway::start("")?;
    let dir = gw.data_arg();
    let mut mgr = gw.manager().await?;

    // One-time: the first device wins, a second device is refused.
    let one = keys(&dir, &["--one-time", "2"])?;
    assert_eq!(one.len(), 2, "one key per line");
    let e = enroll(&gw, "ot-1", &one[0]).await?;
    assert!(
        refused(&enroll(&gw, "ot-2", &one[0]).await),
        "one-time key used twice"
    );
    // The enrolled credential works: connect and answer a command.
    let mut dev = connect_enrolled(&gw, &e).await?;
    loop {
        let r = mgr
            .recv_timeout(Duration::from_secs(10))
            .await?
            .context("presence")?;
        if let Incoming::Frame(r) = r
            && r.frame().unit == "ot-1"
        {
            break;
        }
    }
    mgr.send(&Frame::command("ot-1", 5, b"hello")).await?;
    let Some(Incoming::Frame(cmd)) = dev.recv_timeout(Duration::from_secs(10)).await? else {
        bail!("no command")
    };
    dev.send(&Frame::response("", cmd.frame().id, b"hi"))
        .await?;

    // Bound: the wrong unit is refused, the right one enrolled.
    let bound = keys(&dir, &["--unit", "bound-a", "bound-b"])?;
    assert_eq!(bound.len(), 2);
    assert!(
        refused(&enroll(&gw, "bound-b", &bound[0]).await),
        "bound key used by the wrong unit"
    );
    enroll(&gw, "bound-a", &bound[0]).await?;
    enroll(&gw, "bound-b", &bound[1]).await?;

    // Multi-use: many devices.
    let multi = keys(&dir, &["--multi", "--value", "mass-deploy-2026-secret"])?;
    assert_eq!(multi, vec!["mass-deploy-2026-secret".to_owned()]);
    for i in 0..5 {
        enroll(&gw, &format!("multi-{i}"), &multi[0]).await?;
    }

    // Expired and revoked keys.
    let expiring = keys(&dir, &["--one-time", "1", "--expires", "1s"])?;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert!(
        refused(&enroll(&gw, "late", &expiring[0]).await),
        "expired key accepted"
    );
    let revoked = keys(&dir, &["--multi"])?;
    let (_, list, _) = devgate(&["keys", "list", "--data-dir", &dir, "--json"])?;
    let list: serde_json::Value = serde_json::from_str(&list)?;
    let id = list
        .as_array()
        .and_then(|a| a.iter().find(|k| k["kind"] == "multi" && k["uses"] == 0))
        .and_then(|k| k["id"].as_str())
        .context("the new multi key in keys list")?
        .to_owned();
    let (ok, _, err) = devgate(&["keys", "revoke", "--data-dir", &dir, &id])?;
    assert!(ok, "{err}");
    assert!(
        refused(&enroll(&gw, "rv", &revoked[0]).await),
        "revoked key accepted"
    );
    // keys list never shows a secret.
    let (_, text, _) = devgate(&["keys", "list", "--data-dir", &dir])?;
    for k in one.iter().chain(&bound).chain(&multi).chain(&revoked) {
        assert!(!text.contains(k.as_str()), "keys list shows a secret");
    }
    // No secret in any log line either.
    let logs = gw.logs();
    for k in one
        .iter()
        .chain(&bound)
        .chain(&multi)
        .chain(&expiring)
        .chain(&revoked)
    {
        assert!(
            !logs.contains(k.as_str()),
            "a key appears in the gateway log"
        );
    }
    assert!(
        logs.contains("enrollment refused"),
        "refusals are logged for the operator"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_devices_racing_for_one_one_time_key_enroll_exactly_one() -> Result<()> {
    let gw = Gateway::start("")?;
    let key = keys(&gw.data_arg(), &["--one-time", "1"])?.remove(0);
    let roots = devgate_tests::roots(gw.data.path())?;
    let mut tasks = Vec::new();
    for i in 0..50 {
        let (roots, key, addr) = (roots.clone(), key.clone(), gw.addr);
        tasks.push(tokio::spawn(async move {
            devgate_client::enroll(addr, "localhost", &roots, &format!("racer-{i:02}"), &key).await
        }));
    }
    let mut winners = 0;
    for t in tasks {
        match t.await? {
            Ok(_) => winners += 1,
            Err(ClientError::EnrollmentRefused | ClientError::RateLimited { .. }) => {}
            Err(e) => bail!("unexpected enrollment error: {e}"),
        }
    }
    assert_eq!(winners, 1, "exactly one device may win a one-time key");
    let (_, devices, _) = devgate(&["devices", "list", "--data-dir", &gw.data_arg()])?;
    assert_eq!(
        devices.lines().filter(|l| l.starts_with("racer-")).count(),
        1,
        "{devices}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_enrollment_loses_no_device_and_reuses_no_key() -> Result<()> {
    let gw = Gateway::start("")?;
    let dir = gw.data_arg();
    let ks = keys(&dir, &["--one-time", "200"])?;
    let roots = devgate_tests::roots(gw.data.path())?;
    let mut tasks = Vec::new();
    for (i, key) in ks.iter().enumerate() {
        let (roots, key, addr) = (roots.clone(), key.clone(), gw.addr);
        tasks.push(tokio::spawn(async move {
            let unit = format!("crash-{i:03}");
            let r = devgate_client::enroll(addr, "localhost", &roots, &unit, &key).await;
            (unit, key, r.is_ok())
        }));
    }
    // Crash the gateway while the enrollments are in flight.
    tokio::time::sleep(Duration::from_millis(150)).await;
    let data = gw.kill9()?;
    let mut outcomes = Vec::new();
    for t in tasks {
        outcomes.push(t.await?);
    }
    let answered: Vec<_> = outcomes.iter().filter(|o| o.2).collect();
    eprintln!(
        "{} of 200 enrollments answered before the crash",
        answered.len()
    );
    let gw = Gateway::start_in(data, "")?;
    let (_, devices, _) = devgate(&["devices", "list", "--data-dir", &gw.data_arg()])?;
    let registered: HashSet<&str> = devices
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    for (unit, _, _) in &answered {
        assert!(
            registered.contains(unit.as_str()),
            "{unit} got its certificate but is not in the registry"
        );
    }
    // Every key consumed before the crash is refused to another unit; every key the store
    // did not consume still works once.
    let (_, list, _) = devgate(&["keys", "list", "--data-dir", &gw.data_arg(), "--json"])?;
    let list: serde_json::Value = serde_json::from_str(&list)?;
    let used: HashSet<String> = list
        .as_array()
        .context("keys")?
        .iter()
        .filter(|k| !k["used_by"].is_null())
        .filter_map(|k| k["id"].as_str().map(str::to_owned))
        .collect();
    assert!(used.len() >= answered.len());
    let mut reused = 0;
    for (i, (_, key, _)) in outcomes.iter().enumerate().take(60) {
        let r = enroll(&gw, &format!("thief-{i:03}"), key).await;
        if r.is_ok() {
            reused += 1;
            let id = devgate_tests_key_id(key);
            assert!(
                !used.contains(&id),
                "key {id} was consumed before the crash and used again after it"
            );
        }
    }
    eprintln!("{reused} of 60 unconsumed keys enrolled a device after the restart");
    Ok(())
}

/// The key id `devgate keys list` shows (same derivation as the gateway's store).
fn devgate_tests_key_id(secret: &str) -> String {
    gateway::store::key_id(secret)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_disconnects_the_device_at_once_and_refuses_it_afterwards() -> Result<()> {
    let gw = Gateway::start("")?;
    let dir = gw.data_arg();
    let mut mgr = gw.manager().await?;
    let key = keys(&dir, &["--multi"])?.remove(0);
    let enrolled = enroll(&gw, "stolen", &key).await?;
    let mut dev = connect_enrolled(&gw, &enrolled).await?;
    let started = Instant::now();
    let (ok, _, err) = devgate(&["devices", "revoke", "--data-dir", &dir, "stolen"])?;
    assert!(ok, "{err}");
    match dev.recv_timeout(Duration::from_secs(5)).await? {
        Some(Incoming::Closed { code, .. }) => assert_eq!(code, Some(1008)),
        other => bail!("revoked device not disconnected: {other:?}"),
    }
    eprintln!(
        "revoked device disconnected {:?} after `devgate devices revoke`",
        started.elapsed()
    );
    // Managers learn it went offline.
    loop {
        let Some(Incoming::Frame(r)) = mgr.recv_timeout(Duration::from_secs(5)).await? else {
            bail!("no presence")
        };
        if let Body::Presence {
            online: false,
            reason,
        } = r.frame().body
        {
            assert_eq!(r.frame().unit, "stolen");
            assert_eq!(reason, PresenceReason::ClosedByGateway);
            break;
        }
    }
    // It cannot come back, neither with its certificate nor by enrolling again.
    assert!(connect_enrolled(&gw, &enrolled).await.is_err());
    assert!(refused(&enroll(&gw, "stolen", &key).await));
    // A manager revokes another device with a control frame.
    let other = enroll(&gw, "other", &key).await?;
    let mut dev2 = connect_enrolled(&gw, &other).await?;
    mgr.send(&Frame::control(
        3,
        br#"{"op":"revoke_device","unit":"other"}"#,
    ))
    .await?;
    match dev2.recv_timeout(Duration::from_secs(5)).await? {
        Some(Incoming::Closed { code, .. }) => assert_eq!(code, Some(1008)),
        other => bail!("device revoked by a manager not disconnected: {other:?}"),
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn managers_create_keys_by_control_frame_and_pair_with_the_init_token() -> Result<()> {
    let gw = Gateway::start("")?;
    let mut mgr = gw.manager().await?;
    mgr.send(&Frame::control(
        1,
        br#"{"op":"create_keys","kind":"bound","units":["ctl-dev"]}"#,
    ))
    .await?;
    let key = loop {
        let Some(Incoming::Frame(r)) = mgr.recv_timeout(Duration::from_secs(10)).await? else {
            bail!("no reply")
        };
        if let Body::Control { payload } = r.frame().body {
            let v: serde_json::Value = serde_json::from_slice(payload)?;
            break v["keys"][0]["key"].as_str().context("key")?.to_owned();
        }
    };
    enroll(&gw, "ctl-dev", &key).await?;
    assert!(
        !gw.logs().contains(&key),
        "a key created by a manager appears in the log"
    );

    // Pairing: the token printed by `devgate init` yields a manager certificate once.
    let pair = |name: &'static str| {
        let (addr, token, roots) = (
            gw.addr,
            gw.data.pairing_token.clone(),
            devgate_tests::roots(gw.data.path()),
        );
        async move {
            let roots = roots?;
            let key = rcgen::KeyPair::generate()?;
            let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, name);
            let csr = params.serialize_request(&key)?.pem()?;
            let body = serde_json::json!({"name": name, "token": token, "csr": csr}).to_string();
            let (status, resp) = devgate_client::http_post(
                addr,
                "localhost",
                tls_config(&roots, None)?,
                "/v1/pair",
                "application/json",
                body.as_bytes(),
            )
            .await?;
            anyhow::Ok((status, resp, key, roots))
        }
    };
    let (status, resp, key, roots) = pair("ums-2").await?;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&resp));
    let v: serde_json::Value = serde_json::from_slice(&resp)?;
    let chain = devgate_client::certs_from_pem(
        v["certificate_chain"].as_str().context("chain")?.as_bytes(),
    )?;
    let key_der = rustls_pki_types::PrivateKeyDer::try_from(key.serialize_der())
        .map_err(anyhow::Error::msg)?;
    let tls = tls_config(&roots, Some((chain, key_der)))?;
    devgate_client::connect(
        &ConnectOptions::new(gw.addr, "localhost", Role::Manager),
        tls,
    )
    .await?;
    let (status, _, _, _) = pair("ums-3").await?;
    assert_eq!(status, 401, "a pairing token works only once");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_contact_checks_the_typed_fingerprint_group_then_enrolls() -> Result<()> {
    let gw = Gateway::start("")?;
    let contact =
        devgate_client::fetch_gateway_root(gw.addr, "localhost", Duration::from_secs(5)).await?;
    assert_eq!(
        contact.fingerprint, gw.data.fingerprint,
        "the device sees the root that `devgate init` printed"
    );
    let hidden = 2;
    let typed = gw
        .data
        .fingerprint
        .split(' ')
        .nth(hidden)
        .context("group")?
        .to_lowercase();
    assert!(contact.confirm(hidden, "0000000000000000").is_err());
    let roots = contact.confirm(hidden, &typed)?;
    let key = keys(&gw.data_arg(), &["--one-time", "1"])?.remove(0);
    let enrolled =
        devgate_client::enroll(gw.addr, "localhost", &roots, "fresh-device", &key).await?;
    let tls = tls_config(&roots, Some(enrolled.identity()))?;
    devgate_client::connect(
        &ConnectOptions::new(gw.addr, "localhost", Role::Device),
        tls,
    )
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_enrollments_are_rate_limited_per_source_address() -> Result<()> {
    let gw = Gateway::start("")?;
    let mut limited = false;
    for i in 0..30 {
        match enroll(&gw, &format!("guess-{i}"), "AAAA-BBBB-CCCC-DDDD-EEEE").await {
            Err(ClientError::RateLimited { retry_after }) => {
                assert!(retry_after.is_some_and(|d| d >= Duration::from_secs(1)));
                limited = true;
                break;
            }
            Err(ClientError::EnrollmentRefused) => {}
            other => bail!("unexpected: {:?}", other.map(|_| ())),
        }
    }
    assert!(
        limited,
        "30 wrong keys from one address were never rate-limited"
    );
    assert!(gw.status()?["counters"]["enroll_rate_limited"].as_u64() >= Some(1));
    Ok(())
}

#[test]
fn cert_import_explains_every_fault_and_accepts_a_good_chain() -> Result<()> {
    let data = DataDir::init()?;
    let dir = data.path().display().to_string();
    let work = tempfile::tempdir()?;
    let p = |f: &str| work.path().join(f).display().to_string();
    let (ok, out, err) = devgate(&[
        "cert",
        "create-root",
        "--cert",
        &p("root.pem"),
        "--key",
        &p("root.key"),
    ])?;
    assert!(ok, "{err}");
    assert!(out.starts_with("Root fingerprint: "));
    let (ok, _, err) = devgate(&[
        "cert",
        "create-server",
        "--ca-cert",
        &p("root.pem"),
        "--ca-key",
        &p("root.key"),
        "--name",
        "localhost,127.0.0.1",
        "--chain",
        &p("chain.pem"),
        "--key",
        &p("server.key"),
    ])?;
    assert!(ok, "{err}");
    // Wrong key and a name the certificate does not cover: two faults, two lines.
    let (ok, _, err) = devgate(&[
        "cert",
        "import",
        "--data-dir",
        &dir,
        "--chain",
        &p("chain.pem"),
        "--key",
        &p("root.key"),
        "--name",
        "localhost,gw.example.com",
    ])?;
    assert!(!ok, "a bad chain was imported");
    let fault_lines: Vec<&str> = err.lines().filter(|l| !l.starts_with("devgate:")).collect();
    assert_eq!(fault_lines.len(), 2, "{err}");
    assert!(err.contains("private key does not match"), "{err}");
    assert!(err.contains("gw.example.com"), "{err}");
    // The good chain installs (its root is new and not staged: only with --force, see
    // rails.rs for the refusal); `cert check` agrees.
    let (ok, out, err) = devgate(&[
        "cert",
        "import",
        "--data-dir",
        &dir,
        "--chain",
        &p("chain.pem"),
        "--key",
        &p("server.key"),
        "--force",
    ])?;
    assert!(ok, "{err}");
    assert!(out.contains("Root fingerprint: "));
    let (ok, out, err) = devgate(&["cert", "check", "--data-dir", &dir])?;
    assert!(ok, "{out}{err}");
    Ok(())
}
