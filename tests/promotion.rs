//! Automatic step promotion on one instance with the file store: a real server whose
//! `legacy` runs `demo.py` and whose `new` runs `demo_v2.py`, driven by a steady load
//! of calls with distinct routing keys (so every step sends some of them to new).

mod common;

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use pitboss::rollout::flags::{Mode, RolloutState};
use pitboss::server::RunningServer;

const TOKEN: &str = "promotion-test-token";
/// Generous: the machine running the suite is loaded.
const WALK_BOUND: Duration = Duration::from_secs(60);

struct Setup {
    dir: PathBuf,
    server: RunningServer,
    client: Client,
}

impl Setup {
    async fn start(tag: &str, flags: &str, new_env: &str) -> Setup {
        let dir = temp_dir(&format!("promotion-{tag}"));
        std::fs::write(dir.join("flags.toml"), flags).unwrap();
        std::fs::write(dir.join("token"), format!("{TOKEN}\n")).unwrap();
        let rest = format!("{}{}", legacy_and_new(new_env), rollout_section(&dir));
        let text = on_free_ports("shutdown_grace = \"10s\"", &rest);
        let (server, client) = common::start(config(&text)).await;
        Setup {
            dir,
            server,
            client,
        }
    }

    fn flags(&self) -> Arc<pitboss::rollout::Flags> {
        self.server.edge().rollout().flags.get()
    }

    fn percent(&self) -> f64 {
        let f = self.flags();
        match f.mode {
            Mode::Canary => f.percent.0.as_f64(),
            Mode::Full => 100.0,
            _ => 0.0,
        }
    }

