//! Quarantine: a kernel that is a suspect in `quarantine_after` sticky faults within
//! `quarantine_window_ms` is quarantined — ops that launch it are refused from then on. The
//! suspects of a fault are the kernels launched since the device's last successful op that
//! waited for it; the clock is passed in.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use crate::config::SupervisorConfig;

/// A kernel: its module's id and its function's name.
pub type Kernel = (u64, String);

/// The sticky faults each kernel of one device was a suspect of, within the window.
#[derive(Debug, Clone, Default)]
pub struct SuspectFaults {
    faults: HashMap<Kernel, VecDeque<Instant>>,
}

impl SuspectFaults {
    /// No fault so far.
    pub fn new() -> SuspectFaults {
        SuspectFaults::default()
    }

    /// Records a sticky fault at `now` with these suspects, and returns those now at or
    /// over the threshold: to be quarantined (again, for a kernel quarantined already —
    /// the caller's set says which are new).
    pub fn record(&mut self, config: &SupervisorConfig, suspects: &[Kernel], now: Instant) -> Vec<Kernel> {
        let window = Duration::from_millis(config.quarantine_window_ms);
        let mut quarantine = Vec::new();
        for key in suspects {
            let faults = self.faults.entry(key.clone()).or_default();
            faults.push_back(now);
            while faults.front().is_some_and(|t| now.duration_since(*t) > window) {
                faults.pop_front();
            }
            if faults.len() as u32 >= config.quarantine_after {
                quarantine.push(key.clone());
            }
        }
        quarantine
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(after: u32) -> SupervisorConfig {
        SupervisorConfig {
            quarantine_after: after,
            quarantine_window_ms: 1_000,
            ..SupervisorConfig::default()
        }
    }

    fn k(m: u64, f: &str) -> Kernel {
        (m, f.to_string())
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_kernel_suspected_twice_within_the_window_is_quarantined() {
        let c = config(2);
        let t0 = Instant::now();
        let mut s = SuspectFaults::new();
        assert!(s.record(&c, &[k(1, "bad"), k(1, "good")], t0).is_empty());
        // Only `bad` is a suspect again.
        assert_eq!(s.record(&c, &[k(1, "bad")], t0 + ms(500)), vec![k(1, "bad")]);
        // `good` was a suspect once: not quarantined.
        assert!(s.record(&c, &[k(2, "other")], t0 + ms(600)).is_empty());
    }

    #[test]
    fn faults_older_than_the_window_are_forgotten() {
        let c = config(2);
        let t0 = Instant::now();
        let mut s = SuspectFaults::new();
        assert!(s.record(&c, &[k(1, "f")], t0).is_empty());
        assert!(
            s.record(&c, &[k(1, "f")], t0 + ms(1_001)).is_empty(),
            "the first left the window"
        );
        assert_eq!(
            s.record(&c, &[k(1, "f")], t0 + ms(2_001)),
            vec![k(1, "f")],
            "exactly at the edge it counts"
        );
    }

    #[test]
    fn the_same_function_name_in_another_module_is_another_kernel() {
        let c = config(2);
        let t0 = Instant::now();
        let mut s = SuspectFaults::new();
        assert!(s.record(&c, &[k(1, "f")], t0).is_empty());
        assert!(s.record(&c, &[k(2, "f")], t0).is_empty());
    }

    #[test]
    fn with_a_threshold_of_one_every_suspect_is_quarantined_at_once() {
        let c = config(1);
        let mut s = SuspectFaults::new();
        let both = [k(1, "a"), k(1, "b")];
        assert_eq!(s.record(&c, &both, Instant::now()), both.to_vec());
    }

    #[test]
    fn a_fault_without_suspects_quarantines_nothing() {
        let mut s = SuspectFaults::new();
        assert!(s.record(&config(1), &[], Instant::now()).is_empty());
    }
}
