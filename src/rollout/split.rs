//! The split: the one owner of the `legacy` and `new` backends and of the session
//! pins. Every call the edge takes goes through it: unary calls, streams and the
//! session calls. It routes ([`Rollout::route_call`]), runs the call on the chosen
//! backend, falls back to legacy where that is safe, shadows to new, and records each
//! backend's outcome in the rollout statistics that drive automatic rollback.
//!
//! The edge only translates: proto to a [`Call`], and an [`Answer`] (its backend, and
//! a served result or a classified [`Failed`]) back to proto and status.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::controller::Rollout;
use super::flags::Route;
use super::sessions::SessionRoutes;
use super::shadow::{self, Outcome};
use crate::backend::{Backend, BackendStream, Role};
use crate::pool::{PoolError, PoolRequest, SessionTable};
use crate::proto as pb;
use crate::resilience::{Attempt, CallError, ErrorClass, Failed, Served};

/// Room for an `ExecuteResponse`'s or `ExecuteChunk`'s fields besides the payload
/// (content type, worker id, backend, attempts), generously.
pub const RESPONSE_OVERHEAD: usize = 1024;

/// A call as the split sees it: the request, and how it may be routed and retried.
#[derive(Debug, Clone)]
pub struct Call {
    pub request: PoolRequest,
    /// The client's sticky key (`routing_key`), if it sent one.
    pub routing_key: Option<String>,
    pub idempotent: bool,
}

/// What a call came to, and which backend answered it (legacy after a fallback).
#[derive(Debug)]
pub struct Answer<T> {
    pub role: Role,
    pub result: Result<T, Failed>,
}

impl<T> Answer<T> {
    fn new(role: Role, result: Result<T, Failed>) -> Self {
        Answer { role, result }
    }
}

/// Who follows a call through the split: told which backend answers it now (it
/// changes on a fallback), so a call abandoned midway is counted on the right one.
pub trait CallProgress: Sync {
    fn answering(&self, role: Role);
}

/// Nobody follows.
impl CallProgress for () {
    fn answering(&self, _role: Role) {}
}

/// Whether a failed call of `new` may be served again by legacy: only system-class
/// failures (the backend's fault, not the caller's), and only when running it again
/// is safe: refused before it ran, or idempotent. Pure; it reads the class table.
///
/// A command that new does not have (`unknown_command`) never ran there, and with
/// `commands = ["*"]` every command is routed to new, implemented or not: legacy may
/// serve it (a command neither has gets legacy's NOT_FOUND).
pub fn fallback_allowed(class: ErrorClass, idempotent: bool) -> bool {
    class.may_fall_back(idempotent)
}

/// The class of a call that ended without an answer: the client went away.
///
/// The client's own timer starts before the request leaves it, pitboss's when the
/// request arrives, so a client that gives up at its deadline does so a little before
/// pitboss's: a call abandoned within the slack (a tenth of its timeout, 20 to 250 ms)
/// of its deadline is `deadline_exceeded`; any other abandoned call is `cancelled`.
/// Pure.
pub fn unfinished_class(now: Instant, arrived: Instant, deadline: Option<Instant>) -> ErrorClass {
    let Some(deadline) = deadline else {
        return ErrorClass::Cancelled;
    };
    let slack = (deadline.saturating_duration_since(arrived) / 10)
        .clamp(DEADLINE_SLACK_MIN, DEADLINE_SLACK_MAX);
    if now + slack >= deadline {
        ErrorClass::DeadlineExceeded
    } else {
        ErrorClass::Cancelled
    }
}

/// The least and the most a client's timer may run ahead of pitboss's deadline and
/// still be counted as the deadline (a tenth of the client's timeout, within these).
pub const DEADLINE_SLACK_MIN: Duration = Duration::from_millis(20);
pub const DEADLINE_SLACK_MAX: Duration = Duration::from_millis(250);

/// A result after `earlier` attempts on another backend (new, before a fallback):
/// `attempts` counts the tries on both, as `ExecuteResponse.attempts` promises.
fn after_attempts(earlier: u32, result: Result<Served, Failed>) -> Result<Served, Failed> {
    match result {
        Ok(mut served) => {
            served.attempts += earlier;
            Ok(served)
        }
        Err(mut failed) => {
            failed.attempts += earlier;
            Err(failed)
        }
    }
}

