//! Remote access end to end, part 1: `devgate-agent enroll` as a person does it (the
//! fingerprint prompt through a real pty, DNS TXT discovery against a DNS server the test
//! starts), allow-listed commands and refusals, and `devgate-ctl shell` inside tmux.
//! Real binaries: `devgate`, `devgate-agent`, `devgate-ctl`.

mod remote_common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use devgate_tests::{Gateway, binary};
use remote_common::{Remote, Tmux, free_port, have_tool, text};

const ALLOW: &str = r#"
[commands.greet]
argv = ["/bin/echo", "hello from the device"]

[commands.fail3]
argv = ["/bin/sh", "-c", "echo partial; exit 3"]

[commands.echo]
argv = ["/bin/echo"]
allow_args = true

[commands.slow]
argv = ["/bin/sleep", "30"]
timeout_secs = 1

[commands.chatty]
argv = ["/bin/sh", "-c", "head -c 100000 /dev/zero | tr '\\0' x"]
max_output_bytes = 1000

[pty]
shell = "/bin/sh"

[tcp]
allow = ["127.0.0.1:1"]
"#;

#[test]
fn run_prints_output_and_exits_with_the_commands_status() -> Result<()> {
    let r = Remote::start(ALLOW)?;
    let out = r.ctl(&["run", &r.unit, "greet"]).output()?;
    let (stdout, stderr) = text(&out);
    ensure!(out.status.code() == Some(0), "greet: {stderr}");
    ensure!(stdout == "hello from the device\n", "stdout {stdout:?}");

    let out = r.ctl(&["run", &r.unit, "fail3"]).output()?;
    ensure!(out.status.code() == Some(3), "fail3 exit {:?}", out.status);
    ensure!(text(&out).0 == "partial\n");

    let out = r.ctl(&["run", &r.unit, "echo", "a", "b c"]).output()?;
    ensure!(text(&out).0 == "a b c\n", "args: {:?}", text(&out));

    // Timeout and output cap.
    let out = r.ctl(&["run", &r.unit, "slow"]).output()?;
    ensure!(out.status.code() == Some(255));
    ensure!(
        text(&out).1.contains("timed out after 1 s"),
        "{:?}",
        text(&out)
    );
    let out = r.ctl(&["run", &r.unit, "chatty"]).output()?;
    ensure!(out.status.code() == Some(0), "{:?}", text(&out));
    ensure!(
        text(&out).0 == "x".repeat(1000),
        "chatty kept {} bytes",
        out.stdout.len()
    );
    ensure!(text(&out).1.contains("output was cut"), "{:?}", text(&out));

    // A device nobody connected: non-zero, naming it.
    let out = r.ctl(&["run", "no-such-unit", "greet"]).output()?;
    ensure!(out.status.code() == Some(255));
    ensure!(
        text(&out).1.contains("no-such-unit is not connected"),
        "{:?}",
        text(&out)
    );
    Ok(())
}

#[test]
fn what_is_not_allow_listed_is_refused_by_name_and_nothing_runs_or_connects() -> Result<()> {
    let r = Remote::start(ALLOW)?;
    // A command not on the list (whose argv would leave a trace if it ran).
    let marker = r.path("ran");
    let out = r
        .ctl(&["run", &r.unit, "touch", marker.to_str().context("path")?])
        .output()?;
    let (_, stderr) = text(&out);
    ensure!(out.status.code() == Some(255), "exit {:?}", out.status);
    ensure!(
        stderr.contains("command \"touch\" is not on this device's allow-list"),
        "{stderr}"
    );
    ensure!(!marker.exists());
    // Arguments to a command that takes none.
    let out = r.ctl(&["run", &r.unit, "greet", "extra"]).output()?;
    ensure!(out.status.code() == Some(255));
    ensure!(
        text(&out).1.contains("takes no arguments"),
        "{:?}",
        text(&out)
    );

    // A TCP target not on the list: a listener there sees no connection.
    let target = std::net::TcpListener::bind("127.0.0.1:0")?;
    target.set_nonblocking(true)?;
    let port = target.local_addr()?.port();
    let (fwd, local) = r.forward(&format!("127.0.0.1:{port}"))?;
    let mut c = std::net::TcpStream::connect(("127.0.0.1", local))?;
    c.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut buf = [0u8; 1];
    let n = std::io::Read::read(&mut c, &mut buf).unwrap_or(0);
    ensure!(n == 0, "the refused connection delivered data");
    let mut fwd = fwd;
    let status = wait_exit(&mut fwd.child, Duration::from_secs(10))?;
    ensure!(
        status != Some(0),
        "forward exited {status:?} after a refusal"
    );
    let log = fwd.log();
    ensure!(
        log.contains(&format!(
            "tcp target 127.0.0.1:{port} is not on this device's allow-list"
        )),
        "{log}"
    );
    ensure!(
        target.accept().is_err(),
        "the device connected to a refused target"
    );
    ensure!(r.agent.log().contains("refused stream"));
    Ok(())
}

