use super::*;

fn gw() -> SocketAddr {
    "192.0.2.10:8443".parse().unwrap()
}

#[test]
fn parses_proxy_urls() {
    let p = Proxy::parse("http://proxy.corp.example:3128").unwrap();
    assert_eq!(p.to_string(), "proxy.corp.example:3128");
    assert_eq!(p.user, None);
    let p = Proxy::parse("proxy:8080/").unwrap();
    assert_eq!(p.to_string(), "proxy:8080");
    assert_eq!(Proxy::parse("http://proxy").unwrap().port, 80);
    let p = Proxy::parse("http://[::1]:3128").unwrap();
    assert_eq!(p.to_string(), "[::1]:3128");
    let p = Proxy::parse("HTTP://al%40ice:p%3Ass@127.0.0.1:3128").unwrap();
    assert_eq!(p.user.as_deref(), Some("al@ice"));
    // base64("al@ice:p:ss")
    assert_eq!(p.authorization.as_deref(), Some("Basic YWxAaWNlOnA6c3M="));
}

#[test]
fn refuses_bad_proxy_urls_without_showing_the_password() {
    for url in [
        "https://u:secret@proxy:3128",
        "socks5://proxy:1080",
        "http://proxy:port",
        "http://proxy:3128/path",
        "http://:3128",
        "http://u:secret%zz@proxy:3128",
    ] {
        let e = Proxy::parse(url).unwrap_err().to_string();
        assert!(e.contains("expected http://"), "{url}: {e}");
        assert!(!e.contains("secret"), "{url}: {e}");
    }
    let debug = format!("{:?}", Proxy::parse("http://u:secret@p:1").unwrap());
    assert!(!debug.contains("secret"), "{debug}");
}

#[test]
fn connect_request_names_the_address_and_carries_credentials() {
    let p = Proxy::parse("http://alice:pw@proxy:3128").unwrap();
    let req = String::from_utf8(p.connect_request(gw())).unwrap();
    assert_eq!(
        req,
        "CONNECT 192.0.2.10:8443 HTTP/1.1\r\nHost: 192.0.2.10:8443\r\nUser-Agent: devgate-client\r\n\
         Proxy-Authorization: Basic YWxpY2U6cHc=\r\n\r\n"
    );
    let v6: SocketAddr = "[2001:db8::1]:443".parse().unwrap();
    let req = Proxy::parse("proxy:1").unwrap().connect_request(v6);
    assert!(req.starts_with(b"CONNECT [2001:db8::1]:443 HTTP/1.1\r\n"));
    assert!(!String::from_utf8_lossy(&req).contains("Proxy-Authorization"));
}

fn answer(proxy: &str, bytes: &[u8]) -> Result<Option<()>, ClientError> {
    parse_connect_response(bytes, &Proxy::parse(proxy).unwrap(), gw())
}

#[test]
fn tunnel_opens_on_2xx_in_any_split() {
    let ok = b"HTTP/1.0 200 Connection established\r\nProxy-agent: tinyproxy/1.11.1\r\n\r\n";
    for cut in 0..ok.len() {
        assert!(answer("p:1", &ok[..cut]).unwrap().is_none(), "cut {cut}");
    }
    assert_eq!(answer("p:1", ok).unwrap(), Some(()));
}

#[test]
fn refusals_say_what_the_proxy_answered() {
    let msg = |proxy: &str, head: &str| answer(proxy, head.as_bytes()).unwrap_err().to_string();
    let e = msg("p:1", "HTTP/1.1 407 Proxy Authentication Required\r\n\r\n");
    assert!(
        e.contains("requires authentication") && e.contains("407"),
        "{e}"
    );
    let e = msg(
        "http://bob:x@p:1",
        "HTTP/1.1 407 Proxy Authentication Required\r\n\r\n",
    );
    assert!(
        e.contains("rejected the credentials of user \"bob\""),
        "{e}"
    );
    let e = msg("http://bob:x@p:1", "HTTP/1.0 401 Unauthorized\r\n\r\n");
    assert!(
        e.contains("rejected the credentials") && e.contains("401"),
        "{e}"
    );
    let e = msg("p:1", "HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n");
    assert!(
        e.contains("refused to connect to the gateway at 192.0.2.10:8443"),
        "{e}"
    );
    assert!(e.contains("HTTP 403 Forbidden"), "{e}");
    let e = msg("p:1", "HTTP/1.1 502 Bad Gateway\r\n\r\n");
    assert!(e.contains("could not reach the gateway"), "{e}");
    let e = msg("p:1", "SSH-2.0-OpenSSH_9.2\r\n");
    assert!(e.contains("is it an HTTP proxy?"), "{e}");
    let e = msg("p:1", "HTTP/1.1 200 OK\r\n\r\n\x16\x03\x01");
    assert!(e.contains("3 bytes after its answer"), "{e}");
}

