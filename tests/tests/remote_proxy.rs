//! `devgate-agent` and `devgate-ctl` behind an HTTP CONNECT proxy: a real tinyproxy (with
//! Basic authentication) between both programs and the real gateway. Enrollment, the
//! agent's session, and ctl's `keys create`, `run`, `shell` and `forward` each go through it
//! (counted in tinyproxy's log: one CONNECT per connection), through `--proxy`, the agent's
//! `proxy` configuration key and `HTTPS_PROXY`; `NO_PROXY` bypasses it.

mod remote_common;
mod tinyproxy_common;

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use devgate_tests::{Gateway, binary};
use remote_common::{Proc, Remote, free_port, text, without_proxy_env};
use tinyproxy_common::Tinyproxy;

/// Waits until tinyproxy has logged `want` CONNECTs, and checks it logs no more.
fn expect_connects(tp: &Tinyproxy, want: usize, after: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while tp.connects() < want && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let got = tp.connects();
    ensure!(
        got == want,
        "after {after}: tinyproxy logged {got} CONNECTs, expected {want}:\n{}",
        tp.logs()
    );
    Ok(())
}

/// A loopback TCP server that echoes each connection (the forwarded target).
fn echo_server() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    std::thread::spawn(move || {
        for conn in listener.incoming().take(16).flatten() {
            std::thread::spawn(move || {
                let mut conn = conn;
                let mut buf = [0u8; 4096];
                while let Ok(n) = conn.read(&mut buf) {
                    if n == 0 || conn.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    Ok(port)
}

/// `devgate-ctl --proxy PROXY ARGS…`.
fn via_flag(r: &Remote, proxy: &str, args: &[&str]) -> Command {
    let mut c = r.ctl(&["--proxy", proxy]);
    c.args(args);
    c
}

#[test]
fn agent_and_ctl_enroll_run_shell_and_forward_through_an_http_proxy() -> Result<()> {
    if !Tinyproxy::available()? {
        return Ok(());
    }
    let tp = Tinyproxy::start(Some(("alice", "s3cret")))?;
    let proxy = tp.url("alice:s3cret@");
    let echo_port = echo_server()?;
    let target = format!("127.0.0.1:{echo_port}");
    let mut r = Remote {
        agent: Proc::spawn(&mut Command::new("true"))?,
        unit: "dev-proxied-1".to_owned(),
        dir: tempfile::tempdir()?,
        gateway: Gateway::start("")?,
    };

    // 1. A key through the manager connection.
    let out = via_flag(&r, &proxy, &["keys", "create", "--one-time", "1"]).output()?;
    ensure!(out.status.success(), "keys create: {:?}", text(&out));
    let key = text(&out).0.trim().to_owned();
    expect_connects(&tp, 1, "ctl keys create --proxy")?;

    // 2. Enrollment: first contact and the enrollment request, each a tunnel.
    let state = r.path("state");
    let out = without_proxy_env(&mut Command::new(binary("devgate-agent")))
        .args(["enroll", "--gateway", &r.gateway.addr.to_string(), "--key"])
        .arg(&key)
        .args([
            "--unit",
            &r.unit,
            "--fingerprint",
            &r.gateway.data.fingerprint,
        ])
        .arg("--state-dir")
        .arg(&state)
        .args(["--proxy", &proxy])
        .output()?;
    ensure!(out.status.success(), "enroll --proxy: {:?}", text(&out));
    expect_connects(&tp, 3, "devgate-agent enroll --proxy")?;

    // 3. The session, with the proxy from the configuration file.
    let config = r.path("agent.toml");
    std::fs::write(
        &config,
        format!(
            "state_dir = {:?}\nproxy = {proxy:?}\n\n[commands.greet]\n\
             argv = [\"/bin/echo\", \"hello through the proxy\"]\n\n[pty]\nshell = \"/bin/sh\"\n\n\
             [tcp]\nallow = [{target:?}]\n",
            state.display().to_string()
        ),
    )?;
    r.agent = Proc::spawn(
        without_proxy_env(&mut Command::new(binary("devgate-agent")))
            .arg("run")
            .arg("--config")
            .arg(&config),
    )?;
    r.agent
        .wait_for("connected to the gateway", Duration::from_secs(20))?;
    let log = r.agent.log();
    ensure!(
        log.contains(&format!("via=proxy 127.0.0.1:{}", tp.port)),
        "the agent does not say it went through the proxy:\n{log}"
    );
    ensure!(!log.contains("s3cret"), "the agent logged the password");
    expect_connects(&tp, 4, "devgate-agent run with proxy in its configuration")?;

    // 4. ctl run, with --proxy.
    let out = via_flag(&r, &proxy, &["run", &r.unit, "greet"]).output()?;
    ensure!(
        out.status.success() && text(&out).0 == "hello through the proxy\n",
        "run: {:?}",
        text(&out)
    );
    expect_connects(&tp, 5, "ctl run --proxy")?;

    // 5. ctl shell, with HTTPS_PROXY from the environment.
    let mut shell = r
        .ctl(&["shell", &r.unit])
        .env("HTTPS_PROXY", &proxy)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    shell
        .stdin
        .take()
        .context("stdin")?
        .write_all(b"echo \"shell:$((6*7))\"; exit 3\n")?;
    let out = shell.wait_with_output()?;
    ensure!(
        out.status.code() == Some(3) && text(&out).0.contains("shell:42"),
        "shell through HTTPS_PROXY: {:?} {:?}",
        out.status,
        text(&out)
    );
    expect_connects(&tp, 6, "ctl shell with HTTPS_PROXY")?;

    // 6. ctl forward, with --proxy: one tunnel for the manager connection, the forwarded
    //    connections are streams inside it.
    let port = free_port()?;
    let listen = format!("127.0.0.1:{port}");
    let fwd = Proc::spawn(&mut via_flag(
        &r,
        &proxy,
        &["forward", &r.unit, &target, "--listen", &listen],
    ))?;
    fwd.wait_for("forwarding", Duration::from_secs(10))?;
    for i in 0..3 {
        let mut c = std::net::TcpStream::connect(("127.0.0.1", port))?;
        c.set_read_timeout(Some(Duration::from_secs(10)))?;
        let msg = format!("ping {i} through the proxy");
        c.write_all(msg.as_bytes())?;
        let mut got = vec![0u8; msg.len()];
        c.read_exact(&mut got)?;
        ensure!(got == msg.as_bytes(), "forward echoed {got:?}");
    }
    drop(fwd);
    expect_connects(
        &tp,
        7,
        "ctl forward --proxy and three forwarded connections",
    )?;

    // 7. NO_PROXY lists the gateway: straight there, with HTTPS_PROXY and with --proxy.
    for mut c in [
        r.ctl(&["run", &r.unit, "greet"]),
        via_flag(&r, &proxy, &["run", &r.unit, "greet"]),
    ] {
        let out = c
            .env("HTTPS_PROXY", &proxy)
            .env("NO_PROXY", "127.0.0.0/8")
            .output()?;
        ensure!(out.status.success(), "run with NO_PROXY: {:?}", text(&out));
    }
    expect_connects(&tp, 7, "ctl run with NO_PROXY listing the gateway")?;

    // 8. A wrong proxy password is named, and nothing reaches the device.
    let out = r
        .ctl(&["--proxy", &tp.url("alice:guess@"), "run", &r.unit, "greet"])
        .output()?;
    let (_, stderr) = text(&out);
    ensure!(
        out.status.code() == Some(255) && stderr.contains("rejected the credentials"),
        "wrong proxy password: {:?} {stderr}",
        out.status
    );
    ensure!(!stderr.contains("guess"), "the password leaked: {stderr}");
    Ok(())
}

#[test]
fn a_bad_proxy_setting_stops_the_agent_at_start_with_the_reason() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("agent.toml");
    std::fs::write(&config, "proxy = \"socks5://alice:pw@proxy:1080\"\n")?;
    let out = without_proxy_env(&mut Command::new(binary("devgate-agent")))
        .arg("run")
        .arg("--config")
        .arg(&config)
        .output()?;
    let (_, stderr) = text(&out);
    if out.status.success() || !stderr.contains("only plain http:// proxies") {
        bail!("a socks5 proxy setting gave {:?}: {stderr}", out.status);
    }
    ensure!(!stderr.contains("pw@"), "the password leaked: {stderr}");
    Ok(())
}
