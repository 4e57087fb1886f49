//! AMD GPUs through HIP (cargo feature `hip`).
//!
//! The `sys` layer is hip-runtime-sys 0.1.2 (its build script finds ROCm through `hipconfig`
//! or `HIP_PATH` and links `libamdhip64`). Its functions return `hipError_t` as a Rust enum,
//! and a code the bindings do not list would be undefined behaviour, so the calls used here
//! are declared again with a plain `c_int` return: every code, known or not, is safe and is
//! classified by [`crate::error::classify`]. Only symbols present in ROCm 5.2 (Debian's
//! `libamdhip64-dev`) are linked; the few that differ between ROCm generations are looked up
//! at run time (see "Device information").
//!
//! # Built-in kernels
//!
//! `kernels/builtin.cu` is compiled by `hipcc` at build time into one code-object bundle for
//! every architecture the build's hipcc accepts (see `build.rs`; the list is
//! [`builtin_archs`]), and `hipModuleLoadData` picks the device's. When the bundle has no
//! code for the device — its architecture's base name (`gfx942` of
//! `gfx942:sramecc+:xnack-`) is not in the list, or the runtime answers
//! `hipErrorNoBinaryForGpu` (209), `hipErrorInvalidImage` (200) or
//! `hipErrorInvalidKernelFile` (218) for the bundle — the kernels are compiled at run time
//! by **hiprtc** for the device's full architecture name ([`compile_builtin`]), once per
//! process and architecture (the code object is cached in memory). hiprtc is loaded with
//! `dlopen`, never linked, because it lives in different libraries in different ROCm
//! generations: `libhiprtc.so.N` (ROCm 5.3 and later; the major version of the HIP runtime
//! in use is tried first), else the hiprtc built into `libamdhip64` (ROCm 5.2 and older).
//! Before compiling, the target is checked against the code-object manager's list
//! (`libamd_comgr`'s ISA names) where that library can be found, because ROCm 5.2's hiprtc
//! aborts the process (a double free in comgr) when asked for a target it does not know. A
//! compilation that fails is an `InvalidRequest` (`BadModuleImage`) naming the hiprtc library
//! used (or that none was found) and carrying hiprtc's log.
//!
//! # Device information
//!
//! - `arch` is the device's `gcnArchName` (`gfx90a:sramecc+:xnack-`). ROCm has no call that
//!   returns it outside `hipDeviceProp_t`, whose layout differs between generations, so the
//!   properties are read into a zeroed 8 KiB buffer (larger than any layout) through the
//!   symbol that names its layout: `hipGetDevicePropertiesR0600` (ROCm 6 and 7: the field at
//!   byte 1160 of a 1472-byte struct) where the library has it, else `hipGetDeviceProperties`
//!   (ROCm 5, whose struct is ROCm 6's `hipDeviceProp_tR0000`: the field at byte 396 of 792;
//!   ROCm 6 and 7 still export that symbol with that layout). Both offsets were measured with
//!   `offsetof` against the headers. The name is accepted only if it is NUL-terminated
//!   printable ASCII starting with `gfx`; otherwise `arch` says the architecture is unknown
//!   (with the compute capability) and no run-time compilation is attempted.
//! - `pci_bus_id` comes from `hipDeviceGetPCIBusId` (`0000:c1:00.0`) and `uuid` from
//!   `hipDeviceGetUuid` (ROCm 5.1+, looked up at run time): ROCm's UUID is 16 ASCII hex
//!   digits, reported as `GPU-` and those digits, as `rocm-smi` prints it; binary UUIDs are
//!   printed as `GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`; none when the device has none.
//!
//! # Device order
//!
//! Device `i` of this backend is the `i`-th HIP ordinal in order of PCI bus id (domain, bus,
//! device, function), so indices are stable whatever order the runtime enumerates in, and
//! match `lspci`. `HIP_VISIBLE_DEVICES` / `ROCR_VISIBLE_DEVICES` still apply first: the
//! backend orders the devices HIP shows it. Devices whose bus id cannot be read come last,
//! in HIP's order.
//!
//! # What HIP cannot check, and what the backend does about it
//!
//! - A kernel launched with too few arguments: HIP reads as many argument pointers as the
//!   kernel has parameters. The pointer array passed is padded with [`ARGUMENT_PADDING`]
//!   pointers to zeroed memory, so missing arguments read as zeros instead of host memory
//!   past the array (built-in kernels' arguments are checked before the launch).
//! - A module image has no length: `hipModuleLoadData` reads as far as the image's headers
//!   say. User images are checked first ([`check_code_object`]: an ELF code object, a clang
//!   offload bundle or a compressed bundle whose headers stay inside the bytes given), and
//!   copied into an aligned buffer that lives as long as the module (the build's bundle is
//!   copied so too, once per process).
//! - A fault in a kernel: HIP keeps one error state per process, and ROCm may abort the
//!   process on a GPU memory fault. After a `Sticky` error this process refuses to open a
//!   device again ([`HipBackend::open`]); a new context needs a new process.
//!
//! Large host↔device copies go through a pinned staging buffer (`hipHostMalloc`).
//!
//! `unsafe` lives in this file only; each block says why it is sound.
#![allow(unsafe_code)]

use std::collections::HashMap;
use std::ffi::{CString, c_char, c_int, c_uint, c_void};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use hip_runtime_sys as _; // links libamdhip64
use libloading::os::unix::Library;

use crate::backend::args::PackedArgs;
use crate::backend::gpu::{GpuCalls, GpuModule, Launch};
use crate::backend::table::{DeviceBuffer, PinnedRanges, Tables};
use crate::backend::{Backend, BackendKind, DeviceContext};
use crate::error::{Api, ErrorClass, GpuError, InvalidReason, classify, hip as code};
use crate::op::{DeviceInfo, MemInfo, ModuleHandle, ModuleSource, OpKind};

/// The built-in kernels as a HIP code-object bundle, compiled by the build script.
pub const BUILTIN_CODE_OBJECT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/builtin_hip.co"));

/// The architectures [`BUILTIN_CODE_OBJECT`] has code for, one a line (written by the build
/// script).
const BUILTIN_ARCH_LIST: &str = include_str!(concat!(env!("OUT_DIR"), "/builtin_hip_archs.txt"));

/// The built-in kernels' source, compiled by hiprtc for a device the bundle has no code for.
pub const BUILTIN_SOURCE: &str = include_str!("../../kernels/builtin.cu");

/// Copies of at least this many bytes go through the pinned staging buffer.
pub const STAGING_THRESHOLD: usize = 1 << 20;
/// Size of the pinned staging buffer.
pub const STAGING_BYTES: usize = 64 << 20;

