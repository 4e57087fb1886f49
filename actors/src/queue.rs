//! A device's job queue: two lanes — the priority lane (the runtime's own ops, jobs put
//! back, wake-ups) ahead of the application's lane — and the deadlines of the jobs in it.
//!
//! Every job is answered by its deadline at the latest. A first submission's deadline is its
//! admission plus the op deadline, so the watchdog knows a bound for it without looking; a
//! job queued *again* (a retry, a move, a requeue) keeps its older deadline, which the queue
//! notes ([`JobQueue::take_requeued_deadline`]). So a healthy device's queue is never taken
//! apart, and the hot path keeps no index.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, select};
use hipvisor_core::{OpKind, Origin};

use crate::error::RuntimeError;
use crate::job::Job;
use crate::metrics::DeviceCounters;

/// What travels to an executor.
pub(crate) enum Work {
    /// A job, by value: boxing it cost a heap block freed on the executor thread per op,
    /// and such cross-thread frees contend for the allocator's arena lock — measured 2.0 →
    /// 1.25 µs per op pipelined (64 callers, 2 cores) when the box went.
    Job(Job),
    /// Wakes an executor so it sees its stop flag.
    Wake,
    /// Fault injection (`Runtime::inject_executor_panic`, with the `test-hooks` feature):
    /// the executor panics, outside the backend call, when [`Armed`] says.
    #[cfg_attr(not(feature = "test-hooks"), allow(dead_code))]
    Panic(String, Armed),
}

/// When an injected executor panic fires.
#[cfg_attr(not(feature = "test-hooks"), allow(dead_code))]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Armed {
    /// Right after the next op runs, before it is answered.
    AfterRun,
    /// When the executor next holds a job it took and has not started.
    Holding,
}

/// One device's two-lane queue of jobs, with their deadlines.
pub(crate) struct JobQueue {
    device: u32,
    /// The op deadline: a job's deadline is its admission plus this.
    deadline: Duration,
    /// Where the answers of jobs answered from the queue are counted.
    counters: Arc<DeviceCounters>,
    jobs: (Sender<Work>, Receiver<Work>),
    priority: (Sender<Work>, Receiver<Work>),
    /// The earliest deadline of the jobs queued *again* (retries, moves, requeues) since the
    /// watchdog last looked, in nanoseconds after `born` (`u64::MAX`: none). A first
    /// submission needs no note: its deadline is its admission time plus `deadline`, so the
    /// watchdog knows a bound for it without looking.
    requeued_deadline: AtomicU64,
    born: Instant,
}

impl JobQueue {
    /// An empty queue for `device`, whose jobs get `deadline` from their admission.
    pub(crate) fn new(device: u32, deadline: Duration, counters: Arc<DeviceCounters>) -> JobQueue {
        JobQueue {
            device,
            deadline,
            counters,
            jobs: crossbeam_channel::unbounded(),
            priority: crossbeam_channel::unbounded(),
            requeued_deadline: AtomicU64::new(u64::MAX),
            born: Instant::now(),
        }
    }

    /// The op deadline: how long after its admission a job is answered at the latest.
    pub(crate) fn deadline(&self) -> Duration {
        self.deadline
    }

    /// The deadline of a job admitted at `now`.
    pub(crate) fn deadline_from(&self, now: Instant) -> Instant {
        now + self.deadline
    }

    /// The answer for an op whose deadline passed on this device.
    pub(crate) fn deadline_exceeded(&self, op: OpKind, may_have_executed: bool) -> RuntimeError {
        RuntimeError::DeadlineExceeded {
            device: self.device,
            op,
            deadline_ms: self.deadline.as_millis() as u64,
            may_have_executed,
        }
    }

    /// Queues a job for the executor: the runtime's own ops on the priority lane.
    pub(crate) fn enqueue(&self, job: Job) {
        let lane = if job.origin == Origin::Runtime {
            &self.priority.0
        } else {
            &self.jobs.0
        };
        // The queue owns both ends of its channels, so sending cannot fail.
        let _ = lane.send(Work::Job(job));
    }

