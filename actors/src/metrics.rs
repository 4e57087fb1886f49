//! Metrics: local per-device counters on the hot path, and the [`MetricsActor`] that
//! aggregates their deltas, answers [`Snapshot`] requests and records OpenTelemetry
//! instruments.
//!
//! The hot path sends no message per op: whoever answers an op bumps atomic counters of its
//! device ([`DeviceCounters`]); the runtime flushes their deltas to the metrics actor every
//! `telemetry.flush_interval_ms` and at shutdown. State changes, restarts, breaker changes and
//! quarantines are sent at once.
//!
//! OpenTelemetry instruments (names per ARCHITECTURE.md; the Prometheus exporter adds
//! `_total` to counters and unit suffixes): `gpu.retry.attempts`, `gpu.retry.success`,
//! `gpu.retry.failed` (counters), `gpu.retry.attempt` (histogram: which attempt succeeded),
//! `gpu.ops{device,op,outcome}` (counter), `gpu.op.duration` (histogram, seconds),
//! `gpu.device.restarts` (counter), `gpu.device.state{device,state}` (gauge, 1 for the
//! current state, 0 for the others). Op durations are kept in fixed buckets locally and
//! recorded at each bucket's upper bound, so bucket counts are exact and sums approximate.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hipvisor_core::sync::lock;
use hipvisor_core::{BreakerState, ErrorClass, OpKind};
use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Gauge, Histogram, Meter};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use serde::{Deserialize, Serialize};

use crate::error::OpResult;
use crate::history::{History, HistoryView, Labels};
use crate::state::DeviceState;

/// The outcome of an answered op, as a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The op succeeded.
    Success,
    /// Failed with a transient error (retries exhausted or not allowed).
    Transient,
    /// Failed as an invalid request.
    InvalidRequest,
    /// Failed with a sticky fault.
    Sticky,
    /// Failed because the device is lost.
    DeviceLost,
    /// Another typed runtime outcome (deadline, busy, breaker, quarantine, restart, ...).
    Other,
}

impl Outcome {
    /// Every outcome.
    pub const ALL: [Outcome; 6] = [
        Outcome::Success,
        Outcome::Transient,
        Outcome::InvalidRequest,
        Outcome::Sticky,
        Outcome::DeviceLost,
        Outcome::Other,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::Transient => "transient",
            Outcome::InvalidRequest => "invalid_request",
            Outcome::Sticky => "sticky",
            Outcome::DeviceLost => "device_lost",
            Outcome::Other => "other",
        }
    }

    /// The outcome of a result.
    pub fn of(result: &OpResult) -> Outcome {
        match result {
            Ok(_) => Outcome::Success,
            Err(e) => match e.class() {
                Some(ErrorClass::Transient) => Outcome::Transient,
                Some(ErrorClass::InvalidRequest) => Outcome::InvalidRequest,
                Some(ErrorClass::Sticky) => Outcome::Sticky,
                Some(ErrorClass::DeviceLost) => Outcome::DeviceLost,
                None => Outcome::Other,
            },
        }
    }
}

/// Upper bounds (seconds) of the op-duration buckets: 1 µs to 10 s.
pub const DURATION_BUCKETS: [f64; 22] = [
    1e-6, 2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0,
];
const NB: usize = DURATION_BUCKETS.len() + 1;
/// Attempt numbers kept apart in the "which attempt succeeded" histogram (higher ones are
/// counted in the last slot).
pub const MAX_TRACKED_ATTEMPT: usize = 32;
const KINDS: usize = OpKind::ALL.len();
const OUTCOMES: usize = Outcome::ALL.len();

fn bucket_of(d: Duration) -> usize {
    let s = d.as_secs_f64();
    DURATION_BUCKETS.iter().position(|b| s <= *b).unwrap_or(NB - 1)
}

/// One device's counters, bumped by whoever answers an op; swapped out by the flush.
#[derive(Debug)]
pub struct DeviceCounters {
    ops: [[AtomicU64; OUTCOMES]; KINDS],
    durations: [[AtomicU64; NB]; KINDS],
    duration_ns: [AtomicU64; KINDS],
    success_attempt: [AtomicU64; MAX_TRACKED_ATTEMPT + 1],
    retry_attempts: AtomicU64,
    retry_success: AtomicU64,
    retry_exhausted: AtomicU64,
    oom_waits: AtomicU64,
    late: AtomicU64,
    /// Application ops accepted and not yet answered (a gauge: never taken).
    outstanding: AtomicI64,
}

impl Default for DeviceCounters {
    fn default() -> Self {
        DeviceCounters {
            ops: std::array::from_fn(|_| std::array::from_fn(|_| AtomicU64::new(0))),
            durations: std::array::from_fn(|_| std::array::from_fn(|_| AtomicU64::new(0))),
            duration_ns: std::array::from_fn(|_| AtomicU64::new(0)),
            success_attempt: std::array::from_fn(|_| AtomicU64::new(0)),
            retry_attempts: AtomicU64::new(0),
            retry_success: AtomicU64::new(0),
            retry_exhausted: AtomicU64::new(0),
            oom_waits: AtomicU64::new(0),
            late: AtomicU64::new(0),
            outstanding: AtomicI64::new(0),
        }
    }
}

