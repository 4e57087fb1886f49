//! The handle tables every backend keeps for one device context, and the checks that reject
//! bad requests before the GPU is touched: wrong device, stale epoch (`BufferLost`), unknown
//! or forged handles, out-of-bounds ranges, overlapping copies, bad launch dimensions —
//! every size, offset and count with checked arithmetic, so an absurd one (a copy of
//! `u64::MAX` bytes) is an invalid request, never a wrapped number or an out-of-memory error
//! that would be retried. And the host memory an op needs ([`check_host_alloc`]).

use std::collections::{HashMap, HashSet};

use crate::error::{GpuError, InvalidReason};
use crate::kernels;
use crate::op::{BufferHandle, MAX_BUFFER_BYTES, ModuleHandle, Op, OpKind, Reply};

/// A device-side buffer that knows its length.
pub(crate) trait DeviceBuffer {
    /// Length in bytes.
    fn byte_len(&self) -> u64;
}

impl DeviceBuffer for Vec<u8> {
    fn byte_len(&self) -> u64 {
        self.len() as u64
    }
}

/// Buffers and modules of one device context, by id.
#[derive(Debug)]
pub(crate) struct Tables<B, M> {
    pub(crate) device: u32,
    pub(crate) epoch: u64,
    pub(crate) buffers: HashMap<u64, B>,
    pub(crate) modules: HashMap<u64, M>,
    /// The ids of the buffers held as durable (their handles carry
    /// [`BufferHandle::DURABLE_EPOCH`]).
    pub(crate) durable: HashSet<u64>,
    next_id: u64,
}

impl<B: DeviceBuffer, M> Tables<B, M> {
    /// The tables of a new context of `epoch`. Its ids start from its epoch's (low 32 bits,
    /// times 2^20): contexts of one device do not reuse each other's ids, and contexts of
    /// different processes — whose runtimes start at random epochs — do not meet, so a
    /// handle another process's device gave (a cluster's other node) is refused here, never
    /// taken for one of this device's. (Epoch 0 starts at 1.)
    pub(crate) fn new(device: u32, epoch: u64) -> Self {
        Tables {
            device,
            epoch,
            buffers: HashMap::new(),
            modules: HashMap::new(),
            durable: HashSet::new(),
            next_id: 1 + ((epoch & 0xFFFF_FFFF) << 20),
        }
    }

    pub(crate) fn invalid(&self, op: OpKind, reason: InvalidReason) -> GpuError {
        GpuError::invalid(op, self.device, reason)
    }

    /// A fresh id for a buffer or module.
    pub(crate) fn new_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// Records that `id` is taken (a module restored under its old id).
    pub(crate) fn reserve_id(&mut self, id: u64) {
        self.next_id = self.next_id.max(id + 1);
    }

    /// Takes a buffer out of the tables (freed), durable or not.
    pub(crate) fn remove_buffer(&mut self, id: u64) -> Option<B> {
        self.durable.remove(&id);
        self.buffers.remove(&id)
    }

    /// Records a new durable buffer under its id, and its handle.
    pub(crate) fn insert_durable(&mut self, id: u64, buffer: B) -> Reply {
        let len = buffer.byte_len();
        self.buffers.insert(id, buffer);
        self.durable.insert(id);
        Reply::Buffer(BufferHandle {
            device: self.device,
            epoch: BufferHandle::DURABLE_EPOCH,
            id,
            len,
        })
    }

    /// The buffer behind a handle, after checking device, epoch, id and length. A durable
    /// handle names a buffer this context holds as durable, whatever its epoch.
    pub(crate) fn buffer(&self, op: OpKind, h: &BufferHandle) -> Result<&B, GpuError> {
        if h.device != self.device {
            return Err(self.invalid(
                op,
                InvalidReason::WrongDevice {
                    handle_device: h.device,
                },
            ));
        }
        if h.is_durable() {
            return match self.buffers.get(&h.id) {
                Some(b) if self.durable.contains(&h.id) => self.same_len(op, h, b),
                _ => Err(self.invalid(op, InvalidReason::UnknownBuffer { id: h.id })),
            };
        }
        if h.epoch < self.epoch {
            return Err(self.invalid(
                op,
                InvalidReason::BufferLost {
                    handle_epoch: h.epoch,
                    device_epoch: self.epoch,
                },
            ));
        }
        match self.buffers.get(&h.id) {
            Some(b) if h.epoch == self.epoch && !self.durable.contains(&h.id) => self.same_len(op, h, b),
            _ => Err(self.invalid(op, InvalidReason::UnknownBuffer { id: h.id })),
        }
    }

