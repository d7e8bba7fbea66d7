//! Test certificates, made at test time with rcgen (no key material is committed):
//! a CA, and server or client certificates it signs, written as PEM files.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};

/// A date: year, month, day.
pub type Ymd = (i32, u8, u8);

/// Midnight UTC of `day`, in Unix seconds.
pub fn unix_midnight(day: Ymd) -> i64 {
    rcgen::date_time_ymd(day.0, day.1, day.2).unix_timestamp()
}

/// A certificate authority that signs test certificates.
pub struct Ca {
    pub pem: String,
    pub der: rustls::pki_types::CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

/// A certificate and its key, as PEM.
pub struct Leaf {
    pub cert: String,
    pub key: String,
}

impl Ca {
    pub fn new(name: &str) -> Ca {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(DnType::CommonName, name);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().unwrap();
        let cert = p.self_signed(&key).unwrap();
        Ca {
            pem: cert.pem(),
            der: cert.der().clone(),
            issuer: Issuer::new(p, key),
        }
    }

    /// A server certificate for `localhost` and 127.0.0.1.
    pub fn server(&self) -> Leaf {
        self.leaf(
            vec![
                SanType::DnsName("localhost".try_into().unwrap()),
                SanType::IpAddress("127.0.0.1".parse().unwrap()),
            ],
            None,
        )
    }

    /// A server certificate for `localhost` and 127.0.0.1 that expires at midnight
    /// UTC of `not_after` (year, month, day): [`unix_midnight`] is the value the
    /// expiry gauge must show.
    pub fn server_until(&self, not_after: Ymd) -> Leaf {
        self.leaf(
            vec![
                SanType::DnsName("localhost".try_into().unwrap()),
                SanType::IpAddress("127.0.0.1".parse().unwrap()),
            ],
            Some(((2020, 1, 1), not_after)),
        )
    }

    /// A server certificate for the DNS name `name` only (not for the address it is
    /// reached at: a client must send `name` as SNI).
    pub fn server_named(&self, name: &str) -> Leaf {
        self.leaf(vec![SanType::DnsName(name.try_into().unwrap())], None)
    }

    /// A client certificate whose identity is the URI SAN `uri` (e.g. a SPIFFE ID).
    pub fn client(&self, uri: &str) -> Leaf {
        self.leaf(vec![SanType::URI(uri.try_into().unwrap())], None)
    }

    /// A server certificate that expired in 2020.
    pub fn expired_server(&self) -> Leaf {
        self.leaf(
            vec![SanType::DnsName("localhost".try_into().unwrap())],
            Some(((2019, 1, 1), (2020, 1, 1))),
        )
    }

    /// A leaf for `sans`, valid over `validity` (not before, not after) when given,
    /// else rcgen's default (from 1975 to 4096).
    fn leaf(&self, sans: Vec<SanType>, validity: Option<(Ymd, Ymd)>) -> Leaf {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name
            .push(DnType::CommonName, "pitboss test");
        p.subject_alt_names = sans;
        if let Some((not_before, not_after)) = validity {
            p.not_before = rcgen::date_time_ymd(not_before.0, not_before.1, not_before.2);
            p.not_after = rcgen::date_time_ymd(not_after.0, not_after.1, not_after.2);
        }
        let key = KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &self.issuer).unwrap().pem();
        Leaf {
            cert,
            key: key.serialize_pem(),
        }
    }

    /// Writes the CA's certificate to `dir/name`.
    pub fn write(&self, dir: &Path, name: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, &self.pem).unwrap();
        p
    }
}

impl Leaf {
    /// Writes `dir/<name>.crt` and `dir/<name>.key`, each replaced atomically (as
    /// cert-manager and Vault agents do).
    pub fn write(&self, dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let (c, k) = (
            dir.join(format!("{name}.crt")),
            dir.join(format!("{name}.key")),
        );
        for (path, text) in [(&k, &self.key), (&c, &self.cert)] {
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, text).unwrap();
            std::fs::rename(&tmp, path).unwrap();
        }
        (c, k)
    }

    /// The identity tonic's TLS client presents.
    pub fn identity(&self) -> tonic::transport::Identity {
        tonic::transport::Identity::from_pem(&self.cert, &self.key)
    }
}
