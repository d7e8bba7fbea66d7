//! The transparent edge (issue 17): pitboss serves, next to `pitboss.v1.Bridge`, the
//! methods of the user's own gRPC services (`transparent.services`), so a client
//! built against the user's proto calls pitboss unchanged. See `docs/MIGRATING.md`.
//!
//! A unary or server-streaming call is read into one request message (its bytes,
//! never decoded) and becomes a [`Call`] for the [`Split`](crate::rollout::split::Split)
//! like any Bridge call: routing by the sticky key of `transparent.routing_metadata`,
//! the commands allowlist (by method, or by service as `/package.Service/*`), shadow,
//! fallback, retry, the rollout statistics and the call record are the same code. A
//! `grpc_proxy` backend forwards it; a pool runs the method's command on the bytes.
//!
//! Its answer goes back as gRPC framing: the response message's bytes with the
//! service's own headers and trailers, or the service's own status, unchanged
//! ([`status::transparent_failure`]). Client-streaming and bidi calls are relayed
//! whole to a `grpc_proxy` legacy (no split) or refused with UNIMPLEMENTED.

pub mod catalog;
pub mod inflate;

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use http::header::{HeaderMap, HeaderValue, CONTENT_TYPE};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::body::Body;

pub use catalog::{Catalog, CatalogError, Descriptors, Kind, Method};

use super::record::CallRecord;
use super::status::{self, ErrorContext, Refusal, TransparentFailure};
use super::{deadline, Edge};
use crate::backend::Role;
use crate::pool::PoolRequest;
use crate::resilience::{ErrorClass, Failed, Served};
use crate::rollout::split::{Call, SplitStream};
use crate::wire::{self, frame, WireCall};

