//! The simulated backend: bytes, kernels, memory, bad input, fault plans, stickiness and the
//! flavours (how NVIDIA and AMD fail).

/// The GPU conformance tests' shared checks, run here against the simulator too.
mod gpu;

use std::os::unix::process::ExitStatusExt;
use std::process::Command;

use hipvisor_core::backend::sim::FRESH_MEMORY_BYTE;
use hipvisor_core::config::{SimConfig, SimFlavour};
use hipvisor_core::error::hip;
use hipvisor_core::fault_plan::FaultSpec;
use hipvisor_core::kernels::{self, BuiltinKernel, SAXPY_TOLERANCE_ULPS, f32_bytes, f32s, reference, u32_bytes, u32s};
use hipvisor_core::{
    Api, Backend, BufferHandle, DeviceContext, Dim3, ErrorClass, GpuError, InvalidReason, KernelArg, ModuleHandle,
    ModuleSource, Op, OpKind, Origin, Reply, SimBackend,
};

const APP: Origin = Origin::Application;

fn alloc(dev: &mut dyn DeviceContext, bytes: u64) -> BufferHandle {
    match dev.execute(&Op::Alloc { bytes }, APP).unwrap() {
        Reply::Buffer(b) => b,
        r => panic!("unexpected {r:?}"),
    }
}

fn upload(dev: &mut dyn DeviceContext, dst: BufferHandle, bytes: Vec<u8>) {
    dev.execute(
        &Op::CopyToDevice {
            dst,
            offset: 0,
            data: bytes.into(),
        },
        APP,
    )
    .unwrap();
}

fn download(dev: &mut dyn DeviceContext, src: BufferHandle) -> Result<Vec<u8>, GpuError> {
    match dev.execute(
        &Op::CopyFromDevice {
            src,
            offset: 0,
            len: src.len,
        },
        APP,
    )? {
        Reply::Data(d) => Ok(d.to_vec()),
        r => panic!("unexpected {r:?}"),
    }
}

fn builtin(dev: &mut dyn DeviceContext) -> ModuleHandle {
    match dev
        .execute(
            &Op::LoadModule {
                source: ModuleSource::Builtin,
            },
            APP,
        )
        .unwrap()
    {
        Reply::Module(m) => m,
        r => panic!("unexpected {r:?}"),
    }
}

fn launch(module: ModuleHandle, function: &str, n: u32, args: Vec<KernelArg>) -> Op {
    Op::Launch {
        module,
        function: function.into(),
        grid: Dim3::x(n.div_ceil(128).max(1)),
        block: Dim3::x(128),
        shared_mem_bytes: 0,
        args,
    }
}

fn invalid_reason(e: GpuError) -> InvalidReason {
    match e {
        GpuError::Invalid { reason, .. } => reason,
        other => panic!("expected an invalid request, got {other}"),
    }
}

fn code(e: &GpuError) -> i32 {
    e.code().expect("an API error").1
}

fn sim_with(devices: u32, memory: u64, faults: Vec<FaultSpec>) -> SimBackend {
    let cfg = SimConfig {
        devices,
        memory_bytes: memory,
        seed: 11,
        faults,
        ..SimConfig::default()
    };
    SimBackend::from_config(&cfg, false).unwrap()
}

fn memset(dev: &mut dyn DeviceContext, buffer: BufferHandle, value: u8) {
    dev.execute(
        &Op::Memset {
            buffer,
            offset: 0,
            len: buffer.len,
            value,
        },
        APP,
    )
    .unwrap();
}

#[test]
fn bytes_round_trip_with_offsets_memset_and_device_copies() {
    let backend = SimBackend::new(1, 1 << 20);
    let mut dev = backend.open(0, 0).unwrap();
    let a = alloc(&mut *dev, 64);
    let b = alloc(&mut *dev, 64);
    let data: Vec<u8> = (0..64).collect();
    upload(&mut *dev, a, data.clone());
    assert_eq!(download(&mut *dev, a).unwrap(), data);
    dev.execute(
        &Op::Memset {
            buffer: b,
            offset: 8,
            len: 8,
            value: 0xAB,
        },
        APP,
    )
    .unwrap();
    dev.execute(
        &Op::CopyDeviceToDevice {
            src: a,
            src_offset: 0,
            dst: b,
            dst_offset: 32,
            len: 16,
        },
        APP,
    )
    .unwrap();
    let got = download(&mut *dev, b).unwrap();
    assert_eq!(&got[8..16], &[0xAB; 8]);
    assert_eq!(&got[32..48], &data[0..16]);
    assert_eq!(&got[0..8], &[FRESH_MEMORY_BYTE; 8], "never written: not zeroed");
    let Reply::Data(part) = dev
        .execute(
            &Op::CopyFromDevice {
                src: a,
                offset: 60,
                len: 4,
            },
            APP,
        )
        .unwrap()
    else {
        panic!()
    };
    assert_eq!(part.as_bytes(), &[60, 61, 62, 63]);
    // Within one buffer, ranges apart.
    dev.execute(
        &Op::CopyDeviceToDevice {
            src: a,
            src_offset: 4,
            dst: a,
            dst_offset: 40,
            len: 8,
        },
        APP,
    )
    .unwrap();
    let got = download(&mut *dev, a).unwrap();
    assert_eq!(&got[40..48], &data[4..12]);
    assert_eq!(&got[..40], &data[..40]);
    assert_eq!(&got[48..], &data[48..]);
}

