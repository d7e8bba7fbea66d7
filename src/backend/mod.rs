//! A backend: what serves one role (`legacy` or `new`), with its own resilience stack.
//!
//! The rollout split happens *before* a backend, so each role has its own retry
//! budget, breaker, outlier detection and concurrency limit: a failing `new` opens
//! its own breaker and never spends legacy's retry budget.

pub mod upstream;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use tokio::time::Instant;
use tower::{Service, ServiceExt};

use crate::config::{BackendConfig, BackendKind};
use crate::pool::{ExhaustedReason, Pool, PoolConfig, PoolError, PoolObserver, PoolStream};
use crate::proto as pb;
use crate::resilience::{
    classify, Attempt, Breaker, BreakerLayer, BreakerSettings, ExceptionRules, Failed,
    OutlierDetector, OutlierSettings, PoolService, RetryPolicy, RetrySettings, Served,
};
pub use upstream::{BadAddress, Upstream, UpstreamService};

/// Why a backend cannot start. Each names the backend (`backends.legacy: ...`) and
/// keeps the cause as its `source()`.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("backends.{role}: retry: {source}")]
    Retry {
        role: &'static str,
        source: crate::resilience::InvalidRetrySettings,
    },
    #[error("backends.{role}: circuit_breaker: {source}")]
    Breaker {
        role: &'static str,
        source: crate::resilience::InvalidSetting,
    },
    #[error("backends.{role}: {source}")]
    Pool {
        role: &'static str,
        source: PoolError,
    },
    #[error("backends.{role}: {source}")]
    Upstream {
        role: &'static str,
        source: BadAddress,
    },
    #[error("backends.{role}: kind is \"none\"")]
    KindNone { role: &'static str },
}

/// The two roles of a rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    Legacy,
    New,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Legacy => "legacy",
            Role::New => "new",
        }
    }
}

/// Where a backend's calls go.
#[derive(Clone)]
pub enum Target {
    Pool(Pool),
    Grpc(Upstream),
}

/// A pool or an upstream, as one tower service of attempts: either is the one
/// adapter [`crate::resilience::TryService`] (per-try deadline, the try's class) over
/// its own [`crate::resilience::OneTry`].
#[derive(Clone)]
pub enum AttemptService {
    Pool(PoolService),
    Grpc(UpstreamService),
}

impl Service<Attempt> for AttemptService {
    type Response = Served;
    type Error = Failed;
    type Future = BoxFuture<'static, Result<Served, Failed>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Failed>> {
        match self {
            AttemptService::Pool(s) => s.poll_ready(cx),
            AttemptService::Grpc(s) => s.poll_ready(cx),
        }
    }

    fn call(&mut self, attempt: Attempt) -> Self::Future {
        match self {
            AttemptService::Pool(s) => s.call(attempt),
            AttemptService::Grpc(s) => s.call(attempt),
        }
    }
}

/// The tower stack every `Execute` goes through, outermost first: load shedding, a
/// concurrency limit, retry, and the backend's breaker (which sees every attempt).
pub type ExecuteStack = tower::load_shed::LoadShed<
    tower::limit::ConcurrencyLimit<
        tower::retry::Retry<
            RetryPolicy,
            crate::resilience::breaker::BreakerService<AttemptService>,
        >,
    >,
>;

/// One backend role, ready to serve.
pub struct Backend {
    pub role: Role,
    pub target: Target,
    pub stack: ExecuteStack,
    pub breaker: Breaker,
    pub rules: Arc<ExceptionRules>,
    /// Deadline for calls that arrive without one.
    pub default_timeout: Duration,
    /// For status output: the adapter or the upstream address.
    pub describe: String,
}

/// A stream of result chunks from either kind of backend.
pub enum ChunkSource {
    Pool(PoolStream),
    Grpc {
        stream: Box<tonic::Streaming<pb::ExecuteChunk>>,
        upstream: Upstream,
        worker: Option<String>,
    },
}

impl ChunkSource {
    pub fn worker(&self) -> String {
        match self {
            ChunkSource::Pool(s) => s.worker().map(|w| w.to_string()).unwrap_or_default(),
            ChunkSource::Grpc { worker, .. } => worker.clone().unwrap_or_default(),
        }
    }

    /// The next chunk as (payload, content type); `None` after the last one.
    pub async fn next(&mut self) -> Option<Result<(Bytes, String), PoolError>> {
        match self {
            ChunkSource::Pool(s) => s
                .next()
                .await
                .map(|r| r.map(|c| (c.payload, c.content_type))),
            ChunkSource::Grpc {
                stream,
                upstream,
                worker,
            } => match stream.message().await {
                Ok(Some(chunk)) => {
                    if chunk.last && !chunk.worker_id.is_empty() {
                        *worker = Some(format!("{}/{}", upstream.address, chunk.worker_id));
                    }
                    Some(Ok((chunk.payload, chunk.content_type)))
                }
                Ok(None) => None,
                Err(status) => Some(Err(upstream.error(&status))),
            },
        }
    }
}

