//! End-to-end: deadlines, backpressure, shutdown with ops in flight, the actor API, and the
//! promise that every op gets exactly one answer, on simulated devices.

mod common;

use std::time::Duration;

use common::{answered, config, eventually, fault, start, start_with_worker};
use hipvisor::core::config::Isolation;
use hipvisor::{DeviceMsg, ModuleSource, Op, OpResult, Reply, RuntimeError};
use proptest::prelude::*;

const T: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_op_is_answered_at_its_deadline_and_its_late_completion_is_counted() {
    let mut c = config(1);
    c.runtime.op_deadline_ms = 200;
    c.sim.faults.push(fault(|f| {
        f.op = "memset".into();
        f.nth = Some(1);
        f.hang_ms = Some(2_000);
    }));
    let rt = start(c).await;
    let gpu = rt.device(0).unwrap();
    let b = gpu.alloc(8).await.unwrap();
    let hung = tokio::spawn({
        let gpu = gpu.clone();
        async move { gpu.memset(b, 0, 8, 1).await }
    });
    eventually(T, "the memset is in flight", || async { gpu.in_flight() == 1 }).await;
    // Queued behind the hung op: answered at its own deadline too.
    let behind = tokio::spawn({
        let gpu = gpu.clone();
        async move { gpu.mem_info().await }
    });
    match answered(T, hung).await.unwrap() {
        Err(RuntimeError::DeadlineExceeded {
            op,
            may_have_executed: true,
            deadline_ms: 200,
            ..
        }) => {
            assert_eq!(op, hipvisor::OpKind::Memset)
        }
        other => panic!("expected DeadlineExceeded, got {other:?}"),
    }
    assert!(matches!(
        answered(T, behind).await.unwrap(),
        Err(RuntimeError::DeadlineExceeded {
            may_have_executed: false,
            ..
        })
    ));
    // Once the hang ends the device serves again, and the late completion is counted.
    eventually(T, "the device serves again", || async { gpu.mem_info().await.is_ok() }).await;
    eventually(T, "the late completion is counted", || async {
        rt.snapshot().await.unwrap().late_completions == 1
    })
    .await;
    rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backpressure_busy_for_try_submit_and_waiting_for_submit() {
    let mut c = config(1);
    c.runtime.in_flight = 2;
    // Long enough that both ops are in flight together even on a starved machine.
    c.sim.faults.push(fault(|f| {
        f.op = "memset".into();
        f.nth = Some(1);
        f.hang_ms = Some(5_000);
    }));
    let rt = start(c).await;
    let gpu = rt.device(0).unwrap();
    let b = gpu.alloc(8).await.unwrap();
    let first = tokio::spawn({
        let gpu = gpu.clone();
        async move { gpu.memset(b, 0, 8, 1).await }
    });
    // The hanging memset first, so the mem-info queues behind it.
    eventually(T, "the memset is in flight", || async { gpu.in_flight() == 1 }).await;
    let second = tokio::spawn({
        let gpu = gpu.clone();
        async move { gpu.mem_info().await }
    });
    eventually(T, "two ops in flight", || async { gpu.in_flight() == 2 }).await;
    assert!(matches!(
        gpu.try_submit(Op::MemInfo).await,
        Err(RuntimeError::Busy { device: 0, capacity: 2 })
    ));
    // The actor's TrySubmit says the same, and never blocks the actor.
    let actor = rt.device_ref(0).unwrap();
    let r = ractor::call!(actor, |reply| DeviceMsg::TrySubmit { op: Op::MemInfo, reply }).unwrap();
    assert!(matches!(r, Err(RuntimeError::Busy { .. })));
    // Submit waits for a slot, then completes; so does the actor's Submit.
    let waiting = tokio::spawn({
        let gpu = gpu.clone();
        async move { gpu.submit(Op::MemInfo).await }
    });
    let via_actor = ractor::call!(actor, |reply| DeviceMsg::Submit { op: Op::MemInfo, reply });
    assert!(via_actor.unwrap().is_ok());
    assert!(answered(T, waiting).await.unwrap().is_ok());
    answered(T, first).await.unwrap().unwrap();
    answered(T, second).await.unwrap().unwrap();
    let s = rt.shutdown().await;
    assert_eq!(
        s.ops_by_outcome.get(&hipvisor::metrics::Outcome::Other),
        Some(&2),
        "two Busy answers: {s:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_answers_every_op_in_flight() {
    let mut c = config(2);
    c.runtime.shutdown_timeout_ms = 50;
    c.retry.max_retries = 100;
    c.retry.initial_delay_ms = 50;
    c.retry.max_delay_ms = 50;
    c.sim.faults.push(fault(|f| {
        f.op = "mem_info".into();
        f.device = Some(0);
        f.after = Some(1);
        f.code = Some(600);
    }));
    c.sim.faults.push(fault(|f| {
        f.op = "memset".into();
        f.nth = Some(1);
        f.hang_ms = Some(500);
    }));
    let rt = start(c).await;
    let gpu0 = rt.device(0).unwrap();
    let gpu1 = rt.device(1).unwrap();
    let b = gpu1.alloc(8).await.unwrap();
    let mut tasks = Vec::new();
    // Retrying (device 0), hung (device 1) and queued ops.
    tasks.push(tokio::spawn({
        let g = gpu0.clone();
        async move { g.submit(Op::MemInfo).await }
    }));
    tasks.push(tokio::spawn({
        let g = gpu1.clone();
        async move {
            g.submit(Op::Memset {
                buffer: b,
                offset: 0,
                len: 8,
                value: 1,
            })
            .await
        }
    }));
    for _ in 0..20 {
        let g = gpu1.clone();
        tasks.push(tokio::spawn(async move { g.submit(Op::MemInfo).await }));
    }
    eventually(T, "ops in flight", || async {
        gpu0.in_flight() == 1 && gpu1.in_flight() >= 1
    })
    .await;
    let snapshot = answered(T, rt.shutdown()).await;
    let mut results: Vec<OpResult> = Vec::new();
    for t in tasks {
        results.push(answered(T, t).await.unwrap());
    }
    assert!(
        results.iter().any(|r| matches!(r, Err(RuntimeError::ShuttingDown))),
        "{results:?}"
    );
    // Every op answered, and counted once (the alloc too).
    assert_eq!(snapshot.ops_total, results.len() as u64 + 1);
    assert!(matches!(gpu0.mem_info().await, Err(RuntimeError::ShuttingDown)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_launch_through_the_actor_api() {
    let rt = start(config(1)).await;
    let actor = rt.device_ref(0).unwrap();
    let r = ractor::call!(actor, |reply| DeviceMsg::Submit {
        op: Op::LoadModule {
            source: ModuleSource::Builtin
        },
        reply
    })
    .unwrap();
    assert!(matches!(r, Ok(hipvisor::Reply::Module(_))));
    let state = ractor::call!(actor, DeviceMsg::State).unwrap();
    assert_eq!(state, hipvisor::DeviceState::Ready);
    rt.shutdown().await;
}

fn plan() -> impl Strategy<Value = Vec<hipvisor::core::fault_plan::FaultSpec>> {
    let code = prop_oneof![Just(2), Just(600), Just(1), Just(700), Just(719), Just(100), Just(999)];
    let op = prop_oneof![
        Just("any"),
        Just("alloc"),
        Just("memset"),
        Just("launch"),
        Just("mem_info"),
        Just("copy_from_device"),
        Just("synchronize")
    ];
    let entry = (
        op,
        code,
        0.0f64..0.2,
        proptest::option::of(1u64..200),
        proptest::option::of(0u32..3),
    )
        .prop_map(|(op, code, p, duration, device)| {
            fault(|f| {
                f.op = op.into();
                f.probability = Some(p);
                f.code = Some(code);
                f.duration_ms = duration;
                f.device = device;
            })
        });
    proptest::collection::vec(entry, 0..4)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, .. ProptestConfig::default() })]

    #[test]
    fn every_submitted_op_gets_exactly_one_answer(seed in any::<u64>(), faults in plan()) {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(async move {
            let mut c = config(3);
            c.sim.seed = seed;
            c.sim.faults = faults;
            c.runtime.op_deadline_ms = 2_000;
            c.breaker.enabled = true;
            let runtime = start(c).await;
            let mut tasks = Vec::new();
            for worker in 0..6u32 {
                let gpu = runtime.device(worker % 3).unwrap();
                tasks.push(tokio::spawn(async move {
                    let mut answers = 0u64;
                    let module = gpu.load_module(ModuleSource::Builtin).await.ok();
                    answers += 1;
                    for i in 0..25u32 {
                        let b = gpu.alloc(64).await;
                        answers += 1;
                        if let Ok(b) = b {
                            let _ = gpu.memset(b, 0, 64, i as u8).await;
                            if let Some(m) = module {
                                let args = vec![hipvisor::KernelArg::Buffer(b), hipvisor::KernelArg::U32(i), hipvisor::KernelArg::U32(16)];
                                let _ = gpu.launch(m, "fill", 1, 16, args).await;
                                answers += 1;
                            }
                            let _ = gpu.copy_from_device(b, 0, 64).await;
                            let _ = gpu.free(b).await;
                            answers += 3;
                        }
                        let _ = gpu.synchronize().await;
                        answers += 1;
                    }
                    answers
                }));
            }
            let mut total = 0;
            for t in tasks {
                total += answered(Duration::from_secs(60), t).await.unwrap();
            }
            let s = runtime.shutdown().await;
            assert_eq!(s.ops_total, total, "the metrics count every answer once: {s:#?}");
        });
    }
}

/// `DeviceHandle::submit_batch` in both isolations: in a thread, its ops queue one by one;
/// in a worker process, the executor also sends them to the worker in batches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_answers_every_op_in_order_even_past_the_in_flight_bound_in_either_isolation() {
    for isolation in [Isolation::Thread, Isolation::Process] {
        a_batch_answers_every_op_in_order_even_past_the_in_flight_bound(isolation).await;
    }
}

async fn a_batch_answers_every_op_in_order_even_past_the_in_flight_bound(isolation: Isolation) {
    let mut c = config(1);
    c.runtime.in_flight = 4;
    c.runtime.isolation = isolation;
    let rt = start_with_worker(c).await;
    assert_eq!(
        rt.worker_pid(0).is_some(),
        isolation == Isolation::Process,
        "{isolation:?}: a worker process where batches go to one"
    );
    let gpu = rt.device(0).unwrap();
    assert!(gpu.submit_batch([]).await.is_empty());
    let b = gpu.alloc(64).await.unwrap();
    let stale = hipvisor::BufferHandle { id: b.id + 1000, ..b };
    // 50 ops through 4 in-flight slots: the batch waits for slots, in order.
    let ops = (0..50u8).map(|i| match i % 5 {
        0 => Op::Memset {
            buffer: b,
            offset: 0,
            len: 64,
            value: i,
        },
        1 => Op::CopyFromDevice {
            src: b,
            offset: 0,
            len: 1,
        },
        2 => Op::Memset {
            buffer: stale,
            offset: 0,
            len: 1,
            value: 0,
        },
        3 => Op::Memset {
            buffer: b,
            offset: 60,
            len: 8,
            value: 0,
        },
        _ => Op::MemInfo,
    });
    let results = answered(T, gpu.submit_batch(ops)).await;
    assert_eq!(results.len(), 50);
    for (i, r) in results.iter().enumerate() {
        match (i % 5, r) {
            (0, Ok(Reply::Done)) | (4, Ok(Reply::MemInfo(_))) => {}
            // Each copy sees the memset just before it: the batch ran in order.
            (1, Ok(Reply::Data(d))) => assert_eq!(d.as_bytes(), [(i - 1) as u8]),
            (2, Err(RuntimeError::Gpu(e))) | (3, Err(RuntimeError::Gpu(e))) => {
                assert_eq!(
                    e.class(),
                    hipvisor::ErrorClass::InvalidRequest,
                    "{isolation:?}: op {i}: {e}"
                )
            }
            other => panic!("{isolation:?}: op {i}: unexpected {other:?}"),
        }
    }
    assert_eq!(gpu.in_flight(), 0);
    rt.shutdown().await;
}
