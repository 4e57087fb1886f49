//! `hipvisor run`: the main job.
//!
//! Several application actors each repeat: alloc, upload random data, launch `vector_add`
//! or `saxpy`, download, verify against a CPU result, free. They message the device actors
//! with `DeviceMsg::Submit` through `ractor`'s call, as an application's own actors would.
//! `--ops N` counts device operations submitted (a started iteration is finished, so the
//! count can exceed N by less than one iteration per actor); with `--workload inference`, it
//! is exactly N requests (each request actor claims one before it sends it).
//!
//! Exit status: 1 when a reply is missing, a result is wrong, the metrics' op counts differ
//! from what the actors observed, or the job could not run (`--ops` above 0 and no device
//! became ready, no op could be submitted or no op succeeded; the report's `could_not_run`
//! says which, and so does stderr); else 128 + the signal's number (130, 143) when SIGINT or
//! SIGTERM stopped the job before it had submitted its ops; else 0. Ops that failed with a
//! typed error are reported, not fatal.
//!
//! SIGINT and SIGTERM are a graceful stop (the process may be PID 1 of a container, which
//! gets no default action for them): no new op is submitted, the ops in flight are answered
//! (each by its deadline at the latest), the runtime shuts down and the report is printed,
//! with `interrupted` naming the signal. A second signal exits at once.

use std::collections::{BTreeMap, HashMap};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Args;
use hipvisor::core::kernels::{self, SAXPY_TOLERANCE_ULPS, f32_bytes, f32s, reference};
use hipvisor::{
    BufferHandle, Device, DeviceMsg, Dim3, KernelArg, ModuleHandle, ModuleSource, Op, OpResult, Reply, Runtime,
    RuntimeError,
};
use indicatif::{ProgressBar, ProgressStyle};
use ractor::rpc::CallResult;
use ractor::{Actor, ActorProcessingErr, ActorRef, MessagingErr};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde_json::json;

use crate::CommonArgs;
use crate::cli::inference::Mlp;
use crate::cli::target::Target;
use crate::cli::{SIGINT, SIGTERM, signal_name, summary};

/// What the application actors do.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub(crate) enum Workload {
    /// Single ops: alloc, upload, `vector_add` or `saxpy`, download, verify, free.
    #[default]
    Ops,
    /// Requests to a small MLP with replicated durable weights, one task per request
    /// (`--ops` counts requests).
    Inference,
}

/// Flags of `hipvisor run`.
#[derive(Args, Debug)]
pub(crate) struct RunArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Device operations to submit (requests, with `--workload inference`).
    #[arg(long, default_value_t = 10_000)]
    ops: u64,
    /// What the application actors do.
    #[arg(long, value_enum, default_value_t = Workload::Ops)]
    workload: Workload,
    /// Application actors.
    #[arg(long, default_value_t = 8)]
    actors: u32,
    /// Print the full report as one JSON object on stdout (and nothing else); without it,
    /// stdout gets a short summary: per device ops, failures, retries, restarts and state, then the
    /// totals (retries included).
    #[arg(long)]
    json: bool,
    /// Serve /metrics, /healthz, /readyz, /api/snapshot and a dashboard on this address
    /// (port 0 picks one; `listening on ADDR` goes to stderr).
    #[arg(long)]
    metrics_addr: Option<std::net::SocketAddr>,
    /// Keep serving the endpoint this many seconds after the run ends.
    #[arg(long, default_value_t = 0.0)]
    linger: f64,
    /// Export a span per op (and retry, restart and quarantine events) through
    /// OpenTelemetry, as JSON lines on stderr.
    #[arg(long)]
    pub(crate) otel_traces: bool,
    /// Run against the devices of the `hipvisor node`s at these addresses (comma-separated)
    /// instead of this process's own: the report adds `nodes`.
    #[cfg(feature = "cluster")]
    #[arg(long, value_delimiter = ',', requires = "cookie_file")]
    join: Vec<std::net::SocketAddr>,
    /// File holding the cluster's cookie (with `--join`; a trailing newline is ignored).
    #[cfg(feature = "cluster")]
    #[arg(long)]
    cookie_file: Option<std::path::PathBuf>,
    /// Set by `hipvisor chaos`: wait for every device to be ready, check the invariants.
    #[arg(skip)]
    pub(crate) chaos: bool,
}

impl RunArgs {
    /// `hipvisor chaos`: the fault plan of `config/chaos.toml` unless `--config` is given.
    pub(crate) fn for_chaos(mut self) -> RunArgs {
        self.chaos = true;
        if self.common.config.is_none() {
            self.common.config = Some("config/chaos.toml".into());
        }
        self
    }
}

