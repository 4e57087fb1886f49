//! Simulated GPUs: a faithful model of a GPU runtime in host memory.
//!
//! - Each device has a memory capacity and real byte storage. An allocation larger than the
//!   free memory fails with `hipErrorOutOfMemory` (transient); one larger than the total can
//!   never succeed and is an invalid request.
//! - **Fresh memory is not zeroed**, as on a GPU: every byte of a new allocation is
//!   [`FRESH_MEMORY_BYTE`] (`0xA5`), so code that reads memory it never wrote sees garbage
//!   here as it would on a GPU, not the zeros a host allocator happens to give.
//! - Built-in kernels ([`crate::kernels`]) run on the CPU, so results can be verified.
//! - **Stickiness as on real hardware.** A [`SimHost`] stands for one process's GPU runtime.
//!   A sticky fault poisons the host: from then on every op on every device of that host
//!   fails with the fault's code, until the host is replaced (as HIP keeps one error state
//!   per process). Hosts are instances, so parallel tests do not poison each other.
//! - A sticky fault of a launch is **asynchronous**: the launch returns success, and the
//!   error surfaces in the next call of any kind on that device (an alloc, a free, a copy, a
//!   memset, a launch, a module load, a synchronize, mem-info), which poisons the host — as
//!   on an H200, where after an illegal address every later call returns 700. Injected
//!   transient or invalid codes fail the op before any side effect.
//! - **The flavour** ([`SimFlavour`], `sim.flavour`) decides what differs between NVIDIA
//!   and AMD. `cuda` (the default): a memory access fault is the sticky error above. `hip`:
//!   a memory access fault of a kernel (the plan's code 700 on a launch, or the built-in
//!   `fault_illegal_address`) is not returned at all: as ROCm does, the simulator prints
//!   "Memory access fault by GPU node-N ..." to stderr and aborts the process (SIGABRT, with
//!   the core-dump limit set to 0 first). As on a GPU, where the fault ends the process
//!   moments after the launch returned, the launch returns success and the abort is
//!   pending: the process ends at the start of its next call on any device of the host
//!   ([`SimHost::abort_if_pending`]) — in a worker process, as soon as the next request
//!   arrives, before it is marked started (the host's next op finds the process dead). A
//!   process that makes no further call does not abort. Other codes behave as in `cuda`.
//! - Faults come from the run's [`FaultInjector`]; the built-in `fault_illegal_address`
//!   kernel faults like its GPU counterpart. The plan's `crash = true` ends the process by
//!   SIGKILL (as the out-of-memory killer would), never by SIGABRT, so a crash is never
//!   taken for a GPU memory fault.
//!
//! Decisions: allocations of zero bytes are rejected (`hipMalloc(0)` returns a null pointer
//! that no later op could use); dynamic shared memory above the flavour's maximum
//! ([`SimFlavour::max_shared_mem_bytes`]: 232448 bytes for `cuda`, whose backend opts a
//! kernel in above the default 48 KiB when a launch asks for more; 65536 for `hip`) fails
//! with `hipErrorLaunchOutOfResources` (an invalid request) naming the requested and
//! available bytes.

pub mod fault_plan;

use std::sync::Arc;
use std::sync::atomic::{AtomicI32, AtomicU32, AtomicU64, Ordering};

use crate::backend::table::{self, Tables};
use crate::backend::{Backend, BackendKind, DeviceContext, Origin};
use crate::config::{ConfigError, SimConfig, SimFlavour};
use crate::error::{Api, ErrorClass, GpuError, InvalidReason, classify, hip};
use crate::kernels::{self, BuiltinKernel, reference};
use crate::op::{BufferHandle, DeviceInfo, KernelArg, MemInfo, ModuleHandle, ModuleSource, Op, OpKind, Payload, Reply};
use fault_plan::{FaultAction, FaultInjector, compile_plan};

/// The value of every byte of a new allocation (GPU memory is not zeroed).
pub const FRESH_MEMORY_BYTE: u8 = 0xA5;

static NEXT_HOST_ID: AtomicU64 = AtomicU64::new(1);

/// One simulated process's GPU runtime: the scope of a sticky fault.
#[derive(Debug)]
pub struct SimHost {
    id: u64,
    poison: AtomicI32,
    /// `hip` flavour: 1 + the device whose kernel made a memory access fault, when the
    /// process is to abort at its next call; 0 otherwise.
    pending_abort: AtomicU32,
}

