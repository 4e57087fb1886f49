//! What the runtime keeps, runtime-wide, to recover without the application's help: the ids
//! of durable buffers (one id per replicated buffer, on every device), and the sticky faults
//! of tasks by fingerprint (a task that keeps faulting is quarantined: poison requests, not
//! poison kernels).

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};
use std::time::Instant;

use hipvisor_core::DURABLE_ID_BASE;
use hipvisor_core::config::SupervisorConfig;
use hipvisor_core::supervision::SuspectFaults;
use hipvisor_core::sync::{lock, read, write};

/// Runtime-wide recovery state.
pub(crate) struct Recovery {
    next_durable: AtomicU64,
    /// Sticky faults by task fingerprint (keyed `(fingerprint, "task")`, the quarantine
    /// rule's kernel key), within `supervisor.quarantine_window_ms`.
    task_faults: Mutex<SuspectFaults>,
    /// Fingerprints of quarantined tasks.
    quarantined: RwLock<HashSet<u64>>,
    /// Whether any task was ever bound (`Op::Task` jobs may be queued).
    tasks_seen: AtomicBool,
}

impl Default for Recovery {
    fn default() -> Self {
        Recovery {
            next_durable: AtomicU64::new(DURABLE_ID_BASE),
            task_faults: Mutex::new(SuspectFaults::new()),
            quarantined: RwLock::new(HashSet::new()),
            tasks_seen: AtomicBool::new(false),
        }
    }
}

impl Recovery {
    /// A new durable buffer id (never given twice in a runtime).
    pub(crate) fn durable_id(&self) -> u64 {
        self.next_durable.fetch_add(1, Ordering::Relaxed)
    }

    /// Records that the task with `fingerprint` faulted (a sticky fault, or its worker ended
    /// by a GPU memory fault while it ran). `true` when it is now quarantined: it faulted in
    /// `quarantine_after` of its runs within the window.
    pub(crate) fn task_faulted(&self, config: &SupervisorConfig, fingerprint: u64) -> bool {
        let key = (fingerprint, "task".to_string());
        let reached = lock(&self.task_faults).record(config, &[key], Instant::now());
        if reached.is_empty() {
            return false;
        }
        write(&self.quarantined).insert(fingerprint);
        true
    }

    /// Whether the task with `fingerprint` is quarantined.
    pub(crate) fn is_quarantined(&self, fingerprint: u64) -> bool {
        read(&self.quarantined).contains(&fingerprint)
    }

    /// Records that tasks are in use.
    pub(crate) fn saw_task(&self) {
        if !self.tasks_seen.load(Ordering::Relaxed) {
            self.tasks_seen.store(true, Ordering::Relaxed);
        }
    }

    /// Whether any task was ever submitted.
    pub(crate) fn tasks_seen(&self) -> bool {
        self.tasks_seen.load(Ordering::Relaxed)
    }

    /// Whether any task is quarantined (checked before a task's fingerprint is computed).
    pub(crate) fn any_quarantined(&self) -> bool {
        !read(&self.quarantined).is_empty()
    }
}
