//! Per-backend rolling statistics, and the pure auto-rollback decision.
//!
//! Each backend keeps the last `window` of calls in ten slices (so old calls leave the
//! window a tenth at a time, not all at once), with a fixed log-scale latency
//! histogram per slice: merging slices is adding arrays, and a p99 costs a scan of a
//! few hundred counters, not a sort of every sample.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use crate::resilience::ErrorClass;

/// Whether a failure counts as the backend's error for rollback purposes.
///
/// The backend's own failures count, including `python_exception`: a new adapter
/// that raises where legacy did not is exactly the regression a rollout must catch.
/// Failures that are the caller's doing, or nobody's (a client deadline, a cancel,
/// shutdown), do not.
pub fn counts_as_error(class: ErrorClass) -> bool {
    use ErrorClass as C;
    match class {
        C::WorkerCrashed
        | C::WorkerTimeout
        | C::PoolExhausted
        | C::CircuitOpen
        | C::ProtocolError
        | C::PythonException
        | C::Internal => true,
        C::DeadlineExceeded
        | C::InvalidRequest
        | C::UnknownCommand
        | C::SessionLost
        | C::SessionNotFound
        | C::Cancelled
        | C::ShuttingDown => false,
    }
}

const SLICES: usize = 10;
/// Bucket bounds grow by 10% from 1 µs; 200 buckets reach past 100 s.
const BUCKETS: usize = 200;
const GROWTH: f64 = 1.1;

fn bucket_of(latency: Duration) -> usize {
    let us = latency.as_secs_f64() * 1e6;
    if us <= 1.0 {
        return 0;
    }
    ((us.ln() / GROWTH.ln()).ceil() as usize).min(BUCKETS - 1)
}

/// The upper bound of a bucket: a quantile never under-reports.
fn bucket_bound(i: usize) -> Duration {
    Duration::from_secs_f64(GROWTH.powi(i as i32) / 1e6)
}

#[derive(Clone)]
struct Slice {
    /// The absolute slice number since the origin; stale slices are reset on use.
    index: u64,
    requests: u64,
    errors: u64,
    by_class: BTreeMap<&'static str, u64>,
    latency: [u32; BUCKETS],
}

impl Slice {
    fn empty(index: u64) -> Slice {
        Slice {
            index,
            requests: 0,
            errors: 0,
            by_class: BTreeMap::new(),
            latency: [0; BUCKETS],
        }
    }
}

struct Inner {
    window: Duration,
    origin: Instant,
    slices: Vec<Slice>,
}

impl Inner {
    fn slice_len(&self) -> Duration {
        (self.window / SLICES as u32).max(Duration::from_millis(1))
    }

    fn index_at(&self, now: Instant) -> u64 {
        (now.saturating_duration_since(self.origin).as_nanos() / self.slice_len().as_nanos()) as u64
    }
}

