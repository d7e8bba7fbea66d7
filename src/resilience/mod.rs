//! Resilience: one error classification that retry, circuit breakers, load shedding,
//! metrics and the gRPC edge all consult.
//!
//! - [`class`]: the classification table and the Python exception rules.
//! - [`retry`]: the tower retry policy (backoff, budget, deadline) and the pool as a
//!   tower service.

pub mod class;
pub mod retry;

pub use class::{classify, ErrorClass, ExceptionRules, Retry, Severity};
pub use retry::{Attempt, Failed, PoolService, RetryPolicy, RetrySettings, Served};
