//! The runtime's recent history for the dashboard ([`History`]): one sample per second for
//! the last [`HISTORY_SECONDS`] and the second under way ([`HISTORY_SAMPLES`]) — ops by outcome, retries, latency percentiles by op kind,
//! every device's state (at the second's end, and the worst it was in during it) and breaker
//! state, restarts, sticky faults, task reruns and quarantines — and the events with their
//! reasons (state changes, restarts, sticky faults, breaker changes, quarantines), the last
//! [`MAX_EVENTS`] of each kind on each device.
//!
//! It is built by the metrics actor from what it receives anyway (the devices' flushes, every
//! `telemetry.flush_interval_ms`, and the events), off the ops' path, on a monotonic clock;
//! memory is bounded by the caps whatever the run's length (a closed second keeps its
//! percentiles, not its latency histogram). A second's counts are those flushed during it
//! (an op answered near a second's end may count in the next). Seconds with nothing flushed
//! are samples of zeros, with the devices' states carried over.
//!
//! `/api/history?seconds=N` serves [`History::view`] (see [`HistoryView`] for the JSON
//! schema); the metrics actor copies pointers to the samples and events (shared, never
//! changed once their second is closed), and the JSON is made outside it.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use serde::Serialize;

/// Complete seconds of samples kept: 15 minutes.
pub(crate) const HISTORY_SECONDS: usize = 900;

/// Samples kept: the complete seconds and the second under way.
pub(crate) const HISTORY_SAMPLES: usize = HISTORY_SECONDS + 1;

/// Events kept of each kind on each device (the oldest go first), so that a flapping
/// breaker does not push the restarts out, nor a busy device another's.
pub(crate) const MAX_EVENTS: usize = 1000;

/// The names of what a sample counts, fixed when the history is made.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Labels {
    /// Op kinds, by index.
    pub(crate) kinds: &'static [&'static str],
    /// Outcomes, by index.
    pub(crate) outcomes: &'static [&'static str],
    /// Upper bounds of the latency buckets, in seconds (a last bucket beyond them).
    pub(crate) buckets: &'static [f64],
}

/// The duration a bucket stands for: its upper bound (of `bounds`), and beyond the last
/// bound, twice it.
pub(crate) fn bucket_bound(bounds: &[f64], bucket: usize) -> f64 {
    bounds.get(bucket).copied().unwrap_or(2.0 * bounds[bounds.len() - 1])
}

/// Device states, least to most severe (the worst of a second is the most severe).
const SEVERITY: [&str; 4] = ["ready", "restarting", "lost", "failed"];

fn severity(state: &str) -> usize {
    SEVERITY.iter().position(|s| *s == state).unwrap_or(0)
}

/// One device in one second.
#[derive(Debug, Clone, Copy, Serialize)]
pub(crate) struct DeviceSample {
    /// Its state at the second's end.
    state: &'static str,
    /// The most severe state it was in during the second (ready < restarting < lost <
    /// failed): a restart of a few milliseconds shows.
    worst: &'static str,
    /// Its breaker's state at the second's end.
    breaker: &'static str,
}

/// One op kind's latency in one second.
#[derive(Debug, Clone, Copy, Serialize)]
pub(crate) struct Latency {
    count: u64,
    /// Milliseconds: the upper bound of the bucket the median falls in.
    p50: f64,
    /// Milliseconds: the upper bound of the bucket the 99th percentile falls in.
    p99: f64,
}

/// Retries in one second.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub(crate) struct Retries {
    attempts: u64,
    succeeded: u64,
    exhausted: u64,
}

/// What happened in one second.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Sample {
    /// Unix seconds.
    t: u64,
    /// Answered ops by outcome.
    ops: BTreeMap<&'static str, u64>,
    retries: Retries,
    /// By op kind, the kinds with ops answered that second.
    latency_ms: BTreeMap<&'static str, Latency>,
    restarts: u64,
    sticky_faults: u64,
    task_reruns: u64,
    tasks_quarantined: u64,
    kernels_quarantined: u64,
    devices: Vec<DeviceSample>,
}

