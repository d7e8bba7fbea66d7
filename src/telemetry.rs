//! Metrics, readiness and the HTTP listener that serves them (`/metrics`, `/healthz`,
//! `/readyz`).
//!
//! Counters and histograms are recorded where things happen (the edge, the retry
//! policy, the supervisors). Gauges that describe state (workers, queue, in-flight,
//! sessions, memory) are sampled from the pools at scrape time, so a scrape always
//! shows the state as it is, not as it was at the last event. Every metric is
//! described here, so each has HELP text, and `docs/METRICS.md` lists them all.
//!
//! Telemetry sits below the edge: it reads the service it reports on through
//! [`Observed`], which the edge implements.

use std::collections::HashSet;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use arc_swap::ArcSwap;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::backend::{Backend, Role};
use crate::pool::{ExitReason, PoolObserver, SlotState};
use crate::resilience::retry::RetryObserver;
use crate::resilience::ErrorClass;
use crate::rollout::controller::Rollout;

/// Latency buckets from 100 µs to 60 s: a Python call spans that whole range.
pub const DURATION_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0,
];

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// How often the recorder's histogram samples are folded into their buckets.
///
/// The exporter keeps every histogram sample recorded since its last upkeep, and
/// `install_recorder` leaves running that upkeep to its caller. A scrape runs it too,
/// but a pitboss nobody scrapes would otherwise keep every call's duration, forever:
/// about 26 bytes per call, which is 2 MiB per 80,000 calls, measured. Each second
/// bounds that at one second of calls.
pub const UPKEEP_EVERY: Duration = Duration::from_secs(1);

/// The process-wide Prometheus recorder, installed on first use, with a thread that
/// runs its upkeep every [`UPKEEP_EVERY`] for as long as the process lives. `None`
/// when another recorder was installed first (a test's, for example): metrics then
/// go there.
pub fn prometheus() -> Option<PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Full("pitboss_request_duration_seconds".into()),
                    DURATION_BUCKETS,
                )
                .ok()?;
            match builder.install_recorder() {
                Ok(handle) => {
                    describe();
                    spawn_upkeep(handle.clone());
                    Some(handle)
                }
                Err(e) => {
                    tracing::warn!("cannot install the Prometheus recorder: {e}");
                    None
                }
            }
        })
        .clone()
}

