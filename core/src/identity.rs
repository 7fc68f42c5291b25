//! Which certificates the gateway accepts, mirrored from the store for the data path.
//!
//! Workers never call the store (it blocks), so at upgrade they ask [`Identity`]: the
//! store thread loads it at start, keeps it fresh from the store's change log once a
//! second (and at once after its own enrollments, renewals and revocations), and closes
//! sessions whose certificate stops being accepted.
//!
//! The rules (docs/OPERATIONS.md, "Credentials"):
//! - a certificate revoked by SHA-256 is refused, whatever it names;
//! - a unit in the registry is accepted only with its current certificate, or the one a
//!   renewal replaced while the overlap lasts (until the new one is first used, at most
//!   [`RENEW_OVERLAP_SECS`]);
//! - a manager name with recorded certificates is accepted only with one of its unrevoked
//!   recorded certificates;
//! - a unit or manager name the store has never seen is accepted on the CA's signature
//!   alone (certificates issued directly with the CA key, such as load-generator fleets,
//!   and managers issued offline before certificates were recorded) — unless
//!   `[credentials] require_registered` is set, which refuses them.

use std::sync::Arc;

use dashmap::DashMap;

use crate::handle::ConnHandle;

/// A device's accepted certificates as the store records them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceCreds {
    /// The current certificate's SHA-256 ([`devgate_pki::fingerprint`] form); `None` after
    /// a reset.
    pub current: Option<String>,
    /// Whether a connection has presented the current certificate yet.
    pub current_used: bool,
    /// The certificate replaced by a renewal and the end of its overlap (unix seconds).
    pub previous: Option<(String, i64)>,
}

/// SHA-256 of a certificate's DER.
pub type Fp = [u8; 32];

/// How long the certificate a renewal replaced stays valid at most (it ends earlier, when
/// the new certificate is first used).
pub const RENEW_OVERLAP_SECS: i64 = 3600;

/// Unix seconds at `now`, given the wall clock's reading at one instant (`base`, taken by
/// the daemon at start): the data path never reads the wall clock.
pub fn unix_at(base: (std::time::Instant, i64), now: std::time::Instant) -> i64 {
    let (at, unix) = base;
    let delta = if now >= at {
        i64::try_from(now.duration_since(at).as_secs()).unwrap_or(i64::MAX)
    } else {
        -i64::try_from(at.duration_since(now).as_secs()).unwrap_or(i64::MAX)
    };
    unix.saturating_add(delta)
}

/// The verdict on a presented certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Accepted.
    Accepted,
    /// Accepted, and the first use of the unit's current certificate: the store is told
    /// (it ends the renewal overlap and the enrollment retry window).
    FirstUse,
    /// Revoked by certificate.
    Revoked,
    /// Not the current certificate of its unit or manager (replaced, reset or revoked by
    /// name).
    Superseded,
    /// For a unit or manager name the store has never seen, with
    /// `[credentials] require_registered`.
    Unregistered,
}

impl Verdict {
    /// Whether the certificate may be used.
    pub fn accepted(self) -> bool {
        matches!(self, Self::Accepted | Self::FirstUse)
    }
}

#[derive(Debug, Clone, Default)]
struct DeviceEntry {
    current: Option<Fp>,
    current_used: bool,
    previous: Option<(Fp, i64)>,
}

/// The mirror (see the module docs).
#[derive(Debug, Default)]
pub struct Identity {
    /// `[credentials] require_registered`.
    require_registered: bool,
    devices: DashMap<Arc<str>, DeviceEntry>,
    managers: DashMap<Arc<str>, Vec<Fp>>,
    revoked: DashMap<Fp, ()>,
    /// The certificate each unit's latest session presented (stale entries of closed
    /// sessions are harmless: a handle never reaches its slot's next tenant).
    device_sessions: DashMap<Arc<str>, (ConnHandle, Fp)>,
    manager_sessions: DashMap<ConnHandle, (Arc<str>, Fp)>,
}

