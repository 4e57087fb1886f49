//! Configuration: serde types with defaults, validation that names the bad key, and loading
//! from a TOML file, then the environment, then command-line overrides.
//!
//! Environment variables use the prefix `HIPVISOR_` and `__` between levels:
//! `HIPVISOR_RETRY__MAX_RETRIES=5` sets `retry.max_retries`. A `HIPVISOR_*` variable that
//! names no key is an error (a typo must not be silently ignored). `sim.faults` cannot be
//! set from the environment (it is a list of tables).
//!
//! `config/default.toml` documents every key with its default value.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

use crate::backend::BackendKind;
use crate::backend::sim::fault_plan::{FaultSpec, compile_plan};
use crate::breaker::BreakerConfig;
use crate::op::OpKind;
use crate::retry::RetryConfig;

pub(crate) mod error;

pub use error::ConfigError;

/// The prefix of environment overrides.
pub const ENV_PREFIX: &str = "HIPVISOR";

/// Where a device's context lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Isolation {
    /// On a dedicated OS thread inside the application process: the lowest latency, but a
    /// sticky fault poisons the process's GPU runtime, so every device fails until the
    /// application restarts, and a hung kernel cannot be interrupted.
    Thread,
    /// In a worker process of its own (the default): a sticky fault, a crash or a hung
    /// kernel restarts that device's worker only.
    #[default]
    Process,
}

impl Isolation {
    /// The name in `snake_case`.
    pub fn as_str(self) -> &'static str {
        match self {
            Isolation::Thread => "thread",
            Isolation::Process => "process",
        }
    }
}

/// The whole configuration.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeConfig {
    /// `[runtime]`: backend, devices, isolation, capacity, deadlines.
    pub runtime: RuntimeSection,
    /// `[retry]`: retry policy, per-op overrides, budget.
    pub retry: RetryConfig,
    /// `[supervisor]`: restarts and quarantine.
    pub supervisor: SupervisorConfig,
    /// `[breaker]`: the per-device circuit breaker.
    pub breaker: BreakerConfig,
    /// `[telemetry]`: the metrics endpoint.
    pub telemetry: TelemetryConfig,
    /// `[sim]`: the simulated backend and its fault plan.
    pub sim: SimConfig,
    /// `[cluster]`: nodes on other hosts (feature `cluster` of `hipvisor`).
    pub cluster: ClusterConfig,
}

/// `[cluster]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// How often an application checks that each joined node answers, in milliseconds.
    /// Default 500.
    pub heartbeat_interval_ms: u64,
    /// A node that has not answered a heartbeat for this long is lost: its requests in
    /// flight are answered `NodeLost`, its devices leave (a frozen process is detected
    /// this way; a dead one at once). Default 3000.
    pub heartbeat_timeout_ms: u64,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            heartbeat_interval_ms: 500,
            heartbeat_timeout_ms: 3000,
        }
    }
}

/// `[runtime]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeSection {
    /// `sim`, `hip` or `cuda`. Default `sim`.
    pub backend: BackendKind,
    /// Use the first N devices of the backend; 0 = all. Default 0.
    pub devices: u32,
    /// `process` or `thread`. Default `process`.
    pub isolation: Isolation,
    /// Ops in flight per device before `submit` waits (`try_submit` fails with `Busy`).
    /// Default 1024.
    pub in_flight: u32,
    /// Deadline of one op, retries included, in milliseconds. Default 30000.
    pub op_deadline_ms: u64,
    /// How long, in microseconds, a serial caller's op is polled for instead of parking a
    /// thread: the executor waiting for the next op, the caller waiting for its answer, a
    /// worker process waiting for the next request. Waking a parked thread costs tens of
    /// microseconds, which this saves on every serial op; the price is up to this much CPU
    /// per op, spent yielding. Only when the device has at most one op in flight. 0 turns
    /// it off. At most 1000. Default 50.
    pub spin_us: u64,
    /// How long shutdown waits for ops in flight, in milliseconds. Default 5000.
    pub shutdown_timeout_ms: u64,
    /// Allow thread isolation with a GPU runtime that aborts the process on a GPU memory
    /// access fault (`backend = "hip"`, or the simulator with `sim.flavour = "hip"`): ROCm
    /// does not return such a fault as an error, it ends the process — here, the
    /// application. Without it, that combination is a configuration error. Default false.
    pub allow_abort_on_gpu_fault: bool,
}

