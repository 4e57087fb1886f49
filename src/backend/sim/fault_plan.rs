//! The simulator's fault plan: seeded, scripted faults loaded from `[[sim.faults]]`.
//!
//! ```toml
//! [[sim.faults]]
//! op = "launch"          # an op kind in snake_case, or "any" (default)
//! kernel = "saxpy"       # optional, launches of this function only
//! device = 2             # optional, default every device
//! probability = 0.01     # trigger, exactly one of: probability | nth (1-based) | after
//! code = 700             # action, exactly one of: code (a HIP code) | hang_ms | crash = true
//! duration_ms = 3000     # optional: the fault stops applying this long after it first fired
//! ```
//!
//! Decisions made here (deterministic per device):
//! - Counting is **per device**: `nth = 3` fires on the third matching op *of each device*
//!   the rule covers, and `after = 3` on every matching op of a device from its third on.
//!   Each device's ops run one at a time, so the counts do not depend on how devices
//!   interleave.
//! - `probability` draws from one random stream per device, derived from `(seed, device)`,
//!   one number per matching op and rule.
//! - The plan's state belongs to the run (a [`FaultInjector`] shared by every simulated host
//!   of the run): replacing a host, or a worker process, re-arms nothing.
//! - Ops issued by the runtime itself are never faulted, and not counted — with one
//!   exception: a device that a `DeviceLost`-class code (100, 3, 4, 35) made disappear is
//!   gone for everyone. When such a rule fires with `duration_ms`, the device is absent for
//!   that long after the rule first fired; with `after` and no duration, for the rest of the
//!   run. While absent, every op on it fails with the rule's code, health probes included,
//!   so the runtime sees it return only when it really does.
//! - When several rules fire on one op, the first in the file wins.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::config::error::ConfigError;
use crate::error::{Api, ErrorClass, classify};
use crate::op::Origin;
use crate::op::{Op, OpKind};

/// One `[[sim.faults]]` entry as written in the config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FaultSpec {
    /// An op kind in `snake_case`, or `"any"`.
    pub op: String,
    /// Only launches of this function.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernel: Option<String>,
    /// Only this device.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device: Option<u32>,
    /// Trigger: fire with this probability per matching op.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub probability: Option<f64>,
    /// Trigger: fire on the nth matching op (1-based), once per run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nth: Option<u64>,
    /// Trigger: fire on every matching op from the nth on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub after: Option<u64>,
    /// Action: fail with this HIP code.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<i32>,
    /// Action: the op hangs this long (then completes).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hang_ms: Option<u64>,
    /// Action: the process executing the op dies (process isolation only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub crash: Option<bool>,
    /// The fault stops applying this long after it first fired.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
}

impl Default for FaultSpec {
    fn default() -> Self {
        FaultSpec {
            op: "any".into(),
            kernel: None,
            device: None,
            probability: None,
            nth: None,
            after: None,
            code: None,
            hang_ms: None,
            crash: None,
            duration_ms: None,
        }
    }
}

/// What makes a rule fire.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Trigger {
    /// Each matching op with this probability.
    Probability(f64),
    /// The nth matching op (1-based).
    Nth(u64),
    /// Every matching op from the nth on.
    After(u64),
}

/// What a fired rule does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultAction {
    /// Fail with this HIP code (sticky codes on a launch surface asynchronously).
    Code(i32),
    /// Hang this long, then complete.
    Hang(Duration),
    /// The executing process dies.
    Crash,
}

/// A validated fault rule.
#[derive(Debug, Clone, PartialEq)]
pub struct FaultRule {
    /// The op kind matched, `None` for any.
    pub op: Option<OpKind>,
    /// The kernel matched, if any.
    pub kernel: Option<String>,
    /// The device matched, `None` for every device.
    pub device: Option<u32>,
    /// When it fires.
    pub trigger: Trigger,
    /// What it does.
    pub action: FaultAction,
    /// How long it applies after it first fired.
    pub duration: Option<Duration>,
}

