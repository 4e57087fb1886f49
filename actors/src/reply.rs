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
        let taken = hipvisor_core::sync::get_mut(&mut self.port).take();
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

#[cfg(test)]
mod tests {
    use super::*;
    use hipvisor_core::Reply;
    use tokio::sync::oneshot;

    fn slot(origin: Origin, counters: &Arc<DeviceCounters>) -> (ReplySlot, oneshot::Receiver<OpResult>) {
        let (tx, rx) = oneshot::channel::<OpResult>();
        let slot = ReplySlot::new(tx.into(), OpKind::MemInfo, origin, counters.clone(), Instant::now());
        (slot, rx)
    }

    #[test]
    fn a_slot_is_answered_exactly_once_and_a_late_answer_is_counted_not_delivered() {
        let counters = Arc::new(DeviceCounters::default());
        let (slot, mut rx) = slot(Origin::Application, &counters);
        assert_eq!(counters.outstanding(), 1, "opened");
        let twin = slot.clone();
        assert!(!twin.is_answered());
        assert!(slot.answer(Ok(Reply::Done), 1, &counters));
        assert!(twin.is_answered(), "clones share the slot");
        assert!(!twin.answer(Err(RuntimeError::ShuttingDown), 1, &counters), "taken");
        assert!(matches!(rx.try_recv(), Ok(Ok(Reply::Done))), "the first answer wins");
        assert_eq!(counters.outstanding(), 0);
        assert_eq!(counters.take().late(), 1, "the second answer is a late completion");
    }

    #[test]
    fn a_slot_dropped_unanswered_answers_shutting_down() {
        let counters = Arc::new(DeviceCounters::default());
        let (slot, mut rx) = slot(Origin::Application, &counters);
        let twin = slot.clone();
        drop(slot);
        assert!(rx.try_recv().is_err(), "a clone still holds it");
        drop(twin);
        assert!(matches!(rx.try_recv(), Ok(Err(RuntimeError::ShuttingDown))));
        assert_eq!(counters.outstanding(), 0, "counted as answered");
    }

    #[test]
    fn the_runtimes_own_ops_are_not_counted_as_the_applications() {
        let counters = Arc::new(DeviceCounters::default());
        let (slot, mut rx) = slot(Origin::Runtime, &counters);
        assert_eq!(counters.outstanding(), 0);
        assert!(slot.answer(Ok(Reply::Done), 1, &counters));
        assert!(matches!(rx.try_recv(), Ok(Ok(Reply::Done))));
        assert_eq!(counters.outstanding(), 0);
    }

    #[test]
    fn a_retargeted_slot_is_counted_on_its_new_device() {
        let from = Arc::new(DeviceCounters::default());
        let to = Arc::new(DeviceCounters::default());
        let (slot, _rx) = slot(Origin::Application, &from);
        slot.retarget(to.clone());
        assert_eq!((from.outstanding(), to.outstanding()), (0, 1));
        assert!(slot.answer(Ok(Reply::Done), 1, &from));
        assert_eq!(to.outstanding(), 0);
    }

    #[test]
    fn a_handle_caller_gets_the_slot_with_its_answer() {
        let counters = Arc::new(DeviceCounters::default());
        let (tx, mut rx) = oneshot::channel::<Answered>();
        let slot = ReplySlot::new(
            tx.into(),
            OpKind::MemInfo,
            Origin::Application,
            counters.clone(),
            Instant::now(),
        );
        assert!(slot.answer(Ok(Reply::Done), 1, &counters));
        match rx.try_recv() {
            Ok((Ok(Reply::Done), Some(s))) => assert!(s.is_answered()),
            other => panic!("{:?}", other.map(|(r, s)| (r, s.is_some()))),
        }
    }

    #[tokio::test]
    async fn a_batch_sink_gives_the_answers_back_in_order_once_the_last_one_arrives() {
        let counters = Arc::new(DeviceCounters::default());
        let sink = BatchSink::new(3);
        let slots: Vec<ReplySlot> = (0..3)
            .map(|i| {
                let port = Port::Batch(sink.clone(), i);
                ReplySlot::new(
                    port,
                    OpKind::MemInfo,
                    Origin::Application,
                    counters.clone(),
                    Instant::now(),
                )
            })
            .collect();
        // Answered out of order; one twice (the second is a late completion).
        slots[2].answer(Err(RuntimeError::ShuttingDown), 1, &counters);
        slots[0].answer(Ok(Reply::Done), 1, &counters);
        slots[0].answer(Err(RuntimeError::ShuttingDown), 1, &counters);
        // Not all answered: the caller waits (polled, and not done).
        let waiter = {
            let sink = sink.clone();
            tokio::spawn(async move { sink.wait().await })
        };
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "woken before the last answer");
        slots[1].answer(Ok(Reply::Done), 1, &counters);
        let results = waiter.await.expect("woken by the last answer");
        assert!(matches!(
            results.as_slice(),
            [Ok(Reply::Done), Ok(Reply::Done), Err(RuntimeError::ShuttingDown)]
        ));
        assert_eq!(counters.take().late(), 1);
    }

    #[tokio::test]
    async fn an_empty_batch_is_answered_at_once() {
        let sink = BatchSink::new(0);
        assert!(sink.wait().await.is_empty());
    }
}
