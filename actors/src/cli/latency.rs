//! Latencies of a run in bounded memory: log-spaced buckets 1 % wide from 1 µs up (a run of
//! any length holds ~2,100 counters, where keeping every latency held 8 bytes per op — a
//! gigabyte per 130 million ops), percentiles within 1 %, the maximum exact.

/// Each bucket's upper bound is this times its lower one.
const RATIO: f64 = 1.01;

/// Buckets up to 1.01^2100 µs (about 20 minutes); longer latencies count in the last.
const BUCKETS: usize = 2100;

/// A latency histogram (see the module docs).
#[derive(Debug, Clone)]
pub(crate) struct Latencies {
    counts: Vec<u64>,
    count: u64,
    max_us: f64,
}

impl Default for Latencies {
    fn default() -> Self {
        Latencies {
            counts: vec![0; BUCKETS],
            count: 0,
            max_us: 0.0,
        }
    }
}

impl Latencies {
    /// One latency, in microseconds.
    pub(crate) fn record(&mut self, us: f64) {
        let i = if us <= 1.0 {
            0
        } else {
            ((us.ln() / RATIO.ln()).ceil() as usize).min(BUCKETS - 1)
        };
        self.counts[i] += 1;
        self.count += 1;
        self.max_us = self.max_us.max(us);
    }

    /// The `q` quantile (0 to 1) in microseconds: the upper bound of its bucket (at most
    /// the maximum); 0 with none recorded.
    pub(crate) fn quantile(&self, q: f64) -> f64 {
        if self.count == 0 {
            return 0.0;
        }
        let rank = ((self.count as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, n) in self.counts.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return RATIO.powi(i as i32).min(self.max_us);
            }
        }
        self.max_us
    }

    /// The largest latency recorded (0 with none).
    pub(crate) fn max(&self) -> f64 {
        self.max_us
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_within_one_percent_and_the_max_exact() {
        let mut l = Latencies::default();
        assert_eq!((l.quantile(0.5), l.max()), (0.0, 0.0));
        for us in 1..=10_000 {
            l.record(us as f64);
        }
        for (q, want) in [(0.5, 5_000.0), (0.99, 9_900.0)] {
            let got = l.quantile(q);
            assert!(got >= want && got <= want * RATIO, "q{q}: {got}, want {want}");
        }
        assert_eq!(l.max(), 10_000.0);
        assert_eq!(l.quantile(1.0), 10_000.0, "never past the max");
        l.record(0.2);
        l.record(1e12); // past the last bucket: counted there, the max exact
        assert_eq!(l.max(), 1e12);
        assert_eq!(l.counts.len(), BUCKETS, "bounded, however many");
    }
}
