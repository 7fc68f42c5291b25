//! Opening connections: TCP (optionally from a chosen source address), the TLS
//! handshake, and the HTTP/1.1 upgrade to WebSocket; plus [`http_get`] and
//! [`http_post`] for plain requests on a fresh connection.
//!
//! HTTP parsing itself is `devgate_proto::http`; this module only moves bytes
//! and enforces the size and time limits that keep a misbehaving gateway from
//! stalling or flooding the client.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use bytes::{Buf, BytesMut};
use devgate_proto::http;
use rand::RngCore;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::{Instant, timeout_at};
use tokio_rustls::TlsConnector;

use crate::conn::{Connection, Stream};
use crate::error::from_io;
use crate::proxy::{Proxy, tunnel};
use crate::{
    ClientError, DEFAULT_CONNECT_TIMEOUT, DEFAULT_MAX_MESSAGE, HTTP_TIMEOUT, MAX_HTTP_BODY,
    MAX_REFUSAL_BODY, MAX_RESPONSE_HEAD, REFUSAL_BODY_TIMEOUT,
};

/// Which side of the gateway a connection speaks for; it picks the upgrade
/// path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// A device: `GET /v1/device`.
    Device,
    /// A management server: `GET /v1/manager`.
    Manager,
}

impl Role {
    /// The WebSocket path for this role.
    pub fn path(self) -> &'static str {
        match self {
            Self::Device => "/v1/device",
            Self::Manager => "/v1/manager",
        }
    }
}

/// Where and how to connect.
#[derive(Clone, Debug)]
pub struct ConnectOptions {
    /// The gateway's TLS port.
    pub addr: SocketAddr,
    /// Sent as SNI and checked against the gateway's certificate.
    pub server_name: String,
    /// Device or manager.
    pub role: Role,
    /// Source address to bind before connecting (e.g. one of 127.0.0.0/8,
    /// to give the load generator more than one ephemeral port range).
    pub bind: Option<IpAddr>,
    /// Largest WebSocket message accepted from the gateway.
    pub max_message: usize,
    /// Limit on TCP connect + TLS handshake + upgrade together.
    pub connect_timeout: Duration,
    /// Called on the socket before it is bound to `bind` (only when `bind` is
    /// set): a load generator sets `IP_BIND_ADDRESS_NO_PORT` here, so that the
    /// kernel picks the source port at connect time, per destination, instead
    /// of exhausting one ephemeral range per source address at bind time.
    pub before_bind: Option<fn(&TcpSocket) -> std::io::Result<()>>,
    /// An HTTP proxy to tunnel through with `CONNECT` (`bind` then applies to the
    /// connection to the proxy). [`ConnectOptions::with_env_proxy`] sets it from
    /// `HTTPS_PROXY`/`NO_PROXY`.
    pub proxy: Option<Proxy>,
}

impl ConnectOptions {
    /// Options with the defaults: no source bind, 1 MiB + 64 messages, 10 s
    /// to connect.
    pub fn new(addr: SocketAddr, server_name: impl Into<String>, role: Role) -> Self {
        Self {
            addr,
            server_name: server_name.into(),
            role,
            bind: None,
            max_message: DEFAULT_MAX_MESSAGE,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            before_bind: None,
            proxy: None,
        }
    }

    /// Sets [`ConnectOptions::proxy`] from the environment ([`Proxy::from_env`] for this
    /// gateway): the proxy in `HTTPS_PROXY` unless `NO_PROXY` lists the gateway.
    pub fn with_env_proxy(mut self) -> Result<Self, ClientError> {
        self.proxy = Proxy::from_env(&self.server_name, self.addr)?;
        Ok(self)
    }
}

