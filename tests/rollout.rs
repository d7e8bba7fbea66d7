//! The rollout, end to end: a real server on 127.0.0.1:0 whose `legacy` backend runs
//! `python/examples/demo.py` and whose `new` backend runs `demo_v2.py` (or another
//! pitboss as a grpc upstream). `version` tells the two apart: 1 or 2.

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use pitboss::grpc::pb;
use pitboss::rollout::flags::RolloutState;
use pitboss::rollout::{bucket, bucket::in_new, Percent};
use pitboss::server::RunningServer;
use tonic::Code;

const LONG: Duration = Duration::from_secs(30);

struct Setup {
    dir: PathBuf,
    server: RunningServer,
    client: Client,
}

impl Setup {
    fn flags_path(&self) -> PathBuf {
        self.dir.join("flags.toml")
    }

    async fn admin(&self) -> AdminClient {
        AdminClient::connect(format!("http://{}", self.server.admin_addr))
            .await
            .unwrap()
    }

    fn flags(&self) -> Arc<pitboss::rollout::Flags> {
        self.server.edge().rollout().flags.get()
    }

    /// Writes the flags file the way an editor does (temp file, then rename) and waits
    /// until the server applies it.
    async fn write_flags(&self, text: &str, applied: impl Fn(&pitboss::rollout::Flags) -> bool) {
        let tmp = self.dir.join(".flags.toml.swp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, self.flags_path()).unwrap();
        assert!(
            eventually(Duration::from_secs(10), || applied(&self.flags())).await,
            "flags not applied: {text}"
        );
    }

    async fn stop(self) {
        self.server.shutdown().await;
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Both listeners on free ports, `size = 1` of `adapter` as legacy, the flags file and
/// token in `dir`, then `extra`.
fn config_text(dir: &Path, adapter: &str, extra: &str) -> String {
    let rest = format!(
        "{pool}[pool.restart]\nbackoff_base = \"20ms\"\njitter = 0.0\n{rollout}{extra}",
        pool = pool_section(adapter, 1),
        rollout = rollout_section(dir),
    );
    on_free_ports("shutdown_grace = \"10s\"", &rest)
}

const NEW_POOL: &str =
    "[backends.new]\nkind = \"pool\"\n[backends.new.pool]\nadapter = \"demo_v2:adapter\"\n";
const TOKEN: &str = "rollout-test-token";

async fn start(tag: &str, flags: &str, extra: &str) -> Setup {
    let dir = temp_dir(&format!("rollout-{tag}"));
    std::fs::write(dir.join("flags.toml"), flags).unwrap();
    std::fs::write(dir.join("token"), format!("{TOKEN}\n")).unwrap();
    let text = config_text(&dir, "demo:adapter", extra);
    let (server, client) = common::start(config(&text)).await;
    Setup {
        dir,
        server,
        client,
    }
}

fn with_key(mut r: pb::ExecuteRequest, key: &str) -> pb::ExecuteRequest {
    r.routing_key = key.into();
    r
}

/// Calls `version` and returns (backend field, version the adapter reported).
async fn version(client: &mut Client, r: pb::ExecuteRequest) -> (String, u64) {
    let resp = client.execute(r).await.unwrap_or_else(|s| panic!("{s:?}"));
    let header = resp
        .metadata()
        .get("x-pitboss-backend")
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    let r = resp.into_inner();
    assert_eq!(header, r.backend, "field and metadata agree");
    let v: serde_json::Value = serde_json::from_slice(&r.payload).unwrap();
    (r.backend, v["version"].as_u64().unwrap())
}

#[tokio::test]
async fn the_split_is_sticky_monotone_and_sessions_stay_pinned() {
    let mut s = start(
        "split",
        "mode = \"canary\"\npercent = 10.0\ncommands = [\"*\"]\nsalt = \"s1\"\n",
        NEW_POOL,
    )
    .await;
    let keys: Vec<String> = (0..300).map(|i| format!("user-{i}")).collect();
    let expect = |p: f64| -> Vec<bool> {
        let p = Percent::from_f64(p).unwrap();
        keys.iter().map(|k| in_new(bucket("s1", k), p)).collect()
    };
    let mut at10 = vec![];
    for k in &keys {
        let (backend, v) = version(&mut s.client, with_key(exec("version", "{}"), k)).await;
        assert_eq!(
            v,
            if backend == "new" { 2 } else { 1 },
            "backend {backend} ran it"
        );
        at10.push(backend == "new");
    }
    assert_eq!(
        at10,
        expect(10.0),
        "each key goes where the pure decision says"
    );
    let n10 = at10.iter().filter(|b| **b).count();
    assert!((10..60).contains(&n10), "about 10% of 300: {n10}");

    // Sessions created at 10% keep their backend for life.
    let mut sessions = vec![];
    for i in 0..40 {
        let sess = s
            .client
            .create_session(pb::CreateSessionRequest {
                session_id: format!("sess-{i}"),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        sessions.push((sess.session_id, sess.backend));
    }

    // Raise to 50% by editing the file: every key in new stays in new.
    s.write_flags(
        "mode = \"canary\"\npercent = 50.0\ncommands = [\"*\"]\nsalt = \"s1\"\n",
        |f| f.percent.0.as_f64() == 50.0,
    )
    .await;
    let mut at50 = vec![];
    for k in &keys {
        let (backend, _) = version(&mut s.client, with_key(exec("version", "{}"), k)).await;
        at50.push(backend == "new");
    }
    assert_eq!(at50, expect(50.0));
    for (i, was_new) in at10.iter().enumerate() {
        assert!(
            !was_new || at50[i],
            "key {} moved from new back to legacy",
            keys[i]
        );
    }
    for (id, backend) in &sessions {
        let mut r = exec("counter", "{}");
        r.session_id = id.clone();
        let resp = s.client.execute(r).await.unwrap().into_inner();
        assert_eq!(&resp.backend, backend, "session {id} moved");
    }
    // Lowering back to 10% moves only the keys above the new line.
    s.write_flags(
        "mode = \"canary\"\npercent = 10.0\ncommands = [\"*\"]\nsalt = \"s1\"\n",
        |f| f.percent.0.as_f64() == 10.0,
    )
    .await;
    for (i, k) in keys.iter().enumerate().take(100) {
        let (backend, _) = version(&mut s.client, with_key(exec("version", "{}"), k)).await;
        assert_eq!(backend == "new", at10[i], "{k}");
    }
    s.stop().await;
}

#[tokio::test]
async fn commands_outside_the_allowlist_stay_on_legacy() {
    let mut s = start(
        "allow",
        "mode = \"full\"\ncommands = [\"compute\"]\n",
        NEW_POOL,
    )
    .await;
    let (backend, v) = version(&mut s.client, exec("version", "{}")).await;
    assert_eq!((backend.as_str(), v), ("legacy", 1));
    let r = s
        .client
        .execute(exec("compute", r#"{"n": 10}"#))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.backend, "new");
    let v: serde_json::Value = serde_json::from_slice(&r.payload).unwrap();
    assert_eq!(v["engine"], "v2");
    // With a partial allowlist, sessions stay on legacy (their calls can't be split).
    let sess = s
        .client
        .create_session(pb::CreateSessionRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(sess.backend, "legacy");
    let cmds = s
        .client
        .list_commands(pb::ListCommandsRequest {})
        .await
        .unwrap()
        .into_inner();
    let version_cmd = cmds.commands.iter().find(|c| c.name == "version").unwrap();
    assert_eq!(version_cmd.backends, vec!["legacy", "new"]);
    s.stop().await;
}

#[tokio::test]
async fn hot_reload_under_load_loses_nothing_and_bad_files_keep_the_old_flags() {
    let s = start(
        "reload",
        "mode = \"canary\"\npercent = 0.0\ncommands = [\"*\"]\n",
        NEW_POOL,
    )
    .await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let mut tasks = vec![];
    for t in 0..4 {
        let mut client = s.client.clone();
        let (stop, ok) = (stop.clone(), ok.clone());
        tasks.push(tokio::spawn(async move {
            let mut failures = vec![];
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let r = with_key(exec("version", "{}"), &format!("k{t}-{i}"));
                match client.execute(r).await {
                    Ok(_) => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => failures.push(e),
                }
            }
            failures
        }));
    }
    // Ten percentages, written alternately in place and by rename, plus a bad file.
    for step in 1..=10 {
        let text = format!(
            "mode = \"canary\"\npercent = {}.0\ncommands = [\"*\"]\n",
            step * 10
        );
        if step % 2 == 0 {
            std::fs::write(s.flags_path(), &text).unwrap();
            assert!(
                eventually(Duration::from_secs(10), || s.flags().percent.0.as_f64()
                    == (step * 10) as f64)
                .await
            );
        } else {
            s.write_flags(&text, |f| f.percent.0.as_f64() == (step * 10) as f64)
                .await;
        }
        if step == 5 {
            let failed_before = s.server.edge().rollout().flags.reloads().1;
            std::fs::write(
                s.flags_path(),
                "mode = \"canary\"\npercent = 55.0\ncommands = [\"*\"]\nsalt = \"\"\n",
            )
            .unwrap();
            assert!(
                eventually(Duration::from_secs(10), || s
                    .server
                    .edge()
                    .rollout()
                    .flags
                    .reloads()
                    .1
                    > failed_before)
                .await
            );
            assert_eq!(s.flags().percent.0.as_f64(), 50.0, "the old flags stay");
            let err = s.server.edge().rollout().flags.last_error().unwrap();
            assert!(
                err.contains("flags.toml:4") && err.contains("salt"),
                "{err}"
            );
        }
    }
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let failures = t.await.unwrap();
        assert!(
            failures.is_empty(),
            "calls failed during reloads: {failures:?}"
        );
    }
    assert!(ok.load(Ordering::Relaxed) > 20, "load ran");
    s.stop().await;
}

#[tokio::test]
async fn shadow_mode_answers_from_legacy_and_counts_mismatches() {
    let mut s = start(
        "shadow",
        "mode = \"shadow\"\ncommands = [\"*\"]\n[shadow]\ncompare = \"json\"\n",
        NEW_POOL,
    )
    .await;
    for _ in 0..10 {
        let r = s
            .client
            .execute(idempotent(exec("compute", r#"{"n": 100}"#)))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.backend, "legacy");
        let v: serde_json::Value = serde_json::from_slice(&r.payload).unwrap();
        assert!(
            v.get("engine").is_none(),
            "the client gets legacy's answer: {v}"
        );
        s.client
            .execute(idempotent(exec("echo", r#"{"a": 1}"#)))
            .await
            .unwrap();
        // Not idempotent: never shadowed.
        s.client.execute(exec("echo", "{}")).await.unwrap();
    }
    let counters = &s.server.edge().rollout().counters;
    assert!(
        eventually(LONG, || counters.shadow_match.load(Ordering::Relaxed)
            + counters.shadow_mismatch.load(Ordering::Relaxed)
            >= 20)
        .await
    );
    assert_eq!(
        counters.shadow_mismatch.load(Ordering::Relaxed),
        10,
        "compute differs"
    );
    assert_eq!(
        counters.shadow_match.load(Ordering::Relaxed),
        10,
        "echo matches"
    );
    assert_eq!(counters.shadow_error.load(Ordering::Relaxed), 0);
    // Ignoring the field that differs turns mismatches into matches.
    s.write_flags(
        "mode = \"shadow\"\ncommands = [\"*\"]\n[shadow]\nignore_fields = [\"engine\"]\n",
        |f| !f.shadow.ignore_fields.is_empty(),
    )
    .await;
    for _ in 0..5 {
        s.client
            .execute(idempotent(exec("compute", r#"{"n": 100}"#)))
            .await
            .unwrap();
    }
    assert!(
        eventually(LONG, || counters.shadow_match.load(Ordering::Relaxed) >= 15).await,
        "ignored fields match"
    );
    assert_eq!(counters.shadow_mismatch.load(Ordering::Relaxed), 10);
    let new_stats = s.server.edge().rollout().stats(pitboss::backend::Role::New);
    assert_eq!(
        new_stats.requests, 25,
        "shadow calls count in new's statistics"
    );
    s.stop().await;
}

#[tokio::test]
async fn a_failing_new_backend_is_rolled_back_and_the_file_keeps_it() {
    let mut s = start(
        "rollback",
        "mode = \"canary\"\npercent = 100.0\ncommands = [\"*\"]\nfallback_to_legacy = false\n\
         [rollback]\nmin_requests = 20\nwindow = \"30s\"\n",
        &format!("{NEW_POOL}env = {{ DEMO_V2_BROKEN = \"raise\" }}\n"),
    )
    .await;
    let mut failed = 0;
    for _ in 0..20 {
        let e = s.client.execute(exec("version", "{}")).await.unwrap_err();
        assert_eq!(e.metadata().get("x-pitboss-backend").unwrap(), "new");
        failed += 1;
    }
    assert_eq!(failed, 20);
    // The checker runs every 100 ms: the rollback lands well within the window.
    assert!(
        eventually(Duration::from_secs(10), || s.flags().status.state
            == RolloutState::RolledBack)
        .await,
        "not rolled back"
    );
    let f = s.flags();
    assert!(
        f.status.reason.contains("error rate"),
        "{}",
        f.status.reason
    );
    assert_eq!(f.status.changed_by, "pitboss auto-rollback");
    // The file says so too, so a restart keeps it.
    let on_disk = pitboss::rollout::LiveFlags::load(&s.flags_path())
        .unwrap()
        .get();
    assert_eq!(on_disk.status.state, RolloutState::RolledBack);
    assert_eq!(
        on_disk.percent.0.as_f64(),
        100.0,
        "the operator's setting is kept"
    );
    // Everything is served by legacy now.
    let (backend, v) = version(&mut s.client, exec("version", "{}")).await;
    assert_eq!((backend.as_str(), v), ("legacy", 1));

    // The CLI shows it, and resuming needs the operator (and the token).
    let bin = env!("CARGO_BIN_EXE_pitboss");
    let addr = format!("http://{}", s.server.admin_addr);
    let out = tokio::process::Command::new(bin)
        .args(["rollout", "status", "--addr", &addr, "--token", TOKEN])
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("state rolled_back"), "{text}");
    assert!(text.lines().any(|l| l.starts_with("legacy ")), "{text}");
    assert!(text.lines().any(|l| l.starts_with("new ")), "{text}");
    let out = tokio::process::Command::new(bin)
        .args(["rollout", "resume", "--addr", &addr])
        .env_remove("PITBOSS_ADMIN_TOKEN")
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("UNAUTHENTICATED"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = tokio::process::Command::new(bin)
        .args(["rollout", "resume", "--addr", &addr, "--actor", "alice"])
        .env("PITBOSS_ADMIN_TOKEN", TOKEN)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(s.flags().status.state, RolloutState::Active);
    assert!(s.flags().status.changed_by.starts_with("alice@"));
    s.stop().await;
}

#[tokio::test]
async fn system_failures_of_new_fall_back_to_legacy() {
    let mut s = start(
        "fallback",
        "mode = \"full\"\ncommands = [\"*\"]\nfallback_to_legacy = true\n[rollback]\nmin_requests = 1000\n",
        &format!("{NEW_POOL}env = {{ DEMO_V2_BROKEN = \"crash\" }}\n"),
    )
    .await;
    // Not idempotent: it may have run on new, so it is not run again on legacy.
    let e = s.client.execute(exec("version", "{}")).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable);
    assert_eq!(e.metadata().get("x-pitboss-backend").unwrap(), "new");
    assert_eq!(error_class(&e), "worker_crashed");
    // Idempotent: served by legacy. `attempts` counts the tries on both backends:
    // new's three (a crash is retried for an idempotent call; the breaker, at 5
    // failures in a row, is still closed), then legacy's one.
    let resp = s
        .client
        .execute(idempotent(exec("version", "{}")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((resp.backend.as_str(), resp.attempts), ("legacy", 4));
    // And the response says which backend answered.
    for _ in 0..3 {
        let (backend, v) = version(&mut s.client, idempotent(exec("version", "{}"))).await;
        assert_eq!((backend.as_str(), v), ("legacy", 1));
    }
    let mut admin = s.admin().await;
    let r = admin
        .get_rollout(authed(pb::GetRolloutRequest {}, TOKEN))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.fallbacks, 4);
    s.stop().await;
}

/// Issue 13, item 5: a `new` whose code raises `KeyError` on 30% of calls is a
/// regression (the command failed to produce an answer), not the callers' bad input:
/// rolled back within one window by the default rules.
#[tokio::test]
async fn new_raising_key_error_on_30_percent_of_calls_is_rolled_back() {
    let mut s = start(
        "keyerror",
        "mode = \"canary\"\npercent = 100.0\ncommands = [\"*\"]\nfallback_to_legacy = false\n\
         [rollback]\nmin_requests = 20\nwindow = \"30s\"\n",
        &format!("{NEW_POOL}env = {{ DEMO_V2_BROKEN = \"keyerror\" }}\n"),
    )
    .await;
    let mut classes = std::collections::BTreeMap::new();
    for _ in 0..20 {
        if let Err(e) = s.client.execute(exec("version", "{}")).await {
            assert_eq!(e.code(), Code::Unknown, "not the caller's fault: {e:?}");
            let class = e.metadata().get("x-pitboss-error-class").unwrap();
            *classes
                .entry(class.to_str().unwrap().to_string())
                .or_insert(0) += 1;
        }
    }
    assert_eq!(classes.get("python_exception"), Some(&6), "{classes:?}");
    assert!(
        eventually(Duration::from_secs(10), || s.flags().status.state
            == RolloutState::RolledBack)
        .await,
        "not rolled back; new's statistics: {:?}",
        s.server.edge().rollout().stats(pitboss::backend::Role::New)
    );
    let reason = s.flags().status.reason.clone();
    assert!(reason.starts_with("error rate 30.0%"), "{reason}");
    s.stop().await;
}

/// The callers' own errors are not new's fault: when legacy and new reject the same
/// share of calls (`InvalidRequest`, raised explicitly by both adapters), nothing is
/// rolled back, even with the relative rule on.
#[tokio::test]
async fn the_same_caller_errors_on_both_backends_are_not_a_regression() {
    let mut s = start(
        "same-caller-errors",
        "mode = \"canary\"\npercent = 50.0\ncommands = [\"*\"]\n\
         [rollback]\nmin_requests = 20\nwindow = \"60s\"\nrelative_error_rate = 2.0\n",
        NEW_POOL,
    )
    .await;
    let mut rejected = 0;
    for i in 0..200 {
        let n = if i % 10 < 3 { -1 } else { 10 };
        let r = with_key(
            exec("compute", format!(r#"{{"n": {n}}}"#)),
            &format!("k{i}"),
        );
        match s.client.execute(r).await {
            Ok(_) => assert!(n >= 0),
            Err(e) => {
                assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
                rejected += 1;
            }
        }
    }
    assert_eq!(rejected, 60);
    let rollout = &s.server.edge().rollout();
    let (new, legacy) = (
        rollout.stats(pitboss::backend::Role::New),
        rollout.stats(pitboss::backend::Role::Legacy),
    );
    assert!(
        new.requests >= 20 && legacy.requests >= 20,
        "{new:?} {legacy:?}"
    );
    assert!(new.by_class.get("invalid_request").copied().unwrap_or(0) > 0);
    assert_eq!(rollout.check().await, None, "{new:?} {legacy:?}");
    assert_eq!(s.flags().status.state, RolloutState::Active);
    s.stop().await;
}

/// New rejecting as the caller's error what legacy accepts is a regression too: the
/// relative rule compares each class, `invalid_request` included.
#[tokio::test]
async fn new_rejecting_calls_that_legacy_accepts_is_rolled_back_by_the_relative_rule() {
    let mut s = start(
        "new-rejects",
        "mode = \"canary\"\npercent = 50.0\ncommands = [\"*\"]\n\
         [rollback]\nmin_requests = 20\nwindow = \"60s\"\nrelative_error_rate = 2.0\n",
        &format!("{NEW_POOL}env = {{ DEMO_V2_BROKEN = \"reject\" }}\n"),
    )
    .await;
    for i in 0..100 {
        let r = with_key(exec("version", "{}"), &format!("k{i}"));
        let _ = s.client.execute(r).await;
    }
    assert!(
        eventually(Duration::from_secs(10), || s.flags().status.state
            == RolloutState::RolledBack)
        .await,
        "not rolled back"
    );
    let reason = s.flags().status.reason.clone();
    assert!(reason.starts_with("invalid_request rate"), "{reason}");
    assert!(reason.contains("legacy's"), "{reason}");
    s.stop().await;
}

/// With `commands = ["*"]`, a command that new lacks (and legacy serves) falls back to
/// legacy, whatever its idempotency (it never ran), and counts against new.
#[tokio::test]
async fn a_command_new_lacks_falls_back_to_legacy_and_counts_against_new() {
    let mut s = start(
        "missing-command",
        "mode = \"full\"\ncommands = [\"*\"]\nfallback_to_legacy = true\n\
         [rollback]\nmin_requests = 20\nwindow = \"30s\"\n",
        NEW_POOL,
    )
    .await;
    // A command neither backend has is the caller's typo: NOT_FOUND (from legacy,
    // after the fallback), and not new's fault.
    let e = s.client.execute(exec("nope", "{}")).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    // Item 10: an error after a fallback counts the tries on both backends too.
    assert_eq!(e.metadata().get("x-pitboss-backend").unwrap(), "legacy");
    assert_eq!(
        e.metadata().get("x-pitboss-attempts").unwrap(),
        "2",
        "{e:?}"
    );
    let new = s.server.edge().rollout().stats(pitboss::backend::Role::New);
    assert_eq!((new.requests, new.errors), (1, 0), "{new:?}");
    // The same through ExecuteStream: new's refusal, then legacy's.
    let e = s
        .client
        .execute_stream(exec("nope", "{}"))
        .await
        .map(|_| ())
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert_eq!(e.metadata().get("x-pitboss-backend").unwrap(), "legacy");
    assert_eq!(
        e.metadata().get("x-pitboss-attempts").unwrap(),
        "2",
        "{e:?}"
    );
    // A stream that new refused before it started is in new's statistics too: not its
    // fault when legacy lacks the command as well, its fault when legacy has it.
    let new = s.server.edge().rollout().stats(pitboss::backend::Role::New);
    assert_eq!((new.requests, new.errors), (2, 0), "{new:?}");
    let _ = s.client.execute_stream(exec("sleep", "{}")).await;
    let new = s.server.edge().rollout().stats(pitboss::backend::Role::New);
    assert_eq!((new.requests, new.errors), (3, 1), "{new:?}");
    // Item 10: served after a fallback, `attempts` counts new's try and legacy's.
    let resp = s
        .client
        .execute(exec("sleep", r#"{"seconds": 0}"#))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((resp.backend.as_str(), resp.attempts), ("legacy", 2));
    for _ in 0..20 {
        // demo_v2 has no `sleep`; demo has.
        let resp = s
            .client
            .execute(exec("sleep", r#"{"seconds": 0}"#))
            .await
            .unwrap_or_else(|e| panic!("{e:?}"))
            .into_inner();
        assert_eq!(resp.backend, "legacy");
    }
    assert!(
        eventually(Duration::from_secs(10), || s.flags().status.state
            == RolloutState::RolledBack)
        .await,
        "not rolled back; new's statistics: {:?}",
        s.server.edge().rollout().stats(pitboss::backend::Role::New)
    );
    s.stop().await;
}

#[tokio::test]
async fn admin_calls_need_the_token() {
    let s = start("auth", "mode = \"off\"\n", NEW_POOL).await;
    let mut admin = s.admin().await;
    let e = admin
        .get_rollout(pb::GetRolloutRequest {})
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    let e = admin
        .set_rollout(authed(
            pb::SetRolloutRequest {
                percent: 5.0,
                ..Default::default()
            },
            "wrong",
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert!(e.message().contains("wrong admin token"), "{e:?}");
    assert_eq!(
        s.flags().mode,
        pitboss::rollout::Mode::Off,
        "nothing changed"
    );
    let r = admin
        .set_rollout(authed(
            pb::SetRolloutRequest {
                percent: 5.0,
                actor: "bob".into(),
                ..Default::default()
            },
            TOKEN,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r.mode.as_str(), r.percent), ("canary", 5.0));
    let on_disk = pitboss::rollout::LiveFlags::load(&s.flags_path())
        .unwrap()
        .get();
    assert_eq!(on_disk.percent.0.as_f64(), 5.0, "persisted");
    assert!(on_disk.status.changed_by.starts_with("bob@"));
    let e = admin
        .set_rollout(authed(
            pb::SetRolloutRequest {
                percent: 101.0,
                ..Default::default()
            },
            TOKEN,
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    // GetStatus needs it too, and lists both pools.
    assert_eq!(
        admin
            .get_status(pb::GetStatusRequest {})
            .await
            .unwrap_err()
            .code(),
        Code::Unauthenticated
    );
    let st = admin
        .get_status(authed(pb::GetStatusRequest {}, TOKEN))
        .await
        .unwrap()
        .into_inner();
    let names: Vec<_> = st.pools.iter().map(|p| p.backend.as_str()).collect();
    assert_eq!(names, ["legacy", "new"]);
    s.stop().await;
}

#[tokio::test]
async fn a_grpc_backend_forwards_to_an_upstream_bridge() {
    // The upstream: another pitboss serving demo_v2.
    let up_dir = temp_dir("rollout-upstream");
    std::fs::write(up_dir.join("token"), "upstream-token\n").unwrap();
    let (upstream, _) = common::start(config(&config_text(&up_dir, "demo_v2:adapter", ""))).await;
    let mut s = start(
        "grpc",
        "mode = \"canary\"\npercent = 100.0\ncommands = [\"*\"]\n",
        &format!(
            "[backends.new]\nkind = \"grpc\"\naddress = \"http://{}\"\n",
            upstream.bridge_addr
        ),
    )
    .await;
    let r = s
        .client
        .execute(exec("version", "{}"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.backend, "new");
    assert!(
        r.worker_id.contains(&upstream.bridge_addr.to_string()),
        "{}",
        r.worker_id
    );
    let v: serde_json::Value = serde_json::from_slice(&r.payload).unwrap();
    assert_eq!(v["version"], 2);
    // Errors keep their class across the hop.
    let e = s.client.execute(exec("nope", "{}")).await.unwrap_err();
    assert_eq!(error_class(&e), "unknown_command");
    // Sessions live upstream and stay there.
    let sess = s
        .client
        .create_session(pb::CreateSessionRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(sess.backend, "new");
    for n in 1..=3 {
        let mut r = exec("counter", "{}");
        r.session_id = sess.session_id.clone();
        let resp = s.client.execute(r).await.unwrap().into_inner();
        let v: serde_json::Value = serde_json::from_slice(&resp.payload).unwrap();
        assert_eq!(v["count"], n);
    }
    // Streams too.
    let chunks = collect(
        s.client
            .execute_stream(exec("stream", r#"{"n": 4}"#))
            .await
            .unwrap()
            .into_inner(),
    )
    .await;
    assert_eq!(chunks.len(), 4);
    assert_eq!(chunks[3].backend, "new");
    s.stop().await;
    upstream.shutdown().await;
    let _ = std::fs::remove_dir_all(&up_dir);
}
