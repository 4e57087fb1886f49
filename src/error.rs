//! The error taxonomy: every failure the runtime can report, classified by error **code**.
//!
//! [`GpuError`] says what happened (the API that failed, its raw code and name, the operation
//! and the device), and [`ErrorClass`] says what the runtime does about it. The class is a
//! pure function of `(Api, code)` — never of the operation or the message text — following the
//! table in `ARCHITECTURE.md`:
//!
//! | class | runtime action |
//! | --- | --- |
//! | [`ErrorClass::Transient`] | retry with backoff (out-of-memory waits for free memory) |
//! | [`ErrorClass::InvalidRequest`] | answer at once: no retry, no restart |
//! | [`ErrorClass::Sticky`] | the context is poisoned: restart the device (its process) |
//! | [`ErrorClass::DeviceLost`] | mark the device lost, route work elsewhere, probe for its return |
//!
//! Codes the table does not list are [`ErrorClass::Sticky`]: an error nobody understood is
//! treated as one that may have poisoned the context (the safe side).

use serde::{Deserialize, Serialize};
use std::fmt;

use crate::op::OpKind;

/// The API an error code comes from. The same number means different things in different
/// APIs, so a code is only meaningful together with its API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Api {
    /// The HIP runtime (`hipError_t`).
    Hip,
    /// The CUDA driver API (`CUresult`).
    CudaDriver,
    /// The simulated backend. It speaks HIP's codes, so the HIP table classifies it.
    Sim,
}

impl fmt::Display for Api {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Api::Hip => "HIP",
            Api::CudaDriver => "CUDA driver",
            Api::Sim => "simulator",
        })
    }
}

/// What the runtime does about an error. See the module docs for the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorClass {
    /// Retry with backoff; the next attempt may succeed.
    Transient,
    /// The request itself is wrong; retrying or restarting cannot help.
    InvalidRequest,
    /// The device context is poisoned; only a new context (a new process) recovers.
    Sticky,
    /// The device is gone (or the driver is); route work elsewhere and probe for its return.
    DeviceLost,
}

impl ErrorClass {
    /// The class's name in `snake_case`, as used in reports and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::Transient => "transient",
            ErrorClass::InvalidRequest => "invalid_request",
            ErrorClass::Sticky => "sticky",
            ErrorClass::DeviceLost => "device_lost",
        }
    }
}

impl fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// HIP error codes the runtime gives a meaning to (values of `hipError_t`).
pub mod hip {
    /// `hipErrorInvalidValue`
    pub const INVALID_VALUE: i32 = 1;
    /// `hipErrorOutOfMemory`
    pub const OUT_OF_MEMORY: i32 = 2;
    /// `hipErrorNotInitialized`
    pub const NOT_INITIALIZED: i32 = 3;
    /// `hipErrorDeinitialized`
    pub const DEINITIALIZED: i32 = 4;
    /// `hipErrorInvalidConfiguration`
    pub const INVALID_CONFIGURATION: i32 = 9;
    /// `hipErrorInvalidDevicePointer`
    pub const INVALID_DEVICE_POINTER: i32 = 17;
    /// `hipErrorInvalidMemcpyDirection`
    pub const INVALID_MEMCPY_DIRECTION: i32 = 21;
    /// `hipErrorInsufficientDriver`
    pub const INSUFFICIENT_DRIVER: i32 = 35;
    /// `hipErrorPriorLaunchFailure`
    pub const PRIOR_LAUNCH_FAILURE: i32 = 53;
    /// `hipErrorInvalidDeviceFunction`
    pub const INVALID_DEVICE_FUNCTION: i32 = 98;
    /// `hipErrorNoDevice`
    pub const NO_DEVICE: i32 = 100;
    /// `hipErrorInvalidDevice`
    pub const INVALID_DEVICE: i32 = 101;
    /// `hipErrorInvalidImage`
    pub const INVALID_IMAGE: i32 = 200;
    /// `hipErrorNoBinaryForGpu`
    pub const NO_BINARY_FOR_GPU: i32 = 209;
    /// `hipErrorECCNotCorrectable`
    pub const ECC_NOT_CORRECTABLE: i32 = 214;
    /// `hipErrorInvalidKernelFile`
    pub const INVALID_KERNEL_FILE: i32 = 218;
    /// `hipErrorFileNotFound`
    pub const FILE_NOT_FOUND: i32 = 301;
    /// `hipErrorInvalidHandle`
    pub const INVALID_HANDLE: i32 = 400;
    /// `hipErrorNotFound`
    pub const NOT_FOUND: i32 = 500;
    /// `hipErrorNotReady`
    pub const NOT_READY: i32 = 600;
    /// `hipErrorIllegalAddress`
    pub const ILLEGAL_ADDRESS: i32 = 700;
    /// `hipErrorLaunchOutOfResources`
    pub const LAUNCH_OUT_OF_RESOURCES: i32 = 701;
    /// `hipErrorLaunchTimeOut`
    pub const LAUNCH_TIME_OUT: i32 = 702;
    /// `hipErrorAssert`
    pub const ASSERT: i32 = 710;
    /// `hipErrorLaunchFailure`
    pub const LAUNCH_FAILURE: i32 = 719;
    /// `hipErrorNotSupported`
    pub const NOT_SUPPORTED: i32 = 801;
}

