//! Device states, and the changes applications can subscribe to.

use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU8, Ordering};

/// The state of a device as the runtime sees it (the supervisor's decisions, in the core,
/// are made on it).
pub use hipvisor_core::supervision::DeviceState;

/// A device's state change, as delivered to subscribers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceStateChange {
    /// The device.
    pub device: u32,
    /// The state before.
    pub from: DeviceState,
    /// The state after.
    pub to: DeviceState,
    /// Why (for lost and failed devices).
    pub reason: Option<String>,
}

/// A [`DeviceState`] readable from any thread.
#[derive(Debug)]
pub(crate) struct AtomicState(AtomicU8);

impl AtomicState {
    pub(crate) fn new(s: DeviceState) -> Self {
        AtomicState(AtomicU8::new(s as u8))
    }

    pub(crate) fn get(&self) -> DeviceState {
        DeviceState::ALL[self.0.load(Ordering::Acquire) as usize]
    }

    pub(crate) fn set(&self, s: DeviceState) -> DeviceState {
        DeviceState::ALL[self.0.swap(s as u8, Ordering::AcqRel) as usize]
    }
}
