//! The built-in kernels: their signatures, argument checks and CPU reference implementations.
//!
//! Every backend offers the same kernels (the simulator runs these CPU implementations; the
//! GPU backends compile the GPU source of the same kernels), so results can be verified
//! against [`reference`]. Element `i` is processed by the thread with linear global index
//! `i`; a launch with fewer threads than `n` processes only the first `threads` elements, as
//! a GPU kernel would.
//!
//! | kernel | parameters | effect |
//! | --- | --- | --- |
//! | `fill` | `out: buffer(u32), value: u32, n: u32` | `out[i] = value` |
//! | `vector_add` | `a: buffer(f32), b: buffer(f32), out: buffer(f32), n: u32` | `out[i] = a[i] + b[i]` |
//! | `saxpy` | `a: f32, x: buffer(f32), y: buffer(f32), n: u32` | `y[i] = fma(a, x[i], y[i])` |
//! | `scale` | `x: buffer(f32), factor: f32, n: u32` | `x[i] = x[i] * factor` |
//! | `checksum` | `data: buffer(u32), n: u32, out: buffer(u64)` | `out[0] += Σ data[i]` (wrapping) |
//! | `gemv` | `w: buffer(f32), x: buffer(f32), b: buffer(f32), y: buffer(f32), n: u32, cols: u32` | `y[i] = b[i] + Σ_j w[i·cols + j] · x[j]` (`w` row-major, `n` rows; `y` must not overlap `w` or `x`) |
//! | `relu` | `x: buffer(f32), n: u32` | `x[i] = x[i] > 0 ? x[i] : 0` |
//! | `fault_illegal_address` | none | writes through a bad pointer: a sticky fault |
//!
//! Tolerance: `fill`, `vector_add`, `scale`, `checksum` and `relu` are exact (`relu` of a
//! NaN or of -0 is +0). `saxpy` is defined with a fused multiply-add (`f32::mul_add`, one
//! rounding), which GPU `fmaf` matches bit for bit; a GPU compiler that does not fuse
//! differs by at most [`SAXPY_TOLERANCE_ULPS`] units in the last place, so results are
//! compared with [`within_ulps`]. `gemv` accumulates each row in order, `j` = 0, 1, ...,
//! starting from `b[i]`, one fused multiply-add per term (`fmaf` on the GPU, written out in
//! the source so no compiler may reorder it): the same bits on every backend for every
//! non-NaN result, denormals included (no fast-math or flush-to-zero option is used; a NaN's
//! payload may differ).

use crate::error::InvalidReason;
use crate::op::{ArgType, BufferHandle, KernelArg};
// Launch dimensions are the op protocol's (src/op.rs); re-exported where they were.
pub use crate::op::{MAX_THREADS_PER_BLOCK, check_launch_dims, total_threads};

/// The first line of a simulator module image; the following lines name built-in kernels,
/// one per line.
pub const SIM_MODULE_MAGIC: &str = "hipvisor-sim-module v1";

/// How far apart (in units in the last place) a `saxpy` result may be from
/// [`reference::saxpy`].
pub const SAXPY_TOLERANCE_ULPS: u32 = 1;

/// A built-in kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BuiltinKernel {
    /// `out[i] = value`
    Fill,
    /// `out[i] = a[i] + b[i]`
    VectorAdd,
    /// `y[i] = fma(a, x[i], y[i])`
    Saxpy,
    /// `x[i] *= factor`
    Scale,
    /// `out[0] += Σ data[i]`
    Checksum,
    /// `y = W x + b`: one row per thread
    Gemv,
    /// `x[i] = x[i] > 0 ? x[i] : 0`
    Relu,
    /// Writes through a bad pointer (test-only): a sticky fault.
    FaultIllegalAddress,
}

/// How many elements of a buffer parameter a launch touches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Extent {
    /// One element.
    One,
    /// `n` elements.
    N,
    /// `cols` elements.
    Cols,
    /// `n × cols` elements (a row-major matrix of `n` rows).
    NCols,
}

/// A kernel parameter: its name, its type and, for buffers, the size of one element.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Param {
    /// The parameter's name.
    pub name: &'static str,
    /// Its type.
    pub ty: ArgType,
    /// For buffers: bytes per element, and how many elements the launch touches.
    pub elem: Option<(u64, Extent)>,
}

const fn buf(name: &'static str, elem: u64, per_n: bool) -> Param {
    buf_of(name, elem, if per_n { Extent::N } else { Extent::One })
}

