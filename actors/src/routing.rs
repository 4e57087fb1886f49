//! Routing and admission: which device an op goes to (its own, another ready one when its
//! device is lost and the op may move, or none: an immediate typed error), whether it is
//! admitted there (quarantined kernels, the circuit breaker, the in-flight bound), and what
//! happens to the ops queued for a device whose state changes (moved, answered, or kept).
//!
//! Every path here is on the hot path or next to it: an admitted op costs a route (two
//! atomic loads), a permit, and — while the breaker is closed — no lock but, for a launch,
//! a read of the device's quarantine list.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use hipvisor_core::sync::lock;
use hipvisor_core::{CircuitBreaker, MemInfo, Op, Origin, Reply, TaskOp};

use crate::device::DeviceCore;
use crate::error::{OpResult, RuntimeError};
use crate::job::Job;
use crate::metrics::MetricsEvent;
use crate::reply::{BatchSink, Port};
use crate::shared::Shared;
use crate::state::{DeviceState, DeviceStateChange};

/// Admission: quarantine and the circuit breaker.
impl Shared {
    /// The breaker of `core`, locked, with the successes counted without the lock applied;
    /// `f`'s transition is reported and the closed flag refreshed.
    fn with_breaker<R>(
        &self,
        core: &DeviceCore,
        f: impl FnOnce(&mut CircuitBreaker, Instant) -> (R, Option<hipvisor_core::breaker::Transition>),
    ) -> Option<R> {
        let breaker = core.breaker.as_ref()?;
        let now = Instant::now();
        let (r, transitions) = {
            let mut b = lock(breaker);
            // Its own step, so that an answer that comes after the open time reports the
            // half-open transition as well as its own.
            let expired = b.expire(now);
            let pending = core.breaker_successes.swap(0, Ordering::AcqRel);
            let earlier = b.record_successes(pending, now);
            let (r, t) = f(&mut b, now);
            core.breaker_closed
                .store(b.state(now) == hipvisor_core::BreakerState::Closed, Ordering::Release);
            (r, [expired, earlier, t])
        };
        for t in transitions.into_iter().flatten() {
            self.metrics_event(MetricsEvent::Breaker {
                device: core.index,
                state: t.to,
            });
        }
        Some(r)
    }

    /// Admission of an application op on `core`: quarantine and breaker.
    pub(crate) fn admit(&self, core: &DeviceCore, op: &Op) -> Result<(), RuntimeError> {
        if let Some(e) = self.quarantined(core, op) {
            return Err(e);
        }
        if core.breaker.is_none() || core.breaker_closed.load(Ordering::Acquire) {
            // A closed breaker admits everything, with no other effect.
            return Ok(());
        }
        let Some(admission) = self.with_breaker(core, |b, now| b.admit(now)) else {
            return Ok(());
        };
        match admission {
            hipvisor_core::Admission::Allowed | hipvisor_core::Admission::Probe => Ok(()),
            hipvisor_core::Admission::Rejected { retry_after } => Err(RuntimeError::CircuitOpen {
                device: core.index,
                retry_after_ms: retry_after.as_millis() as u64,
            }),
        }
    }

    /// Records the result of an application op on `core` in its breaker. A success while
    /// it is closed is only counted (the hot path takes no lock); the count joins the window
    /// at the next locked operation, before anything else is recorded.
    pub(crate) fn breaker_result(&self, core: &DeviceCore, ok: bool) {
        if core.breaker.is_none() {
            return;
        }
        if ok && core.breaker_closed.load(Ordering::Acquire) {
            core.breaker_successes.fetch_add(1, Ordering::AcqRel);
            return;
        }
        self.with_breaker(core, |b, now| {
            let t = if ok {
                b.record_success(now)
            } else {
                b.record_failure(now)
            };
            ((), t)
        });
    }
}

