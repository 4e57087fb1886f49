//! One device: its shared core ([`DeviceCore`]), its actor ([`DeviceActor`]) and the typed
//! handle for plain async code ([`DeviceHandle`]).
//!
//! The actor never awaits the GPU: a `Submit` is admitted (state, quarantine, breaker,
//! in-flight bound) and handed with its reply port to the device's executor, which answers
//! the caller directly. Only when the in-flight bound is reached does a `Submit` wait — in
//! a task of its own, so the actor keeps serving.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use hipvisor_core::{
    BreakerConfig, BufferHandle, CircuitBreaker, DeviceInfo, Dim3, KernelArg, MemInfo, ModuleHandle, ModuleSource, Op,
    OpKind, Origin, Payload, Reply,
};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::{OpResult, RuntimeError};
use crate::job::{Answered, BatchSink, Job, Port, ReplySlot};
use crate::metrics::{DeviceCounters, MetricsEvent};
use crate::runtime::Shared;
use crate::state::{AtomicState, DeviceState};

/// What travels to an executor.
pub(crate) enum Work {
    /// A job, by value: boxing it cost a heap block freed on the executor thread per op,
    /// and such cross-thread frees contend for the allocator's arena lock — measured 2.0 →
    /// 1.25 µs per op pipelined (64 callers, 2 cores) when the box went.
    Job(Job),
    /// Wakes an executor so it sees its stop flag.
    Wake,
    /// Fault injection (`Runtime::inject_executor_panic`, with the `test-hooks` feature):
    /// the executor panics, outside the backend call, when [`Armed`] says.
    #[cfg_attr(not(feature = "test-hooks"), allow(dead_code))]
    Panic(String, Armed),
}

/// When an injected executor panic fires.
#[cfg_attr(not(feature = "test-hooks"), allow(dead_code))]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Armed {
    /// Right after the next op runs, before it is answered.
    AfterRun,
    /// When the executor next holds a job it took and has not started.
    Holding,
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
/// which may then take it apart and put it back (see [`DeviceCore::sweep`]). Executors
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
    pub(crate) jobs: (Sender<Work>, Receiver<Work>),
    pub(crate) priority: (Sender<Work>, Receiver<Work>),
    pub(crate) counters: Arc<DeviceCounters>,
    pub(crate) breaker: Option<Mutex<CircuitBreaker>>,
    /// Whether the breaker was closed when last seen under its lock: closed, it admits
    /// everything and a success only joins its window, so neither takes the lock.
    breaker_closed: AtomicBool,
    /// Successes counted while closed, applied at the next locked breaker operation.
    breaker_successes: AtomicU64,
    pub(crate) quarantined: RwLock<HashSet<(u64, String)>>,
    /// Modules loaded on the device (id → source), reloaded into a new context.
    pub(crate) modules: Mutex<BTreeMap<u64, ModuleSource>>,
    /// The ops the executor is running now (one, or a batch), and whether an executor is
    /// taking jobs from the queue.
    pub(crate) current: Mutex<Running>,
    /// The earliest deadline of the jobs queued *again* (retries, moves, requeues) since the
    /// watchdog last looked, in nanoseconds after `born` (`u64::MAX`: none). A first
    /// submission needs no note: its deadline is its admission time plus `deadline`, so the
    /// watchdog knows a bound for it without looking.
    requeued_deadline: AtomicU64,
    born: Instant,
    /// The device's executor threads (the running one, and any that are ending), joined at
    /// shutdown.
    pub(crate) executors: Mutex<Vec<std::thread::JoinHandle<()>>>,
    /// First attempts submitted, read by the supervisor's retry budget.
    pub(crate) requests: AtomicU64,
    /// Stop flag of the executor running now.
    pub(crate) executor_stop: Mutex<Arc<AtomicBool>>,
    pub(crate) deadline: Duration,
    pub(crate) actor: RwLock<Option<ActorRef<DeviceMsg>>>,
    /// The worker process of process isolation (0: none).
    pub(crate) worker_pid: std::sync::atomic::AtomicI32,
    /// A warm standby worker for the next epoch (`supervisor.standby`).
    pub(crate) standby: Mutex<Option<crate::process::WorkerEngine>>,
}

