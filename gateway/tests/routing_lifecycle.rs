//! What happens over time and from outside: keep-alive pings and dead peers, handshake
//! timeouts, the no-manager grace period, revocation, shutdown, and refusals at the
//! upgrade. All on the virtual clock. docs/PROTOCOL.md sections 1.2, 1.4, 1.5, 4, 7, 8a.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use common::*;
use devgate_pki::{ClientCa, PkiPaths};
use devgate_proto::frame::{ErrorCode, Frame, PresenceReason};
use gateway::harness::{Harness, Side};
use gateway::msg::{CloseReason, Msg, MsgKind};

const SECOND: Duration = Duration::from_secs(1);

#[test]
fn the_gateway_pings_after_30_silent_seconds_and_answered_pings_keep_sessions_alive() -> Result<()>
{
    let (_dir, mut h) = harness(2)?;
    let (mgr, dev) = manager_and_device(&mut h, 0, 1)?;
    h.advance_by_steps(29 * SECOND, SECOND);
    ensure!(h.client(dev).pings == 0 && h.client(mgr).pings == 0);
    h.advance_by_steps(2 * SECOND, SECOND);
    ensure!(h.client(dev).pings == 1 && h.client(mgr).pings == 1);
    h.advance_by_steps(300 * SECOND, SECOND);
    ensure!(h.client(dev).pings >= 5, "{} pings", h.client(dev).pings);
    ensure!(is_registered(&h, UNIT) && h.shared().manager_count() == 1);
    nothing(&h.take(mgr))?;
    nothing(&h.take(dev))
}

#[test]
fn a_device_silent_for_two_intervals_is_declared_dead() -> Result<()> {
    let (_dir, mut h) = harness(2)?;
    let (mgr, dev) = manager_and_device(&mut h, 0, 1)?;
    h.client_mut(dev).answer_pings = false;
    h.advance_by_steps(59 * SECOND, SECOND);
    ensure!(is_registered(&h, UNIT) && h.client(dev).pings >= 1);
    nothing(&h.take(mgr))?;
    h.advance_by_steps(2 * SECOND, SECOND);
    ensure!(!is_registered(&h, UNIT) && h.client(dev).closed);
    expect_presence(&h.take(mgr), UNIT, false, PresenceReason::Dead)
}

#[test]
fn a_device_that_sends_frames_is_alive_without_answering_pings() -> Result<()> {
    let (_dir, mut h) = harness(1)?;
    let (mgr, dev) = manager_and_device(&mut h, 0, 0)?;
    h.client_mut(dev).answer_pings = false;
    for _ in 0..6 {
        h.advance_by_steps(20 * SECOND, SECOND);
        send(&mut h, dev, &Frame::event("", b"tick"))?;
    }
    ensure!(is_registered(&h, UNIT));
    ensure!(frames(&h.take(mgr))?.len() == 6);
    Ok(())
}

