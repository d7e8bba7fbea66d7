//! Helpers shared by the integration tests: pools of the real example adapters, and
//! process checks through /proc.
#![allow(dead_code)]

use std::path::PathBuf;
use std::time::Duration;

use pitboss::grpc::pb;
use pitboss::pool::{Pool, PoolConfig, PoolRequest, PoolResponse, WorkerCommand};
use serde_json::Value;

pub fn python_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("python")
}

/// Logs to the test output when `RUST_LOG` is set (e.g. `RUST_LOG=pitboss=debug`).
pub fn init_tracing() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if std::env::var_os("RUST_LOG").is_some() {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
                .with_test_writer()
                .try_init();
        }
    });
}

fn base(adapter: &str, size: usize) -> PoolConfig {
    init_tracing();
    let mut worker = WorkerCommand::demo(python_dir());
    worker.adapter = adapter.into();
    let mut c = PoolConfig::new("test", worker);
    c.size = size;
    c.startup_timeout = Duration::from_secs(30);
    c.heartbeat_interval = Duration::from_millis(200);
    c.heartbeat_timeout = Duration::from_secs(5);
    c.restart.backoff_base = Duration::from_millis(20);
    c.restart.jitter = 0.0;
    c
}

/// A pool of `python/examples/demo.py`.
pub fn demo(size: usize) -> PoolConfig {
    base("demo:adapter", size)
}

/// A pool of `python/examples/faults.py`.
pub fn faults(size: usize) -> PoolConfig {
    base("faults:adapter", size)
}

pub fn req(command: &str, payload: Value) -> PoolRequest {
    PoolRequest::new(command, serde_json::to_vec(&payload).unwrap())
}

pub fn json(r: &PoolResponse) -> Value {
    serde_json::from_slice(&r.payload).unwrap_or_else(|e| {
        panic!(
            "response is not JSON ({e}): {:?}",
            String::from_utf8_lossy(&r.payload)
        )
    })
}

/// Whether a process exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            // The state follows the parenthesised command name.
            let state = stat.rsplit(')').next().unwrap_or("").trim_start();
            !state.starts_with('Z') && !state.starts_with('X')
        }
        Err(_) => false,
    }
}

/// The live (not zombie) processes of process group `pgid`, from /proc: a worker is
/// the leader of its own group, so this is the worker, its reaper and whatever a
/// command started that did not leave the group.
pub fn group_members(pgid: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| {
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                return false;
            };
            // After the parenthesised name: state, ppid, pgrp.
            let mut f = stat.rsplit(')').next().unwrap_or("").split_whitespace();
            let state = f.next().unwrap_or("Z");
            let pgrp = f.nth(1).and_then(|g| g.parse::<u32>().ok());
            pgrp == Some(pgid) && !state.starts_with('Z') && !state.starts_with('X')
        })
        .collect()
}

/// Polls `check` every 20 ms until it holds or `timeout` passes. Returns whether it held.
pub async fn eventually(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if check() {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn kill(pid: u32, signal: i32) {
    unsafe {
        libc::kill(pid as i32, signal);
    }
}

/// An `ExecuteRequest` for the gRPC tests.
pub fn exec(command: &str, payload: impl AsRef<[u8]>) -> pb::ExecuteRequest {
    pb::ExecuteRequest {
        command: command.into(),
        payload: payload.as_ref().to_vec().into(),
        ..Default::default()
    }
}

/// The same request, marked safe to run twice.
pub fn idempotent(req: pb::ExecuteRequest) -> pb::ExecuteRequest {
    pb::ExecuteRequest {
        idempotent: true,
        ..req
    }
}

/// Requests in flight over the whole pool.
pub fn in_flight(pool: &Pool) -> u32 {
    pool.status().workers.iter().map(|w| w.in_flight).sum()
}

/// A plain HTTP/1.1 GET: (status, body).
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let status: u16 = head.split(' ').nth(1).unwrap().parse().unwrap();
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        let mut out = String::new();
        let mut rest = body;
        while let Some((size, after)) = rest.split_once("\r\n") {
            let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
            if n == 0 {
                break;
            }
            out.push_str(&after[..n]);
            rest = &after[n + 2..];
        }
        out
    } else {
        body.to_string()
    };
    (status, body)
}

/// Every message of a stream, in order.
pub async fn collect<T>(mut stream: tonic::Streaming<T>) -> Vec<T> {
    let mut out = vec![];
    while let Some(m) = stream.message().await.unwrap() {
        out.push(m);
    }
    out
}

/// The value of the sample `name{labels}` with exactly these labels, if present.
pub fn sample(scrape: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let want: std::collections::BTreeMap<&str, &str> = labels.iter().copied().collect();
    scrape
        .lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (n, rest) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.strip_suffix('}')?),
                None => (series, ""),
            };
            if n != name {
                return None;
            }
            let got: std::collections::BTreeMap<&str, &str> = rest
                .split("\",")
                .filter(|p| !p.is_empty())
                .filter_map(|p| {
                    let (k, v) = p.split_once("=\"")?;
                    Some((k, v.trim_end_matches('"')))
                })
                .collect();
            (got == want).then(|| value.parse().ok()).flatten()
        })
}

/// The sum of every `name` sample whose labels include all of `labels`.
pub fn sum_of(scrape: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    scrape
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (n, rest) = series.split_once('{').unwrap_or((series, "}"));
            let rest = rest.strip_suffix('}')?;
            let got: Vec<(&str, &str)> = rest
                .split("\",")
                .filter_map(|p| {
                    let (k, v) = p.split_once("=\"")?;
                    Some((k, v.trim_end_matches('"')))
                })
                .collect();
            let all = labels.iter().all(|want| got.contains(want));
            (n == name && all)
                .then(|| value.parse::<f64>().ok())
                .flatten()
        })
        .sum()
}
