//! The runtime's typed outcomes: every op ends in exactly one `Result<Reply, RuntimeError>`.

use hipvisor_core::{ErrorClass, GpuError, OpKind, Reply};
use serde::{Deserialize, Serialize};

/// The answer to one op: its reply, or a typed error that says what happened.
pub type OpResult = Result<Reply, RuntimeError>;

/// Why an op did not succeed.
///
/// Plain serde data, so the answer can cross process (and later machine) boundaries.
/// Where an op may or may not have run on the GPU, `may_have_executed` says so.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, thiserror::Error)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum RuntimeError {
    /// The GPU (or the runtime's own checks) rejected the op, and it was not retried: an
    /// invalid request, a sticky fault, a lost device. [`GpuError::class`] says which.
    #[error(transparent)]
    Gpu(GpuError),
    /// A transient error persisted through every retry the policy allowed.
    #[error("retries exhausted after {attempts} attempts: {last_error}")]
    RetriesExhausted {
        /// Attempts made.
        attempts: u32,
        /// The last attempt's error.
        last_error: GpuError,
    },
    /// A transient error, and the device's retry budget had no retry left.
    #[error("retry budget of device {device} exhausted after {attempts} attempts: {last_error}")]
    RetryBudgetExhausted {
        /// The device.
        device: u32,
        /// Attempts made.
        attempts: u32,
        /// The last attempt's error.
        last_error: GpuError,
    },
    /// The op's deadline passed before it finished. Never retried; a late completion is
    /// discarded (and counted).
    #[error("{op} on device {device}: deadline of {deadline_ms} ms exceeded")]
    DeadlineExceeded {
        /// The device.
        device: u32,
        /// The op.
        op: OpKind,
        /// The deadline that passed.
        deadline_ms: u64,
        /// Whether the op may have run on the GPU.
        may_have_executed: bool,
    },
    /// The device has its full number of ops in flight (`try_submit` only).
    #[error("device {device} is busy: {capacity} ops in flight")]
    Busy {
        /// The device.
        device: u32,
        /// Its in-flight capacity.
        capacity: u32,
    },
    /// The device's circuit breaker is open: it has been failing, and is given time.
    #[error("circuit breaker of device {device} is open (retry in {retry_after_ms} ms)")]
    CircuitOpen {
        /// The device.
        device: u32,
        /// Time until the breaker lets probes through.
        retry_after_ms: u64,
    },
    /// The kernel was a suspect in repeated sticky faults and is refused.
    #[error("kernel `{function}` of module {module} on device {device} is quarantined after repeated sticky faults")]
    Quarantined {
        /// The device.
        device: u32,
        /// The module id.
        module: u64,
        /// The kernel.
        function: String,
    },
    /// The task faulted in `supervisor.quarantine_after` of its runs within the quarantine
    /// window (a poison request: it faults wherever it runs), and is refused; other tasks
    /// with the same kernels keep running.
    #[error("task {fingerprint:016x} is quarantined: it faulted in repeated runs (a poison request)")]
    TaskQuarantined {
        /// The task's fingerprint (`TaskOp::fingerprint`).
        fingerprint: u64,
    },
    /// The device's context was replaced while the op was in flight; buffers of the old
    /// context are gone.
    #[error("device {device} restarted while the op was in flight (may have executed: {may_have_executed})")]
    DeviceRestarted {
        /// The device.
        device: u32,
        /// Whether the op may have run on the GPU.
        may_have_executed: bool,
    },
    /// The device is out of service for good (until the application restarts it).
    #[error("device {device} failed: {reason} (op may have executed: {may_have_executed})")]
    DeviceFailed {
        /// The device.
        device: u32,
        /// Why the device failed.
        reason: String,
        /// Whether the op may have run on the GPU.
        may_have_executed: bool,
    },
    /// The device is lost, and the op could not move to another device (it uses buffers or
    /// modules of this one, or no device is healthy).
    #[error("device {device} is lost (op may have executed: {may_have_executed})")]
    DeviceLost {
        /// The device.
        device: u32,
        /// Whether the op may have run on the GPU.
        may_have_executed: bool,
    },
    /// The node serving the device went away (its session closed) or did not answer by the
    /// request's deadline (feature `cluster`).
    #[error("node {node} is lost (op may have executed: {may_have_executed})")]
    NodeLost {
        /// The node.
        node: String,
        /// Whether the op may have run there.
        may_have_executed: bool,
    },
    /// A node could not be reached or refused to join, or a message from it could not be
    /// understood (feature `cluster`).
    #[error("node {node}: {reason}")]
    Remote {
        /// The node (its name, or the address dialled).
        node: String,
        /// What went wrong.
        reason: String,
    },
    /// `Runtime::any` found no healthy device.
    #[error("no device is ready")]
    NoReadyDevice,
    /// A device index out of range.
    #[error("device {device} does not exist (the runtime has {count} devices)")]
    NoSuchDevice {
        /// The index asked for.
        device: u32,
        /// How many devices the runtime has.
        count: u32,
    },
    /// The runtime is shutting down and accepts no more work.
    #[error("the runtime is shutting down")]
    ShuttingDown,
}

impl RuntimeError {
    /// The error class this outcome belongs to, where it has one: GPU errors by their code,
    /// exhausted retries as `Transient`, a lost device as `DeviceLost`, a bad device index
    /// as `InvalidRequest`. Runtime outcomes (deadline, busy, breaker, quarantine, restart,
    /// failure, shutdown) have none.
    pub fn class(&self) -> Option<ErrorClass> {
        match self {
            RuntimeError::Gpu(e) => Some(e.class()),
            RuntimeError::RetriesExhausted { .. } | RuntimeError::RetryBudgetExhausted { .. } => {
                Some(ErrorClass::Transient)
            }
            RuntimeError::DeviceLost { .. } => Some(ErrorClass::DeviceLost),
            RuntimeError::NoSuchDevice { .. } => Some(ErrorClass::InvalidRequest),
            _ => None,
        }
    }

    /// The variant's name in `snake_case`, as serde writes it (`device_restarted`, ...).
    pub fn name(&self) -> &'static str {
        match self {
            RuntimeError::Gpu(_) => "gpu",
            RuntimeError::RetriesExhausted { .. } => "retries_exhausted",
            RuntimeError::RetryBudgetExhausted { .. } => "retry_budget_exhausted",
            RuntimeError::DeadlineExceeded { .. } => "deadline_exceeded",
            RuntimeError::Busy { .. } => "busy",
            RuntimeError::CircuitOpen { .. } => "circuit_open",
            RuntimeError::Quarantined { .. } => "quarantined",
            RuntimeError::TaskQuarantined { .. } => "task_quarantined",
            RuntimeError::DeviceRestarted { .. } => "device_restarted",
            RuntimeError::DeviceFailed { .. } => "device_failed",
            RuntimeError::DeviceLost { .. } => "device_lost",
            RuntimeError::NodeLost { .. } => "node_lost",
            RuntimeError::Remote { .. } => "remote",
            RuntimeError::NoReadyDevice => "no_ready_device",
            RuntimeError::NoSuchDevice { .. } => "no_such_device",
            RuntimeError::ShuttingDown => "shutting_down",
        }
    }

    /// The outcome label of metrics and reports: the class in `snake_case`, or `other`.
    pub fn label(&self) -> &'static str {
        self.class().map_or("other", ErrorClass::as_str)
    }
}

impl From<GpuError> for RuntimeError {
    fn from(e: GpuError) -> Self {
        RuntimeError::Gpu(e)
    }
}
