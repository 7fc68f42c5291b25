//! HTTP/1.1 as far as devgate needs it: the WebSocket upgrade handshake.
//!
//! Every devgate connection starts with one HTTP request, `GET /v1/device` or
//! `GET /v1/manager` carrying the RFC 6455 upgrade headers. The gateway reads
//! bytes into a buffer and calls [`parse_request`] after each read until it
//! returns [`Parsed::Complete`]; the returned `header_len` says where the head
//! ends, so anything after it (a client that pipelines its first WebSocket
//! frame) stays in the buffer for the WebSocket decoder.
//!
//! The head is capped at `max_header_bytes` (default
//! [`DEFAULT_MAX_HEADER_BYTES`]) and [`MAX_HEADERS`] headers. Without a cap a
//! peer that trickles header bytes forever would make the gateway buffer
//! without bound, and with 50,000 connections the cap is what bounds the
//! memory spent on handshakes. The parser also never looks past the cap, so
//! a flood of bytes costs at most one bounded parse.
//!
//! The other half is writing: [`switching_protocols`] for a successful
//! upgrade, [`response`] for the small plain answers (`400`, `403`, `426`,
//! `503`, health checks). [`upgrade_request`] and [`parse_response_head`] are
//! the client side of the same exchange, used by the client library and the
//! load generator.

use base64::Engine as _;
use sha1::{Digest as _, Sha1};

/// Default limit on the size of an HTTP request head (request line, headers
/// and the blank line), in bytes.
pub const DEFAULT_MAX_HEADER_BYTES: usize = 8192;

/// Maximum number of headers in a request or response head. An upgrade request
/// needs about eight; 32 leaves room for proxies and tracing headers.
pub const MAX_HEADERS: usize = 32;

/// The GUID RFC 6455 section 1.3 appends to `Sec-WebSocket-Key` before hashing.
const WEBSOCKET_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// A parsed HTTP request head, borrowing from the read buffer.
///
/// Only the headers devgate acts on are extracted; the others are checked for
/// syntax by `httparse` and then ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request<'a> {
    /// The request method, e.g. `GET`.
    pub method: &'a str,
    /// The request target up to (not including) the first `?`.
    pub path: &'a str,
    /// The query string after the first `?`, if there is one (may be empty).
    pub query: Option<&'a str>,
    /// `Sec-WebSocket-Key`, surrounding whitespace trimmed.
    pub websocket_key: Option<&'a str>,
    /// `Sec-WebSocket-Version`, surrounding whitespace trimmed.
    pub websocket_version: Option<&'a str>,
    /// `Upgrade` contains the token `websocket` (case-insensitive).
    pub upgrade_websocket: bool,
    /// A `Connection` header contains the token `upgrade` (comma-separated
    /// list, case-insensitive).
    pub connection_upgrade: bool,
    /// `Sec-WebSocket-Extensions` as sent. devgate never accepts an extension
    /// (permessage-deflate is refused), so this is only for logging.
    pub extensions: Option<&'a str>,
    /// `Content-Length`, if present.
    pub content_length: Option<u64>,
    /// `Host`, surrounding whitespace trimmed.
    pub host: Option<&'a str>,
}

impl Request<'_> {
    /// Whether this request is a valid RFC 6455 opening handshake: `GET`,
    /// `Upgrade: websocket`, `Connection: upgrade`, a non-empty
    /// `Sec-WebSocket-Key` and `Sec-WebSocket-Version: 13`.
    pub fn is_websocket_upgrade(&self) -> bool {
        self.method == "GET"
            && self.upgrade_websocket
            && self.connection_upgrade
            && self.websocket_key.is_some_and(|k| !k.is_empty())
            && self.websocket_version == Some("13")
    }
}

/// Result of [`parse_request`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parsed<'a> {
    /// The head is not complete yet; read more bytes and call again.
    Incomplete,
    /// The head is complete.
    Complete {
        /// The parsed request.
        request: Request<'a>,
        /// Length of the head in bytes, including the final blank line. Bytes
        /// after it belong to the next protocol layer.
        header_len: usize,
    },
}

