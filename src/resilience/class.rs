//! The one error classification. Every failure is classified exactly once into an
//! [`ErrorClass`]; retry, circuit breakers, metrics and the gRPC edge all read the same
//! row of [`TABLE`]. `docs/ERRORS.md` shows the same table (a test keeps them equal).

use std::fmt;

use tonic::Code;

use crate::config::ErrorsSection;
use crate::pool::PoolError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorClass {
    WorkerCrashed,
    WorkerTimeout,
    DeadlineExceeded,
    PoolExhausted,
    CircuitOpen,
    ProtocolError,
    PythonException,
    InvalidRequest,
    UnknownCommand,
    SessionLost,
    SessionNotFound,
    Cancelled,
    ShuttingDown,
    Internal,
    /// The adapter's answer is bigger than pitboss may send (`server.max_message_bytes`)
    /// or than a frame may carry (`pool.max_frame_bytes`): the server's fault, not the
    /// caller's; running it again gives the same answer.
    ResponseTooLarge,
    /// CreateSession with the id of a session that is alive: the caller's doing, and
    /// `ALREADY_EXISTS` is what gRPC clients test for in a create-or-get.
    SessionExists,
}

/// How bad a failure is, for logs and alerts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    /// The caller's own doing; nothing is wrong with pitboss or the backend.
    Info,
    /// Load or transient trouble; worth watching.
    Warning,
    /// The backend is misbehaving.
    Error,
}

/// Whether a failed request may be sent again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// The request provably did not run (or running it twice is harmless).
    Always,
    /// The request may have run: only if the client marked it idempotent.
    IfIdempotent,
    Never,
}

/// One row of the classification table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Row {
    pub class: ErrorClass,
    pub name: &'static str,
    pub code: Code,
    pub severity: Severity,
    pub retry: Retry,
    /// Counts against circuit breakers. Application errors never do: a backend that
    /// correctly rejects bad input is healthy.
    pub breaker: bool,
    /// Counts as the backend's error for the rollout's auto-rollback rules: the
    /// backend's own failures, its code's exceptions included, never the caller's.
    pub rollback: bool,
    /// Whether a call of `new` that failed so may be served again by legacy: only
    /// failures that are not the caller's, and only when running the call again is
    /// safe (refused before it ran, or idempotent).
    pub fallback: Retry,
}

use ErrorClass as C;
use Retry as R;
use Severity as S;

/// The classification table: one row per class.
pub const TABLE: [Row; 16] = [
    row(
        C::WorkerCrashed,
        "worker_crashed",
        Code::Unavailable,
        S::Error,
        R::IfIdempotent,
        true,
        true,
        R::IfIdempotent,
    ),
    row(
        C::WorkerTimeout,
        "worker_timeout",
        Code::DeadlineExceeded,
        S::Warning,
        R::IfIdempotent,
        true,
        true,
        R::IfIdempotent,
    ),
    row(
        C::DeadlineExceeded,
        "deadline_exceeded",
        Code::DeadlineExceeded,
        S::Warning,
        R::Never,
        false,
        false,
        R::Never,
    ),
    row(
        C::PoolExhausted,
        "pool_exhausted",
        Code::ResourceExhausted,
        S::Warning,
        R::Always,
        false,
        true,
        R::Always,
    ),
    row(
        C::CircuitOpen,
        "circuit_open",
        Code::Unavailable,
        S::Warning,
        R::Always,
        false,
        true,
        R::Always,
    ),
    row(
        C::ProtocolError,
        "protocol_error",
        Code::Unavailable,
        S::Error,
        R::IfIdempotent,
        true,
        true,
        R::IfIdempotent,
    ),
    row(
        C::PythonException,
        "python_exception",
        Code::Unknown,
        S::Info,
        R::Never,
        false,
        true,
        R::Never,
    ),
    row(
        C::InvalidRequest,
        "invalid_request",
        Code::InvalidArgument,
        S::Info,
        R::Never,
        false,
        false,
        R::Never,
    ),
    row(
        C::UnknownCommand,
        "unknown_command",
        Code::NotFound,
        S::Info,
        R::Never,
        false,
        false,
        R::Always,
    ),
    row(
        C::SessionLost,
        "session_lost",
        Code::FailedPrecondition,
        S::Warning,
        R::Never,
        false,
        false,
        R::Never,
    ),
    row(
        C::SessionNotFound,
        "session_not_found",
        Code::NotFound,
        S::Info,
        R::Never,
        false,
        false,
        R::Never,
    ),
    row(
        C::Cancelled,
        "cancelled",
        Code::Cancelled,
        S::Info,
        R::Never,
        false,
        false,
        R::Never,
    ),
    row(
        C::ShuttingDown,
        "shutting_down",
        Code::Unavailable,
        S::Warning,
        R::Always,
        false,
        false,
        R::Always,
    ),
    row(
        C::Internal,
        "internal",
        Code::Internal,
        S::Error,
        R::Never,
        true,
        true,
        R::Never,
    ),
    row(
        C::ResponseTooLarge,
        "response_too_large",
        Code::Internal,
        S::Error,
        R::Never,
        false,
        true,
        R::Never,
    ),
    row(
        C::SessionExists,
        "session_exists",
        Code::AlreadyExists,
        S::Info,
        R::Never,
        false,
        false,
        R::Never,
    ),
];