/// How long past its deadline an answer may come before it counts as missing (the runtime
/// answers at the deadline; this is the margin for a loaded machine).
const REPLY_MARGIN: Duration = Duration::from_secs(5);

/// What the application actors observed.
#[derive(Default)]
struct Observed {
    succeeded: u64,
    failed: u64,
    missing: u64,
    wrong: u64,
    by_class: BTreeMap<&'static str, u64>,
    /// Failures by error (variant name).
    by_error: BTreeMap<&'static str, u64>,
    latencies_us: crate::cli::latency::Latencies,
    /// Answers later than the op deadline (a hang the runtime should have cut short).
    late: u64,
}

/// The job's op budget (`--ops`): the ops submitted so far, against the limit.
struct Budget {
    limit: u64,
    submitted: AtomicU64,
}

impl Budget {
    fn new(limit: u64) -> Budget {
        Budget {
            limit,
            submitted: AtomicU64::new(0),
        }
    }

    /// Counts an op submitted whatever the limit (the ops workload finishes an iteration it
    /// started, so it may go past the limit by less than one iteration per actor).
    fn count(&self) {
        self.submitted.fetch_add(1, Ordering::Relaxed);
    }

    /// Takes one op of the limit, `false` once it is spent. One atomic step, so that request
    /// actors that look at once never submit more than the limit between them.
    fn claim(&self) -> bool {
        self.submitted
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < self.limit).then_some(n + 1)
            })
            .is_ok()
    }

    fn spent(&self) -> bool {
        self.submitted() >= self.limit
    }

    fn submitted(&self) -> u64 {
        self.submitted.load(Ordering::Relaxed)
    }
}

struct Job {
    target: Target,
    budget: Budget,
    observed: Mutex<Observed>,
    progress: ProgressBar,
    op_deadline: Duration,
    /// The signal that stopped the job (SIGINT, SIGTERM), or 0.
    stop: Arc<AtomicI32>,
}

impl Job {
    fn record(&self, f: impl FnOnce(&mut Observed)) {
        f(&mut hipvisor_core::sync::lock(&self.observed));
    }

    /// Submits one op to `device` (a local one through its actor) and waits for its answer.
    /// `None` is a missing reply: no answer within the deadline (plus a margin), or a reply
    /// port dropped unanswered — or, once a signal stopped the job, an op not submitted (not
    /// counted).
    async fn op(&self, device: &Device, op: Op) -> Option<OpResult> {
        if self.stopped() {
            return None;
        }
        self.budget.count();
        self.progress.inc(1);
        let started = Instant::now();
        let result = self.submit(device, op).await;
        self.observe(started, &result);
        result
    }

    /// Runs one task (a request of the inference workload) where the runtime places it, and
    /// waits for its answer, once it has claimed one op of the budget; `None` as for
    /// [`Job::op`], and when the budget is spent (nothing submitted).
    async fn task(&self, task: &hipvisor::Task) -> Option<Result<Vec<hipvisor::Payload>, RuntimeError>> {
        if self.stopped() || !self.budget.claim() {
            return None;
        }
        self.progress.inc(1);
        let started = Instant::now();
        let result = tokio::time::timeout(self.op_deadline + REPLY_MARGIN, self.target.run(task))
            .await
            .ok();
        let observed = result
            .as_ref()
            .map(|r| r.as_ref().map(|_| Reply::Done).map_err(Clone::clone));
        self.observe(started, &observed);
        result
    }

    /// Records an answer (or its absence) that took from `started`.
    fn observe(&self, started: Instant, result: &Option<OpResult>) {
        let elapsed_us = started.elapsed().as_secs_f64() * 1e6;
        // A second of slack for scheduling on a loaded machine.
        let past_deadline = started.elapsed() > self.op_deadline + Duration::from_secs(1);
        self.record(|o| match result {
            None => o.missing += 1,
            Some(Ok(_)) => {
                o.succeeded += 1;
                o.late += u64::from(past_deadline);
                o.latencies_us.record(elapsed_us);
            }
            Some(Err(e)) => {
                o.failed += 1;
                o.late += u64::from(past_deadline);
                *o.by_class.entry(e.label()).or_default() += 1;
                *o.by_error.entry(e.name()).or_default() += 1;
                o.latencies_us.record(elapsed_us);
            }
        });
    }

