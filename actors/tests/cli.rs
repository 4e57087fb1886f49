//! The `hipvisor` command line, run as a user would.

mod common;
use common::{alive, children, poll, signal_mask_has};

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Duration;

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

/// Says why a test is skipped, where `cargo test` shows it: straight to stderr, since libtest
/// hides what a passing test prints with `eprintln!`.
#[cfg(any(feature = "hip", feature = "cuda"))]
fn skipped(why: &str) {
    let _ = std::io::Write::write_all(&mut std::io::stderr(), format!("skipped: {why}\n").as_bytes());
}

/// Tests of a GPU backend without a GPU check what a machine without one sees; where the
/// machine has one they are skipped, saying so.
#[cfg(feature = "hip")]
#[test]
fn devices_on_hip_without_a_gpu_fails_with_a_clear_message() {
    if std::path::Path::new("/dev/kfd").exists() {
        skipped("this machine has an AMD GPU (/dev/kfd): this test checks a machine without one");
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

/// Without a GPU, as CI has it: not even the CUDA driver library is installed.
#[cfg(feature = "cuda")]
#[test]
fn devices_on_cuda_without_a_gpu_or_driver_fails_with_a_clear_message() {
    if hipvisor::core::backend::cuda::driver_present() {
        skipped(
            "this machine has the CUDA driver library (and maybe a GPU): this test checks a machine without a GPU \
             or driver",
        );
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
    poll("two workers", Duration::from_secs(30), || {
        workers = children(host.id());
        workers.len() == 2
    });
    host.kill().unwrap();
    host.wait().unwrap();
    poll("the workers die with their host", Duration::from_secs(30), || {
        workers.iter().all(|w| !alive(*w))
    });
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

#[test]
fn chaos_inference_absorbs_the_example_plan_without_visible_failures() {
    let out = hipvisor(&[
        "chaos",
        "--workload",
        "inference",
        "--ops",
        "3000",
        "--json",
        "--config",
        "../config/chaos.toml",
    ]);
    let v = json(&out);
    assert!(out.status.success(), "{v}\n{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(v["violations"], serde_json::json!([]), "{v}");
    assert_eq!(v["workload"], "inference");
    assert_eq!(v["requests"]["submitted"], 3000, "{v}");
    assert_eq!(v["app_visible_failures"], 0, "{v}");
    assert_eq!(v["ops"]["wrong_results"], 0);
    assert_eq!(v["metrics_consistent"], true);
    assert!(v["restarts"].as_u64().unwrap() >= 3, "three worker crashes: {v}");
    assert!(v["task_reruns"].as_u64().unwrap() >= 1, "the crashes hit requests: {v}");
    assert!(v["request_latency_us"]["max"].as_f64().unwrap() > 0.0);
}

/// A job asked to submit ops that could not run is a failure (exit 1) whose report and
/// stderr say why.
fn assert_could_not_run(out: &Output, why: &str) -> serde_json::Value {
    let v = json(out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{v}\n{stderr}");
    let reason = v["could_not_run"]
        .as_str()
        .unwrap_or_else(|| panic!("could_not_run: {v}"));
    assert!(reason.starts_with(why), "{reason}");
    assert!(stderr.contains(why), "{stderr}");
    v
}

#[test]
fn run_where_no_device_becomes_ready_fails_naming_why() {
    // 16 bytes of device memory: the health probe's allocation cannot fit, so no device
    // ever opens.
    let path = temp_config("tiny.toml", "[sim]\nmemory_bytes = 16\n");
    let out = hipvisor(&["run", "--ops", "200", "--json", "--config", path.to_str().unwrap()]);
    let v = assert_could_not_run(&out, "no device became ready");
    assert_eq!(v["ops"]["submitted"], 0, "{v}");
    assert!(all_devices(&v, "failed"), "{v}");
    let reason = v["could_not_run"].as_str().unwrap();
    assert!(
        reason.contains("device 3 failed (") && reason.contains("16 bytes"),
        "names each device's reason: {reason}"
    );
    // --ops 0 asks for nothing: nothing to fail.
    let out = hipvisor(&["run", "--ops", "0", "--json", "--config", path.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(json(&out)["could_not_run"], serde_json::Value::Null);
}

#[test]
fn run_where_every_device_is_lost_at_its_first_op_fails_naming_why() {
    let path = temp_config(
        "lost.toml",
        "[[sim.faults]]\nop = \"any\"\nafter = 1\ncode = 100\nduration_ms = 600000\n",
    );
    let out = hipvisor(&["run", "--ops", "200", "--json", "--config", path.to_str().unwrap()]);
    let v = assert_could_not_run(&out, "no op succeeded");
    assert_eq!(v["ops"]["succeeded"], 0, "{v}");
    assert_eq!(v["ops"]["missing_replies"], 0, "{v}");
    assert!(all_devices(&v, "lost"), "{v}");
    assert!(v["could_not_run"].as_str().unwrap().contains("device_lost"), "{v}");
}

#[test]
fn chaos_where_no_device_becomes_ready_is_a_violation() {
    let path = temp_config("tiny-chaos.toml", "[sim]\nmemory_bytes = 16\n");
    let started = std::time::Instant::now();
    let out = hipvisor(&["chaos", "--ops", "200", "--json", "--config", path.to_str().unwrap()]);
    let v = json(&out);
    assert_eq!(out.status.code(), Some(1), "{v}");
    let violations = v["violations"].as_array().unwrap();
    assert!(
        violations.iter().any(|x| x
            .as_str()
            .unwrap()
            .starts_with("the job could not run: no device became ready")),
        "{v}"
    );
    // Failed devices are out of service for good: the soak does not wait a minute for them.
    assert!(
        started.elapsed() < std::time::Duration::from_secs(50),
        "{:?}",
        started.elapsed()
    );
}

/// Whether `pid` blocks SIGINT (its SigBlk mask in /proc).
fn blocks_sigint(pid: u32) -> bool {
    signal_mask_has(pid, "SigBlk", 2)
}

#[test]
fn ctrl_c_stops_the_run_gracefully_without_killing_its_workers() {
    use std::os::unix::process::CommandExt;
    // Its own process group, as a terminal's foreground job: Ctrl-C signals the group.
    let host = Command::new(env!("CARGO_BIN_EXE_hipvisor"))
        .args(["run", "--ops", "100000000", "--json", "--devices", "2"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_remove("RUST_LOG")
        .process_group(0)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    struct Reap(std::process::Child);
    impl Drop for Reap {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut host = Reap(host);
    let mut workers = Vec::new();
    poll("two workers that block SIGINT", Duration::from_secs(30), || {
        workers = children(host.0.id());
        workers.len() == 2 && workers.iter().all(|w| blocks_sigint(*w))
    });
    let group = format!("-{}", host.0.id());
    assert!(
        Command::new("kill")
            .args(["-INT", "--", &group])
            .status()
            .unwrap()
            .success()
    );
    let mut status = None;
    poll("the run to stop after SIGINT", Duration::from_secs(30), || {
        status = host.0.try_wait().unwrap();
        status.is_some()
    });
    let mut stdout = String::new();
    let mut stderr = String::new();
    use std::io::Read;
    host.0.stdout.take().unwrap().read_to_string(&mut stdout).unwrap();
    host.0.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    let v: serde_json::Value =
        serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}\n{stderr}"));
    assert_eq!(status.unwrap().code(), Some(130), "128 + SIGINT: {v}\n{stderr}");
    assert_eq!(v["interrupted"], "SIGINT", "{v}");
    assert_eq!(
        v["restarts"], 0,
        "the workers ignored the group's SIGINT: {v}\n{stderr}"
    );
    assert_eq!(v["ops"]["failed"], 0, "{v}");
    assert_eq!(v["ops"]["missing_replies"], 0, "{v}");
    assert_eq!(v["metrics_consistent"], true, "{v}");
    poll("the workers stopped with the run", Duration::from_secs(30), || {
        workers.iter().all(|w| !alive(*w))
    });
}

// ---------------------------------------------------------------------------------------
// The face: a summary without `--json`, exactly the JSON report with it, and the help.

/// The last line of every summary: where the full report is.
const FULL_REPORT: &str = "full report: rerun with --json";

/// stdout of a command that ran without `--json`: a summary, not JSON.
fn summary(out: &Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        serde_json::from_str::<serde_json::Value>(stdout.trim()).is_err()
            && !stdout.lines().any(|l| l.trim_start().starts_with('{')),
        "a summary, not JSON: {stdout}"
    );
    assert_eq!(
        stdout.lines().last(),
        Some(FULL_REPORT),
        "ends saying where the report is: {stdout}"
    );
    stdout
}

/// The numbers of a summary's table row that starts with `first` (a device id or `total`):
/// (state, ops, failed, retries, restarts); `total` has no state.
fn row(text: &str, first: &str) -> (String, u64, u64, u64, u64) {
    let line = text
        .lines()
        .find(|l| l.split_whitespace().next() == Some(first))
        .unwrap_or_else(|| panic!("a row for {first}: {text}"));
    let mut words: Vec<&str> = line.split_whitespace().skip(1).collect();
    let state = if first == "total" {
        String::new()
    } else {
        words.remove(0).to_string()
    };
    let n = |i: usize| words[i].parse::<u64>().unwrap_or_else(|e| panic!("{e}: {line}"));
    (state, n(0), n(1), n(2), n(3))
}

#[test]
fn run_without_json_prints_a_summary_with_a_row_per_device_and_the_totals() {
    let out = hipvisor(&["run", "--ops", "400", "--devices", "3", "--isolation", "thread"]);
    let text = summary(&out);
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines[0].split(", ").take(3).collect::<Vec<_>>(),
        ["hipvisor run: sim backend", "thread isolation", "3 devices"],
        "{text}"
    );
    assert_eq!(
        lines[1].split_whitespace().collect::<Vec<_>>(),
        ["device", "state", "ops", "failed", "retries", "restarts"]
    );
    let mut ops = 0;
    for id in 0..3 {
        let (state, answered, failed, retries, restarts) = row(&text, &id.to_string());
        assert_eq!(
            (state.as_str(), failed, retries, restarts),
            ("ready", 0, 0, 0),
            "device {id}: {text}"
        );
        ops += answered;
    }
    assert!(text.lines().all(|l| l.split_whitespace().next() != Some("3")), "{text}");
    let (_, total, failed, retries, restarts) = row(&text, "total");
    assert_eq!((total, failed, retries, restarts), (ops, 0, 0, 0), "{text}");
    assert!(total >= 400, "{text}");
    assert!(
        text.contains(&format!(
            "ops: {total} submitted, {total} succeeded, 0 failed, 0 missing replies, 0 wrong results\n"
        )),
        "{text}"
    );
    assert!(text.contains("\nretries: 0 (0 succeeded, 0 exhausted)\n"), "{text}");
    assert!(text.contains("\nlatency: p50 "), "{text}");
    assert!(text.contains("\nresult: ok\n"), "{text}");
}

#[test]
fn run_with_json_prints_exactly_the_json_report() {
    let out = hipvisor(&[
        "run",
        "--ops",
        "200",
        "--devices",
        "2",
        "--isolation",
        "thread",
        "--json",
    ]);
    let v = json(&out);
    assert!(out.status.success(), "{v}");
    let mut keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "backend",
            "could_not_run",
            "devices",
            "devices_final",
            "elapsed_s",
            "failures_by_class",
            "failures_by_error",
            "interrupted",
            "isolation",
            "latency_us",
            "metrics_consistent",
            "ops",
            "restarts",
            "retries",
            "throughput_ops_per_s",
        ],
        "the report's fields: {v}"
    );
    assert!(!String::from_utf8_lossy(&out.stdout).contains(FULL_REPORT));
}

#[test]
fn a_summary_names_what_failed_and_devices_that_are_not_ready() {
    // 16 bytes of device memory: no device ever opens.
    let path = temp_config("tiny-summary.toml", "[sim]\nmemory_bytes = 16\n");
    let out = hipvisor(&[
        "run",
        "--ops",
        "200",
        "--devices",
        "2",
        "--config",
        path.to_str().unwrap(),
    ]);
    let text = summary(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    for id in ["0", "1"] {
        assert_eq!(row(&text, id).0, "failed", "{text}");
    }
    assert!(text.contains("16 bytes"), "each failed device's reason: {text}");
    assert!(
        text.contains("\nresult: FAILED: could not run: no device became ready"),
        "{text}"
    );
}

#[test]
fn chaos_without_json_prints_a_summary_with_its_verdict() {
    let path = temp_config("calm-chaos.toml", "[sim]\nseed = 5\n");
    let out = hipvisor(&[
        "chaos",
        "--ops",
        "300",
        "--devices",
        "2",
        "--config",
        path.to_str().unwrap(),
    ]);
    let text = summary(&out);
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.starts_with("hipvisor chaos: "), "{text}");
    assert_eq!(row(&text, "0").0, "ready", "{text}");
    assert_eq!(row(&text, "1").0, "ready", "{text}");
    assert!(text.contains("\nresult: ok, no violation\n"), "{text}");
}

#[test]
fn bench_without_json_prints_a_table_of_every_measurement() {
    let args = ["bench", "--ops", "2000", "--reps", "1", "--h2d-mib", "2"];
    let out = hipvisor(&args);
    let text = summary(&out);
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.starts_with("hipvisor bench: sim backend, "), "{text}");
    for n in [
        "channel_baseline_serial",
        "direct_null",
        "runtime_thread_pipelined_null",
        "runtime_process_batch_null",
        "runtime_process_h2d",
        "recovery_sticky_standby_ms",
        "telemetry_off_pipelined",
    ] {
        let line = text
            .lines()
            .find(|l| l.split_whitespace().next() == Some(n))
            .unwrap_or_else(|| panic!("a row for {n}: {text}"));
        assert!(line.contains(" – "), "median, then min – max: {line}");
    }
    assert!(text.contains("\nderived:\n  "), "{text}");
    assert!(
        text.contains("telemetry_on_pipelined / telemetry_off_pipelined"),
        "{text}"
    );
}

/// The subcommands `hipvisor --help` must list. A subcommand added without a line in the
/// help, or a line for one that is gone, fails `help_lists_every_subcommand`.
const SUBCOMMANDS: [&str; 6] = ["run", "chaos", "bench", "devices", "config", "help"];

/// The `Commands:` section of a help text: (name, description) per line.
fn commands(help: &str) -> Vec<(String, String)> {
    help.lines()
        .skip_while(|l| l.trim() != "Commands:")
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .map(|l| {
            let l = l.trim_start();
            let (name, about) = l.split_once(' ').unwrap_or((l, ""));
            (name.to_string(), about.trim().to_string())
        })
        .collect()
}

#[test]
fn help_lists_every_subcommand_with_a_one_line_description() {
    let help = hipvisor(&["--help"]);
    assert!(help.status.success());
    let text = String::from_utf8_lossy(&help.stdout).into_owned();
    let listed = commands(&text);
    let names: Vec<&str> = listed.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, SUBCOMMANDS, "{text}");
    for (name, about) in &listed {
        assert!(about.len() > 10, "`{name}` has a description: {text}");
    }
    assert!(text.contains("--json"), "says what --json changes: {text}");
    // `hipvisor help` says the same; `hipvisor` alone shows it too (on stderr, exit 2: a
    // command is required).
    let out = hipvisor(&["help"]);
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout), text);
    let out = hipvisor(&[]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(commands(&String::from_utf8_lossy(&out.stderr)), listed);
    // Each subcommand's own help says what --json does, where it has one.
    for sub in ["run", "chaos", "bench"] {
        let out = hipvisor(&[sub, "--help"]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("without it, stdout gets a short"), "{sub}: {text}");
    }
}
