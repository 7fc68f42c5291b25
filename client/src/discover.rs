//! Finding the gateway from an e-mail address or domain through DNS.
//!
//! A domain that runs a devgate gateway publishes its URL in a TXT record on
//! `_devgate.<domain>`, for example
//!
//! ```text
//! _devgate.example.com. 3600 IN TXT "https://gw.example.com:8443"
//! ```
//!
//! so a person setting up a device only types their e-mail address. The URL's
//! scheme is `https` or `wss`; its port defaults to [`DEFAULT_GATEWAY_PORT`];
//! a path is allowed and ignored. The record only says *where* the gateway
//! is: trust in it comes from the first-contact fingerprint check
//! ([`fetch_gateway_root`](crate::fetch_gateway_root)), never from DNS.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::net::NetError;
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::RData;
use hickory_resolver::{Resolver, TokioResolver};

use crate::ClientError;

/// The gateway port when the discovered URL names none.
pub const DEFAULT_GATEWAY_PORT: u16 = 8443;
/// The label in front of the domain that holds the TXT record.
const DISCOVERY_LABEL: &str = "_devgate";
/// Limit on the whole lookup (the resolver retries within it).
const DISCOVERY_TIMEOUT: Duration = Duration::from_secs(15);
/// Per-query timeout of the resolver.
const QUERY_TIMEOUT: Duration = Duration::from_secs(4);

/// Which DNS server [`discover`] asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResolverConfigChoice {
    /// The system's resolvers (`/etc/resolv.conf` on Unix).
    System,
    /// This server only, over UDP (and TCP for truncated answers); for tests
    /// and for networks whose resolver the system does not know.
    Nameserver(SocketAddr),
}

/// Where [`discover`] found the gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Discovered {
    /// Host name or IP address (an IPv6 address without brackets): what to
    /// resolve and connect to, and the TLS server name.
    pub host: String,
    /// The TLS port ([`DEFAULT_GATEWAY_PORT`] when the URL names none).
    pub port: u16,
    /// The URL as published.
    pub url: String,
}

/// Looks up the gateway of `email_or_domain` (`user@example.com` or
/// `example.com`): the TXT record of `_devgate.example.com`, whose value is
/// a URL `https://host[:port][/path]` or `wss://…`.
///
/// The strings of one record are joined (a long value may be split into
/// several strings); of several records the first that is a devgate URL is
/// taken. Every failure is a [`ClientError::Discovery`] saying what to do,
/// except running out of time ([`ClientError::Timeout`]).
pub async fn discover(
    email_or_domain: &str,
    resolver: &ResolverConfigChoice,
) -> Result<Discovered, ClientError> {
    let domain = domain_of(email_or_domain)?;
    let name = format!("{DISCOVERY_LABEL}.{domain}.");
    let resolver = build_resolver(resolver)?;
    let lookup = tokio::time::timeout(DISCOVERY_TIMEOUT, resolver.txt_lookup(name.as_str()))
        .await
        .map_err(|_| ClientError::Timeout("DNS lookup of the gateway's TXT record"))?
        .map_err(|e| lookup_error(&name, &domain, &e))?;

    let mut first_problem = None;
    for record in lookup.answers() {
        let RData::TXT(txt) = &record.data else {
            continue; // e.g. a CNAME on the way
        };
        let value: Vec<u8> = txt
            .txt_data
            .iter()
            .flat_map(|s| s.iter().copied())
            .collect();
        match parse_gateway_url(&value) {
            Ok(found) => return Ok(found),
            Err(why) => {
                first_problem
                    .get_or_insert_with(|| format!("{:?}: {why}", String::from_utf8_lossy(&value)));
            }
        }
    }
    Err(ClientError::Discovery(match first_problem {
        Some(problem) => format!(
            "the TXT record of {name} is not a devgate gateway URL ({problem}); it should be \
             like \"https://gw.{domain}:{DEFAULT_GATEWAY_PORT}\": ask the administrator of \
             {domain} to fix it, or enter the gateway address by hand"
        ),
        None => no_record(&name, &domain),
    }))
}

fn build_resolver(choice: &ResolverConfigChoice) -> Result<TokioResolver, ClientError> {
    let mut builder = match choice {
        ResolverConfigChoice::System => Resolver::builder_tokio().map_err(|e| {
            ClientError::Discovery(format!(
                "cannot read the system's DNS configuration: {e}; configure a DNS server \
                 (/etc/resolv.conf) or name one explicitly"
            ))
        })?,
        ResolverConfigChoice::Nameserver(addr) => {
            let mut udp = ConnectionConfig::udp();
            udp.port = addr.port();
            let mut tcp = ConnectionConfig::tcp();
            tcp.port = addr.port();
            let server = NameServerConfig::new(addr.ip(), true, vec![udp, tcp]);
            Resolver::builder_with_config(
                ResolverConfig::from_name_servers(vec![server]),
                TokioRuntimeProvider::default(),
            )
        }
    };
    let opts: &mut ResolverOpts = builder.options_mut();
    opts.timeout = QUERY_TIMEOUT;
    // One lookup per process: a cache would only hold memory.
    opts.cache_size = 0;
    builder
        .build()
        .map_err(|e| ClientError::Discovery(format!("cannot set up the DNS resolver: {e}")))
}

fn no_record(name: &str, domain: &str) -> String {
    format!(
        "{domain} publishes no devgate gateway (no TXT record at {name}): check the spelling, \
         or enter the gateway address by hand"
    )
}

