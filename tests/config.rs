//! Configuration: file, environment, overrides, precedence, and every bad-input case.

use hipvisor_core::config::{ConfigError, ConfigLoader, Isolation, RuntimeConfig};
use hipvisor_core::{BackendKind, Jitter, OpKind};
use std::path::Path;

fn env(vars: &[(&str, &str)]) -> Vec<(String, String)> {
    vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn load_toml(text: &str) -> Result<RuntimeConfig, ConfigError> {
    ConfigLoader::new().toml(text).load()
}

fn key_of(r: Result<RuntimeConfig, ConfigError>) -> String {
    match r.unwrap_err() {
        ConfigError::Invalid { key, .. } => key,
        other => panic!("expected an invalid key, got {other}"),
    }
}

#[test]
fn default_toml_documents_every_default() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/default.toml");
    let loaded = ConfigLoader::new().file(Some(&path)).load().unwrap();
    assert_eq!(loaded, RuntimeConfig::default());
    // Every key is written out with its value.
    let text = std::fs::read_to_string(&path).unwrap();
    let defaults = toml::Value::try_from(RuntimeConfig::default()).unwrap();
    for (section, table) in defaults.as_table().unwrap() {
        for (key, value) in table.as_table().unwrap() {
            if value.is_table() || value.is_array() {
                continue;
            }
            let line = format!("{key} = {value}");
            assert!(
                text.contains(&line),
                "config/default.toml lacks `{line}` in [{section}]"
            );
        }
    }
}

#[test]
fn chaos_toml_is_a_valid_plan() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/chaos.toml");
    let c = ConfigLoader::new().file(Some(&path)).load().unwrap();
    assert_eq!(c.runtime.isolation, Isolation::Process);
    assert_eq!(c.sim.faults.len(), 7);
}

#[test]
fn file_values_are_read() {
    let c = load_toml(
        r#"
        [runtime]
        backend = "sim"
        in_flight = 7
        [retry]
        max_retries = 5
        backoff_multiplier = 3
        jitter = "equal"
        [retry.per_op.launch]
        max_retries = 0
        [sim]
        devices = 2
        [[sim.faults]]
        op = "launch"
        kernel = "saxpy"
        nth = 3
        code = 700
        "#,
    )
    .unwrap();
    assert_eq!(c.runtime.in_flight, 7);
    assert_eq!(c.retry.max_retries, 5);
    assert_eq!(c.retry.backoff_multiplier, 3.0);
    assert_eq!(c.retry.jitter, Jitter::Equal);
    assert_eq!(c.retry.per_op[&OpKind::Launch].max_retries, Some(0));
    assert_eq!(c.sim.faults[0].kernel.as_deref(), Some("saxpy"));
}

#[test]
fn jitter_accepts_the_original_booleans() {
    assert_eq!(load_toml("[retry]\njitter = true").unwrap().retry.jitter, Jitter::Full);
    assert_eq!(load_toml("[retry]\njitter = false").unwrap().retry.jitter, Jitter::None);
    assert_eq!(
        load_toml("[retry]\njitter = \"decorrelated\"").unwrap().retry.jitter,
        Jitter::Decorrelated
    );
    let e = load_toml("[retry]\njitter = \"wobbly\"").unwrap_err();
    assert_eq!(e.key(), Some("retry.jitter"), "{e}");
    assert!(e.to_string().contains("wobbly"), "{e}");
}

#[test]
fn environment_overrides_the_file_and_flags_override_both() {
    let file = "[retry]\nmax_retries = 5\ninitial_delay_ms = 20\n[sim]\nseed = 1";
    let c = ConfigLoader::new()
        .toml(file)
        .env(env(&[
            ("HIPVISOR_RETRY__MAX_RETRIES", "7"),
            ("HIPVISOR_SIM__SEED", "2"),
            ("HIPVISOR_RETRY__PER_OP__ALLOC__MAX_RETRIES", "9"),
            ("HIPVISOR_RUNTIME__BACKEND", "sim"),
            ("HIPVISOR_RETRY__JITTER", "false"),
            ("PATH", "/usr/bin"),
        ]))
        .overrides(&[("sim.seed".into(), "3".into())])
        .load()
        .unwrap();
    assert_eq!(c.retry.max_retries, 7, "environment beats file");
    assert_eq!(c.retry.initial_delay_ms, 20, "file beats default");
    assert_eq!(c.sim.seed, 3, "flag beats environment");
    assert_eq!(c.retry.per_op[&OpKind::Alloc].max_retries, Some(9));
    assert_eq!(c.runtime.backend, BackendKind::Sim);
    assert_eq!(c.retry.jitter, Jitter::None);
}

