//! The client against a scripted in-test TLS WebSocket server.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{Msg, Pki, SERVER_NAME, device_opts, serve_one, ws_bytes};
use devgate_client::{Body, ClientError, Frame, Incoming, Role};
use devgate_proto::http;
use devgate_proto::ws::Opcode;

fn expect_frame(incoming: Incoming) -> devgate_client::Received {
    match incoming {
        Incoming::Frame(r) => r,
        other => panic!("expected a frame, got {other:?}"),
    }
}

#[tokio::test]
async fn upgrade_roundtrip_batch_and_close() {
    let pki = Pki::new();
    let (addr, server) = serve_one(pki.server_tls(false), |mut c| async move {
        assert_eq!(c.path, "/v1/device");
        c.accept_upgrade().await;
        c.echo_until_close().await
    })
    .await;

    let mut conn = devgate_client::connect(&device_opts(addr), pki.client_tls())
        .await
        .unwrap();
    assert!(conn.protocol_version().is_some());
    assert!(conn.cipher_suite().is_some());
    assert_eq!(conn.alpn_protocol(), Some(&b"http/1.1"[..]));
    assert_eq!(conn.peer_certificates().unwrap().len(), 2);

    let cmd = Frame::command("unit-1", 7, b"reboot");
    conn.send(&cmd).await.unwrap();
    let got = expect_frame(conn.recv().await.unwrap());
    assert_eq!(got.frame(), cmd);

    let batch = [
        Frame::event("", b"temp=21"),
        Frame::response("", 9, b"ok"),
        Frame::stream_data("", 3, &[0u8; 5000]),
    ];
    conn.send_batch(&batch).await.unwrap();
    for want in &batch {
        let got = expect_frame(conn.recv().await.unwrap());
        assert_eq!(&got.frame(), want);
    }

    conn.close(1000, "bye").await.unwrap();
    assert_eq!(server.await.unwrap().unwrap(), Some(1000));
}

#[tokio::test]
async fn manager_role_uses_manager_path() {
    let pki = Pki::new();
    let (addr, server) = serve_one(pki.server_tls(false), |mut c| async move {
        c.accept_upgrade().await;
        c.echo_until_close().await;
        c.path
    })
    .await;
    let opts = devgate_client::ConnectOptions::new(addr, SERVER_NAME, Role::Manager);
    let conn = devgate_client::connect(&opts, pki.client_tls())
        .await
        .unwrap();
    conn.close(1000, "").await.unwrap();
    assert_eq!(server.await.unwrap().unwrap(), "/v1/manager");
}

#[tokio::test]
async fn bytes_after_the_101_head_are_kept() {
    let pki = Pki::new();
    let (addr, server) = serve_one(pki.server_tls(false), |mut c| async move {
        // The 101 head and the first frame in one TLS record.
        let mut out = http::switching_protocols(c.key.as_deref().unwrap());
        out.extend(ws_bytes(&Frame::command("", 1, b"first")));
        c.write(&out).await;
        c.echo_until_close().await
    })
    .await;
    let mut conn = devgate_client::connect(&device_opts(addr), pki.client_tls())
        .await
        .unwrap();
    let got = expect_frame(
        conn.recv_timeout(Duration::from_secs(2))
            .await
            .unwrap()
            .unwrap(),
    );
    assert_eq!(got.frame(), Frame::command("", 1, b"first"));
    conn.close(1000, "").await.unwrap();
    server.await.unwrap().unwrap();
}

