//! `devgate config check` / `config show`: the packaged file is valid, errors name the
//! key (or the environment variable) at fault, overrides apply in order.

mod ops_common;

use anyhow::Result;
use ops_common::{devgate, run_ok, text, workspace_root};

#[test]
fn config_check_accepts_the_packaged_file_and_names_the_key_at_fault() -> Result<()> {
    let packaged = workspace_root().join("packaging/devgate.toml");
    let out = run_ok(devgate().arg("config").arg("check").arg(&packaged))?;
    assert!(text(&out).contains(": ok"));

    let dir = tempfile::tempdir()?;
    for (body, needle) in [
        (
            "[limits]\ndevice_limit = \"many\"\n",
            "key limits.device_limit (line 2)",
        ),
        ("[limits]\ndevice_limt = 5\n", "limits.device_limt"),
        ("listen = \"not-an-address\"\n", "key listen (line 1)"),
        (
            "[keepalive]\nping_interval_ms = 1\n",
            "keepalive.ping_interval_ms",
        ),
        ("[limits]\nqueue_bytes = 1024\n", "limits.queue_bytes"),
        ("workers = 5000\n", "workers"),
        ("[store]\nurl = \"mysql://x\"\n", "store.url"),
        (
            "proxy_protocol_from = [\"10.0.0.0/99\"]\n",
            "proxy_protocol_from",
        ),
        ("[limits\n", "line 1"),
    ] {
        let file = dir.path().join("c.toml");
        std::fs::write(&file, body)?;
        let out = devgate().arg("config").arg("check").arg(&file).output()?;
        assert!(!out.status.success(), "{body:?} accepted");
        let msg = text(&out);
        assert!(msg.contains(needle), "{body:?}: {msg}");
        assert_eq!(msg.trim().lines().count(), 1, "one line: {msg}");
    }
    let out = devgate()
        .args(["config", "check", "/nonexistent/devgate.toml"])
        .output()?;
    assert!(!out.status.success());
    assert!(text(&out).contains("/nonexistent/devgate.toml"));
    Ok(())
}

#[test]
fn config_show_applies_the_file_then_the_environment() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("c.toml");
    std::fs::write(&file, "workers = 2\n[limits]\ndevice_limit = 10\n")?;
    let out = run_ok(
        devgate()
            .arg("config")
            .arg("show")
            .arg("--config")
            .arg(&file)
            .env("DEVGATE_LIMITS__DEVICE_LIMIT", "42")
            .env("DEVGATE_ADMIN", "127.0.0.1:9999"),
    )?;
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(
        shown.starts_with("# effective configuration: defaults < "),
        "{shown}"
    );
    assert!(shown.contains("DEVGATE_LIMITS__DEVICE_LIMIT"), "{shown}");
    assert!(shown.contains("workers = 2"), "{shown}");
    assert!(shown.contains("device_limit = 42"), "{shown}");
    assert!(shown.contains("admin = \"127.0.0.1:9999\""), "{shown}");
    // The output is itself a valid config file.
    let round = dir.path().join("shown.toml");
    std::fs::write(&round, shown.as_bytes())?;
    run_ok(devgate().arg("config").arg("check").arg(&round))?;

    let out = devgate()
        .arg("config")
        .arg("show")
        .arg("--config")
        .arg(&file)
        .env("DEVGATE_LIMITS__DEVICE_LIMIT", "lots")
        .output()?;
    assert!(!out.status.success());
    assert!(
        text(&out).contains("DEVGATE_LIMITS__DEVICE_LIMIT"),
        "{}",
        text(&out)
    );
    Ok(())
}
