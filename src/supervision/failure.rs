//! What happens to a failed op, and to a device whose context could not be opened or whose
//! engine died: by the error's class (never by the op or the message), the device's state
//! and epoch, the isolation, and — for a transient error — the op's backoff, the device's
//! retry budget and the op's deadline. The clock and the random source are passed in.

use std::time::{Duration, Instant};

use rand::Rng;

use crate::backend::Origin;
use crate::config::Isolation;
use crate::error::ErrorClass;
use crate::retry::{Backoff, RetryBudget};
use crate::supervision::state::DeviceState;

/// The facts a failed op is decided on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FailureFacts {
    /// The error's class.
    pub class: ErrorClass,
    /// Whose op it is.
    pub origin: Origin,
    /// The op was answered already (by its deadline, by shutdown).
    pub answered: bool,
    /// The runtime is shutting down.
    pub shutting_down: bool,
    /// The device's state now.
    pub state: DeviceState,
    /// The device epoch the op failed in.
    pub failed_epoch: u64,
    /// The device's epoch now.
    pub current_epoch: u64,
    /// Where device contexts live.
    pub isolation: Isolation,
    /// The op may run on another device (it uses no buffer or module of its device, and
    /// its answer does not describe the device).
    pub movable: bool,
}

impl FailureFacts {
    /// Whether the failure counts against the device's circuit breaker: an application's
    /// op that failed for another reason than its own request.
    pub fn counts_for_breaker(&self) -> bool {
        self.origin == Origin::Application && self.class != ErrorClass::InvalidRequest
    }
}

/// What to do with a failed op.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailedOp {
    /// It was answered already: a late completion, counted and discarded.
    Late,
    /// The runtime is shutting down: answer `ShuttingDown`.
    ShuttingDown,
    /// An invalid request: answer the error at once; no retry, no restart.
    Reject,
    /// A transient error: retry when [`decide_retry`] says, or answer what it says.
    Retry,
    /// A sticky error behind the fault that decided (a later epoch began, or the device has
    /// failed): not a new fault; answer `DeviceFailed` (it may have executed).
    FailedBehind,
    /// The first sticky fault of the device's epoch: count it, quarantine its suspects
    /// ([`crate::supervision::SuspectFaults`]), answer the error, then act on the device.
    Sticky(AfterSticky),
    /// The device is lost.
    Lost {
        /// The device was ready: mark it lost and probe for its return.
        mark_lost: bool,
        /// What becomes of the op.
        route: LostRoute,
    },
}

/// What a sticky fault does to the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterSticky {
    /// Process isolation: the worker is poisoned; restart the device (a new worker, a new
    /// epoch) under the restart intensity.
    RestartDevice,
    /// Thread isolation: the poisoned GPU runtime is the whole process's; every device of
    /// the process is out of service.
    FailEveryDevice,
}

/// What becomes of an op whose device is lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LostRoute {
    /// It may move: queue it again (on a ready device, by routing).
    Move,
    /// Answer `DeviceLost`.
    AnswerLost,
}

/// What to do with a failed op (see [`FailedOp`]).
pub fn decide_failed_op(f: &FailureFacts) -> FailedOp {
    if f.answered {
        return FailedOp::Late;
    }
    if f.shutting_down {
        return FailedOp::ShuttingDown;
    }
    match f.class {
        ErrorClass::InvalidRequest => FailedOp::Reject,
        ErrorClass::Transient => FailedOp::Retry,
        ErrorClass::Sticky => {
            if f.state == DeviceState::Failed || f.failed_epoch < f.current_epoch {
                FailedOp::FailedBehind
            } else {
                FailedOp::Sticky(match f.isolation {
                    Isolation::Thread => AfterSticky::FailEveryDevice,
                    Isolation::Process => AfterSticky::RestartDevice,
                })
            }
        }
        ErrorClass::DeviceLost => FailedOp::Lost {
            mark_lost: f.state == DeviceState::Ready,
            route: if f.origin == Origin::Runtime || !f.movable {
                LostRoute::AnswerLost
            } else {
                LostRoute::Move
            },
        },
    }
}

/// Whether and when a transient failure is retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryDecision {
    /// Resubmit after this delay.
    After(Duration),
    /// The policy's retries are used up: answer `RetriesExhausted`.
    RetriesExhausted,
    /// The device's retry budget has no retry left: answer `RetryBudgetExhausted`.
    BudgetExhausted,
    /// The retry would come after the op's deadline: answer `DeadlineExceeded`.
    DeadlineExceeded,
}

