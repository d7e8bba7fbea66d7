//! TLS to an `https://` upstream (a grpc or grpc_proxy backend, or the command line's
//! clients): the system's roots or a CA file, an optional client certificate for mTLS,
//! the name sent as SNI and checked in the server's certificate, and the `:authority`.
//!
//! tonic's own client TLS is fixed when the channel is built; a client certificate
//! from cert-manager rotates under a running pod. So the channel's connector is
//! pitboss's: TCP, then a rustls handshake with the client config in force (reloaded
//! like a listener's), ALPN `h2`. The endpoint tonic sees is `http://host:port` (its
//! connector would refuse an `https` address it has no TLS config for); the requests
//! carry `https` and the authority through the endpoint's origin.

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tonic::codegen::http::Uri;
use tonic::transport::{Channel, Endpoint};
use x509_parser::time::ASN1Time;

use super::{material, Named, Summary, TlsError};
use crate::config::UpstreamTlsSection;

/// The host of `uri` as a socket connect and a TLS server name take it: an IPv6
/// literal without its brackets (`[::1]` -> `::1`); `None` when there is no host.
pub fn connect_host(uri: &Uri) -> Option<&str> {
    uri.host()
        .map(|h| h.trim_start_matches('[').trim_end_matches(']'))
}

/// An upstream's TLS settings, with the files resolved.
#[derive(Debug, Clone)]
pub struct UpstreamTls {
    /// `backends.new.tls`, or the command line: as logs and metrics name it.
    pub label: String,
    pub ca: Option<Named>,
    pub identity: Option<(Named, Named)>,
    pub server_name: ServerName<'static>,
    /// `host:port` as requests carry it.
    pub authority: String,
}

impl UpstreamTls {
    /// `[backends.<role>.tls]` for `address` (an `https://` URI).
    pub fn from_section(
        role: &str,
        address: &str,
        s: &UpstreamTlsSection,
        base_dir: &Path,
    ) -> Result<UpstreamTls, TlsError> {
        let label = format!("backends.{role}.tls");
        let file = |key: &str, v: &str| {
            (!v.is_empty()).then(|| Named::new(format!("{label}.{key}"), base_dir.join(v)))
        };
        UpstreamTls::new(
            label.clone(),
            address,
            file("ca_file", &s.ca_file),
            file("cert_file", &s.cert_file).zip(file("key_file", &s.key_file)),
            &s.server_name,
            &s.authority,
        )
    }

    /// Settings from their parts; `server_name` and `authority` may be empty (the
    /// address's host, and its `host:port`).
    pub fn new(
        label: String,
        address: &str,
        ca: Option<Named>,
        identity: Option<(Named, Named)>,
        server_name: &str,
        authority: &str,
    ) -> Result<UpstreamTls, TlsError> {
        let bad = |what: String| TlsError::Setup {
            key: label.clone(),
            what,
        };
        let uri: Uri = address
            .parse()
            .map_err(|e| bad(format!("bad address {address:?}: {e}")))?;
        let host = connect_host(&uri)
            .ok_or_else(|| bad(format!("the address {address:?} has no host")))?;
        let name = if server_name.is_empty() {
            host
        } else {
            server_name
        };
        let server_name = ServerName::try_from(name.to_string())
            .map_err(|e| bad(format!("{name:?} is not a server name: {e}")))?;
        let authority = if authority.is_empty() {
            uri.authority()
                .map(|a| a.to_string())
                .ok_or_else(|| bad(format!("the address {address:?} has no authority")))?
        } else {
            authority.to_string()
        };
        Ok(UpstreamTls {
            label,
            ca,
            identity,
            server_name,
            authority,
        })
    }

    pub fn files(&self) -> Vec<Named> {
        let mut f: Vec<Named> = self.ca.iter().cloned().collect();
        if let Some((c, k)) = &self.identity {
            f.push(c.clone());
            f.push(k.clone());
        }
        f
    }

    pub fn load(&self) -> Result<(Arc<rustls::ClientConfig>, Summary), TlsError> {
        self.build(&material::read_all(&self.files())?)
    }

    /// The rustls client config of the files' bytes (in the order of
    /// [`UpstreamTls::files`]). Its summary describes the client certificate, or the
    /// trust anchors when there is none.
    pub fn build(
        &self,
        contents: &[Vec<u8>],
    ) -> Result<(Arc<rustls::ClientConfig>, Summary), TlsError> {
        let now = ASN1Time::now();
        let mut at = 0;
        let (roots, ca_summary) = match &self.ca {
            Some(ca) => {
                at = 1;
                let roots = material::roots(ca, &contents[0], now)?;
                let first = material::certificates(ca, &contents[0])?;
                let summary = material::check_validity(ca, &first[0], now).ok();
                (roots, summary)
            }
            None => (
                material::system_roots(&format!("{}.ca_file", self.label))?,
                None,
            ),
        };
        let builder = rustls::ClientConfig::builder_with_provider(super::provider())
            .with_protocol_versions(super::VERSIONS)
            .map_err(|e| TlsError::Setup {
                key: self.label.clone(),
                what: e.to_string(),
            })?
            .with_root_certificates(roots);
        let (mut config, summary) = match &self.identity {
            Some((cert, key)) => {
                let (chain, summary) = material::chain(cert, &contents[at], now)?;
                let pkey = material::private_key(key, &contents[at + 1])?;
                material::certified_key(cert, chain.clone(), key, pkey.clone_key())?;
                let config =
                    builder
                        .with_client_auth_cert(chain, pkey)
                        .map_err(|e| TlsError::Invalid {
                            key: key.key.clone(),
                            path: key.path.clone(),
                            what: format!("unusable client certificate and key: {e}"),
                        })?;
                (config, summary)
            }
            None => {
                let summary = ca_summary.unwrap_or_else(|| Summary {
                    subject: "the system's root certificates".into(),
                    names: vec![],
                    not_after: "-".into(),
                    not_after_unix: 0,
                });
                (builder.with_no_client_auth(), summary)
            }
        };
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok((Arc::new(config), summary))
    }

