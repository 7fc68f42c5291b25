//! Helpers shared by the operations tests (`ops_*.rs`).

#![allow(dead_code)] // each test binary uses a different subset

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::{Context, Result, bail};

/// Whether an external tool the test needs is installed. Without it the test is skipped
/// with a message naming the tool and `scripts/setup.sh`, unless `DEVGATE_REQUIRE_TOOLS`
/// is set (CI sets it: there a missing tool is a failure, not a skip).
pub(crate) fn have_tool(name: &str, why: &str) -> Result<bool> {
    let found = std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(name).is_file()));
    if found {
        return Ok(true);
    }
    if std::env::var_os("DEVGATE_REQUIRE_TOOLS").is_some() {
        bail!("{name} is required ({why}) but not installed: run scripts/setup.sh");
    }
    eprintln!("SKIPPED: {name} is not installed ({why}); scripts/setup.sh installs it");
    Ok(false)
}

/// Whether this process is root (tests that boot a service manager need it).
pub(crate) fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// The workspace root (the parent of `tests/`).
pub(crate) fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from(".."), Path::to_path_buf)
}

/// Runs a command; returns its output, failing with stderr if it fails.
pub(crate) fn run_ok(cmd: &mut Command) -> Result<Output> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}

/// stdout and stderr of an output, as text.
pub(crate) fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The `devgate` binary under test.
pub(crate) fn devgate() -> Command {
    Command::new(devgate_tests::binary("devgate"))
}

/// Builds the Debian package from the already built `devgate` binary of this test's
/// profile (no rebuild) into `out_dir`; returns the .deb's path.
pub(crate) fn build_deb(out_dir: &Path) -> Result<PathBuf> {
    let bin = devgate_tests::binary("devgate");
    let profile_dir = bin.parent().context("binary has no directory")?;
    let profile = profile_dir
        .file_name()
        .and_then(|p| p.to_str())
        .context("profile directory")?;
    // `--profile dev` makes cargo-deb take target/debug/devgate for target/release/devgate.
    let cargo_profile = if profile == "debug" { "dev" } else { profile };
    let target_dir = profile_dir.parent().context("target dir")?;
    let out = run_ok(
        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .current_dir(workspace_root())
            .args(["deb", "-p", "gateway", "--no-build", "--no-strip", "--fast"])
            .args(["--profile", cargo_profile])
            .env("CARGO_TARGET_DIR", target_dir)
            .arg("--output")
            .arg(out_dir),
    )?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let deb = stdout
        .lines()
        .rev()
        .find(|l| l.trim_end().ends_with(".deb"))
        .context("cargo deb printed no .deb path")?;
    Ok(PathBuf::from(deb.trim()))
}

/// A manager and `n` echo devices (`ops-000`…) on `gw`, every device announced online,
/// and one command answered per device (so that histograms and frame counters move).
pub(crate) async fn fleet(
    gw: &devgate_tests::Gateway,
    n: usize,
) -> Result<(
    devgate_client::Connection,
    Vec<tokio::task::JoinHandle<Result<()>>>,
)> {
    use devgate_client::{Body, Frame, Incoming};
    use std::time::Duration;
    let mut mgr = gw.manager().await?;
    let mut tasks = Vec::new();
    for i in 0..n {
        let unit = format!("ops-{i:03}");
        let mut dev = gw.device(&unit).await?;
        tasks.push(tokio::spawn(async move {
            loop {
                let r = match dev.recv().await? {
                    Incoming::Frame(r) => r,
                    Incoming::Closed { .. } => return Ok(()),
                };
                let f = r.frame();
                if let Body::Command { payload } = f.body {
                    dev.send(&Frame::response("", f.id, payload)).await?;
                }
            }
        }));
    }
    let cmds: Vec<(String, u32)> = (0..n)
        .map(|i| (format!("ops-{i:03}"), 100 + u32::try_from(i).unwrap_or(0)))
        .collect();
    let frames: Vec<Frame<'_>> = cmds
        .iter()
        .map(|(u, id)| Frame::command(u, *id, b"hello"))
        .collect();
    mgr.send_batch(&frames).await?;
    let mut answered = 0;
    while answered < n {
        match mgr.recv_timeout(Duration::from_secs(10)).await? {
            Some(Incoming::Frame(r)) => {
                if let Body::Response { .. } = r.frame().body {
                    answered += 1;
                }
            }
            other => bail!("manager: unexpected {other:?} after {answered} responses"),
        }
    }
    Ok((mgr, tasks))
}

/// Copies `from` into `to` recursively without overwriting existing files.
fn copy_missing(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let dest = to.join(entry.file_name());
        let kind = entry.file_type()?;
        if kind.is_dir() {
            copy_missing(&entry.path(), &dest)?;
        } else if std::fs::symlink_metadata(&dest).is_err() {
            if kind.is_symlink() {
                std::os::unix::fs::symlink(std::fs::read_link(entry.path())?, &dest)?;
            } else {
                std::fs::copy(entry.path(), &dest)?;
            }
        }
    }
    Ok(())
}

/// `systemd-analyze verify --root=ROOT UNIT` (UNIT is a path inside ROOT); fails on any
/// complaint about the unit, not just on a non-zero exit (unknown directives are only
/// warnings). ROOT is completed with what verify resolves inside it: the system's own
/// units (sysinit.target, network-online.target, …), /usr/bin/kill (ExecReload) and the
/// merged-/usr symlinks.
pub(crate) fn verify_unit(root: &Path, unit: &str) -> Result<String> {
    copy_missing(
        Path::new("/usr/lib/systemd/system"),
        &root.join("usr/lib/systemd/system"),
    )?;
    std::fs::create_dir_all(root.join("usr/bin"))?;
    if !root.join("usr/bin/kill").exists() {
        std::fs::copy("/usr/bin/kill", root.join("usr/bin/kill"))?;
    }
    for (link, target) in [("bin", "usr/bin"), ("lib", "usr/lib"), ("sbin", "usr/sbin")] {
        if std::fs::symlink_metadata(root.join(link)).is_err() {
            std::os::unix::fs::symlink(target, root.join(link))?;
        }
    }
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(format!("--root={}", root.display()))
        .arg(unit)
        .output()
        .context("running systemd-analyze")?;
    let report = text(&out);
    if !out.status.success() || report.contains("devgate") {
        bail!("systemd-analyze verify {unit}:\n{report}");
    }
    Ok(report)
}
