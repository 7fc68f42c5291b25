//! XDP tasks.
//!
//! - `build-ebpf`  — builds the XDP program (`gateway-ebpf/`, its own workspace) with the
//!   nightly named in `gateway-ebpf/TOOLCHAIN`, `-Z build-std=core` and bpf-linker
//!   (`scripts/install-ebpf-toolchain.sh` installs both), and copies the object to
//!   `target/xdp/devgate-xdp.o`, where a gateway built in this workspace finds it.
//! - `flood-bench` — builds release binaries and the object, then runs
//!   `devgate-flood-bench` (tests/src/bin/flood_bench.rs) as root: a SYN flood from a
//!   network namespace while 1,000 devices exchange frames, with XDP and with the
//!   user-space fallback. Not part of CI (it takes about two minutes).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

/// Where `build-ebpf` leaves the object (relative to the workspace root).
pub(crate) const OBJECT: &str = "target/xdp/devgate-xdp.o";

/// Runs the XDP task `task` (`build-ebpf` or `flood-bench`).
pub(crate) fn task(task: &str, args: &[String]) -> Result<()> {
    match task {
        "build-ebpf" => build_ebpf(),
        "flood-bench" => flood_bench(args),
        other => bail!("unknown XDP task {other}"),
    }
}

fn toolchain(root: &Path) -> Result<String> {
    let path = root.join("gateway-ebpf/TOOLCHAIN");
    let name =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    Ok(name.trim().to_owned())
}

pub(crate) fn build_ebpf() -> Result<()> {
    let root = std::env::current_dir()?;
    let tc = toolchain(&root)?;
    if Command::new("bpf-linker")
        .arg("--version")
        .output()
        .map_or(true, |o| !o.status.success())
    {
        bail!(
            "bpf-linker is not installed or does not run (its libLLVM link may be stale): run scripts/install-ebpf-toolchain.sh"
        );
    }
    let target_dir = root.join("target/ebpf");
    let mut cmd = Command::new("rustup");
    cmd.args(["run", &tc, "cargo", "build"])
        .args(["--bins", "--release", "--target", "bpfel-unknown-none"])
        .args(["-Z", "build-std=core", "--target-dir"])
        .arg(&target_dir)
        .current_dir(root.join("gateway-ebpf"));
    // The outer cargo (stable, running xtask) sets these; they must not leak into the
    // nightly build. The flags are aya-build's: BTF for the loader, debug info for BTF.
    for var in [
        "RUSTC",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTFLAGS",
        "CARGO",
        "RUSTUP_TOOLCHAIN",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
    ] {
        cmd.env_remove(var);
    }
    cmd.env(
        "CARGO_ENCODED_RUSTFLAGS",
        [
            "--cfg=bpf_target_arch=\"x86_64\"",
            "-Cdebuginfo=2",
            "-Clink-arg=--btf",
        ]
        .join("\x1f"),
    );
    crate::run(&mut cmd).context(
        "building the XDP program failed (toolchain missing? run scripts/install-ebpf-toolchain.sh)",
    )?;
    let built = target_dir.join("bpfel-unknown-none/release/devgate-xdp");
    let out = root.join(OBJECT);
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::copy(&built, &out)
        .with_context(|| format!("copying {} to {}", built.display(), out.display()))?;
    eprintln!("XDP object: {}", out.display());
    Ok(())
}

fn flood_bench(args: &[String]) -> Result<()> {
    build_ebpf()?;
    crate::run(crate::cargo().args(["build", "--release", "--bins"]))?;
    let root = std::env::current_dir()?;
    let bin = |name: &str| -> PathBuf { root.join("target/release").join(name) };
    crate::run(
        Command::new(bin("devgate-flood-bench"))
            .env("DEVGATE_BIN", bin("devgate"))
            .env("DEVGATE_LOADGEN_BIN", bin("devgate-loadgen"))
            .env("DEVGATE_XDP_OBJECT", root.join(OBJECT))
            .args(args),
    )
}
