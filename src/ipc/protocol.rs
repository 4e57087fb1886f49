//! The messages of the host ↔ worker protocol, their encoding into frames, and the host's
//! checks of a worker's answers. Safe code only: sockets, shared memory and spawning are
//! the sibling modules.

use serde::{Deserialize, Serialize};

use super::error::IpcError;
use super::frame::*;
use crate::backend::sim::fault_plan::FaultAction;
use crate::backend::{BackendKind, Origin};
use crate::error::GpuError;
use crate::op::{DeviceInfo, ModuleHandle, ModuleSource, Op, Reply};

/// A fault the host's plan decided for a request (process isolation: the plan's state lives
/// in the host, so a restarted worker re-arms nothing).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum WireFault {
    /// Fail with this HIP code.
    Code(i32),
    /// Hang this long (ms), then complete.
    HangMs(u64),
    /// The worker process dies.
    Crash,
}

impl From<FaultAction> for WireFault {
    fn from(a: FaultAction) -> Self {
        match a {
            FaultAction::Code(c) => WireFault::Code(c),
            FaultAction::Hang(d) => WireFault::HangMs(d.as_millis() as u64),
            FaultAction::Crash => WireFault::Crash,
        }
    }
}

impl From<WireFault> for FaultAction {
    fn from(w: WireFault) -> Self {
        match w {
            WireFault::Code(c) => FaultAction::Code(c),
            WireFault::HangMs(ms) => FaultAction::Hang(std::time::Duration::from_millis(ms)),
            WireFault::Crash => FaultAction::Crash,
        }
    }
}

/// What the worker must open.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    /// The host's protocol version.
    pub version: u16,
    /// The backend.
    pub backend: BackendKind,
    /// The device index.
    pub device: u32,
    /// The epoch of the new context.
    pub epoch: u64,
    /// For the simulator: its devices and flavour.
    pub sim: Option<SimHello>,
}

/// What a simulator worker must know of `[sim]`: its devices, their memory, and which GPU
/// runtime it fails like. (The fault plan stays with the host.)
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SimHello {
    /// The number of simulated devices.
    pub devices: u32,
    /// The memory of each, in bytes.
    pub memory_bytes: u64,
    /// Which GPU runtime the simulator fails like.
    pub flavour: crate::config::SimFlavour,
}

/// How many host regions a worker keeps mapped (and registered as pinned memory with the
/// real backends) between requests. Host and worker apply the same least-recently-used
/// rule to the same sequence of requests, so the host knows which regions the worker still
/// has and sends a region's descriptor only when it does not.
pub const REGION_CACHE: usize = 8;

/// Where a request's bulk bytes are: a shared-memory region.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionRef {
    /// The host's id of the region.
    pub id: u64,
    /// Length of the region in bytes.
    pub len: u64,
    /// An application's host buffer, which the worker keeps mapped (and pinned) in its
    /// cache; otherwise a one-off region, sent with the frame and unmapped after the request.
    pub cached: bool,
}

/// The least-recently-used set of cached region ids, kept identically by host and worker.
#[derive(Debug, Default)]
pub struct RegionLru {
    ids: std::collections::VecDeque<u64>,
}

impl RegionLru {
    /// Marks `id` used. Returns `(known, evicted)`: whether it was cached already, and the
    /// id that left the cache to make room for it.
    pub fn touch(&mut self, id: u64) -> (bool, Option<u64>) {
        if let Some(pos) = self.ids.iter().position(|x| *x == id) {
            self.ids.remove(pos);
            self.ids.push_back(id);
            return (true, None);
        }
        let evicted = if self.ids.len() == REGION_CACHE {
            self.ids.pop_front()
        } else {
            None
        };
        self.ids.push_back(id);
        (false, evicted)
    }

    /// Forgets `id` (a request that named it was answered `Malformed`: host and worker both
    /// forget it, so its next use sends the descriptor again). `true` if it was cached.
    pub fn forget(&mut self, id: u64) -> bool {
        match self.ids.iter().position(|x| *x == id) {
            Some(pos) => {
                self.ids.remove(pos);
                true
            }
            None => false,
        }
    }
}

/// One op for the worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Request {
    /// The request id (increasing per worker).
    pub id: u64,
    /// The op; a payload above [`INLINE_LIMIT`] is taken out and sent as `input`.
    pub op: Op,
    /// Who issued it.
    pub origin: Origin,
    /// The fault the host's plan decided, if any.
    pub fault: Option<WireFault>,
    /// For a task: the faults the plan decided for its own ops, by their index in
    /// [`TaskOp::inner_ops`](crate::op::TaskOp::inner_ops) (`fault` is then unused).
    pub task_faults: Vec<(u32, WireFault)>,
    /// The op's payload, in the region sent with the frame.
    pub input: Option<RegionRef>,
    /// For a large copy from the device: the region (sent with the frame) to write into.
    pub output: Option<RegionRef>,
    /// The host expects the next request soon (its caller is serial): after answering, the
    /// worker polls for it for up to this many microseconds before it blocks, which saves
    /// waking a sleeping process on each op (`runtime.spin_us`; 0: block at once).
    pub linger_us: u32,
}

