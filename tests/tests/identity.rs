//! Credentials bound to certificates (issue 11, items 1–3): no takeover of an enrolled unit
//! by re-enrollment, `devices reset`, renewal over mutual TLS, revocation by certificate,
//! recorded and revocable manager certificates, and validated unit-ID inputs — against the
//! real binary.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use devgate_client::{
    Body, ClientError, ConnectOptions, Connection, Frame, Incoming, Role, tls_config,
};
use devgate_tests::{Gateway, devgate};

fn keys(dir: &str, args: &[&str]) -> Result<Vec<String>> {
    let mut all = vec!["keys", "create", "--data-dir", dir];
    all.extend_from_slice(args);
    let (ok, out, err) = devgate(&all)?;
    if !ok {
        bail!("keys create failed: {err}");
    }
    Ok(out.lines().map(str::to_owned).collect())
}

/// Runs `devgate ARGS…` and expects success; returns stdout.
fn ok(args: &[&str]) -> Result<String> {
    let (ok, out, err) = devgate(args)?;
    if !ok {
        bail!("devgate {args:?} failed: {err}");
    }
    Ok(out)
}

/// Runs `devgate ARGS…` and expects a failure with one clear line on stderr.
fn fails(args: &[&str]) -> Result<String> {
    let (ok, out, err) = devgate(args)?;
    if ok {
        bail!("devgate {:?} succeeded: {out}", short(args));
    }
    let err = err.trim_end().to_owned();
    assert_eq!(err.lines().count(), 1, "one line, got: {err}");
    assert!(err.len() < 400, "a short line, got {} bytes", err.len());
    Ok(err)
}

fn short(args: &[&str]) -> Vec<String> {
    args.iter().map(|a| a.chars().take(40).collect()).collect()
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

async fn connect_as(
    gw: &Gateway,
    role: Role,
    identity: (
        Vec<rustls_pki_types::CertificateDer<'static>>,
        rustls_pki_types::PrivateKeyDer<'static>,
    ),
) -> Result<Connection, ClientError> {
    let roots =
        devgate_tests::roots(gw.data.path()).map_err(|e| ClientError::Config(e.to_string()))?;
    let tls = tls_config(&roots, Some(identity))?;
    devgate_client::connect(&ConnectOptions::new(gw.addr, "localhost", role), tls).await
}

/// A credential written by `devgate devices issue` / `managers issue`.
fn load_identity(
    dir: &Path,
    name: &str,
) -> Result<(
    Vec<rustls_pki_types::CertificateDer<'static>>,
    rustls_pki_types::PrivateKeyDer<'static>,
)> {
    Ok((
        devgate_pki::load_certs(&dir.join(format!("{name}.pem")))?,
        devgate_pki::load_key(&dir.join(format!("{name}.key")))?,
    ))
}

type Identity = (
    Vec<rustls_pki_types::CertificateDer<'static>>,
    rustls_pki_types::PrivateKeyDer<'static>,
);

fn dup(id: &Identity) -> Identity {
    (id.0.clone(), id.1.clone_key())
}

fn refused_403(r: &Result<Connection, ClientError>) -> bool {
    matches!(r, Err(ClientError::Refused { status: 403, .. }))
}

/// Waits (bounded) for the connection to be closed by the gateway; returns the close code.
async fn closed_within(conn: &mut Connection, limit: Duration) -> Result<Option<u16>> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        match conn.recv_timeout(deadline - Instant::now()).await {
            Ok(Some(Incoming::Closed { code, .. })) => return Ok(code),
            Ok(Some(Incoming::Frame(_))) => {}
            Ok(None) => bail!("not closed within {limit:?}"),
            Err(_) => return Ok(None),
        }
    }
    bail!("not closed within {limit:?}")
}

