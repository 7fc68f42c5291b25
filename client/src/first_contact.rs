//! First contact: a device that has no trust anchor yet learns the gateway's
//! root certificate, and a person confirms it by its fingerprint.
//!
//! [`fetch_gateway_root`] completes a TLS handshake that accepts whatever
//! chain the gateway presents, but still checks the handshake signature with
//! the leaf's key, so whoever answered holds that key: a man in the middle
//! cannot pass off someone else's chain. The last certificate of the chain is
//! the root. The person is shown its fingerprint with one of the four groups
//! hidden ([`FirstContact::challenge`]), reads the full fingerprint off the
//! gateway's console, and types the hidden group; [`FirstContact::confirm`]
//! compares it and also checks that the chain verifies against that root for
//! the gateway's name, as every later connection will. Only then does the
//! device keep the root as its trust anchor (for [`tls_config`](crate::tls_config)).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use rand::Rng;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::io::AsyncWriteExt;

use crate::ClientError;
use crate::connect::{open_tcp, tls_handshake};
use crate::proxy::Proxy;
use crate::tls::{ALPN_HTTP11, base_provider};

/// Number of groups in a fingerprint.
const GROUPS: usize = 4;
/// What stands for the hidden group in [`FirstContact::challenge`].
const HIDDEN: &str = "????????????????";
/// How long to wait for the gateway to take the close_notify.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(1);

/// What the gateway presented on first contact. Built by
/// [`fetch_gateway_root`] only, so the fingerprint always belongs to the
/// root.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct FirstContact {
    /// The chain the gateway presented, leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// The last certificate of the chain: the root to trust from now on.
    pub root: CertificateDer<'static>,
    /// The root's SHA-256 fingerprint as the gateway's administrator sees it
    /// (`devgate_pki::fingerprint`): 64 upper-case hex digits in four groups
    /// of 16, separated by spaces.
    pub fingerprint: String,
    /// The name the gateway was contacted as; [`confirm`](Self::confirm)
    /// checks the chain for it.
    pub server_name: String,
}

impl FirstContact {
    /// The fingerprint to show the person, with group `hidden_group` (0 to 3)
    /// replaced by `????????????????`: they type that group from the
    /// gateway's console into [`confirm`](Self::confirm).
    ///
    /// # Panics
    ///
    /// When `hidden_group` is 4 or more.
    pub fn challenge(&self, hidden_group: usize) -> String {
        assert!(
            hidden_group < GROUPS,
            "hidden_group {hidden_group} is not one of the four fingerprint groups (0 to 3)"
        );
        self.fingerprint
            .split(' ')
            .enumerate()
            .map(|(i, group)| if i == hidden_group { HIDDEN } else { group })
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Checks what the person typed for the hidden group (surrounding spaces
    /// and letter case do not matter) and that the presented chain verifies
    /// against the root for the gateway's name now. On success, returns the
    /// trust anchors to use from now on (the root alone), for
    /// [`tls_config`](crate::tls_config).
    ///
    /// A mismatch is [`ClientError::Fingerprint`]; a chain that does not
    /// verify is [`ClientError::Tls`]; in both cases the device must not
    /// connect. A `hidden_group` of 4 or more is [`ClientError::Config`].
    pub fn confirm(
        &self,
        hidden_group: usize,
        typed: &str,
    ) -> Result<Vec<CertificateDer<'static>>, ClientError> {
        if hidden_group >= GROUPS {
            return Err(ClientError::Config(format!(
                "hidden_group {hidden_group} is not one of the four fingerprint groups (0 to 3)"
            )));
        }
        let candidate = self
            .fingerprint
            .split(' ')
            .enumerate()
            .map(|(i, group)| {
                if i == hidden_group {
                    typed.trim()
                } else {
                    group
                }
            })
            .collect::<Vec<_>>()
            .join(" ");
        if !devgate_pki::fingerprint_matches(&self.fingerprint, &candidate) {
            return Err(ClientError::Fingerprint(format!(
                "the typed part {:?} does not match group {} of the fingerprint of the root \
                 certificate presented by {}: this may not be your gateway, or someone may be \
                 intercepting the connection: do not connect, ask your administrator",
                typed.trim(),
                hidden_group + 1,
                self.server_name
            )));
        }
        self.verify_chain()?;
        Ok(vec![self.root.clone()])
    }

    /// The chain must verify against the root for the server name, as it
    /// will on every later connection.
    fn verify_chain(&self) -> Result<(), ClientError> {
        let fail = |why: String| {
            ClientError::Tls(format!(
                "the certificate chain presented by {} does not verify against its own root: \
                 {why}; the gateway is misconfigured or not the one intended: do not connect, \
                 ask your administrator",
                self.server_name
            ))
        };
        let mut roots = RootCertStore::empty();
        roots
            .add(self.root.clone())
            .map_err(|e| fail(format!("the root is unusable ({e})")))?;
        let verifier =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), Arc::new(base_provider()))
                .build()
                .map_err(|e| fail(e.to_string()))?;
        let name = ServerName::try_from(self.server_name.clone())
            .map_err(|e| fail(format!("{:?} is not a server name ({e})", self.server_name)))?;
        let (leaf, intermediates) = self
            .chain
            .split_first()
            .ok_or_else(|| fail("the chain is empty".to_owned()))?;
        verifier
            .verify_server_cert(leaf, intermediates, &name, &[], UnixTime::now())
            .map_err(|e| fail(e.to_string()))?;
        Ok(())
    }

    /// A random group (0 to 3) to hide, so that a person cannot get into the
    /// habit of checking only one part.
    pub fn random_hidden_group() -> usize {
        rand::rng().random_range(0..GROUPS)
    }
}

