//! Streams: opening, data both ways with ids translated, credit enforced on both sides and
//! capped at 1 MiB, closing from either side or by a connection going away.
//! docs/PROTOCOL.md section 5.

mod common;

use anyhow::{Result, ensure};
use common::*;
use devgate_proto::frame::{Body, ErrorCode, Frame};
use gateway::harness::Received;

const MIB: u32 = 1024 * 1024;
const FLOW_CONTROL: u16 = 11;

/// The one StreamClose in `got`, as (id, unit, code).
fn stream_close(got: &[gateway::harness::Received]) -> Result<(u32, String, u16)> {
    let f = only_frame(got)?;
    match f.body {
        Body::StreamClose { code, .. } => Ok((f.id, f.unit.to_owned(), code)),
        _ => anyhow::bail!("expected a StreamClose, got {f:?}"),
    }
}

#[test]
fn stream_open_reaches_the_device_with_its_own_id_and_the_window() -> Result<()> {
    let (_dir, mut h) = harness(2)?;
    let (mgr, dev) = manager_and_device(&mut h, 0, 1)?;
    let (device_id, window) = open_stream(&mut h, mgr, dev, UNIT, 3, 65_536, 16_384)?;
    ensure!(window == 65_536, "the device saw window {window}");
    ensure!(device_id != 0);
    Ok(())
}

#[test]
fn data_flows_both_ways_with_the_ids_each_side_knows() -> Result<()> {
    let (_dir, mut h) = harness(2)?;
    let (mgr, dev) = manager_and_device(&mut h, 1, 0)?;
    let (sid, _) = open_stream(&mut h, mgr, dev, UNIT, 3, 4096, 4096)?;
    send(&mut h, mgr, &Frame::stream_data(UNIT, 3, b"ls\r"))?;
    ensure!(only_frame(&h.take(dev))? == Frame::stream_data("", sid, b"ls\r"));
    send(&mut h, dev, &Frame::stream_data("", sid, b"$ \n"))?;
    ensure!(only_frame(&h.take(mgr))? == Frame::stream_data(UNIT, 3, b"$ \n"));
    Ok(())
}

#[test]
fn manager_data_before_the_devices_first_window_breaks_flow_control() -> Result<()> {
    let (_dir, mut h) = harness(1)?;
    let (mgr, dev) = manager_and_device(&mut h, 0, 0)?;
    send(&mut h, mgr, &Frame::stream_open(UNIT, 5, 4096, b"pty"))?;
    let sid = only_frame(&h.take(dev))?.id;
    send(&mut h, mgr, &Frame::stream_data(UNIT, 5, b"too early"))?;
    ensure!(stream_close(&h.take(mgr))? == (5, UNIT.to_owned(), FLOW_CONTROL));
    ensure!(stream_close(&h.take(dev))? == (sid, String::new(), FLOW_CONTROL));
    Ok(())
}

#[test]
fn a_manager_exceeding_its_credit_closes_the_stream_on_both_sides() -> Result<()> {
    let (_dir, mut h) = harness(2)?;
    let (mgr, dev) = manager_and_device(&mut h, 0, 1)?;
    let (sid, _) = open_stream(&mut h, mgr, dev, UNIT, 1, 4096, 10)?;
    send(&mut h, mgr, &Frame::stream_data(UNIT, 1, b"123456"))?;
    ensure!(only_frame(&h.take(dev))? == Frame::stream_data("", sid, b"123456"));
    send(&mut h, mgr, &Frame::stream_data(UNIT, 1, b"78901"))?;
    ensure!(stream_close(&h.take(mgr))? == (1, UNIT.to_owned(), FLOW_CONTROL));
    ensure!(stream_close(&h.take(dev))? == (sid, String::new(), FLOW_CONTROL));
    Ok(())
}

#[test]
fn a_device_exceeding_its_credit_closes_the_stream_on_both_sides() -> Result<()> {
    let (_dir, mut h) = harness(2)?;
    let (mgr, dev) = manager_and_device(&mut h, 1, 0)?;
    let (sid, _) = open_stream(&mut h, mgr, dev, UNIT, 2, 8, 4096)?;
    send(&mut h, dev, &Frame::stream_data("", sid, b"12345678"))?;
    ensure!(only_frame(&h.take(mgr))? == Frame::stream_data(UNIT, 2, b"12345678"));
    send(&mut h, dev, &Frame::stream_data("", sid, b"9"))?;
    ensure!(stream_close(&h.take(dev))? == (sid, String::new(), FLOW_CONTROL));
    ensure!(stream_close(&h.take(mgr))? == (2, UNIT.to_owned(), FLOW_CONTROL));
    Ok(())
}

