//! Errors of one worker connection. The pool wraps them; the resilience layer classifies
//! them; only the gRPC edge turns them into a status.

use super::id::WorkerId;

#[derive(Debug, Clone, thiserror::Error)]
pub enum WorkerError {
    /// The process exited or was killed. `sent` says whether the request may have
    /// reached Python: when false, retrying it is always safe.
    #[error("worker {worker} {reason}")]
    Exited {
        worker: WorkerId,
        reason: String,
        sent: bool,
    },
    /// The worker broke the framing protocol and is being replaced.
    #[error("worker {worker} broke the protocol: {detail}")]
    Protocol { worker: WorkerId, detail: String },
    /// The worker answered with an `ERROR` frame: a Python exception, an unknown command,
    /// a cancellation acknowledgement, or a refusal.
    #[error("{}", python_message(.kind, .error_type, .message))]
    Python {
        worker: WorkerId,
        /// `exception`, `unknown_command`, `cancelled`, `bad_request`, `response_too_large`.
        kind: String,
        error_type: String,
        message: String,
        traceback: String,
    },
    /// A bug in pitboss, not in the worker.
    #[error("internal error: {0}")]
    Internal(String),
}

fn python_message(kind: &str, error_type: &str, message: &str) -> String {
    match kind {
        "exception" => format!("{error_type}: {message}"),
        _ => format!("{kind}: {message}"),
    }
}

impl WorkerError {
    /// The same failure, for a request that was refused before being written.
    pub fn not_sent(self) -> WorkerError {
        match self {
            WorkerError::Exited { worker, reason, .. } => WorkerError::Exited {
                worker,
                reason,
                sent: false,
            },
            WorkerError::Protocol { worker, detail } => WorkerError::Exited {
                worker,
                reason: format!("is being replaced after a protocol violation ({detail})"),
                sent: false,
            },
            other => other,
        }
    }

    pub fn worker(&self) -> Option<WorkerId> {
        match self {
            WorkerError::Exited { worker, .. }
            | WorkerError::Protocol { worker, .. }
            | WorkerError::Python { worker, .. } => Some(*worker),
            WorkerError::Internal(_) => None,
        }
    }
}
