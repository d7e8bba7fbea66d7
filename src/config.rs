//! The config file (`config/pitboss.toml`), parsed into validated types.
//!
//! Single-value checks live in the `Deserialize` impls of small types ([`Dur`],
//! [`Positive`]), so a bad value is reported with the file, line and key where it
//! stands. Unknown keys are rejected. `PITBOSS_<SECTION>_<KEY>` environment variables
//! override single keys (e.g. `PITBOSS_POOL_SIZE=4`).
//!
//! This module only parses and validates: it is a leaf that imports no other layer.
//! Each layer turns its own section into its settings (`PoolConfig::from_sections` in
//! `pool`, `RetrySettings::from_section`, `BreakerSettings::from_section`,
//! `OutlierSettings::from_section` and `ExceptionRules::from_section` in `resilience`).

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

pub mod tls;
pub use tls::{TlsSection, UpstreamTlsSection};

/// The embedded default, used when no config file is given. It starts the demo
/// adapter from `python/examples`, so the first command in the README just works.
pub const DEFAULT_CONFIG: &str = include_str!("../config/pitboss.toml");

/// A config error that says where: file, line and key.
#[derive(Debug, thiserror::Error)]
#[error("{origin}{}: {message}", location(.line, .key))]
pub struct ConfigError {
    pub origin: String,
    pub line: Option<usize>,
    pub key: Option<String>,
    pub message: String,
}

fn location(line: &Option<usize>, key: &Option<String>) -> String {
    let mut s = String::new();
    if let Some(l) = line {
        s.push_str(&format!(":{l}"));
    }
    if let Some(k) = key {
        s.push_str(&format!(": key `{k}`"));
    }
    s
}

/// Why a duration's text is not a [`Dur`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error("duration {0:?} needs a unit: ms, s, m or h")]
    NoUnit(String),
    #[error("unknown duration unit {unit:?} in {text:?}; use ms, s, m or h")]
    UnknownUnit { unit: String, text: String },
    #[error("duration {0:?} does not start with a number")]
    NotANumber(String),
    #[error("duration {0:?} is out of range")]
    OutOfRange(String),
}

/// A duration written as `"250ms"`, `"2s"`, `"5m"`, `"1h"` or `"0"` (off, where allowed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Dur(pub Duration);

impl Dur {
    /// Parses exactly, in decimal: "1.5ms" is 1,500,000 ns, not a float's
    /// approximation, so what [`Dur`]'s `Display` writes reads back the same.
    pub fn parse(s: &str) -> Result<Dur, DurationError> {
        let s = s.trim();
        if s == "0" {
            return Ok(Dur(Duration::ZERO));
        }
        let split = s
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| DurationError::NoUnit(s.to_string()))?;
        let (num, unit) = s.split_at(split);
        let unit_nanos: u128 = match unit.trim() {
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            other => {
                return Err(DurationError::UnknownUnit {
                    unit: other.to_string(),
                    text: s.to_string(),
                })
            }
        };
        let (whole, frac) = num.split_once('.').unwrap_or((num, ""));
        if whole.is_empty() && frac.is_empty() || frac.contains('.') {
            return Err(DurationError::NotANumber(s.to_string()));
        }
        let digits_ok = |d: &str| d.chars().all(|c| c.is_ascii_digit());
        if !digits_ok(whole) || !digits_ok(frac) {
            return Err(DurationError::NotANumber(s.to_string()));
        }
        let too_big = || DurationError::OutOfRange(s.to_string());
        let whole: u128 = if whole.is_empty() {
            0
        } else {
            whole.parse().map_err(|_| too_big())?
        };
        // Fractional digits below a nanosecond are dropped.
        let mut nanos = whole.checked_mul(unit_nanos).ok_or_else(too_big)?;
        let mut scale = unit_nanos;
        for c in frac.chars() {
            scale /= 10;
            if scale == 0 {
                break;
            }
            nanos += u128::from(c as u8 - b'0') * scale;
        }
        const MAX_NANOS: u128 = 1_000_000_000 * 1_000_000_000; // 1e9 s
        if nanos > MAX_NANOS {
            return Err(too_big());
        }
        Ok(Dur(Duration::from_nanos(nanos as u64)))
    }

    /// `None` for zero ("off").
    pub fn nonzero(self) -> Option<Duration> {
        (!self.0.is_zero()).then_some(self.0)
    }
}

impl fmt::Display for Dur {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        let sub_ms = self.0.as_nanos() % 1_000_000;
        if self.0.is_zero() {
            f.write_str("0")
        } else if sub_ms != 0 {
            // Exact: "1.5ms", "0.000001ms"; never rounded to a different duration.
            let frac = format!("{sub_ms:06}");
            write!(f, "{ms}.{}ms", frac.trim_end_matches('0'))
        } else if ms % 3_600_000 == 0 {
            write!(f, "{}h", ms / 3_600_000)
        } else if ms % 60_000 == 0 {
            write!(f, "{}m", ms / 60_000)
        } else if ms % 1000 == 0 {
            write!(f, "{}s", ms / 1000)
        } else {
            write!(f, "{ms}ms")
        }
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Dur::parse(&s).map_err(serde::de::Error::custom)
    }
}

impl Serialize for Dur {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

/// A whole number that must be at least 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct Positive(pub u64);

impl<'de> Deserialize<'de> for Positive {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let n = i64::deserialize(d)?;
        if n < 1 {
            return Err(serde::de::Error::custom(format!(
                "must be at least 1, got {n}"
            )));
        }
        Ok(Positive(n as u64))
    }
}

/// A fraction in [0, 1].
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(transparent)]
pub struct Fraction(pub f64);

