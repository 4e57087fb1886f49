//! Build script of hipvisor-core: with the `hip` feature, compiles the built-in kernels
//! (`kernels/builtin.cu`) into a HIP code-object bundle with `hipcc`.
//!
//! - `HIPCC`: the compiler (default: `hipcc` on the PATH, else `$HIP_PATH/bin/hipcc`,
//!   else `/opt/rocm/bin/hipcc`).
//! - `HIP_OFFLOAD_ARCHS`: `;`- or `,`-separated GPU architectures to compile for, exactly
//!   (hipcc's error is the build's error if it refuses one). Unset, the build compiles for
//!   every architecture of [`DEFAULT_ARCHS`] that the installed hipcc accepts: each is probed
//!   once with a one-line kernel (in parallel), and the ones it refuses are left out. Debian's
//!   ROCm 5.2 (hipcc 5.2.3 on clang 15) accepts gfx900, gfx906, gfx908, gfx90a, gfx940,
//!   gfx1010, gfx1011, gfx1012, gfx1030, gfx1031 and gfx1032 (probed); it refuses gfx941,
//!   gfx942, gfx950, gfx1150, gfx1151, gfx1200 and gfx1201 (unknown target ids) and
//!   gfx1100–gfx1102 (no device library). ROCm 6 adds gfx942 and gfx11xx, ROCm 6.3+ gfx950
//!   and gfx12xx.
//!
//! The list compiled goes to `$OUT_DIR/builtin_hip_archs.txt`, one architecture a line; the
//! HIP backend reads it to decide whether the bundle has code for a device, and compiles the
//! kernels at run time with hiprtc for a device whose architecture it lacks.
//!
//! These variables are not `HIPVISOR_*`: that prefix is the runtime's configuration.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The architectures tried when `HIP_OFFLOAD_ARCHS` is unset: AMD's data-centre GPUs (MI50/60
/// gfx906, MI100 gfx908, MI200 gfx90a, MI300 gfx940–gfx942, MI350 gfx950), Vega gfx900, and
/// the RDNA workstation and consumer parts ROCm supports (gfx101x, gfx103x, gfx110x, gfx115x,
/// gfx120x).
const DEFAULT_ARCHS: &[&str] = &[
    "gfx900", "gfx906", "gfx908", "gfx90a", "gfx940", "gfx941", "gfx942", "gfx950", "gfx1010", "gfx1011", "gfx1012",
    "gfx1030", "gfx1031", "gfx1032", "gfx1100", "gfx1101", "gfx1102", "gfx1150", "gfx1151", "gfx1200", "gfx1201",
];

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

/// The architectures of a `;`/`,`-separated list, trimmed, without empty entries.
fn split_archs(list: &str) -> Vec<String> {
    list.split([';', ','])
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .map(String::from)
        .collect()
}

/// Whether `hipcc` compiles a one-line kernel for `arch`; `Err` holds its complaint.
fn probe(hipcc: &Path, dir: &Path, arch: &str) -> Result<(), String> {
    let src = dir.join("probe.hip");
    let out = dir.join(format!("probe-{}.co", arch.replace(':', "_")));
    let result = Command::new(hipcc)
        .args(["--genco", "-x", "hip"])
        .arg(format!("--offload-arch={arch}"))
        .arg(&src)
        .arg("-o")
        .arg(&out)
        .output()
        .map_err(|e| format!("could not run {}: {e}", hipcc.display()))?;
    let _ = std::fs::remove_file(&out);
    if result.status.success() {
        Ok(())
    } else {
        let text = String::from_utf8_lossy(&result.stderr);
        Err(text
            .lines()
            .find(|l| l.contains("error"))
            .unwrap_or(&text)
            .trim()
            .to_string())
    }
}

/// The architectures of [`DEFAULT_ARCHS`] the installed hipcc accepts, probed in parallel.
fn supported_archs(hipcc: &Path, out_dir: &Path) -> Vec<String> {
    let dir = out_dir.join("arch-probe");
    std::fs::create_dir_all(&dir).expect("create the probe directory");
    std::fs::write(
        dir.join("probe.hip"),
        "#include <hip/hip_runtime.h>\nextern \"C\" __global__ void probe(unsigned* p) { *p = 1u; }\n",
    )
    .expect("write the probe kernel");
    let results: Vec<(String, Result<(), String>)> = std::thread::scope(|s| {
        let probes: Vec<_> = DEFAULT_ARCHS
            .iter()
            .map(|arch| {
                let dir = &dir;
                (arch, s.spawn(move || probe(hipcc, dir, arch)))
            })
            .collect();
        probes
            .into_iter()
            .map(|(arch, h)| {
                (
                    arch.to_string(),
                    h.join().unwrap_or_else(|_| Err("probe panicked".into())),
                )
            })
            .collect()
    });
    let accepted: Vec<String> = results
        .iter()
        .filter(|(_, r)| r.is_ok())
        .map(|(a, _)| a.clone())
        .collect();
    if accepted.is_empty() {
        let why: Vec<String> = results
            .iter()
            .map(|(a, r)| format!("  {a}: {}", r.clone().unwrap_err()))
            .collect();
        panic!(
            "{} accepts none of hipvisor's GPU architectures; set HIP_OFFLOAD_ARCHS to the ones it \
             supports:\n{}",
            hipcc.display(),
            why.join("\n")
        );
    }
    accepted
}

fn compile_hip_kernels() {
    println!("cargo:rerun-if-changed=kernels/builtin.cu");
    println!("cargo:rerun-if-env-changed=HIPCC");
    println!("cargo:rerun-if-env-changed=HIP_PATH");
    println!("cargo:rerun-if-env-changed=HIP_OFFLOAD_ARCHS");
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let hipcc = hipcc();
    let archs = match std::env::var("HIP_OFFLOAD_ARCHS") {
        Ok(list) if !split_archs(&list).is_empty() => split_archs(&list),
        _ => supported_archs(&hipcc, &out_dir),
    };
    let out = out_dir.join("builtin_hip.co");
    let mut cmd = Command::new(&hipcc);
    cmd.args(["--genco", "-O3", "-x", "hip"]);
    for arch in &archs {
        cmd.arg(format!("--offload-arch={arch}"));
    }
    cmd.arg("kernels/builtin.cu").arg("-o").arg(&out);
    let result = cmd.output().unwrap_or_else(|e| panic!("could not run {cmd:?}: {e}"));
    if !result.status.success() {
        panic!(
            "hipcc failed to compile kernels/builtin.cu for {}:\n{}{}",
            archs.join(";"),
            String::from_utf8_lossy(&result.stdout),
            String::from_utf8_lossy(&result.stderr)
        );
    }
    let mut list = archs.join("\n");
    list.push('\n');
    std::fs::write(out_dir.join("builtin_hip_archs.txt"), list).expect("write builtin_hip_archs.txt");
}