/// The most `runtime.spin_us` allows.
pub const MAX_SPIN_US: u64 = 1000;

impl Default for RuntimeSection {
    fn default() -> Self {
        RuntimeSection {
            backend: BackendKind::Sim,
            devices: 0,
            isolation: Isolation::Process,
            in_flight: 1024,
            op_deadline_ms: 30_000,
            spin_us: 50,
            shutdown_timeout_ms: 5_000,
            allow_abort_on_gpu_fault: false,
        }
    }
}

/// `[supervisor]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SupervisorConfig {
    /// Restarts allowed per device within `restart_window_ms` before it is `failed`.
    /// Default 5.
    pub max_restarts: u32,
    /// The window of `max_restarts`, in milliseconds. Default 60000.
    pub restart_window_ms: u64,
    /// Backoff before the second restart of a burst, in milliseconds (the first restart after
    /// a quiet period is immediate; later ones double up to the maximum). Default 50.
    pub restart_backoff_min_ms: u64,
    /// Cap on the backoff between restarts, in milliseconds. Default 5000.
    pub restart_backoff_max_ms: u64,
    /// Random factor of the restart backoff (0.2 = ±20 %). Default 0.2.
    pub restart_backoff_jitter: f64,
    /// Quiet time after which the restart backoff starts again from its minimum, in
    /// milliseconds. Default 60000.
    pub restart_backoff_reset_ms: u64,
    /// A kernel that is a suspect in this many sticky faults within
    /// `quarantine_window_ms` is quarantined. Default 2.
    pub quarantine_after: u32,
    /// The window of `quarantine_after`, in milliseconds. Default 600000.
    pub quarantine_window_ms: u64,
    /// How often a lost device is probed for its return, in milliseconds. Default 500.
    pub lost_probe_interval_ms: u64,
    /// Keep a warm standby worker per device (process isolation). Default false.
    pub standby: bool,
    /// Time a new worker has for its handshake, module restore and health probe together,
    /// in milliseconds; a worker that takes longer is killed and the start counts as a
    /// failed restart. Default 30000 (a cold GPU start with kernel compilation takes
    /// seconds).
    pub worker_start_timeout_ms: u64,
}

impl Default for SupervisorConfig {
    fn default() -> Self {
        SupervisorConfig {
            max_restarts: 5,
            restart_window_ms: 60_000,
            restart_backoff_min_ms: 50,
            restart_backoff_max_ms: 5_000,
            restart_backoff_jitter: 0.2,
            restart_backoff_reset_ms: 60_000,
            quarantine_after: 2,
            quarantine_window_ms: 600_000,
            lost_probe_interval_ms: 500,
            standby: false,
            worker_start_timeout_ms: 30_000,
        }
    }
}

/// `[telemetry]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// Address of the metrics endpoint (`127.0.0.1:9464`; port 0 picks one). No endpoint
    /// is started unless this is set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<String>,
    /// How often device actors flush their local counters to the metrics actor, in
    /// milliseconds. Default 250.
    pub flush_interval_ms: u64,
    /// Connections the metrics endpoint keeps open at most; at the cap the oldest idle one
    /// is closed to admit a new one, so a probe always gets in. Default 1024.
    pub max_connections: u32,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            listen: None,
            flush_interval_ms: 250,
            max_connections: 1024,
        }
    }
}

/// Which GPU runtime the simulator behaves like where NVIDIA and AMD differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum SimFlavour {
    /// As CUDA on NVIDIA (the default): a memory access fault of a kernel is a sticky error
    /// (700) that every later call returns; dynamic shared memory up to the opt-in maximum
    /// of 232448 bytes per block.
    #[default]
    Cuda,
    /// As HIP on AMD (ROCm): a memory access fault of a kernel aborts the process (SIGABRT,
    /// after ROCm's "Memory access fault by GPU node-N" line); dynamic shared memory up to
    /// 65536 bytes per block.
    Hip,
}

