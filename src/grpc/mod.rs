//! The gRPC edge: `pitboss.v1.Bridge` and `pitboss.v1.Admin`. Decodes requests, applies
//! the client's deadline, splits calls between the `legacy` and the `new` backend
//! (the rollout), and maps results to statuses (in [`status`], only there).

pub mod deadline;
pub mod status;

pub mod admin;
pub mod record;
pub mod sessions;

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::metadata::MetadataValue;
use tonic::{Request, Response, Status};

use crate::backend::{Backend, Role};
use crate::pool::{PoolError, PoolRequest};
use crate::resilience::{Attempt, ErrorClass, Failed, Served};
use crate::rollout::controller::Rollout;
use crate::rollout::shadow::{self, Outcome};
use crate::rollout::Route;

/// Generated code for `proto/pitboss/v1/*.proto`.
/// The generated `pitboss.v1` types, under the name the edge has always used.
pub use crate::proto as pb;

pub use admin::AdminService;
use pb::bridge_server::Bridge;

/// State shared by both services.
pub struct Edge {
    pub legacy: Backend,
    /// Absent when no `new` backend is configured: everything is legacy.
    pub new: Option<Backend>,
    pub rollout: Arc<Rollout>,
    /// Which backend holds each session, pinned at creation.
    pub sessions: sessions::SessionRoutes,
    pub include_tracebacks: bool,
    /// Set when shutdown starts: new calls are refused with UNAVAILABLE.
    pub draining: AtomicBool,
    pub started: tokio::time::Instant,
    pub instance_id: String,
    /// `instance_id` as a ready metadata value, built once rather than per response.
    pub instance_header: Option<MetadataValue<tonic::metadata::Ascii>>,
    /// The admin bearer token; `None`: read-only admin calls only.
    pub admin_token: Option<String>,
    /// Commands the backends registered: the only values of the `command` label.
    pub commands: crate::telemetry::KnownCommands,
    /// `server.max_message_bytes`: no response message may be bigger.
    pub max_message_bytes: usize,
}

/// Room for an `ExecuteResponse`'s or `ExecuteChunk`'s fields besides the payload
/// (content type, worker id, backend, attempts), generously.
const RESPONSE_OVERHEAD: usize = 1024;

/// Whether a failed call of `new` may be served again by legacy: only system-class
/// failures (the backend's fault, not the caller's), and only when running it again
/// is safe: refused before it ran, or idempotent. Pure.
///
/// A command that new does not have (`unknown_command`) never ran there, and with
/// `commands = ["*"]` every command is routed to new, implemented or not: legacy may
/// serve it (a command neither has gets legacy's NOT_FOUND).
pub fn fallback_allowed(class: ErrorClass, idempotent: bool) -> bool {
    class.may_fall_back(idempotent)
}

impl Edge {
    pub fn backend(&self, role: Role) -> &Backend {
        match (role, &self.new) {
            (Role::New, Some(b)) => b,
            _ => &self.legacy,
        }
    }

    pub fn backends(&self) -> impl Iterator<Item = &Backend> {
        std::iter::once(&self.legacy).chain(self.new.as_ref())
    }

    fn refuse_if_draining(&self) -> Result<(), Status> {
        if self.draining.load(Ordering::Acquire) {
            return Err(self.status(&PoolError::ShuttingDown, Role::Legacy));
        }
        Ok(())
    }

    fn status(&self, e: &PoolError, role: Role) -> Status {
        let class = crate::resilience::classify(e, &self.backend(role).rules);
        self.status_after(e, class, 1, role)
    }

    /// The status of a failure classified as `class`: the class the client reads is
    /// the one metrics, the breaker and the rollout counted.
    fn status_after(&self, e: &PoolError, class: ErrorClass, attempts: u32, role: Role) -> Status {
        let ctx = status::ErrorContext {
            backend: role.as_str(),
            attempts,
            instance: &self.instance_id,
            class: Some(class),
        };
        status::to_status_as(e, class, self.include_tracebacks, ctx)
    }

