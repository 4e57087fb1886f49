//! AMD GPUs through HIP (cargo feature `hip`).
//!
//! The `sys` layer is hip-runtime-sys 0.1.2 (its build script finds ROCm through `hipconfig`
//! or `HIP_PATH` and links `libamdhip64`). Its functions return `hipError_t` as a Rust enum,
//! and a code the bindings do not list would be undefined behaviour, so the calls used here
//! are declared again with a plain `c_int` return: every code, known or not, is safe and is
//! classified by [`crate::error::classify`]. Only symbols present in ROCm 5.2 (Debian's
//! `libamdhip64-dev`) are used; `hipDeviceProp_t`, whose layout changes between ROCm
//! versions, is avoided.
//!
//! The built-in kernels (`kernels/builtin.cu`) are compiled by `hipcc` at build time into one
//! code-object bundle for the architectures in `HIP_OFFLOAD_ARCHS` (default
//! `gfx908;gfx90a;gfx1030`); `hipModuleLoadData` picks the device's. Large host↔device
//! copies go through a pinned staging buffer (`hipHostMalloc`).
//!
//! `unsafe` lives in this file only; each block says why it is sound.
#![allow(unsafe_code)]

use std::collections::HashMap;
use std::ffi::{CString, c_char, c_int, c_uint, c_void};

use hip_runtime_sys as _; // links libamdhip64

use crate::backend::args::PackedArgs;
use crate::backend::gpu::{GpuCalls, GpuModule, Launch};
use crate::backend::table::{DeviceBuffer, PinnedRanges, Tables};
use crate::backend::{Backend, BackendKind, DeviceContext};
use crate::error::{Api, GpuError, InvalidReason, hip as code};
use crate::op::{DeviceInfo, MemInfo, ModuleHandle, ModuleSource, OpKind};

/// The built-in kernels as a HIP code-object bundle, compiled by the build script.
pub const BUILTIN_CODE_OBJECT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/builtin_hip.co"));

/// Copies of at least this many bytes go through the pinned staging buffer.
pub const STAGING_THRESHOLD: usize = 1 << 20;
/// Size of the pinned staging buffer.
pub const STAGING_BYTES: usize = 64 << 20;

const MEMCPY_HOST_TO_DEVICE: c_int = 1;
const MEMCPY_DEVICE_TO_HOST: c_int = 2;
const MEMCPY_DEVICE_TO_DEVICE: c_int = 3;
const ATTR_COMPUTE_CAPABILITY_MAJOR: c_int = 23;
const ATTR_COMPUTE_CAPABILITY_MINOR: c_int = 61;

mod ffi {
    use std::ffi::{c_char, c_int, c_uint, c_void};

    // The HIP runtime API, with `hipError_t` read as a plain int (see the module docs).
    unsafe extern "C" {
        pub(super) fn hipGetDeviceCount(count: *mut c_int) -> c_int;
        pub(super) fn hipSetDevice(device: c_int) -> c_int;
        pub(super) fn hipDeviceGetName(name: *mut c_char, len: c_int, device: c_int) -> c_int;
        pub(super) fn hipDeviceTotalMem(bytes: *mut usize, device: c_int) -> c_int;
        pub(super) fn hipDeviceGetAttribute(value: *mut c_int, attr: c_int, device: c_int) -> c_int;
        pub(super) fn hipMalloc(ptr: *mut *mut c_void, size: usize) -> c_int;
        pub(super) fn hipFree(ptr: *mut c_void) -> c_int;
        pub(super) fn hipHostMalloc(ptr: *mut *mut c_void, size: usize, flags: c_uint) -> c_int;
        pub(super) fn hipHostFree(ptr: *mut c_void) -> c_int;
        pub(super) fn hipHostRegister(ptr: *mut c_void, size: usize, flags: c_uint) -> c_int;
        pub(super) fn hipHostUnregister(ptr: *mut c_void) -> c_int;
        pub(super) fn hipMemcpy(dst: *mut c_void, src: *const c_void, size: usize, kind: c_int) -> c_int;
        pub(super) fn hipMemset(dst: *mut c_void, value: c_int, size: usize) -> c_int;
        pub(super) fn hipDeviceSynchronize() -> c_int;
        pub(super) fn hipMemGetInfo(free: *mut usize, total: *mut usize) -> c_int;
        pub(super) fn hipModuleLoadData(module: *mut *mut c_void, image: *const c_void) -> c_int;
        pub(super) fn hipModuleUnload(module: *mut c_void) -> c_int;
        pub(super) fn hipModuleGetFunction(f: *mut *mut c_void, module: *mut c_void, name: *const c_char) -> c_int;
        #[allow(clippy::too_many_arguments)]
        pub(super) fn hipModuleLaunchKernel(
            f: *mut c_void,
            grid_x: c_uint,
            grid_y: c_uint,
            grid_z: c_uint,
            block_x: c_uint,
            block_y: c_uint,
            block_z: c_uint,
            shared_mem_bytes: c_uint,
            stream: *mut c_void,
            params: *mut *mut c_void,
            extra: *mut *mut c_void,
        ) -> c_int;
    }
}

