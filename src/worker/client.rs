//! The host side of the worker protocol: [`WorkerClient`] starts a device's worker process,
//! shakes hands with it, reloads the device's modules, probes its health and then runs ops
//! and batches of ops on it; [`Spawner`] starts every worker from one long-lived thread, and
//! [`Workers`] registers every worker process from its spawn until it is reaped.
//!
//! The executor thread asks the spawner thread (long-lived: the worker's parent-death signal
//! is tied to it) for the worker, hands it the control page, reloads every module the device
//! had, runs a health probe (mem-info, alloc + memset + copy back + free, a small kernel +
//! synchronize), and only then readmits work. The handshake, the reloads and the probe
//! together have `supervisor.worker_start_timeout_ms`: every receive waits at most for what
//! is left of it, and the watchdog kills a worker still starting past it. Every worker is in
//! the runtime's [`Workers`] from the moment it is spawned until it is reaped, so the
//! watchdog, shutdown and a dropped runtime can stop it whatever it is doing. Each op is a
//! request; faults of the simulator's plan are decided here, in the host, so a restarted
//! worker re-arms nothing. Bulk bytes travel in shared memory. The worker's answers are
//! checked before they are believed ([`ipc::check_answer`], [`ipc::check_batch_frame`]):
//! a malformed one is a broken worker, killed and restarted, and its ops are answered as
//! by its death.
//!
//! It lives next to the worker ([`super`]), in the core: synchronous, no tokio, no actors.
//! What it needs of the runtime (the worker program, the start budget, the device's module
//! table, the slot naming its worker) is handed in: [`WorkerLaunch`], [`DeviceLink`].

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::backend::BackendKind;
use crate::backend::sim::fault_plan::FaultInjector;
use crate::error::{ErrorClass, GpuError, InvalidReason};
use crate::ipc::{
    self, Channel, ControlPage, FromWorker, Hello, IpcError, OutputRegion, Region, RegionRef, Request, ToWorker,
};
use crate::op::{BufferHandle, KernelArg, ModuleHandle, ModuleSource, Op, OpKind, Origin, Payload, Reply};
use crate::sync::lock;

/// What running one op (or one op of a batch) on a worker gave.
#[derive(Debug)]
pub enum Executed {
    /// The op ran (or was rejected) and this is its result.
    Done(Result<Reply, GpuError>),
    /// The worker died under the op; `may_have_executed` says whether the op had started,
    /// `aborted` whether the worker ended by SIGABRT (how ROCm ends a process whose kernel
    /// made a memory access fault).
    Died {
        /// Whether the op had started (the control page named it).
        may_have_executed: bool,
        /// How the worker ended, in words.
        reason: String,
        /// Whether it ended by SIGABRT.
        aborted: bool,
    },
}

/// How the worker is started: the same for every worker of a runtime.
pub struct WorkerLaunch<'a> {
    /// The program started as a device's worker.
    pub program: &'a std::path::Path,
    /// The backend the worker opens (and, for the simulator, its shape).
    pub backend: BackendKind,
    /// For the simulator: its devices, memory and flavour.
    pub sim: Option<ipc::SimHello>,
    /// `supervisor.worker_start_timeout_ms`: for the handshake, the reloads and the health
    /// probe together.
    pub start_timeout: Duration,
    /// The thread that spawns every worker.
    pub spawner: &'a Spawner,
    /// The registry every worker joins at its spawn.
    pub workers: &'a Arc<Workers>,
    /// The runtime's closing flag: no worker is registered (so none is left behind) once it
    /// is set.
    pub closing: &'a AtomicBool,
    /// How long the health probe's ops poll for their answers before blocking.
    pub spin: Duration,
}

/// What a worker shares with the device it serves.
#[derive(Clone)]
pub struct DeviceLink {
    /// The device index.
    pub device: u32,
    /// The process id of the device's worker (0: none): set by an active worker from its
    /// spawn on, cleared by the worker named there when it is reaped.
    pub worker_pid: Arc<AtomicI32>,
    /// The device's modules (id → source), which outlive its workers.
    pub modules: Arc<Mutex<BTreeMap<u64, ModuleSource>>>,
    /// The simulator's fault plan, decided in the host for every op.
    pub faults: Option<Arc<FaultInjector>>,
}

/// Whether a worker is to serve its device now or to wait as its warm standby.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The device's worker: its pid goes into [`DeviceLink::worker_pid`] from its spawn on.
    Active,
    /// A warm standby for the device's next epoch.
    Standby,
}

/// Why a worker could not be started.
#[derive(Debug)]
pub enum StartError {
    /// The spawn failed, or the worker answered an error or went away.
    Failed(GpuError),
    /// The worker did not finish its start within `supervisor.worker_start_timeout_ms`; it
    /// has been killed. The text says where it was, and `source` what the last receive got.
    TimedOut {
        /// Where the start was when its time ran out.
        reason: String,
        /// What the last receive got.
        source: GpuError,
    },
    /// The worker could not restore the device's durable buffers (out of memory on the GPU,
    /// typically: a standby holds them next to the active context's).
    Restore(GpuError),
}

impl From<GpuError> for StartError {
    fn from(e: GpuError) -> Self {
        StartError::Failed(e)
    }
}

impl StartError {
    /// The op the start was doing when it failed (`DeviceInfo`: the handshake,
    /// `LoadModule`: a module reload, `Durable`: a durable buffer's restore, `MemInfo`: the
    /// health probe).
    pub fn op(&self) -> OpKind {
        match self {
            StartError::Failed(e) | StartError::Restore(e) | StartError::TimedOut { source: e, .. } => e.op(),
        }
    }
}

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StartError::Failed(e) => write!(f, "{e}"),
            StartError::Restore(e) => write!(f, "the device's durable buffers could not be restored: {e}"),
            StartError::TimedOut { reason, .. } => f.write_str(reason),
        }
    }
}

