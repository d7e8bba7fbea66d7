//! The gRPC edge: `pitboss.v1.Bridge` and `pitboss.v1.Admin`. Decodes requests, applies
//! the client's deadline, splits calls between the `legacy` and the `new` backend
//! (the rollout), and maps results to statuses (in [`status`], only there).

pub mod deadline;
pub mod status;

pub mod admin;
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
pub mod pb {
    tonic::include_proto!("pitboss.v1");

    /// The encoded descriptor set, for gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/pitboss_descriptor.bin"));
}

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
}

/// Whether a failed call of `new` may be served again by legacy: only system-class
/// failures (the backend's fault, not the caller's), and only when running it again
/// is safe: refused before it ran, or idempotent. Pure.
///
/// A command that new does not have (`unknown_command`) never ran there, and with
/// `commands = ["*"]` every command is routed to new, implemented or not: legacy may
/// serve it (a command neither has gets legacy's NOT_FOUND).
pub fn fallback_allowed(class: ErrorClass, idempotent: bool) -> bool {
    if class == ErrorClass::UnknownCommand {
        return true;
    }
    let system = class.row().breaker
        || matches!(
            class,
            ErrorClass::CircuitOpen | ErrorClass::PoolExhausted | ErrorClass::ShuttingDown
        );
    system && class.retryable(idempotent)
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
        self.status_after(e, 1, role)
    }

    fn status_after(&self, e: &PoolError, attempts: u32, role: Role) -> Status {
        let ctx = status::ErrorContext {
            backend: role.as_str(),
            attempts,
            instance: &self.instance_id,
        };
        status::to_status(e, &self.backend(role).rules, self.include_tracebacks, ctx)
    }

    fn failed_status(&self, failed: &Failed, role: Role) -> Status {
        let mut status = self.status_after(&failed.error, failed.attempts, role);
        if failed.budget_exhausted {
            status.metadata_mut().insert(
                "x-pitboss-retry-budget-exhausted",
                MetadataValue::from_static("true"),
            );
        }
        status
    }

    fn pool_request(
        &self,
        r: &mut pb::ExecuteRequest,
        md: &tonic::metadata::MetadataMap,
    ) -> PoolRequest {
        PoolRequest {
            command: std::mem::take(&mut r.command),
            payload: std::mem::take(&mut r.payload),
            content_type: if r.content_type.is_empty() {
                "application/json".into()
            } else {
                std::mem::take(&mut r.content_type)
            },
            session_id: (!r.session_id.is_empty()).then(|| std::mem::take(&mut r.session_id)),
            deadline: deadline::deadline_of(md),
            avoid_worker: None,
        }
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

    /// Runs a call on one backend and records the outcome in its rolling statistics.
    async fn run(&self, role: Role, attempt: Attempt) -> Result<Served, Failed> {
        let started = Instant::now();
        let result = self.backend(role).execute(attempt).await;
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
    ) -> Result<Response<pb::ExecuteResponse>, Status> {
        let edge = &self.0;
        edge.refuse_if_draining()?;
        let received = Instant::now();
        let (md, _, mut r) = req.into_parts();
        let idempotent = r.idempotent;
        let pr = edge.pool_request(&mut r, &md);
        let command_label = edge.commands.label(&pr.command).into_owned();
        let route = edge.route(&pr, &r.routing_key, idempotent);
        let first = route.answered_by();
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
        let failure = result.as_ref().err().map(|f| f.class);
        crate::telemetry::record_call(role, &command_label, failure, received.elapsed());
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

    async fn execute_stream_call(
        &self,
        req: Request<pb::ExecuteRequest>,
    ) -> Result<Response<ChunkStream>, Status> {
        let edge = self.0.clone();
        edge.refuse_if_draining()?;
        let (md, _, mut r) = req.into_parts();
        let mut pr = edge.pool_request(&mut r, &md);
        let command_label = edge.commands.label(&pr.command).into_owned();
        let received = Instant::now();
        // Streams are not shadowed (their chunks cannot be held back to compare).
        let mut role = edge.route(&pr, &r.routing_key, r.idempotent).answered_by();
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
                    attempts = 2;
                    match start_stream(&edge, role, pr).await {
                        Ok(ok) => ok,
                        Err((class, e)) => {
                            crate::telemetry::record_call(
                                role,
                                &command_label,
                                Some(class),
                                received.elapsed(),
                            );
                            return Err(edge.status_after(&e, attempts, role));
                        }
                    }
                } else {
                    crate::telemetry::record_call(
                        role,
                        &command_label,
                        Some(class),
                        received.elapsed(),
                    );
                    return Err(edge.status(&e, role));
                }
            }
        };
        let worker = stream.worker();
        let (tx, rx) = mpsc::channel(16);
        let e2 = edge.clone();
        let started_on = worker.clone();
        tokio::spawn(async move {
            // Hold one chunk back, so the last one can say it is last.
            let mut held: Option<pb::ExecuteChunk> = None;
            loop {
                match stream.next().await {
                    Some(Ok((payload, content_type))) => {
                        let next = pb::ExecuteChunk {
                            payload,
                            content_type,
                            ..Default::default()
                        };
                        if let Some(prev) = held.replace(next) {
                            if tx.send(Ok(prev)).await.is_err() {
                                // The client went away: dropping `stream` cancels. That
                                // says nothing about the backend's health.
                                permit.record(None);
                                return;
                            }
                        }
                    }
                    Some(Err(err)) => {
                        let class = crate::resilience::classify(&err, &e2.backend(role).rules);
                        permit.record(Some(class));
                        e2.rollout.record(role, started.elapsed(), Some(class));
                        crate::telemetry::record_call(
                            role,
                            &command_label,
                            Some(class),
                            received.elapsed(),
                        );
                        if let Some(prev) = held.take() {
                            let _ = tx.send(Ok(prev)).await;
                        }
                        let _ = tx.send(Err(e2.status_after(&err, attempts, role))).await;
                        return;
                    }
                    None => {
                        permit.record(None);
                        e2.rollout.record(role, started.elapsed(), None);
                        crate::telemetry::record_call(
                            role,
                            &command_label,
                            None,
                            received.elapsed(),
                        );
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
        self.execute_call(req).instrument(span).await
    }

    type ExecuteStreamStream = ChunkStream;

    async fn execute_stream(
        &self,
        req: Request<pb::ExecuteRequest>,
    ) -> Result<Response<Self::ExecuteStreamStream>, Status> {
        use tracing::Instrument;
        let span = call_span(&req);
        self.execute_stream_call(req).instrument(span).await
    }

    async fn create_session(
        &self,
        req: Request<pb::CreateSessionRequest>,
    ) -> Result<Response<pb::Session>, Status> {
        let edge = &self.0;
        edge.refuse_if_draining()?;
        let r = req.into_inner();
        let id = if r.session_id.is_empty() {
            crate::pool::SessionTable::new_id()
        } else {
            r.session_id
        };
        crate::pool::SessionTable::validate_id(&id).map_err(|e| edge.status(&e, Role::Legacy))?;
        if edge.sessions.role(&id).is_some() {
            return Err(edge.status(&PoolError::SessionExists(id), Role::Legacy));
        }
        let metadata: std::collections::BTreeMap<String, String> = r.metadata.into_iter().collect();
        let mut role = edge.rollout.route_session(
            &id,
            (!r.routing_key.is_empty()).then_some(r.routing_key.as_str()),
        );
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
                result = edge.legacy.create_session(Some(id.clone()), metadata).await;
            }
        }
        let session = result.map_err(|e| edge.status(&e, role))?;
        edge.sessions.pin(&id, role);
        let worker = session.worker_id.clone();
        Ok(edge.respond(session, role, Some(worker)))
    }

    async fn get_session(
        &self,
        req: Request<pb::GetSessionRequest>,
    ) -> Result<Response<pb::Session>, Status> {
        let edge = &self.0;
        let id = req.into_inner().session_id;
        let role = edge.sessions.role(&id).unwrap_or(Role::Legacy);
        let session = edge
            .backend(role)
            .get_session(&id)
            .await
            .map_err(|e| edge.status(&e, role))?;
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
