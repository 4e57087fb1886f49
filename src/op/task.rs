//! A task bound to one device ([`TaskOp`], the body of `Op::Task`): scratch buffers to
//! allocate, host bytes to copy into them, kernels to launch on scratch and durable
//! buffers, and byte ranges to copy back — executed as one request, answered once with its
//! outputs, its scratch always freed. How it runs is `backend::task`; the task an
//! application builds, not yet bound to a device, is `crate::task::Task`.
//!
//! A task is small by design (the common shape of GPU work: read-mostly state in durable
//! buffers, short requests): at most [`MAX_TASK_ITEMS`] scratch buffers, inputs, launches and
//! outputs each, and at most [`MAX_TASK_BYTES`] of inputs and of outputs, so that a task
//! always travels to a worker and back in one frame of its protocol. Bulk data goes through
//! durable buffers and ordinary copies.

use serde::{Deserialize, Serialize};

use super::handle::{BufferHandle, Dim3, KernelArg, ModuleHandle};
use super::kind::OpKind;
use super::limits::{MAX_KERNEL_ARGS, MAX_KERNEL_NAME_BYTES, check_launch_dims, check_launch_limits};
use super::payload::Payload;
use crate::error::InvalidReason;

/// The most scratch buffers, inputs, launches or outputs a task has (each).
pub const MAX_TASK_ITEMS: usize = 64;

/// The most bytes a task copies in, and the most it copies out (each, in total).
pub const MAX_TASK_BYTES: usize = 32 * 1024;

/// One argument of a task's launch.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskArg {
    /// The task's scratch buffer with this index.
    Scratch(u32),
    /// A durable buffer the kernel only reads.
    Durable(BufferHandle),
    /// A durable buffer the kernel writes: the task is then not replayable (a rerun would
    /// apply its writes twice) and answers like a single op does.
    DurableMut(BufferHandle),
    /// A scalar (never a buffer: a task names its buffers as scratch or durable ones, so
    /// that it can run in any context that holds them).
    Value(KernelArg),
}

/// Host bytes copied into a scratch buffer before the first launch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskInput {
    /// The scratch buffer.
    pub scratch: u32,
    /// Byte offset in it.
    pub offset: u64,
    /// The bytes.
    pub data: Payload,
}

/// One kernel launch of a task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskLaunch {
    /// The module, on the task's device.
    pub module: ModuleHandle,
    /// The kernel's name in the module.
    pub function: String,
    /// Grid dimensions (in blocks).
    pub grid: Dim3,
    /// Block dimensions (in threads).
    pub block: Dim3,
    /// Dynamic shared memory per block, in bytes.
    pub shared_mem_bytes: u32,
    /// The kernel's arguments, in order.
    pub args: Vec<TaskArg>,
}

/// A byte range of a scratch buffer copied back to the host after the last launch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskOutput {
    /// The scratch buffer.
    pub scratch: u32,
    /// Byte offset in it.
    pub offset: u64,
    /// Number of bytes.
    pub len: u64,
}

/// Where a bound task came from: what binds it again to another device (a rerun elsewhere),
/// kept with the op on the host and never sent.
pub trait TaskSource: std::fmt::Debug + Send + Sync {
    /// The task bound to `device`, if the device holds every durable buffer and module it
    /// names.
    fn bind_to(self: std::sync::Arc<Self>, device: u32) -> Option<TaskOp>;
}

/// A task bound to one device: the body of `Op::Task`.
///
/// It runs in this order: allocate every scratch buffer, copy every input, launch every
/// kernel, copy every output (or, with no output, synchronize: the answer vouches for the
/// kernels), free every scratch buffer — the last step whatever happened before.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TaskOp {
    /// The size in bytes of each scratch buffer (each greater than zero).
    pub scratch: Vec<u64>,
    /// Copies into scratch buffers.
    pub inputs: Vec<TaskInput>,
    /// The launches.
    pub launches: Vec<TaskLaunch>,
    /// Copies out of scratch buffers, answered in this order.
    pub outputs: Vec<TaskOutput>,
    /// What binds the task to another device, for a rerun there (host side only).
    #[serde(skip)]
    pub source: Option<std::sync::Arc<dyn TaskSource>>,
}

