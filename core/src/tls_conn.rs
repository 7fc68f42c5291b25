//! One connection's user-space TLS state, lean enough for tens of thousands of idle
//! sessions.
//!
//! rustls' buffered `ServerConnection` keeps its receive buffer (at least 4 KiB once the
//! first record arrived) and its queues for the life of the connection. Here the
//! connection is rustls' *unbuffered* `UnbufferedServerConnection`, and the two buffers
//! are ours: ciphertext received but not yet a whole record (`incoming`), and ciphertext
//! sealed but not yet written (`outgoing`). Each is replaced by an empty `Vec` — capacity
//! released, not just cleared — as soon as it has been consumed, so an idle connection
//! owns no TLS buffer at all: only rustls' key schedule and the record layer's keys.
//!
//! The unbuffered connection is also what rustls turns into a `KernelConnection` for
//! kernel TLS ([`TlsConn::into_kernel`]).

use std::io::{self, Write};
use std::sync::Arc;

use rustls::ServerConfig;
use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::{ConnectionState, EncodeError, EncryptError, UnbufferedStatus};

/// A server-side TLS session whose buffers exist only while they hold bytes.
pub struct TlsConn {
    conn: UnbufferedServerConnection,
    /// Ciphertext received and not yet processed (a partial record).
    incoming: Vec<u8>,
    /// Ciphertext waiting for the socket; `out_pos` bytes of it are already written.
    outgoing: Vec<u8>,
    out_pos: usize,
    peer_closed: bool,
    sent_close_notify: bool,
    /// The session failed; rustls must not run again (it would queue a second fatal
    /// alert, which it asserts against).
    failed: Option<rustls::Error>,
}

impl std::fmt::Debug for TlsConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConn")
            .field("incoming", &self.incoming.len())
            .field("outgoing", &(self.outgoing.len() - self.out_pos))
            .field("handshaking", &self.is_handshaking())
            .finish_non_exhaustive()
    }
}

/// What one call to [`TlsConn::pump`] should do once the handshake allows it.
#[derive(Default)]
struct Job<'a> {
    /// Plaintext to seal.
    send: Option<&'a [u8]>,
    /// Seal a close_notify alert.
    close_notify: bool,
}

impl TlsConn {
    /// A new server session.
    pub fn new(config: Arc<ServerConfig>) -> Result<Self, rustls::Error> {
        Ok(Self {
            conn: UnbufferedServerConnection::new(config)?,
            incoming: Vec::new(),
            outgoing: Vec::new(),
            out_pos: 0,
            peer_closed: false,
            sent_close_notify: false,
            failed: None,
        })
    }

    /// Whether the handshake is still under way.
    pub fn is_handshaking(&self) -> bool {
        // rustls' own view: a TLS 1.3 server may already send (0.5-RTT) before the
        // client's Finished, so "may write" is not "handshake done".
        self.conn.is_handshaking()
    }

