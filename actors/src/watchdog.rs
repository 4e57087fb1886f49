//! The watchdog: a task that looks at every device a few times per op deadline and answers
//! what nothing else will — ops running past their deadline (a hung kernel: its worker is
//! killed), queued ops past their deadline while no executor takes from the queue, jobs
//! queued for a device out of service after its drain — and kills workers still starting
//! past their start deadline.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hipvisor_core::OpKind;
use hipvisor_core::config::Isolation;
use hipvisor_core::sync::lock;
use tokio::task::JoinHandle;

use crate::reply::ReplySlot;
use crate::shared::Shared;
use crate::state::DeviceState;

/// Starts the watchdog of `shared`: every quarter of the op deadline (between 1 and 100 ms).
/// It runs until its task is aborted (shutdown, a dropped runtime).
pub(crate) fn spawn(shared: Arc<Shared>, op_deadline: Duration) -> JoinHandle<()> {
    let watch_every = (op_deadline / 4).clamp(Duration::from_millis(1), Duration::from_millis(100));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(watch_every);
        // tokio's clock (the same as the system's, except under a test's paused clock).
        let now = || tokio::time::Instant::now().into_std();
        let mut due: Vec<Instant> = shared.cores.iter().map(|c| now() + c.deadline()).collect();
        loop {
            tick.tick().await;
            shared.watch(now(), &mut due);
        }
    })
}

