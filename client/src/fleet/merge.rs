//! Merging the presence of several instances into one view, without I/O.
//!
//! Each instance of a fleet reports only its own devices, and a device that moves (its
//! instance died, or the balancer sent its next connection elsewhere) is reported by two
//! instances whose reports reach the manager in either order: the new instance's online may
//! come before or after the old one's offline, or the old one says nothing because it is
//! gone. [`PresenceMerge`] keeps, per device, which instances currently claim it online and
//! since when (an arrival sequence number), and derives one answer:
//!
//! - the device is online while any instance claims it; its place is the instance with the
//!   newest claim (a later connection replaced the earlier one, whichever instance reports
//!   the end of the earlier one last);
//! - an instance's claims end with its offline presence, or all at once when the
//!   connection to that instance is lost ([`PresenceMerge::instance_lost`]);
//! - a device whose last claim ends is shown offline only after `settle` without a new claim
//!   (the time a device takes to reconnect elsewhere), so a move shows as one
//!   [`PresenceChange::Moved`] whatever the order of the reports, not as offline and online.
//!
//! Claims from a `list_devices` snapshot ([`PresenceMerge::snapshot`]) carry no time and
//! rank below every claim from a presence frame, so a snapshot taken while a device was
//! moving never takes it back from the instance that reported it online.
//!
//! The caller feeds reports and the time in, calls [`PresenceMerge::handle_timeout`] at
//! [`PresenceMerge::poll_timeout`], and takes [`PresenceChange`]s out.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use devgate_proto::frame::PresenceReason;

/// An instance of the fleet: its index in the list the fleet was built from.
pub type InstanceIndex = usize;

/// Why a device went offline in the merged view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OfflineCause {
    /// The instance that held it reported it offline with this reason.
    Reported(PresenceReason),
    /// The connection to the instance that held it was lost; the device did not show up
    /// on another instance within the settle time.
    InstanceLost,
}

/// A change of the merged view. Each device changes at most once per report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PresenceChange {
    /// The device came online (it was not online anywhere before).
    Online {
        /// The unit ID.
        unit: String,
        /// Where it is.
        at: InstanceIndex,
    },
    /// The device is now held by another instance.
    Moved {
        /// The unit ID.
        unit: String,
        /// Where the view had it.
        from: InstanceIndex,
        /// Where it is now.
        to: InstanceIndex,
    },
    /// The device is offline everywhere.
    Offline {
        /// The unit ID.
        unit: String,
        /// Where the view had it last.
        last: InstanceIndex,
        /// Why.
        cause: OfflineCause,
    },
}

/// Sequence number of snapshot claims: older than any presence.
const SNAPSHOT: u64 = 0;

#[derive(Debug, Default)]
struct Unit {
    /// (instance, arrival sequence) of every instance that claims the device online.
    claims: Vec<(InstanceIndex, u64)>,
    /// Where the merged view shows it; `None` = offline (the entry then exists only while
    /// it has claims).
    shown: Option<InstanceIndex>,
    /// The view shows it online but no instance claims it: shown offline at this time.
    offline_due: Option<Instant>,
    /// What ended the last claim.
    cause: Option<OfflineCause>,
}

impl Unit {
    /// The claim that decides where the device is: the newest; among snapshot claims the
    /// one shown already, else the lowest index.
    fn best(&self) -> Option<InstanceIndex> {
        self.claims
            .iter()
            .max_by_key(|(i, seq)| (*seq, self.shown == Some(*i), std::cmp::Reverse(*i)))
            .map(|(i, _)| *i)
    }
}

/// The merged presence of a fleet (see the module docs).
#[derive(Debug)]
pub struct PresenceMerge {
    settle: Duration,
    seq: u64,
    units: HashMap<String, Unit>,
    /// Pending offlines in deadline order (the settle time is constant, so arrival order
    /// is deadline order); an entry whose unit no longer has that deadline is stale.
    due: VecDeque<(Instant, String)>,
    changes: VecDeque<PresenceChange>,
}

impl PresenceMerge {
    /// A merge that shows a device offline `settle` after its last claim ended (zero: at
    /// once).
    pub fn new(settle: Duration) -> Self {
        Self {
            settle,
            seq: SNAPSHOT,
            units: HashMap::new(),
            due: VecDeque::new(),
            changes: VecDeque::new(),
        }
    }

