//! hipvisor: a supervised multi-GPU runtime.
pub use hipvisor_core as core;
