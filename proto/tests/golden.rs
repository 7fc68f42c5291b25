//! Golden vectors: `tests/vectors.json` is the byte-level contract for agents
//! written in other languages (see docs/PROTOCOL.md, "Test vectors").
//!
//! Each valid vector is decoded and compared field by field, re-encoded and
//! compared byte by byte, and wrapped in a WebSocket frame (unmasked, and
//! masked where the vector gives a mask). Each invalid vector must fail with
//! the stated error. The file itself is checked for coverage so it cannot
//! silently lose a frame type or an error kind.

use std::collections::BTreeSet;

use devgate_proto::frame::{self, Body, ErrorCode, Frame, FrameError, FrameType, PresenceReason};
use devgate_proto::ws;
use serde_json::{Map, Value};

const VECTORS: &str = include_str!("vectors.json");

fn unhex(s: &str) -> Vec<u8> {
    assert!(s.len().is_multiple_of(2), "odd-length hex {s:?}");
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex digit"))
        .collect()
}

fn str_field<'a>(obj: &'a Map<String, Value>, key: &str) -> &'a str {
    obj.get(key)
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("missing string field {key:?} in {obj:?}"))
}

fn u64_field(obj: &Map<String, Value>, key: &str) -> u64 {
    obj.get(key)
        .and_then(Value::as_u64)
        .unwrap_or_else(|| panic!("missing integer field {key:?} in {obj:?}"))
}

fn num<T: TryFrom<u64>>(obj: &Map<String, Value>, key: &str) -> T {
    T::try_from(u64_field(obj, key))
        .unwrap_or_else(|_| panic!("field {key:?} out of range in {obj:?}"))
}

/// Owned storage for the byte fields a `Frame` borrows.
struct Expected {
    ty: String,
    id: u32,
    unit: String,
    payload: Vec<u8>,
    text: String,
    obj: Map<String, Value>,
}

impl Expected {
    fn from_json(obj: &Map<String, Value>) -> Self {
        let ty = str_field(obj, "type").to_owned();
        let extra: &[&str] = match ty.as_str() {
            "command" | "response" | "event" | "stream_data" | "control" => &["payload_hex"],
            "presence" => &["online", "reason"],
            "error" => &["code", "message"],
            "stream_open" => &["window", "payload_hex"],
            "stream_window" => &["increment"],
            "stream_close" => &["code", "reason"],
            other => panic!("unknown type {other:?} in vectors.json"),
        };
        // Exactly the documented fields: a typo in the JSON fails loudly.
        let mut want: BTreeSet<&str> = ["type", "id", "unit"].into();
        want.extend(extra);
        let have: BTreeSet<&str> = obj.keys().map(String::as_str).collect();
        assert_eq!(have, want, "fields of a {ty} frame");

        let payload = obj
            .get("payload_hex")
            .and_then(Value::as_str)
            .map(unhex)
            .unwrap_or_default();
        let text = match ty.as_str() {
            "error" => str_field(obj, "message").to_owned(),
            "stream_close" => str_field(obj, "reason").to_owned(),
            _ => String::new(),
        };
        Self {
            id: num(obj, "id"),
            unit: str_field(obj, "unit").to_owned(),
            ty,
            payload,
            text,
            obj: obj.clone(),
        }
    }

    fn frame(&self) -> Frame<'_> {
        let o = &self.obj;
        let p = &self.payload[..];
        let body = match self.ty.as_str() {
            "command" => Body::Command { payload: p },
            "response" => Body::Response { payload: p },
            "event" => Body::Event { payload: p },
            "stream_data" => Body::StreamData { payload: p },
            "control" => Body::Control { payload: p },
            "presence" => Body::Presence {
                online: o.get("online").and_then(Value::as_bool).expect("online"),
                reason: PresenceReason::from(num::<u8>(o, "reason")),
            },
            "error" => Body::Error {
                code: ErrorCode::from(num::<u16>(o, "code")),
                message: &self.text,
            },
            "stream_open" => Body::StreamOpen {
                window: num(o, "window"),
                payload: p,
            },
            "stream_window" => Body::StreamWindow {
                increment: num(o, "increment"),
            },
            "stream_close" => Body::StreamClose {
                code: num(o, "code"),
                reason: &self.text,
            },
            other => unreachable!("checked in from_json: {other}"),
        };
        Frame {
            id: self.id,
            unit: &self.unit,
            body,
        }
    }
}

fn expected_error(obj: &Map<String, Value>) -> FrameError {
    let value = || u64_field(obj, "value");
    match str_field(obj, "kind") {
        "truncated" => FrameError::Truncated,
        "unsupported_version" => FrameError::UnsupportedVersion(value().try_into().expect("u8")),
        "unknown_type" => FrameError::UnknownType(value().try_into().expect("u8")),
        "reserved_flags" => FrameError::ReservedFlags(value().try_into().expect("u8")),
        "unit_too_long" => FrameError::UnitTooLong(value().try_into().expect("usize")),
        "invalid_unit" => FrameError::InvalidUnit,
        // `detail` is this implementation's wording; other implementations
        // only need to agree on the kind.
        "malformed" => {
            let detail = str_field(obj, "detail");
            FrameError::Malformed(Box::leak(detail.to_owned().into_boxed_str()))
        }
        other => panic!("unknown error kind {other:?} in vectors.json"),
    }
}