const fn buf_of(name: &'static str, elem: u64, extent: Extent) -> Param {
    Param {
        name,
        ty: ArgType::Buffer,
        elem: Some((elem, extent)),
    }
}

const fn scalar(name: &'static str, ty: ArgType) -> Param {
    Param { name, ty, elem: None }
}

impl BuiltinKernel {
    /// Every built-in kernel.
    pub const ALL: [BuiltinKernel; 8] = [
        BuiltinKernel::Fill,
        BuiltinKernel::VectorAdd,
        BuiltinKernel::Saxpy,
        BuiltinKernel::Scale,
        BuiltinKernel::Checksum,
        BuiltinKernel::Gemv,
        BuiltinKernel::Relu,
        BuiltinKernel::FaultIllegalAddress,
    ];

    /// The kernel's function name.
    pub fn name(self) -> &'static str {
        match self {
            BuiltinKernel::Fill => "fill",
            BuiltinKernel::VectorAdd => "vector_add",
            BuiltinKernel::Saxpy => "saxpy",
            BuiltinKernel::Scale => "scale",
            BuiltinKernel::Checksum => "checksum",
            BuiltinKernel::Gemv => "gemv",
            BuiltinKernel::Relu => "relu",
            BuiltinKernel::FaultIllegalAddress => "fault_illegal_address",
        }
    }

    /// Looks a kernel up by function name.
    pub fn from_name(name: &str) -> Option<BuiltinKernel> {
        BuiltinKernel::ALL.into_iter().find(|k| k.name() == name)
    }

    /// The kernel's parameters, in order.
    pub fn params(self) -> &'static [Param] {
        use ArgType::*;
        const FILL: &[Param] = &[buf("out", 4, true), scalar("value", U32), scalar("n", U32)];
        const VECTOR_ADD: &[Param] = &[
            buf("a", 4, true),
            buf("b", 4, true),
            buf("out", 4, true),
            scalar("n", U32),
        ];
        const SAXPY: &[Param] = &[scalar("a", F32), buf("x", 4, true), buf("y", 4, true), scalar("n", U32)];
        const SCALE: &[Param] = &[buf("x", 4, true), scalar("factor", F32), scalar("n", U32)];
        const CHECKSUM: &[Param] = &[buf("data", 4, true), scalar("n", U32), buf("out", 8, false)];
        const GEMV: &[Param] = &[
            buf_of("w", 4, Extent::NCols),
            buf_of("x", 4, Extent::Cols),
            buf("b", 4, true),
            buf("y", 4, true),
            scalar("n", U32),
            scalar("cols", U32),
        ];
        const RELU: &[Param] = &[buf("x", 4, true), scalar("n", U32)];
        match self {
            BuiltinKernel::Fill => FILL,
            BuiltinKernel::VectorAdd => VECTOR_ADD,
            BuiltinKernel::Saxpy => SAXPY,
            BuiltinKernel::Scale => SCALE,
            BuiltinKernel::Checksum => CHECKSUM,
            BuiltinKernel::Gemv => GEMV,
            BuiltinKernel::Relu => RELU,
            BuiltinKernel::FaultIllegalAddress => &[],
        }
    }

    /// Checks `args` against the kernel's parameters before anything is launched: count,
    /// types, and that every buffer holds the elements the kernel will touch. Returns the
    /// element count `n` (0 for kernels without one).
    ///
    /// # Errors
    /// [`InvalidReason::BadArguments`] naming the parameter.
    pub fn check_args(self, args: &[KernelArg]) -> Result<u64, InvalidReason> {
        let params = self.params();
        let bad = |reason: String| InvalidReason::BadArguments {
            kernel: self.name().to_string(),
            reason,
        };
        if args.len() != params.len() {
            return Err(bad(format!(
                "expected {} arguments ({}), got {}",
                params.len(),
                params
                    .iter()
                    .map(|p| format!("{}: {}", p.name, p.ty))
                    .collect::<Vec<_>>()
                    .join(", "),
                args.len()
            )));
        }
        for (p, a) in params.iter().zip(args) {
            if a.arg_type() != p.ty {
                return Err(bad(format!("parameter `{}` is {}, got {}", p.name, p.ty, a.arg_type())));
            }
        }
        let scalar = |name: &str| {
            params
                .iter()
                .zip(args)
                .find_map(|(p, a)| match (p.name == name, a) {
                    (true, KernelArg::U32(v)) => Some(u64::from(*v)),
                    _ => None,
                })
                .unwrap_or(0)
        };
        let (n, cols) = (scalar("n"), scalar("cols"));
        for (p, a) in params.iter().zip(args) {
            if let (Some((elem, extent)), KernelArg::Buffer(b)) = (p.elem, a) {
                // `n × cols × 4` can exceed `u64::MAX`: saturate, so an absurd matrix reads as
                // too large, never as small.
                let count = match extent {
                    Extent::One => 1,
                    Extent::N => n,
                    Extent::Cols => cols,
                    Extent::NCols => n.saturating_mul(cols),
                };
                let need = count.saturating_mul(elem);
                if b.len < need {
                    return Err(bad(format!(
                        "buffer `{}` holds {} bytes, the kernel touches {need}",
                        p.name, b.len
                    )));
                }
            }
        }
        Ok(n)
    }
}