    /// `buf` if its length is the handle's.
    fn same_len<'a>(&self, op: OpKind, h: &BufferHandle, buf: &'a B) -> Result<&'a B, GpuError> {
        if buf.byte_len() != h.len {
            return Err(self.invalid(
                op,
                InvalidReason::HandleMismatch {
                    id: h.id,
                    handle_len: h.len,
                    actual_len: buf.byte_len(),
                },
            ));
        }
        Ok(buf)
    }

    /// Checks that `[offset, offset + len)` lies inside the buffer.
    pub(crate) fn range(&self, op: OpKind, h: &BufferHandle, offset: u64, len: u64) -> Result<&B, GpuError> {
        let buf = self.buffer(op, h)?;
        let buffer_len = buf.byte_len();
        if offset.checked_add(len).is_none_or(|end| end > buffer_len) {
            return Err(self.invalid(
                op,
                InvalidReason::OutOfBounds {
                    offset,
                    len,
                    buffer_len,
                },
            ));
        }
        Ok(buf)
    }

    /// The module behind a handle.
    pub(crate) fn module(&self, op: OpKind, m: &ModuleHandle) -> Result<&M, GpuError> {
        if m.device != self.device {
            return Err(self.invalid(
                op,
                InvalidReason::WrongDevice {
                    handle_device: m.device,
                },
            ));
        }
        self.modules
            .get(&m.id)
            .ok_or_else(|| self.invalid(op, InvalidReason::UnknownModule { id: m.id }))
    }

    /// An allocation of `bytes`: not empty, not more than the device has.
    fn check_alloc(&self, kind: OpKind, bytes: u64, total_memory: u64) -> Result<(), GpuError> {
        if bytes == 0 {
            return Err(self.invalid(kind, InvalidReason::ZeroSizeAllocation));
        }
        if bytes > total_memory {
            return Err(self.invalid(
                kind,
                InvalidReason::ExceedsDeviceMemory {
                    requested: bytes,
                    total: total_memory,
                },
            ));
        }
        Ok(())
    }

    /// The checks every backend makes before touching the GPU: handles, ranges, overlap,
    /// allocation size, launch dimensions and buffer arguments. (Kernel names and
    /// signatures are checked by the backend, which knows its modules.)
    pub(crate) fn validate(&self, op: &Op, total_memory: u64) -> Result<(), GpuError> {
        let kind = op.kind();
        // The limits of what a request may carry hold in thread isolation too, with the
        // same answer as in process isolation (where the host checks them before sending).
        op.check_limits().map_err(|r| self.invalid(kind, r))?;
        match op {
            Op::Alloc { bytes } => self.check_alloc(kind, *bytes, total_memory)?,
            Op::Durable { data, .. } => self.check_alloc(kind, data.len() as u64, total_memory)?,
            Op::Free { buffer } => {
                self.buffer(kind, buffer)?;
            }
            Op::CopyToDevice { dst, offset, data } => {
                self.range(kind, dst, *offset, data.len() as u64)?;
            }
            Op::CopyFromDevice { src, offset, len } => {
                self.range(kind, src, *offset, *len)?;
            }
            Op::CopyDeviceToDevice {
                src,
                src_offset,
                dst,
                dst_offset,
                len,
            } => {
                self.range(kind, src, *src_offset, *len)?;
                self.range(kind, dst, *dst_offset, *len)?;
                // Both ranges lie inside their buffers, so their ends cannot overflow.
                let overlap = src.id == dst.id && *src_offset < dst_offset + len && *dst_offset < src_offset + len;
                if overlap && *len > 0 {
                    return Err(self.invalid(kind, InvalidReason::OverlappingCopy));
                }
            }
            Op::Memset {
                buffer, offset, len, ..
            } => {
                self.range(kind, buffer, *offset, *len)?;
            }
            Op::Launch {
                module,
                grid,
                block,
                args,
                ..
            } => {
                self.module(kind, module)?;
                kernels::check_launch_dims(*grid, *block).map_err(|r| self.invalid(kind, r))?;
                for b in kernels::buffer_args(args) {
                    self.buffer(kind, b)?;
                }
            }
            // A task runs as its ops, each checked as it comes (`backend::task::execute`).
            Op::Task(_) => {
                return Err(self.invalid(
                    kind,
                    InvalidReason::BadTask {
                        reason: "a context runs a task's ops, not the task (backend::task::execute does)".into(),
                    },
                ));
            }
            Op::LoadModule { .. } | Op::Synchronize | Op::MemInfo | Op::DeviceInfo => {}
        }
        Ok(())
    }
}

