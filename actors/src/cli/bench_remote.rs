//! `hipvisor bench` (feature `cluster`): the same device through a `hipvisor node` on
//! loopback against the runtime in this process — serial and pipelined mem-info, and copies
//! both ways — so the ratios say what a remote device costs over a local one.
//!
//! The node is this binary (`hipvisor node`), started with the bench's thread-isolation
//! config (one device) on a free loopback port with a random cookie, and killed at the end.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hipvisor::RuntimeConfig;
use hipvisor::cluster::{Cluster, RemoteDevice};

use crate::cli::measure::{IN_FLIGHT, per_op};

/// The measurements, in this order.
pub(crate) const NAMES: [(&str, &str); 4] = [
    ("remote_serial_null", "ns_per_op"),
    ("remote_pipelined_null", "ns_per_op"),
    ("remote_h2d", "gbps"),
    ("remote_d2h", "gbps"),
];

/// The ratios against the local figures of the same run.
pub(crate) const RATIOS: [(&str, &str, &str); 3] = [
    (
        "remote_serial_null / runtime_thread_serial_null",
        "remote_serial_null",
        "runtime_thread_serial_null",
    ),
    (
        "remote_pipelined_null / runtime_thread_pipelined_null",
        "remote_pipelined_null",
        "runtime_thread_pipelined_null",
    ),
    ("runtime_thread_h2d / remote_h2d", "runtime_thread_h2d", "remote_h2d"),
];

/// A node process, killed when dropped.
struct NodeProcess(Option<Child>);

impl Drop for NodeProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            // Reaped on a thread of its own: this drop runs on a tokio worker.
            std::thread::spawn(move || child.wait());
        }
    }
}

/// Starts a node with `config`; its address once it says `listening on`.
fn start_node(
    config: &RuntimeConfig,
    dir: &std::path::Path,
    cookie: &str,
) -> Result<(NodeProcess, std::net::SocketAddr), String> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| format!("no free port: {e}"))?
        .port();
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    let config_file = dir.join("node.toml");
    let cookie_file = dir.join("cookie");
    std::fs::write(&config_file, config.to_toml()).map_err(|e| e.to_string())?;
    std::fs::write(&cookie_file, cookie).map_err(|e| e.to_string())?;
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut child = Command::new(exe)
        .args(["node", "--listen", &addr.to_string(), "--config"])
        .arg(&config_file)
        .arg("--cookie-file")
        .arg(&cookie_file)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start a node: {e}"))?;
    let stderr = child.stderr.take().ok_or("no stderr")?;
    let node = NodeProcess(Some(child));
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.starts_with("listening on") {
                let _ = tx.send(());
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(60))
        .map_err(|_| "the node did not start within 60 s".to_string())?;
    Ok((node, addr))
}

/// The measurements of [`NAMES`] against one node serving the device of `config`.
pub(crate) async fn remote(config: &RuntimeConfig, ops: u64, copy_bytes: usize) -> Result<[f64; 4], String> {
    let dir = std::env::temp_dir().join(format!(
        "hipvisor-bench-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    let cookie = format!("{:032x}", rand::random::<u128>());
    // (Blocking: files, a process, and a wait for its first line — off the tokio workers.)
    let started = {
        let (config, cookie) = (config.clone(), cookie.clone());
        tokio::task::spawn_blocking(move || {
            std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
            let started = start_node(&config, &dir, &cookie);
            let _ = std::fs::remove_dir_all(&dir);
            started
        })
        .await
        .map_err(|e| e.to_string())?
    };
    let (_node, addr) = started?;
    let cluster = Cluster::join(&[addr], &cookie, config)
        .await
        .map_err(|e| e.to_string())?;
    let gpu: RemoteDevice = cluster.devices().await.pop().ok_or("the node serves no device")?;
    // A failed op would make the figures meaningless (a node gone answers at once).
    let failed = Arc::new(AtomicU64::new(0));
    let mem_info = |gpu: &RemoteDevice| {
        let (g, failed) = (gpu.clone(), failed.clone());
        move || {
            let (g, failed) = (g.clone(), failed.clone());
            async move {
                if g.mem_info().await.is_err() {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    };
    let serial = per_op((ops / 20).max(10), 1, mem_info(&gpu)).await;
    let pipelined = per_op((ops / 4).max(IN_FLIGHT), IN_FLIGHT, mem_info(&gpu)).await;
    let failed = failed.load(Ordering::Relaxed);
    if failed > 0 {
        return Err(format!("{failed} remote mem-infos failed"));
    }
    let big = gpu.alloc(copy_bytes as u64).await.map_err(|e| e.to_string())?;
    let data: hipvisor::Payload = vec![7u8; copy_bytes].into();
    let started = Instant::now();
    gpu.copy_to_device(big, 0, data).await.map_err(|e| e.to_string())?;
    let h2d = copy_bytes as f64 / started.elapsed().as_secs_f64() / 1e9;
    let started = Instant::now();
    let back = gpu
        .copy_from_device(big, 0, copy_bytes as u64)
        .await
        .map_err(|e| e.to_string())?;
    let d2h = copy_bytes as f64 / started.elapsed().as_secs_f64() / 1e9;
    if back.len() != copy_bytes {
        return Err(format!("a copy back of {} bytes, not {copy_bytes}", back.len()));
    }
    Ok([serial, pipelined, h2d, d2h])
}
