//! A `grpc` backend: an upstream server that speaks `pitboss.v1.Bridge` (a legacy
//! service that already runs elsewhere, or another pitboss).
//!
//! Its failures come back as gRPC statuses; [`upstream_error`] reads each once into a
//! [`CallError::Remote`] that carries the class the upstream reported, so retry,
//! breakers, fallback and rollback statistics treat both kinds alike.

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint};

use std::collections::BTreeMap;

use bytes::Bytes;

use super::{Chunks, Role, Target};
use crate::pool::{PoolRequest, PoolResponse};
use crate::proto as pb;
use crate::proto::bridge_client::BridgeClient;
use crate::resilience::{Attempt, CallError, ErrorClass, OneTry, RemoteFailure, Reply, TryService};
use crate::worker::{RequestContext, WorkerId};
use tonic::metadata::MetadataValue;

/// An upstream address that is not a URI tonic can connect to.
#[derive(Debug, thiserror::Error)]
#[error("bad upstream address {address:?}: {source}")]
pub struct BadAddress {
    pub address: String,
    pub source: tonic::transport::Error,
}

/// A lazily connected client: pitboss starts even while the upstream is down, and its
/// calls then fail as `worker_crashed` (nothing ran) until it comes back.
#[derive(Clone)]
pub struct Upstream {
    pub address: Arc<str>,
    pub client: BridgeClient<Channel>,
}

impl Upstream {
    pub fn new(address: &str, max_message_bytes: usize) -> Result<Upstream, BadAddress> {
        let endpoint = Endpoint::from_shared(address.to_string()).map_err(|source| BadAddress {
            address: address.to_string(),
            source,
        })?;
        let channel = Upstream::configure(endpoint).connect_lazy();
        Ok(Upstream::over(address, channel, max_message_bytes))
    }

    /// An `https://` upstream: the channel's connector runs TLS with `tls`, its
    /// files reloaded every `reload_interval` and on change.
    pub fn new_tls(
        address: &str,
        max_message_bytes: usize,
        tls: &crate::tls::UpstreamTls,
        reload_interval: Duration,
    ) -> Result<Upstream, crate::tls::TlsError> {
        let channel = tls.channel(address, reload_interval, Upstream::configure)?;
        Ok(Upstream::over(address, channel, max_message_bytes))
    }

    /// The endpoint options every upstream channel has.
    fn configure(endpoint: Endpoint) -> Endpoint {
        endpoint
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
    }

    fn over(address: &str, channel: Channel, max_message_bytes: usize) -> Upstream {
        let client = BridgeClient::new(channel)
            .max_decoding_message_size(max_message_bytes)
            .max_encoding_message_size(max_message_bytes);
        Upstream {
            address: address.into(),
            client,
        }
    }

    /// A request carrying the remaining time as `grpc-timeout`, the session id as
    /// `x-session-id` (so a load balancer in front of the upstream keeps affinity),
    /// and the call's `x-request-id`, `traceparent` and `tracestate`, so the upstream
    /// (a pitboss or not) logs and traces the call under the same ids.
    pub fn request<T>(
        &self,
        msg: T,
        deadline: Option<Instant>,
        session: Option<&str>,
        context: Option<&RequestContext>,
    ) -> tonic::Request<T> {
        let mut req = tonic::Request::new(msg);
        if let Some(d) = deadline {
            req.set_timeout(d.saturating_duration_since(Instant::now()));
        }
        let md = req.metadata_mut();
        if let Some(v) = session.and_then(|s| s.parse().ok()) {
            md.insert("x-session-id", v);
        }
        if let Some(ids) = context.map(|c| &c.ids) {
            let headers = [
                ("x-request-id", Some(ids.request_id.as_str())),
                ("traceparent", ids.traceparent.as_deref()),
                ("tracestate", ids.tracestate.as_deref()),
            ];
            for (name, value) in headers {
                if let Some(mut v) = value.and_then(|v| v.parse::<MetadataValue<_>>().ok()) {
                    // Unique to the call: "never indexed", no HPACK table churn.
                    v.set_sensitive(true);
                    md.insert(name, v);
                }
            }
        }
        req
    }

    pub fn error(&self, status: &tonic::Status) -> CallError {
        upstream_error(&self.address, status)
    }
}