/// One event, with its reason.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Event {
    /// Unix milliseconds.
    t_ms: u64,
    /// The order events came in (of equal times too).
    #[serde(skip)]
    seq: u64,
    device: Option<u32>,
    kind: &'static str,
    detail: Option<String>,
}

/// What `/api/history` serves:
///
/// ```text
/// { "interval_s": 1, "started_ms": <unix ms>, "now_ms": <unix ms>, "seconds": <samples>,
///   "max_events": <events kept of each kind on each device>,
///   "samples": [ { "t": <unix s>,
///                  "ops": { "<outcome>": n, ... },          // every outcome
///                  "retries": { "attempts": n, "succeeded": n, "exhausted": n },
///                  "latency_ms": { "<op kind>": { "count": n, "p50": ms, "p99": ms } },
///                  "restarts": n, "sticky_faults": n, "task_reruns": n,
///                  "tasks_quarantined": n, "kernels_quarantined": n,
///                  "devices": [ { "state": s, "worst": s, "breaker": b }, ... ] } ],
///   "events": [ { "t_ms": <unix ms>, "device": n | null, "kind": k, "detail": d } ] }
/// ```
///
/// Samples are oldest first, one per second, the last the second under way (partial).
/// `latency_ms` lists the kinds with ops answered that second; a percentile is the upper
/// bound of the bucket it falls in (1, 2.5, 5 steps from 1 µs to 10 s; beyond: 20 s).
/// Events are those within the window, oldest first (the last [`MAX_EVENTS`] of each kind
/// on each device); `detail` is, by kind: `state` — "new
/// state" or "new state: reason"; `breaker` — its new state; `restart` — why; `sticky_fault`
/// — the error; `kernel_quarantined` — "kernel (module id)"; `task_quarantined` — null.
#[derive(Debug, Clone, Serialize)]
pub struct HistoryView {
    interval_s: u32,
    /// When the history began (the runtime's start): a client that merges polls tells
    /// another process's history by it.
    started_ms: u64,
    now_ms: u64,
    seconds: usize,
    /// [`MAX_EVENTS`]: a client that merges polls keeps as many.
    max_events: usize,
    #[serde(serialize_with = "shared")]
    samples: Vec<Arc<Sample>>,
    #[serde(serialize_with = "shared")]
    events: Vec<Arc<Event>>,
}

/// Serializes shared values as the values.
fn shared<T: Serialize, S: serde::Serializer>(v: &[Arc<T>], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(v.iter().map(|x| &**x))
}

/// The recent history (see the module docs).
#[derive(Debug)]
pub(crate) struct History {
    labels: Labels,
    /// When it began (unix ms, on the monotonic clock).
    started_ms: u64,
    /// Oldest first; the last is the second under way. Shared with the views that copied
    /// them (a closed second does not change), so a view copies pointers, not samples.
    samples: VecDeque<Arc<Sample>>,
    /// The second under way's durations, by kind and bucket.
    durations: Vec<Vec<u64>>,
    /// By kind and device, oldest first.
    events: BTreeMap<(&'static str, Option<u32>), VecDeque<Arc<Event>>>,
    /// Events so far.
    seq: u64,
}

impl History {
    /// A history of `devices` devices, every one ready with its breaker closed, begun at
    /// `started_ms`.
    pub(crate) fn new(devices: u32, labels: Labels, started_ms: u64) -> History {
        let ready = DeviceSample {
            state: "ready",
            worst: "ready",
            breaker: "closed",
        };
        let mut h = History {
            labels,
            started_ms,
            samples: VecDeque::with_capacity(HISTORY_SAMPLES),
            durations: vec![vec![0; labels.buckets.len() + 1]; labels.kinds.len()],
            events: BTreeMap::new(),
            seq: 0,
        };
        h.samples.push_back(Arc::new(h.empty(0, vec![ready; devices as usize])));
        h
    }

