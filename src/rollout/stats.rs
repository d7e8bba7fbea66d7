//! Per-backend rolling statistics and the automatic rollback decision.
//!
//! Each backend keeps a [`RollingStats`]: the calls of the last `window`, in ten time
//! slices so old calls fall out without remembering each one. [`rollback_reason`] is
//! the pure decision over two snapshots (new and legacy), so it is tested without
//! clocks or backends.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;

use crate::resilience::ErrorClass;

/// Whether a failure counts as the backend's error for rollback purposes.
///
/// Only failures the backend is responsible for count: a canary must not be rolled
/// back because callers sent bad requests, gave up, or lost their sessions. Overload
/// (`PoolExhausted`, `CircuitOpen`) counts: a backend that cannot keep up is unhealthy.
pub fn counts_as_error(class: ErrorClass) -> bool {
    class.counts_for_rollback()
}

/// Whether the relative rule compares this class between `new` and legacy.
///
/// Every class that [`counts_as_error`], and the two that are usually the caller's
/// doing but that a regression produces too: `invalid_request` (new rejects input that
/// legacy accepts) and `unknown_command` (new lacks a command). Compared class by
/// class, a caller's error is only held against new when new produces more of it than
/// legacy does on the same traffic. Deadlines, cancels, sessions and shutdown say
/// nothing about new's code and are never compared.
pub fn compared_with_legacy(class: ErrorClass) -> bool {
    counts_as_error(class)
        || matches!(
            class,
            ErrorClass::InvalidRequest | ErrorClass::UnknownCommand
        )
}

/// Number of time slices per window: old data leaves the window in steps of a tenth.
const SLICES: usize = 10;

/// Number of latency buckets; the last bound is the first one at or above 120 s.
const BUCKETS: usize = 197;

/// Upper bounds (inclusive, in nanoseconds) of the latency buckets: 1 µs, then each
/// about 10% above the previous one, up to ~129 s. A fixed log-linear layout keeps the
/// relative error of every quantile under 10% at any scale, with no allocation.
const BOUNDS: [u64; BUCKETS] = bounds();

const fn bounds() -> [u64; BUCKETS] {
    let mut b = [0u64; BUCKETS];
    b[0] = 1_000;
    let mut i = 1;
    while i < BUCKETS {
        b[i] = b[i - 1] * 11 / 10;
        i += 1;
    }
    b
}

/// The bucket of a latency: the first whose bound is at or above it. Latencies beyond
/// the last bound are counted in the last bucket (they are failures anyway).
fn bucket_of(latency: Duration) -> usize {
    let nanos = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
    BOUNDS.partition_point(|&b| b < nanos).min(BUCKETS - 1)
}

/// The counts of one time slice.
#[derive(Clone)]
struct Slice {
    /// Absolute slice number since the origin; tells a live slice from a stale one
    /// left in the ring.
    index: u64,
    requests: u64,
    errors: u64,
    by_class: BTreeMap<&'static str, u64>,
    latency: [u64; BUCKETS],
    shadow_matches: u64,
    shadow_mismatches: u64,
}

impl Slice {
    fn empty(index: u64) -> Slice {
        Slice {
            index,
            requests: 0,
            errors: 0,
            by_class: BTreeMap::new(),
            latency: [0; BUCKETS],
            shadow_matches: 0,
            shadow_mismatches: 0,
        }
    }
}

struct Inner {
    window: Duration,
    /// `window / SLICES`, never zero (a zero window would divide by zero).
    width: Duration,
    ring: Vec<Slice>,
}

impl Inner {
    fn new(window: Duration) -> Inner {
        Inner {
            window,
            width: slice_width(window),
            ring: vec![Slice::empty(0); SLICES],
        }
    }
}

fn slice_width(window: Duration) -> Duration {
    (window / SLICES as u32).max(Duration::from_nanos(1))
}

/// Rolling window statistics of one backend; thread-safe.
///
/// The window is split into ten slices of `window / 10`, kept in a ring and tagged
/// with their absolute number, so a slice is reused (reset) once it is a whole window
/// old. A snapshot therefore covers between 90% and 100% of the window: recent enough
/// to react, without storing every call.
pub struct RollingStats {
    origin: Instant,
    inner: Mutex<Inner>,
}

impl RollingStats {
    pub fn new(window: Duration) -> RollingStats {
        RollingStats {
            origin: Instant::now(),
            inner: Mutex::new(Inner::new(window)),
        }
    }

