//! Golden vectors of remote access (docs/PROTOCOL.md section 11): `tests/remote_vectors.json`
//! holds open parameters (text → fields, and the canonical text back), terminal records
//! (bytes → record, and the record back to the same bytes), the headers a device sends
//! first on file streams, and a StreamOpen frame that carries terminal parameters, for
//! agents and manager tools in other languages.

use devgate_proto::frame::{Body, Frame};
use devgate_proto::remote::{GetHeader, OpenParams, PtyRecord, PutStart, RemoteError, sha256_hex};
use serde_json::Value;

const VECTORS: &str = include_str!("remote_vectors.json");

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex digit"))
        .collect()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn vectors(key: &str) -> Vec<Value> {
    let all: Value = serde_json::from_str(VECTORS).expect("remote_vectors.json is JSON");
    all[key].as_array().expect("array").clone()
}

fn expected_params(p: &Value) -> OpenParams {
    let s = |k: &str| p[k].as_str().expect("string").to_owned();
    let n = |k: &str| p[k].as_u64().expect("number");
    match p["kind"].as_str().expect("kind") {
        "pty" => OpenParams::Pty {
            cols: u16::try_from(n("cols")).expect("u16"),
            rows: u16::try_from(n("rows")).expect("u16"),
            term: s("term"),
        },
        "tcp" => OpenParams::Tcp {
            host: s("host"),
            port: u16::try_from(n("port")).expect("u16"),
        },
        "file-put" => OpenParams::FilePut {
            name: s("name"),
            size: n("size"),
            sha256: s("sha256"),
            offset: n("offset"),
        },
        "file-get" => OpenParams::FileGet {
            path: s("path"),
            offset: n("offset"),
        },
        other => panic!("unknown kind {other}"),
    }
}

#[test]
fn open_parameter_vectors() {
    let vs = vectors("open_params");
    assert!(vs.len() >= 10);
    for v in vs {
        let name = v["name"].as_str().expect("name");
        let text = v["text"].as_str().expect("text");
        let parsed = OpenParams::parse(text.as_bytes());
        if v.get("error").is_some() {
            assert!(
                matches!(parsed, Err(RemoteError::BadParams(..))),
                "{name}: {text:?} must be refused, got {parsed:?}"
            );
            continue;
        }
        let parsed = parsed.unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(parsed, expected_params(&v["params"]), "{name}");
        let canonical = v["canonical"].as_str().unwrap_or(text);
        assert_eq!(parsed.encode(), canonical, "{name}: canonical text");
    }
}

#[test]
fn terminal_record_vectors() {
    for v in vectors("pty_records") {
        let name = v["name"].as_str().expect("name");
        let bytes = unhex(v["hex"].as_str().expect("hex"));
        let decoded = PtyRecord::decode(&bytes);
        if v.get("error").is_some() {
            assert!(
                matches!(decoded, Err(RemoteError::BadRecord { .. })),
                "{name}: must be refused, got {decoded:?}"
            );
            continue;
        }
        let (record, used) = decoded
            .unwrap_or_else(|e| panic!("{name}: {e}"))
            .unwrap_or_else(|| panic!("{name}: incomplete"));
        assert_eq!(used, bytes.len(), "{name}: one whole record");
        // Every shorter prefix is incomplete, never an error or another record.
        for cut in 0..bytes.len() {
            assert_eq!(
                PtyRecord::decode(&bytes[..cut]),
                Ok(None),
                "{name}: prefix {cut}"
            );
        }
        let r = &v["record"];
        let n = |k: &str| r[k].as_i64().expect("number");
        let expected = match r["kind"].as_str().expect("kind") {
            "data" => {
                let data = unhex(r["data_hex"].as_str().expect("data_hex"));
                assert_eq!(record, PtyRecord::Data(&data), "{name}");
                continue_encode(name, record, &bytes);
                continue;
            }
            "resize" => PtyRecord::Resize {
                cols: u16::try_from(n("cols")).expect("u16"),
                rows: u16::try_from(n("rows")).expect("u16"),
            },
            "exit" => PtyRecord::Exit(i32::try_from(n("status")).expect("i32")),
            "unknown" => {
                // Skipped by receivers; not re-encoded (its body is not kept).
                assert_eq!(
                    record,
                    PtyRecord::Unknown(u8::try_from(n("value")).expect("u8")),
                    "{name}"
                );
                continue;
            }
            other => panic!("unknown kind {other}"),
        };
        assert_eq!(record, expected, "{name}");
        continue_encode(name, record, &bytes);
    }
}

fn continue_encode(name: &str, record: PtyRecord<'_>, bytes: &[u8]) {
    let mut out = Vec::new();
    record.encode_into(&mut out);
    assert_eq!(hex(&out), hex(bytes), "{name}: re-encoded");
}

#[test]
fn stream_open_frame_vectors() {
    for v in vectors("frames") {
        let name = v["name"].as_str().expect("name");
        let bytes = unhex(v["hex"].as_str().expect("hex"));
        let f = Frame::decode(&bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(f.unit, v["unit"].as_str().expect("unit"), "{name}");
        assert_eq!(u64::from(f.id), v["id"].as_u64().expect("id"), "{name}");
        let Body::StreamOpen { window, payload } = f.body else {
            panic!("{name}: not a StreamOpen");
        };
        assert_eq!(u64::from(window), v["window"].as_u64().expect("window"));
        assert_eq!(payload, v["params"].as_str().expect("params").as_bytes());
        assert!(OpenParams::parse(payload).is_ok(), "{name}: params parse");
        let mut out = Vec::new();
        f.encode(&mut out);
        assert_eq!(out, bytes, "{name}: re-encoded");
    }
}

#[test]
fn file_header_vectors() {
    let vs = vectors("file_headers");
    assert!(vs.len() >= 4);
    for v in vs {
        let name = v["name"].as_str().expect("name");
        let bytes = unhex(v["hex"].as_str().expect("hex"));
        if let Some(start) = v.get("put_start") {
            assert_eq!(bytes.len(), PutStart::LEN, "{name}");
            let p = PutStart::decode(&bytes).unwrap_or_else(|| panic!("{name}: incomplete"));
            assert_eq!(p.0, start.as_u64().expect("number"), "{name}");
            assert_eq!(
                PutStart::decode(&bytes[..bytes.len() - 1]),
                None,
                "{name}: prefix"
            );
            assert_eq!(hex(&p.encode()), hex(&bytes), "{name}: re-encoded");
            continue;
        }
        let decoded = GetHeader::decode(&bytes);
        if v.get("error").is_some() {
            assert!(
                matches!(decoded, Err(RemoteError::BadHeader(_))),
                "{name}: must be refused, got {decoded:?}"
            );
            continue;
        }
        let h = decoded
            .unwrap_or_else(|e| panic!("{name}: {e}"))
            .unwrap_or_else(|| panic!("{name}: incomplete"));
        let want = &v["get_header"];
        assert_eq!(h.size, want["size"].as_u64().expect("size"), "{name}");
        assert_eq!(h.start, want["start"].as_u64().expect("start"), "{name}");
        assert_eq!(
            sha256_hex(&h.sha256),
            want["sha256"].as_str().expect("sha256")
        );
        assert_eq!(
            GetHeader::decode(&bytes[..GetHeader::LEN - 1]),
            Ok(None),
            "{name}: prefix"
        );
        assert_eq!(hex(&h.encode()), hex(&bytes), "{name}: re-encoded");
    }
}
