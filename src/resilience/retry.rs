//! Retry, as a tower [`Policy`] that consults the error classification.
//!
//! - Exponential backoff with jitter from tower's [`ExponentialBackoffMaker`].
//! - A [`TpsBudget`] shared by all requests: retries stay within a share of the
//!   requests plus a small floor, so a failing backend is not hammered with multiplied
//!   load.
//! - Never past the client's deadline: a retry whose backoff would end after the
//!   deadline is not made.
//! - Ambiguous failures (the request may have reached Python) are retried only for
//!   idempotent requests; failures that provably never reached a worker always may be.
//! - A retry prefers another worker than the one that failed (`avoid_worker`); session
//!   requests stay on their worker, as the affinity mode demands.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tower::retry::backoff::{Backoff, ExponentialBackoff, ExponentialBackoffMaker, MakeBackoff};
use tower::retry::budget::{Budget, TpsBudget};
use tower::retry::Policy;
use tower::util::rng::HasherRng;

use super::class::ErrorClass;
use super::error::CallError;
use super::InvalidSetting;
use crate::config::RetrySection;
use crate::pool::{ExhaustedReason, PoolError, PoolRequest, PoolResponse};

/// Validated retry settings.
#[derive(Debug, Clone, PartialEq)]
pub struct RetrySettings {
    /// Attempts in all, the first included (1 = no retry).
    pub max_attempts: u32,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// Up to this fraction of the base delay is added at random (0 = none).
    pub jitter: f64,
    /// Retries allowed as a share of requests (0.2 = 20%) ...
    pub budget_percent: f32,
    /// ... plus this many per second, so a quiet service can still retry.
    pub budget_min_per_sec: u32,
    /// The window over which the budget is counted (1 to 60 s).
    pub budget_window: Duration,
    /// Each attempt may take at most this long (`None`: the whole remaining deadline).
    /// An attempt cut short by it is `worker_timeout`, which an idempotent call retries.
    pub per_try_timeout: Option<Duration>,
}

impl Default for RetrySettings {
    fn default() -> Self {
        RetrySettings {
            max_attempts: 3,
            backoff_base: Duration::from_millis(25),
            backoff_max: Duration::from_millis(250),
            jitter: 1.0,
            budget_percent: 0.2,
            budget_min_per_sec: 10,
            budget_window: Duration::from_secs(10),
            per_try_timeout: None,
        }
    }
}

impl RetrySettings {
    pub fn validate(&self) -> Result<(), InvalidSetting> {
        let bad = InvalidSetting::new;
        if self.max_attempts == 0 {
            return Err(bad("max_attempts", "must be at least 1"));
        }
        if self.backoff_max < self.backoff_base || self.backoff_max.is_zero() {
            return Err(bad(
                "backoff_max",
                "must be positive and at least backoff_base",
            ));
        }
        if !(0.0..=1.0).contains(&self.jitter) {
            return Err(bad("jitter", "must be between 0 and 1"));
        }
        if !(0.0..=10.0).contains(&self.budget_percent) {
            return Err(bad("budget_percent", "must be between 0 and 10"));
        }
        if self.budget_window < Duration::from_secs(1)
            || self.budget_window > Duration::from_secs(60)
        {
            return Err(bad("budget_window", "must be between 1s and 60s"));
        }
        Ok(())
    }
}

// === conversion from the config file's `[retry]` section ===

impl RetrySettings {
    pub fn from_section(r: &RetrySection) -> RetrySettings {
        RetrySettings {
            max_attempts: r.max_attempts.0.min(u32::MAX as u64) as u32,
            backoff_base: r.backoff_base.0,
            backoff_max: r.backoff_max.0,
            jitter: r.jitter.0,
            budget_percent: r.budget_percent as f32,
            budget_min_per_sec: r.budget_min_per_sec,
            budget_window: r.budget_window.0,
            per_try_timeout: r.per_try_timeout.nonzero(),
        }
    }
}

/// One request as the retry layer sees it: the pool request plus what retry needs.
#[derive(Debug, Clone)]
pub struct Attempt {
    pub request: PoolRequest,
    /// The client says running it twice is harmless.
    pub idempotent: bool,
    /// 1 for the first try.
    pub number: u32,
    /// The client's deadline: no retry ends after it.
    pub deadline: Instant,
}

