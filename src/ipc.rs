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
#![allow(unsafe_code)]

use std::io::IoSlice;
use std::num::NonZeroUsize;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};

use nix::sys::mman::{MapFlags, ProtFlags, mmap, munmap};
use nix::sys::socket::{AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType, sendmsg, socketpair};
use serde::{Deserialize, Serialize};

use crate::backend::{BackendKind, Origin};
use crate::error::GpuError;
use crate::fault_plan::FaultAction;
use crate::op::{DeviceInfo, ModuleHandle, ModuleSource, Op, Reply};

/// The protocol version; host and worker must agree. (4: memfds are sealed, a received one
/// must be; an output region is unmapped by the worker before it answers; a cached region's
/// descriptor is mapped whenever one comes.)
pub const PROTOCOL_VERSION: u16 = 4;
/// The most bytes in one frame.
pub const MAX_FRAME: usize = 128 * 1024;
/// Payloads above this many bytes travel in shared memory.
pub const INLINE_LIMIT: usize = 32 * 1024;
/// The descriptor number of the worker's socket in the worker process.
pub const WORKER_FD: RawFd = 3;
/// The environment switch that makes a process a worker: the value is its socket's
/// descriptor number. (Not `HIPVISOR_*`: that prefix is configuration.)
pub const WORKER_ENV: &str = "HV_WORKER_FD";
/// The most ops in one [`ToWorker::Batch`].
pub const MAX_BATCH: usize = 64;
/// The most inline payload bytes (sent and expected back) in one batch, so that both its
/// request and its response fit in a frame.
pub const BATCH_INLINE_BYTES: usize = MAX_FRAME / 4;
const MAGIC: &[u8; 2] = b"HV";
/// The most descriptors one frame carries.
pub const MAX_FDS: usize = 4;
/// How long a send keeps retrying transient errors (`EINTR`, `EAGAIN`, `ENOBUFS`) before it
/// gives up with [`IpcError::Os`].
pub const SEND_RETRY_FOR: std::time::Duration = std::time::Duration::from_secs(2);

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
    /// A message that cannot be sent at all (its frame would exceed [`MAX_FRAME`], or it
    /// carries more than [`MAX_FDS`] descriptors): nothing was sent, the connection is
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

fn os(call: &'static str) -> impl FnOnce(nix::errno::Errno) -> IpcError {
    move |errno| IpcError::Os { call, errno }
}

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

/// One end of a host ↔ worker connection.
#[derive(Debug)]
pub struct Channel {
    fd: OwnedFd,
    buf: Vec<u8>,
}

/// Whether this process has claimed its worker socket ([`Channel::from_worker_env`]).
static WORKER_FD_CLAIMED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