#[test]
fn every_kernel_computes_its_reference_result() {
    let backend = SimBackend::new(1, 1 << 24);
    let mut dev = backend.open(0, 0).unwrap();
    let m = builtin(&mut *dev);
    let n = 1000u32;
    let xs: Vec<f32> = (0..n).map(|i| i as f32 * 0.37 - 11.0).collect();
    let ys: Vec<f32> = (0..n).map(|i| 1.0 / (i as f32 + 1.0)).collect();
    let (bx, by, bo) = (
        alloc(&mut *dev, 4 * n as u64),
        alloc(&mut *dev, 4 * n as u64),
        alloc(&mut *dev, 4 * n as u64),
    );
    upload(&mut *dev, bx, f32_bytes(&xs));
    upload(&mut *dev, by, f32_bytes(&ys));
    use KernelArg::{Buffer as B, F32, U32};

    dev.execute(&launch(m, "vector_add", n, vec![B(bx), B(by), B(bo), U32(n)]), APP)
        .unwrap();
    assert_eq!(f32s(&download(&mut *dev, bo).unwrap()), reference::vector_add(&xs, &ys));

    dev.execute(&launch(m, "saxpy", n, vec![F32(2.5), B(bx), B(by), U32(n)]), APP)
        .unwrap();
    let mut want = ys.clone();
    reference::saxpy(2.5, &xs, &mut want);
    let got = f32s(&download(&mut *dev, by).unwrap());
    assert!(
        got.iter()
            .zip(&want)
            .all(|(g, w)| kernels::within_ulps(*g, *w, SAXPY_TOLERANCE_ULPS))
    );

    dev.execute(&launch(m, "scale", n, vec![B(bx), F32(-2.0), U32(n)]), APP)
        .unwrap();
    let want: Vec<f32> = xs.iter().map(|x| x * -2.0).collect();
    assert_eq!(f32s(&download(&mut *dev, bx).unwrap()), want);

    dev.execute(&launch(m, "fill", n, vec![B(bo), U32(0xDEAD_BEEF), U32(n)]), APP)
        .unwrap();
    assert!(
        u32s(&download(&mut *dev, bo).unwrap())
            .iter()
            .all(|v| *v == 0xDEAD_BEEF)
    );

    let words: Vec<u32> = (0..n).map(|i| i.wrapping_mul(2_654_435_761)).collect();
    upload(&mut *dev, bo, u32_bytes(&words));
    let sum = alloc(&mut *dev, 8);
    memset(&mut *dev, sum, 0); // checksum adds to out[0]: it must start at zero
    dev.execute(&launch(m, "checksum", n, vec![B(bo), U32(n), B(sum)]), APP)
        .unwrap();
    let got = u64::from_le_bytes(download(&mut *dev, sum).unwrap().try_into().unwrap());
    assert_eq!(got, reference::checksum(&words));
}

#[test]
fn a_launch_with_fewer_threads_than_elements_processes_only_those() {
    let backend = SimBackend::new(1, 1 << 20);
    let mut dev = backend.open(0, 0).unwrap();
    let m = builtin(&mut *dev);
    let b = alloc(&mut *dev, 4 * 300);
    let op = Op::Launch {
        module: m,
        function: "fill".into(),
        grid: Dim3::x(2),
        block: Dim3::x(100),
        shared_mem_bytes: 0,
        args: vec![KernelArg::Buffer(b), KernelArg::U32(7), KernelArg::U32(300)],
    };
    dev.execute(&op, APP).unwrap();
    let v = u32s(&download(&mut *dev, b).unwrap());
    let fresh = u32::from_le_bytes([FRESH_MEMORY_BYTE; 4]);
    assert!(v[..200].iter().all(|x| *x == 7) && v[200..].iter().all(|x| *x == fresh));
}

#[test]
fn memory_is_accounted_and_oom_is_transient_but_too_big_is_invalid() {
    let backend = SimBackend::new(1, 1000);
    let mut dev = backend.open(0, 0).unwrap();
    let a = alloc(&mut *dev, 600);
    let Reply::MemInfo(mi) = dev.execute(&Op::MemInfo, APP).unwrap() else {
        panic!()
    };
    assert_eq!((mi.free, mi.total), (400, 1000));
    let oom = dev.execute(&Op::Alloc { bytes: 500 }, APP).unwrap_err();
    assert_eq!(code(&oom), hip::OUT_OF_MEMORY);
    assert_eq!(oom.class(), ErrorClass::Transient);
    let too_big = dev.execute(&Op::Alloc { bytes: 1001 }, APP).unwrap_err();
    assert!(matches!(
        invalid_reason(too_big),
        InvalidReason::ExceedsDeviceMemory {
            requested: 1001,
            total: 1000
        }
    ));
    dev.execute(&Op::Free { buffer: a }, APP).unwrap();
    alloc(&mut *dev, 500);
    let zero = dev.execute(&Op::Alloc { bytes: 0 }, APP).unwrap_err();
    assert_eq!(invalid_reason(zero), InvalidReason::ZeroSizeAllocation);
}

