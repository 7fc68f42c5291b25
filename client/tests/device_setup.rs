//! A device's first steps against in-test peers: DNS discovery against a
//! tiny UDP DNS responder, first contact and the fingerprint check against
//! TLS servers presenting good, broken and stolen chains, and enrollment
//! against a scripted enrollment endpoint that checks the CSR and issues a
//! certificate.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::{Pki, SERVER_NAME, serve_one};
use devgate_client::{ClientError, FirstContact, ResolverConfigChoice};
use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::TXT;
use hickory_proto::rr::{RData, Record, RecordType};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use rustls::ServerConfig;
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, UdpSocket};
use tokio::task::JoinHandle;
use x509_parser::prelude::FromDer as _;

// ---------------------------------------------------------------------------
// DNS discovery

/// Answers TXT queries from `zone` (lower-case owner name with trailing dot →
/// records, each a list of strings); other names get NXDOMAIN. Runs until
/// the test ends.
async fn dns_server(zone: HashMap<&'static str, Vec<Vec<&'static str>>>) -> SocketAddr {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = [0u8; 1500];
        loop {
            let (n, peer) = socket.recv_from(&mut buf).await.unwrap();
            let Ok(query) = Message::from_vec(&buf[..n]) else {
                continue;
            };
            let mut answer = Message::new(query.metadata.id, MessageType::Response, OpCode::Query);
            answer.metadata.recursion_desired = query.metadata.recursion_desired;
            answer.metadata.recursion_available = true;
            answer.metadata.authoritative = true;
            answer.add_queries(query.queries.iter().cloned());
            let q = &query.queries[0];
            let owner = q.name().to_ascii().to_ascii_lowercase();
            match zone.get(owner.as_str()) {
                Some(records) if q.query_type() == RecordType::TXT => {
                    for strings in records {
                        let txt = TXT::new(strings.iter().map(|s| (*s).to_owned()).collect());
                        answer.add_answer(Record::from_rdata(
                            q.name().clone(),
                            60,
                            RData::TXT(txt),
                        ));
                    }
                }
                Some(_) => {} // NOERROR, no data
                None => answer.metadata.response_code = ResponseCode::NXDomain,
            }
            socket
                .send_to(&answer.to_vec().unwrap(), peer)
                .await
                .unwrap();
        }
    });
    addr
}

#[tokio::test]
async fn discovery_reads_joins_and_picks_the_first_devgate_url() {
    let ns = dns_server(HashMap::from([
        (
            "_devgate.example.com.",
            vec![
                vec!["v=spf1 -all"],
                // One value split over two strings.
                vec!["https://gw.exa", "mple.com:9443/devgate"],
                vec!["https://second.example.com"],
            ],
        ),
        ("_devgate.plain.test.", vec![vec!["wss://[::1]"]]),
    ]))
    .await;
    let choice = ResolverConfigChoice::Nameserver(ns);

    let found = devgate_client::discover("Alice@Example.COM", &choice)
        .await
        .unwrap();
    assert_eq!(found.host, "gw.example.com");
    assert_eq!(found.port, 9443);
    assert_eq!(found.url, "https://gw.example.com:9443/devgate");

    let found = devgate_client::discover("plain.test", &choice)
        .await
        .unwrap();
    assert_eq!((found.host.as_str(), found.port), ("::1", 8443));
    assert_eq!(devgate_client::DEFAULT_GATEWAY_PORT, 8443);
}

#[tokio::test]
async fn discovery_failures_say_what_is_wrong() {
    let ns = dns_server(HashMap::from([
        (
            "_devgate.broken.test.",
            vec![vec!["http://gw.broken.test"], vec!["hello"]],
        ),
        ("_devgate.empty.test.", vec![]),
    ]))
    .await;
    let choice = ResolverConfigChoice::Nameserver(ns);
    let discovery_error = |r: Result<devgate_client::Discovered, ClientError>| match r {
        Err(ClientError::Discovery(msg)) => msg,
        other => panic!("expected a discovery error, got {other:?}"),
    };

    let msg = discovery_error(devgate_client::discover("bob@nowhere.test", &choice).await);
    assert!(
        msg.contains("nowhere.test publishes no devgate gateway"),
        "{msg}"
    );
    assert!(msg.contains("_devgate.nowhere.test."), "{msg}");

    let msg = discovery_error(devgate_client::discover("empty.test", &choice).await);
    assert!(msg.contains("publishes no devgate gateway"), "{msg}");

    let msg = discovery_error(devgate_client::discover("carol@broken.test", &choice).await);
    assert!(msg.contains("not a devgate gateway URL"), "{msg}");
    assert!(msg.contains("http://gw.broken.test"), "{msg}");

    // Refused before any DNS traffic.
    let msg = discovery_error(devgate_client::discover("dave@", &choice).await);
    assert!(msg.contains("user@example.com"), "{msg}");
}