/// Below this many bytes, [`check_host_alloc`] trusts the host (a host that cannot give a
/// few megabytes is in trouble whatever hipvisor does); from it up, probing costs an `mmap`
/// and a `munmap` of untouched pages, a few microseconds against milliseconds of copying.
pub(crate) const HOST_PROBE_MIN_BYTES: u64 = 64 << 20;

/// Checks that the host can allocate `len` bytes for `op` (a copy's result, which the
/// backend allocates as a whole) before it is allocated: Rust aborts the process when an
/// allocation fails, so an allocation that cannot succeed must be refused first.
///
/// - More than [`MAX_BUFFER_BYTES`] (no allocation can be larger), or a failed allocation of
///   more than the host's RAM and swap together: it can never succeed on this host, an
///   invalid request (`api`'s invalid-value code, 1 for HIP and CUDA alike).
/// - A failed allocation that the host could hold at another time: out of memory (code 2),
///   transient.
///
/// Requests under [`HOST_PROBE_MIN_BYTES`] are not probed. The probe reserves `len` bytes
/// and frees them at once; the backend's own allocation can still fail if memory runs out
/// in between.
///
/// # Errors
/// The invalid-value or out-of-memory error above, for `op` on `device`.
pub(crate) fn check_host_alloc(op: OpKind, device: u32, len: u64) -> Result<(), GpuError> {
    if len < HOST_PROBE_MIN_BYTES {
        return Ok(());
    }
    let reserved = usize::try_from(len)
        .ok()
        .filter(|_| len <= MAX_BUFFER_BYTES)
        .is_some_and(|n| Vec::<u8>::new().try_reserve_exact(n).is_ok());
    if reserved {
        Ok(())
    } else {
        Err(host_alloc_error(op, device, len))
    }
}

/// The error for a host allocation of `len` bytes that failed (see [`check_host_alloc`]).
pub(crate) fn host_alloc_error(op: OpKind, device: u32, len: u64) -> GpuError {
    let host = host_memory_bytes();
    if len > MAX_BUFFER_BYTES || host.is_some_and(|total| len > total) {
        let limit = match host {
            Some(total) if total < MAX_BUFFER_BYTES => format!("this host's memory (RAM and swap: {total} bytes)"),
            _ => format!("the largest host allocation ({MAX_BUFFER_BYTES} bytes)"),
        };
        return GpuError::invalid(op, device, InvalidReason::HostMemory { requested: len, limit });
    }
    GpuError::host(op, device, format!("{len} bytes of host memory now"))
}

/// The host's RAM and swap together, if the system says.
fn host_memory_bytes() -> Option<u64> {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        nix::sys::sysinfo::sysinfo()
            .ok()
            .map(|i| i.ram_total().saturating_add(i.swap_total()))
    }
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    {
        None
    }
}

/// Host memory ranges registered as pinned with a GPU backend (start, length).
#[cfg(any(feature = "hip", feature = "cuda", test))]
#[derive(Debug, Default)]
pub(crate) struct PinnedRanges(Vec<(usize, usize)>);

#[cfg(any(feature = "hip", feature = "cuda", test))]
impl PinnedRanges {
    /// Whether `bytes` lies inside a registered range.
    pub(crate) fn contains(&self, bytes: &[u8]) -> bool {
        let (start, end) = (bytes.as_ptr() as usize, bytes.as_ptr() as usize + bytes.len());
        self.0.iter().any(|(s, l)| *s <= start && end <= s + l)
    }

    pub(crate) fn add(&mut self, bytes: &[u8]) {
        self.0.push((bytes.as_ptr() as usize, bytes.len()));
    }

    /// Forgets the range starting at `bytes`; `true` if there was one.
    pub(crate) fn remove(&mut self, bytes: &[u8]) -> bool {
        let start = bytes.as_ptr() as usize;
        match self.0.iter().position(|(s, _)| *s == start) {
            Some(i) => {
                self.0.swap_remove(i);
                true
            }
            None => false,
        }
    }

