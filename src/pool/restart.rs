//! Restart decisions for a crashed worker: exponential backoff, and OTP-style crash-loop
//! protection (at most R restarts in T, then "degraded" and slow retries).
//!
//! Pure functions over `tokio::time::Instant`, so tests drive them with paused time.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

/// Validated restart settings.
#[derive(Debug, Clone, PartialEq)]
pub struct RestartPolicy {
    /// Delay before the first restart after a crash.
    pub backoff_base: Duration,
    /// The delay doubles per consecutive crash up to this cap.
    pub backoff_max: Duration,
    /// Fraction of the delay removed at random (0 = deterministic, 0.2 = up to 20% less),
    /// so a fleet of crashed workers does not restart in lock-step.
    pub jitter: f64,
    /// More than this many crashes within `window` marks the slot degraded.
    pub max_restarts: u32,
    pub window: Duration,
    /// While degraded, restarts are attempted this often.
    pub degraded_interval: Duration,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        RestartPolicy {
            backoff_base: Duration::from_millis(100),
            backoff_max: Duration::from_secs(10),
            jitter: 0.2,
            max_restarts: 5,
            window: Duration::from_secs(60),
            degraded_interval: Duration::from_secs(30),
        }
    }
}

/// `base * 2^(attempt-1)`, capped; `attempt` counts consecutive crashes from 1.
pub fn backoff_delay(attempt: u32, base: Duration, max: Duration) -> Duration {
    let factor = 1u32
        .checked_shl(attempt.saturating_sub(1))
        .unwrap_or(u32::MAX);
    base.checked_mul(factor).unwrap_or(max).min(max)
}

/// Removes up to `jitter` of `delay`, given a uniform sample in [0, 1).
pub fn apply_jitter(delay: Duration, jitter: f64, sample: f64) -> Duration {
    delay.mul_f64(1.0 - jitter.clamp(0.0, 1.0) * sample.clamp(0.0, 1.0))
}

/// What to do after a worker exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestartDecision {
    pub delay: Duration,
    pub degraded: bool,
}

/// The crash history of one pool slot.
#[derive(Debug, Clone)]
pub struct RestartTracker {
    policy: RestartPolicy,
    crashes: VecDeque<Instant>,
    consecutive: u32,
}

impl RestartTracker {
    pub fn new(policy: RestartPolicy) -> Self {
        RestartTracker {
            policy,
            crashes: VecDeque::new(),
            consecutive: 0,
        }
    }

    /// A worker crashed (or failed to start) at `now` after running for `uptime`.
    /// `sample` is a uniform random number in [0, 1) for jitter.
    pub fn on_crash(&mut self, now: Instant, uptime: Duration, sample: f64) -> RestartDecision {
        // A worker that ran for a whole window was healthy: start the backoff over.
        if uptime >= self.policy.window {
            self.consecutive = 0;
        }
        self.consecutive = self.consecutive.saturating_add(1);
        self.crashes.push_back(now);
        self.trim(now);
        if self.is_degraded(now) {
            return RestartDecision {
                delay: self.policy.degraded_interval,
                degraded: true,
            };
        }
        let delay = backoff_delay(
            self.consecutive,
            self.policy.backoff_base,
            self.policy.backoff_max,
        );
        RestartDecision {
            delay: apply_jitter(delay, self.policy.jitter, sample),
            degraded: false,
        }
    }

    /// A deliberate exit (recycling): restart at once, and the crash streak ends.
    pub fn on_planned_exit(&mut self) -> RestartDecision {
        self.consecutive = 0;
        RestartDecision {
            delay: Duration::ZERO,
            degraded: false,
        }
    }

    /// More than `max_restarts` crashes within the window ending at `now`.
    pub fn is_degraded(&self, now: Instant) -> bool {
        let recent = self
            .crashes
            .iter()
            .filter(|t| now.saturating_duration_since(**t) < self.policy.window)
            .count();
        recent > self.policy.max_restarts as usize
    }

    /// Crashes inside the current window.
    pub fn recent_crashes(&self, now: Instant) -> usize {
        self.crashes
            .iter()
            .filter(|t| now.saturating_duration_since(**t) < self.policy.window)
            .count()
    }

    fn trim(&mut self, now: Instant) {
        while let Some(first) = self.crashes.front() {
            if now.saturating_duration_since(*first) >= self.policy.window {
                self.crashes.pop_front();
            } else {
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RestartPolicy {
        RestartPolicy {
            backoff_base: Duration::from_millis(100),
            backoff_max: Duration::from_secs(2),
            jitter: 0.0,
            max_restarts: 3,
            window: Duration::from_secs(10),
            degraded_interval: Duration::from_secs(30),
        }
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let ms =
            |a| backoff_delay(a, Duration::from_millis(100), Duration::from_secs(2)).as_millis();
        assert_eq!(
            [ms(1), ms(2), ms(3), ms(4), ms(5), ms(6)],
            [100, 200, 400, 800, 1600, 2000]
        );
        assert_eq!(ms(40), 2000, "no overflow for huge attempt counts");
        assert_eq!(ms(0), 100);
    }

    #[test]
    fn jitter_only_shortens_within_bounds() {
        let d = Duration::from_millis(1000);
        assert_eq!(apply_jitter(d, 0.0, 0.99), d);
        assert_eq!(apply_jitter(d, 0.2, 0.0), d);
        assert_eq!(apply_jitter(d, 0.2, 0.5), Duration::from_millis(900));
        assert!(apply_jitter(d, 0.2, 0.999_999) >= Duration::from_millis(800));
    }

    #[tokio::test(start_paused = true)]
    async fn crash_loop_marks_degraded_then_recovers_as_the_window_passes() {
        let mut t = RestartTracker::new(policy());
        let up = Duration::from_millis(50);
        let mut delays = vec![];
        for _ in 0..3 {
            let d = t.on_crash(Instant::now(), up, 0.5);
            assert!(!d.degraded);
            delays.push(d.delay.as_millis());
            tokio::time::advance(d.delay).await;
        }
        assert_eq!(delays, [100, 200, 400]);
        // The fourth crash within 10 s exceeds max_restarts = 3.
        let d = t.on_crash(Instant::now(), up, 0.5);
        assert_eq!(
            d,
            RestartDecision {
                delay: Duration::from_secs(30),
                degraded: true
            }
        );
        assert!(t.is_degraded(Instant::now()));
        tokio::time::advance(Duration::from_secs(11)).await;
        assert!(
            !t.is_degraded(Instant::now()),
            "old crashes leave the window"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_long_healthy_run_resets_the_backoff() {
        let mut t = RestartTracker::new(policy());
        assert_eq!(
            t.on_crash(Instant::now(), Duration::ZERO, 0.0)
                .delay
                .as_millis(),
            100
        );
        assert_eq!(
            t.on_crash(Instant::now(), Duration::ZERO, 0.0)
                .delay
                .as_millis(),
            200
        );
        tokio::time::advance(Duration::from_secs(20)).await;
        let d = t.on_crash(Instant::now(), Duration::from_secs(20), 0.0);
        assert_eq!(d.delay.as_millis(), 100);
        assert_eq!(t.recent_crashes(Instant::now()), 1);
    }

    #[test]
    fn planned_exits_restart_at_once_and_end_the_streak() {
        let mut t = RestartTracker::new(policy());
        let now = Instant::now();
        t.on_crash(now, Duration::ZERO, 0.0);
        assert_eq!(t.on_planned_exit().delay, Duration::ZERO);
        assert_eq!(t.on_crash(now, Duration::ZERO, 0.0).delay.as_millis(), 100);
    }
}
