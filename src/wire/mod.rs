//! A transparent call as it travels: a client's call of one of its own gRPC methods
//! (`/package.Service/Method`, not `pitboss.v1.Bridge`), which pitboss serves without
//! decoding it (see `docs/MIGRATING.md`).
//!
//! The edge makes a [`WireCall`] of the client's request; the split routes it like any
//! other call; a `grpc_proxy` backend forwards it to the service it replaces and
//! brings back the answer's metadata ([`WireReply`]) or its status ([`WireStatus`]),
//! which the edge passes to the client unchanged. A pool backend runs it as a command
//! on the message's bytes.
//!
//! A leaf: the types and pure functions of the wire that the edge, the rollout and the
//! backends share, and no other layer of pitboss.

pub mod frame;

use std::sync::Arc;

use http::header::{self, HeaderMap, HeaderName};

/// The `content-type` of gRPC.
pub const GRPC_CONTENT_TYPE: &str = "application/grpc";

/// A transparent call: the method and what travels with its message.
#[derive(Debug, Clone)]
pub struct WireCall {
    /// The full method: `/package.Service/Method`.
    pub method: Arc<str>,
    /// The client's metadata that goes on to an upstream ([`forwarded_request`]).
    pub metadata: HeaderMap,
    /// The response message's type, when pitboss has the service's descriptors: shadow
    /// comparisons are then field by field, not byte by byte.
    pub output: Option<prost_reflect::MessageDescriptor>,
}

/// What an upstream sent around a successful answer, passed to the client unchanged:
/// its response headers (initial metadata) and its trailers.
#[derive(Debug, Clone, Default)]
pub struct WireReply {
    pub headers: HeaderMap,
    pub trailers: HeaderMap,
}

/// A status other than OK that an upstream answered, passed to the client unchanged:
/// code, message, `grpc-status-details-bin` and the service's own trailers.
#[derive(Debug, Clone)]
pub struct WireStatus {
    pub code: tonic::Code,
    /// `grpc-message`, decoded (for logs and errors; the client gets the header as sent).
    pub message: String,
    /// The response headers sent before the trailers; `None` for a trailers-only answer
    /// (the status in the response headers, which is what most failures are).
    pub headers: Option<HeaderMap>,
    /// The trailers: `grpc-status`, `grpc-message`, details and the service's own.
    pub trailers: HeaderMap,
}

impl std::fmt::Display for WireStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}: {}", self.code, self.message)
    }
}

/// Headers that belong to one connection, not to the call (RFC 9110 §7.6.1, and
/// HTTP/2 forbids them): never forwarded either way.
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Request headers pitboss sets itself when it forwards a call: the deadline left
/// (`grpc-timeout`), the body's framing and length, the upstream's authority, and
/// compression (pitboss neither sends nor accepts compressed messages, so it asks for
/// none).
const SET_BY_PITBOSS: [&str; 6] = [
    "host",
    "content-length",
    "content-type",
    "grpc-timeout",
    "grpc-encoding",
    "grpc-accept-encoding",
];

/// Response headers an upstream sends that pitboss does not pass on: the length of a
/// body pitboss frames again, and the compressions the upstream accepts (a client
/// would compress its next messages, which pitboss refuses).
const UPSTREAM_ONLY: [&str; 3] = ["content-length", "grpc-encoding", "grpc-accept-encoding"];

/// Whether `name` is dropped: hop-by-hop, in `also`, or named in `connection`.
fn dropped(headers: &HeaderMap, name: &HeaderName, also: &[&str]) -> bool {
    let n = name.as_str();
    if HOP_BY_HOP.contains(&n) || also.contains(&n) {
        return true;
    }
    headers.get_all(header::CONNECTION).iter().any(|v| {
        v.to_str()
            .unwrap_or("")
            .split(',')
            .any(|t| t.trim().eq_ignore_ascii_case(n))
    })
}

fn filtered(headers: &HeaderMap, also: &[&str]) -> HeaderMap {
    let mut out = HeaderMap::with_capacity(headers.len());
    for (name, value) in headers {
        if !dropped(headers, name, also) {
            out.append(name.clone(), value.clone());
        }
    }
    out
}

/// The client's request headers that go on to an upstream: its metadata, less the
/// hop-by-hop headers and the ones pitboss sets itself.
pub fn forwarded_request(headers: &HeaderMap) -> HeaderMap {
    filtered(headers, &SET_BY_PITBOSS)
}

/// An upstream's response headers or trailers as the client gets them: less the
/// hop-by-hop headers and what only concerns the hop to the upstream.
pub fn forwarded_response(headers: &HeaderMap) -> HeaderMap {
    filtered(headers, &UPSTREAM_ONLY)
}

/// The request headers of a call relayed whole (client-streaming or bidi, whose
/// messages pitboss does not read): only the hop-by-hop headers, the authority and
/// the length are dropped; its deadline and compression go on as the client sent them.
pub fn relayed_request(headers: &HeaderMap) -> HeaderMap {
    filtered(headers, &["host", "content-length"])
}

