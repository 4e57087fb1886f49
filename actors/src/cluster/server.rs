//! The node's side ([`serve`], `hipvisor node`): per local device, a server actor in the
//! device group that executes its peers' requests through the node's runtime, behind a
//! `ractor_cluster` node server that authenticates peers by cookie.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hipvisor_core::sync::lock;
use hipvisor_core::{BufferHandle, Op, Payload, Reply};
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
    replicas: Arc<Replicas>,
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
                // Decoded and answered by the node's runtime (by its op deadline once the
                // device has a slot for it) off the actor, which serves on meanwhile (a
                // request of megabytes does not hold up the heartbeats).
                let (node, gpu, replicas) = (st.node.clone(), st.gpu.clone(), st.replicas.clone());
                tokio::spawn(async move {
                    let request = decode::<Request>(&bytes, "request").and_then(|r| {
                        if r.version == PROTOCOL {
                            Ok(r)
                        } else {
                            Err(format!("protocol version {}, this node speaks {PROTOCOL}", r.version))
                        }
                    });
                    let answer = match request {
                        Ok(request) => execute(&gpu, &replicas, node, request).await,
                        Err(reason) => refusal(0, node, reason),
                    };
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

/// A replica too large for one request, being assembled from its parts.
pub(super) struct Staged {
    region: hipvisor_core::ipc::Region,
    filled: u64,
    touched: Instant,
}

/// The replicas being made on one device, by id: those too large for one request being
/// assembled from their parts, and a gate for each id being made, so that two requests for
/// one id (an attempt and its retry, both at the node) are made one after the other and the
/// second finds the first's buffer.
#[derive(Default)]
pub(super) struct Replicas {
    staged: Mutex<HashMap<u64, Staged>>,
    gates: Mutex<HashMap<u64, Arc<tokio::sync::Mutex<()>>>>,
}

impl Replicas {
    /// Runs `make` for replica `d` once no other request for `d` is being made.
    async fn one_at_a_time<F: Future<Output = Answer>>(&self, d: u64, make: F) -> Answer {
        let gate = Gate {
            replicas: self,
            d,
            gate: lock(&self.gates).entry(d).or_default().clone(),
        };
        let _made = gate.gate.lock().await;
        make.await
    }
}

/// A request's hold on the gate of replica `d`: the gate goes from the map with the last
/// request for `d`, answered or dropped.
struct Gate<'a> {
    replicas: &'a Replicas,
    d: u64,
    gate: Arc<tokio::sync::Mutex<()>>,
}

impl Drop for Gate<'_> {
    fn drop(&mut self) {
        let mut gates = lock(&self.replicas.gates);
        // Ours and the map's: nobody waits for it (a clone is taken under this lock).
        if Arc::strong_count(&self.gate) == 2 && gates.get(&self.d).is_some_and(|g| Arc::ptr_eq(g, &self.gate)) {
            gates.remove(&self.d);
        }
    }
}

/// A replica whose parts stopped coming this long ago (its application gone) is dropped.
const STAGING_IDLE: Duration = Duration::from_secs(60);

/// Runs one request through the node's runtime, which answers it by its own op deadline
/// (the application stops waiting at its own): every request it takes in, it counts once.
async fn execute(gpu: &DeviceHandle, replicas: &Replicas, node: String, request: Request) -> Answer {
    let Request { id, call, .. } = request;
    // A replica's durable buffer: the application chose its id (the same on every node).
    let (d, data) = match call {
        Call::Op(Op::Durable { id: d, data }) => (d, data),
        Call::DurablePart {
            id: d,
            len,
            offset,
            data,
        } => match stage(&replicas.staged, d, len, offset, &data) {
            Ok(Some(whole)) => (d, whole),
            Ok(None) => {
                return Answer {
                    version: PROTOCOL,
                    id,
                    result: Ok(Reply::Done),
                    counted: false,
                };
            }
            Err(reason) => return refusal(id, node, reason),
        },
        Call::Op(op) => return answered(id, gpu.submit(op).await),
    };
    if d < PEER_DURABLE_BASE {
        let reason = format!("durable buffer id {d}: a peer's ids are at or above {PEER_DURABLE_BASE}");
        return refusal(id, node, reason);
    }
    replicas.one_at_a_time(d, make_replica(gpu, node, id, d, data)).await
}

