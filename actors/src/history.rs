//! The runtime's recent history for the dashboard ([`History`]): one sample per second for
//! the last [`HISTORY_SECONDS`] — ops by outcome, retries, latency percentiles by op kind,
//! every device's state and breaker state, restarts, sticky faults, task reruns and
//! quarantines — and the events with their reasons (state changes, restarts, sticky faults,
//! breaker changes, quarantines), the last [`MAX_EVENTS`] of them.
//!
//! It is built by the metrics actor from what it receives anyway (the devices' flushes, every
//! `telemetry.flush_interval_ms`, and the events), off the ops' path; memory is bounded by
//! the two caps whatever the run's length. A second's counts are those flushed during it
//! (an op answered near a second's end may count in the next). Seconds with nothing
//! flushed are samples of zeros, with the devices' states carried over.
//!
//! `/api/history?seconds=N` serves [`History::view`] (see its docs for the JSON schema).

use std::collections::VecDeque;

use serde_json::{Value, json};

/// Seconds of samples kept: 15 minutes.
pub(crate) const HISTORY_SECONDS: usize = 900;

/// Events kept (the oldest go first).
pub(crate) const MAX_EVENTS: usize = 2000;

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

/// What happened in one second.
#[derive(Debug, Clone)]
struct Sample {
    /// Unix seconds.
    t: u64,
    /// Answered ops by outcome.
    ops: Vec<u64>,
    /// Op durations by kind and bucket.
    durations: Vec<Vec<u64>>,
    retry_attempts: u64,
    retry_succeeded: u64,
    retry_exhausted: u64,
    restarts: u64,
    sticky_faults: u64,
    task_reruns: u64,
    tasks_quarantined: u64,
    kernels_quarantined: u64,
    /// Each device's state and breaker state at the second's end.
    devices: Vec<(&'static str, &'static str)>,
}

/// One event, with its reason.
#[derive(Debug, Clone)]
struct Event {
    /// Unix milliseconds.
    t_ms: u64,
    device: Option<u32>,
    kind: &'static str,
    detail: Option<String>,
}

/// The recent history (see the module docs).
#[derive(Debug)]
pub(crate) struct History {
    labels: Labels,
    /// Closed seconds, oldest first; the last is the second under way.
    samples: VecDeque<Sample>,
    events: VecDeque<Event>,
}

impl History {
    /// A history of `devices` devices, every one ready with its breaker closed.
    pub(crate) fn new(devices: u32, labels: Labels) -> History {
        let devices = (0..devices).map(|_| ("ready", "closed")).collect();
        let mut h = History {
            labels,
            samples: VecDeque::with_capacity(HISTORY_SECONDS + 1),
            events: VecDeque::new(),
        };
        h.samples.push_back(h.empty(0, devices));
        h
    }

    fn empty(&self, t: u64, devices: Vec<(&'static str, &'static str)>) -> Sample {
        Sample {
            t,
            ops: vec![0; self.labels.outcomes.len()],
            durations: vec![vec![0; self.labels.buckets.len() + 1]; self.labels.kinds.len()],
            retry_attempts: 0,
            retry_succeeded: 0,
            retry_exhausted: 0,
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
            self.samples[0].t = now; // the first second
        } else if now > last {
            let devices = self.samples.back().map(|s| s.devices.clone()).unwrap_or_default();
            let from = last.max(now.saturating_sub(HISTORY_SECONDS as u64)) + 1;
            for t in from..=now {
                let s = self.empty(t, devices.clone());
                self.samples.push_back(s);
            }
            while self.samples.len() > HISTORY_SECONDS {
                self.samples.pop_front();
            }
        }
        // (A clock stepped back: counted in the latest second.)
        self.samples.back_mut().expect("never empty")
    }

    /// `n` ops answered with outcome `outcome`.
    pub(crate) fn ops(&mut self, now_ms: u64, outcome: usize, n: u64) {
        self.at(now_ms).ops[outcome] += n;
    }

    /// Durations of ops of kind `kind`, by bucket.
    pub(crate) fn durations(&mut self, now_ms: u64, kind: usize, counts: &[u64]) {
        let d = &mut self.at(now_ms).durations[kind];
        for (slot, n) in d.iter_mut().zip(counts) {
            *slot += n;
        }
    }

    /// Retries made, ops that succeeded after a retry, ops whose retries ran out.
    pub(crate) fn retries(&mut self, now_ms: u64, attempts: u64, succeeded: u64, exhausted: u64) {
        let s = self.at(now_ms);
        s.retry_attempts += attempts;
        s.retry_succeeded += succeeded;
        s.retry_exhausted += exhausted;
    }