    fn empty(&self, t: u64, devices: Vec<DeviceSample>) -> Sample {
        Sample {
            t,
            ops: self.labels.outcomes.iter().map(|o| (*o, 0)).collect(),
            retries: Retries::default(),
            latency_ms: BTreeMap::new(),
            restarts: 0,
            sticky_faults: 0,
            task_reruns: 0,
            tasks_quarantined: 0,
            kernels_quarantined: 0,
            devices,
        }
    }

    /// The sample of the second of `now_ms`, after samples of zeros for the seconds since
    /// the last one (at most the window's worth).
    fn at(&mut self, now_ms: u64) -> &mut Sample {
        let now = now_ms / 1000;
        let last = self.samples.back().map_or(0, |s| s.t);
        if self.samples.len() == 1 && self.samples[0].t == 0 {
            Arc::make_mut(&mut self.samples[0]).t = now; // the first second
        } else if now > last {
            self.close_latency();
            let carried: Vec<DeviceSample> = self
                .samples
                .back()
                .map(|s| {
                    s.devices
                        .iter()
                        .map(|d| DeviceSample { worst: d.state, ..*d })
                        .collect()
                })
                .unwrap_or_default();
            let from = last.max(now.saturating_sub(HISTORY_SAMPLES as u64)) + 1;
            for t in from..=now {
                let s = self.empty(t, carried.clone());
                self.samples.push_back(Arc::new(s));
            }
            while self.samples.len() > HISTORY_SAMPLES {
                self.samples.pop_front();
            }
        }
        // (The clock is monotonic: `now` is never before the latest second.) A view may still
        // hold the second under way: it keeps what it copied.
        Arc::make_mut(self.samples.back_mut().expect("never empty"))
    }

    /// The latency percentiles of the second under way, from its durations (which start
    /// again at zero for the next).
    fn close_latency(&mut self) {
        let latency = self.latency_now();
        if let Some(s) = self.samples.back_mut() {
            Arc::make_mut(s).latency_ms = latency;
        }
        for d in &mut self.durations {
            d.fill(0);
        }
    }

    fn latency_now(&self) -> BTreeMap<&'static str, Latency> {
        let mut latency = BTreeMap::new();
        for (kind, counts) in self.labels.kinds.iter().zip(&self.durations) {
            let count: u64 = counts.iter().sum();
            if count > 0 {
                let p = |q: f64| self.percentile_ms(counts, count, q);
                latency.insert(
                    *kind,
                    Latency {
                        count,
                        p50: p(0.5),
                        p99: p(0.99),
                    },
                );
            }
        }
        latency
    }

    /// `n` ops answered with outcome `outcome` (an index of the labels' outcomes).
    pub(crate) fn ops(&mut self, now_ms: u64, outcome: usize, n: u64) {
        let name = self.labels.outcomes[outcome];
        *self.at(now_ms).ops.entry(name).or_default() += n;
    }

    /// Durations of ops of kind `kind`, by bucket.
    pub(crate) fn durations(&mut self, now_ms: u64, kind: usize, counts: &[u64]) {
        self.at(now_ms);
        for (slot, n) in self.durations[kind].iter_mut().zip(counts) {
            *slot += n;
        }
    }

    /// Retries made, ops that succeeded after a retry, ops whose retries ran out.
    pub(crate) fn retries(&mut self, now_ms: u64, attempts: u64, succeeded: u64, exhausted: u64) {
        let r = &mut self.at(now_ms).retries;
        r.attempts += attempts;
        r.succeeded += succeeded;
        r.exhausted += exhausted;
    }

