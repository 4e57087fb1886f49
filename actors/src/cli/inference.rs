//! `--workload inference`: request actors serve a small multi-layer perceptron whose weights
//! are replicated durable buffers on every device. Each request is one task — its input
//! copied in, `gemv` + `relu` per layer on scratch activations, its output copied out —
//! placed by `Runtime::run` and checked against the CPU reference. A device fault under a
//! request costs it latency, not an error: the runtime reruns the task.

use hipvisor::core::kernels::{f32_bytes, f32s, reference};
use hipvisor::{KernelArg, ModuleSource, ReplicatedBuffer, ReplicatedModule, RuntimeError, Task, TaskArg};

use crate::cli::target::Target;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// The layer widths: input, hidden, hidden, output.
pub(crate) const WIDTHS: [usize; 4] = [64, 128, 128, 16];

/// Threads per block of the launches.
const BLOCK: u32 = 128;

struct Layer {
    w: ReplicatedBuffer,
    b: ReplicatedBuffer,
    weights: Vec<f32>,
    bias: Vec<f32>,
    rows: usize,
    cols: usize,
}

/// The model: its layers' weights replicated on every device, and the built-in kernels.
pub(crate) struct Mlp {
    layers: Vec<Layer>,
    kernels: ReplicatedModule,
}

impl Mlp {
    /// Replicates the model's weights (drawn from `seed`, small enough that activations stay
    /// finite) and loads the built-in kernels on every device.
    ///
    /// # Errors
    /// When no device got a replica of something.
    pub(crate) async fn load(rt: &Target, seed: u64) -> Result<Mlp, RuntimeError> {
        let mut rng = SmallRng::seed_from_u64(seed);
        let kernels = rt.replicate_module(ModuleSource::Builtin).await?;
        let mut layers = Vec::new();
        for pair in WIDTHS.windows(2) {
            let (cols, rows) = (pair[0], pair[1]);
            let scale = 1.0 / (cols as f32).sqrt();
            let weights: Vec<f32> = (0..rows * cols).map(|_| rng.random_range(-scale..scale)).collect();
            let bias: Vec<f32> = (0..rows).map(|_| rng.random_range(-0.1..0.1)).collect();
            layers.push(Layer {
                w: rt.replicate(f32_bytes(&weights)).await?,
                b: rt.replicate(f32_bytes(&bias)).await?,
                weights,
                bias,
                rows,
                cols,
            });
        }
        Ok(Mlp { layers, kernels })
    }

    /// One request: `x` through every layer (`relu` after each but the last).
    pub(crate) fn request(&self, x: &[f32]) -> Task {
        let mut t = Task::new();
        let mut act = t.scratch(4 * x.len() as u64);
        t.copy_in(act, 0, f32_bytes(x));
        for (i, l) in self.layers.iter().enumerate() {
            let out = t.scratch(4 * l.rows as u64);
            let rows = TaskArg::value(KernelArg::U32(l.rows as u32));
            let grid = (l.rows as u32).div_ceil(BLOCK);
            t.launch(
                &self.kernels,
                "gemv",
                grid,
                BLOCK,
                [
                    TaskArg::durable(&l.w),
                    act.into(),
                    TaskArg::durable(&l.b),
                    out.into(),
                    rows.clone(),
                    TaskArg::value(KernelArg::U32(l.cols as u32)),
                ],
            );
            if i + 1 < self.layers.len() {
                t.launch(&self.kernels, "relu", grid, BLOCK, [out.into(), rows]);
            }
            act = out;
        }
        let last = self.layers.last().map_or(0, |l| l.rows);
        t.copy_out(act, 0, 4 * last as u64);
        t
    }

    /// The CPU's answer to a request.
    fn reference(&self, x: &[f32]) -> Vec<f32> {
        let mut act = x.to_vec();
        for (i, l) in self.layers.iter().enumerate() {
            act = reference::gemv(&l.weights, &act, &l.bias, l.rows, l.cols);
            if i + 1 < self.layers.len() {
                reference::relu(&mut act);
            }
        }
        act
    }

    /// Whether `outputs` is the answer to `x`: the simulator and the GPUs accumulate each
    /// row in the reference's order with fused multiply-adds, so the same bits.
    pub(crate) fn is_answer(&self, x: &[f32], outputs: &[hipvisor::Payload]) -> bool {
        let got = outputs.first().map(|o| f32s(o.as_bytes())).unwrap_or_default();
        let want = self.reference(x);
        got.len() == want.len() && got.iter().zip(&want).all(|(g, w)| g.to_bits() == w.to_bits())
    }

    /// A request's input.
    pub(crate) fn input(rng: &mut SmallRng) -> Vec<f32> {
        (0..WIDTHS[0]).map(|_| rng.random_range(-1.0..1.0)).collect()
    }
}
