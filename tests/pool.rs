//! The worker pool against real Python workers (`python/examples/*.py`).

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::*;
use pitboss::pool::{
    AffinityMode, ExhaustedReason, Pool, PoolError, PoolRequest, SlotState, TimeoutStage,
};
use serde_json::json;
use tokio::time::Instant;

const LONG: Duration = Duration::from_secs(20);

#[tokio::test]
async fn round_trip_passes_the_payload_through_untouched() {
    let pool = Pool::start(demo(1)).await.unwrap();
    let payload: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
    let mut r = PoolRequest::new("echo", payload.clone());
    r.content_type = "application/octet-stream".into();
    let resp = pool.execute(r).await.unwrap();
    assert_eq!(resp.payload, payload);
    assert_eq!(resp.content_type, "application/octet-stream");
    let names: Vec<String> = pool.commands().into_iter().map(|c| c.name).collect();
    for c in ["echo", "compute", "counter", "stream", "sleep", "whoami"] {
        assert!(names.contains(&c.to_string()), "{c} missing from {names:?}");
    }
    pool.shutdown().await;
}

#[tokio::test]
async fn streaming_delivers_every_chunk_in_order() {
    let pool = Pool::start(demo(1)).await.unwrap();
    let mut stream = pool
        .execute_stream(req("stream", json!({"n": 25})))
        .await
        .unwrap();
    let mut seen = vec![];
    while let Some(chunk) = stream.next().await {
        seen.push(json(&chunk.unwrap())["i"].as_u64().unwrap());
    }
    assert_eq!(seen, (0..25).collect::<Vec<_>>());
    // A unary command asked for as a stream yields one chunk.
    let mut one = pool
        .execute_stream(req("echo", json!({"x": 1})))
        .await
        .unwrap();
    assert_eq!(json(&one.next().await.unwrap().unwrap()), json!({"x": 1}));
    assert!(one.next().await.is_none());
    // A streaming command asked for as unary is refused with a hint.
    let err = pool
        .execute(req("stream", json!({"n": 1})))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, PoolError::InvalidRequest(m) if m.contains("ExecuteStream")),
        "{err}"
    );
    pool.shutdown().await;
}

#[tokio::test]
async fn an_async_worker_runs_several_requests_at_once() {
    let mut cfg = demo(1);
    cfg.worker_concurrency = 8;
    let pool = Pool::start(cfg).await.unwrap();
    let start = Instant::now();
    let calls: Vec<_> = (0..6)
        .map(|_| pool.execute(req("sleep", json!({"seconds": 0.5}))))
        .collect();
    let results = futures_util::future::join_all(calls).await;
    let elapsed = start.elapsed();
    for r in results {
        assert_eq!(json(&r.unwrap())["slept"], json!(0.5));
    }
    // Serially this takes 3 s; concurrently about 0.5 s. The bound is generous.
    assert!(elapsed < Duration::from_millis(2000), "took {elapsed:?}");
    pool.shutdown().await;
}

#[tokio::test]
async fn python_exceptions_are_structured_and_do_not_kill_the_worker() {
    let pool = Pool::start(faults(1)).await.unwrap();
    let pid = pool.pids()[0];
    let err = pool
        .execute(req(
            "raise",
            json!({"type": "ValueError", "message": "bad input"}),
        ))
        .await
        .unwrap_err();
    match &err {
        PoolError::PythonException {
            error_type,
            message,
            traceback,
            ..
        } => {
            assert_eq!(error_type, "ValueError");
            assert_eq!(message, "bad input");
            assert!(traceback.contains("Traceback"), "{traceback}");
        }
        other => panic!("expected a Python exception, got {other:?}"),
    }
    let err = pool.execute(req("nope", json!({}))).await.unwrap_err();
    assert!(
        matches!(&err, PoolError::UnknownCommand { known, .. } if known.contains(&"echo".to_string())),
        "{err}"
    );
    assert!(err.to_string().contains("echo"));
    pool.execute(req("echo", json!(1))).await.unwrap();
    assert_eq!(pool.pids(), vec![pid]);
    pool.shutdown().await;
}