/// A plain thread rather than a task: the recorder is process-wide and may be
/// installed outside a runtime (or in one that ends before the process does).
fn spawn_upkeep(handle: PrometheusHandle) {
    let spawned = std::thread::Builder::new()
        .name("pitboss-metrics-upkeep".into())
        .spawn(move || loop {
            std::thread::sleep(UPKEEP_EVERY);
            handle.run_upkeep();
        });
    if let Err(e) = spawned {
        tracing::warn!(
            "cannot start the metrics upkeep thread ({e}): histogram samples are folded only when /metrics is scraped"
        );
    }
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(
        "pitboss_requests_total",
        "Calls, each counted once however it ended (a client that went away: cancelled or deadline_exceeded), by backend, command (or `other`, or `CreateSession`), outcome (ok or error) and error class."
    );
    describe_histogram!(
        "pitboss_request_duration_seconds",
        Unit::Seconds,
        "Time from receiving a call to answering it, retries included."
    );
    describe_counter!(
        "pitboss_tls_handshake_failures_total",
        "TLS handshakes that failed or timed out on a TLS listener, by listener (tls.bridge, tls.admin, tls.metrics) and reason."
    );
    describe_gauge!(
        "pitboss_tls_certificate_expiry_timestamp_seconds",
        "When the certificate in force expires (Unix seconds), by file (tls.bridge, backends.new.tls, ...)."
    );
    describe_counter!(
        "pitboss_access_denied_total",
        "Calls refused PERMISSION_DENIED or UNAUTHENTICATED by who may call what (the mTLS allowlists, the admin token), by listener."
    );
    describe_counter!(
        "pitboss_admin_requests_total",
        "Calls of pitboss.v1.Admin, each counted once however it ended, by method (GetStatus, GetRollout, SetRollout, GetRolloutHistory, or other) and gRPC code (OK, UNAUTHENTICATED, ...; CANCELLED when the client went away)."
    );
    describe_counter!(
        "pitboss_retries_total",
        "Retries made, by backend and the error class of the failed attempt."
    );
    describe_counter!(
        "pitboss_retry_budget_exhausted_total",
        "Retries refused because the backend's retry budget was spent."
    );
    describe_gauge!(
        "pitboss_circuit_state",
        "Circuit breaker state: 0 closed, 1 half-open, 2 open."
    );
    describe_counter!(
        "pitboss_circuit_transitions_total",
        "Circuit breaker state changes."
    );
    describe_gauge!(
        "pitboss_workers",
        "Worker slots by state: starting, ready, draining, backing_off, stopped, ejected."
    );
    describe_counter!(
        "pitboss_worker_restarts_total",
        "Worker processes replaced, by reason: crash, heartbeat, timeout, protocol, outlier, recycle_requests, recycle_ttl, recycle_memory."
    );
    describe_gauge!(
        "pitboss_worker_rss_bytes",
        Unit::Bytes,
        "Resident memory of each worker process, by pool slot."
    );
    describe_gauge!("pitboss_queue_depth", "Calls waiting for a free worker.");
    describe_gauge!("pitboss_inflight", "Calls running on workers.");
    describe_gauge!("pitboss_sessions_active", "Open sessions.");
    describe_gauge!(
        "pitboss_rollout_percent",
        "The share of eligible keys sent to the new backend now (0 while paused or rolled back)."
    );
    describe_gauge!(
        "pitboss_rollout_state",
        "Rollout state: 0 active, 1 paused, 2 rolled back."
    );
    describe_counter!(
        "pitboss_rollout_rollbacks_total",
        "Rollbacks, by reason: error_rate, latency, relative_error_rate, shadow_mismatch (automatic) or operator."
    );
    describe_counter!(
        "pitboss_rollout_rollback_failures_total",
        "Automatic rollbacks wanted but not made: the flags file could not be written (a read-only volume, for example)."
    );
    describe_counter!(
        "pitboss_rollout_promotions_total",
        "Moves to the next [promotion] step, by whom: auto (a healthy, data-complete step) or operator (rollout promote)."
    );
    describe_gauge!(
        "pitboss_rollout_step",
        "The [promotion] step the rollout is on, 1-based; 0 when it is not on a step."
    );
    describe_gauge!(
        "pitboss_rollout_steps",
        "How many [promotion] steps the walk has."
    );
    describe_gauge!(
        "pitboss_rollout_step_seconds",
        "Seconds the rollout has been at its current step, on this instance's clock."
    );
    describe_gauge!(
        "pitboss_rollout_store_up",
        "1 when the rollout store (file or etcd) answered its last request; 0 while it is out of reach (the last flags stay in force)."
    );
    describe_gauge!(
        "pitboss_rollout_leader",
        "1 on the instance elected to analyse the tier (shared store only)."
    );
    describe_counter!(
        "pitboss_fallbacks_total",
        "Calls of the new backend that failed with a system error and were served by legacy."
    );
    describe_counter!(
        "pitboss_shadow_comparisons_total",
        "Shadow comparisons of legacy's and new's answers: match, mismatch or error."
    );
    describe_counter!(
        "pitboss_config_reloads_total",
        "Reloads of a hot-reloaded file, by file and result (ok or error)."
    );
    describe_gauge!(
        "pitboss_flags_file_valid",
        "1 when the flags file in force was read and applied; 0 when its last read (at start or on a change) was rejected and older flags (or, at start, the last good copy or everything on legacy) are in force."
    );
    describe_gauge!(
        "pitboss_build_info",
        "Always 1; the labels carry the version and this process's instance id."
    );
}

/// The restart reasons of `pitboss_worker_restarts_total` (every [`ExitReason`] label
/// but `shutdown`, which is not a restart).
pub const RESTART_REASONS: [&str; 8] = [
    "crash",
    "heartbeat",
    "timeout",
    "protocol",
    "outlier",
    "recycle_requests",
    "recycle_ttl",
    "recycle_memory",
];

