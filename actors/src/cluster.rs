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
//! - **Failures:** every remote request has an id and a deadline; a peer that goes away
//!   answers its pending requests `NodeLost { may_have_executed: true }` at once (ractor
//!   drops their reply ports with the session); a request a node does not answer by its
//!   deadline (the node enforces it too) answers `DeadlineExceeded`. Heartbeats
//!   (`[cluster]`) find a frozen peer, whose socket stays open and whom ractor's own pings
//!   never time out: once silent for `heartbeat_timeout_ms` it is lost, and its requests
//!   are answered then.
//! - **Payloads of any size:** copies travel in chunks of 8 MiB, under the transport's 16 MiB
//!   frame (a larger frame closes the whole session).
//! - **Rejoining:** a lost node's address is dialled again with backoff; a node that answers
//!   there (restarted, or resumed) is live again, and its devices take work again. A
//!   restarted node is a new process: the replicas made before are not on it (replicate
//!   again to use it for tasks that name them).

mod remote;
mod replicas;
mod server;
mod wire;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hipvisor_core::ModuleSource;
use hipvisor_core::sync::lock;
use ractor::rpc::CallResult;
use ractor::{Actor, ActorRef};
use ractor_cluster::node::{NodeConnectionMode, NodeServerSessionInformation};
use ractor_cluster::{NodeEventSubscription, NodeServer, NodeServerMessage};

pub use remote::RemoteDevice;
pub use replicas::CLUSTER_DEVICE;
pub use server::{Node, serve};
use wire::{Counted, Description, decode};
pub use wire::{DEVICE_GROUP, NodeCounts, PROTOCOL, RemoteDeviceMsg};

use crate::error::RuntimeError;
use crate::state::DeviceState;

/// How long [`Cluster::join`] waits for each node: its connection and its acceptance.
const JOIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Slack beyond a request's deadline before the caller gives up on the node.
const REPLY_MARGIN: Duration = Duration::from_secs(2);

/// What a cluster's parts share: its nodes, the devices it has seen, and what each node
/// answered.
struct Inner {
    nodes: Nodes,
    /// Every device seen, by slot (its number in this cluster, never reused).
    known: Mutex<Vec<Known>>,
    /// By node name: the requests it answered through its runtime (and of those, how many
    /// succeeded) — what its metrics counted.
    tally: Mutex<HashMap<String, (u64, u64)>>,
    /// By node name: its counts when this application first saw it, before sending it
    /// anything ([`Cluster::report`] gives what was counted since).
    baseline: Mutex<HashMap<String, NodeCounts>>,
    /// Every replica's bytes, for devices seen later.
    replicas: Mutex<Vec<replicas::Replica>>,
    /// Every replicated module, by the id its `ReplicatedModule` carries.
    modules: Mutex<Vec<(u64, ModuleSource)>>,
    next_module: AtomicU64,
    /// Each request's deadline.
    deadline: Duration,
    next_id: AtomicU64,
    /// How often [`Cluster::run`] may run a task again (`retry.task_reruns`).
    task_reruns: u32,
    /// Tasks run again on another device.
    reruns: AtomicU64,
}

/// A device seen: where it is, and how it was doing when last described.
struct Known {
    node: String,
    index: u32,
    actor: ActorRef<RemoteDeviceMsg>,
    state: DeviceState,
    in_flight: u32,
    /// This application's requests to it now.
    outstanding: Arc<AtomicU32>,
    /// The cluster replicas it holds.
    held: std::collections::HashSet<u64>,
    /// The cluster's modules loaded on it: the id its node gave each.
    modules: HashMap<u64, u64>,
    /// One provisioning at a time.
    provisioning: Arc<tokio::sync::Mutex<()>>,
}

impl Inner {
    /// A device described by its server, seen for the first time or again: its slot. A
    /// node seen for the first time has its counts taken first (before any request of this
    /// application can reach it).
    /// A device seen for the first time is given the cluster's replicas and modules, in
    /// the background (tasks go to it once it holds what they name).
    async fn see(self: &Arc<Self>, actor: ActorRef<RemoteDeviceMsg>, d: &Description) -> u32 {
        let first = !lock(&self.baseline).contains_key(&d.node);
        if first {
            let counts = counts_of(&actor).await.unwrap_or_default();
            lock(&self.baseline).entry(d.node.clone()).or_insert(counts);
        }
        let (slot, new) = self.learn(actor, d);
        let something = !lock(&self.replicas).is_empty() || !lock(&self.modules).is_empty();
        if new && something {
            let inner = self.clone();
            tokio::spawn(async move {
                let _ = inner.provision(slot).await;
            });
        }
        slot
    }

