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
//! treated as one that may have poisoned the context (the safe side). Such a code is written to
//! stderr once per run (with its API, number and the call that returned it) when a
//! [`GpuError`] is made from it — or, in process isolation, by the host when it receives the
//! error from a worker, since workers write none; codes that mean a threading bug in hipvisor
//! (a thread without a valid context) are written every time ([`note_api_code`]).

use serde::{Deserialize, Serialize};
use std::fmt;

use crate::op::kind::OpKind;

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

/// HIP error codes the runtime gives a meaning to (values of `hipError_t`, checked against the
/// headers of ROCm 5.2 — Debian's — and ROCm 6 and 7; the names are the same in all three, ROCm 6
/// added 911 and 912, ROCm 7 added 1054).
///
/// Each constant says its class and why, from AMD's description of the code (the header's
/// comments and the HIP documentation) and from what the runtime does with the API. Codes of
/// APIs the runtime never calls and that name no failure of the device (profiler 5–8, arrays
/// and mapping 205–213) are left out: they stay `Sticky`, and are logged if they ever appear.
pub mod hip {
    /// `hipErrorInvalidValue` — InvalidRequest: an argument out of range; the same call fails
    /// again, and nothing on the device changed.
    pub const INVALID_VALUE: i32 = 1;
    /// `hipErrorOutOfMemory` — Transient: the device had no room now; the same request may fit
    /// once memory is freed (measured: not sticky).
    pub const OUT_OF_MEMORY: i32 = 2;
    /// `hipErrorNotInitialized` — DeviceLost: the runtime could not initialise (no driver, no
    /// `/dev/kfd` access); a fresh process may find it later.
    pub const NOT_INITIALIZED: i32 = 3;
    /// `hipErrorDeinitialized` — DeviceLost: the runtime is shutting down.
    pub const DEINITIALIZED: i32 = 4;
    /// `hipErrorInvalidConfiguration` — InvalidRequest: bad launch dimensions.
    pub const INVALID_CONFIGURATION: i32 = 9;
    /// `hipErrorInvalidPitchValue` — InvalidRequest: a pitched copy's pitch is out of range.
    pub const INVALID_PITCH_VALUE: i32 = 12;
    /// `hipErrorInvalidSymbol` — InvalidRequest: no such device symbol.
    pub const INVALID_SYMBOL: i32 = 13;
    /// `hipErrorInvalidDevicePointer` — InvalidRequest: not a device pointer of this context.
    pub const INVALID_DEVICE_POINTER: i32 = 17;
    /// `hipErrorInvalidMemcpyDirection` — InvalidRequest.
    pub const INVALID_MEMCPY_DIRECTION: i32 = 21;
    /// `hipErrorInsufficientDriver` — DeviceLost: the kernel driver is older than the runtime;
    /// no request on this machine can succeed until it is updated.
    pub const INSUFFICIENT_DRIVER: i32 = 35;
    /// `hipErrorMissingConfiguration` — InvalidRequest: a launch without its configuration.
    pub const MISSING_CONFIGURATION: i32 = 52;
    /// `hipErrorPriorLaunchFailure` — Sticky: an earlier kernel failed; the context is poisoned.
    pub const PRIOR_LAUNCH_FAILURE: i32 = 53;
    /// `hipErrorInvalidDeviceFunction` — InvalidRequest: no such kernel for this device.
    pub const INVALID_DEVICE_FUNCTION: i32 = 98;
    /// `hipErrorNoDevice` — DeviceLost: no GPU is visible.
    pub const NO_DEVICE: i32 = 100;
    /// `hipErrorInvalidDevice` — InvalidRequest: a device ordinal out of range.
    pub const INVALID_DEVICE: i32 = 101;
    /// `hipErrorInvalidImage` — InvalidRequest: the module image is malformed.
    pub const INVALID_IMAGE: i32 = 200;
    /// `hipErrorInvalidContext` — Sticky, and logged: no valid context on the calling thread.
    /// The runtime binds each device to its executor thread, so this means a threading bug in
    /// hipvisor; a new context (process) is the only repair.
    pub const INVALID_CONTEXT: i32 = 201;
    /// `hipErrorContextAlreadyCurrent` — InvalidRequest: the context passed to a context-stack
    /// call is already the current one (CUDA deprecated its 202 for this). hipvisor makes no
    /// context-stack calls; if one ever answers it, the context is unharmed and the same
    /// call fails again.
    pub const CONTEXT_ALREADY_CURRENT: i32 = 202;
    /// `hipErrorNoBinaryForGpu` — InvalidRequest: the image has no code for this GPU's
    /// architecture. For the built-in kernels the HIP backend then compiles them with hiprtc.
    pub const NO_BINARY_FOR_GPU: i32 = 209;
    /// `hipErrorECCNotCorrectable` — Sticky: an uncorrectable memory error hit the context's
    /// data; a new process re-checks the device (and a failing health probe takes it out).
    pub const ECC_NOT_CORRECTABLE: i32 = 214;
    /// `hipErrorUnsupportedLimit` — InvalidRequest: a device limit this GPU does not have.
    pub const UNSUPPORTED_LIMIT: i32 = 215;
    /// `hipErrorContextAlreadyInUse` — Sticky, and logged: a context is bound elsewhere (ROCm
    /// returns it from `hipDevicePrimaryCtxSetFlags` on an active primary context, which
    /// hipvisor never calls); like CUDA's 216, a threading or lifetime bug in hipvisor, and a
    /// new context (process) is the repair.
    pub const CONTEXT_ALREADY_IN_USE: i32 = 216;
    /// `hipErrorPeerAccessUnsupported` — InvalidRequest: no peer access between these GPUs.
    pub const PEER_ACCESS_UNSUPPORTED: i32 = 217;
    /// `hipErrorInvalidKernelFile` — InvalidRequest: a malformed kernel file (CUDA's "invalid
    /// PTX").
    pub const INVALID_KERNEL_FILE: i32 = 218;
    /// `hipErrorInvalidGraphicsContext` — InvalidRequest: a graphics-interop context is wrong.
    pub const INVALID_GRAPHICS_CONTEXT: i32 = 219;
    /// `hipErrorInvalidSource` — InvalidRequest: kernel source that does not compile.
    pub const INVALID_SOURCE: i32 = 300;
    /// `hipErrorFileNotFound` — InvalidRequest.
    pub const FILE_NOT_FOUND: i32 = 301;
    /// `hipErrorSharedObjectSymbolNotFound` — InvalidRequest: a code object refers to a symbol
    /// nothing defines.
    pub const SHARED_OBJECT_SYMBOL_NOT_FOUND: i32 = 302;
    /// `hipErrorSharedObjectInitFailed` — InvalidRequest: a code object's initialisation
    /// failed; loading it again fails again.
    pub const SHARED_OBJECT_INIT_FAILED: i32 = 303;
    /// `hipErrorOperatingSystem` — Sticky: an operating-system call inside the runtime failed,
    /// and the runtime does not say in what state it left the context.
    pub const OPERATING_SYSTEM: i32 = 304;
    /// `hipErrorInvalidHandle` (`hipErrorInvalidResourceHandle`) — InvalidRequest.
    pub const INVALID_HANDLE: i32 = 400;
    /// `hipErrorIllegalState` — InvalidRequest: a resource is not in the state the call needs.
    pub const ILLEGAL_STATE: i32 = 401;
    /// `hipErrorNotFound` — InvalidRequest: e.g. a kernel name not in the module.
    pub const NOT_FOUND: i32 = 500;
    /// `hipErrorNotReady` — Transient: earlier work has not finished (poll again).
    pub const NOT_READY: i32 = 600;
    /// `hipErrorIllegalAddress` — Sticky: a kernel accessed memory it may not; after it every
    /// call in the process fails (hip-tests' page-fault test).
    pub const ILLEGAL_ADDRESS: i32 = 700;
    /// `hipErrorLaunchOutOfResources` — InvalidRequest: the launch asks for more registers,
    /// shared memory or threads than the GPU has; the same launch fails again.
    pub const LAUNCH_OUT_OF_RESOURCES: i32 = 701;
    /// `hipErrorLaunchTimeOut` — Sticky: a kernel was killed by the watchdog.
    pub const LAUNCH_TIME_OUT: i32 = 702;
    /// `hipErrorPeerAccessAlreadyEnabled` — InvalidRequest.
    pub const PEER_ACCESS_ALREADY_ENABLED: i32 = 704;
    /// `hipErrorPeerAccessNotEnabled` — InvalidRequest.
    pub const PEER_ACCESS_NOT_ENABLED: i32 = 705;
    /// `hipErrorSetOnActiveProcess` — InvalidRequest: device flags set after the device is in
    /// use.
    pub const SET_ON_ACTIVE_PROCESS: i32 = 708;
    /// `hipErrorContextIsDestroyed` — Sticky, and logged: the calling thread's context was
    /// destroyed; like 201, a threading or lifetime bug in hipvisor.
    pub const CONTEXT_IS_DESTROYED: i32 = 709;
    /// `hipErrorAssert` — Sticky: a kernel's `assert` failed; the context is unusable.
    pub const ASSERT: i32 = 710;
    /// `hipErrorHostMemoryAlreadyRegistered` — InvalidRequest.
    pub const HOST_MEMORY_ALREADY_REGISTERED: i32 = 712;
    /// `hipErrorHostMemoryNotRegistered` — InvalidRequest.
    pub const HOST_MEMORY_NOT_REGISTERED: i32 = 713;
    /// `hipErrorLaunchFailure` — Sticky: an exception on the device while a kernel ran.
    pub const LAUNCH_FAILURE: i32 = 719;
    /// `hipErrorCooperativeLaunchTooLarge` — InvalidRequest: more blocks than a cooperative
    /// launch can hold.
    pub const COOPERATIVE_LAUNCH_TOO_LARGE: i32 = 720;
    /// `hipErrorNotSupported` — InvalidRequest: the API or feature is not available here.
    pub const NOT_SUPPORTED: i32 = 801;
    /// `hipErrorStreamCaptureUnsupported` (first of 900–908, the stream-capture misuses) —
    /// InvalidRequest: an operation not allowed while a stream captures.
    pub const STREAM_CAPTURE_UNSUPPORTED: i32 = 900;
    /// `hipErrorStreamCaptureInvalidated` — InvalidRequest (the capture, not the context, is
    /// invalid).
    pub const STREAM_CAPTURE_INVALIDATED: i32 = 901;
    /// `hipErrorStreamCaptureMerge` — InvalidRequest.
    pub const STREAM_CAPTURE_MERGE: i32 = 902;
    /// `hipErrorStreamCaptureUnmatched` — InvalidRequest.
    pub const STREAM_CAPTURE_UNMATCHED: i32 = 903;
    /// `hipErrorStreamCaptureUnjoined` — InvalidRequest.
    pub const STREAM_CAPTURE_UNJOINED: i32 = 904;
    /// `hipErrorStreamCaptureIsolation` — InvalidRequest.
    pub const STREAM_CAPTURE_ISOLATION: i32 = 905;
    /// `hipErrorStreamCaptureImplicit` — InvalidRequest.
    pub const STREAM_CAPTURE_IMPLICIT: i32 = 906;
    /// `hipErrorCapturedEvent` — InvalidRequest.
    pub const CAPTURED_EVENT: i32 = 907;
    /// `hipErrorStreamCaptureWrongThread` — InvalidRequest.
    pub const STREAM_CAPTURE_WRONG_THREAD: i32 = 908;
    /// `hipErrorGraphExecUpdateFailure` — InvalidRequest: a graph update that breaks the
    /// instantiated graph's constraints.
    pub const GRAPH_EXEC_UPDATE_FAILURE: i32 = 910;
    /// `hipErrorInvalidChannelDescriptor` (ROCm 6) — InvalidRequest.
    pub const INVALID_CHANNEL_DESCRIPTOR: i32 = 911;
    /// `hipErrorInvalidTexture` (ROCm 6) — InvalidRequest.
    pub const INVALID_TEXTURE: i32 = 912;
    /// `hipErrorUnknown` — Sticky: the runtime does not know what happened (the safe side).
    pub const UNKNOWN: i32 = 999;
    /// `hipErrorRuntimeMemory` — Sticky: an HSA memory call failed inside the runtime ("not
    /// seen in production"); the context's state is unknown.
    pub const RUNTIME_MEMORY: i32 = 1052;
    /// `hipErrorRuntimeOther` — Sticky: another HSA call failed inside the runtime.
    pub const RUNTIME_OTHER: i32 = 1053;
    /// `hipErrorInvalidClusterSize` (ROCm 7; 1054 was the never-returned `hipErrorTbd` marker
    /// before) — InvalidRequest: a launch's cluster dimensions are wrong.
    pub const INVALID_CLUSTER_SIZE: i32 = 1054;
}

