//! Zero-downtime certificate rotation: 1,000 connected devices survive a server
//! certificate renewal and a root exchange without a single reconnect.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use devgate_client::{
    Body, ConnectOptions, Connection, Frame, Incoming, Role, TrustBundle, tls_config,
};
use devgate_tests::{Gateway, devgate};

const DEVICES: usize = 1000;

#[derive(Default)]
struct Counters {
    bundles: AtomicUsize,
    closed: AtomicUsize,
}

fn spawn_device(mut dev: Connection, counters: Arc<Counters>) {
    tokio::spawn(async move {
        loop {
            let r = match dev.recv().await {
                Ok(Incoming::Frame(r)) => r,
                _ => {
                    counters.closed.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            };
            let f = r.frame();
            match f.body {
                Body::Command { payload }
                    if dev.send(&Frame::response("", f.id, payload)).await.is_err() =>
                {
                    counters.closed.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                Body::Control { payload } => {
                    if let Ok(Some(bundle)) = TrustBundle::parse(payload)
                        && bundle.roots.len() == 2
                    {
                        counters.bundles.fetch_add(1, Ordering::Relaxed);
                        let ack = bundle.ack_payload();
                        if dev.send(&TrustBundle::ack_frame(&ack)).await.is_err() {
                            counters.closed.fetch_add(1, Ordering::Relaxed);
                            return;
                        }
                    }
                }
                _ => {}
            }
        }
    });
}

/// Sends a command to every device and waits for all responses.
async fn all_routable(mgr: &mut Connection, base: u32) -> Result<()> {
    let units: Vec<String> = (0..DEVICES).map(|i| format!("rot-{i:04}")).collect();
    let frames: Vec<Frame<'_>> = units
        .iter()
        .enumerate()
        .map(|(i, u)| Frame::command(u, base + i as u32, b"ping"))
        .collect();
    for chunk in frames.chunks(100) {
        mgr.send_batch(chunk).await?;
    }
    let mut answered = HashSet::new();
    while answered.len() < DEVICES {
        let Some(Incoming::Frame(r)) = mgr.recv_timeout(Duration::from_secs(20)).await? else {
            bail!("only {} of {DEVICES} devices answered", answered.len());
        };
        if let Body::Response { .. } = r.frame().body {
            answered.insert(r.frame().id);
        } else if let Body::Error { code, .. } = r.frame().body {
            bail!("error frame {code:?} for {}", r.frame().unit);
        }
    }
    Ok(())
}

async fn server_leaf(
    gw: &Gateway,
    roots: &[rustls_pki_types::CertificateDer<'static>],
) -> Result<Vec<u8>> {
    let paths = devgate_pki::PkiPaths::new(gw.data.path());
    let ident = (
        devgate_pki::load_certs(&paths.manager_cert())?,
        devgate_pki::load_key(&paths.manager_key())?,
    );
    let conn = devgate_client::connect(
        &ConnectOptions::new(gw.addr, "localhost", Role::Manager),
        tls_config(roots, Some(ident))?,
    )
    .await?;
    let certs = conn.peer_certificates().context("no peer certificates")?;
    Ok(certs.first().context("empty chain")?.as_ref().to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_devices_survive_renewal_and_root_exchange_without_reconnecting() -> Result<()> {
    let gw = Gateway::start("")?;
    let dir = gw.data_arg();
    let old_roots = devgate_tests::roots(gw.data.path())?;
    let mut mgr = gw.manager().await?;
    let counters = Arc::new(Counters::default());
    for i in 0..DEVICES {
        let dev = gw.device(&format!("rot-{i:04}")).await?;
        spawn_device(dev, counters.clone());
    }
    all_routable(&mut mgr, 0).await?;
    let leaf_before = server_leaf(&gw, &old_roots).await?;
    let sessions = |gw: &Gateway| -> Result<u64> {
        gw.status()?["counters"]["device_sessions"]
            .as_u64()
            .context("counter")
    };
    assert_eq!(sessions(&gw)?, DEVICES as u64);

    // 1. Renewal: a new server certificate from the same root.
    let (ok, _, err) = devgate(&["cert", "renew", "--data-dir", &dir])?;
    assert!(ok, "{err}");
    gw.reload();
    assert!(
        gw.wait_for_log("reloaded certificates", Duration::from_secs(5)),
        "{}",
        gw.logs()
    );
    let leaf_after = server_leaf(&gw, &old_roots).await?;
    assert_ne!(
        leaf_before, leaf_after,
        "new connections still get the old certificate"
    );
    all_routable(&mut mgr, 10_000).await?;
    assert_eq!(
        counters.closed.load(Ordering::Relaxed),
        0,
        "devices were disconnected by the renewal"
    );

    // 2. Root exchange: stage, every device gets the bundle, activate.
    let (ok, out, err) = devgate(&["cert", "stage-root", "--data-dir", &dir])?;
    assert!(ok, "{err}");
    assert!(out.contains("Next root fingerprint: "));
    gw.reload();
    let deadline = Instant::now() + Duration::from_secs(20);
    while counters.bundles.load(Ordering::Relaxed) < DEVICES && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        // The manager keeps reading so that it answers keep-alives.
        let _ = mgr.recv_timeout(Duration::from_millis(1)).await?;
    }
    assert_eq!(
        counters.bundles.load(Ordering::Relaxed),
        DEVICES,
        "not every device received the trust bundle"
    );
    let (ok, _, err) = devgate(&["cert", "activate-root", "--data-dir", &dir])?;
    assert!(ok, "{err}");
    gw.reload();
    tokio::time::sleep(Duration::from_millis(300)).await;
    all_routable(&mut mgr, 20_000).await?;
    assert_eq!(
        counters.closed.load(Ordering::Relaxed),
        0,
        "devices were disconnected by the root exchange"
    );
    assert_eq!(sessions(&gw)?, DEVICES as u64, "devices reconnected");

    // New connections use the new chain: a client trusting only the new root connects, one
    // trusting only the old root does not.
    let new_roots = devgate_tests::roots(gw.data.path())?;
    assert_ne!(new_roots, old_roots);
    server_leaf(&gw, &new_roots)
        .await
        .context("connecting with the new root")?;
    assert!(
        server_leaf(&gw, &old_roots).await.is_err(),
        "the old root still verifies the new chain"
    );
    let (_, fp, _) = devgate(&["fingerprint", "--data-dir", &dir])?;
    assert_ne!(
        fp.trim(),
        format!("Root fingerprint: {}", gw.data.fingerprint)
    );
    Ok(())
}

/// Reads frames until a trust bundle arrives; returns it (the connection keeps answering
/// pings while it waits).
async fn next_bundle(conn: &mut Connection) -> Result<TrustBundle> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let Some(Incoming::Frame(r)) = conn.recv_timeout(Duration::from_secs(1)).await? else {
            continue;
        };
        if let Body::Control { payload } = r.frame().body
            && let Some(bundle) = TrustBundle::parse(payload)?
        {
            return Ok(bundle);
        }
    }
    bail!("no trust bundle within 10 s")
}

async fn ack(conn: &mut Connection, bundle: &TrustBundle) -> Result<()> {
    let payload = bundle.ack_payload();
    conn.send(&TrustBundle::ack_frame(&payload)).await?;
    Ok(())
}

/// `root_exchange` of `/v1/status` once it shows `acked` devices (it is refreshed about
/// once a second).
fn wait_for_acks(gw: &Gateway, acked: u64) -> Result<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let rx = gw.status()?["root_exchange"].clone();
        if rx["devices_acked"].as_u64() == Some(acked) || Instant::now() > deadline {
            return Ok(rx);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_exchange_reaches_managers_and_waits_for_device_acknowledgements() -> Result<()> {
    let gw = Gateway::start("")?;
    let dir = gw.data_arg();
    let old_roots = devgate_tests::roots(gw.data.path())?;
    let creds = tempfile::tempdir()?;
    // Three registered devices (the registry is what "M enrolled devices" counts).
    let mut devices = Vec::new();
    for unit in ["rx-1", "rx-2", "rx-3"] {
        let (ok, _, err) = devgate(&[
            "devices",
            "issue",
            "--data-dir",
            &dir,
            "--unit",
            unit,
            "--out",
            &creds.path().display().to_string(),
        ])?;
        assert!(ok, "{err}");
        let pem = std::fs::read(creds.path().join(format!("{unit}.pem")))?;
        let key = std::fs::read(creds.path().join(format!("{unit}.key")))?;
        let ident = (
            devgate_client::certs_from_pem(&pem)?,
            devgate_client::key_from_pem(&key)?,
        );
        devices.push(
            devgate_client::connect(
                &ConnectOptions::new(gw.addr, "localhost", Role::Device),
                tls_config(&old_roots, Some(ident))?,
            )
            .await?,
        );
    }
    let mut mgr = gw.manager().await?;
    assert!(gw.status()?["root_exchange"].is_null());

    let (ok, _, err) = devgate(&["cert", "stage-root", "--data-dir", &dir])?;
    assert!(ok, "{err}");
    gw.reload();

    // The manager is sent the bundle too, and keeps its roots.
    let mgr_bundle = next_bundle(&mut mgr).await?;
    assert_eq!(mgr_bundle.roots.len(), 2);
    ack(&mut mgr, &mgr_bundle).await?;
    // Two of three devices acknowledge; one acknowledges twice (counted once).
    for dev in devices.iter_mut().take(2) {
        let bundle = next_bundle(dev).await?;
        assert_eq!(bundle.id, mgr_bundle.id);
        ack(dev, &bundle).await?;
        ack(dev, &bundle).await?;
    }
    let rx = wait_for_acks(&gw, 2)?;
    assert_eq!(rx["devices_acked"], 2, "{rx}");
    assert_eq!(rx["devices_total"], 3, "{rx}");
    assert_eq!(rx["bundle"], mgr_bundle.id.as_str(), "{rx}");
    assert_eq!(
        rx["managers_acked"].as_array().map(Vec::len),
        Some(1),
        "{rx}"
    );
    let (ok, out, _) = devgate(&["status", "--admin", &gw.admin.to_string()])?;
    assert!(ok);
    assert!(
        out.contains("root exchange: 2 of 3 devices have the new root"),
        "{out}"
    );

    // Below the bar, activation is refused and changes nothing.
    let (ok, _, err) = devgate(&["cert", "activate-root", "--data-dir", &dir])?;
    assert!(!ok, "activated with 2 of 3 devices acknowledged");
    assert!(err.contains("only 2 of 3"), "{err}");
    assert_eq!(devgate_tests::roots(gw.data.path())?, old_roots);

    // The third device acknowledges: activation goes ahead.
    let bundle = next_bundle(&mut devices[2]).await?;
    ack(&mut devices[2], &bundle).await?;
    wait_for_acks(&gw, 3)?;
    let (ok, out, err) = devgate(&["cert", "activate-root", "--data-dir", &dir])?;
    assert!(ok, "{err}");
    assert!(out.contains("3 of 3 enrolled devices"), "{out}");
    gw.reload();
    assert!(
        gw.wait_for_log("reloaded certificates", Duration::from_secs(5)),
        "{}",
        gw.logs()
    );

    // A manager that knows only the roots from the bundle connects to the new chain.
    let paths = devgate_pki::PkiPaths::new(gw.data.path());
    let ident = (
        devgate_pki::load_certs(&paths.manager_cert())?,
        devgate_pki::load_key(&paths.manager_key())?,
    );
    devgate_client::connect(
        &ConnectOptions::new(gw.addr, "localhost", Role::Manager),
        tls_config(&mgr_bundle.roots, Some(ident))?,
    )
    .await
    .context("a manager trusting the bundle's roots after activation")?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn activation_below_the_bar_needs_min_acked_or_force() -> Result<()> {
    let data = devgate_tests::DataDir::init()?;
    let dir = data.path().display().to_string();
    let creds = tempfile::tempdir()?;
    let out = creds.path().display().to_string();
    for unit in ["na-1", "na-2"] {
        let (ok, _, err) = devgate(&[
            "devices",
            "issue",
            "--data-dir",
            &dir,
            "--unit",
            unit,
            "--out",
            &out,
        ])?;
        assert!(ok, "{err}");
    }
    let (ok, _, err) = devgate(&["cert", "stage-root", "--data-dir", &dir])?;
    assert!(ok, "{err}");
    let (ok, _, err) = devgate(&["cert", "activate-root", "--data-dir", &dir])?;
    assert!(!ok);
    assert!(err.contains("only 0 of 2"), "{err}");
    let (ok, _, err) = devgate(&[
        "cert",
        "activate-root",
        "--data-dir",
        &dir,
        "--min-acked",
        "101",
    ])?;
    assert!(!ok);
    assert!(err.contains("between 0 and 100"), "{err}");
    let (ok, out, err) = devgate(&["cert", "activate-root", "--data-dir", &dir, "--force"])?;
    assert!(ok, "{err}");
    assert!(out.contains("--force"), "{out}");
    Ok(())
}
