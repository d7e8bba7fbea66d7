//! A `grpc_proxy` backend: the gRPC service a migration starts from (any language,
//! any proto), reached by forwarding transparent calls to it as they came.
//!
//! A call's request message goes on as raw bytes (never decoded), with the client's
//! metadata less the hop-by-hop headers ([`crate::wire::forwarded_request`]) and the
//! deadline left as `grpc-timeout`. What the service answers comes back as it sent
//! it: the response message's bytes with its headers and trailers
//! ([`WireReply`]), or its status ([`UpstreamStatus`]: code, message, details and
//! trailers), which the edge passes to the client unchanged. Each status gets a class
//! ([`class_of_code`]) so retry, the breaker and the rollout statistics treat this
//! backend like any other.
//!
//! Client-streaming and bidi methods cannot be split, shadowed or retried (the
//! request is not one message); [`Target::relay`] forwards such a call whole.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use http::header::{HeaderMap, HeaderValue};
use http_body_util::BodyExt;
use prost::Message;
use tokio::time::Instant;
use tonic::body::Body;
use tonic::transport::{Channel, Endpoint};
use tower::ServiceExt;

use super::direct::{self, Direct};
use super::{BadAddress, Chunks, Role, Target};
use crate::pool::{PoolRequest, PoolResponse};
use crate::proto as pb;
use crate::resilience::{
    Attempt, CallError, ErrorClass, OneTry, RemoteFailure, Reply, TryService, UpstreamStatus,
};
use crate::wire::{self, frame, WireCall, WireReply, WireStatus};
use crate::worker::WorkerId;

/// A lazily connected HTTP/2 channel to the service: pitboss starts while it is down,
/// and its calls then fail as `worker_crashed` (nothing ran) until it is back.
#[derive(Clone)]
pub struct Proxy {
    pub address: Arc<str>,
    /// For the relayed calls (client-streaming, bidi) and reflection. Behind an Arc:
    /// a `Channel` clone is a `Buffer` sender (an allocation), and a `Proxy` is cloned
    /// twice per call it splits, which never use the channel.
    channel: Arc<Channel>,
    /// For the calls pitboss splits: no task between the caller and the connection.
    direct: Direct,
    /// The largest response message taken from the service (`server.max_message_bytes`).
    max_message_bytes: usize,
}

/// The class of a status the service answered: what it means for retry, the breaker
/// and the rollout. The service's own answers to a request (`INVALID_ARGUMENT`,
/// `NOT_FOUND`, `PERMISSION_DENIED`...) are `invalid_request`: never retried, never
/// held against it; its failures (`UNKNOWN`, `INTERNAL`, `DATA_LOSS`, what an uncaught
/// exception gives) are `python_exception`, its code's failure. Pure.
pub fn class_of_code(code: tonic::Code) -> ErrorClass {
    use tonic::Code as K;
    match code {
        K::Unavailable => ErrorClass::WorkerCrashed,
        K::DeadlineExceeded => ErrorClass::DeadlineExceeded,
        K::ResourceExhausted => ErrorClass::PoolExhausted,
        K::Cancelled => ErrorClass::Cancelled,
        K::Unimplemented => ErrorClass::UnknownCommand,
        K::Unknown | K::Internal | K::DataLoss => ErrorClass::PythonException,
        _ => ErrorClass::InvalidRequest,
    }
}

/// How long a connection to the service may take to open.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

impl Proxy {
    pub fn new(address: &str, max_message_bytes: usize) -> Result<Proxy, BadAddress> {
        let endpoint = Endpoint::from_shared(address.to_string()).map_err(|source| BadAddress {
            address: address.to_string(),
            source,
        })?;
        // The config check refuses an address without a host; here one would fail
        // each call as a connection error naming the address.
        let uri = endpoint.uri().clone();
        let authority = uri
            .authority()
            .cloned()
            .unwrap_or_else(|| http::uri::Authority::from_static("localhost"));
        let host = crate::tls::client::connect_host(&uri)
            .unwrap_or_default()
            .to_string();
        let direct = Direct::new(
            http::uri::Scheme::HTTP,
            authority,
            Direct::tcp(host, uri.port_u16().unwrap_or(80)),
            CONNECT_TIMEOUT,
        );
        Ok(Proxy::over(
            address,
            Proxy::configure(endpoint).connect_lazy(),
            direct,
            max_message_bytes,
        ))
    }

