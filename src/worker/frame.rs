//! Length-prefixed frames between pitboss and a Python worker.
//!
//! The layout is documented in `docs/PROTOCOL.md`; `python/pitboss_worker/protocol.py`
//! is the other half. A fixed binary header (no JSON on the hot path) keeps the Python
//! side's per-request cost to one `struct.unpack_from`, and payloads travel as opaque
//! [`Bytes`] that are sliced, never copied or re-encoded, on the way in.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use tokio_util::codec::{Decoder, Encoder};

/// The protocol version this build speaks. A worker announcing another one is rejected.
pub const PROTOCOL_VERSION: u8 = 1;

/// Bytes after the 4-byte length prefix that every frame has: version, kind, flags, id.
pub const HEADER_LEN: usize = 12;

/// Default cap on one frame (header + body), shared with the worker via `--max-frame-bytes`.
pub const DEFAULT_MAX_FRAME_BYTES: usize = 16 * 1024 * 1024;

/// The message kinds of protocol version 1, with their wire values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    Ready = 1,
    Request = 2,
    Response = 3,
    Error = 4,
    StreamChunk = 5,
    StreamEnd = 6,
    Cancel = 7,
    Ping = 8,
    Pong = 9,
    SessionClose = 10,
    Shutdown = 11,
}

impl Kind {
    fn from_u8(v: u8) -> Option<Kind> {
        Some(match v {
            1 => Kind::Ready,
            2 => Kind::Request,
            3 => Kind::Response,
            4 => Kind::Error,
            5 => Kind::StreamChunk,
            6 => Kind::StreamEnd,
            7 => Kind::Cancel,
            8 => Kind::Ping,
            9 => Kind::Pong,
            10 => Kind::SessionClose,
            11 => Kind::Shutdown,
            _ => return None,
        })
    }
}

/// One command as the worker announces it in its `READY` handshake.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandInfo {
    pub name: String,
    #[serde(default)]
    pub streaming: bool,
    #[serde(default, rename = "async")]
    pub is_async: bool,
    #[serde(default)]
    pub doc: String,
}

/// The body of the `READY` handshake.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadyInfo {
    pub protocol: u32,
    pub pid: u32,
    #[serde(default)]
    pub adapter: String,
    pub commands: Vec<CommandInfo>,
    #[serde(default)]
    pub python: String,
    /// The `pitboss_worker` version (`__version__`); empty from runtimes before it
    /// was announced.
    #[serde(default)]
    pub runtime: String,
    /// Compatible additions to the protocol the runtime knows (0 when not announced).
    #[serde(default)]
    pub revision: u32,
}

/// The body of an `ERROR` frame: what went wrong inside the worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// `exception`, `invalid_request`, `unknown_command`, `cancelled`, `bad_request` or
    /// `response_too_large`.
    pub kind: String,
    #[serde(default, rename = "type")]
    pub error_type: String,
    #[serde(default)]
    pub message: String,
    #[serde(default)]
    pub traceback: String,
}

/// A request as it travels to the worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestFrame {
    pub id: u64,
    pub command: String,
    /// Empty means "no session".
    pub session_id: String,
    pub content_type: String,
    /// Milliseconds left before the deadline when sent; 0 means none.
    pub timeout_ms: u32,
    /// Who the call is (its request id and trace) and which try this is: sent as the
    /// context block (flag [`FLAG_CONTEXT`]) to a runtime of revision 2 or later, so
    /// the adapter's `Request` and its log lines carry them.
    pub context: Option<RequestContext>,
    pub payload: Bytes,
}

/// `REQUEST` flag: a context block follows the request's strings.
pub const FLAG_CONTEXT: u16 = 0x0001;

/// The runtime revision (READY's `revision`) from which a worker reads context blocks.
pub const CONTEXT_REVISION: u32 = 2;

/// The ids a call keeps across its tries and backends: made once at the edge and
/// shared (an `Arc`), so a retry or a shadow copy costs no allocation.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CallIds {
    /// The client's `x-request-id`, else one pitboss made (returned to the client).
    pub request_id: String,
    /// The client's W3C `traceparent`, when it sent a well-formed one.
    pub traceparent: Option<String>,
    /// The client's W3C `tracestate`, kept only with a `traceparent`.
    pub tracestate: Option<String>,
}

