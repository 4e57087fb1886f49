//! `hipvisor` as PID 1 of its PID namespace, as a container's entrypoint without an init:
//! the workers must not take "my parent is PID 1" for a dead host, and SIGTERM (which the
//! kernel does not act on by default for PID 1) must stop the run gracefully.
//!
//! `unshare --pid --fork --kill-child --mount-proc` makes the namespace (with `--user
//! --map-root-user` when not root). The tests skip, saying so, when `unshare` is missing or
//! not permitted — unless `CI_REQUIRE_TOOLS=1`, where they fail.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The `unshare` flags that work here, or `None` (skip) when none does.
fn unshare_flags() -> Option<Vec<&'static str>> {
    let pid = ["--pid", "--fork", "--kill-child", "--mount-proc"];
    let user = ["--user", "--map-root-user"];
    let candidates = [pid.to_vec(), [user.as_slice(), pid.as_slice()].concat()];
    let mut why = String::new();
    for flags in candidates {
        match Command::new("unshare").args(&flags).arg("true").output() {
            Ok(out) if out.status.success() => return Some(flags),
            Ok(out) => {
                why = format!(
                    "`unshare {}` failed: {}",
                    flags.join(" "),
                    String::from_utf8_lossy(&out.stderr).trim()
                )
            }
            Err(e) => why = format!("no unshare: {e}"),
        }
    }
    assert!(
        std::env::var("CI_REQUIRE_TOOLS").as_deref() != Ok("1"),
        "CI_REQUIRE_TOOLS=1 and PID namespaces are not available: {why}"
    );
    eprintln!("skipped: cannot make a PID namespace ({why})");
    None
}