impl SimHost {
    /// A healthy host.
    pub fn new() -> Arc<SimHost> {
        Arc::new(SimHost {
            id: NEXT_HOST_ID.fetch_add(1, Ordering::Relaxed),
            poison: AtomicI32::new(0),
            pending_abort: AtomicU32::new(0),
        })
    }

    /// The host's unique id.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The sticky code that poisoned the host, if any.
    pub fn poisoned(&self) -> Option<i32> {
        match self.poison.load(Ordering::Acquire) {
            0 => None,
            code => Some(code),
        }
    }

    /// Ends the process as ROCm does after a kernel's memory access fault (`hip` flavour),
    /// if a kernel of this host made one: it prints ROCm's line and aborts. Every call of the
    /// host's devices begins with it, and a worker process calls it when a request arrives,
    /// before marking the request started: on a GPU the fault ends the process moments after
    /// the faulting launch returned, so the next op finds it dead.
    pub fn abort_if_pending(&self) {
        if let Some(device) = self.pending_abort.load(Ordering::Acquire).checked_sub(1) {
            memory_access_fault(device)
        }
    }

    /// A kernel of `device` made a memory access fault (`hip` flavour): the process aborts at
    /// its next call.
    fn abort_pending(&self, device: u32) {
        let _ = self
            .pending_abort
            .compare_exchange(0, device + 1, Ordering::AcqRel, Ordering::Acquire);
    }

    fn poison(&self, code: i32) {
        // The first fault decides; later ones keep the first code.
        let _ = self
            .poison
            .compare_exchange(0, code, Ordering::AcqRel, Ordering::Acquire);
    }
}

/// The simulated backend: `devices` GPUs of `memory_bytes` each on one [`SimHost`].
#[derive(Debug, Clone)]
pub struct SimBackend {
    devices: u32,
    memory_bytes: u64,
    host: Arc<SimHost>,
    faults: Arc<FaultInjector>,
    crash_allowed: bool,
    flavour: SimFlavour,
}

impl SimBackend {
    /// A backend for `[sim]` settings on a fresh host, with a fresh fault injector.
    /// `crash_allowed` says whether ops run in a process of their own, where the fault plan's
    /// `crash = true` may end it.
    ///
    /// **An in-process simulator with `flavour = "hip"` aborts the calling process** on a
    /// kernel's memory access fault (the plan's 700 on a launch, or `fault_illegal_address`),
    /// as ROCm would: at the next call after the faulting launch it prints ROCm's line and
    /// calls `abort()`. Neither this function nor [`SimConfig::validate`] refuses that (with
    /// `crash_allowed = false` or not): the guard is [`crate::config::RuntimeConfig::validate`],
    /// which rejects thread isolation with the `hip` flavour unless
    /// `runtime.allow_abort_on_gpu_fault` consents. Use the `hip` flavour in process
    /// isolation (a worker process aborts), or in a child process of a test.
    ///
    /// # Errors
    /// A [`ConfigError`] naming the bad `[sim]` key.
    pub fn from_config(config: &SimConfig, crash_allowed: bool) -> Result<SimBackend, ConfigError> {
        config.validate(crash_allowed)?;
        let rules = compile_plan(&config.faults, config.devices, crash_allowed)?;
        let faults = Arc::new(FaultInjector::new(rules, config.devices, config.seed));
        Ok(
            SimBackend::with_injector(config.devices, config.memory_bytes, faults, crash_allowed)
                .with_flavour(config.flavour),
        )
    }

    /// A backend with a fault injector shared with other hosts of the same run.
    pub fn with_injector(
        devices: u32,
        memory_bytes: u64,
        faults: Arc<FaultInjector>,
        crash_allowed: bool,
    ) -> SimBackend {
        SimBackend {
            devices,
            memory_bytes,
            host: SimHost::new(),
            faults,
            crash_allowed,
            flavour: SimFlavour::Cuda,
        }
    }

    /// The same backend failing like `flavour`'s GPU runtime.
    pub fn with_flavour(self, flavour: SimFlavour) -> SimBackend {
        SimBackend { flavour, ..self }
    }

    /// Which GPU runtime the backend fails like.
    pub fn flavour(&self) -> SimFlavour {
        self.flavour
    }

    /// `devices` fault-free devices of `memory_bytes` each.
    pub fn new(devices: u32, memory_bytes: u64) -> SimBackend {
        SimBackend::with_injector(devices, memory_bytes, Arc::new(FaultInjector::none()), false)
    }

