//! The error of one call as the resilience layer hands it up: the pool's own error,
//! or a failure the pool never saw. The layer that first understands a failure makes
//! it; nobody above rewrites it into another type.
//!
//! The chain, bottom up: a worker's [`WorkerError`](crate::worker::WorkerError)
//! becomes a [`PoolError`] (the pool knows the command and its known commands); a
//! [`CallError`] wraps that, or says what only the layers above the pool know (the
//! breaker refused, the backend shed load, a remote backend failed, a deadline passed
//! outside a pool, the answer is over the edge's size limit). Its class travels beside
//! it in [`Failed`](super::Failed), computed once where the failure was understood.

use std::time::Duration;

use super::class::{classify, ErrorClass, ExceptionRules};
use crate::pool::PoolError;
use crate::worker::WorkerId;

#[derive(Debug, Clone, thiserror::Error)]
pub enum CallError {
    /// The pool's error, with the pool's own message.
    #[error(transparent)]
    Pool(#[from] PoolError),
    /// The backend's breaker refused the call before anything ran.
    #[error("circuit open: the backend is failing and calls are refused for {retry_after:?}; retry later")]
    CircuitOpen { retry_after: Duration },
    /// The backend's concurrency limit (`limits.max_concurrency`) is reached.
    #[error(
        "pool exhausted: the backend is at its concurrency limit and sheds load; retry with backoff"
    )]
    Overloaded,
    /// A remote backend (an upstream Bridge) answered with a failure.
    #[error("{0}")]
    Remote(RemoteFailure),
    /// The service behind a `grpc_proxy` backend answered a transparent call with a
    /// status other than OK: the client gets it unchanged (code, message, details,
    /// trailers); the class says what it means for retry, breakers and the rollout.
    #[error("{0}")]
    Upstream(UpstreamStatus),
    /// A deadline passed while a backend that is not a pool (or nothing yet) had the
    /// call: a pool reports its own timeouts.
    #[error("deadline of {after:?} exceeded while the backend ran the command")]
    DeadlineExceeded { after: Duration },
    /// The answer is over `server.max_message_bytes`: gRPC itself would fail it with
    /// no class, and count it as served.
    #[error("the command's response is too large: {0}")]
    ResponseTooLarge(String),
    /// A failure of pitboss itself (a tower layer's unexpected error).
    #[error("internal error: {0}")]
    Internal(String),
}

/// A remote backend's failure: its address, the class it reported (its own
/// `x-pitboss-error-class` when it is a pitboss, else read from its status code), and
/// its status as text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteFailure {
    pub address: String,
    pub class: ErrorClass,
    pub message: String,
}

impl std::fmt::Display for RemoteFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "upstream {}: {}", self.address, self.message)
    }
}

/// A status that the service behind a `grpc_proxy` answered, with its class.
#[derive(Debug, Clone)]
pub struct UpstreamStatus {
    pub address: String,
    pub class: ErrorClass,
    pub status: Box<crate::wire::WireStatus>,
}

impl std::fmt::Display for UpstreamStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "upstream {}: {}", self.address, self.status)
    }
}

impl CallError {
    /// The class of this failure: a pool error by the backend's exception rules, the
    /// others by what they are. Called once, where the failure is first understood.
    pub fn class(&self, rules: &ExceptionRules) -> ErrorClass {
        match self {
            CallError::Pool(e) => classify(e, rules),
            CallError::CircuitOpen { .. } => ErrorClass::CircuitOpen,
            CallError::Overloaded => ErrorClass::PoolExhausted,
            CallError::Remote(r) => r.class,
            CallError::Upstream(u) => u.class,
            CallError::DeadlineExceeded { .. } => ErrorClass::DeadlineExceeded,
            CallError::ResponseTooLarge(_) => ErrorClass::ResponseTooLarge,
            CallError::Internal(_) => ErrorClass::Internal,
        }
    }

    /// The pool's error, when it is one.
    pub fn pool(&self) -> Option<&PoolError> {
        match self {
            CallError::Pool(e) => Some(e),
            _ => None,
        }
    }

    /// The local worker involved, where there is one.
    pub fn worker(&self) -> Option<WorkerId> {
        self.pool().and_then(PoolError::worker)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_layer_keeps_its_message_and_its_class() {
        let rules = ExceptionRules::default();
        let pool = CallError::from(PoolError::SessionNotFound {
            session_id: "s1".into(),
        });
        assert_eq!(pool.class(&rules), ErrorClass::SessionNotFound);
        assert!(
            pool.to_string().starts_with("session s1 not found"),
            "{pool}"
        );
        let open = CallError::CircuitOpen {
            retry_after: Duration::from_secs(3),
        };
        assert_eq!(open.class(&rules), ErrorClass::CircuitOpen);
        assert!(open.to_string().contains("3s"), "{open}");
        let remote = CallError::Remote(RemoteFailure {
            address: "http://u".into(),
            class: ErrorClass::ProtocolError,
            message: "Unavailable: worker w3 broke the protocol".into(),
        });
        assert_eq!(remote.class(&rules), ErrorClass::ProtocolError);
        assert!(remote.to_string().starts_with("upstream http://u: "));
        assert_eq!(
            CallError::Overloaded.class(&rules),
            ErrorClass::PoolExhausted
        );
        assert_eq!(remote.worker(), None);
    }
}
