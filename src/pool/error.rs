//! Typed errors of the pool, so the resilience layer can classify them and the gRPC
//! edge can turn them into a status. Messages say what happened and what to do.

use std::time::Duration;

use crate::worker::{WorkerError, WorkerId};

/// Why a request found no room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExhaustedReason {
    /// The bounded wait queue is full.
    QueueFull,
    /// It waited in the queue for `queue_timeout` without getting a worker.
    QueueTimeout,
    /// Its session's worker is busy and the affinity mode is `strict_fail_fast`.
    WorkerBusy,
}

/// Where a request was when its deadline passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeoutStage {
    /// Still waiting for a worker: it never reached Python.
    Queued,
    /// Running on a worker: the worker was sent a cancel.
    Running,
}

/// `after` is the time the call had from its arrival; zero when none was left (a
/// client deadline of a few microseconds is past before pitboss has read the call).
/// The time is rounded to the millisecond (to the microsecond below one): it is
/// measured from a moment just after the client's clock started, so a 300 ms deadline
/// reads "300ms", not "299.87ms".
fn timeout_message(after: Duration, stage: TimeoutStage) -> String {
    let after = if after >= Duration::from_millis(1) {
        Duration::from_millis(((after.as_micros() + 500) / 1000) as u64)
    } else {
        Duration::from_micros(((after.as_nanos() + 500) / 1000) as u64)
    };
    match stage {
        TimeoutStage::Queued if after.is_zero() => {
            "deadline exceeded before the call was queued: no time was left when it reached pitboss"
                .to_string()
        }
        TimeoutStage::Queued => {
            format!("deadline of {after:?} exceeded while waiting for a free worker")
        }
        TimeoutStage::Running => format!(
            "deadline of {after:?} exceeded while the worker ran the command; it was sent a cancel"
        ),
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum PoolError {
    #[error("worker {worker} crashed while handling the request ({detail}); it is being replaced")]
    WorkerCrashed {
        worker: WorkerId,
        detail: String,
        /// False when the request provably never reached the worker.
        sent: bool,
    },
    #[error("{}", exhausted_message(*.reason))]
    PoolExhausted { reason: ExhaustedReason },
    #[error("{}", timeout_message(*.after, *.stage))]
    Timeout {
        worker: Option<WorkerId>,
        after: Duration,
        stage: TimeoutStage,
    },
    #[error("worker {worker} broke the protocol ({detail}); it is being replaced")]
    Protocol { worker: WorkerId, detail: String },
    #[error("command raised {error_type}: {message}")]
    PythonException {
        worker: WorkerId,
        error_type: String,
        message: String,
        traceback: String,
    },
    #[error("unknown command {command:?}; known commands: {}", .known.join(", "))]
    UnknownCommand { command: String, known: Vec<String> },
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// The adapter's answer is over a size limit (the frame limit, or the gRPC message
    /// limit at the edge): the server's fault, never the caller's.
    #[error("the command's response is too large: {0}")]
    ResponseTooLarge(String),
    /// A request over a size limit (`limit` names the setting). The caller's to fix:
    /// refused before any worker is involved, never retried.
    #[error("request too large: {len} bytes, over the limit of {max} bytes ({limit}); send a smaller payload or raise {limit}")]
    RequestTooLarge {
        len: usize,
        max: usize,
        limit: &'static str,
    },
    #[error("session {session_id} is lost: its worker {worker} exited, and its state went with it; create a new session")]
    SessionLost {
        session_id: String,
        worker: WorkerId,
    },
    #[error("session {session_id} not found: it was closed, expired, or never created here; create a new session")]
    SessionNotFound { session_id: String },
    #[error("session {0} already exists")]
    SessionExists(String),
    #[error("too many sessions (the limit is {max}); close idle sessions or raise max_sessions")]
    TooManySessions { max: usize },
    #[error("worker {worker} is gone")]
    WorkerGone { worker: WorkerId },
    #[error("the request was cancelled")]
    Cancelled,
    #[error("the pool is shutting down and takes no new requests")]
    ShuttingDown,
    #[error("no worker is available: {0}")]
    Unavailable(String),
    #[error("internal error: {0}")]
    Internal(String),
}

fn exhausted_message(reason: ExhaustedReason) -> &'static str {
    match reason {
        ExhaustedReason::QueueFull => {
            "pool exhausted: every worker is busy and the wait queue is full; retry with backoff"
        }
        ExhaustedReason::QueueTimeout => {
            "pool exhausted: no worker became free within the queue timeout; retry with backoff"
        }
        ExhaustedReason::WorkerBusy => {
            "pool exhausted: the session's worker is busy (affinity mode strict_fail_fast); retry with backoff"
        }
    }
}

impl PoolError {
    /// Turns a worker's error into the pool's. `known` lists the commands, for
    /// `unknown_command` answers.
    pub fn from_worker(err: WorkerError, command: &str, known: &[String]) -> PoolError {
        match err {
            WorkerError::Exited {
                worker,
                reason,
                sent,
            } => PoolError::WorkerCrashed {
                worker,
                detail: reason,
                sent,
            },
            WorkerError::Protocol { worker, detail } => PoolError::Protocol { worker, detail },
            WorkerError::Python {
                worker,
                kind,
                error_type,
                message,
                traceback,
            } => match kind.as_str() {
                "exception" => PoolError::PythonException {
                    worker,
                    error_type,
                    message,
                    traceback,
                },
                "unknown_command" => PoolError::UnknownCommand {
                    command: command.to_string(),
                    known: known.to_vec(),
                },
                "cancelled" => PoolError::Cancelled,
                "response_too_large" => PoolError::ResponseTooLarge(message),
                _ => PoolError::InvalidRequest(message),
            },
            WorkerError::Internal(detail) => PoolError::Internal(detail),
        }
    }

    /// The worker involved, where there is one.
    pub fn worker(&self) -> Option<WorkerId> {
        match self {
            PoolError::WorkerCrashed { worker, .. }
            | PoolError::Protocol { worker, .. }
            | PoolError::PythonException { worker, .. }
            | PoolError::SessionLost { worker, .. }
            | PoolError::WorkerGone { worker } => Some(*worker),
            PoolError::Timeout { worker, .. } => *worker,
            _ => None,
        }
    }
}
