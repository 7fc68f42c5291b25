//! Helpers shared by the routing tests (`routing_*.rs`): a harness over a throwaway PKI,
//! and short ways to send frames and read what came back.
//!
//! Every test file includes this module but uses only part of it.
#![allow(dead_code)]

use anyhow::{Context, Result, bail, ensure};
use devgate_proto::frame::{Body, ErrorCode, Frame, PresenceReason};
use devgate_proto::ws::{self, Opcode};
use gateway::config::Config;
use gateway::harness::{ClientId, Harness, Received};

/// A unit ID as devices have them (a MAC address).
pub(crate) const UNIT: &str = "00:E0:C5:12:34:56";
/// A second device.
pub(crate) const UNIT2: &str = "00:E0:C5:AB:CD:EF";

/// A harness of `workers` workers with the default configuration. The directory holds the
/// PKI; keep it alive as long as the harness.
pub(crate) fn harness(workers: usize) -> Result<(tempfile::TempDir, Harness)> {
    harness_with(workers, |_| {})
}

/// A harness of `workers` workers with the configuration changed by `configure`.
pub(crate) fn harness_with(
    workers: usize,
    configure: impl FnOnce(&mut Config),
) -> Result<(tempfile::TempDir, Harness)> {
    let dir = tempfile::tempdir()?;
    let h = Harness::new(dir.path(), workers, configure)?;
    Ok((dir, h))
}

/// The devgate frames among `got`; an error if something else (a close, a pong) is there.
pub(crate) fn frames(got: &[Received]) -> Result<Vec<Frame<'_>>> {
    got.iter().map(Received::frame).collect()
}

/// The one devgate frame in `got`; an error if there is not exactly one message.
pub(crate) fn only_frame(got: &[Received]) -> Result<Frame<'_>> {
    match got {
        [one] => one.frame(),
        other => bail!("expected exactly one frame, got {other:?}"),
    }
}

/// The close frame's code among `got`, if a close frame is there.
pub(crate) fn close_code(got: &[Received]) -> Option<Option<u16>> {
    got.iter().find_map(|r| match r {
        Received::Close { code, .. } => Some(*code),
        _ => None,
    })
}

/// Checks that `got` ends with a close frame carrying `code`.
pub(crate) fn expect_close(got: &[Received], code: u16) -> Result<()> {
    match got.last() {
        Some(Received::Close { code: Some(c), .. }) if *c == code => Ok(()),
        _ => bail!("expected a close frame with code {code} last, got {got:?}"),
    }
}

/// Checks that `f` is an Error frame with `code`, `id` and `unit`.
pub(crate) fn expect_error(f: &Frame<'_>, code: ErrorCode, id: u32, unit: &str) -> Result<()> {
    match f.body {
        Body::Error { code: c, .. } if c == code && f.id == id && f.unit == unit => Ok(()),
        _ => bail!("expected Error {{ {code:?}, id {id}, unit {unit:?} }}, got {f:?}"),
    }
}

/// Checks that `got` is exactly one Error frame with `code`, `id` and `unit`.
pub(crate) fn expect_only_error(
    got: &[Received],
    code: ErrorCode,
    id: u32,
    unit: &str,
) -> Result<()> {
    expect_error(&only_frame(got)?, code, id, unit)
}

/// The presence frames among `got` as (unit, online, reason).
pub(crate) fn presences(got: &[Received]) -> Result<Vec<(String, bool, PresenceReason)>> {
    let mut out = Vec::new();
    for f in frames(got)? {
        if let Body::Presence { online, reason } = f.body {
            out.push((f.unit.to_owned(), online, reason));
        }
    }
    Ok(out)
}

/// Checks that `got` is exactly the presence `(unit, online, reason)`.
pub(crate) fn expect_presence(
    got: &[Received],
    unit: &str,
    online: bool,
    reason: PresenceReason,
) -> Result<()> {
    let p = presences(got)?;
    ensure!(
        p == [(unit.to_owned(), online, reason)] && got.len() == 1,
        "expected only presence ({unit}, {online}, {reason:?}), got {got:?}"
    );
    Ok(())
}

/// One manager and one device `UNIT`, on the given workers, with the manager's inbox
/// (the device's presence) emptied.
pub(crate) fn manager_and_device(
    h: &mut Harness,
    mgr_worker: usize,
    dev_worker: usize,
) -> Result<(ClientId, ClientId)> {
    let mgr = h.manager("ops", mgr_worker)?;
    let dev = h.device(UNIT, dev_worker)?;
    let got = h.take(mgr);
    expect_presence(&got, UNIT, true, PresenceReason::Connected)?;
    ensure!(
        h.take(dev).is_empty(),
        "the device got frames before any command"
    );
    Ok((mgr, dev))
}

