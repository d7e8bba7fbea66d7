//! Retry against real workers: a worker killed mid-request, with and without
//! idempotency. The fault adapter records every execution in a file, so duplicates
//! would show.

mod common;

use std::time::Duration;

use common::*;
use pitboss::grpc::pb;
use pitboss::server::RunningServer;
use tonic::Code;

const LONG: Duration = Duration::from_secs(20);

async fn start_counting(count_file: &std::path::Path) -> (RunningServer, Client) {
    start_with(count_file, "").await
}

/// Two workers of the fault adapter, each recording its executions in `count_file`.
async fn start_with(count_file: &std::path::Path, extra: &str) -> (RunningServer, Client) {
    let rest = format!(
        "[pool]\nadapter = \"faults:adapter\"\nsize = 2\n\
         env = {{ PITBOSS_FAULT_COUNT_FILE = \"{}\" }}\n{extra}",
        count_file.display()
    );
    start(config(&on_free_ports("", &rest))).await
}

fn executions(file: &std::path::Path, id: &str) -> Vec<u32> {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let (rid, pid) = l.split_once(' ')?;
            (rid == id).then(|| pid.parse().ok()).flatten()
        })
        .collect()
}

/// Starts `count` for `id` (sleeping 2 s inside), kills its worker once it is running,
/// and returns the call's result.
async fn kill_mid_request(
    client: &mut pb::bridge_client::BridgeClient<tonic::transport::Channel>,
    file: &std::path::Path,
    id: &str,
    idempotent: bool,
) -> (
    Result<tonic::Response<pb::ExecuteResponse>, tonic::Status>,
    u32,
) {
    let mut c = client.clone();
    let req = pb::ExecuteRequest {
        idempotent,
        ..exec("count", format!(r#"{{"id": "{id}", "sleep": 2}}"#))
    };
    let call = tokio::spawn(async move { c.execute(req).await });
    let mut victim = 0;
    assert!(
        eventually(LONG, || {
            victim = executions(file, id).first().copied().unwrap_or(0);
            victim != 0
        })
        .await,
        "the command never started"
    );
    kill(victim, libc::SIGKILL);
    (call.await.unwrap(), victim)
}

#[tokio::test]
async fn an_idempotent_request_survives_its_worker_being_killed() {
    let dir = temp_dir("count-a");
    let file = dir.join("count");
    let (server, mut client) = start_counting(&file).await;
    let (result, victim) = kill_mid_request(&mut client, &file, "a", true).await;
    let r = result
        .expect("an idempotent request is retried")
        .into_inner();
    assert_eq!(r.attempts, 2, "attempts counts the retry");
    let v: serde_json::Value = serde_json::from_slice(&r.payload).unwrap();
    assert_ne!(
        v["pid"].as_u64().unwrap() as u32,
        victim,
        "retried on another worker"
    );
    assert_eq!(executions(&file, "a").len(), 2, "ran once per attempt");
    server.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_non_idempotent_request_gets_worker_crashed_and_runs_once() {
    let dir = temp_dir("count-b");
    let file = dir.join("count");
    let (server, mut client) = start_counting(&file).await;
    let (result, _) = kill_mid_request(&mut client, &file, "b", false).await;
    let err = result.expect_err("a non-idempotent request is not retried");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert_eq!(error_class(&err), "worker_crashed");
    assert_eq!(err.metadata().get("x-pitboss-attempts").unwrap(), "1");
    assert!(
        err.message().contains("retry if the command is idempotent"),
        "{}",
        err.message()
    );
    // Wait out the 2 s the command would have taken: no second execution appears.
    let pool = server.pool().clone();
    assert!(eventually(LONG, || pool.status().ready == 2).await);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(executions(&file, "b").len(), 1, "no duplicate execution");
    server.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn caller_errors_and_python_exceptions_are_not_retried() {
    let dir = temp_dir("count-c");
    let file = dir.join("count");
    let (server, mut client) = start_counting(&file).await;
    // The caller's error (pitboss_worker.InvalidRequest): INVALID_ARGUMENT.
    let err = client
        .execute(idempotent(exec(
            "raise",
            br#"{"type": "InvalidRequest", "message": "bad"}"#,
        )))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(err.metadata().get("x-pitboss-attempts").unwrap(), "1");
    // A ValueError raised by the command's code is its failure (UNKNOWN), not retried
    // either: it is the command's answer.
    let err = client
        .execute(idempotent(exec(
            "raise",
            br#"{"type": "ValueError", "message": "bad"}"#,
        )))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unknown);
    assert_eq!(err.metadata().get("x-pitboss-attempts").unwrap(), "1");
    server.shutdown().await;
}

#[tokio::test]
async fn over_the_concurrency_limit_calls_are_shed_at_once_with_pushback() {
    let dir = temp_dir("count-d");
    let file = dir.join("count");
    let (server, client) = start_with(&file, "[limits]\nmax_concurrency = 2\n").await;
    let slow = |c: &pb::bridge_client::BridgeClient<tonic::transport::Channel>| {
        let mut c = c.clone();
        tokio::spawn(async move { c.execute(exec("async_sleep", br#"{"seconds": 1.5}"#)).await })
    };
    let held = [slow(&client), slow(&client)];
    let pool = server.pool().clone();
    assert!(eventually(LONG, || in_flight(&pool) == 2).await);
    let start = tokio::time::Instant::now();
    let mut c = client.clone();
    let err = c.execute(exec("echo", b"1")).await.unwrap_err();
    assert!(
        start.elapsed() < Duration::from_millis(500),
        "shed at once: {:?}",
        start.elapsed()
    );
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert_eq!(error_class(&err), "pool_exhausted");
    assert!(err.metadata().get("grpc-retry-pushback-ms").is_some());
    assert!(
        err.message().contains("concurrency limit"),
        "{}",
        err.message()
    );
    for h in held {
        h.await.unwrap().expect("calls under the limit complete");
    }
    server.shutdown().await;
}

#[tokio::test]
async fn the_breaker_opens_under_a_burst_of_crashes_fails_fast_and_recovers() {
    let dir = temp_dir("count-e");
    let file = dir.join("count");
    let (server, mut client) = start_with(
        &file,
        "[pool.restart]\nbackoff_base = \"20ms\"\nmax_restarts = 50\n\
         [circuit_breaker]\nconsecutive_failures = 3\nopen_for = \"1s\"\n",
    )
    .await;
    for _ in 0..3 {
        let err = client.execute(exec("crash", "{}")).await.unwrap_err();
        assert_eq!(error_class(&err), "worker_crashed");
    }
    // Open: refused at once, without touching a worker, with pushback.
    let start = tokio::time::Instant::now();
    let err = client.execute(exec("echo", "1")).await.unwrap_err();
    assert!(
        start.elapsed() < Duration::from_millis(200),
        "fails fast: {:?}",
        start.elapsed()
    );
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert_eq!(error_class(&err), "circuit_open");
    let pushback: u64 = err
        .metadata()
        .get("grpc-retry-pushback-ms")
        .unwrap()
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(pushback > 0 && pushback <= 1000, "{pushback}");
    // Streams are guarded by the same breaker.
    let err = client
        .execute_stream(exec("stream_chunks_never_sent", "{}"))
        .await
        .unwrap_err();
    assert_eq!(error_class(&err), "circuit_open");
    // After open_for, a probe goes through, succeeds, and closes the breaker.
    let pool = server.pool().clone();
    assert!(eventually(LONG, || pool.status().ready == 2).await);
    tokio::time::sleep(Duration::from_millis(pushback + 50)).await;
    let r = client
        .execute(exec("echo", "1"))
        .await
        .expect("the probe succeeds");
    assert_eq!(&r.into_inner().payload[..], b"1");
    for _ in 0..5 {
        client
            .execute(exec("echo", "2"))
            .await
            .expect("closed again");
    }
    server.shutdown().await;
}

#[tokio::test]
async fn a_slow_attempt_is_cut_by_the_per_try_timeout_and_retried() {
    let dir = temp_dir("count-f");
    let file = dir.join("count");
    let (server, mut client) = start_with(&file, "[retry]\nper_try_timeout = \"300ms\"\n").await;
    let mut req = tonic::Request::new(idempotent(exec(
        "count",
        br#"{"id": "f", "sleep_first": 3}"#,
    )));
    req.set_timeout(Duration::from_secs(10));
    let start = tokio::time::Instant::now();
    let r = client
        .execute(req)
        .await
        .expect("the second attempt is fast")
        .into_inner();
    assert_eq!(r.attempts, 2);
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
    let v: serde_json::Value = serde_json::from_slice(&r.payload).unwrap();
    assert!(v.get("slow").is_none(), "answered by the fast retry: {v}");
    server.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn retries_stay_within_the_budget_when_every_call_fails() {
    let dir = temp_dir("count-g");
    let file = dir.join("count");
    let (server, mut client) = start_with(
        &file,
        "[pool.restart]\nbackoff_base = \"10ms\"\nbackoff_max = \"50ms\"\nmax_restarts = 1000\n\
         [circuit_breaker]\nenabled = false\n\
         [retry]\nmax_attempts = 5\nbudget_percent = 0.2\nbudget_min_per_sec = 1\nbudget_window = \"1s\"\n",
    )
    .await;
    let calls = 20;
    let mut attempts = 0;
    let mut exhausted = 0;
    let started = std::time::Instant::now();
    for _ in 0..calls {
        let err = client
            .execute(idempotent(exec("crash", b"{}")))
            .await
            .unwrap_err();
        assert_eq!(error_class(&err), "worker_crashed");
        attempts += err
            .metadata()
            .get("x-pitboss-attempts")
            .unwrap()
            .to_str()
            .unwrap()
            .parse::<u32>()
            .unwrap();
        if err
            .metadata()
            .get("x-pitboss-retry-budget-exhausted")
            .is_some()
        {
            exhausted += 1;
        }
    }
    let retries = attempts - calls;
    // Without a budget: 4 retries per call = 80. With it: 20% of calls plus a reserve
    // of 1 retry per second, so a slow run (a loaded machine) earns a little more.
    let seconds = started.elapsed().as_secs() as u32 + 1;
    assert!(
        retries <= calls / 5 + seconds + 1,
        "{retries} retries for {calls} calls in {seconds} s"
    );
    assert!(
        exhausted >= calls / 2,
        "{exhausted} calls stopped by the budget"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn a_worker_that_keeps_failing_is_ejected_and_the_pool_keeps_serving() {
    let dir = temp_dir("count-h");
    let file = dir.join("count");
    let (server, mut client) = start_with(
        &file,
        "[circuit_breaker]\nenabled = false\nworker_consecutive_failures = 3\n\
         worker_cooldown = \"60s\"\nmax_ejected_share = 0.5\nworker_replace_after = 0\n",
    )
    .await;
    // MemoryError is a system failure by default (worker_crashed), yet the worker
    // stays alive: exactly the case for ejection rather than restart.
    for _ in 0..6 {
        let err = client
            .execute(exec(
                "raise",
                br#"{"type": "MemoryError", "message": "oom"}"#,
            ))
            .await
            .unwrap_err();
        assert_eq!(error_class(&err), "worker_crashed");
    }
    let st = server.pool().status();
    let ejected: Vec<_> = st.workers.iter().filter(|w| w.ejected).collect();
    assert_eq!(
        ejected.len(),
        1,
        "one ejected, the cap keeps the other: {st:#?}"
    );
    assert_eq!(st.ready, 2, "ejected, not killed");
    let ejected_pid = ejected[0].pid.unwrap();
    for _ in 0..10 {
        let r = client
            .execute(exec("pid", b"{}"))
            .await
            .unwrap()
            .into_inner();
        let v: serde_json::Value = serde_json::from_slice(&r.payload).unwrap();
        assert_ne!(
            v["pid"].as_u64().unwrap() as u32,
            ejected_pid,
            "no traffic to the ejected worker"
        );
    }
    server.shutdown().await;
}

/// Issue 13, item 9: `pool.queue_timeout` is the longest a call waits for a free
/// worker, not a wait per attempt: a queue timeout is not retried on the same backend.
#[tokio::test]
async fn a_queue_timeout_is_not_multiplied_by_retries() {
    let (server, client) = start(config(&on_free_ports(
        "",
        "[pool]\nadapter = \"faults:adapter\"\nsize = 1\nworker_concurrency = 1\nqueue_timeout = \"2s\"\n",
    )))
    .await;
    let mut busy = client.clone();
    let held = tokio::spawn(async move { busy.execute(exec("sleep", br#"{"seconds": 8}"#)).await });
    let pool = server.pool().clone();
    assert!(eventually(LONG, || in_flight(&pool) == 1).await);
    let start = tokio::time::Instant::now();
    let err = client
        .clone()
        .execute(idempotent(exec("echo", b"1")))
        .await
        .unwrap_err();
    let waited = start.elapsed();
    assert_eq!(error_class(&err), "pool_exhausted", "{err:?}");
    assert!(err.message().contains("queue timeout"), "{}", err.message());
    // About one queue_timeout (2 s); three attempts would take over 6 s.
    assert!(
        waited >= Duration::from_millis(1900) && waited < Duration::from_millis(4500),
        "waited {waited:?}"
    );
    assert_eq!(err.metadata().get("x-pitboss-attempts").unwrap(), "1");
    held.abort();
    server.shutdown().await;
}
