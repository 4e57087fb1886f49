//! NVIDIA GPUs through the CUDA driver API (cargo feature `cuda`), over cudarc 0.19 with
//! dynamic loading: the binary builds and starts without CUDA installed.
//!
//! cudarc panics when `libcuda` is missing or lacks a symbol, so every entry point first
//! checks [`driver_present`] and answers a `DeviceLost`-class error ("CUDA driver library not
//! found") instead. Contexts come from cudarc's safe layer (`CudaContext`: the device's
//! primary context, bound to the executor thread); the operations use its `result` layer
//! (thin wrappers over the driver calls), so argument packing and error mapping are the same
//! as HIP's: every `CUresult` is classified by [`crate::error::classify`].
//!
//! Built-in kernels: `kernels/builtin.cu` is compiled by NVRTC at run time for the compute
//! capability of the device present (`compute_90` on an H200), once per process and
//! architecture (the PTX is cached in memory, so a context restart in the same process only
//! pays the module load). User modules load from PTX text or cubin/fatbin bytes. Large
//! host↔device copies go through a pinned staging buffer.
//!
//! `unsafe` lives in this file only; each block says why it is sound.
#![allow(unsafe_code)]

use std::collections::HashMap;
use std::ffi::{CStr, CString, c_char, c_void};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::{CudaContext, DriverError, result, sys};
use cudarc::nvrtc::{result as nvrtc_result, sys as nvrtc_sys};

use crate::backend::args::PackedArgs;
use crate::backend::gpu::{GpuCalls, GpuModule, Launch};
use crate::backend::table::{DeviceBuffer, PinnedRanges, Tables};
use crate::backend::{Backend, BackendKind, DeviceContext, image};
use crate::error::{Api, GpuError, InvalidReason, cuda as code};
use crate::op::{DeviceInfo, KernelArg, MemInfo, ModuleHandle, ModuleSource, OpKind};

/// The built-in kernels' source, compiled by NVRTC for the device present.
pub const BUILTIN_SOURCE: &str = include_str!("../../kernels/builtin.cu");

/// Copies of at least this many bytes go through the pinned staging buffer.
pub const STAGING_THRESHOLD: usize = 1 << 20;
/// Size of the pinned staging buffer: two halves of [`STAGING_CHUNK`], so copying one chunk
/// on the host overlaps the DMA of the other.
pub const STAGING_BYTES: usize = 2 * STAGING_CHUNK;
/// The bytes one DMA of a staged copy moves.
pub const STAGING_CHUNK: usize = 8 << 20;

/// Whether the CUDA driver library can be loaded.
pub fn driver_present() -> bool {
    // SAFETY: only tries to dlopen the driver library by its usual names.
    unsafe { sys::is_culib_present() }
}

