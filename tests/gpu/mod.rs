//! What the GPU conformance tests of both backends (`tests/gpu_cuda.rs`, `tests/gpu_hip.rs`)
//! share: ops on a context, the child processes of the tests that fault the GPU, and the
//! check of the built-in kernels against their CPU references.
#![allow(dead_code, unreachable_pub)]

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use hipvisor_core::GpuError;
use hipvisor_core::backend::{DeviceContext, Origin};
use hipvisor_core::ipc;
use hipvisor_core::kernels::{SAXPY_TOLERANCE_ULPS, f32_bytes, f32s, reference, u32_bytes, u32s, within_ulps};
use hipvisor_core::op::{BufferHandle, DeviceInfo, Dim3, KernelArg, ModuleHandle, ModuleSource, Op, Payload, Reply};

pub fn run(ctx: &mut dyn DeviceContext, op: Op) -> Result<Reply, GpuError> {
    ctx.execute(&op, Origin::Application)
}

pub fn alloc(ctx: &mut dyn DeviceContext, bytes: u64) -> BufferHandle {
    match run(ctx, Op::Alloc { bytes }).expect("alloc") {
        Reply::Buffer(b) => b,
        r => panic!("alloc answered {r:?}"),
    }
}

pub fn info(ctx: &mut dyn DeviceContext) -> DeviceInfo {
    match run(ctx, Op::DeviceInfo).expect("device info") {
        Reply::DeviceInfo(i) => i,
        r => panic!("device info answered {r:?}"),
    }
}

pub fn load(ctx: &mut dyn DeviceContext, source: ModuleSource) -> Result<ModuleHandle, GpuError> {
    run(ctx, Op::LoadModule { source }).map(|r| match r {
        Reply::Module(m) => m,
        r => panic!("load answered {r:?}"),
    })
}

pub fn builtin(ctx: &mut dyn DeviceContext) -> ModuleHandle {
    load(ctx, ModuleSource::Builtin).expect("load the built-in kernels")
}

pub fn upload(ctx: &mut dyn DeviceContext, dst: BufferHandle, data: Vec<u8>) {
    run(
        ctx,
        Op::CopyToDevice {
            dst,
            offset: 0,
            data: data.into(),
        },
    )
    .expect("copy to device");
}

pub fn download(ctx: &mut dyn DeviceContext, src: BufferHandle, len: u64) -> Vec<u8> {
    match run(ctx, Op::CopyFromDevice { src, offset: 0, len }).expect("copy from device") {
        Reply::Data(d) => d.as_bytes().to_vec(),
        r => panic!("copy from device answered {r:?}"),
    }
}

pub fn launch(module: ModuleHandle, function: &str, n: u32, shared_mem_bytes: u32, args: Vec<KernelArg>) -> Op {
    Op::Launch {
        module,
        function: function.into(),
        grid: Dim3::x(n.div_ceil(256).max(1)),
        block: Dim3::x(256),
        shared_mem_bytes,
        args,
    }
}

pub fn fill(module: ModuleHandle, b: BufferHandle, value: u32, n: u32, shared: u32) -> Op {
    launch(
        module,
        "fill",
        n,
        shared,
        vec![KernelArg::Buffer(b), KernelArg::U32(value), KernelArg::U32(n)],
    )
}

/// An outcome as text: `ok`, or the class and code (`sticky 700`).
pub fn class(r: &Result<Reply, GpuError>) -> String {
    match r {
        Ok(_) => "ok".into(),
        Err(e) => format!("{} {}", e.class(), e.code().map_or(0, |(_, c)| c)),
    }
}

/// Whether this process is the child for `test`.
pub fn is_child(test: &str) -> bool {
    std::env::var("HV_GPU_CHILD").as_deref() == Ok(test)
}

/// Records what the child has seen so far: one `RESULT` line holding all of it.
pub struct Record(pub serde_json::Map<String, serde_json::Value>);

impl Record {
    pub fn new() -> Record {
        Record(serde_json::Map::new())
    }