#[test]
fn bad_requests_are_rejected_with_what_was_wrong() {
    let backend = SimBackend::new(2, 1 << 20);
    let mut dev = backend.open(0, 3).unwrap();
    let mut other = backend.open(1, 3).unwrap();
    let a = alloc(&mut *dev, 16);
    let foreign = alloc(&mut *other, 16);
    let m = builtin(&mut *dev);
    type Check = fn(&InvalidReason) -> bool;
    let cases: Vec<(Op, Check)> = vec![
        (
            Op::CopyFromDevice {
                src: a,
                offset: 8,
                len: 16,
            },
            |r| matches!(r, InvalidReason::OutOfBounds { .. }),
        ),
        (
            Op::CopyFromDevice {
                src: a,
                offset: u64::MAX,
                len: 2,
            },
            |r| matches!(r, InvalidReason::OutOfBounds { .. }),
        ),
        (
            Op::CopyToDevice {
                dst: a,
                offset: 10,
                data: vec![0; 8].into(),
            },
            |r| matches!(r, InvalidReason::OutOfBounds { .. }),
        ),
        (
            Op::Memset {
                buffer: a,
                offset: 0,
                len: 17,
                value: 1,
            },
            |r| matches!(r, InvalidReason::OutOfBounds { .. }),
        ),
        (
            Op::CopyDeviceToDevice {
                src: a,
                src_offset: 0,
                dst: a,
                dst_offset: 4,
                len: 8,
            },
            |r| *r == InvalidReason::OverlappingCopy,
        ),
        (Op::Free { buffer: foreign }, |r| {
            *r == InvalidReason::WrongDevice { handle_device: 1 }
        }),
        (
            Op::Free {
                buffer: BufferHandle { epoch: 2, ..a },
            },
            |r| {
                *r == InvalidReason::BufferLost {
                    handle_epoch: 2,
                    device_epoch: 3,
                }
            },
        ),
        (
            Op::Free {
                buffer: BufferHandle { id: 999, ..a },
            },
            |r| *r == InvalidReason::UnknownBuffer { id: 999 },
        ),
        (
            Op::Free {
                buffer: BufferHandle { len: 32, ..a },
            },
            |r| matches!(r, InvalidReason::HandleMismatch { .. }),
        ),
        (
            launch(m, "nope", 4, vec![]),
            |r| matches!(r, InvalidReason::UnknownKernel { name } if name == "nope"),
        ),
        (launch(ModuleHandle { device: 0, id: 77 }, "fill", 4, vec![]), |r| {
            *r == InvalidReason::UnknownModule { id: 77 }
        }),
        (launch(m, "fill", 4, vec![KernelArg::Buffer(a)]), |r| {
            matches!(r, InvalidReason::BadArguments { .. })
        }),
        (
            launch(
                m,
                "fill",
                5,
                vec![KernelArg::Buffer(a), KernelArg::U32(1), KernelArg::U32(5)],
            ),
            |r| matches!(r, InvalidReason::BadArguments { .. }),
        ),
        (
            Op::Launch {
                module: m,
                function: "fill".into(),
                grid: Dim3::x(1),
                block: Dim3::x(4096),
                shared_mem_bytes: 0,
                args: vec![KernelArg::Buffer(a), KernelArg::U32(1), KernelArg::U32(4)],
            },
            |r| matches!(r, InvalidReason::BadLaunchConfig { .. }),
        ),
        (
            Op::LoadModule {
                source: ModuleSource::Image(b"\x7fELF".to_vec().into()),
            },
            |r| matches!(r, InvalidReason::BadModuleImage { .. }),
        ),
    ];
    for (op, check) in cases {
        let e = dev.execute(&op, APP).unwrap_err();
        assert_eq!(e.class(), ErrorClass::InvalidRequest, "{op:?}: {e}");
        let reason = invalid_reason(e);
        assert!(check(&reason), "{op:?}: unexpected {reason:?}");
    }
    // Nothing else broke: the buffer still works.
    upload(&mut *dev, a, vec![5; 16]);
    assert_eq!(download(&mut *dev, a).unwrap(), vec![5; 16]);
    assert!(matches!(
        invalid_reason(backend.device_info(2).unwrap_err()),
        InvalidReason::DeviceOutOfRange { device: 2, count: 2 }
    ));
}

#[test]
fn absurd_sizes_and_dimensions_are_invalid_requests_never_out_of_memory() {
    let backend = SimBackend::new(1, 1 << 20);
    let mut dev = backend.open(0, 0).unwrap();
    let a = alloc(&mut *dev, 64);
    let b = alloc(&mut *dev, 64);
    let m = builtin(&mut *dev);
    let max = u64::MAX;
    let all = Dim3 {
        x: u32::MAX,
        y: u32::MAX,
        z: u32::MAX,
    };
    let fill = vec![KernelArg::Buffer(a), KernelArg::U32(1), KernelArg::U32(16)];
    let dims = |grid, block| Op::Launch {
        module: m,
        function: "fill".into(),
        grid,
        block,
        shared_mem_bytes: 0,
        args: fill.clone(),
    };
    let cases = [
        Op::Alloc { bytes: max },
        Op::CopyFromDevice {
            src: a,
            offset: 0,
            len: max,
        },
        Op::CopyFromDevice {
            src: a,
            offset: 1,
            len: max,
        },
        Op::CopyToDevice {
            dst: a,
            offset: max,
            data: vec![0; 4].into(),
        },
        Op::Memset {
            buffer: a,
            offset: 0,
            len: max,
            value: 0,
        },
        Op::Memset {
            buffer: a,
            offset: max,
            len: max,
            value: 0,
        },
        Op::CopyDeviceToDevice {
            src: a,
            src_offset: 0,
            dst: b,
            dst_offset: 0,
            len: max,
        },
        Op::CopyDeviceToDevice {
            src: a,
            src_offset: 8,
            dst: a,
            dst_offset: max,
            len: max,
        },
        dims(all, Dim3::x(1)),
        // Overflows u64 when multiplied (a panic in debug builds, a wrapped count in release).
        dims(Dim3::x(1), all),
        dims(all, all),
        // Within every per-dimension limit, but 2^64 threads or more.
        dims(
            Dim3 {
                x: i32::MAX as u32,
                y: 65535,
                z: 65535,
            },
            Dim3::x(1024),
        ),
    ];
    for op in cases {
        let e = dev.execute(&op, APP).unwrap_err();
        assert_eq!(e.class(), ErrorClass::InvalidRequest, "{op:?}: {e}");
    }
    // Untouched.
    memset(&mut *dev, a, 2);
    assert_eq!(download(&mut *dev, a).unwrap(), vec![2; 64]);

    // A simulated device larger than the host that simulates it: an allocation the host
    // can never back is an invalid request, not an aborted process.
    let huge = SimBackend::new(1, 1 << 62);
    let mut dev = huge.open(0, 0).unwrap();
    let e = dev.execute(&Op::Alloc { bytes: 1 << 50 }, APP).unwrap_err();
    assert_eq!(e.class(), ErrorClass::InvalidRequest, "{e}");
    assert!(e.to_string().contains("can never be allocated"), "{e}");
    let Reply::MemInfo(mi) = dev.execute(&Op::MemInfo, APP).unwrap() else {
        panic!()
    };
    assert_eq!(mi.free, 1 << 62, "nothing was accounted");
}

