//! # hipvisor-core
//!
//! The synchronous core of hipvisor: the error taxonomy ([`GpuError`], [`ErrorClass`]), the
//! retry policy ([`RetryConfig`], [`RetryPolicy`], [`retry_operation`]), the circuit breaker
//! ([`CircuitBreaker`]), the operation protocol ([`Op`], [`Reply`]), the [`Backend`] trait
//! with the simulated GPUs ([`SimBackend`]), and the configuration ([`RuntimeConfig`]).
//! No tokio, no actors, no telemetry: the supervised runtime lives in the `hipvisor` crate.
//!
//! ```
//! use hipvisor_core::{Backend, Op, Origin, Reply, SimBackend, ModuleSource, KernelArg, Dim3};
//! use hipvisor_core::kernels::{f32_bytes, f32s};
//!
//! let backend = SimBackend::new(2, 1 << 20);
//! let mut dev = backend.open(0, 0)?;
//! let app = Origin::Application;
//! let Reply::Buffer(x) = dev.execute(&Op::Alloc { bytes: 16 }, app)? else { unreachable!() };
//! dev.execute(&Op::CopyToDevice { dst: x, offset: 0, data: f32_bytes(&[1.0, 2.0, 3.0, 4.0]).into() }, app)?;
//! let Reply::Module(m) = dev.execute(&Op::LoadModule { source: ModuleSource::Builtin }, app)? else { unreachable!() };
//! dev.execute(&Op::Launch {
//!     module: m, function: "scale".into(), grid: Dim3::x(1), block: Dim3::x(64),
//!     shared_mem_bytes: 0, args: vec![KernelArg::Buffer(x), KernelArg::F32(10.0), KernelArg::U32(4)],
//! }, app)?;
//! let Reply::Data(out) = dev.execute(&Op::CopyFromDevice { src: x, offset: 0, len: 16 }, app)? else { unreachable!() };
//! assert_eq!(f32s(out.as_bytes()), vec![10.0, 20.0, 30.0, 40.0]);
//! # Ok::<(), hipvisor_core::GpuError>(())
//! ```

pub mod backend;
pub mod breaker;
pub mod config;
pub mod error;
pub mod ipc;
pub mod kernels;
pub mod op;
pub mod retry;
pub mod supervision;
pub mod sync;
pub mod task;
pub mod worker;

/// The simulator's fault plan (it lives with the simulator: `backend::sim::fault_plan`).
pub use backend::sim::fault_plan;

pub use backend::sim::{SimBackend, SimHost};
pub use backend::{Backend, BackendKind, DeviceContext, Origin};
pub use breaker::{Admission, BreakerConfig, BreakerState, CircuitBreaker};
pub use config::{ConfigError, ConfigLoader, Isolation, RuntimeConfig};
pub use error::{Api, ErrorClass, GpuError, InvalidReason};
pub use op::{
    BufferHandle, DURABLE_ID_BASE, DeviceInfo, Dim3, KernelArg, MemInfo, ModuleHandle, ModuleSource, Op, OpKind,
    Payload, Reply, TaskOp,
};
pub use retry::{
    Backoff, Jitter, Retried, RetryBudget, RetryBudgetConfig, RetryConfig, RetryFailure, RetryPolicy, retry_operation,
    retry_operation_with,
};
