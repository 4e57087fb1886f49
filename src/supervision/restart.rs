//! Restart intensity: restart a device part, after which backoff, or give up and fail the
//! device. OTP's `add_restart/3`: the restarts inside the window are kept and their count is
//! compared with the intensity; the clock and the random source are passed in.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use rand::Rng;

use crate::config::SupervisorConfig;

/// The restart history of one device.
#[derive(Debug, Clone)]
pub struct RestartIntensity {
    /// The restarts within the window, oldest first.
    restarts: VecDeque<Instant>,
    /// The backoff of the next restart of a burst.
    next_backoff: Duration,
    last_restart: Option<Instant>,
}

/// What to do about a device part that failed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RestartDecision {
    /// Restart it after `delay` (zero for the first restart after a quiet period).
    Restart {
        /// The restart backoff.
        delay: Duration,
    },
    /// The restart intensity is exceeded: fail the device.
    GiveUp {
        /// The restarts within the window, this one included.
        restarts: usize,
    },
}

impl RestartIntensity {
    /// No restart so far.
    pub fn new(config: &SupervisorConfig) -> RestartIntensity {
        RestartIntensity {
            restarts: VecDeque::new(),
            next_backoff: Duration::from_millis(config.restart_backoff_min_ms),
            last_restart: None,
        }
    }

    /// A device part failed at `now`: restart it (and after which backoff), or give up when
    /// `max_restarts` restarts happened within `restart_window_ms` already. A restart is
    /// recorded; giving up records nothing.
    ///
    /// The backoff spaces restarts: the first one after a quiet period
    /// (`restart_backoff_reset_ms` since the last restart) is immediate, the next ones wait
    /// min, 2×min, ... up to max, each ± `restart_backoff_jitter` (one draw from `rng`, only
    /// for a delayed restart).
    pub fn add_restart<R: Rng + ?Sized>(
        &mut self,
        config: &SupervisorConfig,
        now: Instant,
        rng: &mut R,
    ) -> RestartDecision {
        let window = Duration::from_millis(config.restart_window_ms);
        while self.restarts.front().is_some_and(|t| now.duration_since(*t) > window) {
            self.restarts.pop_front();
        }
        if self.restarts.len() as u32 >= config.max_restarts {
            return RestartDecision::GiveUp {
                restarts: self.restarts.len() + 1,
            };
        }
        let quiet = self
            .last_restart
            .is_none_or(|t| now.duration_since(t) > Duration::from_millis(config.restart_backoff_reset_ms));
        let delay = if quiet {
            self.next_backoff = Duration::from_millis(config.restart_backoff_min_ms);
            Duration::ZERO
        } else {
            let base = self.next_backoff;
            let factor = 1.0 + config.restart_backoff_jitter * (2.0 * rng.random::<f64>() - 1.0);
            self.next_backoff = (base * 2).min(Duration::from_millis(config.restart_backoff_max_ms));
            base.mul_f64(factor.max(0.0))
        };
        self.restarts.push_back(now);
        self.last_restart = Some(now);
        RestartDecision::Restart { delay }
    }