fn parse(fp: &str) -> Option<Fp> {
    devgate_pki::parse_fingerprint(fp)
}

impl Identity {
    /// An empty mirror; `require_registered` refuses identities the store has never seen.
    pub fn new(require_registered: bool) -> Self {
        Self {
            require_registered,
            ..Self::default()
        }
    }

    fn unknown(&self) -> Verdict {
        if self.require_registered {
            Verdict::Unregistered
        } else {
            Verdict::Accepted
        }
    }

    /// The verdict on device `unit` presenting `fp` at `now` (unix seconds).
    pub fn check_device(&self, unit: &str, fp: &Fp, now: i64) -> Verdict {
        if self.revoked.contains_key(fp) {
            return Verdict::Revoked;
        }
        let Some(entry) = self.devices.get(unit) else {
            return self.unknown();
        };
        if entry.current.as_ref() == Some(fp) {
            return if entry.current_used {
                Verdict::Accepted
            } else {
                Verdict::FirstUse
            };
        }
        match entry.previous {
            Some((prev, until)) if prev == *fp && now < until => Verdict::Accepted,
            _ => Verdict::Superseded,
        }
    }

    /// Records the first use of `unit`'s current certificate `fp`: the overlap ends.
    pub fn note_used(&self, unit: &str, fp: &Fp) {
        if let Some(mut e) = self.devices.get_mut(unit)
            && e.current.as_ref() == Some(fp)
        {
            e.current_used = true;
            e.previous = None;
        }
    }

    /// The verdict on manager `name` presenting `fp`.
    pub fn check_manager(&self, name: &str, fp: &Fp) -> Verdict {
        if self.revoked.contains_key(fp) {
            return Verdict::Revoked;
        }
        match self.managers.get(name) {
            None => self.unknown(),
            Some(accepted) if accepted.contains(fp) => Verdict::Accepted,
            Some(_) => Verdict::Superseded,
        }
    }

    /// Records the certificate of a device session that was just accepted.
    pub fn device_connected(&self, unit: Arc<str>, handle: ConnHandle, fp: Fp) {
        self.device_sessions.insert(unit, (handle, fp));
    }

    /// Records the certificate of a manager session that was just accepted.
    pub fn manager_connected(&self, handle: ConnHandle, name: Arc<str>, fp: Fp) {
        self.manager_sessions.insert(handle, (name, fp));
    }

    /// Forgets a manager session.
    pub fn manager_disconnected(&self, handle: ConnHandle) {
        self.manager_sessions.remove(&handle);
    }

    /// Replaces what is accepted for `unit` (`None`: not in the registry).
    pub fn set_device(&self, unit: &str, creds: Option<&DeviceCreds>) {
        match creds {
            None => {
                self.devices.remove(unit);
            }
            Some(c) => {
                let entry = DeviceEntry {
                    current: c.current.as_deref().and_then(parse),
                    current_used: c.current_used,
                    previous: c
                        .previous
                        .as_ref()
                        .and_then(|(p, until)| Some((parse(p)?, *until))),
                };
                self.devices.insert(Arc::from(unit), entry);
            }
        }
    }

    /// Replaces what is accepted for manager `name` (`None`: nothing recorded).
    pub fn set_manager(&self, name: &str, accepted: Option<&[String]>) {
        match accepted {
            None => {
                self.managers.remove(name);
            }
            Some(list) => {
                let fps = list.iter().filter_map(|f| parse(f)).collect();
                self.managers.insert(Arc::from(name), fps);
            }
        }
    }

    /// Adds a revoked certificate.
    pub fn add_revoked(&self, fp: &str) -> Option<Fp> {
        let fp = parse(fp)?;
        self.revoked.insert(fp, ());
        Some(fp)
    }