#[allow(clippy::too_many_arguments)]
const fn row(
    class: ErrorClass,
    name: &'static str,
    code: Code,
    severity: Severity,
    retry: Retry,
    breaker: bool,
    rollback: bool,
    fallback: Retry,
) -> Row {
    Row {
        class,
        name,
        code,
        severity,
        retry,
        breaker,
        rollback,
        fallback,
    }
}

impl ErrorClass {
    pub const ALL: [ErrorClass; 16] = [
        C::WorkerCrashed,
        C::WorkerTimeout,
        C::DeadlineExceeded,
        C::PoolExhausted,
        C::CircuitOpen,
        C::ProtocolError,
        C::PythonException,
        C::InvalidRequest,
        C::UnknownCommand,
        C::SessionLost,
        C::SessionNotFound,
        C::Cancelled,
        C::ShuttingDown,
        C::Internal,
        C::ResponseTooLarge,
        C::SessionExists,
    ];

    /// This class's row. The table is indexed by discriminant, which a test checks.
    pub fn row(self) -> &'static Row {
        &TABLE[self as usize]
    }

    pub fn name(self) -> &'static str {
        self.row().name
    }

    pub fn from_name(name: &str) -> Option<ErrorClass> {
        TABLE.iter().find(|r| r.name == name).map(|r| r.class)
    }

    /// Whether a request that failed with this class may be retried.
    pub fn retryable(self, idempotent: bool) -> bool {
        self.row().retry.allows(idempotent)
    }

    /// Whether it counts as the backend's error for auto-rollback.
    pub fn counts_for_rollback(self) -> bool {
        self.row().rollback
    }

    /// Whether a failed call of `new` may be served again by legacy.
    pub fn may_fall_back(self, idempotent: bool) -> bool {
        self.row().fallback.allows(idempotent)
    }
}

impl Retry {
    /// Whether running the call again is allowed, given whether it is idempotent.
    pub fn allows(self, idempotent: bool) -> bool {
        match self {
            Retry::Always => true,
            Retry::IfIdempotent => idempotent,
            Retry::Never => false,
        }
    }
}

impl fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Maps Python exception type names to classes. Rules are matched in order on the
/// exception's type name (`ValueError`, or `module.Name` for non-builtins); the first
/// match wins; an unmatched exception is `python_exception`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExceptionRules {
    rules: Vec<(String, ErrorClass)>,
}

