//! `/metrics` of a live gateway is valid Prometheus text (`promtool check metrics`), has
//! the families operators alert on, and the example scrape config and alert rules are
//! valid.

mod ops_common;

use std::io::Write;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};
use devgate_tests::Gateway;
use ops_common::{have_tool, text, workspace_root};

/// `promtool check metrics` on `metrics`; returns promtool's output.
fn promtool_check_metrics(metrics: &str) -> Result<String> {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running promtool")?;
    child
        .stdin
        .take()
        .context("promtool stdin")?
        .write_all(metrics.as_bytes())?;
    let out = child.wait_with_output()?;
    let report = text(&out);
    if !out.status.success() || !report.trim().is_empty() {
        bail!("promtool check metrics failed ({}):\n{report}", out.status);
    }
    Ok(report)
}

/// The value of the sample line that starts with `series ` (exact series, labels included).
fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|l| {
        l.strip_prefix(series)
            .and_then(|rest| rest.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_of_a_live_gateway_pass_promtool_and_carry_the_operator_families() -> Result<()> {
    if !have_tool("promtool", "checks /metrics")? {
        return Ok(());
    }
    let gw = Gateway::start("")?;
    let (_mgr, devices) = ops_common::fleet(&gw, 20).await?;
    // A refused upgrade (no client certificate) and a broken handshake, so that the
    // rejection and handshake-failure series are not all zero.
    let anon = gw.anonymous_tls()?;
    let _ = devgate_client::connect(&gw.options(devgate_client::Role::Device), anon).await;
    {
        let mut s = std::net::TcpStream::connect(gw.addr)?;
        s.write_all(b"\x16\x03\x01\x00\x05hello-not-tls")?;
        let _ = std::io::Read::read(&mut s, &mut [0u8; 64]);
    }

    let (status, metrics) = gw.admin_get("/metrics")?;
    assert_eq!(status, 200);
    promtool_check_metrics(&metrics)?;

    let expect = [
        ("devgate_connections{role=\"device\"}", Some(20.0)),
        ("devgate_connections{role=\"manager\"}", Some(1.0)),
        ("devgate_sessions_total{role=\"device\"}", Some(20.0)),
        (
            "devgate_frames_total{direction=\"in\",role=\"device\"}",
            None,
        ),
        (
            "devgate_frames_total{direction=\"out\",role=\"device\"}",
            None,
        ),
        (
            "devgate_frames_total{direction=\"in\",role=\"manager\"}",
            None,
        ),
        (
            "devgate_frames_total{direction=\"out\",role=\"manager\"}",
            None,
        ),
        ("devgate_bytes_total{direction=\"in\"}", None),
        ("devgate_bytes_total{direction=\"out\"}", None),
        ("devgate_handshakes_total{result=\"ok\"}", None),
        ("devgate_handshakes_total{result=\"tls_error\"}", None),
        ("devgate_handshakes_total{result=\"timeout\"}", Some(0.0)),
        ("devgate_rejections_total{reason=\"http\"}", None),
        (
            "devgate_rejections_total{reason=\"device_limit\"}",
            Some(0.0),
        ),
        ("devgate_rejections_total{reason=\"no_manager\"}", Some(0.0)),
        ("devgate_queue_full_total", Some(0.0)),
        ("devgate_check_status{status=\"ok\"}", Some(1.0)),
        ("devgate_device_response_duration_seconds_count", Some(20.0)),
        ("devgate_log_messages_suppressed_total", None),
        ("devgate_watchdog_heartbeat_age_seconds", None),
    ];
    for (series, value) in expect {
        let got =
            sample(&metrics, series).with_context(|| format!("no {series} in:\n{metrics}"))?;
        if let Some(v) = value {
            assert_eq!(got, v, "{series}");
        }
    }
    for (series, at_least) in [
        (
            "devgate_frames_total{direction=\"in\",role=\"device\"}",
            20.0,
        ),
        (
            "devgate_frames_total{direction=\"out\",role=\"manager\"}",
            20.0,
        ),
        ("devgate_handshakes_total{result=\"ok\"}", 21.0),
        ("devgate_handshakes_total{result=\"tls_error\"}", 1.0),
        ("devgate_rejections_total{reason=\"http\"}", 1.0),
    ] {
        let got = sample(&metrics, series).unwrap_or(0.0);
        assert!(got >= at_least, "{series} = {got}, expected ≥ {at_least}");
    }
    // Histograms: cumulative buckets ending in +Inf, equal to _count.
    for h in [
        "devgate_device_response_duration_seconds",
        "devgate_handshake_duration_seconds",
    ] {
        let inf = sample(&metrics, &format!("{h}_bucket{{le=\"+Inf\"}}"))
            .with_context(|| format!("{h} has no +Inf bucket"))?;
        assert_eq!(Some(inf), sample(&metrics, &format!("{h}_count")), "{h}");
        assert!(metrics.contains(&format!("# TYPE {h} histogram")));
        let buckets: Vec<f64> = metrics
            .lines()
            .filter(|l| l.starts_with(&format!("{h}_bucket")))
            .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
            .collect();
        assert_eq!(buckets.len(), 17, "{h}: 16 bounds + Inf");
        assert!(
            buckets.windows(2).all(|w| w[0] <= w[1]),
            "{h} not cumulative"
        );
    }
    assert!(metrics.contains("devgate_certificate_expiry_timestamp_seconds{role=\"server\""));
    assert!(metrics.contains("devgate_build_info{version="));
    for t in devices {
        t.abort();
    }
    Ok(())
}

#[test]
fn example_scrape_config_and_alert_rules_are_valid() -> Result<()> {
    if !have_tool("promtool", "checks the example Prometheus files")? {
        return Ok(());
    }
    let dir = workspace_root().join("packaging/prometheus");
    for args in [
        ["check", "config", "prometheus.yml"],
        ["check", "rules", "devgate-alerts.yml"],
    ] {
        let out = Command::new("promtool")
            .args(args)
            .current_dir(&dir)
            .output()?;
        assert!(out.status.success(), "promtool {args:?}:\n{}", text(&out));
    }
    // Every metric the alert rules use is one the gateway exports.
    let rules = std::fs::read_to_string(dir.join("devgate-alerts.yml"))?;
    let gw = Gateway::start("")?;
    let (_, metrics) = gw.admin_get("/metrics")?;
    for word in rules.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
        if let Some(name) = word.strip_prefix("devgate_") {
            let family = name.strip_suffix("_bucket").unwrap_or(name);
            assert!(
                metrics.contains(&format!("# TYPE devgate_{family} ")),
                "alert rules use devgate_{name}, which /metrics does not export"
            );
        }
    }
    Ok(())
}
