//! Hot-path micro-benchmarks: devgate frame encode/decode, WebSocket decode with in-place
//! unmasking, header parsing and the mask itself, for the frame sizes the gateway routes most.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use devgate_proto::frame::{self, Frame};
use devgate_proto::ws::{self, Decoded, Decoder, Opcode, Role};

fn frames(c: &mut Criterion) {
    let mut g = c.benchmark_group("devgate_frame");
    for size in [64usize, 1024, 16 * 1024] {
        let payload = vec![0xa5u8; size];
        let f = Frame::command("00:E0:C5:12:34:56", 42, &payload);
        let mut encoded = Vec::new();
        f.encode(&mut encoded);
        g.throughput(Throughput::Bytes(encoded.len() as u64));
        g.bench_function(format!("encode_ws/{size}"), |b| {
            let mut out = Vec::with_capacity(size + 64);
            b.iter(|| {
                out.clear();
                frame::encode_ws(&mut out, black_box(&f), None);
                black_box(out.len())
            });
        });
        g.bench_function(format!("decode/{size}"), |b| {
            b.iter(|| black_box(Frame::decode(black_box(&encoded)).map(|f| f.id)))
        });
    }
    g.finish();
}

fn websocket(c: &mut Criterion) {
    let mut g = c.benchmark_group("websocket");
    for size in [64usize, 1024, 16 * 1024] {
        let payload = vec![0x3cu8; size];
        let mut wire = Vec::new();
        ws::encode_frame(&mut wire, Opcode::Binary, &payload, Some([1, 2, 3, 4]));
        g.throughput(Throughput::Bytes(wire.len() as u64));
        g.bench_function(format!("decode_masked/{size}"), |b| {
            let mut dec = Decoder::new(Role::Server, 1 << 20);
            let mut buf = wire.clone();
            b.iter(|| {
                buf.copy_from_slice(&wire);
                match dec.decode(black_box(&mut buf)) {
                    Ok(Decoded::Frame { consumed, .. }) => black_box(consumed),
                    _ => 0,
                }
            });
        });
        g.bench_function(format!("mask/{size}"), |b| {
            let mut buf = payload.clone();
            b.iter(|| ws::apply_mask(black_box(&mut buf), black_box([9, 8, 7, 6])));
        });
        g.bench_function(format!("encode_masked/{size}"), |b| {
            let mut out = Vec::with_capacity(size + 16);
            b.iter(|| {
                out.clear();
                ws::encode_frame(
                    &mut out,
                    Opcode::Binary,
                    black_box(&payload),
                    Some([1, 2, 3, 4]),
                );
                black_box(out.len())
            });
        });
        g.bench_function(format!("header_parse/{size}"), |b| {
            let dec = Decoder::new(Role::Server, 1 << 20);
            b.iter(|| black_box(dec.needed(black_box(&wire))));
        });
    }
    g.finish();
}

criterion_group!(benches, frames, websocket);
criterion_main!(benches);
