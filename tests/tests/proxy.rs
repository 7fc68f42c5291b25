//! Devices and managers behind an HTTP CONNECT proxy: a real tinyproxy (Debian's), started
//! by each test with its own configuration on a loopback port, between the client library
//! and the real gateway. Commands, responses and streams go through the tunnel; proxy
//! authentication works and a wrong password is named as such; `NO_PROXY` bypasses it.

mod tinyproxy_common;

use std::net::TcpListener;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use devgate_client::{Body, ClientError, Connection, Frame, Mux, Proxy, Role};
use devgate_tests::Gateway;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use tinyproxy_common::Tinyproxy;

const STEP: Duration = Duration::from_secs(20);

async fn connect_via(
    gw: &Gateway,
    role: Role,
    proxy: Option<Proxy>,
    unit: &str,
) -> Result<Connection, ClientError> {
    let mut opts = gw.options(role);
    opts.proxy = proxy;
    let tls = match role {
        Role::Device => gw.device_tls(unit),
        Role::Manager => gw.manager_tls(),
    }
    .map_err(|e| ClientError::Config(e.to_string()))?;
    devgate_client::connect(&opts, tls).await
}

/// The next non-stream frame of `mux` that is not presence.
async fn next_non_presence(mux: &mut Mux) -> Result<devgate_client::Received> {
    loop {
        let r = tokio::time::timeout(STEP, mux.next_frame())
            .await
            .context("no frame within 20 s")??;
        if !matches!(r.frame().body, Body::Presence { .. }) {
            return Ok(r);
        }
    }
}

