//! The rollout flags file (`config/flags.toml`), parsed into validated types, and the
//! pure routing decision that reads it.

use std::collections::BTreeSet;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::bucket::{bucket, in_new, Percent, BUCKETS};
use super::steps::{position_in, Position, Promotion, StepAt};
use crate::config::{line_of_key, locate, span_error, ConfigError, Dur, Fraction};

/// The embedded default flags: everything on legacy.
pub const DEFAULT_FLAGS: &str = include_str!("../../config/flags.toml");

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Off,
    Shadow,
    Canary,
    Full,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RolloutState {
    Active,
    Paused,
    RolledBack,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compare {
    Bytes,
    Json,
}

/// A percentage in the file, validated into [`Percent`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PercentValue(pub Percent);

impl<'de> Deserialize<'de> for PercentValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = f64::deserialize(d)?;
        Percent::from_f64(v)
            .map(PercentValue)
            .map_err(serde::de::Error::custom)
    }
}

impl Serialize for PercentValue {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(self.0.as_f64())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Shadow {
    pub sample_percent: PercentValue,
    pub compare: Compare,
    pub ignore_fields: Vec<String>,
    pub only_idempotent: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rollback {
    pub error_rate_threshold: Fraction,
    pub latency_p99_threshold_ms: u64,
    pub min_requests: u64,
    pub window: Dur,
    pub relative_error_rate: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Status {
    pub state: RolloutState,
    pub reason: String,
    pub changed_at: String,
    pub changed_by: String,
    /// When the rollout entered its current step (mode, percentage or state last
    /// changed through pitboss): for operators and the "stuck at a step" alert. The
    /// walk itself times a step on each instance's own clock.
    pub step_started_at: String,
}

/// The whole flags file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Flags {
    pub mode: Mode,
    pub percent: PercentValue,
    pub commands: BTreeSet<String>,
    pub salt: String,
    pub fallback_to_legacy: bool,
    pub shadow: Shadow,
    pub rollback: Rollback,
    pub promotion: Promotion,
    pub status: Status,
}

impl Flags {
    /// Parses a flags file; keys it leaves out keep their defaults. Errors name the
    /// file, line and key.
    pub fn parse(origin: &str, text: &str) -> Result<Flags, ConfigError> {
        Flags::parse_with_status(origin, text, None)
    }

    /// Parses a reloaded file. The `[status]` keys it leaves out keep the values in
    /// force (`current`), not the defaults: only an explicit `state` (or a resume)
    /// changes the state, so an edit of the percentage, the mode or the commands
    /// never resumes a rolled-back or paused rollout.
    pub fn parse_reload(origin: &str, text: &str, current: &Flags) -> Result<Flags, ConfigError> {
        Flags::parse_with_status(origin, text, Some(&current.status))
    }

    fn parse_with_status(
        origin: &str,
        text: &str,
        status: Option<&Status>,
    ) -> Result<Flags, ConfigError> {
        let defaults: toml::Table =
            DEFAULT_FLAGS
                .parse()
                .map_err(|e: toml::de::Error| ConfigError {
                    origin: "<embedded flags>".into(),
                    line: None,
                    key: None,
                    message: e.to_string(),
                })?;
        let user: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| span_error(origin, text, &e))?;
        let mut merged = defaults;
        if let Some(status) = status.and_then(|s| toml::Value::try_from(s).ok()) {
            merged.insert("status".into(), status);
        }
        for (k, v) in user {
            match (merged.get_mut(&k), v) {
                (Some(toml::Value::Table(base)), toml::Value::Table(over)) => base.extend(over),
                (_, v) => {
                    merged.insert(k, v);
                }
            }
        }
        let flags = Flags::deserialize(toml::Value::Table(merged))
            .map_err(|e| locate(origin, text, &e.to_string()))?;
        let r = flags.rollback.relative_error_rate;
        if !r.is_finite() || r < 0.0 {
            return Err(ConfigError {
                origin: origin.into(),
                line: line_of_key(text, "relative_error_rate"),
                key: Some("rollback.relative_error_rate".into()),
                message: "must be 0 (off) or positive".into(),
            });
        }
        if let Err(e) = flags.promotion.check() {
            let leaf = e.key.rsplit('.').next().unwrap_or(e.key);
            return Err(ConfigError {
                origin: origin.into(),
                line: line_of_key(text, leaf),
                key: Some(e.key.into()),
                message: e.message,
            });
        }
        if flags.salt.is_empty() {
            return Err(ConfigError {
                origin: origin.into(),
                line: line_of_key(text, "salt"),
                key: Some("salt".into()),
                message: "must not be empty".into(),
            });
        }
        Ok(flags)
    }