#[tokio::test]
async fn strict_queue_affinity_keeps_a_session_on_its_worker() {
    let mut cfg = demo(3);
    cfg.affinity = AffinityMode::StrictQueue;
    cfg.worker_concurrency = 1;
    let pool = Pool::start(cfg).await.unwrap();
    let s = pool.create_session(None, Default::default()).unwrap();
    assert_eq!(s.session_id.len(), 32);
    let mut pids = HashSet::new();
    // Concurrent calls queue for the session's worker rather than spreading out.
    let calls: Vec<_> = (0..5)
        .map(|_| pool.execute(req("counter", json!({})).session(s.session_id.clone())))
        .collect();
    let mut counts = vec![];
    for r in futures_util::future::join_all(calls).await {
        let r = r.unwrap();
        assert_eq!(r.worker, s.worker);
        let v = json(&r);
        pids.insert(v["pid"].as_u64().unwrap());
        counts.push(v["count"].as_u64().unwrap());
    }
    counts.sort();
    assert_eq!(counts, vec![1, 2, 3, 4, 5]);
    assert_eq!(pids.len(), 1);
    // Closing drops the state; the id is then unknown.
    pool.close_session(&s.session_id).unwrap();
    let err = pool
        .execute(req("counter", json!({})).session(s.session_id.clone()))
        .await
        .unwrap_err();
    assert!(matches!(err, PoolError::SessionNotFound { .. }), "{err}");
    pool.shutdown().await;
}

/// Starts a long call on the session's worker so that it is busy (concurrency 1).
async fn busy_session(
    mode: AffinityMode,
) -> (
    Pool,
    String,
    pitboss::worker::WorkerId,
    tokio::task::JoinHandle<()>,
) {
    let mut cfg = demo(2);
    cfg.affinity = mode;
    cfg.worker_concurrency = 1;
    let pool = Pool::start(cfg).await.unwrap();
    pool.wait_ready(2, LONG).await.unwrap();
    let s = pool.create_session(None, Default::default()).unwrap();
    let p = pool.clone();
    let sid = s.session_id.clone();
    let hog = tokio::spawn(async move {
        p.execute(req("sleep", json!({"seconds": 1.0})).session(sid))
            .await
            .unwrap();
    });
    let w = s.worker;
    assert!(
        eventually(LONG, || pool
            .status()
            .workers
            .iter()
            .any(|x| x.worker == Some(w) && x.in_flight == 1))
        .await
    );
    (pool, s.session_id, s.worker, hog)
}

#[tokio::test]
async fn strict_fail_fast_affinity_refuses_when_the_worker_is_busy() {
    let (pool, sid, _, hog) = busy_session(AffinityMode::StrictFailFast).await;
    let err = pool
        .execute(req("counter", json!({})).session(sid.clone()))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            PoolError::PoolExhausted {
                reason: ExhaustedReason::WorkerBusy
            }
        ),
        "{err}"
    );
    hog.await.unwrap();
    pool.execute(req("counter", json!({})).session(sid))
        .await
        .unwrap();
    pool.shutdown().await;
}

#[tokio::test]
async fn hint_affinity_uses_another_worker_when_the_sessions_is_busy() {
    let (pool, sid, worker, hog) = busy_session(AffinityMode::Hint).await;
    let r = pool
        .execute(req("counter", json!({})).session(sid.clone()))
        .await
        .unwrap();
    assert_ne!(
        r.worker, worker,
        "served elsewhere while the session's worker is busy"
    );
    hog.await.unwrap();
    let r = pool
        .execute(req("counter", json!({})).session(sid))
        .await
        .unwrap();
    assert_eq!(r.worker, worker, "back home once it is free");
    pool.shutdown().await;
}

#[tokio::test]
async fn a_session_whose_worker_died_is_lost_not_silently_moved() {
    let pool = Pool::start(demo(2)).await.unwrap();
    let s = pool.create_session(None, Default::default()).unwrap();
    let r = pool
        .execute(req("counter", json!({})).session(s.session_id.clone()))
        .await
        .unwrap();
    let pid = json(&r)["pid"].as_u64().unwrap() as u32;
    kill(pid, libc::SIGKILL);
    // Wait until the supervisor has replaced it.
    assert!(
        eventually(LONG, || pool
            .status()
            .workers
            .iter()
            .all(|w| w.pid != Some(pid) && w.state == SlotState::Ready))
        .await
    );
    let err = pool
        .execute(req("counter", json!({})).session(s.session_id.clone()))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, PoolError::SessionLost { worker, .. } if *worker == s.worker),
        "{err}"
    );
    assert!(matches!(
        pool.get_session(&s.session_id),
        Err(PoolError::SessionLost { .. })
    ));
    pool.close_session(&s.session_id).unwrap();
    pool.shutdown().await;
}

