//! `hipvisor bench`: the runtime against baselines measured in the same run, reported as
//! medians with min–max over repetitions, and as ratios (absolute figures depend on the
//! machine; ratios travel).
//!
//! - `channel_baseline_serial` / `_pipelined`: a tokio mpsc + oneshot round trip to a task,
//!   awaited one at a time / 64 in flight — the floor any actor runtime pays;
//! - `direct_null`, `direct_launch_sync`: the backend called directly (mem-info; a small
//!   kernel launch + synchronize), no runtime;
//! - `runtime_{thread,process}_serial_null`, `runtime_{thread,process}_pipelined_null` (64 in
//!   flight), `runtime_{thread,process}_launch_sync`;
//! - `runtime_{thread,process}_batch_null`: [`BATCH_CALLERS`] callers each submitting
//!   batches of 64 mem-infos with `DeviceHandle::submit_batch`, one after another;
//! - `direct_h2d`, `runtime_{thread,process}_h2d` (GB/s; 256 MiB by default, from a
//!   runtime host buffer, so process isolation copies from shared memory);
//! - `recovery_sticky_process_ms`, `recovery_sticky_standby_ms`: a sticky fault → the next
//!   successful op on that device, with a cold worker and with a warm standby;
//! - `telemetry_on_pipelined`, `telemetry_off_pipelined`: the Prometheus exporter recording,
//!   the endpoint served and polled as a dashboard and a scraper would (every second:
//!   `/api/snapshot`, `/api/history`, `/metrics`), against a no-op meter and no endpoint (the
//!   metrics actor and its history run in both); thirty times `--ops` each;
//! - `runtime_{thread,process}_ops8_us`, `runtime_{thread,process}_task8_us`: one request of
//!   8 ops (alloc, copy in, 4 launches, copy out, free), one caller, submitted op by op and
//!   as one task;
//! - `request_fault_cold_ms`, `request_fault_standby_ms`: the latency a sticky fault adds to
//!   the request it hits (its latency less the median request's), on one device in process
//!   isolation with durable weights, with a cold worker and with a warm standby that holds
//!   them;
//! - with feature `cluster`, `remote_{serial,pipelined}_null` and `remote_{h2d,d2h}`: the
//!   thread-isolation device through a `hipvisor node` on loopback (copies of at most 64
//!   MiB, in 8 MiB chunks), against the local figures (`bench_remote`).

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use hipvisor::core::Origin;
use hipvisor::core::config::Isolation;
use hipvisor::{KernelArg, ModuleSource, Op, Reply, Runtime, RuntimeConfig, Task, TaskArg};
use serde_json::json;

use crate::CommonArgs;
use crate::cli::measure::{IN_FLIGHT, per_op};

/// Flags of `hipvisor bench`.
#[derive(Args, Debug)]
pub(crate) struct BenchArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Ops per throughput measurement.
    #[arg(long, default_value_t = 100_000)]
    ops: u64,
    /// Repetitions of each measurement.
    #[arg(long, default_value_t = 5)]
    reps: u32,
    /// Size of the host→device copies, in MiB.
    #[arg(long, default_value_t = 256)]
    h2d_mib: u64,
    /// Print the full report as one JSON object on stdout (and nothing else); without it,
    /// stdout gets a short table: each measurement's median and range, and the ratios.
    #[arg(long)]
    json: bool,
}

/// Callers submitting batches concurrently in `runtime_*_batch_null`: while one batch
/// runs, the next is being admitted.
const BATCH_CALLERS: u64 = 4;

/// One measurement's values and their unit.
struct Series {
    name: &'static str,
    unit: &'static str,
    values: Vec<f64>,
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s[s.len() / 2]
}

impl Series {
    fn report(&self) -> serde_json::Value {
        let mut s = self.values.clone();
        s.sort_by(f64::total_cmp);
        json!({"name": self.name, self.unit: {"median": median(&s), "min": s[0], "max": s[s.len() - 1]}})
    }
}

async fn channel(ops: u64, in_flight: u64) -> f64 {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<tokio::sync::oneshot::Sender<u64>>(1024);
    let server = tokio::spawn(async move {
        while let Some(reply) = rx.recv().await {
            let _ = reply.send(1);
        }
    });
    let ns = per_op(ops, in_flight, move || {
        let tx = tx.clone();
        async move {
            let (reply, answer) = tokio::sync::oneshot::channel();
            let _ = tx.send(reply).await;
            let _ = answer.await;
        }
    })
    .await;
    server.abort();
    ns
}

