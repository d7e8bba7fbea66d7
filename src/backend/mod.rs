//! A backend: what serves one role (`legacy` or `new`), with its own resilience stack.
//!
//! The rollout split happens *before* a backend, so each role has its own retry
//! budget, breaker, outlier detection and concurrency limit: a failing `new` opens
//! its own breaker and never spends legacy's retry budget.
//!
//! A [`Backend`] is the part every kind shares: the tower stack of unary calls (load
//! shedding, concurrency limit, retry, breaker, over one [`TryService`] of the kind),
//! the breaker around streams, and the classification of every failure, once, by the
//! backend's exception rules. What differs between a local pool and a remote Bridge is
//! behind one trait, [`Target`] ([`local`] and [`upstream`]), so no method here asks
//! which kind it has.
//!
//! [`TryService`]: crate::resilience::TryService

pub mod direct;
pub mod local;
pub mod proxy;
pub mod upstream;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;
use tower::util::BoxCloneSyncService;
use tower::ServiceExt;

use crate::config::{BackendConfig, BackendKind};
use crate::pool::{Pool, PoolConfig, PoolError, PoolObserver, PoolRequest};
use crate::proto as pb;
use crate::resilience::breaker::Permit;
use crate::resilience::{
    Attempt, Breaker, BreakerLayer, BreakerSettings, CallError, ExceptionRules, Failed,
    OutlierDetector, OutlierSettings, PoolService, RetryPolicy, RetrySettings, Served,
};
pub use proxy::{Proxy, ProxyService, ReflectionError};
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
    /// The upstream's TLS material (the error names the key and file); boxed, as
    /// its variants carry several paths and names.
    #[error(transparent)]
    UpstreamTls(Box<crate::tls::TlsError>),
    #[error("backends.{role}: kind is \"none\"")]
    KindNone { role: &'static str },
}

impl From<crate::tls::TlsError> for StartError {
    fn from(e: crate::tls::TlsError) -> StartError {
        StartError::UpstreamTls(Box::new(e))
    }
}

/// The two roles of a rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    Legacy,
    New,
}

impl Role {
    /// The `backend` byte a worker's context block carries.
    pub fn context_backend(self) -> crate::worker::ContextBackend {
        match self {
            Role::Legacy => crate::worker::ContextBackend::Legacy,
            Role::New => crate::worker::ContextBackend::New,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Legacy => "legacy",
            Role::New => "new",
        }
    }
}

/// What one kind of backend (a local pool, a remote Bridge) does besides unary calls,
/// which go through its [`TryService`](crate::resilience::TryService). Errors are
/// returned unclassified: the [`Backend`] classifies them, once, by its rules.
#[tonic::async_trait]
pub trait Target: Send + Sync + 'static {
    /// The pool behind it, for pool status and gauges; `None` for a remote backend.
    fn pool(&self) -> Option<&Pool> {
        None
    }

    /// Whether it can take calls now.
    fn ready(&self) -> bool;

    /// Whether it is known to serve `command` without asking over the network.
    fn serves(&self, command: &str) -> bool;

    /// Whether it is known not to hold session `id`, without a network call.
    fn lacks_session(&self, id: &str) -> bool;

    /// Starts a streaming call that must end by `deadline`.
    async fn open_stream(
        &self,
        req: PoolRequest,
        deadline: Instant,
    ) -> Result<Box<dyn Chunks>, CallError>;

    async fn create_session(
        &self,
        role: Role,
        id: String,
        metadata: BTreeMap<String, String>,
        deadline: Instant,
    ) -> Result<pb::Session, CallError>;

    async fn get_session(
        &self,
        role: Role,
        id: &str,
        deadline: Instant,
    ) -> Result<pb::Session, CallError>;

    async fn close_session(&self, id: &str, deadline: Instant) -> Result<(), CallError>;

    /// The commands it serves (a remote backend that cannot be reached lists none).
    async fn commands(&self) -> Vec<pb::CommandInfo>;

    /// Stops it (a pool's workers); a remote backend has nothing to stop.
    async fn shutdown(&self) {}

    /// Forwards a call whole, body and all (a client-streaming or bidi method, which
    /// cannot be split): only a `grpc_proxy` can; others answer `None`.
    async fn relay(
        &self,
        _req: http::Request<tonic::body::Body>,
    ) -> Option<Result<http::Response<tonic::body::Body>, CallError>> {
        None
    }

    /// The descriptors of `services` from the service's reflection: only a
    /// `grpc_proxy` can ask; others answer `None`.
    async fn descriptors(
        &self,
        _services: &[String],
    ) -> Option<Result<prost_types::FileDescriptorSet, ReflectionError>> {
        None
    }
}

/// The chunks of one streaming call, from either kind of backend.
#[tonic::async_trait]
pub trait Chunks: Send {
    /// The worker serving it as the client is told; empty while not known (a remote
    /// backend names it on its last chunk).
    fn worker(&self) -> String;

