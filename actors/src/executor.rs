//! The executor of one device: a dedicated OS thread that takes the device's jobs one at a
//! time and runs them on an [`Engine`] — the device context itself on this thread (thread
//! isolation), or a worker process that owns it (process isolation).
//!
//! It answers successful ops straight to the caller's reply slot; a failed op goes to the
//! supervisor with its error (and, for sticky faults, the kernels suspected of it). If the
//! supervisor is gone, the executor answers the error itself: every op gets one answer.
//! When the engine dies (a panicking backend, a worker that exits) or is poisoned (a sticky
//! fault in a worker), the executor answers the op in flight, reports to the supervisor and
//! ends; the supervisor starts a new one (a new epoch) under the restart intensity.
//!
//! A panic of the executor's own code (outside the backend call) is such a failure too: the
//! thread catches it, answers the ops in flight (`DeviceRestarted`, which may have run), puts
//! back the job it held, drops its engine (a worker process is stopped) and reports its death,
//! so the device restarts as after any failure. The thread's `JoinHandle` is kept in the
//! device's core and joined at shutdown.

use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use hipvisor_core::config::Isolation;
use hipvisor_core::supervision::{EngineDeath, reruns_transparently};
use hipvisor_core::sync::lock;
use hipvisor_core::{ErrorClass, GpuError, ModuleHandle, Op, OpKind, Origin, Reply};

use crate::device::{Current, DeviceCore};
use crate::engine::{Batches, Engine, Exec, ThreadEngine, panic_message};
use crate::error::RuntimeError;
use crate::job::Job;
use crate::messages::{Failure, SupervisorMsg};
use crate::metrics::MetricsEvent;
use crate::park;
use crate::process::{self, WorkerEngine};
use crate::queue::{Armed, Work};
use crate::shared::Shared;
use crate::state::DeviceState;
use hipvisor_core::worker::client::{HostCopy, Role, StartError};

/// Starts the executor thread of `device` for a new context of `epoch`. `opened`, if given,
/// is signalled once the context is open (or failed to open) and the supervisor told. The
/// thread's handle is kept in the device's core.
///
/// # Errors
/// The OS could not start a thread.
pub(crate) fn spawn(
    shared: Arc<Shared>,
    device: u32,
    epoch: u64,
    opened: Option<tokio::sync::oneshot::Sender<()>>,
) -> std::io::Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    {
        let core = &shared.cores[device as usize];
        let mut slot = lock(&core.executor_stop);
        slot.store(true, Ordering::Release);
        *slot = stop.clone();
        core.epoch.store(epoch, Ordering::Release);
    }
    let thread_shared = shared.clone();
    let handle = std::thread::Builder::new()
        .name(format!("hipvisor-gpu{device}"))
        .spawn(move || run(thread_shared, device, epoch, stop, opened))?;
    let core = &shared.cores[device as usize];
    let mut threads = lock(&core.executors);
    // Executors that have ended are joined (at once: they have) and forgotten.
    for ended in extract_finished(&mut threads) {
        let _ = ended.join();
    }
    threads.push(handle);
    Ok(())
}

/// The handles of the threads that have finished, taken out of `threads`.
pub(crate) fn extract_finished(threads: &mut Vec<std::thread::JoinHandle<()>>) -> Vec<std::thread::JoinHandle<()>> {
    let (done, running): (Vec<_>, Vec<_>) = threads.drain(..).partition(|h| h.is_finished());
    *threads = running;
    done
}

/// Why a device's engine could not be opened.
enum OpenError {
    /// The backend or the worker answered this error.
    Failed(GpuError),
    /// The worker did not finish starting within `supervisor.worker_start_timeout_ms` and was
    /// killed (the reason says where it was): a failed restart.
    TimedOut(StartError),
}

impl From<GpuError> for OpenError {
    fn from(e: GpuError) -> Self {
        OpenError::Failed(e)
    }
}

impl From<StartError> for OpenError {
    fn from(e: StartError) -> Self {
        match e {
            StartError::Failed(e) | StartError::Restore(e) => OpenError::Failed(e),
            timed_out @ StartError::TimedOut { .. } => OpenError::TimedOut(timed_out),
        }
    }
}

