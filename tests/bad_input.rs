//! Bad input, one case per test, against the real server on 127.0.0.1:0 with real
//! Python workers: empty and unknown commands, payloads over the gRPC message limit and
//! over the worker frame limit, invalid UTF-8 where protobuf wants a string, unknown
//! sessions, a deadline already expired, 1,000 streams abandoned halfway and 10,000
//! sessions left to expire. Each refusal is checked for its code, its message and its
//! `x-pitboss-error-class`; afterwards the server must still serve, with no slot,
//! session, task or memory left behind.

mod common;

use std::time::Duration;

use common::*;
use futures_util::StreamExt;
use pitboss::config::Config;
use pitboss::grpc::pb;
use pitboss::grpc::pb::bridge_server::Bridge;
use pitboss::pool::Pool;
use pitboss::server::RunningServer;
use tonic::transport::Channel;
use tonic::{Code, Status};

const LONG: Duration = Duration::from_secs(30);

/// The RSS test measures the whole test process, so it runs alone (write lock); the
/// other tests run side by side (read lock).
static PROCESS: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

/// A config on free ports with a 10 s shutdown grace; `server` goes into `[server]`,
/// `rest` after it.
fn config_with(server: &str, rest: &str) -> Config {
    config(&on_free_ports(
        &format!("shutdown_grace = \"10s\"\n{server}"),
        rest,
    ))
}

/// Starts the server and waits until every worker is ready.
async fn start_with(server: &str, rest: &str) -> (RunningServer, Client) {
    start(config_with(server, rest)).await
}

/// Requests handed to workers since the pool started, over all workers.
fn served(pool: &Pool) -> u64 {
    pool.status().workers.iter().map(|w| w.served).sum()
}

/// Every restart of every slot.
fn restarts(pool: &Pool) -> u32 {
    pool.status().workers.iter().map(|w| w.restarts).sum()
}

/// Nothing in flight, nothing queued, every worker ready.
fn idle(pool: &Pool) -> bool {
    let st = pool.status();
    st.queue_depth == 0 && st.ready == st.size && st.workers.iter().all(|w| w.in_flight == 0)
}