    /// Poisoning is ignored: the data is plain counters, a panic mid-update can at
    /// worst skew one sample.
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn slice_index(&self, now: Instant, width: Duration) -> u64 {
        let since = now.saturating_duration_since(self.origin).as_nanos();
        u64::try_from(since / width.as_nanos()).unwrap_or(u64::MAX)
    }

    /// Changes the window (flags hot reload). Slices of another width cannot be
    /// re-cut, so the data is cleared; an unchanged window keeps it, so this can be
    /// called on every check.
    pub fn set_window(&self, window: Duration) {
        let mut inner = self.lock();
        if inner.window != window {
            *inner = Inner::new(window);
        }
    }

    /// One finished call: its latency and `None` on success or `Some(class)` on failure.
    pub fn record(&self, now: Instant, latency: Duration, failure: Option<ErrorClass>) {
        let counted = failure.is_some_and(counts_as_error);
        self.record_as(now, latency, failure, counted);
    }

    /// One finished call, saying whether its failure counts as the backend's error
    /// whatever its class: the edge knows more than the class in one case, a command
    /// that `new` lacks while legacy serves it (`unknown_command`, yet new's fault).
    pub fn record_as(
        &self,
        now: Instant,
        latency: Duration,
        failure: Option<ErrorClass>,
        counted: bool,
    ) {
        let mut inner = self.lock();
        let Some(slice) = self.slice_at(&mut inner, now) else {
            return;
        };
        slice.requests += 1;
        if let Some(class) = failure {
            *slice.by_class.entry(class.name()).or_insert(0) += 1;
            if counted {
                slice.errors += 1;
            }
        }
        slice.latency[bucket_of(latency)] += 1;
    }

    /// The live slice for `now`, reset when its ring slot holds an older one; `None`
    /// for a time older than the whole window (a very late report: already out of it,
    /// and resetting the slot would wipe newer calls).
    fn slice_at<'a>(&self, inner: &'a mut Inner, now: Instant) -> Option<&'a mut Slice> {
        let index = self.slice_index(now, inner.width);
        let slice = &mut inner.ring[(index % SLICES as u64) as usize];
        if slice.index < index {
            *slice = Slice::empty(index);
        } else if slice.index > index {
            return None;
        }
        Some(slice)
    }

    /// One shadow comparison of new's answer with legacy's: the shadow gate of a walk
    /// reads the mismatch rate over the window.
    pub fn record_shadow(&self, now: Instant, mismatch: bool) {
        let mut inner = self.lock();
        if let Some(slice) = self.slice_at(&mut inner, now) {
            if mismatch {
                slice.shadow_mismatches += 1;
            } else {
                slice.shadow_matches += 1;
            }
        }
    }

    /// The totals over the last `window` ending at `now`.
    pub fn snapshot(&self, now: Instant) -> WindowStats {
        let inner = self.lock();
        let current = self.slice_index(now, inner.width);
        let oldest = current.saturating_sub(SLICES as u64 - 1);
        let mut stats = WindowStats {
            window: inner.window,
            ..WindowStats::default()
        };
        let mut latency = [0u64; BUCKETS];
        for slice in inner.ring.iter() {
            if slice.index < oldest || slice.index > current {
                continue;
            }
            stats.requests += slice.requests;
            stats.errors += slice.errors;
            stats.shadow_matches += slice.shadow_matches;
            stats.shadow_mismatches += slice.shadow_mismatches;
            for (name, n) in &slice.by_class {
                *stats.by_class.entry(name).or_insert(0) += n;
            }
            for (total, n) in latency.iter_mut().zip(slice.latency.iter()) {
                *total += n;
            }
        }
        stats.latency = latency
            .iter()
            .enumerate()
            .filter(|(_, n)| **n > 0)
            .map(|(i, n)| (i, *n))
            .collect();
        stats.p50 = quantile(&latency, 500);
        stats.p99 = quantile(&latency, 990);
        stats
    }

    /// Forgets everything (after a rollback or resume): the next decision must rest on
    /// calls made after it.
    pub fn clear(&self) {
        let mut inner = self.lock();
        let window = inner.window;
        *inner = Inner::new(window);
    }
}

