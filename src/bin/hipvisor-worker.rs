//! `hipvisor-worker`: serves one device for a hipvisor runtime in process isolation.
//! The runtime starts it; run by hand it explains itself and exits.

use std::process::ExitCode;

fn main() -> ExitCode {
    if let Some(code) = hipvisor_core::worker::run_if_worker() {
        return code;
    }
    eprintln!(
        "hipvisor-worker serves one GPU for a hipvisor runtime in process isolation; the runtime starts it \
         (with {} set). It is not meant to be run by hand.",
        hipvisor_core::ipc::WORKER_ENV
    );
    ExitCode::from(2)
}