#[tokio::test]
async fn a_crashed_worker_is_replaced() {
    let pool = Pool::start(faults(2)).await.unwrap();
    let before: HashSet<u32> = pool.pids().into_iter().collect();
    let err = pool
        .execute(req("crash", json!({"code": 7})))
        .await
        .unwrap_err();
    match &err {
        PoolError::WorkerCrashed { detail, sent, .. } => {
            assert!(detail.contains("exit status 7"), "{detail}");
            assert!(sent);
        }
        other => panic!("expected worker_crashed, got {other:?}"),
    }
    assert!(eventually(LONG, || pool.status().ready == 2).await);
    let st = pool.status();
    assert_eq!(st.workers.iter().map(|w| w.restarts).sum::<u32>(), 1);
    let after: HashSet<u32> = pool.pids().into_iter().collect();
    assert_eq!(before.intersection(&after).count(), 1);
    for _ in 0..4 {
        pool.execute(req("echo", json!("still serving")))
            .await
            .unwrap();
    }
    pool.shutdown().await;
}

#[tokio::test]
async fn a_crash_loop_backs_off_and_marks_the_pool_degraded() {
    let mut cfg = faults(1);
    cfg.worker
        .env
        .push(("PITBOSS_FAULT_CRASH_ON_START".into(), "1".into()));
    cfg.restart.backoff_base = Duration::from_millis(50);
    cfg.restart.max_restarts = 3;
    cfg.restart.window = Duration::from_secs(60);
    cfg.restart.degraded_interval = Duration::from_secs(30);
    let pool = Pool::launch(cfg, std::sync::Arc::new(NoEvents))
        .await
        .unwrap();
    assert!(
        eventually(LONG, || pool.status().degraded).await,
        "{:?}",
        pool.status()
    );
    let st = pool.status();
    let w = &st.workers[0];
    assert_eq!(w.state, SlotState::BackingOff);
    assert_eq!(w.recent_crashes, 4);
    assert!(
        w.retry_in.unwrap() > Duration::from_secs(20),
        "slow retry while degraded: {w:?}"
    );
    assert!(
        w.last_exit.as_deref().unwrap().contains("exit status 3"),
        "{w:?}"
    );
    let err = pool.wait_started(Duration::from_secs(1)).await.unwrap_err();
    assert!(err.to_string().contains("exit status 3"), "{err}");
    pool.shutdown().await;
}

struct NoEvents;
impl pitboss::pool::PoolObserver for NoEvents {}

#[tokio::test]
async fn a_worker_that_stops_answering_heartbeats_is_replaced() {
    let mut cfg = faults(1);
    cfg.heartbeat_interval = Duration::from_millis(100);
    cfg.heartbeat_timeout = Duration::from_millis(600);
    let pool = Pool::start(cfg).await.unwrap();
    let pid = pool.pids()[0];
    let err = pool.execute(req("freeze", json!({}))).await.unwrap_err();
    assert!(err.to_string().contains("heartbeat"), "{err}");
    assert!(!alive(pid) || eventually(LONG, || !alive(pid)).await);
    assert!(eventually(LONG, || pool.status().ready == 1).await);
    assert!(pool.status().workers[0]
        .last_exit
        .as_deref()
        .unwrap()
        .contains("heartbeat"));
    pool.execute(req("echo", json!(1))).await.unwrap();
    pool.shutdown().await;
}

#[tokio::test]
async fn recycling_by_request_count_loses_no_request() {
    let mut cfg = demo(2);
    cfg.max_requests = 10;
    cfg.max_requests_jitter = 0;
    let pool = Pool::start(cfg).await.unwrap();
    let mut pids = HashSet::new();
    for round in 0..10 {
        let calls: Vec<_> = (0..6)
            .map(|_| pool.execute(req("whoami", json!({}))))
            .collect();
        for r in futures_util::future::join_all(calls).await {
            let r = r.unwrap_or_else(|e| panic!("round {round}: {e}"));
            pids.insert(json(&r)["pid"].as_u64().unwrap());
        }
    }
    // 60 requests over 2 workers recycled every 10: at least 5 distinct processes.
    assert!(pids.len() >= 5, "pids: {pids:?}");
    assert!(eventually(LONG, || pool.status().ready == 2).await);
    assert!(pool.status().workers.iter().any(|w| w
        .last_exit
        .as_deref()
        .is_some_and(|e| e.contains("recycle_requests"))));
    pool.shutdown().await;
}

