//! What the real GPU backends (HIP, CUDA) share: turning an [`Op`] into calls of the GPU
//! runtime. Each backend implements [`GpuCalls`] — the runtime's own calls, with its
//! `unsafe` — and is a [`DeviceContext`] through them: the checks of [`Tables::validate`],
//! the handle tables, the built-in kernels' argument checks, the replies and the pinned
//! host memory set are written once, here, and tested without a GPU against host memory.

use crate::backend::table::{DeviceBuffer, PinnedRanges, Tables, check_host_alloc};
use crate::backend::{DeviceContext, Origin};
use crate::error::{GpuError, InvalidReason};
use crate::kernels::BuiltinKernel;
use crate::op::{
    BufferHandle, DeviceInfo, Dim3, KernelArg, MemInfo, ModuleHandle, ModuleSource, Op, OpKind, Payload, Reply,
};

/// A launch, checked, as a runtime's launch call takes it.
pub(crate) struct Launch<'a> {
    pub(crate) module: &'a ModuleHandle,
    pub(crate) function: &'a str,
    pub(crate) grid: Dim3,
    pub(crate) block: Dim3,
    pub(crate) shared_mem_bytes: u32,
    pub(crate) args: &'a [KernelArg],
}

/// A loaded module of a GPU backend.
pub(crate) trait GpuModule {
    /// Whether it holds the runtime's built-in kernels (whose signatures are known).
    fn builtin(&self) -> bool;
}

/// The calls of one device context of a GPU runtime. Ranges and handles are checked before
/// any of these is called.
pub(crate) trait GpuCalls {
    /// A device address.
    type Ptr: Copy;
    /// An allocation.
    type Buffer: DeviceBuffer;
    /// A loaded module.
    type Module: GpuModule;
    /// The device's description.
    fn info(&self) -> &DeviceInfo;
    /// The context's handle tables.
    fn tables(&self) -> &Tables<Self::Buffer, Self::Module>;
    /// The context's handle tables, to change.
    fn tables_mut(&mut self) -> &mut Tables<Self::Buffer, Self::Module>;
    /// The address `offset` bytes into `buffer`.
    fn address(buffer: &Self::Buffer, offset: u64) -> Self::Ptr;

    /// Allocates `bytes` of device memory.
    fn malloc(&mut self, bytes: u64) -> Result<Self::Buffer, GpuError>;
    /// Frees an allocation (once).
    fn free(&mut self, buffer: &Self::Buffer) -> Result<(), GpuError>;
    /// Copies host bytes to `dst`.
    fn copy_to_device(&mut self, dst: Self::Ptr, data: &[u8]) -> Result<(), GpuError>;
    /// Copies `len` bytes at `src` to the host.
    fn copy_from_device(&mut self, src: Self::Ptr, len: usize) -> Result<Vec<u8>, GpuError>;
    /// Copies `len` bytes between two non-overlapping device ranges.
    fn copy_device_to_device(&mut self, dst: Self::Ptr, src: Self::Ptr, len: usize) -> Result<(), GpuError>;
    /// Sets `len` bytes at `dst` to `value`.
    fn memset(&mut self, dst: Self::Ptr, value: u8, len: usize) -> Result<(), GpuError>;
    /// Loads a module.
    fn load(&mut self, source: &ModuleSource) -> Result<Self::Module, GpuError>;
    /// Launches a kernel whose module, dimensions, buffers and, for built-in kernels, name
    /// and arguments were checked.
    fn launch(&mut self, launch: Launch<'_>) -> Result<(), GpuError>;
    /// Waits for the device's earlier work.
    fn synchronize(&mut self) -> Result<(), GpuError>;
    /// Free and total device memory.
    fn mem_info(&mut self) -> Result<MemInfo, GpuError>;
    /// Host memory registered as pinned.
    fn pinned(&mut self) -> &mut PinnedRanges;
    /// Registers host memory (not empty) as pinned with the runtime; whether it took.
    fn host_register(&mut self, bytes: &[u8]) -> bool;
    /// Unregisters host memory that [`GpuCalls::host_register`] registered.
    fn host_unregister(&mut self, bytes: &[u8]);

    /// The address `offset` bytes into the buffer behind `h`, after checking the handle.
    fn device_ptr(&self, op: OpKind, h: &BufferHandle, offset: u64) -> Result<Self::Ptr, GpuError> {
        Ok(Self::address(self.tables().buffer(op, h)?, offset))
    }
}

/// Every GPU backend's context is a [`DeviceContext`] through its calls.
impl<G: GpuCalls + Send> DeviceContext for G {
    fn device(&self) -> u32 {
        self.tables().device
    }

