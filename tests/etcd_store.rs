//! The etcd flags store with a real etcd (Debian's `etcd-server`) on loopback ports
//! and three real pitboss servers sharing it: a change on one is applied by all,
//! writes are compare-and-swap, and an outage of etcd fails no call.

mod common;

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use pitboss::grpc::pb;
use pitboss::rollout::flags::Mode;
use pitboss::server::RunningServer;
use tonic::Code;

const TOKEN: &str = "etcd-test-token";

struct Instance {
    server: RunningServer,
    client: Client,
}

impl Instance {
    fn flags(&self) -> Arc<pitboss::rollout::Flags> {
        self.server.edge().rollout().flags.get()
    }

    async fn admin(&self) -> AdminClient {
        AdminClient::connect(format!("http://{}", self.server.admin_addr))
            .await
            .unwrap()
    }
}

/// Instance `i` of a tier on `etcd`, rollout `name`; its own dir (token, cache).
async fn instance(etcd: &Etcd, name: &str, i: usize) -> (Instance, PathBuf) {
    instance_with(etcd, name, i, "").await
}

/// [`instance`] with `new_env` in the environment of new's workers.
async fn instance_with(etcd: &Etcd, name: &str, i: usize, new_env: &str) -> (Instance, PathBuf) {
    let dir = temp_dir(&format!("etcd-{name}-{i}"));
    std::fs::write(dir.join("token"), format!("{TOKEN}\n")).unwrap();
    (instance_in(etcd, name, &dir, new_env).await, dir)
}

/// An instance whose token and store cache are in `dir` (kept as it is).
async fn instance_in(etcd: &Etcd, name: &str, dir: &std::path::Path, new_env: &str) -> Instance {
    let rest = format!(
        "{}{}{}",
        legacy_and_new(new_env),
        rollout_section(dir),
        etcd.store_section(name, &dir.join("cache.toml")),
    );
    let text = on_free_ports("shutdown_grace = \"10s\"", &rest);
    let (server, client) = common::start(config(&text)).await;
    Instance { server, client }
}

fn set(percent: f64, expected_revision: u64) -> pb::SetRolloutRequest {
    pb::SetRolloutRequest {
        mode: "canary".into(),
        percent,
        commands: vec!["*".into()],
        set_commands: true,
        actor: "tester".into(),
        expected_revision,
        ..Default::default()
    }
}

async fn backend_of(client: &mut Client, key: &str) -> String {
    let mut r = exec("version", "{}");
    r.routing_key = key.into();
    client.execute(r).await.unwrap().into_inner().backend
}

#[tokio::test]
async fn a_change_on_one_instance_is_applied_by_all_and_writes_are_compare_and_swap() {
    let etcd = Etcd::launch("tier").await;
    let mut tier = Vec::new();
    let mut dirs = Vec::new();
    for i in 0..3 {
        let (inst, dir) = instance(&etcd, "tier", i).await;
        tier.push(inst);
        dirs.push(dir);
    }
    // With no key yet, the tier starts on legacy and the first instance creates it.
    for inst in &tier {
        assert_eq!(inst.flags().mode, Mode::Off);
        assert!(inst
            .server
            .edge()
            .rollout()
            .store
            .describe()
            .contains("etcd"));
    }

    // SetRollout on A: B and C apply it within 1 s.
    let mut admin = tier[0].admin().await;
    let before = Instant::now();
    let r = admin
        .set_rollout(authed(set(30.0, 0), TOKEN))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.percent, 30.0);
    assert!(r.store_up);
    for inst in &tier[1..] {
        assert!(
            eventually(Duration::from_secs(1), || inst.flags().percent.0.as_f64()
                == 30.0
                && inst.flags().mode == Mode::Canary)
            .await,
            "not applied within 1 s"
        );
    }
    let applied_in = before.elapsed();
    // Keyed calls route identically on all three.
    for k in 0..40 {
        let key = format!("user-{k}");
        let mut seen = Vec::new();
        for inst in &mut tier {
            seen.push(backend_of(&mut inst.client, &key).await);
        }
        assert!(seen.iter().all(|b| *b == seen[0]), "{key}: {seen:?}");
    }
    eprintln!("a change on A was applied by B and C in {applied_in:?}");

    // Two writers on the same revision: exactly one wins, the loser gets
    // FAILED_PRECONDITION and nothing of its change is written.
    let revision = r.revision;
    let mut admin_b = tier[1].admin().await;
    let (a, b) = tokio::join!(
        admin.set_rollout(authed(set(40.0, revision), TOKEN)),
        admin_b.set_rollout(authed(set(50.0, revision), TOKEN)),
    );
    let wins = [a.is_ok(), b.is_ok()];
    assert_eq!(wins.iter().filter(|w| **w).count(), 1, "{a:?} {b:?}");
    let loser = match (a, b) {
        (Ok(_), Err(e)) | (Err(e), Ok(_)) => e,
        _ => unreachable!("exactly one won"),
    };
    assert_eq!(loser.code(), Code::FailedPrecondition, "{loser:?}");
    assert!(loser.message().contains("revision"), "{}", loser.message());
    let won = if wins[0] { 40.0 } else { 50.0 };
    for inst in &tier {
        assert!(
            eventually(Duration::from_secs(5), || inst.flags().percent.0.as_f64()
                == won)
            .await,
            "the winner's change is not everywhere"
        );
    }
    // A rollback on a stale revision still wins.
    let rollback = pb::SetRolloutRequest {
        action: "rollback".into(),
        percent: -1.0,
        actor: "tester".into(),
        expected_revision: revision,
        ..Default::default()
    };
    let r = admin
        .set_rollout(authed(rollback, TOKEN))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.state, "rolled_back");

    // The audit log in etcd, read from another instance.
    let h = admin_b
        .get_rollout_history(authed(pb::GetRolloutHistoryRequest { limit: 10 }, TOKEN))
        .await
        .unwrap()
        .into_inner();
    let actions: Vec<&str> = h.changes.iter().map(|c| c.action.as_str()).collect();
    assert_eq!(actions, vec!["rollback", "set", "set", "create"], "{h:?}");
    assert!(h.changes[0].actor.starts_with("tester@"));
    for inst in tier {
        inst.server.shutdown().await;
    }
    for d in dirs {
        let _ = std::fs::remove_dir_all(d);
    }
}