impl SimFlavour {
    /// The name in `snake_case`.
    pub fn as_str(self) -> &'static str {
        match self {
            SimFlavour::Cuda => "cuda",
            SimFlavour::Hip => "hip",
        }
    }

    /// The most dynamic shared memory one launch may ask for, in bytes: CUDA's opt-in
    /// maximum on Hopper (227 KiB; the CUDA backend raises a kernel's limit above the
    /// default 48 KiB when a launch asks for more), or the 64 KiB of an AMD compute unit.
    pub fn max_shared_mem_bytes(self) -> u32 {
        match self {
            SimFlavour::Cuda => 232_448,
            SimFlavour::Hip => 65_536,
        }
    }
}

/// `[sim]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SimConfig {
    /// Number of simulated devices. Default 4.
    pub devices: u32,
    /// Memory of each device in bytes. Default 17179869184 (16 GiB).
    pub memory_bytes: u64,
    /// Seed of the fault plan's random streams. Default 0.
    pub seed: u64,
    /// Which GPU runtime the simulator fails like: `cuda` or `hip`. Default `cuda`.
    pub flavour: SimFlavour,
    /// The fault plan.
    pub faults: Vec<FaultSpec>,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            devices: 4,
            memory_bytes: 16 << 30,
            seed: 0,
            flavour: SimFlavour::Cuda,
            faults: Vec::new(),
        }
    }
}

/// The most simulated devices.
pub const MAX_SIM_DEVICES: u32 = 1024;

impl SimConfig {
    /// Checks `[sim]`; `crash_allowed` says whether ops run in processes of their own.
    /// It does not check the flavour against the isolation: `flavour = "hip"` in the
    /// application's process aborts it on a kernel's memory fault, and
    /// [`RuntimeConfig::validate`] is the guard that refuses that without
    /// `runtime.allow_abort_on_gpu_fault`.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the key.
    pub fn validate(&self, crash_allowed: bool) -> Result<(), ConfigError> {
        if self.devices == 0 || self.devices > MAX_SIM_DEVICES {
            return Err(ConfigError::invalid(
                "sim.devices",
                format!("must be from 1 to {MAX_SIM_DEVICES}, got {}", self.devices),
            ));
        }
        if self.memory_bytes == 0 || usize::try_from(self.memory_bytes).is_err() {
            return Err(ConfigError::invalid(
                "sim.memory_bytes",
                format!("must be from 1 to {}, got {}", usize::MAX, self.memory_bytes),
            ));
        }
        compile_plan(&self.faults, self.devices, crash_allowed).map(|_| ())
    }
}

fn positive(key: &str, v: u64) -> Result<(), ConfigError> {
    if v == 0 {
        return Err(ConfigError::invalid(key, "must be greater than 0"));
    }
    Ok(())
}