#[test]
fn unknown_environment_variable_is_named() {
    let e = ConfigLoader::new()
        .env(env(&[("HIPVISOR_RETRY__MAX_RETRIEZ", "3")]))
        .load()
        .unwrap_err();
    assert!(
        matches!(&e, ConfigError::Env { var, .. } if var == "HIPVISOR_RETRY__MAX_RETRIEZ"),
        "{e}"
    );
    let e = ConfigLoader::new()
        .env(env(&[("HIPVISOR_NOPE", "3")]))
        .load()
        .unwrap_err();
    assert!(e.to_string().contains("HIPVISOR_NOPE"), "{e}");
}

#[test]
fn bad_environment_value_names_the_variable() {
    let e = ConfigLoader::new()
        .env(env(&[("HIPVISOR_RETRY__MAX_RETRIES", "many")]))
        .load()
        .unwrap_err();
    assert!(
        matches!(&e, ConfigError::Env { var, .. } if var == "HIPVISOR_RETRY__MAX_RETRIES"),
        "{e}"
    );
    let e = ConfigLoader::new()
        .env(env(&[("HIPVISOR_RETRY__BACKOFF_MULTIPLIER", "0.5")]))
        .load()
        .unwrap_err();
    assert!(
        matches!(&e, ConfigError::Env { var, .. } if var == "HIPVISOR_RETRY__BACKOFF_MULTIPLIER"),
        "{e}"
    );
}

#[test]
fn unknown_keys_are_named() {
    assert_eq!(key_of(load_toml("[retry]\nmax_retriez = 3")), "retry.max_retriez");
    let e = load_toml("[retry]\nmax_retriez = 3").unwrap_err();
    assert!(e.to_string().contains("max_retriez"), "{e}");
    let e = load_toml("[nonsense]\na = 1").unwrap_err();
    assert!(e.to_string().contains("nonsense"), "{e}");
    let e = load_toml("[retry.per_op.lunch]\nmax_retries = 1").unwrap_err();
    assert!(e.to_string().contains("lunch"), "{e}");
    let e = load_toml("[[sim.faults]]\nop = \"any\"\nnth = 1\ncode = 2\ncolour = \"red\"").unwrap_err();
    assert!(e.to_string().contains("colour"), "{e}");
}

#[test]
fn wrong_types_are_named() {
    assert_eq!(
        key_of(load_toml("[retry]\nmax_retries = \"three\"")),
        "retry.max_retries"
    );
    assert_eq!(key_of(load_toml("[runtime]\nbackend = \"opencl\"")), "runtime.backend");
    assert_eq!(key_of(load_toml("[runtime]\nisolation = 3")), "runtime.isolation");
}

#[test]
fn negative_and_out_of_range_values_are_named() {
    assert_eq!(
        key_of(load_toml("[retry]\ninitial_delay_ms = -5")),
        "retry.initial_delay_ms"
    );
    assert_eq!(
        key_of(load_toml("[retry]\nbackoff_multiplier = 0.5")),
        "retry.backoff_multiplier"
    );
    assert_eq!(
        key_of(load_toml("[retry]\nbackoff_multiplier = nan")),
        "retry.backoff_multiplier"
    );
    assert_eq!(key_of(load_toml("[retry]\nmax_delay_ms = 1")), "retry.max_delay_ms");
    assert_eq!(key_of(load_toml("[retry.budget]\nratio = -1.0")), "retry.budget.ratio");
    assert_eq!(key_of(load_toml("[runtime]\nin_flight = 0")), "runtime.in_flight");
    assert_eq!(key_of(load_toml("[runtime]\nspin_us = 1001")), "runtime.spin_us");
    assert_eq!(load_toml("[runtime]\nspin_us = 0").unwrap().runtime.spin_us, 0);
    assert_eq!(key_of(load_toml("[sim]\ndevices = 0")), "sim.devices");
    assert_eq!(
        key_of(load_toml("[breaker]\nfailure_rate = 2.0")),
        "breaker.failure_rate"
    );
    assert_eq!(
        key_of(load_toml("[telemetry]\nlisten = \"nowhere\"")),
        "telemetry.listen"
    );
    assert_eq!(
        key_of(load_toml(
            "[supervisor]\nrestart_backoff_min_ms = 10\nrestart_backoff_max_ms = 5"
        )),
        "supervisor.restart_backoff_max_ms"
    );
    assert_eq!(
        key_of(load_toml("[runtime]\ndevices = 9\n[sim]\ndevices = 4")),
        "runtime.devices"
    );
}

