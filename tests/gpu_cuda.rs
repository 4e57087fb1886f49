//! GPU conformance tests of the CUDA backend: what the simulator models and the runtime
//! relies on, checked against a real NVIDIA GPU. Every test is `#[ignore = "needs a GPU"]`;
//! `scripts/gpu-check` runs them (`--ignored --test-threads=1`). Without a GPU they compile
//! and are skipped.
//!
//! A test that faults the GPU runs its faulting part in a child process of its own (this
//! test binary again, with `HV_GPU_CHILD` naming the test): after a fault the process's
//! contexts are poisoned, and even retaining a context again can crash a process (measured on
//! an H200). The child prints one `RESULT {json}` line; the parent checks it and prints it, so
//! the log records what the GPU did.
#![cfg(feature = "cuda")]

mod gpu;
use gpu::*;

use std::time::{Duration, Instant};

use hipvisor_core::backend::cuda::{self, CudaBackend};
use hipvisor_core::backend::{Backend, DeviceContext};
use hipvisor_core::kernels::u32s;
use hipvisor_core::op::{KernelArg, ModuleSource, Op, Reply};
use hipvisor_core::{ErrorClass, GpuError};

fn open() -> Box<dyn DeviceContext> {
    CudaBackend::new().open(0, 1).expect("open CUDA device 0")
}

/// Launches `fault_illegal_address` and synchronizes: the sticky fault, surfaced.
fn fault(ctx: &mut dyn DeviceContext) -> Result<Reply, GpuError> {
    let m = builtin(ctx);
    let launched = run(ctx, launch(m, "fault_illegal_address", 1, 0, vec![]));
    assert!(
        launched.is_ok(),
        "the faulting launch itself is asynchronous: {launched:?}"
    );
    run(ctx, Op::Synchronize)
}

#[test]
#[ignore = "needs a GPU"]
fn devices_are_found_ordered_and_described() {
    let b = CudaBackend::new();
    let n = b.device_count().unwrap();
    assert!(n >= 1);
    let infos: Vec<_> = (0..n).map(|d| b.device_info(d).unwrap()).collect();
    for i in &infos {
        println!(
            "device {}: {} {} {} MiB pci {:?} uuid {:?}",
            i.index,
            i.name,
            i.arch,
            i.total_memory >> 20,
            i.pci_bus_id,
            i.uuid
        );
        assert!(i.arch.starts_with("sm_"), "{}", i.arch);
        assert!(
            i.pci_bus_id.as_deref().is_some_and(|p| p.contains(':')),
            "{:?}",
            i.pci_bus_id
        );
        assert!(
            i.uuid
                .as_deref()
                .is_some_and(|u| u.starts_with("GPU-") && u.len() == 40),
            "{:?}",
            i.uuid
        );
    }
    let buses: Vec<_> = infos.iter().map(|i| i.pci_bus_id.clone()).collect();
    let mut sorted = buses.clone();
    sorted.sort();
    assert_eq!(buses, sorted, "devices are ordered by PCI bus id");
    println!("driver {:?}, NVRTC {:?}", cuda::driver_version(), cuda::nvrtc_version());
}