/// The legacy and new backends, the rollout that splits between them, and the pins
/// of sessions to the backend that holds them.
pub struct Split {
    legacy: Backend,
    /// Absent when no `new` backend is configured: everything is legacy.
    new: Option<Backend>,
    rollout: Arc<Rollout>,
    /// Which backend holds each session, pinned at creation.
    sessions: SessionRoutes,
    /// The largest payload an answer may carry (`server.max_message_bytes` less
    /// [`RESPONSE_OVERHEAD`]).
    max_payload: usize,
    /// `server.max_message_bytes`, for the message of an answer over it.
    max_message_bytes: usize,
}

impl Split {
    pub fn new(
        legacy: Backend,
        new: Option<Backend>,
        rollout: Arc<Rollout>,
        sessions: SessionRoutes,
        max_message_bytes: usize,
    ) -> Split {
        Split {
            legacy,
            new,
            rollout,
            sessions,
            max_payload: max_message_bytes.saturating_sub(RESPONSE_OVERHEAD),
            max_message_bytes,
        }
    }

    pub fn rollout(&self) -> &Arc<Rollout> {
        &self.rollout
    }

    pub fn legacy(&self) -> &Backend {
        &self.legacy
    }

    pub fn new_backend(&self) -> Option<&Backend> {
        self.new.as_ref()
    }

    pub fn backend(&self, role: Role) -> &Backend {
        match (role, &self.new) {
            (Role::New, Some(b)) => b,
            _ => &self.legacy,
        }
    }

    pub fn backends(&self) -> impl Iterator<Item = &Backend> {
        std::iter::once(&self.legacy).chain(self.new.as_ref())
    }

    /// Sessions pinned to each role: (legacy, new).
    pub fn pinned_sessions(&self) -> (usize, usize) {
        self.sessions.counts()
    }

    /// Drops the pins of sessions their backend no longer has, and long idle ones.
    pub fn prune_sessions(&self, now: Instant) -> usize {
        self.sessions
            .prune(now, |id, role| self.backend(role).lacks_session(id))
    }

    /// Whether either backend is known to serve `command`.
    pub fn knows_command(&self, command: &str) -> bool {
        self.backends().any(|b| b.serves(command))
    }

    // === unary calls ===

    /// Runs a unary call: on its session's backend, else where the rollout sends it;
    /// on legacy again when new fails in a way that allows it; shadowed to new when the
    /// rollout says so (the shadow never touches the answer).
    pub async fn execute(
        self: &Arc<Self>,
        call: Call,
        progress: &dyn CallProgress,
    ) -> Answer<Served> {
        let route = self.route(&call.request, call.routing_key.as_deref(), call.idempotent);
        let first = route.answered_by();
        progress.answering(first);
        let deadline = call
            .request
            .deadline
            .unwrap_or_else(|| self.backend(first).deadline_from_now());
        let attempt = Attempt {
            request: call.request,
            idempotent: call.idempotent,
            number: 1,
            deadline,
        };
        let shadow = (route == Route::Shadow).then(|| self.spawn_shadow(attempt.clone()));
        let answer = match route {
            Route::New => {
                let mut retry_copy = attempt.clone();
                match self.run(Role::New, attempt).await {
                    Err(failed) if self.may_fall_back(&failed, &retry_copy) => {
                        if let Some(c) = &mut retry_copy.request.context {
                            c.attempt += failed.attempts;
                        }
                        self.rollout.fallback();
                        progress.answering(Role::Legacy);
                        tracing::info!(
                            command = %retry_copy.request.command,
                            class = failed.class.name(),
                            "new failed; serving the call from legacy"
                        );
                        let on_legacy = self.run(Role::Legacy, retry_copy).await;
                        Answer::new(Role::Legacy, after_attempts(failed.attempts, on_legacy))
                    }
                    other => Answer::new(Role::New, other),
                }
            }
            Route::Legacy | Route::Shadow => {
                Answer::new(Role::Legacy, self.run(Role::Legacy, attempt).await)
            }
        };
        if let Some(tx) = shadow {
            let _ = tx.send(
                answer
                    .result
                    .as_ref()
                    .ok()
                    .map(|s| s.response.payload.clone()),
            );
        }
        answer
    }

    /// Where a call goes: a session's backend, else the rollout's decision.
    fn route(&self, req: &PoolRequest, routing_key: Option<&str>, idempotent: bool) -> Route {
        match &req.session_id {
            Some(id) => match self.sessions.role(id) {
                Some(Role::New) if self.new.is_some() => Route::New,
                _ => Route::Legacy,
            },
            None => self.rollout.route_call(
                req.routing_name(),
                routing_key.filter(|k| !k.is_empty()),
                idempotent,
            ),
        }
    }

