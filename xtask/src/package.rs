//! `cargo xtask deb`: the Debian package (cargo-deb, installed by scripts/setup.sh).
//!
//! Builds the release binary, then packages it with the unit, the default configuration
//! and the maintainer scripts from `packaging/` (see `[package.metadata.deb]` in
//! gateway/Cargo.toml). Prints the path of the .deb. `--agent` builds the device agent's
//! package instead (`devgate-agent`, metadata in agent/Cargo.toml).

use anyhow::{Context, Result, bail};

/// Runs `cargo xtask deb [cargo-deb args]`.
pub(crate) fn deb(extra: &[String]) -> Result<()> {
    if !super::cargo()
        .args(["deb", "--version"])
        .output()
        .is_ok_and(|o| o.status.success())
    {
        bail!(
            "cargo-deb is not installed: run scripts/setup.sh (cargo install cargo-deb --locked)"
        );
    }
    let agent = extra.iter().any(|a| a == "--agent");
    let extra: Vec<&String> = extra.iter().filter(|a| *a != "--agent").collect();
    let (package, bin) = if agent {
        ("devgate-agent", "devgate-agent")
    } else {
        ("gateway", "devgate")
    };
    super::run(super::cargo().args(["build", "--release", "-p", package, "--bin", bin]))?;
    let out = super::cargo()
        .args(["deb", "-p", package, "--no-build"])
        .args(extra)
        .output()
        .context("running cargo deb")?;
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    if !out.status.success() {
        bail!("cargo deb failed with {}", out.status);
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let deb = stdout.trim();
    println!("{deb}");
    eprintln!(
        "install with: sudo apt install ./{}",
        deb.strip_prefix(&format!("{}/", std::env::current_dir()?.display()))
            .unwrap_or(deb)
    );
    Ok(())
}
