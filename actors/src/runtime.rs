//! The runtime facade: [`Runtime`], [`RuntimeBuilder`], and the state its parts share.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hipvisor_core::config::Isolation;
use hipvisor_core::{
    Backend, BackendKind, ConfigError, GpuError, MemInfo, Op, OpKind, Origin, Reply, RuntimeConfig, SimBackend,
};
use opentelemetry::metrics::Meter;
use ractor::{Actor, ActorRef};
use tokio::sync::broadcast;
use tokio::task::JoinHandle;

#[cfg(feature = "test-hooks")]
use crate::device::Armed;
use crate::device::{DeviceActor, DeviceCore, DeviceHandle, DeviceMsg, Work};
use crate::error::{OpResult, RuntimeError};
use crate::executor;
use crate::job::{BatchSink, Job, Port, ReplySlot};
use crate::metrics::{MetricsActor, MetricsArgs, MetricsEvent, MetricsMsg, Snapshot};
use crate::state::{DeviceState, DeviceStateChange};
use crate::supervisor::{Supervisor, SupervisorArgs, SupervisorMsg};

/// Why the runtime could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The backend could not be used (no driver, no device, ...).
    #[error("backend {backend}: {error}")]
    Backend {
        /// The backend.
        backend: BackendKind,
        /// What failed.
        error: GpuError,
    },
    /// The backend is not part of this build, or the isolation is not available.
    #[error("{0}")]
    Unsupported(String),
    /// An actor or thread could not be started.
    #[error("could not start {what}: {why}")]
    Spawn {
        /// What.
        what: String,
        /// Why.
        why: String,
    },
}

/// What every part of the runtime shares.
pub(crate) struct Shared {
    pub(crate) cores: Vec<Arc<DeviceCore>>,
    pub(crate) backend: Arc<dyn Backend>,
    pub(crate) config: RuntimeConfig,
    pub(crate) closing: AtomicBool,
    pub(crate) states: broadcast::Sender<DeviceStateChange>,
    pub(crate) metrics: ActorRef<MetricsMsg>,
    pub(crate) supervisor: Mutex<Option<ActorRef<SupervisorMsg>>>,
    /// Tasks holding jobs between attempts (backoff timers), aborted at shutdown.
    pub(crate) retry_tasks: Mutex<tokio::task::JoinSet<()>>,
    flushing: Mutex<()>,
    /// The program started as a device's worker (process isolation).
    pub(crate) worker_program: std::path::PathBuf,
    /// Starts every worker, from one long-lived thread.
    pub(crate) spawner: crate::process::Spawner,
    /// Every worker process, from its spawn until it is reaped.
    pub(crate) workers: crate::process::Workers,
    /// The tokio runtime the application started us on: its queue of woken tasks tells
    /// whether spinning would take a CPU that tasks are waiting for.
    pub(crate) tokio: tokio::runtime::RuntimeMetrics,
}

impl Shared {
    /// How long to poll instead of parking a thread while `device` serves a serial caller:
    /// `runtime.spin_us` when the device has at most one op in flight and no woken task is
    /// waiting for a tokio thread. Otherwise zero: the next op is coming anyway, and the CPU
    /// is better left to the tasks that produce it. (Without the second condition, 64
    /// callers on 2 cores look serial whenever their answered tasks wait to be polled, and
    /// the executor's spin took half its thread's time — measured with `perf`.)
    pub(crate) fn spin_for(&self, device: u32) -> Duration {
        let spin_us = self.config.runtime.spin_us;
        if spin_us == 0 || self.cores[device as usize].in_flight() > 1 || self.tokio.global_queue_depth() > 0 {
            return Duration::ZERO;
        }
        Duration::from_micros(spin_us)
    }

    /// Runs a task that holds a job between attempts; shutdown aborts it (the job's slot
    /// then answers `ShuttingDown`).
    pub(crate) fn spawn_retry(&self, f: impl std::future::Future<Output = ()> + Send + 'static) {
        let mut set = self.retry_tasks.lock().unwrap_or_else(|p| p.into_inner());
        while set.try_join_next().is_some() {}
        set.spawn(f);
    }

    /// Application ops accepted and not answered yet, on every device.
    pub(crate) fn outstanding(&self) -> i64 {
        self.cores.iter().map(|c| c.counters.outstanding()).sum()
    }

    pub(crate) fn metrics_event(&self, e: MetricsEvent) {
        let _ = self.metrics.cast(MetricsMsg::Event(e));
    }

    /// Sends a report to the supervisor; if it is gone, answers the op itself.
    pub(crate) fn report(&self, msg: SupervisorMsg) {
        let sup = self.supervisor.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let undelivered = match sup {
            Some(s) => match s.cast(msg) {
                Ok(()) => None,
                Err(ractor::MessagingErr::SendErr(m)) => Some(m),
                Err(_) => None,
            },
            None => Some(msg),
        };
        if let Some(SupervisorMsg::Failed(f)) = undelivered {
            let core = &self.cores[f.device as usize];
            f.job.answer(Err(RuntimeError::Gpu(f.error)), &core.counters);
        }
    }

    /// Changes a device's state, telling subscribers and the metrics actor.
    pub(crate) fn set_state(&self, device: u32, to: DeviceState, reason: Option<String>) {
        let core = &self.cores[device as usize];
        *core.reason.lock().unwrap_or_else(|p| p.into_inner()) = reason.clone();
        let from = core.state.set(to);
        if from == to {
            return;
        }
        tracing::info!(
            device,
            from = from.as_str(),
            to = to.as_str(),
            reason = reason.as_deref().unwrap_or(""),
            "device state"
        );
        self.metrics_event(MetricsEvent::State {
            device,
            state: to,
            reason: reason.clone(),
        });
        let _ = self.states.send(DeviceStateChange {
            device,
            from,
            to,
            reason,
        });
        // A device out of service keeps nothing queued.
        self.settle_dead_queue(device);
    }

