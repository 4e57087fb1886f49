//! The operation protocol: what a device is asked to do ([`Op`]) and what it answers
//! ([`Reply`]).
//!
//! Everything here is plain serde data with opaque handles, because operations cross thread,
//! process and (later) machine boundaries. Bulk host bytes travel in a [`Payload`], whose
//! representation a transport may replace (shared memory) without changing [`Op`]'s shape.

use serde::{Deserialize, Serialize};

use crate::error::InvalidReason;

mod handle;
pub(crate) mod kind;
mod limits;
mod payload;
pub mod task;

pub use handle::{ArgType, BufferHandle, DURABLE_ID_BASE, Dim3, KernelArg, ModuleHandle};
pub(crate) use limits::check_launch_limits;
pub use limits::{
    MAX_BUFFER_BYTES, MAX_KERNEL_ARGS, MAX_KERNEL_NAME_BYTES, MAX_THREADS_PER_BLOCK, check_launch_dims, total_threads,
};

pub use kind::OpKind;
pub use payload::Payload;
pub use task::TaskOp;

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
    /// Creates the durable buffer `id` holding `data` (answered with [`Reply::Buffer`]: its
    /// durable handle), or, when this context holds it already, fills it with `data` (a
    /// standby worker catching up with a changed host copy). The runtime's op behind
    /// `DeviceHandle::durable`, and how a new context gets the durable buffers of its
    /// device back.
    Durable {
        /// The buffer's id, at or above [`DURABLE_ID_BASE`].
        id: u64,
        /// Its contents (and length: greater than zero).
        data: Payload,
    },
    /// Runs a task: a short program of allocations, copies and launches executed as one
    /// request (answered with [`Reply::Outputs`]). See [`task`].
    Task(Box<TaskOp>),
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
            Op::Durable { .. } => OpKind::Durable,
            Op::Task(_) => OpKind::Task,
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
            Op::Task(task) => task.durable_buffers().collect(),
            Op::Alloc { .. }
            | Op::LoadModule { .. }
            | Op::Synchronize
            | Op::MemInfo
            | Op::DeviceInfo
            | Op::Durable { .. } => Vec::new(),
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
            Op::Durable { data, .. } if data.is_empty() => Err(InvalidReason::ZeroSizeAllocation),
            Op::Task(task) => task.check_sizes(),
            Op::Durable { .. }
            | Op::Alloc { .. }
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
        let (function, args) = match self {
            Op::Launch { function, args, .. } => (function, args),
            Op::Durable { id, .. } if *id < DURABLE_ID_BASE => {
                return Err(InvalidReason::BadDurable {
                    reason: format!("id {id} is not a durable buffer's (those are at or above {DURABLE_ID_BASE})"),
                });
            }
            Op::Task(task) => return task.check_limits(),
            _ => return Ok(()),
        };
        check_launch_limits(function, args.len())
    }
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
    /// A task's outputs, one per output it names, in order (for [`Op::Task`]).
    Outputs(Vec<Payload>),
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
            task_faults: Vec::new(),
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
