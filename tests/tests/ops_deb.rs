//! The Debian package: built with cargo-deb from the tested binary, it holds the binary,
//! the unit, the default config (as conffiles), the docs and the maintainer scripts that
//! create the user and enable (not start) the service; its unit passes
//! `systemd-analyze verify` with the package's files in place.

mod ops_common;

use std::process::Command;

use anyhow::{Context, Result};
use ops_common::{build_deb, have_tool, run_ok, workspace_root};

#[test]
fn deb_holds_binary_unit_config_and_scripts_and_its_unit_verifies() -> Result<()> {
    if !have_tool("cargo-deb", "builds the .deb")?
        || !have_tool("dpkg-deb", "inspects the .deb")?
        || !have_tool("systemd-analyze", "verifies the unit")?
    {
        return Ok(());
    }
    let out_dir = tempfile::tempdir()?;
    let deb = build_deb(out_dir.path())?;
    let name = deb
        .file_name()
        .and_then(|n| n.to_str())
        .context("deb name")?;
    assert!(
        name.starts_with("devgate_") && name.ends_with("_amd64.deb"),
        "{name}"
    );

    // Contents.
    let list = String::from_utf8(run_ok(Command::new("dpkg-deb").arg("-c").arg(&deb))?.stdout)?;
    for (path, mode) in [
        ("./usr/bin/devgate", "-rwxr-xr-x"),
        ("./usr/lib/systemd/system/devgate.service", "-rw-r--r--"),
        ("./etc/devgate/devgate.toml", "-rw-r--r--"),
        ("./etc/default/devgate", "-rw-r--r--"),
        ("./usr/share/doc/devgate/OPERATIONS.md", "-rw-r--r--"),
        ("./usr/share/doc/devgate/copyright", "-rw-r--r--"),
        (
            "./usr/share/doc/devgate/examples/prometheus/devgate-alerts.yml",
            "-rw-r--r--",
        ),
    ] {
        assert!(
            list.lines()
                .any(|l| l.starts_with(mode) && l.ends_with(path)),
            "{path} ({mode}) not in the package:\n{list}"
        );
    }
    assert!(
        list.lines().all(|l| l.contains(" 0/0 ")),
        "files owned by root:\n{list}"
    );

    // Control files.
    let ctl = out_dir.path().join("control");
    run_ok(Command::new("dpkg-deb").arg("-e").arg(&deb).arg(&ctl))?;
    let control = std::fs::read_to_string(ctl.join("control"))?;
    assert!(control.contains("Package: devgate"), "{control}");
    assert!(control.contains(&format!("Version: {}-", env!("CARGO_PKG_VERSION"))));
    assert!(
        control
            .lines()
            .any(|l| l.starts_with("Depends:") && l.contains("adduser"))
    );
    let conffiles = std::fs::read_to_string(ctl.join("conffiles"))?;
    assert!(
        conffiles.contains("/etc/devgate/devgate.toml")
            && conffiles.contains("/etc/default/devgate")
    );
    let postinst = std::fs::read_to_string(ctl.join("postinst"))?;
    assert!(postinst.contains("adduser --system --group"), "{postinst}");
    assert!(postinst.contains("deb-systemd-helper enable devgate.service"));
    assert!(postinst.contains("deb-systemd-invoke try-restart devgate.service"));
    assert!(
        !postinst.contains("deb-systemd-invoke start"),
        "must not start without a PKI"
    );
    assert!(!postinst.contains("#DEBHELPER#"));
    let postrm = std::fs::read_to_string(ctl.join("postrm"))?;
    assert!(
        postrm.contains("rm -rf /var/lib/devgate"),
        "purge removes state"
    );
    let prerm = std::fs::read_to_string(ctl.join("prerm"))?;
    assert!(prerm.contains("deb-systemd-invoke stop devgate.service"));
    for script in ["postinst", "postrm", "prerm"] {
        run_ok(Command::new("sh").arg("-n").arg(ctl.join(script)))
            .with_context(|| format!("{script} is not valid sh"))?;
    }

    // The packaged files are the repository's.
    let root = out_dir.path().join("root");
    run_ok(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root))?;
    let ws = workspace_root();
    for (inside, source) in [
        (
            "usr/lib/systemd/system/devgate.service",
            "packaging/devgate.service",
        ),
        ("etc/devgate/devgate.toml", "packaging/devgate.toml"),
        ("etc/default/devgate", "packaging/default.env"),
    ] {
        assert_eq!(
            std::fs::read(root.join(inside))?,
            std::fs::read(ws.join(source))?,
            "{inside}"
        );
    }
    let unit = std::fs::read_to_string(root.join("usr/lib/systemd/system/devgate.service"))?;
    for directive in [
        "Type=notify",
        "WatchdogSec=",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "LimitNOFILE=1048576",
        "User=devgate",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "AmbientCapabilities=CAP_NET_BIND_SERVICE CAP_BPF CAP_NET_ADMIN CAP_PERFMON",
        "CapabilityBoundingSet=CAP_NET_BIND_SERVICE CAP_BPF CAP_NET_ADMIN CAP_PERFMON",
    ] {
        assert!(unit.contains(directive), "unit lacks {directive}");
    }
    // The packaged binary is the one the other tests ran.
    let version = run_ok(Command::new(root.join("usr/bin/devgate")).arg("--version"))?;
    assert!(String::from_utf8_lossy(&version.stdout).contains(env!("CARGO_PKG_VERSION")));

    ops_common::verify_unit(&root, "/usr/lib/systemd/system/devgate.service")?;
    Ok(())
}
