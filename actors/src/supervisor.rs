//! The supervisor: decides what happens to a failed op and to a failing device.
//!
//! It is not on the happy path. Executors report `{op, error, attempt}`; the supervisor
//! decides by the error's class and the op's retry policy:
//!
//! - **Transient**: retry after the backoff, on a tokio timer (never a blocking sleep), while
//!   the policy, the device's retry budget and the op's deadline allow; else answer
//!   `RetriesExhausted` / `RetryBudgetExhausted` / `DeadlineExceeded`. An `Alloc` that ran out
//!   of memory is resubmitted only once mem-info shows the bytes free (polled at each backoff
//!   step), or when the backoff runs out (a last attempt).
//! - **InvalidRequest**: answer at once.
//! - **Sticky**: one fault is one event — the first sticky error of a device epoch decides;
//!   ops that fail behind it are answered `DeviceFailed` and not counted as faults. The
//!   kernels launched since the device's last successful op that waited for the device
//!   (synchronize, copy to the host) are suspects; one that is a suspect in
//!   `quarantine_after` faults within the window is quarantined. A worker that ends by
//!   SIGABRT while such kernels may be running is a sticky fault of them too: that is how
//!   ROCm reports a kernel's memory access fault — unless it was loading a module then
//!   (ROCm 5.2's hiprtc aborts on a target it does not know): that abort is the loader's.
//!   Other deaths (SIGKILL, the watchdog, an exit) are restarts, not faults. In thread
//!   isolation the poisoned GPU runtime is the whole process's (every device of the host), so
//!   every device goes to `Failed`, with a reason that says process isolation would have
//!   restarted it.
//! - **DeviceLost**: the device goes to `Lost`; ops that may move (alloc, module load) move to
//!   a ready device, others are answered `DeviceLost`; a probe every
//!   `lost_probe_interval_ms` brings the device back when it answers again.
//!
//! A worker that does not finish its start (handshake, module reloads, health probe) within
//! `supervisor.worker_start_timeout_ms` is killed, and its start is a failed restart: the
//! executor reports it as its death (`ExecutorDied`).
//!
//! A device that fails or is lost keeps nothing queued: its state change answers (or moves)
//! what is queued for it, and what is queued again later (a requeue, a retry) is answered as
//! it arrives ([`Shared::settle_dead_queue`](crate::shared::Shared)).
//!
//! Restarts (a panicking device actor, a panicking executor) follow the restart intensity:
//! at most `max_restarts` per `restart_window_ms`, with a backoff between restarts; beyond
//! it the device is `Failed`. Ractor's default supervision (stop when a child stops) is
//! overridden.
//!
//! Every decision above is a pure function in the core, `hipvisor_core::supervision`
//! (restart intensity, quarantine, what a failed op, a failed open or an engine's death
//! does), tested there without a clock; this actor gathers the inputs, asks, and carries
//! the answer out (timers, answers, state changes, metrics).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hipvisor_core::supervision::{
    AfterSticky, DeathAction, FailedOp, FailureFacts, LostRoute, OomWait, OpenFailureAction, RestartDecision,
    RestartIntensity, RetryDecision, SuspectFaults, decide_engine_death, decide_failed_op, decide_oom_wait,
    decide_open_failure, decide_retry,
};
use hipvisor_core::{GpuError, Op, OpKind, Origin, RetryBudget, RetryPolicy};
use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, SupervisionEvent};
use rand::SeedableRng;
use rand::rngs::SmallRng;

use crate::device_actor;
use crate::error::RuntimeError;
use crate::executor;
use crate::job::Job;
use crate::messages::{Failure, SupervisorMsg};
use crate::metrics::{MetricsEvent, QuarantineEntry};
use crate::shared::Shared;
use crate::state::DeviceState;

/// What the supervisor keeps per device for its decisions.
struct DeviceSupervision {
    budget: RetryBudget,
    requests_seen: u64,
    restarts: RestartIntensity,
    suspect_faults: SuspectFaults,
    probing: bool,
}

/// Arguments of the [`Supervisor`].
pub struct SupervisorArgs {
    pub(crate) shared: Arc<Shared>,
}

