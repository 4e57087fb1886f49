//! What a frame is: its header (magic and protocol version) and the protocol's limits.
//! Constants only, so every other part of the protocol can name them.

/// The protocol version; host and worker must agree. (4: memfds are sealed, a received one
/// must be; an output region is unmapped by the worker before it answers; a cached region's
/// descriptor is mapped whenever one comes. 5: errors of the host itself,
/// `GpuError::Host` and `InvalidReason::HostMemory`; `InvalidReason::WorkerBackend`. 6: durable
/// buffers and tasks: `Op::Durable`, `Op::Task`, `Reply::Outputs`, a request's `task_faults`.)
pub const PROTOCOL_VERSION: u16 = 6;
/// The most bytes in one frame.
pub const MAX_FRAME: usize = 128 * 1024;
/// Payloads above this many bytes travel in shared memory.
pub const INLINE_LIMIT: usize = 32 * 1024;
/// The most ops in one [`ToWorker::Batch`](super::protocol::ToWorker::Batch).
pub const MAX_BATCH: usize = 64;
/// The most inline payload bytes (sent and expected back) in one batch, so that both its
/// request and its response fit in a frame.
pub const BATCH_INLINE_BYTES: usize = MAX_FRAME / 4;
pub(super) const MAGIC: &[u8; 2] = b"HV";
/// The most descriptors one frame carries.
pub const MAX_FDS: usize = 4;
