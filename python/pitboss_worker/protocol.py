"""The pitboss worker protocol, version 1 (see docs/PROTOCOL.md).

Every frame is a 4-byte big-endian length, then a fixed 12-byte header
(version, kind, flags, request id), then a kind-specific body. The header is read with
one ``struct.unpack_from``: no JSON on the hot path, and payloads stay opaque bytes.
"""

import struct

PROTOCOL_VERSION = 1

READY = 1
REQUEST = 2
RESPONSE = 3
ERROR = 4
STREAM_CHUNK = 5
STREAM_END = 6
CANCEL = 7
PING = 8
PONG = 9
SESSION_CLOSE = 10
SHUTDOWN = 11

KIND_NAMES = {
    READY: "READY", REQUEST: "REQUEST", RESPONSE: "RESPONSE", ERROR: "ERROR",
    STREAM_CHUNK: "STREAM_CHUNK", STREAM_END: "STREAM_END", CANCEL: "CANCEL",
    PING: "PING", PONG: "PONG", SESSION_CLOSE: "SESSION_CLOSE", SHUTDOWN: "SHUTDOWN",
}

# length, version, kind, flags, request id
HEADER = struct.Struct(">IBBHQ")
HEADER_LEN = 12  # bytes counted by `length`: everything after the length field
REQUEST_HEAD = struct.Struct(">HHHI")  # command, session id, content type lengths; timeout ms
PAYLOAD_HEAD = struct.Struct(">H")  # content type length

DEFAULT_MAX_FRAME_BYTES = 16 * 1024 * 1024


class ProtocolError(Exception):
    """Bytes from the peer that are not a valid frame."""


def encode(kind, request_id, body=b""):
    """One frame as bytes."""
    return HEADER.pack(HEADER_LEN + len(body), PROTOCOL_VERSION, kind, 0, request_id) + body


def encode_payload(kind, request_id, content_type, payload):
    """A RESPONSE or STREAM_CHUNK frame."""
    ct = content_type.encode("utf-8")
    body_len = PAYLOAD_HEAD.size + len(ct) + len(payload)
    return b"".join((
        HEADER.pack(HEADER_LEN + body_len, PROTOCOL_VERSION, kind, 0, request_id),
        PAYLOAD_HEAD.pack(len(ct)), ct, payload,
    ))


def encode_request(request_id, command, session_id, content_type, timeout_ms, payload):
    """A REQUEST frame (the host's side; used by tests and tools)."""
    c = command.encode("utf-8")
    s = (session_id or "").encode("utf-8")
    t = content_type.encode("utf-8")
    body = REQUEST_HEAD.pack(len(c), len(s), len(t), timeout_ms) + c + s + t + payload
    return encode(REQUEST, request_id, body)


def decode_request(body):
    """(command, session_id or None, content_type, timeout_ms, payload) of a REQUEST."""
    if len(body) < REQUEST_HEAD.size:
        raise ProtocolError("request body shorter than its header")
    clen, slen, tlen, timeout_ms = REQUEST_HEAD.unpack_from(body, 0)
    pos = REQUEST_HEAD.size
    end = pos + clen + slen + tlen
    if end > len(body):
        raise ProtocolError("request string lengths run past the body")
    try:
        command = body[pos:pos + clen].decode("utf-8")
        session_id = body[pos + clen:pos + clen + slen].decode("utf-8") or None
        content_type = body[pos + clen + slen:end].decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError("request strings are not valid UTF-8")
    return command, session_id, content_type, timeout_ms, body[end:]


def decode_payload(body):
    """(content_type, payload) of a RESPONSE or STREAM_CHUNK."""
    if len(body) < PAYLOAD_HEAD.size:
        raise ProtocolError("payload body shorter than its header")
    (tlen,) = PAYLOAD_HEAD.unpack_from(body, 0)
    end = PAYLOAD_HEAD.size + tlen
    if end > len(body):
        raise ProtocolError("content type runs past the body")
    return body[PAYLOAD_HEAD.size:end].decode("utf-8"), body[end:]


class FrameReader:
    """Splits a byte stream into frames; feed it whatever ``os.read`` returned."""

    def __init__(self, max_frame_bytes=DEFAULT_MAX_FRAME_BYTES):
        self.max_frame_bytes = max_frame_bytes
        self._buf = bytearray()

    def feed(self, data):
        """Returns the complete frames as (kind, request_id, body) tuples."""
        buf = self._buf
        buf += data
        frames = []
        pos = 0
        n = len(buf)
        unpack = HEADER.unpack_from
        while n - pos >= 16:
            length, version, kind, flags, rid = unpack(buf, pos)
            if length > self.max_frame_bytes:
                raise ProtocolError("frame of %d bytes exceeds the maximum of %d" % (length, self.max_frame_bytes))
            if length < HEADER_LEN:
                raise ProtocolError("frame of %d bytes is shorter than the header" % length)
            if version != PROTOCOL_VERSION:
                raise ProtocolError("unsupported protocol version %d" % version)
            if flags != 0:
                raise ProtocolError("non-zero reserved flags")
            end = pos + 4 + length
            if end > n:
                break
            frames.append((kind, rid, bytes(buf[pos + 16:end])))
            pos = end
        if pos:
            del buf[:pos]
        return frames
