//! A device of another node ([`RemoteDevice`]): the typed ops of a local device, each one
//! request with an id and a deadline, answered once.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Instant;

use hipvisor_core::{BufferHandle, Op, OpKind, Payload, Reply};
use ractor::ActorRef;
use ractor::rpc::CallResult;

use super::state::{Inner, reachable};
use super::wire::REPLY_MARGIN;
use super::wire::{
    Answer, CHUNK, Call, MAX_REQUEST, PEER_DURABLE_BASE, PROTOCOL, RemoteDeviceMsg, Request, decode, encode,
};
use crate::error::{OpResult, RuntimeError};
use crate::handle::typed_ops;
use crate::shared::Shared;
use crate::state::DeviceState;
use hipvisor_core::sync::lock;

/// A device of another node: the same typed ops and answers as a local device
/// ([`crate::DeviceHandle`]; both are a [`crate::Device`]). It belongs to the
/// [`Cluster`](super::Cluster) that found it: once its node is lost, or the `Cluster` is
/// dropped, it answers `NodeLost`.
///
/// The handles it gives carry its index on its node ([`RemoteDevice::index`]); its number
/// among every device the cluster has seen is [`RemoteDevice::slot`] — the numbering of
/// [`Cluster::replicate`](super::Cluster::replicate)'s and
/// [`Cluster::replicate_module`](super::Cluster::replicate_module)'s replicas.
#[derive(Clone)]
pub struct RemoteDevice {
    pub(super) inner: Arc<Inner>,
    pub(super) node: String,
    pub(super) device: u32,
    pub(super) slot: u32,
    /// This application's requests to it now.
    pub(super) outstanding: Arc<AtomicU32>,
}

/// A request sent and not yet answered: abandoned (see [`Inner::abandoned`]) if dropped
/// before [`Pending::settle`].
struct Pending<'a> {
    inner: &'a Inner,
    node: &'a str,
    settled: bool,
}

impl Pending<'_> {
    fn settle(mut self) {
        self.settled = true;
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if !self.settled {
            self.inner.abandoned(self.node);
        }
    }
}

/// Whether `reply` is an answer to an op of `kind` (a durable buffer's parts: `Done`).
fn fits(kind: OpKind, reply: &Reply) -> bool {
    match reply {
        Reply::Done => !matches!(
            kind,
            OpKind::Alloc
                | OpKind::CopyFromDevice
                | OpKind::LoadModule
                | OpKind::MemInfo
                | OpKind::DeviceInfo
                | OpKind::Task
        ),
        Reply::Buffer(_) => matches!(kind, OpKind::Alloc | OpKind::Durable),
        Reply::Data(_) => kind == OpKind::CopyFromDevice,
        Reply::Module(_) => kind == OpKind::LoadModule,
        Reply::MemInfo(_) => kind == OpKind::MemInfo,
        Reply::DeviceInfo(_) => kind == OpKind::DeviceInfo,
        Reply::Outputs(_) => kind == OpKind::Task,
    }
}

/// Counts a request out while it is out.
struct Out<'a>(&'a AtomicU32);

impl<'a> Out<'a> {
    fn new(n: &'a AtomicU32) -> Self {
        n.fetch_add(1, Ordering::Relaxed);
        Out(n)
    }
}

impl Drop for Out<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl RemoteDevice {
    /// The node it belongs to.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Its index on its node (the `device` of the handles it gives).
    pub fn index(&self) -> u32 {
        self.device
    }

    /// Its number in its cluster, among every device of every node seen (never reused: a
    /// restarted node's devices get new ones).
    pub fn slot(&self) -> u32 {
        self.slot
    }

    /// Its state as of its node's last heartbeat; `Lost` once the node is lost.
    pub fn state(&self) -> DeviceState {
        match self.inner.route(self.slot) {
            Some(_) => self.inner.load(self.slot).0,
            None => DeviceState::Lost,
        }
    }