impl FaultSpec {
    /// Validates the entry at index `index` of `sim.faults`, for a run with `devices`
    /// devices, naming the bad key (`sim.faults[2].probability`).
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the key and the reason.
    pub fn compile(&self, index: usize, devices: u32, crash_allowed: bool) -> Result<FaultRule, ConfigError> {
        let key = |k: &str| format!("sim.faults[{index}].{k}");
        let op = match self.op.as_str() {
            "" | "any" => None,
            name => Some(OpKind::from_name(name).ok_or_else(|| {
                ConfigError::invalid(
                    key("op"),
                    format!(
                        "unknown op `{name}`, expected \"any\" or one of {}",
                        OpKind::ALL.map(OpKind::as_str).join(", ")
                    ),
                )
            })?),
        };
        if self.kernel.is_some() && !matches!(op, None | Some(OpKind::Launch)) {
            return Err(ConfigError::invalid(
                key("kernel"),
                "a kernel filter needs op = \"launch\" or \"any\"",
            ));
        }
        if let Some(d) = self.device
            && d >= devices
        {
            return Err(ConfigError::invalid(
                key("device"),
                format!("device {d} is out of range (the simulator has {devices} devices)"),
            ));
        }
        let triggers = [
            self.probability.map(|p| ("probability", Trigger::Probability(p))),
            self.nth.map(|n| ("nth", Trigger::Nth(n))),
            self.after.map(|n| ("after", Trigger::After(n))),
        ];
        let set: Vec<_> = triggers.into_iter().flatten().collect();
        let trigger = match set.as_slice() {
            [(_, t)] => *t,
            [] => {
                return Err(ConfigError::invalid(
                    key("probability"),
                    "one trigger is required: probability, nth or after",
                ));
            }
            [_, (second, _), ..] => {
                return Err(ConfigError::invalid(
                    key(second),
                    format!(
                        "only one trigger is allowed, got {}",
                        set.iter().map(|(k, _)| *k).collect::<Vec<_>>().join(" and ")
                    ),
                ));
            }
        };
        match trigger {
            Trigger::Probability(p) if !(0.0..=1.0).contains(&p) => {
                return Err(ConfigError::invalid(
                    key("probability"),
                    format!("must be from 0 to 1, got {p}"),
                ));
            }
            Trigger::Nth(0) => return Err(ConfigError::invalid(key("nth"), "is 1-based: must be at least 1")),
            Trigger::After(0) => return Err(ConfigError::invalid(key("after"), "is 1-based: must be at least 1")),
            _ => {}
        }
        let actions = [
            self.code.map(|c| ("code", FaultAction::Code(c))),
            self.hang_ms
                .map(|ms| ("hang_ms", FaultAction::Hang(Duration::from_millis(ms)))),
            self.crash.filter(|c| *c).map(|_| ("crash", FaultAction::Crash)),
        ];
        let set: Vec<_> = actions.into_iter().flatten().collect();
        let action = match set.as_slice() {
            [(_, a)] => *a,
            [] => {
                return Err(ConfigError::invalid(
                    key("code"),
                    "one action is required: code, hang_ms or crash = true",
                ));
            }
            [_, (second, _), ..] => {
                return Err(ConfigError::invalid(
                    key(second),
                    format!(
                        "only one action is allowed, got {}",
                        set.iter().map(|(k, _)| *k).collect::<Vec<_>>().join(" and ")
                    ),
                ));
            }
        };
        if action == FaultAction::Code(0) {
            return Err(ConfigError::invalid(key("code"), "0 is success, not a fault"));
        }
        if action == FaultAction::Crash && !crash_allowed {
            return Err(ConfigError::invalid(
                key("crash"),
                "crash = true needs ops to run in separate processes (runtime.isolation = \"process\")",
            ));
        }
        Ok(FaultRule {
            op,
            kernel: self.kernel.clone(),
            device: self.device,
            trigger,
            action,
            duration: self.duration_ms.map(Duration::from_millis),
        })
    }
}

