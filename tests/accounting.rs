//! Every call that reaches pitboss is counted exactly once, with one class, wherever
//! it ends: at the client's deadline, by the client's cancel, or by pitboss's own
//! per-try timeout (issue 13, items 6, 17 and 18). Real servers, real Python workers,
//! real clients; counts are read from a real `/metrics` scrape.
//!
//! The Prometheus recorder is process-wide: the tests of this binary take turns
//! (`SERIAL`) and check differences, so each sees only its own calls.

mod common;

use std::time::Duration;

use common::*;
use pitboss::backend::Role;
use pitboss::grpc::pb;
use pitboss::server::RunningServer;
use tonic::Code;

const LONG: Duration = Duration::from_secs(30);

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn start_with(extra: &str) -> (RunningServer, Client) {
    let rest = format!(
        "{pool}[pool.restart]\nbackoff_base = \"20ms\"\njitter = 0.0\n\
         [circuit_breaker]\nenabled = false\n{extra}",
        pool = pool_section("faults:adapter", 2)
    );
    let (server, client) = start(config(&on_free_ports("", &rest))).await;
    wait_known(&server, "sleep").await;
    (server, client)
}

/// `pitboss_requests_total` for `command`, over all outcomes, and for one class.
async fn counts(server: &RunningServer, command: &str, class: &str) -> (f64, f64) {
    let m = scrape(server.metrics_addr).await;
    let all = sum_of(&m, "pitboss_requests_total", &[("command", command)]);
    let one = sum_of(
        &m,
        "pitboss_requests_total",
        &[("command", command), ("error_class", class)],
    );
    (all, one)
}

/// Waits (real time, generous bound) until `command` was counted `n` more times than
/// `before`, all of them as `class`; then checks that no call was counted twice.
async fn assert_counted(
    server: &RunningServer,
    command: &str,
    class: &str,
    before: (f64, f64),
    n: f64,
) {
    let deadline = tokio::time::Instant::now() + LONG;
    let mut now = counts(server, command, class).await;
    while (now.0 - before.0) < n && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        now = counts(server, command, class).await;
    }
    assert_eq!(
        (now.0 - before.0, now.1 - before.1),
        (n, n),
        "{command}: (all outcomes, {class}) counted since the start"
    );
}

fn rollout_class(server: &RunningServer, class: &str) -> u64 {
    let stats = server.edge().rollout().stats(Role::Legacy);
    stats.by_class.get(class).copied().unwrap_or(0)
}

