//! The one place where a pool error becomes a gRPC status. Messages tell the caller
//! what happened and what to do; metadata carries machine-readable details.

use tonic::metadata::MetadataValue;
use tonic::{Code, Status};

use crate::pool::{ExhaustedReason, PoolError};

/// The error class name, also sent as `x-pitboss-error-class`.
pub fn class_of(err: &PoolError) -> &'static str {
    match err {
        PoolError::WorkerCrashed { .. } | PoolError::WorkerGone { .. } => "worker_crashed",
        PoolError::PoolExhausted { .. } | PoolError::TooManySessions { .. } => "pool_exhausted",
        PoolError::Timeout { .. } => "deadline_exceeded",
        PoolError::Protocol { .. } => "protocol_error",
        PoolError::PythonException { .. } => "python_exception",
        PoolError::UnknownCommand { .. } => "unknown_command",
        PoolError::InvalidRequest(_)
        | PoolError::ResponseTooLarge(_)
        | PoolError::SessionExists(_) => "invalid_request",
        PoolError::SessionLost { .. } => "session_lost",
        PoolError::SessionNotFound { .. } => "session_not_found",
        PoolError::Cancelled => "cancelled",
        PoolError::ShuttingDown => "shutting_down",
        PoolError::Unavailable(_) => "worker_crashed",
        PoolError::Internal(_) => "internal",
    }
}

fn code_of(err: &PoolError) -> Code {
    match err {
        PoolError::WorkerCrashed { .. }
        | PoolError::WorkerGone { .. }
        | PoolError::Protocol { .. }
        | PoolError::ShuttingDown
        | PoolError::Unavailable(_) => Code::Unavailable,
        PoolError::PoolExhausted { .. }
        | PoolError::TooManySessions { .. }
        | PoolError::ResponseTooLarge(_) => Code::ResourceExhausted,
        PoolError::Timeout { .. } => Code::DeadlineExceeded,
        PoolError::PythonException { .. } => Code::Unknown,
        PoolError::UnknownCommand { .. } | PoolError::SessionNotFound { .. } => Code::NotFound,
        PoolError::InvalidRequest(_) => Code::InvalidArgument,
        PoolError::SessionExists(_) => Code::AlreadyExists,
        PoolError::SessionLost { .. } => Code::FailedPrecondition,
        PoolError::Cancelled => Code::Cancelled,
        PoolError::Internal(_) => Code::Internal,
    }
}

/// What to add to the message so the caller knows what to do next.
fn advice(err: &PoolError) -> &'static str {
    match err {
        PoolError::WorkerCrashed { .. } | PoolError::Protocol { .. } => {
            " (retry if the command is idempotent)"
        }
        PoolError::PoolExhausted {
            reason: ExhaustedReason::QueueFull | ExhaustedReason::QueueTimeout,
        } => "",
        PoolError::ShuttingDown => " (retry against another instance)",
        _ => "",
    }
}

/// Maps a pool error to a status with `x-pitboss-*` metadata.
pub fn to_status(err: &PoolError, include_traceback: bool) -> Status {
    let mut status = Status::new(code_of(err), format!("{err}{}", advice(err)));
    let md = status.metadata_mut();
    md.insert(
        "x-pitboss-error-class",
        MetadataValue::from_static(class_of(err)),
    );
    if let Some(w) = err.worker() {
        if let Ok(v) = MetadataValue::try_from(w.to_string()) {
            md.insert("x-pitboss-worker", v);
        }
    }
    if let PoolError::PythonException {
        error_type,
        traceback,
        ..
    } = err
    {
        if let Ok(v) = MetadataValue::try_from(sanitize(error_type)) {
            md.insert("x-pitboss-python-type", v);
        }
        if include_traceback {
            if let Ok(v) = MetadataValue::try_from(sanitize(&tail(traceback, 4000))) {
                md.insert("x-pitboss-traceback", v);
            }
        }
    }
    status
}

/// Metadata values must be visible ASCII; escape the rest.
fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c == '\n' {
                " | ".to_string()
            } else if (' '..='~').contains(&c) {
                c.to_string()
            } else {
                c.escape_unicode().to_string()
            }
        })
        .collect()
}

fn tail(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut start = s.len() - max;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    format!("...{}", &s[start..])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::worker::WorkerId;

    #[test]
    fn python_exceptions_carry_type_and_message() {
        let e = PoolError::PythonException {
            worker: WorkerId(3),
            error_type: "ValueError".into(),
            message: "bad".into(),
            traceback: "Traceback\n  line".into(),
        };
        let s = to_status(&e, true);
        assert_eq!(s.code(), Code::Unknown);
        assert!(s.message().contains("ValueError: bad"));
        assert_eq!(
            s.metadata().get("x-pitboss-python-type").unwrap(),
            "ValueError"
        );
        assert_eq!(
            s.metadata().get("x-pitboss-traceback").unwrap(),
            "Traceback |   line"
        );
        assert!(to_status(&e, false)
            .metadata()
            .get("x-pitboss-traceback")
            .is_none());
    }

    #[test]
    fn every_error_gets_a_fitting_code() {
        let cases = [
            (
                PoolError::PoolExhausted {
                    reason: ExhaustedReason::QueueFull,
                },
                Code::ResourceExhausted,
            ),
            (
                PoolError::SessionNotFound {
                    session_id: "s".into(),
                },
                Code::NotFound,
            ),
            (PoolError::ShuttingDown, Code::Unavailable),
            (PoolError::InvalidRequest("x".into()), Code::InvalidArgument),
            (
                PoolError::UnknownCommand {
                    command: "x".into(),
                    known: vec!["echo".into()],
                },
                Code::NotFound,
            ),
        ];
        for (e, code) in cases {
            assert_eq!(to_status(&e, true).code(), code, "{e}");
        }
    }
}
