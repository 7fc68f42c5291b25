//! Routing through the in-memory harness (`gateway::harness`): real workers, real TLS,
//! no sockets, a virtual clock.

use anyhow::{Context, Result, ensure};
use devgate_proto::frame::{Body, Frame};
use gateway::harness::{Harness, Received};

fn harness(workers: usize) -> Result<(tempfile::TempDir, Harness)> {
    let dir = tempfile::tempdir()?;
    let h = Harness::new(dir.path(), workers, |_| {})?;
    Ok((dir, h))
}

const UNIT: &str = "00:E0:C5:12:34:56";

#[test]
fn a_command_and_its_response_cross_workers() -> Result<()> {
    let (_dir, mut h) = harness(2)?;
    let mgr = h.manager("ops", 0)?;
    let dev = h.device(UNIT, 1)?;
    let got = h.take(mgr);
    ensure!(
        got.iter().any(|r| matches!(
            r.frame().map(|f| f.body),
            Ok(Body::Presence { online: true, .. })
        )),
        "no presence online: {got:?}"
    );
    h.send(
        mgr,
        &Frame {
            id: 7,
            unit: UNIT,
            body: Body::Command { payload: b"reboot" },
        },
    )?;
    h.run();
    let got = h.take(dev);
    let cmd = got.first().context("the device got nothing")?.frame()?;
    ensure!(cmd.body == Body::Command { payload: b"reboot" }, "{cmd:?}");
    let device_id = cmd.id;
    h.send(
        dev,
        &Frame {
            id: device_id,
            unit: "",
            body: Body::Response { payload: b"ok" },
        },
    )?;
    h.run();
    let got = h.take(mgr);
    let resp = got.first().context("the manager got nothing")?.frame()?;
    ensure!(
        resp.id == 7 && resp.unit == UNIT && resp.body == Body::Response { payload: b"ok" },
        "{resp:?}"
    );
    Ok(())
}

#[test]
fn a_command_for_an_absent_device_gets_an_error() -> Result<()> {
    let (_dir, mut h) = harness(1)?;
    let mgr = h.manager("ops", 0)?;
    h.take(mgr);
    h.send(
        mgr,
        &Frame {
            id: 9,
            unit: UNIT,
            body: Body::Command { payload: b"x" },
        },
    )?;
    h.run();
    let got: Vec<Received> = h.take(mgr);
    let err = got.first().context("nothing back")?.frame()?;
    ensure!(
        err.id == 9 && matches!(err.body, Body::Error { .. }),
        "{err:?}"
    );
    Ok(())
}