#[test]
#[ignore = "needs a GPU"]
fn builtin_kernels_match_cpu_references() {
    let mut ctx = open();
    let ctx = ctx.as_mut();
    let info = info(ctx);
    let (major, minor) = info.arch[3..].split_at(info.arch.len() - 4);
    let image = cuda::builtin_image(major.parse().unwrap(), minor.parse().unwrap()).unwrap();
    println!("built-in kernels: {} ({} bytes)", image.target, image.code.len());
    assert!(
        image.is_cubin(),
        "an NVRTC as new as the GPU compiles a cubin: {}",
        image.target
    );
    let m = builtin(ctx);
    check_builtin_kernels(ctx, "built-in", m);
    check_durable_buffers_and_tasks(ctx, m);
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
    // Above free memory, within total: the driver's out-of-memory.
    let too_much = mem.free + (mem.total - mem.free) / 2 + (1 << 20);
    let r = run(
        ctx,
        Op::Alloc {
            bytes: too_much.min(mem.total),
        },
    );
    println!(
        "alloc of {} bytes with {} free: {}",
        too_much.min(mem.total),
        mem.free,
        class(&r)
    );
    assert_eq!(
        r.unwrap_err().class(),
        ErrorClass::Transient,
        "out-of-memory is transient"
    );
    // Above total: the runtime's own check, never the driver.
    let r = run(ctx, Op::Alloc { bytes: mem.total + 1 });
    assert_eq!(r.unwrap_err().class(), ErrorClass::InvalidRequest);
    let b = alloc(ctx, 1 << 20);
    let m = builtin(ctx);
    run(
        ctx,
        launch(
            m,
            "fill",
            1 << 18,
            0,
            vec![KernelArg::Buffer(b), KernelArg::U32(7), KernelArg::U32(1 << 18)],
        ),
    )
    .unwrap();
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
    let fill = |shared| {
        launch(
            m,
            "fill",
            1024,
            shared,
            vec![KernelArg::Buffer(b), KernelArg::U32(1), KernelArg::U32(1024)],
        )
    };
    // The device's opt-in limit, from the answer to a launch far above any GPU's.
    let e = run(ctx, fill(16 << 20)).unwrap_err();
    assert_eq!(e.class(), ErrorClass::InvalidRequest, "{e}");
    let limit: u32 = e
        .to_string()
        .split("allows at most ")
        .nth(1)
        .and_then(|t| t.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("the error names the limit: {e}"));
    println!("opt-in shared memory limit: {limit} bytes");
    for bytes in [0, 48 << 10, (48 << 10) + 1, limit] {
        let r = run(ctx, fill(bytes));
        println!("fill with {bytes} bytes of dynamic shared memory: {}", class(&r));
        r.unwrap();
    }
    let r = run(ctx, fill(limit + 1));
    println!("fill with {} bytes: {}", limit + 1, class(&r));
    let e = r.unwrap_err();
    assert_eq!(e.class(), ErrorClass::InvalidRequest, "{e}");
    assert!(e.to_string().contains("shared memory"), "{e}");
    run(ctx, Op::Synchronize).unwrap();
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
    check_host_memory_registration(ctx.as_mut(), "cuMemHostRegister");
}

#[test]
#[ignore = "needs a GPU"]
fn bad_module_images_are_invalid_requests() {
    let mut ctx = open();
    let ctx = ctx.as_mut();
    let image = cuda::builtin_image(9, 0).unwrap();
    let mut cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty", vec![]),
        ("garbage", b"\x01\x02\x03 not a module".to_vec()),
        ("truncated ELF header", image.code[..40].to_vec()),
        ("ELF cut in half", image.code[..image.code.len() / 2].to_vec()),
        (
            "fatbin header only",
            vec![0x50, 0xED, 0x55, 0xBA, 1, 0, 16, 0, 0xFF, 0xFF, 0, 0, 0, 0, 0, 0],
        ),
    ];
    let ptx =
        String::from_utf8(cuda::compile("extern \"C\" __global__ void k(int* p) { *p = 1; }", "compute_90").unwrap())
            .unwrap();
    let ptx = ptx.trim_end_matches('\0').to_string();
    cases.push((
        "PTX with bad syntax",
        b".version 8.0\n.target sm_90\n.visible .entry k( { garbage".to_vec(),
    ));
    for (what, bytes) in cases {
        let r = run(
            ctx,
            Op::LoadModule {
                source: ModuleSource::Image(bytes.into()),
            },
        );
        println!("{what}: {}", class(&r));
        assert_eq!(r.unwrap_err().class(), ErrorClass::InvalidRequest, "{what}");
    }
    // PTX without a NUL loads: the backend terminates its copy.
    let r = run(
        ctx,
        Op::LoadModule {
            source: ModuleSource::Image(ptx.into_bytes().into()),
        },
    );
    assert!(matches!(r, Ok(Reply::Module(_))), "PTX lacking a NUL: {r:?}");
    run(ctx, Op::Synchronize).expect("the device is usable after bad images");
}

