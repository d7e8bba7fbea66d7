//! One request message for the methods that take one. Every method of
//! `pitboss.v1.Bridge`, `pitboss.v1.Admin` and `grpc.health.v1.Health` reads exactly
//! one request message (ExecuteStream and Health's Watch stream only their answers).
//! tonic reads the first message of such a call and drops the rest unseen, so a
//! client that sent two (a broken client, or one calling the wrong method kind)
//! would be answered as if it had sent one. gRPC's own servers refuse it with
//! INTERNAL (grpc-go: "client streaming protocol violation"; grpc-java: "Too many
//! requests"), and so does pitboss, before the call reaches a backend.
//!
//! Reflection streams its requests, and the transparent services count their
//! messages themselves, so their paths are left alone.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use tonic::body::Body;
use tonic::Status;

use super::status::{self, ErrorContext, Refusal};
use crate::backend::Role;
use crate::wire::frame::MessageCount;

/// The services whose every method takes one request message.
const ONE_MESSAGE_SERVICES: [&str; 3] = [
    "/pitboss.v1.Bridge/",
    "/pitboss.v1.Admin/",
    "/grpc.health.v1.Health/",
];

/// Whether the method at `path` takes exactly one request message.
pub fn takes_one_message(path: &str) -> bool {
    ONE_MESSAGE_SERVICES.iter().any(|s| path.starts_with(s))
}

/// Wraps the body of a request to a one-message method in [`OneMessage`]; other
/// requests pass as they are. `instance` is this pitboss's id, for the refusal's
/// details.
pub fn check_request(
    instance: Arc<str>,
) -> impl Fn(http::Request<Body>) -> http::Request<Body> + Clone {
    move |req: http::Request<Body>| {
        if !takes_one_message(req.uri().path()) {
            return req;
        }
        let method: Arc<str> = req.uri().path().into();
        let instance = instance.clone();
        req.map(|body| {
            Body::new(OneMessage {
                inner: body,
                count: MessageCount::default(),
                method,
                instance,
            })
        })
    }
}

/// A request body that fails, with the refusal's status, as soon as a second
/// message begins. tonic reads the whole body of a unary-request call before the
/// method runs, so the method never runs.
struct OneMessage {
    inner: Body,
    count: MessageCount,
    /// The call's path, for the message.
    method: Arc<str>,
    instance: Arc<str>,
}

impl OneMessage {
    fn refusal(&self) -> Status {
        let ctx = ErrorContext {
            backend: Role::Legacy.as_str(),
            attempts: 0,
            instance: &self.instance,
        };
        let refusal = Refusal::SecondMessage {
            method: self.method.to_string(),
        };
        status::refusal_status(&refusal, ctx)
    }
}

impl HttpBody for OneMessage {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let frame = ready!(Pin::new(&mut self.inner).poll_frame(cx));
        if let Some(Ok(frame)) = &frame {
            if let Some(data) = frame.data_ref() {
                if self.count.push(data) > 1 {
                    return Poll::Ready(Some(Err(self.refusal())));
                }
            }
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
    fn only_reflection_and_other_services_may_stream_their_requests() {
        assert!(takes_one_message("/pitboss.v1.Bridge/Execute"));
        assert!(takes_one_message("/pitboss.v1.Bridge/ExecuteStream"));
        assert!(takes_one_message("/pitboss.v1.Admin/SetRollout"));
        assert!(takes_one_message("/grpc.health.v1.Health/Watch"));
        assert!(!takes_one_message(
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"
        ));
        assert!(!takes_one_message("/calc.Calculator/Add"));
        assert!(!takes_one_message("/pitboss.v1.BridgeX/Execute"));
    }

    #[tokio::test]
    async fn a_second_message_fails_the_body_with_internal_and_one_passes() {
        use http_body_util::BodyExt;
        let instance: Arc<str> = "test-instance".into();
        let check = check_request(instance);
        let one = crate::wire::frame::encode(b"one");
        let two = [one.to_vec(), one.to_vec()].concat();

        let req = http::Request::builder()
            .uri("/pitboss.v1.Bridge/Execute")
            .body(Body::new(http_body_util::Full::new(Bytes::from(two))))
            .unwrap();
        let err = check(req).into_body().collect().await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::Internal, "{err:?}");
        assert!(
            err.message().contains("/pitboss.v1.Bridge/Execute"),
            "{err:?}"
        );
        assert_eq!(
            err.metadata().get("x-pitboss-error-class").unwrap(),
            "invalid_request"
        );

        let req = http::Request::builder()
            .uri("/pitboss.v1.Bridge/Execute")
            .body(Body::new(http_body_util::Full::new(one.clone())))
            .unwrap();
        let got = check(req).into_body().collect().await.unwrap().to_bytes();
        assert_eq!(got, one);
    }
}
