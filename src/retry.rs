//! Retry policy: exponential backoff with jitter, per-operation overrides, a retry budget,
//! and a synchronous retry helper.
//!
//! [`RetryConfig`] keeps the API of the design this project grew from
//! (`RetryConfig::new().with_max_retries(5).with_initial_delay_ms(100)`, defaults 3 retries,
//! 10 ms, ×2.0, 1000 ms cap, jitter on) and is also the `[retry]` section of the config.
//! [`RetryPolicy`] is its validated form; it answers "how many retries for this op kind?" and
//! makes a fresh [`Backoff`] per request, which answers "how long before the next attempt?".
//! The random source is a parameter, so tests are deterministic.
//!
//! Backoff of retry `n` (1-based) before jitter: `min(max_delay, initial_delay × multiplier^(n-1))`.
//! Jitter strategies (after the AWS architecture blog's "Exponential Backoff And Jitter"):
//! - `none`: exactly the base delay;
//! - `full` (default): uniform in `[0, base)`;
//! - `equal`: `base/2 + uniform[0, base/2)`;
//! - `decorrelated`: uniform in `[initial, previous × multiplier)`, capped at `max_delay`.

use rand::Rng;
use serde::{Deserialize, Deserializer, Serialize};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::config::error::ConfigError;
use crate::error::GpuError;
use crate::op::OpKind;

/// How randomness is mixed into backoff delays.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Jitter {
    /// No jitter: the exact exponential delay.
    None,
    /// Uniform in `[0, base)` (the default; spreads retries the most).
    #[default]
    Full,
    /// `base/2 + uniform[0, base/2)`: never less than half the base delay.
    Equal,
    /// Uniform in `[initial, previous × multiplier)`, capped.
    Decorrelated,
}

impl From<bool> for Jitter {
    /// `true` is [`Jitter::Full`] and `false` [`Jitter::None`], as in the original
    /// `jitter: bool`.
    fn from(on: bool) -> Jitter {
        if on { Jitter::Full } else { Jitter::None }
    }
}

impl<'de> Deserialize<'de> for Jitter {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Jitter, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Repr {
            Bool(bool),
            Name(String),
        }
        match Repr::deserialize(d)? {
            Repr::Bool(b) => Ok(b.into()),
            Repr::Name(s) => match s.as_str() {
                "none" | "false" => Ok(Jitter::None),
                "full" | "true" => Ok(Jitter::Full),
                "equal" => Ok(Jitter::Equal),
                "decorrelated" => Ok(Jitter::Decorrelated),
                other => Err(serde::de::Error::custom(format!(
                    "unknown jitter `{other}`, expected one of \"full\", \"none\", \"equal\", \"decorrelated\" (or true/false)"
                ))),
            },
        }
    }
}

/// Retry settings: the `[retry]` section of the config, and the original builder API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// Retries after the first attempt (so at most `max_retries + 1` attempts). Default 3.
    pub max_retries: u32,
    /// Delay before the first retry, in milliseconds. Default 10.
    pub initial_delay_ms: u64,
    /// Growth of the delay per retry (≥ 1). Default 2.0.
    pub backoff_multiplier: f64,
    /// Cap on any one delay, in milliseconds (≥ `initial_delay_ms`). Default 1000.
    pub max_delay_ms: u64,
    /// Jitter strategy. Default `full` (`true`/`false` are accepted as full/none).
    pub jitter: Jitter,
    /// Per-operation overrides: `[retry.per_op.launch] max_retries = 0`.
    pub per_op: BTreeMap<OpKind, RetryOverride>,
    /// The retry budget shared by all operations of a device.
    pub budget: RetryBudgetConfig,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            max_retries: 3,
            initial_delay_ms: 10,
            backoff_multiplier: 2.0,
            max_delay_ms: 1000,
            jitter: Jitter::Full,
            per_op: BTreeMap::new(),
            budget: RetryBudgetConfig::default(),
        }
    }
}

/// A partial retry policy for one operation kind; unset fields come from `[retry]`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryOverride {
    /// Overrides [`RetryConfig::max_retries`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_retries: Option<u32>,
    /// Overrides [`RetryConfig::initial_delay_ms`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub initial_delay_ms: Option<u64>,
    /// Overrides [`RetryConfig::backoff_multiplier`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backoff_multiplier: Option<f64>,
    /// Overrides [`RetryConfig::max_delay_ms`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_delay_ms: Option<u64>,
    /// Overrides [`RetryConfig::jitter`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jitter: Option<Jitter>,
}

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

