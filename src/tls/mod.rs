//! TLS and mTLS: on the listeners (Bridge, Admin, metrics) and to `https://`
//! upstreams, with certificates that reload without a restart, and the client
//! identities (SAN URI or DNS names) that say who may call what.
//!
//! Why not tonic's `ServerTlsConfig`: it is fixed when the server starts, and
//! cert-manager or Vault rotate certificates under a running pod. So the listeners
//! accept TCP themselves and run the handshake with tokio-rustls (the stack tonic's
//! `tls-ring` uses), each connection with the [`rustls::ServerConfig`] in force when
//! it arrives ([`reload`]: the files are watched and every change re-validated; a bad
//! change is refused and the old material stays). Connections already open keep the
//! session they negotiated, so no call in flight fails. The upstream side does the
//! same with a connector of its own ([`client`]).
//!
//! The handshakes run in their own tasks with a deadline and a bound on how many may
//! be pending at once ([`accept`]): a client that connects and stalls, or a flood of
//! failed handshakes, costs a socket for `tls.handshake_timeout` at most and never
//! stops other clients from connecting.
//!
//! rustls speaks TLS 1.2 and 1.3 only; the listeners name both explicitly.
//!
//! This is a leaf over `config`: the server (listeners), the edge (who may call) and
//! the grpc and grpc_proxy backends (upstreams) use it.

pub mod accept;
pub mod client;
pub mod identity;
pub mod listener;
pub mod material;
pub mod reload;

use std::path::PathBuf;

pub use accept::{PeerInfo, TlsConn};
pub use client::UpstreamTls;
pub use identity::{AdminAllowlists, AdminGrant, Allowlist, ClientIdentity};
pub use listener::{ListenerTls, Listeners};
pub use material::Summary;

/// Why TLS material cannot be used: which setting, which file, what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{key} = {}: cannot read: {source}", path.display())]
    Read {
        key: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{key} = {}: no PEM certificate (-----BEGIN CERTIFICATE-----) in the file", path.display())]
    NoCertificate { key: String, path: PathBuf },
    #[error("{key} = {}: no PEM private key (PKCS#8, PKCS#1 or SEC1) in the file", path.display())]
    NoKey { key: String, path: PathBuf },
    #[error("{key} = {}: {what}", path.display())]
    Invalid {
        key: String,
        path: PathBuf,
        what: String,
    },
    #[error("{key} = {}: the certificate ({subject}) expired at {not_after}; it is now {now}", path.display())]
    Expired {
        key: String,
        path: PathBuf,
        subject: String,
        not_after: String,
        now: String,
    },
    #[error("{key} = {}: the certificate ({subject}) is not valid before {not_before}; it is now {now}", path.display())]
    NotYetValid {
        key: String,
        path: PathBuf,
        subject: String,
        not_before: String,
        now: String,
    },
    #[error("{key_key} = {} does not match the certificate of {cert_key} = {} (is it the key of another certificate?)", key_path.display(), cert_path.display())]
    KeyMismatch {
        cert_key: String,
        cert_path: PathBuf,
        key_key: String,
        key_path: PathBuf,
    },
    #[error("{key}: {what}")]
    Setup { key: String, what: String },
    #[error("cannot connect to {address}: {source}")]
    Connect {
        address: String,
        source: tonic::transport::Error,
    },
}

/// A setting that names a file, as the errors report it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Named {
    /// The config key (`tls.bridge.cert_file`) or the command-line flag.
    pub key: String,
    pub path: PathBuf,
}

impl Named {
    pub fn new(key: impl Into<String>, path: impl Into<PathBuf>) -> Named {
        Named {
            key: key.into(),
            path: path.into(),
        }
    }
}

/// The crypto provider of every TLS config pitboss builds: ring, as tonic's
/// `tls-ring`.
pub fn provider() -> std::sync::Arc<rustls::crypto::CryptoProvider> {
    std::sync::Arc::new(rustls::crypto::ring::default_provider())
}

/// TLS 1.3 and 1.2; nothing older (rustls has nothing older either).
pub const VERSIONS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

/// Loads and checks every piece of TLS material a config names (listeners and
/// upstreams), as a start would: `pitboss check-config` runs it. One line per
/// configured certificate, or the first error.
pub fn check(config: &crate::config::Config) -> Result<Vec<String>, TlsError> {
    let mut out = Vec::new();
    let listeners = Listeners::from_config(config);
    for l in listeners.iter() {
        let (_, summary) = l.load()?;
        out.push(format!("{}: {summary}", l.table()));
    }
    for role in ["legacy", "new"] {
        let Ok(b) = config.backend(role) else {
            continue;
        };
        let remote = matches!(
            b.kind,
            crate::config::BackendKind::Grpc | crate::config::BackendKind::GrpcProxy
        );
        if !remote || !b.address.starts_with("https://") {
            continue;
        }
        let tls = UpstreamTls::from_section(role, &b.address, &b.tls, &config.base_dir)?;
        let (_, summary) = tls.load()?;
        out.push(format!("backends.{role}.tls: {summary}"));
    }
    Ok(out)
}