/// A backend's calls over the last `window`.
pub struct RollingStats {
    inner: Mutex<Inner>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct WindowStats {
    /// Every finished call: successes and all failures.
    pub requests: u64,
    /// Failures that [`counts_as_error`].
    pub errors: u64,
    /// Every failure, by class name.
    pub by_class: BTreeMap<&'static str, u64>,
    pub p50: Option<Duration>,
    pub p99: Option<Duration>,
    pub window: Duration,
}

impl WindowStats {
    /// `None` without calls: no data is never "0% errors".
    pub fn error_rate(&self) -> Option<f64> {
        (self.requests > 0).then(|| self.errors as f64 / self.requests as f64)
    }
}

impl RollingStats {
    pub fn new(window: Duration) -> RollingStats {
        RollingStats {
            inner: Mutex::new(Inner {
                window,
                origin: Instant::now(),
                slices: (0..SLICES).map(|_| Slice::empty(u64::MAX)).collect(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Changes the window (a flags reload); the data so far is dropped, since its
    /// slices were cut for the old window.
    pub fn set_window(&self, window: Duration) {
        let mut inner = self.lock();
        if inner.window != window {
            inner.window = window;
            for s in inner.slices.iter_mut() {
                *s = Slice::empty(u64::MAX);
            }
        }
    }

    /// One finished call.
    pub fn record(&self, now: Instant, latency: Duration, failure: Option<ErrorClass>) {
        let mut inner = self.lock();
        let index = inner.index_at(now);
        let slot = &mut inner.slices[(index % SLICES as u64) as usize];
        if slot.index != index {
            *slot = Slice::empty(index);
        }
        slot.requests += 1;
        slot.latency[bucket_of(latency)] += 1;
        if let Some(class) = failure {
            *slot.by_class.entry(class.name()).or_default() += 1;
            if counts_as_error(class) {
                slot.errors += 1;
            }
        }
    }

    /// The totals over the window ending at `now`.
    pub fn snapshot(&self, now: Instant) -> WindowStats {
        let inner = self.lock();
        let current = inner.index_at(now);
        let oldest = current.saturating_sub(SLICES as u64 - 1);
        let mut out = WindowStats {
            window: inner.window,
            ..Default::default()
        };
        let mut latency = [0u64; BUCKETS];
        for s in inner
            .slices
            .iter()
            .filter(|s| s.index != u64::MAX && (oldest..=current).contains(&s.index))
        {
            out.requests += s.requests;
            out.errors += s.errors;
            for (k, v) in &s.by_class {
                *out.by_class.entry(k).or_default() += v;
            }
            for (total, n) in latency.iter_mut().zip(s.latency.iter()) {
                *total += u64::from(*n);
            }
        }
        out.p50 = quantile(&latency, out.requests, 0.50);
        out.p99 = quantile(&latency, out.requests, 0.99);
        out
    }

    pub fn clear(&self) {
        let mut inner = self.lock();
        for s in inner.slices.iter_mut() {
            *s = Slice::empty(u64::MAX);
        }
    }
}

fn quantile(hist: &[u64; BUCKETS], n: u64, q: f64) -> Option<Duration> {
    if n == 0 {
        return None;
    }
    let rank = ((q * n as f64).ceil() as u64).max(1);
    let mut seen = 0;
    for (i, c) in hist.iter().enumerate() {
        seen += c;
        if seen >= rank {
            return Some(bucket_bound(i));
        }
    }
    Some(bucket_bound(BUCKETS - 1))
}

/// The thresholds of the flags file's `[rollback]` section.
#[derive(Debug, Clone, PartialEq)]
pub struct RollbackRules {
    pub error_rate_threshold: f64,
    /// `Duration::ZERO`: no latency rule.
    pub latency_p99_threshold: Duration,
    pub min_requests: u64,
    /// 0: no relative rule; else new's error rate may be at most this many times
    /// legacy's.
    pub relative_error_rate: f64,
}

fn pct(r: f64) -> String {
    format!("{:.1}%", r * 100.0)
}

/// Whether `new` must be rolled back, and why. Pure.
///
/// Nothing is decided below `min_requests`: a few calls prove neither health nor
/// sickness (Flagger's issue #361: no data must never pass for good data). The
/// relative rule needs `min_requests` on legacy too, and measures legacy's rate as at
/// least one error's worth, so a legacy with no errors at all does not turn new's
/// first error into a rollback.
pub fn rollback_reason(
    rules: &RollbackRules,
    new: &WindowStats,
    legacy: &WindowStats,
) -> Option<String> {
    if new.requests < rules.min_requests.max(1) {
        return None;
    }
    let rate = new.error_rate()?;
    let over = format!(
        "over {} requests in {}",
        new.requests,
        crate::config::Dur(new.window)
    );
    if rate > rules.error_rate_threshold {
        return Some(format!(
            "error rate {} > {} {over}",
            pct(rate),
            pct(rules.error_rate_threshold)
        ));
    }
    if !rules.latency_p99_threshold.is_zero() {
        if let Some(p99) = new.p99 {
            if p99 > rules.latency_p99_threshold {
                return Some(format!(
                    "p99 latency {:?} > {:?} {over}",
                    p99, rules.latency_p99_threshold
                ));
            }
        }
    }
    if rules.relative_error_rate > 0.0 && legacy.requests >= rules.min_requests.max(1) {
        let legacy_rate = legacy.error_rate().unwrap_or(0.0);
        let floor = legacy_rate.max(1.0 / legacy.requests as f64);
        if rate > rules.relative_error_rate * floor {
            return Some(format!(
                "error rate {} is more than {}× legacy's {} {over}",
                pct(rate),
                rules.relative_error_rate,
                pct(legacy_rate)
            ));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: Duration = Duration::from_secs(10);

    fn stats(requests: u64, errors: u64, p99_ms: u64) -> WindowStats {
        WindowStats {
            requests,
            errors,
            p99: (requests > 0).then(|| Duration::from_millis(p99_ms)),
            p50: None,
            by_class: BTreeMap::new(),
            window: W,
        }
    }

    fn rules() -> RollbackRules {
        RollbackRules {
            error_rate_threshold: 0.05,
            latency_p99_threshold: Duration::from_secs(1),
            min_requests: 100,
            relative_error_rate: 0.0,
        }
    }

    #[test]
    fn counts_requests_errors_and_classes() {
        let s = RollingStats::new(W);
        let t = Instant::now();
        s.record(t, Duration::from_millis(1), None);
        s.record(t, Duration::from_millis(1), Some(ErrorClass::WorkerCrashed));
        s.record(
            t,
            Duration::from_millis(1),
            Some(ErrorClass::InvalidRequest),
        );
        let w = s.snapshot(t);
        assert_eq!(
            (w.requests, w.errors),
            (3, 1),
            "bad input is not new's error"
        );
        assert_eq!(w.by_class["worker_crashed"], 1);
        assert_eq!(w.by_class["invalid_request"], 1);
        assert_eq!(w.error_rate(), Some(1.0 / 3.0));
        assert_eq!(RollingStats::new(W).snapshot(t).error_rate(), None);
    }

    #[test]
    fn old_calls_leave_the_window_a_slice_at_a_time() {
        let s = RollingStats::new(W);
        let t = Instant::now();
        s.record(t, Duration::from_millis(1), None);
        s.record(t + Duration::from_secs(5), Duration::from_millis(1), None);
        assert_eq!(s.snapshot(t + Duration::from_secs(9)).requests, 2);
        assert_eq!(s.snapshot(t + Duration::from_secs(11)).requests, 1);
        assert_eq!(s.snapshot(t + Duration::from_secs(16)).requests, 0);
        // A slot reused after a full turn starts empty.
        s.record(t + Duration::from_secs(20), Duration::from_millis(1), None);
        assert_eq!(s.snapshot(t + Duration::from_secs(20)).requests, 1);
        s.clear();
        assert_eq!(s.snapshot(t + Duration::from_secs(20)).requests, 0);
    }

    #[test]
    fn quantiles_are_within_one_bucket() {
        let s = RollingStats::new(W);
        let t = Instant::now();
        for ms in 1..=1000 {
            s.record(t, Duration::from_millis(ms), None);
        }
        let w = s.snapshot(t);
        let p50 = w.p50.unwrap().as_secs_f64() * 1000.0;
        let p99 = w.p99.unwrap().as_secs_f64() * 1000.0;
        assert!((500.0..=550.0).contains(&p50), "{p50}");
        assert!((990.0..=1089.0).contains(&p99), "{p99}");
    }

    #[test]
    fn no_decision_without_enough_data() {
        assert_eq!(
            rollback_reason(&rules(), &stats(99, 99, 5000), &stats(0, 0, 0)),
            None
        );
        assert_eq!(
            rollback_reason(&rules(), &stats(0, 0, 0), &stats(0, 0, 0)),
            None
        );
    }

    #[test]
    fn thresholds_fire_in_order() {
        let r = rollback_reason(&rules(), &stats(200, 20, 10), &stats(0, 0, 0)).unwrap();
        assert!(
            r.starts_with("error rate 10.0% > 5.0% over 200 requests in 10s"),
            "{r}"
        );
        let r = rollback_reason(&rules(), &stats(200, 1, 1500), &stats(0, 0, 0)).unwrap();
        assert!(r.contains("p99"), "{r}");
        assert_eq!(
            rollback_reason(&rules(), &stats(200, 5, 900), &stats(0, 0, 0)),
            None
        );
        let mut no_latency = rules();
        no_latency.latency_p99_threshold = Duration::ZERO;
        assert_eq!(
            rollback_reason(&no_latency, &stats(200, 1, 5000), &stats(0, 0, 0)),
            None
        );
    }

    #[test]
    fn the_relative_rule_compares_with_legacy() {
        let mut r = rules();
        r.relative_error_rate = 3.0;
        // new 4%, legacy 0.5%: more than 3x.
        let why = rollback_reason(&r, &stats(200, 8, 10), &stats(1000, 5, 10)).unwrap();
        assert!(why.contains("legacy's 0.5%"), "{why}");
        // new 4%, legacy 2%: fine.
        assert_eq!(
            rollback_reason(&r, &stats(200, 8, 10), &stats(1000, 20, 10)),
            None
        );
        // Legacy without errors: its rate counts as one error in 1000 (0.1%), so one
        // error of new in 200 (0.5%) fires, but not when legacy lacks data.
        assert!(rollback_reason(&r, &stats(200, 1, 10), &stats(1000, 0, 10)).is_some());
        assert_eq!(
            rollback_reason(&r, &stats(200, 1, 10), &stats(50, 0, 10)),
            None
        );
        // With few legacy calls the floor is higher: 1/100 = 1%, 3x = 3% > 0.5%.
        assert_eq!(
            rollback_reason(&r, &stats(200, 1, 10), &stats(100, 0, 10)),
            None
        );
    }
}
