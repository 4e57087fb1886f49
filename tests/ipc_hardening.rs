//! End-to-end: the host never trusts its workers — a malformed answer restarts that worker
//! with a typed answer to its ops, never a panic in the host — and shared memory cannot hurt
//! the host.
//!
//! A misbehaving worker is this test binary re-executed as a **proxy** between the host and
//! a real `hipvisor-worker`: started through a small script (the runtime starts its worker
//! program without arguments) that runs only the test `proxy_worker` with `HV_PROXY_MODE`
//! set, it relays every frame and descriptor, and breaks the answers to the application's
//! ops as its mode says (the runtime's own ops — the health probe — pass untouched, so each
//! new proxy starts like a good worker).

mod common;

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{answered, config, eventually};
use hipvisor::core::Origin;
use hipvisor::core::config::Isolation;
use hipvisor::core::ipc::{self, Channel, FromWorker, Region, ToWorker};
use hipvisor::{DeviceState, ErrorClass, Op, OpKind, Reply, Runtime, RuntimeConfig, RuntimeError};

const T: Duration = Duration::from_secs(30);
const WORKER: &str = env!("CARGO_BIN_EXE_hipvisor-worker");
const MODE: &str = "HV_PROXY_MODE";
/// The kind of op (`memset`, ...) whose answers the proxy breaks; any when unset.
const BREAKS: &str = "HV_PROXY_BREAKS";

fn process_config(devices: u32) -> RuntimeConfig {
    let mut c = config(devices);
    c.runtime.isolation = Isolation::Process;
    c
}

/// A script that starts this test binary as a proxy worker in `mode`, breaking the answers
/// to ops of kind `breaks` (any application op: `None`).
fn proxy_program(mode: &str, breaks: Option<OpKind>) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("hipvisor-hardening-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let exe = std::env::current_exe().unwrap();
    let breaks = breaks.map_or(String::new(), |k| format!("{BREAKS}={k} "));
    let script = format!(
        "#!/bin/sh\n{MODE}={mode} {breaks}exec '{}' --exact proxy_worker --nocapture --test-threads=1 -q\n",
        exe.display()
    );
    common::script(&dir, &format!("proxy-{mode}"), &script)
}

async fn start_with(program: &Path, c: RuntimeConfig) -> Runtime {
    Runtime::builder()
        .config(c)
        .worker(program)
        .start()
        .await
        .expect("runtime starts")
}

// ---------------------------------------------------------------------------------------
// The proxy worker.

/// Not a test of its own: the body of a proxy worker when this binary is started as one
/// (see the module docs); does nothing otherwise.
#[test]
fn proxy_worker() {
    let Ok(mode) = std::env::var(MODE) else {
        return;
    };
    let host = Channel::from_worker_env()
        .expect("started as a worker")
        .expect("the worker socket");
    let (to_worker, worker_end) = Channel::pair().unwrap();
    let mut command = Command::new(WORKER);
    command.env_remove(MODE).env_remove(BREAKS);
    let breaks = std::env::var(BREAKS).ok().and_then(|k| OpKind::from_name(&k));
    let mut child = ipc::spawn_worker(command, worker_end).unwrap();
    Proxy {
        mode,
        breaks,
        host,
        worker: to_worker,
        kept: Vec::new(),
        corrupted_region: false,
        first_module: None,
        first_buffer: None,
    }
    .run();
    let _ = child.kill();
    let _ = child.wait();
    std::process::exit(0);
}

struct Proxy {
    mode: String,
    breaks: Option<OpKind>,
    host: Channel,
    worker: Channel,
    /// Output regions the proxy keeps mapped (mode `keep_mapping`).
    kept: Vec<Region>,
    corrupted_region: bool,
    /// The id of the first module loaded through the proxy (mode `dup_module`).
    first_module: Option<u64>,
    /// The id of the first buffer allocated through the proxy (mode `dup_buffer`).
    first_buffer: Option<u64>,
}