fn launch_fill(module: hipvisor::ModuleHandle, buffer: hipvisor::BufferHandle) -> Op {
    Op::Launch {
        module,
        function: "fill".into(),
        grid: hipvisor::Dim3::x(4),
        block: hipvisor::Dim3::x(256),
        shared_mem_bytes: 0,
        args: vec![KernelArg::Buffer(buffer), KernelArg::U32(1), KernelArg::U32(1024)],
    }
}

/// The backend called directly on a thread of its own: mem-info, launch + sync, h2d.
fn direct(config: &RuntimeConfig, ops: u64, h2d_bytes: usize) -> Result<(f64, f64, f64), String> {
    let backend = hipvisor::make_backend(config).map_err(|e| e.to_string())?;
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut ctx = backend.open(0, 0).map_err(|e| e.to_string())?;
            let app = Origin::Application;
            let mut run = |op: &Op| ctx.execute(op, app).map_err(|e| e.to_string());
            let started = Instant::now();
            for _ in 0..ops {
                run(&Op::MemInfo)?;
            }
            let null = started.elapsed().as_nanos() as f64 / ops as f64;
            let Reply::Module(m) = run(&Op::LoadModule {
                source: ModuleSource::Builtin,
            })?
            else {
                unreachable!()
            };
            let Reply::Buffer(b) = run(&Op::Alloc { bytes: 4096 })? else {
                unreachable!()
            };
            let n = (ops / 10).max(1);
            let started = Instant::now();
            for _ in 0..n {
                run(&launch_fill(m, b))?;
                run(&Op::Synchronize)?;
            }
            let launch = started.elapsed().as_nanos() as f64 / n as f64;
            let Reply::Buffer(big) = run(&Op::Alloc {
                bytes: h2d_bytes as u64,
            })?
            else {
                unreachable!()
            };
            let data = hipvisor::Payload::from(vec![7u8; h2d_bytes]);
            let copy = Op::CopyToDevice {
                dst: big,
                offset: 0,
                data,
            };
            run(&copy)?; // warm up
            let started = Instant::now();
            for _ in 0..4 {
                run(&copy)?;
            }
            let gbps = (4 * h2d_bytes) as f64 / started.elapsed().as_secs_f64() / 1e9;
            Ok((null, launch, gbps))
        })
        .join()
        .map_err(|_| "the direct benchmark panicked".to_string())?
    })
}

fn runtime_config(base: &RuntimeConfig, isolation: Isolation, h2d_bytes: usize) -> RuntimeConfig {
    let mut c = base.clone();
    c.runtime.isolation = isolation;
    // The thread-isolation measurements make no fault, so a runtime that aborts the
    // process on a GPU memory fault (AMD) may run them.
    c.runtime.allow_abort_on_gpu_fault = true;
    c.sim.devices = 1;
    c.sim.faults.clear();
    c.sim.memory_bytes = c.sim.memory_bytes.max(2 * h2d_bytes as u64 + (64 << 20));
    c.breaker.enabled = false;
    c
}

fn noop_meter() -> opentelemetry::metrics::Meter {
    opentelemetry::metrics::MeterProvider::meter(&opentelemetry::metrics::noop::NoopMeterProvider::new(), "hipvisor")
}

async fn start(config: RuntimeConfig, telemetry: bool) -> Result<Arc<Runtime>, String> {
    let builder = Runtime::builder().config(config);
    let builder = if telemetry {
        builder.serve_metrics("127.0.0.1:0".parse().expect("an address"))
    } else {
        builder.meter(noop_meter())
    };
    builder.start().await.map(Arc::new).map_err(|e| e.to_string())
}

async fn stop(rt: Arc<Runtime>) {
    if let Ok(rt) = Arc::try_unwrap(rt) {
        rt.shutdown().await;
    }
}