fn open(shared: &Arc<Shared>, device: u32, epoch: u64) -> Result<Box<dyn Engine>, OpenError> {
    let core = &shared.cores[device as usize];
    let began = Instant::now();
    // (After the standby is taken, in process isolation: a refresher may hold it, and then
    // applies changes newer than a snapshot taken before.)
    let snapshot = || (lock(&core.modules).clone(), lock(&core.durables).clone());
    match shared.config.runtime.isolation {
        Isolation::Thread => {
            let (modules, durables) = snapshot();
            let mut ctx = shared.backend.open(device, epoch)?;
            for (id, source) in &modules {
                ctx.restore_module(ModuleHandle { device, id: *id }, source)?;
            }
            for (id, copy) in &durables {
                let op = Op::Durable {
                    id: *id,
                    data: copy.data.clone(),
                };
                ctx.execute(&op, Origin::Runtime)?;
            }
            restored(shared, device, epoch, &durables, began);
            Ok(Box::new(ThreadEngine(ctx)))
        }
        Isolation::Process => {
            let mut standby = lock(&core.standby).take();
            let (modules, durables) = snapshot();
            if let Some(w) = standby.as_mut()
                && !(w.epoch() == epoch && w.is_alive())
            {
                standby = None; // stale or dead: start cold
            }
            let worker = match standby {
                // A warm standby for this epoch takes over: milliseconds, not a cold start.
                Some(mut w) => {
                    w.catch_up(&modules, &durables)?;
                    tracing::info!(device, epoch, pid = w.pid(), "standby worker took over");
                    w
                }
                None => process::start_worker(shared, device, epoch, &modules, &durables, Role::Active)?,
            };
            restored(shared, device, epoch, &durables, began);
            core.worker_pid.store(worker.pid() as i32, Ordering::Release);
            if shared.config.supervisor.standby {
                process::prepare_standby(shared, device, epoch + 1);
            }
            Ok(Box::new(WorkerEngine::new(worker, shared.clone(), device)))
        }
    }
}

/// Tells the metrics actor what a new context of `device` got back of its durable buffers,
/// and how long its open took with them (from `began`). The first context has none.
fn restored(shared: &Shared, device: u32, epoch: u64, durables: &BTreeMap<u64, HostCopy>, began: Instant) {
    if durables.is_empty() {
        return;
    }
    let bytes = durables.values().map(|c| c.data.len() as u64).sum();
    let seconds = began.elapsed().as_secs_f64();
    tracing::info!(
        device,
        epoch,
        buffers = durables.len(),
        bytes,
        seconds,
        "durable buffers restored"
    );
    shared.metrics_event(MetricsEvent::DurableRestored { device, bytes, seconds });
}

fn run(
    shared: Arc<Shared>,
    device: u32,
    epoch: u64,
    stop: Arc<AtomicBool>,
    opened: Option<tokio::sync::oneshot::Sender<()>>,
) {
    let core = &shared.cores[device as usize];
    let mut opened = opened;
    let mut phase = Phase { core, taking: false };
    // The jobs the executor holds and has not started: outside the unwinding, so a panic
    // does not drop them (a dropped job is answered `ShuttingDown`).
    let mut hand = Hand::default();
    let served = std::panic::catch_unwind(AssertUnwindSafe(|| {
        serve(&shared, device, epoch, &stop, &mut opened, &mut phase, &mut hand)
    }));
    phase.leave();
    if let Err(panic) = served {
        // The engine went with the unwinding (a worker process is stopped by its drop).
        let reason = format!("executor panicked: {}", panic_message(&*panic));
        tracing::error!(device, epoch, reason = %reason, "executor panicked");
        let running = std::mem::take(&mut lock(&core.current).ops);
        // (In a batch, those answered before the panic keep their answer.)
        for c in running.into_iter().filter(|c| !c.slot.is_answered()) {
            let e = RuntimeError::DeviceRestarted {
                device,
                may_have_executed: true,
            };
            c.slot.answer(Err(e), 1, &core.counters);
        }
        shared.report(SupervisorMsg::ExecutorDied {
            device,
            epoch,
            reason,
            suspects: Vec::new(),
        });
    }
    // What it held and had not started goes back to the queue, ahead of what was queued
    // behind it: it runs on the next executor (or is answered by its device's state).
    for job in hand.jobs.drain(..).chain(hand.carried.take()) {
        shared.requeue(job);
    }
    // Whoever waits for the open hears of it only after the supervisor did (a panic while
    // opening ends here too).
    if let Some(tx) = opened.take() {
        let _ = tx.send(());
    }
}

