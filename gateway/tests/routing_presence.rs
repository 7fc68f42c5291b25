//! Presence and the two-manager rules: presence and events go to every manager, responses
//! only to the one that asked; a second connection for a unit replaces the first (close
//! 4001, presence `reconnected`, no offline in between). docs/PROTOCOL.md sections 1.1, 4, 8.

mod common;

use anyhow::{Result, ensure};
use common::*;
use devgate_proto::frame::{Body, ErrorCode, Frame, PresenceReason};

#[test]
fn presence_online_goes_to_every_manager_and_the_device_is_reachable_at_once() -> Result<()> {
    let (_dir, mut h) = harness(2)?;
    let a = h.manager("ums-1", 0)?;
    let b = h.manager("ums-2", 1)?;
    let dev = h.device(UNIT, 1)?;
    for m in [a, b] {
        expect_presence(&h.take(m), UNIT, true, PresenceReason::Connected)?;
    }
    // Reachable at once: a command sent on seeing the presence reaches the device.
    command(&mut h, a, dev, UNIT, 3, b"hello")?;
    Ok(())
}

#[test]
fn presence_offline_disconnected_goes_to_every_manager_when_the_device_hangs_up() -> Result<()> {
    let (_dir, mut h) = harness(2)?;
    let a = h.manager("ums-1", 0)?;
    let b = h.manager("ums-2", 1)?;
    let dev = h.device(UNIT, 0)?;
    h.take(a);
    h.take(b);
    h.hang_up(dev);
    for m in [a, b] {
        expect_presence(&h.take(m), UNIT, false, PresenceReason::Disconnected)?;
    }
    ensure!(!is_registered(&h, UNIT));
    Ok(())
}

#[test]
fn one_manager_certificate_may_hold_several_connections() -> Result<()> {
    let (_dir, mut h) = harness(1)?;
    let a = h.manager("ums", 0)?;
    let b = h.manager("ums", 0)?;
    let dev = h.device(UNIT, 0)?;
    for m in [a, b] {
        expect_presence(&h.take(m), UNIT, true, PresenceReason::Connected)?;
    }
    let id = command(&mut h, b, dev, UNIT, 1, b"x")?;
    send(&mut h, dev, &Frame::response("", id, b"y"))?;
    ensure!(only_frame(&h.take(b))? == Frame::response(UNIT, 1, b"y"));
    nothing(&h.take(a))
}

#[test]
fn events_go_to_both_managers() -> Result<()> {
    let (_dir, mut h) = harness(2)?;
    let a = h.manager("ums-1", 0)?;
    let b = h.manager("ums-2", 1)?;
    let dev = h.device(UNIT, 0)?;
    h.take(a);
    h.take(b);
    send(&mut h, dev, &Frame::event("", b"door open"))?;
    for m in [a, b] {
        ensure!(only_frame(&h.take(m))? == Frame::event(UNIT, b"door open"));
    }
    Ok(())
}

#[test]
fn a_response_goes_only_to_the_manager_that_asked() -> Result<()> {
    let (_dir, mut h) = harness(2)?;
    let a = h.manager("ums-1", 0)?;
    let b = h.manager("ums-2", 1)?;
    let dev = h.device(UNIT, 1)?;
    h.take(a);
    h.take(b);
    let id = command(&mut h, b, dev, UNIT, 10, b"whoami")?;
    send(&mut h, dev, &Frame::response("", id, b"dev"))?;
    ensure!(only_frame(&h.take(b))? == Frame::response(UNIT, 10, b"dev"));
    nothing(&h.take(a))
}

#[test]
fn two_managers_may_use_the_same_request_id_at_once() -> Result<()> {
    let (_dir, mut h) = harness(2)?;
    let a = h.manager("ums-1", 0)?;
    let b = h.manager("ums-2", 1)?;
    let dev = h.device(UNIT, 0)?;
    h.take(a);
    h.take(b);
    let id_a = command(&mut h, a, dev, UNIT, 1, b"from a")?;
    let id_b = command(&mut h, b, dev, UNIT, 1, b"from b")?;
    ensure!(id_a != id_b, "the device must see two different ids");
    // Answered in the other order.
    send(&mut h, dev, &Frame::response("", id_b, b"to b"))?;
    send(&mut h, dev, &Frame::response("", id_a, b"to a"))?;
    ensure!(only_frame(&h.take(a))? == Frame::response(UNIT, 1, b"to a"));
    ensure!(only_frame(&h.take(b))? == Frame::response(UNIT, 1, b"to b"));
    Ok(())
}

#[test]
fn errors_go_only_to_the_manager_whose_frame_failed() -> Result<()> {
    let (_dir, mut h) = harness(2)?;
    let a = h.manager("ums-1", 0)?;
    let b = h.manager("ums-2", 1)?;
    send(&mut h, b, &Frame::command("dev-404", 7, b"x"))?;
    expect_only_error(&h.take(b), ErrorCode::DeviceNotConnected, 7, "dev-404")?;
    nothing(&h.take(a))
}