/// Why an HTTP head was rejected. The peer is always the one at fault; the
/// gateway answers with [`HttpError::status`] and closes the connection.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum HttpError {
    /// The head did not end within the size limit.
    #[error(
        "HTTP head is larger than {limit} bytes without ending in an empty line; \
         the gateway does not accept longer upgrade requests"
    )]
    HeadersTooLarge {
        /// The limit that was exceeded, in bytes.
        limit: usize,
    },
    /// More than [`MAX_HEADERS`] headers.
    #[error("HTTP head has more than {MAX_HEADERS} headers")]
    TooManyHeaders,
    /// The head is not valid HTTP/1.x; the text says what was wrong.
    #[error("malformed HTTP head: {0}")]
    Malformed(&'static str),
    /// `Content-Length` is not a decimal number, or appears twice with
    /// different values.
    #[error(
        "Content-Length header is not a plain decimal number, \
         or is repeated with different values"
    )]
    BadContentLength,
}

impl HttpError {
    /// The HTTP status code to answer with before closing: `431 Request
    /// Header Fields Too Large` for size limits, `400 Bad Request` otherwise.
    pub fn status(&self) -> u16 {
        match self {
            Self::HeadersTooLarge { .. } | Self::TooManyHeaders => 431,
            Self::Malformed(_) | Self::BadContentLength => 400,
        }
    }

    fn from_httparse(e: httparse::Error) -> Self {
        match e {
            httparse::Error::TooManyHeaders => Self::TooManyHeaders,
            httparse::Error::HeaderName => Self::Malformed("invalid byte in a header name"),
            httparse::Error::HeaderValue => Self::Malformed("invalid byte in a header value"),
            httparse::Error::NewLine => {
                Self::Malformed("invalid line ending (lines must end with CRLF)")
            }
            httparse::Error::Status => Self::Malformed("invalid status code in the status line"),
            httparse::Error::Token => {
                Self::Malformed("invalid byte in the method or request target")
            }
            httparse::Error::Version => Self::Malformed("invalid HTTP version (expected HTTP/1.1)"),
        }
    }
}

/// Parses an HTTP/1.x request head from the front of `buf`.
///
/// Returns [`Parsed::Incomplete`] while the head has not ended and `buf` holds
/// at most `max_header_bytes`; once `buf` is longer than that without a
/// complete head, [`HttpError::HeadersTooLarge`]. Only the first
/// `max_header_bytes` bytes are ever examined.
///
/// Requests with `Transfer-Encoding` are rejected: the upgrade request has no
/// body, and refusing chunked bodies removes any question of how the gateway
/// and a proxy in front of it would disagree about where a request ends.
pub fn parse_request(buf: &[u8], max_header_bytes: usize) -> Result<Parsed<'_>, HttpError> {
    let window = buf.get(..max_header_bytes).unwrap_or(buf);
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let header_len = match req.parse(window).map_err(HttpError::from_httparse)? {
        httparse::Status::Complete(n) => n,
        httparse::Status::Partial if buf.len() > max_header_bytes => {
            return Err(HttpError::HeadersTooLarge {
                limit: max_header_bytes,
            });
        }
        httparse::Status::Partial => return Ok(Parsed::Incomplete),
    };
    // httparse fills method and path whenever it reports Complete; the
    // fallbacks only keep this function free of panics.
    let method = req.method.ok_or(HttpError::Malformed("missing method"))?;
    let target = req
        .path
        .ok_or(HttpError::Malformed("missing request target"))?;
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (target, None),
    };

    let mut request = Request {
        method,
        path,
        query,
        websocket_key: None,
        websocket_version: None,
        upgrade_websocket: false,
        connection_upgrade: false,
        extensions: None,
        content_length: None,
        host: None,
    };
    for h in req.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case("sec-websocket-key") {
            set_once(
                &mut request.websocket_key,
                header_str(h)?,
                "Sec-WebSocket-Key header appears more than once",
            )?;
        } else if name.eq_ignore_ascii_case("sec-websocket-version") {
            set_once(
                &mut request.websocket_version,
                header_str(h)?,
                "Sec-WebSocket-Version header appears more than once",
            )?;
        } else if name.eq_ignore_ascii_case("upgrade") {
            request.upgrade_websocket |= has_token(h.value, b"websocket");
        } else if name.eq_ignore_ascii_case("connection") {
            request.connection_upgrade |= has_token(h.value, b"upgrade");
        } else if name.eq_ignore_ascii_case("sec-websocket-extensions") {
            // Several extension headers are legal; keeping the first is
            // enough since the value is only logged.
            if request.extensions.is_none() {
                request.extensions = Some(header_str(h)?);
            }
        } else if name.eq_ignore_ascii_case("content-length") {
            let n = parse_content_length(h.value)?;
            match request.content_length {
                Some(prev) if prev != n => return Err(HttpError::BadContentLength),
                _ => request.content_length = Some(n),
            }
        } else if name.eq_ignore_ascii_case("host") {
            set_once(
                &mut request.host,
                header_str(h)?,
                "Host header appears more than once",
            )?;
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(HttpError::Malformed(
                "Transfer-Encoding is not supported by the gateway",
            ));
        }
    }
    Ok(Parsed::Complete {
        request,
        header_len,
    })
}