impl DeviceCore {
    pub(crate) fn new(index: u32, capacity: u32, deadline: Duration, breaker: &BreakerConfig) -> DeviceCore {
        DeviceCore {
            index,
            state: AtomicState::new(DeviceState::Ready),
            reason: Mutex::new(None),
            epoch: AtomicU64::new(0),
            capacity,
            permits: Arc::new(Semaphore::new(capacity as usize)),
            jobs: crossbeam_channel::unbounded(),
            priority: crossbeam_channel::unbounded(),
            counters: Arc::new(DeviceCounters::default()),
            breaker: breaker
                .enabled
                .then(|| Mutex::new(CircuitBreaker::new(breaker.clone()))),
            breaker_closed: AtomicBool::new(true),
            breaker_successes: AtomicU64::new(0),
            quarantined: RwLock::new(HashSet::new()),
            modules: Mutex::new(BTreeMap::new()),
            current: Mutex::new(Running::default()),
            requeued_deadline: AtomicU64::new(u64::MAX),
            born: Instant::now(),
            executors: Mutex::new(Vec::new()),
            requests: AtomicU64::new(0),
            executor_stop: Mutex::new(Arc::new(AtomicBool::new(false))),
            deadline,
            actor: RwLock::new(None),
            worker_pid: std::sync::atomic::AtomicI32::new(0),
            standby: Mutex::new(None),
        }
    }

    /// Ops in flight (admitted and not yet answered).
    pub(crate) fn in_flight(&self) -> u32 {
        self.capacity - self.permits.available_permits() as u32
    }