#[tokio::test]
async fn calls_that_end_at_the_client_deadline_are_counted_once_and_seen_by_the_rollout() {
    let _turn = SERIAL.lock().await;
    let (server, client) = start_with("").await;
    // A slow worker and a hung one: the client's own timer (tonic sets one from the
    // request timeout) races pitboss's; whoever wins, each call is counted once.
    for (command, payload, n) in [("sleep", r#"{"seconds": 5}"#, 6usize), ("hang", "{}", 2)] {
        let before = counts(&server, command, "deadline_exceeded").await;
        let rollout_before = rollout_class(&server, "deadline_exceeded");
        let calls = (0..n).map(|_| {
            let mut client = client.clone();
            async move {
                let mut req = tonic::Request::new(exec(command, payload));
                req.set_timeout(Duration::from_secs(1));
                client.execute(req).await.unwrap_err()
            }
        });
        for err in futures_util::future::join_all(calls).await {
            assert!(
                matches!(err.code(), Code::DeadlineExceeded | Code::Cancelled),
                "{command}: {err:?}"
            );
        }
        assert_counted(&server, command, "deadline_exceeded", before, n as f64).await;
        assert_eq!(
            rollout_class(&server, "deadline_exceeded") - rollout_before,
            n as u64,
            "{command}: the rollout statistics see every deadline failure"
        );
        server.pool().wait_ready(2, LONG).await.unwrap();
    }
    server.shutdown().await;
}

#[tokio::test]
async fn calls_the_client_cancels_are_counted_once_as_cancelled() {
    let _turn = SERIAL.lock().await;
    let (server, client) = start_with("").await;
    // Unary calls without a deadline, abandoned by the client mid-call.
    let n = 4usize;
    let before = counts(&server, "sleep", "cancelled").await;
    let rollout_before = rollout_class(&server, "cancelled");
    let calls = (0..n).map(|_| {
        let mut client = client.clone();
        async move {
            let call = client.execute(exec("sleep", r#"{"seconds": 5}"#));
            assert!(
                tokio::time::timeout(Duration::from_millis(300), call)
                    .await
                    .is_err(),
                "the call is still running when the client gives up"
            );
        }
    });
    futures_util::future::join_all(calls).await;
    assert_counted(&server, "sleep", "cancelled", before, n as f64).await;
    assert_eq!(
        rollout_class(&server, "cancelled") - rollout_before,
        n as u64
    );

    // A stream the client drops after its first chunk.
    let before = counts(&server, "chunks", "cancelled").await;
    let mut client2 = client.clone();
    let mut stream = client2
        .execute_stream(exec("chunks", r#"{"n": 100, "sleep": 0.05}"#))
        .await
        .unwrap()
        .into_inner();
    assert!(stream.message().await.unwrap().is_some());
    drop(stream);
    assert_counted(&server, "chunks", "cancelled", before, 1.0).await;
    server.shutdown().await;
}

#[tokio::test]
async fn a_per_try_timeout_has_one_class_for_the_client_and_the_metrics() {
    let _turn = SERIAL.lock().await;
    let (server, mut client) = start_with("[retry]\nper_try_timeout = \"300ms\"\n").await;
    let before = counts(&server, "sleep", "worker_timeout").await;
    let mut req = tonic::Request::new(exec("sleep", r#"{"seconds": 5}"#));
    req.set_timeout(Duration::from_secs(20));
    let err = client.execute(req).await.unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    assert_eq!(
        error_class(&err),
        "worker_timeout",
        "the trailer carries the class the metrics, the breaker and the rollout saw"
    );
    let details = tonic_types::StatusExt::get_error_details(&err);
    assert_eq!(details.error_info().unwrap().reason, "worker_timeout");
    assert_counted(&server, "sleep", "worker_timeout", before, 1.0).await;
    server.shutdown().await;
}

/// One call over a raw HTTP/2 connection: `grpc-timeout` is sent, but no client timer
/// runs, so the answer is whatever the server decided. Returns the grpc-status and the
/// error class trailer.
async fn raw_call(
    h2: h2::client::SendRequest<bytes::Bytes>,
    authority: &str,
    body: bytes::Bytes,
    timeout: &str,
) -> (u32, String) {
    let mut h2 = h2.ready().await.unwrap();
    let req = http::Request::builder()
        .method("POST")
        .uri(format!("http://{authority}/pitboss.v1.Bridge/Execute"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("grpc-timeout", timeout)
        .body(())
        .unwrap();
    let (resp, mut send) = h2.send_request(req, false).unwrap();
    send.send_data(body, true).unwrap();
    let resp = resp.await.unwrap();
    let (parts, mut recv) = resp.into_parts();
    let mut md = parts.headers;
    if md.get("grpc-status").is_none() {
        while let Some(chunk) = recv.data().await {
            let chunk = chunk.unwrap();
            let _ = recv.flow_control().release_capacity(chunk.len());
        }
        if let Some(trailers) = recv.trailers().await.unwrap() {
            md.extend(trailers);
        }
    }
    let status = md
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .expect("a grpc-status");
    let class = md
        .get("x-pitboss-error-class")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    (status, class)
}

#[tokio::test]
async fn an_expired_grpc_timeout_is_always_deadline_exceeded_with_its_class_and_counted() {
    let _turn = SERIAL.lock().await;
    let (server, _client) = start_with("").await;
    let msg = prost::Message::encode_to_vec(&exec("async_sleep", r#"{"seconds": 1}"#));
    let mut framed = vec![0u8];
    framed.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    framed.extend_from_slice(&msg);
    let body = bytes::Bytes::from(framed);
    let before = counts(&server, "async_sleep", "deadline_exceeded").await;
    let (conns, per_conn) = (4usize, 25usize);
    let mut tasks = vec![];
    for _ in 0..conns {
        let addr = server.bridge_addr;
        let body = body.clone();
        tasks.push(tokio::spawn(async move {
            let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            let (h2, conn) = h2::client::handshake(tcp).await.unwrap();
            tokio::spawn(conn);
            let mut seen = vec![];
            for _ in 0..per_conn {
                seen.push(raw_call(h2.clone(), &addr.to_string(), body.clone(), "100m").await);
            }
            seen
        }));
    }
    let mut wrong = vec![];
    for t in tasks {
        for (status, class) in t.await.unwrap() {
            if status != Code::DeadlineExceeded as u32 || class != "deadline_exceeded" {
                wrong.push((status, class));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {} calls were not DEADLINE_EXCEEDED with class deadline_exceeded: {wrong:?}",
        wrong.len(),
        conns * per_conn
    );
    assert_counted(
        &server,
        "async_sleep",
        "deadline_exceeded",
        before,
        (conns * per_conn) as f64,
    )
    .await;
    server.shutdown().await;
}

#[tokio::test]
async fn create_session_calls_are_counted_once_each() {
    let _turn = SERIAL.lock().await;
    let (server, mut client) = start_with("").await;
    let label = "CreateSession";
    let before_ok = counts(&server, label, "").await;
    let create = |id: &str| pb::CreateSessionRequest {
        session_id: id.into(),
        ..Default::default()
    };
    client.create_session(create("acct-a")).await.unwrap();
    assert_counted(&server, label, "", before_ok, 1.0).await;
    let before = counts(&server, label, "session_exists").await;
    let err = client.create_session(create("acct-a")).await.unwrap_err();
    assert_eq!(error_class(&err), "session_exists", "{err:?}");
    assert_counted(&server, label, "session_exists", before, 1.0).await;
    server.shutdown().await;
}

/// A call whose deadline passes while its request message has not arrived (a slow
/// upload; here no DATA frame at all). Before, tonic's own timer answered it
/// CANCELLED "Timeout expired", without pitboss's class, and it was counted nowhere.
#[tokio::test]
async fn a_deadline_that_passes_before_the_request_message_arrives_is_deadline_exceeded_and_counted(
) {
    let _turn = SERIAL.lock().await;
    let (server, _client) = start_with("").await;
    let before = counts(&server, "other", "deadline_exceeded").await;
    let addr = server.bridge_addr;
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (h2, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(conn);
    let mut h2 = h2.ready().await.unwrap();
    let req = http::Request::builder()
        .method("POST")
        .uri(format!("http://{addr}/pitboss.v1.Bridge/Execute"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("grpc-timeout", "300m")
        .body(())
        .unwrap();
    // The stream stays open, with no message, until the answer.
    let (resp, _send) = h2.send_request(req, false).unwrap();
    let resp = tokio::time::timeout(LONG, resp)
        .await
        .expect("answered at the deadline")
        .unwrap();
    let (parts, mut recv) = resp.into_parts();
    let mut md = parts.headers;
    if md.get("grpc-status").is_none() {
        while let Some(chunk) = recv.data().await {
            let _ = chunk;
        }
        if let Some(trailers) = recv.trailers().await.unwrap() {
            md.extend(trailers);
        }
    }
    let text = |k: &str| {
        md.get(k)
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default()
    };
    assert_eq!(
        text("grpc-status"),
        (Code::DeadlineExceeded as u32).to_string(),
        "{md:?}"
    );
    assert_eq!(text("x-pitboss-error-class"), "deadline_exceeded", "{md:?}");
    assert_counted(&server, "other", "deadline_exceeded", before, 1.0).await;
    server.shutdown().await;
}

/// Calls refused before their request message is read, for a malformed
/// `grpc-timeout` or a second request message, are counted once each, class
/// `invalid_request`: under "other" (the command is in the message) or CreateSession.
/// Before, the second-message refusal was counted nowhere.
#[tokio::test]
async fn calls_refused_before_their_message_is_read_are_counted_once() {
    let _turn = SERIAL.lock().await;
    let (server, _client) = start_with("").await;
    let addr = server.bridge_addr;
    let other = counts(&server, "other", "invalid_request").await;
    let create = counts(&server, "CreateSession", "invalid_request").await;
    let echo = framed(&exec("echo", "{}"));

    let (status, message, _) =
        raw_grpc_with(addr, "/pitboss.v1.Bridge/Execute", "5", vec![echo.clone()]).await;
    assert_eq!(status, Code::Internal as u32, "{message}");
    let two: bytes::Bytes = [echo.clone(), echo.clone()].concat().into();
    let (status, message, _) =
        raw_grpc_with(addr, "/pitboss.v1.Bridge/ExecuteStream", "10S", vec![two]).await;
    assert_eq!(status, Code::Internal as u32, "{message}");
    assert!(message.contains("more than one message"), "{message}");
    let session = framed(&pb::CreateSessionRequest::default());
    let (status, message, _) = raw_grpc_with(
        addr,
        "/pitboss.v1.Bridge/CreateSession",
        "1.5S",
        vec![session],
    )
    .await;
    assert_eq!(status, Code::Internal as u32, "{message}");

    assert_counted(&server, "other", "invalid_request", other, 2.0).await;
    assert_counted(&server, "CreateSession", "invalid_request", create, 1.0).await;
    server.shutdown().await;
}

/// A raw HTTP/2 connection to `addr` and a request head for `path`.
async fn h2_to(addr: std::net::SocketAddr) -> h2::client::SendRequest<bytes::Bytes> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (h2, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(conn);
    h2.ready().await.unwrap()
}

fn head(addr: std::net::SocketAddr, path: &str) -> http::Request<()> {
    http::Request::builder()
        .method("POST")
        .uri(format!("http://{addr}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap()
}

/// A client that cancels (RST_STREAM CANCEL, as gRPC clients send it) while its
/// request message is still on the way: a large upload abandoned, a client that timed
/// out on its own clock. The call never reaches a handler, and was counted nowhere.
#[tokio::test]
async fn a_call_cancelled_while_its_message_is_on_the_way_is_counted_cancelled() {
    let _turn = SERIAL.lock().await;
    let (server, _client) = start_with("").await;
    let addr = server.bridge_addr;
    let other = counts(&server, "other", "cancelled").await;
    let create = counts(&server, "CreateSession", "cancelled").await;

    let mut h2 = h2_to(addr).await;
    let mut halves = Vec::new();
    for path in [
        "/pitboss.v1.Bridge/Execute",
        "/pitboss.v1.Bridge/CreateSession",
    ] {
        let (answer, mut half) = h2.send_request(head(addr, path), false).unwrap();
        // The prefix announces 10 bytes; 2 come.
        half.send_data(bytes::Bytes::from_static(&[0, 0, 0, 0, 10, 8, 1]), false)
            .unwrap();
        halves.push((answer, half));
        h2 = h2.ready().await.unwrap();
    }
    // An answered call on the same connection: the server has taken the two before it
    // (HTTP/2 streams are taken in order).
    let (answer, mut send) = h2
        .send_request(head(addr, "/pitboss.v1.Bridge/ListCommands"), false)
        .unwrap();
    send.send_data(framed(&pb::ListCommandsRequest::default()), true)
        .unwrap();
    let (parts, mut body) = answer.await.unwrap().into_parts();
    assert_eq!(parts.status, 200);
    while let Some(chunk) = body.data().await {
        let _ = body.flow_control().release_capacity(chunk.unwrap().len());
    }
    body.trailers().await.unwrap();
    for (_, half) in &mut halves {
        half.send_reset(h2::Reason::CANCEL);
    }

    assert_counted(&server, "other", "cancelled", other, 1.0).await;
    assert_counted(&server, "CreateSession", "cancelled", create, 1.0).await;
    server.shutdown().await;
}

/// A body that ends before its one message is whole (no message at all; a message cut
/// short), and a message over `server.max_message_bytes` (refused from its prefix):
/// the caller's error, with pitboss's class and a message that says what was wrong,
/// counted once. tonic answered the first two "Missing request message." and
/// "Unexpected EOF decoding stream." without a class, and none was counted.
#[tokio::test]
async fn a_body_without_its_one_whole_message_is_invalid_request_and_counted() {
    let _turn = SERIAL.lock().await;
    let (server, _client) = start_with("").await;
    let addr = server.bridge_addr;
    let other = counts(&server, "other", "invalid_request").await;
    let create = counts(&server, "CreateSession", "invalid_request").await;
    let execute = "/pitboss.v1.Bridge/Execute";

    let (status, message, class) =
        raw_grpc_with(addr, execute, "5S", vec![bytes::Bytes::new()]).await;
    assert_eq!(
        (status, class.as_str()),
        (Code::Internal as u32, "invalid_request"),
        "{message}"
    );
    assert!(message.contains("carried no message"), "{message}");

    let cut = bytes::Bytes::from_static(&[0, 0, 0, 0, 10, 8, 1]);
    let (status, message, class) = raw_grpc_with(addr, execute, "5S", vec![cut]).await;
    assert_eq!(
        (status, class.as_str()),
        (Code::Internal as u32, "invalid_request"),
        "{message}"
    );
    assert!(message.contains("ended inside its message"), "{message}");

    // 256 MiB announced, over the 16 MiB default: refused from the prefix.
    let huge = bytes::Bytes::from_static(&[0, 0x10, 0, 0, 0, 8, 1]);
    let (status, message, class) = raw_grpc_with(addr, execute, "5S", vec![huge]).await;
    assert_eq!(
        (status, class.as_str()),
        (Code::ResourceExhausted as u32, "invalid_request"),
        "{message}"
    );

    let (status, message, class) = raw_grpc_with(
        addr,
        "/pitboss.v1.Bridge/CreateSession",
        "5S",
        vec![bytes::Bytes::new()],
    )
    .await;
    assert_eq!(
        (status, class.as_str()),
        (Code::Internal as u32, "invalid_request"),
        "{message}"
    );

    assert_counted(&server, "other", "invalid_request", other, 3.0).await;
    assert_counted(&server, "CreateSession", "invalid_request", create, 1.0).await;
    server.shutdown().await;
}
