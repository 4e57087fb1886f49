//! # hipvisor
//!
//! A supervised multi-GPU runtime. One actor per GPU owns that GPU's context (on a dedicated
//! OS thread) and executes operations; a supervisor retries transient errors with backoff,
//! takes poisoned and lost devices out of service, quarantines kernels that keep faulting and
//! restarts what fails; a metrics actor aggregates counters and records OpenTelemetry
//! instruments. Every submitted op ends in exactly one answer: a [`Reply`] or a typed
//! [`RuntimeError`].
//!
//! ```
//! use hipvisor::{Runtime, ModuleSource, KernelArg, RuntimeConfig};
//! use hipvisor::core::config::Isolation;
//! use hipvisor::core::kernels::{f32_bytes, f32s};
//!
//! # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let mut config = RuntimeConfig::default();
//! // Device contexts on threads of this process. The default, process isolation, runs them
//! // in worker processes (see `RuntimeBuilder::worker`).
//! config.runtime.isolation = Isolation::Thread;
//! let runtime = Runtime::builder().config(config).start().await?;
//! let gpu = runtime.device(0)?;
//! let x = gpu.alloc(16).await?;
//! gpu.copy_to_device(x, 0, f32_bytes(&[1.0, 2.0, 3.0, 4.0])).await?;
//! let module = gpu.load_module(ModuleSource::Builtin).await?;
//! gpu.launch(module, "scale", 1, 64, vec![KernelArg::Buffer(x), KernelArg::F32(2.0), KernelArg::U32(4)]).await?;
//! let out = gpu.copy_from_device(x, 0, 16).await?;
//! assert_eq!(f32s(out.as_bytes()), vec![2.0, 4.0, 6.0, 8.0]);
//! let metrics = runtime.shutdown().await;
//! assert_eq!(metrics.ops_succeeded, 5);
//! # Ok(())
//! # }
//! ```
//!
//! Application actors message a device's actor ([`Runtime::device_ref`]) with
//! [`DeviceMsg::Submit`] through `ractor::call!`.

#![forbid(unsafe_code)]

// The layers, lowest first; a file imports only from its own layer's lower files and the
// layers below (`../shared/tools/import-loops src actors/src` checks that no file imports one
// that imports it back):
//
// 1. error, state, history (the dashboard's samples), metrics, recovery (durable ids, task quarantine); engine (where ops run). (The worker protocol's host side,
//    `WorkerClient`, is the core's: `hipvisor_core::worker::client`.)
// 2. reply (take-once answers), job, queue (a device's two lanes and their deadlines),
//    messages (what the actors are sent)
// 3. device (one device's core), park (spin-then-park policy)
// 4. shared (what every part shares), routing (where an op goes, admission), watchdog
// 5. process (the worker as an engine), executor (the thread that runs a device's queue)
// 6. device_actor, supervisor, handle, telemetry
// 7. runtime (start and shutdown)
// 8. durable, task (the API of durable buffers and tasks, on `DeviceHandle` and `Runtime`)
// 9. cluster (feature `cluster`: nodes and remote devices)
// 10. any_device (one device type for application code: local or remote)
mod any_device;
#[cfg(feature = "cluster")]
pub mod cluster;
mod device;
mod device_actor;
mod durable;
mod engine;
mod error;
mod executor;
mod handle;
pub mod history;
mod job;
mod messages;
pub mod metrics;
mod park;
mod process;
mod queue;
mod recovery;
mod reply;
mod routing;
mod runtime;
mod shared;
mod state;
mod supervisor;
mod task;
#[cfg(feature = "prometheus")]
mod telemetry;
mod watchdog;

pub use any_device::Device;
pub use device_actor::DeviceActor;
pub use error::{OpResult, RuntimeError};
pub use handle::{DeviceHandle, HostBuffer};
pub use messages::{DeviceMsg, SupervisorMsg};
pub use metrics::Snapshot;
pub use runtime::{Runtime, RuntimeBuilder, StartError, make_backend};
pub use state::{DeviceState, DeviceStateChange};
pub use supervisor::Supervisor;

/// The synchronous core: error taxonomy, retry policy, breaker, op protocol, backends, config.
pub use hipvisor_core as core;
pub use hipvisor_core::task::{ReplicatedBuffer, ReplicatedModule, Scratch, Task, TaskArg};
pub use hipvisor_core::{
    BackendKind, BufferHandle, ConfigError, DeviceInfo, Dim3, ErrorClass, GpuError, InvalidReason, KernelArg, MemInfo,
    ModuleHandle, ModuleSource, Op, OpKind, Payload, Reply, RetryConfig, RuntimeConfig,
};