    /// Submits an op and waits for its one answer.
    ///
    /// Bulk bytes travel in chunks under the transport's frame limit (16 MiB; a larger
    /// frame closes the whole session): a copy is its chunks' copies, in order, answered
    /// with the first error (copies are idempotent: the caller may repeat the whole) or the
    /// whole.
    ///
    /// # Errors
    /// The op's typed error; `NodeLost` when its node went away or missed its heartbeats
    /// (`may_have_executed: false` when it was lost before the request was sent);
    /// `DeadlineExceeded` when a node still there did not answer by the deadline; `Remote`
    /// for an answer that cannot be decoded, or a request the node would not take.
    pub async fn submit(&self, op: Op) -> OpResult {
        if let Some(e) = Shared::reserved(self.device, &op) {
            return Err(e);
        }
        // One deadline for the whole op, its chunks included.
        let until = Instant::now() + self.inner.deadline;
        match op {
            Op::CopyToDevice { dst, offset, data } if data.len() > CHUNK => {
                self.copy_in_chunks(dst, offset, &data, until).await?;
                Ok(Reply::Done)
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
                    match self.call(Call::Op(part), until).await? {
                        Reply::Data(d) => bytes.extend_from_slice(d.as_bytes()),
                        other => unreachable!("a copy back answered {other:?}"),
                    }
                    at += n;
                }
                Ok(Reply::Data(bytes.into()))
            }
            op => self.call(Call::Op(op), until).await,
        }
    }

    async fn copy_in_chunks(
        &self,
        dst: BufferHandle,
        offset: u64,
        data: &Payload,
        until: Instant,
    ) -> Result<(), RuntimeError> {
        for (i, chunk) in data.as_bytes().chunks(CHUNK).enumerate() {
            let part = Op::CopyToDevice {
                dst,
                offset: offset + (i * CHUNK) as u64,
                data: chunk.to_vec().into(),
            };
            self.call(Call::Op(part), until).await?;
        }
        Ok(())
    }

    /// Uploads `data` as a new durable buffer of this device: its node keeps its host copy
    /// and restores it into the device's new contexts, as for its own durable buffers.
    ///
    /// # Errors
    /// The op's typed error; `NodeLost`, `Remote`.
    pub async fn durable(&self, data: impl Into<Payload>) -> Result<BufferHandle, RuntimeError> {
        let id = PEER_DURABLE_BASE + rand::random::<u64>() % (1 << 61);
        self.durable_with_id(id, data.into()).await
    }

    /// A durable buffer with id `id` (a peer's: at or above `PEER_DURABLE_BASE`): one
    /// request up to a chunk, else parts the node assembles — within one deadline.
    pub(super) async fn durable_with_id(&self, id: u64, data: Payload) -> Result<BufferHandle, RuntimeError> {
        let until = Instant::now() + self.inner.deadline;
        let len = data.len() as u64;
        if data.len() <= CHUNK {
            return crate::handle::expect_reply!(
                self.call(Call::Op(Op::Durable { id, data }), until).await,
                Reply::Buffer(b) => b
            );
        }
        // In parts, assembled on the node, made once whole.
        let mut made = None;
        for (i, chunk) in data.as_bytes().chunks(CHUNK).enumerate() {
            let part = Call::DurablePart {
                id,
                len,
                offset: (i * CHUNK) as u64,
                data: chunk.to_vec().into(),
            };
            made = Some(self.call(part, until).await?);
        }
        let buffer = match made {
            Some(Reply::Buffer(b)) => b,
            other => unreachable!("a durable buffer's last part answered {other:?}"),
        };
        Ok(buffer)
    }

    /// The node's device `index` (where a buffer the node moved lives), while the node is
    /// live.
    pub fn sibling(&self, index: u32) -> Option<RemoteDevice> {
        self.inner.sibling(&self.node, index)
    }

    /// One request, one answer, by `until` (and a margin for the answer's way back).
    pub(super) async fn call(&self, call: Call, until: Instant) -> OpResult {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let kind = match &call {
            Call::Op(op) => op.kind(),
            Call::DurablePart { .. } => OpKind::Durable,
        };
        // What the node would refuse, refused here (a task's inputs and outputs bounded, so
        // its answer fits a frame too).
        if let Call::Op(op) = &call
            && let Err(reason) = op.check_limits()
        {
            return Err(RuntimeError::Gpu(hipvisor_core::GpuError::invalid(
                kind,
                self.device,
                reason,
            )));
        }
        let bytes = encode(&Request {
            version: PROTOCOL,
            id,
            call,
        });
        // A larger frame would close the whole session (every request on it lost).
        if bytes.len() > MAX_REQUEST {
            return Err(self.too_large(kind, bytes.len()));
        }
        let lost = |may_have_executed| RuntimeError::NodeLost {
            node: self.node.clone(),
            may_have_executed,
        };
        let past = |may_have_executed| RuntimeError::DeadlineExceeded {
            device: self.device,
            op: kind,
            deadline_ms: self.inner.deadline.as_millis() as u64,
            may_have_executed,
        };
        // Its node's session now (a node lost and back has a new one), while it is live.
        let Some((actor, mut gone)) = self.inner.route(self.slot) else {
            return Err(lost(false));
        };
        let Some(wait) = until.checked_duration_since(Instant::now()) else {
            return Err(past(false));
        };
        let _out = Out::new(&self.outstanding);
        let pending = Pending {
            inner: &self.inner,
            node: &self.node,
            settled: false,
        };
        let call = actor.call(|reply| RemoteDeviceMsg::Submit(bytes, reply), Some(wait + REPLY_MARGIN));
        let sent = tokio::select! {
            sent = call => sent,
            // Lost while the request was out (a frozen node misses its heartbeats): answered
            // now, not at the deadline. (A closed watch — its `Cluster` dropped, or the node
            // back under a fresh watch — is lost too.)
            _ = gone.wait_for(|l| *l) => return Err(lost(true)),
        };
        let bytes = match sent {
            Ok(CallResult::Success(bytes)) => bytes,
            // Not sent: the actor of the node's session is gone.
            Err(_) => {
                pending.settle();
                return Err(lost(false));
            }
            // The session closed (its reply ports are dropped at once, and the node is lost
            // by then), or no answer came in time from a node still there (ractor reports
            // either as a sender error or a timeout). (Before `until` it cannot be the
            // latter: the session dropped, and the event that marks the node lost may lag
            // behind the dropped reply port.)
            Ok(CallResult::SenderError | CallResult::Timeout) if *gone.borrow() || Instant::now() < until => {
                return Err(lost(true));
            }
            Ok(CallResult::SenderError | CallResult::Timeout) => return Err(past(true)),
        };
        pending.settle();
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
        if answer.counted {
            self.inner.answered(&self.node, answer.result.is_ok());
        }
        // A reply of another kind (a broken or forged node) is an error, never a panic.
        match answer.result {
            Ok(reply) if !fits(kind, &reply) => Err(remote(format!("a {kind:?} answered with {reply:?}"))),
            result => result,
        }
    }

    /// The error for a request of `len` bytes, too large to send.
    fn too_large(&self, kind: OpKind, len: usize) -> RuntimeError {
        let what = format!(
            "a request of {len} bytes: a remote request carries at most {MAX_REQUEST} (copies and durable buffers \
             travel in chunks; a task or module image this large cannot go to a node)"
        );
        let reason = match kind {
            OpKind::Task => hipvisor_core::InvalidReason::BadTask { reason: what },
            OpKind::LoadModule => hipvisor_core::InvalidReason::BadModuleImage { reason: what },
            _ => {
                return RuntimeError::Remote {
                    node: self.node.clone(),
                    reason: what,
                };
            }
        };
        RuntimeError::Gpu(hipvisor_core::GpuError::invalid(kind, self.device, reason))
    }

    typed_ops!();
}