    /// Answers what is queued for a device that is out of service: everything (with
    /// `DeviceFailed`) when it has failed; when it is lost, the application's ops, which move
    /// to a ready device if they may ([`Shared::movable`]) and are answered `DeviceLost`
    /// otherwise — the runtime's own ops (the probe that watches for its return) stay. Does
    /// nothing for a ready or restarting device.
    pub(crate) fn settle_dead_queue(&self, device: u32) {
        let core = &self.cores[device as usize];
        match core.state.get() {
            DeviceState::Ready | DeviceState::Restarting => {}
            DeviceState::Failed => core.drain(|_| core.failed_error(false)),
            DeviceState::Lost => {
                let (jobs, other) = core.take_queue();
                let mut stay = Vec::new();
                for job in jobs {
                    if job.slot.is_answered() {
                        continue;
                    }
                    if job.origin == Origin::Runtime {
                        stay.push(job);
                    } else {
                        self.resubmit(job);
                    }
                }
                core.put_back(stay, other);
                self.queued(device);
            }
        }
    }

    /// Queues a job again on the priority lane of its device (it was taken but did not run:
    /// see [`DeviceCore::requeue`]); answered at once if the device is out of service by now,
    /// or the runtime is closing.
    pub(crate) fn requeue(&self, job: Job) {
        let device = job.device;
        let core = &self.cores[device as usize];
        core.requeue(job);
        // After the job is in: a drain that ran before it cannot have taken it, so look again.
        // (A drain racing with this is caught by the watchdog's next look.)
        if matches!(core.state.get(), DeviceState::Failed | DeviceState::Lost) {
            self.settle_dead_queue(device);
        }
        self.queued(device);
    }

    /// Called after anything is queued on `device` (or put back in its queue): once the
    /// runtime is closing, nothing may stay queued — the drain of [`Runtime::shutdown`] or
    /// `Drop for Runtime` may have run before it was queued, and a dropped runtime has no
    /// watchdog left — so the queue is drained with `ShuttingDown`.
    ///
    /// Either this load sees `closing`, or the drain that follows the store of `closing` sees
    /// the job: the store and this load are `SeqCst`, and so is the channel's send (a
    /// `SeqCst` compare-and-swap of its tail in crossbeam), which comes before this load. The
    /// cost on the hot path: one atomic load per enqueue.
    pub(crate) fn queued(&self, device: u32) {
        if self.closing.load(Ordering::SeqCst) {
            self.cores[device as usize].drain(|_| RuntimeError::ShuttingDown);
        }
    }

    /// The least-loaded ready device other than `except`.
    pub(crate) fn least_loaded(&self, except: Option<u32>) -> Option<u32> {
        self.cores
            .iter()
            .filter(|c| c.state.get() == DeviceState::Ready && Some(c.index) != except)
            .min_by_key(|c| c.in_flight())
            .map(|c| c.index)
    }

    /// Whether an op may run on another device than the one it was sent to: it uses no
    /// buffer or module of its device, and its answer does not describe the device.
    pub(crate) fn movable(op: &Op) -> bool {
        matches!(op, Op::Alloc { .. } | Op::LoadModule { .. })
    }

    /// Admits and queues an op if it can be done without waiting; otherwise gives it back
    /// (the device is at its in-flight bound). With `hold`, an admitted job is put there
    /// instead of queued.
    pub(crate) fn submit_now(
        self: &Arc<Self>,
        device: u32,
        op: Op,
        reply: Port,
        busy_is_final: bool,
        hold: Option<&mut Vec<Job>>,
    ) -> Option<(Op, Port)> {
        match self.route(device, &op) {
            Err(e) => {
                self.answer_unqueued(device, op, reply, e);
                None
            }
            Ok(target) => {
                let core = &self.cores[target as usize];
                match core.permits.clone().try_acquire_owned() {
                    Ok(permit) => {
                        self.admit_and_queue(target, op, reply, permit, hold);
                        None
                    }
                    Err(tokio::sync::TryAcquireError::Closed) => {
                        // Closed by shutdown or a dropped runtime.
                        self.answer_unqueued(target, op, reply, RuntimeError::ShuttingDown);
                        None
                    }
                    Err(_) if busy_is_final => {
                        let busy = RuntimeError::Busy {
                            device: target,
                            capacity: core.capacity,
                        };
                        self.answer_unqueued(target, op, reply, busy);
                        None
                    }
                    Err(_) => Some((op, reply)),
                }
            }
        }
    }

    /// Admits and queues an op, waiting for an in-flight slot if `wait`.
    pub(crate) async fn submit(self: &Arc<Self>, device: u32, op: Op, reply: Port, wait: bool) {
        let Some((op, reply)) = self.submit_now(device, op, reply, !wait, None) else {
            return;
        };
        let target = match self.route(device, &op) {
            Ok(t) => t,
            Err(e) => return self.answer_unqueued(device, op, reply, e),
        };
        let permit = match self.cores[target as usize].permits.clone().acquire_owned().await {
            Ok(p) => p,
            Err(_) => return self.answer_unqueued(device, op, reply, RuntimeError::ShuttingDown),
        };
        if self.closing.load(Ordering::Acquire) {
            return self.answer_unqueued(device, op, reply, RuntimeError::ShuttingDown);
        }
        self.admit_and_queue(target, op, reply, permit, None);
    }

    /// Admits and queues a batch of ops, each as [`Shared::submit`] does, but queued
    /// together once admitted, so the executor wakes once and (in process isolation) sends
    /// them to the worker in one request. At the in-flight bound, what is admitted so far is
    /// queued and the rest waits for slots.
    pub(crate) async fn submit_batch(self: &Arc<Self>, device: u32, ops: Vec<Op>, sink: &Arc<BatchSink>) {
        let mut held = Vec::with_capacity(ops.len());
        for (index, op) in ops.into_iter().enumerate() {
            let port = Port::Batch(sink.clone(), index);
            if let Some((op, port)) = self.submit_now(device, op, port, false, Some(&mut held)) {
                self.queue_held(&mut held);
                self.submit(device, op, port, true).await;
            }
        }
        self.queue_held(&mut held);
    }

