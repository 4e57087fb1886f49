//! End-to-end: tasks run as one request, free their scratch, and are rerun whole — on the
//! restarted device or another holding their durable buffers — when a sticky fault, a
//! worker's crash or a lost device hits them; a task that writes a durable buffer is never
//! rerun; a poison request is quarantined alone.

mod common;

use std::time::Duration;

use common::{answered, config, fault, start_with_worker};
use hipvisor::core::config::Isolation;
use hipvisor::core::fault_plan::FaultSpec;
use hipvisor::core::kernels::{f32_bytes, f32s, reference};
use hipvisor::{
    KernelArg, ModuleSource, OpKind, ReplicatedBuffer, ReplicatedModule, Runtime, RuntimeConfig, RuntimeError, Task,
    TaskArg,
};

const T: Duration = Duration::from_secs(30);
const ROWS: usize = 8;
const COLS: usize = 16;

fn process_config(devices: u32, faults: Vec<FaultSpec>) -> RuntimeConfig {
    let mut c = config(devices);
    c.runtime.isolation = Isolation::Process;
    c.sim.faults = faults;
    c
}

struct Model {
    w: ReplicatedBuffer,
    b: ReplicatedBuffer,
    m: ReplicatedModule,
    weights: Vec<f32>,
    bias: Vec<f32>,
}

async fn model(rt: &Runtime) -> Model {
    let weights: Vec<f32> = (0..ROWS * COLS).map(|i| (i % 7) as f32 - 3.0).collect();
    let bias: Vec<f32> = (0..ROWS).map(|i| i as f32 * 0.5).collect();
    Model {
        w: rt.replicate(f32_bytes(&weights)).await.unwrap(),
        b: rt.replicate(f32_bytes(&bias)).await.unwrap(),
        m: rt.replicate_module(ModuleSource::Builtin).await.unwrap(),
        weights,
        bias,
    }
}

/// One request: `relu(W x + b)`.
fn request(m: &Model, x: &[f32]) -> Task {
    let mut t = Task::new();
    let xs = t.scratch((COLS * 4) as u64);
    let ys = t.scratch((ROWS * 4) as u64);
    t.copy_in(xs, 0, f32_bytes(x));
    t.launch(
        &m.m,
        "gemv",
        1,
        ROWS as u32,
        [
            TaskArg::durable(&m.w),
            xs.into(),
            TaskArg::durable(&m.b),
            ys.into(),
            TaskArg::value(KernelArg::U32(ROWS as u32)),
            TaskArg::value(KernelArg::U32(COLS as u32)),
        ],
    );
    t.launch(
        &m.m,
        "relu",
        1,
        ROWS as u32,
        [ys.into(), TaskArg::value(KernelArg::U32(ROWS as u32))],
    );
    t.copy_out(ys, 0, (ROWS * 4) as u64);
    t
}

fn expected(m: &Model, x: &[f32]) -> Vec<f32> {
    let mut y = reference::gemv(&m.weights, x, &m.bias, ROWS, COLS);
    reference::relu(&mut y);
    y
}

fn input(i: usize) -> Vec<f32> {
    (0..COLS).map(|j| ((i * 3 + j) % 5) as f32 - 2.0).collect()
}

/// Runs `n` requests one after the other; every one must be answered correctly.
async fn serve(rt: &Runtime, m: &Model, n: usize) {
    for i in 0..n {
        let x = input(i);
        let out = answered(T, rt.run(&request(m, &x)))
            .await
            .unwrap_or_else(|e| panic!("request {i}: {e}"));
        assert_eq!(out.len(), 1);
        assert_eq!(f32s(out[0].as_bytes()), expected(m, &x), "request {i}");
    }
}