impl std::error::Error for StartError {
    /// The underlying error: the worker's (or the spawn's) for a failed start; for a start
    /// that timed out, what its last receive got.
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            StartError::Failed(e) => e.source(),
            StartError::Restore(e) => Some(e),
            StartError::TimedOut { source, .. } => Some(source),
        }
    }
}

/// Every worker process of the runtime, from its spawn until it is reaped: the watchdog
/// kills those still starting past their start deadline, shutdown and a dropped runtime kill
/// them all. A worker leaves the list before it is reaped, so a kill never reaches a process
/// that reused its id; kills are sent under the list's lock for the same reason.
#[derive(Default)]
pub struct Workers(Mutex<Vec<Registered>>);

struct Registered {
    pid: u32,
    device: u32,
    /// Until its start is complete.
    start_deadline: Option<Instant>,
}

impl Workers {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Registered>> {
        lock(&self.0)
    }

    /// Adds a worker that has just been spawned; `false` (not added) when the runtime is
    /// closing. Checked under the lock that [`Workers::kill_all`] takes after `closing` is
    /// set, so a worker is either killed by it or never added.
    fn add(&self, pid: u32, device: u32, start_deadline: Instant, closing: &AtomicBool) -> bool {
        let mut list = self.lock();
        if closing.load(Ordering::Acquire) {
            return false;
        }
        list.push(Registered {
            pid,
            device,
            start_deadline: Some(start_deadline),
        });
        true
    }

    /// The worker's start is complete.
    fn started(&self, pid: u32) {
        if let Some(r) = self.lock().iter_mut().find(|r| r.pid == pid) {
            r.start_deadline = None;
        }
    }

    /// Forgets a worker (before it is reaped).
    fn remove(&self, pid: u32) {
        self.lock().retain(|r| r.pid != pid);
    }

    /// Kills a worker if it is still registered (not reaped yet, so its id is its own).
    pub fn kill(&self, pid: u32) {
        let list = self.lock();
        if list.iter().any(|r| r.pid == pid) {
            ipc::kill(pid);
        }
    }

    /// Kills the workers still starting past their start deadline; their starts then fail
    /// (the receive sees the connection close). Returns the (device, pid) of each, for the
    /// caller to log.
    pub fn kill_overdue_starts(&self, now: Instant) -> Vec<(u32, u32)> {
        let mut killed = Vec::new();
        for r in self.lock().iter_mut() {
            if r.start_deadline.is_some_and(|d| now >= d) {
                ipc::kill(r.pid);
                r.start_deadline = None;
                killed.push((r.device, r.pid));
            }
        }
        killed
    }

    /// Kills every worker (shutdown, a dropped runtime): their owners see the connection
    /// close and reap them.
    pub fn kill_all(&self) {
        for r in self.lock().iter() {
            ipc::kill(r.pid);
        }
    }
}

/// A device's worker process and its connection.
pub struct WorkerClient {
    link: DeviceLink,
    workers: Arc<Workers>,
    start_timeout: Duration,
    device: u32,
    child: Child,
    channel: Channel,
    control: ControlPage,
    next_id: u64,
    epoch: u64,
    /// The host buffers the worker has cached (mirrors the worker's LRU).
    regions: ipc::RegionLru,
    /// Modules loaded into this worker's context (restored or loaded by ops).
    restored: std::collections::BTreeSet<u64>,
    /// Durable buffers in this worker's context: id → (host copy version, length).
    durables: std::collections::HashMap<u64, (u64, u64)>,
    /// Restoring durable buffers now (a failure then is [`StartError::Restore`]).
    restoring: bool,
    /// Buffers this worker's context handed out and has not freed: a new one under a live
    /// id is a malformed answer.
    live_buffers: std::collections::HashSet<u64>,
    /// `Malformed` answers in a row to requests the host validated before sending them
    /// ([`MALFORMED_IN_A_ROW`] of them restart the worker).
    malformed: u32,
}

/// How many `Malformed` answers in a row to requests the host checked before sending them
/// (limits and sizes; a batch's count and regions) make a broken worker: it is restarted,
/// and the request that tripped the limit is answered as by its death. One such answer is
/// an invalid request (a cached region the worker could not map is one, and is sent again).
pub const MALFORMED_IN_A_ROW: u32 = 3;

/// The worker could not be spoken to while doing `op` (the handshake is the worker opening
/// its device and answering [`Op::DeviceInfo`]; a restore is [`Op::LoadModule`]).
fn ipc_error(op: OpKind, device: u32, e: impl std::fmt::Display) -> GpuError {
    GpuError::WorkerUnavailable {
        op,
        device,
        reason: e.to_string(),
    }
}