/// A HIP status as a `Result`: 0 is success, any other code an API error of `op`.
fn check(status: c_int, op: OpKind, device: u32, call: &str) -> Result<(), GpuError> {
    if status == 0 {
        Ok(())
    } else {
        Err(GpuError::api_with(Api::Hip, status, op, device, call))
    }
}

/// HIP's device discovery.
#[derive(Debug, Default, Clone, Copy)]
pub struct HipBackend;

impl HipBackend {
    /// The HIP backend.
    pub fn new() -> HipBackend {
        HipBackend
    }
}

impl Backend for HipBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Hip
    }

    fn device_count(&self) -> Result<u32, GpuError> {
        let mut n: c_int = 0;
        // SAFETY: `n` is a valid out-pointer for the duration of the call.
        let status = unsafe { ffi::hipGetDeviceCount(&mut n) };
        let no_device = |status: c_int| {
            let name = crate::error::code_name(Api::Hip, status);
            GpuError::api_with(
                Api::Hip,
                status,
                OpKind::DeviceInfo,
                0,
                format!("no HIP device was found ({name})"),
            )
        };
        if status != 0 {
            return Err(no_device(status));
        }
        if n <= 0 {
            return Err(no_device(code::NO_DEVICE));
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
        let d = device as c_int;
        let mut name = [0 as c_char; 256];
        // SAFETY: the buffer is 256 bytes and its length is passed; HIP writes a
        // NUL-terminated string into it.
        check(
            unsafe { ffi::hipDeviceGetName(name.as_mut_ptr(), name.len() as c_int, d) },
            op,
            device,
            "hipDeviceGetName",
        )?;
        let mut total: usize = 0;
        // SAFETY: `total` is a valid out-pointer.
        check(
            unsafe { ffi::hipDeviceTotalMem(&mut total, d) },
            op,
            device,
            "hipDeviceTotalMem",
        )?;
        let (mut major, mut minor): (c_int, c_int) = (0, 0);
        // SAFETY: valid out-pointers; the attribute ids are those of ROCm ≥ 5.0.
        check(
            unsafe { ffi::hipDeviceGetAttribute(&mut major, ATTR_COMPUTE_CAPABILITY_MAJOR, d) },
            op,
            device,
            "hipDeviceGetAttribute",
        )?;
        // SAFETY: as above.
        check(
            unsafe { ffi::hipDeviceGetAttribute(&mut minor, ATTR_COMPUTE_CAPABILITY_MINOR, d) },
            op,
            device,
            "hipDeviceGetAttribute",
        )?;
        let bytes: Vec<u8> = name.iter().take_while(|c| **c != 0).map(|c| *c as u8).collect();
        Ok(DeviceInfo {
            index: device,
            name: String::from_utf8_lossy(&bytes).into_owned(),
            total_memory: total as u64,
            arch: format!("amdgpu cc {major}.{minor}"),
        })
    }

    fn open(&self, device: u32, epoch: u64) -> Result<Box<dyn DeviceContext>, GpuError> {
        let info = self.device_info(device)?;
        // SAFETY: plain call; HIP binds the device to the calling (executor) thread.
        check(
            unsafe { ffi::hipSetDevice(device as c_int) },
            OpKind::DeviceInfo,
            device,
            "hipSetDevice",
        )?;
        Ok(Box::new(HipDevice {
            info,
            t: Tables::new(device, epoch),
            staging: None,
            pinned: PinnedRanges::default(),
        }))
    }
}

#[derive(Debug)]
pub(crate) struct HipBuffer {
    ptr: *mut c_void,
    len: u64,
}

impl DeviceBuffer for HipBuffer {
    fn byte_len(&self) -> u64 {
        self.len
    }
}