    /// The next chunk as (payload, content type); `None` after the last one.
    async fn next(&mut self) -> Option<Result<(Bytes, String), CallError>>;

    /// The response headers a `grpc_proxy`'s service sent, for the client; `None` for
    /// other kinds.
    fn headers(&self) -> Option<http::HeaderMap> {
        None
    }

    /// Its trailers, once the stream has ended with OK; `None` for other kinds.
    fn trailers(&self) -> Option<http::HeaderMap> {
        None
    }
}

/// One try of a unary call on whichever kind of backend: the shared adapter
/// ([`crate::resilience::TryService`]) over the kind's [`crate::resilience::OneTry`].
pub type AttemptService = BoxCloneSyncService<Attempt, Served, Failed>;

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
    target: Arc<dyn Target>,
    stack: ExecuteStack,
    pub breaker: Breaker,
    rules: Arc<ExceptionRules>,
    /// Deadline for calls that arrive without one.
    pub default_timeout: Duration,
    /// For status output: the adapter or the upstream address.
    pub describe: String,
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

/// The TLS client settings of a remote backend (`grpc` or `grpc_proxy`) at an
/// `https://` address; `None` for plaintext.
fn upstream_tls(cfg: &BackendConfig) -> Result<Option<crate::tls::UpstreamTls>, StartError> {
    if !cfg.address.starts_with("https://") {
        return Ok(None);
    }
    let tls = crate::tls::UpstreamTls::from_section(
        cfg.role,
        &cfg.address,
        &cfg.tls,
        &cfg.effective.base_dir,
    )?;
    Ok(Some(tls))
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
        let (target, service, describe): (Arc<dyn Target>, AttemptService, String) = match cfg.kind
        {
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
                let service = PoolService::new(
                    pool.clone(),
                    rules.clone(),
                    retry_settings.per_try_timeout,
                    Arc::new(OutlierDetector::new(OutlierSettings::from_section(
                        &c.circuit_breaker,
                    ))),
                );
                (
                    Arc::new(pool),
                    AttemptService::new(service),
                    c.pool.adapter.clone(),
                )
            }
            BackendKind::Grpc => {
                let upstream = if let Some(tls) = upstream_tls(cfg)? {
                    Upstream::new_tls(&cfg.address, max_message, &tls, c.tls.reload_interval.0)?
                } else {
                    Upstream::new(&cfg.address, max_message).map_err(|source| {
                        StartError::Upstream {
                            role: cfg.role,
                            source,
                        }
                    })?
                };
                let service =
                    UpstreamService::new(upstream.clone(), retry_settings.per_try_timeout);
                (
                    Arc::new(upstream),
                    AttemptService::new(service),
                    cfg.address.clone(),
                )
            }
            BackendKind::GrpcProxy => {
                let proxy = if let Some(tls) = upstream_tls(cfg)? {
                    Proxy::new_tls(&cfg.address, max_message, &tls, c.tls.reload_interval.0)?
                } else {
                    Proxy::new(&cfg.address, max_message).map_err(|source| {
                        StartError::Upstream {
                            role: cfg.role,
                            source,
                        }
                    })?
                };
                let service = ProxyService::new(proxy.clone(), retry_settings.per_try_timeout);
                (
                    Arc::new(proxy),
                    AttemptService::new(service),
                    cfg.address.clone(),
                )
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
        self.target.pool()
    }

    /// Whether it can take calls: a pool with a ready worker; an upstream always (its
    /// failures are handled per call, by the breaker).
    pub fn ready(&self) -> bool {
        self.target.ready()
    }

    /// Whether it is known to serve `command`: a pool whose workers registered it. An
    /// upstream's commands are not known without a call, so it says no.
    pub fn serves(&self, command: &str) -> bool {
        self.target.serves(command)
    }

    /// Whether this backend is known not to hold session `id` (expired, closed, or
    /// lost with its worker), without a network call: a pool knows; an upstream is
    /// not asked, so it never says so.
    pub fn lacks_session(&self, id: &str) -> bool {
        self.target.lacks_session(id)
    }

    /// A failure of one try of this backend, classified by its rules.
    pub fn failed(&self, error: CallError) -> Failed {
        Failed {
            class: error.class(&self.rules),
            error,
            attempts: 1,
            budget_exhausted: false,
        }
    }

    /// Marks a request's context with this backend's role (the adapter's
    /// `request.backend`).
    fn tag(&self, req: &mut PoolRequest) {
        if let Some(c) = &mut req.context {
            c.backend = self.role.context_backend();
        }
    }

    /// The deadline of a call that arrived without one.
    pub fn deadline_from_now(&self) -> Instant {
        Instant::now() + self.default_timeout
    }

    /// Runs one call through the backend's whole stack.
    pub async fn execute(&self, mut attempt: Attempt) -> Result<Served, Failed> {
        self.tag(&mut attempt.request);
        let result = self.stack.clone().oneshot(attempt).await;
        result.map_err(|e| match e.downcast::<Failed>() {
            Ok(failed) => *failed,
            Err(e) => {
                let error = if e.is::<tower::load_shed::error::Overloaded>() {
                    CallError::Overloaded
                } else {
                    CallError::Internal(e.to_string())
                };
                Failed {
                    attempts: 0,
                    ..self.failed(error)
                }
            }
        })
    }

    /// Starts a streaming call behind the backend's breaker. Streams are not retried
    /// (chunks may already be out); the returned stream records its outcome on the
    /// breaker when it ends.
    pub async fn open_stream(&self, mut req: PoolRequest) -> Result<BackendStream, Failed> {
        self.tag(&mut req);
        let permit = self
            .breaker
            .try_acquire()
            .map_err(|retry_after| self.failed(CallError::CircuitOpen { retry_after }))?;
        let deadline = req.deadline.unwrap_or_else(|| self.deadline_from_now());
        match self.target.open_stream(req, deadline).await {
            Ok(chunks) => Ok(BackendStream {
                permit: Some(permit),
                chunks,
                rules: self.rules.clone(),
            }),
            Err(error) => {
                let failed = self.failed(error);
                permit.record(Some(failed.class));
                Err(failed)
            }
        }
    }

    /// Creates session `id` on this backend.
    pub async fn create_session(
        &self,
        id: String,
        metadata: BTreeMap<String, String>,
    ) -> Result<pb::Session, Failed> {
        let deadline = self.deadline_from_now();
        self.target
            .create_session(self.role, id, metadata, deadline)
            .await
            .map_err(|e| self.failed(e))
    }

    pub async fn get_session(&self, id: &str) -> Result<pb::Session, Failed> {
        let deadline = self.deadline_from_now();
        self.target
            .get_session(self.role, id, deadline)
            .await
            .map_err(|e| self.failed(e))
    }

    pub async fn close_session(&self, id: &str) -> Result<(), Failed> {
        let deadline = self.deadline_from_now();
        self.target
            .close_session(id, deadline)
            .await
            .map_err(|e| self.failed(e))
    }

    /// The commands it serves (an unreachable upstream lists none).
    pub async fn commands(&self) -> Vec<pb::CommandInfo> {
        self.target.commands().await
    }

    pub async fn shutdown(&self) {
        self.target.shutdown().await
    }

    /// Forwards a call whole (see [`Target::relay`]); `None` when this kind cannot.
    pub async fn relay(
        &self,
        req: http::Request<tonic::body::Body>,
    ) -> Option<Result<http::Response<tonic::body::Body>, Failed>> {
        let relayed = self.target.relay(req).await?;
        Some(relayed.map_err(|e| self.failed(e)))
    }

    /// The descriptors of `services` from the backend's reflection (see
    /// [`Target::descriptors`]); `None` when this kind cannot ask.
    pub async fn descriptors(
        &self,
        services: &[String],
    ) -> Option<Result<prost_types::FileDescriptorSet, ReflectionError>> {
        self.target.descriptors(services).await
    }
}