impl RuntimeConfig {
    /// Checks every section, naming the first bad key.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the key and the reason.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let r = &self.runtime;
        positive("runtime.in_flight", u64::from(r.in_flight))?;
        positive("runtime.op_deadline_ms", r.op_deadline_ms)?;
        if r.spin_us > MAX_SPIN_US {
            return Err(ConfigError::invalid(
                "runtime.spin_us",
                format!("must be at most {MAX_SPIN_US}, got {}", r.spin_us),
            ));
        }
        self.retry.validate()?;
        let s = &self.supervisor;
        positive("supervisor.restart_window_ms", s.restart_window_ms)?;
        positive("supervisor.quarantine_after", u64::from(s.quarantine_after))?;
        positive("supervisor.lost_probe_interval_ms", s.lost_probe_interval_ms)?;
        positive("supervisor.worker_start_timeout_ms", s.worker_start_timeout_ms)?;
        if s.restart_backoff_max_ms < s.restart_backoff_min_ms {
            return Err(ConfigError::invalid(
                "supervisor.restart_backoff_max_ms",
                format!(
                    "the cap ({} ms) must not be below restart_backoff_min_ms ({} ms)",
                    s.restart_backoff_max_ms, s.restart_backoff_min_ms
                ),
            ));
        }
        if !(0.0..=1.0).contains(&s.restart_backoff_jitter) {
            return Err(ConfigError::invalid(
                "supervisor.restart_backoff_jitter",
                format!("must be from 0 to 1, got {}", s.restart_backoff_jitter),
            ));
        }
        self.breaker.validate()?;
        positive("telemetry.flush_interval_ms", self.telemetry.flush_interval_ms)?;
        let c = &self.cluster;
        positive("cluster.heartbeat_interval_ms", c.heartbeat_interval_ms)?;
        // A late heartbeat or two must not lose a node: its requests in flight would answer
        // `NodeLost` (the node is redialled; only replayable tasks run again, elsewhere).
        if c.heartbeat_timeout_ms < c.heartbeat_interval_ms.saturating_mul(3) {
            return Err(ConfigError::invalid(
                "cluster.heartbeat_timeout_ms",
                format!(
                    "must be at least 3 × heartbeat_interval_ms ({} ms), got {}",
                    c.heartbeat_interval_ms, c.heartbeat_timeout_ms
                ),
            ));
        }
        positive("telemetry.max_connections", u64::from(self.telemetry.max_connections))?;
        if let Some(addr) = &self.telemetry.listen
            && addr.parse::<std::net::SocketAddr>().is_err()
        {
            return Err(ConfigError::invalid(
                "telemetry.listen",
                format!("`{addr}` is not an address like 127.0.0.1:9464"),
            ));
        }
        if r.backend == BackendKind::Sim && r.devices > self.sim.devices {
            return Err(ConfigError::invalid(
                "runtime.devices",
                format!(
                    "{} devices asked for, the simulator has {} (sim.devices)",
                    r.devices, self.sim.devices
                ),
            ));
        }
        let aborts = match r.backend {
            BackendKind::Hip => Some("runtime.backend = \"hip\""),
            BackendKind::Sim if self.sim.flavour == SimFlavour::Hip => Some("sim.flavour = \"hip\""),
            _ => None,
        };
        if let Some(which) = aborts
            && r.isolation == Isolation::Thread
            && !r.allow_abort_on_gpu_fault
        {
            return Err(ConfigError::invalid(
                "runtime.isolation",
                format!(
                    "\"thread\" with {which}: a GPU memory access fault aborts the process on AMD, and in \
                     thread isolation that process is the application; use runtime.isolation = \"process\", \
                     or set runtime.allow_abort_on_gpu_fault = true to accept it"
                ),
            ));
        }
        self.sim.validate(r.isolation == Isolation::Process)
    }

    /// The configuration as TOML (what `hipvisor config` prints).
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("the config serializes to TOML")
    }

    /// Loads `path` (if any), then the process environment, then `overrides`, and validates.
    ///
    /// # Errors
    /// [`ConfigError`] naming the file, variable or key that is wrong.
    pub fn load(path: Option<&Path>, overrides: &[(String, String)]) -> Result<RuntimeConfig, ConfigError> {
        ConfigLoader::new().file(path).process_env().overrides(overrides).load()
    }
}

/// Loads a [`RuntimeConfig`] from its layers: built-in defaults < file < environment <
/// overrides (command-line flags).
#[derive(Debug, Default, Clone)]
pub struct ConfigLoader {
    file: Option<PathBuf>,
    text: Option<String>,
    env: Vec<(String, String)>,
    /// `HIPVISOR_*` variables whose name or value is not UTF-8, and why.
    env_errors: Vec<(String, String)>,
    overrides: Vec<(String, String)>,
}

impl ConfigLoader {
    /// A loader with defaults only.
    pub fn new() -> ConfigLoader {
        ConfigLoader::default()
    }

    /// Reads this TOML file (none: defaults only).
    pub fn file(mut self, path: Option<&Path>) -> ConfigLoader {
        self.file = path.map(Path::to_path_buf);
        self
    }

    /// Uses this TOML text instead of a file.
    pub fn toml(mut self, text: impl Into<String>) -> ConfigLoader {
        self.text = Some(text.into());
        self
    }