/// A manager and a device, both through `proxy`: a command and its response, then 4 MiB
/// echoed through a stream.
async fn exchange_through(gw: &Gateway, proxy: &Proxy, unit: &str) -> Result<()> {
    let mut mgr = connect_via(gw, Role::Manager, Some(proxy.clone()), "").await?;
    let dev = connect_via(gw, Role::Device, Some(proxy.clone()), unit).await?;
    // Wait for the device's presence, so the command below finds it.
    loop {
        let Some(devgate_client::Incoming::Frame(r)) = mgr.recv_timeout(STEP).await? else {
            bail!("no presence for {unit}");
        };
        if r.frame().unit == unit {
            break;
        }
    }
    let mut mgr = Mux::new(mgr);
    let mut dev = Mux::new(dev);

    mgr.sender()
        .send(&Frame::command(unit, 7, b"uptime"))
        .await?;
    let cmd = next_non_presence(&mut dev).await?;
    let Body::Command { payload } = cmd.frame().body else {
        bail!("device got {:?}, not the command", cmd.frame());
    };
    assert_eq!(payload, b"uptime");
    dev.sender()
        .send(&Frame::response("", cmd.frame().id, b"up 3 days"))
        .await?;
    let resp = next_non_presence(&mut mgr).await?;
    let f = resp.frame();
    assert!(
        matches!(f.body, Body::Response { payload } if payload == b"up 3 days"),
        "{f:?}"
    );
    assert_eq!((f.unit, f.id), (unit, 7));

    let device = tokio::spawn(async move {
        let incoming = dev.accept_stream().await.context("no stream")?;
        let stream = incoming.accept();
        let (mut rd, mut wr) = tokio::io::split(stream);
        tokio::io::copy(&mut rd, &mut wr).await?;
        wr.shutdown().await?;
        Ok::<_, anyhow::Error>(dev)
    });
    const TOTAL: usize = 4 * 1024 * 1024;
    let data: Vec<u8> = (0..TOTAL).map(|i| (i * 13 % 251) as u8).collect();
    let want = Sha256::digest(&data);
    let stream = tokio::time::timeout(STEP, mgr.open_stream(unit, b"echo")).await??;
    let (mut rd, mut wr) = tokio::io::split(stream);
    let writer = tokio::spawn(async move { wr.write_all(&data).await.map(|()| wr) });
    let mut got = vec![0u8; TOTAL];
    tokio::time::timeout(Duration::from_secs(60), rd.read_exact(&mut got))
        .await
        .context("echo through the proxy timed out")??;
    assert_eq!(Sha256::digest(&got), want, "echoed bytes differ");
    writer.await??.shutdown().await?;
    tokio::time::timeout(STEP, device).await???;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_and_manager_exchange_commands_and_streams_through_tinyproxy() -> Result<()> {
    if !Tinyproxy::available()? {
        return Ok(());
    }
    let tp = Tinyproxy::start(None)?;
    let gw = Gateway::start("")?;
    let proxy = Proxy::parse(&tp.url(""))?;
    exchange_through(&gw, &proxy, "proxied-1").await?;
    assert!(
        tp.connects() >= 2,
        "tinyproxy saw no tunnels: {}",
        tp.logs()
    );

    // First contact goes through the proxy too.
    let before = tp.connects();
    let first =
        devgate_client::fetch_gateway_root_via(Some(&proxy), gw.addr, "localhost", STEP).await?;
    assert!(
        gw.client_roots().contains(&first.root),
        "first contact saw another root"
    );
    assert!(tp.connects() > before, "{}", tp.logs());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_authentication_accepts_the_password_and_names_a_wrong_one() -> Result<()> {
    if !Tinyproxy::available()? {
        return Ok(());
    }
    let tp = Tinyproxy::start(Some(("alice", "s3cret")))?;
    let gw = Gateway::start("")?;
    exchange_through(&gw, &Proxy::parse(&tp.url("alice:s3cret@"))?, "proxied-2").await?;

    let wrong = Proxy::parse(&tp.url("alice:guess@"))?;
    match connect_via(&gw, Role::Device, Some(wrong), "proxied-3").await {
        Err(ClientError::Proxy(msg)) => {
            assert!(
                msg.contains("rejected the credentials of user \"alice\""),
                "{msg}"
            );
            assert!(!msg.contains("guess"), "the password leaked: {msg}");
        }
        other => bail!("a wrong proxy password gave {other:?}"),
    }
    match connect_via(&gw, Role::Manager, Some(Proxy::parse(&tp.url(""))?), "").await {
        Err(ClientError::Proxy(msg)) => assert!(msg.contains("requires authentication"), "{msg}"),
        other => bail!("no proxy credentials gave {other:?}"),
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_proxy_bypasses_the_proxy_and_a_dead_proxy_is_named() -> Result<()> {
    if !Tinyproxy::available()? {
        return Ok(());
    }
    let tp = Tinyproxy::start(None)?;
    let gw = Gateway::start("")?;
    let url = tp.url("");
    let pick = |no_proxy: &str| Proxy::from_vars(Some(&url), Some(no_proxy), "localhost", gw.addr);

    // Listed by name, by address block, or everything: connect directly.
    for no_proxy in ["example.com,localhost", "127.0.0.0/8", "*"] {
        let proxy = pick(no_proxy)?;
        assert!(proxy.is_none(), "NO_PROXY={no_proxy} still proxies");
        connect_via(&gw, Role::Manager, proxy, "").await?;
    }
    // Not listed: through the proxy.
    let proxy = pick("example.com, 10.0.0.0/8")?;
    assert!(proxy.is_some());
    connect_via(&gw, Role::Device, proxy, "proxied-4").await?;
    assert_eq!(
        tp.connects(),
        1,
        "only the unlisted connection goes through: {}",
        tp.logs()
    );

    // A proxy that is not there is named, not confused with the gateway.
    let dead_port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let dead = Proxy::parse(&format!("http://127.0.0.1:{dead_port}"))?;
    match connect_via(&gw, Role::Manager, Some(dead), "").await {
        Err(e @ ClientError::Io(_)) => {
            let msg = e.to_string();
            assert!(
                msg.contains(&format!("HTTP proxy at 127.0.0.1:{dead_port}")),
                "{msg}"
            );
        }
        other => bail!("a dead proxy gave {other:?}"),
    }
    Ok(())
}
