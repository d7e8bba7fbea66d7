//! The benchmark harness behind `pitboss bench`: a load generator, and the baselines
//! pitboss is measured against (see `BENCHMARKS.md`).
//!
//! * [`Floor`]: Rust driving the same Python workers directly over pitboss's frames,
//!   with no gRPC, no pool, no routing and no layers: the cost of Python and the pipe.
//! * [`CeilingBridge`]: a tonic `pitboss.v1.Bridge` that answers without Python: the
//!   cost of gRPC itself.
//! * Any Bridge server (pitboss, the grpcio peer in `benches/peers/`, the ceiling)
//!   through [`Target::Grpc`].
//!
//! Latencies go into an HDR histogram (1 µs to 60 s, 3 significant digits).

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tokio_util::codec::FramedRead;
use tonic::transport::Channel;

use pitboss::grpc::pb;
use pitboss::grpc::pb::bridge_client::BridgeClient;
use pitboss::pool::PoolConfig;
use pitboss::worker::frame::{Frame, FrameCodec, RequestFrame};
use pitboss::worker::{Outbox, OutboxHandle, WorkerSpec};

/// What one run sends.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    /// Calls in flight at once.
    pub concurrency: usize,
    /// Stop after this many calls ...
    pub requests: Option<u64>,
    /// ... or after this long (whichever comes first; at least one must be set).
    pub duration: Option<Duration>,
    /// Calls before measuring starts (not counted).
    pub warmup: Duration,
    pub command: String,
    pub payload: Bytes,
    /// 0: no sessions; else calls go round-robin over this many sessions.
    pub sessions: usize,
    /// Use ExecuteStream and read every chunk.
    pub stream: bool,
    /// Mark calls idempotent.
    pub idempotent: bool,
}

/// The bytes that `hex` spells (`--payload-hex 08021003`).
pub fn payload_of_hex(hex: &str) -> Result<Bytes, String> {
    let bad = || format!("--payload-hex {hex:?}: not an even count of hex digits");
    if hex.len() % 2 != 0 {
        return Err(bad());
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| {
            hex.get(i..i + 2)
                .and_then(|d| u8::from_str_radix(d, 16).ok())
                .ok_or_else(bad)
        })
        .collect::<Result<Vec<u8>, String>>()
        .map(Bytes::from)
}

/// A JSON payload of about `size` bytes: `{"p":"xxx..."}`.
pub fn payload_of_size(size: usize) -> Bytes {
    let pad = size.saturating_sub(8);
    Bytes::from(format!("{{\"p\":\"{}\"}}", "x".repeat(pad)))
}

/// One run's results.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub target: String,
    pub command: String,
    pub concurrency: usize,
    pub sessions: usize,
    pub payload_bytes: usize,
    pub requests: u64,
    pub errors: u64,
    pub elapsed_s: f64,
    pub rps: f64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
    /// The first error seen, if any.
    pub first_error: Option<String>,
    /// CPU time per measured request, in µs (user + system, from `/proc`): the
    /// server process (`--cpu-pid`; for the floor, none: its driver is this
    /// process), the server's descendants (its Python workers; for the floor, this
    /// process's workers), and this load generator itself.
    pub cpu_server_us_per_req: Option<f64>,
    pub cpu_workers_us_per_req: Option<f64>,
    pub cpu_client_us_per_req: Option<f64>,
}

/// CPU time used so far by a process, its descendants, and this process.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuSample {
    pub server: Duration,
    pub workers: Duration,
    pub client: Duration,
}

impl CpuSample {
    /// Now, for server `pid` (and its descendants); with `None`, the workers are this
    /// process's descendants (the floor drives its own).
    pub fn take(pid: Option<u32>) -> CpuSample {
        let me = std::process::id();
        let root = pid.unwrap_or(me);
        let workers = descendants(root).into_iter().map(cpu_of).sum();
        CpuSample {
            server: pid.map(cpu_of).unwrap_or_default(),
            workers,
            client: cpu_of(me),
        }
    }
}

/// User + system CPU time of one process (all its threads), from `/proc/PID/stat`.
pub fn cpu_of(pid: u32) -> Duration {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return Duration::ZERO;
    };
    // The command name may hold spaces: the fields start after its closing paren.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    // After the name: state(0) ppid(1) ... utime(11) stime(12).
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i)?.parse::<u64>().ok())
        .sum();
    // SAFETY: sysconf only reads a system constant.
    let per_sec = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_micros(ticks * 1_000_000 / per_sec)
}

