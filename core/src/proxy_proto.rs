//! PROXY protocol (v1 text and v2 binary, as HAProxy sends them) on the public listener,
//! sans I/O: the worker hands a connection's first bytes to [`HeaderWait::feed`] before
//! anything reaches TLS, and learns the client's real address or that the connection
//! must be refused. Parsing is the `proxy-header` crate's.
//!
//! Only connections from `proxy_protocol_from` networks (the balancers) are read this
//! way, and they must start with a header: a balancer configured for it always sends
//! one (HAProxy's health checks too, with `check-send-proxy`), so a connection from a
//! balancer address without one is a misconfiguration, refused rather than accounted to
//! the balancer. From any other source the bytes go straight to TLS, where a PROXY
//! header is not a ClientHello and the handshake fails: a client cannot choose the
//! address it is accounted under.

use std::net::{IpAddr, SocketAddr};

use proxy_header::{ParseConfig, ProxyHeader};

/// Longest header accepted: a v1 line is at most 107 bytes; a v2 header with the TLVs a
/// balancer adds (ALPN, authority, unique id) stays well under this.
const MAX_HEADER: usize = 1024;

/// Source networks trusted to send a PROXY header (`proxy_protocol_from`).
#[derive(Debug, Clone, Default)]
pub struct Networks(Vec<(IpAddr, u8)>);

impl Networks {
    /// Parses `["10.0.0.0/8", "2001:db8::/32", "192.0.2.7"]` (a bare address is one host).
    pub fn parse(list: &[String]) -> Result<Self, String> {
        let mut nets = Vec::with_capacity(list.len());
        for text in list {
            let (addr, len) = match text.split_once('/') {
                Some((a, l)) => (a, Some(l)),
                None => (text.as_str(), None),
            };
            let addr: IpAddr = addr.trim().parse().map_err(|_| {
                format!("{text:?} is not a network: expected an address with a prefix length, e.g. 10.0.0.0/8 or 2001:db8::/32")
            })?;
            let max = if addr.is_ipv4() { 32 } else { 128 };
            let len = match len {
                Some(l) => l
                    .trim()
                    .parse::<u8>()
                    .ok()
                    .filter(|l| *l <= max)
                    .ok_or_else(|| format!("{text:?}: the prefix length must be 0..={max}"))?,
                None => max,
            };
            nets.push((addr, len));
        }
        Ok(Self(nets))
    }

    /// Whether `ip` is in one of the networks (IPv4-mapped IPv6 counts as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.0.iter().any(|(net, len)| match (net, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                prefix_eq(&n.octets(), &a.octets(), usize::from(*len))
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                prefix_eq(&n.octets(), &a.octets(), usize::from(*len))
            }
            _ => false,
        })
    }

    /// Whether no network is configured (PROXY protocol off).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

fn prefix_eq(a: &[u8], b: &[u8], bits: usize) -> bool {
    let whole = bits / 8;
    if a[..whole] != b[..whole] {
        return false;
    }
    let rest = bits % 8;
    if rest == 0 {
        return true;
    }
    let mask = 0xffu8 << (8 - rest);
    (a[whole] & mask) == (b[whole] & mask)
}

/// What a connection from a balancer has sent of its header so far.
#[derive(Debug, Default)]
pub struct HeaderWait {
    buf: Vec<u8>,
}

/// The result of feeding bytes to a [`HeaderWait`].
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// The header is not complete yet.
    More,
    /// The header is complete. `source` is the client's address, or `None` for a
    /// connection the balancer makes itself (v2 LOCAL, v1 UNKNOWN: health checks), which
    /// keeps the balancer's address. `rest` is what followed the header (TLS).
    Done {
        /// The client's address.
        source: Option<SocketAddr>,
        /// Bytes after the header.
        rest: Vec<u8>,
    },
    /// Not a valid header: refuse the connection, for this reason.
    Refused(&'static str),
}

