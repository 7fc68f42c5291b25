//! The session map (unit ID → connection) under contention from two threads, the size of
//! this machine: dashmap (what the gateway uses) against papaya and scc, the lock-free
//! candidates. Workloads:
//! - `lookup`: both threads look up random sessions among 10,000 (routing a command);
//! - `insert_remove`: both threads insert and remove their own sessions (devices
//!   connecting and leaving, e.g. during a reconnect storm);
//! - `lookup_under_churn`: one thread looks up while the other inserts and removes; the
//!   time of the lookup thread is reported.
//!
//! Times are per operation per thread (`iter_custom` runs `iters` operations on each
//! thread at once). The decision is recorded in docs/ARCHITECTURE.md.

use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};

type Key = Arc<str>;

trait SessionMap: Send + Sync + 'static {
    fn name() -> &'static str;
    fn new() -> Self;
    fn insert(&self, k: Key, v: u64);
    fn lookup(&self, k: &str) -> Option<u64>;
    fn remove(&self, k: &str) -> Option<u64>;
}

struct Dash(dashmap::DashMap<Key, u64>);
impl SessionMap for Dash {
    fn name() -> &'static str {
        "dashmap"
    }
    fn new() -> Self {
        Self(dashmap::DashMap::new())
    }
    fn insert(&self, k: Key, v: u64) {
        self.0.insert(k, v);
    }
    fn lookup(&self, k: &str) -> Option<u64> {
        self.0.get(k).map(|v| *v)
    }
    fn remove(&self, k: &str) -> Option<u64> {
        self.0.remove(k).map(|(_, v)| v)
    }
}

struct Papaya(papaya::HashMap<Key, u64>);
impl SessionMap for Papaya {
    fn name() -> &'static str {
        "papaya"
    }
    fn new() -> Self {
        Self(papaya::HashMap::new())
    }
    fn insert(&self, k: Key, v: u64) {
        self.0.pin().insert(k, v);
    }
    fn lookup(&self, k: &str) -> Option<u64> {
        self.0.pin().get(k).copied()
    }
    fn remove(&self, k: &str) -> Option<u64> {
        self.0.pin().remove(k).copied()
    }
}

struct Scc(scc::HashMap<Key, u64>);
impl SessionMap for Scc {
    fn name() -> &'static str {
        "scc"
    }
    fn new() -> Self {
        Self(scc::HashMap::new())
    }
    fn insert(&self, k: Key, v: u64) {
        let _ = self.0.insert_sync(k, v);
    }
    fn lookup(&self, k: &str) -> Option<u64> {
        self.0.read_sync(k, |_, v| *v)
    }
    fn remove(&self, k: &str) -> Option<u64> {
        self.0.remove_sync(k).map(|(_, v)| v)
    }
}

const SESSIONS: usize = 10_000;

fn keys(n: usize, tag: &str) -> Vec<Key> {
    bench::unit_ids(n)
        .into_iter()
        .map(|s| Arc::from(format!("{tag}{s}").as_str()))
        .collect()
}

fn bench_map<M: SessionMap>(c: &mut Criterion) {
    let mut g = c.benchmark_group("session_map");
    g.measurement_time(Duration::from_secs(2));
    let resident = keys(SESSIONS, "");
    let map = Arc::new(M::new());
    for (i, k) in resident.iter().enumerate() {
        map.insert(k.clone(), i as u64);
    }
    let ids: Arc<Vec<Key>> = Arc::new(resident);

    let lookup_ids = ids.clone();
    g.bench_function(format!("lookup/{}", M::name()), |b| {
        b.iter_custom(|iters| {
            let ids = lookup_ids.clone();
            let map = map.clone();
            let handles: Vec<_> = (0..2u64)
                .map(|t| {
                    let (map, ids) = (map.clone(), ids.clone());
                    std::thread::spawn(move || {
                        let start = Instant::now();
                        let n = ids.len() as u64;
                        for i in 0..iters {
                            black_box(map.lookup(&ids[((i * 7919 + t * 13) % n) as usize]));
                        }
                        start.elapsed()
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_default())
                .sum::<Duration>()
                / 2
        })
    });

    let churn: Arc<[Vec<Key>; 2]> = Arc::new([keys(SESSIONS, "a"), keys(SESSIONS, "b")]);
    let churn_keys = churn.clone();
    g.bench_function(format!("insert_remove/{}", M::name()), |b| {
        b.iter_custom(|iters| {
            let churn = churn_keys.clone();
            let map = map.clone();
            let handles: Vec<_> = (0..2usize)
                .map(|t| {
                    let (map, churn) = (map.clone(), churn.clone());
                    std::thread::spawn(move || {
                        let mine = &churn[t];
                        let start = Instant::now();
                        for i in 0..iters {
                            let k = &mine[(i as usize) % mine.len()];
                            map.insert(k.clone(), i);
                            black_box(map.remove(k));
                        }
                        start.elapsed()
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_default())
                .sum::<Duration>()
                / 2
        })
    });

    g.bench_function(format!("lookup_under_churn/{}", M::name()), |b| {
        b.iter_custom(|iters| {
            let stop = Arc::new(AtomicBool::new(false));
            let churner = {
                let (map, churn, stop) = (map.clone(), churn.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut i = 0usize;
                    while !stop.load(Ordering::Relaxed) {
                        let k = &churn[0][i % SESSIONS];
                        map.insert(k.clone(), i as u64);
                        black_box(map.remove(k));
                        i += 1;
                    }
                })
            };
            let start = Instant::now();
            let n = ids.len() as u64;
            for i in 0..iters {
                black_box(map.lookup(&ids[((i * 7919) % n) as usize]));
            }
            let t = start.elapsed();
            stop.store(true, Ordering::Relaxed);
            let _ = churner.join();
            t
        })
    });
    g.finish();
}

fn maps(c: &mut Criterion) {
    bench_map::<Dash>(c);
    bench_map::<Papaya>(c);
    bench_map::<Scc>(c);
}

criterion_group!(benches, maps);
criterion_main!(benches);