/// CUDA driver codes the runtime gives a meaning to (values of `CUresult`, as cudarc 0.19's
/// `sys::CUresult` lists them for CUDA 13).
///
/// Each constant says its class and why, from NVIDIA's description of the code (the
/// `CUresult` documentation). Profiler codes (5–8), array and mapping codes (205–213) and the
/// codes whose documentation does not say what state they leave (227, 721, 917–919) are left
/// out: they stay `Sticky`, and are logged if they ever appear.
pub mod cuda {
    /// `CUDA_ERROR_INVALID_VALUE` — InvalidRequest: a parameter out of range.
    pub const INVALID_VALUE: i32 = 1;
    /// `CUDA_ERROR_OUT_OF_MEMORY` — Transient: not enough memory now (measured on an H200:
    /// the next allocation works).
    pub const OUT_OF_MEMORY: i32 = 2;
    /// `CUDA_ERROR_NOT_INITIALIZED` — DeviceLost: `cuInit` was not called or failed.
    pub const NOT_INITIALIZED: i32 = 3;
    /// `CUDA_ERROR_DEINITIALIZED` — DeviceLost: the driver is shutting down.
    pub const DEINITIALIZED: i32 = 4;
    /// `CUDA_ERROR_STUB_LIBRARY` — DeviceLost: the driver found is a stub, there is no real
    /// driver.
    pub const STUB_LIBRARY: i32 = 34;
    /// `CUDA_ERROR_CALL_REQUIRES_NEWER_DRIVER` — InvalidRequest: this call needs a newer driver;
    /// the device itself is fine and other calls work.
    pub const CALL_REQUIRES_NEWER_DRIVER: i32 = 36;
    /// `CUDA_ERROR_DEVICE_UNAVAILABLE` ("devices unavailable") — DeviceLost: the device is
    /// exclusive to another process or prohibited; seen for seconds after a device reset.
    pub const DEVICE_UNAVAILABLE: i32 = 46;
    /// `CUDA_ERROR_NO_DEVICE` — DeviceLost: the driver sees no CUDA device.
    pub const NO_DEVICE: i32 = 100;
    /// `CUDA_ERROR_INVALID_DEVICE` — InvalidRequest: a device ordinal out of range.
    pub const INVALID_DEVICE: i32 = 101;
    /// `CUDA_ERROR_DEVICE_NOT_LICENSED` — DeviceLost: the device has no valid (vGPU/GRID)
    /// licence; route elsewhere and probe until it is licensed.
    pub const DEVICE_NOT_LICENSED: i32 = 102;
    /// `CUDA_ERROR_INVALID_IMAGE` — InvalidRequest: a malformed module image.
    pub const INVALID_IMAGE: i32 = 200;
    /// `CUDA_ERROR_INVALID_CONTEXT` — Sticky, and logged: no context is current on the calling
    /// thread, or it was destroyed. The runtime binds each context to its executor thread, so
    /// this is a threading bug in hipvisor; a new context (process) is the repair.
    pub const INVALID_CONTEXT: i32 = 201;
    /// `CUDA_ERROR_NO_BINARY_FOR_GPU` — InvalidRequest: no code for this GPU in the image.
    pub const NO_BINARY_FOR_GPU: i32 = 209;
    /// `CUDA_ERROR_ECC_UNCORRECTABLE` — Sticky: an uncorrectable ECC error during execution.
    pub const ECC_UNCORRECTABLE: i32 = 214;
    /// `CUDA_ERROR_UNSUPPORTED_LIMIT` — InvalidRequest: a limit this device does not support.
    pub const UNSUPPORTED_LIMIT: i32 = 215;
    /// `CUDA_ERROR_CONTEXT_ALREADY_IN_USE` — Sticky, and logged: the context is bound to
    /// another CPU thread; like 201, a threading bug in hipvisor.
    pub const CONTEXT_ALREADY_IN_USE: i32 = 216;
    /// `CUDA_ERROR_PEER_ACCESS_UNSUPPORTED` — InvalidRequest: P2P is not supported between
    /// these devices.
    pub const PEER_ACCESS_UNSUPPORTED: i32 = 217;
    /// `CUDA_ERROR_INVALID_PTX` (HIP's 218 "invalid kernel file") — InvalidRequest.
    pub const INVALID_PTX: i32 = 218;
    /// `CUDA_ERROR_INVALID_GRAPHICS_CONTEXT` — InvalidRequest: an invalid OpenGL/DirectX
    /// context.
    pub const INVALID_GRAPHICS_CONTEXT: i32 = 219;
    /// `CUDA_ERROR_NVLINK_UNCORRECTABLE` — Sticky: an uncorrectable NVLink error during
    /// execution, like an uncorrectable ECC error; a new process re-checks the device.
    pub const NVLINK_UNCORRECTABLE: i32 = 220;
    /// `CUDA_ERROR_JIT_COMPILER_NOT_FOUND` — InvalidRequest: the PTX JIT compiler library
    /// (`libnvidia-ptxjitcompiler`) is missing, common in containers; PTX cannot load here,
    /// cubin still can.
    pub const JIT_COMPILER_NOT_FOUND: i32 = 221;
    /// `CUDA_ERROR_UNSUPPORTED_PTX_VERSION` — InvalidRequest: PTX newer than the driver's JIT.
    pub const UNSUPPORTED_PTX_VERSION: i32 = 222;
    /// `CUDA_ERROR_JIT_COMPILATION_DISABLED` — InvalidRequest: PTX JIT compilation is disabled
    /// (`CUDA_DISABLE_PTX_JIT`); PTX cannot load here.
    pub const JIT_COMPILATION_DISABLED: i32 = 223;
    /// `CUDA_ERROR_UNSUPPORTED_EXEC_AFFINITY` — InvalidRequest: the execution affinity asked
    /// for is not supported by the device.
    pub const UNSUPPORTED_EXEC_AFFINITY: i32 = 224;
    /// `CUDA_ERROR_UNSUPPORTED_DEVSIDE_SYNC` — InvalidRequest: the PTX calls
    /// `cudaDeviceSynchronize` from the device, which this driver does not support.
    pub const UNSUPPORTED_DEVSIDE_SYNC: i32 = 225;
    /// `CUDA_ERROR_CONTAINED` — Sticky: a device exception contained by the GPU; NVIDIA: the
    /// process must be terminated and relaunched.
    pub const CONTAINED: i32 = 226;
    /// `CUDA_ERROR_INVALID_SOURCE` — InvalidRequest: device code that does not compile or link.
    pub const INVALID_SOURCE: i32 = 300;
    /// `CUDA_ERROR_FILE_NOT_FOUND` — InvalidRequest.
    pub const FILE_NOT_FOUND: i32 = 301;
    /// `CUDA_ERROR_SHARED_OBJECT_SYMBOL_NOT_FOUND` — InvalidRequest: a module refers to a
    /// symbol nothing defines.
    pub const SHARED_OBJECT_SYMBOL_NOT_FOUND: i32 = 302;
    /// `CUDA_ERROR_SHARED_OBJECT_INIT_FAILED` — InvalidRequest: a module's initialisation
    /// failed; loading it again fails again.
    pub const SHARED_OBJECT_INIT_FAILED: i32 = 303;
    /// `CUDA_ERROR_OPERATING_SYSTEM` — Sticky: an OS call inside the driver failed; the driver
    /// does not say in what state it left the context.
    pub const OPERATING_SYSTEM: i32 = 304;
    /// `CUDA_ERROR_INVALID_HANDLE` — InvalidRequest.
    pub const INVALID_HANDLE: i32 = 400;
    /// `CUDA_ERROR_ILLEGAL_STATE` — InvalidRequest: a resource is not in the state the call
    /// needs.
    pub const ILLEGAL_STATE: i32 = 401;
    /// `CUDA_ERROR_LOSSY_QUERY` — InvalidRequest: an introspection that would lose
    /// information.
    pub const LOSSY_QUERY: i32 = 402;
    /// `CUDA_ERROR_NOT_FOUND` (also: a function name not in the module) — InvalidRequest.
    pub const NOT_FOUND: i32 = 500;
    /// `CUDA_ERROR_NOT_READY` — Transient: earlier work has not finished (poll again).
    pub const NOT_READY: i32 = 600;
    /// `CUDA_ERROR_ILLEGAL_ADDRESS` — Sticky: measured on an H200, every later call fails.
    pub const ILLEGAL_ADDRESS: i32 = 700;
    /// `CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES` — InvalidRequest: the launch asks for more than the
    /// GPU has; the same launch fails again.
    pub const LAUNCH_OUT_OF_RESOURCES: i32 = 701;
    /// `CUDA_ERROR_LAUNCH_TIMEOUT` — Sticky: the watchdog killed a kernel; NVIDIA: the context
    /// cannot be used.
    pub const LAUNCH_TIMEOUT: i32 = 702;
    /// `CUDA_ERROR_LAUNCH_INCOMPATIBLE_TEXTURING` — InvalidRequest.
    pub const LAUNCH_INCOMPATIBLE_TEXTURING: i32 = 703;
    /// `CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED` — InvalidRequest.
    pub const PEER_ACCESS_ALREADY_ENABLED: i32 = 704;
    /// `CUDA_ERROR_PEER_ACCESS_NOT_ENABLED` — InvalidRequest.
    pub const PEER_ACCESS_NOT_ENABLED: i32 = 705;
    /// `CUDA_ERROR_PRIMARY_CONTEXT_ACTIVE` — InvalidRequest: flags set on a primary context
    /// that is already active.
    pub const PRIMARY_CONTEXT_ACTIVE: i32 = 708;
    /// `CUDA_ERROR_CONTEXT_IS_DESTROYED` — Sticky, and logged: the current context was
    /// destroyed (or a primary context not yet initialised); a lifetime or threading bug in
    /// hipvisor.
    pub const CONTEXT_IS_DESTROYED: i32 = 709;
    /// `CUDA_ERROR_ASSERT` — Sticky: a device-side assert failed; NVIDIA: the context cannot
    /// be used anymore.
    pub const ASSERT: i32 = 710;
    /// `CUDA_ERROR_TOO_MANY_PEERS` — InvalidRequest.
    pub const TOO_MANY_PEERS: i32 = 711;
    /// `CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED` — InvalidRequest.
    pub const HOST_MEMORY_ALREADY_REGISTERED: i32 = 712;
    /// `CUDA_ERROR_HOST_MEMORY_NOT_REGISTERED` — InvalidRequest.
    pub const HOST_MEMORY_NOT_REGISTERED: i32 = 713;
    /// `CUDA_ERROR_HARDWARE_STACK_ERROR` — Sticky: a kernel's call stack overflowed or was
    /// corrupted; the process is in an inconsistent state.
    pub const HARDWARE_STACK_ERROR: i32 = 714;
    /// `CUDA_ERROR_ILLEGAL_INSTRUCTION` — Sticky.
    pub const ILLEGAL_INSTRUCTION: i32 = 715;
    /// `CUDA_ERROR_MISALIGNED_ADDRESS` — Sticky.
    pub const MISALIGNED_ADDRESS: i32 = 716;
    /// `CUDA_ERROR_INVALID_ADDRESS_SPACE` — Sticky: a kernel used an address in the wrong
    /// space; NVIDIA: the process is left in an inconsistent state.
    pub const INVALID_ADDRESS_SPACE: i32 = 717;
    /// `CUDA_ERROR_INVALID_PC` — Sticky: the program counter left the code; same as above.
    pub const INVALID_PC: i32 = 718;
    /// `CUDA_ERROR_LAUNCH_FAILED` — Sticky: an exception while a kernel ran.
    pub const LAUNCH_FAILED: i32 = 719;
    /// `CUDA_ERROR_COOPERATIVE_LAUNCH_TOO_LARGE` — InvalidRequest: more blocks than a
    /// cooperative launch can hold.
    pub const COOPERATIVE_LAUNCH_TOO_LARGE: i32 = 720;
    /// `CUDA_ERROR_NOT_PERMITTED` — InvalidRequest: the operation is not permitted.
    pub const NOT_PERMITTED: i32 = 800;
    /// `CUDA_ERROR_NOT_SUPPORTED` — InvalidRequest: not supported on this system or device.
    pub const NOT_SUPPORTED: i32 = 801;
    /// `CUDA_ERROR_SYSTEM_NOT_READY` — DeviceLost: the system cannot start CUDA work yet (on
    /// NVSwitch systems: the fabric manager is not running); probe until it is.
    pub const SYSTEM_NOT_READY: i32 = 802;
    /// `CUDA_ERROR_SYSTEM_DRIVER_MISMATCH` (HIP's 35 "insufficient driver") — DeviceLost: the
    /// driver and the kernel module differ in version.
    pub const SYSTEM_DRIVER_MISMATCH: i32 = 803;
    /// `CUDA_ERROR_COMPAT_NOT_SUPPORTED_ON_DEVICE` — DeviceLost: the forward-compatibility
    /// driver installed does not support this GPU; no request can run on it as configured.
    pub const COMPAT_NOT_SUPPORTED_ON_DEVICE: i32 = 804;
    /// `CUDA_ERROR_MPS_CONNECTION_FAILED` — DeviceLost: the MPS daemon or server is
    /// unreachable; route elsewhere and probe.
    pub const MPS_CONNECTION_FAILED: i32 = 805;
    /// `CUDA_ERROR_MPS_RPC_FAILURE` — DeviceLost: a call between MPS client and server failed.
    pub const MPS_RPC_FAILURE: i32 = 806;
    /// `CUDA_ERROR_MPS_SERVER_NOT_READY` — DeviceLost: the MPS server is recovering.
    pub const MPS_SERVER_NOT_READY: i32 = 807;
    /// `CUDA_ERROR_MPS_MAX_CLIENTS_REACHED` — DeviceLost: MPS has no room for another client
    /// (a context could not be created); probe until it has.
    pub const MPS_MAX_CLIENTS_REACHED: i32 = 808;
    /// `CUDA_ERROR_MPS_MAX_CONNECTIONS_REACHED` — DeviceLost: as 808, for connections.
    pub const MPS_MAX_CONNECTIONS_REACHED: i32 = 809;
    /// `CUDA_ERROR_MPS_CLIENT_TERMINATED` — Sticky: the MPS server terminated this client;
    /// NVIDIA: the process must be relaunched.
    pub const MPS_CLIENT_TERMINATED: i32 = 810;
    /// `CUDA_ERROR_CDP_NOT_SUPPORTED` — InvalidRequest: the module uses dynamic parallelism,
    /// which this device or driver does not support.
    pub const CDP_NOT_SUPPORTED: i32 = 811;
    /// `CUDA_ERROR_CDP_VERSION_MISMATCH` — InvalidRequest: mixed dynamic-parallelism versions.
    pub const CDP_VERSION_MISMATCH: i32 = 812;
    /// `CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED` (first of 900–908, the stream-capture misuses)
    /// — InvalidRequest.
    pub const STREAM_CAPTURE_UNSUPPORTED: i32 = 900;
    /// `CUDA_ERROR_STREAM_CAPTURE_INVALIDATED` — InvalidRequest (the capture is invalid, not
    /// the context).
    pub const STREAM_CAPTURE_INVALIDATED: i32 = 901;
    /// `CUDA_ERROR_STREAM_CAPTURE_MERGE` — InvalidRequest.
    pub const STREAM_CAPTURE_MERGE: i32 = 902;
    /// `CUDA_ERROR_STREAM_CAPTURE_UNMATCHED` — InvalidRequest.
    pub const STREAM_CAPTURE_UNMATCHED: i32 = 903;
    /// `CUDA_ERROR_STREAM_CAPTURE_UNJOINED` — InvalidRequest.
    pub const STREAM_CAPTURE_UNJOINED: i32 = 904;
    /// `CUDA_ERROR_STREAM_CAPTURE_ISOLATION` — InvalidRequest.
    pub const STREAM_CAPTURE_ISOLATION: i32 = 905;
    /// `CUDA_ERROR_STREAM_CAPTURE_IMPLICIT` — InvalidRequest.
    pub const STREAM_CAPTURE_IMPLICIT: i32 = 906;
    /// `CUDA_ERROR_CAPTURED_EVENT` — InvalidRequest.
    pub const CAPTURED_EVENT: i32 = 907;
    /// `CUDA_ERROR_STREAM_CAPTURE_WRONG_THREAD` — InvalidRequest.
    pub const STREAM_CAPTURE_WRONG_THREAD: i32 = 908;
    /// `CUDA_ERROR_TIMEOUT` — Transient: a wait timed out; the work may still finish.
    pub const TIMEOUT: i32 = 909;
    /// `CUDA_ERROR_GRAPH_EXEC_UPDATE_FAILURE` — InvalidRequest.
    pub const GRAPH_EXEC_UPDATE_FAILURE: i32 = 910;
    /// `CUDA_ERROR_EXTERNAL_DEVICE` — Sticky: an asynchronous error in a device outside CUDA
    /// (e.g. over GPUDirect); NVIDIA: the process must be relaunched.
    pub const EXTERNAL_DEVICE: i32 = 911;
    /// `CUDA_ERROR_INVALID_CLUSTER_SIZE` — InvalidRequest.
    pub const INVALID_CLUSTER_SIZE: i32 = 912;
    /// `CUDA_ERROR_FUNCTION_NOT_LOADED` — InvalidRequest: a lazily loaded function that is not
    /// loaded.
    pub const FUNCTION_NOT_LOADED: i32 = 913;
    /// `CUDA_ERROR_INVALID_RESOURCE_TYPE` — InvalidRequest.
    pub const INVALID_RESOURCE_TYPE: i32 = 914;
    /// `CUDA_ERROR_INVALID_RESOURCE_CONFIGURATION` — InvalidRequest.
    pub const INVALID_RESOURCE_CONFIGURATION: i32 = 915;
    /// `CUDA_ERROR_KEY_ROTATION` — Sticky: a confidential-computing key rotation failed;
    /// NVIDIA: the process must be relaunched.
    pub const KEY_ROTATION: i32 = 916;
    /// `CUDA_ERROR_UNKNOWN` — Sticky: the driver does not know what happened (the safe side).
    pub const UNKNOWN: i32 = 999;
}

