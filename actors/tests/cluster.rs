//! Beyond one machine (feature `cluster`), with real processes on loopback: `hipvisor node`s
//! serve their devices, an application joins them, uses every device, is refused with a
//! wrong cookie, and gets `NodeLost` — not a hang — from a node that was killed; tasks are
//! placed on every node and move to another when theirs is killed or frozen; `hipvisor run
//! --join` survives a node's SIGKILL and uses it again once restarted.
#![cfg(feature = "cluster")]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hipvisor::cluster::Cluster;
use hipvisor::core::kernels::u32s;
use hipvisor::{KernelArg, ModuleSource, Op, Reply, RuntimeError};

const DEADLINE: Duration = Duration::from_secs(10);

/// Requests get 10 s; heartbeats every 200 ms, a node silent for 6 s is lost (generous: a
/// loaded 2-core CI machine must not lose a node that is merely slow).
fn config() -> hipvisor::RuntimeConfig {
    let mut c = hipvisor::RuntimeConfig::default();
    c.runtime.op_deadline_ms = DEADLINE.as_millis() as u64;
    c.cluster.heartbeat_interval_ms = 200;
    c.cluster.heartbeat_timeout_ms = 6000;
    c
}

/// The heartbeat timeout of `hipvisor run --join` in these tests (see [`config`]).
const RUNNER_HEARTBEAT: (&str, &str) = ("HIPVISOR_CLUSTER__HEARTBEAT_TIMEOUT_MS", "10000");

/// A `hipvisor run` child: killed if the test ends first.
struct Runner(Option<Child>);

impl Runner {
    fn start(args: &[&str], cookie: &std::path::Path) -> Runner {
        let child = Command::new(env!("CARGO_BIN_EXE_hipvisor"))
            .args(args)
            .arg("--cookie-file")
            .arg(cookie)
            .env(RUNNER_HEARTBEAT.0, RUNNER_HEARTBEAT.1)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("hipvisor run starts");
        Runner(Some(child))
    }

    fn pid(&self) -> nix::unistd::Pid {
        nix::unistd::Pid::from_raw(self.0.as_ref().unwrap().id() as i32)
    }

    /// Its exit status and JSON report, within 3 minutes.
    async fn finish(mut self) -> (Option<i32>, serde_json::Value) {
        use std::io::Read;
        let deadline = Instant::now() + Duration::from_secs(180);
        let child = self.0.as_mut().unwrap();
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            assert!(Instant::now() < deadline, "the run ends within 3 minutes");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let mut out = String::new();
        child.stdout.take().unwrap().read_to_string(&mut out).unwrap();
        self.0 = None;
        (status.code(), serde_json::from_str(&out).expect("a JSON report"))
    }
}

impl Drop for Runner {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// One test at a time: a process joins one cluster at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A `hipvisor node` on a free loopback port, its cookie in a file; waits for its
/// `listening on` line.
struct Node {
    child: Child,
    addr: SocketAddr,
    /// Its metrics endpoint, when started with `--metrics-addr`.
    metrics: Option<SocketAddr>,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn cookie_file(name: &str, cookie: &str) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("hipvisor-{}-{name}.cookie", std::process::id()));
    std::fs::write(&path, format!("{cookie}\n")).unwrap();
    path
}

fn node(cookie: &std::path::Path, devices: u32) -> Node {
    node_with(cookie, devices, &[])
}

fn node_with(cookie: &std::path::Path, devices: u32, extra: &[&str]) -> Node {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    node_on(port, cookie, devices, extra)
}