/// The quantile `per_mille / 1000` of a histogram: the smallest bucket bound whose
/// cumulative count reaches `ceil(q × n)`. Integer arithmetic keeps p99 of 1000
/// samples exactly the 990th, not the 991st by rounding. `None` with no samples.
fn quantile(counts: &[u64; BUCKETS], per_mille: u64) -> Option<Duration> {
    let n: u64 = counts.iter().sum();
    if n == 0 {
        return None;
    }
    let target = (per_mille * n).div_ceil(1000).max(1);
    let mut cumulative = 0;
    for (i, c) in counts.iter().enumerate() {
        cumulative += c;
        if cumulative >= target {
            return Some(Duration::from_nanos(BOUNDS[i]));
        }
    }
    Some(Duration::from_nanos(BOUNDS[BUCKETS - 1]))
}

/// The totals of one backend over its window.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WindowStats {
    /// All finished calls: successes and every failure.
    pub requests: u64,
    /// Failures that [`counts_as_error`].
    pub errors: u64,
    /// Every failure by class name, counted or not (for operators).
    pub by_class: BTreeMap<&'static str, u64>,
    /// Upper bound of the median's bucket (at most ~10% over); `None` with no calls.
    pub p50: Option<Duration>,
    /// Upper bound of the 99th percentile's bucket; `None` with no calls.
    pub p99: Option<Duration>,
    pub window: Duration,
    /// The latency histogram, sparse: bucket index → calls. The buckets are the same
    /// on every instance, so histograms of several instances add up ([`merge`](Self::merge)).
    pub latency: BTreeMap<usize, u64>,
    /// Shadow comparisons whose answers matched, and mismatched.
    pub shadow_matches: u64,
    pub shadow_mismatches: u64,
}

impl WindowStats {
    /// Adds another instance's totals of the same backend and window: counts and
    /// histograms add, and the quantiles are those of the sum, not an average of
    /// quantiles (which would mean nothing).
    pub fn merge(&mut self, other: &WindowStats) {
        self.requests += other.requests;
        self.errors += other.errors;
        self.shadow_matches += other.shadow_matches;
        self.shadow_mismatches += other.shadow_mismatches;
        for (name, n) in &other.by_class {
            *self.by_class.entry(name).or_insert(0) += n;
        }
        for (i, n) in &other.latency {
            if *i < BUCKETS {
                *self.latency.entry(*i).or_insert(0) += n;
            }
        }
        self.window = self.window.max(other.window);
        let mut dense = [0u64; BUCKETS];
        for (i, n) in &self.latency {
            if let Some(slot) = dense.get_mut(*i) {
                *slot = *n;
            }
        }
        self.p50 = quantile(&dense, 500);
        self.p99 = quantile(&dense, 990);
    }

    /// `errors / requests`; `None` when there were no requests, because no data is
    /// never "0% errors".
    pub fn error_rate(&self) -> Option<f64> {
        (self.requests > 0).then(|| self.errors as f64 / self.requests as f64)
    }
}

/// When `new` is rolled back automatically.
#[derive(Debug, Clone, PartialEq)]
pub struct RollbackRules {
    /// Absolute error rate (e.g. 0.05) above which `new` is rolled back.
    pub error_rate_threshold: f64,
    /// p99 latency above which `new` is rolled back; `Duration::ZERO` = off.
    pub latency_p99_threshold: Duration,
    /// Calls needed in the window before anything is decided.
    pub min_requests: u64,
    /// `new`'s rate of one class above this many times legacy's rate of the same class
    /// rolls back (see [`compared_with_legacy`]); 0.0 = off.
    pub relative_error_rate: f64,
}

/// The pure decision: `Some(reason)` when `new` must be rolled back, `None` otherwise.
///
/// Nothing is decided below `min_requests`: a handful of calls is neither proof of
/// health nor of sickness. Then, in order, the first that fires: the absolute error
/// rate, the p99 latency, and the relative rule ([`relative_regression`]).
pub fn rollback_reason(
    rules: &RollbackRules,
    new: &WindowStats,
    legacy: &WindowStats,
) -> Option<String> {
    if new.requests < rules.min_requests {
        return None;
    }
    let over = format!(
        "over {} requests in {}",
        new.requests,
        fmt_duration(new.window)
    );
    let limits = Thresholds {
        max_error_rate: rules.error_rate_threshold,
        max_p99: rules.latency_p99_threshold,
        max_relative_error_rate: rules.relative_error_rate,
        min_requests: rules.min_requests,
    };
    first_breach(&limits, &over, new, legacy)
}