    pub(crate) fn reason(&self) -> Option<String> {
        self.reason.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub(crate) fn is_quarantined(&self, op: &Op) -> Option<RuntimeError> {
        let Op::Launch { module, function, .. } = op else {
            return None;
        };
        let q = self.quarantined.read().unwrap_or_else(|p| p.into_inner());
        // Quarantine is rare: skip building the lookup key (a String clone) on the hot path.
        if q.is_empty() {
            return None;
        }
        q.contains(&(module.id, function.clone()))
            .then(|| RuntimeError::Quarantined {
                device: self.index,
                module: module.id,
                function: function.clone(),
            })
    }

    /// Kills the device's worker process, if it has one (a hung op, shutdown). Its executor
    /// sees the connection close and the supervisor restarts the device. The kill goes
    /// through `workers`, under its lock, and only to a worker still in it: a worker leaves
    /// it before it is reaped, so a kill never reaches a process that reused its id.
    pub(crate) fn kill_worker(&self, workers: &crate::process::Workers) {
        let pid = self.worker_pid.load(std::sync::atomic::Ordering::Acquire);
        if let Ok(pid) = u32::try_from(pid)
            && pid > 0
        {
            workers.kill(pid);
        }
    }

    /// The answer for an op whose deadline passed on this device.
    pub(crate) fn deadline_exceeded(&self, op: OpKind, may_have_executed: bool) -> RuntimeError {
        RuntimeError::DeadlineExceeded {
            device: self.index,
            op,
            deadline_ms: self.deadline.as_millis() as u64,
            may_have_executed,
        }
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

    /// The breaker, locked, with the successes counted without the lock applied; `f`'s
    /// transition is reported and the closed flag refreshed.
    fn with_breaker<R>(
        &self,
        shared: &Shared,
        f: impl FnOnce(&mut CircuitBreaker, Instant) -> (R, Option<hipvisor_core::breaker::Transition>),
    ) -> Option<R> {
        let breaker = self.breaker.as_ref()?;
        let now = Instant::now();
        let (r, transitions) = {
            let mut b = breaker.lock().unwrap_or_else(|p| p.into_inner());
            let pending = self.breaker_successes.swap(0, Ordering::AcqRel);
            let earlier = b.record_successes(pending, now);
            let (r, t) = f(&mut b, now);
            self.breaker_closed
                .store(b.state(now) == hipvisor_core::BreakerState::Closed, Ordering::Release);
            (r, [earlier, t])
        };
        for t in transitions.into_iter().flatten() {
            shared.metrics_event(MetricsEvent::Breaker {
                device: self.index,
                state: t.to,
            });
        }
        Some(r)
    }

    /// Admission of an application op: quarantine and breaker.
    pub(crate) fn admit(&self, op: &Op, shared: &Shared) -> Result<(), RuntimeError> {
        if let Some(e) = self.is_quarantined(op) {
            return Err(e);
        }
        if self.breaker.is_none() || self.breaker_closed.load(Ordering::Acquire) {
            // A closed breaker admits everything, with no other effect.
            return Ok(());
        }
        let Some(admission) = self.with_breaker(shared, |b, now| b.admit(now)) else {
            return Ok(());
        };
        match admission {
            hipvisor_core::Admission::Allowed | hipvisor_core::Admission::Probe => Ok(()),
            hipvisor_core::Admission::Rejected { retry_after } => Err(RuntimeError::CircuitOpen {
                device: self.index,
                retry_after_ms: retry_after.as_millis() as u64,
            }),
        }
    }

    /// Records the result of an application op in the breaker. A success while it is
    /// closed is only counted (the hot path takes no lock); the count joins the window at
    /// the next locked operation, before anything else is recorded.
    pub(crate) fn breaker_result(&self, ok: bool, shared: &Shared) {
        if self.breaker.is_none() {
            return;
        }
        if ok && self.breaker_closed.load(Ordering::Acquire) {
            self.breaker_successes.fetch_add(1, Ordering::AcqRel);
            return;
        }
        self.with_breaker(shared, |b, now| {
            let t = if ok {
                b.record_success(now)
            } else {
                b.record_failure(now)
            };
            ((), t)
        });
    }

    pub(crate) fn breaker_state(&self) -> hipvisor_core::BreakerState {
        match &self.breaker {
            // Successes not yet applied cannot change a breaker's state: they are only
            // counted while it is closed.
            Some(b) => b.lock().unwrap_or_else(|p| p.into_inner()).state(Instant::now()),
            None => hipvisor_core::BreakerState::Closed,
        }
    }

    /// Queues a job for the executor.
    pub(crate) fn enqueue(&self, job: Job) {
        let lane = if job.origin == Origin::Runtime {
            &self.priority.0
        } else {
            &self.jobs.0
        };
        // The core owns both ends of its channels, so sending cannot fail.
        let _ = lane.send(Work::Job(job));
    }

    /// Queues a job whose deadline is older than a first submission's (a retry, a move):
    /// the watchdog is told of its deadline first.
    pub(crate) fn enqueue_again(&self, job: Job) {
        self.note_deadline(job.deadline);
        self.enqueue(job);
    }

    /// Queues a job that was taken from a queue but did not run (its executor stopped, its
    /// batch's engine was poisoned before it started): on the priority lane, so it runs
    /// before the jobs that were queued behind it. (Use [`Shared::requeue`], which also
    /// answers it when the device is out of service.)
    pub(crate) fn requeue(&self, job: Job) {
        self.note_deadline(job.deadline);
        let _ = self.priority.0.send(Work::Job(job));
    }

    /// Tells the watchdog that a job with this deadline is (about to be) queued. Before the
    /// job is sent: a watchdog that sees the job in the queue has seen its note.
    fn note_deadline(&self, deadline: Instant) {
        let at = deadline.saturating_duration_since(self.born).as_nanos();
        self.requeued_deadline
            .fetch_min(u64::try_from(at).unwrap_or(u64::MAX - 1), Ordering::AcqRel);
    }

    /// The earliest deadline noted since the last call, if any.
    pub(crate) fn take_requeued_deadline(&self) -> Option<Instant> {
        match self.requeued_deadline.swap(u64::MAX, Ordering::AcqRel) {
            u64::MAX => None,
            at => Some(self.born + Duration::from_nanos(at)),
        }
    }

    /// Whether nothing is queued.
    pub(crate) fn queue_is_empty(&self) -> bool {
        self.priority.1.is_empty() && self.jobs.1.is_empty()
    }

    /// Takes everything queued (the priority lane first, each lane in order): the jobs, and
    /// the other work items (wake-ups, injected panics), which are the executor's and must
    /// be put back with [`DeviceCore::put_back`].
    pub(crate) fn take_queue(&self) -> (Vec<Job>, Vec<Work>) {
        let mut jobs = Vec::new();
        let mut other = Vec::new();
        for rx in [&self.priority.1, &self.jobs.1] {
            while let Ok(w) = rx.try_recv() {
                match w {
                    Work::Job(job) => jobs.push(job),
                    w => other.push(w),
                }
            }
        }
        (jobs, other)
    }

    /// Puts work taken with [`DeviceCore::take_queue`] back, in order, on the priority lane:
    /// ahead of whatever was queued on the other lane meanwhile, so jobs keep their order.
    /// Their deadlines are noted for the watchdog (which may have seen the queue empty
    /// meanwhile).
    pub(crate) fn put_back(&self, jobs: impl IntoIterator<Item = Job>, other: Vec<Work>) {
        let jobs: Vec<Job> = jobs.into_iter().collect();
        if let Some(earliest) = jobs.iter().map(|j| j.deadline).min() {
            self.note_deadline(earliest);
        }
        for w in other.into_iter().chain(jobs.into_iter().map(Work::Job)) {
            let _ = self.priority.0.send(w);
        }
    }

    /// Answers every queued job with `error(job)` (a failed device, shutdown).
    pub(crate) fn drain(&self, error: impl Fn(&Job) -> RuntimeError) {
        let (jobs, other) = self.take_queue();
        for job in jobs {
            let e = error(&job);
            job.answer(Err(e), &self.counters);
        }
        self.put_back([], other);
    }

    /// The watchdog's pass over a queue nobody is taking from (`running.takers == 0`, held
    /// locked by the caller so no executor starts taking): answers the jobs whose deadline
    /// has passed with `DeadlineExceeded`, forgets those answered already, and puts the rest
    /// back in order. Returns the earliest deadline left in the queue.
    pub(crate) fn sweep(&self, running: &Running, now: Instant) -> Option<Instant> {
        debug_assert_eq!(running.takers, 0, "an executor is taking from the queue");
        let (jobs, other) = self.take_queue();
        let mut earliest: Option<Instant> = None;
        let mut kept = Vec::with_capacity(jobs.len());
        for job in jobs {
            if job.slot.is_answered() {
                continue;
            }
            if now >= job.deadline {
                let e = self.deadline_exceeded(job.kind(), false);
                job.answer(Err(e), &self.counters);
                continue;
            }
            earliest = Some(earliest.map_or(job.deadline, |e| e.min(job.deadline)));
            kept.push(job);
        }
        self.put_back(kept, other);
        earliest
    }

    /// A new job for `op` answering through `port`.
    pub(crate) fn job(&self, op: Op, origin: Origin, port: Port, permit: Option<OwnedSemaphorePermit>) -> Job {
        let now = Instant::now();
        let slot = ReplySlot::new(port, op.kind(), origin, self.counters.clone(), now);
        Job {
            op,
            origin,
            slot,
            attempts: 0,
            backoff: None,
            deadline: now + self.deadline,
            _permit: permit,
            device: self.index,
        }
    }
}

/// Messages of a [`DeviceActor`]. Plain data and a reply port: no hand-written `Message`
/// impl, so the type can later travel through `ractor_cluster`.
#[derive(Debug)]
pub enum DeviceMsg {
    /// Executes an op; waits for an in-flight slot when the device is at its bound.
    Submit {
        /// The op.
        op: Op,
        /// Where the answer goes.
        reply: RpcReplyPort<OpResult>,
    },
    /// Executes an op, or answers `Busy` at once when the device is at its bound.
    TrySubmit {
        /// The op.
        op: Op,
        /// Where the answer goes.
        reply: RpcReplyPort<OpResult>,
    },
    /// Asks for the device's state.
    State(RpcReplyPort<DeviceState>),
    /// Fault injection for tests and chaos runs: the actor panics with this message, and
    /// its supervisor restarts it.
    Crash(String),
}

/// The actor of one device. Its state is built in `pre_start`, so a restart starts clean;
/// the device's executor and queue are not the actor's to lose, so ops in flight survive
/// an actor restart.
pub struct DeviceActor;

/// Arguments of a [`DeviceActor`].
pub struct DeviceActorArgs {
    pub(crate) shared: Arc<Shared>,
    pub(crate) device: u32,
}

/// State of a [`DeviceActor`].
pub struct DeviceActorState {
    shared: Arc<Shared>,
    device: u32,
}

impl Actor for DeviceActor {
    type Msg = DeviceMsg;
    type State = DeviceActorState;
    type Arguments = DeviceActorArgs;

    async fn pre_start(
        &self,
        me: ActorRef<DeviceMsg>,
        args: DeviceActorArgs,
    ) -> Result<DeviceActorState, ActorProcessingErr> {
        let core = &args.shared.cores[args.device as usize];
        *core.actor.write().unwrap_or_else(|p| p.into_inner()) = Some(me);
        Ok(DeviceActorState {
            shared: args.shared,
            device: args.device,
        })
    }

    async fn handle(
        &self,
        _me: ActorRef<DeviceMsg>,
        msg: DeviceMsg,
        st: &mut DeviceActorState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            DeviceMsg::Submit { op, reply } => {
                if let Some((op, reply)) = st.shared.submit_now(st.device, op, reply.into(), false, None) {
                    // At the bound: wait for a slot in a task, so the actor keeps serving.
                    let shared = st.shared.clone();
                    let device = st.device;
                    tokio::spawn(async move { shared.submit(device, op, reply, true).await });
                }
            }
            DeviceMsg::TrySubmit { op, reply } => {
                if let Some((_, reply)) = st.shared.submit_now(st.device, op, reply.into(), true, None) {
                    let capacity = st.shared.cores[st.device as usize].capacity;
                    let busy = RuntimeError::Busy {
                        device: st.device,
                        capacity,
                    };
                    reply.send(Err(busy), None);
                }
            }
            DeviceMsg::State(reply) => {
                let _ = reply.send(st.shared.cores[st.device as usize].state.get());
            }
            DeviceMsg::Crash(why) => panic!("device actor {} crashed on request: {why}", st.device),
        }
        Ok(())
    }
}

/// Host memory for a copy to the device, in shared memory: filled in place, then frozen
/// into a [`Payload`] that reaches the device without another copy — in process isolation
/// the worker maps the same memory.
#[derive(Debug)]
pub struct HostBuffer {
    region: hipvisor_core::ipc::Region,
}

impl HostBuffer {
    /// The bytes, to fill.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        self.region.as_mut_slice()
    }

