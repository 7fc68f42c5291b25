//! Reload (SIGHUP, `devgate reload`): certificates and the trust bundle are re-read and
//! swapped in whole. New connections use the new material; established sessions keep the
//! TLS state they negotiated, so a renewal or a root exchange forces no reconnect.
//!
//! Root exchange without re-enrolling: `devgate cert stage-root` writes the next root and
//! server chain under `pki/next/` and a trust bundle (current + next root) to
//! `pki/trust-bundle.pem`. On reload every connected device and manager — and every one
//! that connects later — is sent the bundle in a Control frame `{"op":"trust_bundle",
//! "bundle":ID,"roots":[PEM…]}`; peers acknowledge it (`trust_bundle_ack`, recorded in the
//! store), status shows how many devices have it, and `devgate cert activate-root` switches
//! the server chain once enough have: the devices already trust it.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use anyhow::Result;
use bytes::Bytes;
use devgate_pki::PkiPaths;
use devgate_proto::frame::Frame;
use tracing::{info, warn};

use crate::daemon::Daemon;
use crate::shared::TrustBundle;

/// File holding the roots devices should trust (PEM), if a root exchange is under way.
pub fn trust_bundle_path(data_dir: &std::path::Path) -> std::path::PathBuf {
    PkiPaths::new(data_dir).dir.join("trust-bundle.pem")
}

/// Loads the trust bundle, if any, into `shared` (encoded once as a ready frame).
pub fn load_trust_bundle(shared: &Daemon) -> Result<()> {
    let path = trust_bundle_path(&shared.config.data_dir);
    if !path.exists() {
        if shared.trust_bundle.load().is_some() {
            shared.trust_bundle.store(None);
            shared.trust_generation.fetch_add(1, Ordering::AcqRel);
        }
        return Ok(());
    }
    let certs = devgate_pki::load_certs(&path)?;
    let roots: Vec<String> = certs
        .iter()
        .map(|c| crate::tls::cert_pem(c.as_ref()))
        .collect();
    let id = devgate_pki::bundle_id(&certs);
    let body = serde_json::json!({"op": "trust_bundle", "bundle": id, "roots": roots}).to_string();
    let mut out = Vec::new();
    devgate_proto::frame::encode_ws(&mut out, &Frame::control(0, body.as_bytes()), None);
    shared.trust_bundle.store(Some(Arc::new(TrustBundle {
        frame: Bytes::from(out),
        id: id.clone().into_boxed_str(),
    })));
    shared.trust_generation.fetch_add(1, Ordering::AcqRel);
    info!(
        roots = certs.len(),
        bundle = %id,
        "trust bundle loaded: devices and managers are sent it"
    );
    Ok(())
}

/// Re-reads the PKI; on any error the running material stays in place.
pub fn reload(shared: &Daemon) {
    match crate::tls::load_with(&shared.config.data_dir, &shared.config.tls) {
        Ok(material) => {
            let server = material
                .certificates
                .iter()
                .find(|(role, _)| role == "server")
                .map(|(_, c)| format!("{} (valid until {})", c.subject, c.not_after))
                .unwrap_or_default();
            if !material.server_cert_valid_at(crate::tls::unix_now()) {
                warn!(
                    "reloaded a server certificate outside its validity dates: check-status reports err"
                );
            }
            shared.tls.store(Arc::new(material));
            crate::daemon::refresh_certificate_validity(shared);
            info!("reloaded certificates: server certificate {server}");
        }
        Err(e) => warn!("reload failed, keeping the current certificates: {e:#}"),
    }
    if let Err(e) = load_trust_bundle(shared) {
        warn!("reload: cannot read the trust bundle: {e:#}");
    }
}
