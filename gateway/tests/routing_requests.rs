//! The life of a command: forwarded with a gateway-assigned id, answered in any order,
//! timed out, failed when the device goes away, refused past the pending limit.
//! docs/PROTOCOL.md section 4 ("Commands and responses", "Errors always tell the sender").

mod common;

use std::time::Duration;

use anyhow::{Result, ensure};
use common::*;
use devgate_proto::frame::{Body, ErrorCode, Frame, PresenceReason};

const SECOND: Duration = Duration::from_secs(1);

#[test]
fn a_device_may_answer_in_any_order() -> Result<()> {
    let (_dir, mut h) = harness(2)?;
    let (mgr, dev) = manager_and_device(&mut h, 0, 1)?;
    let mut ids = Vec::new();
    for n in 1..=3u32 {
        ids.push(command(&mut h, mgr, dev, UNIT, 100 + n, &n.to_be_bytes())?);
    }
    ensure!(ids[0] != ids[1] && ids[1] != ids[2] && ids[0] != ids[2]);
    for (n, id) in ids.iter().enumerate().rev() {
        send(
            &mut h,
            dev,
            &Frame::response("", *id, format!("r{n}").as_bytes()),
        )?;
    }
    let got = h.take(mgr);
    let f = frames(&got)?;
    let want = [
        Frame::response(UNIT, 103, b"r2"),
        Frame::response(UNIT, 102, b"r1"),
        Frame::response(UNIT, 101, b"r0"),
    ];
    ensure!(f == want, "{f:?}");
    Ok(())
}

#[test]
fn commands_reach_only_the_unit_they_name() -> Result<()> {
    let (_dir, mut h) = harness(2)?;
    let mgr = h.manager("ops", 0)?;
    let d1 = h.device(UNIT, 0)?;
    let d2 = h.device(UNIT2, 1)?;
    h.take(mgr);
    let id = command(&mut h, mgr, d2, UNIT2, 5, b"for two")?;
    nothing(&h.take(d1))?;
    send(&mut h, d2, &Frame::response("", id, b"from two"))?;
    ensure!(only_frame(&h.take(mgr))? == Frame::response(UNIT2, 5, b"from two"));
    Ok(())
}

#[test]
fn a_second_response_for_the_same_request_gets_unknown_request() -> Result<()> {
    let (_dir, mut h) = harness(1)?;
    let (mgr, dev) = manager_and_device(&mut h, 0, 0)?;
    let id = command(&mut h, mgr, dev, UNIT, 1, b"once")?;
    send(&mut h, dev, &Frame::response("", id, b"first"))?;
    send(&mut h, dev, &Frame::response("", id, b"second"))?;
    expect_only_error(&h.take(dev), ErrorCode::UnknownRequest, id, "")?;
    ensure!(only_frame(&h.take(mgr))? == Frame::response(UNIT, 1, b"first"));
    Ok(())
}

#[test]
fn a_command_for_an_absent_device_gets_device_not_connected_with_the_unit() -> Result<()> {
    let (_dir, mut h) = harness(1)?;
    let mgr = h.manager("ops", 0)?;
    send(&mut h, mgr, &Frame::command("dev-404", 7, b"reboot"))?;
    expect_only_error(&h.take(mgr), ErrorCode::DeviceNotConnected, 7, "dev-404")
}

#[test]
fn an_unanswered_command_times_out_with_request_timeout() -> Result<()> {
    let (_dir, mut h) = harness_with(2, |c| c.limits.request_timeout_ms = 5_000)?;
    let other = h.manager("ums-2", 1)?;
    let (mgr, dev) = manager_and_device(&mut h, 0, 1)?;
    h.take(other);
    command(&mut h, mgr, dev, UNIT, 8, b"slow")?;
    h.advance_by_steps(4 * SECOND, SECOND);
    nothing(&h.take(mgr))?;
    h.advance_by_steps(2 * SECOND, SECOND);
    expect_only_error(&h.take(mgr), ErrorCode::RequestTimeout, 8, UNIT)?;
    nothing(&h.take(other))?;
    nothing(&h.take(dev))
}

#[test]
fn the_default_request_timeout_is_60_seconds() -> Result<()> {
    let (_dir, mut h) = harness(1)?;
    let (mgr, dev) = manager_and_device(&mut h, 0, 0)?;
    command(&mut h, mgr, dev, UNIT, 60, b"slow")?;
    h.advance_by_steps(58 * SECOND, SECOND);
    // Keep-alive pings were answered on the way; nothing else arrived.
    nothing(&h.take(mgr))?;
    h.advance_by_steps(3 * SECOND, SECOND);
    expect_only_error(&h.take(mgr), ErrorCode::RequestTimeout, 60, UNIT)?;
    ensure!(
        is_registered(&h, UNIT),
        "the device was dropped, not the request"
    );
    Ok(())
}

