//! How a task runs on a device context: as the ops it is made of, one after the other, each
//! checked and executed by the context as a single op would be — so every backend runs
//! tasks, and the simulator's fault plan applies to each op inside one.

use crate::backend::{DeviceContext, Origin};
use crate::error::GpuError;
use crate::op::task::{TaskArg, TaskOp};
use crate::op::{BufferHandle, KernelArg, Op, Reply};

/// Executes `op` on `ctx`: a task as its ops ([`run_task`]), any other op as itself.
/// `before` is called with the index of each of a task's own ops before it runs (see
/// [`TaskOp::inner_ops`]), and with 0 before a single op: where a worker hands the fault
/// the host planned for it to the simulator.
///
/// # Errors
/// The op's error.
pub fn execute(
    ctx: &mut dyn DeviceContext,
    op: &Op,
    origin: Origin,
    before: &mut dyn FnMut(usize),
) -> Result<Reply, GpuError> {
    match op {
        Op::Task(task) => run_task(ctx, task, origin, before),
        op => {
            before(0);
            ctx.execute(op, origin)
        }
    }
}

/// Runs a task: allocates its scratch buffers, copies its inputs, launches its kernels,
/// copies its outputs (or synchronizes, when it has none) and frees its scratch buffers —
/// always, whatever failed before (a free that fails, on a poisoned context, changes
/// nothing: the context is replaced). The first error ends the task and is its answer.
///
/// # Errors
/// The first error of one of its ops (a task that cannot run at all: `BadTask`).
pub fn run_task(
    ctx: &mut dyn DeviceContext,
    task: &TaskOp,
    origin: Origin,
    before: &mut dyn FnMut(usize),
) -> Result<Reply, GpuError> {
    let device = ctx.device();
    if let Err(reason) = task.check_sizes() {
        return Err(GpuError::invalid(crate::op::OpKind::Task, device, reason));
    }
    let mut scratch: Vec<BufferHandle> = Vec::with_capacity(task.scratch.len());
    let result = run_steps(ctx, task, origin, before, &mut scratch);
    for buffer in scratch.into_iter().rev() {
        let _ = ctx.execute(&Op::Free { buffer }, Origin::Runtime);
    }
    result
}

fn run_steps(
    ctx: &mut dyn DeviceContext,
    task: &TaskOp,
    origin: Origin,
    before: &mut dyn FnMut(usize),
    scratch: &mut Vec<BufferHandle>,
) -> Result<Reply, GpuError> {
    let mut step = 0;
    let mut next = || {
        step += 1;
        step - 1
    };
    for &bytes in &task.scratch {
        before(next());
        match ctx.execute(&Op::Alloc { bytes }, origin)? {
            Reply::Buffer(b) => scratch.push(b),
            other => unreachable!("an allocation answered {other:?}"),
        }
    }
    for input in &task.inputs {
        before(next());
        let op = Op::CopyToDevice {
            dst: scratch[input.scratch as usize],
            offset: input.offset,
            data: input.data.clone(),
        };
        ctx.execute(&op, origin)?;
    }
    for launch in &task.launches {
        let args = launch
            .args
            .iter()
            .map(|a| match a {
                TaskArg::Scratch(i) => KernelArg::Buffer(scratch[*i as usize]),
                TaskArg::Durable(b) | TaskArg::DurableMut(b) => KernelArg::Buffer(*b),
                TaskArg::Value(v) => *v,
            })
            .collect();
        before(next());
        let op = Op::Launch {
            module: launch.module,
            function: launch.function.clone(),
            grid: launch.grid,
            block: launch.block,
            shared_mem_bytes: launch.shared_mem_bytes,
            args,
        };
        ctx.execute(&op, origin)?;
    }
    let mut outputs = Vec::with_capacity(task.outputs.len());
    for output in &task.outputs {
        before(next());
        let op = Op::CopyFromDevice {
            src: scratch[output.scratch as usize],
            offset: output.offset,
            len: output.len,
        };
        match ctx.execute(&op, origin)? {
            Reply::Data(d) => outputs.push(d),
            other => unreachable!("a copy to the host answered {other:?}"),
        }
    }
    if task.outputs.is_empty() && !task.launches.is_empty() {
        // The answer vouches for the kernels: wait for them (the runtime's own op: a fault
        // of theirs surfaces here, none is planned for it).
        ctx.execute(&Op::Synchronize, Origin::Runtime)?;
    }
    Ok(Reply::Outputs(outputs))
}