/// The reasons of `pitboss_rollout_rollbacks_total`.
pub const ROLLBACK_REASONS: [&str; 5] = [
    "error_rate",
    "latency",
    "relative_error_rate",
    "shadow_mismatch",
    "operator",
];

/// Registers at 0 every counter whose label set is known at start, as Prometheus's
/// instrumentation guide asks: `rate()`, `increase()` and dashboards then show 0, not
/// "no data", and an alert on the first restart fires. `pools` are the backends that
/// run workers, `backends` every backend.
pub fn register_known_counters(pools: &[&str], backends: &[&str], flags_file: bool) {
    use crate::rollout::shadow::Outcome;
    for &backend in pools {
        for reason in RESTART_REASONS {
            metrics::counter!(
                "pitboss_worker_restarts_total",
                "backend" => backend.to_string(),
                "reason" => reason
            )
            .increment(0);
        }
    }
    for &backend in backends {
        metrics::counter!("pitboss_retry_budget_exhausted_total", "backend" => backend.to_string())
            .increment(0);
        metrics::counter!("pitboss_circuit_transitions_total", "backend" => backend.to_string(), "scope" => "backend")
            .increment(0);
        for row in crate::resilience::class::TABLE.iter() {
            if row.retry != crate::resilience::Retry::Never {
                metrics::counter!("pitboss_retries_total", "backend" => backend.to_string(), "error_class" => row.name)
                    .increment(0);
            }
        }
    }
    for reason in ROLLBACK_REASONS {
        metrics::counter!("pitboss_rollout_rollbacks_total", "reason" => reason).increment(0);
    }
    metrics::counter!("pitboss_rollout_rollback_failures_total").increment(0);
    for by in ["auto", "operator"] {
        metrics::counter!("pitboss_rollout_promotions_total", "by" => by).increment(0);
    }
    metrics::counter!("pitboss_fallbacks_total").increment(0);
    for outcome in [Outcome::Match, Outcome::Mismatch, Outcome::Error] {
        metrics::counter!("pitboss_shadow_comparisons_total", "result" => outcome.as_str())
            .increment(0);
    }
    if flags_file {
        for result in ["ok", "error"] {
            metrics::counter!("pitboss_config_reloads_total", "file" => "flags", "result" => result)
                .increment(0);
        }
    }
}

/// The `command` label: only commands a backend registered, else `other`, so a
/// client cannot grow the label set.
#[derive(Default)]
pub struct KnownCommands(ArcSwap<HashSet<String>>);

impl KnownCommands {
    pub fn label<'a>(&self, command: &'a str) -> std::borrow::Cow<'a, str> {
        if self.0.load().contains(command) {
            std::borrow::Cow::Borrowed(command)
        } else {
            std::borrow::Cow::Borrowed("other")
        }
    }

    pub fn set(&self, commands: HashSet<String>) {
        if **self.0.load() != commands {
            self.0.store(Arc::new(commands));
        }
    }
}

/// Records one answered call.
///
/// The metric handles of a command are built once and kept: a call then costs a
/// lookup by name and two atomic updates, not two label sets built, hashed and looked
/// up in the registry. The `command` label is bounded ([`KnownCommands`]), and so is
/// this cache.
pub fn record_call(role: Role, command: &str, failure: Option<ErrorClass>, elapsed: Duration) {
    static CACHE: OnceLock<dashmap::DashMap<String, Arc<CallMetrics>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    let metrics = match cache.get(command) {
        Some(m) => m.clone(),
        None => cache.entry(command.to_string()).or_default().clone(),
    };
    let per_role = &metrics.roles[role as usize];
    match failure {
        None => per_role
            .ok
            .get_or_init(|| call_counter(role, command, "ok", ""))
            .increment(1),
        Some(class) => per_role.errors[class as usize]
            .get_or_init(|| call_counter(role, command, "error", class.name()))
            .increment(1),
    }
    per_role
        .duration
        .get_or_init(|| {
            metrics::histogram!(
                "pitboss_request_duration_seconds",
                "backend" => role.as_str(),
                "command" => command.to_string()
            )
        })
        .record(elapsed.as_secs_f64());
}