    fn queue_held(&self, held: &mut Vec<Job>) {
        let mut devices = Vec::new();
        for job in held.drain(..) {
            if !devices.contains(&job.device) {
                devices.push(job.device);
            }
            self.cores[job.device as usize].enqueue(job);
        }
        for device in devices {
            self.queued(device);
        }
    }

    /// Where an op sent to `device` goes: the device itself, another one if it is lost and
    /// the op may move, or an immediate typed error.
    fn route(&self, device: u32, op: &Op) -> Result<u32, RuntimeError> {
        if self.closing.load(Ordering::Acquire) {
            return Err(RuntimeError::ShuttingDown);
        }
        let count = self.cores.len() as u32;
        let core = self
            .cores
            .get(device as usize)
            .ok_or(RuntimeError::NoSuchDevice { device, count })?;
        match core.state.get() {
            DeviceState::Ready | DeviceState::Restarting => Ok(device),
            DeviceState::Failed => Err(core.failed_error(false)),
            DeviceState::Lost => match Self::movable(op).then(|| self.least_loaded(Some(device))).flatten() {
                Some(other) => Ok(other),
                None => Err(core.lost_error()),
            },
        }
    }

    /// Answers an op that was never queued, counted under its device — or, for a device
    /// index out of range (no device to count it under), answered directly.
    fn answer_unqueued(&self, device: u32, op: Op, reply: Port, e: RuntimeError) {
        match self.cores.get(device as usize) {
            Some(core) => {
                core.job(op, Origin::Application, reply, None)
                    .answer(Err(e), &core.counters);
            }
            None => reply.send(Err(e), None),
        }
    }

    fn admit_and_queue(
        &self,
        device: u32,
        op: Op,
        reply: Port,
        permit: tokio::sync::OwnedSemaphorePermit,
        hold: Option<&mut Vec<Job>>,
    ) {
        let core = &self.cores[device as usize];
        match core.admit(&op, self) {
            Err(e) => {
                let job = core.job(op, Origin::Application, reply, None);
                job.answer(Err(e), &core.counters);
            }
            Ok(()) => {
                core.requests.fetch_add(1, Ordering::Relaxed);
                let job = core.job(op, Origin::Application, reply, Some(permit));
                match hold {
                    Some(held) => held.push(job),
                    None => {
                        core.enqueue(job);
                        // `route` saw the runtime open, but it may have closed (and drained)
                        // since.
                        self.queued(device);
                    }
                }
            }
        }
    }

    /// Queues a job again (a retry after its backoff, or a move to another device).
    pub(crate) fn resubmit(&self, mut job: Job) {
        if self.closing.load(Ordering::Acquire) {
            let core = &self.cores[job.device as usize];
            job.answer(Err(RuntimeError::ShuttingDown), &core.counters);
            return;
        }
        let core = &self.cores[job.device as usize];
        match core.state.get() {
            DeviceState::Failed => {
                let e = core.failed_error(false);
                job.answer(Err(e), &core.counters);
            }
            DeviceState::Lost => match Self::movable(&job.op)
                .then(|| self.least_loaded(Some(job.device)))
                .flatten()
            {
                Some(other) => {
                    job.device = other;
                    let to = &self.cores[other as usize];
                    job.slot.retarget(to.counters.clone());
                    to.enqueue_again(job);
                    if matches!(to.state.get(), DeviceState::Failed | DeviceState::Lost) {
                        self.settle_dead_queue(other);
                    }
                    self.queued(other);
                }
                None => {
                    job.answer(Err(core.lost_error()), &core.counters);
                }
            },
            DeviceState::Ready | DeviceState::Restarting => {
                let device = job.device;
                core.enqueue_again(job);
                // Out of service since it was looked at: nothing waits in its queue.
                if matches!(core.state.get(), DeviceState::Failed | DeviceState::Lost) {
                    self.settle_dead_queue(device);
                }
                self.queued(device);
            }
        }
    }

    /// Runs an op of the runtime's own on the device's priority lane (never faulted by the
    /// simulator's plan, never waiting behind the in-flight bound).
    /// A failed device answers at once; otherwise the op is answered by its deadline at the
    /// latest, like any queued op.
    pub(crate) async fn runtime_op(&self, device: u32, op: Op) -> OpResult {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let core = &self.cores[device as usize];
        if core.state.get() == DeviceState::Failed {
            return Err(core.failed_error(false));
        }
        core.enqueue(core.job(op, Origin::Runtime, tx.into(), None));
        if core.state.get() == DeviceState::Failed {
            self.settle_dead_queue(device);
        }
        self.queued(device);
        rx.await.unwrap_or(Err(RuntimeError::ShuttingDown))
    }

    /// Free and total memory, through the priority lane.
    pub(crate) async fn mem_info(&self, device: u32) -> Result<MemInfo, RuntimeError> {
        match self.runtime_op(device, Op::MemInfo).await? {
            Reply::MemInfo(m) => Ok(m),
            other => unreachable!("mem-info answered {other:?}"),
        }
    }

    /// Sends every device's counts since the last flush to the metrics actor. Flushes are
    /// serialized: a delta taken by one flush is in the actor's mailbox before a later flush
    /// (and the snapshot request that follows it) can go on, so a snapshot never misses one.
    fn flush(&self) {
        let _one_at_a_time = self.flushing.lock().unwrap_or_else(|p| p.into_inner());
        for core in &self.cores {
            let _ = self
                .metrics
                .cast(MetricsMsg::Delta(core.index, Box::new(core.counters.take())));
        }
    }