/// Retry a transient failure at `now`? The op's `backoff` gives the next delay (drawing its
/// jitter from `rng`); an application's op also takes a retry from its device's `budget`
/// (`None` for the runtime's own ops), into which the `requests` the device admitted since
/// the budget last saw them are deposited at `now` first — only once the backoff has a retry
/// left, so an op whose retries are used up leaves them for a later look; a retry that would
/// come at or after the op's `deadline` is not made.
pub fn decide_retry<R: Rng + ?Sized>(
    backoff: &mut Backoff,
    budget: Option<(&mut RetryBudget, u64)>,
    now: Instant,
    deadline: Instant,
    rng: &mut R,
) -> RetryDecision {
    let Some(delay) = backoff.next_delay(rng) else {
        return RetryDecision::RetriesExhausted;
    };
    if let Some((budget, requests)) = budget {
        for _ in 0..requests {
            budget.deposit(now);
        }
        if !budget.try_withdraw(now) {
            return RetryDecision::BudgetExhausted;
        }
    }
    if now + delay >= deadline {
        return RetryDecision::DeadlineExceeded;
    }
    RetryDecision::After(delay)
}

/// An allocation that ran out of memory waits, between its retries, until mem-info shows
/// the bytes free: what to do when they are not free yet at `now`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OomWait {
    /// Look again after this delay (the backoff's next step).
    WaitAgain(Duration),
    /// The next look would be past the op's deadline: answer `DeadlineExceeded`.
    DeadlineExceeded,
    /// The backoff has run out: resubmit anyway (a last attempt).
    LastAttempt,
}

/// The next step of an out-of-memory wait at `now` (see [`OomWait`]).
pub fn decide_oom_wait<R: Rng + ?Sized>(
    backoff: Option<&mut Backoff>,
    now: Instant,
    deadline: Instant,
    rng: &mut R,
) -> OomWait {
    match backoff.and_then(|b| b.next_delay(rng)) {
        Some(d) if now + d < deadline => OomWait::WaitAgain(d),
        Some(_) => OomWait::DeadlineExceeded,
        None => OomWait::LastAttempt,
    }
}

/// What a context that could not be opened does to its device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenFailureAction {
    /// Thread isolation, a sticky code: the process's GPU runtime is poisoned; every device
    /// of the process is out of service.
    FailEveryDevice,
    /// Process isolation, a sticky code: the new worker's runtime is poisoned; restart
    /// (under the restart intensity).
    Restart,
    /// The device is lost: mark it so, and try to open it again after the probe interval
    /// (no context, so no probe op can run).
    MarkLostAndRetry,
    /// Anything else (an invalid request, a transient error at open): the device fails.
    FailDevice,
}

/// What a context open that failed with `class` does (see [`OpenFailureAction`]).
pub fn decide_open_failure(class: ErrorClass, isolation: Isolation) -> OpenFailureAction {
    match class {
        ErrorClass::Sticky if isolation == Isolation::Thread => OpenFailureAction::FailEveryDevice,
        ErrorClass::Sticky => OpenFailureAction::Restart,
        ErrorClass::DeviceLost => OpenFailureAction::MarkLostAndRetry,
        _ => OpenFailureAction::FailDevice,
    }
}

/// What an engine's death (a panicking executor or backend, a worker that exited, was
/// killed, aborted, or did not finish its start) does to its device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeathAction {
    /// Nothing: the runtime is shutting down, or the engine was of an earlier epoch (the
    /// device was restarted already).
    Ignore,
    /// Restart the device (under the restart intensity). `gpu_fault`: the death is a sticky
    /// fault of the kernels that may have been running — counted, and its suspects
    /// quarantined as for any sticky fault.
    Restart {
        /// The death was a GPU memory fault of suspected kernels.
        gpu_fault: bool,
    },
}

/// What the death of the engine of `died_epoch` does, the device being at `current_epoch`;
/// `gpu_fault_suspects`: the executor found the death a GPU memory fault
/// ([`crate::supervision::EngineDeath::is_gpu_fault`]) and sent its suspects.
pub fn decide_engine_death(
    shutting_down: bool,
    died_epoch: u64,
    current_epoch: u64,
    gpu_fault_suspects: bool,
) -> DeathAction {
    if shutting_down || died_epoch != current_epoch {
        return DeathAction::Ignore;
    }
    DeathAction::Restart {
        gpu_fault: gpu_fault_suspects,
    }
}

