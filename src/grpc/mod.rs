//! The gRPC edge: `pitboss.v1.Bridge` and `pitboss.v1.Admin`. Decodes requests, applies
//! the client's deadline, and maps results to statuses (in [`status`], only there).

pub mod deadline;
pub mod status;

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::metadata::MetadataValue;
use tonic::{Request, Response, Status};

use crate::pool::{Pool, PoolError, PoolRequest, SessionInfo};

/// Generated code for `proto/pitboss/v1/*.proto`.
pub mod pb {
    tonic::include_proto!("pitboss.v1");

    /// The encoded descriptor set, for gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/pitboss_descriptor.bin"));
}

use pb::admin_server::Admin;
use pb::bridge_server::Bridge;

/// The backend role of the single pool, until the rollout issue adds `new`.
pub const BACKEND_LEGACY: &str = "legacy";

/// The tower stack every `Execute` goes through, outermost first.
pub type ExecuteStack = tower::load_shed::LoadShed<
    tower::limit::ConcurrencyLimit<
        tower::retry::Retry<
            crate::resilience::RetryPolicy,
            crate::resilience::breaker::BreakerService<crate::resilience::PoolService>,
        >,
    >,
>;

/// State shared by both services.
pub struct Edge {
    pub pool: Pool,
    pub include_tracebacks: bool,
    /// How Python exceptions are classified.
    pub rules: crate::resilience::ExceptionRules,
    /// The pool behind tower's layers: load shedding, a concurrency limit, retry, and
    /// the backend's circuit breaker (which sees every attempt).
    pub stack: ExecuteStack,
    pub breaker: crate::resilience::Breaker,
    /// Set when shutdown starts: new calls are refused with UNAVAILABLE.
    pub draining: AtomicBool,
    pub started: tokio::time::Instant,
    pub instance_id: String,
    /// `instance_id` as a ready metadata value, built once rather than per response.
    pub instance_header: Option<MetadataValue<tonic::metadata::Ascii>>,
}

impl Edge {
    fn refuse_if_draining(&self) -> Result<(), Status> {
        if self.draining.load(Ordering::Acquire) {
            return Err(self.status(&PoolError::ShuttingDown));
        }
        Ok(())
    }

    fn status(&self, e: &PoolError) -> Status {
        self.status_after(e, 1)
    }

    fn status_after(&self, e: &PoolError, attempts: u32) -> Status {
        let ctx = status::ErrorContext {
            backend: BACKEND_LEGACY,
            attempts,
            instance: &self.instance_id,
        };
        status::to_status(e, &self.rules, self.include_tracebacks, ctx)
    }

    fn pool_request(
        &self,
        r: pb::ExecuteRequest,
        md: &tonic::metadata::MetadataMap,
    ) -> PoolRequest {
        PoolRequest {
            command: r.command,
            payload: r.payload,
            content_type: if r.content_type.is_empty() {
                "application/json".into()
            } else {
                r.content_type
            },
            session_id: (!r.session_id.is_empty()).then_some(r.session_id),
            deadline: deadline::deadline_of(md),
            avoid_worker: None,
        }
    }