impl Channel {
    /// A connected pair (host end, worker end), both close-on-exec.
    ///
    /// # Errors
    /// [`IpcError::Os`].
    pub fn pair() -> Result<(Channel, Channel), IpcError> {
        let (a, b) = socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC)
            .map_err(os("socketpair"))?;
        Ok((Channel::from_fd(a), Channel::from_fd(b)))
    }

    /// Wraps a connected `SOCK_SEQPACKET` socket.
    pub fn from_fd(fd: OwnedFd) -> Channel {
        Channel {
            fd,
            buf: vec![0; MAX_FRAME + 1],
        }
    }

    /// Wraps the worker's end of the connection, after checking it is a `SOCK_SEQPACKET`
    /// socket.
    ///
    /// # Errors
    /// [`IpcError::Os`] if `fd` is not a socket; [`IpcError::Malformed`] if it is a socket of
    /// another type.
    pub fn inherited(fd: OwnedFd) -> Result<Channel, IpcError> {
        seqpacket(fd.as_fd())?;
        Ok(Channel::from_fd(fd))
    }

    /// The worker's end of the connection, inherited at the descriptor number named by
    /// [`WORKER_ENV`]: `None` if this process was not started as a worker (the variable is
    /// unset or not a descriptor number). Claimed at most once per process (a second call
    /// is an error).
    ///
    /// The descriptor is taken over only if it is open and a `SOCK_SEQPACKET` socket. The
    /// contract that makes this sound: the variable comes from whoever started the process
    /// ([`spawn_worker`] puts the socket there), since changing a process's own environment
    /// needs `unsafe` (`std::env::set_var`); and it is read before anything else in the
    /// process could own that descriptor, which is why
    /// [`crate::worker::run_if_worker`] comes first in `main`.
    ///
    /// # Errors
    /// [`IpcError::Os`] / [`IpcError::Malformed`] if the descriptor is not a socket of the
    /// protocol's type; [`IpcError::Malformed`] on a second claim.
    pub fn from_worker_env() -> Option<Result<Channel, IpcError>> {
        let fd: RawFd = std::env::var(WORKER_ENV).ok()?.parse().ok()?;
        Some(Self::claim(fd))
    }

    fn claim(fd: RawFd) -> Result<Channel, IpcError> {
        if fd <= 2 {
            return Err(IpcError::Malformed(format!(
                "{WORKER_ENV}={fd} names a standard stream, not the worker's socket"
            )));
        }
        // Open at all? (`F_GETFD` reads the descriptor's flags and touches nothing.)
        // SAFETY: fcntl with F_GETFD only reads flags of a descriptor number; an unused number
        // is EBADF.
        if unsafe { nix::libc::fcntl(fd, nix::libc::F_GETFD) } < 0 {
            return Err(IpcError::Os {
                call: "fcntl",
                errno: nix::errno::Errno::last(),
            });
        }
        // SAFETY: the descriptor is open (checked above); the borrow only reads its socket
        // type and ends before anything else happens to it.
        seqpacket(unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) })?;
        // Close-on-exec from now on (it was cleared so the socket survived the worker's own
        // exec): a helper the driver or toolchain starts must not inherit the host's
        // connection, or the host would see no end of file when the worker dies.
        // SAFETY: F_SETFD on a descriptor that is open (checked above) only sets its flag.
        if unsafe { nix::libc::fcntl(fd, nix::libc::F_SETFD, nix::libc::FD_CLOEXEC) } < 0 {
            return Err(IpcError::Os {
                call: "fcntl(F_SETFD)",
                errno: nix::errno::Errno::last(),
            });
        }
        if WORKER_FD_CLAIMED.swap(true, Ordering::AcqRel) {
            return Err(IpcError::Malformed(format!(
                "the worker socket ({WORKER_ENV}={fd}) was claimed already"
            )));
        }
        // SAFETY: an open SOCK_SEQPACKET socket (checked above) which, by the contract of
        // `from_worker_env` (the environment names the socket the process's starter placed
        // there, read before anything else could own it), nothing else in the process owns;
        // claimed once per process (`WORKER_FD_CLAIMED`).
        Ok(Channel::from_fd(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Sets how long [`Channel::recv`] waits (`None`: forever); a receive that times out is
    /// an [`IpcError::Os`] with `EAGAIN`.
    ///
    /// # Errors
    /// [`IpcError::Os`].
    pub fn set_timeout(&self, timeout: Option<std::time::Duration>) -> Result<(), IpcError> {
        let tv = nix::sys::time::TimeVal::from(libc_timeval(timeout.unwrap_or_default()));
        nix::sys::socket::setsockopt(&self.fd, nix::sys::socket::sockopt::ReceiveTimeout, &tv).map_err(os("setsockopt"))
    }

    /// Sends a message with descriptors attached.
    ///
    /// # Errors
    /// [`IpcError::Unsendable`] if it cannot be encoded in a frame (nothing was sent);
    /// `Closed` if the peer is gone; `Os`.
    pub fn send<T: Serialize>(&self, msg: &T, fds: &[RawFd]) -> Result<(), IpcError> {
        let frame = encode(msg)?;
        self.send_frame(&frame, fds)
    }

    /// Sends raw bytes as one frame (tests send malformed frames with this). Transient
    /// errors (`EINTR`, `EAGAIN`, `ENOBUFS`: the peer's queue or the kernel's memory is
    /// short for a moment) are retried with a growing pause for up to [`SEND_RETRY_FOR`].
    ///
    /// # Errors
    /// [`IpcError::Unsendable`] for a frame above [`MAX_FRAME`] or more than [`MAX_FDS`]
    /// descriptors (nothing is sent); `Closed` if the peer is gone; [`IpcError::Os`].
    pub fn send_frame(&self, frame: &[u8], fds: &[RawFd]) -> Result<(), IpcError> {
        if frame.len() > MAX_FRAME {
            return Err(IpcError::Unsendable(format!(
                "a frame of {} bytes exceeds the protocol's {MAX_FRAME}",
                frame.len()
            )));
        }
        if fds.len() > MAX_FDS {
            return Err(IpcError::Unsendable(format!(
                "{} descriptors in one frame; at most {MAX_FDS}",
                fds.len()
            )));
        }
        let iov = [IoSlice::new(frame)];
        let cmsg = [ControlMessage::ScmRights(fds)];
        let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &cmsg };
        retry_transient(|| sendmsg::<()>(self.fd.as_raw_fd(), &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None))
    }

    /// Receives one message and the descriptors sent with it (blocking).
    ///
    /// # Errors
    /// `Closed` at end of file; `Malformed` / `Version` for a bad frame; `Os`.
    pub fn recv<T: for<'de> Deserialize<'de>>(&mut self) -> Result<(T, Vec<OwnedFd>), IpcError> {
        let (len, fds) = self.recv_frame()?;
        Ok((decode(&self.buf[..len])?, fds))
    }

    /// Like [`Channel::recv`], but polls for up to `spin` (yielding the CPU between polls)
    /// before it blocks.
    ///
    /// # Errors
    /// As [`Channel::recv`].
    pub fn recv_spinning<T: for<'de> Deserialize<'de>>(
        &mut self,
        spin: std::time::Duration,
    ) -> Result<(T, Vec<OwnedFd>), IpcError> {
        if !spin.is_zero() {
            let until = std::time::Instant::now() + spin;
            loop {
                if let Some((len, fds)) = self.recv_frame_with(MsgFlags::MSG_DONTWAIT)? {
                    return Ok((decode(&self.buf[..len])?, fds));
                }
                if std::time::Instant::now() >= until {
                    break;
                }
                std::thread::yield_now();
            }
        }
        self.recv()
    }

    fn recv_frame(&mut self) -> Result<(usize, Vec<OwnedFd>), IpcError> {
        let frame = self.recv_frame_with(MsgFlags::empty())?;
        // A blocking receive gives a frame or an error (its timeout is an `EAGAIN` error).
        frame.ok_or(IpcError::Os {
            call: "recvmsg",
            errno: nix::errno::Errno::EAGAIN,
        })
    }

    /// One frame; `None` when `flags` has `MSG_DONTWAIT` and nothing is there. The
    /// descriptors that arrived are owned (and so closed) whatever the frame turns out to
    /// be: when the control data was truncated (`MSG_CTRUNC`: more descriptors than
    /// [`MAX_FDS`]), the kernel installed those that fit and they are closed here, and the
    /// frame is malformed.
    fn recv_frame_with(&mut self, flags: MsgFlags) -> Result<Option<(usize, Vec<OwnedFd>)>, IpcError> {
        use nix::libc;
        // Room for MAX_FDS descriptors, aligned for `cmsghdr`.
        let mut control = [0u64; 16];
        // SAFETY: CMSG_SPACE only computes a size.
        let space = unsafe { libc::CMSG_SPACE((MAX_FDS * std::mem::size_of::<libc::c_int>()) as u32) } as usize;
        // The kernel writes up to `space` bytes into `control`: checked in release builds too.
        assert!(
            space <= std::mem::size_of_val(&control),
            "MAX_FDS outgrew the control buffer"
        );
        let fd = self.fd.as_raw_fd();
        let nonblocking = flags.contains(MsgFlags::MSG_DONTWAIT);
        let mut iov = libc::iovec {
            iov_base: self.buf.as_mut_ptr().cast(),
            iov_len: self.buf.len(),
        };
        // SAFETY: an all-zero msghdr is a valid empty header; its pointers are set below.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        let received = loop {
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = space as _;
            msg.msg_flags = 0;
            // SAFETY: `msg` points at `iov` (our receive buffer, `buf.len()` writable bytes)
            // and at `control` (`space` writable bytes, aligned for cmsghdr), all alive for
            // the call.
            let n = unsafe { libc::recvmsg(fd, &mut msg, (MsgFlags::MSG_CMSG_CLOEXEC | flags).bits()) };
            if n >= 0 {
                break n as usize;
            }
            match nix::errno::Errno::last() {
                nix::errno::Errno::EINTR => continue,
                nix::errno::Errno::EAGAIN if nonblocking => return Ok(None),
                nix::errno::Errno::ECONNRESET => return Err(IpcError::Closed),
                e => {
                    return Err(IpcError::Os {
                        call: "recvmsg",
                        errno: e,
                    });
                }
            }
        };
        let mut fds = Vec::new();
        let control_start = control.as_ptr() as usize;
        let control_end = control_start + (msg.msg_controllen as usize).min(space);
        // SAFETY: CMSG_FIRSTHDR/CMSG_NXTHDR walk the control data the kernel wrote into
        // `control`, staying within `msg_controllen` (which the kernel set to what it wrote).
        let mut c = unsafe { libc::CMSG_FIRSTHDR(&msg) };
        while !c.is_null() {
            // SAFETY: a non-null header from CMSG_FIRSTHDR/NXTHDR lies inside `control`.
            let (level, kind, len) = unsafe { ((*c).cmsg_level, (*c).cmsg_type, (*c).cmsg_len as usize) };
            if level == libc::SOL_SOCKET && kind == libc::SCM_RIGHTS {
                // SAFETY: as above; CMSG_DATA and CMSG_LEN only compute addresses and sizes.
                let (data, header) = unsafe { (libc::CMSG_DATA(c), libc::CMSG_LEN(0) as usize) };
                let room = control_end.saturating_sub(data as usize) / std::mem::size_of::<libc::c_int>();
                let count = (len.saturating_sub(header) / std::mem::size_of::<libc::c_int>()).min(room);
                for i in 0..count {
                    // SAFETY: `count` descriptors lie between `data` and the end of the
                    // control data the kernel wrote (bounded by `room`); unaligned reads.
                    let raw = unsafe { data.cast::<libc::c_int>().add(i).read_unaligned() };
                    // SAFETY: the kernel just installed this descriptor in this process for
                    // this message; nothing else owns it.
                    fds.push(unsafe { OwnedFd::from_raw_fd(raw) });
                }
            }
            // SAFETY: as for CMSG_FIRSTHDR.
            c = unsafe { libc::CMSG_NXTHDR(&msg, c) };
        }
        let truncated = msg.msg_flags & (libc::MSG_TRUNC | libc::MSG_CTRUNC) != 0;
        if received == 0 && fds.is_empty() && !truncated {
            return Err(IpcError::Closed);
        }
        if truncated {
            // `fds` is dropped here: every descriptor that arrived is closed.
            return Err(IpcError::Malformed(format!(
                "frame larger than {MAX_FRAME} bytes or with more than {MAX_FDS} descriptors ({} closed)",
                fds.len()
            )));
        }
        Ok(Some((received, fds)))
    }
}