#[test]
fn user_module_images_and_launch_arguments_are_checked() {
    let backend = SimBackend::new(1, 1 << 20);
    let mut dev = backend.open(0, 0).unwrap();
    let image = kernels::sim_module_image(&[BuiltinKernel::Fill, BuiltinKernel::Saxpy]);
    let load = |bytes: &[u8]| Op::LoadModule {
        source: ModuleSource::Image(bytes.to_vec().into()),
    };
    let mut not_utf8 = image.clone();
    not_utf8.extend_from_slice(b"\n\xff\xfefill");
    let mut bad_magic = image.clone();
    bad_magic[0] = 0xff;
    for bytes in [
        &image[..0],
        &image[..5],
        &image[..image.len() - 2], // "sax"
        &not_utf8,
        &bad_magic,
    ] {
        let e = dev.execute(&load(bytes), APP).unwrap_err();
        assert!(
            matches!(invalid_reason(e), InvalidReason::BadModuleImage { .. }),
            "{bytes:?}"
        );
    }
    let Reply::Module(m) = dev.execute(&load(&image), APP).unwrap() else {
        panic!()
    };
    let b = alloc(&mut *dev, 64);
    let buf = KernelArg::Buffer(b);
    use KernelArg::{F32, U32};
    for (kernel, args) in [
        ("fill", vec![]),
        ("fill", vec![buf]),
        ("fill", vec![buf, U32(1), U32(16), U32(0)]),
        ("fill", vec![buf, F32(1.0), U32(16)]),
        ("fill", vec![U32(1), U32(1), U32(16)]),
        ("saxpy", vec![U32(2), buf, buf, U32(16)]),
        ("saxpy", vec![F32(2.0), buf, buf, U32(17)]),
    ] {
        let e = dev.execute(&launch(m, kernel, 16, args.clone()), APP).unwrap_err();
        assert!(
            matches!(invalid_reason(e), InvalidReason::BadArguments { .. }),
            "{kernel} {args:?}"
        );
    }
    let e = dev
        .execute(&launch(m, "vector_add", 16, vec![buf, buf, buf, U32(16)]), APP)
        .unwrap_err();
    assert!(matches!(invalid_reason(e), InvalidReason::UnknownKernel { .. }));
    // The module still works.
    dev.execute(&launch(m, "fill", 16, vec![buf, U32(4), U32(16)]), APP)
        .unwrap();
    assert_eq!(u32s(&download(&mut *dev, b).unwrap()), vec![4; 16]);
}

#[test]
fn user_modules_name_builtin_kernels() {
    let backend = SimBackend::new(1, 1 << 20);
    let mut dev = backend.open(0, 0).unwrap();
    let image = kernels::sim_module_image(&[BuiltinKernel::Fill]);
    let Reply::Module(m) = dev
        .execute(
            &Op::LoadModule {
                source: ModuleSource::Image(image.into()),
            },
            APP,
        )
        .unwrap()
    else {
        panic!()
    };
    let b = alloc(&mut *dev, 16);
    dev.execute(
        &launch(
            m,
            "fill",
            4,
            vec![KernelArg::Buffer(b), KernelArg::U32(1), KernelArg::U32(4)],
        ),
        APP,
    )
    .unwrap();
    let e = dev.execute(&launch(m, "scale", 4, vec![]), APP).unwrap_err();
    assert!(matches!(invalid_reason(e), InvalidReason::UnknownKernel { .. }));
}

fn fault(f: impl FnOnce(&mut FaultSpec)) -> FaultSpec {
    let mut s = FaultSpec::default();
    f(&mut s);
    s
}

#[test]
fn sticky_fault_of_a_launch_surfaces_at_the_next_call_and_poisons_the_host() {
    let backend = sim_with(3, 1 << 20, vec![]);
    let mut d0 = backend.open(0, 0).unwrap();
    let mut d1 = backend.open(1, 0).unwrap();
    let m = builtin(&mut *d0);
    let b = alloc(&mut *d0, 16);
    // The faulting launch itself returns success, as on a GPU.
    d0.execute(&launch(m, "fault_illegal_address", 1, vec![]), APP).unwrap();
    assert_eq!(backend.host().poisoned(), None, "not yet: the fault is asynchronous");
    // Another device of the host is not touched until the fault surfaces.
    d1.execute(&Op::MemInfo, APP).unwrap();
    // The next call of any kind returns it: here a memset, which does not synchronize.
    let e = d0
        .execute(
            &Op::Memset {
                buffer: b,
                offset: 0,
                len: 4,
                value: 1,
            },
            APP,
        )
        .unwrap_err();
    assert_eq!((code(&e), e.class()), (hip::ILLEGAL_ADDRESS, ErrorClass::Sticky));
    assert_eq!(e.code(), Some((Api::Sim, 700)));
    assert_eq!(e.op(), OpKind::Memset);
    assert_eq!(backend.host().poisoned(), Some(700));
    assert_eq!(code(&d0.execute(&Op::Synchronize, APP).unwrap_err()), 700);
    // Every op on every device of the host now fails with the same code, runtime ops too.
    assert_eq!(code(&d1.execute(&Op::MemInfo, Origin::Runtime).unwrap_err()), 700);
    assert_eq!(code(&d1.execute(&Op::Alloc { bytes: 4 }, APP).unwrap_err()), 700);
    assert_eq!(code(&d0.execute(&Op::DeviceInfo, APP).unwrap_err()), 700);
    assert!(backend.open(2, 0).is_err(), "a poisoned host cannot open contexts");
    // A new host (a new process) is healthy at once, and other hosts were never affected.
    let fresh = backend.on_new_host();
    let mut d1b = fresh.open(1, 1).unwrap();
    assert!(d1b.execute(&Op::MemInfo, APP).is_ok());
    let unrelated = SimBackend::new(1, 1 << 20);
    assert!(unrelated.open(0, 0).unwrap().execute(&Op::MemInfo, APP).is_ok());
}