    /// Queues a job whose deadline is older than a first submission's (a retry, a move):
    /// the watchdog is told of its deadline first.
    pub(crate) fn enqueue_again(&self, job: Job) {
        self.note_deadline(job.deadline);
        self.enqueue(job);
    }

    /// Queues a job that was taken from a queue but did not run (its executor stopped, its
    /// batch's engine was poisoned before it started): on the priority lane, so it runs
    /// before the jobs that were queued behind it. (Use `Shared::requeue`, which also
    /// answers it when the device is out of service.)
    pub(crate) fn requeue(&self, job: Job) {
        self.note_deadline(job.deadline);
        let _ = self.priority.0.send(Work::Job(job));
    }

    /// Sends the executor a work item that is not a job (a wake-up, an injected panic), on
    /// the priority lane.
    pub(crate) fn signal(&self, work: Work) {
        let _ = self.priority.0.send(work);
    }

    /// Tells the watchdog that a job with this deadline is (about to be) queued. Before the
    /// job is sent: a watchdog that sees the job in the queue has seen its note.
    fn note_deadline(&self, deadline: Instant) {
        let at = deadline.saturating_duration_since(self.born).as_nanos();
        self.requeued_deadline
            .fetch_min(u64::try_from(at).unwrap_or(u64::MAX - 1), Ordering::AcqRel);
    }

    /// The earliest deadline noted since the last call, if any.
    pub(crate) fn take_requeued_deadline(&self) -> Option<Instant> {
        match self.requeued_deadline.swap(u64::MAX, Ordering::AcqRel) {
            u64::MAX => None,
            at => Some(self.born + Duration::from_nanos(at)),
        }
    }

    /// Whether nothing is queued.
    pub(crate) fn is_empty(&self) -> bool {
        self.priority.1.is_empty() && self.jobs.1.is_empty()
    }

    /// The next queued work item, if any: the priority lane first.
    pub(crate) fn poll(&self) -> Option<Work> {
        self.priority.1.try_recv().or_else(|_| self.jobs.1.try_recv()).ok()
    }

    /// Blocks this thread until a work item is queued (on either lane).
    pub(crate) fn park(&self) -> Work {
        select! {
            recv(self.priority.1) -> w => w,
            recv(self.jobs.1) -> w => w,
        }
        .expect("the queue owns both ends of its channels")
    }

    /// Takes everything queued (the priority lane first, each lane in order): the jobs, and
    /// the other work items (wake-ups, injected panics), which are the executor's and must
    /// be put back with [`JobQueue::put_back`].
    pub(crate) fn take(&self) -> (Vec<Job>, Vec<Work>) {
        let mut jobs = Vec::new();
        let mut other = Vec::new();
        for rx in [&self.priority.1, &self.jobs.1] {
            while let Ok(w) = rx.try_recv() {
                match w {
                    Work::Job(job) => jobs.push(job),
                    w => other.push(w),
                }
            }
        }
        (jobs, other)
    }

    /// Puts work taken with [`JobQueue::take`] back, in order, on the priority lane:
    /// ahead of whatever was queued on the other lane meanwhile, so jobs keep their order.
    /// Their deadlines are noted for the watchdog (which may have seen the queue empty
    /// meanwhile).
    pub(crate) fn put_back(&self, jobs: impl IntoIterator<Item = Job>, other: Vec<Work>) {
        let jobs: Vec<Job> = jobs.into_iter().collect();
        if let Some(earliest) = jobs.iter().map(|j| j.deadline).min() {
            self.note_deadline(earliest);
        }
        for w in other.into_iter().chain(jobs.into_iter().map(Work::Job)) {
            let _ = self.priority.0.send(w);
        }
    }