/// Contacts a gateway the device does not trust yet and returns the chain it
/// presents, its root and the root's fingerprint, for a person to check with
/// [`FirstContact::challenge`] and [`FirstContact::confirm`].
///
/// The chain is not judged here, but the handshake signature is checked with
/// the leaf's key. The connection is closed right after the handshake. TCP
/// and TLS failures are [`ClientError::Io`] and [`ClientError::Tls`];
/// running out of `timeout` is [`ClientError::Timeout`].
pub async fn fetch_gateway_root(
    addr: SocketAddr,
    server_name: &str,
    timeout: Duration,
) -> Result<FirstContact, ClientError> {
    fetch_gateway_root_via(None, addr, server_name, timeout).await
}

/// [`fetch_gateway_root`] through `proxy` when given.
pub async fn fetch_gateway_root_via(
    proxy: Option<&Proxy>,
    addr: SocketAddr,
    server_name: &str,
    timeout: Duration,
) -> Result<FirstContact, ClientError> {
    let provider = Arc::new(base_provider());
    let recorder = Arc::new(RecordingVerifier {
        provider: Arc::clone(&provider),
        seen: Mutex::new(Seen::default()),
    });
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(rustls::ALL_VERSIONS)
        .map_err(|e| ClientError::Config(format!("TLS versions: {e}")))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::clone(&recorder) as Arc<dyn ServerCertVerifier>)
        .with_no_client_auth();
    config.alpn_protocols = vec![ALPN_HTTP11.to_vec()];

    let handshake = tokio::time::timeout(timeout, async {
        let deadline = tokio::time::Instant::now() + timeout;
        let tcp = open_tcp(addr, proxy, None, None, deadline).await?;
        tls_handshake(tcp, addr, server_name, Arc::new(config)).await
    })
    .await
    .map_err(|_| ClientError::Timeout("first contact with the gateway"))?;

    let seen = recorder.take();
    let chain = match (handshake, seen) {
        (
            Ok(mut stream),
            Seen {
                chain: Some(chain),
                signature_ok: true,
            },
        ) => {
            let _ = tokio::time::timeout(SHUTDOWN_TIMEOUT, stream.shutdown()).await;
            chain
        }
        // A TLS 1.2 gateway that insists on a client certificate aborts the
        // handshake after it has signed the key exchange with the leaf's
        // key: the chain is as good as after a complete handshake.
        (
            Err(_),
            Seen {
                chain: Some(chain),
                signature_ok: true,
            },
        ) => chain,
        (Err(e), _) => return Err(e),
        (Ok(_), _) => {
            return Err(ClientError::Tls(format!(
                "handshake with {server_name} at {addr} completed without a verified server \
                 signature"
            )));
        }
    };
    let root = match chain.last() {
        Some(root) => root.clone(),
        None => {
            return Err(ClientError::Tls(format!(
                "{server_name} at {addr} presented no certificate"
            )));
        }
    };
    Ok(FirstContact {
        fingerprint: devgate_pki::fingerprint(&root),
        root,
        chain,
        server_name: server_name.to_owned(),
    })
}