/// One command's `pitboss_requests_total` and `pitboss_request_duration_seconds`
/// handles, per backend. Each is made on its first use, so a series appears when it
/// first counts, as it did without the cache.
#[derive(Default)]
struct CallMetrics {
    roles: [RoleCallMetrics; 2],
}

#[derive(Default)]
struct RoleCallMetrics {
    ok: OnceLock<metrics::Counter>,
    errors: [OnceLock<metrics::Counter>; crate::resilience::class::TABLE.len()],
    duration: OnceLock<metrics::Histogram>,
}

fn call_counter(
    role: Role,
    command: &str,
    outcome: &'static str,
    class: &'static str,
) -> metrics::Counter {
    metrics::counter!(
        "pitboss_requests_total",
        "backend" => role.as_str(),
        "command" => command.to_string(),
        "outcome" => outcome,
        "error_class" => class
    )
}

/// Counts restarts; the pool's name is its backend role.
pub struct RestartCounter;

impl PoolObserver for RestartCounter {
    fn worker_exited(&self, pool: &str, reason: &ExitReason) {
        let label = reason.label();
        if label != "shutdown" {
            metrics::counter!(
                "pitboss_worker_restarts_total",
                "backend" => pool.to_string(),
                "reason" => label
            )
            .increment(1);
        }
    }
}

/// Counts retries and budget refusals for one backend.
pub struct RetryCounter(pub &'static str);

impl RetryObserver for RetryCounter {
    fn retried(&self, class: ErrorClass) {
        metrics::counter!("pitboss_retries_total", "backend" => self.0, "error_class" => class.name())
            .increment(1);
    }

    fn budget_exhausted(&self) {
        metrics::counter!("pitboss_retry_budget_exhausted_total", "backend" => self.0).increment(1);
    }
}

const STATES: [&str; 6] = [
    "starting",
    "ready",
    "draining",
    "backing_off",
    "stopped",
    "ejected",
];

/// What the HTTP listener reports on: the service's backends, its rollout and whether
/// it is shutting down. The edge implements it; telemetry, a layer below, knows the
/// edge only through this.
pub trait Observed: Send + Sync + 'static {
    /// The `legacy` backend, which serves everything `new` does not.
    fn legacy(&self) -> &Backend;
    /// The `new` backend; `None` when none is configured.
    fn new_backend(&self) -> Option<&Backend>;
    /// The split between them, with its flags.
    fn rollout(&self) -> &Rollout;
    /// Shutdown has started: new calls are refused.
    fn draining(&self) -> bool;
    /// Open sessions pinned to the `new` backend. A pool counts its own sessions; a
    /// grpc upstream cannot, so its gauge comes from here.
    fn new_sessions(&self) -> usize;
}

/// Every backend of `s`, legacy first.
fn backends_of<S: Observed + ?Sized>(s: &S) -> impl Iterator<Item = &Backend> {
    std::iter::once(s.legacy()).chain(s.new_backend())
}

