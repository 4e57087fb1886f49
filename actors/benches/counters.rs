//! Criterion benches for the metrics hot path: what every answered op pays (atomic
//! counters), and the flush that takes the deltas for the snapshot.
//! `cargo bench -p hipvisor`.

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use hipvisor::OpKind;
use hipvisor::metrics::{DeviceCounters, Outcome};

fn counters(c: &mut Criterion) {
    let counters = DeviceCounters::default();
    c.bench_function("metrics: count one answered op", |b| {
        b.iter(|| {
            counters.opened();
            counters.answered(
                black_box(OpKind::MemInfo),
                Outcome::Success,
                black_box(Duration::from_micros(3)),
                1,
                false,
            )
        })
    });
    c.bench_function("metrics: take the deltas (a flush, per device)", |b| {
        b.iter(|| black_box(counters.take()))
    });
}

criterion_group!(benches, counters);
criterion_main!(benches);
