//! An inference service on hipvisor: a small MLP whose weights are replicated durable
//! buffers on every (simulated) GPU, and request actors (ractor) that send one task per
//! request — under a fault plan with sticky faults, a worker crash and a lost device. The
//! faults cost requests latency, not errors: the runtime restores the weights into new
//! workers and reruns the requests they hit.
//!
//! ```text
//! cargo run --release --example inference [-- REQUESTS]
//! ```

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hipvisor::core::config::Isolation;
use hipvisor::core::fault_plan::FaultSpec;
use hipvisor::core::kernels::{f32_bytes, f32s, reference};
use hipvisor::{KernelArg, ModuleSource, ReplicatedBuffer, ReplicatedModule, Runtime, RuntimeConfig, Task, TaskArg};
use ractor::{Actor, ActorProcessingErr, ActorRef};

/// Layer widths: input, hidden, output.
const WIDTHS: [usize; 3] = [32, 64, 8];

/// The model on the GPUs, and on the host for checking.
struct Model {
    kernels: ReplicatedModule,
    /// Per layer: weights and bias on every device, and their host values.
    layers: Vec<(ReplicatedBuffer, ReplicatedBuffer, Vec<f32>, Vec<f32>)>,
}

impl Model {
    /// The task answering one request: `relu(W1 x + b1)`, then `W2 h + b2`.
    fn task(&self, x: &[f32]) -> Task {
        let mut task = Task::new();
        let mut input = task.scratch(4 * x.len() as u64);
        task.copy_in(input, 0, f32_bytes(x));
        for (layer, (w, b, _, bias)) in self.layers.iter().enumerate() {
            let (rows, cols) = (bias.len() as u32, WIDTHS[layer] as u32);
            let output = task.scratch(4 * u64::from(rows));
            let args = [
                TaskArg::durable(w),
                input.into(),
                TaskArg::durable(b),
                output.into(),
                TaskArg::value(KernelArg::U32(rows)),
                TaskArg::value(KernelArg::U32(cols)),
            ];
            task.launch(&self.kernels, "gemv", 1, rows, args);
            if layer + 1 < self.layers.len() {
                task.launch(
                    &self.kernels,
                    "relu",
                    1,
                    rows,
                    [output.into(), TaskArg::value(KernelArg::U32(rows))],
                );
            }
            input = output;
        }
        task.copy_out(input, 0, 4 * WIDTHS[WIDTHS.len() - 1] as u64);
        task
    }

    /// What the CPU computes for `x`.
    fn expected(&self, x: &[f32]) -> Vec<f32> {
        let mut h = x.to_vec();
        for (layer, (_, _, weights, bias)) in self.layers.iter().enumerate() {
            h = reference::gemv(weights, &h, bias, bias.len(), WIDTHS[layer]);
            if layer + 1 < self.layers.len() {
                reference::relu(&mut h);
            }
        }
        h
    }
}

/// What the request actors saw.
#[derive(Default)]
struct Stats {
    served: u64,
    failed: Vec<String>,
    wrong: u64,
    latencies: Vec<Duration>,
}

struct Client;

struct ClientState {
    runtime: Arc<Runtime>,
    model: Arc<Model>,
    stats: Arc<Mutex<Stats>>,
    left: u64,
    seed: u64,
}

impl Actor for Client {
    type Msg = ();
    type State = ClientState;
    type Arguments = ClientState;

    async fn pre_start(&self, me: ActorRef<()>, st: ClientState) -> Result<ClientState, ActorProcessingErr> {
        me.cast(())?;
        Ok(st)
    }

    async fn handle(&self, me: ActorRef<()>, _: (), st: &mut ClientState) -> Result<(), ActorProcessingErr> {
        if st.left == 0 {
            me.stop(None);
            return Ok(());
        }
        st.left -= 1;
        st.seed = st
            .seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let x: Vec<f32> = (0..WIDTHS[0])
            .map(|i| ((st.seed >> (i % 48)) & 0xff) as f32 / 128.0 - 1.0)
            .collect();
        let started = Instant::now();
        let answer = st.runtime.run(&st.model.task(&x)).await;
        let mut stats = st.stats.lock().expect("not poisoned");
        stats.latencies.push(started.elapsed());
        match answer {
            Ok(outputs) if f32s(outputs[0].as_bytes()) == st.model.expected(&x) => stats.served += 1,
            Ok(_) => stats.wrong += 1,
            Err(e) => stats.failed.push(e.to_string()),
        }
        drop(stats);
        me.cast(())?;
        Ok(())
    }
}