#[test]
#[ignore = "needs a GPU"]
fn too_few_kernel_arguments() {
    let mut ctx = open();
    let ctx = ctx.as_mut();
    // The built-in cubin loaded as a user module: the runtime does not know its signatures.
    let image = cuda::builtin_image(9, 0).unwrap();
    let m = match run(
        ctx,
        Op::LoadModule {
            source: ModuleSource::Image(image.code.clone().into()),
        },
    )
    .unwrap()
    {
        Reply::Module(m) => m,
        r => panic!("{r:?}"),
    };
    let b = alloc(ctx, 4096);
    let r = run(
        ctx,
        launch(m, "fill", 1024, 0, vec![KernelArg::Buffer(b), KernelArg::U32(1)]),
    );
    println!(
        "fill with 2 of 3 arguments (driver {:?}): {}",
        cuda::driver_version(),
        class(&r)
    );
    if cuda::driver_version().is_some_and(|v| v >= 12040) {
        let e = r.unwrap_err();
        assert_eq!(e.class(), ErrorClass::InvalidRequest, "{e}");
        assert!(e.to_string().contains("takes 3 parameters"), "{e}");
        let r = run(
            ctx,
            launch(
                m,
                "fill",
                1024,
                0,
                vec![KernelArg::Buffer(b), KernelArg::U64(1), KernelArg::U32(1024)],
            ),
        );
        assert_eq!(
            r.unwrap_err().class(),
            ErrorClass::InvalidRequest,
            "a u64 where a u32 is due"
        );
    }
    run(
        ctx,
        launch(
            m,
            "fill",
            1024,
            0,
            vec![KernelArg::Buffer(b), KernelArg::U32(5), KernelArg::U32(1024)],
        ),
    )
    .unwrap();
    assert!(u32s(&download(ctx, b, 4096)).iter().all(|v| *v == 5));
}