    /// A device described by its server: its slot (a new one for a device not seen
    /// before), and whether it is new.
    fn learn(&self, actor: ActorRef<RemoteDeviceMsg>, d: &Description) -> (u32, bool) {
        let mut known = lock(&self.known);
        if let Some(slot) = known.iter().position(|k| k.node == d.node && k.index == d.device) {
            let k = &mut known[slot];
            (k.actor, k.state, k.in_flight) = (actor, d.state, d.in_flight);
            return (slot as u32, false);
        }
        known.push(Known {
            node: d.node.clone(),
            index: d.device,
            actor,
            state: d.state,
            in_flight: d.in_flight,
            outstanding: Arc::default(),
            held: Default::default(),
            modules: HashMap::new(),
            provisioning: Arc::default(),
        });
        ((known.len() - 1) as u32, true)
    }

    /// The device in `slot`, while its node is live.
    fn device(self: &Arc<Self>, slot: u32) -> Option<RemoteDevice> {
        let known = lock(&self.known);
        let k = known.get(slot as usize)?;
        let lost = self.nodes.watch(&k.node);
        // A node back under a new session: its devices' actors of the old one are stopped
        // until the next description gives the new ones.
        if *lost.borrow() || !reachable(&k.actor) {
            return None;
        }
        Some(RemoteDevice {
            inner: self.clone(),
            actor: k.actor.clone(),
            node: k.node.clone(),
            device: k.index,
            slot,
            lost,
            outstanding: k.outstanding.clone(),
        })
    }

    /// Every device of every live node, by slot.
    fn live(self: &Arc<Self>) -> Vec<RemoteDevice> {
        let n = lock(&self.known).len() as u32;
        (0..n).filter_map(|slot| self.device(slot)).collect()
    }

    /// The node's device `index`, while the node is live.
    fn sibling(self: &Arc<Self>, node: &str, index: u32) -> Option<RemoteDevice> {
        let slot = lock(&self.known)
            .iter()
            .position(|k| k.node == node && k.index == index)?;
        self.device(slot as u32)
    }

    /// The state and load of `slot` as last described (load: requests in flight from every
    /// application, and this one's now).
    fn load(&self, slot: u32) -> (DeviceState, u32) {
        let known = lock(&self.known);
        let k = &known[slot as usize];
        (k.state, k.in_flight.max(k.outstanding.load(Ordering::Relaxed)))
    }

    /// A request `node`'s runtime answered (and counted).
    fn answered(&self, node: &str, ok: bool) {
        let mut tally = lock(&self.tally);
        let t = tally.entry(node.to_string()).or_default();
        t.0 += 1;
        t.1 += u64::from(ok);
    }
}

/// Session events of the application's node server, as they come: the outcome of each
/// session it dialled (by the address dialled) to [`Cluster::join`], and the disconnections
/// to the node watch.
struct Events {
    join: tokio::sync::mpsc::UnboundedSender<(String, bool)>,
    nodes: Nodes,
}

impl NodeEventSubscription for Events {
    fn node_session_opened(&self, _: NodeServerSessionInformation) {}
    fn node_session_authenticated(&self, _: NodeServerSessionInformation) {}
    fn node_session_disconnected(&self, s: NodeServerSessionInformation) {
        if !s.is_server {
            let _ = self.join.send((s.peer_addr.clone(), false));
        }
        if let Some(peer) = s.peer_name {
            self.nodes.lose(&peer.name, "its session closed");
        }
    }
    fn node_session_ready(&self, s: NodeServerSessionInformation) {
        if !s.is_server {
            if let Some(peer) = &s.peer_name {
                self.nodes.ready(&peer.name, s.peer_addr.clone(), s.actor.clone());
            }
            let _ = self.join.send((s.peer_addr, true));
        }
    }
}

/// Whether each joined node is lost, by node name: a node is lost once its session closes or
/// it misses its heartbeats, and its requests in flight are answered then. A lost node's
/// address is dialled again (with backoff) until a node answers there; a node that comes
/// back is live again (its devices listed anew by [`Cluster::devices`]).
#[derive(Clone, Default)]
struct Nodes(Arc<Mutex<NodeTable>>);