/// State of the [`Supervisor`].
pub struct SupervisorState {
    shared: Arc<Shared>,
    policy: RetryPolicy,
    devices: Vec<DeviceSupervision>,
    children: HashMap<ActorId, u32>,
    rng: SmallRng,
    shutting_down: bool,
}

/// The supervisor actor. See the module docs.
pub struct Supervisor;

impl Actor for Supervisor {
    type Msg = SupervisorMsg;
    type State = SupervisorState;
    type Arguments = SupervisorArgs;

    async fn pre_start(
        &self,
        me: ActorRef<SupervisorMsg>,
        args: SupervisorArgs,
    ) -> Result<SupervisorState, ActorProcessingErr> {
        let shared = args.shared;
        let cfg = &shared.config;
        let policy = RetryPolicy::new(cfg.retry.clone())?;
        let now = Instant::now();
        let devices = shared
            .cores
            .iter()
            .map(|_| DeviceSupervision {
                budget: RetryBudget::new(&cfg.retry.budget, now),
                requests_seen: 0,
                restarts: RestartIntensity::new(&cfg.supervisor),
                suspect_faults: SuspectFaults::new(),
                probing: false,
            })
            .collect();
        let mut children = HashMap::new();
        for d in 0..shared.cores.len() as u32 {
            let actor = device_actor::spawn(shared.clone(), d, me.get_cell()).await?;
            children.insert(actor.get_id(), d);
        }
        Ok(SupervisorState {
            shared,
            policy,
            devices,
            children,
            rng: SmallRng::from_os_rng(),
            shutting_down: false,
        })
    }

