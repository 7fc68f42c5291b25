//! HTTP CONNECT proxies: corporate networks often let devices and management servers out
//! only through one. [`Proxy`] is a proxy URL (`http://[user:pass@]host:port`), [`NoProxy`]
//! the `NO_PROXY` list of destinations that bypass it, and [`Proxy::from_env`] reads both
//! from the environment the way curl does, so that a program can honour them.
//!
//! The CONNECT exchange itself is sans-IO ([`Proxy::connect_request`],
//! [`parse_connect_response`]); [`tunnel`] is the thin async part around it. Once the proxy
//! answers 200, the socket is a byte pipe to the gateway and TLS runs through it unchanged
//! (the proxy sees only the CONNECT line, never the devgate traffic).

use std::fmt;
use std::net::{IpAddr, SocketAddr};

use base64::Engine as _;
use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::{ClientError, MAX_RESPONSE_HEAD};

/// An HTTP proxy that tunnels with `CONNECT`, from a URL `http://[user:pass@]host[:port]`
/// (port 80 when left out; user and password may be percent-encoded).
#[derive(Clone, PartialEq, Eq)]
pub struct Proxy {
    host: String,
    port: u16,
    /// The user name, kept for error messages.
    user: Option<String>,
    /// `Proxy-Authorization` value (`Basic base64(user:pass)`).
    authorization: Option<String>,
}

impl fmt::Debug for Proxy {
    /// Never prints the password.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Proxy")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

impl fmt::Display for Proxy {
    /// `host:port`, without credentials.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl Proxy {
    /// Parses `http://[user:pass@]host[:port][/]`; a URL without a scheme is taken as
    /// `http://` (as curl does for `HTTPS_PROXY=proxy:3128`).
    pub fn parse(url: &str) -> Result<Self, ClientError> {
        let bad = |why: &str| {
            ClientError::Config(format!(
                "proxy URL {:?}: {why}; expected http://[user:pass@]host:port",
                redact(url)
            ))
        };
        let url = url.trim();
        let rest = match url.split_once("://") {
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("http") => rest,
            Some((scheme, _)) => {
                return Err(bad(&format!(
                    "scheme {scheme:?} is not supported (only plain http:// proxies that \
                     tunnel with CONNECT)"
                )));
            }
            None => url,
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.contains('/') || rest.contains('?') || rest.contains('#') {
            return Err(bad("a proxy URL has no path"));
        }
        let (userinfo, hostport) = match rest.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, rest),
        };
        let (host, port) = split_host_port(hostport).ok_or_else(|| bad("no valid host:port"))?;
        if host.is_empty() {
            return Err(bad("the host is empty"));
        }
        let (user, authorization) = match userinfo {
            None => (None, None),
            Some(info) => {
                let (user, pass) = info.split_once(':').unwrap_or((info, ""));
                let user = percent_decode(user).ok_or_else(|| bad("bad %-escape in the user"))?;
                let pass =
                    percent_decode(pass).ok_or_else(|| bad("bad %-escape in the password"))?;
                let token = base64::engine::general_purpose::STANDARD
                    .encode(format!("{user}:{pass}").as_bytes());
                (Some(user), Some(format!("Basic {token}")))
            }
        };
        Ok(Self {
            host: host.to_ascii_lowercase(),
            port: port.unwrap_or(80),
            user,
            authorization,
        })
    }

    /// The proxy to use for the gateway `server_name` at `addr` according to the
    /// environment: `https_proxy` or `HTTPS_PROXY` (the lower-case one wins, as in curl),
    /// unless `no_proxy` or `NO_PROXY` lists the gateway. `None`: connect directly.
    pub fn from_env(server_name: &str, addr: SocketAddr) -> Result<Option<Self>, ClientError> {
        Self::from_vars(
            env_var("https_proxy", "HTTPS_PROXY").as_deref(),
            env_var("no_proxy", "NO_PROXY").as_deref(),
            server_name,
            addr,
        )
    }

    /// [`Proxy::from_env`] with the two variables' values given.
    pub fn from_vars(
        https_proxy: Option<&str>,
        no_proxy: Option<&str>,
        server_name: &str,
        addr: SocketAddr,
    ) -> Result<Option<Self>, ClientError> {
        Self::chosen(https_proxy, "HTTPS_PROXY", no_proxy, server_name, addr)
    }