fn error_kind(e: &FrameError) -> &'static str {
    match e {
        FrameError::Truncated => "truncated",
        FrameError::UnsupportedVersion(_) => "unsupported_version",
        FrameError::UnknownType(_) => "unknown_type",
        FrameError::ReservedFlags(_) => "reserved_flags",
        FrameError::UnitTooLong(_) => "unit_too_long",
        FrameError::InvalidUnit => "invalid_unit",
        FrameError::Malformed(_) => "malformed",
        other => panic!("new FrameError variant {other:?}: add it to vectors.json"),
    }
}

/// Unwraps one complete WebSocket binary message.
fn ws_message(role: ws::Role, wire: &[u8]) -> Vec<u8> {
    let mut buf = wire.to_vec();
    let mut decoder = ws::Decoder::new(role, 1 << 20);
    match decoder.decode(&mut buf) {
        Ok(ws::Decoded::Frame {
            consumed,
            message: Some(ws::Message::Binary(m)),
        }) => {
            assert_eq!(consumed, wire.len());
            m.to_vec()
        }
        other => panic!("expected one binary message, got {other:?}"),
    }
}

#[test]
fn golden_vectors() {
    let vectors: Vec<Map<String, Value>> =
        serde_json::from_str(VECTORS).expect("vectors.json is a list of objects");
    let mut names = BTreeSet::new();
    let mut types_seen = BTreeSet::new();
    let mut errors_seen = BTreeSet::new();

    for v in &vectors {
        let name = str_field(v, "name");
        assert!(
            names.insert(name.to_owned()),
            "duplicate vector name {name}"
        );
        let bytes = unhex(str_field(v, "hex"));

        match (v.get("frame"), v.get("error")) {
            (Some(Value::Object(f)), None) => {
                let expected = Expected::from_json(f);
                let want = expected.frame();
                let got =
                    Frame::decode(&bytes).unwrap_or_else(|e| panic!("{name}: decode failed: {e}"));
                assert_eq!(got, want, "{name}: decoded frame");
                assert_eq!(got.frame_type().as_str(), expected.ty, "{name}: type name");
                types_seen.insert(got.frame_type().as_str());

                let mut out = Vec::new();
                want.encode(&mut out);
                assert_eq!(out, bytes, "{name}: re-encoded bytes");
                assert_eq!(want.encoded_len(), bytes.len(), "{name}: encoded_len");

                // What the gateway sends: one unmasked binary WebSocket frame.
                let ws_hex = unhex(str_field(v, "ws_hex"));
                let mut ws_out = Vec::new();
                frame::encode_ws(&mut ws_out, &want, None);
                assert_eq!(ws_out, ws_hex, "{name}: ws_hex");
                assert_eq!(ws_message(ws::Role::Client, &ws_hex), bytes, "{name}");

                // What a device sends: masked with the vector's key.
                if let Some(mask) = v.get("mask").and_then(Value::as_str) {
                    let key: [u8; 4] = unhex(mask).try_into().expect("4-byte mask");
                    let masked = unhex(str_field(v, "ws_masked_hex"));
                    let mut ws_out = Vec::new();
                    frame::encode_ws(&mut ws_out, &want, Some(key));
                    assert_eq!(ws_out, masked, "{name}: ws_masked_hex");
                    assert_eq!(ws_message(ws::Role::Server, &masked), bytes, "{name}");
                }
            }
            (None, Some(Value::Object(e))) => {
                let want = expected_error(e);
                let got = Frame::decode(&bytes).expect_err(name);
                assert_eq!(got, want, "{name}: error");
                errors_seen.insert(error_kind(&got));
            }
            _ => panic!("{name}: a vector has exactly one of \"frame\" and \"error\""),
        }
    }

    let all_types = [
        FrameType::Command,
        FrameType::Response,
        FrameType::Event,
        FrameType::Presence,
        FrameType::Error,
        FrameType::StreamOpen,
        FrameType::StreamData,
        FrameType::StreamWindow,
        FrameType::StreamClose,
        FrameType::Control,
    ];
    for t in all_types {
        assert!(
            types_seen.contains(t.as_str()),
            "no valid vector of type {t}"
        );
    }
    for kind in [
        "truncated",
        "unsupported_version",
        "unknown_type",
        "reserved_flags",
        "unit_too_long",
        "invalid_unit",
        "malformed",
    ] {
        assert!(errors_seen.contains(kind), "no invalid vector for {kind}");
    }
}
