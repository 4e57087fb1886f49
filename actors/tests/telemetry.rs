//! The metrics actor records OpenTelemetry instruments, under the names of ARCHITECTURE.md,
//! on the meter the application passes in; they agree with the snapshot.

use hipvisor::core::fault_plan::FaultSpec;
use hipvisor::{Runtime, RuntimeConfig};
use opentelemetry::metrics::MeterProvider;
use opentelemetry_sdk::metrics::data::{AggregatedMetrics, MetricData, ResourceMetrics};
use opentelemetry_sdk::metrics::{InMemoryMetricExporter, PeriodicReader, SdkMeterProvider};

fn sum_u64(rm: &ResourceMetrics, name: &str) -> u64 {
    let mut total = 0;
    for sm in rm.scope_metrics() {
        for m in sm.metrics().filter(|m| m.name() == name) {
            match m.data() {
                AggregatedMetrics::U64(MetricData::Sum(s)) => total += s.data_points().map(|p| p.value()).sum::<u64>(),
                AggregatedMetrics::U64(MetricData::Histogram(h)) => {
                    total += h.data_points().map(|p| p.count()).sum::<u64>()
                }
                AggregatedMetrics::F64(MetricData::Histogram(h)) => {
                    total += h.data_points().map(|p| p.count()).sum::<u64>()
                }
                other => panic!("{name}: unexpected data {other:?}"),
            }
        }
    }
    total
}

fn has(rm: &ResourceMetrics, name: &str) -> bool {
    rm.scope_metrics().any(|sm| sm.metrics().any(|m| m.name() == name))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instruments_are_recorded_on_the_application_meter_and_match_the_snapshot() {
    let exporter = InMemoryMetricExporter::default();
    let provider = SdkMeterProvider::builder()
        .with_reader(PeriodicReader::builder(exporter.clone()).build())
        .build();
    let mut c = RuntimeConfig::default();
    c.runtime.isolation = hipvisor::core::config::Isolation::Thread;
    c.sim.devices = 2;
    c.sim.memory_bytes = 1 << 20;
    c.retry.initial_delay_ms = 1;
    c.retry.max_delay_ms = 2;
    c.sim.faults.push(FaultSpec {
        probability: Some(0.1),
        code: Some(600),
        ..FaultSpec::default()
    });
    let rt = Runtime::builder()
        .config(c)
        .meter(provider.meter("hipvisor"))
        .start()
        .await
        .unwrap();
    for d in 0..2 {
        let gpu = rt.device(d).unwrap();
        for _ in 0..100 {
            let _ = gpu.mem_info().await;
        }
    }
    let snapshot = rt.shutdown().await;
    provider.force_flush().unwrap();
    let exported = exporter.get_finished_metrics().unwrap();
    let last = exported.last().expect("an export");
    assert!(snapshot.retries.attempts > 0, "the plan causes retries");
    assert_eq!(sum_u64(last, "gpu.retry.attempts"), snapshot.retries.attempts);
    assert_eq!(sum_u64(last, "gpu.retry.success"), snapshot.retries.succeeded);
    assert_eq!(sum_u64(last, "gpu.ops"), snapshot.ops_total);
    assert_eq!(sum_u64(last, "gpu.op.duration"), snapshot.ops_total);
    assert_eq!(sum_u64(last, "gpu.retry.attempt"), snapshot.ops_succeeded);
    assert!(has(last, "gpu.device.state"));
    assert_eq!(snapshot.ops_total, 200);
}
