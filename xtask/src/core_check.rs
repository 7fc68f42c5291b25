//! `cargo xtask core-check` (also part of `ci`): the routing core stays sans I/O.
//!
//! - Its dependency tree holds none of the I/O crates (event loops, io_uring, async
//!   runtimes, eBPF, database clients, socket helpers), and `libc` is not a direct
//!   dependency (it comes in only beneath `getrandom` and `parking_lot`, for randomness and
//!   locks).
//! - Its source has no `unsafe`, no `libc::` call and reads no clock.
//! - No source file is over [`MAX_LINES`] lines.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};

/// Crates the core must never depend on, directly or not.
const IO_CRATES: &[&str] = &[
    "mio", "io-uring", "tokio", "aya", "rusqlite", "postgres", "socket2", "nix",
];
/// What the core's source must not contain.
const FORBIDDEN: &[&str] = &["unsafe", "libc::", "Instant::now", "SystemTime::now"];
/// Longest source file allowed in the core.
const MAX_LINES: usize = 600;

pub(crate) fn check() -> Result<()> {
    let tree = cargo_tree(&["-e", "normal", "--prefix", "none"])?;
    let mut problems = Vec::new();
    for line in tree.lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        if IO_CRATES.contains(&name) {
            problems.push(format!("depends on the I/O crate {line}"));
        }
    }
    let direct = cargo_tree(&["-e", "normal", "--depth", "1", "--prefix", "none"])?;
    if direct.lines().any(|l| l.starts_with("libc ")) {
        problems.push("depends on libc directly".to_owned());
    }
    let mut files = 0;
    scan(Path::new("core/src"), &mut problems, &mut files)?;
    if !problems.is_empty() {
        bail!("devgate-core is not sans I/O:\n  {}", problems.join("\n  "));
    }
    println!("core-check: devgate-core has no I/O dependency, {files} source files clean");
    Ok(())
}

fn cargo_tree(args: &[&str]) -> Result<String> {
    let out = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["tree", "-p", "devgate-core"])
        .args(args)
        .output()
        .context("running cargo tree")?;
    if !out.status.success() {
        bail!(
            "cargo tree failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn scan(dir: &Path, problems: &mut Vec<String>, files: &mut usize) -> Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            scan(&path, problems, files)?;
            continue;
        }
        if path.extension().is_none_or(|e| e != "rs") {
            continue;
        }
        *files += 1;
        let text = std::fs::read_to_string(&path)?;
        let lines = text.lines().count();
        if lines > MAX_LINES {
            problems.push(format!(
                "{} has {lines} lines (at most {MAX_LINES})",
                path.display()
            ));
        }
        for (n, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or_default();
            for word in FORBIDDEN {
                if code.contains(word) {
                    problems.push(format!("{}:{}: `{word}`", path.display(), n + 1));
                }
            }
        }
    }
    Ok(())
}