    /// The proxy for a program that has a proxy setting of its own (a `--proxy` flag, a
    /// configuration key): `explicit` when given, else `HTTPS_PROXY` as in
    /// [`Proxy::from_env`]. `NO_PROXY` bypasses either for the gateways it lists, as it
    /// does curl's `-x`: one environment can then name the gateways reached directly.
    pub fn select(
        explicit: Option<&str>,
        server_name: &str,
        addr: SocketAddr,
    ) -> Result<Option<Self>, ClientError> {
        match explicit.map(str::trim).filter(|u| !u.is_empty()) {
            None => Self::from_env(server_name, addr),
            Some(url) => Self::select_vars(
                url,
                env_var("no_proxy", "NO_PROXY").as_deref(),
                server_name,
                addr,
            ),
        }
    }

    /// [`Proxy::select`] for an explicit proxy, with `NO_PROXY`'s value given.
    pub fn select_vars(
        explicit: &str,
        no_proxy: Option<&str>,
        server_name: &str,
        addr: SocketAddr,
    ) -> Result<Option<Self>, ClientError> {
        Self::chosen(
            Some(explicit),
            "the proxy setting",
            no_proxy,
            server_name,
            addr,
        )
    }

    /// `url` (named `source` in errors) unless `no_proxy` lists the gateway.
    fn chosen(
        url: Option<&str>,
        source: &str,
        no_proxy: Option<&str>,
        server_name: &str,
        addr: SocketAddr,
    ) -> Result<Option<Self>, ClientError> {
        let Some(url) = url.map(str::trim).filter(|u| !u.is_empty()) else {
            return Ok(None);
        };
        let proxy = Self::parse(url).map_err(|e| match e {
            ClientError::Config(m) => ClientError::Config(format!("{source}: {m}")),
            other => other,
        })?;
        let bypass = no_proxy.map(NoProxy::parse).unwrap_or_default();
        if bypass.matches(server_name, addr.port(), Some(addr.ip())) {
            return Ok(None);
        }
        Ok(Some(proxy))
    }

    /// The `CONNECT` request for a tunnel to `target`. The target is the gateway's
    /// address, not its name: the client has resolved it already, and the proxy need not
    /// be able to.
    pub fn connect_request(&self, target: SocketAddr) -> Vec<u8> {
        let mut req = format!(
            "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\nUser-Agent: devgate-client\r\n"
        );
        if let Some(auth) = &self.authorization {
            req.push_str("Proxy-Authorization: ");
            req.push_str(auth);
            req.push_str("\r\n");
        }
        req.push_str("\r\n");
        req.into_bytes()
    }
}

/// An environment variable by its lower-case name, else its upper-case one (the lower-case
/// one wins, as in curl); empty counts as unset for the lower-case one.
fn env_var(lower: &str, upper: &str) -> Option<String> {
    std::env::var(lower)
        .ok()
        .filter(|v| !v.trim().is_empty())
        .or_else(|| std::env::var(upper).ok())
}

/// The proxy's answer to `CONNECT`, judged from the bytes read so far: `Ok(None)` while
/// the head is incomplete, `Ok(Some(()))` when the tunnel is open, an error naming what
/// the proxy answered otherwise. `proxy` and `target` only fill in the messages.
pub fn parse_connect_response(
    buf: &[u8],
    proxy: &Proxy,
    target: SocketAddr,
) -> Result<Option<()>, ClientError> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    let len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() >= MAX_RESPONSE_HEAD => {
            return Err(ClientError::Proxy(format!(
                "the proxy at {proxy} sent a response head longer than {MAX_RESPONSE_HEAD} bytes"
            )));
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => {
            return Err(ClientError::Proxy(format!(
                "the proxy at {proxy} did not answer CONNECT with HTTP ({e}); is it an HTTP proxy?"
            )));
        }
    };
    let status = resp.code.unwrap_or(0);
    let said = format!(
        "HTTP {status} {}",
        resp.reason
            .unwrap_or("")
            .chars()
            .take(100)
            .collect::<String>()
    );
    let said = said.trim_end();
    match status {
        200..=299 if buf.len() > len => Err(ClientError::Proxy(format!(
            "the proxy at {proxy} sent {} bytes after its answer ({said}) before the \
             gateway could speak; it does not tunnel transparently",
            buf.len() - len
        ))),
        200..=299 => Ok(Some(())),
        // 407 is the proxy's own "authenticate first"; tinyproxy answers CONNECT with 401.
        401 | 407 => Err(ClientError::Proxy(match &proxy.user {
            None => format!(
                "the proxy at {proxy} requires authentication ({said}): give \
                 http://user:pass@host:port"
            ),
            Some(user) => format!(
                "the proxy at {proxy} rejected the credentials of user {user:?} ({said}): \
                 check the user name and password"
            ),
        })),
        502..=504 => Err(ClientError::Proxy(format!(
            "the proxy at {proxy} could not reach the gateway at {target} ({said})"
        ))),
        _ => Err(ClientError::Proxy(format!(
            "the proxy at {proxy} refused to connect to the gateway at {target} ({said})"
        ))),
    }
}