/// Checks that a command from the manager reaches the device (the gateway assigns its own
/// request ids, so the payload identifies it).
async fn command_reaches(
    mgr: &mut Connection,
    dev: &mut Connection,
    unit: &str,
    id: u32,
) -> Result<()> {
    let payload = format!("ping-{id}");
    mgr.send(&Frame::command(unit, id, payload.as_bytes()))
        .await?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        match dev.recv_timeout(deadline - Instant::now()).await? {
            Some(Incoming::Frame(f)) if matches!(f.frame().body, Body::Command { payload: p } if p == payload.as_bytes()) =>
            {
                return Ok(());
            }
            Some(Incoming::Frame(_)) => {}
            other => bail!("the device did not get the command: {other:?}"),
        }
    }
    bail!("no command within 10 s")
}

async fn wait_online(mgr: &mut Connection, unit: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Some(Incoming::Frame(f)) = mgr.recv_timeout(deadline - Instant::now()).await?
            && f.frame().unit == unit
            && matches!(f.frame().body, Body::Presence { online: true, .. })
        {
            return Ok(());
        }
    }
    bail!("{unit} not online within 10 s")
}

/// Waits (bounded) until the gateway refuses `identity` with 403: the store thread applies
/// changes made by another process within about a second.
async fn eventually_refused(gw: &Gateway, role: Role, identity: &Identity) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = connect_as(gw, role, dup(identity)).await;
        if refused_403(&r) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("still accepted after 5 s: {:?}", r.map(|_| ()));
        }
        drop(r);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn fingerprint_of(chain: &[rustls_pki_types::CertificateDer<'static>]) -> Result<String> {
    Ok(devgate_pki::fingerprint(
        chain.first().context("empty chain")?.as_ref(),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_enrolled_online_device_cannot_be_taken_over_and_reset_allows_a_fresh_bound_key()
-> Result<()> {
    let gw = Gateway::start("")?;
    let dir = gw.data_arg();
    let mut mgr = gw.manager().await?;
    let multi = keys(&dir, &["--multi"])?.remove(0);
    let one_time = keys(&dir, &["--one-time", "1"])?.remove(0);
    let real = enroll(&gw, "00:E0:C5:12:34:56", &multi).await?;
    let mut dev = connect_as(&gw, Role::Device, real.identity()).await?;
    wait_online(&mut mgr, "00:E0:C5:12:34:56").await?;

    // The attacker holds a multi-use key and an unbound one-time key: both refused.
    for key in [&multi, &one_time] {
        match enroll(&gw, "00:E0:C5:12:34:56", key).await {
            Err(ClientError::EnrollmentRefused) => {}
            other => bail!("takeover not refused: {:?}", other.map(|_| ())),
        }
    }
    assert!(
        gw.wait_for_log("already_enrolled", Duration::from_secs(5)),
        "the log says why: {}",
        gw.logs()
    );
    // The real device is still connected and still gets its commands.
    command_reaches(&mut mgr, &mut dev, "00:E0:C5:12:34:56", 7).await?;
    let (_, metrics) = gw.admin_get("/metrics")?;
    let refused: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("devgate_enrollments_refused_total "))
        .context("enrollments_refused counter")?
        .trim()
        .parse()?;
    assert!(refused >= 2, "refusals counted: {refused}");
    // The unbound one-time key was not consumed by the refused attempt.
    enroll(&gw, "another-unit", &one_time).await?;

    // The operator resets the unit: the old credential is disconnected and refused.
    let started = Instant::now();
    ok(&["devices", "reset", "--data-dir", &dir, "00:E0:C5:12:34:56"])?;
    assert_eq!(
        closed_within(&mut dev, Duration::from_secs(5)).await?,
        Some(1008)
    );
    eprintln!("reset device disconnected after {:?}", started.elapsed());
    assert!(refused_403(
        &connect_as(&gw, Role::Device, real.identity()).await
    ));
    // After the reset only a key bound to the unit, created after the reset, enrolls it.
    assert!(matches!(
        enroll(&gw, "00:E0:C5:12:34:56", &multi).await,
        Err(ClientError::EnrollmentRefused)
    ));
    let bound = keys(&dir, &["--unit", "00:E0:C5:12:34:56"])?.remove(0);
    let fresh = enroll(&gw, "00:E0:C5:12:34:56", &bound).await?;
    let mut dev = connect_as(&gw, Role::Device, fresh.identity()).await?;
    wait_online(&mut mgr, "00:E0:C5:12:34:56").await?;
    command_reaches(&mut mgr, &mut dev, "00:E0:C5:12:34:56", 8).await?;
    assert!(refused_403(
        &connect_as(&gw, Role::Device, real.identity()).await
    ));
    fails(&["devices", "reset", "--data-dir", &dir, "never-enrolled"])?;
    // A manager can reset a unit too.
    mgr.send(&Frame::control(
        30,
        br#"{"op":"reset_device","unit":"00:E0:C5:12:34:56"}"#,
    ))
    .await?;
    assert_eq!(
        closed_within(&mut dev, Duration::from_secs(5)).await?,
        Some(1008)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewal_over_mutual_tls_replaces_the_certificate_after_its_first_use() -> Result<()> {
    let gw = Gateway::start("")?;
    let dir = gw.data_arg();
    let _mgr = gw.manager().await?;
    let multi = keys(&dir, &["--multi"])?.remove(0);
    let old = enroll(&gw, "renewer", &multi).await?;
    let dev = connect_as(&gw, Role::Device, old.identity()).await?;
    let roots = devgate_tests::roots(gw.data.path())?;

    // Without a client certificate there is nothing to renew.
    let anon = devgate_client::http_post(
        gw.addr,
        "localhost",
        tls_config(&roots, None)?,
        "/v1/renew",
        "application/json",
        b"{\"csr\":\"x\"}",
    )
    .await?;
    assert_eq!(anon.0, 401);

    let new =
        devgate_client::renew(gw.addr, "localhost", &roots, "renewer", old.identity()).await?;
    assert_ne!(fingerprint_of(&new.chain)?, fingerprint_of(&old.chain)?);
    // The overlap: the old certificate still works until the new one is used.
    let again = connect_as(&gw, Role::Device, old.identity()).await?;
    drop(again);
    drop(dev);
    let _dev = connect_as(&gw, Role::Device, new.identity()).await?;
    // First use of the new certificate ends the overlap.
    eventually_refused(&gw, Role::Device, &old.identity()).await?;
    // The replaced certificate cannot renew either.
    assert!(matches!(
        devgate_client::renew(gw.addr, "localhost", &roots, "renewer", old.identity()).await,
        Err(ClientError::Refused { status: 403, .. })
    ));
    let (_, list, _) = devgate(&["devices", "list", "--data-dir", &dir])?;
    assert!(list.contains(&fingerprint_of(&new.chain)?), "{list}");
    assert!(gw.logs().contains("device certificate renewed"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_current_certificate_connects_and_revocation_is_by_certificate_too() -> Result<()>
{
    let gw = Gateway::start("")?;
    let dir = gw.data_arg();
    let _mgr = gw.manager().await?;
    let out = tempfile::tempdir()?;
    let (first_dir, second_dir) = (out.path().join("1"), out.path().join("2"));
    for d in [&first_dir, &second_dir] {
        ok(&[
            "devices",
            "issue",
            "--data-dir",
            &dir,
            "--unit",
            "issued",
            "--out",
            &d.display().to_string(),
        ])?;
    }
    let first = load_identity(&first_dir, "issued")?;
    let second = load_identity(&second_dir, "issued")?;
    // The gateway picks the registry change up within a second.
    eventually_refused(&gw, Role::Device, &first).await?;
    let mut dev = connect_as(&gw, Role::Device, dup(&second)).await?;

    // Revoke the unit, lift the revocation: the revoked certificate stays refused.
    ok(&["devices", "revoke", "--data-dir", &dir, "issued"])?;
    assert_eq!(
        closed_within(&mut dev, Duration::from_secs(5)).await?,
        Some(1008)
    );
    ok(&["devices", "unrevoke", "--data-dir", &dir, "issued"])?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        refused_403(&connect_as(&gw, Role::Device, second).await),
        "a revoked certificate came back after unrevoke"
    );

    // Revoke one certificate by its SHA-256.
    let third_dir = out.path().join("3");
    ok(&[
        "devices",
        "issue",
        "--data-dir",
        &dir,
        "--unit",
        "by-cert",
        "--out",
        &third_dir.display().to_string(),
    ])?;
    let third = load_identity(&third_dir, "by-cert")?;
    let fp = fingerprint_of(&third.0)?;
    let mut dev = connect_as(&gw, Role::Device, dup(&third)).await?;
    ok(&[
        "devices",
        "revoke",
        "--data-dir",
        &dir,
        "--cert",
        &fp.replace(' ', ":"),
    ])?;
    assert_eq!(
        closed_within(&mut dev, Duration::from_secs(5)).await?,
        Some(1008)
    );
    assert!(refused_403(&connect_as(&gw, Role::Device, third).await));
    fails(&["devices", "revoke", "--data-dir", &dir, "--cert", "12:34"])?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn managers_are_recorded_listed_revoked_and_disconnected() -> Result<()> {
    let gw = Gateway::start("")?;
    let dir = gw.data_arg();
    let mut first = gw.manager().await?;
    let out = tempfile::tempdir()?;
    ok(&[
        "managers",
        "issue",
        "--data-dir",
        &dir,
        "--name",
        "ops-2",
        "--out",
        &out.path().display().to_string(),
    ])?;
    let ops2 = load_identity(out.path(), "ops-2")?;
    let list = ok(&["managers", "list", "--data-dir", &dir])?;
    assert!(list.contains("manager") && list.contains("init"), "{list}");
    assert!(
        list.contains("ops-2") && list.contains(&fingerprint_of(&ops2.0)?),
        "{list}"
    );

    let mut second = connect_as(&gw, Role::Manager, dup(&ops2)).await?;
    let started = Instant::now();
    ok(&["managers", "revoke", "--data-dir", &dir, "ops-2"])?;
    closed_within(&mut second, Duration::from_secs(5)).await?;
    eprintln!("revoked manager disconnected after {:?}", started.elapsed());
    assert!(refused_403(&connect_as(&gw, Role::Manager, ops2).await));
    let list = ok(&["managers", "list", "--data-dir", &dir, "--json"])?;
    let list: serde_json::Value = serde_json::from_str(&list)?;
    assert!(
        list.as_array()
            .context("array")?
            .iter()
            .any(|m| m["name"] == "ops-2" && !m["revoked_at"].is_null())
    );

    // A manager certificate made outside the record (e.g. issued before certificates were
    // recorded) is accepted until its name is revoked.
    let paths = devgate_pki::PkiPaths::new(gw.data.path());
    let ca = devgate_pki::ClientCa::load(&paths.manager_ca_cert(), &paths.manager_ca_key())?;
    let legacy = ca.issue_manager("legacy")?;
    let mut conn = connect_as(
        &gw,
        Role::Manager,
        (legacy.chain.clone(), legacy.key.clone_key()),
    )
    .await?;
    ok(&["managers", "revoke", "--data-dir", &dir, "legacy"])?;
    closed_within(&mut conn, Duration::from_secs(5)).await?;
    assert!(refused_403(
        &connect_as(&gw, Role::Manager, (legacy.chain, legacy.key)).await
    ));

    // The first manager was not affected; revoking its certificate by SHA-256 ends it.
    first
        .send(&Frame::control(1, br#"{"op":"get_status"}"#))
        .await?;
    let fp = devgate_pki::fingerprint_file(&paths.manager_cert())?;
    ok(&["managers", "revoke", "--data-dir", &dir, "--cert", &fp])?;
    closed_within(&mut first, Duration::from_secs(5)).await?;
    assert!(refused_403(
        &connect_as(&gw, Role::Manager, gw.manager_identity()?).await
    ));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unit_ids_are_validated_wherever_they_enter() -> Result<()> {
    let gw = Gateway::start("")?;
    let dir = gw.data_arg();
    let long = "x".repeat(5000);
    let out = tempfile::tempdir()?;
    let out = out.path().display().to_string();
    for bad in ["line\nbreak", "tab\there", "", long.as_str()] {
        for cmd in ["revoke", "unrevoke", "reset"] {
            let err = fails(&["devices", cmd, "--data-dir", &dir, bad])?;
            assert!(err.contains("invalid unit ID"), "{err}");
        }
        let err = fails(&[
            "devices",
            "issue",
            "--data-dir",
            &dir,
            "--unit",
            bad,
            "--out",
            &out,
        ])?;
        assert!(err.contains("invalid unit ID"), "{err}");
        fails(&["managers", "revoke", "--data-dir", &dir, bad])?;
    }
    let err = fails(&["devices", "revoke", "--data-dir", &dir, "never-enrolled"])?;
    assert!(err.contains("not enrolled"), "{err}");
    fails(&["devices", "unrevoke", "--data-dir", &dir, "never-enrolled"])?;
    // MAC addresses are valid unit IDs.
    ok(&[
        "devices",
        "issue",
        "--data-dir",
        &dir,
        "--unit",
        "00:E0:C5:12:34:56",
        "--out",
        &out,
    ])?;
    ok(&["devices", "revoke", "--data-dir", &dir, "00:E0:C5:12:34:56"])?;

    // Manager control ops: a negative, absurd or non-numeric count and bad unit IDs.
    let mut mgr = gw.manager().await?;
    let requests: [&[u8]; 8] = [
        br#"{"op":"create_keys","kind":"one-time","count":-5}"#,
        br#"{"op":"create_keys","kind":"one-time","count":1e12}"#,
        br#"{"op":"create_keys","kind":"one-time","count":"3"}"#,
        br#"{"op":"create_keys","kind":"bound","units":["a\nb"]}"#,
        br#"{"op":"revoke_device","unit":"a\u0001b"}"#,
        br#"{"op":"revoke_device","unit":"never-enrolled"}"#,
        br#"{"op":"reset_device","unit":"never-enrolled"}"#,
        br#"{"op":"revoke_certificate","sha256":"12:34"}"#,
    ];
    for (i, req) in requests.iter().enumerate() {
        let id = u32::try_from(i + 10)?;
        mgr.send(&Frame::control(id, req)).await?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let Some(Incoming::Frame(r)) = mgr.recv_timeout(deadline - Instant::now()).await?
            else {
                bail!("no answer to {}", String::from_utf8_lossy(req));
            };
            if r.frame().id != id {
                continue;
            }
            match r.frame().body {
                Body::Error { message, .. } => {
                    eprintln!("{} -> {message}", String::from_utf8_lossy(req));
                    break;
                }
                ref other => bail!("{} accepted: {other:?}", String::from_utf8_lossy(req)),
            }
        }
    }
    let (_, list, _) = devgate(&["keys", "list", "--data-dir", &dir, "--json"])?;
    let list: serde_json::Value = serde_json::from_str(&list)?;
    assert_eq!(list.as_array().map(Vec::len), Some(0), "no key was created");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_registered_refuses_certificates_the_store_has_never_seen() -> Result<()> {
    let gw = Gateway::start("[credentials]\nrequire_registered = true\n")?;
    let dir = gw.data_arg();
    // The first manager is recorded by `devgate init`.
    let _mgr = gw.manager().await?;
    // A device certificate made directly with the CA key: refused.
    assert!(refused_403(
        &connect_as(&gw, Role::Device, gw.device_identity("unregistered")?).await
    ));
    // A manager certificate made directly with the CA key: refused.
    let paths = devgate_pki::PkiPaths::new(gw.data.path());
    let ca = devgate_pki::ClientCa::load(&paths.manager_ca_cert(), &paths.manager_ca_key())?;
    let legacy = ca.issue_manager("legacy")?;
    assert!(refused_403(
        &connect_as(&gw, Role::Manager, (legacy.chain, legacy.key)).await
    ));
    assert!(gw.logs().contains("not registered"));
    // Enrolled devices connect.
    let multi = keys(&dir, &["--multi"])?.remove(0);
    let enrolled = enroll(&gw, "registered", &multi).await?;
    connect_as(&gw, Role::Device, enrolled.identity()).await?;
    Ok(())
}
