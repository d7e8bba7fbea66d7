//! The `[tls]` section (the listeners' TLS and mTLS, and who may call what) and each
//! grpc backend's `[backends.<role>.tls]` (TLS to its upstream), parsed and checked
//! for shape: which keys go together, what an identity looks like. Whether the files
//! can be read, hold matching, unexpired material and chain to their CA is checked
//! by `tls` (at start, on every reload, and by `pitboss check-config`).

use serde::{Deserialize, Serialize};

use super::Dur;

/// `[tls]`: one table per listener, and the handshake and reload settings they share.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    /// How long a client may take to complete its TLS handshake before the
    /// connection is closed.
    pub handshake_timeout: Dur,
    /// The certificate files are watched and reloaded on change; they are also
    /// re-read this often, in case a change was not seen.
    pub reload_interval: Dur,
    pub bridge: BridgeTlsSection,
    pub admin: AdminTlsSection,
    pub metrics: MetricsTlsSection,
}

/// `[tls.bridge]`: TLS on the Bridge listener, client certificates, and the callers
/// that may use it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BridgeTlsSection {
    pub cert_file: String,
    pub key_file: String,
    pub client_ca_file: String,
    /// Client identities (SAN URI or DNS names) that may call; empty: any client
    /// whose certificate the CA signed.
    pub allow: Vec<String>,
}

/// `[tls.admin]`: as the Bridge's, with read-only and write callers apart.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminTlsSection {
    pub cert_file: String,
    pub key_file: String,
    pub client_ca_file: String,
    /// Identities that may make read-only calls (GetStatus, GetRollout).
    pub allow_read: Vec<String>,
    /// Identities that may make every call, changes included.
    pub allow_write: Vec<String>,
}

/// `[tls.metrics]`: TLS on the HTTP listener (off by default: it serves loopback).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsTlsSection {
    pub cert_file: String,
    pub key_file: String,
    pub client_ca_file: String,
}

/// `[backends.<role>.tls]`: how a grpc backend reaches an `https://` upstream.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamTlsSection {
    /// The CA that signed the upstream's certificate; empty: the system's roots.
    pub ca_file: String,
    /// A client certificate and key for mTLS to the upstream; empty: none.
    pub cert_file: String,
    pub key_file: String,
    /// The name sent as SNI and checked in the upstream's certificate; empty: the
    /// address's host.
    pub server_name: String,
    /// The `:authority` of each call; empty: the address's `host:port`.
    pub authority: String,
}

impl UpstreamTlsSection {
    /// Whether any key is set.
    pub fn is_set(&self) -> bool {
        *self != UpstreamTlsSection::default()
    }
}

/// A listener's certificate keys, common to the three listener tables.
pub struct ListenerKeys<'a> {
    /// `bridge`, `admin` or `metrics`.
    pub name: &'static str,
    pub cert_file: &'a str,
    pub key_file: &'a str,
    pub client_ca_file: &'a str,
    /// Each allowlist key and its entries.
    pub allowlists: Vec<(&'static str, &'a [String])>,
}

impl TlsSection {
    pub fn listeners(&self) -> [ListenerKeys<'_>; 3] {
        [
            ListenerKeys {
                name: "bridge",
                cert_file: &self.bridge.cert_file,
                key_file: &self.bridge.key_file,
                client_ca_file: &self.bridge.client_ca_file,
                allowlists: vec![("allow", &self.bridge.allow)],
            },
            ListenerKeys {
                name: "admin",
                cert_file: &self.admin.cert_file,
                key_file: &self.admin.key_file,
                client_ca_file: &self.admin.client_ca_file,
                allowlists: vec![
                    ("allow_read", &self.admin.allow_read),
                    ("allow_write", &self.admin.allow_write),
                ],
            },
            ListenerKeys {
                name: "metrics",
                cert_file: &self.metrics.cert_file,
                key_file: &self.metrics.key_file,
                client_ca_file: &self.metrics.client_ca_file,
                allowlists: vec![],
            },
        ]
    }