/// Makes replica `d` from `data` on `gpu`, or answers the one made already.
async fn make_replica(gpu: &DeviceHandle, node: String, id: u64, d: u64, data: Payload) -> Answer {
    // Made already (an earlier attempt whose answer was lost): the same buffer again, never
    // another application's overwritten.
    let held = lock(&gpu.shared.cores[gpu.index() as usize].durables)
        .get(&d)
        .map(|c| c.data.len() as u64);
    if let Some(held) = held {
        if held != data.len() as u64 {
            let reason = format!(
                "durable buffer {d} exists on this device with {held} bytes, not {}",
                data.len()
            );
            return refusal(id, node, reason);
        }
        let existing = BufferHandle {
            device: gpu.index(),
            epoch: BufferHandle::DURABLE_EPOCH,
            id: d,
            len: held,
        };
        return Answer {
            version: PROTOCOL,
            id,
            result: Ok(Reply::Buffer(existing)),
            counted: false,
        };
    }
    let data = match crate::durable::host_copy(gpu.index(), data) {
        Ok(data) => data,
        Err(e) => return refusal(id, node, e.to_string()),
    };
    answered(id, gpu.durable_with_id(d, data).await.map(Reply::Buffer))
}

/// Puts a part of replica `d` (`len` bytes in all) in place: the whole once its last part
/// came (parts come in order, each once; a part at 0 starts the replica over).
fn stage(
    staging: &Mutex<HashMap<u64, Staged>>,
    d: u64,
    len: u64,
    offset: u64,
    data: &Payload,
) -> Result<Option<Payload>, String> {
    let end = offset.checked_add(data.len() as u64).filter(|e| *e <= len);
    let Some(end) = end else {
        return Err(format!(
            "a part [{offset}, +{}) of a {len}-byte durable buffer",
            data.len()
        ));
    };
    let mut staged = lock(staging);
    staged.retain(|_, s| s.touched.elapsed() < STAGING_IDLE);
    // A first part starts over: the application sends again from the start a replica whose
    // earlier try it gave up halfway (its deadline), when it provisions the device again.
    if offset == 0 {
        staged.remove(&d);
    }
    let s = match staged.entry(d) {
        std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
        std::collections::hash_map::Entry::Vacant(e) => {
            let n = usize::try_from(len).map_err(|_| format!("a durable buffer of {len} bytes"))?;
            let region = hipvisor_core::ipc::Region::new(n)
                .map_err(|e| format!("no host memory for a durable buffer of {len} bytes: {e}"))?;
            e.insert(Staged {
                region,
                filled: 0,
                touched: Instant::now(),
            })
        }
    };
    if s.region.len() as u64 != len || offset != s.filled {
        staged.remove(&d);
        return Err(format!(
            "a part at {offset} of durable buffer {d} ({len} bytes): parts come in order, from 0"
        ));
    }
    s.region.as_mut_slice()[offset as usize..end as usize].copy_from_slice(data.as_bytes());
    s.filled = end;
    s.touched = Instant::now();
    if end < len {
        return Ok(None);
    }
    let whole = staged.remove(&d).map(|s| s.region);
    Ok(whole.map(|r| Payload::shared(Arc::new(r))))
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
            replicas: Arc::default(),
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

#[cfg(test)]
mod tests {
    use super::*;
    use hipvisor_core::config::Isolation;

    async fn runtime() -> Runtime {
        let mut c = hipvisor_core::RuntimeConfig::default();
        c.runtime.isolation = Isolation::Thread;
        c.sim.devices = 1;
        c.sim.faults.clear();
        Runtime::builder().config(c).start().await.expect("a runtime")
    }

    fn request(id: u64, call: Call) -> Request {
        Request {
            version: PROTOCOL,
            id,
            call,
        }
    }

    /// The part at `offset` of replica `id`, `len` bytes in all.
    fn part(id: u64, len: u64, offset: u64, bytes: Vec<u8>) -> Call {
        Call::DurablePart {
            id,
            len,
            offset,
            data: bytes.into(),
        }
    }

    fn durable(id: u64, bytes: &[u8]) -> Call {
        Call::Op(Op::Durable {
            id,
            data: bytes.to_vec().into(),
        })
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn peer_durable_ids_are_checked_made_once_and_never_overwritten() {
        let rt = runtime().await;
        let gpu = rt.device(0).unwrap();
        let replicas = Replicas::default();
        let node = || "n".to_string();
        // Not a peer's id: refused by the server, not counted.
        let a = execute(
            &gpu,
            &replicas,
            node(),
            request(1, durable(hipvisor_core::DURABLE_ID_BASE + 1, &[1; 8])),
        )
        .await;
        assert!(
            matches!(a.result, Err(RuntimeError::Remote { .. })) && !a.counted,
            "{a:?}"
        );
        // A peer's: made through the runtime, counted.
        let id = PEER_DURABLE_BASE + 42;
        let a = execute(&gpu, &replicas, node(), request(2, durable(id, &[1; 8]))).await;
        let Ok(Reply::Buffer(b)) = a.result else {
            panic!("{a:?}")
        };
        assert!(a.counted && b.is_durable() && b.id == id);
        // Again (an attempt whose answer was lost): the same buffer, its bytes untouched.
        let a = execute(&gpu, &replicas, node(), request(3, durable(id, &[9; 8]))).await;
        assert!(
            matches!(a.result, Ok(Reply::Buffer(x)) if x == b) && !a.counted,
            "{a:?}"
        );
        assert_eq!(gpu.copy_from_device(b, 0, 8).await.unwrap().as_bytes(), &[1; 8]);
        // Another length: refused, the buffer kept.
        let a = execute(&gpu, &replicas, node(), request(4, durable(id, &[9; 16]))).await;
        assert!(matches!(a.result, Err(RuntimeError::Remote { .. })), "{a:?}");
        assert_eq!(gpu.copy_from_device(b, 0, 8).await.unwrap().as_bytes(), &[1; 8]);
        rt.shutdown().await;
    }

    /// Requests for one replica at once (an attempt and its retry, both at the node): made
    /// once; the others get its buffer and leave its bytes alone.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn requests_for_one_replica_at_once_make_it_once() {
        let rt = runtime().await;
        let gpu = rt.device(0).unwrap();
        let replicas = Replicas::default();
        let id = PEER_DURABLE_BASE + 9;
        let one = |i: u8| execute(&gpu, &replicas, "n".into(), request(u64::from(i), durable(id, &[i; 8])));
        // Polled in turn in one task: each starts before any is made.
        let answers = tokio::join!(one(1), one(2), one(3), one(4));
        let answers = [answers.0, answers.1, answers.2, answers.3];
        let made: Vec<_> = answers.iter().filter(|a| a.counted).collect();
        assert_eq!(made.len(), 1, "made once: {answers:?}");
        let Ok(Reply::Buffer(b)) = made[0].result else {
            panic!("{answers:?}")
        };
        for a in &answers {
            assert!(matches!(a.result, Ok(Reply::Buffer(x)) if x == b), "{a:?}");
        }
        let bytes = gpu.copy_from_device(b, 0, 8).await.unwrap();
        assert_eq!(bytes.as_bytes(), &[made[0].id as u8; 8], "the bytes of the one made");
        assert!(lock(&replicas.gates).is_empty(), "no gate left");
        // A request dropped while it holds the gate (the node shutting down) leaves none.
        let mut held = Box::pin(replicas.one_at_a_time(id, std::future::pending()));
        assert!(tokio::time::timeout(Duration::ZERO, &mut held).await.is_err());
        assert_eq!(lock(&replicas.gates).len(), 1);
        drop(held);
        assert!(lock(&replicas.gates).is_empty(), "no gate left by a dropped request");
        rt.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_replica_in_parts_is_made_once_whole_and_parts_out_of_order_are_refused() {
        let rt = runtime().await;
        let gpu = rt.device(0).unwrap();
        let replicas = Replicas::default();
        let id = PEER_DURABLE_BASE + 7;
        let send = |n, call| execute(&gpu, &replicas, "n".into(), request(n, call));
        let a = send(1, part(id, 8, 0, vec![1, 2, 3, 4])).await;
        assert!(matches!(a.result, Ok(Reply::Done)) && !a.counted, "{a:?}");
        let a = send(2, part(id, 8, 4, vec![5, 6, 7, 8])).await;
        let Ok(Reply::Buffer(b)) = a.result else {
            panic!("{a:?}")
        };
        assert!(a.counted);
        assert_eq!(
            gpu.copy_from_device(b, 0, 8).await.unwrap().as_bytes(),
            &[1, 2, 3, 4, 5, 6, 7, 8]
        );
        assert!(lock(&replicas.staged).is_empty(), "nothing left staged");
        // Out of order, or past the end: refused, and nothing staged is kept.
        let other = PEER_DURABLE_BASE + 8;
        let a = send(3, part(other, 8, 4, vec![1; 4])).await;
        assert!(matches!(a.result, Err(RuntimeError::Remote { .. })), "{a:?}");
        let a = send(4, part(other, 8, 6, vec![1; 4])).await;
        assert!(matches!(a.result, Err(RuntimeError::Remote { .. })), "{a:?}");
        assert!(lock(&replicas.staged).is_empty());
        // A try given up halfway, sent again from the start: made from the second try.
        let again = PEER_DURABLE_BASE + 10;
        let a = send(5, part(again, 8, 0, vec![1; 4])).await;
        assert!(matches!(a.result, Ok(Reply::Done)), "{a:?}");
        let a = send(6, part(again, 8, 0, vec![2; 4])).await;
        assert!(matches!(a.result, Ok(Reply::Done)), "started over: {a:?}");
        let a = send(7, part(again, 8, 4, vec![3; 4])).await;
        let Ok(Reply::Buffer(b)) = a.result else {
            panic!("{a:?}")
        };
        assert_eq!(
            gpu.copy_from_device(b, 0, 8).await.unwrap().as_bytes(),
            &[2, 2, 2, 2, 3, 3, 3, 3]
        );
        rt.shutdown().await;
    }
}