/// CUDA driver codes the runtime gives a meaning to (values of `CUresult`).
pub mod cuda {
    /// `CUDA_ERROR_INVALID_VALUE`
    pub const INVALID_VALUE: i32 = 1;
    /// `CUDA_ERROR_OUT_OF_MEMORY`
    pub const OUT_OF_MEMORY: i32 = 2;
    /// `CUDA_ERROR_NOT_INITIALIZED`
    pub const NOT_INITIALIZED: i32 = 3;
    /// `CUDA_ERROR_DEINITIALIZED`
    pub const DEINITIALIZED: i32 = 4;
    /// `CUDA_ERROR_STUB_LIBRARY`: the driver found is a stub, there is no real driver.
    pub const STUB_LIBRARY: i32 = 34;
    /// `CUDA_ERROR_DEVICE_UNAVAILABLE` ("devices unavailable"), seen for seconds after a
    /// device reset.
    pub const DEVICE_UNAVAILABLE: i32 = 46;
    /// `CUDA_ERROR_NO_DEVICE`
    pub const NO_DEVICE: i32 = 100;
    /// `CUDA_ERROR_INVALID_DEVICE`
    pub const INVALID_DEVICE: i32 = 101;
    /// `CUDA_ERROR_INVALID_IMAGE`
    pub const INVALID_IMAGE: i32 = 200;
    /// `CUDA_ERROR_NO_BINARY_FOR_GPU`
    pub const NO_BINARY_FOR_GPU: i32 = 209;
    /// `CUDA_ERROR_ECC_UNCORRECTABLE`
    pub const ECC_UNCORRECTABLE: i32 = 214;
    /// `CUDA_ERROR_INVALID_PTX` (HIP's 218 "invalid kernel file")
    pub const INVALID_PTX: i32 = 218;
    /// `CUDA_ERROR_UNSUPPORTED_PTX_VERSION`
    pub const UNSUPPORTED_PTX_VERSION: i32 = 222;
    /// `CUDA_ERROR_FILE_NOT_FOUND`
    pub const FILE_NOT_FOUND: i32 = 301;
    /// `CUDA_ERROR_INVALID_HANDLE`
    pub const INVALID_HANDLE: i32 = 400;
    /// `CUDA_ERROR_NOT_FOUND` (also: a function name not in the module)
    pub const NOT_FOUND: i32 = 500;
    /// `CUDA_ERROR_NOT_READY`
    pub const NOT_READY: i32 = 600;
    /// `CUDA_ERROR_ILLEGAL_ADDRESS`
    pub const ILLEGAL_ADDRESS: i32 = 700;
    /// `CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES`
    pub const LAUNCH_OUT_OF_RESOURCES: i32 = 701;
    /// `CUDA_ERROR_LAUNCH_TIMEOUT`
    pub const LAUNCH_TIMEOUT: i32 = 702;
    /// `CUDA_ERROR_ASSERT`
    pub const ASSERT: i32 = 710;
    /// `CUDA_ERROR_ILLEGAL_INSTRUCTION`
    pub const ILLEGAL_INSTRUCTION: i32 = 715;
    /// `CUDA_ERROR_MISALIGNED_ADDRESS`
    pub const MISALIGNED_ADDRESS: i32 = 716;
    /// `CUDA_ERROR_LAUNCH_FAILED`
    pub const LAUNCH_FAILED: i32 = 719;
    /// `CUDA_ERROR_NOT_SUPPORTED`
    pub const NOT_SUPPORTED: i32 = 801;
    /// `CUDA_ERROR_SYSTEM_DRIVER_MISMATCH` (HIP's 35 "insufficient driver")
    pub const SYSTEM_DRIVER_MISMATCH: i32 = 803;
    /// `CUDA_ERROR_UNKNOWN`
    pub const UNKNOWN: i32 = 999;
}