#[tokio::test]
async fn pings_are_answered_until_auto_pong_is_off() {
    let pki = Pki::new();
    let (addr, server) = serve_one(pki.server_tls(false), |mut c| async move {
        c.accept_upgrade().await;
        c.send(Opcode::Ping, b"one").await;
        c.send_frame(&Frame::event("", b"after-ping")).await;
        assert_eq!(c.recv().await, Some(Msg::Pong(b"one".to_vec())));

        // The client turns auto-pong off and tells us with a frame.
        assert!(matches!(c.recv().await, Some(Msg::Binary(_))));
        c.send(Opcode::Ping, b"two").await;
        c.send_frame(&Frame::event("", b"after-silent-ping")).await;
        // Next from the client must be its "done" frame, not a pong.
        let next = c.recv().await;
        let Some(Msg::Binary(done)) = next else {
            panic!("expected the client's frame, got {next:?}");
        };
        assert_eq!(
            Frame::decode(&done).unwrap(),
            Frame::event("", b"done"),
            "a pong was sent with auto-pong off"
        );
        c.echo_until_close().await
    })
    .await;

    let mut conn = devgate_client::connect(&device_opts(addr), pki.client_tls())
        .await
        .unwrap();
    let got = expect_frame(conn.recv().await.unwrap());
    assert_eq!(got.frame(), Frame::event("", b"after-ping"));

    conn.set_auto_pong(false);
    conn.send(&Frame::event("", b"silent")).await.unwrap();
    let got = expect_frame(conn.recv().await.unwrap());
    assert_eq!(got.frame(), Frame::event("", b"after-silent-ping"));
    conn.send(&Frame::event("", b"done")).await.unwrap();
    conn.close(1000, "").await.unwrap();
    server.await.unwrap().unwrap();
}

#[tokio::test]
async fn gateway_close_is_answered_and_reported_once() {
    let pki = Pki::new();
    let (addr, server) = serve_one(pki.server_tls(false), |mut c| async move {
        c.accept_upgrade().await;
        c.send_close(4001, "kicked: duplicate unit").await;
        c.recv_within(Duration::from_secs(2)).await
    })
    .await;
    let mut conn = devgate_client::connect(&device_opts(addr), pki.client_tls())
        .await
        .unwrap();
    match conn.recv().await.unwrap() {
        Incoming::Closed { code, reason } => {
            assert_eq!(code, Some(4001));
            assert_eq!(reason, "kicked: duplicate unit");
        }
        other => panic!("expected Closed, got {other:?}"),
    }
    assert!(matches!(
        conn.recv().await,
        Err(ClientError::Closed {
            code: Some(4001),
            ..
        })
    ));
    assert!(matches!(
        conn.send(&Frame::event("", b"late")).await,
        Err(ClientError::Closed { .. })
    ));
    assert_eq!(
        server.await.unwrap().unwrap(),
        Some(Msg::Close(Some(4001), String::new()))
    );
    conn.close(1000, "").await.unwrap();
}

#[tokio::test]
async fn refusal_surfaces_status_and_body() {
    let pki = Pki::new();
    let (addr, server) = serve_one(pki.server_tls(false), |c| async move {
        c.respond(403, "Forbidden", b"device certificate revoked")
            .await;
    })
    .await;
    match devgate_client::connect(&device_opts(addr), pki.client_tls()).await {
        Err(ClientError::Refused { status, body }) => {
            assert_eq!(status, 403);
            assert_eq!(body, "device certificate revoked");
        }
        other => panic!("expected Refused, got {other:?}"),
    }
    server.await.unwrap().unwrap();
}

#[tokio::test]
async fn wrong_accept_key_is_a_bad_handshake() {
    let pki = Pki::new();
    let (addr, server) = serve_one(pki.server_tls(false), |mut c| async move {
        c.write(&http::switching_protocols("not-the-clients-key"))
            .await;
    })
    .await;
    let err = devgate_client::connect(&device_opts(addr), pki.client_tls())
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::BadHandshake(_)), "{err}");
    server.await.unwrap().unwrap();
}

#[tokio::test]
async fn untrusted_gateway_certificate_fails_the_handshake() {
    let pki = Pki::new();
    let other = Pki::new();
    let (addr, _server) = serve_one(pki.server_tls(false), |_c| async {}).await;
    let err = devgate_client::connect(&device_opts(addr), other.client_tls())
        .await
        .unwrap_err();
    let ClientError::Tls(reason) = &err else {
        panic!("expected a TLS error, got {err:?}");
    };
    assert!(reason.contains("handshake with gw.test"), "{reason}");
    // (Both test CAs share a name, so rustls finds the issuer and rejects
    // the signature.)
    assert!(reason.contains("invalid peer certificate"), "{reason}");
}