    /// May this failure of `new` be served by legacy instead?
    fn may_fall_back(&self, failed: &Failed, attempt: &Attempt) -> bool {
        attempt.request.session_id.is_none()
            && self.rollout.flags.get().fallback_to_legacy
            && fallback_allowed(failed.class, attempt.idempotent)
            && Instant::now() < attempt.deadline
    }

    /// Runs a call on one backend and records the outcome in its rolling statistics,
    /// also when the call is dropped unfinished (the client went away): as
    /// [`unfinished_class`], so the statistics see deadline failures.
    async fn run(&self, role: Role, attempt: Attempt) -> Result<Served, Failed> {
        let started = Instant::now();
        let session = attempt.request.session_id.clone();
        let mut unfinished = Unfinished {
            rollout: &self.rollout,
            role,
            started,
            deadline: attempt.deadline,
            finished: false,
        };
        let result = self
            .backend(role)
            .execute(attempt)
            .await
            .and_then(|served| self.check_size(served.response.payload.len(), served));
        unfinished.finished = true;
        if let (Some(id), Err(f)) = (&session, &result) {
            self.unpin_if_gone(id, f.class);
        }
        self.record_outcome(role, started.elapsed(), result.as_ref().err());
        result
    }

    /// An answer that could not be sent: over `server.max_message_bytes`, gRPC itself
    /// would fail it with no class and no details, and the call would be counted as
    /// served. Checked before sending, so it is a classified, counted failure.
    fn check_size<T>(&self, payload_len: usize, ok: T) -> Result<T, Failed> {
        if payload_len <= self.max_payload {
            return Ok(ok);
        }
        Err(Failed {
            class: ErrorClass::ResponseTooLarge,
            error: CallError::ResponseTooLarge(format!(
                "{payload_len} bytes, over server.max_message_bytes ({} bytes, less {RESPONSE_OVERHEAD} for the response's other fields); return less, stream it in chunks, or raise server.max_message_bytes",
                self.max_message_bytes
            )),
            attempts: 1,
            budget_exhausted: false,
        })
    }

    /// Records a backend's answer in its rolling statistics. A command that new lacks
    /// while legacy serves it is new's regression, not the caller's typo, so it counts
    /// as new's error although its class (`unknown_command`) usually does not.
    fn record_outcome(&self, role: Role, latency: Duration, failure: Option<&Failed>) {
        let counted = failure.is_some_and(|f| {
            super::stats::counts_as_error(f.class)
                || (role == Role::New && self.legacy_serves_what_new_lacks(&f.error))
        });
        self.rollout
            .record_as(role, latency, failure.map(|f| f.class), counted);
    }

    /// Whether `error` is new saying it lacks a command that legacy (a pool) serves.
    fn legacy_serves_what_new_lacks(&self, error: &CallError) -> bool {
        match error.pool() {
            Some(PoolError::UnknownCommand { command, .. }) => self.legacy.serves(command),
            _ => false,
        }
    }

    /// Runs `new` alongside legacy, compares, and never touches the client's answer.
    /// Legacy's payload (or `None` when it failed) is sent on the returned channel.
    fn spawn_shadow(self: &Arc<Self>, attempt: Attempt) -> oneshot::Sender<Option<Bytes>> {
        let (tx, legacy_result) = oneshot::channel::<Option<Bytes>>();
        let split = self.clone();
        tokio::spawn(async move {
            let deadline = attempt.deadline;
            let command = attempt.request.routing_name().to_string();
            // A transparent call's response type, when known: compared field by field.
            let message = attempt.request.wire.as_ref().and_then(|w| w.output.clone());
            let started = Instant::now();
            let new = split.backend(Role::New);
            let new_result = match tokio::time::timeout_at(deadline, new.execute(attempt)).await {
                Ok(r) => r,
                Err(_) => Err(new.failed(CallError::DeadlineExceeded {
                    after: started.elapsed(),
                })),
            };
            split.record_outcome(Role::New, started.elapsed(), new_result.as_ref().err());
            let legacy = legacy_result.await.ok().flatten();
            let flags = split.rollout.flags.get();
            let outcome = match (&legacy, &new_result) {
                (Some(l), Ok(n)) => {
                    if shadow::same_answer(
                        flags.shadow.compare,
                        &flags.shadow.ignore_fields,
                        message.as_ref(),
                        l,
                        &n.response.payload,
                    ) {
                        Outcome::Match
                    } else {
                        Outcome::Mismatch
                    }
                }
                _ => Outcome::Error,
            };
            let nth = split.rollout.shadow_result(outcome);
            match (outcome, legacy, new_result) {
                (Outcome::Mismatch, Some(l), Ok(n)) if shadow::log_this_mismatch(nth) => {
                    tracing::warn!(
                        command,
                        mismatch = nth,
                        legacy = %shadow::describe(message.as_ref(), &l, 512),
                        new = %shadow::describe(message.as_ref(), &n.response.payload, 512),
                        "shadow mismatch"
                    );
                }
                (Outcome::Error, _, Err(f)) => {
                    tracing::debug!(command, "shadow call failed on new: {}", f.error);
                }
                _ => {}
            }
        });
        tx
    }

