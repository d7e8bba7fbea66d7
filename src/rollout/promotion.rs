//! Automatic step promotion: the `[promotion]` section of the flags, and the pure
//! decision that walks a rollout through its steps.
//!
//! A walk is a list of steps (`steps = ["shadow", 1, 5, 25, 50, 100]`). At each step
//! new must show, over its rolling window and on this step's traffic only, at least
//! `min_requests` calls, for at least `min_duration`, with every gate passing (error
//! rate, p99, error rate relative to legacy, and in shadow the mismatch rate). Then it
//! moves to the next step. A gate that fails on enough data rolls back. Too little
//! data decides nothing, in either direction: no traffic means no promotion and no
//! rollback. `pause_at` holds the walk at a step until an operator promotes it.
//!
//! [`decide`] is pure: the caller gives it the flags, how long the current step has
//! run, and the statistics (this instance's, or the whole tier's).

use std::time::Duration;

use super::bucket::Percent;
pub use super::flags::position;
use super::flags::{Flags, Mode, RolloutState};
use super::stats::{first_breach, fmt_duration, pct, Thresholds, WindowStats};
pub use super::steps::{Gates, InvalidPromotion, InvalidStep, Position, Promotion, Step, StepAt};

/// The step index the `pitboss_rollout_step` gauge shows: 1-based, 0 when the rollout
/// is not on a step.
pub fn step_number(flags: &Flags) -> usize {
    position(flags).current.map(|i| i + 1).unwrap_or(0)
}

/// What the walk does now.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// No walk: no steps, not active, `off`, `full`, or shadow without a shadow step.
    Idle,
    /// At the last step: nothing more to promote.
    Done,
    /// Not yet: too little time or data (why).
    Wait(String),
    /// Held by `pause_at` until an operator promotes.
    Hold(String),
    /// Move to the next step.
    Promote { to: StepAt, reason: String },
    /// A gate failed on enough data.
    Rollback(String),
}

impl Verdict {
    /// What an operator reads about the walk (`GetRollout`'s `promotion`).
    pub fn describe(&self) -> String {
        match self {
            Verdict::Idle => String::new(),
            Verdict::Done => "at the last step".into(),
            Verdict::Wait(why) => format!("waiting: {why}"),
            Verdict::Hold(why) => format!("held: {why}"),
            Verdict::Promote { to, reason } => format!("promoting to {}: {reason}", to.describe()),
            Verdict::Rollback(why) => format!("gate failed: {why}"),
        }
    }
}

/// The walk's decision, pure. `at_step` is how long the rollout has been at this step
/// (the statistics cover this step only); `new` and `legacy` are the window's totals.
///
/// Order: no walk → `Idle`; too few of new's calls → `Wait` (no verdict without
/// data, either way); a failing gate → `Rollback`; the last step → `Done`; too
/// short → `Wait`; `pause_at` → `Hold`; else `Promote`.
pub fn decide(
    flags: &Flags,
    at_step: Duration,
    new: &WindowStats,
    legacy: &WindowStats,
) -> Verdict {
    let promo = &flags.promotion;
    if promo.steps.is_empty() || flags.status.state != RolloutState::Active {
        return Verdict::Idle;
    }
    let pos = position(flags);
    let walking = match flags.mode {
        Mode::Off | Mode::Full => false,
        Mode::Shadow => pos.current.is_some(),
        Mode::Canary => true,
    };
    if !walking {
        return Verdict::Idle;
    }
    let step = pos.current.map(|i| &promo.steps[i]);
    let g = promo.gates(step);
    if new.requests < g.min_requests {
        return Verdict::Wait(format!(
            "new has {} of the {} calls this step needs in the window",
            new.requests, g.min_requests
        ));
    }
    if let Some(why) = failing_gate(&g, flags.mode, new, legacy) {
        return Verdict::Rollback(why);
    }
    let Some(next) = pos.next else {
        return Verdict::Done;
    };
    if at_step < g.min_duration {
        return Verdict::Wait(format!(
            "healthy; {} of the step's {} done",
            fmt_duration(at_step),
            fmt_duration(g.min_duration)
        ));
    }
    let here = StepAt::Percent(flags.percent.0);
    if flags.mode == Mode::Canary
        && promo.pause_at != 0.0
        && Percent::from_f64(promo.pause_at).ok().map(StepAt::Percent) == Some(here)
    {
        return Verdict::Hold(format!(
            "pause_at = {}: `pitboss rollout promote` to go on",
            promo.pause_at
        ));
    }
    let to = promo.steps[next].at;
    Verdict::Promote {
        to,
        reason: format!(
            "healthy for {}: new {} errors over {} calls{}",
            fmt_duration(at_step),
            new.error_rate().map(pct).unwrap_or_else(|| "-".into()),
            new.requests,
            new.p99
                .map(|p| format!(", p99 {}", fmt_duration(p)))
                .unwrap_or_default()
        ),
    }
}