/// Stores a header that must appear at most once; a repeat is ambiguous and
/// the request is refused rather than guessing which copy the peer meant.
fn set_once<'a>(
    slot: &mut Option<&'a str>,
    value: &'a str,
    repeated: &'static str,
) -> Result<(), HttpError> {
    if slot.is_some() {
        return Err(HttpError::Malformed(repeated));
    }
    *slot = Some(value);
    Ok(())
}

fn header_str<'a>(h: &httparse::Header<'a>) -> Result<&'a str, HttpError> {
    std::str::from_utf8(h.value)
        .map(str::trim)
        .map_err(|_| HttpError::Malformed("a WebSocket, Host or extension header is not UTF-8"))
}

/// Whether a comma-separated header value contains `token`, ignoring ASCII
/// case and optional whitespace around list elements (RFC 9110 section 5.6.1).
fn has_token(value: &[u8], token: &[u8]) -> bool {
    value
        .split(|&b| b == b',')
        .any(|item| item.trim_ascii().eq_ignore_ascii_case(token))
}

fn parse_content_length(value: &[u8]) -> Result<u64, HttpError> {
    let digits = value.trim_ascii();
    // A sign, a blank value or any non-digit is refused, as is a number too
    // large for u64; `str::parse` alone would accept a leading '+'.
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return Err(HttpError::BadContentLength);
    }
    digits.iter().try_fold(0u64, |acc, &d| {
        acc.checked_mul(10)
            .and_then(|v| v.checked_add(u64::from(d - b'0')))
            .ok_or(HttpError::BadContentLength)
    })
}

/// Computes `Sec-WebSocket-Accept` for a `Sec-WebSocket-Key`:
/// base64(SHA-1(key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11")).
pub fn websocket_accept(key: &str) -> String {
    let mut sha = Sha1::new();
    sha.update(key.as_bytes());
    sha.update(WEBSOCKET_GUID.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(sha.finalize())
}

/// The complete `101 Switching Protocols` response accepting a WebSocket
/// upgrade with the given `Sec-WebSocket-Key`. No extension or subprotocol is
/// ever accepted.
pub fn switching_protocols(key: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 101 Switching Protocols\r\n\
         Upgrade: websocket\r\n\
         Connection: Upgrade\r\n\
         Sec-WebSocket-Accept: {}\r\n\r\n",
        websocket_accept(key)
    )
    .into_bytes()
}

