//! A root exchange with 100 running `devgate-agent` processes, as an operator does it
//! (docs/OPERATIONS.md "Certificates"): stage the next root and reload, every agent stores
//! the trust bundle and acknowledges it, activate and reload, then restart the gateway. All
//! agents reconnect to the new chain on their own, with the credential they enrolled with:
//! the same certificate and key files, listed by `devgate-ctl devices`, answering
//! `devgate-ctl run`. Real binaries: `devgate`, `devgate-agent`, `devgate-ctl`.

mod remote_common;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use devgate_client::{ConnectOptions, Role};
use devgate_tests::{DataDir, Gateway, binary, devgate};
use remote_common::{Proc, Remote, free_port, text, without_proxy_env};

const AGENTS: usize = 100;
/// Enrollments and ctl invocations at once (the machine has few cores).
const PARALLEL: usize = 8;
/// Limit on each wait for all agents.
const ALL_AGENTS: Duration = Duration::from_secs(60);

const ALLOW: &str = r#"
[commands.whoami]
argv = ["/bin/cat", "unit.txt"]
"#;

/// One enrolled agent: its directory (state/, agent.toml, unit.txt) and process.
struct Agent {
    unit: String,
    dir: PathBuf,
    proc: Option<Proc>,
}

impl Agent {
    fn state(&self, file: &str) -> PathBuf {
        self.dir.join("state").join(file)
    }

    fn log(&self) -> String {
        self.proc.as_ref().map(Proc::log).unwrap_or_default()
    }

    /// The credential files, to compare before and after.
    fn credential(&self) -> Result<Vec<Vec<u8>>> {
        ["cert.pem", "key.pem", "gateway.json"]
            .iter()
            .map(|f| std::fs::read(self.state(f)).with_context(|| format!("{}: {f}", self.unit)))
            .collect()
    }
}

/// Runs `f(i)` for 0..n on PARALLEL threads; the first error wins.
fn parallel(n: usize, f: impl Fn(usize) -> Result<()> + Sync) -> Result<()> {
    let next = AtomicUsize::new(0);
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..PARALLEL)
            .map(|_| {
                s.spawn(|| -> Result<()> {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= n {
                            return Ok(());
                        }
                        f(i)?;
                    }
                })
            })
            .collect();
        for w in workers {
            w.join()
                .map_err(|_| anyhow::anyhow!("a worker panicked"))??;
        }
        Ok(())
    })
}

