//! How the command line reaches a pitboss listener (Admin for `rollout` and `status`,
//! the Bridge for `call`, `health` and `bench load`): plaintext for an `http://`
//! address, TLS for an `https://` one, with a client certificate for mTLS.
//!
//! The TLS side is the library's own upstream client ([`pitboss::tls::UpstreamTls`],
//! the one `https://` backends use): the same rustls stack, TLS 1.2+ only, the same
//! checks of the files (readable, a certificate in the file, not expired, the key
//! matching), so that the command line and the server agree on what is valid.

use std::path::PathBuf;

use pitboss::tls::{Named, UpstreamTls};
use tonic::transport::{Channel, Endpoint};

/// The TLS options of every client subcommand.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct TlsArgs {
    /// For an https:// address: the CA certificate (PEM) that signed the listener's
    /// certificate (its `ca.crt`). Default: the system's root certificates.
    #[arg(long, global = true, value_name = "FILE")]
    pub ca: Option<PathBuf>,
    /// For mTLS: this client's certificate (PEM, leaf first); its SAN URI or DNS
    /// name is the identity the listener's allowlists check (with `[tls.admin]`
    /// allow_read / allow_write it replaces the admin token).
    #[arg(long, global = true, value_name = "FILE", requires = "key")]
    pub cert: Option<PathBuf>,
    /// For mTLS: the private key of --cert (PEM: PKCS#8, PKCS#1 or SEC1).
    #[arg(long, global = true, value_name = "FILE", requires = "cert")]
    pub key: Option<PathBuf>,
    /// The name to send as SNI and to check in the listener's certificate, when the
    /// address is an IP or a name the certificate does not carry (e.g. `localhost`
    /// for `https://127.0.0.1:50052`).
    #[arg(long, global = true, value_name = "NAME")]
    pub tls_server_name: Option<String>,
}

impl TlsArgs {
    /// The flags given, by name (they only make sense with `https://`).
    fn given(&self) -> Vec<&'static str> {
        [
            ("--ca", self.ca.is_some()),
            ("--cert", self.cert.is_some()),
            ("--key", self.key.is_some()),
            ("--tls-server-name", self.tls_server_name.is_some()),
        ]
        .into_iter()
        .filter_map(|(name, set)| set.then_some(name))
        .collect()
    }

    /// The library's client settings for `addr`.
    fn upstream(&self, addr: &str) -> Result<UpstreamTls, String> {
        UpstreamTls::new(
            "the command line's TLS".into(),
            addr,
            self.ca.clone().map(|p| Named::new("--ca", p)),
            self.cert
                .clone()
                .map(|p| Named::new("--cert", p))
                .zip(self.key.clone().map(|p| Named::new("--key", p))),
            self.tls_server_name.as_deref().unwrap_or(""),
            "",
        )
        .map_err(|e| e.to_string())
    }
}

/// A channel to `addr`, connected now: plaintext for `http://`, TLS for `https://`.
/// `what` names the listener in errors ("the admin listener").
pub async fn channel(addr: &str, tls: &TlsArgs, what: &str) -> Result<Channel, String> {
    if addr.starts_with("https://") {
        let upstream = tls.upstream(addr)?;
        // The files are read and checked first: an unreadable or expired file is
        // named as such, not as a connection failure.
        upstream.load().map_err(|e| e.to_string())?;
        return upstream
            .connect(addr)
            .await
            .map_err(|e| explain(&format!("cannot connect to {what} {addr} over TLS"), &e));
    }
    let given = tls.given();
    if !given.is_empty() {
        return Err(format!(
            "{} {} for TLS, but the address {addr} is plaintext: use https://{}",
            given.join(", "),
            if given.len() == 1 { "is" } else { "are" },
            addr.strip_prefix("http://").unwrap_or(addr)
        ));
    }
    Endpoint::from_shared(addr.to_string())
        .map_err(|e| format!("bad address {addr}: {e}"))?
        .tcp_nodelay(true)
        .connect()
        .await
        .map_err(|e| explain(&format!("cannot connect to {what} {addr}"), &e))
}

/// `context`, the error and its causes (tonic's own message is only "transport
/// error"; the cause is where the TLS alert is), and a hint for the usual mistakes.
fn explain(context: &str, e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = next {
        let text = err.to_string();
        // Wrappers often repeat their cause in their own message.
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        next = err.source();
    }
    let mut out = format!("{context}: {}", parts.join(": "));
    if let Some(h) = hint(&out) {
        out.push_str(&format!(" ({h})"));
    }
    out
}

