//! The statistics one instance publishes for the tier's analysis, and their sum.
//!
//! Each instance publishes its window totals per backend: calls, failures by class,
//! the latency histogram (fixed buckets, identical everywhere, so histograms add up)
//! and shadow comparisons, tagged with the step they were counted at
//! ([`super::flags::step_key`]). The analyser sums the statistics of the step in
//! force only: an instance that has not applied the latest step yet, or still
//! counts the previous one, adds nothing to the verdict. Pure.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::stats::WindowStats;
use crate::resilience::ErrorClass;

/// One backend's window totals, as published.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PublishedStats {
    pub requests: u64,
    pub errors: u64,
    pub by_class: BTreeMap<String, u64>,
    /// Bucket index → calls (the buckets of [`super::stats`]).
    pub latency: BTreeMap<usize, u64>,
    pub window_ms: u64,
    pub shadow_matches: u64,
    pub shadow_mismatches: u64,
}

impl From<&WindowStats> for PublishedStats {
    fn from(w: &WindowStats) -> PublishedStats {
        PublishedStats {
            requests: w.requests,
            errors: w.errors,
            by_class: w
                .by_class
                .iter()
                .map(|(k, v)| (k.to_string(), *v))
                .collect(),
            latency: w.latency.clone(),
            window_ms: u64::try_from(w.window.as_millis()).unwrap_or(u64::MAX),
            shadow_matches: w.shadow_matches,
            shadow_mismatches: w.shadow_mismatches,
        }
    }
}

impl PublishedStats {
    /// Back into window totals. A class this build does not know (a newer peer) is
    /// left out of the classes, still counted in the calls and errors.
    pub fn to_window(&self) -> WindowStats {
        let mut w = WindowStats {
            requests: self.requests,
            errors: self.errors,
            by_class: self
                .by_class
                .iter()
                .filter_map(|(k, v)| Some((ErrorClass::from_name(k)?.name(), *v)))
                .collect(),
            window: Duration::from_millis(self.window_ms),
            shadow_matches: self.shadow_matches,
            shadow_mismatches: self.shadow_mismatches,
            ..WindowStats::default()
        };
        // Merging into empty totals computes the quantiles from the histogram.
        let hist = WindowStats {
            latency: self.latency.clone(),
            window: w.window,
            ..WindowStats::default()
        };
        w.merge(&hist);
        w
    }
}

/// What one instance publishes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Published {
    pub instance: String,
    /// The step the statistics were counted at ([`super::flags::step_key`]).
    pub step: String,
    /// When, RFC 3339 (for operators reading the key).
    pub at: String,
    pub legacy: PublishedStats,
    pub new: PublishedStats,
}

/// The tier's totals of one step.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TierTotals {
    pub legacy: WindowStats,
    pub new: WindowStats,
    /// Instances whose statistics are in the sum.
    pub instances: usize,
    /// Instances left out: they counted another step.
    pub other_step: usize,
}

/// The sum of every instance's statistics at `step`.
pub fn sum(all: &[Published], step: &str) -> TierTotals {
    let mut t = TierTotals::default();
    for p in all {
        if p.step != step {
            t.other_step += 1;
            continue;
        }
        t.instances += 1;
        t.legacy.merge(&p.legacy.to_window());
        t.new.merge(&p.new.to_window());
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rollout::stats::RollingStats;
    use tokio::time::Instant;

    #[test]
    fn three_instances_below_min_requests_add_up_to_the_tier() {
        let t = Instant::now();
        let published: Vec<Published> = (0..3)
            .map(|i| {
                let new = RollingStats::new(Duration::from_secs(30));
                for _ in 0..10 {
                    new.record(
                        t,
                        Duration::from_millis(2 + i),
                        Some(ErrorClass::PythonException),
                    );
                }
                let p = Published {
                    instance: format!("i{i}"),
                    step: "canary/10000/active/t0".into(),
                    new: (&new.snapshot(t)).into(),
                    ..Default::default()
                };
                // Through JSON, as it travels.
                serde_json::from_str(&serde_json::to_string(&p).unwrap()).unwrap()
            })
            .chain(std::iter::once(Published {
                instance: "late".into(),
                step: "canary/500/active/older".into(),
                new: PublishedStats {
                    requests: 1000,
                    ..Default::default()
                },
                ..Default::default()
            }))
            .collect();
        let tier = sum(&published, "canary/10000/active/t0");
        assert_eq!((tier.instances, tier.other_step), (3, 1));
        assert_eq!((tier.new.requests, tier.new.errors), (30, 30));
        assert_eq!(tier.new.by_class.get("python_exception"), Some(&30));
        assert_eq!(tier.new.window, Duration::from_secs(30));
        let p99 = tier.new.p99.unwrap();
        assert!(
            p99 >= Duration::from_millis(4) && p99 <= Duration::from_micros(4400),
            "{p99:?}"
        );
        assert_eq!(tier.legacy.requests, 0);
        assert_eq!(tier.legacy.p99, None, "no data, no quantile");
    }
}
