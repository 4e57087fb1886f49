//! Tests of the retry policy, backoff and budget.
use std::time::{Duration, Instant};

use super::backoff::*;
use super::budget::*;
use super::config::*;
use super::policy::*;
use crate::error::GpuError;
use crate::error::{Api, hip};
use crate::op::OpKind;
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

#[test]
fn a_task_gets_as_many_retries_as_its_ops_would_have_together() {
    let mut config = RetryConfig::default();
    config.per_op.insert(
        OpKind::Launch,
        crate::retry::RetryOverride {
            max_retries: Some(0),
            ..Default::default()
        },
    );
    let policy = RetryPolicy::new(config.clone()).unwrap();
    let ops = [
        OpKind::Alloc,
        OpKind::CopyToDevice,
        OpKind::Launch,
        OpKind::CopyFromDevice,
    ];
    assert_eq!(policy.task_backoff(ops).max_retries(), 3 + 3 + 3);
    assert_eq!(policy.task_backoff([OpKind::Launch]).max_retries(), 0);
    // `[retry.per_op.task] max_retries` is the operator's word, whatever the task holds.
    config.per_op.insert(
        OpKind::Task,
        crate::retry::RetryOverride {
            max_retries: Some(1),
            ..Default::default()
        },
    );
    let policy = RetryPolicy::new(config).unwrap();
    assert_eq!(policy.task_backoff(ops).max_retries(), 1);
}
