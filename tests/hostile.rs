//! Hostile workers, one test each, with the fault-injection adapter
//! (`python/examples/faults.py`). The others (stdout prints, garbage frames, hangs,
//! heartbeats, crash loops, memory leaks) are in `tests/pool.rs` and
//! `tests/server.rs`; docs/RELIABILITY.md lists them all.

mod common;

use std::time::Duration;

use common::*;
use pitboss::pool::{Pool, PoolError};
use serde_json::json;

const LONG: Duration = Duration::from_secs(30);

async fn pool(size: usize, f: impl FnOnce(&mut pitboss::pool::PoolConfig)) -> Pool {
    let mut c = faults(size);
    f(&mut c);
    let p = Pool::start(c).await.unwrap();
    p.wait_ready(size, LONG).await.unwrap();
    p
}

/// The pool serves again after the bad worker is replaced, by a new process.
async fn recovers(pool: &Pool, old: u32) {
    assert!(
        eventually(LONG, || pool.status().ready == pool.status().size
            && !pool.pids().contains(&old))
        .await,
        "not replaced"
    );
    assert!(
        eventually(LONG, || !alive(old)).await,
        "old worker {old} still alive"
    );
    let r = pool.execute(req("pid", json!({}))).await.unwrap();
    assert_ne!(json(&r)["pid"], old);
}

#[tokio::test]
async fn a_worker_that_announces_an_oversized_frame_is_replaced() {
    let pool = pool(1, |c| c.max_frame_bytes = 64 * 1024).await;
    let old = pool.pids()[0];
    let err = pool.execute(req("oversized", json!({}))).await.unwrap_err();
    assert!(
        matches!(err, PoolError::Protocol { .. }),
        "a frame over the limit is a protocol error: {err}"
    );
    assert!(err.to_string().contains("broke the protocol"), "{err}");
    recovers(&pool, old).await;
    pool.shutdown().await;
}

#[tokio::test]
async fn a_worker_that_closes_stdout_but_stays_alive_is_killed_and_replaced() {
    let pool = pool(1, |_| {}).await;
    let old = pool.pids()[0];
    let err = pool
        .execute(req("close_stdout", json!({})))
        .await
        .unwrap_err();
    assert!(
        matches!(err, PoolError::WorkerCrashed { .. }),
        "the request is lost with the channel: {err}"
    );
    recovers(&pool, old).await;
    let st = pool.status();
    assert!(
        st.workers[0]
            .last_exit
            .as_deref()
            .unwrap_or("")
            .contains("closed its stdout"),
        "{:?}",
        st.workers[0].last_exit
    );
    pool.shutdown().await;
}

#[tokio::test]
async fn a_reply_to_a_request_never_sent_replaces_the_worker() {
    let pool = pool(1, |_| {}).await;
    let old = pool.pids()[0];
    let err = pool
        .execute(req("unknown_id", json!({})))
        .await
        .unwrap_err();
    assert!(matches!(err, PoolError::Protocol { .. }), "{err}");
    assert!(err.to_string().contains("unknown request id"), "{err}");
    recovers(&pool, old).await;
    pool.shutdown().await;
}

#[tokio::test]
async fn a_worker_that_ignores_sigterm_is_killed_on_shutdown() {
    let pool = pool(1, |c| {
        c.worker
            .env
            .push(("PITBOSS_FAULT_IGNORE_SIGTERM".into(), "1".into()));
        c.term_grace = Duration::from_millis(300);
        c.drain_timeout = Duration::from_millis(500);
    })
    .await;
    let old = pool.pids()[0];
    // Keep it busy so it cannot exit on the SHUTDOWN frame: a command that ignores
    // cancellation, then shut down.
    let p2 = pool.clone();
    let busy = tokio::spawn(async move { p2.execute(req("hang", json!({}))).await });
    assert!(eventually(LONG, || in_flight(&pool) == 1).await);
    let started = tokio::time::Instant::now();
    pool.shutdown().await;
    assert!(
        eventually(Duration::from_secs(10), || !alive(old)).await,
        "a worker ignoring SIGTERM outlived shutdown"
    );
    // The drain timeout, SIGTERM (ignored), then SIGKILL after term_grace: seconds,
    // not forever.
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    let _ = busy.await;
}