impl HeaderWait {
    /// Takes the next bytes received.
    pub fn feed(&mut self, data: &[u8]) -> Step {
        self.buf.extend_from_slice(data);
        let config = ParseConfig {
            include_tlvs: false,
            ..ParseConfig::default()
        };
        match ProxyHeader::parse(&self.buf, config) {
            Ok((header, len)) => {
                let source = header
                    .proxied_address()
                    .map(|a| SocketAddr::new(a.source.ip().to_canonical(), a.source.port()));
                let rest = self.buf.get(len..).unwrap_or_default().to_vec();
                self.buf = Vec::new();
                Step::Done { source, rest }
            }
            // A v1 line that is complete but still "too short" is malformed (the parser
            // waits for a separator that will never come).
            Err(proxy_header::Error::BufferTooShort)
                if self.buf.starts_with(b"PROXY") && self.buf.windows(2).any(|w| w == b"\r\n") =>
            {
                Step::Refused("the PROXY v1 header is malformed")
            }
            Err(proxy_header::Error::BufferTooShort) if self.buf.len() < MAX_HEADER => {
                // A v1 header is text: anything else than its signature so far is not one.
                if !self.buf.starts_with(b"PROXY")
                    && !b"PROXY".starts_with(&self.buf[..self.buf.len().min(5)])
                    && !V2_SIGNATURE.starts_with(&self.buf[..self.buf.len().min(12)])
                {
                    return Step::Refused(
                        "the connection from a proxy_protocol_from address does not start with a PROXY header",
                    );
                }
                Step::More
            }
            Err(proxy_header::Error::BufferTooShort) => {
                Step::Refused("the PROXY header is longer than 1024 bytes")
            }
            Err(_) => Step::Refused(
                "the connection from a proxy_protocol_from address does not start with a valid PROXY header",
            ),
        }
    }
}

/// The 12 bytes that open a v2 header.
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";

#[cfg(test)]
mod tests {
    use super::*;
    use proxy_header::ProxiedAddress;

    fn v2(source: &str, dest: &str) -> Vec<u8> {
        let mut out = Vec::new();
        ProxyHeader::with_address(ProxiedAddress::stream(
            source.parse().expect("addr"),
            dest.parse().expect("addr"),
        ))
        .encode_v2(&mut out)
        .expect("encode");
        out
    }

    #[test]
    fn networks_match_by_prefix_and_reject_nonsense() {
        let n = Networks::parse(&[
            "10.0.0.0/8".into(),
            "192.0.2.7".into(),
            "2001:db8::/32".into(),
        ])
        .expect("parse");
        assert!(n.contains("10.200.1.1".parse().expect("ip")));
        assert!(!n.contains("11.0.0.1".parse().expect("ip")));
        assert!(n.contains("192.0.2.7".parse().expect("ip")));
        assert!(!n.contains("192.0.2.8".parse().expect("ip")));
        assert!(n.contains("::ffff:10.1.2.3".parse().expect("ip")));
        assert!(n.contains("2001:db8:1::5".parse().expect("ip")));
        assert!(Networks::parse(&["10.0.0.0/33".into()]).is_err());
        assert!(Networks::parse(&["ten".into()]).is_err());
        assert!(Networks::parse(&["0.0.0.0/0".into()]).is_ok());
    }

    #[test]
    fn a_v2_header_byte_by_byte_then_tls() {
        let mut bytes = v2("203.0.113.9:40000", "192.0.2.1:443");
        bytes.extend_from_slice(b"\x16\x03\x01tls");
        let mut w = HeaderWait::default();
        let mut last = Step::More;
        for b in &bytes {
            last = w.feed(std::slice::from_ref(b));
            if last != Step::More {
                break;
            }
        }
        // The header completes before the TLS bytes arrive, so `rest` is empty then.
        assert_eq!(
            last,
            Step::Done {
                source: Some("203.0.113.9:40000".parse().expect("addr")),
                rest: Vec::new()
            }
        );
        let mut w = HeaderWait::default();
        assert_eq!(
            w.feed(&bytes),
            Step::Done {
                source: Some("203.0.113.9:40000".parse().expect("addr")),
                rest: b"\x16\x03\x01tls".to_vec()
            }
        );
    }

    #[test]
    fn v1_local_and_refusals() {
        let mut w = HeaderWait::default();
        assert_eq!(
            w.feed(b"PROXY TCP4 198.51.100.4 192.0.2.1 5000 443\r\nrest"),
            Step::Done {
                source: Some("198.51.100.4:5000".parse().expect("addr")),
                rest: b"rest".to_vec()
            }
        );
        let mut w = HeaderWait::default();
        assert_eq!(
            w.feed(b"PROXY UNKNOWN\r\n"),
            Step::Done {
                source: None,
                rest: Vec::new()
            }
        );
        // A TLS ClientHello from a balancer address: no header.
        assert!(matches!(
            HeaderWait::default().feed(b"\x16\x03\x01\x02\x00"),
            Step::Refused(_)
        ));
        assert!(matches!(
            HeaderWait::default().feed(b"PROXY TCP4 nonsense\r\n"),
            Step::Refused(_)
        ));
        let mut w = HeaderWait::default();
        assert_eq!(w.feed(b"PRO"), Step::More);
        assert!(matches!(w.feed(&[b'X'; 2000]), Step::Refused(_)));
    }
}