#[derive(Debug)]
pub(crate) struct HipModule {
    module: *mut c_void,
    builtin: bool,
    functions: HashMap<String, *mut c_void>,
}

/// One HIP device's context: its buffers, modules and pinned staging buffer.
#[derive(Debug)]
pub struct HipDevice {
    info: DeviceInfo,
    t: Tables<HipBuffer, HipModule>,
    staging: Option<*mut c_void>,
    /// Host memory registered as pinned.
    pinned: PinnedRanges,
}

// SAFETY: the raw pointers are HIP device, module and pinned-host handles, valid on any
// thread of the process; a `HipDevice` is used by one executor thread at a time (it is
// moved there, never shared), which is what `Send` promises.
unsafe impl Send for HipDevice {}

impl HipDevice {
    fn dev(&self) -> u32 {
        self.info.index
    }

    fn check(&self, status: c_int, op: OpKind, call: &str) -> Result<(), GpuError> {
        check(status, op, self.dev(), call)
    }

    fn staging(&mut self, op: OpKind) -> Result<*mut c_void, GpuError> {
        if let Some(p) = self.staging {
            return Ok(p);
        }
        let mut p = std::ptr::null_mut();
        // SAFETY: `p` is a valid out-pointer; flags 0 = default pinned allocation.
        self.check(
            unsafe { ffi::hipHostMalloc(&mut p, STAGING_BYTES, 0) },
            op,
            "hipHostMalloc",
        )?;
        self.staging = Some(p);
        Ok(p)
    }

    fn function(&mut self, module: &ModuleHandle, name: &str) -> Result<*mut c_void, GpuError> {
        let op = OpKind::Launch;
        let unknown = || InvalidReason::UnknownKernel { name: name.to_string() };
        let cname = CString::new(name).map_err(|_| self.t.invalid(op, unknown()))?;
        let dev = self.dev();
        let m = self
            .t
            .modules
            .get_mut(&module.id)
            .ok_or_else(|| GpuError::invalid(op, dev, unknown()))?;
        if let Some(f) = m.functions.get(name) {
            return Ok(*f);
        }
        let mut f = std::ptr::null_mut();
        // SAFETY: `m.module` is a live module of this context; `cname` is NUL-terminated.
        check(
            unsafe { ffi::hipModuleGetFunction(&mut f, m.module, cname.as_ptr()) },
            op,
            dev,
            "hipModuleGetFunction",
        )?;
        m.functions.insert(name.to_string(), f);
        Ok(f)
    }
}

impl GpuModule for HipModule {
    fn builtin(&self) -> bool {
        self.builtin
    }
}

impl GpuCalls for HipDevice {
    type Ptr = *mut c_void;
    type Buffer = HipBuffer;
    type Module = HipModule;

    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn tables(&self) -> &Tables<HipBuffer, HipModule> {
        &self.t
    }

    fn tables_mut(&mut self) -> &mut Tables<HipBuffer, HipModule> {
        &mut self.t
    }

    fn address(buffer: &HipBuffer, offset: u64) -> *mut c_void {
        buffer.ptr.cast::<u8>().wrapping_add(offset as usize).cast()
    }

    fn malloc(&mut self, bytes: u64) -> Result<HipBuffer, GpuError> {
        let mut ptr = std::ptr::null_mut();
        let size = usize::try_from(bytes).unwrap_or(usize::MAX);
        // SAFETY: `ptr` is a valid out-pointer.
        self.check(unsafe { ffi::hipMalloc(&mut ptr, size) }, OpKind::Alloc, "hipMalloc")?;
        Ok(HipBuffer { ptr, len: bytes })
    }

    fn free(&mut self, buffer: &HipBuffer) -> Result<(), GpuError> {
        // SAFETY: the pointer came from hipMalloc in this context and is freed once (the
        // table entry is gone once this succeeds).
        self.check(unsafe { ffi::hipFree(buffer.ptr) }, OpKind::Free, "hipFree")
    }

    fn copy_device_to_device(&mut self, dst: *mut c_void, src: *mut c_void, len: usize) -> Result<(), GpuError> {
        // SAFETY: both ranges lie inside live buffers and do not overlap (checked).
        self.check(
            unsafe { ffi::hipMemcpy(dst, src, len, MEMCPY_DEVICE_TO_DEVICE) },
            OpKind::CopyDeviceToDevice,
            "hipMemcpy",
        )
    }

