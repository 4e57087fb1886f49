//! The handle tables every backend keeps for one device context, and the checks that reject
//! bad requests before the GPU is touched: wrong device, stale epoch (`BufferLost`), unknown
//! or forged handles, out-of-bounds ranges, overlapping copies, bad launch dimensions.

use std::collections::HashMap;

use crate::error::{GpuError, InvalidReason};
use crate::kernels;
use crate::op::{BufferHandle, ModuleHandle, Op, OpKind};

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
    next_id: u64,
}

impl<B: DeviceBuffer, M> Tables<B, M> {
    pub(crate) fn new(device: u32, epoch: u64) -> Self {
        Tables {
            device,
            epoch,
            buffers: HashMap::new(),
            modules: HashMap::new(),
            next_id: 1,
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

    /// The buffer behind a handle, after checking device, epoch, id and length.
    pub(crate) fn buffer(&self, op: OpKind, h: &BufferHandle) -> Result<&B, GpuError> {
        if h.device != self.device {
            return Err(self.invalid(
                op,
                InvalidReason::WrongDevice {
                    handle_device: h.device,
                },
            ));
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
        let buf = match self.buffers.get(&h.id) {
            Some(b) if h.epoch == self.epoch => b,
            _ => return Err(self.invalid(op, InvalidReason::UnknownBuffer { id: h.id })),
        };
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

    /// The checks every backend makes before touching the GPU: handles, ranges, overlap,
    /// allocation size, launch dimensions and buffer arguments. (Kernel names and
    /// signatures are checked by the backend, which knows its modules.)
    pub(crate) fn validate(&self, op: &Op, total_memory: u64) -> Result<(), GpuError> {
        let kind = op.kind();
        match op {
            Op::Alloc { bytes } => {
                if *bytes == 0 {
                    return Err(self.invalid(kind, InvalidReason::ZeroSizeAllocation));
                }
                if *bytes > total_memory {
                    return Err(self.invalid(
                        kind,
                        InvalidReason::ExceedsDeviceMemory {
                            requested: *bytes,
                            total: total_memory,
                        },
                    ));
                }
            }
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
            Op::LoadModule { .. } | Op::Synchronize | Op::MemInfo | Op::DeviceInfo => {}
        }
        Ok(())
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
    use super::PinnedRanges;

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