    /// A device changed state.
    pub(crate) fn state(&mut self, now_ms: u64, device: u32, state: &'static str, reason: Option<&str>) {
        if let Some(d) = self.at(now_ms).devices.get_mut(device as usize) {
            d.state = state;
            if severity(state) > severity(d.worst) {
                d.worst = state;
            }
        }
        let detail = reason.map_or_else(|| state.to_string(), |r| format!("{state}: {r}"));
        self.event(now_ms, Some(device), "state", Some(detail));
    }

    /// A device's breaker changed state.
    pub(crate) fn breaker(&mut self, now_ms: u64, device: u32, state: &'static str) {
        if let Some(d) = self.at(now_ms).devices.get_mut(device as usize) {
            d.breaker = state;
        }
        self.event(now_ms, Some(device), "breaker", Some(state.to_string()));
    }

    /// A device restarted, and why.
    pub(crate) fn restart(&mut self, now_ms: u64, device: u32, reason: &str) {
        self.at(now_ms).restarts += 1;
        self.event(now_ms, Some(device), "restart", Some(reason.to_string()));
    }

    /// A sticky fault surfaced on a device.
    pub(crate) fn sticky_fault(&mut self, now_ms: u64, device: u32, error: &str) {
        self.at(now_ms).sticky_faults += 1;
        self.event(now_ms, Some(device), "sticky_fault", Some(error.to_string()));
    }

    /// A kernel was quarantined.
    pub(crate) fn kernel_quarantined(&mut self, now_ms: u64, device: u32, kernel: &str) {
        self.at(now_ms).kernels_quarantined += 1;
        self.event(now_ms, Some(device), "kernel_quarantined", Some(kernel.to_string()));
    }

    /// A task ran again (counted, not an event: there can be many).
    pub(crate) fn task_rerun(&mut self, now_ms: u64) {
        self.at(now_ms).task_reruns += 1;
    }

    /// A task was quarantined as a poison request.
    pub(crate) fn task_quarantined(&mut self, now_ms: u64) {
        self.at(now_ms).tasks_quarantined += 1;
        self.event(now_ms, None, "task_quarantined", None);
    }

    fn event(&mut self, now_ms: u64, device: Option<u32>, kind: &'static str, detail: Option<String>) {
        self.seq += 1;
        let seq = self.seq;
        let events = self.events.entry((kind, device)).or_default();
        if events.len() == MAX_EVENTS {
            events.pop_front();
        }
        events.push_back(Arc::new(Event {
            t_ms: now_ms,
            seq,
            device,
            kind,
            detail,
        }));
    }

    /// The last `seconds` samples (1 to [`HISTORY_SAMPLES`]) as of `now_ms` (a copy: see
    /// [`HistoryView`] for what it serializes to).
    pub(crate) fn view(&mut self, now_ms: u64, seconds: usize) -> HistoryView {
        self.at(now_ms);
        let n = seconds.clamp(1, HISTORY_SAMPLES).min(self.samples.len());
        let mut samples: Vec<Arc<Sample>> = self.samples.iter().skip(self.samples.len() - n).cloned().collect();
        if let Some(last) = samples.last_mut() {
            Arc::make_mut(last).latency_ms = self.latency_now(); // the second under way, so far
        }
        let since_ms = samples.first().map_or(0, |s| s.t * 1000);
        let mut events: Vec<Arc<Event>> = self
            .events
            .values()
            .flat_map(|e| e.iter().filter(|e| e.t_ms >= since_ms).cloned())
            .collect();
        events.sort_by_key(|e| (e.t_ms, e.seq));
        HistoryView {
            interval_s: 1,
            started_ms: self.started_ms,
            now_ms,
            seconds: samples.len(),
            max_events: MAX_EVENTS,
            samples,
            events,
        }
    }

