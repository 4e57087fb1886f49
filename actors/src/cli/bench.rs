//! `hipvisor bench`: throughput of the runtime against a baseline measured in the same run,
//! reported as medians with min–max over repetitions, and as ratios (absolute figures
//! depend on the machine; ratios travel).
//!
//! Measured now (the benchmarks issue adds the rest of its list to the same report):
//! - `channel_baseline_pipelined`: a tokio mpsc + oneshot round trip to a task, 64 in flight
//!   (the floor any actor runtime pays);
//! - `runtime_thread_pipelined_null`: mem-info on one simulated device in thread isolation,
//!   64 in flight, telemetry off;
//! - `telemetry_on_pipelined` / `telemetry_off_pipelined`: the same with the Prometheus
//!   exporter recording instruments, and with a no-op meter.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use clap::Args;
use hipvisor::core::config::Isolation;
use hipvisor::{Runtime, RuntimeConfig};
use serde_json::json;

use crate::CommonArgs;

/// Flags of `hipvisor bench`.
#[derive(Args, Debug)]
pub(crate) struct BenchArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Ops per measurement.
    #[arg(long, default_value_t = 100_000)]
    ops: u64,
    /// Repetitions of each measurement.
    #[arg(long, default_value_t = 5)]
    reps: u32,
    /// Print one JSON object on stdout.
    #[arg(long)]
    json: bool,
}

const IN_FLIGHT: u64 = 64;

/// Median, min and max of nanoseconds per op.
fn stats(mut v: Vec<f64>) -> serde_json::Value {
    v.sort_by(f64::total_cmp);
    json!({"median": v[v.len() / 2], "min": v[0], "max": v[v.len() - 1]})
}

async fn channel_baseline(ops: u64) -> f64 {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(u64, tokio::sync::oneshot::Sender<u64>)>(1024);
    let server = tokio::spawn(async move {
        while let Some((x, reply)) = rx.recv().await {
            let _ = reply.send(x + 1);
        }
    });
    let started = Instant::now();
    let clients: Vec<_> = (0..IN_FLIGHT)
        .map(|_| {
            let tx = tx.clone();
            tokio::spawn(async move {
                for i in 0..ops / IN_FLIGHT {
                    let (reply, answer) = tokio::sync::oneshot::channel();
                    let _ = tx.send((i, reply)).await;
                    let _ = answer.await;
                }
            })
        })
        .collect();
    for c in clients {
        let _ = c.await;
    }
    let ns = started.elapsed().as_nanos() as f64 / (ops / IN_FLIGHT * IN_FLIGHT) as f64;
    drop(tx);
    let _ = server.await;
    ns
}

async fn runtime_pipelined(mut config: RuntimeConfig, ops: u64, telemetry: bool) -> Result<f64, String> {
    config.runtime.isolation = Isolation::Thread;
    config.sim.devices = 1;
    config.sim.faults.clear();
    let mut builder = Runtime::builder().config(config);
    if telemetry {
        builder = builder.serve_metrics("127.0.0.1:0".parse().expect("an address"));
    } else {
        builder = builder.meter(opentelemetry::metrics::MeterProvider::meter(
            &opentelemetry::metrics::noop::NoopMeterProvider::new(),
            "hipvisor",
        ));
    }
    let rt = Arc::new(builder.start().await.map_err(|e| e.to_string())?);
    let started = Instant::now();
    let clients: Vec<_> = (0..IN_FLIGHT)
        .map(|_| {
            let gpu = rt.device(0).expect("device 0");
            tokio::spawn(async move {
                for _ in 0..ops / IN_FLIGHT {
                    let _ = gpu.mem_info().await;
                }
            })
        })
        .collect();
    for c in clients {
        let _ = c.await;
    }
    let ns = started.elapsed().as_nanos() as f64 / (ops / IN_FLIGHT * IN_FLIGHT) as f64;
    if let Ok(rt) = Arc::try_unwrap(rt) {
        rt.shutdown().await;
    }
    Ok(ns)
}

/// Runs the benchmarks and prints the report.
pub(crate) fn main(args: BenchArgs) -> ExitCode {
    let config = match args.common.load() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("hipvisor: {e}");
            return ExitCode::from(2);
        }
    };
    let Ok(rt) = tokio::runtime::Builder::new_multi_thread().enable_all().build() else {
        eprintln!("hipvisor: cannot start tokio");
        return ExitCode::FAILURE;
    };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let reps = args.reps.max(1);
    let result: Result<serde_json::Value, String> = rt.block_on(async {
        let (mut base, mut thread, mut on, mut off) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for rep in 0..reps {
            eprintln!("bench: repetition {} of {reps}", rep + 1);
            base.push(channel_baseline(args.ops).await);
            thread.push(runtime_pipelined(config.clone(), args.ops, false).await?);
            // Alternate the order, so drift on a shared machine does not favour one side.
            if rep % 2 == 0 {
                on.push(runtime_pipelined(config.clone(), args.ops, true).await?);
                off.push(runtime_pipelined(config.clone(), args.ops, false).await?);
            } else {
                off.push(runtime_pipelined(config.clone(), args.ops, false).await?);
                on.push(runtime_pipelined(config.clone(), args.ops, true).await?);
            }
        }
        let median = |v: &Vec<f64>| {
            let mut s = v.clone();
            s.sort_by(f64::total_cmp);
            s[s.len() / 2]
        };
        let ratios = json!({
            "runtime_thread_pipelined_null / channel_baseline_pipelined": median(&thread) / median(&base),
            "telemetry_on_pipelined / telemetry_off_pipelined": median(&on) / median(&off),
        });
        Ok(json!({
            "backend": "sim",
            "cores": cores,
            "ops_per_measurement": args.ops,
            "repetitions": reps,
            "results": [
                {"name": "channel_baseline_pipelined", "ns_per_op": stats(base)},
                {"name": "runtime_thread_pipelined_null", "ns_per_op": stats(thread)},
                {"name": "telemetry_on_pipelined", "ns_per_op": stats(on)},
                {"name": "telemetry_off_pipelined", "ns_per_op": stats(off)},
            ],
            "ratios": ratios,
        }))
    });
    match result {
        Ok(report) if args.json => {
            println!("{report}");
            ExitCode::SUCCESS
        }
        Ok(report) => {
            println!("{}", serde_json::to_string_pretty(&report).unwrap_or_default());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("hipvisor: bench: {e}");
            ExitCode::FAILURE
        }
    }
}