/// Samples the state gauges from the backends.
pub fn publish_gauges<S: Observed + ?Sized>(s: &S) {
    let rollout = s.rollout();
    if rollout.flags.path().is_some() {
        let valid = rollout.flags.last_error().is_none();
        metrics::gauge!("pitboss_flags_file_valid").set(if valid { 1.0 } else { 0.0 });
    }
    let new_pins = s.new_sessions();
    for b in backends_of(s) {
        let role = b.role.as_str();
        metrics::gauge!("pitboss_circuit_state", "backend" => role, "scope" => "backend")
            .set(b.breaker.state() as u8 as f64);
        match b.pool() {
            Some(pool) => {
                let st = pool.status();
                let mut counts = [0usize; 6];
                let mut inflight = 0u64;
                for w in &st.workers {
                    let state = if w.ejected {
                        "ejected"
                    } else {
                        w.state.as_str()
                    };
                    if let Some(i) = STATES.iter().position(|s| *s == state) {
                        counts[i] += 1;
                    }
                    inflight += u64::from(w.in_flight);
                    let rss = w
                        .rss_bytes
                        .filter(|_| w.state != SlotState::Stopped)
                        .unwrap_or(0);
                    metrics::gauge!("pitboss_worker_rss_bytes", "backend" => role, "slot" => w.slot.to_string())
                        .set(rss as f64);
                }
                for (state, n) in STATES.iter().zip(counts) {
                    metrics::gauge!("pitboss_workers", "backend" => role, "state" => *state)
                        .set(n as f64);
                }
                metrics::gauge!("pitboss_queue_depth", "backend" => role)
                    .set(st.queue_depth as f64);
                metrics::gauge!("pitboss_inflight", "backend" => role).set(inflight as f64);
                metrics::gauge!("pitboss_sessions_active", "backend" => role)
                    .set(st.sessions as f64);
            }
            None => {
                let sessions = if b.role == Role::New { new_pins } else { 0 };
                metrics::gauge!("pitboss_sessions_active", "backend" => role).set(sessions as f64);
            }
        }
    }
    rollout.publish();
}

/// Why pitboss should not get traffic now; `Ok` when ready. Pure.
#[derive(Debug, Clone, PartialEq)]
pub struct BackendHealth {
    pub role: Role,
    pub ready: bool,
    /// The breaker refuses calls now: open and not yet due to probe, or half-open
    /// with every probe slot taken ([`crate::resilience::Breaker::refusing`]).
    pub breaker_open: bool,
    /// The rollout sends it traffic now (new: a nonzero share or shadow mode).
    pub takes_traffic: bool,
}

/// Why pitboss is not ready: the reason `/readyz` and gRPC health give.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NotReady {
    #[error("draining: shutting down")]
    Draining,
    #[error("backend {}'s circuit breaker is open (or half-open with every probe slot taken): it refuses calls", .0.as_str())]
    BreakerRefusing(Role),
    #[error("backend {} has no ready worker", .0.as_str())]
    NoReadyWorker(Role),
}

/// Not ready while draining; when legacy has no ready worker or its breaker is open
/// (it serves everything new does not); when new takes traffic, has no ready worker
/// or an open breaker, and failed calls may not fall back to legacy.
pub fn readiness(
    draining: bool,
    backends: &[BackendHealth],
    fallback: bool,
) -> Result<(), NotReady> {
    if draining {
        return Err(NotReady::Draining);
    }
    for b in backends {
        let matters = b.role == Role::Legacy || (b.takes_traffic && !fallback);
        if !matters {
            continue;
        }
        if b.breaker_open {
            return Err(NotReady::BreakerRefusing(b.role));
        }
        if !b.ready {
            return Err(NotReady::NoReadyWorker(b.role));
        }
    }
    Ok(())
}

fn health_of<S: Observed + ?Sized>(s: &S, b: &Backend) -> BackendHealth {
    let f = s.rollout().flags.get();
    let takes_traffic = b.role == Role::Legacy || f.new_takes_traffic();
    BackendHealth {
        role: b.role,
        ready: b.ready(),
        breaker_open: b.breaker.refusing(),
        takes_traffic,
    }
}

/// The readiness of `s` now ([`readiness`] over its backends' health).
pub fn readiness_of<S: Observed + ?Sized>(s: &S) -> Result<(), NotReady> {
    let backends: Vec<BackendHealth> = backends_of(s).map(|b| health_of(s, b)).collect();
    readiness(
        s.draining(),
        &backends,
        s.rollout().flags.get().fallback_to_legacy,
    )
}