/// Every live descendant of `root` (children, grandchildren...), from `/proc`.
pub fn descendants(root: u32) -> Vec<u32> {
    let mut parent_of: Vec<(u32, u32)> = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok());
            if let Some(ppid) = ppid {
                parent_of.push((pid, ppid));
            }
        }
    }
    let mut found = vec![root];
    let mut i = 0;
    while i < found.len() {
        let p = found[i];
        found.extend(parent_of.iter().filter(|(_, pp)| *pp == p).map(|(c, _)| *c));
        i += 1;
    }
    found.remove(0);
    found
}

/// Where the load goes.
#[derive(Clone)]
pub enum Target {
    Grpc(BridgeClient<Channel>),
    Floor(Arc<Floor>),
    /// One method of any gRPC service, its request the payload's bytes as they are
    /// (a transparent call: the service directly, or pitboss in front of it).
    Raw(RawMethod),
}

/// A unary gRPC method called with raw bytes: no message types, so the load
/// generator costs the same whichever server it calls.
#[derive(Clone)]
pub struct RawMethod {
    grpc: tonic::client::Grpc<Channel>,
    path: http::uri::PathAndQuery,
}

/// The bytes of a message, as they go (no protobuf decoding on either side).
#[derive(Default, Clone, Copy)]
struct RawCodec;

impl tonic::codec::Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }

    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

impl tonic::codec::Encoder for RawCodec {
    type Item = Bytes;
    type Error = tonic::Status;

