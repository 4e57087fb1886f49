//! Where a device's ops run: the [`Engine`] trait the executor drives, its batching
//! extension ([`Batches`]), what one op's run gives ([`Exec`]), and the engine of thread
//! isolation ([`ThreadEngine`]: the device context on the executor's own thread). The engine
//! of process isolation is in `process.rs`.

use std::panic::AssertUnwindSafe;

use hipvisor_core::{DeviceContext, GpuError, Op, Origin, Reply};

/// What running one op on an engine gave.
pub(crate) enum Exec {
    /// The op ran (or was rejected) and this is its result.
    Done(Result<Reply, GpuError>),
    /// The engine died under the op; `may_have_executed` says whether the op had started,
    /// `aborted` whether the engine ended by SIGABRT (how ROCm ends a process whose kernel
    /// made a memory access fault).
    Died {
        may_have_executed: bool,
        reason: String,
        aborted: bool,
    },
}

/// How many ops an engine takes in one [`Batches::run_batch`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct Batching {
    /// The most ops in a batch.
    pub(crate) ops: usize,
    /// The most [`Batches::batch_cost`] in a batch.
    pub(crate) bytes: usize,
}

/// Where a device's ops run.
pub(crate) trait Engine {
    /// Runs one op.
    fn run(&mut self, op: &Op, origin: Origin) -> Exec;
    /// Whether the engine is unusable after `error` (a worker poisoned by a sticky fault).
    fn poisoned_by(&self, error: &GpuError) -> bool;
    /// The engine's batching, when it runs several ops per round trip; `None`: one at a
    /// time.
    fn batches(&mut self) -> Option<&mut dyn Batches> {
        None
    }
}

/// An engine that runs several ops per round trip (a worker process).
pub(crate) trait Batches {
    /// How far it batches.
    fn limits(&self) -> Batching;
    /// What `op` takes of a batch's byte budget; `None` when it cannot travel in a batch.
    fn batch_cost(&self, op: &Op) -> Option<usize>;
    /// Runs ops in order, handing `each` the [`Exec`] of every op that ran — as soon as
    /// it is known, in order — with whether it poisoned the engine. The ops past the last
    /// one handed over did not start: all of them ran, or the last one handed over
    /// poisoned the engine. When the engine dies, every op not handed over yet gets an
    /// `Exec::Died` saying whether it may have executed.
    fn run_batch(&mut self, ops: Vec<(Op, Origin)>, each: &mut dyn FnMut(Exec, bool));
}

/// Thread isolation: the context lives on this thread.
pub(crate) struct ThreadEngine(pub(crate) Box<dyn DeviceContext>);

impl Engine for ThreadEngine {
    fn run(&mut self, op: &Op, origin: Origin) -> Exec {
        // A task runs as its ops (`backend::task`); any other op as itself.
        let ctx = &mut *self.0;
        let run = || hipvisor_core::backend::task::execute(ctx, op, origin, &mut |_| {});
        match std::panic::catch_unwind(AssertUnwindSafe(run)) {
            Ok(r) => Exec::Done(r),
            Err(panic) => Exec::Died {
                may_have_executed: true,
                reason: format!("backend panicked: {}", panic_message(&*panic)),
                aborted: false,
            },
        }
    }

    fn poisoned_by(&self, _: &GpuError) -> bool {
        // A sticky fault poisons the whole process here; the supervisor fails every device.
        false
    }
}

/// The message of a caught panic.
pub(crate) fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}