fn node_on(port: u16, cookie: &std::path::Path, devices: u32, extra: &[&str]) -> Node {
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_hipvisor"))
        .args(["node", "--listen", &addr.to_string(), "--cookie-file"])
        .arg(cookie)
        .args(["--devices", &devices.to_string(), "--isolation", "thread"])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("hipvisor node starts");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut metrics = None;
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(addr) = line.strip_prefix("metrics on ") {
                metrics = addr.parse::<SocketAddr>().ok();
            }
            if line.starts_with("listening on") {
                let _ = tx.send(metrics);
            }
        }
    });
    let metrics = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the node says `listening on` within 30 s");
    Node { child, addr, metrics }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_application_uses_every_device_of_two_nodes() {
    let _one = SERIAL.lock().await;
    let cookie = cookie_file("two", "s3cret");
    let (a, b) = (node(&cookie, 2), node(&cookie, 1));
    let cluster = Cluster::join(&[a.addr, b.addr], "s3cret\n", &config())
        .await
        .expect("joins both nodes");
    let devices = cluster.devices().await;
    assert_eq!(devices.len(), 3, "two devices of one node, one of the other");
    let nodes: std::collections::BTreeSet<&str> = devices.iter().map(|d| d.node()).collect();
    assert_eq!(nodes.len(), 2);
    for (i, gpu) in devices.iter().enumerate() {
        let value = 7 + i as u32;
        let Reply::Module(m) = gpu
            .submit(Op::LoadModule {
                source: ModuleSource::Builtin,
            })
            .await
            .unwrap()
        else {
            panic!("a module")
        };
        let Reply::Buffer(b) = gpu.submit(Op::Alloc { bytes: 64 }).await.unwrap() else {
            panic!("a buffer")
        };
        let fill = Op::Launch {
            module: m,
            function: "fill".into(),
            grid: hipvisor::Dim3::x(1),
            block: hipvisor::Dim3::x(16),
            shared_mem_bytes: 0,
            args: vec![KernelArg::Buffer(b), KernelArg::U32(value), KernelArg::U32(16)],
        };
        gpu.submit(fill).await.unwrap();
        let Reply::Data(d) = gpu
            .submit(Op::CopyFromDevice {
                src: b,
                offset: 0,
                len: 64,
            })
            .await
            .unwrap()
        else {
            panic!("data")
        };
        assert_eq!(
            u32s(d.as_bytes()),
            vec![value; 16],
            "{} device {}",
            gpu.node(),
            gpu.index()
        );
        // Typed errors cross too.
        let e = gpu.submit(Op::Alloc { bytes: 0 }).await.unwrap_err();
        assert_eq!(e.class(), Some(hipvisor::ErrorClass::InvalidRequest), "{e}");
    }
    // 64 MiB to a remote device and back, in chunks under the transport's frame.
    let len = 64 << 20;
    let data: Vec<u8> = (0..len).map(|i| (i as u32).wrapping_mul(2_654_435_761) as u8).collect();
    let Reply::Buffer(big) = devices[0].submit(Op::Alloc { bytes: len as u64 }).await.unwrap() else {
        panic!("a buffer")
    };
    let started = Instant::now();
    devices[0]
        .submit(Op::CopyToDevice {
            dst: big,
            offset: 0,
            data: data.clone().into(),
        })
        .await
        .unwrap();
    let up = started.elapsed();
    let started = Instant::now();
    let Reply::Data(back) = devices[0]
        .submit(Op::CopyFromDevice {
            src: big,
            offset: 0,
            len: len as u64,
        })
        .await
        .unwrap()
    else {
        panic!("data")
    };
    let down = started.elapsed();
    assert!(back.as_bytes() == data.as_slice(), "64 MiB round trip, byte for byte");
    println!(
        "64 MiB to a remote device {:.0} MB/s, back {:.0} MB/s",
        len as f64 / up.as_secs_f64() / 1e6,
        len as f64 / down.as_secs_f64() / 1e6
    );
    // What a remote op costs here (printed, not asserted: a shared machine is noisy).
    let started = Instant::now();
    for _ in 0..500 {
        devices[0].submit(Op::MemInfo).await.unwrap();
    }
    println!(
        "remote mem-info, one caller, loopback: {:.0} µs per op",
        started.elapsed().as_secs_f64() * 1e6 / 500.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_cookie_is_refused() {
    let _one = SERIAL.lock().await;
    let right = cookie_file("right", "right-cookie");
    let n = node(&right, 1);
    let refused = Cluster::join(&[n.addr], "wrong-cookie", &config()).await;
    match refused {
        Err(RuntimeError::Remote { node, reason }) => {
            assert_eq!(node, n.addr.to_string());
            assert!(reason.contains("wrong cookie"), "{reason}");
        }
        Err(other) => panic!("expected Remote, got {other}"),
        Ok(_) => panic!("joined with a wrong cookie"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_with_a_request_in_flight_answers_it_node_lost_at_once() {
    let _one = SERIAL.lock().await;
    let cookie = cookie_file("kill", "k");
    // The node's simulator hangs its second mem-info for 20 s: a request in flight.
    let config = std::env::temp_dir().join(format!("hipvisor-{}-hang.toml", std::process::id()));
    std::fs::write(
        &config,
        "[sim]\n[[sim.faults]]\nop = \"mem_info\"\nnth = 2\nhang_ms = 20000\n",
    )
    .unwrap();
    let mut n = node_with(&cookie, 1, &["--config", config.to_str().unwrap()]);
    // Heartbeats that never time out within the test: only the closed session can answer.
    let mut c = config_for_kill();
    c.cluster.heartbeat_timeout_ms = 600_000;
    let cluster = Cluster::join(&[n.addr], "k", &c).await.unwrap();
    let gpu = cluster.devices().await.pop().expect("one device");
    gpu.submit(Op::MemInfo).await.expect("served while alive");
    // Polled once, the request is sent (in the session, or already hanging on the node) and
    // not answered: outstanding when the node dies.
    let mut in_flight = Box::pin(gpu.submit(Op::MemInfo));
    assert!(
        tokio::time::timeout(Duration::ZERO, &mut in_flight).await.is_err(),
        "sent, not answered yet"
    );
    n.child.kill().unwrap();
    n.child.wait().unwrap();
    let started = Instant::now();
    match in_flight.await {
        Err(RuntimeError::NodeLost {
            node,
            may_have_executed,
        }) => {
            assert_eq!(node, gpu.node());
            assert!(may_have_executed, "it was in flight");
        }
        other => panic!("expected NodeLost, got {other:?}"),
    }
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "answered when the session closed, not at the 60 s deadline or the 600 s heartbeat timeout: {:?}",
        started.elapsed()
    );
    // Lost for good: a later request answers at once, and did not run.
    match gpu.submit(Op::MemInfo).await {
        Err(RuntimeError::NodeLost { .. }) => {}
        other => panic!("expected NodeLost, got {other:?}"),
    }
}

/// A request deadline well beyond the hang, so only the kill can answer it.
fn config_for_kill() -> hipvisor::RuntimeConfig {
    let mut c = config();
    c.runtime.op_deadline_ms = 60_000;
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_node_is_detected_within_the_heartbeat_timeout() {
    let _one = SERIAL.lock().await;
    let cookie = cookie_file("frozen", "f");
    let n = node(&cookie, 1);
    // A request deadline far beyond the heartbeat timeout: only the heartbeats answer it.
    let cluster = Cluster::join(&[n.addr], "f", &config_for_kill()).await.unwrap();
    let gpu = cluster.devices().await.pop().expect("one device");
    gpu.submit(Op::MemInfo).await.expect("served while running");
    let pid = freeze(&n);
    let started = Instant::now();
    // The process is alive (its socket open) but answers nothing: only the heartbeats tell.
    match gpu.submit(Op::MemInfo).await {
        Err(RuntimeError::NodeLost { .. }) => {}
        other => panic!("expected NodeLost, got {other:?} after {:?}", started.elapsed()),
    }
    let waited = started.elapsed();
    assert!(
        waited < Duration::from_secs(30),
        "by the 6 s heartbeat timeout, not the 60 s deadline: {waited:?}"
    );
    // Lost for good: later requests answer at once.
    assert!(matches!(
        gpu.submit(Op::MemInfo).await,
        Err(RuntimeError::NodeLost {
            may_have_executed: false,
            ..
        })
    ));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();
}

/// Polls the cluster's devices until one of a node other than `not` (`None`: any) answers.
async fn serving_again(cluster: &Cluster, not: Option<&str>) -> hipvisor::cluster::RemoteDevice {
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        for gpu in cluster.devices().await {
            if Some(gpu.node()) != not && gpu.submit(Op::MemInfo).await.is_ok() {
                return gpu;
            }
        }
        assert!(Instant::now() < until, "no node served again within 30 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_restarted_on_its_address_is_rejoined_and_serves_again() {
    let _one = SERIAL.lock().await;
    let cookie = cookie_file("restart", "r");
    let mut first = node(&cookie, 1);
    let port = first.addr.port();
    let cluster = Cluster::join(&[first.addr], "r", &config()).await.unwrap();
    let gpu = cluster.devices().await.pop().expect("one device");
    gpu.submit(Op::MemInfo).await.unwrap();
    first.child.kill().unwrap();
    first.child.wait().unwrap();
    assert!(matches!(
        gpu.submit(Op::MemInfo).await,
        Err(RuntimeError::NodeLost { .. })
    ));
    // The same address, a new process (a new node name): the cluster dials it again.
    let _second = node_on(port, &cookie, 1, &[]);
    let again = serving_again(&cluster, Some(gpu.node())).await;
    assert_ne!(again.node(), gpu.node(), "a new node");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_node_that_resumes_serves_again() {
    let _one = SERIAL.lock().await;
    let cookie = cookie_file("resume", "z");
    let n = node(&cookie, 1);
    let cluster = Cluster::join(&[n.addr], "z", &config()).await.unwrap();
    let gpu = cluster.devices().await.pop().expect("one device");
    let pid = freeze(&n);
    match gpu.submit(Op::MemInfo).await {
        Err(RuntimeError::NodeLost { .. }) => {}
        other => panic!("expected NodeLost, got {other:?}"),
    }
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();
    let again = serving_again(&cluster, None).await;
    assert_eq!(again.node(), gpu.node(), "the same node, rejoined");
    // The device found before the freeze follows its node back.
    gpu.submit(Op::MemInfo).await.expect("the old handle serves again");
    assert_eq!(gpu.state(), hipvisor::DeviceState::Ready);
}

/// A small layer, `y = W·x + b`, replicated on every device of the cluster.
struct Model {
    w: hipvisor::ReplicatedBuffer,
    b: hipvisor::ReplicatedBuffer,
    kernels: hipvisor::ReplicatedModule,
    weights: Vec<f32>,
    bias: Vec<f32>,
}

const ROWS: usize = 16;
const COLS: usize = 32;

impl Model {
    async fn load(cluster: &Cluster) -> Model {
        use hipvisor::core::kernels::f32_bytes;
        let weights: Vec<f32> = (0..ROWS * COLS).map(|i| ((i % 13) as f32 - 6.0) / 8.0).collect();
        let bias: Vec<f32> = (0..ROWS).map(|i| i as f32 / 4.0).collect();
        Model {
            w: cluster.replicate(f32_bytes(&weights)).await.expect("replicated"),
            b: cluster.replicate(f32_bytes(&bias)).await.expect("replicated"),
            kernels: cluster.replicate_module(ModuleSource::Builtin).await.expect("loaded"),
            weights,
            bias,
        }
    }

    fn task(&self, x: &[f32]) -> hipvisor::Task {
        use hipvisor::TaskArg;
        let mut t = hipvisor::Task::new();
        let xs = t.scratch(4 * COLS as u64);
        let ys = t.scratch(4 * ROWS as u64);
        t.copy_in(xs, 0, hipvisor::core::kernels::f32_bytes(x));
        t.launch(
            &self.kernels,
            "gemv",
            1,
            ROWS as u32,
            [
                TaskArg::durable(&self.w),
                xs.into(),
                TaskArg::durable(&self.b),
                ys.into(),
                TaskArg::value(KernelArg::U32(ROWS as u32)),
                TaskArg::value(KernelArg::U32(COLS as u32)),
            ],
        );
        t.copy_out(ys, 0, 4 * ROWS as u64);
        t
    }

    fn is_answer(&self, x: &[f32], out: &[hipvisor::Payload]) -> bool {
        let want = hipvisor::core::kernels::reference::gemv(&self.weights, x, &self.bias, ROWS, COLS);
        let got = hipvisor::core::kernels::f32s(out[0].as_bytes());
        got.iter().map(|v| v.to_bits()).eq(want.iter().map(|v| v.to_bits()))
    }
}

/// Polls `what` until it holds, for 60 s at most.
async fn until(what: &str, cond: impl FnMut() -> bool) {
    within(what, 60, cond).await
}

/// Polls `cond` until it holds, failing the test after `secs` seconds.
async fn within(what: &str, secs: u64, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !cond() {
        assert!(Instant::now() < deadline, "{what}: not within {secs} s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tasks_run_on_every_node_and_move_when_theirs_is_killed_or_frozen() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let _one = SERIAL.lock().await;
    let cookie = cookie_file("tasks", "t");
    let (mut a, b, c) = (node(&cookie, 1), node(&cookie, 1), node(&cookie, 1));
    let cluster = Arc::new(Cluster::join(&[a.addr, b.addr, c.addr], "t", &config()).await.unwrap());
    let model = Arc::new(Model::load(&cluster).await);
    let devices = cluster.devices().await;
    assert_eq!(devices.len(), 3);
    assert!(
        devices
            .iter()
            .all(|d| d.replica(&model.w).is_some() && d.replica(&model.b).is_some()),
        "a replica on every node's device"
    );
    let (served, stop) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicBool::new(false)));
    let mut workers = Vec::new();
    for i in 0..6u32 {
        let (cluster, model, served, stop) = (cluster.clone(), model.clone(), served.clone(), stop.clone());
        workers.push(tokio::spawn(async move {
            let mut failures = Vec::new();
            let mut n = 0u32;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let x: Vec<f32> = (0..COLS).map(|j| ((i * 31 + n + j as u32) % 17) as f32 / 8.0).collect();
                match cluster.run(&model.task(&x)).await {
                    Ok(out) if model.is_answer(&x, &out) => {
                        served.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(_) => failures.push("a wrong answer".to_string()),
                    Err(e) => failures.push(e.to_string()),
                }
            }
            failures
        }));
    }
    until("300 tasks served", || served.load(Ordering::Relaxed) >= 300).await;
    a.child.kill().unwrap();
    a.child.wait().unwrap();
    until("300 more tasks served", || served.load(Ordering::Relaxed) >= 600).await;
    let b_pid = freeze(&b);
    until("300 more tasks served", || served.load(Ordering::Relaxed) >= 900).await;
    // The frozen node is lost by its heartbeats; what it held moved on.
    within("the frozen node is lost", 30, || {
        cluster.nodes().iter().filter(|n| !n.live).count() >= 2
    })
    .await;
    let at = served.load(Ordering::Relaxed);
    until("tasks served after the freeze was detected", || {
        served.load(Ordering::Relaxed) >= at + 100
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        let failures = w.await.unwrap();
        assert!(failures.is_empty(), "every task answered right: {failures:?}");
    }
    let report = cluster.report().await;
    assert_eq!(report.len(), 3);
    for n in &report {
        assert!(n.tally.answered > 0, "{} ran tasks: {n:?}", n.node);
    }
    let live: Vec<_> = report.iter().filter(|n| n.live).collect();
    assert_eq!(live.len(), 1, "{report:?}");
    assert!(live[0].counts.is_some(), "the live node's counts");
    assert_eq!(
        live[0].consistent(),
        Some(true),
        "the live node counted what it answered this application: {:?}",
        live[0]
    );
    assert!(
        cluster.task_reruns() >= 1,
        "tasks in flight on the killed or frozen node ran again elsewhere"
    );
    nix::sys::signal::kill(b_pid, nix::sys::signal::Signal::SIGCONT).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_larger_than_a_frame_reaches_every_node_and_forged_ids_are_refused() {
    let _one = SERIAL.lock().await;
    let cookie = cookie_file("replica", "p");
    let (a, b) = (node(&cookie, 1), node(&cookie, 2));
    let cluster = Cluster::join(&[a.addr, b.addr], "p", &config()).await.unwrap();
    let len = 12 << 20;
    let data: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
    let r = cluster.replicate(data.clone()).await.expect("replicated");
    let devices = cluster.devices().await;
    assert_eq!(devices.len(), 3);
    for gpu in devices {
        let h = gpu.replica(&r).expect("a replica here");
        assert_eq!((h.device, h.len), (gpu.index(), len as u64));
        let back = gpu.copy_from_device(h, 0, len as u64).await.expect("read back");
        assert!(
            back.as_bytes() == data.as_slice(),
            "{} device {}",
            gpu.node(),
            gpu.index()
        );
    }
    // Durable buffers are made by replicate and durable, not by a submitted op (refused
    // here; the node's own check of a peer's ids is unit-tested in cluster/server.rs).
    let gpu = cluster.devices().await.pop().unwrap();
    let forged = Op::Durable {
        id: hipvisor::core::DURABLE_ID_BASE + 1,
        data: vec![1u8; 8].into(),
    };
    let refused = gpu.submit(forged).await.unwrap_err();
    assert_eq!(refused.label(), "invalid_request", "{refused}");
}

/// `GET path` of an HTTP endpoint, its body as JSON.
fn get_json(addr: SocketAddr, path: &str) -> Option<serde_json::Value> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    serde_json::from_str(text.split("\r\n\r\n").nth(1)?).ok()
}

/// Ops a node's runtime answered, by its metrics endpoint.
fn node_ops(n: &Node) -> u64 {
    n.metrics
        .and_then(|m| get_json(m, "/api/snapshot"))
        .and_then(|s| s["ops_total"].as_u64())
        .unwrap_or(0)
}

/// Three nodes serving their metrics (the second with `b_devices` devices), and `hipvisor run
/// --join` of `ops` inference requests on them.
fn three_nodes_running(name: &str, b_devices: u32, ops: &str) -> (std::path::PathBuf, [Node; 3], Runner) {
    let cookie = cookie_file(name, name);
    let metrics = ["--metrics-addr", "127.0.0.1:0"];
    let nodes = [
        node_with(&cookie, 1, &metrics),
        node_with(&cookie, b_devices, &metrics),
        node_with(&cookie, 1, &metrics),
    ];
    let join = format!("{},{},{}", nodes[0].addr, nodes[1].addr, nodes[2].addr);
    let args = [
        "run",
        "--join",
        &join,
        "--workload",
        "inference",
        "--ops",
        ops,
        "--json",
    ];
    let runner = Runner::start(&args, &cookie);
    (cookie, nodes, runner)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_join_uses_three_nodes_survives_a_sigkill_and_uses_the_node_restarted() {
    let _one = SERIAL.lock().await;
    let (cookie, [a, mut b, c], runner) = three_nodes_running("run", 2, "100000000");
    let metrics = ["--metrics-addr", "127.0.0.1:0"];
    let b_port = b.addr.port();
    until("every node serves the run", || {
        [&a, &b, &c].iter().all(|n| node_ops(n) > 50)
    })
    .await;
    b.child.kill().unwrap();
    b.child.wait().unwrap();
    let at = node_ops(&a) + node_ops(&c);
    until("the run goes on after the kill", || {
        node_ops(&a) + node_ops(&c) > at + 500
    })
    .await;
    // The same address, a new process: dialled again, given the model's replicas, and then
    // requests.
    let again = node_on(b_port, &cookie, 2, &metrics);
    until("the restarted node serves the run", || node_ops(&again) > 50).await;
    nix::sys::signal::kill(runner.pid(), nix::sys::signal::Signal::SIGINT).unwrap();
    let (code, report) = runner.finish().await;
    assert_eq!(code, Some(130), "interrupted by SIGINT: {report}");
    assert_eq!(report["ops"]["missing_replies"], 0, "{report}");
    assert_eq!(report["ops"]["wrong_results"], 0, "{report}");
    assert_eq!(report["metrics_consistent"], true, "{report}");
    assert_eq!(
        report["app_visible_failures"], 0,
        "tasks moved off the killed node: {report}"
    );
    let nodes = report["nodes"].as_array().expect("nodes");
    let dead: Vec<_> = nodes.iter().filter(|n| n["live"] == false).collect();
    assert_eq!(dead.len(), 1, "the killed node, reported: {report}");
    assert!(dead[0]["ops"].as_u64().unwrap() > 0);
    assert_eq!(dead[0]["checked"], false, "its counts are excluded");
    let live: Vec<_> = nodes.iter().filter(|n| n["live"] == true).collect();
    assert_eq!(live.len(), 3, "two nodes and the restarted one: {report}");
    assert!(
        live.iter()
            .all(|n| n["ops"].as_u64().unwrap() > 0 && n["checked"] == true),
        "{report}"
    );
    assert!(
        live.iter().any(|n| n["addr"] == dead[0]["addr"]),
        "the restarted node, on the dead one's address: {report}"
    );
}

/// SIGSTOPs `n` and returns its pid once every thread of it has stopped: kill(2) only
/// queues the signal, and until the group stop is complete the node may still serve a
/// request sent after it. (`WUNTRACED` reports the stop without reaping the child.)
fn freeze(n: &Node) -> nix::unistd::Pid {
    use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
    let pid = nix::unistd::Pid::from_raw(n.child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    match waitpid(pid, Some(WaitPidFlag::WUNTRACED)) {
        Ok(WaitStatus::Stopped(_, nix::sys::signal::Signal::SIGSTOP)) => pid,
        other => panic!("the node stops: {other:?}"),
    }
}

/// [`freeze`]s `n` and waits (30 s at most) until `cluster` has lost a node; its pid.
async fn freeze_until_lost(cluster: &Cluster, n: &Node) -> nix::unistd::Pid {
    let pid = freeze(n);
    within("the frozen node is lost", 30, || {
        !cluster.nodes().iter().all(|n| n.live)
    })
    .await;
    pid
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_node_nobody_waits_on_is_lost_and_serves_at_once_when_back() {
    let _one = SERIAL.lock().await;
    let cookie = cookie_file("stale", "s");
    let (a, b) = (node(&cookie, 1), node(&cookie, 1));
    let cluster = Cluster::join(&[a.addr, b.addr], "s", &config()).await.unwrap();
    let pid = freeze_until_lost(&cluster, &b).await;
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();
    within("the node is back", 30, || cluster.nodes().iter().all(|n| n.live)).await;
    // At once: every op placed on a live node is answered by it.
    for _ in 0..300 {
        let gpu = cluster.any().expect("a live device");
        let answer = gpu.submit(Op::MemInfo).await;
        assert!(answer.is_ok(), "{} device {}: {answer:?}", gpu.node(), gpu.index());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_too_large_for_a_frame_is_refused_before_it_is_sent_and_no_node_is_lost() {
    let _one = SERIAL.lock().await;
    let cookie = cookie_file("large", "l");
    let (a, b) = (node(&cookie, 1), node(&cookie, 1));
    let cluster = Cluster::join(&[a.addr, b.addr], "l", &config()).await.unwrap();
    let kernels = cluster.replicate_module(ModuleSource::Builtin).await.unwrap();
    // A task with 20 MiB of input: past the transport's frame.
    let mut t = hipvisor::Task::new();
    let s = t.scratch(20 << 20);
    t.copy_in(s, 0, vec![1u8; 20 << 20]);
    t.launch(
        &kernels,
        "fill",
        1,
        1,
        [
            s.into(),
            hipvisor::TaskArg::value(KernelArg::U32(1)),
            hipvisor::TaskArg::value(KernelArg::U32(1)),
        ],
    );
    let e = cluster.run(&t).await.unwrap_err();
    assert_eq!(e.label(), "invalid_request", "{e}");
    // A 20 MiB module image.
    let gpu = cluster.devices().await.pop().unwrap();
    let e = gpu
        .load_module(ModuleSource::Image(vec![0u8; 20 << 20].into()))
        .await
        .unwrap_err();
    assert_eq!(e.label(), "invalid_request", "{e}");
    // Nothing was lost on the way, and the devices still serve.
    assert!(
        cluster.nodes().iter().all(|n| n.live && n.losses == 0),
        "{:?}",
        cluster.nodes()
    );
    gpu.mem_info().await.expect("served");
    assert_eq!(cluster.task_reruns(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_away_while_a_replica_was_made_gets_it_once_back() {
    let _one = SERIAL.lock().await;
    let cookie = cookie_file("away", "w");
    let (a, b) = (node(&cookie, 1), node(&cookie, 1));
    let cluster = Cluster::join(&[a.addr, b.addr], "w", &config()).await.unwrap();
    let pid = freeze_until_lost(&cluster, &b).await;
    let r = cluster.replicate(vec![5u8; 4096]).await.expect("made on the live node");
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let devices = cluster.devices().await;
        if devices.len() == 2 && devices.iter().all(|d| d.replica(&r).is_some()) {
            for d in devices {
                let h = d.replica(&r).unwrap();
                assert_eq!(
                    d.copy_from_device(h, 0, 4096).await.unwrap().as_bytes(),
                    &[5u8; 4096][..]
                );
            }
            break;
        }
        assert!(Instant::now() < deadline, "the node back holds the replica within 30 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requests_abandoned_at_the_deadline_keep_the_counts_consistent() {
    let _one = SERIAL.lock().await;
    let cookie = cookie_file("abandon", "d");
    // Half the ops on the node hang 4 s: past this application's 1 s deadline and its 2 s
    // margin, well within the node's own deadline.
    let plan = std::env::temp_dir().join(format!("hipvisor-{}-hang.toml", std::process::id()));
    std::fs::write(
        &plan,
        "[[sim.faults]]\nop = \"any\"\nprobability = 0.5\nhang_ms = 4000\n",
    )
    .unwrap();
    let n = node_with(&cookie, 1, &["--config", plan.to_str().unwrap()]);
    let mut c = config();
    c.runtime.op_deadline_ms = 1000;
    let cluster = Cluster::join(&[n.addr], "d", &c).await.unwrap();
    let gpu = cluster.devices().await.pop().unwrap();
    let calls: Vec<_> = (0..12)
        .map(|_| {
            let gpu = gpu.clone();
            tokio::spawn(async move { gpu.mem_info().await })
        })
        .collect();
    let mut late = 0;
    for c in calls {
        if let Err(e) = c.await.unwrap() {
            assert!(matches!(e, RuntimeError::DeadlineExceeded { .. }), "{e}");
            late += 1;
        }
    }
    assert!(late > 0, "some ops hung past the deadline");
    let report = cluster.report().await;
    assert_eq!(report[0].tally.abandoned, late);
    assert_eq!(report[0].consistent(), Some(true), "{report:?}");
    // Once the node has answered them all, it counted each once.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = &cluster.report().await[0];
        let c = r.counts.as_ref().expect("counts");
        if c.ops_total == r.tally.answered + r.tally.abandoned {
            assert_eq!(r.consistent(), Some(true));
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the node answered everything within 60 s: {r:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_join_finishes_its_ops_when_a_node_is_killed_mid_run() {
    let _one = SERIAL.lock().await;
    let (_cookie, [_a, mut b, _c], runner) = three_nodes_running("finish", 1, "20000");
    until("the run reaches the node", || node_ops(&b) > 50).await;
    b.child.kill().unwrap();
    b.child.wait().unwrap();
    let (code, report) = runner.finish().await;
    assert_eq!(code, Some(0), "{report}");
    // (Each request actor finishes the request it started: a few past the budget.)
    let submitted = report["requests"]["submitted"].as_u64().unwrap();
    assert!((20000..20008).contains(&submitted), "{report}");
    assert_eq!(report["ops"]["missing_replies"], 0, "{report}");
    assert_eq!(report["ops"]["wrong_results"], 0, "{report}");
    assert_eq!(report["app_visible_failures"], 0, "{report}");
    assert_eq!(report["metrics_consistent"], true, "{report}");
    let nodes = report["nodes"].as_array().expect("nodes");
    assert_eq!(nodes.len(), 3, "{report}");
    assert!(
        nodes.iter().all(|n| n["ops"].as_u64().unwrap() > 0),
        "every node served: {report}"
    );
    let dead: Vec<_> = nodes.iter().filter(|n| n["live"] == false).collect();
    assert_eq!(dead.len(), 1, "{report}");
    assert_eq!(dead[0]["addr"], b.addr.to_string(), "{report}");
    // The final device states are the nodes': each live node's device, ready, by address.
    let finals = report["devices_final"].as_array().expect("devices_final");
    for n in nodes.iter().filter(|n| n["live"] == true) {
        assert!(
            finals
                .iter()
                .any(|d| d["node"] == n["addr"] && d["id"] == 0 && d["state"] == "ready" && d["live"] == true),
            "{} in devices_final: {report}",
            n["addr"]
        );
    }
    // The killed node's device, lost with it.
    assert!(
        finals
            .iter()
            .any(|d| d["node"] == dead[0]["addr"] && d["state"] == "lost" && d["live"] == false),
        "the dead node in devices_final: {report}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handle_of_one_node_is_refused_by_another() {
    let _one = SERIAL.lock().await;
    let cookie = cookie_file("foreign", "h");
    let (a, b) = (node(&cookie, 1), node(&cookie, 1));
    let cluster = Cluster::join(&[a.addr, b.addr], "h", &config()).await.unwrap();
    let devices = cluster.devices().await;
    let (x, y) = (&devices[0], &devices[1]);
    assert_ne!(x.node(), y.node());
    // The same calls on both nodes: each node's first buffer and module.
    let (bx, by) = (x.alloc(64).await.unwrap(), y.alloc(64).await.unwrap());
    let (mx, my) = (
        x.load_module(ModuleSource::Builtin).await.unwrap(),
        y.load_module(ModuleSource::Builtin).await.unwrap(),
    );
    assert_eq!((bx.device, by.device), (0, 0), "device 0 of each node");
    y.copy_to_device(by, 0, vec![7u8; 64]).await.unwrap();
    // Used on the other node: refused, and the other node's buffer untouched.
    let e = y.copy_to_device(bx, 0, vec![1u8; 64]).await.unwrap_err();
    assert_eq!(e.label(), "invalid_request", "{e}");
    let e = y
        .launch(
            mx,
            "fill",
            1,
            16,
            vec![KernelArg::Buffer(by), KernelArg::U32(1), KernelArg::U32(16)],
        )
        .await
        .unwrap_err();
    assert_eq!(e.label(), "invalid_request", "{e}");
    assert_eq!(y.copy_from_device(by, 0, 64).await.unwrap().as_bytes(), &[7u8; 64][..]);
    // Each on its own node: served.
    y.launch(
        my,
        "fill",
        1,
        16,
        vec![KernelArg::Buffer(by), KernelArg::U32(1), KernelArg::U32(16)],
    )
    .await
    .unwrap();
}
