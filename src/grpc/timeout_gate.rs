//! A call whose `grpc-timeout` header is malformed ("5" without a unit, "1.5S",
//! "+100m", nine digits) is refused before any service sees it: INTERNAL, class
//! `invalid_request`, with the value in the message. tonic ignores such a header, so
//! the call ran with no deadline at all, while its client believed it had one; gRPC's
//! spec leaves the answer open, and grpc-go's servers refuse it the same way.
//!
//! One layer on both listeners covers every method: the Bridge, Admin, health,
//! reflection and the transparent services. A call that pitboss counts in
//! `pitboss_requests_total` (Execute, ExecuteStream, CreateSession and transparent
//! calls) is counted once as refused, class `invalid_request`.

use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::future::{Either, Ready};
use tonic::codegen::http;

use super::record::{label_before_message, CallRecord};
use super::status::{self, ErrorContext, Refusal};
use super::transparent::Catalog;
use super::{deadline, Edge};
use crate::backend::Role;
use crate::resilience::ErrorClass;

/// The gate, as a tower layer. `catalog`: the transparent services served beside the
/// Bridge, to label their calls.
#[derive(Clone)]
pub struct TimeoutGateLayer {
    edge: Arc<Edge>,
    catalog: Option<Arc<Catalog>>,
}

impl TimeoutGateLayer {
    pub fn new(edge: Arc<Edge>, catalog: Option<Arc<Catalog>>) -> TimeoutGateLayer {
        TimeoutGateLayer { edge, catalog }
    }

    /// The `command` label a refused call at `path` is counted under, if pitboss
    /// counts that method's calls. The command of a Bridge call is in its request
    /// message, which the gate does not read: "other".
    fn counted_as(&self, path: &str) -> Option<String> {
        if let Some(label) = label_before_message(path) {
            return Some(label.into());
        }
        let method = self.catalog.as_ref()?.method(path)?;
        Some(super::transparent::command_label(&self.edge, &method))
    }

    fn refuse(
        &self,
        req: &http::Request<impl Sized>,
        value: String,
    ) -> http::Response<tonic::body::Body> {
        let path = req.uri().path();
        if let Some(label) = self.counted_as(path) {
            let arrived = deadline::arrival(req.extensions());
            CallRecord::new(label, arrived, None)
                .finish(Role::Legacy, Some(ErrorClass::InvalidRequest));
        }
        tracing::debug!(path, value, "call refused: malformed grpc-timeout");
        let ctx = ErrorContext {
            backend: Role::Legacy.as_str(),
            attempts: 0,
            instance: &self.edge.instance_id,
        };
        status::refusal_status(&Refusal::BadTimeout { value }, ctx).into_http()
    }
}

impl<S> tower::Layer<S> for TimeoutGateLayer {
    type Service = TimeoutGate<S>;

    fn layer(&self, inner: S) -> TimeoutGate<S> {
        TimeoutGate {
            inner,
            gate: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct TimeoutGate<S> {
    inner: S,
    gate: TimeoutGateLayer,
}

impl<S, B> tower::Service<http::Request<B>> for TimeoutGate<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Either<Ready<Result<S::Response, S::Error>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        match deadline::grpc_timeout(req.headers()) {
            Ok(_) => Either::Right(self.inner.call(req)),
            Err(deadline::MalformedTimeout(value)) => {
                Either::Left(futures_util::future::ready(Ok(self
                    .gate
                    .refuse(&req, value))))
            }
        }
    }
}
