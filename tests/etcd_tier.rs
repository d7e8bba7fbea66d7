//! One rollout for the whole tier, end to end: real pitboss processes (the binary,
//! so each has its own `/metrics`) sharing a real etcd (Debian's `etcd-server`) on
//! loopback ports, under a steady load of keyed calls on every instance.
//!
//! - A tier-wide step walk 1 → 100: the elected instance alone writes each promotion,
//!   and every instance applies each step.
//! - A walk whose `new` starts failing at a middle step: one rollback for the tier,
//!   applied everywhere, and the walk stops there.
//! - `pause_at`, then `pitboss rollout pause | resume | promote` through the real CLI
//!   (and the Admin RPCs behind it): audit records and the step and promotion metrics.
//! - A 3-member etcd cluster losing quorum (2 of 3 members stopped): no call fails,
//!   `pitboss_rollout_store_up` 0 and a readiness note; quorum back: resync, and the
//!   changes written when it returned are applied.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::*;
use pitboss::grpc::pb;
use serde_json::Value;

const TOKEN: &str = "tier-test-token";
/// Generous: the machine running the suite is loaded.
const BOUND: Duration = Duration::from_secs(90);

/// One pitboss process of the tier.
struct Member {
    id: String,
    proc: Proc,
    client: Client,
    admin: AdminClient,
    dir: PathBuf,
}

impl Member {
    /// Starts instance `id` on etcd `endpoints`, rollout `name`, and waits until it is
    /// ready (its workers up). `new_env`: for new's workers.
    async fn start(endpoints: &[&str], name: &str, id: &str, new_env: &str) -> Member {
        let dir = temp_dir(&format!("tier-{id}"));
        std::fs::write(dir.join("token"), format!("{TOKEN}\n")).unwrap();
        let rest = format!(
            "{}{}{}",
            legacy_and_new(new_env),
            rollout_section(&dir),
            // A lease long enough that the analyser stays the same on a loaded host.
            etcd_store_section(endpoints, name, &dir.join("cache.toml"), "5s"),
        );
        let path = dir.join("pitboss.toml");
        std::fs::write(&path, on_free_ports("shutdown_grace = \"10s\"", &rest)).unwrap();
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_pitboss"));
        command.env("PITBOSS_INSTANCE_ID", id);
        let proc = spawn_exe(command, &path).await;
        let metrics = proc.metrics;
        assert!(
            eventually_async(BOUND, || async move {
                http_get(metrics, "/readyz").await.0 == 200
            })
            .await,
            "{id} not ready"
        );
        let client = Client::connect(proc.bridge.clone()).await.unwrap();
        let admin = AdminClient::connect(proc.admin.clone()).await.unwrap();
        Member {
            id: id.to_string(),
            proc,
            client,
            admin,
            dir,
        }
    }

    async fn rollout(&self) -> pb::Rollout {
        self.admin
            .clone()
            .get_rollout(authed(pb::GetRolloutRequest {}, TOKEN))
            .await
            .unwrap()
            .into_inner()
    }

    async fn history(&self) -> Vec<pb::RolloutChange> {
        self.admin
            .clone()
            .get_rollout_history(authed(pb::GetRolloutHistoryRequest { limit: 100 }, TOKEN))
            .await
            .unwrap()
            .into_inner()
            .changes
    }