impl Proxy {
    fn run(mut self) {
        loop {
            let Ok((msg, fds)) = self.host.recv::<ToWorker>() else {
                return;
            };
            for region in &mut self.kept {
                // Writes into output regions whose answers went out already.
                region.as_mut_slice().fill(0xee);
            }
            let raw = |fds: &[OwnedFd]| fds.iter().map(|f| f.as_raw_fd()).collect::<Vec<_>>();
            match msg {
                ToWorker::Shutdown => {
                    let _ = self.worker.send(&ToWorker::Shutdown, &[]);
                    return;
                }
                ToWorker::Request(req)
                    if req.origin == Origin::Application && self.breaks.is_none_or(|k| k == req.op.kind()) =>
                {
                    let mut fds = fds;
                    if self.mode == "bad_first_region"
                        && !self.corrupted_region
                        && req.input.is_some_and(|r| r.cached)
                        && !fds.is_empty()
                    {
                        // A descriptor the worker cannot map (not sealed): its mmap fails.
                        let len = req.input.unwrap().len as i64;
                        let bad =
                            nix::sys::memfd::memfd_create(c"bad", nix::sys::memfd::MFdFlags::MFD_CLOEXEC).unwrap();
                        nix::unistd::ftruncate(&bad, len).unwrap();
                        fds = vec![bad];
                        self.corrupted_region = true;
                    }
                    let output = req
                        .output
                        .map(|r| (nix::unistd::dup(fds.last().unwrap().as_fd()).unwrap(), r.len));
                    self.worker.send(&ToWorker::Request(req.clone()), &raw(&fds)).unwrap();
                    let Ok((answer, _)) = self.worker.recv::<FromWorker>() else {
                        return;
                    };
                    if let Some((fd, len)) = output {
                        self.with_output(fd, len as usize);
                    }
                    self.answer(&req.op, answer);
                }
                ToWorker::Batch(reqs) if reqs.iter().all(|r| r.origin == Origin::Application) => {
                    self.worker.send(&ToWorker::Batch(reqs), &raw(&fds)).unwrap();
                    // Mode `malformed_mid_batch`: after the first frame of answers, the rest
                    // of the batch is refused (`Malformed`), and the worker's frames dropped.
                    let mut frames = 0;
                    let mut refused = false;
                    loop {
                        let Ok((answer, _)) = self.worker.recv::<FromWorker>() else {
                            return;
                        };
                        let last = !matches!(answer, FromWorker::Batch { done: false, .. });
                        frames += 1;
                        if self.mode == "malformed_mid_batch" && (refused || frames == 2) {
                            if !refused {
                                let why = "refused mid-batch".to_string();
                                self.host.send(&FromWorker::Malformed(why), &[]).unwrap();
                                refused = true;
                            }
                            if last {
                                break;
                            }
                            continue;
                        }
                        let answer = match answer {
                            FromWorker::Batch { mut results, done } if self.mode == "batch_extra" => {
                                let (id, r) = results.last().cloned().unwrap();
                                results.push((id + 1, r));
                                FromWorker::Batch { results, done }
                            }
                            other => other,
                        };
                        self.host.send(&answer, &[]).unwrap();
                        if last {
                            break;
                        }
                    }
                }
                other => {
                    // The runtime's own traffic (each message is answered), relayed as it is.
                    let batch = matches!(other, ToWorker::Batch(_));
                    self.worker.send(&other, &raw(&fds)).unwrap();
                    loop {
                        let Ok((answer, _)) = self.worker.recv::<FromWorker>() else {
                            return;
                        };
                        let last = !batch || !matches!(answer, FromWorker::Batch { done: false, .. });
                        self.host.send(&answer, &[]).unwrap();
                        if last {
                            break;
                        }
                    }
                }
            }
        }
    }

    /// After the worker answered a request with an output region.
    fn with_output(&mut self, fd: OwnedFd, len: usize) {
        match self.mode.as_str() {
            // A worker that truncates the memory the host maps: refused (sealed), or the
            // host would die of SIGBUS reading it.
            "truncate" => {
                let _ = nix::unistd::ftruncate(&fd, 0);
            }
            // A worker that keeps a writable mapping of what it answered, and writes into
            // it later (before relaying the next request).
            "keep_mapping" => self.kept.push(Region::map(fd, len).unwrap()),
            _ => {}
        }
    }