/// The class of `code` in `api`. Total: every code has a class; unknown codes are `Sticky`.
pub fn classify(api: Api, code: i32) -> ErrorClass {
    match api {
        Api::Hip | Api::Sim => classify_hip(code),
        Api::CudaDriver => classify_cuda(code),
    }
}

fn classify_hip(code: i32) -> ErrorClass {
    use ErrorClass::*;
    use hip::*;
    match code {
        OUT_OF_MEMORY | NOT_READY => Transient,
        INVALID_VALUE
        | INVALID_CONFIGURATION
        | INVALID_DEVICE_POINTER
        | INVALID_MEMCPY_DIRECTION
        | INVALID_DEVICE_FUNCTION
        | INVALID_DEVICE
        | INVALID_IMAGE
        | NO_BINARY_FOR_GPU
        | INVALID_KERNEL_FILE
        | FILE_NOT_FOUND
        | INVALID_HANDLE
        | NOT_FOUND
        | LAUNCH_OUT_OF_RESOURCES
        | NOT_SUPPORTED => InvalidRequest,
        NO_DEVICE | NOT_INITIALIZED | DEINITIALIZED | INSUFFICIENT_DRIVER => DeviceLost,
        // ILLEGAL_ADDRESS, LAUNCH_TIME_OUT, ASSERT, LAUNCH_FAILURE, PRIOR_LAUNCH_FAILURE,
        // ECC_NOT_CORRECTABLE and every code not listed above.
        _ => Sticky,
    }
}

fn classify_cuda(code: i32) -> ErrorClass {
    use ErrorClass::*;
    use cuda::*;
    match code {
        OUT_OF_MEMORY | NOT_READY => Transient,
        INVALID_VALUE
        | INVALID_DEVICE
        | INVALID_IMAGE
        | NO_BINARY_FOR_GPU
        | INVALID_PTX
        | UNSUPPORTED_PTX_VERSION
        | FILE_NOT_FOUND
        | INVALID_HANDLE
        | NOT_FOUND
        | LAUNCH_OUT_OF_RESOURCES
        | NOT_SUPPORTED => InvalidRequest,
        NO_DEVICE | NOT_INITIALIZED | DEINITIALIZED | DEVICE_UNAVAILABLE | STUB_LIBRARY | SYSTEM_DRIVER_MISMATCH => {
            DeviceLost
        }
        // ILLEGAL_ADDRESS, LAUNCH_TIMEOUT, ASSERT, ILLEGAL_INSTRUCTION, MISALIGNED_ADDRESS,
        // LAUNCH_FAILED, ECC_UNCORRECTABLE, UNKNOWN and every code not listed above.
        _ => Sticky,
    }
}

/// The symbolic name of `code` in `api` (`hipErrorOutOfMemory`, `CUDA_ERROR_OUT_OF_MEMORY`),
/// or `"unknown"`.
pub fn code_name(api: Api, code: i32) -> &'static str {
    match api {
        Api::Hip | Api::Sim => hip_code_name(code),
        Api::CudaDriver => cuda_code_name(code),
    }
}