#[test]
fn injected_sticky_code_on_a_launch_is_asynchronous_and_on_other_ops_immediate() {
    let backend = sim_with(
        1,
        1 << 20,
        vec![fault(|s| {
            s.op = "launch".into();
            s.kernel = Some("scale".into());
            s.nth = Some(1);
            s.code = Some(719);
        })],
    );
    let mut d = backend.open(0, 0).unwrap();
    let m = builtin(&mut *d);
    let b = alloc(&mut *d, 16);
    upload(&mut *d, b, f32_bytes(&[1.0; 4]));
    d.execute(
        &launch(
            m,
            "scale",
            4,
            vec![KernelArg::Buffer(b), KernelArg::F32(2.0), KernelArg::U32(4)],
        ),
        APP,
    )
    .unwrap();
    let e = download(&mut *d, b).unwrap_err();
    assert_eq!(code(&e), 719);
    assert_eq!(e.op(), OpKind::CopyFromDevice);
    assert_eq!(
        code(&d.execute(&Op::Alloc { bytes: 4 }, APP).unwrap_err()),
        719,
        "for good"
    );

    let backend = sim_with(
        2,
        1 << 20,
        vec![fault(|s| {
            s.op = "alloc".into();
            s.nth = Some(2);
            s.code = Some(700);
        })],
    );
    let mut d = backend.open(0, 0).unwrap();
    alloc(&mut *d, 4);
    let e = d.execute(&Op::Alloc { bytes: 4 }, APP).unwrap_err();
    assert_eq!(code(&e), 700);
    assert_eq!(backend.host().poisoned(), Some(700));
}

#[test]
fn injected_transient_and_invalid_codes_fire_before_any_side_effect() {
    let backend = sim_with(
        1,
        1000,
        vec![
            fault(|s| {
                s.op = "alloc".into();
                s.nth = Some(1);
                s.code = Some(2);
            }),
            fault(|s| {
                s.op = "copy_to_device".into();
                s.nth = Some(1);
                s.code = Some(1);
            }),
        ],
    );
    let mut d = backend.open(0, 0).unwrap();
    let e = d.execute(&Op::Alloc { bytes: 100 }, APP).unwrap_err();
    assert_eq!(e.class(), ErrorClass::Transient);
    let Reply::MemInfo(mi) = d.execute(&Op::MemInfo, APP).unwrap() else {
        panic!()
    };
    assert_eq!(mi.free, 1000, "the failed alloc took no memory");
    let b = alloc(&mut *d, 4);
    let e = d
        .execute(
            &Op::CopyToDevice {
                dst: b,
                offset: 0,
                data: vec![9; 4].into(),
            },
            APP,
        )
        .unwrap_err();
    assert_eq!(e.class(), ErrorClass::InvalidRequest);
    assert_eq!(
        download(&mut *d, b).unwrap(),
        vec![FRESH_MEMORY_BYTE; 4],
        "the failed copy wrote nothing"
    );
    assert_eq!(backend.host().poisoned(), None);
}

#[test]
fn nth_is_not_rearmed_by_a_new_host_and_runtime_ops_are_never_faulted() {
    let backend = sim_with(
        1,
        1 << 20,
        vec![fault(|s| {
            s.op = "mem_info".into();
            s.nth = Some(2);
            s.code = Some(700);
        })],
    );
    let mut d = backend.open(0, 0).unwrap();
    for _ in 0..5 {
        d.execute(&Op::MemInfo, Origin::Runtime).unwrap();
    }
    d.execute(&Op::MemInfo, APP).unwrap();
    assert_eq!(code(&d.execute(&Op::MemInfo, APP).unwrap_err()), 700);
    let replaced = backend.on_new_host();
    let mut d = replaced.open(0, 1).unwrap();
    for _ in 0..10 {
        d.execute(&Op::MemInfo, APP).unwrap();
    }
}

#[test]
fn the_same_seed_gives_the_same_faults() {
    let plan = || {
        vec![fault(|s| {
            s.probability = Some(0.2);
            s.code = Some(600);
        })]
    };
    let outcomes = |seed: u64, device: u32| {
        let cfg = SimConfig {
            devices: 2,
            memory_bytes: 1 << 20,
            seed,
            faults: plan(),
            ..SimConfig::default()
        };
        let backend = SimBackend::from_config(&cfg, false).unwrap();
        let mut d = backend.open(device, 0).unwrap();
        (0..300)
            .map(|_| d.execute(&Op::MemInfo, APP).is_err())
            .collect::<Vec<_>>()
    };
    assert_eq!(outcomes(1, 0), outcomes(1, 0));
    assert_ne!(outcomes(1, 0), outcomes(2, 0));
    assert_ne!(outcomes(1, 0), outcomes(1, 1));
}

