//! Criterion benches for the core's hot paths: backoff, classification, the IPC frame codec.
//! `cargo bench -p hipvisor-core`.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use hipvisor_core::error::{Api, classify};
use hipvisor_core::ipc::{FromWorker, Request, ToWorker, decode, encode};
use hipvisor_core::{BufferHandle, Jitter, Op, OpKind, Origin, Payload, Reply, RetryConfig, RetryPolicy};
use rand::SeedableRng;

fn backoff(c: &mut Criterion) {
    let policy = RetryPolicy::new(RetryConfig::new().with_max_retries(8).with_jitter(Jitter::Full)).unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    c.bench_function("backoff: a fresh backoff and its 8 delays", |b| {
        b.iter(|| {
            let mut backoff = policy.backoff(black_box(OpKind::Launch));
            while let Some(d) = backoff.next_delay(&mut rng) {
                black_box(d);
            }
        })
    });
}

fn classification(c: &mut Criterion) {
    c.bench_function("classify: 16 HIP and CUDA codes", |b| {
        b.iter(|| {
            for code in [
                1, 2, 3, 46, 100, 200, 218, 400, 500, 600, 700, 701, 719, 801, 999, 12345,
            ] {
                black_box(classify(Api::Hip, black_box(code)));
                black_box(classify(Api::CudaDriver, black_box(code)));
            }
        })
    });
}

fn codec(c: &mut Criterion) {
    let buffer = BufferHandle {
        device: 1,
        epoch: 2,
        id: 3,
        len: 4096,
    };
    let request = ToWorker::Request(Request {
        id: 42,
        op: Op::CopyToDevice {
            dst: buffer,
            offset: 0,
            data: Payload::from(vec![7u8; 256]),
        },
        origin: Origin::Application,
        fault: None,
        task_faults: Vec::new(),
        input: None,
        output: None,
        linger_us: 0,
    });
    let frame = encode(&request).unwrap();
    c.bench_function("codec: encode a request with 256 inline bytes", |b| {
        b.iter(|| encode(black_box(&request)))
    });
    c.bench_function("codec: decode it", |b| b.iter(|| decode::<ToWorker>(black_box(&frame))));
    let response = FromWorker::Response {
        id: 42,
        result: Ok(Reply::Done),
        output_len: None,
    };
    let frame = encode(&response).unwrap();
    c.bench_function("codec: decode a response", |b| {
        b.iter(|| decode::<FromWorker>(black_box(&frame)))
    });
}

criterion_group!(benches, backoff, classification, codec);
criterion_main!(benches);