    /// A lazily connected channel to `address` over TLS, its client config kept
    /// current in the background. `configure` sets the endpoint's other options.
    pub fn channel(
        &self,
        address: &str,
        reload_interval: Duration,
        configure: impl FnOnce(Endpoint) -> Endpoint,
    ) -> Result<Channel, TlsError> {
        let (endpoint, connector) = self.parts(address, reload_interval)?;
        Ok(configure(endpoint).connect_with_connector_lazy(connector))
    }

    /// A channel connected now, without reloading (the command line: a refusal is
    /// reported at once).
    pub async fn connect(&self, address: &str) -> Result<Channel, TlsError> {
        let (config, _) = self.load()?;
        let connector = Connector {
            config: Arc::new(ArcSwap::new(config)),
            server_name: self.server_name.clone(),
        };
        self.endpoint(address)?
            .connect_with_connector(connector)
            .await
            .map_err(|source| TlsError::Connect {
                address: address.to_string(),
                source,
            })
    }

    fn endpoint(&self, address: &str) -> Result<Endpoint, TlsError> {
        let bad = |what: String| TlsError::Setup {
            key: self.label.clone(),
            what,
        };
        let uri: Uri = address
            .parse()
            .map_err(|e| bad(format!("bad address {address:?}: {e}")))?;
        let authority = uri
            .authority()
            .ok_or_else(|| bad(format!("the address {address:?} has no authority")))?;
        // The connector gets the real address; tonic's own connector would refuse an
        // `https` URI without its TLS config, so the endpoint says `http`.
        let plain = format!("http://{authority}");
        let origin: Uri = format!("https://{}", self.authority)
            .parse()
            .map_err(|e| bad(format!("bad authority {:?}: {e}", self.authority)))?;
        let endpoint = Endpoint::from_shared(plain)
            .map_err(|e| bad(format!("bad address {address:?}: {e}")))?
            .origin(origin);
        Ok(endpoint)
    }

    /// The endpoint (`http://host:port`, its origin `https://authority`) and the
    /// TLS connector of a channel to `address`, the client config kept current in
    /// the background: for a client that runs its own connection over the connector.
    pub fn parts(
        &self,
        address: &str,
        reload_interval: Duration,
    ) -> Result<(Endpoint, Connector), TlsError> {
        let me = self.clone();
        let (config, summary) = super::reload::start(
            self.label.clone(),
            self.files(),
            Box::new(move |c| me.build(c)),
            reload_interval,
        )?;
        tracing::info!(upstream = %address, tls = %summary, "upstream over TLS");
        Ok((
            self.endpoint(address)?,
            Connector {
                config,
                server_name: self.server_name.clone(),
            },
        ))
    }
}

/// TCP, then TLS with the client config in force.
#[derive(Clone)]
pub struct Connector {
    config: Arc<ArcSwap<rustls::ClientConfig>>,
    server_name: ServerName<'static>,
}

impl Connector {
    /// A TLS connection to `uri`'s host and port (443 if it has none).
    pub fn open(
        &self,
        uri: Uri,
    ) -> impl Future<Output = std::io::Result<TokioIo<tokio_rustls::client::TlsStream<TcpStream>>>>
    {
        tower::Service::call(&mut self.clone(), uri)
    }
}

impl tower::Service<Uri> for Connector {
    type Response = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;
    type Error = std::io::Error;
    type Future =
        Pin<Box<dyn Future<Output = Result<Self::Response, std::io::Error>> + Send + 'static>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), std::io::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let config = self.config.load_full();
        let name = self.server_name.clone();
        Box::pin(async move {
            let host = connect_host(&uri).unwrap_or_default().to_string();
            let port = uri.port_u16().unwrap_or(443);
            let tcp = TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await?;
            Ok(TokioIo::new(tls))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_host_drops_an_ipv6_literals_brackets() {
        let host = |u: &str| connect_host(&u.parse::<Uri>().unwrap()).map(str::to_string);
        assert_eq!(host("https://[::1]:8443").as_deref(), Some("::1"));
        assert_eq!(host("http://127.0.0.1:50201").as_deref(), Some("127.0.0.1"));
        assert_eq!(
            host("https://svc.example:443").as_deref(),
            Some("svc.example")
        );
        assert_eq!(host("/only/a/path"), None);
    }
}
