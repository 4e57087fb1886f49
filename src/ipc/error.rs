//! The protocol's one error type, [`IpcError`].

use super::frame::PROTOCOL_VERSION;

/// An IPC failure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IpcError {
    /// The peer closed the connection (a worker that died, a host that went away).
    #[error("the peer closed the connection")]
    Closed,
    /// A frame that is not a valid message (or a message that breaks the protocol's rules:
    /// an answer that does not match its request, a descriptor that is not sealed).
    #[error("malformed frame: {0}")]
    Malformed(String),
    /// A message that cannot be sent at all (its frame would exceed [`MAX_FRAME`](super::frame::MAX_FRAME), or it
    /// carries more than [`MAX_FDS`](super::frame::MAX_FDS) descriptors): nothing was sent, the connection is
    /// intact. For a request, an invalid request, not a failure of the peer.
    #[error("cannot be sent: {0}")]
    Unsendable(String),
    /// The peer speaks another protocol version.
    #[error("protocol version {got}, expected {PROTOCOL_VERSION}")]
    Version {
        /// The version received.
        got: u16,
    },
    /// A system call failed.
    #[error("{call}: {errno}")]
    Os {
        /// The call.
        call: &'static str,
        /// The error.
        errno: nix::errno::Errno,
    },
}

pub(super) fn os(call: &'static str) -> impl FnOnce(nix::errno::Errno) -> IpcError {
    move |errno| IpcError::Os { call, errno }
}
