//! Property tests over every parser: the "fuzz target" CI runs on stable.
//!
//! Two kinds of property:
//!
//! * robustness: arbitrary bytes, cut into arbitrary chunks the way a socket
//!   delivers them, never make a parser panic, and what the parsers report is
//!   self-consistent (consumed lengths within the buffer, `needed` agreeing
//!   with `decode`, `Incomplete` only below the size limit);
//! * round trips: whatever the encoders write decodes back to the same value,
//!   and any frame that decodes re-encodes to the same bytes.
//!
//! Byte soup alone rarely gets past the first header checks, so each parser
//! is also fed "structured soup": input built from plausible pieces (real
//! headers with random lengths and flags, random header lines) so that the
//! deeper paths are exercised too. The coverage-guided versions of these
//! targets live in `fuzz/` (cargo-fuzz, nightly).

use devgate_proto::frame::{self, Body, ErrorCode, Frame, PresenceReason};
use devgate_proto::http;
use devgate_proto::ws::{self, Decoded, Decoder, Message, Opcode, Role};
use proptest::prelude::*;

/// Feeds `input` to a decoder in `chunks`, like a connection driver does,
/// checking the decoder's invariants along the way. Returns the messages
/// delivered (kind byte + payload) until the first error, if any.
fn drive(decoder: &mut Decoder, input: &[u8], chunks: &[usize]) -> Vec<(u8, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut rest = input;
    let mut out = Vec::new();
    let mut chunk_iter = chunks.iter().cycle();
    loop {
        let n = chunk_iter
            .next()
            .copied()
            .unwrap_or(rest.len())
            .min(rest.len());
        let (chunk, tail) = rest.split_at(n);
        buf.extend_from_slice(chunk);
        rest = tail;
        loop {
            let needed = decoder.needed(&buf);
            let len = buf.len();
            let consumed = match decoder.decode(&mut buf) {
                Ok(Decoded::Incomplete) => {
                    assert_ne!(needed, Some(0), "Incomplete but needed() says complete");
                    break;
                }
                Ok(Decoded::Frame { consumed, message }) => {
                    assert!(consumed > 0 && consumed <= len);
                    assert_eq!(needed, Some(0), "decoded but needed() wants more");
                    if let Some(m) = message {
                        out.push(match m {
                            Message::Binary(p) => (b'b', p.to_vec()),
                            Message::Text(p) => (b't', p.to_vec()),
                            Message::Ping(p) => (b'i', p.to_vec()),
                            Message::Pong(p) => (b'o', p.to_vec()),
                            Message::Close { code, reason } => {
                                let mut v = code.unwrap_or(0).to_be_bytes().to_vec();
                                v.extend_from_slice(reason.as_bytes());
                                (b'c', v)
                            }
                        });
                    }
                    consumed
                }
                Err(e) => {
                    assert!(matches!(e.close_code(), 1002 | 1007 | 1009));
                    return out;
                }
            };
            buf.drain(..consumed);
        }
        if rest.is_empty() {
            return out;
        }
    }
}

/// Deterministic filler so large payloads cost no proptest shrinking trees.
fn bytes_from_seed(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()[0]
        })
        .collect()
}

fn role() -> impl Strategy<Value = Role> {
    prop_oneof![Just(Role::Server), Just(Role::Client)]
}

/// A plausible WebSocket frame: random FIN/RSV/opcode/length encodings, a mask
/// that may or may not fit the role, and a payload that may be cut short.
fn soup_frame() -> impl Strategy<Value = Vec<u8>> {
    (
        any::<bool>(),
        prop_oneof![8 => Just(0u8), 1 => 1u8..8],
        prop_oneof![
            Just(0u8),
            Just(1),
            Just(2),
            Just(8),
            Just(9),
            Just(10),
            0u8..16
        ],
        any::<Option<[u8; 4]>>(),
        prop_oneof![0usize..130, 120usize..300, Just(65_536)],
        prop_oneof![4 => Just(0u8), 1 => any::<u8>()],
        any::<u64>(),
    )
        .prop_map(|(fin, rsv, opcode, mask, len, cut, seed)| {
            let mut out = vec![
                (u8::from(fin) << 7) | (rsv << 4) | opcode,
                if mask.is_some() { 0x80 } else { 0 },
            ];
            let second = if len < 126 {
                len as u8
            } else if len <= 0xFFFF {
                126
            } else {
                127
            };
            out[1] |= second;
            if second == 126 {
                out.extend_from_slice(&(len as u16).to_be_bytes());
            } else if second == 127 {
                out.extend_from_slice(&(len as u64).to_be_bytes());
            }
            if let Some(k) = mask {
                out.extend_from_slice(&k);
            }
            let body_len = len.saturating_sub(usize::from(cut));
            out.extend_from_slice(&bytes_from_seed(body_len, seed));
            out
        })
}