#[test]
fn a_lost_device_returns_after_the_duration() {
    let backend = sim_with(
        2,
        1 << 20,
        vec![fault(|s| {
            s.device = Some(1);
            s.after = Some(2);
            s.code = Some(100);
            s.duration_ms = Some(50);
        })],
    );
    let mut d = backend.open(1, 0).unwrap();
    d.execute(&Op::MemInfo, APP).unwrap();
    let e = d.execute(&Op::MemInfo, APP).unwrap_err();
    assert_eq!(e.class(), ErrorClass::DeviceLost);
    assert_eq!(
        backend.host().poisoned(),
        None,
        "a lost device does not poison the host"
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        if d.execute(&Op::MemInfo, APP).is_ok() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "device 1 never came back");
        std::thread::yield_now();
    }
    let mut d0 = backend.open(0, 0).unwrap();
    d0.execute(&Op::MemInfo, APP).unwrap();
}

#[test]
fn crash_faults_are_refused_outside_process_isolation() {
    let cfg = SimConfig {
        faults: vec![fault(|s| {
            s.nth = Some(1);
            s.crash = Some(true);
        })],
        ..SimConfig::default()
    };
    let e = SimBackend::from_config(&cfg, false).unwrap_err();
    assert_eq!(e.key(), Some("sim.faults[0].crash"));
}

#[test]
fn restored_modules_keep_their_ids() {
    let backend = SimBackend::new(1, 1 << 20);
    let mut d = backend.open(0, 0).unwrap();
    let m = builtin(&mut *d);
    let mut d2 = backend.on_new_host().open(0, 1).unwrap();
    d2.restore_module(m, &ModuleSource::Builtin).unwrap();
    let b = alloc(&mut *d2, 16);
    d2.execute(
        &launch(
            m,
            "fill",
            4,
            vec![KernelArg::Buffer(b), KernelArg::U32(3), KernelArg::U32(4)],
        ),
        APP,
    )
    .unwrap();
    let m2 = builtin(&mut *d2);
    assert_ne!(m2.id, m.id);
}

#[test]
fn fresh_allocations_are_not_zeroed() {
    let backend = SimBackend::new(1, 1 << 20);
    let mut dev = backend.open(0, 0).unwrap();
    let a = alloc(&mut *dev, 4096);
    assert_eq!(FRESH_MEMORY_BYTE, 0xA5);
    assert!(download(&mut *dev, a).unwrap().iter().all(|b| *b == FRESH_MEMORY_BYTE));
    // Memory written, freed and allocated again is not zeroed either (nor the old bytes).
    memset(&mut *dev, a, 0);
    dev.execute(&Op::Free { buffer: a }, APP).unwrap();
    let b = alloc(&mut *dev, 4096);
    assert!(download(&mut *dev, b).unwrap().iter().all(|b| *b == FRESH_MEMORY_BYTE));
    // An explicit memset gives zeros.
    memset(&mut *dev, b, 0);
    assert!(download(&mut *dev, b).unwrap().iter().all(|b| *b == 0));
}

/// A backend whose device 0 has the builtin module loaded and a pending fault of an earlier
/// launch, with a buffer to name in ops.
fn faulted(flavour_code: Option<i32>) -> (Box<dyn DeviceContext>, ModuleHandle, BufferHandle) {
    let plan = flavour_code
        .map(|code| {
            vec![fault(|s| {
                s.op = "launch".into();
                s.kernel = Some("scale".into());
                s.nth = Some(1);
                s.code = Some(code);
            })]
        })
        .unwrap_or_default();
    let backend = sim_with(1, 1 << 20, plan);
    let mut d = backend.open(0, 0).unwrap();
    let m = builtin(&mut *d);
    let b = alloc(&mut *d, 16);
    let op = match flavour_code {
        Some(_) => launch(
            m,
            "scale",
            4,
            vec![KernelArg::Buffer(b), KernelArg::F32(2.0), KernelArg::U32(4)],
        ),
        None => launch(m, "fault_illegal_address", 1, vec![]),
    };
    d.execute(&op, APP).unwrap();
    (d, m, b)
}

#[test]
fn a_pending_sticky_fault_surfaces_at_the_next_call_of_every_kind() {
    type MakeOp = fn(ModuleHandle, BufferHandle) -> Op;
    let cases: Vec<(&str, MakeOp)> = vec![
        ("alloc", |_, _| Op::Alloc { bytes: 8 }),
        ("free", |_, b| Op::Free { buffer: b }),
        ("copy_to_device", |_, b| Op::CopyToDevice {
            dst: b,
            offset: 0,
            data: vec![1; 4].into(),
        }),
        ("copy_from_device", |_, b| Op::CopyFromDevice {
            src: b,
            offset: 0,
            len: 4,
        }),
        ("copy_device_to_device", |_, b| Op::CopyDeviceToDevice {
            src: b,
            src_offset: 0,
            dst: b,
            dst_offset: 8,
            len: 4,
        }),
        ("memset", |_, b| Op::Memset {
            buffer: b,
            offset: 0,
            len: 4,
            value: 0,
        }),
        ("launch", |m, b| {
            launch(
                m,
                "fill",
                4,
                vec![KernelArg::Buffer(b), KernelArg::U32(1), KernelArg::U32(4)],
            )
        }),
        ("load_module", |_, _| Op::LoadModule {
            source: ModuleSource::Builtin,
        }),
        ("synchronize", |_, _| Op::Synchronize),
        ("mem_info", |_, _| Op::MemInfo),
    ];
    // The built-in faulting kernel (700) and a planned sticky code on a launch (719).
    for (planned, want) in [(None, 700), (Some(719), 719)] {
        for (name, make) in &cases {
            let (mut d, m, b) = faulted(planned);
            let e = d.execute(&make(m, b), APP).unwrap_err();
            assert_eq!(
                (code(&e), e.class()),
                (want, ErrorClass::Sticky),
                "{name} after {planned:?}"
            );
            // And every call after it.
            assert_eq!(code(&d.execute(&Op::MemInfo, APP).unwrap_err()), want, "{name}");
        }
    }
}