    /// Submits one op to a local device's actor (or, while the actor restarts, its handle),
    /// or to a remote device.
    async fn submit(&self, device: &Device, op: Op) -> Option<OpResult> {
        let runtime = match (&self.target, device) {
            (Target::Local(rt), Device::Local(_)) => rt,
            _ => {
                return tokio::time::timeout(self.op_deadline + REPLY_MARGIN, device.submit(op))
                    .await
                    .ok();
            }
        };
        match runtime.device_ref(device.index()) {
            Ok(actor) => match actor
                .call(
                    |reply| DeviceMsg::Submit { op, reply },
                    Some(self.op_deadline + REPLY_MARGIN),
                )
                .await
            {
                Ok(CallResult::Success(r)) => Some(r),
                Ok(CallResult::Timeout | CallResult::SenderError) => None,
                // The actor is being restarted: use the typed path, which does not need it.
                Err(MessagingErr::SendErr(DeviceMsg::Submit { op, .. })) => Some(device.submit(op).await),
                Err(_) => None,
            },
            Err(_) => Some(device.submit(op).await),
        }
    }

    fn exhausted(&self) -> bool {
        self.stopped() || self.budget.spent()
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed) != 0
    }
}

/// One application actor.
struct AppActor;

struct AppState {
    job: Arc<Job>,
    rng: SmallRng,
    /// By node (none: this process's) and device index.
    modules: HashMap<(Option<String>, u32), ModuleHandle>,
}

struct Step;

#[cfg(feature = "cluster")]
impl ractor::Message for Step {}

impl Actor for AppActor {
    type Msg = Step;
    type State = AppState;
    type Arguments = (Arc<Job>, u64);

    async fn pre_start(
        &self,
        me: ActorRef<Step>,
        (job, seed): (Arc<Job>, u64),
    ) -> Result<AppState, ActorProcessingErr> {
        me.cast(Step)?;
        Ok(AppState {
            job,
            rng: SmallRng::seed_from_u64(seed),
            modules: HashMap::new(),
        })
    }

    async fn handle(&self, me: ActorRef<Step>, _: Step, st: &mut AppState) -> Result<(), ActorProcessingErr> {
        if st.job.exhausted() || !iteration(st).await {
            me.stop(None);
        } else {
            me.cast(Step)?;
        }
        Ok(())
    }
}

/// One request actor of the inference workload: sends a request (one task), checks its
/// answer against the CPU, sends the next, until the job's budget is spent.
struct RequestActor;

struct RequestState {
    job: Arc<Job>,
    mlp: Arc<Mlp>,
    rng: SmallRng,
}

impl Actor for RequestActor {
    type Msg = Step;
    type State = RequestState;
    type Arguments = (Arc<Job>, Arc<Mlp>, u64);

    async fn pre_start(
        &self,
        me: ActorRef<Step>,
        (job, mlp, seed): (Arc<Job>, Arc<Mlp>, u64),
    ) -> Result<RequestState, ActorProcessingErr> {
        me.cast(Step)?;
        Ok(RequestState {
            job,
            mlp,
            rng: SmallRng::seed_from_u64(seed),
        })
    }

    async fn handle(&self, me: ActorRef<Step>, _: Step, st: &mut RequestState) -> Result<(), ActorProcessingErr> {
        if st.job.exhausted() {
            me.stop(None);
            return Ok(());
        }
        let x = Mlp::input(&mut st.rng);
        if let Some(Ok(outputs)) = st.job.task(&st.mlp.request(&x)).await
            && !st.mlp.is_answer(&x, &outputs)
        {
            st.job.record(|o| o.wrong += 1);
        }
        me.cast(Step)?;
        Ok(())
    }
}

