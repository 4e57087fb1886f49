//! [`RetryPolicy`], the validated form of a [`RetryConfig`]: how many retries an op kind
//! gets and a fresh [`Backoff`] per request; and the synchronous retry helper
//! ([`retry_operation`]).

use rand::Rng;
use std::time::Duration;

use super::backoff::{Backoff, BackoffParams};
use super::config::{RetryConfig, overridden, params_of};
use crate::config::error::ConfigError;
use crate::error::GpuError;
use crate::op::kind::OpKind;

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
        let base = params_of(&config);
        let params = OpKind::ALL.map(|op| match config.per_op.get(&op) {
            Some(o) => overridden(base, o),
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
        Backoff::new(*self.params(op))
    }

    /// A fresh backoff for a task made of ops of these kinds, which a transient failure
    /// reruns whole: the delays of kind `task`, and — unless `[retry.per_op.task]` sets
    /// `max_retries` — as many retries as its ops would have had together (one of ten ops
    /// failing 1% of the time fails a task 10% of the time; a task must not give up sooner
    /// than its ops would).
    pub fn task_backoff(&self, inner: impl IntoIterator<Item = OpKind>) -> Backoff {
        let mut params = *self.params(OpKind::Task);
        let explicit = self.config.per_op.get(&OpKind::Task).and_then(|o| o.max_retries);
        if explicit.is_none() {
            params.max_retries = inner
                .into_iter()
                .map(|k| self.params(k).max_retries)
                .fold(0u32, u32::saturating_add);
        }
        Backoff::new(params)
    }
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy::new(RetryConfig::default()).expect("the default retry config is valid")
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