/// Compiles a whole plan.
///
/// # Errors
/// The first bad entry's [`ConfigError`].
pub fn compile_plan(specs: &[FaultSpec], devices: u32, crash_allowed: bool) -> Result<Vec<FaultRule>, ConfigError> {
    specs
        .iter()
        .enumerate()
        .map(|(i, s)| s.compile(i, devices, crash_allowed))
        .collect()
}

#[derive(Debug, Default, Clone, Copy)]
struct RuleState {
    count: u64,
    first_fired: Option<Instant>,
}

#[derive(Debug)]
struct DeviceState {
    rng: ChaCha8Rng,
    rules: Vec<RuleState>,
    /// The device is gone until then (`None` in the tuple: for good), failing with the code.
    absent: Option<(Option<Instant>, i32)>,
}

/// The run's fault plan with its state: decides, op by op, whether a fault fires.
///
/// Shared (`Arc`) by every simulated host of a run, so its counts outlive hosts.
#[derive(Debug)]
pub struct FaultInjector {
    rules: Vec<FaultRule>,
    devices: Vec<Mutex<DeviceState>>,
    /// In a worker process: the fault the host decided for the next op, by device
    /// ([`FaultInjector::decided_by_host`]).
    from_host: Option<Mutex<Option<(u32, FaultAction)>>>,
}

impl FaultInjector {
    /// An injector for `devices` devices with the random streams derived from `seed`.
    pub fn new(rules: Vec<FaultRule>, devices: u32, seed: u64) -> FaultInjector {
        let devices = (0..devices)
            .map(|d| {
                let mut rng = ChaCha8Rng::seed_from_u64(seed);
                rng.set_stream(u64::from(d));
                Mutex::new(DeviceState {
                    rng,
                    rules: vec![RuleState::default(); rules.len()],
                    absent: None,
                })
            })
            .collect();
        FaultInjector {
            rules,
            devices,
            from_host: None,
        }
    }

    /// An injector that never fires.
    pub fn none() -> FaultInjector {
        FaultInjector {
            rules: Vec::new(),
            devices: Vec::new(),
            from_host: None,
        }
    }

    /// A worker process's injector: the host decides each op's fault with the run's plan
    /// (whose counts and random streams outlive workers, so a restarted worker re-arms
    /// nothing) and sends the decision with the request; the worker hands it over with
    /// [`FaultInjector::plan`] before it executes the op.
    pub fn decided_by_host() -> FaultInjector {
        FaultInjector {
            from_host: Some(Mutex::new(None)),
            ..FaultInjector::none()
        }
    }

    /// Arms the fault the host decided for the next op of `device` (`None`: no fault). A
    /// decision applies to that one op: the next op takes it (and clears it) whether or not
    /// it is valid, and whichever device it runs on. Does nothing on an injector that decides
    /// for itself.
    pub fn plan(&self, device: u32, fault: Option<FaultAction>) {
        if let Some(slot) = &self.from_host {
            *crate::sync::lock(slot) = fault.map(|f| (device, f));
        }
    }

    /// For an injector [`decided_by_host`](FaultInjector::decided_by_host): the fault
    /// planned for this op of `device` (`Some(None)`: none was planned for it). The slot is
    /// cleared whatever it held, so no decision outlives the op after it. `None` for an
    /// injector that decides with its own rules ([`FaultInjector::decide`]).
    pub fn take_planned(&self, device: u32) -> Option<Option<FaultAction>> {
        let slot = self.from_host.as_ref()?;
        let planned = crate::sync::lock(slot).take();
        Some(planned.and_then(|(d, fault)| (d == device).then_some(fault)))
    }

    /// The rules.
    pub fn rules(&self) -> &[FaultRule] {
        &self.rules
    }

    /// Decides whether `op` on `device` faults, and how. Counts the op for every rule it
    /// matches. Runtime-issued ops are neither faulted nor counted.
    pub fn decide(&self, device: u32, op: &Op, origin: Origin) -> Option<FaultAction> {
        self.decide_for(device, op.kind(), op.kernel(), origin)
    }

