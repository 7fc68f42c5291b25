//! Behaviour every [`Store`] implementation must have: the SQLite store's unit tests and
//! the PostgreSQL suite (tests/tests/fleet.rs) run these same functions, each on an empty
//! store. Test support only: they panic on the first difference.
#![allow(clippy::unwrap_used, missing_docs)]

use super::{
    CredChange, KeyCheck, KeyKind, RefusalReason, Store, TrustAck, UnitRevocation, generate_secret,
    key_id, new_key,
};

pub fn one_time_key_is_consumed_once_and_retry_by_same_unit_is_allowed(s: &dyn Store) {
    let secret = generate_secret();
    s.create_keys(&[new_key(&secret, KeyKind::OneTime, None, None, 100)])
        .expect("create");
    assert_eq!(
        s.enroll(&secret, "u1", "fp1", 101, 600).expect("enroll"),
        KeyCheck::Accepted
    );
    assert_eq!(
        s.enroll(&secret, "u2", "fp2", 102, 600).expect("enroll"),
        KeyCheck::Refused(RefusalReason::AlreadyUsed)
    );
    assert_eq!(
        s.enroll(&secret, "u1", "fp3", 103, 600).expect("retry"),
        KeyCheck::Accepted
    );
    assert_eq!(
        s.enroll(&secret, "u1", "fp4", 10_000, 600)
            .expect("late retry"),
        KeyCheck::Refused(RefusalReason::AlreadyUsed)
    );
    let keys = s.list_keys().expect("list");
    assert_eq!(keys[0].uses, 2);
    assert_eq!(keys[0].used_by.as_deref(), Some("u1"));
}

pub fn bound_multi_expired_revoked_and_wrong_secret(s: &dyn Store) {
    let bound = generate_secret();
    let multi = generate_secret();
    let expiring = generate_secret();
    s.create_keys(&[
        new_key(&bound, KeyKind::Bound, Some("u9".into()), None, 0),
        new_key(&multi, KeyKind::Multi, None, None, 0),
        new_key(&expiring, KeyKind::Multi, None, Some(50), 0),
    ])
    .expect("create");
    assert_eq!(
        s.enroll(&bound, "u8", "f", 1, 0).expect("e"),
        KeyCheck::Refused(RefusalReason::WrongUnit)
    );
    assert_eq!(
        s.enroll(&bound, "u9", "f", 1, 0).expect("e"),
        KeyCheck::Accepted
    );
    for i in 0..5 {
        assert_eq!(
            s.enroll(&multi, &format!("m{i}"), "f", 1, 0).expect("e"),
            KeyCheck::Accepted
        );
    }
    assert_eq!(
        s.enroll(&expiring, "x", "f", 60, 0).expect("e"),
        KeyCheck::Refused(RefusalReason::Expired)
    );
    assert_eq!(
        s.enroll("WRONG-WRONG", "x", "f", 1, 0).expect("e"),
        KeyCheck::Refused(RefusalReason::UnknownKey)
    );
    assert!(s.revoke_key(&key_id(&multi), 2).expect("revoke"));
    assert_eq!(
        s.enroll(&multi, "m9", "f", 3, 0).expect("e"),
        KeyCheck::Refused(RefusalReason::Revoked)
    );
    assert_eq!(s.devices().expect("devices").len(), 6);
}

pub fn revocation_log_and_revoked_units_cannot_enroll(s: &dyn Store) {
    let multi = generate_secret();
    s.create_keys(&[new_key(&multi, KeyKind::Multi, None, None, 0)])
        .expect("create");
    assert_eq!(
        s.revoke_device("never", 5).expect("revoke"),
        UnitRevocation::Unknown
    );
    assert_eq!(
        s.enroll(&multi, "bad", "f1", 4, 0).expect("e"),
        KeyCheck::Accepted
    );
    assert_eq!(
        s.revoke_device("bad", 5).expect("revoke"),
        UnitRevocation::Revoked
    );
    assert_eq!(
        s.revoke_device("bad", 6).expect("again"),
        UnitRevocation::AlreadyRevoked
    );
    assert!(s.revoked_certs().expect("certs").contains(&"f1".to_owned()));
    assert_eq!(
        s.enroll(&multi, "bad", "f", 7, 0).expect("e"),
        KeyCheck::Refused(RefusalReason::UnitRevoked)
    );
    let (events, last) = s.revocations_since(0).expect("since");
    assert_eq!(events, vec!["bad".to_owned()]);
    assert!(s.unrevoke_device("bad", 8).expect("lift"));
    let (events, _) = s.revocations_since(last).expect("since");
    assert_eq!(events, vec!["-bad".to_owned()]);
    // Lifted: the unit is reset, so only a key bound to it and made since may enroll.
    assert_eq!(
        s.enroll(&multi, "bad", "f2", 9, 0).expect("e"),
        KeyCheck::Refused(RefusalReason::ResetNeedsBoundKey)
    );
    let bound = generate_secret();
    s.create_keys(&[new_key(&bound, KeyKind::Bound, Some("bad".into()), None, 9)])
        .expect("create");
    assert_eq!(
        s.enroll(&bound, "bad", "f2", 10, 0).expect("e"),
        KeyCheck::Accepted
    );
}