    /// A presence frame from instance `at`.
    pub fn presence(
        &mut self,
        now: Instant,
        at: InstanceIndex,
        unit: &str,
        online: bool,
        reason: PresenceReason,
    ) {
        if online {
            self.seq += 1;
            let seq = self.seq;
            let u = self.units.entry(unit.to_owned()).or_default();
            match u.claims.iter_mut().find(|(i, _)| *i == at) {
                Some(claim) => claim.1 = seq,
                None => u.claims.push((at, seq)),
            }
        } else {
            let Some(u) = self.units.get_mut(unit) else {
                return;
            };
            u.claims.retain(|(i, _)| *i != at);
            u.cause = Some(OfflineCause::Reported(reason));
        }
        self.reconcile(now, unit);
    }

    /// The devices a `list_devices` of instance `at` returned (one page or all): each is
    /// claimed by `at` unless `at` claims it already.
    pub fn snapshot<'a>(
        &mut self,
        now: Instant,
        at: InstanceIndex,
        units: impl IntoIterator<Item = &'a str>,
    ) {
        for unit in units {
            let u = self.units.entry(unit.to_owned()).or_default();
            if !u.claims.iter().any(|(i, _)| *i == at) {
                u.claims.push((at, SNAPSHOT));
                self.reconcile(now, unit);
            }
        }
    }

    /// The connection to instance `at` ended: it holds nothing any more as far as this
    /// manager can tell (its devices either reconnect elsewhere or are gone).
    pub fn instance_lost(&mut self, now: Instant, at: InstanceIndex) {
        let affected: Vec<String> = self
            .units
            .iter_mut()
            .filter_map(|(name, u)| {
                let before = u.claims.len();
                u.claims.retain(|(i, _)| *i != at);
                (u.claims.len() != before).then(|| {
                    u.cause = Some(OfflineCause::InstanceLost);
                    name.clone()
                })
            })
            .collect();
        for unit in affected {
            self.reconcile(now, &unit);
        }
    }

    /// When [`handle_timeout`](Self::handle_timeout) is due next, if anything waits.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.due.front().map(|(t, _)| *t)
    }

    /// Shows offline the devices whose settle time has passed without a new claim.
    pub fn handle_timeout(&mut self, now: Instant) {
        while let Some((t, _)) = self.due.front() {
            if *t > now {
                break;
            }
            let Some((t, unit)) = self.due.pop_front() else {
                break;
            };
            let Some(u) = self.units.get_mut(&unit) else {
                continue;
            };
            if u.offline_due == Some(t) && u.claims.is_empty() {
                self.show_offline(&unit);
            }
        }
    }

    /// The next change of the view.
    pub fn poll_change(&mut self) -> Option<PresenceChange> {
        self.changes.pop_front()
    }

    /// Where a command for `unit` should go first: the instance with the newest claim.
    /// `None` when no instance claims it (it may still be shown online while settling).
    pub fn location(&self, unit: &str) -> Option<InstanceIndex> {
        self.units.get(unit).and_then(Unit::best)
    }

    /// Where the view shows `unit`, `None` when offline.
    pub fn shown(&self, unit: &str) -> Option<InstanceIndex> {
        self.units.get(unit).and_then(|u| u.shown)
    }

    /// Every device the view shows online, with its instance, in no particular order.
    pub fn online(&self) -> impl Iterator<Item = (&str, InstanceIndex)> {
        self.units
            .iter()
            .filter_map(|(name, u)| u.shown.map(|i| (name.as_str(), i)))
    }

    /// How many devices the view shows online.
    pub fn online_count(&self) -> usize {
        self.units.values().filter(|u| u.shown.is_some()).count()
    }

    fn reconcile(&mut self, now: Instant, unit: &str) {
        let Some(u) = self.units.get_mut(unit) else {
            return;
        };
        match (u.shown, u.best()) {
            (None, Some(to)) => {
                u.shown = Some(to);
                u.offline_due = None;
                self.changes.push_back(PresenceChange::Online {
                    unit: unit.to_owned(),
                    at: to,
                });
            }
            (Some(from), Some(to)) => {
                u.offline_due = None;
                if from != to {
                    u.shown = Some(to);
                    self.changes.push_back(PresenceChange::Moved {
                        unit: unit.to_owned(),
                        from,
                        to,
                    });
                }
            }
            (Some(_), None) => {
                if self.settle.is_zero() {
                    self.show_offline(unit);
                } else if u.offline_due.is_none() {
                    let t = now + self.settle;
                    u.offline_due = Some(t);
                    self.due.push_back((t, unit.to_owned()));
                }
            }
            (None, None) => {
                self.units.remove(unit);
            }
        }
    }

    fn show_offline(&mut self, unit: &str) {
        let Some(u) = self.units.remove(unit) else {
            return;
        };
        if let Some(last) = u.shown {
            self.changes.push_back(PresenceChange::Offline {
                unit: unit.to_owned(),
                last,
                cause: u
                    .cause
                    .unwrap_or(OfflineCause::Reported(PresenceReason::Disconnected)),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: InstanceIndex = 0;
    const B: InstanceIndex = 1;
    const C: InstanceIndex = 2;
    const SETTLE: Duration = Duration::from_secs(2);

    fn changes(m: &mut PresenceMerge) -> Vec<PresenceChange> {
        std::iter::from_fn(|| m.poll_change()).collect()
    }

    fn online(unit: &str, at: InstanceIndex) -> PresenceChange {
        PresenceChange::Online {
            unit: unit.to_owned(),
            at,
        }
    }

    fn moved(unit: &str, from: InstanceIndex, to: InstanceIndex) -> PresenceChange {
        PresenceChange::Moved {
            unit: unit.to_owned(),
            from,
            to,
        }
    }

    fn on(m: &mut PresenceMerge, t: Instant, at: InstanceIndex, unit: &str) {
        m.presence(t, at, unit, true, PresenceReason::Connected);
    }

    fn off(m: &mut PresenceMerge, t: Instant, at: InstanceIndex, unit: &str) {
        m.presence(t, at, unit, false, PresenceReason::Disconnected);
    }

    #[test]
    fn a_move_reported_online_first_is_one_move_and_ends_at_the_new_instance() {
        for settle in [Duration::ZERO, SETTLE] {
            let t = Instant::now();
            let mut m = PresenceMerge::new(settle);
            on(&mut m, t, A, "d");
            on(&mut m, t, B, "d");
            off(&mut m, t, A, "d");
            m.handle_timeout(t + SETTLE * 2);
            assert_eq!(changes(&mut m), [online("d", A), moved("d", A, B)]);
            assert_eq!(m.shown("d"), Some(B));
            assert_eq!(m.location("d"), Some(B));
        }
    }

    #[test]
    fn a_move_reported_offline_first_is_one_move_within_the_settle_time() {
        let t = Instant::now();
        let mut m = PresenceMerge::new(SETTLE);
        on(&mut m, t, A, "d");
        off(&mut m, t, A, "d");
        // Still shown where it was while it settles; no instance to route to.
        assert_eq!(m.shown("d"), Some(A));
        assert_eq!(m.location("d"), None);
        assert_eq!(m.poll_timeout(), Some(t + SETTLE));
        on(&mut m, t + SETTLE / 2, B, "d");
        m.handle_timeout(t + SETTLE * 2);
        assert_eq!(changes(&mut m), [online("d", A), moved("d", A, B)]);
        assert_eq!(m.shown("d"), Some(B));
    }

    #[test]
    fn without_a_settle_time_offline_first_shows_offline_then_online_and_ends_at_the_new_instance()
    {
        let t = Instant::now();
        let mut m = PresenceMerge::new(Duration::ZERO);
        on(&mut m, t, A, "d");
        off(&mut m, t, A, "d");
        on(&mut m, t, B, "d");
        assert_eq!(
            changes(&mut m),
            [
                online("d", A),
                PresenceChange::Offline {
                    unit: "d".into(),
                    last: A,
                    cause: OfflineCause::Reported(PresenceReason::Disconnected)
                },
                online("d", B)
            ]
        );
        assert_eq!(m.shown("d"), Some(B));
    }

    #[test]
    fn a_device_gone_for_longer_than_the_settle_time_is_offline_with_its_reason() {
        let t = Instant::now();
        let mut m = PresenceMerge::new(SETTLE);
        on(&mut m, t, A, "d");
        m.presence(t, A, "d", false, PresenceReason::Dead);
        m.handle_timeout(t + SETTLE / 2);
        assert_eq!(changes(&mut m), [online("d", A)]);
        m.handle_timeout(t + SETTLE);
        assert_eq!(
            changes(&mut m),
            [PresenceChange::Offline {
                unit: "d".into(),
                last: A,
                cause: OfflineCause::Reported(PresenceReason::Dead)
            }]
        );
        assert_eq!(m.shown("d"), None);
        assert_eq!(m.online_count(), 0);
        assert_eq!(m.poll_timeout(), None);
    }

    #[test]
    fn a_lost_instance_moves_its_devices_to_where_they_reconnect_and_drops_the_rest() {
        let t = Instant::now();
        let mut m = PresenceMerge::new(SETTLE);
        for d in ["d1", "d2", "d3"] {
            on(&mut m, t, A, d);
        }
        on(&mut m, t, B, "other");
        changes(&mut m);
        // d1 reconnected to B before the manager noticed A was gone.
        on(&mut m, t, B, "d1");
        m.instance_lost(t, A);
        on(&mut m, t + Duration::from_secs(1), C, "d2");
        m.handle_timeout(t + SETTLE);
        assert_eq!(
            changes(&mut m),
            [
                moved("d1", A, B),
                moved("d2", A, C),
                PresenceChange::Offline {
                    unit: "d3".into(),
                    last: A,
                    cause: OfflineCause::InstanceLost
                }
            ]
        );
        let mut view: Vec<_> = m.online().collect();
        view.sort();
        assert_eq!(view, [("d1", B), ("d2", C), ("other", B)]);
    }

    #[test]
    fn a_reconnect_to_the_same_instance_changes_nothing() {
        let t = Instant::now();
        let mut m = PresenceMerge::new(SETTLE);
        on(&mut m, t, A, "d");
        m.presence(t, A, "d", true, PresenceReason::Reconnected);
        off(&mut m, t, A, "d");
        on(&mut m, t, A, "d");
        m.handle_timeout(t + SETTLE * 2);
        assert_eq!(changes(&mut m), [online("d", A)]);
        assert_eq!(m.shown("d"), Some(A));
    }

    #[test]
    fn the_newest_claim_wins_and_an_older_one_ending_changes_nothing() {
        let t = Instant::now();
        let mut m = PresenceMerge::new(Duration::ZERO);
        on(&mut m, t, A, "d");
        on(&mut m, t, B, "d");
        on(&mut m, t, A, "d");
        off(&mut m, t, B, "d");
        assert_eq!(
            changes(&mut m),
            [online("d", A), moved("d", A, B), moved("d", B, A)]
        );
        assert_eq!(m.shown("d"), Some(A));
    }

    #[test]
    fn a_snapshot_never_takes_a_device_from_the_instance_that_reported_it() {
        let t = Instant::now();
        let mut m = PresenceMerge::new(Duration::ZERO);
        on(&mut m, t, B, "d");
        m.snapshot(t, A, ["d", "e"]);
        assert_eq!(changes(&mut m), [online("d", B), online("e", A)]);
        assert_eq!(m.location("d"), Some(B));
        // A's snapshot claim stands in when B's claim ends, and A's own offline ends it.
        off(&mut m, t, B, "d");
        assert_eq!(changes(&mut m), [moved("d", B, A)]);
        off(&mut m, t, A, "d");
        assert!(matches!(
            changes(&mut m).as_slice(),
            [PresenceChange::Offline { last: A, .. }]
        ));
        // A snapshot repeating what presence said changes nothing.
        on(&mut m, t, C, "f");
        m.snapshot(t, C, ["f"]);
        assert_eq!(changes(&mut m), [online("f", C)]);
    }

    #[test]
    fn an_offline_for_a_device_never_seen_is_ignored() {
        let t = Instant::now();
        let mut m = PresenceMerge::new(SETTLE);
        off(&mut m, t, A, "ghost");
        m.instance_lost(t, B);
        assert_eq!(changes(&mut m), []);
        assert_eq!(m.poll_timeout(), None);
    }

    #[test]
    fn every_order_of_a_move_ends_online_once_at_the_new_instance() {
        // The old instance's offline, the new one's online, and possibly the loss of the
        // old instance, in every order: the view ends with the device at B, and with a
        // settle time it never shows it offline.
        let events = [0u8, 1, 2];
        let orders: [[u8; 3]; 6] = [
            [0, 1, 2],
            [0, 2, 1],
            [1, 0, 2],
            [1, 2, 0],
            [2, 0, 1],
            [2, 1, 0],
        ];
        for order in orders {
            for with_loss in [false, true] {
                let t = Instant::now();
                let mut m = PresenceMerge::new(SETTLE);
                on(&mut m, t, A, "d");
                for e in order {
                    match events[usize::from(e)] {
                        0 => off(&mut m, t, A, "d"),
                        1 => on(&mut m, t, B, "d"),
                        _ if with_loss => m.instance_lost(t, A),
                        _ => {}
                    }
                }
                m.handle_timeout(t + SETTLE * 2);
                assert_eq!(
                    changes(&mut m),
                    [online("d", A), moved("d", A, B)],
                    "order {order:?}, loss {with_loss}"
                );
                assert_eq!(m.shown("d"), Some(B));
            }
        }
    }
}
