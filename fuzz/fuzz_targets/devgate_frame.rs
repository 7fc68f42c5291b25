//! Arbitrary bytes as a devgate frame. Decoding is canonical, so whatever
//! decodes must re-encode to exactly the input, bare and inside a WebSocket
//! frame.
#![no_main]

use devgate_proto::frame::{self, Frame};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(f) = Frame::decode(data) else {
        return;
    };
    let mut out = Vec::new();
    f.encode(&mut out);
    assert_eq!(out, data);
    assert_eq!(f.encoded_len(), data.len());
    let _ = f.frame_type().as_str();

    let mut wire = Vec::new();
    frame::encode_ws(&mut wire, &f, None);
    assert!(wire.ends_with(data));
});
