//! Accepting TLS connections: TCP accepted in one task, each handshake in its own
//! with a deadline, at most [`MAX_PENDING_HANDSHAKES`] pending, and only completed
//! connections handed to the server (tonic's or axum's).
//!
//! A failed handshake (a plaintext client, the wrong CA, no client certificate, a
//! port scanner) closes its socket at once and is counted in
//! `pitboss_tls_handshake_failures_total`; one that stalls is closed at
//! `tls.handshake_timeout`. Either way the server never sees it, and nothing of it is
//! kept.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio_rustls::server::TlsStream;
use tonic::codegen::http;
use tonic::transport::server::{Connected, TcpConnectInfo};

use super::ClientIdentity;

/// Handshakes in progress at once per listener; a connection beyond them is closed
/// at once (and counted), so a flood of stalled handshakes cannot take every file
/// descriptor.
pub const MAX_PENDING_HANDSHAKES: usize = 1024;

/// What a request knows of its TLS connection: the addresses, and the verified
/// client identity under mTLS. tonic puts it in each request's extensions.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    pub tcp: TcpConnectInfo,
    /// `None` without a client certificate.
    pub identity: Option<Arc<ClientIdentity>>,
}

impl PeerInfo {
    /// The peer of a request that came over TLS.
    pub fn of(extensions: &http::Extensions) -> Option<&PeerInfo> {
        extensions.get::<PeerInfo>()
    }
}

/// Copies the addresses of a TLS connection into the extension tonic reads for
/// `Request::remote_addr`, so code that logs the peer works the same over TLS.
pub fn expose_addresses<B>(mut req: http::Request<B>) -> http::Request<B> {
    if let Some(tcp) = req.extensions().get::<PeerInfo>().map(|p| p.tcp.clone()) {
        req.extensions_mut().insert(tcp);
    }
    req
}

/// A TLS connection whose handshake completed.
pub struct TlsConn {
    stream: TlsStream<TcpStream>,
    peer: PeerInfo,
}

impl TlsConn {
    pub fn peer(&self) -> &PeerInfo {
        &self.peer
    }
}

impl Connected for TlsConn {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.peer.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// Accepts on `listener` with the config in force at each connection's arrival, and
/// yields the connections whose handshake completed. Accepting stops (and the
/// listening socket closes) when the receiver is dropped or `stop` is cancelled (the
/// listener's shutdown: connections already open drain as tonic lets them).
pub fn spawn(
    listener: TcpListener,
    config: Arc<ArcSwap<rustls::ServerConfig>>,
    label: String,
    handshake_timeout: Duration,
    stop: tokio_util::sync::CancellationToken,
) -> mpsc::Receiver<TlsConn> {
    let (tx, rx) = mpsc::channel::<TlsConn>(256);
    let pending = Arc::new(Semaphore::new(MAX_PENDING_HANDSHAKES));
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                _ = tx.closed() => return,
                _ = stop.cancelled() => return,
                r = listener.accept() => r,
            };
            let (tcp, remote) = match accepted {
                Ok(c) => c,
                Err(e) => {
                    // EMFILE and the like: back off rather than spin.
                    tracing::warn!(listener = %label, "accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(permit) = pending.clone().try_acquire_owned() else {
                failed(&label, "overload");
                tracing::debug!(listener = %label, %remote, "too many TLS handshakes in progress: connection closed");
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = tokio_rustls::TlsAcceptor::from(config.load_full());
            let (tx, label) = (tx.clone(), label.clone());
            tokio::spawn(async move {
                let tcp_info = TcpConnectInfo {
                    local_addr: tcp.local_addr().ok(),
                    remote_addr: Some(remote),
                };
                let done = tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await;
                drop(permit);
                let stream = match done {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        failed(&label, "error");
                        tracing::debug!(listener = %label, %remote, "TLS handshake failed: {e}");
                        return;
                    }
                    Err(_) => {
                        failed(&label, "timeout");
                        tracing::debug!(listener = %label, %remote, "TLS handshake timed out after {handshake_timeout:?}");
                        return;
                    }
                };
                let identity = stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .map(|leaf| Arc::new(ClientIdentity::from_der(leaf)));
                let conn = TlsConn {
                    stream,
                    peer: PeerInfo {
                        tcp: tcp_info,
                        identity,
                    },
                };
                let _ = tx.send(conn).await;
            });
        }
    });
    rx
}

fn failed(label: &str, reason: &'static str) {
    metrics::counter!("pitboss_tls_handshake_failures_total", "listener" => label.to_string(), "reason" => reason).increment(1);
}

/// The connections as the stream tonic's `serve_with_incoming` takes.
pub fn incoming(
    rx: mpsc::Receiver<TlsConn>,
) -> impl tokio_stream::Stream<Item = io::Result<TlsConn>> {
    use tokio_stream::StreamExt;
    tokio_stream::wrappers::ReceiverStream::new(rx).map(Ok)
}

/// The connections as an axum listener (the metrics listener).
pub struct HttpListener {
    rx: mpsc::Receiver<TlsConn>,
    local_addr: SocketAddr,
}

impl HttpListener {
    pub fn new(rx: mpsc::Receiver<TlsConn>, local_addr: SocketAddr) -> HttpListener {
        HttpListener { rx, local_addr }
    }
}

impl axum::serve::Listener for HttpListener {
    type Io = TlsConn;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (TlsConn, SocketAddr) {
        match self.rx.recv().await {
            Some(conn) => {
                let addr = conn.peer.tcp.remote_addr.unwrap_or(self.local_addr);
                (conn, addr)
            }
            // The acceptor stops only when this receiver is dropped.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.local_addr)
    }
}
