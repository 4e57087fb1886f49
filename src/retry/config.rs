//! [`RetryConfig`] and its builder: the API of the design this project grew from, and the
//! `[retry]` section of the configuration, with its validation.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::Duration;

use super::backoff::{BackoffParams, Jitter, ms};
use super::budget::RetryBudgetConfig;
use crate::config::error::ConfigError;
use crate::op::kind::OpKind;

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
    /// How many times a replayable task runs again after its device restarted, its worker
    /// died, its device was lost or failed, or refused it (breaker open) — on the restarted
    /// device or another holding its durable buffers, within its deadline. Default 3.
    pub task_reruns: u32,
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
            task_reruns: 3,
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
        params_of(self).base_ms(retry).map_or(Duration::ZERO, ms)
    }

    /// Checks every value, naming the first bad key (`retry.backoff_multiplier`,
    /// `retry.per_op.launch.max_delay_ms`, `retry.budget.ratio`).
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the key and the reason.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_params("retry", &params_of(self))?;
        for (op, o) in &self.per_op {
            let prefix = format!("retry.per_op.{op}");
            if let Some(m) = o.backoff_multiplier {
                check_multiplier(&prefix, m)?;
            }
            check_params(&prefix, &overridden(params_of(self), o))?;
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

pub(super) fn params_of(c: &RetryConfig) -> BackoffParams {
    BackoffParams {
        max_retries: c.max_retries,
        initial_delay_ms: c.initial_delay_ms,
        multiplier: c.backoff_multiplier,
        max_delay_ms: c.max_delay_ms,
        jitter: c.jitter,
    }
}

pub(super) fn overridden(mut p: BackoffParams, o: &RetryOverride) -> BackoffParams {
    p.max_retries = o.max_retries.unwrap_or(p.max_retries);
    p.initial_delay_ms = o.initial_delay_ms.unwrap_or(p.initial_delay_ms);
    p.multiplier = o.backoff_multiplier.unwrap_or(p.multiplier);
    p.max_delay_ms = o.max_delay_ms.unwrap_or(p.max_delay_ms);
    p.jitter = o.jitter.unwrap_or(p.jitter);
    p
}
