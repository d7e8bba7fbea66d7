//! pitboss itself as a process: SIGTERM drains and exits 0 leaving no Python
//! process; after a SIGKILL and a restart, sessions are gone (clients are told so)
//! and the rollout state persisted in the flags file is kept.

mod common;

use std::time::Duration;

use common::*;
use pitboss::grpc::pb;
use tonic::Code;

const LONG: Duration = Duration::from_secs(30);

async fn worker_pids(admin: &str, token: Option<&str>) -> Vec<u32> {
    let mut c = AdminClient::connect(admin.to_string()).await.unwrap();
    let req = match token {
        Some(t) => authed(pb::GetStatusRequest {}, t),
        None => tonic::Request::new(pb::GetStatusRequest {}),
    };
    let st = c.get_status(req).await.unwrap().into_inner();
    st.pools
        .iter()
        .flat_map(|p| p.workers.iter().map(|w| w.pid))
        .filter(|p| *p != 0)
        .collect()
}

/// Polls until `n` workers have a pid.
async fn wait_pids(admin: &str, token: Option<&str>, n: usize) -> Vec<u32> {
    for _ in 0..300 {
        let pids = worker_pids(admin, token).await;
        if pids.len() == n {
            return pids;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("never {n} workers with a pid");
}

async fn serving(bridge: &str) -> bool {
    let Ok(ch) = tonic::transport::Endpoint::from_shared(bridge.to_string())
        .unwrap()
        .connect()
        .await
    else {
        return false;
    };
    let mut h = tonic_health::pb::health_client::HealthClient::new(ch);
    h.check(tonic_health::pb::HealthCheckRequest {
        service: "pitboss.v1.Bridge".into(),
    })
    .await
    .map(|r| r.into_inner().status == 1)
    .unwrap_or(false)
}

/// The real binary on the fault adapter (2 workers) with `shutdown_grace`, once it is
/// SERVING: the process, its config's directory and its workers' pids.
async fn serving_faults(tag: &str, grace: &str) -> (Proc, std::path::PathBuf, Vec<u32>) {
    let dir = temp_dir(tag);
    let cfg = dir.join("p.toml");
    std::fs::write(
        &cfg,
        on_free_ports(
            &format!("shutdown_grace = \"{grace}\""),
            &pool_section("faults:adapter", 2),
        ),
    )
    .unwrap();
    let p = spawn(&cfg).await;
    let mut ok = false;
    for _ in 0..300 {
        if serving(&p.bridge).await {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ok, "never SERVING");
    let pids = wait_pids(&p.admin, None, 2).await;
    (p, dir, pids)
}

#[tokio::test]
async fn sigterm_drains_in_flight_calls_refuses_new_ones_and_leaves_no_python() {
    let (mut p, dir, pids) = serving_faults("life-term", "10s").await;

    // A call in flight when SIGTERM arrives.
    let mut client = Client::connect(p.bridge.clone()).await.unwrap();
    let mut c2 = client.clone();
    let slow = tokio::spawn(async move { c2.execute(exec("sleep", r#"{"seconds": 1.5}"#)).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    kill(p.child.id().unwrap(), libc::SIGTERM);

    // At once: new calls are refused with UNAVAILABLE.
    let refused = async {
        for _ in 0..100 {
            match client.execute(exec("pid", "{}")).await {
                Err(e) if e.code() == Code::Unavailable => return true,
                _ => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
        false
    };
    assert!(refused.await, "new calls were not refused");
    // The call in flight finishes.
    let r = slow.await.unwrap().expect("the in-flight call completes");
    assert!(String::from_utf8_lossy(&r.into_inner().payload).contains("slept"));
    // The process exits 0, and no Python process remains.
    let status = tokio::time::timeout(LONG, p.child.wait())
        .await
        .expect("exits within the grace period")
        .unwrap();
    assert!(status.success(), "{status}");
    assert!(
        eventually(Duration::from_secs(5), || pids.iter().all(|p| !alive(*p))).await,
        "workers outlived pitboss"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A second SIGINT during the drain (a second Ctrl-C) exits at once with 130 (128 +
/// SIGINT), without waiting for a long call, and no Python process remains. Before,
/// the second signal was swallowed and pitboss waited the whole shutdown_grace.
#[tokio::test]
async fn a_second_signal_during_the_drain_exits_at_once() {
    let (mut p, dir, pids) = serving_faults("life-second-signal", "60s").await;
    let mut client = Client::connect(p.bridge.clone()).await.unwrap();
    let slow =
        tokio::spawn(async move { client.execute(exec("sleep", r#"{"seconds": 50}"#)).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let pid = p.child.id().unwrap();
    kill(pid, libc::SIGINT);
    // Draining: the long call holds the exit.
    assert!(
        tokio::time::timeout(Duration::from_secs(1), p.child.wait())
            .await
            .is_err(),
        "exited before the second signal"
    );
    let started = std::time::Instant::now();
    kill(pid, libc::SIGINT);
    let status = tokio::time::timeout(LONG, p.child.wait())
        .await
        .expect("exits at the second signal")
        .unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(status.code(), Some(130), "{status}");
    assert!(slow.await.unwrap().is_err(), "the long call did not finish");
    assert!(
        eventually(Duration::from_secs(5), || pids.iter().all(|p| !alive(*p))).await,
        "workers outlived pitboss"
    );
    assert!(
        p.logged(|l| l.contains("a second SIGINT during the drain")),
        "not logged"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn after_a_crash_sessions_are_gone_and_the_rollout_state_is_kept() {
    let dir = temp_dir("life-restart");
    let cfg = dir.join("p.toml");
    std::fs::write(dir.join("token"), "life-token\n").unwrap();
    std::fs::write(
        &cfg,
        on_free_ports(
            "",
            &format!(
                "{pool}[rollout]\nflags_file = \"flags.toml\"\nadmin_token_file = \"token\"\n[backends.new]\nkind = \"pool\"\n\
                 [backends.new.pool]\nadapter = \"demo_v2:adapter\"\n",
                pool = pool_section("demo:adapter", 1)
            ),
        ),
    )
    .unwrap();
    let p = spawn(&cfg).await;
    let mut client = Client::connect(p.bridge.clone()).await.unwrap();
    let mut session = None;
    for _ in 0..300 {
        if let Ok(s) = client
            .create_session(pb::CreateSessionRequest::default())
            .await
        {
            session = Some(s.into_inner().session_id);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let session = session.expect("a session");
    let mut admin = AdminClient::connect(p.admin.clone()).await.unwrap();
    let set = authed(
        pb::SetRolloutRequest {
            mode: "canary".into(),
            percent: 25.0,
            actor: "ops".into(),
            ..Default::default()
        },
        "life-token",
    );
    admin.set_rollout(set).await.unwrap();
    // A legacy and a new worker.
    let pids = wait_pids(&p.admin, Some("life-token"), 2).await;

    // SIGKILL: the parent-death signal takes the workers down too.
    let mut child = p.child;
    child.start_kill().unwrap();
    child.wait().await.unwrap();
    assert!(
        eventually(Duration::from_secs(2), || pids.iter().all(|p| !alive(*p))).await,
        "workers outlived a SIGKILLed pitboss"
    );

    // Restart: the rollout state is read back from the flags file ...
    let p2 = spawn(&cfg).await;
    let mut admin = AdminClient::connect(p2.admin.clone()).await.unwrap();
    let get = authed(pb::GetRolloutRequest {}, "life-token");
    let r = admin.get_rollout(get).await.unwrap().into_inner();
    assert_eq!((r.mode.as_str(), r.percent), ("canary", 25.0));
    assert!(r.changed_by.starts_with("ops@"), "{}", r.changed_by);
    // ... and the old session is gone, which the client is told clearly.
    let mut client = Client::connect(p2.bridge.clone()).await.unwrap();
    let mut req = exec("counter", "{}");
    req.session_id = session.clone();
    let e = client.execute(req).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert_eq!(error_class(&e), "session_not_found");
    assert!(e.message().contains(&session), "{}", e.message());
    drop(p2);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Issue 13 item 4: a flags file that is invalid when pitboss starts (say, a bad
/// ConfigMap edit that the running pods rejected) does not crash-loop the pod: it
/// serves with everything on legacy and says so in /readyz and /metrics, while
/// `check-flags` still rejects the file.
#[tokio::test]
async fn an_invalid_flags_file_at_start_serves_everything_on_legacy_and_says_so() {
    let dir = temp_dir("life-badflags");
    let cfg = dir.join("p.toml");
    std::fs::write(
        dir.join("flags.toml"),
        "mode = \"canary\"\npercent = 150.0\ncommands = [\"*\"]\n",
    )
    .unwrap();
    std::fs::write(
        &cfg,
        on_free_ports(
            "",
            &format!(
                "{pool}[rollout]\nflags_file = \"flags.toml\"\n[backends.new]\nkind = \"pool\"\n\
                 [backends.new.pool]\nadapter = \"demo_v2:adapter\"\n",
                pool = pool_section("demo:adapter", 1)
            ),
        ),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pitboss"))
        .arg("check-flags")
        .arg(dir.join("flags.toml"))
        .output()
        .unwrap();
    assert!(!out.status.success(), "check-flags accepted a bad file");
    assert!(String::from_utf8_lossy(&out.stderr).contains("percent"));

    let p = spawn(&cfg).await;
    let mut client = Client::connect(p.bridge.clone()).await.unwrap();
    let mut served = false;
    for _ in 0..300 {
        match client.execute(exec("echo", "{}")).await {
            Ok(r) => {
                assert_eq!(r.metadata().get("x-pitboss-backend").unwrap(), "legacy");
                served = true;
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    assert!(served, "never served");
    for i in 0..20 {
        let mut req = exec("echo", "{}");
        req.routing_key = format!("key-{i}");
        let r = client.execute(req).await.unwrap();
        assert_eq!(r.metadata().get("x-pitboss-backend").unwrap(), "legacy");
    }
    let (code, body) = http_get(p.metrics, "/readyz").await;
    assert_eq!(code, 200, "{body}");
    assert!(
        body.contains("flags file rejected") && body.contains("percent"),
        "{body}"
    );
    let scrape = common::scrape(p.metrics).await;
    assert!(
        scrape.lines().any(|l| l == "pitboss_flags_file_valid 0"),
        "{scrape}"
    );
    drop(p);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Issue 13 item 12 with the real binary: commands that forked (`os.fork()`) or started
/// a subprocess (`subprocess.Popen(["sleep", "300"])`) leave nothing behind after
/// `kill -9` of pitboss. The parent-death signal reaches the workers only; each
/// worker's reaper kills the rest of its process group.
#[tokio::test]
async fn sigkill_leaves_no_process_a_command_forked_or_spawned() {
    let dir = temp_dir("life-orphans");
    let cfg = dir.join("p.toml");
    std::fs::write(&cfg, on_free_ports("", &pool_section("faults:adapter", 2))).unwrap();
    let p = spawn(&cfg).await;
    let mut ok = false;
    for _ in 0..300 {
        if serving(&p.bridge).await {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ok, "never SERVING");
    let workers = wait_pids(&p.admin, None, 2).await;
    let mut client = Client::connect(p.bridge.clone()).await.unwrap();
    let mut children = Vec::new();
    for how in ["fork", "popen", "fork", "popen"] {
        let r = client
            .execute(exec("spawn_child", format!(r#"{{"how": "{how}"}}"#)))
            .await
            .unwrap()
            .into_inner();
        let v: serde_json::Value = serde_json::from_slice(&r.payload).unwrap();
        children.push(v["pid"].as_u64().unwrap() as u32);
    }
    assert!(children.iter().all(|&c| alive(c)), "children not started");
    // Each worker's group: the worker, its reaper, and the children it started.
    let before: usize = workers.iter().map(|&w| group_members(w).len()).sum();
    assert!(before >= 2 + children.len(), "groups: {before} processes");

    let mut child = p.child;
    child.start_kill().unwrap();
    child.wait().await.unwrap();
    let gone = eventually(Duration::from_secs(5), || {
        workers.iter().all(|&w| group_members(w).is_empty()) && children.iter().all(|&c| !alive(c))
    })
    .await;
    let left: Vec<u32> = workers.iter().flat_map(|&w| group_members(w)).collect();
    for &pid in &left {
        kill(pid, libc::SIGKILL); // do not leave them to the next test run
    }
    assert!(gone, "outlived the SIGKILLed pitboss: {left:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A pitboss that waits at startup: for the 10 s that legacy's reflection is given
/// to answer (nothing listens at its address). Returns the child and its log lines
/// as they come, once it has logged "pitboss starting".
async fn spawn_waiting_at_startup(
    dir: &std::path::Path,
) -> (
    tokio::process::Child,
    tokio::sync::mpsc::UnboundedReceiver<String>,
) {
    let cfg = dir.join("p.toml");
    std::fs::write(
        &cfg,
        on_free_ports(
            "",
            "[backends.legacy]\nkind = \"grpc_proxy\"\naddress = \"http://127.0.0.1:9\"\n\
             [transparent]\nservices = [\"calc.Calculator\"]\ndescriptors_from_reflection = true\n",
        ),
    )
    .unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_pitboss"))
        .env("RUST_LOG", "info")
        .args(["--log-format", "json", "--config"])
        .arg(&cfg)
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        use tokio::io::AsyncBufReadExt;
        let mut lines = tokio::io::BufReader::new(stderr).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            let _ = tx.send(line);
        }
    });
    assert!(next_log(&mut rx, "pitboss starting").await, "no start line");
    (child, rx)
}

/// Reads log lines until one contains `text` (real time, generous bound).
async fn next_log(rx: &mut tokio::sync::mpsc::UnboundedReceiver<String>, text: &str) -> bool {
    tokio::time::timeout(LONG, async {
        while let Some(line) = rx.recv().await {
            if line.contains(text) {
                return true;
            }
        }
        false
    })
    .await
    .unwrap_or(false)
}

/// Signals that arrive while pitboss is still starting (here: waiting for legacy's
/// reflection) are handled. Before, the handlers were installed only once startup
/// was over: a SIGHUP (`systemctl reload`, a log rotator) killed pitboss, and a
/// SIGTERM killed it without a word.
#[tokio::test]
async fn signals_during_startup_are_handled() {
    let dir = temp_dir("life-startup-signals");
    // SIGHUP: pitboss starts anyway and serves.
    let (mut child, mut log) = spawn_waiting_at_startup(&dir).await;
    kill(child.id().unwrap(), libc::SIGHUP);
    assert!(
        next_log(&mut log, "pitboss listening").await,
        "did not start after a SIGHUP during startup: {:?}",
        child.try_wait()
    );
    assert!(child.try_wait().unwrap().is_none(), "exited");
    kill(child.id().unwrap(), libc::SIGTERM);
    let status = tokio::time::timeout(LONG, child.wait())
        .await
        .expect("stops on SIGTERM")
        .unwrap();
    assert_eq!(status.code(), Some(0), "{status}");

    // SIGTERM: pitboss stops at once, without waiting out the 10 s, and says why.
    let (mut child, mut log) = spawn_waiting_at_startup(&dir).await;
    let sent = std::time::Instant::now();
    kill(child.id().unwrap(), libc::SIGTERM);
    let status = tokio::time::timeout(LONG, child.wait())
        .await
        .expect("stops on SIGTERM during startup")
        .unwrap();
    assert!(
        sent.elapsed() < Duration::from_secs(5),
        "waited {:?}",
        sent.elapsed()
    );
    assert_eq!(status.code(), Some(143), "{status}");
    assert!(
        next_log(&mut log, "SIGTERM during startup").await,
        "not logged"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
