//! Each frame type through the gateway, both ways, and what happens to frames and
//! WebSocket messages that break the rules (docs/PROTOCOL.md sections 1.3, 1.5, 2-4, 6, 9).

mod common;

use anyhow::{Result, ensure};
use common::*;
use devgate_proto::frame::{Body, ErrorCode, Frame, PresenceReason};
use devgate_proto::ws::Opcode;
use gateway::harness::Received;

#[test]
fn a_command_reaches_the_device_with_a_gateway_assigned_id_and_no_unit() -> Result<()> {
    let (_dir, mut h) = harness(1)?;
    let (mgr, dev) = manager_and_device(&mut h, 0, 0)?;
    let device_id = command(&mut h, mgr, dev, UNIT, 7, b"reboot")?;
    ensure!(device_id != 0, "the device must see a gateway-assigned id");
    nothing(&h.take(mgr))
}

#[test]
fn a_response_returns_with_the_managers_id_and_the_unit() -> Result<()> {
    let (_dir, mut h) = harness(1)?;
    let (mgr, dev) = manager_and_device(&mut h, 0, 0)?;
    let device_id = command(&mut h, mgr, dev, UNIT, 0xdead_beef, b"uptime")?;
    send(&mut h, dev, &Frame::response("", device_id, b"up 3 days"))?;
    let got = h.take(mgr);
    let f = only_frame(&got)?;
    ensure!(
        f == Frame::response(UNIT, 0xdead_beef, b"up 3 days"),
        "the manager got {f:?}"
    );
    nothing(&h.take(dev))
}

#[test]
fn an_empty_response_is_routed() -> Result<()> {
    let (_dir, mut h) = harness(2)?;
    let (mgr, dev) = manager_and_device(&mut h, 1, 0)?;
    let device_id = command(&mut h, mgr, dev, UNIT, 1, b"")?;
    send(&mut h, dev, &Frame::response("", device_id, b""))?;
    let got = h.take(mgr);
    ensure!(
        only_frame(&got)? == Frame::response(UNIT, 1, b""),
        "{got:?}"
    );
    Ok(())
}