/// Serial and pipelined mem-info, serial launch + sync, h2d GB/s and batched mem-info
/// through the runtime.
async fn through_runtime(config: RuntimeConfig, ops: u64, h2d_bytes: usize) -> Result<[f64; 5], String> {
    let rt = start(config, false).await?;
    let gpu = rt.device(0).map_err(|e| e.to_string())?;
    let g = gpu.clone();
    let serial = per_op(ops / 4, 1, move || {
        let g = g.clone();
        async move {
            let _ = g.mem_info().await;
        }
    })
    .await;
    let g = gpu.clone();
    let pipelined = per_op(ops, IN_FLIGHT, move || {
        let g = g.clone();
        async move {
            let _ = g.mem_info().await;
        }
    })
    .await;
    let g = gpu.clone();
    let batch = per_op(ops / IN_FLIGHT, BATCH_CALLERS, move || {
        let g = g.clone();
        async move {
            let answers = g.submit_batch((0..IN_FLIGHT).map(|_| Op::MemInfo)).await;
            assert!(answers.iter().all(Result::is_ok), "a batched mem-info failed");
        }
    })
    .await
        / IN_FLIGHT as f64;
    let m = gpu
        .load_module(ModuleSource::Builtin)
        .await
        .map_err(|e| e.to_string())?;
    let b = gpu.alloc(4096).await.map_err(|e| e.to_string())?;
    let n = (ops / 40).max(1);
    let started = Instant::now();
    for _ in 0..n {
        gpu.submit(launch_fill(m, b)).await.map_err(|e| e.to_string())?;
        gpu.synchronize().await.map_err(|e| e.to_string())?;
    }
    let launch = started.elapsed().as_nanos() as f64 / n as f64;
    let big = gpu.alloc(h2d_bytes as u64).await.map_err(|e| e.to_string())?;
    let mut host = gpu.host_buffer(h2d_bytes).map_err(|e| e.to_string())?;
    host.as_mut_slice().fill(7);
    let payload = host.freeze();
    gpu.copy_to_device(big, 0, payload.clone())
        .await
        .map_err(|e| e.to_string())?; // warm up
    let started = Instant::now();
    for _ in 0..4 {
        gpu.copy_to_device(big, 0, payload.clone())
            .await
            .map_err(|e| e.to_string())?;
    }
    let gbps = (4 * h2d_bytes) as f64 / started.elapsed().as_secs_f64() / 1e9;
    drop(gpu);
    stop(rt).await;
    Ok([serial, pipelined, launch, gbps, batch])
}