    pub fn set(&mut self, key: &str, value: impl Into<serde_json::Value>) {
        self.0.insert(key.to_string(), value.into());
        println!("RESULT {}", serde_json::Value::Object(self.0.clone()));
    }
}

/// How a child ended.
pub struct Child {
    pub status: std::process::ExitStatus,
    /// The last `RESULT` line (everything recorded before the end).
    pub result: serde_json::Value,
    pub stderr: String,
}

impl Child {
    pub fn aborted(&self) -> bool {
        ipc::aborted(self.status)
    }
}

/// Runs `test`'s faulting part in a child process and returns how it ended. The child is
/// killed after `limit`: a hang fails the test. A panic in the child (exit status 101) fails
/// it too.
pub fn in_child(test: &str, limit: Duration) -> Child {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", test, "--ignored", "--nocapture", "--test-threads=1"])
        .env("HV_GPU_CHILD", test)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let drain = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = pipe.read_to_string(&mut text);
            text
        })
    };
    let out = drain(Box::new(child.stdout.take().unwrap()));
    let err = drain(Box::new(child.stderr.take().unwrap()));
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            let (out, err) = (out.join().unwrap(), err.join().unwrap());
            panic!("{test}: the child did not finish within {limit:?} (a hang)\nstdout:\n{out}\nstderr:\n{err}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let (out, stderr) = (out.join().unwrap(), err.join().unwrap());
    let result = out
        .lines()
        .rev()
        // A line may begin with libtest's `test name ... ` before the child's output.
        .find_map(|l| l.find("RESULT ").map(|at| &l[at + "RESULT ".len()..]))
        .map(|j| serde_json::from_str(j).unwrap())
        .unwrap_or(serde_json::Value::Null);
    println!(
        "{test}: child {}; RESULT {result}",
        ipc::describe_exit(status).replacen("worker ", "", 1)
    );
    Child { status, result, stderr }
}