impl DeviceCounters {
    /// Counts an application op that will be answered (and counted) through these counters.
    pub fn opened(&self) {
        self.outstanding.fetch_add(1, Ordering::AcqRel);
    }

    /// Moves an unanswered op to other counters (it moved to another device).
    pub fn moved_to(&self, other: &DeviceCounters) {
        other.outstanding.fetch_add(1, Ordering::AcqRel);
        self.outstanding.fetch_sub(1, Ordering::AcqRel);
    }

    /// Application ops accepted and not answered yet.
    pub fn outstanding(&self) -> i64 {
        self.outstanding.load(Ordering::Acquire)
    }

    /// Counts an answered application op: its outcome, duration and attempts.
    pub fn answered(&self, op: OpKind, outcome: Outcome, elapsed: Duration, attempts: u32, exhausted: bool) {
        let k = op as usize;
        self.ops[k][outcome as usize].fetch_add(1, Ordering::Relaxed);
        self.durations[k][bucket_of(elapsed)].fetch_add(1, Ordering::Relaxed);
        self.duration_ns[k].fetch_add(elapsed.as_nanos() as u64, Ordering::Relaxed);
        if outcome == Outcome::Success {
            let slot = (attempts.max(1) as usize).min(MAX_TRACKED_ATTEMPT);
            self.success_attempt[slot].fetch_add(1, Ordering::Relaxed);
            if attempts > 1 {
                self.retry_success.fetch_add(1, Ordering::Relaxed);
            }
        }
        if exhausted {
            self.retry_exhausted.fetch_add(1, Ordering::Relaxed);
        }
        self.outstanding.fetch_sub(1, Ordering::AcqRel);
    }

    /// Counts a retry (a re-execution scheduled after a transient error).
    pub fn retried(&self) {
        self.retry_attempts.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a backoff step in which an out-of-memory `Alloc` was held back because
    /// mem-info did not show its bytes free.
    pub fn oom_wait(&self) {
        self.oom_waits.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a completion that arrived after its op had been answered (deadline, shutdown).
    pub fn late_completion(&self) {
        self.late.fetch_add(1, Ordering::Relaxed);
    }

    /// Takes the counts since the last call.
    pub fn take(&self) -> CounterDelta {
        let take = |a: &AtomicU64| a.swap(0, Ordering::Relaxed);
        CounterDelta {
            ops: std::array::from_fn(|k| std::array::from_fn(|o| take(&self.ops[k][o]))),
            durations: std::array::from_fn(|k| std::array::from_fn(|b| take(&self.durations[k][b]))),
            duration_ns: std::array::from_fn(|k| take(&self.duration_ns[k])),
            success_attempt: std::array::from_fn(|a| take(&self.success_attempt[a])),
            retry_attempts: take(&self.retry_attempts),
            retry_success: take(&self.retry_success),
            retry_exhausted: take(&self.retry_exhausted),
            oom_waits: take(&self.oom_waits),
            late: take(&self.late),
        }
    }
}

/// Counts taken from a [`DeviceCounters`].
#[derive(Debug, Clone)]
pub struct CounterDelta {
    ops: [[u64; OUTCOMES]; KINDS],
    durations: [[u64; NB]; KINDS],
    duration_ns: [u64; KINDS],
    success_attempt: [u64; MAX_TRACKED_ATTEMPT + 1],
    retry_attempts: u64,
    retry_success: u64,
    retry_exhausted: u64,
    oom_waits: u64,
    late: u64,
}

impl CounterDelta {
    /// Late completions counted (answers that came after the op was answered).
    #[cfg(test)]
    pub(crate) fn late(&self) -> u64 {
        self.late
    }

    /// Whether it holds anything of op kind `k`'s durations: a bucket count, or
    /// nanoseconds alone (a flush can take an op's bucket and leave its nanoseconds for the
    /// next).
    fn has_durations(&self, k: usize) -> bool {
        self.durations[k].iter().any(|n| *n > 0) || self.duration_ns[k] > 0
    }

    /// Nothing counted. Every field is looked at: a flush can split one op's counts between
    /// two deltas, and a delta holding only a duration or an attempt must still be applied.
    fn is_empty(&self) -> bool {
        let CounterDelta {
            ops,
            durations,
            duration_ns,
            success_attempt,
            retry_attempts,
            retry_success,
            retry_exhausted,
            oom_waits,
            late,
        } = self;
        ops.iter().flatten().chain(durations.iter().flatten()).all(|c| *c == 0)
            && duration_ns.iter().chain(success_attempt).all(|c| *c == 0)
            && [retry_attempts, retry_success, retry_exhausted, oom_waits, late]
                .iter()
                .all(|c| **c == 0)
    }
}

/// Ops counted for one (device, op kind, outcome).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpCount {
    /// The device.
    pub device: u32,
    /// The op kind.
    pub op: OpKind,
    /// The outcome.
    pub outcome: Outcome,
    /// How many.
    pub count: u64,
}

/// Retry statistics.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetryStats {
    /// Retries made (re-executions after a transient error).
    pub attempts: u64,
    /// Ops that succeeded after at least one retry.
    pub succeeded: u64,
    /// Ops whose retries (or retry budget) ran out.
    pub exhausted: u64,
    /// Backoff steps in which an out-of-memory `Alloc` was held back because mem-info did
    /// not show its bytes free.
    pub oom_waits: u64,
    /// Successful ops by the attempt that succeeded (1 = first try).
    pub success_by_attempt: BTreeMap<u32, u64>,
}