    // === streams ===

    /// Starts a streaming call where a unary call would go. Streams are not shadowed
    /// (their chunks cannot be held back to compare), and fall back to legacy only
    /// when new fails to start them, before any chunk.
    pub async fn open_stream(
        &self,
        call: Call,
        progress: &dyn CallProgress,
    ) -> Result<SplitStream, (Role, Failed)> {
        let mut role = self
            .route(&call.request, call.routing_key.as_deref(), call.idempotent)
            .answered_by();
        progress.answering(role);
        let mut request = call.request;
        let deadline = *request
            .deadline
            .get_or_insert_with(|| self.backend(role).deadline_from_now());
        let mut attempts = 1;
        let mut started = Instant::now();
        let mut opened = self.start_stream(role, request.clone()).await;
        if let Err(failed) = &opened {
            let attempt = Attempt {
                deadline,
                request: request.clone(),
                idempotent: call.idempotent,
                number: 1,
            };
            if role == Role::New && self.may_fall_back(failed, &attempt) {
                self.rollout.fallback();
                role = Role::Legacy;
                progress.answering(role);
                attempts = 2;
                started = Instant::now();
                request.deadline = Some(deadline);
                if let Some(c) = &mut request.context {
                    c.attempt = 2;
                }
                opened = self.start_stream(role, request).await;
            }
        }
        match opened {
            Ok(stream) => Ok(SplitStream {
                split_rollout: self.rollout.clone(),
                role,
                attempts,
                started,
                deadline,
                max_payload: self.max_payload,
                max_message_bytes: self.max_message_bytes,
                stream,
                finished: false,
            }),
            Err(mut failed) => {
                failed.attempts = attempts;
                Err((role, failed))
            }
        }
    }

    /// Starts a stream on one backend. One that does not start is recorded in the
    /// backend's rolling statistics here, as a unary call's failure is.
    async fn start_stream(&self, role: Role, req: PoolRequest) -> Result<BackendStream, Failed> {
        let started = Instant::now();
        let result = self.backend(role).open_stream(req).await;
        if let Err(failed) = &result {
            self.record_outcome(role, started.elapsed(), Some(failed));
        }
        result
    }

    // === sessions ===

    /// Creates a session (with the client's id, or a new one) on the backend the
    /// rollout picks for it, and pins it there for its whole life.
    pub async fn create_session(
        &self,
        id: Option<String>,
        metadata: BTreeMap<String, String>,
        routing_key: Option<&str>,
        progress: &dyn CallProgress,
    ) -> Answer<pb::Session> {
        let id = id.unwrap_or_else(SessionTable::new_id);
        if let Err(e) = SessionTable::validate_id(&id) {
            return Answer::new(Role::Legacy, Err(self.legacy.failed(e.into())));
        }
        if let Err((role, failed)) = self.refuse_if_session_lives(&id).await {
            return Answer::new(role, Err(failed));
        }
        let mut role = self
            .rollout
            .route_session(&id, routing_key.filter(|k| !k.is_empty()));
        progress.answering(role);
        let mut result = self
            .backend(role)
            .create_session(id.clone(), metadata.clone())
            .await;
        if let (Role::New, Err(failed)) = (role, &result) {
            // Nothing ran yet, so falling back is always safe here.
            if self.rollout.flags.get().fallback_to_legacy && fallback_allowed(failed.class, true) {
                self.rollout.fallback();
                role = Role::Legacy;
                progress.answering(role);
                result = self.legacy.create_session(id.clone(), metadata).await;
            }
        }
        if result.is_ok() {
            self.sessions.pin(&id, role);
        }
        Answer::new(role, result)
    }