/// How many pointers to zeroed memory follow a launch's argument pointers (see the module
/// docs); each points at 4 KiB of zeros, larger than any one argument.
pub const ARGUMENT_PADDING: usize = 64;
static ZEROS: [u64; 512] = [0; 512];

const MEMCPY_HOST_TO_DEVICE: c_int = 1;
const MEMCPY_DEVICE_TO_HOST: c_int = 2;
const MEMCPY_DEVICE_TO_DEVICE: c_int = 3;
const ATTR_COMPUTE_CAPABILITY_MAJOR: c_int = 23;
const ATTR_COMPUTE_CAPABILITY_MINOR: c_int = 61;
/// `hipDeviceAttributeMaxSharedMemoryPerBlock` (ROCm 5, 6 and 7).
const ATTR_MAX_SHARED_MEMORY_PER_BLOCK: c_int = 74;
/// `HIP_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES`: a kernel's static shared memory.
const FUNC_ATTR_SHARED_SIZE_BYTES: c_int = 1;

/// Bytes read for `hipDeviceProp_t`: more than any ROCm layout (792 in ROCm 5, 1472 in 6/7).
const PROPS_BUFFER_BYTES: usize = 8192;
/// Offset of `gcnArchName` in ROCm 6/7's `hipDeviceProp_tR0600`.
const ARCH_OFFSET_R0600: usize = 1160;
/// Offset of `gcnArchName` in ROCm 5's `hipDeviceProp_t` (= ROCm 6's `hipDeviceProp_tR0000`).
const ARCH_OFFSET_R0000: usize = 396;

mod ffi {
    use std::ffi::{c_char, c_int, c_uint, c_void};

    // The HIP runtime API, with `hipError_t` read as a plain int (see the module docs).
    unsafe extern "C" {
        pub(super) fn hipGetDeviceCount(count: *mut c_int) -> c_int;
        pub(super) fn hipSetDevice(device: c_int) -> c_int;
        pub(super) fn hipDeviceGet(device: *mut c_int, ordinal: c_int) -> c_int;
        pub(super) fn hipDeviceGetName(name: *mut c_char, len: c_int, device: c_int) -> c_int;
        pub(super) fn hipDeviceGetPCIBusId(bus_id: *mut c_char, len: c_int, device: c_int) -> c_int;
        pub(super) fn hipDeviceTotalMem(bytes: *mut usize, device: c_int) -> c_int;
        pub(super) fn hipDeviceGetAttribute(value: *mut c_int, attr: c_int, device: c_int) -> c_int;
        pub(super) fn hipRuntimeGetVersion(version: *mut c_int) -> c_int;
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
        pub(super) fn hipFuncGetAttribute(value: *mut c_int, attr: c_int, f: *mut c_void) -> c_int;
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

    /// `hipGetDeviceProperties` / `hipGetDevicePropertiesR0600`, into a buffer of bytes.
    pub(super) type GetProperties = unsafe extern "C" fn(props: *mut c_void, device: c_int) -> c_int;
    /// `hipDeviceGetUuid` (ROCm 5.1+).
    pub(super) type GetUuid = unsafe extern "C" fn(uuid: *mut [u8; 16], device: c_int) -> c_int;
}

/// The first `Sticky` code a HIP call returned in this process (0: none yet).
static POISONED: AtomicI32 = AtomicI32::new(0);

/// A HIP status as a `Result`: 0 is success, any other code an API error of `op`. A `Sticky`
/// code marks the process as poisoned (see [`HipBackend::open`]).
fn check(status: c_int, op: OpKind, device: u32, call: &str) -> Result<(), GpuError> {
    if status == 0 {
        return Ok(());
    }
    if classify(Api::Hip, status) == ErrorClass::Sticky {
        let _ = POISONED.compare_exchange(0, status, Ordering::Relaxed, Ordering::Relaxed);
    }
    Err(GpuError::api_with(Api::Hip, status, op, device, call))
}

/// The first `Sticky` HIP code this process has seen, if any: after it, this process opens
/// no device again (see [`HipBackend::open`]).
pub fn poisoned() -> Option<i32> {
    match POISONED.load(Ordering::Relaxed) {
        0 => None,
        c => Some(c),
    }
}

/// The HIP runtime's version (`HIP_VERSION`: 50221153 is 5.2.21153), or `None` where the
/// runtime cannot tell.
pub fn runtime_version() -> Option<i32> {
    let mut v: c_int = 0;
    // SAFETY: a valid out-pointer.
    let status = unsafe { ffi::hipRuntimeGetVersion(&mut v) };
    (status == 0 && v > 0).then_some(v)
}

/// [`BUILTIN_CODE_OBJECT`] in 8-byte-aligned memory (`include_bytes!` promises no
/// alignment, and the runtime reads the bundle's headers in place), copied once per process.
fn builtin_bundle() -> Arc<CodeObject> {
    static BUNDLE: OnceLock<Arc<CodeObject>> = OnceLock::new();
    BUNDLE
        .get_or_init(|| Arc::new(CodeObject::new(BUILTIN_CODE_OBJECT)))
        .clone()
}

/// The architectures the built-in code object has code for.
pub fn builtin_archs() -> Vec<&'static str> {
    parse_arch_list(BUILTIN_ARCH_LIST)
}

/// The architectures of a list separated by newlines, `;` or `,` (the build script's output,
/// or `HIP_OFFLOAD_ARCHS`'s syntax).
fn parse_arch_list(list: &str) -> Vec<&str> {
    list.split(['\n', ';', ','])
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .collect()
}

/// The processor of a target id: `gfx90a` of `gfx90a:sramecc+:xnack-`.
pub fn base_arch(arch: &str) -> &str {
    arch.split(':').next().unwrap_or(arch).trim()
}

/// Whether the built-in code object lists `arch`'s processor.
fn bundle_has(archs: &[&str], arch: &str) -> bool {
    let base = base_arch(arch);
    archs.iter().any(|a| base_arch(a) == base)
}

/// A PCI bus id `DDDD:BB:DD.F` (hex) as numbers, to sort by.
fn pci_key(bus_id: &str) -> Option<(u32, u32, u32, u32)> {
    let (domain, rest) = bus_id.trim().split_once(':')?;
    let (bus, rest) = rest.split_once(':')?;
    let (dev, func) = rest.split_once('.')?;
    let hex = |s: &str| u32::from_str_radix(s, 16).ok();
    Some((hex(domain)?, hex(bus)?, hex(dev)?, hex(func)?))
}

/// HIP ordinals with their bus ids, in the backend's device order: by PCI bus id, then (bus
/// id unreadable) in HIP's order.
fn order_by_pci(mut devices: Vec<(c_int, Option<String>)>) -> Vec<(c_int, Option<String>)> {
    devices.sort_by_key(|(ordinal, bus)| {
        (
            bus.as_deref().and_then(pci_key).is_none(),
            bus.as_deref().and_then(pci_key),
            *ordinal,
        )
    });
    devices
}

