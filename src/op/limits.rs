//! The limits every op must respect, checked without a device: sizes, launch dimensions,
//! kernel names and argument counts.

use super::handle::Dim3;
use crate::error::InvalidReason;

/// A launch's limits: its kernel name and its number of arguments.
pub(crate) fn check_launch_limits(function: &str, args: usize) -> Result<(), InvalidReason> {
    let reason = if function.len() > MAX_KERNEL_NAME_BYTES {
        format!(
            "a kernel name of {} bytes; at most {MAX_KERNEL_NAME_BYTES}",
            function.len()
        )
    } else if args > MAX_KERNEL_ARGS {
        format!("{args} arguments; at most {MAX_KERNEL_ARGS}")
    } else {
        return Ok(());
    };
    Err(InvalidReason::BadArguments {
        kernel: shortened(function),
        reason,
    })
}

/// The largest buffer there can be, on a device or on the host: Rust's limit for one
/// allocation (`isize::MAX` bytes). [`Op::check_sizes`] holds every range to it whatever
/// length a handle claims.
pub const MAX_BUFFER_BYTES: u64 = isize::MAX as u64;

/// The longest kernel name a launch may carry, in bytes. Generous for C++ mangled names
/// (templates make them long), and small enough that a launch always fits in one frame of
/// the worker protocol ([`crate::ipc::MAX_FRAME`]).
pub const MAX_KERNEL_NAME_BYTES: usize = 4096;

/// The most arguments a launch may carry: 4 KiB of 4-byte parameters, the classic limit of a
/// kernel's parameter space on CUDA and HIP. With the longest name, a launch's request is
/// well under a frame (every argument encodes in at most 36 bytes).
pub const MAX_KERNEL_ARGS: usize = 1024;

/// A name for messages: at most 64 bytes of it (on a character boundary), then `…`.
fn shortened(name: &str) -> String {
    if name.len() <= 64 {
        return name.to_string();
    }
    let mut end = 64;
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &name[..end])
}

/// The most threads in one block.
pub const MAX_THREADS_PER_BLOCK: u64 = 1024;

/// Checks grid and block dimensions (limits common to current AMD and NVIDIA GPUs). Every
/// product is computed with checked arithmetic, in debug and release alike: dimensions
/// whose product does not fit in `u64` are refused, never wrapped. That includes a launch
/// within the per-dimension limits whose total thread count ([`total_threads`]) reaches
/// 2^64 (the limits allow 2^73): at 10^12 threads a second it would run for half a year.
///
/// # Errors
/// [`InvalidReason::BadLaunchConfig`] saying which dimension is wrong.
pub fn check_launch_dims(grid: Dim3, block: Dim3) -> Result<(), InvalidReason> {
    let bad = |reason: String| Err(InvalidReason::BadLaunchConfig { reason });
    if grid.x == 0 || grid.y == 0 || grid.z == 0 || block.x == 0 || block.y == 0 || block.z == 0 {
        return bad(format!("zero dimension in grid {grid:?} or block {block:?}"));
    }
    match block.checked_volume() {
        Some(threads) if threads <= MAX_THREADS_PER_BLOCK => {}
        Some(threads) => return bad(format!("block of {threads} threads exceeds {MAX_THREADS_PER_BLOCK}")),
        None => return bad(format!("block {block:?} exceeds {MAX_THREADS_PER_BLOCK} threads")),
    }
    if block.z > 64 {
        return bad(format!("block z = {} exceeds 64", block.z));
    }
    if grid.x > i32::MAX as u32 || grid.y > 65535 || grid.z > 65535 {
        return bad(format!("grid {grid:?} exceeds (2^31-1, 65535, 65535)"));
    }
    if total_threads(grid, block).is_none() {
        return bad(format!("grid {grid:?} × block {block:?} is 2^64 threads or more"));
    }
    Ok(())
}

/// The threads of a launch, `grid` × `block`, or `None` when the product does not fit in
/// `u64` (such a launch fails [`check_launch_dims`]).
pub fn total_threads(grid: Dim3, block: Dim3) -> Option<u64> {
    grid.checked_volume()?.checked_mul(block.checked_volume()?)
}