    /// An `https://` service: the same TLS client as a `grpc` upstream's
    /// ([`crate::tls::UpstreamTls`]: CA, client certificate, SNI and `:authority`,
    /// its files reloaded every `reload_interval` and on change).
    pub fn new_tls(
        address: &str,
        max_message_bytes: usize,
        tls: &crate::tls::UpstreamTls,
        reload_interval: Duration,
    ) -> Result<Proxy, crate::tls::TlsError> {
        let (endpoint, connector) = tls.parts(address, reload_interval)?;
        let authority = tls.authority.parse::<http::uri::Authority>().map_err(|e| {
            crate::tls::TlsError::Setup {
                key: tls.label.clone(),
                what: format!("bad authority {:?}: {e}", tls.authority),
            }
        })?;
        let plain = endpoint.uri().clone();
        let opener = connector.clone();
        let connect: direct::Connect = Arc::new(move || {
            let open = opener.open(plain.clone());
            Box::pin(async move { Ok(Box::new(open.await?) as Box<dyn direct::Io>) })
        });
        let direct = Direct::new(
            http::uri::Scheme::HTTPS,
            authority,
            connect,
            CONNECT_TIMEOUT,
        );
        let channel = Proxy::configure(endpoint).connect_with_connector_lazy(connector);
        Ok(Proxy::over(address, channel, direct, max_message_bytes))
    }

    /// The endpoint options of the channel to the service.
    fn configure(endpoint: Endpoint) -> Endpoint {
        endpoint
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
    }

    fn over(address: &str, channel: Channel, direct: Direct, max_message_bytes: usize) -> Proxy {
        Proxy {
            address: address.into(),
            channel: Arc::new(channel),
            direct,
            max_message_bytes,
        }
    }

    /// A failure of this hop (no status from the service), of class `class`.
    fn failure(&self, class: ErrorClass, message: String) -> CallError {
        CallError::Remote(RemoteFailure {
            address: self.address.to_string(),
            class,
            message,
        })
    }

    /// What a Bridge call (a command, a session) gets here: a `grpc_proxy` serves only
    /// the methods of `transparent.services`.
    fn not_transparent(&self, what: &str, class: ErrorClass) -> CallError {
        self.failure(
            class,
            format!(
                "{what}: a grpc_proxy backend serves only transparent calls (the methods of transparent.services), not pitboss.v1.Bridge; serve Bridge commands from a pool or grpc backend"
            ),
        )
    }

