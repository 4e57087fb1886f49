//! Circuit breaker: a pure state machine, with the clock passed in.
//!
//! - **Closed**: calls pass. The breaker opens on `consecutive_failures` failures in a row,
//!   or when, over the last `window` calls (and at least `min_calls` of them), the failure
//!   rate reaches `failure_rate`.
//! - **Open**: calls are rejected for `open_ms`; then the breaker is half-open.
//! - **HalfOpen**: up to `half_open_probes` calls are admitted as probes. When all of them
//!   succeed the breaker closes (with a fresh window); any probe failure opens it again.
//!   Answers are not told apart by how their calls were admitted: a call admitted while the
//!   breaker was closed that succeeds once it is half-open counts as a successful probe (the
//!   device did answer), and one that fails opens it again.
//!
//! What counts as a failure is the caller's decision (the runtime counts transient and
//! sticky errors and device losses, never invalid requests).

use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::config::error::ConfigError;

/// Breaker settings: the `[breaker]` section of the config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BreakerConfig {
    /// Whether the runtime uses a breaker per device. Default `true`.
    pub enabled: bool,
    /// Failures in a row that open the breaker. Default 5.
    pub consecutive_failures: u32,
    /// Failure rate over the window that opens the breaker, in `(0, 1]`. Default 0.5.
    pub failure_rate: f64,
    /// Calls in the sliding window. Default 20.
    pub window: u32,
    /// Calls the window must hold before the rate counts. Default 10.
    pub min_calls: u32,
    /// How long the breaker stays open, in milliseconds. Default 5000.
    pub open_ms: u64,
    /// Probes admitted when half-open. Default 1.
    pub half_open_probes: u32,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            enabled: true,
            consecutive_failures: 5,
            failure_rate: 0.5,
            window: 20,
            min_calls: 10,
            open_ms: 5000,
            half_open_probes: 1,
        }
    }
}

impl BreakerConfig {
    /// Checks every value, naming the first bad key.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the key and the reason.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.consecutive_failures == 0 {
            return Err(ConfigError::invalid(
                "breaker.consecutive_failures",
                "must be at least 1",
            ));
        }
        if !(self.failure_rate > 0.0 && self.failure_rate <= 1.0) {
            return Err(ConfigError::invalid(
                "breaker.failure_rate",
                format!("must be in (0, 1], got {}", self.failure_rate),
            ));
        }
        if self.window == 0 {
            return Err(ConfigError::invalid("breaker.window", "must be at least 1"));
        }
        if self.min_calls == 0 || self.min_calls > self.window {
            return Err(ConfigError::invalid(
                "breaker.min_calls",
                format!("must be from 1 to window ({}), got {}", self.window, self.min_calls),
            ));
        }
        if self.half_open_probes == 0 {
            return Err(ConfigError::invalid("breaker.half_open_probes", "must be at least 1"));
        }
        Ok(())
    }
}

/// The breaker's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakerState {
    /// Calls pass.
    Closed,
    /// Calls are rejected.
    Open,
    /// A limited number of probe calls pass.
    HalfOpen,
}

impl BreakerState {
    /// The state's name in `snake_case`.
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }
}

/// The answer to [`CircuitBreaker::admit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// The call may proceed.
    Allowed,
    /// The call may proceed as one of the half-open probes.
    Probe,
    /// The call is rejected; the breaker is open for about this long still (zero when
    /// half-open and all probes are out).
    Rejected {
        /// Time until the breaker turns half-open.
        retry_after: Duration,
    },
}

impl Admission {
    /// `true` unless rejected.
    pub fn is_allowed(self) -> bool {
        !matches!(self, Admission::Rejected { .. })
    }
}

/// A state change, reported so the runtime can count it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transition {
    /// The state before.
    pub from: BreakerState,
    /// The state after.
    pub to: BreakerState,
}

/// A circuit breaker. See the module docs.
#[derive(Debug, Clone)]
pub struct CircuitBreaker {
    config: BreakerConfig,
    state: BreakerState,
    consecutive: u32,
    window: VecDeque<bool>,
    failures_in_window: u32,
    opened_at: Option<Instant>,
    probes_out: u32,
    probes_ok: u32,
}

impl CircuitBreaker {
    /// A closed breaker.
    pub fn new(config: BreakerConfig) -> CircuitBreaker {
        CircuitBreaker {
            window: VecDeque::with_capacity(config.window as usize),
            config,
            state: BreakerState::Closed,
            consecutive: 0,
            failures_in_window: 0,
            opened_at: None,
            probes_out: 0,
            probes_ok: 0,
        }
    }

    /// The state at `now` (an open breaker whose time is up reads as half-open).
    pub fn state(&self, now: Instant) -> BreakerState {
        match (self.state, self.opened_at) {
            (BreakerState::Open, Some(at)) if now >= at + self.open_for() => BreakerState::HalfOpen,
            (s, _) => s,
        }
    }