impl Attempt {
    /// When this try must end: the per-try timeout from now, never past the client's
    /// deadline.
    pub fn try_deadline(&self, per_try_timeout: Option<Duration>) -> Instant {
        per_try_timeout
            .map(|t| (Instant::now() + t).min(self.deadline))
            .unwrap_or(self.deadline)
    }
}

/// A failed try's class, knowing the try's own deadline: a deadline hit before the
/// client's is our per-try limit, so the backend was slow (`worker_timeout`).
pub fn class_of_try(class: ErrorClass, try_deadline: Instant, deadline: Instant) -> ErrorClass {
    if class == ErrorClass::DeadlineExceeded && try_deadline < deadline {
        ErrorClass::WorkerTimeout
    } else {
        class
    }
}

/// A success, with the attempts it took.
#[derive(Debug, Clone)]
pub struct Served {
    pub response: PoolResponse,
    pub attempts: u32,
    /// The worker as a `grpc` backend's upstream named it (its `worker_id`).
    pub remote_worker: Option<String>,
    /// What a `grpc_proxy`'s service sent around the answer of a transparent call
    /// (headers, trailers), for the client.
    pub wire: Option<std::sync::Arc<crate::wire::WireReply>>,
}

impl Served {
    /// The worker that served it, as the client is told.
    pub fn worker_label(&self) -> String {
        self.remote_worker
            .clone()
            .unwrap_or_else(|| self.response.worker.to_string())
    }
}

/// A failure, classified once, with the attempts made.
#[derive(Debug, Clone)]
pub struct Failed {
    pub error: CallError,
    pub class: ErrorClass,
    pub attempts: u32,
    /// A retry was wanted but the budget said no.
    pub budget_exhausted: bool,
}

impl std::fmt::Display for Failed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (after {} attempts)", self.error, self.attempts)
    }
}

impl std::error::Error for Failed {}

/// Why a failed attempt is or is not retried; a pure decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Retry,
    NotRetryable,
    OutOfAttempts,
}

/// The retry decision, before budget and deadline.
pub fn decide(
    err: &CallError,
    class: ErrorClass,
    idempotent: bool,
    attempt: u32,
    max_attempts: u32,
) -> Decision {
    // Refused before the write: it provably never ran, so even non-idempotent
    // requests may go again.
    // The client may retry an open circuit later; retrying it now, from inside, would
    // only spin against the breaker.
    if class == ErrorClass::CircuitOpen {
        return Decision::NotRetryable;
    }
    // A queue timeout has spent the call's whole wait for a worker: `queue_timeout` is
    // the longest a call waits, not a wait per attempt, and a pool that stayed full
    // that long is not a transient failure of one attempt. Not retried on this backend
    // (a fallback to legacy may still serve it).
    if matches!(
        err.pool(),
        Some(PoolError::PoolExhausted {
            reason: ExhaustedReason::QueueTimeout
        })
    ) {
        return Decision::NotRetryable;
    }
    let never_ran = matches!(
        err.pool(),
        Some(PoolError::WorkerCrashed { sent: false, .. })
    );
    if !(never_ran || class.retryable(idempotent)) {
        return Decision::NotRetryable;
    }
    if attempt >= max_attempts {
        return Decision::OutOfAttempts;
    }
    Decision::Retry
}

/// Notified of retries, for metrics.
pub trait RetryObserver: Send + Sync + 'static {
    fn retried(&self, _class: ErrorClass) {}
    fn budget_exhausted(&self) {}
}

struct Quiet;
impl RetryObserver for Quiet {}