    /// The checks of shape, as (key, message) for the first that fails.
    pub fn check(&self) -> Result<(), (String, String)> {
        if self.handshake_timeout.0.is_zero() {
            return Err(("tls.handshake_timeout".into(), "must be positive".into()));
        }
        if self.reload_interval.0.is_zero() {
            return Err(("tls.reload_interval".into(), "must be positive".into()));
        }
        for l in self.listeners() {
            let key = |k: &str| format!("tls.{}.{k}", l.name);
            pair(&key("cert_file"), l.cert_file, &key("key_file"), l.key_file)?;
            if !l.client_ca_file.is_empty() && l.cert_file.is_empty() {
                return Err((
                    key("client_ca_file"),
                    format!(
                        "client certificates (mTLS) need TLS on the listener: set tls.{0}.cert_file and tls.{0}.key_file too",
                        l.name
                    ),
                ));
            }
            for (list, entries) in &l.allowlists {
                if !entries.is_empty() && l.client_ca_file.is_empty() {
                    return Err((
                        key(list),
                        format!(
                            "an allowlist of client identities needs client certificates: set tls.{}.client_ca_file (the CA that signs them)",
                            l.name
                        ),
                    ));
                }
                for e in entries.iter() {
                    check_identity_pattern(e).map_err(|why| (key(list), why.to_string()))?;
                }
            }
        }
        Ok(())
    }
}

/// Checks a grpc backend's address and its `tls` table together: (key, message).
pub fn check_upstream(
    role: &str,
    address: &str,
    tls: &UpstreamTlsSection,
) -> Result<(), (String, String)> {
    let key = |k: &str| format!("backends.{role}.tls.{k}");
    let https = address.starts_with("https://");
    if tls.is_set() && !https {
        let set = [
            ("ca_file", &tls.ca_file),
            ("cert_file", &tls.cert_file),
            ("key_file", &tls.key_file),
            ("server_name", &tls.server_name),
            ("authority", &tls.authority),
        ]
        .into_iter()
        .find(|(_, v)| !v.is_empty())
        .map(|(k, _)| k)
        .unwrap_or("ca_file");
        return Err((
            key(set),
            format!(
                "TLS settings need an https:// address, got {address:?} for backends.{role}.address"
            ),
        ));
    }
    pair(
        &key("cert_file"),
        &tls.cert_file,
        &key("key_file"),
        &tls.key_file,
    )?;
    if !tls.server_name.is_empty()
        && (tls.server_name.contains('/') || tls.server_name.contains(':'))
    {
        return Err((
            key("server_name"),
            format!(
                "a host name (or IP address) without scheme or port, got {:?}",
                tls.server_name
            ),
        ));
    }
    if !tls.authority.is_empty()
        && (tls.authority.contains('/')
            || tls.authority.parse::<http_authority::Authority>().is_err())
    {
        return Err((
            key("authority"),
            format!("a host[:port] authority, got {:?}", tls.authority),
        ));
    }
    Ok(())
}

/// tonic re-exports the `http` crate's authority type.
mod http_authority {
    pub use tonic::codegen::http::uri::Authority;
}

fn pair(a_key: &str, a: &str, b_key: &str, b: &str) -> Result<(), (String, String)> {
    match (a.is_empty(), b.is_empty()) {
        (false, true) => Err((b_key.into(), format!("{a_key} is set: set {b_key} too"))),
        (true, false) => Err((a_key.into(), format!("{b_key} is set: set {a_key} too"))),
        _ => Ok(()),
    }
}

/// An allowlist entry: a URI SAN (`spiffe://trust.domain/ns/x/sa/y`, any
/// `scheme://...`) or a DNS SAN (`client.example.com`), exact, or ending in one `*`
/// that matches any rest (`spiffe://prod/ns/payments/*`).
pub fn check_identity_pattern(p: &str) -> Result<(), BadIdentity> {
    let bad = |why: &str| Err(BadIdentity(format!("{why}, got {p:?}")));
    if p.trim().is_empty() || p.trim() != p {
        return bad("an identity must be a SAN URI or DNS name without spaces");
    }
    if let Some(i) = p.find('*') {
        if i != p.len() - 1 {
            return bad("`*` may only end an identity (a prefix match)");
        }
    }
    if p.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return bad("an identity has no spaces");
    }
    Ok(())
}

