//! Figures for remote access, measured side by side in one run (ignored by `cargo test`;
//! no assertion on them): bulk MB/s of one TCP download over plain loopback, through
//! `devgate-ctl forward` and through an `ssh -L` tunnel; and the keystroke round trip
//! through `devgate-ctl shell` (a key typed → its echo from the device's terminal), p50/p99.
//!
//! ```sh
//! cargo build --release --bins
//! cargo test --release -p devgate-tests --test remote_bench -- --ignored --nocapture
//! ```

mod remote_common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use devgate_tests::binary;
use remote_common::{Proc, Remote, free_port, have_tool, ssh_options, start_sshd, wait_port};

/// Bytes per bulk download.
const BULK: usize = 512 << 20;
/// Keystrokes timed.
const KEYS: usize = 300;

/// A server that sends BULK bytes to every connection, then closes it.
fn source() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let port = l.local_addr()?.port();
    std::thread::spawn(move || {
        let chunk = std::sync::Arc::new(vec![0x5au8; 1 << 20]);
        for c in l.incoming() {
            let Ok(mut c) = c else { continue };
            let chunk = chunk.clone();
            std::thread::spawn(move || {
                let mut left = BULK;
                while left > 0 {
                    let n = left.min(chunk.len());
                    if c.write_all(&chunk[..n]).is_err() {
                        return;
                    }
                    left -= n;
                }
            });
        }
    });
    Ok(port)
}

/// Downloads from `port`; MB/s (10^6 bytes per second).
fn download(port: u16) -> Result<f64> {
    let start = Instant::now();
    let mut c = TcpStream::connect(("127.0.0.1", port))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut got = 0usize;
    loop {
        let n = c.read(&mut buf)?;
        if n == 0 {
            break;
        }
        got += n;
    }
    ensure!(got == BULK, "got {got} of {BULK} bytes");
    Ok(got as f64 / start.elapsed().as_secs_f64() / 1e6)
}

#[test]
#[ignore = "figures, not a check: run with --ignored --nocapture on a release build"]
fn bulk_throughput_forward_vs_loopback_vs_ssh_tunnel() -> Result<()> {
    if !have_tool("/usr/sbin/sshd", "the ssh -L comparison")? {
        return Ok(());
    }
    let src = source()?;
    let sshd_port = free_port()?;
    let r = Remote::start(&format!("[tcp]\nallow = [\"127.0.0.1:{src}\"]\n"))?;
    let d = r.dir.path();
    let _sshd = start_sshd(d, sshd_port)?;
    let (_fwd, fport) = r.forward(&format!("127.0.0.1:{src}"))?;
    let lport = free_port()?;
    let _tunnel = Proc::spawn(
        Command::new("ssh")
            .args(ssh_options(d))
            .args(["-N", "-L", &format!("127.0.0.1:{lport}:127.0.0.1:{src}")])
            .args(["-p", &sshd_port.to_string(), "root@127.0.0.1"]),
    )?;
    wait_port(lport, Duration::from_secs(10))?;
    // Warm each path once, then take the best of three (the machine is shared).
    let mut rows = Vec::new();
    for (name, port) in [
        ("plain loopback TCP", src),
        ("devgate-ctl forward", fport),
        ("ssh -L tunnel", lport),
    ] {
        download(port)?;
        let best = (0..3)
            .map(|_| download(port))
            .collect::<Result<Vec<_>>>()?
            .into_iter()
            .fold(0f64, f64::max);
        rows.push((name, best));
    }
    println!("bulk download of {} MiB, best of 3:", BULK >> 20);
    for (name, mbs) in rows {
        println!("  {name:<22} {mbs:>8.0} MB/s");
    }
    Ok(())
}

#[test]
#[ignore = "figures, not a check: run with --ignored --nocapture on a release build"]
fn keystroke_round_trip_through_shell() -> Result<()> {
    if !have_tool("script", "a pty for devgate-ctl shell")? {
        return Ok(());
    }
    // `cat` on the device's terminal: the terminal echoes each key as it arrives.
    let r = Remote::start("[pty]\nshell = \"/bin/cat\"\n")?;
    let line = format!(
        "{} {} shell {}",
        binary("devgate-ctl").display(),
        r.ctl_conn_args().join(" "),
        r.unit
    );
    let mut child = Command::new("script")
        .args(["-qfec", &line, "--echo", "never", "/dev/null"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let mut stdin = child.stdin.take().context("stdin")?;
    let mut stdout = child.stdout.take().context("stdout")?;
    let (tx, rx) = mpsc::channel::<u8>();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 {
                return;
            }
            for b in &buf[..n] {
                if tx.send(*b).is_err() {
                    return;
                }
            }
        }
    });
    let echo = |key: u8| -> Result<Duration> {
        let start = Instant::now();
        loop {
            match rx.recv_timeout(Duration::from_secs(10)) {
                Ok(b) if b == key => return Ok(start.elapsed()),
                Ok(_) => {}
                Err(_) => bail!("no echo of {key:?} within 10 s"),
            }
        }
    };
    // The first key also waits for the stream to open.
    stdin.write_all(b"w")?;
    stdin.flush()?;
    echo(b'w')?;
    let mut times = Vec::with_capacity(KEYS);
    for i in 0..KEYS {
        let key = b'a' + u8::try_from(i % 26).unwrap_or(0);
        stdin.write_all(&[key])?;
        stdin.flush()?;
        times.push(echo(key)?);
    }
    let _ = child.kill();
    times.sort();
    let at = |q: f64| times[((times.len() as f64 - 1.0) * q).round() as usize];
    println!(
        "keystroke round trip through devgate-ctl shell ({KEYS} keys): p50 {:?}, p99 {:?}, max {:?}",
        at(0.50),
        at(0.99),
        at(1.0)
    );
    Ok(())
}
