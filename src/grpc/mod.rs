//! The gRPC edge: `pitboss.v1.Bridge` and `pitboss.v1.Admin`. It translates between
//! proto messages and the rollout's domain types, applies the client's deadline and
//! counts every call; the split between backends (routing, fallback, shadow, session
//! pins, rollout statistics) is [`Split`]'s, and the status of a failure is chosen in
//! [`status`], only there.

pub mod deadline;
pub mod health;
pub mod one_message;
pub mod status;
pub mod timeout_gate;

pub mod access;
pub mod admin;
pub mod admin_record;
pub mod record;
pub mod transparent;

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::metadata::MetadataValue;
use tonic::{Request, Response, Status};

use crate::backend::{Backend, Role};
use crate::pool::{PoolError, PoolRequest};
use crate::resilience::{CallError, ErrorClass, Failed, Served};
use crate::rollout::controller::Rollout;
use crate::rollout::split::{Answer, Call, Split, SplitStream};
use crate::worker::{CallIds, ContextBackend, RequestContext};

/// The generated `pitboss.v1` types, under the name the edge has always used.
pub use crate::proto as pb;

pub use admin::AdminService;
use pb::bridge_server::Bridge;

/// State shared by both services.
pub struct Edge {
    /// The backends and the rollout between them: every call goes through it.
    pub split: Arc<Split>,
    pub include_tracebacks: bool,
    /// Set when shutdown starts: new calls are refused with UNAVAILABLE.
    pub draining: AtomicBool,
    pub started: tokio::time::Instant,
    pub instance_id: String,
    /// `instance_id` as a ready metadata value, built once rather than per response.
    pub instance_header: Option<MetadataValue<tonic::metadata::Ascii>>,
    /// The admin bearer token; `None`: read-only admin calls only.
    pub admin_token: Option<String>,
    /// Under mTLS: the identities that may read or change through the admin API
    /// (empty: the token decides).
    pub admin_allow: crate::tls::AdminAllowlists,
    /// Commands the backends registered: the only values of the `command` label.
    pub commands: crate::telemetry::KnownCommands,
}

impl Edge {
    pub fn rollout(&self) -> &Rollout {
        self.split.rollout()
    }

    pub fn backends(&self) -> impl Iterator<Item = &Backend> {
        self.split.backends()
    }

    /// Refuses a call once shutdown has started; the refusal is counted.
    fn refuse_if_draining(&self, record: &record::CallRecord) -> Result<(), Status> {
        if !self.draining.load(Ordering::Acquire) {
            return Ok(());
        }
        record.finish(Role::Legacy, Some(ErrorClass::ShuttingDown));
        let failed = Failed {
            error: PoolError::ShuttingDown.into(),
            class: ErrorClass::ShuttingDown,
            attempts: 1,
            budget_exhausted: false,
        };
        Err(self.status(&failed, Role::Legacy))
    }

    /// The status of a failure, with the class it was given where it was first
    /// understood: the one metrics, the breaker and the rollout counted.
    fn status(&self, failed: &Failed, role: Role) -> Status {
        let ctx = status::ErrorContext {
            backend: role.as_str(),
            attempts: failed.attempts,
            instance: &self.instance_id,
        };
        let mut status =
            status::to_status(&failed.error, failed.class, self.include_tracebacks, ctx);
        if failed.budget_exhausted {
            status.metadata_mut().insert(
                "x-pitboss-retry-budget-exhausted",
                MetadataValue::from_static("true"),
            );
        }
        status
    }

    /// Records a call's answer once, and turns it into a response or a status.
    fn answer<T, M>(
        &self,
        record: &record::CallRecord,
        answer: Answer<T>,
        message: impl FnOnce(T) -> (M, Option<String>),
    ) -> Result<Response<M>, Status> {
        let role = answer.role;
        match answer.result {
            Ok(value) => {
                record.finish(role, None);
                let (msg, worker) = message(value);
                Ok(self.respond(msg, role, worker))
            }
            Err(failed) => Err(self.fail(record, &failed, role)),
        }
    }

    /// Records a failed call once, and answers its status.
    fn fail(&self, record: &record::CallRecord, failed: &Failed, role: Role) -> Status {
        record.finish(role, Some(failed.class));
        self.status(failed, role)
    }