#[tokio::test]
async fn an_etcd_outage_fails_no_call_and_a_change_made_during_it_is_applied_after() {
    let mut etcd = Etcd::launch("outage").await;
    let (a, dir_a) = instance(&etcd, "outage", 0).await;
    let (b, dir_b) = instance(&etcd, "outage", 1).await;
    let mut admin = a.admin().await;
    admin
        .set_rollout(authed(set(50.0, 0), TOKEN))
        .await
        .unwrap();
    assert!(
        eventually(Duration::from_secs(5), || b.flags().percent.0.as_f64()
            == 50.0)
        .await
    );

    // A steady, concurrent load on both instances over the whole outage.
    let loads = [
        Load::start(&a.client, 4, "a"),
        Load::start(&b.client, 4, "b"),
    ];
    let total = |loads: &[Load]| loads.iter().map(Load::calls).sum::<u64>();
    assert!(
        eventually(Duration::from_secs(10), || total(&loads) > 50).await,
        "no load runs"
    );

    let before = total(&loads);
    etcd.stop();
    let rollout_b = b.server.edge().rollout();
    assert!(
        eventually(Duration::from_secs(15), || !rollout_b.store.up()).await,
        "store_up stays 1 with etcd down"
    );
    let metrics = scrape(b.server.metrics_addr).await;
    assert!(metrics.contains("pitboss_rollout_store_up"), "{metrics}");
    let (status, body) = http_get(b.server.metrics_addr, "/readyz").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("note"), "{body}");
    assert_eq!(
        b.flags().percent.0.as_f64(),
        50.0,
        "fail static: the last flags stay"
    );
    // A write during the outage is refused with a clear error, nothing changes.
    let e = admin
        .set_rollout(authed(set(10.0, 0), TOKEN))
        .await
        .unwrap_err();
    assert!(e.message().contains("unreachable"), "{e:?}");
    // Calls go on being served with etcd down.
    let down = total(&loads);
    assert!(
        eventually(Duration::from_secs(30), || total(&loads) > down + 200).await,
        "calls stalled with etcd down"
    );
    let during = total(&loads) - before;

    // A change made in etcd during the outage (by hand, as another writer would).
    etcd.start().await;
    let mut c = etcd_client::Client::connect([etcd.client_url.as_str()], None)
        .await
        .unwrap();
    let key = "/pitboss/outage/flags";
    let got = c.get(key, None).await.unwrap();
    let text = std::str::from_utf8(got.kvs()[0].value())
        .unwrap()
        .to_string();
    let text = text.replace("percent = 50.0", "percent = 20.0");
    c.put(key, text, None).await.unwrap();
    for inst in [&a, &b] {
        assert!(
            eventually(Duration::from_secs(20), || inst
                .server
                .edge()
                .rollout()
                .store
                .up()
                && inst.flags().percent.0.as_f64() == 20.0)
            .await,
            "no resync after etcd came back: {:?}",
            inst.flags().percent
        );
    }
    let mut calls = 0;
    for load in loads {
        let r = load.stop().await;
        assert_eq!(
            r.failed, 0,
            "{} of {} calls failed across the outage: {:?}",
            r.failed, r.calls, r.errors
        );
        calls += r.calls;
    }
    eprintln!(
        "{calls} calls on 8 concurrent callers across the etcd outage ({during} while it \
         was down), 0 failed"
    );
    a.server.shutdown().await;
    b.server.shutdown().await;
    let _ = std::fs::remove_dir_all(dir_a);
    let _ = std::fs::remove_dir_all(dir_b);
}