    /// Answers every queued job with `error(job)` (a failed device, shutdown).
    pub(crate) fn drain(&self, error: impl Fn(&Job) -> RuntimeError) {
        let (jobs, other) = self.take();
        for job in jobs {
            let e = error(&job);
            job.answer(Err(e), &self.counters);
        }
        self.put_back([], other);
    }

    /// The watchdog's pass over a queue nobody is taking from (the caller holds the
    /// device's `Running` locked with no taker, so no executor starts taking): answers the
    /// jobs whose deadline has passed with `DeadlineExceeded`, forgets those answered
    /// already, and puts the rest back in order. Returns the earliest deadline left in the
    /// queue.
    pub(crate) fn sweep(&self, now: Instant) -> Option<Instant> {
        let (jobs, other) = self.take();
        let mut earliest: Option<Instant> = None;
        let mut kept = Vec::with_capacity(jobs.len());
        for job in jobs {
            if job.slot.is_answered() {
                continue;
            }
            if now >= job.deadline {
                let e = self.deadline_exceeded(job.kind(), false);
                job.answer(Err(e), &self.counters);
                continue;
            }
            earliest = Some(earliest.map_or(job.deadline, |e| e.min(job.deadline)));
            kept.push(job);
        }
        self.put_back(kept, other);
        earliest
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::OpResult;
    use crate::reply::ReplySlot;
    use hipvisor_core::Op;
    use tokio::sync::oneshot;

    const DEADLINE: Duration = Duration::from_secs(10);

    fn queue() -> JobQueue {
        JobQueue::new(3, DEADLINE, Arc::new(DeviceCounters::default()))
    }

    /// A mem-info job of `origin` with this deadline, and where its answer arrives.
    fn job(q: &JobQueue, origin: Origin, deadline: Instant) -> (Job, oneshot::Receiver<OpResult>) {
        let (tx, rx) = oneshot::channel::<OpResult>();
        let slot = ReplySlot::new(tx.into(), OpKind::MemInfo, origin, q.counters.clone(), Instant::now());
        let job = Job {
            op: Op::MemInfo,
            origin,
            slot,
            attempts: 0,
            backoff: None,
            deadline,
            _permit: None,
            device: 3,
            reruns: 0,
        };
        (job, rx)
    }

    /// The deadlines of the jobs queued, in the order an executor takes them (`None` for a
    /// work item that is not a job).
    fn order(q: &JobQueue) -> Vec<Option<Instant>> {
        std::iter::from_fn(|| q.poll())
            .map(|w| match w {
                Work::Job(j) => Some(j.deadline),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn the_runtimes_own_ops_overtake_the_applications_and_each_lane_keeps_its_order() {
        let q = queue();
        let base = Instant::now();
        let at = |s: u64| base + Duration::from_secs(s);
        let jobs = [
            job(&q, Origin::Application, at(1)).0,
            job(&q, Origin::Runtime, at(2)).0,
            job(&q, Origin::Application, at(3)).0,
            job(&q, Origin::Runtime, at(4)).0,
        ];
        for j in jobs {
            q.enqueue(j);
        }
        assert!(!q.is_empty());
        assert_eq!(order(&q), vec![Some(at(2)), Some(at(4)), Some(at(1)), Some(at(3))]);
        assert!(q.is_empty());
    }

    #[test]
    fn a_requeued_job_runs_before_the_jobs_queued_behind_it_and_its_deadline_is_noted() {
        let q = queue();
        let base = Instant::now();
        let at = |s: u64| base + Duration::from_secs(s);
        q.enqueue(job(&q, Origin::Application, at(5)).0);
        assert_eq!(q.take_requeued_deadline(), None, "a first submission needs no note");
        q.requeue(job(&q, Origin::Application, at(2)).0);
        q.enqueue_again(job(&q, Origin::Application, at(1)).0);
        // The earliest noted deadline, once.
        let noted = q.take_requeued_deadline().expect("noted");
        assert!(noted <= at(1) && at(1) - noted < Duration::from_micros(1), "{noted:?}");
        assert_eq!(q.take_requeued_deadline(), None, "taken");
        // The requeued job (priority lane) first, then the application's lane in order.
        assert_eq!(order(&q), vec![Some(at(2)), Some(at(5)), Some(at(1))]);
    }

    #[test]
    fn a_sweep_answers_the_jobs_past_their_deadline_and_keeps_the_rest_in_order() {
        let q = queue();
        let now = Instant::now();
        let mut answers = Vec::new();
        // Each job's deadline tells it apart: `seconds` from now (0: past it already).
        let mut make = |runtime_lane: bool, seconds: u64| {
            let origin = if runtime_lane {
                Origin::Runtime
            } else {
                Origin::Application
            };
            let deadline = match seconds {
                0 => now - Duration::from_millis(1),
                s => now + Duration::from_secs(s),
            };
            let (job, rx) = job(&q, origin, deadline);
            answers.push(rx);
            job
        };
        let jobs = [
            make(false, 3), // 0
            make(false, 0), // 1: past its deadline
            make(true, 5),  // 2: on the priority lane
            make(false, 4), // 3
        ];
        let ids: Vec<_> = jobs.iter().map(|j| j.deadline).collect();
        let (answered_first, _rx) = job(&q, Origin::Application, now + DEADLINE);
        answered_first
            .slot
            .answer(Err(RuntimeError::ShuttingDown), 1, &q.counters);
        for j in jobs {
            q.enqueue(j);
        }
        q.enqueue(answered_first);
        q.signal(Work::Wake);
        let earliest = q.sweep(now);
        assert_eq!(earliest, Some(ids[0]));
        assert!(matches!(
            answers[1].try_recv(),
            Ok(Err(RuntimeError::DeadlineExceeded {
                device: 3,
                may_have_executed: false,
                ..
            }))
        ));
        for (i, rx) in answers.iter_mut().enumerate().filter(|(i, _)| *i != 1) {
            assert!(rx.try_recv().is_err(), "job {i} was answered");
        }
        // Everything else is back, in order (priority lane first), on the priority lane; the
        // wake-up too; the job answered already is gone.
        assert!(q.jobs.1.is_empty());
        let back: Vec<Option<Instant>> = q
            .priority
            .1
            .try_iter()
            .map(|w| match w {
                Work::Job(j) => Some(j.deadline),
                _ => None,
            })
            .collect();
        assert_eq!(back, vec![None, Some(ids[2]), Some(ids[0]), Some(ids[3])]);
        // What was put back is noted for the watchdog: its earliest deadline.
        assert_eq!(q.take_requeued_deadline().map(|d| d <= ids[0]), Some(true));
    }

    #[test]
    fn a_drain_answers_every_job_and_keeps_the_executors_signals() {
        let q = queue();
        let later = Instant::now() + DEADLINE;
        let (a, mut ra) = job(&q, Origin::Application, later);
        let (b, mut rb) = job(&q, Origin::Runtime, later);
        q.enqueue(a);
        q.signal(Work::Wake);
        q.enqueue(b);
        q.drain(|_| RuntimeError::ShuttingDown);
        assert!(matches!(ra.try_recv(), Ok(Err(RuntimeError::ShuttingDown))));
        assert!(matches!(rb.try_recv(), Ok(Err(RuntimeError::ShuttingDown))));
        assert_eq!(order(&q), vec![None], "the wake-up stays for the executor");
    }

    #[test]
    fn a_jobs_deadline_is_its_admission_plus_the_op_deadline() {
        let q = queue();
        let now = Instant::now();
        assert_eq!(q.deadline_from(now), now + DEADLINE);
        assert_eq!(q.deadline(), DEADLINE);
        match q.deadline_exceeded(OpKind::Alloc, true) {
            RuntimeError::DeadlineExceeded {
                device: 3,
                op: OpKind::Alloc,
                deadline_ms: 10_000,
                may_have_executed: true,
            } => {}
            other => panic!("{other:?}"),
        }
    }
}
