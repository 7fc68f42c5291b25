//! Runs inside the kTLS test VM that `tests/tests/ktls_vm.rs` boots (a kernel with the
//! `tls` ULP): starts the gateway (`$DEVGATE_BIN`) with `[tls] offload = "auto"`, checks
//! that status says `kernel`, routes frames between a manager and a device (both with
//! real mTLS certificates) for every cipher suite devgate offers, sends a TLS 1.3
//! KeyUpdate mid-stream, and checks the fallback (`offload = "off"`).
//!
//! Prints one `KTLS_VM: <check> ok|FAIL <detail>` line per check and
//! `KTLS_VM: done failures=<n>` at the end; the host test parses these lines.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use devgate_client::{Body, Connection, Frame, Incoming, Role, tls_config_with};
use devgate_tests::{DataDir, Gateway};
use rustls::crypto::aws_lc_rs::cipher_suite as cs;
use rustls::{SupportedCipherSuite, SupportedProtocolVersion};

const STEP: Duration = Duration::from_secs(10);

fn report(failures: &mut u32, check: &str, result: Result<String>) {
    match result {
        Ok(detail) => println!("KTLS_VM: {check} ok {detail}"),
        Err(e) => {
            *failures += 1;
            println!("KTLS_VM: {check} FAIL {e:#}");
        }
    }
}

async fn connect(
    gw: &Gateway,
    role: Role,
    identity: (
        Vec<rustls_pki_types::CertificateDer<'static>>,
        rustls_pki_types::PrivateKeyDer<'static>,
    ),
    version: &'static SupportedProtocolVersion,
    suite: SupportedCipherSuite,
) -> Result<Connection> {
    let tls = tls_config_with(
        gw.client_roots(),
        Some(identity),
        &[version],
        Some(vec![suite]),
    )?;
    let conn = devgate_client::connect(&gw.options(role), tls).await?;
    let got = conn.cipher_suite().context("no cipher suite negotiated")?;
    if got.suite() != suite.suite() {
        bail!("negotiated {:?}, wanted {:?}", got.suite(), suite.suite());
    }
    Ok(conn)
}

/// The next frame that is not a presence event.
async fn next_frame(conn: &mut Connection) -> Result<devgate_client::Received> {
    loop {
        match conn.recv_timeout(STEP).await? {
            Some(Incoming::Frame(r)) => {
                if !matches!(r.frame().body, Body::Presence { .. }) {
                    return Ok(r);
                }
            }
            Some(Incoming::Closed { code, reason }) => bail!("closed ({code:?}, {reason})"),
            None => bail!("nothing within {STEP:?}"),
        }
    }
}

/// One command/response round trip manager → device → manager with `payload`.
async fn round_trip(
    mgr: &mut Connection,
    dev: &mut Connection,
    unit: &str,
    id: u32,
    payload: &[u8],
) -> Result<()> {
    mgr.send(&Frame::command(unit, id, payload)).await?;
    let r = next_frame(dev).await?;
    let f = r.frame();
    let Body::Command { payload: got } = f.body else {
        bail!("device got {:?}, wanted a command", f.body);
    };
    if got != payload {
        bail!(
            "command payload changed on the way ({} bytes, wanted {})",
            got.len(),
            payload.len()
        );
    }
    dev.send(&Frame::response("", f.id, got)).await?;
    let r = next_frame(mgr).await?;
    let f = r.frame();
    let Body::Response { payload: got } = f.body else {
        bail!("manager got {:?}, wanted a response", f.body);
    };
    if f.id != id || got != payload {
        bail!(
            "response {} ({} bytes) does not match command {id}",
            f.id,
            got.len()
        );
    }
    Ok(())
}

fn payload(i: u32) -> Vec<u8> {
    // Small frames, and some larger than one TLS record (16 KiB) so records split.
    let len = match i % 4 {
        0 => 16,
        1 => 700,
        2 => 20_000,
        _ => 70_000,
    };
    (0..len).map(|b| (b as u32 ^ i) as u8).collect()
}

async fn suite_routes(
    gw: &Gateway,
    unit: &str,
    version: &'static SupportedProtocolVersion,
    suite: SupportedCipherSuite,
) -> Result<String> {
    let mut mgr = connect(gw, Role::Manager, gw.manager_identity()?, version, suite).await?;
    let mut dev = connect(gw, Role::Device, gw.device_identity(unit)?, version, suite).await?;
    for i in 1..=12 {
        round_trip(&mut mgr, &mut dev, unit, i, &payload(i)).await?;
    }
    dev.close(1000, "").await.ok();
    mgr.close(1000, "").await.ok();
    Ok("12 round trips".to_owned())
}

fn counter(gw: &Gateway, name: &str) -> Result<u64> {
    let (_, text) = gw.admin_get("/metrics")?;
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("devgate_{name}_total ")))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no devgate_{name}_total in /metrics"))
}