/// An allowlist entry that is not an identity pattern, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BadIdentity(pub String);

/// The line of `key = ...` inside the table `[section]` of the user's text (a
/// listener's keys share their names with the other listeners').
pub fn line_in_table(text: &str, section: &str, key: &str) -> Option<usize> {
    let header = format!("[{section}]");
    let mut inside = false;
    for (i, line) in text.lines().enumerate() {
        let l = line.trim();
        if l.starts_with('[') {
            inside = l.replace(' ', "") == header;
            continue;
        }
        if inside
            && !l.starts_with('#')
            && l.strip_prefix(key)
                .is_some_and(|rest| rest.trim_start().starts_with('='))
        {
            return Some(i + 1);
        }
    }
    // A dotted key at the top level or in a parent table.
    let dotted = format!("{section}.{key}");
    let dotted_tail = dotted.split_once('.').map(|(_, t)| t.to_string());
    text.lines()
        .position(|l| {
            let l = l.trim_start();
            !l.starts_with('#')
                && [Some(dotted.as_str()), dotted_tail.as_deref()]
                    .into_iter()
                    .flatten()
                    .any(|k| {
                        l.strip_prefix(k)
                            .is_some_and(|rest| rest.trim_start().starts_with('='))
                    })
        })
        .map(|i| i + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_patterns_are_exact_or_end_in_one_star() {
        assert!(check_identity_pattern("spiffe://prod/ns/pay/sa/api").is_ok());
        assert!(check_identity_pattern("spiffe://prod/ns/pay/*").is_ok());
        assert!(check_identity_pattern("client.example.com").is_ok());
        assert!(check_identity_pattern("*").is_ok());
        assert!(check_identity_pattern("spiffe://*/x").is_err());
        assert!(check_identity_pattern("").is_err());
        assert!(check_identity_pattern("a b").is_err());
    }

    #[test]
    fn a_key_is_found_in_its_own_table() {
        let text = "[tls.bridge]\ncert_file = \"a\"\n[tls.admin]\ncert_file = \"b\"\n";
        assert_eq!(line_in_table(text, "tls.admin", "cert_file"), Some(4));
        assert_eq!(line_in_table(text, "tls.bridge", "cert_file"), Some(2));
        assert_eq!(line_in_table(text, "tls.metrics", "cert_file"), None);
    }

    #[test]
    fn upstream_tls_needs_https_and_pairs() {
        let mut t = UpstreamTlsSection {
            ca_file: "ca.pem".into(),
            ..Default::default()
        };
        let (key, msg) = check_upstream("new", "http://u:1", &t).unwrap_err();
        assert_eq!(key, "backends.new.tls.ca_file");
        assert!(msg.contains("https://"), "{msg}");
        assert!(check_upstream("new", "https://u:1", &t).is_ok());
        t.cert_file = "c.pem".into();
        let (key, _) = check_upstream("new", "https://u:1", &t).unwrap_err();
        assert_eq!(key, "backends.new.tls.key_file");
        t.key_file = "k.pem".into();
        t.server_name = "u.example:443".into();
        let (key, _) = check_upstream("new", "https://u:1", &t).unwrap_err();
        assert_eq!(key, "backends.new.tls.server_name");
        t.server_name = "u.example".into();
        t.authority = "bad authority/x".into();
        let (key, _) = check_upstream("new", "https://u:1", &t).unwrap_err();
        assert_eq!(key, "backends.new.tls.authority");
        t.authority = "api.example:443".into();
        assert!(check_upstream("new", "https://u:1", &t).is_ok());
    }
}
