//! End-to-end: durable buffers keep their handles and contents across device restarts, in
//! worker processes (cold and warm-standby restarts) and in thread isolation.

mod common;

use std::time::Duration;

use common::{answered, config, eventually, start, start_with_worker};
use hipvisor::core::config::Isolation;
use hipvisor::core::kernels::{f32_bytes, f32s};
use hipvisor::{
    BufferHandle, DeviceHandle, DeviceState, ErrorClass, InvalidReason, KernelArg, ModuleSource, Op, Runtime,
    RuntimeConfig, RuntimeError,
};

const T: Duration = Duration::from_secs(30);

fn process_config(devices: u32) -> RuntimeConfig {
    let mut c = config(devices);
    c.runtime.isolation = Isolation::Process;
    c
}

/// `n` bytes of a pattern that tells offsets apart.
fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

/// A sticky fault on `gpu`'s device (a kernel's illegal address, surfacing at the
/// synchronize), and the wait until a new context of it is ready.
async fn sticky_fault_and_restart(rt: &Runtime, gpu: &DeviceHandle) {
    let before = rt.worker_pid(gpu.index());
    let m = gpu.load_module(ModuleSource::Builtin).await.unwrap();
    answered(T, gpu.launch(m, "fault_illegal_address", 1, 1, vec![]))
        .await
        .unwrap();
    let e = answered(T, gpu.synchronize()).await.unwrap_err();
    assert_eq!(e.class(), Some(ErrorClass::Sticky), "{e}");
    eventually(T, "the device is back", || async {
        rt.worker_pid(gpu.index()).is_some_and(|p| Some(p) != before)
            && rt.states()[gpu.index() as usize] == DeviceState::Ready
    })
    .await;
}

async fn read(gpu: &DeviceHandle, b: BufferHandle) -> Vec<u8> {
    answered(T, gpu.copy_from_device(b, 0, b.len)).await.unwrap().to_vec()
}