    /// Whether the handshake resumed an earlier session (a session ticket).
    pub fn is_resumed(&self) -> bool {
        self.conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed)
    }

    /// Whether the peer sent close_notify.
    pub fn peer_has_closed(&self) -> bool {
        self.peer_closed
    }

    /// Whether sealed bytes wait for the socket.
    pub fn wants_write(&self) -> bool {
        self.out_pos < self.outgoing.len()
    }

    /// The client's certificate chain, if it presented one.
    pub fn peer_certificates(&self) -> Option<&[rustls_pki_types::CertificateDer<'static>]> {
        self.conn.peer_certificates()
    }

    /// Feeds ciphertext from the socket; decrypted application data is appended to
    /// `plaintext`. On error, an alert for the peer may be waiting in the send buffer.
    pub fn feed(&mut self, data: &[u8], plaintext: &mut Vec<u8>) -> Result<(), rustls::Error> {
        self.incoming.extend_from_slice(data);
        self.pump(plaintext, Job::default())
    }

    /// Seals `plain` as application data (the handshake must be complete).
    pub fn encrypt(&mut self, plain: &[u8]) -> Result<(), rustls::Error> {
        let mut sink = Vec::new();
        self.pump(
            &mut sink,
            Job {
                send: Some(plain),
                close_notify: false,
            },
        )?;
        if !sink.is_empty() {
            // Only possible if the peer's data was not yet drained; never drop it silently.
            return Err(rustls::Error::General(
                "plaintext arrived while sealing; it was not read first".into(),
            ));
        }
        Ok(())
    }

    /// Seals a close_notify alert (once; a no-op during the handshake).
    pub fn send_close_notify(&mut self) {
        if self.sent_close_notify || self.failed.is_some() || self.is_handshaking() {
            return;
        }
        self.sent_close_notify = true;
        let mut sink = Vec::new();
        let _ = self.pump(
            &mut sink,
            Job {
                send: None,
                close_notify: true,
            },
        );
    }

    /// Writes sealed bytes to `sink` until done or it would block. The send buffer is
    /// released once everything is written.
    pub fn write_to<W: Write>(&mut self, sink: &mut W) -> io::Result<usize> {
        let mut total = 0;
        while self.out_pos < self.outgoing.len() {
            match sink.write(&self.outgoing[self.out_pos..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.out_pos += n;
                    total += n;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && total > 0 => break,
                Err(e) => return Err(e),
            }
        }
        if self.out_pos >= self.outgoing.len() {
            self.outgoing = Vec::new();
            self.out_pos = 0;
        }
        Ok(total)
    }

    /// Whether the kernel can seal records of the negotiated cipher suite.
    pub fn kernel_takes(&self, ciphers: crate::kernel_tls::Ciphers) -> bool {
        self.conn
            .negotiated_cipher_suite()
            .is_some_and(|s| ciphers.supports_suite(s))
    }

    /// Whether the session can be handed to the kernel now: handshake done, nothing
    /// buffered in either direction.
    pub fn ready_for_kernel(&self) -> bool {
        !self.is_handshaking()
            && !self.wants_write()
            && self.incoming.is_empty()
            && !self.peer_closed
    }

    /// Turns the session into rustls' kernel connection plus the traffic secrets to
    /// install into the socket. Call only when [`Self::ready_for_kernel`] says so; rustls
    /// consumes the session either way.
    pub fn into_kernel(
        self,
    ) -> Result<
        (
            rustls::ExtractedSecrets,
            rustls::kernel::KernelConnection<ServerConnectionData>,
        ),
        rustls::Error,
    > {
        self.conn.dangerous_into_kernel_connection()
    }

    /// After an error rustls has queued the alert for the peer: one more turn hands it out.
    /// Only one: with nothing queued, rustls would parse the bad input again and queue a
    /// second fatal alert.
    fn collect_alert(&mut self) {
        // Always the real buffer: rustls' handshake deframer keeps positions into it, and
        // an empty slice in its place makes rustls panic.
        let UnbufferedStatus { discard, state } = self.conn.process_tls_records(&mut self.incoming);
        if let Ok(ConnectionState::EncodeTlsData(mut e)) = state {
            // Best effort: the session is over either way.
            let _ = encode_into(&mut self.outgoing, |buf| e.encode(buf));
        }
        let used = discard.min(self.incoming.len());
        self.incoming.drain(..used);
    }

    /// Runs the state machine over `incoming` until it needs more bytes from the peer,
    /// doing `job` once application data may be sent.
    fn pump(&mut self, plaintext: &mut Vec<u8>, job: Job<'_>) -> Result<(), rustls::Error> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let result = self.pump_records(plaintext, job);
        if let Err(e) = &result
            && !matches!(e, rustls::Error::HandshakeNotComplete)
        {
            self.failed = Some(e.clone());
            self.collect_alert();
        }
        result
    }

    fn pump_records(
        &mut self,
        plaintext: &mut Vec<u8>,
        mut job: Job<'_>,
    ) -> Result<(), rustls::Error> {
        let result = loop {
            let UnbufferedStatus { discard, state } =
                self.conn.process_tls_records(&mut self.incoming);
            let mut extra_discard = 0;
            let mut stop = false;
            let step: Result<(), rustls::Error> = match state {
                Err(e) => Err(e),
                Ok(ConnectionState::ReadTraffic(mut rt)) => {
                    let mut r = Ok(());
                    while let Some(record) = rt.next_record() {
                        match record {
                            Ok(record) => {
                                extra_discard += record.discard;
                                plaintext.extend_from_slice(record.payload);
                            }
                            Err(e) => {
                                r = Err(e);
                                break;
                            }
                        }
                    }
                    r
                }
                Ok(ConnectionState::ReadEarlyData(mut early)) => {
                    // 0-RTT is not enabled; drain defensively.
                    while let Some(Ok(record)) = early.next_record() {
                        extra_discard += record.discard;
                    }
                    Ok(())
                }
                Ok(ConnectionState::EncodeTlsData(mut e)) => {
                    encode_into(&mut self.outgoing, |buf| e.encode(buf))
                }
                Ok(ConnectionState::TransmitTlsData(t)) => {
                    // The bytes stay in `outgoing` until the driver writes them, in order.
                    t.done();
                    Ok(())
                }
                Ok(ConnectionState::PeerClosed) => {
                    self.peer_closed = true;
                    Ok(())
                }
                Ok(ConnectionState::Closed) => {
                    self.peer_closed = true;
                    stop = true;
                    Ok(())
                }
                Ok(ConnectionState::BlockedHandshake) => {
                    stop = true;
                    Ok(())
                }
                Ok(ConnectionState::WriteTraffic(mut wt)) => {
                    stop = true;
                    let mut r = Ok(());
                    if let Some(plain) = job.send.take() {
                        r = encrypt_into(&mut self.outgoing, |buf| wt.encrypt(plain, buf));
                    }
                    if r.is_ok() && std::mem::take(&mut job.close_notify) {
                        r = encrypt_into(&mut self.outgoing, |buf| wt.queue_close_notify(buf));
                    }
                    r
                }
                Ok(_) => {
                    stop = true;
                    Ok(())
                }
            };
            let used = (discard + extra_discard).min(self.incoming.len());
            self.incoming.drain(..used);
            if let Err(e) = step {
                break Err(e);
            }
            if stop {
                break Ok(());
            }
        };
        if self.incoming.is_empty() && self.incoming.capacity() > 0 {
            self.incoming = Vec::new();
        }
        if job.send.is_some() {
            return result.and(Err(rustls::Error::HandshakeNotComplete));
        }
        result
    }
}

