//! What the command-line tests (`cli.rs`, `pid1.rs`) share: a look at processes through
//! `/proc`, and polling for a condition with a deadline.
#![allow(dead_code, unreachable_pub)] // each test file uses its own part

use std::time::{Duration, Instant};

/// The children of `pid` (this test's /proc is the host's, so host PIDs).
pub fn children(pid: u32) -> Vec<u32> {
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

/// Whether `pid` runs (exists and is not a zombie).
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| !s.rsplit(')').next().is_some_and(|r| r.trim_start().starts_with('Z')))
}

/// Whether `signal` is in `pid`'s signal mask `field` of /proc (`SigBlk`: blocked,
/// `SigCgt`: caught).
pub fn signal_mask_has(pid: u32, field: &str, signal: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status")).is_ok_and(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|m| u64::from_str_radix(m.trim(), 16).ok())
            .is_some_and(|m| m & (1 << (signal - 1)) != 0)
    })
}

/// Polls `cond` every 10 ms until it holds; fails naming `what` after `deadline`.
pub fn poll(what: &str, deadline: Duration, mut cond: impl FnMut() -> bool) {
    let until = Instant::now() + deadline;
    while !cond() {
        assert!(
            Instant::now() < until,
            "timed out after {deadline:?} waiting for: {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}