    pub fn defaults() -> Flags {
        Flags::parse("<embedded flags>", "").expect("the embedded flags are valid")
    }

    /// The file's text, for writing back (auto-rollback, admin changes).
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_default()
    }

    /// Whether `command` is on the allowlist: listed, or `"*"`, or, for a transparent
    /// call's method (`/package.Service/Method`), its service as `/package.Service/*`.
    fn eligible(&self, command: &str) -> bool {
        self.commands.contains("*")
            || self.commands.contains(command)
            || command
                .rsplit_once('/')
                .filter(|(service, _)| service.starts_with('/'))
                .is_some_and(|(service, _)| self.commands.contains(&format!("{service}/*")))
    }

    /// Whether new takes any traffic now: not while paused or rolled back.
    pub fn serving_new(&self) -> bool {
        self.status.state == RolloutState::Active
    }

    /// Whether sessions may be pinned to new: a session's calls cannot be split
    /// between backends, so only when every command is eligible (`commands = ["*"]`).
    pub fn sessions_eligible(&self) -> bool {
        self.commands.contains("*")
    }

    /// Whether `new` gets any calls now: a nonzero share in canary mode, or full or
    /// shadow mode, with some command eligible, while active.
    pub fn new_takes_traffic(&self) -> bool {
        self.serving_new()
            && !self.commands.is_empty()
            && match self.mode {
                Mode::Off => false,
                Mode::Shadow | Mode::Full => true,
                Mode::Canary => self.effective_percent() != Percent::ZERO,
            }
    }

    /// The percentage in force: 0 while paused or rolled back.
    pub fn effective_percent(&self) -> Percent {
        match (self.status.state, self.mode) {
            (RolloutState::RolledBack | RolloutState::Paused, _)
            | (_, Mode::Off | Mode::Shadow) => Percent::ZERO,
            (_, Mode::Full) => Percent::ALL,
            (_, Mode::Canary) => self.percent.0,
        }
    }
}

/// Where one call goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Legacy,
    New,
    /// Legacy answers; new runs alongside for comparison.
    Shadow,
}

impl Route {
    /// The backend whose answer the client gets.
    pub fn answered_by(self) -> crate::backend::Role {
        match self {
            Route::New => crate::backend::Role::New,
            Route::Legacy | Route::Shadow => crate::backend::Role::Legacy,
        }
    }
}

/// The stickiness key of a call: the session id, else the routing key, else none
/// (then the caller supplies a random bucket).
pub fn sticky_key<'a>(
    session_id: Option<&'a str>,
    routing_key: Option<&'a str>,
) -> Option<&'a str> {
    session_id
        .filter(|s| !s.is_empty())
        .or(routing_key.filter(|s| !s.is_empty()))
}

/// The routing decision, pure. `random_bucket` (in [0, 10000)) is used for calls
/// without a key.
pub fn route(
    flags: &Flags,
    command: &str,
    key: Option<&str>,
    idempotent: bool,
    random_bucket: u32,
) -> Route {
    if !flags.eligible(command) || !flags.serving_new() {
        return Route::Legacy;
    }
    let b = key
        .map(|k| bucket(&flags.salt, k))
        .unwrap_or(random_bucket % BUCKETS);
    match flags.mode {
        Mode::Off => Route::Legacy,
        Mode::Full => Route::New,
        Mode::Canary => {
            if in_new(b, flags.percent.0) {
                Route::New
            } else {
                Route::Legacy
            }
        }
        Mode::Shadow => {
            if (idempotent || !flags.shadow.only_idempotent)
                && in_new(b, flags.shadow.sample_percent.0)
            {
                Route::Shadow
            } else {
                Route::Legacy
            }
        }
    }
}

