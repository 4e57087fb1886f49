//! The executor of one device in thread isolation: a dedicated OS thread that owns the
//! device context and runs the blocking backend calls, one op at a time.
//!
//! It answers successful ops straight to the caller's reply slot; a failed op goes to the
//! supervisor with its error (and, for sticky faults, the kernels suspected of it). If the
//! supervisor is gone, the executor answers the error itself: every op gets one answer.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use crossbeam_channel::select;
use hipvisor_core::{Backend, DeviceContext, ErrorClass, GpuError, ModuleHandle, Op, Origin, Reply};

use crate::device::{Current, DeviceCore, Work};
use crate::error::RuntimeError;
use crate::job::Job;
use crate::runtime::Shared;
use crate::state::DeviceState;
use crate::supervisor::{Failure, SupervisorMsg};

/// Starts the executor thread of `device` for a new context of `epoch`.
///
/// # Errors
/// The OS could not start a thread.
/// `opened`, if given, receives the result of opening the context (the runtime's start
/// waits for it).
pub(crate) fn spawn(
    shared: Arc<Shared>,
    device: u32,
    epoch: u64,
    opened: Option<tokio::sync::oneshot::Sender<()>>,
) -> std::io::Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    {
        let core = &shared.cores[device as usize];
        let mut slot = core.executor_stop.lock().unwrap_or_else(|p| p.into_inner());
        slot.store(true, Ordering::Release);
        *slot = stop.clone();
        core.epoch.store(epoch, Ordering::Release);
    }
    std::thread::Builder::new()
        .name(format!("hipvisor-gpu{device}"))
        .spawn(move || run(shared, device, epoch, stop, opened))
        .map(|_| ())
}

fn run(
    shared: Arc<Shared>,
    device: u32,
    epoch: u64,
    stop: Arc<AtomicBool>,
    opened: Option<tokio::sync::oneshot::Sender<()>>,
) {
    let backend: Arc<dyn Backend> = shared.backend.clone();
    let result = open(&shared, &*backend, device, epoch);
    // The supervisor hears of the outcome before whoever waits for `opened` goes on.
    let ctx = match result {
        Ok(ctx) => {
            shared.report(SupervisorMsg::Opened { device, epoch });
            Some(ctx)
        }
        Err(error) => {
            shared.report(SupervisorMsg::OpenFailed { device, epoch, error });
            None
        }
    };
    if let Some(tx) = opened {
        let _ = tx.send(());
    }
    let Some(mut ctx) = ctx else { return };
    let core = &shared.cores[device as usize];
    let mut suspects: Vec<(u64, String)> = Vec::new();
    while !stop.load(Ordering::Acquire) {
        let work = match core.priority.1.try_recv() {
            Ok(w) => w,
            Err(_) => select! {
                recv(core.priority.1) -> w => w,
                recv(core.jobs.1) -> w => w,
            }
            .expect("the core owns both ends of its channels"),
        };
        let Work::Job(job) = work else { continue };
        if stop.load(Ordering::Acquire) {
            // Not ours any more: put it back for the next executor, or shutdown's drain.
            core.enqueue(*job);
            break;
        }
        if !execute(&shared, core, &mut *ctx, *job, &mut suspects, epoch) {
            break;
        }
    }
}

/// Opens the context and reloads the device's modules into it.
fn open(shared: &Shared, backend: &dyn Backend, device: u32, epoch: u64) -> Result<Box<dyn DeviceContext>, GpuError> {
    let mut ctx = backend.open(device, epoch)?;
    let modules = shared.cores[device as usize]
        .modules
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    for (id, source) in &modules {
        ctx.restore_module(ModuleHandle { device, id: *id }, source)?;
    }
    Ok(ctx)
}

/// Runs one job; `false` when the executor must end (its context is no longer usable).
fn execute(
    shared: &Shared,
    core: &DeviceCore,
    ctx: &mut dyn DeviceContext,
    mut job: Job,
    suspects: &mut Vec<(u64, String)>,
    epoch: u64,
) -> bool {
    if job.slot.is_answered() {
        // Answered while queued (deadline, shutdown): nothing to do.
        return true;
    }
    if core.state.get() == DeviceState::Failed {
        job.answer(Err(core.failed_error(false)), &core.counters);
        return true;
    }
    if Instant::now() >= job.deadline {
        let e = core.deadline_exceeded(job.kind(), false);
        job.answer(Err(e), &core.counters);
        return true;
    }
    if let Some(e) = core.is_quarantined(&job.op) {
        job.answer(Err(e), &core.counters);
        return true;
    }
    job.attempts += 1;
    *core.current.lock().unwrap_or_else(|p| p.into_inner()) = Some(Current {
        slot: job.slot.clone(),
        deadline: job.deadline,
        op: job.kind(),
    });
    let result = std::panic::catch_unwind(AssertUnwindSafe(|| ctx.execute(&job.op, job.origin)));
    *core.current.lock().unwrap_or_else(|p| p.into_inner()) = None;
    match result {
        Ok(Ok(reply)) => {
            track_success(core, &job.op, &reply, suspects);
            if job.origin == Origin::Application {
                core.breaker_result(true, shared);
            }
            job.answer(Ok(reply), &core.counters);
            true
        }
        Ok(Err(error)) => {
            let suspected = if error.class() == ErrorClass::Sticky {
                let mut s = std::mem::take(suspects);
                if let Op::Launch { module, function, .. } = &job.op {
                    s.push((module.id, function.clone()));
                }
                s
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
            true
        }
        Err(panic) => {
            let why = panic_message(&*panic);
            job.answer(
                Err(RuntimeError::DeviceRestarted {
                    device: core.index,
                    may_have_executed: true,
                }),
                &core.counters,
            );
            shared.report(SupervisorMsg::ExecutorDied {
                device: core.index,
                epoch,
                reason: format!("backend panicked: {why}"),
            });
            false
        }
    }
}

/// Bookkeeping after a successful op: loaded modules (for reloads) and the kernels launched
/// since the last successful synchronizing op (the suspects of a later sticky fault).
fn track_success(core: &DeviceCore, op: &Op, reply: &Reply, suspects: &mut Vec<(u64, String)>) {
    match (op, reply) {
        (Op::LoadModule { source }, Reply::Module(m)) => {
            core.modules
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(m.id, source.clone());
        }
        (Op::Launch { module, function, .. }, _) if !suspects.iter().any(|(m, f)| *m == module.id && f == function) => {
            suspects.push((module.id, function.clone()));
        }
        _ if op.kind().is_synchronizing() => suspects.clear(),
        _ => {}
    }
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}