#[tokio::test]
async fn client_certificate_is_presented_and_its_absence_is_a_tls_error() {
    let pki = Pki::new();
    let (addr, server) = serve_one(pki.server_tls(true), |mut c| async move {
        let certs = c.stream.get_ref().1.peer_certificates().map(<[_]>::len);
        c.accept_upgrade().await;
        c.echo_until_close().await;
        certs
    })
    .await;
    let tls =
        devgate_client::tls_config(std::slice::from_ref(&pki.ca), Some(pki.client_identity()))
            .unwrap();
    let conn = devgate_client::connect(&device_opts(addr), tls)
        .await
        .unwrap();
    conn.close(1000, "").await.unwrap();
    assert_eq!(server.await.unwrap().unwrap(), Some(1));

    // Without a certificate: under TLS 1.3 the client finishes its side of
    // the handshake first and learns of the rejection from the alert that
    // answers its upgrade request; either way it is a TLS error.
    let (addr, _server) = serve_one(pki.server_tls(true), |_c| async {}).await;
    let err = devgate_client::connect(&device_opts(addr), pki.client_tls())
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::Tls(_)), "{err:?}");
}

#[tokio::test]
async fn single_version_and_single_suite_configs() {
    let pki = Pki::new();
    let roots = std::slice::from_ref(&pki.ca);
    let cases = [
        (
            &rustls::version::TLS12,
            rustls::crypto::aws_lc_rs::cipher_suite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
            rustls::ProtocolVersion::TLSv1_2,
        ),
        (
            &rustls::version::TLS13,
            rustls::crypto::aws_lc_rs::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
            rustls::ProtocolVersion::TLSv1_3,
        ),
    ];
    for (version, suite, want) in cases {
        let (addr, server) = serve_one(pki.server_tls(false), |mut c| async move {
            c.accept_upgrade().await;
            c.echo_until_close().await
        })
        .await;
        let tls =
            devgate_client::tls_config_with(roots, None, &[version], Some(vec![suite])).unwrap();
        let conn = devgate_client::connect(&device_opts(addr), tls)
            .await
            .unwrap();
        assert_eq!(conn.protocol_version(), Some(want));
        assert_eq!(conn.cipher_suite(), Some(suite));
        conn.close(1000, "").await.unwrap();
        server.await.unwrap().unwrap();
    }

    // A TLS 1.3 suite with a TLS 1.2-only config is unusable.
    let err = devgate_client::tls_config_with(
        roots,
        None,
        &[&rustls::version::TLS12],
        Some(vec![
            rustls::crypto::aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256,
        ]),
    )
    .unwrap_err();
    assert!(matches!(err, ClientError::Config(_)), "{err}");
}

#[tokio::test]
async fn connect_timeout_names_the_phase() {
    // Accepts TCP and never speaks TLS.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let _hold = tokio::spawn(async move {
        let (_socket, _) = listener.accept().await.unwrap();
        tokio::time::sleep(Duration::from_secs(5)).await;
    });
    let mut opts = device_opts(addr);
    opts.connect_timeout = Duration::from_millis(300);
    let err = devgate_client::connect(&opts, Pki::new().client_tls())
        .await
        .unwrap_err();
    assert!(
        matches!(err, ClientError::Timeout(phase) if phase.contains("TLS")),
        "{err:?}"
    );
}

#[tokio::test]
async fn source_address_is_bound() {
    let pki = Pki::new();
    let (addr, server) = serve_one(pki.server_tls(false), |mut c| async move {
        c.accept_upgrade().await;
        c.echo_until_close().await;
        c.peer.ip()
    })
    .await;
    let mut opts = device_opts(addr);
    let source = "127.0.0.2".parse().unwrap();
    opts.bind = Some(source);
    let conn = devgate_client::connect(&opts, pki.client_tls())
        .await
        .unwrap();
    assert_eq!(conn.local_addr().unwrap().ip(), source);
    conn.close(1000, "").await.unwrap();
    assert_eq!(server.await.unwrap().unwrap(), source);
}