    /// The request that forwards `wire`'s call with `message`, due by `deadline`.
    fn request(&self, wire: &WireCall, message: &[u8], deadline: Instant) -> http::Request<Body> {
        let mut req =
            http::Request::new(Body::new(http_body_util::Full::new(frame::encode(message))));
        *req.method_mut() = http::Method::POST;
        *req.uri_mut() =
            http::Uri::from_maybe_shared(Bytes::copy_from_slice(wire.method.as_bytes()))
                .unwrap_or_else(|_| http::Uri::from_static("/"));
        let headers = req.headers_mut();
        *headers = wire.metadata.clone();
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static(wire::GRPC_CONTENT_TYPE),
        );
        headers.insert(http::header::TE, HeaderValue::from_static("trailers"));
        if let Ok(v) = HeaderValue::try_from(grpc_timeout(
            deadline.saturating_duration_since(Instant::now()),
        )) {
            headers.insert("grpc-timeout", v);
        }
        req
    }

    /// Sends a request; a failure to reach the service is `worker_crashed`.
    async fn send(&self, req: http::Request<Body>) -> Result<http::Response<Body>, CallError> {
        let started = Instant::now();
        Channel::clone(&self.channel)
            .oneshot(req)
            .await
            .map_err(|e| {
                // The channel enforces the grpc-timeout it sends: the call's deadline
                // passed, which is no fault of the service.
                if timed_out(&e) {
                    return CallError::DeadlineExceeded {
                        after: started.elapsed(),
                    };
                }
                self.failure(
                    ErrorClass::WorkerCrashed,
                    format!("Unavailable: {}", with_sources(&e)),
                )
            })
    }

    /// Forwards a call and reads the answer's head: a trailers-only failure (or an
    /// HTTP answer that is not gRPC's) is the service's status already.
    async fn open(
        &self,
        wire: &WireCall,
        message: &[u8],
        deadline: Instant,
    ) -> Result<Answer, CallError> {
        let resp = self
            .direct
            .send(self.request(wire, message, deadline))
            .await
            .map_err(|e| {
                self.failure(
                    ErrorClass::WorkerCrashed,
                    format!("Unavailable: {}", with_sources(&e)),
                )
            })?;
        let (parts, body) = resp.into_parts();
        if let Some((code, message)) = wire::status_in(&parts.headers) {
            // Trailers-only: the status is in the headers, the body is empty.
            let trailers = wire::forwarded_response(&parts.headers);
            if code != tonic::Code::Ok {
                return Err(self.status(code, message, None, trailers));
            }
            return Ok(Answer::ended(self.clone(), trailers));
        }
        if parts.status != http::StatusCode::OK {
            let code = wire::code_of_http_status(parts.status);
            let message = format!("the upstream answered HTTP {}, not gRPC", parts.status);
            let mut trailers = HeaderMap::new();
            trailers.insert("grpc-status", HeaderValue::from(code as i32));
            if let Ok(v) = HeaderValue::try_from(wire::percent_encode(&message)) {
                trailers.insert("grpc-message", v);
            }
            return Err(self.status(code, message, None, trailers));
        }
        Ok(Answer {
            proxy: self.clone(),
            headers: wire::forwarded_response(&parts.headers),
            body: Some(body),
            decoder: frame::Decoder::new(self.max_message_bytes),
            trailers: None,
        })
    }

    fn status(
        &self,
        code: tonic::Code,
        message: String,
        headers: Option<HeaderMap>,
        trailers: HeaderMap,
    ) -> CallError {
        CallError::Upstream(UpstreamStatus {
            address: self.address.to_string(),
            class: class_of_code(code),
            status: Box::new(WireStatus {
                code,
                message,
                headers,
                trailers,
            }),
        })
    }

    /// The descriptors of `services`, from the service's reflection (`v1`, else
    /// `v1alpha`), with every file they import, in dependency order.
    pub async fn fetch_descriptors(
        &self,
        services: &[String],
    ) -> Result<prost_types::FileDescriptorSet, ReflectionError> {
        let files = match reflect_v1(Channel::clone(&self.channel), services).await {
            Err(ReflectionError::Status {
                code: tonic::Code::Unimplemented,
                ..
            }) => reflect_v1alpha(Channel::clone(&self.channel), services).await?,
            other => other?,
        };
        Ok(prost_types::FileDescriptorSet {
            file: in_dependency_order(files),
        })
    }
}

/// An error and its sources, as one line.
fn with_sources(e: &(dyn std::error::Error + 'static)) -> String {
    let mut msg = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        msg.push_str(&format!(": {s}"));
        source = s.source();
    }
    msg
}

/// `grpc-timeout` for what is left: the gRPC spec allows at most 8 digits.
fn grpc_timeout(left: Duration) -> String {
    let micros = left.as_micros();
    if micros < 100_000_000 {
        format!("{}u", micros.max(1))
    } else if left.as_millis() < 100_000_000 {
        format!("{}m", left.as_millis())
    } else {
        format!("{}S", left.as_secs().min(99_999_999))
    }
}

/// An answer of the service being read: its headers, then its messages, then its
/// trailers.
struct Answer {
    proxy: Proxy,
    headers: HeaderMap,
    /// `None` once the body has ended.
    body: Option<Body>,
    decoder: frame::Decoder,
    /// The trailers (as the client gets them), once they came with OK.
    trailers: Option<HeaderMap>,
}

