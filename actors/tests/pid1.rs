//! `hipvisor` as PID 1 of its PID namespace, as a container's entrypoint without an init:
//! the workers must not take "my parent is PID 1" for a dead host, and SIGTERM (which the
//! kernel does not act on by default for PID 1) must stop the run gracefully.
//!
//! `unshare --pid --fork --kill-child --mount-proc` makes the namespace (with `--user
//! --map-root-user` when not root). The tests skip, saying so, when `unshare` is missing or
//! not permitted — unless `CI_REQUIRE_TOOLS=1`, where they fail.

mod common;
use common::{alive, children, poll, signal_mask_has};

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

/// Whether `pid` runs the hipvisor binary (it has exec'd it).
fn is_hipvisor(pid: u32) -> bool {
    std::fs::read_link(format!("/proc/{pid}/exe"))
        .is_ok_and(|p| p == std::path::Path::new(env!("CARGO_BIN_EXE_hipvisor")))
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
    assert_eq!(v["restarts"], 0, "no worker died during the stop: {v}\n{stderr}");
    assert_eq!(v["ops"]["failed"], 0, "{v}\n{stderr}");
    assert_eq!(v["ops"]["missing_replies"], 0, "{v}");
    assert_eq!(v["ops"]["wrong_results"], 0, "{v}");
    assert_eq!(v["metrics_consistent"], true, "{v}");
    assert!(stderr.contains("SIGTERM: stopping"), "{stderr}");
    // Cannot fail as such: when PID 1 exits the kernel SIGKILLs its whole namespace. Whether
    // the workers die with their host by themselves is
    // `sigterm_to_the_process_group_stops_the_run_gracefully_and_leaves_no_orphan`.
    for pid in workers.iter().chain([&host]) {
        assert!(!alive(*pid), "process {pid} of the namespace outlived the run");
    }
}

/// How many times `pid`'s main thread has waited (its voluntary context switches).
fn waits(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
                .and_then(|n| n.trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Makes this test process a child subreaper (once; it stays one): an orphaned descendant
/// becomes its child instead of the system init's, where [`children`] finds it.
fn become_subreaper() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| nix::sys::prctl::set_child_subreaper(true).expect("PR_SET_CHILD_SUBREAPER"));
}

/// A `hipvisor run` in process isolation with two workers serving ops, not PID 1 and in its
/// own process group (as a service or a terminal's job), with this test process a
/// subreaper.
struct Run {
    host: Reap,
    workers: Vec<u32>,
    stdout: std::thread::JoinHandle<Vec<u8>>,
    stderr: std::thread::JoinHandle<Vec<u8>>,
}

