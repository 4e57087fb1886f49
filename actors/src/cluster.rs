//! Beyond one machine (feature `cluster`): a node serves its devices to application actors on
//! other hosts through `ractor_cluster`, and an application joins nodes and uses their
//! devices.
//!
//! - **A node** ([`serve`], `hipvisor node`) runs a runtime on its local devices and, per
//!   device, a [`RemoteDeviceMsg`] server actor in the process group [`DEVICE_GROUP`], behind
//!   a `ractor_cluster` node server that authenticates peers by cookie.
//! - **An application** joins nodes ([`Cluster::join`], one `Cluster` per process: ractor's
//!   process groups are the process's) and finds their devices
//!   ([`Cluster::devices`]): a [`RemoteDevice`] submits an op and gets exactly one answer — a
//!   reply or a typed [`RuntimeError`].
//! - **The protocol** is versioned ([`PROTOCOL`], in the group's name and in every message)
//!   and checked: requests and answers travel as bytes this module encodes and decodes
//!   itself, so an undecodable one is a typed error (`Remote`), never a message ractor drops
//!   silently while the caller waits.
//! - **Failures:** every remote request has an id and a deadline; a peer that goes away
//!   answers its pending requests `NodeLost { may_have_executed: true }` at once (ractor
//!   drops their reply ports with the session); a request a node does not answer by its
//!   deadline (the node enforces it too) answers `DeadlineExceeded`. Heartbeats (`[cluster]`) find a frozen peer, whose
//!   socket stays open and whom ractor's own pings never time out: once silent for
//!   `heartbeat_timeout_ms` it is lost, and its requests are answered then.
//!
//! - **Payloads of any size:** copies travel in chunks of 8 MiB, under the transport's 16 MiB
//!   frame (a larger frame closes the whole session).
//!
//! - **Rejoining:** a lost node's address is dialled again with backoff; a node that answers
//!   there (restarted, or resumed) is live again, and [`Cluster::devices`] lists its devices.
//!
//! What this does not do yet: place tasks cluster-wide, or rerun them on other nodes.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hipvisor_core::Op;
use ractor::rpc::CallResult;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use ractor_cluster::node::{NodeConnectionMode, NodeServerSessionInformation};
use ractor_cluster::{NodeEventSubscription, NodeServer, NodeServerMessage, RactorClusterMessage};
use serde::{Deserialize, Serialize};

use crate::error::{OpResult, RuntimeError};
use crate::handle::DeviceHandle;
use crate::runtime::Runtime;

/// The version of the remote protocol: in every request and answer, and in the name of the
/// device group, so nodes of other versions never meet.
pub const PROTOCOL: u16 = 1;

/// The process group of every node's device servers.
pub const DEVICE_GROUP: &str = "hipvisor.device.v1";

/// How long [`Cluster::join`] waits for each node: its connection and its acceptance.
const JOIN_TIMEOUT: Duration = Duration::from_secs(10);

/// The most bulk bytes in one request or answer: well under `ractor_cluster`'s 16 MiB frame.
const CHUNK: usize = 8 << 20;

/// Slack beyond a request's deadline before the caller gives up on the node.
const REPLY_MARGIN: Duration = Duration::from_secs(2);

/// The messages of a device server: bytes in, bytes out, encoded here.
#[derive(RactorClusterMessage)]
pub enum RemoteDeviceMsg {
    /// An op ([`Request`] bytes), answered with [`Answer`] bytes.
    #[rpc]
    Submit(Vec<u8>, RpcReplyPort<Vec<u8>>),
    /// Which node and device this is ([`Description`] bytes).
    #[rpc]
    Describe(RpcReplyPort<Vec<u8>>),
}

#[derive(Serialize, Deserialize)]
struct Request {
    version: u16,
    id: u64,
    deadline_ms: u64,
    op: Op,
}

#[derive(Serialize, Deserialize)]
struct Answer {
    version: u16,
    id: u64,
    result: OpResult,
}

