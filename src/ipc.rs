//! The host ↔ worker protocol (process isolation): framed, versioned messages over a Unix
//! `SOCK_SEQPACKET` socket pair, file descriptors passed with `SCM_RIGHTS`, and shared
//! memory (`memfd_create`, so a small `/dev/shm` does not matter) for bulk bytes and for the
//! control page in which the worker publishes which request it has started.
//!
//! A frame is one datagram: `b"HV"`, the protocol version (u16 LE), then a postcard-encoded
//! message. Datagrams keep frame boundaries, so a frame is never split or merged, and the
//! descriptors sent with a frame arrive with it. Frames are small (at most [`MAX_FRAME`]);
//! bytes above [`INLINE_LIMIT`] travel in shared-memory regions instead. Malformed frames
//! (bad magic, version, truncated or undecodable body, oversized, truncated control data)
//! are typed [`IpcError`]s, never panics; a message too large for a frame is
//! [`IpcError::Unsendable`] before anything is sent.
//!
//! The host never trusts a worker: [`check_answer`] and [`check_batch_frame`] check every
//! id, length, count and handle of an answer against the request, and a descriptor received
//! from the peer is mapped only once its seals and size are checked ([`Region::map`]).
//! Every memfd is sealed against shrinking and growing before it is sent, so no peer can
//! truncate memory the other has mapped (which would be SIGBUS on the next access); output
//! bytes reach the application sealed against writes ([`OutputRegion::into_payload`]).
//!
//! `unsafe` for mapping memory and setting up the worker process lives in this module (and
//! the backend files) only; each block says why it is sound.

pub mod error;
pub mod frame;
pub mod protocol;
pub mod shm;
pub mod socket;
pub mod spawn;
#[cfg(test)]
mod tests;

pub use error::IpcError;
pub use frame::{BATCH_INLINE_BYTES, INLINE_LIMIT, MAX_BATCH, MAX_FDS, MAX_FRAME, PROTOCOL_VERSION};
pub use protocol::{
    FromWorker, Hello, REGION_CACHE, RegionLru, RegionRef, Request, SimHello, ToWorker, WireFault, check_answer,
    check_batch_frame, decode, encode,
};
pub use shm::{ControlPage, Output, OutputRegion, Region};
pub use socket::{Channel, SEND_RETRY_FOR, WORKER_ENV, WORKER_FD};
pub use spawn::{aborted, describe_exit, kill, spawn_worker};