impl<'de> Deserialize<'de> for Fraction {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let n = f64::deserialize(d)?;
        if !(0.0..=1.0).contains(&n) {
            return Err(serde::de::Error::custom(format!(
                "must be between 0 and 1, got {n}"
            )));
        }
        Ok(Fraction(n))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Affinity {
    Hint,
    StrictQueue,
    StrictFailFast,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSection {
    /// gRPC listener for `pitboss.v1.Bridge`, health and reflection.
    #[serde(deserialize_with = "listen_addr")]
    pub listen: SocketAddr,
    /// gRPC listener for `pitboss.v1.Admin` (bind to loopback).
    #[serde(deserialize_with = "listen_addr")]
    pub admin_listen: SocketAddr,
    /// HTTP listener for `/metrics`, `/healthz` and `/readyz`.
    #[serde(deserialize_with = "listen_addr")]
    pub metrics_listen: SocketAddr,
    pub max_message_bytes: Positive,
    /// The largest header list (metadata) a client may send on the Bridge and Admin
    /// listeners, in bytes as HTTP/2 counts it (each name and value plus 32). A call
    /// over it is refused by HTTP/2 with status 431 before pitboss sees it. The
    /// default, 16 KiB, is hyper's and grpc C-core's; large JWTs or many baggage
    /// entries may need more.
    pub max_header_list_bytes: Positive,
    /// How long in-flight calls may take to finish on SIGTERM.
    pub shutdown_grace: Dur,
    /// How often pitboss pings each client connection (HTTP/2 PING) on the Bridge and
    /// Admin listeners; "0" turns it off. A client whose host died or whose network
    /// went away sends no FIN: without pings its connection, and the Python work of
    /// its calls without a deadline, would live on.
    pub keepalive_interval: Dur,
    /// How long a ping may go unanswered before the connection is closed and its
    /// calls cancelled (their workers get CANCEL).
    pub keepalive_timeout: Dur,
    pub log_format: LogFormat,
    /// Include Python tracebacks in error details sent to clients.
    pub include_tracebacks: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestartSection {
    pub backoff_base: Dur,
    pub backoff_max: Dur,
    pub jitter: Fraction,
    pub max_restarts: Positive,
    pub window: Dur,
    pub degraded_interval: Dur,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolSection {
    pub python: String,
    pub adapter: String,
    /// Directory of the `pitboss_worker` package; empty = the one shipped with pitboss.
    pub runtime_dir: String,
    /// Extra PYTHONPATH entries; relative paths are relative to the config file.
    pub python_path: Vec<String>,
    pub working_dir: String,
    pub env: toml::Table,
    pub inherit_env: Vec<String>,
    pub size: Positive,
    pub worker_concurrency: Positive,
    pub max_frame_bytes: Positive,
    pub startup_timeout: Dur,
    pub request_timeout: Dur,
    pub cancel_grace: Dur,
    pub queue_size: u64,
    pub queue_timeout: Dur,
    pub heartbeat_interval: Dur,
    pub heartbeat_timeout: Dur,
    pub max_requests: u64,
    pub max_requests_jitter: u64,
    pub max_lifetime: Dur,
    pub max_rss_mb: u64,
    pub drain_timeout: Dur,
    pub term_grace: Dur,
    pub restart: RestartSection,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionsSection {
    pub affinity: Affinity,
    pub ttl: Dur,
    pub max: Positive,
}

/// The names of the error classes, in the order of the classification table
/// (`resilience::class::TABLE`; a test there keeps the two equal). Config is a leaf
/// and checks names only; `resilience` turns them into classes.
pub const ERROR_CLASS_NAMES: [&str; 16] = [
    "worker_crashed",
    "worker_timeout",
    "deadline_exceeded",
    "pool_exhausted",
    "circuit_open",
    "protocol_error",
    "python_exception",
    "invalid_request",
    "unknown_command",
    "session_lost",
    "session_not_found",
    "cancelled",
    "shutting_down",
    "internal",
    "response_too_large",
    "session_exists",
];

/// The name of an error class, checked against [`ERROR_CLASS_NAMES`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClassName(String);

impl ClassName {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for ClassName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if ERROR_CLASS_NAMES.contains(&s.as_str()) {
            return Ok(ClassName(s));
        }
        Err(serde::de::Error::custom(format!(
            "unknown error class {s:?}; expected one of {}",
            ERROR_CLASS_NAMES.join(", ")
        )))
    }
}

impl Serialize for ClassName {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErrorsSection {
    /// Python exception type name -> error class; consulted before the defaults.
    pub rules: std::collections::BTreeMap<String, ClassName>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetrySection {
    pub max_attempts: Positive,
    pub backoff_base: Dur,
    pub backoff_max: Dur,
    pub jitter: Fraction,
    pub budget_percent: f64,
    pub budget_min_per_sec: u32,
    pub budget_window: Dur,
    pub per_try_timeout: Dur,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BreakerSection {
    pub enabled: bool,
    pub consecutive_failures: Positive,
    pub min_success_rate: Fraction,
    pub min_requests: u32,
    pub window: Dur,
    pub open_for: Dur,
    pub half_open_probes: Positive,
    pub worker_consecutive_failures: u32,
    pub worker_cooldown: Dur,
    pub max_ejected_share: Fraction,
    pub worker_replace_after: u32,
}

impl RetrySection {
    /// The checks `resilience::RetrySettings::validate` makes, on the values it will
    /// receive (a test there keeps the two in step): the failing key and what is wrong.
    pub fn check(&self) -> Result<(), (&'static str, &'static str)> {
        if self.max_attempts.0 == 0 {
            return Err(("max_attempts", "must be at least 1"));
        }
        if self.backoff_max < self.backoff_base || self.backoff_max.0.is_zero() {
            return Err(("backoff_max", "must be positive and at least backoff_base"));
        }
        if !(0.0..=1.0).contains(&self.jitter.0) {
            return Err(("jitter", "must be between 0 and 1"));
        }
        // Compared as the f32 the retry layer keeps.
        if !(0.0..=10.0).contains(&(self.budget_percent as f32)) {
            return Err(("budget_percent", "must be between 0 and 10"));
        }
        if self.budget_window.0 < Duration::from_secs(1)
            || self.budget_window.0 > Duration::from_secs(60)
        {
            return Err(("budget_window", "must be between 1s and 60s"));
        }
        Ok(())
    }
}

impl BreakerSection {
    /// The checks `resilience::BreakerSettings::validate` makes, on the values it will
    /// receive (a test there keeps the two in step): the failing key and what is wrong.
    pub fn check(&self) -> Result<(), (&'static str, &'static str)> {
        if self.consecutive_failures.0 == 0 {
            return Err(("consecutive_failures", "must be at least 1"));
        }
        if !(0.0..=1.0).contains(&self.min_success_rate.0) {
            return Err(("min_success_rate", "must be between 0 and 1"));
        }
        if self.window.0 < Duration::from_secs(1) {
            return Err(("window", "must be at least 1s"));
        }
        if self.open_for.0.is_zero() {
            return Err(("open_for", "must be positive"));
        }
        if self.half_open_probes.0 == 0 {
            return Err(("half_open_probes", "must be at least 1"));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsSection {
    pub max_concurrency: u64,
}

/// What serves a backend role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// No backend (only valid for `new`): everything is served by legacy.
    None,
    /// A pool of Python workers, configured by `[pool]` plus this backend's overrides.
    Pool,
    /// An upstream server that speaks `pitboss.v1.Bridge`.
    Grpc,
    /// The gRPC service being migrated (any proto): serves the transparent calls of
    /// `[transparent]`, forwarded to it as they came.
    #[serde(rename = "grpc_proxy")]
    GrpcProxy,
}

/// One backend role (`legacy` or `new`): its kind, and the keys of the shared
/// `[pool]`, `[retry]`, `[circuit_breaker]` and `[limits]` sections that differ for it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendSection {
    pub kind: BackendKind,
    /// For `kind = "grpc"` and `"grpc_proxy"`: the upstream, e.g. `http://10.0.0.5:50051`.
    pub address: String,
    #[serde(default)]
    pub pool: toml::Table,
    #[serde(default)]
    pub retry: toml::Table,
    #[serde(default)]
    pub circuit_breaker: toml::Table,
    #[serde(default)]
    pub limits: toml::Table,
    /// For `kind = "grpc"` and `"grpc_proxy"` with an `https://` address: the
    /// upstream's CA, a client certificate, SNI and authority.
    #[serde(default)]
    pub tls: UpstreamTlsSection,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendsSection {
    pub legacy: BackendSection,
    pub new: BackendSection,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolloutSection {
    /// The hot-reloaded flags file; relative to this file. Empty: flags live in memory
    /// (the embedded defaults, changed only through the admin API, not persisted).
    pub flags_file: String,
    /// Environment variable holding the admin bearer token.
    pub admin_token_env: String,
    /// File holding the admin bearer token (first line); used when the variable is unset.
    pub admin_token_file: String,
    /// How often the auto-rollback rules are evaluated.
    pub check_interval: Dur,
    /// Where the flags live: the file above (or memory), or etcd shared by the tier.
    pub store: StoreSection,
}

/// Where the rollout flags live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    /// `rollout.flags_file` (or memory without one): this instance alone.
    File,
    /// One key in etcd, shared by every instance of the tier.
    Etcd,
}

/// `[rollout.store]`: the flags store (docs/ROLLOUT.md, "The store").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreSection {
    pub kind: StoreKind,
    /// etcd's client URLs, `http://host:port`.
    pub endpoints: Vec<String>,
    /// The rollout's name: its keys are `<prefix>/<name>/...`.
    pub name: String,
    pub prefix: String,
    /// The lease of this instance's statistics and of the analyser's election.
    pub lease_ttl: Dur,
    /// How long one request to the store may take.
    pub timeout: Dur,
    /// The last flags the store delivered, kept for a restart while it is unreachable;
    /// relative to this file. Empty: no copy.
    pub cache_file: String,
}

/// Transparent calls (`docs/MIGRATING.md`): the user's own gRPC services, served next
/// to `pitboss.v1.Bridge` so their clients call pitboss unchanged. The edge turns it
/// into its catalog of methods.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransparentSection {
    /// Full service names (`package.Service`).
    pub services: Vec<String>,
    /// A `FileDescriptorSet` file with the services' descriptors; relative to this file.
    pub descriptor_set: String,
    /// Ask legacy (a `grpc_proxy`) for the descriptors through its reflection at start.
    pub descriptors_from_reflection: bool,
    /// Without descriptors: methods (or `/package.Service/*`) whose answers stream.
    pub server_streaming: Vec<String>,
    /// Without descriptors: methods whose requests stream (client-streaming, bidi).
    pub client_streaming: Vec<String>,
    /// Methods (or `/package.Service/*`) that are safe to run twice.
    pub idempotent: Vec<String>,
    /// Metadata keys whose value is the sticky key, the first present.
    pub routing_metadata: Vec<String>,
    /// Method -> the command a pool runs for it (default: the method's full name).
    pub commands: std::collections::BTreeMap<String, String>,
}

/// Services pitboss serves itself: no transparent service may take their names.
const PITBOSS_SERVICES: [&str; 5] = [
    "pitboss.v1.Bridge",
    "pitboss.v1.Admin",
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];

/// What is wrong with a service name for `transparent.services`, if anything.
/// A listen address: `IP:PORT`, or `localhost:PORT` (127.0.0.1, this host only).
/// Anything else is refused with the forms that work, where serde's own message was
/// "invalid socket address syntax" (for `localhost:50051`, `:50051` or `50051`).
fn listen_addr<'de, D: Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    let text = String::deserialize(d)?;
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(addr);
    }
    if let Some(port) = text.strip_prefix("localhost:") {
        if let Ok(port) = port.parse::<u16>() {
            return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
        }
    }
    let hint = if text.starts_with(':') || text.parse::<u16>().is_ok() {
        " (a port alone does not say which interfaces: pick one of these)"
    } else {
        ""
    };
    Err(serde::de::Error::custom(format!(
        "{text:?} is not a listen address{hint}: write IP:PORT, e.g. \"127.0.0.1:50051\" or \"localhost:50051\" (this host only), \"0.0.0.0:50051\" (every IPv4 interface) or \"[::]:50051\" (every interface); host names other than localhost are not resolved"
    )))
}

fn bad_service_name(name: &str) -> Option<String> {
    let ok = !name.is_empty()
        && name.split('.').all(|part| {
            !part.is_empty() && part.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        });
    if !ok {
        return Some(format!(
            "{name:?} is not a full service name like \"package.Service\" (as in the proto: package, a dot, the service)"
        ));
    }
    PITBOSS_SERVICES
        .contains(&name)
        .then(|| format!("{name:?} is one of pitboss's own services"))
}

/// What is wrong with a method pattern (`/package.Service/Method`, or
/// `/package.Service/*` when `wildcard`) of a listed service, if anything.
fn bad_method(pattern: &str, services: &[String], wildcard: bool) -> Option<String> {
    let parsed = pattern
        .strip_prefix('/')
        .and_then(|rest| rest.split_once('/'))
        .filter(|(_, m)| !m.is_empty() && !m.contains('/'));
    let Some((service, method)) = parsed else {
        return Some(format!(
            "{pattern:?} is not a method like \"/package.Service/Method\"{}",
            if wildcard {
                " or \"/package.Service/*\""
            } else {
                ""
            }
        ));
    };
    if method == "*" && !wildcard {
        return Some(format!("{pattern:?}: name one method, not \"*\""));
    }
    if !services.iter().any(|s| s == service) {
        return Some(format!(
            "{pattern:?} is a method of {service:?}, which transparent.services does not list"
        ));
    }
    None
}

/// A backend role with its effective settings, ready to start.
#[derive(Debug, Clone)]
pub struct BackendConfig {
    pub role: &'static str,
    pub kind: BackendKind,
    pub address: String,
    /// TLS to an `https://` upstream.
    pub tls: UpstreamTlsSection,
    /// The whole config with this backend's overrides applied.
    pub effective: Config,
}

/// The whole file. Every section and key must be present in the merged result; the
/// embedded default supplies anything a user file leaves out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub server: ServerSection,
    pub pool: PoolSection,
    pub sessions: SessionsSection,
    pub retry: RetrySection,
    pub circuit_breaker: BreakerSection,
    pub limits: LimitsSection,
    pub errors: ErrorsSection,
    pub rollout: RolloutSection,
    pub transparent: TransparentSection,
    pub backends: BackendsSection,
    pub tls: TlsSection,
    /// Where the file was read from, for resolving relative paths.
    #[serde(skip)]
    pub base_dir: PathBuf,
}

impl Config {
    /// The embedded default, with environment overrides.
    pub fn load_default() -> Result<Config, ConfigError> {
        Config::from_sources("<embedded default>", None, std::env::vars())
    }

    pub fn load_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            origin: path.display().to_string(),
            line: None,
            key: None,
            message: format!("cannot read: {e}"),
        })?;
        let mut cfg =
            Config::from_sources(&path.display().to_string(), Some(&text), std::env::vars())?;
        cfg.base_dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        Ok(cfg)
    }

    /// Merges the user's text over the embedded default, then `PITBOSS_*` variables.
    pub fn from_sources(
        origin: &str,
        text: Option<&str>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        // Whether the user chose pool.max_frame_bytes (in the file or the environment).
        let mut frame_set = false;
        let mut merged: toml::Table =
            DEFAULT_CONFIG
                .parse()
                .map_err(|e: toml::de::Error| ConfigError {
                    origin: "<embedded default>".into(),
                    line: None,
                    key: None,
                    message: e.to_string(),
                })?;
        if let Some(text) = text {
            // Parse the user's file on its own first, so errors point into it.
            let user: toml::Table = text
                .parse()
                .map_err(|e: toml::de::Error| span_error(origin, text, &e))?;
            // Unknown keys in the user's file are caught here, with its line numbers.
            let check = merge(merged.clone(), user.clone());
            if let Err(e) = Config::deserialize(toml::Value::Table(check.clone())) {
                return Err(locate(origin, text, &e.to_string()));
            }
            frame_set |= user
                .get("pool")
                .and_then(|p| p.get("max_frame_bytes"))
                .is_some();
            merged = merge(merged, user);
        }
        let known = overridable_paths(&merged);
        let token_var = admin_token_var(&merged);
        for (name, value) in env {
            let Some(rest) = name.strip_prefix("PITBOSS_") else {
                continue;
            };
            if is_non_config_var(rest) || token_var.as_deref() == Some(name.as_str()) {
                continue;
            }
            let wanted = rest.to_ascii_lowercase();
            let Some(path) = known.iter().find(|p| p.replace('.', "_") == wanted) else {
                if is_service_link(rest, &value) {
                    continue;
                }
                return Err(unknown_env_var(&name, &known));
            };
            frame_set |= path == "pool.max_frame_bytes";
            let parsed = parse_env_value(&value);
            set_path(&mut merged, path, parsed);
            if let Err(e) = Config::deserialize(toml::Value::Table(merged.clone())) {
                return Err(ConfigError {
                    origin: format!("environment variable {name}"),
                    line: None,
                    key: Some(path.clone()),
                    message: e.message().to_string(),
                });
            }
        }
        let mut cfg = Config::deserialize(toml::Value::Table(merged)).map_err(|e| ConfigError {
            origin: origin.to_string(),
            line: None,
            key: None,
            message: e.to_string(),
        })?;
        if !frame_set {
            // The default frame limit follows a lowered message limit: a user who sets
            // only server.max_message_bytes gets a config that works, not an error
            // about a key they never wrote.
            let limit = cfg
                .pool
                .max_frame_bytes
                .0
                .min(cfg.server.max_message_bytes.0);
            cfg.pool.max_frame_bytes = Positive(limit);
        }
        cfg.check_relations(origin, text)?;
        cfg.check_transparent(origin, text)?;
        Ok(cfg)
    }

    /// Checks that involve more than one key.
    fn check_relations(&self, origin: &str, text: Option<&str>) -> Result<(), ConfigError> {
        let p = &self.pool;
        let fail = |key: &str, message: String| key_error(origin, text, key, message);
        if p.heartbeat_timeout <= p.heartbeat_interval {
            return Err(fail(
                "pool.heartbeat_timeout",
                format!(
                    "must be longer than pool.heartbeat_interval ({} <= {})",
                    p.heartbeat_timeout, p.heartbeat_interval
                ),
            ));
        }
        if p.heartbeat_interval.0.is_zero() {
            return Err(fail("pool.heartbeat_interval", "must be positive".into()));
        }
        if p.restart.backoff_max < p.restart.backoff_base {
            return Err(fail(
                "pool.restart.backoff_max",
                "must be at least pool.restart.backoff_base".into(),
            ));
        }
        if !self.server.keepalive_interval.0.is_zero() && self.server.keepalive_timeout.0.is_zero()
        {
            return Err(fail(
                "server.keepalive_timeout",
                "must be positive while server.keepalive_interval is on (a ping gets no time to be answered); set keepalive_interval = \"0\" to turn the pings off".into(),
            ));
        }
        if !(1024..=u64::from(u32::MAX)).contains(&self.server.max_header_list_bytes.0) {
            return Err(fail(
                "server.max_header_list_bytes",
                format!(
                    "must be between 1024 and {} (HTTP/2 counts it in 32 bits), not {}",
                    u32::MAX,
                    self.server.max_header_list_bytes.0
                ),
            ));
        }
        if self.server.max_message_bytes.0 < 1024 {
            return Err(fail(
                "server.max_message_bytes",
                "must be at least 1024".into(),
            ));
        }
        if p.max_frame_bytes.0 < 1024 {
            return Err(fail("pool.max_frame_bytes", "must be at least 1024".into()));
        }
        // A worker's answer may be as big as a frame; pitboss must be able to send it.
        if p.max_frame_bytes.0 > self.server.max_message_bytes.0 {
            return Err(fail(
                "pool.max_frame_bytes",
                format!(
                    "must not exceed server.max_message_bytes ({} > {}): a response that fits a frame could not be sent to the client; lower pool.max_frame_bytes or raise server.max_message_bytes",
                    p.max_frame_bytes.0, self.server.max_message_bytes.0
                ),
            ));
        }
        if p.request_timeout.0.is_zero() {
            return Err(fail("pool.request_timeout", "must be positive".into()));
        }
        if let Err((field, message)) = self.retry.check() {
            return Err(fail(
                &format!("retry.{field}"),
                format!("{field} {message}"),
            ));
        }
        if let Err((field, message)) = self.circuit_breaker.check() {
            return Err(fail(
                &format!("circuit_breaker.{field}"),
                format!("{field} {message}"),
            ));
        }
        if p.adapter.trim().is_empty() {
            return Err(fail("pool.adapter", "must name MODULE:OBJECT".into()));
        }
        if self.backends.legacy.kind == BackendKind::None {
            return Err(fail(
                "backends.legacy.kind",
                "legacy must be \"pool\", \"grpc\" or \"grpc_proxy\": it serves everything new does not".into(),
            ));
        }
        if self.rollout.check_interval.0.is_zero() {
            return Err(fail("rollout.check_interval", "must be positive".into()));
        }
        let st = &self.rollout.store;
        if st.kind == StoreKind::Etcd {
            if st.endpoints.is_empty() {
                return Err(fail(
                    "rollout.store.endpoints",
                    "kind = \"etcd\" needs at least one endpoint, e.g. [\"http://127.0.0.1:2379\"]"
                        .into(),
                ));
            }
            for e in &st.endpoints {
                let ok = e.starts_with("http://") && e.parse::<tonic::transport::Uri>().is_ok();
                if !ok {
                    return Err(fail(
                        "rollout.store.endpoints",
                        format!(
                            "an etcd endpoint is \"http://host:port\", got {e:?} (https is not supported by this build)"
                        ),
                    ));
                }
            }
        }
        if st.name.is_empty() || st.name.contains('/') {
            return Err(fail(
                "rollout.store.name",
                format!("must be a non-empty name without '/', got {:?}", st.name),
            ));
        }
        if !st.prefix.starts_with('/') || st.prefix.ends_with('/') {
            return Err(fail(
                "rollout.store.prefix",
                format!(
                    "must start with '/' and not end with one, got {:?}",
                    st.prefix
                ),
            ));
        }
        if st.lease_ttl.0 < Duration::from_secs(2) {
            return Err(fail(
                "rollout.store.lease_ttl",
                format!(
                    "must be at least 2s (etcd's minimum lease), got {}",
                    st.lease_ttl
                ),
            ));
        }
        if st.timeout.0.is_zero() {
            return Err(fail("rollout.store.timeout", "must be positive".into()));
        }
        self.tls.check().map_err(|(key, message)| {
            let (table, leaf) = key.rsplit_once('.').unwrap_or(("", &key));
            ConfigError {
                origin: origin.to_string(),
                line: text.and_then(|t| tls::line_in_table(t, table, leaf)),
                key: Some(key.clone()),
                message,
            }
        })?;
        for role in ["legacy", "new"] {
            self.backend_with(role, origin, text)?;
        }
        Ok(())
    }

    /// The checks of `[transparent]`, and of the backends that serve it.
    /// (Once, on the whole file: a backend's effective config has no say in it.)
    fn check_transparent(&self, origin: &str, text: Option<&str>) -> Result<(), ConfigError> {
        let fail = |key: &str, message: String| key_error(origin, text, key, message);
        let t = &self.transparent;
        for name in &t.services {
            if let Some(why) = bad_service_name(name) {
                return Err(fail("transparent.services", why));
            }
        }
        let lists = [
            ("transparent.server_streaming", &t.server_streaming, true),
            ("transparent.client_streaming", &t.client_streaming, true),
            ("transparent.idempotent", &t.idempotent, true),
        ];
        for (key, list, wildcard) in lists {
            if let Some(why) = list
                .iter()
                .find_map(|m| bad_method(m, &t.services, wildcard))
            {
                return Err(fail(key, why));
            }
        }
        for (method, command) in &t.commands {
            if let Some(why) = bad_method(method, &t.services, false) {
                return Err(fail("transparent.commands", why));
            }
            if command.trim().is_empty() {
                return Err(fail(
                    "transparent.commands",
                    format!("{method:?} maps to an empty command"),
                ));
            }
        }
        let header_ok = |k: &str| {
            !k.is_empty()
                && k.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b))
        };
        if let Some(k) = t.routing_metadata.iter().find(|k| !header_ok(k)) {
            return Err(fail(
                "transparent.routing_metadata",
                format!("{k:?} is not a metadata key (lowercase letters, digits, '-', '_', '.')"),
            ));
        }
        if !t.descriptor_set.is_empty() && t.descriptors_from_reflection {
            return Err(fail(
                "transparent.descriptors_from_reflection",
                "give the descriptors one way: descriptor_set or descriptors_from_reflection"
                    .into(),
            ));
        }
        if t.descriptors_from_reflection && self.backends.legacy.kind != BackendKind::GrpcProxy {
            return Err(fail(
                "transparent.descriptors_from_reflection",
                "needs backends.legacy.kind = \"grpc_proxy\": the descriptors are asked of legacy"
                    .into(),
            ));
        }
        for (role, b) in [
            ("legacy", &self.backends.legacy),
            ("new", &self.backends.new),
        ] {
            if b.kind == BackendKind::GrpcProxy && t.services.is_empty() {
                return Err(fail(
                    &format!("backends.{role}.kind"),
                    "a grpc_proxy backend serves the methods of transparent.services, which lists none"
                        .into(),
                ));
            }
        }
        Ok(())
    }

    /// The descriptor set file's path, resolved against this file's directory.
    pub fn descriptor_set_path(&self) -> Option<PathBuf> {
        let file = &self.transparent.descriptor_set;
        (!file.is_empty()).then(|| self.base_dir.join(file))
    }

    /// A backend role's effective settings: `[pool]`, `[retry]`, `[circuit_breaker]`
    /// and `[limits]` with `[backends.<role>.*]` merged over them.
    pub fn backend(&self, role: &str) -> Result<BackendConfig, ConfigError> {
        self.backend_with(role, "<config>", None)
    }

    fn backend_with(
        &self,
        role: &str,
        origin: &str,
        text: Option<&str>,
    ) -> Result<BackendConfig, ConfigError> {
        let (role, section) = match role {
            "new" => ("new", &self.backends.new),
            _ => ("legacy", &self.backends.legacy),
        };
        let err = |key: String, message: String| key_error(origin, text, &key, message);
        if matches!(section.kind, BackendKind::Grpc | BackendKind::GrpcProxy) {
            let ok = (section.address.starts_with("http://")
                || section.address.starts_with("https://"))
                && section
                    .address
                    .parse::<tonic::transport::Uri>()
                    .is_ok_and(|u| u.host().is_some());
            if !ok {
                return Err(err(
                    format!("backends.{role}.address"),
                    format!(
                        "a grpc backend needs an address like \"http://127.0.0.1:50051\" (or https:// for TLS), got {:?}",
                        section.address
                    ),
                ));
            }
            tls::check_upstream(role, &section.address, &section.tls).map_err(
                |(key, message)| {
                    let (table, leaf) = key.rsplit_once('.').unwrap_or(("", &key));
                    ConfigError {
                        origin: origin.to_string(),
                        line: text.and_then(|t| tls::line_in_table(t, table, leaf)),
                        key: Some(key.clone()),
                        message,
                    }
                },
            )?;
        } else if section.tls.is_set() {
            return Err(err(
                format!("backends.{role}.tls"),
                format!(
                    "TLS settings are for kind = \"grpc\" and \"grpc_proxy\" backends with an https:// address; backends.{role}.kind is {:?}",
                    section.kind
                ),
            ));
        }
        let overrides = [
            ("pool", &section.pool),
            ("retry", &section.retry),
            ("circuit_breaker", &section.circuit_breaker),
            ("limits", &section.limits),
        ];
        let mut effective = self.clone();
        if overrides.iter().any(|(_, t)| !t.is_empty()) {
            let mut table = match toml::Table::try_from(self) {
                Ok(t) => t,
                Err(e) => return Err(err(format!("backends.{role}"), e.to_string())),
            };
            for (name, over) in overrides {
                if let Some(toml::Value::Table(base)) = table.get_mut(name) {
                    let merged = merge(std::mem::take(base), over.clone());
                    *base = merged;
                }
            }
            // The overrides must not recurse into another backends section.
            table.remove("backends");
            table.insert(
                "backends".into(),
                toml::Value::try_from(&BackendsSection {
                    legacy: BackendSection {
                        kind: BackendKind::Pool,
                        ..self.backends.legacy.clone()
                    }
                    .without_overrides(),
                    new: self.backends.new.without_overrides(),
                })
                .map_err(|e| err(format!("backends.{role}"), e.to_string()))?,
            );
            effective = Config::deserialize(toml::Value::Table(table)).map_err(|e| {
                let mut located = match text {
                    Some(t) => locate(origin, t, &e.to_string()),
                    None => err(format!("backends.{role}"), e.to_string()),
                };
                located.message = format!("in [backends.{role}]: {}", located.message);
                located
            })?;
            effective.base_dir = self.base_dir.clone();
            effective.check_relations(origin, None).map_err(|mut e| {
                e.key = e.key.map(|k| format!("backends.{role}.{k}"));
                if let (Some(t), Some(k)) = (text, &e.key) {
                    e.line = line_of_key(t, k.rsplit('.').next().unwrap_or(k));
                }
                e
            })?;
        }
        Ok(BackendConfig {
            role,
            kind: section.kind,
            address: section.address.clone(),
            tls: section.tls.clone(),
            effective,
        })
    }

    /// The admin bearer token: from the configured variable, else the file; `None`
    /// when neither is set (then only read-only admin calls are served).
    pub fn admin_token(&self) -> Result<Option<String>, ConfigError> {
        let r = &self.rollout;
        if !r.admin_token_env.is_empty() {
            if let Ok(v) = std::env::var(&r.admin_token_env) {
                if !v.trim().is_empty() {
                    return Ok(Some(v.trim().to_string()));
                }
            }
        }
        if r.admin_token_file.is_empty() {
            return Ok(None);
        }
        let path = self.base_dir.join(&r.admin_token_file);
        let text = std::fs::read_to_string(&path).map_err(|e| ConfigError {
            origin: path.display().to_string(),
            line: None,
            key: Some("rollout.admin_token_file".into()),
            message: format!("cannot read the admin token: {e}"),
        })?;
        let token = text.lines().next().unwrap_or("").trim().to_string();
        if token.is_empty() {
            return Err(ConfigError {
                origin: path.display().to_string(),
                line: Some(1),
                key: Some("rollout.admin_token_file".into()),
                message: "the admin token file is empty".into(),
            });
        }
        Ok(Some(token))
    }

    /// The flags file's path, resolved against this file's directory.
    pub fn flags_path(&self) -> Option<PathBuf> {
        (!self.rollout.flags_file.is_empty()).then(|| self.base_dir.join(&self.rollout.flags_file))
    }

    /// The store's cache of the last flags, resolved against this file's directory.
    pub fn store_cache_path(&self) -> Option<PathBuf> {
        let c = &self.rollout.store.cache_file;
        (!c.is_empty()).then(|| self.base_dir.join(c))
    }

    /// The effective configuration as TOML.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render: {e}"))
    }
}

