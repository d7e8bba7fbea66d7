//! Counts every call of `pitboss.v1.Admin` once, by method and gRPC code, in
//! `pitboss_admin_requests_total`: what an operator alerts on ("a SetRollout
//! succeeded", "someone keeps sending a wrong token") and what shows that the CLI or a
//! pipeline really reached pitboss. The audit trail (GetRolloutHistory) keeps who
//! changed what; this counts every call, reads and refusals included.
//!
//! The layer is the outermost on the admin listener, so it sees every answer: the
//! handler's, and the refusals made before the handler runs (a malformed
//! `grpc-timeout`, a second request message, a message over the limit). The code is
//! read from the response headers (an error answer is trailers-only) or from the
//! trailers; a call whose client went away before the answer ended is `CANCELLED`.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use tonic::codegen::http;

/// The Admin service's path prefix.
const ADMIN: &str = "/pitboss.v1.Admin/";

/// The methods of `pitboss.v1.Admin`, the bounded values of the `method` label
/// (besides `other`, for a method the service does not have).
pub const ADMIN_METHODS: [&str; 4] = ["GetStatus", "GetRollout", "SetRollout", "GetRolloutHistory"];

/// The `method` label of a call at `path`, pure: `None` when it is not an Admin call
/// (reflection, which shares the listener).
pub fn admin_method(path: &str) -> Option<&'static str> {
    let method = path.strip_prefix(ADMIN)?;
    Some(
        ADMIN_METHODS
            .into_iter()
            .find(|m| *m == method)
            .unwrap_or("other"),
    )
}

/// gRPC's name for a status code, as its spec writes it (`OK`, `UNAUTHENTICATED`);
/// `UNKNOWN` for a value outside 0 to 16 or no value at all, as gRPC clients read it.
pub fn code_name(code: Option<&[u8]>) -> &'static str {
    const NAMES: [&str; 17] = [
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    ];
    code.and_then(|c| std::str::from_utf8(c).ok())
        .and_then(|c| c.parse::<usize>().ok())
        .and_then(|c| NAMES.get(c).copied())
        .unwrap_or("UNKNOWN")
}

/// Registers `pitboss_admin_requests_total` at 0 for each method's `OK`, so that an
/// alert on `increase(...{method="SetRollout",code="OK"}[5m]) > 0` has a series to
/// compare with from the first scrape.
pub fn register() {
    for method in ADMIN_METHODS {
        count(method, "OK", 0);
    }
}

fn count(method: &'static str, code: &'static str, n: u64) {
    metrics::counter!("pitboss_admin_requests_total", "method" => method, "code" => code)
        .increment(n);
}

/// One Admin call, counted exactly once: with the code of its answer, else on drop
/// (the client went away, or the listener stopped) as `CANCELLED`.
struct AdminCall {
    method: Option<&'static str>,
}

impl AdminCall {
    fn finish(&mut self, code: &'static str) {
        if let Some(method) = self.method.take() {
            count(method, code, 1);
        }
    }
}

impl Drop for AdminCall {
    fn drop(&mut self) {
        self.finish("CANCELLED");
    }
}

/// The counting layer.
#[derive(Clone, Copy, Default)]
pub struct AdminRecordLayer;

impl<S> tower::Layer<S> for AdminRecordLayer {
    type Service = AdminRecord<S>;

    fn layer(&self, inner: S) -> AdminRecord<S> {
        AdminRecord { inner }
    }
}

#[derive(Clone)]
pub struct AdminRecord<S> {
    inner: S,
}

type BoxFuture<T> = Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<S> tower::Service<http::Request<tonic::body::Body>> for AdminRecord<S>
where
    S: tower::Service<
        http::Request<tonic::body::Body>,
        Response = http::Response<tonic::body::Body>,
    >,
    S::Future: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let Some(method) = admin_method(req.uri().path()) else {
            return Box::pin(self.inner.call(req));
        };
        // The client resetting the stream while its request is still on the way
        // shows up as an error of the request body; tonic then answers INTERNAL (or
        // UNKNOWN) to a client that is gone.
        let gone = Arc::new(AtomicBool::new(false));
        let watched = gone.clone();
        let req = req.map(move |inner| {
            tonic::body::Body::new(WatchedRequest {
                inner,
                gone: watched,
            })
        });
        let answer = self.inner.call(req);
        // Made before the answer is awaited, so a call dropped while its handler runs
        // is counted too.
        let mut call = AdminCall {
            method: Some(method),
        };
        Box::pin(async move {
            let resp = answer.await?;
            if gone.load(Ordering::Relaxed) {
                call.finish("CANCELLED");
                return Ok(resp);
            }
            if let Some(code) = resp.headers().get("grpc-status") {
                call.finish(code_name(Some(code.as_bytes())));
                return Ok(resp);
            }
            Ok(resp.map(|inner| tonic::body::Body::new(CountedBody { inner, call })))
        })
    }
}

/// A request's body that notes whether reading it failed: the client went away.
struct WatchedRequest {
    inner: tonic::body::Body,
    gone: Arc<AtomicBool>,
}

impl HttpBody for WatchedRequest {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        let frame = std::task::ready!(Pin::new(&mut self.inner).poll_frame(cx));
        if let Some(Err(_)) = &frame {
            self.gone.store(true, Ordering::Relaxed);
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// An answer's body that counts its call when the trailers pass.
struct CountedBody {
    inner: tonic::body::Body,
    call: AdminCall,
}

impl HttpBody for CountedBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        let frame = std::task::ready!(Pin::new(&mut self.inner).poll_frame(cx));
        match &frame {
            Some(Ok(f)) => {
                if let Some(trailers) = f.trailers_ref() {
                    let code = trailers.get("grpc-status").map(|c| c.as_bytes());
                    self.call.finish(code_name(code));
                }
            }
            // tonic turns a body error into an INTERNAL answer.
            Some(Err(_)) => self.call.finish("INTERNAL"),
            // Ended without trailers: a gRPC client reads no status as UNKNOWN.
            None => self.call.finish("UNKNOWN"),
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_methods_are_labelled_by_name_and_anything_else_is_other_or_not_counted() {
        assert_eq!(
            admin_method("/pitboss.v1.Admin/SetRollout"),
            Some("SetRollout")
        );
        assert_eq!(
            admin_method("/pitboss.v1.Admin/GetStatus"),
            Some("GetStatus")
        );
        assert_eq!(
            admin_method("/pitboss.v1.Admin/GetRolloutHistory"),
            Some("GetRolloutHistory")
        );
        assert_eq!(admin_method("/pitboss.v1.Admin/DropTables"), Some("other"));
        assert_eq!(admin_method("/pitboss.v1.Admin/"), Some("other"));
        assert_eq!(
            admin_method("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"),
            None
        );
        assert_eq!(admin_method("/pitboss.v1.AdminX/GetStatus"), None);
    }

    #[test]
    fn codes_are_named_as_the_grpc_spec_writes_them() {
        assert_eq!(code_name(Some(b"0")), "OK");
        assert_eq!(code_name(Some(b"16")), "UNAUTHENTICATED");
        assert_eq!(code_name(Some(b"9")), "FAILED_PRECONDITION");
        assert_eq!(code_name(Some(b"17")), "UNKNOWN");
        assert_eq!(code_name(Some(b"x")), "UNKNOWN");
        assert_eq!(code_name(None), "UNKNOWN");
    }
}