#[test]
fn a_silent_manager_is_declared_dead_and_leaves_the_manager_list() -> Result<()> {
    let (_dir, mut h) = harness_with(2, |c| c.keepalive.ping_interval_ms = 1_000)?;
    let silent = h.manager("ums-1", 0)?;
    let alive = h.manager("ums-2", 1)?;
    h.client_mut(silent).answer_pings = false;
    h.advance_by_steps(3 * SECOND, SECOND / 4);
    ensure!(
        h.client(silent).closed,
        "the silent manager is still connected"
    );
    send(&mut h, alive, &Frame::control(1, br#"{"op":"get_status"}"#))?;
    ensure!(control_reply(&h.take(alive), 1)?["managers"] == 1);
    Ok(())
}

#[test]
fn a_connection_that_never_sends_its_upgrade_times_out() -> Result<()> {
    let (_dir, mut h) = harness(1)?;
    let config = h.device_config(UNIT)?;
    let peer: SocketAddr = "10.9.9.9:50000".parse()?;
    let id = h
        .connect_from(0, peer, config)?
        .context("refused at accept")?;
    h.run();
    h.advance_by_steps(9 * SECOND, SECOND);
    ensure!(!h.client(id).closed, "closed before the handshake timeout");
    h.advance_by_steps(2 * SECOND, SECOND);
    ensure!(
        h.client(id).closed,
        "still open after the handshake timeout"
    );
    ensure!(h.client(id).status.is_none() && !is_registered(&h, UNIT));
    Ok(())
}

#[test]
fn without_a_manager_for_the_grace_period_devices_are_closed_with_1001_and_refused() -> Result<()> {
    let (_dir, mut h) = harness_with(2, |c| c.managers.grace_secs = 10)?;
    let (mgr, dev) = manager_and_device(&mut h, 0, 1)?;
    h.hang_up(mgr);
    h.advance_by_steps(9 * SECOND, SECOND);
    ensure!(
        is_registered(&h, UNIT),
        "closed before the grace period ended"
    );
    h.advance_by_steps(2 * SECOND, SECOND);
    expect_close(&h.take(dev), 1001)?;
    ensure!(!is_registered(&h, UNIT));
    let config = h.device_config(UNIT2)?;
    let refused = h.open(0, Side::Device, config)?;
    ensure!(
        h.client(refused).status == Some(503),
        "{:?}",
        h.client(refused)
    );
    // A manager back: devices are welcome again.
    let mgr = h.manager("ops", 1)?;
    h.device(UNIT2, 0)?;
    expect_presence(&h.take(mgr), UNIT2, true, PresenceReason::Connected)
}

#[test]
fn with_no_grace_period_a_device_without_a_manager_is_refused_with_503() -> Result<()> {
    let (_dir, mut h) = harness_with(1, |c| c.managers.grace_secs = 0)?;
    let config = h.device_config(UNIT)?;
    let refused = h.open(0, Side::Device, config)?;
    ensure!(h.client(refused).status == Some(503));
    h.manager("ops", 0)?;
    h.device(UNIT, 0)?;
    Ok(())
}

fn response_text(h: &Harness, id: usize) -> String {
    String::from_utf8_lossy(&h.client(id).response).into_owned()
}

#[test]
fn a_revoked_unit_is_refused_with_403_at_the_upgrade() -> Result<()> {
    let (_dir, mut h) = harness(1)?;
    let mgr = h.manager("ops", 0)?;
    h.shared().revoked.insert(Arc::from(UNIT), ());
    let config = h.device_config(UNIT)?;
    let refused = h.open(0, Side::Device, config)?;
    ensure!(h.client(refused).status == Some(403));
    ensure!(
        response_text(&h, refused).contains("this credential has been revoked"),
        "{}",
        response_text(&h, refused)
    );
    nothing(&h.take(mgr))?;
    h.device(UNIT2, 0)?;
    Ok(())
}

/// What the store thread does when a connected unit is revoked (`store_thread::poll_revocations`):
/// mark it revoked and tell its worker to close it.
#[test]
fn revoking_a_connected_device_closes_it_with_1008_and_offline_closed_by_gateway() -> Result<()> {
    let (_dir, mut h) = harness(2)?;
    let (mgr, dev) = manager_and_device(&mut h, 0, 1)?;
    let shared = h.shared().clone();
    shared.revoked.insert(Arc::from(UNIT), ());
    let handle = *shared.devices.get(UNIT).context("not registered")?.value();
    let close = Msg {
        to: handle,
        kind: MsgKind::Close(CloseReason::Revoked),
    };
    if shared.inboxes[usize::from(handle.worker)]
        .push(close)
        .is_err()
    {
        anyhow::bail!("the worker's inbox is full");
    }
    h.run();
    expect_close(&h.take(dev), 1008)?;
    expect_presence(&h.take(mgr), UNIT, false, PresenceReason::ClosedByGateway)?;
    let config = h.device_config(UNIT)?;
    let again = h.open(1, Side::Device, config)?;
    ensure!(h.client(again).status == Some(403));
    Ok(())
}

#[test]
fn a_certificate_revoked_by_its_sha256_is_refused_with_403() -> Result<()> {
    let (dir, mut h) = harness(1)?;
    let paths = PkiPaths::new(dir.path());
    let device_ca = ClientCa::load(&paths.device_ca_cert(), &paths.device_ca_key())?;
    let manager_ca = ClientCa::load(&paths.manager_ca_cert(), &paths.manager_ca_key())?;
    let dev_cert = device_ca.issue_device(UNIT)?;
    let mgr_cert = manager_ca.issue_manager("ops")?;
    for cert in [&dev_cert, &mgr_cert] {
        let fp = devgate_pki::fingerprint(cert.chain[0].as_ref());
        h.shared()
            .identity
            .add_revoked(&fp)
            .context("fingerprint not understood")?;
    }
    let dev = h.open(
        0,
        Side::Device,
        h.client_config(Some((dev_cert.chain, dev_cert.key)))?,
    )?;
    let mgr = h.open(
        0,
        Side::Manager,
        h.client_config(Some((mgr_cert.chain, mgr_cert.key)))?,
    )?;
    for id in [dev, mgr] {
        ensure!(h.client(id).status == Some(403), "{:?}", h.client(id));
        ensure!(response_text(&h, id).contains("revoked"));
    }
    // Another certificate for the same unit is fine.
    h.device(UNIT, 0)?;
    Ok(())
}

#[test]
fn on_shutdown_managers_get_shutting_down_then_1001_and_devices_1001() -> Result<()> {
    let (_dir, mut h) = harness(2)?;
    let (mgr, dev) = manager_and_device(&mut h, 0, 1)?;
    h.shared().shutting_down.store(true, Ordering::Relaxed);
    h.advance(SECOND);
    let got = h.take(mgr);
    ensure!(got.len() == 2, "{got:?}");
    expect_error(&got[0].frame()?, ErrorCode::ShuttingDown, 0, "")?;
    expect_close(&got, 1001)?;
    expect_close(&h.take(dev), 1001)?;
    ensure!(h.client(mgr).closed && h.client(dev).closed);
    ensure!(h.worker(0).finished() && h.worker(1).finished());
    Ok(())
}

#[test]
fn during_shutdown_new_connections_are_refused() -> Result<()> {
    let (_dir, mut h) = harness(1)?;
    h.shared().shutting_down.store(true, Ordering::Relaxed);
    let config = h.device_config(UNIT)?;
    let peer: SocketAddr = "10.9.9.10:50000".parse()?;
    ensure!(h.connect_from(0, peer, config)?.is_none());
    Ok(())
}

#[test]
fn an_upgrade_without_a_client_certificate_is_refused_with_401() -> Result<()> {
    let (_dir, mut h) = harness(1)?;
    let config = h.client_config(None)?;
    let id = h.open(0, Side::Device, config)?;
    ensure!(h.client(id).status == Some(401), "{:?}", h.client(id));
    Ok(())
}

#[test]
fn a_certificate_on_the_wrong_path_is_refused_with_403() -> Result<()> {
    let (_dir, mut h) = harness(1)?;
    let as_device = h.manager_config("ops")?;
    let id = h.open(0, Side::Device, as_device)?;
    ensure!(h.client(id).status == Some(403));
    let as_manager = h.device_config(UNIT)?;
    let id = h.open(0, Side::Manager, as_manager)?;
    ensure!(h.client(id).status == Some(403));
    ensure!(h.shared().manager_count() == 0 && !is_registered(&h, UNIT));
    Ok(())
}

#[test]
fn with_require_registered_an_unknown_unit_is_refused_with_403() -> Result<()> {
    let (_dir, mut h) = harness_with(1, |c| c.credentials.require_registered = true)?;
    let config = h.device_config(UNIT)?;
    let id = h.open(0, Side::Device, config)?;
    ensure!(h.client(id).status == Some(403));
    ensure!(
        response_text(&h, id).contains("not registered"),
        "{}",
        response_text(&h, id)
    );
    Ok(())
}