#[test]
fn response_head_is_bounded() {
    let mut long = b"HTTP/1.1 200 OK\r\nX-Padding: ".to_vec();
    long.resize(MAX_RESPONSE_HEAD, b'a');
    let e = answer("p:1", &long).unwrap_err().to_string();
    assert!(e.contains("longer than 8192 bytes"), "{e}");
}

#[test]
fn no_proxy_matches_hosts_suffixes_ips_and_nets() {
    let ip = |s: &str| Some(s.parse::<IpAddr>().unwrap());
    let n = NoProxy::parse(
        "localhost, .corp.example ,*.lab.example, 10.0.0.0/8, ::1, gw.example:9000, bogus/x",
    );
    assert!(n.matches("localhost", 443, None));
    assert!(n.matches("gw.corp.example", 443, None));
    assert!(n.matches("corp.example", 443, None));
    assert!(!n.matches("notcorp.example", 443, None));
    assert!(n.matches("a.lab.example.", 443, None));
    assert!(n.matches("gw.example.com", 443, ip("10.1.2.3")));
    assert!(!n.matches("gw.example.com", 443, ip("11.1.2.3")));
    assert!(n.matches("::1", 443, None));
    assert!(n.matches("[::1]", 443, None));
    assert!(n.matches("gw.example", 9000, None));
    assert!(!n.matches("gw.example", 8443, None));
    assert!(NoProxy::parse("*").matches("anything", 1, None));
    assert!(!NoProxy::parse("").matches("anything", 1, None));
    assert!(NoProxy::parse("127.0.0.0/8").matches("gw", 1, ip("127.0.0.1")));
    assert!(NoProxy::parse("0.0.0.0/0").matches("gw", 1, ip("8.8.8.8")));
    assert!(!NoProxy::parse("0.0.0.0/0").matches("gw", 1, ip("::1")));
}

#[test]
fn environment_values_pick_the_proxy_or_bypass_it() {
    let pick = |proxy: Option<&str>, no: Option<&str>| {
        Proxy::from_vars(proxy, no, "gw.example.com", gw()).unwrap()
    };
    assert_eq!(pick(None, None), None);
    assert_eq!(pick(Some(" "), None), None);
    assert_eq!(
        pick(Some("http://p:3128"), Some("other.example")).map(|p| p.to_string()),
        Some("p:3128".to_owned())
    );
    assert_eq!(pick(Some("http://p:3128"), Some("example.com")), None);
    assert_eq!(pick(Some("http://p:3128"), Some("192.0.2.0/24")), None);
    let e = Proxy::from_vars(Some("ftp://p"), None, "gw", gw()).unwrap_err();
    assert!(e.to_string().contains("HTTPS_PROXY"), "{e}");
}

#[test]
fn an_explicit_proxy_is_used_unless_no_proxy_lists_the_gateway() {
    let pick =
        |no: Option<&str>| Proxy::select_vars("http://u:pw@p:3128", no, "gw.example.com", gw());
    assert_eq!(
        pick(None).unwrap().map(|p| p.to_string()),
        Some("p:3128".to_owned())
    );
    assert_eq!(pick(Some("gw.example.com")).unwrap(), None);
    let e = Proxy::select_vars("socks5://p", None, "gw", gw()).unwrap_err();
    assert!(e.to_string().contains("the proxy setting"), "{e}");
}
