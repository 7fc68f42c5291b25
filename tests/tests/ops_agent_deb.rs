//! The devgate-agent Debian package (`cargo xtask deb --agent`): built with cargo-deb from
//! the tested binary, it holds the agent, its unit, the default configuration (a conffile
//! that the agent reads) and the docs; its scripts enable (not start) the unit, which waits
//! for an enrollment, and a purge removes the credential; the unit passes
//! `systemd-analyze verify` with the package's files in place.

mod ops_common;

use std::process::Command;

use anyhow::{Context, Result, ensure};
use ops_common::{have_tool, run_ok, workspace_root};

#[test]
fn agent_deb_holds_binary_unit_and_config_and_its_unit_verifies() -> Result<()> {
    if !have_tool("cargo-deb", "builds the .deb")?
        || !have_tool("dpkg-deb", "inspects the .deb")?
        || !have_tool("systemd-analyze", "verifies the unit")?
    {
        return Ok(());
    }
    let out_dir = tempfile::tempdir()?;
    let bin = devgate_tests::binary("devgate-agent");
    let profile_dir = bin.parent().context("binary has no directory")?;
    let profile = profile_dir
        .file_name()
        .and_then(|p| p.to_str())
        .context("profile directory")?;
    let cargo_profile = if profile == "debug" { "dev" } else { profile };
    let out = run_ok(
        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .current_dir(workspace_root())
            .args([
                "deb",
                "-p",
                "devgate-agent",
                "--no-build",
                "--no-strip",
                "--fast",
            ])
            .args(["--profile", cargo_profile])
            .env(
                "CARGO_TARGET_DIR",
                profile_dir.parent().context("target dir")?,
            )
            .arg("--output")
            .arg(out_dir.path()),
    )?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let deb = stdout
        .lines()
        .rev()
        .find(|l| l.trim_end().ends_with(".deb"))
        .map(|l| std::path::PathBuf::from(l.trim()))
        .context("cargo deb printed no .deb path")?;

    let list = String::from_utf8(run_ok(Command::new("dpkg-deb").arg("-c").arg(&deb))?.stdout)?;
    for (path, mode) in [
        ("./usr/bin/devgate-agent", "-rwxr-xr-x"),
        (
            "./usr/lib/systemd/system/devgate-agent.service",
            "-rw-r--r--",
        ),
        ("./etc/devgate/agent.toml", "-rw-r--r--"),
        ("./usr/share/doc/devgate-agent/OPERATIONS.md", "-rw-r--r--"),
    ] {
        ensure!(
            list.lines()
                .any(|l| l.starts_with(mode) && l.ends_with(path)),
            "{path} ({mode}) not in the package:\n{list}"
        );
    }
    let ctl = out_dir.path().join("control");
    run_ok(Command::new("dpkg-deb").arg("-e").arg(&deb).arg(&ctl))?;
    ensure!(std::fs::read_to_string(ctl.join("control"))?.contains("Package: devgate-agent"));
    ensure!(std::fs::read_to_string(ctl.join("conffiles"))?.contains("/etc/devgate/agent.toml"));
    let postinst = std::fs::read_to_string(ctl.join("postinst"))?;
    ensure!(postinst.contains("deb-systemd-helper enable devgate-agent.service"));
    ensure!(
        !postinst.contains("deb-systemd-invoke start"),
        "must not start before enrollment"
    );
    ensure!(std::fs::read_to_string(ctl.join("postrm"))?.contains("rm -rf /var/lib/devgate-agent"));
    for script in ["postinst", "postrm", "prerm"] {
        run_ok(Command::new("sh").arg("-n").arg(ctl.join(script)))
            .with_context(|| format!("{script} is not valid sh"))?;
    }

    let root = out_dir.path().join("root");
    run_ok(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root))?;
    let ws = workspace_root();
    for (inside, source) in [
        (
            "usr/lib/systemd/system/devgate-agent.service",
            "packaging/devgate-agent.service",
        ),
        ("etc/devgate/agent.toml", "packaging/agent.toml"),
    ] {
        ensure!(
            std::fs::read(root.join(inside))? == std::fs::read(ws.join(source))?,
            "{inside} differs from {source}"
        );
    }
    let unit = std::fs::read_to_string(root.join("usr/lib/systemd/system/devgate-agent.service"))?;
    ensure!(unit.contains("ConditionPathExists=/var/lib/devgate-agent/gateway.json"));
    // The packaged configuration is valid: the agent gets as far as the missing enrollment.
    let out = Command::new(root.join("usr/bin/devgate-agent"))
        .args(["run", "--config"])
        .arg(root.join("etc/devgate/agent.toml"))
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && stderr.contains("not enrolled yet"),
        "{stderr}"
    );

    ops_common::verify_unit(&root, "/usr/lib/systemd/system/devgate-agent.service")?;
    Ok(())
}
