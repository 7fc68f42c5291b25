//! End-to-end tests: the real `devgate` binary, real TLS WebSocket clients on loopback.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use devgate_client::{Body, ClientError, Connection, ErrorCode, Frame, Incoming, PresenceReason};
use devgate_tests::Gateway;

const STEP: Duration = Duration::from_secs(10);

/// Next devgate frame on `conn`, failing on close or timeout.
async fn next(conn: &mut Connection) -> Result<devgate_client::Received> {
    match conn.recv_timeout(STEP).await? {
        Some(Incoming::Frame(r)) => Ok(r),
        Some(Incoming::Closed { code, reason }) => bail!("closed: {code:?} {reason}"),
        None => bail!("no frame within {STEP:?}"),
    }
}

/// Next frame that is not presence.
async fn next_non_presence(conn: &mut Connection) -> Result<devgate_client::Received> {
    loop {
        let r = next(conn).await?;
        if !matches!(r.frame().body, Body::Presence { .. }) {
            return Ok(r);
        }
    }
}

/// Waits for presence of `unit` with the given state; returns its reason.
async fn presence(conn: &mut Connection, unit: &str, online: bool) -> Result<PresenceReason> {
    loop {
        let r = next(conn).await?;
        let f = r.frame();
        if let Body::Presence { online: o, reason } = f.body
            && f.unit == unit
            && o == online
        {
            return Ok(reason);
        }
    }
}