#[test]
fn dynamic_shared_memory_is_limited_per_flavour() {
    let run = |flavour: SimFlavour, bytes: u32| {
        let backend = SimBackend::new(1, 1 << 20).with_flavour(flavour);
        let mut d = backend.open(0, 0).unwrap();
        let m = builtin(&mut *d);
        let b = alloc(&mut *d, 16);
        let op = Op::Launch {
            module: m,
            function: "fill".into(),
            grid: Dim3::x(1),
            block: Dim3::x(4),
            shared_mem_bytes: bytes,
            args: vec![KernelArg::Buffer(b), KernelArg::U32(3), KernelArg::U32(4)],
        };
        d.execute(&op, APP)
    };
    assert_eq!(SimFlavour::default(), SimFlavour::Cuda);
    assert_eq!(SimFlavour::Cuda.max_shared_mem_bytes(), 232_448);
    assert_eq!(SimFlavour::Hip.max_shared_mem_bytes(), 65_536);
    // cuda: the default 48 KiB and above it, up to the opt-in maximum of 227 KiB.
    for ok in [0, 48 * 1024, 48 * 1024 + 1, 100_000, 232_448] {
        run(SimFlavour::Cuda, ok).unwrap_or_else(|e| panic!("cuda, {ok} bytes: {e}"));
    }
    // hip: 64 KiB.
    for ok in [0, 48 * 1024, 65_536] {
        run(SimFlavour::Hip, ok).unwrap_or_else(|e| panic!("hip, {ok} bytes: {e}"));
    }
    for (flavour, bytes, available) in [
        (SimFlavour::Cuda, 232_449, 232_448),
        (SimFlavour::Cuda, u32::MAX, 232_448),
        (SimFlavour::Hip, 65_537, 65_536),
        (SimFlavour::Hip, 100_000, 65_536),
    ] {
        let e = run(flavour, bytes).unwrap_err();
        assert_eq!(e.class(), ErrorClass::InvalidRequest, "{flavour:?} {bytes}: {e}");
        assert_eq!(code(&e), hip::LAUNCH_OUT_OF_RESOURCES);
        let msg = e.to_string();
        assert!(
            msg.contains(&format!("{bytes} bytes")) && msg.contains(&format!("{available} available")),
            "names the requested and available bytes: {msg}"
        );
    }
}

#[test]
fn the_hip_flavour_returns_codes_other_than_a_kernel_memory_fault() {
    // A planned sticky code other than 700 on a launch is asynchronous, as in `cuda`.
    let plan = vec![
        fault(|s| {
            s.op = "launch".into();
            s.nth = Some(1);
            s.code = Some(719);
        }),
        // 700 on an op that is not a kernel is returned, not an abort.
        fault(|s| {
            s.op = "alloc".into();
            s.nth = Some(3);
            s.code = Some(700);
        }),
    ];
    let cfg = SimConfig {
        devices: 2,
        memory_bytes: 1 << 20,
        flavour: SimFlavour::Hip,
        faults: plan,
        ..SimConfig::default()
    };
    let backend = SimBackend::from_config(&cfg, false).unwrap();
    assert_eq!(backend.flavour(), SimFlavour::Hip);
    let mut d0 = backend.open(0, 0).unwrap();
    let m = builtin(&mut *d0);
    let b = alloc(&mut *d0, 16);
    d0.execute(
        &launch(
            m,
            "fill",
            4,
            vec![KernelArg::Buffer(b), KernelArg::U32(1), KernelArg::U32(4)],
        ),
        APP,
    )
    .unwrap();
    assert_eq!(code(&d0.execute(&Op::Synchronize, APP).unwrap_err()), 719);
    let mut d1 = backend.on_new_host().open(1, 0).unwrap();
    alloc(&mut *d1, 4);
    alloc(&mut *d1, 4);
    assert_eq!(code(&d1.execute(&Op::Alloc { bytes: 4 }, APP).unwrap_err()), 700);
}

/// Set in a copy of this test program that must end the way a test below expects.
const CHILD_ENV: &str = "HV_SIM_TEST_CHILD";

/// Runs `test` of this program in a child process with [`CHILD_ENV`] = `case`.
fn in_child(test: &str, case: &str) -> std::process::Output {
    Command::new(std::env::current_exe().unwrap())
        .args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, case)
        .output()
        .unwrap()
}

/// The child's part of the tests below: runs `case` on a one-device simulator.
fn child_case(case: &str) {
    let fault_on_launch = |code: Option<i32>, crash: bool| {
        vec![fault(|s| {
            s.op = "launch".into();
            s.kernel = Some("fill".into());
            s.nth = Some(1);
            s.code = code;
            s.crash = crash.then_some(true);
        })]
    };
    let (flavour, faults, kernel) = match case {
        "hip_kernel" | "hip_kernel_other_device" => (SimFlavour::Hip, vec![], "fault_illegal_address"),
        "hip_planned" => (SimFlavour::Hip, fault_on_launch(Some(700), false), "fill"),
        "hip_crash" => (SimFlavour::Hip, fault_on_launch(None, true), "fill"),
        other => panic!("unknown case {other}"),
    };
    let cfg = SimConfig {
        devices: 2,
        memory_bytes: 1 << 20,
        flavour,
        faults,
        ..SimConfig::default()
    };
    // As a worker process: crash = true allowed.
    let backend = SimBackend::from_config(&cfg, true).unwrap();
    let mut d = backend.open(0, 0).unwrap();
    let m = builtin(&mut *d);
    let b = alloc(&mut *d, 16);
    let args = match kernel {
        "fill" => vec![KernelArg::Buffer(b), KernelArg::U32(1), KernelArg::U32(4)],
        _ => vec![],
    };
    let r = d.execute(&launch(m, kernel, 4, args), APP);
    eprintln!("the launch returned {r:?}");
    // The next call, on the same device or (same process) another one.
    let after = if case == "hip_kernel_other_device" {
        backend.open(1, 0).and_then(|mut d1| d1.execute(&Op::MemInfo, APP))
    } else {
        d.execute(&Op::Synchronize, APP)
    };
    eprintln!("the process survived: {r:?} {after:?}");
}

