//! The rollout at run time: routes calls and sessions with the live flags, keeps each
//! backend's rolling statistics, rolls `new` back when they cross a threshold, and
//! applies operators' changes. Every change is written to the flags file and audited.
//!
//! The decisions themselves are pure functions elsewhere ([`super::flags::route`],
//! [`super::stats::rollback_reason`], [`super::flags::apply_change`]); this is the
//! plumbing that feeds them live data and acts on their answers.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::flags::{
    self, apply_change, rolled_back, step_changed, step_key, Action, Change, Flags, Mode,
    RefusedChange, Route,
};
use super::promotion::{self, promoted, StepAt, Verdict};
use super::reload::LiveFlags;
use super::shadow::Outcome;
use super::stats::{rollback_reason, RollbackRules, RollingStats, WindowStats};
use super::store::file::FileStore;
use super::store::{AuditRecord, CasError, FlagStore, StoreError};
use super::tier::{self, Published};
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
    pub promotions: AtomicU64,
}

/// An automatic decision found the rollout already changed (an operator, or another
/// instance, was quicker): nothing to do.
#[derive(Debug, thiserror::Error)]
#[error("already changed")]
struct AlreadyChanged;

/// Why a change of the rollout wrote nothing.
#[derive(Debug, thiserror::Error)]
pub enum ChangeError<E> {
    /// The change itself is not allowed in this state.
    #[error(transparent)]
    Refused(E),
    /// Another writer was first (compare-and-swap on the revision).
    #[error(transparent)]
    Conflict(CasError),
    /// The store could not be read or written.
    #[error(transparent)]
    Store(StoreError),
}

/// Where the statistics of the last analysis came from.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Analysis {
    /// "this instance", or "the tier: 3 instances" / "the tier (analysed by X)".
    pub scope: String,
    /// The walk's state in words (empty without a walk).
    pub promotion: String,
}

/// How many times a rollback is retried against newer revisions before it gives up
/// until the next check (each retry follows a write by someone else).
const ROLLBACK_RETRIES: usize = 10;

pub struct Rollout {
    pub flags: Arc<LiveFlags>,
    /// Where the flags live (a file, memory, or etcd shared by the tier).
    pub store: Arc<dyn FlagStore>,
    /// Whether a `new` backend exists; without one, everything is legacy.
    pub has_new: bool,
    /// This instance, for the audit log.
    instance: String,
    legacy: RollingStats,
    new: RollingStats,
    pub counters: Counters,
    /// The step the statistics count ([`step_key`]), and since when on this
    /// instance's clock: a walk times its steps with it.
    step: Mutex<(String, Instant)>,
    analysis: Mutex<Analysis>,
    leader: AtomicBool,
    /// Automatic writes the store took but did not confirm in time (etcd slow, or
    /// without a quorum): they may still land. Each is counted when the flags in force
    /// show it, and given up (a rollback counted as a failure) once the flags moved
    /// on without it.
    pending: Mutex<Option<PendingWrites>>,
}

/// The automatic writes of the analysis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AutoWrite {
    Rollback,
    Promotion,
}

impl AutoWrite {
    /// The automatic write an audit action names, if it is one.
    fn of(action: &str) -> Option<AutoWrite> {
        match action {
            "auto-rollback" => Some(AutoWrite::Rollback),
            "auto-promotion" => Some(AutoWrite::Promotion),
            _ => None,
        }
    }
}

/// Unconfirmed automatic writes: the revision their compare-and-swaps were made on,
/// the flags they replace, and what each wrote (a later check may send another on
/// the same revision; at most one of them can land).
#[derive(Debug, Clone)]
struct PendingWrites {
    base: u64,
    old: Arc<Flags>,
    sent: Vec<(AutoWrite, Flags)>,
}

/// What became of unconfirmed writes, judged on the flags in force.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PendingFate {
    /// The flags in force are the ones this write wrote: it was made.
    Landed(AutoWrite),
    /// The flags moved on from their revision without any of them: their
    /// compare-and-swaps can no longer apply.
    Superseded,
    /// Still at the revision they were made on: one may yet land.
    Waiting,
}