impl Shared {
    /// The watchdog's check, every quarter of `runtime.op_deadline_ms` (at most every
    /// 100 ms):
    ///
    /// - an op running past its deadline (a hung kernel) is answered `DeadlineExceeded {
    ///   may_have_executed: true }`; in process isolation its worker is killed, and the
    ///   supervisor restarts the device;
    /// - a worker still starting past `supervisor.worker_start_timeout_ms` is killed;
    /// - the queue of a device out of service is settled (a job queued again after the
    ///   drain that its state change made);
    /// - queued ops are answered at their deadline whatever their device does: when an op
    ///   in the queue may have reached its deadline and no executor is taking from the queue
    ///   (each is inside an op, starting a worker, or there is none), the queue is taken
    ///   apart, the ops past their deadline answered and the rest put back in order.
    ///
    /// `due[d]` is when device `d`'s queue may next hold an op past its deadline: no sooner
    /// than the earliest deadline left by the last sweep, nor than the time of that sweep
    /// plus the op deadline (every op queued since is a first submission, whose deadline is
    /// its admission plus the op deadline) — unless an op was queued again since, with its
    /// old deadline, which its queue notes
    /// ([`JobQueue::take_requeued_deadline`](crate::queue::JobQueue::take_requeued_deadline)).
    /// So a healthy device's queue is never taken apart, and the hot path keeps no index.
    /// `now` is the time of the check (a parameter, so tests choose it).
    pub(crate) fn watch(&self, now: Instant, due: &mut [Instant]) {
        for (device, pid) in self.workers.kill_overdue_starts(now) {
            tracing::warn!(device, pid, "worker start past its deadline: killed");
        }
        for (core, due) in self.cores.iter().zip(due.iter_mut()) {
            let running = lock(&core.current);
            let overdue: Vec<(ReplySlot, OpKind)> = running
                .ops
                .iter()
                .filter(|c| now >= c.deadline && !c.slot.is_answered())
                .map(|c| (c.slot.clone(), c.op))
                .collect();
            if let Some(&(_, op)) = overdue.first() {
                let deadline_ms = core.deadline().as_millis() as u64;
                tracing::warn!(
                    device = core.index,
                    op = op.as_str(),
                    deadline_ms,
                    "op hung past its deadline"
                );
                // In a batch, the ops past their deadline may be the hung one or ones queued
                // behind it in the worker: either may have executed.
                for (slot, op) in overdue {
                    slot.answer(Err(core.deadline_exceeded(op, true)), 1, &core.counters);
                }
                if self.config.runtime.isolation == Isolation::Process {
                    // A hung kernel: kill the worker; the supervisor restarts the device.
                    core.kill_worker(&self.workers);
                }
            }
            if core.queue.is_empty() {
                // Anything queued from now on has a deadline after this (or noted).
                *due = core
                    .queue
                    .take_requeued_deadline()
                    .map_or(now + core.deadline(), |d| d.min(now + core.deadline()));
                continue;
            }
            if matches!(core.state.get(), DeviceState::Failed | DeviceState::Lost) {
                // What was queued after the drain of its state change. (What stays, the
                // runtime's own ops on a lost device, is still answered by its deadline.)
                self.settle_dead_queue(core.index);
                if core.queue.is_empty() {
                    continue;
                }
            }
            if let Some(d) = core.queue.take_requeued_deadline() {
                *due = (*due).min(d);
            }
            if now < *due || running.takers > 0 {
                // Not yet; or an executor is taking from the queue, and answers what is past
                // its deadline as it takes it.
                continue;
            }
            debug_assert_eq!(running.takers, 0, "an executor is taking from the queue");
            let left = core.queue.sweep(now);
            *due = left.map_or(now + core.deadline(), |d| d.min(now + core.deadline()));
            drop(running);
            // A dropped runtime aborts this task, which does not wait for a sweep under way:
            // what the sweep put back after the drain is drained here.
            self.queued(core.index);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::Current;
    use crate::error::{OpResult, RuntimeError};
    use crate::shared::testing::shared;
    use hipvisor_core::{Op, Origin};
    use tokio::sync::oneshot;

    /// A job on device 0, its deadline passed already (`past`) or an op deadline away.
    fn job(s: &Shared, past: bool) -> (crate::job::Job, oneshot::Receiver<OpResult>) {
        let core = &s.cores[0];
        let (tx, rx) = oneshot::channel::<OpResult>();
        let mut job = core.job(Op::MemInfo, Origin::Application, tx.into(), None);
        if past {
            job.deadline = Instant::now() - Duration::from_millis(1);
        }
        (job, rx)
    }

    /// The task itself, on tokio's paused clock: an op running on is left alone until its
    /// deadline, and answered at the first tick after it (every 100 ms for a 400 ms
    /// deadline), with no real waiting.
    #[tokio::test(start_paused = true)]
    async fn the_watchdog_task_answers_a_hung_op_at_the_first_tick_after_its_deadline() {
        let s = shared(1, |c| c.runtime.op_deadline_ms = 400).await;
        let (mut hung, mut hung_rx) = job(&s, false);
        let start = tokio::time::Instant::now();
        hung.deadline = start.into_std() + Duration::from_millis(400);
        lock(&s.cores[0].current).ops.push(Current {
            slot: hung.slot.clone(),
            deadline: hung.deadline,
            op: hung.kind(),
        });
        let watchdog = spawn(s.clone(), Duration::from_millis(400));
        tokio::time::sleep(Duration::from_millis(350)).await;
        assert!(hung_rx.try_recv().is_err(), "answered before its deadline");
        let answer = tokio::time::timeout(Duration::from_millis(200), &mut hung_rx)
            .await
            .expect("answered by the first tick after the deadline")
            .expect("answered, not dropped");
        let at = start.elapsed();
        assert!(
            at >= Duration::from_millis(400) && at <= Duration::from_millis(500),
            "answered at {at:?}"
        );
        assert!(matches!(
            answer,
            Err(RuntimeError::DeadlineExceeded {
                may_have_executed: true,
                ..
            })
        ));
        watchdog.abort();
        drop(hung);
    }

    #[tokio::test]
    async fn an_op_running_past_its_deadline_is_answered_as_one_that_may_have_run() {
        let s = shared(1, |_| {}).await;
        let (late, mut late_rx) = job(&s, true);
        let (on_time, mut on_time_rx) = job(&s, false);
        {
            let mut running = lock(&s.cores[0].current);
            for j in [&late, &on_time] {
                running.ops.push(Current {
                    slot: j.slot.clone(),
                    deadline: j.deadline,
                    op: j.kind(),
                });
            }
        }
        let mut due = vec![Instant::now() + Duration::from_secs(60)];
        s.watch(Instant::now(), &mut due);
        assert!(matches!(
            late_rx.try_recv(),
            Ok(Err(RuntimeError::DeadlineExceeded {
                may_have_executed: true,
                ..
            }))
        ));
        assert!(on_time_rx.try_recv().is_err(), "not due yet");
        drop((late, on_time));
    }

    #[tokio::test]
    async fn a_queue_nobody_takes_from_is_swept_when_due_and_left_alone_while_an_executor_takes() {
        let s = shared(1, |_| {}).await;
        let core = &s.cores[0];
        let (late, mut late_rx) = job(&s, true);
        let (on_time, mut on_time_rx) = job(&s, false);
        core.queue.enqueue(late);
        core.queue.enqueue(on_time);
        // An executor is taking from the queue: it answers what is past its deadline itself.
        lock(&core.current).takers = 1;
        let mut due = vec![Instant::now() - Duration::from_secs(1)];
        s.watch(Instant::now(), &mut due);
        assert!(late_rx.try_recv().is_err(), "the queue is the executor's");
        // Nobody takes, but the queue is not due yet: not taken apart.
        lock(&core.current).takers = 0;
        let not_yet = Instant::now() + Duration::from_secs(60);
        let mut due = vec![not_yet];
        s.watch(Instant::now(), &mut due);
        assert!(late_rx.try_recv().is_err(), "not due");
        // Due: the late job is answered, the other stays, and `due` is its deadline.
        let mut due = vec![Instant::now() - Duration::from_secs(1)];
        s.watch(Instant::now(), &mut due);
        assert!(matches!(
            late_rx.try_recv(),
            Ok(Err(RuntimeError::DeadlineExceeded {
                may_have_executed: false,
                ..
            }))
        ));
        assert!(on_time_rx.try_recv().is_err());
        assert!(!core.queue.is_empty());
        assert!(due[0] <= Instant::now() + core.deadline());
    }

    #[tokio::test]
    async fn a_job_queued_for_a_failed_device_after_its_drain_is_answered() {
        let s = shared(1, |_| {}).await;
        s.set_state(0, DeviceState::Failed, Some("test".into()));
        let (j, mut rx) = job(&s, false);
        // As a requeue racing with the drain would leave it.
        s.cores[0].queue.requeue(j);
        let mut due = vec![Instant::now() + Duration::from_secs(60)];
        s.watch(Instant::now(), &mut due);
        assert!(matches!(
            rx.try_recv(),
            Ok(Err(RuntimeError::DeviceFailed { device: 0, .. }))
        ));
    }

    #[tokio::test]
    async fn an_empty_queue_sets_the_next_look_one_deadline_ahead_or_at_a_requeued_deadline() {
        let s = shared(1, |_| {}).await;
        let core = &s.cores[0];
        let mut due = vec![Instant::now() - Duration::from_secs(1)];
        let before = Instant::now();
        s.watch(Instant::now(), &mut due);
        assert!(due[0] >= before + core.deadline());
        // A job queued again with an older deadline (sooner than a first submission's),
        // then taken: its deadline is noted.
        let (mut j, _rx) = job(&s, false);
        j.deadline = Instant::now() + core.deadline() / 2;
        let noted = j.deadline;
        core.queue.enqueue_again(j);
        let _ = core.queue.take();
        s.watch(Instant::now(), &mut due);
        assert!(
            due[0] <= noted && noted - due[0] < Duration::from_micros(1),
            "{:?} vs {noted:?}",
            due[0]
        );
    }
}
