//! The `hipvisor` command line, run as a user would.

use std::path::PathBuf;
use std::process::{Command, Output};

fn hipvisor(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_hipvisor"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_remove("RUST_LOG")
        .output()
        .expect("hipvisor runs")
}

fn json(out: &Output) -> serde_json::Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        stdout.trim().lines().count(),
        1,
        "stdout carries exactly one JSON object: {stdout}"
    );
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"))
}

/// Whether every device of a run's report ended in `state`.
fn all_devices(v: &serde_json::Value, state: &str) -> bool {
    v["devices_final"]
        .as_array()
        .unwrap()
        .iter()
        .all(|d| d["state"] == state)
}

fn temp_config(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("hipvisor-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn run_without_faults_has_no_failures() {
    let out = hipvisor(&["run", "--ops", "3000", "--json"]);
    let v = json(&out);
    assert!(out.status.success(), "{v}\n{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(v["backend"], "sim");
    assert_eq!(v["isolation"], "process", "the default");
    assert!(v["ops"]["submitted"].as_u64().unwrap() >= 3000);
    assert_eq!(v["ops"]["failed"], 0);
    assert_eq!(v["ops"]["missing_replies"], 0);
    assert_eq!(v["ops"]["wrong_results"], 0);
    assert_eq!(v["ops"]["submitted"], v["ops"]["succeeded"]);
    assert_eq!(v["devices_final"].as_array().unwrap().len(), 4);
    assert!(all_devices(&v, "ready"));
    assert_eq!(v["metrics_consistent"], true);
}

#[test]
fn run_with_two_percent_transient_faults_retries_and_loses_nothing() {
    let path = temp_config(
        "transient.toml",
        "[sim]\nseed = 3\n[[sim.faults]]\nop = \"any\"\nprobability = 0.02\ncode = 2\n",
    );
    let out = hipvisor(&["run", "--ops", "3000", "--json", "--config", path.to_str().unwrap()]);
    let v = json(&out);
    assert!(out.status.success(), "{v}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(v["retries"]["attempts"].as_u64().unwrap() > 0, "{v}");
    assert!(v["retries"]["succeeded"].as_u64().unwrap() > 0, "{v}");
    assert_eq!(v["ops"]["missing_replies"], 0);
    assert_eq!(v["ops"]["wrong_results"], 0);
}

#[test]
fn run_with_a_sticky_fault_reports_failed_devices_and_still_loses_nothing() {
    let path = temp_config(
        "sticky.toml",
        "[[sim.faults]]\nop = \"launch\"\ndevice = 1\nnth = 5\ncode = 700\n",
    );
    let args = [
        "run",
        "--ops",
        "2000",
        "--json",
        "--isolation",
        "thread",
        "--config",
        path.to_str().unwrap(),
    ];
    let out = hipvisor(&args);
    let v = json(&out);
    assert!(out.status.success(), "typed failures are not fatal: {v}");
    assert_eq!(v["isolation"], "thread");
    assert_eq!(v["failures_by_class"]["sticky"], 1);
    assert_eq!(
        v["failures_by_class"]["sticky"], v["failures_by_error"]["gpu"],
        "the only GPU error is the sticky fault: {v}"
    );
    assert_eq!(v["ops"]["missing_replies"], 0);
    assert!(all_devices(&v, "failed"));
}

#[test]
fn flags_override_the_config() {
    let out = hipvisor(&["config", "--devices", "2", "--seed", "99"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("devices = 2"), "{text}");
    assert!(text.contains("seed = 99"), "{text}");
    let out = hipvisor(&["run", "--ops", "200", "--devices", "2", "--json"]);
    assert_eq!(json(&out)["devices"], 2);
}

#[test]
fn devices_lists_the_simulated_gpus() {
    let out = hipvisor(&["devices", "--devices", "3"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.lines().count(), 3, "{text}");
    assert!(text.contains("Simulated GPU 2"), "{text}");
}

#[test]
fn bad_config_is_a_clear_error() {
    let path = temp_config("bad.toml", "[retry]\nbackoff_multiplier = 0.5\n");
    let out = hipvisor(&["run", "--config", path.to_str().unwrap(), "--json"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("retry.backoff_multiplier"), "{err}");
    assert!(out.stdout.is_empty());
    let out = Command::new(env!("CARGO_BIN_EXE_hipvisor"))
        .args(["config"])
        .env("HIPVISOR_RETRY__MAX_RETRIEZ", "3")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("HIPVISOR_RETRY__MAX_RETRIEZ"));
}

#[cfg(feature = "hip")]
#[test]
fn devices_on_hip_without_a_gpu_fails_with_a_clear_message() {
    if std::path::Path::new("/dev/kfd").exists() {
        eprintln!("skipped: this machine has an AMD GPU driver (/dev/kfd)");
        return;
    }
    let out = hipvisor(&["devices", "--backend", "hip"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "a clear error, not a panic (101): {err}");
    assert!(err.contains("no HIP device was found"), "{err}");
    assert!(
        err.contains("hipErrorNoDevice") || err.contains("hipError"),
        "the code's name: {err}"
    );
}

#[cfg(feature = "cuda")]
#[test]
fn devices_on_cuda_without_a_driver_fails_with_a_clear_message() {
    if hipvisor::core::backend::cuda::driver_present() {
        eprintln!("skipped: this machine has a CUDA driver");
        return;
    }
    let out = hipvisor(&["devices", "--backend", "cuda"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "a clear error, not a panic (101): {err}");
    assert!(err.contains("CUDA driver library not found"), "{err}");
    let out = hipvisor(&["run", "--backend", "cuda", "--json", "--ops", "10"]);
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.stdout.is_empty());
}

#[test]
fn run_in_process_isolation_recovers_from_sticky_faults_and_crashes() {
    let path = temp_config(
        "process.toml",
        "[runtime]\nisolation = \"process\"\n\
         [[sim.faults]]\nop = \"launch\"\ndevice = 1\nnth = 20\ncode = 700\n\
         [[sim.faults]]\nop = \"launch\"\ndevice = 2\nnth = 30\ncode = 719\n\
         [[sim.faults]]\ndevice = 3\nnth = 200\ncrash = true\n",
    );
    let out = hipvisor(&["run", "--ops", "4000", "--json", "--config", path.to_str().unwrap()]);
    let v = json(&out);
    assert!(out.status.success(), "{v}\n{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(v["isolation"], "process");
    assert!(
        v["restarts"].as_u64().unwrap() >= 3,
        "two sticky faults and a crash: {v}"
    );
    assert_eq!(v["failures_by_class"]["sticky"], 2, "{v}");
    assert_eq!(v["ops"]["missing_replies"], 0);
    assert_eq!(v["ops"]["wrong_results"], 0);
    assert!(all_devices(&v, "ready"), "{v}");
}

/// The children of `pid` (its worker processes).
fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(child) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat"))
            && let Some(rest) = stat.rsplit(')').next()
            && rest.split_whitespace().nth(1) == Some(&pid.to_string())
        {
            out.push(child);
        }
    }
    out
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| !s.rsplit(')').next().is_some_and(|r| r.trim_start().starts_with('Z')))
}

fn poll(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !cond() {
        assert!(std::time::Instant::now() < deadline, "timed out waiting for: {what}");
        std::thread::yield_now();
    }
}

#[test]
fn killing_the_host_leaves_no_worker_behind() {
    let mut host = Command::new(env!("CARGO_BIN_EXE_hipvisor"))
        .args([
            "run",
            "--ops",
            "100000000",
            "--json",
            "--isolation",
            "process",
            "--devices",
            "2",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut workers = Vec::new();
    poll("two workers", || {
        workers = children(host.id());
        workers.len() == 2
    });
    host.kill().unwrap();
    host.wait().unwrap();
    poll("the workers die with their host", || workers.iter().all(|w| !alive(*w)));
}

#[cfg(feature = "traces")]
#[test]
fn otel_traces_go_to_stderr_with_a_span_per_op() {
    let out = hipvisor(&[
        "run",
        "--ops",
        "50",
        "--actors",
        "1",
        "--json",
        "--isolation",
        "thread",
        "--otel-traces",
    ]);
    let v = json(&out);
    assert!(out.status.success(), "{v}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let spans: Vec<serde_json::Value> = stderr.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    let ops: Vec<_> = spans.iter().filter(|s| s["name"] == "gpu_op").collect();
    assert_eq!(
        ops.len() as u64,
        v["ops"]["submitted"].as_u64().unwrap(),
        "one span per op"
    );
    for key in ["device", "op", "attempt", "outcome"] {
        assert!(ops[0]["attributes"][key].is_string(), "{key} in {}", ops[0]);
    }
}

#[test]
fn bench_reports_medians_and_ratios_as_json() {
    let out = hipvisor(&["bench", "--ops", "2000", "--reps", "1", "--h2d-mib", "2", "--json"]);
    let v = json(&out);
    assert!(out.status.success(), "{v}\n{}", String::from_utf8_lossy(&out.stderr));
    let results = v["results"].as_array().unwrap();
    let names: Vec<&str> = results.iter().map(|r| r["name"].as_str().unwrap()).collect();
    for n in [
        "channel_baseline_serial",
        "channel_baseline_pipelined",
        "direct_null",
        "direct_launch_sync",
        "runtime_thread_serial_null",
        "runtime_thread_pipelined_null",
        "runtime_process_serial_null",
        "runtime_process_pipelined_null",
        "runtime_thread_launch_sync",
        "runtime_process_launch_sync",
        "direct_h2d",
        "runtime_thread_h2d",
        "runtime_process_h2d",
        "recovery_sticky_process_ms",
        "recovery_sticky_standby_ms",
        "telemetry_on_pipelined",
        "telemetry_off_pipelined",
    ] {
        assert!(names.contains(&n), "{n} in {names:?}");
    }
    for r in results {
        let stats = r.as_object().unwrap().iter().find(|(k, _)| *k != "name").unwrap().1;
        let (min, med, max) = (
            stats["min"].as_f64().unwrap(),
            stats["median"].as_f64().unwrap(),
            stats["max"].as_f64().unwrap(),
        );
        assert!(min > 0.0 && min <= med && med <= max, "{r}");
    }
    assert!(
        v["derived"]["telemetry_on_pipelined / telemetry_off_pipelined"]
            .as_f64()
            .unwrap()
            > 0.0
    );
}

#[test]
fn chaos_with_the_example_plan_has_no_violation() {
    let out = hipvisor(&["chaos", "--ops", "20000", "--json", "--config", "../config/chaos.toml"]);
    let v = json(&out);
    assert!(out.status.success(), "{v}\n{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(v["violations"], serde_json::json!([]), "{v}");
    assert!(v["restarts"].as_u64().unwrap() >= 3, "three worker crashes: {v}");
    assert_eq!(v["ops"]["missing_replies"], 0);
    assert!(all_devices(&v, "ready"));
}
