//! Backoff: how long before the next attempt ([`Backoff`]), by [`Jitter`] strategy.

use rand::Rng;
use serde::{Deserialize, Deserializer, Serialize};
use std::time::Duration;

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

pub(super) fn ms(v: f64) -> Duration {
    Duration::from_secs_f64(v / 1000.0)
}

/// The resolved backoff settings of one operation kind.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct BackoffParams {
    pub(super) max_retries: u32,
    pub(super) initial_delay_ms: u64,
    pub(super) multiplier: f64,
    pub(super) max_delay_ms: u64,
    pub(super) jitter: Jitter,
}

impl BackoffParams {
    /// Base delay of retry `n` (1-based) in milliseconds, `None` for retry 0.
    pub(super) fn base_ms(&self, n: u32) -> Option<f64> {
        if n == 0 {
            return None;
        }
        let cap = self.max_delay_ms as f64;
        let exp = i32::try_from(n - 1).unwrap_or(i32::MAX);
        let raw = self.initial_delay_ms as f64 * self.multiplier.powi(exp);
        Some(if raw.is_finite() { raw.min(cap) } else { cap })
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
    /// A backoff before its first retry.
    pub(super) fn new(params: BackoffParams) -> Backoff {
        Backoff {
            params,
            retries: 0,
            previous_ms: params.initial_delay_ms as f64,
        }
    }

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
