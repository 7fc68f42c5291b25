//! Remote access end to end, part 2: ordinary clients through `devgate-ctl forward` to
//! real servers behind `devgate-agent`: OpenSSH (a command, and scp of 50 MiB both ways),
//! a VNC server on a virtual display (screen shadowing), and 100 parallel HTTP downloads.

mod remote_common;

use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use remote_common::{Proc, Remote, free_port, have_tool, sha256_file, text, wait_port};

/// Writes `len` bytes of deterministic, incompressible-looking data.
fn write_pattern(path: &std::path::Path, len: usize, seed: u64) -> Result<()> {
    let mut x = seed | 1;
    let mut data = Vec::with_capacity(len);
    while data.len() < len {
        // xorshift64*: cheap and not compressible, so ssh's compression would not help.
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        data.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    data.truncate(len);
    std::fs::write(path, data)?;
    Ok(())
}

#[test]
fn openssh_through_forward_runs_a_command_and_copies_50_mib_both_ways() -> Result<()> {
    if !have_tool("/usr/sbin/sshd", "a real OpenSSH server behind the agent")?
        || !have_tool("ssh", "a real OpenSSH client through forward")?
        || !have_tool("scp", "scp through forward")?
    {
        return Ok(());
    }
    let sshd_port = free_port()?;
    let r = Remote::start(&format!("[tcp]\nallow = [\"127.0.0.1:{sshd_port}\"]\n"))?;
    let d = r.dir.path();
    let _sshd = remote_common::start_sshd(d, sshd_port)?;
    let (_fwd, port) = r.forward(&format!("127.0.0.1:{sshd_port}"))?;
    let user = std::env::var("USER").unwrap_or_else(|_| "root".into());
    let opts = |c: &mut Command| {
        c.arg("-i")
            .arg(d.join("id"))
            .args([
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "UserKnownHostsFile=/dev/null",
            ])
            .args(["-o", "BatchMode=yes", "-o", "LogLevel=ERROR"]);
    };
    let mut ssh = Command::new("ssh");
    opts(&mut ssh);
    let out = ssh
        .args(["-p", &port.to_string(), &format!("{user}@127.0.0.1")])
        .arg("echo through-devgate $((40+2))")
        .stdin(Stdio::null())
        .output()?;
    let (stdout, stderr) = text(&out);
    ensure!(out.status.success(), "ssh: {stderr}");
    ensure!(
        stdout.trim() == "through-devgate 42",
        "ssh printed {stdout:?}"
    );

    let up = d.join("up.bin");
    write_pattern(&up, 50 << 20, 7)?;
    let remote_copy = d.join("remote.bin");
    let back = d.join("back.bin");
    let mut scp = Command::new("scp");
    opts(&mut scp);
    let out = scp
        .args(["-q", "-P", &port.to_string()])
        .arg(&up)
        .arg(format!("{user}@127.0.0.1:{}", remote_copy.display()))
        .output()?;
    ensure!(out.status.success(), "scp up: {:?}", text(&out));
    let mut scp = Command::new("scp");
    opts(&mut scp);
    let out = scp
        .args(["-q", "-P", &port.to_string()])
        .arg(format!("{user}@127.0.0.1:{}", remote_copy.display()))
        .arg(&back)
        .output()?;
    ensure!(out.status.success(), "scp down: {:?}", text(&out));
    let want = sha256_file(&up)?;
    ensure!(
        sha256_file(&remote_copy)? == want,
        "the uploaded copy differs"
    );
    ensure!(sha256_file(&back)? == want, "the downloaded copy differs");
    Ok(())
}

#[test]
fn vnc_screenshot_through_forward() -> Result<()> {
    if !have_tool("Xvfb", "a virtual display for the VNC server")?
        || !have_tool("x11vnc", "a real VNC server behind the agent")?
        || !have_tool("vncsnapshot", "a real VNC client through forward")?
    {
        return Ok(());
    }
    let vnc_port = free_port()?;
    let r = Remote::start(&format!("[tcp]\nallow = [\"127.0.0.1:{vnc_port}\"]\n"))?;
    // A display number nobody uses (no lock or socket left by an earlier X server).
    let display = (0..400)
        .map(|i| 100 + (u32::from(vnc_port) + i) % 400)
        .find(|n| {
            !std::path::Path::new(&format!("/tmp/.X{n}-lock")).exists()
                && !std::path::Path::new(&format!("/tmp/.X11-unix/X{n}")).exists()
        })
        .map(|n| format!(":{n}"))
        .context("no free X display number from :100 to :499")?;
    let xvfb = Proc::spawn(Command::new("Xvfb").args([
        &display,
        "-screen",
        "0",
        "320x240x24",
        "-nolisten",
        "tcp",
    ]))?;
    let _x11vnc = {
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        loop {
            let p = Proc::spawn(Command::new("x11vnc").args([
                "-display",
                &display,
                "-rfbport",
                &vnc_port.to_string(),
                "-localhost",
                "-nopw",
                "-forever",
                "-shared",
                "-quiet",
            ]))?;
            if wait_port(vnc_port, Duration::from_secs(3)).is_ok() {
                break p;
            }
            ensure!(
                std::time::Instant::now() < deadline,
                "x11vnc never listened: {}",
                p.log()
            );
        }
    };
    let (_fwd, port) = r.forward(&format!("127.0.0.1:{vnc_port}"))?;
    let png = r.path("screen.jpg");
    // vncsnapshot counts displays from 5900; a port is given as host::port.
    let out = Command::new("vncsnapshot")
        .args(["-quiet", "-allowblank", &format!("127.0.0.1::{port}")])
        .arg(&png)
        .stdin(Stdio::null())
        .output()?;
    ensure!(out.status.success(), "vncsnapshot: {:?}", text(&out));
    let len = std::fs::metadata(&png).context("no screenshot")?.len();
    ensure!(len > 0, "empty screenshot");
    // Xvfb is killed with SIGKILL: remove what it leaves behind.
    drop(xvfb);
    let n = display.trim_start_matches(':');
    let _ = std::fs::remove_file(format!("/tmp/.X{n}-lock"));
    let _ = std::fs::remove_file(format!("/tmp/.X11-unix/X{n}"));
    Ok(())
}

#[test]
fn a_hundred_parallel_downloads_through_one_forward_arrive_intact() -> Result<()> {
    if !have_tool("curl", "HTTP clients through forward")?
        || !have_tool("python3", "a device-local HTTP server")?
    {
        return Ok(());
    }
    let http_port = free_port()?;
    // The gateway's defaults (8 streams per device): forward holds the other connections
    // until a stream is free.
    let r = Remote::start(&format!("[tcp]\nallow = [\"127.0.0.1:{http_port}\"]\n"))?;
    let www = r.path("www");
    std::fs::create_dir_all(&www)?;
    let file = www.join("blob.bin");
    write_pattern(&file, 1 << 20, 11)?;
    let want = sha256_file(&file)?;
    // python3's http.server, with a listen backlog for 100 connections at once (its
    // default of 5 makes the kernel drop SYNs, and the clients wait for retransmissions).
    let server = format!(
        "import http.server as h\n\
         h.ThreadingHTTPServer.request_queue_size = 256\n\
         h.ThreadingHTTPServer(('127.0.0.1', {http_port}), h.SimpleHTTPRequestHandler).serve_forever()\n"
    );
    let _http = Proc::spawn(
        Command::new("python3")
            .args(["-c", &server])
            .current_dir(&www),
    )?;
    wait_port(http_port, Duration::from_secs(10))?;
    let (fwd, port) = r.forward(&format!("127.0.0.1:{http_port}"))?;
    let out_dir = r.path("got");
    std::fs::create_dir_all(&out_dir)?;
    // One curl with 100 transfers in parallel, each its own connection (and so stream).
    let mut cmd = Command::new("curl");
    cmd.args([
        "-sS",
        "--fail",
        "--parallel",
        "--parallel-max",
        "100",
        "--parallel-immediate",
    ])
    .args(["--max-time", "120", "-H", "Connection: close"]);
    for i in 0..100 {
        cmd.arg(format!("http://127.0.0.1:{port}/blob.bin"))
            .arg("-o")
            .arg(out_dir.join(format!("{i}.bin")));
    }
    let out = cmd.output()?;
    let tail = |s: String| {
        s.chars()
            .rev()
            .take(3000)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<String>()
    };
    ensure!(
        out.status.success(),
        "curl: {}\nforward: {}\nagent: {}\ngateway: {}",
        tail(text(&out).1),
        tail(fwd.log()),
        tail(r.agent.log()),
        tail(r.gateway.logs())
    );
    for i in 0..100 {
        let got = sha256_file(&out_dir.join(format!("{i}.bin")))?;
        ensure!(got == want, "download {i} differs");
    }
    Ok(())
}
