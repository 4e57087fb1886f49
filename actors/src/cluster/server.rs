//! The node's side ([`serve`], `hipvisor node`): per local device, a server actor in the
//! device group that executes its peers' requests through the node's runtime, behind a
//! `ractor_cluster` node server that authenticates peers by cookie.

use std::net::SocketAddr;
use std::time::Duration;

use hipvisor_core::{Op, Reply};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use ractor_cluster::node::NodeConnectionMode;
use ractor_cluster::{NodeServer, NodeServerMessage};

use super::wire::{
    Answer, Call, Counted, DEVICE_GROUP, Description, NodeCounts, PEER_DURABLE_BASE, PROTOCOL, RemoteDeviceMsg,
    Request, decode, encode,
};
use crate::error::{OpResult, RuntimeError};
use crate::handle::DeviceHandle;
use crate::runtime::Runtime;

/// A device server: executes the requests its peers send on one local device.
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
                    state: st.gpu.state(),
                    in_flight: st.gpu.in_flight(),
                };
                let _ = reply.send(encode(&d));
            }
            RemoteDeviceMsg::Counts(reply) => {
                let (gpu, node) = (st.gpu.clone(), st.node.clone());
                tokio::spawn(async move {
                    let counts = gpu.shared.snapshot().await.map(|s| NodeCounts {
                        ops_total: s.ops_total,
                        ops_succeeded: s.ops_succeeded,
                        restarts: s.restarts,
                        retries: s.retries,
                        task_reruns: s.recovery.task_reruns,
                        devices: s.devices.iter().map(|d| d.state).collect(),
                    });
                    let c = Counted {
                        version: PROTOCOL,
                        node,
                        counts,
                    };
                    let _ = reply.send(encode(&c));
                });
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
                        let _ = reply.send(encode(&refusal(0, node, reason)));
                        return Ok(());
                    }
                };
                // Answered by the caller's deadline at the latest (a slot on a busy device
                // included); the actor serves on meanwhile.
                let gpu = st.gpu.clone();
                tokio::spawn(async move {
                    let answer = execute(&gpu, node, request).await;
                    let _ = reply.send(encode(&answer));
                });
            }
        }
        Ok(())
    }
}

/// An answer the node's server gives without its runtime (not counted in its metrics).
fn refusal(id: u64, node: String, reason: String) -> Answer {
    Answer {
        version: PROTOCOL,
        id,
        result: Err(RuntimeError::Remote { node, reason }),
        counted: false,
    }
}

/// Runs one request through the node's runtime, by its deadline.
async fn execute(gpu: &DeviceHandle, node: String, request: Request) -> Answer {
    let Request {
        id, deadline_ms, call, ..
    } = request;
    // A replica's durable buffer: the application chose its id (the same on every node).
    let (d, data) = match call {
        Call::Op(Op::Durable { id: d, data }) => (d, data),
        Call::DurableZeroed { id: d, len } => {
            let zeros = usize::try_from(len)
                .map_err(|_| format!("a durable buffer of {len} bytes"))
                .and_then(|n| {
                    hipvisor_core::worker::client::HostCopy::build(n, |_| {})
                        .map_err(|e| format!("no host memory for a durable buffer of {len} bytes: {e}"))
                });
            match zeros {
                Ok(data) => (d, data),
                Err(reason) => return refusal(id, node, reason),
            }
        }
        Call::Op(op) => {
            let deadline = Duration::from_millis(deadline_ms);
            let kind = op.kind();
            let result = match tokio::time::timeout(deadline, gpu.submit(op)).await {
                Ok(result) => result,
                Err(_) => Err(RuntimeError::DeadlineExceeded {
                    device: gpu.index(),
                    op: kind,
                    deadline_ms,
                    may_have_executed: true,
                }),
            };
            return answered(id, result);
        }
    };
    if d < PEER_DURABLE_BASE {
        let reason = format!("durable buffer id {d}: a peer's ids are at or above {PEER_DURABLE_BASE}");
        return refusal(id, node, reason);
    }
    let data = match crate::durable::host_copy(gpu.index(), data) {
        Ok(data) => data,
        Err(e) => return refusal(id, node, e.to_string()),
    };
    let deadline = Duration::from_millis(deadline_ms);
    let result = match tokio::time::timeout(deadline, gpu.durable_with_id(d, data)).await {
        Ok(made) => made.map(Reply::Buffer),
        Err(_) => Err(RuntimeError::DeadlineExceeded {
            device: gpu.index(),
            op: hipvisor_core::OpKind::Durable,
            deadline_ms,
            may_have_executed: true,
        }),
    };
    answered(id, result)
}

fn answered(id: u64, result: OpResult) -> Answer {
    Answer {
        version: PROTOCOL,
        id,
        result,
        counted: true,
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
