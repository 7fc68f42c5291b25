//! A small TLS WebSocket server for the client's tests: the real gateway is a
//! separate binary, and these tests need a peer they can script byte by byte
//! (dribble a frame, send a masked frame, refuse the upgrade, …).
//!
//! Certificates are minted per test run with rcgen: a CA, a server leaf for
//! `gw.test`/`localhost`, and a client leaf for mutual-TLS tests.

#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use devgate_client::Frame;
use devgate_proto::frame::encode_ws;
use devgate_proto::http;
use devgate_proto::ws::{self, Decoded, Decoder, Message, Opcode};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use rustls::ServerConfig;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

pub const SERVER_NAME: &str = "gw.test";

/// A CA with a server and a client certificate.
pub struct Pki {
    pub ca: CertificateDer<'static>,
    pub server_chain: Vec<CertificateDer<'static>>,
    server_key_der: Vec<u8>,
    pub client_chain: Vec<CertificateDer<'static>>,
    client_key_der: Vec<u8>,
}

impl Pki {
    pub fn new() -> Self {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "devgate client test CA");
        let ca = ca_params.self_signed(&ca_key).unwrap().der().clone();
        let issuer = Issuer::new(ca_params, ca_key);

        let server_key = KeyPair::generate().unwrap();
        let server = CertificateParams::new(vec![SERVER_NAME.to_owned(), "localhost".to_owned()])
            .unwrap()
            .signed_by(&server_key, &issuer)
            .unwrap();
        let client_key = KeyPair::generate().unwrap();
        let mut client_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        client_params
            .distinguished_name
            .push(DnType::CommonName, "unit-0001");
        let client = client_params.signed_by(&client_key, &issuer).unwrap();
        Self {
            server_chain: vec![server.der().clone(), ca.clone()],
            client_chain: vec![client.der().clone()],
            ca,
            server_key_der: server_key.serialize_der(),
            client_key_der: client_key.serialize_der(),
        }
    }

    pub fn client_identity(&self) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        (
            self.client_chain.clone(),
            PrivateKeyDer::Pkcs8(self.client_key_der.clone().into()),
        )
    }

    pub fn server_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.server_key_der.clone().into())
    }

    pub fn client_tls(&self) -> Arc<rustls::ClientConfig> {
        devgate_client::tls_config(std::slice::from_ref(&self.ca), None).unwrap()
    }

    /// The server's TLS config; with `require_client_cert`, clients must
    /// present a certificate issued by the CA.
    pub fn server_tls(&self, require_client_cert: bool) -> Arc<ServerConfig> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_protocol_versions(rustls::ALL_VERSIONS)
            .unwrap();
        let builder = if require_client_cert {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(self.ca.clone()).unwrap();
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .unwrap();
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        let mut config = builder
            .with_single_cert(
                self.server_chain.clone(),
                PrivateKeyDer::Pkcs8(self.server_key_der.clone().into()),
            )
            .unwrap();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Arc::new(config)
    }
}

/// A decoded message, owned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Msg {
    Binary(Vec<u8>),
    Text(Vec<u8>),
    Ping(Vec<u8>),
    Pong(Vec<u8>),
    Close(Option<u16>, String),
}

/// The server side of one accepted connection, after TLS and after reading
/// the HTTP request head (not yet answered).
pub struct ServerConn {
    pub stream: TlsStream<TcpStream>,
    pub peer: SocketAddr,
    pub method: String,
    pub path: String,
    pub key: Option<String>,
    pub content_length: Option<u64>,
    buf: Vec<u8>,
    decoder: Decoder,
}

impl ServerConn {
    /// The request body (`Content-Length` bytes; empty without one).
    pub async fn read_body(&mut self) -> Vec<u8> {
        let len = usize::try_from(self.content_length.unwrap_or(0)).unwrap();
        while self.buf.len() < len {
            let mut chunk = [0u8; 8192];
            let n = self.stream.read(&mut chunk).await.unwrap();
            assert!(
                n > 0,
                "client closed after {} of {len} body bytes",
                self.buf.len()
            );
            self.buf.extend_from_slice(&chunk[..n]);
        }
        self.buf.drain(..len).collect()
    }

    /// Answers `101 Switching Protocols`.
    pub async fn accept_upgrade(&mut self) {
        let key = self.key.clone().expect("upgrade request without a key");
        self.write(&http::switching_protocols(&key)).await;
    }

    /// Answers with a plain response and closes.
    pub async fn respond(mut self, status: u16, reason: &str, body: &[u8]) {
        self.write(&http::response(
            status,
            reason,
            Some("text/plain"),
            body,
            true,
        ))
        .await;
        let _ = self.stream.shutdown().await;
    }