impl RetryStats {
    /// What was counted since `before` (an earlier reading of the same counters).
    pub fn since(&self, before: &RetryStats) -> RetryStats {
        RetryStats {
            attempts: self.attempts.saturating_sub(before.attempts),
            succeeded: self.succeeded.saturating_sub(before.succeeded),
            exhausted: self.exhausted.saturating_sub(before.exhausted),
            oom_waits: self.oom_waits.saturating_sub(before.oom_waits),
            success_by_attempt: self
                .success_by_attempt
                .iter()
                .map(|(a, n)| {
                    (
                        *a,
                        n.saturating_sub(before.success_by_attempt.get(a).copied().unwrap_or(0)),
                    )
                })
                .collect(),
        }
    }
}

/// One device in a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceSnapshot {
    /// The device index.
    pub id: u32,
    /// Its state.
    pub state: DeviceState,
    /// Why it is in that state (for lost and failed devices).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Restarts so far.
    pub restarts: u64,
    /// Retry attempts on the device so far (the per-device part of
    /// `retries.attempts`).
    #[serde(default)]
    pub retries: u64,
    /// Its circuit breaker's state.
    pub breaker: BreakerState,
    /// Host bytes its durable buffers' host copies hold now.
    #[serde(default)]
    pub durable_bytes: u64,
}

/// What recovering without the application's help cost and did: durable buffers restored
/// into new contexts, standbys that could not hold them, tasks rerun and quarantined.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RecoveryStats {
    /// New contexts that got durable buffers back.
    pub durable_restores: u64,
    /// Device bytes of durable buffers those contexts came up with (restored as they opened,
    /// or by a standby beforehand).
    pub durable_restored_bytes: u64,
    /// The time those contexts took to open with their durable buffers, in all (seconds).
    pub durable_restore_seconds: f64,
    /// The longest of them.
    pub durable_restore_seconds_max: f64,
    /// Standby workers that could not hold their device's durable buffers.
    pub standby_short: u64,
    /// Task runs after the first (after a restart, a worker's death, a lost, failed or
    /// refusing device).
    pub task_reruns: u64,
    /// Tasks answered `TaskQuarantined` when they reached the quarantine threshold.
    pub tasks_quarantined: u64,
}

/// A quarantined kernel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuarantineEntry {
    /// The device.
    pub device: u32,
    /// The module id.
    pub module: u64,
    /// The kernel.
    pub function: String,
}

/// Op durations of one kind.
///
/// Read while ops are being answered, `count`, `sum_seconds` and `buckets` can be a flush
/// apart: an op's parts are counted as they are taken, so `sum_seconds` may run ahead of
/// `count` (even above a `count` of 0) or behind it until the next flush. Guard a mean's
/// division; after `Runtime::shutdown` they agree.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DurationStats {
    /// Ops measured.
    pub count: u64,
    /// Sum of their durations in seconds.
    pub sum_seconds: f64,
    /// Cumulative counts per bucket upper bound ([`DURATION_BUCKETS`], then +Inf).
    pub buckets: Vec<u64>,
}

/// The metrics actor's aggregate: what the runtime has done so far.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// Answered application ops.
    pub ops_total: u64,
    /// Of which succeeded.
    pub ops_succeeded: u64,
    /// Of which failed (with a typed error).
    pub ops_failed: u64,
    /// Answered ops by outcome.
    pub ops_by_outcome: BTreeMap<Outcome, u64>,
    /// Answered ops by device, kind and outcome.
    pub ops: Vec<OpCount>,
    /// Retry statistics.
    pub retries: RetryStats,
    /// Device restarts (all devices).
    pub restarts: u64,
    /// Sticky faults (one per fault event, not per failed op).
    pub sticky_faults: u64,
    /// Completions that arrived after their op had been answered.
    pub late_completions: u64,
    /// Circuit breaker state changes.
    pub breaker_transitions: u64,
    /// Kernels quarantined, oldest first: the latest 1,000 (a long run under faults
    /// quarantines the kernels of each new context's modules again, under new module ids).
    pub quarantined: Vec<QuarantineEntry>,
    /// The devices.
    pub devices: Vec<DeviceSnapshot>,
    /// Op durations by kind.
    pub durations: BTreeMap<OpKind, DurationStats>,
    /// Durable buffers and tasks.
    #[serde(default)]
    pub recovery: RecoveryStats,
}

