//! A manager's fleet connection (`devgate_client::Fleet`) over two instances on one
//! PostgreSQL store: a device that moves between them shows up once, in either order of
//! the instances' reports, commands follow it, and `devgate-ctl devices` lists it once.
//!
//! PostgreSQL comes from Debian's `postgresql` (scripts/setup.sh); without it the test is
//! skipped with the reason, unless `DEVGATE_REQUIRE_TOOLS` is set (CI).

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use devgate_client::{
    Answer, Body, ConnectOptions, Fleet, FleetEvent, FleetOptions, Frame, Incoming, OfflineCause,
    PresenceChange, PresenceReason, Role, Routed,
};
use devgate_pki::PkiPaths;
use devgate_tests::postgres::Postgres;
use devgate_tests::{DataDir, Gateway, binary};
use tokio::sync::oneshot;

const SETTLE: Duration = Duration::from_secs(2);
const UNIT: &str = "mover";

/// A second data dir with the same PKI (a fleet shares its CAs and server certificate).
fn same_pki(data: &DataDir) -> Result<DataDir> {
    let dir = tempfile::tempdir()?;
    let pki = dir.path().join("pki");
    std::fs::create_dir_all(&pki)?;
    for entry in std::fs::read_dir(data.path().join("pki"))? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            std::fs::copy(entry.path(), pki.join(entry.file_name()))?;
        }
    }
    std::fs::copy(
        data.path().join("admin.token"),
        dir.path().join("admin.token"),
    )?;
    Ok(DataDir {
        dir,
        fingerprint: data.fingerprint.clone(),
        pairing_token: data.pairing_token.clone(),
    })
}

/// A connected device that echoes commands until told to leave.
struct Device {
    leave: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<()>>,
}

async fn device_at(gw: &Gateway, tls: Arc<rustls::ClientConfig>) -> Result<Device> {
    let mut dev = devgate_client::connect(&gw.options(Role::Device), tls).await?;
    let (leave, mut told) = oneshot::channel();
    let task = tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = &mut told => {
                    let _ = dev.close(1000, "leaving").await;
                    return Ok(());
                }
                r = dev.recv() => match r? {
                    Incoming::Frame(r) => {
                        let f = r.frame();
                        if let Body::Command { payload } = f.body {
                            dev.send(&Frame::response("", f.id, payload)).await?;
                        }
                    }
                    Incoming::Closed { code, reason } => bail!("closed by the gateway: {code:?} {reason}"),
                }
            }
        }
    });
    Ok(Device { leave, task })
}

impl Device {
    /// Closes the connection and waits until it is closed.
    async fn leave(self) -> Result<()> {
        let _ = self.leave.send(());
        self.task.await?
    }
}

/// The next presence change (other events are skipped), within 10 s.
async fn next_change(fleet: &Fleet) -> Result<PresenceChange> {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), fleet.next_event()).await {
            Ok(Some(FleetEvent::Presence(c))) => return Ok(c),
            Ok(Some(_)) => {}
            Ok(None) => bail!("the fleet's events ended"),
            Err(_) => bail!("no presence change within 10 s"),
        }
    }
}

/// No presence change for `d`.
async fn quiet_for(fleet: &Fleet, d: Duration) -> Result<()> {
    let deadline = tokio::time::Instant::now() + d;
    loop {
        match tokio::time::timeout_at(deadline, fleet.next_event()).await {
            Err(_) => return Ok(()),
            Ok(Some(FleetEvent::Presence(c))) => bail!("unexpected change {c:?}"),
            Ok(_) => {}
        }
    }
}

async fn command_through(fleet: &Fleet, expect: usize) -> Result<()> {
    let r = fleet.command(UNIT, b"hello").await?;
    ensure!(
        r == Routed {
            at: expect,
            answer: Answer::Reply(bytes::Bytes::from_static(b"hello"))
        },
        "the command went {r:?}, not to instance {expect}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_that_moves_between_instances_shows_up_once_and_commands_follow_it() -> Result<()>
{
    if let Some(why) = Postgres::missing() {
        if std::env::var_os("DEVGATE_REQUIRE_TOOLS").is_some() {
            bail!("{why}");
        }
        eprintln!("skipped: {why}");
        return Ok(());
    }
    let pg = Postgres::start()?;
    let url = pg.create_db("moves")?;
    let first = DataDir::init()?;
    let second = same_pki(&first)?;
    let config = format!("[store]\nurl = \"{url}\"\n");
    let a = Gateway::start_in(first, &config)?;
    let b = Gateway::start_in(second, &config)?;
    let gws = [&a, &b];
    let fleet = Fleet::connect(
        gws.iter()
            .map(|g| ConnectOptions::new(g.addr, "localhost", Role::Manager))
            .collect(),
        a.manager_tls()?,
        FleetOptions {
            settle: SETTLE,
            ..FleetOptions::default()
        },
    )
    .await?;
    // One certificate for the device wherever it connects.
    let tls = a.device_tls(UNIT)?;

    let on_a = device_at(&a, tls.clone()).await?;
    assert_eq!(
        next_change(&fleet).await?,
        PresenceChange::Online {
            unit: UNIT.into(),
            at: 0
        }
    );
    command_through(&fleet, 0).await?;

    // The new instance reports first: the device connects to B while A still has it.
    let on_b = device_at(&b, tls.clone()).await?;
    assert_eq!(
        next_change(&fleet).await?,
        PresenceChange::Moved {
            unit: UNIT.into(),
            from: 0,
            to: 1
        }
    );
    on_a.leave().await?;
    command_through(&fleet, 1).await?;

    // The old instance reports first: it leaves B, then connects to A within the settle
    // time. One move, no offline.
    on_b.leave().await?;
    tokio::time::sleep(SETTLE / 4).await;
    let on_a = device_at(&a, tls.clone()).await?;
    assert_eq!(
        next_change(&fleet).await?,
        PresenceChange::Moved {
            unit: UNIT.into(),
            from: 1,
            to: 0
        }
    );
    quiet_for(&fleet, SETTLE + Duration::from_millis(500)).await?;
    assert_eq!(fleet.devices(), [(UNIT.to_owned(), 0)]);
    command_through(&fleet, 0).await?;

    // devgate-ctl on both instances lists it once, where it is.
    let paths = PkiPaths::new(a.data.path());
    let out = Command::new(binary("devgate-ctl"))
        .args([
            "--gateway",
            &a.addr.to_string(),
            "--gateway",
            &b.addr.to_string(),
        ])
        .arg("--cert")
        .arg(paths.manager_cert())
        .arg("--key")
        .arg(paths.manager_key())
        .arg("--ca")
        .arg(paths.root_cert())
        .arg("devices")
        .output()
        .context("running devgate-ctl (cargo build --bins)")?;
    ensure!(
        out.status.success(),
        "devgate-ctl devices: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("{UNIT}\tonline\t{}\n", a.addr)
    );

    // Gone for longer than the settle time: offline, with the instance's reason.
    on_a.leave().await?;
    assert_eq!(
        next_change(&fleet).await?,
        PresenceChange::Offline {
            unit: UNIT.into(),
            last: 0,
            cause: OfflineCause::Reported(PresenceReason::Disconnected)
        }
    );
    let r = fleet.command(UNIT, b"hello").await?;
    assert!(
        matches!(
            r.answer,
            Answer::Refused {
                code: devgate_client::ErrorCode::DeviceNotConnected,
                ..
            }
        ),
        "{r:?}"
    );
    Ok(())
}