/// Routing: where ops go, and what a state change does to a device's queue.
impl Shared {
    /// Changes a device's state, telling subscribers and the metrics actor.
    pub(crate) fn set_state(&self, device: u32, to: DeviceState, reason: Option<String>) {
        let core = &self.cores[device as usize];
        *lock(&core.reason) = reason.clone();
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
            DeviceState::Ready => {}
            // Tasks waiting for a device that restarts (a backoff, a new worker) run on a
            // ready device holding what they name instead; the rest waits for it. (Only once
            // tasks exist: a runtime without them keeps its queues untouched.)
            DeviceState::Restarting if self.recovery.tasks_seen() => {
                let (jobs, other) = core.queue.take();
                let stay: Vec<Job> = jobs
                    .into_iter()
                    .filter(|j| !j.slot.is_answered())
                    .filter_map(|j| self.move_task(j))
                    .collect();
                core.queue.put_back(stay, other);
                self.queued(device);
            }
            DeviceState::Restarting => {}
            DeviceState::Failed => {
                let (jobs, other) = core.queue.take();
                for job in jobs {
                    self.answer_or_rerun(job, core.failed_error(false), false);
                }
                core.queue.put_back([], other);
            }
            DeviceState::Lost => {
                let (jobs, other) = core.queue.take();
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
                core.queue.put_back(stay, other);
                self.queued(device);
            }
        }
    }

    /// Queues a job again on the priority lane of its device (it was taken but did not run:
    /// see [`JobQueue::requeue`](crate::queue::JobQueue::requeue)); answered at once if the device is out of service by now,
    /// or the runtime is closing.
    pub(crate) fn requeue(&self, job: Job) {
        let device = job.device;
        let core = &self.cores[device as usize];
        // A task put back while its device restarts runs on a ready one if it can.
        let job = match core.state.get() {
            DeviceState::Restarting if matches!(job.op, Op::Task(_)) => match self.move_task(job) {
                None => return,
                Some(job) => job,
            },
            _ => job,
        };
        core.queue.requeue(job);
        // After the job is in: a drain that ran before it cannot have taken it, so look again.
        // (A drain racing with this is caught by the watchdog's next look.)
        if matches!(core.state.get(), DeviceState::Failed | DeviceState::Lost) {
            self.settle_dead_queue(device);
        }
        self.queued(device);
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
        if matches!(op, Op::Task(_)) {
            self.recovery.saw_task();
        }
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
            self.cores[job.device as usize].queue.enqueue(job);
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
            // A task sent to a device that is out of service by now runs elsewhere if it can.
            // (It did not run: a move, not a rerun.)
            Some(core)
                if matches!(op, Op::Task(_))
                    && matches!(e, RuntimeError::DeviceLost { .. } | RuntimeError::DeviceFailed { .. }) =>
            {
                core.requests.fetch_add(1, Ordering::Relaxed);
                let job = core.job(op, Origin::Application, reply, None);
                if let Some(job) = self.move_task(job) {
                    job.answer(Err(e), &core.counters);
                }
            }
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
        match self.admit(core, &op) {
            Err(e) => {
                let job = core.job(op, Origin::Application, reply, None);
                // A task refused by an open breaker runs on another device if it can.
                if matches!(e, RuntimeError::CircuitOpen { .. }) {
                    self.answer_or_rerun(job, e, false);
                } else {
                    job.answer(Err(e), &core.counters);
                }
            }
            Ok(()) => {
                core.requests.fetch_add(1, Ordering::Relaxed);
                let job = core.job(op, Origin::Application, reply, Some(permit));
                match hold {
                    Some(held) => held.push(job),
                    None => {
                        core.queue.enqueue(job);
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
                self.answer_or_rerun(job, e, false);
            }
            DeviceState::Lost => match Self::movable(&job.op)
                .then(|| self.least_loaded(Some(job.device)))
                .flatten()
            {
                Some(other) => {
                    job.device = other;
                    let to = &self.cores[other as usize];
                    job.slot.retarget(to.counters.clone());
                    to.queue.enqueue_again(job);
                    if matches!(to.state.get(), DeviceState::Failed | DeviceState::Lost) {
                        self.settle_dead_queue(other);
                    }
                    self.queued(other);
                }
                None => self.answer_or_rerun(job, core.lost_error(), false),
            },
            DeviceState::Ready | DeviceState::Restarting => {
                let device = job.device;
                core.queue.enqueue_again(job);
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
        core.queue.enqueue(core.job(op, Origin::Runtime, tx.into(), None));
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
}

/// Tasks: where one runs, and what becomes of one whose device failed it.
impl Shared {
    /// The answer for an op an application may not submit itself: a durable buffer's
    /// creation, whose id and host copy are the runtime's (`DeviceHandle::durable`).
    pub(crate) fn reserved(device: u32, op: &Op) -> Option<RuntimeError> {
        let Op::Durable { id, .. } = op else { return None };
        let reason = hipvisor_core::InvalidReason::BadDurable {
            reason: format!(
                "durable buffer {id}: durable buffers are made by DeviceHandle::durable and Runtime::replicate, not \
                 by a submitted op"
            ),
        };
        Some(RuntimeError::Gpu(hipvisor_core::GpuError::invalid(
            hipvisor_core::OpKind::Durable,
            device,
            reason,
        )))
    }

    /// The answer for an op refused by quarantine: a quarantined kernel of `core` (launched
    /// alone or in a task), or a quarantined task.
    pub(crate) fn quarantined(&self, core: &DeviceCore, op: &Op) -> Option<RuntimeError> {
        core.is_quarantined(op).or_else(|| self.task_quarantined(op))
    }

    /// The answer for a task that is quarantined, if `op` is one.
    fn task_quarantined(&self, op: &Op) -> Option<RuntimeError> {
        let Op::Task(task) = op else { return None };
        if !self.recovery.any_quarantined() {
            return None;
        }
        let fingerprint = task.fingerprint();
        self.recovery
            .is_quarantined(fingerprint)
            .then_some(RuntimeError::TaskQuarantined { fingerprint })
    }

    /// Where a task runs: the least-loaded ready device whose breaker is not open and that
    /// holds every durable buffer and module it names — or, when none is, `fallback` if
    /// that device is restarting (its queue waits for the new context). The task comes
    /// bound to the device.
    pub(crate) fn task_target(&self, task: &TaskOp, fallback: Option<u32>) -> Option<(u32, TaskOp)> {
        let bind = |d: u32| -> Option<TaskOp> {
            let bound = match &task.source {
                Some(source) => source.clone().bind_to(d)?,
                // Bound by hand to one device: it runs there or nowhere.
                None => (Some(d) == fallback).then(|| task.clone())?,
            };
            // A replica freed since it was made is not there any more.
            let present = {
                let durables = lock(&self.cores[d as usize].durables);
                bound.durable_buffers().all(|b| durables.contains_key(&b.id))
            };
            present.then_some(bound)
        };
        let mut ready: Vec<&Arc<DeviceCore>> = self
            .cores
            .iter()
            .filter(|c| c.state.get() == DeviceState::Ready && c.breaker_state() != hipvisor_core::BreakerState::Open)
            .collect();
        ready.sort_by_key(|c| c.in_flight());
        if let Some(found) = ready.into_iter().find_map(|c| bind(c.index).map(|t| (c.index, t))) {
            return Some(found);
        }
        let d = fallback?;
        (self.cores.get(d as usize)?.state.get() == DeviceState::Restarting)
            .then(|| bind(d).map(|t| (d, t)))
            .flatten()
    }

    /// Moves a task that has not run to a ready device holding what it names (not a rerun:
    /// it did not run); gives back what cannot move.
    fn move_task(&self, mut job: Job) -> Option<Job> {
        let Op::Task(task) = &job.op else { return Some(job) };
        if job.origin != Origin::Application || !task.replayable() {
            return Some(job);
        }
        let Some((device, bound)) = self.task_target(task, None).filter(|(d, _)| *d != job.device) else {
            return Some(job);
        };
        job.op = Op::Task(Box::new(bound));
        self.relocate(&mut job, device);
        let core = &self.cores[device as usize];
        core.queue.enqueue_again(job);
        self.queued(device);
        None
    }

    /// Points a job at another device: its counters and, when one is free, an in-flight slot
    /// there (else it keeps the one it holds: one slot somewhere until it is answered).
    fn relocate(&self, job: &mut Job, device: u32) {
        if device == job.device {
            return;
        }
        job.device = device;
        let to = &self.cores[device as usize];
        job.slot.retarget(to.counters.clone());
        if let Ok(permit) = to.permits.clone().try_acquire_owned() {
            job._permit = Some(permit);
        }
    }

    /// Answers a job with `error` — unless it is a replayable task that its device failed
    /// (restart, death, sticky fault, lost, failed or refusing device): then the whole task
    /// runs again ([`Shared::task_target`]), within its deadline and `retry.task_reruns`. A
    /// task that `faulted` (a sticky fault of its own, or its worker aborted by a GPU fault
    /// while it ran) counts towards its quarantine, and is answered `TaskQuarantined` once
    /// it faulted in `supervisor.quarantine_after` of its runs.
    pub(crate) fn answer_or_rerun(&self, mut job: Job, error: RuntimeError, faulted: bool) {
        if job.slot.is_answered() {
            return; // answered meanwhile (its deadline, shutdown): nothing to run again
        }
        let counters = self.cores[job.device as usize].counters.clone();
        let Op::Task(task) = &job.op else {
            job.answer(Err(error), &counters);
            return;
        };
        if faulted && job.origin == Origin::Application {
            let fingerprint = task.fingerprint();
            if self.recovery.task_faulted(&self.config.supervisor, fingerprint) {
                tracing::warn!(device = job.device, fingerprint, error = %error, "task quarantined: a poison request");
                self.metrics_event(MetricsEvent::TaskQuarantined);
                job.answer(Err(RuntimeError::TaskQuarantined { fingerprint }), &counters);
                return;
            }
        }
        let may_rerun = job.origin == Origin::Application
            && task.replayable()
            && job.reruns < self.config.retry.task_reruns
            && Instant::now() < job.deadline
            && !self.closing.load(Ordering::Acquire);
        let target = may_rerun.then(|| self.task_target(task, Some(job.device))).flatten();
        let Some((device, bound)) = target else {
            job.answer(Err(error), &counters);
            return;
        };
        tracing::debug!(from = job.device, to = device, error = %error, "task rerun");
        self.metrics_event(MetricsEvent::TaskRerun { device: job.device });
        job.op = Op::Task(Box::new(bound));
        job.reruns += 1;
        job.backoff = None;
        self.relocate(&mut job, device);
        let core = &self.cores[device as usize];
        core.queue.enqueue_again(job);
        if matches!(core.state.get(), DeviceState::Failed | DeviceState::Lost) {
            self.settle_dead_queue(device);
        }
        self.queued(device);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::Work;
    use crate::shared::testing::shared;
    use hipvisor_core::{ModuleHandle, OpKind};
    use tokio::sync::oneshot;

    fn port() -> (Port, oneshot::Receiver<OpResult>) {
        let (tx, rx) = oneshot::channel::<OpResult>();
        (tx.into(), rx)
    }

    /// The jobs queued on a device, in the order its executor takes them.
    fn queued(shared: &Shared, device: u32) -> Vec<(OpKind, Origin)> {
        let (jobs, other) = shared.cores[device as usize].queue.take();
        let seen = jobs.iter().map(|j| (j.kind(), j.origin)).collect();
        shared.cores[device as usize].queue.put_back(jobs, other);
        seen
    }

    fn launch() -> Op {
        Op::Launch {
            module: ModuleHandle { device: 0, id: 7 },
            function: "bad".into(),
            grid: hipvisor_core::Dim3::x(1),
            block: hipvisor_core::Dim3::x(1),
            shared_mem_bytes: 0,
            args: Vec::new(),
        }
    }

    #[tokio::test]
    async fn an_answer_after_the_open_time_reports_the_half_open_transition_too() {
        let s = shared(1, |c| {
            c.breaker.enabled = true;
            c.breaker.consecutive_failures = 1;
            c.breaker.open_ms = 1;
        })
        .await;
        let core = &s.cores[0];
        s.breaker_result(core, false);
        // Until its open time is up, as the breaker reads its clock (without moving it).
        let breaker = core.breaker.as_ref().unwrap();
        let give_up = Instant::now() + std::time::Duration::from_secs(10);
        while lock(breaker).state(Instant::now()) != hipvisor_core::BreakerState::HalfOpen {
            assert!(Instant::now() < give_up, "the breaker's open time never ended");
            tokio::task::yield_now().await;
        }
        // The answer of a call admitted before it opened, first to come after the open time:
        // half-open, then open again.
        s.breaker_result(core, false);
        let snap = s.snapshot().await.unwrap();
        assert_eq!(snap.breaker_transitions, 3, "closed→open→half_open→open");
        assert_eq!(snap.devices[0].breaker, hipvisor_core::BreakerState::Open);
    }

    #[tokio::test]
    async fn an_op_for_a_ready_device_is_admitted_and_queued_there() {
        let s = shared(2, |_| {}).await;
        let (p, mut rx) = port();
        assert!(s.submit_now(1, Op::MemInfo, p, true, None).is_none());
        assert_eq!(queued(&s, 1), vec![(OpKind::MemInfo, Origin::Application)]);
        assert!(queued(&s, 0).is_empty());
        assert_eq!(s.cores[1].in_flight(), 1, "holds an in-flight slot");
        assert!(rx.try_recv().is_err(), "not answered");
    }

    #[tokio::test]
    async fn an_op_for_a_device_out_of_range_or_a_failed_one_or_a_closing_runtime_is_answered_at_once() {
        let s = shared(2, |_| {}).await;
        let (p, mut rx) = port();
        assert!(s.submit_now(5, Op::MemInfo, p, true, None).is_none());
        assert!(matches!(
            rx.try_recv(),
            Ok(Err(RuntimeError::NoSuchDevice { device: 5, count: 2 }))
        ));
        s.set_state(0, DeviceState::Failed, Some("test".into()));
        let (p, mut rx) = port();
        s.submit_now(0, Op::MemInfo, p, true, None);
        assert!(matches!(
            rx.try_recv(),
            Ok(Err(RuntimeError::DeviceFailed { device: 0, .. }))
        ));
        s.closing.store(true, Ordering::SeqCst);
        let (p, mut rx) = port();
        s.submit_now(1, Op::MemInfo, p, true, None);
        assert!(matches!(rx.try_recv(), Ok(Err(RuntimeError::ShuttingDown))));
        assert!(queued(&s, 0).is_empty() && queued(&s, 1).is_empty());
    }

    #[tokio::test]
    async fn on_a_lost_device_an_op_that_may_move_goes_to_the_least_loaded_ready_device() {
        let s = shared(3, |_| {}).await;
        // Device 1 is busier than device 2.
        let (p, _busy) = port();
        s.submit_now(1, Op::MemInfo, p, true, None);
        s.set_state(0, DeviceState::Lost, Some("test".into()));
        let (p, mut rx) = port();
        s.submit_now(0, Op::Alloc { bytes: 16 }, p, true, None);
        assert_eq!(queued(&s, 2), vec![(OpKind::Alloc, Origin::Application)]);
        assert!(rx.try_recv().is_err());
        // One bound to the device (its answer describes it) is answered DeviceLost.
        let (p, mut rx) = port();
        s.submit_now(0, Op::MemInfo, p, true, None);
        assert!(matches!(
            rx.try_recv(),
            Ok(Err(RuntimeError::DeviceLost { device: 0, .. }))
        ));
        // With no other ready device, a movable op is answered DeviceLost too.
        s.set_state(1, DeviceState::Failed, None);
        s.set_state(2, DeviceState::Restarting, None);
        let (p, mut rx) = port();
        s.submit_now(0, Op::Alloc { bytes: 16 }, p, true, None);
        assert!(matches!(
            rx.try_recv(),
            Ok(Err(RuntimeError::DeviceLost { device: 0, .. }))
        ));
    }

    #[tokio::test]
    async fn at_the_in_flight_bound_a_try_is_busy_and_a_submit_is_given_back_to_wait() {
        let s = shared(1, |c| c.runtime.in_flight = 1).await;
        let (p, _first) = port();
        assert!(s.submit_now(0, Op::MemInfo, p, true, None).is_none());
        let (p, mut rx) = port();
        assert!(s.submit_now(0, Op::MemInfo, p, true, None).is_none());
        assert!(matches!(
            rx.try_recv(),
            Ok(Err(RuntimeError::Busy { device: 0, capacity: 1 }))
        ));
        let (p, _rx) = port();
        assert!(
            s.submit_now(0, Op::MemInfo, p, false, None).is_some(),
            "given back to wait"
        );
        assert_eq!(queued(&s, 0).len(), 1);
    }

    #[tokio::test]
    async fn a_quarantined_kernel_and_an_open_breaker_are_refused_at_admission() {
        let s = shared(1, |c| {
            c.breaker.consecutive_failures = 1;
            c.breaker.open_ms = 60_000;
        })
        .await;
        let core = &s.cores[0];
        core.quarantined.write().unwrap().insert((7, "bad".into()));
        let (p, mut rx) = port();
        s.submit_now(0, launch(), p, true, None);
        assert!(matches!(
            rx.try_recv(),
            Ok(Err(RuntimeError::Quarantined { module: 7, .. }))
        ));
        // One failure opens this breaker; a success while closed takes no lock.
        s.breaker_result(core, true);
        assert_eq!(core.breaker_state(), hipvisor_core::BreakerState::Closed);
        s.breaker_result(core, false);
        assert_eq!(core.breaker_state(), hipvisor_core::BreakerState::Open);
        let (p, mut rx) = port();
        s.submit_now(0, Op::MemInfo, p, true, None);
        assert!(matches!(
            rx.try_recv(),
            Ok(Err(RuntimeError::CircuitOpen { device: 0, .. }))
        ));
        assert!(queued(&s, 0).is_empty());
    }

    #[tokio::test]
    async fn a_device_that_is_lost_moves_its_movable_ops_answers_the_others_and_keeps_its_own() {
        let s = shared(2, |_| {}).await;
        let core = &s.cores[0];
        let (p, mut alloc) = port();
        s.submit_now(0, Op::Alloc { bytes: 8 }, p, true, None);
        let (p, mut info) = port();
        s.submit_now(0, Op::MemInfo, p, true, None);
        let (tx, _probe) = oneshot::channel::<OpResult>();
        core.queue
            .enqueue(core.job(Op::MemInfo, Origin::Runtime, tx.into(), None));
        core.queue.signal(Work::Wake);
        s.set_state(0, DeviceState::Lost, Some("test".into()));
        assert!(matches!(
            info.try_recv(),
            Ok(Err(RuntimeError::DeviceLost { device: 0, .. }))
        ));
        assert!(alloc.try_recv().is_err(), "moved, not answered");
        assert_eq!(queued(&s, 1), vec![(OpKind::Alloc, Origin::Application)]);
        assert_eq!(
            queued(&s, 0),
            vec![(OpKind::MemInfo, Origin::Runtime)],
            "the probe stays"
        );
        // A requeue to the lost device after its drain is settled at once, too.
        let (tx, mut again) = oneshot::channel::<OpResult>();
        s.requeue(core.job(Op::MemInfo, Origin::Application, tx.into(), None));
        assert!(matches!(again.try_recv(), Ok(Err(RuntimeError::DeviceLost { .. }))));
    }

    #[tokio::test]
    async fn a_batch_is_queued_together_once_admitted() {
        let s = shared(1, |_| {}).await;
        let sink = BatchSink::new(3);
        s.submit_batch(0, vec![Op::MemInfo, Op::DeviceInfo, Op::Synchronize], &sink)
            .await;
        assert_eq!(
            queued(&s, 0),
            vec![
                (OpKind::MemInfo, Origin::Application),
                (OpKind::DeviceInfo, Origin::Application),
                (OpKind::Synchronize, Origin::Application)
            ]
        );
        assert_eq!(s.cores[0].in_flight(), 3);
    }
}