/// Where a new session is pinned, for its whole life. Shadow mode pins to legacy
/// (a session's state lives in one backend, so it cannot be shadowed).
pub fn session_route(flags: &Flags, key: &str) -> Route {
    if !flags.sessions_eligible() || !flags.serving_new() {
        return Route::Legacy;
    }
    match flags.mode {
        Mode::Full => Route::New,
        Mode::Canary if in_new(bucket(&flags.salt, key), flags.percent.0) => Route::New,
        _ => Route::Legacy,
    }
}

/// An operator's change to the rollout (admin RPC or CLI).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Change {
    pub mode: Option<Mode>,
    pub percent: Option<Percent>,
    /// A new allowlist of eligible commands.
    pub commands: Option<BTreeSet<String>>,
    pub action: Option<Action>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Pause,
    Resume,
    Rollback,
    /// The next step of the walk (`[promotion] steps`), now.
    Promote,
}

/// A name that is not one of the [`Action`]s.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown action {0:?}; expected pause, resume, rollback or promote")]
pub struct UnknownAction(pub String);

/// A name that is not one of the [`Mode`]s.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown mode {0:?}; expected off, shadow, canary or full")]
pub struct UnknownMode(pub String);

/// An operator's change that [`apply_change`] refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RefusedChange {
    /// `pause` on a rolled-back rollout: only `resume` leaves that state.
    #[error("the rollout is rolled back; resume it (not pause)")]
    PauseRolledBack,
    /// `promote` without `[promotion] steps`.
    #[error("no steps to promote through: set [promotion] steps in the flags (e.g. [1, 5, 25, 50, 100]), or set the percentage")]
    NoSteps,
    /// `promote` at the last step.
    #[error("already at the last step ({0}): nothing to promote to")]
    LastStep(String),
    /// `promote` while paused or rolled back.
    #[error("the rollout is {0}; resume it before promoting")]
    PromoteInactive(&'static str),
}

impl Action {
    pub fn parse(s: &str) -> Result<Option<Action>, UnknownAction> {
        match s {
            "" => Ok(None),
            "pause" => Ok(Some(Action::Pause)),
            "resume" => Ok(Some(Action::Resume)),
            "rollback" => Ok(Some(Action::Rollback)),
            "promote" => Ok(Some(Action::Promote)),
            other => Err(UnknownAction(other.to_string())),
        }
    }
}

impl Mode {
    pub fn parse(s: &str) -> Result<Mode, UnknownMode> {
        match s {
            "off" => Ok(Mode::Off),
            "shadow" => Ok(Mode::Shadow),
            "canary" => Ok(Mode::Canary),
            "full" => Ok(Mode::Full),
            other => Err(UnknownMode(other.to_string())),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Off => "off",
            Mode::Shadow => "shadow",
            Mode::Canary => "canary",
            Mode::Full => "full",
        }
    }
}

impl RolloutState {
    pub fn as_str(self) -> &'static str {
        match self {
            RolloutState::Active => "active",
            RolloutState::Paused => "paused",
            RolloutState::RolledBack => "rolled_back",
        }
    }
}