    fn respond<T>(&self, msg: T, worker: Option<String>) -> Response<T> {
        let mut resp = Response::new(msg);
        let md = resp.metadata_mut();
        md.insert(
            "x-pitboss-backend",
            MetadataValue::from_static(BACKEND_LEGACY),
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

fn timestamp(t: SystemTime) -> prost_types::Timestamp {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    prost_types::Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

fn duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

fn session_msg(s: SessionInfo) -> pb::Session {
    pb::Session {
        session_id: s.session_id,
        backend: BACKEND_LEGACY.into(),
        worker_id: s.worker.to_string(),
        created_at: Some(timestamp(s.created)),
        expires_at: Some(timestamp(s.expires)),
        metadata: s
            .metadata
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    }
}

/// The Bridge service.
#[derive(Clone)]
pub struct BridgeService(pub Arc<Edge>);

type ChunkStream = Pin<Box<dyn Stream<Item = Result<pb::ExecuteChunk, Status>> + Send>>;

#[tonic::async_trait]
impl Bridge for BridgeService {
    async fn execute(
        &self,
        req: Request<pb::ExecuteRequest>,
    ) -> Result<Response<pb::ExecuteResponse>, Status> {
        use tower::ServiceExt;
        let edge = &self.0;
        edge.refuse_if_draining()?;
        let (md, _, r) = req.into_parts();
        let idempotent = r.idempotent;
        let pr = edge.pool_request(r, &md);
        let deadline = pr
            .deadline
            .unwrap_or_else(|| tokio::time::Instant::now() + edge.pool.config().default_timeout);
        let attempt = crate::resilience::Attempt {
            request: pr,
            idempotent,
            number: 1,
            deadline,
        };
        let result = edge.stack.clone().oneshot(attempt).await;
        let result = result.map_err(|e| match e.downcast::<crate::resilience::Failed>() {
            Ok(failed) => *failed,
            Err(e) => {
                let error = if e.is::<tower::load_shed::error::Overloaded>() {
                    PoolError::PoolExhausted {
                        reason: crate::pool::ExhaustedReason::ConcurrencyLimit,
                    }
                } else {
                    PoolError::Internal(e.to_string())
                };
                crate::resilience::Failed {
                    class: crate::resilience::classify(&error, &edge.rules),
                    error,
                    attempts: 0,
                    budget_exhausted: false,
                }
            }
        });
        match result {
            Ok(served) => {
                let worker = served.response.worker.to_string();
                Ok(edge.respond(
                    pb::ExecuteResponse {
                        payload: served.response.payload,
                        content_type: served.response.content_type,
                        backend: BACKEND_LEGACY.into(),
                        worker_id: worker.clone(),
                        attempts: served.attempts,
                    },
                    Some(worker),
                ))
            }
            Err(failed) => {
                let mut status = edge.status_after(&failed.error, failed.attempts);
                if failed.budget_exhausted {
                    status.metadata_mut().insert(
                        "x-pitboss-retry-budget-exhausted",
                        MetadataValue::from_static("true"),
                    );
                }
                Err(status)
            }
        }
    }

    type ExecuteStreamStream = ChunkStream;

    async fn execute_stream(
        &self,
        req: Request<pb::ExecuteRequest>,
    ) -> Result<Response<Self::ExecuteStreamStream>, Status> {
        let edge = self.0.clone();
        edge.refuse_if_draining()?;
        let (md, _, r) = req.into_parts();
        let pr = edge.pool_request(r, &md);
        // Streams are not retried (chunks may already be out), but the backend's
        // breaker guards them and learns from them like any call.
        let permit = edge
            .breaker
            .try_acquire()
            .map_err(|retry_after| edge.status(&PoolError::CircuitOpen { retry_after }))?;
        let mut stream = match edge.pool.execute_stream(pr).await {
            Ok(s) => s,
            Err(e) => {
                permit.record(Some(crate::resilience::classify(&e, &edge.rules)));
                return Err(edge.status(&e));
            }
        };
        let worker = stream.worker().map(|w| w.to_string()).unwrap_or_default();
        let (tx, rx) = mpsc::channel(16);
        let w = worker.clone();
        let e2 = edge.clone();
        tokio::spawn(async move {
            // Hold one chunk back, so the last one can say it is last.
            let mut held: Option<pb::ExecuteChunk> = None;
            loop {
                match stream.next().await {
                    Some(Ok(chunk)) => {
                        let next = pb::ExecuteChunk {
                            payload: chunk.payload,
                            content_type: chunk.content_type,
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
                        permit.record(Some(crate::resilience::classify(&err, &e2.rules)));
                        if let Some(prev) = held.take() {
                            let _ = tx.send(Ok(prev)).await;
                        }
                        let _ = tx.send(Err(e2.status(&err))).await;
                        return;
                    }
                    None => {
                        permit.record(None);
                        let mut last = held.take().unwrap_or_default();
                        last.last = true;
                        last.backend = BACKEND_LEGACY.into();
                        last.worker_id = w;
                        last.attempts = 1;
                        let _ = tx.send(Ok(last)).await;
                        return;
                    }
                }
            }
        });
        Ok(edge.respond(
            Box::pin(ReceiverStream::new(rx)) as ChunkStream,
            Some(worker),
        ))
    }

    async fn create_session(
        &self,
        req: Request<pb::CreateSessionRequest>,
    ) -> Result<Response<pb::Session>, Status> {
        let edge = &self.0;
        edge.refuse_if_draining()?;
        let r = req.into_inner();
        let id = (!r.session_id.is_empty()).then_some(r.session_id);
        let info = edge
            .pool
            .create_session(id, r.metadata.into_iter().collect())
            .map_err(|e| edge.status(&e))?;
        let worker = info.worker.to_string();
        Ok(edge.respond(session_msg(info), Some(worker)))
    }

    async fn get_session(
        &self,
        req: Request<pb::GetSessionRequest>,
    ) -> Result<Response<pb::Session>, Status> {
        let edge = &self.0;
        let info = edge
            .pool
            .get_session(&req.into_inner().session_id)
            .map_err(|e| edge.status(&e))?;
        Ok(edge.respond(session_msg(info), None))
    }

    async fn close_session(
        &self,
        req: Request<pb::CloseSessionRequest>,
    ) -> Result<Response<pb::CloseSessionResponse>, Status> {
        let edge = &self.0;
        edge.pool
            .close_session(&req.into_inner().session_id)
            .map_err(|e| edge.status(&e))?;
        Ok(edge.respond(pb::CloseSessionResponse {}, None))
    }

    async fn list_commands(
        &self,
        _req: Request<pb::ListCommandsRequest>,
    ) -> Result<Response<pb::ListCommandsResponse>, Status> {
        let commands = self
            .0
            .pool
            .commands()
            .into_iter()
            .map(|c| pb::CommandInfo {
                name: c.name,
                streaming: c.streaming,
                is_async: c.is_async,
                doc: c.doc,
                backends: vec![BACKEND_LEGACY.into()],
            })
            .collect();
        Ok(self.0.respond(pb::ListCommandsResponse { commands }, None))
    }
}

/// The Admin service.
#[derive(Clone)]
pub struct AdminService(pub Arc<Edge>);

#[tonic::async_trait]
impl Admin for AdminService {
    async fn get_status(
        &self,
        _req: Request<pb::GetStatusRequest>,
    ) -> Result<Response<pb::Status>, Status> {
        let edge = &self.0;
        let st = edge.pool.status();
        let workers = st
            .workers
            .iter()
            .map(|w| pb::WorkerStatus {
                id: w.worker.map(|w| w.to_string()).unwrap_or_default(),
                slot: w.slot as u32,
                pid: w.pid.unwrap_or(0),
                state: if w.ejected {
                    "ejected".into()
                } else {
                    w.state.as_str().into()
                },
                in_flight: w.in_flight,
                requests_served: w.served,
                restarts: w.restarts,
                rss_bytes: w.rss_bytes.unwrap_or(0),
                sessions: w.sessions as u64,
                last_exit: w.last_exit.clone().unwrap_or_default(),
                uptime: w.uptime.map(duration),
            })
            .collect();
        let pool = pb::PoolStatus {
            backend: BACKEND_LEGACY.into(),
            adapter: edge.pool.config().worker.adapter.clone(),
            size: st.size as u32,
            ready: st.ready as u32,
            degraded: st.degraded,
            queue_depth: st.queue_depth as u32,
            sessions: st.sessions as u64,
            workers,
        };
        Ok(Response::new(pb::Status {
            version: env!("CARGO_PKG_VERSION").into(),
            instance_id: edge.instance_id.clone(),
            uptime: Some(duration(edge.started.elapsed())),
            pools: vec![pool],
            sessions: st.sessions as u64,
            serving: st.ready > 0 && !edge.draining.load(Ordering::Acquire),
        }))
    }

    async fn get_rollout(
        &self,
        _req: Request<pb::GetRolloutRequest>,
    ) -> Result<Response<pb::Rollout>, Status> {
        Err(Status::unimplemented(
            "rollouts are not available yet: this build serves a single (legacy) backend",
        ))
    }

    async fn set_rollout(
        &self,
        _req: Request<pb::SetRolloutRequest>,
    ) -> Result<Response<pb::Rollout>, Status> {
        Err(Status::unimplemented(
            "rollouts are not available yet: this build serves a single (legacy) backend",
        ))
    }
}
