//! The remote protocol: what travels between an application and a node, encoded and
//! decoded here (postcard), so that a message either side cannot read is a typed error,
//! never one `ractor_cluster` drops silently while its caller waits.
//!
//! Version [`PROTOCOL`] is in every request, answer and description, and in the device
//! group's name ([`DEVICE_GROUP`]): nodes and applications of other versions never meet,
//! and a forged or truncated message is refused by name.

use hipvisor_core::{DURABLE_ID_BASE, Op, Payload};
use ractor::RpcReplyPort;
use ractor_cluster::RactorClusterMessage;
use serde::{Deserialize, Serialize};

use crate::error::{OpResult, RuntimeError};
use crate::metrics::RetryStats;
use crate::state::DeviceState;

/// The version of the remote protocol: in every request and answer, and in the name of the
/// device group, so nodes of other versions never meet.
pub const PROTOCOL: u16 = 2;

/// The process group of every node's device servers.
pub const DEVICE_GROUP: &str = "hipvisor.device.v2";

/// How long `Cluster::join` waits for each node (its connection and its acceptance), and a
/// description or count asked of a node.
pub(crate) const JOIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Slack beyond a request's deadline before the caller gives up on the node.
pub(crate) const REPLY_MARGIN: std::time::Duration = std::time::Duration::from_secs(2);

/// The most bulk bytes in one request or answer: well under `ractor_cluster`'s 16 MiB
/// frame (a larger frame closes the whole session).
pub(crate) const CHUNK: usize = 8 << 20;

/// The most bytes one encoded request may have: a chunk and room to spare, under the
/// transport's 16 MiB frame.
pub(crate) const MAX_REQUEST: usize = 15 << 20;

/// Durable buffers an application replicates across nodes get ids from here up (random, the
/// same on every node); a node's own durable buffers are numbered from [`DURABLE_ID_BASE`]
/// and never get this far.
pub(crate) const PEER_DURABLE_BASE: u64 = DURABLE_ID_BASE + (1 << 61);

/// The messages of a device server: bytes in, bytes out, encoded here.
#[derive(RactorClusterMessage)]
pub enum RemoteDeviceMsg {
    /// A call ([`Request`] bytes), answered with [`Answer`] bytes.
    #[rpc]
    Submit(Vec<u8>, RpcReplyPort<Vec<u8>>),
    /// Which node and device this is, and how it is doing ([`Description`] bytes).
    #[rpc]
    Describe(RpcReplyPort<Vec<u8>>),
    /// The node's counts ([`Counted`] bytes).
    #[rpc]
    Counts(RpcReplyPort<Vec<u8>>),
}

/// What a request asks of a device.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum Call {
    /// An op, as a local caller submits it; `Op::Durable` only with an id at or above
    /// [`PEER_DURABLE_BASE`].
    Op(Op),
    /// A part of a durable buffer of `len` bytes with id `id` (at or above
    /// [`PEER_DURABLE_BASE`]) too large for one request: the bytes at `offset`. Parts come
    /// in order; the last one makes the buffer (answered with its handle), the others are
    /// answered `Done` (and not counted: the buffer's creation is one op).
    DurablePart {
        id: u64,
        len: u64,
        offset: u64,
        data: Payload,
    },
}

#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Request {
    pub(crate) version: u16,
    /// Unique among this application's requests; the answer carries it.
    pub(crate) id: u64,
    pub(crate) call: Call,
}

#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Answer {
    pub(crate) version: u16,
    /// The request's id; 0 when the node could not read the request.
    pub(crate) id: u64,
    pub(crate) result: OpResult,
    /// Whether the node's runtime answered it (and counted it in its metrics), rather than
    /// the node's server refusing it.
    pub(crate) counted: bool,
}

#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Description {
    pub(crate) version: u16,
    pub(crate) node: String,
    pub(crate) device: u32,
    pub(crate) state: DeviceState,
    /// Ops in flight on the device (from every application).
    pub(crate) in_flight: u32,
}

/// A node's counts, from its runtime's metrics: what every application's requests did
/// there.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeCounts {
    /// Answered ops (requests its runtime answered; a task is one).
    pub ops_total: u64,
    /// Of which succeeded.
    pub ops_succeeded: u64,
    /// Device restarts.
    pub restarts: u64,
    /// Retry statistics.
    pub retries: RetryStats,
    /// Tasks the node reran on its own devices.
    pub task_reruns: u64,
    /// Its devices' states, by index.
    pub devices: Vec<DeviceState>,
}

impl NodeCounts {
    /// What was counted since `before` (device states: now's).
    pub fn since(&self, before: &NodeCounts) -> NodeCounts {
        let retries = self.retries.since(&before.retries);
        NodeCounts {
            ops_total: self.ops_total.saturating_sub(before.ops_total),
            ops_succeeded: self.ops_succeeded.saturating_sub(before.ops_succeeded),
            restarts: self.restarts.saturating_sub(before.restarts),
            retries,
            task_reruns: self.task_reruns.saturating_sub(before.task_reruns),
            devices: self.devices.clone(),
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Counted {
    pub(crate) version: u16,
    pub(crate) node: String,
    pub(crate) counts: Result<NodeCounts, RuntimeError>,
}

pub(crate) fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    postcard::to_stdvec(value).expect("plain data encodes")
}

/// Decodes one whole message: trailing bytes are an error too.
pub(crate) fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8], what: &str) -> Result<T, String> {
    let (value, rest) = postcard::take_from_bytes(bytes).map_err(|e| format!("an undecodable {what}: {e}"))?;
    if !rest.is_empty() {
        return Err(format!("{} trailing bytes after a {what}", rest.len()));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hipvisor_core::{BufferHandle, Reply};

    #[test]
    fn requests_answers_and_counts_round_trip_and_damage_is_named() {
        let r = Request {
            version: PROTOCOL,
            id: 7,
            call: Call::Op(Op::MemInfo),
        };
        let bytes = encode(&r);
        let back: Request = decode(&bytes, "request").unwrap();
        assert_eq!((back.version, back.id), (PROTOCOL, 7));
        assert!(matches!(back.call, Call::Op(Op::MemInfo)));
        // Truncated, extended, garbage: named errors.
        assert!(
            decode::<Request>(&bytes[..bytes.len() - 1], "request")
                .unwrap_err()
                .contains("undecodable request")
        );
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(
            decode::<Request>(&longer, "request")
                .unwrap_err()
                .contains("1 trailing bytes")
        );
        assert!(decode::<Answer>(&[0xff; 3], "answer").is_err());

        let b = BufferHandle {
            device: 1,
            epoch: BufferHandle::DURABLE_EPOCH,
            id: PEER_DURABLE_BASE + 5,
            len: 4,
        };
        let a = Answer {
            version: PROTOCOL,
            id: 7,
            result: Ok(Reply::Buffer(b)),
            counted: true,
        };
        let back: Answer = decode(&encode(&a), "answer").unwrap();
        assert!(matches!(back.result, Ok(Reply::Buffer(x)) if x == b));

        let mut counts = NodeCounts {
            ops_total: 3,
            ops_succeeded: 2,
            devices: vec![DeviceState::Ready, DeviceState::Lost],
            ..NodeCounts::default()
        };
        counts.retries.success_by_attempt.insert(2, 1);
        let c = Counted {
            version: PROTOCOL,
            node: "n".into(),
            counts: Ok(counts.clone()),
        };
        let back: Counted = decode(&encode(&c), "counts").unwrap();
        assert_eq!(back.counts.unwrap(), counts);
    }
}