impl RetryConfig {
    /// The defaults: 3 retries, 10 ms, ×2.0, 1000 ms cap, full jitter.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the number of retries after the first attempt.
    pub fn with_max_retries(mut self, n: u32) -> Self {
        self.max_retries = n;
        self
    }

    /// Sets the delay before the first retry.
    pub fn with_initial_delay_ms(mut self, ms: u64) -> Self {
        self.initial_delay_ms = ms;
        self
    }

    /// Sets the growth of the delay per retry.
    pub fn with_backoff_multiplier(mut self, m: f64) -> Self {
        self.backoff_multiplier = m;
        self
    }

    /// Sets the cap on any one delay.
    pub fn with_max_delay_ms(mut self, ms: u64) -> Self {
        self.max_delay_ms = ms;
        self
    }

    /// Sets the jitter: a [`Jitter`] or, as in the original API, a `bool`.
    pub fn with_jitter(mut self, jitter: impl Into<Jitter>) -> Self {
        self.jitter = jitter.into();
        self
    }

    /// Sets an override for one operation kind.
    pub fn with_op_override(mut self, op: OpKind, o: RetryOverride) -> Self {
        self.per_op.insert(op, o);
        self
    }

    /// Sets the retry budget.
    pub fn with_budget(mut self, budget: RetryBudgetConfig) -> Self {
        self.budget = budget;
        self
    }

    /// The delay before retry `retry` (1-based) without jitter:
    /// `min(max_delay, initial × multiplier^(retry-1))`. Retry 0 has no delay.
    pub fn base_delay(&self, retry: u32) -> Duration {
        BackoffParams::from_config(self)
            .base_ms(retry)
            .map_or(Duration::ZERO, ms)
    }

    /// Checks every value, naming the first bad key (`retry.backoff_multiplier`,
    /// `retry.per_op.launch.max_delay_ms`, `retry.budget.ratio`).
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the key and the reason.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_params("retry", &BackoffParams::from_config(self))?;
        for (op, o) in &self.per_op {
            let prefix = format!("retry.per_op.{op}");
            if let Some(m) = o.backoff_multiplier {
                check_multiplier(&prefix, m)?;
            }
            check_params(&prefix, &BackoffParams::from_config(self).with_override(o))?;
        }
        let b = &self.budget;
        if !b.ratio.is_finite() || b.ratio < 0.0 || b.ratio > 1000.0 {
            return Err(ConfigError::invalid(
                "retry.budget.ratio",
                format!("must be a number from 0 to 1000, got {}", b.ratio),
            ));
        }
        if b.ttl_ms < 1000 {
            return Err(ConfigError::invalid(
                "retry.budget.ttl_ms",
                format!("must be at least 1000 ms, got {}", b.ttl_ms),
            ));
        }
        Ok(())
    }
}

fn check_multiplier(prefix: &str, m: f64) -> Result<(), ConfigError> {
    if !m.is_finite() || m < 1.0 {
        return Err(ConfigError::invalid(
            format!("{prefix}.backoff_multiplier"),
            format!("must be a finite number ≥ 1.0, got {m}"),
        ));
    }
    Ok(())
}

fn check_params(prefix: &str, p: &BackoffParams) -> Result<(), ConfigError> {
    check_multiplier(prefix, p.multiplier)?;
    if p.max_delay_ms < p.initial_delay_ms {
        return Err(ConfigError::invalid(
            format!("{prefix}.max_delay_ms"),
            format!(
                "the cap ({} ms) must not be below initial_delay_ms ({} ms)",
                p.max_delay_ms, p.initial_delay_ms
            ),
        ));
    }
    Ok(())
}

fn ms(v: f64) -> Duration {
    Duration::from_secs_f64(v / 1000.0)
}

/// The resolved backoff settings of one operation kind.
#[derive(Debug, Clone, Copy, PartialEq)]
struct BackoffParams {
    max_retries: u32,
    initial_delay_ms: u64,
    multiplier: f64,
    max_delay_ms: u64,
    jitter: Jitter,
}

impl BackoffParams {
    fn from_config(c: &RetryConfig) -> Self {
        BackoffParams {
            max_retries: c.max_retries,
            initial_delay_ms: c.initial_delay_ms,
            multiplier: c.backoff_multiplier,
            max_delay_ms: c.max_delay_ms,
            jitter: c.jitter,
        }
    }