fn hip_code_name(code: i32) -> &'static str {
    use hip::*;
    match code {
        0 => "hipSuccess",
        INVALID_VALUE => "hipErrorInvalidValue",
        OUT_OF_MEMORY => "hipErrorOutOfMemory",
        NOT_INITIALIZED => "hipErrorNotInitialized",
        DEINITIALIZED => "hipErrorDeinitialized",
        INVALID_CONFIGURATION => "hipErrorInvalidConfiguration",
        INVALID_DEVICE_POINTER => "hipErrorInvalidDevicePointer",
        INVALID_MEMCPY_DIRECTION => "hipErrorInvalidMemcpyDirection",
        INSUFFICIENT_DRIVER => "hipErrorInsufficientDriver",
        PRIOR_LAUNCH_FAILURE => "hipErrorPriorLaunchFailure",
        INVALID_DEVICE_FUNCTION => "hipErrorInvalidDeviceFunction",
        NO_DEVICE => "hipErrorNoDevice",
        INVALID_DEVICE => "hipErrorInvalidDevice",
        INVALID_IMAGE => "hipErrorInvalidImage",
        NO_BINARY_FOR_GPU => "hipErrorNoBinaryForGpu",
        ECC_NOT_CORRECTABLE => "hipErrorECCNotCorrectable",
        INVALID_KERNEL_FILE => "hipErrorInvalidKernelFile",
        FILE_NOT_FOUND => "hipErrorFileNotFound",
        INVALID_HANDLE => "hipErrorInvalidHandle",
        NOT_FOUND => "hipErrorNotFound",
        NOT_READY => "hipErrorNotReady",
        ILLEGAL_ADDRESS => "hipErrorIllegalAddress",
        LAUNCH_OUT_OF_RESOURCES => "hipErrorLaunchOutOfResources",
        LAUNCH_TIME_OUT => "hipErrorLaunchTimeOut",
        ASSERT => "hipErrorAssert",
        LAUNCH_FAILURE => "hipErrorLaunchFailure",
        NOT_SUPPORTED => "hipErrorNotSupported",
        _ => "unknown",
    }
}

fn cuda_code_name(code: i32) -> &'static str {
    use cuda::*;
    match code {
        0 => "CUDA_SUCCESS",
        INVALID_VALUE => "CUDA_ERROR_INVALID_VALUE",
        OUT_OF_MEMORY => "CUDA_ERROR_OUT_OF_MEMORY",
        NOT_INITIALIZED => "CUDA_ERROR_NOT_INITIALIZED",
        DEINITIALIZED => "CUDA_ERROR_DEINITIALIZED",
        STUB_LIBRARY => "CUDA_ERROR_STUB_LIBRARY",
        DEVICE_UNAVAILABLE => "CUDA_ERROR_DEVICE_UNAVAILABLE",
        NO_DEVICE => "CUDA_ERROR_NO_DEVICE",
        INVALID_DEVICE => "CUDA_ERROR_INVALID_DEVICE",
        INVALID_IMAGE => "CUDA_ERROR_INVALID_IMAGE",
        NO_BINARY_FOR_GPU => "CUDA_ERROR_NO_BINARY_FOR_GPU",
        ECC_UNCORRECTABLE => "CUDA_ERROR_ECC_UNCORRECTABLE",
        INVALID_PTX => "CUDA_ERROR_INVALID_PTX",
        UNSUPPORTED_PTX_VERSION => "CUDA_ERROR_UNSUPPORTED_PTX_VERSION",
        FILE_NOT_FOUND => "CUDA_ERROR_FILE_NOT_FOUND",
        INVALID_HANDLE => "CUDA_ERROR_INVALID_HANDLE",
        NOT_FOUND => "CUDA_ERROR_NOT_FOUND",
        NOT_READY => "CUDA_ERROR_NOT_READY",
        ILLEGAL_ADDRESS => "CUDA_ERROR_ILLEGAL_ADDRESS",
        LAUNCH_OUT_OF_RESOURCES => "CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES",
        LAUNCH_TIMEOUT => "CUDA_ERROR_LAUNCH_TIMEOUT",
        ASSERT => "CUDA_ERROR_ASSERT",
        ILLEGAL_INSTRUCTION => "CUDA_ERROR_ILLEGAL_INSTRUCTION",
        MISALIGNED_ADDRESS => "CUDA_ERROR_MISALIGNED_ADDRESS",
        LAUNCH_FAILED => "CUDA_ERROR_LAUNCH_FAILED",
        NOT_SUPPORTED => "CUDA_ERROR_NOT_SUPPORTED",
        SYSTEM_DRIVER_MISMATCH => "CUDA_ERROR_SYSTEM_DRIVER_MISMATCH",
        UNKNOWN => "CUDA_ERROR_UNKNOWN",
        _ => "unknown",
    }
}