    /// The watchdog's check, every quarter of `runtime.op_deadline_ms` (at most every
    /// 100 ms):
    ///
    /// - an op running past its deadline (a hung kernel) is answered `DeadlineExceeded {
    ///   may_have_executed: true }`; in process isolation its worker is killed, and the
    ///   supervisor restarts the device;
    /// - a worker still starting past `supervisor.worker_start_timeout_ms` is killed;
    /// - the queue of a device out of service is settled (a job queued again after the
    ///   drain that its state change made);
    /// - queued ops are answered at their deadline whatever their device does: when an op
    ///   in the queue may have reached its deadline and no executor is taking from the queue
    ///   (each is inside an op, starting a worker, or there is none), the queue is taken
    ///   apart, the ops past their deadline answered and the rest put back in order.
    ///
    /// `due[d]` is when device `d`'s queue may next hold an op past its deadline: no sooner
    /// than the earliest deadline left by the last sweep, nor than the time of that sweep
    /// plus the op deadline (every op queued since is a first submission, whose deadline is
    /// its admission plus the op deadline) — unless an op was queued again since, with its
    /// old deadline, which its device notes ([`DeviceCore::take_requeued_deadline`]). So a
    /// healthy device's queue is never taken apart, and the hot path keeps no index.
    fn watch(&self, due: &mut [Instant]) {
        let now = Instant::now();
        self.workers.kill_overdue_starts(now);
        for (core, due) in self.cores.iter().zip(due.iter_mut()) {
            let running = core.current.lock().unwrap_or_else(|p| p.into_inner());
            let overdue: Vec<(ReplySlot, OpKind)> = running
                .ops
                .iter()
                .filter(|c| now >= c.deadline && !c.slot.is_answered())
                .map(|c| (c.slot.clone(), c.op))
                .collect();
            if let Some(&(_, op)) = overdue.first() {
                let deadline_ms = core.deadline.as_millis() as u64;
                tracing::warn!(
                    device = core.index,
                    op = op.as_str(),
                    deadline_ms,
                    "op hung past its deadline"
                );
                // In a batch, the ops past their deadline may be the hung one or ones queued
                // behind it in the worker: either may have executed.
                for (slot, op) in overdue {
                    slot.answer(Err(core.deadline_exceeded(op, true)), 1, &core.counters);
                }
                if self.config.runtime.isolation == Isolation::Process {
                    // A hung kernel: kill the worker; the supervisor restarts the device.
                    core.kill_worker(&self.workers);
                }
            }
            if core.queue_is_empty() {
                // Anything queued from now on has a deadline after this (or noted).
                *due = core
                    .take_requeued_deadline()
                    .map_or(now + core.deadline, |d| d.min(now + core.deadline));
                continue;
            }
            if matches!(core.state.get(), DeviceState::Failed | DeviceState::Lost) {
                // What was queued after the drain of its state change. (What stays, the
                // runtime's own ops on a lost device, is still answered by its deadline.)
                self.settle_dead_queue(core.index);
                if core.queue_is_empty() {
                    continue;
                }
            }
            if let Some(d) = core.take_requeued_deadline() {
                *due = (*due).min(d);
            }
            if now < *due || running.takers > 0 {
                // Not yet; or an executor is taking from the queue, and answers what is past
                // its deadline as it takes it.
                continue;
            }
            let left = core.sweep(&running, now);
            *due = left.map_or(now + core.deadline, |d| d.min(now + core.deadline));
            drop(running);
            // A dropped runtime aborts this task, which does not wait for a sweep under way:
            // what the sweep put back after the drain is drained here.
            self.queued(core.index);
        }
    }
}

/// Builds a [`Runtime`].
#[derive(Default)]
pub struct RuntimeBuilder {
    config: Option<RuntimeConfig>,
    backend: Option<Arc<dyn Backend>>,
    meter: Option<Meter>,
    worker: Option<std::path::PathBuf>,
    listen: Option<std::net::SocketAddr>,
}

impl RuntimeBuilder {
    /// Uses this configuration (default: built-in defaults).
    pub fn config(mut self, config: RuntimeConfig) -> Self {
        self.config = Some(config);
        self
    }

    /// Uses this backend instead of the one `runtime.backend` names (tests, embedding).
    pub fn backend(mut self, backend: Arc<dyn Backend>) -> Self {
        self.backend = Some(backend);
        self
    }

    /// The program to start as a device's worker in process isolation: the
    /// `hipvisor-worker` binary, or any binary whose `main` begins with
    /// `hipvisor::core::worker::run_if_worker()`. Default: this executable (which must then
    /// begin its `main` that way, as the `hipvisor` command line does).
    pub fn worker(mut self, program: impl Into<std::path::PathBuf>) -> Self {
        self.worker = Some(program.into());
        self
    }

    /// Serves the metrics endpoint (`/metrics`, `/healthz`, `/readyz`, `/api/snapshot`, `/`)
    /// on `addr` (port 0 picks a free port; [`Runtime::metrics_addr`] tells which). Same as
    /// `telemetry.listen`. Without [`RuntimeBuilder::meter`], hipvisor installs its own meter
    /// provider with the Prometheus exporter for it.
    pub fn serve_metrics(mut self, addr: std::net::SocketAddr) -> Self {
        self.listen = Some(addr);
        self
    }

    /// Records metrics on this meter (default: the global meter provider's `hipvisor` meter).
    pub fn meter(mut self, meter: Meter) -> Self {
        self.meter = Some(meter);
        self
    }

