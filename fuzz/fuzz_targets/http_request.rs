//! Arbitrary bytes as an HTTP upgrade request (server side) and as the
//! gateway's response head (client side). The first byte picks the header
//! size limit so that the `HeadersTooLarge` boundary is explored too.
#![no_main]

use devgate_proto::http;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&limit_byte, buf)) = data.split_first() else {
        return;
    };
    let max = if limit_byte == 0xFF {
        http::DEFAULT_MAX_HEADER_BYTES
    } else {
        usize::from(limit_byte) * 4
    };
    match http::parse_request(buf, max) {
        Ok(http::Parsed::Incomplete) => assert!(buf.len() <= max),
        Ok(http::Parsed::Complete {
            request,
            header_len,
        }) => {
            assert!(header_len <= buf.len() && header_len <= max);
            assert!(!request.path.contains('?'));
            if let Some(key) = request.websocket_key {
                let _ = http::switching_protocols(key);
            }
        }
        Err(_) => {}
    }
    if let Ok(Some((_, len, _, _))) = http::parse_response_head(buf) {
        assert!(len <= buf.len());
    }
});