/// Checks that `fd` is a `SOCK_SEQPACKET` socket.
fn seqpacket(fd: std::os::fd::BorrowedFd<'_>) -> Result<(), IpcError> {
    let kind = nix::sys::socket::getsockopt(&fd, nix::sys::socket::sockopt::SockType).map_err(os("getsockopt"))?;
    if kind != SockType::SeqPacket {
        return Err(IpcError::Malformed(format!(
            "the worker's descriptor is a {kind:?} socket, not SOCK_SEQPACKET"
        )));
    }
    Ok(())
}

/// Runs `send` until it succeeds, retrying the transient errors (`EINTR`, `EAGAIN`,
/// `ENOBUFS`) with a pause from 20 µs doubling to 5 ms, for up to [`SEND_RETRY_FOR`].
fn retry_transient(mut send: impl FnMut() -> nix::Result<usize>) -> Result<(), IpcError> {
    use nix::errno::Errno;
    let until = std::time::Instant::now() + SEND_RETRY_FOR;
    let mut pause = std::time::Duration::from_micros(20);
    loop {
        match send() {
            Ok(_) => return Ok(()),
            Err(Errno::EPIPE | Errno::ECONNRESET) => return Err(IpcError::Closed),
            Err(e @ (Errno::EINTR | Errno::EAGAIN | Errno::ENOBUFS)) => {
                if std::time::Instant::now() >= until {
                    return Err(IpcError::Os {
                        call: "sendmsg",
                        errno: e,
                    });
                }
                if e != Errno::EINTR {
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(std::time::Duration::from_millis(5));
                }
            }
            Err(e) => {
                return Err(IpcError::Os {
                    call: "sendmsg",
                    errno: e,
                });
            }
        }
    }
}

fn libc_timeval(d: std::time::Duration) -> nix::libc::timeval {
    nix::libc::timeval {
        tv_sec: d.as_secs() as nix::libc::time_t,
        tv_usec: d.subsec_micros() as nix::libc::suseconds_t,
    }
}

/// A shared-memory region: a memfd mapped read-write into this process, sealed against
/// shrinking and growing (`F_SEAL_SHRINK | F_SEAL_GROW`), so no process holding its
/// descriptor can truncate it under a mapping (a later access would be SIGBUS).
///
/// Or, made by [`OutputRegion::into_payload`], bytes a worker wrote: sealed against writes
/// too, mapped read-only, and without a descriptor (the mapping keeps the memory; a held
/// payload costs a mapping, no descriptor).
#[derive(Debug)]
pub struct Region {
    id: u64,
    /// `None` for a sealed, read-only region (see above).
    fd: Option<OwnedFd>,
    ptr: NonNull<u8>,
    len: usize,
}

static NEXT_REGION: AtomicU64 = AtomicU64::new(1);

// SAFETY: the mapping is plain shared memory owned by this value; access goes through
// `&self`/`&mut self` like a `Vec<u8>`, so moving or sharing the handle across threads is as
// safe as for a byte buffer (concurrent writers in another process are the protocol's
// business: a region is written by one side, then handed over with a message).
unsafe impl Send for Region {}
// SAFETY: as above; `&Region` only gives read access.
unsafe impl Sync for Region {}

/// The seals every region carries from its creation: its size is fixed.
fn size_seals() -> nix::fcntl::SealFlag {
    nix::fcntl::SealFlag::F_SEAL_SHRINK | nix::fcntl::SealFlag::F_SEAL_GROW
}

/// A new memfd of `len` bytes (at least one), sealed against shrinking and growing.
fn sealed_memfd(len: usize) -> Result<OwnedFd, IpcError> {
    use nix::sys::memfd::MFdFlags;
    let fd = nix::sys::memfd::memfd_create(c"hipvisor", MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING)
        .map_err(os("memfd_create"))?;
    let size = i64::try_from(len.max(1)).map_err(|_| IpcError::Os {
        call: "ftruncate",
        errno: nix::errno::Errno::EFBIG,
    })?;
    nix::unistd::ftruncate(&fd, size).map_err(os("ftruncate"))?;
    nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_ADD_SEALS(size_seals())).map_err(os("fcntl(F_ADD_SEALS)"))?;
    Ok(fd)
}

/// Checks a descriptor received from the peer before anything maps it: a memfd sealed
/// against shrinking and growing, of exactly `len` bytes (at least one).
fn check_received(fd: &OwnedFd, len: usize) -> Result<(), IpcError> {
    let seals = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GET_SEALS)
        .map_err(|e| IpcError::Malformed(format!("a received descriptor without seals (F_GET_SEALS: {e})")))?;
    let seals = nix::fcntl::SealFlag::from_bits_truncate(seals);
    if !seals.contains(size_seals()) {
        return Err(IpcError::Malformed(format!(
            "a received region is not sealed against shrinking and growing ({seals:?})"
        )));
    }
    let size = nix::sys::stat::fstat(fd).map_err(os("fstat"))?.st_size;
    if u64::try_from(size).ok() != Some(len.max(1) as u64) {
        return Err(IpcError::Malformed(format!(
            "a received region of {size} bytes, {len} announced"
        )));
    }
    Ok(())
}

impl Region {
    /// A new zero-filled region of `len` bytes (at least one page is mapped), sealed
    /// against shrinking and growing.
    ///
    /// # Errors
    /// [`IpcError::Os`].
    pub fn new(len: usize) -> Result<Region, IpcError> {
        Region::map(sealed_memfd(len)?, len)
    }

    /// Maps a region received from the peer, once the descriptor is checked: a memfd
    /// sealed against shrinking and growing (so the peer cannot truncate it under the
    /// mapping), of exactly `len` bytes.
    ///
    /// # Errors
    /// [`IpcError::Malformed`] if the descriptor is not such a memfd; [`IpcError::Os`].
    pub fn map(fd: OwnedFd, len: usize) -> Result<Region, IpcError> {
        check_received(&fd, len)?;
        let mut r = Region::mapped(
            &fd,
            len,
            ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
            MapFlags::MAP_SHARED,
        )?;
        r.fd = Some(fd);
        Ok(r)
    }

    /// Maps a region received from the peer as [`Region::map`] does, but read-only (and
    /// without its descriptor, closed once mapped): for what this side only reads (a
    /// worker's inputs, module images), so a bug here cannot write into the peer's memory.
    /// [`Region::as_mut_slice`] panics on it.
    ///
    /// # Errors
    /// As [`Region::map`].
    pub fn map_read_only(fd: OwnedFd, len: usize) -> Result<Region, IpcError> {
        check_received(&fd, len)?;
        Region::mapped(&fd, len, ProtFlags::PROT_READ, MapFlags::MAP_SHARED)
    }

    /// Maps `len` bytes of a memfd sealed against writes, shrinking and growing, read-only;
    /// the descriptor is closed (the mapping keeps the memory). Private: a shared mapping of
    /// a write-sealed memfd, even read-only, is refused before Linux 6.7; a private one
    /// shares the same page-cache pages (nothing writes them, so nothing is copied) on every
    /// kernel.
    fn sealed(fd: &OwnedFd, len: usize) -> Result<Region, IpcError> {
        Region::mapped(fd, len, ProtFlags::PROT_READ, MapFlags::MAP_PRIVATE)
    }