impl Default for ExceptionRules {
    /// `TimeoutError` is the worker being too slow; `MemoryError` means the process is
    /// in trouble. No exception type is the caller's fault by default: a `KeyError` or
    /// `ValueError` raised by the command's code is the command failing to produce an
    /// answer (a regression to catch, not bad input to ignore). The caller's errors
    /// arrive structurally instead: the runtime sends ERROR kind `invalid_request` for
    /// a payload it cannot decode and for `pitboss_worker.InvalidRequest`.
    fn default() -> Self {
        ExceptionRules {
            rules: vec![
                ("TimeoutError".into(), C::WorkerTimeout),
                ("MemoryError".into(), C::WorkerCrashed),
            ],
        }
    }
}

impl ExceptionRules {
    /// The defaults, with `extra` rules consulted first (operators' rules win).
    pub fn with(extra: Vec<(String, ErrorClass)>) -> ExceptionRules {
        let mut rules = extra;
        rules.extend(ExceptionRules::default().rules);
        ExceptionRules { rules }
    }

    /// The operator's `[errors.rules]`, then the defaults. The config checked each
    /// class name against `config::ERROR_CLASS_NAMES`, which a test keeps equal to
    /// [`TABLE`]'s names, so every rule finds its class.
    pub fn from_section(errors: &ErrorsSection) -> ExceptionRules {
        ExceptionRules::with(
            errors
                .rules
                .iter()
                .filter_map(|(k, v)| ErrorClass::from_name(v.as_str()).map(|c| (k.clone(), c)))
                .collect(),
        )
    }

    pub fn classify(&self, exception_type: &str) -> ErrorClass {
        let short = exception_type.rsplit('.').next().unwrap_or(exception_type);
        self.rules
            .iter()
            .find(|(name, _)| name == exception_type || name == short)
            .map(|(_, class)| *class)
            .unwrap_or(C::PythonException)
    }
}

/// Classifies a pool error, exactly once.
pub fn classify(err: &PoolError, rules: &ExceptionRules) -> ErrorClass {
    match err {
        PoolError::WorkerCrashed { .. }
        | PoolError::WorkerGone { .. }
        | PoolError::Unavailable(_) => C::WorkerCrashed,
        PoolError::PoolExhausted { .. } | PoolError::TooManySessions { .. } => C::PoolExhausted,
        PoolError::Timeout { .. } => C::DeadlineExceeded,
        PoolError::Protocol { .. } => C::ProtocolError,
        PoolError::PythonException { error_type, .. } => rules.classify(error_type),
        PoolError::UnknownCommand { .. } => C::UnknownCommand,
        PoolError::ResponseTooLarge(_) => C::ResponseTooLarge,
        PoolError::InvalidRequest(_) | PoolError::RequestTooLarge { .. } => C::InvalidRequest,
        PoolError::SessionExists(_) => C::SessionExists,
        PoolError::SessionLost { .. } => C::SessionLost,
        PoolError::SessionNotFound { .. } => C::SessionNotFound,
        PoolError::Cancelled => C::Cancelled,
        PoolError::ShuttingDown => C::ShuttingDown,
        PoolError::Internal(_) => C::Internal,
    }
}