impl Answer {
    /// A trailers-only OK: no messages.
    fn ended(proxy: Proxy, trailers: HeaderMap) -> Answer {
        let max = proxy.max_message_bytes;
        Answer {
            proxy,
            headers: HeaderMap::new(),
            body: None,
            decoder: frame::Decoder::new(max),
            trailers: Some(trailers),
        }
    }

    /// The next response message; `None` after the last one, when the service said
    /// OK. Its other statuses are [`CallError::Upstream`].
    async fn message(&mut self) -> Result<Option<Bytes>, CallError> {
        loop {
            match self.decoder.next_message() {
                Ok(Some(m)) => return Ok(Some(m)),
                Ok(None) => {}
                Err(frame::FrameError::TooLarge { len, max }) => {
                    return Err(CallError::ResponseTooLarge(format!(
                        "the upstream's message of {len} bytes is over server.max_message_bytes ({max} bytes)"
                    )))
                }
                Err(e) => return Err(self.proxy.failure(ErrorClass::ProtocolError, e.to_string())),
            }
            let Some(body) = self.body.as_mut() else {
                if let Err(e) = self.decoder.finish() {
                    return Err(self.proxy.failure(ErrorClass::ProtocolError, e.to_string()));
                }
                return match &self.trailers {
                    Some(_) => Ok(None),
                    None => Err(self.proxy.failure(
                        ErrorClass::ProtocolError,
                        "the upstream's answer ended without a status".into(),
                    )),
                };
            };
            match body.frame().await {
                None => self.body = None,
                Some(Err(status)) => {
                    self.body = None;
                    return Err(self.proxy.failure(
                        ErrorClass::WorkerCrashed,
                        format!(
                            "the answer broke off: {:?}: {}",
                            status.code(),
                            status.message()
                        ),
                    ));
                }
                Some(Ok(f)) => match f.into_data() {
                    Ok(data) => self.decoder.push(&data),
                    Err(f) => {
                        if let Ok(trailers) = f.into_trailers() {
                            self.body = None;
                            let (code, message) = wire::status_in(&trailers).unwrap_or((
                                tonic::Code::Unknown,
                                "the upstream's trailers carry no grpc-status".into(),
                            ));
                            let trailers = wire::forwarded_response(&trailers);
                            if code != tonic::Code::Ok {
                                let headers = std::mem::take(&mut self.headers);
                                return Err(self.proxy.status(
                                    code,
                                    message,
                                    Some(headers),
                                    trailers,
                                ));
                            }
                            self.trailers = Some(trailers);
                        }
                    }
                },
            }
        }
    }
}

/// Whether a channel's error is its timeout (the `grpc-timeout` of the request).
fn timed_out(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(e);
    while let Some(s) = source {
        if s.is::<tonic::TimeoutExpired>() {
            return true;
        }
        source = s.source();
    }
    false
}

// === impl OneTry for Proxy ===

/// The proxy as a tower service of attempts: the shared adapter applies the per-try
/// deadline and classifies the failed tries.
pub type ProxyService = TryService<Proxy>;

impl TryService<Proxy> {
    pub fn new(proxy: Proxy, per_try_timeout: Option<Duration>) -> Self {
        TryService::with_target(proxy, per_try_timeout)
    }
}

impl OneTry for Proxy {
    /// One forward of a unary call, due by the try's deadline (sent as
    /// `grpc-timeout`, and cut short there if the service overruns it).
    fn run(
        &self,
        attempt: Attempt,
        try_deadline: Instant,
    ) -> BoxFuture<'static, Result<Reply, CallError>> {
        let proxy = self.clone();
        Box::pin(async move {
            let r = attempt.request;
            let Some(wire) = r.wire else {
                return Err(proxy.not_transparent(
                    &format!("command {:?}", r.command),
                    ErrorClass::UnknownCommand,
                ));
            };
            let started = Instant::now();
            let call = async {
                let mut answer = proxy.open(&wire, &r.payload, try_deadline).await?;
                let Some(message) = answer.message().await? else {
                    return Err(proxy.failure(
                        ErrorClass::ProtocolError,
                        "the upstream answered a unary call without a message".into(),
                    ));
                };
                if answer.message().await?.is_some() {
                    return Err(proxy.failure(
                        ErrorClass::ProtocolError,
                        "the upstream answered a unary call with more than one message".into(),
                    ));
                }
                Ok(Reply {
                    response: PoolResponse {
                        payload: message,
                        content_type: wire::GRPC_CONTENT_TYPE.into(),
                        worker: WorkerId(0),
                    },
                    remote_worker: Some(proxy.address.to_string()),
                    wire: Some(Arc::new(WireReply {
                        headers: answer.headers,
                        trailers: answer.trailers.unwrap_or_default(),
                    })),
                })
            };
            match tokio::time::timeout_at(try_deadline, call).await {
                Ok(r) => r,
                Err(_) => Err(CallError::DeadlineExceeded {
                    after: started.elapsed(),
                }),
            }
        })
    }

    /// The class each failure was given where it was read ([`class_of_code`]).
    fn classify(&self, error: &CallError) -> ErrorClass {
        error.class(&Default::default())
    }
}

