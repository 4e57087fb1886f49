//! The typed handle to one device for plain async code ([`DeviceHandle`]), and host memory
//! for copies to a device without an extra copy ([`HostBuffer`]).

use std::sync::Arc;

use hipvisor_core::{Op, OpKind, Payload};

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
pub(crate) use expect_reply;

/// The typed ops of a device — alloc, copies, memset, module loads, launches, synchronize,
/// mem-info, device-info — over its `submit`: written once for every device type (a local
/// [`DeviceHandle`], a cluster's remote device, either as a `Device`).
macro_rules! typed_ops {
    () => {
    /// Allocates `bytes` of device memory.
    ///
    /// # Errors
    /// The op's typed error (out of memory after retries, more than the device has, ...).
    pub async fn alloc(&self, bytes: u64) -> Result<hipvisor_core::BufferHandle, $crate::RuntimeError> {
        $crate::handle::expect_reply!(self.submit(hipvisor_core::Op::Alloc { bytes }).await, hipvisor_core::Reply::Buffer(b) => b)
    }

    /// Frees a buffer.
    ///
    /// # Errors
    /// The op's typed error (unknown or stale handle, ...).
    pub async fn free(&self, buffer: hipvisor_core::BufferHandle) -> Result<(), $crate::RuntimeError> {
        $crate::handle::expect_reply!(self.submit(hipvisor_core::Op::Free { buffer }).await, hipvisor_core::Reply::Done => ())
    }

    /// Copies host bytes into `dst` at `offset`.
    ///
    /// # Errors
    /// The op's typed error (out of bounds, stale handle, ...).
    pub async fn copy_to_device(
        &self,
        dst: hipvisor_core::BufferHandle,
        offset: u64,
        data: impl Into<hipvisor_core::Payload>,
    ) -> Result<(), $crate::RuntimeError> {
        let op = hipvisor_core::Op::CopyToDevice {
            dst,
            offset,
            data: data.into(),
        };
        $crate::handle::expect_reply!(self.submit(op).await, hipvisor_core::Reply::Done => ())
    }

    /// Copies `len` bytes at `offset` of `src` to the host.
    ///
    /// # Errors
    /// The op's typed error (out of bounds, stale handle, ...).
    pub async fn copy_from_device(&self, src: hipvisor_core::BufferHandle, offset: u64, len: u64) -> Result<hipvisor_core::Payload, $crate::RuntimeError> {
        $crate::handle::expect_reply!(self.submit(hipvisor_core::Op::CopyFromDevice { src, offset, len }).await, hipvisor_core::Reply::Data(d) => d)
    }

    /// Copies between two buffers of this device.
    ///
    /// # Errors
    /// The op's typed error (out of bounds, overlap, ...).
    pub async fn copy_device_to_device(
        &self,
        src: hipvisor_core::BufferHandle,
        src_offset: u64,
        dst: hipvisor_core::BufferHandle,
        dst_offset: u64,
        len: u64,
    ) -> Result<(), $crate::RuntimeError> {
        let op = hipvisor_core::Op::CopyDeviceToDevice {
            src,
            src_offset,
            dst,
            dst_offset,
            len,
        };
        $crate::handle::expect_reply!(self.submit(op).await, hipvisor_core::Reply::Done => ())
    }

    /// Sets `len` bytes at `offset` of `buffer` to `value`.
    ///
    /// # Errors
    /// The op's typed error.
    pub async fn memset(&self, buffer: hipvisor_core::BufferHandle, offset: u64, len: u64, value: u8) -> Result<(), $crate::RuntimeError> {
        $crate::handle::expect_reply!(self.submit(hipvisor_core::Op::Memset { buffer, offset, len, value }).await, hipvisor_core::Reply::Done => ())
    }

    /// Loads a kernel module.
    ///
    /// # Errors
    /// The op's typed error (bad image, ...).
    pub async fn load_module(&self, source: hipvisor_core::ModuleSource) -> Result<hipvisor_core::ModuleHandle, $crate::RuntimeError> {
        $crate::handle::expect_reply!(self.submit(hipvisor_core::Op::LoadModule { source }).await, hipvisor_core::Reply::Module(m) => m)
    }

    /// Launches `function` of `module` with one-dimensional `grid` × `block`.
    ///
    /// # Errors
    /// The op's typed error (unknown kernel, bad arguments, quarantined, ...).
    pub async fn launch(
        &self,
        module: hipvisor_core::ModuleHandle,
        function: &str,
        grid: u32,
        block: u32,
        args: Vec<hipvisor_core::KernelArg>,
    ) -> Result<(), $crate::RuntimeError> {
        let op = hipvisor_core::Op::Launch {
            module,
            function: function.to_string(),
            grid: hipvisor_core::Dim3::x(grid),
            block: hipvisor_core::Dim3::x(block),
            shared_mem_bytes: 0,
            args,
        };
        $crate::handle::expect_reply!(self.submit(op).await, hipvisor_core::Reply::Done => ())
    }

    /// Waits for the device's earlier work.
    ///
    /// # Errors
    /// The op's typed error (a sticky fault of an earlier launch surfaces here).
    pub async fn synchronize(&self) -> Result<(), $crate::RuntimeError> {
        $crate::handle::expect_reply!(self.submit(hipvisor_core::Op::Synchronize).await, hipvisor_core::Reply::Done => ())
    }

    /// Free and total memory.
    ///
    /// # Errors
    /// The op's typed error.
    pub async fn mem_info(&self) -> Result<hipvisor_core::MemInfo, $crate::RuntimeError> {
        $crate::handle::expect_reply!(self.submit(hipvisor_core::Op::MemInfo).await, hipvisor_core::Reply::MemInfo(m) => m)
    }

    /// The device's description.
    ///
    /// # Errors
    /// The op's typed error.
    pub async fn device_info(&self) -> Result<hipvisor_core::DeviceInfo, $crate::RuntimeError> {
        $crate::handle::expect_reply!(self.submit(hipvisor_core::Op::DeviceInfo).await, hipvisor_core::Reply::DeviceInfo(i) => i)
    }
    };
}
pub(crate) use typed_ops;

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

    typed_ops!();
}
