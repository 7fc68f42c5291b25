//! Reconnect backoff: exponential growth, full jitter, cap, reset.

use std::time::Duration;

use devgate_client::Backoff;

#[test]
fn delays_stay_under_the_exponential_ceiling_and_the_cap() {
    let base = Duration::from_millis(100);
    let cap = Duration::from_secs(30);
    let mut b = Backoff::new(base, cap);
    for attempt in 0..100u32 {
        let ceiling = base.saturating_mul(1 << attempt.min(31)).min(cap);
        assert_eq!(b.current_ceiling(), ceiling, "attempt {attempt}");
        let d = b.next_delay();
        assert!(d <= ceiling, "attempt {attempt}: {d:?} > {ceiling:?}");
    }
    // Far past the cap, the ceiling stays at the cap.
    assert_eq!(b.current_ceiling(), cap);
    b.reset();
    assert_eq!(b.current_ceiling(), base);
    assert!(b.next_delay() <= base);
}

#[test]
fn delays_are_jittered_over_the_whole_range() {
    let cap = Duration::from_secs(30);
    let mut b = Backoff::new(Duration::from_millis(100), cap);
    for _ in 0..20 {
        b.next_delay();
    }
    let samples: Vec<Duration> = (0..1000).map(|_| b.next_delay()).collect();
    let below_half = samples.iter().filter(|d| **d < cap / 2).count();
    // Uniform on [0, 30 s]: about half below 15 s; all distinct in practice.
    assert!(
        (350..650).contains(&below_half),
        "{below_half} of 1000 below half"
    );
    assert!(samples.iter().any(|d| *d < cap / 10));
    assert!(samples.iter().any(|d| *d > cap * 9 / 10));
}

#[test]
fn default_is_100ms_base_30s_cap() {
    let mut b = Backoff::default();
    assert_eq!(b.current_ceiling(), Duration::from_millis(100));
    for _ in 0..40 {
        assert!(b.next_delay() <= Duration::from_secs(30));
    }
    assert_eq!(b.current_ceiling(), Duration::from_secs(30));
}
