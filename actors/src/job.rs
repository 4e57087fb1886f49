//! A job is one op on its way through the runtime: the op, its take-once reply slot, its
//! deadline, its attempts and its in-flight permit (kept across retries).

use std::time::Instant;

use hipvisor_core::{Backoff, Op, OpKind, Origin};
use tokio::sync::OwnedSemaphorePermit;

use crate::error::OpResult;
use crate::metrics::DeviceCounters;
use crate::reply::ReplySlot;

/// One op in flight.
pub(crate) struct Job {
    pub(crate) op: Op,
    pub(crate) origin: Origin,
    pub(crate) slot: ReplySlot,
    /// Executions so far.
    pub(crate) attempts: u32,
    /// Created at the first transient failure.
    pub(crate) backoff: Option<Backoff>,
    pub(crate) deadline: Instant,
    /// The in-flight slot, held until the op is answered (across retries).
    pub(crate) _permit: Option<OwnedSemaphorePermit>,
    /// The device the op runs on (it may move when its device is lost).
    pub(crate) device: u32,
    /// For a task: the runs after its first (`retry.task_reruns` at most).
    pub(crate) reruns: u32,
}

impl Job {
    /// Answers the job.
    /// The in-flight slot is released first: an op the caller has been answered for is not
    /// in flight (otherwise a caller could see its own finished op still counted).
    pub(crate) fn answer(self, result: OpResult, late: &DeviceCounters) -> bool {
        let Job {
            slot,
            attempts,
            _permit,
            ..
        } = self;
        drop(_permit);
        slot.answer(result, attempts, late)
    }

    pub(crate) fn kind(&self) -> OpKind {
        self.op.kind()
    }
}
