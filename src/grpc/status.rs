//! The one place where a failure becomes a gRPC status. Messages tell the caller
//! what happened and what to do; metadata carries machine-readable details.

use std::collections::HashMap;

use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::Status;
use tonic_types::{ErrorDetails, StatusExt};

use crate::pool::PoolError;
use crate::resilience::{CallError, ErrorClass};
use crate::wire::WireStatus;

/// What to add to the message so the caller knows what to do next.
fn advice(err: &CallError) -> &'static str {
    match err.pool() {
        Some(PoolError::WorkerCrashed { .. } | PoolError::Protocol { .. }) => {
            " (retry if the command is idempotent)"
        }
        Some(PoolError::ShuttingDown) => " (retry against another instance)",
        _ => "",
    }
}

/// Where an error happened, for its details.
#[derive(Debug, Clone, Copy)]
pub struct ErrorContext<'a> {
    pub backend: &'a str,
    pub attempts: u32,
    pub instance: &'a str,
}

/// The budget for an error's metadata. All of it together (the `grpc-message`, the
/// `x-pitboss-*` trailers and the base64 `grpc-status-details-bin`) must stay well
/// under 8 KiB, grpcio's default soft limit: past its hard limit a stock grpcio client
/// sees RESOURCE_EXHAUSTED "received metadata size exceeds hard limit" instead of the
/// real status, and may retry a call that must not run twice. Each piece is cut once,
/// here; echoed input (an unknown command's name) is cut with the message.
pub mod budget {
    /// The status message, in UTF-8 bytes. It travels twice: percent-encoded in
    /// `grpc-message` (up to 3x for non-ASCII) and in the details.
    pub const MESSAGE: usize = 768;
    /// The traceback's tail, in bytes; sent only in the details (`ErrorInfo`).
    pub const TRACEBACK: usize = 1536;
    /// Any other value (a Python type name, a worker id...).
    pub const VALUE: usize = 128;
    /// What all error metadata together stays under, with the pieces above at their
    /// worst (tested).
    pub const TOTAL: usize = 7 * 1024;
}

/// The status of a rollout change that wrote nothing: a refused change or a lost
/// compare-and-swap is FAILED_PRECONDITION (read the rollout again, then decide);
/// an unreachable store is UNAVAILABLE (the same change may be tried again later).
pub fn rollout_change_status<E: std::fmt::Display>(
    e: &crate::rollout::controller::ChangeError<E>,
) -> Status {
    use crate::rollout::controller::ChangeError;
    match e {
        ChangeError::Refused(_) | ChangeError::Conflict(_) => {
            Status::failed_precondition(e.to_string())
        }
        ChangeError::Store(s) => store_status(s),
    }
}

/// The status of a rollout store's failure.
pub fn store_status(e: &crate::rollout::store::StoreError) -> Status {
    use crate::rollout::store::StoreError;
    match e {
        StoreError::Unreachable { .. } => Status::unavailable(format!(
            "{e}; nothing changed, the flags in force stay (retry when the store answers)"
        )),
        // gRPC's code for "a change that may have completed".
        StoreError::Unconfirmed { .. } => Status::deadline_exceeded(format!(
            "{e}; the flags in force stay until it does: check `pitboss rollout history` \
             once the store answers before you retry"
        )),
        StoreError::Write { .. } | StoreError::Invalid { .. } => {
            Status::failed_precondition(e.to_string())
        }
    }
}

/// How long a client should wait before retrying after `pool_exhausted`.
pub const POOL_EXHAUSTED_PUSHBACK: std::time::Duration = std::time::Duration::from_millis(200);

