//! Subcommands of the `hipvisor` binary.

pub(crate) mod bench;
pub(crate) mod run;
#[cfg(feature = "traces")]
pub(crate) mod traces;

use std::process::ExitCode;

use crate::CommonArgs;

/// `hipvisor devices`: one line per device, or a clear error (exit status 1).
pub(crate) fn devices(args: &CommonArgs) -> ExitCode {
    let config = match args.load() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("hipvisor: {e}");
            return ExitCode::from(2);
        }
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