    async fn handle(
        &self,
        me: ActorRef<SupervisorMsg>,
        msg: SupervisorMsg,
        st: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            SupervisorMsg::Failed(f) => st.failed(&me, *f),
            SupervisorMsg::ExecutorDied {
                device,
                epoch,
                reason,
                suspects,
            } => {
                let current = st.shared.cores[device as usize]
                    .epoch
                    .load(std::sync::atomic::Ordering::Acquire);
                match decide_engine_death(st.shutting_down, epoch, current, !suspects.is_empty()) {
                    DeathAction::Ignore => {}
                    DeathAction::Restart { gpu_fault } => {
                        let reason = if gpu_fault {
                            st.aborted_by_gpu_fault(device, &suspects, reason)
                        } else {
                            reason
                        };
                        st.restart(&me, device, reason, SupervisorMsg::RestartExecutor(device, true));
                    }
                }
            }
            SupervisorMsg::Opened { device, epoch } => {
                let core = &st.shared.cores[device as usize];
                let current = core.epoch.load(std::sync::atomic::Ordering::Acquire) == epoch;
                if current && matches!(core.state.get(), DeviceState::Restarting | DeviceState::Lost) {
                    st.shared.set_state(device, DeviceState::Ready, None);
                }
            }
            // A worker that could not start while the runtime closes (it refuses new workers,
            // and ends those starting): the closing's doing, not the device's; its state
            // stays. A start that failed on its own (a GPU error from the worker, or in
            // thread isolation any error) is decided as always.
            SupervisorMsg::OpenFailed {
                device,
                error: error @ GpuError::WorkerUnavailable { .. },
                ..
            } if st.closing() => {
                tracing::debug!(device, error = %error, "a worker's start ended by the closing runtime");
            }
            SupervisorMsg::OpenFailed {
                device,
                epoch: _,
                error,
            } => match decide_open_failure(error.class(), st.shared.config.runtime.isolation) {
                // A sticky code here: the GPU runtime that tried to open it is poisoned.
                OpenFailureAction::FailEveryDevice => st.process_poisoned(device, &error),
                OpenFailureAction::Restart => {
                    let reason = format!("a new worker could not open the device: {error}");
                    st.restart(&me, device, reason, SupervisorMsg::RestartExecutor(device, true));
                }
                OpenFailureAction::MarkLostAndRetry => {
                    let reason = format!("could not open a context: {error}");
                    st.shared.set_state(device, DeviceState::Lost, Some(reason));
                    // No context, so no probe can run: try to open it again later.
                    let every = Duration::from_millis(st.shared.config.supervisor.lost_probe_interval_ms);
                    if !st.shutting_down {
                        me.send_after(every, move || SupervisorMsg::RestartExecutor(device, false));
                    }
                }
                OpenFailureAction::FailDevice => st.fail(device, format!("could not open a context: {error}")),
            },
            SupervisorMsg::ProbeStopped(device) => {
                st.devices[device as usize].probing = false;
                // The device may have been lost again between the probe's last look and
                // this message (its `probe` call found one still running): probe it anew.
                if st.shared.cores[device as usize].state.get() == DeviceState::Lost {
                    st.probe(&me, device);
                }
            }
            SupervisorMsg::DeviceReturned(device) => {
                st.devices[device as usize].probing = false;
                if st.shared.cores[device as usize].state.get() == DeviceState::Lost {
                    st.shared.set_state(device, DeviceState::Ready, None);
                }
            }
            SupervisorMsg::RestartExecutor(device, counted) => {
                if st.shutting_down || st.shared.cores[device as usize].state.get() == DeviceState::Failed {
                    return Ok(());
                }
                let epoch = st.shared.cores[device as usize]
                    .epoch
                    .load(std::sync::atomic::Ordering::Acquire)
                    + 1;
                match executor::spawn(st.shared.clone(), device, epoch, None) {
                    // The executor reports `Opened` (→ ready) or `OpenFailed`.
                    Ok(()) if counted => {
                        let reason = st.shared.cores[device as usize]
                            .reason()
                            .unwrap_or_else(|| "restarted".to_string());
                        st.shared.metrics_event(MetricsEvent::Restart { device, reason });
                    }
                    Ok(()) => {}
                    Err(e) => st.fail(device, format!("could not start an executor thread: {e}")),
                }
            }
            SupervisorMsg::Barrier(reply) => {
                let _ = reply.send(());
            }
            SupervisorMsg::RestartActor(device) => {
                if st.shutting_down || st.shared.cores[device as usize].state.get() == DeviceState::Failed {
                    return Ok(());
                }
                let actor = device_actor::spawn(st.shared.clone(), device, me.get_cell()).await?;
                st.children.insert(actor.get_id(), device);
                let reason = "its device actor stopped and was started again".to_string();
                st.shared.metrics_event(MetricsEvent::Restart { device, reason });
                st.shared.set_state(device, DeviceState::Ready, None);
            }
            SupervisorMsg::Shutdown(reply) => {
                st.shutting_down = true;
                let _ = reply.send(());
            }
        }
        Ok(())
    }

    /// Overrides ractor's default (stop the supervisor when a child stops): a device actor
    /// that fails is restarted, within the restart intensity.
    async fn handle_supervisor_evt(
        &self,
        me: ActorRef<SupervisorMsg>,
        evt: SupervisionEvent,
        st: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        if let SupervisionEvent::ActorFailed(cell, err) = evt
            && let Some(device) = st.children.remove(&cell.get_id())
        {
            *hipvisor_core::sync::write(&st.shared.cores[device as usize].actor) = None;
            if !st.shutting_down {
                st.restart(
                    &me,
                    device,
                    format!("device actor failed: {err}"),
                    SupervisorMsg::RestartActor(device),
                );
            }
        }
        Ok(())
    }
}

/// Whether a transient failure of `op` may be retried whole: any op but a task that writes
/// a durable buffer and failed at or after its first launch.
fn retries_whole_task(op: &Op, error: &GpuError) -> bool {
    match op {
        Op::Task(task) => task.replayable() || matches!(error.op(), OpKind::Alloc | OpKind::CopyToDevice),
        _ => true,
    }
}