/// One iteration; `false` when no device can take work any more.
async fn iteration(st: &mut AppState) -> bool {
    let job = st.job.clone();
    let Some(gpu) = job.target.pick() else {
        return false;
    };
    let (node, device) = (gpu.node().map(str::to_string), gpu.index());
    let module = match st.modules.get(&(node.clone(), device)) {
        Some(m) => *m,
        None => match job
            .op(
                &gpu,
                Op::LoadModule {
                    source: ModuleSource::Builtin,
                },
            )
            .await
        {
            Some(Ok(Reply::Module(m))) => {
                st.modules.insert((node, m.device), m);
                if m.device != device {
                    return true;
                }
                m
            }
            _ => return true,
        },
    };
    let n: u32 = st.rng.random_range(256..4096);
    let saxpy = st.rng.random_bool(0.5);
    let xs: Vec<f32> = (0..n).map(|_| st.rng.random_range(-100.0..100.0)).collect();
    let ys: Vec<f32> = (0..n).map(|_| st.rng.random_range(-100.0..100.0)).collect();
    let a_coef: f32 = st.rng.random_range(-4.0..4.0);
    let bytes = 4 * u64::from(n);
    let mut buffers: Vec<BufferHandle> = Vec::new();
    let verified = async {
        let count = if saxpy { 2 } else { 3 };
        for _ in 0..count {
            match job.op(&gpu, Op::Alloc { bytes }).await {
                Some(Ok(Reply::Buffer(b))) => buffers.push(b),
                _ => return,
            }
        }
        if buffers.iter().any(|b| b.device != device) {
            return; // an alloc moved to another device (this one was lost): start over
        }
        for (b, data) in buffers.iter().zip([&xs, &ys]) {
            let op = Op::CopyToDevice {
                dst: *b,
                offset: 0,
                data: f32_bytes(data).into(),
            };
            if !matches!(job.op(&gpu, op).await, Some(Ok(_))) {
                return;
            }
        }
        let (function, args, result) = if saxpy {
            let args = vec![
                KernelArg::F32(a_coef),
                KernelArg::Buffer(buffers[0]),
                KernelArg::Buffer(buffers[1]),
                KernelArg::U32(n),
            ];
            ("saxpy", args, buffers[1])
        } else {
            let args = vec![
                KernelArg::Buffer(buffers[0]),
                KernelArg::Buffer(buffers[1]),
                KernelArg::Buffer(buffers[2]),
                KernelArg::U32(n),
            ];
            ("vector_add", args, buffers[2])
        };
        let launch = Op::Launch {
            module,
            function: function.into(),
            grid: Dim3::x(n.div_ceil(256)),
            block: Dim3::x(256),
            shared_mem_bytes: 0,
            args,
        };
        if !matches!(job.op(&gpu, launch).await, Some(Ok(_))) {
            return;
        }
        let got = match job
            .op(
                &gpu,
                Op::CopyFromDevice {
                    src: result,
                    offset: 0,
                    len: bytes,
                },
            )
            .await
        {
            Some(Ok(Reply::Data(d))) => f32s(d.as_bytes()),
            _ => return,
        };
        let ok = if saxpy {
            let mut want = ys.clone();
            reference::saxpy(a_coef, &xs, &mut want);
            got.len() == want.len()
                && got
                    .iter()
                    .zip(&want)
                    .all(|(g, w)| kernels::within_ulps(*g, *w, SAXPY_TOLERANCE_ULPS))
        } else {
            got == reference::vector_add(&xs, &ys)
        };
        if !ok {
            job.record(|o| o.wrong += 1);
        }
    };
    verified.await;
    for b in buffers {
        if let Some(owner) = job.target.device_of(&gpu, b.device) {
            job.op(&owner, Op::Free { buffer: b }).await;
        }
    }
    true
}

/// Runs the job; see the module docs for the exit status.
pub(crate) fn main(args: RunArgs) -> ExitCode {
    let config = match args.common.config() {
        Ok(c) => c,
        Err(code) => return code,
    };
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("hipvisor: cannot start tokio: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(run(args, config))
}

/// Handles SIGINT and SIGTERM (as PID 1 of a container the process gets no default action
/// for them): the first stops the job — `stop` takes its number and the receiver sees it —
/// and a second exits the process at once with 128 + its number (its workers die with it:
/// their parent-death signal).
fn listen_for_signals(stop: Arc<AtomicI32>) -> tokio::sync::watch::Receiver<i32> {
    use tokio::signal::unix::{SignalKind, signal};
    let (tx, rx) = tokio::sync::watch::channel(0);
    let (mut int, mut term) = match (signal(SignalKind::interrupt()), signal(SignalKind::terminate())) {
        (Ok(int), Ok(term)) => (int, term),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("hipvisor: cannot handle SIGINT and SIGTERM: {e}");
            // The sender stays alive: the receiver just never sees a signal.
            std::mem::forget(tx);
            return rx;
        }
    };
    tokio::spawn(async move {
        let mut first = true;
        loop {
            let signal = tokio::select! {
                _ = int.recv() => SIGINT,
                _ = term.recv() => SIGTERM,
            };
            let name = signal_name(signal);
            if !first {
                eprintln!("hipvisor: {name} again: exiting at once");
                std::process::exit(128 + signal);
            }
            first = false;
            eprintln!(
                "hipvisor: {name}: stopping: no new ops; the ops in flight are answered, then the runtime \
                 shuts down and the report follows ({name} again exits at once)"
            );
            stop.store(signal, Ordering::Relaxed);
            let _ = tx.send(signal);
        }
    });
    rx
}

