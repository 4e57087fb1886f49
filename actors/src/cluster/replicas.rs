//! Replicas and tasks across a cluster: durable buffers and modules on every device of every
//! live node — given to a node's devices again when it comes back as a new process — and
//! tasks placed on the least-loaded device that holds what they name, run again elsewhere
//! when their node is lost under them.
//!
//! A cluster replica names no device: its `ReplicatedBuffer` and `ReplicatedModule` list the
//! one pseudo-device [`CLUSTER_DEVICE`], and this application keeps, per device seen, which
//! replicas it holds (and the id its node gave each module). A task is bound once to
//! `CLUSTER_DEVICE` and then, for the device it goes to, given that device's index and
//! module ids. The application keeps each replica's bytes (and each module's source) so
//! that a node seen later gets them too.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use hipvisor_core::sync::lock;
use ractor::ActorRef;

use hipvisor_core::task::{ReplicatedBuffer, ReplicatedModule, Task};
use hipvisor_core::{BufferHandle, InvalidReason, ModuleHandle, ModuleSource, Op, OpKind, Payload, TaskOp};

use super::remote::RemoteDevice;
use super::state::{Inner, Known, Replica, counts_of};
use super::wire::{Description, PEER_DURABLE_BASE, RemoteDeviceMsg};
use crate::error::RuntimeError;
use crate::state::DeviceState;

/// How long after a failed provisioning a device is tried again.
const PROVISION_PAUSE: std::time::Duration = std::time::Duration::from_secs(5);

/// The pseudo-device of every cluster replica (see the module docs).
pub const CLUSTER_DEVICE: u32 = u32::MAX;

impl Inner {
    /// A device described by its server, seen for the first time or again: its slot. A
    /// node seen for the first time has its counts taken first (before any request of this
    /// application can reach it).
    /// A device seen for the first time is given the cluster's replicas and modules, in
    /// the background (tasks go to it once it holds what they name).
    pub(super) async fn see(self: &Arc<Self>, actor: ActorRef<RemoteDeviceMsg>, d: &Description) -> u32 {
        // Every device of a node waits for the node's baseline: none of this application's
        // requests reaches the node before it.
        let baseline = lock(&self.baseline).entry(d.node.clone()).or_default().clone();
        baseline.get_or_init(|| counts_of(&actor)).await;
        let (slot, _) = self.learn(actor, d);
        // A device that lacks something — new, back, ready again, or whose last try failed
        // (retried after a pause) — is given it, unless that is under way.
        let due = {
            let known = lock(&self.known);
            let k = &known[slot as usize];
            (d.state == DeviceState::Ready && std::time::Instant::now() >= k.retry_at && self.lacks(k))
                .then(|| k.provisioning.clone().try_lock_owned().ok())
                .flatten()
        };
        if let Some(one_at_a_time) = due {
            let inner = self.clone();
            tokio::spawn(async move {
                let _held = one_at_a_time;
                let _ = inner.provision_now(slot).await;
            });
        }
        slot
    }

    /// Whether a device lacks a replica or module of the cluster's.
    fn lacks(&self, k: &super::state::Known) -> bool {
        lock(&self.replicas).iter().any(|r| !k.held.contains(&r.id))
            || lock(&self.modules).iter().any(|(vid, _)| !k.modules.contains_key(vid))
    }

    /// Gives device `slot` every replica and module it lacks (one provisioning of a device
    /// at a time); the first error.
    pub(super) async fn provision(self: &Arc<Self>, slot: u32) -> Result<(), RuntimeError> {
        let one_at_a_time = lock(&self.known)[slot as usize].provisioning.clone();
        let _held = one_at_a_time.lock().await;
        self.provision_now(slot).await
    }

