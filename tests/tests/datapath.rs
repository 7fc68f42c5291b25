//! The data-path drivers at the edge of the descriptor limit: the io_uring driver keeps
//! sockets as direct descriptors in each worker's ring, so one gateway holds more
//! connections than `RLIMIT_NOFILE`; the epoll driver stops cleanly at that limit.

use std::collections::HashSet;

use anyhow::{Context, Result, bail};
use std::time::Duration;

use devgate_client::{Body, Connection, Frame, Incoming};
use devgate_tests::Gateway;

/// Far below what the test connects, so that only direct descriptors can hold them all.
const NOFILE: u64 = 256;
const DEVICES: usize = 400;

fn open_fds(pid: u32) -> Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))?.count())
}

async fn answer_commands(mut dev: Connection) -> Result<()> {
    loop {
        let Incoming::Frame(r) = dev.recv().await? else {
            return Ok(());
        };
        let f = r.frame();
        if let Body::Command { payload } = f.body {
            dev.send(&Frame::response("", f.id, payload)).await?;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn io_uring_holds_more_sessions_than_rlimit_nofile() -> Result<()> {
    let gw = Gateway::start_with_nofile(
        "data_path = \"auto\"\n[limits]\nmax_connections = 1000\n",
        NOFILE,
    )?;
    let status = gw.status()?;
    if status["data_path"] != "io_uring" {
        if std::env::var("DEVGATE_DATA_PATH").as_deref() == Ok("epoll") {
            return Ok(()); // this pass runs the suites on epoll on purpose
        }
        bail!(
            "io_uring is not available here: {}",
            status["data_path_reason"]
        );
    }
    let mut mgr = gw.manager().await?;
    let mut tasks = Vec::new();
    for i in 0..DEVICES {
        let unit = format!("many-{i:04}");
        let dev = gw
            .device(&unit)
            .await
            .with_context(|| format!("connecting {unit}"))?;
        tasks.push(tokio::spawn(answer_commands(dev)));
    }
    let status = gw.status()?;
    assert_eq!(status["devices"], DEVICES as u64, "{status}");
    // The sockets live in the rings' file tables, not in the process's descriptor table.
    let fds = open_fds(gw.pid())?;
    assert!(
        fds < NOFILE as usize / 2,
        "{fds} descriptors open for {DEVICES} connections"
    );
    // Every session routes.
    let units: Vec<String> = (0..DEVICES).map(|i| format!("many-{i:04}")).collect();
    let cmds: Vec<Frame<'_>> = units
        .iter()
        .enumerate()
        .map(|(i, u)| Frame::command(u, i as u32 + 1, b"x"))
        .collect();
    mgr.send_batch(&cmds).await?;
    let mut answered = HashSet::new();
    while answered.len() < DEVICES {
        let Incoming::Frame(r) = tokio::time::timeout(Duration::from_secs(20), mgr.recv())
            .await
            .context("responses stopped")??
        else {
            bail!("the manager's connection closed");
        };
        if let Body::Response { .. } = r.frame().body {
            answered.insert(r.frame().id);
        }
    }
    for t in tasks {
        t.abort();
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn epoll_stops_at_rlimit_nofile_and_keeps_serving() -> Result<()> {
    let gw = Gateway::start_with_nofile("data_path = \"epoll\"", NOFILE)?;
    let max = gw.status()?["limits"]["max_connections"]
        .as_u64()
        .context("no limits.max_connections in status")?;
    assert!(
        max < NOFILE,
        "epoll cannot promise {max} connections with {NOFILE} descriptors"
    );
    let _mgr = gw.manager().await?;
    let mut held = Vec::new();
    let mut refused = 0;
    for i in 0..(max as usize + 20) {
        match gw.device(&format!("few-{i:04}")).await {
            Ok(dev) => held.push(dev),
            Err(_) => refused += 1,
        }
    }
    assert!(
        refused >= 20,
        "only {refused} refused beyond the limit of {max}"
    );
    assert!(
        held.len() + 1 >= max as usize - 1,
        "held {} of {max}",
        held.len()
    );
    // Still serving: a slot freed is a slot usable.
    held.pop();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _again = gw
        .device("few-again")
        .await
        .context("reconnect after a slot freed")?;
    Ok(())
}

/// After a large drop in connections the gateway gives freed memory back to the OS
/// (`malloc_trim` from the store thread): 1,200 devices connect and leave, a trim is
/// counted, and the resident size falls below its peak.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_is_given_back_after_a_thousand_devices_leave() -> Result<()> {
    const N: usize = 1200;
    let gw = Gateway::start("")?;
    let _mgr = gw.manager().await?;
    let start = gw.rss_kib()?;
    let mut devices = Vec::with_capacity(N);
    for chunk in 0..N / 100 {
        let mut batch = tokio::task::JoinSet::new();
        for i in 0..100 {
            let opts = gw.options(devgate_client::Role::Device);
            let tls = gw.device_tls(&format!("mem-{}", chunk * 100 + i))?;
            batch.spawn(async move { devgate_client::connect(&opts, tls).await });
        }
        while let Some(dev) = batch.join_next().await {
            devices.push(dev??);
        }
    }
    // The store thread looks at the open connections once a second: let it see them.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let peak = gw.rss_kib()?;
    assert_eq!(gw.status()?["memory_trims"], 0);
    drop(devices);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while gw.status()?["memory_trims"] == 0 {
        if std::time::Instant::now() >= deadline {
            bail!("no trim within 10 s of {N} devices leaving");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let after = gw.rss_kib()?;
    println!(
        "gateway RSS: {start} KiB at start, {peak} KiB with {N} devices, {after} KiB after they left"
    );
    assert!(
        after < peak,
        "RSS {after} KiB after the trim, {peak} KiB at the peak"
    );
    assert!(gw.wait_for_log("returned", Duration::from_secs(1)));
    Ok(())
}