/// Why the runtime rejected a request before (or instead of) handing it to the GPU.
///
/// All of these are [`ErrorClass::InvalidRequest`]: the same request would fail again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum InvalidReason {
    /// The device index is not one the runtime manages.
    #[error("device {device} is out of range (the runtime has {count} devices)")]
    DeviceOutOfRange {
        /// The index asked for.
        device: u32,
        /// How many devices there are.
        count: u32,
    },
    /// A handle of another device was sent to this one.
    #[error("handle belongs to device {handle_device}, not to this device")]
    WrongDevice {
        /// The device the handle belongs to.
        handle_device: u32,
    },
    /// The handle comes from an earlier context of this device (before a restart): the
    /// memory or module behind it is gone.
    #[error("buffer or module lost: handle is from epoch {handle_epoch}, device is at epoch {device_epoch}")]
    BufferLost {
        /// The epoch in the handle.
        handle_epoch: u64,
        /// The device's current epoch.
        device_epoch: u64,
    },
    /// No live buffer has this id (freed already, or never allocated).
    #[error("unknown buffer id {id} (freed or never allocated)")]
    UnknownBuffer {
        /// The buffer id.
        id: u64,
    },
    /// The handle's length does not match the buffer it names (a forged or corrupted handle).
    #[error("handle length {handle_len} does not match buffer {id} of {actual_len} bytes")]
    HandleMismatch {
        /// The buffer id.
        id: u64,
        /// Length in the handle.
        handle_len: u64,
        /// Length of the buffer.
        actual_len: u64,
    },
    /// A byte range does not fit inside a buffer.
    #[error("range [{offset}, {offset}+{len}) is out of bounds of a {buffer_len}-byte buffer")]
    OutOfBounds {
        /// Start of the range.
        offset: u64,
        /// Length of the range.
        len: u64,
        /// Length of the buffer.
        buffer_len: u64,
    },
    /// Source and destination of a device-to-device copy overlap.
    #[error("source and destination ranges overlap")]
    OverlappingCopy,
    /// An allocation of zero bytes.
    #[error("allocation of zero bytes")]
    ZeroSizeAllocation,
    /// An allocation larger than the device's total memory: it can never succeed.
    #[error("allocation of {requested} bytes exceeds the device's total memory of {total} bytes")]
    ExceedsDeviceMemory {
        /// Bytes requested.
        requested: u64,
        /// The device's total memory.
        total: u64,
    },
    /// No loaded module has this id.
    #[error("unknown module id {id}")]
    UnknownModule {
        /// The module id.
        id: u64,
    },
    /// The module has no function of this name.
    #[error("module has no kernel named `{name}`")]
    UnknownKernel {
        /// The name asked for.
        name: String,
    },
    /// The module image could not be understood.
    #[error("bad module image: {reason}")]
    BadModuleImage {
        /// What was wrong with it.
        reason: String,
    },
    /// The kernel arguments do not match the kernel's parameters.
    #[error("bad arguments for kernel `{kernel}`: {reason}")]
    BadArguments {
        /// The kernel.
        kernel: String,
        /// What was wrong.
        reason: String,
    },
    /// The grid or block dimensions are out of range.
    #[error("bad launch configuration: {reason}")]
    BadLaunchConfig {
        /// What was wrong.
        reason: String,
    },
}

/// A failure of one operation on one device.
///
/// `#[non_exhaustive]`: later transports (worker processes) add variants.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, thiserror::Error)]
#[non_exhaustive]
pub enum GpuError {
    /// A GPU API call returned an error code.
    #[error("{op} on device {device}: {api} error {code} ({name}){detail}",
        name = code_name(*api, *code),
        detail = if message.is_empty() { String::new() } else { format!(": {message}") })]
    Api {
        /// The API that failed.
        api: Api,
        /// The raw error code.
        code: i32,
        /// The operation that failed.
        op: OpKind,
        /// The device it ran on.
        device: u32,
        /// Extra context (the call that failed, a driver message); may be empty.
        message: String,
    },
    /// The worker process that owns the device could not be started or spoken to
    /// (process isolation). Class `DeviceLost`: the runtime keeps trying to open it.
    #[error("{op} on device {device}: worker unavailable: {reason}")]
    WorkerUnavailable {
        /// The operation.
        op: OpKind,
        /// The device.
        device: u32,
        /// What went wrong.
        reason: String,
    },
    /// The runtime's own checks rejected the request before the GPU was touched.
    #[error("{op} on device {device}: invalid request: {reason}")]
    Invalid {
        /// The operation rejected.
        op: OpKind,
        /// The device it was sent to.
        device: u32,
        /// Why.
        reason: InvalidReason,
    },
}

