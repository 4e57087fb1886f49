//! How an engine's death reads: a worker that ends by SIGABRT while kernels it launched may
//! be running is how ROCm ends a process whose kernel made a memory access fault — a sticky
//! fault of those kernels — unless it was loading a module then; and which of the ops the
//! dying engine had not started may run again on the next one.

use crate::backend::Origin;
use crate::op::Op;

/// How an engine ended: whether by SIGABRT, and whether while it was loading a module.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineDeath {
    /// The worker ended by SIGABRT.
    pub aborted: bool,
    /// The op running when it ended was a module load.
    pub loading: bool,
}

impl EngineDeath {
    /// Whether the death is a GPU memory access fault of the kernels launched since the last
    /// op that waited for the device (`has_suspects`: there are such kernels): a SIGABRT
    /// while they may have been running, which is how ROCm ends a process whose kernel
    /// faulted — unless the op running was a module load. There the abort is taken for the
    /// load's own (ROCm 5.2's hiprtc and code-object manager abort on a target they do not
    /// know), not for a kernel's fault.
    pub fn is_gpu_fault(&self, has_suspects: bool) -> bool {
        self.aborted && !self.loading && has_suspects
    }
}

/// Whether an op the dying engine had not started runs again, transparently, on the next
/// one. Only an application's op that is idempotent, touches no buffer of the dying context
/// and whose answer does not vouch for that context's earlier work (a synchronize or a copy
/// to the host would answer success on a context where those kernels never ran) — and
/// nothing when the death is a GPU memory fault (`gpu_fault`): then, as on NVIDIA where the
/// next call returns the fault, the ops in flight are answered.
pub fn reruns_transparently(op: &Op, origin: Origin, may_have_executed: bool, gpu_fault: bool) -> bool {
    let kind = op.kind();
    origin == Origin::Application
        && !may_have_executed
        && !gpu_fault
        && kind.is_idempotent()
        && !kind.is_synchronizing()
        && op.buffers().is_empty()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::op::BufferHandle;

    fn death(aborted: bool, loading: bool) -> EngineDeath {
        EngineDeath { aborted, loading }
    }

    #[test]
    fn only_a_sigabrt_while_kernels_may_run_outside_a_module_load_is_a_gpu_fault() {
        assert!(death(true, false).is_gpu_fault(true));
        assert!(
            !death(true, false).is_gpu_fault(false),
            "no kernel may have been running"
        );
        assert!(!death(false, false).is_gpu_fault(true), "SIGKILL, an exit");
        // ROCm 5.2's hiprtc and comgr abort on a target they do not know: an abort during a
        // module load is the loader's, and the kernels launched before it are not suspects.
        assert!(!death(true, true).is_gpu_fault(true));
    }

    #[test]
    fn what_reruns_after_a_worker_death() {
        let app = Origin::Application;
        // Idempotent, no buffer, does not vouch for earlier work: reruns if it did not start.
        assert!(reruns_transparently(&Op::MemInfo, app, false, false));
        assert!(reruns_transparently(&Op::DeviceInfo, app, false, false));
        assert!(!reruns_transparently(&Op::MemInfo, app, true, false), "may have run");
        assert!(!reruns_transparently(&Op::MemInfo, Origin::Runtime, false, false));
        // Nothing reruns after a GPU memory fault.
        assert!(!reruns_transparently(&Op::MemInfo, app, false, true));
        // A synchronize would answer that kernels of the dead context finished.
        assert!(!reruns_transparently(&Op::Synchronize, app, false, false));
        let b = BufferHandle {
            device: 0,
            epoch: 1,
            id: 1,
            len: 4,
        };
        let copy = Op::CopyFromDevice {
            src: b,
            offset: 0,
            len: 4,
        };
        assert!(!reruns_transparently(&copy, app, false, false));
        assert!(
            !reruns_transparently(&Op::Alloc { bytes: 4 }, app, false, false),
            "not idempotent"
        );
    }
}
