//! The TLS record path with the gateway's rustls configuration, in memory: a device seals a
//! small application-data record and the gateway opens it (and the reverse), and a full
//! TLS 1.3 mutual-TLS handshake (both sides' CPU).

use criterion::{Criterion, Throughput, criterion_group, criterion_main};

fn tls(c: &mut Criterion) {
    let mut g = c.benchmark_group("tls");
    let mut w = match bench::Workload::new("tls_seal_open_64") {
        Ok(w) => w,
        Err(e) => panic!("seal_open: {e:#}"),
    };
    g.throughput(Throughput::Elements(1));
    g.bench_function("seal_open/64", |b| {
        b.iter_custom(|iters| {
            let t = std::time::Instant::now();
            if let Err(e) = w.run(iters) {
                panic!("seal_open: {e:#}");
            }
            t.elapsed()
        })
    });
    let mut hs = match bench::Workload::new("tls_handshake_mtls") {
        Ok(w) => w,
        Err(e) => panic!("handshake: {e:#}"),
    };
    g.sample_size(20);
    g.bench_function("handshake_mtls_full", |b| {
        b.iter_custom(|iters| {
            let t = std::time::Instant::now();
            if let Err(e) = hs.run(iters) {
                panic!("handshake: {e:#}");
            }
            t.elapsed()
        })
    });
    g.finish();
}

criterion_group!(benches, tls);
criterion_main!(benches);