#[derive(Default)]
struct NodeTable {
    /// By node name: lost or not, and since when it is live (heartbeats count from then).
    watch: HashMap<String, (tokio::sync::watch::Sender<bool>, std::time::Instant)>,
    /// By node name: the address it was dialled at, and its session.
    session: HashMap<String, (String, ActorRef<ractor_cluster::NodeSessionMessage>)>,
    /// By node name: the address it was last dialled at (kept once it is lost).
    addrs: HashMap<String, String>,
    /// By node name: how often it was lost.
    losses: HashMap<String, u32>,
    /// Where addresses to dial again go.
    redial: Option<tokio::sync::mpsc::UnboundedSender<String>>,
}

impl Nodes {
    /// The watch of `node` (made on first sight).
    fn watch(&self, node: &str) -> tokio::sync::watch::Receiver<bool> {
        let mut t = lock(&self.0);
        t.watch
            .entry(node.to_string())
            .or_insert_with(|| (tokio::sync::watch::channel(false).0, std::time::Instant::now()))
            .0
            .subscribe()
    }

    /// A session to `node`, dialled at `addr`, is ready: the node is live (again).
    fn ready(&self, node: &str, addr: String, session: ActorRef<ractor_cluster::NodeSessionMessage>) {
        let mut t = lock(&self.0);
        let fresh = t.watch.get(node).is_none_or(|(tx, _)| *tx.borrow());
        if fresh {
            if t.watch.contains_key(node) {
                tracing::info!(node, "node back");
            }
            t.watch.insert(
                node.to_string(),
                (tokio::sync::watch::channel(false).0, std::time::Instant::now()),
            );
        }
        t.addrs.insert(node.to_string(), addr.clone());
        t.session.insert(node.to_string(), (addr, session));
    }

    /// Since when `node` is live, if it is.
    fn live_since(&self, node: &str) -> Option<std::time::Instant> {
        let t = lock(&self.0);
        t.watch
            .get(node)
            .filter(|(tx, _)| !*tx.borrow())
            .map(|(_, since)| *since)
    }

    /// Whether a live node was dialled at `addr`.
    fn live_at(&self, addr: &str) -> bool {
        let t = lock(&self.0);
        t.session
            .iter()
            .any(|(node, (a, _))| a == addr && t.watch.get(node).is_some_and(|(tx, _)| !*tx.borrow()))
    }

    fn lose(&self, node: &str, why: &str) {
        let mut t = lock(&self.0);
        let Some((tx, _)) = t.watch.get(node) else { return };
        if *tx.borrow() {
            return;
        }
        tracing::warn!(node, why, "node lost");
        // (`send` would not store it with no receiver left: `send_replace` does.)
        tx.send_replace(true);
        *t.losses.entry(node.to_string()).or_default() += 1;
        // Its session goes (a frozen node's stays open otherwise), and its address is
        // dialled again.
        if let Some((addr, session)) = t.session.remove(node) {
            session.stop(None);
            if let Some(redial) = &t.redial {
                let _ = redial.send(addr);
            }
        }
    }

    /// The address `node` was last dialled at.
    fn addr(&self, node: &str) -> Option<String> {
        lock(&self.0).addrs.get(node).cloned()
    }

    /// How often `node` was lost.
    fn losses(&self, node: &str) -> u32 {
        lock(&self.0).losses.get(node).copied().unwrap_or(0)
    }

    /// Names of every node seen, lost or not.
    fn names(&self) -> Vec<String> {
        lock(&self.0).watch.keys().cloned().collect()
    }
}

