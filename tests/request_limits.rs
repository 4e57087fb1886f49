//! End-to-end: a request whose content cannot be carried to a worker (a kernel name or an
//! argument list beyond the limits, a frame above the protocol's) is an invalid request,
//! answered at once in both isolations; the device and its other users notice nothing.

mod common;

use std::time::Duration;

use common::{answered, config, start_with_worker};
use hipvisor::core::config::Isolation;
use hipvisor::{ErrorClass, KernelArg, ModuleSource, RuntimeError};

const T: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_beyond_the_limits_are_invalid_at_once_in_both_isolations() {
    for isolation in [Isolation::Process, Isolation::Thread] {
        let mut c = config(2);
        c.runtime.isolation = isolation;
        let rt = start_with_worker(c).await;
        let gpu = rt.device(0).unwrap();
        let pids = (rt.worker_pid(0), rt.worker_pid(1));
        let module = gpu.load_module(ModuleSource::Builtin).await.unwrap();
        // Another user of the device holds a buffer throughout.
        let held = gpu.alloc(64).await.unwrap();
        gpu.memset(held, 0, 64, 3).await.unwrap();
        let b = gpu.alloc(64).await.unwrap();
        let long_name = "k".repeat(hipvisor::core::op::MAX_KERNEL_NAME_BYTES + 1);
        let huge_name = "k".repeat(4 << 20);
        let many_args = vec![KernelArg::U32(1); hipvisor::core::op::MAX_KERNEL_ARGS + 1];
        let frame_busting_args = vec![KernelArg::Buffer(b); 200_000];
        let cases = [
            (long_name, vec![KernelArg::Buffer(b)]),
            (huge_name, vec![KernelArg::Buffer(b)]),
            ("fill".to_string(), many_args),
            ("fill".to_string(), frame_busting_args),
        ];
        for (name, args) in cases {
            let started = std::time::Instant::now();
            let r = answered(T, gpu.launch(module, &name, 1, 1, args)).await;
            match &r {
                Err(RuntimeError::Gpu(e)) if e.class() == ErrorClass::InvalidRequest => {}
                other => panic!("{isolation:?}: a launch beyond the limits: {other:?}"),
            }
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "{isolation:?}: answered at once, not at a deadline"
            );
        }
        // The device and its other users noticed nothing.
        let data = gpu
            .copy_from_device(held, 0, 64)
            .await
            .expect("the held buffer survives");
        assert!(data.as_bytes().iter().all(|x| *x == 3));
        assert_eq!((rt.worker_pid(0), rt.worker_pid(1)), pids, "no worker was replaced");
        let s = rt.shutdown().await;
        assert_eq!(s.restarts, 0, "{isolation:?}");
    }
}