/// The first gate `new` fails, as a reason; `None` when all pass.
pub fn failing_gate(
    g: &Gates,
    mode: Mode,
    new: &WindowStats,
    legacy: &WindowStats,
) -> Option<String> {
    if new.requests == 0 {
        return None; // no data, no verdict
    }
    let over = format!("over {} calls", new.requests);
    let limits = Thresholds {
        max_error_rate: g.max_error_rate,
        max_p99: g.max_p99,
        max_relative_error_rate: g.max_relative_error_rate,
        min_requests: g.min_requests,
    };
    if let Some(why) = first_breach(&limits, &over, new, legacy) {
        return Some(format!("gate: {why}"));
    }
    if mode == Mode::Shadow {
        let compared = new.shadow_matches + new.shadow_mismatches;
        if compared > 0 {
            let rate = new.shadow_mismatches as f64 / compared as f64;
            if rate > g.max_shadow_mismatch_rate {
                return Some(format!(
                    "gate: shadow mismatch rate {} > {} over {compared} comparisons",
                    pct(rate),
                    pct(g.max_shadow_mismatch_rate)
                ));
            }
        }
    }
    None
}

/// The flags after a promotion to `to`, pure.
pub fn promoted(flags: &Flags, to: StepAt, reason: &str, actor: &str, now: &str) -> Flags {
    let mut f = flags.clone();
    f.go_to(to);
    f.status.reason = format!("promoted to {}: {reason}", to.describe());
    f.status.changed_at = now.to_string();
    f.status.changed_by = actor.to_string();
    f.status.step_started_at = now.to_string();
    f
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Dur;
    use crate::resilience::ErrorClass;

    fn flags(text: &str) -> Flags {
        Flags::parse("flags.toml", text).unwrap()
    }

    const WALK: &str = "mode = \"canary\"\npercent = 5.0\ncommands = [\"*\"]\n\
        [promotion]\nsteps = [1, 5, 25, 50, 100]\nmin_duration = \"30s\"\nmin_requests = 50\n\
        max_error_rate = 0.02\n";

    fn stats(requests: u64, errors: u64) -> WindowStats {
        WindowStats {
            requests,
            errors,
            by_class: (errors > 0)
                .then(|| (ErrorClass::WorkerCrashed.name(), errors))
                .into_iter()
                .collect(),
            p50: (requests > 0).then(|| Duration::from_millis(5)),
            p99: (requests > 0).then(|| Duration::from_millis(20)),
            window: Duration::from_secs(60),
            ..WindowStats::default()
        }
    }

    const S: fn(u64) -> Duration = Duration::from_secs;

    #[test]
    fn steps_parse_as_numbers_shadow_or_tables_and_round_trip() {
        let f = flags(
            "[promotion]\nsteps = [\"shadow\", 1, 5.5, { at = 50, min_duration = \"10m\" }, 100]\n\
             pause_at = 50\n",
        );
        let at: Vec<StepAt> = f.promotion.steps.iter().map(|s| s.at).collect();
        let p = |v| StepAt::Percent(Percent::from_f64(v).unwrap());
        assert_eq!(at, vec![StepAt::Shadow, p(1.0), p(5.5), p(50.0), p(100.0)]);
        assert_eq!(
            f.promotion.steps[3].min_duration,
            Some(Dur(Duration::from_secs(600)))
        );
        let again = Flags::parse("f", &f.to_toml()).unwrap();
        assert_eq!(again, f);
    }

    #[test]
    fn bad_steps_are_refused_with_the_key() {
        for (text, says) in [
            ("[promotion]\nsteps = [5, 1]\n", "must rise"),
            ("[promotion]\nsteps = [1, \"shadow\"]\n", "must rise"),
            ("[promotion]\nsteps = [0, 5]\n", "0%"),
            ("[promotion]\nsteps = [150]\n", "between 0 and 100"),
            ("[promotion]\nsteps = [\"canary\"]\n", "\"shadow\""),
            (
                "[promotion]\nsteps = [1, 5]\npause_at = 3\n",
                "not one of the steps",
            ),
            (
                "[promotion]\nsteps = [{ at = 1, min_requets = 5 }]\n",
                "min_requets",
            ),
        ] {
            let err = Flags::parse("flags.toml", text).unwrap_err();
            assert!(err.to_string().contains(says), "{text}: {err}");
            assert!(
                err.key.as_deref().unwrap_or("").starts_with("promotion"),
                "{text}: {err}"
            );
        }
    }

    #[test]
    fn positions_along_the_walk() {
        let mut f = flags(WALK);
        assert_eq!(
            position(&f),
            Position {
                current: Some(1),
                next: Some(2)
            }
        );
        assert_eq!(step_number(&f), 2);
        f.percent = super::super::flags::PercentValue(Percent::from_f64(10.0).unwrap());
        assert_eq!(
            position(&f),
            Position {
                current: None,
                next: Some(2)
            }
        );
        f.mode = Mode::Off;
        assert_eq!(
            position(&f),
            Position {
                current: None,
                next: Some(0)
            }
        );
        f.mode = Mode::Full;
        assert_eq!(
            position(&f),
            Position {
                current: Some(4),
                next: None
            }
        );
    }

    #[test]
    fn no_verdict_without_data_either_way() {
        let f = flags(WALK);
        for new in [stats(0, 0), stats(49, 49)] {
            let v = decide(&f, S(3600), &new, &stats(1000, 0));
            assert!(matches!(v, Verdict::Wait(_)), "{v:?}");
        }
    }

    #[test]
    fn a_healthy_step_promotes_after_its_duration() {
        let f = flags(WALK);
        let v = decide(&f, S(10), &stats(100, 1), &stats(0, 0));
        assert!(
            matches!(&v, Verdict::Wait(w) if w.contains("10s of the step's 30s")),
            "{v:?}"
        );
        let v = decide(&f, S(30), &stats(100, 1), &stats(0, 0));
        let Verdict::Promote { to, reason } = v else {
            panic!("{v:?}")
        };
        assert_eq!(to, StepAt::Percent(Percent::from_f64(25.0).unwrap()));
        assert!(reason.contains("1.0% errors over 100 calls"), "{reason}");
    }

    #[test]
    fn a_failing_gate_rolls_back_at_once_and_the_last_step_is_done() {
        let f = flags(WALK);
        let v = decide(&f, S(1), &stats(100, 3), &stats(0, 0));
        assert!(
            matches!(&v, Verdict::Rollback(r) if r.contains("error rate 3.0% > 2.0%")),
            "{v:?}"
        );
        let mut last = f.clone();
        last.go_to(StepAt::Percent(Percent::ALL));
        assert_eq!(
            decide(&last, S(3600), &stats(100, 0), &stats(0, 0)),
            Verdict::Done
        );
        assert!(matches!(
            decide(&last, S(3600), &stats(100, 10), &stats(0, 0)),
            Verdict::Rollback(_)
        ));
    }

    #[test]
    fn pause_at_holds_and_states_other_than_active_idle() {
        let f = flags(&format!("{WALK}pause_at = 5\n"));
        let v = decide(&f, S(60), &stats(100, 0), &stats(0, 0));
        assert!(
            matches!(&v, Verdict::Hold(h) if h.contains("promote")),
            "{v:?}"
        );
        let mut paused = f.clone();
        paused.status.state = RolloutState::Paused;
        assert_eq!(
            decide(&paused, S(60), &stats(100, 50), &stats(0, 0)),
            Verdict::Idle
        );
        let none = flags("mode = \"canary\"\npercent = 5.0\n");
        assert_eq!(
            decide(&none, S(60), &stats(100, 0), &stats(0, 0)),
            Verdict::Idle
        );
    }

    #[test]
    fn shadow_steps_gate_on_mismatches_and_lead_to_the_first_percentage() {
        let f = flags(
            "mode = \"shadow\"\ncommands = [\"*\"]\n[promotion]\nsteps = [\"shadow\", 10, 100]\n\
             min_duration = \"1s\"\nmin_requests = 10\nmax_shadow_mismatch_rate = 0.1\n",
        );
        let mut new = stats(20, 0);
        new.shadow_matches = 19;
        new.shadow_mismatches = 1;
        let v = decide(&f, S(2), &new, &stats(20, 0));
        assert!(
            matches!(v, Verdict::Promote { to: StepAt::Percent(p), .. } if p.as_f64() == 10.0),
            "{v:?}"
        );
        new.shadow_matches = 10;
        new.shadow_mismatches = 10;
        let v = decide(&f, S(2), &new, &stats(20, 0));
        assert!(
            matches!(&v, Verdict::Rollback(r) if r.contains("mismatch rate 50.0%")),
            "{v:?}"
        );
    }

    #[test]
    fn per_step_overrides_win() {
        let f = flags(
            "mode = \"canary\"\npercent = 1.0\n[promotion]\n\
             steps = [{ at = 1, min_requests = 5, max_p99_ms = 10 }, 100]\nmin_requests = 1000\n",
        );
        let v = decide(&f, S(3600), &stats(10, 0), &stats(0, 0));
        assert!(
            matches!(&v, Verdict::Rollback(r) if r.contains("p99 latency 20ms > 10ms")),
            "{v:?}"
        );
    }

    #[test]
    fn the_relative_gate_compares_with_legacy() {
        let f = flags(
            "mode = \"canary\"\npercent = 5.0\n[promotion]\nsteps = [5, 100]\n\
             min_requests = 50\nmax_error_rate = 0.5\nmax_relative_error_rate = 2.0\n",
        );
        let v = decide(&f, S(60), &stats(100, 10), &stats(1000, 10));
        assert!(
            matches!(&v, Verdict::Rollback(r) if r.contains("legacy's")),
            "{v:?}"
        );
    }
}