// ---------------------------------------------------------------------------
// First contact

/// A CA (for issuing) and its certificate.
fn ca(name: &str) -> (CertificateDer<'static>, Issuer<'static, KeyPair>) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    let cert = params.self_signed(&key).unwrap().der().clone();
    (cert, Issuer::new(params, key))
}

/// A server leaf for `SERVER_NAME` issued by `issuer`.
fn server_leaf(issuer: &Issuer<'_, KeyPair>) -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec![SERVER_NAME.to_owned()])
        .unwrap()
        .signed_by(&key, issuer)
        .unwrap();
    (
        cert.der().clone(),
        PrivateKeyDer::Pkcs8(key.serialize_der().into()),
    )
}

/// Serves `key` (chain and signing key, not checked against each other).
#[derive(Debug)]
struct Fixed(Arc<CertifiedKey>);

impl ResolvesServerCert for Fixed {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.0))
    }
}

/// A server config presenting `chain` and signing with `key`, which need
/// not belong together; with `client_ca`, a client certificate from it is
/// required.
fn server_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    versions: &[&'static rustls::SupportedProtocolVersion],
    client_ca: Option<CertificateDer<'static>>,
) -> Arc<ServerConfig> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let signing = provider.key_provider.load_private_key(key).unwrap();
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(versions)
        .unwrap();
    let builder = match client_ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(ca).unwrap();
            builder.with_client_cert_verifier(
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                    .build()
                    .unwrap(),
            )
        }
        None => builder.with_no_client_auth(),
    };
    let mut config =
        builder.with_cert_resolver(Arc::new(Fixed(Arc::new(CertifiedKey::new(chain, signing)))));
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

/// Accepts one TLS connection and holds it briefly; never reads a request.
async fn tls_server(config: Arc<ServerConfig>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let stream = tokio_rustls::TlsAcceptor::from(config).accept(tcp).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        drop(stream);
    });
    addr
}

const FIRST_CONTACT_TIMEOUT: Duration = Duration::from_secs(5);

#[tokio::test]
async fn first_contact_confirm_then_trust_the_root() {
    let pki = Pki::new();
    let (addr, _server) = serve_one(pki.server_tls(false), |_| async {}).await;
    let contact = devgate_client::fetch_gateway_root(addr, SERVER_NAME, FIRST_CONTACT_TIMEOUT)
        .await
        .unwrap();
    assert_eq!(contact.chain, pki.server_chain);
    assert_eq!(contact.root, pki.ca);
    assert_eq!(contact.fingerprint, devgate_pki::fingerprint(&pki.ca));
    assert_eq!(contact.server_name, SERVER_NAME);

    let hidden = FirstContact::random_hidden_group();
    let groups: Vec<&str> = contact.fingerprint.split(' ').collect();
    let challenge = contact.challenge(hidden);
    assert_eq!(challenge.split(' ').nth(hidden), Some("????????????????"));
    assert_eq!(challenge.matches(groups[(hidden + 1) % 4]).count(), 1);

    let other = (hidden + 1) % 4;
    if groups[other] != groups[hidden] {
        let err = contact.confirm(hidden, groups[other]).unwrap_err();
        assert!(
            matches!(&err, ClientError::Fingerprint(m) if m.contains("do not connect")),
            "{err:?}"
        );
    }
    let typed = format!(" {} ", groups[hidden].to_ascii_lowercase());
    let anchors = contact.confirm(hidden, &typed).unwrap();
    assert_eq!(anchors, vec![pki.ca.clone()]);

    // From now on the root is the device's trust anchor.
    let (addr, _server) = serve_one(pki.server_tls(false), |c| async move {
        c.respond(200, "OK", b"trusted").await;
    })
    .await;
    let tls = devgate_client::tls_config(&anchors, None).unwrap();
    let (status, body) = devgate_client::http_get(addr, SERVER_NAME, tls, "/")
        .await
        .unwrap();
    assert_eq!((status, body.as_slice()), (200, &b"trusted"[..]));
}