impl BackendSection {
    fn without_overrides(&self) -> BackendSection {
        BackendSection {
            kind: self.kind,
            address: self.address.clone(),
            pool: Default::default(),
            retry: Default::default(),
            circuit_breaker: Default::default(),
            limits: Default::default(),
            tls: self.tls.clone(),
        }
    }
}

fn merge(mut base: toml::Table, over: toml::Table) -> toml::Table {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) if k != "env" => {
                let merged = merge(std::mem::take(b), o);
                *b = merged;
            }
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
    base
}

fn leaf_paths(t: &toml::Table) -> Vec<String> {
    let mut out = Vec::new();
    fn walk(prefix: &str, t: &toml::Table, out: &mut Vec<String>) {
        for (k, v) in t {
            let path = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            };
            match v {
                // `pool.env` and `errors.rules` are maps whose keys are data (variable
                // names, dotted exception names): each is one key, set as a whole.
                // `transparent.commands` too (its keys are methods).
                toml::Value::Table(inner) if k != "env" && k != "rules" && k != "commands" => {
                    walk(&path, inner, out)
                }
                _ => out.push(path),
            }
        }
    }
    walk("", t, &mut out);
    // Longest first, so `pool.restart.max_restarts` wins over shorter ambiguous names.
    out.sort_by_key(|p| std::cmp::Reverse(p.len()));
    out
}