impl GpuError {
    /// An API error without extra context.
    pub fn api(api: Api, code: i32, op: OpKind, device: u32) -> Self {
        GpuError::Api {
            api,
            code,
            op,
            device,
            message: String::new(),
        }
    }

    /// An API error with extra context (the call that failed, a driver message).
    pub fn api_with(api: Api, code: i32, op: OpKind, device: u32, message: impl Into<String>) -> Self {
        GpuError::Api {
            api,
            code,
            op,
            device,
            message: message.into(),
        }
    }

    /// A request the runtime's own checks rejected.
    pub fn invalid(op: OpKind, device: u32, reason: InvalidReason) -> Self {
        GpuError::Invalid { op, device, reason }
    }

    /// What the runtime does about this error, decided by `(api, code)` alone.
    pub fn class(&self) -> ErrorClass {
        match self {
            GpuError::Api { api, code, .. } => classify(*api, *code),
            GpuError::Invalid { .. } => ErrorClass::InvalidRequest,
            GpuError::WorkerUnavailable { .. } => ErrorClass::DeviceLost,
        }
    }

    /// `true` when a retry may succeed (the class is [`ErrorClass::Transient`]).
    pub fn is_recoverable(&self) -> bool {
        self.class() == ErrorClass::Transient
    }

    /// `true` when retrying the same request cannot help (every class but `Transient`).
    pub fn is_permanent(&self) -> bool {
        !self.is_recoverable()
    }

    /// `true` for an out-of-memory error (HIP or CUDA code 2), which waits for free memory.
    pub fn is_out_of_memory(&self) -> bool {
        matches!(self, GpuError::Api { code, .. } if *code == hip::OUT_OF_MEMORY)
    }

    /// The operation that failed.
    pub fn op(&self) -> OpKind {
        match self {
            GpuError::Api { op, .. } | GpuError::Invalid { op, .. } | GpuError::WorkerUnavailable { op, .. } => *op,
        }
    }

    /// The device the operation ran on.
    pub fn device(&self) -> u32 {
        match self {
            GpuError::Api { device, .. }
            | GpuError::Invalid { device, .. }
            | GpuError::WorkerUnavailable { device, .. } => *device,
        }
    }

    /// The API and raw code, for API errors.
    pub fn code(&self) -> Option<(Api, i32)> {
        match self {
            GpuError::Api { api, code, .. } => Some((*api, *code)),
            GpuError::Invalid { .. } | GpuError::WorkerUnavailable { .. } => None,
        }
    }