#[test]
fn fault_plan_errors_are_named() {
    let two_triggers = "[[sim.faults]]\nprobability = 0.1\nnth = 3\ncode = 2";
    assert_eq!(key_of(load_toml(two_triggers)), "sim.faults[0].nth");
    let two_actions = "[[sim.faults]]\nnth = 3\ncode = 2\nhang_ms = 5";
    assert_eq!(key_of(load_toml(two_actions)), "sim.faults[0].hang_ms");
    let no_trigger = "[[sim.faults]]\ncode = 2";
    assert_eq!(key_of(load_toml(no_trigger)), "sim.faults[0].probability");
    let crash_in_thread = "[runtime]\nisolation = \"thread\"\n[[sim.faults]]\nnth = 1\ncrash = true";
    let e = load_toml(crash_in_thread).unwrap_err();
    assert_eq!(e.key(), Some("sim.faults[0].crash"));
    assert!(e.to_string().contains("process"), "{e}");
    let crash_in_process = "[runtime]\nisolation = \"process\"\n[[sim.faults]]\nnth = 1\ncrash = true";
    assert!(load_toml(crash_in_process).is_ok());
    let second_bad = "[[sim.faults]]\nnth = 1\ncode = 2\n[[sim.faults]]\nop = \"teleport\"\nnth = 1\ncode = 2";
    assert_eq!(key_of(load_toml(second_bad)), "sim.faults[1].op");
}

#[test]
fn file_errors_name_the_file() {
    let e = ConfigLoader::new()
        .file(Some(Path::new("/nonexistent/hipvisor.toml")))
        .load()
        .unwrap_err();
    assert!(matches!(e, ConfigError::File { .. }), "{e}");
    assert!(e.to_string().contains("/nonexistent/hipvisor.toml"), "{e}");
    let dir = std::env::temp_dir().join(format!("hipvisor-config-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("broken.toml");
    std::fs::write(&path, "[retry\nmax_retries = 3").unwrap();
    let e = ConfigLoader::new().file(Some(&path)).load().unwrap_err();
    assert!(e.to_string().contains("broken.toml"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn effective_config_prints_as_toml_and_reads_back() {
    let c = load_toml("[retry]\nmax_retries = 9\n[[sim.faults]]\nnth = 2\ncode = 600").unwrap();
    let back = load_toml(&c.to_toml()).unwrap();
    assert_eq!(back, c);
}

#[test]
fn a_runtime_that_aborts_on_gpu_faults_needs_process_isolation_or_consent() {
    use hipvisor_core::config::SimFlavour;
    assert_eq!(RuntimeConfig::default().sim.flavour, SimFlavour::Cuda);
    assert!(!RuntimeConfig::default().runtime.allow_abort_on_gpu_fault);
    let c = load_toml("[sim]\nflavour = \"hip\"").unwrap();
    assert_eq!(
        (c.sim.flavour, c.runtime.isolation),
        (SimFlavour::Hip, Isolation::Process)
    );
    // Thread isolation with a runtime that aborts the process: an error naming the keys.
    for text in [
        "[runtime]\nisolation = \"thread\"\n[sim]\nflavour = \"hip\"",
        "[runtime]\nisolation = \"thread\"\nbackend = \"hip\"",
    ] {
        let e = load_toml(text).unwrap_err();
        assert_eq!(e.key(), Some("runtime.isolation"), "{text}: {e}");
        let msg = e.to_string();
        let culprit = if text.contains("flavour") {
            "sim.flavour"
        } else {
            "runtime.backend"
        };
        assert!(
            msg.contains(culprit) && msg.contains("runtime.allow_abort_on_gpu_fault"),
            "{text}: {msg}"
        );
        // Allowed explicitly, it loads.
        let allowed = text.replace("[runtime]\n", "[runtime]\nallow_abort_on_gpu_fault = true\n");
        assert!(load_toml(&allowed).unwrap().runtime.allow_abort_on_gpu_fault);
    }
    // The cuda flavour in thread isolation needs nothing.
    assert!(load_toml("[runtime]\nisolation = \"thread\"\n[sim]\nflavour = \"cuda\"").is_ok());
    // From the environment too, and a bad flavour is named.
    let e = ConfigLoader::new()
        .env(env(&[
            ("HIPVISOR_SIM__FLAVOUR", "hip"),
            ("HIPVISOR_RUNTIME__ISOLATION", "thread"),
        ]))
        .load()
        .unwrap_err();
    assert!(
        matches!(&e, ConfigError::Env { var, .. } if var == "HIPVISOR_RUNTIME__ISOLATION"),
        "{e}"
    );
    let ok = ConfigLoader::new()
        .env(env(&[
            ("HIPVISOR_SIM__FLAVOUR", "hip"),
            ("HIPVISOR_RUNTIME__ISOLATION", "thread"),
            ("HIPVISOR_RUNTIME__ALLOW_ABORT_ON_GPU_FAULT", "true"),
        ]))
        .load()
        .unwrap();
    assert_eq!(ok.sim.flavour, SimFlavour::Hip);
    assert_eq!(key_of(load_toml("[sim]\nflavour = \"rocm\"")), "sim.flavour");
}