    /// Starts the runtime: metrics actor, supervisor, one device actor and executor per
    /// device. Must be called inside a multi-thread tokio runtime.
    ///
    /// # Errors
    /// [`StartError`] saying what could not start.
    pub async fn start(self) -> Result<Runtime, StartError> {
        let config = self.config.unwrap_or_default();
        config.validate()?;
        if std::env::var_os(hipvisor_core::ipc::WORKER_ENV).is_some() {
            // This process was started as a worker but did not become one: starting a
            // runtime here would spawn workers of workers.
            return Err(StartError::Unsupported(format!(
                "this process was started as a hipvisor worker ({} is set) but its main did not call \
                 hipvisor::core::worker::run_if_worker(); call it first in main, or point \
                 RuntimeBuilder::worker at the hipvisor-worker binary",
                hipvisor_core::ipc::WORKER_ENV
            )));
        }
        let worker_program = match self.worker {
            Some(p) => p,
            None => std::env::current_exe().map_err(|e| StartError::Spawn {
                what: "the worker program (this executable)".into(),
                why: e.to_string(),
            })?,
        };
        let backend = match self.backend {
            Some(b) => b,
            None => make_backend(&config)?,
        };
        let available = backend.device_count().map_err(|error| StartError::Backend {
            backend: backend.kind(),
            error,
        })?;
        let devices = match config.runtime.devices {
            0 => available,
            n if n <= available => n,
            n => {
                return Err(StartError::Config(ConfigError::invalid(
                    "runtime.devices",
                    format!("{n} devices asked for, the {} backend has {available}", backend.kind()),
                )));
            }
        };
        if devices == 0 {
            return Err(StartError::Unsupported(format!(
                "the {} backend has no device",
                backend.kind()
            )));
        }
        let listen = match (self.listen, &config.telemetry.listen) {
            (Some(a), _) => Some(a),
            (None, Some(text)) => Some(text.parse().map_err(|_| {
                ConfigError::invalid(
                    "telemetry.listen",
                    format!("`{text}` is not an address like 127.0.0.1:9464"),
                )
            })?),
            (None, None) => None,
        };
        #[cfg(not(feature = "prometheus"))]
        if listen.is_some() {
            return Err(StartError::Unsupported(
                "telemetry.listen needs the `prometheus` feature of the hipvisor crate".into(),
            ));
        }
        // Instruments created before a provider is installed stay no-ops: the exporter's
        // provider exists before the metrics actor creates its instruments.
        #[cfg(feature = "prometheus")]
        let exporter = match (&listen, &self.meter) {
            (Some(_), None) => Some(crate::telemetry::Exporter::new().map_err(|why| StartError::Spawn {
                what: "the Prometheus exporter".into(),
                why,
            })?),
            _ => None,
        };
        #[cfg(feature = "prometheus")]
        let meter = match (&exporter, self.meter) {
            (Some(e), _) => e.meter(),
            (None, Some(m)) => m,
            (None, None) => opentelemetry::global::meter("hipvisor"),
        };
        #[cfg(not(feature = "prometheus"))]
        let meter = self.meter.unwrap_or_else(|| opentelemetry::global::meter("hipvisor"));
        let spawn_err = |what: &str| {
            let what = what.to_string();
            move |e: ractor::SpawnErr| StartError::Spawn {
                what,
                why: e.to_string(),
            }
        };
        let (metrics, _) = Actor::spawn(
            None,
            MetricsActor,
            MetricsArgs {
                meter,
                devices,
                max_retries: config.retry.max_retries,
            },
        )
        .await
        .map_err(spawn_err("the metrics actor"))?;
        let deadline = Duration::from_millis(config.runtime.op_deadline_ms);
        let cores = (0..devices)
            .map(|i| Arc::new(DeviceCore::new(i, config.runtime.in_flight, deadline, &config.breaker)))
            .collect();
        let (states, _) = broadcast::channel(1024);
        let spawner = match crate::process::Spawner::start() {
            Ok(s) => s,
            Err(e) => {
                metrics.stop(None);
                return Err(StartError::Spawn {
                    what: "the worker spawner thread".into(),
                    why: e.to_string(),
                });
            }
        };
        let shared = Arc::new(Shared {
            cores,
            backend,
            config: config.clone(),
            closing: AtomicBool::new(false),
            states,
            metrics: metrics.clone(),
            supervisor: Mutex::new(None),
            retry_tasks: Mutex::new(tokio::task::JoinSet::new()),
            flushing: Mutex::new(()),
            worker_program,
            spawner,
            workers: crate::process::Workers::default(),
            tokio: tokio::runtime::Handle::current().metrics(),
        });
        let supervisor = match Actor::spawn(None, Supervisor, SupervisorArgs { shared: shared.clone() }).await {
            Ok((supervisor, _)) => supervisor,
            Err(e) => {
                shared.spawner.stop();
                metrics.stop(None);
                return Err(spawn_err("the supervisor")(e));
            }
        };
        *shared.supervisor.lock().unwrap_or_else(|p| p.into_inner()) = Some(supervisor.clone());
        // From here a start that fails half-way drops the runtime it began, which stops
        // everything started so far (`Drop for Runtime`).
        let runtime = Runtime {
            shared: shared.clone(),
            supervisor: supervisor.clone(),
            tasks: Mutex::new(Vec::new()),
            stopped: false,
            #[cfg(feature = "prometheus")]
            endpoint: None,
            #[cfg(feature = "prometheus")]
            _exporter: None,
        };
        let mut tasks = Vec::new();
        let flush_every = Duration::from_millis(config.telemetry.flush_interval_ms);
        let s = shared.clone();
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(flush_every);
            loop {
                tick.tick().await;
                s.flush();
            }
        }));
        // The watchdog runs from before the first worker starts: it bounds that start too.
        let watch_every = (deadline / 4).clamp(Duration::from_millis(1), Duration::from_millis(100));
        let s = shared.clone();
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(watch_every);
            let mut due: Vec<Instant> = s.cores.iter().map(|c| Instant::now() + c.deadline).collect();
            loop {
                tick.tick().await;
                s.watch(&mut due);
            }
        }));
        *runtime.tasks.lock().unwrap_or_else(|p| p.into_inner()) = tasks;
        // Start every executor and wait until each has opened its context (or failed to),
        // and the supervisor has settled the device states.
        let mut opened = Vec::new();
        for d in 0..devices {
            let (tx, rx) = tokio::sync::oneshot::channel();
            executor::spawn(shared.clone(), d, 0, Some(tx)).map_err(|e| StartError::Spawn {
                what: format!("the executor of device {d}"),
                why: e.to_string(),
            })?;
            opened.push(rx);
        }
        for rx in opened {
            let _ = rx.await;
        }
        let _ = ractor::call!(supervisor, SupervisorMsg::Barrier);
        #[cfg(feature = "prometheus")]
        let runtime = {
            let mut runtime = runtime;
            if let Some(addr) = listen {
                let registry = exporter.as_ref().map(|e| e.registry.clone());
                let endpoint = crate::telemetry::serve(addr, shared.clone(), registry)
                    .await
                    .map_err(|e| StartError::Spawn {
                        what: format!("the metrics endpoint on {addr}"),
                        why: e.to_string(),
                    })?;
                tracing::info!(addr = %endpoint.addr, "metrics endpoint");
                runtime.endpoint = Some(endpoint);
            }
            runtime._exporter = exporter;
            runtime
        };
        Ok(runtime)
    }
}