    /// [`Inner::provision`], its device's turn held. A replica freed (or given up) while it
    /// was being made is freed again at once.
    async fn provision_now(self: &Arc<Self>, slot: u32) -> Result<(), RuntimeError> {
        let Some(device) = self.device(slot) else {
            return Ok(()); // its node is lost: nothing to give it
        };
        let mut first = Ok(());
        let replicas: Vec<Replica> = lock(&self.replicas).clone();
        for r in replicas {
            if self.holds(slot, r.id) {
                continue;
            }
            match device.durable_with_id(r.id, r.data).await {
                Ok(handle) => {
                    let wanted = lock(&self.replicas).iter().any(|w| w.id == r.id);
                    if wanted {
                        lock(&self.known)[slot as usize].held.insert(r.id);
                    } else {
                        let _ = device.free(handle).await;
                    }
                }
                Err(e) => {
                    tracing::warn!(node = device.node(), device = device.index(), error = %e, "a replica could not be made");
                    first = first.and(Err(e));
                }
            }
        }
        let modules: Vec<(u64, ModuleSource)> = lock(&self.modules).clone();
        for (vid, source) in modules {
            if lock(&self.known)[slot as usize].modules.contains_key(&vid) {
                continue;
            }
            match device.load_module(source).await {
                // (Loaded on another device of its node — this one lost meanwhile — is not
                // this device's.)
                Ok(m) if m.device == device.index() => {
                    lock(&self.known)[slot as usize].modules.insert(vid, m.id);
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(node = device.node(), device = device.index(), error = %e, "a module could not be loaded");
                    first = first.and(Err(e));
                }
            }
        }
        if first.is_err() {
            lock(&self.known)[slot as usize].retry_at = std::time::Instant::now() + PROVISION_PAUSE;
        }
        first
    }

    /// Whether device `slot` holds replica `id`.
    pub(super) fn holds(&self, slot: u32, id: u64) -> bool {
        lock(&self.known)
            .get(slot as usize)
            .is_some_and(|k| k.held.contains(&id))
    }

    /// Whether device `slot` holds every replica and module `task` names (what
    /// [`localize`](Self::localize) needs, without making the task).
    fn can_run(&self, task: &TaskOp, slot: u32) -> bool {
        lock(&self.known).get(slot as usize).is_some_and(|k| holds_all(k, task))
    }

    /// `task` (bound to [`CLUSTER_DEVICE`]) for device `slot`: its index, its modules' ids;
    /// `None` when the device lacks a replica or module it names.
    pub(super) fn localize(&self, task: &TaskOp, slot: u32) -> Option<TaskOp> {
        let known = lock(&self.known);
        let k = known.get(slot as usize).filter(|k| holds_all(k, task))?;
        let mut op = task.clone();
        for l in &mut op.launches {
            l.module.id = *k.modules.get(&l.module.id)?;
        }
        op.retarget(k.index);
        op.source = None;
        Some(op)
    }
}

/// Whether the device `k` describes holds every replica and module `task` names.
fn holds_all(k: &Known, task: &TaskOp) -> bool {
    task.durable_buffers().all(|b| k.held.contains(&b.id))
        && task.launches.iter().all(|l| k.modules.contains_key(&l.module.id))
}

/// `task` bound to [`CLUSTER_DEVICE`].
fn bind(task: &Task) -> Result<TaskOp, RuntimeError> {
    Arc::new(task.clone()).bind(CLUSTER_DEVICE).map_err(|_| {
        let reason = InvalidReason::BadTask {
            reason: "it names a durable buffer or module that is not a cluster replica (Cluster::replicate, \
                     Cluster::replicate_module)"
                .into(),
        };
        RuntimeError::Gpu(hipvisor_core::GpuError::invalid(OpKind::Task, CLUSTER_DEVICE, reason))
    })
}