/// Whether NVRTC (needed for the built-in kernels) can be loaded.
pub fn nvrtc_present() -> bool {
    // SAFETY: only tries to dlopen the NVRTC library by its usual names.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

fn driver_missing(device: u32) -> GpuError {
    GpuError::api_with(
        Api::CudaDriver,
        code::NO_DEVICE,
        OpKind::DeviceInfo,
        device,
        "CUDA driver library not found (libcuda.so); is the NVIDIA driver installed?",
    )
}

/// The first sticky error code this process's CUDA driver returned (0: none). After a
/// sticky fault every call of the process fails and no reset recovers the context (measured
/// on an H200: primary-context reset + retain returns 700), so a later `open` is refused
/// at once instead of handing out a context that cannot work.
static POISONED: AtomicI32 = AtomicI32::new(0);

fn err(e: DriverError, op: OpKind, device: u32, call: &str) -> GpuError {
    let code = e.0 as i32;
    if crate::error::classify(Api::CudaDriver, code) == crate::ErrorClass::Sticky {
        let _ = POISONED.compare_exchange(0, code, Ordering::Relaxed, Ordering::Relaxed);
    }
    GpuError::api_with(Api::CudaDriver, code, op, device, call)
}

/// The sticky code that poisoned this process's CUDA contexts, if one did.
pub fn poisoned() -> Option<i32> {
    match POISONED.load(Ordering::Relaxed) {
        0 => None,
        code => Some(code),
    }
}

/// The CUDA driver's version (`12040` = 12.4), or `None` where the driver cannot tell.
pub fn driver_version() -> Option<i32> {
    if !driver_present() {
        return None;
    }
    let mut v = 0;
    // SAFETY: the driver is present; `v` is a valid out-pointer.
    let status = unsafe { sys::cuDriverGetVersion(&mut v) };
    status.result().ok().map(|_| v)
}

/// NVRTC's version, `(major, minor)`.
pub fn nvrtc_version() -> Option<(i32, i32)> {
    if !nvrtc_present() {
        return None;
    }
    let (mut major, mut minor) = (0, 0);
    // SAFETY: NVRTC is present; valid out-pointers.
    let status = unsafe { nvrtc_sys::nvrtcVersion(&mut major, &mut minor) };
    status.result().ok().map(|_| (major, minor))
}

/// The architectures NVRTC can compile for, as `major * 10 + minor` (`90` = `sm_90`).
fn nvrtc_archs() -> Vec<i32> {
    let mut n = 0;
    // SAFETY: NVRTC is present (checked by the caller); valid out-pointer.
    if unsafe { nvrtc_sys::nvrtcGetNumSupportedArchs(&mut n) }
        .result()
        .is_err()
        || n <= 0
    {
        return Vec::new();
    }
    let mut archs = vec![0; n as usize];
    // SAFETY: `archs` has room for the `n` entries NVRTC reported.
    if unsafe { nvrtc_sys::nvrtcGetSupportedArchs(archs.as_mut_ptr()) }
        .result()
        .is_err()
    {
        return Vec::new();
    }
    archs
}

fn version_text() -> String {
    let nvrtc = nvrtc_version().map_or("unknown".into(), |(a, b)| format!("{a}.{b}"));
    let driver = driver_version().map_or("unknown".into(), |v| format!("{}.{}", v / 1000, (v % 1000) / 10));
    format!("NVRTC {nvrtc}, CUDA driver {driver}")
}

/// The built-in kernels compiled for one device architecture.
#[derive(Debug)]
pub struct BuiltinImage {
    /// What it was compiled for: `sm_90` (a cubin) or `compute_90` (PTX).
    pub target: String,
    /// A cubin, or NUL-terminated PTX.
    pub code: Vec<u8>,
}

impl BuiltinImage {
    /// Whether it is machine code for one architecture (else PTX, JIT-compiled at load).
    pub fn is_cubin(&self) -> bool {
        self.target.starts_with("sm_")
    }
}

/// Compiles CUDA C++ `source` with NVRTC for `target` (`sm_90`: a cubin; `compute_90`:
/// PTX, not NUL-terminated), for user modules; a failure carries NVRTC's log.
pub fn compile(source: &str, target: &str) -> Result<Vec<u8>, String> {
    if !nvrtc_present() {
        return Err("NVRTC library not found (libnvrtc.so)".into());
    }
    let source = CString::new(source).map_err(|_| "the source holds a NUL byte".to_string())?;
    nvrtc_compile(&source, target)
}

fn nvrtc_compile(source: &CStr, target: &str) -> Result<Vec<u8>, String> {
    let prog = nvrtc_result::create_program(source, Some(c"hipvisor_builtin.cu"))
        .map_err(|e| format!("nvrtcCreateProgram: {e:?}"))?;
    let opts = [
        format!("--gpu-architecture={target}"),
        "--fmad=true".into(),
        "-default-device".into(),
    ];
    // SAFETY: `prog` was just created and is destroyed once, below; `source` outlives it.
    let compiled = unsafe { nvrtc_result::compile_program(prog, &opts) };
    let out = match compiled {
        Ok(()) if target.starts_with("sm_") => {
            let mut size = 0usize;
            // SAFETY: `prog` compiled; `size` is a valid out-pointer, then `code` has room
            // for the `size` bytes NVRTC reported.
            unsafe {
                nvrtc_sys::nvrtcGetCUBINSize(prog, &mut size)
                    .result()
                    .map_err(|e| format!("nvrtcGetCUBINSize: {e:?}"))
                    .and_then(|_| {
                        let mut code = vec![0u8; size];
                        nvrtc_sys::nvrtcGetCUBIN(prog, code.as_mut_ptr().cast())
                            .result()
                            .map(|_| code)
                            .map_err(|e| format!("nvrtcGetCUBIN: {e:?}"))
                    })
            }
        }
        // SAFETY: `prog` compiled.
        Ok(()) => unsafe { nvrtc_result::get_ptx(prog) }
            .map(|ptx| ptx.into_iter().map(|c| c as u8).collect())
            .map_err(|e| format!("nvrtcGetPTX: {e:?}")),
        Err(e) => {
            // SAFETY: `prog` is live; the log is read before it is destroyed.
            let log = unsafe { nvrtc_result::get_program_log(prog) }
                .map(|l| {
                    let bytes: Vec<u8> = l.into_iter().take_while(|c| *c != 0).map(|c| c as u8).collect();
                    String::from_utf8_lossy(&bytes).trim().to_string()
                })
                .unwrap_or_default();
            Err(format!("nvrtcCompileProgram for {target}: {e:?}; log: {log}"))
        }
    };
    // SAFETY: `prog` is destroyed once.
    let _ = unsafe { nvrtc_result::destroy_program(prog) };
    out
}

/// The built-in kernels for compute capability `major.minor`, compiled once per process and
/// architecture: a cubin for exactly `sm_{major}{minor}` (no JIT at load, nothing to compile
/// again after a restart in the same process), or — when this NVRTC does not know that
/// architecture (a GPU newer than the toolkit) — PTX for the newest architecture it knows
/// below it, which the driver JIT-compiles at load. A failure names the NVRTC and driver
/// versions and NVRTC's log.
pub fn builtin_image(major: i32, minor: i32) -> Result<Arc<BuiltinImage>, String> {
    cached((major, minor, false), || {
        let sm = format!("sm_{major}{minor}");
        match nvrtc_compile(&builtin_source(), &sm) {
            Ok(code) => Ok(BuiltinImage { target: sm, code }),
            Err(cubin_err) => ptx_for(major * 10 + minor).map_err(|e| format!("{cubin_err}; PTX fallback: {e}")),
        }
    })
}

/// The built-in kernels as PTX for the newest architecture NVRTC knows at or below
/// `major.minor`: what is loaded when the driver rejects the cubin (an NVRTC newer than the
/// driver).
fn builtin_ptx_fallback(major: i32, minor: i32) -> Result<Arc<BuiltinImage>, String> {
    cached((major, minor, true), || ptx_for(major * 10 + minor))
}

fn builtin_source() -> CString {
    CString::new(BUILTIN_SOURCE).expect("the kernel source has no NUL")
}

/// PTX of the built-in kernels for the newest architecture NVRTC knows at or below `cc`.
fn ptx_for(cc: i32) -> Result<BuiltinImage, String> {
    let arch = nvrtc_archs()
        .into_iter()
        .filter(|a| *a <= cc)
        .max()
        .ok_or_else(|| format!("NVRTC knows no architecture at or below sm_{cc}"))?;
    let target = format!("compute_{arch}");
    let mut code = nvrtc_compile(&builtin_source(), &target)?;
    if code.last() != Some(&0) {
        code.push(0);
    }
    Ok(BuiltinImage { target, code })
}

/// Compiles once per process and key (compute capability, PTX or not); a failure names the
/// NVRTC and driver versions.
fn cached(
    key: (i32, i32, bool),
    make: impl FnOnce() -> Result<BuiltinImage, String>,
) -> Result<Arc<BuiltinImage>, String> {
    /// Compiled images by compute capability and kind.
    type Cache = Mutex<HashMap<(i32, i32, bool), Arc<BuiltinImage>>>;
    static CACHE: OnceLock<Cache> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    if let Some(p) = crate::sync::lock(cache).get(&key) {
        return Ok(p.clone());
    }
    if !nvrtc_present() {
        return Err(format!(
            "NVRTC library not found (libnvrtc.so and libnvrtc-builtins.so, from the CUDA toolkit or the \
             Python package nvidia-cuda-nvrtc; {}): it compiles the built-in kernels",
            version_text()
        ));
    }
    let image = Arc::new(make().map_err(|e| format!("{}: {e}", version_text()))?);
    crate::sync::lock(cache).insert(key, image.clone());
    Ok(image)
}

/// CUDA's device discovery.
#[derive(Debug, Default, Clone, Copy)]
pub struct CudaBackend;

impl CudaBackend {
    /// The CUDA backend.
    pub fn new() -> CudaBackend {
        CudaBackend
    }
}

impl CudaBackend {
    /// The driver's device ordinals, ordered by PCI bus id: device `i` of this backend is the
    /// `i`-th. (The driver's own order is "fastest first" unless `CUDA_DEVICE_ORDER=PCI_BUS_ID`;
    /// `nvidia-smi` and the other vendor's runtime use bus order, so hipvisor does too.
    /// `CUDA_VISIBLE_DEVICES` still chooses which devices the driver shows.)
    fn ordinals(&self) -> Result<Vec<(String, i32, sys::CUdevice)>, GpuError> {
        if !driver_present() {
            return Err(driver_missing(0));
        }
        let op = OpKind::DeviceInfo;
        result::init().map_err(|e| err(e, op, 0, "cuInit"))?;
        let n = result::device::get_count().map_err(|e| err(e, op, 0, "cuDeviceGetCount"))?;
        if n <= 0 {
            return Err(GpuError::api_with(
                Api::CudaDriver,
                code::NO_DEVICE,
                op,
                0,
                "no CUDA device was found",
            ));
        }
        let mut devices = Vec::with_capacity(n as usize);
        for ordinal in 0..n {
            let dev = result::device::get(ordinal).map_err(|e| err(e, op, ordinal as u32, "cuDeviceGet"))?;
            let mut bus = [0 as c_char; 32];
            // SAFETY: the driver is initialised; the buffer's length is passed.
            unsafe { sys::cuDeviceGetPCIBusId(bus.as_mut_ptr(), bus.len() as i32, dev) }
                .result()
                .map_err(|e| err(e, op, ordinal as u32, "cuDeviceGetPCIBusId"))?;
            devices.push((c_text(&bus).to_ascii_lowercase(), ordinal, dev));
        }
        devices.sort();
        Ok(devices)
    }

    /// The driver's device behind this backend's index `device`: its PCI bus id, ordinal
    /// and handle.
    fn device(&self, device: u32) -> Result<(String, i32, sys::CUdevice), GpuError> {
        let devices = self.ordinals()?;
        let count = devices.len() as u32;
        devices.into_iter().nth(device as usize).ok_or_else(|| {
            GpuError::invalid(
                OpKind::DeviceInfo,
                device,
                InvalidReason::DeviceOutOfRange { device, count },
            )
        })
    }
}

/// The text of a NUL-terminated C string in `buf`.
fn c_text(buf: &[c_char]) -> String {
    let bytes: Vec<u8> = buf.iter().take_while(|c| **c != 0).map(|c| *c as u8).collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// A UUID as `nvidia-smi -L` prints it: `GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`.
fn uuid_text(bytes: &[u8; 16]) -> String {
    let h: Vec<String> = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "GPU-{}-{}-{}-{}-{}",
        h[..4].concat(),
        h[4..6].concat(),
        h[6..8].concat(),
        h[8..10].concat(),
        h[10..].concat()
    )
}

impl Backend for CudaBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Cuda
    }

    fn device_count(&self) -> Result<u32, GpuError> {
        Ok(self.ordinals()?.len() as u32)
    }

    fn device_info(&self, device: u32) -> Result<DeviceInfo, GpuError> {
        let (bus, _, dev) = self.device(device)?;
        let op = OpKind::DeviceInfo;
        let mut name = [0 as c_char; 256];
        // SAFETY: the driver is initialised (by `device`); the buffer's length is passed.
        unsafe { sys::cuDeviceGetName(name.as_mut_ptr(), name.len() as i32, dev) }
            .result()
            .map_err(|e| err(e, op, device, "cuDeviceGetName"))?;
        // SAFETY: `dev` is a valid device handle.
        let total = unsafe { result::device::total_mem(dev) }.map_err(|e| err(e, op, device, "cuDeviceTotalMem"))?;
        let (major, minor) = compute_capability(dev).map_err(|e| err(e, op, device, "cuDeviceGetAttribute"))?;
        let mut uuid = sys::CUuuid { bytes: [0; 16] };
        // SAFETY: `dev` is valid; `uuid` is a valid out-pointer.
        let uuid = unsafe { sys::cuDeviceGetUuid_v2(&mut uuid, dev) }
            .result()
            .ok()
            .map(|_| uuid_text(&uuid.bytes.map(|b| b as u8)));
        Ok(DeviceInfo {
            index: device,
            name: c_text(&name),
            total_memory: total as u64,
            arch: format!("sm_{major}{minor}"),
            pci_bus_id: Some(bus),
            uuid,
        })
    }

    fn open(&self, device: u32, epoch: u64) -> Result<Box<dyn DeviceContext>, GpuError> {
        let op = OpKind::DeviceInfo;
        if let Some(code) = poisoned() {
            return Err(GpuError::api_with(
                Api::CudaDriver,
                code,
                op,
                device,
                "refused: an earlier sticky error poisoned this process's CUDA contexts, and only a new \
                 process recovers (process isolation restarts the worker)",
            ));
        }
        let info = self.device_info(device)?;
        let (_, ordinal, dev) = self.device(device)?;
        let ctx = CudaContext::new(ordinal as usize).map_err(|e| err(e, op, device, "cuDevicePrimaryCtxRetain"))?;
        ctx.bind_to_thread()
            .map_err(|e| err(e, op, device, "cuCtxSetCurrent"))?;
        let cc = compute_capability(dev).map_err(|e| err(e, op, device, "cuDeviceGetAttribute"))?;
        let attr = |a| {
            // SAFETY: `dev` is valid; the attribute is a plain integer.
            unsafe { result::device::get_attribute(dev, a) }.map_err(|e| err(e, op, device, "cuDeviceGetAttribute"))
        };
        use sys::CUdevice_attribute::{
            CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK as SHARED,
            CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN as OPTIN,
        };
        let shared = SharedLimits {
            default: attr(SHARED)? as u32,
            opt_in: attr(OPTIN)? as u32,
        };
        Ok(Box::new(CudaDevice {
            ctx,
            cc,
            shared,
            param_info: param_info_available(),
            info,
            t: Tables::new(device, epoch),
            staging: None,
            pinned: PinnedRanges::default(),
        }))
    }
}