/// Maps a failure to a status. `class` is the one it was given where it was first
/// understood (a per-try timeout is `worker_timeout` there, though its error reads as
/// a deadline), carried, so the client, the metrics, the breaker and the rollout all
/// see one class. The code comes from the class's row in the classification table.
/// Details travel twice: as the standard `google.rpc` error model (`ErrorInfo` with
/// reason = the class and domain `pitboss`, plus `RetryInfo` and a
/// `grpc-retry-pushback-ms` trailer when the client should back off), and as plain
/// `x-pitboss-*` metadata for clients without rich-error support.
pub fn to_status(
    err: &CallError,
    class: ErrorClass,
    include_traceback: bool,
    ctx: ErrorContext<'_>,
) -> Status {
    let mut info: HashMap<String, String> = HashMap::new();
    let mut md = MetadataMap::new();
    let mut put = |key: &str, value: String, info: &mut HashMap<String, String>| {
        let value = head(&value, budget::VALUE);
        if let Ok(v) = MetadataValue::try_from(sanitize(&value)) {
            md.insert(
                format!("x-pitboss-{}", key.replace('_', "-"))
                    .parse::<tonic::metadata::MetadataKey<_>>()
                    .expect("static key"),
                v,
            );
        }
        info.insert(key.to_string(), value);
    };
    put("error_class", class.name().to_string(), &mut info);
    put("backend", ctx.backend.to_string(), &mut info);
    put("attempts", ctx.attempts.to_string(), &mut info);
    put("instance", ctx.instance.to_string(), &mut info);
    if let Some(w) = err.worker() {
        put("worker", w.to_string(), &mut info);
    }
    if let Some(PoolError::PythonException {
        error_type,
        traceback,
        ..
    }) = err.pool()
    {
        put("python_type", error_type.clone(), &mut info);
        if include_traceback {
            // Only in the details: a trailer copy would double the biggest piece.
            info.insert("traceback".into(), tail(traceback, budget::TRACEBACK));
        }
    }
    let mut details = ErrorDetails::new();
    details.set_error_info(class.name(), "pitboss", info);
    let pushback = match (class, err) {
        (_, CallError::CircuitOpen { retry_after }) => Some(*retry_after),
        (ErrorClass::PoolExhausted, _) => Some(POOL_EXHAUSTED_PUSHBACK),
        _ => None,
    };
    if let Some(delay) = pushback {
        details.set_retry_info(Some(delay));
        if let Ok(v) = MetadataValue::try_from(delay.as_millis().to_string()) {
            md.insert("grpc-retry-pushback-ms", v);
        }
    }
    // A request over a size limit is `invalid_request` (never retried, never held
    // against the backend), but answered with the code gRPC itself gives a message over
    // the limit, as docs/ERRORS.md says.
    let code = match err.pool() {
        Some(PoolError::RequestTooLarge { .. }) => tonic::Code::ResourceExhausted,
        _ => class.row().code,
    };
    let full = format!("{err}{}", advice(err));
    let message = head(&full, budget::MESSAGE);
    if message.len() != full.len() {
        // The client gets the cut version; the whole text stays findable.
        let traceback = match err.pool() {
            Some(PoolError::PythonException { traceback, .. }) => traceback.as_str(),
            _ => "",
        };
        tracing::debug!(class = class.name(), message = %full, %traceback, "error text cut for the client");
    }
    Status::with_error_details_and_metadata(code, message, details, md)
}

/// How a transparent call's failure is answered (see [`transparent_failure`]).
#[derive(Debug)]
pub enum TransparentFailure<'a> {
    /// The status the service behind a `grpc_proxy` answered, passed on unchanged.
    Passed(&'a WireStatus),
    /// pitboss's own status.
    Made(Status),
}

/// Maps a transparent call's failure (a client's call of its own service's method).
/// A status the service itself answered goes back unchanged: code, message, details
/// and trailers, as a client calling it directly would get them. Any other failure
/// gets the status a Bridge call would ([`to_status`]: the class's code, `ErrorInfo`,
/// `x-pitboss-*` trailers), except a method that no backend has: gRPC clients know it
/// as UNIMPLEMENTED, which is what the service answers for a method it lacks.
pub fn transparent_failure<'a>(
    err: &'a CallError,
    class: ErrorClass,
    include_traceback: bool,
    ctx: ErrorContext<'_>,
) -> TransparentFailure<'a> {
    if let CallError::Upstream(u) = err {
        return TransparentFailure::Passed(&u.status);
    }
    let status = to_status(err, class, include_traceback, ctx);
    if class != ErrorClass::UnknownCommand {
        return TransparentFailure::Made(status);
    }
    TransparentFailure::Made(Status::with_details_and_metadata(
        tonic::Code::Unimplemented,
        status.message(),
        status.details().to_vec().into(),
        status.metadata().clone(),
    ))
}