/// Classifies an upstream's status: its own `x-pitboss-error-class` when it is a
/// pitboss, else by code.
pub fn upstream_error(address: &str, status: &tonic::Status) -> CallError {
    let named = status
        .metadata()
        .get("x-pitboss-error-class")
        .and_then(|v| v.to_str().ok())
        .and_then(ErrorClass::from_name);
    let class = named.unwrap_or(match status.code() {
        tonic::Code::Unavailable => ErrorClass::WorkerCrashed,
        tonic::Code::DeadlineExceeded => ErrorClass::DeadlineExceeded,
        tonic::Code::ResourceExhausted => ErrorClass::PoolExhausted,
        tonic::Code::InvalidArgument | tonic::Code::OutOfRange => ErrorClass::InvalidRequest,
        tonic::Code::NotFound => ErrorClass::UnknownCommand,
        tonic::Code::FailedPrecondition => ErrorClass::SessionLost,
        tonic::Code::Cancelled => ErrorClass::Cancelled,
        tonic::Code::Unknown => ErrorClass::PythonException,
        _ => ErrorClass::Internal,
    });
    CallError::Remote(RemoteFailure {
        address: address.to_string(),
        class,
        message: format!("{:?}: {}", status.code(), status.message()),
    })
}

// === impl OneTry for Upstream ===

/// The upstream as a tower service of attempts, like [`crate::resilience::PoolService`]:
/// the shared adapter applies the per-try deadline and classifies the failed tries.
pub type UpstreamService = TryService<Upstream>;

impl TryService<Upstream> {
    pub fn new(upstream: Upstream, per_try_timeout: Option<Duration>) -> Self {
        TryService::with_target(upstream, per_try_timeout)
    }
}

impl OneTry for Upstream {
    /// One `Execute` on the upstream, carrying the try's deadline as `grpc-timeout`
    /// and cut short there if the upstream overruns it (a `Timeout` while running).
    fn run(
        &self,
        attempt: Attempt,
        try_deadline: Instant,
    ) -> BoxFuture<'static, Result<Reply, CallError>> {
        let upstream = self.clone();
        Box::pin(async move {
            let r = attempt.request;
            let msg = pb::ExecuteRequest {
                command: r.command,
                payload: r.payload,
                content_type: r.content_type,
                session_id: r.session_id.clone().unwrap_or_default(),
                idempotent: attempt.idempotent,
                routing_key: String::new(),
            };
            let req = upstream.request(
                msg,
                Some(try_deadline),
                r.session_id.as_deref(),
                r.context.as_ref(),
            );
            let mut client = upstream.client.clone();
            let started = Instant::now();
            match tokio::time::timeout_at(try_deadline, client.execute(req)).await {
                Ok(Ok(resp)) => {
                    let resp = resp.into_inner();
                    Ok(Reply {
                        response: PoolResponse {
                            payload: resp.payload,
                            content_type: resp.content_type,
                            worker: WorkerId(0),
                        },
                        remote_worker: Some(format!("{}/{}", upstream.address, resp.worker_id)),
                        wire: None,
                    })
                }
                Ok(Err(status)) => Err(upstream.error(&status)),
                Err(_) => Err(CallError::DeadlineExceeded {
                    after: started.elapsed(),
                }),
            }
        })
    }

    /// The class the upstream's status carried ([`upstream_error`]); there are no
    /// local exception rules for a remote backend.
    fn classify(&self, error: &CallError) -> ErrorClass {
        error.class(&Default::default())
    }
}

// === impl Target for Upstream ===

#[tonic::async_trait]
impl Target for Upstream {
    /// Always: its failures are handled per call, by the breaker.
    fn ready(&self) -> bool {
        true
    }

    /// An upstream's commands are not known without a call.
    fn serves(&self, _command: &str) -> bool {
        false
    }

    /// An upstream is not asked, so it never says so.
    fn lacks_session(&self, _id: &str) -> bool {
        false
    }