/// The class of `code` in `api`. Total: every code has a class; unknown codes are `Sticky`.
/// A pure function of `(api, code)`: logging unknown codes happens where a [`GpuError`] is
/// made from a code ([`note_api_code`]).
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
        | INVALID_PITCH_VALUE
        | INVALID_SYMBOL
        | INVALID_DEVICE_POINTER
        | INVALID_MEMCPY_DIRECTION
        | MISSING_CONFIGURATION
        | INVALID_DEVICE_FUNCTION
        | INVALID_DEVICE
        | INVALID_IMAGE
        | CONTEXT_ALREADY_CURRENT
        | NO_BINARY_FOR_GPU
        | UNSUPPORTED_LIMIT
        | PEER_ACCESS_UNSUPPORTED
        | INVALID_KERNEL_FILE
        | INVALID_GRAPHICS_CONTEXT
        | INVALID_SOURCE
        | FILE_NOT_FOUND
        | SHARED_OBJECT_SYMBOL_NOT_FOUND
        | SHARED_OBJECT_INIT_FAILED
        | INVALID_HANDLE
        | ILLEGAL_STATE
        | NOT_FOUND
        | LAUNCH_OUT_OF_RESOURCES
        | PEER_ACCESS_ALREADY_ENABLED
        | PEER_ACCESS_NOT_ENABLED
        | SET_ON_ACTIVE_PROCESS
        | HOST_MEMORY_ALREADY_REGISTERED
        | HOST_MEMORY_NOT_REGISTERED
        | COOPERATIVE_LAUNCH_TOO_LARGE
        | NOT_SUPPORTED
        | STREAM_CAPTURE_UNSUPPORTED..=STREAM_CAPTURE_WRONG_THREAD
        | GRAPH_EXEC_UPDATE_FAILURE
        | INVALID_CHANNEL_DESCRIPTOR
        | INVALID_TEXTURE
        | INVALID_CLUSTER_SIZE => InvalidRequest,
        NO_DEVICE | NOT_INITIALIZED | DEINITIALIZED | INSUFFICIENT_DRIVER => DeviceLost,
        // ILLEGAL_ADDRESS, LAUNCH_TIME_OUT, ASSERT, LAUNCH_FAILURE, PRIOR_LAUNCH_FAILURE,
        // ECC_NOT_CORRECTABLE, INVALID_CONTEXT, CONTEXT_ALREADY_IN_USE, CONTEXT_IS_DESTROYED,
        // OPERATING_SYSTEM, UNKNOWN, RUNTIME_MEMORY, RUNTIME_OTHER and every code not listed
        // above.
        _ => Sticky,
    }
}