#[cfg(test)]
mod tests {
    //! A matrix of failure kinds against device states, as ractor's supervision tests cross
    //! panics and errors with lifecycle stages. No wall clock: every instant is a base
    //! instant plus a duration.

    use super::*;
    use crate::retry::{RetryBudgetConfig, RetryConfig, RetryPolicy};
    use crate::supervision::death::EngineDeath;
    use crate::supervision::quarantine::SuspectFaults;
    use crate::{OpKind, config::SupervisorConfig};
    use rand::SeedableRng;
    use rand::rngs::SmallRng;

    const CLASSES: [ErrorClass; 4] = [
        ErrorClass::Transient,
        ErrorClass::InvalidRequest,
        ErrorClass::Sticky,
        ErrorClass::DeviceLost,
    ];

    fn facts(class: ErrorClass, state: DeviceState) -> FailureFacts {
        FailureFacts {
            class,
            origin: Origin::Application,
            answered: false,
            shutting_down: false,
            state,
            failed_epoch: 3,
            current_epoch: 3,
            isolation: Isolation::Process,
            movable: false,
        }
    }

    /// What the runtime does, for every class in every device state (process isolation, an
    /// application's op that may not move, failed in the device's current epoch).
    #[test]
    fn every_failure_kind_in_every_device_state() {
        use FailedOp::*;
        let lost = |mark_lost| FailedOp::Lost {
            mark_lost,
            route: LostRoute::AnswerLost,
        };
        let sticky = FailedOp::Sticky(AfterSticky::RestartDevice);
        let expected: [(ErrorClass, [FailedOp; 4]); 4] = [
            // Ready, Restarting, Lost, Failed
            (ErrorClass::Transient, [Retry, Retry, Retry, Retry]),
            (ErrorClass::InvalidRequest, [Reject, Reject, Reject, Reject]),
            (ErrorClass::Sticky, [sticky, sticky, sticky, FailedBehind]),
            (
                ErrorClass::DeviceLost,
                [lost(true), lost(false), lost(false), lost(false)],
            ),
        ];
        for (class, by_state) in expected {
            for (state, want) in DeviceState::ALL.into_iter().zip(by_state) {
                assert_eq!(
                    decide_failed_op(&facts(class, state)),
                    want,
                    "{class:?} on a {state:?} device"
                );
            }
        }
    }

    #[test]
    fn an_answered_op_is_a_late_completion_and_shutdown_answers_the_rest_whatever_the_class() {
        for class in CLASSES {
            for state in DeviceState::ALL {
                let mut f = facts(class, state);
                f.shutting_down = true;
                assert_eq!(decide_failed_op(&f), FailedOp::ShuttingDown, "{class:?} {state:?}");
                f.answered = true;
                assert_eq!(decide_failed_op(&f), FailedOp::Late, "{class:?} {state:?}");
            }
        }
    }

    #[test]
    fn a_sticky_fault_restarts_the_worker_in_process_isolation_and_fails_every_device_in_thread_isolation() {
        let mut f = facts(ErrorClass::Sticky, DeviceState::Ready);
        assert_eq!(decide_failed_op(&f), FailedOp::Sticky(AfterSticky::RestartDevice));
        f.isolation = Isolation::Thread;
        assert_eq!(decide_failed_op(&f), FailedOp::Sticky(AfterSticky::FailEveryDevice));
    }

    #[test]
    fn a_sticky_error_of_an_earlier_epoch_is_behind_the_fault_that_decided() {
        let mut f = facts(ErrorClass::Sticky, DeviceState::Restarting);
        f.failed_epoch = 2;
        assert_eq!(decide_failed_op(&f), FailedOp::FailedBehind);
        f.state = DeviceState::Ready;
        assert_eq!(decide_failed_op(&f), FailedOp::FailedBehind);
    }

    #[test]
    fn on_a_lost_device_an_op_that_may_move_moves_and_the_runtimes_own_ops_never_do() {
        let mut f = facts(ErrorClass::DeviceLost, DeviceState::Ready);
        f.movable = true;
        assert_eq!(
            decide_failed_op(&f),
            FailedOp::Lost {
                mark_lost: true,
                route: LostRoute::Move
            }
        );
        f.origin = Origin::Runtime;
        assert_eq!(
            decide_failed_op(&f),
            FailedOp::Lost {
                mark_lost: true,
                route: LostRoute::AnswerLost
            }
        );
    }