    /// Every range's start, emptying the set.
    pub(crate) fn drain(&mut self) -> impl Iterator<Item = usize> + '_ {
        self.0.drain(..).map(|(s, _)| s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorClass;

    #[test]
    fn host_allocations_that_can_never_succeed_are_invalid_requests() {
        let op = OpKind::CopyFromDevice;
        check_host_alloc(op, 0, HOST_PROBE_MIN_BYTES - 1).expect("small: not probed");
        check_host_alloc(op, 0, HOST_PROBE_MIN_BYTES).expect("64 MiB can be reserved");
        for len in [u64::MAX, MAX_BUFFER_BYTES + 1, MAX_BUFFER_BYTES] {
            let e = check_host_alloc(op, 3, len).expect_err("more than any host holds");
            assert_eq!(e.class(), ErrorClass::InvalidRequest, "{len}: {e}");
            assert_eq!((e.op(), e.device()), (op, 3));
            assert!(e.to_string().contains("can never be allocated"), "{e}");
        }
        // A failure the host could recover from is out of memory, transient.
        let e = host_alloc_error(op, 0, 1 << 20);
        assert_eq!(e.class(), ErrorClass::Transient, "{e}");
        assert!(
            matches!(e, GpuError::Host { .. }),
            "the host's failure, not a GPU code: {e:?}"
        );
        assert_eq!(e.code(), None);
    }

    #[test]
    fn ranges_and_copies_near_u64_max_are_out_of_bounds() {
        let mut t: Tables<Vec<u8>, ()> = Tables::new(0, 0);
        t.buffers.insert(1, vec![0; 64]);
        t.buffers.insert(2, vec![0; 64]);
        let h = |id| BufferHandle {
            device: 0,
            epoch: 0,
            id,
            len: 64,
        };
        let max = u64::MAX;
        let ops = [
            Op::Alloc { bytes: max },
            Op::CopyFromDevice {
                src: h(1),
                offset: 0,
                len: max,
            },
            Op::CopyFromDevice {
                src: h(1),
                offset: max,
                len: 1,
            },
            Op::CopyToDevice {
                dst: h(1),
                offset: max,
                data: vec![0u8; 2].into(),
            },
            Op::Memset {
                buffer: h(1),
                offset: 1,
                len: max,
                value: 0,
            },
            Op::CopyDeviceToDevice {
                src: h(1),
                src_offset: max,
                dst: h(2),
                dst_offset: max,
                len: 2,
            },
            Op::CopyDeviceToDevice {
                src: h(1),
                src_offset: 0,
                dst: h(1),
                dst_offset: 32,
                len: max,
            },
        ];
        for op in ops {
            let e = t.validate(&op, 1 << 20).expect_err("invalid");
            assert_eq!(e.class(), ErrorClass::InvalidRequest, "{op:?}: {e}");
            // The host's own check, without the tables, agrees (allocations aside: only
            // the device knows its memory).
            if !matches!(op, Op::Alloc { .. }) {
                op.check_sizes().expect_err("no device needed to refuse it");
            }
        }
    }

    #[test]
    fn the_host_check_holds_ranges_to_the_largest_buffer_whatever_a_handle_claims() {
        let forged = BufferHandle {
            device: 0,
            epoch: 0,
            id: 1,
            len: u64::MAX,
        };
        let op = Op::CopyFromDevice {
            src: forged,
            offset: 0,
            len: 1 << 63,
        };
        assert_eq!(
            op.check_sizes(),
            Err(InvalidReason::OutOfBounds {
                offset: 0,
                len: 1 << 63,
                buffer_len: MAX_BUFFER_BYTES
            })
        );
        let ok = Op::CopyFromDevice {
            src: forged,
            offset: 8,
            len: 1 << 20,
        };
        assert_eq!(ok.check_sizes(), Ok(()), "the tables decide about the handle itself");
        assert_eq!(
            Op::Alloc { bytes: 0 }.check_sizes(),
            Err(InvalidReason::ZeroSizeAllocation)
        );
        let launch = Op::Launch {
            module: crate::op::ModuleHandle { device: 0, id: 1 },
            function: "fill".into(),
            grid: crate::op::Dim3 {
                x: u32::MAX,
                y: u32::MAX,
                z: u32::MAX,
            },
            block: crate::op::Dim3::x(1),
            shared_mem_bytes: 0,
            args: vec![],
        };
        assert!(matches!(
            launch.check_sizes(),
            Err(InvalidReason::BadLaunchConfig { .. })
        ));
    }

    #[test]
    fn pinned_ranges_contain_their_subslices_only() {
        let buf = [0u8; 100];
        let mut p = PinnedRanges::default();
        p.add(&buf[10..60]);
        assert!(p.contains(&buf[10..60]) && p.contains(&buf[20..30]));
        assert!(!p.contains(&buf[0..20]) && !p.contains(&buf[50..70]));
        assert!(!p.remove(&buf[20..30]), "only by its start");
        assert!(p.remove(&buf[10..60]));
        assert!(!p.contains(&buf[20..30]));
        assert_eq!(p.drain().count(), 0);
    }
}
