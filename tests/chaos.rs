//! Chaos under load: a real server, real workers, a steady bounded load of mixed
//! calls, and a random worker SIGKILLed every ~200 ms for 30 s. Then: every
//! idempotent call succeeded, every other call succeeded or got a classified error,
//! nothing ran twice that must not, no client waited past its deadline, the pool is
//! whole again, no zombies, file descriptors back to baseline, and the metrics agree
//! with what the clients saw.
//!
//! One test in its own binary: the Prometheus recorder is process-wide.
//! `CHAOS_SECONDS` shortens or lengthens the killing phase (default 30).

mod common;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use pitboss::grpc::pb;
use pitboss::server::RunningServer;
use tokio::time::Instant;

const DEADLINE: Duration = Duration::from_secs(10);
const WORKERS: usize = 3;

/// What the clients saw: (command, outcome, error class) → count.
type Seen = Arc<Mutex<BTreeMap<(String, String, String), u64>>>;

fn see(seen: &Seen, command: &str, result: &Result<(), tonic::Status>) -> Option<String> {
    let (outcome, class) = match result {
        Ok(()) => ("ok".to_string(), String::new()),
        Err(s) => (
            "error".to_string(),
            s.metadata()
                .get("x-pitboss-error-class")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("UNCLASSIFIED")
                .to_string(),
        ),
    };
    *seen
        .lock()
        .unwrap()
        .entry((command.to_string(), outcome, class.clone()))
        .or_default() += 1;
    (!class.is_empty()).then_some(class)
}

fn timed<T>(msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.set_timeout(DEADLINE);
    r
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Child processes of this process that are zombies.
fn zombie_children() -> Vec<u32> {
    let me = std::process::id();
    let mut out = vec![];
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let rest: Vec<&str> = stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .split_whitespace()
            .collect();
        if rest.len() > 2 && rest[0] == "Z" && rest[1] == me.to_string() {
            out.push(pid);
        }
    }
    out
}

#[derive(Default)]
struct Tally {
    calls: AtomicU64,
    late: AtomicU64,
    wrong: AtomicU64,
    idempotent_failed: Mutex<Vec<String>>,
    unclassified: Mutex<Vec<String>>,
    non_idempotent_ids: Mutex<Vec<String>>,
}