/// A message from the host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ToWorker {
    /// Opens the device (first message; the control page comes with it).
    Hello(Hello),
    /// Reloads a module under its old id (after a restart); a large image comes in a region.
    Restore {
        /// The module.
        module: ModuleHandle,
        /// Its source (a large image travels in `input`).
        source: ModuleSource,
        /// The image's region, if any.
        input: Option<RegionRef>,
    },
    /// Executes an op.
    Request(Request),
    /// Executes several ops, in order, answered by [`FromWorker::Batch`] frames: requests
    /// without regions only, at most [`MAX_BATCH`]. The worker stops at the first result
    /// that poisons its context (a sticky fault); the ops after it do not start.
    Batch(Vec<Request>),
    /// Exits.
    Shutdown,
}

/// A message from the worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum FromWorker {
    /// The device is open.
    Ready {
        /// The worker's protocol version.
        version: u16,
        /// The device.
        info: DeviceInfo,
    },
    /// The device could not be opened, or a restore failed.
    Failed(GpuError),
    /// A module was restored.
    Restored,
    /// The answer to a request; a large `Reply::Data` was written to the output region
    /// and comes back empty, with `output_len` bytes written.
    Response {
        /// The request id.
        id: u64,
        /// The result.
        result: Result<Reply, GpuError>,
        /// Bytes written to the output region.
        output_len: Option<u64>,
    },
    /// Answers to a [`ToWorker::Batch`]: `(id, result)` of ops that ran, in order. The
    /// worker sends what it has before it starts an op that may wait for the GPU, so no
    /// answer waits behind a long op; `done` marks the batch's last frame, after all of its
    /// ops or after one that poisoned the context (the rest did not start).
    Batch {
        /// The answers since the previous frame.
        results: Vec<(u64, Result<Reply, GpuError>)>,
        /// The batch's last frame.
        done: bool,
    },
    /// The worker could not understand a message.
    Malformed(String),
}

/// Encodes a message into one frame.
///
/// # Errors
/// [`IpcError::Unsendable`] if the encoding is larger than [`MAX_FRAME`] (or the message
/// cannot be encoded at all).
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, IpcError> {
    let mut out = Vec::with_capacity(64);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    let body = postcard::to_stdvec(msg).map_err(|e| IpcError::Unsendable(format!("cannot encode: {e}")))?;
    out.extend_from_slice(&body);
    if out.len() > MAX_FRAME {
        return Err(IpcError::Unsendable(format!(
            "a frame of {} bytes exceeds the protocol's {MAX_FRAME}",
            out.len()
        )));
    }
    Ok(out)
}

/// Checks a worker's answer to one op before the host believes it: the reply is of the
/// op's kind, and every length and handle in it is what the op asked for — a buffer of the
/// device and epoch with the allocation's length, a module of the device, mem-info with no
/// more free than total memory, the device's own description, and for a copy to the host
/// exactly the bytes asked for: inline, or (when the request had an output region of
/// `output` bytes) all of them written there and none inline. An error is an answer too
/// (the host reads its code); it comes with no output. A failed check is
/// [`IpcError::Malformed`]: the host treats the worker as broken.
///
/// # Errors
/// [`IpcError::Malformed`] saying what does not match.
pub fn check_answer(
    op: &Op,
    device: u32,
    epoch: u64,
    output: Option<usize>,
    result: &Result<Reply, GpuError>,
    output_len: Option<u64>,
) -> Result<(), IpcError> {
    let bad = |why: String| Err(IpcError::Malformed(format!("the answer to a {}: {why}", op.kind())));
    let reply = match result {
        Err(_) if output_len.is_some() => return bad("an error with output bytes".into()),
        Err(_) => return Ok(()),
        Ok(reply) => reply,
    };
    if output_len.is_some() && !matches!((op, reply), (Op::CopyFromDevice { .. }, Reply::Data(_))) {
        return bad("output bytes with a reply that has none".into());
    }
    match (op, reply) {
        (Op::Durable { id, data }, Reply::Buffer(h)) => {
            let want = (device, crate::op::BufferHandle::DURABLE_EPOCH, *id, data.len() as u64);
            if (h.device, h.epoch, h.id, h.len) != want {
                return bad(format!(
                    "the handle {h:?}; durable buffer {id} of {} bytes asked",
                    data.len()
                ));
            }
        }
        (Op::Task(task), Reply::Outputs(outputs)) => {
            let lens: Vec<u64> = outputs.iter().map(|o| o.len() as u64).collect();
            let asked: Vec<u64> = task.outputs.iter().map(|o| o.len).collect();
            if lens != asked {
                return bad(format!("outputs of {lens:?} bytes; {asked:?} asked"));
            }
        }
        (Op::Alloc { bytes }, Reply::Buffer(h)) => {
            if (h.device, h.epoch, h.len) != (device, epoch, *bytes) {
                return bad(format!(
                    "a buffer of device {} epoch {} with {} bytes; device {device} epoch {epoch}, {bytes} bytes asked",
                    h.device, h.epoch, h.len
                ));
            }
        }
        (Op::CopyFromDevice { len, .. }, Reply::Data(d)) => match (output, output_len) {
            (Some(cap), Some(n)) if d.is_empty() && n == *len && cap as u64 == *len => {}
            (None, None) if d.len() as u64 == *len => {}
            _ => {
                return bad(format!(
                    "{} bytes inline and {output_len:?} in an output region of {output:?}; {len} asked",
                    d.len()
                ));
            }
        },
        (Op::LoadModule { .. }, Reply::Module(m)) => {
            if m.device != device {
                return bad(format!("a module of device {}", m.device));
            }
        }
        (Op::MemInfo, Reply::MemInfo(m)) => {
            if m.free > m.total {
                return bad(format!("{} bytes free of {}", m.free, m.total));
            }
        }
        (Op::DeviceInfo, Reply::DeviceInfo(info)) => {
            if info.index != device {
                return bad(format!("the description of device {}", info.index));
            }
        }
        (
            Op::Free { .. }
            | Op::CopyToDevice { .. }
            | Op::CopyDeviceToDevice { .. }
            | Op::Memset { .. }
            | Op::Launch { .. }
            | Op::Synchronize,
            Reply::Done,
        ) => {}
        (_, other) => return bad(format!("a {} reply", reply_kind(other))),
    }
    Ok(())
}

