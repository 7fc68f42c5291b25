//! `devgate install` / `uninstall` under a staging root: the files they write, that both
//! are idempotent, that uninstall keeps state unless --purge; and the installed unit
//! passes `systemd-analyze verify`.

mod ops_common;

use std::path::Path;

use anyhow::Result;
use ops_common::{devgate, have_tool, run_ok, text, workspace_root};

fn install(root: &Path, extra: &[&str]) -> Result<String> {
    let out = run_ok(devgate().arg("install").arg("--root").arg(root).args(extra))?;
    Ok(text(&out))
}

fn uninstall(root: &Path, extra: &[&str]) -> Result<String> {
    let out = run_ok(
        devgate()
            .arg("uninstall")
            .arg("--root")
            .arg(root)
            .args(extra),
    )?;
    Ok(text(&out))
}

#[test]
fn install_and_uninstall_are_idempotent_and_keep_state_unless_purged() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let root = tmp.path();
    let first = install(root, &["--name", "localhost,127.0.0.1"])?;
    eprintln!("{first}");
    for file in [
        "usr/local/bin/devgate",
        "etc/systemd/system/devgate.service",
        "etc/devgate/devgate.toml",
        "etc/default/devgate",
        "var/lib/devgate/pki/root.pem",
        "var/lib/devgate/pki/server.key",
    ] {
        assert!(
            root.join(file).exists(),
            "{file} missing after install:\n{first}"
        );
    }
    assert!(first.contains("Root fingerprint: "), "{first}");
    let unit = std::fs::read_to_string(root.join("etc/systemd/system/devgate.service"))?;
    assert!(
        unit.contains("ExecStart=/usr/local/bin/devgate serve --config /etc/devgate/devgate.toml")
    );
    let packaged = std::fs::read_to_string(workspace_root().join("packaging/devgate.toml"))?;
    assert_eq!(
        std::fs::read_to_string(root.join("etc/devgate/devgate.toml"))?,
        packaged
    );

    // Again: nothing changes; an operator's edits are kept.
    std::fs::write(root.join("etc/devgate/devgate.toml"), "workers = 3\n")?;
    let second = install(root, &["--name", "other.example"])?;
    for line in [
        "/usr/local/bin/devgate",
        "/etc/systemd/system/devgate.service",
    ] {
        assert!(
            second
                .lines()
                .any(|l| l.contains(line) && l.contains("unchanged")),
            "{line} not unchanged:\n{second}"
        );
    }
    assert!(
        second
            .lines()
            .any(|l| l.contains("/etc/devgate/devgate.toml") && l.contains("kept"))
    );
    assert!(
        second
            .lines()
            .any(|l| l.contains("PKI") && l.contains("kept")),
        "{second}"
    );
    assert_eq!(
        std::fs::read_to_string(root.join("etc/devgate/devgate.toml"))?,
        "workers = 3\n"
    );

    // Uninstall keeps state and config; twice is fine.
    let removed = uninstall(root, &[])?;
    assert!(!root.join("etc/systemd/system/devgate.service").exists());
    assert!(!root.join("usr/local/bin/devgate").exists());
    assert!(
        root.join("var/lib/devgate/pki/root.key").exists(),
        "state kept:\n{removed}"
    );
    assert!(root.join("etc/devgate/devgate.toml").exists());
    let again = uninstall(root, &[])?;
    assert!(again.contains("absent"), "{again}");

    // --purge removes state and config.
    uninstall(root, &["--purge"])?;
    assert!(!root.join("var/lib/devgate").exists());
    assert!(!root.join("etc/devgate").exists());
    assert!(!root.join("etc/default/devgate").exists());
    uninstall(root, &["--purge"])?;
    Ok(())
}

#[test]
fn installing_to_the_real_root_needs_root() -> Result<()> {
    if ops_common::is_root() {
        return Ok(()); // would really install; covered by ops_systemd.rs in a sandbox
    }
    let out = devgate().arg("install").output()?;
    assert!(!out.status.success());
    assert!(text(&out).contains("must run as root"));
    Ok(())
}

#[test]
fn installed_unit_passes_systemd_analyze_verify() -> Result<()> {
    if !have_tool("systemd-analyze", "verifies the unit file")? {
        return Ok(());
    }
    let tmp = tempfile::tempdir()?;
    install(tmp.path(), &[])?;
    // verify also checks that ExecStart's binary exists under the root.
    ops_common::verify_unit(tmp.path(), "/etc/systemd/system/devgate.service")?;
    // And that it would notice: a unit pointing at a missing binary fails.
    std::fs::remove_file(tmp.path().join("usr/local/bin/devgate"))?;
    assert!(ops_common::verify_unit(tmp.path(), "/etc/systemd/system/devgate.service").is_err());
    Ok(())
}