    fn open_for(&self) -> Duration {
        Duration::from_millis(self.config.open_ms)
    }

    /// Moves an open breaker whose time is up to half-open; returns the transition if any.
    /// [`admit`](Self::admit) and the `record_*` calls do this first themselves, but return
    /// only their last transition: a caller that reports every transition calls this before
    /// them, so that a call that both expires the open time and answers reports both.
    pub fn expire(&mut self, now: Instant) -> Option<Transition> {
        if self.state == BreakerState::Open && self.state(now) == BreakerState::HalfOpen {
            self.probes_out = 0;
            self.probes_ok = 0;
            return Some(self.set(BreakerState::HalfOpen));
        }
        None
    }

    fn set(&mut self, to: BreakerState) -> Transition {
        let from = self.state;
        self.state = to;
        Transition { from, to }
    }

    /// Asks whether a call may proceed at `now`. A probe admitted here must be answered with
    /// [`record_success`](Self::record_success) or [`record_failure`](Self::record_failure).
    pub fn admit(&mut self, now: Instant) -> (Admission, Option<Transition>) {
        let t = self.expire(now);
        let a = match self.state {
            BreakerState::Closed => Admission::Allowed,
            BreakerState::Open => Admission::Rejected {
                retry_after: self.opened_at.map_or(Duration::ZERO, |at| {
                    (at + self.open_for()).saturating_duration_since(now)
                }),
            },
            BreakerState::HalfOpen if self.probes_out < self.config.half_open_probes => {
                self.probes_out += 1;
                Admission::Probe
            }
            BreakerState::HalfOpen => Admission::Rejected {
                retry_after: Duration::ZERO,
            },
        };
        (a, t)
    }

    /// Records a successful call.
    pub fn record_success(&mut self, now: Instant) -> Option<Transition> {
        let t = self.expire(now);
        match self.state {
            BreakerState::Closed => {
                self.consecutive = 0;
                self.push(false);
                t
            }
            BreakerState::HalfOpen => {
                self.probes_ok += 1;
                if self.probes_ok >= self.config.half_open_probes {
                    self.reset_window();
                    Some(self.set(BreakerState::Closed))
                } else {
                    t
                }
            }
            // A late answer of a call admitted before the breaker opened: no effect.
            BreakerState::Open => t,
        }
    }

    /// Records `n` successful calls at once (counted elsewhere meanwhile); the last
    /// transition, if any.
    pub fn record_successes(&mut self, n: u64, now: Instant) -> Option<Transition> {
        // More successes than the window and the probes hold change nothing further.
        let bound = u64::from(self.config.window) + u64::from(self.config.half_open_probes);
        let mut last = None;
        for _ in 0..n.min(bound) {
            last = self.record_success(now).or(last);
        }
        last
    }

    /// Records a failed call.
    pub fn record_failure(&mut self, now: Instant) -> Option<Transition> {
        let t = self.expire(now);
        match self.state {
            BreakerState::Closed => {
                self.consecutive += 1;
                self.push(true);
                let n = self.window.len() as u32;
                let rate_trips = n >= self.config.min_calls
                    && f64::from(self.failures_in_window) / f64::from(n) >= self.config.failure_rate;
                if self.consecutive >= self.config.consecutive_failures || rate_trips {
                    Some(self.open(now))
                } else {
                    t
                }
            }
            BreakerState::HalfOpen => Some(self.open(now)),
            BreakerState::Open => t,
        }
    }

    fn open(&mut self, now: Instant) -> Transition {
        self.opened_at = Some(now);
        self.reset_window();
        self.set(BreakerState::Open)
    }

    fn reset_window(&mut self) {
        self.window.clear();
        self.failures_in_window = 0;
        self.consecutive = 0;
    }