impl WorkerClient {
    /// Spawns and prepares a worker for `link.device` at `epoch`, reloading `modules`:
    /// within `launch.start_timeout` for the handshake, the reloads and the health probe
    /// together, or it is killed and the start has [`StartError::TimedOut`].
    pub fn start(
        launch: &WorkerLaunch<'_>,
        link: DeviceLink,
        epoch: u64,
        modules: &BTreeMap<u64, ModuleSource>,
        durables: &BTreeMap<u64, HostCopy>,
        role: Role,
    ) -> Result<WorkerClient, StartError> {
        let device = link.device;
        let budget = launch.start_timeout;
        let deadline = Instant::now() + budget;
        let (host_end, worker_end) = Channel::pair().map_err(|e| ipc_error(OpKind::DeviceInfo, device, e))?;
        let control = ControlPage::new().map_err(|e| ipc_error(OpKind::DeviceInfo, device, e))?;
        let mut command = Command::new(launch.program);
        command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        let mut child = launch.spawner.spawn(command, worker_end).map_err(|e| {
            ipc_error(
                OpKind::DeviceInfo,
                device,
                format!("cannot start worker {}: {e}", launch.program.display()),
            )
        })?;
        let pid = child.id();
        if !launch.workers.add(pid, device, deadline, launch.closing) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(StartError::Failed(ipc_error(
                OpKind::DeviceInfo,
                device,
                "the runtime is shutting down",
            )));
        }
        if role == Role::Active {
            link.worker_pid.store(pid as i32, Ordering::Release);
        }
        // From here the client's drop stops the worker, whatever fails.
        let mut w = WorkerClient {
            link,
            workers: launch.workers.clone(),
            start_timeout: budget,
            device,
            child,
            channel: host_end,
            control,
            next_id: 1,
            epoch,
            regions: ipc::RegionLru::default(),
            restored: modules.keys().copied().collect(),
            durables: std::collections::HashMap::new(),
            restoring: false,
            live_buffers: std::collections::HashSet::new(),
            malformed: 0,
        };
        let mut phase = "handshake";
        match w.prepare(launch, modules, durables, deadline, &mut phase) {
            Ok(()) => {
                launch.workers.started(pid);
                Ok(w)
            }
            Err(e) if Instant::now() >= deadline => {
                drop(w); // killed and reaped
                Err(StartError::TimedOut {
                    reason: format!(
                        "worker {pid} did not finish its start within supervisor.worker_start_timeout_ms = {} ms \
                         (stuck in its {phase}: {e}); killed",
                        budget.as_millis()
                    ),
                    source: e,
                })
            }
            Err(e) if w.restoring => Err(StartError::Restore(e)),
            Err(e) => Err(StartError::Failed(e)),
        }
    }

    /// The handshake, the module reloads and the health probe of a new worker, each receive
    /// bounded by `deadline`. `phase` says how far it got.
    fn prepare(
        &mut self,
        launch: &WorkerLaunch<'_>,
        modules: &BTreeMap<u64, ModuleSource>,
        durables: &BTreeMap<u64, HostCopy>,
        deadline: Instant,
        phase: &mut &'static str,
    ) -> Result<(), GpuError> {
        let device = self.device;
        let hello = Hello {
            version: ipc::PROTOCOL_VERSION,
            backend: launch.backend,
            device,
            epoch: self.epoch,
            sim: launch.sim,
        };
        self.channel
            .send(&ToWorker::Hello(hello), &[self.control.raw_fd()])
            .map_err(|e| ipc_error(OpKind::DeviceInfo, device, e))?;
        // A program that is not a worker never answers: do not wait for it forever.
        self.bound(OpKind::DeviceInfo, deadline)?;
        let answer = self.channel.recv::<FromWorker>().map_err(|e| {
            let program = launch.program.display();
            ipc_error(
                OpKind::DeviceInfo,
                device,
                format!("no answer from worker {program} ({e}); is it a hipvisor worker?"),
            )
        })?;
        match answer.0 {
            FromWorker::Ready { .. } => {}
            FromWorker::Failed(e) => return Err(received(e)),
            other => {
                return Err(ipc_error(
                    OpKind::DeviceInfo,
                    device,
                    format!("unexpected answer to Hello: {other:?}"),
                ));
            }
        }
        *phase = "module restore";
        for (id, source) in modules {
            self.bound(OpKind::LoadModule, deadline)?;
            self.restore(ModuleHandle { device, id: *id }, source)?;
        }
        *phase = "durable buffer restore";
        self.restoring = true;
        self.sync_durables(durables, deadline)?;
        self.restoring = false;
        *phase = "health probe";
        self.health_probe(deadline, launch.spin)?;
        let op = OpKind::MemInfo;
        self.channel.set_timeout(None).map_err(|e| ipc_error(op, device, e))
    }

    /// Makes the next receive wait at most until `deadline`; an error once it has passed.
    fn bound(&mut self, op: OpKind, deadline: Instant) -> Result<(), GpuError> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ipc_error(op, self.device, "out of time"));
        }
        // A zero timeout would mean "forever".
        let left = left.max(Duration::from_millis(1));
        self.channel
            .set_timeout(Some(left))
            .map_err(|e| ipc_error(op, self.device, e))
    }

    /// The worker's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The epoch the worker's context was opened for.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Whether the worker process is still running.
    pub fn is_alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Makes the worker's durable buffers the device's: restores those it lacks or holds an
    /// older host copy of (`Op::Durable`, the runtime's own), frees those the device freed
    /// since — each request bounded by `deadline`.
    fn sync_durables(&mut self, durables: &BTreeMap<u64, HostCopy>, deadline: Instant) -> Result<(), GpuError> {
        let op = OpKind::Durable;
        let gone: Vec<(u64, u64)> = self
            .durables
            .iter()
            .filter(|(id, _)| !durables.contains_key(id))
            .map(|(id, (_, len))| (*id, *len))
            .collect();
        for (id, len) in gone {
            self.bound(op, deadline)?;
            let buffer = BufferHandle {
                device: self.device,
                epoch: BufferHandle::DURABLE_EPOCH,
                id,
                len,
            };
            self.run_start_op(&Op::Free { buffer })?;
            self.durables.remove(&id);
        }
        for (id, copy) in durables {
            if self.durables.get(id).is_some_and(|(v, _)| *v == copy.version) {
                continue;
            }
            self.bound(op, deadline)?;
            let restore = Op::Durable {
                id: *id,
                data: copy.data.clone(),
            };
            self.run_start_op(&restore)?;
            self.durables.insert(*id, (copy.version, copy.data.len() as u64));
        }
        Ok(())
    }

    /// One op of the runtime's own while the worker starts or catches up.
    fn run_start_op(&mut self, op: &Op) -> Result<(), GpuError> {
        match self.run(op, Origin::Runtime, Duration::ZERO) {
            Executed::Done(Ok(_)) => Ok(()),
            Executed::Done(Err(e)) => Err(e),
            Executed::Died { reason, .. } => Err(ipc_error(op.kind(), self.device, reason)),
        }
    }

    /// Loads the modules the device gained since this (standby) worker was prepared, and
    /// brings its durable buffers up to date, within `supervisor.worker_start_timeout_ms`.
    pub fn catch_up(
        &mut self,
        modules: &BTreeMap<u64, ModuleSource>,
        durables: &BTreeMap<u64, HostCopy>,
    ) -> Result<(), StartError> {
        let budget = self.start_timeout;
        let deadline = Instant::now() + budget;
        let caught_up = (|| {
            for (id, source) in modules {
                if !self.restored.contains(id) {
                    self.bound(OpKind::LoadModule, deadline)?;
                    let module = ModuleHandle {
                        device: self.device,
                        id: *id,
                    };
                    self.restore(module, source)?;
                }
            }
            self.restoring = true;
            self.sync_durables(durables, deadline)?;
            self.restoring = false;
            let op = OpKind::LoadModule;
            self.channel
                .set_timeout(None)
                .map_err(|e| ipc_error(op, self.device, e))
        })();
        match caught_up {
            Ok(()) => Ok(()),
            Err(e) if Instant::now() >= deadline => {
                let _ = self.child.kill();
                Err(StartError::TimedOut {
                    reason: format!(
                        "standby worker {} did not load the device's new modules and durable buffers within \
                         supervisor.worker_start_timeout_ms = {} ms ({e}); killed",
                        self.pid(),
                        budget.as_millis()
                    ),
                    source: e,
                })
            }
            Err(e) if std::mem::take(&mut self.restoring) => Err(StartError::Restore(e)),
            Err(e) => Err(StartError::Failed(e)),
        }
    }

    fn restore(&mut self, module: ModuleHandle, source: &ModuleSource) -> Result<(), GpuError> {
        let (source, region) = split_module(source).map_err(|e| ipc_error(OpKind::LoadModule, self.device, e))?;
        let input = region.as_ref().map(|r| RegionRef {
            id: r.id(),
            len: r.len() as u64,
            cached: false,
        });
        let fds: Vec<_> = region.iter().map(|r| r.raw_fd()).collect();
        self.channel
            .send(&ToWorker::Restore { module, source, input }, &fds)
            .map_err(|e| ipc_error(OpKind::LoadModule, self.device, e))?;
        match self
            .channel
            .recv::<FromWorker>()
            .map_err(|e| ipc_error(OpKind::LoadModule, self.device, e))?
            .0
        {
            FromWorker::Restored => {
                self.restored.insert(module.id);
                Ok(())
            }
            FromWorker::Failed(e) => Err(received(e)),
            other => Err(ipc_error(
                OpKind::LoadModule,
                self.device,
                format!("unexpected answer to Restore: {other:?}"),
            )),
        }
    }

    /// A small kernel, a copy and mem-info, as the runtime's own (never faulted) ops, each
    /// answer awaited until `deadline` at most (polled for `spin` first).
    fn health_probe(&mut self, deadline: Instant, spin: Duration) -> Result<(), GpuError> {
        let mut call = |op: Op| {
            self.bound(op.kind(), deadline)?;
            match self.run(&op, Origin::Runtime, spin) {
                Executed::Done(r) => r,
                Executed::Died { reason, .. } => Err(ipc_error(
                    op.kind(),
                    self.device,
                    format!("worker died during the health probe: {reason}"),
                )),
            }
        };
        call(Op::MemInfo)?;
        let Reply::Buffer(b) = call(Op::Alloc { bytes: 256 })? else {
            unreachable!("alloc answers a buffer")
        };
        call(Op::Memset {
            buffer: b,
            offset: 0,
            len: 256,
            value: 0x5a,
        })?;
        let Reply::Data(d) = call(Op::CopyFromDevice {
            src: b,
            offset: 0,
            len: 256,
        })?
        else {
            unreachable!()
        };
        if d.as_bytes() != [0x5a; 256] {
            return Err(ipc_error(
                OpKind::CopyFromDevice,
                self.device,
                "health probe: the copy came back wrong",
            ));
        }
        let Reply::Module(m) = call(Op::LoadModule {
            source: ModuleSource::Builtin,
        })?
        else {
            unreachable!()
        };
        let fill = Op::Launch {
            module: m,
            function: "fill".into(),
            grid: crate::op::Dim3::x(1),
            block: crate::op::Dim3::x(64),
            shared_mem_bytes: 0,
            args: vec![KernelArg::Buffer(b), KernelArg::U32(7), KernelArg::U32(64)],
        };
        call(fill)?;
        call(Op::Synchronize)?;
        call(Op::Free { buffer: b })?;
        Ok(())
    }

    /// Forgets the worker before it is reaped: out of the registry, so nothing kills its id
    /// afterwards (kills go through the registry, under its lock), and no longer named as the
    /// device's worker.
    fn forget(&self) {
        let pid = self.child.id();
        self.workers.remove(pid);
        let _ = self
            .link
            .worker_pid
            .compare_exchange(pid as i32, 0, Ordering::AcqRel, Ordering::Acquire);
    }

    /// How the worker ended (after its connection closed), from its wait status: the
    /// reason's words, and whether it was SIGABRT — how ROCm ends a process whose kernel
    /// made a memory access fault.
    fn exit_reason(&mut self) -> (String, bool) {
        self.forget();
        // A worker that closed its connection (or sent an empty frame, which reads the same)
        // but lives on would block this wait for ever, and nothing else can kill it now: it
        // gets a second to end by itself (so a death keeps its own status, SIGABRT included),
        // then is killed.
        let grace = Instant::now() + Duration::from_secs(1);
        let status = loop {
            match self.child.try_wait() {
                Ok(Some(status)) => break Ok(status),
                Ok(None) if Instant::now() < grace => std::thread::sleep(Duration::from_millis(2)),
                Ok(None) => {
                    let _ = self.child.kill();
                    break self.child.wait();
                }
                Err(e) => break Err(e),
            }
        };
        match status {
            Ok(status) => (ipc::describe_exit(status), ipc::aborted(status)),
            Err(e) => (format!("worker lost ({e})"), false),
        }
    }
}

