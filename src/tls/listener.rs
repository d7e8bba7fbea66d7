//! A listener's TLS settings (`[tls.bridge]`, `[tls.admin]`, `[tls.metrics]`) and the
//! rustls server config built from its files.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::server::{ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use x509_parser::time::ASN1Time;

use super::{material, Allowlist, Named, Summary, TlsError};
use crate::config::{Config, TlsSection};

/// What a listener speaks above TLS, offered by ALPN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// gRPC: HTTP/2 only (grpcio and grpc-go refuse a server that does not select
    /// `h2`).
    Grpc,
    /// The metrics listener: HTTP/1.1 (Prometheus, curl, the kubelet).
    Http1,
}

/// One listener's TLS: its certificate and key, and the CA of its clients for mTLS.
#[derive(Debug, Clone, PartialEq)]
pub struct ListenerTls {
    /// `bridge`, `admin` or `metrics`.
    pub name: &'static str,
    pub cert: Named,
    pub key: Named,
    pub client_ca: Option<Named>,
    pub protocol: Protocol,
}

/// The listeners that have TLS, and the settings they share.
#[derive(Debug, Clone, Default)]
pub struct Listeners {
    pub bridge: Option<ListenerTls>,
    pub admin: Option<ListenerTls>,
    pub metrics: Option<ListenerTls>,
    /// Who may call the Bridge (empty: any client the CA signed).
    pub bridge_allow: Allowlist,
    pub admin_allow: super::AdminAllowlists,
    pub handshake_timeout: Duration,
    pub reload_interval: Duration,
}

impl Listeners {
    pub fn from_config(config: &Config) -> Listeners {
        Listeners::from_section(&config.tls, &config.base_dir)
    }

    pub fn from_section(s: &TlsSection, base_dir: &Path) -> Listeners {
        let file = |table: &str, key: &str, value: &str| {
            (!value.is_empty())
                .then(|| Named::new(format!("tls.{table}.{key}"), base_dir.join(value)))
        };
        let listener = |name: &'static str, cert: &str, key: &str, ca: &str, protocol| {
            Some(ListenerTls {
                name,
                cert: file(name, "cert_file", cert)?,
                key: file(name, "key_file", key)?,
                client_ca: file(name, "client_ca_file", ca),
                protocol,
            })
        };
        Listeners {
            bridge: listener(
                "bridge",
                &s.bridge.cert_file,
                &s.bridge.key_file,
                &s.bridge.client_ca_file,
                Protocol::Grpc,
            ),
            admin: listener(
                "admin",
                &s.admin.cert_file,
                &s.admin.key_file,
                &s.admin.client_ca_file,
                Protocol::Grpc,
            ),
            metrics: listener(
                "metrics",
                &s.metrics.cert_file,
                &s.metrics.key_file,
                &s.metrics.client_ca_file,
                Protocol::Http1,
            ),
            bridge_allow: Allowlist::new(&s.bridge.allow),
            admin_allow: super::AdminAllowlists::from_section(&s.admin),
            handshake_timeout: s.handshake_timeout.0,
            reload_interval: s.reload_interval.0,
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = &ListenerTls> {
        [&self.bridge, &self.admin, &self.metrics]
            .into_iter()
            .flatten()
    }
}

impl ListenerTls {
    /// `tls.bridge`: the table, as logs and metrics name it.
    pub fn table(&self) -> String {
        format!("tls.{}", self.name)
    }

    pub fn files(&self) -> Vec<Named> {
        let mut f = vec![self.cert.clone(), self.key.clone()];
        f.extend(self.client_ca.clone());
        f
    }

    /// Reads the files and builds the config, as a start does.
    pub fn load(&self) -> Result<(Arc<rustls::ServerConfig>, Summary), TlsError> {
        self.build(&material::read_all(&self.files())?)
    }

    /// The rustls config of the files' bytes (in the order of [`ListenerTls::files`]),
    /// checked: the certificate present and valid now, the key its own, the CA usable.
    pub fn build(
        &self,
        contents: &[Vec<u8>],
    ) -> Result<(Arc<rustls::ServerConfig>, Summary), TlsError> {
        let now = ASN1Time::now();
        let (chain, summary) = material::chain(&self.cert, &contents[0], now)?;
        let key = material::private_key(&self.key, &contents[1])?;
        let certified = material::certified_key(&self.cert, chain, &self.key, key)?;
        let setup = |e: rustls::Error| TlsError::Setup {
            key: self.table(),
            what: e.to_string(),
        };
        let builder = rustls::ServerConfig::builder_with_provider(super::provider())
            .with_protocol_versions(super::VERSIONS)
            .map_err(setup)?;
        let builder = match (&self.client_ca, contents.get(2)) {
            (Some(ca), Some(pem)) => {
                let roots = material::roots(ca, pem, now)?;
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), super::provider())
                        .build()
                        .map_err(|e| TlsError::Invalid {
                            key: ca.key.clone(),
                            path: ca.path.clone(),
                            what: format!("cannot verify clients with it: {e}"),
                        })?;
                builder.with_client_cert_verifier(verifier)
            }
            _ => builder.with_no_client_auth(),
        };
        let mut config = builder.with_cert_resolver(Arc::new(Fixed(certified)));
        config.alpn_protocols = match self.protocol {
            Protocol::Grpc => vec![b"h2".to_vec()],
            Protocol::Http1 => vec![b"http/1.1".to_vec()],
        };
        Ok((Arc::new(config), summary))
    }

    /// Loads now (an error stops the start) and keeps the config current.
    pub fn start(
        &self,
        reload_interval: Duration,
    ) -> Result<(Arc<ArcSwap<rustls::ServerConfig>>, Summary), TlsError> {
        let me = self.clone();
        super::reload::start(
            self.table(),
            self.files(),
            Box::new(move |c| me.build(c)),
            reload_interval,
        )
    }
}

/// One certificate for every client (SNI is not used to choose).
#[derive(Debug)]
struct Fixed(Arc<CertifiedKey>);

impl ResolvesServerCert for Fixed {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}