#[tokio::test]
async fn a_failure_only_the_tier_sees_is_rolled_back_once_and_applied_everywhere() {
    let etcd = Etcd::launch("analysis").await;
    // The flags, written to etcd before the tier starts: every call to new, no
    // fallback, and a rollback rule that needs 30 calls of new.
    let mut c = etcd_client::Client::connect([etcd.client_url.as_str()], None)
        .await
        .unwrap();
    c.put(
        "/pitboss/analysis/flags",
        "mode = \"canary\"\npercent = 100.0\ncommands = [\"*\"]\nfallback_to_legacy = false\n\
         [rollback]\nmin_requests = 30\nwindow = \"60s\"\n",
        None,
    )
    .await
    .unwrap();
    let mut tier = Vec::new();
    let mut dirs = Vec::new();
    for i in 0..3 {
        let (inst, dir) = instance_with(&etcd, "analysis", i, "DEMO_V2_BROKEN = \"raise\"").await;
        assert_eq!(inst.flags().percent.0.as_f64(), 100.0);
        tier.push(inst);
        dirs.push(dir);
    }
    // Exactly one instance analyses the tier.
    assert!(
        eventually(Duration::from_secs(10), || tier
            .iter()
            .filter(|i| i
                .server
                .edge()
                .rollout()
                .analysis()
                .scope
                .contains("analysed here"))
            .count()
            == 1)
        .await,
        "no single analyser: {:?}",
        tier.iter()
            .map(|i| i.server.edge().rollout().analysis())
            .collect::<Vec<_>>()
    );
    // 12 calls on each: below min_requests for each instance alone, 36 for the tier.
    // They fail while new takes them; the tier's rollback may come once 30 have
    // failed, and the last few then go to legacy and succeed.
    let mut failed = 0;
    for inst in &mut tier {
        for k in 0..12 {
            let mut r = exec("version", "{}");
            r.routing_key = format!("k{k}");
            if inst.client.execute(r).await.is_err() {
                failed += 1;
            }
        }
    }
    assert!(failed >= 30, "only {failed} of 36 calls failed");
    for inst in &tier {
        assert!(
            eventually(Duration::from_secs(10), || inst.flags().status.state
                == pitboss::rollout::flags::RolloutState::RolledBack)
            .await,
            "not rolled back everywhere: {:?}",
            inst.flags().status
        );
        assert!(
            inst.flags().status.reason.contains("the tier: 3 instances"),
            "{}",
            inst.flags().status.reason
        );
    }
    let rollbacks = || -> u64 {
        tier.iter()
            .map(|i| {
                i.server
                    .edge()
                    .rollout()
                    .counters
                    .rollbacks
                    .load(Ordering::Relaxed)
            })
            .sum()
    };
    // A write etcd confirms after the store's timeout (a slow disk under load) is
    // counted when the analyser sees it applied: at once, or at its next check.
    assert!(
        eventually(Duration::from_secs(10), || rollbacks() >= 1).await,
        "the tier's rollback is counted by the instance that made it"
    );
    assert_eq!(rollbacks(), 1, "one rollback written for the tier");
    let mut admin = tier[2].admin().await;
    let h = admin
        .get_rollout_history(authed(pb::GetRolloutHistoryRequest { limit: 50 }, TOKEN))
        .await
        .unwrap()
        .into_inner();
    let auto: Vec<_> = h
        .changes
        .iter()
        .filter(|c| c.action == "auto-rollback")
        .collect();
    assert_eq!(auto.len(), 1, "{h:?}");
    for inst in tier {
        inst.server.shutdown().await;
    }
    for d in dirs {
        let _ = std::fs::remove_dir_all(d);
    }
}