    fn encode(
        &mut self,
        item: Bytes,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        use bytes::BufMut;
        dst.put_slice(&item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawCodec {
    type Item = Bytes;
    type Error = tonic::Status;

    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Bytes>, tonic::Status> {
        use bytes::Buf;
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

impl Target {
    /// `method` (`/package.Service/Method`) of the server at `addr`, called with raw
    /// request bytes.
    pub async fn raw(
        addr: &str,
        method: &str,
        tls: &super::connect::TlsArgs,
    ) -> Result<Target, String> {
        let path = http::uri::PathAndQuery::try_from(method)
            .ok()
            .filter(|p| p.path().starts_with('/') && p.path()[1..].contains('/'))
            .ok_or(format!(
                "bad method {method:?}: give it as /package.Service/Method"
            ))?;
        let channel = super::connect::channel(addr, tls, "the service").await?;
        Ok(Target::Raw(RawMethod {
            grpc: tonic::client::Grpc::new(channel),
            path,
        }))
    }

    /// A Bridge at `addr`: plaintext, or TLS for an `https://` address.
    pub async fn grpc(addr: &str, tls: &super::connect::TlsArgs) -> Result<Target, String> {
        let channel = super::connect::channel(addr, tls, "the bridge listener").await?;
        Ok(Target::Grpc(
            BridgeClient::new(channel)
                .max_decoding_message_size(64 << 20)
                .max_encoding_message_size(64 << 20),
        ))
    }

    /// Creates the sessions a run uses.
    pub async fn sessions(&self, n: usize) -> Result<Vec<String>, String> {
        let mut ids = Vec::with_capacity(n);
        for i in 0..n {
            let id = format!("bench-{i}-{:08x}", rand::random::<u32>());
            if let Target::Grpc(c) = self {
                c.clone()
                    .create_session(pb::CreateSessionRequest {
                        session_id: id.clone(),
                        ..Default::default()
                    })
                    .await
                    .map_err(|s| format!("create_session: {}", s.message()))?;
            }
            ids.push(id);
        }
        Ok(ids)
    }

    async fn call(&self, spec: &LoadSpec, session: Option<&str>) -> Result<(), String> {
        match self {
            Target::Grpc(c) => {
                let msg = pb::ExecuteRequest {
                    command: spec.command.clone(),
                    payload: spec.payload.clone(),
                    content_type: "application/json".into(),
                    session_id: session.unwrap_or_default().to_string(),
                    idempotent: spec.idempotent,
                    routing_key: String::new(),
                };
                let mut req = tonic::Request::new(msg);
                if let Some(s) = session.and_then(|s| s.parse().ok()) {
                    req.metadata_mut().insert("x-session-id", s);
                }
                let mut c = c.clone();
                if spec.stream {
                    let mut s = c
                        .execute_stream(req)
                        .await
                        .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?
                        .into_inner();
                    while let Some(_chunk) = s
                        .message()
                        .await
                        .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?
                    {
                    }
                    Ok(())
                } else {
                    c.execute(req)
                        .await
                        .map(|_| ())
                        .map_err(|s| format!("{:?}: {}", s.code(), s.message()))
                }
            }
            Target::Floor(f) => f
                .call(&spec.command, spec.payload.clone(), session, spec.stream)
                .await
                .map(|_| ()),
            Target::Raw(m) => {
                let mut grpc = m.grpc.clone();
                grpc.ready().await.map_err(|e| format!("not ready: {e}"))?;
                let req = tonic::Request::new(spec.payload.clone());
                grpc.unary::<Bytes, Bytes, _>(req, m.path.clone(), RawCodec)
                    .await
                    .map(|_| ())
                    .map_err(|s| format!("{:?}: {}", s.code(), s.message()))
            }
        }
    }
}

/// Runs the load and measures it.
///
/// `cpu_pid`: the server process whose CPU (and its workers') is measured per request;
/// for the floor, the workers are this process's own.
pub async fn run(
    target: Target,
    name: &str,
    spec: LoadSpec,
    cpu_pid: Option<u32>,
) -> Result<Report, String> {
    if spec.requests.is_none() && spec.duration.is_none() {
        return Err("give a request count or a duration".into());
    }
    let sessions = Arc::new(target.sessions(spec.sessions).await?);
    let spec = Arc::new(spec);
    // Warm-up: same load, not measured.
    if !spec.warmup.is_zero() {
        drive(&target, &spec, &sessions, None, Some(spec.warmup)).await;
    }
    let cpu_before = CpuSample::take(cpu_pid);
    let started = Instant::now();
    let (hist, errors, first_error) =
        drive(&target, &spec, &sessions, spec.requests, spec.duration).await;
    let elapsed = started.elapsed().as_secs_f64();
    let cpu_after = CpuSample::take(cpu_pid);
    let n = hist.len();
    let per_req = |after: Duration, before: Duration| {
        (n > 0).then(|| after.saturating_sub(before).as_secs_f64() * 1e6 / n as f64)
    };
    let is_floor = matches!(target, Target::Floor(_));
    let q = |p: f64| hist.value_at_quantile(p);
    Ok(Report {
        target: name.to_string(),
        command: spec.command.clone(),
        concurrency: spec.concurrency,
        sessions: spec.sessions,
        payload_bytes: spec.payload.len(),
        requests: n,
        errors,
        elapsed_s: elapsed,
        rps: n as f64 / elapsed,
        p50_us: q(0.5),
        p90_us: q(0.9),
        p99_us: q(0.99),
        p999_us: q(0.999),
        max_us: hist.max(),
        first_error,
        cpu_server_us_per_req: cpu_pid.and_then(|_| per_req(cpu_after.server, cpu_before.server)),
        cpu_workers_us_per_req: (cpu_pid.is_some() || is_floor)
            .then(|| per_req(cpu_after.workers, cpu_before.workers))
            .flatten(),
        cpu_client_us_per_req: per_req(cpu_after.client, cpu_before.client),
    })
}

async fn drive(
    target: &Target,
    spec: &Arc<LoadSpec>,
    sessions: &Arc<Vec<String>>,
    requests: Option<u64>,
    duration: Option<Duration>,
) -> (Histogram<u64>, u64, Option<String>) {
    let issued = Arc::new(AtomicU64::new(0));
    let end = duration.map(|d| Instant::now() + d);
    let mut tasks = Vec::new();
    for _ in 0..spec.concurrency.max(1) {
        let (target, spec, sessions, issued) = (
            target.clone(),
            spec.clone(),
            sessions.clone(),
            issued.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("bounds");
            let mut errors = 0u64;
            let mut first_error = None;
            loop {
                let i = issued.fetch_add(1, Ordering::Relaxed);
                if requests.is_some_and(|r| i >= r) || end.is_some_and(|e| Instant::now() >= e) {
                    break;
                }
                let session = (!sessions.is_empty())
                    .then(|| sessions[(i as usize) % sessions.len()].as_str());
                let t = Instant::now();
                match target.call(&spec, session).await {
                    Ok(()) => {
                        let us = t.elapsed().as_micros().clamp(1, 60_000_000) as u64;
                        let _ = hist.record(us);
                    }
                    Err(e) => {
                        errors += 1;
                        first_error.get_or_insert(e);
                    }
                }
            }
            (hist, errors, first_error)
        }));
    }
    let mut all = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("bounds");
    let mut errors = 0;
    let mut first = None;
    for t in tasks {
        if let Ok((h, e, f)) = t.await {
            let _ = all.add(&h);
            errors += e;
            if first.is_none() {
                first = f;
            }
        }
    }
    (all, errors, first)
}

type Pending = Arc<Mutex<HashMap<u64, (oneshot::Sender<Result<usize, String>>, usize)>>>;

struct FloorWorker {
    outbox: OutboxHandle,
    pending: Pending,
    _child: tokio::process::Child,
}

/// The floor: the same Python workers, driven over pitboss's frames by the least
/// code that can: frames written by the calling task as pitboss writes them (its
/// [`Outbox`]: no hop to a writer task, what is queued meanwhile in one write), one
/// reader task matching replies to request ids, round-robin over workers (sessions
/// by hash).
pub struct Floor {
    workers: Vec<FloorWorker>,
    next_worker: AtomicUsize,
    next_id: AtomicU64,
}

impl Floor {
    /// Spawns `n` workers at once and waits for every READY. Returns the floor and how
    /// long startup took.
    pub async fn start(spec: &WorkerSpec, n: usize) -> Result<(Floor, Duration), String> {
        let started = Instant::now();
        let spawns = (0..n).map(|_| FloorWorker::start(spec));
        let workers: Result<Vec<_>, _> = futures_util::future::join_all(spawns)
            .await
            .into_iter()
            .collect();
        let elapsed = started.elapsed();
        Ok((
            Floor {
                workers: workers?,
                next_worker: AtomicUsize::new(0),
                next_id: AtomicU64::new(1),
            },
            elapsed,
        ))
    }

    /// One call; returns the number of chunks (1 for unary).
    pub async fn call(
        &self,
        command: &str,
        payload: Bytes,
        session: Option<&str>,
        stream: bool,
    ) -> Result<usize, String> {
        let w = match session {
            Some(s) => {
                &self.workers[(pitboss::rollout::bucket("floor", s) as usize) % self.workers.len()]
            }
            None => {
                &self.workers[self.next_worker.fetch_add(1, Ordering::Relaxed) % self.workers.len()]
            }
        };
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        w.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, (tx, 0));
        let frame = Frame::Request(RequestFrame {
            id,
            command: command.to_string(),
            session_id: session.unwrap_or_default().to_string(),
            content_type: "application/json".into(),
            timeout_ms: 0,
            context: None,
            payload,
        });
        let _ = stream; // the worker decides: a generator command streams
        if let Err(e) = w.outbox.send(&frame) {
            w.pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&id);
            return Err(format!("worker gone: {e}"));
        }
        rx.await.map_err(|_| "worker gone".to_string())?
    }
}

impl FloorWorker {
    async fn start(spec: &WorkerSpec) -> Result<FloorWorker, String> {
        let mut child = spec.spawn().map_err(|e| format!("spawn: {e}"))?;
        let stdin = child.stdin.take().ok_or("no stdin")?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        if let Some(mut stderr) = child.stderr.take() {
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut stderr, &mut tokio::io::sink()).await;
            });
        }
        let mut reader = FramedRead::new(stdout, FrameCodec::new(spec.max_frame_bytes));
        match reader.next().await {
            Some(Ok(Frame::Ready(_))) => {}
            other => return Err(format!("no READY: {other:?}")),
        }
        let pending: Pending = Default::default();
        // Frames go out as pitboss sends them: written by the calling task, what is
        // queued meanwhile in the same write (flush combining).
        let outbox = Outbox::start(stdin, FrameCodec::new(spec.max_frame_bytes));
        let p = pending.clone();
        tokio::spawn(async move {
            while let Some(Ok(frame)) = reader.next().await {
                let mut map = p.lock().unwrap_or_else(|e| e.into_inner());
                match frame {
                    Frame::Response { id, .. } => {
                        if let Some((tx, _)) = map.remove(&id) {
                            let _ = tx.send(Ok(1));
                        }
                    }
                    Frame::StreamChunk { id, .. } => {
                        if let Some(entry) = map.get_mut(&id) {
                            entry.1 += 1;
                        }
                    }
                    Frame::StreamEnd { id } => {
                        if let Some((tx, n)) = map.remove(&id) {
                            let _ = tx.send(Ok(n));
                        }
                    }
                    Frame::Error { id, body } => {
                        if let Some((tx, _)) = map.remove(&id) {
                            let _ = tx.send(Err(format!("{}: {}", body.error_type, body.message)));
                        }
                    }
                    _ => {}
                }
            }
        });
        Ok(FloorWorker {
            outbox,
            pending,
            _child: child,
        })
    }
}