impl Run {
    fn start() -> Self {
        use std::os::unix::process::CommandExt;
        become_subreaper();
        let args = [
            "run",
            "--ops",
            "100000000",
            "--json",
            "--devices",
            "2",
            "--isolation",
            "process",
        ];
        let host = Command::new(env!("CARGO_BIN_EXE_hipvisor"))
            .args(args)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .env_remove("RUST_LOG")
            .process_group(0)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("hipvisor runs");
        let mut host = Reap(host);
        let pid = host.0.id();
        let read = |mut r: Box<dyn std::io::Read + Send>| {
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                let _ = r.read_to_end(&mut buf);
                buf
            })
        };
        let stdout = read(Box::new(host.0.stdout.take().unwrap()));
        let stderr = read(Box::new(host.0.stderr.take().unwrap()));
        let mut workers = Vec::new();
        poll("two workers", Duration::from_secs(30), || {
            workers = children(pid).into_iter().filter(|w| is_hipvisor(*w)).collect();
            workers.len() == 2
        });
        // Ops under way (a worker waits on its socket for each request; its start takes a
        // handful of such waits), and the host's handler installed.
        poll("the workers serving ops", Duration::from_secs(60), || {
            workers.iter().all(|w| waits(*w) > 1000) && catches_sigterm(pid)
        });
        Self {
            host,
            workers,
            stdout,
            stderr,
        }
    }

    /// Waits for the host to exit; its exit status.
    fn wait(&mut self) -> std::process::ExitStatus {
        let mut status = None;
        poll("the run to end", Duration::from_secs(60), || {
            status = self.host.0.try_wait().unwrap();
            status.is_some()
        });
        status.unwrap()
    }

    /// Asserts that no worker outlives the (exited) host: each worker ends, and no process
    /// of the host's process group is left orphaned (this subreaper would be its parent).
    /// Before [`Run::output`]: an orphan holds the host's stdout and stderr open.
    fn no_worker_outlives_the_host(&self) {
        let group = self.host.0.id();
        let until = Instant::now() + Duration::from_secs(30);
        loop {
            let mut left: Vec<u32> = self.workers.iter().copied().filter(|w| alive(*w)).collect();
            left.extend(
                children(std::process::id())
                    .into_iter()
                    .filter(|c| alive(*c) && process_group(*c) == Some(group)),
            );
            left.sort_unstable();
            left.dedup();
            if left.is_empty() {
                return;
            }
            assert!(
                Instant::now() < until,
                "processes outlived their host {group} by 30 s: {left:?} (its workers: {:?})",
                self.workers
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The host's stdout and stderr.
    fn output(self) -> (Vec<u8>, String) {
        let stderr = String::from_utf8_lossy(&self.stderr.join().unwrap()).into_owned();
        (self.stdout.join().unwrap(), stderr)
    }
}

/// The process group of `pid`.
fn process_group(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit(')').next()?.split_whitespace().nth(2)?.parse().ok()
}

/// `kill -TERM` to a whole process group, as `kill -TERM -<pgid>` or systemd's default
/// `KillMode=control-group` does, with `hipvisor` not PID 1 (so the kernel kills nothing for
/// it): the workers must ignore the group's SIGTERM (no restarts, no failed ops during the
/// graceful stop) and still end with their host, leaving no orphan.
#[test]
fn sigterm_to_the_process_group_stops_the_run_gracefully_and_leaves_no_orphan() {
    let mut run = Run::start();
    let group = nix::unistd::Pid::from_raw(-i32::try_from(run.host.0.id()).unwrap());
    nix::sys::signal::kill(group, nix::sys::signal::Signal::SIGTERM).expect("kill the group");
    let status = run.wait();
    run.no_worker_outlives_the_host();
    let (stdout, stderr) = run.output();
    let v = json(&stdout);
    assert_eq!(status.code(), Some(143), "128 + SIGTERM: {v}\n{stderr}");
    assert_eq!(v["interrupted"], "SIGTERM", "{v}");
    assert_eq!(
        v["restarts"], 0,
        "the workers ignored the group's SIGTERM: {v}\n{stderr}"
    );
    assert_eq!(v["ops"]["failed"], 0, "{v}\n{stderr}");
    assert_eq!(v["ops"]["missing_replies"], 0, "{v}");
    assert_eq!(v["ops"]["wrong_results"], 0, "{v}");
    assert_eq!(v["metrics_consistent"], true, "{v}");
    assert!(stderr.contains("SIGTERM: stopping"), "{stderr}");
}

/// A host killed outright (SIGKILL to it alone: the OOM killer, systemd's final SIGKILL
/// with `KillMode=mixed`) stops nothing itself: its workers must end by themselves (the
/// parent-death signal, end of file on their socket), leaving no orphan.
#[test]
fn a_host_killed_outright_leaves_no_orphan() {
    use std::os::unix::process::ExitStatusExt;
    let mut run = Run::start();
    let host = nix::unistd::Pid::from_raw(i32::try_from(run.host.0.id()).unwrap());
    nix::sys::signal::kill(host, nix::sys::signal::Signal::SIGKILL).expect("kill the host");
    let status = run.wait();
    assert_eq!(status.signal(), Some(9), "{status:?}");
    run.no_worker_outlives_the_host();
}

/// Whether `pid` has a handler for SIGTERM (its SigCgt mask in /proc).
fn catches_sigterm(pid: u32) -> bool {
    signal_mask_has(pid, "SigCgt", 15)
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
