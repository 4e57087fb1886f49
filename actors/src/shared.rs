//! What every part of the runtime shares ([`Shared`]): the devices' cores, the backend and
//! configuration, the closing flag, the channels to the metrics actor, the supervisor and
//! state subscribers, the worker spawner and registry, the spin policy.
//!
//! The methods here are the ones everything above needs and that need nothing above them:
//! reporting to the supervisor and the metrics actor, the closing check after a job is
//! queued, metrics flushes and snapshots. Routing and admission are in `routing.rs`, the
//! watchdog in `watchdog.rs`, start and shutdown in `runtime.rs`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hipvisor_core::sync::lock;
use hipvisor_core::{Backend, RuntimeConfig};
use ractor::ActorRef;
use tokio::sync::broadcast;

use crate::device::DeviceCore;
use crate::error::RuntimeError;
use crate::history::HistoryView;
use crate::messages::SupervisorMsg;
use crate::metrics::{MetricsEvent, MetricsMsg, Snapshot};
use crate::park::SpinPolicy;
use crate::state::DeviceStateChange;
use hipvisor_core::fault_plan::FaultInjector;
use hipvisor_core::worker::client::{Spawner, Workers};

/// What every part of the runtime shares.
pub(crate) struct Shared {
    pub(crate) cores: Vec<Arc<DeviceCore>>,
    pub(crate) backend: Arc<dyn Backend>,
    /// The simulator's fault plan, which decides each op's fault in the host in process
    /// isolation (a worker's injector takes the decision); `None` for GPU backends and for a
    /// backend the application supplied.
    pub(crate) faults: Option<Arc<FaultInjector>>,
    pub(crate) config: RuntimeConfig,
    pub(crate) closing: AtomicBool,
    pub(crate) states: broadcast::Sender<DeviceStateChange>,
    pub(crate) metrics: ActorRef<MetricsMsg>,
    pub(crate) supervisor: Mutex<Option<ActorRef<SupervisorMsg>>>,
    /// Tasks holding jobs between attempts (backoff timers), aborted at shutdown.
    pub(crate) retry_tasks: Mutex<tokio::task::JoinSet<()>>,
    pub(crate) flushing: Mutex<()>,
    /// The program started as a device's worker (process isolation).
    pub(crate) worker_program: std::path::PathBuf,
    /// Starts every worker, from one long-lived thread.
    pub(crate) spawner: Spawner,
    /// Every worker process, from its spawn until it is reaped.
    pub(crate) workers: Arc<Workers>,
    /// Whether waiting threads spin before they park, and how long.
    pub(crate) spin: SpinPolicy,
    /// Durable buffer ids and task quarantine.
    pub(crate) recovery: crate::recovery::Recovery,
}

impl Shared {
    /// How long to poll instead of parking a thread while `device` serves a serial caller
    /// ([`SpinPolicy::spin_for`] with the device's ops in flight).
    pub(crate) fn spin_for(&self, device: u32) -> Duration {
        self.spin.spin_for(|| self.cores[device as usize].in_flight())
    }

    /// Runs a task that holds a job between attempts; shutdown aborts it (the job's slot
    /// then answers `ShuttingDown`).
    pub(crate) fn spawn_retry(&self, f: impl std::future::Future<Output = ()> + Send + 'static) {
        let mut set = lock(&self.retry_tasks);
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
        let sup = lock(&self.supervisor).clone();
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

    /// Called after anything is queued on `device` (or put back in its queue): once the
    /// runtime is closing, nothing may stay queued — the drain of `Runtime::shutdown` or
    /// `Drop for Runtime` may have run before it was queued, and a dropped runtime has no
    /// watchdog left — so the queue is drained with `ShuttingDown`.
    ///
    /// Either this load sees `closing`, or the drain that follows the store of `closing` sees
    /// the job: the store and this load are `SeqCst`, and so is the channel's send (a
    /// `SeqCst` compare-and-swap of its tail in crossbeam), which comes before this load. The
    /// cost on the hot path: one atomic load per enqueue.
    pub(crate) fn queued(&self, device: u32) {
        if self.closing.load(Ordering::SeqCst) {
            self.cores[device as usize].queue.drain(|_| RuntimeError::ShuttingDown);
        }
    }

    /// Sends every device's counts since the last flush to the metrics actor. Flushes are
    /// serialized: a delta taken by one flush is in the actor's mailbox before a later flush
    /// (and the snapshot request that follows it) can go on, so a snapshot never misses one.
    pub(crate) fn flush(&self) {
        let _one_at_a_time = lock(&self.flushing);
        for core in &self.cores {
            let _ = self
                .metrics
                .cast(MetricsMsg::Delta(core.index, Box::new(core.counters.take())));
        }
    }

    /// The last `seconds` of the dashboard's history (`History::view`), every delta flushed
    /// so far counted.
    pub(crate) async fn history(&self, seconds: usize) -> Result<HistoryView, RuntimeError> {
        self.flush();
        ractor::call!(self.metrics, MetricsMsg::History, seconds).map_err(|_| RuntimeError::ShuttingDown)
    }

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
}

/// A [`Shared`] for unit tests: `devices` simulated devices in thread isolation with no
/// executor, supervisor or watchdog — what the test does to the queues is all that happens.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;
    use crate::metrics::{MetricsActor, MetricsArgs};
    use hipvisor_core::SimBackend;
    use hipvisor_core::config::Isolation;

    pub(crate) async fn shared(devices: u32, configure: impl FnOnce(&mut RuntimeConfig)) -> Arc<Shared> {
        let mut config = RuntimeConfig::default();
        config.runtime.isolation = Isolation::Thread;
        config.sim.devices = devices;
        config.sim.memory_bytes = 1 << 20;
        configure(&mut config);
        let backend = SimBackend::from_config(&config.sim, false).expect("sim config");
        let faults = Some(backend.faults().clone());
        let backend = Arc::new(backend);
        let args = MetricsArgs {
            meter: opentelemetry::global::meter("hipvisor-test"),
            devices,
            max_retries: config.retry.max_retries,
            histograms: None,
        };
        let (metrics, _) = ractor::Actor::spawn(None, MetricsActor, args)
            .await
            .expect("metrics actor");
        let deadline = Duration::from_millis(config.runtime.op_deadline_ms);
        let cores = (0..devices)
            .map(|i| Arc::new(DeviceCore::new(i, config.runtime.in_flight, deadline, &config.breaker)))
            .collect();
        Arc::new(Shared {
            cores,
            backend,
            faults,
            closing: AtomicBool::new(false),
            states: broadcast::channel(16).0,
            metrics,
            supervisor: Mutex::new(None),
            retry_tasks: Mutex::new(tokio::task::JoinSet::new()),
            flushing: Mutex::new(()),
            worker_program: "/nonexistent/hipvisor-worker".into(),
            spawner: Spawner::start().expect("spawner"),
            workers: Arc::new(Workers::default()),
            recovery: crate::recovery::Recovery::default(),
            spin: SpinPolicy::new(0, tokio::runtime::Handle::current().metrics()),
            config,
        })
    }
}