/// Longest `x-request-id` kept (longer ones are cut, on a character boundary).
pub const MAX_REQUEST_ID_CHARS: usize = 64;
/// Longest `tracestate` kept (the W3C limit is 512 characters); a longer one is dropped.
pub const MAX_TRACESTATE_BYTES: usize = 512;

impl CallIds {
    /// The ids of a call from what the client sent: its `x-request-id` (cut to
    /// [`MAX_REQUEST_ID_CHARS`]) or `made` when it sent none (or an empty one); its
    /// `traceparent` when well formed (else dropped: a malformed one would poison
    /// every trace downstream), and `tracestate` with it.
    pub fn from_client(
        request_id: Option<&str>,
        traceparent: Option<&str>,
        tracestate: Option<&str>,
        made: impl FnOnce() -> String,
    ) -> CallIds {
        let request_id = match request_id.map(str::trim).filter(|s| !s.is_empty()) {
            Some(s) => s.chars().take(MAX_REQUEST_ID_CHARS).collect(),
            None => made(),
        };
        let traceparent = traceparent
            .map(str::trim)
            .filter(|t| valid_traceparent(t))
            .map(str::to_string);
        let tracestate = traceparent
            .as_ref()
            .and(tracestate)
            .map(str::trim)
            .filter(|t| !t.is_empty() && t.len() <= MAX_TRACESTATE_BYTES)
            .map(str::to_string);
        CallIds {
            request_id,
            traceparent,
            tracestate,
        }
    }
}

/// Whether `t` is a W3C `traceparent` this build understands: `version-traceid-
/// parentid-flags` in lowercase hex (2-32-16-2), the version not `ff`, the trace and
/// parent ids not all zeros. A later version may append fields after the flags.
pub fn valid_traceparent(t: &str) -> bool {
    let hex = |s: &str, n: usize| {
        s.len() == n
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    let mut parts = t.split('-');
    let (Some(version), Some(trace), Some(parent), Some(flags)) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    let rest_ok = version != "00" || parts.next().is_none();
    hex(version, 2)
        && version != "ff"
        && hex(trace, 32)
        && trace.bytes().any(|b| b != b'0')
        && hex(parent, 16)
        && parent.bytes().any(|b| b != b'0')
        && hex(flags, 2)
        && rest_ok
        && t.len() <= 256
}

/// Which backend a try runs on, as the context block's `backend` byte says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(u8)]
pub enum ContextBackend {
    #[default]
    Unknown = 0,
    Legacy = 1,
    New = 2,
}

/// The context block of one try: the call's ids, the attempt (1 for the first try)
/// and the backend it runs on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestContext {
    pub ids: std::sync::Arc<CallIds>,
    pub attempt: u32,
    pub backend: ContextBackend,
}

impl RequestContext {
    /// Bytes the block takes after the request's strings (its length field included).
    pub fn encoded_len(&self) -> usize {
        CONTEXT_HEAD_LEN
            + self.ids.request_id.len()
            + self.ids.traceparent.as_deref().map_or(0, str::len)
            + self.ids.tracestate.as_deref().map_or(0, str::len)
    }
}

/// The fixed part of a context block: context_len (u16: the bytes after it), attempt
/// (u8), backend (u8), then the lengths (u16) of request id, traceparent, tracestate.
pub const CONTEXT_HEAD_LEN: usize = 10;

/// Every message of protocol version 1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Ready(ReadyInfo),
    Request(RequestFrame),
    Response {
        id: u64,
        content_type: String,
        payload: Bytes,
    },
    Error {
        id: u64,
        body: ErrorBody,
    },
    StreamChunk {
        id: u64,
        content_type: String,
        payload: Bytes,
    },
    StreamEnd {
        id: u64,
    },
    Cancel {
        id: u64,
    },
    Ping {
        seq: u64,
    },
    Pong {
        seq: u64,
    },
    SessionClose {
        session_id: String,
    },
    Shutdown,
}