#[test]
fn stream_window_returns_credit_in_both_directions() -> Result<()> {
    let (_dir, mut h) = harness(2)?;
    let (mgr, dev) = manager_and_device(&mut h, 0, 1)?;
    let (sid, _) = open_stream(&mut h, mgr, dev, UNIT, 4, 4, 4)?;
    for _ in 0..3 {
        send(&mut h, mgr, &Frame::stream_data(UNIT, 4, b"abcd"))?;
        ensure!(only_frame(&h.take(dev))? == Frame::stream_data("", sid, b"abcd"));
        send(&mut h, dev, &Frame::stream_window("", sid, 4))?;
        ensure!(only_frame(&h.take(mgr))? == Frame::stream_window(UNIT, 4, 4));

        send(&mut h, dev, &Frame::stream_data("", sid, b"wxyz"))?;
        ensure!(only_frame(&h.take(mgr))? == Frame::stream_data(UNIT, 4, b"wxyz"));
        send(&mut h, mgr, &Frame::stream_window(UNIT, 4, 4))?;
        ensure!(only_frame(&h.take(dev))? == Frame::stream_window("", sid, 4));
    }
    Ok(())
}

#[test]
fn an_initial_window_above_1_mib_is_reduced_before_the_device_sees_it() -> Result<()> {
    let (_dir, mut h) = harness(1)?;
    let (mgr, dev) = manager_and_device(&mut h, 0, 0)?;
    let (sid, window) = open_stream(&mut h, mgr, dev, UNIT, 1, 4 * MIB, 100)?;
    ensure!(window == MIB, "the device saw window {window}");
    // The credit is at the cap: a further increment is not forwarded at all.
    send(&mut h, mgr, &Frame::stream_window(UNIT, 1, 10))?;
    nothing(&h.take(dev))?;
    // Once the device used some, the manager's increment is reduced to what fits.
    send(&mut h, dev, &Frame::stream_data("", sid, &[0; 1000]))?;
    h.take(mgr);
    send(&mut h, mgr, &Frame::stream_window(UNIT, 1, 5000))?;
    ensure!(only_frame(&h.take(dev))? == Frame::stream_window("", sid, 1000));
    Ok(())
}

#[test]
fn a_device_increment_above_1_mib_is_reduced_before_the_manager_sees_it() -> Result<()> {
    let (_dir, mut h) = harness(2)?;
    let (mgr, dev) = manager_and_device(&mut h, 0, 1)?;
    send(
        &mut h,
        mgr,
        &Frame::stream_open(UNIT, 9, 4096, b"tcp:127.0.0.1:22"),
    )?;
    let sid = only_frame(&h.take(dev))?.id;
    send(&mut h, dev, &Frame::stream_window("", sid, 3 * MIB))?;
    ensure!(only_frame(&h.take(mgr))? == Frame::stream_window(UNIT, 9, MIB));
    send(&mut h, dev, &Frame::stream_window("", sid, 1))?;
    nothing(&h.take(mgr))
}

#[test]
fn a_close_from_the_manager_reaches_the_device_and_later_frames_get_unknown_stream() -> Result<()> {
    let (_dir, mut h) = harness(2)?;
    let (mgr, dev) = manager_and_device(&mut h, 0, 1)?;
    let (sid, _) = open_stream(&mut h, mgr, dev, UNIT, 6, 4096, 4096)?;
    send(&mut h, mgr, &Frame::stream_close(UNIT, 6, 0, "bye"))?;
    ensure!(only_frame(&h.take(dev))? == Frame::stream_close("", sid, 0, "bye"));
    nothing(&h.take(mgr))?;
    // Frames still in flight from either side when the close crossed them.
    send(&mut h, dev, &Frame::stream_data("", sid, b"late"))?;
    expect_only_error(&h.take(dev), ErrorCode::UnknownStream, sid, "")?;
    send(&mut h, mgr, &Frame::stream_window(UNIT, 6, 100))?;
    expect_only_error(&h.take(mgr), ErrorCode::UnknownStream, 6, UNIT)?;
    Ok(())
}

