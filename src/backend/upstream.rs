//! A `grpc` backend: an upstream server that speaks `pitboss.v1.Bridge` (a legacy
//! service that already runs elsewhere, or another pitboss).
//!
//! Its failures come back as gRPC statuses; [`upstream_error`] turns them into the
//! same [`PoolError`]/[`ErrorClass`] pair a local pool produces, so retry, breakers,
//! fallback and rollback statistics treat both kinds alike.

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint};

use crate::pool::{PoolError, PoolResponse, TimeoutStage};
use crate::proto as pb;
use crate::proto::bridge_client::BridgeClient;
use crate::resilience::{classify, Attempt, ErrorClass, ExceptionRules, OneTry, Reply, TryService};
use crate::worker::WorkerId;

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
        let endpoint = Endpoint::from_shared(address.to_string())
            .map_err(|source| BadAddress {
                address: address.to_string(),
                source,
            })?
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true);
        let client = BridgeClient::new(endpoint.connect_lazy())
            .max_decoding_message_size(max_message_bytes)
            .max_encoding_message_size(max_message_bytes);
        Ok(Upstream {
            address: address.into(),
            client,
        })
    }

    /// A request carrying the remaining time as `grpc-timeout`, and the session id as
    /// `x-session-id` (so a load balancer in front of the upstream keeps affinity).
    pub fn request<T>(
        &self,
        msg: T,
        deadline: Option<Instant>,
        session: Option<&str>,
    ) -> tonic::Request<T> {
        let mut req = tonic::Request::new(msg);
        if let Some(d) = deadline {
            req.set_timeout(d.saturating_duration_since(Instant::now()));
        }
        if let Some(v) = session.and_then(|s| s.parse().ok()) {
            req.metadata_mut().insert("x-session-id", v);
        }
        req
    }

    pub fn error(&self, status: &tonic::Status) -> PoolError {
        upstream_error(&self.address, status)
    }
}

/// Classifies an upstream's status: its own `x-pitboss-error-class` when it is a
/// pitboss, else by code.
pub fn upstream_error(address: &str, status: &tonic::Status) -> PoolError {
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
    PoolError::Upstream {
        address: address.to_string(),
        class,
        message: format!("{:?}: {}", status.code(), status.message()),
    }
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
    ) -> BoxFuture<'static, Result<Reply, PoolError>> {
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
            let req = upstream.request(msg, Some(try_deadline), r.session_id.as_deref());
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
                    })
                }
                Ok(Err(status)) => Err(upstream.error(&status)),
                Err(_) => Err(PoolError::Timeout {
                    worker: None,
                    after: started.elapsed(),
                    stage: TimeoutStage::Running,
                }),
            }
        })
    }

    /// The class the upstream's status carried ([`upstream_error`]); there are no
    /// local exception rules for a remote backend.
    fn classify(&self, error: &PoolError) -> ErrorClass {
        classify(error, &ExceptionRules::default())
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
        assert_eq!(
            crate::resilience::classify(&e, &Default::default()),
            ErrorClass::ProtocolError
        );
        assert!(e.to_string().contains("http://u"), "{e}");
        let plain = upstream_error("http://u", &tonic::Status::unavailable("conn refused"));
        assert_eq!(
            crate::resilience::classify(&plain, &Default::default()),
            ErrorClass::WorkerCrashed
        );
        let bad = upstream_error("http://u", &tonic::Status::invalid_argument("no"));
        assert_eq!(
            crate::resilience::classify(&bad, &Default::default()),
            ErrorClass::InvalidRequest
        );
    }
}