/// Connects to the gateway and upgrades to a WebSocket on the role's path.
///
/// Each phase reports its own failure: TCP as [`ClientError::Io`] (naming the
/// address), TLS as [`ClientError::Tls`], a non-101 answer as
/// [`ClientError::Refused`] with the body, a wrong accept key as
/// [`ClientError::BadHandshake`], and running out of time as
/// [`ClientError::Timeout`] naming the phase.
pub async fn connect(
    opts: &ConnectOptions,
    tls: Arc<rustls::ClientConfig>,
) -> Result<Connection, ClientError> {
    let deadline = Instant::now() + opts.connect_timeout;
    let tcp = open_tcp(
        opts.addr,
        opts.proxy.as_ref(),
        opts.bind,
        opts.before_bind,
        deadline,
    )
    .await?;
    let mut stream = timeout_at(
        deadline,
        tls_handshake(tcp, opts.addr, &opts.server_name, tls),
    )
    .await
    .map_err(|_| ClientError::Timeout("TLS handshake with the gateway"))??;

    let key = websocket_key();
    let host = host_header(&opts.server_name, opts.addr.port());
    let request = http::upgrade_request(&host, opts.role.path(), &key);
    let mut buf = BytesMut::with_capacity(1024);
    let head = timeout_at(deadline, async {
        write_all(&mut stream, &request).await?;
        read_head(&mut stream, &mut buf).await
    })
    .await
    .map_err(|_| ClientError::Timeout("WebSocket upgrade"))??;

    if head.status != 101 {
        let body_deadline = deadline.min(Instant::now() + REFUSAL_BODY_TIMEOUT);
        let body = read_body_lossy(
            &mut stream,
            &mut buf,
            &head,
            MAX_REFUSAL_BODY,
            body_deadline,
        )
        .await;
        return Err(ClientError::Refused {
            status: head.status,
            body: String::from_utf8_lossy(&body).into_owned(),
        });
    }
    let expected = http::websocket_accept(&key);
    match head.accept.as_deref() {
        Some(accept) if accept == expected => {}
        Some(accept) => {
            return Err(ClientError::BadHandshake(format!(
                "Sec-WebSocket-Accept is {accept:?}, expected {expected:?} for key {key:?}"
            )));
        }
        None => {
            return Err(ClientError::BadHandshake(
                "101 response without Sec-WebSocket-Accept".to_owned(),
            ));
        }
    }
    // Whatever followed the head already belongs to the WebSocket stream.
    buf.advance(head.len);
    Ok(Connection::new(stream, buf, opts.max_message))
}

/// One `GET` on a fresh TLS connection (`Connection: close`): returns the
/// status and the body (by `Content-Length`, or up to the end of the
/// connection; at most 16 MiB). The whole exchange is limited to 30 s.
pub async fn http_get(
    addr: SocketAddr,
    server_name: &str,
    tls: Arc<rustls::ClientConfig>,
    path: &str,
) -> Result<(u16, Vec<u8>), ClientError> {
    http_get_via(None, addr, server_name, tls, path).await
}

/// [`http_get`] through `proxy` when given.
pub async fn http_get_via(
    proxy: Option<&Proxy>,
    addr: SocketAddr,
    server_name: &str,
    tls: Arc<rustls::ClientConfig>,
    path: &str,
) -> Result<(u16, Vec<u8>), ClientError> {
    let response = http_request(
        proxy,
        addr,
        server_name,
        tls,
        &Request {
            method: "GET",
            path,
            body: None,
        },
        MAX_HTTP_BODY,
    )
    .await?;
    Ok((response.status, response.body))
}

/// One `POST` of `body` (sent with `Content-Type: content_type` and
/// `Content-Length`) on a fresh TLS connection (`Connection: close`):
/// returns the status and the response body, with the limits of
/// [`http_get`].
pub async fn http_post(
    addr: SocketAddr,
    server_name: &str,
    tls: Arc<rustls::ClientConfig>,
    path: &str,
    content_type: &str,
    body: &[u8],
) -> Result<(u16, Vec<u8>), ClientError> {
    http_post_via(None, addr, server_name, tls, path, content_type, body).await
}

/// [`http_post`] through `proxy` when given.
pub async fn http_post_via(
    proxy: Option<&Proxy>,
    addr: SocketAddr,
    server_name: &str,
    tls: Arc<rustls::ClientConfig>,
    path: &str,
    content_type: &str,
    body: &[u8],
) -> Result<(u16, Vec<u8>), ClientError> {
    let response = http_request(
        proxy,
        addr,
        server_name,
        tls,
        &Request {
            method: "POST",
            path,
            body: Some((content_type, body)),
        },
        MAX_HTTP_BODY,
    )
    .await?;
    Ok((response.status, response.body))
}