    /// The answer to a call whose deadline passed before it finished (see
    /// [`deadline::answer_by`]); records it.
    fn expired(&self, record: &record::CallRecord) -> Status {
        let role = record.role();
        record.finish(role, Some(ErrorClass::DeadlineExceeded));
        let err = PoolError::Timeout {
            worker: None,
            after: record
                .deadline()
                .map(|d| d.saturating_duration_since(record.arrived()))
                .unwrap_or_default(),
            stage: crate::pool::TimeoutStage::Running,
        };
        self.status_after(&err, ErrorClass::DeadlineExceeded, 1, role)
    }

    fn failed_status(&self, failed: &Failed, role: Role) -> Status {
        let mut status = self.status_after(&failed.error, failed.class, failed.attempts, role);
        if failed.budget_exhausted {
            status.metadata_mut().insert(
                "x-pitboss-retry-budget-exhausted",
                MetadataValue::from_static("true"),
            );
        }
        status
    }

    /// The pool request of a call; its deadline is the one the call record computed
    /// from `grpc-timeout` and the arrival (parsed once per call).
    fn pool_request(r: &mut pb::ExecuteRequest, deadline: Option<Instant>) -> PoolRequest {
        PoolRequest {
            command: std::mem::take(&mut r.command),
            payload: std::mem::take(&mut r.payload),
            content_type: if r.content_type.is_empty() {
                "application/json".into()
            } else {
                std::mem::take(&mut r.content_type)
            },
            session_id: (!r.session_id.is_empty()).then(|| std::mem::take(&mut r.session_id)),
            deadline,
            avoid_worker: None,
        }
    }

    /// The `command` label of a call. The known set is refreshed in the background;
    /// a miss asks the pools directly, so a command is labelled by name from the
    /// first worker's READY on, not up to a refresh later.
    fn command_label(&self, command: &str) -> String {
        match self.commands.label(command) {
            std::borrow::Cow::Borrowed("other")
                if self
                    .backends()
                    .any(|b| b.pool().is_some_and(|p| p.knows_command(command))) =>
            {
                command.to_string()
            }
            label => label.into_owned(),
        }
    }

    /// The record of a call that just arrived: counted once, however it ends.
    fn call_record<T>(&self, req: &Request<T>, command: String) -> record::CallRecord {
        let arrived = deadline::arrival(req.extensions());
        let deadline = deadline::deadline_of(req.metadata(), arrived);
        record::CallRecord::new(command, arrived, deadline)
    }

    fn respond<T>(&self, msg: T, role: Role, worker: Option<String>) -> Response<T> {
        let mut resp = Response::new(msg);
        let md = resp.metadata_mut();
        md.insert(
            "x-pitboss-backend",
            MetadataValue::from_static(role.as_str()),
        );
        if let Some(v) = &self.instance_header {
            md.insert("x-pitboss-instance", v.clone());
        }
        if let Some(w) = worker.and_then(|w| MetadataValue::try_from(w).ok()) {
            md.insert("x-pitboss-worker", w);
        }
        resp
    }