fn classify_cuda(code: i32) -> ErrorClass {
    use ErrorClass::*;
    use cuda::*;
    match code {
        OUT_OF_MEMORY | NOT_READY | TIMEOUT => Transient,
        INVALID_VALUE
        | CALL_REQUIRES_NEWER_DRIVER
        | INVALID_DEVICE
        | INVALID_IMAGE
        | NO_BINARY_FOR_GPU
        | UNSUPPORTED_LIMIT
        | PEER_ACCESS_UNSUPPORTED
        | INVALID_PTX
        | INVALID_GRAPHICS_CONTEXT
        | JIT_COMPILER_NOT_FOUND
        | UNSUPPORTED_PTX_VERSION
        | JIT_COMPILATION_DISABLED
        | UNSUPPORTED_EXEC_AFFINITY
        | UNSUPPORTED_DEVSIDE_SYNC
        | INVALID_SOURCE
        | FILE_NOT_FOUND
        | SHARED_OBJECT_SYMBOL_NOT_FOUND
        | SHARED_OBJECT_INIT_FAILED
        | INVALID_HANDLE
        | ILLEGAL_STATE
        | LOSSY_QUERY
        | NOT_FOUND
        | LAUNCH_OUT_OF_RESOURCES
        | LAUNCH_INCOMPATIBLE_TEXTURING
        | PEER_ACCESS_ALREADY_ENABLED
        | PEER_ACCESS_NOT_ENABLED
        | PRIMARY_CONTEXT_ACTIVE
        | TOO_MANY_PEERS
        | HOST_MEMORY_ALREADY_REGISTERED
        | HOST_MEMORY_NOT_REGISTERED
        | COOPERATIVE_LAUNCH_TOO_LARGE
        | NOT_PERMITTED
        | NOT_SUPPORTED
        | CDP_NOT_SUPPORTED
        | CDP_VERSION_MISMATCH
        | STREAM_CAPTURE_UNSUPPORTED..=STREAM_CAPTURE_WRONG_THREAD
        | GRAPH_EXEC_UPDATE_FAILURE
        | INVALID_CLUSTER_SIZE
        | FUNCTION_NOT_LOADED
        | INVALID_RESOURCE_TYPE
        | INVALID_RESOURCE_CONFIGURATION => InvalidRequest,
        NO_DEVICE
        | NOT_INITIALIZED
        | DEINITIALIZED
        | DEVICE_UNAVAILABLE
        | STUB_LIBRARY
        | DEVICE_NOT_LICENSED
        | SYSTEM_NOT_READY
        | SYSTEM_DRIVER_MISMATCH
        | COMPAT_NOT_SUPPORTED_ON_DEVICE
        | MPS_CONNECTION_FAILED..=MPS_MAX_CONNECTIONS_REACHED => DeviceLost,
        // ILLEGAL_ADDRESS, LAUNCH_TIMEOUT, ASSERT, HARDWARE_STACK_ERROR, ILLEGAL_INSTRUCTION,
        // MISALIGNED_ADDRESS, INVALID_ADDRESS_SPACE, INVALID_PC, LAUNCH_FAILED,
        // ECC_UNCORRECTABLE, NVLINK_UNCORRECTABLE, CONTAINED, INVALID_CONTEXT,
        // CONTEXT_ALREADY_IN_USE, CONTEXT_IS_DESTROYED, OPERATING_SYSTEM,
        // MPS_CLIENT_TERMINATED, EXTERNAL_DEVICE, KEY_ROTATION, UNKNOWN and every code not
        // listed above.
        _ => Sticky,
    }
}

