//! The task an application builds ([`Task`]): scratch buffers, inputs, launches on scratch
//! and durable buffers, outputs — not yet bound to a device. It names durable buffers and
//! modules either of one device, or replicated ([`ReplicatedBuffer`], [`ReplicatedModule`]),
//! so it can run on any device that holds them all; [`Task::bind`] makes the device's
//! [`TaskOp`], which runs as one request (see [`crate::op::task`]).
//!
//! ```
//! use hipvisor_core::task::{Task, TaskArg};
//! use hipvisor_core::{KernelArg, ModuleHandle};
//! # let module = ModuleHandle { device: 0, id: 1 };
//! let mut task = Task::new();
//! let x = task.scratch(16);
//! task.copy_in(x, 0, vec![0u8; 16]);
//! task.launch(module, "scale", 1, 4, [x.into(), TaskArg::value(KernelArg::F32(2.0)), TaskArg::value(KernelArg::U32(4))]);
//! let out = task.copy_out(x, 0, 16);
//! assert_eq!(out, 0);
//! assert!(task.replayable());
//! ```

use std::sync::Arc;

use crate::error::InvalidReason;
use crate::op::task::{TaskArg as BoundArg, TaskInput, TaskLaunch, TaskOutput, TaskSource};
use crate::op::{BufferHandle, Dim3, KernelArg, ModuleHandle, Payload, TaskOp};

/// A buffer replicated on several devices (made by the runtime's `replicate`): the same
/// durable id and length on each.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicatedBuffer {
    id: u64,
    len: u64,
    devices: Arc<[u32]>,
}

impl ReplicatedBuffer {
    /// A replicated buffer: durable buffer `id` of `len` bytes on each of `devices`. (The
    /// runtime makes them; one made otherwise names buffers that may not exist.)
    pub fn new(id: u64, len: u64, devices: impl Into<Arc<[u32]>>) -> ReplicatedBuffer {
        ReplicatedBuffer {
            id,
            len,
            devices: devices.into(),
        }
    }

    /// The buffer's durable id, the same on every device.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Its length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// `true` for an empty buffer (never: durable buffers are not empty).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The devices holding a replica.
    pub fn devices(&self) -> &[u32] {
        &self.devices
    }

    /// The replica's handle on `device`, if it holds one.
    pub fn on(&self, device: u32) -> Option<BufferHandle> {
        self.devices.contains(&device).then_some(BufferHandle {
            device,
            epoch: BufferHandle::DURABLE_EPOCH,
            id: self.id,
            len: self.len,
        })
    }

    /// Every replica's handle.
    pub fn handles(&self) -> impl Iterator<Item = BufferHandle> + '_ {
        self.devices.iter().filter_map(|d| self.on(*d))
    }
}

/// A module loaded on several devices (the runtime's `replicate_module`): its handle on
/// each.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicatedModule {
    handles: Arc<[ModuleHandle]>,
}

impl ReplicatedModule {
    /// A replicated module from its handles (one per device).
    pub fn new(handles: impl Into<Arc<[ModuleHandle]>>) -> ReplicatedModule {
        ReplicatedModule {
            handles: handles.into(),
        }
    }

    /// The module's handle on `device`, if it is loaded there.
    pub fn on(&self, device: u32) -> Option<ModuleHandle> {
        self.handles.iter().find(|h| h.device == device).copied()
    }

    /// Every handle.
    pub fn handles(&self) -> &[ModuleHandle] {
        &self.handles
    }
}

/// A durable buffer a task names: of one device, or replicated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DurableRef {
    /// A durable buffer of one device (the task then runs there only).
    One(BufferHandle),
    /// A replicated buffer.
    Replicated(ReplicatedBuffer),
}

impl DurableRef {
    fn on(&self, device: u32) -> Option<BufferHandle> {
        match self {
            DurableRef::One(b) => (b.device == device).then_some(*b),
            DurableRef::Replicated(r) => r.on(device),
        }
    }
}

impl From<BufferHandle> for DurableRef {
    fn from(b: BufferHandle) -> Self {
        DurableRef::One(b)
    }
}

impl From<&ReplicatedBuffer> for DurableRef {
    fn from(r: &ReplicatedBuffer) -> Self {
        DurableRef::Replicated(r.clone())
    }
}

/// A module a task launches from: of one device, or replicated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModuleRef {
    /// A module of one device.
    One(ModuleHandle),
    /// A replicated module.
    Replicated(ReplicatedModule),
}

impl ModuleRef {
    fn on(&self, device: u32) -> Option<ModuleHandle> {
        match self {
            ModuleRef::One(m) => (m.device == device).then_some(*m),
            ModuleRef::Replicated(r) => r.on(device),
        }
    }
}

impl From<ModuleHandle> for ModuleRef {
    fn from(m: ModuleHandle) -> Self {
        ModuleRef::One(m)
    }
}

impl From<&ReplicatedModule> for ModuleRef {
    fn from(r: &ReplicatedModule) -> Self {
        ModuleRef::Replicated(r.clone())
    }
}

/// A task's scratch buffer (by index), made by [`Task::scratch`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Scratch(u32);

/// One argument of a task's launch.
#[derive(Debug, Clone, PartialEq)]
pub enum TaskArg {
    /// A scratch buffer of the task.
    Scratch(Scratch),
    /// A durable buffer the kernel only reads.
    Durable(DurableRef),
    /// A durable buffer the kernel writes: the task is then not replayable.
    DurableMut(DurableRef),
    /// A scalar.
    Value(KernelArg),
}