#[derive(Serialize, Deserialize)]
struct Description {
    version: u16,
    node: String,
    device: u32,
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    postcard::to_stdvec(value).expect("plain data encodes")
}

fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8], what: &str) -> Result<T, String> {
    let (value, rest) = postcard::take_from_bytes(bytes).map_err(|e| format!("an undecodable {what}: {e}"))?;
    if !rest.is_empty() {
        return Err(format!("{} trailing bytes after a {what}", rest.len()));
    }
    Ok(value)
}

/// A device server: executes the ops its peers send on one local device.
struct DeviceServer;

struct ServerState {
    gpu: DeviceHandle,
    node: String,
}

impl Actor for DeviceServer {
    type Msg = RemoteDeviceMsg;
    type State = ServerState;
    type Arguments = ServerState;

    async fn pre_start(
        &self,
        _: ActorRef<RemoteDeviceMsg>,
        st: ServerState,
    ) -> Result<ServerState, ActorProcessingErr> {
        Ok(st)
    }

    async fn handle(
        &self,
        _: ActorRef<RemoteDeviceMsg>,
        msg: RemoteDeviceMsg,
        st: &mut ServerState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            RemoteDeviceMsg::Describe(reply) => {
                let d = Description {
                    version: PROTOCOL,
                    node: st.node.clone(),
                    device: st.gpu.index(),
                };
                let _ = reply.send(encode(&d));
            }
            RemoteDeviceMsg::Submit(bytes, reply) => {
                let node = st.node.clone();
                let request = decode::<Request>(&bytes, "request").and_then(|r| {
                    if r.version == PROTOCOL {
                        Ok(r)
                    } else {
                        Err(format!("protocol version {}, this node speaks {PROTOCOL}", r.version))
                    }
                });
                let request = match request {
                    Ok(r) => r,
                    Err(reason) => {
                        let answer = Answer {
                            version: PROTOCOL,
                            id: 0,
                            result: Err(RuntimeError::Remote { node, reason }),
                        };
                        let _ = reply.send(encode(&answer));
                        return Ok(());
                    }
                };
                // Answered by the caller's deadline at the latest (a slot on a busy device
                // included); the actor serves on meanwhile.
                let gpu = st.gpu.clone();
                tokio::spawn(async move {
                    let kind = request.op.kind();
                    let deadline = Duration::from_millis(request.deadline_ms);
                    let result = match tokio::time::timeout(deadline, gpu.submit(request.op)).await {
                        Ok(result) => result,
                        Err(_) => Err(RuntimeError::DeadlineExceeded {
                            device: gpu.index(),
                            op: kind,
                            deadline_ms: request.deadline_ms,
                            may_have_executed: true,
                        }),
                    };
                    let answer = Answer {
                        version: PROTOCOL,
                        id: request.id,
                        result,
                    };
                    let _ = reply.send(encode(&answer));
                });
            }
        }
        Ok(())
    }
}

/// A node serving its devices: dropping it stops serving (the runtime is the caller's).
pub struct Node {
    server: ActorRef<NodeServerMessage>,
    devices: Vec<ActorRef<RemoteDeviceMsg>>,
    name: String,
}

impl Node {
    /// The node's name (`hipvisor-node-PORT-TAG@HOST`, as its peers know it).
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        for d in &self.devices {
            d.stop(None);
        }
        self.server.stop(None);
    }
}

