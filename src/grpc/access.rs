//! Who may call the Bridge: with `tls.bridge.allow` set (under mTLS), only clients
//! whose certificate carries a listed identity; the others get PERMISSION_DENIED
//! before any service sees the call. `grpc.health.v1` stays open to every client that
//! completed the handshake, so a load balancer's health checks need no listing.
//!
//! The Admin service decides per call in [`super::admin`], since read-only and
//! changing calls differ there.

use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::future::{Either, Ready};
use tonic::codegen::http;
use tonic::Status;

use crate::tls::{Allowlist, ClientIdentity, PeerInfo};

/// The health service's path prefix: open to every authenticated client.
const HEALTH: &str = "/grpc.health.v1.Health/";

/// The decision, pure: `None` to let the call through, else the refusal.
pub fn bridge_access(
    allow: &Allowlist,
    path: &str,
    identity: Option<&ClientIdentity>,
) -> Result<(), Status> {
    if allow.is_empty() || path.starts_with(HEALTH) {
        return Ok(());
    }
    match identity {
        Some(id) if allow.allows(id) => Ok(()),
        Some(id) => Err(Status::permission_denied(format!(
            "client identity {id} may not call this service: it is not in tls.bridge.allow"
        ))),
        None => Err(Status::permission_denied(
            "no client certificate: this service admits only the identities in tls.bridge.allow",
        )),
    }
}

/// Counts a refusal, by listener.
pub fn count_denied(listener: &'static str) {
    metrics::counter!("pitboss_access_denied_total", "listener" => listener).increment(1);
}

/// The Bridge listener's gate, as a tower layer.
#[derive(Clone)]
pub struct BridgeGateLayer {
    allow: Arc<Allowlist>,
}

impl BridgeGateLayer {
    pub fn new(allow: Allowlist) -> BridgeGateLayer {
        BridgeGateLayer {
            allow: Arc::new(allow),
        }
    }
}

impl<S> tower::Layer<S> for BridgeGateLayer {
    type Service = BridgeGate<S>;

    fn layer(&self, inner: S) -> BridgeGate<S> {
        BridgeGate {
            inner,
            allow: self.allow.clone(),
        }
    }
}

#[derive(Clone)]
pub struct BridgeGate<S> {
    inner: S,
    allow: Arc<Allowlist>,
}

impl<S, B> tower::Service<http::Request<B>> for BridgeGate<S>
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
        let identity = PeerInfo::of(req.extensions()).and_then(|p| p.identity.as_deref());
        match bridge_access(&self.allow, req.uri().path(), identity) {
            Ok(()) => Either::Right(self.inner.call(req)),
            Err(status) => {
                count_denied("bridge");
                tracing::info!(path = req.uri().path(), peer = ?PeerInfo::of(req.extensions()).and_then(|p| p.tcp.remote_addr), "call refused: {}", status.message());
                Either::Left(futures_util::future::ready(Ok(status.into_http())))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_listed_identities_reach_the_bridge_and_health_is_open() {
        let allow = Allowlist::new(&["spiffe://prod/ns/shop/*".to_string()]);
        let shop = ClientIdentity {
            uris: vec!["spiffe://prod/ns/shop/sa/api".into()],
            dns: vec![],
        };
        let other = ClientIdentity {
            uris: vec!["spiffe://prod/ns/ads/sa/api".into()],
            dns: vec![],
        };
        let exec = "/pitboss.v1.Bridge/Execute";
        assert!(bridge_access(&allow, exec, Some(&shop)).is_ok());
        let denied = bridge_access(&allow, exec, Some(&other)).unwrap_err();
        assert_eq!(denied.code(), tonic::Code::PermissionDenied);
        assert!(denied.message().contains("spiffe://prod/ns/ads/sa/api"));
        assert!(denied.message().contains("tls.bridge.allow"));
        assert_eq!(
            bridge_access(&allow, exec, None).unwrap_err().code(),
            tonic::Code::PermissionDenied
        );
        assert!(bridge_access(&allow, "/grpc.health.v1.Health/Check", Some(&other)).is_ok());
        assert!(bridge_access(&Allowlist::default(), exec, None).is_ok());
    }
}