/// Sends `frame` from `from` and runs until nothing moves.
pub(crate) fn send(h: &mut Harness, from: ClientId, frame: &Frame<'_>) -> Result<()> {
    h.send(from, frame)?;
    h.run();
    Ok(())
}

/// Manager `mgr` sends Command `request_id` to `unit`; returns the id the device `dev`
/// received it with, after checking that it got exactly that command.
pub(crate) fn command(
    h: &mut Harness,
    mgr: ClientId,
    dev: ClientId,
    unit: &str,
    request_id: u32,
    payload: &[u8],
) -> Result<u32> {
    send(h, mgr, &Frame::command(unit, request_id, payload))?;
    let got = h.take(dev);
    let f = only_frame(&got)?;
    ensure!(
        f.unit.is_empty() && f.body == Body::Command { payload },
        "the device got {f:?} for command {request_id}"
    );
    Ok(f.id)
}

/// Manager `mgr` opens stream `stream_id` on `unit` with `window`; device `dev` accepts
/// with `increment`. Returns the stream id the device knows, after checking what each side
/// saw on the way (the window the device got is returned as well).
pub(crate) fn open_stream(
    h: &mut Harness,
    mgr: ClientId,
    dev: ClientId,
    unit: &str,
    stream_id: u32,
    window: u32,
    increment: u32,
) -> Result<(u32, u32)> {
    send(h, mgr, &Frame::stream_open(unit, stream_id, window, b"pty"))?;
    let got = h.take(dev);
    let f = only_frame(&got)?;
    let Body::StreamOpen {
        window: seen,
        payload,
    } = f.body
    else {
        bail!("the device got {f:?} instead of StreamOpen");
    };
    ensure!(
        f.unit.is_empty() && payload == b"pty",
        "StreamOpen at the device: {f:?}"
    );
    let device_id = f.id;
    send(h, dev, &Frame::stream_window("", device_id, increment))?;
    let got = h.take(mgr);
    let f = only_frame(&got)?;
    ensure!(
        f.id == stream_id && f.unit == unit && f.body == Body::StreamWindow { increment },
        "the manager got {f:?} instead of the device's first window"
    );
    Ok((device_id, seen))
}

/// A WebSocket frame as a client sends it, header written by hand: `fin`, the RSV bits in
/// `rsv` (0..=7), `opcode`, masked with a fixed key when `masked`.
pub(crate) fn raw_ws(fin: bool, rsv: u8, opcode: u8, payload: &[u8], masked: bool) -> Vec<u8> {
    let mut out = Vec::new();
    let mut header = Vec::new();
    let key = [0x37, 0xfa, 0x21, 0x3d];
    ws::encode_header(
        &mut header,
        fin,
        Opcode::Binary,
        payload.len(),
        masked.then_some(key),
    );
    if let Some(b0) = header.first_mut() {
        *b0 = (u8::from(fin) << 7) | ((rsv & 7) << 4) | (opcode & 0x0f);
    }
    out.extend_from_slice(&header);
    let start = out.len();
    out.extend_from_slice(payload);
    if masked && let Some(tail) = out.get_mut(start..) {
        ws::apply_mask(tail, key);
    }
    out
}

/// An encoded devgate frame (the payload of one binary message).
pub(crate) fn encode(f: &Frame<'_>) -> Vec<u8> {
    let mut out = Vec::new();
    f.encode(&mut out);
    out
}

/// Whether the gateway still holds `unit`'s session.
pub(crate) fn is_registered(h: &Harness, unit: &str) -> bool {
    h.shared().devices.contains_key(unit)
}

/// Whether `got` holds nothing at all.
pub(crate) fn nothing(got: &[Received]) -> Result<()> {
    ensure!(got.is_empty(), "expected nothing, got {got:?}");
    Ok(())
}

/// The Control reply in `got` to request `id`, parsed.
pub(crate) fn control_reply(got: &[Received], id: u32) -> Result<serde_json::Value> {
    let f = only_frame(got)?;
    let Body::Control { payload } = f.body else {
        bail!("expected a Control reply, got {f:?}");
    };
    ensure!(f.id == id && f.unit.is_empty(), "Control reply {f:?}");
    serde_json::from_slice(payload).context("the Control reply is not JSON")
}
