//! The backend trait: device discovery, and one device's synchronous execution of an [`Op`].
//!
//! A [`Backend`] is shared by the runtime (discovery) and opens one [`DeviceContext`] per
//! device on the thread (or in the worker process) that will own it; the context then runs
//! every op of that device, one at a time, blocking. Everything above this trait — executors,
//! actors, supervisor, command line — works unchanged for every backend.

use serde::{Deserialize, Serialize};
use std::fmt;

use crate::error::GpuError;
use crate::op::{DeviceInfo, ModuleHandle, ModuleSource, Op, Reply};

/// Who issued an op (it lives with the ops; named here too, where it always was).
pub use crate::op::Origin;

#[cfg(any(feature = "hip", feature = "cuda", test))]
pub(crate) mod args;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod factory;
#[cfg(any(feature = "hip", feature = "cuda", test))]
pub(crate) mod gpu;
#[cfg(feature = "hip")]
pub mod hip;
pub mod image;
pub mod sim;
pub(crate) mod table;
pub mod task;

/// Which GPU API a backend drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum BackendKind {
    /// Simulated GPUs in host memory (the default: runs everywhere).
    #[default]
    Sim,
    /// AMD GPUs through HIP (cargo feature `hip`).
    Hip,
    /// NVIDIA GPUs through the CUDA driver API (cargo feature `cuda`).
    Cuda,
}

impl BackendKind {
    /// The backend's name in `snake_case`.
    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::Sim => "sim",
            BackendKind::Hip => "hip",
            BackendKind::Cuda => "cuda",
        }
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Device discovery, and the factory of device contexts.
///
/// `Any`, so a runtime given a backend can see what it is (a simulator's fault plan then
/// applies in process isolation too: the host decides each fault with it).
pub trait Backend: std::any::Any + Send + Sync {
    /// Which API this backend drives.
    fn kind(&self) -> BackendKind;

    /// How many devices the backend sees.
    ///
    /// # Errors
    /// A [`crate::ErrorClass::DeviceLost`]-class error when there is no device or no driver.
    fn device_count(&self) -> Result<u32, GpuError>;

    /// The description of device `device`.
    ///
    /// # Errors
    /// An invalid-device error for an index out of range; driver errors.
    fn device_info(&self, device: u32) -> Result<DeviceInfo, GpuError>;

    /// Creates a context for device `device`; handles it makes carry `epoch`. Called on the
    /// thread that will execute the device's ops (HIP and CUDA bind the current device per
    /// thread).
    ///
    /// # Errors
    /// Driver errors; a device that is gone.
    fn open(&self, device: u32, epoch: u64) -> Result<Box<dyn DeviceContext>, GpuError>;
}

/// One device's context: executes ops one at a time, blocking the calling thread.
pub trait DeviceContext: Send {
    /// The device index.
    fn device(&self) -> u32;

    /// The context's epoch (handles of other epochs are rejected with `BufferLost`).
    fn epoch(&self) -> u64;

    /// Executes one op.
    ///
    /// # Errors
    /// A [`GpuError`] whose class says what the runtime should do.
    fn execute(&mut self, op: &Op, origin: Origin) -> Result<Reply, GpuError>;

    /// Loads a module under an id it had in an earlier context of this device (module
    /// handles survive restarts). Later loads get ids above it.
    ///
    /// # Errors
    /// As [`Op::LoadModule`].
    fn restore_module(&mut self, module: ModuleHandle, source: &ModuleSource) -> Result<(), GpuError>;

    /// Registers host memory that will be copied from repeatedly (a worker's cached shared
    /// memory) as pinned memory, so copies from it run at pinned speed without staging.
    /// Returns whether it was registered; the default (the simulator) does nothing. The
    /// memory must stay mapped until [`DeviceContext::unregister_host_memory`].
    fn register_host_memory(&mut self, bytes: &[u8]) -> bool {
        let _ = bytes;
        false
    }

    /// Undoes [`DeviceContext::register_host_memory`] for memory starting at `bytes`.
    fn unregister_host_memory(&mut self, bytes: &[u8]) {
        let _ = bytes;
    }
}
