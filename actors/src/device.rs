//! One device's core ([`DeviceCore`]): what every part of the runtime shares about it — its
//! state, its job queue, its in-flight bound, its breaker and quarantined kernels, its
//! modules, what its executors are doing (for the watchdog), its worker.
//!
//! The core is data and the small queries on it; what decides where an op goes and whether
//! it is admitted is in `routing.rs`, what runs the queue in `executor.rs`.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use hipvisor_core::sync::lock;
use hipvisor_core::{BreakerConfig, CircuitBreaker, GpuError, ModuleSource, Op, OpKind, Origin, Payload};
use ractor::ActorRef;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::RuntimeError;
use crate::job::Job;
use crate::messages::DeviceMsg;
use crate::metrics::DeviceCounters;
use crate::queue::JobQueue;
use crate::reply::{Port, ReplySlot};
use crate::state::{AtomicState, DeviceState};
use hipvisor_core::worker::client::{HostCopy, WorkerClient, Workers};

/// Whether a device's standby refresher runs, and whether a change came that it may not have
/// seen: callers [`ask`](Refresh::ask) (and start a refresher only when none runs); the
/// refresher [`claim`](Refresh::claim)s the changes before it reads them and ends only when
/// [`done`](Refresh::done) says none came since. No change is left unseen by a refresher.
#[derive(Default)]
pub(crate) struct Refresh(std::sync::atomic::AtomicU8);

const IDLE: u8 = 0;
const CLEAN: u8 = 1;
const DIRTY: u8 = 2;

impl Refresh {
    /// Marks a change; `true` when no refresher runs (the caller starts one).
    pub(crate) fn ask(&self) -> bool {
        self.0.swap(DIRTY, std::sync::atomic::Ordering::AcqRel) == IDLE
    }

    /// The refresher is about to read the state: every change so far will be seen.
    pub(crate) fn claim(&self) {
        self.0.store(CLEAN, std::sync::atomic::Ordering::Release);
    }

    /// The refresher has applied what it read: `true` if it may end (no change since its
    /// claim), `false` if it must go round again.
    pub(crate) fn done(&self) -> bool {
        self.0
            .compare_exchange(
                CLEAN,
                IDLE,
                std::sync::atomic::Ordering::AcqRel,
                std::sync::atomic::Ordering::Acquire,
            )
            .is_ok()
    }

    /// No refresher runs after all (the runtime closes, no thread could be started).
    pub(crate) fn abandon(&self) {
        self.0.store(IDLE, std::sync::atomic::Ordering::Release);
    }
}

/// A write into a durable buffer, for its host copy.
enum Change<'a> {
    Bytes(&'a Payload),
    Fill(u64, u8),
}

/// An op an executor is running now, for the watchdog.
pub(crate) struct Current {
    pub(crate) slot: ReplySlot,
    pub(crate) deadline: Instant,
    pub(crate) op: OpKind,
}

/// What the executors of a device are doing, for the watchdog: the ops running now, and how
/// many executors are taking jobs from the queue. While none is (every executor is inside
/// an op, opening its context, or there is none), the queue is nobody's but the watchdog's,
/// which may then take it apart and put it back (see [`JobQueue::sweep`](crate::queue::JobQueue::sweep)). Executors
/// change phase under this lock at the two points where they already took it for the
/// running ops, so the phase costs the hot path nothing more.
#[derive(Default)]
pub(crate) struct Running {
    pub(crate) ops: Vec<Current>,
    pub(crate) takers: u32,
}

/// What every part of the runtime shares about one device.
pub(crate) struct DeviceCore {
    pub(crate) index: u32,
    pub(crate) state: AtomicState,
    pub(crate) reason: Mutex<Option<String>>,
    pub(crate) epoch: AtomicU64,
    pub(crate) capacity: u32,
    pub(crate) permits: Arc<Semaphore>,
    /// The device's two-lane job queue, which owns its jobs' deadlines.
    pub(crate) queue: JobQueue,
    pub(crate) counters: Arc<DeviceCounters>,
    pub(crate) breaker: Option<Mutex<CircuitBreaker>>,
    /// Whether the breaker was closed when last seen under its lock: closed, it admits
    /// everything and a success only joins its window, so neither takes the lock.
    pub(crate) breaker_closed: AtomicBool,
    /// Successes counted while closed, applied at the next locked breaker operation.
    pub(crate) breaker_successes: AtomicU64,
    pub(crate) quarantined: RwLock<HashSet<(u64, String)>>,
    /// Modules loaded on the device (id → source), reloaded into a new context (shared
    /// with its workers, which check a new module's id against it).
    pub(crate) modules: Arc<Mutex<BTreeMap<u64, ModuleSource>>>,
    /// The device's durable buffers (id → host copy: a sealed region, shared with the other
    /// replicas of a replicated buffer until one is written), restored into a new context.
    pub(crate) durables: Mutex<BTreeMap<u64, HostCopy>>,
    /// The ops the executor is running now (one, or a batch), and whether an executor is
    /// taking jobs from the queue.
    pub(crate) current: Mutex<Running>,
    /// The device's executor threads (the running one, and any that are ending), joined at
    /// shutdown.
    pub(crate) executors: Mutex<Vec<std::thread::JoinHandle<()>>>,
    /// First attempts submitted, read by the supervisor's retry budget.
    pub(crate) requests: AtomicU64,
    /// Stop flag of the executor running now.
    pub(crate) executor_stop: Mutex<Arc<AtomicBool>>,
    pub(crate) actor: RwLock<Option<ActorRef<DeviceMsg>>>,
    /// The worker process of process isolation (0: none).
    pub(crate) worker_pid: Arc<AtomicI32>,
    /// A warm standby worker for the next epoch (`supervisor.standby`).
    pub(crate) standby: Mutex<Option<WorkerClient>>,
    /// Whether the standby's refresher runs (`process::refresh_standby`).
    pub(crate) standby_refresh: Refresh,
}