    /// The value of `name{labels}` in this process's `/metrics` (0 when absent: a
    /// counter that never moved).
    async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        sample(&scrape(self.proc.metrics).await, name, labels).unwrap_or(0.0)
    }

    /// A counter once it reads `want` (within the bound), else its last value: a
    /// write etcd confirms after the store's timeout is counted when the analyser
    /// sees it in force, at its next check.
    async fn counter_reaching(&self, name: &str, labels: &[(&str, &str)], want: f64) -> f64 {
        eventually_async(
            BOUND,
            || async move { self.metric(name, labels).await == want },
        )
        .await;
        self.metric(name, labels).await
    }

    /// Whether this instance runs the tier's analysis.
    async fn analyses(&self) -> bool {
        self.rollout().await.analysis.contains("analysed here")
    }

    /// Every percentage this instance put in force, in order, from its own log:
    /// "rollout flags from etcd applied" (another's write, from the watch) and
    /// "rollout changed" (its own write, in force at once).
    fn applied_percents(&self) -> Vec<f64> {
        let mut out: Vec<f64> = Vec::new();
        for line in self.proc.log.lock().unwrap().iter() {
            let v: Value = serde_json::from_str(line).unwrap_or_default();
            let f = &v["fields"];
            let percent = match f["message"].as_str() {
                // "canary 5% active"
                Some("rollout flags from etcd applied") => f["flags"]
                    .as_str()
                    .and_then(|s| s.split_whitespace().nth(1))
                    .and_then(|p| p.trim_end_matches('%').parse().ok()),
                Some("rollout changed") => f["new_percent"].as_f64(),
                _ => None,
            };
            if let Some(p) = percent {
                if out.last() != Some(&p) {
                    out.push(p);
                }
            }
        }
        out
    }

    fn stop(self) {
        drop(self.proc);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Waits until every member's `GetRollout` satisfies `check`.
async fn all_reach(tier: &[Member], what: &str, check: impl Fn(&pb::Rollout) -> bool) {
    let check = &check;
    let ok = eventually_async(BOUND, || async move {
        for m in tier {
            if !check(&m.rollout().await) {
                return false;
            }
        }
        true
    })
    .await;
    if !ok {
        let mut now = Vec::new();
        for m in tier {
            let r = m.rollout().await;
            now.push(format!(
                "{}: {} {}% {} revision {} store_up {} ({}; {})",
                m.id, r.mode, r.percent, r.state, r.revision, r.store_up, r.promotion, r.analysis
            ));
        }
        panic!("not every instance reached {what} within {BOUND:?}: {now:#?}");
    }
}

/// The flags written to etcd before the tier starts: a canary at 1% walking
/// `steps`, no fallback (new's errors reach the callers), the rollback rules out of
/// the way (the walk's gates decide). `min_requests` counts new's calls over the
/// whole tier.
fn walk_flags(steps: &str, extra: &str) -> String {
    format!(
        "mode = \"canary\"\npercent = 1.0\ncommands = [\"*\"]\nfallback_to_legacy = false\n\
         [rollback]\nmin_requests = 1000000\n\
         [promotion]\nsteps = {steps}\nmin_duration = \"300ms\"\nmin_requests = 6\n\
         max_error_rate = 0.05\n{extra}"
    )
}

async fn put(endpoints: &[&str], key: &str, value: &str) {
    let mut c = etcd_client::Client::connect(endpoints, None).await.unwrap();
    c.put(key, value, None).await.unwrap();
}

/// The instance whose `GetRollout` says it analyses the tier, once exactly one does.
async fn analyser(tier: &[Member]) -> usize {
    let deadline = Instant::now() + BOUND;
    loop {
        let mut here = Vec::new();
        for (i, m) in tier.iter().enumerate() {
            if m.analyses().await {
                here.push(i);
            }
        }
        if here.len() == 1 {
            return here[0];
        }
        assert!(Instant::now() < deadline, "no single analyser: {here:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn the_tier_walks_every_step_to_100_written_by_the_analyser_alone_and_applied_by_all() {
    let etcd = Etcd::launch("tier-walk").await;
    put(
        &[etcd.client_url.as_str()],
        "/pitboss/walk/flags",
        &walk_flags("[1, 5, 25, 50, 100]", ""),
    )
    .await;
    let mut tier = Vec::new();
    for id in ["walk-a", "walk-b", "walk-c"] {
        tier.push(Member::start(&[etcd.client_url.as_str()], "walk", id, "").await);
    }
    let started = Instant::now();
    let loads: Vec<Load> = tier
        .iter()
        .map(|m| Load::start(&m.client, 2, &m.id))
        .collect();
    all_reach(&tier, "canary 100%", |r| {
        r.mode == "canary" && r.percent == 100.0 && r.state == "active"
    })
    .await;
    let walked_in = started.elapsed();
    let mut calls = 0;
    for load in loads {
        let r = load.stop().await;
        assert_eq!(
            r.failed, 0,
            "{} of {} calls failed: {:?}",
            r.failed, r.calls, r.errors
        );
        calls += r.calls;
    }

    // Exactly one writer, the analyser: four promotions, no duplicate, all by it.
    let leader = analyser(&tier).await;
    let history = tier[0].history().await;
    let promotions: Vec<&pb::RolloutChange> = history
        .iter()
        .filter(|c| c.action == "auto-promotion")
        .collect();
    let afters: Vec<&str> = promotions.iter().rev().map(|c| c.after.as_str()).collect();
    assert_eq!(
        afters,
        vec![
            "canary 5% active",
            "canary 25% active",
            "canary 50% active",
            "canary 100% active"
        ],
        "{history:#?}"
    );
    for p in &promotions {
        assert_eq!(p.instance, tier[leader].id, "written by another: {p:?}");
        assert_eq!(p.actor, "pitboss auto-promotion");
        assert!(p.reason.contains("the tier: 3 instances"), "{}", p.reason);
    }
    assert_eq!(history.len(), 4, "nothing but the walk: {history:#?}");
    // Every instance put each step in force, in order, and shows it.
    for (i, m) in tier.iter().enumerate() {
        assert_eq!(
            m.applied_percents(),
            vec![1.0, 5.0, 25.0, 50.0, 100.0],
            "{} did not apply every step",
            m.id
        );
        let want = if i == leader { 4.0 } else { 0.0 };
        let by_auto = m
            .counter_reaching("pitboss_rollout_promotions_total", &[("by", "auto")], want)
            .await;
        assert_eq!(by_auto, want, "{}", m.id);
        assert_eq!(m.metric("pitboss_rollout_step", &[]).await, 5.0, "{}", m.id);
        assert_eq!(
            m.metric("pitboss_rollout_steps", &[]).await,
            5.0,
            "{}",
            m.id
        );
        let r = m.rollout().await;
        assert_eq!((r.step, r.steps.len()), (5, 5), "{}", m.id);
        if i != leader {
            assert!(
                r.analysis
                    .contains(&format!("analysed by {}", tier[leader].id)),
                "{}: {}",
                m.id,
                r.analysis
            );
        }
    }
    eprintln!(
        "the tier walked 1 -> 100 in {walked_in:?}, {calls} calls, 0 failed; every \
         promotion by {}",
        tier[leader].id
    );
    for m in tier {
        m.stop();
    }
}

#[tokio::test]
async fn a_tier_walk_stops_and_rolls_back_once_when_new_starts_failing_at_a_middle_step() {
    let etcd = Etcd::launch("tier-gate").await;
    // 25% soaks long: new breaks while the tier is there, whatever the host's speed.
    put(
        &[etcd.client_url.as_str()],
        "/pitboss/gate/flags",
        &walk_flags("[1, 5, { at = 25, min_duration = \"10m\" }, 50, 100]", ""),
    )
    .await;
    let dir = temp_dir("tier-gate-broken");
    let broken = dir.join("broken");
    let env = format!("DEMO_V2_BROKEN_WHILE = \"{}\"", broken.display());
    let mut tier = Vec::new();
    for id in ["gate-a", "gate-b", "gate-c"] {
        tier.push(Member::start(&[etcd.client_url.as_str()], "gate", id, &env).await);
    }
    let loads: Vec<Load> = tier
        .iter()
        .map(|m| Load::start(&m.client, 2, &m.id))
        .collect();
    all_reach(&tier, "canary 25%", |r| r.percent == 25.0).await;
    // Each instance tags the statistics it publishes with its step at its own next
    // check: until all three have, the analyser sums only those already on 25% (seen:
    // "the tier: 1 instance (analysed here), 2 still on another step"). Wait for an
    // analysis of the 25% step (its 10m soak) that counts all three; the one left from
    // the promotion to 25% says "3 instances" too.
    let lead = analyser(&tier).await;
    let all_on_step = eventually_async(BOUND, || async {
        let r = tier[lead].rollout().await;
        let a = r.analysis;
        a.contains("the tier: 3 instances (analysed here)")
            && !a.contains("another step")
            && r.promotion.contains("of the step's 600s")
    })
    .await;
    assert!(
        all_on_step,
        "the analyser never counted the whole tier on 25%: {}",
        tier[lead].rollout().await.analysis
    );

    // new starts failing on every instance.
    std::fs::write(&broken, "").unwrap();
    all_reach(&tier, "rolled_back", |r| r.state == "rolled_back").await;
    let mut failed = 0;
    for load in loads {
        failed += load.stop().await.failed;
    }
    assert!(failed > 0, "new never failed");

    let leader = analyser(&tier).await;
    let history = tier[1].history().await;
    let actions: Vec<&str> = history.iter().map(|c| c.action.as_str()).collect();
    assert_eq!(
        actions,
        vec!["auto-rollback", "auto-promotion", "auto-promotion"],
        "one rollback, and no promotion after it: {history:#?}"
    );
    for c in &history {
        assert_eq!(c.instance, tier[leader].id, "written by another: {c:?}");
    }
    let rollback = &history[0];
    assert_eq!(rollback.after, "canary 25% rolled_back");
    assert!(
        rollback.reason.contains("gate: error rate"),
        "{}",
        rollback.reason
    );
    assert!(
        rollback.reason.contains("the tier: 3 instances"),
        "{}",
        rollback.reason
    );
    for (i, m) in tier.iter().enumerate() {
        let r = m.rollout().await;
        assert_eq!(r.percent, 25.0, "{}: the step is kept for the record", m.id);
        assert_eq!(r.effective_percent, 0.0, "{}", m.id);
        assert_eq!(r.changed_by, "pitboss auto-rollback", "{}", m.id);
        assert_eq!(
            m.applied_percents(),
            vec![1.0, 5.0, 25.0],
            "{} did not apply every step",
            m.id
        );
        assert_eq!(
            m.metric("pitboss_rollout_state", &[]).await,
            2.0,
            "{}",
            m.id
        );
        let lead = i == leader;
        let want = if lead { 1.0 } else { 0.0 };
        let rollbacks = m
            .counter_reaching(
                "pitboss_rollout_rollbacks_total",
                &[("reason", "error_rate")],
                want,
            )
            .await;
        assert_eq!(rollbacks, want, "{}", m.id);
        let want = if lead { 2.0 } else { 0.0 };
        let by_auto = m
            .counter_reaching("pitboss_rollout_promotions_total", &[("by", "auto")], want)
            .await;
        assert_eq!(by_auto, want, "{}", m.id);
    }
    for m in tier {
        m.stop();
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn pause_at_holds_and_the_cli_pauses_resumes_and_promotes_the_whole_tier() {
    let etcd = Etcd::launch("tier-pause").await;
    put(
        &[etcd.client_url.as_str()],
        "/pitboss/pause/flags",
        &walk_flags("[1, 5, 25, 50, 100]", "pause_at = 25\n"),
    )
    .await;
    let mut tier = Vec::new();
    for id in ["pause-a", "pause-b"] {
        tier.push(Member::start(&[etcd.client_url.as_str()], "pause", id, "").await);
    }
    let loads: Vec<Load> = tier
        .iter()
        .map(|m| Load::start(&m.client, 2, &m.id))
        .collect();
    all_reach(&tier, "canary 25%", |r| r.percent == 25.0).await;
    let leader = analyser(&tier).await;
    let other = 1 - leader;
    let (lead, peer) = (&tier[leader], &tier[other]);

    // pause_at: the analyser holds the walk at 25%, step after step's worth of time.
    let held = eventually_async(BOUND, || async {
        lead.rollout().await.promotion.starts_with("held")
            && lead.metric("pitboss_rollout_step_seconds", &[]).await > 1.5
    })
    .await;
    assert!(held, "not held at 25%: {:?}", lead.rollout().await);
    for m in &tier {
        let r = m.rollout().await;
        assert_eq!((r.percent, r.step, r.pause_at), (25.0, 3, 25.0), "{}", m.id);
    }
    let status = String::from_utf8(
        rollout_cli_at(&lead.proc.admin, TOKEN, &["status"])
            .await
            .stdout,
    )
    .unwrap();
    assert!(status.contains("at step 3 of 5  pause_at 25"), "{status}");
    assert!(status.contains("promotion held: pause_at = 25"), "{status}");

    // `pause` on one instance pauses the tier.
    let out = rollout_cli_at(&peer.proc.admin, TOKEN, &["pause"]).await;
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("state paused"),
        "{out:?}"
    );
    all_reach(&tier, "paused", |r| {
        r.state == "paused" && r.effective_percent == 0.0
    })
    .await;
    for m in &tier {
        let gauge = m.proc.metrics;
        assert!(
            eventually_async(BOUND, || async move {
                sample(&scrape(gauge).await, "pitboss_rollout_state", &[]) == Some(1.0)
            })
            .await,
            "{}: pitboss_rollout_state is not 1 (paused)",
            m.id
        );
    }
    // A paused rollout cannot be promoted: a clear refusal, nothing written.
    let out = rollout_cli_at(&lead.proc.admin, TOKEN, &["promote"]).await;
    assert!(!out.status.success(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("the rollout is paused; resume it before promoting"),
        "{err}"
    );

    // `resume` on the other: active again, and held again at 25%.
    let out = rollout_cli_at(&lead.proc.admin, TOKEN, &["resume"]).await;
    assert!(out.status.success(), "{out:?}");
    all_reach(&tier, "active", |r| {
        r.state == "active" && r.percent == 25.0
    })
    .await;
    assert!(
        eventually_async(BOUND, || async {
            lead.rollout().await.promotion.starts_with("held")
        })
        .await,
        "not held again after resume"
    );

    // `promote`: past the hold to 50%, then the walk goes on by itself to 100%.
    let out = rollout_cli_at(&peer.proc.admin, TOKEN, &["promote"]).await;
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("percent 50"),
        "{out:?}"
    );
    all_reach(&tier, "canary 100%", |r| r.percent == 100.0 && r.step == 5).await;
    for load in loads {
        let r = load.stop().await;
        assert_eq!(
            r.failed, 0,
            "{} of {} calls failed: {:?}",
            r.failed, r.calls, r.errors
        );
    }

    // The audit log, through the CLI and the RPC behind it.
    let changes = lead.history().await;
    let summary: Vec<(&str, &str, &str)> = changes
        .iter()
        .map(|c| (c.action.as_str(), c.instance.as_str(), c.after.as_str()))
        .collect();
    assert_eq!(
        summary,
        vec![
            ("auto-promotion", lead.id.as_str(), "canary 100% active"),
            ("promote", peer.id.as_str(), "canary 50% active"),
            ("resume", lead.id.as_str(), "canary 25% active"),
            ("pause", peer.id.as_str(), "canary 25% paused"),
            ("auto-promotion", lead.id.as_str(), "canary 25% active"),
            ("auto-promotion", lead.id.as_str(), "canary 5% active"),
        ],
        "{changes:#?}"
    );
    for c in &changes[1..4] {
        assert!(c.actor.starts_with("tester@"), "{c:?}");
    }
    let history = String::from_utf8(
        rollout_cli_at(&peer.proc.admin, TOKEN, &["history"])
            .await
            .stdout,
    )
    .unwrap();
    let actions: Vec<&str> = history
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .collect();
    assert_eq!(
        actions,
        vec![
            "auto-promotion",
            "promote",
            "resume",
            "pause",
            "auto-promotion",
            "auto-promotion"
        ],
        "{history}"
    );
    assert!(
        history.contains("by tester@") && history.contains(&format!("on {}", peer.id)),
        "{history}"
    );

    // The metrics, exact per process: 3 automatic promotions by the analyser, 1 by
    // the operator on the instance the CLI talked to, step 5 of 5 everywhere.
    let count = |m: &Member, by: &'static str| {
        let addr = m.proc.metrics;
        async move {
            sample(
                &scrape(addr).await,
                "pitboss_rollout_promotions_total",
                &[("by", by)],
            )
            .unwrap_or(0.0)
        }
    };
    assert_eq!(
        lead.counter_reaching("pitboss_rollout_promotions_total", &[("by", "auto")], 3.0)
            .await,
        3.0
    );
    assert_eq!(count(lead, "operator").await, 0.0);
    assert_eq!(count(peer, "auto").await, 0.0);
    assert_eq!(count(peer, "operator").await, 1.0);
    for m in &tier {
        assert_eq!(m.metric("pitboss_rollout_step", &[]).await, 5.0, "{}", m.id);
        assert_eq!(
            m.metric("pitboss_rollout_state", &[]).await,
            0.0,
            "{}",
            m.id
        );
    }
    // GetRollout's count is the instance's own, as the metrics.
    assert_eq!(lead.rollout().await.promotions, 3);
    assert_eq!(peer.rollout().await.promotions, 1);
    for m in tier {
        m.stop();
    }
}

#[tokio::test]
async fn losing_the_etcd_quorum_fails_no_call_and_the_tier_resyncs_when_it_returns() {
    let mut cluster = EtcdCluster::launch("quorum").await;
    let key = "/pitboss/quorum/flags";
    put(
        &cluster.endpoints(),
        key,
        "mode = \"canary\"\npercent = 50.0\ncommands = [\"*\"]\n",
    )
    .await;
    let endpoints = cluster.endpoints();
    let mut tier = Vec::new();
    for id in ["quorum-a", "quorum-b"] {
        tier.push(Member::start(&endpoints, "quorum", id, "").await);
    }
    all_reach(&tier, "canary 50% from etcd", |r| {
        r.percent == 50.0 && r.store_up
    })
    .await;
    let loads: Vec<Load> = tier
        .iter()
        .map(|m| Load::start(&m.client, 4, &m.id))
        .collect();
    let total = |loads: &[Load]| loads.iter().map(Load::calls).sum::<u64>();

    // Two of three members down: the one left has no leader, so nothing is readable.
    let before = total(&loads);
    cluster.stop(1);
    cluster.stop(2);
    let lost = Instant::now();
    for m in &tier {
        let addr = m.proc.metrics;
        assert!(
            eventually_async(BOUND, || async move {
                sample(&scrape(addr).await, "pitboss_rollout_store_up", &[]) == Some(0.0)
            })
            .await,
            "{}: pitboss_rollout_store_up stays 1 without quorum",
            m.id
        );
    }
    let noticed = lost.elapsed();
    for m in &tier {
        let (status, body) = http_get(m.proc.metrics, "/readyz").await;
        assert_eq!(status, 200, "{}: unready without the store: {body}", m.id);
        assert!(
            body.contains("note: rollout store unreachable since"),
            "{}: {body}",
            m.id
        );
        assert!(
            body.contains("serving with the flags of revision"),
            "{body}"
        );
        let r = m.rollout().await;
        assert!(!r.store_up);
        assert_eq!(r.percent, 50.0, "{}: fail static", m.id);
    }
    // A write without quorum fails with a clear error, and nothing changes now. If
    // the member left had taken it (it was the leader when the others went), etcd
    // commits it when the quorum returns: pitboss says it may still be applied.
    let e = tier[0]
        .admin
        .clone()
        .set_rollout(authed(
            pb::SetRolloutRequest {
                percent: 10.0,
                actor: "tester".into(),
                ..Default::default()
            },
            TOKEN,
        ))
        .await
        .unwrap_err();
    let unconfirmed = match e.code() {
        tonic::Code::Unavailable => false,
        tonic::Code::DeadlineExceeded => {
            assert!(
                e.message()
                    .contains("it may still apply it when it recovers")
                    && e.message().contains("pitboss rollout history"),
                "{e:?}"
            );
            true
        }
        _ => panic!("unexpected refusal: {e:?}"),
    };
    assert!(e.message().contains("unreachable"), "{e:?}");
    // Calls go on being served without the store.
    let during = total(&loads);
    assert!(
        eventually(BOUND, || total(&loads) > during + 200).await,
        "calls stalled without quorum"
    );
    let outage_calls = total(&loads) - before;

    // Quorum back. A change is written as soon as etcd takes writes again, before
    // the instances have noticed: they must resync to see it.
    cluster.start(1);
    cluster.start(2);
    cluster.wait_for_quorum().await;
    let back = Instant::now();
    let mut c = etcd_client::Client::connect(&cluster.client_urls, None)
        .await
        .unwrap();
    let text =
        String::from_utf8(c.get(key, None).await.unwrap().kvs()[0].value().to_vec()).unwrap();
    let text: Vec<&str> = text
        .lines()
        .map(|l| {
            if l.starts_with("percent = ") {
                "percent = 30.0"
            } else {
                l
            }
        })
        .collect();
    c.put(key, text.join("\n"), None).await.unwrap();
    all_reach(&tier, "the change written when quorum returned", |r| {
        r.store_up && r.percent == 30.0
    })
    .await;
    let resynced = back.elapsed();
    for m in &tier {
        let addr = m.proc.metrics;
        assert!(
            eventually_async(BOUND, || async move {
                sample(&scrape(addr).await, "pitboss_rollout_store_up", &[]) == Some(1.0)
            })
            .await,
            "{}: pitboss_rollout_store_up stays 0 after quorum returned",
            m.id
        );
        let (status, body) = http_get(m.proc.metrics, "/readyz").await;
        assert_eq!(status, 200, "{body}");
        assert!(!body.contains("rollout store unreachable"), "{body}");
    }
    // And a write through pitboss goes to the whole tier again.
    tier[1]
        .admin
        .clone()
        .set_rollout(authed(
            pb::SetRolloutRequest {
                percent: 40.0,
                actor: "tester".into(),
                ..Default::default()
            },
            TOKEN,
        ))
        .await
        .unwrap();
    all_reach(&tier, "40% set through quorum-b", |r| r.percent == 40.0).await;
    // The audit log: the write refused without quorum is there only if pitboss said
    // it was unconfirmed (then etcd may have committed it when the quorum returned).
    let history = tier[0].history().await;
    let late = history.iter().any(|c| c.after == "canary 10% active");
    assert!(
        unconfirmed || !late,
        "a write refused as not written ({e:?}) was applied: {history:#?}"
    );
    assert_eq!(history[0].after, "canary 40% active", "{history:#?}");
    assert_eq!(history[0].instance, "quorum-b");

    let mut calls = 0;
    for load in loads {
        let r = load.stop().await;
        assert_eq!(
            r.failed, 0,
            "{} of {} calls failed across the quorum loss: {:?}",
            r.failed, r.calls, r.errors
        );
        calls += r.calls;
    }
    eprintln!(
        "quorum loss: store_up 0 after {noticed:?}; {outage_calls} calls while it was out; \
         resynced {resynced:?} after quorum returned; {calls} calls in all, 0 failed; the \
         write without quorum was {}",
        match (unconfirmed, late) {
            (false, _) => "refused (UNAVAILABLE)",
            (true, true) => "unconfirmed (DEADLINE_EXCEEDED), then committed by etcd",
            (true, false) => "unconfirmed (DEADLINE_EXCEEDED), and never committed",
        }
    );
    for m in tier {
        m.stop();
    }
}
