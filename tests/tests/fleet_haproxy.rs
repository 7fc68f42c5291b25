//! Three instances behind HAProxy (TCP mode, PROXY v2, health checks on
//! `/usg/check-status`) sharing one PostgreSQL, in network namespaces this test creates:
//!
//! - server namespace: HAProxy on 10.211.0.1:8443, the three instances on 127.0.0.1
//!   (HAProxy reaches them from 127.0.0.2, their only `proxy_protocol_from` address), and
//!   the managers, which connect to each instance directly;
//! - client namespace: the devices, from 10.211.0.2 and 10.211.0.3;
//! - PostgreSQL runs in the test's own namespace and is reached over its unix socket
//!   (a file, visible from every namespace).
//!
//! Root and HAProxy are needed; without them the test is skipped with the reason, unless
//! `DEVGATE_REQUIRE_TOOLS` is set (CI).

use std::net::{IpAddr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use devgate_client::{Body, ConnectOptions, Connection, Frame, Incoming, Role, tls_config};
use devgate_tests::netns::{self, NetPair, SERVER_V4, client_v4};
use devgate_tests::postgres::Postgres;
use devgate_tests::{DataDir, Gateway, binary};

/// Devices enrolled through the balancer. Each enrollment costs a key pair, a CSR and a
/// certificate on a 2-core machine; see docs/OPERATIONS.md for the measured cost.
const DEVICES: usize = 3000;
const FRONT_PORT: u16 = 8443;
/// Per instance: unauthenticated connections one client address may hold.
const PER_SOURCE: usize = 4;

fn skip(why: &str) -> Result<()> {
    if std::env::var_os("DEVGATE_REQUIRE_TOOLS").is_some() {
        bail!("{why}");
    }
    eprintln!("skipped: {why}");
    Ok(())
}

struct HaProxy(Child);

impl Drop for HaProxy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn haproxy(ns: &str, dir: &std::path::Path, backends: &[SocketAddr]) -> Result<HaProxy> {
    let mut cfg = format!(
        "global\n  maxconn 9000\n\
         defaults\n  mode tcp\n  timeout connect 2s\n  timeout client 300s\n  timeout server 300s\n  retries 3\n  option redispatch\n\
         frontend devices\n  bind {SERVER_V4}:{FRONT_PORT}\n  default_backend devgate\n\
         backend devgate\n  balance roundrobin\n  option httpchk\n  http-check send meth GET uri /usg/check-status ver HTTP/1.1 hdr Host localhost\n  http-check expect status 200\n"
    );
    for (i, b) in backends.iter().enumerate() {
        cfg.push_str(&format!(
            "  server gw{i} {b} source 127.0.0.2 send-proxy-v2 check check-send-proxy check-ssl verify none inter 500ms fall 2 rise 1\n"
        ));
    }
    let path = dir.join("haproxy.cfg");
    std::fs::write(&path, cfg)?;
    let check = Command::new("haproxy")
        .arg("-c")
        .arg("-f")
        .arg(&path)
        .output()?;
    if !check.status.success() {
        bail!("haproxy -c: {}", String::from_utf8_lossy(&check.stdout));
    }
    let child = Command::new("ip")
        .args(["netns", "exec", ns, "haproxy", "-db", "-f"])
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting haproxy")?;
    Ok(HaProxy(child))
}

/// A second data dir with the same PKI.
fn same_pki(data: &DataDir) -> Result<DataDir> {
    let dir = tempfile::tempdir()?;
    let out = Command::new("cp")
        .arg("-a")
        .arg(data.path().join("pki"))
        .arg(dir.path())
        .output()?;
    if !out.status.success() {
        bail!("copying the PKI failed");
    }
    std::fs::copy(
        data.path().join("admin.token"),
        dir.path().join("admin.token"),
    )?;
    Ok(DataDir {
        dir,
        fingerprint: data.fingerprint.clone(),
        pairing_token: data.pairing_token.clone(),
    })
}

fn instance(ns: &str, data: DataDir, port: u16, store: &str) -> Result<Gateway> {
    let config = format!(
        "listen = \"127.0.0.1:{port}\"\nadmin = \"127.0.0.1:{}\"\nworkers = 1\n\
         proxy_protocol_from = [\"127.0.0.2/32\"]\n\
         [limits]\nmax_handshakes_per_source = {PER_SOURCE}\nhandshake_timeout_ms = 60000\n[store]\nurl = \"{store}\"\n",
        port + 1000
    );
    Gateway::start_in_netns(data, ns, &config)
}

/// What the device side reports to the test.
enum DeviceEvent {
    Ready(usize, Duration),
    Failed(String),
}

#[test]
fn three_instances_behind_haproxy_share_one_postgres() -> Result<()> {
    if !netns::is_root() {
        return skip("needs root for network namespaces");
    }
    if Command::new("haproxy").arg("-v").output().is_err() {
        return skip("haproxy not installed (scripts/setup.sh installs it)");
    }
    if let Some(why) = Postgres::missing() {
        return skip(&why);
    }
    let pg = Postgres::start()?;
    let url = pg.create_db("fleet")?;
    let store = format!(
        "host={} port={} user=devgate dbname=fleet",
        pg.socket_dir().display(),
        pg.port()
    );
    let net = NetPair::create("fleet", 1, 0)?;
    let first = DataDir::init()?;
    let roots = devgate_tests::roots(first.path())?;
    let keys_dir = first.path().display().to_string();
    let mut gws = Vec::new();
    let mut backends = Vec::new();
    for i in 0..3u16 {
        let data = same_pki(&first)?;
        let port = 7001 + i;
        gws.push(Some(instance(&net.server, data, port, &store)?));
        backends.push(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    let lb_dir = tempfile::tempdir()?;
    let _lb = haproxy(&net.server, lb_dir.path(), &backends)?;
    let front = SocketAddr::from((SERVER_V4, FRONT_PORT));

    // One-time keys, one per device, made with the CLI against the shared store.
    let out = Command::new(binary("devgate"))
        .args(["keys", "create", "--data-dir", &keys_dir, "--one-time"])
        .arg(DEVICES.to_string())
        .env("DEVGATE_STORE__URL", &url)
        .output()?;
    if !out.status.success() {
        bail!("keys create: {}", String::from_utf8_lossy(&out.stderr));
    }
    let keys: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(keys.len(), DEVICES);

    // Devices: enroll through the balancer from 10.211.0.2, connect, echo commands, and
    // reconnect (through the balancer, with new sessions) when their instance goes.
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::channel();
    let devices = {
        let (client_ns, stop, roots) = (net.client.clone(), stop.clone(), roots.clone());
        std::thread::spawn(move || {
            netns::block_on_in(&client_ns, || async move {
                let started = Instant::now();
                let mut handles = Vec::new();
                for (i, key) in keys.into_iter().enumerate() {
                    let unit = format!("fleet-{i}");
                    let enrolled = loop {
                        match devgate_client::enroll(front, "localhost", &roots, &unit, &key).await
                        {
                            Ok(e) => break e,
                            // The balancer may try an instance that is still starting.
                            Err(devgate_client::ClientError::Io(_))
                                if started.elapsed() < Duration::from_secs(60) =>
                            {
                                tokio::time::sleep(Duration::from_millis(200)).await;
                            }
                            Err(e) => bail!("enrolling {unit}: {e}"),
                        }
                    };
                    let tls = tls_config(&roots, Some(enrolled.identity()))?;
                    let stop = stop.clone();
                    handles.push(tokio::spawn(device_loop(unit, tls, front, stop)));
                }
                let _ = tx.send(DeviceEvent::Ready(DEVICES, started.elapsed()));
                for h in handles {
                    if let Err(e) = h.await? {
                        let _ = tx.send(DeviceEvent::Failed(e.to_string()));
                    }
                }
                Ok(())
            })
        })
    };
    let (count, took) = match rx.recv_timeout(Duration::from_secs(240)) {
        Ok(DeviceEvent::Ready(n, took)) => (n, took),
        Ok(DeviceEvent::Failed(e)) => bail!("{e}"),
        Err(_) => {
            stop.store(true, Ordering::Relaxed);
            match devices.join() {
                Ok(Err(e)) => bail!("devices: {e:#}"),
                _ => bail!("the devices did not enroll and connect within 240 s"),
            }
        }
    };
    eprintln!(
        "{count} devices enrolled through HAProxy with one-time keys and connected in {took:?}"
    );

    let server_ns = net.server.clone();
    let client_ns = net.client.clone();
    let result = netns::block_on_in(&server_ns, || async {
        // Managers, one per instance (the client library does not yet connect to every
        // instance of a fleet): every device answers through exactly one of them.
        let mut managers = Vec::new();
        for gw in gws.iter().flatten() {
            managers.push(manager(gw).await?);
        }
        let placement = reach_all(&mut managers, 1).await?;
        let per_instance: Vec<usize> = (0..3)
            .map(|i| placement.iter().filter(|p| **p == i).count())
            .collect();
        eprintln!("devices per instance: {per_instance:?}");

        // kill -9 one instance: its devices come back through the balancer on the others.
        let victim = per_instance
            .iter()
            .enumerate()
            .max_by_key(|(_, n)| **n)
            .map_or(0, |(i, _)| i);
        let moved = per_instance[victim];
        let killed = gws[victim].take().context("victim")?;
        // A command in flight at the killed instance gets an answer or an error.
        let victim_unit = format!(
            "fleet-{}",
            placement.iter().position(|p| *p == victim).unwrap_or(0)
        );
        managers[victim]
            .send(&Frame::command(&victim_unit, 900_000, b"ping"))
            .await?;
        let killed_at = Instant::now();
        let data = killed.kill9()?;
        let outcome = loop {
            match managers[victim].recv_timeout(Duration::from_secs(10)).await {
                Ok(Some(Incoming::Frame(r))) if r.frame().id == 900_000 => break "answered",
                Ok(Some(Incoming::Closed { .. })) | Err(_) => break "its manager connection failed",
                Ok(None) => bail!("a command in flight at the killed instance was silently lost"),
                Ok(Some(_)) => {}
            }
        };
        eprintln!("command in flight at the killed instance: {outcome}");
        let mut alive: Vec<Connection> = Vec::new();
        for (i, m) in managers.into_iter().enumerate() {
            if i != victim {
                alive.push(m);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match reach_all(&mut alive, 100_000).await {
                Ok(_) => break,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                Err(e) => bail!("devices of the killed instance did not come back: {e}"),
            }
        }
        eprintln!(
            "{moved} devices moved off the killed instance in {:?}",
            killed_at.elapsed()
        );

        // The instance restarts on its data dir and takes load again (new connections).
        let restarted = instance(&server_ns, data, 7001 + u16::try_from(victim)?, &store)?;
        let m = manager(&restarted).await?;
        drop(m.close(1000, "").await);

        // Per-source limits use the client address from the PROXY header: 10.211.0.3
        // holds PER_SOURCE silent connections on every instance and is refused after,
        // while devices from 10.211.0.2 keep working.
        let greedy = IpAddr::from(client_v4(1));
        let (held, refused) = netns::in_netns(&client_ns, || {
            let mut held = Vec::new();
            let mut refused = 0;
            for _ in 0..(3 * PER_SOURCE + 6) {
                let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
                s.bind(&SocketAddr::new(greedy, 0).into())?;
                s.connect_timeout(&front.into(), Duration::from_secs(5))?;
                let mut s: std::net::TcpStream = s.into();
                s.set_read_timeout(Some(Duration::from_millis(700)))?;
                let mut b = [0u8; 16];
                match std::io::Read::read(&mut s, &mut b) {
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => held.push(s),
                    _ => refused += 1,
                }
            }
            Ok((held, refused))
        })?;
        eprintln!(
            "10.211.0.3 behind the balancer: {} connections held, {refused} refused",
            held.len()
        );
        assert!(
            refused > 0,
            "no connection of the greedy source was refused"
        );
        assert!(
            held.len() <= 3 * PER_SOURCE,
            "more held than the per-source limits allow"
        );
        let still = reach_all(&mut alive, 200_000).await?;
        assert_eq!(still.len(), DEVICES);
        drop(held);
        Ok(restarted)
    });
    let restarted = result?;
    stop.store(true, Ordering::Relaxed);
    drop(restarted);
    let _ = devices.join();
    while let Ok(ev) = rx.try_recv() {
        if let DeviceEvent::Failed(e) = ev {
            bail!("a device failed: {e}");
        }
    }
    Ok(())
}

async fn manager(gw: &Gateway) -> Result<Connection> {
    Ok(devgate_client::connect(
        &ConnectOptions::new(gw.addr, "localhost", Role::Manager),
        gw.manager_tls()?,
    )
    .await?)
}

/// Sends one command per device through every manager; returns, per device, the index of
/// the manager whose instance answered. Fails if a device answers nowhere.
async fn reach_all(managers: &mut [Connection], base: u32) -> Result<Vec<usize>> {
    let mut placement = vec![usize::MAX; DEVICES];
    for (m, mgr) in managers.iter_mut().enumerate() {
        for d in 0..DEVICES {
            let id = base + u32::try_from(d)?;
            mgr.send(&Frame::command(&format!("fleet-{d}"), id, b"ping"))
                .await?;
        }
        let mut pending = DEVICES;
        while pending > 0 {
            let Some(Incoming::Frame(r)) = mgr.recv_timeout(Duration::from_secs(10)).await? else {
                bail!("manager {m}: no answers");
            };
            let f = r.frame();
            let Some(d) = f.id.checked_sub(base).and_then(|d| usize::try_from(d).ok()) else {
                continue;
            };
            if d >= DEVICES {
                continue;
            }
            pending -= 1;
            if matches!(f.body, Body::Response { .. }) {
                placement[d] = m;
            }
        }
    }
    if let Some(d) = placement.iter().position(|p| *p == usize::MAX) {
        bail!("fleet-{d} answered through no instance");
    }
    Ok(placement)
}

/// A device: connects through the balancer, echoes commands, reconnects when its
/// instance goes away, until `stop`.
async fn device_loop(
    unit: String,
    tls: Arc<rustls::ClientConfig>,
    front: SocketAddr,
    stop: Arc<AtomicBool>,
) -> Result<()> {
    let opts = ConnectOptions::new(front, "localhost", Role::Device);
    let mut attempts = 0u32;
    while !stop.load(Ordering::Relaxed) {
        let mut dev = match devgate_client::connect(&opts, tls.clone()).await {
            Ok(d) => d,
            Err(e) => {
                attempts += 1;
                if attempts > 200 {
                    bail!("{unit}: cannot reconnect: {e}");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        loop {
            if stop.load(Ordering::Relaxed) {
                return Ok(());
            }
            match dev.recv_timeout(Duration::from_millis(500)).await {
                Ok(Some(Incoming::Frame(r))) => {
                    let f = r.frame();
                    if let Body::Command { payload } = f.body {
                        dev.send(&Frame::response("", f.id, payload)).await?;
                    }
                }
                Ok(Some(Incoming::Closed { .. })) | Err(_) => break,
                Ok(_) => {}
            }
        }
    }
    Ok(())
}
