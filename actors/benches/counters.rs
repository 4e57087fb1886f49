//! Criterion benches for the metrics hot path: what every answered op pays (atomic
//! counters), the flush that takes the deltas for the snapshot, a whole snapshot, and one
//! OpenTelemetry histogram record.
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

/// One OpenTelemetry histogram record with a device and an op kind: what an application's
/// own meter costs the metrics actor per answered op (twice: the duration and the attempt),
/// and what hipvisor's own endpoint no longer pays (it serves the flushed bucket counts).
fn otel_record(c: &mut Criterion) {
    use opentelemetry::KeyValue;
    use opentelemetry::metrics::MeterProvider;
    use opentelemetry_sdk::metrics::{InMemoryMetricExporter, PeriodicReader, SdkMeterProvider};
    let provider = SdkMeterProvider::builder()
        .with_reader(PeriodicReader::builder(InMemoryMetricExporter::default()).build())
        .build();
    let histogram = provider
        .meter("hipvisor")
        .f64_histogram("gpu.op.duration")
        .with_boundaries(hipvisor::metrics::DURATION_BUCKETS.to_vec())
        .build();
    let attrs = [KeyValue::new("device", 0i64), KeyValue::new("op", "mem_info")];
    c.bench_function("metrics: one OpenTelemetry histogram record (device, op)", |b| {
        b.iter(|| histogram.record(black_box(2.5e-6), &attrs))
    });
}

criterion_group!(benches, counters, snapshot, otel_record);
criterion_main!(benches);
