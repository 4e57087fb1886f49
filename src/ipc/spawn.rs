//! Starting, stopping and reading the end of worker processes.
#![allow(unsafe_code)]

use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};

use super::socket::{Channel, WORKER_ENV, WORKER_FD};

/// Sends SIGKILL to a worker process (a hung op, shutdown). Errors (already gone) are
/// ignored.
pub fn kill(pid: u32) {
    if let Ok(pid) = i32::try_from(pid)
        && pid > 0
    {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
    }
}

/// A worker's wait status in words: `worker killed by signal 6 (SIGABRT)`, `worker exited
/// with status 3`.
pub fn describe_exit(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    if let Some(signal) = status.signal() {
        let name = nix::sys::signal::Signal::try_from(signal).map_or("unknown signal", |s| s.as_str());
        let core = if status.core_dumped() { ", core dumped" } else { "" };
        format!("worker killed by signal {signal} ({name}{core})")
    } else if let Some(code) = status.code() {
        format!("worker exited with status {code}")
    } else {
        format!("worker ended ({status})")
    }
}

/// Whether a worker ended by SIGABRT: how ROCm ends a process whose kernel made a memory
/// access fault (and how the simulator's `hip` flavour does).
pub fn aborted(status: std::process::ExitStatus) -> bool {
    use std::os::unix::process::ExitStatusExt;
    status.signal() == Some(nix::libc::SIGABRT)
}

/// Starts a worker process running `command` with `channel` as its descriptor
/// [`WORKER_FD`]. The worker dies with the thread that spawned it (`PR_SET_PDEATHSIG`), so
/// call this from a long-lived thread.
///
/// # Errors
/// The OS error of the spawn.
pub fn spawn_worker(mut command: Command, channel: Channel) -> std::io::Result<Child> {
    let fd = channel.fd.as_raw_fd();
    command.env(WORKER_ENV, WORKER_FD.to_string());
    // SAFETY: the closure runs in the child between fork and exec and only makes
    // async-signal-safe calls (dup2, fcntl, prctl, sigemptyset, sigaddset, pthread_sigmask)
    // on descriptors and a signal set it owns; `fd` stays open in the parent until the spawn
    // returns (the channel is dropped afterwards).
    unsafe {
        command.pre_exec(move || {
            if nix::libc::dup2(fd, WORKER_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // dup2 onto a new number leaves the copy without close-on-exec; onto the same
            // number (the socket already is WORKER_FD) it does nothing, and the socket would
            // close at the exec. Clear the flag either way.
            if nix::libc::fcntl(WORKER_FD, nix::libc::F_SETFD, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if nix::libc::prctl(nix::libc::PR_SET_PDEATHSIG, nix::libc::SIGKILL) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // SIGINT and SIGTERM blocked from before the exec (the mask survives it), so a
            // terminal's Ctrl-C to the process group, or `kill -TERM -<pgid>` and systemd's
            // `KillMode=control-group` stop, cannot kill a worker before its first line
            // blocks them too (src/worker.rs): the host decides how to stop.
            let mut set = std::mem::zeroed::<nix::libc::sigset_t>();
            nix::libc::sigemptyset(&mut set);
            nix::libc::sigaddset(&mut set, nix::libc::SIGINT);
            nix::libc::sigaddset(&mut set, nix::libc::SIGTERM);
            // pthread_sigmask returns the error number; it does not set errno.
            let rc = nix::libc::pthread_sigmask(nix::libc::SIG_BLOCK, &set, std::ptr::null_mut());
            if rc != 0 {
                return Err(std::io::Error::from_raw_os_error(rc));
            }
            Ok(())
        });
    }
    let child = command.spawn();
    drop(channel);
    child
}