impl PendingWrites {
    fn fate(&self, now: &Flags, revision: u64) -> PendingFate {
        if let Some((kind, _)) = self.sent.iter().find(|(_, f)| f.status == now.status) {
            PendingFate::Landed(*kind)
        } else if revision != self.base {
            PendingFate::Superseded
        } else {
            PendingFate::Waiting
        }
    }

    fn has(&self, kind: AutoWrite) -> bool {
        self.sent.iter().any(|(k, _)| *k == kind)
    }
}

impl Rollout {
    /// A rollout whose flags live in `flags` itself (its file, or memory).
    pub fn new(flags: Arc<LiveFlags>, has_new: bool) -> Arc<Rollout> {
        let store = FileStore::new(flags.clone());
        Rollout::with_store(flags, store, has_new, "local")
    }

    /// A rollout whose flags `store` delivers into `flags` and takes writes for.
    pub fn with_store(
        flags: Arc<LiveFlags>,
        store: Arc<dyn FlagStore>,
        has_new: bool,
        instance: &str,
    ) -> Arc<Rollout> {
        let f = flags.get();
        let window = f.rollback.window.0;
        let r = Arc::new(Rollout {
            step: Mutex::new((step_key(&f), Instant::now())),
            flags,
            store,
            has_new,
            instance: instance.to_string(),
            legacy: RollingStats::new(window),
            new: RollingStats::new(window),
            counters: Counters::default(),
            analysis: Mutex::new(Analysis {
                scope: "this instance".into(),
                promotion: String::new(),
            }),
            leader: AtomicBool::new(false),
            pending: Mutex::new(None),
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

    /// This instance's statistics of one backend.
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
        if outcome != Outcome::Error {
            self.new
                .record_shadow(Instant::now(), outcome == Outcome::Mismatch);
        }
        c.fetch_add(1, Ordering::Relaxed) + 1
    }

    pub fn fallback(&self) {
        metrics::counter!("pitboss_fallbacks_total").increment(1);
        self.counters.fallbacks.fetch_add(1, Ordering::Relaxed);
    }

    /// Where the last analysis's statistics came from, and the walk's state.
    pub fn analysis(&self) -> Analysis {
        self.analysis
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn set_analysis(&self, scope: String, promotion: String) {
        *self.analysis.lock().unwrap_or_else(|e| e.into_inner()) = Analysis { scope, promotion };
    }

    /// How long the rollout has been at its current step, on this instance's clock.
    pub fn at_step(&self) -> Duration {
        self.step
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .1
            .elapsed()
    }

    /// Starts the statistics afresh when the flags in force are at another step than
    /// the one they count: each step is judged on its own traffic.
    fn follow_step(&self, f: &Flags) {
        let key = step_key(f);
        let mut step = self.step.lock().unwrap_or_else(|e| e.into_inner());
        if step.0 != key {
            *step = (key, Instant::now());
            self.new.clear();
            self.legacy.clear();
        }
    }

    /// What this instance publishes for the tier's analysis.
    fn published(&self, f: &Flags) -> Published {
        Published {
            instance: self.instance.clone(),
            step: step_key(f),
            at: now_rfc3339(),
            legacy: (&self.stats(Role::Legacy)).into(),
            new: (&self.stats(Role::New)).into(),
        }
    }

    /// Evaluates the rollback rules and the walk once, on this instance's statistics
    /// (file store) or, on the elected instance, the tier's (a shared store); acts on
    /// the verdict. Returns the reason when it rolled back.
    pub async fn check(&self) -> Option<String> {
        if !self.has_new {
            return None;
        }
        if let Some(reason) = self.settle_pending() {
            return Some(reason);
        }
        let (f, revision) = self.flags.current();
        let window = f.rollback.window.0;
        for s in [&self.legacy, &self.new] {
            s.set_window(window);
        }
        self.follow_step(&f);
        let tier = self.store.tier();
        if let Some(t) = &tier {
            if let Err(e) = t.publish(&self.published(&f)).await {
                tracing::debug!("cannot publish this instance's statistics: {e}");
            }
            self.leader.store(t.is_leader(), Ordering::Relaxed);
        }
        if f.status.state != flags::RolloutState::Active || f.mode == Mode::Off {
            let walk = promotion::decide(
                &f,
                self.at_step(),
                &WindowStats::default(),
                &WindowStats::default(),
            );
            let scope = self.analysis().scope;
            self.set_analysis(scope, walk.describe());
            return None;
        }
        let (new, legacy, scope) = match &tier {
            None => (
                self.stats(Role::New),
                self.stats(Role::Legacy),
                "this instance".to_string(),
            ),
            Some(t) if !t.is_leader() => {
                let by = t.leader().unwrap_or_else(|| "no instance yet".into());
                self.set_analysis(
                    format!("the tier, analysed by {by}"),
                    self.analysis().promotion,
                );
                return None;
            }
            Some(t) => match t.gather().await {
                Ok(all) => {
                    let totals = tier::sum(&all, &step_key(&f));
                    let scope = format!(
                        "the tier: {} instance{} (analysed here){}",
                        totals.instances,
                        if totals.instances == 1 { "" } else { "s" },
                        if totals.other_step > 0 {
                            format!(", {} still on another step", totals.other_step)
                        } else {
                            String::new()
                        }
                    );
                    (totals.new, totals.legacy, scope)
                }
                Err(e) => {
                    self.set_analysis(
                        format!("the tier: statistics unavailable ({e})"),
                        "no verdict without the tier's data".into(),
                    );
                    return None;
                }
            },
        };
        let rules = RollbackRules {
            error_rate_threshold: f.rollback.error_rate_threshold.0,
            latency_p99_threshold: Duration::from_millis(f.rollback.latency_p99_threshold_ms),
            min_requests: f.rollback.min_requests,
            relative_error_rate: f.rollback.relative_error_rate,
        };
        let tier_note = if tier.is_some() {
            format!(" ({scope})")
        } else {
            String::new()
        };
        if let Some(reason) = rollback_reason(&rules, &new, &legacy) {
            self.set_analysis(scope, String::new());
            return self.auto_rollback(&format!("{reason}{tier_note}")).await;
        }
        let verdict = promotion::decide(&f, self.at_step(), &new, &legacy);
        self.set_analysis(scope, verdict.describe());
        match verdict {
            Verdict::Rollback(reason) => self.auto_rollback(&format!("{reason}{tier_note}")).await,
            Verdict::Promote { to, reason } => {
                self.auto_promote(&f, revision, to, &format!("{reason}{tier_note}"))
                    .await;
                None
            }
            _ => None,
        }
    }

    /// Writes a rollback, retrying against newer revisions: a rollback always wins
    /// over a concurrent promotion (which, written on the revision it analysed, loses).
    async fn auto_rollback(&self, reason: &str) -> Option<String> {
        let now = now_rfc3339();
        let result = self
            .write(
                "auto-rollback",
                "pitboss auto-rollback",
                None,
                true,
                |cur| {
                    if cur.status.state != flags::RolloutState::Active {
                        return Err(AlreadyChanged);
                    }
                    Ok(rolled_back(cur, reason, &now))
                },
            )
            .await;
        match result {
            Ok((old, new)) if old != new => {
                self.made(AutoWrite::Rollback);
                self.rolled_back_by_us(&old, &new, reason);
                Some(reason.to_string())
            }
            Ok(_) | Err(ChangeError::Refused(AlreadyChanged)) => self.settle_pending(),
            Err(ChangeError::Store(e @ StoreError::Unconfirmed { .. })) => {
                // Sent: etcd may commit it late (a slow disk, a quorum coming back),
                // and the watch then brings it here. Look once now; the next checks
                // look again.
                tracing::warn!(%reason, "auto-rollback sent but not confirmed yet: {e}");
                self.refresh().await;
                self.settle_pending()
            }
            Err(e) => {
                // The store could not be written (a read-only ConfigMap volume, a full
                // disk, etcd unreachable): nothing changed. Say so loudly, and count it.
                tracing::error!(%reason, "auto-rollback wanted but failed: {e}");
                metrics::counter!("pitboss_rollout_rollback_failures_total").increment(1);
                None
            }
        }
    }

    /// Counts and audits a rollback this instance made.
    fn rolled_back_by_us(&self, old: &Flags, new: &Flags, reason: &str) {
        let kind = reason_kind(reason);
        metrics::counter!("pitboss_rollout_rollbacks_total", "reason" => kind).increment(1);
        self.counters.rollbacks.fetch_add(1, Ordering::Relaxed);
        audit("pitboss auto-rollback", old, new, reason);
    }

    /// Counts and audits a promotion this instance made.
    fn promoted_by_us(&self, old: &Flags, new: &Flags) {
        metrics::counter!("pitboss_rollout_promotions_total", "by" => "auto").increment(1);
        self.counters.promotions.fetch_add(1, Ordering::Relaxed);
        audit("pitboss auto-promotion", old, new, &new.status.reason);
    }

    /// Settles unconfirmed writes on the flags in force: the one that shows there is
    /// counted (a rollback's reason returned); all are given up once the flags moved
    /// on without them (a rollback counted as a failure).
    fn settle_pending(&self) -> Option<String> {
        let mut slot = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let pending = slot.as_ref()?;
        let (now, revision) = self.flags.current();
        match pending.fate(&now, revision) {
            PendingFate::Waiting => None,
            PendingFate::Landed(kind) => {
                let p = slot.take()?;
                let reason = now.status.reason.clone();
                tracing::info!(%reason, "an unconfirmed automatic write was applied by the store");
                match kind {
                    AutoWrite::Rollback => {
                        self.rolled_back_by_us(&p.old, &now, &reason);
                        Some(reason)
                    }
                    AutoWrite::Promotion => {
                        self.promoted_by_us(&p.old, &now);
                        None
                    }
                }
            }
            PendingFate::Superseded => {
                let p = slot.take()?;
                if p.has(AutoWrite::Rollback) {
                    rollback_not_made();
                }
                None
            }
        }
    }

    /// An automatic write of `kind` was made: unconfirmed ones on its revision can no
    /// longer land. A rollback made replaces one that was sent; a promotion made
    /// leaves a rollback that was sent not made (a failure, counted).
    fn made(&self, kind: AutoWrite) {
        let Some(p) = self
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        else {
            return;
        };
        if kind != AutoWrite::Rollback && p.has(AutoWrite::Rollback) {
            rollback_not_made();
        }
    }

    /// Writes a promotion on the revision it was decided on, once: if anything changed
    /// since (a rollback, an operator), the promotion is dropped and the next check
    /// decides again on the flags in force.
    async fn auto_promote(&self, analysed: &Flags, revision: u64, to: StepAt, reason: &str) {
        let now = now_rfc3339();
        let result = self
            .write(
                "auto-promotion",
                "pitboss auto-promotion",
                Some(revision),
                false,
                |cur| {
                    if step_changed(cur, analysed) {
                        return Err(AlreadyChanged);
                    }
                    Ok(promoted(cur, to, reason, "pitboss auto-promotion", &now))
                },
            )
            .await;
        match result {
            Ok((old, new)) if old != new => {
                self.made(AutoWrite::Promotion);
                self.promoted_by_us(&old, &new);
            }
            Ok(_) | Err(ChangeError::Refused(AlreadyChanged)) => {}
            Err(ChangeError::Conflict(e)) => {
                tracing::info!("auto-promotion dropped, the rollout changed first: {e}");
            }
            Err(ChangeError::Store(e @ StoreError::Unconfirmed { .. })) => {
                // As for a rollback: counted once it shows (now, or at a later check).
                tracing::warn!(
                    "auto-promotion to {} sent but not confirmed yet: {e}",
                    to.describe()
                );
                self.refresh().await;
                self.settle_pending();
            }
            Err(e) => tracing::warn!("auto-promotion to {} not written: {e}", to.describe()),
        }
    }

    /// One write of the rollout: `compute` on the flags in force, then a
    /// compare-and-swap in the store with its audit record, then the result in force
    /// here at once (the store's watch takes it to the other instances).
    ///
    /// `expected`: the revision the writer saw (an operator's `expected_revision`, the
    /// revision an analysis ran on); `None` means the revision in force when the change
    /// is computed. `persist`: on a conflict, recompute on the newer flags and retry
    /// (rollbacks); otherwise a conflict is returned to the caller.
    async fn write<E>(
        &self,
        action: &str,
        actor: &str,
        expected: Option<u64>,
        persist: bool,
        compute: impl Fn(&Flags) -> Result<Flags, E>,
    ) -> Result<(Arc<Flags>, Arc<Flags>), ChangeError<E>> {
        if let Some(e) = expected {
            if e > self.flags.revision() {
                // The writer saw a newer revision than this instance has applied yet
                // (another instance's status): catch up before comparing.
                self.refresh().await;
            }
        }
        for _ in 0..=ROLLBACK_RETRIES {
            let (cur, revision) = self.flags.current();
            let base = match expected {
                Some(e) if !persist => e,
                _ => revision,
            };
            if base != revision {
                return Err(ChangeError::Conflict(CasError::Conflict {
                    expected: base,
                    current: revision,
                    by: cur.status.changed_by.clone(),
                    now: None,
                }));
            }
            let new = compute(&cur).map_err(ChangeError::Refused)?;
            if new == *cur {
                return Ok((cur.clone(), cur));
            }
            let record = AuditRecord::new(action, actor, &self.instance, &cur, &new);
            match self.store.compare_and_swap(base, &new, &record).await {
                Ok(written) => {
                    self.flags.apply(new, written);
                    let now = self.flags.get();
                    self.follow_step(&now);
                    self.publish();
                    return Ok((cur, now));
                }
                Err(CasError::Conflict { now, .. }) if persist => match now {
                    Some(now) => {
                        let (f, r) = *now;
                        self.flags.apply(f, r);
                    }
                    None => self.refresh().await,
                },
                Err(CasError::Store(e)) => {
                    let auto = AutoWrite::of(action);
                    if let (Some(kind), StoreError::Unconfirmed { .. }) = (auto, &e) {
                        let mut slot = self.pending.lock().unwrap_or_else(|e| e.into_inner());
                        match slot.as_mut() {
                            Some(p) if p.base == base => p.sent.push((kind, new)),
                            _ => {
                                *slot = Some(PendingWrites {
                                    base,
                                    old: cur,
                                    sent: vec![(kind, new)],
                                })
                            }
                        }
                    }
                    return Err(ChangeError::Store(e));
                }
                Err(e) => return Err(ChangeError::Conflict(e)),
            }
        }
        Err(ChangeError::Conflict(CasError::Conflict {
            expected: self.flags.revision(),
            current: self.flags.revision(),
            by: "writers faster than this one".into(),
            now: None,
        }))
    }

    /// Reads the store now and applies what it holds, if newer.
    async fn refresh(&self) {
        match self.store.load().await {
            Ok(Some(v)) => {
                self.flags.apply(v.flags, v.revision);
            }
            Ok(None) => {}
            Err(e) => tracing::debug!("cannot refresh the flags from the store: {e}"),
        }
    }

    /// Applies an operator's change through the store, audits it. `expected` is the
    /// revision the operator saw (0 or `None`: the one in force); a conflict is
    /// returned, except for a rollback, which always wins and is retried on the
    /// newer flags.
    pub async fn change(
        &self,
        change: &Change,
        actor: &str,
        expected: Option<u64>,
    ) -> Result<Arc<Flags>, ChangeError<RefusedChange>> {
        let now = now_rfc3339();
        let action = match change.action {
            Some(Action::Pause) => "pause",
            Some(Action::Resume) => "resume",
            Some(Action::Rollback) => "rollback",
            Some(Action::Promote) => "promote",
            None => "set",
        };
        let persist = change.action == Some(Action::Rollback);
        let (old, new) = self
            .write(action, actor, expected.filter(|e| *e > 0), persist, |cur| {
                apply_change(cur, change, actor, &now)
            })
            .await?;
        if *old != *new {
            audit(actor, &old, &new, &new.status.reason);
            match change.action {
                Some(Action::Rollback) => {
                    metrics::counter!("pitboss_rollout_rollbacks_total", "reason" => "operator")
                        .increment(1);
                    self.counters.rollbacks.fetch_add(1, Ordering::Relaxed);
                }
                Some(Action::Promote) => {
                    metrics::counter!("pitboss_rollout_promotions_total", "by" => "operator")
                        .increment(1);
                    self.counters.promotions.fetch_add(1, Ordering::Relaxed);
                }
                _ => {}
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
        metrics::gauge!("pitboss_rollout_step").set(promotion::step_number(&f) as f64);
        metrics::gauge!("pitboss_rollout_steps").set(f.promotion.steps.len() as f64);
        metrics::gauge!("pitboss_rollout_step_seconds").set(self.at_step().as_secs_f64());
        metrics::gauge!("pitboss_rollout_store_up").set(if self.store.up() { 1.0 } else { 0.0 });
        if self.store.tier().is_some() {
            metrics::gauge!("pitboss_rollout_leader").set(if self.leader.load(Ordering::Relaxed) {
                1.0
            } else {
                0.0
            });
        }
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

/// An unconfirmed auto-rollback that can no longer land: said, and counted as a
/// rollback wanted but not made.
fn rollback_not_made() {
    tracing::error!("an unconfirmed auto-rollback was not applied: the rollout changed first");
    metrics::counter!("pitboss_rollout_rollback_failures_total").increment(1);
}

/// The metric label for a rollback reason (bounded).
pub fn reason_kind(reason: &str) -> &'static str {
    if reason.contains("shadow mismatch") {
        "shadow_mismatch"
    } else if reason.contains("legacy's") {
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
                None,
            )
            .await
            .unwrap();
        assert_eq!(resumed.status.state, flags::RolloutState::Active);
        assert_eq!(r.stats(Role::New).requests, 0, "old evidence is dropped");
    }

    /// A store whose writes land (in the flags in force, as etcd's watch would bring
    /// them) but, while `late` is set, are reported unconfirmed: etcd committing a
    /// write after its timeout, or after its quorum came back.
    struct LateStore {
        inner: Arc<FileStore>,
        late: AtomicBool,
        /// Whether a late write lands at all (false: the proposal was lost).
        lands: AtomicBool,
    }

    #[tonic::async_trait]
    impl FlagStore for LateStore {
        fn describe(&self) -> String {
            "late".into()
        }
        async fn load(&self) -> Result<Option<super::super::store::Versioned>, StoreError> {
            self.inner.load().await
        }
        fn watch(&self, _: Arc<LiveFlags>, _: CancellationToken) {}
        async fn compare_and_swap(
            &self,
            expected: u64,
            flags: &Flags,
            record: &AuditRecord,
        ) -> Result<u64, CasError> {
            if !self.late.load(Ordering::Relaxed) {
                return self.inner.compare_and_swap(expected, flags, record).await;
            }
            if self.lands.load(Ordering::Relaxed) {
                self.inner.compare_and_swap(expected, flags, record).await?;
            }
            Err(CasError::Store(StoreError::Unconfirmed {
                store: "late".into(),
                message: "no answer within 500ms".into(),
            }))
        }
        async fn history(&self, limit: usize) -> Result<Vec<AuditRecord>, StoreError> {
            self.inner.history(limit).await
        }
    }

    fn late_rollout(lands: bool) -> (Arc<Rollout>, Arc<LateStore>) {
        let live = flags(
            "mode = \"canary\"\npercent = 50.0\ncommands = [\"*\"]\n\
             [rollback]\nmin_requests = 10\nwindow = \"10s\"\n",
        );
        let store = Arc::new(LateStore {
            inner: FileStore::new(live.clone()),
            late: AtomicBool::new(true),
            lands: AtomicBool::new(lands),
        });
        let r = Rollout::with_store(live, store.clone(), true, "i1");
        for _ in 0..10 {
            r.record(
                Role::New,
                Duration::from_millis(5),
                Some(ErrorClass::WorkerCrashed),
            );
        }
        (r, store)
    }

    #[tokio::test(start_paused = true)]
    async fn a_rollback_the_store_applies_after_its_timeout_is_counted_once() {
        let (r, _store) = late_rollout(true);
        let reason = r
            .check()
            .await
            .expect("the late write shows in the flags in force");
        assert!(reason.contains("error rate"), "{reason}");
        assert_eq!(r.flags.get().status.state, flags::RolloutState::RolledBack);
        assert_eq!(r.counters.rollbacks.load(Ordering::Relaxed), 1);
        assert_eq!(r.check().await, None);
        assert_eq!(
            r.counters.rollbacks.load(Ordering::Relaxed),
            1,
            "counted once"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_lost_unconfirmed_rollback_is_sent_again_and_counted_once_made() {
        let (r, store) = late_rollout(false);
        assert_eq!(r.check().await, None, "sent, not confirmed, not in force");
        assert_eq!(r.flags.get().status.state, flags::RolloutState::Active);
        assert_eq!(r.counters.rollbacks.load(Ordering::Relaxed), 0);
        // The store answers again: the next check sends the rollback again.
        store.late.store(false, Ordering::Relaxed);
        assert!(r.check().await.is_some());
        assert_eq!(r.flags.get().status.state, flags::RolloutState::RolledBack);
        assert_eq!(r.counters.rollbacks.load(Ordering::Relaxed), 1);
        assert_eq!(r.check().await, None);
        assert_eq!(
            r.counters.rollbacks.load(Ordering::Relaxed),
            1,
            "counted once"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_promotion_the_store_applies_after_its_timeout_is_counted_once() {
        let live = flags(
            "mode = \"canary\"\npercent = 10.0\ncommands = [\"*\"]\n\
             [promotion]\nsteps = [10, 50, 100]\nmin_duration = \"1s\"\nmin_requests = 10\n",
        );
        let store = Arc::new(LateStore {
            inner: FileStore::new(live.clone()),
            late: AtomicBool::new(true),
            lands: AtomicBool::new(true),
        });
        let r = Rollout::with_store(live, store, true, "i1");
        tokio::time::advance(Duration::from_secs(2)).await;
        for _ in 0..20 {
            r.record(Role::New, Duration::from_millis(5), None);
            r.record(Role::Legacy, Duration::from_millis(5), None);
        }
        assert_eq!(r.check().await, None);
        assert_eq!(
            r.flags.get().percent.0.as_f64(),
            50.0,
            "the late write is in force"
        );
        assert_eq!(
            r.counters.promotions.load(Ordering::Relaxed),
            1,
            "seen in force, counted"
        );
        r.check().await;
        assert_eq!(
            r.counters.promotions.load(Ordering::Relaxed),
            1,
            "counted once"
        );
    }

    #[test]
    fn an_unconfirmed_rollback_lands_waits_or_is_superseded() {
        let base = Flags::parse("f", "mode = \"canary\"\npercent = 50.0\n").unwrap();
        let ours = rolled_back(&base, "error rate 100%", "2026-12-04T21:00:00Z");
        let p = PendingWrites {
            base: 3,
            old: Arc::new(base.clone()),
            sent: vec![(AutoWrite::Rollback, ours.clone())],
        };
        assert_eq!(p.fate(&base, 3), PendingFate::Waiting);
        assert_eq!(p.fate(&ours, 4), PendingFate::Landed(AutoWrite::Rollback));
        let theirs = rolled_back(&base, "operator", "2026-12-04T21:00:01Z");
        assert_eq!(p.fate(&theirs, 4), PendingFate::Superseded);
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