/// The backend `runtime.backend` names, set up from the configuration.
///
/// # Errors
/// [`StartError::Unsupported`] for a backend not compiled into this build;
/// [`StartError::Config`] for a bad `[sim]` section.
pub fn make_backend(config: &RuntimeConfig) -> Result<Arc<dyn Backend>, StartError> {
    match config.runtime.backend {
        BackendKind::Sim => {
            let crash_allowed = config.runtime.isolation == Isolation::Process;
            Ok(Arc::new(SimBackend::from_config(&config.sim, crash_allowed)?))
        }
        #[cfg(feature = "hip")]
        BackendKind::Hip => Ok(Arc::new(hipvisor_core::backend::hip::HipBackend::new())),
        #[cfg(feature = "cuda")]
        BackendKind::Cuda => Ok(Arc::new(hipvisor_core::backend::cuda::CudaBackend::new())),
        #[allow(unreachable_patterns)]
        other => Err(StartError::Unsupported(format!(
            "backend `{other}` is not part of this build (build with `--features {other}`)"
        ))),
    }
}

/// The supervised multi-GPU runtime. See the crate docs for an example.
pub struct Runtime {
    shared: Arc<Shared>,
    supervisor: ActorRef<SupervisorMsg>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    /// Set once [`Runtime::shutdown`] has stopped everything; otherwise dropping the runtime
    /// does it.
    stopped: bool,
    #[cfg(feature = "prometheus")]
    endpoint: Option<crate::telemetry::Endpoint>,
    #[cfg(feature = "prometheus")]
    _exporter: Option<crate::telemetry::Exporter>,
}

impl Runtime {
    /// A builder.
    pub fn builder() -> RuntimeBuilder {
        RuntimeBuilder::default()
    }

    /// The configuration the runtime runs with.
    pub fn config(&self) -> &RuntimeConfig {
        &self.shared.config
    }

    /// The backend's kind.
    pub fn backend(&self) -> BackendKind {
        self.shared.backend.kind()
    }

    /// Number of devices.
    pub fn device_count(&self) -> u32 {
        self.shared.cores.len() as u32
    }

    /// A typed handle to device `index`.
    ///
    /// # Errors
    /// [`RuntimeError::NoSuchDevice`] for an index out of range.
    pub fn device(&self, index: u32) -> Result<DeviceHandle, RuntimeError> {
        if index as usize >= self.shared.cores.len() {
            return Err(RuntimeError::NoSuchDevice {
                device: index,
                count: self.device_count(),
            });
        }
        Ok(DeviceHandle {
            shared: self.shared.clone(),
            device: index,
        })
    }

    /// A handle to the least-loaded ready device.
    ///
    /// # Errors
    /// [`RuntimeError::NoReadyDevice`] when no device is ready.
    pub fn any(&self) -> Result<DeviceHandle, RuntimeError> {
        let device = self.shared.least_loaded(None).ok_or(RuntimeError::NoReadyDevice)?;
        Ok(DeviceHandle {
            shared: self.shared.clone(),
            device,
        })
    }

    /// The actor of device `index`, for application actors that `call!` it with
    /// [`DeviceMsg::Submit`]. After an actor restart this returns the new actor.
    ///
    /// # Errors
    /// [`RuntimeError::NoSuchDevice`] for an index out of range; `DeviceFailed` while the
    /// actor is being restarted.
    pub fn device_ref(&self, index: u32) -> Result<ActorRef<DeviceMsg>, RuntimeError> {
        let core = self
            .shared
            .cores
            .get(index as usize)
            .ok_or(RuntimeError::NoSuchDevice {
                device: index,
                count: self.device_count(),
            })?;
        core.actor
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or(RuntimeError::DeviceRestarted {
                device: index,
                may_have_executed: false,
            })
    }

    /// The process id of device `index`'s worker (process isolation), if one is running.
    pub fn worker_pid(&self, index: u32) -> Option<u32> {
        let pid = self
            .shared
            .cores
            .get(index as usize)?
            .worker_pid
            .load(Ordering::Acquire);
        u32::try_from(pid).ok().filter(|p| *p > 0)
    }