/// The symbolic name of `code` in `api` (`hipErrorOutOfMemory`, `CUDA_ERROR_OUT_OF_MEMORY`),
/// or `"unknown"` for a code the tables do not list.
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
        INVALID_PITCH_VALUE => "hipErrorInvalidPitchValue",
        INVALID_SYMBOL => "hipErrorInvalidSymbol",
        INVALID_DEVICE_POINTER => "hipErrorInvalidDevicePointer",
        INVALID_MEMCPY_DIRECTION => "hipErrorInvalidMemcpyDirection",
        INSUFFICIENT_DRIVER => "hipErrorInsufficientDriver",
        MISSING_CONFIGURATION => "hipErrorMissingConfiguration",
        PRIOR_LAUNCH_FAILURE => "hipErrorPriorLaunchFailure",
        INVALID_DEVICE_FUNCTION => "hipErrorInvalidDeviceFunction",
        NO_DEVICE => "hipErrorNoDevice",
        INVALID_DEVICE => "hipErrorInvalidDevice",
        INVALID_IMAGE => "hipErrorInvalidImage",
        INVALID_CONTEXT => "hipErrorInvalidContext",
        CONTEXT_ALREADY_CURRENT => "hipErrorContextAlreadyCurrent",
        NO_BINARY_FOR_GPU => "hipErrorNoBinaryForGpu",
        ECC_NOT_CORRECTABLE => "hipErrorECCNotCorrectable",
        UNSUPPORTED_LIMIT => "hipErrorUnsupportedLimit",
        CONTEXT_ALREADY_IN_USE => "hipErrorContextAlreadyInUse",
        PEER_ACCESS_UNSUPPORTED => "hipErrorPeerAccessUnsupported",
        INVALID_KERNEL_FILE => "hipErrorInvalidKernelFile",
        INVALID_GRAPHICS_CONTEXT => "hipErrorInvalidGraphicsContext",
        INVALID_SOURCE => "hipErrorInvalidSource",
        FILE_NOT_FOUND => "hipErrorFileNotFound",
        SHARED_OBJECT_SYMBOL_NOT_FOUND => "hipErrorSharedObjectSymbolNotFound",
        SHARED_OBJECT_INIT_FAILED => "hipErrorSharedObjectInitFailed",
        OPERATING_SYSTEM => "hipErrorOperatingSystem",
        INVALID_HANDLE => "hipErrorInvalidHandle",
        ILLEGAL_STATE => "hipErrorIllegalState",
        NOT_FOUND => "hipErrorNotFound",
        NOT_READY => "hipErrorNotReady",
        ILLEGAL_ADDRESS => "hipErrorIllegalAddress",
        LAUNCH_OUT_OF_RESOURCES => "hipErrorLaunchOutOfResources",
        LAUNCH_TIME_OUT => "hipErrorLaunchTimeOut",
        PEER_ACCESS_ALREADY_ENABLED => "hipErrorPeerAccessAlreadyEnabled",
        PEER_ACCESS_NOT_ENABLED => "hipErrorPeerAccessNotEnabled",
        SET_ON_ACTIVE_PROCESS => "hipErrorSetOnActiveProcess",
        CONTEXT_IS_DESTROYED => "hipErrorContextIsDestroyed",
        ASSERT => "hipErrorAssert",
        HOST_MEMORY_ALREADY_REGISTERED => "hipErrorHostMemoryAlreadyRegistered",
        HOST_MEMORY_NOT_REGISTERED => "hipErrorHostMemoryNotRegistered",
        LAUNCH_FAILURE => "hipErrorLaunchFailure",
        COOPERATIVE_LAUNCH_TOO_LARGE => "hipErrorCooperativeLaunchTooLarge",
        NOT_SUPPORTED => "hipErrorNotSupported",
        STREAM_CAPTURE_UNSUPPORTED => "hipErrorStreamCaptureUnsupported",
        STREAM_CAPTURE_INVALIDATED => "hipErrorStreamCaptureInvalidated",
        STREAM_CAPTURE_MERGE => "hipErrorStreamCaptureMerge",
        STREAM_CAPTURE_UNMATCHED => "hipErrorStreamCaptureUnmatched",
        STREAM_CAPTURE_UNJOINED => "hipErrorStreamCaptureUnjoined",
        STREAM_CAPTURE_ISOLATION => "hipErrorStreamCaptureIsolation",
        STREAM_CAPTURE_IMPLICIT => "hipErrorStreamCaptureImplicit",
        CAPTURED_EVENT => "hipErrorCapturedEvent",
        STREAM_CAPTURE_WRONG_THREAD => "hipErrorStreamCaptureWrongThread",
        GRAPH_EXEC_UPDATE_FAILURE => "hipErrorGraphExecUpdateFailure",
        INVALID_CHANNEL_DESCRIPTOR => "hipErrorInvalidChannelDescriptor",
        INVALID_TEXTURE => "hipErrorInvalidTexture",
        UNKNOWN => "hipErrorUnknown",
        RUNTIME_MEMORY => "hipErrorRuntimeMemory",
        RUNTIME_OTHER => "hipErrorRuntimeOther",
        INVALID_CLUSTER_SIZE => "hipErrorInvalidClusterSize",
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
        CALL_REQUIRES_NEWER_DRIVER => "CUDA_ERROR_CALL_REQUIRES_NEWER_DRIVER",
        DEVICE_UNAVAILABLE => "CUDA_ERROR_DEVICE_UNAVAILABLE",
        NO_DEVICE => "CUDA_ERROR_NO_DEVICE",
        INVALID_DEVICE => "CUDA_ERROR_INVALID_DEVICE",
        DEVICE_NOT_LICENSED => "CUDA_ERROR_DEVICE_NOT_LICENSED",
        INVALID_IMAGE => "CUDA_ERROR_INVALID_IMAGE",
        INVALID_CONTEXT => "CUDA_ERROR_INVALID_CONTEXT",
        NO_BINARY_FOR_GPU => "CUDA_ERROR_NO_BINARY_FOR_GPU",
        ECC_UNCORRECTABLE => "CUDA_ERROR_ECC_UNCORRECTABLE",
        UNSUPPORTED_LIMIT => "CUDA_ERROR_UNSUPPORTED_LIMIT",
        CONTEXT_ALREADY_IN_USE => "CUDA_ERROR_CONTEXT_ALREADY_IN_USE",
        PEER_ACCESS_UNSUPPORTED => "CUDA_ERROR_PEER_ACCESS_UNSUPPORTED",
        INVALID_PTX => "CUDA_ERROR_INVALID_PTX",
        INVALID_GRAPHICS_CONTEXT => "CUDA_ERROR_INVALID_GRAPHICS_CONTEXT",
        NVLINK_UNCORRECTABLE => "CUDA_ERROR_NVLINK_UNCORRECTABLE",
        JIT_COMPILER_NOT_FOUND => "CUDA_ERROR_JIT_COMPILER_NOT_FOUND",
        UNSUPPORTED_PTX_VERSION => "CUDA_ERROR_UNSUPPORTED_PTX_VERSION",
        JIT_COMPILATION_DISABLED => "CUDA_ERROR_JIT_COMPILATION_DISABLED",
        UNSUPPORTED_EXEC_AFFINITY => "CUDA_ERROR_UNSUPPORTED_EXEC_AFFINITY",
        UNSUPPORTED_DEVSIDE_SYNC => "CUDA_ERROR_UNSUPPORTED_DEVSIDE_SYNC",
        CONTAINED => "CUDA_ERROR_CONTAINED",
        INVALID_SOURCE => "CUDA_ERROR_INVALID_SOURCE",
        FILE_NOT_FOUND => "CUDA_ERROR_FILE_NOT_FOUND",
        SHARED_OBJECT_SYMBOL_NOT_FOUND => "CUDA_ERROR_SHARED_OBJECT_SYMBOL_NOT_FOUND",
        SHARED_OBJECT_INIT_FAILED => "CUDA_ERROR_SHARED_OBJECT_INIT_FAILED",
        OPERATING_SYSTEM => "CUDA_ERROR_OPERATING_SYSTEM",
        INVALID_HANDLE => "CUDA_ERROR_INVALID_HANDLE",
        ILLEGAL_STATE => "CUDA_ERROR_ILLEGAL_STATE",
        LOSSY_QUERY => "CUDA_ERROR_LOSSY_QUERY",
        NOT_FOUND => "CUDA_ERROR_NOT_FOUND",
        NOT_READY => "CUDA_ERROR_NOT_READY",
        ILLEGAL_ADDRESS => "CUDA_ERROR_ILLEGAL_ADDRESS",
        LAUNCH_OUT_OF_RESOURCES => "CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES",
        LAUNCH_TIMEOUT => "CUDA_ERROR_LAUNCH_TIMEOUT",
        LAUNCH_INCOMPATIBLE_TEXTURING => "CUDA_ERROR_LAUNCH_INCOMPATIBLE_TEXTURING",
        PEER_ACCESS_ALREADY_ENABLED => "CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED",
        PEER_ACCESS_NOT_ENABLED => "CUDA_ERROR_PEER_ACCESS_NOT_ENABLED",
        PRIMARY_CONTEXT_ACTIVE => "CUDA_ERROR_PRIMARY_CONTEXT_ACTIVE",
        CONTEXT_IS_DESTROYED => "CUDA_ERROR_CONTEXT_IS_DESTROYED",
        ASSERT => "CUDA_ERROR_ASSERT",
        TOO_MANY_PEERS => "CUDA_ERROR_TOO_MANY_PEERS",
        HOST_MEMORY_ALREADY_REGISTERED => "CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED",
        HOST_MEMORY_NOT_REGISTERED => "CUDA_ERROR_HOST_MEMORY_NOT_REGISTERED",
        HARDWARE_STACK_ERROR => "CUDA_ERROR_HARDWARE_STACK_ERROR",
        ILLEGAL_INSTRUCTION => "CUDA_ERROR_ILLEGAL_INSTRUCTION",
        MISALIGNED_ADDRESS => "CUDA_ERROR_MISALIGNED_ADDRESS",
        INVALID_ADDRESS_SPACE => "CUDA_ERROR_INVALID_ADDRESS_SPACE",
        INVALID_PC => "CUDA_ERROR_INVALID_PC",
        LAUNCH_FAILED => "CUDA_ERROR_LAUNCH_FAILED",
        COOPERATIVE_LAUNCH_TOO_LARGE => "CUDA_ERROR_COOPERATIVE_LAUNCH_TOO_LARGE",
        NOT_PERMITTED => "CUDA_ERROR_NOT_PERMITTED",
        NOT_SUPPORTED => "CUDA_ERROR_NOT_SUPPORTED",
        SYSTEM_NOT_READY => "CUDA_ERROR_SYSTEM_NOT_READY",
        SYSTEM_DRIVER_MISMATCH => "CUDA_ERROR_SYSTEM_DRIVER_MISMATCH",
        COMPAT_NOT_SUPPORTED_ON_DEVICE => "CUDA_ERROR_COMPAT_NOT_SUPPORTED_ON_DEVICE",
        MPS_CONNECTION_FAILED => "CUDA_ERROR_MPS_CONNECTION_FAILED",
        MPS_RPC_FAILURE => "CUDA_ERROR_MPS_RPC_FAILURE",
        MPS_SERVER_NOT_READY => "CUDA_ERROR_MPS_SERVER_NOT_READY",
        MPS_MAX_CLIENTS_REACHED => "CUDA_ERROR_MPS_MAX_CLIENTS_REACHED",
        MPS_MAX_CONNECTIONS_REACHED => "CUDA_ERROR_MPS_MAX_CONNECTIONS_REACHED",
        MPS_CLIENT_TERMINATED => "CUDA_ERROR_MPS_CLIENT_TERMINATED",
        CDP_NOT_SUPPORTED => "CUDA_ERROR_CDP_NOT_SUPPORTED",
        CDP_VERSION_MISMATCH => "CUDA_ERROR_CDP_VERSION_MISMATCH",
        STREAM_CAPTURE_UNSUPPORTED => "CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED",
        STREAM_CAPTURE_INVALIDATED => "CUDA_ERROR_STREAM_CAPTURE_INVALIDATED",
        STREAM_CAPTURE_MERGE => "CUDA_ERROR_STREAM_CAPTURE_MERGE",
        STREAM_CAPTURE_UNMATCHED => "CUDA_ERROR_STREAM_CAPTURE_UNMATCHED",
        STREAM_CAPTURE_UNJOINED => "CUDA_ERROR_STREAM_CAPTURE_UNJOINED",
        STREAM_CAPTURE_ISOLATION => "CUDA_ERROR_STREAM_CAPTURE_ISOLATION",
        STREAM_CAPTURE_IMPLICIT => "CUDA_ERROR_STREAM_CAPTURE_IMPLICIT",
        CAPTURED_EVENT => "CUDA_ERROR_CAPTURED_EVENT",
        STREAM_CAPTURE_WRONG_THREAD => "CUDA_ERROR_STREAM_CAPTURE_WRONG_THREAD",
        TIMEOUT => "CUDA_ERROR_TIMEOUT",
        GRAPH_EXEC_UPDATE_FAILURE => "CUDA_ERROR_GRAPH_EXEC_UPDATE_FAILURE",
        EXTERNAL_DEVICE => "CUDA_ERROR_EXTERNAL_DEVICE",
        INVALID_CLUSTER_SIZE => "CUDA_ERROR_INVALID_CLUSTER_SIZE",
        FUNCTION_NOT_LOADED => "CUDA_ERROR_FUNCTION_NOT_LOADED",
        INVALID_RESOURCE_TYPE => "CUDA_ERROR_INVALID_RESOURCE_TYPE",
        INVALID_RESOURCE_CONFIGURATION => "CUDA_ERROR_INVALID_RESOURCE_CONFIGURATION",
        KEY_ROTATION => "CUDA_ERROR_KEY_ROTATION",
        UNKNOWN => "CUDA_ERROR_UNKNOWN",
        _ => "unknown",
    }
}