    /// The length in bytes.
    pub fn len(&self) -> usize {
        self.region.len()
    }

    /// `true` for an empty buffer.
    pub fn is_empty(&self) -> bool {
        self.region.is_empty()
    }

    /// The filled buffer as a payload for [`DeviceHandle::copy_to_device`].
    pub fn freeze(self) -> Payload {
        Payload::shared(Arc::new(self.region))
    }
}

/// A typed handle to one device, for plain async code. Cheap to clone.
///
/// Every method submits one op and waits for its answer: a result, or a typed
/// [`RuntimeError`] that says what happened.
#[derive(Clone)]
pub struct DeviceHandle {
    pub(crate) shared: Arc<Shared>,
    pub(crate) device: u32,
}

macro_rules! expect_reply {
    ($result:expr, $pat:pat => $out:expr) => {
        match $result? {
            $pat => Ok($out),
            other => unreachable!("the device answered {other:?}"),
        }
    };
}

impl DeviceHandle {
    /// The device index.
    pub fn index(&self) -> u32 {
        self.device
    }

    /// The device's state now.
    pub fn state(&self) -> DeviceState {
        self.shared.cores[self.device as usize].state.get()
    }

    /// Ops in flight on the device now.
    pub fn in_flight(&self) -> u32 {
        self.shared.cores[self.device as usize].in_flight()
    }