    fn epoch(&self) -> u64 {
        self.tables().epoch
    }

    fn execute(&mut self, op: &Op, _origin: Origin) -> Result<Reply, GpuError> {
        execute(self, op)
    }

    fn restore_module(&mut self, module: ModuleHandle, source: &ModuleSource) -> Result<(), GpuError> {
        restore_module(self, module, source)
    }

    fn register_host_memory(&mut self, bytes: &[u8]) -> bool {
        let ok = !bytes.is_empty() && self.host_register(bytes);
        if ok {
            self.pinned().add(bytes);
        }
        ok
    }

    fn unregister_host_memory(&mut self, bytes: &[u8]) {
        if self.pinned().remove(bytes) {
            self.host_unregister(bytes);
        }
    }
}

/// Runs one op on a GPU context.
pub(crate) fn execute<G: GpuCalls>(g: &mut G, op: &Op) -> Result<Reply, GpuError> {
    g.tables().validate(op, g.info().total_memory)?;
    let kind = op.kind();
    Ok(match op {
        Op::Alloc { bytes } => {
            let buffer = g.malloc(*bytes)?;
            let t = g.tables_mut();
            let id = t.new_id();
            t.buffers.insert(id, buffer);
            Reply::Buffer(BufferHandle {
                device: t.device,
                epoch: t.epoch,
                id,
                len: *bytes,
            })
        }
        Op::Free { buffer } => {
            let durable = buffer.is_durable();
            let b = g.tables_mut().remove_buffer(buffer.id).expect("validated");
            if let Err(e) = g.free(&b) {
                let t = g.tables_mut();
                t.buffers.insert(buffer.id, b);
                if durable {
                    t.durable.insert(buffer.id);
                }
                return Err(e);
            }
            Reply::Done
        }
        Op::Durable { id, data } => {
            let len = data.len() as u64;
            let existing = g
                .tables()
                .buffers
                .get(id)
                .filter(|b| g.tables().durable.contains(id) && b.byte_len() == len);
            if let Some(b) = existing {
                // Filled again in place (a standby catching up with a changed host copy).
                let to = G::address(b, 0);
                g.copy_to_device(to, data.as_bytes())?;
                return Ok(Reply::Buffer(BufferHandle {
                    device: g.tables().device,
                    epoch: BufferHandle::DURABLE_EPOCH,
                    id: *id,
                    len,
                }));
            }
            if let Some(old) = g.tables_mut().remove_buffer(*id) {
                let _ = g.free(&old);
            }
            let buffer = g.malloc(len)?;
            if let Err(e) = g.copy_to_device(G::address(&buffer, 0), data.as_bytes()) {
                let _ = g.free(&buffer);
                return Err(e);
            }
            g.tables_mut().insert_durable(*id, buffer)
        }
        Op::Task(_) => unreachable!("validated: tasks run as their ops (backend::task)"),
        Op::CopyToDevice { dst, offset, data } => {
            let to = g.device_ptr(kind, dst, *offset)?;
            g.copy_to_device(to, data.as_bytes())?;
            Reply::Done
        }
        Op::CopyFromDevice { src, offset, len } => {
            let from = g.device_ptr(kind, src, *offset)?;
            // The backend allocates the result as a whole; a host that can never hold it
            // must not abort the process.
            check_host_alloc(kind, g.tables().device, *len)?;
            Reply::Data(Payload::from(g.copy_from_device(from, *len as usize)?))
        }
        Op::CopyDeviceToDevice {
            src,
            src_offset,
            dst,
            dst_offset,
            len,
        } => {
            let from = g.device_ptr(kind, src, *src_offset)?;
            let to = g.device_ptr(kind, dst, *dst_offset)?;
            g.copy_device_to_device(to, from, *len as usize)?;
            Reply::Done
        }
        Op::Memset {
            buffer,
            offset,
            len,
            value,
        } => {
            let to = g.device_ptr(kind, buffer, *offset)?;
            g.memset(to, *value, *len as usize)?;
            Reply::Done
        }
        Op::LoadModule { source } => {
            let m = g.load(source)?;
            let t = g.tables_mut();
            let id = t.new_id();
            t.modules.insert(id, m);
            Reply::Module(ModuleHandle { device: t.device, id })
        }
        Op::Launch {
            module,
            function,
            grid,
            block,
            shared_mem_bytes,
            args,
        } => {
            let t = g.tables();
            if t.module(kind, module)?.builtin() {
                let k = BuiltinKernel::from_name(function)
                    .ok_or_else(|| t.invalid(kind, InvalidReason::UnknownKernel { name: function.clone() }))?;
                k.check_args(args).map_err(|r| t.invalid(kind, r))?;
            }
            g.launch(Launch {
                module,
                function,
                grid: *grid,
                block: *block,
                shared_mem_bytes: *shared_mem_bytes,
                args,
            })?;
            Reply::Done
        }
        Op::Synchronize => {
            g.synchronize()?;
            Reply::Done
        }
        Op::MemInfo => Reply::MemInfo(g.mem_info()?),
        Op::DeviceInfo => Reply::DeviceInfo(g.info().clone()),
    })
}

/// Reloads a module under its old id (a new context after a restart).
pub(crate) fn restore_module<G: GpuCalls>(
    g: &mut G,
    module: ModuleHandle,
    source: &ModuleSource,
) -> Result<(), GpuError> {
    let m = g.load(source)?;
    let t = g.tables_mut();
    t.modules.insert(module.id, m);
    t.reserve_id(module.id);
    Ok(())
}

#[cfg(test)]
mod tests {
    //! The shared dispatch against a fake runtime in host memory: what the HIP and CUDA
    //! backends do around their calls, checked where no GPU is.