/// A device's shared memory per block: what every launch may use, and what a kernel may be
/// raised to (`CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES`): 48 KiB and 227 KiB on an H200.
#[derive(Debug, Clone, Copy)]
struct SharedLimits {
    default: u32,
    opt_in: u32,
}

/// Whether the driver can describe a kernel's parameters (`cuFuncGetParamInfo`, driver 12.4
/// and later). cudarc panics on a missing symbol, so the version is asked first and the
/// symbol looked up before it is called.
fn param_info_available() -> bool {
    driver_version().is_some_and(|v| v >= 12040)
        // SAFETY: the driver library is loaded (driver_present); only looks a symbol up.
        && unsafe { sys::culib().get::<unsafe extern "C" fn()>(b"cuFuncGetParamInfo\0") }.is_ok()
}

fn compute_capability(dev: sys::CUdevice) -> Result<(i32, i32), DriverError> {
    use sys::CUdevice_attribute::{
        CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR as MAJOR, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR as MINOR,
    };
    // SAFETY: `dev` is a valid device handle; the attributes are plain integers.
    unsafe {
        Ok((
            result::device::get_attribute(dev, MAJOR)?,
            result::device::get_attribute(dev, MINOR)?,
        ))
    }
}

#[derive(Debug)]
pub(crate) struct CudaBuffer {
    ptr: sys::CUdeviceptr,
    len: u64,
}

