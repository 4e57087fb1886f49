//! The error of loading and checking a configuration ([`ConfigError`]). It sits below every
//! section's own validation (retry, breaker, fault plan), which names its keys with it.

use std::path::PathBuf;

/// A configuration error. Every variant names what was wrong and where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A key has a bad value (or is unknown).
    #[error("config key `{key}`: {reason}")]
    Invalid {
        /// The dotted key (`retry.per_op.launch.max_retries`).
        key: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The config file could not be read or parsed.
    #[error("config file {}: {reason}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// An environment variable names no config key, or has a bad value.
    #[error("environment variable {var}: {reason}")]
    Env {
        /// The variable.
        var: String,
        /// What is wrong with it.
        reason: String,
    },
}

impl ConfigError {
    /// An invalid value of `key`.
    pub fn invalid(key: impl Into<String>, reason: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            key: key.into(),
            reason: reason.into(),
        }
    }

    /// The dotted key the error is about, where there is one.
    pub fn key(&self) -> Option<&str> {
        match self {
            ConfigError::Invalid { key, .. } => Some(key),
            _ => None,
        }
    }
}