impl SupervisorState {
    fn failed(&mut self, me: &ActorRef<SupervisorMsg>, f: Failure) {
        let core = self.shared.cores[f.device as usize].clone();
        let facts = FailureFacts {
            class: f.error.class(),
            origin: f.job.origin,
            answered: f.job.slot.is_answered(),
            shutting_down: self.shutting_down,
            state: core.state.get(),
            failed_epoch: f.epoch,
            current_epoch: core.epoch.load(std::sync::atomic::Ordering::Acquire),
            isolation: self.shared.config.runtime.isolation,
            movable: Shared::movable(&f.job.op),
        };
        let decision = decide_failed_op(&facts);
        match decision {
            FailedOp::Late => {
                core.counters.late_completion();
                return;
            }
            FailedOp::ShuttingDown => {
                f.job.answer(Err(RuntimeError::ShuttingDown), &core.counters);
                return;
            }
            _ => {}
        }
        if facts.counts_for_breaker() {
            self.shared.breaker_result(&core, false);
        }
        tracing::debug!(device = f.device, op = f.job.kind().as_str(), attempt = f.job.attempts, error = %f.error, "op failed");
        match decision {
            FailedOp::Late | FailedOp::ShuttingDown => unreachable!("answered above"),
            FailedOp::Reject => {
                f.job.answer(Err(RuntimeError::Gpu(f.error)), &core.counters);
            }
            // A task that writes a durable buffer is retried only while nothing it did can
            // have reached the buffer: its failure came before its first launch.
            FailedOp::Retry if !retries_whole_task(&f.job.op, &f.error) => {
                f.job.answer(Err(RuntimeError::Gpu(f.error)), &core.counters);
            }
            FailedOp::Retry => self.retry(f.job, f.error),
            FailedOp::FailedBehind => {
                // An op that failed behind the fault that decided: not a new fault.
                self.shared.answer_or_rerun(f.job, core.failed_error(true), false);
            }
            FailedOp::Sticky(then) => self.sticky(me, f, then),
            FailedOp::Lost { mark_lost, route } => {
                if mark_lost {
                    self.shared
                        .set_state(f.device, DeviceState::Lost, Some(format!("device lost: {}", f.error)));
                    self.probe(me, f.device);
                }
                let mut job = f.job;
                match route {
                    LostRoute::AnswerLost => self.shared.answer_or_rerun(job, core.lost_error(), false),
                    LostRoute::Move => {
                        job.backoff = None;
                        self.shared.resubmit(job);
                    }
                }
            }
        }
    }

    fn retry(&mut self, mut job: Job, error: GpuError) {
        let core = self.shared.cores[job.device as usize].clone();
        let now = Instant::now();
        let kind = job.kind();
        let application = job.origin == Origin::Application;
        let requests = core.requests.load(std::sync::atomic::Ordering::Relaxed);
        let dev = &mut self.devices[job.device as usize];
        let budget = application.then(|| (&mut dev.budget, requests.saturating_sub(dev.requests_seen)));
        let policy = &self.policy;
        let backoff = job.backoff.get_or_insert_with(|| match &job.op {
            Op::Task(task) => policy.task_backoff(task.inner_ops().map(|(k, _)| k)),
            _ => policy.backoff(kind),
        });
        let decision = decide_retry(backoff, budget, now, job.deadline, &mut self.rng);
        if application && decision != RetryDecision::RetriesExhausted {
            // The budget has seen them (deposited with this decision).
            self.devices[job.device as usize].requests_seen = requests;
        }
        let delay = match decision {
            RetryDecision::After(delay) => delay,
            RetryDecision::RetriesExhausted => {
                let attempts = job.attempts;
                let e = RuntimeError::RetriesExhausted {
                    attempts,
                    last_error: error,
                };
                job.answer(Err(e), &core.counters);
                return;
            }
            RetryDecision::BudgetExhausted => {
                let (device, attempts) = (job.device, job.attempts);
                let e = RuntimeError::RetryBudgetExhausted {
                    device,
                    attempts,
                    last_error: error,
                };
                job.answer(Err(e), &core.counters);
                return;
            }
            RetryDecision::DeadlineExceeded => {
                let e = core.deadline_exceeded(kind, false);
                job.answer(Err(e), &core.counters);
                return;
            }
        };
        tracing::info!(
            device = job.device,
            op = kind.as_str(),
            attempt = job.attempts,
            delay_ms = delay.as_millis() as u64,
            "retry"
        );
        let shared = self.shared.clone();
        let oom_bytes = match (&job.op, error.is_out_of_memory()) {
            (Op::Alloc { bytes }, true) => Some(*bytes),
            _ => None,
        };
        let mut rng = SmallRng::from_rng(&mut self.rng);
        self.shared.clone().spawn_retry(async move {
            let mut delay = delay;
            loop {
                tokio::time::sleep(delay).await;
                let Some(bytes) = oom_bytes else { break };
                // OOM gating: resubmit once the bytes are free, or when the backoff runs out —
                // or at once when the device is not ready (the resubmission moves the op or
                // answers it, or queues it for the restarting device, by its deadline).
                let core = &shared.cores[job.device as usize];
                if core.state.get() != DeviceState::Ready {
                    break;
                }
                // A device that does not answer its mem-info holds the op no longer than its
                // deadline.
                match tokio::time::timeout_at(job.deadline.into(), shared.mem_info(job.device)).await {
                    Ok(Ok(m)) if m.free >= bytes => break,
                    Ok(Ok(_)) => core.counters.oom_wait(),
                    Ok(Err(_)) => break,
                    Err(_) => {
                        let e = core.deadline_exceeded(job.kind(), false);
                        job.answer(Err(e), &core.counters);
                        return;
                    }
                }
                match decide_oom_wait(job.backoff.as_mut(), Instant::now(), job.deadline, &mut rng) {
                    OomWait::WaitAgain(d) => delay = d,
                    OomWait::DeadlineExceeded => {
                        let core = &shared.cores[job.device as usize];
                        let e = core.deadline_exceeded(job.kind(), false);
                        job.answer(Err(e), &core.counters);
                        return;
                    }
                    OomWait::LastAttempt => break,
                }
            }
            shared.cores[job.device as usize].counters.retried();
            shared.resubmit(job);
        });
    }

