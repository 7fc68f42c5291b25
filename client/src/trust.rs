//! The gateway's trust bundle during a root exchange (docs/PROTOCOL.md section 8a).
//!
//! The gateway sends every device and manager a Control frame with id 0,
//! `{"op":"trust_bundle","bundle":ID,"roots":[PEM…]}`, when it connects and whenever the
//! bundle changes. A client keeps the roots (so that the gateway's next root verifies), then
//! acknowledges with [`TrustBundle::ack_frame`]: the operator activates the new root only
//! once enough peers have acknowledged it.

use rustls_pki_types::CertificateDer;

use crate::{ClientError, Frame};

/// A trust bundle received from the gateway.
#[derive(Debug, Clone)]
pub struct TrustBundle {
    /// The bundle's id, echoed in the acknowledgement.
    pub id: String,
    /// The roots to trust (DER), current and next.
    pub roots: Vec<CertificateDer<'static>>,
    /// The same roots as the PEM text the gateway sent, ready to be stored.
    pub pem: String,
}

impl TrustBundle {
    /// The bundle in a Control frame's payload; `Ok(None)` if the payload is another
    /// Control message, an error if it is a trust bundle that cannot be read (a client must
    /// then not acknowledge it).
    pub fn parse(payload: &[u8]) -> Result<Option<Self>, ClientError> {
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(payload) else {
            return Ok(None);
        };
        if v.get("op").and_then(serde_json::Value::as_str) != Some("trust_bundle") {
            return Ok(None);
        }
        let bad = |why: &str| ClientError::Protocol(format!("trust bundle: {why}"));
        let id = v
            .get("bundle")
            .and_then(serde_json::Value::as_str)
            .ok_or_else(|| bad("no \"bundle\" id"))?
            .to_owned();
        let pem: String = v
            .get("roots")
            .and_then(serde_json::Value::as_array)
            .ok_or_else(|| bad("no \"roots\" array"))?
            .iter()
            .map(|r| r.as_str().ok_or_else(|| bad("a root is not a string")))
            .collect::<Result<Vec<_>, _>>()?
            .concat();
        let roots = crate::certs_from_pem(pem.as_bytes())?;
        if roots.is_empty() {
            return Err(bad("no certificate in \"roots\""));
        }
        Ok(Some(Self { id, roots, pem }))
    }

    /// The acknowledgement payload, sent once the roots are stored:
    /// `{"op":"trust_bundle_ack","bundle":ID}` in a Control frame with id 0
    /// (see [`Self::ack_frame`]).
    pub fn ack_payload(&self) -> Vec<u8> {
        serde_json::json!({"op": "trust_bundle_ack", "bundle": self.id})
            .to_string()
            .into_bytes()
    }

    /// A Control frame (id 0) carrying `payload` from [`Self::ack_payload`].
    pub fn ack_frame(payload: &[u8]) -> Frame<'_> {
        Frame::control(0, payload)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn other_control_messages_are_not_bundles_and_broken_bundles_are_errors() {
        assert!(
            TrustBundle::parse(br#"{"ok":true}"#)
                .expect("not a bundle")
                .is_none()
        );
        assert!(TrustBundle::parse(b"not json").expect("ignored").is_none());
        assert!(TrustBundle::parse(br#"{"op":"trust_bundle","roots":[]}"#).is_err());
        assert!(TrustBundle::parse(br#"{"op":"trust_bundle","bundle":"x","roots":[]}"#).is_err());
        assert!(TrustBundle::parse(br#"{"op":"trust_bundle","bundle":"x","roots":[1]}"#).is_err());
    }

    #[test]
    fn a_bundle_round_trips_into_its_acknowledgement() {
        let cert = rcgen::generate_simple_self_signed(vec!["root".into()]).expect("cert");
        let pem = cert.cert.pem();
        let payload =
            serde_json::json!({"op": "trust_bundle", "bundle": "abc", "roots": [pem]}).to_string();
        let bundle = TrustBundle::parse(payload.as_bytes())
            .expect("parse")
            .expect("a bundle");
        assert_eq!(bundle.roots.len(), 1);
        assert_eq!(bundle.id, "abc");
        let ack = bundle.ack_payload();
        let v: serde_json::Value = serde_json::from_slice(&ack).expect("json");
        assert_eq!(v["op"], "trust_bundle_ack");
        assert_eq!(v["bundle"], "abc");
        let frame = TrustBundle::ack_frame(&ack);
        assert_eq!(frame.id, 0);
    }
}