    /// CreateSession with an explicit id: refused only while the backend that holds
    /// the pinned session still has it. A pin can outlive its session (expired by TTL,
    /// lost with its worker); then it is dropped and the id is free again at once.
    async fn refuse_if_session_lives(&self, id: &str) -> Result<(), (PoolError, Role)> {
        let Some(role) = self.sessions.peek(id) else {
            return Ok(());
        };
        match self.backend(role).get_session(id).await {
            Ok(_) => Err((PoolError::SessionExists(id.to_string()), role)),
            Err(e) => {
                let class = crate::resilience::classify(&e, &self.backend(role).rules);
                if self.unpin_if_gone(id, class) {
                    Ok(())
                } else {
                    Err((e, role))
                }
            }
        }
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

    /// An answer that could not be sent: over `server.max_message_bytes`, gRPC itself
    /// would fail it with no class and no details, and the call would be counted as
    /// served. Checked before sending, so it is a classified, counted failure.
    fn check_response_size(&self, payload_len: usize) -> Result<(), PoolError> {
        let max = self.max_message_bytes.saturating_sub(RESPONSE_OVERHEAD);
        if payload_len > max {
            return Err(PoolError::ResponseTooLarge(format!(
                "{payload_len} bytes, over server.max_message_bytes ({} bytes, less {RESPONSE_OVERHEAD} for the response's other fields); return less, stream it in chunks, or raise server.max_message_bytes",
                self.max_message_bytes
            )));
        }
        Ok(())
    }

    /// Runs a call on one backend and records the outcome in its rolling statistics,
    /// also when the call is dropped unfinished (the client went away): as
    /// [`record::unfinished_class`], so the statistics see deadline failures.
    async fn run(&self, role: Role, attempt: Attempt) -> Result<Served, Failed> {
        let started = Instant::now();
        let session = attempt.request.session_id.clone();
        let mut unfinished = UnfinishedRun {
            edge: self,
            role,
            started,
            deadline: attempt.deadline,
            finished: false,
        };
        let result = match self.backend(role).execute(attempt).await {
            Ok(served) => match self.check_response_size(served.response.payload.len()) {
                Ok(()) => Ok(served),
                Err(error) => Err(Failed {
                    class: ErrorClass::ResponseTooLarge,
                    error,
                    attempts: served.attempts,
                    budget_exhausted: false,
                }),
            },
            Err(f) => Err(f),
        };
        unfinished.finished = true;
        if let (Some(id), Err(f)) = (&session, &result) {
            self.unpin_if_gone(id, f.class);
        }
        self.record_outcome(role, started.elapsed(), &result);
        result
    }

    /// Records a backend's answer in its rolling statistics. A command that new lacks
    /// while legacy serves it is new's regression, not the caller's typo, so it counts
    /// as new's error although its class (`unknown_command`) usually does not.
    fn record_outcome(&self, role: Role, latency: Duration, result: &Result<Served, Failed>) {
        let failure = result.as_ref().err();
        let counted = failure.is_some_and(|f| {
            crate::rollout::stats::counts_as_error(f.class)
                || (role == Role::New && self.legacy_serves_what_new_lacks(&f.error))
        });
        self.rollout
            .record_as(role, latency, failure.map(|f| f.class), counted);
    }

    /// Whether `error` is new saying it lacks a command that legacy (a pool) serves.
    fn legacy_serves_what_new_lacks(&self, error: &PoolError) -> bool {
        match error {
            PoolError::UnknownCommand { command, .. } => self.legacy.serves(command),
            _ => false,
        }
    }

    /// Where a call goes: a session's backend, else the rollout's decision.
    fn route(&self, req: &PoolRequest, routing_key: &str, idempotent: bool) -> Route {
        match &req.session_id {
            Some(id) => match self.sessions.role(id) {
                Some(Role::New) if self.new.is_some() => Route::New,
                _ => Route::Legacy,
            },
            None => self.rollout.route_call(
                &req.command,
                (!routing_key.is_empty()).then_some(routing_key),
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
}

/// What telemetry (`/metrics`, `/readyz`, grpc health) reads from the edge.
impl crate::telemetry::Observed for Edge {
    fn legacy(&self) -> &Backend {
        &self.legacy
    }

    fn new_backend(&self) -> Option<&Backend> {
        self.new.as_ref()
    }

    fn rollout(&self) -> &Rollout {
        &self.rollout
    }

    fn draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    fn new_sessions(&self) -> usize {
        self.sessions.counts().1
    }
}

/// Records a backend run in the rollout statistics when it is dropped unfinished.
struct UnfinishedRun<'a> {
    edge: &'a Edge,
    role: Role,
    started: Instant,
    deadline: Instant,
    finished: bool,
}

impl Drop for UnfinishedRun<'_> {
    fn drop(&mut self) {
        if !self.finished {
            let class = record::unfinished_class(Instant::now(), self.started, Some(self.deadline));
            self.edge
                .rollout
                .record(self.role, self.started.elapsed(), Some(class));
        }
    }
}

/// Runs `new` alongside legacy, compares, and never touches the client's answer.
fn spawn_shadow(
    edge: Arc<Edge>,
    attempt: Attempt,
    legacy_result: oneshot::Receiver<Option<bytes::Bytes>>,
) {
    tokio::spawn(async move {
        let deadline = attempt.deadline;
        let command = attempt.request.command.clone();
        let started = Instant::now();
        let new_result =
            tokio::time::timeout_at(deadline, edge.backend(Role::New).execute(attempt)).await;
        let new_result = match new_result {
            Ok(r) => r,
            Err(_) => Err(Failed {
                class: ErrorClass::DeadlineExceeded,
                error: PoolError::Timeout {
                    worker: None,
                    after: started.elapsed(),
                    stage: crate::pool::TimeoutStage::Running,
                },
                attempts: 1,
                budget_exhausted: false,
            }),
        };
        edge.record_outcome(Role::New, started.elapsed(), &new_result);
        let legacy = legacy_result.await.ok().flatten();
        let flags = edge.rollout.flags.get();
        let outcome = match (&legacy, &new_result) {
            (Some(l), Ok(n)) => {
                if shadow::same(
                    flags.shadow.compare,
                    &flags.shadow.ignore_fields,
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
        let nth = edge.rollout.shadow_result(outcome);
        match (outcome, legacy, new_result) {
            (Outcome::Mismatch, Some(l), Ok(n)) if shadow::log_this_mismatch(nth) => {
                tracing::warn!(
                    command,
                    mismatch = nth,
                    legacy = %shadow::excerpt(&l, 512),
                    new = %shadow::excerpt(&n.response.payload, 512),
                    "shadow mismatch"
                );
            }
            (Outcome::Error, _, Err(f)) => {
                tracing::debug!(command, "shadow call failed on new: {}", f.error);
            }
            _ => {}
        }
    });
}

/// The Bridge service.
#[derive(Clone)]
pub struct BridgeService(pub Arc<Edge>);

type ChunkStream = Pin<Box<dyn Stream<Item = Result<pb::ExecuteChunk, Status>> + Send>>;

impl BridgeService {
    async fn execute_call(
        &self,
        req: Request<pb::ExecuteRequest>,
        record: &record::CallRecord,
    ) -> Result<Response<pb::ExecuteResponse>, Status> {
        let edge = &self.0;
        edge.refuse_if_draining()
            .inspect_err(|_| record.finish(Role::Legacy, Some(ErrorClass::ShuttingDown)))?;
        let mut r = req.into_inner();
        let idempotent = r.idempotent;
        let pr = Edge::pool_request(&mut r, record.deadline());
        let route = edge.route(&pr, &r.routing_key, idempotent);
        let first = route.answered_by();
        record.answering(first);
        let deadline = pr
            .deadline
            .unwrap_or_else(|| Instant::now() + edge.backend(first).default_timeout);
        let attempt = Attempt {
            request: pr,
            idempotent,
            number: 1,
            deadline,
        };
        let shadow_tx = (route == Route::Shadow).then(|| {
            let (tx, rx) = oneshot::channel();
            spawn_shadow(edge.clone(), attempt.clone(), rx);
            tx
        });
        let (role, result) = match route {
            Route::New => {
                let retry_copy = attempt.clone();
                match edge.run(Role::New, attempt).await {
                    Err(failed) if edge.may_fall_back(&failed, &retry_copy) => {
                        edge.rollout.fallback();
                        record.answering(Role::Legacy);
                        tracing::info!(
                            command = %retry_copy.request.command,
                            class = failed.class.name(),
                            "new failed; serving the call from legacy"
                        );
                        let on_legacy = edge.run(Role::Legacy, retry_copy).await;
                        (Role::Legacy, after_attempts(failed.attempts, on_legacy))
                    }
                    other => (Role::New, other),
                }
            }
            Route::Legacy | Route::Shadow => (Role::Legacy, edge.run(Role::Legacy, attempt).await),
        };
        if let Some(tx) = shadow_tx {
            let _ = tx.send(result.as_ref().ok().map(|s| s.response.payload.clone()));
        }
        record.finish(role, result.as_ref().err().map(|f| f.class));
        let span = tracing::Span::current();
        span.record("backend", role.as_str());
        match &result {
            Ok(served) => {
                span.record("worker", served.worker_label().as_str());
                span.record("attempts", served.attempts);
                tracing::debug!("call served");
            }
            Err(f) => {
                span.record("attempts", f.attempts);
                if let Some(w) = f.error.worker() {
                    span.record("worker", w.to_string().as_str());
                }
                tracing::debug!(class = f.class.name(), "call failed: {}", f.error);
            }
        }
        match result {
            Ok(served) => {
                let worker = served.worker_label();
                Ok(edge.respond(
                    pb::ExecuteResponse {
                        payload: served.response.payload,
                        content_type: served.response.content_type,
                        backend: role.as_str().into(),
                        worker_id: worker.clone(),
                        attempts: served.attempts,
                    },
                    role,
                    Some(worker),
                ))
            }
            Err(failed) => Err(edge.failed_status(&failed, role)),
        }
    }

    async fn create_session_call(
        &self,
        req: Request<pb::CreateSessionRequest>,
        record: &record::CallRecord,
    ) -> Result<Response<pb::Session>, Status> {
        let edge = &self.0;
        // Every way out is recorded, with the class the client is told.
        let fail = |e: &PoolError, role: Role| {
            let class = crate::resilience::classify(e, &edge.backend(role).rules);
            record.finish(role, Some(class));
            edge.status_after(e, class, 1, role)
        };
        edge.refuse_if_draining()
            .inspect_err(|_| record.finish(Role::Legacy, Some(ErrorClass::ShuttingDown)))?;
        let r = req.into_inner();
        let id = if r.session_id.is_empty() {
            crate::pool::SessionTable::new_id()
        } else {
            r.session_id
        };
        crate::pool::SessionTable::validate_id(&id).map_err(|e| fail(&e, Role::Legacy))?;
        edge.refuse_if_session_lives(&id)
            .await
            .map_err(|(e, role)| fail(&e, role))?;
        let metadata: std::collections::BTreeMap<String, String> = r.metadata.into_iter().collect();
        let mut role = edge.rollout.route_session(
            &id,
            (!r.routing_key.is_empty()).then_some(r.routing_key.as_str()),
        );
        record.answering(role);
        let mut result = edge
            .backend(role)
            .create_session(Some(id.clone()), metadata.clone())
            .await;
        if let (Role::New, Err(e)) = (role, &result) {
            let class = crate::resilience::classify(e, &edge.backend(role).rules);
            // Nothing ran yet, so falling back is always safe here.
            if edge.rollout.flags.get().fallback_to_legacy && fallback_allowed(class, true) {
                edge.rollout.fallback();
                role = Role::Legacy;
                record.answering(role);
                result = edge.legacy.create_session(Some(id.clone()), metadata).await;
            }
        }
        let session = result.map_err(|e| fail(&e, role))?;
        record.finish(role, None);
        edge.sessions.pin(&id, role);
        let worker = session.worker_id.clone();
        Ok(edge.respond(session, role, Some(worker)))
    }

    async fn execute_stream_call(
        &self,
        req: Request<pb::ExecuteRequest>,
        record: Arc<record::CallRecord>,
    ) -> Result<Response<ChunkStream>, Status> {
        let edge = self.0.clone();
        edge.refuse_if_draining()
            .inspect_err(|_| record.finish(Role::Legacy, Some(ErrorClass::ShuttingDown)))?;
        let mut r = req.into_inner();
        let mut pr = Edge::pool_request(&mut r, record.deadline());
        // Streams are not shadowed (their chunks cannot be held back to compare).
        let mut role = edge.route(&pr, &r.routing_key, r.idempotent).answered_by();
        record.answering(role);
        if pr.deadline.is_none() {
            pr.deadline = Some(Instant::now() + edge.backend(role).default_timeout);
        }
        let started = Instant::now();
        // Tries on both backends: 2 after a fallback.
        let mut attempts = 1;
        let (permit, mut stream) = match start_stream(&edge, role, pr.clone()).await {
            Ok(ok) => ok,
            Err((class, e)) => {
                let probe = Failed {
                    class,
                    error: e.clone(),
                    attempts: 1,
                    budget_exhausted: false,
                };
                let attempt = Attempt {
                    deadline: pr.deadline.unwrap_or_else(Instant::now),
                    request: pr.clone(),
                    idempotent: r.idempotent,
                    number: 1,
                };
                if role == Role::New && edge.may_fall_back(&probe, &attempt) {
                    edge.rollout.fallback();
                    role = Role::Legacy;
                    record.answering(role);
                    attempts = 2;
                    match start_stream(&edge, role, pr).await {
                        Ok(ok) => ok,
                        Err((class, e)) => {
                            record.finish(role, Some(class));
                            return Err(edge.status_after(&e, class, attempts, role));
                        }
                    }
                } else {
                    record.finish(role, Some(class));
                    return Err(edge.status(&e, role));
                }
            }
        };
        let worker = stream.worker();
        let (tx, rx) = mpsc::channel(16);
        let e2 = edge.clone();
        let started_on = worker.clone();
        tokio::spawn(async move {
            // The client went away: dropping `stream` cancels. That says nothing about
            // the backend's health; the call is counted as cancelled (or as its
            // deadline, when that was near).
            let gone = |permit: crate::resilience::breaker::Permit| {
                permit.record(None);
                let class = record.unfinished_class();
                e2.rollout.record(role, started.elapsed(), Some(class));
                record.finish(role, Some(class));
            };
            // Hold one chunk back, so the last one can say it is last.
            let mut held: Option<pb::ExecuteChunk> = None;
            loop {
                let next = tokio::select! {
                    next = stream.next() => next,
                    () = tx.closed() => return gone(permit),
                };
                let next = next.map(|chunk| {
                    chunk.and_then(|(payload, content_type)| {
                        e2.check_response_size(payload.len())
                            .map(|()| (payload, content_type))
                    })
                });
                match next {
                    Some(Ok((payload, content_type))) => {
                        let next = pb::ExecuteChunk {
                            payload,
                            content_type,
                            ..Default::default()
                        };
                        if let Some(prev) = held.replace(next) {
                            if tx.send(Ok(prev)).await.is_err() {
                                return gone(permit);
                            }
                        }
                    }
                    Some(Err(err)) => {
                        let class = crate::resilience::classify(&err, &e2.backend(role).rules);
                        permit.record(Some(class));
                        e2.rollout.record(role, started.elapsed(), Some(class));
                        record.finish(role, Some(class));
                        if let Some(prev) = held.take() {
                            let _ = tx.send(Ok(prev)).await;
                        }
                        let _ = tx
                            .send(Err(e2.status_after(&err, class, attempts, role)))
                            .await;
                        return;
                    }
                    None => {
                        permit.record(None);
                        e2.rollout.record(role, started.elapsed(), None);
                        record.finish(role, None);
                        let mut last = held.take().unwrap_or_default();
                        last.last = true;
                        last.backend = role.as_str().into();
                        // A pool's stream knows its worker from the start; an
                        // upstream's names it on its last chunk.
                        let ended_on = stream.worker();
                        last.worker_id = if ended_on.is_empty() {
                            started_on
                        } else {
                            ended_on
                        };
                        last.attempts = attempts;
                        let _ = tx.send(Ok(last)).await;
                        return;
                    }
                }
            }
        });
        Ok(edge.respond(
            Box::pin(ReceiverStream::new(rx)) as ChunkStream,
            role,
            Some(worker),
        ))
    }
}

#[tonic::async_trait]
impl Bridge for BridgeService {
    async fn execute(
        &self,
        req: Request<pb::ExecuteRequest>,
    ) -> Result<Response<pb::ExecuteResponse>, Status> {
        use tracing::Instrument;
        let span = call_span(&req);
        let label = self.0.command_label(&req.get_ref().command);
        let record = self.0.call_record(&req, label);
        deadline::answer_by(
            record.deadline(),
            self.execute_call(req, &record).instrument(span),
            || Err(self.0.expired(&record)),
        )
        .await
    }

    type ExecuteStreamStream = ChunkStream;

    async fn execute_stream(
        &self,
        req: Request<pb::ExecuteRequest>,
    ) -> Result<Response<Self::ExecuteStreamStream>, Status> {
        use tracing::Instrument;
        let span = call_span(&req);
        let label = self.0.command_label(&req.get_ref().command);
        let record = Arc::new(self.0.call_record(&req, label));
        // The backstop covers the start; once streaming, the pool's deadline applies
        // (tonic's timer covers only the start too).
        deadline::answer_by(
            record.deadline(),
            self.execute_stream_call(req, record.clone())
                .instrument(span),
            || Err(self.0.expired(&record)),
        )
        .await
    }

    async fn create_session(
        &self,
        req: Request<pb::CreateSessionRequest>,
    ) -> Result<Response<pb::Session>, Status> {
        let record = self.0.call_record(&req, record::CREATE_SESSION.into());
        deadline::answer_by(
            record.deadline(),
            self.create_session_call(req, &record),
            || Err(self.0.expired(&record)),
        )
        .await
    }

    async fn get_session(
        &self,
        req: Request<pb::GetSessionRequest>,
    ) -> Result<Response<pb::Session>, Status> {
        let edge = &self.0;
        let id = req.into_inner().session_id;
        let role = edge.sessions.role(&id).unwrap_or(Role::Legacy);
        let session = edge.backend(role).get_session(&id).await.map_err(|e| {
            let class = crate::resilience::classify(&e, &edge.backend(role).rules);
            edge.unpin_if_gone(&id, class);
            edge.status(&e, role)
        })?;
        Ok(edge.respond(session, role, None))
    }

    async fn close_session(
        &self,
        req: Request<pb::CloseSessionRequest>,
    ) -> Result<Response<pb::CloseSessionResponse>, Status> {
        let edge = &self.0;
        let id = req.into_inner().session_id;
        let role = edge.sessions.role(&id).unwrap_or(Role::Legacy);
        let result = edge.backend(role).close_session(&id).await;
        edge.sessions.unpin(&id);
        result.map_err(|e| edge.status(&e, role))?;
        Ok(edge.respond(pb::CloseSessionResponse {}, role, None))
    }

    async fn list_commands(
        &self,
        _req: Request<pb::ListCommandsRequest>,
    ) -> Result<Response<pb::ListCommandsResponse>, Status> {
        let edge = &self.0;
        let mut commands: Vec<pb::CommandInfo> = Vec::new();
        for backend in edge.backends() {
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
        Ok(edge.respond(pb::ListCommandsResponse { commands }, Role::Legacy, None))
    }
}

/// One span per call: its request id (the client's `x-request-id`, else a new one),
/// command, and, once known, the backend, worker and attempts.
fn call_span<T>(req: &Request<T>) -> tracing::Span
where
    T: CommandName,
{
    let request_id = req
        .metadata()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .map(|s| s.chars().take(64).collect::<String>())
        .unwrap_or_else(|| format!("{:016x}", rand::random::<u64>()));
    tracing::info_span!(
        "call",
        request_id = %request_id,
        command = %req.get_ref().command_name(),
        backend = tracing::field::Empty,
        worker = tracing::field::Empty,
        attempts = tracing::field::Empty,
    )
}

trait CommandName {
    fn command_name(&self) -> &str;
}

impl CommandName for pb::ExecuteRequest {
    fn command_name(&self) -> &str {
        &self.command
    }
}

/// Starts a stream on one backend behind its breaker; the permit records the outcome.
/// A stream that does not start is recorded in the backend's rolling statistics here,
/// as a unary call's failure is (a command that new lacks counts against it).
async fn start_stream(
    edge: &Edge,
    role: Role,
    pr: PoolRequest,
) -> Result<
    (
        crate::resilience::breaker::Permit,
        crate::backend::ChunkSource,
    ),
    (ErrorClass, PoolError),
> {
    let started = Instant::now();
    let backend = edge.backend(role);
    let result = match backend.breaker.try_acquire() {
        Err(retry_after) => Err((
            ErrorClass::CircuitOpen,
            PoolError::CircuitOpen { retry_after },
        )),
        Ok(permit) => match backend.execute_stream(pr).await {
            Ok(s) => Ok((permit, s)),
            Err(e) => {
                let class = crate::resilience::classify(&e, &backend.rules);
                permit.record(Some(class));
                Err((class, e))
            }
        },
    };
    if let Err((class, error)) = &result {
        let failed = Failed {
            error: error.clone(),
            class: *class,
            attempts: 1,
            budget_exhausted: false,
        };
        edge.record_outcome(role, started.elapsed(), &Err(failed));
    }
    result
}

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

fn duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
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
        };
        assert_eq!(after_attempts(3, Ok(served)).unwrap().attempts, 4);
        let failed = Failed {
            error: PoolError::ShuttingDown,
            class: ErrorClass::ShuttingDown,
            attempts: 2,
            budget_exhausted: false,
        };
        assert_eq!(after_attempts(3, Err(failed)).unwrap_err().attempts, 5);
    }
}
