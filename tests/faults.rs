//! End-to-end: sticky faults in thread isolation, quarantine, lost devices, panicking device
//! actors and restart intensity, on simulated devices.

mod common;

use std::time::Duration;

use common::{answered, config, eventually, fault, start};
use hipvisor::{DeviceMsg, DeviceState, ErrorClass, KernelArg, ModuleSource, Op, OpResult, RuntimeError};

const T: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sticky_fault_in_thread_isolation_fails_every_device_counts_one_fault_and_answers_everything() {
    let mut c = config(4);
    c.sim.memory_bytes = 64 << 20;
    let rt = start(c).await;
    let gpu1 = rt.device(1).unwrap();
    let module = gpu1.load_module(ModuleSource::Builtin).await.unwrap();
    // Keep every device busy with work in flight.
    let mut tasks = Vec::new();
    for d in 0..4 {
        let gpu = rt.device(d).unwrap();
        tasks.push(tokio::spawn(async move {
            // Busy until the fault reaches them (however late the launch below comes), with
            // a cap so that a fault that never comes cannot keep them busy for ever.
            let mut results: Vec<OpResult> = Vec::new();
            for _ in 0..10_000 {
                results.push(gpu.submit(Op::Alloc { bytes: 1024 }).await);
                results.push(gpu.submit(Op::MemInfo).await);
                if results.iter().rev().take(2).any(Result::is_err) {
                    break;
                }
            }
            results
        }));
    }
    gpu1.launch(module, "fault_illegal_address", 1, 1, vec![])
        .await
        .unwrap();
    // The fault surfaces at the next call on device 1 — this synchronize, or an alloc or a
    // mem-info of the busy tasks: exactly one op reports it.
    let mut results = vec![answered(T, gpu1.synchronize()).await.map(|()| hipvisor::Reply::Done)];
    for t in tasks {
        results.extend(answered(T, t).await.unwrap());
    }
    let (mut sticky, mut others) = (0, 0);
    for r in results {
        match r {
            Ok(_) => {}
            Err(RuntimeError::Gpu(e)) => {
                // Process-wide poisoning: whichever device's op notices first reports it
                // (as with HIP's per-process error state).
                assert_eq!((e.class(), e.code().unwrap().1), (ErrorClass::Sticky, 700));
                sticky += 1;
            }
            Err(RuntimeError::DeviceFailed { reason, .. }) => {
                assert!(reason.contains("process isolation would have restarted"), "{reason}");
                others += 1;
            }
            Err(e) => panic!("ops behind the fault are answered DeviceFailed, got {e:?}"),
        }
    }
    assert_eq!(sticky, 1, "exactly one op reports the fault");
    assert!(others > 0, "some ops ran into the fault");
    assert!(
        rt.states().iter().all(|s| *s == DeviceState::Failed),
        "{:?}",
        rt.states()
    );
    assert!(matches!(
        rt.device(2).unwrap().mem_info().await,
        Err(RuntimeError::DeviceFailed {
            may_have_executed: false,
            ..
        })
    ));
    assert!(matches!(rt.any(), Err(RuntimeError::NoReadyDevice)));
    let s = rt.shutdown().await;
    assert_eq!(s.sticky_faults, 1, "one fault, however many ops it failed");
    assert_eq!(s.ops_by_outcome.get(&hipvisor::metrics::Outcome::Sticky), Some(&1));
    assert!(
        s.devices
            .iter()
            .all(|d| d.state == DeviceState::Failed && d.reason.is_some())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_guilty_kernel_is_quarantined_and_not_the_innocent_one() {
    let mut c = config(2);
    // Thread isolation survives one sticky fault per process: quarantine after one.
    c.supervisor.quarantine_after = 1;
    let rt = start(c).await;
    let gpu = rt.device(0).unwrap();
    let m = gpu.load_module(ModuleSource::Builtin).await.unwrap();
    let b = gpu.alloc(16).await.unwrap();
    let fill = vec![KernelArg::Buffer(b), KernelArg::U32(1), KernelArg::U32(4)];
    gpu.launch(m, "fill", 1, 4, fill.clone()).await.unwrap();
    gpu.synchronize().await.unwrap(); // fill is cleared of suspicion here
    gpu.launch(m, "fault_illegal_address", 1, 1, vec![]).await.unwrap();
    assert!(gpu.synchronize().await.is_err());
    let s = rt.shutdown().await;
    let q: Vec<_> = s
        .quarantined
        .iter()
        .map(|q| (q.device, q.module, q.function.as_str()))
        .collect();
    assert_eq!(q, vec![(0, m.id, "fault_illegal_address")]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mem_info_does_not_clear_the_suspects_because_it_does_not_wait_for_the_gpu() {
    let mut c = config(2);
    c.supervisor.quarantine_after = 1;
    let rt = start(c).await;
    let gpu = rt.device(0).unwrap();
    let m = gpu.load_module(ModuleSource::Builtin).await.unwrap();
    let b = gpu.alloc(16).await.unwrap();
    let fill = vec![KernelArg::Buffer(b), KernelArg::U32(1), KernelArg::U32(4)];
    gpu.launch(m, "fill", 1, 4, fill.clone()).await.unwrap();
    // These succeed while `fill` may still be running on a GPU: it stays a suspect.
    gpu.mem_info().await.unwrap();
    gpu.memset(b, 0, 16, 0).await.unwrap();
    gpu.launch(m, "fault_illegal_address", 1, 1, vec![]).await.unwrap();
    assert!(gpu.synchronize().await.is_err());
    let s = rt.shutdown().await;
    let mut q: Vec<_> = s.quarantined.iter().map(|q| q.function.as_str()).collect();
    q.sort_unstable();
    assert_eq!(q, vec!["fault_illegal_address", "fill"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_to_the_host_clears_the_suspects() {
    let mut c = config(2);
    c.supervisor.quarantine_after = 1;
    let rt = start(c).await;
    let gpu = rt.device(0).unwrap();
    let m = gpu.load_module(ModuleSource::Builtin).await.unwrap();
    let b = gpu.alloc(16).await.unwrap();
    let fill = vec![KernelArg::Buffer(b), KernelArg::U32(1), KernelArg::U32(4)];
    gpu.launch(m, "fill", 1, 4, fill.clone()).await.unwrap();
    // A blocking copy back waits for `fill`: it finished without a fault.
    gpu.copy_from_device(b, 0, 16).await.unwrap();
    gpu.launch(m, "fault_illegal_address", 1, 1, vec![]).await.unwrap();
    assert!(gpu.synchronize().await.is_err());
    let s = rt.shutdown().await;
    let q: Vec<_> = s.quarantined.iter().map(|q| q.function.as_str()).collect();
    assert_eq!(q, vec!["fault_illegal_address"]);
}

/// Set in a copy of this test program that must abort.
const CHILD_ENV: &str = "HV_FAULTS_TEST_CHILD";

#[test]
fn a_hip_memory_fault_in_thread_isolation_really_aborts_the_application_when_allowed() {
    const NAME: &str = "a_hip_memory_fault_in_thread_isolation_really_aborts_the_application_when_allowed";
    if std::env::var_os(CHILD_ENV).is_some() {
        let tokio_rt = tokio::runtime::Runtime::new().unwrap();
        tokio_rt.block_on(async {
            let mut c = config(1);
            c.sim.flavour = hipvisor::core::config::SimFlavour::Hip;
            c.runtime.allow_abort_on_gpu_fault = true;
            let rt = start(c).await;
            let gpu = rt.device(0).unwrap();
            let m = gpu.load_module(ModuleSource::Builtin).await.unwrap();
            let r = gpu.launch(m, "fault_illegal_address", 1, 1, vec![]).await;
            eprintln!("the launch returned {r:?}");
            let after = gpu.synchronize().await;
            eprintln!("the application survived: {r:?} {after:?}");
        });
        return;
    }
    use std::os::unix::process::ExitStatusExt;
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", NAME, "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.signal(), Some(6), "SIGABRT: {:?}\n{stderr}", out.status);
    assert!(stderr.contains("Memory access fault by GPU node-1"), "{stderr}");
    assert!(!stderr.contains("survived"), "{stderr}");
    // As on a GPU: the launch returns, the process aborts at its next call.
    assert!(stderr.contains("the launch returned Ok(())"), "{stderr}");
    // Without the consent, the same configuration does not start.
    let mut c = config(1);
    c.sim.flavour = hipvisor::core::config::SimFlavour::Hip;
    let e = c.validate().unwrap_err();
    assert_eq!(e.key(), Some("runtime.isolation"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_device_sheds_movable_work_and_returns() {
    let mut c = config(3);
    c.sim.faults.push(fault(|f| {
        f.device = Some(1);
        f.after = Some(2);
        f.code = Some(100);
        // Long enough that the checks below run while it is gone, even on a loaded machine.
        f.duration_ms = Some(3_000);
    }));
    let rt = start(c).await;
    let mut changes = rt.subscribe();
    let gpu1 = rt.device(1).unwrap();
    let kept = gpu1.alloc(64).await.unwrap();
    // The second op of device 1 finds it gone: the alloc moves to another device.
    let moved = answered(T, gpu1.alloc(64)).await.unwrap();
    assert_ne!(moved.device, 1);
    assert_eq!(rt.states()[1], DeviceState::Lost);
    // Work bound to device 1 (its buffer) cannot move.
    assert!(matches!(
        gpu1.memset(kept, 0, 64, 1).await,
        Err(RuntimeError::DeviceLost { device: 1, .. })
    ));
    // New movable work goes elsewhere while it is lost.
    let b = gpu1.alloc(8).await.unwrap();
    assert_ne!(b.device, 1);
    // The probe brings it back once the fault's duration is over.
    eventually(T, "device 1 returns", || async { rt.states()[1] == DeviceState::Ready }).await;
    gpu1.memset(kept, 0, 64, 1).await.unwrap();
    let first = changes.recv().await.unwrap();
    assert_eq!(
        (first.device, first.from, first.to),
        (1, DeviceState::Ready, DeviceState::Lost)
    );
    let second = changes.recv().await.unwrap();
    assert_eq!((second.device, second.to), (1, DeviceState::Ready));
    let s = rt.shutdown().await;
    assert_eq!(s.devices[1].state, DeviceState::Ready);
}

/// A device gone for good is still `Lost` in the final snapshot: its probe, woken while the
/// runtime shuts down, stops probing without saying the device came back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_gone_for_good_is_still_lost_after_shutdown() {
    let mut c = config(2);
    // Probes every millisecond: several wake while the runtime shuts down.
    c.supervisor.lost_probe_interval_ms = 1;
    c.sim.faults.push(fault(|f| {
        f.device = Some(0);
        f.after = Some(1);
        f.code = Some(100);
    }));
    // An op that hangs on device 1 keeps the shutdown waiting while the probes wake.
    c.sim.faults.push(fault(|f| {
        f.op = "memset".into();
        f.device = Some(1);
        f.nth = Some(1);
        f.hang_ms = Some(300);
    }));
    let rt = start(c).await;
    let moved = answered(T, rt.device(0).unwrap().alloc(64)).await.unwrap();
    assert_eq!(moved.device, 1);
    assert_eq!(rt.states()[0], DeviceState::Lost);
    let gpu1 = rt.device(1).unwrap();
    let watch = gpu1.clone();
    let hung = tokio::spawn(async move { gpu1.memset(moved, 0, 64, 1).await });
    eventually(T, "the memset is in flight", || async { watch.in_flight() > 0 }).await;
    let s = rt.shutdown().await;
    let _ = hung.await;
    assert_eq!(s.devices[0].state, DeviceState::Lost, "{:?}", s.devices);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_device_actor_is_restarted() {
    let rt = start(config(2)).await;
    let before = rt.device_ref(0).unwrap();
    before.cast(DeviceMsg::Crash("test".into())).unwrap();
    eventually(T, "a new device actor", || async {
        rt.device_ref(0).is_ok_and(|a| a.get_id() != before.get_id()) && rt.states()[0] == DeviceState::Ready
    })
    .await;
    let actor = rt.device_ref(0).unwrap();
    let r = ractor::call!(actor, |reply| DeviceMsg::Submit { op: Op::MemInfo, reply }).unwrap();
    assert!(r.is_ok());
    // The other device never noticed.
    assert_eq!(rt.states()[1], DeviceState::Ready);
    let s = rt.shutdown().await;
    assert_eq!((s.restarts, s.devices[0].restarts), (1, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exceeding_the_restart_intensity_fails_the_device() {
    let mut c = config(1);
    c.supervisor.max_restarts = 2;
    let rt = start(c).await;
    for round in 0..3 {
        eventually(T, "device 0 ready with an actor", || async {
            rt.device_ref(0).is_ok() && rt.states()[0] == DeviceState::Ready
        })
        .await;
        let actor = rt.device_ref(0).unwrap();
        actor.cast(DeviceMsg::Crash(format!("round {round}"))).unwrap();
        eventually(T, "the actor is gone", || async {
            rt.device_ref(0).map(|a| a.get_id()).ok() != Some(actor.get_id())
        })
        .await;
        if round < 2 {
            eventually(T, "restarted", || async { rt.device_ref(0).is_ok() }).await;
        }
    }
    eventually(T, "device 0 fails", || async { rt.states()[0] == DeviceState::Failed }).await;
    match rt.device(0).unwrap().mem_info().await {
        Err(RuntimeError::DeviceFailed { reason, .. }) => assert!(reason.contains("restart intensity"), "{reason}"),
        other => panic!("expected DeviceFailed, got {other:?}"),
    }
    assert_eq!(rt.shutdown().await.restarts, 2);
}