/// The table as Markdown, exactly as `docs/ERRORS.md` shows it.
pub fn markdown_table() -> String {
    let mut out = String::from(
        "| class | gRPC code | severity | retryable | counts against breakers | counts for rollback | new may fall back to legacy |\n|---|---|---|---|---|---|---|\n",
    );
    let again = |r: Retry| match r {
        Retry::Always => "always",
        Retry::IfIdempotent => "if idempotent",
        Retry::Never => "never",
    };
    let yes = |b: bool| if b { "yes" } else { "no" };
    for r in TABLE {
        out.push_str(&format!(
            "| `{}` | `{:?}` | {:?} | {} | {} | {} | {} |\n",
            r.name,
            r.code,
            r.severity,
            again(r.retry),
            yes(r.breaker),
            yes(r.rollback),
            again(r.fallback)
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::worker::WorkerId;

    #[test]
    fn the_config_knows_exactly_the_table_s_class_names() {
        let names: Vec<&str> = TABLE.iter().map(|r| r.name).collect();
        assert_eq!(names, crate::config::ERROR_CLASS_NAMES);
    }

    #[test]
    fn the_table_is_indexed_by_class_and_names_are_unique() {
        for (i, class) in ErrorClass::ALL.iter().enumerate() {
            assert_eq!(TABLE[i].class, *class);
            assert_eq!(class.row().class, *class);
            assert_eq!(ErrorClass::from_name(class.name()), Some(*class));
        }
        let mut names: Vec<_> = TABLE.iter().map(|r| r.name).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), TABLE.len());
    }

    /// Row by row: the decisions every layer relies on.
    #[test]
    fn each_row_says_what_the_issue_asks() {
        let expect = [
            (C::WorkerCrashed, Code::Unavailable, R::IfIdempotent, true),
            (
                C::WorkerTimeout,
                Code::DeadlineExceeded,
                R::IfIdempotent,
                true,
            ),
            (C::DeadlineExceeded, Code::DeadlineExceeded, R::Never, false),
            (C::PoolExhausted, Code::ResourceExhausted, R::Always, false),
            (C::CircuitOpen, Code::Unavailable, R::Always, false),
            (C::ProtocolError, Code::Unavailable, R::IfIdempotent, true),
            (C::PythonException, Code::Unknown, R::Never, false),
            (C::InvalidRequest, Code::InvalidArgument, R::Never, false),
            (C::UnknownCommand, Code::NotFound, R::Never, false),
            (C::SessionLost, Code::FailedPrecondition, R::Never, false),
            (C::SessionNotFound, Code::NotFound, R::Never, false),
            (C::Cancelled, Code::Cancelled, R::Never, false),
            (C::ShuttingDown, Code::Unavailable, R::Always, false),
            (C::Internal, Code::Internal, R::Never, true),
            (C::ResponseTooLarge, Code::Internal, R::Never, false),
            (C::SessionExists, Code::AlreadyExists, R::Never, false),
        ];
        for (class, code, retry, breaker) in expect {
            let r = class.row();
            assert_eq!(
                (r.code, r.retry, r.breaker),
                (code, retry, breaker),
                "{class}"
            );
        }
        assert!(C::WorkerCrashed.retryable(true));
        assert!(!C::WorkerCrashed.retryable(false));
        assert!(C::PoolExhausted.retryable(false));
        assert!(!C::PythonException.retryable(true));
    }

    #[test]
    fn python_exceptions_follow_the_rules() {
        let rules = ExceptionRules::with(vec![("mylib.RateLimited".into(), C::PoolExhausted)]);
        // Issue 13, item 5: raised by the command's code, these are its failures.
        for t in [
            "ValueError",
            "TypeError",
            "KeyError",
            "json.decoder.JSONDecodeError",
            "pitboss_worker.ResultError",
        ] {
            assert_eq!(rules.classify(t), C::PythonException, "{t}");
        }
        assert_eq!(rules.classify("TimeoutError"), C::WorkerTimeout);
        assert_eq!(rules.classify("MemoryError"), C::WorkerCrashed);
        assert_eq!(rules.classify("mylib.RateLimited"), C::PoolExhausted);
        assert_eq!(rules.classify("ZeroDivisionError"), C::PythonException);
        let e = PoolError::PythonException {
            worker: WorkerId(1),
            error_type: "mylib.RateLimited".into(),
            message: String::new(),
            traceback: String::new(),
        };
        assert_eq!(classify(&e, &rules), C::PoolExhausted);
        // An operator may still say otherwise.
        let strict = ExceptionRules::with(vec![("ValueError".into(), C::InvalidRequest)]);
        assert_eq!(strict.classify("ValueError"), C::InvalidRequest);
    }

    #[test]
    fn docs_errors_md_shows_the_same_table() {
        let doc = include_str!("../../docs/ERRORS.md");
        assert!(
            doc.contains(&markdown_table()),
            "docs/ERRORS.md is out of date; paste this table:\n{}",
            markdown_table()
        );
    }
}
