//! The per-backend circuit breaker: the `failsafe` state machine inside our own tower
//! layer, fed by the error classification.
//!
//! ```text
//! Closed ──K consecutive system failures, or success rate < R over the window──> Open
//! Open ──open_for elapsed──> HalfOpen (at most `half_open_probes` calls in flight)
//! HalfOpen ──probe succeeds──> Closed;  ──probe fails──> Open
//! ```
//!
//! Only classes whose row says `breaker = yes` count as failures: a backend that
//! correctly rejects bad input is healthy. While open, calls fail at the top of `call`
//! with `circuit_open`, without touching a worker. failsafe's jittered and exponential
//! backoffs panic for delays under 1 s, so the open time is a constant backoff.

use std::sync::atomic::{AtomicU32, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use failsafe::backoff::{self, Constant};
use failsafe::failure_policy::{
    consecutive_failures, success_rate_over_time_window, ConsecutiveFailures, OrElse,
    SuccessRateOverTimeWindow,
};
use failsafe::{FailurePolicy, Instrument, StateMachine};
use futures_util::future::BoxFuture;
use tower::{Layer, Service};

use super::class::ErrorClass;
use super::error::CallError;
use super::retry::{Attempt, Failed, Served};
use super::InvalidSetting;
use crate::config::BreakerSection;

/// Validated breaker settings.
#[derive(Debug, Clone, PartialEq)]
pub struct BreakerSettings {
    pub enabled: bool,
    /// Open after this many system failures in a row.
    pub consecutive_failures: u32,
    /// Open when the success rate over `window` falls below this ...
    pub min_success_rate: f64,
    /// ... once at least this many calls were seen in the window. The rule decides only
    /// after a whole window of data: no verdict without data.
    pub min_requests: u32,
    /// At least 1 s (failsafe counts it in whole seconds).
    pub window: Duration,
    /// How long the breaker stays open before probing.
    pub open_for: Duration,
    /// Calls let through at once while half-open.
    pub half_open_probes: u32,
}

impl Default for BreakerSettings {
    fn default() -> Self {
        BreakerSettings {
            enabled: true,
            consecutive_failures: 5,
            min_success_rate: 0.5,
            min_requests: 20,
            window: Duration::from_secs(30),
            open_for: Duration::from_secs(5),
            half_open_probes: 1,
        }
    }
}

impl BreakerSettings {
    pub fn validate(&self) -> Result<(), InvalidSetting> {
        let bad = InvalidSetting::new;
        if self.consecutive_failures == 0 {
            return Err(bad("consecutive_failures", "must be at least 1"));
        }
        if !(0.0..=1.0).contains(&self.min_success_rate) {
            return Err(bad("min_success_rate", "must be between 0 and 1"));
        }
        if self.window < Duration::from_secs(1) {
            return Err(bad("window", "must be at least 1s"));
        }
        if self.open_for.is_zero() {
            return Err(bad("open_for", "must be positive"));
        }
        if self.half_open_probes == 0 {
            return Err(bad("half_open_probes", "must be at least 1"));
        }
        Ok(())
    }
}

// === conversion from the config file's `[circuit_breaker]` section ===

impl BreakerSettings {
    /// The per-backend breaker's part of `[circuit_breaker]` (the `worker_*` keys are
    /// [`super::OutlierSettings::from_section`]'s).
    pub fn from_section(b: &BreakerSection) -> BreakerSettings {
        BreakerSettings {
            enabled: b.enabled,
            consecutive_failures: b.consecutive_failures.0.min(u32::MAX as u64) as u32,
            min_success_rate: b.min_success_rate.0,
            min_requests: b.min_requests,
            window: b.window.0,
            open_for: b.open_for.0,
            half_open_probes: b.half_open_probes.0.min(u32::MAX as u64) as u32,
        }
    }
}

/// The breaker's state, as exported in metrics: 0 closed, 1 half-open, 2 open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum BreakerState {
    Closed = 0,
    HalfOpen = 1,
    Open = 2,
}

/// Whether a breaker refuses the next call, pure: while open until its open period is
/// over, and while half-open with every probe slot taken (the next call would be
/// refused just the same). Readiness reads this, so that /readyz never says "ready"
/// while every call is refused.
fn refuses(
    state: BreakerState,
    open_period_over: bool,
    probes_in_flight: u32,
    half_open_probes: u32,
) -> bool {
    match state {
        BreakerState::Closed => false,
        BreakerState::Open => !open_period_over,
        BreakerState::HalfOpen => probes_in_flight >= half_open_probes,
    }
}

/// Tracks failsafe's transitions (its `Instrument` hook) for state, logs and metrics.
#[derive(Debug, Default)]
struct Tracker {
    name: String,
    state: AtomicU8,
    opened_at: Mutex<Option<Instant>>,
    transitions: AtomicU32,
}