/// A HIP UUID as text (see the module docs); `None` for a device without one.
fn format_uuid(bytes: [u8; 16]) -> Option<String> {
    if bytes.iter().all(u8::is_ascii_hexdigit) {
        return Some(format!("GPU-{}", String::from_utf8_lossy(&bytes)));
    }
    if bytes.iter().all(|b| *b == 0) {
        return None;
    }
    let text_end = bytes.iter().position(|b| *b == 0).unwrap_or(16);
    if text_end < 16 && bytes[text_end..].iter().all(|b| *b == 0) && bytes[..text_end].iter().all(u8::is_ascii_graphic)
    {
        // A short text such as "XX": ROCm's "no unique id".
        return None;
    }
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    Some(format!(
        "GPU-{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    ))
}

/// The `gcnArchName` field at `offset` of a properties buffer, if it looks like one.
fn arch_name_at(props: &[u8], offset: usize) -> Option<String> {
    let field = props.get(offset..offset + 256)?;
    let end = field.iter().position(|b| *b == 0)?;
    let name = &field[..end];
    (name.starts_with(b"gfx") && name.iter().all(u8::is_ascii_graphic))
        .then(|| String::from_utf8_lossy(name).into_owned())
}

/// Symbols whose presence or layout differs between ROCm generations, looked up once.
struct Optional {
    /// The properties call and the offset of `gcnArchName` in its layout.
    properties: Option<(ffi::GetProperties, usize)>,
    uuid: Option<ffi::GetUuid>,
}

fn optional() -> &'static Optional {
    static OPTIONAL: OnceLock<Optional> = OnceLock::new();
    OPTIONAL.get_or_init(|| {
        let this = Library::this();
        // SAFETY: looks symbols up in the libraries already loaded (libamdhip64 is linked);
        // each is given the type its ROCm header declares.
        unsafe {
            let properties = this
                .get::<ffi::GetProperties>("hipGetDevicePropertiesR0600")
                .map(|f| (*f, ARCH_OFFSET_R0600))
                .or_else(|_| {
                    this.get::<ffi::GetProperties>("hipGetDeviceProperties")
                        .map(|f| (*f, ARCH_OFFSET_R0000))
                })
                .ok();
            let uuid = this.get::<ffi::GetUuid>("hipDeviceGetUuid").map(|f| *f).ok();
            Optional { properties, uuid }
        }
    })
}

/// The device's `gcnArchName`, if the properties call gives a plausible one.
fn gcn_arch_name(ordinal: c_int) -> Option<String> {
    let (get, offset) = optional().properties?;
    let mut buffer = vec![0u64; PROPS_BUFFER_BYTES / 8];
    // SAFETY: the buffer is 8 KiB, zeroed and 8-byte aligned, larger than every ROCm layout
    // of hipDeviceProp_t (at most 1472 bytes), so the call writes inside it.
    let status = unsafe { get(buffer.as_mut_ptr().cast(), ordinal) };
    if status != 0 {
        return None;
    }
    let bytes: Vec<u8> = buffer.iter().flat_map(|w| w.to_ne_bytes()).collect();
    arch_name_at(&bytes, offset)
}

fn pci_bus_id(ordinal: c_int) -> Option<String> {
    let mut buf = [0 as c_char; 64];
    // SAFETY: the buffer is 64 bytes and its length is passed; HIP writes a NUL-terminated
    // string into it.
    let status = unsafe { ffi::hipDeviceGetPCIBusId(buf.as_mut_ptr(), buf.len() as c_int, ordinal) };
    (status == 0).then(|| c_text(&buf)).filter(|s| !s.is_empty())
}

fn uuid(ordinal: c_int) -> Option<String> {
    let get = optional().uuid?;
    let mut device: c_int = 0;
    // SAFETY: a valid out-pointer.
    if unsafe { ffi::hipDeviceGet(&mut device, ordinal) } != 0 {
        return None;
    }
    let mut bytes = [0u8; 16];
    // SAFETY: `bytes` is the 16-byte `hipUUID` the call fills.
    (unsafe { get(&mut bytes, device) } == 0)
        .then_some(())
        .and_then(|_| format_uuid(bytes))
}

fn c_text(buf: &[c_char]) -> String {
    let bytes: Vec<u8> = buf.iter().take_while(|c| **c != 0).map(|c| *c as u8).collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// The HIP ordinals in device order, found once per process.
fn ordinals(op: OpKind) -> Result<&'static [(c_int, Option<String>)], GpuError> {
    static ORDER: OnceLock<Vec<(c_int, Option<String>)>> = OnceLock::new();
    if let Some(order) = ORDER.get() {
        return Ok(order);
    }
    let mut n: c_int = 0;
    // SAFETY: `n` is a valid out-pointer for the duration of the call.
    let status = unsafe { ffi::hipGetDeviceCount(&mut n) };
    let no_device = |status: c_int| {
        let name = crate::error::code_name(Api::Hip, status);
        GpuError::api_with(Api::Hip, status, op, 0, format!("no HIP device was found ({name})"))
    };
    if status != 0 {
        return Err(no_device(status));
    }
    if n <= 0 {
        return Err(no_device(code::NO_DEVICE));
    }
    let devices = (0..n).map(|o| (o, pci_bus_id(o))).collect();
    Ok(ORDER.get_or_init(|| order_by_pci(devices)))
}

/// An image copied into 8-byte-aligned memory with zeroed bytes after it, kept as long as a
/// module loaded from it (HIP may read it after the load).
#[derive(Debug)]
pub struct CodeObject {
    words: Vec<u64>,
    len: usize,
}

impl CodeObject {
    fn new(bytes: &[u8]) -> CodeObject {
        let mut words = vec![0u64; bytes.len().div_ceil(8) + 1];
        for (w, chunk) in words.iter_mut().zip(bytes.chunks(8)) {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            *w = u64::from_ne_bytes(b);
        }
        CodeObject {
            words,
            len: bytes.len(),
        }
    }

    /// The image's bytes.
    pub fn bytes(&self) -> Vec<u8> {
        self.words.iter().flat_map(|w| w.to_ne_bytes()).take(self.len).collect()
    }

    /// The image's length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// `true` for an empty image.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn as_ptr(&self) -> *const c_void {
        self.words.as_ptr().cast()
    }
}

// ---------------------------------------------------------------------------------------
// Code-object checks

const COMPRESSED_MAGIC: &[u8] = b"CCOB";