    /// CreateSession with an explicit id: refused only while the backend that holds
    /// the pinned session still has it. A pin can outlive its session (expired by TTL,
    /// lost with its worker); then it is dropped and the id is free again at once.
    async fn refuse_if_session_lives(&self, id: &str) -> Result<(), (Role, Failed)> {
        let Some(role) = self.sessions.peek(id) else {
            return Ok(());
        };
        let backend = self.backend(role);
        match backend.get_session(id).await {
            Ok(_) => Err((
                role,
                backend.failed(PoolError::SessionExists(id.to_string()).into()),
            )),
            Err(failed) if self.unpin_if_gone(id, failed.class) => Ok(()),
            Err(failed) => Err((role, failed)),
        }
    }

    /// The session, from the backend it is pinned to.
    pub async fn get_session(&self, id: &str) -> Answer<pb::Session> {
        let role = self.sessions.role(id).unwrap_or(Role::Legacy);
        let result = self.backend(role).get_session(id).await;
        if let Err(failed) = &result {
            self.unpin_if_gone(id, failed.class);
        }
        Answer::new(role, result)
    }

    /// Closes the session on the backend it is pinned to, and ends the pin.
    pub async fn close_session(&self, id: &str) -> Answer<()> {
        let role = self.sessions.role(id).unwrap_or(Role::Legacy);
        let result = self.backend(role).close_session(id).await;
        self.sessions.unpin(id);
        Answer::new(role, result)
    }

    /// Ends the pin of session `id` when a failure of class `class` says the session
    /// no longer exists on its backend (expired, closed or lost with its worker).
    /// Returns whether it did.
    fn unpin_if_gone(&self, id: &str, class: ErrorClass) -> bool {
        let gone = matches!(class, ErrorClass::SessionNotFound | ErrorClass::SessionLost);
        if gone {
            self.sessions.unpin(id);
        }
        gone
    }

    /// The commands of both backends, each listing the backends that serve it.
    pub async fn commands(&self) -> Vec<pb::CommandInfo> {
        let mut commands: Vec<pb::CommandInfo> = Vec::new();
        for backend in self.backends() {
            for mut c in backend.commands().await {
                match commands.iter_mut().find(|k| k.name == c.name) {
                    Some(known) => known.backends.push(backend.role.as_str().into()),
                    None => {
                        c.backends = vec![backend.role.as_str().into()];
                        commands.push(c);
                    }
                }
            }
        }
        commands
    }
}

/// Records a backend run in the rollout statistics when it is dropped unfinished.
struct Unfinished<'a> {
    rollout: &'a Rollout,
    role: Role,
    started: Instant,
    deadline: Instant,
    finished: bool,
}

impl Drop for Unfinished<'_> {
    fn drop(&mut self) {
        if !self.finished {
            let class = unfinished_class(Instant::now(), self.started, Some(self.deadline));
            self.rollout
                .record(self.role, self.started.elapsed(), Some(class));
        }
    }
}

/// A streaming call under way on one backend. Its outcome is recorded in that
/// backend's rolling statistics once: when it ends, fails, or is dropped unfinished
/// (the client went away: as [`unfinished_class`]).
pub struct SplitStream {
    split_rollout: Arc<Rollout>,
    role: Role,
    attempts: u32,
    started: Instant,
    deadline: Instant,
    max_payload: usize,
    max_message_bytes: usize,
    stream: BackendStream,
    finished: bool,
}

impl SplitStream {
    /// The backend serving it.
    pub fn role(&self) -> Role {
        self.role
    }

    /// Tries on both backends: 2 after a fallback.
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// The worker serving it; empty while not known (an upstream names it last).
    pub fn worker(&self) -> String {
        self.stream.worker()
    }

    /// The response headers a `grpc_proxy`'s service sent (a transparent call).
    pub fn headers(&self) -> Option<http::HeaderMap> {
        self.stream.headers()
    }

    /// Its trailers, once the stream has ended with OK (a transparent call).
    pub fn trailers(&self) -> Option<http::HeaderMap> {
        self.stream.trailers()
    }

