//! Measuring loops the benchmarks share.

use std::time::Instant;

/// Requests in flight in the pipelined measurements.
pub(crate) const IN_FLIGHT: u64 = 64;

/// Nanoseconds per op for `ops` ops of `f`, spread over `in_flight` concurrent tasks.
pub(crate) async fn per_op<F, Fut>(ops: u64, in_flight: u64, f: F) -> f64
where
    F: Fn() -> Fut + Send + Sync + Clone + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let each = (ops / in_flight).max(1);
    let started = Instant::now();
    let tasks: Vec<_> = (0..in_flight)
        .map(|_| {
            let f = f.clone();
            tokio::spawn(async move {
                for _ in 0..each {
                    f().await;
                }
            })
        })
        .collect();
    for t in tasks {
        let _ = t.await;
    }
    started.elapsed().as_nanos() as f64 / (each * in_flight) as f64
}
