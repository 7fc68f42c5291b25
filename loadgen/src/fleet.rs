//! Credentials of the simulated fleet, made offline from the gateway's data
//! dir: device certificates issued with its device CA, the first manager's
//! certificate, and one TLS client configuration per device.
//!
//! Resumption: every device config points into one process-wide session cache
//! ([`SharedSessions`]), under a key of its own. Sharing the cache keeps memory
//! flat for 50,000 devices; the per-device key keeps a ticket from being
//! presented by another device, which would make the gateway see the wrong
//! identity (the danger rustls' docs warn about when configs share a store).

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use devgate_client::tls_config;
use devgate_pki::{ClientCa, PkiPaths};
use rustls::client::{
    ClientSessionMemoryCache, ClientSessionStore, Resumption, Tls12ClientSessionValue,
    Tls13ClientSessionValue,
};
use rustls::{ClientConfig, NamedGroup};
use rustls_pki_types::{CertificateDer, ServerName};

/// The data dir's trust anchor and device CA.
pub(crate) struct Fleet {
    roots: Vec<CertificateDer<'static>>,
    device_ca: ClientCa,
    sessions: Option<Arc<ClientSessionMemoryCache>>,
}

impl Fleet {
    /// Loads the root certificate and device CA of `data_dir`; with `resume`, one
    /// session cache for `devices` devices.
    pub(crate) fn load(data_dir: &Path, resume: bool, devices: usize) -> Result<Self> {
        let paths = PkiPaths::new(data_dir);
        let roots = devgate_pki::load_certs(&paths.root_cert()).with_context(|| {
            format!(
                "reading the root certificate of {} (is --data-dir a gateway data dir from `devgate init`?)",
                data_dir.display()
            )
        })?;
        let device_ca = ClientCa::load(&paths.device_ca_cert(), &paths.device_ca_key())
            .context("loading the device CA (is --data-dir a gateway data dir?)")?;
        // rustls keeps up to 8 TLS 1.3 tickets per name and sizes the cache in tickets.
        let sessions = resume.then(|| Arc::new(ClientSessionMemoryCache::new(devices.max(1) * 8)));
        Ok(Self {
            roots,
            device_ca,
            sessions,
        })
    }

    /// The first manager's TLS configuration (`pki/manager.pem`).
    pub(crate) fn manager_tls(&self, data_dir: &Path) -> Result<Arc<ClientConfig>> {
        let paths = PkiPaths::new(data_dir);
        let chain = devgate_pki::load_certs(&paths.manager_cert())
            .context("reading the manager certificate of --data-dir")?;
        let key = devgate_pki::load_key(&paths.manager_key())
            .context("reading the manager key of --data-dir")?;
        Ok(tls_config(&self.roots, Some((chain, key)))?)
    }

    /// TLS configurations of devices `indices`, issued on all cores (ECDSA signing
    /// dominates).
    pub(crate) fn issue(&self, indices: &[usize]) -> Result<Vec<Arc<ClientConfig>>> {
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
        let chunk = indices.len().div_ceil(threads).max(1);
        let results: Vec<Result<Vec<Arc<ClientConfig>>>> = std::thread::scope(|s| {
            let handles: Vec<_> = indices
                .chunks(chunk)
                .map(|part| s.spawn(move || part.iter().map(|&i| self.device_tls(i)).collect()))
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(anyhow::anyhow!("certificate issuer thread panicked")))
                })
                .collect()
        });
        let mut all = Vec::with_capacity(indices.len());
        for r in results {
            all.extend(r?);
        }
        Ok(all)
    }

    fn device_tls(&self, i: usize) -> Result<Arc<ClientConfig>> {
        let issued = self.device_ca.issue_device(&unit_name(i))?;
        let config = tls_config(&self.roots, Some((issued.chain, issued.key)))?;
        let mut config = Arc::unwrap_or_clone(config);
        config.resumption = match &self.sessions {
            Some(shared) => Resumption::store(Arc::new(DeviceSessions {
                shared: shared.clone(),
                key: device_key(i),
            })),
            // Without --resume every reconnect is a full handshake, as for a fresh agent.
            None => Resumption::disabled(),
        };
        Ok(Arc::new(config))
    }
}

/// The unit ID of simulated device `i`.
pub(crate) fn unit_name(i: usize) -> String {
    format!("lg-{i:06}")
}

/// The name a device's sessions are filed under in the shared cache.
fn device_key(i: usize) -> ServerName<'static> {
    ServerName::try_from(format!("d{i}.sessions.loadgen.invalid"))
        .expect("d<number>.sessions.loadgen.invalid is a valid DNS name")
}

/// One device's view of the shared cache: every call files under its own key, so
/// the gateway name (the same for every device) does not mix identities.
struct DeviceSessions {
    shared: Arc<ClientSessionMemoryCache>,
    key: ServerName<'static>,
}

impl fmt::Debug for DeviceSessions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeviceSessions").field("key", &self.key).finish()
    }
}

impl ClientSessionStore for DeviceSessions {
    fn set_kx_hint(&self, _: ServerName<'static>, group: NamedGroup) {
        self.shared.set_kx_hint(self.key.clone(), group);
    }
    fn kx_hint(&self, _: &ServerName<'_>) -> Option<NamedGroup> {
        self.shared.kx_hint(&self.key)
    }
    fn set_tls12_session(&self, _: ServerName<'static>, value: Tls12ClientSessionValue) {
        self.shared.set_tls12_session(self.key.clone(), value);
    }
    fn tls12_session(&self, _: &ServerName<'_>) -> Option<Tls12ClientSessionValue> {
        self.shared.tls12_session(&self.key)
    }
    fn remove_tls12_session(&self, _: &ServerName<'static>) {
        self.shared.remove_tls12_session(&self.key);
    }
    fn insert_tls13_ticket(&self, _: ServerName<'static>, value: Tls13ClientSessionValue) {
        self.shared.insert_tls13_ticket(self.key.clone(), value);
    }
    fn take_tls13_ticket(&self, _: &ServerName<'static>) -> Option<Tls13ClientSessionValue> {
        self.shared.take_tls13_ticket(&self.key)
    }
}