/// A request for [`http_request`].
pub(crate) struct Request<'a> {
    pub(crate) method: &'static str,
    pub(crate) path: &'a str,
    /// Content type and body.
    pub(crate) body: Option<(&'a str, &'a [u8])>,
}

/// What [`http_request`] returns.
pub(crate) struct Response {
    pub(crate) status: u16,
    pub(crate) body: Vec<u8>,
    /// The `Retry-After` header, when it is a number of seconds.
    pub(crate) retry_after: Option<Duration>,
}

/// One request on a fresh TLS connection (`Connection: close`), the whole
/// exchange limited to 30 s and the response body to `limit` bytes.
pub(crate) async fn http_request(
    proxy: Option<&Proxy>,
    addr: SocketAddr,
    server_name: &str,
    tls: Arc<rustls::ClientConfig>,
    req: &Request<'_>,
    limit: usize,
) -> Result<Response, ClientError> {
    let has_line_break = |s: &str| s.bytes().any(|b| b == b'\r' || b == b'\n');
    if has_line_break(req.path) {
        return Err(ClientError::Config(format!(
            "request path {:?} contains a line break",
            req.path
        )));
    }
    let mut request = format!(
        "{} {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: devgate-client\r\nConnection: close\r\n",
        req.method,
        req.path,
        host_header(server_name, addr.port())
    )
    .into_bytes();
    if let Some((content_type, body)) = req.body {
        if has_line_break(content_type) {
            return Err(ClientError::Config(format!(
                "content type {content_type:?} contains a line break"
            )));
        }
        request.extend_from_slice(
            format!(
                "Content-Type: {content_type}\r\nContent-Length: {}\r\n\r\n",
                body.len()
            )
            .as_bytes(),
        );
        request.extend_from_slice(body);
    } else {
        request.extend_from_slice(b"\r\n");
    }

    let deadline = Instant::now() + HTTP_TIMEOUT;
    let tcp = open_tcp(addr, proxy, None, None, deadline).await?;
    let mut stream = timeout_at(deadline, tls_handshake(tcp, addr, server_name, tls))
        .await
        .map_err(|_| ClientError::Timeout("TLS handshake with the gateway"))??;
    let result = timeout_at(deadline, async {
        write_all(&mut stream, &request).await?;
        let mut buf = BytesMut::with_capacity(1024);
        let head = read_head(&mut stream, &mut buf).await?;
        let retry_after = buf.get(..head.len).and_then(retry_after);
        let body = read_body(&mut stream, &mut buf, &head, limit).await?;
        Ok::<_, ClientError>(Response {
            status: head.status,
            body,
            retry_after,
        })
    })
    .await
    .map_err(|_| ClientError::Timeout("HTTP request to the gateway"))?;
    let _ = stream.shutdown().await;
    result
}

/// The `Retry-After` header of a response head, when it is given in seconds
/// (the HTTP-date form is not used by the gateway and yields `None`).
fn retry_after(head: &[u8]) -> Option<Duration> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut resp = httparse::Response::new(&mut headers);
    resp.parse(head).ok()?;
    let value = resp
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("retry-after"))?
        .value;
    let secs: u64 = std::str::from_utf8(value).ok()?.trim().parse().ok()?;
    Some(Duration::from_secs(secs))
}

/// TCP to the gateway at `addr`, directly or through a `CONNECT` tunnel of `proxy`, by
/// `deadline`.
pub(crate) async fn open_tcp(
    addr: SocketAddr,
    proxy: Option<&Proxy>,
    bind: Option<IpAddr>,
    before_bind: Option<fn(&TcpSocket) -> std::io::Result<()>>,
    deadline: Instant,
) -> Result<TcpStream, ClientError> {
    match proxy {
        None => timeout_at(deadline, tcp_connect_with(addr, bind, before_bind))
            .await
            .map_err(|_| ClientError::Timeout("TCP connect to the gateway"))?,
        Some(proxy) => timeout_at(deadline, tunnel(proxy, addr, bind, before_bind))
            .await
            .map_err(|_| ClientError::Timeout("CONNECT through the HTTP proxy"))?,
    }
}