impl DeviceBuffer for CudaBuffer {
    fn byte_len(&self) -> u64 {
        self.len
    }
}

#[derive(Debug)]
pub(crate) struct CudaModule {
    module: sys::CUmodule,
    builtin: bool,
    functions: HashMap<String, KernelFn>,
}

/// A kernel of a loaded module, with what a launch checks against.
#[derive(Debug)]
struct KernelFn {
    f: sys::CUfunction,
    /// Its parameters' sizes in bytes, where the driver can tell (`cuFuncGetParamInfo`).
    params: Option<Vec<usize>>,
    /// Shared memory its code declares statically.
    static_shared: u32,
    /// The dynamic shared memory it has been raised to (0: the device's default).
    raised: u32,
}

/// One CUDA device's context: buffers, modules and the pinned staging buffer.
#[derive(Debug)]
pub struct CudaDevice {
    ctx: Arc<CudaContext>,
    /// Compute capability.
    cc: (i32, i32),
    shared: SharedLimits,
    /// Whether `cuFuncGetParamInfo` may be called.
    param_info: bool,
    info: DeviceInfo,
    t: Tables<CudaBuffer, CudaModule>,
    staging: Option<*mut c_void>,
    /// Host memory registered as pinned.
    pinned: PinnedRanges,
}

// SAFETY: the raw handles (modules, functions, pinned host memory) are valid on any thread
// of the process while the context lives; a `CudaDevice` is moved to one executor thread and
// used only there (it binds its context to that thread), which is what `Send` promises.
unsafe impl Send for CudaDevice {}