    /// A device changed state.
    pub(crate) fn state(&mut self, now_ms: u64, device: u32, state: &'static str, reason: Option<&str>) {
        if let Some(d) = self.at(now_ms).devices.get_mut(device as usize) {
            d.0 = state;
        }
        self.event(
            now_ms,
            Some(device),
            "state",
            Some(reason.map_or_else(|| state.to_string(), |r| format!("{state}: {r}"))),
        );
    }

    /// A device's breaker changed state.
    pub(crate) fn breaker(&mut self, now_ms: u64, device: u32, state: &'static str) {
        if let Some(d) = self.at(now_ms).devices.get_mut(device as usize) {
            d.1 = state;
        }
        self.event(now_ms, Some(device), "breaker", Some(state.to_string()));
    }

    /// A device restarted.
    pub(crate) fn restart(&mut self, now_ms: u64, device: u32) {
        self.at(now_ms).restarts += 1;
        self.event(now_ms, Some(device), "restart", None);
    }

    /// A sticky fault surfaced on a device.
    pub(crate) fn sticky_fault(&mut self, now_ms: u64, device: u32) {
        self.at(now_ms).sticky_faults += 1;
        self.event(now_ms, Some(device), "sticky_fault", None);
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
        if self.events.len() == MAX_EVENTS {
            self.events.pop_front();
        }
        self.events.push_back(Event {
            t_ms: now_ms,
            device,
            kind,
            detail,
        });
    }

    /// The last `seconds` seconds (at most [`HISTORY_SECONDS`]) as of `now_ms`, as JSON:
    ///
    /// ```text
    /// { "interval_s": 1, "now_ms": <unix ms>, "seconds": <samples>,
    ///   "samples": [ { "t": <unix s>,
    ///                  "ops": { "<outcome>": n, ... },          // every outcome
    ///                  "retries": { "attempts": n, "succeeded": n, "exhausted": n },
    ///                  "latency_ms": { "<op kind>": { "count": n, "p50": ms, "p99": ms } },
    ///                  "restarts": n, "sticky_faults": n, "task_reruns": n,
    ///                  "tasks_quarantined": n, "kernels_quarantined": n,
    ///                  "devices": [ { "state": "ready", "breaker": "closed" }, ... ] } ],
    ///   "events": [ { "t_ms": <unix ms>, "device": n | null, "kind": "state" | "breaker"
    ///                 | "restart" | "sticky_fault" | "kernel_quarantined" | "task_quarantined",
    ///                 "detail": "..." | null } ] }                 // within the window
    /// ```
    ///
    /// Samples are oldest first, one per second, the last the second under way. Latency
    /// percentiles are the upper bounds of the buckets they fall in (1, 2.5, 5 steps from
    /// 1 µs to 10 s; beyond: twice the last), for the kinds with ops in that second.
    pub(crate) fn view(&mut self, now_ms: u64, seconds: usize) -> Value {
        self.at(now_ms);
        let n = seconds.clamp(1, HISTORY_SECONDS).min(self.samples.len());
        let samples: Vec<Value> = self
            .samples
            .iter()
            .skip(self.samples.len() - n)
            .map(|s| self.sample_json(s))
            .collect();
        let since_ms = self.samples.get(self.samples.len() - n).map_or(0, |s| s.t * 1000);
        let events: Vec<Value> = self
            .events
            .iter()
            .filter(|e| e.t_ms >= since_ms)
            .map(|e| json!({"t_ms": e.t_ms, "device": e.device, "kind": e.kind, "detail": e.detail}))
            .collect();
        json!({"interval_s": 1, "now_ms": now_ms, "seconds": samples.len(), "samples": samples, "events": events})
    }

    fn sample_json(&self, s: &Sample) -> Value {
        let ops: serde_json::Map<String, Value> = self
            .labels
            .outcomes
            .iter()
            .zip(&s.ops)
            .map(|(o, n)| (o.to_string(), json!(n)))
            .collect();
        let mut latency = serde_json::Map::new();
        for (kind, counts) in self.labels.kinds.iter().zip(&s.durations) {
            let count: u64 = counts.iter().sum();
            if count > 0 {
                let p = |q: f64| self.percentile_ms(counts, count, q);
                latency.insert(kind.to_string(), json!({"count": count, "p50": p(0.5), "p99": p(0.99)}));
            }
        }
        let devices: Vec<Value> = s
            .devices
            .iter()
            .map(|(st, b)| json!({"state": st, "breaker": b}))
            .collect();
        json!({
            "t": s.t,
            "ops": ops,
            "retries": {"attempts": s.retry_attempts, "succeeded": s.retry_succeeded, "exhausted": s.retry_exhausted},
            "latency_ms": latency,
            "restarts": s.restarts,
            "sticky_faults": s.sticky_faults,
            "task_reruns": s.task_reruns,
            "tasks_quarantined": s.tasks_quarantined,
            "kernels_quarantined": s.kernels_quarantined,
            "devices": devices,
        })
    }