/// Events the runtime sends the metrics actor at once.
#[derive(Debug, Clone)]
pub enum MetricsEvent {
    /// A device changed state.
    State {
        /// The device.
        device: u32,
        /// The new state.
        state: DeviceState,
        /// Why.
        reason: Option<String>,
    },
    /// A device was restarted.
    Restart {
        /// The device.
        device: u32,
        /// Why.
        reason: String,
    },
    /// A sticky fault (one event, however many ops it failed).
    StickyFault {
        /// The device where it surfaced.
        device: u32,
        /// The error.
        reason: String,
    },
    /// A breaker changed state.
    Breaker {
        /// The device.
        device: u32,
        /// The new state.
        state: BreakerState,
    },
    /// A kernel was quarantined.
    Quarantined(QuarantineEntry),
    /// A new context got its durable buffers back.
    DurableRestored {
        /// The device.
        device: u32,
        /// Their bytes.
        bytes: u64,
        /// How long the context took to open with them.
        seconds: f64,
    },
    /// The host bytes of a device's durable buffers changed.
    DurableHostBytes {
        /// The device.
        device: u32,
        /// The bytes now.
        bytes: u64,
    },
    /// A standby worker could not hold its device's durable buffers.
    StandbyShort {
        /// The device.
        device: u32,
        /// The bytes it would have needed.
        bytes: u64,
    },
    /// A task ran again.
    TaskRerun {
        /// The device it ran on before.
        device: u32,
    },
    /// A task was answered `TaskQuarantined` when it reached the threshold.
    TaskQuarantined,
}

/// Messages of the [`MetricsActor`].
#[derive(Debug)]
pub enum MetricsMsg {
    /// Counts flushed from a device.
    Delta(u32, Box<CounterDelta>),
    /// An event.
    Event(MetricsEvent),
    /// Asks for the aggregate so far.
    Snapshot(RpcReplyPort<Snapshot>),
    /// Asks for the last so many seconds of history ([`History::view`]).
    History(usize, RpcReplyPort<HistoryView>),
}

#[cfg(feature = "cluster")]
impl ractor::Message for MetricsMsg {}

/// The OpenTelemetry instruments.
struct Instruments {
    retry_attempts: Counter<u64>,
    retry_success: Counter<u64>,
    retry_failed: Counter<u64>,
    retry_attempt: Histogram<u64>,
    ops: Counter<u64>,
    duration: Histogram<f64>,
    restarts: Counter<u64>,
    state: Gauge<i64>,
    durable_bytes: Gauge<i64>,
    restored_bytes: Counter<u64>,
    restore_duration: Histogram<f64>,
    task_reruns: Counter<u64>,
}

impl Instruments {
    fn new(meter: &Meter, max_retries: u32) -> Instruments {
        Instruments {
            retry_attempts: meter
                .u64_counter("gpu.retry.attempts")
                .with_description("Retries of GPU operations after transient errors")
                .build(),
            retry_success: meter
                .u64_counter("gpu.retry.success")
                .with_description("GPU operations that succeeded after at least one retry")
                .build(),
            retry_failed: meter
                .u64_counter("gpu.retry.failed")
                .with_description("GPU operations whose retries or retry budget ran out")
                .build(),
            retry_attempt: meter
                .u64_histogram("gpu.retry.attempt")
                .with_description(ATTEMPT_HELP)
                .with_boundaries(attempt_bounds(max_retries))
                .build(),
            ops: meter
                .u64_counter("gpu.ops")
                .with_description("GPU operations answered, by device, op kind and outcome")
                .build(),
            duration: meter
                .f64_histogram("gpu.op.duration")
                .with_unit("s")
                .with_description(DURATION_HELP)
                .with_boundaries(DURATION_BUCKETS.to_vec())
                .build(),
            restarts: meter
                .u64_counter("gpu.device.restarts")
                .with_description("Device restarts (new context or worker)")
                .build(),
            state: meter
                .i64_gauge("gpu.device.state")
                .with_description("1 for the device's current state, 0 for the others")
                .build(),
            durable_bytes: meter
                .i64_gauge("gpu.durable.host")
                .with_unit("By")
                .with_description("Host bytes held by the device's durable buffers' host copies")
                .build(),
            restored_bytes: meter
                .u64_counter("gpu.durable.restored")
                .with_unit("By")
                .with_description("Device bytes of durable buffers restored into new contexts")
                .build(),
            restore_duration: meter
                .f64_histogram("gpu.durable.restore.duration")
                .with_unit("s")
                .with_description("Time a new context took to open with its durable buffers restored")
                .with_boundaries(DURATION_BUCKETS.to_vec())
                .build(),
            task_reruns: meter
                .u64_counter("gpu.task.reruns")
                .with_description("Task runs after the first (restart, worker death, lost or refusing device)")
                .build(),
        }
    }
}