impl Frame {
    pub fn kind(&self) -> Kind {
        match self {
            Frame::Ready(_) => Kind::Ready,
            Frame::Request(_) => Kind::Request,
            Frame::Response { .. } => Kind::Response,
            Frame::Error { .. } => Kind::Error,
            Frame::StreamChunk { .. } => Kind::StreamChunk,
            Frame::StreamEnd { .. } => Kind::StreamEnd,
            Frame::Cancel { .. } => Kind::Cancel,
            Frame::Ping { .. } => Kind::Ping,
            Frame::Pong { .. } => Kind::Pong,
            Frame::SessionClose { .. } => Kind::SessionClose,
            Frame::Shutdown => Kind::Shutdown,
        }
    }

    pub(crate) fn request_id(&self) -> u64 {
        match self {
            Frame::Request(r) => r.id,
            Frame::Response { id, .. }
            | Frame::Error { id, .. }
            | Frame::StreamChunk { id, .. }
            | Frame::StreamEnd { id }
            | Frame::Cancel { id } => *id,
            Frame::Ping { seq } | Frame::Pong { seq } => *seq,
            Frame::Ready(_) | Frame::SessionClose { .. } | Frame::Shutdown => 0,
        }
    }
}

/// Why bytes from the peer are not a valid frame. Any of these from a worker is a
/// protocol violation: the worker is replaced, never trusted again.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {len} bytes exceeds the maximum of {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error("frame of {len} bytes is shorter than the {HEADER_LEN}-byte header")]
    TooShort { len: usize },
    #[error("unsupported protocol version {0} (this pitboss speaks {PROTOCOL_VERSION})")]
    Version(u8),
    #[error("unknown message kind {0}")]
    UnknownKind(u8),
    #[error("non-zero reserved flags {0:#06x}")]
    Flags(u16),
    #[error("malformed {kind:?} body: {detail}")]
    Body {
        kind: Kind,
        #[source]
        detail: BodyError,
    },
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}