/// Serves `runtime`'s devices on `listen` to peers that know `cookie`.
///
/// # Errors
/// The address cannot be bound, or an actor cannot be started.
pub async fn serve(runtime: &Runtime, listen: SocketAddr, cookie: &str) -> Result<Node, String> {
    // Unique among nodes (ractor_cluster takes two peers of one name for one, and closes a
    // session): the host's name, the port and a random tag; `--listen 0.0.0.0` on many
    // hosts is fine.
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| listen.ip().to_string());
    let name = format!("hipvisor-node-{}-{:08x}", listen.port(), rand::random::<u32>());
    let server = NodeServer::new(
        listen.port(),
        cookie.to_string(),
        name.clone(),
        host.clone(),
        None,
        Some(NodeConnectionMode::Isolated),
    )
    .with_listen_addr(listen.ip());
    // Bound once the spawn returns (the listener binds in its own start).
    let (server, _) = Actor::spawn(None, server, ())
        .await
        .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    let node = format!("{name}@{host}");
    let mut devices = Vec::new();
    for d in 0..runtime.device_count() {
        let gpu = runtime.device(d).map_err(|e| e.to_string())?;
        let st = ServerState {
            gpu,
            node: node.clone(),
        };
        let (actor, _) = Actor::spawn(None, DeviceServer, st)
            .await
            .map_err(|e| format!("cannot start the server of device {d}: {e}"))?;
        ractor::pg::join(DEVICE_GROUP.to_string(), vec![actor.get_cell()]);
        devices.push(actor);
    }
    Ok(Node {
        server,
        devices,
        name: node,
    })
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
struct Nodes(std::sync::Arc<std::sync::Mutex<NodeTable>>);

#[derive(Default)]
struct NodeTable {
    /// By node name: lost or not, and since when it is live (heartbeats count from then).
    watch: std::collections::HashMap<String, (tokio::sync::watch::Sender<bool>, std::time::Instant)>,
    /// By node name: the address it was dialled at, and its session.
    session: std::collections::HashMap<String, (String, ActorRef<ractor_cluster::NodeSessionMessage>)>,
    /// Where addresses to dial again go.
    redial: Option<tokio::sync::mpsc::UnboundedSender<String>>,
}

impl Nodes {
    /// The watch of `node` (made on first sight).
    fn watch(&self, node: &str) -> tokio::sync::watch::Receiver<bool> {
        let mut t = hipvisor_core::sync::lock(&self.0);
        t.watch
            .entry(node.to_string())
            .or_insert_with(|| (tokio::sync::watch::channel(false).0, std::time::Instant::now()))
            .0
            .subscribe()
    }

    /// A session to `node`, dialled at `addr`, is ready: the node is live (again).
    fn ready(&self, node: &str, addr: String, session: ActorRef<ractor_cluster::NodeSessionMessage>) {
        let mut t = hipvisor_core::sync::lock(&self.0);
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
        t.session.insert(node.to_string(), (addr, session));
    }

    /// Since when `node` is live, if it is.
    fn live_since(&self, node: &str) -> Option<std::time::Instant> {
        let t = hipvisor_core::sync::lock(&self.0);
        t.watch
            .get(node)
            .filter(|(tx, _)| !*tx.borrow())
            .map(|(_, since)| *since)
    }

    /// Whether a live node was dialled at `addr`.
    fn live_at(&self, addr: &str) -> bool {
        let t = hipvisor_core::sync::lock(&self.0);
        t.session
            .iter()
            .any(|(node, (a, _))| a == addr && t.watch.get(node).is_some_and(|(tx, _)| !*tx.borrow()))
    }

    fn lose(&self, node: &str, why: &str) {
        let mut t = hipvisor_core::sync::lock(&self.0);
        let Some((tx, _)) = t.watch.get(node) else { return };
        if *tx.borrow() {
            return;
        }
        tracing::warn!(node, why, "node lost");
        let _ = tx.send(true);
        // Its session goes (a frozen node's stays open otherwise), and its address is
        // dialled again.
        if let Some((addr, session)) = t.session.remove(node) {
            session.stop(None);
            if let Some(redial) = &t.redial {
                let _ = redial.send(addr);
            }
        }
    }

