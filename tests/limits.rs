//! End-to-end: absurd sizes, offsets and launch dimensions are invalid requests — answered at
//! once, never retried, never counted toward the circuit breaker, never a restart — in thread
//! and in process isolation. And user simulator modules: bad images and bad launch arguments
//! are invalid requests too.

mod common;

use std::time::{Duration, Instant};

use common::{answered, config, start_with_worker};
use hipvisor::core::BreakerState;
use hipvisor::core::config::Isolation;
use hipvisor::core::kernels::{self, BuiltinKernel};
use hipvisor::{Dim3, ErrorClass, KernelArg, ModuleSource, Op, Runtime, RuntimeConfig, RuntimeError};

/// How long an invalid request may take to be answered: no backoff, no retry, no restart
/// fits many times in it (retries here back off 50 ms and more).
const AT_ONCE: Duration = Duration::from_secs(2);

/// A runtime whose retries would be visible (slow backoff, many attempts) and whose breaker
/// opens at the first failure that counts.
async fn start(isolation: Isolation) -> Runtime {
    let mut c: RuntimeConfig = config(1);
    c.runtime.isolation = isolation;
    c.retry.max_retries = 5;
    c.retry.initial_delay_ms = 50;
    c.retry.max_delay_ms = 200;
    c.breaker.enabled = true;
    c.breaker.consecutive_failures = 1;
    c.breaker.open_ms = 60_000;
    start_with_worker(c).await
}

/// `op` is answered within [`AT_ONCE`] with an invalid request.
async fn invalid(rt: &Runtime, what: &str, op: Op) {
    let gpu = rt.device(0).unwrap();
    let kind = op.kind();
    let t0 = Instant::now();
    match answered(Duration::from_secs(30), gpu.submit(op)).await {
        Err(RuntimeError::Gpu(e)) => {
            assert_eq!(e.class(), ErrorClass::InvalidRequest, "{what}: {e}");
            assert_eq!(e.op(), kind, "{what}: {e}");
        }
        other => panic!("{what}: expected an invalid request, got {other:?}"),
    }
    assert!(t0.elapsed() < AT_ONCE, "{what}: answered after {:?}", t0.elapsed());
}

fn launch(module: hipvisor::ModuleHandle, function: &str, grid: Dim3, block: Dim3, args: Vec<KernelArg>) -> Op {
    Op::Launch {
        module,
        function: function.into(),
        grid,
        block,
        shared_mem_bytes: 0,
        args,
    }
}

