//! The messages of the runtime's actors: [`DeviceMsg`] (what applications send a device's
//! actor) and [`SupervisorMsg`] (what executors, timers and the runtime tell the supervisor,
//! a failed op's [`Failure`] among them). Plain data and reply ports, below every actor, so
//! that the parts that send them (executors, the shared state that reports failures) need
//! not know the actors that receive them.

use hipvisor_core::{GpuError, Op};
use ractor::RpcReplyPort;

use crate::error::OpResult;
use crate::job::Job;
use crate::state::DeviceState;

/// Messages of a `DeviceActor`: plain data and a reply port. Local-only for now (with the
/// `cluster` feature, `Message` is implemented without serialization).
#[derive(Debug)]
pub enum DeviceMsg {
    /// Executes an op; waits for an in-flight slot when the device is at its bound.
    Submit {
        /// The op.
        op: Op,
        /// Where the answer goes.
        reply: RpcReplyPort<OpResult>,
    },
    /// Executes an op, or answers `Busy` at once when the device is at its bound.
    TrySubmit {
        /// The op.
        op: Op,
        /// Where the answer goes.
        reply: RpcReplyPort<OpResult>,
    },
    /// Asks for the device's state.
    State(RpcReplyPort<DeviceState>),
    /// Fault injection for tests and chaos runs: the actor panics with this message, and
    /// its supervisor restarts it.
    Crash(String),
}

/// A failed op, as an executor reports it.
pub struct Failure {
    pub(crate) device: u32,
    pub(crate) epoch: u64,
    pub(crate) job: Job,
    pub(crate) error: GpuError,
    /// For sticky faults: the kernels (module id, function) launched since the device's
    /// last successful synchronizing op.
    pub(crate) suspects: Vec<(u64, String)>,
}

/// Messages of the `Supervisor`.
pub enum SupervisorMsg {
    /// An op failed.
    Failed(Box<Failure>),
    /// A device's executor ended abnormally.
    ExecutorDied {
        /// The device.
        device: u32,
        /// The executor's epoch.
        epoch: u64,
        /// Why (how the worker ended).
        reason: String,
        /// Set when the worker ended by SIGABRT while kernels it launched may have been
        /// running (launched since the last op that waited for the device), and not during a
        /// module load: how ROCm ends a process whose kernel made a memory access fault. The
        /// death is a sticky fault of these kernels.
        suspects: Vec<(u64, String)>,
    },
    /// A device's context was opened.
    Opened {
        /// The device.
        device: u32,
        /// The epoch it was opened for.
        epoch: u64,
    },
    /// A device's context could not be opened.
    OpenFailed {
        /// The device.
        device: u32,
        /// The epoch it was opened for.
        epoch: u64,
        /// The error.
        error: GpuError,
    },
    /// A lost device answered its probe.
    DeviceReturned(u32),
    /// A lost device's probe stopped without an answer: the device is no longer lost (it was
    /// restarted or failed) or the runtime is closing. The device's state stays as it is.
    ProbeStopped(u32),
    /// The restart backoff of a device's executor has passed (`true`: a restart, counted in
    /// the metrics; `false`: another attempt to open a lost device).
    RestartExecutor(u32, bool),
    /// Answers once every message sent before it has been handled.
    Barrier(ractor::RpcReplyPort<()>),
    /// The restart backoff of a device's actor has passed.
    RestartActor(u32),
    /// The runtime is shutting down: restart nothing more, answer failures at once.
    Shutdown(ractor::RpcReplyPort<()>),
}

// With ractor's `cluster` feature ractor implements `Message` for no type of ours: the
// runtime's messages are local-only (they carry reply ports, jobs and answers in memory).
#[cfg(feature = "cluster")]
impl ractor::Message for DeviceMsg {}
#[cfg(feature = "cluster")]
impl ractor::Message for SupervisorMsg {}