    /// Names of every node seen, lost or not.
    fn names(&self) -> Vec<String> {
        hipvisor_core::sync::lock(&self.0).watch.keys().cloned().collect()
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
    deadline: Duration,
    nodes: Nodes,
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
            deadline: op_deadline,
            nodes: Nodes::default(),
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
                    nodes: cluster.nodes.clone(),
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
        cluster.heartbeat = Some(tokio::spawn(heartbeats(cluster.nodes.clone(), every, silence)));
        let (tx, addrs) = tokio::sync::mpsc::unbounded_channel();
        hipvisor_core::sync::lock(&cluster.nodes.0).redial = Some(tx);
        cluster.redial = Some(tokio::spawn(redial(
            cluster.server.clone(),
            cluster.nodes.clone(),
            addrs,
        )));
        Ok(cluster)
    }

    /// Every device of every joined node, in no particular order.
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
            let lost = self.nodes.watch(&d.node);
            if d.version == PROTOCOL && !*lost.borrow() {
                found.push(RemoteDevice {
                    actor,
                    node: d.node,
                    device: d.device,
                    deadline: self.deadline,
                    next_id: std::sync::Arc::new(AtomicU64::new(1)),
                    lost,
                });
            }
        }
        found.sort_by(|a, b| (&a.node, a.device).cmp(&(&b.node, b.device)));
        found
    }
}

/// Asks every joined node, every `every`, whether it answers (a `Describe` of one of its
/// devices, allowed `silence` to come back); a node last heard of `silence` ago is lost.
async fn heartbeats(nodes: Nodes, every: Duration, silence: Duration) {
    use std::collections::HashMap;
    use std::time::Instant;
    let heard: std::sync::Arc<std::sync::Mutex<HashMap<String, Instant>>> = Default::default();
    loop {
        tokio::time::sleep(every).await;
        for cell in ractor::pg::get_members(&DEVICE_GROUP.to_string()) {
            if cell.get_id().is_local() {
                continue;
            }
            let actor: ActorRef<RemoteDeviceMsg> = cell.into();
            let heard = heard.clone();
            tokio::spawn(async move {
                if let Ok(CallResult::Success(bytes)) = actor.call(RemoteDeviceMsg::Describe, Some(silence)).await
                    && let Ok(d) = decode::<Description>(&bytes, "description")
                {
                    hipvisor_core::sync::lock(&heard).insert(d.node, Instant::now());
                }
            });
        }
        let now = Instant::now();
        let heard = hipvisor_core::sync::lock(&heard).clone();
        for node in nodes.names() {
            // Live since when (a node back counts from its return), heard of when.
            let Some(since) = nodes.live_since(&node) else { continue };
            let last = heard.get(&node).copied().map_or(since, |h| h.max(since));
            if now.duration_since(last) >= silence {
                nodes.lose(&node, "it missed its heartbeats");
            }
        }
    }
}

/// A device of another node: the same ops and answers as a local device. It belongs to the
/// [`Cluster`] that found it: once that is dropped, it answers `NodeLost`.
#[derive(Clone)]
pub struct RemoteDevice {
    actor: ActorRef<RemoteDeviceMsg>,
    node: String,
    device: u32,
    deadline: Duration,
    next_id: std::sync::Arc<AtomicU64>,
    /// Whether its node is lost (session closed, heartbeats missed).
    lost: tokio::sync::watch::Receiver<bool>,
}

impl RemoteDevice {
    /// The node it belongs to.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Its index on its node.
    pub fn index(&self) -> u32 {
        self.device
    }