/// Checks that `image` is a HIP code object whose headers stay inside its bytes, so that
/// `hipModuleLoadData` (which takes no length) reads nothing past it: an ELF code object or
/// a clang offload bundle, checked by [`crate::backend::image::checked`] (PTX and other text
/// are unknown formats here), or a compressed bundle (`CCOB`, ROCm 6.2+'s
/// `--offload-compress`) of version 2 or 3, whose stated size must fit (its contents are
/// checked by the runtime's decompressor).
///
/// # Errors
/// What is wrong, for an `InvalidRequest` (`BadModuleImage`).
pub fn check_code_object(image: &[u8]) -> Result<(), String> {
    if image.starts_with(COMPRESSED_MAGIC) {
        return check_compressed(image);
    }
    crate::backend::image::checked(image, false).map(|_| ())
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// A compressed offload bundle: `CCOB`, version (u16), method (u16), then the whole bundle's
/// size (u32 in version 2, u64 in version 3). Version 1 states no size and is refused.
fn check_compressed(image: &[u8]) -> Result<(), String> {
    let version = u16_at(image, 4).ok_or("truncated compressed bundle header")?;
    let total = match version {
        2 => u32_at(image, 8).map(u64::from),
        3 => u64_at(image, 8),
        _ => {
            return Err(format!(
                "compressed offload bundle version {version}: only versions 2 and 3, which state \
                 their size, can be checked; bundle without compression (drop `--offload-compress`) \
                 or with a newer clang"
            ));
        }
    }
    .ok_or("truncated compressed bundle header")?;
    if total < 24 || total > image.len() as u64 {
        return Err(format!(
            "truncated compressed offload bundle: it states {total} bytes, {} were given",
            image.len()
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// hiprtc

type HiprtcProgram = *mut c_void;

/// The hiprtc calls used, from the library they were found in.
struct Hiprtc {
    /// Which library: `libhiprtc.so.6`, or libamdhip64's built-in hiprtc.
    name: String,
    create: unsafe extern "C" fn(
        *mut HiprtcProgram,
        *const c_char,
        *const c_char,
        c_int,
        *const *const c_char,
        *const *const c_char,
    ) -> c_int,
    compile: unsafe extern "C" fn(HiprtcProgram, c_int, *const *const c_char) -> c_int,
    log_size: unsafe extern "C" fn(HiprtcProgram, *mut usize) -> c_int,
    log: unsafe extern "C" fn(HiprtcProgram, *mut c_char) -> c_int,
    code_size: unsafe extern "C" fn(HiprtcProgram, *mut usize) -> c_int,
    code: unsafe extern "C" fn(HiprtcProgram, *mut c_char) -> c_int,
    destroy: unsafe extern "C" fn(*mut HiprtcProgram) -> c_int,
    error_string: unsafe extern "C" fn(c_int) -> *const c_char,
    /// Keeps the library loaded for the life of the process.
    _library: Library,
}

// SAFETY: function pointers into a library that is never unloaded; hiprtc's calls are
// thread-safe for distinct programs, and compilations are serialised anyway.
unsafe impl Send for Hiprtc {}
// SAFETY: as above.
unsafe impl Sync for Hiprtc {}

impl Hiprtc {
    /// Resolves the hiprtc calls in `library`.
    fn resolve(name: String, library: Library) -> Result<Hiprtc, String> {
        // SAFETY: each symbol is given the signature of hiprtc.h (ROCm 5 and 6: `hiprtcResult`
        // is an int-sized enum, read as `c_int`; `hiprtcProgram` is a pointer).
        unsafe {
            macro_rules! sym {
                ($s:literal) => {
                    *library
                        .get($s)
                        .map_err(|e| format!("{name} has no {}: {e}", $s))?
                };
            }
            Ok(Hiprtc {
                create: sym!("hiprtcCreateProgram"),
                compile: sym!("hiprtcCompileProgram"),
                log_size: sym!("hiprtcGetProgramLogSize"),
                log: sym!("hiprtcGetProgramLog"),
                code_size: sym!("hiprtcGetCodeSize"),
                code: sym!("hiprtcGetCode"),
                destroy: sym!("hiprtcDestroyProgram"),
                error_string: sym!("hiprtcGetErrorString"),
                name,
                _library: library,
            })
        }
    }

    fn error_text(&self, result: c_int) -> String {
        // SAFETY: hiprtcGetErrorString returns a static string (or null) for any value.
        let p = unsafe { (self.error_string)(result) };
        if p.is_null() {
            return format!("hiprtc error {result}");
        }
        // SAFETY: a NUL-terminated static string.
        let text = unsafe { std::ffi::CStr::from_ptr(p) }.to_string_lossy().into_owned();
        format!("{text} ({result})")
    }

    /// Compiles `source` with `options`; the code object, or the error with hiprtc's log.
    fn compile(&self, source: &str, options: &[String]) -> Result<Vec<u8>, String> {
        let src = CString::new(source).map_err(|_| "source holds a NUL byte".to_string())?;
        let opts: Vec<CString> = options
            .iter()
            .map(|o| CString::new(o.as_str()).map_err(|_| format!("option {o:?} holds a NUL byte")))
            .collect::<Result<_, _>>()?;
        let opt_ptrs: Vec<*const c_char> = opts.iter().map(|o| o.as_ptr()).collect();
        let mut program: HiprtcProgram = std::ptr::null_mut();
        // SAFETY: valid NUL-terminated strings; no headers (0, null arrays).
        let r = unsafe {
            (self.create)(
                &mut program,
                src.as_ptr(),
                c"hipvisor_builtin.hip".as_ptr(),
                0,
                std::ptr::null(),
                std::ptr::null(),
            )
        };
        if r != 0 {
            return Err(format!("hiprtcCreateProgram failed: {}", self.error_text(r)));
        }
        // SAFETY: `program` is live; `opt_ptrs` holds `opts.len()` NUL-terminated strings
        // that outlive the call.
        let r = unsafe { (self.compile)(program, opt_ptrs.len() as c_int, opt_ptrs.as_ptr()) };
        let log = self.program_log(program);
        let result = if r != 0 {
            Err(format!(
                "hiprtcCompileProgram failed: {}; log:\n{}",
                self.error_text(r),
                if log.trim().is_empty() {
                    "(empty)"
                } else {
                    log.trim_end()
                }
            ))
        } else {
            self.program_code(program)
        };
        // SAFETY: destroys the program created above, once.
        let _ = unsafe { (self.destroy)(&mut program) };
        result
    }

    fn program_log(&self, program: HiprtcProgram) -> String {
        let mut size = 0usize;
        // SAFETY: `program` is live; `size` is a valid out-pointer.
        if unsafe { (self.log_size)(program, &mut size) } != 0 || size == 0 {
            return String::new();
        }
        let mut buf = vec![0u8; size + 1];
        // SAFETY: the buffer holds the `size` bytes hiprtc said the log has, plus one.
        if unsafe { (self.log)(program, buf.as_mut_ptr().cast()) } != 0 {
            return String::new();
        }
        let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
        String::from_utf8_lossy(&buf[..end]).into_owned()
    }

    fn program_code(&self, program: HiprtcProgram) -> Result<Vec<u8>, String> {
        let mut size = 0usize;
        // SAFETY: `program` is live and compiled; `size` is a valid out-pointer.
        let r = unsafe { (self.code_size)(program, &mut size) };
        if r != 0 || size == 0 {
            return Err(format!(
                "hiprtcGetCodeSize failed: {} (size {size})",
                self.error_text(r)
            ));
        }
        let mut code = vec![0u8; size];
        // SAFETY: the buffer holds the `size` bytes hiprtc said the code has.
        let r = unsafe { (self.code)(program, code.as_mut_ptr().cast()) };
        if r != 0 {
            return Err(format!("hiprtcGetCode failed: {}", self.error_text(r)));
        }
        Ok(code)
    }
}

/// The major version of the HIP runtime in use (5, 6, 7), if it says.
fn runtime_major() -> Option<u32> {
    runtime_version().map(|v| v as u32 / 10_000_000)
}

/// The hiprtc libraries to try, best first: the one of the runtime's major version, then
/// the others, newest first.
fn hiprtc_candidates(major: Option<u32>) -> Vec<String> {
    let mut names: Vec<String> = major.map(|m| format!("libhiprtc.so.{m}")).into_iter().collect();
    for name in ["libhiprtc.so.7", "libhiprtc.so.6", "libhiprtc.so.5", "libhiprtc.so"] {
        if !names.iter().any(|n| n == name) {
            names.push(name.to_string());
        }
    }
    names
}

/// Finds hiprtc: the first of `candidates` that loads and has the calls, else (when
/// `builtin` is set) the hiprtc inside the libamdhip64 this process uses.
fn find_hiprtc(candidates: &[String], builtin: bool) -> Result<Hiprtc, String> {
    let mut tried = Vec::new();
    for name in candidates {
        // SAFETY: loads a ROCm library by name; its initialisers are ROCm's own.
        match unsafe { Library::new(name.as_str()) } {
            Ok(lib) => match Hiprtc::resolve(name.clone(), lib) {
                Ok(h) => return Ok(h),
                Err(e) => tried.push(e),
            },
            Err(_) => tried.push(format!("{name}: not found")),
        }
    }
    if builtin {
        match Hiprtc::resolve("libamdhip64's built-in hiprtc".into(), Library::this()) {
            Ok(h) => return Ok(h),
            Err(e) => tried.push(e),
        }
    }
    Err(format!("no hiprtc library was found ({})", tried.join("; ")))
}

fn hiprtc() -> Result<&'static Hiprtc, String> {
    static HIPRTC: OnceLock<Result<Hiprtc, String>> = OnceLock::new();
    HIPRTC
        .get_or_init(|| find_hiprtc(&hiprtc_candidates(runtime_major()), true))
        .as_ref()
        .map_err(Clone::clone)
}

/// The processor of a code-object manager ISA name: `gfx90a` of
/// `amdgcn-amd-amdhsa--gfx90a:xnack-`.
fn isa_processor(isa: &str) -> &str {
    base_arch(isa.rsplit("--").next().unwrap_or(isa))
}

/// The targets the code-object manager knows, if its library can be found.
fn comgr_targets() -> Option<Vec<String>> {
    /// glibc's `RTLD_NOLOAD` (libloading does not export it): find a loaded library only.
    const RTLD_NOLOAD: c_int = 4;
    type Count = unsafe extern "C" fn(*mut usize) -> c_int;
    type Name = unsafe extern "C" fn(usize, *mut *const c_char) -> c_int;
    let names = ["libamd_comgr.so.3", "libamd_comgr.so.2", "libamd_comgr.so"];
    let flags = libloading::os::unix::RTLD_LAZY;
    // SAFETY: finds comgr among the loaded libraries first (the one hiprtc uses), else loads
    // it by name; its initialisers are ROCm's own.
    let lib = names
        .iter()
        .find_map(|n| unsafe { Library::open(Some(*n), flags | RTLD_NOLOAD) }.ok())
        .or_else(|| {
            names
                .iter()
                .find_map(|n| unsafe { Library::open(Some(*n), flags) }.ok())
        })?;
    // SAFETY: the signatures of amd_comgr.h; the names returned are static strings of the
    // library, which stays loaded (leaked below).
    let targets = unsafe {
        let count: Count = *lib.get("amd_comgr_get_isa_count").ok()?;
        let name: Name = *lib.get("amd_comgr_get_isa_name").ok()?;
        let mut n = 0usize;
        if count(&mut n) != 0 {
            return None;
        }
        let mut targets = Vec::with_capacity(n);
        for i in 0..n {
            let mut p: *const c_char = std::ptr::null();
            if name(i, &mut p) == 0 && !p.is_null() {
                targets.push(std::ffi::CStr::from_ptr(p).to_string_lossy().into_owned());
            }
        }
        targets
    };
    std::mem::forget(lib);
    Some(targets)
}

/// The built-in kernels compiled by hiprtc for `arch` (a full target id such as
/// `gfx942:sramecc+:xnack-`), once per process and architecture.
///
/// # Errors
/// Why not: no hiprtc, a target hiprtc's code-object manager does not know, or the
/// compilation's error and log; the text names the hiprtc library used.
pub fn compile_builtin(arch: &str) -> Result<Arc<CodeObject>, String> {
    static CACHE: OnceLock<Mutex<HashMap<String, Arc<CodeObject>>>> = OnceLock::new();
    // Held while compiling: one compilation per architecture, even with several devices.
    let mut cache = crate::sync::lock(CACHE.get_or_init(Default::default));
    if let Some(c) = cache.get(arch) {
        return Ok(c.clone());
    }
    let rtc = hiprtc()?;
    if let Some(targets) = comgr_targets() {
        let base = base_arch(arch);
        if !targets.iter().any(|t| isa_processor(t) == base) {
            let mut known: Vec<&str> = targets.iter().map(|t| isa_processor(t)).collect();
            known.dedup();
            return Err(format!(
                "hiprtc ({}) cannot compile for {arch}: its code-object manager knows only {}",
                rtc.name,
                known.join(", ")
            ));
        }
    }
    let options = [format!("--offload-arch={arch}"), "-O3".to_string()];
    let code = rtc.compile(BUILTIN_SOURCE, &options).map_err(|e| {
        format!(
            "hiprtc ({}) could not compile kernels/builtin.cu for {arch}: {e}",
            rtc.name
        )
    })?;
    check_code_object(&code)
        .map_err(|e| format!("hiprtc ({}) produced no usable code object for {arch}: {e}", rtc.name))?;
    let code = Arc::new(CodeObject::new(&code));
    cache.insert(arch.to_string(), code.clone());
    Ok(code)
}

// ---------------------------------------------------------------------------------------
// The backend

/// HIP's device discovery.
#[derive(Debug, Default, Clone, Copy)]
pub struct HipBackend;

impl HipBackend {
    /// The HIP backend.
    pub fn new() -> HipBackend {
        HipBackend
    }

    /// The HIP ordinal of device `device` (devices are ordered by PCI bus id).
    ///
    /// # Errors
    /// As [`Backend::device_count`]; an invalid request for an index out of range.
    pub fn ordinal(&self, device: u32) -> Result<i32, GpuError> {
        let order = ordinals(OpKind::DeviceInfo)?;
        order.get(device as usize).map(|(o, _)| *o).ok_or_else(|| {
            GpuError::invalid(
                OpKind::DeviceInfo,
                device,
                InvalidReason::DeviceOutOfRange {
                    device,
                    count: order.len() as u32,
                },
            )
        })
    }
}

impl Backend for HipBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Hip
    }

    fn device_count(&self) -> Result<u32, GpuError> {
        Ok(ordinals(OpKind::DeviceInfo)?.len() as u32)
    }

    fn device_info(&self, device: u32) -> Result<DeviceInfo, GpuError> {
        let d = self.ordinal(device)?;
        let op = OpKind::DeviceInfo;
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
        let arch = match gcn_arch_name(d) {
            Some(a) => a,
            None => {
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
                format!("unknown amdgpu (cc {major}.{minor})")
            }
        };
        let order = ordinals(op)?;
        Ok(DeviceInfo {
            index: device,
            name: c_text(&name),
            total_memory: total as u64,
            arch,
            pci_bus_id: order[device as usize].1.clone(),
            uuid: uuid(d),
        })
    }

    /// Opens device `device` on the calling thread. Refused with the first `Sticky` code this
    /// process saw, once there was one: HIP keeps one error state per process, so a new
    /// context after a fault needs a new process.
    fn open(&self, device: u32, epoch: u64) -> Result<Box<dyn DeviceContext>, GpuError> {
        if let Some(code) = poisoned() {
            return Err(GpuError::api_with(
                Api::Hip,
                code,
                OpKind::DeviceInfo,
                device,
                format!(
                    "refusing to open the device: an earlier sticky HIP error ({}) poisoned this \
                     process (HIP keeps one error state per process); open it from a new process",
                    crate::error::code_name(Api::Hip, code)
                ),
            ));
        }
        let info = self.device_info(device)?;
        let ordinal = self.ordinal(device)?;
        // SAFETY: plain call; HIP binds the device to the calling (executor) thread.
        check(
            unsafe { ffi::hipSetDevice(ordinal) },
            OpKind::DeviceInfo,
            device,
            "hipSetDevice",
        )?;
        let mut shared: c_int = 0;
        // SAFETY: a valid out-pointer; the attribute id is that of ROCm ≥ 5.0.
        let status = unsafe { ffi::hipDeviceGetAttribute(&mut shared, ATTR_MAX_SHARED_MEMORY_PER_BLOCK, ordinal) };
        Ok(Box::new(HipDevice {
            info,
            t: Tables::new(device, epoch),
            staging: None,
            pinned: PinnedRanges::default(),
            shared_limit: (status == 0 && shared > 0).then_some(shared as u32),
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
    functions: HashMap<String, HipKernel>,
    /// The image the module was loaded from, kept while it lives.
    _image: Option<Arc<CodeObject>>,
}

/// A kernel of a loaded module.
#[derive(Debug, Clone, Copy)]
pub(crate) struct HipKernel {
    f: *mut c_void,
    /// The shared memory its code declares statically (0 where HIP does not say).
    static_shared: u32,
}

/// One HIP device's context: its buffers, modules and pinned staging buffer.
#[derive(Debug)]
pub struct HipDevice {
    info: DeviceInfo,
    t: Tables<HipBuffer, HipModule>,
    staging: Option<*mut c_void>,
    /// Host memory registered as pinned.
    pinned: PinnedRanges,
    /// Shared memory per block (`hipDeviceAttributeMaxSharedMemoryPerBlock`: 64 KiB on
    /// CDNA and RDNA, 160 KiB on gfx950); `None` where HIP does not say.
    shared_limit: Option<u32>,
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

    fn function(&mut self, module: &ModuleHandle, name: &str) -> Result<HipKernel, GpuError> {
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
        let mut static_shared: c_int = 0;
        // SAFETY: `f` is a function of a live module; a valid out-pointer.
        let status = unsafe { ffi::hipFuncGetAttribute(&mut static_shared, FUNC_ATTR_SHARED_SIZE_BYTES, f) };
        let k = HipKernel {
            f,
            static_shared: if status == 0 { static_shared.max(0) as u32 } else { 0 },
        };
        m.functions.insert(name.to_string(), k);
        Ok(k)
    }

    /// Refuses a launch whose shared memory (static + dynamic) exceeds the device's per-block
    /// limit, before HIP sees it: ROCm's own answer to that varies between versions.
    fn check_shared(&self, name: &str, k: HipKernel, dynamic: u32) -> Result<(), GpuError> {
        let Some(limit) = self.shared_limit else {
            return Ok(());
        };
        let needed = u64::from(k.static_shared) + u64::from(dynamic);
        if needed <= u64::from(limit) {
            return Ok(());
        }
        Err(self.t.invalid(
            OpKind::Launch,
            InvalidReason::BadLaunchConfig {
                reason: format!(
                    "{dynamic} bytes of dynamic shared memory requested; `{name}` declares {} bytes \
                     statically; the device has {limit} bytes of shared memory per block",
                    k.static_shared
                ),
            },
        ))
    }

    /// `hipModuleLoadData` of an image that was checked (or is the build's own).
    fn load_image(&self, image: *const c_void, call: &str) -> Result<*mut c_void, GpuError> {
        let mut module = std::ptr::null_mut();
        // SAFETY: `image` points at a code object whose headers stay inside its bytes (the
        // build's bundle, hiprtc's output or a checked user image), alive for the call and
        // kept alive with the module; HIP rejects what it cannot use with an error code.
        self.check(
            unsafe { ffi::hipModuleLoadData(&mut module, image) },
            OpKind::LoadModule,
            call,
        )?;
        Ok(module)
    }

    /// The built-in kernels: the build's bundle when it has code for this device, else
    /// compiled by hiprtc (see the module docs).
    fn load_builtin(&self) -> Result<HipModule, GpuError> {
        let op = OpKind::LoadModule;
        let arch = self.info.arch.as_str();
        let known_arch = arch.starts_with("gfx");
        let archs = builtin_archs();
        let module = |module, image| HipModule {
            module,
            builtin: true,
            functions: HashMap::new(),
            _image: image,
        };
        if !known_arch || bundle_has(&archs, arch) {
            let bundle = builtin_bundle();
            match self.load_image(bundle.as_ptr(), "hipModuleLoadData (built-in bundle)") {
                Ok(m) => return Ok(module(m, Some(bundle))),
                Err(e)
                    if known_arch
                        && matches!(
                            e.code(),
                            Some((
                                Api::Hip,
                                code::NO_BINARY_FOR_GPU | code::INVALID_IMAGE | code::INVALID_KERNEL_FILE
                            ))
                        ) => {}
                Err(e) => return Err(e),
            }
        }
        let code = compile_builtin(arch).map_err(|reason| {
            self.t.invalid(
                op,
                InvalidReason::BadModuleImage {
                    reason: format!(
                        "the built-in kernels have no code for {arch} (built for {}) and run-time \
                         compilation failed: {reason}",
                        archs.join(", ")
                    ),
                },
            )
        })?;
        let m = self.load_image(code.as_ptr(), "hipModuleLoadData (built-in kernels compiled by hiprtc)")?;
        Ok(module(m, Some(code)))
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
        match source {
            ModuleSource::Builtin => self.load_builtin(),
            ModuleSource::Image(p) => {
                check_code_object(p.as_bytes())
                    .map_err(|reason| self.t.invalid(op, InvalidReason::BadModuleImage { reason }))?;
                let image = Arc::new(CodeObject::new(p.as_bytes()));
                let module = self.load_image(image.as_ptr(), "hipModuleLoadData")?;
                Ok(HipModule {
                    module,
                    builtin: false,
                    functions: HashMap::new(),
                    _image: Some(image),
                })
            }
        }
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
        let k = self.function(module, function)?;
        self.check_shared(function, k, shared_mem_bytes)?;
        let mut packed = PackedArgs::pack(args, |b| self.device_ptr(kind, b, 0).map(|p| p as u64))?;
        let mut params = packed.pointers();
        // Missing arguments read zeros, never host memory past the array (module docs).
        params.extend(std::iter::repeat_n(
            ZEROS.as_ptr().cast_mut().cast::<c_void>(),
            ARGUMENT_PADDING,
        ));
        // SAFETY: `f` is a function of a live module of this context; `params` holds one
        // pointer per argument into `packed`, which outlives the call, then pointers to
        // `ZEROS` (read only by HIP); the dimensions were checked; a null stream is the
        // default stream and a null `extra` is allowed.
        let status = unsafe {
            ffi::hipModuleLaunchKernel(
                k.f,
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
            // SAFETY: each module came from hipModuleLoadData and is unloaded once; its image
            // (`m._image`) is dropped after the unload.
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
        // A sticky code poisons the process: no device opens again.
        assert!(poisoned().is_some());
        let e = HipBackend::new().open(0, 1).err().expect("refused");
        assert_eq!(e.class(), crate::ErrorClass::Sticky, "{e}");
        assert!(e.to_string().contains("new process"), "{e}");
    }

    #[test]
    fn the_builtin_code_object_is_an_offload_bundle_for_the_listed_archs() {
        assert!(
            BUILTIN_CODE_OBJECT.starts_with(b"__CLANG_OFFLOAD_BUNDLE__"),
            "built by hipcc --genco"
        );
        check_code_object(BUILTIN_CODE_OBJECT).expect("the build's bundle passes the checks");
        let archs = builtin_archs();
        assert!(!archs.is_empty());
        let text = String::from_utf8_lossy(BUILTIN_CODE_OBJECT);
        for a in &archs {
            assert!(text.contains(&format!("--{a}")), "the bundle has an entry for {a}");
        }
    }

    #[test]
    fn arch_lists_and_target_ids_parse() {
        assert_eq!(parse_arch_list("gfx908\ngfx90a\n\n"), vec!["gfx908", "gfx90a"]);
        assert_eq!(
            parse_arch_list(" gfx908; gfx90a:xnack+ ,gfx1030"),
            vec!["gfx908", "gfx90a:xnack+", "gfx1030"]
        );
        assert_eq!(base_arch("gfx942:sramecc+:xnack-"), "gfx942");
        assert_eq!(base_arch("gfx90a"), "gfx90a");
        assert!(bundle_has(&["gfx908", "gfx90a"], "gfx90a:sramecc+:xnack-"));
        assert!(bundle_has(&["gfx90a:xnack+"], "gfx90a:sramecc-:xnack+"));
        assert!(!bundle_has(&["gfx908", "gfx90a"], "gfx942:sramecc+:xnack-"));
        assert!(!bundle_has(&["gfx90a"], "gfx90"));
        assert_eq!(isa_processor("amdgcn-amd-amdhsa--gfx90a:sramecc+:xnack-"), "gfx90a");
        assert_eq!(isa_processor("amdgcn-amd-amdhsa--gfx1030"), "gfx1030");
    }

    #[test]
    fn devices_are_ordered_by_pci_bus_id() {
        assert_eq!(pci_key("0000:c1:00.0"), Some((0, 0xc1, 0, 0)));
        assert_eq!(pci_key("0001:03:1f.7"), Some((1, 3, 0x1f, 7)));
        assert_eq!(pci_key("garbage"), None);
        let order = order_by_pci(vec![
            (0, Some("0000:c1:00.0".into())),
            (1, None),
            (2, Some("0000:03:00.0".into())),
            (3, Some("0000:23:00.0".into())),
            (4, Some("bad".into())),
        ]);
        let ordinals: Vec<c_int> = order.iter().map(|(o, _)| *o).collect();
        assert_eq!(ordinals, vec![2, 3, 0, 1, 4]);
    }

    #[test]
    fn uuids_are_printed_as_rocm_and_nvidia_do() {
        assert_eq!(
            format_uuid(*b"5b6e0e9f52c4d6c6").as_deref(),
            Some("GPU-5b6e0e9f52c4d6c6")
        );
        assert_eq!(format_uuid([0; 16]), None);
        let mut xx = [0u8; 16];
        xx[..2].copy_from_slice(b"XX");
        assert_eq!(format_uuid(xx), None, "ROCm's placeholder for no unique id");
        let binary: [u8; 16] = std::array::from_fn(|i| (i as u8) * 17);
        assert_eq!(
            format_uuid(binary).as_deref(),
            Some("GPU-00112233-4455-6677-8899-aabbccddeeff")
        );
    }

    #[test]
    fn arch_names_are_read_only_where_plausible() {
        let mut props = vec![0u8; 2048];
        props[ARCH_OFFSET_R0000..ARCH_OFFSET_R0000 + 22].copy_from_slice(b"gfx90a:sramecc+:xnack-");
        assert_eq!(
            arch_name_at(&props, ARCH_OFFSET_R0000).as_deref(),
            Some("gfx90a:sramecc+:xnack-")
        );
        assert_eq!(arch_name_at(&props, ARCH_OFFSET_R0600), None, "zeros are no name");
        props[ARCH_OFFSET_R0600..ARCH_OFFSET_R0600 + 4].copy_from_slice(b"\x01gfx");
        assert_eq!(arch_name_at(&props, ARCH_OFFSET_R0600), None);
        let unterminated = vec![b'g'; 300];
        assert_eq!(arch_name_at(&unterminated, 0), None);
        assert_eq!(arch_name_at(&props, 1900), None, "beyond the buffer");
    }

    #[test]
    fn code_objects_are_checked_before_hip_reads_them() {
        check_code_object(BUILTIN_CODE_OBJECT).expect("the build's bundle");
        for text in [&b"hello"[..], b".version 8.0\n.target sm_90\n", b"\x00\x01\x02"] {
            assert!(
                check_code_object(text).unwrap_err().contains("unknown format"),
                "PTX is no HIP image"
            );
        }
        assert_eq!(check_code_object(b"").unwrap_err(), "empty image");
        // Cuts of the build's bundle are refused, never handed to HIP.
        let n = BUILTIN_CODE_OBJECT.len();
        for cut in [1, 24, 31, 40, 100, n / 2, n - 1] {
            assert!(check_code_object(&BUILTIN_CODE_OBJECT[..cut]).is_err(), "cut at {cut}");
        }
        // A bundle entry that claims more bytes than there are.
        let mut forged = BUILTIN_CODE_OBJECT.to_vec();
        forged[32 + 8..32 + 16].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(check_code_object(&forged).is_err());
        // Compressed bundles: the stated size must fit; version 1 states none.
        let mut ccob = b"CCOB\x02\x00\x01\x00".to_vec();
        ccob.extend_from_slice(&64u32.to_le_bytes());
        ccob.resize(64, 0);
        check_code_object(&ccob).expect("fits");
        assert!(check_code_object(&ccob[..40]).unwrap_err().contains("truncated"));
        let mut v3 = b"CCOB\x03\x00\x01\x00".to_vec();
        v3.extend_from_slice(&(1u64 << 40).to_le_bytes());
        v3.resize(64, 0);
        assert!(check_code_object(&v3).unwrap_err().contains("truncated"));
        assert!(
            check_code_object(b"CCOB\x01\x00\x01\x00abcdefgh")
                .unwrap_err()
                .contains("version 1")
        );
        assert!(check_code_object(b"CCOB\x02").is_err());
    }

    #[test]
    fn code_objects_are_copied_aligned_with_zeros_after() {
        let c = CodeObject::new(b"0123456789");
        assert_eq!(c.bytes(), b"0123456789");
        assert_eq!(c.len(), 10);
        assert_eq!(c.as_ptr() as usize % 8, 0);
        assert!(c.words.len() * 8 >= 10 + 8, "zeros after the image");
    }

    #[test]
    fn hiprtc_search_without_a_library_names_what_it_tried() {
        let names = vec!["libhipvisor-no-such-hiprtc.so.1".to_string()];
        let e = find_hiprtc(&names, false).err().expect("nothing to find");
        assert!(e.contains("no hiprtc library was found"), "{e}");
        assert!(e.contains("libhipvisor-no-such-hiprtc.so.1: not found"), "{e}");
        assert_eq!(
            hiprtc_candidates(Some(6)),
            vec!["libhiprtc.so.6", "libhiprtc.so.7", "libhiprtc.so.5", "libhiprtc.so"]
        );
        assert_eq!(hiprtc_candidates(None)[0], "libhiprtc.so.7");
    }

    /// Where a hiprtc is installed (CI's Debian ROCm 5.2 has the one inside libamdhip64), it
    /// compiles the built-in kernels without a GPU; a target it does not know is an error,
    /// not an abort. Elsewhere the test says it was skipped, unless `CI_REQUIRE_TOOLS=1`
    /// (set by CI once libamdhip64-dev is installed) requires hiprtc.
    #[test]
    fn hiprtc_compiles_the_builtin_kernels_without_a_gpu_where_installed() {
        if let Err(e) = hiprtc() {
            assert!(
                std::env::var("CI_REQUIRE_TOOLS").as_deref() != Ok("1"),
                "CI_REQUIRE_TOOLS=1 but no hiprtc was found: {e}"
            );
            eprintln!(
                "skipped: no hiprtc here ({e}); apt-get install libamdhip64-dev (ROCm 5.2 has it inside libamdhip64)"
            );
            return;
        }
        let arch = builtin_archs()[0].to_string();
        let code = compile_builtin(&arch).unwrap_or_else(|e| panic!("{e}"));
        let bytes = code.bytes();
        assert!(bytes.starts_with(b"\x7fELF") || bytes.starts_with(b"__CLANG_OFFLOAD_BUNDLE__"));
        let text = String::from_utf8_lossy(&bytes);
        for k in crate::kernels::BuiltinKernel::ALL {
            assert!(text.contains(k.name()), "{} in the code object", k.name());
        }
        assert!(Arc::ptr_eq(&code, &compile_builtin(&arch).unwrap()), "cached");
        // Only where the code-object manager's list guards it: ROCm 5.2's hiprtc aborts on an
        // unknown target.
        if comgr_targets().is_some() {
            let e = compile_builtin("gfx9999").expect_err("no such target");
            assert!(
                e.contains("hiprtc (") && e.contains("gfx9999"),
                "names the library: {e}"
            );
        }
    }

    #[test]
    fn without_a_gpu_discovery_says_no_device_was_found_and_does_not_panic() {
        // CI machines have libamdhip64 but no AMD GPU (no /dev/kfd).
        if std::path::Path::new("/dev/kfd").exists() {
            let _ = std::io::Write::write_all(
                &mut std::io::stderr(),
                concat!(
                    "skipped: this machine has an AMD GPU (/dev/kfd); the GPU check covers it",
                    "\n"
                )
                .as_bytes(),
            );
            return;
        }
        let e = HipBackend::new().device_count().unwrap_err();
        assert_eq!(e.class(), crate::ErrorClass::DeviceLost, "{e}");
        assert!(e.to_string().contains("no HIP device was found"), "{e}");
        let e = HipBackend::new().device_info(0).unwrap_err();
        assert_eq!(e.class(), crate::ErrorClass::DeviceLost, "{e}");
    }
}
