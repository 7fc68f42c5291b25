//! The kernel-TLS data path, tested in a VM whose kernel has the `tls` ULP (the machines
//! devgate is built on have none; see ../shared/recipes/kernel-vm.md).
//!
//! Packs the gateway and `devgate-ktls-vm-client` as built for the tests (stripped, with
//! the shared libraries they link) into an initramfs with Debian's cloud kernel modules (`scripts/ktls-vm-mkinitramfs.sh`), boots
//! QEMU in software emulation, and asserts on the `KTLS_VM:` lines the client prints: status
//! says `kernel`, frames route for every cipher suite on TLS 1.3 and 1.2 (on the epoll and
//! the io_uring data path), a KeyUpdate is
//! applied (or, on a kernel without TLS rekey, ends the session cleanly with a counter),
//! and `offload = "off"` reports `user` with its reason.
//!
//! Without qemu or the kernel (`scripts/setup.sh` installs both, as root) the test is
//! skipped, unless `DEVGATE_REQUIRE_TOOLS` is set (CI), where that is a failure.

mod ops_common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use ops_common::{have_tool, run_ok, workspace_root};

const KERNEL_DIR: &str = "/var/cache/devgate-ci/ktls-vm/kernel";
/// The whole boot (gateway start, every suite, KeyUpdate, fallback) under TCG.
const VM_TIMEOUT_SECS: u64 = 150;

/// The extracted kernel: (`vmlinuz` path, version).
fn kernel() -> Option<(PathBuf, String)> {
    let boot = Path::new(KERNEL_DIR).join("boot");
    let entry = std::fs::read_dir(&boot)
        .ok()?
        .filter_map(Result::ok)
        .find(|e| e.file_name().to_string_lossy().starts_with("vmlinuz-"))?;
    let name = entry.file_name().to_string_lossy().into_owned();
    let version = name.strip_prefix("vmlinuz-")?.to_owned();
    Some((entry.path(), version))
}

fn tools_present() -> Result<bool> {
    for (tool, why) in [
        ("qemu-system-x86_64", "boots the kTLS test VM"),
        ("cpio", "packs the VM's initramfs"),
        ("depmod", "indexes the VM's kernel modules"),
        ("busybox", "the VM's userland"),
    ] {
        if !have_tool(tool, why)? && !Path::new("/sbin").join(tool).is_file() {
            return Ok(false);
        }
    }
    if kernel().is_none() {
        if std::env::var_os("DEVGATE_REQUIRE_TOOLS").is_some() {
            bail!("no Debian cloud kernel under {KERNEL_DIR}: run scripts/setup.sh as root");
        }
        eprintln!(
            "SKIPPED: no kernel with kTLS under {KERNEL_DIR}; scripts/setup.sh installs it (as root)"
        );
        return Ok(false);
    }
    Ok(true)
}

/// The gateway and the in-VM client as the test suite built them (`cargo xtask test`
/// builds every binary first). The initramfs script copies their shared libraries in, so
/// no second, static build of the workspace is needed.
fn binaries() -> Result<[PathBuf; 2]> {
    let bins = [
        devgate_tests::binary("devgate"),
        devgate_tests::binary("devgate-ktls-vm-client"),
    ];
    for b in &bins {
        if !b.is_file() {
            bail!(
                "{} is not built: run `cargo build --bins` first (`cargo xtask test` does)",
                b.display()
            );
        }
    }
    Ok(bins)
}

#[test]
fn ktls_data_path_in_a_vm() -> Result<()> {
    if !tools_present()? {
        return Ok(());
    }
    let (vmlinuz, version) = kernel().context("kernel")?;
    let root = workspace_root();
    let [gateway, client] = binaries()?;
    let work = tempfile::tempdir()?;
    let runner = work.path().join("ktls_vm_test");
    std::fs::write(
        &runner,
        "#!/bin/sh\nexport DEVGATE_BIN=/bin/devgate TMPDIR=/tmp\nexec /bin/devgate-ktls-vm-client\n",
    )?;
    run_ok(Command::new("chmod").arg("+x").arg(&runner))?;
    let initrd = work.path().join("initrd.cpio.gz");
    run_ok(
        Command::new(root.join("scripts/ktls-vm-mkinitramfs.sh"))
            .arg(KERNEL_DIR)
            .arg(&version)
            .arg(&initrd)
            .arg(&gateway)
            .arg(&client)
            .arg(&runner),
    )
    .context("building the VM's initramfs")?;

    let started = Instant::now();
    let out = Command::new("timeout")
        .arg(VM_TIMEOUT_SECS.to_string())
        .args([
            "qemu-system-x86_64",
            "-accel",
            "tcg",
            "-cpu",
            "max",
            "-smp",
            "1",
            "-m",
            "768M",
            "-nographic",
            "-no-reboot",
            "-kernel",
        ])
        .arg(&vmlinuz)
        .arg("-initrd")
        .arg(&initrd)
        .args(["-append", "console=ttyS0 quiet panic=-1 rdinit=/init"])
        .output()
        .context("running qemu-system-x86_64")?;
    let took = started.elapsed();
    let console = String::from_utf8_lossy(&out.stdout);
    eprintln!("kTLS VM ({version}) ran {:.1} s", took.as_secs_f64());
    for line in console
        .lines()
        .filter(|l| l.contains("KTLS_VM:") || l.contains("GUEST:"))
    {
        eprintln!("{line}");
    }
    let lines: Vec<&str> = console
        .lines()
        .filter_map(|l| l.split_once("KTLS_VM: ").map(|(_, r)| r.trim_end()))
        .collect();
    let done = lines
        .iter()
        .find_map(|l| l.strip_prefix("done failures="))
        .with_context(|| {
            format!(
                "the VM did not finish (timeout {VM_TIMEOUT_SECS} s, took {took:?}); console:\n{console}"
            )
        })?;
    let failed: Vec<&&str> = lines.iter().filter(|l| l.contains(" FAIL ")).collect();
    assert!(
        failed.is_empty() && done == "0",
        "kTLS VM checks failed: {failed:#?}\nconsole:\n{console}"
    );
    let kernel_checks = [
        "status_kernel",
        "suite_tls13_aes128",
        "suite_tls13_aes256",
        "suite_tls13_chacha20",
        "suite_tls12_aes128",
        "suite_tls12_aes256",
        "suite_tls12_chacha20",
        "offloaded_count",
        "key_update",
    ];
    // The epoll driver's checks, the io_uring driver's (prefixed), and the fallback.
    let checks = kernel_checks
        .iter()
        .map(|c| (*c).to_owned())
        .chain(kernel_checks.iter().map(|c| format!("uring_{c}")))
        .chain(["fallback_off".to_owned()]);
    for check in checks {
        assert!(
            lines.iter().any(|l| l.starts_with(&format!("{check} ok"))),
            "no passing {check} line; console:\n{console}"
        );
    }
    assert!(
        took < Duration::from_secs(VM_TIMEOUT_SECS),
        "the VM ran into its timeout"
    );
    Ok(())
}