/// Who hears about a backend's events. The backend defines what it reports (these
/// traits live in the layers below); whoever starts it (the server) decides where the
/// reports go (Prometheus), so no lower layer imports telemetry.
pub struct Observers {
    /// Worker exits and restarts of a pool backend.
    pub pool: Arc<dyn PoolObserver>,
    /// Retries and retry-budget refusals of this backend.
    pub retries: Arc<dyn crate::resilience::retry::RetryObserver>,
}

impl Backend {
    /// Starts the backend: launches its pool (workers start in the background), or
    /// prepares a lazily connected upstream client.
    pub async fn start(cfg: &BackendConfig, observers: Observers) -> Result<Backend, StartError> {
        let Observers {
            pool: observer,
            retries,
        } = observers;
        let role = if cfg.role == "new" {
            Role::New
        } else {
            Role::Legacy
        };
        let c = &cfg.effective;
        let retry_settings = RetrySettings::from_section(&c.retry);
        let rules = Arc::new(ExceptionRules::from_section(&c.errors));
        let policy = RetryPolicy::new(&retry_settings)
            .map_err(|source| StartError::Retry {
                role: cfg.role,
                source,
            })?
            .with_observer(retries);
        let breaker = Breaker::new(cfg.role, BreakerSettings::from_section(&c.circuit_breaker))
            .map_err(|source| StartError::Breaker {
                role: cfg.role,
                source,
            })?;
        let max_message = c.server.max_message_bytes.0 as usize;
        let (target, service, describe) = match cfg.kind {
            BackendKind::Pool => {
                let pool = Pool::launch(
                    PoolConfig::from_sections(cfg.role, &c.pool, &c.sessions, &c.base_dir),
                    observer,
                )
                .await
                .map_err(|source| StartError::Pool {
                    role: cfg.role,
                    source,
                })?;
                let service = AttemptService::Pool(PoolService::new(
                    pool.clone(),
                    rules.clone(),
                    retry_settings.per_try_timeout,
                    Arc::new(OutlierDetector::new(OutlierSettings::from_section(
                        &c.circuit_breaker,
                    ))),
                ));
                (Target::Pool(pool), service, c.pool.adapter.clone())
            }
            BackendKind::Grpc => {
                let upstream = Upstream::new(&cfg.address, max_message).map_err(|source| {
                    StartError::Upstream {
                        role: cfg.role,
                        source,
                    }
                })?;
                let service = AttemptService::Grpc(UpstreamService::new(
                    upstream.clone(),
                    retry_settings.per_try_timeout,
                ));
                (Target::Grpc(upstream), service, cfg.address.clone())
            }
            BackendKind::None => {
                return Err(StartError::KindNone { role: cfg.role });
            }
        };
        let guarded = tower::Layer::layer(&BreakerLayer::new(breaker.clone()), service);
        let retry = tower::retry::Retry::new(policy, guarded);
        let limit = match c.limits.max_concurrency {
            0 => tokio::sync::Semaphore::MAX_PERMITS,
            n => n.min(tokio::sync::Semaphore::MAX_PERMITS as u64) as usize,
        };
        let stack = tower::ServiceBuilder::new()
            .load_shed()
            .concurrency_limit(limit)
            .service(retry);
        Ok(Backend {
            role,
            target,
            stack,
            breaker,
            rules,
            default_timeout: c.pool.request_timeout.0,
            describe,
        })
    }

    pub fn pool(&self) -> Option<&Pool> {
        match &self.target {
            Target::Pool(p) => Some(p),
            Target::Grpc(_) => None,
        }
    }

    /// Whether it can take calls: a pool with a ready worker; an upstream always (its
    /// failures are handled per call, by the breaker).
    pub fn ready(&self) -> bool {
        match &self.target {
            Target::Pool(p) => p.status().ready > 0,
            Target::Grpc(_) => true,
        }
    }

    /// Whether it is known to serve `command`: a pool whose workers registered it. An
    /// upstream's commands are not known without a call, so it says no.
    pub fn serves(&self, command: &str) -> bool {
        match &self.target {
            Target::Pool(p) => p.commands().iter().any(|c| c.name == command),
            Target::Grpc(_) => false,
        }
    }

    /// Runs one call through the backend's whole stack.
    pub async fn execute(&self, attempt: Attempt) -> Result<Served, Failed> {
        let result = self.stack.clone().oneshot(attempt).await;
        result.map_err(|e| match e.downcast::<Failed>() {
            Ok(failed) => *failed,
            Err(e) => {
                let error = if e.is::<tower::load_shed::error::Overloaded>() {
                    PoolError::PoolExhausted {
                        reason: ExhaustedReason::ConcurrencyLimit,
                    }
                } else {
                    PoolError::Internal(e.to_string())
                };
                Failed {
                    class: classify(&error, &self.rules),
                    error,
                    attempts: 0,
                    budget_exhausted: false,
                }
            }
        })
    }