    fn memset(&mut self, dst: *mut c_void, value: u8, len: usize) -> Result<(), GpuError> {
        // SAFETY: the range lies inside a live buffer (checked).
        self.check(
            unsafe { ffi::hipMemset(dst, c_int::from(value), len) },
            OpKind::Memset,
            "hipMemset",
        )
    }

    fn synchronize(&mut self) -> Result<(), GpuError> {
        // SAFETY: plain call.
        self.check(
            unsafe { ffi::hipDeviceSynchronize() },
            OpKind::Synchronize,
            "hipDeviceSynchronize",
        )
    }

    fn mem_info(&mut self) -> Result<MemInfo, GpuError> {
        let (mut free, mut total) = (0usize, 0usize);
        // SAFETY: valid out-pointers.
        self.check(
            unsafe { ffi::hipMemGetInfo(&mut free, &mut total) },
            OpKind::MemInfo,
            "hipMemGetInfo",
        )?;
        Ok(MemInfo {
            free: free as u64,
            total: total as u64,
        })
    }

    fn copy_to_device(&mut self, dst: *mut c_void, data: &[u8]) -> Result<(), GpuError> {
        let op = OpKind::CopyToDevice;
        if data.len() < STAGING_THRESHOLD || self.pinned.contains(data) {
            // SAFETY: `dst` lies inside a live device buffer with room for `data` (checked by
            // the tables); `data` is a live host slice of that length.
            return self.check(
                unsafe { ffi::hipMemcpy(dst, data.as_ptr().cast(), data.len(), MEMCPY_HOST_TO_DEVICE) },
                op,
                "hipMemcpy",
            );
        }
        let stage = self.staging(op)?;
        for (i, chunk) in data.chunks(STAGING_BYTES).enumerate() {
            let to = dst.cast::<u8>().wrapping_add(i * STAGING_BYTES).cast::<c_void>();
            // SAFETY: the staging buffer holds STAGING_BYTES ≥ chunk.len() bytes and does not
            // overlap the host slice; `to` lies inside the device buffer (checked range).
            unsafe {
                std::ptr::copy_nonoverlapping(chunk.as_ptr(), stage.cast::<u8>(), chunk.len());
                self.check(
                    ffi::hipMemcpy(to, stage, chunk.len(), MEMCPY_HOST_TO_DEVICE),
                    op,
                    "hipMemcpy",
                )?;
            }
        }
        Ok(())
    }

    fn copy_from_device(&mut self, src: *mut c_void, len: usize) -> Result<Vec<u8>, GpuError> {
        let op = OpKind::CopyFromDevice;
        let mut out = vec![0u8; len];
        if len < STAGING_THRESHOLD {
            // SAFETY: `out` has `len` bytes; `src` lies inside a device buffer with `len`
            // readable bytes (checked range).
            self.check(
                unsafe { ffi::hipMemcpy(out.as_mut_ptr().cast(), src, len, MEMCPY_DEVICE_TO_HOST) },
                op,
                "hipMemcpy",
            )?;
            return Ok(out);
        }
        let stage = self.staging(op)?;
        for (i, chunk) in out.chunks_mut(STAGING_BYTES).enumerate() {
            let from = src.cast::<u8>().wrapping_add(i * STAGING_BYTES).cast::<c_void>();
            // SAFETY: as in `copy_to_device`, in the other direction.
            unsafe {
                self.check(
                    ffi::hipMemcpy(stage, from, chunk.len(), MEMCPY_DEVICE_TO_HOST),
                    op,
                    "hipMemcpy",
                )?;
                std::ptr::copy_nonoverlapping(stage.cast::<u8>(), chunk.as_mut_ptr(), chunk.len());
            }
        }
        Ok(out)
    }

