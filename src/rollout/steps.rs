//! The walk of a rollout as configured: the `[promotion]` section of the flags, its
//! steps and the gates each step is judged by. Plain validated data, apart from the
//! flags (which hold it) and the decisions over it ([`super::promotion`]).

use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::bucket::Percent;
use crate::config::{Dur, Fraction};

/// Where a step puts the rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum StepAt {
    /// Shadow mode: legacy answers, new runs alongside and is compared.
    Shadow,
    /// Canary at this percentage of eligible keys.
    Percent(Percent),
}

impl StepAt {
    pub fn describe(self) -> String {
        match self {
            StepAt::Shadow => "shadow".into(),
            StepAt::Percent(p) => format!("{}%", p.as_f64()),
        }
    }
}

/// One step of the walk, with its own overrides of the section's settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    pub at: StepAt,
    pub min_duration: Option<Dur>,
    pub min_requests: Option<u64>,
    pub max_error_rate: Option<Fraction>,
    pub max_p99_ms: Option<u64>,
    pub max_relative_error_rate: Option<f64>,
    pub max_shadow_mismatch_rate: Option<Fraction>,
}

impl Step {
    fn plain(at: StepAt) -> Step {
        Step {
            at,
            min_duration: None,
            min_requests: None,
            max_error_rate: None,
            max_p99_ms: None,
            max_relative_error_rate: None,
            max_shadow_mismatch_rate: None,
        }
    }

    fn has_overrides(&self) -> bool {
        *self != Step::plain(self.at)
    }
}

/// Why a value is not a step.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum InvalidStep {
    #[error("a step is a percentage (1 to 100) or \"shadow\", got {0:?}")]
    Name(String),
    #[error(transparent)]
    Percent(#[from] super::bucket::InvalidPercent),
    #[error("a step of 0% sends nothing to new; start at 0.01 or more")]
    Zero,
    #[error("a step is a percentage, \"shadow\" or a table with `at`, got {0}")]
    Kind(String),
}

/// A step's `at` as written: a number (a percentage) or `"shadow"`.
fn step_at(v: &toml::Value) -> Result<StepAt, InvalidStep> {
    match v {
        toml::Value::String(s) if s == "shadow" => Ok(StepAt::Shadow),
        toml::Value::String(s) => Err(InvalidStep::Name(s.clone())),
        toml::Value::Integer(_) | toml::Value::Float(_) => {
            let p = v
                .as_float()
                .unwrap_or_else(|| v.as_integer().unwrap_or(0) as f64);
            let p = Percent::from_f64(p)?;
            if p == Percent::ZERO {
                return Err(InvalidStep::Zero);
            }
            Ok(StepAt::Percent(p))
        }
        other => Err(InvalidStep::Kind(other.to_string())),
    }
}

impl<'de> Deserialize<'de> for Step {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let v = toml::Value::deserialize(d)?;
        let toml::Value::Table(t) = v else {
            return step_at(&v).map(Step::plain).map_err(D::Error::custom);
        };
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Table {
            at: toml::Value,
            min_duration: Option<Dur>,
            min_requests: Option<u64>,
            max_error_rate: Option<Fraction>,
            max_p99_ms: Option<u64>,
            max_relative_error_rate: Option<f64>,
            max_shadow_mismatch_rate: Option<Fraction>,
        }
        let t = Table::deserialize(toml::Value::Table(t)).map_err(D::Error::custom)?;
        Ok(Step {
            at: step_at(&t.at).map_err(D::Error::custom)?,
            min_duration: t.min_duration,
            min_requests: t.min_requests,
            max_error_rate: t.max_error_rate,
            max_p99_ms: t.max_p99_ms,
            max_relative_error_rate: t.max_relative_error_rate,
            max_shadow_mismatch_rate: t.max_shadow_mismatch_rate,
        })
    }
}

impl Serialize for Step {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let at = |s: S| match self.at {
            StepAt::Shadow => s.serialize_str("shadow"),
            StepAt::Percent(p) => s.serialize_f64(p.as_f64()),
        };
        if !self.has_overrides() {
            return at(s);
        }
        let mut m = s.serialize_map(None)?;
        match self.at {
            StepAt::Shadow => m.serialize_entry("at", "shadow")?,
            StepAt::Percent(p) => m.serialize_entry("at", &p.as_f64())?,
        }
        if let Some(v) = &self.min_duration {
            m.serialize_entry("min_duration", v)?;
        }
        if let Some(v) = &self.min_requests {
            m.serialize_entry("min_requests", v)?;
        }
        if let Some(v) = &self.max_error_rate {
            m.serialize_entry("max_error_rate", v)?;
        }
        if let Some(v) = &self.max_p99_ms {
            m.serialize_entry("max_p99_ms", v)?;
        }
        if let Some(v) = &self.max_relative_error_rate {
            m.serialize_entry("max_relative_error_rate", v)?;
        }
        if let Some(v) = &self.max_shadow_mismatch_rate {
            m.serialize_entry("max_shadow_mismatch_rate", v)?;
        }
        m.end()
    }
}

