//! What a cluster's parts share ([`Inner`]): its nodes, every device seen (by slot) and how
//! it was doing when last described, what each node answered, and the replicas and modules
//! every device is to hold.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hipvisor_core::sync::lock;
use hipvisor_core::{ModuleSource, Payload};
use ractor::ActorRef;
use ractor::rpc::CallResult;

use super::nodes::Nodes;
use super::wire::{Counted, DEVICE_GROUP, Description, JOIN_TIMEOUT, NodeCounts, PROTOCOL, RemoteDeviceMsg, decode};
use crate::state::DeviceState;

/// What a cluster's parts share: its nodes, the devices it has seen, and what each node
/// answered.
pub(super) struct Inner {
    pub(super) nodes: Nodes,
    /// Every device seen, by slot (its number in this cluster, never reused).
    pub(super) known: Mutex<Vec<Known>>,
    /// By node name: the requests it answered through its runtime (and of those, how many
    /// succeeded) — what its metrics counted.
    pub(super) tally: Mutex<HashMap<String, Tally>>,
    /// By node name: its counts when this application first saw it, before sending it
    /// anything ([`Cluster::report`] gives what was counted since); `None` when they could
    /// not be taken. Every first sight of one of its devices waits for them to be taken.
    pub(super) baseline: Mutex<HashMap<String, Arc<tokio::sync::OnceCell<Option<NodeCounts>>>>>,
    /// Every replica's bytes, for devices seen later.
    pub(super) replicas: Mutex<Vec<Replica>>,
    /// Every replicated module, by the id its `ReplicatedModule` carries.
    pub(super) modules: Mutex<Vec<(u64, ModuleSource)>>,
    pub(super) next_module: AtomicU64,
    /// Each request's deadline.
    pub(super) deadline: Duration,
    pub(super) next_id: AtomicU64,
    /// How often [`Cluster::run`] may run a task again (`retry.task_reruns`).
    pub(super) task_reruns: u32,
    /// Tasks run again on another device.
    pub(super) reruns: AtomicU64,
}

/// A replica's bytes, kept for nodes seen later.
#[derive(Clone)]
pub(super) struct Replica {
    pub(super) id: u64,
    pub(super) data: Payload,
}

/// What this application's requests did on one node.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    /// Requests its runtime answered (and counted).
    pub answered: u64,
    /// Of which succeeded.
    pub succeeded: u64,
    /// Requests sent whose answer was not waited for (a deadline, a caller gone): the node
    /// counts each once its runtime answers it, which may be after the application looked.
    pub abandoned: u64,
}

/// A device seen: where it is, and how it was doing when last described.
pub(super) struct Known {
    pub(super) node: String,
    pub(super) index: u32,
    pub(super) actor: ActorRef<RemoteDeviceMsg>,
    pub(super) state: DeviceState,
    pub(super) in_flight: u32,
    /// This application's requests to it now.
    pub(super) outstanding: Arc<AtomicU32>,
    /// The cluster replicas it holds.
    pub(super) held: std::collections::HashSet<u64>,
    /// The cluster's modules loaded on it: the id its node gave each.
    pub(super) modules: HashMap<u64, u64>,
    /// One provisioning at a time.
    pub(super) provisioning: Arc<tokio::sync::Mutex<()>>,
    /// No provisioning before then (after a failed one).
    pub(super) retry_at: std::time::Instant,
}

impl Inner {
    /// A device described by its server: its slot (a new one for a device not seen
    /// before), and whether it is new.
    pub(super) fn learn(&self, actor: ActorRef<RemoteDeviceMsg>, d: &Description) -> (u32, bool) {
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
            retry_at: std::time::Instant::now(),
        });
        ((known.len() - 1) as u32, true)
    }

    /// The state and load of `slot` as last described (load: requests in flight from every
    /// application, and this one's now).
    pub(super) fn load(&self, slot: u32) -> (DeviceState, u32) {
        let known = lock(&self.known);
        let k = &known[slot as usize];
        (k.state, k.in_flight.max(k.outstanding.load(Ordering::Relaxed)))
    }

    /// A request `node`'s runtime answered (and counted).
    pub(super) fn answered(&self, node: &str, ok: bool) {
        let mut tally = lock(&self.tally);
        let t = tally.entry(node.to_string()).or_default();
        t.answered += 1;
        t.succeeded += u64::from(ok);
    }

    /// A request sent to `node` whose answer this application stopped waiting for (its
    /// deadline, or its caller gone): the node may have counted it, or may yet.
    pub(super) fn abandoned(&self, node: &str) {
        lock(&self.tally).entry(node.to_string()).or_default().abandoned += 1;
    }
}

/// Whether a device server's actor can be sent to: one of a session that closed is stopped.
pub(super) fn reachable(actor: &ActorRef<RemoteDeviceMsg>) -> bool {
    matches!(
        actor.get_status(),
        ractor::ActorStatus::Running | ractor::ActorStatus::Upgrading
    )
}

/// The device servers of the other processes in the group (this process's own, if it serves
/// too, left out).
pub(super) fn remote_servers() -> impl Iterator<Item = ActorRef<RemoteDeviceMsg>> {
    ractor::pg::get_members(&DEVICE_GROUP.to_string())
        .into_iter()
        .filter(|cell| !cell.get_id().is_local())
        .map(ActorRef::from)
}

/// What a device server says of its device, within `wait`: `None` if it does not answer in
/// time or answers what cannot be read (another protocol version included).
pub(super) async fn describe(server: &ActorRef<RemoteDeviceMsg>, wait: std::time::Duration) -> Option<Description> {
    match server.call(RemoteDeviceMsg::Describe, Some(wait)).await {
        Ok(CallResult::Success(bytes)) => decode::<Description>(&bytes, "description")
            .ok()
            .filter(|d| d.version == PROTOCOL),
        _ => None,
    }
}

/// A node's counts, asked of one of its device servers.
pub(super) async fn counts_of(server: &ActorRef<RemoteDeviceMsg>) -> Option<NodeCounts> {
    match server.call(RemoteDeviceMsg::Counts, Some(JOIN_TIMEOUT)).await {
        Ok(CallResult::Success(bytes)) => decode::<Counted>(&bytes, "counts")
            .ok()
            .filter(|c| c.version == PROTOCOL)
            .and_then(|c| c.counts.ok()),
        _ => None,
    }
}