#[tokio::test]
async fn recycling_by_memory_loses_no_request() {
    let mut cfg = faults(1);
    cfg.max_rss_bytes = Some(120 * 1024 * 1024);
    cfg.heartbeat_interval = Duration::from_millis(100);
    let pool = Pool::start(cfg).await.unwrap();
    let first = pool.pids()[0];
    pool.execute(req("alloc", json!({"mb": 200})))
        .await
        .unwrap();
    // Keep sending while the worker is drained and replaced: every request succeeds.
    let mut served_by = HashSet::from([first]);
    let deadline = Instant::now() + LONG;
    while Instant::now() < deadline {
        let r = pool.execute(req("pid", json!({}))).await.unwrap();
        served_by.insert(json(&r)["pid"].as_u64().unwrap() as u32);
        if served_by.len() > 1 {
            break;
        }
    }
    assert!(served_by.len() > 1, "worker was never recycled");
    assert!(eventually(LONG, || !alive(first)).await);
    let exit = pool.status().workers[0].last_exit.clone().unwrap();
    assert!(exit.contains("recycle_memory"), "{exit}");
    pool.shutdown().await;
}

#[tokio::test]
async fn garbage_on_stdout_replaces_the_worker_and_fails_only_that_request() {
    let pool = Pool::start(faults(1)).await.unwrap();
    let pid = pool.pids()[0];
    let err = pool.execute(req("garbage", json!({}))).await.unwrap_err();
    assert!(matches!(err, PoolError::Protocol { .. }), "{err}");
    assert!(
        eventually(LONG, || pool.status().ready == 1
            && pool.pids() != vec![pid])
        .await
    );
    assert!(!alive(pid));
    pool.execute(req("echo", json!(1))).await.unwrap();
    assert!(pool.status().workers[0]
        .last_exit
        .as_deref()
        .unwrap()
        .contains("protocol"));
    pool.shutdown().await;
}

#[tokio::test]
async fn print_in_user_code_is_harmless() {
    let pool = Pool::start(faults(1)).await.unwrap();
    let pid = pool.pids()[0];
    for _ in 0..3 {
        let r = pool.execute(req("print", json!({}))).await.unwrap();
        assert!(String::from_utf8_lossy(&r.payload).contains("ok"));
    }
    assert_eq!(pool.pids(), vec![pid]);
    assert_eq!(pool.status().workers[0].restarts, 0);
    pool.shutdown().await;
}

/// A call whose deadline passes in the queue is told the time it had, and one that
/// arrives with no time left is told so (before, both said "deadline of 0ns", the
/// time left at the moment of failing, whatever the client had asked for).
#[tokio::test]
async fn a_queue_timeout_reports_the_time_the_call_had() {
    let mut cfg = faults(1);
    cfg.worker_concurrency = 1;
    let pool = Pool::start(cfg).await.unwrap();
    let busy = {
        let pool = pool.clone();
        tokio::spawn(async move { pool.execute(req("sleep", json!({"seconds": 1.5}))).await })
    };
    assert!(eventually(LONG, || in_flight(&pool) == 1).await);
    let err = pool
        .execute(req("echo", json!(1)).timeout(Duration::from_millis(300)))
        .await
        .unwrap_err();
    assert!(
        matches!(err, PoolError::Timeout { stage: TimeoutStage::Queued, after, .. }
            if after > Duration::from_millis(290) && after <= Duration::from_millis(300)),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        "deadline of 300ms exceeded while waiting for a free worker"
    );
    let err = pool
        .execute(req("echo", json!(1)).timeout(Duration::ZERO))
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("no time was left when it reached pitboss"),
        "{err}"
    );
    busy.await.unwrap().unwrap();
    pool.shutdown().await;
}

#[tokio::test]
async fn a_deadline_cancels_and_a_stuck_command_gets_its_worker_killed() {
    let mut cfg = faults(1);
    cfg.cancel_grace = Duration::from_millis(300);
    let pool = Pool::start(cfg).await.unwrap();
    let pid = pool.pids()[0];

    // Cooperative: the command sees the cancel and stops; the worker lives on.
    let start = Instant::now();
    let err = pool
        .execute(req("sleep", json!({"seconds": 30})).timeout(Duration::from_millis(300)))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            PoolError::Timeout {
                stage: TimeoutStage::Running,
                ..
            }
        ),
        "{err}"
    );
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
    pool.execute(req("echo", json!(1))).await.unwrap();
    assert_eq!(pool.pids(), vec![pid]);

    // Stuck: the command ignores the cancel, so the worker is killed after the grace.
    let start = Instant::now();
    let err = pool
        .execute(req("hang", json!({})).timeout(Duration::from_millis(300)))
        .await
        .unwrap_err();
    assert!(matches!(err, PoolError::Timeout { .. }), "{err}");
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "the caller does not wait for the kill"
    );
    assert!(
        eventually(LONG, || !alive(pid)).await,
        "stuck worker was not killed"
    );
    // Dead is not yet replaced: wait until the supervisor has recorded the exit and
    // the replacement is ready (the old worker may still count as ready until then).
    assert!(
        eventually(LONG, || {
            let st = pool.status();
            st.ready == 1 && st.workers[0].last_exit.is_some()
        })
        .await
    );
    let exit = pool.status().workers[0].last_exit.clone().unwrap();
    assert!(exit.contains("did not stop"), "{exit}");
    pool.execute(req("echo", json!(1))).await.unwrap();
    pool.shutdown().await;
}

