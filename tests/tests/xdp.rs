//! The guard end to end: the real gateway with the real XDP program attached to a veth
//! in a network namespace of its own, clients in another namespace (both created here,
//! deleted on drop; no traffic leaves them), and the user-space fallback on loopback.
//!
//! The namespace tests need root (CAP_NET_ADMIN, CAP_BPF, CAP_PERFMON, CAP_NET_RAW) and
//! the XDP object from `cargo xtask build-ebpf`; without root they print "skipped" and
//! pass. CI runs as root. Every wait is bounded in time, every loop in count.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use devgate_client::{Body, ClientError, ConnectOptions, Connection, Frame, Incoming, Role};
use devgate_tests::netns::{
    self, CLIENT_IF, CLIENT_V4, NetPair, RawSender, SERVER_IF, SERVER_V4, SERVER_V6, TcpPacket,
    client_v4, client_v6,
};
use devgate_tests::{DataDir, Gateway, binary};
use serde_json::Value;

const PORT: u16 = 8443;
/// A connect whose SYN XDP drops gives up after this.
const DROPPED: Duration = Duration::from_secs(2);

fn skipped(test: &str) -> bool {
    if netns::is_root() {
        return false;
    }
    eprintln!("{test}: skipped: needs root/CAP_NET_ADMIN (network namespaces and XDP)");
    true
}

/// The object `cargo xtask build-ebpf` leaves in target/xdp (or `$DEVGATE_XDP_OBJECT`).
fn xdp_object() -> Result<PathBuf> {
    let path = match std::env::var_os("DEVGATE_XDP_OBJECT") {
        Some(p) => PathBuf::from(p),
        None => binary("devgate")
            .parent()
            .map(|d| d.join("../xdp/devgate-xdp.o"))
            .context("no binary dir")?,
    };
    ensure!(
        path.is_file(),
        "the XDP object {} is missing: run `cargo xtask build-ebpf` first (CI does)",
        path.display()
    );
    Ok(path)
}

fn gw_v4() -> SocketAddr {
    SocketAddr::new(SERVER_V4.into(), PORT)
}

/// Starts the gateway in `net`'s server namespace with XDP on its veth.
fn start(net: &NetPair, top: &str, xdp: &str) -> Result<Gateway> {
    let config = format!(
        "listen = \"[::]:{PORT}\"\nadmin = \"127.0.0.1:9180\"\nworkers = 2\n{top}\n[xdp]\ninterface = \"{SERVER_IF}\"\nobject = \"{}\"\n{xdp}\n",
        xdp_object()?.display()
    );
    Gateway::start_in_netns(DataDir::init()?, &net.server, &config)
}

fn xdp_status(gw: &Gateway) -> Result<Value> {
    Ok(gw.status()?["xdp"].clone())
}

fn counter(xdp: &Value, group: &str, name: &str) -> u64 {
    xdp[group][name].as_u64().unwrap_or(0)
}

/// Connects a device `unit` from source `from` to `to`.
async fn device_from(
    gw: &Gateway,
    unit: &str,
    from: IpAddr,
    to: SocketAddr,
) -> Result<Connection, ClientError> {
    let mut opts = ConnectOptions::new(to, "localhost", Role::Device);
    opts.bind = Some(from);
    opts.connect_timeout = DROPPED;
    let tls = gw
        .device_tls(unit)
        .map_err(|e| ClientError::Config(e.to_string()))?;
    devgate_client::connect(&opts, tls).await
}

async fn manager_from(gw: &Gateway, from: IpAddr) -> Result<Connection, ClientError> {
    let mut opts = ConnectOptions::new(gw_v4(), "localhost", Role::Manager);
    opts.bind = Some(from);
    opts.connect_timeout = DROPPED;
    let tls = gw
        .manager_tls()
        .map_err(|e| ClientError::Config(e.to_string()))?;
    devgate_client::connect(&opts, tls).await
}

/// The connect must have failed at TCP: its SYN was dropped (not refused, not reset).
fn assert_dropped_at_syn<T>(r: Result<T, ClientError>, what: &str) -> Result<()> {
    match r {
        Err(ClientError::Timeout(phase)) if phase.contains("TCP") => Ok(()),
        Err(e) => bail!("{what}: expected the SYN to be dropped (TCP connect timeout), got {e}"),
        Ok(_) => bail!("{what}: connected, but its SYN should have been dropped"),
    }
}