/// `true` for codes that mean hipvisor called the API from a thread without (or with a
/// destroyed or foreign) context: a threading bug in the runtime, not a GPU failure. They are
/// `Sticky` and every occurrence is logged (see [`note_api_code`]).
pub fn is_threading_bug(api: Api, code: i32) -> bool {
    match api {
        Api::Hip => matches!(
            code,
            hip::INVALID_CONTEXT | hip::CONTEXT_ALREADY_IN_USE | hip::CONTEXT_IS_DESTROYED
        ),
        Api::CudaDriver => matches!(
            code,
            cuda::INVALID_CONTEXT | cuda::CONTEXT_ALREADY_IN_USE | cuda::CONTEXT_IS_DESTROYED
        ),
        Api::Sim => false,
    }
}

/// `(api, code)` pairs of unknown codes already logged by this process.
static LOGGED_UNKNOWN: std::sync::LazyLock<std::sync::Mutex<std::collections::HashSet<(Api, i32)>>> =
    std::sync::LazyLock::new(Default::default);

/// Whether this process writes API codes to stderr ([`note_api_code`]); off in a worker
/// process ([`quiet_api_codes`]).
static LOG_API_CODES: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Turns [`note_api_code`]'s lines off for the rest of this process. A worker process
/// (process isolation) calls it at start: its host logs the codes of the errors it receives
/// from the worker ([`GpuError::note_received`]), so that an unknown code is logged once per
/// run, not once per worker process — a restart starts a new one.
pub fn quiet_api_codes() {
    LOG_API_CODES.store(false, std::sync::atomic::Ordering::Relaxed);
}