#[test]
fn a_kernel_memory_fault_aborts_the_process_in_the_hip_flavour() {
    const NAME: &str = "a_kernel_memory_fault_aborts_the_process_in_the_hip_flavour";
    if let Ok(case) = std::env::var(CHILD_ENV) {
        return child_case(&case);
    }
    for case in ["hip_kernel", "hip_planned", "hip_kernel_other_device"] {
        let out = in_child(NAME, case);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.signal(),
            Some(6),
            "{case}: ended by SIGABRT: {:?}\n{stderr}",
            out.status
        );
        assert!(!out.status.core_dumped(), "{case}: no core dump");
        assert!(
            stderr.contains("Memory access fault by GPU node-1 (simulated device 0) on address 0x")
                && stderr.contains("Reason: Page not present or supervisor privilege."),
            "{case}: ROCm's line on stderr: {stderr}"
        );
        assert!(!stderr.contains("the process survived"), "{case}: {stderr}");
        // As on a GPU, the launch returned; the process ended at its next call.
        let returned = stderr.find("the launch returned Ok(Done)");
        let fault = stderr.find("Memory access fault by GPU");
        assert!(
            returned.is_some() && returned < fault,
            "{case}: the launch returns before the abort: {stderr}"
        );
    }
}

#[test]
fn a_planned_crash_ends_by_sigkill_not_sigabrt() {
    const NAME: &str = "a_planned_crash_ends_by_sigkill_not_sigabrt";
    if let Ok(case) = std::env::var(CHILD_ENV) {
        return child_case(&case);
    }
    let out = in_child(NAME, "hip_crash");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.signal(),
        Some(9),
        "ended by SIGKILL: {:?}\n{stderr}",
        out.status
    );
    assert!(!stderr.contains("Memory access fault"), "{stderr}");
}

/// The simulator passes the same checks as the GPUs do (`tests/gpu/mod.rs`): every built-in
/// kernel against its CPU reference, on sizes that are not a multiple of the block, and a
/// large round trip with an odd tail.
#[test]
fn the_simulator_passes_the_gpu_conformance_checks_of_kernels_and_copies() {
    let backend = SimBackend::new(1, 256 << 20);
    let mut ctx = backend.open(0, 0).expect("opens");
    let m = gpu::builtin(&mut *ctx);
    gpu::check_builtin_kernels(&mut *ctx, "sim", m);
    gpu::check_large_round_trip(&mut *ctx);
    gpu::check_durable_buffers_and_tasks(&mut *ctx, m);
}

/// A `gemv` launched with fewer threads than rows computes only the rows it has threads
/// for, as a GPU would; the rest of `y` is left as it was.
#[test]
fn gemv_with_fewer_threads_than_rows_computes_only_those_rows() {
    let backend = SimBackend::new(1, 1 << 20);
    let mut ctx = backend.open(0, 0).expect("opens");
    let app = Origin::Application;
    let m = gpu::builtin(&mut *ctx);
    let (rows, cols) = (300u32, 3u32);
    let w: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
    let (bw, bx, bb, by) = (
        gpu::alloc(&mut *ctx, 4 * u64::from(rows * cols)),
        gpu::alloc(&mut *ctx, 4 * u64::from(cols)),
        gpu::alloc(&mut *ctx, 4 * u64::from(rows)),
        gpu::alloc(&mut *ctx, 4 * u64::from(rows)),
    );
    gpu::upload(&mut *ctx, bw, f32_bytes(&w));
    gpu::upload(&mut *ctx, bx, f32_bytes(&[1.0, 2.0, 3.0]));
    gpu::upload(&mut *ctx, bb, f32_bytes(&vec![0.5; rows as usize]));
    gpu::upload(&mut *ctx, by, f32_bytes(&vec![-7.0; rows as usize]));
    let launch = Op::Launch {
        module: m,
        function: "gemv".into(),
        grid: Dim3::x(1),
        block: Dim3::x(256),
        shared_mem_bytes: 0,
        args: vec![
            KernelArg::Buffer(bw),
            KernelArg::Buffer(bx),
            KernelArg::Buffer(bb),
            KernelArg::Buffer(by),
            KernelArg::U32(rows),
            KernelArg::U32(cols),
        ],
    };
    ctx.execute(&launch, app).expect("launch");
    let y = f32s(&gpu::download(&mut *ctx, by, 4 * u64::from(rows)));
    let want = reference::gemv(&w, &[1.0, 2.0, 3.0], &vec![0.5; 256], 256, 3);
    assert_eq!(&y[..256], &want[..]);
    assert_eq!(y[1], 0.5 + 3.0 + 8.0 + 15.0, "row 1: 3·1 + 4·2 + 5·3 + 0.5");
    assert!(
        y[256..].iter().all(|v| *v == -7.0),
        "rows without a thread are untouched"
    );
}