    use super::*;
    use crate::error::ErrorClass;

    /// Device memory as host vectors; an address is (allocation, offset).
    struct Fake {
        info: DeviceInfo,
        t: Tables<FakeBuffer, FakeModule>,
        memory: std::collections::HashMap<u64, Vec<u8>>,
        next: u64,
        launched: Vec<Launched>,
        fail_next: Option<i32>,
        pinned: PinnedRanges,
        /// Host ranges the runtime has registered, by start.
        registered: Vec<usize>,
    }

    /// A launch that reached the runtime: name, and (module, grid x, block x, shared
    /// bytes, arguments).
    type Launched = (String, (u64, u32, u32, u32, usize));

    struct FakeBuffer {
        key: u64,
        len: u64,
    }

    impl DeviceBuffer for FakeBuffer {
        fn byte_len(&self) -> u64 {
            self.len
        }
    }

    struct FakeModule(bool);

    impl GpuModule for FakeModule {
        fn builtin(&self) -> bool {
            self.0
        }
    }

    impl Fake {
        fn new() -> Fake {
            Fake {
                info: DeviceInfo {
                    index: 0,
                    name: "fake".into(),
                    total_memory: 1 << 20,
                    arch: "none".into(),
                    pci_bus_id: None,
                    uuid: None,
                },
                t: Tables::new(0, 3),
                memory: Default::default(),
                next: 1,
                launched: Vec::new(),
                fail_next: None,
                pinned: PinnedRanges::default(),
                registered: Vec::new(),
            }
        }

        fn call(&mut self, op: OpKind) -> Result<(), GpuError> {
            match self.fail_next.take() {
                Some(code) => Err(GpuError::api_with(crate::error::Api::Hip, code, op, 0, "fake")),
                None => Ok(()),
            }
        }

        fn bytes(&mut self, (key, offset): (u64, u64), len: usize) -> &mut [u8] {
            let o = offset as usize;
            &mut self.memory.get_mut(&key).expect("live")[o..o + len]
        }
    }

    impl GpuCalls for Fake {
        type Ptr = (u64, u64);
        type Buffer = FakeBuffer;
        type Module = FakeModule;