/// The help of the op-duration histogram (on the meter and on hipvisor's endpoint).
pub(crate) const DURATION_HELP: &str = "Time from submission to answer of GPU operations";

/// The help of the attempt histogram (on the meter and on hipvisor's endpoint).
pub(crate) const ATTEMPT_HELP: &str = "The attempt on which a GPU operation succeeded (1 = first try)";

/// The attempt histogram's bucket bounds: 1 (the first try) to `max_retries + 1`.
fn attempt_bounds(max_retries: u32) -> Vec<f64> {
    (1..=max_retries + 1).map(f64::from).collect()
}

/// Arguments of the [`MetricsActor`].
pub struct MetricsArgs {
    /// The meter to record instruments on.
    pub meter: Meter,
    /// Number of devices.
    pub devices: u32,
    /// The retry policy's `max_retries` (bounds of the attempt histogram).
    pub max_retries: u32,
    /// Where the op-duration and attempt histograms go instead of the meter: hipvisor's own
    /// Prometheus endpoint serves them from their bucket counts ([`BucketHistograms`]).
    /// `None`: they are recorded on the meter, one call per op.
    pub histograms: Option<BucketHistograms>,
}

/// The op-duration and attempt histograms as bucket counts, for hipvisor's own Prometheus
/// endpoint. An OpenTelemetry histogram takes one call per observation (the API has no
/// count argument: opentelemetry-specification#3369), so feeding it the flushed bucket
/// counts costs a call per op in the metrics actor — about 10 % of the ops' time on a busy
/// 2-core machine; these take the counts as they come, per flush. An application that
/// passes its own meter gets the OpenTelemetry histograms, at that cost.
#[derive(Debug, Clone, Default)]
pub struct BucketHistograms(Arc<Mutex<Buckets>>);

/// What [`BucketHistograms`] holds.
#[derive(Debug, Default)]
pub(crate) struct Buckets {
    /// By device and op kind: the ops in each duration bucket (the last beyond
    /// [`DURATION_BUCKETS`]), and the sum of their durations in seconds.
    pub(crate) duration: BTreeMap<(u32, OpKind), (Vec<u64>, f64)>,
    /// By device: the ops that succeeded on each attempt (index 1 = the first try).
    pub(crate) attempt: BTreeMap<u32, Vec<u64>>,
    /// The attempt histogram's bucket bounds (1 to max_retries + 1).
    pub(crate) attempt_bounds: Vec<f64>,
}

impl BucketHistograms {
    /// Empty histograms.
    pub fn new() -> BucketHistograms {
        BucketHistograms::default()
    }

    /// Reads them.
    pub(crate) fn read<T>(&self, f: impl FnOnce(&Buckets) -> T) -> T {
        f(&lock(&self.0))
    }
}

/// The metrics actor's state.
pub struct MetricsState {
    snapshot: Snapshot,
    ops: BTreeMap<(u32, OpKind, Outcome), u64>,
    instruments: Instruments,
    histograms: Option<BucketHistograms>,
    history: History,
}

/// Quarantine entries the snapshot keeps (the latest).
const MAX_QUARANTINED: usize = 1000;

/// Unix milliseconds now, on a monotonic clock: the wall clock when the process first asked,
/// plus the time since (a clock stepped back or forward leaves the history's seconds alone).
fn now_ms() -> u64 {
    static START: std::sync::OnceLock<(u64, std::time::Instant)> = std::sync::OnceLock::new();
    let (unix_ms, at) = START.get_or_init(|| {
        let unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        (unix, std::time::Instant::now())
    });
    unix_ms + at.elapsed().as_millis() as u64
}

/// The names the history labels its counts with.
fn history_labels() -> Labels {
    static NAMES: std::sync::OnceLock<(Vec<&'static str>, Vec<&'static str>)> = std::sync::OnceLock::new();
    let (kinds, outcomes) = NAMES.get_or_init(|| {
        (
            OpKind::ALL.iter().map(|k| k.as_str()).collect(),
            Outcome::ALL.iter().map(|o| o.as_str()).collect(),
        )
    });
    Labels {
        kinds,
        outcomes,
        buckets: &DURATION_BUCKETS,
    }
}

/// Aggregates the runtime's counters and events; answers [`MetricsMsg::Snapshot`].
pub struct MetricsActor;

impl Actor for MetricsActor {
    type Msg = MetricsMsg;
    type State = MetricsState;
    type Arguments = MetricsArgs;

    async fn pre_start(
        &self,
        _me: ActorRef<MetricsMsg>,
        args: MetricsArgs,
    ) -> Result<MetricsState, ActorProcessingErr> {
        Ok(MetricsState::new(args))
    }