    /// A host buffer of `len` bytes in shared memory, for copies to the device without an
    /// extra copy.
    ///
    /// # Errors
    /// A transient out-of-memory error when the host has no memory for it.
    pub fn host_buffer(&self, len: usize) -> Result<HostBuffer, RuntimeError> {
        hipvisor_core::ipc::Region::new(len)
            .map(|region| HostBuffer { region })
            .map_err(|e| {
                let code = hipvisor_core::error::hip::OUT_OF_MEMORY;
                let msg = format!("cannot allocate a {len}-byte host buffer: {e}");
                RuntimeError::Gpu(hipvisor_core::GpuError::api_with(
                    hipvisor_core::Api::Hip,
                    code,
                    OpKind::Alloc,
                    self.device,
                    msg,
                ))
            })
    }

    /// Submits an op, waiting for an in-flight slot if the device is at its bound.
    ///
    /// # Errors
    /// The op's typed error.
    pub async fn submit(&self, op: Op) -> OpResult {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.shared.submit(self.device, op, tx.into(), true).await;
        self.answer(rx).await
    }

    /// Waits for an op's answer. When the op is the device's only one in flight (a serial
    /// caller), the answer usually comes within microseconds: poll for it for up to
    /// `runtime.spin_us` before waiting to be woken, which saves the wake-up of a parked
    /// runtime thread (tens of microseconds) on every op.
    ///
    /// The poll holds this runtime thread (yielding the CPU between polls) for at most
    /// `spin_us`, and in practice for the op's latency. Yielding to the tokio scheduler
    /// instead would not hold the thread, but measured slower than not spinning at all on
    /// 2 cores (process isolation, serial: 14–48 µs against 11 µs): each yield makes tokio
    /// wake an idle worker thread to steal the task.
    async fn answer(&self, mut rx: tokio::sync::oneshot::Receiver<Answered>) -> OpResult {
        use tokio::sync::oneshot::error::TryRecvError;
        let spin = self.shared.spin_for(self.device);
        if !spin.is_zero() {
            let until = Instant::now() + spin;
            loop {
                match rx.try_recv() {
                    Ok((result, _slot)) => return result,
                    Err(TryRecvError::Closed) => return Err(RuntimeError::ShuttingDown),
                    Err(TryRecvError::Empty) if Instant::now() < until => std::thread::yield_now(),
                    Err(TryRecvError::Empty) => break,
                }
            }
        }
        rx.await
            .map_or(Err(RuntimeError::ShuttingDown), |(result, _slot)| result)
    }