    /// The same devices and fault plan on a fresh host (what a new process would see).
    pub fn on_new_host(&self) -> SimBackend {
        SimBackend {
            host: SimHost::new(),
            ..self.clone()
        }
    }

    /// The host the backend's devices live on.
    pub fn host(&self) -> &Arc<SimHost> {
        &self.host
    }

    /// The run's fault injector.
    pub fn faults(&self) -> &Arc<FaultInjector> {
        &self.faults
    }

    fn info(&self, device: u32) -> DeviceInfo {
        DeviceInfo {
            index: device,
            name: format!("Simulated GPU {device}"),
            total_memory: self.memory_bytes,
            arch: "sim".into(),
            pci_bus_id: None,
            uuid: None,
        }
    }
}

impl Backend for SimBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Sim
    }

    fn device_count(&self) -> Result<u32, GpuError> {
        Ok(self.devices)
    }

    fn device_info(&self, device: u32) -> Result<DeviceInfo, GpuError> {
        if device >= self.devices {
            return Err(GpuError::invalid(
                OpKind::DeviceInfo,
                device,
                InvalidReason::DeviceOutOfRange {
                    device,
                    count: self.devices,
                },
            ));
        }
        Ok(self.info(device))
    }

    fn open(&self, device: u32, epoch: u64) -> Result<Box<dyn DeviceContext>, GpuError> {
        self.host.abort_if_pending();
        let info = self.device_info(device)?;
        if let Some(code) = self.host.poisoned() {
            return Err(GpuError::api_with(
                Api::Sim,
                code,
                OpKind::DeviceInfo,
                device,
                "host is poisoned",
            ));
        }
        Ok(Box::new(SimDevice {
            info,
            host: self.host.clone(),
            faults: self.faults.clone(),
            crash_allowed: self.crash_allowed,
            flavour: self.flavour,
            t: Tables::new(device, epoch),
            used: 0,
            pending_sticky: None,
        }))
    }
}

/// One simulated device's context.
#[derive(Debug)]
pub struct SimDevice {
    info: DeviceInfo,
    host: Arc<SimHost>,
    faults: Arc<FaultInjector>,
    crash_allowed: bool,
    flavour: SimFlavour,
    t: Tables<Vec<u8>, Vec<BuiltinKernel>>,
    used: u64,
    pending_sticky: Option<i32>,
}

impl SimDevice {
    fn dev(&self) -> u32 {
        self.info.index
    }

    fn api(&self, code: i32, op: OpKind) -> GpuError {
        GpuError::api(Api::Sim, code, op, self.dev())
    }

    /// Checks a launch's kernel, arguments and resources; returns the kernel and how many
    /// elements it processes. (Handles and dimensions are checked by the tables.)
    fn check_launch(&self, op: &Op) -> Result<(BuiltinKernel, u64), GpuError> {
        let Op::Launch {
            module,
            function,
            grid,
            block,
            shared_mem_bytes,
            args,
        } = op
        else {
            unreachable!("check_launch is only called for launches")
        };
        let kind = OpKind::Launch;
        let kernel = self
            .t
            .module(kind, module)?
            .iter()
            .copied()
            .find(|k| k.name() == function)
            .ok_or_else(|| {
                self.t
                    .invalid(kind, InvalidReason::UnknownKernel { name: function.clone() })
            })?;
        let n = kernel.check_args(args).map_err(|r| self.t.invalid(kind, r))?;
        let available = self.flavour.max_shared_mem_bytes();
        if *shared_mem_bytes > available {
            return Err(GpuError::api_with(
                Api::Sim,
                hip::LAUNCH_OUT_OF_RESOURCES,
                kind,
                self.dev(),
                format!(
                    "{shared_mem_bytes} bytes of dynamic shared memory requested, {available} available per block ({} flavour)",
                    self.flavour.as_str()
                ),
            ));
        }
        // The tables refused dimensions whose product overflows.
        let threads = kernels::total_threads(*grid, *block).unwrap_or(u64::MAX);
        Ok((kernel, n.min(threads)))
    }

    /// The runtime's own checks, before the GPU is touched.
    fn validate(&self, op: &Op) -> Result<Option<(BuiltinKernel, u64)>, GpuError> {
        self.t.validate(op, self.info.total_memory)?;
        match op {
            Op::LoadModule { source } => self.parse_module(source).map(|_| None),
            Op::Launch { .. } => self.check_launch(op).map(Some),
            // The copy's result is allocated on the host at once.
            Op::CopyFromDevice { len, .. } => {
                table::check_host_alloc(OpKind::CopyFromDevice, self.dev(), *len).map(|_| None)
            }
            _ => Ok(None),
        }
    }