/// Waits until `done(agent)` holds for every agent; names the ones it does not hold for.
fn wait_all(agents: &[Agent], what: &str, done: impl Fn(&Agent) -> bool) -> Result<()> {
    let deadline = Instant::now() + ALL_AGENTS;
    loop {
        let missing: Vec<&Agent> = agents.iter().filter(|a| !done(a)).collect();
        if missing.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "{} of {AGENTS} agents not {what} within {ALL_AGENTS:?}, e.g. {}:\n{}",
                missing.len(),
                missing[0].unit,
                missing[0].log()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `/v1/status`'s `root_exchange` once `devices_acked` is `want` (refreshed about once a
/// second).
fn wait_acked(gw: &Gateway, want: u64) -> Result<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let rx = gw.status()?["root_exchange"].clone();
        if rx["devices_acked"].as_u64() == Some(want) {
            return Ok(rx);
        }
        if Instant::now() > deadline {
            bail!("the gateway counted no {want} acknowledgements: {rx}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn hundred_running_agents_follow_a_root_exchange_without_re_enrolling() -> Result<()> {
    let port = free_port()?.to_string();
    let listen = format!("127.0.0.1:{port}");
    let env = [("DEVGATE_LISTEN", listen.as_str())];
    // Remote for its ctl invocations; the agents here are this test's own.
    let mut r = Remote {
        agent: Proc::spawn(&mut Command::new("true"))?,
        unit: String::new(),
        dir: tempfile::tempdir()?,
        gateway: Gateway::start_in_env(DataDir::init()?, "", &env)?,
    };
    let out = r.ctl(&["keys", "create", "--multi"]).output()?;
    ensure!(out.status.success(), "keys create: {:?}", text(&out));
    let key = text(&out).0.trim().to_owned();

    let mut agents: Vec<Agent> = (0..AGENTS)
        .map(|i| Agent {
            unit: format!("rx-agent-{i:03}"),
            dir: r.path(&format!("agent-{i:03}")),
            proc: None,
        })
        .collect();
    let started = Instant::now();
    parallel(AGENTS, |i| {
        let a = &agents[i];
        std::fs::create_dir_all(&a.dir)?;
        std::fs::write(a.dir.join("unit.txt"), &a.unit)?;
        std::fs::write(
            a.dir.join("agent.toml"),
            format!(
                "state_dir = {:?}\n{ALLOW}",
                a.dir.join("state").display().to_string()
            ),
        )?;
        let out = without_proxy_env(&mut Command::new(binary("devgate-agent")))
            .args(["enroll", "--gateway", &r.gateway.addr.to_string(), "--key"])
            .arg(&key)
            .args([
                "--unit",
                &a.unit,
                "--fingerprint",
                &r.gateway.data.fingerprint,
            ])
            .arg("--state-dir")
            .arg(a.dir.join("state"))
            .output()?;
        ensure!(out.status.success(), "enroll {}: {:?}", a.unit, text(&out));
        Ok(())
    })?;
    eprintln!("{AGENTS} agents enrolled in {:?}", started.elapsed());
    for a in &mut agents {
        a.proc = Some(Proc::spawn(
            without_proxy_env(&mut Command::new(binary("devgate-agent")))
                .arg("run")
                .arg("--config")
                .arg(a.dir.join("agent.toml"))
                .current_dir(&a.dir),
        )?);
    }
    wait_all(&agents, "connected", |a| {
        a.log().contains("connected to the gateway")
    })?;
    let credentials: Vec<Vec<Vec<u8>>> = agents
        .iter()
        .map(Agent::credential)
        .collect::<Result<_>>()?;
    let old_roots = devgate_tests::roots(r.gateway.data.path())?;

    // 1. Stage: every running agent stores the bundle and acknowledges it.
    let data = r.gateway.data_arg();
    let (ok, _, err) = devgate(&["cert", "stage-root", "--data-dir", &data])?;
    ensure!(ok, "stage-root: {err}");
    r.gateway.reload();
    wait_all(&agents, "storing the trust bundle", |a| {
        a.log().contains("stored the gateway's trust bundle")
    })?;
    let rx = wait_acked(&r.gateway, AGENTS as u64)?;
    ensure!(rx["devices_total"] == AGENTS as u64, "{rx}");

    // 2. Activate and reload: sessions stay; the stored roots include the new one.
    let (ok, out, err) = devgate(&["cert", "activate-root", "--data-dir", &data])?;
    ensure!(ok, "activate-root: {err}");
    ensure!(out.contains(&format!("{AGENTS} of {AGENTS}")), "{out}");
    r.gateway.reload();
    ensure!(
        r.gateway
            .wait_for_log("reloaded certificates", Duration::from_secs(5)),
        "{}",
        r.gateway.logs()
    );
    let new_roots = devgate_tests::roots(r.gateway.data.path())?;
    ensure!(
        new_roots != old_roots,
        "activate-root did not change the root"
    );
    for a in &agents {
        let stored = devgate_pki::load_certs(&a.state("roots.pem"))?;
        ensure!(
            new_roots.iter().all(|c| stored.contains(c)),
            "{} did not store the new root",
            a.unit
        );
    }

    // 3. Restart the gateway: every agent has to reconnect, now to the new chain only.
    // SAFETY: kill(2) on the gateway process this test started.
    unsafe {
        libc::kill(r.gateway.pid() as i32, libc::SIGTERM);
    }
    wait_all(&agents, "disconnected", |a| {
        a.log().contains("disconnected from the gateway")
    })?;
    let dead = std::mem::replace(&mut r.gateway, Gateway::start("")?);
    let restarted = Instant::now();
    r.gateway = Gateway::start_in_env(dead.kill9()?, "", &env)?;
    wait_all(&agents, "reconnected", |a| {
        a.log().matches("connected to the gateway").count() >= 2
    })?;
    eprintln!(
        "{AGENTS} agents back under the new root {:?} after the restart",
        restarted.elapsed()
    );
    only_the_new_root_verifies(&r.gateway, &old_roots, &new_roots)?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while r.gateway.status()?["counters"]["device_sessions"].as_u64() != Some(AGENTS as u64) {
        ensure!(
            Instant::now() < deadline,
            "device sessions: {}",
            r.gateway.status()?["counters"]
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // 4. The manager's view: every unit listed, every unit answers a command.
    let out = r.ctl(&["devices"]).output()?;
    ensure!(out.status.success(), "devices: {:?}", text(&out));
    let listed: BTreeSet<String> = text(&out)
        .0
        .lines()
        .filter_map(|l| l.split('\t').next().map(str::to_owned))
        .collect();
    let units: BTreeSet<String> = agents.iter().map(|a| a.unit.clone()).collect();
    ensure!(listed == units, "devgate-ctl devices lists {listed:?}");
    parallel(AGENTS, |i| {
        let a = &agents[i];
        let out = r.ctl(&["run", &a.unit, "whoami"]).output()?;
        ensure!(
            out.status.success() && text(&out).0 == a.unit,
            "run on {}: {:?}",
            a.unit,
            text(&out)
        );
        Ok(())
    })?;

    // 5. Nobody re-enrolled: the same credential files, no certificate refused on the way.
    for (a, before) in agents.iter().zip(&credentials) {
        ensure!(
            &a.credential()? == before,
            "{}'s credential changed",
            a.unit
        );
        let log = a.log();
        ensure!(
            !log.contains("certificate"),
            "{} had a certificate problem on the way:\n{log}",
            a.unit
        );
    }
    Ok(())
}

/// The restarted gateway's chain verifies with the new root and not with the old one, so
/// the agents that reconnected did so with the roots from the bundle.
fn only_the_new_root_verifies(
    gw: &Gateway,
    old: &[rustls_pki_types::CertificateDer<'static>],
    new: &[rustls_pki_types::CertificateDer<'static>],
) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let paths = devgate_pki::PkiPaths::new(gw.data.path());
    let ident = || -> Result<_> {
        Ok((
            devgate_pki::load_certs(&paths.manager_cert())?,
            devgate_pki::load_key(&paths.manager_key())?,
        ))
    };
    let opts = ConnectOptions::new(gw.addr, "localhost", Role::Manager);
    rt.block_on(async {
        devgate_client::connect(&opts, devgate_client::tls_config(new, Some(ident()?))?)
            .await
            .context("a manager trusting only the new root")?;
        ensure!(
            devgate_client::connect(&opts, devgate_client::tls_config(old, Some(ident()?))?)
                .await
                .is_err(),
            "the restarted gateway's chain still verifies with the old root"
        );
        Ok(())
    })
}

#[test]
fn an_agent_that_missed_the_exchange_says_to_enroll_again() -> Result<()> {
    let mut r = Remote::start(ALLOW)?;
    // Offline for the whole exchange, which the operator forces through.
    r.agent = Proc::spawn(&mut Command::new("true"))?;
    let data = r.gateway.data_arg();
    let (ok, _, err) = devgate(&["cert", "stage-root", "--data-dir", &data])?;
    ensure!(ok, "stage-root: {err}");
    r.gateway.reload();
    let (ok, _, err) = devgate(&["cert", "activate-root", "--data-dir", &data, "--force"])?;
    ensure!(ok, "activate-root --force: {err}");
    r.gateway.reload();
    ensure!(
        r.gateway
            .wait_for_log("reloaded certificates", Duration::from_secs(5)),
        "{}",
        r.gateway.logs()
    );
    r.agent = Proc::spawn(
        without_proxy_env(&mut Command::new(binary("devgate-agent")))
            .arg("run")
            .arg("--config")
            .arg(r.path("agent.toml")),
    )?;
    r.agent.wait_for(
        "enroll again with `devgate-agent enroll",
        Duration::from_secs(20),
    )?;
    Ok(())
}