    /// The environment to read `HIPVISOR_*` variables from (others are ignored).
    pub fn env(mut self, vars: impl IntoIterator<Item = (String, String)>) -> ConfigLoader {
        let prefix = format!("{ENV_PREFIX}_");
        self.env = vars.into_iter().filter(|(k, _)| k.starts_with(&prefix)).collect();
        self.env_errors.clear();
        self
    }

    /// Like [`ConfigLoader::env`], from variables as the OS has them (`std::env::vars_os`):
    /// a variable that is not UTF-8 is ignored unless its name starts with `HIPVISOR_`, and
    /// then it is an error naming it (at [`ConfigLoader::load`]). (`std::env::vars` panics
    /// on any variable that is not UTF-8, whoever set it.)
    pub fn env_os(mut self, vars: impl IntoIterator<Item = (std::ffi::OsString, std::ffi::OsString)>) -> ConfigLoader {
        use std::os::unix::ffi::OsStrExt;
        let prefix = format!("{ENV_PREFIX}_");
        let mut env = Vec::new();
        let mut errors = Vec::new();
        for (name, value) in vars {
            if !name.as_bytes().starts_with(prefix.as_bytes()) {
                continue;
            }
            match (name.into_string(), value.into_string()) {
                (Ok(name), Ok(value)) => env.push((name, value)),
                (Ok(name), Err(_)) => errors.push((name, "its value is not UTF-8".to_string())),
                (Err(name), _) => {
                    errors.push((name.to_string_lossy().into_owned(), "its name is not UTF-8".to_string()))
                }
            }
        }
        self.env = env;
        self.env_errors = errors;
        self
    }

    /// [`ConfigLoader::env_os`] with this process's environment.
    pub fn process_env(self) -> ConfigLoader {
        self.env_os(std::env::vars_os())
    }

    /// Overrides by dotted key (`sim.seed` = `"7"`): values are parsed like environment
    /// values.
    pub fn overrides(mut self, overrides: &[(String, String)]) -> ConfigLoader {
        self.overrides = overrides.to_vec();
        self
    }

    /// Builds and validates the configuration.
    ///
    /// # Errors
    /// [`ConfigError`] naming the file, variable or key that is wrong.
    pub fn load(self) -> Result<RuntimeConfig, ConfigError> {
        use config::{Config, Environment, File, FileFormat};
        let mut builder = Config::builder();
        if let Some(text) = &self.text {
            builder = builder.add_source(File::from_str(text, FileFormat::Toml));
        } else if let Some(path) = &self.file {
            let text = std::fs::read_to_string(path).map_err(|e| ConfigError::File {
                path: path.clone(),
                reason: e.to_string(),
            })?;
            // Parse once with the toml crate for messages with line numbers and key names.
            toml::from_str::<toml::Table>(&text).map_err(|e| ConfigError::File {
                path: path.clone(),
                reason: e.to_string(),
            })?;
            builder = builder.add_source(File::from_str(&text, FileFormat::Toml));
        }
        if let Some((var, reason)) = self.env_errors.first() {
            return Err(ConfigError::Env {
                var: var.clone(),
                reason: reason.clone(),
            });
        }
        for (var, _) in &self.env {
            check_env_var(var)?;
        }
        builder = builder.add_source(
            Environment::with_prefix(ENV_PREFIX)
                .prefix_separator("_")
                .separator("__")
                .try_parsing(true)
                .source(Some(self.env.iter().cloned().collect())),
        );
        for (key, value) in &self.overrides {
            builder = builder
                .set_override(key.as_str(), parse_scalar(value))
                .map_err(|e| ConfigError::invalid(key.clone(), e.to_string()))?;
        }
        let built = builder.build().map_err(|e| self.source_error(e))?;
        let config: RuntimeConfig = serde_path_to_error::deserialize(built).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner().to_string();
            let key = if path == "." || path.is_empty() {
                "(top level)".to_string()
            } else {
                path
            };
            self.env_error(&key, &inner)
                .unwrap_or_else(|| ConfigError::invalid(key, inner))
        })?;
        config
            .validate()
            .map_err(|e| match e.key().and_then(|k| self.env_error(k, &e.to_string())) {
                Some(env) => env,
                None => e,
            })?;
        Ok(config)
    }

    fn source_error(&self, e: config::ConfigError) -> ConfigError {
        match &self.file {
            Some(path) => ConfigError::File {
                path: path.clone(),
                reason: e.to_string(),
            },
            None => ConfigError::invalid("(config)", e.to_string()),
        }
    }

    /// The error restated for the environment variable that set `key`, if one did.
    fn env_error(&self, key: &str, reason: &str) -> Option<ConfigError> {
        let var = self
            .env
            .iter()
            .map(|(v, _)| v)
            .find(|v| env_key(v).is_some_and(|k| key.starts_with(&k)))?;
        Some(ConfigError::Env {
            var: var.clone(),
            reason: reason.to_string(),
        })
    }
}