/// `PITBOSS_*` variables that are not config keys: read by pitboss itself
/// (`PITBOSS_ADMIN_TOKEN`, `PITBOSS_INSTANCE_ID`, `PITBOSS_RUNTIME_DIR`,
/// `PITBOSS_CACHE_DIR`: where the embedded worker runtime is written), by the example
/// client (`PITBOSS_ADDR`), by the fault-injection adapter (`PITBOSS_FAULT_*`) and by the
/// test suite (`PITBOSS_REQUIRE_*`, `PITBOSS_TEST_*`). Any other `PITBOSS_` variable
/// must name a config key: a typo is an error, not a silently ignored override.
const NON_CONFIG_VARS: [&str; 5] = [
    "ADMIN_TOKEN",
    "INSTANCE_ID",
    "RUNTIME_DIR",
    "CACHE_DIR",
    "ADDR",
];
const NON_CONFIG_PREFIXES: [&str; 3] = ["FAULT_", "REQUIRE_", "TEST_"];

fn is_non_config_var(rest: &str) -> bool {
    NON_CONFIG_VARS.contains(&rest) || NON_CONFIG_PREFIXES.iter().any(|p| rest.starts_with(p))
}

/// Whether `PITBOSS_<rest>=value` is one of the variables Kubernetes puts in every
/// pod for each Service of its namespace (`enableServiceLinks`, on by default): a
/// Service named `pitboss` gives `PITBOSS_SERVICE_HOST`, `PITBOSS_SERVICE_PORT[_NAME]`,
/// `PITBOSS_PORT=tcp://...` and `PITBOSS_PORT_<n>_TCP[_PROTO|_PORT|_ADDR]`; one named
/// `pitboss-etcd` the same with `PITBOSS_ETCD_`. They are not config: refusing them
/// made every pod started after such a Service fail. Checked only for names that are
/// no config key.
fn is_service_link(rest: &str, value: &str) -> bool {
    let ends_with_word =
        |name: &str, word: &str| name == word || name.ends_with(&format!("_{word}"));
    if ends_with_word(rest, "SERVICE_HOST") || ends_with_word(rest, "SERVICE_PORT") {
        return true;
    }
    if let Some(i) = rest.find("SERVICE_PORT_") {
        if i == 0 || rest[..i].ends_with('_') {
            return true;
        }
    }
    let url = ["tcp://", "udp://", "sctp://"]
        .iter()
        .any(|scheme| value.starts_with(scheme));
    if ends_with_word(rest, "PORT") && url {
        return true;
    }
    // <prefix>PORT_<number>_<PROTOCOL>[_PROTO|_PORT|_ADDR]
    let words: Vec<&str> = rest.split('_').collect();
    words.iter().enumerate().any(|(i, w)| {
        *w == "PORT"
            && words
                .get(i + 1)
                .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
            && words
                .get(i + 2)
                .is_some_and(|p| ["TCP", "UDP", "SCTP"].contains(p))
            && match &words[i + 3..] {
                [] => true,
                [last] => ["PROTO", "PORT", "ADDR"].contains(last),
                _ => false,
            }
    })
}