#[tokio::test]
async fn a_full_queue_refuses_at_once() {
    let mut cfg = demo(1);
    cfg.worker_concurrency = 1;
    cfg.queue_size = 2;
    let pool = Pool::start(cfg).await.unwrap();
    let mut held = vec![];
    for _ in 0..3 {
        let p = pool.clone();
        held.push(tokio::spawn(async move {
            p.execute(req("sleep", json!({"seconds": 0.5}))).await
        }));
    }
    assert!(eventually(LONG, || pool.status().queue_depth == 2).await);
    let start = Instant::now();
    let err = pool.execute(req("echo", json!(1))).await.unwrap_err();
    assert!(
        matches!(
            err,
            PoolError::PoolExhausted {
                reason: ExhaustedReason::QueueFull
            }
        ),
        "{err}"
    );
    assert!(start.elapsed() < Duration::from_millis(100));
    for h in held {
        h.await.unwrap().unwrap();
    }
    // A queue timeout is a distinct answer.
    let mut cfg = demo(1);
    cfg.worker_concurrency = 1;
    cfg.queue_timeout = Duration::from_millis(100);
    let pool2 = Pool::start(cfg).await.unwrap();
    let p = pool2.clone();
    let hog = tokio::spawn(async move { p.execute(req("sleep", json!({"seconds": 1.0}))).await });
    assert!(eventually(LONG, || pool2.status().workers[0].in_flight == 1).await);
    let err = pool2.execute(req("echo", json!(1))).await.unwrap_err();
    assert!(
        matches!(
            err,
            PoolError::PoolExhausted {
                reason: ExhaustedReason::QueueTimeout
            }
        ),
        "{err}"
    );
    hog.await.unwrap().unwrap();
    pool.shutdown().await;
    pool2.shutdown().await;
}

#[tokio::test]
async fn graceful_shutdown_finishes_in_flight_work_and_refuses_new_work() {
    let pool = Pool::start(demo(2)).await.unwrap();
    let pids = pool.pids();
    let running: Vec<_> = (0..2)
        .map(|_| {
            let p = pool.clone();
            tokio::spawn(async move { p.execute(req("sleep", json!({"seconds": 0.7}))).await })
        })
        .collect();
    assert!(eventually(LONG, || in_flight(&pool) == 2).await);
    let p = pool.clone();
    let shutdown = tokio::spawn(async move { p.shutdown().await });
    assert!(eventually(LONG, || pool.status().shutting_down).await);
    let err = pool.execute(req("echo", json!(1))).await.unwrap_err();
    assert!(matches!(err, PoolError::ShuttingDown), "{err}");
    for r in running {
        assert_eq!(json(&r.await.unwrap().unwrap())["slept"], json!(0.7));
    }
    shutdown.await.unwrap();
    for pid in pids {
        assert!(!alive(pid), "worker {pid} survived shutdown");
    }
    assert!(pool
        .status()
        .workers
        .iter()
        .all(|w| w.state == SlotState::Stopped));
}

#[tokio::test]
async fn dropping_the_pool_leaves_no_python_process() {
    let pool = Pool::start(demo(3)).await.unwrap();
    let pids = pool.pids();
    assert_eq!(pids.len(), 3);
    drop(pool);
    for pid in pids {
        assert!(
            eventually(LONG, || !alive(pid)).await,
            "worker {pid} survived the pool"
        );
    }
}

#[tokio::test]
async fn a_pool_of_several_workers_starts_them_concurrently() {
    let mut cfg = demo(4);
    cfg.startup_timeout = Duration::from_secs(30);
    let pool = Pool::start(cfg).await.unwrap();
    let st = pool.status();
    assert_eq!(st.ready, 4, "{st:?}");
    let pids: HashSet<u32> = pool.pids().into_iter().collect();
    assert_eq!(pids.len(), 4);
    pool.shutdown().await;
}