        fn info(&self) -> &DeviceInfo {
            &self.info
        }
        fn tables(&self) -> &Tables<FakeBuffer, FakeModule> {
            &self.t
        }
        fn tables_mut(&mut self) -> &mut Tables<FakeBuffer, FakeModule> {
            &mut self.t
        }
        fn address(buffer: &FakeBuffer, offset: u64) -> (u64, u64) {
            (buffer.key, offset)
        }
        fn malloc(&mut self, bytes: u64) -> Result<FakeBuffer, GpuError> {
            self.call(OpKind::Alloc)?;
            let key = self.next;
            self.next += 1;
            // Huge allocations are address space only: a test that touches them fails.
            if bytes <= 1 << 30 {
                self.memory.insert(key, vec![0; bytes as usize]);
            }
            Ok(FakeBuffer { key, len: bytes })
        }
        fn free(&mut self, buffer: &FakeBuffer) -> Result<(), GpuError> {
            self.call(OpKind::Free)?;
            self.memory.remove(&buffer.key);
            Ok(())
        }
        fn copy_to_device(&mut self, dst: (u64, u64), data: &[u8]) -> Result<(), GpuError> {
            self.call(OpKind::CopyToDevice)?;
            self.bytes(dst, data.len()).copy_from_slice(data);
            Ok(())
        }
        fn copy_from_device(&mut self, src: (u64, u64), len: usize) -> Result<Vec<u8>, GpuError> {
            self.call(OpKind::CopyFromDevice)?;
            Ok(self.bytes(src, len).to_vec())
        }
        fn copy_device_to_device(&mut self, dst: (u64, u64), src: (u64, u64), len: usize) -> Result<(), GpuError> {
            let bytes = self.bytes(src, len).to_vec();
            self.bytes(dst, len).copy_from_slice(&bytes);
            Ok(())
        }
        fn memset(&mut self, dst: (u64, u64), value: u8, len: usize) -> Result<(), GpuError> {
            self.bytes(dst, len).fill(value);
            Ok(())
        }
        fn load(&mut self, source: &ModuleSource) -> Result<FakeModule, GpuError> {
            self.call(OpKind::LoadModule)?;
            Ok(FakeModule(matches!(source, ModuleSource::Builtin)))
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
            let what = (module.id, grid.x, block.x, shared_mem_bytes, args.len());
            self.launched.push((function.to_string(), what));
            Ok(())
        }
        fn synchronize(&mut self) -> Result<(), GpuError> {
            self.call(OpKind::Synchronize)
        }
        fn mem_info(&mut self) -> Result<MemInfo, GpuError> {
            let used: u64 = self.memory.values().map(|m| m.len() as u64).sum();
            Ok(MemInfo {
                free: self.info.total_memory - used,
                total: self.info.total_memory,
            })
        }
        fn pinned(&mut self) -> &mut PinnedRanges {
            &mut self.pinned
        }
        fn host_register(&mut self, bytes: &[u8]) -> bool {
            self.registered.push(bytes.as_ptr() as usize);
            true
        }
        fn host_unregister(&mut self, bytes: &[u8]) {
            let start = bytes.as_ptr() as usize;
            self.registered.retain(|s| *s != start);
        }
    }

    fn buffer(reply: Reply) -> BufferHandle {
        let Reply::Buffer(b) = reply else { panic!("{reply:?}") };
        b
    }

    fn class(r: Result<Reply, GpuError>) -> ErrorClass {
        r.expect_err("an error").class()
    }

    #[test]
    fn ops_become_calls_with_handles_of_this_context() {
        let mut g = Fake::new();
        let a = buffer(execute(&mut g, &Op::Alloc { bytes: 8 }).unwrap());
        let b = buffer(execute(&mut g, &Op::Alloc { bytes: 8 }).unwrap());
        assert_eq!((a.device, a.epoch, a.len), (0, 3, 8));
        assert_ne!(a.id, b.id);
        let copy = Op::CopyToDevice {
            dst: a,
            offset: 2,
            data: vec![1u8, 2, 3].into(),
        };
        execute(&mut g, &copy).unwrap();
        let memset = Op::Memset {
            buffer: b,
            offset: 0,
            len: 8,
            value: 9,
        };
        execute(&mut g, &memset).unwrap();
        let d2d = Op::CopyDeviceToDevice {
            src: a,
            src_offset: 2,
            dst: b,
            dst_offset: 5,
            len: 3,
        };
        execute(&mut g, &d2d).unwrap();
        let back = execute(
            &mut g,
            &Op::CopyFromDevice {
                src: b,
                offset: 0,
                len: 8,
            },
        )
        .unwrap();
        assert_eq!(back, Reply::Data(vec![9u8, 9, 9, 9, 9, 1, 2, 3].into()));
        assert_eq!(
            execute(&mut g, &Op::MemInfo).unwrap(),
            Reply::MemInfo(MemInfo {
                free: (1 << 20) - 16,
                total: 1 << 20
            })
        );
        execute(&mut g, &Op::Free { buffer: a }).unwrap();
        assert_eq!(
            class(execute(&mut g, &Op::Free { buffer: a })),
            ErrorClass::InvalidRequest
        );
        assert_eq!(
            execute(&mut g, &Op::DeviceInfo).unwrap(),
            Reply::DeviceInfo(g.info.clone())
        );
    }

    #[test]
    fn bad_requests_are_refused_before_any_call() {
        let mut g = Fake::new();
        let a = buffer(execute(&mut g, &Op::Alloc { bytes: 8 }).unwrap());
        g.fail_next = Some(700); // a call would surface this sticky code
        let out_of_bounds = Op::CopyFromDevice {
            src: a,
            offset: 4,
            len: 8,
        };
        let stale = Op::Memset {
            buffer: BufferHandle { epoch: 2, ..a },
            offset: 0,
            len: 1,
            value: 0,
        };
        for op in [Op::Alloc { bytes: 2 << 20 }, out_of_bounds, stale] {
            assert_eq!(class(execute(&mut g, &op)), ErrorClass::InvalidRequest, "{op:?}");
        }
        assert_eq!(g.fail_next, Some(700), "no call was made");
        // A call's own error comes back as it is.
        assert_eq!(class(execute(&mut g, &Op::Synchronize)), ErrorClass::Sticky);
    }

