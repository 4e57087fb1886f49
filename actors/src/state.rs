//! Device states, and the changes applications can subscribe to.

use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU8, Ordering};

/// The state of a device as the runtime sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceState {
    /// Accepting and executing ops.
    Ready,
    /// Being restarted; ops submitted now wait for the new context.
    Restarting,
    /// Gone; probed periodically for its return. Ops without buffer affinity move to other
    /// devices.
    Lost,
    /// Out of service for good (its reason says why).
    Failed,
}

impl DeviceState {
    /// Every state.
    pub const ALL: [DeviceState; 4] = [
        DeviceState::Ready,
        DeviceState::Restarting,
        DeviceState::Lost,
        DeviceState::Failed,
    ];

    /// The state's name in `snake_case`.
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceState::Ready => "ready",
            DeviceState::Restarting => "restarting",
            DeviceState::Lost => "lost",
            DeviceState::Failed => "failed",
        }
    }
}

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