    /// The process id of device `index`'s warm standby worker, if one is ready.
    pub fn standby_pid(&self, index: u32) -> Option<u32> {
        let core = self.shared.cores.get(index as usize)?;
        core.standby
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|w| w.pid())
    }

    /// The state of every device now.
    pub fn states(&self) -> Vec<DeviceState> {
        self.shared.cores.iter().map(|c| c.state.get()).collect()
    }

    /// Subscribes to device state changes from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<DeviceStateChange> {
        self.shared.states.subscribe()
    }

    /// The metrics aggregate so far (counters flushed first).
    ///
    /// # Errors
    /// [`RuntimeError::ShuttingDown`] once the metrics actor has stopped.
    pub async fn snapshot(&self) -> Result<Snapshot, RuntimeError> {
        self.shared.snapshot().await
    }

    /// The address of the metrics endpoint, when one is served.
    pub fn metrics_addr(&self) -> Option<std::net::SocketAddr> {
        #[cfg(feature = "prometheus")]
        {
            self.endpoint.as_ref().map(|e| e.addr)
        }
        #[cfg(not(feature = "prometheus"))]
        {
            None
        }
    }

    /// Stops accepting work, waits (up to `runtime.shutdown_timeout_ms`) for the ops in
    /// flight, answers whatever is left with [`RuntimeError::ShuttingDown`] (an op still
    /// executing may have run), flushes the metrics and stops every actor and executor.
    /// Returns the final metrics, which count every answered op.
    pub async fn shutdown(mut self) -> Snapshot {
        let shared = self.shared.clone();
        shared.closing.store(true, Ordering::SeqCst);
        shared.close_admission();
        let until = Instant::now() + Duration::from_millis(shared.config.runtime.shutdown_timeout_ms);
        while shared.outstanding() > 0 && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        // From here the supervisor restarts nothing and answers failures with ShuttingDown.
        let _ = ractor::call!(self.supervisor, SupervisorMsg::Shutdown);
        shared.stop_executors();
        shared.retry_tasks.lock().unwrap_or_else(|p| p.into_inner()).abort_all();
        // Workers stuck in an op will not see the stop flag: end them, and those starting.
        shared.stop_workers();
        // Answer what is left: queued ops, and ops still executing (a hung kernel).
        let give_up = Instant::now() + Duration::from_secs(2);
        loop {
            shared.answer_everything_left();
            if shared.outstanding() <= 0 || Instant::now() >= give_up {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        // The executor threads end (in thread isolation one stuck in a hung kernel cannot be
        // interrupted: it is left behind, detached, after this wait).
        shared.join_executors(give_up).await;
        // Failures reported before this point are decided first (ractor handles messages in order).
        let _ = ractor::call!(self.supervisor, SupervisorMsg::Barrier);
        for t in self.tasks.lock().unwrap_or_else(|p| p.into_inner()).drain(..) {
            t.abort();
        }
        let snapshot = self.snapshot().await.unwrap_or_default();
        let _ = self.supervisor.stop_and_wait(None, Some(Duration::from_secs(5))).await;
        shared.metrics.stop(None);
        self.stopped = true;
        snapshot
    }

    /// Fault injection for tests only (the `test-hooks` feature), not a stable API: the
    /// executor thread of device `index` panics — in the runtime's own code, outside any backend call — right
    /// after the next op it runs, before answering it. The runtime then answers that op
    /// (`DeviceRestarted`, it may have executed) and restarts the device as after any failure.
    ///
    /// # Errors
    /// [`RuntimeError::NoSuchDevice`] for an index out of range.
    #[cfg(feature = "test-hooks")]
    #[doc(hidden)]
    pub fn inject_executor_panic(&self, index: u32) -> Result<(), RuntimeError> {
        self.inject_panic(index, Armed::AfterRun)
    }

    /// Fault injection for tests only (the `test-hooks` feature), not a stable API: the
    /// executor thread of device `index` panics right after it takes its next job from the queue, before the job starts. The
    /// job goes back to the queue and runs after the device's restart.
    ///
    /// # Errors
    /// [`RuntimeError::NoSuchDevice`] for an index out of range.
    #[cfg(feature = "test-hooks")]
    #[doc(hidden)]
    pub fn inject_executor_panic_holding_a_job(&self, index: u32) -> Result<(), RuntimeError> {
        self.inject_panic(index, Armed::Holding)
    }

    #[cfg(feature = "test-hooks")]
    fn inject_panic(&self, index: u32, when: Armed) -> Result<(), RuntimeError> {
        let core = self
            .shared
            .cores
            .get(index as usize)
            .ok_or(RuntimeError::NoSuchDevice {
                device: index,
                count: self.device_count(),
            })?;
        let _ = core
            .priority
            .0
            .send(Work::Panic(format!("injected into device {index}"), when));
        Ok(())
    }
}

impl Drop for Runtime {
    /// A runtime dropped without [`Runtime::shutdown`] (an early return, a panic unwinding
    /// through the application) stops at once what it started: the supervisor and the device
    /// actors, every executor thread, worker process and standby (killed), the background
    /// tasks and the retries waiting; ops not answered yet are answered `ShuttingDown`.
    /// Nothing waits here: the executor threads end, and reap their workers, on their own.
    fn drop(&mut self) {
        if self.stopped {
            return;
        }
        let shared = &self.shared;
        shared.closing.store(true, Ordering::SeqCst);
        shared.close_admission();
        self.supervisor.stop(None);
        for core in &shared.cores {
            if let Some(actor) = core.actor.read().unwrap_or_else(|p| p.into_inner()).clone() {
                actor.stop(None);
            }
        }
        shared.stop_executors();
        shared.retry_tasks.lock().unwrap_or_else(|p| p.into_inner()).abort_all();
        for t in self.tasks.lock().unwrap_or_else(|p| p.into_inner()).drain(..) {
            t.abort();
        }
        shared.stop_workers();
        shared.answer_everything_left();
        shared.metrics.stop(None);
    }
}

impl Shared {
    /// Closes every device's in-flight bound: a submission waiting for a slot (which an op
    /// stuck in a hung kernel may never give back) is answered `ShuttingDown` at once.
    fn close_admission(&self) {
        for core in &self.cores {
            core.permits.close();
        }
    }

    /// Tells every executor to stop, and wakes it to see it.
    fn stop_executors(&self) {
        for core in &self.cores {
            core.executor_stop
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .store(true, Ordering::Release);
            let _ = core.priority.0.send(Work::Wake);
        }
    }

    /// Kills every worker process — serving, starting or standing by — and ends the spawner
    /// thread (after `closing` is set: no worker is spawned any more).
    fn stop_workers(&self) {
        for core in &self.cores {
            core.kill_worker(&self.workers);
        }
        self.workers.kill_all();
        for core in &self.cores {
            // Taken under the lock a standby is stored under, after `closing` was set.
            let standby = core.standby.lock().unwrap_or_else(|p| p.into_inner()).take();
            drop(standby);
        }
        self.spawner.stop();
    }

    /// Answers `ShuttingDown` to every queued op and every op still executing.
    fn answer_everything_left(&self) {
        for core in &self.cores {
            core.drain(|_| RuntimeError::ShuttingDown);
            let current: Vec<ReplySlot> = core
                .current
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .ops
                .iter()
                .map(|c| c.slot.clone())
                .collect();
            for slot in current {
                slot.answer(Err(RuntimeError::ShuttingDown), 1, &core.counters);
            }
        }
    }

    /// Joins the executor threads that end before `until`; the others are left detached.
    async fn join_executors(&self, until: Instant) {
        loop {
            let mut running = 0;
            for core in &self.cores {
                let mut threads = core.executors.lock().unwrap_or_else(|p| p.into_inner());
                for done in executor::extract_finished(&mut threads) {
                    let _ = done.join();
                }
                running += threads.len();
            }
            if running == 0 {
                return;
            }
            if Instant::now() >= until {
                tracing::warn!(
                    threads = running,
                    "executor threads still busy at shutdown (a hung kernel?): left behind"
                );
                return;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}

impl Shared {
    /// The metrics aggregate so far, counters flushed first (also a barrier: every delta
    /// flushed before it is included).
    pub(crate) async fn snapshot(&self) -> Result<Snapshot, RuntimeError> {
        self.flush();
        let mut s = ractor::call!(self.metrics, MetricsMsg::Snapshot).map_err(|_| RuntimeError::ShuttingDown)?;
        for d in &mut s.devices {
            d.breaker = self.cores[d.id as usize].breaker_state();
        }
        Ok(s)
    }

    /// Device actor restart helper used by the supervisor.
    pub(crate) async fn spawn_device_actor(
        self: &Arc<Self>,
        device: u32,
        supervisor: ractor::ActorCell,
    ) -> Result<ActorRef<DeviceMsg>, ractor::SpawnErr> {
        let args = crate::device::DeviceActorArgs {
            shared: self.clone(),
            device,
        };
        let (actor, _) = Actor::spawn_linked(None, DeviceActor, args, supervisor).await?;
        Ok(actor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hipvisor_core::config::Isolation;

    /// One simulated device on a thread, ops with a 200 ms deadline (the watchdog looks
    /// every 50 ms).
    async fn runtime() -> Runtime {
        let mut c = RuntimeConfig::default();
        c.runtime.isolation = Isolation::Thread;
        c.sim.devices = 1;
        c.sim.memory_bytes = 1 << 20;
        c.runtime.op_deadline_ms = 200;
        Runtime::builder().config(c).start().await.expect("runtime starts")
    }

    /// Stops device 0's executor and waits until it no longer takes from the queue.
    async fn without_executor(rt: &Runtime) {
        let core = &rt.shared.cores[0];
        core.executor_stop.lock().unwrap().store(true, Ordering::Release);
        let _ = core.priority.0.send(Work::Wake);
        let until = Instant::now() + Duration::from_secs(10);
        while core.current.lock().unwrap().takers > 0 {
            assert!(Instant::now() < until, "the executor did not stop");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    fn mem_info_job(core: &DeviceCore) -> (Job, tokio::sync::oneshot::Receiver<OpResult>) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        (core.job(Op::MemInfo, Origin::Application, tx.into(), None), rx)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_job_queued_again_on_a_failed_device_after_its_drain_is_answered_at_once() {
        let rt = runtime().await;
        without_executor(&rt).await;
        rt.shared.set_state(0, DeviceState::Failed, Some("test".into()));
        let (job, mut rx) = mem_info_job(&rt.shared.cores[0]);
        rt.shared.requeue(job);
        match rx.try_recv() {
            Ok(Err(RuntimeError::DeviceFailed { device: 0, .. })) => {}
            other => panic!("expected DeviceFailed at once, got {other:?}"),
        }
        rt.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_job_left_in_a_failed_devices_queue_is_answered_by_the_watchdog() {
        let rt = runtime().await;
        without_executor(&rt).await;
        rt.shared.set_state(0, DeviceState::Failed, Some("test".into()));
        let core = &rt.shared.cores[0];
        let (job, rx) = mem_info_job(core);
        // As a requeue racing with the drain would leave it.
        core.requeue(job);
        match tokio::time::timeout(Duration::from_secs(2), rx).await {
            Ok(Ok(Err(RuntimeError::DeviceFailed { device: 0, .. }))) => {}
            other => panic!("expected DeviceFailed from the watchdog, got {other:?}"),
        }
        rt.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_queued_job_nobody_takes_is_answered_at_its_deadline() {
        let rt = runtime().await;
        without_executor(&rt).await;
        // Restarting, with no executor: nobody takes the queue, nothing drains it.
        rt.shared.set_state(0, DeviceState::Restarting, Some("test".into()));
        let core = &rt.shared.cores[0];
        let submitted = Instant::now();
        let (job, rx) = mem_info_job(core);
        let deadline = job.deadline;
        core.enqueue(job);
        match tokio::time::timeout(Duration::from_secs(30), rx).await {
            Ok(Ok(Err(RuntimeError::DeadlineExceeded {
                may_have_executed: false,
                ..
            }))) => {}
            other => panic!("expected DeadlineExceeded, got {other:?}"),
        }
        let now = Instant::now();
        assert!(now >= deadline, "answered before its deadline");
        // The watchdog looks every 50 ms: the deadline, a few ticks and seconds of margin for
        // a loaded machine (nothing else would ever answer it).
        assert!(
            now - submitted <= Duration::from_millis(200 + 5_000),
            "answered {:?} after it was queued",
            now - submitted
        );
        rt.shutdown().await;
    }
}
