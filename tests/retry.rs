//! End-to-end: retries, exhaustion, invalid requests, per-op overrides, OOM gating, the retry
//! budget and the circuit breaker, on simulated devices.

mod common;

use std::time::Duration;

use common::{answered, config, eventually, failing, fault, start};
use hipvisor::core::BreakerState;
use hipvisor::core::retry::{RetryBudgetConfig, RetryOverride};
use hipvisor::{ErrorClass, InvalidReason, OpKind, RuntimeError};

const T: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_faults_are_retried_then_succeed_with_exact_attempt_counts() {
    let mut c = config(2);
    // The first two memsets of device 0 fail with hipErrorNotReady.
    for nth in [1, 2] {
        c.sim.faults.push(fault(|f| {
            f.op = "memset".into();
            f.device = Some(0);
            f.nth = Some(nth);
            f.code = Some(600);
        }));
    }
    let rt = start(c).await;
    let gpu = rt.device(0).unwrap();
    let b = gpu.alloc(64).await.unwrap();
    answered(T, gpu.memset(b, 0, 64, 7)).await.unwrap();
    let data = gpu.copy_from_device(b, 0, 64).await.unwrap();
    assert_eq!(data.as_bytes(), &[7; 64]);
    let s = rt.shutdown().await;
    assert_eq!(s.retries.attempts, 2);
    assert_eq!(s.retries.succeeded, 1);
    assert_eq!(s.retries.exhausted, 0);
    assert_eq!(s.retries.success_by_attempt.get(&3), Some(&1), "{:?}", s.retries);
    assert_eq!(
        s.retries.success_by_attempt.get(&1),
        Some(&2),
        "alloc and copy succeeded first time"
    );
    assert_eq!((s.ops_total, s.ops_succeeded), (3, 3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exhaustion_gives_retries_exhausted_with_the_attempt_count() {
    let mut c = config(1);
    c.retry.max_retries = 2;
    c.sim.faults.push(failing("memset", 600));
    let rt = start(c).await;
    let gpu = rt.device(0).unwrap();
    let b = gpu.alloc(8).await.unwrap();
    match answered(T, gpu.memset(b, 0, 8, 1)).await {
        Err(RuntimeError::RetriesExhausted { attempts, last_error }) => {
            assert_eq!(attempts, 3);
            assert_eq!(last_error.code().unwrap().1, 600);
            assert_eq!(last_error.op(), OpKind::Memset);
        }
        other => panic!("expected RetriesExhausted, got {other:?}"),
    }
    let s = rt.shutdown().await;
    assert_eq!((s.retries.attempts, s.retries.exhausted), (2, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_requests_are_never_retried() {
    let mut c = config(1);
    c.sim.faults.push(fault(|f| {
        f.op = "memset".into();
        f.nth = Some(1);
        f.code = Some(1);
    }));
    let rt = start(c).await;
    let gpu = rt.device(0).unwrap();
    let b = gpu.alloc(8).await.unwrap();
    match gpu.memset(b, 0, 8, 1).await {
        Err(RuntimeError::Gpu(e)) => assert_eq!((e.class(), e.code().unwrap().1), (ErrorClass::InvalidRequest, 1)),
        other => panic!("expected an invalid request, got {other:?}"),
    }
    // The runtime's own checks: out of bounds, unknown kernel, a device out of range.
    match gpu.copy_from_device(b, 4, 8).await {
        Err(RuntimeError::Gpu(e)) => assert!(matches!(
            e,
            hipvisor::GpuError::Invalid {
                reason: InvalidReason::OutOfBounds { .. },
                ..
            }
        )),
        other => panic!("expected out of bounds, got {other:?}"),
    }
    assert!(matches!(
        rt.device(5),
        Err(RuntimeError::NoSuchDevice { device: 5, count: 1 })
    ));
    // Nothing else broke.
    gpu.memset(b, 0, 8, 2).await.unwrap();
    let s = rt.shutdown().await;
    assert_eq!(s.retries.attempts, 0);
    assert_eq!(
        s.ops_by_outcome.get(&hipvisor::metrics::Outcome::InvalidRequest),
        Some(&2)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_op_override_is_honoured() {
    let mut c = config(1);
    c.retry.max_retries = 3;
    c.retry.per_op.insert(
        OpKind::Memset,
        RetryOverride {
            max_retries: Some(0),
            ..Default::default()
        },
    );
    for op in ["memset", "copy_to_device"] {
        c.sim.faults.push(failing(op, 600));
    }
    let rt = start(c).await;
    let gpu = rt.device(0).unwrap();
    let b = gpu.alloc(8).await.unwrap();
    assert!(matches!(
        gpu.memset(b, 0, 8, 1).await,
        Err(RuntimeError::RetriesExhausted { attempts: 1, .. })
    ));
    assert!(matches!(
        gpu.copy_to_device(b, 0, vec![1u8; 8]).await,
        Err(RuntimeError::RetriesExhausted { attempts: 4, .. })
    ));
    let s = rt.shutdown().await;
    assert_eq!(s.retries.attempts, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_out_of_memory_alloc_waits_for_free_memory() {
    let mut c = config(1);
    c.sim.memory_bytes = 1000;
    // Retries enough that the op's deadline (10 s), not the backoff, ends a wait that the
    // test below is too slow to end.
    c.retry.max_retries = 2_000;
    c.retry.initial_delay_ms = 5;
    c.retry.max_delay_ms = 5;
    let rt = start(c).await;
    let gpu = rt.device(0).unwrap();
    let a = gpu.alloc(600).await.unwrap();
    let waiting = tokio::spawn({
        let gpu = gpu.clone();
        async move { gpu.alloc(600).await }
    });
    // The second alloc is held back (mem-info shows too little free) rather than re-executed.
    eventually(T, "the alloc waits for memory", || async {
        rt.snapshot().await.unwrap().retries.oom_waits >= 3
    })
    .await;
    assert!(!waiting.is_finished());
    gpu.free(a).await.unwrap();
    let b = answered(T, waiting).await.unwrap().unwrap();
    assert_eq!(b.len, 600);
    let s = rt.shutdown().await;
    assert_eq!(s.retries.attempts, 1, "one re-execution, once memory was free");
    assert_eq!(s.retries.success_by_attempt.get(&2), Some(&1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_alloc_waiting_for_memory_on_a_device_that_never_answers_is_answered_by_its_deadline() {
    let deadline_ms = 2_000;
    let mut c = config(1);
    c.runtime.op_deadline_ms = deadline_ms;
    c.retry.max_retries = 1_000;
    c.retry.initial_delay_ms = 20;
    c.retry.max_delay_ms = 20;
    // The executor hangs (thread isolation cannot interrupt it): the mem-info the waiting
    // alloc asks for is never answered by the device.
    c.sim.faults.push(fault(|f| {
        f.op = "memset".into();
        f.nth = Some(1);
        // Far past the deadline: an answer that waits for the device comes much later than
        // the bound below.
        f.hang_ms = Some(30_000);
    }));
    let rt = start(c).await;
    let gpu = rt.device(0).unwrap();
    let a = gpu.alloc(600 << 10).await.unwrap();
    let submitted = std::time::Instant::now();
    let waiting = tokio::spawn({
        let gpu = gpu.clone();
        async move { gpu.alloc(600 << 10).await }
    });
    // A good part of its deadline spent waiting for memory, then the device stops answering.
    eventually(T, "the alloc waits for memory", || async {
        rt.snapshot().await.unwrap().retries.oom_waits >= 25
    })
    .await;
    let hung = tokio::spawn({
        let gpu = gpu.clone();
        async move { gpu.memset(a, 0, 8, 1).await }
    });
    let result = answered(T, waiting).await.unwrap();
    let took = submitted.elapsed();
    assert!(
        matches!(
            result,
            Err(RuntimeError::DeadlineExceeded {
                may_have_executed: false,
                ..
            })
        ),
        "{result:?}"
    );
    // The deadline, the watchdog's ticks, and seconds of margin for a loaded machine — far
    // less than the hang.
    assert!(
        took <= Duration::from_millis(deadline_ms + 5_000),
        "answered {took:?} after it was submitted, past its deadline"
    );
    assert!(matches!(
        answered(T, hung).await.unwrap(),
        Err(RuntimeError::DeadlineExceeded { .. })
    ));
    let s = rt.shutdown().await;
    assert_eq!(s.ops_total, s.ops_succeeded + s.ops_failed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_alloc_that_can_never_fit_is_invalid_not_retried() {
    let rt = start(config(1)).await;
    let gpu = rt.device(0).unwrap();
    match gpu.alloc(2 << 20).await {
        Err(RuntimeError::Gpu(e)) => assert_eq!(e.class(), ErrorClass::InvalidRequest),
        other => panic!("expected an invalid request, got {other:?}"),
    }
    assert_eq!(rt.shutdown().await.retries.attempts, 0);
}

/// A device whose memsets always fail with a transient code, under a retry budget of
/// `ratio` retries per request (no floor), a policy of 5 retries, and a buffer to memset.
async fn under_budget(ratio: f64, ttl_ms: u64) -> (hipvisor::Runtime, hipvisor::DeviceHandle, hipvisor::BufferHandle) {
    let mut c = config(1);
    c.retry.max_retries = 5;
    c.retry.budget = RetryBudgetConfig {
        ratio,
        min_per_sec: 0,
        ttl_ms,
    };
    c.sim.faults.push(failing("memset", 600));
    let rt = start(c).await;
    let gpu = rt.device(0).unwrap();
    let b = gpu.alloc(8).await.unwrap();
    (rt, gpu, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_retry_budget_stops_a_retry_storm() {
    // One retry per request in the window.
    let (rt, gpu, b) = under_budget(1.0, 60_000).await;
    // Requests so far: the alloc and this memset = 2 retries in the budget.
    assert!(matches!(
        answered(T, gpu.memset(b, 0, 8, 1)).await,
        Err(RuntimeError::RetryBudgetExhausted { attempts: 3, .. })
    ));
    // One more request, one more retry: not the five the policy would allow.
    assert!(matches!(
        answered(T, gpu.memset(b, 0, 8, 1)).await,
        Err(RuntimeError::RetryBudgetExhausted { attempts: 2, .. })
    ));
    let s = rt.shutdown().await;
    assert_eq!((s.retries.attempts, s.retries.exhausted), (3, 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_budget_answers_retry_budget_exhausted() {
    let (rt, gpu, b) = under_budget(0.0, 1000).await;
    assert!(matches!(
        gpu.memset(b, 0, 8, 1).await,
        Err(RuntimeError::RetryBudgetExhausted {
            device: 0,
            attempts: 1,
            ..
        })
    ));
    let s = rt.shutdown().await;
    assert_eq!((s.retries.attempts, s.retries.exhausted), (0, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_breaker_opens_admits_a_probe_and_closes() {
    let mut c = config(1);
    c.retry.max_retries = 0;
    c.breaker.enabled = true;
    c.breaker.consecutive_failures = 3;
    // Open long enough that the checks below run while it is open, even on a loaded machine.
    c.breaker.open_ms = 1_000;
    c.breaker.half_open_probes = 1;
    // The first four memsets that reach the device fail, then they work: three open the
    // breaker, the fourth is the first half-open probe (it fails: the breaker opens again),
    // the fifth is the probe that closes it. Counted by the simulator, not by the clock.
    for nth in 1..=4 {
        c.sim.faults.push(fault(|f| {
            f.op = "memset".into();
            f.nth = Some(nth);
            f.code = Some(600);
        }));
    }
    let rt = start(c).await;
    let gpu = rt.device(0).unwrap();
    let b = gpu.alloc(8).await.unwrap();
    for _ in 0..3 {
        assert!(matches!(
            gpu.memset(b, 0, 8, 1).await,
            Err(RuntimeError::RetriesExhausted { .. })
        ));
    }
    assert!(matches!(
        gpu.memset(b, 0, 8, 1).await,
        Err(RuntimeError::CircuitOpen { device: 0, .. })
    ));
    assert_eq!(rt.snapshot().await.unwrap().devices[0].breaker, BreakerState::Open);
    // Keep trying: the first probe fails (the breaker opens again), the next one succeeds and
    // the breaker closes.
    eventually(T, "a probe succeeds", || async { gpu.memset(b, 0, 8, 1).await.is_ok() }).await;
    gpu.memset(b, 0, 8, 1).await.unwrap();
    let s = rt.shutdown().await;
    assert_eq!(s.devices[0].breaker, BreakerState::Closed);
    assert_eq!(s.breaker_transitions, 5, "closed→open→half_open→open→half_open→closed");
}