fn lookup_error(name: &str, domain: &str, e: &NetError) -> ClientError {
    if e.is_nx_domain() || e.is_no_records_found() {
        ClientError::Discovery(no_record(name, domain))
    } else {
        ClientError::Discovery(format!(
            "DNS lookup of the TXT record {name} failed: {e}; check the network and DNS \
             settings, or enter the gateway address by hand"
        ))
    }
}

/// The domain of an e-mail address (after the last `@`) or of a bare
/// domain, lower-cased and without a trailing dot.
fn domain_of(input: &str) -> Result<String, ClientError> {
    let input = input.trim();
    let bad = |why: &str| {
        ClientError::Discovery(format!(
            "{input:?} is not an e-mail address or domain ({why}); type it like \
             \"user@example.com\" or \"example.com\""
        ))
    };
    let domain = match input.rsplit_once('@') {
        Some(("", _)) => return Err(bad("nothing before the @")),
        Some((_, domain)) => domain,
        None => input,
    };
    let domain = domain.strip_suffix('.').unwrap_or(domain);
    if domain.is_empty() {
        return Err(bad("no domain"));
    }
    if !domain.is_ascii() {
        return Err(bad(
            "international domain names must be given in their xn-- form",
        ));
    }
    if domain.len() > 240 {
        return Err(bad("domain too long"));
    }
    for label in domain.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(bad("empty or over-long label"));
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            || label.starts_with('-')
            || label.ends_with('-')
        {
            return Err(bad(
                "a domain has only letters, digits, dots and inner hyphens",
            ));
        }
    }
    Ok(domain.to_ascii_lowercase())
}

/// Parses a TXT value `https://host[:port][/path]` (or `wss://`).
fn parse_gateway_url(value: &[u8]) -> Result<Discovered, String> {
    let url = std::str::from_utf8(value)
        .map_err(|_| "not UTF-8".to_owned())?
        .trim();
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| "not a URL".to_owned())?;
    if !scheme.eq_ignore_ascii_case("https") && !scheme.eq_ignore_ascii_case("wss") {
        return Err(format!(
            "scheme {scheme:?} is neither \"https\" nor \"wss\""
        ));
    }
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    if authority.contains('@') {
        return Err("user information in the URL is not allowed".to_owned());
    }
    let (host, port) = if let Some(bracketed) = authority.strip_prefix('[') {
        let (ip, after) = bracketed
            .split_once(']')
            .ok_or_else(|| "unclosed [ in the host".to_owned())?;
        let ip: Ipv6Addr = ip
            .parse()
            .map_err(|_| format!("{ip:?} is not an IPv6 address"))?;
        let port = match after {
            "" => None,
            p => Some(
                p.strip_prefix(':')
                    .ok_or_else(|| format!("unexpected {p:?} after the host"))?,
            ),
        };
        (ip.to_string(), port)
    } else {
        let (host, port) = match authority.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        };
        if host.is_empty() {
            return Err("no host".to_owned());
        }
        if host.parse::<IpAddr>().is_err() && domain_of(host).is_err() {
            return Err(format!("{host:?} is not a host name or IP address"));
        }
        (host.to_ascii_lowercase(), port)
    };
    let port = match port {
        None => DEFAULT_GATEWAY_PORT,
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|&p| p != 0)
            .ok_or_else(|| format!("{p:?} is not a port number"))?,
    };
    Ok(Discovered {
        host,
        port,
        url: url.to_owned(),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn parsed(v: &str) -> (String, u16) {
        match parse_gateway_url(v.as_bytes()) {
            Ok(d) => (d.host, d.port),
            Err(e) => panic!("{v:?}: {e}"),
        }
    }

    #[test]
    fn urls_parse_with_default_port() {
        assert_eq!(
            parsed("https://gw.example.com"),
            ("gw.example.com".into(), 8443)
        );
        assert_eq!(
            parsed(" wss://GW.example.com:9443/v1 "),
            ("gw.example.com".into(), 9443)
        );
        assert_eq!(parsed("https://10.0.0.1:443"), ("10.0.0.1".into(), 443));
        assert_eq!(parsed("https://[::1]:8443/x"), ("::1".into(), 8443));
        assert_eq!(
            parsed("HTTPS://[2001:db8::1]"),
            ("2001:db8::1".into(), 8443)
        );
        assert_eq!(
            parsed("https://gw.example.com?x=1"),
            ("gw.example.com".into(), 8443)
        );
    }

    #[test]
    fn non_devgate_values_are_refused() {
        for bad in [
            "v=spf1 -all",
            "http://gw.example.com",
            "https://",
            "https://:8443",
            "https://gw.example.com:0",
            "https://gw.example.com:99999",
            "https://gw.example.com:x",
            "https://user@gw.example.com",
            "https://gw_bad.example.com",
            "https://[::1",
            "https://[nope]:1",
            "https://[::1]x",
        ] {
            assert!(parse_gateway_url(bad.as_bytes()).is_err(), "{bad:?}");
        }
        assert!(parse_gateway_url(b"https://gw\xff").is_err());
    }

    #[test]
    fn domains_come_from_addresses() {
        let d = |s: &str| domain_of(s).map_err(|e| e.to_string());
        assert_eq!(d("alice@Example.COM").unwrap(), "example.com");
        assert_eq!(d("example.com.").unwrap(), "example.com");
        assert_eq!(d("a@b@corp.example").unwrap(), "corp.example");
        for bad in [
            "",
            "@example.com",
            "alice@",
            "a..b",
            "-a.com",
            "ex ample.com",
            "bücher.de",
        ] {
            let err = d(bad).unwrap_err();
            assert!(err.contains("user@example.com"), "{bad:?}: {err}");
        }
    }
}