// === impl Target for Proxy ===

#[tonic::async_trait]
impl Target for Proxy {
    /// Always: its failures are handled per call, by the breaker.
    fn ready(&self) -> bool {
        true
    }

    /// It has no commands; the edge knows the transparent methods.
    fn serves(&self, _command: &str) -> bool {
        false
    }

    fn lacks_session(&self, _id: &str) -> bool {
        false
    }

    async fn open_stream(
        &self,
        req: PoolRequest,
        deadline: Instant,
    ) -> Result<Box<dyn Chunks>, CallError> {
        let Some(wire) = req.wire else {
            return Err(self.not_transparent(
                &format!("command {:?}", req.command),
                ErrorClass::UnknownCommand,
            ));
        };
        let started = Instant::now();
        let answer =
            match tokio::time::timeout_at(deadline, self.open(&wire, &req.payload, deadline)).await
            {
                Ok(answer) => answer?,
                Err(_) => {
                    return Err(CallError::DeadlineExceeded {
                        after: started.elapsed(),
                    })
                }
            };
        Ok(Box::new(ProxyChunks {
            answer,
            started,
            deadline,
        }))
    }

    async fn create_session(
        &self,
        _role: Role,
        _id: String,
        _metadata: BTreeMap<String, String>,
        _deadline: Instant,
    ) -> Result<pb::Session, CallError> {
        Err(self.not_transparent("CreateSession", ErrorClass::UnknownCommand))
    }

    async fn get_session(
        &self,
        _role: Role,
        id: &str,
        _deadline: Instant,
    ) -> Result<pb::Session, CallError> {
        Err(self.not_transparent(&format!("session {id:?}"), ErrorClass::SessionNotFound))
    }

    async fn close_session(&self, id: &str, _deadline: Instant) -> Result<(), CallError> {
        Err(self.not_transparent(&format!("session {id:?}"), ErrorClass::SessionNotFound))
    }

    async fn commands(&self) -> Vec<pb::CommandInfo> {
        vec![]
    }

    async fn relay(
        &self,
        mut req: http::Request<Body>,
    ) -> Option<Result<http::Response<Body>, CallError>> {
        let mut headers = wire::relayed_request(req.headers());
        headers.insert(http::header::TE, HeaderValue::from_static("trailers"));
        *req.headers_mut() = headers;
        if let Some(path) = req.uri().path_and_query().cloned() {
            *req.uri_mut() = http::Uri::from(path);
        }
        Some(self.send(req).await.map(|mut resp| {
            let headers = wire::relayed_response(resp.headers());
            *resp.headers_mut() = headers;
            resp
        }))
    }

    async fn descriptors(
        &self,
        services: &[String],
    ) -> Option<Result<prost_types::FileDescriptorSet, ReflectionError>> {
        Some(self.fetch_descriptors(services).await)
    }
}

/// A server-streaming answer of the service, message by message.
struct ProxyChunks {
    answer: Answer,
    started: Instant,
    deadline: Instant,
}

#[tonic::async_trait]
impl Chunks for ProxyChunks {
    fn worker(&self) -> String {
        self.answer.proxy.address.to_string()
    }

