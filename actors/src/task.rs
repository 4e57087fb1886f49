//! Tasks ([`Task`]): a short program for one device — scratch buffers, copies in, launches
//! on scratch and durable buffers, copies out — submitted as one op and answered once with
//! its outputs; its scratch buffers are always freed.
//!
//! A replayable task (one that writes no durable buffer) is rerun by the runtime, whole,
//! when its device restarts, its worker dies, its device is lost or failed, or refuses it
//! (breaker open): on the restarted device or another ready device holding the durable
//! buffers and modules it names, within its deadline, at most `retry.task_reruns` times.
//! Its error is answered only when no such device exists or its reruns are spent. A task
//! that writes a durable buffer (`TaskArg::DurableMut`) is not rerun: it answers like a
//! single op does. Transient errors inside a task are retried (the whole task) by the
//! retry policy of `task` (`[retry.per_op.task]`), as a single op's are — for a task that
//! writes a durable buffer, only while the failure came before its first launch.
//!
//! A task that faults (a sticky fault, or its worker aborted by a GPU memory fault while it
//! ran) in `supervisor.quarantine_after` of its runs within the quarantine window is a
//! poison request: it is answered [`RuntimeError::TaskQuarantined`] and refused from then
//! on, while other tasks with the same kernels keep running. (Tasks do not make their
//! kernels suspects.)
//!
//! In thread isolation a sticky fault fails every device of the process: a task then
//! answers as a single op does. Recovery the application never sees needs process
//! isolation.
//!
//! In the metrics a task is one op of kind `task`, whatever it does inside.
//!
//! ```no_run
//! use hipvisor::{KernelArg, ModuleSource, Runtime, RuntimeError, Task, TaskArg};
//! use hipvisor::core::kernels::{f32_bytes, f32s};
//!
//! async fn serve(rt: &Runtime, weights: &[f32], bias: &[f32], x: &[f32]) -> Result<Vec<f32>, RuntimeError> {
//!     let (rows, cols) = (bias.len(), x.len());
//!     // State: uploaded once per device, kept on the host, restored into every new context.
//!     let w = rt.replicate(f32_bytes(weights)).await?;
//!     let b = rt.replicate(f32_bytes(bias)).await?;
//!     let kernels = rt.replicate_module(ModuleSource::Builtin).await?;
//!     // A request: one task, one round trip, rerun by the runtime when a device fails under it.
//!     let mut t = Task::new();
//!     let xs = t.scratch(4 * cols as u64);
//!     let ys = t.scratch(4 * rows as u64);
//!     t.copy_in(xs, 0, f32_bytes(x));
//!     let n = TaskArg::value(KernelArg::U32(rows as u32));
//!     t.launch(&kernels, "gemv", 1, rows as u32, [
//!         TaskArg::durable(&w), xs.into(), TaskArg::durable(&b), ys.into(),
//!         n.clone(), TaskArg::value(KernelArg::U32(cols as u32)),
//!     ]);
//!     t.launch(&kernels, "relu", 1, rows as u32, [ys.into(), n]);
//!     t.copy_out(ys, 0, 4 * rows as u64);
//!     Ok(f32s(rt.run(&t).await?[0].as_bytes()))
//! }
//! ```

use std::sync::Arc;

use hipvisor_core::task::{ReplicatedModule, Task};
use hipvisor_core::{ModuleSource, Op, OpKind, Payload, Reply};

use crate::error::RuntimeError;
use crate::handle::DeviceHandle;
use crate::runtime::Runtime;
use crate::state::DeviceState;

/// A task bound to `device`, as an op.
fn bound(task: &Task, device: u32) -> Result<Op, RuntimeError> {
    Arc::new(task.clone())
        .bind(device)
        .map(|t| Op::Task(Box::new(t)))
        .map_err(|reason| RuntimeError::Gpu(hipvisor_core::GpuError::invalid(OpKind::Task, device, reason)))
}

fn outputs(reply: Reply) -> Vec<Payload> {
    match reply {
        Reply::Outputs(o) => o,
        other => unreachable!("a task answered {other:?}"),
    }
}

impl DeviceHandle {
    /// Runs a task on this device (see the module docs), answered with its outputs in the
    /// order of [`Task::copy_out`]. A rerun may run it on another device holding what it
    /// names.
    ///
    /// # Errors
    /// The task's typed error: `BadTask` when this device lacks a durable buffer or module
    /// it names, the first failed op's error, `TaskQuarantined`, ...
    pub async fn run(&self, task: &Task) -> Result<Vec<Payload>, RuntimeError> {
        let op = bound(task, self.device)?;
        self.submit(op).await.map(outputs)
    }
}

impl Runtime {
    /// Runs a task on the least-loaded ready device (breaker not open) that holds every
    /// durable buffer and module it names — a restarting one when none is ready — answered
    /// with its outputs (see the module docs).
    ///
    /// # Errors
    /// [`RuntimeError::NoReadyDevice`] when no device holds what it names and is ready or
    /// restarting; the task's typed error.
    pub async fn run(&self, task: &Task) -> Result<Vec<Payload>, RuntimeError> {
        let source = Arc::new(task.clone());
        let first = (0..self.device_count())
            .find(|d| source.runs_on(*d))
            .ok_or(RuntimeError::NoReadyDevice)?;
        // Bound once to find where it goes (the routing binds it again there).
        let probe = source
            .bind(first)
            .map_err(|reason| RuntimeError::Gpu(hipvisor_core::GpuError::invalid(OpKind::Task, first, reason)))?;
        let (device, op) = match self.shared.task_target(&probe, None) {
            Some((d, t)) => (d, Op::Task(Box::new(t))),
            None => {
                let restarting = (0..self.device_count())
                    .find(|d| source.runs_on(*d) && self.states()[*d as usize] == DeviceState::Restarting);
                match restarting {
                    Some(d) => (d, bound(task, d)?),
                    None => return Err(RuntimeError::NoReadyDevice),
                }
            }
        };
        self.device(device)?.submit(op).await.map(outputs)
    }

    /// Loads a module on every device that is ready or restarting, as one module tasks name
    /// ([`ReplicatedModule`]; reloaded into new contexts like any module).
    ///
    /// # Errors
    /// When no device loaded it: the first device's error.
    pub async fn replicate_module(&self, source: ModuleSource) -> Result<ReplicatedModule, RuntimeError> {
        let loaded = self
            .on_every_device("a replicated module's load", |h| {
                let source = source.clone();
                async move { h.load_module(source).await }
            })
            .await?;
        let handles: Vec<_> = loaded.into_iter().map(|(_, m)| m).collect();
        Ok(ReplicatedModule::new(handles))
    }
}
