//! Where the main job's work goes: this process's runtime, or (feature `cluster`, `run
//! --join`) the devices of the joined nodes — the same calls either way.

use std::sync::Arc;

use hipvisor::{Device, ModuleSource, Payload, ReplicatedBuffer, ReplicatedModule, Runtime, RuntimeError, Task};

/// The devices the job uses.
pub(crate) enum Target {
    /// This process's runtime.
    Local(Arc<Runtime>),
    /// The devices of joined nodes (the job serves none of its own).
    #[cfg(feature = "cluster")]
    Cluster(Arc<hipvisor::cluster::Cluster>),
}

impl Target {
    /// A durable buffer on every device.
    pub(crate) async fn replicate(&self, data: Vec<u8>) -> Result<ReplicatedBuffer, RuntimeError> {
        match self {
            Target::Local(rt) => rt.replicate(data).await,
            #[cfg(feature = "cluster")]
            Target::Cluster(c) => c.replicate(data).await,
        }
    }

    /// A module on every device.
    pub(crate) async fn replicate_module(&self, source: ModuleSource) -> Result<ReplicatedModule, RuntimeError> {
        match self {
            Target::Local(rt) => rt.replicate_module(source).await,
            #[cfg(feature = "cluster")]
            Target::Cluster(c) => c.replicate_module(source).await,
        }
    }

    /// Runs a task where the runtime (or the cluster) places it.
    pub(crate) async fn run(&self, task: &Task) -> Result<Vec<Payload>, RuntimeError> {
        match self {
            Target::Local(rt) => rt.run(task).await,
            #[cfg(feature = "cluster")]
            Target::Cluster(c) => c.run(task).await,
        }
    }

    /// The least-loaded ready device.
    pub(crate) fn pick(&self) -> Option<Device> {
        match self {
            Target::Local(rt) => rt.any().ok().map(Device::from),
            #[cfg(feature = "cluster")]
            Target::Cluster(c) => c.any().map(Device::from),
        }
    }

    /// The device of index `index` on `near`'s node (where a buffer its node moved lives).
    pub(crate) fn device_of(&self, near: &Device, index: u32) -> Option<Device> {
        match (self, near) {
            (Target::Local(rt), _) => rt.device(index).ok().map(Device::from),
            #[cfg(feature = "cluster")]
            (Target::Cluster(_), Device::Remote(d)) => d.sibling(index).map(Device::from),
            #[cfg(feature = "cluster")]
            (Target::Cluster(_), _) => None,
        }
    }
}