/// Opens the engine and serves the device's queue until the engine dies or is poisoned, or
/// the executor is told to stop.
fn serve(
    shared: &Arc<Shared>,
    device: u32,
    epoch: u64,
    stop: &AtomicBool,
    opened: &mut Option<tokio::sync::oneshot::Sender<()>>,
    phase: &mut Phase<'_>,
    hand: &mut Hand,
) {
    // The supervisor hears of the outcome before whoever waits for `opened` goes on.
    let engine = match open(shared, device, epoch) {
        Ok(e) => {
            shared.report(SupervisorMsg::Opened { device, epoch });
            Some(e)
        }
        Err(OpenError::Failed(error)) => {
            shared.report(SupervisorMsg::OpenFailed { device, epoch, error });
            None
        }
        Err(OpenError::TimedOut(timed_out)) => {
            let reason = timed_out.to_string();
            tracing::warn!(device, epoch, reason = %reason, "worker start timed out");
            // A start that hangs is a failed restart (under the restart intensity).
            shared.report(SupervisorMsg::ExecutorDied {
                device,
                epoch,
                reason,
                suspects: Vec::new(),
            });
            None
        }
    };
    if let Some(tx) = opened.take() {
        let _ = tx.send(());
    }
    let Some(mut engine) = engine else { return };
    let core = &shared.cores[device as usize];
    let mut suspects: Vec<(u64, String)> = Vec::new();
    // An injected panic, armed for after the next op.
    let mut armed: Option<String> = None;
    // An injected panic, armed for when the executor next holds a job it has not started.
    let mut holding: Option<String> = None;
    phase.take();
    while !stop.load(Ordering::Acquire) {
        let job = match hand.carried.take() {
            Some(job) => job,
            None => match park::next_work(&core.queue, || shared.spin_for(device)) {
                Work::Job(job) => job,
                Work::Wake => continue,
                Work::Panic(why, Armed::AfterRun) => {
                    armed = Some(why);
                    continue;
                }
                Work::Panic(why, Armed::Holding) => {
                    holding = Some(why);
                    continue;
                }
            },
        };
        hand.jobs.push(job);
        if stop.load(Ordering::Acquire) {
            // Not ours any more: `run` puts it back for the next executor, or shutdown's
            // drain.
            break;
        }
        if let Some(why) = holding.take() {
            panic!("injected executor panic while holding a job: {why}");
        }
        let cost = engine.batches().and_then(|b| b.batch_cost(&hand.jobs[0].op));
        let Some(cost) = cost else {
            if !execute(
                shared,
                core,
                phase,
                &mut *engine,
                hand,
                &mut suspects,
                epoch,
                &mut armed,
            ) {
                break;
            }
            continue;
        };
        let batcher = engine.batches().expect("a batching engine");
        // Whatever is queued already joins the batch, up to the engine's limits: one round
        // trip to a worker for many ops. Nothing waits for a batch to fill.
        let limits = batcher.limits();
        let mut bytes = cost;
        while hand.jobs.len() < limits.ops {
            let next = match core.queue.poll() {
                Some(Work::Job(next)) => next,
                Some(Work::Panic(why, Armed::AfterRun)) => {
                    armed = Some(why);
                    break;
                }
                Some(Work::Panic(why, Armed::Holding)) => {
                    holding = Some(why);
                    break;
                }
                Some(Work::Wake) | None => break,
            };
            match batcher.batch_cost(&next.op) {
                Some(c) if bytes + c <= limits.bytes => {
                    bytes += c;
                    hand.jobs.push(next);
                }
                _ => {
                    hand.carried = Some(next);
                    break;
                }
            }
        }
        let go_on = if hand.jobs.len() == 1 {
            execute(
                shared,
                core,
                phase,
                engine.as_mut(),
                hand,
                &mut suspects,
                epoch,
                &mut armed,
            )
        } else {
            execute_batch(shared, core, phase, batcher, hand, &mut suspects, epoch, &mut armed)
        };
        if !go_on {
            break;
        }
    }
}

/// The jobs an executor holds and has not started yet. Kept by [`run`], outside the
/// unwinding of a panic, which then puts them back in the queue.
#[derive(Default)]
struct Hand {
    /// Taken from the queue, to run next (one job, or a batch being gathered).
    jobs: Vec<Job>,
    /// A job taken while gathering a batch that could not join it: it runs after.
    carried: Option<Job>,
}

/// An executor's phase, as the watchdog sees it in `Running` (`device.rs`): taking jobs
/// from the queue, or not (inside an op, opening its engine, ended).
struct Phase<'a> {
    core: &'a DeviceCore,
    taking: bool,
}

