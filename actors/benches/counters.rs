//! Criterion benches for the metrics hot path: what every answered op pays (atomic
//! counters), the flush that takes the deltas for the snapshot, and a whole snapshot.
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

/// `Runtime::snapshot` on 4 simulated devices with traffic behind them: every device's
/// deltas flushed to the metrics actor, aggregated, and the snapshot cloned back.
fn snapshot(c: &mut Criterion) {
    let tokio = tokio::runtime::Runtime::new().expect("tokio");
    let rt = tokio.block_on(async {
        let mut config = hipvisor::RuntimeConfig::default();
        config.runtime.isolation = hipvisor::core::config::Isolation::Thread;
        config.sim.devices = 4;
        let rt = hipvisor::Runtime::builder()
            .config(config)
            .start()
            .await
            .expect("runtime");
        for d in 0..4 {
            let gpu = rt.device(d).expect("device");
            for _ in 0..100 {
                gpu.mem_info().await.expect("mem-info");
            }
        }
        rt
    });
    c.bench_function("metrics: a snapshot of 4 devices (flush, aggregate, clone)", |b| {
        b.iter(|| black_box(tokio.block_on(rt.snapshot()).expect("snapshot")))
    });
    tokio.block_on(rt.shutdown());
}

criterion_group!(benches, counters, snapshot);
criterion_main!(benches);
