//! Supervision decisions as pure functions of their inputs, the clock and the random source
//! included — as [`crate::breaker`] is for the circuit breaker, and as OTP's `supervisor.erl`
//! decides restart intensity in `add_restart/3` without reading a clock. The supervisor actor
//! (in the `hipvisor` crate) gathers the inputs, asks, and carries the answer out: it
//! schedules timers, answers ops, changes device states.
//!
//! - [`restart`]: restart or give up — at most `max_restarts` restarts within
//!   `restart_window_ms`, each after the restart backoff ([`RestartIntensity`]).
//! - [`quarantine`]: a kernel that is a suspect in `quarantine_after` sticky faults within
//!   `quarantine_window_ms` is quarantined ([`SuspectFaults`]).
//! - [`failure`]: what happens to a failed op, by the error's class and the device's state
//!   ([`decide_failed_op`]); whether and when a transient failure is retried
//!   ([`decide_retry`], [`decide_oom_wait`]); what a failed context open, or an engine's
//!   death, does to the device ([`decide_open_failure`], [`decide_engine_death`]).
//! - [`death`]: how an engine's death reads — a GPU memory fault of the kernels that may
//!   have been running, or not ([`EngineDeath`]) — and which ops rerun after it
//!   ([`reruns_transparently`]).
//! - [`state`]: the states a device goes through ([`DeviceState`]).

pub mod death;
pub mod failure;
pub mod quarantine;
pub mod restart;
pub mod state;

pub use death::{EngineDeath, reruns_transparently};
pub use failure::{
    AfterSticky, DeathAction, FailedOp, FailureFacts, LostRoute, OomWait, OpenFailureAction, RetryDecision,
    decide_engine_death, decide_failed_op, decide_oom_wait, decide_open_failure, decide_retry,
};
pub use quarantine::SuspectFaults;
pub use restart::{RestartDecision, RestartIntensity};
pub use state::DeviceState;