impl Tracker {
    fn set(&self, s: BreakerState) {
        let old = self.state.swap(s as u8, Ordering::AcqRel);
        if old != s as u8 {
            self.transitions.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(backend = %self.name, state = ?s, "circuit breaker state changed");
            metrics::counter!("pitboss_circuit_transitions_total", "backend" => self.name.clone(), "scope" => "backend")
                .increment(1);
        }
        // 0 closed, 1 half-open, 2 open.
        metrics::gauge!("pitboss_circuit_state", "backend" => self.name.clone(), "scope" => "backend")
            .set(s as u8 as f64);
    }
}

#[derive(Clone)]
struct SharedTracker(Arc<Tracker>);

impl Instrument for SharedTracker {
    fn on_call_rejected(&self) {}
    fn on_open(&self) {
        *self.0.opened_at.lock().unwrap_or_else(|e| e.into_inner()) = Some(failsafe::clock::now());
        self.0.set(BreakerState::Open);
    }
    fn on_half_open(&self) {
        self.0.set(BreakerState::HalfOpen);
    }
    fn on_closed(&self) {
        self.0.set(BreakerState::Closed);
    }
}

type Policy = OrElse<ConsecutiveFailures<Constant>, SuccessRateOverTimeWindow<Constant>>;

/// One backend's breaker. Cheap to clone; clones share the state.
#[derive(Clone)]
pub struct Breaker {
    machine: Arc<StateMachine<Policy, SharedTracker>>,
    tracker: Arc<Tracker>,
    probes: Arc<AtomicU32>,
    settings: Arc<BreakerSettings>,
}

/// Permission to make one call; report its outcome with [`Permit::record`].
///
/// A permit dropped without a record (the call's future was dropped: a client's
/// cancel, the shadow's timeout) records nothing, and a probe's permit hands its
/// half-open slot back either way: a slot kept by a dropped probe would make the
/// breaker refuse every later call, for ever.
pub struct Permit {
    breaker: Breaker,
    probe: bool,
}

impl Breaker {
    pub fn new(name: &str, settings: BreakerSettings) -> Result<Breaker, InvalidSetting> {
        settings.validate()?;
        let open = backoff::constant(settings.open_for);
        let policy = consecutive_failures(settings.consecutive_failures, open.clone()).or_else(
            success_rate_over_time_window(
                settings.min_success_rate,
                settings.min_requests,
                settings.window,
                open,
            ),
        );
        let tracker = Arc::new(Tracker {
            name: name.to_string(),
            ..Default::default()
        });
        tracker.set(BreakerState::Closed); // exports the initial state; not a transition
        let machine = failsafe::Config::new()
            .failure_policy(policy)
            .instrument(SharedTracker(tracker.clone()))
            .build();
        Ok(Breaker {
            machine: Arc::new(machine),
            tracker,
            probes: Arc::new(AtomicU32::new(0)),
            settings: Arc::new(settings),
        })
    }

    pub fn state(&self) -> BreakerState {
        match self.tracker.state.load(Ordering::Acquire) {
            0 => BreakerState::Closed,
            1 => BreakerState::HalfOpen,
            _ => BreakerState::Open,
        }
    }

    /// Whether it refuses calls right now (`refuses`): open, and its open period not
    /// yet over; or half-open with every probe slot taken. Once the open period is over
    /// it is ready to probe, even though failsafe only moves to half-open on the next
    /// call; readiness must say so, or a load balancer that stops sending traffic to an
    /// unready instance would keep it open for ever.
    pub fn refusing(&self) -> bool {
        if !self.settings.enabled {
            return false;
        }
        let state = self.state();
        let open_period_over = state != BreakerState::Open || {
            let opened = *self
                .tracker
                .opened_at
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            !opened.is_some_and(|t| failsafe::clock::now() < t + self.settings.open_for)
        };
        refuses(
            state,
            open_period_over,
            self.probes.load(Ordering::Acquire),
            self.settings.half_open_probes,
        )
    }

    pub fn transitions(&self) -> u32 {
        self.tracker.transitions.load(Ordering::Relaxed)
    }

    /// Asks to make a call. `Err` carries how long until the breaker probes again.
    pub fn try_acquire(&self) -> Result<Permit, Duration> {
        if !self.settings.enabled {
            return Ok(Permit {
                breaker: self.clone(),
                probe: false,
            });
        }
        if !self.machine.is_call_permitted() {
            return Err(self.retry_after());
        }
        if self.state() == BreakerState::HalfOpen {
            // failsafe lets every call through while half-open; we probe with a few.
            let n = self.probes.fetch_add(1, Ordering::AcqRel);
            if n >= self.settings.half_open_probes {
                self.probes.fetch_sub(1, Ordering::AcqRel);
                return Err(self.settings.open_for.min(Duration::from_secs(1)));
            }
            return Ok(Permit {
                breaker: self.clone(),
                probe: true,
            });
        }
        Ok(Permit {
            breaker: self.clone(),
            probe: false,
        })
    }