/// A worker spec for the floor from a pitboss config: same interpreter (resolved),
/// adapter, paths and environment as the legacy pool.
pub async fn floor_spec(config: &pitboss::config::Config) -> Result<WorkerSpec, String> {
    let pc = PoolConfig::from_sections("floor", &config.pool, &config.sessions, &config.base_dir);
    pc.worker
        .resolve(pc.max_frame_bytes, pc.worker_concurrency)
        .await
        .map_err(|e| e.to_string())
}

/// The gRPC ceiling: a Bridge that answers without Python. `echo` (and any other
/// command) returns the payload; `stream` returns `{"n": N}` chunks; sessions exist.
#[derive(Default, Clone)]
pub struct CeilingBridge;

type ChunkStream = std::pin::Pin<
    Box<dyn tokio_stream::Stream<Item = Result<pb::ExecuteChunk, tonic::Status>> + Send>,
>;

#[tonic::async_trait]
impl pb::bridge_server::Bridge for CeilingBridge {
    async fn execute(
        &self,
        req: tonic::Request<pb::ExecuteRequest>,
    ) -> Result<tonic::Response<pb::ExecuteResponse>, tonic::Status> {
        let r = req.into_inner();
        Ok(tonic::Response::new(pb::ExecuteResponse {
            payload: r.payload,
            content_type: r.content_type,
            backend: "ceiling".into(),
            worker_id: "none".into(),
            attempts: 1,
        }))
    }

