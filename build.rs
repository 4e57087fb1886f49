//! Build script of hipvisor-core: with the `hip` feature, compiles the built-in kernels
//! (`kernels/builtin.cu`) into a HIP code-object bundle with `hipcc`.
//!
//! - `HIPCC`: the compiler (default: `hipcc` on the PATH, else `$HIP_PATH/bin/hipcc`,
//!   else `/opt/rocm/bin/hipcc`).
//! - `HIP_OFFLOAD_ARCHS`: `;`- or `,`-separated GPU architectures (default
//!   `gfx908;gfx90a;gfx1030`, the data-centre and workstation parts whose device libraries
//!   Debian's ROCm 5.2 ships; newer ROCm adds gfx942, gfx1100, ...).
//!
//! These variables are not `HIPVISOR_*`: that prefix is the runtime's configuration.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_HIP").is_some() {
        compile_hip_kernels();
    }
}

fn hipcc() -> PathBuf {
    if let Some(p) = std::env::var_os("HIPCC") {
        return p.into();
    }
    let on_path = Command::new("hipcc")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if on_path {
        return "hipcc".into();
    }
    for root in [
        std::env::var_os("HIP_PATH").map(PathBuf::from),
        Some("/opt/rocm".into()),
    ]
    .into_iter()
    .flatten()
    {
        let p = root.join("bin/hipcc");
        if p.exists() {
            return p;
        }
    }
    panic!(
        "the `hip` feature compiles hipvisor's built-in kernels with hipcc, which was not found: \
         install it (Debian/Ubuntu: `apt-get install --no-install-recommends hipcc`) or set HIPCC"
    );
}

fn compile_hip_kernels() {
    println!("cargo:rerun-if-changed=kernels/builtin.cu");
    println!("cargo:rerun-if-env-changed=HIPCC");
    println!("cargo:rerun-if-env-changed=HIP_PATH");
    println!("cargo:rerun-if-env-changed=HIP_OFFLOAD_ARCHS");
    let archs = std::env::var("HIP_OFFLOAD_ARCHS").unwrap_or_else(|_| "gfx908;gfx90a;gfx1030".into());
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR")).join("builtin_hip.co");
    let mut cmd = Command::new(hipcc());
    cmd.args(["--genco", "-O3", "-x", "hip"]);
    for arch in archs.split([';', ',']).map(str::trim).filter(|a| !a.is_empty()) {
        cmd.arg(format!("--offload-arch={arch}"));
    }
    cmd.arg("kernels/builtin.cu").arg("-o").arg(&out);
    let result = cmd.output().unwrap_or_else(|e| panic!("could not run {cmd:?}: {e}"));
    if !result.status.success() {
        panic!(
            "hipcc failed to compile kernels/builtin.cu for {archs}:\n{}{}",
            String::from_utf8_lossy(&result.stdout),
            String::from_utf8_lossy(&result.stderr)
        );
    }
}