    #[test]
    fn only_an_applications_op_that_failed_for_another_reason_than_its_request_counts_for_the_breaker() {
        for class in CLASSES {
            let f = facts(class, DeviceState::Ready);
            assert_eq!(f.counts_for_breaker(), class != ErrorClass::InvalidRequest, "{class:?}");
            let runtime = FailureFacts {
                origin: Origin::Runtime,
                ..f
            };
            assert!(!runtime.counts_for_breaker());
        }
    }

    fn backoff(max_retries: u32, initial_ms: u64) -> Backoff {
        let config = RetryConfig::new()
            .with_max_retries(max_retries)
            .with_initial_delay_ms(initial_ms)
            .with_backoff_multiplier(2.0)
            .with_max_delay_ms(10_000)
            .with_jitter(crate::retry::Jitter::None);
        RetryPolicy::new(config).expect("valid").backoff(OpKind::Alloc)
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_transient_failure_is_retried_with_backoff_until_the_retries_run_out() {
        let t0 = Instant::now();
        let mut rng = SmallRng::seed_from_u64(7);
        let mut b = backoff(2, 10);
        let deadline = t0 + ms(10_000);
        assert_eq!(
            decide_retry(&mut b, None, t0, deadline, &mut rng),
            RetryDecision::After(ms(10))
        );
        assert_eq!(
            decide_retry(&mut b, None, t0, deadline, &mut rng),
            RetryDecision::After(ms(20))
        );
        assert_eq!(
            decide_retry(&mut b, None, t0, deadline, &mut rng),
            RetryDecision::RetriesExhausted
        );
    }

    #[test]
    fn a_retry_that_would_land_on_or_after_the_deadline_is_not_made() {
        let t0 = Instant::now();
        let mut rng = SmallRng::seed_from_u64(7);
        assert_eq!(
            decide_retry(&mut backoff(3, 100), None, t0, t0 + ms(100), &mut rng),
            RetryDecision::DeadlineExceeded
        );
        assert_eq!(
            decide_retry(&mut backoff(3, 100), None, t0, t0 + ms(101), &mut rng),
            RetryDecision::After(ms(100))
        );
    }

    #[test]
    fn an_empty_retry_budget_stops_an_applications_retries() {
        let t0 = Instant::now();
        let mut rng = SmallRng::seed_from_u64(7);
        let config = RetryBudgetConfig {
            ttl_ms: 1_000,
            min_per_sec: 0,
            ratio: 0.5,
        };
        let mut budget = RetryBudget::new(&config, t0);
        let deadline = t0 + ms(10_000);
        // No request deposited yet: no retry to take.
        assert_eq!(
            decide_retry(&mut backoff(3, 10), Some((&mut budget, 0)), t0, deadline, &mut rng),
            RetryDecision::BudgetExhausted
        );
        // An op whose retries are used up deposits nothing: its two requests stay pending.
        let mut spent = backoff(0, 10);
        assert_eq!(
            decide_retry(&mut spent, Some((&mut budget, 2)), t0, deadline, &mut rng),
            RetryDecision::RetriesExhausted
        );
        // Two requests, deposited by the next retry: one retry (ratio 0.5).
        assert_eq!(
            decide_retry(
                &mut backoff(3, 10),
                Some((&mut budget, 2)),
                t0 + ms(1),
                deadline,
                &mut rng
            ),
            RetryDecision::After(ms(10))
        );
        assert_eq!(
            decide_retry(
                &mut backoff(3, 10),
                Some((&mut budget, 0)),
                t0 + ms(2),
                deadline,
                &mut rng
            ),
            RetryDecision::BudgetExhausted
        );
        // The runtime's own ops do not draw on the budget.
        assert_eq!(
            decide_retry(&mut backoff(3, 10), None, t0 + ms(3), deadline, &mut rng),
            RetryDecision::After(ms(10))
        );
    }

    #[test]
    fn an_out_of_memory_wait_steps_with_the_backoff_until_the_deadline_or_its_end() {
        let t0 = Instant::now();
        let mut rng = SmallRng::seed_from_u64(7);
        let mut b = backoff(2, 10);
        let deadline = t0 + ms(25);
        assert_eq!(
            decide_oom_wait(Some(&mut b), t0, deadline, &mut rng),
            OomWait::WaitAgain(ms(10))
        );
        // 10 ms later the next step (20 ms) would end at 30 ms: past the deadline.
        assert_eq!(
            decide_oom_wait(Some(&mut b), t0 + ms(10), deadline, &mut rng),
            OomWait::DeadlineExceeded
        );
        assert_eq!(
            decide_oom_wait(Some(&mut b), t0 + ms(10), t0 + ms(1_000), &mut rng),
            OomWait::LastAttempt,
            "the backoff has run out"
        );
        assert_eq!(decide_oom_wait(None, t0, deadline, &mut rng), OomWait::LastAttempt);
    }

    #[test]
    fn a_context_that_cannot_be_opened_by_class_and_isolation() {
        use OpenFailureAction::*;
        let expected = [
            (ErrorClass::Transient, [FailDevice, FailDevice]),
            (ErrorClass::InvalidRequest, [FailDevice, FailDevice]),
            (ErrorClass::Sticky, [FailEveryDevice, Restart]),
            (ErrorClass::DeviceLost, [MarkLostAndRetry, MarkLostAndRetry]),
        ];
        for (class, [thread, process]) in expected {
            assert_eq!(decide_open_failure(class, Isolation::Thread), thread, "{class:?}");
            assert_eq!(decide_open_failure(class, Isolation::Process), process, "{class:?}");
        }
    }

    /// Engine deaths: an executor panic or a worker killed (no suspects), a SIGABRT during
    /// a module load, a SIGABRT while kernels ran — in the current epoch, a stale one, and
    /// at shutdown.
    #[test]
    fn every_kind_of_engine_death_by_epoch_and_shutdown() {
        let panic_or_kill = EngineDeath {
            aborted: false,
            loading: false,
        };
        let abort_in_load = EngineDeath {
            aborted: true,
            loading: true,
        };
        let abort_in_kernels = EngineDeath {
            aborted: true,
            loading: false,
        };
        // The executor sends suspects only when the death is a GPU fault; kernels were
        // launched since the last synchronizing op in every case here.
        let cases = [(panic_or_kill, false), (abort_in_load, false), (abort_in_kernels, true)];
        for (death, gpu_fault) in cases {
            let suspects = death.is_gpu_fault(true);
            assert_eq!(suspects, gpu_fault, "{death:?}");
            assert_eq!(
                decide_engine_death(false, 4, 4, suspects),
                DeathAction::Restart { gpu_fault },
                "{death:?}"
            );
            assert_eq!(
                decide_engine_death(false, 3, 4, suspects),
                DeathAction::Ignore,
                "stale epoch"
            );
            assert_eq!(
                decide_engine_death(true, 4, 4, suspects),
                DeathAction::Ignore,
                "shutdown"
            );
        }
    }

    /// A kernel that keeps faulting: its second sticky fault within the window quarantines
    /// it, whether the fault was an error code or a SIGABRT while it ran; a later fault
    /// with it already quarantined names it again (the caller's set keeps it once).
    #[test]
    fn a_kernel_that_keeps_faulting_is_quarantined_after_its_second_fault() {
        let config = SupervisorConfig {
            quarantine_after: 2,
            quarantine_window_ms: 60_000,
            ..SupervisorConfig::default()
        };
        let t0 = Instant::now();
        let kernel = (9, "oob".to_string());
        let mut faults = SuspectFaults::new();
        // A sticky error code on a ready device: a fault of the epoch.
        let f = facts(ErrorClass::Sticky, DeviceState::Ready);
        assert_eq!(decide_failed_op(&f), FailedOp::Sticky(AfterSticky::RestartDevice));
        assert!(faults.record(&config, std::slice::from_ref(&kernel), t0).is_empty());
        // The worker aborted while the kernel ran, after the restart: a GPU fault.
        assert_eq!(
            decide_engine_death(false, 4, 4, true),
            DeathAction::Restart { gpu_fault: true }
        );
        assert_eq!(
            faults.record(&config, std::slice::from_ref(&kernel), t0 + ms(500)),
            vec![kernel.clone()]
        );
        assert_eq!(
            faults.record(&config, std::slice::from_ref(&kernel), t0 + ms(900)),
            vec![kernel]
        );
    }
}