/// Copies to the host too large for any host. In process isolation the host prepares shared
/// memory for a large result before the worker sees the op: it must refuse them first
/// ([`Op::check_sizes`]) rather than fail to allocate and call that out of memory.
fn copies_to_the_host(src: hipvisor::BufferHandle) -> [(&'static str, Op); 3] {
    [
        (
            "copy from device of u64::MAX",
            Op::CopyFromDevice {
                src,
                offset: 0,
                len: u64::MAX,
            },
        ),
        (
            "copy from device of isize::MAX + 1",
            Op::CopyFromDevice {
                src,
                offset: 0,
                len: 1 << 63,
            },
        ),
        (
            "copy from device of u64::MAX, claimed by a forged handle",
            Op::CopyFromDevice {
                src: hipvisor::BufferHandle { len: u64::MAX, ..src },
                offset: 0,
                len: u64::MAX - 1,
            },
        ),
    ]
}

async fn absurd_sizes_are_invalid_requests(isolation: Isolation, host_copies: bool) {
    let rt = start(isolation).await;
    let gpu = rt.device(0).unwrap();
    let a = gpu.alloc(64).await.unwrap();
    let b = gpu.alloc(64).await.unwrap();
    let m = gpu.load_module(ModuleSource::Builtin).await.unwrap();
    let max = u64::MAX;
    let cases = [
        ("alloc of u64::MAX", Op::Alloc { bytes: max }),
        ("alloc above the device's memory", Op::Alloc { bytes: (1 << 20) + 1 }),
        (
            "copy from device, offset + len overflowing",
            Op::CopyFromDevice {
                src: a,
                offset: max,
                len: 2,
            },
        ),
        (
            "copy to device at offset u64::MAX",
            Op::CopyToDevice {
                dst: a,
                offset: max,
                data: vec![1u8; 4].into(),
            },
        ),
        (
            "copy to device past the end",
            Op::CopyToDevice {
                dst: a,
                offset: 0,
                data: vec![1u8; 65].into(),
            },
        ),
        (
            "device-to-device copy of u64::MAX",
            Op::CopyDeviceToDevice {
                src: a,
                src_offset: 0,
                dst: b,
                dst_offset: 0,
                len: max,
            },
        ),
        (
            "device-to-device copy, offsets overflowing",
            Op::CopyDeviceToDevice {
                src: a,
                src_offset: max,
                dst: b,
                dst_offset: max,
                len: 2,
            },
        ),
        (
            "memset of u64::MAX",
            Op::Memset {
                buffer: a,
                offset: 0,
                len: max,
                value: 0,
            },
        ),
        (
            "memset, offset + len overflowing",
            Op::Memset {
                buffer: a,
                offset: 1,
                len: max,
                value: 0,
            },
        ),
        (
            "launch with grid (u32::MAX, u32::MAX, u32::MAX)",
            launch(
                m,
                "fault_illegal_address",
                Dim3 {
                    x: u32::MAX,
                    y: u32::MAX,
                    z: u32::MAX,
                },
                Dim3::x(1),
                vec![],
            ),
        ),
        (
            "launch with block (u32::MAX, u32::MAX, u32::MAX)",
            launch(
                m,
                "fault_illegal_address",
                Dim3::x(1),
                Dim3 {
                    x: u32::MAX,
                    y: u32::MAX,
                    z: u32::MAX,
                },
                vec![],
            ),
        ),
        (
            "launch of more than u64::MAX threads",
            launch(
                m,
                "fill",
                Dim3 {
                    x: i32::MAX as u32,
                    y: 65535,
                    z: 65535,
                },
                Dim3 { x: 16, y: 16, z: 4 },
                vec![KernelArg::Buffer(a), KernelArg::U32(7), KernelArg::U32(16)],
            ),
        ),
    ];
    let host_copies = copies_to_the_host(a).into_iter().filter(|_| host_copies);
    for (what, op) in cases.into_iter().chain(host_copies) {
        invalid(&rt, what, op).await;
    }
    // The device is unharmed and its buffers intact.
    gpu.memset(a, 0, 64, 3).await.unwrap();
    assert_eq!(gpu.copy_from_device(a, 0, 64).await.unwrap().as_bytes(), &[3; 64]);
    let s = rt.shutdown().await;
    assert_eq!(s.retries.attempts, 0, "no retry: {:?}", s.retries);
    assert_eq!((s.restarts, s.sticky_faults), (0, 0));
    assert_eq!(s.breaker_transitions, 0, "the breaker never moved");
    assert_eq!(s.devices[0].breaker, BreakerState::Closed);
    assert_eq!(
        s.ops_by_outcome.values().sum::<u64>(),
        s.ops_total,
        "every op answered once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absurd_sizes_are_invalid_requests_in_thread_isolation() {
    absurd_sizes_are_invalid_requests(Isolation::Thread, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absurd_sizes_are_invalid_requests_in_process_isolation() {
    absurd_sizes_are_invalid_requests(Isolation::Process, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absurd_copies_to_the_host_are_invalid_requests_in_process_isolation() {
    absurd_sizes_are_invalid_requests(Isolation::Process, true).await;
}

async fn user_sim_modules_are_checked(isolation: Isolation) {
    let rt = start(isolation).await;
    let gpu = rt.device(0).unwrap();
    let a = gpu.alloc(64).await.unwrap();
    let image = kernels::sim_module_image(&[BuiltinKernel::Fill, BuiltinKernel::Saxpy]);
    let m = gpu
        .load_module(ModuleSource::Image(image.clone().into()))
        .await
        .unwrap();
    // A valid launch of the user module works.
    gpu.launch(
        m,
        "fill",
        1,
        16,
        vec![KernelArg::Buffer(a), KernelArg::U32(9), KernelArg::U32(16)],
    )
    .await
    .unwrap();
    assert_eq!(
        kernels::u32s(gpu.copy_from_device(a, 0, 64).await.unwrap().as_bytes()),
        vec![9; 16]
    );
    let load = |bytes: Vec<u8>| Op::LoadModule {
        source: ModuleSource::Image(bytes.into()),
    };
    let mut not_utf8 = image.clone();
    not_utf8.extend_from_slice(b"\n\xff\xfefill");
    let cases = [
        ("image cut inside its magic line", load(image[..10].to_vec())),
        (
            "image cut inside a kernel name",
            load(image[..image.len() - 2].to_vec()),
        ),
        ("empty image", load(Vec::new())),
        ("image with non-UTF-8 bytes", load(not_utf8)),
        (
            "too few arguments",
            launch(m, "fill", Dim3::x(1), Dim3::x(16), vec![KernelArg::Buffer(a)]),
        ),
        (
            "too many arguments",
            launch(
                m,
                "fill",
                Dim3::x(1),
                Dim3::x(16),
                vec![
                    KernelArg::Buffer(a),
                    KernelArg::U32(1),
                    KernelArg::U32(16),
                    KernelArg::U32(0),
                ],
            ),
        ),
        (
            "an argument of the wrong type",
            launch(
                m,
                "saxpy",
                Dim3::x(1),
                Dim3::x(16),
                vec![
                    KernelArg::U32(2),
                    KernelArg::Buffer(a),
                    KernelArg::Buffer(a),
                    KernelArg::U32(16),
                ],
            ),
        ),
        (
            "a buffer too small for n",
            launch(
                m,
                "fill",
                Dim3::x(1),
                Dim3::x(32),
                vec![KernelArg::Buffer(a), KernelArg::U32(1), KernelArg::U32(17)],
            ),
        ),
        (
            "a kernel the module does not have",
            launch(m, "vector_add", Dim3::x(1), Dim3::x(16), vec![]),
        ),
    ];
    for (what, op) in cases {
        invalid(&rt, what, op).await;
    }
    let s = rt.shutdown().await;
    assert_eq!(s.retries.attempts, 0, "no retry: {:?}", s.retries);
    assert_eq!((s.restarts, s.sticky_faults, s.breaker_transitions), (0, 0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_sim_modules_are_checked_in_thread_isolation() {
    user_sim_modules_are_checked(Isolation::Thread).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_sim_modules_are_checked_in_process_isolation() {
    user_sim_modules_are_checked(Isolation::Process).await;
}
