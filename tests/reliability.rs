//! End-to-end: what the runtime promises whatever happens to a device — every queued op is
//! answered by its deadline, a worker's start is bounded, a panic of an executor is a
//! supervised failure, and a runtime dropped without `shutdown` (or a start that fails half-way)
//! leaves no process behind. Simulated devices, mostly in worker processes.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{WORKER, answered, config, eventually, fault, script, start_with_worker};
use hipvisor::core::config::Isolation;
use hipvisor::core::ipc;
use hipvisor::{DeviceState, Runtime, RuntimeConfig, RuntimeError};

const T: Duration = Duration::from_secs(30);

fn process_config(devices: u32) -> RuntimeConfig {
    let mut c = config(devices);
    c.runtime.isolation = Isolation::Process;
    c
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

/// A directory of this test's own, emptied.
fn scratch(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("hipvisor-reliability-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Kills device 0's worker and, once it is dead, lets an op find it so (the op waits for the
/// new one), waits until `what` holds, and shuts the runtime down: the final snapshot's
/// device 0, once that op is answered (by the shutdown), and how long the shutdown took.
async fn crash_and_shut_down_once(
    rt: Runtime,
    what: &str,
    cond: impl Fn(&Runtime) -> bool,
) -> (hipvisor::metrics::DeviceSnapshot, Duration) {
    let pid = rt.worker_pid(0).unwrap();
    ipc::kill(pid);
    // kill(2) only sends the signal: until the worker is gone it could still answer the op.
    eventually(T, "the worker is dead", || async { !alive(pid) }).await;
    let gpu = rt.device(0).unwrap();
    let waiting = tokio::spawn(async move { gpu.mem_info().await });
    eventually(T, what, || async { cond(&rt) }).await;
    assert_eq!(rt.states()[0], DeviceState::Restarting);
    let began = Instant::now();
    let s = rt.shutdown().await;
    let took = began.elapsed();
    match answered(T, waiting).await.unwrap() {
        Err(RuntimeError::ShuttingDown) => {}
        other => panic!("expected ShuttingDown, got {other:?}"),
    }
    (s.devices[0].clone(), took)
}

/// A copy of the worker program of this test's own: its processes are told apart from
/// other tests' by their executable, and it can be deleted.
fn worker_copy(tag: &str) -> PathBuf {
    let path = scratch(tag).join("hipvisor-worker");
    std::fs::copy(WORKER, &path).unwrap();
    path
}

/// The processes running `program` (deleted or not).
fn processes_of(program: &Path) -> Vec<u32> {
    let deleted = format!("{} (deleted)", program.display());
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_link(format!("/proc/{pid}/exe"))
                .is_ok_and(|exe| exe == program || exe.to_str() == Some(deleted.as_str()))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_ops_are_answered_when_the_worker_dies_and_its_program_is_gone() {
    let program = worker_copy("gone");
    let deadline_ms = 3_000;
    let mut c = process_config(1);
    c.runtime.op_deadline_ms = deadline_ms;
    c.sim.faults.push(fault(|f| {
        f.op = "memset".into();
        f.nth = Some(1);
        f.hang_ms = Some(20_000);
    }));
    let rt = Runtime::builder()
        .config(c)
        .worker(&program)
        .start()
        .await
        .expect("runtime starts");
    let gpu = rt.device(0).unwrap();
    let b = gpu.alloc(64).await.unwrap();
    let pid = rt.worker_pid(0).unwrap();
    let hung = tokio::spawn({
        let gpu = gpu.clone();
        async move { gpu.memset(b, 0, 64, 1).await }
    });
    eventually(T, "the memset is in flight", || async { gpu.in_flight() == 1 }).await;
    // Queued behind the hung memset: their device will never take them again.
    let queued: Vec<_> = (0..8)
        .map(|_| {
            let gpu = gpu.clone();
            tokio::spawn(async move {
                let submitted = Instant::now();
                let result = gpu.mem_info().await;
                (result, submitted.elapsed())
            })
        })
        .collect();
    eventually(T, "the mem-infos are queued", || async { gpu.in_flight() == 9 }).await;
    // The worker program is deleted, then the worker dies: no new worker can start.
    std::fs::remove_file(&program).unwrap();
    ipc::kill(pid);
    assert!(matches!(
        answered(T, hung).await.unwrap(),
        Err(RuntimeError::DeviceRestarted { device: 0, .. })
    ));
    eventually(T, "the killed worker is gone", || async { !alive(pid) }).await;
    let within = Duration::from_millis(deadline_ms + 1_000);
    for q in queued {
        let (result, took) = answered(within, q).await.unwrap();
        assert!(took <= within, "answered after {took:?}");
        match result {
            Err(RuntimeError::DeviceLost { device: 0, .. }) => {}
            other => panic!("expected DeviceLost, got {other:?}"),
        }
    }
    assert_eq!(rt.states()[0], DeviceState::Lost);
    // Later submissions are answered at once.
    assert!(matches!(
        answered(Duration::from_secs(1), gpu.mem_info()).await,
        Err(RuntimeError::DeviceLost { device: 0, .. })
    ));
    let s = rt.shutdown().await;
    assert_eq!(s.ops_total, s.ops_succeeded + s.ops_failed);
    assert_eq!(s.ops_total, 11, "the alloc, the memset, 9 mem-infos");
    let _ = std::fs::remove_dir_all(program.parent().unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_op_queued_again_after_a_failed_devices_drain_is_answered() {
    // An alloc out of memory waits (its backoff) before it asks for mem-info; meanwhile its
    // device's worker crashes twice, beyond the restart intensity, and the device fails. The
    // mem-info and the alloc are queued after the failed device's queue was drained.
    let mut c = process_config(1);
    c.supervisor.max_restarts = 1;
    // The backoff is long, so the device fails (two restarts) well within it on a loaded
    // machine; the deadline longer still, so an op left queued is told from one answered.
    c.runtime.op_deadline_ms = 60_000;
    c.retry.max_retries = 50;
    c.retry.initial_delay_ms = 15_000;
    c.retry.max_delay_ms = 15_000;
    c.sim.faults.push(fault(|f| {
        f.op = "device_info".into();
        f.after = Some(1);
        f.crash = Some(true);
    }));
    let rt = start_with_worker(c).await;
    let gpu = rt.device(0).unwrap();
    let _held = gpu.alloc(600 << 10).await.unwrap();
    let submitted = Instant::now();
    let waiting = tokio::spawn({
        let gpu = gpu.clone();
        async move { gpu.alloc(600 << 10).await }
    });
    eventually(T, "the alloc is queued", || async { gpu.in_flight() == 1 }).await;
    // Answered after the alloc's first attempt (the queue is in order): it ran out of memory.
    gpu.mem_info().await.unwrap();
    // Each crashes the worker.
    for round in 0..2 {
        let pid = rt.worker_pid(0);
        assert!(matches!(
            answered(T, gpu.device_info()).await,
            Err(RuntimeError::DeviceRestarted { .. })
        ));
        if round == 0 {
            eventually(T, "the device restarted", || async {
                rt.states()[0] == DeviceState::Ready && rt.worker_pid(0).is_some_and(|p| Some(p) != pid)
            })
            .await;
        }
    }
    eventually(T, "the device failed", || async {
        rt.states()[0] == DeviceState::Failed
    })
    .await;
    assert!(
        submitted.elapsed() < Duration::from_millis(15_000),
        "the device failed after the alloc's backoff ended: the test is too slow to say anything"
    );
    // Answered when its backoff ends (15 s after its submission), not at its deadline (60 s).
    match answered(Duration::from_secs(15 + 15), waiting).await.unwrap() {
        Err(RuntimeError::DeviceFailed { device: 0, reason, .. }) => {
            assert!(reason.contains("restart intensity"), "{reason}")
        }
        other => panic!("expected DeviceFailed, got {other:?}"),
    }
    let s = rt.shutdown().await;
    assert_eq!(s.ops_total, s.ops_succeeded + s.ops_failed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_hangs_in_its_start_is_killed_within_the_start_timeout() {
    // A "worker" that never answers its handshake; it notes its process id first.
    let dir = scratch("hang");
    let pids = dir.join("pids");
    let program = script(
        &dir,
        "hanging-worker",
        &format!("#!/bin/sh\necho $$ >> '{}'\nexec sleep 60\n", pids.display()),
    );
    let timeout_ms = 800;
    let mut c = process_config(1);
    c.supervisor.worker_start_timeout_ms = timeout_ms;
    // Enough restarts (each a timeout of 800 ms) that the device fails seconds after the
    // queued ops' deadlines below, even on a slow machine.
    c.supervisor.max_restarts = 5;
    c.runtime.op_deadline_ms = 1_000;
    let started = Instant::now();
    let rt = tokio::time::timeout(
        Duration::from_secs(30),
        Runtime::builder().config(c).worker(&program).start(),
    )
    .await
    .expect("the first worker's start is given up within its timeout")
    .expect("the runtime starts (its device restarting)");
    let took = started.elapsed();
    assert!(
        // The timeout, the watchdog's ticks and seconds of margin; the worker hangs for 60 s.
        took >= Duration::from_millis(timeout_ms) && took < Duration::from_millis(timeout_ms + 10_000),
        "start took {took:?}"
    );
    let first: u32 = std::fs::read_to_string(&pids)
        .unwrap()
        .lines()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    eventually(T, "the hung worker was killed", || async { !alive(first) }).await;
    // The failed start counts as a restart; meanwhile queued ops are answered by their
    // deadline.
    let gpu = rt.device(0).unwrap();
    let queued: Vec<_> = (0..3)
        .map(|_| {
            let gpu = gpu.clone();
            tokio::spawn(async move { gpu.mem_info().await })
        })
        .collect();
    for q in queued {
        // The deadline (1 s) and seconds of margin: without the watchdog they would wait for
        // a restart that never comes.
        match answered(Duration::from_millis(1_000 + 10_000), q).await.unwrap() {
            Err(RuntimeError::DeadlineExceeded {
                may_have_executed: false,
                ..
            }) => {}
            other => panic!("expected DeadlineExceeded, got {other:?}"),
        }
    }
    // Every start hangs: beyond the restart intensity the device fails.
    eventually(T, "the device failed", || async {
        rt.states()[0] == DeviceState::Failed
    })
    .await;
    match answered(Duration::from_secs(1), gpu.mem_info()).await {
        Err(RuntimeError::DeviceFailed { reason, .. }) => {
            assert!(reason.contains("restart intensity"), "{reason}");
            assert!(reason.contains("worker_start_timeout_ms"), "{reason}");
        }
        other => panic!("expected DeviceFailed, got {other:?}"),
    }
    let all: Vec<u32> = std::fs::read_to_string(&pids)
        .unwrap()
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    assert_eq!(all.len(), 6, "the first start and 5 restarts: {all:?}");
    eventually(T, "every hung worker was killed", || async {
        all.iter().all(|p| !alive(*p))
    })
    .await;
    let s = rt.shutdown().await;
    assert_eq!(s.devices[0].restarts, 5);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A shutdown that ends a restarting device's new worker in its start does not report the
/// device lost: the failed start is the shutdown's doing, not the device's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_ended_in_its_start_by_shutdown_leaves_its_device_restarting_not_lost() {
    // A worker program whose every start but the first waits (in bash itself: no child
    // process holds the worker's pipes) before it becomes the real worker.
    let dir = scratch("slow-restart");
    let program = script(
        &dir,
        "slow-restart-worker",
        &format!(
            "#!/bin/bash\ncd '{dir}'\nif [ -e started ]; then touch waiting; mkfifo fifo; read -t 60 <> fifo; fi\ntouch started\nexec '{worker}' \"$@\"\n",
            dir = dir.display(),
            worker = WORKER,
        ),
    );
    let mut c = process_config(1);
    c.runtime.shutdown_timeout_ms = 200;
    let rt = Runtime::builder()
        .config(c)
        .worker(&program)
        .start()
        .await
        .expect("runtime starts");
    let waiting = dir.join("waiting");
    let (d, _) = crash_and_shut_down_once(rt, "the new worker is in its start", |_| waiting.exists()).await;
    assert_eq!(d.state, DeviceState::Restarting, "{d:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A restart whose time comes while the runtime drains for its shutdown is refused (no new
/// worker is started then); the device stays restarting, not lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_refused_by_a_closing_runtime_leaves_its_device_restarting_not_lost() {
    let mut c = process_config(1);
    // The restart comes 1.5 s after the crash, inside the 3 s drain below.
    c.supervisor.restart_backoff_min_ms = 1_500;
    c.supervisor.restart_backoff_max_ms = 1_500;
    c.runtime.shutdown_timeout_ms = 3_000;
    let rt = start_with_worker(c).await;
    let (d, took) = crash_and_shut_down_once(rt, "the device is restarting", |rt| {
        rt.states()[0] == DeviceState::Restarting
    })
    .await;
    // The shutdown began after the crash was seen and lasted past the backoff: the restart
    // came due while the runtime was closing.
    assert!(took >= Duration::from_millis(1_500), "the shutdown took {took:?}");
    assert_eq!(d.state, DeviceState::Restarting, "{d:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_of_the_executor_outside_the_backend_is_answered_and_restarts_the_device() {
    for isolation in [Isolation::Thread, Isolation::Process] {
        let mut c = process_config(1);
        c.runtime.isolation = isolation;
        let rt = start_with_worker(c).await;
        let gpu = rt.device(0).unwrap();
        gpu.mem_info().await.unwrap();
        let pid = rt.worker_pid(0);
        rt.inject_executor_panic(0).unwrap();
        // The op in flight when the executor panics is answered, not left to its deadline.
        match answered(Duration::from_secs(5), gpu.mem_info()).await {
            Err(RuntimeError::DeviceRestarted {
                device: 0,
                may_have_executed: true,
            }) => {}
            other => panic!("{isolation:?}: expected DeviceRestarted, got {other:?}"),
        }
        eventually(T, "the device restarted", || async {
            rt.states()[0] == DeviceState::Ready && gpu.mem_info().await.is_ok()
        })
        .await;
        if let Some(pid) = pid {
            assert_ne!(rt.worker_pid(0), Some(pid), "a new worker");
            eventually(T, "the old worker is gone", || async { !alive(pid) }).await;
        }
        let s = rt.shutdown().await;
        assert_eq!(s.devices[0].restarts, 1, "{isolation:?}");
        assert_eq!(s.ops_total, s.ops_succeeded + s.ops_failed);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runtime_dropped_without_shutdown_stops_its_workers_and_standbys() {
    let mut c = process_config(2);
    c.supervisor.standby = true;
    let rt = start_with_worker(c).await;
    eventually(T, "standbys are ready", || async {
        rt.standby_pid(0).is_some() && rt.standby_pid(1).is_some()
    })
    .await;
    let gpu = rt.device(1).unwrap();
    gpu.mem_info().await.unwrap();
    let pids: Vec<u32> = (0..2)
        .flat_map(|d| [rt.worker_pid(d).unwrap(), rt.standby_pid(d).unwrap()])
        .collect();
    assert!(pids.iter().all(|p| alive(*p)));
    // An early return, a panic unwinding through the application: no shutdown.
    drop(rt);
    eventually(T, "no worker or standby left", || async {
        pids.iter().all(|p| !alive(*p))
    })
    .await;
    // A handle that outlived its runtime gets a typed answer.
    assert!(matches!(
        answered(T, gpu.mem_info()).await,
        Err(RuntimeError::ShuttingDown)
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_that_fails_half_way_leaves_no_worker_behind() {
    let program = worker_copy("port");
    // The metrics port is taken: the start fails after the workers started.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let result = Runtime::builder()
        .config(process_config(2))
        .worker(&program)
        .serve_metrics(addr)
        .start()
        .await;
    match result {
        Err(hipvisor::StartError::Spawn { what, .. }) => assert!(what.contains("metrics endpoint"), "{what}"),
        Err(other) => panic!("expected the endpoint to fail, got {other}"),
        Ok(_) => panic!("the start succeeded on a port already bound"),
    }
    eventually(T, "no worker of the failed start left", || async {
        processes_of(&program).is_empty()
    })
    .await;
    let _ = std::fs::remove_dir_all(program.parent().unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_op_submitted_around_the_drop_of_a_runtime_is_answered() {
    // Submitters keep submitting on handles that outlive their runtime while it is dropped:
    // ops that passed the closing check before the drop's drain, and were queued after it,
    // are answered too (a dropped runtime has no watchdog left to answer them by their
    // deadline, which is far off anyway). Several rounds, each isolation.
    // (Before the fix, about one round in ten left an op unanswered.)
    for round in 0..16 {
        let isolation = if round % 2 == 0 {
            Isolation::Thread
        } else {
            Isolation::Process
        };
        let mut c = process_config(2);
        c.runtime.isolation = isolation;
        c.runtime.op_deadline_ms = 120_000;
        c.runtime.in_flight = 4;
        let rt = start_with_worker(c).await;
        // Ops answered so far, by every submitter.
        let answered_ops = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let submitters: Vec<_> = (0..8u32)
            .map(|i| {
                let gpu = rt.device(i % 2).unwrap();
                let answered_ops = answered_ops.clone();
                tokio::spawn(async move {
                    let mut ops = 0u64;
                    loop {
                        // A hang here is the defect: the op's deadline is two minutes off.
                        let last = if i % 4 == 3 {
                            let results =
                                answered(T, gpu.submit_batch((0..4).map(|_| hipvisor::core::Op::MemInfo))).await;
                            ops += results.len() as u64;
                            results
                                .into_iter()
                                .find(|r| r.is_err())
                                .unwrap_or(Ok(hipvisor::core::Reply::Done))
                        } else {
                            ops += 1;
                            answered(T, gpu.submit(hipvisor::core::Op::MemInfo)).await
                        };
                        answered_ops.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        match last {
                            Ok(_) => {}
                            Err(RuntimeError::ShuttingDown) => return ops,
                            // A worker killed under its op by the drop.
                            Err(RuntimeError::DeviceRestarted { .. }) => {}
                            Err(other) => panic!("unexpected answer {other:?}"),
                        }
                        tokio::task::yield_now().await;
                    }
                })
            })
            .collect();
        let gpu = rt.device(0).unwrap();
        // The submitters are under way: ops in flight, and a few rounds answered already.
        eventually(T, "ops in flight", || async { gpu.in_flight() > 0 }).await;
        eventually(T, "64 ops answered", || async {
            answered_ops.load(std::sync::atomic::Ordering::Relaxed) >= 64
        })
        .await;
        drop(rt);
        for s in submitters {
            let ops = answered(T, s).await.expect("the submitter does not panic");
            assert!(ops > 0, "round {round}");
        }
        // A handle that outlived its runtime is answered at once.
        assert!(matches!(
            answered(T, gpu.mem_info()).await,
            Err(RuntimeError::ShuttingDown)
        ));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_held_by_an_executor_that_panics_before_running_it_runs_after_the_restart() {
    for isolation in [Isolation::Thread, Isolation::Process] {
        let mut c = process_config(1);
        c.runtime.isolation = isolation;
        let rt = start_with_worker(c).await;
        let gpu = rt.device(0).unwrap();
        gpu.mem_info().await.unwrap();
        rt.inject_executor_panic_holding_a_job(0).unwrap();
        // Taken from the queue, not started when the executor panics: it did not run, so
        // it goes back to the queue (not answered `ShuttingDown`) and runs on the restarted
        // device.
        let answer = answered(T, gpu.mem_info()).await;
        assert!(
            answer.is_ok(),
            "{isolation:?}: expected the mem-info to run, got {answer:?}"
        );
        let s = rt.shutdown().await;
        assert_eq!(s.devices[0].restarts, 1, "{isolation:?}");
        assert_eq!(s.ops_total, s.ops_succeeded + s.ops_failed);
    }
}
