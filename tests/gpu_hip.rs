//! GPU conformance tests of the HIP backend: what the simulator models and the runtime
//! relies on, checked against a real AMD GPU. Every test is `#[ignore = "needs a GPU"]`;
//! `scripts/gpu-check --backend hip` runs them (`--ignored --test-threads=1`). Without a GPU
//! they compile (CI builds them with `--features hip`) and are skipped.
//!
//! The test names are those of `tests/gpu_cuda.rs`, so the two backends' results line up.
//!
//! A test that faults the GPU runs its faulting part in a child process of its own (this
//! test binary again, `--exact <test> --ignored`, with `HV_GPU_CHILD` naming the test): HIP
//! keeps one error state per process, and ROCm may abort a process whose kernel made a memory
//! access fault. The child prints `RESULT {json}` lines as it goes (each one holds everything
//! so far, so the last line survives an abort); the parent prints the child's exit and its
//! last `RESULT`, and accepts either outcome ROCm documents, each checked: the process was
//! aborted (SIGABRT) by ROCm's memory-fault handler ("Memory access fault by GPU" on its
//! stderr) after the faulting launch returned — what the simulator's `hip` flavour does — or
//! it survived and the calls after the fault answer a sticky code (then the test says loudly
//! that the `hip` flavour does not match this GPU). Never a panic, a hang, or another abort.
#![cfg(feature = "hip")]

mod gpu;
use gpu::*;

use std::time::{Duration, Instant};

use hipvisor_core::backend::hip::{self, HipBackend};
use hipvisor_core::backend::{Backend, DeviceContext};
use hipvisor_core::ipc;
use hipvisor_core::kernels::u32s;
use hipvisor_core::op::{KernelArg, ModuleSource, Op, Reply};
use hipvisor_core::{ErrorClass, GpuError};

fn open() -> Box<dyn DeviceContext> {
    HipBackend::new().open(0, 1).expect("open HIP device 0")
}

/// The built-in kernels as a user module's image (the runtime then knows no signatures):
/// the build's bundle where it has code for this GPU, else hiprtc's code object.
fn builtin_as_user_image(ctx: &mut dyn DeviceContext) -> Vec<u8> {
    let arch = info(ctx).arch;
    if hip::builtin_archs()
        .iter()
        .any(|a| hip::base_arch(a) == hip::base_arch(&arch))
    {
        hip::BUILTIN_CODE_OBJECT.to_vec()
    } else {
        hip::compile_builtin(&arch)
            .expect("hiprtc compiles the built-in kernels")
            .bytes()
    }
}

/// Whether ROCm's memory-fault handler reported the fault (before aborting).
fn rocm_reported_fault(child: &Child) -> bool {
    child.stderr.contains("Memory access fault")
}

/// [`gpu::in_child`], for HIP: a child either finishes or is aborted by ROCm; never a panic.
fn in_hip_child(test: &str, limit: Duration) -> Child {
    let child = gpu::in_child(test, limit);
    if rocm_reported_fault(&child) {
        println!("{test}: ROCm reported the memory access fault on stderr");
    }
    assert!(
        child.status.success() || child.aborted(),
        "{test}: the child neither finished nor was aborted by ROCm: {}\nstderr:\n{}",
        ipc::describe_exit(child.status),
        child.stderr
    );
    child
}

/// Checks how a child that ran [`fault`] ended, against the simulator's `hip` flavour, and
/// returns whether it was aborted. Aborted: by ROCm's memory-fault handler (its line is on
/// the child's stderr), after the faulting launch returned (recorded before the abort), as
/// the flavour has it. Not aborted: the flavour does not match this GPU, which the test says
/// loudly; the caller then checks that the calls after the fault answer a sticky code.
fn fault_outcome(test: &str, child: &Child) -> bool {
    if child.aborted() {
        assert!(
            child.stderr.contains("Memory access fault by GPU"),
            "{test}: the child was aborted, but not by ROCm's memory-fault handler (no \"Memory access fault by \
             GPU\" line on its stderr):\n{}",
            child.stderr
        );
        assert_eq!(
            child.result["fault_launch"], "ok",
            "{test}: the faulting launch returns before the abort (as in the simulator's hip flavour): {}",
            child.result
        );
        println!("{test}: the launch returned, then ROCm aborted the process: as the simulator's hip flavour");
        return true;
    }
    let warning = format!(
        "{test}: THIS GPU DID NOT ABORT THE PROCESS ON A MEMORY ACCESS FAULT: the simulator's `hip` flavour \
         (which aborts) does not match it; calls answered {}",
        child.result
    );
    println!("\n!!!!!!!! {warning}\n");
    eprintln!("\n!!!!!!!! {warning}\n");
    false
}