    /// The first sticky fault of a device's epoch: counted, its suspects' faults recorded
    /// (towards their quarantine), the op answered, and the device restarted (`then`).
    fn sticky(&mut self, me: &ActorRef<SupervisorMsg>, f: Failure, then: AfterSticky) {
        self.shared.metrics_event(MetricsEvent::StickyFault {
            device: f.device,
            reason: f.error.to_string(),
        });
        tracing::error!(device = f.device, error = %f.error, "sticky fault");
        self.quarantine(f.device, &f.suspects);
        let error = f.error.clone();
        match then {
            // A task runs again elsewhere (or on the restarted device), unless it is poison.
            // (The task's own fault only when no kernel launched before it may have made it.)
            AfterSticky::RestartDevice => {
                let own = f.suspects.is_empty();
                self.shared.answer_or_rerun(f.job, RuntimeError::Gpu(f.error), own);
            }
            // Every device of the process is about to fail: nowhere to run it again.
            AfterSticky::FailEveryDevice => {
                let counters = &self.shared.cores[f.device as usize].counters;
                f.job.answer(Err(RuntimeError::Gpu(f.error)), counters);
            }
        }
        match then {
            AfterSticky::FailEveryDevice => self.process_poisoned(f.device, &error),
            AfterSticky::RestartDevice => {
                // The worker is poisoned and its executor has ended: a new worker, a new epoch.
                let reason = format!(
                    "sticky fault {} ({})",
                    error.code_name(),
                    error.code().map_or(0, |(_, c)| c)
                );
                self.restart(me, f.device, reason, SupervisorMsg::RestartExecutor(f.device, true));
            }
        }
    }

    /// A worker that ended by SIGABRT while kernels it launched may have been running: on
    /// AMD that is how a kernel's memory access fault ends its process, so it counts as a
    /// sticky fault of those kernels (towards their quarantine). Returns the restart reason.
    fn aborted_by_gpu_fault(&mut self, device: u32, suspects: &[(u64, String)], reason: String) -> String {
        self.shared.metrics_event(MetricsEvent::StickyFault {
            device,
            reason: reason.clone(),
        });
        let kernels = suspects
            .iter()
            .map(|(m, f)| format!("{f} (module {m})"))
            .collect::<Vec<_>>()
            .join(", ");
        tracing::error!(device, reason = %reason, kernels = %kernels, "worker aborted while kernels ran: a GPU memory access fault");
        self.quarantine(device, suspects);
        format!("{reason}: a GPU memory access fault of a kernel it launched (suspects: {kernels})")
    }