    /// The answer to a call whose deadline passed before it finished (see
    /// [`deadline::answer_by`]); records it.
    pub(crate) fn expired(&self, record: &record::CallRecord) -> Status {
        let role = record.role();
        record.finish(role, Some(ErrorClass::DeadlineExceeded));
        let after = record
            .deadline()
            .map(|d| d.saturating_duration_since(record.arrived()))
            .unwrap_or_default();
        self.deadline_exceeded(after, role)
    }

    /// DEADLINE_EXCEEDED for a call that had `after`, with every trailer; records
    /// nothing.
    fn deadline_exceeded(&self, after: Duration, role: Role) -> Status {
        let failed = Failed {
            error: CallError::DeadlineExceeded { after },
            class: ErrorClass::DeadlineExceeded,
            attempts: 1,
            budget_exhausted: false,
        };
        self.status(&failed, role)
    }

    /// The `command` label of a call. The known set is refreshed in the background;
    /// a miss asks the backends directly, so a command is labelled by name from the
    /// first worker's READY on, not up to a refresh later.
    pub(crate) fn command_label(&self, command: &str) -> String {
        match self.commands.label(command) {
            std::borrow::Cow::Borrowed("other") if self.split.knows_command(command) => {
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
}

/// What telemetry (`/metrics`, `/readyz`, grpc health) reads from the edge.
impl crate::telemetry::Observed for Edge {
    fn legacy(&self) -> &Backend {
        self.split.legacy()
    }

    fn new_backend(&self) -> Option<&Backend> {
        self.split.new_backend()
    }

    fn rollout(&self) -> &Rollout {
        self.split.rollout()
    }

    fn draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    fn new_sessions(&self) -> usize {
        self.split.pinned_sessions().1
    }
}

/// A call of `Execute` or `ExecuteStream`, as the split takes it; its deadline is the
/// one the call record computed from `grpc-timeout` and the arrival (parsed once).
fn call_of(r: pb::ExecuteRequest, deadline: Option<Instant>, ids: &Arc<CallIds>) -> Call {
    Call {
        request: PoolRequest {
            command: r.command,
            payload: r.payload,
            content_type: if r.content_type.is_empty() {
                "application/json".into()
            } else {
                r.content_type
            },
            session_id: (!r.session_id.is_empty()).then_some(r.session_id),
            deadline,
            avoid_worker: None,
            wire: None,
            context: first_try(ids),
        },
        routing_key: (!r.routing_key.is_empty()).then_some(r.routing_key),
        idempotent: r.idempotent,
    }
}

/// Writes the answer of a unary call into its span.
///
/// A served call's fields are written only when its debug line is logged: the text
/// and JSON formatters render every recorded field at once, and nothing after this
/// point logs within the span at the default level, so at `info` they were work on
/// every call that no line ever showed.
fn trace_answer(answer: &Answer<Served>) {
    if answer.result.is_ok() && !tracing::enabled!(tracing::Level::DEBUG) {
        return;
    }
    let span = tracing::Span::current();
    span.record("backend", answer.role.as_str());
    match &answer.result {
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
        ids: &Arc<CallIds>,
    ) -> Result<Response<pb::ExecuteResponse>, Status> {
        let edge = &self.0;
        edge.refuse_if_draining(record)?;
        let call = call_of(req.into_inner(), record.deadline(), ids);
        let answer = edge.split.execute(call, record).await;
        trace_answer(&answer);
        let role = answer.role;
        edge.answer(record, answer, |served| {
            let worker = served.worker_label();
            let msg = pb::ExecuteResponse {
                payload: served.response.payload,
                content_type: served.response.content_type,
                backend: role.as_str().into(),
                worker_id: worker.clone(),
                attempts: served.attempts,
            };
            (msg, Some(worker))
        })
    }

    async fn create_session_call(
        &self,
        req: Request<pb::CreateSessionRequest>,
        record: &record::CallRecord,
    ) -> Result<Response<pb::Session>, Status> {
        let edge = &self.0;
        edge.refuse_if_draining(record)?;
        let r = req.into_inner();
        let id = (!r.session_id.is_empty()).then_some(r.session_id);
        let metadata = r.metadata.into_iter().collect();
        let answer = edge
            .split
            .create_session(id, metadata, Some(&r.routing_key), record)
            .await;
        edge.answer(record, answer, |session| {
            let worker = session.worker_id.clone();
            (session, Some(worker))
        })
    }

    async fn execute_stream_call(
        &self,
        req: Request<pb::ExecuteRequest>,
        record: Arc<record::CallRecord>,
        ids: &Arc<CallIds>,
    ) -> Result<Response<ChunkStream>, Status> {
        let edge = &self.0;
        edge.refuse_if_draining(&record)?;
        let call = call_of(req.into_inner(), record.deadline(), ids);
        let stream = edge
            .split
            .open_stream(call, &*record)
            .await
            .map_err(|(role, failed)| edge.fail(&record, &failed, role))?;
        let (role, worker) = (stream.role(), stream.worker());
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(forward_chunks(edge.clone(), stream, record, tx));
        Ok(edge.respond(
            Box::pin(ReceiverStream::new(rx)) as ChunkStream,
            role,
            Some(worker),
        ))
    }
}

/// Sends a stream's chunks to the client, holding one back so the last can say it is
/// last (with the backend, worker and attempts). Ends when the stream does, or when
/// the client goes away: dropping `stream` then cancels the call and counts it as
/// cancelled (or as its deadline, when that was near).
async fn forward_chunks(
    edge: Arc<Edge>,
    mut stream: SplitStream,
    record: Arc<record::CallRecord>,
    tx: mpsc::Sender<Result<pb::ExecuteChunk, Status>>,
) {
    let role = stream.role();
    let started_on = stream.worker();
    let mut held: Option<pb::ExecuteChunk> = None;
    loop {
        let next = tokio::select! {
            next = stream.next() => next,
            () = tx.closed() => return,
        };
        match next {
            Some(Ok((payload, content_type))) => {
                let chunk = pb::ExecuteChunk {
                    payload,
                    content_type,
                    ..Default::default()
                };
                if let Some(prev) = held.replace(chunk) {
                    if tx.send(Ok(prev)).await.is_err() {
                        return;
                    }
                }
            }
            Some(Err(failed)) => {
                let status = edge.fail(&record, &failed, role);
                if let Some(prev) = held.take() {
                    let _ = tx.send(Ok(prev)).await;
                }
                let _ = tx.send(Err(status)).await;
                return;
            }
            None => {
                record.finish(role, None);
                let mut last = held.take().unwrap_or_default();
                last.last = true;
                last.backend = role.as_str().into();
                // A pool's stream knows its worker from the start; an upstream's
                // names it on its last chunk.
                let ended_on = stream.worker();
                last.worker_id = if ended_on.is_empty() {
                    started_on
                } else {
                    ended_on
                };
                last.attempts = stream.attempts();
                let _ = tx.send(Ok(last)).await;
                return;
            }
        }
    }
}

#[tonic::async_trait]
impl Bridge for BridgeService {
    async fn execute(
        &self,
        req: Request<pb::ExecuteRequest>,
    ) -> Result<Response<pb::ExecuteResponse>, Status> {
        use tracing::Instrument;
        let ids = call_ids(req.metadata().as_ref());
        let span = call_span(&ids, &req.get_ref().command);
        let label = self.0.command_label(&req.get_ref().command);
        let record = self.0.call_record(&req, label);
        let answer = deadline::answer_by(
            record.deadline(),
            self.execute_call(req, &record, &ids).instrument(span),
            || Err(self.0.expired(&record)),
        )
        .await;
        with_request_id(answer, &ids)
    }

    type ExecuteStreamStream = ChunkStream;

    async fn execute_stream(
        &self,
        req: Request<pb::ExecuteRequest>,
    ) -> Result<Response<Self::ExecuteStreamStream>, Status> {
        use tracing::Instrument;
        let ids = call_ids(req.metadata().as_ref());
        let span = call_span(&ids, &req.get_ref().command);
        let label = self.0.command_label(&req.get_ref().command);
        let record = Arc::new(self.0.call_record(&req, label));
        // The backstop covers the start; once streaming, the pool's deadline applies
        // (tonic's timer covers only the start too).
        let answer = deadline::answer_by(
            record.deadline(),
            self.execute_stream_call(req, record.clone(), &ids)
                .instrument(span),
            || Err(self.0.expired(&record)),
        )
        .await;
        with_request_id(answer, &ids)
    }

    async fn create_session(
        &self,
        req: Request<pb::CreateSessionRequest>,
    ) -> Result<Response<pb::Session>, Status> {
        let ids = call_ids(req.metadata().as_ref());
        let record = self.0.call_record(&req, record::CREATE_SESSION.into());
        let answer = deadline::answer_by(
            record.deadline(),
            self.create_session_call(req, &record),
            || Err(self.0.expired(&record)),
        )
        .await;
        with_request_id(answer, &ids)
    }

    async fn get_session(
        &self,
        req: Request<pb::GetSessionRequest>,
    ) -> Result<Response<pb::Session>, Status> {
        let edge = &self.0;
        let answer = edge.split.get_session(&req.into_inner().session_id).await;
        let role = answer.role;
        let session = answer.result.map_err(|f| edge.status(&f, role))?;
        Ok(edge.respond(session, role, None))
    }

    async fn close_session(
        &self,
        req: Request<pb::CloseSessionRequest>,
    ) -> Result<Response<pb::CloseSessionResponse>, Status> {
        let edge = &self.0;
        let answer = edge.split.close_session(&req.into_inner().session_id).await;
        let role = answer.role;
        answer.result.map_err(|f| edge.status(&f, role))?;
        Ok(edge.respond(pb::CloseSessionResponse {}, role, None))
    }

    async fn list_commands(
        &self,
        _req: Request<pb::ListCommandsRequest>,
    ) -> Result<Response<pb::ListCommandsResponse>, Status> {
        let commands = self.0.split.commands().await;
        Ok(self
            .0
            .respond(pb::ListCommandsResponse { commands }, Role::Legacy, None))
    }
}

/// The ids of a call from its headers: the client's `x-request-id` (else a new one),
/// `traceparent` and `tracestate` (see [`CallIds::from_client`]). Made once per call
/// and shared by its tries, its shadow copy and its span.
pub(crate) fn call_ids(headers: &http::HeaderMap) -> Arc<CallIds> {
    let get = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    Arc::new(CallIds::from_client(
        get("x-request-id"),
        get("traceparent"),
        get("tracestate"),
        || format!("{:016x}", rand::random::<u64>()),
    ))
}

/// A call's context for its first try (the backend marks its role, the retry layer
/// counts the attempts).
pub(crate) fn first_try(ids: &Arc<CallIds>) -> Option<RequestContext> {
    Some(RequestContext {
        ids: ids.clone(),
        attempt: 1,
        backend: ContextBackend::Unknown,
    })
}

/// One span per call: its request id, trace id (when the client sent a trace),
/// command, and, once known, the backend, worker and attempts.
pub(crate) fn call_span(ids: &CallIds, command: &str) -> tracing::Span {
    let trace_id = ids
        .traceparent
        .as_deref()
        .and_then(|t| t.split('-').nth(1))
        .unwrap_or("");
    tracing::info_span!(
        "call",
        request_id = %ids.request_id,
        trace_id = %trace_id,
        command = %command,
        backend = tracing::field::Empty,
        worker = tracing::field::Empty,
        attempts = tracing::field::Empty,
    )
}

/// Returns the call's request id to the client (`x-request-id` in the response's
/// headers or the status's trailers), the one it sent or the one pitboss made, so a
/// client can quote it when it reports a failure.
fn with_request_id<T>(
    answer: Result<Response<T>, Status>,
    ids: &CallIds,
) -> Result<Response<T>, Status> {
    let Ok(mut value) = MetadataValue::try_from(ids.request_id.as_str()) else {
        return answer;
    };
    // A value unique to the call: sent as "never indexed" (HPACK), so neither side
    // adds it to its header table only to evict it at the next call.
    value.set_sensitive(true);
    match answer {
        Ok(mut resp) => {
            resp.metadata_mut().insert("x-request-id", value);
            Ok(resp)
        }
        Err(mut status) => {
            status.metadata_mut().insert("x-request-id", value);
            Err(status)
        }
    }
}

fn duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}
