//! PROXY protocol on the public listener: connections from `proxy_protocol_from` are
//! accounted under the client address of their header (v1 or v2), a balancer address
//! without a header and a header from any other address are refused.
//!
//! The "balancer" is this test: it connects from 127.0.0.2 (the only allowed network)
//! and writes the header itself, then speaks TLS on the same socket.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use devgate_tests::Gateway;

const BALANCER: &str = "127.0.0.2";

fn start() -> Result<Gateway> {
    Gateway::start(&format!(
        "proxy_protocol_from = [\"{BALANCER}/32\"]\n[limits]\nmax_handshakes_per_source = 2\n"
    ))
}

/// A TCP connection to the gateway from `source` (an address on lo).
fn connect_from(source: &str, to: SocketAddr) -> Result<TcpStream> {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    let from: SocketAddr = format!("{source}:0").parse()?;
    sock.bind(&from.into())?;
    sock.connect_timeout(&to.into(), Duration::from_secs(5))?;
    let s: TcpStream = sock.into();
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    Ok(s)
}

fn v2_header(client: &str, to: SocketAddr) -> Result<Vec<u8>> {
    // Signature, version 2 / PROXY, TCP over IPv4, 12 address bytes.
    let client: SocketAddr = client.parse()?;
    let (SocketAddr::V4(c), SocketAddr::V4(d)) = (client, to) else {
        bail!("IPv4 only here");
    };
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.extend_from_slice(&[0x21, 0x11, 0, 12]);
    h.extend_from_slice(&c.ip().octets());
    h.extend_from_slice(&d.ip().octets());
    h.extend_from_slice(&c.port().to_be_bytes());
    h.extend_from_slice(&d.port().to_be_bytes());
    Ok(h)
}

/// Whether the gateway closed `s` (EOF or reset) rather than leaving it open for `wait`.
fn closed_by_gateway(s: &mut TcpStream, wait: Duration) -> Result<bool> {
    s.set_read_timeout(Some(wait))?;
    let mut buf = [0u8; 512];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return Ok(true),
            // A TLS alert may come before the close.
            Ok(_) => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Ok(false);
            }
            Err(_) => return Ok(true),
        }
    }
}

/// `GET /usg/check-status` over TLS on an already connected (and headed) socket.
fn check_status(gw: &Gateway, s: TcpStream) -> Result<u16> {
    let tls: Arc<rustls::ClientConfig> = gw.anonymous_tls()?;
    let conn = rustls::ClientConnection::new(tls, "localhost".try_into()?)?;
    let mut tls = rustls::StreamOwned::new(conn, s);
    tls.write_all(
        b"GET /usg/check-status HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )?;
    let mut resp = Vec::new();
    let _ = tls.read_to_end(&mut resp);
    let text = String::from_utf8_lossy(&resp);
    let status = text
        .split(' ')
        .nth(1)
        .with_context(|| format!("no HTTP status in {text:?}"))?;
    Ok(status.parse()?)
}

fn counter(gw: &Gateway, name: &str) -> Result<u64> {
    let v = gw.status()?;
    // /v1/status carries the summed counters.
    v["counters"][name]
        .as_u64()
        .with_context(|| format!("no counters.{name} in status: {v}"))
}

#[test]
fn per_source_limits_count_the_address_in_the_header() -> Result<()> {
    let gw = start()?;
    // Two connections of client 198.51.100.1 hold their handshakes open: its limit (2).
    let mut held = Vec::new();
    for port in [40001, 40002] {
        let mut s = connect_from(BALANCER, gw.addr)?;
        s.write_all(&v2_header(&format!("198.51.100.1:{port}"), gw.addr)?)?;
        assert!(!closed_by_gateway(&mut s, Duration::from_millis(300))?);
        held.push(s);
    }
    // A third one of the same client is refused...
    let mut third = connect_from(BALANCER, gw.addr)?;
    third.write_all(&v2_header("198.51.100.1:40003", gw.addr)?)?;
    assert!(
        closed_by_gateway(&mut third, Duration::from_secs(5))?,
        "a client over its per-source limit behind the balancer was let in"
    );
    // ...while another client behind the same balancer is not affected, in v2 and v1.
    let mut other = connect_from(BALANCER, gw.addr)?;
    other.write_all(&v2_header("198.51.100.2:40004", gw.addr)?)?;
    assert_eq!(check_status(&gw, other)?, 200);
    let mut v1 = connect_from(BALANCER, gw.addr)?;
    v1.write_all(b"PROXY TCP4 198.51.100.3 127.0.0.1 40005 443\r\n")?;
    assert_eq!(check_status(&gw, v1)?, 200);
    assert!(counter(&gw, "refused_handshakes_per_source")? >= 1);
    // The held connections were accounted to their client: closing them frees its slots.
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut s = connect_from(BALANCER, gw.addr)?;
        s.write_all(&v2_header("198.51.100.1:40006", gw.addr)?)?;
        match check_status(&gw, s) {
            Ok(200) => break,
            _ if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(100)),
            other => {
                bail!("client 198.51.100.1 still refused after its connections closed: {other:?}")
            }
        }
    }
    Ok(())
}

#[test]
fn headers_from_other_sources_and_balancers_without_headers_are_refused() -> Result<()> {
    let gw = start()?;
    // Not a balancer: a header is not a ClientHello.
    let mut spoof = connect_from("127.0.0.1", gw.addr)?;
    spoof.write_all(&v2_header("203.0.113.50:1", gw.addr)?)?;
    assert!(closed_by_gateway(&mut spoof, Duration::from_secs(5))?);
    let mut spoof_v1 = connect_from("127.0.0.1", gw.addr)?;
    spoof_v1.write_all(b"PROXY TCP4 203.0.113.50 127.0.0.1 1 443\r\n")?;
    assert!(closed_by_gateway(&mut spoof_v1, Duration::from_secs(5))?);
    // A balancer that sends TLS straight away.
    let bare = connect_from(BALANCER, gw.addr)?;
    assert!(
        check_status(&gw, bare).is_err(),
        "a balancer connection without a header was served"
    );
    assert!(counter(&gw, "refused_proxy_header")? >= 1);
    // Garbage from a balancer.
    let mut junk = connect_from(BALANCER, gw.addr)?;
    junk.write_all(b"PROXY TCP4 not an address\r\n")?;
    assert!(closed_by_gateway(&mut junk, Duration::from_secs(5))?);
    // Direct clients are unaffected.
    let direct = connect_from("127.0.0.1", gw.addr)?;
    assert_eq!(check_status(&gw, direct)?, 200);
    assert!(
        gw.logs().contains("does not start with a PROXY header")
            || gw.logs().contains("valid PROXY header"),
        "no log line says why the balancer's connection was refused"
    );
    Ok(())
}