    fn with_override(mut self, o: &RetryOverride) -> Self {
        self.max_retries = o.max_retries.unwrap_or(self.max_retries);
        self.initial_delay_ms = o.initial_delay_ms.unwrap_or(self.initial_delay_ms);
        self.multiplier = o.backoff_multiplier.unwrap_or(self.multiplier);
        self.max_delay_ms = o.max_delay_ms.unwrap_or(self.max_delay_ms);
        self.jitter = o.jitter.unwrap_or(self.jitter);
        self
    }

    /// Base delay of retry `n` (1-based) in milliseconds, `None` for retry 0.
    fn base_ms(&self, n: u32) -> Option<f64> {
        if n == 0 {
            return None;
        }
        let cap = self.max_delay_ms as f64;
        let exp = i32::try_from(n - 1).unwrap_or(i32::MAX);
        let raw = self.initial_delay_ms as f64 * self.multiplier.powi(exp);
        Some(if raw.is_finite() { raw.min(cap) } else { cap })
    }
}

/// The validated retry policy: per-operation limits and backoff makers.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    config: RetryConfig,
    params: [BackoffParams; OpKind::ALL.len()],
}

impl RetryPolicy {
    /// Validates `config` and resolves its per-operation overrides.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the bad key.
    pub fn new(config: RetryConfig) -> Result<RetryPolicy, ConfigError> {
        config.validate()?;
        let base = BackoffParams::from_config(&config);
        let params = OpKind::ALL.map(|op| match config.per_op.get(&op) {
            Some(o) => base.with_override(o),
            None => base,
        });
        Ok(RetryPolicy { config, params })
    }

    /// The configuration the policy was made from.
    pub fn config(&self) -> &RetryConfig {
        &self.config
    }

    fn params(&self, op: OpKind) -> &BackoffParams {
        &self.params[op as usize]
    }

    /// Retries allowed after the first attempt of an `op` operation.
    pub fn max_retries(&self, op: OpKind) -> u32 {
        self.params(op).max_retries
    }

    /// A fresh backoff for one request of kind `op`.
    pub fn backoff(&self, op: OpKind) -> Backoff {
        let p = *self.params(op);
        Backoff {
            params: p,
            retries: 0,
            previous_ms: p.initial_delay_ms as f64,
        }
    }
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy::new(RetryConfig::default()).expect("the default retry config is valid")
    }
}

/// The backoff state of one request: how many retries it has had and the last delay.
#[derive(Debug, Clone)]
pub struct Backoff {
    params: BackoffParams,
    retries: u32,
    previous_ms: f64,
}

impl Backoff {
    /// Retries taken so far.
    pub fn retries(&self) -> u32 {
        self.retries
    }

    /// Retries allowed in all.
    pub fn max_retries(&self) -> u32 {
        self.params.max_retries
    }

    /// The delay before the next retry, or `None` when the retries are used up. Draws from
    /// `rng` for jitter (nothing is drawn with `Jitter::None`).
    pub fn next_delay<R: Rng + ?Sized>(&mut self, rng: &mut R) -> Option<Duration> {
        if self.retries >= self.params.max_retries {
            return None;
        }
        self.retries += 1;
        let base = self.params.base_ms(self.retries)?;
        let cap = self.params.max_delay_ms as f64;
        let delay = match self.params.jitter {
            Jitter::None => base,
            Jitter::Full => rng.random::<f64>() * base,
            Jitter::Equal => base / 2.0 + rng.random::<f64>() * base / 2.0,
            Jitter::Decorrelated => {
                let lo = self.params.initial_delay_ms as f64;
                let hi = (self.previous_ms * self.params.multiplier).max(lo);
                (lo + rng.random::<f64>() * (hi - lo)).min(cap)
            }
        };
        self.previous_ms = delay;
        Some(ms(delay))
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

/// A value obtained by [`retry_operation`], with the attempts it took (1 = first try).
#[derive(Debug, Clone, PartialEq)]
pub struct Retried<T> {
    /// The value.
    pub value: T,
    /// Attempts made, the successful one included.
    pub attempts: u32,
}

/// The failure of [`retry_operation`]: the last error and the attempts made.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{error} (after {attempts} attempt{s}{why})", s = if *attempts == 1 { "" } else { "s" },
    why = if *exhausted { ", retries exhausted" } else { "" })]