    /// Submits ops together and waits for all their answers, which come back in order, one
    /// per op. Cheaper per op than [`DeviceHandle::submit`]: the ops are queued together,
    /// the caller is woken once for the whole batch, and in process isolation they travel
    /// to the worker in one request (up to 64 ops a request).
    ///
    /// Each op is still an op of its own: admitted, retried, deadlined and counted on its
    /// own, answered with its own result or typed error. The ops run in order unless one
    /// is retried (a retry goes after the ops queued behind it) or its device restarts.
    /// When the device is at its in-flight bound, the batch waits for slots as `submit`
    /// does. Dropping the future before it completes submits no more of the ops; those
    /// already queued still run, and their answers are discarded.
    pub async fn submit_batch(&self, ops: impl IntoIterator<Item = Op>) -> Vec<OpResult> {
        let ops: Vec<Op> = ops.into_iter().collect();
        let sink = BatchSink::new(ops.len());
        self.shared.submit_batch(self.device, ops, &sink).await;
        sink.wait().await
    }

    /// Submits an op, failing with [`RuntimeError::Busy`] when the device is at its bound.
    ///
    /// # Errors
    /// The op's typed error, or `Busy`.
    pub async fn try_submit(&self, op: Op) -> OpResult {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.shared.submit(self.device, op, tx.into(), false).await;
        self.answer(rx).await
    }