/// Why a transparent call is refused before any backend sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Its request message is over `server.max_message_bytes`.
    TooLarge { len: usize, max: usize },
    /// Compressed with an encoding pitboss does not take (it takes gzip and deflate).
    Compressed { encoding: String },
    /// A compressed request message that inflates past `server.max_message_bytes`.
    Inflated { max: usize },
    /// Not gRPC's framing: a compressed flag without an encoding, a cut message.
    Malformed(String),
    /// The request carried no message.
    NoMessage,
    /// The request carried more than one message: the method streams its requests,
    /// which pitboss cannot split, and did not know it.
    Streaming { method: String },
    /// A second request message for a method that takes one (every method of
    /// pitboss's own services).
    SecondMessage { method: String },
    /// A `grpc-timeout` header that is not gRPC's form (1 to 8 digits and a unit).
    BadTimeout { value: String },
    /// A client-streaming or bidi method, with no `grpc_proxy` legacy to relay it to.
    NotRelayed { method: String, kind: &'static str },
}

/// The status of a refused transparent call: class `invalid_request` (the caller's,
/// never held against a backend), with the code gRPC gives each case: a message over
/// the limit is RESOURCE_EXHAUSTED (as for Bridge calls), a compression or a method
/// kind pitboss does not serve is UNIMPLEMENTED, broken framing is INTERNAL. (A
/// compressed message that inflates past the limit is RESOURCE_EXHAUSTED too, and a
/// second message where a method takes one, and a malformed `grpc-timeout`, are INTERNAL,
/// as grpc-go's servers answer.)
pub fn refusal_status(refusal: &Refusal, ctx: ErrorContext<'_>) -> Status {
    let (code, err): (tonic::Code, CallError) = match refusal {
        Refusal::TooLarge { len, max } => {
            let err = PoolError::RequestTooLarge {
                len: *len,
                max: *max,
                limit: "server.max_message_bytes",
            };
            return to_status(&err.into(), ErrorClass::InvalidRequest, false, ctx);
        }
        Refusal::Compressed { encoding } => (
            tonic::Code::Unimplemented,
            PoolError::InvalidRequest(format!(
                "the request is compressed with {encoding:?}, and pitboss takes only gzip, deflate or identity"
            ))
            .into(),
        ),
        Refusal::Inflated { max } => (
            tonic::Code::ResourceExhausted,
            PoolError::InvalidRequest(format!(
                "the request message inflates to more than server.max_message_bytes ({max} bytes)"
            ))
            .into(),
        ),
        Refusal::Malformed(why) => (
            tonic::Code::Internal,
            PoolError::InvalidRequest(format!("the request is not gRPC's framing: {why}")).into(),
        ),
        Refusal::NoMessage => (
            tonic::Code::Internal,
            PoolError::InvalidRequest("the request carried no message".into()).into(),
        ),
        Refusal::Streaming { method } => (
            tonic::Code::Unimplemented,
            PoolError::InvalidRequest(format!(
                "the request carried more than one message: {method} streams its requests (client-streaming or bidi); list it in transparent.client_streaming, or give pitboss the descriptors, so that pitboss relays it to a grpc_proxy legacy"
            ))
            .into(),
        ),
        Refusal::SecondMessage { method } => (
            tonic::Code::Internal,
            PoolError::InvalidRequest(format!(
                "the request carried more than one message, and {method} takes exactly one"
            ))
            .into(),
        ),
        Refusal::BadTimeout { value } => (
            tonic::Code::Internal,
            PoolError::InvalidRequest(format!(
                "the grpc-timeout header {value:?} is malformed: gRPC wants 1 to 8 digits and a unit (H, M, S, m, u or n), such as \"500m\" for 500 ms"
            ))
            .into(),
        ),
        Refusal::NotRelayed { method, kind } => (
            tonic::Code::Unimplemented,
            PoolError::InvalidRequest(format!(
                "{method} is {kind}: pitboss splits only unary and server-streaming methods, and relays the others only to a grpc_proxy legacy, which this one is not"
            ))
            .into(),
        ),
    };
    let status = to_status(&err, ErrorClass::InvalidRequest, false, ctx);
    Status::with_details_and_metadata(
        code,
        status.message(),
        status.details().to_vec().into(),
        status.metadata().clone(),
    )
}

