//! Beyond one machine (feature `cluster`): a node serves its devices to application actors on
//! other hosts through `ractor_cluster`, and an application joins nodes and uses their
//! devices.
//!
//! - **A node** ([`serve`], `hipvisor node`) runs a runtime on its local devices and, per
//!   device, a [`RemoteDeviceMsg`] server actor in the process group [`DEVICE_GROUP`], behind
//!   a `ractor_cluster` node server that authenticates peers by cookie.
//! - **An application** joins nodes ([`Cluster::join`], one `Cluster` per process: ractor's
//!   process groups are the process's) and finds their devices ([`Cluster::devices`]): a
//!   [`RemoteDevice`] offers the typed ops of a local device (and is a [`crate::Device`], the
//!   one device type for local and remote devices), each answered once — a reply or a typed
//!   [`RuntimeError`].
//! - **Tasks across the cluster:** [`Cluster::replicate`] and [`Cluster::replicate_module`]
//!   put a durable buffer and a module on every device of every live node, and
//!   [`Cluster::run`] places a task on the least-loaded ready device that holds what it
//!   names, cluster-wide — and runs a replayable task again on another device when its node
//!   is lost under it or its device cannot run it.
//! - **The protocol** is versioned ([`PROTOCOL`], in the group's name and in every message)
//!   and checked: requests and answers travel as bytes this module encodes and decodes
//!   itself, so an undecodable one is a typed error (`Remote`), never a message ractor drops
//!   silently while the caller waits.
//! - **Failures:** every remote request has an id and a deadline (the application's: the
//!   node's runtime answers by its own); a peer that goes away answers its pending requests
//!   `NodeLost { may_have_executed: true }` at once (ractor drops their reply ports with the
//!   session); a request a node does not answer by the deadline (and a margin) answers
//!   `DeadlineExceeded`. Heartbeats
//!   (`[cluster]`) find a frozen peer, whose socket stays open and whom ractor's own pings
//!   never time out: once silent for `heartbeat_timeout_ms` it is lost, and its requests
//!   are answered then.
//! - **Payloads of any size:** copies and replicas travel in chunks of 8 MiB, under the
//!   transport's 16 MiB frame (a larger frame closes the whole session: a request that
//!   would need one is refused before it is sent).
//! - **Rejoining:** a lost node's address is dialled again with backoff; a node that answers
//!   there (restarted, or resumed) is live again, and its devices take work again once they
//!   hold the cluster's replicas and modules, which they are given (a restarted node is a
//!   new process that holds none).

mod nodes;
mod remote;
mod replicas;
mod server;
mod state;
mod wire;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hipvisor_core::sync::lock;
use hipvisor_core::task::{ReplicatedBuffer, ReplicatedModule, Task};
use hipvisor_core::{ModuleSource, Payload};
use ractor::{Actor, ActorRef};
use ractor_cluster::NodeServer;
use ractor_cluster::NodeServerMessage;
use ractor_cluster::node::NodeConnectionMode;

use nodes::{Events, Nodes, redial};
pub use remote::RemoteDevice;
pub use replicas::CLUSTER_DEVICE;
pub use server::{Node, serve};
pub use state::Tally;
use state::{Inner, Known, counts_of, reachable};
use wire::JOIN_TIMEOUT;
pub use wire::{DEVICE_GROUP, NodeCounts, PROTOCOL, RemoteDeviceMsg};

use crate::error::RuntimeError;

static CLIENTS: AtomicU64 = AtomicU64::new(0);

/// An application's membership of a cluster: the nodes it joined. Dropping it leaves them.
pub struct Cluster {
    server: ActorRef<NodeServerMessage>,
    inner: Arc<Inner>,
    heartbeat: Option<tokio::task::JoinHandle<()>>,
    redial: Option<tokio::task::JoinHandle<()>>,
    _joined: Joined,
}

static JOINED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// This process's one joined [`Cluster`]: leaving lets another join.
struct Joined;

impl Drop for Joined {
    fn drop(&mut self) {
        JOINED.store(false, Ordering::Release);
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for h in [self.heartbeat.take(), self.redial.take()].into_iter().flatten() {
            h.abort();
        }
        self.server.stop(None);
    }
}