/// Opens a TCP connection to `proxy` (from `bind` when given, preparing the socket with
/// `before_bind`) and a tunnel through it to `target`. Time limits are the caller's.
pub(crate) async fn tunnel(
    proxy: &Proxy,
    target: SocketAddr,
    bind: Option<IpAddr>,
    before_bind: Option<fn(&TcpSocket) -> std::io::Result<()>>,
) -> Result<TcpStream, ClientError> {
    let named = |e: std::io::Error| {
        ClientError::Io(std::io::Error::new(
            e.kind(),
            format!("TCP connect to the HTTP proxy at {proxy}: {e}"),
        ))
    };
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((proxy.host.as_str(), proxy.port))
        .await
        .map_err(|e| {
            ClientError::Config(format!(
                "cannot resolve the HTTP proxy host {:?}: {e}",
                proxy.host
            ))
        })?
        .filter(|a| bind.is_none_or(|ip| ip.is_ipv4() == a.is_ipv4()))
        .collect();
    let mut last = None;
    let mut tcp = None;
    for a in addrs {
        match crate::connect::tcp_connect_with(a, bind, before_bind).await {
            Ok(s) => {
                tcp = Some(s);
                break;
            }
            Err(ClientError::Io(e)) => last = Some(e),
            Err(other) => return Err(other),
        }
    }
    let mut tcp = match (tcp, last) {
        (Some(s), _) => s,
        (None, Some(e)) => {
            return Err(named(std::io::Error::new(
                e.kind(),
                e.to_string()
                    .rsplit_once(": ")
                    .map_or(e.to_string(), |(_, why)| why.to_owned()),
            )));
        }
        (None, None) => {
            return Err(ClientError::Config(format!(
                "the HTTP proxy host {:?} has no address of the right IP family",
                proxy.host
            )));
        }
    };
    tcp.write_all(&proxy.connect_request(target))
        .await
        .map_err(|e| named_io(e, proxy, "sending CONNECT"))?;
    let mut buf = BytesMut::with_capacity(512);
    loop {
        if parse_connect_response(&buf, proxy, target)?.is_some() {
            return Ok(tcp);
        }
        // Read no further than a whole head can be, so the limit holds however the
        // proxy splits its answer.
        let room = MAX_RESPONSE_HEAD.saturating_sub(buf.len()).max(1);
        let mut chunk = vec![0u8; room.min(1024)];
        let n = tcp
            .read(&mut chunk)
            .await
            .map_err(|e| named_io(e, proxy, "reading the answer to CONNECT"))?;
        if n == 0 {
            return Err(ClientError::Proxy(format!(
                "the proxy at {proxy} closed the connection after {} bytes, before answering \
                 CONNECT to {target}",
                buf.len()
            )));
        }
        buf.extend_from_slice(chunk.get(..n).unwrap_or_default());
    }
}

fn named_io(e: std::io::Error, proxy: &Proxy, doing: &str) -> ClientError {
    ClientError::Io(std::io::Error::new(
        e.kind(),
        format!("{doing} to the HTTP proxy at {proxy}: {e}"),
    ))
}

/// Destinations that bypass the proxy: the `NO_PROXY` list, comma-separated. An entry is
/// `*` (everything), a host name (that host and its subdomains; a leading `.` or `*.`
/// changes nothing), an IP address, or a CIDR block (`10.0.0.0/8`, `fd00::/8`), each
/// optionally with `:port` to match that port only.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NoProxy {
    entries: Vec<(Pattern, Option<u16>)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Pattern {
    All,
    Domain(String),
    Net(IpAddr, u8),
}

