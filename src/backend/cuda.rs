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
use std::ffi::{CString, c_char, c_void};
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::{CudaContext, DriverError, result, sys};
use cudarc::nvrtc::{CompileOptions, compile_ptx_with_opts};

use crate::backend::args::PackedArgs;
use crate::backend::gpu::{GpuCalls, GpuModule, Launch};
use crate::backend::table::{DeviceBuffer, PinnedRanges, Tables};
use crate::backend::{Backend, BackendKind, DeviceContext};
use crate::error::{Api, GpuError, InvalidReason, cuda as code};
use crate::op::{DeviceInfo, MemInfo, ModuleHandle, ModuleSource, OpKind};

/// The built-in kernels' source, compiled by NVRTC for the device present.
pub const BUILTIN_SOURCE: &str = include_str!("../../kernels/builtin.cu");

/// Copies of at least this many bytes go through the pinned staging buffer.
pub const STAGING_THRESHOLD: usize = 1 << 20;
/// Size of the pinned staging buffer.
pub const STAGING_BYTES: usize = 64 << 20;

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

fn err(e: DriverError, op: OpKind, device: u32, call: &str) -> GpuError {
    GpuError::api_with(Api::CudaDriver, e.0 as i32, op, device, call)
}

/// The NVRTC architecture option for a compute capability.
fn compute_arch(major: i32, minor: i32) -> &'static str {
    static ARCHS: OnceLock<Mutex<HashMap<(i32, i32), &'static str>>> = OnceLock::new();
    let mut map = ARCHS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    map.entry((major, minor))
        .or_insert_with(|| Box::leak(format!("compute_{major}{minor}").into_boxed_str()))
}

/// The built-in kernels as PTX for `arch`, compiled once per process.
fn builtin_ptx(arch: &'static str) -> Result<Arc<String>, String> {
    static CACHE: OnceLock<Mutex<HashMap<&'static str, Arc<String>>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    if let Some(p) = cache.lock().unwrap_or_else(|p| p.into_inner()).get(arch) {
        return Ok(p.clone());
    }
    if !nvrtc_present() {
        return Err(
            "NVRTC library not found (libnvrtc.so and libnvrtc-builtins.so): it compiles the built-in kernels".into(),
        );
    }
    let opts = CompileOptions {
        arch: Some(arch),
        fmad: Some(true),
        ..Default::default()
    };
    let ptx = compile_ptx_with_opts(BUILTIN_SOURCE, opts).map_err(|e| format!("NVRTC failed for {arch}: {e:?}"))?;
    let ptx = Arc::new(ptx.to_src());
    cache
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(arch, ptx.clone());
    Ok(ptx)
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

impl Backend for CudaBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Cuda
    }

    fn device_count(&self) -> Result<u32, GpuError> {
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
        Ok(n as u32)
    }

    fn device_info(&self, device: u32) -> Result<DeviceInfo, GpuError> {
        let count = self.device_count()?;
        if device >= count {
            return Err(GpuError::invalid(
                OpKind::DeviceInfo,
                device,
                InvalidReason::DeviceOutOfRange { device, count },
            ));
        }
        let op = OpKind::DeviceInfo;
        let dev = result::device::get(device as i32).map_err(|e| err(e, op, device, "cuDeviceGet"))?;
        let mut name = [0 as c_char; 256];
        // SAFETY: the driver is loaded (checked by device_count); the buffer is 256 bytes
        // and its length is passed.
        unsafe { sys::cuDeviceGetName(name.as_mut_ptr(), name.len() as i32, dev) }
            .result()
            .map_err(|e| err(e, op, device, "cuDeviceGetName"))?;
        // SAFETY: `dev` is a valid device handle.
        let total = unsafe { result::device::total_mem(dev) }.map_err(|e| err(e, op, device, "cuDeviceTotalMem"))?;
        let (major, minor) = compute_capability(dev).map_err(|e| err(e, op, device, "cuDeviceGetAttribute"))?;
        let bytes: Vec<u8> = name.iter().take_while(|c| **c != 0).map(|c| *c as u8).collect();
        Ok(DeviceInfo {
            index: device,
            name: String::from_utf8_lossy(&bytes).into_owned(),
            total_memory: total as u64,
            arch: format!("sm_{major}{minor}"),
        })
    }

    fn open(&self, device: u32, epoch: u64) -> Result<Box<dyn DeviceContext>, GpuError> {
        let info = self.device_info(device)?;
        let op = OpKind::DeviceInfo;
        let ctx = CudaContext::new(device as usize).map_err(|e| err(e, op, device, "cuDevicePrimaryCtxRetain"))?;
        ctx.bind_to_thread()
            .map_err(|e| err(e, op, device, "cuCtxSetCurrent"))?;
        let (major, minor) = ctx
            .compute_capability()
            .map_err(|e| err(e, op, device, "cuDeviceGetAttribute"))?;
        Ok(Box::new(CudaDevice {
            ctx,
            arch: compute_arch(major, minor),
            info,
            t: Tables::new(device, epoch),
            staging: None,
            pinned: PinnedRanges::default(),
        }))
    }
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
    functions: HashMap<String, sys::CUfunction>,
}

/// One CUDA device's context: buffers, modules and the pinned staging buffer.
#[derive(Debug)]
pub struct CudaDevice {
    ctx: Arc<CudaContext>,
    arch: &'static str,
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