    /// Runs a validated op with the fault the plan decided for it.
    fn run_with_fault(
        &mut self,
        op: &Op,
        launch: Option<(BuiltinKernel, u64)>,
        fault: Option<FaultAction>,
    ) -> Result<Reply, GpuError> {
        let kind = op.kind();
        if let Some(code) = self.host.poisoned() {
            return Err(self.api(code, kind));
        }
        // An earlier launch's fault has happened by now: this call, whatever it is, returns
        // it (as every call after an illegal address returns 700 on a GPU).
        if let Some(code) = self.pending_sticky.take() {
            self.host.poison(code);
            return Err(self.api(code, kind));
        }
        match fault {
            None => {}
            Some(FaultAction::Hang(d)) => std::thread::sleep(d),
            Some(FaultAction::Crash) if self.crash_allowed => crash(),
            Some(FaultAction::Crash) => {
                return Err(GpuError::api_with(
                    Api::Sim,
                    hip::NOT_SUPPORTED,
                    kind,
                    self.dev(),
                    "the fault plan's crash = true needs process isolation",
                ));
            }
            Some(FaultAction::Code(hip::ILLEGAL_ADDRESS))
                if kind == OpKind::Launch && self.flavour == SimFlavour::Hip =>
            {
                // The kernel faults: the launch returns, the process aborts at its next call.
                self.host.abort_pending(self.dev());
                return Ok(Reply::Done);
            }
            Some(FaultAction::Code(code)) if classify(Api::Sim, code) == ErrorClass::Sticky => {
                if kind == OpKind::Launch {
                    self.pending_sticky.get_or_insert(code);
                    return Ok(Reply::Done);
                }
                self.host.poison(code);
                return Err(self.api(code, kind));
            }
            Some(FaultAction::Code(code)) => return Err(self.api(code, kind)),
        }
        self.run(op, launch)
    }

    fn parse_module(&self, source: &ModuleSource) -> Result<Vec<BuiltinKernel>, GpuError> {
        match source {
            ModuleSource::Builtin => Ok(BuiltinKernel::ALL.to_vec()),
            ModuleSource::Image(image) => {
                kernels::parse_sim_module(image.as_bytes()).map_err(|r| self.t.invalid(OpKind::LoadModule, r))
            }
        }
    }