    async fn stop(self) {
        self.server.shutdown().await;
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

const WALK: &str = "mode = \"canary\"\npercent = 1.0\ncommands = [\"*\"]\n\
    fallback_to_legacy = false\n[rollback]\nmin_requests = 1000000\n\
    [promotion]\nsteps = [1, 5, 25, 50, 100]\nmin_duration = \"300ms\"\nmin_requests = 3\n\
    max_error_rate = 0.05\n";

#[tokio::test]
async fn a_healthy_new_walks_every_step_to_100_and_each_promotion_is_audited() {
    let s = Setup::start("walk", WALK, "").await;
    // Fallback off: new's errors reach the callers.
    let load = Load::start(&s.client, 4, "key");
    let mut seen = vec![s.percent()];
    let done = eventually(WALK_BOUND, || {
        let p = s.percent();
        if seen.last() != Some(&p) {
            seen.push(p);
        }
        p == 100.0
    })
    .await;
    let LoadReport { calls, failed, .. } = load.stop().await;
    assert!(
        done,
        "the walk stopped at {}%: {:?}",
        s.percent(),
        s.flags().status
    );
    assert_eq!(
        seen,
        vec![1.0, 5.0, 25.0, 50.0, 100.0],
        "one step at a time"
    );
    assert_eq!(failed, 0, "{failed} of {calls} calls failed");
    let f = s.flags();
    assert_eq!(f.status.state, RolloutState::Active);
    assert_eq!(f.status.changed_by, "pitboss auto-promotion");
    let rollout = s.server.edge().rollout();
    assert_eq!(rollout.counters.promotions.load(Ordering::Relaxed), 4);

    // The flags file holds the last step, so a restart keeps it.
    let on_disk = pitboss::rollout::LiveFlags::load(&s.dir.join("flags.toml"))
        .unwrap()
        .get();
    assert_eq!(on_disk.percent.0.as_f64(), 100.0);

    // The audit log and the CLI.
    let history = rollout_cli(s.server.admin_addr, TOKEN, &["history"]).await;
    let promotions: Vec<&str> = history
        .lines()
        .filter(|l| l.contains("auto-promotion"))
        .collect();
    assert_eq!(promotions.len(), 4, "{history}");
    assert!(promotions[0].contains("canary 100% active"), "{history}");
    let status = rollout_cli(s.server.admin_addr, TOKEN, &["status"]).await;
    assert!(status.contains("at step 5 of 5"), "{status}");
    assert!(status.contains("promotions 4"), "{status}");
    // The metrics recorder is shared by every server of this test binary (they run
    // at once), so the exact counts are those of the instance's counters above; the
    // scrape shows that the series exist and count.
    let metrics = scrape(s.server.metrics_addr).await;
    assert!(
        sample(&metrics, "pitboss_rollout_step", &[]).is_some(),
        "{metrics}"
    );
    let auto = sample(
        &metrics,
        "pitboss_rollout_promotions_total",
        &[("by", "auto")],
    );
    assert!(auto.unwrap_or(0.0) >= 4.0, "{metrics}");
    s.stop().await;
}

#[tokio::test]
async fn pause_at_holds_an_operator_promotes_and_a_failing_gate_rolls_back_mid_walk() {
    let dir = temp_dir("promotion-broken-flag");
    let broken = dir.join("broken");
    let s = Setup::start(
        "gate",
        &format!("{WALK}pause_at = 25\n"),
        &format!("DEMO_V2_BROKEN_WHILE = \"{}\"", broken.display()),
    )
    .await;
    // Fallback off: new's errors reach the callers.
    let load = Load::start(&s.client, 4, "key");
    let rollout = s.server.edge().rollout();
    assert!(
        eventually(WALK_BOUND, || rollout
            .analysis()
            .promotion
            .starts_with("held"))
        .await,
        "not held at 25%: {}% {:?}",
        s.percent(),
        rollout.analysis()
    );
    assert_eq!(s.percent(), 25.0);
    let status = rollout_cli(s.server.admin_addr, TOKEN, &["status"]).await;
    assert!(status.contains("pause_at 25"), "{status}");
    assert!(status.contains("promotion held"), "{status}");

    // The operator lets it go on: the next step, 50%.
    let out = rollout_cli(s.server.admin_addr, TOKEN, &["promote"]).await;
    assert!(out.contains("percent 50"), "{out}");
    assert!(s.flags().status.changed_by.starts_with("tester@"));

    // new starts failing at 50%: the gate rolls back, and the walk stops there.
    std::fs::write(&broken, "").unwrap();
    assert!(
        eventually(WALK_BOUND, || s.flags().status.state
            == RolloutState::RolledBack)
        .await,
        "not rolled back: {:?}",
        s.flags().status
    );
    let LoadReport { calls, failed, .. } = load.stop().await;
    assert!(failed > 0, "new never failed ({calls} calls)");
    let f = s.flags();
    assert!(
        f.status.reason.contains("gate: error rate"),
        "{}",
        f.status.reason
    );
    assert_eq!(f.status.changed_by, "pitboss auto-rollback");
    assert_eq!(
        f.percent.0.as_f64(),
        50.0,
        "the step is kept for the record"
    );
    assert_eq!(rollout.counters.promotions.load(Ordering::Relaxed), 3);

    let history = rollout_cli(s.server.admin_addr, TOKEN, &["history"]).await;
    let actions: Vec<&str> = history
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .collect();
    assert_eq!(
        actions,
        vec![
            "auto-rollback",
            "promote",
            "auto-promotion",
            "auto-promotion"
        ],
        "{history}"
    );
    // Shared recorder (see above): at least this test's own counts.
    let metrics = scrape(s.server.metrics_addr).await;
    let by_operator = sample(
        &metrics,
        "pitboss_rollout_promotions_total",
        &[("by", "operator")],
    );
    assert!(by_operator.unwrap_or(0.0) >= 1.0, "{metrics}");
    assert!(
        sum_of(
            &metrics,
            "pitboss_rollout_rollbacks_total",
            &[("reason", "error_rate")]
        ) >= 1.0,
        "{metrics}"
    );
    s.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn without_traffic_the_walk_neither_promotes_nor_rolls_back() {
    let s = Setup::start("idle", WALK, "").await;
    let rollout = s.server.edge().rollout();
    // Many steps' worth of min_duration pass with no call at all.
    assert!(
        eventually(WALK_BOUND, || rollout.at_step() > Duration::from_secs(3)).await,
        "the step clock does not run"
    );
    let f = s.flags();
    assert_eq!((f.mode, f.percent.0.as_f64()), (Mode::Canary, 1.0));
    assert_eq!(f.status.state, RolloutState::Active);
    assert!(
        rollout
            .analysis()
            .promotion
            .contains("new has 0 of the 3 calls"),
        "{:?}",
        rollout.analysis()
    );
    assert_eq!(rollout.counters.promotions.load(Ordering::Relaxed), 0);
    assert_eq!(rollout.counters.rollbacks.load(Ordering::Relaxed), 0);
    s.stop().await;
}