/// An error a worker sent: its code is logged here, in the host (workers log none), so an
/// unknown code is logged once per run however many workers returned it, and a
/// threading-bug code every time ([`GpuError::note_received`]).
fn received(e: GpuError) -> GpuError {
    e.note_received();
    e
}

/// A module source with a large image moved into a region.
fn split_module(source: &ModuleSource) -> Result<(ModuleSource, Option<Arc<Region>>), IpcError> {
    match source {
        ModuleSource::Image(p) if p.len() > ipc::INLINE_LIMIT => {
            Ok((ModuleSource::Image(Payload::default()), Some(region_of(p)?)))
        }
        other => Ok((other.clone(), None)),
    }
}

/// The answer to an op whose request cannot be carried to the worker (its frame would
/// exceed the protocol's limit): an invalid request; nothing was sent.
fn unsendable(op: &Op, device: u32, e: impl std::fmt::Display) -> GpuError {
    let reason = InvalidReason::BadArguments {
        kernel: op.kernel().unwrap_or_default().chars().take(64).collect(),
        reason: format!("the request cannot be sent to the worker: {e}"),
    };
    GpuError::invalid(op.kind(), device, reason)
}

/// A durable buffer's host copy: its bytes (sealed shared memory, or an immutable heap
/// copy when small), and a version unique in the process, which a worker's copy is compared
/// with.
#[derive(Debug, Clone)]
pub struct HostCopy {
    /// The bytes.
    pub data: Payload,
    /// Unique per host copy made (never reused).
    pub version: u64,
}