    /// [`FaultInjector::decide`] for an op known by its kind and, for a launch, its kernel
    /// (one of a task's own ops: [`crate::op::TaskOp::inner_ops`]).
    pub fn decide_for(&self, device: u32, kind: OpKind, kernel: Option<&str>, origin: Origin) -> Option<FaultAction> {
        if self.rules.is_empty() {
            return None;
        }
        let slot = self.devices.get(device as usize)?;
        let mut state = crate::sync::lock(slot);
        let now = Instant::now();
        match state.absent {
            Some((None, code)) => return Some(FaultAction::Code(code)),
            Some((Some(until), code)) if now < until => return Some(FaultAction::Code(code)),
            Some(_) => state.absent = None,
            None => {}
        }
        if origin == Origin::Runtime {
            return None;
        }
        let DeviceState {
            rng,
            rules: states,
            absent,
        } = &mut *state;
        let mut fired = None;
        for (rule, st) in self.rules.iter().zip(states.iter_mut()) {
            let matches = rule.op.is_none_or(|k| k == kind)
                && rule.device.is_none_or(|d| d == device)
                && rule.kernel.as_deref().is_none_or(|k| kernel == Some(k));
            if !matches {
                continue;
            }
            st.count += 1;
            let hit = match rule.trigger {
                Trigger::Probability(p) => rng.random::<f64>() < p,
                Trigger::Nth(n) => st.count == n,
                Trigger::After(n) => st.count >= n,
            };
            let expired = match (rule.duration, st.first_fired) {
                (Some(d), Some(first)) => now >= first + d,
                _ => false,
            };
            if hit && !expired && fired.is_none() {
                let first = *st.first_fired.get_or_insert(now);
                fired = Some(rule.action);
                if let FaultAction::Code(code) = rule.action
                    && classify(Api::Sim, code) == ErrorClass::DeviceLost
                {
                    match (rule.duration, rule.trigger) {
                        (Some(d), _) => *absent = Some((Some(first + d), code)),
                        (None, Trigger::After(_)) => *absent = Some((None, code)),
                        _ => {}
                    }
                }
            }
        }
        fired
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(f: impl FnOnce(&mut FaultSpec)) -> FaultSpec {
        let mut s = FaultSpec {
            op: "any".into(),
            nth: Some(1),
            code: Some(2),
            ..Default::default()
        };
        f(&mut s);
        s
    }

    fn err_key(s: FaultSpec, crash_allowed: bool) -> String {
        s.compile(0, 4, crash_allowed).unwrap_err().key().unwrap().to_string()
    }

    #[test]
    fn bad_entries_name_their_key() {
        assert_eq!(err_key(spec(|s| s.probability = Some(0.5)), false), "sim.faults[0].nth");
        assert_eq!(err_key(spec(|s| s.after = Some(2)), false), "sim.faults[0].after");
        assert_eq!(err_key(spec(|s| s.nth = None), false), "sim.faults[0].probability");
        assert_eq!(err_key(spec(|s| s.hang_ms = Some(5)), false), "sim.faults[0].hang_ms");
        assert_eq!(err_key(spec(|s| s.code = None), false), "sim.faults[0].code");
        assert_eq!(
            err_key(
                spec(|s| {
                    s.code = None;
                    s.crash = Some(true)
                }),
                false
            ),
            "sim.faults[0].crash"
        );
        assert!(
            spec(|s| {
                s.code = None;
                s.crash = Some(true)
            })
            .compile(0, 4, true)
            .is_ok()
        );
        assert_eq!(err_key(spec(|s| s.op = "lunch".into()), false), "sim.faults[0].op");
        assert_eq!(err_key(spec(|s| s.device = Some(4)), false), "sim.faults[0].device");
        assert_eq!(
            err_key(
                spec(|s| {
                    s.nth = None;
                    s.probability = Some(1.5)
                }),
                false
            ),
            "sim.faults[0].probability"
        );
        assert_eq!(err_key(spec(|s| s.nth = Some(0)), false), "sim.faults[0].nth");
        assert_eq!(
            err_key(
                spec(|s| {
                    s.op = "alloc".into();
                    s.kernel = Some("saxpy".into())
                }),
                false
            ),
            "sim.faults[0].kernel"
        );
        assert_eq!(err_key(spec(|s| s.code = Some(0)), false), "sim.faults[0].code");
    }

    fn launch(kernel: &str) -> Op {
        Op::Launch {
            module: crate::op::ModuleHandle { device: 0, id: 1 },
            function: kernel.into(),
            grid: crate::op::Dim3::x(1),
            block: crate::op::Dim3::x(1),
            shared_mem_bytes: 0,
            args: vec![],
        }
    }

    #[test]
    fn nth_fires_once_per_device_and_filters_apply() {
        let rule = spec(|s| {
            s.op = "launch".into();
            s.kernel = Some("saxpy".into());
            s.nth = Some(2)
        })
        .compile(0, 2, false)
        .unwrap();
        let inj = FaultInjector::new(vec![rule], 2, 1);
        let app = Origin::Application;
        assert_eq!(inj.decide(0, &launch("saxpy"), app), None);
        assert_eq!(inj.decide(0, &launch("fill"), app), None);
        assert_eq!(inj.decide(0, &Op::Synchronize, app), None);
        assert_eq!(
            inj.decide(0, &launch("saxpy"), Origin::Runtime),
            None,
            "runtime ops are not counted"
        );
        assert_eq!(inj.decide(0, &launch("saxpy"), app), Some(FaultAction::Code(2)));
        assert_eq!(inj.decide(0, &launch("saxpy"), app), None);
        assert_eq!(inj.decide(1, &launch("saxpy"), app), None);
        assert_eq!(inj.decide(1, &launch("saxpy"), app), Some(FaultAction::Code(2)));
    }

    #[test]
    fn probability_streams_are_deterministic_per_seed_and_device() {
        let rule = spec(|s| {
            s.nth = None;
            s.probability = Some(0.3)
        })
        .compile(0, 2, false)
        .unwrap();
        let draw = |seed, dev| {
            let inj = FaultInjector::new(vec![rule.clone()], 2, seed);
            (0..200)
                .map(|_| inj.decide(dev, &Op::MemInfo, Origin::Application).is_some())
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(5, 0), draw(5, 0));
        assert_ne!(draw(5, 0), draw(5, 1));
        assert_ne!(draw(5, 0), draw(6, 0));
        let hits = draw(5, 0).iter().filter(|h| **h).count();
        assert!((30..=90).contains(&hits), "{hits} hits of 200 at p = 0.3");
    }

    #[test]
    fn a_lost_device_is_lost_for_runtime_ops_too_until_it_returns() {
        let rule = spec(|s| {
            s.nth = None;
            s.after = Some(2);
            s.code = Some(100);
            s.duration_ms = Some(60_000)
        })
        .compile(0, 1, false)
        .unwrap();
        let inj = FaultInjector::new(vec![rule], 1, 1);
        assert_eq!(inj.decide(0, &Op::MemInfo, Origin::Runtime), None, "not gone yet");
        assert_eq!(inj.decide(0, &Op::MemInfo, Origin::Application), None);
        assert_eq!(
            inj.decide(0, &Op::MemInfo, Origin::Application),
            Some(FaultAction::Code(100))
        );
        assert_eq!(
            inj.decide(0, &Op::MemInfo, Origin::Runtime),
            Some(FaultAction::Code(100)),
            "probes see it gone"
        );
    }

    #[test]
    fn after_with_duration_stops_applying() {
        let rule = spec(|s| {
            s.nth = None;
            s.after = Some(1);
            s.code = Some(100);
            s.duration_ms = Some(0)
        })
        .compile(0, 1, false)
        .unwrap();
        let inj = FaultInjector::new(vec![rule], 1, 1);
        assert_eq!(
            inj.decide(0, &Op::MemInfo, Origin::Application),
            Some(FaultAction::Code(100))
        );
        // duration 0: expired as soon as it has fired.
        assert_eq!(inj.decide(0, &Op::MemInfo, Origin::Application), None);
    }
}
