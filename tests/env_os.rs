//! The configuration is loaded from an environment that holds variables which are not
//! UTF-8: other programs' variables are ignored, a `HIPVISOR_*` one is an error naming it —
//! never a panic (`std::env::vars` panics on them). Checked in a child process (this binary
//! re-executed), since changing this process's environment needs `unsafe`.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::process::Command;

use hipvisor::RuntimeConfig;
use hipvisor::core::ConfigError;

const CHILD: &str = "HV_ENV_OS_CHILD";

#[test]
fn variables_that_are_not_utf8_do_not_panic_the_config_loader() {
    match std::env::var(CHILD).as_deref() {
        Ok("other") => {
            RuntimeConfig::load(None, &[]).expect("another program's variable is ignored");
            return;
        }
        Ok("ours") => {
            match RuntimeConfig::load(None, &[]) {
                Err(ConfigError::Env { var, reason }) => {
                    assert_eq!(var, "HIPVISOR_SIM__SEED");
                    assert!(reason.contains("UTF-8"), "{reason}");
                }
                other => panic!("a HIPVISOR_ variable that is not UTF-8: {other:?}"),
            }
            return;
        }
        _ => {}
    }
    let not_utf8 = OsStr::from_bytes(b"\xff\xfe");
    for (mode, var) in [("other", "SOME_OTHER_PROGRAM"), ("ours", "HIPVISOR_SIM__SEED")] {
        let status = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "variables_that_are_not_utf8_do_not_panic_the_config_loader",
                "--test-threads=1",
                "--nocapture",
            ])
            .env(CHILD, mode)
            .env(var, not_utf8)
            .status()
            .unwrap();
        assert!(status.success(), "{mode}: the child's check failed: {status}");
    }
}