    /// The upper bound (ms) of the bucket where the `q` quantile of `count` durations falls.
    fn percentile_ms(&self, counts: &[u64], count: u64, q: f64) -> f64 {
        let rank = ((count as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        let bucket = counts.iter().position(|n| {
            seen += n;
            seen >= rank
        });
        1e3 * bucket_bound(self.labels.buckets, bucket.unwrap_or(counts.len()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    const LABELS: Labels = Labels {
        kinds: &["alloc", "launch"],
        outcomes: &["success", "transient"],
        buckets: &[0.001, 0.01, 0.1],
    };

    fn view(h: &mut History, now_ms: u64, seconds: usize) -> Value {
        json!(h.view(now_ms, seconds))
    }

    #[test]
    fn seconds_are_contiguous_idle_ones_zero_and_the_window_bounded() {
        let mut h = History::new(2, LABELS, 0);
        let t0 = 1_000_000_000;
        h.ops(t0, 0, 5);
        h.ops(t0 + 400, 1, 1);
        h.ops(t0 + 3_200, 0, 2); // seconds 1 and 2 idle
        let v = view(&mut h, t0 + 3_500, 60);
        let samples = v["samples"].as_array().unwrap();
        assert_eq!(samples.len(), 4);
        let t: Vec<u64> = samples.iter().map(|s| s["t"].as_u64().unwrap()).collect();
        assert_eq!(t, vec![1_000_000, 1_000_001, 1_000_002, 1_000_003]);
        assert_eq!(samples[0]["ops"]["success"], 5);
        assert_eq!(samples[0]["ops"]["transient"], 1);
        assert_eq!(samples[1]["ops"]["success"], 0);
        assert_eq!(samples[3]["ops"]["success"], 2);
        // Asked for fewer: the latest.
        let v = view(&mut h, t0 + 3_500, 2);
        assert_eq!(v["samples"][0]["t"], 1_000_002);
        // An hour later: the window holds 15 minutes and the second under way, however
        // long the run.
        h.ops(t0 + 3_600_000, 0, 1);
        assert_eq!(h.samples.len(), HISTORY_SAMPLES);
        let v = view(&mut h, t0 + 3_600_000, 100_000);
        assert_eq!(v["seconds"], HISTORY_SAMPLES);
        assert_eq!(v["samples"][HISTORY_SECONDS]["ops"]["success"], 1);
        assert_eq!(v["samples"][0]["t"], 1_000_000 + 3_600 - HISTORY_SECONDS as u64);
    }

    #[test]
    fn device_states_carry_over_a_short_restart_shows_and_events_keep_their_reasons() {
        let mut h = History::new(2, LABELS, 0);
        let t0 = 2_000_000_000;
        h.ops(t0, 0, 1);
        h.sticky_fault(t0 + 100, 1, "hipErrorIllegalAddress (700)");
        h.state(t0 + 100, 1, "restarting", Some("sticky fault: illegal address"));
        h.restart(t0 + 150, 1, "restarting: sticky fault");
        h.state(t0 + 2_100, 1, "ready", None);
        h.breaker(t0 + 2_200, 0, "open");
        // A restart of 20 ms within one second.
        h.state(t0 + 3_100, 0, "restarting", None);
        h.state(t0 + 3_120, 0, "ready", None);
        let v = view(&mut h, t0 + 4_500, 60);
        let s = v["samples"].as_array().unwrap();
        assert_eq!(s[0]["devices"][1]["state"], "restarting");
        assert_eq!(s[1]["devices"][1]["state"], "restarting", "carried over an idle second");
        assert_eq!(s[2]["devices"][1]["state"], "ready");
        assert_eq!(
            s[2]["devices"][1]["worst"], "restarting",
            "restarting until it was ready"
        );
        assert_eq!(s[2]["devices"][0]["breaker"], "open");
        assert_eq!(
            (
                s[3]["devices"][0]["state"].as_str(),
                s[3]["devices"][0]["worst"].as_str()
            ),
            (Some("ready"), Some("restarting"))
        );
        assert_eq!(s[4]["devices"][0]["worst"], "ready");
        assert_eq!(
            (s[0]["restarts"].as_u64(), s[0]["sticky_faults"].as_u64()),
            (Some(1), Some(1))
        );
        let kinds: Vec<&str> = v["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["kind"].as_str().unwrap())
            .collect();
        assert_eq!(
            kinds,
            vec!["sticky_fault", "state", "restart", "state", "breaker", "state", "state"]
        );
        assert_eq!(v["events"][0]["detail"], "hipErrorIllegalAddress (700)");
        assert_eq!(v["events"][1]["detail"], "restarting: sticky fault: illegal address");
        assert_eq!(v["events"][2]["detail"], "restarting: sticky fault");
        // Outside the window asked for: left out.
        let v = view(&mut h, t0 + 4_500, 2);
        assert_eq!(v["events"].as_array().unwrap().len(), 2);
        // Bounded by kind and device: a flapping breaker does not push the restarts out,
        // nor a busy device another's events.
        for i in 0..(MAX_EVENTS as u64 + 10) {
            h.breaker(t0 + 5_000 + i, 0, "open");
            h.state(t0 + 5_000 + i, 0, "ready", None);
        }
        assert_eq!(h.events[&("breaker", Some(0))].len(), MAX_EVENTS);
        assert_eq!(h.events[&("state", Some(0))].len(), MAX_EVENTS);
        assert_eq!(h.events[&("state", Some(1))].len(), 2);
        assert_eq!(h.events[&("restart", Some(1))].len(), 1);
    }

    #[test]
    fn a_view_keeps_what_it_copied_while_the_history_moves_on() {
        let mut h = History::new(1, LABELS, 0);
        let t0 = 4_000_000_000;
        h.ops(t0, 0, 1);
        h.restart(t0, 0, "first");
        let early = h.view(t0 + 10, 5); // shares the samples and events
        h.ops(t0 + 20, 0, 2); // the same second, after the view
        h.ops(t0 + 1_000, 0, 4); // the next
        let early = json!(early);
        assert_eq!(early["samples"].as_array().unwrap().len(), 1);
        assert_eq!(early["samples"][0]["ops"]["success"], 1);
        let now = view(&mut h, t0 + 1_000, 5);
        assert_eq!(now["samples"][0]["ops"]["success"], 3);
        assert_eq!(now["samples"][1]["ops"]["success"], 4);
        assert_eq!(now["events"][0]["detail"], "first");
    }

    #[test]
    fn latency_percentiles_are_bucket_bounds_per_kind_and_kept_as_such() {
        let mut h = History::new(1, LABELS, 0);
        let t0 = 3_000_000_000;
        // 98 launches under 1 ms, 2 under 100 ms: p50 1 ms, p99 100 ms.
        h.durations(t0, 1, &[98, 0, 2, 0]);
        h.durations(t0, 0, &[0, 0, 0, 1]); // one alloc beyond the last bound
        let v = view(&mut h, t0, 1);
        let l = &v["samples"][0]["latency_ms"];
        assert_eq!(l["launch"]["count"], 100);
        assert_eq!(l["launch"]["p50"], 1.0);
        assert_eq!(l["launch"]["p99"], 100.0);
        assert_eq!(l["alloc"]["p50"], 200.0);
        assert!(l.get("free").is_none());
        // The next second: that one's percentiles kept, the new one's from zero.
        h.durations(t0 + 1_000, 1, &[0, 1, 0, 0]);
        let v = view(&mut h, t0 + 1_000, 2);
        assert_eq!(v["samples"][0]["latency_ms"]["launch"]["p99"], 100.0);
        assert_eq!(v["samples"][1]["latency_ms"]["launch"]["count"], 1);
        assert_eq!(v["samples"][1]["latency_ms"]["launch"]["p50"], 10.0);
        assert!(v["samples"][1]["latency_ms"].get("alloc").is_none());
    }
}