    fn run(&mut self, op: &Op, launch: Option<(BuiltinKernel, u64)>) -> Result<Reply, GpuError> {
        Ok(match op {
            Op::Alloc { bytes } => {
                let free = self.info.total_memory - self.used;
                if *bytes > free {
                    return Err(GpuError::api_with(
                        Api::Sim,
                        hip::OUT_OF_MEMORY,
                        OpKind::Alloc,
                        self.dev(),
                        format!("{bytes} bytes requested, {free} free"),
                    ));
                }
                // The simulated memory is host memory: a device larger than its host must
                // not abort the process when it fills.
                let mut memory = Vec::new();
                if usize::try_from(*bytes).map_or(true, |n| memory.try_reserve_exact(n).is_err()) {
                    return Err(table::host_alloc_error(OpKind::Alloc, self.dev(), *bytes));
                }
                memory.resize(*bytes as usize, FRESH_MEMORY_BYTE);
                let id = self.t.new_id();
                self.t.buffers.insert(id, memory);
                self.used += bytes;
                Reply::Buffer(BufferHandle {
                    device: self.dev(),
                    epoch: self.t.epoch,
                    id,
                    len: *bytes,
                })
            }
            Op::Free { buffer } => {
                if let Some(b) = self.t.remove_buffer(buffer.id) {
                    self.used -= b.len() as u64;
                }
                Reply::Done
            }
            Op::Durable { id, data } => {
                // Filled again in place when this context holds it with that length (a
                // standby catching up); otherwise made anew.
                if let Some(b) = self.t.buffers.get_mut(id).filter(|b| b.len() == data.len()) {
                    b.copy_from_slice(data.as_bytes());
                    self.t.durable.insert(*id);
                    return Ok(Reply::Buffer(BufferHandle {
                        device: self.dev(),
                        epoch: BufferHandle::DURABLE_EPOCH,
                        id: *id,
                        len: data.len() as u64,
                    }));
                }
                if let Some(old) = self.t.remove_buffer(*id) {
                    self.used -= old.len() as u64;
                }
                let Reply::Buffer(fresh) = self.run(
                    &Op::Alloc {
                        bytes: data.len() as u64,
                    },
                    None,
                )?
                else {
                    unreachable!("an allocation answers a buffer")
                };
                // Allocated under the context's next id: moved under the durable one.
                let mut memory = self.t.buffers.remove(&fresh.id).expect("just allocated");
                memory.copy_from_slice(data.as_bytes());
                self.t.insert_durable(*id, memory)
            }
            Op::Task(_) => unreachable!("tasks run as their ops (backend::task)"),
            Op::CopyToDevice { dst, offset, data } => {
                let buf = self.t.buffers.get_mut(&dst.id).expect("validated");
                let o = *offset as usize;
                buf[o..o + data.len()].copy_from_slice(data.as_bytes());
                Reply::Done
            }
            Op::CopyFromDevice { src, offset, len } => {
                let buf = &self.t.buffers[&src.id];
                let o = *offset as usize;
                Reply::Data(Payload::from(&buf[o..o + *len as usize]))
            }
            Op::CopyDeviceToDevice {
                src,
                src_offset,
                dst,
                dst_offset,
                len,
            } => {
                // In place, without a host copy as large as the range.
                let (s, d, l) = (*src_offset as usize, *dst_offset as usize, *len as usize);
                if src.id == dst.id {
                    self.t
                        .buffers
                        .get_mut(&src.id)
                        .expect("validated")
                        .copy_within(s..s + l, d);
                } else {
                    let [Some(from), Some(to)] = self.t.buffers.get_disjoint_mut([&src.id, &dst.id]) else {
                        unreachable!("validated")
                    };
                    to[d..d + l].copy_from_slice(&from[s..s + l]);
                }
                Reply::Done
            }
            Op::Memset {
                buffer,
                offset,
                len,
                value,
            } => {
                let o = *offset as usize;
                self.t.buffers.get_mut(&buffer.id).expect("validated")[o..o + *len as usize].fill(*value);
                Reply::Done
            }
            Op::LoadModule { source } => {
                let kernels = self.parse_module(source)?;
                let id = self.t.new_id();
                self.t.modules.insert(id, kernels);
                Reply::Module(ModuleHandle { device: self.dev(), id })
            }
            Op::Launch { args, .. } => {
                let (kernel, n) = launch.expect("validated launch");
                self.run_kernel(kernel, args, n as usize);
                Reply::Done
            }
            Op::Synchronize => Reply::Done,
            Op::MemInfo => Reply::MemInfo(MemInfo {
                free: self.info.total_memory - self.used,
                total: self.info.total_memory,
            }),
            Op::DeviceInfo => Reply::DeviceInfo(self.info.clone()),
        })
    }

    /// The first `count` elements of a buffer argument as `f32`s (checked against the
    /// buffer's length by the kernel's signature).
    fn f32s(&self, arg: &KernelArg, count: usize) -> Vec<f32> {
        match arg {
            KernelArg::Buffer(b) => kernels::f32s(&self.t.buffers[&b.id][..count * 4]),
            _ => unreachable!("signature checked"),
        }
    }

    /// Writes `values` as little-endian words at the start of a buffer argument, straight
    /// into the buffer: no byte vector in between (allocations in the kernel path made the
    /// simulator's speed depend on the allocator's trimming of a thread's heap).
    fn write<const N: usize>(&mut self, arg: &KernelArg, values: impl Iterator<Item = [u8; N]>) {
        if let KernelArg::Buffer(b) = arg {
            let buffer = self.t.buffers.get_mut(&b.id).expect("validated");
            for (bytes, value) in buffer.chunks_exact_mut(N).zip(values) {
                bytes.copy_from_slice(&value);
            }
        }
    }

