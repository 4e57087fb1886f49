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
    let cookie = match read_cookie(&args.cookie_file) {
        Ok(c) => c,
        Err(code) => return code,
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

/// The cookie in `path`, without its trailing newline; exit status 2 when it cannot be read
/// or is empty.
pub(crate) fn read_cookie(path: &std::path::Path) -> Result<String, ExitCode> {
    match std::fs::read_to_string(path) {
        Ok(c) if !c.trim_end_matches(['\n', '\r']).is_empty() => Ok(c.trim_end_matches(['\n', '\r']).to_string()),
        Ok(_) => {
            eprintln!("hipvisor: the cookie file {} is empty", path.display());
            Err(ExitCode::from(2))
        }
        Err(e) => {
            eprintln!("hipvisor: cannot read the cookie file {}: {e}", path.display());
            Err(ExitCode::from(2))
        }
    }
}

/// What `run --join` reports of the cluster at its end: the nodes' counts merged into one
/// snapshot, and the check that each node's metrics counted exactly the requests this
/// application got answers for from it.
pub(crate) struct ClusterEnd {
    /// The live nodes' counts, summed (ops, retries, restarts, task reruns — the cluster's
    /// own reruns across nodes included).
    pub(crate) snapshot: hipvisor::Snapshot,
    /// Answered and succeeded, by the checked nodes' metrics.
    pub(crate) metric: (u64, u64),
    /// Answered and succeeded, as this application saw them from the same nodes.
    pub(crate) answered: (u64, u64),
    /// Whether every node that stayed live counted what it answered this run (and at most
    /// the requests abandoned besides): [`hipvisor::cluster::NodeReport::consistent`].
    pub(crate) consistent: bool,
    /// `[{"addr", "node", "devices", "ops", ...}]`, one per node seen.
    pub(crate) nodes: serde_json::Value,
    /// The nodes' devices (`node`, `id`, `state`, `live`) as each live node reports them
    /// now; a lost node's, `lost`: the run's `devices_final`.
    pub(crate) devices: serde_json::Value,
}

impl ClusterEnd {
    /// The end of a run on `cluster`. A node lost during the run (dead, or frozen and back)
    /// is excluded from the check and reported: requests it ran may have been answered
    /// `NodeLost` here, and a dead one cannot be asked.
    pub(crate) async fn of(cluster: &hipvisor::cluster::Cluster) -> ClusterEnd {
        let mut end = ClusterEnd {
            snapshot: hipvisor::Snapshot::default(),
            metric: (0, 0),
            answered: (0, 0),
            consistent: true,
            nodes: serde_json::Value::Array(Vec::new()),
            devices: serde_json::Value::Array(Vec::new()),
        };
        let s = &mut end.snapshot;
        let (mut nodes, mut devices) = (Vec::new(), Vec::new());
        for r in cluster.report().await {
            // A node without counts now (lost, or not answering) has its devices seen listed
            // too: lost with it, or of a state not known.
            let states: Vec<&str> = match &r.counts {
                Some(c) => c.devices.iter().map(|d| d.as_str()).collect(),
                None => vec![if r.live { "unknown" } else { "lost" }; r.devices as usize],
            };
            for (id, state) in states.into_iter().enumerate() {
                devices.push(serde_json::json!({"node": r.addr, "id": id, "state": state, "live": r.live}));
            }
            let verdict = r.consistent();
            let checked = verdict.is_some();
            if checked {
                end.answered.0 += r.tally.answered;
                end.answered.1 += r.tally.succeeded;
                if let Some(c) = &r.counts {
                    end.metric.0 += c.ops_total;
                    end.metric.1 += c.ops_succeeded;
                }
            }
            // A node that stayed live and gave no counts cannot vouch for what it did.
            let unvouched = r.live && r.losses == 0 && r.counts.is_none();
            if verdict == Some(false) || unvouched {
                end.consistent = false;
            }
            if let Some(c) = r.counts.as_ref().filter(|_| r.live) {
                s.ops_total += c.ops_total;
                s.ops_succeeded += c.ops_succeeded;
                s.ops_failed += c.ops_total - c.ops_succeeded;
                s.restarts += c.restarts;
                s.retries.attempts += c.retries.attempts;
                s.retries.succeeded += c.retries.succeeded;
                s.retries.exhausted += c.retries.exhausted;
                s.recovery.task_reruns += c.task_reruns;
            }
            nodes.push(serde_json::json!({
                "addr": r.addr,
                "node": r.node,
                "live": r.live,
                "lost": r.losses,
                "devices": r.devices,
                "ops": r.tally.answered,
                "succeeded": r.tally.succeeded,
                "abandoned": r.tally.abandoned,
                "node_ops": r.counts.as_ref().map(|c| c.ops_total),
                "device_states": r.counts.as_ref().map(|c| c.devices.iter().map(|d| d.as_str()).collect::<Vec<_>>()),
                "checked": checked,
            }));
        }
        end.snapshot.recovery.task_reruns += cluster.task_reruns();
        end.nodes = serde_json::Value::Array(nodes);
        end.devices = serde_json::Value::Array(devices);
        end
    }
}
