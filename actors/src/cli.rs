//! Subcommands of the `hipvisor` binary.

pub(crate) mod bench;
#[cfg(feature = "cluster")]
pub(crate) mod bench_remote;
pub(crate) mod inference;
pub(crate) mod latency;
pub(crate) mod measure;
#[cfg(feature = "cluster")]
pub(crate) mod node;
pub(crate) mod run;
pub(crate) mod summary;
pub(crate) mod target;
#[cfg(feature = "traces")]
pub(crate) mod traces;

use std::process::ExitCode;

use crate::CommonArgs;

/// Linux's SIGINT and SIGTERM.
pub(crate) const SIGINT: i32 = 2;
pub(crate) const SIGTERM: i32 = 15;

pub(crate) fn signal_name(signal: i32) -> &'static str {
    match signal {
        SIGINT => "SIGINT",
        SIGTERM => "SIGTERM",
        _ => "a signal",
    }
}

/// For commands without a graceful stop (`bench`): SIGINT or SIGTERM exits at once with
/// status 128 plus the signal's number, as the default action would have ended the process —
/// except that as PID 1 of a container (an entrypoint without an init) the kernel gives those
/// signals no default action. The workers die with the process (their parent-death signal).
/// Returns once the handlers are installed.
pub(crate) fn exit_on_signal() {
    let (installed, wait) = std::sync::mpsc::channel();
    let spawned = std::thread::Builder::new()
        .name("hipvisor-signals".into())
        .spawn(move || {
            use tokio::signal::unix::{SignalKind, signal};
            let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = installed.send(Err(e.to_string()));
                    return;
                }
            };
            rt.block_on(async {
                let (mut int, mut term) = match (signal(SignalKind::interrupt()), signal(SignalKind::terminate())) {
                    (Ok(int), Ok(term)) => (int, term),
                    (Err(e), _) | (_, Err(e)) => {
                        let _ = installed.send(Err(e.to_string()));
                        return;
                    }
                };
                let _ = installed.send(Ok(()));
                let signal = tokio::select! {
                    _ = int.recv() => SIGINT,
                    _ = term.recv() => SIGTERM,
                };
                eprintln!("hipvisor: {}: interrupted, exiting", signal_name(signal));
                std::process::exit(128 + signal);
            });
        });
    let result = match spawned {
        Ok(_) => wait.recv().unwrap_or_else(|_| Err("the signal thread ended".into())),
        Err(e) => Err(e.to_string()),
    };
    if let Err(e) = result {
        eprintln!("hipvisor: cannot handle SIGINT and SIGTERM: {e}");
    }
}

/// `hipvisor devices`: one line per device, or a clear error (exit status 1).
pub(crate) fn devices(args: &CommonArgs) -> ExitCode {
    let config = match args.config() {
        Ok(c) => c,
        Err(code) => return code,
    };
    let backend = match hipvisor::make_backend(&config) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("hipvisor: {e}");
            return ExitCode::FAILURE;
        }
    };
    let count = match backend.device_count() {
        Ok(n) => n,
        Err(e) => {
            eprintln!("hipvisor: {} backend: {e}", backend.kind());
            return ExitCode::FAILURE;
        }
    };
    let shown = if config.runtime.devices == 0 {
        count
    } else {
        config.runtime.devices.min(count)
    };
    for d in 0..shown {
        match backend.device_info(d) {
            Ok(info) => println!(
                "{:>3}  {:<32} {:>10.1} GiB  {}{}{}",
                info.index,
                info.name,
                info.total_memory as f64 / f64::from(1u32 << 30),
                info.arch,
                info.pci_bus_id.map(|p| format!("  pci {p}")).unwrap_or_default(),
                info.uuid.map(|u| format!("  {u}")).unwrap_or_default()
            ),
            Err(e) => {
                eprintln!("hipvisor: device {d}: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    ExitCode::SUCCESS
}