    /// The next chunk as (payload, content type); `None` after the last one. A chunk
    /// over `server.max_message_bytes` fails the stream as `response_too_large`.
    pub async fn next(&mut self) -> Option<Result<(Bytes, String), Failed>> {
        if self.finished {
            return None;
        }
        let next = match self.stream.next().await {
            Some(Ok((payload, content_type))) => {
                if payload.len() <= self.max_payload {
                    return Some(Ok((payload, content_type)));
                }
                Some(Err(Failed {
                    class: ErrorClass::ResponseTooLarge,
                    error: CallError::ResponseTooLarge(format!(
                        "a chunk of {} bytes, over server.max_message_bytes ({} bytes, less {RESPONSE_OVERHEAD} for the chunk's other fields); send smaller chunks, or raise server.max_message_bytes",
                        payload.len(),
                        self.max_message_bytes
                    )),
                    attempts: 1,
                    budget_exhausted: false,
                }))
            }
            other => other,
        };
        self.finished = true;
        let failure = match &next {
            Some(Err(failed)) => Some(failed.class),
            _ => None,
        };
        self.split_rollout
            .record(self.role, self.started.elapsed(), failure);
        next.map(|r| {
            r.map_err(|mut f| {
                f.attempts = self.attempts;
                f
            })
        })
    }

    /// How the client going away now would be counted.
    fn unfinished(&self) -> ErrorClass {
        unfinished_class(Instant::now(), self.started, Some(self.deadline))
    }
}

impl Drop for SplitStream {
    fn drop(&mut self) {
        if !self.finished {
            let class = self.unfinished();
            self.split_rollout
                .record(self.role, self.started.elapsed(), Some(class));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fallback_only_for_system_failures_that_are_safe_to_rerun() {
        // Refused before running: always safe.
        assert!(fallback_allowed(ErrorClass::CircuitOpen, false));
        assert!(fallback_allowed(ErrorClass::PoolExhausted, false));
        // Ran, maybe: only when idempotent.
        assert!(fallback_allowed(ErrorClass::WorkerCrashed, true));
        assert!(!fallback_allowed(ErrorClass::WorkerCrashed, false));
        // The caller's own doing, or the application's answer: never.
        assert!(!fallback_allowed(ErrorClass::InvalidRequest, true));
        assert!(!fallback_allowed(ErrorClass::PythonException, true));
        assert!(!fallback_allowed(ErrorClass::DeadlineExceeded, true));
        // A command new lacks never ran there (issue 13, item 5).
        assert!(fallback_allowed(ErrorClass::UnknownCommand, false));
    }

    /// Issue 13, item 10: after a fallback, `attempts` counts new's tries too.
    #[test]
    fn attempts_after_a_fallback_count_both_backends() {
        let served = Served {
            response: crate::pool::PoolResponse {
                payload: bytes::Bytes::new(),
                content_type: String::new(),
                worker: crate::worker::WorkerId(1),
            },
            attempts: 1,
            remote_worker: None,
            wire: None,
        };
        assert_eq!(after_attempts(3, Ok(served)).unwrap().attempts, 4);
        let failed = Failed {
            error: PoolError::ShuttingDown.into(),
            class: ErrorClass::ShuttingDown,
            attempts: 2,
            budget_exhausted: false,
        };
        assert_eq!(after_attempts(3, Err(failed)).unwrap_err().attempts, 5);
    }

    #[tokio::test(start_paused = true)]
    async fn an_abandoned_call_is_a_deadline_near_its_deadline_else_a_cancel() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        // No deadline: the client cancelled.
        assert_eq!(
            unfinished_class(t0 + ms(5000), t0, None),
            ErrorClass::Cancelled
        );
        // 1 s timeout: 100 ms of slack.
        let d = Some(t0 + ms(1000));
        assert_eq!(unfinished_class(t0 + ms(500), t0, d), ErrorClass::Cancelled);
        assert_eq!(unfinished_class(t0 + ms(899), t0, d), ErrorClass::Cancelled);
        assert_eq!(
            unfinished_class(t0 + ms(905), t0, d),
            ErrorClass::DeadlineExceeded
        );
        assert_eq!(
            unfinished_class(t0 + ms(1000), t0, d),
            ErrorClass::DeadlineExceeded
        );
        assert_eq!(
            unfinished_class(t0 + ms(2000), t0, d),
            ErrorClass::DeadlineExceeded
        );
        // Short timeouts get at least 20 ms, long ones at most 250 ms.
        let d = Some(t0 + ms(100));
        assert_eq!(
            unfinished_class(t0 + ms(85), t0, d),
            ErrorClass::DeadlineExceeded
        );
        assert_eq!(unfinished_class(t0 + ms(75), t0, d), ErrorClass::Cancelled);
        let d = Some(t0 + ms(60_000));
        assert_eq!(
            unfinished_class(t0 + ms(59_800), t0, d),
            ErrorClass::DeadlineExceeded
        );
        assert_eq!(
            unfinished_class(t0 + ms(59_000), t0, d),
            ErrorClass::Cancelled
        );
    }
}
