//! `/v1/status` carries every field operators and `devgate status` rely on; the human
//! summary fits a screen; environment overrides reach a running gateway; graceful
//! shutdown tells managers before closing; no key material reaches the log.

mod ops_common;

use std::time::Duration;

use anyhow::{Context, Result, bail};
use devgate_client::{Body, ErrorCode, Incoming};
use devgate_tests::{DataDir, Gateway};
use ops_common::{devgate, run_ok};
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_json_has_every_documented_field() -> Result<()> {
    let gw = Gateway::start("[limits]\ndevice_limit = 500\n")?;
    let (_mgr, devices) = ops_common::fleet(&gw, 5).await?;
    let s = gw.status()?;

    assert_eq!(s["version"], env!("CARGO_PKG_VERSION"));
    assert!(s["uptime_secs"].is_u64());
    assert!(
        s["started_at_unix"]
            .as_i64()
            .is_some_and(|t| t > 1_600_000_000)
    );
    assert_eq!(s["pid"], gw.pid());
    assert_eq!(s["check_status"], "ok");
    assert_eq!(s["shutting_down"], false);
    assert_eq!(s["data_path"], expected_data_path(&s));
    if s["tls_offload"] == "user" {
        assert!(s["tls_offload_reason"].is_string(), "{s}");
    } else {
        assert_eq!(s["tls_offload"], "kernel", "{s}");
    }
    assert!(s["xdp"]["mode"].is_string(), "{}", s["xdp"]);
    assert!(s["xdp"]["reason"].is_string());
    assert_eq!(s["workers"], 2);
    assert_eq!(s["devices"], 5);
    assert_eq!(s["managers"], 1);
    assert!(s["connections"].as_u64().is_some_and(|n| n >= 6));
    assert_eq!(s["listen"], gw.addr.to_string());
    assert_eq!(s["admin"], gw.admin.to_string());

    let limits = &s["limits"];
    assert_eq!(limits["device_limit"], 500);
    for key in [
        "max_connections",
        "queue_bytes",
        "queue_hard_bytes",
        "max_message_bytes",
        "handshake_timeout_ms",
        "max_pending_requests",
        "max_streams_per_device",
        "nofile",
    ] {
        assert!(
            limits[key].as_u64().is_some_and(|n| n > 0),
            "limits.{key}: {limits}"
        );
    }
    assert!(s["keepalive"]["ping_interval_ms"].is_u64());
    assert!(s["grace"]["grace_secs"].is_u64());
    assert!(
        s["grace"]["without_manager_secs"].is_null(),
        "a manager is connected"
    );
    assert_eq!(s["grace"]["devices_refused"], false);

    let certs = s["certificates"].as_array().context("certificates")?;
    let roles: Vec<&str> = certs.iter().filter_map(|c| c["role"].as_str()).collect();
    for role in ["server", "device_ca", "manager_ca", "root"] {
        assert!(roles.contains(&role), "no {role} certificate in {roles:?}");
    }
    for c in certs {
        assert!(c["subject"].as_str().is_some_and(|x| !x.is_empty()), "{c}");
        assert!(
            c["not_after"].as_str().is_some_and(|x| x.ends_with('Z')),
            "{c}"
        );
        assert!(c["not_after_unix"].is_i64(), "{c}");
        assert!(
            c["expires_in_days"].as_i64().is_some_and(|d| d > 300),
            "{c}"
        );
    }

    let store = &s["store"];
    assert_eq!(store["ok"], true, "{store}");
    assert_eq!(store["data_dir"], gw.data.path().display().to_string());
    assert!(store["free_bytes"].as_u64().is_some_and(|b| b > 0));
    assert_eq!(store["problems"], Value::Array(vec![]));

    let wd = &s["watchdog"];
    assert_eq!(wd["notify_socket"], false, "not started under systemd");
    assert!(wd["interval_ms"].is_null());
    assert!(
        wd["oldest_heartbeat_age_ms"]
            .as_u64()
            .is_some_and(|ms| ms < 3000),
        "{wd}"
    );

    let rt = &s["latency"]["device_response"];
    assert_eq!(rt["count"], 5, "{rt}");
    assert!(rt["p50_le_us"].is_u64() && rt["p99_le_us"].is_u64(), "{rt}");
    assert!(
        s["latency"]["handshake"]["count"]
            .as_u64()
            .is_some_and(|n| n >= 6)
    );
    assert!(s["log_messages_suppressed"].is_u64());
    let counters = &s["counters"];
    assert_eq!(counters["device_sessions"], 5);
    assert_eq!(counters["responses_routed"], 5);

    for t in devices {
        t.abort();
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devgate_status_prints_a_one_screen_summary() -> Result<()> {
    let gw = Gateway::start("")?;
    let (_mgr, devices) = ops_common::fleet(&gw, 3).await?;
    let out = run_ok(devgate().args(["status", "--admin", &gw.admin.to_string()]))?;
    let summary = String::from_utf8_lossy(&out.stdout);
    eprintln!("{summary}");
    let lines: Vec<&str> = summary.lines().collect();
    assert!(lines.len() <= 20, "more than a screen:\n{summary}");
    assert!(lines.iter().all(|l| l.chars().count() <= 160), "{summary}");
    for needle in [
        "status OK",
        "data path ",
        "TLS user space",
        "XDP ",
        "devices 3 (limit unlimited)",
        "managers 1",
        "handshakes ",
        "command round trip",
        "certificates:",
        "    server ",
        "store sqlite",
        "watchdog off (not under systemd)",
        "no problems",
    ] {
        assert!(summary.contains(needle), "no {needle:?} in:\n{summary}");
    }
    let json = run_ok(devgate().args(["status", "--json", "--admin", &gw.admin.to_string()]))?;
    let v: Value = serde_json::from_slice(&json.stdout)?;
    assert_eq!(v["devices"], 3);

    // Unreachable admin listener: a clear error, non-zero exit.
    let out = devgate()
        .args(["status", "--admin", "127.0.0.1:1"])
        .output()?;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach the admin listener"));
    for t in devices {
        t.abort();
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn environment_overrides_reach_a_running_gateway() -> Result<()> {
    let gw = Gateway::start_in_env(
        DataDir::init()?,
        "",
        &[
            ("DEVGATE_LIMITS__DEVICE_LIMIT", "7"),
            ("DEVGATE_KEEPALIVE__PING_INTERVAL_MS", "12345"),
        ],
    )?;
    let s = gw.status()?;
    assert_eq!(s["limits"]["device_limit"], 7);
    assert_eq!(s["keepalive"]["ping_interval_ms"], 12345);
    assert!(
        gw.logs().contains("DEVGATE_LIMITS__DEVICE_LIMIT"),
        "the source is logged"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_tells_managers_then_closes_everyone_with_going_away() -> Result<()> {
    let gw = Gateway::start("")?;
    let mut mgr = gw.manager().await?;
    let mut dev = gw.device("bye-1").await?;
    // Wait until the manager saw the device, so that nothing else is in flight.
    match mgr.recv_timeout(Duration::from_secs(10)).await? {
        Some(Incoming::Frame(r)) if matches!(r.frame().body, Body::Presence { .. }) => {}
        other => bail!("unexpected {other:?}"),
    }
    let key = std::fs::read_to_string(gw.data.path().join("pki/manager.key"))?;
    let logs_before_stop = gw.logs();
    let stopper = std::thread::spawn(move || gw.stop());

    let mut told = false;
    let code = loop {
        match mgr.recv_timeout(Duration::from_secs(10)).await? {
            Some(Incoming::Frame(r)) => {
                if let Body::Error { code, message } = r.frame().body {
                    assert_eq!(code, ErrorCode::ShuttingDown, "{message}");
                    assert_eq!(r.frame().id, 0);
                    told = true;
                }
            }
            Some(Incoming::Closed { code, .. }) => break code,
            None => bail!("the manager was not closed"),
        }
    };
    assert!(
        told,
        "the manager got no shutting_down error before the close"
    );
    assert_eq!(code, Some(1001));
    let dev_code = loop {
        match dev.recv_timeout(Duration::from_secs(10)).await? {
            Some(Incoming::Frame(_)) => {}
            Some(Incoming::Closed { code, .. }) => break code,
            None => bail!("the device was not closed"),
        }
    };
    assert_eq!(dev_code, Some(1001));
    let exit = stopper
        .join()
        .map_err(|_| anyhow::anyhow!("stop panicked"))??;
    assert_eq!(exit, Some(0));

    // No key material in what the gateway logged.
    let body: String = key.lines().filter(|l| !l.starts_with("-----")).collect();
    assert!(body.len() > 40);
    for chunk in body.as_bytes().chunks(32) {
        let chunk = String::from_utf8_lossy(chunk);
        assert!(
            !logs_before_stop.contains(chunk.as_ref()),
            "key material in the log"
        );
    }
    assert!(!logs_before_stop.contains("PRIVATE KEY"));
    Ok(())
}

/// The driver the suite runs on: epoll when `DEVGATE_DATA_PATH=epoll` (CI runs the
/// end-to-end suites on both), else io_uring unless the probe said why not.
fn expected_data_path(status: &Value) -> &'static str {
    if std::env::var("DEVGATE_DATA_PATH").as_deref() == Ok("epoll") {
        return "epoll";
    }
    if status["data_path"] == "epoll" {
        // Only acceptable with the probe's reason (a kernel without io_uring).
        assert!(
            status["data_path_reason"].is_string(),
            "epoll without a reason: {status}"
        );
        return "epoll";
    }
    "io_uring"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_data_path_is_reported_and_epoll_can_be_forced() -> Result<()> {
    if std::env::var("DEVGATE_DATA_PATH").is_ok() {
        return Ok(()); // the environment would override the files below
    }
    let gw = Gateway::start("data_path = \"epoll\"")?;
    let s = gw.status()?;
    assert_eq!(s["data_path"], "epoll", "{s}");
    assert!(
        s["data_path_reason"]
            .as_str()
            .is_some_and(|r| r.contains("configuration")),
        "{s}"
    );
    drop(gw);

    let gw = Gateway::start_in(DataDir::init()?, "data_path = \"auto\"")?;
    let s = gw.status()?;
    let auto = s["data_path"].as_str().unwrap_or_default().to_owned();
    assert!(auto == "io_uring" || auto == "epoll", "{s}");
    let (_, metrics) = gw.admin_get("/metrics")?;
    assert!(
        metrics.contains(&format!("data_path=\"{auto}\"")),
        "no data_path label in build_info"
    );
    drop(gw);

    // The contract's flag overrides the file.
    let gw = Gateway::start_with_args(
        DataDir::init()?,
        "data_path = \"auto\"",
        &["--data-path", "epoll"],
    )?;
    assert_eq!(gw.status()?["data_path"], "epoll");
    Ok(())
}

/// Whether this host's kernel has the `tls` ULP (the development machines do not).
fn host_has_ktls() -> bool {
    std::fs::read_to_string("/proc/sys/net/ipv4/tcp_available_ulp")
        .is_ok_and(|s| s.split_whitespace().any(|u| u == "tls"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_offload_is_reported_with_its_reason() -> Result<()> {
    // `off` always means rustls, with the reason naming the configuration.
    let gw = Gateway::start("[tls]\noffload = \"off\"")?;
    let s = gw.status()?;
    assert_eq!(s["tls_offload"], "user", "{s}");
    assert!(
        s["tls_offload_reason"]
            .as_str()
            .is_some_and(|r| r.contains("disabled by config")),
        "{s}"
    );
    let (_, metrics) = gw.admin_get("/metrics")?;
    assert!(
        metrics.contains("tls_offload=\"user\""),
        "no tls_offload label in build_info"
    );
    // Sessions still route with records in rustls.
    let (_mgr, devices) = ops_common::fleet(&gw, 2).await?;
    assert_eq!(devices.len(), 2);
    drop(gw);

    // `auto` on a kernel without the tls ULP falls back and says why.
    let gw = Gateway::start_in(DataDir::init()?, "[tls]\noffload = \"auto\"")?;
    let s = gw.status()?;
    let mode = s["tls_offload"].as_str().unwrap_or_default();
    assert!(mode == "user" || mode == "kernel", "{s}");
    if mode == "user" {
        let reason = s["tls_offload_reason"].as_str().unwrap_or_default();
        assert!(!reason.is_empty(), "user without a reason: {s}");
        if !host_has_ktls() {
            assert!(reason.contains("no tls ULP"), "{s}");
        }
    } else {
        assert!(host_has_ktls(), "kernel offload without a tls ULP: {s}");
    }
    let (_, metrics) = gw.admin_get("/metrics")?;
    assert!(
        metrics.contains(&format!("tls_offload=\"{mode}\"")),
        "{metrics}"
    );
    drop(gw);

    // The environment reaches the key like any other.
    let gw = Gateway::start_in_env(DataDir::init()?, "", &[("DEVGATE_TLS__OFFLOAD", "off")])?;
    assert_eq!(gw.status()?["tls_offload"], "user");
    Ok(())
}
