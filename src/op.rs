//! The operation protocol: what a device is asked to do ([`Op`]) and what it answers
//! ([`Reply`]).
//!
//! Everything here is plain serde data with opaque handles, because operations cross thread,
//! process and (later) machine boundaries. Bulk host bytes travel in a [`Payload`], whose
//! representation a transport may replace (shared memory) without changing [`Op`]'s shape.

use serde::{Deserialize, Serialize};
use std::fmt;

use crate::error::InvalidReason;

pub(crate) mod kind;
mod payload;

pub use kind::OpKind;
pub use payload::Payload;

/// Who issued an op. The simulator's fault plan never faults the runtime's own ops (health
/// probes, module reloads, memory checks for out-of-memory gating).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Origin {
    /// An op submitted by the application.
    Application,
    /// An op the runtime issued itself.
    Runtime,
}

/// A device buffer. Opaque: only the device that made it can use it, and only in the
/// context (epoch) that made it; after a device restart it fails with `BufferLost`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct BufferHandle {
    /// The device that owns the buffer.
    pub device: u32,
    /// The device context (epoch) the buffer lives in.
    pub epoch: u64,
    /// The buffer's id within that context.
    pub id: u64,
    /// The buffer's length in bytes.
    pub len: u64,
}

/// A loaded kernel module. Opaque, like [`BufferHandle`]. Unlike buffers, modules survive a
/// device restart: the runtime reloads them into the new context under the same id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ModuleHandle {
    /// The device the module is loaded on.
    pub device: u32,
    /// The module's id on that device.
    pub id: u64,
}

/// Grid or block dimensions of a launch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Dim3 {
    /// x extent.
    pub x: u32,
    /// y extent.
    pub y: u32,
    /// z extent.
    pub z: u32,
}

impl Dim3 {
    /// A one-dimensional extent `(x, 1, 1)`.
    pub const fn x(x: u32) -> Dim3 {
        Dim3 { x, y: 1, z: 1 }
    }

    /// The number of elements `x * y * z`, or `None` when it does not fit in `u64`
    /// (`(u32::MAX, u32::MAX, u32::MAX)` does not).
    pub fn checked_volume(self) -> Option<u64> {
        u64::from(self.x)
            .checked_mul(u64::from(self.y))?
            .checked_mul(u64::from(self.z))
    }

    /// The number of elements `x * y * z`, saturating at `u64::MAX` (in debug and release
    /// alike; [`Dim3::checked_volume`] tells an overflow apart).
    pub fn volume(self) -> u64 {
        self.checked_volume().unwrap_or(u64::MAX)
    }
}

/// One argument of a kernel launch.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KernelArg {
    /// A device buffer, passed as a device pointer.
    Buffer(BufferHandle),
    /// A 32-bit unsigned integer.
    U32(u32),
    /// A 32-bit signed integer.
    I32(i32),
    /// A 64-bit unsigned integer.
    U64(u64),
    /// A 64-bit signed integer.
    I64(i64),
    /// A 32-bit float.
    F32(f32),
    /// A 64-bit float.
    F64(f64),
}

impl KernelArg {
    /// The argument's type, for signature checks and error messages.
    pub fn arg_type(&self) -> ArgType {
        match self {
            KernelArg::Buffer(_) => ArgType::Buffer,
            KernelArg::U32(_) => ArgType::U32,
            KernelArg::I32(_) => ArgType::I32,
            KernelArg::U64(_) => ArgType::U64,
            KernelArg::I64(_) => ArgType::I64,
            KernelArg::F32(_) => ArgType::F32,
            KernelArg::F64(_) => ArgType::F64,
        }
    }
}

/// The type of a kernel parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ArgType {
    /// A device pointer.
    Buffer,
    /// `u32`
    U32,
    /// `i32`
    I32,
    /// `u64`
    U64,
    /// `i64`
    I64,
    /// `f32`
    F32,
    /// `f64`
    F64,
}

impl fmt::Display for ArgType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ArgType::Buffer => "buffer",
            ArgType::U32 => "u32",
            ArgType::I32 => "i32",
            ArgType::U64 => "u64",
            ArgType::I64 => "i64",
            ArgType::F32 => "f32",
            ArgType::F64 => "f64",
        })
    }
}