    /// The one mapping of a region: `len` bytes (at least one) of `fd`, a memfd exactly that
    /// long (made here, or checked by [`check_received`]) and sealed against shrinking; no
    /// descriptor kept (the callers that send the region on keep theirs).
    fn mapped(fd: &OwnedFd, len: usize, prot: ProtFlags, flags: MapFlags) -> Result<Region, IpcError> {
        let length = NonZeroUsize::new(len.max(1)).expect("at least one byte");
        // SAFETY: maps `length` bytes of a memfd we hold; the file is exactly that long and
        // sealed against shrinking, so every mapped page stays backed (a mapping outlives its
        // descriptor); the mapping is unmapped once, in `drop`.
        let ptr = unsafe { mmap(None, length, prot, flags, fd.as_fd(), 0) }.map_err(os("mmap"))?;
        Ok(Region {
            id: NEXT_REGION.fetch_add(1, Ordering::Relaxed),
            fd: None,
            ptr: ptr.cast(),
            len,
        })
    }

    /// The region's id, unique in this process.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The region's length.
    pub fn len(&self) -> usize {
        self.len
    }

    /// `true` for an empty region.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether the region has a descriptor (to send to a peer) and is writable: every
    /// region but the sealed, read-only ones made by [`OutputRegion::into_payload`].
    pub fn has_descriptor(&self) -> bool {
        self.fd.is_some()
    }

    /// The descriptor, to send to the peer.
    ///
    /// # Panics
    /// For a sealed, read-only region, which has none ([`Region::has_descriptor`]).
    pub fn raw_fd(&self) -> RawFd {
        self.fd
            .as_ref()
            .expect("a sealed region received from a worker has no descriptor")
            .as_raw_fd()
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` maps at least `len` bytes for the life of `self`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The bytes, writable.
    ///
    /// # Panics
    /// For a sealed, read-only region ([`Region::has_descriptor`] is `false`).
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        assert!(self.fd.is_some(), "a sealed region received from a worker is read-only");
        // SAFETY: as above; the mapping is writable (regions with a descriptor are mapped
        // read-write), and `&mut self` makes this the only reference in this process.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: unmaps the mapping made in `map`, once; no slice outlives `self`.
        let _ = unsafe { munmap(self.ptr.cast(), self.len.max(1)) };
    }
}

/// The host's region for a large copy from the device: a memfd sealed against shrinking
/// and growing, which the host does not map while the worker writes it. The worker maps it,
/// writes, and unmaps it before it answers; then [`OutputRegion::into_payload`] seals it
/// against writes and maps it read-only, so the bytes the application gets can no longer be
/// changed by the worker (or by anyone).
#[derive(Debug)]
pub struct OutputRegion {
    id: u64,
    fd: OwnedFd,
    len: usize,
}

impl OutputRegion {
    /// A new output region of `len` bytes.
    ///
    /// # Errors
    /// [`IpcError::Os`].
    pub fn new(len: usize) -> Result<OutputRegion, IpcError> {
        Ok(OutputRegion {
            id: NEXT_REGION.fetch_add(1, Ordering::Relaxed),
            fd: sealed_memfd(len)?,
            len,
        })
    }

    /// The region's id, unique in this process.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The region's length.
    pub fn len(&self) -> usize {
        self.len
    }

    /// `true` for an empty region.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The descriptor, to send to the worker.
    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// The bytes the worker wrote (`written`, which must be the region's whole length), as
    /// a payload the worker cannot change any more: the memfd is sealed against writes
    /// (`F_SEAL_WRITE`; the kernel refuses it while any process still has a writable shared
    /// mapping, which is why the worker unmaps first) and mapped read-only, and its
    /// descriptor is closed: a [`Region`] without one (a held payload costs a mapping, no
    /// descriptor). A region that cannot be sealed (a worker kept a mapping) or mapped (the
    /// process's mapping limit, `vm.max_map_count`) is copied once to the heap instead.
    ///
    /// # Errors
    /// [`IpcError::Malformed`] if `written` is not the region's length; [`IpcError::Os`] if
    /// the copy cannot be read.
    pub fn into_payload(self, written: u64) -> Result<crate::op::Payload, IpcError> {
        if written != self.len as u64 {
            return Err(IpcError::Malformed(format!(
                "{written} bytes written to an output region of {}",
                self.len
            )));
        }
        let sealed = nix::fcntl::fcntl(
            &self.fd,
            nix::fcntl::FcntlArg::F_ADD_SEALS(nix::fcntl::SealFlag::F_SEAL_WRITE),
        );
        if sealed.is_ok()
            && let Ok(mapping) = Region::sealed(&self.fd, self.len)
        {
            // `self.fd` is closed on return: the mapping keeps the memory.
            return Ok(crate::op::Payload::shared(std::sync::Arc::new(mapping)));
        }
        let mut copy = vec![0u8; self.len];
        let mut at = 0;
        while at < copy.len() {
            match nix::sys::uio::pread(&self.fd, &mut copy[at..], at as i64) {
                Ok(0) => return Err(IpcError::Malformed("an output region shorter than its seal".into())),
                Ok(n) => at += n,
                Err(nix::errno::Errno::EINTR) => {}
                Err(e) => {
                    return Err(IpcError::Os {
                        call: "pread",
                        errno: e,
                    });
                }
            }
        }
        Ok(crate::op::Payload::new(copy))
    }
}

/// The control page: the worker publishes the id of the request it has started, so after a
/// crash the host knows whether the op in flight may have executed.
#[derive(Debug)]
pub struct ControlPage {
    region: Region,
}

impl ControlPage {
    /// A new page (host side).
    ///
    /// # Errors
    /// [`IpcError::Os`].
    pub fn new() -> Result<ControlPage, IpcError> {
        Ok(ControlPage {
            region: Region::new(64)?,
        })
    }

    /// The page received from the host (worker side).
    ///
    /// # Errors
    /// As [`Region::map`].
    pub fn map(fd: OwnedFd) -> Result<ControlPage, IpcError> {
        Ok(ControlPage {
            region: Region::map(fd, 64)?,
        })
    }

    fn started_cell(&self) -> &AtomicU64 {
        // SAFETY: the region is at least 64 bytes, page-aligned (so 8-byte aligned), lives as
        // long as `self`, and is only ever accessed through this atomic by both processes.
        unsafe { &*self.region.ptr.as_ptr().cast::<AtomicU64>() }
    }

    /// Records that request `id` has started.
    pub fn set_started(&self, id: u64) {
        self.started_cell().store(id, Ordering::Release);
    }

    /// The last request the worker started.
    pub fn started(&self) -> u64 {
        self.started_cell().load(Ordering::Acquire)
    }

    /// The descriptor, to send to the worker.
    pub fn raw_fd(&self) -> RawFd {
        self.region.raw_fd()
    }
}

/// Sends SIGKILL to a worker process (a hung op, shutdown). Errors (already gone) are
/// ignored.
pub fn kill(pid: u32) {
    if let Ok(pid) = i32::try_from(pid)
        && pid > 0
    {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
    }
}

/// A worker's wait status in words: `worker killed by signal 6 (SIGABRT)`, `worker exited
/// with status 3`.
pub fn describe_exit(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    if let Some(signal) = status.signal() {
        let name = nix::sys::signal::Signal::try_from(signal).map_or("unknown signal", |s| s.as_str());
        let core = if status.core_dumped() { ", core dumped" } else { "" };
        format!("worker killed by signal {signal} ({name}{core})")
    } else if let Some(code) = status.code() {
        format!("worker exited with status {code}")
    } else {
        format!("worker ended ({status})")
    }
}

/// Whether a worker ended by SIGABRT: how ROCm ends a process whose kernel made a memory
/// access fault (and how the simulator's `hip` flavour does).
pub fn aborted(status: std::process::ExitStatus) -> bool {
    use std::os::unix::process::ExitStatusExt;
    status.signal() == Some(nix::libc::SIGABRT)
}

/// Starts a worker process running `command` with `channel` as its descriptor
/// [`WORKER_FD`]. The worker dies with the thread that spawned it (`PR_SET_PDEATHSIG`), so
/// call this from a long-lived thread.
///
/// # Errors
/// The OS error of the spawn.
pub fn spawn_worker(mut command: Command, channel: Channel) -> std::io::Result<Child> {
    let fd = channel.fd.as_raw_fd();
    command.env(WORKER_ENV, WORKER_FD.to_string());
    // SAFETY: the closure runs in the child between fork and exec and only makes
    // async-signal-safe calls (dup2, fcntl, prctl, sigemptyset, sigaddset, pthread_sigmask)
    // on descriptors and a signal set it owns; `fd` stays open in the parent until the spawn
    // returns (the channel is dropped afterwards).
    unsafe {
        command.pre_exec(move || {
            if nix::libc::dup2(fd, WORKER_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // dup2 onto a new number leaves the copy without close-on-exec; onto the same
            // number (the socket already is WORKER_FD) it does nothing, and the socket would
            // close at the exec. Clear the flag either way.
            if nix::libc::fcntl(WORKER_FD, nix::libc::F_SETFD, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if nix::libc::prctl(nix::libc::PR_SET_PDEATHSIG, nix::libc::SIGKILL) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // SIGINT and SIGTERM blocked from before the exec (the mask survives it), so a
            // terminal's Ctrl-C to the process group, or `kill -TERM -<pgid>` and systemd's
            // `KillMode=control-group` stop, cannot kill a worker before its first line
            // blocks them too (src/worker.rs): the host decides how to stop.
            let mut set = std::mem::zeroed::<nix::libc::sigset_t>();
            nix::libc::sigemptyset(&mut set);
            nix::libc::sigaddset(&mut set, nix::libc::SIGINT);
            nix::libc::sigaddset(&mut set, nix::libc::SIGTERM);
            // pthread_sigmask returns the error number; it does not set errno.
            let rc = nix::libc::pthread_sigmask(nix::libc::SIG_BLOCK, &set, std::ptr::null_mut());
            if rc != 0 {
                return Err(std::io::Error::from_raw_os_error(rc));
            }
            Ok(())
        });
    }
    let child = command.spawn();
    drop(channel);
    child
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::op::Payload;
    use proptest::prelude::*;

    #[test]
    fn a_worker_starts_with_sigint_and_sigterm_blocked() {
        let (ours, theirs) = Channel::pair().unwrap();
        let mut cmd = Command::new("grep");
        cmd.args(["^SigBlk", "/proc/self/status"])
            .stdout(std::process::Stdio::piped());
        let out = spawn_worker(cmd, theirs).unwrap().wait_with_output().unwrap();
        drop(ours);
        let text = String::from_utf8_lossy(&out.stdout);
        let mask = u64::from_str_radix(text.trim().trim_start_matches("SigBlk:").trim(), 16).unwrap();
        for (signal, name) in [(nix::libc::SIGINT, "SIGINT"), (nix::libc::SIGTERM, "SIGTERM")] {
            assert_ne!(mask & (1 << (signal - 1)), 0, "{name} blocked from the exec on: {text}");
        }
    }

    /// In a child process (this test binary re-executed): with descriptor 3 free, the worker
    /// end of a new pair lands on 3, the number the worker must find it at, and
    /// `spawn_worker`'s dup2 to the same number does nothing; close-on-exec must be cleared
    /// explicitly or the worker starts without its socket.
    #[test]
    fn a_worker_socket_already_at_descriptor_3_survives_the_exec() {
        const CHILD: &str = "HV_IPC_FD3_CHILD";
        if std::env::var_os(CHILD).is_some() {
            let _ = nix::unistd::close(3);
            let (worker_end, _host_end) = Channel::pair().unwrap();
            assert_eq!(worker_end.fd.as_raw_fd(), 3, "the lowest free descriptor");
            let mut cmd = Command::new("readlink");
            cmd.arg("/proc/self/fd/3").stdout(std::process::Stdio::piped());
            let out = spawn_worker(cmd, worker_end).unwrap().wait_with_output().unwrap();
            let link = String::from_utf8_lossy(&out.stdout);
            assert!(link.starts_with("socket:"), "the worker has its socket at 3: {link:?}");
            return;
        }
        let status = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "ipc::tests::a_worker_socket_already_at_descriptor_3_survives_the_exec",
                "--test-threads=1",
                "--nocapture",
            ])
            .env(CHILD, "1")
            .status()
            .unwrap();
        assert!(status.success(), "the child's check failed: {status}");
    }

    /// In a child process (this test binary re-executed with `HV_WORKER_FD=3`): a worker's
    /// socket arrives without close-on-exec (so it survived the exec); once claimed, it has
    /// it again, so nothing the worker starts inherits the host's connection.
    #[test]
    fn a_claimed_worker_socket_is_close_on_exec() {
        const CHILD: &str = "HV_IPC_CLAIM_CHILD";
        if std::env::var_os(CHILD).is_some() {
            use nix::fcntl::{FcntlArg, FdFlag, fcntl};
            let _ = nix::unistd::close(3);
            let (worker_end, _host_end) = Channel::pair().unwrap();
            let fd = worker_end.fd.as_raw_fd();
            assert_eq!(fd, 3, "the lowest free descriptor");
            fcntl(&worker_end.fd, FcntlArg::F_SETFD(FdFlag::empty())).unwrap();
            // The claim takes ownership of descriptor 3, as a worker's does.
            std::mem::forget(worker_end);
            let claimed = Channel::from_worker_env().expect("HV_WORKER_FD is set").unwrap();
            let flags = FdFlag::from_bits_truncate(fcntl(&claimed.fd, FcntlArg::F_GETFD).unwrap());
            assert!(flags.contains(FdFlag::FD_CLOEXEC), "{flags:?}");
            return;
        }
        let status = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "ipc::tests::a_claimed_worker_socket_is_close_on_exec",
                "--test-threads=1",
                "--nocapture",
            ])
            .env(CHILD, "1")
            .env(WORKER_ENV, "3")
            .status()
            .unwrap();
        assert!(status.success(), "the child's check failed: {status}");
    }