impl Phase<'_> {
    /// Between ops: no op running, taking jobs from the queue.
    fn take(&mut self) {
        let mut running = lock(&self.core.current);
        running.ops.clear();
        if !self.taking {
            running.takers += 1;
            self.taking = true;
        }
    }

    /// Running `jobs`: the watchdog watches their deadlines, and owns the queue meanwhile.
    fn run<'j>(&mut self, jobs: impl IntoIterator<Item = &'j Job>) {
        let mut running = lock(&self.core.current);
        running.ops.clear();
        running.ops.extend(jobs.into_iter().map(|job| Current {
            slot: job.slot.clone(),
            deadline: job.deadline,
            op: job.kind(),
        }));
        if self.taking {
            running.takers -= 1;
            self.taking = false;
        }
    }

    /// The executor ends (the ops it was running, if any, stay for whoever answers them).
    fn leave(&mut self) {
        if self.taking {
            let mut running = lock(&self.core.current);
            running.takers -= 1;
            self.taking = false;
        }
    }
}

/// Panics if a panic was injected ([`Work::Panic`]): a fault outside the backend call, with
/// an op in flight.
fn injected_panic(armed: &mut Option<String>) {
    if let Some(why) = armed.take() {
        panic!("injected executor panic: {why}");
    }
}

/// Whether a job must not run, and its answer if it needs one (`Some(None)`: answered
/// while queued — by its deadline, by shutdown — so nothing to do).
fn rejection(shared: &Shared, core: &DeviceCore, job: &Job) -> Option<Option<RuntimeError>> {
    if job.slot.is_answered() {
        return Some(None);
    }
    if core.state.get() == DeviceState::Failed {
        return Some(Some(core.failed_error(false)));
    }
    if Instant::now() >= job.deadline {
        return Some(Some(core.deadline_exceeded(job.kind(), false)));
    }
    shared.quarantined(core, &job.op).map(Some)
}

/// Answers the held jobs that must not run (answered while queued, failed device, deadline
/// passed, quarantined kernel) and counts an attempt of the others, which stay held.
fn admit(shared: &Shared, core: &DeviceCore, held: &mut Vec<Job>) {
    let mut i = 0;
    while i < held.len() {
        match rejection(shared, core, &held[i]) {
            None => i += 1,
            Some(answer) => {
                let job = held.remove(i);
                if let Some(e) = answer {
                    job.answer(Err(e), &core.counters);
                }
            }
        }
    }
    for job in held.iter_mut() {
        job.attempts += 1;
    }
}

/// A span per op (cheap when nobody listens): device, op kind, attempt, outcome.
fn op_span(core: &DeviceCore, job: &Job) -> tracing::Span {
    tracing::info_span!(
        "gpu_op",
        device = core.index,
        op = job.kind().as_str(),
        attempt = job.attempts,
        outcome = tracing::field::Empty
    )
}

fn record_outcome(span: &tracing::Span, exec: &Exec) {
    span.record(
        "outcome",
        match exec {
            Exec::Done(Ok(_)) => "success",
            Exec::Done(Err(e)) => e.class().as_str(),
            Exec::Died { .. } => "engine_died",
        },
    );
}

/// Runs one job; `false` when the executor must end (its engine died or is poisoned).
#[allow(clippy::too_many_arguments)]
fn execute(
    shared: &Arc<Shared>,
    core: &DeviceCore,
    phase: &mut Phase<'_>,
    engine: &mut dyn Engine,
    hand: &mut Hand,
    suspects: &mut Vec<(u64, String)>,
    epoch: u64,
    armed: &mut Option<String>,
) -> bool {
    admit(shared, core, &mut hand.jobs);
    if hand.jobs.is_empty() {
        return true;
    }
    // Running from here: the watchdog watches it (and a panic answers it).
    phase.run(&hand.jobs);
    let job = hand.jobs.pop().expect("one job");
    let span = op_span(core, &job);
    let result = span.in_scope(|| engine.run(&job.op, job.origin));
    record_outcome(&span, &result);
    // Closed (and exported) before the answer: a caller that exits on it loses no span.
    drop(span);
    injected_panic(armed);
    phase.take();
    let poisoned = matches!(&result, Exec::Done(Err(e)) if engine.poisoned_by(e));
    let mut died = None;
    let go_on = finish(shared, core, poisoned, job, result, suspects, epoch, &mut died);
    report_death(shared, core, epoch, died, suspects);
    go_on
}