/// Waits until a signal stopped the job.
async fn signalled(rx: &mut tokio::sync::watch::Receiver<i32>) {
    if rx.wait_for(|s| *s != 0).await.is_err() {
        std::future::pending::<()>().await;
    }
}

async fn run(args: RunArgs, config: hipvisor::RuntimeConfig) -> ExitCode {
    let seed = config.sim.seed;
    let isolation = config.runtime.isolation;
    let op_deadline = Duration::from_millis(config.runtime.op_deadline_ms);
    let stop = Arc::new(AtomicI32::new(0));
    let mut stop_rx = listen_for_signals(stop.clone());
    #[cfg(feature = "cluster")]
    if !args.join.is_empty() {
        let cluster = match join(&args, &config).await {
            Ok(c) => Arc::new(c),
            Err(code) => return code,
        };
        let devices = cluster.devices().await.len() as u32;
        let ever_ready = cluster.any().is_some();
        let target = Target::Cluster(cluster);
        let (job, elapsed, interrupted) = match drive(target, &args, seed, op_deadline, stop).await {
            Ok(done) => done,
            Err(code) => return code,
        };
        let end = RunEnd {
            json: args.json,
            chaos: false,
            workload: args.workload,
            backend: "cluster",
            isolation: "remote",
            devices,
            elapsed,
            interrupted,
            ever_ready,
        };
        return finish(job, end).await;
    }
    let mut builder = Runtime::builder().config(config);
    if let Some(addr) = args.metrics_addr {
        builder = builder.serve_metrics(addr);
    }
    let runtime = match builder.start().await {
        Ok(r) => Arc::new(r),
        Err(e) => {
            eprintln!("hipvisor: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(addr) = runtime.metrics_addr() {
        eprintln!("listening on {addr}");
    }
    // Whether any device was ever ready: now (start has settled every device) or later.
    let mut changes = runtime.subscribe();
    let ever_ready = Arc::new(AtomicBool::new(
        runtime.states().contains(&hipvisor::DeviceState::Ready),
    ));
    let watcher = {
        let ever_ready = ever_ready.clone();
        tokio::spawn(async move {
            use tokio::sync::broadcast::error::RecvError;
            loop {
                match changes.recv().await {
                    Ok(c) if c.to == hipvisor::DeviceState::Ready => {
                        ever_ready.store(true, Ordering::Relaxed);
                        return;
                    }
                    Ok(_) | Err(RecvError::Lagged(_)) => {}
                    Err(RecvError::Closed) => return,
                }
            }
        })
    };
    let (job, elapsed, mut interrupted) =
        match drive(Target::Local(runtime.clone()), &args, seed, op_deadline, stop.clone()).await {
            Ok(done) => done,
            Err(code) => return code,
        };
    if args.chaos && interrupted.is_none() {
        // Every device must be ready at the end: give lost and restarting ones time to
        // return (a failed one is out of service for good: no use waiting for it; a signal
        // cuts this short, and the run counts as interrupted).
        use hipvisor::DeviceState::{Failed, Ready};
        let until = std::time::Instant::now() + Duration::from_secs(60);
        while !runtime.states().iter().all(|s| matches!(s, Ready | Failed)) && std::time::Instant::now() < until {
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(20)) => {}
                () = signalled(&mut stop_rx) => {
                    interrupted = Some(stop.load(Ordering::Relaxed));
                    break;
                }
            }
        }
    }
    if args.linger > 0.0 && runtime.metrics_addr().is_some() {
        // The run is over: the endpoint serves its final values (until a signal).
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs_f64(args.linger)) => {}
            () = signalled(&mut stop_rx) => {}
        }
    }
    watcher.abort();
    let end = RunEnd {
        json: args.json,
        chaos: args.chaos,
        workload: args.workload,
        backend: runtime.backend().as_str(),
        isolation: isolation.as_str(),
        devices: runtime.device_count(),
        elapsed,
        interrupted,
        ever_ready: ever_ready.load(Ordering::Relaxed),
    };
    drop(runtime);
    finish(job, end).await
}

