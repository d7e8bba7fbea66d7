//! The `grpc_proxy`'s own HTTP/2 connection to the service, for the calls it splits.
//!
//! tonic's `Channel` puts a `Buffer` in front of its connection: every request goes
//! through an mpsc queue to a worker task, which then hands it to the connection's
//! task. For a passthrough that is one more task wake-up (often a cross-thread
//! `futex` wake) per call on top of the two HTTP/2 hops every proxy has, and at c=1
//! it showed in the profile as scheduler time. Here the caller's task sends on
//! hyper's `SendRequest` itself: one connection, shared by every call (HTTP/2
//! multiplexes them), made on the first call and made again when it has closed.
//! The TCP (and TLS) connector is the one the channel would use.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tonic::body::Body;

/// What a connection runs over: TCP, or TLS over TCP.
pub trait Io: hyper::rt::Read + hyper::rt::Write + Send + Unpin + 'static {}
impl<T: hyper::rt::Read + hyper::rt::Write + Send + Unpin + 'static> Io for T {}

type Connecting = Pin<Box<dyn Future<Output = std::io::Result<Box<dyn Io>>> + Send>>;

/// Opens a new transport to the service.
pub type Connect = Arc<dyn Fn() -> Connecting + Send + Sync>;

/// Why a call did not reach the service.
#[derive(Debug, thiserror::Error)]
pub enum DirectError {
    #[error("cannot connect: {0}")]
    Connect(#[source] std::io::Error),
    #[error("cannot connect within {0:?}")]
    ConnectTimeout(Duration),
    #[error("{0}")]
    Http(#[from] hyper::Error),
    #[error("bad request URI: {0}")]
    Uri(#[from] http::uri::InvalidUriParts),
}

/// One shared HTTP/2 connection, made when first needed and again once closed.
#[derive(Clone)]
pub struct Direct {
    inner: Arc<Inner>,
}

struct Inner {
    scheme: http::uri::Scheme,
    authority: http::uri::Authority,
    connect: Connect,
    connect_timeout: Duration,
    current: ArcSwapOption<SendRequest<Body>>,
    /// Held while connecting, so concurrent first calls make one connection.
    connecting: tokio::sync::Mutex<()>,
}

impl Direct {
    /// Requests carry `scheme://authority` (as `:scheme` and `:authority`).
    pub fn new(
        scheme: http::uri::Scheme,
        authority: http::uri::Authority,
        connect: Connect,
        connect_timeout: Duration,
    ) -> Direct {
        Direct {
            inner: Arc::new(Inner {
                scheme,
                authority,
                connect,
                connect_timeout,
                current: ArcSwapOption::empty(),
                connecting: tokio::sync::Mutex::new(()),
            }),
        }
    }

    /// Plain TCP (with `TCP_NODELAY`) to `host:port`.
    pub fn tcp(host: String, port: u16) -> Connect {
        Arc::new(move || {
            let host = host.clone();
            Box::pin(async move {
                let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
                tcp.set_nodelay(true)?;
                Ok(Box::new(TokioIo::new(tcp)) as Box<dyn Io>)
            })
        })
    }

    /// Sends `req` (its URI: the path) and returns the answer's head; the body
    /// streams as it comes. Dropping the future resets the stream at the service.
    pub async fn send(
        &self,
        mut req: http::Request<Body>,
    ) -> Result<http::Response<Body>, DirectError> {
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(self.inner.scheme.clone());
        parts.authority = Some(self.inner.authority.clone());
        parts.path_and_query = req.uri().path_and_query().cloned();
        *req.uri_mut() = http::Uri::from_parts(parts)?;
        let mut sender = self.sender().await?;
        sender.ready().await?;
        let resp = sender.send_request(req).await?;
        Ok(resp.map(Body::new))
    }

    /// The open connection's sender, or a new connection's.
    async fn sender(&self) -> Result<SendRequest<Body>, DirectError> {
        let open = || {
            self.inner
                .current
                .load_full()
                .filter(|s| !s.is_closed())
                .map(|s| (*s).clone())
        };
        if let Some(s) = open() {
            return Ok(s);
        }
        let _connecting = self.inner.connecting.lock().await;
        if let Some(s) = open() {
            return Ok(s);
        }
        let timeout = self.inner.connect_timeout;
        let io = tokio::time::timeout(timeout, (self.inner.connect)())
            .await
            .map_err(|_| DirectError::ConnectTimeout(timeout))?
            .map_err(DirectError::Connect)?;
        let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .handshake(io)
            .await?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!("the connection to the grpc_proxy service ended: {e}");
            }
        });
        self.inner.current.store(Some(Arc::new(sender.clone())));
        Ok(sender)
    }
}