    /// Relays the worker's answer to an application op, broken as the mode says.
    fn answer(&mut self, op: &Op, answer: FromWorker) {
        let FromWorker::Response { id, result, output_len } = answer else {
            self.host.send(&answer, &[]).unwrap();
            return;
        };
        let (id, result, output_len) = match (self.mode.as_str(), result) {
            ("data_long", Ok(Reply::Data(d))) if output_len.is_none() => {
                let mut longer = d.to_vec();
                longer.push(0);
                (id, Ok(Reply::Data(longer.into())), output_len)
            }
            ("output_len", r) if output_len.is_some() => (id, r, output_len.map(|n| n + 4096)),
            ("wrong_id", r) => (id + 1000, r, output_len),
            ("malformed_always", _) => {
                // Every request of the kind is refused, however well formed.
                let why = "refused by a broken worker".to_string();
                self.host.send(&FromWorker::Malformed(why), &[]).unwrap();
                return;
            }
            ("dup_module", Ok(Reply::Module(m))) => match self.first_module {
                None => {
                    self.first_module = Some(m.id);
                    (id, Ok(Reply::Module(m)), output_len)
                }
                // A new module under the id of the first one.
                Some(first) => (
                    id,
                    Ok(Reply::Module(hipvisor::core::op::ModuleHandle { id: first, ..m })),
                    output_len,
                ),
            },
            ("dup_buffer", Ok(Reply::Buffer(b))) => match self.first_buffer {
                None => {
                    self.first_buffer = Some(b.id);
                    (id, Ok(Reply::Buffer(b)), output_len)
                }
                // A new buffer under the id of the first one, which is still live.
                Some(first) => (
                    id,
                    Ok(Reply::Buffer(hipvisor::BufferHandle { id: first, ..b })),
                    output_len,
                ),
            },
            ("wrong_reply", Ok(_)) => {
                let info = hipvisor::MemInfo { free: 1, total: 2 };
                let reply = if matches!(op, Op::MemInfo) {
                    Reply::Done
                } else {
                    Reply::MemInfo(info)
                };
                (id, Ok(reply), output_len)
            }
            ("garbage", _) => {
                let mut frame = b"HV".to_vec();
                frame.extend_from_slice(&ipc::PROTOCOL_VERSION.to_le_bytes());
                frame.extend_from_slice(&[0xff; 40]);
                self.host.send_frame(&frame, &[]).unwrap();
                return;
            }
            ("empty", _) => {
                // An empty datagram reads as the end of the connection, and the proxy lives
                // on: the host must not wait for it for ever.
                self.host.send_frame(&[], &[]).unwrap();
                return;
            }
            ("descriptor", r) => {
                let region = Region::new(10).unwrap();
                let reply = FromWorker::Response {
                    id,
                    result: r,
                    output_len,
                };
                self.host.send(&reply, &[region.raw_fd()]).unwrap();
                return;
            }
            (_, r) => (id, r, output_len),
        };
        let reply = FromWorker::Response { id, result, output_len };
        self.host.send(&reply, &[]).unwrap();
    }
}

// ---------------------------------------------------------------------------------------
// Malformed answers: a typed answer to the op, a restarted worker, a host that goes on.

