//! The daemon's view of a running gateway: the core's shared state (what the workers
//! see) plus what only the daemon's threads use — the whole configuration and the
//! credential store. It dereferences to [`Shared`], so the admin, store and signal threads
//! read the core's counters and maps through it.

use std::ops::Deref;
use std::sync::{Arc, OnceLock};

use crate::config::Config;
use crate::shared::Shared;
use crate::store::Store;

/// A running gateway, as the daemon's threads see it.
#[derive(Debug)]
pub struct Daemon {
    /// What the workers share.
    pub core: Arc<Shared>,
    /// The configuration it started with.
    pub config: Config,
    /// The credential store, once open.
    pub store: OnceLock<Arc<dyn Store>>,
}

impl Deref for Daemon {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.core
    }
}

/// Sets [`Shared::server_cert_valid`] from the wall clock: at start, after a reload, and
/// every second on the store thread (the core never reads the wall clock).
pub fn refresh_certificate_validity(shared: &Shared) {
    let valid = shared
        .tls
        .load()
        .server_cert_valid_at(crate::tls::unix_now());
    shared
        .server_cert_valid
        .store(valid, std::sync::atomic::Ordering::Relaxed);
}
