//! TLS clients and servers for the tests: a server with `[tls.*]` tables made from
//! test certificates, gRPC channels over TLS (tonic's own TLS client, a second
//! implementation next to pitboss's), an HTTPS client for the metrics listener, the
//! `pitboss` command line, and polling for a rotation to show.

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use pitboss::server::RunningServer;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use super::certs::{Ca, Leaf};

/// How long a server start, a rotation or a handshake may take on a loaded machine.
pub const BOUND: Duration = Duration::from_secs(30);

/// A server on `adapter` with `tls` (TOML text) after the pool and rollout sections
/// (flags and token in `dir`), started and ready.
pub async fn serve(dir: &Path, adapter: &str, tls: &str) -> RunningServer {
    write_token(dir);
    let text = super::on_free_ports(
        "shutdown_grace = \"5s\"",
        &format!(
            "{}{}{tls}",
            super::pool_section(adapter, 1),
            super::rollout_section(dir)
        ),
    );
    let server = RunningServer::start(super::config(&text)).await.unwrap();
    server.pool().wait_ready(1, BOUND).await.unwrap();
    server
}

/// The admin token file (`admin-token`) that [`super::rollout_section`] names, unless
/// the test wrote its own.
pub fn write_token(dir: &Path) {
    if !dir.join("token").exists() {
        std::fs::write(dir.join("token"), "admin-token\n").unwrap();
    }
}

/// A `[tls.<name>]` table: `server`'s certificate and key written to `dir`, the
/// client CA for mTLS when given, and `extra` keys (allowlists).
pub fn listener_tls(
    name: &str,
    dir: &Path,
    server: &Leaf,
    client_ca: Option<&Ca>,
    extra: &str,
) -> String {
    let (c, k) = server.write(dir, name);
    let ca = client_ca
        .map(|ca| {
            format!(
                "client_ca_file = \"{}\"\n",
                ca.write(dir, &format!("{name}-client-ca.pem")).display()
            )
        })
        .unwrap_or_default();
    format!(
        "[tls.{name}]\ncert_file = \"{}\"\nkey_file = \"{}\"\n{ca}{extra}",
        c.display(),
        k.display()
    )
}

/// A gRPC channel to `addr` over TLS (tonic's client) trusting `ca` (PEM), checking
/// the name `localhost`, presenting `id` when given.
pub async fn channel(
    addr: SocketAddr,
    ca: &str,
    id: Option<&Leaf>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name("localhost");
    if let Some(id) = id {
        tls = tls.identity(id.identity());
    }
    Endpoint::from_shared(format!("https://{addr}"))?
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(10))
        .connect()
        .await
}

/// One `echo` call on a fresh TLS connection: its payload, or the status (a failed
/// connection reads as UNAVAILABLE).
pub async fn echo(addr: SocketAddr, ca: &str, id: Option<&Leaf>) -> Result<String, tonic::Status> {
    let ch = channel(addr, ca, id)
        .await
        .map_err(|e| tonic::Status::unavailable(format!("connect: {e:?}")))?;
    let r = super::Client::new(ch)
        .execute(super::exec("echo", r#"{"hi":1}"#))
        .await?
        .into_inner();
    Ok(String::from_utf8_lossy(&r.payload).into_owned())
}

/// A `GetRollout` (with the test token) on a fresh TLS connection to an admin
/// listener; Ok when it answered.
pub async fn get_rollout(addr: SocketAddr, ca: &str) -> Result<(), tonic::Status> {
    let ch = channel(addr, ca, None)
        .await
        .map_err(|e| tonic::Status::unavailable(format!("connect: {e:?}")))?;
    super::AdminClient::new(ch)
        .get_rollout(super::authed(
            pitboss::grpc::pb::GetRolloutRequest {},
            "admin-token",
        ))
        .await
        .map(|_| ())
}

/// Calls `attempt` every 100 ms until it returns true or [`BOUND`] passes; returns
/// whether it did (a rotation shows on the next new connection after the reload).
pub async fn until<F, Fut>(mut attempt: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + BOUND;
    while tokio::time::Instant::now() < deadline {
        if attempt().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// A rustls client config trusting `ca` (HTTP/1.1, as a kubelet or Prometheus).
pub fn http_client_config(ca: &Ca) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der.clone()).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

/// One HTTPS (HTTP/1.1 keep-alive) connection, for requests one after the other.
pub struct Https {
    stream: BufReader<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>,
}

impl Https {
    /// Connects to `addr` trusting `ca`, checking the name `localhost`.
    pub async fn connect(addr: SocketAddr, ca: &Ca) -> std::io::Result<Https> {
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        let tls = tokio::time::timeout(
            BOUND,
            tokio_rustls::TlsConnector::from(http_client_config(ca))
                .connect("localhost".try_into().unwrap(), tcp),
        )
        .await
        .map_err(|_| std::io::Error::other("handshake timed out"))??;
        Ok(Https {
            stream: BufReader::new(tls),
        })
    }

    /// `GET path`: (status, body). The body is read by its Content-Length, so the
    /// connection stays open for the next request.
    pub async fn get(&mut self, path: &str) -> std::io::Result<(u16, String)> {
        let req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n");
        self.stream.get_mut().write_all(req.as_bytes()).await?;
        let mut status = 0;
        let mut length = 0usize;
        let mut line = String::new();
        loop {
            line.clear();
            if self.stream.read_line(&mut line).await? == 0 {
                return Err(std::io::Error::other("closed before the headers ended"));
            }
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some(code) = l.strip_prefix("HTTP/1.1 ") {
                status = code[..3].parse().unwrap_or(0);
            } else if let Some((k, v)) = l.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    length = v.trim().parse().unwrap_or(0);
                }
            }
        }
        let mut body = vec![0; length];
        self.stream.read_exact(&mut body).await?;
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }
}

/// `pitboss ARGS` (the real binary), without $PITBOSS_ADMIN_TOKEN unless `token` is
/// given: its output, whether it succeeded or not.
pub async fn pitboss_cli(args: &[&str], token: Option<&str>) -> std::process::Output {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_pitboss"));
    cmd.args(args).env_remove("PITBOSS_ADMIN_TOKEN");
    if let Some(t) = token {
        cmd.env("PITBOSS_ADMIN_TOKEN", t);
    }
    tokio::time::timeout(BOUND, cmd.output())
        .await
        .expect("the command line answers within the bound")
        .unwrap()
}