pub fn enrolled_units_cannot_be_taken_over_and_reset_needs_a_fresh_bound_key(s: &dyn Store) {
    let multi = generate_secret();
    let one = generate_secret();
    let early_bound = generate_secret();
    s.create_keys(&[
        new_key(&multi, KeyKind::Multi, None, None, 0),
        new_key(&one, KeyKind::OneTime, None, None, 0),
        new_key(&early_bound, KeyKind::Bound, Some("u".into()), None, 0),
    ])
    .expect("create");
    assert_eq!(
        s.enroll(&multi, "u", "f1", 1, 600).expect("e"),
        KeyCheck::Accepted
    );
    for key in [&multi, &one, &early_bound] {
        assert_eq!(
            s.enroll(key, "u", "f2", 2, 600).expect("e"),
            KeyCheck::Refused(RefusalReason::AlreadyEnrolled)
        );
    }
    assert_eq!(
        s.device_creds("u").expect("c").and_then(|c| c.current),
        Some("f1".into())
    );
    assert!(s.reset_device("u", 10).expect("reset"));
    assert!(!s.reset_device("nobody", 10).expect("reset"));
    assert_eq!(
        s.device_creds("u").expect("c").map(|c| c.current),
        Some(None)
    );
    for key in [&multi, &one, &early_bound] {
        assert_eq!(
            s.enroll(key, "u", "f3", 11, 600).expect("e"),
            KeyCheck::Refused(RefusalReason::ResetNeedsBoundKey)
        );
    }
    let bound = generate_secret();
    s.create_keys(&[new_key(&bound, KeyKind::Bound, Some("u".into()), None, 10)])
        .expect("create");
    assert_eq!(
        s.enroll(&bound, "u", "f3", 12, 600).expect("e"),
        KeyCheck::Accepted
    );
    // The lost-answer retry: allowed while the certificate never connected...
    assert_eq!(
        s.enroll(&bound, "u", "f4", 13, 600).expect("e"),
        KeyCheck::Accepted
    );
    // ...and not once it has.
    s.mark_cert_used("u", "f4", 14).expect("used");
    assert_eq!(
        s.enroll(&bound, "u", "f5", 15, 600).expect("e"),
        KeyCheck::Refused(RefusalReason::AlreadyUsed)
    );
}

pub fn renewal_needs_the_current_certificate_and_keeps_the_previous_for_the_overlap(s: &dyn Store) {
    s.register_device("u", "f1", 0).expect("register");
    assert_eq!(
        s.renew("u", "other", "f2", 1, 100).expect("renew"),
        KeyCheck::Refused(RefusalReason::NotCurrent)
    );
    assert_eq!(
        s.renew("u", "f1", "f2", 1, 100).expect("renew"),
        KeyCheck::Accepted
    );
    let c = s.device_creds("u").expect("c").expect("known");
    assert_eq!(c.current.as_deref(), Some("f2"));
    assert_eq!(c.previous, Some(("f1".into(), 101)));
    // Lost answer: the previous certificate renews again while the new one is unused.
    assert_eq!(
        s.renew("u", "f1", "f3", 2, 100).expect("renew"),
        KeyCheck::Accepted
    );
    s.mark_cert_used("u", "f3", 3).expect("used");
    let c = s.device_creds("u").expect("c").expect("known");
    assert_eq!(c.previous, None, "first use ends the overlap");
    assert_eq!(
        s.renew("u", "f1", "f4", 4, 100).expect("renew"),
        KeyCheck::Refused(RefusalReason::NotCurrent)
    );
    assert!(s.revoke_cert("f3", 5).expect("revoke"));
    assert!(!s.revoke_cert("f3", 5).expect("again"));
    assert_eq!(
        s.renew("u", "f3", "f5", 6, 100).expect("renew"),
        KeyCheck::Refused(RefusalReason::Revoked)
    );
    let (changes, last) = s.cred_changes_since(0).expect("changes");
    assert!(changes.contains(&CredChange::Cert("f3".into())));
    assert_eq!(last, s.cred_change_head().expect("head"));
}

pub fn manager_certificates_are_recorded_listed_and_revoked(s: &dyn Store) {
    assert_eq!(s.manager_creds("ops").expect("m"), None);
    s.record_manager_cert("ops", "m1", 1, "issue").expect("rec");
    s.record_manager_cert("ops", "m1", 1, "issue")
        .expect("idempotent");
    s.record_manager_cert("ops", "m2", 2, "issue").expect("rec");
    assert_eq!(
        s.manager_creds("ops").expect("m"),
        Some(vec!["m1".into(), "m2".into()])
    );
    assert!(s.revoke_cert("m1", 3).expect("revoke"));
    assert_eq!(s.manager_creds("ops").expect("m"), Some(vec!["m2".into()]));
    assert_eq!(s.revoke_manager("ops", 4).expect("revoke"), 1);
    assert_eq!(s.manager_creds("ops").expect("m"), Some(vec![]));
    // A name never recorded becomes known, with nothing accepted.
    assert_eq!(s.revoke_manager("legacy", 5).expect("revoke"), 0);
    assert_eq!(s.manager_creds("legacy").expect("m"), Some(vec![]));
    assert_eq!(s.manager_certs().expect("list").len(), 3);
}

pub fn trust_progress_counts_enrolled_unrevoked_devices_and_managers(s: &dyn Store) {
    for unit in ["a", "b", "c", "gone"] {
        s.register_device(unit, "f", 1).expect("register");
    }
    s.revoke_device("gone", 2).expect("revoke");
    let ack = |kind, name: &str, bundle: &str| TrustAck {
        bundle: bundle.into(),
        kind,
        name: name.into(),
    };
    s.record_trust_acks(
        &[
            ack("device", "a", "B1"),
            ack("device", "a", "B1"),
            ack("device", "gone", "B1"),
            ack("device", "unknown", "B1"),
            ack("device", "b", "OLD"),
            ack("manager", "ums", "B1"),
        ],
        3,
    )
    .expect("acks");
    let p = s.trust_progress("B1").expect("progress");
    assert_eq!((p.devices_acked, p.devices_total), (1, 3));
    assert_eq!(p.managers_acked, vec!["ums".to_owned()]);
    assert_eq!(s.trust_progress("none").expect("p").devices_acked, 0);
}