/// What is wrong inside a frame's body (the [`FrameError::Body`] names the kind).
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("{what} header needs {needs} bytes, got {got}")]
    ShortHeader {
        what: &'static str,
        needs: usize,
        got: usize,
    },
    #[error("{what} needs {needs} bytes but only {remain} remain")]
    Truncated {
        what: &'static str,
        needs: usize,
        remain: usize,
    },
    #[error("{what} is not valid UTF-8")]
    NotUtf8 { what: &'static str },
    #[error("{what} is {len} bytes, the limit is 65535")]
    TooLong { what: &'static str, len: usize },
    #[error("expected an empty body, got {0} bytes")]
    NotEmpty(usize),
    #[error(transparent)]
    Json(#[from] serde_json::Error),
}

/// Encoder and decoder for both directions (tests use it to play the worker side).
#[derive(Debug, Clone)]
pub struct FrameCodec {
    max_frame_bytes: usize,
}

impl FrameCodec {
    pub fn new(max_frame_bytes: usize) -> Self {
        FrameCodec { max_frame_bytes }
    }

    pub fn max_frame_bytes(&self) -> usize {
        self.max_frame_bytes
    }
}

impl Default for FrameCodec {
    fn default() -> Self {
        FrameCodec::new(DEFAULT_MAX_FRAME_BYTES)
    }
}

impl Decoder for FrameCodec {
    type Item = Frame;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        if src.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([src[0], src[1], src[2], src[3]]) as usize;
        // Reject before buffering: an announced 4 GiB frame must not make us wait for it.
        if len > self.max_frame_bytes {
            return Err(FrameError::TooLarge {
                len,
                max: self.max_frame_bytes,
            });
        }
        if len < HEADER_LEN {
            return Err(FrameError::TooShort { len });
        }
        if src.len() < 4 + len {
            src.reserve(4 + len - src.len());
            return Ok(None);
        }
        src.advance(4);
        let frame = src.split_to(len).freeze();
        decode_frame(frame).map(Some)
    }
}

/// Decodes one frame without its length prefix.
pub fn decode_frame(mut buf: Bytes) -> Result<Frame, FrameError> {
    if buf.len() < HEADER_LEN {
        return Err(FrameError::TooShort { len: buf.len() });
    }
    let version = buf.get_u8();
    if version != PROTOCOL_VERSION {
        return Err(FrameError::Version(version));
    }
    let raw_kind = buf.get_u8();
    let kind = Kind::from_u8(raw_kind).ok_or(FrameError::UnknownKind(raw_kind))?;
    let flags = buf.get_u16();
    if flags != 0 && !(kind == Kind::Request && flags == FLAG_CONTEXT) {
        return Err(FrameError::Flags(flags));
    }
    let id = buf.get_u64();
    let body = buf;
    let malformed = |detail: BodyError| FrameError::Body { kind, detail };
    let empty = |body: &Bytes| {
        if body.is_empty() {
            Ok(())
        } else {
            Err(malformed(BodyError::NotEmpty(body.len())))
        }
    };
    Ok(match kind {
        Kind::Ready => {
            let info: ReadyInfo = serde_json::from_slice(&body).map_err(|e| malformed(e.into()))?;
            Frame::Ready(info)
        }
        Kind::Request => Frame::Request(decode_request(id, body, flags).map_err(malformed)?),
        Kind::Response | Kind::StreamChunk => {
            let (content_type, payload) = decode_payload_body(body).map_err(malformed)?;
            if kind == Kind::Response {
                Frame::Response {
                    id,
                    content_type,
                    payload,
                }
            } else {
                Frame::StreamChunk {
                    id,
                    content_type,
                    payload,
                }
            }
        }
        Kind::Error => {
            let body: ErrorBody = serde_json::from_slice(&body).map_err(|e| malformed(e.into()))?;
            Frame::Error { id, body }
        }
        Kind::StreamEnd => {
            empty(&body)?;
            Frame::StreamEnd { id }
        }
        Kind::Cancel => {
            empty(&body)?;
            Frame::Cancel { id }
        }
        Kind::Ping => {
            empty(&body)?;
            Frame::Ping { seq: id }
        }
        Kind::Pong => {
            empty(&body)?;
            Frame::Pong { seq: id }
        }
        Kind::SessionClose => Frame::SessionClose {
            session_id: utf8(body.to_vec(), "session id").map_err(malformed)?,
        },
        Kind::Shutdown => {
            empty(&body)?;
            Frame::Shutdown
        }
    })
}

fn utf8(bytes: Vec<u8>, what: &'static str) -> Result<String, BodyError> {
    String::from_utf8(bytes).map_err(|_| BodyError::NotUtf8 { what })
}

fn take_str(body: &mut Bytes, len: usize, what: &'static str) -> Result<String, BodyError> {
    if body.len() < len {
        return Err(BodyError::Truncated {
            what,
            needs: len,
            remain: body.len(),
        });
    }
    utf8(body.split_to(len).to_vec(), what)
}

fn decode_request(id: u64, mut body: Bytes, flags: u16) -> Result<RequestFrame, BodyError> {
    if body.len() < 10 {
        return Err(BodyError::ShortHeader {
            what: "request",
            needs: 10,
            got: body.len(),
        });
    }
    let command_len = body.get_u16() as usize;
    let session_len = body.get_u16() as usize;
    let ctype_len = body.get_u16() as usize;
    let timeout_ms = body.get_u32();
    let command = take_str(&mut body, command_len, "command")?;
    let session_id = take_str(&mut body, session_len, "session id")?;
    let content_type = take_str(&mut body, ctype_len, "content type")?;
    let context = if flags & FLAG_CONTEXT != 0 {
        Some(decode_context(&mut body)?)
    } else {
        None
    };
    Ok(RequestFrame {
        id,
        command,
        session_id,
        content_type,
        timeout_ms,
        context,
        payload: body,
    })
}

fn decode_context(body: &mut Bytes) -> Result<RequestContext, BodyError> {
    if body.len() < CONTEXT_HEAD_LEN {
        return Err(BodyError::ShortHeader {
            what: "request context",
            needs: CONTEXT_HEAD_LEN,
            got: body.len(),
        });
    }
    let block_len = body.get_u16() as usize;
    if body.len() < block_len || block_len < CONTEXT_HEAD_LEN - 2 {
        return Err(BodyError::Truncated {
            what: "request context",
            needs: block_len,
            remain: body.len(),
        });
    }
    let mut block = body.split_to(block_len);
    let attempt = u32::from(block.get_u8());
    let backend = match block.get_u8() {
        1 => ContextBackend::Legacy,
        2 => ContextBackend::New,
        _ => ContextBackend::Unknown,
    };
    let (rlen, plen, tlen) = (
        block.get_u16() as usize,
        block.get_u16() as usize,
        block.get_u16() as usize,
    );
    let request_id = take_str(&mut block, rlen, "request id")?;
    let traceparent = take_str(&mut block, plen, "traceparent")?;
    let tracestate = take_str(&mut block, tlen, "tracestate")?;
    // Whatever a later revision appends to the block is skipped with it.
    Ok(RequestContext {
        ids: std::sync::Arc::new(CallIds {
            request_id,
            traceparent: (!traceparent.is_empty()).then_some(traceparent),
            tracestate: (!tracestate.is_empty()).then_some(tracestate),
        }),
        attempt,
        backend,
    })
}

fn decode_payload_body(mut body: Bytes) -> Result<(String, Bytes), BodyError> {
    if body.len() < 2 {
        return Err(BodyError::ShortHeader {
            what: "payload",
            needs: 2,
            got: body.len(),
        });
    }
    let ctype_len = body.get_u16() as usize;
    let content_type = take_str(&mut body, ctype_len, "content type")?;
    Ok((content_type, body))
}

/// The size of a `REQUEST` frame with these fields, as checked against the frame limit
/// (everything after the 4-byte length prefix), so that a request too large for the
/// worker is refused before one is chosen.
pub fn request_frame_len(
    command: &str,
    session_id: &str,
    content_type: &str,
    context: Option<&RequestContext>,
    payload_len: usize,
) -> usize {
    HEADER_LEN
        + 10
        + command.len()
        + session_id.len()
        + content_type.len()
        + context.map_or(0, RequestContext::encoded_len)
        + payload_len
}

fn short_len(s: &str, what: &'static str) -> Result<u16, FrameError> {
    u16::try_from(s.len()).map_err(|_| FrameError::Body {
        kind: Kind::Request,
        detail: BodyError::TooLong { what, len: s.len() },
    })
}

impl Encoder<Frame> for FrameCodec {
    type Error = FrameError;

    fn encode(&mut self, frame: Frame, dst: &mut BytesMut) -> Result<(), FrameError> {
        self.encode(&frame, dst)
    }
}

impl Encoder<&Frame> for FrameCodec {
    type Error = FrameError;

    /// Appends `frame` to `dst`; on an error `dst` is left as it was (it may be a
    /// buffer shared with other frames).
    fn encode(&mut self, frame: &Frame, dst: &mut BytesMut) -> Result<(), FrameError> {
        let start = dst.len();
        let encoded = self.encode_at(frame, dst, start);
        if encoded.is_err() {
            dst.truncate(start);
        }
        encoded
    }
}

impl FrameCodec {
    fn encode_at(&self, frame: &Frame, dst: &mut BytesMut, start: usize) -> Result<(), FrameError> {
        dst.put_u32(0); // length, patched below
        dst.put_u8(PROTOCOL_VERSION);
        dst.put_u8(frame.kind() as u8);
        let flags = match frame {
            Frame::Request(RequestFrame {
                context: Some(_), ..
            }) => FLAG_CONTEXT,
            _ => 0,
        };
        dst.put_u16(flags);
        dst.put_u64(frame.request_id());
        match frame {
            Frame::Ready(info) => put_json(info, dst),
            Frame::Request(r) => {
                dst.put_u16(short_len(&r.command, "command")?);
                dst.put_u16(short_len(&r.session_id, "session id")?);
                dst.put_u16(short_len(&r.content_type, "content type")?);
                dst.put_u32(r.timeout_ms);
                dst.put_slice(r.command.as_bytes());
                dst.put_slice(r.session_id.as_bytes());
                dst.put_slice(r.content_type.as_bytes());
                if let Some(c) = &r.context {
                    put_context(c, dst)?;
                }
                dst.put_slice(&r.payload);
            }
            Frame::Response {
                content_type,
                payload,
                ..
            }
            | Frame::StreamChunk {
                content_type,
                payload,
                ..
            } => {
                dst.put_u16(short_len(content_type, "content type")?);
                dst.put_slice(content_type.as_bytes());
                dst.put_slice(payload);
            }
            Frame::Error { body, .. } => put_json(body, dst),
            Frame::SessionClose { session_id } => dst.put_slice(session_id.as_bytes()),
            Frame::StreamEnd { .. }
            | Frame::Cancel { .. }
            | Frame::Ping { .. }
            | Frame::Pong { .. }
            | Frame::Shutdown => {}
        }
        let len = dst.len() - start - 4;
        if len > self.max_frame_bytes {
            return Err(FrameError::TooLarge {
                len,
                max: self.max_frame_bytes,
            });
        }
        dst[start..start + 4].copy_from_slice(&(len as u32).to_be_bytes());
        Ok(())
    }
}

/// Writes a context block (see [`CONTEXT_HEAD_LEN`]). The attempt saturates at 255.
fn put_context(c: &RequestContext, dst: &mut BytesMut) -> Result<(), FrameError> {
    let ids = &c.ids;
    let traceparent = ids.traceparent.as_deref().unwrap_or("");
    let tracestate = ids.tracestate.as_deref().unwrap_or("");
    let block_len = c.encoded_len() - 2;
    dst.put_u16(u16::try_from(block_len).map_err(|_| FrameError::Body {
        kind: Kind::Request,
        detail: BodyError::TooLong {
            what: "request context",
            len: block_len,
        },
    })?);
    dst.put_u8(c.attempt.min(255) as u8);
    dst.put_u8(c.backend as u8);
    dst.put_u16(short_len(&ids.request_id, "request id")?);
    dst.put_u16(short_len(traceparent, "traceparent")?);
    dst.put_u16(short_len(tracestate, "tracestate")?);
    dst.put_slice(ids.request_id.as_bytes());
    dst.put_slice(traceparent.as_bytes());
    dst.put_slice(tracestate.as_bytes());
    Ok(())
}

/// Writes a JSON body (the rare `READY` and `ERROR` frames).
fn put_json<T: Serialize>(value: &T, dst: &mut BytesMut) {
    // Serialising plain structs of strings and numbers into memory cannot fail.
    let _ = serde_json::to_writer(dst.writer(), value);
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::{SinkExt, StreamExt};
    use tokio_util::codec::{FramedRead, FramedWrite};

    /// A frame that fails to encode leaves a shared buffer as it was: before, a field
    /// over 64 KiB left a half-written header behind, which the next write would have
    /// sent to the worker.
    #[test]
    fn a_failed_encode_leaves_the_buffer_as_it_was() {
        let mut codec = FrameCodec::default();
        let mut buf = BytesMut::new();
        codec.encode(&Frame::Ping { seq: 1 }, &mut buf).unwrap();
        let before = buf.clone();
        let frame = Frame::Request(RequestFrame {
            id: 2,
            command: "echo".into(),
            session_id: String::new(),
            content_type: "x".repeat(70_000),
            timeout_ms: 0,
            context: None,
            payload: Bytes::new(),
        });
        assert!(codec.encode(&frame, &mut buf).is_err());
        assert_eq!(buf, before);
    }

    fn samples() -> Vec<Frame> {
        vec![
            Frame::Ready(ReadyInfo {
                protocol: 1,
                pid: 42,
                adapter: "demo".into(),
                commands: vec![CommandInfo {
                    name: "echo".into(),
                    streaming: false,
                    is_async: true,
                    doc: "d".into(),
                }],
                python: "3.11".into(),
                runtime: "0.1.0".into(),
                revision: 2,
            }),
            Frame::Request(RequestFrame {
                id: 7,
                command: "echo".into(),
                session_id: "s-1".into(),
                content_type: "application/json".into(),
                timeout_ms: 1500,
                context: None,
                payload: Bytes::from_static(b"{\"a\":1}"),
            }),
            Frame::Response {
                id: 7,
                content_type: "application/octet-stream".into(),
                payload: Bytes::from(vec![0u8, 255, 1, 2]),
            },
            Frame::Error {
                id: 9,
                body: ErrorBody {
                    kind: "exception".into(),
                    error_type: "ValueError".into(),
                    message: "bad".into(),
                    traceback: "tb".into(),
                },
            },
            Frame::StreamChunk {
                id: 3,
                content_type: "text/plain".into(),
                payload: Bytes::from_static(b"chunk"),
            },
            Frame::StreamEnd { id: 3 },
            Frame::Cancel { id: 11 },
            Frame::Ping { seq: 5 },
            Frame::Pong { seq: 5 },
            Frame::SessionClose {
                session_id: "abc".into(),
            },
            Frame::Shutdown,
        ]
    }

    #[tokio::test]
    async fn every_kind_round_trips_over_a_duplex_pipe() {
        let (a, b) = tokio::io::duplex(64);
        let mut writer = FramedWrite::new(a, FrameCodec::default());
        let mut reader = FramedRead::new(b, FrameCodec::default());
        let frames = samples();
        let sent = frames.clone();
        let send = tokio::spawn(async move {
            for f in sent {
                writer.send(f).await.unwrap();
            }
        });
        for expected in frames {
            let got = reader.next().await.unwrap().unwrap();
            assert_eq!(got, expected);
        }
        send.await.unwrap();
    }

    #[test]
    fn header_layout_matches_the_protocol_document() {
        let mut buf = BytesMut::new();
        Encoder::<&Frame>::encode(
            &mut FrameCodec::default(),
            &Frame::Cancel { id: 0x0102 },
            &mut buf,
        )
        .unwrap();
        assert_eq!(&buf[..], &[0, 0, 0, 12, 1, 7, 0, 0, 0, 0, 0, 0, 0, 0, 1, 2]);
    }

    #[test]
    fn partial_input_waits_for_more() {
        let mut buf = BytesMut::new();
        Encoder::<&Frame>::encode(&mut FrameCodec::default(), &samples()[1], &mut buf).unwrap();
        let full = buf.clone();
        let mut codec = FrameCodec::default();
        for cut in 0..full.len() {
            let mut part = BytesMut::from(&full[..cut]);
            assert!(codec.decode(&mut part).unwrap().is_none(), "cut at {cut}");
        }
    }

    #[test]
    fn oversized_frames_are_rejected_before_buffering() {
        let mut codec = FrameCodec::new(1024);
        let mut buf = BytesMut::from(&[0x7f, 0xff, 0xff, 0xff][..]);
        assert!(matches!(
            codec.decode(&mut buf),
            Err(FrameError::TooLarge { max: 1024, .. })
        ));
    }

    #[test]
    fn encoding_past_the_limit_fails_and_leaves_the_buffer_clean() {
        let mut codec = FrameCodec::new(64);
        let mut buf = BytesMut::from(&b"keep"[..]);
        let frame = Frame::Response {
            id: 1,
            content_type: String::new(),
            payload: Bytes::from(vec![0u8; 100]),
        };
        assert!(matches!(
            codec.encode(&frame, &mut buf),
            Err(FrameError::TooLarge { .. })
        ));
        assert_eq!(&buf[..], b"keep");
    }

    #[test]
    fn request_frame_len_is_the_encoded_length() {
        let frame = Frame::Request(RequestFrame {
            id: 9,
            command: "echo".into(),
            session_id: "s-1".into(),
            content_type: "application/json".into(),
            timeout_ms: 5,
            context: None,
            payload: Bytes::from(vec![7u8; 333]),
        });
        let mut buf = BytesMut::new();
        FrameCodec::default().encode(&frame, &mut buf).unwrap();
        assert_eq!(
            request_frame_len("echo", "s-1", "application/json", None, 333),
            buf.len() - 4
        );
    }

    fn raw(version: u8, kind: u8, flags: u16, body: &[u8]) -> BytesMut {
        let mut b = BytesMut::new();
        b.put_u32((HEADER_LEN + body.len()) as u32);
        b.put_u8(version);
        b.put_u8(kind);
        b.put_u16(flags);
        b.put_u64(1);
        b.put_slice(body);
        b
    }

    #[test]
    fn malformed_frames_are_rejected_with_a_reason() {
        let mut c = FrameCodec::default();
        assert!(matches!(
            c.decode(&mut raw(99, 3, 0, b"")),
            Err(FrameError::Version(99))
        ));
        assert!(matches!(
            c.decode(&mut raw(1, 200, 0, b"")),
            Err(FrameError::UnknownKind(200))
        ));
        assert!(matches!(
            c.decode(&mut raw(1, 3, 1, b"\0\0")),
            Err(FrameError::Flags(1))
        ));
        // content type length points past the end of the body
        assert!(matches!(
            c.decode(&mut raw(1, 3, 0, b"\0\x09ab")),
            Err(FrameError::Body { .. })
        ));
        assert!(matches!(
            c.decode(&mut raw(1, 4, 0, b"not json")),
            Err(FrameError::Body { .. })
        ));
        assert!(matches!(
            c.decode(&mut raw(1, 6, 0, b"x")),
            Err(FrameError::Body { .. })
        ));
        let mut short = BytesMut::from(&[0u8, 0, 0, 3, 1, 2, 3][..]);
        assert!(matches!(
            c.decode(&mut short),
            Err(FrameError::TooShort { len: 3 })
        ));
        assert!(matches!(
            c.decode(&mut raw(1, 10, 0, &[0xff, 0xfe])),
            Err(FrameError::Body { .. })
        ));
    }

    fn context(attempt: u32, tp: Option<&str>, ts: Option<&str>) -> RequestContext {
        RequestContext {
            ids: std::sync::Arc::new(CallIds {
                request_id: "req-7".into(),
                traceparent: tp.map(str::to_string),
                tracestate: ts.map(str::to_string),
            }),
            attempt,
            backend: ContextBackend::New,
        }
    }

    /// A request with a context block sets the flag, and decodes to the same frame;
    /// its length is what `request_frame_len` predicts.
    #[test]
    fn a_context_block_round_trips() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        for ctx in [
            context(1, Some(tp), Some("congo=t61rcWkgMzE")),
            context(3, None, None),
            context(300, Some(tp), None),
        ] {
            let frame = Frame::Request(RequestFrame {
                id: 9,
                command: "echo".into(),
                session_id: "s".into(),
                content_type: "application/json".into(),
                timeout_ms: 50,
                context: Some(ctx.clone()),
                payload: Bytes::from_static(b"{}"),
            });
            let mut buf = BytesMut::new();
            FrameCodec::default().encode(&frame, &mut buf).unwrap();
            assert_eq!(u16::from_be_bytes([buf[6], buf[7]]), FLAG_CONTEXT);
            assert_eq!(
                buf.len() - 4,
                request_frame_len("echo", "s", "application/json", Some(&ctx), 2)
            );
            let Some(Frame::Request(back)) = FrameCodec::default().decode(&mut buf).unwrap() else {
                panic!("not a request");
            };
            let mut want = ctx;
            want.attempt = want.attempt.min(255);
            assert_eq!(back.context, Some(want));
            assert_eq!(&back.payload[..], b"{}");
        }
    }

    /// The flag is allowed on a REQUEST only; a worker's frame with it is refused.
    #[test]
    fn the_context_flag_is_refused_on_other_kinds() {
        let mut buf = BytesMut::new();
        FrameCodec::default()
            .encode(&Frame::Pong { seq: 1 }, &mut buf)
            .unwrap();
        buf[7] = FLAG_CONTEXT as u8;
        assert!(matches!(
            FrameCodec::default().decode(&mut buf),
            Err(FrameError::Flags(1))
        ));
    }

    #[test]
    fn traceparents_are_checked_as_w3c_says() {
        let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert!(valid_traceparent(good));
        assert!(valid_traceparent(
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-later"
        ));
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
        ] {
            assert!(!valid_traceparent(bad), "{bad:?}");
        }
    }

    #[test]
    fn call_ids_keep_what_the_client_sent_and_make_the_rest() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let ids = CallIds::from_client(Some("abc"), Some(tp), Some("k=v"), || "made".into());
        assert_eq!(ids.request_id, "abc");
        assert_eq!(ids.traceparent.as_deref(), Some(tp));
        assert_eq!(ids.tracestate.as_deref(), Some("k=v"));
        let ids = CallIds::from_client(Some("  "), Some("garbage"), Some("k=v"), || "made".into());
        assert_eq!(ids.request_id, "made", "an empty id is none");
        assert_eq!(ids.traceparent, None, "a malformed traceparent is dropped");
        assert_eq!(ids.tracestate, None, "no tracestate without a traceparent");
        let long = "é".repeat(100);
        let ids = CallIds::from_client(Some(&long), None, None, || unreachable!());
        assert_eq!(ids.request_id.chars().count(), MAX_REQUEST_ID_CHARS);
        let ids = CallIds::from_client(None, Some(tp), Some(&"x".repeat(513)), || "m".into());
        assert_eq!(ids.tracestate, None, "over the W3C limit");
    }
}