/// What a kernel module is made of.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModuleSource {
    /// The runtime's built-in kernels (`fill`, `vector_add`, `saxpy`, `scale`, `checksum`,
    /// `gemv`, `relu`, `fault_illegal_address`: [`crate::kernels`]), prepared for the device
    /// present.
    Builtin,
    /// A module image: a HIP code object, CUDA PTX or cubin, or a simulator module (see
    /// `hipvisor_core::kernels::SIM_MODULE_MAGIC`).
    Image(Payload),
}

/// An operation for one device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    /// Allocate `bytes` of device memory.
    Alloc {
        /// Size in bytes (greater than zero).
        bytes: u64,
    },
    /// Free a buffer.
    Free {
        /// The buffer.
        buffer: BufferHandle,
    },
    /// Copy host bytes into a buffer at `offset`.
    CopyToDevice {
        /// Destination buffer.
        dst: BufferHandle,
        /// Byte offset in the destination.
        offset: u64,
        /// The bytes.
        data: Payload,
    },
    /// Copy `len` bytes at `offset` of a buffer to the host (answered with [`Reply::Data`]).
    CopyFromDevice {
        /// Source buffer.
        src: BufferHandle,
        /// Byte offset in the source.
        offset: u64,
        /// Number of bytes.
        len: u64,
    },
    /// Copy between two buffers of the same device. The ranges may not overlap.
    CopyDeviceToDevice {
        /// Source buffer.
        src: BufferHandle,
        /// Byte offset in the source.
        src_offset: u64,
        /// Destination buffer.
        dst: BufferHandle,
        /// Byte offset in the destination.
        dst_offset: u64,
        /// Number of bytes.
        len: u64,
    },
    /// Set `len` bytes at `offset` of a buffer to `value`.
    Memset {
        /// The buffer.
        buffer: BufferHandle,
        /// Byte offset.
        offset: u64,
        /// Number of bytes.
        len: u64,
        /// The byte value.
        value: u8,
    },
    /// Load a kernel module (answered with [`Reply::Module`]).
    LoadModule {
        /// What to load.
        source: ModuleSource,
    },
    /// Launch a kernel of a loaded module. Asynchronous on a GPU: a fault of the kernel
    /// surfaces in the next synchronizing op.
    Launch {
        /// The module.
        module: ModuleHandle,
        /// The kernel's name in the module.
        function: String,
        /// Grid dimensions (in blocks).
        grid: Dim3,
        /// Block dimensions (in threads).
        block: Dim3,
        /// Dynamic shared memory per block, in bytes.
        shared_mem_bytes: u32,
        /// The kernel's arguments, in order.
        args: Vec<KernelArg>,
    },
    /// Wait until all earlier work of the device has finished.
    Synchronize,
    /// Free and total device memory (answered with [`Reply::MemInfo`]).
    MemInfo,
    /// The device's description (answered with [`Reply::DeviceInfo`]).
    DeviceInfo,
}

impl Op {
    /// The operation's kind.
    pub fn kind(&self) -> OpKind {
        match self {
            Op::Alloc { .. } => OpKind::Alloc,
            Op::Free { .. } => OpKind::Free,
            Op::CopyToDevice { .. } => OpKind::CopyToDevice,
            Op::CopyFromDevice { .. } => OpKind::CopyFromDevice,
            Op::CopyDeviceToDevice { .. } => OpKind::CopyDeviceToDevice,
            Op::Memset { .. } => OpKind::Memset,
            Op::LoadModule { .. } => OpKind::LoadModule,
            Op::Launch { .. } => OpKind::Launch,
            Op::Synchronize => OpKind::Synchronize,
            Op::MemInfo => OpKind::MemInfo,
            Op::DeviceInfo => OpKind::DeviceInfo,
        }
    }

    /// The kernel name, for launches.
    pub fn kernel(&self) -> Option<&str> {
        match self {
            Op::Launch { function, .. } => Some(function),
            _ => None,
        }
    }