/// Launches `fault_illegal_address` and synchronizes: the sticky fault, surfaced (or the
/// process aborted by ROCm's fault handler).
fn fault(ctx: &mut dyn DeviceContext, record: &mut Record) -> Result<Reply, GpuError> {
    let m = builtin(ctx);
    let launched = run(ctx, launch(m, "fault_illegal_address", 1, 0, vec![]));
    record.set("fault_launch", class(&launched));
    let sync = run(ctx, Op::Synchronize);
    record.set("fault_synchronize", class(&sync));
    sync
}

#[test]
#[ignore = "needs a GPU"]
fn devices_are_found_ordered_and_described() {
    let b = HipBackend::new();
    let n = b.device_count().unwrap();
    assert!(n >= 1);
    let infos: Vec<_> = (0..n).map(|d| b.device_info(d).unwrap()).collect();
    for i in &infos {
        println!(
            "device {} (HIP ordinal {}): {} {} {} MiB pci {:?} uuid {:?}",
            i.index,
            b.ordinal(i.index).unwrap(),
            i.name,
            i.arch,
            i.total_memory >> 20,
            i.pci_bus_id,
            i.uuid
        );
        assert!(i.arch.starts_with("gfx"), "gcnArchName read: {}", i.arch);
        assert!(
            i.pci_bus_id.as_deref().is_some_and(|p| p.contains(':')),
            "{:?}",
            i.pci_bus_id
        );
        if let Some(u) = &i.uuid {
            assert!(u.starts_with("GPU-"), "{u}");
        }
    }
    let buses: Vec<_> = infos.iter().map(|i| i.pci_bus_id.clone()).collect();
    let mut sorted = buses.clone();
    sorted.sort();
    assert_eq!(buses, sorted, "devices are ordered by PCI bus id");
    println!(
        "HIP runtime {:?}; built-in kernels built for {}",
        hip::runtime_version(),
        hip::builtin_archs().join(", ")
    );
}

#[test]
#[ignore = "needs a GPU"]
fn builtin_kernels_match_cpu_references() {
    let mut ctx = open();
    let ctx = ctx.as_mut();
    let arch = info(ctx).arch;
    let in_bundle = hip::builtin_archs()
        .iter()
        .any(|a| hip::base_arch(a) == hip::base_arch(&arch));
    println!(
        "{arch}: the build's bundle {} code for it",
        if in_bundle { "has" } else { "has no" }
    );
    // The built-in module and, where hiprtc is installed, the hiprtc-compiled code object
    // (the fallback) loaded as a user module: both must compute the references.
    let mut modules = vec![("built-in", builtin(ctx))];
    match hip::compile_builtin(&arch) {
        Ok(code) => {
            let m = load(ctx, ModuleSource::Image(code.bytes().into())).expect("hiprtc's code object loads");
            modules.push(("hiprtc", m));
        }
        Err(e) => {
            assert!(in_bundle, "the fallback is the only way to the kernels here: {e}");
            println!("hiprtc fallback not checked: {e}");
        }
    }
    for (what, m) in modules {
        check_builtin_kernels(ctx, what, m);
        check_durable_buffers_and_tasks(ctx, m);
    }
}