    fn run_kernel(&mut self, kernel: BuiltinKernel, args: &[KernelArg], n: usize) {
        use KernelArg::{F32, U32};
        match (kernel, args) {
            (BuiltinKernel::Fill, [out, U32(value), _]) => {
                let mut v = vec![0u32; n];
                reference::fill(&mut v, *value);
                self.write(out, v.iter().map(|x| x.to_le_bytes()));
            }
            (BuiltinKernel::VectorAdd, [a, b, out, _]) => {
                let sum = reference::vector_add(&self.f32s(a, n), &self.f32s(b, n));
                self.write(out, sum.iter().map(|x| x.to_le_bytes()));
            }
            (BuiltinKernel::Saxpy, [F32(a), x, y, _]) => {
                let xs = self.f32s(x, n);
                let mut ys = self.f32s(y, n);
                reference::saxpy(*a, &xs, &mut ys);
                self.write(y, ys.iter().map(|x| x.to_le_bytes()));
            }
            (BuiltinKernel::Scale, [x, F32(factor), _]) => {
                let mut xs = self.f32s(x, n);
                reference::scale(&mut xs, *factor);
                self.write(x, xs.iter().map(|x| x.to_le_bytes()));
            }
            (BuiltinKernel::Gemv, [w, x, b, y, _, U32(cols)]) => {
                let cols = *cols as usize;
                let ws = self.f32s(w, n * cols);
                let xs = self.f32s(x, cols);
                let bs = self.f32s(b, n);
                let ys = reference::gemv(&ws, &xs, &bs, n, cols);
                self.write(y, ys.iter().map(|v| v.to_le_bytes()));
            }
            (BuiltinKernel::Relu, [x, _]) => {
                let mut xs = self.f32s(x, n);
                reference::relu(&mut xs);
                self.write(x, xs.iter().map(|v| v.to_le_bytes()));
            }
            (BuiltinKernel::Checksum, [KernelArg::Buffer(data), _, out]) => {
                let sum = reference::checksum(&kernels::u32s(&self.t.buffers[&data.id][..n * 4]));
                if let KernelArg::Buffer(o) = out {
                    let cell = &mut self.t.buffers.get_mut(&o.id).expect("validated")[..8];
                    let old = u64::from_le_bytes(cell.try_into().expect("8 bytes"));
                    cell.copy_from_slice(&old.wrapping_add(sum).to_le_bytes());
                }
            }
            (BuiltinKernel::FaultIllegalAddress, []) => {
                // The write through a bad pointer faults on the device: on AMD the process
                // ends moments later (at its next call here); on NVIDIA the error surfaces at
                // the next call, like the GPU's.
                if self.flavour == SimFlavour::Hip {
                    self.host.abort_pending(self.dev());
                } else {
                    self.pending_sticky.get_or_insert(hip::ILLEGAL_ADDRESS);
                }
            }
            (k, a) => unreachable!("arguments of {} were checked: {a:?}", k.name()),
        }
    }
}

/// A kernel's memory access fault on AMD: ROCm's VM fault handler prints where and why and
/// aborts the process. The core-dump limit goes to 0 first, so a simulated fault leaves no
/// core file behind. (KFD numbers CPU nodes first, so GPU nodes start at 1.)
fn memory_access_fault(device: u32) -> ! {
    let _ = nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_CORE, 0, 0);
    eprintln!(
        "Memory access fault by GPU node-{} (simulated device {device}) on address 0x{:x}. Reason: Page not present \
         or supervisor privilege.",
        device + 1,
        0xdead_0000_u64 + u64::from(device) * 0x1000,
    );
    std::process::abort()
}

/// The fault plan's `crash = true`: the process dies at once, by SIGKILL (as the
/// out-of-memory killer would end it) — not by SIGABRT, which the supervisor takes for a
/// GPU memory access fault on AMD.
fn crash() -> ! {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::this(), nix::sys::signal::Signal::SIGKILL);
    // SIGKILL cannot be caught; should the signal not have been delivered, still end.
    std::process::exit(137)
}

impl DeviceContext for SimDevice {
    fn device(&self) -> u32 {
        self.dev()
    }

    fn epoch(&self) -> u64 {
        self.t.epoch
    }

    fn execute(&mut self, op: &Op, origin: Origin) -> Result<Reply, GpuError> {
        self.host.abort_if_pending();
        // A fault the host decided is this op's, valid or not.
        let planned = self.faults.take_planned(self.dev());
        let launch = self.validate(op)?;
        let fault = match planned {
            Some(fault) => fault,
            None => self.faults.decide(self.dev(), op, origin),
        };
        self.run_with_fault(op, launch, fault)
    }

    fn restore_module(&mut self, module: ModuleHandle, source: &ModuleSource) -> Result<(), GpuError> {
        self.host.abort_if_pending();
        if let Some(code) = self.host.poisoned() {
            return Err(self.api(code, OpKind::LoadModule));
        }
        let kernels = self.parse_module(source)?;
        self.t.modules.insert(module.id, kernels);
        self.t.reserve_id(module.id);
        Ok(())
    }
}