    /// Every buffer the op touches (for stale-handle checks and buffer affinity).
    pub fn buffers(&self) -> Vec<BufferHandle> {
        match self {
            Op::Free { buffer } | Op::Memset { buffer, .. } => vec![*buffer],
            Op::CopyToDevice { dst, .. } => vec![*dst],
            Op::CopyFromDevice { src, .. } => vec![*src],
            Op::CopyDeviceToDevice { src, dst, .. } => vec![*src, *dst],
            Op::Launch { args, .. } => args
                .iter()
                .filter_map(|a| match a {
                    KernelArg::Buffer(b) => Some(*b),
                    _ => None,
                })
                .collect(),
            Op::Alloc { .. } | Op::LoadModule { .. } | Op::Synchronize | Op::MemInfo | Op::DeviceInfo => Vec::new(),
        }
    }

    /// The module the op uses, for launches.
    pub fn module(&self) -> Option<ModuleHandle> {
        match self {
            Op::Launch { module, .. } => Some(*module),
            _ => None,
        }
    }

    /// The checks of sizes, offsets and launch dimensions that need no device: every byte
    /// range lies inside the length its handle states (with `offset + len` computed without
    /// overflow) and inside [`MAX_BUFFER_BYTES`], an allocation is not empty, and the launch
    /// dimensions pass [`check_launch_dims`]. Whoever must prepare host
    /// memory for an op before its device sees it (the host side of a worker process: the
    /// shared memory for a copy's result) calls this first, so an absurd size is an invalid
    /// request rather than a failed host allocation.
    ///
    /// It is a subset of what the device checks itself (which also compares each handle
    /// with the buffer it names, and an allocation with the device's memory): passing it
    /// proves nothing about the handles.
    ///
    /// # Errors
    /// [`InvalidReason::OutOfBounds`], [`InvalidReason::ZeroSizeAllocation`] or
    /// [`InvalidReason::BadLaunchConfig`].
    pub fn check_sizes(&self) -> Result<(), InvalidReason> {
        fn range(h: &BufferHandle, offset: u64, len: u64) -> Result<(), InvalidReason> {
            let buffer_len = h.len.min(MAX_BUFFER_BYTES);
            if offset.checked_add(len).is_none_or(|end| end > buffer_len) {
                return Err(InvalidReason::OutOfBounds {
                    offset,
                    len,
                    buffer_len,
                });
            }
            Ok(())
        }
        match self {
            Op::Alloc { bytes: 0 } => Err(InvalidReason::ZeroSizeAllocation),
            Op::CopyToDevice { dst, offset, data } => range(dst, *offset, data.len() as u64),
            Op::CopyFromDevice { src, offset, len } => range(src, *offset, *len),
            Op::CopyDeviceToDevice {
                src,
                src_offset,
                dst,
                dst_offset,
                len,
            } => {
                range(src, *src_offset, *len)?;
                range(dst, *dst_offset, *len)
            }
            Op::Memset {
                buffer, offset, len, ..
            } => range(buffer, *offset, *len),
            Op::Launch { grid, block, .. } => check_launch_dims(*grid, *block),
            Op::Alloc { .. }
            | Op::Free { .. }
            | Op::LoadModule { .. }
            | Op::Synchronize
            | Op::MemInfo
            | Op::DeviceInfo => Ok(()),
        }
    }

    /// The limits every op must respect whatever the isolation, checked before anything is
    /// sent or touched (like [`Op::check_sizes`], no device needed): a launch's kernel name
    /// at most [`MAX_KERNEL_NAME_BYTES`], its arguments at most [`MAX_KERNEL_ARGS`]. (Bulk
    /// bytes have no such limit: large payloads travel in shared memory.) The host of a
    /// worker process checks it before it builds a request (nothing is sent, the worker and
    /// the device's other users notice nothing), and the device's own validation checks it
    /// in either isolation, so both answer such an op alike: an invalid request, at once.
    ///
    /// # Errors
    /// [`InvalidReason::BadArguments`], naming the limit.
    pub fn check_limits(&self) -> Result<(), InvalidReason> {
        let Op::Launch { function, args, .. } = self else {
            return Ok(());
        };
        let reason = if function.len() > MAX_KERNEL_NAME_BYTES {
            format!(
                "a kernel name of {} bytes; at most {MAX_KERNEL_NAME_BYTES}",
                function.len()
            )
        } else if args.len() > MAX_KERNEL_ARGS {
            format!("{} arguments; at most {MAX_KERNEL_ARGS}", args.len())
        } else {
            return Ok(());
        };
        Err(InvalidReason::BadArguments {
            kernel: shortened(function),
            reason,
        })
    }
}

