//! The agent's state directory: what enrollment produced and what the gateway sent since.
//!
//! ```text
//! gateway.json   {"host": "gw.example.com", "port": 8443, "unit": "00:E0:C5:12:34:56"}
//! cert.pem       the device certificate chain
//! key.pem        its private key (mode 0600)
//! roots.pem      the roots to trust: the first-contact root, later the gateway's bundle
//! ```

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct GatewayRef {
    pub(crate) host: String,
    pub(crate) port: u16,
    pub(crate) unit: String,
}

#[derive(Debug, Clone)]
pub(crate) struct StateDir {
    dir: PathBuf,
}

impl StateDir {
    pub(crate) fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_owned(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    pub(crate) fn key_path(&self) -> PathBuf {
        self.path("key.pem")
    }

    /// Stores a fresh enrollment. The key is written first and the gateway reference last,
    /// so a state directory with `gateway.json` is always complete.
    pub(crate) fn store_enrollment(
        &self,
        gateway: &GatewayRef,
        chain_pem: &str,
        key_pem: &str,
        roots_pem: &str,
    ) -> Result<()> {
        devgate_pki::create_dir_with_mode(&self.dir, 0o700)
            .with_context(|| format!("creating the state directory {}", self.dir.display()))?;
        devgate_pki::write_file(&self.key_path(), key_pem.as_bytes(), 0o600)?;
        devgate_pki::write_file(&self.path("cert.pem"), chain_pem.as_bytes(), 0o644)?;
        self.store_roots(roots_pem)?;
        let json = serde_json::to_vec_pretty(gateway)?;
        devgate_pki::write_file(&self.path("gateway.json"), &json, 0o644)?;
        Ok(())
    }

    /// Replaces the trusted roots (the trust bundle of a root exchange).
    pub(crate) fn store_roots(&self, roots_pem: &str) -> Result<()> {
        devgate_pki::write_file(&self.path("roots.pem"), roots_pem.as_bytes(), 0o644)?;
        Ok(())
    }

    pub(crate) fn gateway(&self) -> Result<GatewayRef> {
        let path = self.path("gateway.json");
        let text = std::fs::read(&path).with_context(|| {
            format!(
                "reading {}: this device is not enrolled yet; run `devgate-agent enroll` \
                 (with --state-dir {} if not the default)",
                path.display(),
                self.dir.display()
            )
        })?;
        serde_json::from_slice(&text).with_context(|| format!("{} is invalid", path.display()))
    }

    /// What to do when the gateway's chain does not verify with the stored roots: the gateway
    /// switched to a root this agent never received (it was offline for the whole root
    /// exchange, or the operator forced the activation), and only a new enrollment helps.
    pub(crate) fn untrusted_root_hint(&self, err: &anyhow::Error) -> String {
        let text = format!("{err:#}");
        // A new root with the old one's name shows as a bad signature, not an unknown issuer.
        if !text.contains("UnknownIssuer") && !text.contains("BadSignature") {
            return String::new();
        }
        format!(
            " (the gateway's certificate is not from a root in {}: it has changed its root \
             since this device last received the trust bundle; enroll again with \
             `devgate-agent enroll --state-dir {}`)",
            self.path("roots.pem").display(),
            self.dir.display()
        )
    }

    /// The TLS configuration for the device connection, from the stored files (read anew
    /// each time, so a trust bundle received on the last connection is used).
    pub(crate) fn tls(&self) -> Result<Arc<rustls::ClientConfig>> {
        let roots = devgate_pki::load_certs(&self.path("roots.pem"))?;
        let chain = devgate_pki::load_certs(&self.path("cert.pem"))?;
        let key = devgate_pki::load_key(&self.key_path())?;
        Ok(devgate_client::tls_config(&roots, Some((chain, key)))?)
    }
}