    /// The restarts recorded within the window as of the last [`RestartIntensity::add_restart`].
    pub fn recent(&self) -> usize {
        self.restarts.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::SmallRng;

    fn config() -> SupervisorConfig {
        SupervisorConfig {
            max_restarts: 3,
            restart_window_ms: 1_000,
            restart_backoff_min_ms: 50,
            restart_backoff_max_ms: 150,
            restart_backoff_jitter: 0.0,
            restart_backoff_reset_ms: 500,
            ..SupervisorConfig::default()
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_burst_backs_off_doubling_up_to_the_cap_then_gives_up_at_the_intensity() {
        let c = config();
        let t0 = Instant::now();
        let mut rng = SmallRng::seed_from_u64(1);
        let mut r = RestartIntensity::new(&c);
        assert_eq!(
            r.add_restart(&c, t0, &mut rng),
            RestartDecision::Restart { delay: ms(0) }
        );
        assert_eq!(
            r.add_restart(&c, t0 + ms(10), &mut rng),
            RestartDecision::Restart { delay: ms(50) }
        );
        assert_eq!(
            r.add_restart(&c, t0 + ms(20), &mut rng),
            RestartDecision::Restart { delay: ms(100) }
        );
        assert_eq!(r.recent(), 3);
        // The fourth within the window: max_restarts = 3 exceeded.
        assert_eq!(
            r.add_restart(&c, t0 + ms(30), &mut rng),
            RestartDecision::GiveUp { restarts: 4 }
        );
    }

    #[test]
    fn the_backoff_is_capped() {
        let c = SupervisorConfig {
            max_restarts: 10,
            ..config()
        };
        let t0 = Instant::now();
        let mut rng = SmallRng::seed_from_u64(1);
        let mut r = RestartIntensity::new(&c);
        let delays: Vec<_> = (0..5)
            .map(|i| match r.add_restart(&c, t0 + ms(i), &mut rng) {
                RestartDecision::Restart { delay } => delay,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(delays, vec![ms(0), ms(50), ms(100), ms(150), ms(150)]);
    }

    #[test]
    fn restarts_older_than_the_window_do_not_count() {
        let c = config();
        let t0 = Instant::now();
        let mut rng = SmallRng::seed_from_u64(1);
        let mut r = RestartIntensity::new(&c);
        for i in 0..3 {
            assert!(matches!(
                r.add_restart(&c, t0 + ms(i * 100), &mut rng),
                RestartDecision::Restart { .. }
            ));
        }
        // 1001 ms after the first: it has left the window, so this is the third, not fourth.
        assert!(matches!(
            r.add_restart(&c, t0 + ms(1_001), &mut rng),
            RestartDecision::Restart { .. }
        ));
        assert_eq!(r.recent(), 3);
        // Exactly at the window's edge the oldest still counts (older than, not as old as).
        let mut r = RestartIntensity::new(&c);
        for i in 0..3 {
            r.add_restart(&c, t0 + ms(i), &mut rng);
        }
        assert_eq!(
            r.add_restart(&c, t0 + ms(1_000), &mut rng),
            RestartDecision::GiveUp { restarts: 4 }
        );
    }

    #[test]
    fn after_a_quiet_period_the_restart_is_immediate_and_the_backoff_starts_over() {
        let c = SupervisorConfig {
            max_restarts: 10,
            restart_window_ms: 10_000,
            ..config()
        };
        let t0 = Instant::now();
        let mut rng = SmallRng::seed_from_u64(1);
        let mut r = RestartIntensity::new(&c);
        r.add_restart(&c, t0, &mut rng);
        r.add_restart(&c, t0 + ms(1), &mut rng);
        r.add_restart(&c, t0 + ms(2), &mut rng);
        // 501 ms after the last: quiet.
        assert_eq!(
            r.add_restart(&c, t0 + ms(503), &mut rng),
            RestartDecision::Restart { delay: ms(0) }
        );
        assert_eq!(
            r.add_restart(&c, t0 + ms(504), &mut rng),
            RestartDecision::Restart { delay: ms(50) }
        );
    }

    #[test]
    fn the_jitter_stays_within_its_factor_and_uses_the_random_source() {
        let c = SupervisorConfig {
            max_restarts: 100,
            restart_backoff_jitter: 0.2,
            restart_backoff_max_ms: 50,
            ..config()
        };
        let t0 = Instant::now();
        let mut seen = std::collections::BTreeSet::new();
        for seed in 0..20 {
            let mut rng = SmallRng::seed_from_u64(seed);
            let mut r = RestartIntensity::new(&c);
            r.add_restart(&c, t0, &mut rng);
            match r.add_restart(&c, t0 + ms(1), &mut rng) {
                RestartDecision::Restart { delay } => {
                    assert!(delay >= ms(40) && delay <= ms(60), "{delay:?}");
                    seen.insert(delay);
                }
                other => panic!("{other:?}"),
            }
        }
        assert!(seen.len() > 1, "the delay depends on the draw");
    }

    #[test]
    fn no_restart_allowed_gives_up_at_once() {
        let c = SupervisorConfig {
            max_restarts: 0,
            ..config()
        };
        let mut rng = SmallRng::seed_from_u64(1);
        let mut r = RestartIntensity::new(&c);
        assert_eq!(
            r.add_restart(&c, Instant::now(), &mut rng),
            RestartDecision::GiveUp { restarts: 1 }
        );
    }
}