/// Waits (a minute at most) for device 0's standby worker.
async fn standby_ready(rt: &Runtime) -> Result<(), String> {
    let until = Instant::now() + Duration::from_secs(60);
    while rt.standby_pid(0).is_none() {
        if Instant::now() > until {
            return Err("no standby worker became ready".into());
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    Ok(())
}

/// Milliseconds from a sticky fault to the next successful op on the device.
async fn recovery(mut config: RuntimeConfig, standby: bool) -> Result<f64, String> {
    config.supervisor.standby = standby;
    let rt = start(config, false).await?;
    if standby {
        standby_ready(&rt).await?;
    }
    let gpu = rt.device(0).map_err(|e| e.to_string())?;
    let m = gpu
        .load_module(ModuleSource::Builtin)
        .await
        .map_err(|e| e.to_string())?;
    // The launch succeeds on both vendors; the fault surfaces at the synchronize — as the
    // sticky code on NVIDIA (and the simulator's `cuda` flavour), as the worker's abort on
    // AMD (`hip`), which answers the synchronize `DeviceRestarted`. (A launch that fails is
    // accepted too: the fault has happened either way.)
    let launched = gpu.launch(m, "fault_illegal_address", 1, 1, vec![]).await;
    let started = Instant::now();
    if launched.is_ok() && gpu.synchronize().await.is_ok() {
        return Err("the fault did not surface".into());
    }
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        if gpu.mem_info().await.is_ok() {
            break;
        }
        if Instant::now() > until {
            return Err("the device did not recover".into());
        }
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    let ms = started.elapsed().as_secs_f64() * 1e3;
    drop(gpu);
    stop(rt).await;
    Ok(ms)
}

/// Launches per request in `*_ops8_us` / `*_task8_us` (with alloc, copy in, copy out and
/// free: 8 ops).
const REQUEST_LAUNCHES: u32 = 4;

/// Microseconds per request of 8 ops, one caller: `(op by op, as one task)`.
async fn requests(config: RuntimeConfig, n: u64) -> Result<(f64, f64), String> {
    let rt = start(config, false).await?;
    let gpu = rt.device(0).map_err(|e| e.to_string())?;
    let err = |e: hipvisor::RuntimeError| e.to_string();
    let m = gpu.load_module(ModuleSource::Builtin).await.map_err(err)?;
    let data = vec![1u8; 4096];
    let scale = |b| vec![KernelArg::Buffer(b), KernelArg::F32(1.0), KernelArg::U32(1024)];
    let started = Instant::now();
    for _ in 0..n {
        let b = gpu.alloc(4096).await.map_err(err)?;
        gpu.copy_to_device(b, 0, data.clone()).await.map_err(err)?;
        for _ in 0..REQUEST_LAUNCHES {
            gpu.launch(m, "scale", 4, 256, scale(b)).await.map_err(err)?;
        }
        gpu.copy_from_device(b, 0, 4096).await.map_err(err)?;
        gpu.free(b).await.map_err(err)?;
    }
    let ops = started.elapsed().as_secs_f64() * 1e6 / n as f64;
    let mut task = Task::new();
    let x = task.scratch(4096);
    task.copy_in(x, 0, data.clone());
    for _ in 0..REQUEST_LAUNCHES {
        let args = [
            x.into(),
            TaskArg::value(KernelArg::F32(1.0)),
            TaskArg::value(KernelArg::U32(1024)),
        ];
        task.launch(m, "scale", 4, 256, args);
    }
    task.copy_out(x, 0, 4096);
    let started = Instant::now();
    for _ in 0..n {
        gpu.run(&task).await.map_err(err)?;
    }
    let tasks = started.elapsed().as_secs_f64() * 1e6 / n as f64;
    drop(gpu);
    stop(rt).await;
    Ok((ops, tasks))
}

/// Milliseconds a sticky fault adds to the request it hits: one device, weights in durable
/// buffers, requests (a `gemv` task each) one after another. Before the 50th, a single
/// launch of `fault_illegal_address` faults the device; the fault surfaces in that request,
/// which reruns on the restarted device. The same on the simulator and a GPU.
async fn request_fault(mut config: RuntimeConfig, standby: bool) -> Result<f64, String> {
    const HIT: usize = 50;
    config.supervisor.standby = standby;
    let rt = start(config, false).await?;
    let err = |e: hipvisor::RuntimeError| e.to_string();
    let (rows, cols) = (512u32, 512u32);
    let weights = rt.replicate(vec![0u8; (rows * cols * 4) as usize]).await.map_err(err)?;
    let bias = rt.replicate(vec![0u8; (rows * 4) as usize]).await.map_err(err)?;
    let kernels = rt.replicate_module(ModuleSource::Builtin).await.map_err(err)?;
    if standby {
        standby_ready(&rt).await?;
    }
    let mut task = Task::new();
    let x = task.scratch(u64::from(cols) * 4);
    let y = task.scratch(u64::from(rows) * 4);
    task.copy_in(x, 0, vec![0u8; cols as usize * 4]);
    let args = [
        TaskArg::durable(&weights),
        x.into(),
        TaskArg::durable(&bias),
        y.into(),
        TaskArg::value(KernelArg::U32(rows)),
        TaskArg::value(KernelArg::U32(cols)),
    ];
    task.launch(&kernels, "gemv", rows.div_ceil(128), 128, args);
    task.copy_out(y, 0, u64::from(rows) * 4);
    let gpu = rt.device(0).map_err(|e| e.to_string())?;
    let fault = kernels.on(0).ok_or("no module on device 0")?;
    let mut latencies = Vec::new();
    for i in 0..HIT + 20 {
        if i + 1 == HIT {
            // On AMD the worker aborts; on NVIDIA the launch returns and the fault surfaces
            // at the next call. Either way the next request meets it.
            let _ = gpu.launch(fault, "fault_illegal_address", 1, 1, vec![]).await;
        }
        let started = Instant::now();
        rt.run(&task).await.map_err(err)?;
        latencies.push(started.elapsed().as_secs_f64() * 1e3);
    }
    let hit = latencies[HIT - 1];
    let typical = median(&latencies);
    let s = rt.snapshot().await.map_err(err)?;
    drop(gpu);
    stop(rt).await;
    // (On AMD the worker may die before the request reaches it: then it waits for the
    // restart without a rerun.)
    if s.restarts != 1 || s.recovery.task_reruns > 1 {
        return Err(format!(
            "the fault was not absorbed by one restart and one rerun: {} restarts, {} reruns",
            s.restarts, s.recovery.task_reruns
        ));
    }
    Ok(hit - typical)
}

async fn telemetry(config: RuntimeConfig, ops: u64, on: bool) -> Result<f64, String> {
    let rt = start(config, on).await?;
    let gpu = rt.device(0).map_err(|e| e.to_string())?;
    // On: a dashboard open (every second, as the page: its snapshot, and its history — the
    // whole window first, then the last seconds), and /metrics scraped every second (a
    // Prometheus scrapes every 15 s by default).
    let poller = rt.metrics_addr().map(|addr| {
        tokio::spawn(async move {
            let mut history = "/api/history?seconds=300";
            loop {
                for path in ["/api/snapshot", history, "/metrics"] {
                    let _ = http_get(addr, path).await;
                }
                history = "/api/history?seconds=4";
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        })
    });
    let ns = per_op(ops, IN_FLIGHT, move || {
        let g = gpu.clone();
        async move {
            let _ = g.mem_info().await;
        }
    })
    .await;
    if let Some(p) = poller {
        p.abort();
    }
    stop(rt).await;
    Ok(ns)
}

/// `GET path` from the endpoint at `addr` (HTTP/1.1, one request), the answer read whole and
/// dropped.
async fn http_get(addr: std::net::SocketAddr, path: &str) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes())
        .await?;
    s.read_to_end(&mut Vec::new()).await?;
    Ok(())
}

/// Runs the benchmarks and prints the report.
pub(crate) fn main(args: BenchArgs) -> ExitCode {
    let config = match args.common.config() {
        Ok(c) => c,
        Err(code) => return code,
    };
    let Ok(tokio_rt) = tokio::runtime::Builder::new_multi_thread().enable_all().build() else {
        eprintln!("hipvisor: cannot start tokio");
        return ExitCode::FAILURE;
    };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let reps = args.reps.max(1);
    let h2d = (args.h2d_mib.max(1) << 20) as usize;
    let backend = config.runtime.backend;
    let result: Result<serde_json::Value, String> = tokio_rt.block_on(async {
        #[cfg_attr(not(feature = "cluster"), allow(unused_mut))]
        let mut names = vec![
            ("channel_baseline_serial", "ns_per_op"),
            ("channel_baseline_pipelined", "ns_per_op"),
            ("direct_null", "ns_per_op"),
            ("direct_launch_sync", "ns_per_op"),
            ("runtime_thread_serial_null", "ns_per_op"),
            ("runtime_thread_pipelined_null", "ns_per_op"),
            ("runtime_process_serial_null", "ns_per_op"),
            ("runtime_process_pipelined_null", "ns_per_op"),
            ("runtime_thread_batch_null", "ns_per_op"),
            ("runtime_process_batch_null", "ns_per_op"),
            ("runtime_thread_launch_sync", "ns_per_op"),
            ("runtime_process_launch_sync", "ns_per_op"),
            ("direct_h2d", "gbps"),
            ("runtime_thread_h2d", "gbps"),
            ("runtime_process_h2d", "gbps"),
            ("recovery_sticky_process_ms", "ms"),
            ("recovery_sticky_standby_ms", "ms"),
            ("telemetry_on_pipelined", "ns_per_op"),
            ("telemetry_off_pipelined", "ns_per_op"),
            ("runtime_thread_ops8_us", "us_per_request"),
            ("runtime_thread_task8_us", "us_per_request"),
            ("runtime_process_ops8_us", "us_per_request"),
            ("runtime_process_task8_us", "us_per_request"),
            ("request_fault_cold_ms", "ms"),
            ("request_fault_standby_ms", "ms"),
        ];
        #[cfg(feature = "cluster")]
        names.extend(crate::cli::bench_remote::NAMES);
        let mut series: Vec<Series> = names.iter().map(|(name, unit)| Series { name, unit, values: Vec::new() }).collect();
        let thread_cfg = runtime_config(&config, Isolation::Thread, h2d);
        let process_cfg = runtime_config(&config, Isolation::Process, h2d);
        for rep in 0..reps {
            eprintln!("bench: repetition {} of {reps}", rep + 1);
            // Recovery first, a latency measured in milliseconds: away from the teardown of
            // runtimes that moved 256 MiB (their workers' exits compete for the CPU).
            let cold = recovery(process_cfg.clone(), false).await?;
            let standby = recovery(process_cfg.clone(), true).await?;
            let mut v = vec![channel(args.ops / 4, 1).await, channel(args.ops, IN_FLIGHT).await];
            let (null, launch, gbps) = direct(&thread_cfg, args.ops, h2d)?;
            v.extend([null, launch]);
            let t = through_runtime(thread_cfg.clone(), args.ops, h2d).await?;
            let p = through_runtime(process_cfg.clone(), args.ops, h2d).await?;
            v.extend([t[0], t[1], p[0], p[1], t[4], p[4], t[2], p[2], gbps, t[3], p[3]]);
            v.extend([cold, standby]);
            // Alternate the order, so drift on a shared machine favours neither side; thirty
            // times the ops (about 3 s a side at the default), so that each side runs long
            // enough for several polls and a dozen flushes.
            let long = 30 * args.ops;
            let (on, off) = if rep % 2 == 0 {
                let on = telemetry(thread_cfg.clone(), long, true).await?;
                (on, telemetry(thread_cfg.clone(), long, false).await?)
            } else {
                let off = telemetry(thread_cfg.clone(), long, false).await?;
                (telemetry(thread_cfg.clone(), long, true).await?, off)
            };
            eprintln!("bench: telemetry on {on:.0} ns/op, off {off:.0} ns/op (ratio {:.3})", on / off);
            v.extend([on, off]);
            let n = (args.ops / 100).max(10);
            let (t_ops, t_task) = requests(thread_cfg.clone(), n).await?;
            let (p_ops, p_task) = requests(process_cfg.clone(), n).await?;
            v.extend([t_ops, t_task, p_ops, p_task]);
            let fault_cold = request_fault(process_cfg.clone(), false).await?;
            let fault_standby = request_fault(process_cfg.clone(), true).await?;
            v.extend([fault_cold, fault_standby]);
            #[cfg(feature = "cluster")]
            v.extend(crate::cli::bench_remote::remote(&thread_cfg, args.ops, h2d.min(64 << 20)).await?);
            for (s, x) in series.iter_mut().zip(v) {
                s.values.push(x);
            }
        }
        let m = |name: &str| series.iter().find(|s| s.name == name).map_or(f64::NAN, |s| median(&s.values));
        // The median of the repetitions' own ratios: each pair ran back to back, so drift on a
        // shared machine between repetitions cancels out.
        let v = |name: &str| series.iter().find(|s| s.name == name).map_or(Vec::new(), |s| s.values.clone());
        let paired = |a: &str, b: &str| {
            let ratios: Vec<f64> = v(a).iter().zip(v(b)).map(|(x, y)| x / y).collect();
            if ratios.is_empty() { f64::NAN } else { median(&ratios) }
        };
        #[cfg_attr(not(feature = "cluster"), allow(unused_mut))]
        let mut derived = json!({
            "runtime_thread_pipelined_null / channel_baseline_pipelined": m("runtime_thread_pipelined_null") / m("channel_baseline_pipelined"),
            "runtime_thread_serial_overhead_us": (m("runtime_thread_serial_null") - m("direct_null")) / 1e3,
            "runtime_process_serial_overhead_us": (m("runtime_process_serial_null") - m("direct_null")) / 1e3,
            "runtime_thread_pipelined_ops_per_s": 1e9 / m("runtime_thread_pipelined_null"),
            "runtime_process_pipelined_ops_per_s": 1e9 / m("runtime_process_pipelined_null"),
            "runtime_thread_batch_ops_per_s": 1e9 / m("runtime_thread_batch_null"),
            "runtime_process_batch_ops_per_s": 1e9 / m("runtime_process_batch_null"),
            "runtime_thread_batch_null / channel_baseline_pipelined": m("runtime_thread_batch_null") / m("channel_baseline_pipelined"),
            "runtime_thread_h2d / direct_h2d": m("runtime_thread_h2d") / m("direct_h2d"),
            "runtime_process_h2d / direct_h2d": m("runtime_process_h2d") / m("direct_h2d"),
            "telemetry_on_pipelined / telemetry_off_pipelined": m("telemetry_on_pipelined") / m("telemetry_off_pipelined"),
            "telemetry_on_pipelined / telemetry_off_pipelined, paired": paired("telemetry_on_pipelined", "telemetry_off_pipelined"),
            "runtime_thread_ops8 / runtime_thread_task8": m("runtime_thread_ops8_us") / m("runtime_thread_task8_us"),
            "runtime_process_ops8 / runtime_process_task8": m("runtime_process_ops8_us") / m("runtime_process_task8_us"),
        });
        #[cfg(feature = "cluster")]
        for (ratio, a, b) in crate::cli::bench_remote::RATIOS {
            derived[ratio] = json!(m(a) / m(b));
        }
        Ok(json!({
            "backend": backend.as_str(),
            "cores": cores,
            "ops_per_measurement": args.ops,
            "h2d_bytes": h2d,
            "repetitions": reps,
            "results": series.iter().map(Series::report).collect::<Vec<_>>(),
            "derived": derived,
        }))
    });
    match result {
        Ok(report) if args.json => {
            println!("{report}");
            ExitCode::SUCCESS
        }
        Ok(report) => {
            print!("{}", crate::cli::summary::bench(&report));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("hipvisor: bench: {e}");
            ExitCode::FAILURE
        }
    }
}