/// The `[promotion]` section of the flags.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Promotion {
    /// The walk; empty: no automatic promotion (every step is an operator's).
    pub steps: Vec<Step>,
    /// How long each step runs at least.
    pub min_duration: Dur,
    /// New's calls needed in the window, at this step, before any verdict.
    pub min_requests: u64,
    /// Gate: new's error rate at most this.
    pub max_error_rate: Fraction,
    /// Gate: new's p99 at most this many ms; 0 = off.
    pub max_p99_ms: u64,
    /// Gate: new's rate of each error class at most this many times legacy's; 0 = off.
    pub max_relative_error_rate: f64,
    /// Gate, in shadow: mismatches over comparisons at most this.
    pub max_shadow_mismatch_rate: Fraction,
    /// Hold at this step (a percentage in `steps`) until an operator promotes; 0 = none.
    pub pause_at: f64,
}

/// Why a `[promotion]` section is not a walk: the key and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct InvalidPromotion {
    pub key: &'static str,
    pub message: String,
}

impl Promotion {
    /// The checks across keys: steps in order, shadow only first, `pause_at` a step.
    pub fn check(&self) -> Result<(), InvalidPromotion> {
        let bad = |key, message: String| Err(InvalidPromotion { key, message });
        for (i, pair) in self.steps.windows(2).enumerate() {
            if pair[1].at <= pair[0].at {
                return bad(
                    "promotion.steps",
                    format!(
                        "steps must rise (\"shadow\" first, then percentages): step {} ({}) does not come after {}",
                        i + 2,
                        pair[1].at.describe(),
                        pair[0].at.describe()
                    ),
                );
            }
        }
        let r = self.max_relative_error_rate;
        if !r.is_finite() || r < 0.0 {
            return bad(
                "promotion.max_relative_error_rate",
                "must be 0 (off) or positive".into(),
            );
        }
        for s in &self.steps {
            if let Some(r) = s.max_relative_error_rate {
                if !r.is_finite() || r < 0.0 {
                    return bad(
                        "promotion.steps",
                        format!(
                            "step {}: max_relative_error_rate must be 0 (off) or positive",
                            s.at.describe()
                        ),
                    );
                }
            }
        }
        if self.pause_at != 0.0 {
            let at = Percent::from_f64(self.pause_at).ok().map(StepAt::Percent);
            if !self.steps.iter().any(|s| Some(s.at) == at) {
                return bad(
                    "promotion.pause_at",
                    format!(
                        "pause_at = {} is not one of the steps; hold at a step, or 0 for none",
                        self.pause_at
                    ),
                );
            }
        }
        Ok(())
    }

    /// The settings of one step: its overrides over the section's.
    pub fn gates(&self, step: Option<&Step>) -> Gates {
        let s = step;
        Gates {
            min_duration: s
                .and_then(|s| s.min_duration)
                .unwrap_or(self.min_duration)
                .0,
            min_requests: s.and_then(|s| s.min_requests).unwrap_or(self.min_requests),
            max_error_rate: s
                .and_then(|s| s.max_error_rate)
                .unwrap_or(self.max_error_rate)
                .0,
            max_p99: Duration::from_millis(s.and_then(|s| s.max_p99_ms).unwrap_or(self.max_p99_ms)),
            max_relative_error_rate: s
                .and_then(|s| s.max_relative_error_rate)
                .unwrap_or(self.max_relative_error_rate),
            max_shadow_mismatch_rate: s
                .and_then(|s| s.max_shadow_mismatch_rate)
                .unwrap_or(self.max_shadow_mismatch_rate)
                .0,
        }
    }
}

/// The settings one step is judged by.
#[derive(Debug, Clone, PartialEq)]
pub struct Gates {
    pub min_duration: Duration,
    pub min_requests: u64,
    pub max_error_rate: f64,
    /// Zero: off.
    pub max_p99: Duration,
    /// Zero: off.
    pub max_relative_error_rate: f64,
    pub max_shadow_mismatch_rate: f64,
}

/// Where the rollout stands in its walk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    /// The step the rollout is on, when it is exactly on one.
    pub current: Option<usize>,
    /// The step a promotion goes to; `None` at the last step (or in `full`).
    pub next: Option<usize>,
}

/// Where a rollout at `here` (`None`: off) stands in `steps`.
pub fn position_in(here: Option<StepAt>, steps: &[Step]) -> Position {
    let current = here.and_then(|h| steps.iter().position(|s| s.at == h));
    let next = match here {
        None => (!steps.is_empty()).then_some(0),
        Some(h) => steps.iter().position(|s| s.at > h),
    };
    Position { current, next }
}