fn reply_kind(r: &Reply) -> &'static str {
    match r {
        Reply::Done => "done",
        Reply::Buffer(_) => "buffer",
        Reply::Data(_) => "data",
        Reply::Module(_) => "module",
        Reply::MemInfo(_) => "mem-info",
        Reply::DeviceInfo(_) => "device-info",
        Reply::Outputs(_) => "outputs",
    }
}

/// Checks one [`FromWorker::Batch`] frame against the batch it answers (`requests`, of
/// which `answered` were answered by earlier frames): no more answers than ops, each with
/// the id of the next op in order and passing [`check_answer`]; a sticky error only as the
/// frame's last answer and only in its last frame (the worker stops there); a last frame
/// before every op is answered only after such an error; and no empty last frame for a
/// batch nothing answered.
///
/// # Errors
/// [`IpcError::Malformed`] saying what does not match.
pub fn check_batch_frame(
    requests: &[Request],
    answered: usize,
    results: &[(u64, Result<Reply, GpuError>)],
    done: bool,
    device: u32,
    epoch: u64,
) -> Result<(), IpcError> {
    let bad = |why: String| Err(IpcError::Malformed(format!("a batch answer: {why}")));
    let Some(rest) = requests.get(answered..).filter(|rest| results.len() <= rest.len()) else {
        return bad(format!(
            "{} answers after {answered}, for a batch of {}",
            results.len(),
            requests.len()
        ));
    };
    for (i, ((id, result), request)) in results.iter().zip(rest).enumerate() {
        if *id != request.id {
            return bad(format!("id {id} where {} was next", request.id));
        }
        check_answer(&request.op, device, epoch, None, result, None)?;
        let sticky = matches!(result, Err(e) if e.class() == crate::error::ErrorClass::Sticky);
        if sticky && (i + 1 != results.len() || !done) {
            return bad(format!("answers after request {id}'s sticky fault"));
        }
    }
    let total = answered + results.len();
    if done && total < requests.len() {
        let stopped = matches!(results.last(), Some((_, Err(e))) if e.class() == crate::error::ErrorClass::Sticky);
        if !stopped {
            return bad(format!(
                "done after {total} of {} ops without a sticky fault",
                requests.len()
            ));
        }
    }
    if done && total == 0 {
        return bad("done with no answer at all".into());
    }
    Ok(())
}

/// Decodes one frame. Total: any byte string gives a message or a typed error.
///
/// # Errors
/// [`IpcError::Malformed`] or [`IpcError::Version`].
pub fn decode<T: for<'de> Deserialize<'de>>(frame: &[u8]) -> Result<T, IpcError> {
    if frame.len() < 4 {
        return Err(IpcError::Malformed(format!(
            "{} bytes, shorter than a header",
            frame.len()
        )));
    }
    if frame.len() > MAX_FRAME {
        return Err(IpcError::Malformed(format!(
            "frame of {} bytes exceeds {MAX_FRAME}",
            frame.len()
        )));
    }
    if &frame[..2] != MAGIC {
        return Err(IpcError::Malformed("bad magic".into()));
    }
    let version = u16::from_le_bytes([frame[2], frame[3]]);
    if version != PROTOCOL_VERSION {
        return Err(IpcError::Version { got: version });
    }
    let (msg, rest) = postcard::take_from_bytes(&frame[4..]).map_err(|e| IpcError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(IpcError::Malformed(format!("{} trailing bytes", rest.len())));
    }
    Ok(msg)
}