/// Writes a line to stderr about an error code that deserves one, and returns whether it did.
/// Called by [`GpuError::api`] and [`GpuError::api_with`], so every code that comes from a
/// driver passes here once, and by [`GpuError::note_received`] for errors that come from a
/// worker process (which writes nothing itself, see [`quiet_api_codes`]); the core has no
/// logger, hence `eprintln!`.
///
/// - A code the tables do not list (classified `Sticky`, the safe side) is logged **once per
///   run per `(api, code)`** (per application process: in process isolation by the host,
///   however many worker processes returned it), with its number, API, operation, device
///   and the call that returned it, so that it can be added to the tables.
/// - A threading-bug code ([`is_threading_bug`]: 201/216/709 of HIP and CUDA) is logged
///   **every time**: each one is a bug in hipvisor worth a line, and each is sticky, so the
///   device's process is restarted after it and they cannot flood the log.
/// - Known codes and the simulator's (injected) codes are not logged, and nothing is in a
///   process that called [`quiet_api_codes`].
pub fn note_api_code(api: Api, code: i32, op: OpKind, device: u32, call: &str) -> bool {
    if api == Api::Sim || code == 0 || !LOG_API_CODES.load(std::sync::atomic::Ordering::Relaxed) {
        return false;
    }
    let call = if call.is_empty() { "an API call" } else { call };
    if is_threading_bug(api, code) {
        eprintln!(
            "hipvisor: BUG: {api} error {code} ({}) from {call} during {op} on device {device}: the \
             calling thread's context is missing, destroyed or bound elsewhere — a threading bug in \
             hipvisor; treated as sticky (the device's context is replaced). Please report it.",
            code_name(api, code)
        );
        return true;
    }
    if code_name(api, code) != "unknown" {
        return false;
    }
    let first = crate::sync::lock(&LOGGED_UNKNOWN).insert((api, code));
    if first {
        eprintln!(
            "hipvisor: {api} error code {code}, which hipvisor's error table does not list, from \
             {call} during {op} on device {device}: treated as sticky (the device's context is \
             replaced). Logged once per run; please report it."
        );
    }
    first
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
    /// The worker program cannot open the backend the host asked for: it was built without
    /// the backend's feature, or the simulator's settings are bad. Permanent: the device is
    /// failed, not probed again and again.
    #[error("the worker cannot open this backend: {reason}")]
    WorkerBackend {
        /// Why.
        reason: String,
    },
    /// A durable buffer request the runtime cannot honour (an id that is not a durable
    /// buffer's).
    #[error("bad durable buffer: {reason}")]
    BadDurable {
        /// What was wrong.
        reason: String,
    },
    /// A task that cannot run: a scratch index out of range, a plain buffer handle among its
    /// arguments, more inputs or outputs than a task carries, a replicated buffer or module
    /// with no replica on the device.
    #[error("bad task: {reason}")]
    BadTask {
        /// What was wrong.
        reason: String,
    },
    /// The op needs more host memory than this host could ever give it.
    #[error("{requested} bytes of host memory can never be allocated: more than {limit}")]
    HostMemory {
        /// The bytes the op needs on the host.
        requested: u64,
        /// What it exceeds, in words.
        limit: String,
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
    /// The host could not give the op what it needs now — memory to stage, receive or
    /// simulate its bytes, a shared-memory region or mapping — so the GPU was not asked.
    /// Not a GPU error code: the host's own failure, class `Transient` (the host may have
    /// room again on a retry).
    #[error("{op} on device {device}: the host could not provide {reason}")]
    Host {
        /// The operation.
        op: OpKind,
        /// The device.
        device: u32,
        /// What the host could not provide, and why.
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
    /// An API error without extra context. Unknown and threading-bug codes are logged to
    /// stderr ([`note_api_code`]).
    pub fn api(api: Api, code: i32, op: OpKind, device: u32) -> Self {
        note_api_code(api, code, op, device, "");
        GpuError::Api {
            api,
            code,
            op,
            device,
            message: String::new(),
        }
    }

    /// An API error with extra context (the call that failed, a driver message). Unknown and
    /// threading-bug codes are logged to stderr with `message` as the call ([`note_api_code`]).
    pub fn api_with(api: Api, code: i32, op: OpKind, device: u32, message: impl Into<String>) -> Self {
        let message = message.into();
        note_api_code(api, code, op, device, &message);
        GpuError::Api {
            api,
            code,
            op,
            device,
            message,
        }
    }

    /// Logs the code of an error made in another process — a worker, which logs nothing
    /// ([`quiet_api_codes`]) — as [`note_api_code`] would have where it was made: an unknown
    /// code once per run, a threading-bug code every time. Returns whether it wrote a line.
    /// The host calls it for every error a worker sends.
    pub fn note_received(&self) -> bool {
        match self {
            GpuError::Api {
                api,
                code,
                op,
                device,
                message,
            } => note_api_code(*api, *code, *op, *device, message),
            GpuError::Invalid { .. } | GpuError::WorkerUnavailable { .. } | GpuError::Host { .. } => false,
        }
    }

    /// A failure of the host, not the GPU: it could not provide `what` now ([`GpuError::Host`]).
    pub fn host(op: OpKind, device: u32, what: impl Into<String>) -> Self {
        GpuError::Host {
            op,
            device,
            reason: what.into(),
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
            GpuError::Host { .. } => ErrorClass::Transient,
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
            GpuError::Api { op, .. }
            | GpuError::Invalid { op, .. }
            | GpuError::WorkerUnavailable { op, .. }
            | GpuError::Host { op, .. } => *op,
        }
    }

    /// The device the operation ran on.
    pub fn device(&self) -> u32 {
        match self {
            GpuError::Api { device, .. }
            | GpuError::Invalid { device, .. }
            | GpuError::WorkerUnavailable { device, .. }
            | GpuError::Host { device, .. } => *device,
        }
    }

    /// The API and raw code, for API errors.
    pub fn code(&self) -> Option<(Api, i32)> {
        match self {
            GpuError::Api { api, code, .. } => Some((*api, *code)),
            GpuError::Invalid { .. } | GpuError::WorkerUnavailable { .. } | GpuError::Host { .. } => None,
        }
    }

    /// The symbolic name of the code (`hipErrorIllegalAddress`), or the runtime check's kind.
    pub fn code_name(&self) -> &'static str {
        match self {
            GpuError::Api { api, code, .. } => code_name(*api, *code),
            GpuError::Invalid { .. } => "invalid_request",
            GpuError::WorkerUnavailable { .. } => "worker_unavailable",
            GpuError::Host { .. } => "host_resources",
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
        // Added after the first table: every other hipError_t of ROCm 5.2, 6 and 7.
        (12, ErrorClass::InvalidRequest, "hipErrorInvalidPitchValue"),
        (13, ErrorClass::InvalidRequest, "hipErrorInvalidSymbol"),
        (52, ErrorClass::InvalidRequest, "hipErrorMissingConfiguration"),
        (201, ErrorClass::Sticky, "hipErrorInvalidContext"),
        (202, ErrorClass::InvalidRequest, "hipErrorContextAlreadyCurrent"),
        (215, ErrorClass::InvalidRequest, "hipErrorUnsupportedLimit"),
        (216, ErrorClass::Sticky, "hipErrorContextAlreadyInUse"),
        (217, ErrorClass::InvalidRequest, "hipErrorPeerAccessUnsupported"),
        (219, ErrorClass::InvalidRequest, "hipErrorInvalidGraphicsContext"),
        (300, ErrorClass::InvalidRequest, "hipErrorInvalidSource"),
        (302, ErrorClass::InvalidRequest, "hipErrorSharedObjectSymbolNotFound"),
        (303, ErrorClass::InvalidRequest, "hipErrorSharedObjectInitFailed"),
        (304, ErrorClass::Sticky, "hipErrorOperatingSystem"),
        (401, ErrorClass::InvalidRequest, "hipErrorIllegalState"),
        (704, ErrorClass::InvalidRequest, "hipErrorPeerAccessAlreadyEnabled"),
        (705, ErrorClass::InvalidRequest, "hipErrorPeerAccessNotEnabled"),
        (708, ErrorClass::InvalidRequest, "hipErrorSetOnActiveProcess"),
        (709, ErrorClass::Sticky, "hipErrorContextIsDestroyed"),
        (712, ErrorClass::InvalidRequest, "hipErrorHostMemoryAlreadyRegistered"),
        (713, ErrorClass::InvalidRequest, "hipErrorHostMemoryNotRegistered"),
        (720, ErrorClass::InvalidRequest, "hipErrorCooperativeLaunchTooLarge"),
        (900, ErrorClass::InvalidRequest, "hipErrorStreamCaptureUnsupported"),
        (901, ErrorClass::InvalidRequest, "hipErrorStreamCaptureInvalidated"),
        (902, ErrorClass::InvalidRequest, "hipErrorStreamCaptureMerge"),
        (903, ErrorClass::InvalidRequest, "hipErrorStreamCaptureUnmatched"),
        (904, ErrorClass::InvalidRequest, "hipErrorStreamCaptureUnjoined"),
        (905, ErrorClass::InvalidRequest, "hipErrorStreamCaptureIsolation"),
        (906, ErrorClass::InvalidRequest, "hipErrorStreamCaptureImplicit"),
        (907, ErrorClass::InvalidRequest, "hipErrorCapturedEvent"),
        (908, ErrorClass::InvalidRequest, "hipErrorStreamCaptureWrongThread"),
        (910, ErrorClass::InvalidRequest, "hipErrorGraphExecUpdateFailure"),
        (911, ErrorClass::InvalidRequest, "hipErrorInvalidChannelDescriptor"),
        (912, ErrorClass::InvalidRequest, "hipErrorInvalidTexture"),
        (999, ErrorClass::Sticky, "hipErrorUnknown"),
        (1052, ErrorClass::Sticky, "hipErrorRuntimeMemory"),
        (1053, ErrorClass::Sticky, "hipErrorRuntimeOther"),
        (1054, ErrorClass::InvalidRequest, "hipErrorInvalidClusterSize"),
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
        // Added after the first table: codes real machines return on first contact, and the
        // rest of CUresult worth a class.
        (36, ErrorClass::InvalidRequest, "CUDA_ERROR_CALL_REQUIRES_NEWER_DRIVER"),
        (102, ErrorClass::DeviceLost, "CUDA_ERROR_DEVICE_NOT_LICENSED"),
        (201, ErrorClass::Sticky, "CUDA_ERROR_INVALID_CONTEXT"),
        (215, ErrorClass::InvalidRequest, "CUDA_ERROR_UNSUPPORTED_LIMIT"),
        (216, ErrorClass::Sticky, "CUDA_ERROR_CONTEXT_ALREADY_IN_USE"),
        (217, ErrorClass::InvalidRequest, "CUDA_ERROR_PEER_ACCESS_UNSUPPORTED"),
        (219, ErrorClass::InvalidRequest, "CUDA_ERROR_INVALID_GRAPHICS_CONTEXT"),
        (220, ErrorClass::Sticky, "CUDA_ERROR_NVLINK_UNCORRECTABLE"),
        (221, ErrorClass::InvalidRequest, "CUDA_ERROR_JIT_COMPILER_NOT_FOUND"),
        (223, ErrorClass::InvalidRequest, "CUDA_ERROR_JIT_COMPILATION_DISABLED"),
        (224, ErrorClass::InvalidRequest, "CUDA_ERROR_UNSUPPORTED_EXEC_AFFINITY"),
        (225, ErrorClass::InvalidRequest, "CUDA_ERROR_UNSUPPORTED_DEVSIDE_SYNC"),
        (226, ErrorClass::Sticky, "CUDA_ERROR_CONTAINED"),
        (300, ErrorClass::InvalidRequest, "CUDA_ERROR_INVALID_SOURCE"),
        (
            302,
            ErrorClass::InvalidRequest,
            "CUDA_ERROR_SHARED_OBJECT_SYMBOL_NOT_FOUND",
        ),
        (303, ErrorClass::InvalidRequest, "CUDA_ERROR_SHARED_OBJECT_INIT_FAILED"),
        (304, ErrorClass::Sticky, "CUDA_ERROR_OPERATING_SYSTEM"),
        (401, ErrorClass::InvalidRequest, "CUDA_ERROR_ILLEGAL_STATE"),
        (402, ErrorClass::InvalidRequest, "CUDA_ERROR_LOSSY_QUERY"),
        (
            703,
            ErrorClass::InvalidRequest,
            "CUDA_ERROR_LAUNCH_INCOMPATIBLE_TEXTURING",
        ),
        (
            704,
            ErrorClass::InvalidRequest,
            "CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED",
        ),
        (705, ErrorClass::InvalidRequest, "CUDA_ERROR_PEER_ACCESS_NOT_ENABLED"),
        (708, ErrorClass::InvalidRequest, "CUDA_ERROR_PRIMARY_CONTEXT_ACTIVE"),
        (709, ErrorClass::Sticky, "CUDA_ERROR_CONTEXT_IS_DESTROYED"),
        (711, ErrorClass::InvalidRequest, "CUDA_ERROR_TOO_MANY_PEERS"),
        (
            712,
            ErrorClass::InvalidRequest,
            "CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED",
        ),
        (713, ErrorClass::InvalidRequest, "CUDA_ERROR_HOST_MEMORY_NOT_REGISTERED"),
        (714, ErrorClass::Sticky, "CUDA_ERROR_HARDWARE_STACK_ERROR"),
        (717, ErrorClass::Sticky, "CUDA_ERROR_INVALID_ADDRESS_SPACE"),
        (718, ErrorClass::Sticky, "CUDA_ERROR_INVALID_PC"),
        (
            720,
            ErrorClass::InvalidRequest,
            "CUDA_ERROR_COOPERATIVE_LAUNCH_TOO_LARGE",
        ),
        (800, ErrorClass::InvalidRequest, "CUDA_ERROR_NOT_PERMITTED"),
        (802, ErrorClass::DeviceLost, "CUDA_ERROR_SYSTEM_NOT_READY"),
        (804, ErrorClass::DeviceLost, "CUDA_ERROR_COMPAT_NOT_SUPPORTED_ON_DEVICE"),
        (805, ErrorClass::DeviceLost, "CUDA_ERROR_MPS_CONNECTION_FAILED"),
        (806, ErrorClass::DeviceLost, "CUDA_ERROR_MPS_RPC_FAILURE"),
        (807, ErrorClass::DeviceLost, "CUDA_ERROR_MPS_SERVER_NOT_READY"),
        (808, ErrorClass::DeviceLost, "CUDA_ERROR_MPS_MAX_CLIENTS_REACHED"),
        (809, ErrorClass::DeviceLost, "CUDA_ERROR_MPS_MAX_CONNECTIONS_REACHED"),
        (810, ErrorClass::Sticky, "CUDA_ERROR_MPS_CLIENT_TERMINATED"),
        (811, ErrorClass::InvalidRequest, "CUDA_ERROR_CDP_NOT_SUPPORTED"),
        (812, ErrorClass::InvalidRequest, "CUDA_ERROR_CDP_VERSION_MISMATCH"),
        (900, ErrorClass::InvalidRequest, "CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED"),
        (901, ErrorClass::InvalidRequest, "CUDA_ERROR_STREAM_CAPTURE_INVALIDATED"),
        (902, ErrorClass::InvalidRequest, "CUDA_ERROR_STREAM_CAPTURE_MERGE"),
        (903, ErrorClass::InvalidRequest, "CUDA_ERROR_STREAM_CAPTURE_UNMATCHED"),
        (904, ErrorClass::InvalidRequest, "CUDA_ERROR_STREAM_CAPTURE_UNJOINED"),
        (905, ErrorClass::InvalidRequest, "CUDA_ERROR_STREAM_CAPTURE_ISOLATION"),
        (906, ErrorClass::InvalidRequest, "CUDA_ERROR_STREAM_CAPTURE_IMPLICIT"),
        (907, ErrorClass::InvalidRequest, "CUDA_ERROR_CAPTURED_EVENT"),
        (
            908,
            ErrorClass::InvalidRequest,
            "CUDA_ERROR_STREAM_CAPTURE_WRONG_THREAD",
        ),
        (909, ErrorClass::Transient, "CUDA_ERROR_TIMEOUT"),
        (910, ErrorClass::InvalidRequest, "CUDA_ERROR_GRAPH_EXEC_UPDATE_FAILURE"),
        (911, ErrorClass::Sticky, "CUDA_ERROR_EXTERNAL_DEVICE"),
        (912, ErrorClass::InvalidRequest, "CUDA_ERROR_INVALID_CLUSTER_SIZE"),
        (913, ErrorClass::InvalidRequest, "CUDA_ERROR_FUNCTION_NOT_LOADED"),
        (914, ErrorClass::InvalidRequest, "CUDA_ERROR_INVALID_RESOURCE_TYPE"),
        (
            915,
            ErrorClass::InvalidRequest,
            "CUDA_ERROR_INVALID_RESOURCE_CONFIGURATION",
        ),
        (916, ErrorClass::Sticky, "CUDA_ERROR_KEY_ROTATION"),
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
    fn the_tables_list_each_code_once() {
        for table in [HIP_TABLE, CUDA_TABLE] {
            let mut codes: Vec<i32> = table.iter().map(|(c, _, _)| *c).collect();
            codes.sort_unstable();
            let n = codes.len();
            codes.dedup();
            assert_eq!(codes.len(), n, "a code is listed twice");
        }
    }

    /// hipError_t codes left out on purpose: profiler, arrays and mapping.
    const HIP_LEFT_OUT: &[i32] = &[5, 6, 7, 8, 205, 206, 207, 208, 210, 211, 212, 213];

    #[test]
    fn codes_left_out_on_purpose_stay_sticky_and_unnamed() {
        // Profiler, array/mapping codes; CUDA codes whose documentation does not say what
        // state they leave.
        for &code in HIP_LEFT_OUT {
            assert_eq!(classify(Api::Hip, code), ErrorClass::Sticky, "HIP {code}");
            assert_eq!(code_name(Api::Hip, code), "unknown", "HIP {code}");
        }
        for code in [5, 205, 227, 721, 917, 918, 919] {
            assert_eq!(classify(Api::CudaDriver, code), ErrorClass::Sticky, "CUDA {code}");
            assert_eq!(code_name(Api::CudaDriver, code), "unknown", "CUDA {code}");
        }
    }

    /// The HIP header of the installed ROCm, if one is found (`HIP_PATH`, `/opt/rocm`,
    /// `/usr`).
    fn installed_hip_header() -> Option<std::path::PathBuf> {
        let roots = std::env::var("HIP_PATH")
            .into_iter()
            .chain(["/opt/rocm".into(), "/usr".into()]);
        roots
            .map(|root| std::path::Path::new(&root).join("include/hip/hip_runtime_api.h"))
            .find(|p| p.exists())
    }

    /// Every `hipError_t` value of the installed header is in the table or left out on
    /// purpose: the table's claim to cover every code is checked, not believed.
    #[test]
    fn every_hip_error_t_of_the_installed_header_is_listed_or_left_out_on_purpose() {
        let Some(path) = installed_hip_header() else {
            assert!(
                std::env::var("CI_REQUIRE_TOOLS").as_deref() != Ok("1"),
                "CI_REQUIRE_TOOLS=1 but no hip/hip_runtime_api.h was found"
            );
            eprintln!("skipped: no hip/hip_runtime_api.h (HIP_PATH, /opt/rocm, /usr)");
            return;
        };
        let header = std::fs::read_to_string(&path).unwrap();
        let start = header.find("hipError_t {").expect("the hipError_t enum");
        let end = start + header[start..].find("} hipError_t;").expect("its end");
        // Comments off, then one `name = value` per comma (a value may be on the next line).
        let body: String = header[start + "hipError_t {".len()..end]
            .lines()
            .map(|l| l.split("//").next().unwrap_or_default())
            .collect::<Vec<_>>()
            .join(" ");
        let mut seen = 0;
        for item in body.split(',') {
            let Some((name, value)) = item.split_once('=') else {
                continue;
            };
            let (name, value) = (name.trim(), value.trim());
            let code: i32 = value
                .parse()
                .unwrap_or_else(|_| panic!("{name} = `{value}` in {}", path.display()));
            if !name.starts_with("hipError") {
                continue;
            }
            seen += 1;
            let listed = HIP_TABLE.iter().any(|(c, _, _)| *c == code) || HIP_LEFT_OUT.contains(&code);
            assert!(
                listed,
                "{name} = {code} of {} is neither in the table nor left out on purpose",
                path.display()
            );
            assert!(
                code_name(Api::Hip, code) != "unknown" || HIP_LEFT_OUT.contains(&code),
                "{name} = {code} has no name"
            );
        }
        assert!(seen > 50, "only {seen} codes read from {}", path.display());
    }

    #[test]
    fn an_unknown_code_is_logged_once_per_api_and_code() {
        // Codes no other test uses: the set of logged codes is process-wide.
        assert!(note_api_code(
            Api::Hip,
            424_242,
            OpKind::Launch,
            0,
            "hipModuleLaunchKernel"
        ));
        assert!(!note_api_code(
            Api::Hip,
            424_242,
            OpKind::Synchronize,
            1,
            "hipDeviceSynchronize"
        ));
        assert!(note_api_code(
            Api::CudaDriver,
            424_242,
            OpKind::Launch,
            0,
            "cuLaunchKernel"
        ));
        assert!(note_api_code(Api::Hip, 424_243, OpKind::Launch, 0, ""));
        // Made through the constructors, the second error of the same code logs nothing more.
        let e = GpuError::api_with(Api::Hip, 424_244, OpKind::Alloc, 0, "hipMalloc");
        assert_eq!(e.class(), ErrorClass::Sticky);
        assert!(!note_api_code(Api::Hip, 424_244, OpKind::Alloc, 0, "hipMalloc"));
        let _ = GpuError::api(Api::CudaDriver, 424_245, OpKind::Alloc, 0);
        assert!(!note_api_code(Api::CudaDriver, 424_245, OpKind::Free, 0, "cuMemFree"));
    }

    /// A worker process logs no codes; its host logs those of the errors it receives, an
    /// unknown one once per run however many workers (restarts) sent it, a threading-bug
    /// one every time.
    #[test]
    fn workers_log_no_codes_and_their_host_logs_received_ones_once_per_run() {
        const NAME: &str = "error::tests::workers_log_no_codes_and_their_host_logs_received_ones_once_per_run";
        const CHILD: &str = "HV_ERROR_TEST_WORKER";
        // Codes no other test uses: the set of logged codes is process-wide.
        let unknown = |device| GpuError::Api {
            api: Api::Hip,
            code: 424_250,
            op: OpKind::Launch,
            device,
            message: "hipModuleLaunchKernel".into(),
        };
        let threading = GpuError::Api {
            api: Api::CudaDriver,
            code: cuda::CONTEXT_ALREADY_IN_USE,
            op: OpKind::Alloc,
            device: 0,
            message: "cuMemAlloc".into(),
        };
        if std::env::var_os(CHILD).is_some() {
            // What a worker does at start, then errors made as its backend makes them.
            quiet_api_codes();
            let made = GpuError::api_with(Api::Hip, 424_250, OpKind::Launch, 0, "hipModuleLaunchKernel");
            assert_eq!(made, unknown(0));
            assert!(!note_api_code(Api::Hip, 424_251, OpKind::Alloc, 0, "hipMalloc"));
            assert!(!note_api_code(
                Api::Hip,
                hip::INVALID_CONTEXT,
                OpKind::Alloc,
                0,
                "hipMalloc"
            ));
            assert!(!threading.note_received());
            return;
        }
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", NAME, "--nocapture", "--test-threads=1"])
            .env(CHILD, "1")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{stderr}");
        assert!(!stderr.contains("hipvisor:"), "a worker logs no codes: {stderr}");
        // The host: the first worker's error is logged, the same code from the worker that
        // replaced it is not.
        assert!(unknown(0).note_received(), "logged when first received");
        assert!(!unknown(0).note_received(), "not again from a restarted worker");
        assert!(!unknown(1).note_received(), "nor from another device's worker");
        assert!(threading.note_received());
        assert!(threading.note_received(), "a threading bug every time");
        let invalid = GpuError::invalid(OpKind::Free, 0, InvalidReason::UnknownBuffer { id: 1 });
        assert!(!invalid.note_received());
    }

    #[test]
    fn known_and_simulated_codes_are_not_logged() {
        assert!(!note_api_code(
            Api::Hip,
            hip::OUT_OF_MEMORY,
            OpKind::Alloc,
            0,
            "hipMalloc"
        ));
        assert!(!note_api_code(
            Api::Hip,
            hip::ILLEGAL_ADDRESS,
            OpKind::Synchronize,
            0,
            "x"
        ));
        assert!(!note_api_code(
            Api::CudaDriver,
            cuda::JIT_COMPILER_NOT_FOUND,
            OpKind::LoadModule,
            0,
            "x"
        ));
        assert!(!note_api_code(Api::Sim, 424_246, OpKind::Alloc, 0, "sim"));
        assert!(!note_api_code(Api::Sim, hip::INVALID_CONTEXT, OpKind::Alloc, 0, "sim"));
        assert!(!note_api_code(Api::Hip, 0, OpKind::Alloc, 0, "success"));
    }

    #[test]
    fn threading_bug_codes_are_sticky_and_logged_every_time() {
        for (api, code) in [
            (Api::Hip, hip::INVALID_CONTEXT),
            (Api::Hip, hip::CONTEXT_ALREADY_IN_USE),
            (Api::Hip, hip::CONTEXT_IS_DESTROYED),
            (Api::CudaDriver, cuda::INVALID_CONTEXT),
            (Api::CudaDriver, cuda::CONTEXT_ALREADY_IN_USE),
            (Api::CudaDriver, cuda::CONTEXT_IS_DESTROYED),
        ] {
            assert!(is_threading_bug(api, code));
            assert_eq!(classify(api, code), ErrorClass::Sticky);
            assert!(note_api_code(api, code, OpKind::Launch, 0, "call"));
            assert!(note_api_code(api, code, OpKind::Launch, 0, "call"), "every time");
        }
        assert!(!is_threading_bug(Api::Hip, hip::ILLEGAL_ADDRESS));
        assert!(!is_threading_bug(Api::Hip, hip::CONTEXT_ALREADY_CURRENT));
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