/// The largest buffer there can be, on a device or on the host: Rust's limit for one
/// allocation (`isize::MAX` bytes). [`Op::check_sizes`] holds every range to it whatever
/// length a handle claims.
pub const MAX_BUFFER_BYTES: u64 = isize::MAX as u64;

/// The longest kernel name a launch may carry, in bytes. Generous for C++ mangled names
/// (templates make them long), and small enough that a launch always fits in one frame of
/// the worker protocol ([`crate::ipc::MAX_FRAME`]).
pub const MAX_KERNEL_NAME_BYTES: usize = 4096;

/// The most arguments a launch may carry: 4 KiB of 4-byte parameters, the classic limit of a
/// kernel's parameter space on CUDA and HIP. With the longest name, a launch's request is
/// well under a frame (every argument encodes in at most 36 bytes).
pub const MAX_KERNEL_ARGS: usize = 1024;

/// A name for messages: at most 64 bytes of it (on a character boundary), then `…`.
fn shortened(name: &str) -> String {
    if name.len() <= 64 {
        return name.to_string();
    }
    let mut end = 64;
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &name[..end])
}

/// Free and total memory of a device, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemInfo {
    /// Free bytes.
    pub free: u64,
    /// Total bytes.
    pub total: u64,
}

/// A device's description.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceInfo {
    /// The device's index in its backend.
    pub index: u32,
    /// Its name (`NVIDIA H200`, `simulated GPU 0`).
    pub name: String,
    /// Total memory in bytes.
    pub total_memory: u64,
    /// The architecture the runtime compiles kernels for (`sm_90`, `gfx942:sramecc+:xnack-`,
    /// `sim`).
    pub arch: String,
    /// The PCI bus id (`0000:19:00.0`) of a real GPU; devices are ordered by it. `None` on the
    /// simulator.
    #[serde(default)]
    pub pci_bus_id: Option<String>,
    /// The GPU's UUID (`GPU-8f3c...` on NVIDIA, as `nvidia-smi -L` prints it); `None` on the
    /// simulator and where the runtime cannot tell.
    #[serde(default)]
    pub uuid: Option<String>,
}

/// The successful answer to an [`Op`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reply {
    /// The op completed and returns nothing (free, copy to device, memset, launch, ...).
    Done,
    /// A new buffer (for [`Op::Alloc`]).
    Buffer(BufferHandle),
    /// Bytes read from the device (for [`Op::CopyFromDevice`]).
    Data(Payload),
    /// A loaded module (for [`Op::LoadModule`]).
    Module(ModuleHandle),
    /// Memory figures (for [`Op::MemInfo`]).
    MemInfo(MemInfo),
    /// The device's description (for [`Op::DeviceInfo`]).
    DeviceInfo(DeviceInfo),
}

/// The most threads in one block.
pub const MAX_THREADS_PER_BLOCK: u64 = 1024;