    #[test]
    fn exit_statuses_are_described_and_only_sigabrt_is_an_abort() {
        use std::os::unix::process::ExitStatusExt;
        use std::process::ExitStatus;
        // Raw wait statuses: a signal number in the low bits (0x80: core dumped), an exit
        // code in the second byte.
        let abrt = ExitStatus::from_raw(6);
        assert_eq!(describe_exit(abrt), "worker killed by signal 6 (SIGABRT)");
        assert!(aborted(abrt));
        let dumped = ExitStatus::from_raw(6 | 0x80);
        assert_eq!(
            describe_exit(dumped),
            "worker killed by signal 6 (SIGABRT, core dumped)"
        );
        assert!(aborted(dumped));
        let kill = ExitStatus::from_raw(9);
        assert_eq!(describe_exit(kill), "worker killed by signal 9 (SIGKILL)");
        assert!(!aborted(kill));
        let exit3 = ExitStatus::from_raw(3 << 8);
        assert_eq!(describe_exit(exit3), "worker exited with status 3");
        assert!(!aborted(exit3));
        assert!(!aborted(ExitStatus::from_raw(0)));
    }

    #[test]
    fn messages_round_trip() {
        let m = ToWorker::Request(Request {
            id: 9,
            op: Op::MemInfo,
            origin: Origin::Runtime,
            fault: Some(WireFault::Code(700)),
            input: None,
            output: Some(RegionRef {
                id: 3,
                len: 4096,
                cached: false,
            }),
            linger_us: 50,
        });
        assert_eq!(decode::<ToWorker>(&encode(&m).unwrap()).unwrap(), m);
    }