/// Polls `cond` on the XDP status until it holds (at most 10 s).
fn wait_status(gw: &Gateway, what: &str, cond: impl Fn(&Value) -> bool) -> Result<Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let v = xdp_status(gw)?;
        if cond(&v) {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}; xdp status: {v}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A device that answers every command with its payload.
fn spawn_echo(mut dev: Connection) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Ok(Incoming::Frame(r)) = dev.recv().await {
            let f = r.frame();
            if let Body::Command { payload } = f.body
                && dev.send(&Frame::response("", f.id, payload)).await.is_err()
            {
                return;
            }
        }
    })
}

#[test]
fn only_the_gateway_port_and_the_allow_list_get_through_and_stop_detaches() -> Result<()> {
    if skipped("port filter") {
        return Ok(());
    }
    let net = NetPair::create("port", 1, 1)?;
    let gw = start(&net, "", "allow = [\"tcp/2222 from 10.211.0.3\"]")?;
    let xdp = xdp_status(&gw)?;
    // veth has native XDP; `auto` must pick it.
    assert_eq!(xdp["mode"], "native", "{xdp}");
    assert!(net.server_has_xdp()?, "ip link shows no XDP program");
    // Something listens on 2222 and 9999 in the gateway's namespace: without XDP both
    // would answer. The kernel completes handshakes into the backlog; no accept needed.
    let _listeners = netns::in_netns(&net.server, || {
        Ok((
            std::net::TcpListener::bind("[::]:2222")?,
            std::net::TcpListener::bind("[::]:9999")?,
        ))
    })?;
    let v6 = IpAddr::from(client_v6(0));
    let server_v6 = IpAddr::from(SERVER_V6);
    let probes = netns::in_netns(&net.client, || {
        let t = Duration::from_millis(1500);
        let probe = |from: IpAddr, to: IpAddr, port: u16| {
            netns::tcp_probe(Some(from), SocketAddr::new(to, port), t)
        };
        let (c, other, server) = (CLIENT_V4.into(), client_v4(1).into(), SERVER_V4.into());
        Ok([
            ("10.211.0.2 → 8443", probe(c, server, PORT)?, true),
            ("10.211.0.2 → 9999", probe(c, server, 9999)?, false),
            (
                "10.211.0.3 → 2222 (allowed)",
                probe(other, server, 2222)?,
                true,
            ),
            (
                "10.211.0.2 → 2222 (not from there)",
                probe(c, server, 2222)?,
                false,
            ),
            ("fd00:211::2 → 8443", probe(v6, server_v6, PORT)?, true),
            ("fd00:211::2 → 9999", probe(v6, server_v6, 9999)?, false),
        ])
    })?;
    for (what, got, want) in probes {
        assert_eq!(got, want, "{what}: connected = {got}");
    }
    // A real device session through the filtered interface, over both families.
    netns::block_on_in(&net.client, || async {
        for (unit, to) in [
            ("port-v4", gw_v4()),
            ("port-v6", SocketAddr::new(server_v6, PORT)),
        ] {
            let from = if to.is_ipv4() { CLIENT_V4.into() } else { v6 };
            let dev = device_from(&gw, unit, from, to).await?;
            dev.close(1000, "").await?;
        }
        Ok(())
    })?;
    let xdp = xdp_status(&gw)?;
    // Three blocked probes, each a SYN plus at least one retransmission within 1.5 s.
    assert!(counter(&xdp, "drops", "port") >= 3, "{xdp}");
    // Two probes and two devices to 8443.
    assert!(counter(&xdp, "passed", "syn") >= 4, "{xdp}");
    assert!(counter(&xdp, "passed", "allowed") >= 1, "{xdp}");
    let (_, metrics) = gw.admin_get("/metrics")?;
    assert!(
        metrics.contains("devgate_xdp_packets_total{action=\"drop\",reason=\"port\"}"),
        "{metrics}"
    );

    // Stop: the program is detached. Start again: no stale state in the way.
    gw.stop()?;
    assert!(!net.server_has_xdp()?, "XDP still attached after stop");
    let gw = start(&net, "", "")?;
    assert_eq!(xdp_status(&gw)?["mode"], "native");
    // SIGKILL: the kernel detaches it when the link's descriptor closes.
    drop(gw);
    let deadline = Instant::now() + Duration::from_secs(5);
    while net.server_has_xdp()? {
        ensure!(
            Instant::now() < deadline,
            "XDP still attached after SIGKILL"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The client side never had a program.
    let client_link = netns::ip_output(&["-n", &net.client, "-d", "link", "show", CLIENT_IF])?;
    assert!(!client_link.contains("prog/xdp"));
    Ok(())
}

#[test]
fn the_n_plus_first_connection_from_one_source_is_dropped_at_syn() -> Result<()> {
    if skipped("per-IP limit") {
        return Ok(());
    }
    let net = NetPair::create("perip", 1, 2)?;
    let gw = start(&net, "", "max_conns_per_ip = 3")?;
    netns::block_on_in(&net.client, || async {
        let me = IpAddr::from(CLIENT_V4);
        let mut mine = Vec::new();
        for i in 0..3 {
            mine.push(device_from(&gw, &format!("ip-a{i}"), me, gw_v4()).await?);
        }
        assert_dropped_at_syn(
            device_from(&gw, "ip-a3", me, gw_v4()).await,
            "4th connection from 10.211.0.2",
        )?;
        // Another source is not affected.
        let other = device_from(&gw, "ip-b0", client_v4(1).into(), gw_v4()).await?;
        let xdp = xdp_status(&gw)?;
        assert!(counter(&xdp, "drops", "per_ip") >= 1, "{xdp}");
        // XDP did it: user space never saw the connection.
        assert_eq!(counter(&xdp, "refused_in_user_space", "per_ip"), 0, "{xdp}");
        assert_eq!(xdp["tracked_connections"], 4, "{xdp}");

        // IPv6 sources count per /64: two addresses of one /64 share the limit.
        let to6 = SocketAddr::new(SERVER_V6.into(), PORT);
        let (x, y) = (IpAddr::from(client_v6(0)), IpAddr::from(client_v6(1)));
        let mut v6 = vec![
            device_from(&gw, "ip-c0", x, to6).await?,
            device_from(&gw, "ip-c1", y, to6).await?,
            device_from(&gw, "ip-c2", x, to6).await?,
        ];
        assert_dropped_at_syn(
            device_from(&gw, "ip-c3", y, to6).await,
            "4th connection from fd00:211::/64",
        )?;
        // A closed connection frees its slot (the count in the map goes down).
        if let Some(d) = mine.pop() {
            d.close(1000, "").await?;
        }
        wait_status(&gw, "the count to drop", |v| v["tracked_connections"] == 6)?;
        mine.push(device_from(&gw, "ip-a3", me, gw_v4()).await?);
        v6.push(other);
        Ok(())
    })
}

#[test]
fn bursts_above_the_rate_are_shed_and_counters_match_what_was_sent() -> Result<()> {
    if skipped("rate limit and counters") {
        return Ok(());
    }
    let net = NetPair::create("rate", 1, 0)?;
    let gw = start(&net, "", "new_conns_per_sec = 5\nnew_conns_burst = 5")?;
    let before = xdp_status(&gw)?;
    // Hand-made packets from addresses no one owns, so nothing answers or retransmits:
    // every packet is exactly one decision of the program.
    netns::in_netns(&net.client, || {
        let raw = RawSender::new()?;
        let src = |last: u8| Ipv4Addr::new(10, 211, 0, last);
        for i in 0..30u16 {
            raw.send(&TcpPacket::syn(src(50), SERVER_V4, 20_000 + i, PORT).build())?;
        }
        for i in 0..40u16 {
            raw.send(&TcpPacket::syn(src(51), SERVER_V4, 20_000 + i, 9999).build())?;
        }
        for i in 0..7u16 {
            let mut p = TcpPacket::syn(src(52), SERVER_V4, 20_000 + i, PORT);
            p.tcp_len = 10; // truncated TCP header
            raw.send(&p.build())?;
        }
        for i in 0..3u16 {
            let mut p = TcpPacket::syn(src(53), SERVER_V4, 20_000 + i, PORT);
            p.frag = 0x2000; // more fragments follow
            raw.send(&p.build())?;
        }
        Ok(())
    })?;
    let after = wait_status(&gw, "all 80 packets counted", |v| {
        let d = |n: &str| counter(v, "drops", n) - counter(&before, "drops", n);
        d("rate") + d("port") + d("malformed") + d("fragment") >= 75
    })?;
    let delta = |g: &str, n: &str| counter(&after, g, n) - counter(&before, g, n);
    // 30 SYNs sent within a millisecond: the burst of 5 passes, 25 are shed.
    assert_eq!(delta("passed", "syn"), 5, "{after}");
    assert_eq!(delta("drops", "rate"), 25, "{after}");
    assert_eq!(delta("drops", "port"), 40, "{after}");
    assert_eq!(delta("drops", "malformed"), 7, "{after}");
    assert_eq!(delta("drops", "fragment"), 3, "{after}");
    assert_eq!(delta("drops", "per_ip"), 0, "{after}");
    assert_eq!(delta("drops", "device_limit"), 0, "{after}");

    // Real connections: a burst of 12 from one address, at once.
    let connected = netns::block_on_in(&net.client, || async {
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..12 {
            set.spawn(async {
                let s = tokio::net::TcpSocket::new_v4()?;
                s.bind(SocketAddr::new(client_v4(1).into(), 0))?;
                let ok = tokio::time::timeout(Duration::from_millis(700), s.connect(gw_v4()))
                    .await
                    .is_ok_and(|r| r.is_ok());
                Ok::<bool, std::io::Error>(ok)
            });
        }
        let mut n = 0;
        while let Some(r) = set.join_next().await {
            n += usize::from(r??);
        }
        Ok(n)
    })?;
    let xdp = xdp_status(&gw)?;
    // 5 at once, perhaps one or two more as tokens refill within 700 ms.
    assert!(
        (5..=8).contains(&connected),
        "{connected} of 12 connected; {xdp}"
    );
    assert!(delta_now(&xdp, &after, "rate") >= 4, "{xdp}");
    Ok(())
}

fn delta_now(now: &Value, then: &Value, reason: &str) -> u64 {
    counter(now, "drops", reason) - counter(then, "drops", reason)
}

#[test]
fn at_the_device_limit_new_syns_are_dropped_and_established_devices_keep_routing() -> Result<()> {
    if skipped("device limit") {
        return Ok(());
    }
    let net = NetPair::create("limit", 7, 0)?;
    let gw = start(
        &net,
        "[limits]\ndevice_limit = 3\n",
        "manager_sources = [\"10.211.0.9/32\"]",
    )?;
    netns::block_on_in(&net.client, || async {
        let me = IpAddr::from(CLIENT_V4);
        let mut mgr = manager_from(&gw, me).await?;
        let mut echo = Vec::new();
        for i in 0..3 {
            echo.push(spawn_echo(
                device_from(&gw, &format!("lim-{i}"), me, gw_v4()).await?,
            ));
        }
        wait_status(&gw, "accepting = false", |v| v["accepting"] == false)?;
        assert_dropped_at_syn(
            device_from(&gw, "lim-3", client_v4(1).into(), gw_v4()).await,
            "a device at the device limit",
        )?;
        let xdp = xdp_status(&gw)?;
        assert!(counter(&xdp, "drops", "device_limit") >= 1, "{xdp}");

        // The established ones keep routing: 300 commands, 300 answers.
        let started = Instant::now();
        for id in 0..300u32 {
            let unit = format!("lim-{}", id % 3);
            mgr.send(&Frame::command(&unit, id, b"ping")).await?;
        }
        let mut answered = HashSet::new();
        while answered.len() < 300 {
            ensure!(
                started.elapsed() < Duration::from_secs(20),
                "answers stalled"
            );
            match mgr.recv_timeout(Duration::from_secs(10)).await? {
                Some(Incoming::Frame(r)) => {
                    let f = r.frame();
                    if let Body::Response { payload } = f.body {
                        assert_eq!(payload, b"ping");
                        answered.insert(f.id);
                    }
                }
                other => bail!("manager lost: {other:?}"),
            }
        }
        // A manager from a manager network gets in at the limit.
        let second = manager_from(&gw, client_v4(7).into()).await?;
        // Below the limit again, new devices get in.
        if let Some(t) = echo.pop() {
            t.abort();
            // Await it so that its connection is dropped (closed) before we wait.
            let _ = t.await;
        }
        wait_status(&gw, "accepting = true", |v| v["accepting"] == true)?;
        let dev = device_from(&gw, "lim-3", client_v4(1).into(), gw_v4()).await?;
        dev.close(1000, "").await?;
        second.close(1000, "").await?;
        for t in echo {
            t.abort();
        }
        Ok(())
    })
}

// ----- without XDP: the user-space fallback (no root needed; loopback) -------------------

fn local_device_options(gw: &Gateway, from: [u8; 4], role: Role) -> ConnectOptions {
    let mut opts = gw.options(role);
    opts.bind = Some(IpAddr::from(from));
    opts.connect_timeout = Duration::from_secs(5);
    opts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_xdp_user_space_enforces_the_same_limits_and_status_says_why() -> Result<()> {
    let gw = Gateway::start(
        "[limits]\ndevice_limit = 4\n[xdp]\nmode = \"userspace\"\nmax_conns_per_ip = 2\nmanager_sources = [\"127.0.0.9\"]\n",
    )?;
    assert!(
        gw.wait_for_log(
            "XDP guard off: xdp.mode is \"userspace\"",
            Duration::from_secs(5)
        ),
        "{}",
        gw.logs()
    );
    let xdp = gw.status()?["xdp"].clone();
    assert_eq!(xdp["mode"], "off");
    assert_eq!(xdp["enforcement"], "user space");
    assert!(
        xdp["reason"]
            .as_str()
            .is_some_and(|r| r.contains("userspace"))
    );
    let device = |unit: &str, from: [u8; 4]| {
        let opts = local_device_options(&gw, from, Role::Device);
        let tls = gw.device_tls(unit);
        async move {
            devgate_client::connect(&opts, tls?)
                .await
                .map_err(anyhow::Error::from)
        }
    };
    let mut keep = vec![
        device("us-0", [127, 0, 0, 1]).await?,
        device("us-1", [127, 0, 0, 1]).await?,
    ];
    // The kernel accepted it; the guard closes it before TLS.
    assert!(device("us-2", [127, 0, 0, 1]).await.is_err());
    keep.push(device("us-3", [127, 0, 0, 2]).await?);
    keep.push(device("us-4", [127, 0, 0, 3]).await?);
    // Four devices: the limit. New connections are refused before TLS …
    let deadline = Instant::now() + Duration::from_secs(5);
    while gw.status()?["xdp"]["accepting"] != false {
        ensure!(Instant::now() < deadline, "still accepting at the limit");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(device("us-5", [127, 0, 0, 4]).await.is_err());
    // … except from a manager network.
    let opts = local_device_options(&gw, [127, 0, 0, 9], Role::Manager);
    let mgr = devgate_client::connect(&opts, gw.manager_tls()?).await?;
    let xdp = gw.status()?["xdp"].clone();
    assert_eq!(xdp["drops"]["per_ip"], 1, "{xdp}");
    assert_eq!(xdp["drops"]["device_limit"], 1, "{xdp}");
    assert_eq!(xdp["refused_in_user_space"]["per_ip"], 1, "{xdp}");
    assert_eq!(xdp["tracked_connections"], 5, "{xdp}");
    let (_, metrics) = gw.admin_get("/metrics")?;
    assert!(
        metrics.contains("devgate_guard_refused_total{reason=\"per_ip\"} 1"),
        "{metrics}"
    );
    mgr.close(1000, "").await?;
    for d in keep {
        d.close(1000, "").await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_xdp_a_burst_above_the_rate_is_refused_in_user_space() -> Result<()> {
    let gw = Gateway::start(
        "[xdp]\nmode = \"userspace\"\nnew_conns_per_sec = 1\nnew_conns_burst = 3\n",
    )?;
    let mut ok = 0;
    for i in 0..8 {
        let opts = local_device_options(&gw, [127, 0, 0, 5], Role::Device);
        if let Ok(d) = devgate_client::connect(&opts, gw.device_tls(&format!("r-{i}"))?).await {
            ok += 1;
            d.close(1000, "").await?;
        }
    }
    let xdp = gw.status()?["xdp"].clone();
    // The burst of 3, and perhaps one more: at one token a second, the 8 handshakes
    // (milliseconds each) would have to take over a second for a second extra one.
    assert!((3..=4).contains(&ok), "{ok} of 8 admitted; {xdp}");
    assert_eq!(xdp["drops"]["rate"], 8 - ok, "{xdp}");
    Ok(())
}

#[test]
fn where_xdp_cannot_be_loaded_the_reason_is_logged_once_and_shown() -> Result<()> {
    // No object: nothing touches the kernel, so this runs anywhere.
    let gw = Gateway::start(
        "[xdp]\ninterface = \"dg-none0\"\nobject = \"/nonexistent/devgate-xdp.o\"\nmax_conns_per_ip = 5\n",
    )?;
    let xdp = gw.status()?["xdp"].clone();
    assert_eq!(xdp["mode"], "off");
    let reason = xdp["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("XDP object not found"), "{reason}");
    assert!(reason.contains("cargo xtask build-ebpf"), "{reason}");
    assert_eq!(xdp["limits"]["max_conns_per_ip"], 5);
    assert_eq!(
        gw.logs().matches("XDP guard off").count(),
        1,
        "{}",
        gw.logs()
    );
    drop(gw);
    // With the object, an interface that does not exist (root) or missing capabilities.
    let Ok(object) = xdp_object() else {
        eprintln!("no XDP object: second half skipped (run `cargo xtask build-ebpf`)");
        return Ok(());
    };
    let gw = Gateway::start(&format!(
        "[xdp]\ninterface = \"dg-none0\"\nobject = \"{}\"\n",
        object.display()
    ))?;
    let reason = gw.status()?["xdp"]["reason"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    if netns::is_root() {
        assert!(reason.contains("no interface named dg-none0"), "{reason}");
    } else {
        assert!(reason.contains("missing CAP_"), "{reason}");
    }
    Ok(())
}

#[test]
fn large_frames_cross_the_program_in_native_and_generic_mode() -> Result<()> {
    if skipped("large frames") {
        return Ok(());
    }
    // Big writes leave the client as GSO segments of up to 64 KiB; the program must let
    // them through whole in both attach modes (and not mistake them for truncated).
    for mode in ["native", "generic"] {
        let net = NetPair::create("big", 0, 0)?;
        let gw = start(&net, "", &format!("mode = \"{mode}\""))?;
        assert_eq!(xdp_status(&gw)?["mode"], mode);
        netns::block_on_in(&net.client, || async {
            let me = IpAddr::from(CLIENT_V4);
            let mut mgr = manager_from(&gw, me).await?;
            let dev = spawn_echo(device_from(&gw, "big-0", me, gw_v4()).await?);
            let payload: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
            // One at a time: four at once would exceed the device's 2 MiB queue.
            let deadline = Instant::now() + Duration::from_secs(30);
            for id in 0..4 {
                mgr.send(&Frame::command("big-0", id, &payload)).await?;
                loop {
                    ensure!(Instant::now() < deadline, "{mode}: answers stalled");
                    match mgr.recv_timeout(Duration::from_secs(10)).await? {
                        Some(Incoming::Frame(r)) => match r.frame().body {
                            Body::Response { payload: p } => {
                                ensure!(p == payload.as_slice(), "{mode}: payload changed");
                                break;
                            }
                            Body::Presence { .. } => {}
                            other => bail!("{mode}: unexpected {other:?}"),
                        },
                        other => bail!(
                            "{mode}: no answer ({other:?}) to {id}; xdp status: {}",
                            xdp_status(&gw)?
                        ),
                    }
                }
            }
            dev.abort();
            Ok(())
        })?;
        let xdp = xdp_status(&gw)?;
        assert_eq!(counter(&xdp, "drops", "malformed"), 0, "{mode}: {xdp}");
        assert_eq!(counter(&xdp, "drops", "fragment"), 0, "{mode}: {xdp}");
    }
    Ok(())
}