/// Why a [`RetryPolicy`] cannot be built from its settings.
#[derive(Debug, thiserror::Error)]
pub enum InvalidRetrySettings {
    /// A setting out of its range, e.g. "max_attempts must be at least 1".
    #[error(transparent)]
    Setting(#[from] InvalidSetting),
    /// tower refused the backoff ("invalid backoff: maximum must be non-zero").
    #[error(transparent)]
    Backoff(#[from] tower::retry::backoff::InvalidBackoff),
}

/// The tower retry policy. Cloned per request, so the backoff progresses per request,
/// while the budget is shared.
#[derive(Clone)]
pub struct RetryPolicy {
    backoff: ExponentialBackoff<HasherRng>,
    budget: Arc<TpsBudget>,
    max_attempts: u32,
    observer: Arc<dyn RetryObserver>,
}

impl RetryPolicy {
    pub fn new(settings: &RetrySettings) -> Result<RetryPolicy, InvalidRetrySettings> {
        settings.validate()?;
        let mut maker = ExponentialBackoffMaker::new(
            settings.backoff_base,
            settings.backoff_max,
            settings.jitter,
            HasherRng::default(),
        )?;
        Ok(RetryPolicy {
            backoff: maker.make_backoff(),
            budget: Arc::new(TpsBudget::new(
                settings.budget_window,
                settings.budget_min_per_sec,
                settings.budget_percent,
            )),
            max_attempts: settings.max_attempts,
            observer: Arc::new(Quiet),
        })
    }

    pub fn with_observer(mut self, observer: Arc<dyn RetryObserver>) -> Self {
        self.observer = observer;
        self
    }
}

impl Policy<Attempt, Served, Failed> for RetryPolicy {
    type Future = tokio::time::Sleep;

    fn retry(
        &mut self,
        req: &mut Attempt,
        result: &mut Result<Served, Failed>,
    ) -> Option<Self::Future> {
        if req.number == 1 {
            // Every request earns retry credit, so retries are a share of all requests.
            self.budget.deposit();
        }
        let failed = match result {
            Ok(_) => return None,
            Err(f) => f,
        };
        if decide(
            &failed.error,
            failed.class,
            req.idempotent,
            req.number,
            self.max_attempts,
        ) != Decision::Retry
        {
            return None;
        }
        let sleep = self.backoff.next_backoff();
        if sleep.deadline() >= req.deadline {
            return None; // never retry past the client's deadline
        }
        if !self.budget.withdraw() {
            failed.budget_exhausted = true;
            self.observer.budget_exhausted();
            return None;
        }
        self.observer.retried(failed.class);
        req.number += 1;
        req.request.avoid_worker = failed.error.worker();
        if let Some(c) = &mut req.request.context {
            // Counted over the whole call: after a fallback the first try on legacy
            // already follows new's.
            c.attempt += 1;
        }
        Some(sleep)
    }

    fn clone_request(&mut self, req: &Attempt) -> Option<Attempt> {
        Some(req.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Dur;
    use crate::worker::WorkerId;

    /// The config checks `[retry]` itself (it may not depend on this layer); it must
    /// accept and refuse exactly what `validate` does, with the same words.
    #[test]
    fn the_config_checks_retry_sections_as_validate_does() {
        let base = crate::config::Config::load_default()
            .expect("the default config")
            .retry;
        let secs = |s: f64| Dur(Duration::from_secs_f64(s));
        let mut cases = vec![base.clone()];
        for v in [0.0, 0.05, 0.1, 30.0] {
            cases.push(RetrySection {
                backoff_base: secs(v),
                ..base.clone()
            });
            cases.push(RetrySection {
                backoff_max: secs(v),
                ..base.clone()
            });
        }
        for v in [-1.0, 0.0, 9.99, 10.0, 10.000_000_1, 10.5, f64::NAN] {
            cases.push(RetrySection {
                budget_percent: v,
                ..base.clone()
            });
        }
        for v in [0.0, 0.999, 1.0, 60.0, 60.001, 90.0] {
            cases.push(RetrySection {
                budget_window: secs(v),
                ..base.clone()
            });
        }
        for s in cases {
            let settings = RetrySettings::from_section(&s).validate();
            let expected = settings.err().map(|e| (e.field, e.message));
            assert_eq!(s.check().err(), expected, "{s:?}");
        }
    }

    fn crashed(sent: bool) -> CallError {
        PoolError::WorkerCrashed {
            worker: WorkerId(7),
            detail: "killed".into(),
            sent,
        }
        .into()
    }

    #[test]
    fn decisions_follow_the_classification() {
        use ErrorClass as C;
        assert_eq!(
            decide(&crashed(true), C::WorkerCrashed, true, 1, 3),
            Decision::Retry
        );
        assert_eq!(
            decide(&crashed(true), C::WorkerCrashed, false, 1, 3),
            Decision::NotRetryable
        );
        assert_eq!(
            decide(&crashed(false), C::WorkerCrashed, false, 1, 3),
            Decision::Retry,
            "never ran"
        );
        assert_eq!(
            decide(&crashed(true), C::WorkerCrashed, true, 3, 3),
            Decision::OutOfAttempts
        );
        // Issue 13, item 9: a queue timeout is not retried; a full queue (refused at
        // once) still is, even when not idempotent.
        let exhausted = |reason| CallError::from(PoolError::PoolExhausted { reason });
        assert_eq!(
            decide(
                &exhausted(ExhaustedReason::QueueTimeout),
                C::PoolExhausted,
                true,
                1,
                3
            ),
            Decision::NotRetryable
        );
        assert_eq!(
            decide(
                &exhausted(ExhaustedReason::QueueFull),
                C::PoolExhausted,
                false,
                1,
                3
            ),
            Decision::Retry
        );
        let py = CallError::from(PoolError::InvalidRequest("x".into()));
        assert_eq!(
            decide(&py, C::InvalidRequest, true, 1, 3),
            Decision::NotRetryable
        );
    }

    fn settings(jitter: f64) -> RetrySettings {
        RetrySettings {
            max_attempts: 10,
            backoff_base: Duration::from_millis(100),
            backoff_max: Duration::from_millis(800),
            jitter,
            budget_percent: 0.2,
            budget_min_per_sec: 1,
            budget_window: Duration::from_secs(10),
            per_try_timeout: None,
        }
    }

    fn attempt(deadline: Duration) -> Attempt {
        Attempt {
            request: PoolRequest::new("echo", "x"),
            idempotent: true,
            number: 1,
            deadline: Instant::now() + deadline,
        }
    }

    fn failure() -> Result<Served, Failed> {
        Err(Failed {
            error: crashed(true),
            class: ErrorClass::WorkerCrashed,
            attempts: 1,
            budget_exhausted: false,
        })
    }

    #[tokio::test(start_paused = true)]
    async fn backoff_doubles_within_bounds_with_zero_jitter_and_moves_off_the_failed_worker() {
        let mut p = RetryPolicy::new(&settings(0.0)).unwrap();
        let mut req = attempt(Duration::from_secs(60));
        let mut delays = vec![];
        for _ in 0..5 {
            let start = Instant::now();
            let sleep = p.retry(&mut req, &mut failure()).expect("retry");
            delays.push((sleep.deadline() - start).as_millis());
        }
        assert_eq!(delays, [100, 200, 400, 800, 800]);
        assert_eq!(req.number, 6);
        assert_eq!(req.request.avoid_worker, Some(WorkerId(7)));
    }

    #[tokio::test(start_paused = true)]
    async fn jittered_backoff_stays_within_base_and_cap() {
        let mut p = RetryPolicy::new(&settings(1.0)).unwrap();
        let mut req = attempt(Duration::from_secs(60));
        for i in 0..6u32 {
            let start = Instant::now();
            let d = p.retry(&mut req, &mut failure()).unwrap().deadline() - start;
            let base = Duration::from_millis(100 * 2u64.pow(i)).min(Duration::from_millis(800));
            assert!(
                d >= base && d <= Duration::from_millis(800).max(base),
                "try {i}: {d:?}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn no_retry_ends_past_the_deadline() {
        let mut p = RetryPolicy::new(&settings(0.0)).unwrap();
        let mut req = attempt(Duration::from_millis(250));
        let first = p
            .retry(&mut req, &mut failure())
            .expect("a 100 ms backoff fits");
        first.await; // (paused time: this advances the clock by 100 ms)
        assert!(
            p.retry(&mut req, &mut failure()).is_none(),
            "100 + 200 ms would not"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_budget_caps_retries_under_total_failure() {
        // 100 requests, all failing: at most 20% of them plus the floor are retried.
        let s = settings(0.0);
        let p = RetryPolicy::new(&s).unwrap();
        let mut retried = 0;
        let mut exhausted = 0;
        for _ in 0..100 {
            let mut policy = p.clone();
            let mut req = attempt(Duration::from_secs(60));
            let mut result = failure();
            loop {
                match policy.retry(&mut req, &mut result) {
                    Some(_) => retried += 1,
                    None => break,
                }
                result = failure();
            }
            if matches!(&result, Err(f) if f.budget_exhausted) {
                exhausted += 1;
            }
        }
        // TpsBudget: 20% of deposits plus min_per_sec x window of reserve.
        assert!(retried <= 20 + 10, "{retried} retries");
        assert!(retried >= 20, "{retried} retries");
        assert!(exhausted > 50, "{exhausted} requests stopped by the budget");
    }
}
