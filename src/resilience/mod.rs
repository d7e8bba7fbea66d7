//! Resilience: one error classification that retry, circuit breakers, load shedding,
//! metrics and the gRPC edge all consult.
//!
//! - [`class`]: the classification table and the Python exception rules.
//! - [`error`]: the error of one call, as the layers below the edge hand it up.
//! - [`breaker`]: the per-backend circuit breaker (failsafe inside a tower layer).
//! - [`outlier`]: per-worker outlier ejection.
//! - [`retry`]: the tower retry policy (backoff, budget, deadline).
//! - [`one_try`]: one try of an attempt as a tower service ([`TryService`]: the
//!   per-try deadline and the try's class), over a pool or any other [`OneTry`].

pub mod breaker;
pub mod class;
pub mod error;
pub mod one_try;
pub mod outlier;
pub mod retry;

/// A setting that failed validation: which field, and what is wrong with it. Displays
/// as "field message", e.g. "max_attempts must be at least 1".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field} {message}")]
pub struct InvalidSetting {
    pub field: &'static str,
    pub message: &'static str,
}

impl InvalidSetting {
    fn new(field: &'static str, message: &'static str) -> Self {
        InvalidSetting { field, message }
    }
}

pub use breaker::{Breaker, BreakerLayer, BreakerSettings, BreakerState};
pub use class::{classify, ErrorClass, ExceptionRules, Retry, Severity};
pub use error::{CallError, RemoteFailure, UpstreamStatus};
pub use one_try::{OneTry, PoolService, PoolTry, Reply, TryService};
pub use outlier::{OutlierDetector, OutlierSettings};
pub use retry::{Attempt, Failed, InvalidRetrySettings, RetryPolicy, RetrySettings, Served};