/// The buffers a launch's arguments name, in order.
pub fn buffer_args(args: &[KernelArg]) -> impl Iterator<Item = &BufferHandle> {
    args.iter().filter_map(|a| match a {
        KernelArg::Buffer(b) => Some(b),
        _ => None,
    })
}

/// Parses a simulator module image into its kernels.
///
/// # Errors
/// [`InvalidReason::BadModuleImage`] when the magic line is missing, the image is not
/// UTF-8, or a line names no built-in kernel.
pub fn parse_sim_module(image: &[u8]) -> Result<Vec<BuiltinKernel>, InvalidReason> {
    let bad = |reason: String| InvalidReason::BadModuleImage { reason };
    let text = std::str::from_utf8(image).map_err(|_| bad("not UTF-8 text".into()))?;
    let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
    if lines.next() != Some(SIM_MODULE_MAGIC) {
        return Err(bad(format!("first line must be `{SIM_MODULE_MAGIC}`")));
    }
    lines
        .map(|name| BuiltinKernel::from_name(name).ok_or_else(|| bad(format!("unknown kernel `{name}`"))))
        .collect()
}

/// A simulator module image naming `kernels`.
pub fn sim_module_image(kernels: &[BuiltinKernel]) -> Vec<u8> {
    let mut s = String::from(SIM_MODULE_MAGIC);
    for k in kernels {
        s.push('\n');
        s.push_str(k.name());
    }
    s.into_bytes()
}

/// `true` when `a` and `b` are at most `ulps` units in the last place apart (and both NaN,
/// or equal, count as equal).
pub fn within_ulps(a: f32, b: f32, ulps: u32) -> bool {
    if a == b || (a.is_nan() && b.is_nan()) {
        return true;
    }
    if a.is_sign_positive() != b.is_sign_positive() {
        return false;
    }
    a.to_bits().abs_diff(b.to_bits()) <= ulps
}

/// CPU reference implementations, used by the simulator and to verify GPU results.
pub mod reference {
    /// `out[i] = value`
    pub fn fill(out: &mut [u32], value: u32) {
        out.fill(value);
    }

    /// `out[i] = a[i] + b[i]`
    pub fn vector_add(a: &[f32], b: &[f32]) -> Vec<f32> {
        a.iter().zip(b).map(|(x, y)| x + y).collect()
    }

    /// `y[i] = fma(a, x[i], y[i])`
    pub fn saxpy(a: f32, x: &[f32], y: &mut [f32]) {
        for (yi, xi) in y.iter_mut().zip(x) {
            *yi = a.mul_add(*xi, *yi);
        }
    }

    /// `x[i] *= factor`
    pub fn scale(x: &mut [f32], factor: f32) {
        for v in x {
            *v *= factor;
        }
    }

    /// `Σ data[i]`, wrapping in `u64`.
    pub fn checksum(data: &[u32]) -> u64 {
        data.iter().fold(0u64, |acc, v| acc.wrapping_add(u64::from(*v)))
    }

    /// `y[i] = b[i] + Σ_j w[i·cols + j] · x[j]` for the first `rows` rows of the row-major
    /// `w`: each row from `b[i]`, one fused multiply-add per term, in order of `j`.
    pub fn gemv(w: &[f32], x: &[f32], b: &[f32], rows: usize, cols: usize) -> Vec<f32> {
        (0..rows)
            .map(|i| {
                let row = &w[i * cols..(i + 1) * cols];
                row.iter()
                    .zip(&x[..cols])
                    .fold(b[i], |acc, (wij, xj)| wij.mul_add(*xj, acc))
            })
            .collect()
    }