/// The limits a window of `new` is held to: by the rollback rules, and by each
/// promotion step's gates (one reading of "too many errors, too slow", so the two
/// cannot drift apart).
pub struct Thresholds {
    pub max_error_rate: f64,
    /// Zero: no latency limit.
    pub max_p99: Duration,
    /// Zero: no relative rule.
    pub max_relative_error_rate: f64,
    /// Legacy needs this many requests before the relative rule compares with it.
    pub min_requests: u64,
}

/// The first limit `new` breaks, in order: the absolute error rate, the p99 latency
/// and the relative rule ([`relative_regression`]); `over` ends the first two
/// reasons. `None` without data, or when all hold.
pub fn first_breach(
    t: &Thresholds,
    over: &str,
    new: &WindowStats,
    legacy: &WindowStats,
) -> Option<String> {
    let rate = new.error_rate()?;
    if rate > t.max_error_rate {
        return Some(format!(
            "error rate {} > {} {over}",
            pct(rate),
            pct(t.max_error_rate)
        ));
    }
    if !t.max_p99.is_zero() {
        if let Some(p99) = new.p99 {
            if p99 > t.max_p99 {
                return Some(format!(
                    "p99 latency {} > {} {over}",
                    fmt_duration(p99),
                    fmt_duration(t.max_p99)
                ));
            }
        }
    }
    if t.max_relative_error_rate > 0.0 && legacy.requests >= t.min_requests {
        return relative_regression(t.max_relative_error_rate, new, legacy);
    }
    None
}

/// The relative rule, class by class: the first class (in the table's order) that
/// [`compared_with_legacy`] and that new produces at more than `factor` times legacy's
/// rate of the same class. `None` when there is none, or no data on either side.
///
/// Per class, so that neither side's other failures hide a regression (new crashing
/// where legacy times out is not "the same error rate"), and so that the callers' own
/// errors (`invalid_request`, `unknown_command`) count only as far as new produces
/// more of them than legacy does on the same kind of traffic. Legacy's rate is floored
/// at one call in its window, so a class legacy never had does not turn new's first
/// such failure into a rollback.
pub fn relative_regression(factor: f64, new: &WindowStats, legacy: &WindowStats) -> Option<String> {
    if new.requests == 0 || legacy.requests == 0 {
        return None;
    }
    let floor = 1.0 / legacy.requests as f64;
    ErrorClass::ALL
        .into_iter()
        .filter(|c| compared_with_legacy(*c))
        .find_map(|class| {
            let of = |w: &WindowStats| w.by_class.get(class.name()).copied().unwrap_or(0);
            let rate = of(new) as f64 / new.requests as f64;
            let legacy_rate = of(legacy) as f64 / legacy.requests as f64;
            (rate > factor * legacy_rate.max(floor)).then(|| {
                let note = if legacy_rate < floor {
                    format!(" (counted as 1 in {})", legacy.requests)
                } else {
                    String::new()
                };
                format!(
                    "{class} rate {} is more than {factor}× legacy's {}{note}",
                    pct(rate),
                    pct(legacy_rate)
                )
            })
        })
}

pub(crate) fn pct(rate: f64) -> String {
    format!("{:.1}%", rate * 100.0)
}