    #[test]
    fn a_full_batch_fits_in_a_frame() {
        // The worst batch the host builds: MAX_BATCH launches with arguments, plus inline
        // payloads up to BATCH_INLINE_BYTES; and its answer with an error per op.
        let launch = |id| Request {
            id,
            op: Op::Launch {
                module: ModuleHandle { device: 0, id: 1 },
                function: "vector_add_f32".into(),
                grid: crate::op::Dim3::x(1024),
                block: crate::op::Dim3::x(256),
                shared_mem_bytes: 0,
                args: vec![crate::op::KernelArg::U64(u64::MAX); 8],
            },
            origin: Origin::Application,
            fault: Some(WireFault::Code(700)),
            input: None,
            output: None,
            linger_us: 0,
        };
        let mut batch: Vec<Request> = (0..MAX_BATCH as u64).map(launch).collect();
        batch[0].op = Op::CopyToDevice {
            dst: crate::op::BufferHandle {
                device: 0,
                epoch: 0,
                id: 1,
                len: 1 << 20,
            },
            offset: 0,
            data: vec![7u8; BATCH_INLINE_BYTES].into(),
        };
        let frame = encode(&ToWorker::Batch(batch)).expect("a full batch fits");
        assert!(frame.len() <= MAX_FRAME);
        let error = GpuError::api_with(
            crate::error::Api::Hip,
            700,
            crate::op::OpKind::Launch,
            0,
            "x".repeat(256),
        );
        let mut answers: Vec<_> = (0..MAX_BATCH as u64).map(|id| (id, Err(error.clone()))).collect();
        answers[0].1 = Ok(Reply::Data(vec![1u8; BATCH_INLINE_BYTES].into()));
        encode(&FromWorker::Batch {
            results: answers,
            done: true,
        })
        .expect("a full batch's answer fits");
    }

    #[test]
    fn malformed_frames_are_typed_errors() {
        let good = encode(&ToWorker::Shutdown).unwrap();
        assert!(matches!(decode::<ToWorker>(b""), Err(IpcError::Malformed(_))));
        assert!(matches!(
            decode::<ToWorker>(b"XX\x01\x00\x03"),
            Err(IpcError::Malformed(_))
        ));
        let mut next = good.clone();
        next[2..4].copy_from_slice(&(PROTOCOL_VERSION + 1).to_le_bytes());
        assert!(matches!(
            decode::<ToWorker>(&next),
            Err(IpcError::Version { got }) if got == PROTOCOL_VERSION + 1
        ));
        let mut trailing = good.clone();
        trailing.push(0);
        assert!(matches!(decode::<ToWorker>(&trailing), Err(IpcError::Malformed(_))));
        assert!(matches!(decode::<ToWorker>(&good[..4]), Err(IpcError::Malformed(_))));
    }

    #[test]
    fn frames_and_descriptors_cross_a_socket_pair() {
        let (a, mut b) = Channel::pair().unwrap();
        let mut region = Region::new(10_000).unwrap();
        region.as_mut_slice()[9_999] = 42;
        a.send(&ToWorker::Shutdown, &[region.raw_fd()]).unwrap();
        let (msg, fds): (ToWorker, _) = b.recv().unwrap();
        assert_eq!(msg, ToWorker::Shutdown);
        let mapped = Region::map(fds.into_iter().next().unwrap(), 10_000).unwrap();
        assert_eq!(mapped.as_slice()[9_999], 42, "both processes' mappings share the bytes");
        a.send_frame(b"garbage", &[]).unwrap();
        assert!(matches!(b.recv::<ToWorker>(), Err(IpcError::Malformed(_))));
        drop(a);
        assert!(matches!(b.recv::<ToWorker>(), Err(IpcError::Closed)));
    }

    #[test]
    fn the_control_page_is_shared() {
        let host = ControlPage::new().unwrap();
        let fd = nix::unistd::dup(host.region.fd.as_ref().unwrap()).unwrap();
        let worker = ControlPage::map(fd).unwrap();
        worker.set_started(17);
        assert_eq!(host.started(), 17);
    }

    #[test]
    fn the_region_cache_evicts_the_least_recently_used() {
        let mut lru = RegionLru::default();
        for id in 1..=REGION_CACHE as u64 {
            assert_eq!(lru.touch(id), (false, None));
        }
        assert_eq!(lru.touch(1), (true, None));
        assert_eq!(lru.touch(100), (false, Some(2)), "2 is now the least recently used");
        assert_eq!(lru.touch(2), (false, Some(3)));
    }

    /// The descriptors of this process that are the memfd named `name`.
    fn open_memfds_named(name: &str) -> usize {
        let target = format!("/memfd:{name} (deleted)");
        std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .filter(|link| link.to_str() == Some(target.as_str()))
            .count()
    }

    #[test]
    fn descriptors_of_a_frame_with_truncated_control_data_are_closed() {
        // A peer that sends more descriptors than a frame may carry: the kernel installs
        // those that fit (MSG_CTRUNC); they must be closed and the frame refused.
        let name = format!("hipvisor-ctrunc-{}", std::process::id());
        let cname = std::ffi::CString::new(name.clone()).unwrap();
        let memfd = nix::sys::memfd::memfd_create(cname.as_c_str(), nix::sys::memfd::MFdFlags::MFD_CLOEXEC).unwrap();
        assert_eq!(open_memfds_named(&name), 1);
        let (a, mut b) = Channel::pair().unwrap();
        let raw = [memfd.as_raw_fd(); MAX_FDS + 3];
        let frame = encode(&ToWorker::Shutdown).unwrap();
        let iov = [IoSlice::new(&frame)];
        sendmsg::<()>(
            a.fd.as_raw_fd(),
            &iov,
            &[ControlMessage::ScmRights(&raw)],
            MsgFlags::empty(),
            None,
        )
        .unwrap();
        match b.recv::<ToWorker>() {
            Err(IpcError::Malformed(why)) => assert!(why.contains("descriptors"), "{why}"),
            other => panic!("a frame with truncated control data: {other:?}"),
        }
        assert_eq!(
            open_memfds_named(&name),
            1,
            "every descriptor that arrived with the refused frame is closed"
        );
        // The connection goes on.
        a.send(&ToWorker::Shutdown, &[]).unwrap();
        assert_eq!(b.recv::<ToWorker>().unwrap().0, ToWorker::Shutdown);
    }

