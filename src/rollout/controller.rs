//! The rollout at run time: routes calls and sessions with the live flags, keeps each
//! backend's rolling statistics, rolls `new` back when they cross a threshold, and
//! applies operators' changes. Every change is written to the flags file and audited.
//!
//! The decisions themselves are pure functions elsewhere ([`super::flags::route`],
//! [`super::stats::rollback_reason`], [`super::flags::apply_change`]); this is the
//! plumbing that feeds them live data and acts on their answers.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::flags::{self, apply_change, rolled_back, Change, Flags, Mode, RefusedChange, Route};
use super::reload::{LiveFlags, UpdateError};
use super::shadow::Outcome;
use super::stats::{rollback_reason, RollbackRules, RollingStats, WindowStats};
use crate::backend::Role;
use crate::resilience::ErrorClass;

/// Counters shown by `GetRollout` and `pitboss rollout status`.
#[derive(Debug, Default)]
pub struct Counters {
    pub shadow_match: AtomicU64,
    pub shadow_mismatch: AtomicU64,
    pub shadow_error: AtomicU64,
    pub fallbacks: AtomicU64,
    pub rollbacks: AtomicU64,
}

/// The auto-rollback found the rollout already changed (an operator was quicker):
/// nothing to do.
#[derive(Debug, thiserror::Error)]
#[error("already changed")]
struct AlreadyChanged;

pub struct Rollout {
    pub flags: Arc<LiveFlags>,
    /// Whether a `new` backend exists; without one, everything is legacy.
    pub has_new: bool,
    legacy: RollingStats,
    new: RollingStats,
    pub counters: Counters,
}

impl Rollout {
    pub fn new(flags: Arc<LiveFlags>, has_new: bool) -> Arc<Rollout> {
        let window = flags.get().rollback.window.0;
        let r = Arc::new(Rollout {
            flags,
            has_new,
            legacy: RollingStats::new(window),
            new: RollingStats::new(window),
            counters: Counters::default(),
        });
        r.publish();
        r
    }

    /// Where a call without a session goes. The stickiness key is the routing key,
    /// else a random bucket per call.
    pub fn route_call(&self, command: &str, routing_key: Option<&str>, idempotent: bool) -> Route {
        if !self.has_new {
            return Route::Legacy;
        }
        let f = self.flags.get();
        let key = flags::sticky_key(None, routing_key);
        flags::route(&f, command, key, idempotent, rand::random::<u32>())
    }

    /// Where a new session is pinned; the key is the routing key, else the session id.
    pub fn route_session(&self, session_id: &str, routing_key: Option<&str>) -> Role {
        if !self.has_new {
            return Role::Legacy;
        }
        let key = flags::sticky_key(routing_key, Some(session_id)).unwrap_or(session_id);
        match flags::session_route(&self.flags.get(), key) {
            Route::New => Role::New,
            _ => Role::Legacy,
        }
    }

    fn stats_of(&self, role: Role) -> &RollingStats {
        match role {
            Role::Legacy => &self.legacy,
            Role::New => &self.new,
        }
    }

    /// One finished call of a backend (shadow calls included), for rollback decisions.
    pub fn record(&self, role: Role, latency: Duration, failure: Option<ErrorClass>) {
        self.stats_of(role).record(Instant::now(), latency, failure);
    }

    /// One finished call, saying whether its failure counts as the backend's error
    /// (see [`RollingStats::record_as`]).
    pub fn record_as(
        &self,
        role: Role,
        latency: Duration,
        failure: Option<ErrorClass>,
        counted: bool,
    ) {
        self.stats_of(role)
            .record_as(Instant::now(), latency, failure, counted);
    }

    pub fn stats(&self, role: Role) -> WindowStats {
        self.stats_of(role).snapshot(Instant::now())
    }

    pub fn shadow_result(&self, outcome: Outcome) -> u64 {
        metrics::counter!("pitboss_shadow_comparisons_total", "result" => outcome.as_str())
            .increment(1);
        let c = match outcome {
            Outcome::Match => &self.counters.shadow_match,
            Outcome::Mismatch => &self.counters.shadow_mismatch,
            Outcome::Error => &self.counters.shadow_error,
        };
        c.fetch_add(1, Ordering::Relaxed) + 1
    }