    /// `x[i] = x[i] > 0 ? x[i] : 0` (NaN and -0 become +0).
    pub fn relu(x: &mut [f32]) {
        for v in x {
            *v = if *v > 0.0 { *v } else { 0.0 };
        }
    }
}

/// Little-endian `f32` values of a byte slice (trailing bytes ignored).
pub fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// Little-endian `u32` values of a byte slice (trailing bytes ignored).
pub fn u32s(bytes: &[u8]) -> Vec<u32> {
    bytes
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// The little-endian bytes of `f32` values.
pub fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// The little-endian bytes of `u32` values.
pub fn u32_bytes(values: &[u32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::op::Dim3;

    fn b(id: u64, len: u64) -> KernelArg {
        KernelArg::Buffer(BufferHandle {
            device: 0,
            epoch: 0,
            id,
            len,
        })
    }

    #[test]
    fn argument_count_type_and_size_are_checked() {
        let k = BuiltinKernel::VectorAdd;
        assert_eq!(k.check_args(&[b(1, 16), b(2, 16), b(3, 16), KernelArg::U32(4)]), Ok(4));
        let e = k.check_args(&[b(1, 16), b(2, 16)]).unwrap_err();
        assert!(e.to_string().contains("expected 4 arguments"), "{e}");
        let e = k
            .check_args(&[b(1, 16), KernelArg::F32(1.0), b(3, 16), KernelArg::U32(4)])
            .unwrap_err();
        assert!(e.to_string().contains("parameter `b` is buffer, got f32"), "{e}");
        let e = k
            .check_args(&[b(1, 16), b(2, 8), b(3, 16), KernelArg::U32(4)])
            .unwrap_err();
        assert!(e.to_string().contains("buffer `b` holds 8 bytes"), "{e}");
        assert!(
            BuiltinKernel::Checksum
                .check_args(&[b(1, 4), KernelArg::U32(1), b(2, 4)])
                .is_err()
        );
    }

    #[test]
    fn gemv_checks_every_buffer_against_its_rows_and_columns() {
        let (rows, cols) = (3u32, 5u64);
        let args = |w: u64, x: u64, b_: u64, y: u64, n: u32, c: u32| {
            vec![
                b(1, w),
                b(2, x),
                b(3, b_),
                b(4, y),
                KernelArg::U32(n),
                KernelArg::U32(c),
            ]
        };
        let ok = args(4 * 15, 4 * cols, 12, 12, rows, cols as u32);
        assert_eq!(BuiltinKernel::Gemv.check_args(&ok), Ok(u64::from(rows)));
        for (bad, name) in [
            (args(4 * 15 - 1, 20, 12, 12, 3, 5), "`w`"),
            (args(60, 19, 12, 12, 3, 5), "`x`"),
            (args(60, 20, 11, 12, 3, 5), "`b`"),
            (args(60, 20, 12, 11, 3, 5), "`y`"),
        ] {
            let e = BuiltinKernel::Gemv.check_args(&bad).unwrap_err();
            assert!(e.to_string().contains(name), "{name}: {e}");
        }
        // A matrix whose byte size overflows u64 is too large, not small: a `w` as long as
        // the wrapped size would pass a wrapping multiplication.
        let m = u64::from(u32::MAX);
        let wrapped = (m * m).wrapping_mul(4);
        let huge = args(wrapped, 4 * m, 4 * m, 4 * m, u32::MAX, u32::MAX);
        let e = BuiltinKernel::Gemv.check_args(&huge).unwrap_err();
        assert!(e.to_string().contains("`w`"), "{e}");
        assert!(BuiltinKernel::Relu.check_args(&[b(1, 8), KernelArg::U32(3)]).is_err());
        assert_eq!(BuiltinKernel::Relu.check_args(&[b(1, 12), KernelArg::U32(3)]), Ok(3));
    }

    #[test]
    fn gemv_and_relu_references() {
        // [[1, 2], [3, 4], [5, 6]] · [10, 100] + [0.5, -0.5, 1]
        let w = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let y = reference::gemv(&w, &[10.0, 100.0], &[0.5, -0.5, 1.0], 3, 2);
        assert_eq!(y, vec![210.5, 429.5, 651.0]);
        // Fewer rows than the matrix has: only those.
        assert_eq!(
            reference::gemv(&w, &[10.0, 100.0], &[0.5, -0.5, 1.0], 1, 2),
            vec![210.5]
        );
        // From b, in order of j, one rounding per term: b = 1, + 1e8 (the 1 is lost in f32),
        // − 1e8 = 0. Summing the products first and adding b last would give 1.
        let y = reference::gemv(&[1e8, -1e8], &[1.0, 1.0], &[1.0], 1, 2);
        assert_eq!(y, vec![0.0], "b first: the 1 is lost in 1e8 + 1");
        // And the terms in order: 0, + 1 = 1, + 1e8 (the 1 is lost), − 1e8 = 0; in reverse
        // order, − 1e8 + 1e8 = 0, + 1 = 1.
        let y = reference::gemv(&[1.0, 1e8, -1e8], &[1.0, 1.0, 1.0], &[0.0], 1, 3);
        assert_eq!(y, vec![0.0], "j in order");
        let mut x = [-1.0, 0.0, -0.0, 2.5, f32::NAN, f32::INFINITY, f32::NEG_INFINITY];
        reference::relu(&mut x);
        assert_eq!(
            x.map(f32::to_bits),
            [0.0, 0.0, 0.0, 2.5, 0.0, f32::INFINITY, 0.0].map(f32::to_bits)
        );
    }

    #[test]
    fn launch_dimensions_are_checked() {
        assert!(check_launch_dims(Dim3::x(4), Dim3::x(256)).is_ok());
        assert!(check_launch_dims(Dim3::x(0), Dim3::x(256)).is_err());
        assert!(check_launch_dims(Dim3::x(1), Dim3::x(2048)).is_err());
        assert!(check_launch_dims(Dim3 { x: 1, y: 70000, z: 1 }, Dim3::x(1)).is_err());
    }

    #[test]
    fn launch_dimensions_whose_products_overflow_are_refused_not_wrapped() {
        let max = Dim3 {
            x: u32::MAX,
            y: u32::MAX,
            z: u32::MAX,
        };
        assert_eq!((max.checked_volume(), max.volume()), (None, u64::MAX));
        for (grid, block) in [(max, Dim3::x(1)), (Dim3::x(1), max), (max, max)] {
            let e = check_launch_dims(grid, block).unwrap_err();
            assert!(matches!(e, InvalidReason::BadLaunchConfig { .. }), "{e}");
        }
        // Every dimension within its limit, but 2^31-1 × 2^16-1 × 2^16-1 blocks of 1024
        // threads are more than 2^64 threads.
        let grid = Dim3 {
            x: i32::MAX as u32,
            y: 65535,
            z: 65535,
        };
        assert_eq!(total_threads(grid, Dim3::x(1024)), None);
        let e = check_launch_dims(grid, Dim3::x(1024)).unwrap_err();
        assert!(e.to_string().contains("2^64 threads"), "{e}");
        assert!(check_launch_dims(grid, Dim3::x(1)).is_ok(), "2^63 threads still fit");
        assert_eq!(total_threads(Dim3::x(3), Dim3 { x: 2, y: 2, z: 2 }), Some(24));
    }

    #[test]
    fn sim_module_images_parse() {
        let img = sim_module_image(&[BuiltinKernel::Saxpy, BuiltinKernel::Fill]);
        assert_eq!(
            parse_sim_module(&img).unwrap(),
            vec![BuiltinKernel::Saxpy, BuiltinKernel::Fill]
        );
        assert!(parse_sim_module(b"garbage").is_err());
        assert!(parse_sim_module(format!("{SIM_MODULE_MAGIC}\nnope").as_bytes()).is_err());
        assert!(parse_sim_module(&[0xff, 0xfe]).is_err());
    }

    #[test]
    fn ulps_comparison() {
        assert!(within_ulps(1.0, 1.0, 0));
        assert!(within_ulps(1.0, f32::from_bits(1.0f32.to_bits() + 1), 1));
        assert!(!within_ulps(1.0, f32::from_bits(1.0f32.to_bits() + 2), 1));
        assert!(!within_ulps(1.0, -1.0, 5));
    }

    #[test]
    fn saxpy_uses_one_rounding() {
        // a*x + y rounded once differs from two roundings for these values.
        let (a, x, y) = (1.0000001f32, 1.0000001f32, -1.0000002f32);
        let mut out = [y];
        reference::saxpy(a, &[x], &mut out);
        assert_eq!(out[0], a.mul_add(x, y));
        assert_ne!(out[0], a * x + y);
    }
}
