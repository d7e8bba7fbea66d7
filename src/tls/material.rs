//! Certificates, keys and CAs from PEM files, checked before use: readable, present,
//! within their validity period, the key matching the certificate. The checks are
//! pure functions of the files' bytes, so a reload validates exactly what it read.

use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use x509_parser::time::ASN1Time;

use super::{Named, TlsError};

/// The files of one TLS setup, read together.
pub fn read_all(files: &[Named]) -> Result<Vec<Vec<u8>>, TlsError> {
    files
        .iter()
        .map(|f| {
            std::fs::read(&f.path).map_err(|source| TlsError::Read {
                key: f.key.clone(),
                path: f.path.clone(),
                source,
            })
        })
        .collect()
}

/// What a loaded certificate is, for logs, `check-config` and the expiry metric.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    pub subject: String,
    /// The SAN names (URI and DNS).
    pub names: Vec<String>,
    pub not_after: String,
    /// `not_after` as seconds since the epoch.
    pub not_after_unix: i64,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.subject)?;
        if !self.names.is_empty() {
            write!(f, " ({})", self.names.join(", "))?;
        }
        write!(f, ", valid until {}", self.not_after)
    }
}

/// A certificate chain (leaf first), with its leaf checked against `now`.
pub fn chain(
    file: &Named,
    pem: &[u8],
    now: ASN1Time,
) -> Result<(Vec<CertificateDer<'static>>, Summary), TlsError> {
    let certs = certificates(file, pem)?;
    let summary = check_validity(file, &certs[0], now)?;
    Ok((certs, summary))
}

/// Every certificate of a PEM file (at least one).
pub fn certificates(file: &Named, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Invalid {
            key: file.key.clone(),
            path: file.path.clone(),
            what: format!("not a PEM certificate file: {e}"),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            key: file.key.clone(),
            path: file.path.clone(),
        });
    }
    Ok(certs)
}

/// The validity period of a certificate, against `now`.
pub fn check_validity(
    file: &Named,
    der: &CertificateDer<'_>,
    now: ASN1Time,
) -> Result<Summary, TlsError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| TlsError::Invalid {
        key: file.key.clone(),
        path: file.path.clone(),
        what: format!("not a valid X.509 certificate: {e}"),
    })?;
    let validity = cert.validity();
    let subject = cert.subject().to_string();
    let subject = if subject.is_empty() {
        "no subject".to_string()
    } else {
        subject
    };
    if now > validity.not_after {
        return Err(TlsError::Expired {
            key: file.key.clone(),
            path: file.path.clone(),
            subject,
            not_after: validity.not_after.to_string(),
            now: now.to_string(),
        });
    }
    if now < validity.not_before {
        return Err(TlsError::NotYetValid {
            key: file.key.clone(),
            path: file.path.clone(),
            subject,
            not_before: validity.not_before.to_string(),
            now: now.to_string(),
        });
    }
    let identity = super::ClientIdentity::from_parsed(&cert);
    Ok(Summary {
        subject,
        names: identity.names().map(str::to_string).collect(),
        not_after: validity.not_after.to_string(),
        not_after_unix: validity.not_after.timestamp(),
    })
}

/// The private key of a PEM file.
pub fn private_key(file: &Named, pem: &[u8]) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => TlsError::NoKey {
            key: file.key.clone(),
            path: file.path.clone(),
        },
        other => TlsError::Invalid {
            key: file.key.clone(),
            path: file.path.clone(),
            what: format!("not a PEM private key: {other}"),
        },
    })
}

/// A chain and its key as one signing identity, after checking that the key is the
/// certificate's.
pub fn certified_key(
    cert_file: &Named,
    chain: Vec<CertificateDer<'static>>,
    key_file: &Named,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<CertifiedKey>, TlsError> {
    let signer = super::provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| TlsError::Invalid {
            key: key_file.key.clone(),
            path: key_file.path.clone(),
            what: format!("unusable private key: {e}"),
        })?;
    let ck = CertifiedKey::new(chain, signer);
    match ck.keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {
            Ok(Arc::new(ck))
        }
        Err(_) => Err(TlsError::KeyMismatch {
            cert_key: cert_file.key.clone(),
            cert_path: cert_file.path.clone(),
            key_key: key_file.key.clone(),
            key_path: key_file.path.clone(),
        }),
    }
}

/// The certificates of a CA file as trust anchors. A bundle may hold an expired CA
/// next to its successor (a CA rotation); a file whose every CA has expired (or is
/// not valid yet) is refused.
pub fn roots(file: &Named, pem: &[u8], now: ASN1Time) -> Result<rustls::RootCertStore, TlsError> {
    let mut store = rustls::RootCertStore::empty();
    let certs = certificates(file, pem)?;
    let mut first_invalid = None;
    let any_valid = certs
        .iter()
        .fold(false, |ok, der| match check_validity(file, der, now) {
            Ok(_) => true,
            Err(e) => {
                first_invalid.get_or_insert(e);
                ok
            }
        });
    if let (false, Some(e)) = (any_valid, first_invalid) {
        return Err(e);
    }
    for der in certs {
        store.add(der).map_err(|e| TlsError::Invalid {
            key: file.key.clone(),
            path: file.path.clone(),
            what: format!("not a usable CA certificate: {e}"),
        })?;
    }
    Ok(store)
}

/// The system's trust anchors (the `ca-certificates` bundle on Debian).
pub fn system_roots(key: &str) -> Result<rustls::RootCertStore, TlsError> {
    let found = rustls_native_certs::load_native_certs();
    let mut store = rustls::RootCertStore::empty();
    let (added, _) = store.add_parsable_certificates(found.certs);
    if added == 0 {
        let why = found
            .errors
            .first()
            .map(|e| e.to_string())
            .unwrap_or_else(|| "none found".into());
        return Err(TlsError::Setup {
            key: key.into(),
            what: format!(
                "no CA file is set and the system's root certificates cannot be loaded ({why}); \
                 set the CA file, or install ca-certificates"
            ),
        });
    }
    Ok(store)
}