    pub fn fallback(&self) {
        metrics::counter!("pitboss_fallbacks_total").increment(1);
        self.counters.fallbacks.fetch_add(1, Ordering::Relaxed);
    }

    /// Evaluates the rollback rules once; rolls back when one fires. Returns the
    /// reason when it rolled back.
    pub async fn check(&self) -> Option<String> {
        if !self.has_new {
            return None;
        }
        let f = self.flags.get();
        let window = f.rollback.window.0;
        for s in [&self.legacy, &self.new] {
            s.set_window(window);
        }
        if f.status.state != flags::RolloutState::Active || f.mode == Mode::Off {
            return None;
        }
        let rules = RollbackRules {
            error_rate_threshold: f.rollback.error_rate_threshold.0,
            latency_p99_threshold: Duration::from_millis(f.rollback.latency_p99_threshold_ms),
            min_requests: f.rollback.min_requests,
            relative_error_rate: f.rollback.relative_error_rate,
        };
        let reason = rollback_reason(&rules, &self.stats(Role::New), &self.stats(Role::Legacy))?;
        let now = now_rfc3339();
        let result = self
            .flags
            .update(|cur| {
                if cur.status.state != flags::RolloutState::Active {
                    return Err(AlreadyChanged);
                }
                Ok(rolled_back(cur, &reason, &now))
            })
            .await;
        match result {
            Ok((old, new)) => {
                let kind = reason_kind(&reason);
                metrics::counter!("pitboss_rollout_rollbacks_total", "reason" => kind).increment(1);
                self.counters.rollbacks.fetch_add(1, Ordering::Relaxed);
                audit("pitboss auto-rollback", &old, &new, &reason);
                self.new.clear();
                self.legacy.clear();
                self.publish();
                Some(reason)
            }
            Err(UpdateError::Refused(AlreadyChanged)) => None,
            Err(e) => {
                // The file could not be written (a read-only ConfigMap volume, a full
                // disk): nothing changed. Say so loudly, and count it for alerts.
                tracing::error!(%reason, "auto-rollback wanted but failed: {e}");
                metrics::counter!("pitboss_rollout_rollback_failures_total").increment(1);
                None
            }
        }
    }

    /// Applies an operator's change, persists it and audits it.
    pub async fn change(
        &self,
        change: &Change,
        actor: &str,
    ) -> Result<Arc<Flags>, UpdateError<RefusedChange>> {
        let now = now_rfc3339();
        let (old, new) = self
            .flags
            .update(|cur| apply_change(cur, change, actor, &now))
            .await?;
        if *old != *new {
            audit(actor, &old, &new, &new.status.reason);
            if change.action == Some(flags::Action::Rollback) {
                metrics::counter!("pitboss_rollout_rollbacks_total", "reason" => "operator")
                    .increment(1);
                self.counters.rollbacks.fetch_add(1, Ordering::Relaxed);
            }
            if old.status.state != new.status.state {
                // Fresh evidence after a resume or rollback: old data does not count.
                self.new.clear();
                self.legacy.clear();
            }
        }
        self.publish();
        Ok(new)
    }

    /// Publishes the rollout gauges.
    pub fn publish(&self) {
        let f = self.flags.get();
        metrics::gauge!("pitboss_rollout_percent").set(f.effective_percent().as_f64());
        metrics::gauge!("pitboss_rollout_state").set(match f.status.state {
            flags::RolloutState::Active => 0.0,
            flags::RolloutState::Paused => 1.0,
            flags::RolloutState::RolledBack => 2.0,
        });
    }

    /// Evaluates the rules every `interval` until `stop`.
    pub fn spawn_checker(self: &Arc<Self>, interval: Duration, stop: CancellationToken) {
        let me = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        me.check().await;
                        me.publish();
                    }
                    _ = stop.cancelled() => return,
                }
            }
        });
    }
}