pub struct RetryFailure {
    /// The last error.
    pub error: GpuError,
    /// Attempts made.
    pub attempts: u32,
    /// `true` when the error was transient and the retries ran out; `false` when it was
    /// permanent and not retried.
    pub exhausted: bool,
}

/// Runs `operation` until it succeeds, fails with a non-transient error, or the retries of
/// `op`'s policy are used up, sleeping the backoff between attempts on this thread.
/// The closure receives the attempt number (1-based).
///
/// # Errors
/// [`RetryFailure`] with the last error and the number of attempts.
pub fn retry_operation<T>(
    policy: &RetryPolicy,
    op: OpKind,
    operation: impl FnMut(u32) -> Result<T, GpuError>,
) -> Result<Retried<T>, RetryFailure> {
    retry_operation_with(policy, op, &mut rand::rng(), std::thread::sleep, operation)
}

/// [`retry_operation`] with the random source and the sleep passed in (deterministic tests,
/// callers with their own clock).
///
/// # Errors
/// [`RetryFailure`] with the last error and the number of attempts.
pub fn retry_operation_with<T, R: Rng + ?Sized>(
    policy: &RetryPolicy,
    op: OpKind,
    rng: &mut R,
    mut sleep: impl FnMut(Duration),
    mut operation: impl FnMut(u32) -> Result<T, GpuError>,
) -> Result<Retried<T>, RetryFailure> {
    let mut backoff = policy.backoff(op);
    let mut attempts = 0;
    loop {
        attempts += 1;
        match operation(attempts) {
            Ok(value) => return Ok(Retried { value, attempts }),
            Err(error) if !error.is_recoverable() => {
                return Err(RetryFailure {
                    error,
                    attempts,
                    exhausted: false,
                });
            }
            Err(error) => match backoff.next_delay(rng) {
                Some(delay) => sleep(delay),
                None => {
                    return Err(RetryFailure {
                        error,
                        attempts,
                        exhausted: true,
                    });
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::{Api, hip};
    use proptest::prelude::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    fn transient() -> GpuError {
        GpuError::api(Api::Sim, hip::OUT_OF_MEMORY, OpKind::Alloc, 0)
    }

    fn permanent() -> GpuError {
        GpuError::api(Api::Sim, hip::INVALID_VALUE, OpKind::Alloc, 0)
    }

    fn run<T>(
        policy: &RetryPolicy,
        f: impl FnMut(u32) -> Result<T, GpuError>,
    ) -> (Result<Retried<T>, RetryFailure>, Vec<Duration>) {
        let mut sleeps = Vec::new();
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let r = retry_operation_with(policy, OpKind::Alloc, &mut rng, |d| sleeps.push(d), f);
        (r, sleeps)
    }

    #[test]
    fn test_retry_config_default() {
        let c = RetryConfig::default();
        assert_eq!(c.max_retries, 3);
        assert_eq!(c.initial_delay_ms, 10);
        assert_eq!(c.backoff_multiplier, 2.0);
        assert_eq!(c.max_delay_ms, 1000);
        assert_eq!(c.jitter, Jitter::Full);
        assert_eq!(RetryConfig::new(), c);
    }

    #[test]
    fn test_retry_config_builder() {
        let c = RetryConfig::new()
            .with_max_retries(5)
            .with_initial_delay_ms(100)
            .with_backoff_multiplier(3.0)
            .with_max_delay_ms(5000)
            .with_jitter(false);
        assert_eq!((c.max_retries, c.initial_delay_ms, c.max_delay_ms), (5, 100, 5000));
        assert_eq!(c.backoff_multiplier, 3.0);
        assert_eq!(c.jitter, Jitter::None);
        assert_eq!(RetryConfig::new().with_jitter(true).jitter, Jitter::Full);
        assert!(RetryPolicy::new(c).is_ok());
    }

    #[test]
    fn test_retry_config_no_retry() {
        let policy = RetryPolicy::new(RetryConfig::new().with_max_retries(0)).unwrap();
        let (r, sleeps) = run(&policy, |_| Err::<(), _>(transient()));
        let f = r.unwrap_err();
        assert_eq!((f.attempts, f.exhausted), (1, true));
        assert!(sleeps.is_empty());
    }

    #[test]
    fn test_retry_config_delay_calculation() {
        let c = RetryConfig::new();
        let d: Vec<u64> = (0..=8).map(|n| c.base_delay(n).as_millis() as u64).collect();
        assert_eq!(d, vec![0, 10, 20, 40, 80, 160, 320, 640, 1000]);
        assert_eq!(c.base_delay(1000), Duration::from_millis(1000));
        let policy = RetryPolicy::new(c.with_jitter(Jitter::None)).unwrap();
        let mut b = policy.backoff(OpKind::Launch);
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let got: Vec<_> = std::iter::from_fn(|| b.next_delay(&mut rng)).collect();
        assert_eq!(
            got,
            vec![
                Duration::from_millis(10),
                Duration::from_millis(20),
                Duration::from_millis(40)
            ]
        );
    }

    #[test]
    fn test_retry_config_jitter_in_range() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        for jitter in [Jitter::Full, Jitter::Equal] {
            let policy = RetryPolicy::new(RetryConfig::new().with_jitter(jitter).with_max_retries(6)).unwrap();
            let mut distinct = std::collections::HashSet::new();
            for _ in 0..50 {
                let mut b = policy.backoff(OpKind::Alloc);
                for n in 1..=6 {
                    let d = b.next_delay(&mut rng).unwrap();
                    let base = policy.config().base_delay(n);
                    let lo = if jitter == Jitter::Equal {
                        base / 2
                    } else {
                        Duration::ZERO
                    };
                    assert!(
                        d >= lo && d <= base,
                        "{jitter:?} retry {n}: {d:?} not in [{lo:?}, {base:?}]"
                    );
                    distinct.insert(d);
                }
            }
            assert!(distinct.len() > 100, "jitter must vary the delays");
        }
    }

    #[test]
    fn test_retry_operation_success_on_first_try() {
        let (r, sleeps) = run(&RetryPolicy::default(), |_| Ok(42));
        assert_eq!(r.unwrap(), Retried { value: 42, attempts: 1 });
        assert!(sleeps.is_empty());
    }

    #[test]
    fn test_retry_operation_fails_on_permanent_error() {
        let mut calls = 0;
        let (r, sleeps) = run(&RetryPolicy::default(), |_| {
            calls += 1;
            Err::<(), _>(permanent())
        });
        let f = r.unwrap_err();
        assert_eq!((f.attempts, f.exhausted, calls), (1, false, 1));
        assert_eq!(f.error, permanent());
        assert!(sleeps.is_empty());
    }

    #[test]
    fn test_retry_operation_succeeds_after_retry() {
        let (r, sleeps) = run(&RetryPolicy::default(), |attempt| {
            if attempt < 3 { Err(transient()) } else { Ok("ok") }
        });
        assert_eq!(
            r.unwrap(),
            Retried {
                value: "ok",
                attempts: 3
            }
        );
        assert_eq!(sleeps.len(), 2);
    }

    #[test]
    fn test_retry_operation_exhausts_retries() {
        let (r, sleeps) = run(&RetryPolicy::default(), |_| Err::<(), _>(transient()));
        let f = r.unwrap_err();
        assert_eq!((f.attempts, f.exhausted), (4, true));
        assert_eq!(sleeps.len(), 3);
        assert!(f.to_string().contains("after 4 attempts, retries exhausted"), "{f}");
    }

    #[test]
    fn per_op_override_is_partial() {
        let c = RetryConfig::new().with_op_override(
            OpKind::Launch,
            RetryOverride {
                max_retries: Some(0),
                ..Default::default()
            },
        );
        let p = RetryPolicy::new(c).unwrap();
        assert_eq!(p.max_retries(OpKind::Launch), 0);
        assert_eq!(p.max_retries(OpKind::Alloc), 3);
    }

    #[test]
    fn validation_names_the_field() {
        let cases: Vec<(RetryConfig, &str)> = vec![
            (
                RetryConfig::new().with_backoff_multiplier(0.5),
                "retry.backoff_multiplier",
            ),
            (
                RetryConfig::new().with_backoff_multiplier(f64::NAN),
                "retry.backoff_multiplier",
            ),
            (
                RetryConfig::new().with_backoff_multiplier(f64::INFINITY),
                "retry.backoff_multiplier",
            ),
            (RetryConfig::new().with_max_delay_ms(5), "retry.max_delay_ms"),
            (
                RetryConfig::new().with_op_override(
                    OpKind::Memset,
                    RetryOverride {
                        initial_delay_ms: Some(5000),
                        ..Default::default()
                    },
                ),
                "retry.per_op.memset.max_delay_ms",
            ),
            (
                RetryConfig::new().with_op_override(
                    OpKind::Launch,
                    RetryOverride {
                        backoff_multiplier: Some(-1.0),
                        ..Default::default()
                    },
                ),
                "retry.per_op.launch.backoff_multiplier",
            ),
            (
                RetryConfig::new().with_budget(RetryBudgetConfig {
                    ratio: f64::NAN,
                    ..Default::default()
                }),
                "retry.budget.ratio",
            ),
            (
                RetryConfig::new().with_budget(RetryBudgetConfig {
                    ratio: -0.1,
                    ..Default::default()
                }),
                "retry.budget.ratio",
            ),
        ];
        for (c, key) in cases {
            let e = RetryPolicy::new(c).unwrap_err();
            assert_eq!(e.key(), Some(key), "{e}");
        }
    }

    #[test]
    fn budget_caps_retries_and_refills() {
        let t0 = Instant::now();
        let cfg = RetryBudgetConfig {
            ratio: 0.5,
            min_per_sec: 1,
            ttl_ms: 1000,
        };
        let mut b = RetryBudget::new(&cfg, t0);
        for _ in 0..10 {
            b.deposit(t0);
        }
        // reserve 1 + 0.5 × 10 = 6 retries.
        let granted = (0..20).filter(|_| b.try_withdraw(t0)).count();
        assert_eq!(granted, 6);
        // After the window has passed, the old requests and retries no longer count.
        let later = t0 + Duration::from_millis(1500);
        assert_eq!(b.balance(later), 1.0);
        assert!(b.try_withdraw(later));
        assert!(!b.try_withdraw(later));
    }

    proptest! {
        #[test]
        fn backoff_stays_within_bounds(
            initial in 0u64..500, extra in 0u64..5000, mult in 1.0f64..5.0,
            retries in 0u32..20, seed in any::<u64>(), jitter_ix in 0usize..4,
        ) {
            let jitter = [Jitter::None, Jitter::Full, Jitter::Equal, Jitter::Decorrelated][jitter_ix];
            let cfg = RetryConfig::new().with_initial_delay_ms(initial).with_max_delay_ms(initial + extra)
                .with_backoff_multiplier(mult).with_max_retries(retries).with_jitter(jitter);
            let policy = RetryPolicy::new(cfg.clone()).unwrap();
            let mut b = policy.backoff(OpKind::Alloc);
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let mut n = 0;
            while let Some(d) = b.next_delay(&mut rng) {
                n += 1;
                prop_assert!(d <= Duration::from_millis(initial + extra) + Duration::from_nanos(1));
                if jitter == Jitter::None { prop_assert_eq!(d, cfg.base_delay(n)); }
                if jitter == Jitter::Decorrelated {
                    prop_assert!(d + Duration::from_nanos(1) >= Duration::from_millis(initial));
                }
            }
            prop_assert_eq!(n, retries);
        }

        #[test]
        fn base_delay_rises_to_the_cap(initial in 1u64..100, extra in 0u64..10_000, mult in 1.01f64..4.0) {
            let cfg = RetryConfig::new().with_initial_delay_ms(initial).with_max_delay_ms(initial + extra)
                .with_backoff_multiplier(mult);
            let mut prev = Duration::ZERO;
            for n in 1..2000 {
                let d = cfg.base_delay(n);
                prop_assert!(d >= prev);
                prev = d;
            }
            prop_assert_eq!(prev, Duration::from_millis(initial + extra));
        }

        #[test]
        fn same_seed_same_sequence(seed in any::<u64>(), jitter_ix in 0usize..4) {
            let jitter = [Jitter::None, Jitter::Full, Jitter::Equal, Jitter::Decorrelated][jitter_ix];
            let policy = RetryPolicy::new(RetryConfig::new().with_max_retries(8).with_jitter(jitter)).unwrap();
            let seq = |seed| {
                let mut rng = ChaCha8Rng::seed_from_u64(seed);
                let mut b = policy.backoff(OpKind::Launch);
                std::iter::from_fn(move || b.next_delay(&mut rng)).collect::<Vec<_>>()
            };
            prop_assert_eq!(seq(seed), seq(seed));
        }
    }
}