async fn key_update(gw: &Gateway, rekey: bool) -> Result<String> {
    let unit = "vm-keyupdate";
    let v = &rustls::version::TLS13;
    let suite = cs::TLS13_AES_128_GCM_SHA256;
    let mut mgr = connect(gw, Role::Manager, gw.manager_identity()?, v, suite).await?;
    let mut dev = connect(gw, Role::Device, gw.device_identity(unit)?, v, suite).await?;
    round_trip(&mut mgr, &mut dev, unit, 1, b"before").await?;
    let before = counter(gw, "ktls_offloaded")?;
    if before == 0 {
        bail!("no session was offloaded before the KeyUpdate");
    }
    dev.refresh_traffic_keys()?;
    if rekey {
        for i in 2..6 {
            round_trip(&mut mgr, &mut dev, unit, i, &payload(i)).await?;
        }
        let n = counter(gw, "ktls_key_updates")?;
        if n == 0 {
            bail!("round trips passed but ktls_key_updates_total is 0");
        }
        return Ok(format!(
            "rekeyed in the kernel ({n} key updates), 4 round trips after"
        ));
    }
    // A kernel without TLS rekey: the session must end cleanly, with a reason.
    mgr.send(&Frame::command(unit, 2, b"after")).await?;
    let _ = next_frame(&mut dev).await; // the command, under the gateway's old key
    dev.send(&Frame::response("", 1, b"after")).await.ok(); // carries the KeyUpdate
    let closed = loop {
        match dev.recv_timeout(STEP).await {
            Ok(Some(Incoming::Closed { code, reason })) => break (code, reason),
            Ok(Some(Incoming::Frame(_))) => {}
            Ok(None) => bail!("device session not closed within {STEP:?} after its KeyUpdate"),
            Err(e) => bail!("device session failed instead of closing cleanly: {e}"),
        }
    };
    let n = counter(gw, "tls_rekey_unsupported")?;
    if n == 0 {
        bail!("closed {closed:?} but tls_rekey_unsupported_total is 0");
    }
    Ok(format!(
        "kernel cannot rekey: closed {closed:?}, tls_rekey_unsupported_total {n}"
    ))
}

/// Routes every cipher suite through a gateway on `data_path` with kTLS on; check names
/// carry `prefix`.
async fn kernel_checks(data_path: &str, prefix: &str) -> u32 {
    let mut failures = 0;
    let config = format!("data_path = \"{data_path}\"\n[tls]\noffload = \"auto\"");
    let gw = match Gateway::start(&config) {
        Ok(gw) => gw,
        Err(e) => {
            println!("KTLS_VM: {prefix}start FAIL {e:#}");
            return 1;
        }
    };
    let status = gw.status().unwrap_or_default();
    let rekey = status["tls_offload_rekey"].as_bool().unwrap_or(false);
    report(
        &mut failures,
        &format!("{prefix}status_kernel"),
        if status["tls_offload"] == "kernel" && status["data_path"] == data_path {
            Ok(format!(
                "ciphers {} rekey {rekey}",
                status["tls_offload_ciphers"]
            ))
        } else {
            Err(anyhow::anyhow!(
                "status says {} ({}) on {}",
                status["tls_offload"],
                status["tls_offload_reason"],
                status["data_path"]
            ))
        },
    );
    let suites: [(
        &str,
        &'static SupportedProtocolVersion,
        SupportedCipherSuite,
    ); 6] = [
        (
            "tls13_aes128",
            &rustls::version::TLS13,
            cs::TLS13_AES_128_GCM_SHA256,
        ),
        (
            "tls13_aes256",
            &rustls::version::TLS13,
            cs::TLS13_AES_256_GCM_SHA384,
        ),
        (
            "tls13_chacha20",
            &rustls::version::TLS13,
            cs::TLS13_CHACHA20_POLY1305_SHA256,
        ),
        (
            "tls12_aes128",
            &rustls::version::TLS12,
            cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        ),
        (
            "tls12_aes256",
            &rustls::version::TLS12,
            cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        ),
        (
            "tls12_chacha20",
            &rustls::version::TLS12,
            cs::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
        ),
    ];
    for (name, version, suite) in suites {
        let r = suite_routes(&gw, &format!("vm-{prefix}{name}"), version, suite).await;
        report(&mut failures, &format!("{prefix}suite_{name}"), r);
    }
    report(
        &mut failures,
        &format!("{prefix}offloaded_count"),
        counter(&gw, "ktls_offloaded").and_then(|n| {
            // Two sessions per suite; enrollment-free, so every one is a WebSocket session.
            if n >= 12 {
                Ok(format!("{n} sessions"))
            } else {
                bail!("only {n} sessions offloaded, wanted 12")
            }
        }),
    );
    let r = key_update(&gw, rekey).await;
    report(&mut failures, &format!("{prefix}key_update"), r);
    if failures > 0 {
        println!("KTLS_VM: gateway log follows\n{}", gw.logs());
    }
    failures
}

async fn run() -> u32 {
    let mut failures = 0;
    // Both drivers hand sessions to the kernel; the epoll checks keep their plain names.
    for (data_path, prefix) in [("epoll", ""), ("io_uring", "uring_")] {
        failures += kernel_checks(data_path, prefix).await;
    }
    let fallback = async {
        let gw = Gateway::start_in(
            DataDir::init()?,
            "data_path = \"epoll\"\n[tls]\noffload = \"off\"",
        )?;
        let s = gw.status()?;
        if s["tls_offload"] != "user"
            || !s["tls_offload_reason"]
                .as_str()
                .is_some_and(|r| r.contains("disabled by config"))
        {
            bail!(
                "status says {} ({})",
                s["tls_offload"],
                s["tls_offload_reason"]
            );
        }
        let r = suite_routes(
            &gw,
            "vm-fallback",
            &rustls::version::TLS13,
            cs::TLS13_AES_128_GCM_SHA256,
        )
        .await?;
        let n = counter(&gw, "ktls_offloaded")?;
        if n != 0 {
            bail!("{n} sessions offloaded with offload = off");
        }
        Ok(format!("user: {}; {r}", s["tls_offload_reason"]))
    }
    .await;
    report(&mut failures, "fallback_off", fallback);
    failures
}

fn main() {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            println!("KTLS_VM: start FAIL tokio runtime: {e}");
            return;
        }
    };
    let failures = rt.block_on(run());
    println!("KTLS_VM: done failures={failures}");
}