#[test]
fn a_device_without_pty_refuses_a_shell() -> Result<()> {
    let r = Remote::start("[commands.x]\nargv = [\"/bin/true\"]\n")?;
    let out = r.ctl(&["shell", &r.unit]).output()?;
    ensure!(out.status.code() == Some(255));
    ensure!(
        text(&out)
            .1
            .contains("pty is not on this device's allow-list"),
        "{:?}",
        text(&out)
    );
    Ok(())
}

#[test]
fn the_agent_logs_the_disconnect_and_is_back_after_a_gateway_restart() -> Result<()> {
    let port = free_port()?.to_string();
    let listen = format!("127.0.0.1:{port}");
    let env = [("DEVGATE_LISTEN", listen.as_str())];
    let gateway = Gateway::start_in_env(devgate_tests::DataDir::init()?, "", &env)?;
    let mut r = Remote::start_gateway(ALLOW, gateway)?;
    let data = std::mem::replace(&mut r.gateway, Gateway::start("")?).kill9()?;
    r.agent
        .wait_for("disconnected from the gateway", Duration::from_secs(10))?;
    r.gateway = Gateway::start_in_env(data, "", &env)?;
    // Backoff is capped at 30 s, so the agent is back within about that.
    let deadline = std::time::Instant::now() + Duration::from_secs(40);
    while r.agent.log().matches("connected to the gateway").count() < 2 {
        ensure!(
            std::time::Instant::now() < deadline,
            "the agent did not reconnect:\n{}",
            r.agent.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = r.ctl(&["run", &r.unit, "greet"]).output()?;
    ensure!(out.status.success(), "after the restart: {:?}", text(&out));
    Ok(())
}

#[test]
fn ctl_finds_the_device_on_whichever_gateway_has_it_and_lists_devices() -> Result<()> {
    let r = Remote::start(ALLOW)?;
    // A second gateway of the same installation (same PKI), without the device.
    let other = devgate_tests::DataDir {
        dir: tempfile::tempdir()?,
        fingerprint: r.gateway.data.fingerprint.clone(),
        pairing_token: String::new(),
    };
    let pki = other.path().join("pki");
    std::fs::create_dir_all(&pki)?;
    for entry in std::fs::read_dir(r.gateway.data.path().join("pki"))? {
        let entry = entry?;
        std::fs::copy(entry.path(), pki.join(entry.file_name()))?;
    }
    let other = Gateway::start_in(other, "")?;
    let mut args = r.ctl_conn_args();
    args.splice(0..0, ["--gateway".to_owned(), other.addr.to_string()]);
    let ctl = |extra: &[&str]| {
        let mut c = Command::new(binary("devgate-ctl"));
        c.args(&args).args(extra);
        c
    };
    let out = ctl(&["run", &r.unit, "greet"]).output()?;
    ensure!(
        out.status.success(),
        "run through two gateways: {:?}",
        text(&out)
    );
    ensure!(text(&out).0 == "hello from the device\n");
    let out = ctl(&["devices"]).output()?;
    let (stdout, stderr) = text(&out);
    ensure!(out.status.success(), "devices: {stderr}");
    ensure!(
        stdout == format!("{}\tonline\t{}\n", r.unit, r.gateway.addr),
        "devices printed {stdout:?}"
    );
    // --watch: the device going away is a presence line.
    let mut r = r;
    let watch = remote_common::Proc::spawn(&mut ctl(&["devices", "--watch"]))?;
    watch.wait_for(&format!("{}\tonline", r.unit), Duration::from_secs(10))?;
    r.agent = remote_common::Proc::spawn(&mut Command::new("true"))?;
    watch.wait_for(
        &format!("{}\toffline\tdisconnected", r.unit),
        Duration::from_secs(10),
    )?;
    Ok(())
}

#[test]
fn the_agent_keeps_the_trust_bundle_and_reconnects_under_the_new_root() -> Result<()> {
    let mut r = Remote::start(ALLOW)?;
    let dir = r.gateway.data_arg();
    let (ok, _, err) = devgate_tests::devgate(&["cert", "stage-root", "--data-dir", &dir])?;
    ensure!(ok, "stage-root: {err}");
    r.gateway.reload();
    r.agent
        .wait_for("stored the gateway's trust bundle", Duration::from_secs(20))?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while r.gateway.status()?["root_exchange"]["devices_acked"].as_u64() != Some(1) {
        ensure!(
            std::time::Instant::now() < deadline,
            "the agent's acknowledgement was not counted: {}",
            r.gateway.status()?["root_exchange"]
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let (ok, _, err) = devgate_tests::devgate(&["cert", "activate-root", "--data-dir", &dir])?;
    ensure!(ok, "activate-root: {err}");
    r.gateway.reload();
    ensure!(
        r.gateway
            .wait_for_log("reloaded certificates", Duration::from_secs(5)),
        "{}",
        r.gateway.logs()
    );
    let new_root = devgate_tests::roots(r.gateway.data.path())?;
    let stored = devgate_pki::load_certs(&r.path("state").join("roots.pem"))?;
    ensure!(
        new_root.iter().all(|c| stored.contains(c)),
        "the agent did not store the new root"
    );
    // A fresh agent process knows only what it stored: it connects to the new chain.
    r.agent = remote_common::Proc::spawn(
        Command::new(binary("devgate-agent"))
            .arg("run")
            .arg("--config")
            .arg(r.path("agent.toml")),
    )?;
    r.agent
        .wait_for("connected to the gateway", Duration::from_secs(20))?;
    let out = r.ctl(&["run", &r.unit, "greet"]).output()?;
    ensure!(out.status.success(), "under the new root: {:?}", text(&out));
    Ok(())
}

fn wait_exit(child: &mut std::process::Child, timeout: Duration) -> Result<Option<i32>> {
    let deadline = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < deadline {
        if let Some(s) = child.try_wait()? {
            return Ok(s.code());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    anyhow::bail!("still running after {timeout:?}")
}

#[test]
fn shell_in_tmux_runs_commands_follows_resizes_and_returns_the_exit_status() -> Result<()> {
    if !have_tool("tmux", "devgate-ctl shell inside a real terminal")? {
        return Ok(());
    }
    let r = Remote::start(ALLOW)?;
    let status_file = r.path("status");
    let line = format!(
        "{} {} shell {}; echo $? > {}",
        binary("devgate-ctl").display(),
        r.ctl_conn_args().join(" "),
        r.unit,
        status_file.display()
    );
    let tmux = Tmux::start(r.dir.path(), &line, 100, 30)?;
    tmux.send(&["echo marker-$((6*7))", "Enter"])?;
    tmux.wait_for("the command's output", Duration::from_secs(15), |s| {
        s.contains("marker-42")
    })?;
    tmux.send(&["stty size", "Enter"])?;
    tmux.wait_for("30 100", Duration::from_secs(10), |s| s.contains("30 100"))?;
    tmux.resize(120, 40)?;
    // The resize reaches the device through SIGWINCH → resize record → TIOCSWINSZ.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        tmux.send(&["stty size", "Enter"])?;
        std::thread::sleep(Duration::from_millis(300));
        if tmux.capture().contains("40 120") {
            break;
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "stty size never showed 40 120:\n{}",
            tmux.capture()
        );
    }
    tmux.send(&["exit 3", "Enter"])?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !status_file.exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let status = std::fs::read_to_string(&status_file)
        .with_context(|| format!("ctl never exited; pane:\n{}", tmux.capture()))?;
    ensure!(status.trim() == "3", "ctl exit status {status:?}");
    Ok(())
}

#[test]
fn enrollment_prompt_right_group_enrolls_wrong_group_stores_nothing() -> Result<()> {
    if !have_tool("tmux", "the fingerprint prompt through a real terminal")? {
        return Ok(());
    }
    let (gateway, keys) = gateway_with_keys(2).context("gateway")?;
    let dir = tempfile::tempdir()?;
    let keys: Vec<&str> = keys.lines().collect();
    let fingerprint: Vec<&str> = gateway.data.fingerprint.split(' ').collect();
    for (attempt, right) in [(0, false), (1, true)] {
        let state = dir.path().join(format!("state{attempt}"));
        let done = dir.path().join(format!("done{attempt}"));
        let line = format!(
            "{} enroll --gateway {} --key {} --unit dev-prompt --state-dir {}; echo $? > {}; sleep 60",
            binary("devgate-agent").display(),
            gateway.addr,
            keys[attempt],
            state.display(),
            done.display()
        );
        let sub = dir.path().join(format!("t{attempt}"));
        std::fs::create_dir_all(&sub)?;
        let tmux = Tmux::start(&sub, &line, 160, 40).context("tmux")?;
        let screen = tmux.wait_for("the challenge", Duration::from_secs(20), |s| {
            s.contains("????????????????")
        })?;
        let shown = screen
            .lines()
            .find(|l| l.contains("????????????????"))
            .context("challenge line")?;
        let hidden = shown
            .split_whitespace()
            .position(|g| g == "????????????????")
            .context("hidden group")?;
        let typed = if right {
            fingerprint[hidden].to_owned()
        } else {
            "0123456789ABCDEF".to_owned()
        };
        tmux.send(&[&typed, "Enter"])?;
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !done.exists() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let code = std::fs::read_to_string(&done).context("enroll never finished")?;
        if right {
            ensure!(code.trim() == "0", "enroll failed:\n{}", tmux.capture());
            let mode = std::os::unix::fs::PermissionsExt::mode(
                &std::fs::metadata(state.join("key.pem"))?.permissions(),
            );
            ensure!(mode & 0o777 == 0o600, "key mode {mode:o}");
            ensure!(state.join("gateway.json").exists() && state.join("roots.pem").exists());
        } else {
            ensure!(code.trim() != "0");
            ensure!(
                tmux.capture().contains("Nothing was stored"),
                "{}",
                tmux.capture()
            );
            ensure!(!state.exists(), "a wrong group stored something");
        }
    }
    Ok(())
}

/// A gateway and `n` one-time keys (made with `devgate keys create` before it starts).
fn gateway_with_keys(n: usize) -> Result<(Gateway, String)> {
    let data = devgate_tests::DataDir::init()?;
    let dir = data.path().display().to_string();
    let (ok, keys, err) = devgate_tests::devgate(&[
        "keys",
        "create",
        "--data-dir",
        &dir,
        "--one-time",
        &n.to_string(),
    ])?;
    ensure!(ok, "keys create: {err}{keys}");
    Ok((Gateway::start_in(data, "")?, keys))
}

/// Answers TXT queries from `zone` on a loopback UDP port; runs until the test ends.
fn dns_server(zone: HashMap<String, String>) -> Result<SocketAddr> {
    use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
    use hickory_proto::rr::rdata::TXT;
    use hickory_proto::rr::{RData, Record, RecordType};
    let socket = std::net::UdpSocket::bind("127.0.0.1:0")?;
    let addr = socket.local_addr()?;
    std::thread::spawn(move || {
        let mut buf = [0u8; 1500];
        while let Ok((n, peer)) = socket.recv_from(&mut buf) {
            let Ok(query) = Message::from_vec(&buf[..n]) else {
                continue;
            };
            let mut answer = Message::new(query.metadata.id, MessageType::Response, OpCode::Query);
            answer.metadata.recursion_desired = query.metadata.recursion_desired;
            answer.metadata.recursion_available = true;
            answer.metadata.authoritative = true;
            answer.add_queries(query.queries.iter().cloned());
            let Some(q) = query.queries.first() else {
                continue;
            };
            let owner = q.name().to_ascii().to_ascii_lowercase();
            match zone.get(&owner) {
                Some(url) if q.query_type() == RecordType::TXT => {
                    answer.add_answer(Record::from_rdata(
                        q.name().clone(),
                        60,
                        RData::TXT(TXT::new(vec![url.clone()])),
                    ));
                }
                Some(_) => {}
                None => answer.metadata.response_code = ResponseCode::NXDomain,
            }
            if let Ok(bytes) = answer.to_vec() {
                let _ = socket.send_to(&bytes, peer);
            }
        }
    });
    Ok(addr)
}

#[test]
fn enrollment_by_email_finds_the_gateway_through_dns_txt() -> Result<()> {
    let (gateway, key) = gateway_with_keys(1)?;
    let dns = dns_server(HashMap::from([(
        "_devgate.example.test.".to_owned(),
        format!("https://127.0.0.1:{}", gateway.addr.port()),
    )]))?;
    let dir = tempfile::tempdir()?;
    let state = dir.path().join("state");
    let out = Command::new(binary("devgate-agent"))
        .args([
            "enroll",
            "--email",
            "someone@example.test",
            "--nameserver",
            &dns.to_string(),
        ])
        .args(["--key", key.trim(), "--unit", "dev-dns"])
        .args(["--fingerprint", &gateway.data.fingerprint])
        .arg("--state-dir")
        .arg(&state)
        .output()?;
    let (stdout, stderr) = text(&out);
    ensure!(out.status.success(), "enroll by e-mail: {stderr}");
    ensure!(
        stdout.contains("Found the gateway of someone@example.test"),
        "{stdout}"
    );
    ensure!(state.join("cert.pem").exists());
    // A wrong full fingerprint stores nothing.
    let state2 = dir.path().join("state2");
    let out = Command::new(binary("devgate-agent"))
        .args([
            "enroll",
            "--gateway",
            &gateway.addr.to_string(),
            "--key",
            "unused-key-1234",
        ])
        .args(["--unit", "dev-x", "--fingerprint", &"AB".repeat(32)])
        .arg("--state-dir")
        .arg(&state2)
        .output()?;
    ensure!(!out.status.success());
    ensure!(
        text(&out).1.contains("nothing was stored"),
        "{:?}",
        text(&out)
    );
    ensure!(!state2.exists());
    Ok(())
}