/// The variable named by `rollout.admin_token_env`, which may itself start with
/// `PITBOSS_`: it holds a secret, not a config value.
fn admin_token_var(merged: &toml::Table) -> Option<String> {
    merged
        .get("rollout")?
        .get("admin_token_env")?
        .as_str()
        .map(str::to_string)
}

/// Every key an environment variable may set: each leaf of the merged config, and
/// each key of `[pool]`, `[retry]`, `[circuit_breaker]` and `[limits]` under
/// `backends.<role>.`, whether or not the file writes that override.
fn overridable_paths(merged: &toml::Table) -> Vec<String> {
    let mut out = leaf_paths(merged);
    for role in ["legacy", "new"] {
        for section in ["pool", "retry", "circuit_breaker", "limits"] {
            if let Some(toml::Value::Table(t)) = merged.get(section) {
                for leaf in leaf_paths(t) {
                    let path = format!("backends.{role}.{section}.{leaf}");
                    if !out.contains(&path) {
                        out.push(path);
                    }
                }
            }
        }
    }
    out.sort_by_key(|p| std::cmp::Reverse(p.len()));
    out
}

/// An unknown `PITBOSS_*` variable, with the closest known one.
fn unknown_env_var(name: &str, known: &[String]) -> ConfigError {
    let wanted = name.trim_start_matches("PITBOSS_").to_ascii_lowercase();
    let closest = known
        .iter()
        .min_by_key(|p| edit_distance(&p.replace('.', "_"), &wanted))
        .map(|p| {
            format!(
                "; did you mean PITBOSS_{} (key `{p}`)?",
                p.replace('.', "_").to_ascii_uppercase()
            )
        })
        .unwrap_or_default();
    ConfigError {
        origin: format!("environment variable {name}"),
        line: None,
        key: None,
        message: format!(
            "not a config key{closest} (PITBOSS_<SECTION>_<KEY> overrides one key; \
             variables that are not config are {} and PITBOSS_FAULT_*, PITBOSS_REQUIRE_*, \
             PITBOSS_TEST_*)",
            NON_CONFIG_VARS.map(|v| format!("PITBOSS_{v}")).join(", ")
        ),
    }
}

/// Levenshtein distance, for suggesting the key a typo meant.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur[j + 1] = (prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