fn chunks() -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(prop_oneof![1usize..4, 1usize..64, 1usize..4096], 1..16)
}

/// A plausible HTTP request head built from real and random pieces.
fn soup_request() -> impl Strategy<Value = Vec<u8>> {
    let header = prop_oneof![
        Just("Upgrade: websocket".to_owned()),
        Just("Connection: keep-alive, Upgrade".to_owned()),
        Just("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==".to_owned()),
        Just("Sec-WebSocket-Version: 13".to_owned()),
        Just("Host: gw".to_owned()),
        "Content-Length: [0-9+ -]{0,22}",
        "(Upgrade|Connection|Host|Sec-WebSocket-Extensions|Transfer-Encoding): [ -~]{0,20}",
        "[!-~]{1,12}: [\\x00-\\xff]{0,20}",
    ];
    (
        "(GET|POST|get|G T) (/v1/device|/v1/manager\\?x=1|[ -~]{0,10}) HTTP/1\\.[01]",
        prop::collection::vec(header, 0..40),
        prop_oneof![Just("\r\n\r\n"), Just("\r\n"), Just("\n\n"), Just("")],
        prop::collection::vec(any::<u8>(), 0..8),
    )
        .prop_map(|(line, headers, end, trailer)| {
            let mut out = line.into_bytes();
            for h in headers {
                out.extend_from_slice(b"\r\n");
                out.extend_from_slice(h.as_bytes());
            }
            out.extend_from_slice(end.as_bytes());
            out.extend_from_slice(&trailer);
            out
        })
}

fn check_parse_request(buf: &[u8], max: usize) {
    match http::parse_request(buf, max) {
        Ok(http::Parsed::Incomplete) => assert!(buf.len() <= max),
        Ok(http::Parsed::Complete {
            request,
            header_len,
        }) => {
            assert!(header_len <= buf.len() && header_len <= max);
            assert!(!request.path.contains('?'));
        }
        Err(http::HttpError::HeadersTooLarge { limit }) => assert_eq!(limit, max),
        Err(e) => assert!(matches!(e.status(), 400 | 431)),
    }
}

/// Owned data for an arbitrary valid frame (frames borrow, strategies own).
#[derive(Debug, Clone)]
struct OwnedFrame {
    ty: u8,
    id: u32,
    unit: String,
    bytes: Vec<u8>,
    text: String,
    n32: u32,
    n16: u16,
    flag: bool,
    n8: u8,
}

impl OwnedFrame {
    fn frame(&self) -> Frame<'_> {
        let payload = &self.bytes[..];
        let body = match self.ty {
            0 => Body::Command { payload },
            1 => Body::Response { payload },
            2 => Body::Event { payload },
            3 => Body::Presence {
                online: self.flag,
                reason: PresenceReason::from(self.n8),
            },
            4 => Body::Error {
                code: ErrorCode::from(self.n16),
                message: &self.text,
            },
            5 => Body::StreamOpen {
                window: self.n32,
                payload,
            },
            6 => Body::StreamData { payload },
            7 => Body::StreamWindow {
                increment: self.n32.max(1),
            },
            8 => Body::StreamClose {
                code: self.n16,
                reason: &self.text,
            },
            _ => Body::Control { payload },
        };
        Frame {
            id: self.id,
            unit: &self.unit,
            body,
        }
    }
}

fn owned_frame() -> impl Strategy<Value = OwnedFrame> {
    (
        0u8..10,
        any::<u32>(),
        "[!-~]{0,64}",
        prop::collection::vec(any::<u8>(), 0..300),
        ".{0,40}",
        any::<u32>(),
        any::<u16>(),
        any::<bool>(),
        any::<u8>(),
    )
        .prop_map(
            |(ty, id, unit, bytes, text, n32, n16, flag, n8)| OwnedFrame {
                ty,
                id,
                unit,
                bytes,
                text,
                n32,
                n16,
                flag,
                n8,
            },
        )
}