    fn push(&mut self, failed: bool) {
        if self.window.len() == self.config.window as usize && self.window.pop_front() == Some(true) {
            self.failures_in_window -= 1;
        }
        self.window.push_back(failed);
        self.failures_in_window += u32::from(failed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> BreakerConfig {
        BreakerConfig {
            enabled: true,
            consecutive_failures: 3,
            failure_rate: 0.5,
            window: 10,
            min_calls: 6,
            open_ms: 1000,
            half_open_probes: 2,
        }
    }

    #[test]
    fn successes_recorded_at_once_count_as_the_same_successes_one_by_one() {
        let now = Instant::now();
        let (mut one, mut many) = (CircuitBreaker::new(cfg()), CircuitBreaker::new(cfg()));
        for _ in 0..3 {
            one.record_failure(now);
            many.record_failure(now);
        }
        for _ in 0..7 {
            one.record_success(now);
        }
        assert_eq!(many.record_successes(7, now), None);
        assert_eq!(
            (many.window.clone(), many.failures_in_window, many.consecutive),
            (one.window.clone(), one.failures_in_window, one.consecutive)
        );
        // A count far beyond the window is bounded, with the same effect.
        many.record_successes(u64::MAX, now);
        for _ in 0..1000 {
            one.record_success(now);
        }
        assert_eq!(
            (many.window, many.failures_in_window),
            (one.window, one.failures_in_window)
        );
    }

    #[test]
    fn opens_on_consecutive_failures() {
        let t0 = Instant::now();
        let mut b = CircuitBreaker::new(cfg());
        assert_eq!(b.record_failure(t0), None);
        assert_eq!(b.record_failure(t0), None);
        let t = b.record_failure(t0).unwrap();
        assert_eq!((t.from, t.to), (BreakerState::Closed, BreakerState::Open));
        assert!(
            matches!(b.admit(t0).0, Admission::Rejected { retry_after } if retry_after == Duration::from_millis(1000))
        );
    }

    #[test]
    fn a_success_resets_the_consecutive_count() {
        let t0 = Instant::now();
        // failure_rate 1.0: only the consecutive rule can trip here.
        let mut b = CircuitBreaker::new(BreakerConfig {
            failure_rate: 1.0,
            ..cfg()
        });
        for _ in 0..4 {
            b.record_failure(t0);
            b.record_failure(t0);
            b.record_success(t0);
        }
        assert_eq!(b.state(t0), BreakerState::Closed);
    }

    #[test]
    fn opens_on_failure_rate_once_min_calls_are_in() {
        let t0 = Instant::now();
        let mut b = CircuitBreaker::new(BreakerConfig {
            consecutive_failures: 100,
            ..cfg()
        });
        // F S F S F: 5 calls, below min_calls 6, rate 0.6: stays closed.
        for i in 0..5 {
            if i % 2 == 0 {
                b.record_failure(t0)
            } else {
                b.record_success(t0)
            };
        }
        assert_eq!(b.state(t0), BreakerState::Closed);
        // S: 6 calls, 3 failures = 0.5 — but a success never opens.
        b.record_success(t0);
        assert_eq!(b.state(t0), BreakerState::Closed);
        // F: 7 calls, 4 failures ≥ 0.5 → open.
        let t = b.record_failure(t0).unwrap();
        assert_eq!(t.to, BreakerState::Open);
    }

    #[test]
    fn half_open_admits_probes_then_closes() {
        let t0 = Instant::now();
        let mut b = CircuitBreaker::new(cfg());
        for _ in 0..3 {
            b.record_failure(t0);
        }
        let t1 = t0 + Duration::from_millis(999);
        assert!(!b.admit(t1).0.is_allowed());
        let t2 = t0 + Duration::from_millis(1000);
        assert_eq!(b.state(t2), BreakerState::HalfOpen);
        let (a, tr) = b.admit(t2);
        assert_eq!(a, Admission::Probe);
        assert_eq!(tr.unwrap().to, BreakerState::HalfOpen);
        assert_eq!(b.admit(t2).0, Admission::Probe);
        assert_eq!(
            b.admit(t2).0,
            Admission::Rejected {
                retry_after: Duration::ZERO
            }
        );
        assert_eq!(b.record_success(t2), None);
        assert_eq!(b.record_success(t2).unwrap().to, BreakerState::Closed);
        assert_eq!(b.admit(t2).0, Admission::Allowed);
    }

    #[test]
    fn a_failed_probe_opens_again() {
        let t0 = Instant::now();
        let mut b = CircuitBreaker::new(cfg());
        for _ in 0..3 {
            b.record_failure(t0);
        }
        let t2 = t0 + Duration::from_millis(1500);
        assert_eq!(b.admit(t2).0, Admission::Probe);
        let t = b.record_failure(t2).unwrap();
        assert_eq!((t.from, t.to), (BreakerState::HalfOpen, BreakerState::Open));
        assert_eq!(b.state(t2 + Duration::from_millis(999)), BreakerState::Open);
        assert_eq!(b.state(t2 + Duration::from_millis(1000)), BreakerState::HalfOpen);
    }

    #[test]
    fn validation_names_the_key() {
        let bad = [
            (
                BreakerConfig {
                    failure_rate: 0.0,
                    ..cfg()
                },
                "breaker.failure_rate",
            ),
            (
                BreakerConfig {
                    failure_rate: f64::NAN,
                    ..cfg()
                },
                "breaker.failure_rate",
            ),
            (BreakerConfig { min_calls: 11, ..cfg() }, "breaker.min_calls"),
            (BreakerConfig { window: 0, ..cfg() }, "breaker.window"),
            (
                BreakerConfig {
                    half_open_probes: 0,
                    ..cfg()
                },
                "breaker.half_open_probes",
            ),
            (
                BreakerConfig {
                    consecutive_failures: 0,
                    ..cfg()
                },
                "breaker.consecutive_failures",
            ),
        ];
        for (c, key) in bad {
            assert_eq!(c.validate().unwrap_err().key(), Some(key));
        }
        assert!(BreakerConfig::default().validate().is_ok());
    }
}