/// Starts a runtime on a proxy in `mode`, runs `op` (after allocating a buffer it may use)
/// and checks that the answer is typed, the worker was restarted, and the device serves
/// again.
async fn a_broken_answer_restarts_the_worker(mode: &str, op: impl Fn(hipvisor::BufferHandle) -> Op) {
    let b = hipvisor::BufferHandle {
        device: 0,
        epoch: 0,
        id: 0,
        len: 0,
    };
    let program = proxy_program(mode, Some(op(b).kind()));
    let rt = start_with(&program, process_config(1)).await;
    let gpu = rt.device(0).unwrap();
    let pid = rt.worker_pid(0).unwrap();
    let b = gpu.alloc(1 << 16).await.unwrap_or_else(|e| {
        panic!("{mode}: alloc before the broken answer: {e}");
    });
    match answered(T, gpu.submit(op(b))).await {
        Err(RuntimeError::DeviceRestarted { device: 0, .. }) => {}
        other => panic!("{mode}: a malformed answer is answered DeviceRestarted, got {other:?}"),
    }
    a_new_worker(&rt, pid).await;
    answered(T, gpu.mem_info()).await.expect("the device serves again");
    let s = rt.shutdown().await;
    assert_eq!(s.restarts, 1, "{mode}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inline_data_longer_than_asked_is_malformed() {
    a_broken_answer_restarts_the_worker("data_long", |b| Op::CopyFromDevice {
        src: b,
        offset: 0,
        len: 64,
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_output_length_past_the_region_is_malformed_not_a_host_panic() {
    a_broken_answer_restarts_the_worker("output_len", |b| Op::CopyFromDevice {
        src: b,
        offset: 0,
        len: 1 << 16,
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_to_a_request_not_in_flight_is_malformed() {
    a_broken_answer_restarts_the_worker("wrong_id", |b| Op::Memset {
        buffer: b,
        offset: 0,
        len: 64,
        value: 1,
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_of_another_kind_is_malformed() {
    a_broken_answer_restarts_the_worker("wrong_reply", |b| Op::Memset {
        buffer: b,
        offset: 0,
        len: 64,
        value: 1,
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undecodable_answer_restarts_the_worker() {
    a_broken_answer_restarts_the_worker("garbage", |_| Op::Synchronize).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_closes_its_end_and_lives_on_is_replaced() {
    a_broken_answer_restarts_the_worker("empty", |_| Op::Synchronize).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_with_a_descriptor_is_malformed() {
    a_broken_answer_restarts_the_worker("descriptor", |_| Op::Synchronize).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_answer_with_more_results_than_ops_is_malformed() {
    a_broken_batch_restarts_the_worker("batch_extra", Op::MemInfo).await;
}

/// A batch of 8 `op`s through a proxy in `mode`, which breaks a `Batch` answer: its ops are
/// answered OK or `DeviceRestarted` only (those after the break as by the worker's death),
/// and the worker is replaced. The executor sends what is queued when it looks, so a
/// submitted batch's first op may go alone, unbroken: batches are submitted until one is
/// broken (50 at most).
async fn a_broken_batch_restarts_the_worker(mode: &str, op: Op) {
    let program = proxy_program(mode, None);
    let rt = start_with(&program, process_config(1)).await;
    let gpu = rt.device(0).unwrap();
    let pid = rt.worker_pid(0).unwrap();
    let mut broken = false;
    for _ in 0..50 {
        let answers = answered(T, gpu.submit_batch((0..8).map(|_| op.clone()))).await;
        assert!(
            answers
                .iter()
                .all(|r| r.is_ok() || matches!(r, Err(RuntimeError::DeviceRestarted { .. }))),
            "{mode}: {answers:?}"
        );
        if answers.iter().any(|r| r.is_err()) {
            broken = true;
            break;
        }
    }
    assert!(broken, "{mode}: no batch answer was broken in 50 batches of 8");
    a_new_worker(&rt, pid).await;
    assert!(rt.shutdown().await.restarts >= 1);
}

/// Waits (up to `T`) until device 0 is ready on a worker other than `pid`.
async fn a_new_worker(rt: &Runtime, pid: u32) {
    eventually(T, "a new worker", || async {
        rt.states()[0] == DeviceState::Ready && rt.worker_pid(0).is_some_and(|p| p != pid)
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// Shared memory.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_cannot_truncate_memory_the_host_maps() {
    // Before regions were sealed, the host died of SIGBUS reading this copy.
    let program = proxy_program("truncate", None);
    let rt = start_with(&program, process_config(1)).await;
    let gpu = rt.device(0).unwrap();
    let b = gpu.alloc(1 << 20).await.unwrap();
    gpu.memset(b, 0, 1 << 20, 5).await.unwrap();
    let data = answered(T, gpu.copy_from_device(b, 0, 1 << 20)).await.unwrap();
    assert!(data.as_bytes().iter().all(|x| *x == 5));
    assert_eq!(rt.shutdown().await.restarts, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payload_handed_to_the_application_cannot_be_changed_by_the_worker() {
    let program = proxy_program("keep_mapping", None);
    let rt = start_with(&program, process_config(1)).await;
    let gpu = rt.device(0).unwrap();
    let b = gpu.alloc(1 << 20).await.unwrap();
    gpu.memset(b, 0, 1 << 20, 5).await.unwrap();
    let data = answered(T, gpu.copy_from_device(b, 0, 1 << 20)).await.unwrap();
    assert!(data.as_bytes().iter().all(|x| *x == 5));
    // The proxy writes into the region it kept before it relays the next request.
    gpu.mem_info().await.unwrap();
    assert!(
        data.as_bytes().iter().all(|x| *x == 5),
        "the worker's later writes do not reach the application's bytes"
    );
    assert_eq!(rt.shutdown().await.restarts, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_result_is_read_only_shared_memory_and_can_be_sent_back() {
    let mut c = process_config(1);
    c.sim.memory_bytes = 16 << 20;
    let rt = start_with(Path::new(WORKER), c).await;
    let gpu = rt.device(0).unwrap();
    let n = 1u64 << 20;
    let (a, b) = (gpu.alloc(n).await.unwrap(), gpu.alloc(n).await.unwrap());
    gpu.memset(a, 0, n, 4).await.unwrap();
    let data = gpu.copy_from_device(a, 0, n).await.unwrap();
    let region = data.region().expect("a large result comes back in shared memory");
    assert!(!region.has_descriptor(), "sealed: no descriptor kept per payload");
    gpu.copy_to_device(b, 0, data.clone()).await.unwrap();
    let back = gpu.copy_from_device(b, 0, n).await.unwrap();
    assert!(back.as_bytes().iter().all(|x| *x == 4));
    assert_eq!(rt.shutdown().await.restarts, 0);
}

// ---------------------------------------------------------------------------------------
// The worker's cache of host buffers.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_buffer_the_worker_could_not_map_is_sent_again() {
    let program = proxy_program("bad_first_region", None);
    let rt = start_with(&program, process_config(1)).await;
    let gpu = rt.device(0).unwrap();
    let b = gpu.alloc(1 << 20).await.unwrap();
    let mut host = gpu.host_buffer(1 << 20).unwrap();
    host.as_mut_slice().fill(6);
    let payload = host.freeze();
    let first = answered(T, gpu.copy_to_device(b, 0, payload.clone())).await;
    assert!(
        matches!(&first, Err(RuntimeError::Gpu(e)) if e.class() == ErrorClass::InvalidRequest),
        "the worker could not map it: {first:?}"
    );
    answered(T, gpu.copy_to_device(b, 0, payload.clone()))
        .await
        .expect("the descriptor is sent again and mapped");
    answered(T, gpu.copy_to_device(b, 0, payload))
        .await
        .expect("cached now");
    let back = gpu.copy_from_device(b, 0, 1 << 20).await.unwrap();
    assert!(back.as_bytes().iter().all(|x| *x == 6));
    assert_eq!(rt.shutdown().await.restarts, 0);
}

// ---------------------------------------------------------------------------------------
// A worker's refusals and ids are not believed blindly.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_refuses_every_valid_request_is_replaced() {
    let program = proxy_program("malformed_always", Some(OpKind::Memset));
    let rt = start_with(&program, process_config(1)).await;
    let gpu = rt.device(0).unwrap();
    let pid = rt.worker_pid(0).unwrap();
    let b = gpu.alloc(1 << 16).await.unwrap();
    // A few refusals are invalid requests; then the worker is taken for broken: the op that
    // tripped it is answered as by its death.
    let mut restarted = false;
    for i in 0..10 {
        match answered(T, gpu.memset(b, 0, 64, 1)).await {
            Err(RuntimeError::Gpu(e)) if e.class() == ErrorClass::InvalidRequest => {}
            Err(RuntimeError::DeviceRestarted { device: 0, .. }) => {
                assert!(i >= 1, "one refusal alone is an invalid request");
                restarted = true;
                break;
            }
            other => panic!("memset {i}: {other:?}"),
        }
    }
    assert!(
        restarted,
        "10 refusals of valid requests in a row, and the worker was kept"
    );
    a_new_worker(&rt, pid).await;
    // The new worker (refusing memsets too) serves the other ops.
    let b = answered(T, gpu.alloc(1 << 16)).await.expect("alloc on the new worker");
    answered(T, gpu.copy_from_device(b, 0, 64))
        .await
        .expect("a copy on the new worker");
    answered(T, gpu.mem_info()).await.expect("the device serves again");
    assert_eq!(rt.shutdown().await.restarts, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_refused_after_answers_is_malformed() {
    // Synchronizations may wait: the worker sends the answers so far before each, so a batch
    // of them is answered in several frames, and the proxy refuses it after the first.
    a_broken_batch_restarts_the_worker("malformed_mid_batch", Op::Synchronize).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_buffer_id_already_live_is_malformed() {
    let program = proxy_program("dup_buffer", Some(OpKind::Alloc));
    let rt = start_with(&program, process_config(1)).await;
    let gpu = rt.device(0).unwrap();
    let pid = rt.worker_pid(0).unwrap();
    answered(T, gpu.alloc(64)).await.unwrap();
    // The proxy answers the second alloc with the first buffer's id.
    match answered(T, gpu.alloc(128)).await {
        Err(RuntimeError::DeviceRestarted { device: 0, .. }) => {}
        other => panic!("a buffer id already live is answered as by the worker's death, got {other:?}"),
    }
    a_new_worker(&rt, pid).await;
    assert_eq!(rt.shutdown().await.restarts, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_module_id_already_in_use_is_malformed_and_the_first_module_is_kept() {
    use hipvisor::core::kernels::{BuiltinKernel, sim_module_image};
    use hipvisor::core::op::{KernelArg, ModuleSource};
    let program = proxy_program("dup_module", Some(OpKind::LoadModule));
    let rt = start_with(&program, process_config(1)).await;
    let gpu = rt.device(0).unwrap();
    let pid = rt.worker_pid(0).unwrap();
    let image = |k: &[BuiltinKernel]| ModuleSource::Image(sim_module_image(k).into());
    let a = answered(T, gpu.load_module(image(&[BuiltinKernel::Fill])))
        .await
        .unwrap();
    // The proxy answers B's load with A's id.
    match answered(T, gpu.load_module(image(&[BuiltinKernel::Scale]))).await {
        Err(RuntimeError::DeviceRestarted { device: 0, .. }) => {}
        other => panic!("a module id already in use is answered as by the worker's death, got {other:?}"),
    }
    a_new_worker(&rt, pid).await;
    // A's source was restored under A's id: its kernel runs, B's is not in it.
    let b = answered(T, gpu.alloc(64)).await.unwrap();
    let fill = |m| {
        gpu.launch(
            m,
            "fill",
            1,
            16,
            vec![KernelArg::Buffer(b), KernelArg::U32(7), KernelArg::U32(16)],
        )
    };
    answered(T, fill(a)).await.expect("module A's kernel after the restart");
    let data = answered(T, gpu.copy_from_device(b, 0, 64)).await.unwrap();
    assert!(
        data.as_bytes().chunks(4).all(|w| w == 7u32.to_ne_bytes()),
        "{:?}",
        data.as_bytes()
    );
    let scale = gpu.launch(
        a,
        "scale",
        1,
        16,
        vec![KernelArg::Buffer(b), KernelArg::F32(2.0), KernelArg::U32(16)],
    );
    assert!(answered(T, scale).await.is_err(), "module A has no `scale`");
    assert_eq!(rt.shutdown().await.restarts, 1);
}