/// A short human duration for reasons: "60s", "1.52s", "250ms", "800µs".
pub(crate) fn fmt_duration(d: Duration) -> String {
    let (value, unit) = if d >= Duration::from_secs(1) {
        (d.as_secs_f64(), "s")
    } else if d >= Duration::from_millis(1) {
        (d.as_secs_f64() * 1e3, "ms")
    } else {
        (d.as_secs_f64() * 1e6, "µs")
    };
    let s = format!("{value:.2}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    format!("{s}{unit}")
}

#[cfg(test)]
mod tests {
    use super::*;

    const WINDOW: Duration = Duration::from_secs(60);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn rules() -> RollbackRules {
        RollbackRules {
            error_rate_threshold: 0.05,
            latency_p99_threshold: ms(1000),
            min_requests: 100,
            relative_error_rate: 0.0,
        }
    }

    /// `errors` crashes in `requests` calls.
    fn stats(requests: u64, errors: u64) -> WindowStats {
        WindowStats {
            requests,
            errors,
            by_class: (errors > 0)
                .then(|| (ErrorClass::WorkerCrashed.name(), errors))
                .into_iter()
                .collect(),
            p50: (requests > 0).then(|| ms(10)),
            p99: (requests > 0).then(|| ms(100)),
            window: WINDOW,
            ..WindowStats::default()
        }
    }

    #[test]
    fn bounds_cover_1us_to_120s_in_steps_of_at_most_10_percent() {
        assert_eq!(BOUNDS[0], 1_000);
        assert!(BOUNDS[BUCKETS - 2] < 120_000_000_000);
        assert!(BOUNDS[BUCKETS - 1] >= 120_000_000_000);
        for w in BOUNDS.windows(2) {
            assert!(w[1] > w[0]);
            assert!(w[1] * 10 <= w[0] * 11, "{} -> {}", w[0], w[1]);
        }
        assert_eq!(bucket_of(Duration::ZERO), 0);
        assert_eq!(bucket_of(Duration::from_nanos(1_000)), 0);
        assert_eq!(bucket_of(Duration::from_nanos(1_001)), 1);
        assert_eq!(bucket_of(Duration::from_secs(3600)), BUCKETS - 1);
        assert_eq!(bucket_of(Duration::MAX), BUCKETS - 1);
    }

    #[test]
    fn counts_as_error_only_for_the_backends_failures() {
        use ErrorClass as C;
        for c in [
            C::WorkerCrashed,
            C::WorkerTimeout,
            C::PoolExhausted,
            C::CircuitOpen,
            C::ProtocolError,
            C::PythonException,
            C::Internal,
        ] {
            assert!(counts_as_error(c), "{c:?}");
        }
        for c in [
            C::DeadlineExceeded,
            C::InvalidRequest,
            C::UnknownCommand,
            C::SessionLost,
            C::SessionNotFound,
            C::SessionExists,
            C::Cancelled,
            C::ShuttingDown,
        ] {
            assert!(!counts_as_error(c), "{c:?}");
        }
    }

    #[test]
    fn snapshot_counts_requests_errors_and_classes() {
        let s = RollingStats::new(WINDOW);
        let t = Instant::now();
        for _ in 0..5 {
            s.record(t, ms(3), None);
        }
        s.record(t, ms(3), Some(ErrorClass::WorkerCrashed));
        s.record(t, ms(3), Some(ErrorClass::WorkerCrashed));
        s.record(t, ms(3), Some(ErrorClass::PythonException));
        s.record(t, ms(3), Some(ErrorClass::InvalidRequest));
        s.record(t, ms(3), Some(ErrorClass::Cancelled));

        let snap = s.snapshot(t + ms(10));
        assert_eq!(snap.requests, 10);
        assert_eq!(snap.errors, 3, "InvalidRequest and Cancelled do not count");
        let expected: BTreeMap<&'static str, u64> = [
            (ErrorClass::WorkerCrashed.name(), 2),
            (ErrorClass::PythonException.name(), 1),
            (ErrorClass::InvalidRequest.name(), 1),
            (ErrorClass::Cancelled.name(), 1),
        ]
        .into_iter()
        .collect();
        assert_eq!(snap.by_class, expected);
        assert_eq!(snap.window, WINDOW);
        assert_eq!(snap.error_rate(), Some(0.3));
    }

    #[test]
    fn empty_snapshot_has_no_rate_and_no_latency() {
        let s = RollingStats::new(WINDOW);
        let snap = s.snapshot(Instant::now());
        assert_eq!(snap.requests, 0);
        assert_eq!(snap.error_rate(), None);
        assert_eq!(snap.p50, None);
        assert_eq!(snap.p99, None);
        assert_eq!(snap.window, WINDOW);
    }

    #[test]
    fn old_data_falls_out_of_the_window() {
        let s = RollingStats::new(WINDOW);
        let t0 = Instant::now();
        s.record(t0, ms(5), Some(ErrorClass::WorkerCrashed));
        s.record(t0 + Duration::from_secs(30), ms(5), None);

        let snap = s.snapshot(t0 + Duration::from_secs(59));
        assert_eq!((snap.requests, snap.errors), (2, 1));

        // A whole window after the first call: only the second one is left.
        let snap = s.snapshot(t0 + WINDOW);
        assert_eq!((snap.requests, snap.errors), (1, 0));
        assert!(snap.by_class.is_empty());

        // A whole window after the second: nothing.
        let snap = s.snapshot(t0 + Duration::from_secs(90));
        assert_eq!(snap.requests, 0);
        assert_eq!(snap.p99, None);
    }

    #[test]
    fn reused_slices_are_reset_not_added_to() {
        let s = RollingStats::new(WINDOW);
        let t0 = Instant::now();
        s.record(t0, ms(5), Some(ErrorClass::Internal));
        // Same ring position, ten slices later.
        let later = t0 + WINDOW + ms(1);
        s.record(later, ms(5), None);
        let snap = s.snapshot(later);
        assert_eq!((snap.requests, snap.errors), (1, 0));
        // A very late report from before the window neither lands in nor wipes the
        // newer slice.
        s.record(t0, ms(5), Some(ErrorClass::Internal));
        let snap = s.snapshot(later);
        assert_eq!((snap.requests, snap.errors), (1, 0));
    }

    #[test]
    fn quantiles_are_within_one_bucket() {
        let s = RollingStats::new(WINDOW);
        let t = Instant::now();
        for i in 1..=1000 {
            s.record(t, ms(i), None);
        }
        let snap = s.snapshot(t);
        let p50 = snap.p50.unwrap();
        let p99 = snap.p99.unwrap();
        assert!(p50 >= ms(500) && p50 <= ms(550), "p50 {p50:?}");
        assert!(p99 >= ms(990) && p99 <= ms(1089), "p99 {p99:?}");
    }

    #[test]
    fn single_sample_quantiles_are_its_bucket() {
        let s = RollingStats::new(WINDOW);
        let t = Instant::now();
        s.record(t, ms(200), None);
        let snap = s.snapshot(t);
        let p = snap.p50.unwrap();
        assert_eq!(snap.p99, Some(p));
        assert!(p >= ms(200) && p <= ms(220), "{p:?}");
    }

    #[test]
    fn clear_forgets_everything() {
        let s = RollingStats::new(WINDOW);
        let t = Instant::now();
        s.record(t, ms(5), Some(ErrorClass::WorkerTimeout));
        s.clear();
        let snap = s.snapshot(t);
        assert_eq!(
            snap,
            WindowStats {
                window: WINDOW,
                ..WindowStats::default()
            }
        );
    }

    #[test]
    fn set_window_keeps_data_when_unchanged_and_clears_on_change() {
        let s = RollingStats::new(WINDOW);
        let t = Instant::now();
        s.record(t, ms(5), None);
        s.set_window(WINDOW);
        assert_eq!(s.snapshot(t).requests, 1);

        let shorter = Duration::from_secs(10);
        s.set_window(shorter);
        let snap = s.snapshot(t);
        assert_eq!((snap.requests, snap.window), (0, shorter));

        // The new width is used: data leaves after 10 s now.
        s.record(t, ms(5), None);
        assert_eq!(s.snapshot(t + Duration::from_secs(9)).requests, 1);
        assert_eq!(s.snapshot(t + shorter).requests, 0);
    }

    #[test]
    fn zero_window_does_not_panic() {
        let s = RollingStats::new(Duration::ZERO);
        let t = Instant::now();
        s.record(t, ms(5), None);
        let _ = s.snapshot(t + ms(1));
    }

    #[test]
    fn error_rate_is_none_without_data() {
        assert_eq!(WindowStats::default().error_rate(), None);
        assert_eq!(stats(4, 1).error_rate(), Some(0.25));
        assert_eq!(stats(4, 0).error_rate(), Some(0.0));
    }

    #[test]
    fn nothing_is_decided_below_min_requests() {
        let all_failed = WindowStats {
            p99: Some(Duration::from_secs(30)),
            ..stats(99, 99)
        };
        assert_eq!(
            rollback_reason(&rules(), &all_failed, &stats(1000, 0)),
            None
        );
    }

    #[test]
    fn empty_stats_decide_nothing() {
        let empty = WindowStats::default();
        assert_eq!(rollback_reason(&rules(), &empty, &empty), None);
        let no_min = RollbackRules {
            min_requests: 0,
            relative_error_rate: 2.0,
            ..rules()
        };
        assert_eq!(rollback_reason(&no_min, &empty, &empty), None);
    }

    #[test]
    fn healthy_new_is_kept() {
        assert_eq!(
            rollback_reason(&rules(), &stats(200, 2), &stats(200, 2)),
            None
        );
    }

    #[test]
    fn error_rate_above_threshold_rolls_back() {
        let reason = rollback_reason(&rules(), &stats(120, 15), &stats(0, 0)).unwrap();
        assert_eq!(reason, "error rate 12.5% > 5.0% over 120 requests in 60s");
        // Exactly at the threshold is not above it.
        assert_eq!(
            rollback_reason(&rules(), &stats(100, 5), &stats(0, 0)),
            None
        );
    }

    #[test]
    fn p99_above_threshold_rolls_back() {
        let slow = WindowStats {
            p99: Some(ms(1520)),
            ..stats(120, 0)
        };
        let reason = rollback_reason(&rules(), &slow, &stats(0, 0)).unwrap();
        assert_eq!(reason, "p99 latency 1.52s > 1s over 120 requests in 60s");

        let off = RollbackRules {
            latency_p99_threshold: Duration::ZERO,
            ..rules()
        };
        assert_eq!(rollback_reason(&off, &slow, &stats(0, 0)), None);

        let at = WindowStats {
            p99: Some(ms(1000)),
            ..stats(120, 0)
        };
        assert_eq!(rollback_reason(&rules(), &at, &stats(0, 0)), None);
    }

    #[test]
    fn error_rate_is_checked_before_latency() {
        let both = WindowStats {
            p99: Some(Duration::from_secs(5)),
            ..stats(100, 50)
        };
        let reason = rollback_reason(&rules(), &both, &stats(0, 0)).unwrap();
        assert!(reason.starts_with("error rate"), "{reason}");
    }

    #[test]
    fn relative_rule_compares_with_legacy() {
        let relative = RollbackRules {
            relative_error_rate: 3.0,
            ..rules()
        };
        // new 4.0%, legacy 0.5%: 8× legacy's rate, under the absolute 5%.
        let reason = rollback_reason(&relative, &stats(200, 8), &stats(1000, 5)).unwrap();
        assert_eq!(
            reason,
            "worker_crashed rate 4.0% is more than 3× legacy's 0.5%"
        );
        // new 1.0% is only 2× legacy's 0.5%.
        assert_eq!(
            rollback_reason(&relative, &stats(200, 2), &stats(1000, 5)),
            None
        );
        // Off when 0.0.
        assert_eq!(
            rollback_reason(&rules(), &stats(200, 8), &stats(1000, 5)),
            None
        );
    }

    #[test]
    fn relative_rule_floors_a_legacy_without_errors_at_one_error() {
        let relative = RollbackRules {
            relative_error_rate: 3.0,
            ..rules()
        };
        // One error in 200 (0.5%) against legacy's 0 of 100 (floored at 1%): kept.
        assert_eq!(
            rollback_reason(&relative, &stats(200, 1), &stats(100, 0)),
            None
        );
        // 4.0% is more than 3 × 1%: rolled back.
        let reason = rollback_reason(&relative, &stats(200, 8), &stats(100, 0)).unwrap();
        assert!(reason.contains("more than 3× legacy's 0.0%"), "{reason}");
        assert!(reason.contains("counted as 1 in 100"), "{reason}");
    }

    #[test]
    fn relative_rule_needs_enough_legacy_requests() {
        let relative = RollbackRules {
            relative_error_rate: 3.0,
            ..rules()
        };
        // Legacy has 0 errors but only 50 calls: no comparison.
        assert_eq!(
            rollback_reason(&relative, &stats(200, 8), &stats(50, 0)),
            None
        );
        assert_eq!(
            rollback_reason(&relative, &stats(200, 8), &stats(0, 0)),
            None
        );
    }

    /// Calls with failures of the given classes; `errors` as the stats count them.
    fn classes(requests: u64, failures: &[(ErrorClass, u64)]) -> WindowStats {
        WindowStats {
            requests,
            errors: failures
                .iter()
                .filter(|(c, _)| counts_as_error(*c))
                .map(|(_, n)| n)
                .sum(),
            by_class: failures.iter().map(|(c, n)| (c.name(), *n)).collect(),
            p50: Some(ms(10)),
            p99: Some(ms(100)),
            window: WINDOW,
            ..WindowStats::default()
        }
    }

    /// Issue 13, item 5: the relative rule compares class by class, the callers'
    /// classes included, so only what new produces more of than legacy counts.
    #[test]
    fn relative_rule_compares_each_class_with_legacys_rate_of_it() {
        use ErrorClass as C;
        let relative = RollbackRules {
            relative_error_rate: 2.0,
            ..rules()
        };
        let decide =
            |new: &WindowStats, legacy: &WindowStats| rollback_reason(&relative, new, legacy);
        // The same share of the callers' bad input on both: nothing to hold against new.
        let same = classes(200, &[(C::InvalidRequest, 60)]);
        assert_eq!(
            decide(&same, &classes(400, &[(C::InvalidRequest, 120)])),
            None
        );
        // New rejects what legacy accepts: 30% against 5%.
        assert_eq!(
            decide(&same, &classes(400, &[(C::InvalidRequest, 20)])).as_deref(),
            Some("invalid_request rate 30.0% is more than 2× legacy's 5.0%")
        );
        // A command new lacks, which legacy never answered NOT_FOUND.
        let missing = classes(200, &[(C::UnknownCommand, 10)]);
        assert_eq!(
            decide(&missing, &classes(100, &[])).as_deref(),
            Some("unknown_command rate 5.0% is more than 2× legacy's 0.0% (counted as 1 in 100)")
        );
        // Legacy's other failures do not excuse a class it does not have: new crashing
        // 4% of the time is not "legacy's 4% of timeouts".
        let reason = decide(
            &classes(200, &[(C::WorkerCrashed, 8)]),
            &classes(1000, &[(C::WorkerTimeout, 40)]),
        )
        .unwrap();
        assert!(reason.starts_with("worker_crashed rate 4.0%"), "{reason}");
        // Exactly twice is not more than twice.
        assert_eq!(
            decide(
                &classes(200, &[(C::InvalidRequest, 20)]),
                &classes(200, &[(C::InvalidRequest, 10)])
            ),
            None
        );
        // Client deadlines, cancels, sessions and shutdown are never compared.
        let noise = classes(
            200,
            &[
                (C::Cancelled, 100),
                (C::DeadlineExceeded, 50),
                (C::SessionNotFound, 20),
                (C::ShuttingDown, 10),
            ],
        );
        assert_eq!(decide(&noise, &classes(200, &[])), None);
        // The absolute rule still ignores the callers' classes.
        assert_eq!(
            rollback_reason(
                &rules(),
                &classes(200, &[(C::InvalidRequest, 100)]),
                &classes(0, &[])
            ),
            None
        );
    }

    #[test]
    fn compared_classes_are_the_counted_ones_and_the_callers_two() {
        for c in ErrorClass::ALL {
            let expect = counts_as_error(c)
                || matches!(c, ErrorClass::InvalidRequest | ErrorClass::UnknownCommand);
            assert_eq!(compared_with_legacy(c), expect, "{c:?}");
        }
    }

    #[test]
    fn a_failure_recorded_as_counted_counts_whatever_its_class() {
        let s = RollingStats::new(WINDOW);
        let t = Instant::now();
        s.record_as(t, ms(1), Some(ErrorClass::UnknownCommand), true);
        s.record(t, ms(1), Some(ErrorClass::UnknownCommand));
        let snap = s.snapshot(t);
        assert_eq!((snap.requests, snap.errors), (2, 1));
        assert_eq!(snap.by_class.get("unknown_command"), Some(&2));
    }

    #[test]
    fn merged_histograms_give_the_quantiles_of_all_the_calls() {
        let t = Instant::now();
        let (a, b) = (RollingStats::new(WINDOW), RollingStats::new(WINDOW));
        for i in 1..=500 {
            a.record(t, ms(i), None);
        }
        for i in 501..=1000 {
            b.record(t, ms(i), Some(ErrorClass::Internal));
        }
        a.record_shadow(t, true);
        b.record_shadow(t, false);
        let mut sum = a.snapshot(t);
        sum.merge(&b.snapshot(t));
        assert_eq!((sum.requests, sum.errors), (1000, 500));
        assert_eq!((sum.shadow_matches, sum.shadow_mismatches), (1, 1));
        assert_eq!(sum.by_class.get("internal"), Some(&500));
        let p50 = sum.p50.unwrap();
        let p99 = sum.p99.unwrap();
        assert!(p50 >= ms(500) && p50 <= ms(550), "p50 {p50:?}");
        assert!(p99 >= ms(990) && p99 <= ms(1089), "p99 {p99:?}");
        let mut one = a.snapshot(t);
        let before = one.clone();
        one.merge(&WindowStats::default());
        assert_eq!(one, before, "merging nothing changes nothing");
    }

    #[test]
    fn durations_are_short_and_readable() {
        assert_eq!(fmt_duration(Duration::from_secs(60)), "60s");
        assert_eq!(fmt_duration(ms(1520)), "1.52s");
        assert_eq!(fmt_duration(ms(250)), "250ms");
        assert_eq!(fmt_duration(Duration::from_micros(800)), "800µs");
    }
}
