//! Spin, then park: whether a thread waiting for the next thing (an executor for its next
//! job, a caller for its answer, the host for a worker's answer) polls for it briefly
//! before blocking, and for how long. Waking a parked thread costs tens of microseconds, a
//! serial caller's next op comes within microseconds of its answer — but spinning takes a
//! CPU that other tasks may be waiting for. [`SpinPolicy`] decides; [`next_work`] and
//! [`answer`] are the two waits that apply it (the worker protocol's receive takes the
//! duration as a parameter).

use std::time::{Duration, Instant};

use crate::error::{OpResult, RuntimeError};
use crate::queue::{JobQueue, Work};
use crate::reply::Answered;

/// How long to poll instead of parking: `runtime.spin_us`, given the tokio runtime the
/// application started the runtime on (its queue of woken tasks tells whether spinning
/// would take a CPU that tasks are waiting for).
pub(crate) struct SpinPolicy {
    spin_us: u64,
    tokio: tokio::runtime::RuntimeMetrics,
}

impl SpinPolicy {
    /// The policy for `runtime.spin_us` on the tokio runtime of `tokio`.
    pub(crate) fn new(spin_us: u64, tokio: tokio::runtime::RuntimeMetrics) -> SpinPolicy {
        SpinPolicy { spin_us, tokio }
    }

    /// How long to poll instead of parking a thread while a device with `in_flight` ops in
    /// flight serves a serial caller (see [`spin_budget`]).
    pub(crate) fn spin_for(&self, in_flight: impl FnOnce() -> u32) -> Duration {
        // Cheapest first: most deployments that turn spinning off never read the counters.
        if self.spin_us == 0 {
            return Duration::ZERO;
        }
        let in_flight = in_flight();
        if in_flight > 1 {
            return Duration::ZERO;
        }
        spin_budget(self.spin_us, in_flight, self.tokio.global_queue_depth())
    }
}

/// How long to poll instead of parking: `spin_us` when the device has at most one op in
/// flight and no woken task is waiting for a tokio thread (`woken_tasks`). Otherwise zero:
/// the next op is coming anyway, and the CPU is better left to the tasks that produce it.
/// (Without the second condition, 64 callers on 2 cores look serial whenever their answered
/// tasks wait to be polled, and the executor's spin took half its thread's time — measured
/// with `perf`.)
pub(crate) fn spin_budget(spin_us: u64, in_flight: u32, woken_tasks: usize) -> Duration {
    if spin_us == 0 || in_flight > 1 || woken_tasks > 0 {
        return Duration::ZERO;
    }
    Duration::from_micros(spin_us)
}

/// The executor's next work item: the priority lane first; then, when `spin` allows (a
/// serial caller, whose next op comes right after this answer), polling for up to `spin`,
/// yielding the CPU between polls (waking a parked thread costs tens of microseconds); then
/// park. With more ops in flight the next ones are certainly coming and the tasks producing
/// them need the CPU — spinning there starves a 2-core machine (measured: 40% less
/// pipelined throughput), so the policy gives zero and the executor parks at once.
pub(crate) fn next_work(queue: &JobQueue, spin: impl FnOnce() -> Duration) -> Work {
    if let Some(w) = queue.poll() {
        return w;
    }
    let until = Instant::now() + spin();
    while Instant::now() < until {
        std::thread::yield_now();
        if let Some(w) = queue.poll() {
            return w;
        }
    }
    queue.park()
}