    async fn next(&mut self) -> Option<Result<(Bytes, String), CallError>> {
        match tokio::time::timeout_at(self.deadline, self.answer.message()).await {
            Ok(Ok(Some(m))) => Some(Ok((m, wire::GRPC_CONTENT_TYPE.into()))),
            Ok(Ok(None)) => None,
            Ok(Err(e)) => Some(Err(e)),
            Err(_) => Some(Err(CallError::DeadlineExceeded {
                after: self.started.elapsed(),
            })),
        }
    }

    fn headers(&self) -> Option<HeaderMap> {
        Some(self.answer.headers.clone())
    }

    fn trailers(&self) -> Option<HeaderMap> {
        self.answer.trailers.clone()
    }
}

// === descriptors from the service's reflection ===

/// Why the descriptors could not be read from the service's reflection.
#[derive(Debug, thiserror::Error)]
pub enum ReflectionError {
    #[error("the upstream's reflection service answered {code:?}: {message}")]
    Status { code: tonic::Code, message: String },
    #[error("the upstream's reflection service does not know {symbol}: {message}")]
    Unknown { symbol: String, message: String },
    #[error("the upstream's reflection service sent a descriptor that does not decode: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error("the upstream's reflection service ended the stream before answering")]
    Ended,
}

impl From<tonic::Status> for ReflectionError {
    fn from(s: tonic::Status) -> Self {
        ReflectionError::Status {
            code: s.code(),
            message: s.message().to_string(),
        }
    }
}

/// Files in an order where each comes after the files it imports (protoc's order).
fn in_dependency_order(
    files: BTreeMap<String, prost_types::FileDescriptorProto>,
) -> Vec<prost_types::FileDescriptorProto> {
    fn visit(
        name: &str,
        files: &BTreeMap<String, prost_types::FileDescriptorProto>,
        done: &mut BTreeSet<String>,
        out: &mut Vec<prost_types::FileDescriptorProto>,
    ) {
        if !done.insert(name.to_string()) {
            return;
        }
        if let Some(f) = files.get(name) {
            for dep in &f.dependency {
                visit(dep, files, done, out);
            }
            out.push(f.clone());
        }
    }
    let mut done = BTreeSet::new();
    let mut out = Vec::with_capacity(files.len());
    for name in files.keys() {
        visit(name, &files, &mut done, &mut out);
    }
    out
}