#[test]
#[ignore = "needs a GPU"]
fn oom_is_not_sticky_and_device_usable_after() {
    let mut ctx = open();
    let ctx = ctx.as_mut();
    let mem = match run(ctx, Op::MemInfo).unwrap() {
        Reply::MemInfo(m) => m,
        r => panic!("{r:?}"),
    };
    // Above free memory, within total: HIP's out-of-memory.
    let too_much = (mem.free + (mem.total - mem.free) / 2 + (1 << 20)).min(mem.total);
    let r = run(ctx, Op::Alloc { bytes: too_much });
    println!("alloc of {too_much} bytes with {} free: {}", mem.free, class(&r));
    match r {
        Err(e) => assert_eq!(e.class(), ErrorClass::Transient, "out-of-memory is transient: {e}"),
        // HIP may grant more than hipMemGetInfo calls free (it does not reserve): record it.
        Ok(Reply::Buffer(b)) => {
            println!("HIP granted it: free memory was under-reported");
            run(ctx, Op::Free { buffer: b }).unwrap();
        }
        Ok(r) => panic!("{r:?}"),
    }
    // Above total: the runtime's own check, never HIP.
    let r = run(ctx, Op::Alloc { bytes: mem.total + 1 });
    assert_eq!(r.unwrap_err().class(), ErrorClass::InvalidRequest);
    let b = alloc(ctx, 1 << 20);
    let m = builtin(ctx);
    run(ctx, fill(m, b, 7, 1 << 18, 0)).unwrap();
    assert!(u32s(&download(ctx, b, 1 << 20)).iter().all(|v| *v == 7));
    run(ctx, Op::Synchronize).unwrap();
}

#[test]
#[ignore = "needs a GPU"]
fn shared_memory_limit() {
    let mut ctx = open();
    let ctx = ctx.as_mut();
    let m = builtin(ctx);
    let b = alloc(ctx, 4096);
    // Far above any AMD GPU's limit: the backend's check names the limit.
    let r = run(ctx, fill(m, b, 1, 1024, 1 << 20));
    println!("fill with 1 MiB of dynamic shared memory: {}", class(&r));
    let e = r.unwrap_err();
    assert_eq!(e.class(), ErrorClass::InvalidRequest, "{e}");
    let text = e.to_string();
    assert!(text.contains("shared memory"), "{text}");
    let limit: u32 = text
        .split("the device has ")
        .nth(1)
        .and_then(|t| t.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("the error names the limit: {text}"));
    println!("shared memory per block: {limit} bytes");
    assert!(limit >= 32 << 10, "{limit}");
    for bytes in [0, 16 << 10, limit] {
        let r = run(ctx, fill(m, b, bytes + 1, 1024, bytes));
        println!("fill with {bytes} bytes of dynamic shared memory: {}", class(&r));
        r.unwrap();
        assert!(u32s(&download(ctx, b, 4096)).iter().all(|v| *v == bytes + 1));
    }
    let r = run(ctx, fill(m, b, 1, 1024, limit + 1));
    println!("fill with {} bytes: {}", limit + 1, class(&r));
    let e = r.unwrap_err();
    assert_eq!(e.class(), ErrorClass::InvalidRequest, "{e}");
    run(ctx, Op::Synchronize).expect("not sticky");
}

#[test]
#[ignore = "needs a GPU"]
fn large_round_trip_with_odd_tail() {
    let mut ctx = open();
    check_large_round_trip(ctx.as_mut());
}

#[test]
#[ignore = "needs a GPU"]
fn host_memory_registration() {
    let mut ctx = open();
    check_host_memory_registration(ctx.as_mut(), "hipHostRegister");
}