impl CudaDevice {
    fn dev(&self) -> u32 {
        self.info.index
    }

    fn err(&self, e: DriverError, op: OpKind, call: &str) -> GpuError {
        err(e, op, self.dev(), call)
    }

    fn staging(&mut self, op: OpKind) -> Result<*mut c_void, GpuError> {
        if let Some(p) = self.staging {
            return Ok(p);
        }
        // SAFETY: allocates pinned host memory in the bound context; freed in `drop`.
        let p = unsafe { result::malloc_host(STAGING_BYTES, 0) }.map_err(|e| self.err(e, op, "cuMemHostAlloc"))?;
        self.staging = Some(p);
        Ok(p)
    }

    /// Loads the built-in kernels: the cubin for the device's architecture, else — when the
    /// driver rejects it (a cubin from an NVRTC newer than the driver) — PTX for the newest
    /// architecture at or below the device's, which the driver JIT-compiles. A failure names
    /// the NVRTC and driver versions.
    fn load_builtin(&mut self) -> Result<sys::CUmodule, GpuError> {
        let op = OpKind::LoadModule;
        let dev = self.dev();
        let bad = |reason: String| GpuError::invalid(op, dev, InvalidReason::BadModuleImage { reason });
        let (major, minor) = self.cc;
        let image = builtin_image(major, minor).map_err(bad)?;
        // SAFETY: the context is bound to this thread; NVRTC's output is a whole cubin or
        // NUL-terminated PTX.
        let loaded = unsafe { result::module::load_data(image.code.as_ptr().cast()) };
        let first = match loaded {
            Ok(m) => return Ok(m),
            // A poisoned context fails every call: no fallback can help.
            Err(e) if crate::error::classify(Api::CudaDriver, e.0 as i32) == crate::ErrorClass::Sticky => {
                return Err(self.err(e, op, "cuModuleLoadData"));
            }
            Err(e) => e,
        };
        let ptx = builtin_ptx_fallback(major, minor).map_err(bad)?;
        // SAFETY: as above; `ptx` is NUL-terminated.
        unsafe { result::module::load_data(ptx.code.as_ptr().cast()) }.map_err(|e| {
            self.err(
                e,
                op,
                &format!(
                    "cuModuleLoadData of the built-in kernels: {} rejected ({:?}), {} rejected too ({})",
                    image.target,
                    first,
                    ptx.target,
                    version_text()
                ),
            )
        })
    }

    /// The kernel `name` of `module`, checked for this launch: its parameters against
    /// `args` (where the driver can tell), and its shared memory, raised to
    /// `shared_mem_bytes` when that is above the device's default and within its opt-in
    /// maximum.
    fn kernel(
        &mut self,
        module: &ModuleHandle,
        name: &str,
        args: &[KernelArg],
        shared_mem_bytes: u32,
    ) -> Result<sys::CUfunction, GpuError> {
        let op = OpKind::Launch;
        let dev = self.dev();
        let (limits, param_info) = (self.shared, self.param_info);
        let invalid = |reason| GpuError::invalid(op, dev, reason);
        let unknown = || invalid(InvalidReason::UnknownKernel { name: name.to_string() });
        let m = self.t.modules.get_mut(&module.id).ok_or_else(unknown)?;
        let k = match m.functions.entry(name.to_string()) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                let cname = CString::new(name).map_err(|_| unknown())?;
                // SAFETY: `m.module` is a live module of this context.
                let f = unsafe { result::module::get_function(m.module, cname) }
                    .map_err(|e| err(e, op, dev, "cuModuleGetFunction"))?;
                use sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES as STATIC;
                // SAFETY: `f` is a live function; the attribute is a plain integer.
                let static_shared = unsafe { result::function::get_function_attribute(f, STATIC) }
                    .map_err(|e| err(e, op, dev, "cuFuncGetAttribute"))? as u32;
                let params = if param_info { param_sizes(f) } else { None };
                e.insert(KernelFn {
                    f,
                    params,
                    static_shared,
                    raised: 0,
                })
            }
        };
        if let Some(params) = &k.params {
            let given: Vec<usize> = args.iter().map(arg_size).collect();
            if &given != params {
                return Err(invalid(InvalidReason::BadArguments {
                    kernel: name.to_string(),
                    reason: format!(
                        "the kernel takes {} parameters of {params:?} bytes, the launch passed {} of {given:?} bytes",
                        params.len(),
                        given.len()
                    ),
                }));
            }
        }
        let needed = k.static_shared.saturating_add(shared_mem_bytes);
        if needed > limits.default && shared_mem_bytes > k.raised {
            if needed > limits.opt_in {
                return Err(invalid(InvalidReason::BadLaunchConfig {
                    reason: format!(
                        "{shared_mem_bytes} bytes of dynamic shared memory requested; `{name}` declares {} bytes \
                         statically and the device allows at most {} bytes per block",
                        k.static_shared, limits.opt_in
                    ),
                }));
            }
            use sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES as MAX_DYNAMIC;
            // SAFETY: `k.f` is a live function; the value is within the device's opt-in limit.
            unsafe { result::function::set_function_attribute(k.f, MAX_DYNAMIC, shared_mem_bytes as i32) }
                .map_err(|e| err(e, op, dev, "cuFuncSetAttribute"))?;
            k.raised = shared_mem_bytes;
        }
        Ok(k.f)
    }
}