    pub async fn write(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
        self.stream.flush().await.unwrap();
    }

    pub async fn send(&mut self, opcode: Opcode, payload: &[u8]) {
        let mut out = Vec::new();
        ws::encode_frame(&mut out, opcode, payload, None);
        self.write(&out).await;
    }

    pub async fn send_frame(&mut self, frame: &Frame<'_>) {
        self.write(&ws_bytes(frame)).await;
    }

    pub async fn send_close(&mut self, code: u16, reason: &str) {
        let mut out = Vec::new();
        ws::encode_close(&mut out, code, reason, None);
        self.write(&out).await;
    }

    /// The next message from the client; `None` at end of stream.
    pub async fn recv(&mut self) -> Option<Msg> {
        loop {
            let decoded = self.decoder.decode(&mut self.buf[..]).unwrap();
            if let Decoded::Frame { consumed, message } = decoded {
                let msg = message.map(|m| match m {
                    Message::Binary(p) => Msg::Binary(p.to_vec()),
                    Message::Text(p) => Msg::Text(p.to_vec()),
                    Message::Ping(p) => Msg::Ping(p.to_vec()),
                    Message::Pong(p) => Msg::Pong(p.to_vec()),
                    Message::Close { code, reason } => Msg::Close(code, reason.to_owned()),
                });
                self.buf.drain(..consumed);
                match msg {
                    Some(msg) => return Some(msg),
                    None => continue,
                }
            }
            let mut chunk = [0u8; 8192];
            match self.stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// [`recv`](Self::recv) with a limit; `None` on timeout or end of stream.
    pub async fn recv_within(&mut self, d: Duration) -> Option<Msg> {
        tokio::time::timeout(d, self.recv()).await.ok().flatten()
    }

    /// Echoes binary messages until the client's Close, which it answers.
    /// Returns the client's close code.
    pub async fn echo_until_close(&mut self) -> Option<u16> {
        while let Some(msg) = self.recv().await {
            match msg {
                Msg::Binary(p) => self.send(Opcode::Binary, &p).await,
                Msg::Close(code, reason) => {
                    match code {
                        Some(c) => self.send_close(c, &reason).await,
                        None => self.send(Opcode::Close, &[]).await,
                    }
                    return code;
                }
                _ => {}
            }
        }
        None
    }
}

/// The whole WebSocket message a server sends for `frame`.
pub fn ws_bytes(frame: &Frame<'_>) -> Vec<u8> {
    let mut out = Vec::new();
    encode_ws(&mut out, frame, None);
    out
}

/// Listens on 127.0.0.1, accepts one connection, runs TLS and reads the
/// request head, then hands the connection to `handler`. The join handle
/// yields the handler's result, or the TLS/HTTP failure as a string.
pub async fn serve_one<F, Fut, T>(
    tls: Arc<ServerConfig>,
    handler: F,
) -> (SocketAddr, JoinHandle<Result<T, String>>)
where
    F: FnOnce(ServerConn) -> Fut + Send + 'static,
    Fut: Future<Output = T> + Send,
    T: Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let handle = tokio::spawn(async move {
        let (tcp, peer) = listener.accept().await.map_err(|e| e.to_string())?;
        tcp.set_nodelay(true).unwrap();
        let mut stream = TlsAcceptor::from(tls)
            .accept(tcp)
            .await
            .map_err(|e| format!("server TLS: {e}"))?;
        let mut buf = Vec::new();
        let (method, path, key, content_length, head_len) = loop {
            if let http::Parsed::Complete {
                request,
                header_len,
            } = http::parse_request(&buf, http::DEFAULT_MAX_HEADER_BYTES)
                .map_err(|e| e.to_string())?
            {
                break (
                    request.method.to_owned(),
                    request.path.to_owned(),
                    request.websocket_key.map(str::to_owned),
                    request.content_length,
                    header_len,
                );
            }
            let mut chunk = [0u8; 4096];
            let n = stream
                .read(&mut chunk)
                .await
                .map_err(|e| format!("server read: {e}"))?;
            if n == 0 {
                return Err("client closed before sending a request".to_owned());
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        buf.drain(..head_len);
        let conn = ServerConn {
            stream,
            peer,
            method,
            path,
            key,
            content_length,
            buf,
            decoder: Decoder::new(ws::Role::Server, 2 << 20),
        };
        Ok(handler(conn).await)
    });
    (addr, handle)
}

/// Connect options for a device at `addr` with the test server name.
pub fn device_opts(addr: SocketAddr) -> devgate_client::ConnectOptions {
    let mut opts =
        devgate_client::ConnectOptions::new(addr, SERVER_NAME, devgate_client::Role::Device);
    opts.connect_timeout = Duration::from_secs(5);
    opts
}