#[test]
fn a_late_response_is_dropped_and_the_device_gets_unknown_request() -> Result<()> {
    let (_dir, mut h) = harness_with(2, |c| c.limits.request_timeout_ms = 2_000)?;
    let (mgr, dev) = manager_and_device(&mut h, 1, 0)?;
    let id = command(&mut h, mgr, dev, UNIT, 9, b"slow")?;
    h.advance_by_steps(3 * SECOND, SECOND);
    expect_only_error(&h.take(mgr), ErrorCode::RequestTimeout, 9, UNIT)?;
    send(&mut h, dev, &Frame::response("", id, b"too late"))?;
    expect_only_error(&h.take(dev), ErrorCode::UnknownRequest, id, "")?;
    nothing(&h.take(mgr))
}

#[test]
fn a_response_in_time_is_routed_and_nothing_times_out_later() -> Result<()> {
    let (_dir, mut h) = harness_with(1, |c| c.limits.request_timeout_ms = 3_000)?;
    let (mgr, dev) = manager_and_device(&mut h, 0, 0)?;
    let id = command(&mut h, mgr, dev, UNIT, 2, b"quick")?;
    h.advance_by_steps(2 * SECOND, SECOND);
    send(&mut h, dev, &Frame::response("", id, b"done"))?;
    ensure!(only_frame(&h.take(mgr))? == Frame::response(UNIT, 2, b"done"));
    h.advance_by_steps(5 * SECOND, SECOND);
    nothing(&h.take(mgr))
}

#[test]
fn a_device_that_goes_away_fails_each_outstanding_request_with_device_disconnected() -> Result<()> {
    let (_dir, mut h) = harness(2)?;
    let a = h.manager("ums-1", 0)?;
    let b = h.manager("ums-2", 1)?;
    let dev = h.device(UNIT, 1)?;
    h.take(a);
    h.take(b);
    command(&mut h, a, dev, UNIT, 1, b"a1")?;
    command(&mut h, a, dev, UNIT, 2, b"a2")?;
    command(&mut h, b, dev, UNIT, 1, b"b1")?;
    h.hang_up(dev);
    for (m, mut want) in [(a, vec![1, 2]), (b, vec![1])] {
        let got = h.take(m);
        let mut failed = Vec::new();
        for f in frames(&got)? {
            match f.body {
                Body::Error {
                    code: ErrorCode::DeviceDisconnected,
                    ..
                } if f.unit == UNIT => failed.push(f.id),
                Body::Presence {
                    online: false,
                    reason: PresenceReason::Disconnected,
                } => {}
                _ => anyhow::bail!("manager {m} got {f:?}"),
            }
        }
        failed.sort_unstable();
        want.sort_unstable();
        ensure!(failed == want, "manager {m}: {got:?}");
    }
    Ok(())
}

#[test]
fn past_max_pending_requests_commands_get_too_many_requests() -> Result<()> {
    let (_dir, mut h) = harness_with(2, |c| c.limits.max_pending_requests = 2)?;
    let (mgr, dev) = manager_and_device(&mut h, 0, 1)?;
    let first = command(&mut h, mgr, dev, UNIT, 1, b"1")?;
    command(&mut h, mgr, dev, UNIT, 2, b"2")?;
    send(&mut h, mgr, &Frame::command(UNIT, 3, b"3"))?;
    expect_only_error(&h.take(mgr), ErrorCode::TooManyRequests, 3, UNIT)?;
    nothing(&h.take(dev))?;
    // One answered: there is room again.
    send(&mut h, dev, &Frame::response("", first, b"ok"))?;
    h.take(mgr);
    command(&mut h, mgr, dev, UNIT, 4, b"4")?;
    Ok(())
}

/// Not covered by PROTOCOL.md's table: the asking manager left before the answer. The
/// device must still hear that its Response went nowhere ("the gateway never drops a frame
/// silently"): the request is over, so its id is `unknown_request`.
#[test]
fn a_response_for_a_manager_that_left_is_answered_with_an_error_to_the_device() -> Result<()> {
    let (_dir, mut h) = harness(2)?;
    let (mgr, dev) = manager_and_device(&mut h, 0, 1)?;
    let id = command(&mut h, mgr, dev, UNIT, 3, b"x")?;
    h.hang_up(mgr);
    send(&mut h, dev, &Frame::response("", id, b"nobody to tell"))?;
    let got = h.take(dev);
    let f = only_frame(&got)?;
    ensure!(
        matches!(
            f.body,
            Body::Error {
                code: ErrorCode::UnknownRequest,
                ..
            }
        ) && f.id == id,
        "the device got {got:?}"
    );
    Ok(())
}

/// A Command already on its way to the device's worker when the device leaves.
#[test]
fn a_command_crossing_the_devices_departure_gets_an_error_with_its_id() -> Result<()> {
    let (_dir, mut h) = harness(2)?;
    let (mgr, dev) = manager_and_device(&mut h, 0, 1)?;
    h.send(mgr, &Frame::command(UNIT, 12, b"x"))?;
    h.feed(mgr);
    h.hang_up(dev);
    let got = h.take(mgr);
    let f = frames(&got)?;
    ensure!(
        f.iter()
            .any(|f| expect_error(f, ErrorCode::DeviceNotConnected, 12, UNIT).is_ok()),
        "{got:?}"
    );
    Ok(())
}