#[tokio::test]
async fn confirm_refuses_a_chain_that_does_not_verify_against_its_root() {
    let (_ca_a, issuer_a) = ca("CA A");
    let (ca_b, _issuer_b) = ca("CA B");
    let (leaf, key) = server_leaf(&issuer_a);
    // The leaf is A's, but the gateway shows B as its root.
    let addr = tls_server(server_config(
        vec![leaf, ca_b.clone()],
        key,
        rustls::ALL_VERSIONS,
        None,
    ))
    .await;
    let contact = devgate_client::fetch_gateway_root(addr, SERVER_NAME, FIRST_CONTACT_TIMEOUT)
        .await
        .unwrap();
    assert_eq!(contact.root, ca_b);
    let group = contact.fingerprint.split(' ').next().unwrap().to_owned();
    let err = contact.confirm(0, &group).unwrap_err();
    assert!(
        matches!(&err, ClientError::Tls(m) if m.contains("does not verify against its own root")),
        "{err:?}"
    );

    // A good chain, but for another name than the one contacted.
    let pki = Pki::new();
    let (addr, _server) = serve_one(pki.server_tls(false), |_| async {}).await;
    let contact = devgate_client::fetch_gateway_root(addr, "other.test", FIRST_CONTACT_TIMEOUT)
        .await
        .unwrap();
    let group = contact.fingerprint.split(' ').nth(3).unwrap().to_owned();
    let err = contact.confirm(3, &group).unwrap_err();
    assert!(matches!(err, ClientError::Tls(_)), "{err:?}");
}

#[tokio::test]
async fn a_stolen_chain_without_its_key_is_refused_on_tls12_and_tls13() {
    let pki = Pki::new();
    let wrong_key = PrivateKeyDer::Pkcs8(KeyPair::generate().unwrap().serialize_der().into());
    for version in [&rustls::version::TLS12, &rustls::version::TLS13] {
        let addr = tls_server(server_config(
            pki.server_chain.clone(),
            wrong_key.clone_key(),
            &[version],
            None,
        ))
        .await;
        let err = devgate_client::fetch_gateway_root(addr, SERVER_NAME, FIRST_CONTACT_TIMEOUT)
            .await
            .unwrap_err();
        assert!(
            matches!(&err, ClientError::Tls(m) if m.to_lowercase().contains("signature")),
            "{version:?}: {err:?}"
        );
    }
}

#[tokio::test]
async fn first_contact_works_when_the_gateway_demands_a_client_certificate() {
    let pki = Pki::new();
    let (ca_cert, issuer) = ca("gw root");
    let (leaf, key) = server_leaf(&issuer);
    for version in [&rustls::version::TLS12, &rustls::version::TLS13] {
        let addr = tls_server(server_config(
            vec![leaf.clone(), ca_cert.clone()],
            key.clone_key(),
            &[version],
            Some(pki.ca.clone()),
        ))
        .await;
        let contact = devgate_client::fetch_gateway_root(addr, SERVER_NAME, FIRST_CONTACT_TIMEOUT)
            .await
            .unwrap();
        assert_eq!(contact.root, ca_cert, "{version:?}");
    }
}

#[tokio::test]
async fn first_contact_times_out_on_a_silent_peer() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let _hold = tokio::spawn(async move {
        let conn = listener.accept().await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        drop(conn);
    });
    let err = devgate_client::fetch_gateway_root(addr, SERVER_NAME, Duration::from_millis(200))
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::Timeout(_)), "{err:?}");
}

// ---------------------------------------------------------------------------
// Enrollment

const UNIT: &str = "unit-0042";
const ENROLL_KEY: &str = "K3Y-0042";

/// What the in-test enrollment endpoint saw.
#[derive(Debug)]
struct Seen {
    method: String,
    path: String,
    unit_id: String,
    csr_cn: String,
}