async fn survives_restarts(standby: bool) {
    let mut c = process_config(1);
    c.supervisor.standby = standby;
    let rt = start_with_worker(c).await;
    let gpu = rt.device(0).unwrap();
    // One above the inline limit (it travels in shared memory), one below.
    let big = pattern(100_000, 1);
    let small = pattern(1000, 2);
    let d_big = gpu.durable(big.clone()).await.unwrap();
    let d_small = gpu.durable(small.clone()).await.unwrap();
    assert!(d_big.is_durable() && d_small.is_durable());
    assert_ne!(d_big.id, d_small.id);
    let plain = gpu.alloc(64).await.unwrap();
    let gone = gpu.durable(pattern(70_000, 6)).await.unwrap();
    if standby {
        eventually(T, "a standby is ready", || async { rt.standby_pid(0).is_some() }).await;
    }
    // Created (and freed) after the standby was prepared: the standby follows, in the
    // background or when it takes over.
    let late = gpu.durable(pattern(5000, 3)).await.unwrap();
    gpu.free(gone).await.unwrap();
    for round in 0..2 {
        sticky_fault_and_restart(&rt, &gpu).await;
        assert_eq!(read(&gpu, d_big).await, big, "round {round}");
        assert_eq!(read(&gpu, d_small).await, small, "round {round}");
        assert_eq!(read(&gpu, late).await, pattern(5000, 3), "round {round}");
        match gpu.copy_from_device(gone, 0, 16).await {
            Err(RuntimeError::Gpu(hipvisor::GpuError::Invalid {
                reason: InvalidReason::UnknownBuffer { .. },
                ..
            })) => {}
            other => panic!("a freed durable buffer came back: {other:?}"),
        }
        // An ordinary buffer of the old context is lost, as before.
        match gpu.copy_from_device(plain, 0, 64).await {
            Err(RuntimeError::Gpu(hipvisor::GpuError::Invalid {
                reason: InvalidReason::BufferLost { .. },
                ..
            })) => {}
            other => panic!("expected BufferLost, got {other:?}"),
        }
        if standby {
            eventually(T, "a new standby", || async { rt.standby_pid(0).is_some() }).await;
        }
    }
    let s = rt.shutdown().await;
    assert_eq!(s.restarts, 2);
    assert_eq!(s.recovery.durable_restores, 2, "{:?}", s.recovery);
    assert_eq!(s.recovery.durable_restored_bytes, 2 * 106_000, "{:?}", s.recovery);
    if standby {
        assert_eq!(s.recovery.standby_short, 0);
    }
    assert_eq!(s.devices[0].durable_bytes, 106_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_buffers_keep_handle_and_contents_across_cold_restarts() {
    survives_restarts(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_buffers_keep_handle_and_contents_across_standby_takeovers() {
    survives_restarts(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_update_the_host_copy_kernels_need_a_checkpoint() {
    let rt = start_with_worker(process_config(1)).await;
    let gpu = rt.device(0).unwrap();
    let m = gpu.load_module(ModuleSource::Builtin).await.unwrap();
    let x = gpu.durable(f32_bytes(&[1.0, 2.0, 3.0, 4.0])).await.unwrap();
    gpu.copy_to_device(x, 4, f32_bytes(&[20.0])).await.unwrap();
    gpu.memset(x, 12, 4, 0).await.unwrap();
    let scale = |factor: f32| {
        gpu.launch(
            m,
            "scale",
            1,
            4,
            vec![KernelArg::Buffer(x), KernelArg::F32(factor), KernelArg::U32(4)],
        )
    };
    scale(10.0).await.unwrap();
    assert_eq!(f32s(&read(&gpu, x).await), vec![10.0, 200.0, 30.0, 0.0]);
    // The kernel's write is not in the host copy: a restart brings back the copies' state.
    sticky_fault_and_restart(&rt, &gpu).await;
    assert_eq!(f32s(&read(&gpu, x).await), vec![1.0, 20.0, 3.0, 0.0]);
    scale(2.0).await.unwrap();
    gpu.checkpoint(x).await.unwrap();
    sticky_fault_and_restart(&rt, &gpu).await;
    assert_eq!(f32s(&read(&gpu, x).await), vec![2.0, 40.0, 6.0, 0.0]);
    // A checkpoint of a handle that is not durable is refused, naming why.
    let plain = gpu.alloc(16).await.unwrap();
    let e = gpu.checkpoint(plain).await.unwrap_err();
    assert!(e.to_string().contains("not a durable buffer"), "{e}");
    rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn freed_durable_buffers_are_gone_and_forged_ones_refused() {
    let rt = start_with_worker(process_config(1)).await;
    let gpu = rt.device(0).unwrap();
    let before = gpu.mem_info().await.unwrap().free;
    let d = gpu.durable(pattern(4096, 9)).await.unwrap();
    let plain = gpu.alloc(4096).await.unwrap();
    // A durable handle forged from an ordinary buffer's id names nothing.
    let forged = BufferHandle {
        epoch: BufferHandle::DURABLE_EPOCH,
        ..plain
    };
    let unknown = |r: Result<hipvisor::Payload, RuntimeError>| match r {
        Err(RuntimeError::Gpu(hipvisor::GpuError::Invalid {
            reason: InvalidReason::UnknownBuffer { .. },
            ..
        })) => {}
        other => panic!("expected UnknownBuffer, got {other:?}"),
    };
    unknown(gpu.copy_from_device(forged, 0, 16).await);
    // Nor may an application make (or overwrite) a durable buffer by a submitted op, under
    // any id: ids and host copies are the runtime's.
    for id in [5, d.id, hipvisor::core::DURABLE_ID_BASE + 1000] {
        let op = || Op::Durable {
            id,
            data: vec![1u8; 8].into(),
        };
        let e = gpu.submit(op()).await.unwrap_err();
        assert!(e.to_string().contains("made by DeviceHandle::durable"), "{e}");
        let e = gpu.try_submit(op()).await.unwrap_err();
        assert!(e.to_string().contains("made by DeviceHandle::durable"), "{e}");
        let answers = gpu.submit_batch([Op::MemInfo, op()]).await;
        assert!(answers.iter().all(Result::is_err), "a batch with one is refused whole");
    }
    assert_eq!(read(&gpu, d).await, pattern(4096, 9), "untouched");
    gpu.free(plain).await.unwrap();
    gpu.free(d).await.unwrap();
    unknown(gpu.copy_from_device(d, 0, 16).await);
    assert_eq!(gpu.mem_info().await.unwrap().free, before, "nothing left allocated");
    // Freed: not restored by the next context.
    sticky_fault_and_restart(&rt, &gpu).await;
    unknown(gpu.copy_from_device(d, 0, 16).await);
    let s = rt.shutdown().await;
    assert_eq!(s.devices[0].durable_bytes, 0);
    assert_eq!(s.recovery.durable_restores, 0, "nothing to restore");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicated_buffers_have_one_id_on_every_device() {
    let rt = start_with_worker(process_config(3)).await;
    let weights = pattern(50_000, 4);
    let r = rt.replicate(weights.clone()).await.unwrap();
    assert_eq!(r.devices(), &[0, 1, 2]);
    assert_eq!(r.len(), 50_000);
    for h in r.handles() {
        assert_eq!(h.id, r.id());
        assert_eq!(read(&rt.device(h.device).unwrap(), h).await, weights);
    }
    // A write to one replica is that replica's.
    let gpu1 = rt.device(1).unwrap();
    gpu1.memset(r.on(1).unwrap(), 0, 10, 0).await.unwrap();
    sticky_fault_and_restart(&rt, &gpu1).await;
    assert_eq!(read(&gpu1, r.on(1).unwrap()).await[..10], [0; 10]);
    assert_eq!(read(&rt.device(0).unwrap(), r.on(0).unwrap()).await, weights);
    rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_buffers_come_back_after_an_executor_restart_in_thread_isolation() {
    let rt = start(config(1)).await;
    let gpu = rt.device(0).unwrap();
    let data = pattern(3000, 5);
    let d = gpu.durable(data.clone()).await.unwrap();
    let plain = gpu.alloc(16).await.unwrap();
    rt.inject_executor_panic(0).unwrap();
    // The panic comes with the next op; the executor restarts with a new context.
    let _ = gpu.mem_info().await;
    eventually(T, "the executor restarted", || async {
        gpu.copy_from_device(plain, 0, 16).await.is_err() && rt.states()[0] == DeviceState::Ready
    })
    .await;
    assert_eq!(read(&gpu, d).await, data);
    rt.shutdown().await;
}