async fn one_call(
    client: &mut Client,
    kind: u64,
    n: u64,
    t: &Tally,
    seen: &Seen,
    session: &mut Option<String>,
) {
    let started = Instant::now();
    match kind {
        // Idempotent, no session: must succeed, with the right answer.
        0 | 1 => {
            let id = format!("i{n}");
            let r = client
                .execute(timed(idempotent(exec(
                    "count",
                    format!(r#"{{"id": "{id}"}}"#),
                ))))
                .await;
            let res = r.map(|resp| {
                let v: serde_json::Value =
                    serde_json::from_slice(&resp.into_inner().payload).unwrap();
                if v["id"] != id.as_str() {
                    t.wrong.fetch_add(1, Ordering::Relaxed);
                }
            });
            if let Err(e) = &res {
                t.idempotent_failed.lock().unwrap().push(format!(
                    "{:?}: {}",
                    e.code(),
                    e.message()
                ));
            }
            see(seen, "count", &res);
        }
        // Not idempotent: success or a classified error, and never run twice.
        2 => {
            let id = format!("n{n}");
            t.non_idempotent_ids.lock().unwrap().push(id.clone());
            let r = client
                .execute(timed(exec("count", format!(r#"{{"id": "{id}"}}"#))))
                .await
                .map(|_| ());
            if see(seen, "count", &r).as_deref() == Some("UNCLASSIFIED") {
                t.unclassified.lock().unwrap().push(format!("{r:?}"));
            }
        }
        // A session's calls: counts go up by one, or the session is lost with its worker.
        3 => {
            if session.is_none() {
                match client
                    .create_session(timed(pb::CreateSessionRequest::default()))
                    .await
                {
                    Ok(s) => *session = Some(s.into_inner().session_id),
                    Err(_) => return, // no worker ready this instant; not a call
                }
            }
            let mut req = exec("tally", "{}");
            req.session_id = session.clone().unwrap();
            let r = client.execute(timed(req)).await.map(|_| ());
            match see(seen, "tally", &r).as_deref() {
                None => {}
                Some("session_lost" | "session_not_found" | "worker_crashed") => *session = None,
                Some("UNCLASSIFIED") => t.unclassified.lock().unwrap().push(format!("{r:?}")),
                Some(_) => {}
            }
        }
        // A stream: every chunk in order, or a classified error.
        _ => {
            let r = async {
                let mut s = client
                    .execute_stream(timed(exec("chunks", r#"{"n": 5}"#)))
                    .await?
                    .into_inner();
                let mut i = 0;
                while let Some(c) = s.message().await? {
                    let v: serde_json::Value = serde_json::from_slice(&c.payload).unwrap();
                    if v["i"] != i {
                        t.wrong.fetch_add(1, Ordering::Relaxed);
                    }
                    i += 1;
                }
                if i != 5 {
                    t.wrong.fetch_add(1, Ordering::Relaxed);
                }
                Ok::<(), tonic::Status>(())
            }
            .await;
            if see(seen, "chunks", &r).as_deref() == Some("UNCLASSIFIED") {
                t.unclassified.lock().unwrap().push(format!("{r:?}"));
            }
        }
    }
    t.calls.fetch_add(1, Ordering::Relaxed);
    if started.elapsed() > DEADLINE + Duration::from_secs(1) {
        t.late.fetch_add(1, Ordering::Relaxed);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_under_load_loses_nothing() {
    init_tracing();
    let seconds: u64 = std::env::var("CHAOS_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    let dir = temp_dir("chaos");
    let count_file = dir.join("count");
    // Retries get room (a kill every 200 ms is far beyond normal), the breaker and
    // outlier ejection stay out of the way (they would fail calls fast on purpose),
    // and the crash-loop detector does not mark the pool degraded.
    let rest = format!(
        "{pool}queue_timeout = \"8s\"\nenv = {{ PITBOSS_FAULT_COUNT_FILE = \"{count}\" }}\n\
         [pool.restart]\nbackoff_base = \"10ms\"\nbackoff_max = \"100ms\"\nmax_restarts = 100000\n\
         [retry]\nmax_attempts = 6\nbackoff_base = \"10ms\"\nbackoff_max = \"200ms\"\nbudget_percent = 1.0\nbudget_min_per_sec = 1000\n\
         [circuit_breaker]\nconsecutive_failures = 100000\nmin_success_rate = 0.0\nworker_consecutive_failures = 0\n",
        pool = pool_section("faults:adapter", WORKERS),
        count = count_file.display(),
    );
    let config = config(&on_free_ports("shutdown_grace = \"10s\"", &rest));
    let server = RunningServer::start(config).await.unwrap();
    let pool = server.pool().clone();
    pool.wait_ready(WORKERS, Duration::from_secs(60))
        .await
        .unwrap();
    wait_known(&server, "count").await;
    let client = Client::connect(format!("http://{}", server.bridge_addr))
        .await
        .unwrap();
    // Warm the connection, then take the descriptor baseline.
    client.clone().execute(exec("pid", "{}")).await.unwrap();
    let fds_before = open_fds();

    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let seen: Seen = Default::default();
    let next = Arc::new(AtomicU64::new(0));
    let mut load = vec![];
    for task in 0..6u64 {
        let (mut c, stop, t, seen, next) = (
            client.clone(),
            stop.clone(),
            tally.clone(),
            seen.clone(),
            next.clone(),
        );
        load.push(tokio::spawn(async move {
            let mut session = None;
            let mut k = task;
            while !stop.load(Ordering::Relaxed) {
                let n = next.fetch_add(1, Ordering::Relaxed);
                one_call(&mut c, k % 6, n, &t, &seen, &mut session).await;
                k += 1;
            }
        }));
    }

    // The killer: a random worker, every ~200 ms.
    let mut killed = 0u64;
    let chaos_end = Instant::now() + Duration::from_secs(seconds);
    while Instant::now() < chaos_end {
        tokio::time::sleep(Duration::from_millis(150 + rand::random::<u64>() % 100)).await;
        let pids = pool.pids();
        if !pids.is_empty() {
            kill(
                pids[rand::random::<u32>() as usize % pids.len()],
                libc::SIGKILL,
            );
            killed += 1;
        }
    }
    stop.store(true, Ordering::Relaxed);
    for l in load {
        tokio::time::timeout(DEADLINE * 2, l)
            .await
            .expect("a client hung")
            .unwrap();
    }

    // Every idempotent call succeeded; the rest succeeded or were classified.
    let failed = tally.idempotent_failed.lock().unwrap().clone();
    assert!(failed.is_empty(), "idempotent calls failed: {failed:?}");
    let unclassified = tally.unclassified.lock().unwrap().clone();
    assert!(
        unclassified.is_empty(),
        "unclassified errors: {unclassified:?}"
    );
    assert_eq!(tally.wrong.load(Ordering::Relaxed), 0, "wrong answers");
    assert_eq!(
        tally.late.load(Ordering::Relaxed),
        0,
        "a client waited past its deadline"
    );

    // Nothing that must run once ran twice.
    let text = std::fs::read_to_string(&count_file).unwrap_or_default();
    let mut runs: HashMap<&str, u32> = HashMap::new();
    for line in text.lines() {
        *runs
            .entry(line.split(' ').next().unwrap_or(""))
            .or_default() += 1;
    }
    let ids = tally.non_idempotent_ids.lock().unwrap().clone();
    let twice: Vec<&String> = ids
        .iter()
        .filter(|id| runs.get(id.as_str()).copied().unwrap_or(0) > 1)
        .collect();
    assert!(
        twice.is_empty(),
        "non-idempotent calls ran twice: {twice:?}"
    );

    // The pool is whole again, with no zombies.
    assert!(
        eventually(Duration::from_secs(30), || pool.status().ready == WORKERS).await,
        "pool not back to {WORKERS} ready workers: {:?}",
        pool.status()
            .workers
            .iter()
            .map(|w| w.state)
            .collect::<Vec<_>>()
    );
    assert!(
        eventually(Duration::from_secs(10), || zombie_children().is_empty()).await,
        "zombies: {:?}",
        zombie_children()
    );
    // Descriptors back to the baseline (each worker's pipes were replaced one for one).
    assert!(
        eventually(Duration::from_secs(10), || open_fds() <= fds_before + 2).await,
        "open fds {} > baseline {fds_before}",
        open_fds()
    );

    // The metrics agree with the clients.
    let scrape = common::scrape(server.metrics_addr).await;
    let seen = seen.lock().unwrap().clone();
    for ((command, outcome, class), n) in &seen {
        let m = sum_of(
            &scrape,
            "pitboss_requests_total",
            &[
                ("command", command),
                ("outcome", outcome),
                ("error_class", class),
            ],
        );
        assert_eq!(m, *n as f64, "metrics for {command}/{outcome}/{class}");
    }
    let restarts = sum_of(
        &scrape,
        "pitboss_worker_restarts_total",
        &[("reason", "crash")],
    );
    let retries = sum_of(&scrape, "pitboss_retries_total", &[]);
    assert!(
        restarts >= killed as f64 * 0.9,
        "{restarts} restarts for {killed} kills"
    );

    let calls = tally.calls.load(Ordering::Relaxed);
    let ok: u64 = seen
        .iter()
        .filter(|((_, o, _), _)| o == "ok")
        .map(|(_, n)| n)
        .sum();
    let mut by_class: BTreeMap<&str, u64> = BTreeMap::new();
    for ((_, o, c), n) in &seen {
        if o == "error" {
            *by_class.entry(c.as_str()).or_default() += n;
        }
    }
    eprintln!(
        "CHAOS {seconds}s: calls {calls}, succeeded {ok}, retries {retries}, failed by class {by_class:?}, \
         workers killed {killed}, replaced {restarts}, fds {fds_before} -> {}",
        open_fds()
    );
    assert!(calls > 200, "the load ran: {calls}");
    server.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}
