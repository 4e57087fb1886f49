//! The runtime facade: [`Runtime`] and [`RuntimeBuilder`] — how the parts start, in which
//! order, and how they stop (shutdown, or a dropped runtime).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hipvisor_core::backend::factory;
use hipvisor_core::config::Isolation;
use hipvisor_core::sync::lock;
use hipvisor_core::{Backend, BackendKind, ConfigError, GpuError, RuntimeConfig, SimBackend};
use opentelemetry::metrics::Meter;
use ractor::{Actor, ActorRef};
use tokio::sync::broadcast;
use tokio::task::JoinHandle;

use crate::device::DeviceCore;
use crate::error::RuntimeError;
use crate::executor;
use crate::handle::DeviceHandle;
use crate::messages::{DeviceMsg, SupervisorMsg};
use crate::metrics::{MetricsActor, MetricsArgs, Snapshot};
use crate::park::SpinPolicy;
#[cfg(feature = "test-hooks")]
use crate::queue::Armed;
use crate::queue::Work;
use crate::reply::ReplySlot;
use crate::shared::Shared;
use crate::state::{DeviceState, DeviceStateChange};
use crate::supervisor::{Supervisor, SupervisorArgs};
use crate::watchdog;
use hipvisor_core::worker::client::{Spawner, Workers};

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
        #[source]
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
        /// Why: the underlying error (an OS error, ractor's spawn error, ...), also its
        /// [`std::error::Error::source`].
        #[source]
        why: Box<dyn std::error::Error + Send + Sync>,
    },
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

    /// Uses this backend instead of the one `runtime.backend` names (tests, embedding): for
    /// discovery, and in thread isolation for the devices' contexts. In process isolation
    /// each worker opens a backend of this one's kind, and a [`SimBackend`]'s fault plan
    /// decides, in the host, the fault of each op sent to a worker.
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
                why: Box::new(e),
            })?,
        };
        let (backend, faults) = match self.backend {
            // A simulator's plan decides faults in the host in process isolation.
            Some(b) => {
                let any: Arc<dyn std::any::Any + Send + Sync> = b.clone();
                let faults = any.downcast::<SimBackend>().ok().map(|sim| sim.faults().clone());
                (b, faults)
            }
            None => {
                let built = build_backend(&config)?;
                (built.backend, built.sim.map(|s| s.faults))
            }
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
                why: why.into(),
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
        // hipvisor's own endpoint serves the histograms from their bucket counts.
        #[cfg(feature = "prometheus")]
        let histograms = exporter.as_ref().map(|e| e.histograms.clone());
        #[cfg(not(feature = "prometheus"))]
        let histograms = None;
        let spawn_err = |what: &str| {
            let what = what.to_string();
            move |e: ractor::SpawnErr| StartError::Spawn { what, why: Box::new(e) }
        };
        let (metrics, _) = Actor::spawn(
            None,
            MetricsActor,
            MetricsArgs {
                meter,
                devices,
                max_retries: config.retry.max_retries,
                histograms,
            },
        )
        .await
        .map_err(spawn_err("the metrics actor"))?;
        let deadline = Duration::from_millis(config.runtime.op_deadline_ms);
        let cores = (0..devices)
            .map(|i| Arc::new(DeviceCore::new(i, config.runtime.in_flight, deadline, &config.breaker)))
            .collect();
        let (states, _) = broadcast::channel(1024);
        let spawner = match Spawner::start() {
            Ok(s) => s,
            Err(e) => {
                metrics.stop(None);
                return Err(StartError::Spawn {
                    what: "the worker spawner thread".into(),
                    why: Box::new(e),
                });
            }
        };
        let shared = Arc::new(Shared {
            cores,
            backend,
            faults,
            config: config.clone(),
            closing: AtomicBool::new(false),
            states,
            metrics: metrics.clone(),
            supervisor: Mutex::new(None),
            retry_tasks: Mutex::new(tokio::task::JoinSet::new()),
            flushing: Mutex::new(()),
            worker_program,
            spawner,
            workers: Arc::new(Workers::default()),
            recovery: crate::recovery::Recovery::default(),
            spin: SpinPolicy::new(config.runtime.spin_us, tokio::runtime::Handle::current().metrics()),
        });
        let supervisor = match Actor::spawn(None, Supervisor, SupervisorArgs { shared: shared.clone() }).await {
            Ok((supervisor, _)) => supervisor,
            Err(e) => {
                shared.spawner.stop();
                metrics.stop(None);
                return Err(spawn_err("the supervisor")(e));
            }
        };
        *lock(&shared.supervisor) = Some(supervisor.clone());
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
        tasks.push(watchdog::spawn(shared.clone(), deadline));
        *lock(&runtime.tasks) = tasks;
        // Start every executor and wait until each has opened its context (or failed to),
        // and the supervisor has settled the device states.
        let mut opened = Vec::new();
        for d in 0..devices {
            let (tx, rx) = tokio::sync::oneshot::channel();
            executor::spawn(shared.clone(), d, crate::device::first_epoch(), Some(tx)).map_err(|e| {
                StartError::Spawn {
                    what: format!("the executor of device {d}"),
                    why: Box::new(e),
                }
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
                let registry = exporter.as_ref().map(|e| (e.registry.clone(), e.histograms.clone()));
                let endpoint = crate::telemetry::serve(addr, shared.clone(), registry)
                    .await
                    .map_err(|e| StartError::Spawn {
                        what: format!("the metrics endpoint on {addr}"),
                        why: Box::new(e),
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
    Ok(build_backend(config)?.backend)
}

/// The backend and, for the simulator, its fault plan, from the core's one backend factory.
fn build_backend(config: &RuntimeConfig) -> Result<factory::Built, StartError> {
    let crash_allowed = config.runtime.isolation == Isolation::Process;
    factory::build(
        config.runtime.backend,
        &config.sim,
        factory::Faults::Plan,
        crash_allowed,
    )
    .map_err(|e| match e {
        factory::BuildError::Config(e) => StartError::Config(e),
        other => StartError::Unsupported(other.to_string()),
    })
}

/// The supervised multi-GPU runtime. See the crate docs for an example.
pub struct Runtime {
    pub(crate) shared: Arc<Shared>,
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
        hipvisor_core::sync::read(&core.actor)
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
        lock(&core.standby).as_ref().map(|w| w.pid())
    }

    /// Runs `f` on every device that is ready or restarting, concurrently, and gathers what
    /// succeeded by device (in device order) — or, when nothing did, the lowest device's
    /// error (`NoReadyDevice` when no device was tried). Each failure is logged as `what`.
    pub(crate) async fn on_every_device<T, F, Fut>(&self, what: &str, f: F) -> Result<Vec<(u32, T)>, RuntimeError>
    where
        T: Send + 'static,
        F: Fn(DeviceHandle) -> Fut,
        Fut: std::future::Future<Output = Result<T, RuntimeError>> + Send + 'static,
    {
        let mut running = tokio::task::JoinSet::new();
        for h in (0..self.device_count()).filter_map(|d| self.device(d).ok()) {
            if matches!(h.state(), DeviceState::Ready | DeviceState::Restarting) {
                let device = h.index();
                let fut = f(h);
                running.spawn(async move { (device, fut.await) });
            }
        }
        let (mut done, mut errors) = (Vec::new(), Vec::new());
        while let Some(joined) = running.join_next().await {
            let Ok((device, result)) = joined else { continue };
            match result {
                Ok(t) => done.push((device, t)),
                Err(e) => {
                    tracing::warn!(device, error = %e, "{what} failed on this device");
                    errors.push((device, e));
                }
            }
        }
        if done.is_empty() {
            errors.sort_by_key(|(d, _)| *d);
            return Err(errors
                .into_iter()
                .next()
                .map_or(RuntimeError::NoReadyDevice, |(_, e)| e));
        }
        done.sort_by_key(|(d, _)| *d);
        Ok(done)
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

    /// The last `seconds` samples (at most 901: 15 minutes and the second under way) of the
    /// runtime's history, one a second, and its events with their reasons: what
    /// `/api/history` serves (the schema is in the README, "Observability").
    ///
    /// # Errors
    /// `ShuttingDown` once the metrics actor has stopped.
    pub async fn history(&self, seconds: usize) -> Result<serde_json::Value, RuntimeError> {
        let view = self.shared.history(seconds).await?;
        Ok(serde_json::to_value(view).expect("plain data"))
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
        lock(&shared.retry_tasks).abort_all();
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
        for t in lock(&self.tasks).drain(..) {
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
        core.queue
            .signal(Work::Panic(format!("injected into device {index}"), when));
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
            if let Some(actor) = hipvisor_core::sync::read(&core.actor).clone() {
                actor.stop(None);
            }
        }
        shared.stop_executors();
        lock(&shared.retry_tasks).abort_all();
        for t in lock(&self.tasks).drain(..) {
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
            lock(&core.executor_stop).store(true, Ordering::Release);
            core.queue.signal(Work::Wake);
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
            let standby = lock(&core.standby).take();
            drop(standby);
        }
        self.spawner.stop();
    }

    /// Answers `ShuttingDown` to every queued op and every op still executing.
    fn answer_everything_left(&self) {
        for core in &self.cores {
            core.queue.drain(|_| RuntimeError::ShuttingDown);
            let current: Vec<ReplySlot> = lock(&core.current).ops.iter().map(|c| c.slot.clone()).collect();
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
                let mut threads = lock(&core.executors);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::OpResult;
    use crate::job::Job;
    use hipvisor_core::{Op, Origin};

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
        core.queue.signal(Work::Wake);
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
        core.queue.requeue(job);
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
        core.queue.enqueue(job);
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