/// Why the transparent services cannot be served as configured.
#[derive(Debug, thiserror::Error)]
pub enum TransparentError {
    #[error("transparent.descriptor_set: cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("transparent.descriptor_set: {path} is not a FileDescriptorSet (make it with protoc --include_imports --descriptor_set_out={path} ...): {source}")]
    Decode {
        path: String,
        source: prost::DecodeError,
    },
    #[error(transparent)]
    Catalog(#[from] CatalogError),
}

/// How long pitboss waits at start for legacy's reflection to answer.
pub const REFLECTION_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// The catalog of `[transparent]`, with the services' descriptors: from
/// `transparent.descriptor_set`, or asked of legacy's reflection service (for up to
/// [`REFLECTION_WAIT`]; without an answer pitboss serves the services without
/// descriptors, and says so). `None` when no service is listed.
pub async fn load_catalog(
    config: &crate::config::Config,
    legacy: &crate::backend::Backend,
) -> Result<Option<Arc<Catalog>>, TransparentError> {
    let section = &config.transparent;
    if section.services.is_empty() {
        return Ok(None);
    }
    let descriptors = if let Some(path) = config.descriptor_set_path() {
        let shown = path.display().to_string();
        let bytes = std::fs::read(&path).map_err(|source| TransparentError::Read {
            path: shown.clone(),
            source,
        })?;
        let set = <prost_types::FileDescriptorSet as prost::Message>::decode(&bytes[..]).map_err(
            |source| TransparentError::Decode {
                path: shown.clone(),
                source,
            },
        )?;
        Some(Descriptors { set, source: shown })
    } else if section.descriptors_from_reflection {
        from_reflection(legacy, &section.services).await
    } else {
        None
    };
    if descriptors.is_none() {
        tracing::info!(
            services = ?section.services,
            "serving the transparent services without their descriptors: methods are unary unless transparent.server_streaming or client_streaming say otherwise, shadow comparisons are bytewise, and reflection does not list them"
        );
    }
    Ok(Some(Arc::new(Catalog::new(section, descriptors)?)))
}

/// The descriptors from legacy's reflection, tried until [`REFLECTION_WAIT`] has
/// passed (legacy may be starting too).
async fn from_reflection(
    legacy: &crate::backend::Backend,
    services: &[String],
) -> Option<Descriptors> {
    let until = tokio::time::Instant::now() + REFLECTION_WAIT;
    loop {
        let error = match legacy.descriptors(services).await? {
            Ok(set) => {
                tracing::info!(
                    files = set.file.len(),
                    "read the transparent services' descriptors from legacy's reflection"
                );
                return Some(Descriptors {
                    set,
                    source: format!("the reflection of {}", legacy.describe),
                });
            }
            Err(e) => e,
        };
        if tokio::time::Instant::now() >= until {
            tracing::warn!("cannot read the transparent services' descriptors from legacy's reflection ({}): {error}", legacy.describe);
            return None;
        }
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
}

/// The `command` label of a transparent call: its method when the catalog or a
/// backend knows it (the label set stays bounded), else "other".
pub(crate) fn command_label(edge: &Edge, method: &Method) -> String {
    if method.known {
        return method.path.to_string();
    }
    edge.command_label(&method.path)
}

/// Serves the methods of the transparent services, on the Bridge listener.
#[derive(Clone)]
pub struct TransparentService {
    edge: Arc<Edge>,
    catalog: Arc<Catalog>,
    /// `server.max_message_bytes`: the largest request message taken.
    max_message_bytes: usize,
}

/// One frame of a response body.
type BodyFrame = Result<Frame<Bytes>, Infallible>;

impl TransparentService {
    pub fn new(edge: Arc<Edge>, catalog: Arc<Catalog>, max_message_bytes: usize) -> Self {
        TransparentService {
            edge,
            catalog,
            max_message_bytes,
        }
    }

    /// Mounts this service at each transparent service's path in `routes` (the
    /// listener's other services keep theirs; any other path stays UNIMPLEMENTED).
    pub fn mount(self, routes: tonic::service::Routes) -> tonic::service::Routes {
        let mut router = routes.into_axum_router();
        for service in self.catalog.services() {
            router = router.route_service(&format!("/{service}/{{*method}}"), self.clone());
        }
        tonic::service::Routes::from(router)
    }

    fn ctx(&self, role: Role, attempts: u32) -> ErrorContext<'_> {
        ErrorContext {
            backend: role.as_str(),
            attempts,
            instance: &self.edge.instance_id,
        }
    }

    fn label(&self, method: &Method) -> String {
        command_label(&self.edge, method)
    }

    async fn serve(self, req: http::Request<Body>) -> http::Response<Body> {
        let path = req.uri().path().to_string();
        let Some(method) = self.catalog.method(&path) else {
            // Mounted by service, so only a path like "/package.Service/" gets here.
            return tonic::Status::unimplemented("").into_http();
        };
        let arrived = deadline::arrival(req.extensions());
        let due = req
            .headers()
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(deadline::parse_grpc_timeout)
            .map(|d| arrived + d);
        let record = Arc::new(CallRecord::new(self.label(&method), arrived, due));
        let ids = super::call_ids(req.headers());
        let span = super::call_span(&ids, &path);
        if let Err(status) = self.edge.refuse_if_draining(&record) {
            return status.into_http();
        }
        if method.kind.streams_requests() {
            return self.relay(req, &method, &record).await;
        }
        let answer = async {
            let (parts, body) = req.into_parts();
            let compressed = match parts
                .headers
                .get("grpc-encoding")
                .map(|v| v.to_str().unwrap_or_default())
                .filter(|e| *e != "identity")
            {
                None => None,
                Some(name) => match inflate::encoding(name) {
                    Some(encoding) => Some(encoding),
                    None => {
                        let refusal = Refusal::Compressed {
                            encoding: name.to_string(),
                        };
                        return self.refuse(&record, &refusal);
                    }
                },
            };
            let read = match compressed {
                None => read_message(body, self.max_message_bytes, &path).await,
                Some(encoding) => {
                    inflate::read_compressed(body, encoding, self.max_message_bytes, &path).await
                }
            };
            let message = match read {
                Ok(m) => m,
                Err(refusal) => return self.refuse(&record, &refusal),
            };
            let call = Call {
                request: PoolRequest {
                    command: method.command.clone(),
                    payload: message,
                    content_type: wire::GRPC_CONTENT_TYPE.into(),
                    session_id: None,
                    deadline: record.deadline(),
                    avoid_worker: None,
                    wire: Some(Arc::new(WireCall {
                        method: method.path.clone(),
                        metadata: with_request_id(wire::forwarded_request(&parts.headers), &ids),
                        output: method.output.clone(),
                    })),
                    context: super::first_try(&ids),
                },
                routing_key: self.catalog.routing_key(&parts.headers),
                idempotent: method.idempotent,
            };
            match method.kind {
                Kind::ServerStreaming => self.stream(call, record.clone()).await,
                _ => self.unary(call, &record).await,
            }
        };
        use tracing::Instrument;
        deadline::answer_by(record.deadline(), answer.instrument(span), || {
            self.edge.expired(&record).into_http()
        })
        .await
    }

    async fn unary(&self, call: Call, record: &CallRecord) -> http::Response<Body> {
        let answer = self.edge.split.execute(call, record).await;
        super::trace_answer(&answer);
        let role = answer.role;
        match answer.result {
            Ok(served) => {
                record.finish(role, None);
                self.reply(role, served)
            }
            Err(failed) => self.failure(record, &failed, role),
        }
    }

    /// A unary answer: the message with the service's headers and trailers (for a
    /// `grpc_proxy`), and which backend answered.
    fn reply(&self, role: Role, served: Served) -> http::Response<Body> {
        let (headers, trailers) = match &served.wire {
            Some(w) => (w.headers.clone(), Some(&w.trailers)),
            None => (HeaderMap::new(), None),
        };
        let frames: Vec<BodyFrame> = vec![
            Ok(Frame::data(frame::encode(&served.response.payload))),
            Ok(Frame::trailers(ok_trailers(trailers))),
        ];
        let body = StreamBody::new(futures_util::stream::iter(frames));
        respond(headers, role, Body::new(body))
    }

    /// The answer to a failed call, recorded once: the service's own status as it
    /// sent it, else pitboss's.
    fn failure(&self, record: &CallRecord, failed: &Failed, role: Role) -> http::Response<Body> {
        record.finish(role, Some(failed.class));
        let ctx = self.ctx(role, failed.attempts);
        match status::transparent_failure(
            &failed.error,
            failed.class,
            self.edge.include_tracebacks,
            ctx,
        ) {
            TransparentFailure::Made(status) => status.into_http(),
            TransparentFailure::Passed(ws) => match &ws.headers {
                // Trailers-only, as the service sent it.
                None => {
                    let mut resp = http::Response::new(Body::empty());
                    *resp.headers_mut() = with_content_type(ws.trailers.clone());
                    resp
                }
                Some(headers) => {
                    let frames: Vec<BodyFrame> = vec![Ok(Frame::trailers(ws.trailers.clone()))];
                    let mut resp = http::Response::new(Body::new(StreamBody::new(
                        futures_util::stream::iter(frames),
                    )));
                    *resp.headers_mut() = with_content_type(headers.clone());
                    resp
                }
            },
        }
    }

    /// Refuses a call before any backend; recorded as `invalid_request`.
    fn refuse(&self, record: &CallRecord, refusal: &Refusal) -> http::Response<Body> {
        record.finish(Role::Legacy, Some(ErrorClass::InvalidRequest));
        tracing::debug!(?refusal, "transparent call refused");
        status::refusal_status(refusal, self.ctx(Role::Legacy, 0)).into_http()
    }

    /// A server-streaming call: opened where the split says, then each message sent
    /// as it comes, and the service's trailers (or the failure) at the end.
    async fn stream(&self, call: Call, record: Arc<CallRecord>) -> http::Response<Body> {
        let stream = match self.edge.split.open_stream(call, &*record).await {
            Ok(s) => s,
            Err((role, failed)) => return self.failure(&record, &failed, role),
        };
        let role = stream.role();
        let headers = stream.headers().unwrap_or_default();
        let (tx, rx) = mpsc::channel::<BodyFrame>(16);
        tokio::spawn(self.clone().forward(stream, record, tx));
        respond(
            headers,
            role,
            Body::new(StreamBody::new(ReceiverStream::new(rx))),
        )
    }

    /// Sends a stream's messages to the client until it ends, fails, or the client
    /// goes away (dropping the stream then cancels the call, counted as cancelled).
    async fn forward(
        self,
        mut stream: SplitStream,
        record: Arc<CallRecord>,
        tx: mpsc::Sender<BodyFrame>,
    ) {
        let role = stream.role();
        loop {
            let next = tokio::select! {
                next = stream.next() => next,
                () = tx.closed() => return,
            };
            match next {
                Some(Ok((payload, _))) => {
                    if tx
                        .send(Ok(Frame::data(frame::encode(&payload))))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                Some(Err(failed)) => {
                    record.finish(role, Some(failed.class));
                    let ctx = self.ctx(role, failed.attempts);
                    let trailers = match status::transparent_failure(
                        &failed.error,
                        failed.class,
                        self.edge.include_tracebacks,
                        ctx,
                    ) {
                        TransparentFailure::Passed(ws) => ws.trailers.clone(),
                        TransparentFailure::Made(status) => {
                            let mut h = status.into_http::<Body>().into_parts().0.headers;
                            h.remove(CONTENT_TYPE);
                            h
                        }
                    };
                    let _ = tx.send(Ok(Frame::trailers(trailers))).await;
                    return;
                }
                None => {
                    record.finish(role, None);
                    let trailers = stream.trailers();
                    let _ = tx
                        .send(Ok(Frame::trailers(ok_trailers(trailers.as_ref()))))
                        .await;
                    return;
                }
            }
        }
    }

    /// A client-streaming or bidi call: relayed whole to a `grpc_proxy` legacy, which
    /// answers it as it would directly (no split, shadow, retry or fallback: its
    /// requests cannot be held to run again). Counted when its answer starts.
    async fn relay(
        &self,
        req: http::Request<Body>,
        method: &Method,
        record: &CallRecord,
    ) -> http::Response<Body> {
        let legacy = self.edge.split.legacy();
        record.answering(Role::Legacy);
        match legacy.relay(req).await {
            None => {
                let kind = match method.kind {
                    Kind::Bidi => "bidi",
                    _ => "client-streaming",
                };
                let refusal = Refusal::NotRelayed {
                    method: method.path.to_string(),
                    kind,
                };
                self.refuse(record, &refusal)
            }
            Some(Ok(resp)) => {
                let failure = wire::status_in(resp.headers())
                    .filter(|(code, _)| *code != tonic::Code::Ok)
                    .map(|(code, _)| crate::backend::proxy::class_of_code(code));
                record.finish(Role::Legacy, failure);
                resp
            }
            Some(Err(failed)) => self.failure(record, &failed, Role::Legacy),
        }
    }
}

/// The response head of an answer: the service's headers (for a `grpc_proxy`), the
/// gRPC content type, and which backend answered.
fn respond(headers: HeaderMap, role: Role, body: Body) -> http::Response<Body> {
    let mut resp = http::Response::new(body);
    let mut headers = with_content_type(headers);
    headers.insert("x-pitboss-backend", HeaderValue::from_static(role.as_str()));
    *resp.headers_mut() = headers;
    resp
}

fn with_content_type(mut headers: HeaderMap) -> HeaderMap {
    if !headers.contains_key(CONTENT_TYPE) {
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static(wire::GRPC_CONTENT_TYPE),
        );
    }
    headers
}

/// The trailers of an answer that ended well: the service's (a `grpc_proxy`), which
/// carry its `grpc-status: 0`, else just that.
fn ok_trailers(upstream: Option<&HeaderMap>) -> HeaderMap {
    let mut trailers = upstream.cloned().unwrap_or_default();
    if !trailers.contains_key("grpc-status") {
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
    }
    trailers
}

/// The one request message of a unary or server-streaming call. A message over the
/// limit is refused as soon as its length is known, before any backend sees it.
async fn read_message(mut body: Body, max: usize, method: &str) -> Result<Bytes, Refusal> {
    let mut decoder = frame::Decoder::new(max);
    let mut message = None;
    loop {
        match decoder.next_message() {
            Ok(Some(m)) => {
                if message.is_some() {
                    return Err(Refusal::Streaming {
                        method: method.to_string(),
                    });
                }
                message = Some(m);
                continue;
            }
            Ok(None) => {}
            Err(frame::FrameError::TooLarge { len, max }) => {
                return Err(Refusal::TooLarge { len, max })
            }
            Err(e) => return Err(Refusal::Malformed(e.to_string())),
        }
        match body.frame().await {
            None => break,
            Some(Err(status)) => {
                return Err(Refusal::Malformed(format!(
                    "the request broke off: {}",
                    status.message()
                )))
            }
            Some(Ok(f)) => {
                if let Ok(data) = f.into_data() {
                    decoder.push(&data);
                }
            }
        }
    }
    decoder
        .finish()
        .map_err(|e| Refusal::Malformed(e.to_string()))?;
    message.ok_or(Refusal::NoMessage)
}

/// The forwarded metadata with the call's `x-request-id`: the client's is already
/// there; one pitboss made is added, so the service logs the call under the id the
/// adapter (on new) and pitboss's own logs use.
fn with_request_id(mut md: HeaderMap, ids: &crate::worker::CallIds) -> HeaderMap {
    if !md.contains_key("x-request-id") {
        if let Ok(mut v) = http::HeaderValue::from_str(&ids.request_id) {
            v.set_sensitive(true);
            md.insert("x-request-id", v);
        }
    }
    md
}

impl tower::Service<http::Request<axum::body::Body>> for TransparentService {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<http::Response<Body>, Infallible>>;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Infallible>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<axum::body::Body>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move { Ok(this.serve(req.map(Body::new)).await) })
    }
}