/// A command-line or environment value as the most specific scalar it parses as.
fn parse_scalar(v: &str) -> config::Value {
    if let Ok(b) = v.parse::<bool>() {
        return b.into();
    }
    if let Ok(i) = v.parse::<i64>() {
        return i.into();
    }
    if let Ok(u) = v.parse::<u64>() {
        return u.to_string().into();
    }
    if let Ok(f) = v.parse::<f64>() {
        return f.into();
    }
    v.into()
}

/// The dotted key an environment variable sets (`HIPVISOR_RETRY__MAX_RETRIES` →
/// `retry.max_retries`).
fn env_key(var: &str) -> Option<String> {
    let rest = var.strip_prefix(ENV_PREFIX)?.strip_prefix('_')?;
    Some(rest.to_lowercase().split("__").collect::<Vec<_>>().join("."))
}

fn check_env_var(var: &str) -> Result<(), ConfigError> {
    let unknown = |reason: String| {
        Err(ConfigError::Env {
            var: var.to_string(),
            reason,
        })
    };
    let Some(key) = env_key(var) else {
        return unknown("not a configuration variable".into());
    };
    let parts: Vec<&str> = key.split('.').collect();
    if parts.first() == Some(&"sim") && parts.get(1) == Some(&"faults") {
        return unknown("sim.faults cannot be set from the environment; use the config file".into());
    }
    if let ["retry", "per_op", op, field] = parts.as_slice() {
        if OpKind::from_name(op).is_none() {
            return unknown(format!("`{op}` is not an op kind (in `{key}`)"));
        }
        return if known_key(&["retry", field]) && *field != "per_op" && *field != "budget" {
            Ok(())
        } else {
            unknown(format!("`{key}` is not a configuration key"))
        };
    }
    if known_key(&parts) {
        Ok(())
    } else {
        unknown(format!(
            "`{key}` is not a configuration key (use {ENV_PREFIX}_SECTION__KEY, e.g. {ENV_PREFIX}_RETRY__MAX_RETRIES)"
        ))
    }
}

/// Whether `parts` names a leaf key of the configuration.
fn known_key(parts: &[&str]) -> bool {
    let mut defaults = RuntimeConfig::default();
    defaults.telemetry.listen = Some(String::new());
    let table = toml::Value::try_from(&defaults).expect("the default config serializes");
    let mut node = &table;
    for p in parts {
        match node.get(p) {
            Some(next) => node = next,
            None => return false,
        }
    }
    !node.is_table()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        RuntimeConfig::default().validate().unwrap();
    }

    #[test]
    fn env_keys_map_to_dotted_keys() {
        assert_eq!(
            env_key("HIPVISOR_RETRY__MAX_RETRIES").as_deref(),
            Some("retry.max_retries")
        );
        assert!(check_env_var("HIPVISOR_RETRY__MAX_RETRIES").is_ok());
        assert!(check_env_var("HIPVISOR_RETRY__PER_OP__LAUNCH__MAX_RETRIES").is_ok());
        assert!(check_env_var("HIPVISOR_RETRY__PER_OP__LUNCH__MAX_RETRIES").is_err());
        assert!(check_env_var("HIPVISOR_RETRY__MAX_RETRIEZ").is_err());
        assert!(check_env_var("HIPVISOR_RETRY").is_err());
        assert!(check_env_var("HIPVISOR_TELEMETRY__LISTEN").is_ok());
        assert!(check_env_var("HIPVISOR_SIM__FAULTS").is_err());
    }
}