/// What to try, for the failures whose cause is a usual mistake.
pub fn hint(message: &str) -> Option<&'static str> {
    let m = message.to_ascii_lowercase();
    if m.contains("unknownissuer") || m.contains("unknown issuer") {
        Some("the listener's certificate is not signed by --ca (or, without --ca, by a system root): pass the CA that signed it")
    } else if m.contains("notvalidforname") || m.contains("not valid for name") {
        Some("the listener's certificate does not carry this host name: pass --tls-server-name with a name it carries")
    } else if m.contains("certificaterequired") || m.contains("certificate required") {
        Some("the listener requires a client certificate (mTLS): pass --cert and --key")
    } else if m.contains("corrupt message") || m.contains("invalidcontenttype") {
        Some("the listener does not speak TLS: use an http:// address")
    } else if m.contains("unknownca") || m.contains("unknown ca") || m.contains("bad certificate") {
        Some("the listener does not accept this client certificate: is it signed by the listener's client_ca_file?")
    } else {
        None
    }
}

/// A gRPC refusal as the command line prints it: the canonical code name
/// (`PERMISSION_DENIED`), the server's message, and what it means for the usual
/// refusals of who may call what.
pub fn show_status(s: &tonic::Status) -> String {
    let name = code_name(s.code());
    let mut out = format!("{name}: {}", s.message());
    // A connection the server closed (a refused client certificate shows only after
    // the TLS 1.3 handshake, on the first call) carries its cause.
    if let Some(cause) = std::error::Error::source(s) {
        out = explain(&out, cause);
    }
    match s.code() {
        tonic::Code::PermissionDenied => out.push_str(
            "\n  (the listener refused this caller: with [tls.admin] allow_read / allow_write, \
             the client certificate's identity (--cert) decides, not the token)",
        ),
        tonic::Code::Unauthenticated => out.push_str(
            "\n  (pass the admin token with --token or $PITBOSS_ADMIN_TOKEN, or use an mTLS \
             identity the listener lists)",
        ),
        _ => {}
    }
    out
}

/// A failed call to `addr`, as [`show_status`] prints it, with what to check when
/// the connection itself broke: a plaintext client on a TLS port sees only a broken
/// HTTP/2 connection; a client certificate refused after a TLS 1.3 handshake shows
/// only as a closed connection on the first call.
pub fn call_failed(addr: &str, s: &tonic::Status) -> String {
    let mut out = show_status(s);
    let broken = matches!(
        s.code(),
        tonic::Code::Unknown
            | tonic::Code::Internal
            | tonic::Code::Unavailable
            | tonic::Code::Cancelled
    );
    if broken && hint(&out).is_none() {
        if addr.starts_with("https://") {
            out.push_str(
                "\n  (the listener closed the connection: if it requires a client certificate \
                 (mTLS), pass --cert and --key, signed by its client_ca_file)",
            );
        } else {
            out.push_str(
                "\n  (if the listener has TLS ([tls.admin] or [tls.bridge]), use an https:// \
                 address and --ca)",
            );
        }
    }
    out
}

/// `PermissionDenied` as gRPC names it: `PERMISSION_DENIED`.
pub fn code_name(code: tonic::Code) -> String {
    let mut out = String::new();
    for (i, c) in format!("{code:?}").chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_read_as_grpc_names_them() {
        assert_eq!(
            code_name(tonic::Code::PermissionDenied),
            "PERMISSION_DENIED"
        );
        assert_eq!(code_name(tonic::Code::Ok), "OK");
        assert_eq!(
            code_name(tonic::Code::DeadlineExceeded),
            "DEADLINE_EXCEEDED"
        );
    }

    #[test]
    fn the_usual_tls_mistakes_get_a_hint() {
        let h = |m: &str| hint(m).unwrap_or("");
        assert!(h("invalid peer certificate: UnknownIssuer").contains("--ca"));
        assert!(h("received fatal alert: CertificateRequired").contains("--cert"));
        assert!(h("invalid peer certificate: NotValidForName").contains("--tls-server-name"));
        assert!(hint("connection refused").is_none());
    }

    #[test]
    fn a_broken_connection_says_what_to_check() {
        let closed = tonic::Status::cancelled("operation was canceled");
        assert!(call_failed("https://h:1", &closed).contains("--cert and --key"));
        assert!(call_failed("http://h:1", &closed).contains("use an https://"));
        let denied = tonic::Status::permission_denied("no");
        assert!(!call_failed("https://h:1", &denied).contains("--cert and --key"));
    }

    #[test]
    fn tls_flags_with_a_plaintext_address_are_an_error() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let tls = TlsArgs {
            ca: Some("ca.pem".into()),
            ..Default::default()
        };
        let e = rt
            .block_on(channel("http://127.0.0.1:1", &tls, "the admin listener"))
            .unwrap_err();
        assert!(e.contains("--ca is for TLS"), "{e}");
        assert!(e.contains("https://127.0.0.1:1"), "{e}");
    }

    #[test]
    fn an_unreadable_file_is_named_by_its_flag() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let tls = TlsArgs {
            ca: Some("/nonexistent/ca.pem".into()),
            ..Default::default()
        };
        let e = rt
            .block_on(channel("https://127.0.0.1:1", &tls, "the admin listener"))
            .unwrap_err();
        assert!(e.contains("--ca = /nonexistent/ca.pem: cannot read"), "{e}");
    }
}