/// A device loop that answers every command with `"<unit>:" + payload`.
fn spawn_echo_device(mut dev: Connection, unit: String) -> tokio::task::JoinHandle<Result<()>> {
    tokio::spawn(async move {
        loop {
            let r = match dev.recv().await? {
                Incoming::Frame(r) => r,
                Incoming::Closed { .. } => return Ok(()),
            };
            let f = r.frame();
            if let Body::Command { payload } = f.body {
                let mut reply = format!("{unit}:").into_bytes();
                reply.extend_from_slice(payload);
                dev.send(&Frame::response("", f.id, &reply)).await?;
            }
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_devices_each_answer_a_command_to_the_right_manager() -> Result<()> {
    let gw = Gateway::start("")?;
    let mut mgr = gw.manager().await?;
    let n = 1000;
    let mut tasks = Vec::new();
    for i in 0..n {
        let unit = format!("dev-{i:04}");
        let dev = gw
            .device(&unit)
            .await
            .with_context(|| format!("connecting {unit}"))?;
        tasks.push(spawn_echo_device(dev, unit));
    }
    // Presence for all 1000 devices reaches the manager.
    let mut online = HashSet::new();
    while online.len() < n {
        let r = next(&mut mgr).await?;
        if let Body::Presence { online: true, .. } = r.frame().body {
            online.insert(r.frame().unit.to_owned());
        }
    }
    let started = Instant::now();
    let frames: Vec<(String, u32)> = (0..n)
        .map(|i| (format!("dev-{i:04}"), 10_000 + i as u32))
        .collect();
    let cmds: Vec<Frame<'_>> = frames
        .iter()
        .map(|(u, id)| Frame::command(u, *id, b"ping"))
        .collect();
    mgr.send_batch(&cmds).await?;
    let mut answered = HashMap::new();
    while answered.len() < n {
        let r = next_non_presence(&mut mgr).await?;
        let f = r.frame();
        let Body::Response { payload } = f.body else {
            bail!("unexpected frame {f:?}");
        };
        assert_eq!(payload, format!("{}:ping", f.unit).as_bytes());
        let expected_id = 10_000 + f.unit[4..].parse::<u32>()?;
        assert_eq!(
            f.id, expected_id,
            "response carries the manager's request id"
        );
        answered.insert(f.unit.to_owned(), f.id);
    }
    eprintln!("1000 commands answered in {:?}", started.elapsed());
    let status = gw.status()?;
    assert_eq!(status["devices"], 1000);
    assert_eq!(status["managers"], 1);
    for t in tasks {
        t.abort();
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_managers_get_their_own_responses_and_both_get_events_and_presence() -> Result<()> {
    let gw = Gateway::start("")?;
    let mut m1 = gw.manager().await?;
    let mut m2 = gw.manager().await?;
    let dev = gw.device("shared-dev").await?;
    assert_eq!(
        presence(&mut m1, "shared-dev", true).await?,
        PresenceReason::Connected
    );
    assert_eq!(
        presence(&mut m2, "shared-dev", true).await?,
        PresenceReason::Connected
    );
    let device_task = spawn_echo_device(dev, "shared-dev".into());

    // Both managers use the same request ids; each must get only its own answers.
    for id in 1..=20u32 {
        m1.send(&Frame::command(
            "shared-dev",
            id,
            format!("m1-{id}").as_bytes(),
        ))
        .await?;
        m2.send(&Frame::command(
            "shared-dev",
            id,
            format!("m2-{id}").as_bytes(),
        ))
        .await?;
    }
    for (mgr, tag) in [(&mut m1, "m1"), (&mut m2, "m2")] {
        let mut seen = HashSet::new();
        while seen.len() < 20 {
            let r = next_non_presence(mgr).await?;
            let f = r.frame();
            let Body::Response { payload } = f.body else {
                bail!("unexpected {f:?}")
            };
            assert_eq!(
                payload,
                format!("shared-dev:{tag}-{}", f.id).as_bytes(),
                "{tag} got a response meant for the other manager"
            );
            seen.insert(f.id);
        }
        assert!(
            mgr.recv_timeout(Duration::from_millis(300))
                .await?
                .is_none(),
            "{tag}: no extra frames"
        );
    }
    device_task.abort();

    // Events go to both managers.
    let mut ev_dev = gw.device("event-dev").await?;
    presence(&mut m1, "event-dev", true).await?;
    presence(&mut m2, "event-dev", true).await?;
    ev_dev.send(&Frame::event("", b"temperature=42")).await?;
    for mgr in [&mut m1, &mut m2] {
        let r = next_non_presence(mgr).await?;
        let f = r.frame();
        assert_eq!(f.unit, "event-dev");
        assert!(matches!(f.body, Body::Event { payload } if payload == b"temperature=42"));
    }
    // Offline presence goes to both when the device leaves.
    ev_dev.close(1000, "bye").await?;
    assert_eq!(
        presence(&mut m1, "event-dev", false).await?,
        PresenceReason::Disconnected
    );
    assert_eq!(
        presence(&mut m2, "event-dev", false).await?,
        PresenceReason::Disconnected
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_to_an_absent_device_returns_an_error_frame() -> Result<()> {
    let gw = Gateway::start("")?;
    let mut mgr = gw.manager().await?;
    mgr.send(&Frame::command("nobody-here", 77, b"hello"))
        .await?;
    let r = next_non_presence(&mut mgr).await?;
    let f = r.frame();
    assert_eq!(f.id, 77);
    assert_eq!(f.unit, "nobody-here");
    assert!(
        matches!(
            f.body,
            Body::Error {
                code: ErrorCode::DeviceNotConnected,
                ..
            }
        ),
        "{f:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_that_stops_answering_pings_is_declared_dead_within_three_intervals() -> Result<()> {
    let interval = Duration::from_millis(500);
    let gw = Gateway::start(&format!(
        "[keepalive]\nping_interval_ms = {}\n",
        interval.as_millis()
    ))?;
    let mut mgr = gw.manager().await?;
    // The manager keeps itself alive by answering pings while it waits.
    let mut dev = gw.device("silent-dev").await?;
    presence(&mut mgr, "silent-dev", true).await?;
    dev.set_auto_pong(false);
    let silent_since = Instant::now();
    // Nothing reads `dev` any more: it neither sends nor answers.
    let reason = match presence(&mut mgr, "silent-dev", false).await {
        Ok(r) => r,
        Err(e) => bail!("{e}; gateway log:\n{}", gw.logs()),
    };
    let took = silent_since.elapsed();
    assert_eq!(reason, PresenceReason::Dead);
    assert!(
        took <= interval * 3,
        "declared dead after {took:?}, more than 3 intervals"
    );
    assert!(took >= interval, "declared dead after only {took:?}");
    drop(dev);
    // A device that answers pings stays online over several intervals.
    let live = gw.device("live-dev").await?;
    presence(&mut mgr, "live-dev", true).await?;
    let task = spawn_echo_device(live, "live-dev".into());
    // The manager keeps reading (and so answering pings) while time passes.
    let until = Instant::now() + interval * 5;
    while Instant::now() < until {
        if let Some(Incoming::Closed { code, reason }) =
            mgr.recv_timeout(until - Instant::now()).await?
        {
            bail!("manager closed while idle: {code:?} {reason}");
        }
    }
    mgr.send(&Frame::command("live-dev", 5, b"x")).await?;
    let r = next_non_presence(&mut mgr).await?;
    assert!(
        matches!(r.frame().body, Body::Response { .. }),
        "{:?}",
        r.frame()
    );
    task.abort();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_limit_rejects_the_next_device_logs_it_and_is_settable_by_a_manager() -> Result<()> {
    let gw = Gateway::start("[limits]\ndevice_limit = 3\n")?;
    let mut mgr = gw.manager().await?;
    let mut devs = Vec::new();
    for i in 0..3 {
        devs.push(gw.device(&format!("lim-{i}")).await?);
    }
    match gw.device("lim-3").await {
        Err(ClientError::Refused { status: 503, body }) => {
            assert!(body.contains("limit"), "{body}")
        }
        other => bail!("4th device not refused: {other:?}"),
    }
    assert!(
        gw.wait_for_log(
            "connection limit reached: device lim-3 rejected",
            Duration::from_secs(5)
        ),
        "missing log line; log:\n{}",
        gw.logs()
    );
    // A device already connected may reconnect (replace itself) at the limit.
    devs.push(gw.device("lim-0").await?);
    // The manager raises the limit at run time.
    mgr.send(&Frame::control(
        9,
        br#"{"op":"set_device_limit","limit":4}"#,
    ))
    .await?;
    let r = next_non_presence(&mut mgr).await?;
    let f = r.frame();
    assert_eq!(f.id, 9);
    let Body::Control { payload } = f.body else {
        bail!("unexpected {f:?}")
    };
    let reply: serde_json::Value = serde_json::from_slice(payload)?;
    assert_eq!(reply["device_limit"], 4);
    devs.push(gw.device("lim-3").await?);
    assert!(matches!(
        gw.device("lim-4").await,
        Err(ClientError::Refused { status: 503, .. })
    ));
    assert_eq!(gw.status()?["limits"]["device_limit"], 4);
    // Bad control requests get an error frame naming the problem.
    mgr.send(&Frame::control(10, br#"{"op":"set_device_limit"}"#))
        .await?;
    let r = next_non_presence(&mut mgr).await?;
    assert!(
        matches!(r.frame().body, Body::Error { code: ErrorCode::ControlFailed, message } if message.contains("limit"))
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grace_period_disconnects_and_refuses_devices_until_a_manager_connects() -> Result<()> {
    let gw = Gateway::start("[managers]\ngrace_secs = 2\nstartup_wait_secs = 0\n")?;
    let mut dev = gw.device("grace-dev").await?;
    // No manager since start: after 2 s the device is sent away with "going away".
    let closed = tokio::time::timeout(Duration::from_secs(6), async {
        loop {
            match dev.recv().await {
                Ok(Incoming::Closed { code, .. }) => return code,
                Ok(Incoming::Frame(_)) => continue,
                Err(_) => return None,
            }
        }
    })
    .await?;
    assert_eq!(closed, Some(1001));
    match gw.device("grace-dev-2").await {
        Err(ClientError::Refused { status: 503, body }) => {
            assert!(body.contains("no manager"), "{body}")
        }
        other => bail!("device not refused during grace: {other:?}"),
    }
    let _mgr = gw.manager().await?;
    gw.device("grace-dev-3")
        .await
        .context("device refused after a manager connected")?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_status_goes_init_warn_ok() -> Result<()> {
    let gw = Gateway::start("[managers]\nstartup_wait_secs = 2\n")?;
    let tls = gw.anonymous_tls()?;
    let get = || devgate_client::http_get(gw.addr, "localhost", tls.clone(), "/usg/check-status");
    let (status, body) = get().await?;
    assert_eq!(status, 200);
    assert_eq!(String::from_utf8(body)?, r#"{"status":"init"}"#);
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let (_, body) = get().await?;
    assert_eq!(String::from_utf8(body)?, r#"{"status":"warn"}"#);
    let mgr = gw.manager().await?;
    let (_, body) = get().await?;
    assert_eq!(String::from_utf8(body)?, r#"{"status":"ok"}"#);
    mgr.close(1000, "").await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (_, body) = get().await?;
    assert_eq!(String::from_utf8(body)?, r#"{"status":"warn"}"#);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_and_wrong_role_requests_are_refused() -> Result<()> {
    let gw = Gateway::start("")?;
    let anon = gw.anonymous_tls()?;
    let (status, _) =
        devgate_client::http_get(gw.addr, "localhost", anon.clone(), "/v1/status").await?;
    assert_eq!(status, 404, "admin paths are not on the public port");
    let (status, _) = devgate_client::http_get(gw.addr, "localhost", anon.clone(), "/").await?;
    assert_eq!(status, 404);
    let no_cert =
        devgate_client::connect(&gw.options(devgate_client::Role::Device), anon.clone()).await;
    assert!(
        matches!(no_cert, Err(ClientError::Refused { status: 401, .. })),
        "{no_cert:?}"
    );
    let mgr_as_device =
        devgate_client::connect(&gw.options(devgate_client::Role::Device), gw.manager_tls()?).await;
    assert!(
        matches!(mgr_as_device, Err(ClientError::Refused { status: 403, .. })),
        "{mgr_as_device:?}"
    );
    let dev_as_mgr = devgate_client::connect(
        &gw.options(devgate_client::Role::Manager),
        gw.device_tls("d1")?,
    )
    .await;
    assert!(
        matches!(dev_as_mgr, Err(ClientError::Refused { status: 403, .. })),
        "{dev_as_mgr:?}"
    );
    // A certificate from a foreign CA fails the TLS handshake itself.
    let other = devgate_tests::DataDir::init()?;
    let foreign_ca = devgate_pki::ClientCa::load(
        &devgate_pki::PkiPaths::new(other.path()).device_ca_cert(),
        &devgate_pki::PkiPaths::new(other.path()).device_ca_key(),
    )?;
    let issued = foreign_ca.issue_device("intruder")?;
    let tls = devgate_client::tls_config(
        &devgate_tests::roots(gw.data.path())?,
        Some((issued.chain, issued.key)),
    )?;
    let foreign = devgate_client::connect(&gw.options(devgate_client::Role::Device), tls).await;
    assert!(foreign.is_err(), "foreign device certificate accepted");
    let counters = &gw.status()?["counters"];
    assert!(
        counters["handshakes_failed_tls"].as_u64() >= Some(1),
        "{counters}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls12_and_tls13_clients_both_work() -> Result<()> {
    let gw = Gateway::start("")?;
    let paths = devgate_pki::PkiPaths::new(gw.data.path());
    for version in [&rustls::version::TLS12, &rustls::version::TLS13] {
        let ident = (
            devgate_pki::load_certs(&paths.manager_cert())?,
            devgate_pki::load_key(&paths.manager_key())?,
        );
        let tls = devgate_client::tls_config_with(
            &devgate_tests::roots(gw.data.path())?,
            Some(ident),
            &[version],
            None,
        )?;
        let conn = devgate_client::connect(&gw.options(devgate_client::Role::Manager), tls).await?;
        assert_eq!(conn.protocol_version(), Some(version.version));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_unit_replaces_the_old_connection_and_presence_stays_online() -> Result<()> {
    let gw = Gateway::start("")?;
    let mut mgr = gw.manager().await?;
    let mut old = gw.device("dup").await?;
    assert_eq!(
        presence(&mut mgr, "dup", true).await?,
        PresenceReason::Connected
    );
    let new = gw.device("dup").await?;
    assert_eq!(
        presence(&mut mgr, "dup", true).await?,
        PresenceReason::Reconnected
    );
    match old.recv_timeout(STEP).await? {
        Some(Incoming::Closed { code, .. }) => assert_eq!(code, Some(4001)),
        other => bail!("old connection not closed: {other:?}"),
    }
    // No offline presence for the replaced connection, and commands reach the new one.
    let task = spawn_echo_device(new, "dup".into());
    mgr.send(&Frame::command("dup", 1, b"who")).await?;
    let r = next(&mut mgr).await?;
    assert!(
        matches!(r.frame().body, Body::Response { payload } if payload == b"dup:who"),
        "{:?}",
        r.frame()
    );
    assert_eq!(gw.status()?["devices"], 1);
    task.abort();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_input_gets_errors_or_a_closed_socket_and_the_gateway_lives_on() -> Result<()> {
    let gw = Gateway::start(
        "[limits]\nmax_message_bytes = 4096\nqueue_bytes = 65536\nhandshake_timeout_ms = 500\n",
    )?;
    let mut mgr = gw.manager().await?;
    let mut dev = gw.device("bad-dev").await?;
    presence(&mut mgr, "bad-dev", true).await?;
    // A response to a request that was never sent.
    dev.send(&Frame::response("", 4242, b"?")).await?;
    let r = next(&mut dev).await?;
    assert!(
        matches!(
            r.frame().body,
            Body::Error {
                code: ErrorCode::UnknownRequest,
                ..
            }
        ),
        "{:?}",
        r.frame()
    );
    // A command from a device is not permitted.
    dev.send(&Frame::command("", 1, b"x")).await?;
    let r = next(&mut dev).await?;
    assert!(
        matches!(
            r.frame().body,
            Body::Error {
                code: ErrorCode::NotPermitted,
                ..
            }
        ),
        "{:?}",
        r.frame()
    );
    // A message larger than the limit closes the session with 1009.
    let big = vec![0u8; 8192];
    dev.send(&Frame::event("", &big)).await?;
    match dev.recv_timeout(STEP).await? {
        Some(Incoming::Closed { code, .. }) => assert_eq!(code, Some(1009)),
        other => bail!("oversized message not refused: {other:?}"),
    }
    // The gateway closed it: closed_by_gateway (PROTOCOL.md §4, §8).
    assert_eq!(
        presence(&mut mgr, "bad-dev", false).await?,
        PresenceReason::ClosedByGateway
    );
    // A connection that never says anything is closed after the handshake timeout.
    let mut raw = tokio::net::TcpStream::connect(gw.addr).await?;
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::io::AsyncReadExt::read(&mut raw, &mut buf),
    )
    .await??;
    assert_eq!(n, 0, "idle handshake not closed");
    // Garbage instead of a TLS ClientHello.
    let mut raw = tokio::net::TcpStream::connect(gw.addr).await?;
    tokio::io::AsyncWriteExt::write_all(&mut raw, b"GET / HTTP/1.1\r\n\r\n").await?;
    let mut sink = Vec::new();
    let _ = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::io::AsyncReadExt::read_to_end(&mut raw, &mut sink),
    )
    .await?;
    // The gateway still serves.
    mgr.send(&Frame::command("nobody", 3, b"x")).await?;
    let r = next_non_presence(&mut mgr).await?;
    assert!(matches!(
        r.frame().body,
        Body::Error {
            code: ErrorCode::DeviceNotConnected,
            ..
        }
    ));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn largest_allowed_frames_are_routed_both_ways() -> Result<()> {
    let gw = Gateway::start("")?;
    let mut mgr = gw.manager().await?;
    let dev = gw.device("big").await?;
    presence(&mut mgr, "big", true).await?;
    let task = spawn_echo_device(dev, "big".into());
    // Default max_message_bytes is 1 MiB + 64: a 1 MiB payload plus headers fits.
    let payload: Vec<u8> = (0..1024 * 1024 - 64).map(|i| (i % 253) as u8).collect();
    mgr.send(&Frame::command("big", 1, &payload)).await?;
    let r = next_non_presence(&mut mgr).await?;
    let Body::Response { payload: back } = r.frame().body else {
        bail!("unexpected {:?}", r.frame().id)
    };
    assert_eq!(back.len(), payload.len() + 4);
    assert_eq!(&back[4..], &payload[..]);
    task.abort();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_that_does_not_read_fills_its_queue_and_the_manager_is_told() -> Result<()> {
    let gw = Gateway::start(
        "[limits]\nmax_message_bytes = 8192\nqueue_bytes = 65536\nqueue_hard_bytes = 1048576\nmax_pending_requests = 100000\n",
    )?;
    let mut mgr = gw.manager().await?;
    // The device connects and then never reads: TCP buffers fill, then its gateway queue.
    let stuck = gw.device("stuck").await?;
    presence(&mut mgr, "stuck", true).await?;
    let payload = vec![7u8; 4096];
    let mut queue_full = 0;
    let mut sent = 0u32;
    let deadline = Instant::now() + Duration::from_secs(20);
    while queue_full == 0 && Instant::now() < deadline && sent < 20_000 {
        let frames: Vec<Frame<'_>> = (0..64)
            .map(|i| Frame::command("stuck", sent + i, &payload))
            .collect();
        mgr.send_batch(&frames).await?;
        sent += 64;
        while let Some(Incoming::Frame(r)) = mgr.recv_timeout(Duration::from_millis(5)).await? {
            if let Body::Error {
                code: ErrorCode::QueueFull,
                ..
            } = r.frame().body
            {
                assert_eq!(r.frame().unit, "stuck");
                queue_full += 1;
            }
        }
    }
    assert!(
        queue_full > 0,
        "no queue_full after {sent} commands of 4 KiB to a device that does not read"
    );
    let status = gw.status()?;
    assert!(
        status["counters"]["queue_full"].as_u64() >= Some(1),
        "{status}"
    );
    // Commands to other devices still flow.
    let other = gw.device("other").await?;
    presence(&mut mgr, "other", true).await?;
    let task = spawn_echo_device(other, "other".into());
    mgr.send(&Frame::command("other", 999_999, b"hi")).await?;
    loop {
        let r = next(&mut mgr).await?;
        if r.frame().id == 999_999 {
            assert!(
                matches!(r.frame().body, Body::Response { .. }),
                "{:?}",
                r.frame()
            );
            break;
        }
    }
    task.abort();
    drop(stuck);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_response_is_an_error_for_the_manager_that_asked() -> Result<()> {
    // A small queue: the manager stops reading, its TCP buffers and then its gateway queue
    // fill with large responses, and the later responses are refused.
    let gw = Gateway::start(
        "[limits]\nmax_message_bytes = 600000\nqueue_bytes = 600000\nqueue_hard_bytes = 67108864\n",
    )?;
    let mut mgr = gw.manager().await?;
    let mut dev = gw.device("big-answers").await?;
    presence(&mut mgr, "big-answers", true).await?;
    const REQUESTS: u32 = 64;
    let frames: Vec<Frame<'_>> = (1..=REQUESTS)
        .map(|i| Frame::command("big-answers", i, b"size please"))
        .collect();
    mgr.send_batch(&frames).await?;
    // The device answers every command with 512 KiB (32 MiB in all) while the manager
    // does not read; it keeps what the gateway tells it.
    let answer = vec![0x5a; 512 * 1024];
    let mut device_told = 0;
    let mut answered = 0;
    let deadline = Instant::now() + Duration::from_secs(30);
    while answered < REQUESTS && Instant::now() < deadline {
        let Some(Incoming::Frame(r)) = dev.recv_timeout(Duration::from_secs(1)).await? else {
            continue;
        };
        match r.frame().body {
            Body::Command { .. } => {
                dev.send(&Frame::response("", r.frame().id, &answer))
                    .await?;
                answered += 1;
            }
            Body::Error {
                code: ErrorCode::QueueFull,
                ..
            } => device_told += 1,
            _ => {}
        }
    }
    assert_eq!(answered, REQUESTS, "the device did not get every command");
    // Now the manager reads: every request ends with its response or a queue_full error
    // for its own id, long before the 60 s request timeout.
    let mut outcome: HashMap<u32, bool> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while outcome.len() < REQUESTS as usize && Instant::now() < deadline {
        let Some(Incoming::Frame(r)) = mgr.recv_timeout(Duration::from_secs(5)).await? else {
            break;
        };
        let f = r.frame();
        match f.body {
            Body::Response { payload } => {
                assert_eq!(payload.len(), answer.len());
                outcome.insert(f.id, true);
            }
            Body::Error {
                code: ErrorCode::QueueFull,
                ..
            } => {
                assert_eq!(f.unit, "big-answers");
                outcome.insert(f.id, false);
            }
            _ => {}
        }
    }
    let refused = outcome.values().filter(|ok| !**ok).count();
    assert_eq!(
        outcome.len(),
        REQUESTS as usize,
        "requests left without an answer: {:?}",
        (1..=REQUESTS)
            .filter(|i| !outcome.contains_key(i))
            .collect::<Vec<_>>()
    );
    assert!(
        refused > 0,
        "no response was refused: the test did not fill the queue"
    );
    // The device hears of each refusal too (read what is left).
    while device_told < refused {
        let Some(Incoming::Frame(r)) = dev.recv_timeout(Duration::from_secs(2)).await? else {
            break;
        };
        if let Body::Error {
            code: ErrorCode::QueueFull,
            ..
        } = r.frame().body
        {
            device_told += 1;
        }
    }
    assert_eq!(device_told, refused);
    Ok(())
}

/// The gateway's counter `name` (summed over workers).
fn counter(gw: &Gateway, name: &str) -> Result<u64> {
    let status = gw.status()?;
    status["counters"][name]
        .as_u64()
        .with_context(|| format!("no counter {name} in status: {}", status["counters"]))
}

/// Session tickets outlive the gateway process (their keys are in the data dir): a device
/// that reconnects after a restart, or after a reload, resumes its TLS session instead of
/// a full handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_sessions_resume_across_a_restart_and_a_reload() -> Result<()> {
    let gw = Gateway::start("")?;
    let _mgr = gw.manager().await?;
    // One client configuration = one session cache, as in a device's process.
    let tls = gw.device_tls("resumer")?;
    let connect = |gw: &Gateway| {
        let opts = gw.options(devgate_client::Role::Device);
        let tls = tls.clone();
        async move { devgate_client::connect(&opts, tls).await }
    };
    let first = connect(&gw).await?;
    drop(first);
    let before = counter(&gw, "handshakes_resumed")?;
    let again = connect(&gw).await?;
    drop(again);
    assert_eq!(
        counter(&gw, "handshakes_resumed")?,
        before + 1,
        "no resumption at all"
    );

    let data = gw.kill9()?;
    let gw = Gateway::start_in(data, "")?;
    let _mgr = gw.manager().await?;
    let before = counter(&gw, "handshakes_resumed")?;
    let after_restart = connect(&gw).await?;
    drop(after_restart);
    assert_eq!(
        counter(&gw, "handshakes_resumed")?,
        before + 1,
        "the device's ticket from before the restart was not accepted"
    );

    gw.reload();
    assert!(
        gw.wait_for_log("reloaded certificates", Duration::from_secs(5)),
        "no reload logged"
    );
    let before = counter(&gw, "handshakes_resumed")?;
    let after_reload = connect(&gw).await?;
    drop(after_reload);
    assert_eq!(
        counter(&gw, "handshakes_resumed")?,
        before + 1,
        "the ticket did not survive a reload"
    );
    Ok(())
}