/// The epoch of every device's first context in this process: random (between 2^16 and
/// 2^31), so that handles of another process's runtime — a cluster's other node — carry
/// other epochs and ids, and are refused rather than taken for this one's.
pub(crate) fn first_epoch() -> u64 {
    static FIRST: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *FIRST.get_or_init(|| rand::random_range((1u64 << 16)..(1u64 << 31)))
}

impl DeviceCore {
    pub(crate) fn new(index: u32, capacity: u32, deadline: Duration, breaker: &BreakerConfig) -> DeviceCore {
        let counters = Arc::new(DeviceCounters::default());
        DeviceCore {
            index,
            state: AtomicState::new(DeviceState::Ready),
            reason: Mutex::new(None),
            epoch: AtomicU64::new(first_epoch()),
            capacity,
            permits: Arc::new(Semaphore::new(capacity as usize)),
            queue: JobQueue::new(index, deadline, counters.clone()),
            counters,
            breaker: breaker
                .enabled
                .then(|| Mutex::new(CircuitBreaker::new(breaker.clone()))),
            breaker_closed: AtomicBool::new(true),
            breaker_successes: AtomicU64::new(0),
            quarantined: RwLock::new(HashSet::new()),
            modules: Arc::new(Mutex::new(BTreeMap::new())),
            durables: Mutex::new(BTreeMap::new()),
            current: Mutex::new(Running::default()),
            executors: Mutex::new(Vec::new()),
            requests: AtomicU64::new(0),
            executor_stop: Mutex::new(Arc::new(AtomicBool::new(false))),
            actor: RwLock::new(None),
            worker_pid: Arc::new(AtomicI32::new(0)),
            standby: Mutex::new(None),
            standby_refresh: Refresh::default(),
        }
    }

    /// The host bytes the device's durable buffers hold (a copy shared by replicas counts on
    /// each device).
    pub(crate) fn durable_bytes(&self) -> u64 {
        lock(&self.durables).values().map(|c| c.data.len() as u64).sum()
    }

    /// Keeps the host copies of durable buffers in step with an op that succeeded: a new
    /// durable buffer's copy is recorded, a freed one's dropped, and a copy or memset into
    /// one writes a new host copy (the old bytes with the change, in a new one that replaces
    /// the old one once complete, only over the copy it was made from: a checkpoint and a
    /// write never overwrite each other unseen; see `DeviceHandle::checkpoint`). Device-to-device copies and kernels that
    /// write a durable buffer leave its host copy stale until a checkpoint. Whether a host
    /// copy changed.
    ///
    /// # Errors
    /// The host could not make the new copy (no shared memory): a transient
    /// [`GpuError::Host`], so the op is retried (both are idempotent) rather than answered
    /// with a host copy that no longer matches the device.
    pub(crate) fn track_durable(&self, op: &Op) -> Result<bool, GpuError> {
        let (buffer, offset, change) = match op {
            Op::Durable { id, data } => {
                lock(&self.durables).insert(*id, HostCopy::new(data.clone()));
                return Ok(true);
            }
            Op::Free { buffer } if buffer.is_durable() => {
                return Ok(lock(&self.durables).remove(&buffer.id).is_some());
            }
            Op::CopyToDevice { dst, offset, data } if dst.is_durable() => (dst, *offset, Change::Bytes(data)),
            Op::Memset {
                buffer,
                offset,
                len,
                value,
            } if buffer.is_durable() => (buffer, *offset, Change::Fill(*len, *value)),
            _ => return Ok(false),
        };
        let fail = |e: &dyn std::fmt::Display| {
            GpuError::host(
                op.kind(),
                self.index,
                format!("a new host copy of durable buffer {}: {e}", buffer.id),
            )
        };
        // The new copy is made outside the map's lock (a large buffer takes a while), and
        // swapped in only over the copy it was made from; a checkpoint that swapped its own in
        // meanwhile makes it start again from that one.
        loop {
            let Some(old) = lock(&self.durables).get(&buffer.id).cloned() else {
                return Ok(false);
            };
            let at = offset as usize;
            let data = HostCopy::build(old.data.len(), |bytes| {
                bytes.copy_from_slice(old.data.as_bytes());
                match change {
                    Change::Bytes(data) => bytes[at..at + data.len()].copy_from_slice(data.as_bytes()),
                    Change::Fill(len, value) => bytes[at..at + len as usize].fill(value),
                }
            })
            .map_err(|e| fail(&e))?;
            let mut durables = lock(&self.durables);
            match durables.get_mut(&buffer.id) {
                None => return Ok(false),
                Some(slot) if slot.version == old.version => {
                    *slot = HostCopy::new(data);
                    return Ok(true);
                }
                Some(_) => {}
            }
        }
    }

