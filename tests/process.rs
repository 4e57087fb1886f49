//! End-to-end: process isolation on simulated devices in worker processes (`hipvisor-worker`).

mod common;

use std::process::Command;
use std::time::Duration;

use common::{WORKER, answered, config, eventually, fault, start_with_worker};
use hipvisor::core::config::{Isolation, SimFlavour};
use hipvisor::core::ipc::{self, Channel, ControlPage, FromWorker, Hello, Request, ToWorker};
use hipvisor::{
    BackendKind, DeviceState, ErrorClass, InvalidReason, KernelArg, ModuleSource, Op, Runtime, RuntimeConfig,
    RuntimeError,
};

const T: Duration = Duration::from_secs(30);

fn process_config(devices: u32) -> RuntimeConfig {
    let mut c = config(devices);
    c.runtime.isolation = Isolation::Process;
    c
}

/// A worker process driven directly over its socket (no runtime), past its handshake:
/// the host's end, the child, and the control page.
fn bare_worker() -> (Channel, std::process::Child, ControlPage) {
    let (mut host, worker_end) = Channel::pair().unwrap();
    let child = ipc::spawn_worker(Command::new(WORKER), worker_end).unwrap();
    let control = ControlPage::new().unwrap();
    let hello = Hello {
        version: ipc::PROTOCOL_VERSION,
        backend: BackendKind::Sim,
        device: 0,
        epoch: 0,
        sim: Some(ipc::SimHello {
            devices: 1,
            memory_bytes: 1 << 20,
            flavour: SimFlavour::Cuda,
        }),
    };
    host.send(&ToWorker::Hello(hello), &[control.raw_fd()]).unwrap();
    assert!(matches!(host.recv::<FromWorker>().unwrap().0, FromWorker::Ready { .. }));
    (host, child, control)
}

fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sticky_fault_restarts_only_its_device() {
    let rt = start_with_worker(process_config(4)).await;
    let pids: Vec<u32> = (0..4).map(|d| rt.worker_pid(d).expect("a worker per device")).collect();
    let gpu1 = rt.device(1).unwrap();
    let module = gpu1.load_module(ModuleSource::Builtin).await.unwrap();
    let old = gpu1.alloc(64).await.unwrap();
    // The other devices keep serving while device 1 faults.
    let others: Vec<_> = [0u32, 2, 3]
        .into_iter()
        .map(|d| {
            let gpu = rt.device(d).unwrap();
            tokio::spawn(async move {
                for _ in 0..100 {
                    let b = gpu.alloc(256).await?;
                    gpu.memset(b, 0, 256, 1).await?;
                    gpu.free(b).await?;
                }
                Ok::<_, RuntimeError>(())
            })
        })
        .collect();
    gpu1.launch(module, "fault_illegal_address", 1, 1, vec![])
        .await
        .unwrap();
    match answered(T, gpu1.synchronize()).await {
        Err(RuntimeError::Gpu(e)) => assert_eq!((e.class(), e.code().unwrap().1), (ErrorClass::Sticky, 700)),
        other => panic!("the fault surfaces at the synchronize: {other:?}"),
    }
    for t in others {
        answered(T, t)
            .await
            .unwrap()
            .expect("devices 0, 2, 3 serve without an error");
    }
    eventually(T, "device 1 restarted", || async {
        rt.states()[1] == DeviceState::Ready && rt.worker_pid(1).is_some_and(|p| p != pids[1])
    })
    .await;
    assert!(!alive(pids[1]) || rt.worker_pid(1) != Some(pids[1]), "a new worker");
    for d in [0, 2, 3] {
        assert_eq!(
            rt.worker_pid(d),
            Some(pids[d as usize]),
            "device {d}'s worker was not touched"
        );
    }
    // After the restart: old buffers are lost (typed), new work succeeds, modules are back.
    match gpu1.memset(old, 0, 64, 1).await {
        Err(RuntimeError::Gpu(hipvisor::GpuError::Invalid {
            reason: InvalidReason::BufferLost { .. },
            ..
        })) => {}
        other => panic!("expected BufferLost, got {other:?}"),
    }
    let b = gpu1.alloc(16).await.unwrap();
    gpu1.launch(
        module,
        "fill",
        1,
        4,
        vec![KernelArg::Buffer(b), KernelArg::U32(9), KernelArg::U32(4)],
    )
    .await
    .unwrap();
    let data = gpu1.copy_from_device(b, 0, 16).await.unwrap();
    assert_eq!(hipvisor::core::kernels::u32s(data.as_bytes()), vec![9; 4]);
    let s = rt.shutdown().await;
    assert_eq!((s.sticky_faults, s.restarts, s.devices[1].restarts), (1, 1, 1));
    assert!(s.devices.iter().all(|d| d.state == DeviceState::Ready));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_op_is_answered_and_replaced() {
    let mut c = process_config(2);
    c.sim.faults.push(fault(|f| {
        f.op = "memset".into();
        f.device = Some(0);
        f.nth = Some(1);
        f.hang_ms = Some(20_000);
    }));
    let rt = start_with_worker(c).await;
    let gpu = rt.device(0).unwrap();
    let b = gpu.alloc(64).await.unwrap();
    let pid = rt.worker_pid(0).unwrap();
    let op = tokio::spawn({
        let gpu = gpu.clone();
        async move { gpu.memset(b, 0, 64, 1).await }
    });
    eventually(T, "the memset is in flight", || async { gpu.in_flight() == 1 }).await;
    tokio::task::yield_now().await;
    ipc::kill(pid);
    match answered(T, op).await.unwrap() {
        // Whether the memset had reached the worker depends on timing; the crash test below
        // checks the flag where it is certain.
        Err(RuntimeError::DeviceRestarted { device: 0, .. }) => {}
        other => panic!("expected DeviceRestarted, got {other:?}"),
    }
    eventually(T, "device 0 is back", || async {
        rt.states()[0] == DeviceState::Ready && rt.worker_pid(0).is_some_and(|p| p != pid)
    })
    .await;
    gpu.mem_info().await.unwrap();
    let s = rt.shutdown().await;
    assert_eq!(s.restarts, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_op_is_answered_at_its_deadline_and_the_worker_restarted() {
    let mut c = process_config(1);
    // Ample for an op's round trip on a loaded machine; the hang is far longer.
    c.runtime.op_deadline_ms = 1_500;
    c.sim.faults.push(fault(|f| {
        f.op = "memset".into();
        f.nth = Some(1);
        f.hang_ms = Some(30_000);
    }));
    let rt = start_with_worker(c).await;
    let gpu = rt.device(0).unwrap();
    let b = gpu.alloc(64).await.unwrap();
    let pid = rt.worker_pid(0).unwrap();
    match answered(T, gpu.memset(b, 0, 64, 1)).await {
        Err(RuntimeError::DeadlineExceeded {
            may_have_executed: true,
            ..
        }) => {}
        other => panic!("expected DeadlineExceeded, got {other:?}"),
    }
    eventually(T, "the watchdog replaced the worker", || async {
        rt.states()[0] == DeviceState::Ready && rt.worker_pid(0).is_some_and(|p| p != pid)
    })
    .await;
    assert!(!alive(pid), "the hung worker was killed");
    gpu.mem_info().await.unwrap();
    assert_eq!(rt.shutdown().await.restarts, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_storm_ends_in_failed() {
    let mut c = process_config(2);
    c.supervisor.max_restarts = 2;
    // Every worker of device 0 crashes on its first application op.
    c.sim.faults.push(fault(|f| {
        f.op = "mem_info".into();
        f.device = Some(0);
        f.after = Some(1);
        f.crash = Some(true);
    }));
    let rt = start_with_worker(c).await;
    let gpu = rt.device(0).unwrap();
    for _ in 0..20 {
        let _ = answered(T, gpu.mem_info()).await;
        if rt.states()[0] == DeviceState::Failed {
            break;
        }
    }
    eventually(T, "device 0 failed", || async { rt.states()[0] == DeviceState::Failed }).await;
    match gpu.mem_info().await {
        Err(RuntimeError::DeviceFailed { reason, .. }) => assert!(reason.contains("restart intensity"), "{reason}"),
        other => panic!("expected DeviceFailed, got {other:?}"),
    }
    rt.device(1).unwrap().mem_info().await.unwrap();
    let s = rt.shutdown().await;
    assert_eq!(s.devices[0].restarts, 2);
    assert_eq!(s.devices[1].state, DeviceState::Ready);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_copies_travel_through_shared_memory_and_host_buffers_are_zero_copy() {
    let mut c = process_config(1);
    c.sim.memory_bytes = 64 << 20;
    let rt = start_with_worker(c).await;
    let gpu = rt.device(0).unwrap();
    let n = 3 << 20;
    let b = gpu.alloc(n as u64).await.unwrap();
    let data: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();
    gpu.copy_to_device(b, 0, data.clone()).await.unwrap();
    let back = gpu.copy_from_device(b, 0, n as u64).await.unwrap();
    assert!(back.region().is_some(), "a large result comes back in shared memory");
    assert_eq!(back.as_bytes(), &data[..]);
    let mut host = gpu.host_buffer(n).unwrap();
    host.as_mut_slice().fill(7);
    let payload = host.freeze();
    gpu.copy_to_device(b, 0, payload).await.unwrap();
    assert!(
        gpu.copy_from_device(b, 0, n as u64)
            .await
            .unwrap()
            .as_bytes()
            .iter()
            .all(|x| *x == 7)
    );
    rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_stops_every_worker() {
    let rt = start_with_worker(process_config(3)).await;
    let pids: Vec<u32> = (0..3).map(|d| rt.worker_pid(d).unwrap()).collect();
    assert!(pids.iter().all(|p| alive(*p)));
    rt.shutdown().await;
    eventually(T, "no worker left", || async { pids.iter().all(|p| !alive(*p)) }).await;
}

#[test]
fn the_worker_rejects_malformed_frames_and_keeps_serving() {
    let (mut host, mut child, control) = bare_worker();
    for garbage in [
        &b"HV"[..],
        b"XX\x01\x00\x00",
        b"HV\x01\x00\xff\xff\xff\xff\xff",
        b"HV\x09\x00\x00",
    ] {
        host.send_frame(garbage, &[]).unwrap();
        match host.recv::<FromWorker>().unwrap().0 {
            FromWorker::Malformed(why) => assert!(!why.is_empty()),
            other => panic!("expected Malformed, got {other:?}"),
        }
    }
    let req = Request {
        id: 1,
        op: Op::MemInfo,
        origin: hipvisor::core::Origin::Runtime,
        fault: None,
        task_faults: Vec::new(),
        input: None,
        output: None,
        linger_us: 0,
    };
    host.send(&ToWorker::Request(req), &[]).unwrap();
    assert!(matches!(
        host.recv::<FromWorker>().unwrap().0,
        FromWorker::Response {
            id: 1,
            result: Ok(_),
            ..
        }
    ));
    assert_eq!(control.started(), 1, "the worker published the request it started");
    // A host that goes away ends the worker (end of file on its socket).
    drop(host);
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
}

/// The soft core-dump limit of process `pid` (readable until it is reaped).
fn core_limit(pid: u32) -> String {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .unwrap_or_else(|| panic!("no core limit in {limits}"));
    line.split_whitespace().nth(4).unwrap().to_string()
}

#[test]
fn a_hip_worker_writes_no_core_dump() {
    // The worker starts with core dumps allowed (the shell raises the limit), as on a
    // machine whose default allows them; told to serve a HIP device, it turns them off
    // before opening it, whether or not HIP is in this build and a GPU is present.
    for (backend, want_zero) in [(BackendKind::Sim, false), (BackendKind::Hip, true)] {
        let (mut host, worker_end) = Channel::pair().unwrap();
        let mut command = Command::new("sh");
        command.args(["-c", &format!("ulimit -c 4096 && exec {WORKER}")]);
        let mut child = ipc::spawn_worker(command, worker_end).unwrap();
        let control = ControlPage::new().unwrap();
        let hello = Hello {
            version: ipc::PROTOCOL_VERSION,
            backend,
            device: 0,
            epoch: 0,
            sim: None,
        };
        host.send(&ToWorker::Hello(hello), &[control.raw_fd()]).unwrap();
        let answer = host.recv::<FromWorker>().unwrap().0;
        let limit = core_limit(child.id());
        assert_eq!(
            limit == "0",
            want_zero,
            "{backend}: core limit {limit}; answer {answer:?}"
        );
        drop(host);
        child.wait().unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_worker_program_leaves_the_device_lost_with_a_clear_reason() {
    let rt = Runtime::builder()
        .config(process_config(1))
        .worker("/nonexistent/hipvisor-worker")
        .start()
        .await
        .unwrap();
    assert_eq!(rt.states()[0], DeviceState::Lost);
    match rt.device(0).unwrap().mem_info().await {
        Err(RuntimeError::DeviceLost { .. }) => {}
        other => panic!("expected DeviceLost, got {other:?}"),
    }
    rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fault_plan_is_not_rearmed_by_a_restart() {
    let mut c = process_config(1);
    // The 2nd memset of the run crashes the worker: once, not once per worker.
    c.sim.faults.push(fault(|f| {
        f.op = "memset".into();
        f.nth = Some(2);
        f.crash = Some(true);
    }));
    let rt = start_with_worker(c).await;
    let gpu = rt.device(0).unwrap();
    let b = gpu.alloc(8).await.unwrap();
    gpu.memset(b, 0, 8, 1).await.unwrap();
    assert!(matches!(
        gpu.memset(b, 0, 8, 1).await,
        Err(RuntimeError::DeviceRestarted {
            may_have_executed: true,
            ..
        })
    ));
    eventually(T, "restarted", || async {
        rt.states()[0] == DeviceState::Ready && gpu.mem_info().await.is_ok()
    })
    .await;
    let b = gpu.alloc(8).await.unwrap();
    for _ in 0..5 {
        gpu.memset(b, 0, 8, 1).await.unwrap();
    }
    assert_eq!(rt.shutdown().await.restarts, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warm_standby_takes_over_after_a_sticky_fault() {
    let mut c = process_config(1);
    c.supervisor.standby = true;
    let rt = start_with_worker(c).await;
    eventually(T, "a standby is ready", || async { rt.standby_pid(0).is_some() }).await;
    let (active, standby) = (rt.worker_pid(0).unwrap(), rt.standby_pid(0).unwrap());
    assert_ne!(active, standby);
    let gpu = rt.device(0).unwrap();
    // Loaded after the standby was prepared: the standby catches up when it takes over.
    let module = gpu.load_module(ModuleSource::Builtin).await.unwrap();
    gpu.launch(module, "fault_illegal_address", 1, 1, vec![]).await.unwrap();
    assert!(gpu.synchronize().await.is_err());
    eventually(T, "the standby took over", || async {
        rt.worker_pid(0) == Some(standby) && rt.states()[0] == DeviceState::Ready
    })
    .await;
    let b = gpu.alloc(16).await.unwrap();
    gpu.launch(
        module,
        "fill",
        1,
        4,
        vec![KernelArg::Buffer(b), KernelArg::U32(5), KernelArg::U32(4)],
    )
    .await
    .unwrap();
    assert_eq!(
        hipvisor::core::kernels::u32s(gpu.copy_from_device(b, 0, 16).await.unwrap().as_bytes()),
        vec![5; 4]
    );
    eventually(T, "a new standby behind it", || async {
        rt.standby_pid(0).is_some_and(|p| p != standby)
    })
    .await;
    eventually(T, "the poisoned worker is gone", || async { !alive(active) }).await;
    let s = rt.shutdown().await;
    assert_eq!(s.restarts, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reused_host_buffers_stay_mapped_in_the_worker_and_evictions_are_correct() {
    let mut c = process_config(1);
    c.sim.memory_bytes = 64 << 20;
    let rt = start_with_worker(c).await;
    let gpu = rt.device(0).unwrap();
    let n = 64 * 1024;
    let b = gpu.alloc(n as u64).await.unwrap();
    // More buffers than the worker's cache holds: first uses, hits and evictions.
    let count = ipc::REGION_CACHE + 4;
    let payloads: Vec<_> = (0..count)
        .map(|i| {
            let mut h = gpu.host_buffer(n).unwrap();
            h.as_mut_slice().fill(i as u8 + 1);
            h.freeze()
        })
        .collect();
    for round in 0..2 {
        for i in (0..count).rev().chain(0..count) {
            let i = (i + round) % count;
            gpu.copy_to_device(b, 0, payloads[i].clone()).await.unwrap();
            let back = gpu.copy_from_device(b, 0, n as u64).await.unwrap();
            assert!(back.as_bytes().iter().all(|x| *x == i as u8 + 1), "buffer {i}");
        }
    }
    rt.shutdown().await;
}

#[test]
fn the_worker_runs_a_batch_in_order_and_stops_at_a_sticky_fault() {
    let (mut host, mut child, control) = bare_worker();
    let request = |id, fault| Request {
        id,
        op: Op::MemInfo,
        origin: hipvisor::core::Origin::Application,
        fault,
        task_faults: Vec::new(),
        input: None,
        output: None,
        linger_us: 0,
    };
    // Rule-breaking batches run not at all: too many ops, or a region.
    let too_many = (1..=ipc::MAX_BATCH as u64 + 1).map(|id| request(id, None)).collect();
    let mut with_region = request(1, None);
    with_region.output = Some(ipc::RegionRef {
        id: 1,
        len: 8,
        cached: false,
    });
    for bad in [too_many, vec![with_region]] {
        host.send(&ToWorker::Batch(bad), &[]).unwrap();
        assert!(matches!(host.recv::<FromWorker>().unwrap().0, FromWorker::Malformed(_)));
    }
    assert_eq!(control.started(), 0, "nothing of a malformed batch started");
    // The answers so far go out before an op that may wait for the GPU (the alloc).
    let mut alloc = request(2, None);
    alloc.op = Op::Alloc { bytes: 8 };
    host.send(&ToWorker::Batch(vec![request(1, None), alloc, request(3, None)]), &[])
        .unwrap();
    let frames: Vec<(Vec<u64>, bool)> = (0..2)
        .map(|_| match host.recv::<FromWorker>().unwrap().0 {
            FromWorker::Batch { results, done } => {
                assert!(results.iter().all(|(_, r)| r.is_ok()), "{results:?}");
                (results.iter().map(|(id, _)| *id).collect(), done)
            }
            other => panic!("expected Batch, got {other:?}"),
        })
        .collect();
    assert_eq!(frames, vec![(vec![1], false), (vec![2, 3], true)]);
    // The second op is a sticky fault: the third does not start.
    let batch = vec![
        request(4, None),
        request(5, Some(ipc::WireFault::Code(700))),
        request(6, None),
    ];
    host.send(&ToWorker::Batch(batch), &[]).unwrap();
    match host.recv::<FromWorker>().unwrap().0 {
        FromWorker::Batch { results, done: true } => {
            assert_eq!(results.len(), 2, "{results:?}");
            assert!(matches!(results[0], (4, Ok(_))));
            match &results[1] {
                (5, Err(e)) => assert_eq!(e.class(), ErrorClass::Sticky),
                other => panic!("expected the sticky fault, got {other:?}"),
            }
        }
        other => panic!("expected the last Batch frame, got {other:?}"),
    }
    assert_eq!(control.started(), 5, "op 6 never started");
    drop(host);
    assert!(child.wait().unwrap().success());
}

/// A batch of mem-infos whose `nth` one (from 1) meets the fault `f` in a worker.
async fn batch_with_a_fault(
    f: impl FnOnce(&mut hipvisor::core::fault_plan::FaultSpec),
) -> (Vec<hipvisor::OpResult>, hipvisor::Snapshot) {
    batch_with_a_fault_and(|_| {}, f).await
}

async fn batch_with_a_fault_and(
    configure: impl FnOnce(&mut RuntimeConfig),
    f: impl FnOnce(&mut hipvisor::core::fault_plan::FaultSpec),
) -> (Vec<hipvisor::OpResult>, hipvisor::Snapshot) {
    let mut c = process_config(1);
    configure(&mut c);
    c.sim.faults.push(fault(|s| {
        s.op = "mem_info".into();
        s.nth = Some(10);
        f(s);
    }));
    let rt = start_with_worker(c).await;
    let gpu = rt.device(0).unwrap();
    let results = answered(T, gpu.submit_batch((0..40).map(|_| Op::MemInfo))).await;
    assert_eq!(results.len(), 40, "one answer per op");
    eventually(T, "the device is back", || async {
        rt.states()[0] == DeviceState::Ready
    })
    .await;
    gpu.mem_info().await.expect("the new worker serves");
    (results, rt.shutdown().await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ops_after_a_sticky_fault_in_a_batch_run_on_the_new_worker() {
    let (results, s) = batch_with_a_fault(|f| f.code = Some(700)).await;
    for (i, r) in results.iter().enumerate() {
        match (i, r) {
            (9, Err(RuntimeError::Gpu(e))) => assert_eq!(e.class(), ErrorClass::Sticky),
            (9, other) => panic!("op 10 meets the sticky fault, got {other:?}"),
            (_, r) => assert!(r.is_ok(), "op {} : {r:?}", i + 1),
        }
    }
    assert_eq!((s.sticky_faults, s.restarts), (1, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_crash_in_a_batch_answers_what_ran_and_reruns_what_did_not() {
    let (results, s) = batch_with_a_fault(|f| f.crash = Some(true)).await;
    let restarted = |r: &hipvisor::OpResult| {
        matches!(
            r,
            Err(RuntimeError::DeviceRestarted {
                may_have_executed: true,
                ..
            })
        )
    };
    for (i, r) in results.iter().enumerate() {
        match i {
            // Ran in the batch that died (their answers died with it), or alone before it.
            0..9 => assert!(r.is_ok() || restarted(r), "op {}: {r:?}", i + 1),
            9 => assert!(restarted(r), "the crashing op: {r:?}"),
            // Had not started: mem-info is idempotent and holds no buffer, so it reran.
            _ => assert!(r.is_ok(), "op {}: {r:?}", i + 1),
        }
    }
    assert_eq!(s.restarts, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hang_in_a_batch_is_answered_at_the_deadline_and_the_worker_replaced() {
    let (results, s) = batch_with_a_fault_and(|c| c.runtime.op_deadline_ms = 1_000, |f| f.hang_ms = Some(60_000)).await;
    let overdue = |r: &hipvisor::OpResult| {
        matches!(
            r,
            Err(RuntimeError::DeadlineExceeded {
                may_have_executed: true,
                ..
            })
        )
    };
    for (i, r) in results.iter().enumerate() {
        match i {
            // Before the hang: answered, or (in the hung batch) past the deadline with it,
            // or restarted with the worker the watchdog killed.
            0..9 => assert!(
                r.is_ok() || overdue(r) || matches!(r, Err(RuntimeError::DeviceRestarted { .. })),
                "op {}: {r:?}",
                i + 1
            ),
            9 => assert!(overdue(r), "the hung op: {r:?}"),
            // After it: past the deadline in the hung batch, or run on the new worker.
            _ => assert!(
                r.is_ok() || matches!(r, Err(RuntimeError::DeadlineExceeded { .. })),
                "op {}: {r:?}",
                i + 1
            ),
        }
    }
    assert_eq!(s.restarts, 1, "the watchdog killed the hung worker");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_in_a_batch_do_not_wait_behind_a_long_op() {
    let mut c = process_config(1);
    c.runtime.op_deadline_ms = 1_000;
    c.sim.faults.push(fault(|f| {
        f.op = "memset".into();
        f.nth = Some(10);
        f.hang_ms = Some(60_000);
    }));
    let rt = start_with_worker(c).await;
    let gpu = rt.device(0).unwrap();
    let b = gpu.alloc(64).await.unwrap();
    let pid = rt.worker_pid(0).unwrap();
    let memsets = (0..20u8).map(|i| Op::Memset {
        buffer: b,
        offset: 0,
        len: 64,
        value: i,
    });
    let results = answered(T, gpu.submit_batch(memsets)).await;
    for (i, r) in results.iter().enumerate() {
        match i {
            // Done before the hung memset started: answered then, not held until the
            // watchdog ended the batch at the deadline.
            0..9 => assert!(r.is_ok(), "op {}: {r:?}", i + 1),
            9 => assert!(
                matches!(
                    r,
                    Err(RuntimeError::DeadlineExceeded {
                        may_have_executed: true,
                        ..
                    })
                ),
                "the hung op: {r:?}"
            ),
            // Behind it: past their deadline, or not started and answered by the restart.
            _ => assert!(r.is_err(), "op {}: {r:?}", i + 1),
        }
    }
    eventually(T, "a new worker serves the device", || async {
        rt.states()[0] == DeviceState::Ready && rt.worker_pid(0).is_some_and(|p| p != pid)
    })
    .await;
    assert_eq!(rt.shutdown().await.restarts, 1);
}

/// The reason the device gave when it went to `Restarting` (from the state changes).
async fn restart_reason(changes: &mut tokio::sync::broadcast::Receiver<hipvisor::DeviceStateChange>) -> String {
    loop {
        let change = answered(T, changes.recv()).await.expect("a state change");
        if change.to == DeviceState::Restarting {
            return change.reason.expect("a restart says why");
        }
    }
}

fn hip_process_config() -> RuntimeConfig {
    let mut c = process_config(1);
    c.sim.flavour = SimFlavour::Hip;
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kernel_memory_fault_aborts_a_hip_worker_and_counts_as_a_sticky_fault_of_its_kernels() {
    let rt = start_with_worker(hip_process_config()).await;
    let mut changes = rt.subscribe();
    let gpu = rt.device(0).unwrap();
    let m = gpu.load_module(ModuleSource::Builtin).await.unwrap();
    let b = gpu.alloc(16).await.unwrap();
    let fill = vec![KernelArg::Buffer(b), KernelArg::U32(1), KernelArg::U32(4)];
    for round in 0..2 {
        let pid = rt.worker_pid(0).unwrap();
        if round == 0 {
            // Not synchronized before the fault: a suspect too.
            gpu.launch(m, "fill", 1, 4, fill.clone()).await.unwrap();
        }
        // On AMD the fault is no error: the launch returns, and ROCm aborts the process
        // moments later. The next op finds the worker dead before it started, and is not
        // run again on the new worker: a synchronize would answer that the kernels
        // finished, and even a mem-info answers the fault, as the next call after a fault
        // does on NVIDIA.
        answered(T, gpu.launch(m, "fault_illegal_address", 1, 1, vec![]))
            .await
            .unwrap();
        let next = if round == 0 {
            answered(T, gpu.synchronize()).await
        } else {
            answered(T, gpu.mem_info()).await.map(|_| ())
        };
        match next {
            Err(RuntimeError::DeviceRestarted {
                device: 0,
                may_have_executed: false,
            }) => {}
            other => panic!("round {round}: the worker died before the next op: {other:?}"),
        }
        let reason = restart_reason(&mut changes).await;
        assert!(
            reason.contains("worker killed by signal 6 (SIGABRT)") && reason.contains("fault_illegal_address"),
            "round {round}: {reason}"
        );
        assert_eq!(reason.contains("fill"), round == 0, "round {round}: {reason}");
        eventually(T, "a new worker", || async {
            rt.states()[0] == DeviceState::Ready && rt.worker_pid(0).is_some_and(|p| p != pid)
        })
        .await;
        assert!(!alive(pid));
    }
    // Suspected in two faults (quarantine_after = 2): quarantined. `fill` was in one.
    match gpu.launch(m, "fault_illegal_address", 1, 1, vec![]).await {
        Err(RuntimeError::Quarantined { .. }) => {}
        other => panic!("expected Quarantined, got {other:?}"),
    }
    let b = gpu.alloc(16).await.unwrap();
    let fill = vec![KernelArg::Buffer(b), KernelArg::U32(1), KernelArg::U32(4)];
    gpu.launch(m, "fill", 1, 4, fill).await.unwrap();
    gpu.synchronize().await.unwrap();
    let s = rt.shutdown().await;
    assert_eq!((s.sticky_faults, s.restarts), (2, 2));
    let q: Vec<_> = s.quarantined.iter().map(|q| q.function.as_str()).collect();
    assert_eq!(q, vec!["fault_illegal_address"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_planned_memory_fault_in_a_batch_aborts_a_hip_worker_and_its_kernels_are_suspects() {
    let mut c = hip_process_config();
    c.supervisor.quarantine_after = 1;
    c.sim.faults.push(fault(|f| {
        f.op = "launch".into();
        f.kernel = Some("scale".into());
        f.nth = Some(1);
        f.code = Some(700);
    }));
    let rt = start_with_worker(c).await;
    let gpu = rt.device(0).unwrap();
    let m = gpu.load_module(ModuleSource::Builtin).await.unwrap();
    let b = gpu.alloc(16).await.unwrap();
    let launch = |function: &str, args: Vec<KernelArg>| Op::Launch {
        module: m,
        function: function.into(),
        grid: hipvisor::core::Dim3::x(1),
        block: hipvisor::core::Dim3::x(4),
        shared_mem_bytes: 0,
        args,
    };
    let ops = vec![
        launch("fill", vec![KernelArg::Buffer(b), KernelArg::U32(1), KernelArg::U32(4)]),
        launch(
            "scale",
            vec![KernelArg::Buffer(b), KernelArg::F32(2.0), KernelArg::U32(4)],
        ),
        Op::Synchronize,
    ];
    let pid = rt.worker_pid(0).unwrap();
    let results = answered(T, gpu.submit_batch(ops)).await;
    // The launches returned (their answers went out before the synchronize, which waits);
    // the worker aborted before the synchronize started, and it is answered, not rerun.
    assert!(results[0].is_ok(), "{:?}", results[0]);
    assert!(results[1].is_ok(), "{:?}", results[1]);
    assert!(
        matches!(
            results[2],
            Err(RuntimeError::DeviceRestarted {
                may_have_executed: false,
                ..
            })
        ),
        "{:?}",
        results[2]
    );
    // The answers go out before the supervisor hears of the death: wait for the new worker.
    eventually(T, "a new worker", || async {
        rt.states()[0] == DeviceState::Ready && rt.worker_pid(0).is_some_and(|p| p != pid)
    })
    .await;
    let s = rt.shutdown().await;
    assert_eq!(s.sticky_faults, 1);
    let mut q: Vec<_> = s.quarantined.iter().map(|q| q.function.as_str()).collect();
    q.sort_unstable();
    assert_eq!(
        q,
        vec!["fill", "scale"],
        "the kernels launched since the last synchronize"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deaths_other_than_sigabrt_while_kernels_run_are_not_gpu_faults() {
    let mut c = hip_process_config();
    c.supervisor.quarantine_after = 1;
    // The plan's crash, under a launch and after one.
    c.sim.faults.push(fault(|f| {
        f.op = "launch".into();
        f.nth = Some(2);
        f.crash = Some(true);
    }));
    c.sim.faults.push(fault(|f| {
        f.op = "memset".into();
        f.nth = Some(1);
        f.crash = Some(true);
    }));
    let rt = start_with_worker(c).await;
    let mut changes = rt.subscribe();
    let gpu = rt.device(0).unwrap();
    let m = gpu.load_module(ModuleSource::Builtin).await.unwrap();
    for round in 0..3 {
        let pid = rt.worker_pid(0).unwrap();
        let b = gpu.alloc(16).await.unwrap();
        let fill = vec![KernelArg::Buffer(b), KernelArg::U32(1), KernelArg::U32(4)];
        let launched = gpu.launch(m, "fill", 1, 4, fill.clone()).await;
        let died = match round {
            // The 1st launch runs; the memset after it crashes the worker.
            0 => {
                launched.unwrap();
                gpu.memset(b, 0, 16, 0).await
            }
            // The 2nd launch crashes it.
            1 => launched,
            // A kill (the watchdog's, the OOM killer's) while a kernel may run.
            _ => {
                launched.unwrap();
                ipc::kill(pid);
                eventually(T, "the worker is dead", || async { !alive(pid) }).await;
                gpu.memset(b, 0, 16, 0).await
            }
        };
        assert!(died.is_err(), "round {round}: {died:?}");
        let reason = restart_reason(&mut changes).await;
        assert!(
            reason.contains("worker killed by signal 9 (SIGKILL)"),
            "round {round}: {reason}"
        );
        eventually(T, "a new worker", || async {
            rt.states()[0] == DeviceState::Ready && rt.worker_pid(0).is_some_and(|p| p != pid)
        })
        .await;
    }
    let b = gpu.alloc(16).await.unwrap();
    gpu.launch(
        m,
        "fill",
        1,
        4,
        vec![KernelArg::Buffer(b), KernelArg::U32(1), KernelArg::U32(4)],
    )
    .await
    .expect("not quarantined");
    let s = rt.shutdown().await;
    assert_eq!((s.sticky_faults, s.restarts), (0, 3));
    assert!(s.quarantined.is_empty(), "{:?}", s.quarantined);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_synchronize_after_a_hip_memory_fault_is_not_answered_ok() {
    let mut c = hip_process_config();
    c.supervisor.quarantine_after = 1;
    let rt = start_with_worker(c).await;
    let mut changes = rt.subscribe();
    let gpu = rt.device(0).unwrap();
    let m = gpu.load_module(ModuleSource::Builtin).await.unwrap();
    let pid = rt.worker_pid(0).unwrap();
    // ROCm's launch returns; the process aborts moments later, before the next op starts.
    answered(T, gpu.launch(m, "fault_illegal_address", 1, 1, vec![]))
        .await
        .unwrap();
    let sync = answered(T, gpu.synchronize()).await;
    assert!(
        matches!(
            sync,
            Err(RuntimeError::DeviceRestarted {
                device: 0,
                may_have_executed: false
            })
        ),
        "the kernels did not finish: {sync:?}"
    );
    let reason = restart_reason(&mut changes).await;
    assert!(
        reason.contains("SIGABRT") && reason.contains("fault_illegal_address"),
        "{reason}"
    );
    eventually(T, "a new worker", || async {
        rt.states()[0] == DeviceState::Ready && rt.worker_pid(0).is_some_and(|p| p != pid)
    })
    .await;
    // The device serves again; the faulting kernel is a suspect of one sticky fault, which
    // (quarantine_after = 1) quarantines it.
    gpu.mem_info().await.unwrap();
    gpu.synchronize().await.unwrap();
    assert!(matches!(
        gpu.launch(m, "fault_illegal_address", 1, 1, vec![]).await,
        Err(RuntimeError::Quarantined { .. })
    ));
    let s = rt.shutdown().await;
    assert_eq!((s.sticky_faults, s.restarts), (1, 1));
    let q: Vec<_> = s.quarantined.iter().map(|q| q.function.as_str()).collect();
    assert_eq!(q, vec!["fault_illegal_address"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_synchronize_a_dead_worker_never_started_is_answered_not_rerun() {
    // Killed (not a GPU fault) after a launch: the synchronize finds the worker dead. Run on
    // the new worker it would answer that the kernel finished; it never ran there.
    let rt = start_with_worker(process_config(1)).await;
    let gpu = rt.device(0).unwrap();
    let m = gpu.load_module(ModuleSource::Builtin).await.unwrap();
    let b = gpu.alloc(16).await.unwrap();
    let fill = vec![KernelArg::Buffer(b), KernelArg::U32(1), KernelArg::U32(4)];
    gpu.launch(m, "fill", 1, 4, fill).await.unwrap();
    let pid = rt.worker_pid(0).unwrap();
    ipc::kill(pid);
    eventually(T, "the worker is dead", || async { !alive(pid) }).await;
    let sync = answered(T, gpu.synchronize()).await;
    assert!(
        matches!(
            sync,
            Err(RuntimeError::DeviceRestarted {
                device: 0,
                may_have_executed: false
            })
        ),
        "{sync:?}"
    );
    eventually(T, "a new worker", || async {
        rt.states()[0] == DeviceState::Ready && rt.worker_pid(0).is_some_and(|p| p != pid)
    })
    .await;
    // An op whose answer does not depend on the dead context's work still reruns.
    let pid = rt.worker_pid(0).unwrap();
    ipc::kill(pid);
    eventually(T, "the worker is dead", || async { !alive(pid) }).await;
    answered(T, gpu.mem_info())
        .await
        .expect("mem-info reruns on the new worker");
    let s = rt.shutdown().await;
    assert_eq!((s.sticky_faults, s.restarts), (0, 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_synchronize_behind_a_sticky_fault_in_a_batch_is_answered_not_rerun() {
    let mut c = process_config(1);
    // The batch's module load takes 300 ms, alone (loads are never batched): the ops behind
    // it are all queued by then and travel as one batch.
    c.sim.faults.push(fault(|f| {
        f.op = "load_module".into();
        f.nth = Some(2);
        f.hang_ms = Some(300);
    }));
    let rt = start_with_worker(c).await;
    let gpu = rt.device(0).unwrap();
    let m = gpu.load_module(ModuleSource::Builtin).await.unwrap();
    let ops = vec![
        Op::LoadModule {
            source: ModuleSource::Builtin,
        },
        Op::Launch {
            module: m,
            function: "fault_illegal_address".into(),
            grid: hipvisor::core::Dim3::x(1),
            block: hipvisor::core::Dim3::x(1),
            shared_mem_bytes: 0,
            args: vec![],
        },
        // Surfaces the fault (700) and poisons the worker: the batch stops.
        Op::MemInfo,
        // Did not start. On the new worker it would answer success for the faulted kernel.
        Op::Synchronize,
    ];
    let results = answered(T, gpu.submit_batch(ops)).await;
    assert!(results[0].is_ok() && results[1].is_ok(), "{results:?}");
    assert!(
        matches!(&results[2], Err(RuntimeError::Gpu(e)) if e.class() == ErrorClass::Sticky),
        "{results:?}"
    );
    assert!(
        matches!(
            results[3],
            Err(RuntimeError::DeviceRestarted {
                may_have_executed: false,
                ..
            })
        ),
        "{results:?}"
    );
    eventually(T, "the device is back", || async {
        rt.states()[0] == DeviceState::Ready
    })
    .await;
    gpu.synchronize().await.expect("the new worker serves");
    assert_eq!(rt.shutdown().await.sticky_faults, 1);
}

/// A simulator the application built itself (`RuntimeBuilder::backend`) keeps its fault
/// plan in process isolation: the host decides each op's fault with it, as with the one the
/// runtime builds from `[sim]` (here empty, so the plan can only come from the backend).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_supplied_simulators_fault_plan_applies_in_process_isolation() {
    let c = process_config(1);
    let mut planned = c.sim.clone();
    planned.faults.push(common::failing("mem_info", 1));
    let backend = hipvisor::core::SimBackend::from_config(&planned, true).expect("sim config");
    let rt = Runtime::builder()
        .config(c)
        .backend(std::sync::Arc::new(backend))
        .worker(WORKER)
        .start()
        .await
        .expect("runtime starts");
    let gpu = rt.device(0).unwrap();
    match answered(T, gpu.mem_info()).await {
        Err(RuntimeError::Gpu(e)) => assert_eq!(e.code(), Some((hipvisor::core::Api::Sim, 1)), "{e}"),
        other => panic!("the supplied plan's fault, got {other:?}"),
    }
    rt.shutdown().await;
}