/// Byte soup with a valid-looking devgate header in front, so decoding gets
/// past the version/type/flags checks into the type-specific parsing.
fn soup_devgate_frame() -> impl Strategy<Value = Vec<u8>> {
    (
        prop_oneof![8 => Just(1u8), 1 => any::<u8>()],
        prop_oneof![
            Just(0x01u8),
            Just(0x02),
            Just(0x03),
            Just(0x04),
            Just(0x05),
            Just(0x10),
            Just(0x11),
            Just(0x12),
            Just(0x13),
            Just(0x20),
            any::<u8>()
        ],
        prop_oneof![8 => Just(0u8), 1 => any::<u8>()],
        prop_oneof![0u8..8, 60u8..70, any::<u8>()],
        prop::collection::vec(any::<u8>(), 0..96),
    )
        .prop_map(|(version, ty, flags, unit_len, rest)| {
            let mut out = vec![version, ty, flags, unit_len, 0, 0, 0, 1];
            // Mostly printable so that the unit check passes some of the time.
            out.extend(
                rest.iter()
                    .map(|&b| if b < 0xE0 { 0x21 + b % 94 } else { b }),
            );
            out
        })
}

fn check_frame_decode(bytes: &[u8]) {
    if let Ok(f) = Frame::decode(bytes) {
        // Decoding is canonical: a frame that decodes re-encodes to the same
        // bytes, so a relay can never change what it forwards by accident.
        let mut out = Vec::new();
        f.encode(&mut out);
        assert_eq!(out, bytes);
        assert_eq!(f.encoded_len(), bytes.len());
    }
}

