//! A measurement, not a check: device-to-host copies through process isolation (simulated
//! device), in GB/s, for a few sizes. Ignored by default; run it in release:
//!
//! ```sh
//! cargo test --release -p hipvisor-core --test d2h_measure -- --ignored --nocapture
//! ```

mod common;

use std::time::Instant;

use hipvisor::core::config::Isolation;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement: run with --ignored --nocapture, in release"]
async fn d2h_through_process_isolation() {
    let sizes: [usize; 3] = [1 << 20, 16 << 20, 256 << 20];
    let mut c = common::config(1);
    c.runtime.isolation = Isolation::Process;
    c.sim.memory_bytes = 1 << 30;
    let rt = common::start_with_worker(c).await;
    let gpu = rt.device(0).unwrap();
    for len in sizes {
        let b = gpu.alloc(len as u64).await.unwrap();
        gpu.memset(b, 0, len as u64, 7).await.unwrap();
        let _warm = gpu.copy_from_device(b, 0, len as u64).await.unwrap();
        let reps = ((1usize << 30) / len).clamp(4, 256);
        let mut best = f64::MAX;
        for _round in 0..3 {
            let started = Instant::now();
            let mut sum = 0u64;
            for _ in 0..reps {
                let p = gpu.copy_from_device(b, 0, len as u64).await.unwrap();
                // The application reads what it got (one byte a page).
                sum += p.as_bytes().iter().step_by(4096).map(|x| u64::from(*x)).sum::<u64>();
            }
            assert_eq!(sum, 7 * reps as u64 * len.div_ceil(4096) as u64);
            best = best.min(started.elapsed().as_secs_f64());
        }
        let gbps = (reps * len) as f64 / best / 1e9;
        println!(
            "d2h process isolation, {:>4} MiB: {gbps:.2} GB/s ({reps} copies, best of 3)",
            len >> 20
        );
        gpu.free(b).await.unwrap();
    }
    rt.shutdown().await;
}