    /// Allocates `bytes` of device memory.
    ///
    /// # Errors
    /// The op's typed error (out of memory after retries, more than the device has, ...).
    pub async fn alloc(&self, bytes: u64) -> Result<BufferHandle, RuntimeError> {
        expect_reply!(self.submit(Op::Alloc { bytes }).await, Reply::Buffer(b) => b)
    }

    /// Frees a buffer.
    ///
    /// # Errors
    /// The op's typed error (unknown or stale handle, ...).
    pub async fn free(&self, buffer: BufferHandle) -> Result<(), RuntimeError> {
        expect_reply!(self.submit(Op::Free { buffer }).await, Reply::Done => ())
    }

    /// Copies host bytes into `dst` at `offset`.
    ///
    /// # Errors
    /// The op's typed error (out of bounds, stale handle, ...).
    pub async fn copy_to_device(
        &self,
        dst: BufferHandle,
        offset: u64,
        data: impl Into<Payload>,
    ) -> Result<(), RuntimeError> {
        let op = Op::CopyToDevice {
            dst,
            offset,
            data: data.into(),
        };
        expect_reply!(self.submit(op).await, Reply::Done => ())
    }

    /// Copies `len` bytes at `offset` of `src` to the host.
    ///
    /// # Errors
    /// The op's typed error (out of bounds, stale handle, ...).
    pub async fn copy_from_device(&self, src: BufferHandle, offset: u64, len: u64) -> Result<Payload, RuntimeError> {
        expect_reply!(self.submit(Op::CopyFromDevice { src, offset, len }).await, Reply::Data(d) => d)
    }

    /// Copies between two buffers of this device.
    ///
    /// # Errors
    /// The op's typed error (out of bounds, overlap, ...).
    pub async fn copy_device_to_device(
        &self,
        src: BufferHandle,
        src_offset: u64,
        dst: BufferHandle,
        dst_offset: u64,
        len: u64,
    ) -> Result<(), RuntimeError> {
        let op = Op::CopyDeviceToDevice {
            src,
            src_offset,
            dst,
            dst_offset,
            len,
        };
        expect_reply!(self.submit(op).await, Reply::Done => ())
    }

    /// Sets `len` bytes at `offset` of `buffer` to `value`.
    ///
    /// # Errors
    /// The op's typed error.
    pub async fn memset(&self, buffer: BufferHandle, offset: u64, len: u64, value: u8) -> Result<(), RuntimeError> {
        expect_reply!(self.submit(Op::Memset { buffer, offset, len, value }).await, Reply::Done => ())
    }

    /// Loads a kernel module.
    ///
    /// # Errors
    /// The op's typed error (bad image, ...).
    pub async fn load_module(&self, source: ModuleSource) -> Result<ModuleHandle, RuntimeError> {
        expect_reply!(self.submit(Op::LoadModule { source }).await, Reply::Module(m) => m)
    }

