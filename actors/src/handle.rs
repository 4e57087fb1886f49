//! The typed handle to one device for plain async code ([`DeviceHandle`]), and host memory
//! for copies to a device without an extra copy ([`HostBuffer`]).

use std::sync::Arc;

use hipvisor_core::{
    BufferHandle, DeviceInfo, Dim3, KernelArg, MemInfo, ModuleHandle, ModuleSource, Op, OpKind, Payload, Reply,
};

use crate::error::{OpResult, RuntimeError};
use crate::park;
use crate::reply::{Answered, BatchSink};
use crate::shared::Shared;
use crate::state::DeviceState;

/// Host memory for a copy to the device, in shared memory: filled in place, then frozen
/// into a [`Payload`] that reaches the device without another copy — in process isolation
/// the worker maps the same memory.
#[derive(Debug)]
pub struct HostBuffer {
    region: hipvisor_core::ipc::Region,
}

impl HostBuffer {
    /// The bytes, to fill.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        self.region.as_mut_slice()
    }

    /// The length in bytes.
    pub fn len(&self) -> usize {
        self.region.len()
    }

    /// `true` for an empty buffer.
    pub fn is_empty(&self) -> bool {
        self.region.is_empty()
    }

    /// The filled buffer as a payload for [`DeviceHandle::copy_to_device`].
    pub fn freeze(self) -> Payload {
        Payload::shared(Arc::new(self.region))
    }
}

/// A typed handle to one device, for plain async code. Cheap to clone.
///
/// Every method submits one op and waits for its answer: a result, or a typed
/// [`RuntimeError`] that says what happened.
#[derive(Clone)]
pub struct DeviceHandle {
    pub(crate) shared: Arc<Shared>,
    pub(crate) device: u32,
}

macro_rules! expect_reply {
    ($result:expr, $pat:pat => $out:expr) => {
        match $result? {
            $pat => Ok($out),
            other => unreachable!("the device answered {other:?}"),
        }
    };
}

impl DeviceHandle {
    /// The device index.
    pub fn index(&self) -> u32 {
        self.device
    }

    /// The device's state now.
    pub fn state(&self) -> DeviceState {
        self.shared.cores[self.device as usize].state.get()
    }

    /// Ops in flight on the device now.
    pub fn in_flight(&self) -> u32 {
        self.shared.cores[self.device as usize].in_flight()
    }

    /// A host buffer of `len` bytes in shared memory, for copies to the device without an
    /// extra copy.
    ///
    /// # Errors
    /// A transient [`GpuError::Host`](hipvisor_core::GpuError::Host) error when the host
    /// has no memory (or mapping) for it.
    pub fn host_buffer(&self, len: usize) -> Result<HostBuffer, RuntimeError> {
        hipvisor_core::ipc::Region::new(len)
            .map(|region| HostBuffer { region })
            .map_err(|e| {
                let what = format!("a {len}-byte host buffer in shared memory: {e}");
                RuntimeError::Gpu(hipvisor_core::GpuError::host(OpKind::Alloc, self.device, what))
            })
    }

    /// Submits an op, waiting for an in-flight slot if the device is at its bound.
    ///
    /// # Errors
    /// The op's typed error.
    pub async fn submit(&self, op: Op) -> OpResult {
        if let Some(e) = Shared::reserved(self.device, &op) {
            return Err(e);
        }
        self.submit_any(op).await
    }

    /// [`DeviceHandle::submit`] for any op, the runtime's own kinds included.
    pub(crate) async fn submit_any(&self, op: Op) -> OpResult {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.shared.submit(self.device, op, tx.into(), true).await;
        self.answer(rx).await
    }

    /// Waits for an op's answer, spinning first when the device serves a serial caller
    /// ([`park::answer`]).
    async fn answer(&self, rx: tokio::sync::oneshot::Receiver<Answered>) -> OpResult {
        park::answer(rx, self.shared.spin_for(self.device)).await
    }

    /// Submits ops together and waits for all their answers, which come back in order, one
    /// per op. Cheaper per op than [`DeviceHandle::submit`]: the ops are queued together,
    /// the caller is woken once for the whole batch, and in process isolation they travel
    /// to the worker in one request (up to 64 ops a request).
    ///
    /// Each op is still an op of its own: admitted, retried, deadlined and counted on its
    /// own, answered with its own result or typed error. The ops run in order unless one
    /// is retried (a retry goes after the ops queued behind it) or its device restarts.
    /// When the device is at its in-flight bound, the batch waits for slots as `submit`
    /// does. Dropping the future before it completes submits no more of the ops; those
    /// already queued still run, and their answers are discarded.
    pub async fn submit_batch(&self, ops: impl IntoIterator<Item = Op>) -> Vec<OpResult> {
        let ops: Vec<Op> = ops.into_iter().collect();
        if let Some(e) = ops.iter().find_map(|op| Shared::reserved(self.device, op)) {
            return ops.iter().map(|_| Err(e.clone())).collect();
        }
        let sink = BatchSink::new(ops.len());
        self.shared.submit_batch(self.device, ops, &sink).await;
        sink.wait().await
    }