/// The sizes of a kernel's parameters, from `cuFuncGetParamInfo`, which answers
/// `CUDA_ERROR_INVALID_VALUE` past the last one. Any other answer means the driver cannot
/// describe this kernel: `None`, and its launches go unchecked (padded, see `launch`).
fn param_sizes(f: sys::CUfunction) -> Option<Vec<usize>> {
    let mut sizes = Vec::new();
    for i in 0..4096 {
        let (mut offset, mut size) = (0usize, 0usize);
        // SAFETY: `f` is a live function; the symbol exists (checked by
        // `param_info_available`); valid out-pointers.
        let status = unsafe { sys::cuFuncGetParamInfo(f, i, &mut offset, &mut size) };
        match status {
            sys::CUresult::CUDA_SUCCESS => sizes.push(size),
            sys::CUresult::CUDA_ERROR_INVALID_VALUE => return Some(sizes),
            _ => return None,
        }
    }
    None
}

/// The size of an argument as a kernel parameter.
fn arg_size(a: &KernelArg) -> usize {
    match a {
        KernelArg::Buffer(_) | KernelArg::U64(_) | KernelArg::I64(_) | KernelArg::F64(_) => 8,
        KernelArg::U32(_) | KernelArg::I32(_) | KernelArg::F32(_) => 4,
    }
}

impl GpuModule for CudaModule {
    fn builtin(&self) -> bool {
        self.builtin
    }
}

impl GpuCalls for CudaDevice {
    type Ptr = sys::CUdeviceptr;
    type Buffer = CudaBuffer;
    type Module = CudaModule;

    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn tables(&self) -> &Tables<CudaBuffer, CudaModule> {
        &self.t
    }

    fn tables_mut(&mut self) -> &mut Tables<CudaBuffer, CudaModule> {
        &mut self.t
    }

    fn address(buffer: &CudaBuffer, offset: u64) -> sys::CUdeviceptr {
        buffer.ptr + offset
    }

    fn malloc(&mut self, bytes: u64) -> Result<CudaBuffer, GpuError> {
        let size = usize::try_from(bytes).unwrap_or(usize::MAX);
        // SAFETY: the context is bound to this thread; the memory is freed on Free or drop.
        let ptr = unsafe { result::malloc_sync(size) }.map_err(|e| self.err(e, OpKind::Alloc, "cuMemAlloc"))?;
        Ok(CudaBuffer { ptr, len: bytes })
    }

    fn free(&mut self, buffer: &CudaBuffer) -> Result<(), GpuError> {
        // SAFETY: the pointer came from cuMemAlloc in this context and is freed once.
        unsafe { result::free_sync(buffer.ptr) }.map_err(|e| self.err(e, OpKind::Free, "cuMemFree"))
    }

    fn copy_device_to_device(
        &mut self,
        dst: sys::CUdeviceptr,
        src: sys::CUdeviceptr,
        len: usize,
    ) -> Result<(), GpuError> {
        // SAFETY: both ranges lie inside live buffers and do not overlap (checked).
        unsafe { result::memcpy_dtod_sync(dst, src, len) }
            .map_err(|e| self.err(e, OpKind::CopyDeviceToDevice, "cuMemcpyDtoD"))
    }

    fn memset(&mut self, dst: sys::CUdeviceptr, value: u8, len: usize) -> Result<(), GpuError> {
        // SAFETY: the range lies inside a live buffer (checked).
        unsafe { result::memset_d8_sync(dst, value, len) }.map_err(|e| self.err(e, OpKind::Memset, "cuMemsetD8"))
    }

    fn synchronize(&mut self) -> Result<(), GpuError> {
        result::ctx::synchronize().map_err(|e| self.err(e, OpKind::Synchronize, "cuCtxSynchronize"))
    }

    fn mem_info(&mut self) -> Result<MemInfo, GpuError> {
        let (free, total) = result::mem_get_info().map_err(|e| self.err(e, OpKind::MemInfo, "cuMemGetInfo"))?;
        Ok(MemInfo {
            free: free as u64,
            total: total as u64,
        })
    }

    fn copy_to_device(&mut self, dst: sys::CUdeviceptr, data: &[u8]) -> Result<(), GpuError> {
        let op = OpKind::CopyToDevice;
        if data.len() < STAGING_THRESHOLD || self.pinned.contains(data) {
            // SAFETY: `dst` lies inside a live device buffer with room for `data` (checked).
            return unsafe { result::memcpy_htod_sync(dst, data) }.map_err(|e| self.err(e, op, "cuMemcpyHtoD"));
        }
        // Double-buffered: chunk i is copied into one half of the pinned staging buffer while
        // the DMA of chunk i-1 from the other half runs. The null stream orders the DMAs
        // after earlier kernels, as the synchronous copy does.
        let stage = self.staging(op)?;
        let null = std::ptr::null_mut();
        for (i, chunk) in data.chunks(STAGING_CHUNK).enumerate() {
            // SAFETY: half `i % 2` of the staging buffer (STAGING_CHUNK ≥ chunk.len() pinned
            // bytes, this thread's alone) is free: the DMA that last read it, chunk i-2's,
            // completed at the synchronize before chunk i-1's was issued. The device range
            // lies inside the buffer (checked).
            unsafe {
                let half = std::slice::from_raw_parts_mut(stage.cast::<u8>().add((i % 2) * STAGING_CHUNK), chunk.len());
                half.copy_from_slice(chunk);
                if i > 0 {
                    result::stream::synchronize(null).map_err(|e| self.err(e, op, "cuMemcpyHtoDAsync"))?;
                }
                result::memcpy_htod_async(dst + (i * STAGING_CHUNK) as u64, &*half, null)
                    .map_err(|e| self.err(e, op, "cuMemcpyHtoDAsync"))?;
            }
        }
        // SAFETY: waits for the last DMA before the staging buffer is reused.
        unsafe { result::stream::synchronize(null) }.map_err(|e| self.err(e, op, "cuMemcpyHtoDAsync"))
    }