fn task_ops(s: &hipvisor::Snapshot) -> (u64, u64) {
    let of = |ok: bool| {
        s.ops
            .iter()
            .filter(|c| c.op == OpKind::Task && (c.outcome == hipvisor::metrics::Outcome::Success) == ok)
            .map(|c| c.count)
            .sum()
    };
    (of(true), of(false))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_runs_as_one_op_and_frees_its_scratch_even_when_it_fails() {
    runs_as_one_op(start_with_worker(process_config(1, vec![])).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_run_in_thread_isolation_too() {
    runs_as_one_op(common::start(config(1)).await).await;
}

async fn runs_as_one_op(rt: Runtime) {
    let m = model(&rt).await;
    let gpu = rt.device(0).unwrap();
    let free = gpu.mem_info().await.unwrap().free;
    serve(&rt, &m, 5).await;
    assert_eq!(gpu.mem_info().await.unwrap().free, free, "scratch freed");
    // A task that fails half-way (an unknown kernel after its inputs): answered with the
    // failing op's error, its scratch freed too.
    let mut bad = request(&m, &input(0));
    bad.launch(&m.m, "no_such_kernel", 1, 1, []);
    let e = gpu.run(&bad).await.unwrap_err();
    assert!(e.to_string().contains("no_such_kernel"), "{e}");
    assert_eq!(
        gpu.mem_info().await.unwrap().free,
        free,
        "scratch freed after a failure"
    );
    // A task naming a buffer the device lacks is refused before it runs.
    let mut elsewhere = Task::new();
    let s = elsewhere.scratch(4);
    elsewhere.launch(
        hipvisor::ModuleHandle { device: 1, id: 1 },
        "relu",
        1,
        1,
        [s.into(), TaskArg::value(KernelArg::U32(1))],
    );
    let e = gpu.run(&elsewhere).await.unwrap_err();
    assert!(e.to_string().contains("no replica on device 0"), "{e}");
    let snap = rt.shutdown().await;
    // (The refused one never became an op.)
    assert_eq!(
        task_ops(&snap),
        (5, 1),
        "a task is one op, its inner ops are not counted"
    );
}

/// Serves `n` requests on 2 devices under `faults`, checks every answer, and returns the
/// snapshot.
async fn serve_under(faults: Vec<FaultSpec>, n: usize) -> hipvisor::Snapshot {
    let rt = start_with_worker(process_config(2, faults)).await;
    let m = model(&rt).await;
    serve(&rt, &m, n).await;
    // Scratch freed on every device that survived (a restarted worker starts empty).
    rt.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sticky_fault_inside_a_task_is_absorbed_by_a_rerun() {
    let s = serve_under(
        vec![fault(|f| {
            f.op = "launch".into();
            f.kernel = Some("relu".into());
            f.device = Some(0);
            f.nth = Some(3);
            f.code = Some(700);
        })],
        20,
    )
    .await;
    // (Serial requests go to the least-loaded device, device 0 on a tie: its third relu.)
    assert_eq!(s.sticky_faults, 1, "{s:?}");
    assert!(s.recovery.task_reruns >= 1, "{:?}", s.recovery);
    assert_eq!(task_ops(&s), (20, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_crash_inside_a_task_is_absorbed_by_a_rerun() {
    let s = serve_under(
        vec![fault(|f| {
            f.op = "copy_from_device".into();
            f.device = Some(0);
            f.nth = Some(2);
            f.crash = Some(true);
        })],
        20,
    )
    .await;
    assert_eq!(s.restarts, 1, "{s:?}");
    assert!(s.recovery.task_reruns >= 1, "{:?}", s.recovery);
    assert_eq!(task_ops(&s), (20, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_device_moves_its_tasks_to_the_other() {
    let s = serve_under(
        vec![fault(|f| {
            f.op = "alloc".into();
            f.device = Some(0);
            f.after = Some(4);
            f.code = Some(100);
        })],
        20,
    )
    .await;
    assert_eq!(s.devices[0].state, hipvisor::DeviceState::Lost, "{s:?}");
    assert!(s.recovery.task_reruns >= 1, "{:?}", s.recovery);
    assert_eq!(task_ops(&s), (20, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_that_writes_a_durable_buffer_is_never_rerun() {
    let rt = start_with_worker(process_config(
        1,
        vec![fault(|f| {
            f.op = "launch".into();
            f.kernel = Some("scale".into());
            f.nth = Some(1);
            f.code = Some(700);
        })],
    ))
    .await;
    let gpu = rt.device(0).unwrap();
    let m = gpu.load_module(ModuleSource::Builtin).await.unwrap();
    let acc = gpu.durable(f32_bytes(&[1.0; 4])).await.unwrap();
    let mut t = Task::new();
    t.launch(
        m,
        "scale",
        1,
        4,
        [
            TaskArg::durable_mut(acc),
            TaskArg::value(KernelArg::F32(2.0)),
            TaskArg::value(KernelArg::U32(4)),
        ],
    );
    assert!(!t.replayable());
    let e = answered(T, gpu.run(&t)).await.unwrap_err();
    assert_eq!(e.class(), Some(hipvisor::ErrorClass::Sticky), "{e}");
    // Not rerun (`task_reruns` is 0 below), and the kernel's write never reached the host
    // copy: the restored buffer holds the uploaded values.
    common::eventually(T, "device 0 is back", || async {
        rt.states()[0] == hipvisor::DeviceState::Ready
    })
    .await;
    assert_eq!(
        f32s(gpu.copy_from_device(acc, 0, 16).await.unwrap().as_bytes()),
        vec![1.0; 4]
    );
    // The second run succeeds (the plan's fault was the first launch only).
    gpu.run(&t).await.unwrap();
    let s = rt.shutdown().await;
    assert_eq!(s.recovery.task_reruns, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_request_alone_is_quarantined() {
    let rt = start_with_worker(process_config(2, vec![])).await;
    let m = model(&rt).await;
    // A request that faults wherever it runs: its relu is followed by a kernel that writes
    // through a bad pointer.
    let mut poison = request(&m, &input(99));
    poison.launch(&m.m, "fault_illegal_address", 1, 1, []);
    let e = answered(T, rt.run(&poison)).await.unwrap_err();
    assert!(matches!(e, RuntimeError::TaskQuarantined { .. }), "{e}");
    // Refused at once from now on, without running.
    let e = answered(T, rt.run(&poison)).await.unwrap_err();
    assert!(matches!(e, RuntimeError::TaskQuarantined { .. }), "{e}");
    // Every other request, with the same kernels, is served.
    common::eventually(T, "both devices are back", || async {
        rt.states().iter().all(|s| *s == hipvisor::DeviceState::Ready)
    })
    .await;
    serve(&rt, &m, 10).await;
    let s = rt.shutdown().await;
    assert!(s.quarantined.is_empty(), "no kernel quarantined: {:?}", s.quarantined);
    assert_eq!(s.recovery.tasks_quarantined, 1);
    assert_eq!(s.sticky_faults, 2, "quarantine_after = 2 runs");
}