/// The metric label for a rollback reason (bounded).
pub fn reason_kind(reason: &str) -> &'static str {
    if reason.contains("legacy's") {
        "relative_error_rate"
    } else if reason.contains("p99") {
        "latency"
    } else {
        "error_rate"
    }
}

/// The audit line for a rollout change: who, when, old and new.
fn audit(actor: &str, old: &Flags, new: &Flags, reason: &str) {
    tracing::warn!(
        target: "pitboss::audit",
        actor,
        at = %new.status.changed_at,
        old_mode = old.mode.as_str(),
        old_percent = old.percent.0.as_f64(),
        old_state = old.status.state.as_str(),
        new_mode = new.mode.as_str(),
        new_percent = new.percent.0.as_f64(),
        new_state = new.status.state.as_str(),
        reason,
        "rollout changed"
    );
}

/// Now, as RFC 3339 UTC (`2026-11-24T09:30:00Z`), without a date crate.
pub fn now_rfc3339() -> String {
    let secs = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    rfc3339(secs)
}

fn rfc3339(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_795_000_000), "2026-11-18T11:06:40Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn reason_labels_are_bounded() {
        assert_eq!(reason_kind("error rate 12.0% > 5.0%"), "error_rate");
        assert_eq!(reason_kind("p99 latency 2s > 1s"), "latency");
        assert_eq!(
            reason_kind("error rate 4.0% is more than 3× legacy's 0.5%"),
            "relative_error_rate"
        );
    }

    fn flags(text: &str) -> Arc<LiveFlags> {
        LiveFlags::in_memory(Flags::parse("f", text).unwrap())
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_new_backend_is_rolled_back_once_there_is_enough_data() {
        let r = Rollout::new(
            flags(
                "mode = \"canary\"\npercent = 50.0\ncommands = [\"*\"]\n\
                 [rollback]\nmin_requests = 20\nwindow = \"10s\"\n",
            ),
            true,
        );
        // Ten failures: below min_requests, no decision either way.
        for _ in 0..10 {
            r.record(
                Role::New,
                Duration::from_millis(5),
                Some(ErrorClass::WorkerCrashed),
            );
        }
        assert_eq!(r.check().await, None);
        for _ in 0..10 {
            r.record(Role::New, Duration::from_millis(5), None);
        }
        let reason = r.check().await.expect("50% errors over 20 calls");
        assert!(reason.contains("error rate"), "{reason}");
        let f = r.flags.get();
        assert_eq!(f.status.state, flags::RolloutState::RolledBack);
        assert_eq!(f.status.changed_by, "pitboss auto-rollback");
        assert_eq!(r.route_call("echo", Some("k"), true), Route::Legacy);
        assert_eq!(r.counters.rollbacks.load(Ordering::Relaxed), 1);
        // Nothing more happens until an operator resumes.
        assert_eq!(r.check().await, None);
        let resumed = r
            .change(
                &Change {
                    action: Some(flags::Action::Resume),
                    ..Default::default()
                },
                "ops",
            )
            .await
            .unwrap();
        assert_eq!(resumed.status.state, flags::RolloutState::Active);
        assert_eq!(r.stats(Role::New).requests, 0, "old evidence is dropped");
    }

    #[tokio::test(start_paused = true)]
    async fn healthy_or_quiet_backends_are_left_alone() {
        let r = Rollout::new(
            flags("mode = \"canary\"\npercent = 50.0\ncommands = [\"*\"]\n[rollback]\nmin_requests = 5\n"),
            true,
        );
        assert_eq!(r.check().await, None, "no data is no decision");
        for _ in 0..100 {
            r.record(Role::New, Duration::from_millis(5), None);
            r.record(
                Role::New,
                Duration::from_millis(5),
                Some(ErrorClass::InvalidRequest),
            );
        }
        assert_eq!(
            r.check().await,
            None,
            "the caller's bad input is not new's fault"
        );
        let without_new = Rollout::new(flags("mode = \"full\"\ncommands = [\"*\"]\n"), false);
        assert_eq!(without_new.route_call("x", None, true), Route::Legacy);
        assert_eq!(without_new.route_session("s", None), Role::Legacy);
    }
}