    /// The upper bound (ms) of the bucket where the `q` quantile of `count` durations falls.
    fn percentile_ms(&self, counts: &[u64], count: u64, q: f64) -> f64 {
        let rank = ((count as f64) * q).ceil().max(1.0) as u64;
        let b = self.labels.buckets;
        let mut seen = 0;
        for (i, n) in counts.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return 1e3 * b.get(i).copied().unwrap_or(2.0 * b[b.len() - 1]);
            }
        }
        1e3 * 2.0 * b[b.len() - 1]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LABELS: Labels = Labels {
        kinds: &["alloc", "launch"],
        outcomes: &["success", "transient"],
        buckets: &[0.001, 0.01, 0.1],
    };

    #[test]
    fn seconds_are_contiguous_idle_ones_zero_and_the_window_bounded() {
        let mut h = History::new(2, LABELS);
        let t0 = 1_000_000_000;
        h.ops(t0, 0, 5);
        h.ops(t0 + 400, 1, 1);
        h.ops(t0 + 3_200, 0, 2); // seconds 1 and 2 idle
        let v = h.view(t0 + 3_500, 60);
        let samples = v["samples"].as_array().unwrap();
        assert_eq!(samples.len(), 4);
        let t: Vec<u64> = samples.iter().map(|s| s["t"].as_u64().unwrap()).collect();
        assert_eq!(t, vec![1_000_000, 1_000_001, 1_000_002, 1_000_003]);
        assert_eq!(samples[0]["ops"]["success"], 5);
        assert_eq!(samples[0]["ops"]["transient"], 1);
        assert_eq!(samples[1]["ops"]["success"], 0);
        assert_eq!(samples[3]["ops"]["success"], 2);
        // Asked for fewer: the latest.
        let v = h.view(t0 + 3_500, 2);
        assert_eq!(v["samples"][0]["t"], 1_000_002);
        // An hour later: the window holds 15 minutes, however long the run.
        h.ops(t0 + 3_600_000, 0, 1);
        assert_eq!(h.samples.len(), HISTORY_SECONDS);
        let v = h.view(t0 + 3_600_000, 100_000);
        assert_eq!(v["seconds"], HISTORY_SECONDS);
        assert_eq!(v["samples"][HISTORY_SECONDS - 1]["ops"]["success"], 1);
    }

    #[test]
    fn device_states_carry_over_and_events_keep_their_reasons_within_the_window() {
        let mut h = History::new(2, LABELS);
        let t0 = 2_000_000_000;
        h.ops(t0, 0, 1);
        h.sticky_fault(t0 + 100, 1);
        h.state(t0 + 100, 1, "restarting", Some("sticky fault: illegal address"));
        h.restart(t0 + 150, 1);
        h.state(t0 + 2_100, 1, "ready", None);
        h.breaker(t0 + 2_200, 0, "open");
        let v = h.view(t0 + 2_500, 60);
        let s = v["samples"].as_array().unwrap();
        assert_eq!(s[0]["devices"][1]["state"], "restarting");
        assert_eq!(s[1]["devices"][1]["state"], "restarting", "carried over an idle second");
        assert_eq!(s[2]["devices"][1]["state"], "ready");
        assert_eq!(s[2]["devices"][0]["breaker"], "open");
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
        assert_eq!(kinds, vec!["sticky_fault", "state", "restart", "state", "breaker"]);
        assert_eq!(v["events"][1]["detail"], "restarting: sticky fault: illegal address");
        // Outside the window asked for: left out.
        let v = h.view(t0 + 2_500, 1);
        assert_eq!(v["events"].as_array().unwrap().len(), 2);
        // Bounded.
        for i in 0..(MAX_EVENTS as u64 + 10) {
            h.restart(t0 + 3_000 + i, 0);
        }
        assert_eq!(h.events.len(), MAX_EVENTS);
    }

    #[test]
    fn latency_percentiles_are_bucket_bounds_per_kind() {
        let mut h = History::new(1, LABELS);
        let t0 = 3_000_000_000;
        // 98 launches under 1 ms, 2 under 100 ms: p50 1 ms, p99 100 ms.
        h.durations(t0, 1, &[98, 0, 2, 0]);
        h.durations(t0, 0, &[0, 0, 0, 1]); // one alloc beyond the last bound
        let v = h.view(t0, 1);
        let l = &v["samples"][0]["latency_ms"];
        assert_eq!(l["launch"]["count"], 100);
        assert_eq!(l["launch"]["p50"], 1.0);
        assert_eq!(l["launch"]["p99"], 100.0);
        assert_eq!(l["alloc"]["p50"], 200.0);
        assert!(v["samples"][0]["latency_ms"].get("free").is_none());
    }
}