    /// Submits an op, failing with [`RuntimeError::Busy`] when the device is at its bound.
    ///
    /// # Errors
    /// The op's typed error, or `Busy`.
    pub async fn try_submit(&self, op: Op) -> OpResult {
        if let Some(e) = Shared::reserved(self.device, &op) {
            return Err(e);
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.shared.submit(self.device, op, tx.into(), false).await;
        self.answer(rx).await
    }

    /// Allocates `bytes` of device memory.
    ///
    /// # Errors
    /// The op's typed error (out of memory after retries, more than the device has, ...).
    pub async fn alloc(&self, bytes: u64) -> Result<BufferHandle, RuntimeError> {
        expect_reply!(self.submit(Op::Alloc { bytes }).await, Reply::Buffer(b) => b)
    }

    /// Frees a buffer.
    ///
    /// # Errors
    /// The op's typed error (unknown or stale handle, ...).
    pub async fn free(&self, buffer: BufferHandle) -> Result<(), RuntimeError> {
        expect_reply!(self.submit(Op::Free { buffer }).await, Reply::Done => ())
    }

    /// Copies host bytes into `dst` at `offset`.
    ///
    /// # Errors
    /// The op's typed error (out of bounds, stale handle, ...).
    pub async fn copy_to_device(
        &self,
        dst: BufferHandle,
        offset: u64,
        data: impl Into<Payload>,
    ) -> Result<(), RuntimeError> {
        let op = Op::CopyToDevice {
            dst,
            offset,
            data: data.into(),
        };
        expect_reply!(self.submit(op).await, Reply::Done => ())
    }

    /// Copies `len` bytes at `offset` of `src` to the host.
    ///
    /// # Errors
    /// The op's typed error (out of bounds, stale handle, ...).
    pub async fn copy_from_device(&self, src: BufferHandle, offset: u64, len: u64) -> Result<Payload, RuntimeError> {
        expect_reply!(self.submit(Op::CopyFromDevice { src, offset, len }).await, Reply::Data(d) => d)
    }

    /// Copies between two buffers of this device.
    ///
    /// # Errors
    /// The op's typed error (out of bounds, overlap, ...).
    pub async fn copy_device_to_device(
        &self,
        src: BufferHandle,
        src_offset: u64,
        dst: BufferHandle,
        dst_offset: u64,
        len: u64,
    ) -> Result<(), RuntimeError> {
        let op = Op::CopyDeviceToDevice {
            src,
            src_offset,
            dst,
            dst_offset,
            len,
        };
        expect_reply!(self.submit(op).await, Reply::Done => ())
    }

    /// Sets `len` bytes at `offset` of `buffer` to `value`.
    ///
    /// # Errors
    /// The op's typed error.
    pub async fn memset(&self, buffer: BufferHandle, offset: u64, len: u64, value: u8) -> Result<(), RuntimeError> {
        expect_reply!(self.submit(Op::Memset { buffer, offset, len, value }).await, Reply::Done => ())
    }

    /// Loads a kernel module.
    ///
    /// # Errors
    /// The op's typed error (bad image, ...).
    pub async fn load_module(&self, source: ModuleSource) -> Result<ModuleHandle, RuntimeError> {
        expect_reply!(self.submit(Op::LoadModule { source }).await, Reply::Module(m) => m)
    }

    /// Launches `function` of `module` with one-dimensional `grid` × `block`.
    ///
    /// # Errors
    /// The op's typed error (unknown kernel, bad arguments, quarantined, ...).
    pub async fn launch(
        &self,
        module: ModuleHandle,
        function: &str,
        grid: u32,
        block: u32,
        args: Vec<KernelArg>,
    ) -> Result<(), RuntimeError> {
        let op = Op::Launch {
            module,
            function: function.to_string(),
            grid: Dim3::x(grid),
            block: Dim3::x(block),
            shared_mem_bytes: 0,
            args,
        };
        expect_reply!(self.submit(op).await, Reply::Done => ())
    }

    /// Waits for the device's earlier work.
    ///
    /// # Errors
    /// The op's typed error (a sticky fault of an earlier launch surfaces here).
    pub async fn synchronize(&self) -> Result<(), RuntimeError> {
        expect_reply!(self.submit(Op::Synchronize).await, Reply::Done => ())
    }

    /// Free and total memory.
    ///
    /// # Errors
    /// The op's typed error.
    pub async fn mem_info(&self) -> Result<MemInfo, RuntimeError> {
        expect_reply!(self.submit(Op::MemInfo).await, Reply::MemInfo(m) => m)
    }

    /// The device's description.
    ///
    /// # Errors
    /// The op's typed error.
    pub async fn device_info(&self) -> Result<DeviceInfo, RuntimeError> {
        expect_reply!(self.submit(Op::DeviceInfo).await, Reply::DeviceInfo(i) => i)
    }
}