    fn retry_after(&self) -> Duration {
        let opened = *self
            .tracker
            .opened_at
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        match opened {
            Some(t) => {
                (t + self.settings.open_for).saturating_duration_since(failsafe::clock::now())
            }
            None => self.settings.open_for,
        }
        .max(Duration::from_millis(1))
    }
}

impl Permit {
    /// Records the outcome: `None` for success, else the failure's class.
    pub fn record(self, failure: Option<ErrorClass>) {
        let b = &self.breaker;
        match failure {
            Some(class) if class.row().breaker => b.machine.on_error(),
            // Application errors prove the backend is up.
            _ => b.machine.on_success(),
        }
        // Dropping `self` now hands a probe's slot back.
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if self.probe {
            self.breaker.probes.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// The tower layer that puts a [`Breaker`] in front of a service of attempts.
#[derive(Clone)]
pub struct BreakerLayer {
    breaker: Breaker,
}

impl BreakerLayer {
    pub fn new(breaker: Breaker) -> Self {
        BreakerLayer { breaker }
    }
}

impl<S> Layer<S> for BreakerLayer {
    type Service = BreakerService<S>;
    fn layer(&self, inner: S) -> BreakerService<S> {
        BreakerService {
            inner,
            breaker: self.breaker.clone(),
        }
    }
}

#[derive(Clone)]
pub struct BreakerService<S> {
    inner: S,
    breaker: Breaker,
}

impl<S> Service<Attempt> for BreakerService<S>
where
    S: Service<Attempt, Response = Served, Error = Failed> + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Served;
    type Error = Failed;
    type Future = BoxFuture<'static, Result<Served, Failed>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Failed>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, attempt: Attempt) -> Self::Future {
        let number = attempt.number;
        let permit = match self.breaker.try_acquire() {
            Ok(p) => p,
            Err(retry_after) => {
                // Rejected at the top of `call`: no worker is touched.
                return Box::pin(std::future::ready(Err(Failed {
                    error: CallError::CircuitOpen { retry_after },
                    class: ErrorClass::CircuitOpen,
                    attempts: number,
                    budget_exhausted: false,
                })));
            }
        };
        let fut = self.inner.call(attempt);
        Box::pin(async move {
            let result = fut.await;
            permit.record(result.as_ref().err().map(|f| f.class));
            result
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Dur, Fraction};

    /// The config checks `[circuit_breaker]` itself (it may not depend on this layer);
    /// it must accept and refuse exactly what `validate` does, with the same words.
    #[test]
    fn the_config_checks_breaker_sections_as_validate_does() {
        let base = crate::config::Config::load_default()
            .expect("the default config")
            .circuit_breaker;
        let secs = |s: f64| Dur(Duration::from_secs_f64(s));
        let mut cases = vec![base.clone()];
        for v in [0.0, 0.5, 0.999, 1.0, 5.0] {
            cases.push(BreakerSection {
                window: secs(v),
                ..base.clone()
            });
            cases.push(BreakerSection {
                open_for: secs(v),
                ..base.clone()
            });
        }
        for v in [-0.1, 0.0, 1.0, 1.1] {
            cases.push(BreakerSection {
                min_success_rate: Fraction(v),
                ..base.clone()
            });
        }
        for s in cases {
            let settings = BreakerSettings::from_section(&s).validate();
            let expected = settings.err().map(|e| (e.field, e.message));
            assert_eq!(s.check().err(), expected, "{s:?}");
        }
    }

    fn settings() -> BreakerSettings {
        BreakerSettings {
            enabled: true,
            consecutive_failures: 3,
            min_success_rate: 0.0,
            min_requests: 1000,
            window: Duration::from_secs(10),
            open_for: Duration::from_millis(500),
            half_open_probes: 1,
        }
    }

    #[test]
    fn closed_open_half_open_then_closed_or_open_again() {
        failsafe::clock::freeze(|clock| {
            let b = Breaker::new("t", settings()).unwrap();
            assert_eq!(b.state(), BreakerState::Closed);
            // Application errors never open it.
            for _ in 0..10 {
                b.try_acquire()
                    .unwrap()
                    .record(Some(ErrorClass::InvalidRequest));
            }
            assert_eq!(b.state(), BreakerState::Closed);
            for _ in 0..3 {
                b.try_acquire()
                    .unwrap()
                    .record(Some(ErrorClass::WorkerCrashed));
            }
            assert_eq!(b.state(), BreakerState::Open);
            let wait = b.try_acquire().err().expect("open: rejected");
            assert!(
                wait <= Duration::from_millis(500) && wait > Duration::ZERO,
                "{wait:?}"
            );

            clock.advance(Duration::from_millis(501));
            let probe = b.try_acquire().expect("half-open lets a probe through");
            assert_eq!(b.state(), BreakerState::HalfOpen);
            assert!(b.try_acquire().is_err(), "only one probe at a time");
            probe.record(Some(ErrorClass::WorkerCrashed));
            assert_eq!(
                b.state(),
                BreakerState::Open,
                "a failed probe opens it again"
            );

            clock.advance(Duration::from_millis(501));
            b.try_acquire().unwrap().record(None);
            assert_eq!(b.state(), BreakerState::Closed, "a good probe closes it");
            assert_eq!(b.transitions(), 5);
        });
    }

    /// Issue 13, item 1: a probe whose future is dropped (a client's cancel, the
    /// shadow's timeout) must hand its half-open slot back, or the breaker refuses
    /// every later call for ever while readiness says it is fine.
    #[test]
    fn a_dropped_probe_gives_its_slot_back_and_records_nothing() {
        failsafe::clock::freeze(|clock| {
            let b = Breaker::new("t", settings()).unwrap();
            for _ in 0..3 {
                b.try_acquire()
                    .unwrap()
                    .record(Some(ErrorClass::WorkerCrashed));
            }
            clock.advance(Duration::from_millis(501));
            let probe = b.try_acquire().expect("half-open lets a probe through");
            assert_eq!(b.state(), BreakerState::HalfOpen);
            assert!(
                b.refusing(),
                "half-open with its only probe slot taken refuses calls: not ready"
            );
            drop(probe);
            assert!(!b.refusing(), "the slot is free again: ready to probe");
            clock.advance(Duration::from_secs(300));
            let probe = b
                .try_acquire()
                .expect("minutes later, the next call is let through as the probe");
            assert_eq!(
                b.state(),
                BreakerState::HalfOpen,
                "the dropped probe recorded nothing"
            );
            probe.record(None);
            assert_eq!(b.state(), BreakerState::Closed);
            assert!(b.try_acquire().is_ok());
        });
    }

    #[test]
    fn refuses_only_while_open_or_while_every_probe_slot_is_taken() {
        use BreakerState::*;
        assert!(!refuses(Closed, false, 0, 1));
        assert!(refuses(Open, false, 0, 1), "open, period not over");
        assert!(!refuses(Open, true, 0, 1), "open, due to probe");
        assert!(!refuses(HalfOpen, true, 0, 1));
        assert!(refuses(HalfOpen, true, 1, 1), "its only probe is in flight");
        assert!(
            !refuses(HalfOpen, true, 1, 2),
            "a second probe slot is free"
        );
    }

    #[test]
    fn a_low_success_rate_opens_it() {
        failsafe::clock::freeze(|clock| {
            let mut s = settings();
            s.consecutive_failures = 1000;
            s.min_success_rate = 0.9;
            s.min_requests = 10;
            let b = Breaker::new("t", s).unwrap();
            // Half the calls fail, spread over time (the success rate is a time-decayed
            // average, so calls at one frozen instant would carry no weight). The rule
            // decides only once a whole window (10 s) of data exists.
            for i in 0..100 {
                clock.advance(Duration::from_millis(200));
                let Ok(p) = b.try_acquire() else { break };
                p.record((i % 2 == 0).then_some(ErrorClass::WorkerTimeout));
            }
            assert_eq!(b.state(), BreakerState::Open);
        });
    }

    #[test]
    fn state_changes_are_exported_as_metrics() {
        use metrics_util::debugging::{DebugValue, DebuggingRecorder};
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        metrics::with_local_recorder(&recorder, || {
            failsafe::clock::freeze(|_| {
                let b = Breaker::new("legacy", settings()).unwrap();
                for _ in 0..3 {
                    b.try_acquire()
                        .unwrap()
                        .record(Some(ErrorClass::WorkerCrashed));
                }
            })
        });
        let mut state = None;
        let mut transitions = None;
        for (key, _, _, value) in snapshotter.snapshot().into_vec() {
            let labels: Vec<String> = key
                .key()
                .labels()
                .map(|l| format!("{}={}", l.key(), l.value()))
                .collect();
            assert!(labels.contains(&"backend=legacy".to_string()));
            assert!(labels.contains(&"scope=backend".to_string()));
            match (key.key().name(), value) {
                ("pitboss_circuit_state", DebugValue::Gauge(v)) => state = Some(v.into_inner()),
                ("pitboss_circuit_transitions_total", DebugValue::Counter(n)) => {
                    transitions = Some(n)
                }
                _ => {}
            }
        }
        assert_eq!(state, Some(2.0), "open");
        assert_eq!(transitions, Some(1));
    }

    #[test]
    fn settings_are_validated() {
        let mut s = settings();
        s.window = Duration::from_millis(500);
        assert!(Breaker::new("t", s).is_err());
    }
}
