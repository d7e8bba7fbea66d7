//! Resilience: one error classification that retry, circuit breakers, load shedding,
//! metrics and the gRPC edge all consult.
//!
//! - [`class`]: the classification table and the Python exception rules.
//! - [`breaker`]: the per-backend circuit breaker (failsafe inside a tower layer).
//! - [`outlier`]: per-worker outlier ejection.
//! - [`retry`]: the tower retry policy (backoff, budget, deadline) and the pool as a
//!   tower service.

pub mod breaker;
pub mod class;
pub mod outlier;
pub mod retry;

pub use breaker::{Breaker, BreakerLayer, BreakerSettings, BreakerState};
pub use class::{classify, ErrorClass, ExceptionRules, Retry, Severity};
pub use outlier::{OutlierDetector, OutlierSettings};
pub use retry::{Attempt, Failed, PoolService, RetryPolicy, RetrySettings, Served};