/// Runs `fill`, `vector_add`, `saxpy`, `scale`, `checksum` and `relu` of module `m` (`what`
/// names it in messages) on 1,000,003 elements — not a multiple of the block — and `gemv` on a
/// 4,099 × 513 matrix, and checks each against its CPU reference (`saxpy` within its stated
/// ULPs, the others exactly).
pub fn check_builtin_kernels(ctx: &mut dyn DeviceContext, what: &str, m: ModuleHandle) {
    let n: u32 = 1_000_003;
    let x: Vec<f32> = (0..n).map(|i| (i % 1000) as f32 * 0.37 - 100.0).collect();
    let y: Vec<f32> = (0..n).map(|i| (i % 777) as f32 * -1.3 + 7.0).collect();
    let bytes = 4 * n as u64;
    let (bx, by, bo) = (alloc(ctx, bytes), alloc(ctx, bytes), alloc(ctx, bytes));
    upload(ctx, bx, f32_bytes(&x));
    upload(ctx, by, f32_bytes(&y));

    run(ctx, fill(m, bo, 0xABCD_0123, n, 0)).unwrap();
    let mut want = vec![0u32; n as usize];
    reference::fill(&mut want, 0xABCD_0123);
    assert_eq!(u32s(&download(ctx, bo, bytes)), want, "{what} fill");

    let args = vec![
        KernelArg::Buffer(bx),
        KernelArg::Buffer(by),
        KernelArg::Buffer(bo),
        KernelArg::U32(n),
    ];
    run(ctx, launch(m, "vector_add", n, 0, args)).unwrap();
    assert_eq!(
        f32s(&download(ctx, bo, bytes)),
        reference::vector_add(&x, &y),
        "{what} vector_add"
    );

    let args = vec![
        KernelArg::F32(2.5),
        KernelArg::Buffer(bx),
        KernelArg::Buffer(by),
        KernelArg::U32(n),
    ];
    run(ctx, launch(m, "saxpy", n, 0, args)).unwrap();
    let mut want = y.clone();
    reference::saxpy(2.5, &x, &mut want);
    for (i, (g, w)) in f32s(&download(ctx, by, bytes)).iter().zip(&want).enumerate() {
        assert!(
            within_ulps(*g, *w, SAXPY_TOLERANCE_ULPS),
            "{what} saxpy[{i}]: {g} vs {w}"
        );
    }

    let args = vec![KernelArg::Buffer(bx), KernelArg::F32(-0.5), KernelArg::U32(n)];
    run(ctx, launch(m, "scale", n, 0, args)).unwrap();
    let mut want = x.clone();
    reference::scale(&mut want, -0.5);
    assert_eq!(f32s(&download(ctx, bx, bytes)), want, "{what} scale");

    let data: Vec<u32> = (0..n).map(|i| i.wrapping_mul(2_654_435_761)).collect();
    let (bd, bsum) = (alloc(ctx, bytes), alloc(ctx, 8));
    upload(ctx, bd, u32_bytes(&data));
    let zero = Op::Memset {
        buffer: bsum,
        offset: 0,
        len: 8,
        value: 0,
    };
    run(ctx, zero).unwrap();
    let args = vec![KernelArg::Buffer(bd), KernelArg::U32(n), KernelArg::Buffer(bsum)];
    run(ctx, launch(m, "checksum", n, 0, args)).unwrap();
    let sum = u64::from_le_bytes(download(ctx, bsum, 8).try_into().unwrap());
    assert_eq!(sum, reference::checksum(&data), "{what} checksum");

    // relu, in place, on values of both signs from `y`, and the special ones up front (a
    // `max` instruction or flushed denormals would differ on them).
    let mut y = y.clone();
    let tiny = f32::MIN_POSITIVE / 2.0;
    y[..8].copy_from_slice(&[
        -0.0,
        0.0,
        f32::NAN,
        -f32::NAN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        tiny,
        -tiny,
    ]);
    upload(ctx, by, f32_bytes(&y));
    let args = vec![KernelArg::Buffer(by), KernelArg::U32(n)];
    run(ctx, launch(m, "relu", n, 0, args)).unwrap();
    let mut want = y.clone();
    reference::relu(&mut want);
    let got = f32s(&download(ctx, by, bytes));
    assert!(
        got.iter().map(|v| v.to_bits()).eq(want.iter().map(|v| v.to_bits())),
        "{what} relu"
    );

    // gemv: y = W x + b, rows not a multiple of the block.
    let (rows, cols) = (4_099u32, 513u32);
    let w: Vec<f32> = (0..rows * cols).map(|i| ((i % 997) as f32 - 498.0) * 0.013).collect();
    let xv: Vec<f32> = (0..cols).map(|j| (j % 31) as f32 * 0.25 - 3.0).collect();
    let bv: Vec<f32> = (0..rows).map(|i| (i % 7) as f32 - 3.0).collect();
    let (bw, bxv, bb, byv) = (
        alloc(ctx, 4 * u64::from(rows * cols)),
        alloc(ctx, 4 * u64::from(cols)),
        alloc(ctx, 4 * u64::from(rows)),
        alloc(ctx, 4 * u64::from(rows)),
    );
    upload(ctx, bw, f32_bytes(&w));
    upload(ctx, bxv, f32_bytes(&xv));
    upload(ctx, bb, f32_bytes(&bv));
    let args = vec![
        KernelArg::Buffer(bw),
        KernelArg::Buffer(bxv),
        KernelArg::Buffer(bb),
        KernelArg::Buffer(byv),
        KernelArg::U32(rows),
        KernelArg::U32(cols),
    ];
    run(ctx, launch(m, "gemv", rows, 0, args)).unwrap();
    let want = reference::gemv(&w, &xv, &bv, rows as usize, cols as usize);
    let got = f32s(&download(ctx, byv, 4 * u64::from(rows)));
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g.to_bits(), w.to_bits(), "{what} gemv[{i}]: {g} vs {w}");
    }

    for b in [bx, by, bo, bd, bsum, bw, bxv, bb, byv] {
        run(ctx, Op::Free { buffer: b }).unwrap();
    }
    println!("{what}: fill, vector_add, saxpy, scale, checksum, relu and gemv match the CPU references");
}