    async fn handle(
        &self,
        _me: ActorRef<MetricsMsg>,
        msg: MetricsMsg,
        st: &mut MetricsState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            MetricsMsg::Delta(device, delta) => st.apply(device, &delta),
            MetricsMsg::Event(e) => st.event(e),
            MetricsMsg::Snapshot(port) => {
                let mut s = st.snapshot.clone();
                s.ops = st
                    .ops
                    .iter()
                    .map(|(&(device, op, outcome), &count)| OpCount {
                        device,
                        op,
                        outcome,
                        count,
                    })
                    .collect();
                let _ = port.send(s);
            }
            MetricsMsg::History(seconds, port) => {
                let _ = port.send(st.history.view(now_ms(), seconds));
            }
        }
        Ok(())
    }
}

impl MetricsState {
    /// The state the actor starts with: every device ready, every series at zero.
    fn new(args: MetricsArgs) -> MetricsState {
        let devices = (0..args.devices)
            .map(|id| DeviceSnapshot {
                id,
                state: DeviceState::Ready,
                reason: None,
                restarts: 0,
                retries: 0,
                breaker: BreakerState::Closed,
                durable_bytes: 0,
            })
            .collect();
        let instruments = Instruments::new(&args.meter, args.max_retries);
        if let Some(h) = &args.histograms {
            lock(&h.0).attempt_bounds = attempt_bounds(args.max_retries);
        }
        for d in 0..args.devices {
            record_state(&instruments, d, DeviceState::Ready);
            // Every series exists from the start, at zero.
            let dev = [KeyValue::new("device", i64::from(d))];
            instruments.retry_attempts.add(0, &dev);
            instruments.retry_success.add(0, &dev);
            instruments.retry_failed.add(0, &dev);
            instruments.restarts.add(0, &dev);
        }
        MetricsState {
            snapshot: Snapshot {
                devices,
                ..Snapshot::default()
            },
            ops: BTreeMap::new(),
            instruments,
            histograms: args.histograms,
            history: History::new(args.devices, history_labels(), now_ms()),
        }
    }
}

fn record_state(ins: &Instruments, device: u32, state: DeviceState) {
    for s in DeviceState::ALL {
        let attrs = [
            KeyValue::new("device", i64::from(device)),
            KeyValue::new("state", s.as_str()),
        ];
        ins.state.record(i64::from(s == state), &attrs);
    }
}

/// A flush's share of the op-duration and attempt histograms: added to the bucket counts
/// hipvisor's endpoint serves, or, on an application's meter, one OpenTelemetry record per op
/// (the API has no count argument).
fn record_histograms(histograms: Option<&BucketHistograms>, ins: &Instruments, device: u32, d: &CounterDelta) {
    if let Some(h) = histograms {
        let mut b = lock(&h.0);
        for (k, op) in OpKind::ALL.iter().enumerate() {
            if d.has_durations(k) {
                let (counts, sum) = b.duration.entry((device, *op)).or_insert_with(|| (vec![0; NB], 0.0));
                counts.iter_mut().zip(&d.durations[k]).for_each(|(c, n)| *c += n);
                *sum += d.duration_ns[k] as f64 / 1e9;
            }
        }
        if d.success_attempt.iter().any(|n| *n > 0) {
            let counts = b.attempt.entry(device).or_default();
            if counts.len() < d.success_attempt.len() {
                counts.resize(d.success_attempt.len(), 0);
            }
            counts.iter_mut().zip(&d.success_attempt).for_each(|(c, n)| *c += n);
        }
        return;
    }
    let dev = KeyValue::new("device", i64::from(device));
    for (k, op) in OpKind::ALL.iter().enumerate() {
        let attrs = [dev.clone(), KeyValue::new("op", op.as_str())];
        for (b, n) in d.durations[k].iter().enumerate() {
            // The bucket's upper bound lands in that bucket.
            let value = crate::history::bucket_bound(&DURATION_BUCKETS, b);
            for _ in 0..*n {
                ins.duration.record(value, &attrs);
            }
        }
    }
    for (attempt, n) in d.success_attempt.iter().enumerate() {
        for _ in 0..*n {
            ins.retry_attempt.record(attempt as u64, std::slice::from_ref(&dev));
        }
    }
}