#[tokio::test]
async fn when_the_analyser_is_killed_another_takes_over_within_the_lease_ttl() {
    let etcd = Etcd::launch("failover").await;
    let mut procs = Vec::new();
    let mut dirs = Vec::new();
    for i in 0..3 {
        let dir = temp_dir(&format!("etcd-failover-{i}"));
        std::fs::write(dir.join("token"), format!("{TOKEN}\n")).unwrap();
        let rest = format!(
            "{}{}{}",
            legacy_and_new(""),
            rollout_section(&dir),
            etcd.store_section("failover", &dir.join("cache.toml")),
        );
        let path = dir.join("pitboss.toml");
        std::fs::write(&path, on_free_ports("shutdown_grace = \"10s\"", &rest)).unwrap();
        procs.push(spawn(&path).await);
        dirs.push(dir);
    }
    // The analysis runs only in canary/shadow: start a canary through one instance.
    let mut admin = AdminClient::connect(procs[0].admin.clone()).await.unwrap();
    admin
        .set_rollout(authed(set(10.0, 0), TOKEN))
        .await
        .unwrap();
    async fn analysis_of(admin: &str) -> String {
        let mut a = AdminClient::connect(admin.to_string()).await.unwrap();
        a.get_rollout(authed(pb::GetRolloutRequest {}, TOKEN))
            .await
            .unwrap()
            .into_inner()
            .analysis
    }
    async fn analysers(procs: &[&Proc]) -> Vec<usize> {
        let mut v = Vec::new();
        for (i, p) in procs.iter().enumerate() {
            if analysis_of(&p.admin).await.contains("analysed here") {
                v.push(i);
            }
        }
        v
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    let leader = loop {
        let all: Vec<&Proc> = procs.iter().collect();
        let l = analysers(&all).await;
        if l.len() == 1 {
            break l[0];
        }
        assert!(Instant::now() < deadline, "no single analyser: {l:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // Kill it outright: its lease (2 s) lapses, the leader key goes with it.
    let mut dead = procs.remove(leader);
    kill(dead.child.id().unwrap(), libc::SIGKILL);
    let _ = dead.child.wait().await;
    let killed_at = Instant::now();
    let deadline = killed_at + Duration::from_secs(20);
    loop {
        let rest: Vec<&Proc> = procs.iter().collect();
        let l = analysers(&rest).await;
        if l.len() == 1 {
            let took = killed_at.elapsed();
            let scope = analysis_of(&procs[l[0]].admin).await;
            assert!(scope.contains("2 instances"), "{scope}");
            eprintln!("the analysis moved {took:?} after the analyser was killed (lease TTL 2s)");
            // The TTL, plus a keep-alive period and a check interval on a loaded host.
            assert!(took < Duration::from_secs(6), "took {took:?}");
            break;
        }
        assert!(Instant::now() < deadline, "nobody took over: {l:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(procs);
    for d in dirs {
        let _ = std::fs::remove_dir_all(d);
    }
}

#[tokio::test]
async fn a_restart_during_an_outage_keeps_the_cached_flags_and_one_with_none_starts_on_legacy() {
    let mut etcd = Etcd::launch("restart").await;
    let (a, dir_a) = instance(&etcd, "restart", 0).await;
    let mut admin = a.admin().await;
    admin
        .set_rollout(authed(set(35.0, 0), TOKEN))
        .await
        .unwrap();
    assert!(
        eventually(Duration::from_secs(5), || dir_a.join("cache.toml").exists()).await,
        "no cache written"
    );
    a.server.shutdown().await;
    etcd.stop();

    // The same instance again (same cache file), with etcd down: the cached flags.
    let again = instance_in(&etcd, "restart", &dir_a, "").await;
    assert_eq!(again.flags().mode, Mode::Canary);
    assert_eq!(again.flags().percent.0.as_f64(), 35.0);
    assert!(!again.server.edge().rollout().store.up());
    // A new instance without a cache: everything on legacy, and ready.
    let (fresh, dir_fresh) = instance(&etcd, "restart", 1).await;
    assert_eq!(fresh.flags().mode, Mode::Off);
    let (status, body) = http_get(fresh.server.metrics_addr, "/readyz").await;
    assert_eq!(status, 200, "{body}");

    // etcd answers again: both apply its flags.
    etcd.start().await;
    for inst in [&again, &fresh] {
        assert!(
            eventually(Duration::from_secs(20), || inst.flags().percent.0.as_f64()
                == 35.0
                && inst.flags().mode == Mode::Canary
                && inst.server.edge().rollout().store.up())
            .await,
            "etcd's flags not applied after it came back"
        );
    }
    again.server.shutdown().await;
    fresh.server.shutdown().await;
    let _ = std::fs::remove_dir_all(dir_a);
    let _ = std::fs::remove_dir_all(dir_fresh);
}