/// A normal call still works, and returns what it was sent.
async fn still_serves(client: &mut Client) {
    let mut req = tonic::Request::new(exec("echo", r#"{"still":"serving"}"#));
    req.set_timeout(Duration::from_secs(10));
    let r = client
        .execute(req)
        .await
        .expect("a normal call after bad input");
    assert_eq!(&r.into_inner().payload[..], br#"{"still":"serving"}"#);
}

/// The process's resident set size, in bytes (the server runs in this process).
fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .expect("VmRSS in /proc/self/status");
    let kb: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .expect("VmRSS value");
    kb * 1024
}

#[tokio::test]
async fn an_empty_command_is_invalid_argument_and_never_reaches_a_worker() {
    let _shared = PROCESS.read().await;
    let (server, mut client) = start_with("", "").await;
    let pool = server.pool().clone();
    let before = served(&pool);

    let err = client.execute(exec("", "{}")).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert_eq!(error_class(&err), "invalid_request", "{err:?}");
    assert!(
        err.message().contains("command must not be empty"),
        "says what is wrong: {}",
        err.message()
    );
    assert_eq!(err.metadata().get("x-pitboss-attempts").unwrap(), "1");

    // The same through ExecuteStream: refused before the stream starts.
    let err = client.execute_stream(exec("", "{}")).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert_eq!(error_class(&err), "invalid_request");
    assert!(err.message().contains("command must not be empty"));

    assert_eq!(served(&pool), before, "an empty command reached a worker");
    assert!(idle(&pool));
    still_serves(&mut client).await;
    server.shutdown().await;
}

#[tokio::test]
async fn an_unknown_command_is_not_found_and_lists_the_known_ones() {
    let _shared = PROCESS.read().await;
    let (server, mut client) = start_with("", "").await;
    let pool = server.pool().clone();
    let before = served(&pool);

    let err = client
        .execute(exec("no_such_command", "{}"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    assert_eq!(error_class(&err), "unknown_command", "{err:?}");
    let msg = err.message();
    assert!(msg.contains("\"no_such_command\""), "names it: {msg}");
    assert!(msg.contains("known commands"), "{msg}");
    for known in ["echo", "compute", "counter", "stream", "sleep"] {
        assert!(msg.contains(known), "lists {known}: {msg}");
    }

    let err = client
        .execute_stream(exec("no_such_command", "{}"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    assert_eq!(error_class(&err), "unknown_command");
    assert!(err.message().contains("echo"), "{}", err.message());

    // A near miss in case is still unknown: names are exact.
    let err = client.execute(exec("ECHO", "{}")).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");

    // A streaming command called as unary: the caller's mistake, with what to do.
    let err = client.execute(exec("stream", "{}")).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert_eq!(error_class(&err), "invalid_request");
    assert!(err.message().contains("ExecuteStream"), "{}", err.message());

    assert_eq!(served(&pool), before, "an unknown command reached a worker");
    assert!(idle(&pool));
    still_serves(&mut client).await;
    server.shutdown().await;
}

#[tokio::test]
async fn a_payload_over_a_limit_is_resource_exhausted_and_harms_no_worker() {
    let _shared = PROCESS.read().await;
    const MESSAGE_LIMIT: usize = 1024 * 1024;
    const FRAME_LIMIT: usize = 64 * 1024;
    let (server, mut client) = start_with(
        &format!("max_message_bytes = {MESSAGE_LIMIT}"),
        &format!("[pool]\nmax_frame_bytes = {FRAME_LIMIT}\n"),
    )
    .await;
    let pool = server.pool().clone();
    let pids = pool.pids();

    // Under both limits: served, byte for byte.
    let small = vec![b'a'; 32 * 1024];
    let r = client.execute(exec("echo", &small)).await.unwrap();
    assert_eq!(r.into_inner().payload.len(), small.len());
    let before = served(&pool);

    // Between the two: the gRPC message is accepted, but the frame to the worker would
    // be over pool.max_frame_bytes. Refused before any worker is involved.
    let between = vec![b'b'; 4 * FRAME_LIMIT];
    let err = client.execute(exec("echo", &between)).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert_eq!(
        error_class(&err),
        "invalid_request",
        "never retried: {err:?}"
    );
    let msg = err.message();
    assert!(msg.contains("too large"), "{msg}");
    assert!(
        msg.contains("pool.max_frame_bytes"),
        "names the limit: {msg}"
    );
    assert!(msg.contains(&FRAME_LIMIT.to_string()), "{msg}");
    assert!(!msg.contains("protocol"), "not the worker's fault: {msg}");
    assert!(
        err.metadata().get("x-pitboss-worker").is_none(),
        "no worker was involved: {err:?}"
    );
    // Marked idempotent, it is still not retried: it would fail the same way.
    let err = client
        .execute(idempotent(exec("echo", &between)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert_eq!(err.metadata().get("x-pitboss-attempts").unwrap(), "1");
    // ExecuteStream: refused before the stream starts.
    let err = client
        .execute_stream(exec("stream", &between))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("pool.max_frame_bytes"));

    // On a session: refused, and the session (its state in the worker) lives on.
    let s = client
        .create_session(pb::CreateSessionRequest::default())
        .await
        .unwrap()
        .into_inner();
    let mut req = exec("counter", &between);
    req.session_id = s.session_id.clone();
    let err = client.execute(req).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    let mut req = exec("counter", "{}");
    req.session_id = s.session_id.clone();
    let r = client.execute(req).await.expect("the session is not lost");
    let v: serde_json::Value = serde_json::from_slice(&r.into_inner().payload).unwrap();
    assert_eq!(v["count"], 1, "the oversized call never ran: {v}");
    assert_eq!(
        served(&pool),
        before + 1,
        "only the good call reached a worker"
    );

    // Over the gRPC message limit: refused by the gRPC layer, before it is buffered.
    let huge = vec![b'c'; 2 * MESSAGE_LIMIT];
    let err = client.execute(exec("echo", &huge)).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert_eq!(error_class(&err), "invalid_request", "{err:?}");
    let msg = err.message();
    assert!(msg.contains("too large"), "{msg}");
    assert!(
        msg.contains("server.max_message_bytes"),
        "names the limit: {msg}"
    );
    assert!(msg.contains(&MESSAGE_LIMIT.to_string()), "{msg}");
    let err = client
        .execute_stream(exec("stream", &huge))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("server.max_message_bytes"));

    // The same workers serve on, none replaced.
    assert_eq!(served(&pool), before + 1);
    assert!(idle(&pool));
    still_serves(&mut client).await;
    assert_eq!(pool.pids(), pids, "no worker was replaced");
    assert_eq!(restarts(&pool), 0);
    server.shutdown().await;
}

/// `ExecuteRequest` as it is on the wire, with `bytes` where the real one has `string`,
/// so that a test can send what no conforming client would: invalid UTF-8.
#[derive(Clone, PartialEq, prost::Message)]
struct RawExecuteRequest {
    #[prost(bytes = "vec", tag = "1")]
    command: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    payload: Vec<u8>,
    #[prost(bytes = "vec", tag = "4")]
    session_id: Vec<u8>,
}

#[tokio::test]
async fn invalid_utf8_in_a_session_id_is_a_clean_error_and_the_server_serves_on() {
    use tonic::codegen::http::uri::PathAndQuery;
    let _shared = PROCESS.read().await;
    let (server, mut client) = start_with("", "").await;
    let pool = server.pool().clone();
    let pids = pool.pids();
    let before = served(&pool);
    let channel = Channel::from_shared(format!("http://{}", server.bridge_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut raw = tonic::client::Grpc::new(channel);
    let bad = |command: &[u8], session: &[u8]| RawExecuteRequest {
        command: command.to_vec(),
        payload: b"{}".to_vec(),
        session_id: session.to_vec(),
    };

    for (method, req) in [
        ("Execute", bad(b"echo", &[0xff, 0xfe])),
        ("Execute", bad(b"echo", b"abc\xc3")), // a truncated 2-byte sequence
        ("Execute", bad(&[0x80], b"")),        // in the command instead
        ("ExecuteStream", bad(b"stream", &[0xff, 0xfe])),
    ] {
        raw.ready().await.unwrap();
        let path = PathAndQuery::try_from(format!("/pitboss.v1.Bridge/{method}")).unwrap();
        let codec = tonic_prost::ProstCodec::<RawExecuteRequest, pb::ExecuteResponse>::default();
        let err = if method == "Execute" {
            raw.unary(tonic::Request::new(req), path, codec)
                .await
                .unwrap_err()
        } else {
            let codec = tonic_prost::ProstCodec::<RawExecuteRequest, pb::ExecuteChunk>::default();
            raw.server_streaming(tonic::Request::new(req), path, codec)
                .await
                .unwrap_err()
        };
        // The request cannot be decoded: gRPC's own answer for an unparsable request is
        // INTERNAL (grpc/doc/statuscodes.md), given before pitboss's handler runs, so no
        // pitboss class is attached.
        assert_eq!(err.code(), Code::Internal, "{method}: {err:?}");
        let msg = err.message();
        assert!(msg.contains("decode"), "{method}: {msg}");
        assert!(msg.contains("UTF-8"), "{method}: says why: {msg}");
        assert_eq!(error_class(&err), "", "{method}: {err:?}");
    }

    // Valid UTF-8, but a content type longer than the worker frame's 16-bit length
    // field (and well under pool.max_frame_bytes): the caller's error, not a protocol
    // error of the worker.
    let mut req = exec("echo", "{}");
    req.content_type = "x".repeat(70_000);
    let err = client.execute(req).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert_eq!(error_class(&err), "invalid_request", "{err:?}");
    assert!(
        err.message().contains("content type is 70000 bytes"),
        "{}",
        err.message()
    );

    // Non-ASCII bytes in the x-session-id and x-request-id metadata (legal in HTTP/2 as
    // obs-text) are not session ids to pitboss: the call is served.
    let mut req = tonic::Request::new(exec("echo", "{}"));
    for key in ["x-session-id", "x-request-id"] {
        let v = tonic::metadata::MetadataValue::try_from(&[0x80u8, 0xfe, b'a', 0xff][..])
            .expect("obs-text is a valid metadata value");
        req.metadata_mut().insert(key, v);
    }
    let r = client
        .execute(req)
        .await
        .expect("non-ASCII metadata is ignored");
    assert_eq!(&r.into_inner().payload[..], b"{}");

    assert_eq!(
        served(&pool),
        before + 1,
        "only the good call reached a worker"
    );
    assert!(idle(&pool));
    still_serves(&mut client).await;
    assert_eq!(pool.pids(), pids);
    server.shutdown().await;
}

#[tokio::test]
async fn an_unknown_session_is_not_found_with_the_instance_id() {
    let _shared = PROCESS.read().await;
    let (server, mut client) = start_with("", "").await;
    let pool = server.pool().clone();
    let before = served(&pool);
    let instance = server.edge().instance_id.clone();
    assert!(!instance.is_empty());

    let check = |what: &str, err: Status, id: &str| {
        assert_eq!(err.code(), Code::NotFound, "{what}: {err:?}");
        assert_eq!(error_class(&err), "session_not_found", "{what}: {err:?}");
        assert!(
            err.message().contains(id),
            "{what}: names it: {}",
            err.message()
        );
        assert!(
            err.message().contains("create a new session"),
            "{what}: says what to do: {}",
            err.message()
        );
        assert_eq!(
            err.metadata().get("x-pitboss-instance").unwrap(),
            instance.as_str(),
            "{what}: so a client can tell which instance forgot it"
        );
    };

    let id = "no-such-session";
    let mut req = exec("counter", "{}");
    req.session_id = id.into();
    check(
        "Execute",
        client.execute(req.clone()).await.unwrap_err(),
        id,
    );
    let mut req = exec("stream", "{}");
    req.session_id = id.into();
    check(
        "ExecuteStream",
        client.execute_stream(req).await.unwrap_err(),
        id,
    );
    let get = pb::GetSessionRequest {
        session_id: id.into(),
    };
    check("GetSession", client.get_session(get).await.unwrap_err(), id);
    let close = pb::CloseSessionRequest {
        session_id: id.into(),
    };
    check(
        "CloseSession",
        client.close_session(close).await.unwrap_err(),
        id,
    );

    // A closed session is unknown from then on, the same way.
    let s = client
        .create_session(pb::CreateSessionRequest::default())
        .await
        .unwrap()
        .into_inner();
    client
        .close_session(pb::CloseSessionRequest {
            session_id: s.session_id.clone(),
        })
        .await
        .unwrap();
    let mut req = exec("counter", "{}");
    req.session_id = s.session_id.clone();
    check(
        "Execute after close",
        client.execute(req).await.unwrap_err(),
        &s.session_id,
    );

    // Creating a session whose id is alive is ALREADY_EXISTS (class
    // `session_exists`), what a gRPC client's create-or-get tests for; it was
    // INVALID_ARGUMENT (`invalid_request`). Once closed, the id is free again.
    let create = |id: &str| pb::CreateSessionRequest {
        session_id: id.into(),
        ..Default::default()
    };
    client.create_session(create("dup-session")).await.unwrap();
    let err = client
        .create_session(create("dup-session"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    assert_eq!(error_class(&err), "session_exists", "{err:?}");
    assert!(err.message().contains("dup-session"), "{}", err.message());
    client
        .close_session(pb::CloseSessionRequest {
            session_id: "dup-session".into(),
        })
        .await
        .unwrap();
    client.create_session(create("dup-session")).await.unwrap();
    client
        .close_session(pb::CloseSessionRequest {
            session_id: "dup-session".into(),
        })
        .await
        .unwrap();

    assert_eq!(served(&pool), before, "no call reached a worker");
    assert_eq!(pool.status().sessions, 0);
    assert!(idle(&pool));
    still_serves(&mut client).await;
    server.shutdown().await;
}

/// Runs `calls` with a client of its own whose copy of the deadlines never fires, so
/// that what comes back is the server's answer. tonic's client enforces a call's
/// `grpc-timeout` itself and fails it with CANCELLED "Timeout expired" when its timer
/// fires first, which for a 1 ns deadline it usually does. Here the client runs on a
/// runtime whose clock is paused and cannot auto-advance (a blocking task is in flight
/// the whole time), so its timers stand still while the server, on the real clock,
/// answers.
async fn with_frozen_client_clock<F, Fut, T>(addr: std::net::SocketAddr, calls: F) -> T
where
    F: FnOnce(Client) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = T>,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap();
        rt.block_on(async move {
            let (release, hold) = std::sync::mpsc::channel::<()>();
            let held = tokio::task::spawn_blocking(move || {
                let _ = hold.recv();
            });
            let client = Client::connect(format!("http://{addr}")).await.unwrap();
            let out = calls(client).await;
            drop(release);
            held.await.unwrap();
            out
        })
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn an_expired_deadline_is_deadline_exceeded_at_once_and_never_runs() {
    let _shared = PROCESS.read().await;
    let dir = temp_dir("bad-input-deadline");
    let count_file = dir.join("count.txt");
    let (server, mut client) = start_with(
        "",
        &format!(
            "[pool]\nadapter = \"faults:adapter\"\nsize = 1\n\
             env = {{ PITBOSS_FAULT_COUNT_FILE = \"{}\" }}\n",
            count_file.display()
        ),
    )
    .await;
    let pool = server.pool().clone();
    let pids = pool.pids();
    let before = served(&pool);
    let expired = || {
        let mut req = tonic::Request::new(exec("count", r#"{"id": "expired"}"#));
        req.set_timeout(Duration::from_nanos(1));
        req
    };

    // What the server answers: DEADLINE_EXCEEDED with its class, at once.
    let answers = with_frozen_client_clock(server.bridge_addr, move |mut c| async move {
        let t = std::time::Instant::now();
        let unary = c.execute(expired()).await.map(|_| ());
        let unary_took = t.elapsed();
        let t = std::time::Instant::now();
        let stream = c.execute_stream(expired()).await.map(|_| ());
        vec![
            ("Execute", unary, unary_took),
            ("ExecuteStream", stream, t.elapsed()),
        ]
    })
    .await;
    for (method, answer, took) in answers {
        let err = answer.expect_err(method);
        assert_eq!(err.code(), Code::DeadlineExceeded, "{method}: {err:?}");
        assert_eq!(error_class(&err), "deadline_exceeded", "{method}: {err:?}");
        assert!(
            err.message().contains("deadline") && err.message().contains("exceeded"),
            "{method}: {}",
            err.message()
        );
        assert!(
            took < Duration::from_secs(1),
            "{method}: answered after {took:?}"
        );
    }

    // A stock tonic client fails just as fast: with the server's answer, or with
    // tonic's own CANCELLED "Timeout expired" when its timer fires first.
    for stream in [false, true] {
        let started = tokio::time::Instant::now();
        let err = if stream {
            client.execute_stream(expired()).await.unwrap_err()
        } else {
            client.execute(expired()).await.unwrap_err()
        };
        let took = started.elapsed();
        match err.code() {
            Code::DeadlineExceeded => assert_eq!(error_class(&err), "deadline_exceeded"),
            Code::Cancelled => assert_eq!(err.message(), "Timeout expired", "{err:?}"),
            _ => panic!("stream={stream}: {err:?}"),
        }
        assert!(
            took < Duration::from_secs(1),
            "stream={stream}: took {took:?}"
        );
    }

    // A call that does run is recorded; the expired ones, which would have been ahead
    // of it on the only worker, are not.
    let mut req = tonic::Request::new(exec("count", r#"{"id": "control"}"#));
    req.set_timeout(Duration::from_secs(10));
    client.execute(req).await.unwrap();
    let lines = std::fs::read_to_string(&count_file).unwrap();
    assert!(lines.contains("control"), "{lines:?}");
    assert!(!lines.contains("expired"), "an expired call ran: {lines:?}");
    assert_eq!(
        served(&pool),
        before + 1,
        "only the control reached the worker"
    );
    assert!(idle(&pool));
    assert_eq!(pool.pids(), pids);
    server.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_thousand_streams_dropped_halfway_leak_nothing() {
    let _shared = PROCESS.read().await;
    const STREAMS: usize = 1000;
    const AT_ONCE: usize = 50;
    let (server, client) = start_with("", "[pool]\nadapter = \"faults:adapter\"\nsize = 2\n").await;
    let pool = server.pool().clone();
    let pids = pool.pids();
    let metrics = tokio::runtime::Handle::current().metrics();
    let tasks_before = metrics.num_alive_tasks();

    let started = tokio::time::Instant::now();
    let read: Vec<usize> = futures_util::stream::iter(0..STREAMS)
        .map(|i| {
            let mut c = client.clone();
            async move {
                // Slow chunks, far more than are read: every stream is left mid-way.
                let mut req = tonic::Request::new(exec("chunks", r#"{"n": 1000, "sleep": 0.001}"#));
                req.set_timeout(LONG);
                let mut stream = c.execute_stream(req).await.unwrap().into_inner();
                let want = 1 + i % 2;
                let mut got = 0;
                while got < want {
                    let chunk = stream.message().await.unwrap().expect("a chunk");
                    assert!(!chunk.last, "the stream ended early");
                    got += 1;
                }
                drop(stream); // the client goes away mid-stream
                got
            }
        })
        .buffer_unordered(AT_ONCE)
        .collect()
        .await;
    assert_eq!(read.len(), STREAMS);
    assert_eq!(read.iter().sum::<usize>(), STREAMS / 2 * 3);
    let ran_for = started.elapsed();

    // Every cancel reaches its worker, which stops the generator and frees the slot.
    let settled = eventually(LONG, || idle(&pool) && pool.status().sessions == 0).await;
    let st = pool.status();
    assert!(settled, "slots or queue left behind: {st:?}");
    assert_eq!(
        pool.pids(),
        pids,
        "a worker was killed (a cancel not honoured?)"
    );
    assert_eq!(restarts(&pool), 0, "{st:?}");
    assert!(
        served(&pool) >= STREAMS as u64,
        "every stream reached a worker"
    );
    // The tasks that pumped the streams are gone too.
    let tasks_settled = eventually(LONG, || metrics.num_alive_tasks() <= tasks_before + 8).await;
    assert!(
        tasks_settled,
        "tokio tasks: {} before, {} after",
        tasks_before,
        metrics.num_alive_tasks()
    );
    let mut client = client;
    still_serves(&mut client).await;
    eprintln!("{STREAMS} streams dropped halfway in {ran_for:?}");
    server.shutdown().await;
}

#[tokio::test]
async fn ten_thousand_abandoned_sessions_expire_and_free_their_memory() {
    // Alone in the process: the RSS reading must not include the other tests.
    let _alone = PROCESS.write().await;
    const SESSIONS: usize = 10_000;
    let (server, client) = start_with("", "[sessions]\nttl = \"2s\"\n").await;
    let pool = server.pool().clone();
    let edge = server.edge().clone();

    // Warm up allocators and connections with a few sessions of the same kind.
    let create = |c: &Client| {
        let mut c = c.clone();
        async move {
            c.create_session(pb::CreateSessionRequest::default())
                .await
                .unwrap()
                .into_inner()
                .session_id
        }
    };
    let mut c = client.clone();
    for _ in 0..100 {
        let id = create(&c).await;
        c.close_session(pb::CloseSessionRequest { session_id: id })
            .await
            .unwrap();
    }
    assert_eq!(pool.status().sessions, 0);
    let baseline = rss_bytes();

    let started = tokio::time::Instant::now();
    // Through the Bridge handler itself, in process: over the network a debug build
    // spends ~250 us per call in tonic, so 10,000 calls would outlast the 2 s TTL and the
    // first sessions would expire before the last exist. The handler is the same code
    // the gRPC server calls (edge pin, rollout, pool).
    let bridge = pitboss::grpc::BridgeService(server.edge().clone());
    let mut ids = Vec::with_capacity(SESSIONS);
    for _ in 0..SESSIONS {
        let s = bridge
            .create_session(tonic::Request::new(pb::CreateSessionRequest::default()))
            .await
            .unwrap();
        ids.push(s.into_inner().session_id);
    }
    let created_in = started.elapsed();
    assert_eq!(ids.len(), SESSIONS);
    assert_eq!(pool.status().sessions, SESSIONS, "all held at once");
    assert_eq!(
        edge.split.pinned_sessions(),
        (SESSIONS, 0),
        "each pinned to its backend"
    );
    let peak = rss_bytes();

    // Nobody closes them: the TTL does, without any traffic.
    let expired = eventually(LONG, || pool.status().sessions == 0).await;
    assert!(
        expired,
        "{} sessions still held after the TTL",
        pool.status().sessions
    );
    let expired_after = started.elapsed();

    // The edge's pins end with their sessions: the next pruning (the background one
    // runs once a minute) drops every one, as the pool no longer has them.
    let now = tokio::time::Instant::now();
    assert_eq!(edge.split.prune_sessions(now), SESSIONS);
    assert_eq!(edge.split.pinned_sessions(), (0, 0));
    let err = client
        .clone()
        .get_session(pb::GetSessionRequest {
            session_id: ids[0].clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    assert_eq!(error_class(&err), "session_not_found");

    let after = rss_bytes();
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    eprintln!(
        "{SESSIONS} sessions: created in {created_in:?}, expired after {expired_after:?}; \
         RSS {:.1} MiB before, {:.1} MiB at peak, {:.1} MiB after",
        mib(baseline),
        mib(peak),
        mib(after)
    );
    assert!(
        after <= baseline + 16 * 1024 * 1024,
        "RSS grew by {:.1} MiB and stayed",
        mib(after.saturating_sub(baseline))
    );
    assert!(idle(&pool));
    let mut client = client;
    still_serves(&mut client).await;
    server.shutdown().await;
}

/// Issue 13 item 8: an answer too large to send is a classified, counted server-side
/// failure (`response_too_large`, INTERNAL), not an unclassified OUT_OF_RANGE counted
/// as `ok`; whether the edge (over `server.max_message_bytes`) or the worker (over
/// `pool.max_frame_bytes`) finds it, for unary calls and stream chunks.
#[tokio::test]
async fn a_response_too_large_to_send_is_classified_and_counted() {
    let _shared = PROCESS.read().await;
    const LIMIT: usize = 1024 * 1024;
    let (server, mut client) = start_with(
        &format!("max_message_bytes = {LIMIT}"),
        &format!("[pool]\nadapter = \"faults:adapter\"\nsize = 1\nmax_frame_bytes = {LIMIT}\n"),
    )
    .await;
    let big = |n: usize| exec("big", format!(r#"{{"bytes": {n}}}"#));
    // Fits a frame, but not a gRPC message once the response's fields are added.
    let err = client.execute(big(LIMIT - 500)).await.unwrap_err();
    assert_eq!(err.code(), Code::Internal, "{err:?}");
    assert_eq!(error_class(&err), "response_too_large");
    assert!(
        err.message().contains("server.max_message_bytes"),
        "{}",
        err.message()
    );
    // Over the frame limit: the worker refuses to send it.
    let err = client.execute(big(2 * LIMIT)).await.unwrap_err();
    assert_eq!(err.code(), Code::Internal, "{err:?}");
    assert_eq!(error_class(&err), "response_too_large");
    // A stream whose second chunk is too large: the first arrives, then the error.
    let mut stream = client
        .execute_stream(exec(
            "big_stream",
            format!(r#"{{"n": 3, "bytes": {}}}"#, LIMIT - 500),
        ))
        .await
        .unwrap()
        .into_inner();
    let err = loop {
        match stream.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the stream ended without an error"),
            Err(e) => break e,
        }
    };
    assert_eq!(err.code(), Code::Internal, "{err:?}");
    assert_eq!(error_class(&err), "response_too_large");
    // Counted as such, never as ok.
    let scrape = common::scrape(server.metrics_addr).await;
    let series = |command: &str, outcome: &str, class: &str| {
        format!("pitboss_requests_total{{backend=\"legacy\",command=\"{command}\",outcome=\"{outcome}\",error_class=\"{class}\"}} ")
    };
    let value = |s: &str| {
        scrape
            .lines()
            .find_map(|l| l.strip_prefix(s))
            .map(|v| v.trim().parse::<f64>().unwrap())
    };
    assert_eq!(
        value(&series("big", "error", "response_too_large")),
        Some(2.0),
        "{scrape}"
    );
    assert_eq!(
        value(&series("big_stream", "error", "response_too_large")),
        Some(1.0),
        "{scrape}"
    );
    assert_eq!(value(&series("big", "ok", "")), None, "{scrape}");
    still_serves(&mut client).await;
    server.shutdown().await;
}

/// Issue 13 item 17: a per-try timeout has one class everywhere: the client's
/// trailer, its ErrorInfo and the metrics all say `worker_timeout`.
#[tokio::test]
async fn a_per_try_timeout_has_one_class_for_the_client_and_the_metrics() {
    let _shared = PROCESS.read().await;
    let (server, mut client) = start_with(
        "",
        "[pool]\nadapter = \"faults:adapter\"\nsize = 1\n[retry]\nper_try_timeout = \"300ms\"\nmax_attempts = 1\n",
    )
    .await;
    let mut req = tonic::Request::new(exec("sleep", r#"{"seconds": 2}"#));
    req.set_timeout(Duration::from_secs(20));
    let err = client.execute(req).await.unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    assert_eq!(error_class(&err), "worker_timeout", "{err:?}");
    let info = tonic_types::StatusExt::get_error_details(&err);
    assert_eq!(info.error_info().unwrap().reason, "worker_timeout");
    let scrape = common::scrape(server.metrics_addr).await;
    let series = "pitboss_requests_total{backend=\"legacy\",command=\"sleep\",outcome=\"error\",error_class=\"worker_timeout\"} ";
    assert!(scrape.lines().any(|l| l.starts_with(series)), "{scrape}");
    server.shutdown().await;
}

/// A TCP relay in front of `to` that can be frozen: then it keeps both sockets open
/// and forwards nothing more either way, as a client whose host died or whose network
/// went away (no FIN, no RST, no answer). Returns its address and the switch.
async fn freezable_relay(
    to: std::net::SocketAddr,
) -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicBool>,
) {
    use std::sync::atomic::{AtomicBool, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let frozen = std::sync::Arc::new(AtomicBool::new(false));
    let switch = frozen.clone();
    tokio::spawn(async move {
        let (client, _) = listener.accept().await.unwrap();
        let server = tokio::net::TcpStream::connect(to).await.unwrap();
        let (cr, cw) = client.into_split();
        let (sr, sw) = server.into_split();
        let pump = |mut from: tokio::net::tcp::OwnedReadHalf,
                    mut to: tokio::net::tcp::OwnedWriteHalf| {
            let frozen = frozen.clone();
            async move {
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    let n = from.read(&mut buf).await.unwrap_or(0);
                    if frozen.load(Ordering::SeqCst) {
                        // Holds both halves open and never forwards again.
                        std::future::pending::<()>().await;
                    }
                    if n == 0 || to.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            }
        };
        tokio::join!(pump(cr, sw), pump(sr, cw));
    });
    (addr, switch)
}

/// A client that vanishes mid-call without closing its connection (its host died):
/// the server's HTTP/2 pings go unanswered, so after `keepalive_timeout` it closes the
/// connection and cancels the call, and the worker's Python work stops. Without the
/// pings (before `server.keepalive_*`), the call had no deadline and would have held
/// its worker for the whole 60 s sleep, and the connection for ever.
#[tokio::test]
async fn a_client_that_vanishes_mid_call_is_noticed_and_its_call_cancelled() {
    let _shared = PROCESS.read().await;
    let (server, _client) = start_with(
        "keepalive_interval = \"300ms\"\nkeepalive_timeout = \"300ms\"\n",
        "",
    )
    .await;
    let (relay, freeze) = freezable_relay(server.bridge_addr).await;
    let channel = Channel::from_shared(format!("http://{relay}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = pb::bridge_client::BridgeClient::new(channel);
    // No deadline: only the connection's death can end it.
    let call =
        tokio::spawn(async move { client.execute(exec("sleep", r#"{"seconds": 60}"#)).await });
    let pool = server.pool().clone();
    assert!(
        eventually(LONG, || in_flight(&pool) == 1).await,
        "the call reached a worker"
    );
    freeze.store(true, std::sync::atomic::Ordering::SeqCst);
    // Interval + timeout is 0.6 s; the bound is generous for a busy machine.
    assert!(
        eventually(LONG, || in_flight(&pool) == 0).await,
        "the dead client's call was cancelled and its worker freed"
    );
    assert!(
        eventually(LONG, || idle(&pool)).await,
        "every worker ready again, nothing queued: {:?}",
        pool.status()
    );
    assert_eq!(
        restarts(&pool),
        0,
        "the worker acknowledged the cancel in time"
    );
    call.abort();
    still_serves(&mut _client.clone()).await;
    server.shutdown().await;
}

/// One call over a raw HTTP/2 connection with a 10 s deadline; see [`raw_grpc_with`].
async fn raw_grpc(
    addr: std::net::SocketAddr,
    path: &str,
    chunks: Vec<bytes::Bytes>,
) -> (u32, String, String) {
    raw_grpc_with(addr, path, "10S", chunks).await
}

#[tokio::test]
async fn a_unary_call_with_two_request_messages_is_internal_and_never_runs() {
    let _shared = PROCESS.read().await;
    let (server, mut client) = start_with("", "").await;
    let pool = server.pool().clone();
    let before = served(&pool);
    let one = framed(&exec("echo", r#"{"n":1}"#));
    let two = framed(&exec("echo", r#"{"n":2}"#));
    let both: bytes::Bytes = [one.clone(), two.clone()].concat().into();
    let cases = [
        ("/pitboss.v1.Bridge/Execute", vec![both.clone()]),
        ("/pitboss.v1.Bridge/Execute", vec![one.clone(), two.clone()]),
        ("/pitboss.v1.Bridge/ExecuteStream", vec![both.clone()]),
        (
            "/pitboss.v1.Bridge/ExecuteStream",
            vec![one.clone(), two.clone()],
        ),
        (
            "/grpc.health.v1.Health/Check",
            vec![[framed(&()), framed(&())].concat().into()],
        ),
    ];
    for (path, chunks) in cases {
        let frames = chunks.len();
        let (status, message, class) = raw_grpc(server.bridge_addr, path, chunks).await;
        assert_eq!(
            status,
            Code::Internal as u32,
            "{path} in {frames} DATA frame(s): {message}"
        );
        assert!(
            message.contains("more than one message") && message.contains(path),
            "says what was wrong and where: {message}"
        );
        assert_eq!(class, "invalid_request", "{path}: {message}");
    }
    assert_eq!(
        served(&pool),
        before,
        "a call with two messages reached a worker"
    );

    // One message cut into a DATA frame per byte is still one message.
    let bytes: Vec<bytes::Bytes> = one.iter().map(|b| bytes::Bytes::from(vec![*b])).collect();
    let (status, message, _) =
        raw_grpc(server.bridge_addr, "/pitboss.v1.Bridge/Execute", bytes).await;
    assert_eq!(status, 0, "one message in byte-sized frames: {message}");
    assert_eq!(served(&pool), before + 1);
    assert!(idle(&pool));
    still_serves(&mut client).await;
    server.shutdown().await;
}

/// A malformed `grpc-timeout` ("5" with no unit, "1.5S", a sign, nine digits) was
/// ignored, as tonic does: the call ran with no deadline while its client believed it
/// had one. Now every method on both listeners refuses it, INTERNAL (as grpc-go's
/// servers answer), naming the value; the call never reaches a worker.
#[tokio::test]
async fn a_malformed_grpc_timeout_is_internal_names_the_value_and_never_runs() {
    let _shared = PROCESS.read().await;
    let (server, mut client) = start_with("", "").await;
    let pool = server.pool().clone();
    let before = served(&pool);
    let echo = framed(&exec("echo", r#"{"n":1}"#));
    let cases = [
        (
            server.bridge_addr,
            "/pitboss.v1.Bridge/Execute",
            echo.clone(),
        ),
        (
            server.bridge_addr,
            "/pitboss.v1.Bridge/ExecuteStream",
            echo.clone(),
        ),
        (
            server.bridge_addr,
            "/grpc.health.v1.Health/Check",
            framed(&()),
        ),
        (
            server.admin_addr,
            "/pitboss.v1.Admin/GetRollout",
            framed(&()),
        ),
    ];
    for (addr, path, body) in cases {
        for bad in ["5", "1.5S", "+100m", "-1S", "123456789m", "10 S", "10s"] {
            let (status, message, class) = raw_grpc_with(addr, path, bad, vec![body.clone()]).await;
            assert_eq!(
                status,
                Code::Internal as u32,
                "{path} with {bad:?}: {message}"
            );
            assert!(
                message.contains(&format!("grpc-timeout header {bad:?} is malformed"))
                    && message.contains("1 to 8 digits and a unit"),
                "says what was wrong and how to fix it: {message}"
            );
            assert_eq!(class, "invalid_request", "{path} with {bad:?}");
        }
    }
    assert_eq!(
        served(&pool),
        before,
        "a call with a malformed deadline ran"
    );

    // Well-formed deadlines, in every unit, are served.
    for good in ["1H", "2M", "10S", "10000m", "10000000u", "99999999n"] {
        let path = "/pitboss.v1.Bridge/Execute";
        let n = served(&pool);
        let (status, message, _) =
            raw_grpc_with(server.bridge_addr, path, good, vec![echo.clone()]).await;
        if good == "99999999n" {
            // 0.1 s is enough for an echo, and a miss would be DEADLINE_EXCEEDED.
            assert!(
                status == 0 || status == Code::DeadlineExceeded as u32,
                "{good}: {status} {message}"
            );
            continue;
        }
        assert_eq!(status, 0, "{good}: {message}");
        assert_eq!(served(&pool), n + 1);
    }
    still_serves(&mut client).await;
    server.shutdown().await;
}

/// An `echo` call carrying `bytes` of metadata in one `x-big` value.
async fn call_with_metadata(client: &mut Client, bytes: usize) -> Result<(), Status> {
    let mut req = tonic::Request::new(exec("echo", "{}"));
    req.set_timeout(Duration::from_secs(10));
    let value = "a".repeat(bytes);
    req.metadata_mut().insert("x-big", value.parse().unwrap());
    client.execute(req).await.map(|_| ())
}

#[tokio::test]
async fn metadata_over_server_max_header_list_bytes_is_refused_and_a_raised_limit_takes_it() {
    let _shared = PROCESS.read().await;
    // The default, 16 KiB: 40 KiB of metadata is refused by HTTP/2, the server serves on.
    let (server, mut client) = start_with("", "").await;
    let err = call_with_metadata(&mut client, 40 * 1024)
        .await
        .unwrap_err();
    // HTTP/2 answers 431 with no grpc-status; gRPC clients map it to UNKNOWN.
    assert!(err.message().contains("431"), "{err:?}");
    call_with_metadata(&mut client, 8 * 1024)
        .await
        .expect("8 KiB of metadata is under the default limit");
    server.shutdown().await;

    // Raised to 64 KiB, the same call is served.
    let (server, mut client) = start_with("max_header_list_bytes = 65536", "").await;
    call_with_metadata(&mut client, 40 * 1024)
        .await
        .expect("40 KiB of metadata under a 64 KiB limit");
    still_serves(&mut client).await;
    server.shutdown().await;
}
