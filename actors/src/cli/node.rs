//! `hipvisor node` (feature `cluster`): serves this host's devices to application actors on
//! other hosts, until SIGINT or SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use hipvisor::Runtime;

use crate::CommonArgs;

/// Flags of `hipvisor node`.
#[derive(Args, Debug)]
pub(crate) struct NodeArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Address to serve on (a fixed port: peers dial it).
    #[arg(long)]
    listen: SocketAddr,
    /// File holding the cluster's cookie (a trailing newline is ignored); peers that do not
    /// know it are refused.
    #[arg(long)]
    cookie_file: PathBuf,
    /// Serve /metrics, /healthz, /readyz and the dashboard on this address too.
    #[arg(long)]
    metrics_addr: Option<SocketAddr>,
}

/// Runs the node; exit status 0 after a signal, 1 when it cannot serve, 2 for bad flags.
pub(crate) fn main(args: NodeArgs) -> ExitCode {
    let config = match args.common.config() {
        Ok(c) => c,
        Err(code) => return code,
    };
    let cookie = match std::fs::read_to_string(&args.cookie_file) {
        Ok(c) if !c.trim_end_matches(['\n', '\r']).is_empty() => c.trim_end_matches(['\n', '\r']).to_string(),
        Ok(_) => {
            eprintln!("hipvisor: the cookie file {} is empty", args.cookie_file.display());
            return ExitCode::from(2);
        }
        Err(e) => {
            eprintln!(
                "hipvisor: cannot read the cookie file {}: {e}",
                args.cookie_file.display()
            );
            return ExitCode::from(2);
        }
    };
    let Ok(tokio) = tokio::runtime::Builder::new_multi_thread().enable_all().build() else {
        eprintln!("hipvisor: cannot start tokio");
        return ExitCode::FAILURE;
    };
    tokio.block_on(async move {
        let mut builder = Runtime::builder().config(config);
        if let Some(addr) = args.metrics_addr {
            builder = builder.serve_metrics(addr);
        }
        let runtime = match builder.start().await {
            Ok(r) => r,
            Err(e) => {
                eprintln!("hipvisor: {e}");
                return ExitCode::FAILURE;
            }
        };
        let node = match hipvisor::cluster::serve(&runtime, args.listen, &cookie).await {
            Ok(n) => n,
            Err(e) => {
                eprintln!("hipvisor: {e}");
                runtime.shutdown().await;
                return ExitCode::FAILURE;
            }
        };
        if let Some(addr) = runtime.metrics_addr() {
            eprintln!("metrics on {addr}");
        }
        eprintln!(
            "listening on {} (node {}, {} devices)",
            args.listen,
            node.name(),
            runtime.device_count()
        );
        use tokio::signal::unix::{SignalKind, signal};
        match (signal(SignalKind::interrupt()), signal(SignalKind::terminate())) {
            (Ok(mut int), Ok(mut term)) => {
                tokio::select! {
                    _ = int.recv() => {}
                    _ = term.recv() => {}
                }
            }
            _ => std::future::pending::<()>().await,
        }
        eprintln!("hipvisor: stopping the node");
        drop(node);
        runtime.shutdown().await;
        ExitCode::SUCCESS
    })
}