    fn function(&mut self, module: &ModuleHandle, name: &str) -> Result<sys::CUfunction, GpuError> {
        let op = OpKind::Launch;
        let dev = self.dev();
        let unknown = || GpuError::invalid(op, dev, InvalidReason::UnknownKernel { name: name.to_string() });
        let cname = CString::new(name).map_err(|_| unknown())?;
        let m = self.t.modules.get_mut(&module.id).ok_or_else(unknown)?;
        if let Some(f) = m.functions.get(name) {
            return Ok(*f);
        }
        // SAFETY: `m.module` is a live module of this context.
        let f = unsafe { result::module::get_function(m.module, cname) }
            .map_err(|e| err(e, op, dev, "cuModuleGetFunction"))?;
        m.functions.insert(name.to_string(), f);
        Ok(f)
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
        let stage = self.staging(op)?;
        for (i, chunk) in data.chunks(STAGING_BYTES).enumerate() {
            // SAFETY: the staging buffer holds STAGING_BYTES ≥ chunk.len() pinned bytes, used
            // by this thread only; the device range lies inside the buffer (checked).
            unsafe {
                let pinned = std::slice::from_raw_parts_mut(stage.cast::<u8>(), chunk.len());
                pinned.copy_from_slice(chunk);
                result::memcpy_htod_sync(dst + (i * STAGING_BYTES) as u64, &*pinned)
                    .map_err(|e| self.err(e, op, "cuMemcpyHtoD"))?;
            }
        }
        Ok(())
    }

    fn copy_from_device(&mut self, src: sys::CUdeviceptr, len: usize) -> Result<Vec<u8>, GpuError> {
        let op = OpKind::CopyFromDevice;
        let mut out = vec![0u8; len];
        if len < STAGING_THRESHOLD {
            // SAFETY: `src` lies inside a live device buffer with `len` readable bytes.
            unsafe { result::memcpy_dtoh_sync(&mut out, src) }.map_err(|e| self.err(e, op, "cuMemcpyDtoH"))?;
            return Ok(out);
        }
        let stage = self.staging(op)?;
        for (i, chunk) in out.chunks_mut(STAGING_BYTES).enumerate() {
            // SAFETY: as in `copy_to_device`, in the other direction.
            unsafe {
                let pinned = std::slice::from_raw_parts_mut(stage.cast::<u8>(), chunk.len());
                result::memcpy_dtoh_sync(pinned, src + (i * STAGING_BYTES) as u64)
                    .map_err(|e| self.err(e, op, "cuMemcpyDtoH"))?;
                chunk.copy_from_slice(pinned);
            }
        }
        Ok(out)
    }

    fn load(&mut self, source: &ModuleSource) -> Result<CudaModule, GpuError> {
        let op = OpKind::LoadModule;
        let bad = |reason: String| GpuError::invalid(op, self.dev(), InvalidReason::BadModuleImage { reason });
        let (image, builtin): (Vec<u8>, bool) = match source {
            ModuleSource::Builtin => {
                let ptx = builtin_ptx(self.arch).map_err(bad)?;
                (nul_terminated(ptx.as_bytes()), true)
            }
            // PTX is text and must be NUL-terminated; cubin and fatbin are binary.
            ModuleSource::Image(p) if looks_like_ptx(p.as_bytes()) => (nul_terminated(p.as_bytes()), false),
            ModuleSource::Image(p) if p.is_empty() => return Err(bad("empty image".into())),
            ModuleSource::Image(p) => (p.to_vec(), false),
        };
        // SAFETY: the context is bound to this thread; `image` is a live buffer holding a
        // NUL-terminated PTX string or a cubin/fatbin; the driver rejects malformed images.
        let module = unsafe { result::module::load_data(image.as_ptr().cast()) }
            .map_err(|e| self.err(e, op, "cuModuleLoadData"))?;
        Ok(CudaModule {
            module,
            builtin,
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
        let f = self.function(module, function)?;
        let mut packed = PackedArgs::pack(args, |b| self.device_ptr(kind, b, 0))?;
        let mut params = packed.pointers();
        // SAFETY: `f` belongs to a live module of the bound context; `params` holds one
        // pointer per argument into `packed`, which outlives the call; the dimensions were
        // checked; a null stream is the context's default stream.
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

fn looks_like_ptx(bytes: &[u8]) -> bool {
    let head = &bytes[..bytes.len().min(4096)];
    std::str::from_utf8(head).is_ok_and(|s| s.contains(".version") || s.contains(".target"))
}

fn nul_terminated(bytes: &[u8]) -> Vec<u8> {
    let mut v = bytes.to_vec();
    if v.last() != Some(&0) {
        v.push(0);
    }
    v
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
    fn ptx_is_told_from_cubin_and_nul_terminated() {
        assert!(looks_like_ptx(b"//\n.version 8.0\n.target sm_90\n"));
        assert!(!looks_like_ptx(&[0x7f, b'E', b'L', b'F', 0, 1, 2]));
        assert_eq!(nul_terminated(b"ab"), b"ab\0");
        assert_eq!(nul_terminated(b"ab\0"), b"ab\0");
        assert_eq!(compute_arch(9, 0), "compute_90");
        assert!(std::ptr::eq(compute_arch(9, 0), compute_arch(9, 0)));
    }

    #[test]
    fn without_a_driver_discovery_says_so_and_does_not_panic() {
        if driver_present() {
            return;
        }
        let e = CudaBackend::new().device_count().unwrap_err();
        assert_eq!(e.class(), crate::ErrorClass::DeviceLost);
        assert!(e.to_string().contains("CUDA driver library not found"), "{e}");
        assert!(CudaBackend::new().open(0, 0).is_err());
    }
}