/// Dials lost nodes' addresses again, with backoff (100 ms doubling to 5 s), until a node
/// answers there.
async fn redial(
    server: ActorRef<NodeServerMessage>,
    nodes: Nodes,
    mut addrs: tokio::sync::mpsc::UnboundedReceiver<String>,
) {
    while let Some(addr) = addrs.recv().await {
        let (server, nodes) = (server.clone(), nodes.clone());
        tokio::spawn(async move {
            let mut wait = Duration::from_millis(100);
            loop {
                tokio::time::sleep(wait).await;
                if nodes.live_at(&addr) {
                    return;
                }
                let dialled =
                    tokio::time::timeout(JOIN_TIMEOUT, ractor_cluster::client_connect(&server, addr.clone())).await;
                if matches!(dialled, Ok(Ok(()))) {
                    let until = tokio::time::Instant::now() + JOIN_TIMEOUT;
                    while tokio::time::Instant::now() < until && !nodes.live_at(&addr) {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    if nodes.live_at(&addr) {
                        return;
                    }
                }
                wait = (wait * 2).min(Duration::from_secs(5));
            }
        });
    }
}

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
        for cell in ractor::pg::get_members(&DEVICE_GROUP.to_string()) {
            if cell.get_id().is_local() {
                continue; // this process's own, if it serves too
            }
            let actor: ActorRef<RemoteDeviceMsg> = cell.into();
            let described = actor.call(RemoteDeviceMsg::Describe, Some(JOIN_TIMEOUT)).await;
            let Ok(CallResult::Success(bytes)) = described else {
                continue;
            };
            let Ok(d) = decode::<Description>(&bytes, "description") else {
                continue;
            };
            if d.version != PROTOCOL {
                continue;
            }
            let slot = self.inner.see(actor, &d).await;
            found.extend(self.inner.device(slot));
        }
        found.sort_by(|a, b| (&a.node, a.device).cmp(&(&b.node, b.device)));
        found
    }

    /// The least-loaded ready device of a live node (else a restarting one), by what its
    /// node last reported and this application's requests to it now.
    pub fn any(&self) -> Option<RemoteDevice> {
        self.least_loaded(|_| true)
    }

    pub(crate) fn least_loaded(&self, take: impl Fn(u32) -> bool) -> Option<RemoteDevice> {
        let mut best: Option<((bool, u32), RemoteDevice)> = None;
        for d in self.inner.live().into_iter().filter(|d| take(d.slot)) {
            let (state, load) = self.inner.load(d.slot);
            let rank = match state {
                DeviceState::Ready => (false, load),
                DeviceState::Restarting => (true, load),
                DeviceState::Lost | DeviceState::Failed => continue,
            };
            if best.as_ref().is_none_or(|(r, _)| rank < *r) {
                best = Some((rank, d));
            }
        }
        best.map(|(_, d)| d)
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
            let (answered, succeeded) = lock(&self.inner.tally).get(node).copied().unwrap_or_default();
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
            let counts = counts.filter(|_| live).map(|now| {
                let before = lock(&self.inner.baseline).get(node).cloned().unwrap_or_default();
                now.since(&before)
            });
            reports.push(NodeReport {
                addr: status.addr,
                losses: self.inner.nodes.losses(node),
                devices,
                node: status.node,
                live,
                answered,
                succeeded,
                counts,
            });
        }
        reports
    }
}

/// Whether a device server's actor can be sent to: one of a session that closed is stopped.
fn reachable(actor: &ActorRef<RemoteDeviceMsg>) -> bool {
    matches!(
        actor.get_status(),
        ractor::ActorStatus::Running | ractor::ActorStatus::Upgrading
    )
}

/// A node's counts, asked of one of its device servers.
async fn counts_of(server: &ActorRef<RemoteDeviceMsg>) -> Option<NodeCounts> {
    match server.call(RemoteDeviceMsg::Counts, Some(JOIN_TIMEOUT)).await {
        Ok(CallResult::Success(bytes)) => decode::<Counted>(&bytes, "counts")
            .ok()
            .filter(|c| c.version == PROTOCOL)
            .and_then(|c| c.counts.ok()),
        _ => None,
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
    /// This application's requests its runtime answered (each chunk of a large copy is
    /// one).
    pub answered: u64,
    /// Of which succeeded.
    pub succeeded: u64,
    /// Its own counts since this application first saw it (every application's requests:
    /// with one application per node, exactly this one's), for a live node that answered.
    pub counts: Option<NodeCounts>,
}

/// Asks every joined node, every `every`, whether it answers and how its devices are doing
/// (a `Describe` of each of its devices, allowed `silence` to come back); a node last heard
/// of `silence` ago is lost.
async fn heartbeats(inner: Arc<Inner>, every: Duration, silence: Duration) {
    use std::time::Instant;
    let heard: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    loop {
        tokio::time::sleep(every).await;
        for cell in ractor::pg::get_members(&DEVICE_GROUP.to_string()) {
            if cell.get_id().is_local() {
                continue;
            }
            let actor: ActorRef<RemoteDeviceMsg> = cell.into();
            let (heard, inner) = (heard.clone(), inner.clone());
            tokio::spawn(async move {
                if let Ok(CallResult::Success(bytes)) = actor.call(RemoteDeviceMsg::Describe, Some(silence)).await
                    && let Ok(d) = decode::<Description>(&bytes, "description")
                    && d.version == PROTOCOL
                {
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
