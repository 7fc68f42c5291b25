//! The deadline queues (the clock is read here, in the test, never in the core).

use std::time::{Duration, Instant};

use devgate_core::timers::FifoTimers;

#[test]
fn pops_only_what_is_due_in_order() {
    let t0 = Instant::now();
    let mut q = FifoTimers::default();
    for i in 0..1000u32 {
        q.push(t0 + Duration::from_millis(u64::from(i)), i, 7);
    }
    let mut popped = Vec::new();
    while let Some(t) = q.pop_due(t0 + Duration::from_millis(9)) {
        popped.push(t.slot);
    }
    assert_eq!(popped, (0..10).collect::<Vec<_>>());
    assert_eq!(q.len(), 990);
    assert_eq!(q.next_due(), Some(t0 + Duration::from_millis(10)));
    assert_eq!(q.pop_oldest().map(|t| t.slot), Some(10));
}