fn set_path(t: &mut toml::Table, path: &str, value: toml::Value) {
    let mut parts: Vec<&str> = path.split('.').collect();
    let last = parts.pop().unwrap_or_default();
    let mut cur = t;
    for p in parts {
        let entry = cur
            .entry(p.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        match entry {
            toml::Value::Table(inner) => cur = inner,
            _ => return,
        }
    }
    cur.insert(last.to_string(), value);
}

/// An environment value as TOML if it parses as a TOML value, else as a string.
fn parse_env_value(raw: &str) -> toml::Value {
    let doc = format!("v = {raw}");
    match doc.parse::<toml::Table>() {
        Ok(mut t) => t
            .remove("v")
            .unwrap_or_else(|| toml::Value::String(raw.into())),
        Err(_) => toml::Value::String(raw.into()),
    }
}

pub(crate) fn span_error(origin: &str, text: &str, e: &toml::de::Error) -> ConfigError {
    let line = e.span().map(|s| line_at(text, s.start));
    ConfigError {
        origin: origin.to_string(),
        line,
        key: None,
        message: e.message().trim().to_string(),
    }
}

/// Finds the offending key of a serde error in the user's text, for a line number.
///
/// Deserialising a merged table loses spans, and the messages name either the key
/// ("unknown field `sise`") or only the bad value ("unknown variant `xml`"). So each
/// backticked token is tried as a key, then as a value, in the user's own text.
pub(crate) fn locate(origin: &str, text: &str, message: &str) -> ConfigError {
    let first = message.lines().next().unwrap_or(message).trim().to_string();
    let tokens: Vec<&str> = message
        .split('`')
        .skip(1)
        .step_by(2)
        .filter(|t| !t.contains(' '))
        .collect();
    let found = tokens
        .iter()
        .find_map(|t| {
            let leaf = t.rsplit('.').next().unwrap_or(t);
            line_of_key(text, leaf).map(|line| (line, t.to_string()))
        })
        .or_else(|| {
            tokens.iter().find_map(|t| {
                text.lines().enumerate().find_map(|(i, l)| {
                    let l = l.trim_start();
                    let (key, value) = l.split_once('=')?;
                    let value = value.trim().trim_matches('"');
                    (!l.starts_with('#') && value == *t)
                        .then(|| (i + 1, key.trim().trim_matches('"').to_string()))
                })
            })
        });
    ConfigError {
        origin: origin.to_string(),
        line: found.as_ref().map(|(l, _)| *l),
        key: found.map(|(_, k)| k),
        message: first,
    }
}

fn line_at(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// A config error at `key` (a dotted path), with the line of its last part in `text`.
fn key_error(origin: &str, text: Option<&str>, key: &str, message: String) -> ConfigError {
    let leaf = key.rsplit('.').next().unwrap_or(key);
    ConfigError {
        origin: origin.to_string(),
        line: text.and_then(|t| line_of_key(t, leaf)),
        key: Some(key.to_string()),
        message,
    }
}

/// The line of `key = ...` in the text (first match), ignoring comments.
pub(crate) fn line_of_key(text: &str, key: &str) -> Option<usize> {
    text.lines()
        .position(|l| {
            let l = l.trim_start();
            !l.starts_with('#')
                && l.strip_prefix(key)
                    .is_some_and(|rest| rest.trim_start().starts_with('='))
        })
        .map(|i| i + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<Config, ConfigError> {
        Config::from_sources("test.toml", Some(text), Vec::<(String, String)>::new())
    }

    #[test]
    fn the_embedded_default_is_valid() {
        let c = Config::from_sources("<embedded default>", None, Vec::<(String, String)>::new())
            .unwrap();
        assert_eq!(c.pool.adapter, "demo:adapter");
        let pool =
            crate::pool::PoolConfig::from_sections("legacy", &c.pool, &c.sessions, &c.base_dir);
        assert!(pool.validate().is_ok());
    }

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(Dur::parse("250ms").unwrap().0, Duration::from_millis(250));
        assert_eq!(Dur::parse("1.5s").unwrap().0, Duration::from_millis(1500));
        assert_eq!(Dur::parse("2m").unwrap().0, Duration::from_secs(120));
        assert_eq!(Dur::parse("0").unwrap().0, Duration::ZERO);
        let err = Dur::parse("10").unwrap_err();
        assert_eq!(err, DurationError::NoUnit("10".into()));
        assert!(err.to_string().contains("unit"));
        assert!(Dur::parse("5 parsecs").is_err());
        assert_eq!(Dur(Duration::from_millis(1500)).to_string(), "1500ms");
        assert_eq!(Dur(Duration::from_secs(120)).to_string(), "2m");
        // Sub-millisecond values are exact both ways (a backend's effective config and
        // the flags pitboss writes back go through Display).
        assert_eq!(Dur::parse("0.5ms").unwrap().0, Duration::from_micros(500));
        assert_eq!(Dur(Duration::from_micros(1500)).to_string(), "1.5ms");
        assert_eq!(Dur(Duration::from_nanos(1)).to_string(), "0.000001ms");
        for d in [1u64, 999, 1_000_001, 4_100_000, 123_456_789_123] {
            let dur = Dur(Duration::from_nanos(d));
            assert_eq!(Dur::parse(&dur.to_string()).unwrap(), dur, "{dur}");
        }
        assert!(Dur::parse("1.2.3ms").is_err());
        assert!(Dur::parse("ms").is_err());
        let err = Dur::parse("99999999999h").unwrap_err();
        assert_eq!(err, DurationError::OutOfRange("99999999999h".into()));
        assert!(err.to_string().contains("out of range"));
    }

    #[test]
    fn a_bad_value_names_the_line_and_key() {
        let err = load("[pool]\nadapter = \"demo:adapter\"\nsize = 0\n").unwrap_err();
        let text = err.to_string();
        assert_eq!(err.line, Some(3), "{text}");
        assert!(text.contains("test.toml:3"), "{text}");
        assert!(text.contains("size"), "{text}");
        assert!(text.contains("at least 1"), "{text}");
    }

    #[test]
    fn the_header_list_limit_defaults_to_16_kib_and_is_checked() {
        let c = load("").unwrap();
        assert_eq!(c.server.max_header_list_bytes.0, 16384);
        let c = load("[server]\nmax_header_list_bytes = 65536\n").unwrap();
        assert_eq!(c.server.max_header_list_bytes.0, 65536);
        for bad in ["100", "4294967296"] {
            let err = load(&format!("[server]\nmax_header_list_bytes = {bad}\n")).unwrap_err();
            let text = err.to_string();
            assert!(text.contains("server.max_header_list_bytes"), "{text}");
            assert!(text.contains("between 1024 and"), "{text}");
        }
    }

    #[test]
    fn keepalive_pings_need_a_timeout_unless_turned_off() {
        let c = load("").unwrap();
        assert_eq!(c.server.keepalive_interval.0, Duration::from_secs(60));
        assert_eq!(c.server.keepalive_timeout.0, Duration::from_secs(20));
        let err = load("[server]\nkeepalive_timeout = \"0\"\n").unwrap_err();
        let text = err.to_string();
        assert!(text.contains("server.keepalive_timeout"), "{text}");
        assert!(text.contains("keepalive_interval = \"0\""), "{text}");
        let off = load("[server]\nkeepalive_interval = \"0\"\nkeepalive_timeout = \"0\"\n");
        assert!(off.unwrap().server.keepalive_interval.0.is_zero());
    }

    #[test]
    fn unknown_keys_are_rejected_with_their_line() {
        let err = load("[server]\n\n[pool]\nsise = 4\n").unwrap_err();
        assert_eq!(err.line, Some(4), "{err}");
        assert!(err.to_string().contains("sise"), "{err}");
    }

    #[test]
    fn a_backend_inherits_the_shared_sections_and_overrides_some_keys() {
        let c = load(
            "[pool]\nsize = 3\n[retry]\nmax_attempts = 4\n\
             [backends.new]\nkind = \"pool\"\n\
             [backends.new.pool]\nadapter = \"demo_v2:adapter\"\nenv = { A = \"1\" }\n\
             [backends.new.circuit_breaker]\nconsecutive_failures = 2\n",
        )
        .unwrap();
        let legacy = c.backend("legacy").unwrap();
        let new = c.backend("new").unwrap();
        assert_eq!(legacy.effective.pool.adapter, "demo:adapter");
        assert_eq!(new.effective.pool.adapter, "demo_v2:adapter");
        assert_eq!(new.effective.pool.size.0, 3, "inherited from [pool]");
        assert_eq!(
            new.effective.retry.max_attempts.0, 4,
            "inherited from [retry]"
        );
        assert_eq!(new.effective.circuit_breaker.consecutive_failures.0, 2);
        assert_eq!(legacy.effective.circuit_breaker.consecutive_failures.0, 5);
        assert_eq!(new.effective.pool.env.get("A").unwrap().as_str(), Some("1"));
        assert_eq!(c.backend("new").unwrap().kind, BackendKind::Pool);
        let plain = load("").unwrap();
        assert_eq!(
            plain.backends.new.kind,
            BackendKind::None,
            "no rollout by default"
        );
        assert!(plain.flags_path().is_none());
    }

    #[test]
    fn bad_backend_settings_name_the_line_and_key() {
        let err =
            load("[backends.new]\nkind = \"pool\"\n[backends.new.pool]\nsise = 2\n").unwrap_err();
        assert_eq!(err.line, Some(4), "{err}");
        assert!(err.to_string().contains("sise"), "{err}");
        let err = load("[backends.new]\nkind = \"grpc\"\naddress = \"localhost\"\n").unwrap_err();
        assert_eq!(err.key.as_deref(), Some("backends.new.address"), "{err}");
        assert_eq!(err.line, Some(3), "{err}");
        let err = load("[backends.legacy]\nkind = \"none\"\n").unwrap_err();
        assert_eq!(err.key.as_deref(), Some("backends.legacy.kind"), "{err}");
        let err = load("[backends.new]\nkind = \"pool\"\n[backends.new.retry]\nmax_attempts = 0\n")
            .unwrap_err();
        assert_eq!(err.line, Some(4), "{err}");
        let err = load("[backends.new]\nkind = \"blue\"\n").unwrap_err();
        assert_eq!(err.line, Some(2), "{err}");
    }

    #[test]
    fn a_bad_duration_names_the_key() {
        let err = load("[pool]\nqueue_timeout = \"soon\"\n").unwrap_err();
        assert_eq!(err.line, Some(2), "{err}");
        assert!(err.to_string().contains("queue_timeout"), "{err}");
    }

    #[test]
    fn relations_between_keys_are_checked() {
        let err =
            load("[pool]\nheartbeat_interval = \"5s\"\nheartbeat_timeout = \"1s\"\n").unwrap_err();
        assert_eq!(err.key.as_deref(), Some("pool.heartbeat_timeout"));
        assert_eq!(err.line, Some(3), "{err}");
    }

    #[test]
    fn a_bad_choice_names_its_line_and_key() {
        let err = load("[server]\nlog_format = \"xml\"\n").unwrap_err();
        assert_eq!(err.line, Some(2), "{err}");
        assert_eq!(err.key.as_deref(), Some("server.log_format"), "{err}");
        assert!(err.to_string().contains("xml"), "{err}");
    }

    #[test]
    fn retry_and_breaker_settings_name_their_own_key() {
        let err = load("[retry]\nmax_attempts = 2\nbudget_window = \"90s\"\n").unwrap_err();
        assert_eq!(err.key.as_deref(), Some("retry.budget_window"), "{err}");
        assert_eq!(err.line, Some(3), "{err}");
        assert!(
            err.to_string()
                .contains("budget_window must be between 1s and 60s"),
            "{err}"
        );
        let err = load("[circuit_breaker]\nwindow = \"500ms\"\n").unwrap_err();
        assert_eq!(err.key.as_deref(), Some("circuit_breaker.window"), "{err}");
        assert_eq!(err.line, Some(2), "{err}");
    }

    #[test]
    fn syntax_errors_point_at_the_line() {
        let err = load("[pool]\nsize = = 3\n").unwrap_err();
        assert_eq!(err.line, Some(2), "{err}");
    }

    #[test]
    fn environment_variables_override_single_keys() {
        let env = vec![
            ("PITBOSS_POOL_SIZE".to_string(), "7".to_string()),
            (
                "PITBOSS_POOL_RESTART_MAX_RESTARTS".to_string(),
                "9".to_string(),
            ),
            (
                "PITBOSS_SERVER_LISTEN".to_string(),
                "127.0.0.1:7000".to_string(),
            ),
            ("PITBOSS_ADMIN_TOKEN".to_string(), "not config".to_string()),
        ];
        let c = Config::from_sources("x", None, env).unwrap();
        assert_eq!(c.pool.size.0, 7);
        assert_eq!(c.pool.restart.max_restarts.0, 9);
        assert_eq!(c.server.listen.port(), 7000);
        let bad =
            Config::from_sources("x", None, vec![("PITBOSS_POOL_SIZE".into(), "zero".into())])
                .unwrap_err();
        assert!(bad.to_string().contains("PITBOSS_POOL_SIZE"), "{bad}");
    }

    /// Issue 13 item 13: a key the file does not write can be overridden (the backend
    /// overrides are empty tables in the default, so they used to be invisible).
    #[test]
    fn env_overrides_reach_keys_missing_from_the_file() {
        let env = vec![(
            "PITBOSS_BACKENDS_NEW_POOL_WORKER_CONCURRENCY".to_string(),
            "3".to_string(),
        )];
        let c = Config::from_sources("x", Some("[backends.new]\nkind = \"pool\"\n"), env).unwrap();
        assert_eq!(
            c.backend("new")
                .unwrap()
                .effective
                .pool
                .worker_concurrency
                .0,
            3
        );
        assert_eq!(
            c.backend("legacy")
                .unwrap()
                .effective
                .pool
                .worker_concurrency
                .0,
            c.pool.worker_concurrency.0,
            "only new is overridden"
        );
        let env = vec![(
            "PITBOSS_ERRORS_RULES".to_string(),
            r#"{"mylib.Busy" = "pool_exhausted"}"#.to_string(),
        )];
        let c = Config::from_sources("x", None, env).unwrap();
        assert!(c.to_toml().contains("mylib.Busy"), "{}", c.to_toml());
    }

    /// Issue 13 item 13: an unknown `PITBOSS_` variable (a typo) is an error naming the
    /// closest key, not silently ignored; pitboss's own variables stay allowed.
    #[test]
    fn an_unknown_pitboss_variable_is_an_error_naming_the_closest_key() {
        let typo = Config::from_sources("x", None, vec![("PITBOSS_POOL_SIZ".into(), "4".into())])
            .unwrap_err();
        let text = typo.to_string();
        assert!(text.contains("PITBOSS_POOL_SIZ"), "{text}");
        assert!(text.contains("did you mean PITBOSS_POOL_SIZE"), "{text}");
        assert!(text.contains("`pool.size`"), "{text}");

        // pitboss's own variables, the test switches and the configured token
        // variable are not config and stay allowed.
        let own = vec![
            ("PITBOSS_ADMIN_TOKEN".to_string(), "t".to_string()),
            ("PITBOSS_INSTANCE_ID".to_string(), "i".to_string()),
            ("PITBOSS_RUNTIME_DIR".to_string(), "/r".to_string()),
            ("PITBOSS_CACHE_DIR".to_string(), "/c".to_string()),
            ("PITBOSS_FAULT_COUNT_FILE".to_string(), "/f".to_string()),
            ("PITBOSS_REQUIRE_NGINX".to_string(), "1".to_string()),
            ("PITBOSS_TEST_HOLD_POOL".to_string(), "1".to_string()),
            ("PITBOSS_OPS_SECRET".to_string(), "s".to_string()),
        ];
        Config::from_sources(
            "x",
            Some("[rollout]\nadmin_token_env = \"PITBOSS_OPS_SECRET\"\n"),
            own,
        )
        .unwrap();
    }

    #[test]
    fn edit_distance_counts_single_edits() {
        assert_eq!(super::edit_distance("pool_size", "pool_siz"), 1);
        assert_eq!(super::edit_distance("pool_size", "pool_size"), 0);
        assert_eq!(super::edit_distance("", "abc"), 3);
        assert_eq!(super::edit_distance("kitten", "sitting"), 3);
    }

    /// Issue 18: an `https://` upstream is accepted (with system roots by default);
    /// TLS settings need an https address, and the keys that go together are checked.
    #[test]
    fn https_upstreams_and_their_tls_settings_are_checked() {
        load("[backends.new]\nkind = \"grpc\"\naddress = \"https://10.0.0.5:50051\"\n").unwrap();
        load("[backends.new]\nkind = \"grpc\"\naddress = \"http://10.0.0.5:50051\"\n").unwrap();
        let err = load(
            "[backends.new]\nkind = \"grpc\"\naddress = \"http://u:1\"\n[backends.new.tls]\nca_file = \"ca.pem\"\n",
        )
        .unwrap_err();
        assert_eq!(
            err.key.as_deref(),
            Some("backends.new.tls.ca_file"),
            "{err}"
        );
        assert_eq!(err.line, Some(5), "{err}");
        assert!(err.to_string().contains("https://"), "{err}");
        let err = load(
            "[backends.new]\nkind = \"grpc\"\naddress = \"https://u:1\"\n[backends.new.tls]\ncert_file = \"c.pem\"\n",
        )
        .unwrap_err();
        assert_eq!(
            err.key.as_deref(),
            Some("backends.new.tls.key_file"),
            "{err}"
        );
        let err = load("[backends.new]\nkind = \"pool\"\n[backends.new.tls]\nca_file = \"x\"\n")
            .unwrap_err();
        assert_eq!(err.key.as_deref(), Some("backends.new.tls"), "{err}");
    }

    /// Issue 17: a `grpc_proxy` reaches an `https://` service with the same TLS
    /// settings as a `grpc` upstream, checked the same way.
    #[test]
    fn a_grpc_proxy_takes_https_and_the_same_tls_settings() {
        let proxy = |rest: &str| {
            format!(
                "[transparent]\nservices = [\"calc.Calculator\"]\n[backends.legacy]\n\
                 kind = \"grpc_proxy\"\n{rest}"
            )
        };
        let c = load(&proxy(
            "address = \"https://10.0.0.5:50051\"\n[backends.legacy.tls]\nca_file = \"ca.pem\"\n\
             cert_file = \"c.pem\"\nkey_file = \"k.pem\"\nserver_name = \"calc.internal\"\n",
        ))
        .unwrap();
        let b = c.backend("legacy").unwrap();
        assert_eq!(b.tls.server_name, "calc.internal");
        let err = load(&proxy(
            "address = \"https://u:1\"\n[backends.legacy.tls]\ncert_file = \"c.pem\"\n",
        ))
        .unwrap_err();
        assert_eq!(
            err.key.as_deref(),
            Some("backends.legacy.tls.key_file"),
            "{err}"
        );
        let err = load(&proxy(
            "address = \"http://u:1\"\n[backends.legacy.tls]\nca_file = \"ca.pem\"\n",
        ))
        .unwrap_err();
        assert_eq!(
            err.key.as_deref(),
            Some("backends.legacy.tls.ca_file"),
            "{err}"
        );
        assert_eq!(err.line, Some(7), "{err}");
    }

    #[test]
    fn listener_tls_keys_go_together() {
        let err = load("[tls.admin]\ncert_file = \"c.pem\"\n").unwrap_err();
        assert_eq!(err.key.as_deref(), Some("tls.admin.key_file"), "{err}");
        let err = load("[tls.bridge]\nclient_ca_file = \"ca.pem\"\n").unwrap_err();
        assert_eq!(
            err.key.as_deref(),
            Some("tls.bridge.client_ca_file"),
            "{err}"
        );
        assert_eq!(err.line, Some(2), "{err}");
        let err = load(
            "[tls.bridge]\ncert_file = \"c\"\nkey_file = \"k\"\n[tls.admin]\ncert_file = \"c\"\nkey_file = \"k\"\nallow_write = [\"spiffe://x/ops\"]\n",
        )
        .unwrap_err();
        assert_eq!(err.key.as_deref(), Some("tls.admin.allow_write"), "{err}");
        assert_eq!(err.line, Some(7), "{err}");
        assert!(err.to_string().contains("client_ca_file"), "{err}");
        let err = load(
            "[tls.bridge]\ncert_file = \"c\"\nkey_file = \"k\"\nclient_ca_file = \"ca\"\nallow = [\"spiffe://*/x\"]\n",
        )
        .unwrap_err();
        assert_eq!(err.key.as_deref(), Some("tls.bridge.allow"), "{err}");
        load("[tls.bridge]\ncert_file = \"c\"\nkey_file = \"k\"\nclient_ca_file = \"ca\"\nallow = [\"spiffe://prod/ns/a/*\"]\n").unwrap();
    }

    /// Issue 13 item 8: a frame limit above the gRPC message limit is refused, for
    /// [pool] and for a backend's override.
    #[test]
    fn the_frame_limit_may_not_exceed_the_message_limit() {
        let err =
            load("[server]\nmax_message_bytes = 1048576\n[pool]\nmax_frame_bytes = 2097152\n")
                .unwrap_err();
        let text = err.to_string();
        assert!(text.contains("pool.max_frame_bytes"), "{text}");
        assert!(text.contains("server.max_message_bytes"), "{text}");
        let err = load(
            "[backends.new]\nkind = \"pool\"\n[backends.new.pool]\nmax_frame_bytes = 33554432\n",
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("backends.new.pool.max_frame_bytes"),
            "{err}"
        );
        load("[server]\nmax_message_bytes = 1048576\n[pool]\nmax_frame_bytes = 1048576\n").unwrap();
    }

    /// `localhost:PORT` is this host's loopback; the forms users write from other
    /// tools (`:50051`, `50051`, a host name) are refused with the forms that work,
    /// naming the key (before: "invalid socket address syntax", for `localhost` too).
    #[test]
    fn listen_addresses_take_ip_port_or_localhost() {
        let c =
            load("[server]\nlisten = \"localhost:6000\"\nadmin_listen = \"[::1]:6001\"\n").unwrap();
        assert_eq!(c.server.listen.to_string(), "127.0.0.1:6000");
        assert_eq!(c.server.admin_listen.to_string(), "[::1]:6001");
        for bad in [
            ":50051",
            "50051",
            "pitboss.internal:50051",
            "localhost:99999",
            "localhost",
        ] {
            let err = load(&format!("[server]\nmetrics_listen = \"{bad}\"\n")).unwrap_err();
            let text = err.to_string();
            assert_eq!(err.line, Some(2), "{text}");
            assert!(text.contains("server.metrics_listen"), "{text}");
            assert!(
                text.contains(&format!("{bad:?} is not a listen address")),
                "{text}"
            );
            assert!(text.contains("\"0.0.0.0:50051\""), "{text}");
        }
        let err = Config::from_sources(
            "t",
            None,
            [("PITBOSS_SERVER_LISTEN".to_string(), ":7000".to_string())],
        )
        .unwrap_err();
        assert!(err.to_string().contains("a port alone"), "{err}");
    }

    /// The variables Kubernetes injects for a Service named `pitboss` (or
    /// `pitboss-etcd`) in the pod's namespace are not config and do not stop a start
    /// (before: "environment variable PITBOSS_SERVICE_HOST: not a config key", so
    /// every pod created after config/k8s/shared-tier.yaml's Service failed).
    #[test]
    fn kubernetes_service_link_variables_are_not_config() {
        let links = [
            ("PITBOSS_SERVICE_HOST", "10.96.0.12"),
            ("PITBOSS_SERVICE_PORT", "50051"),
            ("PITBOSS_SERVICE_PORT_GRPC", "50051"),
            ("PITBOSS_PORT", "tcp://10.96.0.12:50051"),
            ("PITBOSS_PORT_50051_TCP", "tcp://10.96.0.12:50051"),
            ("PITBOSS_PORT_50051_TCP_PROTO", "tcp"),
            ("PITBOSS_PORT_50051_TCP_PORT", "50051"),
            ("PITBOSS_PORT_50051_TCP_ADDR", "10.96.0.12"),
            ("PITBOSS_ETCD_SERVICE_HOST", "10.96.0.13"),
            ("PITBOSS_ETCD_PORT", "tcp://10.96.0.13:2379"),
            ("PITBOSS_ETCD_PORT_2379_TCP_ADDR", "10.96.0.13"),
        ];
        let env = links.map(|(k, v)| (k.to_string(), v.to_string()));
        let c = Config::from_sources("t", None, env).unwrap();
        assert_eq!(c.server.listen.to_string(), "127.0.0.1:50051");
        // Near misses are still refused: a port that is no Service's URL, a typo.
        for (k, v) in [
            ("PITBOSS_PORT", "50051"),
            ("PITBOSS_PORT_50051", "tcp://10.96.0.12:50051"),
            ("PITBOSS_SERVER_PORT", "50051"),
            ("PITBOSS_POOL_SIZES", "2"),
        ] {
            let err =
                Config::from_sources("t", None, [(k.to_string(), v.to_string())]).unwrap_err();
            assert!(err.to_string().contains(k), "{k}: {err}");
        }
        // A config key still wins over the pattern.
        let c = Config::from_sources(
            "t",
            None,
            [("PITBOSS_POOL_SIZE".to_string(), "3".to_string())],
        )
        .unwrap();
        assert_eq!(c.pool.size.0, 3);
    }

    /// A lowered server.max_message_bytes alone is a working config: the default frame
    /// limit follows it (it used to fail with an error about pool.max_frame_bytes, a
    /// key the user never wrote). A frame limit the user sets is kept and checked.
    #[test]
    fn the_default_frame_limit_follows_a_lowered_message_limit() {
        let c = load("[server]\nmax_message_bytes = 1048576\n").unwrap();
        assert_eq!(c.pool.max_frame_bytes.0, 1_048_576);
        let c = load(
            "[server]\nmax_message_bytes = 1048576\n[backends.new]\nkind = \"pool\"\n\
             [backends.new.pool]\nsize = 1\n",
        )
        .unwrap();
        assert_eq!(
            c.backend("new").unwrap().effective.pool.max_frame_bytes.0,
            1_048_576
        );
        // Raised: the default (16 MiB) stays.
        let c = load("[server]\nmax_message_bytes = 67108864\n").unwrap();
        assert_eq!(c.pool.max_frame_bytes.0, 16 * 1024 * 1024);
        // Chosen, smaller: kept.
        let c = load("[server]\nmax_message_bytes = 1048576\n[pool]\nmax_frame_bytes = 4096\n")
            .unwrap();
        assert_eq!(c.pool.max_frame_bytes.0, 4096);
        // Chosen through the environment, too big: still refused, naming the key.
        let err = Config::from_sources(
            "t",
            Some("[server]\nmax_message_bytes = 1048576\n"),
            [(
                "PITBOSS_POOL_MAX_FRAME_BYTES".to_string(),
                "2097152".to_string(),
            )],
        )
        .unwrap_err();
        assert!(err.to_string().contains("pool.max_frame_bytes"), "{err}");
        // A message limit too small for any frame names the key the user set.
        let err = load("[server]\nmax_message_bytes = 100\n").unwrap_err();
        assert_eq!(
            err.key.as_deref(),
            Some("server.max_message_bytes"),
            "{err}"
        );
    }

    #[test]
    fn exception_rules_name_known_classes() {
        let c = load("[errors.rules]\n\"mylib.Busy\" = \"pool_exhausted\"\n").unwrap();
        let rules = crate::resilience::ExceptionRules::from_section(&c.errors);
        assert_eq!(
            rules.classify("mylib.Busy"),
            crate::resilience::ErrorClass::PoolExhausted
        );
        assert_eq!(
            rules.classify("TimeoutError"),
            crate::resilience::ErrorClass::WorkerTimeout
        );
        let err = load("[errors.rules]\nBoom = \"explosion\"\n").unwrap_err();
        assert!(err.to_string().contains("unknown error class"), "{err}");
        assert_eq!(err.line, Some(2), "{err}");
    }

    #[test]
    fn a_partial_file_keeps_the_other_defaults() {
        let c = load("[pool]\nsize = 3\n").unwrap();
        assert_eq!(c.pool.size.0, 3);
        assert_eq!(c.pool.adapter, "demo:adapter");
        let round =
            Config::from_sources("x", Some(&c.to_toml()), Vec::<(String, String)>::new()).unwrap();
        assert_eq!(round.pool.size.0, 3);
    }
}

#[cfg(test)]
mod doc_tests {
    use super::*;

    #[test]
    fn docs_config_md_lists_every_key() {
        let doc = include_str!("../docs/CONFIG.md");
        let table: toml::Table = DEFAULT_CONFIG.parse().unwrap();
        for path in leaf_paths(&table) {
            assert!(
                doc.contains(&format!("`{path}`")),
                "docs/CONFIG.md does not document {path}"
            );
        }
    }
}
