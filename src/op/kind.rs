//! The kind of an operation ([`OpKind`]): the key of retry policies, metric labels and error
//! messages. It sits below everything else (errors name the op that failed) and imports
//! nothing of the crate.

use serde::{Deserialize, Serialize};
use std::fmt;

/// The kind of an operation: the key of per-operation retry policies and of metric labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OpKind {
    /// [`Op::Alloc`](super::Op::Alloc)
    Alloc,
    /// [`Op::Free`](super::Op::Free)
    Free,
    /// [`Op::CopyToDevice`](super::Op::CopyToDevice)
    CopyToDevice,
    /// [`Op::CopyFromDevice`](super::Op::CopyFromDevice)
    CopyFromDevice,
    /// [`Op::CopyDeviceToDevice`](super::Op::CopyDeviceToDevice)
    CopyDeviceToDevice,
    /// [`Op::Memset`](super::Op::Memset)
    Memset,
    /// [`Op::LoadModule`](super::Op::LoadModule)
    LoadModule,
    /// [`Op::Launch`](super::Op::Launch)
    Launch,
    /// [`Op::Synchronize`](super::Op::Synchronize)
    Synchronize,
    /// [`Op::MemInfo`](super::Op::MemInfo)
    MemInfo,
    /// [`Op::DeviceInfo`](super::Op::DeviceInfo)
    DeviceInfo,
    /// [`Op::Durable`](super::Op::Durable)
    Durable,
    /// [`Op::Task`](super::Op::Task): counted as one op, whatever it does inside.
    Task,
}

impl OpKind {
    /// Every kind, in declaration order.
    pub const ALL: [OpKind; 13] = [
        OpKind::Alloc,
        OpKind::Free,
        OpKind::CopyToDevice,
        OpKind::CopyFromDevice,
        OpKind::CopyDeviceToDevice,
        OpKind::Memset,
        OpKind::LoadModule,
        OpKind::Launch,
        OpKind::Synchronize,
        OpKind::MemInfo,
        OpKind::DeviceInfo,
        OpKind::Durable,
        OpKind::Task,
    ];

    /// The kind's name in `snake_case` (config keys, metric labels).
    pub fn as_str(self) -> &'static str {
        match self {
            OpKind::Alloc => "alloc",
            OpKind::Free => "free",
            OpKind::CopyToDevice => "copy_to_device",
            OpKind::CopyFromDevice => "copy_from_device",
            OpKind::CopyDeviceToDevice => "copy_device_to_device",
            OpKind::Memset => "memset",
            OpKind::LoadModule => "load_module",
            OpKind::Launch => "launch",
            OpKind::Synchronize => "synchronize",
            OpKind::MemInfo => "mem_info",
            OpKind::DeviceInfo => "device_info",
            OpKind::Durable => "durable",
            OpKind::Task => "task",
        }
    }

    /// Parses a `snake_case` name.
    pub fn from_name(name: &str) -> Option<OpKind> {
        OpKind::ALL.into_iter().find(|k| k.as_str() == name)
    }

    /// Whether executing the operation twice has the same effect as executing it once.
    ///
    /// The runtime may transparently resubmit an idempotent op whose first execution is in
    /// doubt (it may or may not have run). Copies, memset, synchronize and the queries are
    /// idempotent (a device-to-device copy is, because source and destination may not
    /// overlap), and so is filling a durable buffer. `Alloc` (a second buffer would leak),
    /// `Free` (a double free), `LoadModule` (a second module), `Launch` (kernels may update
    /// memory in place, as `saxpy` does) and `Task` (its kernels may write a durable buffer)
    /// are not — a task that writes none is rerun by its own rule (`TaskOp::replayable`).
    pub fn is_idempotent(self) -> bool {
        !matches!(
            self,
            OpKind::Alloc | OpKind::Free | OpKind::LoadModule | OpKind::Launch | OpKind::Task
        )
    }

    /// Whether a successful op of this kind proves that the kernels launched before it
    /// finished without a fault: it waited for them (synchronize; a copy to the host, which
    /// is blocking). Mem-info, memsets, allocations and the like do not wait for the GPU — a
    /// kernel may still be running, and fault, after they succeed — so they prove nothing
    /// (an earlier sticky fault does surface in them: measured on an H200, every call after
    /// an illegal address returns 700).
    ///
    /// A task is: it ends with its copies to the host, or with a synchronize when it has
    /// none.
    pub fn is_synchronizing(self) -> bool {
        matches!(self, OpKind::Synchronize | OpKind::CopyFromDevice | OpKind::Task)
    }
}

impl fmt::Display for OpKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