#[test]
#[ignore = "needs a GPU"]
fn bad_module_images_are_invalid_requests() {
    let mut ctx = open();
    let ctx = ctx.as_mut();
    let bundle = hip::BUILTIN_CODE_OBJECT;
    let mut forged = bundle.to_vec();
    forged[40..48].copy_from_slice(&u64::MAX.to_le_bytes()); // entry 0's size
    let code = builtin_as_user_image(ctx);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty", vec![]),
        ("garbage", b"\x01\x02\x03 not a module".to_vec()),
        ("text without a NUL", b"hello".to_vec()),
        ("PTX (CUDA's, not HIP's)", b".version 8.0\n.target sm_90\n".to_vec()),
        ("bundle header only", bundle[..40].to_vec()),
        ("bundle cut in half", bundle[..bundle.len() / 2].to_vec()),
        ("bundle entry claiming 2^64 bytes", forged),
        ("code object cut in half", code[..code.len() / 2].to_vec()),
        (
            "compressed bundle stating more than given",
            b"CCOB\x02\x00\x01\x00\xff\xff\xff\x00".to_vec(),
        ),
    ];
    for (what, bytes) in cases {
        let r = load(ctx, ModuleSource::Image(bytes.into()));
        println!(
            "{what}: {}",
            r.as_ref()
                .map_or_else(|e| format!("{} ({e})", e.class()), |_| "ok".into())
        );
        assert_eq!(r.unwrap_err().class(), ErrorClass::InvalidRequest, "{what}");
    }
    // The whole image loads, and the device works after the bad ones.
    let m = load(ctx, ModuleSource::Image(code.into())).expect("the whole image loads");
    let b = alloc(ctx, 4096);
    run(ctx, fill(m, b, 3, 1024, 0)).unwrap();
    assert!(u32s(&download(ctx, b, 4096)).iter().all(|v| *v == 3));
}

#[test]
#[ignore = "needs a GPU"]
fn too_few_kernel_arguments() {
    const TEST: &str = "too_few_kernel_arguments";
    if is_child(TEST) {
        let mut record = Record::new();
        let mut owned = open();
        let ctx = owned.as_mut();
        // The built-in kernels as a user module: the runtime does not know its signatures,
        // and HIP cannot check a launch's argument count.
        let image = builtin_as_user_image(ctx);
        let m = load(ctx, ModuleSource::Image(image.into())).unwrap();
        let b = alloc(ctx, 4096);
        let mark = Op::Memset {
            buffer: b,
            offset: 0,
            len: 4096,
            value: 0xAB,
        };
        run(ctx, mark).unwrap();
        let r = run(ctx, launch(m, "fill", 1024, 0, vec![KernelArg::Buffer(b)]));
        record.set("launch_1_of_3", class(&r));
        let r = run(ctx, Op::Synchronize);
        record.set("synchronize", class(&r));
        let after = download(ctx, b, 4096);
        record.set("buffer_unchanged", after.iter().all(|v| *v == 0xAB));
        let r = run(ctx, fill(m, b, 5, 1024, 0));
        record.set("launch_3_of_3", class(&r));
        record.set("filled_after", u32s(&download(ctx, b, 4096)).iter().all(|v| *v == 5));
        return;
    }
    let child = in_hip_child(TEST, Duration::from_secs(60));
    assert!(child.status.success(), "too few arguments crash nothing");
    let r = &child.result;
    // The backend pads the argument array with zeros: `fill(out, 0, 0)` writes nothing.
    assert_eq!(r["launch_1_of_3"], "ok", "{r}");
    assert_eq!(r["synchronize"], "ok", "{r}");
    assert_eq!(r["buffer_unchanged"], true, "{r}");
    assert_eq!(r["launch_3_of_3"], "ok", "{r}");
    assert_eq!(r["filled_after"], true, "{r}");
}

