//! Resilience: one error classification that retry, circuit breakers, load shedding,
//! metrics and the gRPC edge all consult.
//!
//! - [`class`]: the classification table and the Python exception rules.

pub mod class;

pub use class::{classify, ErrorClass, ExceptionRules, Retry, Severity};
