//! Per-worker outlier ejection: the worker-level breaker.
//!
//! A worker that is alive but fails K times in a row with a system-class error (one
//! whose row counts against breakers) is taken out of general rotation for a
//! cool-down, then tried again. Never more than a configured share of the pool is
//! ejected at once. A worker ejected too often is drained and replaced. This is
//! separate from crash restarts: a dead worker is replaced by its supervisor anyway.

use std::time::Duration;

use dashmap::DashMap;

use super::class::ErrorClass;
use crate::config::BreakerSection;
use crate::pool::Pool;
use crate::worker::WorkerId;

#[derive(Debug, Clone, PartialEq)]
pub struct OutlierSettings {
    /// Consecutive system failures that eject a worker (0 = never eject).
    pub consecutive_failures: u32,
    pub cooldown: Duration,
    /// The largest share of the pool that may be ejected at once.
    pub max_ejected_share: f64,
    /// After this many ejections, the worker is replaced (0 = never).
    pub replace_after: u32,
}

impl Default for OutlierSettings {
    fn default() -> Self {
        OutlierSettings {
            consecutive_failures: 5,
            cooldown: Duration::from_secs(10),
            max_ejected_share: 0.5,
            replace_after: 3,
        }
    }
}

// === conversion from the config file's `[circuit_breaker]` section ===

impl OutlierSettings {
    /// The `worker_*` keys of `[circuit_breaker]`.
    pub fn from_section(b: &BreakerSection) -> OutlierSettings {
        OutlierSettings {
            consecutive_failures: b.worker_consecutive_failures,
            cooldown: b.worker_cooldown.0,
            max_ejected_share: b.max_ejected_share.0,
            replace_after: b.worker_replace_after,
        }
    }
}

/// What the detector decided after one outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Keep,
    Eject,
    Replace,
}

#[derive(Debug, Default, Clone, Copy)]
struct Record {
    consecutive: u32,
    ejections: u32,
}

/// Consecutive-failure counts per worker.
#[derive(Debug, Default)]
pub struct OutlierDetector {
    settings: OutlierSettings,
    records: DashMap<WorkerId, Record>,
}

impl OutlierDetector {
    pub fn new(settings: OutlierSettings) -> Self {
        OutlierDetector {
            settings,
            records: DashMap::new(),
        }
    }

    /// Records one outcome on `worker` (`None` = success) and decides. Pure apart from
    /// the counters, so it is unit-tested without a pool.
    pub fn observe(&self, worker: WorkerId, failure: Option<ErrorClass>) -> Verdict {
        let k = self.settings.consecutive_failures;
        if k == 0 {
            return Verdict::Keep;
        }
        let mut r = self.records.entry(worker).or_default();
        match failure {
            Some(class) if class.row().breaker => {
                r.consecutive += 1;
                if r.consecutive < k {
                    return Verdict::Keep;
                }
                r.consecutive = 0;
                r.ejections += 1;
                if self.settings.replace_after > 0 && r.ejections >= self.settings.replace_after {
                    Verdict::Replace
                } else {
                    Verdict::Eject
                }
            }
            _ => {
                r.consecutive = 0;
                Verdict::Keep
            }
        }
    }

    /// Observes and acts on the pool.
    pub fn apply(&self, pool: &Pool, worker: WorkerId, failure: Option<ErrorClass>) {
        match self.observe(worker, failure) {
            Verdict::Keep => {}
            Verdict::Eject => {
                pool.eject(
                    worker,
                    self.settings.cooldown,
                    self.settings.max_ejected_share,
                );
            }
            Verdict::Replace => {
                tracing::warn!(worker = %worker, "worker ejected {} times; replacing it", self.settings.replace_after);
                self.records.remove(&worker);
                pool.replace(worker);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn k_system_failures_in_a_row_eject_and_repeat_offenders_are_replaced() {
        let d = OutlierDetector::new(OutlierSettings {
            consecutive_failures: 3,
            replace_after: 2,
            ..Default::default()
        });
        let w = WorkerId(1);
        let fail = Some(ErrorClass::WorkerTimeout);
        assert_eq!(d.observe(w, fail), Verdict::Keep);
        assert_eq!(
            d.observe(w, None),
            Verdict::Keep,
            "a success resets the streak"
        );
        assert_eq!(d.observe(w, fail), Verdict::Keep);
        assert_eq!(
            d.observe(w, Some(ErrorClass::InvalidRequest)),
            Verdict::Keep
        );
        assert_eq!(
            d.observe(w, fail),
            Verdict::Keep,
            "application errors reset it too"
        );
        assert_eq!(d.observe(w, fail), Verdict::Keep);
        assert_eq!(d.observe(w, fail), Verdict::Eject);
        for _ in 0..2 {
            d.observe(w, fail);
        }
        assert_eq!(d.observe(w, fail), Verdict::Replace);
        assert_eq!(d.observe(WorkerId(2), fail), Verdict::Keep, "per worker");
    }
}