    #[test]
    fn a_transient_send_error_is_retried_not_taken_for_a_dead_peer() {
        let (a, mut b) = Channel::pair().unwrap();
        // Fill the peer's queue.
        let frame = encode(&ToWorker::Shutdown).unwrap();
        let mut queued = 0usize;
        loop {
            let iov = [IoSlice::new(&frame)];
            match sendmsg::<()>(a.fd.as_raw_fd(), &iov, &[], MsgFlags::MSG_DONTWAIT, None) {
                Ok(_) => queued += 1,
                Err(nix::errno::Errno::EAGAIN) => break,
                Err(e) => panic!("{e}"),
            }
        }
        // Each blocking send now gives up after 1 ms with EAGAIN, until the reader drains
        // the queue.
        let tv = nix::sys::time::TimeVal::from(libc_timeval(std::time::Duration::from_millis(1)));
        nix::sys::socket::setsockopt(&a.fd, nix::sys::socket::sockopt::SendTimeout, &tv).unwrap();
        let reader = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(30));
            for _ in 0..=queued {
                assert_eq!(b.recv::<ToWorker>().unwrap().0, ToWorker::Shutdown);
            }
        });
        a.send(&ToWorker::Shutdown, &[])
            .expect("EAGAIN is retried until the reader makes room");
        reader.join().unwrap();
    }

    #[test]
    fn a_message_larger_than_a_frame_is_unsendable_and_nothing_is_sent() {
        let (a, mut b) = Channel::pair().unwrap();
        let huge = FromWorker::Malformed("x".repeat(MAX_FRAME));
        assert!(matches!(a.send(&huge, &[]), Err(IpcError::Unsendable(_))));
        assert!(matches!(
            a.send_frame(&[0; 8], &[0; MAX_FDS + 1]),
            Err(IpcError::Unsendable(_))
        ));
        a.send(&ToWorker::Shutdown, &[]).unwrap();
        assert_eq!(
            b.recv::<ToWorker>().unwrap().0,
            ToWorker::Shutdown,
            "the first frame the peer sees"
        );
    }

    #[test]
    fn a_region_mapped_read_only_is_not_writable_here() {
        let mut r = Region::new(4096).unwrap();
        r.as_mut_slice().fill(3);
        let ro = Region::map_read_only(nix::unistd::dup(r.fd.as_ref().unwrap()).unwrap(), 4096).unwrap();
        assert!(ro.as_slice().iter().all(|b| *b == 3));
        assert!(!ro.has_descriptor());
        let addr = ro.as_slice().as_ptr() as usize;
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        let perms = maps
            .lines()
            .find_map(|line| {
                let mut it = line.split_whitespace();
                let (start, end) = it.next()?.split_once('-')?;
                let (start, end) = (
                    usize::from_str_radix(start, 16).ok()?,
                    usize::from_str_radix(end, 16).ok()?,
                );
                (start <= addr && addr < end).then(|| it.next().unwrap().to_string())
            })
            .expect("mapped");
        assert!(perms.starts_with("r-"), "{perms}");
    }

    #[test]
    fn regions_are_sealed_against_shrinking_and_growing() {
        let region = Region::new(10_000).unwrap();
        let seals = nix::fcntl::fcntl(region.fd.as_ref().unwrap(), nix::fcntl::FcntlArg::F_GET_SEALS).unwrap();
        assert!(nix::fcntl::SealFlag::from_bits_truncate(seals).contains(size_seals()));
        assert_eq!(
            nix::unistd::ftruncate(region.fd.as_ref().unwrap(), 0),
            Err(nix::errno::Errno::EPERM),
            "a peer cannot truncate a region under our mapping"
        );
        let out = OutputRegion::new(10_000).unwrap();
        assert_eq!(nix::unistd::ftruncate(&out.fd, 1), Err(nix::errno::Errno::EPERM));
        let control = ControlPage::new().unwrap();
        assert_eq!(
            nix::unistd::ftruncate(control.region.fd.as_ref().unwrap(), 0),
            Err(nix::errno::Errno::EPERM)
        );
    }

    #[test]
    fn a_received_descriptor_is_mapped_only_if_sealed_and_of_the_announced_size() {
        let plain = nix::sys::memfd::memfd_create(c"plain", nix::sys::memfd::MFdFlags::MFD_CLOEXEC).unwrap();
        nix::unistd::ftruncate(&plain, 4096).unwrap();
        assert!(
            matches!(Region::map(plain, 4096), Err(IpcError::Malformed(_))),
            "not sealed"
        );
        let sealed = Region::new(4096).unwrap();
        let dup = |r: &Region| nix::unistd::dup(r.fd.as_ref().unwrap()).unwrap();
        assert!(
            matches!(Region::map(dup(&sealed), 8192), Err(IpcError::Malformed(_))),
            "too small"
        );
        assert!(
            matches!(Region::map(dup(&sealed), 100), Err(IpcError::Malformed(_))),
            "not the size announced"
        );
        Region::map(dup(&sealed), 4096).expect("sealed, of the size announced");
        let (pipe, _w) = nix::unistd::pipe().unwrap();
        assert!(
            matches!(Region::map(pipe, 1), Err(IpcError::Malformed(_))),
            "not a memfd"
        );
    }

    #[test]
    fn output_bytes_reach_the_application_sealed_or_copied() {
        // The worker's side: map, write, unmap; it keeps its descriptor.
        let out = OutputRegion::new(40_000).unwrap();
        let worker_fd = nix::unistd::dup(&out.fd).unwrap();
        {
            let fd = nix::unistd::dup(&out.fd).unwrap();
            let mut worker = Region::map(fd, 40_000).unwrap();
            worker.as_mut_slice().fill(9);
        }
        let payload = out.into_payload(40_000).unwrap();
        let region = payload.region().expect("no copy: the shared memory itself");
        assert!(!region.has_descriptor(), "no descriptor kept for it");
        assert!(payload.as_bytes().iter().all(|b| *b == 9));
        // What the worker can still do with its descriptor: nothing that changes the bytes.
        assert_eq!(
            nix::sys::uio::pwrite(&worker_fd, &[1], 0),
            Err(nix::errno::Errno::EPERM)
        );
        let writable = Region::map(nix::unistd::dup(&worker_fd).unwrap(), 40_000);
        assert!(
            matches!(writable, Err(IpcError::Os { call: "mmap", .. })),
            "{writable:?}"
        );
        assert_eq!(nix::unistd::ftruncate(&worker_fd, 0), Err(nix::errno::Errno::EPERM));
        let read_only = std::panic::catch_unwind(|| {
            let mut copy = Region::sealed(&worker_fd, 40_000).unwrap();
            copy.as_mut_slice()[0] = 1;
        });
        assert!(read_only.is_err(), "a sealed region is never handed out writable");

        // A worker that keeps a writable mapping: the seal is refused, the bytes are copied,
        // and what the worker writes afterwards does not reach the application.
        let out = OutputRegion::new(40_000).unwrap();
        let fd = nix::unistd::dup(out.fd.as_fd()).unwrap();
        let mut worker = Region::map(fd, 40_000).unwrap();
        worker.as_mut_slice().fill(3);
        let payload = out.into_payload(40_000).unwrap();
        assert!(payload.region().is_none(), "copied: {payload:?}");
        worker.as_mut_slice().fill(4);
        assert!(payload.as_bytes().iter().all(|b| *b == 3));

        let out = OutputRegion::new(40_000).unwrap();
        assert!(matches!(out.into_payload(40_001), Err(IpcError::Malformed(_))));
    }

    #[test]
    fn the_region_cache_forgets_on_both_sides() {
        let mut lru = RegionLru::default();
        lru.touch(1);
        lru.touch(2);
        assert!(lru.forget(1));
        assert!(!lru.forget(1));
        assert_eq!(lru.touch(1), (false, None), "sent again");
        assert_eq!(lru.touch(2), (true, None));
    }

    #[test]
    fn only_a_seqpacket_socket_becomes_a_channel() {
        let (s, _t) = socketpair(AddressFamily::Unix, SockType::Stream, None, SockFlag::SOCK_CLOEXEC).unwrap();
        assert!(matches!(Channel::inherited(s), Err(IpcError::Malformed(_))));
        let (pipe, _w) = nix::unistd::pipe().unwrap();
        assert!(matches!(Channel::inherited(pipe), Err(IpcError::Os { .. })));
        let (_a, b) = Channel::pair().unwrap();
        Channel::inherited(b.fd).unwrap();
    }

    fn buffer(epoch: u64, len: u64) -> crate::op::BufferHandle {
        crate::op::BufferHandle {
            device: 1,
            epoch,
            id: 5,
            len,
        }
    }

    #[test]
    fn answers_that_do_not_match_their_request_are_malformed() {
        let ok = |op: &Op, out: Option<usize>, r: Result<Reply, GpuError>, n: Option<u64>| {
            check_answer(op, 1, 2, out, &r, n).is_ok()
        };
        let read = Op::CopyFromDevice {
            src: buffer(2, 1 << 20),
            offset: 0,
            len: 100,
        };
        assert!(ok(&read, None, Ok(Reply::Data(vec![0; 100].into())), None));
        assert!(
            !ok(&read, None, Ok(Reply::Data(vec![0; 101].into())), None),
            "longer than asked"
        );
        assert!(!ok(&read, None, Ok(Reply::Data(vec![0; 99].into())), None), "shorter");
        assert!(!ok(&read, None, Ok(Reply::Done), None), "another kind");
        assert!(
            !ok(&read, None, Ok(Reply::Data(vec![0; 100].into())), Some(100)),
            "no output region"
        );
        let big = Op::CopyFromDevice {
            src: buffer(2, 1 << 20),
            offset: 0,
            len: 100_000,
        };
        assert!(ok(
            &big,
            Some(100_000),
            Ok(Reply::Data(Payload::default())),
            Some(100_000)
        ));
        assert!(!ok(
            &big,
            Some(100_000),
            Ok(Reply::Data(Payload::default())),
            Some(100_001)
        ));
        assert!(!ok(
            &big,
            Some(100_000),
            Ok(Reply::Data(Payload::default())),
            Some(u64::MAX)
        ));
        assert!(!ok(&big, Some(100_000), Ok(Reply::Data(Payload::default())), None));
        let alloc = Op::Alloc { bytes: 64 };
        assert!(ok(&alloc, None, Ok(Reply::Buffer(buffer(2, 64))), None));
        assert!(
            !ok(&alloc, None, Ok(Reply::Buffer(buffer(1, 64))), None),
            "an old epoch"
        );
        assert!(
            !ok(&alloc, None, Ok(Reply::Buffer(buffer(2, 65))), None),
            "another length"
        );
        let mem = Op::MemInfo;
        let info = |free, total| Ok(Reply::MemInfo(crate::op::MemInfo { free, total }));
        assert!(ok(&mem, None, info(1, 2), None));
        assert!(!ok(&mem, None, info(3, 2), None));
        let error = GpuError::api_with(crate::error::Api::Sim, 700, crate::op::OpKind::Synchronize, 1, "x");
        assert!(ok(&Op::Synchronize, None, Err(error.clone()), None));
        assert!(!ok(&Op::Synchronize, None, Err(error), Some(1)));
        assert!(!ok(
            &Op::LoadModule {
                source: ModuleSource::Builtin
            },
            None,
            Ok(Reply::Module(ModuleHandle { device: 0, id: 1 })),
            None
        ));
    }

    fn request(id: u64, op: Op) -> Request {
        Request {
            id,
            op,
            origin: Origin::Application,
            fault: None,
            input: None,
            output: None,
            linger_us: 0,
        }
    }

    #[test]
    fn batch_answers_are_checked_for_count_order_and_what_follows_a_sticky_fault() {
        let reqs: Vec<Request> = (10..13).map(|id| request(id, Op::Synchronize)).collect();
        let done = |id| (id, Ok(Reply::Done));
        let sticky = |id| {
            let e = GpuError::api_with(crate::error::Api::Sim, 700, crate::op::OpKind::Synchronize, 1, "x");
            (id, Err(e))
        };
        let check = |answered, results: &[(u64, Result<Reply, GpuError>)], last| {
            check_batch_frame(&reqs, answered, results, last, 1, 2).is_ok()
        };
        assert!(check(0, &[done(10), done(11), done(12)], true));
        assert!(check(0, &[done(10)], false));
        assert!(check(1, &[done(11), done(12)], true));
        assert!(check(0, &[done(10), sticky(11)], true), "stopped at a sticky fault");
        assert!(
            !check(0, &[done(10), sticky(11)], false),
            "a sticky fault ends the batch"
        );
        assert!(
            !check(0, &[sticky(10), done(11)], true),
            "nothing runs after a sticky fault"
        );
        assert!(!check(0, &[done(10), done(11)], true), "stopped without a reason");
        assert!(!check(0, &[done(10), done(11), done(12), done(13)], true), "too many");
        assert!(!check(2, &[done(12), done(13)], true), "too many");
        assert!(!check(0, &[done(11)], false), "out of order");
        assert!(!check(0, &[], true), "nothing answered");
        assert!(!check(5, &[], true), "past the end");
    }

    /// Decodes `frame` as the host does and checks it against one request of every kind
    /// (with and without an output region) and a batch of them.
    fn check_any_response(frame: &[u8]) {
        let b = buffer(0, 1 << 20);
        let ops = [
            Op::Alloc { bytes: 64 },
            Op::Free { buffer: b },
            Op::CopyFromDevice {
                src: b,
                offset: 0,
                len: 64,
            },
            Op::CopyFromDevice {
                src: b,
                offset: 0,
                len: 65_536,
            },
            Op::Memset {
                buffer: b,
                offset: 0,
                len: 8,
                value: 1,
            },
            Op::LoadModule {
                source: ModuleSource::Builtin,
            },
            Op::Synchronize,
            Op::MemInfo,
            Op::DeviceInfo,
        ];
        let Ok(msg) = decode::<FromWorker>(frame) else { return };
        match msg {
            FromWorker::Response { result, output_len, .. } => {
                for op in &ops {
                    for output in [None, Some(64), Some(65_536)] {
                        let _ = check_answer(op, 1, 0, output, &result, output_len);
                    }
                }
            }
            FromWorker::Batch { results, done } => {
                let reqs: Vec<Request> = ops
                    .iter()
                    .cloned()
                    .enumerate()
                    .map(|(i, op)| request(i as u64, op))
                    .collect();
                for answered in 0..=reqs.len() + 1 {
                    let _ = check_batch_frame(&reqs, answered, &results, done, 1, 0);
                }
            }
            _ => {}
        }
    }

    proptest! {
        #[test]
        fn the_decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode::<ToWorker>(&bytes);
            let _ = decode::<FromWorker>(&bytes);
        }

        #[test]
        fn valid_headers_with_random_bodies_never_panic(body in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut frame = b"HV".to_vec();
            frame.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
            frame.extend_from_slice(&body);
            let _ = decode::<ToWorker>(&frame);
            let _ = decode::<FromWorker>(&frame);
        }

        /// The host's whole response path on arbitrary bytes: decoded, then checked against
        /// every kind of request (and a batch of them); no panic, whatever the worker sends.
        #[test]
        fn the_host_checks_any_response_without_panicking(
            tag in 0u8..8,
            body in proptest::collection::vec(any::<u8>(), 0..256),
        ) {
            let mut frame = b"HV".to_vec();
            frame.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
            frame.push(tag);
            frame.extend_from_slice(&body);
            check_any_response(&frame);
        }

        /// The same with responses built from arbitrary fields (valid frames whose numbers
        /// are anything).
        #[test]
        fn the_host_checks_responses_with_any_numbers(
            id in any::<u64>(),
            len in any::<u64>(),
            output_len in proptest::option::of(any::<u64>()),
            epoch in any::<u64>(),
            device in any::<u32>(),
            data in 0usize..70_000,
            done in any::<bool>(),
        ) {
            let handle = crate::op::BufferHandle { device, epoch, id, len };
            let replies = [
                Reply::Done,
                Reply::Buffer(handle),
                Reply::Data(vec![0; data].into()),
                Reply::Module(ModuleHandle { device, id }),
                Reply::MemInfo(crate::op::MemInfo { free: len, total: epoch }),
            ];
            for reply in replies {
                let response = FromWorker::Response { id, result: Ok(reply.clone()), output_len };
                check_any_response(&encode(&response).unwrap_or_default());
                let batch = FromWorker::Batch { results: vec![(id, Ok(reply)); (len % 70) as usize], done };
                check_any_response(&encode(&batch).unwrap_or_default());
            }
        }
    }
}