/// The HTTP listener's routes, reporting on `edge`.
pub fn router(edge: Arc<dyn Observed>) -> axum::Router {
    use axum::http::{header, StatusCode};
    use axum::response::IntoResponse;
    use axum::routing::get;
    let metrics_edge = edge.clone();
    let ready_edge = edge;
    axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let edge = metrics_edge.clone();
                async move {
                    publish_gauges(&*edge);
                    match prometheus() {
                        Some(h) => {
                            h.run_upkeep();
                            (
                                StatusCode::OK,
                                [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                                h.render(),
                            )
                                .into_response()
                        }
                        None => (
                            StatusCode::SERVICE_UNAVAILABLE,
                            "metrics are recorded elsewhere in this process\n",
                        )
                            .into_response(),
                    }
                }
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || {
                let edge = ready_edge.clone();
                async move {
                    match readiness_of(&*edge) {
                        Ok(()) => match edge.rollout().flags.notes() {
                            // Serving is safe (the previous or the safe flags are in
                            // force), but the operator's file is not what runs, or
                            // the store is out of reach (fail static).
                            Some(e) => (StatusCode::OK, format!("ready; note: {e}\n")),
                            None => (StatusCode::OK, "ready\n".to_string()),
                        },
                        Err(why) => (
                            StatusCode::SERVICE_UNAVAILABLE,
                            format!("not ready: {why}\n"),
                        ),
                    }
                }
            }),
        )
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            Duration::from_secs(10),
        ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(role: Role, ready: bool, breaker_open: bool, takes_traffic: bool) -> BackendHealth {
        BackendHealth {
            role,
            ready,
            breaker_open,
            takes_traffic,
        }
    }

    #[test]
    fn readiness_follows_legacy_draining_and_new_when_it_matters() {
        let legacy_ok = b(Role::Legacy, true, false, true);
        assert!(readiness(false, std::slice::from_ref(&legacy_ok), true).is_ok());
        let why = readiness(true, std::slice::from_ref(&legacy_ok), true).unwrap_err();
        assert_eq!(why, NotReady::Draining);
        assert!(why.to_string().contains("draining"));
        let why = readiness(false, &[b(Role::Legacy, false, false, true)], true).unwrap_err();
        assert_eq!(why, NotReady::NoReadyWorker(Role::Legacy));
        assert!(why.to_string().contains("no ready worker"));
        let why = readiness(false, &[b(Role::Legacy, true, true, true)], true).unwrap_err();
        assert_eq!(why, NotReady::BreakerRefusing(Role::Legacy));
        assert!(why.to_string().contains("breaker"));
        // New without traffic, or with fallback, does not make pitboss unready.
        let new_broken = b(Role::New, false, true, true);
        assert!(readiness(false, &[legacy_ok.clone(), new_broken.clone()], true).is_ok());
        let idle_new = b(Role::New, false, true, false);
        assert!(readiness(false, &[legacy_ok.clone(), idle_new], false).is_ok());
        // New takes traffic, no fallback: its health is pitboss's.
        let why = readiness(false, &[legacy_ok, new_broken], false).unwrap_err();
        assert_eq!(why, NotReady::BreakerRefusing(Role::New));
        assert!(why.to_string().contains("new"));
    }

    /// Issue 13, item 1: a half-open breaker whose probe slot is taken refuses every
    /// call, so readiness must not say ready; once the probe is dropped, it is again.
    #[test]
    fn a_half_open_breaker_without_a_free_probe_slot_is_not_ready() {
        use crate::resilience::breaker::{Breaker, BreakerSettings};
        failsafe::clock::freeze(|clock| {
            let settings = BreakerSettings {
                consecutive_failures: 1,
                open_for: Duration::from_millis(500),
                ..Default::default()
            };
            let breaker = Breaker::new("legacy", settings).unwrap();
            breaker
                .try_acquire()
                .unwrap()
                .record(Some(ErrorClass::WorkerCrashed));
            let legacy = |breaker: &Breaker| b(Role::Legacy, true, breaker.refusing(), true);
            assert!(readiness(false, &[legacy(&breaker)], true).is_err(), "open");
            clock.advance(Duration::from_millis(501));
            assert!(
                readiness(false, &[legacy(&breaker)], true).is_ok(),
                "due to probe"
            );
            let probe = breaker.try_acquire().unwrap();
            let why = readiness(false, &[legacy(&breaker)], true)
                .unwrap_err()
                .to_string();
            assert!(
                why.contains("half-open with every probe slot taken"),
                "{why}"
            );
            drop(probe);
            assert!(readiness(false, &[legacy(&breaker)], true).is_ok());
        });
    }

    /// What the router reports on, without an edge: a grpc legacy backend (always
    /// ready; it connects lazily) and in-memory flags.
    struct Fake {
        legacy: Backend,
        rollout: Arc<Rollout>,
        draining: std::sync::atomic::AtomicBool,
    }

    impl Observed for Fake {
        fn legacy(&self) -> &Backend {
            &self.legacy
        }
        fn new_backend(&self) -> Option<&Backend> {
            None
        }
        fn rollout(&self) -> &Rollout {
            &self.rollout
        }
        fn draining(&self) -> bool {
            self.draining.load(std::sync::atomic::Ordering::Acquire)
        }
        fn new_sessions(&self) -> usize {
            0
        }
    }

    /// Issue 14, item 4: telemetry reads the service only through [`Observed`], so
    /// `/readyz` works over anything that implements it.
    #[tokio::test]
    async fn readyz_reports_on_any_observed_service() {
        use crate::backend::Observers;
        use crate::config::{BackendConfig, BackendKind, Config};
        use crate::rollout::{Flags, LiveFlags};
        use axum::http::{Request, StatusCode};
        use tower::ServiceExt;

        let cfg = BackendConfig {
            role: "legacy",
            kind: BackendKind::Grpc,
            address: "http://127.0.0.1:1".to_string(),
            tls: Default::default(),
            effective: Config::load_default().unwrap(),
        };
        let observers = Observers {
            pool: Arc::new(RestartCounter),
            retries: Arc::new(RetryCounter("legacy")),
        };
        let fake = Arc::new(Fake {
            legacy: Backend::start(&cfg, observers).await.unwrap(),
            rollout: Rollout::new(LiveFlags::in_memory(Flags::defaults()), false),
            draining: Default::default(),
        });
        publish_gauges(&*fake);
        let get = |fake: Arc<Fake>, path: &'static str| async move {
            let request = Request::get(path).body(axum::body::Body::empty()).unwrap();
            let response = router(fake).oneshot(request).await.unwrap();
            let status = response.status();
            let body = axum::body::to_bytes(response.into_body(), 1 << 16)
                .await
                .unwrap();
            (status, String::from_utf8(body.to_vec()).unwrap())
        };
        assert_eq!(readiness_of(&*fake), Ok(()));
        assert_eq!(
            get(fake.clone(), "/readyz").await,
            (StatusCode::OK, "ready\n".to_string())
        );
        assert_eq!(
            get(fake.clone(), "/healthz").await,
            (StatusCode::OK, "ok\n".to_string())
        );
        fake.draining
            .store(true, std::sync::atomic::Ordering::Release);
        assert_eq!(readiness_of(&*fake), Err(NotReady::Draining));
        assert_eq!(
            get(fake, "/readyz").await,
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "not ready: draining: shutting down\n".to_string()
            )
        );
    }

    #[test]
    fn docs_metrics_md_lists_every_metric() {
        let source = include_str!("telemetry.rs");
        let doc = include_str!("../docs/METRICS.md");
        let mut names = vec![];
        for part in source.split("describe_").skip(1) {
            if let Some(name) = part.split('"').nth(1).filter(|n| n.starts_with("pitboss_")) {
                names.push(name);
            }
        }
        assert!(names.len() >= 19, "{names:?}");
        for n in names {
            assert!(doc.contains(&format!("`{n}`")), "docs/METRICS.md lacks {n}");
        }
    }

    #[test]
    fn unknown_commands_are_labelled_other() {
        let k = KnownCommands::default();
        k.set(["echo".to_string()].into_iter().collect());
        assert_eq!(k.label("echo"), "echo");
        assert_eq!(k.label("session-1234"), "other");
    }
}
