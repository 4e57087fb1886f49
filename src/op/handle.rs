//! The handles and launch arguments ops name: buffers, modules, dimensions, kernel
//! arguments. Plain serde data; imports nothing of the crate.

use serde::{Deserialize, Serialize};
use std::fmt;

/// A device buffer. Opaque: only the device that made it can use it, and only in the
/// context (epoch) that made it; after a device restart it fails with `BufferLost` — except
/// a durable buffer's handle ([`BufferHandle::is_durable`]), which stays valid across
/// restarts: its epoch is [`BufferHandle::DURABLE_EPOCH`], which every context of its device
/// accepts for the buffers it holds as durable (restored from the host copy), and its id is
/// one the runtime gave it (at or above [`DURABLE_ID_BASE`]), the same on every device that
/// holds a replica.
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

impl BufferHandle {
    /// The epoch of every durable buffer's handle: no context has it, so the check of a
    /// handle's epoch ("from an earlier context: `BufferLost`") never applies to it; a
    /// context accepts it for a buffer it holds as durable, and for nothing else.
    pub const DURABLE_EPOCH: u64 = u64::MAX;

    /// Whether this is a durable buffer's handle.
    pub fn is_durable(&self) -> bool {
        self.epoch == Self::DURABLE_EPOCH
    }
}

/// The first id of durable buffers. The runtime numbers them from here, runtime-wide (a
/// replicated buffer has one id on every device); a context numbers its own buffers and
/// modules from 1, so the two never meet.
pub const DURABLE_ID_BASE: u64 = 1 << 62;

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

/// A one-dimensional extent.
impl From<u32> for Dim3 {
    fn from(x: u32) -> Dim3 {
        Dim3::x(x)
    }
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