impl NoProxy {
    /// Parses the list; entries that are none of the forms above are ignored, as other
    /// programs reading the same variable ignore them.
    pub fn parse(list: &str) -> Self {
        let entries = list
            .split(',')
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .filter_map(|e| {
                if e == "*" {
                    return Some((Pattern::All, None));
                }
                if let Some((net, bits)) = e.split_once('/') {
                    let ip: IpAddr = net.trim_matches(['[', ']']).parse().ok()?;
                    let bits: u8 = bits.parse().ok()?;
                    let max = if ip.is_ipv4() { 32 } else { 128 };
                    return (bits <= max).then_some((Pattern::Net(ip, bits), None));
                }
                if let Ok(ip) = e.trim_matches(['[', ']']).parse::<IpAddr>() {
                    return Some((Pattern::Net(ip, if ip.is_ipv4() { 32 } else { 128 }), None));
                }
                let (host, port) = split_host_port(e)?;
                let pattern = match host.parse::<IpAddr>() {
                    Ok(ip) => Pattern::Net(ip, if ip.is_ipv4() { 32 } else { 128 }),
                    Err(_) => {
                        let d = host.trim_start_matches('*').trim_start_matches('.');
                        let d = d.trim_end_matches('.').to_ascii_lowercase();
                        if d.is_empty() {
                            return None;
                        }
                        Pattern::Domain(d)
                    }
                };
                Some((pattern, port))
            })
            .collect();
        Self { entries }
    }

    /// Whether the gateway `host` (its name, or an IP literal) at `port`, resolved to
    /// `ip`, bypasses the proxy.
    pub fn matches(&self, host: &str, port: u16, ip: Option<IpAddr>) -> bool {
        let host = host.trim_matches(['[', ']']).trim_end_matches('.');
        let host = host.to_ascii_lowercase();
        let host_ip = host.parse::<IpAddr>().ok();
        self.entries.iter().any(|(pattern, p)| {
            if p.is_some_and(|p| p != port) {
                return false;
            }
            match pattern {
                Pattern::All => true,
                Pattern::Domain(d) => {
                    host == *d
                        || host
                            .strip_suffix(d.as_str())
                            .is_some_and(|rest| rest.ends_with('.'))
                }
                Pattern::Net(net, bits) => [host_ip, ip]
                    .into_iter()
                    .flatten()
                    .any(|a| in_net(a, *net, *bits)),
            }
        })
    }
}

fn in_net(a: IpAddr, net: IpAddr, bits: u8) -> bool {
    match (a, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(bits)).unwrap_or(0);
            u32::from(a) & mask == u32::from(n) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(n)) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(bits)).unwrap_or(0);
            u128::from(a) & mask == u128::from(n) & mask
        }
        _ => false,
    }
}

/// `host`, `host:port`, `[v6]` or `[v6]:port`; `None` when the port is not a number.
fn split_host_port(s: &str) -> Option<(&str, Option<u16>)> {
    if let Some(rest) = s.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        return match after {
            "" => Some((host, None)),
            p => Some((host, Some(p.strip_prefix(':')?.parse().ok()?))),
        };
    }
    match s.rsplit_once(':') {
        // A bare IPv6 address has several colons and no port.
        Some((h, _)) if h.contains(':') => Some((s, None)),
        Some((h, p)) => Some((h, Some(p.parse().ok()?))),
        None => Some((s, None)),
    }
}

fn percent_decode(s: &str) -> Option<String> {
    let mut out = Vec::with_capacity(s.len());
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        if b == b'%' {
            let hi = char::from(bytes.next()?).to_digit(16)?;
            let lo = char::from(bytes.next()?).to_digit(16)?;
            out.push(u8::try_from(hi * 16 + lo).ok()?);
        } else {
            out.push(b);
        }
    }
    String::from_utf8(out).ok()
}

/// The URL with any password replaced, for error messages.
fn redact(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let prefix = if scheme.is_empty() {
        String::new()
    } else {
        format!("{scheme}://")
    };
    match rest.rsplit_once('@') {
        Some((info, host)) => {
            let user = info.split_once(':').map_or(info, |(u, _)| u);
            format!("{prefix}{user}:***@{host}")
        }
        None => url.to_owned(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
