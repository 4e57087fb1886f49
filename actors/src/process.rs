//! Process isolation, the runtime's side of it: [`WorkerEngine`] is the executor's
//! [`Engine`] over a device's worker process ([`WorkerClient`], which speaks the protocol),
//! with the spin policy applied to each op; [`start_worker`] starts a worker with what the
//! runtime knows (program, start budget, the device's modules); [`prepare_standby`] keeps a
//! warm standby worker ready for a device's next epoch.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use hipvisor_core::sync::lock;
use hipvisor_core::{BackendKind, GpuError, ModuleSource, Op, Origin};

use crate::engine::{Batches, Batching, Engine, Exec};
use crate::shared::Shared;
use hipvisor_core::worker::client::{DeviceLink, Executed, HostCopy, Role, StartError, WorkerClient, WorkerLaunch};

impl From<Executed> for Exec {
    fn from(e: Executed) -> Exec {
        match e {
            Executed::Done(r) => Exec::Done(r),
            Executed::Died {
                may_have_executed,
                reason,
                aborted,
            } => Exec::Died {
                may_have_executed,
                reason,
                aborted,
            },
        }
    }
}

/// Starts and prepares a worker for `device` at `epoch`, reloading `modules`, within
/// `supervisor.worker_start_timeout_ms` (see [`WorkerClient::start`]).
///
/// # Errors
/// [`StartError`]: the spawn failed, the worker answered an error or went away, or it did not
/// finish its start in time.
pub(crate) fn start_worker(
    shared: &Shared,
    device: u32,
    epoch: u64,
    modules: &BTreeMap<u64, ModuleSource>,
    durables: &BTreeMap<u64, HostCopy>,
    role: Role,
) -> Result<WorkerClient, StartError> {
    let config = &shared.config;
    let backend = shared.backend.kind();
    let launch = WorkerLaunch {
        program: &shared.worker_program,
        backend,
        sim: (backend == BackendKind::Sim).then_some(hipvisor_core::ipc::SimHello {
            devices: config.sim.devices,
            memory_bytes: config.sim.memory_bytes,
            flavour: config.sim.flavour,
        }),
        start_timeout: Duration::from_millis(config.supervisor.worker_start_timeout_ms),
        spawner: &shared.spawner,
        workers: &shared.workers,
        closing: &shared.closing,
        spin: shared.spin_for(device),
    };
    let core = &shared.cores[device as usize];
    let link = DeviceLink {
        device,
        worker_pid: core.worker_pid.clone(),
        modules: core.modules.clone(),
        faults: shared.faults.clone(),
    };
    WorkerClient::start(&launch, link, epoch, modules, durables, role)
}

/// A device's worker process, as the executor's engine.
pub(crate) struct WorkerEngine {
    client: WorkerClient,
    shared: Arc<Shared>,
    device: u32,
}

impl WorkerEngine {
    /// The engine over a started worker of `device`.
    pub(crate) fn new(client: WorkerClient, shared: Arc<Shared>, device: u32) -> WorkerEngine {
        WorkerEngine { client, shared, device }
    }
}

impl Engine for WorkerEngine {
    fn batches(&mut self) -> Option<&mut dyn Batches> {
        Some(self)
    }

    fn run(&mut self, op: &Op, origin: Origin) -> Exec {
        // The device's only op in flight: its caller waits for this answer to send the next.
        let spin = self.shared.spin_for(self.device);
        self.client.run(op, origin, spin).into()
    }

    fn poisoned_by(&self, error: &GpuError) -> bool {
        self.client.poisoned_by(error)
    }
}

impl Batches for WorkerEngine {
    fn limits(&self) -> Batching {
        let (ops, bytes) = self.client.batch_limits();
        Batching { ops, bytes }
    }

    fn batch_cost(&self, op: &Op) -> Option<usize> {
        self.client.batch_cost(op)
    }

