//! Where an op's answer goes, and the guarantee that it gets exactly one: the caller's
//! [`Port`] (an actor's reply port, a handle's oneshot, an entry of a [`BatchSink`]) inside a
//! take-once [`ReplySlot`], which counts the answer in its device's metrics, discards (and
//! counts) a late one, and answers `ShuttingDown` itself when dropped unanswered.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use hipvisor_core::sync::lock;
use hipvisor_core::{OpKind, Origin};
use ractor::RpcReplyPort;

use crate::error::{OpResult, RuntimeError};
use crate::metrics::{DeviceCounters, Outcome};

/// What a `DeviceHandle` caller receives: the answer, and the op's reply slot,
/// which the caller drops — so the slot's memory is freed by the thread that allocated it.
/// (Freed on the executor's thread, such blocks contend for the allocator's arena lock:
/// see `Work::Job`.)
pub(crate) type Answered = (OpResult, Option<ReplySlot>);

/// Where an op's answer goes.
pub(crate) enum Port {
    /// A caller's reply port (an actor's `call`).
    Reply(RpcReplyPort<OpResult>),
    /// A `DeviceHandle` caller.
    Handle(tokio::sync::oneshot::Sender<Answered>),
    /// Entry `.1` of a batch, whose caller is woken once, when the last op is answered.
    Batch(Arc<BatchSink>, usize),
}

impl Port {
    /// Sends the answer; `slot` (the op's reply slot) goes along where the caller can
    /// drop it.
    pub(crate) fn send(self, result: OpResult, slot: Option<&ReplySlot>) {
        match self {
            // The caller may have gone away (dropped its receiver).
            Port::Reply(port) => {
                let _ = port.send(result);
            }
            Port::Handle(tx) => {
                let _ = tx.send((result, slot.cloned()));
            }
            Port::Batch(sink, index) => sink.put(index, result),
        }
    }
}

impl From<RpcReplyPort<OpResult>> for Port {
    fn from(port: RpcReplyPort<OpResult>) -> Self {
        Port::Reply(port)
    }
}

impl From<tokio::sync::oneshot::Sender<OpResult>> for Port {
    fn from(tx: tokio::sync::oneshot::Sender<OpResult>) -> Self {
        Port::Reply(tx.into())
    }
}

impl From<tokio::sync::oneshot::Sender<Answered>> for Port {
    fn from(tx: tokio::sync::oneshot::Sender<Answered>) -> Self {
        Port::Handle(tx)
    }
}

/// The answers of a batch of ops: one wake-up for the caller per batch, not per op.
pub(crate) struct BatchSink {
    results: Mutex<Vec<Option<OpResult>>>,
    remaining: AtomicUsize,
    done: tokio::sync::Notify,
}

impl BatchSink {
    pub(crate) fn new(len: usize) -> Arc<BatchSink> {
        Arc::new(BatchSink {
            results: Mutex::new((0..len).map(|_| None).collect()),
            remaining: AtomicUsize::new(len),
            done: tokio::sync::Notify::new(),
        })
    }

    fn put(&self, index: usize, result: OpResult) {
        let first = {
            let mut results = lock(&self.results);
            let slot = &mut results[index];
            let first = slot.is_none();
            slot.get_or_insert(result);
            first
        };
        // Each entry is answered once (its reply slot is take-once); the last one wakes
        // the caller. `notify_one` keeps the wake-up if the caller is not waiting yet.
        if first && self.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.done.notify_one();
        }
    }

    /// Waits for every entry's answer; they come back in order.
    pub(crate) async fn wait(&self) -> Vec<OpResult> {
        while self.remaining.load(Ordering::Acquire) > 0 {
            self.done.notified().await;
        }
        let mut results = lock(&self.results);
        std::mem::take(&mut *results)
            .into_iter()
            .map(|r| r.expect("every entry was answered"))
            .collect()
    }
}

struct SlotInner {
    port: Mutex<Option<(Port, Arc<DeviceCounters>)>>,
    op: OpKind,
    origin: Origin,
    submitted: Instant,
}

impl Drop for SlotInner {
    /// A slot dropped unanswered answers itself: the caller gets a typed error, never a
    /// hang. (This happens when a task holding a job is dropped: a runtime shutting down.)
    fn drop(&mut self) {
        let taken = self
            .port
            .get_mut()
            .map(Option::take)
            .unwrap_or_else(|p| p.into_inner().take());
        if let Some((port, counters)) = taken {
            let result = Err(RuntimeError::ShuttingDown);
            if self.origin == Origin::Application {
                counters.answered(self.op, Outcome::of(&result), self.submitted.elapsed(), 0, false);
            }
            port.send(result, None);
        }
    }
}

/// The take-once answer of one op. Clones share the slot: the first answer wins, later ones
/// are discarded and counted as late completions.
#[derive(Clone)]
pub(crate) struct ReplySlot(Arc<SlotInner>);

impl ReplySlot {
    pub(crate) fn new(
        port: Port,
        op: OpKind,
        origin: Origin,
        counters: Arc<DeviceCounters>,
        submitted: Instant,
    ) -> Self {
        if origin == Origin::Application {
            counters.opened();
        }
        ReplySlot(Arc::new(SlotInner {
            port: Mutex::new(Some((port, counters))),
            op,
            origin,
            submitted,
        }))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<(Port, Arc<DeviceCounters>)>> {
        lock(&self.0.port)
    }

    /// Whether the op has been answered already.
    pub(crate) fn is_answered(&self) -> bool {
        self.lock().is_none()
    }

    /// Counts further answers under `counters` (the op moved to another device).
    pub(crate) fn retarget(&self, counters: Arc<DeviceCounters>) {
        if let Some((_, c)) = self.lock().as_mut() {
            if self.0.origin == Origin::Application {
                c.moved_to(&counters);
            }
            *c = counters;
        }
    }

    /// Answers the op (counted in its device's metrics); `false` when it was answered
    /// already, in which case `late` is counted as a late completion.
    pub(crate) fn answer(&self, result: OpResult, attempts: u32, late: &DeviceCounters) -> bool {
        let Some((port, counters)) = self.lock().take() else {
            late.late_completion();
            return false;
        };
        if self.0.origin == Origin::Application {
            let exhausted = matches!(
                result,
                Err(RuntimeError::RetriesExhausted { .. } | RuntimeError::RetryBudgetExhausted { .. })
            );
            counters.answered(
                self.0.op,
                Outcome::of(&result),
                self.0.submitted.elapsed(),
                attempts,
                exhausted,
            );
        }
        // The caller may have gone away (dropped its receiver): the answer is still counted.
        port.send(result, Some(self));
        true
    }
}