impl Inner {
    /// See `Cluster::replicate`.
    pub(super) async fn replicate(
        self: &Arc<Self>,
        data: impl Into<Payload>,
    ) -> Result<ReplicatedBuffer, RuntimeError> {
        let data = data.into();
        let len = data.len() as u64;
        let id = PEER_DURABLE_BASE + rand::random::<u64>() % (1 << 61);
        lock(&self.replicas).push(Replica { id, data });
        let first = self.provision_all_within(OpKind::Durable).await;
        if !self.live().iter().any(|d| self.holds(d.slot, id)) {
            lock(&self.replicas).retain(|r| r.id != id);
            return Err(first.err().unwrap_or(RuntimeError::NoReadyDevice));
        }
        Ok(ReplicatedBuffer::new(id, len, vec![CLUSTER_DEVICE]))
    }

    /// See `Cluster::replicate_module`.
    pub(super) async fn replicate_module(
        self: &Arc<Self>,
        source: ModuleSource,
    ) -> Result<ReplicatedModule, RuntimeError> {
        let vid = self.next_module.fetch_add(1, Ordering::Relaxed);
        lock(&self.modules).push((vid, source));
        let first = self.provision_all_within(OpKind::LoadModule).await;
        let loaded = self
            .live()
            .iter()
            .any(|d| lock(&self.known)[d.slot as usize].modules.contains_key(&vid));
        if !loaded {
            lock(&self.modules).retain(|(v, _)| *v != vid);
            return Err(first.err().unwrap_or(RuntimeError::NoReadyDevice));
        }
        Ok(ReplicatedModule::new(vec![ModuleHandle {
            device: CLUSTER_DEVICE,
            id: vid,
        }]))
    }

    /// See `Cluster::free`.
    pub(super) async fn free(self: &Arc<Self>, replica: &ReplicatedBuffer) -> Result<(), RuntimeError> {
        lock(&self.replicas).retain(|r| r.id != replica.id());
        let mut first = Ok(());
        for d in self.live() {
            if let Some(handle) = d.replica(replica) {
                first = first.and(d.free(handle).await);
                lock(&self.known)[d.slot as usize].held.remove(&replica.id());
            }
        }
        first
    }

    /// [`Inner::provision_all`] within one deadline (what is still under way then goes on in
    /// the background): the first error.
    async fn provision_all_within(self: &Arc<Self>, op: OpKind) -> Result<(), RuntimeError> {
        let inner = self.clone();
        let all = tokio::spawn(async move { inner.provision_all().await });
        match tokio::time::timeout(self.deadline, all).await {
            Ok(Ok(first)) => first,
            Ok(Err(_)) => Err(RuntimeError::ShuttingDown),
            Err(_) => Err(RuntimeError::DeadlineExceeded {
                device: CLUSTER_DEVICE,
                op,
                deadline_ms: self.deadline.as_millis() as u64,
                may_have_executed: true,
            }),
        }
    }

    /// Provisions every live device that is ready or restarting, at once: the first error.
    async fn provision_all(self: &Arc<Self>) -> Result<(), RuntimeError> {
        let mut running = tokio::task::JoinSet::new();
        for d in self.live() {
            if matches!(self.load(d.slot).0, DeviceState::Ready | DeviceState::Restarting) {
                let inner = self.clone();
                running.spawn(async move { inner.provision(d.slot).await });
            }
        }
        let mut first = Ok(());
        while let Some(done) = running.join_next().await {
            if let Ok(result) = done {
                first = first.and(result);
            }
        }
        first
    }

