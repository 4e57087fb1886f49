//! The `hipvisor` command line: `run` (the main job), `chaos`, `bench`, `devices`, `config`.
//!
//! Logs and progress go to stderr. `run`, `chaos` and `bench` print a short human summary on
//! stdout (`cli::summary`), or with `--json` exactly one JSON object: the full report.
//!
//! SIGINT and SIGTERM are handled (as PID 1 of a container without an init the kernel gives
//! them no default action): `run` and `chaos` stop gracefully and report (see `cli::run`),
//! `bench` exits at once with 128 + the signal's number.

mod cli;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use hipvisor::core::config::{ConfigLoader, Isolation};
use hipvisor::{BackendKind, RuntimeConfig};

/// A supervised multi-GPU runtime.
#[derive(Parser)]
#[command(
    name = "hipvisor",
    version,
    about,
    arg_required_else_help = true,
    after_help = "`run`, `chaos` and `bench` print a short summary on stdout, or with --json the full report\n\
                  as one JSON object (and nothing else). Logs and progress go to stderr.\n\
                  Exit status: 0 success, 1 failure, 2 bad configuration or usage, 130/143 interrupted."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// The subcommands. The first paragraph of each one's doc is its line in `hipvisor --help`.
#[derive(Subcommand)]
enum Command {
    /// Run the main job: application actors allocate, upload, launch, download and verify.
    Run(cli::run::RunArgs),
    /// Soak under the fault plan of config/chaos.toml and check the invariants.
    ///
    /// The invariants: no missing reply, no hang, no wrong result, metrics equal to what the
    /// application observed, every device ready at the end. Exits non-zero on any violation.
    Chaos(cli::run::RunArgs),
    /// Measure the runtime against baselines measured in the same run.
    Bench(cli::bench::BenchArgs),
    /// List the backend's devices.
    Devices(CommonArgs),
    /// Print the effective configuration (file, environment, flags) as TOML.
    Config(CommonArgs),
    /// Serve this host's devices to application actors on other hosts (feature `cluster`).
    #[cfg(feature = "cluster")]
    Node(cli::node::NodeArgs),
}