    fn copy_from_device(&mut self, src: sys::CUdeviceptr, len: usize) -> Result<Vec<u8>, GpuError> {
        let op = OpKind::CopyFromDevice;
        let mut out = vec![0u8; len];
        if len < STAGING_THRESHOLD {
            // SAFETY: `src` lies inside a live device buffer with `len` readable bytes.
            unsafe { result::memcpy_dtoh_sync(&mut out, src) }.map_err(|e| self.err(e, op, "cuMemcpyDtoH"))?;
            return Ok(out);
        }
        // Double-buffered: the DMA of chunk i+1 into one half runs while chunk i is copied
        // out of the other.
        let stage = self.staging(op)?;
        let null = std::ptr::null_mut();
        let chunks = len.div_ceil(STAGING_CHUNK);
        let half = |i: usize| {
            let n = STAGING_CHUNK.min(len - i * STAGING_CHUNK);
            // SAFETY: half `i % 2` of the pinned staging buffer, `n` ≤ STAGING_CHUNK bytes.
            unsafe { std::slice::from_raw_parts_mut(stage.cast::<u8>().add((i % 2) * STAGING_CHUNK), n) }
        };
        // SAFETY: the device range of chunk 0 lies inside the buffer (checked); its half is
        // free.
        unsafe { result::memcpy_dtoh_async(half(0), src, null) }.map_err(|e| self.err(e, op, "cuMemcpyDtoHAsync"))?;
        for i in 0..chunks {
            // SAFETY: waits for chunk i's DMA. Then chunk i+1's half is free (chunk i-1 was
            // copied out of it in the previous iteration) and its device range lies inside
            // the buffer.
            unsafe {
                result::stream::synchronize(null).map_err(|e| self.err(e, op, "cuMemcpyDtoHAsync"))?;
                if i + 1 < chunks {
                    result::memcpy_dtoh_async(half(i + 1), src + ((i + 1) * STAGING_CHUNK) as u64, null)
                        .map_err(|e| self.err(e, op, "cuMemcpyDtoHAsync"))?;
                }
            }
            let h = half(i);
            out[i * STAGING_CHUNK..i * STAGING_CHUNK + h.len()].copy_from_slice(h);
        }
        Ok(out)
    }

    fn load(&mut self, source: &ModuleSource) -> Result<CudaModule, GpuError> {
        let op = OpKind::LoadModule;
        let bad = |reason: String| GpuError::invalid(op, self.dev(), InvalidReason::BadModuleImage { reason });
        let module = match source {
            ModuleSource::Builtin => self.load_builtin()?,
            ModuleSource::Image(p) => {
                let image = image::checked(p.as_bytes(), true).map_err(bad)?.1;
                // SAFETY: the context is bound to this thread; `image` was checked to hold
                // together (a NUL-terminated PTX string, or a cubin/fatbin whose tables lie
                // inside it).
                unsafe { result::module::load_data(image.as_ptr().cast()) }
                    .map_err(|e| self.err(e, op, "cuModuleLoadData"))?
            }
        };
        Ok(CudaModule {
            module,
            builtin: matches!(source, ModuleSource::Builtin),
            functions: HashMap::new(),
        })
    }

    fn launch(&mut self, launch: Launch<'_>) -> Result<(), GpuError> {
        let Launch {
            module,
            function,
            grid,
            block,
            shared_mem_bytes,
            args,
        } = launch;
        let kind = OpKind::Launch;
        let f = self.kernel(module, function, args, shared_mem_bytes)?;
        let mut packed = PackedArgs::pack(args, |b| self.device_ptr(kind, b, 0))?;
        // Padded: where the driver cannot check a user kernel's parameters (before 12.4),
        // missing arguments read zeros, not host memory past the array.
        let mut params = packed.padded_pointers();
        // SAFETY: `f` belongs to a live module of the bound context; `params` holds one
        // pointer per argument into `packed`, which outlives the call, then pointers to
        // static zeros; the dimensions were checked; a null stream is the context's default
        // stream.
        unsafe {
            result::launch_kernel(
                f,
                (grid.x, grid.y, grid.z),
                (block.x, block.y, block.z),
                shared_mem_bytes,
                std::ptr::null_mut(),
                &mut params,
            )
        }
        .map_err(|e| self.err(e, kind, "cuLaunchKernel"))
    }

    fn pinned(&mut self) -> &mut PinnedRanges {
        &mut self.pinned
    }

    fn host_register(&mut self, bytes: &[u8]) -> bool {
        // SAFETY: the context is bound to this thread; `bytes` is mapped memory the caller
        // keeps mapped until it unregisters it; flags 0 = default registration.
        let status = unsafe { sys::cuMemHostRegister_v2(bytes.as_ptr().cast_mut().cast(), bytes.len(), 0) };
        status.result().is_ok()
    }

    fn host_unregister(&mut self, bytes: &[u8]) {
        // SAFETY: the range was registered by `host_register` and is still mapped.
        let _ = unsafe { sys::cuMemHostUnregister(bytes.as_ptr().cast_mut().cast()) };
    }
}