impl Cluster {
    /// Joins the nodes at `addrs`, authenticating with `cookie` (a trailing newline, as a
    /// cookie file has, is ignored). Requests to their devices get `runtime.op_deadline_ms`
    /// each; every `cluster.heartbeat_interval_ms` each node is asked whether it answers,
    /// and one silent for `cluster.heartbeat_timeout_ms` is lost.
    ///
    /// # Errors
    /// [`RuntimeError::Remote`] naming the node that could not be reached or refused the
    /// cookie.
    pub async fn join(
        addrs: &[SocketAddr],
        cookie: &str,
        config: &hipvisor_core::RuntimeConfig,
    ) -> Result<Cluster, RuntimeError> {
        // ractor's process groups are the process's: two clusters would see each other's
        // devices and sessions.
        if JOINED.swap(true, Ordering::AcqRel) {
            return Err(RuntimeError::Remote {
                node: "(this process)".into(),
                reason: "a Cluster is joined already in this process: one at a time".into(),
            });
        }
        let joined = Joined;
        let op_deadline = Duration::from_millis(config.runtime.op_deadline_ms);
        let cookie = cookie.trim_end_matches(['\n', '\r']).to_string();
        // Unique among the node's peers: two applications in containers share a PID.
        let me = format!(
            "hipvisor-client-{}-{}-{:08x}",
            std::process::id(),
            CLIENTS.fetch_add(1, Ordering::Relaxed),
            rand::random::<u32>()
        );
        let local = std::net::IpAddr::from([127, 0, 0, 1]);
        let server = NodeServer::new(
            0,
            cookie,
            me,
            local.to_string(),
            None,
            Some(NodeConnectionMode::Isolated),
        )
        .with_listen_addr(local);
        let refused = |node: String, reason: String| RuntimeError::Remote { node, reason };
        let (server, _) = match Actor::spawn(None, server, ()).await {
            Ok(s) => s,
            Err(e) => {
                drop(joined);
                return Err(refused(
                    "(this process)".into(),
                    format!("cannot start a node server: {e}"),
                ));
            }
        };
        let mut cluster = Cluster {
            server,
            inner: Arc::new(Inner {
                nodes: Nodes::default(),
                known: Mutex::default(),
                tally: Mutex::default(),
                baseline: Mutex::default(),
                replicas: Mutex::default(),
                modules: Mutex::default(),
                next_module: AtomicU64::new(1),
                deadline: op_deadline,
                next_id: AtomicU64::new(1),
                task_reruns: config.retry.task_reruns,
                reruns: AtomicU64::new(0),
            }),
            heartbeat: None,
            redial: None,
            _joined: joined,
        };
        let (tx, mut events) = tokio::sync::mpsc::unbounded_channel();
        cluster
            .server
            .cast(NodeServerMessage::SubscribeToEvents {
                id: "hipvisor-join".into(),
                subscription: Box::new(Events {
                    join: tx,
                    nodes: cluster.inner.nodes.clone(),
                }),
            })
            .map_err(|e| refused("(this process)".into(), e.to_string()))?;
        for addr in addrs {
            let node = addr.to_string();
            let until = tokio::time::Instant::now() + JOIN_TIMEOUT;
            match tokio::time::timeout_at(until, ractor_cluster::client_connect(&cluster.server, node.clone())).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(refused(node, format!("cannot connect: {e}"))),
                Err(_) => return Err(refused(node, format!("cannot connect within {JOIN_TIMEOUT:?}"))),
            }
            // Ready (authenticated, its groups known), or closed: a wrong cookie, or not a
            // node. (Events of other sessions are not this one's.)
            loop {
                match tokio::time::timeout_at(until, events.recv()).await {
                    Ok(Some((peer, ready))) if peer == node => {
                        if ready {
                            break;
                        }
                        return Err(refused(
                            node,
                            "the node closed the session: a wrong cookie, or not a hipvisor node".into(),
                        ));
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => return Err(refused(node, "this process's node server stopped".into())),
                    Err(_) => return Err(refused(node, format!("no answer within {JOIN_TIMEOUT:?}"))),
                }
            }
        }
        let every = Duration::from_millis(config.cluster.heartbeat_interval_ms);
        let silence = Duration::from_millis(config.cluster.heartbeat_timeout_ms);
        cluster.heartbeat = Some(tokio::spawn(heartbeats(cluster.inner.clone(), every, silence)));
        let (tx, addrs) = tokio::sync::mpsc::unbounded_channel();
        hipvisor_core::sync::lock(&cluster.inner.nodes.0).redial = Some(tx);
        cluster.redial = Some(tokio::spawn(redial(
            cluster.server.clone(),
            cluster.inner.nodes.clone(),
            addrs,
        )));
        // Its devices, known before the first heartbeat.
        cluster.devices().await;
        Ok(cluster)
    }

