//! `cargo xtask core-check` (also part of `ci`): the routing core stays sans I/O.
//!
//! - Its dependency tree holds none of the I/O crates (event loops, io_uring, async
//!   runtimes, eBPF, database clients, socket helpers), and `libc` is not a direct
//!   dependency (it comes in only beneath `getrandom` and `parking_lot`, for randomness and
//!   locks).
//! - Its source has no `unsafe`, no `libc::` call and reads no clock.
//! - No source file is over [`MAX_LINES`] lines.
//! - The modules' imports form no cycle, in the core and in the daemon (`gateway/src`):
//!   every `crate::module` a module's code (comments left out) names is an edge, a
//!   directory module (`worker/`) counts as one module.

use std::collections::{BTreeMap, BTreeSet};
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
    let mut graph = BTreeMap::new();
    scan(Path::new("core/src"), &mut problems, &mut files, &mut graph)?;
    if let Some(cycle) = find_cycle(&graph) {
        problems.push(format!("module import cycle: {}", cycle.join(" -> ")));
    }
    // The daemon's modules too: it was there that the cycles grew (admin ↔ server,
    // config ↔ guard).
    let daemon = daemon_graph(Path::new("gateway/src"))?;
    if let Some(cycle) = find_cycle(&daemon) {
        problems.push(format!(
            "module import cycle in the daemon (gateway/src): {}",
            cycle.join(" -> ")
        ));
    }
    if !problems.is_empty() {
        bail!(
            "devgate-core fails its checks:\n  {}",
            problems.join("\n  ")
        );
    }
    println!(
        "core-check: devgate-core has no I/O dependency and no import cycle; {files} source files clean"
    );
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

/// Module name → the modules its code names (`crate::x`).
type Graph = BTreeMap<String, BTreeSet<String>>;

fn scan(
    dir: &Path,
    problems: &mut Vec<String>,
    files: &mut usize,
    graph: &mut Graph,
) -> Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            scan(&path, problems, files, graph)?;
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
        let module = module_in(Path::new("core/src"), &path);
        let edges = graph.entry(module.clone()).or_default();
        for (n, line) in text.lines().enumerate() {
            add_edges(line, &module, edges);
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

/// The module graph of `dir` (the same rules as the core's, no other checks).
fn daemon_graph(dir: &Path) -> Result<Graph> {
    fn walk(root: &Path, dir: &Path, graph: &mut Graph) -> Result<()> {
        for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
            let path = entry?.path();
            if path.is_dir() {
                walk(root, &path, graph)?;
            } else if path.extension().is_some_and(|e| e == "rs") {
                let module = module_in(root, &path);
                let edges = graph.entry(module.clone()).or_default();
                for line in std::fs::read_to_string(&path)?.lines() {
                    add_edges(line, &module, edges);
                }
            }
        }
        Ok(())
    }
    let mut graph = Graph::new();
    walk(dir, dir, &mut graph)?;
    Ok(graph)
}

/// The `crate::x` modules a line of code names (comments left out), except `module`.
fn add_edges(line: &str, module: &str, edges: &mut BTreeSet<String>) {
    let code = line.split("//").next().unwrap_or_default();
    for (i, _) in code.match_indices("crate::") {
        let name: String = code[i + "crate::".len()..]
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || *c == '_')
            .collect();
        if !name.is_empty() && name != module {
            edges.insert(name);
        }
    }
}

/// The top-level module a source file under `root` belongs to: `x.rs` and `x/…` → `x`.
fn module_in(root: &Path, path: &Path) -> String {
    let rel = path.strip_prefix(root).unwrap_or(path);
    let first = rel.components().next().map_or_else(String::new, |c| {
        c.as_os_str().to_string_lossy().into_owned()
    });
    first.trim_end_matches(".rs").to_owned()
}

/// A cycle in `graph`, if there is one, as the modules along it.
fn find_cycle(graph: &Graph) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &Graph,
        state: &mut BTreeMap<String, bool>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        match state.get(node) {
            Some(true) => return None, // done
            Some(false) => {
                // On the stack: the cycle is from its first occurrence to here.
                let from = stack.iter().position(|n| n == node).unwrap_or(0);
                let mut cycle = stack[from..].to_vec();
                cycle.push(node.to_owned());
                return Some(cycle);
            }
            None => {}
        }
        state.insert(node.to_owned(), false);
        stack.push(node.to_owned());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(c) = visit(next, graph, state, stack) {
                return Some(c);
            }
        }
        stack.pop();
        state.insert(node.to_owned(), true);
        None
    }
    let mut state = BTreeMap::new();
    let mut stack = Vec::new();
    graph
        .keys()
        .find_map(|n| visit(n, graph, &mut state, &mut stack))
}