impl HostCopy {
    /// The bytes of `data` as a host copy can hold them: up to [`ipc::INLINE_LIMIT`] (what
    /// travels inline to a worker anyway) an immutable heap copy, with no descriptor each;
    /// above it a region sealed against writes ([`Payload::into_sealed`]: in place when
    /// nothing else holds `data`'s region).
    ///
    /// # Errors
    /// [`IpcError::Os`] when the host has no shared memory for it.
    pub fn keep(data: Payload) -> Result<Payload, IpcError> {
        if data.len() > ipc::INLINE_LIMIT {
            return data.into_sealed();
        }
        Ok(match data.region() {
            Some(_) => Payload::new(data.to_vec()),
            None => data,
        })
    }

    /// `len` bytes written by `fill`, held as [`HostCopy::keep`] would hold them (without an
    /// intermediate copy).
    ///
    /// # Errors
    /// As [`HostCopy::keep`].
    pub fn build(len: usize, fill: impl FnOnce(&mut [u8])) -> Result<Payload, IpcError> {
        if len <= ipc::INLINE_LIMIT {
            let mut bytes = vec![0; len];
            fill(&mut bytes);
            return Ok(Payload::new(bytes));
        }
        let mut region = Region::new(len)?;
        fill(region.as_mut_slice());
        Ok(Payload::shared(Arc::new(region.into_sealed()?)))
    }

    /// A new host copy of `data`, with a fresh version.
    pub fn new(data: Payload) -> HostCopy {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        HostCopy {
            data,
            version: NEXT.fetch_add(1, Ordering::Relaxed),
        }
    }
}

/// How a request names a region it carries (`cached`: an application's host buffer, which
/// the worker keeps mapped).
fn region_ref(r: &Region, cached: bool) -> RegionRef {
    RegionRef {
        id: r.id(),
        len: r.len() as u64,
        cached,
    }
}

/// The payload's bytes in shared memory: its own region, or a copy in a new one.
fn region_of(p: &Payload) -> Result<Arc<Region>, IpcError> {
    if let Some(r) = p.region().filter(|r| r.has_descriptor()) {
        return Ok(r.clone());
    }
    let mut r = Region::new(p.len())?;
    r.as_mut_slice().copy_from_slice(p.as_bytes());
    Ok(Arc::new(r))
}

impl WorkerClient {
    /// Whether a module with `id` is loaded on the device already (by this worker or an
    /// earlier one: the device's modules outlive its workers).
    fn module_known(&self, id: u64) -> bool {
        self.restored.contains(&id) || lock(&self.link.modules).contains_key(&id)
    }