/// A 130 MiB + 3 byte round trip (two staging buffers and an odd tail) is byte-exact, and
/// a read of the last 5 bytes alone too; prints the pageable transfer rates.
pub fn check_large_round_trip(ctx: &mut dyn DeviceContext) {
    let len = (130 << 20) + 3;
    let data: Vec<u8> = (0..len)
        .map(|i| (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(17) as u8)
        .collect();
    let b = alloc(ctx, len as u64);
    let t = Instant::now();
    upload(ctx, b, data.clone());
    let up = t.elapsed();
    let t = Instant::now();
    let back = download(ctx, b, len as u64);
    let down = t.elapsed();
    println!(
        "{len} bytes: host to device {:.1} GB/s, device to host {:.1} GB/s (pageable, staged)",
        len as f64 / up.as_secs_f64() / 1e9,
        len as f64 / down.as_secs_f64() / 1e9
    );
    assert!(back == data, "byte-for-byte round trip");
    let tail = Op::CopyFromDevice {
        src: b,
        offset: len as u64 - 5,
        len: 5,
    };
    assert!(matches!(run(ctx, tail).unwrap(), Reply::Data(d) if d.as_bytes() == &data[len - 5..]));
}

/// 256 MiB of page-aligned shared memory (a memfd, as a worker's is) registered as pinned
/// memory (`call` names the backend's registration call in the message) copies to the
/// device byte-exact; unregistering it twice is harmless. Prints both transfer rates.
pub fn check_host_memory_registration(ctx: &mut dyn DeviceContext, call: &str) {
    let len = 256 << 20;
    let mut region = ipc::Region::new(len).unwrap();
    for (i, b) in region.as_mut_slice().iter_mut().enumerate() {
        *b = (i * 7 + 3) as u8;
    }
    let region = std::sync::Arc::new(region);
    assert_eq!(region.as_slice().as_ptr() as usize % 4096, 0, "page-aligned");
    let b = alloc(ctx, len as u64);
    // Unregistered: staged through the pinned buffer.
    let t = Instant::now();
    upload(ctx, b, region.as_slice().to_vec());
    let staged = len as f64 / t.elapsed().as_secs_f64() / 1e9;
    assert!(ctx.register_host_memory(region.as_slice()), "{call} took");
    let t = Instant::now();
    let copy = Op::CopyToDevice {
        dst: b,
        offset: 0,
        data: Payload::shared(region.clone()),
    };
    run(ctx, copy).unwrap();
    let pinned = len as f64 / t.elapsed().as_secs_f64() / 1e9;
    println!("host to device, {len} bytes: registered {pinned:.1} GB/s, pageable through staging {staged:.1} GB/s");
    assert!(download(ctx, b, len as u64) == region.as_slice());
    ctx.unregister_host_memory(region.as_slice());
    ctx.unregister_host_memory(region.as_slice()); // twice is harmless
}

/// Durable buffers and tasks on a real context: a durable buffer made, filled again in
/// place and freed; a task (`relu(W x + b)` with durable weights and a scratch input) run
/// as its ops, its result against the CPU reference, its scratch freed (mem-info before and
/// after); a forged durable handle refused.
pub fn check_durable_buffers_and_tasks(ctx: &mut dyn DeviceContext, m: ModuleHandle) {
    use hipvisor_core::backend::task::run_task;
    use hipvisor_core::op::task::{TaskArg, TaskInput, TaskLaunch, TaskOp, TaskOutput};
    let (rows, cols) = (300usize, 70usize);
    let w: Vec<f32> = (0..rows * cols).map(|i| ((i * 7) % 11) as f32 * 0.25 - 1.0).collect();
    let b: Vec<f32> = (0..rows).map(|i| (i % 5) as f32 - 2.0).collect();
    let x: Vec<f32> = (0..cols).map(|i| (i % 3) as f32 - 1.0).collect();
    let durable =
        |ctx: &mut dyn DeviceContext, id: u64, data: Vec<u8>| match run(ctx, Op::Durable { id, data: data.into() })
            .expect("a durable buffer")
        {
            Reply::Buffer(h) => {
                assert!(h.is_durable() && h.id == id);
                h
            }
            other => panic!("{other:?}"),
        };
    let base = hipvisor_core::DURABLE_ID_BASE;
    let free_now = |ctx: &mut dyn DeviceContext| match run(ctx, Op::MemInfo).unwrap() {
        Reply::MemInfo(mi) => mi.free,
        other => panic!("{other:?}"),
    };
    let dw = durable(ctx, base + 1, f32_bytes(&w));
    let db = durable(ctx, base + 2, vec![0; rows * 4]);
    // Filled again under the same id (a standby catching up): in place, no new memory.
    let free = free_now(ctx);
    let db = {
        let again = durable(ctx, base + 2, f32_bytes(&b));
        assert_eq!(again, db);
        again
    };
    assert_eq!(free_now(ctx), free, "filled in place");
    let task = TaskOp {
        scratch: vec![(cols * 4) as u64, (rows * 4) as u64],
        inputs: vec![TaskInput {
            scratch: 0,
            offset: 0,
            data: f32_bytes(&x).into(),
        }],
        launches: vec![
            TaskLaunch {
                module: m,
                function: "gemv".into(),
                grid: Dim3::x(rows.div_ceil(128) as u32),
                block: Dim3::x(128),
                shared_mem_bytes: 0,
                args: vec![
                    TaskArg::Durable(dw),
                    TaskArg::Scratch(0),
                    TaskArg::Durable(db),
                    TaskArg::Scratch(1),
                    TaskArg::Value(KernelArg::U32(rows as u32)),
                    TaskArg::Value(KernelArg::U32(cols as u32)),
                ],
            },
            TaskLaunch {
                module: m,
                function: "relu".into(),
                grid: Dim3::x(rows.div_ceil(128) as u32),
                block: Dim3::x(128),
                shared_mem_bytes: 0,
                args: vec![TaskArg::Scratch(1), TaskArg::Value(KernelArg::U32(rows as u32))],
            },
        ],
        outputs: vec![TaskOutput {
            scratch: 1,
            offset: 0,
            len: (rows * 4) as u64,
        }],
        source: None,
    };
    let mut ops = 0;
    let out = run_task(ctx, &task, hipvisor_core::Origin::Application, &mut |_| ops += 1).expect("the task runs");
    assert_eq!(ops, 6, "two allocations, an input, two launches, an output: {ops}");
    let mut want = reference::gemv(&w, &x, &b, rows, cols);
    reference::relu(&mut want);
    match out {
        Reply::Outputs(o) => {
            assert_eq!(o.len(), 1);
            let got = f32s(o[0].as_bytes());
            for (i, (g, e)) in got.iter().zip(&want).enumerate() {
                assert!((g - e).abs() <= 1e-4 * e.abs().max(1.0), "row {i}: {g} vs {e}");
            }
        }
        other => panic!("{other:?}"),
    }
    match run(ctx, Op::MemInfo).unwrap() {
        Reply::MemInfo(mi) => assert_eq!(mi.free, free, "the task's scratch was freed"),
        other => panic!("{other:?}"),
    }
    // A durable handle forged from an ordinary buffer is refused.
    let plain = alloc(ctx, 64);
    let forged = BufferHandle {
        epoch: BufferHandle::DURABLE_EPOCH,
        ..plain
    };
    let r = run(
        ctx,
        Op::CopyFromDevice {
            src: forged,
            offset: 0,
            len: 4,
        },
    );
    assert_eq!(class(&r), "invalid_request 0", "{r:?}");
    for h in [dw, db, plain] {
        run(ctx, Op::Free { buffer: h }).expect("freed");
    }
    println!("durable buffers and tasks: ok (gemv {rows}x{cols} + relu in one task)");
}