/// One reflection client per version: the same exchange over two generated APIs.
macro_rules! reflection_client {
    ($name:ident, $api:path) => {
        async fn $name(
            channel: Channel,
            services: &[String],
        ) -> Result<BTreeMap<String, prost_types::FileDescriptorProto>, ReflectionError> {
            use api::server_reflection_request::MessageRequest;
            use api::server_reflection_response::MessageResponse;
            use $api as api;
            let ask = |m: MessageRequest| api::ServerReflectionRequest {
                host: String::new(),
                message_request: Some(m),
            };
            let mut queue: std::collections::VecDeque<MessageRequest> = services
                .iter()
                .map(|s| MessageRequest::FileContainingSymbol(s.clone()))
                .collect();
            let Some(first) = queue.pop_front() else {
                return Ok(BTreeMap::new());
            };
            let (tx, rx) = tokio::sync::mpsc::channel(4);
            let mut asked = describe(&first);
            let _ = tx.send(ask(first)).await;
            let mut client = api::server_reflection_client::ServerReflectionClient::new(channel);
            let mut answers = client
                .server_reflection_info(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await?
                .into_inner();
            let mut files = BTreeMap::new();
            loop {
                let answer = answers.message().await?.ok_or(ReflectionError::Ended)?;
                match answer.message_response {
                    Some(MessageResponse::FileDescriptorResponse(r)) => {
                        for bytes in r.file_descriptor_proto {
                            let f = prost_types::FileDescriptorProto::decode(&bytes[..])?;
                            files.insert(f.name().to_string(), f);
                        }
                    }
                    Some(MessageResponse::ErrorResponse(e)) => {
                        return Err(ReflectionError::Unknown {
                            symbol: asked,
                            message: e.error_message,
                        })
                    }
                    _ => {}
                }
                // Then the next service, then any import not received yet.
                let missing = files
                    .values()
                    .flat_map(|f: &prost_types::FileDescriptorProto| f.dependency.iter())
                    .find(|d| !files.contains_key(*d))
                    .cloned();
                let next = queue
                    .pop_front()
                    .or_else(|| missing.map(MessageRequest::FileByFilename));
                match next {
                    Some(m) => {
                        asked = describe(&m);
                        if tx.send(ask(m)).await.is_err() {
                            return Err(ReflectionError::Ended);
                        }
                    }
                    None => return Ok(files),
                }
            }
            fn describe(m: &MessageRequest) -> String {
                match m {
                    MessageRequest::FileContainingSymbol(s) => format!("symbol {s}"),
                    MessageRequest::FileByFilename(f) => format!("file {f}"),
                    other => format!("{other:?}"),
                }
            }
        }
    };
}

reflection_client!(reflect_v1, tonic_reflection::pb::v1);
reflection_client!(reflect_v1alpha, tonic_reflection::pb::v1alpha);

#[cfg(test)]
mod tests {
    use super::*;

    /// The channel's own timeout (it enforces the grpc-timeout pitboss sends) is the
    /// call's deadline passing, however deep in the error's sources it sits.
    #[test]
    fn the_channels_timeout_is_the_deadline_passing() {
        #[derive(Debug, thiserror::Error)]
        #[error("transport error")]
        struct Wrapped(#[source] tonic::TimeoutExpired);
        assert!(timed_out(&tonic::TimeoutExpired(())));
        assert!(timed_out(&Wrapped(tonic::TimeoutExpired(()))));
        let refused = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        assert!(!timed_out(&refused));
    }

    #[test]
    fn the_services_statuses_are_classified_by_what_they_mean() {
        use tonic::Code as K;
        assert_eq!(class_of_code(K::Unavailable), ErrorClass::WorkerCrashed);
        assert_eq!(class_of_code(K::Unimplemented), ErrorClass::UnknownCommand);
        assert_eq!(class_of_code(K::Unknown), ErrorClass::PythonException);
        assert_eq!(class_of_code(K::Internal), ErrorClass::PythonException);
        assert_eq!(
            class_of_code(K::DeadlineExceeded),
            ErrorClass::DeadlineExceeded
        );
        // The service's answers to the request are not its failures.
        for code in [
            K::InvalidArgument,
            K::NotFound,
            K::AlreadyExists,
            K::PermissionDenied,
            K::FailedPrecondition,
            K::Unauthenticated,
            K::OutOfRange,
        ] {
            let class = class_of_code(code);
            assert_eq!(class, ErrorClass::InvalidRequest, "{code:?}");
            assert!(!class.row().breaker && !class.row().rollback, "{code:?}");
        }
    }

    #[test]
    fn timeouts_fit_the_specs_eight_digits() {
        assert_eq!(grpc_timeout(Duration::from_millis(1500)), "1500000u");
        assert_eq!(grpc_timeout(Duration::ZERO), "1u");
        assert_eq!(grpc_timeout(Duration::from_secs(1000)), "1000000m");
        assert_eq!(grpc_timeout(Duration::from_secs(10_000_000)), "10000000S");
        for d in [1u64, 99, 100_000, 99_999_999] {
            let t = grpc_timeout(Duration::from_secs(d));
            assert!(t.len() <= 9, "{t}");
        }
    }

    #[test]
    fn files_come_after_what_they_import() {
        let file = |name: &str, deps: &[&str]| prost_types::FileDescriptorProto {
            name: Some(name.into()),
            dependency: deps.iter().map(|d| d.to_string()).collect(),
            ..Default::default()
        };
        let mut files = BTreeMap::new();
        for f in [
            file("a.proto", &["c.proto", "google/protobuf/empty.proto"]),
            file("c.proto", &["google/protobuf/empty.proto"]),
            file("google/protobuf/empty.proto", &[]),
        ] {
            files.insert(f.name().to_string(), f);
        }
        let order: Vec<String> = in_dependency_order(files)
            .iter()
            .map(|f| f.name().to_string())
            .collect();
        assert_eq!(order, ["google/protobuf/empty.proto", "c.proto", "a.proto"]);
    }
}
