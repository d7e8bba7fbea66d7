//! Who a client is (the SAN URI and DNS names of its verified certificate) and
//! whether an allowlist admits it. Pure; read once per connection, at the handshake.

use rustls::pki_types::CertificateDer;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;

/// The names of a verified client certificate: its SAN URIs (SPIFFE IDs and the
/// like) and DNS names. The subject's CN is not an identity: SANs are what CAs and
/// meshes issue identities in.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientIdentity {
    pub uris: Vec<String>,
    pub dns: Vec<String>,
}

impl ClientIdentity {
    /// The identity of a DER certificate; empty when it cannot be parsed (rustls has
    /// verified it already, so that does not happen) or has no SAN.
    pub fn from_der(der: &CertificateDer<'_>) -> ClientIdentity {
        match x509_parser::parse_x509_certificate(der) {
            Ok((_, cert)) => ClientIdentity::from_parsed(&cert),
            Err(_) => ClientIdentity::default(),
        }
    }

    pub fn from_parsed(cert: &X509Certificate<'_>) -> ClientIdentity {
        let mut id = ClientIdentity::default();
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                match name {
                    GeneralName::URI(u) => id.uris.push(u.to_string()),
                    GeneralName::DNSName(d) => id.dns.push(d.to_string()),
                    _ => {}
                }
            }
        }
        id
    }

    /// URIs first, then DNS names.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.uris.iter().chain(&self.dns).map(String::as_str)
    }
}

impl std::fmt::Display for ClientIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.names().collect();
        if names.is_empty() {
            f.write_str("a certificate without SAN names")
        } else {
            f.write_str(&names.join(", "))
        }
    }
}

/// Identity patterns (checked by `config::tls::check_identity_pattern`): exact, or
/// ending in `*` for any rest. DNS names compare without regard to ASCII case, as DNS
/// does; URIs exactly.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Allowlist(Vec<String>);

impl Allowlist {
    pub fn new(patterns: &[String]) -> Allowlist {
        Allowlist(patterns.to_vec())
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn allows(&self, id: &ClientIdentity) -> bool {
        self.0.iter().any(|p| {
            id.uris.iter().any(|u| matches(p, u, false))
                || id.dns.iter().any(|d| matches(p, d, true))
        })
    }
}

fn matches(pattern: &str, name: &str, ignore_case: bool) -> bool {
    let eq = |a: &str, b: &str| {
        if ignore_case {
            a.eq_ignore_ascii_case(b)
        } else {
            a == b
        }
    };
    match pattern.strip_suffix('*') {
        Some(prefix) => {
            name.len() >= prefix.len() && {
                // Compare on a char boundary only (a prefix in the middle of a UTF-8
                // character is no match).
                name.is_char_boundary(prefix.len()) && eq(&name[..prefix.len()], prefix)
            }
        }
        None => eq(pattern, name),
    }
}

/// The admin listener's identities: who may read, who may also write.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AdminAllowlists {
    pub read: Allowlist,
    pub write: Allowlist,
}

/// What an identity may do on the admin API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdminGrant {
    /// No admin allowlist is configured: the token decides, as without mTLS.
    TokenDecides,
    /// Every call, changes included.
    Write,
    /// Read-only calls.
    Read,
    /// Nothing: not listed (or no certificate).
    Nothing,
}

impl AdminAllowlists {
    pub fn from_section(s: &crate::config::tls::AdminTlsSection) -> AdminAllowlists {
        AdminAllowlists {
            read: Allowlist::new(&s.allow_read),
            write: Allowlist::new(&s.allow_write),
        }
    }

    pub fn is_set(&self) -> bool {
        !self.read.is_empty() || !self.write.is_empty()
    }

    pub fn grant(&self, id: Option<&ClientIdentity>) -> AdminGrant {
        if !self.is_set() {
            return AdminGrant::TokenDecides;
        }
        match id {
            Some(id) if self.write.allows(id) => AdminGrant::Write,
            Some(id) if self.read.allows(id) => AdminGrant::Read,
            _ => AdminGrant::Nothing,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(uris: &[&str], dns: &[&str]) -> ClientIdentity {
        ClientIdentity {
            uris: uris.iter().map(|s| s.to_string()).collect(),
            dns: dns.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn list(p: &[&str]) -> Allowlist {
        Allowlist::new(&p.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn an_allowlist_matches_uris_exactly_dns_names_in_any_case_and_prefixes() {
        let l = list(&["spiffe://prod/ns/shop/sa/api", "Client.Example.com"]);
        assert!(l.allows(&id(&["spiffe://prod/ns/shop/sa/api"], &[])));
        assert!(!l.allows(&id(&["spiffe://prod/ns/shop/sa/API"], &[])));
        assert!(l.allows(&id(&[], &["client.example.COM"])));
        assert!(!l.allows(&id(&[], &["other.example.com"])));
        assert!(!l.allows(&id(&[], &[])));
        let prefix = list(&["spiffe://prod/ns/shop/*"]);
        assert!(prefix.allows(&id(&["spiffe://prod/ns/shop/sa/worker"], &[])));
        assert!(!prefix.allows(&id(&["spiffe://prod/ns/shopping/sa/x"], &[])));
        assert!(!prefix.allows(&id(&["spiffe://prod/ns/sho"], &[])));
        assert!(list(&["*"]).allows(&id(&[], &["anything"])));
        // A prefix that would end inside a multi-byte character is no match.
        assert!(!list(&["a\u{e9}*"]).allows(&id(&["a\u{e8}"], &[])));
    }

    #[test]
    fn admin_grants_separate_readers_from_writers() {
        let a = AdminAllowlists {
            read: list(&["spiffe://prod/monitoring/*"]),
            write: list(&["spiffe://prod/ops/rollout"]),
        };
        let ops = id(&["spiffe://prod/ops/rollout"], &[]);
        let mon = id(&["spiffe://prod/monitoring/grafana"], &[]);
        let other = id(&["spiffe://prod/shop/api"], &[]);
        assert_eq!(a.grant(Some(&ops)), AdminGrant::Write);
        assert_eq!(a.grant(Some(&mon)), AdminGrant::Read);
        assert_eq!(a.grant(Some(&other)), AdminGrant::Nothing);
        assert_eq!(a.grant(None), AdminGrant::Nothing);
        assert_eq!(
            AdminAllowlists::default().grant(Some(&ops)),
            AdminGrant::TokenDecides
        );
    }
}
