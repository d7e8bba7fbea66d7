//! No Python worker outlives pitboss, even when pitboss is killed with SIGKILL and gets
//! no chance to clean up: the parent-death signal does it.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use pitboss::pool::Pool;

const CHILD_ENV: &str = "PITBOSS_TEST_HOLD_POOL";

/// In the child process: start a pool, print its pids, and wait to be killed.
fn hold_pool() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let pool = Pool::start(demo(3)).await.unwrap();
        let pids: Vec<String> = pool.pids().iter().map(u32::to_string).collect();
        println!("PIDS {}", pids.join(" "));
        tokio::time::sleep(Duration::from_secs(120)).await;
        drop(pool);
    });
}

#[test]
fn no_worker_survives_sigkill_of_its_parent() {
    if std::env::var_os(CHILD_ENV).is_some() {
        return hold_pool();
    }
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "no_worker_survives_sigkill_of_its_parent",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, "1")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = BufReader::new(child.stdout.take().unwrap());
    let mut pids = Vec::new();
    for line in stdout.lines() {
        let line = line.unwrap();
        if let Some(rest) = line.split("PIDS ").nth(1) {
            pids = rest.split(' ').map(|p| p.parse::<u32>().unwrap()).collect();
            break;
        }
    }
    assert_eq!(pids.len(), 3, "child did not report its workers");
    assert!(pids.iter().all(|&p| alive(p)));
    kill(child.id(), libc::SIGKILL);
    child.wait().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    rt.block_on(async {
        for pid in pids {
            assert!(
                eventually(Duration::from_secs(2), || !alive(pid)).await,
                "worker {pid} outlived its SIGKILLed parent"
            );
        }
    });
}