/// Appends one encoded handshake record to `out`, growing it to the size rustls asks for.
fn encode_into(
    out: &mut Vec<u8>,
    mut encode: impl FnMut(&mut [u8]) -> Result<usize, EncodeError>,
) -> Result<(), rustls::Error> {
    let start = out.len();
    let mut room = 1024;
    loop {
        out.resize(start + room, 0);
        match encode(&mut out[start..]) {
            Ok(n) => {
                out.truncate(start + n);
                return Ok(());
            }
            Err(EncodeError::InsufficientSize(s)) => room = s.required_size,
            Err(e) => {
                out.truncate(start);
                return Err(rustls::Error::General(format!("TLS encode: {e}")));
            }
        }
    }
}

/// Appends sealed records to `out`, growing it to the size rustls asks for.
fn encrypt_into(
    out: &mut Vec<u8>,
    mut encrypt: impl FnMut(&mut [u8]) -> Result<usize, EncryptError>,
) -> Result<(), rustls::Error> {
    let start = out.len();
    let mut room = 256;
    loop {
        out.resize(start + room, 0);
        match encrypt(&mut out[start..]) {
            Ok(n) => {
                out.truncate(start + n);
                return Ok(());
            }
            Err(EncryptError::InsufficientSize(s)) => room = s.required_size,
            Err(e) => {
                out.truncate(start);
                return Err(rustls::Error::General(format!("TLS encrypt: {e}")));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server_config() -> Arc<ServerConfig> {
        let key = rcgen::KeyPair::generate().expect("key");
        let params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).expect("params");
        let cert = params.self_signed(&key).expect("cert");
        let key_der =
            rustls_pki_types::PrivateKeyDer::try_from(key.serialize_der()).expect("key der");
        Arc::new(
            ServerConfig::builder()
                .with_no_client_auth()
                .with_single_cert(vec![cert.der().clone()], key_der)
                .expect("config"),
        )
    }

    /// Garbage instead of a ClientHello: an error and an alert for the peer, and every
    /// later call says the same instead of running rustls again (which would queue a
    /// second fatal alert; rustls asserts against that).
    #[test]
    fn garbage_fails_once_with_an_alert_and_stays_failed() {
        let mut tls = TlsConn::new(server_config()).expect("conn");
        let mut plain = Vec::new();
        let first = tls.feed(b"GET / HTTP/1.1\r\n\r\n", &mut plain);
        assert!(first.is_err(), "{first:?}");
        assert!(tls.wants_write(), "an alert is queued for the peer");
        let mut out = Vec::new();
        tls.write_to(&mut out).expect("write");
        assert_eq!(out.first(), Some(&21), "a TLS alert record");
        assert!(tls.feed(b"more garbage", &mut plain).is_err());
        tls.send_close_notify();
        assert!(!tls.wants_write());
        assert!(plain.is_empty());
    }
}