    /// Ops in flight (admitted and not yet answered).
    pub(crate) fn in_flight(&self) -> u32 {
        self.capacity - self.permits.available_permits() as u32
    }

    pub(crate) fn reason(&self) -> Option<String> {
        lock(&self.reason).clone()
    }

    /// The op deadline of this device.
    pub(crate) fn deadline(&self) -> Duration {
        self.queue.deadline()
    }

    /// The answer for an op that launches a quarantined kernel, if `op` does.
    /// (A task's launches count: a kernel quarantined by single launches is refused inside
    /// tasks too.)
    pub(crate) fn is_quarantined(&self, op: &Op) -> Option<RuntimeError> {
        if !matches!(op, Op::Launch { .. } | Op::Task(_)) {
            return None;
        }
        let q = hipvisor_core::sync::read(&self.quarantined);
        // Quarantine is rare: skip building the lookup key (a String clone) on the hot path.
        if q.is_empty() {
            return None;
        }
        let launches: Vec<(u64, &String)> = match op {
            Op::Launch { module, function, .. } => vec![(module.id, function)],
            Op::Task(t) => t.launches.iter().map(|l| (l.module.id, &l.function)).collect(),
            _ => Vec::new(),
        };
        launches
            .into_iter()
            .find(|(m, f)| q.contains(&(*m, (*f).clone())))
            .map(|(module, function)| RuntimeError::Quarantined {
                device: self.index,
                module,
                function: function.clone(),
            })
    }

    /// Kills the device's worker process, if it has one (a hung op, shutdown). Its executor
    /// sees the connection close and the supervisor restarts the device. The kill goes
    /// through `workers`, under its lock, and only to a worker still in it: a worker leaves
    /// it before it is reaped, so a kill never reaches a process that reused its id.
    pub(crate) fn kill_worker(&self, workers: &Workers) {
        let pid = self.worker_pid.load(Ordering::Acquire);
        if let Ok(pid) = u32::try_from(pid)
            && pid > 0
        {
            workers.kill(pid);
        }
    }

    /// The answer for an op whose deadline passed on this device.
    pub(crate) fn deadline_exceeded(&self, op: OpKind, may_have_executed: bool) -> RuntimeError {
        self.queue.deadline_exceeded(op, may_have_executed)
    }

    /// The answer for an op that did not run because the device is lost (and it could not
    /// move to another).
    pub(crate) fn lost_error(&self) -> RuntimeError {
        RuntimeError::DeviceLost {
            device: self.index,
            may_have_executed: false,
        }
    }

    /// The answer for an op that reaches a device that has failed.
    pub(crate) fn failed_error(&self, may_have_executed: bool) -> RuntimeError {
        RuntimeError::DeviceFailed {
            device: self.index,
            reason: self.reason().unwrap_or_else(|| "device failed".into()),
            may_have_executed,
        }
    }

    /// The breaker's state now (closed when the device has none).
    pub(crate) fn breaker_state(&self) -> hipvisor_core::BreakerState {
        match &self.breaker {
            // Successes not yet applied cannot change a breaker's state: they are only
            // counted while it is closed.
            Some(b) => lock(b).state(Instant::now()),
            None => hipvisor_core::BreakerState::Closed,
        }
    }

    /// A new job for `op` answering through `port`, with its deadline from now.
    pub(crate) fn job(&self, op: Op, origin: Origin, port: Port, permit: Option<OwnedSemaphorePermit>) -> Job {
        let now = Instant::now();
        let slot = ReplySlot::new(port, op.kind(), origin, self.counters.clone(), now);
        Job {
            op,
            origin,
            slot,
            attempts: 0,
            backoff: None,
            deadline: self.queue.deadline_from(now),
            _permit: permit,
            device: self.index,
            reruns: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Refresh;

    #[test]
    fn a_refresh_asked_while_one_runs_is_never_lost() {
        let r = Refresh::default();
        assert!(r.ask(), "idle: the caller starts a refresher");
        assert!(!r.ask(), "one runs (or is starting): no second");
        r.claim();
        assert!(r.done(), "nothing came since its claim");
        // A change between the claim and the end makes it go round again.
        assert!(r.ask());
        r.claim();
        assert!(!r.ask(), "it runs: it will see this one");
        assert!(!r.done(), "so it must not end yet");
        r.claim();
        assert!(r.done());
        assert!(r.ask(), "idle again: a new change starts a new refresher");
    }
}
