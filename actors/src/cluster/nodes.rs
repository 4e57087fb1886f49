//! Which joined nodes are live ([`Nodes`]), from the session events of the application's
//! node server ([`Events`]) and the heartbeats, and the dialling of lost nodes' addresses
//! again ([`redial`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hipvisor_core::sync::lock;
use ractor::ActorRef;
use ractor_cluster::node::NodeServerSessionInformation;
use ractor_cluster::{NodeEventSubscription, NodeServerMessage};

use super::wire::JOIN_TIMEOUT;

/// Session events of the application's node server, as they come: the outcome of each
/// session it dialled (by the address dialled) to [`Cluster::join`], and the disconnections
/// to the node watch.
pub(super) struct Events {
    pub(super) join: tokio::sync::mpsc::UnboundedSender<(String, bool)>,
    pub(super) nodes: Nodes,
}

impl NodeEventSubscription for Events {
    fn node_session_opened(&self, _: NodeServerSessionInformation) {}
    fn node_session_authenticated(&self, _: NodeServerSessionInformation) {}
    fn node_session_disconnected(&self, s: NodeServerSessionInformation) {
        if !s.is_server {
            let _ = self.join.send((s.peer_addr.clone(), false));
        }
        if let Some(peer) = s.peer_name {
            self.nodes.closed(&peer.name, s.actor.get_id());
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
pub(super) struct Nodes(pub(super) Arc<Mutex<NodeTable>>);

#[derive(Default)]
pub(super) struct NodeTable {
    /// By node name: lost or not, and since when it is live (heartbeats count from then).
    pub(super) watch: HashMap<String, (tokio::sync::watch::Sender<bool>, std::time::Instant)>,
    /// By node name: its session, while it is live.
    pub(super) session: HashMap<String, ActorRef<ractor_cluster::NodeSessionMessage>>,
    /// By node name: the address it was last dialled at (kept once it is lost).
    pub(super) addrs: HashMap<String, String>,
    /// By node name: how often it was lost.
    pub(super) losses: HashMap<String, u32>,
    /// Where addresses to dial again go.
    pub(super) redial: Option<tokio::sync::mpsc::UnboundedSender<String>>,
    /// Told whenever a session becomes ready (a redial waits on it).
    pub(super) readied: Arc<tokio::sync::Notify>,
}

impl Nodes {
    /// The watch of `node` (made on first sight).
    pub(super) fn watch(&self, node: &str) -> tokio::sync::watch::Receiver<bool> {
        let mut t = lock(&self.0);
        t.watch
            .entry(node.to_string())
            .or_insert_with(|| (tokio::sync::watch::channel(false).0, std::time::Instant::now()))
            .0
            .subscribe()
    }

    /// A session to `node`, dialled at `addr`, is ready: the node is live (again).
    pub(super) fn ready(&self, node: &str, addr: String, session: ActorRef<ractor_cluster::NodeSessionMessage>) {
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
        t.addrs.insert(node.to_string(), addr);
        t.session.insert(node.to_string(), session);
        t.readied.notify_waiters();
    }

    /// Since when `node` is live, if it is.
    pub(super) fn live_since(&self, node: &str) -> Option<std::time::Instant> {
        let t = lock(&self.0);
        t.watch
            .get(node)
            .filter(|(tx, _)| !*tx.borrow())
            .map(|(_, since)| *since)
    }

    /// Whether a live node was dialled at `addr`.
    pub(super) fn live_at(&self, addr: &str) -> bool {
        let t = lock(&self.0);
        t.session.keys().any(|node| {
            t.addrs.get(node).is_some_and(|a| a == addr) && t.watch.get(node).is_some_and(|(tx, _)| !*tx.borrow())
        })
    }

    pub(super) fn lose(&self, node: &str, why: &str) {
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
        if let Some(session) = t.session.remove(node) {
            session.stop(None);
            if let (Some(redial), Some(addr)) = (&t.redial, t.addrs.get(node)) {
                let _ = redial.send(addr.clone());
            }
        }
    }

    /// The address `node` was last dialled at.
    pub(super) fn addr(&self, node: &str) -> Option<String> {
        lock(&self.0).addrs.get(node).cloned()
    }

    /// How often `node` was lost.
    pub(super) fn losses(&self, node: &str) -> u32 {
        lock(&self.0).losses.get(node).copied().unwrap_or(0)
    }

    /// A session to `node` closed: the node is lost if that was its session (not another
    /// one, such as a duplicate the transport closed, or one of before it was lost).
    pub(super) fn closed(&self, node: &str, session: ractor::ActorId) {
        let current = lock(&self.0).session.get(node).is_some_and(|s| s.get_id() == session);
        if current {
            self.lose(node, "its session closed");
        }
    }

    /// Names of every node seen, lost or not.
    pub(super) fn names(&self) -> Vec<String> {
        lock(&self.0).watch.keys().cloned().collect()
    }
}

/// Dials lost nodes' addresses again, with backoff (100 ms doubling to 5 s), until a node
/// answers there.
pub(super) async fn redial(
    server: ActorRef<NodeServerMessage>,
    nodes: Nodes,
    mut addrs: tokio::sync::mpsc::UnboundedReceiver<String>,
) {
    // Every address's dialling stops with this task (the `Cluster` dropped).
    let mut dialling = tokio::task::JoinSet::new();
    while let Some(addr) = addrs.recv().await {
        while dialling.try_join_next().is_some() {}
        let (server, nodes) = (server.clone(), nodes.clone());
        dialling.spawn(async move {
            let mut wait = Duration::from_millis(100);
            loop {
                tokio::time::sleep(wait).await;
                if nodes.live_at(&addr) {
                    return;
                }
                let dialled =
                    tokio::time::timeout(JOIN_TIMEOUT, ractor_cluster::client_connect(&server, addr.clone())).await;
                if matches!(dialled, Ok(Ok(()))) {
                    // Until its session is ready (told by `ready`), within the join timeout.
                    let readied = lock(&nodes.0).readied.clone();
                    let until = tokio::time::Instant::now() + JOIN_TIMEOUT;
                    loop {
                        let notified = readied.notified();
                        tokio::pin!(notified);
                        notified.as_mut().enable(); // before the check: no wake-up is missed
                        if nodes.live_at(&addr) {
                            return;
                        }
                        if tokio::time::timeout_at(until, notified).await.is_err() {
                            break;
                        }
                    }
                }
                wait = (wait * 2).min(Duration::from_secs(5));
            }
        });
    }
}