#[test]
#[ignore = "needs a GPU"]
fn sticky_fault_surfaces_on_calls() {
    const TEST: &str = "sticky_fault_surfaces_on_calls";
    if is_child(TEST) {
        let mut record = Record::new();
        let mut owned = open();
        let ctx = owned.as_mut();
        let m = builtin(ctx);
        let b = alloc(ctx, 4096);
        let _ = fault(ctx, &mut record);
        let r = run(ctx, Op::MemInfo);
        record.set("mem_info", class(&r));
        let r = run(ctx, Op::Alloc { bytes: 4096 });
        record.set("alloc", class(&r));
        let memset = Op::Memset {
            buffer: b,
            offset: 0,
            len: 16,
            value: 1,
        };
        let r = run(ctx, memset);
        record.set("memset", class(&r));
        let copy = Op::CopyToDevice {
            dst: b,
            offset: 0,
            data: vec![1u8; 16].into(),
        };
        let r = run(ctx, copy);
        record.set("copy_to_device", class(&r));
        let copy = Op::CopyFromDevice {
            src: b,
            offset: 0,
            len: 16,
        };
        let r = run(ctx, copy);
        record.set("copy_from_device", class(&r));
        let r = run(ctx, fill(m, b, 1, 1024, 0));
        record.set("launch", class(&r));
        let r = run(ctx, Op::Synchronize);
        record.set("synchronize_again", class(&r));
        let r = run(
            ctx,
            Op::LoadModule {
                source: ModuleSource::Builtin,
            },
        );
        record.set("load_module", class(&r));
        let r = run(ctx, Op::Free { buffer: b });
        record.set("free", class(&r));
        record.set("poisoned", hip::poisoned());
        std::mem::forget(owned); // the drop is the next test's subject
        return;
    }
    let child = in_hip_child(TEST, Duration::from_secs(60));
    let calls = child.result.as_object().cloned().unwrap_or_default();
    if fault_outcome(TEST, &child) {
        // ROCm's documented answer to a GPU memory fault: the process ends. How far it got:
        println!("ROCm aborted the process after: {:?}", calls.keys().collect::<Vec<_>>());
        return;
    }
    assert_eq!(
        calls["fault_launch"], "ok",
        "the faulting launch itself is asynchronous"
    );
    // The process survived: every call after the fault answers the sticky code, as the
    // simulator's `cuda` flavour (and the H200) has it; the runtime relies on it.
    let after = [
        "fault_synchronize",
        "mem_info",
        "alloc",
        "memset",
        "copy_to_device",
        "copy_from_device",
        "launch",
        "synchronize_again",
        "load_module",
        "free",
    ];
    for call in after {
        let outcome = calls.get(call).and_then(|o| o.as_str()).unwrap_or("not recorded");
        println!("after the fault, {call}: {outcome}");
        assert!(
            outcome.starts_with("sticky"),
            "{call} after the fault answers a sticky code: {outcome}"
        );
    }
    assert!(!calls["poisoned"].is_null(), "the process knows it is poisoned");
}

#[test]
#[ignore = "needs a GPU"]
fn drop_after_fault_neither_panics_nor_hangs() {
    const TEST: &str = "drop_after_fault_neither_panics_nor_hangs";
    if is_child(TEST) {
        let mut record = Record::new();
        let mut ctx = open();
        let _b = alloc(ctx.as_mut(), 1 << 20);
        let _ = fault(ctx.as_mut(), &mut record);
        let t = Instant::now();
        drop(ctx);
        record.set("drop_ms", t.elapsed().as_millis() as u64);
        return;
    }
    let child = in_hip_child(TEST, Duration::from_secs(30));
    if fault_outcome(TEST, &child) {
        println!(
            "ROCm aborted the process before the drop finished (reached: {})",
            child.result
        );
        return;
    }
    assert!(
        child.result["fault_synchronize"]
            .as_str()
            .unwrap()
            .starts_with("sticky"),
        "{}",
        child.result
    );
    assert!(child.result["drop_ms"].is_u64(), "the drop returned: {}", child.result);
}

#[test]
#[ignore = "needs a GPU"]
fn reopen_after_fault_is_refused() {
    const TEST: &str = "reopen_after_fault_is_refused";
    if is_child(TEST) {
        let mut record = Record::new();
        let mut ctx = open();
        let _ = fault(ctx.as_mut(), &mut record);
        drop(ctx);
        let t = Instant::now();
        let again = HipBackend::new().open(0, 2);
        let outcome = match &again {
            Ok(_) => "opened".to_string(),
            Err(e) => format!("{} {}", e.class(), e.code().map_or(0, |(_, c)| c)),
        };
        record.set("reopen", outcome);
        record.set("reopen_ms", t.elapsed().as_millis() as u64);
        record.set("poisoned", hip::poisoned());
        std::mem::forget(again);
        return;
    }
    let child = in_hip_child(TEST, Duration::from_secs(30));
    if fault_outcome(TEST, &child) {
        println!("ROCm aborted the process before the reopen (reached: {})", child.result);
        return;
    }
    assert!(
        child.result["fault_synchronize"]
            .as_str()
            .unwrap_or_default()
            .starts_with("sticky"),
        "{}",
        child.result
    );
    let reopen = child.result["reopen"].as_str().unwrap_or_default();
    assert!(reopen.starts_with("sticky"), "{}", child.result);
}