/// A streaming call on a backend, holding its breaker permit: the outcome is recorded
/// on the breaker once, when the stream ends, fails, or is dropped unfinished (the
/// client went away, which says nothing about the backend's health).
pub struct BackendStream {
    permit: Option<Permit>,
    chunks: Box<dyn Chunks>,
    rules: Arc<ExceptionRules>,
}

impl BackendStream {
    /// The worker serving it; see [`Chunks::worker`].
    pub fn worker(&self) -> String {
        self.chunks.worker()
    }

    /// See [`Chunks::headers`].
    pub fn headers(&self) -> Option<http::HeaderMap> {
        self.chunks.headers()
    }

    /// See [`Chunks::trailers`].
    pub fn trailers(&self) -> Option<http::HeaderMap> {
        self.chunks.trailers()
    }

    /// The next chunk; `None` after the last one. A failure is classified here, by
    /// the backend's rules, and ends the stream.
    pub async fn next(&mut self) -> Option<Result<(Bytes, String), Failed>> {
        match self.chunks.next().await {
            Some(Ok(chunk)) => Some(Ok(chunk)),
            None => {
                self.end(None);
                None
            }
            Some(Err(error)) => {
                let class = error.class(&self.rules);
                self.end(Some(class));
                Some(Err(Failed {
                    class,
                    error,
                    attempts: 1,
                    budget_exhausted: false,
                }))
            }
        }
    }

    fn end(&mut self, class: Option<crate::resilience::ErrorClass>) {
        if let Some(permit) = self.permit.take() {
            permit.record(class);
        }
    }
}

impl Drop for BackendStream {
    fn drop(&mut self) {
        self.end(None);
    }
}