/// Waits for an op's answer. When the op is the device's only one in flight (a serial
/// caller), the answer usually comes within microseconds: poll for it for up to `spin`
/// before waiting to be woken, which saves the wake-up of a parked runtime thread (tens of
/// microseconds) on every op.
///
/// The poll holds this runtime thread (yielding the CPU between polls) for at most `spin`,
/// and in practice for the op's latency. Yielding to the tokio scheduler instead would not
/// hold the thread, but measured slower than not spinning at all on 2 cores (process
/// isolation, serial: 14–48 µs against 11 µs): each yield makes tokio wake an idle worker
/// thread to steal the task.
pub(crate) async fn answer(mut rx: tokio::sync::oneshot::Receiver<Answered>, spin: Duration) -> OpResult {
    use tokio::sync::oneshot::error::TryRecvError;
    if !spin.is_zero() {
        let until = Instant::now() + spin;
        loop {
            match rx.try_recv() {
                Ok((result, _slot)) => return result,
                Err(TryRecvError::Closed) => return Err(RuntimeError::ShuttingDown),
                Err(TryRecvError::Empty) if Instant::now() < until => std::thread::yield_now(),
                Err(TryRecvError::Empty) => break,
            }
        }
    }
    rx.await
        .map_or(Err(RuntimeError::ShuttingDown), |(result, _slot)| result)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::Job;
    use crate::metrics::DeviceCounters;
    use crate::reply::ReplySlot;
    use hipvisor_core::{Op, OpKind, Origin, Reply};
    use std::sync::Arc;

    #[test]
    fn spin_only_for_a_serial_caller_with_no_task_waiting_for_a_thread() {
        let us = Duration::from_micros;
        assert_eq!(spin_budget(20, 0, 0), us(20));
        assert_eq!(spin_budget(20, 1, 0), us(20));
        assert_eq!(
            spin_budget(20, 2, 0),
            Duration::ZERO,
            "pipelined: the next op is coming"
        );
        assert_eq!(spin_budget(20, 1, 1), Duration::ZERO, "a woken task waits for a thread");
        assert_eq!(spin_budget(0, 1, 0), Duration::ZERO, "spinning off");
    }

    fn job(queue_counters: &Arc<DeviceCounters>, origin: Origin) -> Job {
        let (tx, _rx) = tokio::sync::oneshot::channel::<OpResult>();
        let now = Instant::now();
        Job {
            op: Op::MemInfo,
            origin,
            slot: ReplySlot::new(tx.into(), OpKind::MemInfo, origin, queue_counters.clone(), now),
            attempts: 0,
            backoff: None,
            deadline: now + Duration::from_secs(10),
            _permit: None,
            device: 0,
            reruns: 0,
        }
    }

    #[test]
    fn queued_work_is_taken_without_spinning_priority_lane_first() {
        let counters = Arc::new(DeviceCounters::default());
        let q = JobQueue::new(0, Duration::from_secs(10), counters.clone());
        q.enqueue(job(&counters, Origin::Application));
        q.signal(Work::Wake);
        let never = || -> Duration { panic!("asked how long to spin with work queued") };
        assert!(matches!(next_work(&q, never), Work::Wake));
        assert!(matches!(next_work(&q, never), Work::Job(j) if j.origin == Origin::Application));
    }

    #[test]
    fn an_idle_executor_parks_until_work_arrives() {
        let counters = Arc::new(DeviceCounters::default());
        let q = Arc::new(JobQueue::new(0, Duration::from_secs(10), counters.clone()));
        let sender = {
            let q = q.clone();
            // Whenever it arrives — during the spin or after the park — it is taken.
            std::thread::spawn(move || q.enqueue(job(&counters, Origin::Runtime)))
        };
        let w = next_work(&q, || Duration::from_micros(50));
        assert!(matches!(w, Work::Job(j) if j.origin == Origin::Runtime));
        sender.join().expect("sender");
    }

    #[tokio::test]
    async fn an_answer_already_there_is_taken_while_spinning_and_a_dropped_sender_is_shutting_down() {
        let (tx, rx) = tokio::sync::oneshot::channel::<Answered>();
        tx.send((Ok(Reply::Done), None)).ok().expect("sent");
        assert!(matches!(answer(rx, Duration::from_micros(50)).await, Ok(Reply::Done)));
        for spin in [Duration::ZERO, Duration::from_micros(50)] {
            let (tx, rx) = tokio::sync::oneshot::channel::<Answered>();
            drop(tx);
            assert!(matches!(answer(rx, spin).await, Err(RuntimeError::ShuttingDown)));
        }
    }

    #[tokio::test]
    async fn without_a_spin_the_caller_waits_to_be_woken() {
        let (tx, rx) = tokio::sync::oneshot::channel::<Answered>();
        let waiting = tokio::spawn(answer(rx, Duration::ZERO));
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "answered before the answer was sent");
        tx.send((Ok(Reply::Done), None)).ok().expect("sent");
        assert!(matches!(waiting.await.expect("joined"), Ok(Reply::Done)));
    }
}