/// Applies an operator's change, pure. Setting a percentage while the mode is `off`
/// or `shadow` switches to `canary` (that is what the operator asks for). A change of
/// mode or percentage never resumes a paused or rolled-back rollout: only `resume`
/// does, so a rollback cannot be undone by accident.
pub fn apply_change(
    flags: &Flags,
    change: &Change,
    actor: &str,
    now: &str,
) -> Result<Flags, RefusedChange> {
    let mut f = flags.clone();
    if let Some(mode) = change.mode {
        f.mode = mode;
    }
    if let Some(p) = change.percent {
        f.percent = PercentValue(p);
        if change.mode.is_none() && matches!(f.mode, Mode::Off | Mode::Shadow) {
            f.mode = Mode::Canary;
        }
    }
    if let Some(c) = &change.commands {
        f.commands = c.clone();
    }
    let mut reason = (f.mode != flags.mode
        || f.percent != flags.percent
        || f.commands != flags.commands)
        .then(|| {
            format!(
                "set mode {} percent {} commands [{}]",
                f.mode.as_str(),
                f.percent.0.as_f64(),
                f.commands.iter().cloned().collect::<Vec<_>>().join(", ")
            )
        });
    match change.action {
        None => {}
        Some(Action::Pause) => {
            if f.status.state == RolloutState::RolledBack {
                return Err(RefusedChange::PauseRolledBack);
            }
            f.status.state = RolloutState::Paused;
            reason = Some("paused by an operator".to_string());
        }
        Some(Action::Resume) => {
            f.status.state = RolloutState::Active;
            reason = Some("resumed by an operator".to_string());
        }
        Some(Action::Rollback) => {
            f.status.state = RolloutState::RolledBack;
            reason = Some("rolled back by an operator".to_string());
        }
        Some(Action::Promote) => {
            if f.status.state != RolloutState::Active {
                return Err(RefusedChange::PromoteInactive(f.status.state.as_str()));
            }
            if f.promotion.steps.is_empty() {
                return Err(RefusedChange::NoSteps);
            }
            let Some(next) = position(&f).next else {
                return Err(RefusedChange::LastStep(step_of(&f)));
            };
            let to = f.promotion.steps[next].at;
            f.go_to(to);
            reason = Some(format!("promoted to {} by an operator", to.describe()));
        }
    }
    if f == *flags {
        return Ok(f);
    }
    if let Some(r) = reason {
        f.status.reason = r;
    }
    f.status.changed_at = now.to_string();
    f.status.changed_by = actor.to_string();
    if step_changed(flags, &f) {
        f.status.step_started_at = now.to_string();
    }
    Ok(f)
}

/// Where the rollout is, in words: "canary 5%", "shadow", "off".
pub fn step_of(f: &Flags) -> String {
    match f.mode {
        Mode::Canary => format!("canary {}%", f.percent.0.as_f64()),
        m => m.as_str().to_string(),
    }
}

/// Whether `new` is at another step than `old`: another mode, percentage or state.
/// Each step is judged on its own traffic, so the statistics start afresh.
pub fn step_changed(old: &Flags, new: &Flags) -> bool {
    old.mode != new.mode || old.percent != new.percent || old.status.state != new.status.state
}

/// What identifies the step in force, for the statistics an instance publishes: the
/// tier sums only the statistics of the step the flags are at.
pub fn step_key(f: &Flags) -> String {
    format!(
        "{}/{}/{}/{}",
        f.mode.as_str(),
        f.percent.0.hundredths(),
        f.status.state.as_str(),
        f.status.step_started_at
    )
}

/// The automatic rollback, pure.
pub fn rolled_back(flags: &Flags, reason: &str, now: &str) -> Flags {
    let mut f = flags.clone();
    f.status.state = RolloutState::RolledBack;
    f.status.reason = reason.to_string();
    f.status.changed_at = now.to_string();
    f.status.changed_by = "pitboss auto-rollback".into();
    f.status.step_started_at = now.to_string();
    f
}

/// Where `flags` stand in their walk: the current step (if on one) and the next.
/// From `off` the next step is the first; from a percentage between steps, the next
/// step above it. Without steps, both are `None`.
pub fn position(flags: &Flags) -> Position {
    let here = match flags.mode {
        Mode::Off => None,
        Mode::Shadow => Some(StepAt::Shadow),
        Mode::Canary => Some(StepAt::Percent(flags.percent.0)),
        Mode::Full => Some(StepAt::Percent(Percent::ALL)),
    };
    position_in(here, &flags.promotion.steps)
}