    /// See `Cluster::run`.
    pub(super) async fn run(self: &Arc<Self>, task: &Task) -> Result<Vec<Payload>, RuntimeError> {
        let bound = bind(task)?;
        let until = std::time::Instant::now() + self.deadline;
        let mut tried: Vec<u32> = Vec::new();
        let mut reruns = 0;
        let mut next = self.place(&bound, &tried);
        loop {
            let Some((device, op)) = next.take() else {
                return Err(RuntimeError::NoReadyDevice);
            };
            match device.call_task(op, until).await {
                // (A task that never reached its node runs elsewhere, replayable or not.)
                Err(e)
                    if (bound.replayable()
                        || matches!(
                            e,
                            RuntimeError::NodeLost {
                                may_have_executed: false,
                                ..
                            }
                        ))
                        && rerunnable(&e)
                        && reruns < self.task_reruns
                        && std::time::Instant::now() < until =>
                {
                    tracing::debug!(node = device.node(), device = device.index(), error = %e, "task run again elsewhere");
                    tried.push(device.slot);
                    next = self.place(&bound, &tried);
                    // Nowhere else to go: the error it got.
                    if next.is_none() {
                        return Err(e);
                    }
                    reruns += 1;
                    self.reruns.fetch_add(1, Ordering::Relaxed);
                }
                answered => return answered,
            }
        }
    }

    /// Where a task goes: the least-loaded ready device (else a restarting one) of a live
    /// node that holds what it names, not in `tried`; the task for that device.
    fn place(self: &Arc<Self>, task: &TaskOp, tried: &[u32]) -> Option<(RemoteDevice, TaskOp)> {
        let mut skip = tried.to_vec();
        loop {
            let device = self.least_loaded(|slot| !skip.contains(&slot) && self.can_run(task, slot))?;
            // (What a device holds can change between the two looks: the next one, then.)
            match self.localize(task, device.slot) {
                Some(op) => return Some((device, op)),
                None => skip.push(device.slot),
            }
        }
    }
}

impl RemoteDevice {
    /// Runs a task on this device (its replicas and modules: the cluster's, see
    /// `Cluster::replicate`), answered with its outputs. Its node reruns it on this device
    /// after a restart; it does not move it to another device (`Cluster::run` does, across
    /// nodes).
    ///
    /// # Errors
    /// The task's typed error: `BadTask` when this device lacks a replica it names;
    /// `NodeLost`, `Remote`.
    pub async fn run(&self, task: &Task) -> Result<Vec<Payload>, RuntimeError> {
        let bound = bind(task)?;
        let op = self.inner.localize(&bound, self.slot).ok_or_else(|| {
            let reason = InvalidReason::BadTask {
                reason: format!(
                    "a durable buffer or module it names has no replica on device {} of {}",
                    self.device, self.node
                ),
            };
            RuntimeError::Gpu(hipvisor_core::GpuError::invalid(OpKind::Task, self.device, reason))
        })?;
        self.call_task(op, std::time::Instant::now() + self.inner.deadline)
            .await
    }

    /// A task already for this device, answered by `until` (its first run's deadline).
    async fn call_task(&self, op: TaskOp, until: std::time::Instant) -> Result<Vec<Payload>, RuntimeError> {
        crate::handle::expect_reply!(
            self.call(super::wire::Call::Op(Op::Task(Box::new(op))), until).await,
            hipvisor_core::Reply::Outputs(o) => o
        )
    }

    /// The handle of a cluster replica (`Cluster::replicate`) on this device, if it holds
    /// one.
    pub fn replica(&self, buffer: &ReplicatedBuffer) -> Option<BufferHandle> {
        let on = buffer.on(CLUSTER_DEVICE)?;
        self.inner.holds(self.slot, buffer.id()).then_some(BufferHandle {
            device: self.device,
            ..on
        })
    }
}

/// Whether a replayable task that got `e` may run on another device: it did not run to an
/// answer where it was (its node or device went away or would not take it).
fn rerunnable(e: &RuntimeError) -> bool {
    matches!(
        e,
        RuntimeError::NodeLost { .. }
            | RuntimeError::DeviceLost { .. }
            | RuntimeError::DeviceFailed { .. }
            | RuntimeError::DeviceRestarted { .. }
            | RuntimeError::CircuitOpen { .. }
            | RuntimeError::Busy { .. }
            | RuntimeError::NoReadyDevice
            | RuntimeError::ShuttingDown
    )
}