    /// Submits an op and waits for its one answer.
    ///
    /// # Errors
    /// The op's typed error; `NodeLost` when its node went away or missed its heartbeats
    /// (`may_have_executed: false` when it was lost before the request was sent);
    /// `DeadlineExceeded` when a node still there did not answer by the deadline; `Remote`
    /// for an answer that cannot be decoded.
    pub async fn submit(&self, op: Op) -> OpResult {
        // Bulk bytes travel in chunks under the transport's frame limit (16 MiB; a larger
        // frame closes the whole session): a copy is its chunks' copies, in order, answered
        // with the first error (copies are idempotent) or the whole.
        match op {
            Op::CopyToDevice { dst, offset, data } if data.len() > CHUNK => {
                for (i, chunk) in data.as_bytes().chunks(CHUNK).enumerate() {
                    let part = Op::CopyToDevice {
                        dst,
                        offset: offset + (i * CHUNK) as u64,
                        data: chunk.to_vec().into(),
                    };
                    self.submit_one(part).await?;
                }
                Ok(hipvisor_core::Reply::Done)
            }
            Op::CopyFromDevice { src, offset, len } if len > CHUNK as u64 => {
                let mut bytes = Vec::new();
                bytes
                    .try_reserve_exact(len as usize)
                    .map_err(|_| RuntimeError::Remote {
                        node: self.node.clone(),
                        reason: format!("no host memory for the {len} bytes of a copy back"),
                    })?;
                let mut at = 0;
                while at < len {
                    let n = (len - at).min(CHUNK as u64);
                    let part = Op::CopyFromDevice {
                        src,
                        offset: offset + at,
                        len: n,
                    };
                    match self.submit_one(part).await? {
                        hipvisor_core::Reply::Data(d) => bytes.extend_from_slice(d.as_bytes()),
                        other => unreachable!("a copy back answered {other:?}"),
                    }
                    at += n;
                }
                Ok(hipvisor_core::Reply::Data(bytes.into()))
            }
            op => self.submit_one(op).await,
        }
    }

    /// One request, one answer.
    async fn submit_one(&self, op: Op) -> OpResult {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let kind = op.kind();
        let request = Request {
            version: PROTOCOL,
            id,
            deadline_ms: self.deadline.as_millis() as u64,
            op,
        };
        let lost = || RuntimeError::NodeLost {
            node: self.node.clone(),
            may_have_executed: true,
        };
        if *self.lost.borrow() {
            return Err(RuntimeError::NodeLost {
                node: self.node.clone(),
                may_have_executed: false,
            });
        }
        let sent_at = std::time::Instant::now();
        let call = self.actor.call(
            |reply| RemoteDeviceMsg::Submit(encode(&request), reply),
            Some(self.deadline + REPLY_MARGIN),
        );
        let mut gone = self.lost.clone();
        let sent = tokio::select! {
            sent = call => sent,
            // Lost while the request was out (a frozen node misses its heartbeats): answered
            // now, not at the deadline.
            // (A closed watch — its `Cluster` dropped — is lost too.)
            _ = gone.wait_for(|l| *l) => return Err(RuntimeError::NodeLost {
                node: self.node.clone(),
                may_have_executed: true,
            }),
        };
        let bytes = match sent {
            Ok(CallResult::Success(bytes)) => bytes,
            // The session closed (its reply ports are dropped at once, and the node is lost
            // by then), or no answer came by the deadline from a node still there (ractor
            // reports either as a sender error or a timeout).
            // (Before the deadline it cannot be one: the session dropped, and the event that
            // marks the node lost may lag behind the dropped reply port.)
            Ok(CallResult::SenderError | CallResult::Timeout) | Err(_)
                if *self.lost.borrow() || sent_at.elapsed() < self.deadline =>
            {
                return Err(lost());
            }
            Ok(CallResult::SenderError | CallResult::Timeout) | Err(_) => {
                return Err(RuntimeError::DeadlineExceeded {
                    device: self.device,
                    op: kind,
                    deadline_ms: self.deadline.as_millis() as u64,
                    may_have_executed: true,
                });
            }
        };
        let remote = |reason: String| RuntimeError::Remote {
            node: self.node.clone(),
            reason,
        };
        let answer = decode::<Answer>(&bytes, "answer").map_err(remote)?;
        if answer.version != PROTOCOL {
            return Err(remote(format!("an answer of protocol version {}", answer.version)));
        }
        if answer.id != id {
            // The node could not read the request (it answers id 0 with why) or is broken.
            return match answer.result {
                Err(e @ RuntimeError::Remote { .. }) => Err(e),
                _ => Err(remote(format!("the answer to request {} for request {id}", answer.id))),
            };
        }
        answer.result
    }
}
