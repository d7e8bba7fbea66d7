//! Micro-benchmarks of pitboss's per-request hot paths, none of which needs a Python
//! worker: the wire codec, worker selection, session routing, the rollout split and
//! error classification.
//!
//! Run with `cargo bench --bench micro`; `cargo bench --bench micro -- --test` runs
//! each benchmark once as a smoke test. Every benchmark is kept short (0.5 s warm-up,
//! 2 s measurement, 30 samples) so the whole file runs in about two minutes.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use tokio_util::codec::{Decoder, Encoder};

use pitboss::pool::select::{pick, Candidate, Target};
use pitboss::pool::{PoolError, SessionTable};
use pitboss::resilience::{classify, ErrorClass, ExceptionRules};
use pitboss::rollout::flags::session_route;
use pitboss::rollout::{bucket, route, Flags};
use pitboss::worker::frame::{
    decode_frame, CallIds, ContextBackend, Frame, FrameCodec, RequestContext, RequestFrame,
};
use pitboss::worker::WorkerId;

/// Payload sizes for the codec benchmarks, with their labels.
const SIZES: [(&str, usize); 4] = [
    ("64B", 64),
    ("1KiB", 1024),
    ("64KiB", 64 * 1024),
    ("1MiB", 1024 * 1024),
];

fn payload(len: usize) -> Bytes {
    Bytes::from((0..len).map(|i| (i % 251) as u8).collect::<Vec<u8>>())
}

/// `Frame` and `&Frame` both implement `Encoder`; the pool encodes by reference.
fn encode(codec: &mut FrameCodec, frame: &Frame, dst: &mut BytesMut) {
    <FrameCodec as Encoder<&Frame>>::encode(codec, frame, dst).expect("frame encodes");
}

/// A `REQUEST` frame encoded into a reused write buffer (cleared, so no allocation
/// in the steady state: the cost is the header plus copying the payload).
fn frame_encode(c: &mut Criterion) {
    let mut group = c.benchmark_group("frame_encode");
    for (label, size) in SIZES {
        let frame = Frame::Request(RequestFrame {
            id: 42,
            command: "echo".into(),
            session_id: String::new(),
            content_type: "application/json".into(),
            timeout_ms: 1000,
            // What every Bridge call carries: a 16-hex-digit request id, no trace.
            context: Some(RequestContext {
                ids: std::sync::Arc::new(CallIds {
                    request_id: "0123456789abcdef".into(),
                    ..CallIds::default()
                }),
                attempt: 1,
                backend: ContextBackend::Legacy,
            }),
            payload: payload(size),
        });
        let mut codec = FrameCodec::default();
        let mut buf = BytesMut::new();
        encode(&mut codec, &frame, &mut buf);
        group.throughput(Throughput::Bytes(buf.len() as u64));
        group.bench_with_input(BenchmarkId::from_parameter(label), &frame, |b, frame| {
            b.iter(|| {
                buf.clear();
                encode(&mut codec, black_box(frame), &mut buf);
                black_box(buf.len())
            })
        });
    }
    group.finish();
}

/// The wire bytes of a `RESPONSE` frame carrying `size` bytes of payload.
fn response_wire(size: usize) -> Bytes {
    let frame = Frame::Response {
        id: 42,
        content_type: "application/json".into(),
        payload: payload(size),
    };
    let mut buf = BytesMut::new();
    encode(&mut FrameCodec::default(), &frame, &mut buf);
    buf.freeze()
}

/// Decoding a `RESPONSE` frame, two ways.
///
/// `frame_decode` is the connection's read path: the wire bytes are appended to a read
/// buffer (the copy a socket read does) and `FrameCodec::decode` takes one frame out.
/// The buffer is reused, so in the steady state no allocation happens besides the
/// decoded frame's own (`content_type` string, the shared-buffer header).
///
/// `frame_decode_body` is `decode_frame` alone on an already-split frame (a `Bytes`
/// clone is a reference-count bump): the payload is sliced, never copied, so its time
/// does not grow with the payload and its "throughput" is frame bytes handled per
/// second, not memory bandwidth.
///
/// Cloning a prepared `BytesMut` per iteration with `iter_batched` was not used: the
/// clone is untimed, so criterion would size the run by the ~100 ns decode and spend
/// hours copying 1 MiB buffers in setup.
fn frame_decode(c: &mut Criterion) {
    let mut group = c.benchmark_group("frame_decode");
    for (label, size) in SIZES {
        let wire = response_wire(size);
        let mut codec = FrameCodec::default();
        let mut buf = BytesMut::with_capacity(2 * wire.len());
        group.throughput(Throughput::Bytes(wire.len() as u64));
        group.bench_with_input(BenchmarkId::from_parameter(label), &wire, |b, wire| {
            b.iter(|| {
                buf.extend_from_slice(wire);
                let frame = codec.decode(&mut buf).expect("valid frame");
                black_box(frame.expect("a whole frame"))
            })
        });
    }
    group.finish();

    let mut group = c.benchmark_group("frame_decode_body");
    for (label, size) in SIZES {
        let wire = response_wire(size);
        let body = wire.slice(4..);
        group.throughput(Throughput::Bytes(wire.len() as u64));
        group.bench_with_input(BenchmarkId::from_parameter(label), &body, |b, body| {
            b.iter(|| black_box(decode_frame(black_box(body).clone()).expect("valid frame")))
        });
    }
    group.finish();
}

/// 64 workers with mixed load: some full, a few draining or ejected.
fn candidates() -> Vec<Candidate> {
    (0..64u64)
        .map(|i| Candidate {
            id: WorkerId(i),
            accepting: i % 13 != 5,
            in_flight: ((i * 7) % 5) as u32,
            max_in_flight: 4,
            served: (i * 7919) % 1000,
            ejected: i % 17 == 3,
        })
        .collect()
}