#[test]
fn a_close_from_the_device_reaches_the_manager_with_its_code_and_reason() -> Result<()> {
    let (_dir, mut h) = harness(1)?;
    let (mgr, dev) = manager_and_device(&mut h, 0, 0)?;
    let (sid, _) = open_stream(&mut h, mgr, dev, UNIT, 7, 4096, 4096)?;
    send(
        &mut h,
        dev,
        &Frame::stream_close("", sid, 0, "shell exited"),
    )?;
    ensure!(only_frame(&h.take(mgr))? == Frame::stream_close(UNIT, 7, 0, "shell exited"));
    send(&mut h, mgr, &Frame::stream_data(UNIT, 7, b"late"))?;
    expect_only_error(&h.take(mgr), ErrorCode::UnknownStream, 7, UNIT)?;
    send(&mut h, dev, &Frame::stream_window("", sid, 1))?;
    expect_only_error(&h.take(dev), ErrorCode::UnknownStream, sid, "")
}

#[test]
fn a_device_refuses_a_stream_with_stream_close() -> Result<()> {
    let (_dir, mut h) = harness(2)?;
    let (mgr, dev) = manager_and_device(&mut h, 1, 0)?;
    send(
        &mut h,
        mgr,
        &Frame::stream_open(UNIT, 2, 4096, b"tcp:10.0.0.9:23"),
    )?;
    let sid = only_frame(&h.take(dev))?.id;
    let reason = "tcp target 10.0.0.9:23 is not on this device's allow-list";
    send(&mut h, dev, &Frame::stream_close("", sid, 6, reason))?;
    ensure!(only_frame(&h.take(mgr))? == Frame::stream_close(UNIT, 2, 6, reason));
    Ok(())
}

#[test]
fn a_stream_close_for_a_stream_that_is_not_open_is_ignored() -> Result<()> {
    let (_dir, mut h) = harness(1)?;
    let (mgr, dev) = manager_and_device(&mut h, 0, 0)?;
    send(&mut h, mgr, &Frame::stream_close(UNIT, 99, 0, ""))?;
    send(&mut h, dev, &Frame::stream_close("", 0x4000_0099, 0, ""))?;
    nothing(&h.take(mgr))?;
    nothing(&h.take(dev))
}

#[test]
fn data_and_window_for_a_stream_never_opened_get_unknown_stream() -> Result<()> {
    let (_dir, mut h) = harness(1)?;
    let (mgr, dev) = manager_and_device(&mut h, 0, 0)?;
    send(&mut h, mgr, &Frame::stream_data(UNIT, 12, b"x"))?;
    expect_only_error(&h.take(mgr), ErrorCode::UnknownStream, 12, UNIT)?;
    send(&mut h, dev, &Frame::stream_window("", 13, 1))?;
    expect_only_error(&h.take(dev), ErrorCode::UnknownStream, 13, "")?;
    nothing(&h.take(mgr))
}

#[test]
fn a_stream_open_for_an_absent_device_gets_device_not_connected() -> Result<()> {
    let (_dir, mut h) = harness(1)?;
    let mgr = h.manager("ops", 0)?;
    send(&mut h, mgr, &Frame::stream_open("dev-404", 3, 4096, b"pty"))?;
    expect_only_error(&h.take(mgr), ErrorCode::DeviceNotConnected, 3, "dev-404")
}

#[test]
fn the_device_going_away_closes_its_streams_with_device_disconnected() -> Result<()> {
    let (_dir, mut h) = harness(2)?;
    let (mgr, dev) = manager_and_device(&mut h, 0, 1)?;
    open_stream(&mut h, mgr, dev, UNIT, 1, 4096, 4096)?;
    open_stream(&mut h, mgr, dev, UNIT, 2, 4096, 4096)?;
    h.hang_up(dev);
    let got = h.take(mgr);
    let mut closed: Vec<(u32, u16)> = frames(&got)?
        .iter()
        .filter_map(|f| match f.body {
            Body::StreamClose { code, .. } if f.unit == UNIT => Some((f.id, code)),
            _ => None,
        })
        .collect();
    closed.sort_unstable();
    ensure!(closed == [(1, 9), (2, 9)], "{got:?}");
    Ok(())
}

#[test]
fn the_manager_going_away_closes_its_streams_with_code_15() -> Result<()> {
    let (_dir, mut h) = harness(2)?;
    let (mgr, dev) = manager_and_device(&mut h, 1, 0)?;
    let (sid, _) = open_stream(&mut h, mgr, dev, UNIT, 1, 4096, 4096)?;
    h.hang_up(mgr);
    ensure!(stream_close(&h.take(dev))? == (sid, String::new(), 15));
    // The device's late data for it is answered, not forwarded anywhere.
    send(&mut h, dev, &Frame::stream_data("", sid, b"late"))?;
    expect_only_error(&h.take(dev), ErrorCode::UnknownStream, sid, "")
}

