//! The one place where a pool error becomes a gRPC status. Messages tell the caller
//! what happened and what to do; metadata carries machine-readable details.

use tonic::metadata::MetadataValue;
use tonic::Status;

use crate::pool::{ExhaustedReason, PoolError};
use crate::resilience::{classify, ExceptionRules};

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

/// Maps a pool error to a status with `x-pitboss-*` metadata. The code comes from the
/// error's row in the classification table.
pub fn to_status(err: &PoolError, rules: &ExceptionRules, include_traceback: bool) -> Status {
    let class = classify(err, rules);
    let mut status = Status::new(class.row().code, format!("{err}{}", advice(err)));
    let md = status.metadata_mut();
    md.insert(
        "x-pitboss-error-class",
        MetadataValue::from_static(class.name()),
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
    use tonic::Code;

    #[test]
    fn python_exceptions_carry_type_and_message() {
        let e = PoolError::PythonException {
            worker: WorkerId(3),
            error_type: "ValueError".into(),
            message: "bad".into(),
            traceback: "Traceback\n  line".into(),
        };
        let rules = ExceptionRules::default();
        let s = to_status(&e, &rules, true);
        assert_eq!(
            s.code(),
            Code::InvalidArgument,
            "ValueError is the caller's bad input"
        );
        assert_eq!(
            s.metadata().get("x-pitboss-error-class").unwrap(),
            "invalid_request"
        );
        assert!(s.message().contains("ValueError: bad"));
        assert_eq!(
            s.metadata().get("x-pitboss-python-type").unwrap(),
            "ValueError"
        );
        assert_eq!(
            s.metadata().get("x-pitboss-traceback").unwrap(),
            "Traceback |   line"
        );
        assert!(to_status(&e, &rules, false)
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
            assert_eq!(
                to_status(&e, &ExceptionRules::default(), true).code(),
                code,
                "{e}"
            );
        }
    }
}
