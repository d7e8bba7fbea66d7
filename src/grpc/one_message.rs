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
//!
//! The same body also answers a Bridge call whose deadline passes while its request
//! message is still arriving. tonic's own `grpc-timeout` timer runs outside every
//! layer pitboss can add, and the handler, with its deadline backstop
//! ([`deadline::answer_by`]), runs only once the message is in; so tonic's timer
//! answered such a call CANCELLED "Timeout expired", without pitboss's class, and
//! the call was counted nowhere. tonic polls the call before its timer, and the body
//! is polled with it, so the body answers first: DEADLINE_EXCEEDED, class
//! `deadline_exceeded`, counted once under the command "other" (its name is in the
//! message that has not arrived; CreateSession under its own).
//!
//! A refused second message is counted once too, class `invalid_request`, for the
//! Bridge methods pitboss counts (Execute, ExecuteStream, CreateSession).
//!
//! So is every other way such a call can end before its message is whole, none of
//! which reaches the handler that counts calls: a body that ends with no message or
//! inside one (refused here, INTERNAL `invalid_request`, where tonic answered with its
//! bare text), a message over the limit (tonic refuses it from its prefix; counted
//! `invalid_request`), and a client that resets the stream or loses its connection
//! mid-upload (counted `cancelled`, or `deadline_exceeded` near its deadline).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use tonic::body::Body;
use tonic::Status;

use tokio::time::Instant;

use super::record::{label_before_message, CallRecord};
use super::status::{self, ErrorContext, Refusal};
use super::{deadline, Edge};
use crate::backend::Role;
use crate::resilience::ErrorClass;
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
/// requests pass as they are. Runs after [`deadline::stamp_arrival`].
pub fn check_request(
    edge: Arc<Edge>,
    max_message_bytes: usize,
) -> impl Fn(http::Request<Body>) -> http::Request<Body> + Clone {
    move |req: http::Request<Body>| {
        let path = req.uri().path();
        if !takes_one_message(path) {
            return req;
        }
        let label = label_before_message(path);
        let arrived = deadline::arrival(req.extensions());
        let expiry = if path.starts_with("/pitboss.v1.Bridge/") {
            req.headers()
                .get("grpc-timeout")
                .and_then(|v| v.to_str().ok())
                .and_then(deadline::parse_grpc_timeout)
                .map(|d| arrived + d)
        } else {
            None
        };
        let method: Arc<str> = path.into();
        let edge = edge.clone();
        req.map(|body| {
            Body::new(OneMessage {
                inner: body,
                count: MessageCount::default(),
                method,
                edge,
                counted: label.map(|label| (label, arrived)),
                arrived,
                expiry,
                max: max_message_bytes,
            })
        })
    }
}

/// A request body that fails, with the refusal's status, as soon as a second
/// message begins (tonic reads the whole body of a unary-request call before the
/// method runs, so the method never runs); and, on a Bridge call, with
/// DEADLINE_EXCEEDED when the deadline passes while the body is still awaited.
struct OneMessage {
    inner: Body,
    count: MessageCount,
    /// The call's path, for the message.
    method: Arc<str>,
    edge: Arc<Edge>,
    /// A counted Bridge call's `command` label and arrival; taken when it is counted.
    counted: Option<(&'static str, Instant)>,
    arrived: Instant,
    /// A Bridge call's deadline.
    expiry: Option<Instant>,
    /// `server.max_message_bytes`: tonic refuses a message over it from its prefix.
    max: usize,
}

impl OneMessage {
    /// `refusal`, counted once (class `invalid_request`).
    fn refuse(&mut self, refusal: Refusal) -> Status {
        self.count_refused();
        let ctx = ErrorContext {
            backend: Role::Legacy.as_str(),
            attempts: 0,
            instance: &self.edge.instance_id,
        };
        status::refusal_status(&refusal, ctx)
    }

    /// Counts a counted call refused as the caller's (class `invalid_request`).
    fn count_refused(&mut self) {
        if let Some((label, arrived)) = self.counted.take() {
            CallRecord::new(label.into(), arrived, None)
                .finish(Role::Legacy, Some(ErrorClass::InvalidRequest));
        }
    }

    /// Counts a counted call whose client went away before its message was whole:
    /// `cancelled`, or `deadline_exceeded` when its deadline was near
    /// ([`CallRecord::unfinished_class`]).
    fn count_abandoned(&mut self) {
        if let Some((label, arrived)) = self.counted.take() {
            drop(CallRecord::new(label.into(), arrived, self.expiry));
        }
    }

    /// The refusal of a body that ended before its one message was whole.
    fn ended_early(&self) -> Option<Refusal> {
        if self.count.one_whole() {
            return None;
        }
        Some(if self.count.begun() == 0 {
            Refusal::NoMessage
        } else {
            Refusal::Malformed(
                "the body ended inside its message (cut short: the length prefix \
                 announced more bytes than came)"
                    .into(),
            )
        })
    }

    /// DEADLINE_EXCEEDED, counted once, when the deadline has passed.
    fn expired(&mut self) -> Option<Status> {
        let due = self.expiry?;
        if Instant::now() < due {
            return None;
        }
        self.expiry = None;
        match self.counted.take() {
            Some((label, arrived)) => {
                let record = CallRecord::new(label.into(), arrived, Some(due));
                Some(self.edge.expired(&record))
            }
            // GetSession, CloseSession, ListCommands: answered, not counted.
            None => Some(
                self.edge
                    .deadline_exceeded(due - self.arrived, Role::Legacy),
            ),
        }
    }
}

impl HttpBody for OneMessage {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let frame = match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(frame) => frame,
            Poll::Pending => {
                return match self.expired() {
                    Some(status) => Poll::Ready(Some(Err(status))),
                    None => Poll::Pending,
                }
            }
        };
        match &frame {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    if self.count.push(data) > 1 {
                        let refusal = Refusal::SecondMessage {
                            method: self.method.to_string(),
                        };
                        return Poll::Ready(Some(Err(self.refuse(refusal))));
                    }
                    // tonic refuses it from its prefix (RESOURCE_EXHAUSTED, in
                    // `message_limit_layer`) and never runs the method.
                    if self.count.largest() as usize > self.max {
                        self.count_refused();
                    }
                }
            }
            // The stream was reset or the connection lost: the client is gone.
            Some(Err(_)) => self.count_abandoned(),
            None => {
                if let Some(refusal) = self.ended_early() {
                    return Poll::Ready(Some(Err(self.refuse(refusal))));
                }
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        // A body that ends early is polled once more, for its refusal.
        self.inner.is_end_stream() && self.count.one_whole()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A body dropped with its message begun but not whole, and nothing counted yet: the
/// client reset the stream or the connection went (hyper then drops the call at once,
/// without polling the body again). A body dropped before its first byte is left
/// alone: the gates in front of the method (access, `grpc-timeout`, an encoding tonic
/// does not take) drop it unread when they refuse the call, and count their refusals.
impl Drop for OneMessage {
    fn drop(&mut self) {
        if self.count.begun() > 0 && !self.count.one_whole() {
            self.count_abandoned();
        }
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
}