    /// A sticky fault poisoned the GPU runtime of this process (thread isolation): every
    /// device of the process is out of service.
    fn process_poisoned(&mut self, device: u32, error: &GpuError) {
        let reason = format!(
            "sticky fault {} ({}) on device {device} poisoned this process's GPU runtime; thread isolation cannot \
             recover it in-process (process isolation would have restarted the device)",
            error.code_name(),
            error.code().map_or(0, |(_, c)| c),
        );
        for d in 0..self.shared.cores.len() as u32 {
            self.fail(d, reason.clone());
        }
    }

    /// Records a sticky fault of `suspects` and quarantines those that reached
    /// `quarantine_after` faults within the window.
    fn quarantine(&mut self, device: u32, suspects: &[(u64, String)]) {
        let shared = self.shared.clone();
        let reached =
            self.devices[device as usize]
                .suspect_faults
                .record(&shared.config.supervisor, suspects, Instant::now());
        let core = &shared.cores[device as usize];
        for key in reached {
            let newly = hipvisor_core::sync::write(&core.quarantined).insert(key.clone());
            if newly {
                tracing::warn!(device, module = key.0, function = %key.1, "kernel quarantined");
                shared.metrics_event(MetricsEvent::Quarantined(QuarantineEntry {
                    device,
                    module: key.0,
                    function: key.1,
                }));
            }
        }
    }

    /// Puts a device out of service and answers everything queued for it (the state change
    /// does: [`Shared::set_state`](crate::shared::Shared)); what is queued for it later is answered too.
    fn fail(&mut self, device: u32, reason: String) {
        self.shared.set_state(device, DeviceState::Failed, Some(reason));
        self.shared.settle_dead_queue(device);
    }

    /// Schedules a restart of a device part (`then`) after the restart backoff, or fails
    /// the device when the restart intensity is exceeded ([`RestartIntensity::add_restart`]).
    fn restart(&mut self, me: &ActorRef<SupervisorMsg>, device: u32, reason: String, then: SupervisorMsg) {
        let shared = self.shared.clone();
        let cfg = &shared.config.supervisor;
        let decision = self.devices[device as usize]
            .restarts
            .add_restart(cfg, Instant::now(), &mut self.rng);
        match decision {
            RestartDecision::GiveUp { restarts } => {
                let why = format!(
                    "restart intensity exceeded: {restarts} restarts within {} ms (last: {reason})",
                    cfg.restart_window_ms
                );
                self.fail(device, why);
            }
            RestartDecision::Restart { delay } => {
                tracing::warn!(device, reason = %reason, delay_ms = delay.as_millis() as u64, "restarting device");
                self.shared.set_state(device, DeviceState::Restarting, Some(reason));
                me.send_after(delay, move || then);
            }
        }
    }

    /// Whether the runtime is closing (set before the supervisor hears `Shutdown`, so this
    /// covers `shutting_down` too).
    fn closing(&self) -> bool {
        self.shared.closing.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Probes a lost device until it answers (nothing once the runtime is closing).
    fn probe(&mut self, me: &ActorRef<SupervisorMsg>, device: u32) {
        if self.closing() {
            return;
        }
        let dev = &mut self.devices[device as usize];
        if dev.probing {
            return;
        }
        dev.probing = true;
        let shared = self.shared.clone();
        let me = me.clone();
        let every = Duration::from_millis(shared.config.supervisor.lost_probe_interval_ms);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let core = &shared.cores[device as usize];
                if shared.closing.load(std::sync::atomic::Ordering::Acquire) || core.state.get() != DeviceState::Lost {
                    let _ = me.cast(SupervisorMsg::ProbeStopped(device));
                    return;
                }
                if shared.runtime_op(device, Op::MemInfo).await.is_ok() {
                    let _ = me.cast(SupervisorMsg::DeviceReturned(device));
                    return;
                }
            }
        });
    }
}