    #[test]
    fn a_copy_to_the_host_that_the_host_can_never_hold_is_refused_before_any_call() {
        let mut g = Fake::new();
        // A device (and a buffer) larger than any host: the copy's result cannot be allocated.
        g.info.total_memory = 1 << 62;
        let huge = buffer(execute(&mut g, &Op::Alloc { bytes: 1 << 62 }).unwrap());
        g.fail_next = Some(700); // a call would surface this sticky code
        let copy = Op::CopyFromDevice {
            src: huge,
            offset: 0,
            len: 1 << 62,
        };
        let e = execute(&mut g, &copy).expect_err("refused");
        assert_eq!(e.class(), ErrorClass::InvalidRequest, "{e}");
        assert!(e.to_string().contains("can never be allocated"), "{e}");
        assert_eq!(g.fail_next, Some(700), "no call was made");
    }

    #[test]
    fn a_buffer_whose_free_failed_stays_in_the_table() {
        let mut g = Fake::new();
        let a = buffer(execute(&mut g, &Op::Alloc { bytes: 8 }).unwrap());
        g.fail_next = Some(2);
        assert_eq!(class(execute(&mut g, &Op::Free { buffer: a })), ErrorClass::Transient);
        execute(&mut g, &Op::Free { buffer: a }).expect("the retry frees it");
        assert!(g.t.buffers.is_empty());
    }

    #[test]
    fn built_in_kernels_are_checked_by_name_and_arguments_and_modules_restore() {
        let mut g = Fake::new();
        let Reply::Module(m) = execute(
            &mut g,
            &Op::LoadModule {
                source: ModuleSource::Builtin,
            },
        )
        .unwrap() else {
            panic!()
        };
        let b = buffer(execute(&mut g, &Op::Alloc { bytes: 64 }).unwrap());
        let launch = |function: &str, args: Vec<KernelArg>| Op::Launch {
            module: m,
            function: function.into(),
            grid: Dim3::x(1),
            block: Dim3::x(16),
            shared_mem_bytes: 0,
            args,
        };
        let fill = launch(
            "fill",
            vec![KernelArg::Buffer(b), KernelArg::U32(7), KernelArg::U32(16)],
        );
        execute(&mut g, &fill).unwrap();
        assert_eq!(
            class(execute(&mut g, &launch("nope", vec![]))),
            ErrorClass::InvalidRequest
        );
        assert_eq!(
            class(execute(&mut g, &launch("fill", vec![KernelArg::U32(1)]))),
            ErrorClass::InvalidRequest
        );
        assert_eq!(
            g.launched,
            vec![("fill".to_string(), (m.id, 1, 16, 0, 3))],
            "only the valid launch reached the runtime, as it was asked"
        );
        // A new context takes the module back under its old id; new ids come after it.
        let mut fresh = Fake::new();
        restore_module(&mut fresh, m, &ModuleSource::Builtin).unwrap();
        execute(&mut fresh, &fill.clone()).expect_err("the buffer is not in this context");
        let Reply::Module(next) = execute(
            &mut fresh,
            &Op::LoadModule {
                source: ModuleSource::Builtin,
            },
        )
        .unwrap() else {
            panic!()
        };
        assert!(next.id > m.id);
    }

    #[test]
    fn a_context_is_the_dispatch_and_keeps_the_pinned_set() {
        let mut g = Fake::new();
        let ctx: &mut dyn DeviceContext = &mut g;
        assert_eq!((ctx.device(), ctx.epoch()), (0, 3));
        assert!(matches!(
            ctx.execute(&Op::MemInfo, Origin::Application),
            Ok(Reply::MemInfo(_))
        ));
        let host = vec![0u8; 64];
        assert!(!ctx.register_host_memory(&host[..0]), "nothing to register");
        assert!(ctx.register_host_memory(&host));
        ctx.unregister_host_memory(&host[8..]); // not a registered start: nothing happens
        assert_eq!(g.registered, vec![host.as_ptr() as usize]);
        assert!(g.pinned.contains(&host[8..16]));
        let ctx: &mut dyn DeviceContext = &mut g;
        ctx.unregister_host_memory(&host);
        assert!(g.registered.is_empty() && !g.pinned.contains(&host));
    }
}