    /// Launches `function` of `module` with one-dimensional `grid` × `block`.
    ///
    /// # Errors
    /// The op's typed error (unknown kernel, bad arguments, quarantined, ...).
    pub async fn launch(
        &self,
        module: ModuleHandle,
        function: &str,
        grid: u32,
        block: u32,
        args: Vec<KernelArg>,
    ) -> Result<(), RuntimeError> {
        let op = Op::Launch {
            module,
            function: function.to_string(),
            grid: Dim3::x(grid),
            block: Dim3::x(block),
            shared_mem_bytes: 0,
            args,
        };
        expect_reply!(self.submit(op).await, Reply::Done => ())
    }

    /// Waits for the device's earlier work.
    ///
    /// # Errors
    /// The op's typed error (a sticky fault of an earlier launch surfaces here).
    pub async fn synchronize(&self) -> Result<(), RuntimeError> {
        expect_reply!(self.submit(Op::Synchronize).await, Reply::Done => ())
    }

    /// Free and total memory.
    ///
    /// # Errors
    /// The op's typed error.
    pub async fn mem_info(&self) -> Result<MemInfo, RuntimeError> {
        expect_reply!(self.submit(Op::MemInfo).await, Reply::MemInfo(m) => m)
    }

    /// The device's description.
    ///
    /// # Errors
    /// The op's typed error.
    pub async fn device_info(&self) -> Result<DeviceInfo, RuntimeError> {
        expect_reply!(self.submit(Op::DeviceInfo).await, Reply::DeviceInfo(i) => i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sweep_answers_the_jobs_past_their_deadline_and_keeps_the_rest_in_order() {
        let core = DeviceCore::new(0, 16, Duration::from_secs(10), &BreakerConfig::default());
        let now = Instant::now();
        let mut answers = Vec::new();
        // Each job's deadline tells it apart: `seconds` from now (0: past it already).
        let mut job = |lane_runtime: bool, seconds: u64| {
            let (tx, rx) = tokio::sync::oneshot::channel::<OpResult>();
            let origin = if lane_runtime {
                Origin::Runtime
            } else {
                Origin::Application
            };
            let mut job = core.job(Op::MemInfo, origin, tx.into(), None);
            job.deadline = match seconds {
                0 => now - Duration::from_millis(1),
                s => now + Duration::from_secs(s),
            };
            answers.push(rx);
            job
        };
        let jobs = [
            job(false, 3), // 0
            job(false, 0), // 1: past its deadline
            job(true, 5),  // 2: on the priority lane
            job(false, 4), // 3
        ];
        let ids: Vec<_> = jobs.iter().map(|j| j.deadline).collect();
        let answered_first = {
            let (tx, _rx) = tokio::sync::oneshot::channel::<OpResult>();
            let j = core.job(Op::MemInfo, Origin::Application, tx.into(), None);
            j.slot.answer(Err(RuntimeError::ShuttingDown), 1, &core.counters);
            j
        };
        for j in jobs {
            core.enqueue(j);
        }
        core.enqueue(answered_first);
        let _ = core.priority.0.send(Work::Wake);
        let running = Running::default();
        let earliest = core.sweep(&running, now);
        assert_eq!(earliest, Some(ids[0]));
        assert!(matches!(
            answers[1].try_recv(),
            Ok(Err(RuntimeError::DeadlineExceeded {
                may_have_executed: false,
                ..
            }))
        ));
        // Everything else is back, in order (priority lane first), on the priority lane; the
        // wake-up too; the job answered already is gone.
        assert!(core.jobs.1.is_empty());
        let back: Vec<Option<Instant>> = core
            .priority
            .1
            .try_iter()
            .map(|w| match w {
                Work::Job(j) => Some(j.deadline),
                _ => None,
            })
            .collect();
        assert_eq!(back, vec![None, Some(ids[2]), Some(ids[0]), Some(ids[3])]);
    }
}