/// Flags shared by every command; each overrides the configuration.
#[derive(Args, Clone, Debug)]
pub(crate) struct CommonArgs {
    /// Config file (default: config/default.toml if present, else built-in defaults).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Backend: sim, hip or cuda.
    #[arg(long, value_enum)]
    backend: Option<BackendArg>,
    /// Number of simulated devices, or the first N real devices.
    #[arg(long)]
    devices: Option<u32>,
    /// Isolation: thread or process.
    #[arg(long, value_enum)]
    isolation: Option<IsolationArg>,
    /// Seed of the simulator's fault plan (overrides sim.seed).
    #[arg(long)]
    seed: Option<u64>,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum BackendArg {
    Sim,
    Hip,
    Cuda,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum IsolationArg {
    Thread,
    Process,
}

impl CommonArgs {
    /// Loads the configuration: file, then environment, then these flags.
    /// The configuration, or — after saying why on stderr — the exit status of a bad one (2).
    pub(crate) fn config(&self) -> Result<RuntimeConfig, ExitCode> {
        self.load().map_err(|e| {
            eprintln!("hipvisor: {e}");
            ExitCode::from(2)
        })
    }

    fn load(&self) -> Result<RuntimeConfig, String> {
        let default = PathBuf::from("config/default.toml");
        let path = self.config.clone().or_else(|| default.exists().then_some(default));
        let mut overrides = Vec::new();
        let backend = self.backend.map(|b| match b {
            BackendArg::Sim => BackendKind::Sim,
            BackendArg::Hip => BackendKind::Hip,
            BackendArg::Cuda => BackendKind::Cuda,
        });
        if let Some(b) = backend {
            overrides.push(("runtime.backend".to_string(), b.as_str().to_string()));
        }
        if let Some(i) = self.isolation {
            let i = match i {
                IsolationArg::Thread => Isolation::Thread,
                IsolationArg::Process => Isolation::Process,
            };
            overrides.push(("runtime.isolation".to_string(), i.as_str().to_string()));
        }
        if let Some(s) = self.seed {
            overrides.push(("sim.seed".to_string(), s.to_string()));
        }
        let mut loader = ConfigLoader::new()
            .file(path.as_deref())
            .process_env()
            .overrides(&overrides);
        if let Some(n) = self.devices {
            // For the simulator, --devices is the number of simulated devices; for real
            // backends, the first N devices.
            let probe = loader.clone().load().map_err(|e| e.to_string())?;
            let key = if probe.runtime.backend == BackendKind::Sim {
                "sim.devices"
            } else {
                "runtime.devices"
            };
            overrides.push((key.to_string(), n.to_string()));
            loader = loader.overrides(&overrides);
        }
        loader.load().map_err(|e| e.to_string())
    }
}

/// Logs (and, with `--otel-traces`, spans) go to stderr: stdout is for results.
/// Returns the tracer provider to flush at exit.
fn init_logging(otel_traces: bool) -> Result<Option<Box<dyn FnOnce()>>, String> {
    use std::io::IsTerminal;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::{EnvFilter, Layer};
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into());
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .with_filter(filter);
    let registry = tracing_subscriber::registry().with(fmt);
    if !otel_traces {
        registry.init();
        return Ok(None);
    }
    #[cfg(feature = "traces")]
    {
        let provider = cli::traces::provider();
        let spans = cli::traces::layer(&provider).with_filter(EnvFilter::new("hipvisor=info"));
        registry.with(spans).init();
        Ok(Some(Box::new(move || {
            let _ = provider.shutdown();
        })))
    }
    #[cfg(not(feature = "traces"))]
    Err("--otel-traces needs the `traces` feature".into())
}

fn main() -> ExitCode {
    // In process isolation the runtime starts this same program as each device's worker.
    if let Some(code) = hipvisor::core::worker::run_if_worker() {
        return code;
    }
    let cli = Cli::parse();
    let otel_traces = matches!(&cli.command, Command::Run(a) | Command::Chaos(a) if a.otel_traces);
    let flush_traces = match init_logging(otel_traces) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("hipvisor: {e}");
            return ExitCode::from(2);
        }
    };
    let code = match cli.command {
        Command::Run(args) => cli::run::main(args),
        Command::Bench(args) => {
            cli::exit_on_signal();
            cli::bench::main(args)
        }
        Command::Chaos(args) => cli::run::main(args.for_chaos()),
        Command::Devices(args) => cli::devices(&args),
        #[cfg(feature = "cluster")]
        Command::Node(args) => cli::node::main(args),
        Command::Config(args) => match args.config() {
            Ok(c) => {
                print!("{}", c.to_toml());
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
    };
    if let Some(flush) = flush_traces {
        flush();
    }
    code
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::Cli;

    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }

    /// Every subcommand of the definition, with its one-line description, is in `--help`.
    #[test]
    fn help_lists_every_subcommand_with_one_line() {
        let mut cli = Cli::command();
        let help = cli.render_help().to_string();
        let subcommands: Vec<_> = cli.get_subcommands().filter(|c| c.get_name() != "help").collect();
        assert!(subcommands.len() >= 5, "{help}");
        for sub in subcommands {
            let about = sub
                .get_about()
                .unwrap_or_else(|| panic!("`{}` has no description", sub.get_name()))
                .to_string();
            assert!(!about.contains('\n'), "`{}`: one line: {about:?}", sub.get_name());
            let line = help
                .lines()
                .find(|l| l.trim_start().starts_with(&format!("{} ", sub.get_name())))
                .unwrap_or_else(|| panic!("`{}` in --help:\n{help}", sub.get_name()));
            assert!(line.contains(&about), "{line:?} has {about:?}");
        }
    }
}