    /// Every device of every live node, described now, in order of node and index.
    pub async fn devices(&self) -> Vec<RemoteDevice> {
        let mut found = Vec::new();
        for actor in state::remote_servers() {
            let Some(d) = state::describe(&actor, JOIN_TIMEOUT).await else {
                continue;
            };
            let slot = self.inner.see(actor, &d).await;
            found.extend(self.inner.device(slot));
        }
        found.sort_by(|a, b| (&a.node, a.device).cmp(&(&b.node, b.device)));
        found
    }

    /// Uploads `data` as a durable buffer on every device of every live node that is ready
    /// or restarting, and on the devices of nodes seen later (a node restarted as a new
    /// process included): one identity that tasks name. Each node keeps its replicas' host
    /// copies and restores them into its new contexts, as for its own durable buffers;
    /// this application keeps the bytes too, for nodes seen later, until
    /// [`Cluster::free`].
    ///
    /// # Errors
    /// When no device got a replica: the first device's error (`NoReadyDevice` when there
    /// is none).
    pub async fn replicate(&self, data: impl Into<Payload>) -> Result<ReplicatedBuffer, RuntimeError> {
        self.inner.replicate(data).await
    }

    /// Loads a module on every device of every live node that is ready or restarting, and
    /// on the devices of nodes seen later: one module tasks name.
    ///
    /// # Errors
    /// When no device loaded it: the first device's error.
    pub async fn replicate_module(&self, source: ModuleSource) -> Result<ReplicatedModule, RuntimeError> {
        self.inner.replicate_module(source).await
    }

    /// Frees a cluster replica on every live device that holds it, and forgets its bytes.
    ///
    /// # Errors
    /// The first device's error (the others are freed regardless).
    pub async fn free(&self, replica: &ReplicatedBuffer) -> Result<(), RuntimeError> {
        self.inner.free(replica).await
    }

    /// Runs a task on the least-loaded ready device of a live node that holds every
    /// replica and module it names (a restarting one when none is ready), answered with its
    /// outputs. A replayable task whose node is lost under it, or whose device cannot run it
    /// (lost, failed, restarting past its reruns, breaker open, busy, shutting down), runs
    /// again on another such device — within its deadline, at most `retry.task_reruns`
    /// times. (A node reruns a task on its own device after a restart by itself.)
    ///
    /// # Errors
    /// `BadTask` when it names what is not a cluster replica; `NoReadyDevice` when no live
    /// device holds what it names; the task's typed error; `NodeLost` when its node was
    /// lost and it could not run elsewhere.
    pub async fn run(&self, task: &Task) -> Result<Vec<Payload>, RuntimeError> {
        self.inner.run(task).await
    }

    /// The least-loaded ready device of a live node (else a restarting one), by what its
    /// node last reported and this application's requests to it now.
    pub fn any(&self) -> Option<RemoteDevice> {
        self.inner.least_loaded(|_| true)
    }

    /// Tasks [`Cluster::run`] ran again on another device so far.
    pub fn task_reruns(&self) -> u64 {
        self.inner.reruns.load(Ordering::Relaxed)
    }

    /// Every node seen, live or lost, now (no request is sent).
    pub fn nodes(&self) -> Vec<NodeStatus> {
        let mut names = self.inner.nodes.names();
        names.sort();
        names
            .into_iter()
            .map(|node| NodeStatus {
                addr: self.inner.nodes.addr(&node),
                live: self.inner.nodes.live_since(&node).is_some(),
                losses: self.inner.nodes.losses(&node),
                node,
            })
            .collect()
    }

