//! Helpers shared by the end-to-end tests.
#![allow(dead_code, unreachable_pub)]

use std::future::Future;
use std::time::{Duration, Instant};

use hipvisor::core::fault_plan::FaultSpec;
use hipvisor::core::retry::Jitter;
use hipvisor::{Runtime, RuntimeConfig};

/// A config for tests: `devices` simulated devices of 1 MiB, fast retries without jitter,
/// no breaker (tests that want one turn it on).
pub fn config(devices: u32) -> RuntimeConfig {
    let mut c = RuntimeConfig::default();
    // Thread isolation unless a test asks for processes (tests/process.rs).
    c.runtime.isolation = hipvisor::core::config::Isolation::Thread;
    c.sim.devices = devices;
    c.sim.memory_bytes = 1 << 20;
    c.sim.seed = 7;
    c.retry.initial_delay_ms = 1;
    c.retry.max_delay_ms = 5;
    c.retry.jitter = Jitter::None;
    c.breaker.enabled = false;
    c.runtime.op_deadline_ms = 10_000;
    c.telemetry.flush_interval_ms = 20;
    c.supervisor.lost_probe_interval_ms = 20;
    c.supervisor.restart_backoff_min_ms = 1;
    c.supervisor.restart_backoff_max_ms = 10;
    c
}

/// A fault-plan entry built from its defaults.
pub fn fault(f: impl FnOnce(&mut FaultSpec)) -> FaultSpec {
    let mut s = FaultSpec::default();
    f(&mut s);
    s
}

pub async fn start(c: RuntimeConfig) -> Runtime {
    Runtime::builder().config(c).start().await.expect("runtime starts")
}

/// The worker program of process isolation: the `hipvisor-worker` binary of this package
/// (the test binaries are not workers).
pub const WORKER: &str = env!("CARGO_BIN_EXE_hipvisor-worker");

/// A runtime with [`WORKER`] as its worker program.
pub async fn start_with_worker(c: RuntimeConfig) -> Runtime {
    Runtime::builder()
        .config(c)
        .worker(WORKER)
        .start()
        .await
        .expect("runtime starts")
}

/// A fault-plan entry under which every `op` from the first fails with `code`.
pub fn failing(op: &str, code: i32) -> FaultSpec {
    fault(|f| {
        f.op = op.into();
        f.after = Some(1);
        f.code = Some(code);
    })
}

/// Polls `cond` until it holds or `within` passes (then panics with `what`).
pub async fn eventually<F, Fut>(within: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    loop {
        if cond().await {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Awaits `f`, failing the test if it takes longer than `within` (a hang).
pub async fn answered<T>(within: Duration, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(within, f)
        .await
        .expect("an op was not answered in time (hang)")
}

/// An executable script `name` in `dir` with `text` (its `#!` line included).
pub fn script(dir: &std::path::Path, name: &str, text: &str) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}
