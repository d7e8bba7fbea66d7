//! A quick probe of the pool alone (no gRPC): startup time for 1, 4 and 8 workers, and
//! echo round trips sequentially and pipelined. The full benchmark suite lives in
//! `benches/`; this is for a fast look while working on the pool.
//!
//! Run: `cargo run --release --example pool_probe`

use std::path::PathBuf;
use std::time::{Duration, Instant};

use pitboss::pool::{Pool, PoolConfig, PoolRequest, WorkerCommand};

fn config(size: usize) -> PoolConfig {
    let python = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("python");
    let mut c = PoolConfig::new("probe", WorkerCommand::demo(python));
    c.size = size;
    c.worker_concurrency = 8;
    c
}

#[tokio::main]
async fn main() {
    // Resolve the interpreter once so the first startup is not charged for it.
    Pool::start(config(1)).await.unwrap().shutdown().await;
    for size in [1, 4, 8] {
        let mut times = vec![];
        for _ in 0..5 {
            let t = Instant::now();
            let pool = Pool::start(config(size)).await.unwrap();
            times.push(t.elapsed());
            pool.shutdown().await;
        }
        times.sort();
        println!(
            "startup, {size} workers: median {:?} (min {:?})",
            times[2], times[0]
        );
    }

    let pool = Pool::start(config(1)).await.unwrap();
    let payload = vec![b'x'; 64];
    let n = 20_000;
    for _ in 0..2000 {
        pool.execute(PoolRequest::new("echo", payload.clone()))
            .await
            .unwrap();
    }
    let t = Instant::now();
    for _ in 0..n {
        pool.execute(PoolRequest::new("echo", payload.clone()))
            .await
            .unwrap();
    }
    let seq = t.elapsed();
    println!(
        "echo 64 B, 1 worker, sequential: {:.0} req/s, {:.1} us/round trip",
        n as f64 / seq.as_secs_f64(),
        seq.as_secs_f64() * 1e6 / n as f64
    );
    for inflight in [8usize] {
        let t = Instant::now();
        let mut tasks = vec![];
        for _ in 0..inflight {
            let p = pool.clone();
            let payload = payload.clone();
            tasks.push(tokio::spawn(async move {
                for _ in 0..n / inflight {
                    p.execute(PoolRequest::new("echo", payload.clone()))
                        .await
                        .unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let el = t.elapsed();
        println!(
            "echo 64 B, 1 worker, {inflight} in flight: {:.0} req/s ({:.1}x sequential)",
            n as f64 / el.as_secs_f64(),
            seq.as_secs_f64() / el.as_secs_f64()
        );
    }
    pool.shutdown().await;
    let _ = Duration::ZERO;
}
