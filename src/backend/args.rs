//! Kernel arguments laid out for a driver launch (`hipModuleLaunchKernel`, `cuLaunchKernel`):
//! the drivers take an array of pointers, one per parameter, each pointing at the
//! parameter's value. Every value gets an 8-byte slot (device pointers as `u64`, scalars
//! little-endian at the slot's start), so the pointer array is built without `unsafe`.

use std::ffi::c_void;

use crate::error::GpuError;
use crate::op::{BufferHandle, KernelArg};

/// Pointers to zeros appended to a launch's argument pointers (see
/// [`PackedArgs::padded_pointers`]).
pub(crate) const ARGUMENT_PADDING: usize = 64;
/// What padding pointers point to: enough zeros for any parameter (4 KiB, the classic limit
/// of a kernel's parameter space).
static ZEROS: [u64; 512] = [0; 512];

/// Packed launch arguments. The pointers from [`PackedArgs::pointers`] stay valid while
/// the `PackedArgs` lives (the slots are one heap allocation that is never resized).
#[derive(Debug)]
pub(crate) struct PackedArgs {
    slots: Vec<[u8; 8]>,
}

impl PackedArgs {
    /// Packs `args`, resolving each buffer to its device address with `device_ptr` (which
    /// checks the handle).
    pub(crate) fn pack(
        args: &[KernelArg],
        mut device_ptr: impl FnMut(&BufferHandle) -> Result<u64, GpuError>,
    ) -> Result<PackedArgs, GpuError> {
        let mut slots = Vec::with_capacity(args.len());
        for a in args {
            let mut slot = [0u8; 8];
            match a {
                KernelArg::Buffer(b) => slot = device_ptr(b)?.to_le_bytes(),
                KernelArg::U32(v) => slot[..4].copy_from_slice(&v.to_le_bytes()),
                KernelArg::I32(v) => slot[..4].copy_from_slice(&v.to_le_bytes()),
                KernelArg::F32(v) => slot[..4].copy_from_slice(&v.to_le_bytes()),
                KernelArg::U64(v) => slot = v.to_le_bytes(),
                KernelArg::I64(v) => slot = v.to_le_bytes(),
                KernelArg::F64(v) => slot = v.to_le_bytes(),
            }
            slots.push(slot);
        }
        Ok(PackedArgs { slots })
    }

    /// One pointer per argument, to its value.
    pub(crate) fn pointers(&mut self) -> Vec<*mut c_void> {
        self.slots.iter_mut().map(|s| s.as_mut_ptr().cast::<c_void>()).collect()
    }

    /// [`PackedArgs::pointers`], then [`ARGUMENT_PADDING`] pointers to zeros: a driver
    /// reads one pointer per parameter of the kernel, which it does not check against the
    /// arguments given, so a kernel launched with too few reads zeros, never host memory past
    /// the array.
    pub(crate) fn padded_pointers(&mut self) -> Vec<*mut c_void> {
        let mut p = self.pointers();
        p.extend(std::iter::repeat_n(
            ZEROS.as_ptr().cast_mut().cast::<c_void>(),
            ARGUMENT_PADDING,
        ));
        p
    }

    #[cfg(test)]
    fn slot(&self, i: usize) -> [u8; 8] {
        self.slots[i]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::{Api, InvalidReason};
    use crate::op::OpKind;

    #[test]
    fn padding_points_at_zeros_after_the_arguments() {
        let mut p = PackedArgs::pack(&[KernelArg::U32(7)], |_| Ok(0)).unwrap();
        let ptrs = p.padded_pointers();
        assert_eq!(ptrs.len(), 1 + ARGUMENT_PADDING);
        for q in &ptrs[1..] {
            assert_eq!(q.cast_const(), ZEROS.as_ptr().cast::<c_void>());
        }
        assert!(ZEROS.iter().all(|z| *z == 0));
    }

    #[test]
    fn scalars_and_buffers_are_laid_out_little_endian_in_their_slots() {
        let b = BufferHandle {
            device: 0,
            epoch: 0,
            id: 7,
            len: 64,
        };
        let args = [
            KernelArg::Buffer(b),
            KernelArg::U32(0xDEAD_BEEF),
            KernelArg::F32(1.5),
            KernelArg::I32(-2),
            KernelArg::U64(u64::MAX - 1),
            KernelArg::F64(-0.25),
        ];
        let mut p = PackedArgs::pack(&args, |h| Ok(0x7f00_0000_0000 + h.id)).unwrap();
        assert_eq!(p.slot(0), (0x7f00_0000_0007u64).to_le_bytes());
        assert_eq!(&p.slot(1)[..4], &0xDEAD_BEEFu32.to_le_bytes());
        assert_eq!(&p.slot(2)[..4], &1.5f32.to_le_bytes());
        assert_eq!(&p.slot(3)[..4], &(-2i32).to_le_bytes());
        assert_eq!(p.slot(4), (u64::MAX - 1).to_le_bytes());
        assert_eq!(p.slot(5), (-0.25f64).to_le_bytes());
        let ptrs = p.pointers();
        assert_eq!(ptrs.len(), 6);
        // Each pointer is 8 bytes past the previous: one slot per argument.
        for w in ptrs.windows(2) {
            assert_eq!(w[1] as usize - w[0] as usize, 8);
        }
    }

    #[test]
    fn a_bad_buffer_stops_the_packing() {
        let b = BufferHandle {
            device: 1,
            epoch: 0,
            id: 7,
            len: 64,
        };
        let e = PackedArgs::pack(&[KernelArg::U32(1), KernelArg::Buffer(b)], |h| {
            Err(GpuError::invalid(
                OpKind::Launch,
                0,
                InvalidReason::WrongDevice {
                    handle_device: h.device,
                },
            ))
        })
        .unwrap_err();
        assert_eq!(e.class(), crate::ErrorClass::InvalidRequest);
        let _ = Api::Hip;
    }
}