/// `hipvisor args` as PID 1 of a new PID namespace.
fn as_pid_1(flags: &[&str], args: &[&str]) -> Command {
    let mut cmd = Command::new("unshare");
    cmd.args(flags)
        .arg(env!("CARGO_BIN_EXE_hipvisor"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_remove("RUST_LOG");
    cmd
}

fn json(stdout: &[u8]) -> serde_json::Value {
    let stdout = String::from_utf8_lossy(stdout);
    assert_eq!(stdout.trim().lines().count(), 1, "exactly one JSON object: {stdout}");
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"))
}

/// The children of `pid` (host PIDs: this test's /proc is the host's).
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

/// Whether `pid` runs the hipvisor binary (it has exec'd it).
fn is_hipvisor(pid: u32) -> bool {
    std::fs::read_link(format!("/proc/{pid}/exe"))
        .is_ok_and(|p| p == std::path::Path::new(env!("CARGO_BIN_EXE_hipvisor")))
}

fn poll(what: &str, deadline: Duration, mut cond: impl FnMut() -> bool) {
    let until = Instant::now() + deadline;
    while !cond() {
        assert!(
            Instant::now() < until,
            "timed out after {deadline:?} waiting for: {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Kills `unshare` (and with it, `--kill-child`, the namespace) if a test fails midway.
struct Reap(Child);

impl Drop for Reap {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

#[test]
fn run_as_pid_1_serves_every_device() {
    let Some(flags) = unshare_flags() else { return };
    let out = as_pid_1(&flags, &["run", "--ops", "2000", "--json"])
        .output()
        .expect("unshare runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let v = json(&out.stdout);
    assert!(out.status.success(), "{v}\n{stderr}");
    assert!(v["ops"]["submitted"].as_u64().unwrap() >= 2000, "{v}");
    assert_eq!(v["ops"]["submitted"], v["ops"]["succeeded"], "{v}");
    assert_eq!(v["restarts"], 0, "no worker died at its start: {v}");
    let devices = v["devices_final"].as_array().unwrap();
    assert_eq!(devices.len(), 4, "{v}");
    assert!(devices.iter().all(|d| d["state"] == "ready"), "{v}");
}

#[test]
fn sigterm_to_pid_1_stops_the_run_gracefully_and_leaves_no_worker() {
    let Some(flags) = unshare_flags() else { return };
    let unshare = as_pid_1(&flags, &["run", "--ops", "100000000", "--json", "--devices", "2"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("unshare runs");
    let mut unshare = Reap(unshare);
    let stdout = unshare.0.stdout.take().unwrap();
    let stderr = unshare.0.stderr.take().unwrap();
    let read = |mut r: Box<dyn std::io::Read + Send>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = r.read_to_end(&mut buf);
            buf
        })
    };
    let (stdout, stderr) = (read(Box::new(stdout)), read(Box::new(stderr)));
    // unshare's child is PID 1 of the namespace: hipvisor, once it has exec'd.
    let mut host = 0;
    poll("hipvisor as unshare's child", Duration::from_secs(30), || {
        host = children(unshare.0.id())
            .into_iter()
            .find(|c| is_hipvisor(*c))
            .unwrap_or(0);
        host != 0
    });
    let pid_in_namespace = std::fs::read_to_string(format!("/proc/{host}/status"))
        .unwrap()
        .lines()
        .find_map(|l| {
            l.strip_prefix("NSpid:")
                .map(|s| s.split_whitespace().last().unwrap().to_string())
        });
    assert_eq!(
        pid_in_namespace.as_deref(),
        Some("1"),
        "hipvisor is PID 1 in its namespace"
    );
    let mut workers = Vec::new();
    poll("two workers serving", Duration::from_secs(30), || {
        workers = children(host).into_iter().filter(|w| is_hipvisor(*w)).collect();
        workers.len() == 2
    });
    let killed = Command::new("kill")
        .args(["-TERM", &host.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let mut status = None;
    poll("hipvisor to stop after SIGTERM", Duration::from_secs(30), || {
        status = unshare.0.try_wait().unwrap();
        status.is_some()
    });
    let status = status.unwrap();
    let stderr = String::from_utf8_lossy(&stderr.join().unwrap()).into_owned();
    let v = json(&stdout.join().unwrap());
    assert_eq!(status.code(), Some(143), "128 + SIGTERM: {v}\n{stderr}");
    assert_eq!(v["interrupted"], "SIGTERM", "{v}");
    assert_eq!(v["ops"]["missing_replies"], 0, "{v}");
    assert_eq!(v["ops"]["wrong_results"], 0, "{v}");
    assert_eq!(v["metrics_consistent"], true, "{v}");
    assert!(stderr.contains("SIGTERM: stopping"), "{stderr}");
    for pid in workers.iter().chain([&host]) {
        assert!(!alive(*pid), "process {pid} of the namespace outlived the run");
    }
}

/// Whether `pid` has a handler for SIGTERM (its SigCgt mask in /proc).
fn catches_sigterm(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status")).is_ok_and(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("SigCgt:"))
            .and_then(|m| u64::from_str_radix(m.trim(), 16).ok())
            .is_some_and(|m| m & (1 << (15 - 1)) != 0)
    })
}

#[test]
fn sigterm_to_pid_1_ends_a_bench() {
    let Some(flags) = unshare_flags() else { return };
    let unshare = as_pid_1(&flags, &["bench", "--ops", "1000000000", "--reps", "1", "--json"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("unshare runs");
    let mut unshare = Reap(unshare);
    let mut host = 0;
    poll("hipvisor bench handling SIGTERM", Duration::from_secs(30), || {
        host = children(unshare.0.id())
            .into_iter()
            .find(|c| is_hipvisor(*c) && catches_sigterm(*c))
            .unwrap_or(0);
        host != 0
    });
    assert!(
        Command::new("kill")
            .args(["-TERM", &host.to_string()])
            .status()
            .unwrap()
            .success()
    );
    let mut status = None;
    poll("the bench to end after SIGTERM", Duration::from_secs(30), || {
        status = unshare.0.try_wait().unwrap();
        status.is_some()
    });
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut unshare.0.stderr.take().unwrap(), &mut stderr).unwrap();
    assert_eq!(status.unwrap().code(), Some(143), "128 + SIGTERM: {stderr}");
    assert!(stderr.contains("SIGTERM: interrupted"), "{stderr}");
}
