//! Limits: message size, device limit, streams per device, and the bounded send queues
//! (queue_full below the hard limit, disconnection of a slow reader past it).
//! docs/PROTOCOL.md sections 1.3, 1.5, 4, 5, 6, 7 and 11.2.

mod common;

use anyhow::{Result, ensure};
use common::*;
use devgate_proto::frame::{Body, ErrorCode, Frame, PresenceReason};
use gateway::harness::Received;

#[test]
fn a_message_over_max_message_bytes_closes_with_1009() -> Result<()> {
    let (_dir, mut h) = harness_with(2, |c| c.limits.max_message_bytes = 1024)?;
    let (mgr, dev) = manager_and_device(&mut h, 0, 1)?;
    send(&mut h, dev, &Frame::event("", &[b'x'; 2000]))?;
    expect_close(&h.take(dev), 1009)?;
    let p = presences(&h.take(mgr))?;
    ensure!(matches!(p.as_slice(), [(_, false, _)]), "{p:?}");
    // From a manager too.
    send(&mut h, mgr, &Frame::command(UNIT, 1, &[b'x'; 2000]))?;
    expect_close(&h.take(mgr), 1009)
}

#[test]
fn a_message_of_exactly_max_message_bytes_is_routed() -> Result<()> {
    let (_dir, mut h) = harness_with(1, |c| c.limits.max_message_bytes = 1024)?;
    let (mgr, dev) = manager_and_device(&mut h, 0, 0)?;
    let payload = vec![b'y'; 1024 - 8];
    send(&mut h, dev, &Frame::event("", &payload))?;
    ensure!(only_frame(&h.take(mgr))? == Frame::event(UNIT, &payload));
    Ok(())
}

#[test]
fn fragments_count_against_the_message_limit() -> Result<()> {
    let (_dir, mut h) = harness_with(1, |c| c.limits.max_message_bytes = 1024)?;
    let (mgr, dev) = manager_and_device(&mut h, 0, 0)?;
    let event = encode(&Frame::event("", &[b'z'; 1200]));
    let (a, b) = event.split_at(600);
    let mut raw = raw_ws(false, 0, 2, a, true);
    raw.extend(raw_ws(true, 0, 0, b, true));
    h.write_plain(dev, &raw)?;
    h.run();
    expect_close(&h.take(dev), 1009)?;
    let p = presences(&h.take(mgr))?;
    ensure!(matches!(p.as_slice(), [(_, false, _)]), "{p:?}");
    Ok(())
}

#[test]
fn past_the_device_limit_a_new_unit_is_refused_with_503() -> Result<()> {
    let (_dir, mut h) = harness_with(2, |c| c.limits.device_limit = 1)?;
    let mgr = h.manager("ops", 0)?;
    h.device(UNIT, 0)?;
    h.take(mgr);
    let config = h.device_config(UNIT2)?;
    let refused = h.open(1, gateway::harness::Side::Device, config)?;
    ensure!(
        h.client(refused).status == Some(503),
        "{:?}",
        h.client(refused)
    );
    ensure!(h.client(refused).closed);
    nothing(&h.take(mgr))?;
    ensure!(!is_registered(&h, UNIT2));
    Ok(())
}

#[test]
fn at_the_device_limit_a_connected_unit_may_still_reconnect() -> Result<()> {
    let (_dir, mut h) = harness_with(2, |c| c.limits.device_limit = 1)?;
    let (mgr, old) = manager_and_device(&mut h, 0, 0)?;
    h.device(UNIT, 1)?;
    expect_close(&h.take(old), 4001)?;
    expect_presence(&h.take(mgr), UNIT, true, PresenceReason::Reconnected)
}

