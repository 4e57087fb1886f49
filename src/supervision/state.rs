//! Device states: what the supervisor decides a device is.

use serde::{Deserialize, Serialize};

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