    /// Checks the ids in a worker's successful answer against what the host knows, and
    /// records them: a module id is the host's key for the module's source (reloaded under it
    /// after a restart), a buffer id names one live allocation; a new one under an id in use
    /// is malformed, never believed over the other's.
    fn check_ids(&mut self, op: &Op, result: &Result<Reply, GpuError>) -> Result<(), IpcError> {
        match (op, result) {
            // A durable buffer's id is the host's own (made again when a standby catches up).
            (Op::Durable { .. }, Ok(_)) => Ok(()),
            (_, Ok(Reply::Module(m))) if self.module_known(m.id) => Err(IpcError::Malformed(format!(
                "a new module with the id {} of a loaded one",
                m.id
            ))),
            (_, Ok(Reply::Module(m))) => {
                self.restored.insert(m.id);
                Ok(())
            }
            (_, Ok(Reply::Buffer(b))) if !self.live_buffers.insert(b.id) => Err(IpcError::Malformed(format!(
                "a new buffer with the id {} of a live one",
                b.id
            ))),
            (Op::Free { buffer }, Ok(_)) => {
                self.live_buffers.remove(&buffer.id);
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// The faults the simulator's plan decides for `op`: its own, or for a task, those of
    /// its ops by index (see [`Request::task_faults`]).
    fn faults(&self, op: &Op, origin: Origin) -> (Option<ipc::WireFault>, Vec<(u32, ipc::WireFault)>) {
        let Some(f) = self.link.faults.as_ref() else {
            return (None, Vec::new());
        };
        match op {
            Op::Task(task) => {
                let inner = task
                    .inner_ops()
                    .enumerate()
                    .filter_map(|(i, (kind, kernel))| {
                        f.decide_for(self.device, kind, kernel, origin)
                            .map(|a| (i as u32, a.into()))
                    })
                    .collect();
                (None, inner)
            }
            op => (f.decide(self.device, op, origin).map(Into::into), Vec::new()),
        }
    }

    /// The answer for ops whose worker died: ids from `first` up to the request the worker
    /// had started may have executed; the rest did not start.
    fn died_under(&mut self, first: u64, count: usize, why: String) -> Vec<Executed> {
        let started = self.control.started();
        let (how, aborted) = self.exit_reason();
        let reason = format!("{how} ({why})");
        (first..first + count as u64)
            .map(|id| Executed::Died {
                may_have_executed: started >= id,
                reason: reason.clone(),
                aborted,
            })
            .collect()
    }
}

impl WorkerClient {
    /// How far the worker batches: the most ops in a batch, and the most
    /// [`WorkerClient::batch_cost`] in a batch.
    pub fn batch_limits(&self) -> (usize, usize) {
        (ipc::MAX_BATCH, ipc::BATCH_INLINE_BYTES)
    }

    /// Ops whose bytes travel inline (not in a region) may be batched; the cost is the
    /// payload bytes each way, plus the launch arguments. `None`: the op cannot travel in a
    /// batch.
    pub fn batch_cost(&self, op: &Op) -> Option<usize> {
        // Ops beyond the limits go alone, to be answered at once (`run`).
        op.check_limits().ok()?;
        let inline = |n: usize| (n <= ipc::INLINE_LIMIT).then_some(n);
        match op {
            Op::CopyToDevice { data, .. } => inline(data.len()),
            Op::CopyFromDevice { len, .. } => inline(*len as usize),
            Op::LoadModule { .. } => None, // rare, and possibly a large image
            Op::Durable { .. } => None,    // rare, and possibly large
            Op::Task(task) => {
                let names: usize = task.launches.iter().map(|l| l.function.len() + 16 * l.args.len()).sum();
                let inputs: usize = task.inputs.iter().map(|i| i.data.len()).sum();
                Some(names + inputs + task.output_bytes() as usize)
            }
            Op::Launch { function, args, .. } => Some(function.len() + 16 * args.len()),
            _ => Some(0),
        }
    }

    /// Runs ops in order in one request, handing `each` the [`Executed`] of every op that
    /// ran — as soon as it is known, in order — with whether it poisoned the worker. The ops
    /// past the last one handed over did not start: all of them ran, or the last one handed
    /// over poisoned the worker. When the worker dies, every op not handed over yet gets an
    /// `Executed::Died` saying whether it may have executed.
    pub fn run_batch(&mut self, ops: Vec<(Op, Origin)>, each: &mut dyn FnMut(Executed, bool)) {
        let first = self.next_id;
        let count = ops.len();
        let requests: Vec<Request> = ops
            .into_iter()
            .map(|(op, origin)| {
                let id = self.next_id;
                self.next_id += 1;
                let (fault, task_faults) = self.faults(&op, origin);
                Request {
                    id,
                    op,
                    origin,
                    fault,
                    task_faults,
                    input: None,
                    output: None,
                    linger_us: 0,
                }
            })
            .collect();
        // Ops handed over so far; the rest are answered by what ends the batch.
        let mut answered = 0usize;
        let died = |w: &mut WorkerClient, each: &mut dyn FnMut(Executed, bool), answered: usize, why: String| {
            for exec in w.died_under(first + answered as u64, count - answered, why) {
                each(exec, false);
            }
        };
        let batch = ToWorker::Batch(requests);
        match self.channel.send(&batch, &[]) {
            Ok(()) => {}
            Err(e @ IpcError::Unsendable(_)) => {
                // Nothing was sent: none of the ops started.
                let ToWorker::Batch(requests) = &batch else {
                    unreachable!("the batch built")
                };
                for request in requests {
                    each(Executed::Done(Err(unsendable(&request.op, self.device, &e))), false);
                }
                return;
            }
            Err(e) => return died(self, each, 0, format!("cannot send to the worker: {e}")),
        }
        loop {
            match self.channel.recv::<FromWorker>() {
                Ok((FromWorker::Batch { results, done }, fds)) => {
                    // The worker's word is checked before it is believed (count, order, ids,
                    // each answer's shape, nothing after a sticky fault).
                    let ToWorker::Batch(requests) = &batch else {
                        unreachable!("the batch sent")
                    };
                    let checked = if fds.is_empty() {
                        ipc::check_batch_frame(requests, answered, &results, done, self.device, self.epoch)
                    } else {
                        Err(IpcError::Malformed(format!("{} descriptors with an answer", fds.len())))
                    };
                    let checked = checked.and_then(|()| {
                        requests[answered..]
                            .iter()
                            .zip(&results)
                            .try_for_each(|(request, (_, r))| self.check_ids(&request.op, r))
                    });
                    if let Err(e) = checked {
                        let _ = self.child.kill();
                        let why = format!("a malformed batch answer from the worker: {e}");
                        return died(self, each, answered, why);
                    }
                    self.malformed = 0;
                    for (_, r) in results {
                        let r = r.map_err(received);
                        answered += 1;
                        let poisoned = matches!(&r, Err(e) if self.poisoned_by(e));
                        each(Executed::Done(r), poisoned);
                    }
                    if done {
                        return; // the ops not answered did not start
                    }
                }
                Ok((FromWorker::Malformed(why), _)) if answered > 0 => {
                    // A worker refuses a batch before it runs any of it: after answers, the
                    // rest may have run. A malformed answer.
                    let _ = self.child.kill();
                    let why = format!("a Malformed answer after {answered} answers to a batch: {why}");
                    return died(self, each, answered, why);
                }
                Ok((FromWorker::Malformed(why), _)) => {
                    // The host sent a batch within the limits, without regions: refused too
                    // often in a row, the worker is broken.
                    self.malformed += 1;
                    if self.malformed >= MALFORMED_IN_A_ROW {
                        let _ = self.child.kill();
                        let why = format!("{} Malformed answers in a row to valid requests: {why}", self.malformed);
                        return died(self, each, 0, why);
                    }
                    let ToWorker::Batch(requests) = &batch else {
                        unreachable!("the batch sent")
                    };
                    for request in &requests[answered..] {
                        let reason = InvalidReason::BadArguments {
                            kernel: String::new(),
                            reason: format!("worker rejected the batch: {why}"),
                        };
                        each(
                            Executed::Done(Err(GpuError::invalid(request.op.kind(), self.device, reason))),
                            false,
                        );
                    }
                    return;
                }
                Ok((other, _)) => {
                    let _ = self.child.kill();
                    let why = format!("unexpected answer to a batch from the worker: {other:?}");
                    return died(self, each, answered, why);
                }
                Err(IpcError::Closed) => {
                    return died(self, each, answered, "the worker's connection closed".into());
                }
                Err(e) => {
                    let _ = self.child.kill();
                    return died(self, each, answered, format!("bad frame from the worker: {e}"));
                }
            }
        }
    }
}

impl WorkerClient {
    /// Runs one op on the worker. `spin`: how long to poll for the answer before blocking
    /// (the worker lingers as long for the next request), for a serial caller whose next op
    /// comes right after this answer.
    pub fn run(&mut self, op: &Op, origin: Origin, spin: Duration) -> Executed {
        // What cannot be carried to the worker is an invalid request, answered before
        // anything is sent: the worker and the device's other users notice nothing.
        // Sizes that can never succeed are invalid requests too, refused before host memory
        // is prepared for them (a failed preparation would read as out of memory, transient).
        if let Err(reason) = op.check_limits().and_then(|()| op.check_sizes()) {
            return Executed::Done(Err(GpuError::invalid(op.kind(), self.device, reason)));
        }
        let id = self.next_id;
        self.next_id += 1;
        let (fault, task_faults) = self.faults(op, origin);
        // Bulk bytes go in shared memory; the op travels without them.
        let mut sent = op.clone();
        let mut regions: Vec<Arc<Region>> = Vec::new();
        // An application's host buffer, which the worker keeps mapped (and pinned): its
        // descriptor goes only with its first use (decided once the request is encoded).
        let mut cached: Option<Arc<Region>> = None;
        let mut input = None;
        let mut output: Option<OutputRegion> = None;
        let prepared: Result<(), IpcError> = (|| {
            match &mut sent {
                Op::Durable { data, .. } if data.len() > ipc::INLINE_LIMIT => {
                    // The host copy itself, sealed: mapped read-only by the worker, once.
                    let r = region_of(data)?;
                    input = Some(region_ref(&r, false));
                    regions.push(r);
                    *data = Payload::default();
                }
                Op::CopyToDevice { data, .. } if data.len() > ipc::INLINE_LIMIT => {
                    // (A sealed region from a worker has no descriptor: copied below.)
                    if let Some(r) = data.region().filter(|r| r.is_writable()) {
                        input = Some(region_ref(r, true));
                        cached = Some(r.clone());
                    } else {
                        let r = region_of(data)?;
                        input = Some(region_ref(&r, false));
                        regions.push(r);
                    }
                    *data = Payload::default();
                }
                Op::LoadModule { source } => {
                    let (s, r) = split_module(source)?;
                    *source = s;
                    if let Some(r) = r {
                        input = Some(RegionRef {
                            id: r.id(),
                            len: r.len() as u64,
                            cached: false,
                        });
                        regions.push(r);
                    }
                }
                Op::CopyFromDevice { len, .. } if *len as usize > ipc::INLINE_LIMIT => {
                    // Sealed against resizing, not mapped here while the worker writes it.
                    output = Some(OutputRegion::new(*len as usize)?);
                }
                _ => {}
            }
            Ok(())
        })();
        if let Err(e) = prepared {
            // Shared memory for the transfer could not be had: the host's failure, transient.
            let what = format!("shared memory for the transfer: {e}");
            return Executed::Done(Err(GpuError::host(op.kind(), self.device, what)));
        }
        let out_ref = output.as_ref().map(|r| RegionRef {
            id: r.id(),
            len: r.len() as u64,
            cached: false,
        });
        let request = Request {
            id,
            op: sent,
            origin,
            fault,
            task_faults,
            input,
            output: out_ref,
            linger_us: spin.as_micros() as u32,
        };
        let frame = match ipc::encode(&ToWorker::Request(request)) {
            Ok(frame) => frame,
            // Nothing was sent (a defence: `check_limits` keeps requests well under a frame).
            Err(e) => return Executed::Done(Err(unsendable(op, self.device, e))),
        };
        let mut fds: Vec<_> = regions.iter().map(|r| r.raw_fd()).collect();
        if let Some(r) = &cached
            && !self.regions.touch(r.id()).0
        {
            fds.push(r.raw_fd());
        }
        fds.extend(output.iter().map(|r| r.raw_fd()));
        let died = |w: &mut WorkerClient, why: String| w.died_under(id, 1, why).pop().expect("one op");
        if let Err(e) = self.channel.send_frame(&frame, &fds) {
            return died(self, format!("cannot send to the worker: {e}"));
        }
        // A serial caller's op: poll for the answer rather than sleep through a wake-up.
        match self.channel.recv_spinning::<FromWorker>(spin) {
            Ok((
                FromWorker::Response {
                    id: got,
                    result,
                    output_len,
                },
                fds,
            )) if got == id => {
                // The worker's word is checked before it is believed: a malformed answer is
                // a broken worker, restarted, and the op is answered as by its death.
                let checked = if fds.is_empty() {
                    let out = output.as_ref().map(OutputRegion::len);
                    ipc::check_answer(op, self.device, self.epoch, out, &result, output_len)
                } else {
                    Err(IpcError::Malformed(format!("{} descriptors with an answer", fds.len())))
                };
                let checked = checked.and_then(|()| self.check_ids(op, &result));
                if let Err(e) = checked {
                    let _ = self.child.kill();
                    return died(self, format!("a malformed answer from the worker: {e}"));
                }
                self.malformed = 0;
                let result = match (result, output, output_len) {
                    (Ok(Reply::Data(_)), Some(region), Some(n)) => {
                        region.into_payload(n).map(Reply::Data).map_err(|e| {
                            GpuError::host(
                                op.kind(),
                                self.device,
                                format!("a mapping of the copy's shared memory: {e}"),
                            )
                        })
                    }
                    (r, _, _) => r.map_err(received),
                };
                Executed::Done(result)
            }
            Ok((FromWorker::Malformed(why), _)) => {
                // The worker did not understand us: a bug on one side. Answer the op and go on;
                // the worker forgot the request's cached region, and so does the host (its
                // descriptor goes again with its next use).
                if let Some(r) = &cached {
                    self.regions.forget(r.id());
                }
                // The host checked the request before sending it: refused too often in a row,
                // the worker is broken, and is restarted.
                self.malformed += 1;
                if self.malformed >= MALFORMED_IN_A_ROW {
                    let _ = self.child.kill();
                    let n = self.malformed;
                    return died(self, format!("{n} Malformed answers in a row to valid requests: {why}"));
                }
                let reason = InvalidReason::BadArguments {
                    kernel: String::new(),
                    reason: format!("worker rejected the request: {why}"),
                };
                Executed::Done(Err(GpuError::invalid(op.kind(), self.device, reason)))
            }
            Ok((other, _)) => {
                let _ = self.child.kill();
                died(self, format!("unexpected message from the worker: {other:?}"))
            }
            Err(IpcError::Closed) => died(self, "the worker's connection closed".into()),
            Err(e) => {
                let _ = self.child.kill();
                died(self, format!("bad frame from the worker: {e}"))
            }
        }
    }

    /// Whether the worker is unusable after `error`.
    pub fn poisoned_by(&self, error: &GpuError) -> bool {
        // A sticky fault poisons the worker's context; only a new process recovers.
        error.class() == ErrorClass::Sticky
    }
}

impl Drop for WorkerClient {
    /// Stops the worker: asks it to exit, then kills it (a poisoned or hung one may not
    /// answer), and reaps it so no zombie is left.
    fn drop(&mut self) {
        let _ = self.channel.send(&ToWorker::Shutdown, &[]);
        let _ = self.child.kill();
        self.forget();
        let _ = self.child.wait();
    }
}

/// Requests to the spawner thread.
type SpawnRequest = (Command, Channel, std::sync::mpsc::Sender<std::io::Result<Child>>);

/// The one long-lived thread that starts every worker: a worker's parent-death signal
/// fires when the thread that spawned it exits, so workers must not be spawned by threads
/// that come and go (executors end at each restart; a standby outlives the executor that
/// asked for it). The thread ends at shutdown, or when the runtime is dropped.
pub struct Spawner {
    tx: Mutex<Option<std::sync::mpsc::Sender<SpawnRequest>>>,
}

impl Spawner {
    /// Starts the spawner thread.
    ///
    /// # Errors
    /// The OS could not start a thread.
    pub fn start() -> std::io::Result<Spawner> {
        let (tx, rx) = std::sync::mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("hipvisor-spawner".into())
            .spawn(move || {
                for (command, channel, reply) in rx {
                    let _ = reply.send(ipc::spawn_worker(command, channel));
                }
            })?;
        Ok(Spawner {
            tx: Mutex::new(Some(tx)),
        })
    }

    /// Ends the spawner thread (shutdown, a dropped runtime): nothing is spawned any more, and
    /// the kernel sends SIGKILL to every worker still alive that it spawned (their
    /// parent-death signal), whoever else still holds the runtime's parts.
    pub fn stop(&self) {
        lock(&self.tx).take();
    }

    /// Starts `command` as a worker with `channel` as its socket.
    pub fn spawn(&self, command: Command, channel: Channel) -> std::io::Result<Child> {
        let (reply, rx) = std::sync::mpsc::channel();
        let gone = || std::io::Error::other("the spawner thread has ended");
        lock(&self.tx)
            .as_ref()
            .ok_or_else(gone)?
            .send((command, channel, reply))
            .map_err(|_| gone())?;
        rx.recv().map_err(|_| gone())?
    }
}
