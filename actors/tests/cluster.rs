//! Beyond one machine (feature `cluster`), with real processes on loopback: `hipvisor node`s
//! serve their devices, an application joins them, uses every device, is refused with a
//! wrong cookie, and gets `NodeLost` — not a hang — from a node that was killed.
#![cfg(feature = "cluster")]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hipvisor::cluster::Cluster;
use hipvisor::core::kernels::u32s;
use hipvisor::{KernelArg, ModuleSource, Op, Reply, RuntimeError};

const DEADLINE: Duration = Duration::from_secs(10);

/// Requests get 10 s; heartbeats every 200 ms, a node silent for 3 s is lost (for a loaded
/// CI machine).
fn config() -> hipvisor::RuntimeConfig {
    let mut c = hipvisor::RuntimeConfig::default();
    c.runtime.op_deadline_ms = DEADLINE.as_millis() as u64;
    c.cluster.heartbeat_interval_ms = 200;
    c.cluster.heartbeat_timeout_ms = 3000;
    c
}

/// One test at a time: a process joins one cluster at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A `hipvisor node` on a free loopback port, its cookie in a file; waits for its
/// `listening on` line.
struct Node {
    child: Child,
    addr: SocketAddr,
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
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.starts_with("listening on") {
                let _ = tx.send(());
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(30))
        .expect("the node says `listening on` within 30 s");
    Node { child, addr }
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
    let started = Instant::now();
    let refused = Cluster::join(&[n.addr], "wrong-cookie", &config()).await;
    match refused {
        Err(RuntimeError::Remote { node, reason }) => {
            assert_eq!(node, n.addr.to_string());
            assert!(reason.contains("wrong cookie"), "{reason}");
        }
        Err(other) => panic!("expected Remote, got {other}"),
        Ok(_) => panic!("joined with a wrong cookie"),
    }
    assert!(started.elapsed() < Duration::from_secs(10), "refused promptly");
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
    let cluster = Cluster::join(&[n.addr], "k", &config_for_kill()).await.unwrap();
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
        started.elapsed() < Duration::from_secs(5),
        "answered when the session closed, not at the 30 s deadline: {:?}",
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
    c.runtime.op_deadline_ms = 30_000;
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_node_is_detected_within_the_heartbeat_timeout() {
    let _one = SERIAL.lock().await;
    let cookie = cookie_file("frozen", "f");
    let n = node(&cookie, 1);
    let cluster = Cluster::join(&[n.addr], "f", &config()).await.unwrap();
    let gpu = cluster.devices().await.pop().expect("one device");
    gpu.submit(Op::MemInfo).await.expect("served while running");
    let pid = nix::unistd::Pid::from_raw(n.child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    let started = Instant::now();
    // The process is alive (its socket open) but answers nothing: only the heartbeats tell.
    match gpu.submit(Op::MemInfo).await {
        Err(RuntimeError::NodeLost { .. }) => {}
        other => panic!("expected NodeLost, got {other:?}"),
    }
    let waited = started.elapsed();
    assert!(
        waited < Duration::from_secs(5),
        "within the 1 s timeout and a beat or two: {waited:?}"
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
    let pid = nix::unistd::Pid::from_raw(n.child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    assert!(matches!(
        gpu.submit(Op::MemInfo).await,
        Err(RuntimeError::NodeLost { .. })
    ));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();
    let again = serving_again(&cluster, None).await;
    assert_eq!(again.node(), gpu.node(), "the same node, rejoined");
}