impl Drop for CudaDevice {
    /// Frees what the context holds; errors cannot be reported from `drop` and a poisoned
    /// context fails every call anyway, so they are ignored.
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
        for (_, b) in self.t.buffers.drain() {
            // SAFETY: each pointer came from cuMemAlloc and is freed once.
            let _ = unsafe { result::free_sync(b.ptr) };
        }
        for (_, m) in self.t.modules.drain() {
            // SAFETY: each module came from cuModuleLoadData and is unloaded once.
            let _ = unsafe { result::module::unload(m.module) };
        }
        if let Some(p) = self.staging.take() {
            // SAFETY: the staging buffer came from cuMemHostAlloc and is freed once.
            let _ = unsafe { result::free_host(p) };
        }
        for start in self.pinned.drain() {
            // SAFETY: each range was registered once and is still mapped by its owner.
            let _ = unsafe { sys::cuMemHostUnregister(start as *mut c_void) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn driver_codes_map_to_the_taxonomy_with_the_call_named() {
        let e = err(
            DriverError(sys::CUresult::CUDA_ERROR_ILLEGAL_ADDRESS),
            OpKind::Synchronize,
            0,
            "cuCtxSynchronize",
        );
        assert_eq!(e.class(), crate::ErrorClass::Sticky);
        assert!(
            e.to_string().contains("CUDA_ERROR_ILLEGAL_ADDRESS") && e.to_string().contains("cuCtxSynchronize"),
            "{e}"
        );
        let oom = err(
            DriverError(sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY),
            OpKind::Alloc,
            0,
            "cuMemAlloc",
        );
        assert_eq!(oom.class(), crate::ErrorClass::Transient);
        let gone = err(
            DriverError(sys::CUresult::CUDA_ERROR_DEVICE_UNAVAILABLE),
            OpKind::MemInfo,
            0,
            "x",
        );
        assert_eq!(gone.class(), crate::ErrorClass::DeviceLost);
        let invalid = err(
            DriverError(sys::CUresult::CUDA_ERROR_INVALID_VALUE),
            OpKind::Memset,
            0,
            "x",
        );
        assert_eq!(invalid.class(), crate::ErrorClass::InvalidRequest);
    }

    #[test]
    fn uuids_print_as_nvidia_smi_does() {
        let b: [u8; 16] = std::array::from_fn(|i| i as u8 * 17);
        assert_eq!(uuid_text(&b), "GPU-00112233-4455-6677-8899-aabbccddeeff");
        assert_eq!(arg_size(&KernelArg::F32(1.0)), 4);
        assert_eq!(arg_size(&KernelArg::U64(1)), 8);
    }

    /// CI proves the built-in kernels compile to an `sm_90` cubin without a GPU, with
    /// NVRTC from the Python package `nvidia-cuda-nvrtc` (`.ci/run` installs it); elsewhere
    /// the test says it was skipped, unless `CI_REQUIRE_TOOLS=1` requires NVRTC.
    #[test]
    fn builtin_kernels_compile_for_sm_90_with_nvrtc() {
        if !nvrtc_present() {
            assert!(
                std::env::var("CI_REQUIRE_TOOLS").as_deref() != Ok("1"),
                "CI_REQUIRE_TOOLS=1 but NVRTC (libnvrtc.so.13) is not on the library path"
            );
            eprintln!(
                "skipped: NVRTC not found (pip install --target DIR nvidia-cuda-nvrtc, DIR/nvidia/cu13/lib on LD_LIBRARY_PATH)"
            );
            return;
        }
        let image = builtin_image(9, 0).unwrap();
        assert_eq!(image.target, "sm_90");
        assert!(image.is_cubin());
        assert_eq!(image::checked(&image.code, true).unwrap().0, image::ImageKind::Elf);
        eprintln!("{}: {} bytes of sm_90 cubin", version_text(), image.code.len());
        // The PTX a driver older than NVRTC loads instead of the cubin.
        let ptx = builtin_ptx_fallback(9, 0).unwrap();
        assert_eq!(ptx.target, "compute_90");
        assert_eq!(image::checked(&ptx.code, true).unwrap().0, image::ImageKind::Ptx);
        // Every built-in kernel is in it, under its own (unmangled) name.
        let text = String::from_utf8_lossy(&ptx.code);
        for k in crate::kernels::BuiltinKernel::ALL {
            assert!(
                text.contains(&format!(".entry {}(", k.name())),
                "no entry {} in the PTX",
                k.name()
            );
        }
        // A GPU newer than this NVRTC gets PTX for the newest architecture it knows.
        let newer = builtin_image(99, 9).unwrap();
        assert!(newer.target.starts_with("compute_"), "{}", newer.target);
        assert_eq!(newer.code.last(), Some(&0));
    }

    #[test]
    fn without_a_gpu_or_driver_discovery_says_so_and_does_not_panic() {
        if driver_present() {
            let _ = std::io::Write::write_all(
                &mut std::io::stderr(),
                concat!(
                    "skipped: this machine has the CUDA driver library; the GPU check covers it with a GPU",
                    "\n"
                )
                .as_bytes(),
            );
            return;
        }
        let e = CudaBackend::new().device_count().unwrap_err();
        assert_eq!(e.class(), crate::ErrorClass::DeviceLost);
        assert!(e.to_string().contains("CUDA driver library not found"), "{e}");
        assert!(CudaBackend::new().open(0, 0).is_err());
    }
}