impl TaskArg {
    /// A durable buffer the kernel only reads.
    pub fn durable(b: impl Into<DurableRef>) -> TaskArg {
        TaskArg::Durable(b.into())
    }

    /// A durable buffer the kernel writes (the task is then not replayable).
    pub fn durable_mut(b: impl Into<DurableRef>) -> TaskArg {
        TaskArg::DurableMut(b.into())
    }

    /// A scalar.
    pub fn value(v: KernelArg) -> TaskArg {
        TaskArg::Value(v)
    }
}

impl From<Scratch> for TaskArg {
    fn from(s: Scratch) -> Self {
        TaskArg::Scratch(s)
    }
}

#[derive(Debug, Clone, PartialEq)]
struct Launch {
    module: ModuleRef,
    function: String,
    grid: Dim3,
    block: Dim3,
    shared_mem_bytes: u32,
    args: Vec<TaskArg>,
}

/// A short program for one device, not yet bound to one (see the module docs). Cheap to
/// clone (inputs are shared payloads).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Task {
    scratch: Vec<u64>,
    inputs: Vec<TaskInput>,
    launches: Vec<Launch>,
    outputs: Vec<TaskOutput>,
}

impl Task {
    /// An empty task.
    pub fn new() -> Task {
        Task::default()
    }

    /// A scratch buffer of `bytes`, allocated when the task runs and freed when it ends.
    pub fn scratch(&mut self, bytes: u64) -> Scratch {
        self.scratch.push(bytes);
        Scratch(self.scratch.len() as u32 - 1)
    }

    /// Copies `data` into `to` at `offset` before the first launch.
    pub fn copy_in(&mut self, to: Scratch, offset: u64, data: impl Into<Payload>) -> &mut Task {
        self.inputs.push(TaskInput {
            scratch: to.0,
            offset,
            data: data.into(),
        });
        self
    }

    /// Launches `function` of `module` with `grid` × `block` (one-dimensional from a
    /// `u32`), in the order of the calls.
    pub fn launch(
        &mut self,
        module: impl Into<ModuleRef>,
        function: &str,
        grid: impl Into<Dim3>,
        block: impl Into<Dim3>,
        args: impl IntoIterator<Item = TaskArg>,
    ) -> &mut Task {
        self.launches.push(Launch {
            module: module.into(),
            function: function.to_string(),
            grid: grid.into(),
            block: block.into(),
            shared_mem_bytes: 0,
            args: args.into_iter().collect(),
        });
        self
    }

    /// Copies `len` bytes at `offset` of `from` back after the last launch; returns the
    /// output's index in the task's answer.
    pub fn copy_out(&mut self, from: Scratch, offset: u64, len: u64) -> usize {
        self.outputs.push(TaskOutput {
            scratch: from.0,
            offset,
            len,
        });
        self.outputs.len() - 1
    }

    /// Whether the task may run again after a run that may have executed: it writes no
    /// durable buffer.
    pub fn replayable(&self) -> bool {
        !self
            .launches
            .iter()
            .flat_map(|l| &l.args)
            .any(|a| matches!(a, TaskArg::DurableMut(_)))
    }

    /// Whether `device` holds every durable buffer and module the task names.
    pub fn runs_on(&self, device: u32) -> bool {
        self.launches.iter().all(|l| {
            l.module.on(device).is_some()
                && l.args.iter().all(|a| match a {
                    TaskArg::Durable(d) | TaskArg::DurableMut(d) => d.on(device).is_some(),
                    _ => true,
                })
        })
    }

    /// The task bound to `device`, remembering itself (`source`) so the runtime can bind it
    /// to another device for a rerun.
    ///
    /// # Errors
    /// [`InvalidReason::BadTask`] when `device` lacks a durable buffer or module it names.
    pub fn bind(self: &Arc<Task>, device: u32) -> Result<TaskOp, InvalidReason> {
        let missing = |what: String| InvalidReason::BadTask {
            reason: format!("{what} has no replica on device {device}"),
        };
        let mut launches = Vec::with_capacity(self.launches.len());
        for l in &self.launches {
            let module = l
                .module
                .on(device)
                .ok_or_else(|| missing(format!("the module of `{}`", l.function)))?;
            let mut args = Vec::with_capacity(l.args.len());
            for a in &l.args {
                args.push(match a {
                    TaskArg::Scratch(s) => BoundArg::Scratch(s.0),
                    TaskArg::Durable(d) => BoundArg::Durable(
                        d.on(device)
                            .ok_or_else(|| missing(format!("a durable buffer of `{}`", l.function)))?,
                    ),
                    TaskArg::DurableMut(d) => BoundArg::DurableMut(
                        d.on(device)
                            .ok_or_else(|| missing(format!("a durable buffer of `{}`", l.function)))?,
                    ),
                    TaskArg::Value(v) => BoundArg::Value(*v),
                });
            }
            launches.push(TaskLaunch {
                module,
                function: l.function.clone(),
                grid: l.grid,
                block: l.block,
                shared_mem_bytes: l.shared_mem_bytes,
                args,
            });
        }
        Ok(TaskOp {
            scratch: self.scratch.clone(),
            inputs: self.inputs.clone(),
            launches,
            outputs: self.outputs.clone(),
            source: Some(self.clone()),
        })
    }
}

impl TaskSource for Task {
    fn bind_to(self: Arc<Self>, device: u32) -> Option<TaskOp> {
        self.bind(device).ok()
    }
}