/// The first `max` bytes of `s` (on a character boundary), saying how much was cut.
fn head(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}... ({} bytes cut)", &s[..end], s.len() - end)
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
    use crate::pool::ExhaustedReason;
    use crate::resilience::{classify, ExceptionRules};
    use crate::worker::WorkerId;
    use tonic::Code;

    /// A pool error's status, classified by `rules` as its backend would.
    fn pool_status(
        e: &PoolError,
        rules: &ExceptionRules,
        tracebacks: bool,
        ctx: ErrorContext<'_>,
    ) -> Status {
        to_status(&e.clone().into(), classify(e, rules), tracebacks, ctx)
    }

    fn ctx() -> ErrorContext<'static> {
        ErrorContext {
            backend: "legacy",
            attempts: 2,
            instance: "i-1",
        }
    }

    #[test]
    fn rich_details_follow_the_google_rpc_model() {
        let e = PoolError::PoolExhausted {
            reason: ExhaustedReason::QueueFull,
        };
        let s = pool_status(&e, &ExceptionRules::default(), true, ctx());
        assert_eq!(s.code(), Code::ResourceExhausted);
        let d = s.get_error_details();
        let info = d.error_info().expect("ErrorInfo");
        assert_eq!(info.reason, "pool_exhausted");
        assert_eq!(info.domain, "pitboss");
        assert_eq!(info.metadata.get("attempts").map(String::as_str), Some("2"));
        assert_eq!(
            info.metadata.get("backend").map(String::as_str),
            Some("legacy")
        );
        assert_eq!(
            d.retry_info().unwrap().retry_delay,
            Some(POOL_EXHAUSTED_PUSHBACK)
        );
        assert_eq!(s.metadata().get("grpc-retry-pushback-ms").unwrap(), "200");
        let crash = PoolError::WorkerCrashed {
            worker: WorkerId(4),
            detail: "x".into(),
            sent: true,
        };
        let s = pool_status(&crash, &ExceptionRules::default(), true, ctx());
        assert!(s.get_error_details().retry_info().is_none());
        assert_eq!(
            s.get_error_details().error_info().unwrap().metadata["worker"],
            "w4"
        );
    }

    #[test]
    fn python_exceptions_carry_type_and_message() {
        let e = PoolError::PythonException {
            worker: WorkerId(3),
            error_type: "ValueError".into(),
            message: "bad".into(),
            traceback: "Traceback\n  line".into(),
        };
        // An operator's rule: by default a ValueError is the command's failure.
        let rules = ExceptionRules::with(vec![("ValueError".into(), ErrorClass::InvalidRequest)]);
        let s = pool_status(&e, &rules, true, ctx());
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
        assert!(
            s.metadata().get("x-pitboss-traceback").is_none(),
            "the traceback travels in the details only"
        );
        let info = s.get_error_details().error_info().unwrap().clone();
        assert_eq!(info.metadata["traceback"], "Traceback\n  line");
        let off = pool_status(&e, &rules, false, ctx());
        assert!(!off
            .get_error_details()
            .error_info()
            .unwrap()
            .metadata
            .contains_key("traceback"));
    }

    /// The size of everything an error puts in the trailers, as sent.
    fn metadata_bytes(s: &Status) -> usize {
        let mut headers = tonic::codegen::http::HeaderMap::new();
        s.add_header(&mut headers).unwrap();
        for (k, v) in s.metadata().clone().into_headers().iter() {
            headers.insert(k.clone(), v.clone());
        }
        headers
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len())
            .sum()
    }

    /// Issue 13 item 7: huge messages, tracebacks and echoed names stay within the
    /// budget, cut on character boundaries, whatever the characters.
    #[test]
    fn error_metadata_stays_within_its_budget() {
        let rules = ExceptionRules::default();
        for text in [
            "m".repeat(20_000),
            "é".repeat(10_000),
            "\u{1F600}%\n".repeat(5_000),
        ] {
            let cases = [
                PoolError::PythonException {
                    worker: WorkerId(3),
                    error_type: text.clone(),
                    message: text.clone(),
                    traceback: text.clone(),
                },
                PoolError::UnknownCommand {
                    command: text.clone(),
                    known: vec![text.clone(), "echo".into()],
                },
                PoolError::InvalidRequest(text.clone()),
            ];
            for e in cases {
                let s = pool_status(&e, &rules, true, ctx());
                let n = metadata_bytes(&s);
                assert!(n <= budget::TOTAL, "{n} bytes of error metadata");
                assert!(s.message().len() <= budget::MESSAGE + 32);
                assert!(s.message().contains("bytes cut"), "{}", s.message());
            }
        }
        // A short error is untouched.
        let s = pool_status(
            &PoolError::InvalidRequest("bad n".into()),
            &rules,
            true,
            ctx(),
        );
        assert_eq!(s.message(), "invalid request: bad n");
    }

    /// Issue 17: the service's own status goes back as it was; pitboss's failures get
    /// its usual status, and a missing method is UNIMPLEMENTED, as gRPC names it.
    #[test]
    fn transparent_failures_pass_the_services_status_or_make_pitboss_own() {
        let mut trailers = tonic::codegen::http::HeaderMap::new();
        trailers.insert("grpc-status", "3".parse().unwrap());
        trailers.insert("x-why", "b is 0".parse().unwrap());
        let passed = CallError::Upstream(crate::resilience::UpstreamStatus {
            address: "http://legacy".into(),
            class: ErrorClass::InvalidRequest,
            status: Box::new(WireStatus {
                code: Code::InvalidArgument,
                message: "division by zero".into(),
                headers: None,
                trailers: trailers.clone(),
            }),
        });
        match transparent_failure(&passed, ErrorClass::InvalidRequest, true, ctx()) {
            TransparentFailure::Passed(s) => assert_eq!(s.trailers, trailers),
            other => panic!("{other:?}"),
        }
        let missing: CallError = PoolError::UnknownCommand {
            command: "/calc.Calculator/Nope".into(),
            known: vec![],
        }
        .into();
        match transparent_failure(&missing, ErrorClass::UnknownCommand, true, ctx()) {
            TransparentFailure::Made(s) => {
                assert_eq!(s.code(), Code::Unimplemented);
                assert_eq!(
                    s.get_error_details().error_info().unwrap().reason,
                    "unknown_command"
                );
            }
            other => panic!("{other:?}"),
        }
        let crash: CallError = PoolError::ShuttingDown.into();
        match transparent_failure(&crash, ErrorClass::ShuttingDown, true, ctx()) {
            TransparentFailure::Made(s) => assert_eq!(s.code(), Code::Unavailable),
            other => panic!("{other:?}"),
        }
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
                PoolError::RequestTooLarge {
                    len: 2048,
                    max: 1024,
                    limit: "pool.max_frame_bytes",
                },
                Code::ResourceExhausted,
            ),
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
                pool_status(&e, &ExceptionRules::default(), true, ctx()).code(),
                code,
                "{e}"
            );
        }
    }
}