/// TCP connect with `TCP_NODELAY` (frames are small and latency matters more
/// than packet count), from `bind` when given, running `before_bind` on the
/// socket before it is bound.
pub(crate) async fn tcp_connect_with(
    addr: SocketAddr,
    bind: Option<IpAddr>,
    before_bind: Option<fn(&TcpSocket) -> std::io::Result<()>>,
) -> Result<TcpStream, ClientError> {
    let named = |e: std::io::Error| {
        ClientError::Io(std::io::Error::new(
            e.kind(),
            format!("TCP connect to the gateway at {addr}: {e}"),
        ))
    };
    let stream = match bind {
        None => TcpStream::connect(addr).await.map_err(named)?,
        Some(ip) => {
            if ip.is_ipv4() != addr.is_ipv4() {
                return Err(ClientError::Config(format!(
                    "source address {ip} and gateway address {addr} are of different IP families"
                )));
            }
            let socket = if addr.is_ipv4() {
                TcpSocket::new_v4()
            } else {
                TcpSocket::new_v6()
            }
            .map_err(named)?;
            if let Some(prepare) = before_bind {
                prepare(&socket).map_err(|e| {
                    ClientError::Io(std::io::Error::new(
                        e.kind(),
                        format!("preparing the socket for source address {ip}: {e}"),
                    ))
                })?;
            }
            socket.bind(SocketAddr::new(ip, 0)).map_err(|e| {
                ClientError::Io(std::io::Error::new(
                    e.kind(),
                    format!("binding source address {ip}: {e}"),
                ))
            })?;
            socket.connect(addr).await.map_err(named)?
        }
    };
    stream.set_nodelay(true)?;
    Ok(stream)
}

pub(crate) async fn tls_handshake(
    tcp: TcpStream,
    addr: SocketAddr,
    server_name: &str,
    tls: Arc<rustls::ClientConfig>,
) -> Result<Stream, ClientError> {
    let name = ServerName::try_from(server_name.to_owned()).map_err(|e| {
        ClientError::Config(format!(
            "server name {server_name:?} is not a DNS name or IP: {e}"
        ))
    })?;
    TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .map_err(|e| {
            // Every failure here is a failed handshake, whether rustls
            // rejected something or the gateway hung up mid-way.
            let reason = match e
                .get_ref()
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
            {
                Some(tls) => tls.to_string(),
                None => e.to_string(),
            };
            ClientError::Tls(format!(
                "handshake with {server_name} at {addr} failed: {reason}"
            ))
        })
}

/// 16 random bytes, base64 (RFC 6455 §4.1). Taken from the thread-local
/// CSPRNG; the key is not secret, but must not repeat.
fn websocket_key() -> String {
    let mut raw = [0u8; 16];
    rand::rng().fill_bytes(&mut raw);
    base64::engine::general_purpose::STANDARD.encode(raw)
}

fn host_header(server_name: &str, port: u16) -> String {
    let host = if server_name.contains(':') {
        format!("[{server_name}]") // an IPv6 literal
    } else {
        server_name.to_owned()
    };
    if port == 443 {
        host
    } else {
        format!("{host}:{port}")
    }
}

async fn write_all<W: AsyncWrite + Unpin>(io: &mut W, bytes: &[u8]) -> Result<(), ClientError> {
    io.write_all(bytes)
        .await
        .map_err(|e| from_io(e, "sending the HTTP request"))?;
    io.flush()
        .await
        .map_err(|e| from_io(e, "sending the HTTP request"))
}

/// A parsed HTTP response head.
struct Head {
    status: u16,
    len: usize,
    accept: Option<String>,
    content_length: Option<u64>,
}