fn select(c: &mut Criterion) {
    let ws = candidates();
    assert!(pick(&ws, Target::Exactly(WorkerId(40))).is_some());
    let mut group = c.benchmark_group("select_64_workers");
    group.bench_function("any", |b| {
        b.iter(|| pick(black_box(&ws), black_box(Target::any())))
    });
    group.bench_function("any_avoid", |b| {
        let t = Target::Any {
            avoid: Some(WorkerId(1)),
        };
        b.iter(|| pick(black_box(&ws), black_box(t)))
    });
    group.bench_function("exactly", |b| {
        b.iter(|| pick(black_box(&ws), black_box(Target::Exactly(WorkerId(40)))))
    });
    group.finish();
}

/// A session id like `SessionTable::new_id` makes (32 hex digits), but deterministic.
fn session_id(i: u64) -> String {
    let mut h = i.wrapping_add(0x9e37_79b9_7f4a_7c15);
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^= h >> 31;
    format!("{:016x}{:016x}", h, i)
}

/// `SessionTable::route` is what the pool calls per session request (it also
/// refreshes the idle timer); `get` is the admin/`GetSession` read.
fn sessions(c: &mut Criterion) {
    const N: u64 = 100_000;
    let table = SessionTable::new(Duration::from_secs(3600), 200_000);
    let ids: Vec<String> = (0..N).map(session_id).collect();
    for (i, id) in ids.iter().enumerate() {
        table
            .insert(id.clone(), WorkerId(i as u64 % 64), BTreeMap::new())
            .expect("unique id");
    }
    assert_eq!(table.len(), N as usize);
    let hot = ids[12_345].clone();
    let missing = session_id(N + 1);

    let mut group = c.benchmark_group("sessions_100k");
    group.bench_function("route_same_id", |b| {
        b.iter(|| table.route(black_box(&hot)).expect("live session"))
    });
    group.bench_function("route_rotating_ids", |b| {
        // Walks the ids with a large odd stride so consecutive lookups hit other shards.
        let mut i = 0usize;
        b.iter(|| {
            i = (i + 7_919) % ids.len();
            table.route(black_box(&ids[i])).expect("live session")
        })
    });
    group.bench_function("route_missing", |b| {
        b.iter(|| black_box(table.route(black_box(&missing)).is_err()))
    });
    group.bench_function("get", |b| {
        b.iter(|| table.get(black_box(&hot)).expect("live session"))
    });
    group.finish();
}

fn rollout(c: &mut Criterion) {
    let flags = Flags::parse(
        "bench",
        "mode = \"canary\"\npercent = 10.0\ncommands = [\"*\"]\n",
    )
    .expect("valid flags");
    let mut group = c.benchmark_group("rollout");
    group.bench_function("bucket", |b| {
        b.iter(|| bucket(black_box("salt"), black_box("user-12345")))
    });
    group.bench_function("route_keyed", |b| {
        b.iter(|| {
            route(
                black_box(&flags),
                black_box("echo"),
                black_box(Some("user-12345")),
                true,
                0,
            )
        })
    });
    group.bench_function("route_unkeyed", |b| {
        b.iter(|| {
            route(
                black_box(&flags),
                black_box("echo"),
                None,
                true,
                black_box(4321),
            )
        })
    });
    group.bench_function("session_route", |b| {
        b.iter(|| session_route(black_box(&flags), black_box("user-12345")))
    });
    group.finish();
}

fn classification(c: &mut Criterion) {
    let defaults = ExceptionRules::default();
    let custom = ExceptionRules::with(vec![(
        "mylib.RateLimited".into(),
        ErrorClass::PoolExhausted,
    )]);
    let value_error = PoolError::PythonException {
        worker: WorkerId(1),
        error_type: "ValueError".into(),
        message: "x".into(),
        traceback: String::new(),
    };
    let crashed = PoolError::WorkerCrashed {
        worker: WorkerId(1),
        detail: "exit code 1".into(),
        sent: true,
    };
    let rate_limited = PoolError::PythonException {
        worker: WorkerId(1),
        error_type: "mylib.RateLimited".into(),
        message: "x".into(),
        traceback: String::new(),
    };
    let unknown = PoolError::PythonException {
        worker: WorkerId(1),
        error_type: "mylib.SomethingElse".into(),
        message: "x".into(),
        traceback: String::new(),
    };
    assert_eq!(classify(&rate_limited, &custom), ErrorClass::PoolExhausted);
    assert_eq!(classify(&unknown, &custom), ErrorClass::PythonException);

    let mut group = c.benchmark_group("classify");
    group.bench_function("python_value_error", |b| {
        b.iter(|| classify(black_box(&value_error), black_box(&defaults)))
    });
    group.bench_function("worker_crashed", |b| {
        b.iter(|| classify(black_box(&crashed), black_box(&defaults)))
    });
    group.bench_function("custom_rule_hit", |b| {
        b.iter(|| classify(black_box(&rate_limited), black_box(&custom)))
    });
    group.bench_function("unknown_type", |b| {
        b.iter(|| classify(black_box(&unknown), black_box(&custom)))
    });
    group.bench_function("row", |b| {
        b.iter(|| black_box(ErrorClass::WorkerCrashed).row().code)
    });
    group.bench_function("retryable", |b| {
        b.iter(|| black_box(ErrorClass::WorkerCrashed).retryable(black_box(true)))
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30);
    targets = frame_encode, frame_decode, select, sessions, rollout, classification
}
criterion_main!(benches);