/// Runs jobs as one batch; `false` when the executor must end. Each op's span covers the
/// batch it ran in.
#[allow(clippy::too_many_arguments)]
fn execute_batch(
    shared: &Arc<Shared>,
    core: &DeviceCore,
    phase: &mut Phase<'_>,
    engine: &mut dyn Batches,
    hand: &mut Hand,
    suspects: &mut Vec<(u64, String)>,
    epoch: u64,
    armed: &mut Option<String>,
) -> bool {
    admit(shared, core, &mut hand.jobs);
    if hand.jobs.is_empty() {
        return true;
    }
    // Running from here: the watchdog watches them (and a panic answers them).
    phase.run(&hand.jobs);
    let batch = std::mem::take(&mut hand.jobs);
    // The engine takes its own copy of the ops; each job is answered as its result comes.
    let ops: Vec<(Op, Origin)> = batch.iter().map(|job| (job.op.clone(), job.origin)).collect();
    // Spans open now, so each covers the batch up to its op's answer.
    let spans: Vec<(Job, tracing::Span)> = batch
        .into_iter()
        .map(|job| {
            let span = op_span(core, &job);
            (job, span)
        })
        .collect();
    let mut pending = spans.into_iter();
    let mut go_on = true;
    let mut died = None;
    engine.run_batch(ops, &mut |result, poisoned| {
        let Some((job, span)) = pending.next() else {
            debug_assert!(false, "an engine answered more ops than it was given");
            return;
        };
        record_outcome(&span, &result);
        drop(span); // before the answer, as in `execute`
        injected_panic(armed);
        go_on &= finish(shared, core, poisoned, job, result, suspects, epoch, &mut died);
    });
    phase.take();
    report_death(shared, core, epoch, died, suspects);
    for (mut job, _) in pending {
        // Did not start: the engine was poisoned by an op before it. It runs on the next
        // context, ahead of the ops queued behind it — unless its answer would vouch for
        // the poisoned context's earlier work (a synchronize after the fault would answer
        // success on the new context).
        // (A task vouches for nothing of the old context: its own scratch, durable buffers
        // restored.)
        if job.kind().is_synchronizing() && job.kind() != OpKind::Task {
            let e = RuntimeError::DeviceRestarted {
                device: core.index,
                may_have_executed: false,
            };
            job.answer(Err(e), &core.counters);
            continue;
        }
        job.attempts -= 1;
        shared.requeue(job);
    }
    go_on
}

/// How an engine ended: the reason, and how it reads ([`EngineDeath`]: whether by SIGABRT,
/// and whether while it was loading a module).
#[derive(Debug)]
struct Death {
    reason: String,
    how: EngineDeath,
}

/// Tells the supervisor that the engine died (once, after the op or batch it died under
/// has been answered). A death that is a GPU memory access fault ([`EngineDeath::is_gpu_fault`])
/// takes the suspects along, so the supervisor treats it as a sticky fault of them.
fn report_death(
    shared: &Shared,
    core: &DeviceCore,
    epoch: u64,
    died: Option<Death>,
    suspects: &mut Vec<(u64, String)>,
) {
    let Some(death) = died else { return };
    let suspects = if death.how.is_gpu_fault(!suspects.is_empty()) {
        std::mem::take(suspects)
    } else {
        Vec::new()
    };
    let reason = if death.how.aborted && death.how.loading {
        format!(
            "{}: the worker aborted during a module load (taken for the module loader's abort, not a kernel's \
             memory fault)",
            death.reason
        )
    } else {
        death.reason
    };
    shared.report(SupervisorMsg::ExecutorDied {
        device: core.index,
        epoch,
        reason,
        suspects,
    });
}

