//! The one way to make a backend from settings: the runtime's (device discovery, and the
//! contexts of thread isolation) and a worker process's (from the host's `Hello`).

use std::sync::Arc;

use crate::backend::sim::fault_plan::FaultInjector;
use crate::backend::sim::{SimBackend, SimHost};
use crate::backend::{Backend, BackendKind};
use crate::config::SimConfig;
use crate::config::error::ConfigError;

/// Where the simulator's faults are decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Faults {
    /// By the run's plan (`[[sim.faults]]`), in this process: the runtime's backend.
    Plan,
    /// By the host, which sends each op's fault with its request: a worker process
    /// ([`FaultInjector::decided_by_host`]).
    FromHost,
}

/// A backend, and for the simulator what it is made of.
pub struct Built {
    /// The backend.
    pub backend: Arc<dyn Backend>,
    /// The simulator's host and fault injector; `None` for a GPU backend.
    pub sim: Option<SimParts>,
}

/// What a simulated backend is made of.
#[derive(Clone)]
pub struct SimParts {
    /// This process's simulated GPU runtime (whose poisoning and pending abort are shared by
    /// every device of the process, as HIP's are).
    pub host: Arc<SimHost>,
    /// The run's fault injector (the plan, or the host's decisions in a worker).
    pub faults: Arc<FaultInjector>,
}

/// Why no backend could be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    /// A bad `[sim]` setting.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The backend's cargo feature is not part of this build.
    #[error("backend `{0}` is not part of this build (build with `--features {0}`)")]
    NotBuilt(BackendKind),
}

/// Makes the backend `kind`. For the simulator: `sim`'s devices, memory and flavour, faults
/// decided as `faults` says, and `crash_allowed` saying whether ops run in a process of their
/// own, where the plan's `crash = true` may end it.
///
/// # Errors
/// [`BuildError`].
pub fn build(kind: BackendKind, sim: &SimConfig, faults: Faults, crash_allowed: bool) -> Result<Built, BuildError> {
    match kind {
        BackendKind::Sim => {
            let backend = match faults {
                Faults::Plan => SimBackend::from_config(sim, crash_allowed)?,
                Faults::FromHost => {
                    sim.validate(crash_allowed)?;
                    SimBackend::with_injector(
                        sim.devices,
                        sim.memory_bytes,
                        Arc::new(FaultInjector::decided_by_host()),
                        crash_allowed,
                    )
                    .with_flavour(sim.flavour)
                }
            };
            let parts = SimParts {
                host: backend.host().clone(),
                faults: backend.faults().clone(),
            };
            Ok(Built {
                backend: Arc::new(backend),
                sim: Some(parts),
            })
        }
        #[cfg(feature = "hip")]
        BackendKind::Hip => Ok(Built {
            backend: Arc::new(crate::backend::hip::HipBackend::new()),
            sim: None,
        }),
        #[cfg(feature = "cuda")]
        BackendKind::Cuda => Ok(Built {
            backend: Arc::new(crate::backend::cuda::CudaBackend::new()),
            sim: None,
        }),
        #[allow(unreachable_patterns)]
        other => Err(BuildError::NotBuilt(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::op::{Op, Origin};

    #[test]
    fn a_worker_simulator_faults_only_as_the_host_decides() {
        let mut sim = SimConfig {
            devices: 2,
            memory_bytes: 1 << 20,
            ..SimConfig::default()
        };
        sim.faults = Vec::new();
        let built = build(BackendKind::Sim, &sim, Faults::FromHost, true).expect("builds");
        let parts = built.sim.expect("a simulator");
        let mut ctx = built.backend.open(1, 0).expect("opens");
        ctx.execute(&Op::MemInfo, Origin::Application)
            .expect("no fault planned");
        parts.faults.plan(
            1,
            Some(crate::backend::sim::fault_plan::FaultAction::Code(
                crate::error::hip::NOT_READY,
            )),
        );
        let e = ctx
            .execute(&Op::MemInfo, Origin::Application)
            .expect_err("the planned fault");
        assert_eq!(
            e.code(),
            Some((crate::error::Api::Sim, crate::error::hip::NOT_READY)),
            "{e}"
        );
        // One op only; and a decision for another device is not this one's.
        ctx.execute(&Op::MemInfo, Origin::Application)
            .expect("the plan was this op's");
        parts.faults.plan(
            0,
            Some(crate::backend::sim::fault_plan::FaultAction::Code(
                crate::error::hip::NOT_READY,
            )),
        );
        ctx.execute(&Op::MemInfo, Origin::Application)
            .expect("planned for device 0");
        // Nor is it kept for a later op, on device 0 or any other.
        let mut ctx0 = built.backend.open(0, 0).expect("opens");
        ctx0.execute(&Op::MemInfo, Origin::Application)
            .expect("the decision went with the op it was planned before");
    }

    #[test]
    fn a_backend_left_out_of_the_build_says_which_feature_it_needs() {
        for kind in [BackendKind::Hip, BackendKind::Cuda] {
            match build(kind, &SimConfig::default(), Faults::Plan, false) {
                Ok(_) => {} // built with its feature
                Err(e) => assert_eq!(
                    e.to_string(),
                    format!("backend `{kind}` is not part of this build (build with `--features {kind}`)")
                ),
            }
        }
    }
}