/// Serves one enrollment request: checks the CSR (signature and subject)
/// and answers with `answer(csr params, request JSON)`.
async fn enroll_server<F>(pki: &Pki, answer: F) -> (SocketAddr, JoinHandle<Result<Seen, String>>)
where
    F: FnOnce(rcgen::CertificateSigningRequestParams, &serde_json::Value) -> Vec<u8>
        + Send
        + 'static,
{
    serve_one(pki.server_tls(false), |mut c| async move {
        let body = c.read_body().await;
        let request: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let csr_pem = request["csr"].as_str().unwrap();
        let csr_der = rustls_pki_types::pem::PemObject::from_pem_slice(csr_pem.as_bytes())
            .map(|d: rustls_pki_types::CertificateSigningRequestDer<'_>| d.as_ref().to_vec())
            .unwrap();
        let (_, parsed) =
            x509_parser::certification_request::X509CertificationRequest::from_der(&csr_der)
                .unwrap();
        parsed.verify_signature().unwrap();
        let csr_cn = parsed
            .certification_request_info
            .subject
            .iter_common_name()
            .next()
            .unwrap()
            .as_str()
            .unwrap()
            .to_owned();
        let params = rcgen::CertificateSigningRequestParams::from_pem(csr_pem).unwrap();
        let response = answer(params, &request);
        let seen = Seen {
            method: c.method.clone(),
            path: c.path.clone(),
            unit_id: request["unit_id"].as_str().unwrap().to_owned(),
            csr_cn,
        };
        c.write(&response).await;
        seen
    })
    .await
}

fn json_response(status: &str, extra: &str, body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\n{extra}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

#[tokio::test]
async fn enrollment_issues_a_certificate_that_works_for_mutual_tls() {
    let pki = Pki::new();
    let (device_ca, device_issuer) = ca("devgate device CA");
    let device_ca_pem = pem(&device_ca);
    let (addr, server) = enroll_server(&pki, move |params, request| {
        assert_eq!(request["key"], ENROLL_KEY);
        let cert = params.signed_by(&device_issuer).unwrap();
        let chain = format!("{}{device_ca_pem}", cert.pem());
        json_response(
            "200 OK",
            "",
            &serde_json::json!({ "certificate_chain": chain }).to_string(),
        )
    })
    .await;
    let enrolled = devgate_client::enroll(
        addr,
        SERVER_NAME,
        std::slice::from_ref(&pki.ca),
        UNIT,
        ENROLL_KEY,
    )
    .await
    .unwrap();
    let seen = server.await.unwrap().unwrap();
    assert_eq!(seen.method, "POST");
    assert_eq!(seen.path, devgate_client::ENROLL_PATH);
    assert_eq!(seen.unit_id, UNIT);
    assert_eq!(seen.csr_cn, UNIT);

    assert_eq!(enrolled.chain.len(), 2);
    assert_eq!(enrolled.chain[1], device_ca);
    assert_eq!(
        devgate_client::certs_from_pem(enrolled.chain_pem.as_bytes()).unwrap(),
        enrolled.chain
    );
    assert!(enrolled.key_pem.starts_with("-----BEGIN PRIVATE KEY-----"));
    assert_eq!(
        devgate_client::key_from_pem(enrolled.key_pem.as_bytes())
            .unwrap()
            .secret_der(),
        enrolled.key.secret_der()
    );
    assert!(!format!("{enrolled:?}").contains("PRIVATE"));

    // The identity passes a gateway that requires device certificates.
    let mtls = server_config(
        pki.server_chain.clone(),
        pki.server_key(),
        rustls::ALL_VERSIONS,
        Some(device_ca.clone()),
    );
    let (addr, server) = serve_one(mtls, |c| async move {
        let presented = c.stream.get_ref().1.peer_certificates().map(<[_]>::to_vec);
        c.respond(200, "OK", b"hello device").await;
        presented
    })
    .await;
    let tls = devgate_client::tls_config(std::slice::from_ref(&pki.ca), Some(enrolled.identity()))
        .unwrap();
    let (status, body) = devgate_client::http_get(addr, SERVER_NAME, tls, "/")
        .await
        .unwrap();
    assert_eq!((status, body.as_slice()), (200, &b"hello device"[..]));
    assert_eq!(server.await.unwrap().unwrap(), Some(enrolled.chain.clone()));
}

#[tokio::test]
async fn enrollment_refusals_map_to_their_errors() {
    let pki = Pki::new();
    let roots = std::slice::from_ref(&pki.ca);
    type Expected = fn(&ClientError) -> bool;
    let cases: Vec<(Vec<u8>, Expected)> = vec![
        (
            json_response("401 Unauthorized", "", r#"{"error":"enrollment refused"}"#),
            |e| matches!(e, ClientError::EnrollmentRefused),
        ),
        (
            json_response(
                "429 Too Many Requests",
                "Retry-After: 30\r\n",
                r#"{"error":"too many attempts; retry later"}"#,
            ),
            |e| matches!(e, ClientError::RateLimited { retry_after: Some(d) } if *d == Duration::from_secs(30)),
        ),
        (json_response("429 Too Many Requests", "", "{}"), |e| {
            matches!(e, ClientError::RateLimited { retry_after: None })
        }),
        (
            json_response("400 Bad Request", "", r#"{"error":"csr is not PEM"}"#),
            |e| matches!(e, ClientError::Refused { status: 400, body } if body.contains("csr is not PEM")),
        ),
        (
            json_response("200 OK", "", r#"{"certificate_chain":"garbage"}"#),
            |e| matches!(e, ClientError::Protocol(_)),
        ),
        (
            json_response("200 OK", "", &"x".repeat(70 * 1024)),
            |e| matches!(e, ClientError::BadHandshake(m) if m.contains("limit")),
        ),
    ];
    for (response, expected) in cases {
        let (addr, server) = enroll_server(&pki, move |_, _| response).await;
        let err = devgate_client::enroll(addr, SERVER_NAME, roots, UNIT, ENROLL_KEY)
            .await
            .unwrap_err();
        assert!(expected(&err), "{err:?}");
        server.await.unwrap().unwrap();
    }

    // A certificate for a key the device did not generate.
    let (_, issuer) = ca("device CA");
    let (addr, _server) = enroll_server(&pki, move |_, _| {
        let stranger = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, UNIT);
        let cert = params.signed_by(&stranger, &issuer).unwrap();
        json_response(
            "200 OK",
            "",
            &serde_json::json!({ "certificate_chain": cert.pem() }).to_string(),
        )
    })
    .await;
    let err = devgate_client::enroll(addr, SERVER_NAME, roots, UNIT, ENROLL_KEY)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ClientError::Protocol(m) if m.contains("not for the key")),
        "{err:?}"
    );

    // A gateway the device does not trust never sees the key.
    let other = Pki::new();
    let (addr, server) = serve_one(pki.server_tls(false), |_| async {}).await;
    let err = devgate_client::enroll(
        addr,
        SERVER_NAME,
        std::slice::from_ref(&other.ca),
        UNIT,
        ENROLL_KEY,
    )
    .await
    .unwrap_err();
    assert!(matches!(err, ClientError::Tls(_)), "{err:?}");
    assert!(server.await.unwrap().is_err());
}

#[tokio::test]
async fn http_post_sends_content_type_length_and_body() {
    let pki = Pki::new();
    let (addr, server) = serve_one(pki.server_tls(false), |mut c| async move {
        let body = c.read_body().await;
        let got = (c.method.clone(), c.path.clone(), body);
        c.respond(201, "Created", b"made").await;
        got
    })
    .await;
    let (status, body) = devgate_client::http_post(
        addr,
        SERVER_NAME,
        pki.client_tls(),
        "/things",
        "application/json",
        br#"{"a":1}"#,
    )
    .await
    .unwrap();
    assert_eq!((status, body.as_slice()), (201, &b"made"[..]));
    let (method, path, sent) = server.await.unwrap().unwrap();
    assert_eq!((method.as_str(), path.as_str()), ("POST", "/things"));
    assert_eq!(sent, br#"{"a":1}"#);

    let err = devgate_client::http_post(
        addr,
        SERVER_NAME,
        pki.client_tls(),
        "/",
        "text/plain\r\nX-Evil: 1",
        b"",
    )
    .await
    .unwrap_err();
    assert!(matches!(err, ClientError::Config(_)), "{err:?}");
}

fn pem(cert: &CertificateDer<'_>) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(cert);
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap());
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}