/// What the verifier saw during one handshake.
#[derive(Default)]
struct Seen {
    chain: Option<Vec<CertificateDer<'static>>>,
    signature_ok: bool,
}

/// Accepts any chain but records it, and checks handshake signatures with
/// the provider's algorithms.
#[derive(Debug)]
struct RecordingVerifier {
    provider: Arc<CryptoProvider>,
    seen: Mutex<Seen>,
}

impl std::fmt::Debug for Seen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Seen")
            .field("certificates", &self.chain.as_ref().map(Vec::len))
            .field("signature_ok", &self.signature_ok)
            .finish()
    }
}

impl RecordingVerifier {
    fn take(&self) -> Seen {
        std::mem::take(&mut *self.seen.lock().unwrap_or_else(PoisonError::into_inner))
    }

    fn signature_checked(
        &self,
        cert: &CertificateDer<'_>,
        result: Result<HandshakeSignatureValid, rustls::Error>,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let valid = result?;
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        // The signature must come from the leaf that was recorded.
        if seen
            .chain
            .as_ref()
            .and_then(|c| c.first())
            .is_some_and(|leaf| leaf.as_ref() == cert.as_ref())
        {
            seen.signature_ok = true;
        }
        Ok(valid)
    }
}

impl ServerCertVerifier for RecordingVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let chain = std::iter::once(end_entity)
            .chain(intermediates)
            .map(|c| c.clone().into_owned())
            .collect();
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        seen.chain = Some(chain);
        seen.signature_ok = false;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let result = verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        );
        self.signature_checked(cert, result)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let result = verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        );
        self.signature_checked(cert, result)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn contact() -> FirstContact {
        let root = CertificateDer::from(vec![1u8, 2, 3]);
        FirstContact {
            fingerprint: devgate_pki::fingerprint(&root),
            chain: vec![root.clone()],
            root,
            server_name: "gw.test".to_owned(),
        }
    }

    #[test]
    fn challenge_hides_exactly_one_group() {
        let c = contact();
        let groups: Vec<&str> = c.fingerprint.split(' ').collect();
        assert_eq!(groups.len(), 4);
        for hidden in 0..4 {
            let shown: Vec<String> = c.challenge(hidden).split(' ').map(str::to_owned).collect();
            for (i, g) in shown.iter().enumerate() {
                if i == hidden {
                    assert_eq!(g, HIDDEN);
                } else {
                    assert_eq!(g, groups[i]);
                }
            }
        }
        for _ in 0..64 {
            assert!(FirstContact::random_hidden_group() < 4);
        }
    }

    #[test]
    fn wrong_or_malformed_typing_is_a_fingerprint_error() {
        let c = contact();
        let groups: Vec<&str> = c.fingerprint.split(' ').collect();
        let wrong_group = if groups[2] == "0000000000000000" {
            "1111111111111111"
        } else {
            "0000000000000000"
        };
        let spaced = format!("{} {}", &groups[2][..8], &groups[2][8..]);
        for typed in [
            wrong_group,
            "",
            groups[1],
            spaced.as_str(),
            &groups[2][..15],
        ] {
            let err = c.confirm(2, typed).unwrap_err();
            assert!(
                matches!(&err, ClientError::Fingerprint(m) if m.contains("ask your administrator")),
                "{typed:?}: {err:?}"
            );
        }
        assert!(matches!(
            c.confirm(4, groups[0]),
            Err(ClientError::Config(_))
        ));
        // The right group passes the fingerprint check and reaches the chain
        // check, which a three-byte "certificate" cannot pass.
        let lower = groups[2].to_ascii_lowercase();
        let err = c.confirm(2, &format!("  {lower}\n")).unwrap_err();
        assert!(matches!(err, ClientError::Tls(_)), "{err:?}");
    }
}