    fn run_batch(&mut self, ops: Vec<(Op, Origin)>, each: &mut dyn FnMut(Exec, bool)) {
        self.client
            .run_batch(ops, &mut |executed, poisoned| each(executed.into(), poisoned));
    }
}

/// Brings `device`'s standby worker up to date with the device's durable buffers (and
/// modules) in the background, after they changed: a standby holds them before it is
/// needed, so a takeover restores nothing. One refresher per device at a time; changes
/// while it runs make it run once more. A standby that cannot hold them (out of memory on
/// the GPU next to the active context's copies) is dropped and says so: the next restart
/// starts cold.
pub(crate) fn refresh_standby(shared: &Arc<Shared>, device: u32) {
    if shared.config.runtime.isolation != hipvisor_core::config::Isolation::Process || !shared.config.supervisor.standby
    {
        return;
    }
    let core = &shared.cores[device as usize];
    if !core.standby_refresh.ask() {
        return;
    }
    let refresher = shared.clone();
    let spawned = std::thread::Builder::new()
        .name(format!("hipvisor-refresh{device}"))
        .spawn(move || {
            let shared = refresher;
            let core = &shared.cores[device as usize];
            loop {
                core.standby_refresh.claim();
                if shared.closing.load(Ordering::Acquire) {
                    core.standby_refresh.abandon();
                    return;
                }
                let mut standby = lock(&core.standby);
                if let Some(w) = standby.as_mut() {
                    let modules = lock(&core.modules).clone();
                    let durables = lock(&core.durables).clone();
                    if let Err(e) = w.catch_up(&modules, &durables) {
                        standby_short(&shared, device, &e, &durables);
                        *standby = None;
                    }
                }
                drop(standby);
                if core.standby_refresh.done() {
                    return;
                }
            }
        });
    if spawned.is_err() {
        // No refresher: the next change starts one (and a takeover catches up anyway).
        core.standby_refresh.abandon();
    }
}

/// A standby that could not be prepared or brought up to date: logged (and counted when it
/// could not hold the durable buffers).
fn standby_short(shared: &Shared, device: u32, e: &StartError, durables: &BTreeMap<u64, HostCopy>) {
    if matches!(e, StartError::Restore(_)) {
        let bytes: u64 = durables.values().map(|c| c.data.len() as u64).sum();
        tracing::warn!(
            device,
            error = %e,
            durable_bytes = bytes,
            "a standby worker cannot hold the device's durable buffers (it would need them on the GPU next to the \
             active context's): the next restart starts cold"
        );
        shared.metrics_event(crate::metrics::MetricsEvent::StandbyShort { device, bytes });
    } else {
        tracing::warn!(device, error = %e, "could not prepare a standby worker");
    }
}

/// Prepares a warm standby worker for `device`'s next epoch in the background: its
/// context open, its modules loaded, its health probed. A restart takes it over
/// (milliseconds) instead of starting a worker cold.
pub(crate) fn prepare_standby(shared: &Arc<Shared>, device: u32, epoch: u64) {
    let shared = shared.clone();
    let spawned = std::thread::Builder::new()
        .name(format!("hipvisor-standby{device}"))
        .spawn(move || {
            let core = &shared.cores[device as usize];
            let modules = lock(&core.modules).clone();
            let durables = lock(&core.durables).clone();
            match start_worker(&shared, device, epoch, &modules, &durables, Role::Standby) {
                Ok(w) => {
                    // `closing` is read under the standby's lock, which shutdown (and a
                    // dropped runtime) takes after setting it: a standby ready too late is
                    // stopped here, never left behind.
                    let mut standby = lock(&core.standby);
                    if !shared.closing.load(Ordering::Acquire) {
                        *standby = Some(w);
                        drop(standby);
                        // What changed while it started (its snapshot was taken before).
                        refresh_standby(&shared, device);
                    }
                }
                Err(_) if shared.closing.load(Ordering::Acquire) => {}
                Err(e) => standby_short(&shared, device, &e, &durables),
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(device, error = %e, "could not start a thread for a standby worker");
    }
}