impl MetricsState {
    fn apply(&mut self, device: u32, d: &CounterDelta) {
        if d.is_empty() {
            return;
        }
        record_histograms(self.histograms.as_ref(), &self.instruments, device, d);
        let s = &mut self.snapshot;
        let ins = &self.instruments;
        let now = now_ms();
        let h = &mut self.history;
        h.retries(now, d.retry_attempts, d.retry_success, d.retry_exhausted);
        let dev = KeyValue::new("device", i64::from(device));
        for (k, op) in OpKind::ALL.iter().enumerate() {
            h.durations(now, k, &d.durations[k]);
            for (o, outcome) in Outcome::ALL.iter().enumerate() {
                let n = d.ops[k][o];
                if n == 0 {
                    continue;
                }
                h.ops(now, o, n);
                *self.ops.entry((device, *op, *outcome)).or_default() += n;
                *s.ops_by_outcome.entry(*outcome).or_default() += n;
                s.ops_total += n;
                if *outcome == Outcome::Success {
                    s.ops_succeeded += n;
                } else {
                    s.ops_failed += n;
                }
                ins.ops.add(
                    n,
                    &[
                        dev.clone(),
                        KeyValue::new("op", op.as_str()),
                        KeyValue::new("outcome", outcome.as_str()),
                    ],
                );
            }
            let count: u64 = d.durations[k].iter().sum();
            if d.has_durations(k) {
                let stats = s.durations.entry(*op).or_insert_with(|| DurationStats {
                    buckets: vec![0; NB],
                    ..DurationStats::default()
                });
                stats.count += count;
                stats.sum_seconds += d.duration_ns[k] as f64 / 1e9;
                let mut cumulative = 0;
                for (b, n) in d.durations[k].iter().enumerate() {
                    cumulative += n;
                    stats.buckets[b] += cumulative;
                }
            }
        }
        for (attempt, n) in d.success_attempt.iter().enumerate() {
            if *n > 0 {
                *s.retries.success_by_attempt.entry(attempt as u32).or_default() += n;
            }
        }
        s.retries.attempts += d.retry_attempts;
        if let Some(entry) = s.devices.get_mut(device as usize) {
            entry.retries += d.retry_attempts;
        }
        s.retries.succeeded += d.retry_success;
        s.retries.exhausted += d.retry_exhausted;
        s.retries.oom_waits += d.oom_waits;
        s.late_completions += d.late;
        let attrs = std::slice::from_ref(&dev);
        if d.retry_attempts > 0 {
            ins.retry_attempts.add(d.retry_attempts, attrs);
        }
        if d.retry_success > 0 {
            ins.retry_success.add(d.retry_success, attrs);
        }
        if d.retry_exhausted > 0 {
            ins.retry_failed.add(d.retry_exhausted, attrs);
        }
    }

    fn device(&mut self, id: u32) -> Option<&mut DeviceSnapshot> {
        self.snapshot.devices.get_mut(id as usize)
    }