proptest! {
    #[test]
    fn http_request_soup_never_panics(buf in prop::collection::vec(any::<u8>(), 0..1024), max in 0usize..1200) {
        check_parse_request(&buf, max);
        let _ = http::parse_response_head(&buf);
    }

    #[test]
    fn http_structured_request_never_panics(buf in soup_request(), max in prop_oneof![Just(http::DEFAULT_MAX_HEADER_BYTES), 0usize..400]) {
        check_parse_request(&buf, max);
        // A complete head parses the same from any longer buffer.
        if let Ok(http::Parsed::Complete { header_len, request }) = http::parse_request(&buf, max) {
            let mut longer = buf[..header_len].to_vec();
            longer.extend_from_slice(b"\x82\x80junk");
            let again = http::parse_request(&longer, max.max(longer.len()));
            prop_assert_eq!(again, Ok(http::Parsed::Complete { header_len, request }));
        }
        let mut as_response = b"HTTP/1.1 101 Switching Protocols".to_vec();
        as_response.extend_from_slice(buf.get(buf.len().min(20)..).unwrap_or_default());
        let _ = http::parse_response_head(&as_response);
    }

    #[test]
    fn ws_decoder_byte_soup_never_panics(
        input in prop::collection::vec(any::<u8>(), 0..2048),
        chunks in chunks(),
        role in role(),
        max in prop_oneof![0usize..200, Just(1usize << 20)],
    ) {
        drive(&mut Decoder::new(role, max), &input, &chunks);
    }

    #[test]
    fn ws_decoder_frame_soup_never_panics(
        frames in prop::collection::vec(soup_frame(), 0..12),
        chunks in chunks(),
        role in role(),
        max in prop_oneof![0usize..300, Just(1usize << 20)],
    ) {
        let input = frames.concat();
        drive(&mut Decoder::new(role, max), &input, &chunks);
    }

    #[test]
    fn ws_roundtrip(
        len in prop_oneof![0usize..130, 65_530usize..65_540, 0usize..70_000],
        seed in any::<u64>(),
        text in any::<bool>(),
        mask in any::<Option<[u8; 4]>>(),
        chunks in chunks(),
    ) {
        let payload = bytes_from_seed(len, seed);
        let opcode = if text { Opcode::Text } else { Opcode::Binary };
        let mut wire = Vec::new();
        ws::encode_frame(&mut wire, opcode, &payload, mask);
        prop_assert_eq!(wire.len(), ws::header_len(len, mask.is_some()) + len);
        // The encoder masks a copy; the caller's payload is untouched.
        prop_assert_eq!(&payload, &bytes_from_seed(len, seed));
        let role = if mask.is_some() { Role::Server } else { Role::Client };

        // In one piece.
        let mut buf = wire.clone();
        let mut decoder = Decoder::new(role, 70_000);
        match decoder.decode(&mut buf) {
            Ok(Decoded::Frame { consumed, message: Some(m) }) => {
                prop_assert_eq!(consumed, wire.len());
                let got = match m { Message::Text(p) | Message::Binary(p) => p, other => panic!("{other:?}") };
                prop_assert_eq!(matches!(m, Message::Text(_)), text);
                prop_assert_eq!(got, &payload[..]);
            }
            other => panic!("expected a whole message, got {other:?}"),
        }
        // And as a socket delivers it.
        let got = drive(&mut Decoder::new(role, 70_000), &wire, &chunks);
        prop_assert_eq!(got, vec![(if text { b't' } else { b'b' }, payload)]);
    }

    #[test]
    fn ws_fragmented_roundtrip(
        len in 0usize..20_000,
        seed in any::<u64>(),
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..6),
        pings in prop::collection::vec(any::<bool>(), 6),
        mask in any::<Option<[u8; 4]>>(),
        chunks in chunks(),
    ) {
        let payload = bytes_from_seed(len, seed);
        let mut points: Vec<usize> = cuts.iter().map(|i| i.index(len + 1)).collect();
        points.push(0);
        points.push(len);
        points.sort_unstable();
        points.dedup();
        if points.len() == 1 {
            points.push(len); // empty payload: one empty final fragment
        }
        let mut wire = Vec::new();
        let mut expected = Vec::new();
        let pieces: Vec<_> = points.windows(2).collect();
        for (i, w) in pieces.iter().enumerate() {
            let part = &payload[w[0]..w[1]];
            let op = if i == 0 { Opcode::Binary } else { Opcode::Continuation };
            let fin = i + 1 == pieces.len();
            ws::encode_header(&mut wire, fin, op, part.len(), mask);
            let start = wire.len();
            wire.extend_from_slice(part);
            if let Some(k) = mask {
                ws::apply_mask(&mut wire[start..], k);
            }
            if !fin && pings[i % pings.len()] {
                ws::encode_frame(&mut wire, Opcode::Ping, &[i as u8], mask);
                expected.push((b'i', vec![i as u8]));
            }
        }
        expected.push((b'b', payload));
        let role = if mask.is_some() { Role::Server } else { Role::Client };
        let got = drive(&mut Decoder::new(role, 20_000), &wire, &chunks);
        prop_assert_eq!(got, expected);
    }

    #[test]
    fn ws_close_roundtrip(code in prop_oneof![1000u16..=1003, 1007u16..=1014, 3000u16..=4999], reason in ".{0,80}", mask in any::<Option<[u8; 4]>>()) {
        let mut wire = Vec::new();
        ws::encode_close(&mut wire, code, &reason, mask);
        let role = if mask.is_some() { Role::Server } else { Role::Client };
        let mut decoder = Decoder::new(role, 0);
        match decoder.decode(&mut wire) {
            Ok(Decoded::Frame { message: Some(Message::Close { code: got, reason: r }), .. }) => {
                prop_assert_eq!(got, Some(code));
                prop_assert!(reason.starts_with(r));
                prop_assert!(r.len() <= ws::MAX_CONTROL_PAYLOAD - 2);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn apply_mask_is_bytewise_xor(data in prop::collection::vec(any::<u8>(), 0..200), key in any::<[u8; 4]>(), offset in 0usize..8) {
        let offset = offset.min(data.len());
        let mut fast = data.clone();
        ws::apply_mask(&mut fast[offset..], key);
        for (i, (f, d)) in fast.iter().zip(&data).enumerate() {
            let want = if i < offset { *d } else { d ^ key[(i - offset) % 4] };
            prop_assert_eq!(*f, want);
        }
    }

    #[test]
    fn frame_byte_soup_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        check_frame_decode(&bytes);
    }

    #[test]
    fn frame_structured_soup_never_panics(bytes in soup_devgate_frame()) {
        check_frame_decode(&bytes);
    }

    #[test]
    fn frame_roundtrip(f in owned_frame(), mask in any::<Option<[u8; 4]>>()) {
        let frame = f.frame();
        let mut out = Vec::new();
        frame.encode(&mut out);
        prop_assert_eq!(out.len(), frame.encoded_len());
        prop_assert_eq!(Frame::decode(&out), Ok(frame));

        // Through the WebSocket layer as the gateway (unmasked) or a client
        // (masked) would send it.
        let mut wire = Vec::new();
        frame::encode_ws(&mut wire, &frame, mask);
        let role = if mask.is_some() { Role::Server } else { Role::Client };
        let mut decoder = Decoder::new(role, 1 << 16);
        match decoder.decode(&mut wire) {
            Ok(Decoded::Frame { message: Some(Message::Binary(m)), .. }) => {
                prop_assert_eq!(Frame::decode(m), Ok(frame));
            }
            other => panic!("{other:?}"),
        }
    }
}
