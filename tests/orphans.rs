//! No Python worker outlives pitboss, even when pitboss is killed with SIGKILL and gets
//! no chance to clean up: the parent-death signal does it. Nor does anything a command
//! started (`os.fork()`, `subprocess.Popen`): the worker's reaper kills its process
//! group when the worker dies.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use pitboss::pool::Pool;

const CHILD_ENV: &str = "PITBOSS_TEST_HOLD_POOL";

/// In the child process: start a pool, print its pids (and with `spawn`, the pids of
/// a forked and a Popen'd grandchild of each worker), and wait to be killed.
fn hold_pool(spawn: bool) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let pool = Pool::start(if spawn { faults(2) } else { demo(3) })
            .await
            .unwrap();
        let mut pids: Vec<u32> = pool.pids();
        if spawn {
            for how in ["fork", "popen", "fork", "popen"] {
                let r = pool
                    .execute(req("spawn_child", serde_json::json!({ "how": how })))
                    .await
                    .unwrap();
                pids.push(json(&r)["pid"].as_u64().unwrap() as u32);
            }
        }
        let pids: Vec<String> = pids.iter().map(u32::to_string).collect();
        println!("PIDS {}", pids.join(" "));
        tokio::time::sleep(Duration::from_secs(120)).await;
        drop(pool);
    });
}

/// Runs `test` in a child process that holds a pool, SIGKILLs that process once it has
/// printed its pids, and checks that every one of them is gone within 2 s.
fn kill_holder_and_expect_no_survivor(test: &str, expected: usize) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, test)
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
    assert_eq!(pids.len(), expected, "child did not report its processes");
    assert!(pids.iter().all(|&p| alive(p)));
    kill(child.id(), libc::SIGKILL);
    child.wait().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    rt.block_on(async {
        for &pid in &pids {
            assert!(
                eventually(Duration::from_secs(2), || !alive(pid)).await,
                "process {pid} outlived the SIGKILLed pitboss"
            );
        }
        // Nothing else of the workers' groups either (their reapers included).
        let empty = || pids.iter().all(|&p| group_members(p).is_empty());
        let emptied = eventually(Duration::from_secs(2), empty).await;
        let left: Vec<u32> = pids.iter().flat_map(|&p| group_members(p)).collect();
        assert!(emptied, "left in the workers' groups: {left:?}");
    });
}

#[test]
fn no_worker_survives_sigkill_of_its_parent() {
    if std::env::var_os(CHILD_ENV).is_some() {
        return hold_pool(false);
    }
    kill_holder_and_expect_no_survivor("no_worker_survives_sigkill_of_its_parent", 3);
}

/// Issue 13 item 12: a command that forked, or started a subprocess, leaves nothing
/// behind after `kill -9` of pitboss (the parent-death signal reaches the worker only;
/// its reaper takes the rest of the group).
#[test]
fn no_grandchild_survives_sigkill_of_pitboss() {
    if std::env::var_os(CHILD_ENV).is_some() {
        return hold_pool(true);
    }
    // 2 workers + 2 forked + 2 Popen'd children.
    kill_holder_and_expect_no_survivor("no_grandchild_survives_sigkill_of_pitboss", 6);
}