    /// Every node seen — live or lost — with its devices, what this application's requests
    /// did there, and (for a live node) its own counts since this application first saw it,
    /// asked now (a node lost meanwhile answers none).
    pub async fn report(&self) -> Vec<NodeReport> {
        let mut reports = Vec::new();
        for status in self.nodes() {
            let node = &status.node;
            let tally = lock(&self.inner.tally).get(node).copied().unwrap_or_default();
            let (devices, server) = {
                let known = lock(&self.inner.known);
                let mine: Vec<&Known> = known.iter().filter(|k| &k.node == node).collect();
                let server = mine.iter().map(|k| k.actor.clone()).find(reachable);
                (mine.len() as u32, server)
            };
            let mut lost = self.inner.nodes.watch(node);
            let counts = match server {
                Some(server) if status.live => tokio::select! {
                    counts = counts_of(&server) => counts,
                    _ = lost.wait_for(|l| *l) => None,
                },
                _ => None,
            };
            let live = self.inner.nodes.live_since(node).is_some();
            // (A node whose counts could not be taken when first seen has none since.)
            let before = lock(&self.inner.baseline)
                .get(node)
                .and_then(|taken| taken.get().cloned().flatten());
            let counts = counts
                .filter(|_| live)
                .zip(before)
                .map(|(now, before)| now.since(&before));
            reports.push(NodeReport {
                addr: status.addr,
                losses: self.inner.nodes.losses(node),
                devices,
                node: status.node,
                live,
                tally,
                counts,
            });
        }
        reports
    }
}

/// One node as [`Cluster::nodes`] sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeStatus {
    /// Its name.
    pub node: String,
    /// The address it was dialled at.
    pub addr: Option<String>,
    /// Whether it is live now.
    pub live: bool,
    /// How often it was lost since this application joined.
    pub losses: u32,
}

/// One node as [`Cluster::report`] sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeReport {
    /// Its name.
    pub node: String,
    /// The address it was dialled at.
    pub addr: Option<String>,
    /// Whether it is live now.
    pub live: bool,
    /// How often it was lost (its session closed, or it missed its heartbeats) since this
    /// application joined: a node lost and back may have run requests answered `NodeLost`.
    pub losses: u32,
    /// Its devices seen.
    pub devices: u32,
    /// What this application's requests did there (each chunk of a large copy is one
    /// request).
    pub tally: Tally,
    /// Its own counts since this application first saw it (every application's requests:
    /// with one application per node, exactly this one's), for a live node that answered
    /// (then and now).
    pub counts: Option<NodeCounts>,
}

impl NodeReport {
    /// Whether its counts agree with what this application saw: every request its runtime
    /// answered counted once, and at most the abandoned ones besides (those may have been
    /// answered after the application stopped waiting, or may yet be). `None` when there is
    /// nothing to compare: a node lost meanwhile (lost, it may have run requests answered
    /// `NodeLost`), or one that gave no counts.
    pub fn consistent(&self) -> Option<bool> {
        let c = self.counts.as_ref().filter(|_| self.live && self.losses == 0)?;
        let t = &self.tally;
        let within = |node: u64, seen: u64| node >= seen && node - seen <= t.abandoned;
        Some(within(c.ops_total, t.answered) && within(c.ops_succeeded, t.succeeded))
    }
}

/// Asks every joined node, every `every`, whether it answers and how its devices are doing
/// (a `Describe` of each of its devices, allowed `silence` to come back); a node last heard
/// of `silence` ago is lost.
async fn heartbeats(inner: Arc<Inner>, every: Duration, silence: Duration) {
    use std::time::Instant;
    let heard: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    loop {
        tokio::time::sleep(every).await;
        for actor in state::remote_servers() {
            let (heard, inner) = (heard.clone(), inner.clone());
            tokio::spawn(async move {
                if let Some(d) = state::describe(&actor, silence).await {
                    inner.see(actor, &d).await;
                    lock(&heard).insert(d.node, Instant::now());
                }
            });
        }
        let now = Instant::now();
        let heard = lock(&heard).clone();
        for node in inner.nodes.names() {
            // Live since when (a node back counts from its return), heard of when.
            let Some(since) = inner.nodes.live_since(&node) else {
                continue;
            };
            let last = heard.get(&node).copied().map_or(since, |h| h.max(since));
            if now.duration_since(last) >= silence {
                inner.nodes.lose(&node, "it missed its heartbeats");
            }
        }
    }
}