/// Joins the nodes of `--join` with the cookie of `--cookie-file`; exit status 2 for flags
/// that do not go with it, 1 when a node cannot be joined.
#[cfg(feature = "cluster")]
async fn join(args: &RunArgs, config: &hipvisor::RuntimeConfig) -> Result<hipvisor::cluster::Cluster, ExitCode> {
    if args.chaos {
        eprintln!(
            "hipvisor: chaos does not take --join: run `hipvisor chaos` on each node (cluster-wide chaos is not built)"
        );
        return Err(ExitCode::from(2));
    }
    if args.metrics_addr.is_some() || args.linger > 0.0 {
        eprintln!(
            "hipvisor: --metrics-addr and --linger with --join: each node serves its own (`hipvisor node --metrics-addr`)"
        );
        return Err(ExitCode::from(2));
    }
    let Some(path) = &args.cookie_file else {
        eprintln!("hipvisor: --join needs --cookie-file");
        return Err(ExitCode::from(2));
    };
    let cookie = crate::cli::node::read_cookie(path)?;
    hipvisor::cluster::Cluster::join(&args.join, &cookie, config)
        .await
        .map_err(|e| {
            eprintln!("hipvisor: cannot join the cluster: {e}");
            ExitCode::FAILURE
        })
}

/// Runs the application actors against `target` until the job's ops are submitted (or a
/// signal stops it): the job, its seconds, and the signal that stopped it early.
async fn drive(
    target: Target,
    args: &RunArgs,
    seed: u64,
    op_deadline: Duration,
    stop: Arc<AtomicI32>,
) -> Result<(Arc<Job>, f64, Option<i32>), ExitCode> {
    let progress = ProgressBar::new(args.ops);
    progress.set_style(
        ProgressStyle::with_template("{spinner} {pos}/{len} ops [{bar:40}] {per_sec} {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let job = Arc::new(Job {
        target,
        budget: Budget::new(args.ops),
        observed: Mutex::new(Observed::default()),
        progress: progress.clone(),
        op_deadline,
        stop: stop.clone(),
    });
    // The inference workload's model, on every device (its ops are not requests).
    let mlp = match args.workload {
        Workload::Ops => None,
        Workload::Inference => match Mlp::load(&job.target, seed).await {
            Ok(m) => Some(Arc::new(m)),
            Err(e) => {
                eprintln!("hipvisor: the inference model could not be loaded on any device: {e}");
                return Err(ExitCode::FAILURE);
            }
        },
    };
    let started = Instant::now();
    let mut handles = Vec::new();
    for i in 0..args.actors.max(1) {
        let worker_seed = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(u64::from(i));
        let spawned = match &mlp {
            None => Actor::spawn(None, AppActor, (job.clone(), worker_seed))
                .await
                .map(|(_, h)| h),
            Some(m) => Actor::spawn(None, RequestActor, (job.clone(), m.clone(), worker_seed))
                .await
                .map(|(_, h)| h),
        };
        match spawned {
            Ok(h) => handles.push(h),
            Err(e) => {
                eprintln!("hipvisor: cannot start an application actor: {e}");
                return Err(ExitCode::FAILURE);
            }
        }
    }
    for h in handles {
        let _ = h.await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    progress.finish_and_clear();
    // Interrupted: a signal stopped the job before it had submitted its ops.
    let interrupted = match stop.load(Ordering::Relaxed) {
        0 => None,
        _ if job.budget.spent() => None,
        s => Some(s),
    };
    Ok((job, elapsed, interrupted))
}

/// How the run went, beside what the job observed.
struct RunEnd {
    json: bool,
    chaos: bool,
    workload: Workload,
    backend: &'static str,
    isolation: &'static str,
    devices: u32,
    elapsed: f64,
    /// The signal that stopped the job before it had submitted its ops.
    interrupted: Option<i32>,
    /// Whether any device was ready at some point.
    ever_ready: bool,
}

async fn finish(job: Arc<Job>, end: RunEnd) -> ExitCode {
    let RunEnd {
        json: json_out,
        chaos,
        workload,
        backend,
        isolation,
        devices,
        elapsed,
        interrupted,
        ever_ready,
    } = end;
    let Ok(job) = Arc::try_unwrap(job) else {
        eprintln!("hipvisor: internal error: the job is still shared");
        return ExitCode::FAILURE;
    };
    let o = hipvisor_core::sync::into_inner(job.observed);
    let submitted = job.budget.submitted();
    let answered = o.succeeded + o.failed;
    // What the metrics say was answered and succeeded, against what was observed.
    let (snapshot, (metric_answered, metric_succeeded), (answered, succeeded), nodes, verdict) = match job.target {
        Target::Local(runtime) => {
            let Ok(runtime) = Arc::try_unwrap(runtime) else {
                eprintln!("hipvisor: internal error: the runtime is still shared");
                return ExitCode::FAILURE;
            };
            let snapshot = runtime.shutdown().await;
            // The inference workload's requests are its tasks (the model's setup ops
            // aside): one op of kind `task` each in the metrics.
            let metric = match workload {
                Workload::Ops => (snapshot.ops_total, snapshot.ops_succeeded),
                Workload::Inference => {
                    snapshot
                        .ops
                        .iter()
                        .filter(|c| c.op == hipvisor::OpKind::Task)
                        .fold((0, 0), |(a, s), c| {
                            let ok = c.outcome == hipvisor::metrics::Outcome::Success;
                            (a + c.count, s + if ok { c.count } else { 0 })
                        })
                }
            };
            (
                snapshot,
                metric,
                (answered, o.succeeded),
                None::<(serde_json::Value, serde_json::Value)>,
                None,
            )
        }
        #[cfg(feature = "cluster")]
        Target::Cluster(cluster) => {
            let end = crate::cli::node::ClusterEnd::of(&cluster).await;
            (
                end.snapshot,
                end.metric,
                end.answered,
                Some((end.nodes, end.devices)),
                Some(end.consistent),
            )
        }
    };
    let consistent = verdict.unwrap_or(metric_answered == answered && metric_succeeded == succeeded);
    let class = |k: &str| o.by_class.get(k).copied().unwrap_or(0);
    let device_states = || {
        snapshot
            .devices
            .iter()
            .map(|d| match &d.reason {
                Some(r) => format!("device {} {} ({r})", d.id, d.state.as_str()),
                None => format!("device {} {}", d.id, d.state.as_str()),
            })
            .collect::<Vec<_>>()
            .join("; ")
    };
    // A job asked to submit ops that could not run is a failure, not an empty success.
    let could_not_run = if job.budget.limit == 0 {
        None
    } else if !ever_ready && o.succeeded == 0 {
        Some(format!("no device became ready: {}", device_states()))
    } else if interrupted.is_some() {
        None
    } else if submitted == 0 {
        Some(format!(
            "no op could be submitted: no device could take work: {}",
            device_states()
        ))
    } else if o.succeeded == 0 {
        let errors = o
            .by_error
            .iter()
            .map(|(e, n)| format!("{e} {n}"))
            .collect::<Vec<_>>()
            .join(", ");
        Some(format!(
            "no op succeeded: every one of the {submitted} submitted failed ({errors}); {}",
            device_states()
        ))
    } else {
        None
    };
    let mut report = json!({
        "backend": backend,
        "isolation": isolation,
        "devices": devices,
        "ops": {
            "submitted": submitted,
            "succeeded": o.succeeded,
            "failed": o.failed,
            "missing_replies": o.missing,
            "wrong_results": o.wrong,
        },
        "failures_by_class": {
            "transient": class("transient"),
            "invalid_request": class("invalid_request"),
            "sticky": class("sticky"),
            "device_lost": class("device_lost"),
            "other": class("other"),
        },
        "failures_by_error": o.by_error,
        "retries": {
            "attempts": snapshot.retries.attempts,
            "succeeded": snapshot.retries.succeeded,
            "exhausted": snapshot.retries.exhausted,
        },
        "restarts": snapshot.restarts,
        "devices_final": snapshot.devices.iter().map(|d| json!({"id": d.id, "state": d.state.as_str()})).collect::<Vec<_>>(),
        "latency_us": {"p50": o.latencies_us.quantile(0.5), "p99": o.latencies_us.quantile(0.99)},
        "throughput_ops_per_s": if elapsed > 0.0 { submitted as f64 / elapsed } else { 0.0 },
        "elapsed_s": elapsed,
        "metrics_consistent": consistent,
        "interrupted": interrupted.map(signal_name),
        "could_not_run": could_not_run,
    });
    // Failed requests the application would have to handle: all but its own invalid ones
    // and poison requests (quarantined tasks).
    let quarantined = o.by_error.get("task_quarantined").copied().unwrap_or(0);
    let app_visible = o.failed.saturating_sub(class("invalid_request") + quarantined);
    if workload == Workload::Inference {
        report["workload"] = json!("inference");
        report["requests"] = json!({"submitted": submitted, "succeeded": o.succeeded, "failed": o.failed});
        report["app_visible_failures"] = json!(app_visible);
        report["task_reruns"] = json!(snapshot.recovery.task_reruns);
        report["tasks_quarantined"] = json!(snapshot.recovery.tasks_quarantined);
        report["request_latency_us"] = json!({
            "p50": o.latencies_us.quantile(0.5),
            "p99": o.latencies_us.quantile(0.99),
            "max": o.latencies_us.max(),
        });
        report["durable"] = json!(snapshot.recovery);
    }
    if let Some((nodes, devices)) = nodes {
        // The runner serves no device: the final states are the nodes'.
        report["devices_final"] = devices;
        report["nodes"] = nodes;
    }
    let mut violations: Vec<String> = Vec::new();
    if chaos {
        if o.missing > 0 {
            violations.push(format!("{} replies missing", o.missing));
        }
        if o.late > 0 {
            violations.push(format!("{} ops answered after their deadline", o.late));
        }
        if o.wrong > 0 {
            violations.push(format!("{} wrong results", o.wrong));
        }
        if !consistent {
            violations.push(format!(
                "metrics disagree with the application: {} answered / {} succeeded in the metrics, {answered} / {} observed",
                metric_answered, metric_succeeded, succeeded
            ));
        }
        if let Some(why) = &could_not_run {
            violations.push(format!("the job could not run: {why}"));
        }
        // The inference workload sends no invalid request: one is the runtime's doing.
        if workload == Workload::Inference && class("invalid_request") > 0 {
            violations.push(format!(
                "{} requests answered as invalid, which the workload never sends",
                class("invalid_request")
            ));
        }
        if workload == Workload::Inference && app_visible > 0 {
            violations.push(format!(
                "{app_visible} requests failed visibly to the application ({:?})",
                o.by_error
            ));
        }
        // An interrupted soak did not wait for its devices to return.
        for d in snapshot
            .devices
            .iter()
            .filter(|d| interrupted.is_none() && d.state != hipvisor::DeviceState::Ready)
        {
            violations.push(format!(
                "device {} ended {} ({})",
                d.id,
                d.state.as_str(),
                d.reason.clone().unwrap_or_default()
            ));
        }
        report["violations"] = json!(violations);
    }
    if json_out {
        println!("{report}");
    } else {
        let command = if chaos { "chaos" } else { "run" };
        print!("{}", summary::run(command, &report, &summary::device_rows(&snapshot)));
    }
    if !consistent {
        eprintln!(
            "hipvisor: metrics disagree with what the application observed: metrics {} answered / {} succeeded, \
             observed {answered} / {}",
            metric_answered, metric_succeeded, succeeded
        );
    }
    for v in &violations {
        eprintln!("hipvisor: chaos: violation: {v}");
    }
    if let Some(why) = &could_not_run
        && !chaos
    {
        eprintln!("hipvisor: the job could not run: {why}");
    }
    if o.missing > 0 || o.wrong > 0 || !consistent || !violations.is_empty() || could_not_run.is_some() {
        ExitCode::FAILURE
    } else if let Some(signal) = interrupted {
        ExitCode::from(128 + signal as u8)
    } else {
        ExitCode::SUCCESS
    }
}

#[cfg(test)]
mod tests {
    use super::Budget;
    use std::sync::Barrier;

    /// Claims `budget` from `threads` threads let go at once, each until refused: the claims
    /// each thread made.
    fn claim_at_once(budget: &Budget, threads: usize) -> Vec<u64> {
        let start = Barrier::new(threads);
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..threads)
                .map(|_| {
                    s.spawn(|| {
                        start.wait();
                        let mut mine = 0u64;
                        while budget.claim() {
                            mine += 1;
                        }
                        mine
                    })
                })
                .collect();
            handles.into_iter().map(|t| t.join().unwrap()).collect()
        })
    }

    #[test]
    fn request_actors_claiming_at_once_never_take_more_than_the_budget() {
        // The last claims are where a look-then-count would let two through: many rounds of
        // a budget of one, and one long round. A check by chance (a look-then-count failed it
        // in 4 runs of 6): the guarantee is `claim`'s one atomic step.
        for round in 0..1_500 {
            let budget = Budget::new(1);
            let claims = claim_at_once(&budget, 4);
            assert_eq!(claims.iter().sum::<u64>(), 1, "round {round}: {claims:?}");
            assert_eq!(budget.submitted(), 1);
        }
        let budget = Budget::new(10_000);
        assert_eq!(claim_at_once(&budget, 8).iter().sum::<u64>(), 10_000);
        assert!(budget.spent() && !budget.claim());
        // Counting (the ops workload) goes past it; claiming still refuses.
        budget.count();
        assert_eq!(budget.submitted(), 10_001);
        assert!(!budget.claim());
    }
}