/// Equal tasks do the same (their sources aside).
impl PartialEq for TaskOp {
    fn eq(&self, other: &Self) -> bool {
        (&self.scratch, &self.inputs, &self.launches, &self.outputs)
            == (&other.scratch, &other.inputs, &other.launches, &other.outputs)
    }
}

impl TaskOp {
    /// The task's identity for quarantine, the same on every device: its scratch sizes, its
    /// inputs' bytes, its kernels' names, dimensions and arguments (durable buffers by id),
    /// its outputs. A poison request faults the same way wherever it runs.
    pub fn fingerprint(&self) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.scratch.hash(&mut h);
        for i in &self.inputs {
            (i.scratch, i.offset, i.data.as_bytes()).hash(&mut h);
        }
        for l in &self.launches {
            (&l.function, l.grid, l.block, l.shared_mem_bytes).hash(&mut h);
            for a in &l.args {
                match a {
                    TaskArg::Scratch(i) => (0u8, u64::from(*i)).hash(&mut h),
                    TaskArg::Durable(b) => (1u8, b.id).hash(&mut h),
                    TaskArg::DurableMut(b) => (2u8, b.id).hash(&mut h),
                    TaskArg::Value(v) => (3u8, format!("{v:?}")).hash(&mut h),
                }
            }
        }
        for o in &self.outputs {
            (o.scratch, o.offset, o.len).hash(&mut h);
        }
        h.finish()
    }

    /// Whether the task may run again after a run that may have executed: it writes no
    /// durable buffer (no [`TaskArg::DurableMut`]), so a rerun's scratch is fresh and its
    /// answer is the same.
    pub fn replayable(&self) -> bool {
        !self
            .launches
            .iter()
            .flat_map(|l| &l.args)
            .any(|a| matches!(a, TaskArg::DurableMut(_)))
    }

    /// The same task for `device`: every module and durable buffer it names is taken to
    /// be that device's (a task bound by another numbering of devices — a cluster's — sent
    /// to the node that numbers its device `device`). Scratch buffers and values are the
    /// same everywhere.
    pub fn retarget(&mut self, device: u32) {
        for l in &mut self.launches {
            l.module.device = device;
            for a in &mut l.args {
                if let TaskArg::Durable(b) | TaskArg::DurableMut(b) = a {
                    b.device = device;
                }
            }
        }
    }

    /// The durable buffers the task names (once per argument).
    pub fn durable_buffers(&self) -> impl Iterator<Item = BufferHandle> + '_ {
        self.launches.iter().flat_map(|l| &l.args).filter_map(|a| match a {
            TaskArg::Durable(b) | TaskArg::DurableMut(b) => Some(*b),
            _ => None,
        })
    }

    /// The task's own ops in the order they run, as the simulator's fault plan sees them
    /// (kind, and kernel for a launch): the allocations, the inputs, the launches, the
    /// outputs. (The closing synchronize and the frees are the runtime's: never faulted.)
    pub fn inner_ops(&self) -> impl Iterator<Item = (OpKind, Option<&str>)> + '_ {
        let allocs = self.scratch.iter().map(|_| (OpKind::Alloc, None));
        let inputs = self.inputs.iter().map(|_| (OpKind::CopyToDevice, None));
        let launches = self
            .launches
            .iter()
            .map(|l| (OpKind::Launch, Some(l.function.as_str())));
        let outputs = self.outputs.iter().map(|_| (OpKind::CopyFromDevice, None));
        allocs.chain(inputs).chain(launches).chain(outputs)
    }

    /// The total bytes of the outputs.
    pub fn output_bytes(&self) -> u64 {
        self.outputs.iter().map(|o| o.len).fold(0, u64::saturating_add)
    }

    /// The shape limits of a task (see the module docs), a launch's own limits for each
    /// launch (kernel names and arguments, in total), and its arguments: scratch indices
    /// in range, durable buffers named by durable handles, no plain buffer.
    ///
    /// # Errors
    /// [`InvalidReason::BadTask`], or a launch's [`InvalidReason::BadArguments`].
    pub fn check_limits(&self) -> Result<(), InvalidReason> {
        let bad = |reason: String| Err(InvalidReason::BadTask { reason });
        for (what, n) in [
            ("scratch buffers", self.scratch.len()),
            ("inputs", self.inputs.len()),
            ("launches", self.launches.len()),
            ("outputs", self.outputs.len()),
        ] {
            if n > MAX_TASK_ITEMS {
                return bad(format!("{n} {what}; at most {MAX_TASK_ITEMS}"));
            }
        }
        let input_bytes: usize = self.inputs.iter().map(|i| i.data.len()).sum();
        if input_bytes > MAX_TASK_BYTES {
            return bad(format!(
                "{input_bytes} bytes of inputs; at most {MAX_TASK_BYTES} (copy bulk data into a durable buffer)"
            ));
        }
        let output_bytes = self.output_bytes();
        if output_bytes > MAX_TASK_BYTES as u64 {
            return bad(format!("{output_bytes} bytes of outputs; at most {MAX_TASK_BYTES}"));
        }
        let names: usize = self.launches.iter().map(|l| l.function.len()).sum();
        let args: usize = self.launches.iter().map(|l| l.args.len()).sum();
        if names > MAX_KERNEL_NAME_BYTES || args > MAX_KERNEL_ARGS {
            return bad(format!(
                "{names} bytes of kernel names and {args} arguments in all; at most {MAX_KERNEL_NAME_BYTES} and \
                 {MAX_KERNEL_ARGS}"
            ));
        }
        let scratch = self.scratch.len();
        let index = |i: u32, what: &str| {
            if (i as usize) < scratch {
                Ok(())
            } else {
                bad(format!("{what} names scratch buffer {i}; the task has {scratch}"))
            }
        };
        for i in &self.inputs {
            index(i.scratch, "an input")?;
        }
        for o in &self.outputs {
            index(o.scratch, "an output")?;
        }
        for l in &self.launches {
            check_launch_limits(&l.function, l.args.len())?;
            for a in &l.args {
                match a {
                    TaskArg::Scratch(i) => index(*i, &format!("an argument of `{}`", l.function))?,
                    TaskArg::Durable(b) | TaskArg::DurableMut(b) if !b.is_durable() => {
                        return bad(format!(
                            "an argument of `{}` names buffer {} of epoch {} as durable; it is not a durable \
                             buffer's handle",
                            l.function, b.id, b.epoch
                        ));
                    }
                    TaskArg::Value(KernelArg::Buffer(_)) => {
                        return bad(format!(
                            "an argument of `{}` is a plain buffer handle: a task names scratch and durable \
                             buffers only",
                            l.function
                        ));
                    }
                    _ => {}
                }
            }
        }
        Ok(())
    }

    /// The checks of sizes that need no device: scratch buffers not empty, every input and
    /// output inside its scratch buffer, every launch's dimensions.
    ///
    /// # Errors
    /// [`InvalidReason::ZeroSizeAllocation`], [`InvalidReason::OutOfBounds`],
    /// [`InvalidReason::BadLaunchConfig`] (or [`TaskOp::check_limits`]'s, for an index out
    /// of range).
    pub fn check_sizes(&self) -> Result<(), InvalidReason> {
        self.check_limits()?;
        if self.scratch.contains(&0) {
            return Err(InvalidReason::ZeroSizeAllocation);
        }
        let ranges = self
            .inputs
            .iter()
            .map(|i| (i.scratch, i.offset, i.data.len() as u64))
            .chain(self.outputs.iter().map(|o| (o.scratch, o.offset, o.len)));
        for (scratch, offset, len) in ranges {
            let buffer_len = self.scratch[scratch as usize];
            if offset.checked_add(len).is_none_or(|end| end > buffer_len) {
                return Err(InvalidReason::OutOfBounds {
                    offset,
                    len,
                    buffer_len,
                });
            }
        }
        for l in &self.launches {
            check_launch_dims(l.grid, l.block)?;
        }
        Ok(())
    }
}