#[tokio::test]
async fn split_halves_work_concurrently_and_keep_answering_pings() {
    const N: u32 = 400;
    const PING_EVERY: u32 = 40;
    let pki = Pki::new();
    let (addr, server) = serve_one(pki.server_tls(false), |mut c| async move {
        c.accept_upgrade().await;
        let (mut echoed, mut pongs) = (0u32, 0u32);
        while let Some(msg) = c.recv().await {
            match msg {
                Msg::Binary(p) => {
                    if echoed % PING_EVERY == 0 {
                        c.send(Opcode::Ping, &echoed.to_be_bytes()).await;
                    }
                    c.send(Opcode::Binary, &p).await;
                    echoed += 1;
                }
                Msg::Pong(_) => pongs += 1,
                Msg::Close(code, _) => {
                    c.send_close(code.unwrap(), "").await;
                    break;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        (echoed, pongs)
    })
    .await;

    let conn = devgate_client::connect(&device_opts(addr), pki.client_tls())
        .await
        .unwrap();
    let (sender, mut receiver) = conn.split();
    // Two clones send interleaved: even ids and odd ids.
    let mut tasks = Vec::new();
    for parity in 0..2u32 {
        let sender = sender.clone();
        tasks.push(tokio::spawn(async move {
            for id in (0..N).filter(|i| i % 2 == parity) {
                sender
                    .send(&Frame::command("unit-x", id, &id.to_le_bytes()))
                    .await
                    .unwrap();
            }
        }));
    }
    let mut last = [None::<u32>; 2];
    for _ in 0..N {
        let got = expect_frame(receiver.recv().await.unwrap());
        let frame = got.frame();
        let Body::Command { payload } = frame.body else {
            panic!("unexpected {frame:?}");
        };
        assert_eq!(payload, frame.id.to_le_bytes());
        // Each sender's frames stay in order.
        let slot = &mut last[(frame.id % 2) as usize];
        assert!(slot.is_none_or(|prev| prev < frame.id));
        *slot = Some(frame.id);
    }
    for t in tasks {
        t.await.unwrap();
    }
    sender.close(1000, "done").await.unwrap();
    assert!(matches!(
        receiver.recv().await.unwrap(),
        Incoming::Closed {
            code: Some(1000),
            ..
        }
    ));
    assert!(matches!(
        sender.send(&Frame::event("", b"late")).await,
        Err(ClientError::ClosedLocally { code: 1000 })
    ));
    // RFC 6455 lets a busy endpoint answer only the latest of several pings,
    // so with the senders contending for the writer some pongs may merge.
    let (echoed, pongs) = server.await.unwrap().unwrap();
    assert_eq!(echoed, N);
    assert!((1..=N / PING_EVERY).contains(&pongs), "{pongs} pongs");
}

#[tokio::test]
async fn recv_is_cancel_safe_while_a_frame_dribbles_in() {
    let pki = Pki::new();
    let payload: Vec<u8> = (0..=255u8).cycle().take(300).collect();
    let frames = [
        ws_bytes(&Frame::stream_data("", 5, &payload)),
        ws_bytes(&Frame::event("", b"second")),
    ];
    let wire: Vec<u8> = frames.concat();
    let (addr, server) = serve_one(pki.server_tls(false), |mut c| async move {
        c.accept_upgrade().await;
        // One byte per TLS record, with pauses, so the client's reads are
        // cut short again and again.
        for (i, byte) in wire.iter().enumerate() {
            c.write(std::slice::from_ref(byte)).await;
            if i % 4 == 0 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        c.echo_until_close().await
    })
    .await;

    let mut conn = devgate_client::connect(&device_opts(addr), pki.client_tls())
        .await
        .unwrap();
    let mut received = Vec::new();
    let mut cancelled = 0u32;
    while received.len() < 2 {
        tokio::select! {
            r = conn.recv() => received.push(expect_frame(r.unwrap())),
            () = tokio::time::sleep(Duration::from_micros(200)) => cancelled += 1,
        }
    }
    assert!(cancelled > 10, "recv was cancelled only {cancelled} times");
    assert_eq!(
        received[0].frame(),
        Frame::stream_data("", 5, &payload),
        "frame torn by cancellation"
    );
    assert_eq!(received[1].frame(), Frame::event("", b"second"));
    // Nothing else is pending.
    assert!(
        conn.recv_timeout(Duration::from_millis(50))
            .await
            .unwrap()
            .is_none()
    );
    conn.close(1000, "").await.unwrap();
    server.await.unwrap().unwrap();
}

#[tokio::test]
async fn text_and_undecodable_messages_are_errors_the_stream_survives() {
    let pki = Pki::new();
    let (addr, server) = serve_one(pki.server_tls(false), |mut c| async move {
        c.accept_upgrade().await;
        c.send(Opcode::Text, b"{\"hello\":1}").await;
        c.send(Opcode::Binary, &[0xff, 0x00]).await;
        c.send_frame(&Frame::event("", b"fine")).await;
        c.echo_until_close().await
    })
    .await;
    let mut conn = devgate_client::connect(&device_opts(addr), pki.client_tls())
        .await
        .unwrap();
    let err = conn.recv().await.unwrap_err();
    assert!(matches!(err, ClientError::Protocol(_)), "{err:?}");
    let err = conn.recv().await.unwrap_err();
    assert!(matches!(err, ClientError::Frame(_)), "{err:?}");
    let got = expect_frame(conn.recv().await.unwrap());
    assert_eq!(got.frame(), Frame::event("", b"fine"));
    conn.close(1000, "").await.unwrap();
    server.await.unwrap().unwrap();
}

#[tokio::test]
async fn broken_framing_is_an_error_and_answered_with_1002() {
    let pki = Pki::new();
    let (addr, server) = serve_one(pki.server_tls(false), |mut c| async move {
        c.accept_upgrade().await;
        // A masked frame: servers must not mask.
        let mut out = Vec::new();
        devgate_proto::ws::encode_frame(&mut out, Opcode::Binary, b"x", Some([1, 2, 3, 4]));
        c.write(&out).await;
        c.recv_within(Duration::from_secs(2)).await
    })
    .await;
    let mut conn = devgate_client::connect(&device_opts(addr), pki.client_tls())
        .await
        .unwrap();
    let err = conn.recv().await.unwrap_err();
    assert!(matches!(err, ClientError::Ws(_)), "{err:?}");
    assert!(conn.recv().await.is_err());
    let got = server.await.unwrap().unwrap();
    assert!(
        matches!(got, Some(Msg::Close(Some(1002), _))),
        "server got {got:?}"
    );
}

#[tokio::test]
async fn large_messages_arrive_and_oversized_ones_are_refused() {
    let pki = Pki::new();
    let big: Vec<u8> = (0..700_000u32).map(|i| (i % 251) as u8).collect();
    let big2 = big.clone();
    let (addr, server) = serve_one(pki.server_tls(false), |mut c| async move {
        c.accept_upgrade().await;
        c.send_frame(&Frame::stream_data("", 1, &big2)).await;
        c.echo_until_close().await
    })
    .await;
    let mut conn = devgate_client::connect(&device_opts(addr), pki.client_tls())
        .await
        .unwrap();
    let got = expect_frame(conn.recv().await.unwrap());
    assert_eq!(got.frame(), Frame::stream_data("", 1, &big));
    conn.close(1000, "").await.unwrap();
    server.await.unwrap().unwrap();

    let (addr, _server) = serve_one(pki.server_tls(false), |mut c| async move {
        c.accept_upgrade().await;
        c.send_frame(&Frame::stream_data("", 1, &[7u8; 5000])).await;
        c.recv_within(Duration::from_secs(2)).await
    })
    .await;
    let mut opts = device_opts(addr);
    opts.max_message = 4096;
    let mut conn = devgate_client::connect(&opts, pki.client_tls())
        .await
        .unwrap();
    let err = conn.recv().await.unwrap_err();
    assert!(
        matches!(
            err,
            ClientError::Ws(devgate_proto::ws::WsError::MessageTooBig { .. })
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn http_get_returns_status_and_body() {
    let pki = Pki::new();
    let (addr, server) = serve_one(pki.server_tls(false), |c| async move {
        let path = c.path.clone();
        c.respond(200, "OK", br#"{"status":"ok"}"#).await;
        path
    })
    .await;
    let (status, body) =
        devgate_client::http_get(addr, SERVER_NAME, pki.client_tls(), "/usg/check-status")
            .await
            .unwrap();
    assert_eq!(status, 200);
    assert_eq!(body, br#"{"status":"ok"}"#);
    assert_eq!(server.await.unwrap().unwrap(), "/usg/check-status");
}

#[tokio::test]
async fn close_without_an_answer_times_out_after_two_seconds() {
    let pki = Pki::new();
    let (addr, server) = serve_one(pki.server_tls(false), |mut c| async move {
        c.accept_upgrade().await;
        let got = c.recv().await;
        // Hold the connection open without answering.
        tokio::time::sleep(Duration::from_secs(3)).await;
        got
    })
    .await;
    let conn = devgate_client::connect(&device_opts(addr), pki.client_tls())
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let err = conn.close(1001, "going away").await.unwrap_err();
    assert!(matches!(err, ClientError::Timeout(_)), "{err:?}");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(1900) && waited < Duration::from_secs(3),
        "{waited:?}"
    );
    assert_eq!(
        server.await.unwrap().unwrap(),
        Some(Msg::Close(Some(1001), "going away".to_owned()))
    );
}

#[test]
fn pem_helpers_read_certificates_and_keys() {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["gw.test".to_owned()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let pem = format!("{}{}", cert.pem(), cert.pem());
    let certs = devgate_client::certs_from_pem(pem.as_bytes()).unwrap();
    assert_eq!(certs.len(), 2);
    assert_eq!(&certs[0], cert.der());
    devgate_client::key_from_pem(key.serialize_pem().as_bytes()).unwrap();
    assert!(matches!(
        devgate_client::certs_from_pem(b"nothing here"),
        Err(ClientError::Config(_))
    ));
    assert!(matches!(
        devgate_client::key_from_pem(b"nothing here"),
        Err(ClientError::Config(_))
    ));
}

/// The load generator drives connections from spawned tasks: every future
/// and handle must be `Send`.
#[allow(dead_code)]
fn futures_and_handles_are_send(
    opts: &devgate_client::ConnectOptions,
    tls: std::sync::Arc<rustls::ClientConfig>,
    conn: &mut devgate_client::Connection,
    sender: &devgate_client::Sender,
    receiver: &mut devgate_client::Receiver,
    frame: &Frame<'_>,
) {
    fn is_send<T: Send>(_: T) {}
    fn is_send_sync<T: Send + Sync>() {}
    is_send_sync::<devgate_client::Connection>();
    is_send_sync::<devgate_client::Sender>();
    is_send_sync::<devgate_client::Receiver>();
    is_send_sync::<devgate_client::Received>();
    is_send_sync::<ClientError>();
    is_send(devgate_client::connect(opts, tls.clone()));
    is_send(devgate_client::http_get(opts.addr, "x", tls.clone(), "/"));
    is_send(devgate_client::http_post(
        opts.addr,
        "x",
        tls,
        "/",
        "text/plain",
        b"",
    ));
    is_send(devgate_client::discover(
        "a@b.test",
        &devgate_client::ResolverConfigChoice::System,
    ));
    is_send(devgate_client::fetch_gateway_root(
        opts.addr,
        "x",
        std::time::Duration::from_secs(1),
    ));
    is_send(devgate_client::enroll(opts.addr, "x", &[], "u", "k"));
    is_send_sync::<devgate_client::FirstContact>();
    is_send_sync::<devgate_client::Enrolled>();
    is_send(conn.recv());
    is_send(conn.send(frame));
    is_send(sender.send(frame));
    is_send(receiver.recv());
}