    /// The symbolic name of the code (`hipErrorIllegalAddress`), or the runtime check's kind.
    pub fn code_name(&self) -> &'static str {
        match self {
            GpuError::Api { api, code, .. } => code_name(*api, *code),
            GpuError::Invalid { .. } => "invalid_request",
            GpuError::WorkerUnavailable { .. } => "worker_unavailable",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The table of ARCHITECTURE.md, one row per code.
    const HIP_TABLE: &[(i32, ErrorClass, &str)] = &[
        (2, ErrorClass::Transient, "hipErrorOutOfMemory"),
        (600, ErrorClass::Transient, "hipErrorNotReady"),
        (1, ErrorClass::InvalidRequest, "hipErrorInvalidValue"),
        (9, ErrorClass::InvalidRequest, "hipErrorInvalidConfiguration"),
        (17, ErrorClass::InvalidRequest, "hipErrorInvalidDevicePointer"),
        (21, ErrorClass::InvalidRequest, "hipErrorInvalidMemcpyDirection"),
        (98, ErrorClass::InvalidRequest, "hipErrorInvalidDeviceFunction"),
        (101, ErrorClass::InvalidRequest, "hipErrorInvalidDevice"),
        (200, ErrorClass::InvalidRequest, "hipErrorInvalidImage"),
        (209, ErrorClass::InvalidRequest, "hipErrorNoBinaryForGpu"),
        (218, ErrorClass::InvalidRequest, "hipErrorInvalidKernelFile"),
        (301, ErrorClass::InvalidRequest, "hipErrorFileNotFound"),
        (400, ErrorClass::InvalidRequest, "hipErrorInvalidHandle"),
        (500, ErrorClass::InvalidRequest, "hipErrorNotFound"),
        (701, ErrorClass::InvalidRequest, "hipErrorLaunchOutOfResources"),
        (801, ErrorClass::InvalidRequest, "hipErrorNotSupported"),
        (700, ErrorClass::Sticky, "hipErrorIllegalAddress"),
        (702, ErrorClass::Sticky, "hipErrorLaunchTimeOut"),
        (710, ErrorClass::Sticky, "hipErrorAssert"),
        (719, ErrorClass::Sticky, "hipErrorLaunchFailure"),
        (53, ErrorClass::Sticky, "hipErrorPriorLaunchFailure"),
        (214, ErrorClass::Sticky, "hipErrorECCNotCorrectable"),
        (100, ErrorClass::DeviceLost, "hipErrorNoDevice"),
        (3, ErrorClass::DeviceLost, "hipErrorNotInitialized"),
        (4, ErrorClass::DeviceLost, "hipErrorDeinitialized"),
        (35, ErrorClass::DeviceLost, "hipErrorInsufficientDriver"),
    ];

    const CUDA_TABLE: &[(i32, ErrorClass, &str)] = &[
        (2, ErrorClass::Transient, "CUDA_ERROR_OUT_OF_MEMORY"),
        (600, ErrorClass::Transient, "CUDA_ERROR_NOT_READY"),
        (1, ErrorClass::InvalidRequest, "CUDA_ERROR_INVALID_VALUE"),
        (101, ErrorClass::InvalidRequest, "CUDA_ERROR_INVALID_DEVICE"),
        (200, ErrorClass::InvalidRequest, "CUDA_ERROR_INVALID_IMAGE"),
        (209, ErrorClass::InvalidRequest, "CUDA_ERROR_NO_BINARY_FOR_GPU"),
        (218, ErrorClass::InvalidRequest, "CUDA_ERROR_INVALID_PTX"),
        (222, ErrorClass::InvalidRequest, "CUDA_ERROR_UNSUPPORTED_PTX_VERSION"),
        (301, ErrorClass::InvalidRequest, "CUDA_ERROR_FILE_NOT_FOUND"),
        (400, ErrorClass::InvalidRequest, "CUDA_ERROR_INVALID_HANDLE"),
        (500, ErrorClass::InvalidRequest, "CUDA_ERROR_NOT_FOUND"),
        (701, ErrorClass::InvalidRequest, "CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES"),
        (801, ErrorClass::InvalidRequest, "CUDA_ERROR_NOT_SUPPORTED"),
        (700, ErrorClass::Sticky, "CUDA_ERROR_ILLEGAL_ADDRESS"),
        (702, ErrorClass::Sticky, "CUDA_ERROR_LAUNCH_TIMEOUT"),
        (710, ErrorClass::Sticky, "CUDA_ERROR_ASSERT"),
        (715, ErrorClass::Sticky, "CUDA_ERROR_ILLEGAL_INSTRUCTION"),
        (716, ErrorClass::Sticky, "CUDA_ERROR_MISALIGNED_ADDRESS"),
        (719, ErrorClass::Sticky, "CUDA_ERROR_LAUNCH_FAILED"),
        (214, ErrorClass::Sticky, "CUDA_ERROR_ECC_UNCORRECTABLE"),
        (999, ErrorClass::Sticky, "CUDA_ERROR_UNKNOWN"),
        (100, ErrorClass::DeviceLost, "CUDA_ERROR_NO_DEVICE"),
        (3, ErrorClass::DeviceLost, "CUDA_ERROR_NOT_INITIALIZED"),
        (4, ErrorClass::DeviceLost, "CUDA_ERROR_DEINITIALIZED"),
        (34, ErrorClass::DeviceLost, "CUDA_ERROR_STUB_LIBRARY"),
        (46, ErrorClass::DeviceLost, "CUDA_ERROR_DEVICE_UNAVAILABLE"),
        (803, ErrorClass::DeviceLost, "CUDA_ERROR_SYSTEM_DRIVER_MISMATCH"),
    ];

    #[test]
    fn every_hip_code_of_the_table_has_its_class_and_name() {
        for &(code, class, name) in HIP_TABLE {
            assert_eq!(classify(Api::Hip, code), class, "HIP code {code}");
            assert_eq!(classify(Api::Sim, code), class, "simulator code {code}");
            assert_eq!(code_name(Api::Hip, code), name, "HIP code {code}");
        }
    }

    #[test]
    fn every_cuda_code_of_the_table_has_its_class_and_name() {
        for &(code, class, name) in CUDA_TABLE {
            assert_eq!(classify(Api::CudaDriver, code), class, "CUDA code {code}");
            assert_eq!(code_name(Api::CudaDriver, code), name, "CUDA code {code}");
        }
    }

    #[test]
    fn unknown_codes_are_sticky() {
        for code in [-1, 5, 12345, i32::MAX, i32::MIN] {
            assert_eq!(classify(Api::Hip, code), ErrorClass::Sticky);
            assert_eq!(classify(Api::CudaDriver, code), ErrorClass::Sticky);
            assert_eq!(code_name(Api::Hip, code), "unknown");
        }
    }

    #[test]
    fn the_same_number_can_mean_different_things_in_different_apis() {
        // 46 is "devices unavailable" in CUDA, unlisted (so sticky) in HIP.
        assert_eq!(classify(Api::CudaDriver, 46), ErrorClass::DeviceLost);
        assert_eq!(classify(Api::Hip, 46), ErrorClass::Sticky);
    }

    #[test]
    fn class_depends_on_code_not_on_operation() {
        for op in OpKind::ALL {
            let e = GpuError::api(Api::Hip, hip::OUT_OF_MEMORY, op, 0);
            assert_eq!(e.class(), ErrorClass::Transient);
            let e = GpuError::api(Api::Hip, hip::ILLEGAL_ADDRESS, op, 0);
            assert_eq!(e.class(), ErrorClass::Sticky);
        }
    }

    #[test]
    fn recoverable_classification_of_the_original_design() {
        let oom = GpuError::api(Api::Hip, hip::OUT_OF_MEMORY, OpKind::Alloc, 0);
        assert!(oom.is_recoverable() && !oom.is_permanent());
        assert!(oom.is_out_of_memory());
        let invalid = GpuError::invalid(
            OpKind::CopyToDevice,
            1,
            InvalidReason::OutOfBounds {
                offset: 8,
                len: 8,
                buffer_len: 8,
            },
        );
        assert!(!invalid.is_recoverable() && invalid.is_permanent());
        assert_eq!(invalid.class(), ErrorClass::InvalidRequest);
        let sticky = GpuError::api(Api::CudaDriver, cuda::LAUNCH_FAILED, OpKind::Synchronize, 0);
        assert!(sticky.is_permanent());
        let lost = GpuError::api(Api::Hip, hip::NO_DEVICE, OpKind::MemInfo, 0);
        assert!(lost.is_permanent());
    }

    #[test]
    fn display_names_what_happened() {
        let e = GpuError::api_with(Api::Hip, 700, OpKind::Synchronize, 2, "hipDeviceSynchronize");
        let text = e.to_string();
        assert!(text.contains("synchronize"), "{text}");
        assert!(text.contains("device 2"), "{text}");
        assert!(text.contains("700"), "{text}");
        assert!(text.contains("hipErrorIllegalAddress"), "{text}");
        let e = GpuError::invalid(
            OpKind::CopyFromDevice,
            0,
            InvalidReason::OutOfBounds {
                offset: 4,
                len: 8,
                buffer_len: 8,
            },
        );
        assert!(e.to_string().contains("out of bounds"), "{e}");
    }

    #[test]
    fn errors_round_trip_through_serde() {
        let e = GpuError::invalid(OpKind::Launch, 3, InvalidReason::UnknownKernel { name: "nope".into() });
        let text = toml::to_string(&Wrapper { e: e.clone() }).unwrap();
        let back: Wrapper = toml::from_str(&text).unwrap();
        assert_eq!(back.e, e);
    }

    #[derive(Serialize, Deserialize)]
    struct Wrapper {
        e: GpuError,
    }
}