fn config() -> RuntimeConfig {
    let mut c = RuntimeConfig::default();
    c.runtime.isolation = Isolation::Process;
    c.supervisor.standby = true;
    c.supervisor.max_restarts = 100;
    c.sim.devices = 4;
    let fault = |f: fn(&mut FaultSpec)| {
        let mut spec = FaultSpec::default();
        f(&mut spec);
        spec
    };
    c.sim.faults = vec![
        // Sticky faults in one launch in 4000, anywhere. (Far more often than on a healthy
        // GPU: at rates where every device restarts again and again, the restart backoff —
        // `supervisor.restart_backoff_*` — makes requests wait for a device to come back.)
        fault(|f| {
            f.op = "launch".into();
            f.probability = Some(0.00025);
            f.code = Some(700);
        }),
        // Device 1's worker is killed at its 10,000th op.
        fault(|f| {
            f.device = Some(1);
            f.nth = Some(10_000);
            f.crash = Some(true);
        }),
        // Device 2 is lost for 300 ms from its 20,000th op.
        fault(|f| {
            f.device = Some(2);
            f.after = Some(20_000);
            f.code = Some(100);
            f.duration_ms = Some(300);
        }),
    ];
    c
}

fn main() -> std::process::ExitCode {
    // In process isolation the runtime starts this same program as each device's worker.
    if let Some(code) = hipvisor::core::worker::run_if_worker() {
        return code;
    }
    let requests: u64 = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(20_000);
    let tokio = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio");
    tokio.block_on(serve(requests))
}

async fn serve(requests: u64) -> std::process::ExitCode {
    let runtime = Arc::new(
        Runtime::builder()
            .config(config())
            .start()
            .await
            .expect("the runtime starts"),
    );
    // The model: random weights, replicated on every device with the built-in kernels.
    let mut seed = 42u64;
    let mut random = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed % 2000) as f32 / 1000.0 - 1.0
    };
    let kernels = runtime.replicate_module(ModuleSource::Builtin).await.expect("kernels");
    let mut layers = Vec::new();
    for pair in WIDTHS.windows(2) {
        let weights: Vec<f32> = (0..pair[0] * pair[1]).map(|_| random() * 0.2).collect();
        let bias: Vec<f32> = (0..pair[1]).map(|_| random() * 0.1).collect();
        let w = runtime.replicate(f32_bytes(&weights)).await.expect("weights");
        let b = runtime.replicate(f32_bytes(&bias)).await.expect("bias");
        layers.push((w, b, weights, bias));
    }
    let model = Arc::new(Model { kernels, layers });
    // Counts the lost device's departures, as an operator's dashboard would.
    let runtime_lost = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let mut changes = runtime.subscribe();
    let counter = runtime_lost.clone();
    tokio::spawn(async move {
        while let Ok(c) = changes.recv().await {
            if c.to == hipvisor::DeviceState::Lost {
                counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
    });
    let stats = Arc::new(Mutex::new(Stats::default()));
    let clients = 8;
    let started = Instant::now();
    let mut running = Vec::new();
    for i in 0..clients {
        let st = ClientState {
            runtime: runtime.clone(),
            model: model.clone(),
            stats: stats.clone(),
            left: requests / clients + u64::from(i < requests % clients),
            seed: i + 1,
        };
        let (_, handle) = Actor::spawn(None, Client, st).await.expect("a request actor");
        running.push(handle);
    }
    for h in running {
        let _ = h.await;
    }
    let elapsed = started.elapsed();
    let runtime = Arc::try_unwrap(runtime).ok().expect("the clients are done");
    let snapshot = runtime.shutdown().await;
    let mut stats = Arc::try_unwrap(stats)
        .ok()
        .expect("the clients are done")
        .into_inner()
        .expect("not poisoned");
    stats.latencies.sort();
    let at = |p: f64| stats.latencies[((stats.latencies.len() - 1) as f64 * p) as usize].as_secs_f64() * 1e3;
    println!(
        "{} requests in {:.2} s: {} served, {} failed, {} wrong",
        stats.latencies.len(),
        elapsed.as_secs_f64(),
        stats.served,
        stats.failed.len(),
        stats.wrong
    );
    println!(
        "latency ms: p50 {:.2}, p99 {:.2}, max {:.2}",
        at(0.5),
        at(0.99),
        at(1.0)
    );
    println!(
        "faults absorbed: {} sticky faults, {} restarts, {} requests rerun, {} durable restores ({} bytes)",
        snapshot.sticky_faults,
        snapshot.restarts,
        snapshot.recovery.task_reruns,
        snapshot.recovery.durable_restores,
        snapshot.recovery.durable_restored_bytes
    );
    let lost = runtime_lost.load(std::sync::atomic::Ordering::Relaxed);
    let states: Vec<&str> = snapshot.devices.iter().map(|d| d.state.as_str()).collect();
    println!("device 2 was lost {lost} time(s) meanwhile; devices at the end: {states:?}");
    for e in stats.failed.iter().take(5) {
        println!("failed: {e}");
    }
    if stats.failed.is_empty() && stats.wrong == 0 {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    }
}