#[test]
#[ignore = "needs a GPU"]
fn sticky_fault_surfaces_on_calls() {
    const TEST: &str = "sticky_fault_surfaces_on_calls";
    if is_child(TEST) {
        let mut owned = open();
        let ctx = owned.as_mut();
        let m = builtin(ctx);
        let b = alloc(ctx, 4096);
        let launched = run(ctx, launch(m, "fault_illegal_address", 1, 0, vec![]));
        // No synchronize: poll mem-info (which does not wait for the GPU) until the fault
        // shows, so the calls below are the first after it, none of them a synchronize.
        let t = Instant::now();
        let mut polls = 0u32;
        let first = loop {
            polls += 1;
            let r = run(ctx, Op::MemInfo);
            if r.is_err() || t.elapsed() > Duration::from_secs(10) {
                break r;
            }
        };
        let surfaced_ms = t.elapsed().as_secs_f64() * 1e3;
        let calls = [
            ("launch_of_the_fault", launched),
            ("mem_info_when_it_surfaced", first),
            ("alloc", run(ctx, Op::Alloc { bytes: 4096 })),
            (
                "memset",
                run(
                    ctx,
                    Op::Memset {
                        buffer: b,
                        offset: 0,
                        len: 16,
                        value: 1,
                    },
                ),
            ),
            (
                "copy_to_device",
                run(
                    ctx,
                    Op::CopyToDevice {
                        dst: b,
                        offset: 0,
                        data: vec![1u8; 16].into(),
                    },
                ),
            ),
            (
                "launch",
                run(
                    ctx,
                    launch(
                        m,
                        "fill",
                        1024,
                        0,
                        vec![KernelArg::Buffer(b), KernelArg::U32(1), KernelArg::U32(1024)],
                    ),
                ),
            ),
            (
                "load_module",
                run(
                    ctx,
                    Op::LoadModule {
                        source: ModuleSource::Builtin,
                    },
                ),
            ),
            ("free", run(ctx, Op::Free { buffer: b })),
            (
                "copy_from_device",
                run(
                    ctx,
                    Op::CopyFromDevice {
                        src: b,
                        offset: 0,
                        len: 16,
                    },
                ),
            ),
            ("mem_info", run(ctx, Op::MemInfo)),
            ("synchronize", run(ctx, Op::Synchronize)),
        ];
        let mut map: serde_json::Map<_, _> = calls.iter().map(|(k, r)| (k.to_string(), class(r).into())).collect();
        map.insert("fault_surfaced_ms".into(), surfaced_ms.into());
        map.insert("mem_info_polls".into(), polls.into());
        println!("RESULT {}", serde_json::Value::Object(map));
        std::mem::forget(owned); // the drop is the next test's subject
        return;
    }
    let Child { status, result, .. } = in_child(TEST, Duration::from_secs(60));
    assert!(
        status.success(),
        "the child survived the fault (CUDA poisons, it does not abort)"
    );
    let calls = result.as_object().expect("a RESULT line");
    assert_eq!(
        calls["launch_of_the_fault"], "ok",
        "the faulting launch itself is asynchronous"
    );
    for (call, outcome) in calls {
        if matches!(
            call.as_str(),
            "launch_of_the_fault" | "fault_surfaced_ms" | "mem_info_polls"
        ) {
            continue;
        }
        // The simulator's `cuda` flavour models exactly this: once the fault has happened,
        // the next call of any kind answers the sticky code, synchronizing or not, and so
        // does every call after it (tests/sim.rs checks the simulator's side).
        assert_eq!(outcome.as_str().unwrap(), "sticky 700", "{call}");
    }
}

#[test]
#[ignore = "needs a GPU"]
fn drop_after_fault_neither_panics_nor_hangs() {
    const TEST: &str = "drop_after_fault_neither_panics_nor_hangs";
    if is_child(TEST) {
        let mut ctx = open();
        let b = alloc(ctx.as_mut(), 1 << 20);
        let _ = b;
        let r = fault(ctx.as_mut());
        let t = Instant::now();
        drop(ctx);
        println!(
            "RESULT {{\"fault\":\"{}\",\"drop_ms\":{}}}",
            class(&r),
            t.elapsed().as_millis()
        );
        return;
    }
    let Child { status, result, .. } = in_child(TEST, Duration::from_secs(30));
    assert!(
        status.success(),
        "dropping a poisoned context neither panics nor aborts: {status}"
    );
    assert!(result["fault"].as_str().unwrap().starts_with("sticky"), "{result}");
}

#[test]
#[ignore = "needs a GPU"]
fn reopen_after_fault_is_refused() {
    const TEST: &str = "reopen_after_fault_is_refused";
    if is_child(TEST) {
        let mut ctx = open();
        let r = fault(ctx.as_mut());
        drop(ctx);
        let t = Instant::now();
        let again = CudaBackend::new().open(0, 2);
        let outcome = match &again {
            Ok(_) => "opened".to_string(),
            Err(e) => format!("{} {}", e.class(), e.code().map_or(0, |(_, c)| c)),
        };
        println!(
            "RESULT {{\"fault\":\"{}\",\"reopen\":\"{outcome}\",\"reopen_ms\":{},\"poisoned\":{}}}",
            class(&r),
            t.elapsed().as_millis(),
            cuda::poisoned().unwrap_or(0)
        );
        std::mem::forget(again);
        return;
    }
    let Child { status, result, .. } = in_child(TEST, Duration::from_secs(30));
    assert!(status.success(), "{status}");
    assert!(result["reopen"].as_str().unwrap().starts_with("sticky"), "{result}");
}