    fn load(&mut self, source: &ModuleSource) -> Result<HipModule, GpuError> {
        let op = OpKind::LoadModule;
        let (image, builtin): (&[u8], bool) = match source {
            ModuleSource::Builtin => (BUILTIN_CODE_OBJECT, true),
            ModuleSource::Image(p) => (p.as_bytes(), false),
        };
        if image.is_empty() {
            return Err(self.t.invalid(
                op,
                InvalidReason::BadModuleImage {
                    reason: "empty image".into(),
                },
            ));
        }
        let mut module = std::ptr::null_mut();
        // SAFETY: `image` is a live byte slice for the duration of the call; HIP copies
        // what it needs and rejects malformed images with an error code.
        self.check(
            unsafe { ffi::hipModuleLoadData(&mut module, image.as_ptr().cast()) },
            op,
            "hipModuleLoadData",
        )?;
        Ok(HipModule {
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
        let mut packed = PackedArgs::pack(args, |b| self.device_ptr(kind, b, 0).map(|p| p as u64))?;
        let mut params = packed.pointers();
        // SAFETY: `f` is a function of a live module of this context; `params` holds one
        // pointer per argument into `packed`, which outlives the call; the dimensions were
        // checked; a null stream is the default stream and a null `extra` is allowed.
        let status = unsafe {
            ffi::hipModuleLaunchKernel(
                f,
                grid.x,
                grid.y,
                grid.z,
                block.x,
                block.y,
                block.z,
                shared_mem_bytes as c_uint,
                std::ptr::null_mut(),
                params.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        };
        self.check(status, kind, "hipModuleLaunchKernel")
    }

    fn pinned(&mut self) -> &mut PinnedRanges {
        &mut self.pinned
    }

    fn host_register(&mut self, bytes: &[u8]) -> bool {
        // SAFETY: `bytes` is mapped memory the caller keeps mapped until it unregisters it;
        // flags 0 = hipHostRegisterDefault.
        unsafe { ffi::hipHostRegister(bytes.as_ptr().cast_mut().cast(), bytes.len(), 0) == 0 }
    }

    fn host_unregister(&mut self, bytes: &[u8]) {
        // SAFETY: the range was registered by `host_register` and is still mapped.
        let _ = unsafe { ffi::hipHostUnregister(bytes.as_ptr().cast_mut().cast()) };
    }
}

impl Drop for HipDevice {
    /// Frees what the context holds; errors cannot be reported from `drop` and a poisoned
    /// context fails every call anyway, so they are ignored.
    fn drop(&mut self) {
        for (_, b) in self.t.buffers.drain() {
            // SAFETY: each pointer came from hipMalloc and is freed once.
            let _ = unsafe { ffi::hipFree(b.ptr) };
        }
        for (_, m) in self.t.modules.drain() {
            // SAFETY: each module came from hipModuleLoadData and is unloaded once.
            let _ = unsafe { ffi::hipModuleUnload(m.module) };
        }
        if let Some(p) = self.staging.take() {
            // SAFETY: the staging buffer came from hipHostMalloc and is freed once.
            let _ = unsafe { ffi::hipHostFree(p) };
        }
        for start in self.pinned.drain() {
            // SAFETY: each range was registered once and is still mapped by its owner.
            let _ = unsafe { ffi::hipHostUnregister(start as *mut c_void) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_map_to_the_taxonomy_with_the_call_named() {
        let e = check(700, OpKind::Synchronize, 3, "hipDeviceSynchronize").unwrap_err();
        assert_eq!(e.class(), crate::ErrorClass::Sticky);
        assert!(e.to_string().contains("hipErrorIllegalAddress"), "{e}");
        assert!(e.to_string().contains("hipDeviceSynchronize"), "{e}");
        assert_eq!(
            check(2, OpKind::Alloc, 0, "hipMalloc").unwrap_err().class(),
            crate::ErrorClass::Transient
        );
        assert_eq!(
            check(100, OpKind::DeviceInfo, 0, "x").unwrap_err().class(),
            crate::ErrorClass::DeviceLost
        );
        // A code no binding lists is still safe, and sticky.
        assert_eq!(
            check(12345, OpKind::Launch, 0, "x").unwrap_err().class(),
            crate::ErrorClass::Sticky
        );
        assert!(check(0, OpKind::Launch, 0, "x").is_ok());
    }

    #[test]
    fn the_builtin_code_object_is_an_offload_bundle() {
        assert!(
            BUILTIN_CODE_OBJECT.starts_with(b"__CLANG_OFFLOAD_BUNDLE__"),
            "built by hipcc --genco"
        );
    }

    #[test]
    fn without_a_gpu_discovery_says_no_device_was_found_and_does_not_panic() {
        // CI machines have libamdhip64 but no AMD GPU (no /dev/kfd).
        if std::path::Path::new("/dev/kfd").exists() {
            return;
        }
        let e = HipBackend::new().device_count().unwrap_err();
        assert_eq!(e.class(), crate::ErrorClass::DeviceLost, "{e}");
        assert!(e.to_string().contains("no HIP device was found"), "{e}");
    }
}