    fn event(&mut self, e: MetricsEvent) {
        let now = now_ms();
        let h = &mut self.history;
        match &e {
            MetricsEvent::State { device, state, reason } => h.state(now, *device, state.as_str(), reason.as_deref()),
            MetricsEvent::Restart { device, reason } => h.restart(now, *device, reason),
            MetricsEvent::StickyFault { device, reason } => h.sticky_fault(now, *device, reason),
            MetricsEvent::Breaker { device, state } => h.breaker(now, *device, state.as_str()),
            MetricsEvent::Quarantined(q) => {
                h.kernel_quarantined(now, q.device, &format!("{} (module {})", q.function, q.module))
            }
            MetricsEvent::TaskRerun { .. } => h.task_rerun(now),
            MetricsEvent::TaskQuarantined => h.task_quarantined(now),
            MetricsEvent::DurableRestored { .. }
            | MetricsEvent::DurableHostBytes { .. }
            | MetricsEvent::StandbyShort { .. } => {}
        }
        match e {
            MetricsEvent::State { device, state, reason } => {
                record_state(&self.instruments, device, state);
                if let Some(d) = self.device(device) {
                    d.state = state;
                    d.reason = reason;
                }
            }
            MetricsEvent::Restart { device, .. } => {
                self.snapshot.restarts += 1;
                self.instruments
                    .restarts
                    .add(1, &[KeyValue::new("device", i64::from(device))]);
                if let Some(d) = self.device(device) {
                    d.restarts += 1;
                }
            }
            MetricsEvent::StickyFault { .. } => self.snapshot.sticky_faults += 1,
            MetricsEvent::Breaker { device, state } => {
                self.snapshot.breaker_transitions += 1;
                if let Some(d) = self.device(device) {
                    d.breaker = state;
                }
            }
            MetricsEvent::Quarantined(q) => {
                // The latest ones, bounded: a long run under faults quarantines kernels of
                // each new context's modules again (new module ids each time).
                let list = &mut self.snapshot.quarantined;
                if list.len() == MAX_QUARANTINED {
                    list.remove(0);
                }
                list.push(q);
            }
            MetricsEvent::DurableRestored { device, bytes, seconds } => {
                let r = &mut self.snapshot.recovery;
                r.durable_restores += 1;
                r.durable_restored_bytes += bytes;
                r.durable_restore_seconds += seconds;
                r.durable_restore_seconds_max = r.durable_restore_seconds_max.max(seconds);
                let dev = [KeyValue::new("device", i64::from(device))];
                self.instruments.restored_bytes.add(bytes, &dev);
                self.instruments.restore_duration.record(seconds, &dev);
            }
            MetricsEvent::DurableHostBytes { device, bytes } => {
                let dev = [KeyValue::new("device", i64::from(device))];
                self.instruments
                    .durable_bytes
                    .record(i64::try_from(bytes).unwrap_or(i64::MAX), &dev);
                if let Some(d) = self.device(device) {
                    d.durable_bytes = bytes;
                }
            }
            MetricsEvent::StandbyShort { .. } => self.snapshot.recovery.standby_short += 1,
            MetricsEvent::TaskRerun { device } => {
                self.snapshot.recovery.task_reruns += 1;
                self.instruments
                    .task_reruns
                    .add(1, &[KeyValue::new("device", i64::from(device))]);
            }
            MetricsEvent::TaskQuarantined => self.snapshot.recovery.tasks_quarantined += 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A delta split by a flush between any of its fields, applied as two, counts as the
    /// whole applied as one: in the snapshot (durations, their sums, retries) and in the endpoint's buckets.
    #[test]
    fn an_op_split_between_two_flushes_counts_as_one() {
        let c = DeviceCounters::default();
        c.opened();
        c.answered(
            OpKind::CopyToDevice,
            Outcome::Success,
            Duration::from_micros(1234),
            3,
            false,
        );
        c.opened();
        c.answered(OpKind::Launch, Outcome::Transient, Duration::from_millis(7), 4, true);
        let whole = c.take();
        let zero = c.take();
        // Each field lands in whichever flush took it: the fields in `mask` go in the first.
        let split = |mask: u32| {
            let (mut a, mut b) = (zero.clone(), whole.clone());
            type Move = fn(&mut CounterDelta, &mut CounterDelta);
            let moves: [Move; 6] = [
                |a, b| std::mem::swap(&mut a.ops, &mut b.ops),
                |a, b| std::mem::swap(&mut a.durations, &mut b.durations),
                |a, b| std::mem::swap(&mut a.duration_ns, &mut b.duration_ns),
                |a, b| std::mem::swap(&mut a.success_attempt, &mut b.success_attempt),
                |a, b| std::mem::swap(&mut a.retry_success, &mut b.retry_success),
                |a, b| std::mem::swap(&mut a.retry_exhausted, &mut b.retry_exhausted),
            ];
            for (i, m) in moves.iter().enumerate() {
                if mask >> i & 1 == 1 {
                    m(&mut a, &mut b);
                }
            }
            (a, b)
        };
        let state = || {
            MetricsState::new(MetricsArgs {
                meter: opentelemetry::global::meter("test"),
                devices: 1,
                max_retries: 3,
                histograms: Some(BucketHistograms::new()),
            })
        };
        let seen = |st: &MetricsState| {
            let buckets = st
                .histograms
                .as_ref()
                .unwrap()
                .read(|b| format!("{:?} {:?}", b.duration, b.attempt));
            (serde_json::to_string(&st.snapshot).unwrap(), buckets)
        };
        let mut one = state();
        one.apply(0, &whole);
        for mask in 1..(1 << 6) - 1 {
            let (first, second) = split(mask);
            let mut two = state();
            two.apply(0, &first);
            two.apply(0, &second);
            assert_eq!(seen(&two), seen(&one), "the fields {mask:06b} in the first flush");
        }
    }

    /// `answered` bumps its counters one by one, so a flush can take an op's outcome and
    /// leave its duration and attempt for the next one. A delta holding only such a tail is
    /// not empty: dropping it lost one op from the duration histogram (CI, 199 of 200).
    #[test]
    fn a_delta_with_only_the_tail_of_an_op_is_not_empty() {
        let c = DeviceCounters::default();
        c.durations[0][3].fetch_add(1, Ordering::Relaxed);
        assert!(!c.take().is_empty(), "a duration alone");
        c.duration_ns[0].fetch_add(10, Ordering::Relaxed);
        assert!(!c.take().is_empty(), "a duration sum alone");
        c.success_attempt[2].fetch_add(1, Ordering::Relaxed);
        assert!(!c.take().is_empty(), "an attempt alone");
        c.retry_success.fetch_add(1, Ordering::Relaxed);
        assert!(!c.take().is_empty(), "a retry success alone");
        c.retry_exhausted.fetch_add(1, Ordering::Relaxed);
        assert!(!c.take().is_empty(), "an exhaustion alone");
        assert!(c.take().is_empty(), "nothing left");
    }

    #[test]
    fn retry_stats_since_an_earlier_reading_are_the_differences() {
        let before = RetryStats {
            attempts: 5,
            succeeded: 4,
            exhausted: 1,
            oom_waits: 2,
            success_by_attempt: BTreeMap::from([(1, 100), (2, 4)]),
        };
        let now = RetryStats {
            attempts: 9,
            succeeded: 7,
            exhausted: 1,
            oom_waits: 3,
            success_by_attempt: BTreeMap::from([(1, 150), (2, 7), (3, 1)]),
        };
        let d = now.since(&before);
        assert_eq!((d.attempts, d.succeeded, d.exhausted, d.oom_waits), (4, 3, 0, 1));
        assert_eq!(d.success_by_attempt, BTreeMap::from([(1, 50), (2, 3), (3, 1)]));
        // A reading from another run (counters restarted) does not underflow.
        assert_eq!(before.since(&now).attempts, 0);
    }
}
