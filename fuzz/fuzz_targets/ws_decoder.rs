//! Arbitrary bytes through the WebSocket decoder the way a connection driver
//! feeds it: the first byte picks the role and the message limit, the second
//! the read size, and the rest arrives in chunks of that size.
#![no_main]

use devgate_proto::ws::{Decoded, Decoder, Role};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let [config, chunk, input @ ..] = data else {
        return;
    };
    let role = if config & 1 == 0 {
        Role::Server
    } else {
        Role::Client
    };
    let max = if config & 2 == 0 {
        usize::from(config >> 2) * 16
    } else {
        1 << 20
    };
    let chunk = usize::from(*chunk).max(1);
    let mut decoder = Decoder::new(role, max);
    let mut buf = Vec::new();
    for piece in input.chunks(chunk) {
        buf.extend_from_slice(piece);
        loop {
            let needed = decoder.needed(&buf);
            let len = buf.len();
            match decoder.decode(&mut buf) {
                Ok(Decoded::Incomplete) => {
                    assert_ne!(needed, Some(0));
                    break;
                }
                Ok(Decoded::Frame { consumed, .. }) => {
                    assert!(consumed > 0 && consumed <= len);
                    assert_eq!(needed, Some(0));
                    buf.drain(..consumed);
                }
                Err(e) => {
                    let _ = e.close_code();
                    return;
                }
            }
        }
    }
});