/// Reads until `buf` holds a whole response head (at most 8 KiB).
async fn read_head<R: AsyncRead + Unpin>(
    io: &mut R,
    buf: &mut BytesMut,
) -> Result<Head, ClientError> {
    loop {
        match http::parse_response_head(buf) {
            Ok(Some((status, len, accept, content_length))) => {
                return Ok(Head {
                    status,
                    len,
                    accept,
                    content_length,
                });
            }
            Ok(None) => {}
            Err(e) => return Err(ClientError::BadHandshake(e.to_string())),
        }
        if buf.len() >= MAX_RESPONSE_HEAD {
            return Err(ClientError::BadHandshake(format!(
                "response head longer than {MAX_RESPONSE_HEAD} bytes"
            )));
        }
        buf.reserve(1024);
        let n = io
            .read_buf(buf)
            .await
            .map_err(|e| from_io(e, "gateway aborted TLS while answering the HTTP request"))?;
        if n == 0 {
            return Err(ClientError::BadHandshake(format!(
                "gateway closed the connection after {} bytes, before the end of the response head",
                buf.len()
            )));
        }
    }
}

/// The body after `head`: `Content-Length` bytes, or everything up to the
/// end of the connection. Longer than `limit` is an error.
async fn read_body<R: AsyncRead + Unpin>(
    io: &mut R,
    buf: &mut BytesMut,
    head: &Head,
    limit: usize,
) -> Result<Vec<u8>, ClientError> {
    buf.advance(head.len);
    match head.content_length {
        Some(len) => {
            let len = usize::try_from(len)
                .ok()
                .filter(|&l| l <= limit)
                .ok_or_else(|| {
                    ClientError::BadHandshake(format!(
                        "response body of {len} bytes exceeds the {limit}-byte limit"
                    ))
                })?;
            while buf.len() < len {
                buf.reserve(len - buf.len());
                let n = io
                    .read_buf(buf)
                    .await
                    .map_err(|e| from_io(e, "reading the HTTP response body"))?;
                if n == 0 {
                    return Err(ClientError::Io(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        format!(
                            "gateway closed the connection after {} of {len} body bytes",
                            buf.len()
                        ),
                    )));
                }
            }
            buf.truncate(len);
        }
        None => loop {
            if buf.len() > limit {
                return Err(ClientError::BadHandshake(format!(
                    "response body exceeds the {limit}-byte limit"
                )));
            }
            buf.reserve(4096);
            match io.read_buf(buf).await {
                Ok(0) => break,
                Ok(_) => {}
                // Without Content-Length the end of the connection ends the
                // body, whether or not the gateway sent close_notify.
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
                Err(e) => return Err(from_io(e, "reading the HTTP response body")),
            }
        },
    }
    Ok(buf.to_vec())
}

/// The start of a refusal's body, best-effort: whatever arrived by `deadline`
/// or before an error, at most `limit` bytes. The status is what matters; the
/// body only explains it.
async fn read_body_lossy<R: AsyncRead + Unpin>(
    io: &mut R,
    buf: &mut BytesMut,
    head: &Head,
    limit: usize,
    deadline: Instant,
) -> Vec<u8> {
    buf.advance(head.len);
    let want = head.content_length.map_or(limit, |len| {
        usize::try_from(len).unwrap_or(limit).min(limit)
    });
    let _ = timeout_at(deadline, async {
        while buf.len() < want {
            buf.reserve(want - buf.len());
            match io.read_buf(buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    buf.truncate(want);
    buf.to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_header_adds_port_and_brackets() {
        assert_eq!(host_header("gw.example.com", 443), "gw.example.com");
        assert_eq!(host_header("gw.example.com", 8443), "gw.example.com:8443");
        assert_eq!(host_header("::1", 8443), "[::1]:8443");
    }

    #[test]
    fn retry_after_reads_seconds_only() {
        let head = |v: &str| format!("HTTP/1.1 429 Too Many Requests\r\nRetry-After: {v}\r\n\r\n");
        assert_eq!(
            retry_after(head("30").as_bytes()),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            retry_after(head("Wed, 21 Oct 2015 07:28:00 GMT").as_bytes()),
            None
        );
        assert_eq!(retry_after(b"HTTP/1.1 429 Too Many Requests\r\n\r\n"), None);
    }

    #[test]
    fn websocket_keys_are_16_bytes_and_differ() {
        let a = websocket_key();
        let b = websocket_key();
        assert_eq!(a.len(), 24);
        assert_ne!(a, b);
    }
}