    /// The session of `unit`, if its certificate is no longer accepted at `now`.
    pub fn stale_device_session(&self, unit: &str, now: i64) -> Option<ConnHandle> {
        let (handle, fp) = *self.device_sessions.get(unit)?;
        (!self.check_device(unit, &fp, now).accepted()).then_some(handle)
    }

    /// Sessions of manager `name` whose certificate is no longer accepted.
    pub fn stale_manager_sessions(&self, name: &str) -> Vec<ConnHandle> {
        self.manager_sessions
            .iter()
            .filter(|e| &*e.value().0 == name && !self.check_manager(name, &e.value().1).accepted())
            .map(|e| *e.key())
            .collect()
    }

    /// Sessions (device or manager) that presented `fp`.
    pub fn sessions_with(&self, fp: &Fp) -> Vec<ConnHandle> {
        let devices = self
            .device_sessions
            .iter()
            .filter(|e| e.value().1 == *fp)
            .map(|e| e.value().0);
        let managers = self
            .manager_sessions
            .iter()
            .filter(|e| e.value().1 == *fp)
            .map(|e| *e.key());
        devices.chain(managers).collect()
    }

    /// Units with a renewal overlap, and when it ends.
    pub fn overlaps(&self) -> Vec<(Arc<str>, i64)> {
        self.devices
            .iter()
            .filter_map(|e| {
                e.value()
                    .previous
                    .map(|(_, until)| (e.key().clone(), until))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn creds(current: Option<&Fp>, used: bool, prev: Option<(&Fp, i64)>) -> DeviceCreds {
        DeviceCreds {
            current: current.map(devgate_pki::format_fingerprint),
            current_used: used,
            previous: prev.map(|(p, u)| (devgate_pki::format_fingerprint(p), u)),
        }
    }

    #[test]
    fn only_current_and_overlapping_previous_certificates_are_accepted() {
        let id = Identity::default();
        let (a, b, c) = ([1u8; 32], [2u8; 32], [3u8; 32]);
        assert_eq!(
            id.check_device("u", &a, 0),
            Verdict::Accepted,
            "unknown unit"
        );
        id.set_device("u", Some(&creds(Some(&b), false, Some((&a, 100)))));
        assert_eq!(id.check_device("u", &b, 50), Verdict::FirstUse);
        assert_eq!(id.check_device("u", &a, 50), Verdict::Accepted);
        assert_eq!(id.check_device("u", &a, 100), Verdict::Superseded);
        assert_eq!(id.check_device("u", &c, 50), Verdict::Superseded);
        id.note_used("u", &b);
        assert_eq!(id.check_device("u", &b, 50), Verdict::Accepted);
        assert_eq!(id.check_device("u", &a, 50), Verdict::Superseded);
        id.add_revoked(&devgate_pki::format_fingerprint(&b));
        assert_eq!(id.check_device("u", &b, 50), Verdict::Revoked);
        id.set_device("r", Some(&creds(None, false, None)));
        assert_eq!(id.check_device("r", &c, 0), Verdict::Superseded, "reset");
    }

    #[test]
    fn managers_known_by_name_accept_only_recorded_certificates() {
        let id = Identity::default();
        let (a, b) = ([1u8; 32], [2u8; 32]);
        assert_eq!(id.check_manager("m", &a), Verdict::Accepted, "legacy");
        id.set_manager("m", Some([devgate_pki::format_fingerprint(&a)].as_slice()));
        assert_eq!(id.check_manager("m", &a), Verdict::Accepted);
        assert_eq!(id.check_manager("m", &b), Verdict::Superseded);
        id.set_manager("m", Some(&[][..]));
        assert_eq!(id.check_manager("m", &a), Verdict::Superseded);
        let strict = Identity::new(true);
        assert_eq!(strict.check_manager("m", &a), Verdict::Unregistered);
        assert_eq!(strict.check_device("u", &a, 0), Verdict::Unregistered);
    }
}