impl Inner {
    /// Where a request to the device in `slot` goes now — its server on its node's current
    /// session — and whether that node is lost, while it is live.
    pub(super) fn route(&self, slot: u32) -> Option<(ActorRef<RemoteDeviceMsg>, tokio::sync::watch::Receiver<bool>)> {
        let known = lock(&self.known);
        let k = known.get(slot as usize)?;
        let lost = self.nodes.watch(&k.node);
        // A node back under a new session: its devices' actors of the old one are stopped
        // until the next description gives the new ones.
        if *lost.borrow() || !reachable(&k.actor) {
            return None;
        }
        Some((k.actor.clone(), lost))
    }

    /// The device in `slot`, while its node is live.
    pub(super) fn device(self: &Arc<Self>, slot: u32) -> Option<RemoteDevice> {
        self.route(slot)?;
        let known = lock(&self.known);
        let k = known.get(slot as usize)?;
        Some(RemoteDevice {
            inner: self.clone(),
            node: k.node.clone(),
            device: k.index,
            slot,
            outstanding: k.outstanding.clone(),
        })
    }

    /// Every device of every live node, by slot.
    pub(super) fn live(self: &Arc<Self>) -> Vec<RemoteDevice> {
        let n = lock(&self.known).len() as u32;
        (0..n).filter_map(|slot| self.device(slot)).collect()
    }

    /// The node's device `index`, while the node is live.
    pub(super) fn sibling(self: &Arc<Self>, node: &str, index: u32) -> Option<RemoteDevice> {
        let slot = lock(&self.known)
            .iter()
            .position(|k| k.node == node && k.index == index)?;
        self.device(slot as u32)
    }

    /// The least-loaded ready device of a live node (else a restarting one) among the slots
    /// `take` takes, by what its node last reported and this application's requests to it
    /// now.
    pub(super) fn least_loaded(self: &Arc<Self>, take: impl Fn(u32) -> bool) -> Option<RemoteDevice> {
        let mut best: Option<((bool, u32), RemoteDevice)> = None;
        for d in self.live().into_iter().filter(|d| take(d.slot)) {
            let (state, load) = self.load(d.slot);
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_reply_of_the_op_s_kind_fits() {
        use hipvisor_core::MemInfo;
        let mem = Reply::MemInfo(MemInfo { free: 1, total: 2 });
        assert!(fits(OpKind::MemInfo, &mem));
        assert!(!fits(OpKind::CopyFromDevice, &Reply::Done), "a copy back answers data");
        assert!(!fits(OpKind::Alloc, &mem));
        assert!(fits(OpKind::Launch, &Reply::Done));
        assert!(fits(OpKind::Durable, &Reply::Done), "a durable buffer's parts");
        assert!(!fits(OpKind::Task, &Reply::Done));
        assert!(fits(OpKind::Task, &Reply::Outputs(Vec::new())));
    }
}