#[test]
fn an_event_reaches_the_manager_with_the_unit_and_id_0() -> Result<()> {
    let (_dir, mut h) = harness(2)?;
    let (mgr, dev) = manager_and_device(&mut h, 0, 1)?;
    send(&mut h, dev, &Frame::event("", br#"{"temp":21.5}"#))?;
    let got = h.take(mgr);
    let f = only_frame(&got)?;
    ensure!(
        f == Frame::event(UNIT, br#"{"temp":21.5}"#) && f.id == 0,
        "{f:?}"
    );
    Ok(())
}

#[test]
fn control_get_status_is_answered_with_the_same_id_and_not_forwarded() -> Result<()> {
    let (_dir, mut h) = harness(2)?;
    let (mgr, dev) = manager_and_device(&mut h, 0, 1)?;
    send(&mut h, mgr, &Frame::control(41, br#"{"op":"get_status"}"#))?;
    let reply = control_reply(&h.take(mgr), 41)?;
    ensure!(
        reply["ok"] == true
            && reply["devices"] == 1
            && reply["managers"] == 1
            && reply["device_limit"] == 0,
        "{reply}"
    );
    nothing(&h.take(dev))
}

#[test]
fn control_list_devices_names_the_connected_units() -> Result<()> {
    let (_dir, mut h) = harness(2)?;
    let mgr = h.manager("ops", 0)?;
    h.device(UNIT, 0)?;
    h.device(UNIT2, 1)?;
    h.take(mgr);
    send(&mut h, mgr, &Frame::control(2, br#"{"op":"list_devices"}"#))?;
    let reply = control_reply(&h.take(mgr), 2)?;
    let mut units: Vec<&str> = reply["devices"]
        .as_array()
        .map(|a| a.iter().filter_map(serde_json::Value::as_str).collect())
        .unwrap_or_default();
    units.sort_unstable();
    ensure!(
        reply["ok"] == true && reply["total"] == 2 && units == [UNIT, UNIT2],
        "{reply}"
    );
    Ok(())
}

#[test]
fn control_with_an_unknown_op_fails_with_control_failed() -> Result<()> {
    let (_dir, mut h) = harness(1)?;
    let mgr = h.manager("ops", 0)?;
    send(
        &mut h,
        mgr,
        &Frame::control(5, br#"{"op":"self_destruct"}"#),
    )?;
    expect_only_error(&h.take(mgr), ErrorCode::ControlFailed, 5, "")
}

#[test]
fn control_that_is_not_json_fails_with_control_failed() -> Result<()> {
    let (_dir, mut h) = harness(1)?;
    let mgr = h.manager("ops", 0)?;
    send(&mut h, mgr, &Frame::control(6, b"op=get_status"))?;
    expect_only_error(&h.take(mgr), ErrorCode::ControlFailed, 6, "")?;
    send(&mut h, mgr, &Frame::control(7, br#"{"limit":3}"#))?;
    expect_only_error(&h.take(mgr), ErrorCode::ControlFailed, 7, "")
}

/// A device may send Response, Event, stream frames and the trust-bundle acknowledgement;
/// anything else is answered with `not_permitted` carrying the frame's id, and the
/// connection stays open.
#[test]
fn a_device_may_not_send_commands_control_stream_opens_presence_or_errors() -> Result<()> {
    let (_dir, mut h) = harness(1)?;
    let (mgr, dev) = manager_and_device(&mut h, 0, 0)?;
    let forbidden = [
        Frame::command("", 11, b"x"),
        Frame::control(12, br#"{"op":"get_status"}"#),
        Frame::stream_open("", 13, 1024, b"pty"),
        Frame::presence("", true, PresenceReason::Connected),
        Frame::error("", 15, ErrorCode::Internal, "no"),
    ];
    for f in &forbidden {
        send(&mut h, dev, f)?;
        expect_only_error(&h.take(dev), ErrorCode::NotPermitted, f.id, "")?;
    }
    nothing(&h.take(mgr))?;
    send(&mut h, dev, &Frame::event("", b"still here"))?;
    ensure!(
        only_frame(&h.take(mgr))? == Frame::event(UNIT, b"still here"),
        "the device's connection did not stay open"
    );
    Ok(())
}

#[test]
fn a_manager_may_not_send_responses_events_presence_or_errors() -> Result<()> {
    let (_dir, mut h) = harness(1)?;
    let (mgr, dev) = manager_and_device(&mut h, 0, 0)?;
    let forbidden = [
        Frame::response(UNIT, 21, b"x"),
        Frame::event(UNIT, b"x"),
        Frame::presence(UNIT, false, PresenceReason::Dead),
        Frame::error(UNIT, 24, ErrorCode::Internal, "no"),
    ];
    for f in &forbidden {
        send(&mut h, mgr, f)?;
        expect_only_error(&h.take(mgr), ErrorCode::NotPermitted, f.id, UNIT)?;
    }
    nothing(&h.take(dev))?;
    command(&mut h, mgr, dev, UNIT, 25, b"still here")?;
    Ok(())
}

#[test]
fn a_device_frame_that_names_a_unit_is_malformed() -> Result<()> {
    let (_dir, mut h) = harness(1)?;
    let (mgr, dev) = manager_and_device(&mut h, 0, 0)?;
    send(&mut h, dev, &Frame::event("someone-else", b"spoof"))?;
    let got = h.take(dev);
    let f = only_frame(&got)?;
    ensure!(
        matches!(
            f.body,
            Body::Error {
                code: ErrorCode::MalformedFrame,
                ..
            }
        ) && f.unit.is_empty(),
        "{f:?}"
    );
    nothing(&h.take(mgr))
}

fn header(version: u8, kind: u8, flags: u8, unit: &[u8], id: u32) -> Vec<u8> {
    let mut out = vec![
        version,
        kind,
        flags,
        u8::try_from(unit.len()).unwrap_or(255),
    ];
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(unit);
    out
}

/// The error code of the single Error frame in `got`, and its id.
fn error_code_and_id(got: &[Received]) -> Result<(ErrorCode, u32)> {
    let f = only_frame(got)?;
    match f.body {
        Body::Error { code, .. } => Ok((code, f.id)),
        _ => anyhow::bail!("expected an Error frame, got {f:?}"),
    }
}

#[test]
fn an_unknown_frame_type_gets_malformed_frame_and_the_connection_stays_open() -> Result<()> {
    let (_dir, mut h) = harness(1)?;
    let (mgr, dev) = manager_and_device(&mut h, 0, 0)?;
    h.send_ws(
        mgr,
        Opcode::Binary,
        &header(1, 0x07, 0, UNIT.as_bytes(), 42),
    )?;
    h.send_ws(dev, Opcode::Binary, &header(1, 0x30, 0, b"", 43))?;
    h.run();
    for who in [mgr, dev] {
        let (code, _) = error_code_and_id(&h.take(who))?;
        ensure!(code == ErrorCode::MalformedFrame, "{code:?}");
    }
    command(&mut h, mgr, dev, UNIT, 1, b"still open")?;
    Ok(())
}

#[test]
fn a_malformed_frame_error_carries_the_frames_id_when_the_header_was_readable() -> Result<()> {
    let (_dir, mut h) = harness(1)?;
    let (mgr, dev) = manager_and_device(&mut h, 0, 0)?;
    h.send_ws(
        mgr,
        Opcode::Binary,
        &header(1, 0x07, 0, UNIT.as_bytes(), 42),
    )?;
    h.send_ws(dev, Opcode::Binary, &header(1, 0x03, 0x01, b"", 43))?;
    h.run();
    ensure!(error_code_and_id(&h.take(mgr))? == (ErrorCode::MalformedFrame, 42));
    ensure!(error_code_and_id(&h.take(dev))? == (ErrorCode::MalformedFrame, 43));
    Ok(())
}

#[test]
fn reserved_flags_are_malformed() -> Result<()> {
    let (_dir, mut h) = harness(1)?;
    let (mgr, dev) = manager_and_device(&mut h, 0, 0)?;
    let mut f = header(1, 0x03, 0x80, b"", 0);
    f.extend_from_slice(b"event");
    h.send_ws(dev, Opcode::Binary, &f)?;
    h.run();
    ensure!(error_code_and_id(&h.take(dev))?.0 == ErrorCode::MalformedFrame);
    nothing(&h.take(mgr))
}

#[test]
fn a_truncated_frame_gets_malformed_frame_with_id_0() -> Result<()> {
    let (_dir, mut h) = harness(1)?;
    let mgr = h.manager("ops", 0)?;
    h.send_ws(mgr, Opcode::Binary, &[1, 1, 0])?;
    h.run();
    ensure!(error_code_and_id(&h.take(mgr))? == (ErrorCode::MalformedFrame, 0));
    Ok(())
}

#[test]
fn a_manager_frame_with_a_space_in_the_unit_is_malformed() -> Result<()> {
    let (_dir, mut h) = harness(1)?;
    let (mgr, dev) = manager_and_device(&mut h, 0, 0)?;
    let mut f = header(1, 0x01, 0, b"dev 42", 9);
    f.extend_from_slice(b"reboot");
    h.send_ws(mgr, Opcode::Binary, &f)?;
    h.run();
    ensure!(error_code_and_id(&h.take(mgr))?.0 == ErrorCode::MalformedFrame);
    nothing(&h.take(dev))
}

#[test]
fn an_unsupported_version_closes_with_1002() -> Result<()> {
    let (_dir, mut h) = harness(2)?;
    let (mgr, dev) = manager_and_device(&mut h, 0, 1)?;
    h.send_ws(dev, Opcode::Binary, &header(2, 0x03, 0, b"", 77))?;
    h.run();
    expect_close(&h.take(dev), 1002)?;
    ensure!(h.client(dev).closed && !is_registered(&h, UNIT));
    let p = presences(&h.take(mgr))?;
    ensure!(
        matches!(p.as_slice(), [(u, false, _)] if u == UNIT),
        "{p:?}"
    );
    // The same from a manager.
    h.send_ws(mgr, Opcode::Binary, &header(9, 0x01, 0, b"", 1))?;
    h.run();
    expect_close(&h.take(mgr), 1002)?;
    ensure!(h.shared().manager_count() == 0);
    Ok(())
}

#[test]
fn an_unsupported_version_gets_an_error_before_the_close() -> Result<()> {
    let (_dir, mut h) = harness(1)?;
    let (_mgr, dev) = manager_and_device(&mut h, 0, 0)?;
    h.send_ws(dev, Opcode::Binary, &header(2, 0x03, 0, b"", 77))?;
    h.run();
    let got = h.take(dev);
    ensure!(got.len() == 2, "{got:?}");
    expect_error(&got[0].frame()?, ErrorCode::UnsupportedVersion, 0, "")?;
    expect_close(&got, 1002)
}

#[test]
fn a_text_message_closes_with_1003() -> Result<()> {
    let (_dir, mut h) = harness(1)?;
    let (mgr, dev) = manager_and_device(&mut h, 0, 0)?;
    h.send_ws(dev, Opcode::Text, b"{\"hello\":1}")?;
    h.run();
    expect_close(&h.take(dev), 1003)?;
    ensure!(h.client(dev).closed);
    let p = presences(&h.take(mgr))?;
    ensure!(matches!(p.as_slice(), [(_, false, _)]), "{p:?}");
    Ok(())
}

#[test]
fn an_unmasked_frame_closes_with_1002() -> Result<()> {
    let (_dir, mut h) = harness(1)?;
    let (_mgr, dev) = manager_and_device(&mut h, 0, 0)?;
    let event = encode(&Frame::event("", b"x"));
    h.write_plain(dev, &raw_ws(true, 0, 2, &event, false))?;
    h.run();
    expect_close(&h.take(dev), 1002)
}

#[test]
fn rsv_bits_close_with_1002() -> Result<()> {
    let (_dir, mut h) = harness(1)?;
    let mgr = h.manager("ops", 0)?;
    let status = encode(&Frame::control(1, br#"{"op":"get_status"}"#));
    // RSV1 would mean permessage-deflate, which is never negotiated.
    h.write_plain(mgr, &raw_ws(true, 4, 2, &status, true))?;
    h.run();
    expect_close(&h.take(mgr), 1002)
}

#[test]
fn a_length_in_a_longer_encoding_than_needed_closes_with_1002() -> Result<()> {
    let (_dir, mut h) = harness(1)?;
    let (_mgr, dev) = manager_and_device(&mut h, 0, 0)?;
    let event = encode(&Frame::event("", b"x"));
    let mut raw = vec![0x82, 0x80 | 126, 0, u8::try_from(event.len()).unwrap_or(0)];
    let key = [1, 2, 3, 4];
    raw.extend_from_slice(&key);
    raw.extend(event.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    h.write_plain(dev, &raw)?;
    h.run();
    expect_close(&h.take(dev), 1002)
}

#[test]
fn a_close_frame_with_a_one_byte_payload_closes_with_1002() -> Result<()> {
    let (_dir, mut h) = harness(1)?;
    let (_mgr, dev) = manager_and_device(&mut h, 0, 0)?;
    h.write_plain(dev, &raw_ws(true, 0, 8, &[3], true))?;
    h.run();
    expect_close(&h.take(dev), 1002)
}

#[test]
fn a_fragmented_control_frame_closes_with_1002() -> Result<()> {
    let (_dir, mut h) = harness(1)?;
    let (_mgr, dev) = manager_and_device(&mut h, 0, 0)?;
    h.write_plain(dev, &raw_ws(false, 0, 9, b"p", true))?;
    h.run();
    expect_close(&h.take(dev), 1002)
}

#[test]
fn a_fragmented_message_with_a_ping_in_between_is_reassembled() -> Result<()> {
    let (_dir, mut h) = harness(1)?;
    let (mgr, dev) = manager_and_device(&mut h, 0, 0)?;
    let event = encode(&Frame::event("", b"in two parts"));
    let (a, b) = event.split_at(10);
    let mut raw = raw_ws(false, 0, 2, a, true);
    raw.extend(raw_ws(true, 0, 9, b"mid", true));
    raw.extend(raw_ws(true, 0, 0, b, true));
    h.write_plain(dev, &raw)?;
    h.run();
    ensure!(h.take(dev) == [Received::Other("pong", b"mid".to_vec())]);
    ensure!(only_frame(&h.take(mgr))? == Frame::event(UNIT, b"in two parts"));
    Ok(())
}

#[test]
fn a_ping_is_answered_with_a_pong_carrying_its_payload() -> Result<()> {
    let (_dir, mut h) = harness(1)?;
    let mgr = h.manager("ops", 0)?;
    h.send_ws(mgr, Opcode::Ping, b"are you there")?;
    h.run();
    ensure!(h.take(mgr) == [Received::Other("pong", b"are you there".to_vec())]);
    Ok(())
}

#[test]
fn a_close_from_the_device_is_echoed_and_managers_see_it_disconnected() -> Result<()> {
    let (_dir, mut h) = harness(2)?;
    let (mgr, dev) = manager_and_device(&mut h, 0, 1)?;
    h.send_ws(dev, Opcode::Close, &1000u16.to_be_bytes())?;
    h.run();
    let got = h.take(dev);
    ensure!(got.len() == 1, "{got:?}");
    expect_close(&got, 1000)?;
    ensure!(h.client(dev).closed && !is_registered(&h, UNIT));
    expect_presence(&h.take(mgr), UNIT, false, PresenceReason::Disconnected)
}

#[test]
fn errors_reach_devices_too() -> Result<()> {
    let (_dir, mut h) = harness(1)?;
    let (_mgr, dev) = manager_and_device(&mut h, 0, 0)?;
    send(&mut h, dev, &Frame::response("", 0x1234, b"nobody asked"))?;
    expect_only_error(&h.take(dev), ErrorCode::UnknownRequest, 0x1234, "")
}

#[test]
fn a_trust_bundle_ack_gets_no_reply_from_either_side() -> Result<()> {
    let (_dir, mut h) = harness(1)?;
    let (mgr, dev) = manager_and_device(&mut h, 0, 0)?;
    let ack = br#"{"op":"trust_bundle_ack","bundle":"00112233445566778899aabbccddeeff"}"#;
    send(&mut h, dev, &Frame::control(0, ack))?;
    send(&mut h, mgr, &Frame::control(0, ack))?;
    nothing(&h.take(dev))?;
    nothing(&h.take(mgr))
}

#[test]
fn control_list_devices_pages_with_offset_and_limit() -> Result<()> {
    let (_dir, mut h) = harness(2)?;
    let mgr = h.manager("ops", 0)?;
    for (n, unit) in ["dev-1", "dev-2", "dev-3"].into_iter().enumerate() {
        h.device(unit, n % 2)?;
    }
    h.take(mgr);
    let mut seen = Vec::new();
    for offset in 0..3 {
        let req = format!(r#"{{"op":"list_devices","offset":{offset},"limit":1}}"#);
        send(&mut h, mgr, &Frame::control(10 + offset, req.as_bytes()))?;
        let reply = control_reply(&h.take(mgr), 10 + offset)?;
        ensure!(reply["total"] == 3, "{reply}");
        let page = reply["devices"].as_array().cloned().unwrap_or_default();
        ensure!(page.len() == 1, "{reply}");
        seen.extend(page.iter().filter_map(|u| u.as_str().map(str::to_owned)));
    }
    seen.sort_unstable();
    ensure!(seen == ["dev-1", "dev-2", "dev-3"], "{seen:?}");
    Ok(())
}

#[test]
fn a_stream_window_of_zero_is_malformed() -> Result<()> {
    let (_dir, mut h) = harness(1)?;
    let (mgr, dev) = manager_and_device(&mut h, 0, 0)?;
    open_stream(&mut h, mgr, dev, UNIT, 1, 4096, 4096)?;
    let mut f = header(1, 0x12, 0, UNIT.as_bytes(), 1);
    f.extend_from_slice(&0u32.to_be_bytes());
    h.send_ws(mgr, Opcode::Binary, &f)?;
    h.run();
    ensure!(error_code_and_id(&h.take(mgr))?.0 == ErrorCode::MalformedFrame);
    nothing(&h.take(dev))
}

#[test]
fn a_close_frame_with_a_reserved_code_closes_with_1002() -> Result<()> {
    let (_dir, mut h) = harness(1)?;
    let (_mgr, dev) = manager_and_device(&mut h, 0, 0)?;
    h.send_ws(dev, Opcode::Close, &1005u16.to_be_bytes())?;
    h.run();
    expect_close(&h.take(dev), 1002)
}

#[test]
fn a_close_reason_that_is_not_utf8_closes_with_1007() -> Result<()> {
    let (_dir, mut h) = harness(1)?;
    let (_mgr, dev) = manager_and_device(&mut h, 0, 0)?;
    let mut payload = 1000u16.to_be_bytes().to_vec();
    payload.extend_from_slice(&[0xff, 0xfe]);
    h.send_ws(dev, Opcode::Close, &payload)?;
    h.run();
    expect_close(&h.take(dev), 1007)
}