/// Checks grid and block dimensions (limits common to current AMD and NVIDIA GPUs). Every
/// product is computed with checked arithmetic, in debug and release alike: dimensions
/// whose product does not fit in `u64` are refused, never wrapped. That includes a launch
/// within the per-dimension limits whose total thread count ([`total_threads`]) reaches
/// 2^64 (the limits allow 2^73): at 10^12 threads a second it would run for half a year.
///
/// # Errors
/// [`InvalidReason::BadLaunchConfig`] saying which dimension is wrong.
pub fn check_launch_dims(grid: Dim3, block: Dim3) -> Result<(), InvalidReason> {
    let bad = |reason: String| Err(InvalidReason::BadLaunchConfig { reason });
    if grid.x == 0 || grid.y == 0 || grid.z == 0 || block.x == 0 || block.y == 0 || block.z == 0 {
        return bad(format!("zero dimension in grid {grid:?} or block {block:?}"));
    }
    match block.checked_volume() {
        Some(threads) if threads <= MAX_THREADS_PER_BLOCK => {}
        Some(threads) => return bad(format!("block of {threads} threads exceeds {MAX_THREADS_PER_BLOCK}")),
        None => return bad(format!("block {block:?} exceeds {MAX_THREADS_PER_BLOCK} threads")),
    }
    if block.z > 64 {
        return bad(format!("block z = {} exceeds 64", block.z));
    }
    if grid.x > i32::MAX as u32 || grid.y > 65535 || grid.z > 65535 {
        return bad(format!("grid {grid:?} exceeds (2^31-1, 65535, 65535)"));
    }
    if total_threads(grid, block).is_none() {
        return bad(format!("grid {grid:?} × block {block:?} is 2^64 threads or more"));
    }
    Ok(())
}

/// The threads of a launch, `grid` × `block`, or `None` when the product does not fit in
/// `u64` (such a launch fails [`check_launch_dims`]).
pub fn total_threads(grid: Dim3, block: Dim3) -> Option<u64> {
    grid.checked_volume()?.checked_mul(block.checked_volume()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kind_names_round_trip() {
        for k in OpKind::ALL {
            assert_eq!(OpKind::from_name(k.as_str()), Some(k));
        }
        assert_eq!(OpKind::from_name("lunch"), None);
    }

    #[test]
    fn idempotence_is_stated_per_kind() {
        assert!(!OpKind::Alloc.is_idempotent());
        assert!(!OpKind::Launch.is_idempotent());
        assert!(!OpKind::Free.is_idempotent());
        assert!(OpKind::CopyToDevice.is_idempotent());
        assert!(OpKind::MemInfo.is_idempotent());
    }

    #[test]
    fn ops_cross_a_serde_boundary() {
        let b = BufferHandle {
            device: 1,
            epoch: 2,
            id: 3,
            len: 16,
        };
        let op = Op::CopyToDevice {
            dst: b,
            offset: 4,
            data: Payload::from(vec![1, 2, 3]),
        };
        let text = toml::to_string(&Holder { op: op.clone() }).unwrap();
        let back: Holder = toml::from_str(&text).unwrap();
        assert_eq!(back.op, op);
        assert_eq!(op.buffers(), vec![b]);
    }

    #[test]
    fn launches_beyond_the_limits_are_invalid_and_fit_in_a_frame_within_them() {
        let launch = |function: String, args: Vec<KernelArg>| Op::Launch {
            module: ModuleHandle { device: 0, id: 1 },
            function,
            grid: Dim3::x(1),
            block: Dim3::x(1),
            shared_mem_bytes: 0,
            args,
        };
        let b = KernelArg::Buffer(BufferHandle {
            device: u32::MAX,
            epoch: u64::MAX,
            id: u64::MAX,
            len: u64::MAX,
        });
        let widest = launch("é".repeat(MAX_KERNEL_NAME_BYTES / 2), vec![b; MAX_KERNEL_ARGS]);
        assert_eq!(widest.check_limits(), Ok(()));
        let request = crate::ipc::ToWorker::Request(crate::ipc::Request {
            id: u64::MAX,
            op: widest,
            origin: crate::backend::Origin::Application,
            fault: Some(crate::ipc::WireFault::HangMs(u64::MAX)),
            input: None,
            output: None,
            linger_us: u32::MAX,
        });
        crate::ipc::encode(&request).expect("the widest launch within the limits fits in a frame");
        for op in [
            launch("k".repeat(MAX_KERNEL_NAME_BYTES + 1), vec![]),
            launch("fill".into(), vec![KernelArg::U32(0); MAX_KERNEL_ARGS + 1]),
        ] {
            match op.check_limits() {
                Err(InvalidReason::BadArguments { kernel, reason }) => {
                    assert!(kernel.len() <= 68, "the name is shortened: {kernel}");
                    assert!(reason.contains("at most"), "{reason}");
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(Op::MemInfo.check_limits(), Ok(()));
    }

    #[derive(Serialize, Deserialize)]
    struct Holder {
        op: Op,
    }
}