    async fn open_stream(
        &self,
        req: PoolRequest,
        deadline: Instant,
    ) -> Result<Box<dyn Chunks>, CallError> {
        let msg = pb::ExecuteRequest {
            command: req.command,
            payload: req.payload,
            content_type: req.content_type,
            session_id: req.session_id.clone().unwrap_or_default(),
            idempotent: false,
            routing_key: String::new(),
        };
        let r = self.request(
            msg,
            Some(deadline),
            req.session_id.as_deref(),
            req.context.as_ref(),
        );
        let stream = self
            .client
            .clone()
            .execute_stream(r)
            .await
            .map_err(|s| self.error(&s))?
            .into_inner();
        Ok(Box::new(UpstreamChunks {
            stream,
            address: self.address.clone(),
            worker: None,
        }))
    }

    async fn create_session(
        &self,
        role: Role,
        id: String,
        metadata: BTreeMap<String, String>,
        deadline: Instant,
    ) -> Result<pb::Session, CallError> {
        let msg = pb::CreateSessionRequest {
            session_id: id.clone(),
            metadata: metadata.into_iter().collect(),
            routing_key: String::new(),
        };
        let r = self.request(msg, Some(deadline), Some(&id), None);
        let mut s = self
            .client
            .clone()
            .create_session(r)
            .await
            .map_err(|s| self.error(&s))?
            .into_inner();
        s.backend = role.as_str().into();
        Ok(s)
    }

    async fn get_session(
        &self,
        role: Role,
        id: &str,
        deadline: Instant,
    ) -> Result<pb::Session, CallError> {
        let msg = pb::GetSessionRequest {
            session_id: id.into(),
        };
        let r = self.request(msg, Some(deadline), Some(id), None);
        let mut s = self
            .client
            .clone()
            .get_session(r)
            .await
            .map_err(|s| self.error(&s))?
            .into_inner();
        s.backend = role.as_str().into();
        Ok(s)
    }

    async fn close_session(&self, id: &str, deadline: Instant) -> Result<(), CallError> {
        let msg = pb::CloseSessionRequest {
            session_id: id.into(),
        };
        let r = self.request(msg, Some(deadline), Some(id), None);
        self.client
            .clone()
            .close_session(r)
            .await
            .map_err(|s| self.error(&s))?;
        Ok(())
    }

    async fn commands(&self) -> Vec<pb::CommandInfo> {
        let r = self.request(
            pb::ListCommandsRequest {},
            Some(Instant::now() + Duration::from_secs(5)),
            None,
            None,
        );
        match self.client.clone().list_commands(r).await {
            Ok(resp) => resp.into_inner().commands,
            Err(e) => {
                tracing::warn!(upstream = %self.address, "cannot list the upstream's commands: {}", e.message());
                vec![]
            }
        }
    }
}

/// An upstream's stream of chunks. It names its worker on its last chunk.
struct UpstreamChunks {
    stream: tonic::Streaming<pb::ExecuteChunk>,
    address: Arc<str>,
    worker: Option<String>,
}

#[tonic::async_trait]
impl Chunks for UpstreamChunks {
    fn worker(&self) -> String {
        self.worker.clone().unwrap_or_default()
    }

    async fn next(&mut self) -> Option<Result<(Bytes, String), CallError>> {
        match self.stream.message().await {
            Ok(Some(chunk)) => {
                if chunk.last && !chunk.worker_id.is_empty() {
                    self.worker = Some(format!("{}/{}", self.address, chunk.worker_id));
                }
                Some(Ok((chunk.payload, chunk.content_type)))
            }
            Ok(None) => None,
            Err(status) => Some(Err(upstream_error(&self.address, &status))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pitboss_upstream_keeps_its_class_others_are_classified_by_code() {
        let mut s = tonic::Status::unavailable("worker w3 crashed");
        s.metadata_mut()
            .insert("x-pitboss-error-class", "protocol_error".parse().unwrap());
        let e = upstream_error("http://u", &s);
        assert_eq!(e.class(&Default::default()), ErrorClass::ProtocolError);
        assert!(e.to_string().contains("http://u"), "{e}");
        let plain = upstream_error("http://u", &tonic::Status::unavailable("conn refused"));
        assert_eq!(plain.class(&Default::default()), ErrorClass::WorkerCrashed);
        let bad = upstream_error("http://u", &tonic::Status::invalid_argument("no"));
        assert_eq!(bad.class(&Default::default()), ErrorClass::InvalidRequest);
    }
}