#[test]
fn set_device_limit_applies_at_run_time() -> Result<()> {
    let (_dir, mut h) = harness(2)?;
    let (mgr, _dev) = manager_and_device(&mut h, 0, 1)?;
    send(
        &mut h,
        mgr,
        &Frame::control(1, br#"{"op":"set_device_limit","limit":1}"#),
    )?;
    let reply = control_reply(&h.take(mgr), 1)?;
    ensure!(reply["ok"] == true && reply["device_limit"] == 1, "{reply}");
    let config = h.device_config(UNIT2)?;
    let refused = h.open(0, gateway::harness::Side::Device, config)?;
    ensure!(h.client(refused).status == Some(503));
    send(
        &mut h,
        mgr,
        &Frame::control(2, br#"{"op":"set_device_limit","limit":0}"#),
    )?;
    ensure!(control_reply(&h.take(mgr), 2)?["device_limit"] == 0);
    h.device(UNIT2, 0)?;
    expect_presence(&h.take(mgr), UNIT2, true, PresenceReason::Connected)?;
    send(&mut h, mgr, &Frame::control(3, br#"{"op":"get_status"}"#))?;
    ensure!(control_reply(&h.take(mgr), 3)?["devices"] == 2);
    Ok(())
}

#[test]
fn set_device_limit_without_a_limit_fails_with_control_failed() -> Result<()> {
    let (_dir, mut h) = harness(1)?;
    let mgr = h.manager("ops", 0)?;
    send(
        &mut h,
        mgr,
        &Frame::control(4, br#"{"op":"set_device_limit","limit":-1}"#),
    )?;
    expect_only_error(&h.take(mgr), ErrorCode::ControlFailed, 4, "")
}

#[test]
fn past_max_streams_per_device_a_stream_open_is_closed_with_too_many_streams() -> Result<()> {
    let (_dir, mut h) = harness_with(2, |c| c.limits.max_streams_per_device = 2)?;
    let a = h.manager("ums-1", 0)?;
    let b = h.manager("ums-2", 1)?;
    let dev = h.device(UNIT, 1)?;
    h.take(a);
    h.take(b);
    open_stream(&mut h, a, dev, UNIT, 1, 4096, 4096)?;
    // The limit is per device, whichever manager holds the streams.
    open_stream(&mut h, b, dev, UNIT, 1, 4096, 4096)?;
    send(&mut h, b, &Frame::stream_open(UNIT, 2, 4096, b"pty"))?;
    let got = h.take(b);
    let f = only_frame(&got)?;
    ensure!(
        f.id == 2 && f.unit == UNIT && matches!(f.body, Body::StreamClose { code: 12, .. }),
        "{f:?}"
    );
    nothing(&h.take(dev))?;
    // One closed: there is room again.
    send(&mut h, a, &Frame::stream_close(UNIT, 1, 0, ""))?;
    h.take(dev);
    open_stream(&mut h, b, dev, UNIT, 2, 4096, 4096)?;
    Ok(())
}

/// Small queues so that a few frames fill them.
fn small_queues(c: &mut gateway::config::Config) {
    c.limits.queue_bytes = 4096;
    c.limits.queue_hard_bytes = 16 * 1024;
}

#[test]
fn commands_to_a_device_that_stopped_reading_get_queue_full() -> Result<()> {
    let (_dir, mut h) = harness_with(2, small_queues)?;
    let (mgr, dev) = manager_and_device(&mut h, 0, 1)?;
    for id in 1..=10 {
        h.send(mgr, &Frame::command(UNIT, id, &[b'c'; 1000]))?;
        h.run_stalled(&[dev]);
    }
    let got = h.take(mgr);
    let refused: Vec<u32> = frames(&got)?
        .iter()
        .map(|f| match f.body {
            Body::Error {
                code: ErrorCode::QueueFull,
                ..
            } if f.unit == UNIT => Ok(f.id),
            _ => anyhow::bail!("unexpected {f:?}"),
        })
        .collect::<Result<_>>()?;
    ensure!(!refused.is_empty(), "no queue_full with a 4 KiB queue");
    h.resume(dev);
    let delivered = frames(&h.take(dev))?.len();
    ensure!(
        delivered + refused.len() == 10 && refused.iter().all(|&id| id as usize > delivered),
        "delivered {delivered}, refused {refused:?}"
    );
    ensure!(
        is_registered(&h, UNIT),
        "below the hard limit the device stays"
    );
    // Read again: commands go through again.
    command(&mut h, mgr, dev, UNIT, 11, b"after")?;
    Ok(())
}

#[test]
fn events_to_a_manager_that_stopped_reading_bounce_queue_full_to_the_device() -> Result<()> {
    let (_dir, mut h) = harness_with(2, small_queues)?;
    let (mgr, dev) = manager_and_device(&mut h, 1, 0)?;
    for _ in 0..10 {
        h.send(dev, &Frame::event("", &[b'e'; 1000]))?;
        h.run_stalled(&[mgr]);
    }
    let got = h.take(dev);
    let errors = frames(&got)?;
    ensure!(!errors.is_empty(), "no queue_full with a 4 KiB queue");
    for f in &errors {
        expect_error(f, ErrorCode::QueueFull, 0, "")?;
    }
    h.resume(mgr);
    ensure!(frames(&h.take(mgr))?.len() + errors.len() == 10);
    Ok(())
}

#[test]
fn a_response_refused_by_a_full_manager_queue_is_an_error_on_both_sides() -> Result<()> {
    let (_dir, mut h) = harness_with(2, small_queues)?;
    let (mgr, dev) = manager_and_device(&mut h, 0, 1)?;
    let id = command(&mut h, mgr, dev, UNIT, 77, b"big answer")?;
    // Fill the manager's queue with events until the device hears it is full.
    for _ in 0..10 {
        h.send(dev, &Frame::event("", &[b'e'; 1000]))?;
        h.run_stalled(&[mgr]);
        if !h.client(dev).received.is_empty() {
            break;
        }
    }
    ensure!(!h.take(dev).is_empty(), "the manager's queue never filled");
    h.send(dev, &Frame::response("", id, &[b'r'; 1000]))?;
    h.run_stalled(&[mgr]);
    expect_only_error(&h.take(dev), ErrorCode::QueueFull, id, "")?;
    h.resume(mgr);
    let got = h.take(mgr);
    let f = frames(&got)?;
    ensure!(
        !f.iter().any(|f| matches!(f.body, Body::Response { .. })),
        "the response went through: {got:?}"
    );
    let errors: Vec<_> = f
        .iter()
        .filter(|f| matches!(f.body, Body::Error { .. }))
        .collect();
    ensure!(errors.len() == 1, "{got:?}");
    expect_error(errors[0], ErrorCode::QueueFull, 77, UNIT)
}

/// Stream data must not be dropped: past the hard limit the slow reader is disconnected.
#[test]
fn a_manager_reading_too_slowly_is_closed_with_1008_and_its_streams_end() -> Result<()> {
    let (_dir, mut h) = harness_with(2, small_queues)?;
    let (mgr, dev) = manager_and_device(&mut h, 0, 1)?;
    let (sid, _) = open_stream(&mut h, mgr, dev, UNIT, 1, 65_536, 4096)?;
    for _ in 0..8 {
        h.send(dev, &Frame::stream_data("", sid, &[b'd'; 4000]))?;
        h.run_stalled(&[mgr]);
        if h.client(mgr).closed {
            break;
        }
    }
    ensure!(h.client(mgr).closed, "the slow manager is still connected");
    expect_close(&h.take(mgr), 1008)?;
    ensure!(h.shared().manager_count() == 0);
    let got = h.take(dev);
    let f = only_frame(&got)?;
    ensure!(
        f.id == sid && matches!(f.body, Body::StreamClose { code: 15, .. }),
        "{got:?}"
    );
    Ok(())
}

/// Runs the slow-device scenario: returns what the manager received.
fn slow_device(h: &mut gateway::harness::Harness) -> Result<Vec<Received>> {
    let (mgr, dev) = manager_and_device(h, 1, 0)?;
    open_stream(h, mgr, dev, UNIT, 1, 4096, 65_536)?;
    for _ in 0..8 {
        h.send(mgr, &Frame::stream_data(UNIT, 1, &[b'd'; 4000]))?;
        h.run_stalled(&[dev]);
        if h.client(dev).closed {
            break;
        }
    }
    ensure!(h.client(dev).closed, "the slow device is still connected");
    expect_close(&h.take(dev), 1008)?;
    ensure!(!is_registered(h, UNIT));
    Ok(h.take(mgr))
}

#[test]
fn a_device_reading_too_slowly_is_closed_with_1008_and_goes_offline() -> Result<()> {
    let (_dir, mut h) = harness_with(2, small_queues)?;
    let got = slow_device(&mut h)?;
    let f = frames(&got)?;
    ensure!(f.len() == 2, "{got:?}");
    ensure!(
        f.iter()
            .any(|f| f.id == 1 && matches!(f.body, Body::StreamClose { code: 9, .. })),
        "{got:?}"
    );
    ensure!(
        f.iter()
            .any(|f| matches!(f.body, Body::Presence { online: false, .. })),
        "{got:?}"
    );
    Ok(())
}

#[test]
fn a_device_disconnected_as_too_slow_is_offline_closed_by_gateway() -> Result<()> {
    let (_dir, mut h) = harness_with(2, small_queues)?;
    let got = slow_device(&mut h)?;
    let p = presences(&got)?;
    ensure!(
        p == [(UNIT.to_owned(), false, PresenceReason::ClosedByGateway)],
        "{p:?}"
    );
    Ok(())
}

#[test]
fn presence_is_not_dropped_for_a_manager_over_its_soft_limit() -> Result<()> {
    let (_dir, mut h) = harness_with(2, small_queues)?;
    let (mgr, dev) = manager_and_device(&mut h, 0, 1)?;
    for _ in 0..10 {
        h.send(dev, &Frame::event("", &[b'e'; 1000]))?;
        h.run_stalled(&[mgr]);
    }
    ensure!(!h.take(dev).is_empty(), "the manager's queue never filled");
    h.device(UNIT2, 0)?;
    h.run_stalled(&[mgr]);
    h.resume(mgr);
    let p = presences(&h.take(mgr))?;
    ensure!(
        p == [(UNIT2.to_owned(), true, PresenceReason::Connected)],
        "{p:?}"
    );
    Ok(())
}

#[test]
fn the_device_count_stays_right_through_replacements_and_departures() -> Result<()> {
    let (_dir, mut h) = harness_with(2, |c| c.limits.device_limit = 1)?;
    let (mgr, _old) = manager_and_device(&mut h, 0, 0)?;
    let new = h.device(UNIT, 1)?;
    h.take(mgr);
    send(&mut h, mgr, &Frame::control(1, br#"{"op":"get_status"}"#))?;
    ensure!(control_reply(&h.take(mgr), 1)?["devices"] == 1);
    h.hang_up(new);
    h.take(mgr);
    send(&mut h, mgr, &Frame::control(2, br#"{"op":"get_status"}"#))?;
    ensure!(control_reply(&h.take(mgr), 2)?["devices"] == 0);
    // The slot the limit allows is free again for another unit.
    h.device(UNIT2, 1)?;
    Ok(())
}