impl Flags {
    /// Puts the rollout at step `at`: its mode and percentage (`percent` kept in
    /// shadow).
    pub fn go_to(&mut self, at: StepAt) {
        match at {
            StepAt::Shadow => self.mode = Mode::Shadow,
            StepAt::Percent(p) => {
                self.mode = Mode::Canary;
                self.percent = PercentValue(p);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_embedded_flags_send_everything_to_legacy() {
        let f = Flags::defaults();
        assert_eq!(f.mode, Mode::Off);
        assert_eq!(route(&f, "echo", Some("k"), true, 0), Route::Legacy);
        assert_eq!(f.effective_percent(), Percent::ZERO);
    }

    #[test]
    fn canary_splits_by_key_and_only_listed_commands() {
        let f = Flags::parse(
            "flags.toml",
            "mode = \"canary\"\npercent = 50.0\ncommands = [\"echo\"]\n",
        )
        .unwrap();
        let new = (0..10_000)
            .filter(|i| route(&f, "echo", Some(&format!("k{i}")), false, 0) == Route::New)
            .count();
        assert!((4_800..5_200).contains(&new), "{new}");
        assert_eq!(
            route(&f, "compute", Some("k1"), false, 0),
            Route::Legacy,
            "not in the allowlist"
        );
        // Sticky: the same key always gets the same answer.
        let r = route(&f, "echo", Some("user-7"), false, 0);
        assert!((0..100).all(|_| route(&f, "echo", Some("user-7"), false, 0) == r));
        // Without a key, the caller's random bucket decides.
        assert_eq!(route(&f, "echo", None, false, 10), Route::New);
        assert_eq!(route(&f, "echo", None, false, 9_999), Route::Legacy);
    }

    /// Issue 17: a transparent call's method is on the allowlist by name, or by its
    /// service.
    #[test]
    fn methods_are_eligible_by_name_or_by_service() {
        let f = Flags::parse(
            "f",
            "mode = \"full\"\ncommands = [\"/calc.Calculator/*\", \"/shop.Cart/Add\"]\n",
        )
        .unwrap();
        assert_eq!(
            route(&f, "/calc.Calculator/Add", None, false, 0),
            Route::New
        );
        assert_eq!(
            route(&f, "/calc.Calculator/Range", None, false, 0),
            Route::New
        );
        assert_eq!(route(&f, "/shop.Cart/Add", None, false, 0), Route::New);
        assert_eq!(
            route(&f, "/shop.Cart/Remove", None, false, 0),
            Route::Legacy
        );
        assert_eq!(
            route(&f, "/calc.CalculatorV2/Add", None, false, 0),
            Route::Legacy
        );
        // A Bridge command is never a service.
        assert_eq!(
            route(&f, "calc.Calculator/Add", None, false, 0),
            Route::Legacy
        );
    }

    #[test]
    fn full_shadow_and_rolled_back() {
        let full = Flags::parse("f", "mode = \"full\"\ncommands = [\"*\"]\n").unwrap();
        assert_eq!(route(&full, "anything", None, false, 0), Route::New);
        let shadow = Flags::parse("f", "mode = \"shadow\"\ncommands = [\"*\"]\n").unwrap();
        assert_eq!(route(&shadow, "x", Some("k"), true, 0), Route::Shadow);
        assert_eq!(
            route(&shadow, "x", Some("k"), false, 0),
            Route::Legacy,
            "only idempotent calls are shadowed"
        );
        let rb = Flags::parse(
            "f",
            "mode = \"full\"\ncommands = [\"*\"]\n[status]\nstate = \"rolled_back\"\n",
        )
        .unwrap();
        assert_eq!(route(&rb, "x", None, true, 0), Route::Legacy);
        assert_eq!(rb.effective_percent(), Percent::ZERO);
    }

    #[test]
    fn sessions_are_pinned_only_when_every_command_is_eligible() {
        let all = Flags::parse(
            "f",
            "mode = \"canary\"\npercent = 50.0\ncommands = [\"*\"]\n",
        )
        .unwrap();
        let some = Flags::parse(
            "f",
            "mode = \"canary\"\npercent = 50.0\ncommands = [\"a\"]\n",
        )
        .unwrap();
        let new = (0..2000)
            .filter(|i| session_route(&all, &format!("s{i}")) == Route::New)
            .count();
        assert!((900..1100).contains(&new), "{new}");
        assert!((0..2000).all(|i| session_route(&some, &format!("s{i}")) == Route::Legacy));
        let shadow = Flags::parse("f", "mode = \"shadow\"\ncommands = [\"*\"]\n").unwrap();
        assert_eq!(session_route(&shadow, "s1"), Route::Legacy);
    }

    #[test]
    fn operator_changes_and_their_rules() {
        let f = Flags::defaults();
        let set10 = Change {
            percent: Some(Percent::from_f64(10.0).unwrap()),
            ..Default::default()
        };
        let g = apply_change(&f, &set10, "ops", "t1").unwrap();
        assert_eq!(g.mode, Mode::Canary, "a percentage means canary");
        assert_eq!(g.status.changed_by, "ops");
        let paused = apply_change(
            &g,
            &Change {
                action: Some(Action::Pause),
                ..Default::default()
            },
            "ops",
            "t2",
        )
        .unwrap();
        assert_eq!(paused.effective_percent(), Percent::ZERO);
        assert_eq!(route(&paused, "echo", Some("k"), true, 0), Route::Legacy);
        let rb = rolled_back(&g, "error rate 9% > 5%", "t3");
        assert_eq!(rb.status.state, RolloutState::RolledBack);
        // Raising the percentage does not resume a rolled-back rollout ...
        let still = apply_change(
            &rb,
            &Change {
                percent: Some(Percent::from_f64(50.0).unwrap()),
                ..Default::default()
            },
            "ops",
            "t4",
        )
        .unwrap();
        assert_eq!(still.status.state, RolloutState::RolledBack);
        assert_eq!(still.effective_percent(), Percent::ZERO);
        assert_eq!(
            apply_change(
                &rb,
                &Change {
                    action: Some(Action::Pause),
                    ..Default::default()
                },
                "ops",
                "t4"
            ),
            Err(RefusedChange::PauseRolledBack)
        );
        // ... only resume does.
        let resumed = apply_change(
            &still,
            &Change {
                action: Some(Action::Resume),
                ..Default::default()
            },
            "ops",
            "t5",
        )
        .unwrap();
        assert_eq!(resumed.effective_percent().as_f64(), 50.0);
        assert_eq!(resumed.status.reason, "resumed by an operator");
    }

    #[test]
    fn bad_flags_name_the_line_and_key() {
        let err = Flags::parse("flags.toml", "mode = \"canary\"\npercent = 150.0\n").unwrap_err();
        assert_eq!(err.line, Some(2), "{err}");
        assert!(err.to_string().contains("percent"), "{err}");
        let err = Flags::parse("flags.toml", "mode = \"sideways\"\n").unwrap_err();
        assert_eq!(err.line, Some(1), "{err}");
        let err = Flags::parse("flags.toml", "\n[rollback]\nwindoww = \"1m\"\n").unwrap_err();
        assert_eq!(err.line, Some(3), "{err}");
        assert!(err.to_string().contains("windoww"), "{err}");
    }

    #[test]
    fn flags_round_trip_through_their_text() {
        let f = Flags::parse(
            "f",
            "mode = \"canary\"\npercent = 12.34\ncommands = [\"a\", \"b\"]\n",
        )
        .unwrap();
        let again = Flags::parse("f", &f.to_toml()).unwrap();
        assert_eq!(again, f);
    }
}