/// Acts on one op's execution: answers it, or reports its failure to the supervisor.
/// `false` when the executor must end (`poisoned`: the failure poisoned the engine). `died`
/// is set when the engine died (a batch records its death once; [`report_death`] tells
/// the supervisor).
#[allow(clippy::too_many_arguments)]
fn finish(
    shared: &Arc<Shared>,
    core: &DeviceCore,
    poisoned: bool,
    mut job: Job,
    result: Exec,
    suspects: &mut Vec<(u64, String)>,
    epoch: u64,
    died: &mut Option<Death>,
) -> bool {
    // A durable buffer made for a caller that was answered meanwhile (its deadline; a
    // dropped future is answered too) has no handle anywhere: freed, never recorded.
    if let (Op::Durable { .. }, Exec::Done(Ok(Reply::Buffer(buffer)))) = (&job.op, &result)
        && job.slot.is_answered()
    {
        free_unowned(shared, core, *buffer);
        core.counters.late_completion();
        return true;
    }
    // A write into a durable buffer counts once its host copy holds it too.
    let result = match result {
        Exec::Done(Ok(reply)) => match core.track_durable(&job.op) {
            Ok(false) => Exec::Done(Ok(reply)),
            Ok(true) => {
                let bytes = core.durable_bytes();
                shared.metrics_event(MetricsEvent::DurableHostBytes {
                    device: core.index,
                    bytes,
                });
                process::refresh_standby(shared, core.index);
                Exec::Done(Ok(reply))
            }
            Err(e) => Exec::Done(Err(e)),
        },
        other => other,
    };
    match result {
        Exec::Done(Ok(reply)) => {
            track_success(core, &job.op, &reply, suspects);
            if job.origin == Origin::Application {
                shared.breaker_result(core, true);
            }
            let made = match (&job.op, &reply) {
                (Op::Durable { id, .. }, Reply::Buffer(b)) => Some((*id, *b)),
                _ => None,
            };
            // Answered meanwhile (its deadline, between the check above and here): the
            // durable buffer it made has no handle anywhere: forgotten and freed.
            if !job.answer(Ok(reply), &core.counters)
                && let Some((id, buffer)) = made
            {
                lock(&core.durables).remove(&id);
                free_unowned(shared, core, buffer);
            }
            true
        }
        Exec::Done(Err(error)) => {
            let suspected = if error.class() == ErrorClass::Sticky {
                if let Op::Launch { module, function, .. } = &job.op {
                    add_suspect(suspects, module.id, function);
                }
                std::mem::take(suspects)
            } else {
                Vec::new()
            };
            shared.report(SupervisorMsg::Failed(Box::new(Failure {
                device: core.index,
                epoch,
                job,
                error,
                suspects: suspected,
            })));
            !poisoned
        }
        Exec::Died {
            may_have_executed,
            reason,
            aborted,
        } => {
            // A launch that may have run is a suspect of the fault that ended the worker.
            if may_have_executed && let Op::Launch { module, function, .. } = &job.op {
                add_suspect(suspects, module.id, function);
            }
            let death = died.get_or_insert(Death {
                reason,
                how: EngineDeath {
                    aborted,
                    loading: false,
                },
            });
            // The op running when the engine died was a module load.
            death.how.loading |= may_have_executed && job.kind() == OpKind::LoadModule;
            let gpu_fault = death.how.is_gpu_fault(!suspects.is_empty());
            if reruns_transparently(&job.op, job.origin, may_have_executed, gpu_fault) {
                job.attempts -= 1;
                shared.requeue(job);
            } else {
                let e = RuntimeError::DeviceRestarted {
                    device: core.index,
                    may_have_executed,
                };
                // A task whose worker aborted while it ran: a GPU memory fault of its own.
                let faulted = aborted && may_have_executed && job.kind() == OpKind::Task;
                shared.answer_or_rerun(job, e, faulted);
            }
            false
        }
    }
}

/// Frees a durable buffer made for a caller that was answered meanwhile (the runtime's own
/// op, on the priority lane; its answer goes nowhere).
fn free_unowned(shared: &Shared, core: &DeviceCore, buffer: hipvisor_core::BufferHandle) {
    let (tx, _) = tokio::sync::oneshot::channel::<crate::error::OpResult>();
    core.queue
        .enqueue(core.job(Op::Free { buffer }, Origin::Runtime, tx.into(), None));
    shared.queued(core.index);
}

/// Bookkeeping after a successful op: loaded modules (for reloads) and the kernels launched
/// since the last successful op that waited for the device (the suspects of a later sticky
/// fault).
fn track_success(core: &DeviceCore, op: &Op, reply: &Reply, suspects: &mut Vec<(u64, String)>) {
    match (op, reply) {
        (Op::LoadModule { source }, Reply::Module(m)) => {
            lock(&core.modules).insert(m.id, source.clone());
        }
        (Op::Launch { module, function, .. }, _) => add_suspect(suspects, module.id, function),
        _ if op.kind().is_synchronizing() => suspects.clear(),
        _ => {}
    }
}

fn add_suspect(suspects: &mut Vec<(u64, String)>, module: u64, function: &str) {
    if !suspects.iter().any(|(m, f)| *m == module && f == function) {
        suspects.push((module, function.to_string()));
    }
}