/// The response headers and trailers of a relayed call: as the upstream sent them,
/// less the hop-by-hop headers, the length, and the compressions it accepts (which
/// would let a client compress the messages of its next, unrelayed, calls).
pub fn relayed_response(headers: &HeaderMap) -> HeaderMap {
    filtered(headers, &["content-length", "grpc-accept-encoding"])
}

/// The gRPC status in a header map (trailers, or the headers of a trailers-only
/// answer): its code and its decoded message. `None` when there is no `grpc-status`.
pub fn status_in(headers: &HeaderMap) -> Option<(tonic::Code, String)> {
    let code = headers
        .get("grpc-status")?
        .to_str()
        .ok()?
        .trim()
        .parse::<i32>()
        .ok()?;
    let message = headers
        .get("grpc-message")
        .map(|v| percent_decode(v.as_bytes()))
        .unwrap_or_default();
    Some((tonic::Code::from_i32(code), message))
}

/// `grpc-message` is percent-encoded UTF-8 (the gRPC HTTP/2 spec); a bad escape is
/// kept as it stands.
pub fn percent_decode(raw: &[u8]) -> String {
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        if raw[i] == b'%' && i + 2 < raw.len() {
            if let (Some(h), Some(l)) = (hex(raw[i + 1]), hex(raw[i + 2])) {
                out.push(h << 4 | l);
                i += 3;
                continue;
            }
        }
        out.push(raw[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A `grpc-message` value: percent-encoded UTF-8, as the spec asks (everything
/// outside printable ASCII, and `%`).
pub fn percent_encode(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    for b in message.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The status gRPC gives an HTTP answer that is not gRPC's (a proxy's or a plain web
/// server's), per its HTTP-to-gRPC status mapping.
pub fn code_of_http_status(status: http::StatusCode) -> tonic::Code {
    match status.as_u16() {
        400 => tonic::Code::Internal,
        401 => tonic::Code::Unauthenticated,
        403 => tonic::Code::PermissionDenied,
        404 => tonic::Code::Unimplemented,
        429 | 502 | 503 | 504 => tonic::Code::Unavailable,
        _ => tonic::Code::Unknown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        m
    }

    #[test]
    fn metadata_goes_on_without_hop_by_hop_headers_or_what_pitboss_sets() {
        let client = map(&[
            ("content-type", "application/grpc"),
            ("te", "trailers"),
            ("grpc-timeout", "5S"),
            ("grpc-accept-encoding", "gzip"),
            ("user-agent", "grpc-python/1.70"),
            ("x-session-id", "k1"),
            ("x-tag", "a"),
            ("x-tag", "b"),
            ("authorization", "Bearer t"),
            ("trace-bin", "AAEC"),
            ("connection", "x-secret"),
            ("x-secret", "hop"),
        ]);
        let out = forwarded_request(&client);
        let names: Vec<&str> = out.keys().map(|k| k.as_str()).collect();
        assert_eq!(
            names,
            [
                "user-agent",
                "x-session-id",
                "x-tag",
                "authorization",
                "trace-bin"
            ]
        );
        assert_eq!(out.get_all("x-tag").iter().count(), 2, "repeated keys stay");
    }

    #[test]
    fn response_headers_keep_the_services_metadata() {
        let upstream = map(&[
            ("content-type", "application/grpc"),
            ("grpc-accept-encoding", "identity,deflate,gzip"),
            ("grpc-encoding", "identity"),
            ("x-served-by", "legacy-3"),
        ]);
        let out = forwarded_response(&upstream);
        let names: Vec<&str> = out.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["content-type", "x-served-by"]);
    }

    #[test]
    fn statuses_are_read_and_their_messages_decoded() {
        let t = map(&[
            ("grpc-status", "3"),
            ("grpc-message", "b%20must%20not%20be%200%20%E2%9C%97"),
        ]);
        assert_eq!(
            status_in(&t),
            Some((tonic::Code::InvalidArgument, "b must not be 0 ✗".into()))
        );
        assert_eq!(
            status_in(&map(&[("grpc-status", "0")])).unwrap().0,
            tonic::Code::Ok
        );
        assert_eq!(status_in(&map(&[("x", "y")])), None);
        assert_eq!(percent_decode(b"100%"), "100%");
        let text = "50% off: ✗\n";
        assert_eq!(percent_decode(percent_encode(text).as_bytes()), text);
        assert_eq!(percent_encode("a b"), "a b");
        assert_eq!(percent_decode(b"%zz%4"), "%zz%4");
        assert_eq!(
            code_of_http_status(http::StatusCode::NOT_FOUND),
            tonic::Code::Unimplemented
        );
        assert_eq!(
            code_of_http_status(http::StatusCode::BAD_GATEWAY),
            tonic::Code::Unavailable
        );
    }
}