#[test]
fn two_managers_with_the_same_stream_id_on_one_device_are_kept_apart() -> Result<()> {
    let (_dir, mut h) = harness(2)?;
    let a = h.manager("ums-1", 0)?;
    let b = h.manager("ums-2", 1)?;
    let dev = h.device(UNIT, 1)?;
    h.take(a);
    h.take(b);
    let (sa, _) = open_stream(&mut h, a, dev, UNIT, 1, 4096, 4096)?;
    let (sb, _) = open_stream(&mut h, b, dev, UNIT, 1, 4096, 4096)?;
    ensure!(sa != sb, "the device must see two streams");
    send(&mut h, dev, &Frame::stream_data("", sb, b"for b"))?;
    ensure!(only_frame(&h.take(b))? == Frame::stream_data(UNIT, 1, b"for b"));
    nothing(&h.take(a))?;
    send(&mut h, a, &Frame::stream_close(UNIT, 1, 0, ""))?;
    ensure!(only_frame(&h.take(dev))? == Frame::stream_close("", sa, 0, ""));
    send(&mut h, b, &Frame::stream_data(UNIT, 1, b"b still open"))?;
    ensure!(only_frame(&h.take(dev))? == Frame::stream_data("", sb, b"b still open"));
    Ok(())
}

/// What the side that did not close gets when a close crossed its data: the close, and
/// `unknown_stream` for stream `id`.
fn close_and_unknown_stream(got: &[Received], id: u32, unit: &str) -> Result<()> {
    let f = frames(got)?;
    let close = Body::StreamClose {
        code: 0,
        reason: "",
    };
    ensure!(
        f.len() == 2
            && f.iter().any(|f| f.body == close)
            && f.iter()
                .any(|f| expect_error(f, ErrorCode::UnknownStream, id, unit).is_ok()),
        "{got:?}"
    );
    Ok(())
}

/// The device closes while the manager's data is already on its way between workers.
/// PROTOCOL.md section 5: "the side that did not close receives one unknown_stream Error
/// for each StreamData or StreamWindow it still had in flight when the close crossed it".
#[test]
fn manager_data_crossing_a_device_close_between_workers_gets_unknown_stream() -> Result<()> {
    let (_dir, mut h) = harness(2)?;
    let (mgr, dev) = manager_and_device(&mut h, 0, 1)?;
    let (sid, _) = open_stream(&mut h, mgr, dev, UNIT, 1, 4096, 4096)?;
    h.send(dev, &Frame::stream_close("", sid, 0, ""))?;
    h.send(mgr, &Frame::stream_data(UNIT, 1, b"crossing"))?;
    // Both frames are read before either worker hears of the other's.
    h.feed(dev);
    h.feed(mgr);
    h.run();
    nothing(&h.take(dev))?;
    close_and_unknown_stream(&h.take(mgr), 1, UNIT)
}

/// The same crossing the other way: the manager closes while the device's data is on its
/// way between workers.
#[test]
fn device_data_crossing_a_manager_close_between_workers_gets_unknown_stream() -> Result<()> {
    let (_dir, mut h) = harness(2)?;
    let (mgr, dev) = manager_and_device(&mut h, 0, 1)?;
    let (sid, _) = open_stream(&mut h, mgr, dev, UNIT, 1, 4096, 4096)?;
    h.send(mgr, &Frame::stream_close(UNIT, 1, 0, ""))?;
    h.send(dev, &Frame::stream_data("", sid, b"crossing"))?;
    h.feed(mgr);
    h.feed(dev);
    h.run();
    nothing(&h.take(mgr))?;
    close_and_unknown_stream(&h.take(dev), sid, "")
}

/// A StreamOpen already on its way to the device's worker when the device leaves: the
/// manager still hears that the stream did not open (code 1, device_not_connected).
#[test]
fn a_stream_open_crossing_the_devices_departure_is_answered() -> Result<()> {
    let (_dir, mut h) = harness(2)?;
    let (mgr, dev) = manager_and_device(&mut h, 0, 1)?;
    h.send(mgr, &Frame::stream_open(UNIT, 4, 4096, b"pty"))?;
    h.feed(mgr);
    h.hang_up(dev);
    let got = h.take(mgr);
    let answered = frames(&got)?.iter().any(|f| {
        f.id == 4
            && f.unit == UNIT
            && matches!(
                f.body,
                Body::StreamClose { code: 1, .. }
                    | Body::Error {
                        code: ErrorCode::DeviceNotConnected,
                        ..
                    }
            )
    });
    ensure!(answered, "{got:?}");
    // The stream id is free again.
    send(&mut h, mgr, &Frame::stream_data(UNIT, 4, b"x"))?;
    expect_only_error(&h.take(mgr), ErrorCode::UnknownStream, 4, UNIT)
}
