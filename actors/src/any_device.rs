//! One device type for application code, local or remote ([`Device`]): the same typed ops,
//! the same answers, whether the device is this process's or a cluster node's.
//!
//! What identifies a device: its node ([`Device::node`], `None` for this process's own)
//! and its index on that node ([`Device::index`]). The handles a device gives (buffers,
//! modules) carry that index in their `device` field, as every node numbers its own
//! devices from 0: a handle is used with the device that gave it (or, for a buffer a node
//! moved to another of its devices, that node's device of the handle's index).

use hipvisor_core::task::Task;
use hipvisor_core::{BufferHandle, Op, Payload};

use crate::error::{OpResult, RuntimeError};
use crate::handle::{DeviceHandle, typed_ops};
use crate::state::DeviceState;

/// A device of this process's runtime or of a cluster node. Cheap to clone.
///
/// (Non-exhaustive: its `Remote` variant exists with feature `cluster`, which another crate
/// of the same build may turn on.)
#[derive(Clone)]
#[non_exhaustive]
pub enum Device {
    /// A device of this process's runtime.
    Local(DeviceHandle),
    /// A device of a joined node (feature `cluster`).
    #[cfg(feature = "cluster")]
    Remote(crate::cluster::RemoteDevice),
}

impl From<DeviceHandle> for Device {
    fn from(h: DeviceHandle) -> Self {
        Device::Local(h)
    }
}

#[cfg(feature = "cluster")]
impl From<crate::cluster::RemoteDevice> for Device {
    fn from(d: crate::cluster::RemoteDevice) -> Self {
        Device::Remote(d)
    }
}

impl Device {
    /// The device's index on its node (this process's devices: on this runtime).
    pub fn index(&self) -> u32 {
        match self {
            Device::Local(h) => h.index(),
            #[cfg(feature = "cluster")]
            Device::Remote(d) => d.index(),
        }
    }

    /// The node it belongs to; `None` for this process's own.
    pub fn node(&self) -> Option<&str> {
        match self {
            Device::Local(_) => None,
            #[cfg(feature = "cluster")]
            Device::Remote(d) => Some(d.node()),
        }
    }

    /// Its state: now for a local device; as of its node's last heartbeat for a remote one
    /// (`Lost` once the node is lost).
    pub fn state(&self) -> DeviceState {
        match self {
            Device::Local(h) => h.state(),
            #[cfg(feature = "cluster")]
            Device::Remote(d) => d.state(),
        }
    }

    /// Submits an op and waits for its one answer.
    ///
    /// # Errors
    /// The op's typed error; for a remote device also `NodeLost`, `Remote`.
    pub async fn submit(&self, op: Op) -> OpResult {
        match self {
            Device::Local(h) => h.submit(op).await,
            #[cfg(feature = "cluster")]
            Device::Remote(d) => d.submit(op).await,
        }
    }

    /// Runs a task on this device (see [`DeviceHandle::run`]). The replicas and modules it
    /// names are this device's kind: a local device runs tasks naming
    /// `Runtime::replicate`'s, a remote one tasks naming `Cluster::replicate`'s (the other
    /// kind answers `BadTask`).
    ///
    /// # Errors
    /// The task's typed error; for a remote device also `NodeLost`, `Remote`.
    pub async fn run(&self, task: &Task) -> Result<Vec<Payload>, RuntimeError> {
        match self {
            Device::Local(h) => h.run(task).await,
            #[cfg(feature = "cluster")]
            Device::Remote(d) => d.run(task).await,
        }
    }

    /// Uploads `data` as a durable buffer of this device (see [`DeviceHandle::durable`]).
    ///
    /// # Errors
    /// The op's typed error; for a remote device also `NodeLost`, `Remote`.
    pub async fn durable(&self, data: impl Into<Payload>) -> Result<BufferHandle, RuntimeError> {
        match self {
            Device::Local(h) => h.durable(data).await,
            #[cfg(feature = "cluster")]
            Device::Remote(d) => d.durable(data).await,
        }
    }

    typed_ops!();
}