    /// Starts a streaming call. Streams are not retried (chunks may already be out),
    /// but the breaker guards them: the caller records the outcome on the permit.
    pub async fn execute_stream(
        &self,
        req: crate::pool::PoolRequest,
    ) -> Result<ChunkSource, PoolError> {
        match &self.target {
            Target::Pool(p) => p.execute_stream(req).await.map(ChunkSource::Pool),
            Target::Grpc(u) => {
                let msg = pb::ExecuteRequest {
                    command: req.command,
                    payload: req.payload,
                    content_type: req.content_type,
                    session_id: req.session_id.clone().unwrap_or_default(),
                    idempotent: false,
                    routing_key: String::new(),
                };
                let deadline = req
                    .deadline
                    .unwrap_or_else(|| Instant::now() + self.default_timeout);
                let r = u.request(msg, Some(deadline), req.session_id.as_deref());
                let stream = u
                    .client
                    .clone()
                    .execute_stream(r)
                    .await
                    .map_err(|s| u.error(&s))?
                    .into_inner();
                Ok(ChunkSource::Grpc {
                    stream: Box::new(stream),
                    upstream: u.clone(),
                    worker: None,
                })
            }
        }
    }

    pub async fn create_session(
        &self,
        id: Option<String>,
        metadata: BTreeMap<String, String>,
    ) -> Result<pb::Session, PoolError> {
        match &self.target {
            Target::Pool(p) => p
                .create_session(id, metadata)
                .map(|info| session_msg(self.role, info)),
            Target::Grpc(u) => {
                let msg = pb::CreateSessionRequest {
                    session_id: id.clone().unwrap_or_default(),
                    metadata: metadata.into_iter().collect(),
                    routing_key: String::new(),
                };
                let deadline = Instant::now() + self.default_timeout;
                let r = u.request(msg, Some(deadline), id.as_deref());
                let mut s = u
                    .client
                    .clone()
                    .create_session(r)
                    .await
                    .map_err(|s| u.error(&s))?
                    .into_inner();
                s.backend = self.role.as_str().into();
                Ok(s)
            }
        }
    }

    /// Whether this backend is known not to hold session `id` (expired, closed, or
    /// lost with its worker), without a network call: a pool knows; an upstream is
    /// not asked, so it never says so.
    pub fn lacks_session(&self, id: &str) -> bool {
        match &self.target {
            Target::Pool(p) => p.get_session(id).is_err(),
            Target::Grpc(_) => false,
        }
    }

    pub async fn get_session(&self, id: &str) -> Result<pb::Session, PoolError> {
        match &self.target {
            Target::Pool(p) => p.get_session(id).map(|info| session_msg(self.role, info)),
            Target::Grpc(u) => {
                let deadline = Instant::now() + self.default_timeout;
                let r = u.request(
                    pb::GetSessionRequest {
                        session_id: id.into(),
                    },
                    Some(deadline),
                    Some(id),
                );
                let mut s = u
                    .client
                    .clone()
                    .get_session(r)
                    .await
                    .map_err(|s| u.error(&s))?
                    .into_inner();
                s.backend = self.role.as_str().into();
                Ok(s)
            }
        }
    }

    pub async fn close_session(&self, id: &str) -> Result<(), PoolError> {
        match &self.target {
            Target::Pool(p) => p.close_session(id),
            Target::Grpc(u) => {
                let deadline = Instant::now() + self.default_timeout;
                let r = u.request(
                    pb::CloseSessionRequest {
                        session_id: id.into(),
                    },
                    Some(deadline),
                    Some(id),
                );
                u.client
                    .clone()
                    .close_session(r)
                    .await
                    .map_err(|s| u.error(&s))?;
                Ok(())
            }
        }
    }

    /// The commands it serves (an unreachable upstream lists none).
    pub async fn commands(&self) -> Vec<pb::CommandInfo> {
        match &self.target {
            Target::Pool(p) => p
                .commands()
                .into_iter()
                .map(|c| pb::CommandInfo {
                    name: c.name,
                    streaming: c.streaming,
                    is_async: c.is_async,
                    doc: c.doc,
                    backends: vec![],
                })
                .collect(),
            Target::Grpc(u) => {
                let r = u.request(
                    pb::ListCommandsRequest {},
                    Some(Instant::now() + Duration::from_secs(5)),
                    None,
                );
                match u.client.clone().list_commands(r).await {
                    Ok(resp) => resp.into_inner().commands,
                    Err(e) => {
                        tracing::warn!(upstream = %u.address, "cannot list the upstream's commands: {}", e.message());
                        vec![]
                    }
                }
            }
        }
    }

    pub async fn shutdown(&self) {
        if let Target::Pool(p) = &self.target {
            p.shutdown().await;
        }
    }
}

fn timestamp(t: std::time::SystemTime) -> prost_types::Timestamp {
    let d = t
        .duration_since(std::time::SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    prost_types::Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

fn session_msg(role: Role, s: crate::pool::SessionInfo) -> pb::Session {
    pb::Session {
        session_id: s.session_id,
        backend: role.as_str().into(),
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