/// A complete HTTP/1.1 response with a `Content-Length` body, and
/// `Connection: close` when `close` is set.
///
/// CR, LF and other control characters in `reason` and `content_type` are
/// replaced by spaces so that a caller can never inject a header.
pub fn response(
    status: u16,
    reason: &str,
    content_type: Option<&str>,
    body: &[u8],
    close: bool,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(128 + body.len());
    out.extend_from_slice(format!("HTTP/1.1 {status:03} ").as_bytes());
    push_header_text(&mut out, reason);
    out.extend_from_slice(b"\r\n");
    if let Some(ct) = content_type {
        out.extend_from_slice(b"Content-Type: ");
        push_header_text(&mut out, ct);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("Content-Length: {}\r\n", body.len()).as_bytes());
    if close {
        out.extend_from_slice(b"Connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
    out
}

fn push_header_text(out: &mut Vec<u8>, text: &str) {
    out.extend(
        text.bytes()
            .map(|b| if b.is_ascii_control() { b' ' } else { b }),
    );
}

/// The client's upgrade request for `path` on `host` with the given
/// `Sec-WebSocket-Key` (16 random bytes, base64-encoded).
pub fn upgrade_request(host: &str, path: &str, key: &str) -> Vec<u8> {
    format!(
        "GET {path} HTTP/1.1\r\n\
         Host: {host}\r\n\
         Upgrade: websocket\r\n\
         Connection: Upgrade\r\n\
         Sec-WebSocket-Key: {key}\r\n\
         Sec-WebSocket-Version: 13\r\n\r\n"
    )
    .into_bytes()
}

/// What [`parse_response_head`] returns for a complete head:
/// `(status, head_len, Sec-WebSocket-Accept, Content-Length)`.
pub type ResponseHead = (u16, usize, Option<String>, Option<u64>);

/// Parses the head of the gateway's HTTP response, client side.
///
/// Returns `Ok(None)` while the head is incomplete, otherwise
/// `(status, head_len, Sec-WebSocket-Accept, Content-Length)`. The head is
/// limited to [`DEFAULT_MAX_HEADER_BYTES`] like the gateway's requests are.
pub fn parse_response_head(buf: &[u8]) -> Result<Option<ResponseHead>, HttpError> {
    let limit = DEFAULT_MAX_HEADER_BYTES;
    let window = buf.get(..limit).unwrap_or(buf);
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    let head_len = match resp.parse(window).map_err(HttpError::from_httparse)? {
        httparse::Status::Complete(n) => n,
        httparse::Status::Partial if buf.len() > limit => {
            return Err(HttpError::HeadersTooLarge { limit });
        }
        httparse::Status::Partial => return Ok(None),
    };
    let status = resp
        .code
        .ok_or(HttpError::Malformed("missing status code"))?;
    let mut accept = None;
    let mut content_length: Option<u64> = None;
    for h in resp.headers.iter() {
        if h.name.eq_ignore_ascii_case("sec-websocket-accept") {
            accept = Some(header_str(h)?.to_owned());
        } else if h.name.eq_ignore_ascii_case("content-length") {
            let n = parse_content_length(h.value)?;
            match content_length {
                Some(prev) if prev != n => return Err(HttpError::BadContentLength),
                _ => content_length = Some(n),
            }
        }
    }
    Ok(Some((status, head_len, accept, content_length)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const UPGRADE: &[u8] = b"GET /v1/device?fw=1.2 HTTP/1.1\r\n\
        Host: gw.example.com\r\n\
        Upgrade: websocket\r\n\
        Connection: keep-alive, Upgrade\r\n\
        Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
        Sec-WebSocket-Version: 13\r\n\
        Sec-WebSocket-Extensions: permessage-deflate\r\n\r\n";

    fn complete(buf: &[u8]) -> (Request<'_>, usize) {
        match parse_request(buf, DEFAULT_MAX_HEADER_BYTES) {
            Ok(Parsed::Complete {
                request,
                header_len,
            }) => (request, header_len),
            other => panic!("expected a complete request, got {other:?}"),
        }
    }

    #[test]
    fn rfc6455_accept_key_example() {
        // RFC 6455 section 1.3.
        assert_eq!(
            websocket_accept("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn parses_upgrade_request() {
        let mut buf = UPGRADE.to_vec();
        buf.extend_from_slice(b"\x82\x80rest");
        let (req, len) = complete(&buf);
        assert_eq!(len, UPGRADE.len());
        assert_eq!(req.method, "GET");
        assert_eq!(req.path, "/v1/device");
        assert_eq!(req.query, Some("fw=1.2"));
        assert_eq!(req.host, Some("gw.example.com"));
        assert_eq!(req.websocket_key, Some("dGhlIHNhbXBsZSBub25jZQ=="));
        assert_eq!(req.websocket_version, Some("13"));
        assert_eq!(req.extensions, Some("permessage-deflate"));
        assert_eq!(req.content_length, None);
        assert!(req.upgrade_websocket);
        assert!(req.connection_upgrade);
        assert!(req.is_websocket_upgrade());
    }

    #[test]
    fn header_matching_is_case_insensitive() {
        let buf = b"GET /v1/manager HTTP/1.1\r\nUPGRADE: WebSocket\r\nconnection: UPGRADE\r\n\
            sec-websocket-key: abc\r\nSEC-WEBSOCKET-VERSION:  13 \r\n\r\n";
        let (req, _) = complete(buf);
        assert_eq!(req.path, "/v1/manager");
        assert_eq!(req.query, None);
        assert!(req.is_websocket_upgrade());
    }

    #[test]
    fn not_an_upgrade() {
        let cases: &[&[u8]] = &[
            // Wrong method.
            b"POST /v1/device HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\nSec-WebSocket-Key: k\r\nSec-WebSocket-Version: 13\r\n\r\n",
            // Connection lacks the upgrade token ("upgraded" is a different token).
            b"GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgraded\r\nSec-WebSocket-Key: k\r\nSec-WebSocket-Version: 13\r\n\r\n",
            // Wrong version.
            b"GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\nSec-WebSocket-Key: k\r\nSec-WebSocket-Version: 8\r\n\r\n",
            // No key.
            b"GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\nSec-WebSocket-Version: 13\r\n\r\n",
            // Empty key.
            b"GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\nSec-WebSocket-Key: \r\nSec-WebSocket-Version: 13\r\n\r\n",
            // Upgrade to something else.
            b"GET / HTTP/1.1\r\nUpgrade: h2c\r\nConnection: upgrade\r\nSec-WebSocket-Key: k\r\nSec-WebSocket-Version: 13\r\n\r\n",
            // Plain GET.
            b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
        ];
        for case in cases {
            let (req, _) = complete(case);
            assert!(
                !req.is_websocket_upgrade(),
                "{}",
                String::from_utf8_lossy(case)
            );
        }
    }

    #[test]
    fn incomplete_until_blank_line() {
        for cut in 0..UPGRADE.len() {
            assert_eq!(
                parse_request(&UPGRADE[..cut], DEFAULT_MAX_HEADER_BYTES),
                Ok(Parsed::Incomplete),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn headers_too_large() {
        let limit = 64;
        // Incomplete and within the limit: wait for more.
        assert_eq!(
            parse_request(&UPGRADE[..limit], limit),
            Ok(Parsed::Incomplete)
        );
        // Incomplete and past the limit.
        assert_eq!(
            parse_request(&UPGRADE[..limit + 1], limit),
            Err(HttpError::HeadersTooLarge { limit })
        );
        // Complete, but the head itself is longer than the limit.
        assert_eq!(
            parse_request(UPGRADE, limit),
            Err(HttpError::HeadersTooLarge { limit })
        );
        // Exactly at the limit is fine.
        assert!(matches!(
            parse_request(UPGRADE, UPGRADE.len()),
            Ok(Parsed::Complete { .. })
        ));
        assert_eq!(
            HttpError::HeadersTooLarge { limit }.to_string(),
            "HTTP head is larger than 64 bytes without ending in an empty line; \
             the gateway does not accept longer upgrade requests"
        );
    }

    #[test]
    fn too_many_headers() {
        let mut buf = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..=MAX_HEADERS {
            buf.extend_from_slice(format!("X-H{i}: v\r\n").as_bytes());
        }
        buf.extend_from_slice(b"\r\n");
        assert_eq!(
            parse_request(&buf, DEFAULT_MAX_HEADER_BYTES),
            Err(HttpError::TooManyHeaders)
        );
        assert_eq!(HttpError::TooManyHeaders.status(), 431);
    }

    #[test]
    fn malformed() {
        let cases: &[(&[u8], &str)] = &[
            (
                b"GET / HTTP/1.1\r\nBad Name: x\r\n\r\n",
                "invalid byte in a header name",
            ),
            (
                b"GET / HTTP/1.1\r\nX: a\x01b\r\n\r\n",
                "invalid byte in a header value",
            ),
            (
                b"GET / HTTP/2.0\r\n\r\n",
                "invalid HTTP version (expected HTTP/1.1)",
            ),
            (
                b"G(T / HTTP/1.1\r\n\r\n",
                "invalid byte in the method or request target",
            ),
            (
                b"GET / HTTP/1.1\rX\n\r\n",
                "invalid line ending (lines must end with CRLF)",
            ),
            (
                b"GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
                "Transfer-Encoding is not supported by the gateway",
            ),
            (
                b"GET / HTTP/1.1\r\nSec-WebSocket-Key: a\r\nSec-WebSocket-Key: b\r\n\r\n",
                "Sec-WebSocket-Key header appears more than once",
            ),
            (
                b"GET / HTTP/1.1\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Version: 13\r\n\r\n",
                "Sec-WebSocket-Version header appears more than once",
            ),
            (
                b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
                "Host header appears more than once",
            ),
            (
                b"GET / HTTP/1.1\r\nSec-WebSocket-Key: \xff\xfe\r\n\r\n",
                "a WebSocket, Host or extension header is not UTF-8",
            ),
        ];
        for (buf, what) in cases {
            let err = parse_request(buf, DEFAULT_MAX_HEADER_BYTES);
            assert_eq!(
                err,
                Err(HttpError::Malformed(what)),
                "{}",
                String::from_utf8_lossy(buf)
            );
            assert_eq!(HttpError::Malformed(what).status(), 400);
        }
        assert_eq!(
            HttpError::Malformed("x").to_string(),
            "malformed HTTP head: x"
        );
    }

    #[test]
    fn content_length() {
        let ok = b"POST /x HTTP/1.1\r\nContent-Length: 42\r\ncontent-length: 42\r\n\r\n";
        assert_eq!(complete(ok).0.content_length, Some(42));
        let bad: &[&[u8]] = &[
            b"POST /x HTTP/1.1\r\nContent-Length: +4\r\n\r\n",
            b"POST /x HTTP/1.1\r\nContent-Length: 4x\r\n\r\n",
            b"POST /x HTTP/1.1\r\nContent-Length: \r\n\r\n",
            b"POST /x HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n",
            b"POST /x HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        ];
        for buf in bad {
            assert_eq!(
                parse_request(buf, DEFAULT_MAX_HEADER_BYTES),
                Err(HttpError::BadContentLength),
                "{}",
                String::from_utf8_lossy(buf)
            );
        }
        assert_eq!(HttpError::BadContentLength.status(), 400);
    }

    #[test]
    fn switching_protocols_response() {
        let resp = switching_protocols("dGhlIHNhbXBsZSBub25jZQ==");
        assert_eq!(
            resp,
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
              Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
        );
        // The client side parses what the server side writes.
        let parsed = parse_response_head(&resp).expect("valid response");
        assert_eq!(
            parsed,
            Some((
                101,
                resp.len(),
                Some("s3pPLMBiTxaQ9kYGzzhZRbK+xOo=".to_owned()),
                None
            ))
        );
    }

    #[test]
    fn plain_response() {
        let r = response(
            503,
            "Service Unavailable",
            Some("text/plain"),
            b"full",
            true,
        );
        assert_eq!(
            r,
            b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\n\
              Content-Length: 4\r\nConnection: close\r\n\r\nfull"
        );
        let r = response(200, "OK\r\nX-Injected: 1", None, b"", false);
        assert_eq!(
            r,
            b"HTTP/1.1 200 OK  X-Injected: 1\r\nContent-Length: 0\r\n\r\n"
        );
        let parsed = parse_response_head(&r).expect("valid response");
        assert_eq!(parsed, Some((200, r.len(), None, Some(0))));
    }

    #[test]
    fn upgrade_request_roundtrip() {
        let req = upgrade_request(
            "gw.example.com:443",
            "/v1/device",
            "dGhlIHNhbXBsZSBub25jZQ==",
        );
        let (parsed, len) = complete(&req);
        assert_eq!(len, req.len());
        assert!(parsed.is_websocket_upgrade());
        assert_eq!(parsed.host, Some("gw.example.com:443"));
        assert_eq!(parsed.path, "/v1/device");
    }

    #[test]
    fn response_head_incomplete_and_errors() {
        let r = response(404, "Not Found", None, b"", true);
        for cut in 0..r.len() {
            assert_eq!(parse_response_head(&r[..cut]), Ok(None));
        }
        let big = vec![b'a'; DEFAULT_MAX_HEADER_BYTES + 1];
        let mut long = b"HTTP/1.1 200 OK\r\nX: ".to_vec();
        long.extend_from_slice(&big);
        assert_eq!(
            parse_response_head(&long),
            Err(HttpError::HeadersTooLarge {
                limit: DEFAULT_MAX_HEADER_BYTES
            })
        );
        assert_eq!(
            parse_response_head(b"HTTP/1.1 2x0 OK\r\n\r\n"),
            Err(HttpError::Malformed(
                "invalid status code in the status line"
            ))
        );
        assert_eq!(
            parse_response_head(b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n"),
            Err(HttpError::BadContentLength)
        );
    }
}
