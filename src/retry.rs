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

mod backoff;
mod budget;
mod config;
mod policy;
#[cfg(test)]
mod tests;

pub use backoff::{Backoff, Jitter};
pub use budget::{RetryBudget, RetryBudgetConfig};
pub use config::{RetryConfig, RetryOverride};
pub use policy::{Retried, RetryFailure, RetryPolicy, retry_operation, retry_operation_with};
