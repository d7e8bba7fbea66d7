//! A `grpc` backend: an upstream server that speaks `pitboss.v1.Bridge` (a legacy
//! service that already runs elsewhere, or another pitboss).
//!
//! Its failures come back as gRPC statuses; [`upstream_error`] turns them into the
//! same [`PoolError`]/[`ErrorClass`] pair a local pool produces, so retry, breakers,
//! fallback and rollback statistics treat both kinds alike.

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::future::BoxFuture;
use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint};
use tower::Service;

use crate::pool::{PoolError, PoolResponse, TimeoutStage};
use crate::proto as pb;
use crate::proto::bridge_client::BridgeClient;
use crate::resilience::{Attempt, ErrorClass, Failed, Served};
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

/// The upstream as a tower service of attempts, like [`crate::resilience::PoolService`].
#[derive(Clone)]
pub struct UpstreamService {
    upstream: Upstream,
    per_try_timeout: Option<Duration>,
}

impl UpstreamService {
    pub fn new(upstream: Upstream, per_try_timeout: Option<Duration>) -> Self {
        UpstreamService {
            upstream,
            per_try_timeout,
        }
    }
}

impl Service<Attempt> for UpstreamService {
    type Response = Served;
    type Error = Failed;
    type Future = BoxFuture<'static, Result<Served, Failed>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Failed>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, attempt: Attempt) -> Self::Future {
        let upstream = self.upstream.clone();
        let try_deadline = attempt.try_deadline(self.per_try_timeout);
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
            let result = tokio::time::timeout_at(try_deadline, client.execute(req)).await;
            let fail = |error: PoolError| {
                let class = crate::resilience::retry::class_of_try(
                    crate::resilience::classify(&error, &Default::default()),
                    try_deadline,
                    attempt.deadline,
                );
                Failed {
                    class,
                    error,
                    attempts: attempt.number,
                    budget_exhausted: false,
                }
            };
            match result {
                Ok(Ok(resp)) => {
                    let resp = resp.into_inner();
                    Ok(Served {
                        response: PoolResponse {
                            payload: resp.payload,
                            content_type: resp.content_type,
                            worker: WorkerId(0),
                        },
                        attempts: attempt.number,
                        remote_worker: Some(format!("{}/{}", upstream.address, resp.worker_id)),
                    })
                }
                Ok(Err(status)) => Err(fail(upstream.error(&status))),
                Err(_) => Err(fail(PoolError::Timeout {
                    worker: None,
                    after: started.elapsed(),
                    stage: TimeoutStage::Running,
                })),
            }
        })
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