    type ExecuteStreamStream = ChunkStream;

    async fn execute_stream(
        &self,
        req: tonic::Request<pb::ExecuteRequest>,
    ) -> Result<tonic::Response<ChunkStream>, tonic::Status> {
        let r = req.into_inner();
        let n = serde_json::from_slice::<serde_json::Value>(&r.payload)
            .ok()
            .and_then(|v| v["n"].as_u64())
            .unwrap_or(3);
        let chunks = (0..n).map(move |i| {
            Ok(pb::ExecuteChunk {
                payload: Bytes::from(format!("{{\"i\":{i}}}")),
                content_type: "application/json".into(),
                last: i + 1 == n,
                ..Default::default()
            })
        });
        Ok(tonic::Response::new(
            Box::pin(tokio_stream::iter(chunks)) as ChunkStream
        ))
    }

    async fn create_session(
        &self,
        req: tonic::Request<pb::CreateSessionRequest>,
    ) -> Result<tonic::Response<pb::Session>, tonic::Status> {
        Ok(tonic::Response::new(pb::Session {
            session_id: req.into_inner().session_id,
            ..Default::default()
        }))
    }

    async fn get_session(
        &self,
        _req: tonic::Request<pb::GetSessionRequest>,
    ) -> Result<tonic::Response<pb::Session>, tonic::Status> {
        Err(tonic::Status::unimplemented("ceiling"))
    }

    async fn close_session(
        &self,
        _req: tonic::Request<pb::CloseSessionRequest>,
    ) -> Result<tonic::Response<pb::CloseSessionResponse>, tonic::Status> {
        Ok(tonic::Response::new(pb::CloseSessionResponse {}))
    }

    async fn list_commands(
        &self,
        _req: tonic::Request<pb::ListCommandsRequest>,
    ) -> Result<tonic::Response<pb::ListCommandsResponse>, tonic::Status> {
        Ok(tonic::Response::new(pb::ListCommandsResponse::default()))
    }
}

/// The resident memory of a process, in bytes (`VmRSS` from `/proc`).
pub fn rss_of(pid: u32) -> Option<u64> {
    let status =
        std::fs::read_to_string(Path::new("/proc").join(pid.to_string()).join("status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map(|kb| kb * 1024)
}

/// The passthrough ceiling: the leanest HTTP/2 proxy pitboss's own parts make. hyper
/// serves each connection and hands every request, untouched, to the same
/// [`Direct`](pitboss::backend::direct::Direct) connection a `grpc_proxy` uses for
/// the calls it splits: no routing, no rollout, no layers, no metrics. What it adds
/// to a call over calling the service directly is what two HTTP/2 hops cost on this
/// machine, the bar for what pitboss's transparent mode adds on top of that.
pub async fn serve_proxy_ceiling(
    listener: tokio::net::TcpListener,
    upstream: pitboss::backend::direct::Direct,
) -> Result<(), String> {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    loop {
        let (tcp, _) = listener.accept().await.map_err(|e| e.to_string())?;
        let _ = tcp.set_nodelay(true);
        let upstream = upstream.clone();
        tokio::spawn(async move {
            let service =
                hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let upstream = upstream.clone();
                    async move {
                        let answer = match upstream.send(req.map(tonic::body::Body::new)).await {
                            Ok(resp) => resp,
                            Err(e) => tonic::Status::unavailable(e.to_string()).into_http(),
                        };
                        Ok::<_, std::convert::Infallible>(answer)
                    }
                });
            let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .serve_connection(TokioIo::new(tcp), service)
                .await;
        });
    }
}
