//! Durable buffers: device buffers whose contents the runtime keeps on the host, so that a
//! new context of their device (after a sticky fault, a worker's death) gets them back
//! under the same handle — the application never sees `BufferLost` for them.
//!
//! The contract:
//!
//! - **Handles.** A durable buffer's handle has the epoch [`BufferHandle::DURABLE_EPOCH`],
//!   which every context of its device accepts for the buffers it holds as durable (and for
//!   nothing else), and an id the runtime gave it. It works with every op a buffer handle
//!   works with, and stays valid across restarts until the buffer is freed.
//! - **The host copy** is made once, by the host, in a shared-memory region sealed against
//!   writes (`F_SEAL_WRITE`): when the data given is a [`HostBuffer`](crate::HostBuffer)'s
//!   payload held nowhere else, that very memory is sealed — no second copy in host RAM.
//!   Workers map it read-only. A replicated buffer's replicas share one host copy until one
//!   of them is written.
//! - **Restores.** A new context restores every durable buffer of its device before the
//!   device is ready again (a warm standby does it before it is needed, and catches up with
//!   what changed when it takes over); within `supervisor.worker_start_timeout_ms`, with the
//!   module reloads. A standby holds a second copy on the GPU: one that cannot (out of
//!   memory) logs it, is counted (`recovery.standby_short`), and the next restart starts cold.
//! - **Writes.** A copy from the host or a memset into a durable buffer writes a new host
//!   copy too (the old bytes with the change, in a new sealed region swapped in once
//!   complete; host work proportional to the buffer's size). A kernel or a device-to-device
//!   copy that writes one leaves its host copy stale: [`DeviceHandle::checkpoint`] refreshes
//!   it; a restore before that brings back the last copy taken.
//! - **Memory.** Each durable buffer costs its size in host memory (`durable_bytes` per
//!   device in the metrics), and, with `supervisor.standby`, its size again on the GPU in
//!   the standby's context.

use hipvisor_core::task::ReplicatedBuffer;
use hipvisor_core::worker::client::HostCopy;

/// How many times a checkpoint reads a buffer that keeps being written before it gives up.
const CHECKPOINT_TRIES: u32 = 3;
use hipvisor_core::{BufferHandle, Op, Payload, Reply};

use crate::error::RuntimeError;
use crate::handle::DeviceHandle;
use crate::runtime::Runtime;

/// The bytes as a host copy (see the module docs and [`HostCopy::keep`]).
pub(crate) fn host_copy(device: u32, data: Payload) -> Result<Payload, RuntimeError> {
    let len = data.len();
    HostCopy::keep(data).map_err(|e| {
        let what = format!("a sealed host copy of {len} bytes: {e}");
        RuntimeError::Gpu(hipvisor_core::GpuError::host(
            hipvisor_core::OpKind::Durable,
            device,
            what,
        ))
    })
}

impl DeviceHandle {
    /// Uploads `data` as a new durable buffer of this device (see the module docs for the
    /// contract) and returns its handle, valid across restarts.
    ///
    /// # Errors
    /// The op's typed error: an empty buffer, more than the device has, out of memory after
    /// retries; a transient host error when no shared memory is left for the host copy.
    pub async fn durable(&self, data: impl Into<Payload>) -> Result<BufferHandle, RuntimeError> {
        let data = host_copy(self.device, data.into())?;
        self.durable_with_id(self.shared.recovery.durable_id(), data).await
    }

    pub(crate) async fn durable_with_id(&self, id: u64, data: Payload) -> Result<BufferHandle, RuntimeError> {
        match self.submit_any(Op::Durable { id, data }).await? {
            Reply::Buffer(b) => Ok(b),
            other => unreachable!("a durable buffer's creation answered {other:?}"),
        }
    }

    /// Refreshes a durable buffer's host copy from the device (after kernels wrote it): the
    /// device's bytes go into a new sealed region, which replaces the old copy only once
    /// complete — a worker dying mid-checkpoint leaves the old copy intact, and the
    /// checkpoint answers the copy's error. Writes to the buffer racing with its checkpoint
    /// may or may not be in the new copy.
    ///
    /// # Errors
    /// `BadDurable` for a handle that is not a durable one of this device; the copy's typed
    /// error.
    pub async fn checkpoint(&self, buffer: BufferHandle) -> Result<(), RuntimeError> {
        if !buffer.is_durable() || buffer.device != self.device {
            let reason = hipvisor_core::InvalidReason::BadDurable {
                reason: format!(
                    "checkpoint of buffer {} (device {}, epoch {}) on device {}: not a durable buffer of this device",
                    buffer.id, buffer.device, buffer.epoch, self.device
                ),
            };
            let op = hipvisor_core::OpKind::CopyFromDevice;
            return Err(RuntimeError::Gpu(hipvisor_core::GpuError::invalid(
                op,
                self.device,
                reason,
            )));
        }
        let core = &self.shared.cores[self.device as usize];
        let version = |id| hipvisor_core::sync::lock(&core.durables).get(&id).map(|c| c.version);
        // A write through the host-copy path (a copy, a memset) between the read and the
        // swap would be lost by the swap: then the checkpoint reads again.
        for _ in 0..CHECKPOINT_TRIES {
            let Some(before) = version(buffer.id) else {
                return Ok(()); // freed: nothing to refresh
            };
            let bytes = self.copy_from_device(buffer, 0, buffer.len).await?;
            let copy = host_copy(self.device, bytes)?;
            let mut durables = hipvisor_core::sync::lock(&core.durables);
            match durables.get_mut(&buffer.id) {
                None => return Ok(()),
                Some(slot) if slot.version == before => {
                    *slot = HostCopy::new(copy);
                    drop(durables);
                    crate::process::refresh_standby(&self.shared, self.device);
                    return Ok(());
                }
                Some(_) => {}
            }
        }
        let what = format!(
            "checkpoint of durable buffer {}: it was written {CHECKPOINT_TRIES} times while being read",
            buffer.id
        );
        Err(RuntimeError::Gpu(hipvisor_core::GpuError::host(
            hipvisor_core::OpKind::CopyFromDevice,
            self.device,
            what,
        )))
    }
}

impl Runtime {
    /// Uploads `data` as a durable buffer on every device that is ready or restarting (one
    /// host copy for all of them), with one identity that tasks name
    /// ([`ReplicatedBuffer`]). Devices that are lost or failed get no replica; a device
    /// whose upload fails gets none either.
    ///
    /// # Errors
    /// When no device got a replica: the first device's error.
    pub async fn replicate(&self, data: impl Into<Payload>) -> Result<ReplicatedBuffer, RuntimeError> {
        let data = host_copy(0, data.into())?;
        let len = data.len() as u64;
        let id = self.shared.recovery.durable_id();
        let made = self
            .on_every_device(&format!("a replica of durable buffer {id}"), |h| {
                let data = data.clone();
                async move { h.durable_with_id(id, data).await }
            })
            .await?;
        let devices: Vec<u32> = made.into_iter().map(|(d, _)| d).collect();
        Ok(ReplicatedBuffer::new(id, len, devices))
    }
}