/// The replacement rule, on one worker: the old connection gets 4001, managers see online
/// `connected` then online `reconnected`, and no offline in between.
#[test]
fn a_second_connection_replaces_the_first_with_4001_and_presence_reconnected() -> Result<()> {
    let (_dir, mut h) = harness(1)?;
    let (mgr, old) = manager_and_device(&mut h, 0, 0)?;
    let new = h.device(UNIT, 0)?;
    let got = h.take(old);
    expect_close(&got, 4001)?;
    ensure!(h.client(old).closed, "the old connection stays open");
    expect_presence(&h.take(mgr), UNIT, true, PresenceReason::Reconnected)?;
    ensure!(h.client(new).status == Some(101) && !h.client(new).closed);
    ensure!(h.shared().devices.len() == 1);
    Ok(())
}

#[test]
fn replacement_across_workers_keeps_the_presence_order() -> Result<()> {
    let (_dir, mut h) = harness(3)?;
    let a = h.manager("ums-1", 0)?;
    let b = h.manager("ums-2", 2)?;
    let old = h.device(UNIT, 1)?;
    let new = h.device(UNIT, 2)?;
    let newest = h.device(UNIT, 0)?;
    h.hang_up(newest);
    for m in [a, b] {
        let p = presences(&h.take(m))?;
        let want = [
            (UNIT.to_owned(), true, PresenceReason::Connected),
            (UNIT.to_owned(), true, PresenceReason::Reconnected),
            (UNIT.to_owned(), true, PresenceReason::Reconnected),
            (UNIT.to_owned(), false, PresenceReason::Disconnected),
        ];
        ensure!(p == want, "manager {m} saw {p:?}");
    }
    expect_close(&h.take(old), 4001)?;
    expect_close(&h.take(new), 4001)?;
    Ok(())
}

#[test]
fn the_replaced_connection_leaving_later_sends_no_offline() -> Result<()> {
    let (_dir, mut h) = harness(2)?;
    let (mgr, old) = manager_and_device(&mut h, 0, 1)?;
    let _new = h.device(UNIT, 0)?;
    h.take(mgr);
    // The old socket's EOF arrives after the replacement.
    h.hang_up(old);
    nothing(&h.take(mgr))?;
    ensure!(is_registered(&h, UNIT), "the newer session was dropped");
    Ok(())
}

#[test]
fn commands_after_a_replacement_go_to_the_new_connection() -> Result<()> {
    let (_dir, mut h) = harness(2)?;
    let (mgr, old) = manager_and_device(&mut h, 0, 0)?;
    let new = h.device(UNIT, 1)?;
    h.take(old);
    h.take(mgr);
    let id = command(&mut h, mgr, new, UNIT, 4, b"ping")?;
    nothing(&h.take(old))?;
    send(&mut h, new, &Frame::response("", id, b"pong"))?;
    ensure!(only_frame(&h.take(mgr))? == Frame::response(UNIT, 4, b"pong"));
    Ok(())
}

#[test]
fn requests_outstanding_at_a_replaced_connection_fail_with_device_disconnected() -> Result<()> {
    let (_dir, mut h) = harness(2)?;
    let (mgr, old) = manager_and_device(&mut h, 0, 1)?;
    command(&mut h, mgr, old, UNIT, 8, b"slow")?;
    let _new = h.device(UNIT, 0)?;
    let got = h.take(mgr);
    let f = frames(&got)?;
    ensure!(f.len() == 2, "{got:?}");
    ensure!(
        f.iter().any(|f| f.body
            == Body::Presence {
                online: true,
                reason: PresenceReason::Reconnected
            }),
        "{got:?}"
    );
    ensure!(
        f.iter()
            .any(|f| expect_error(f, ErrorCode::DeviceDisconnected, 8, UNIT).is_ok()),
        "{got:?}"
    );
    Ok(())
}

#[test]
fn a_manager_that_connects_later_learns_the_devices_with_list_devices() -> Result<()> {
    let (_dir, mut h) = harness(2)?;
    let first = h.manager("ums-1", 0)?;
    h.device(UNIT, 1)?;
    let late = h.manager("ums-2", 1)?;
    nothing(&h.take(late))?;
    send(
        &mut h,
        late,
        &Frame::control(1, br#"{"op":"list_devices"}"#),
    )?;
    let reply = control_reply(&h.take(late), 1)?;
    ensure!(reply["devices"] == serde_json::json!([UNIT]), "{reply}");
    // And it follows presence from then on.
    let _dev2 = h.device(UNIT2, 0)?;
    expect_presence(&h.take(late), UNIT2, true, PresenceReason::Connected)?;
    let p = presences(&h.take(first))?;
    ensure!(p.len() == 2, "{p:?}");
    Ok(())
}

#[test]
fn a_device_without_any_manager_connects_and_managers_hear_of_it_no_later() -> Result<()> {
    let (_dir, mut h) = harness(1)?;
    let dev = h.device(UNIT, 0)?;
    send(&mut h, dev, &Frame::event("", b"nobody listens"))?;
    nothing(&h.take(dev))?;
    let mgr = h.manager("ops", 0)?;
    nothing(&h.take(mgr))?;
    command(&mut h, mgr, dev, UNIT, 1, b"now")?;
    Ok(())
}
