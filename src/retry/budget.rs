//! The retry budget ([`RetryBudget`]): retries allowed per device within a window, so a
//! failing device cannot turn its load into a retry storm.

use serde::{Deserialize, Serialize};
use std::time::{Duration, Instant};

/// The retry budget: retries allowed per device within `ttl_ms`, as
/// `min_per_sec × ttl + ratio × requests`, so a failing device cannot turn its load into a
/// retry storm.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryBudgetConfig {
    /// Retries allowed per request within the window (0.2 = one retry per five requests).
    pub ratio: f64,
    /// Retries always allowed per second, whatever the request count.
    pub min_per_sec: u32,
    /// The window over which requests and retries are counted, in milliseconds.
    pub ttl_ms: u64,
}

impl Default for RetryBudgetConfig {
    fn default() -> Self {
        RetryBudgetConfig {
            ratio: 0.2,
            min_per_sec: 10,
            ttl_ms: 10_000,
        }
    }
}

/// The retry budget of one device: a sliding window of request and retry counts.
///
/// A pure state machine: the clock is passed in.
#[derive(Debug, Clone)]
pub struct RetryBudget {
    slots: Vec<(u64, u64)>,
    slot_len: Duration,
    origin: Instant,
    current: u64,
    reserve: f64,
    ratio: f64,
}

const BUDGET_SLOTS: usize = 10;

impl RetryBudget {
    /// A budget with an empty window starting at `now`.
    pub fn new(config: &RetryBudgetConfig, now: Instant) -> RetryBudget {
        let ttl = Duration::from_millis(config.ttl_ms.max(1));
        RetryBudget {
            slots: vec![(0, 0); BUDGET_SLOTS],
            slot_len: ttl / BUDGET_SLOTS as u32,
            origin: now,
            current: 0,
            reserve: f64::from(config.min_per_sec) * ttl.as_secs_f64(),
            ratio: config.ratio,
        }
    }

    fn advance(&mut self, now: Instant) {
        let slot_nanos = self.slot_len.as_nanos().max(1);
        let idx = (now.saturating_duration_since(self.origin).as_nanos() / slot_nanos) as u64;
        if idx <= self.current {
            return;
        }
        let stale = (idx - self.current).min(BUDGET_SLOTS as u64);
        for k in 1..=stale {
            let i = ((self.current + k) % BUDGET_SLOTS as u64) as usize;
            self.slots[i] = (0, 0);
        }
        self.current = idx;
    }

    fn slot(&mut self) -> &mut (u64, u64) {
        let i = (self.current % BUDGET_SLOTS as u64) as usize;
        &mut self.slots[i]
    }

    /// Records a request (a first attempt).
    pub fn deposit(&mut self, now: Instant) {
        self.advance(now);
        self.slot().0 += 1;
    }

    /// Takes one retry from the budget if there is one; `false` means: do not retry.
    pub fn try_withdraw(&mut self, now: Instant) -> bool {
        if self.balance(now) >= 1.0 {
            self.slot().1 += 1;
            true
        } else {
            false
        }
    }

    /// Retries still allowed in the current window.
    pub fn balance(&mut self, now: Instant) -> f64 {
        self.advance(now);
        let (deposits, withdrawals) = self
            .slots
            .iter()
            .fold((0u64, 0u64), |(d, w), (sd, sw)| (d + sd, w + sw));
        self.reserve + self.ratio * deposits as f64 - withdrawals as f64
    }
}
