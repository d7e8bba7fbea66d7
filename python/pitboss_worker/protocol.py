# mypy: allow-untyped-defs, allow-untyped-calls, allow-incomplete-defs
# The wire code is internal (not part of the adapter API that mypy --strict checks);
# only what adapter.py calls into is annotated.
"""Wire format of the pitboss worker protocol, version 1 (see docs/PROTOCOL.md).

Every frame is a 16-byte header, ``struct ">IBBHQ"`` (length, version, kind, flags,
request_id), followed by ``length - 12`` bytes of kind-specific body. This module is
standard library only and has no side effects on import; both the worker runtime and
the tests (which play the host) use it.
"""

import struct

#: The protocol's version: the ``version`` byte of every frame and ``protocol`` in
#: READY. pitboss refuses a worker of another version at READY.
PROTOCOL_VERSION = 1
#: Compatible additions to version 1, announced as ``revision`` in READY. 2: a REQUEST
#: may carry a context block (flag :data:`FLAG_CONTEXT`). pitboss sends what the
#: worker's revision knows, so old runtimes keep working with a newer pitboss.
PROTOCOL_REVISION = 2

#: REQUEST flag: a context block follows the request's strings (see
#: :data:`CONTEXT_HEAD`). The only flag; every other bit must be 0.
FLAG_CONTEXT = 0x0001

#: Bytes after the 4-byte length prefix that every frame has.
HEADER_LEN = 12
#: Default cap on ``length`` (header + body), as on the host.
DEFAULT_MAX_FRAME_BYTES = 16 * 1024 * 1024

# Message kinds.
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
    READY: "READY",
    REQUEST: "REQUEST",
    RESPONSE: "RESPONSE",
    ERROR: "ERROR",
    STREAM_CHUNK: "STREAM_CHUNK",
    STREAM_END: "STREAM_END",
    CANCEL: "CANCEL",
    PING: "PING",
    PONG: "PONG",
    SESSION_CLOSE: "SESSION_CLOSE",
    SHUTDOWN: "SHUTDOWN",
}

#: Kinds the host sends to a worker.
HOST_KINDS = frozenset((REQUEST, CANCEL, PING, SESSION_CLOSE, SHUTDOWN))
#: Kinds a worker sends to the host.
WORKER_KINDS = frozenset((READY, RESPONSE, ERROR, STREAM_CHUNK, STREAM_END, PONG))
#: Kinds whose body must be empty.
EMPTY_BODY_KINDS = frozenset((STREAM_END, CANCEL, PING, PONG, SHUTDOWN))

#: length, version, kind, flags, request_id (16 bytes).
HEADER = struct.Struct(">IBBHQ")
#: The ``length`` field alone: the 4 bytes that tell how long a frame is.
LENGTH_PREFIX = struct.Struct(">I")
#: command_len, session_id_len, content_type_len, timeout_ms (10 bytes).
REQUEST_HEAD = struct.Struct(">HHHI")
#: content_type_len, at the start of a RESPONSE or STREAM_CHUNK body.
PAYLOAD_HEAD = struct.Struct(">H")
#: The context block of a REQUEST with :data:`FLAG_CONTEXT`, after its strings:
#: context_len (bytes after this field), attempt, backend (0 unknown, 1 legacy,
#: 2 new), request_id_len, traceparent_len, tracestate_len; then the three strings,
#: then whatever a later revision adds (skipped: context_len says where it ends).
CONTEXT_HEAD = struct.Struct(">HBBHHH")
CONTEXT_HEAD_LEN = CONTEXT_HEAD.size  # 10
#: The same fields without context_len: the start of the block
#: :func:`decode_request_at` returns.
CONTEXT_FIELDS = struct.Struct(">BBHHH")
#: The ``backend`` byte of a context block.
BACKENDS = (None, "legacy", "new")
#: The frame header followed by a payload body's content_type_len (18 bytes): a
#: RESPONSE or STREAM_CHUNK header in one ``pack`` (the runtime's fast path).
PAYLOAD_FRAME_HEADER = struct.Struct(">IBBHQH")

#: Sizes of the fixed parts, in bytes.
PREFIX_LEN = LENGTH_PREFIX.size  # 4
FRAME_HEADER_LEN = HEADER.size  # 16: the prefix and the HEADER_LEN bytes after it
REQUEST_HEAD_LEN = REQUEST_HEAD.size  # 10
PAYLOAD_HEAD_LEN = PAYLOAD_HEAD.size  # 2
#: Longest string a u16 length can describe (command, session id, content type).
MAX_STRING_BYTES = 0xFFFF

assert FRAME_HEADER_LEN == PREFIX_LEN + HEADER_LEN

_HEADER_PACK = HEADER.pack
_PAYLOAD_PACK = PAYLOAD_FRAME_HEADER.pack
_HEADER_UNPACK_FROM = HEADER.unpack_from
_LENGTH_UNPACK_FROM = LENGTH_PREFIX.unpack_from
_REQUEST_HEAD_UNPACK_FROM = REQUEST_HEAD.unpack_from
_PAYLOAD_HEAD_UNPACK_FROM = PAYLOAD_HEAD.unpack_from
_CONTEXT_HEAD_UNPACK_FROM = CONTEXT_HEAD.unpack_from
_CONTEXT_FIELDS_UNPACK_FROM = CONTEXT_FIELDS.unpack_from


class ProtocolError(Exception):
    """Bytes that are not a valid frame (or a frame that is not allowed here)."""


# --------------------------------------------------------------------------- encoding


def encode(kind, request_id=0, body=b""):
    """One whole frame (length prefix included) with ``body`` as is."""
    return _HEADER_PACK(HEADER_LEN + len(body), PROTOCOL_VERSION, kind, 0, request_id) + body


def encode_payload(kind, request_id, content_type, payload):
    """A ``RESPONSE`` or ``STREAM_CHUNK`` frame. ``content_type`` is str or bytes."""
    if type(content_type) is not bytes:
        content_type = content_type.encode("utf-8")
    return (
        _PAYLOAD_PACK(
            HEADER_LEN + PAYLOAD_HEAD_LEN + len(content_type) + len(payload),
            PROTOCOL_VERSION,
            kind,
            0,
            request_id,
            len(content_type),
        )
        + content_type
        + payload
    )


def encode_context(request_id="", traceparent=None, tracestate=None, attempt=1, backend=None):
    """A REQUEST's context block (:data:`CONTEXT_HEAD` and its strings)."""
    r = request_id.encode("utf-8")
    p = (traceparent or "").encode("utf-8")
    t = (tracestate or "").encode("utf-8")
    for what, value in (("request id", r), ("traceparent", p), ("tracestate", t)):
        if len(value) > MAX_STRING_BYTES:
            raise ValueError(
                "%s is %d bytes, the limit is %d" % (what, len(value), MAX_STRING_BYTES)
            )
    strings = r + p + t
    head = CONTEXT_HEAD.pack(
        CONTEXT_HEAD_LEN - 2 + len(strings),
        min(max(attempt, 0), 255),
        BACKENDS.index(backend),
        len(r),
        len(p),
        len(t),
    )
    return head + strings


def encode_request(request_id, command, session_id, content_type, timeout_ms, payload, context=None):
    """A ``REQUEST`` frame (the host's side; used by tests and tools).

    ``session_id`` may be None (no session), ``payload`` any bytes-like object,
    ``context`` a block from :func:`encode_context` (sets :data:`FLAG_CONTEXT`).
    """
    c = command.encode("utf-8")
    s = (session_id or "").encode("utf-8")
    t = content_type.encode("utf-8")
    for what, value in (("command", c), ("session id", s), ("content type", t)):
        if len(value) > MAX_STRING_BYTES:
            raise ValueError(
                "%s is %d bytes, the limit is %d" % (what, len(value), MAX_STRING_BYTES)
            )
    head = REQUEST_HEAD.pack(len(c), len(s), len(t), timeout_ms) + c + s + t
    if context is None:
        return encode(REQUEST, request_id, head + bytes(payload))
    body = head + context + bytes(payload)
    return _HEADER_PACK(HEADER_LEN + len(body), PROTOCOL_VERSION, REQUEST, FLAG_CONTEXT, request_id) + body


# --------------------------------------------------------------------------- decoding


def split_frames(data, offset, max_frame_bytes):
    """Finds the complete frames in ``data[offset:]``.

    Returns ``(frames, new_offset)`` where each frame is a tuple
    ``(kind, request_id, body_start, body_end, flags)`` indexing into ``data`` and
    ``new_offset`` is where the first incomplete frame (if any) starts. Raises
    :class:`ProtocolError` for a length out of bounds (checked as soon as the 4-byte
    prefix is there, before waiting for the rest), a wrong version, or flags other
    than :data:`FLAG_CONTEXT` on a REQUEST. Kinds are not checked: which kinds are
    allowed depends on the direction.
    """
    n = len(data)
    frames = []  # type: list[tuple[int, int, int, int, int]]
    append = frames.append
    while n - offset >= PREFIX_LEN:
        length = _LENGTH_UNPACK_FROM(data, offset)[0]
        if length > max_frame_bytes:
            raise ProtocolError(
                "frame of %d bytes exceeds the maximum of %d bytes" % (length, max_frame_bytes)
            )
        if length < HEADER_LEN:
            raise ProtocolError(
                "frame of %d bytes is shorter than the %d-byte header" % (length, HEADER_LEN)
            )
        end = offset + PREFIX_LEN + length
        if end > n:
            break
        _, version, kind, flags, request_id = _HEADER_UNPACK_FROM(data, offset)
        if version != PROTOCOL_VERSION:
            raise ProtocolError(
                "unsupported protocol version %d (this worker speaks %d)"
                % (version, PROTOCOL_VERSION)
            )
        if flags and (flags != FLAG_CONTEXT or kind != REQUEST):
            raise ProtocolError("non-zero reserved flags 0x%04x" % flags)
        append((kind, request_id, offset + FRAME_HEADER_LEN, end, flags))
        offset = end
    return frames, offset


def decode_request_at(data, start, end, flags=0):
    """Decodes the REQUEST body ``data[start:end]`` in place, without copying it.

    Returns ``(command, session_id, content_type, timeout_ms, payload_start,
    context)``: the payload is ``data[payload_start:end]``; ``context`` is the context
    block's bytes after its length field (decode it with :func:`decode_context`), or
    None without :data:`FLAG_CONTEXT`. ``session_id`` is None when empty (no session).
    ``data`` is ``bytes`` or ``bytearray``. This is the runtime's fast path (one call
    per request, on the buffer the frames were read into) and the one implementation
    of the REQUEST layout; :func:`decode_request` wraps it.
    """
    if end - start < REQUEST_HEAD_LEN:
        raise ProtocolError(
            "request header needs %d bytes, got %d" % (REQUEST_HEAD_LEN, end - start)
        )
    clen, slen, tlen, timeout_ms = _REQUEST_HEAD_UNPACK_FROM(data, start)
    a = start + REQUEST_HEAD_LEN + clen
    b = a + slen
    c = b + tlen
    if c > end:
        raise ProtocolError(
            "request strings need %d bytes but the body has %d" % (c - start, end - start)
        )
    try:
        command = data[start + REQUEST_HEAD_LEN : a].decode("utf-8")
        session_id = data[a:b].decode("utf-8") if slen else None
        content_type = data[b:c].decode("utf-8") if tlen else ""
    except UnicodeDecodeError as e:
        raise ProtocolError("request string is not valid UTF-8: %s" % e)
    if not flags:
        return command, session_id, content_type, timeout_ms, c, None
    if c + CONTEXT_HEAD_LEN > end:
        raise ProtocolError("request context needs %d bytes, got %d" % (CONTEXT_HEAD_LEN, end - c))
    clen, _, backend, rlen, plen, tlen = _CONTEXT_HEAD_UNPACK_FROM(data, c)
    payload_start = c + 2 + clen
    if CONTEXT_HEAD_LEN - 2 + rlen + plen + tlen > clen or payload_start > end or backend > 2:
        raise ProtocolError("malformed request context (%d bytes announced, %d remain)" % (clen, end - c - 2))
    return command, session_id, content_type, timeout_ms, payload_start, bytes(data[c + 2 : payload_start])


def decode_context(block: bytes) -> "tuple[str, str | None, str | None, int, str | None]":
    """``(request_id, traceparent, tracestate, attempt, backend)`` of a context block
    as :func:`decode_request_at` returns it (checked there). Strings are decoded with
    replacement characters, never an error; absent ones are "" / None."""
    attempt, backend, rlen, plen, tlen = _CONTEXT_FIELDS_UNPACK_FROM(block, 0)
    a = 8 + rlen
    b = a + plen
    return (
        block[8:a].decode("utf-8", "replace"),
        block[a:b].decode("utf-8", "replace") if plen else None,
        block[b : b + tlen].decode("utf-8", "replace") if tlen else None,
        attempt,
        BACKENDS[backend],
    )


def decode_request(body):
    """``(command, session_id, content_type, timeout_ms, payload)`` of a REQUEST body.

    ``session_id`` is None when empty (no session). ``body`` is bytes-like; ``payload``
    is returned as ``bytes``.
    """
    if type(body) is not bytes:
        body = bytes(body)
    command, session_id, content_type, timeout_ms, c, _ = decode_request_at(body, 0, len(body))
    return command, session_id, content_type, timeout_ms, body[c:]


def decode_request_with_context(body, flags):
    """:func:`decode_request`'s fields, then the decoded context
    (:func:`decode_context`) or None."""
    if type(body) is not bytes:
        body = bytes(body)
    command, session_id, content_type, timeout_ms, c, ctx = decode_request_at(body, 0, len(body), flags)
    context = decode_context(ctx) if ctx is not None else None
    return command, session_id, content_type, timeout_ms, body[c:], context


def decode_payload(body):
    """``(content_type, payload)`` of a RESPONSE or STREAM_CHUNK body."""
    if len(body) < PAYLOAD_HEAD_LEN:
        raise ProtocolError(
            "payload header needs %d bytes, got %d" % (PAYLOAD_HEAD_LEN, len(body))
        )
    tlen = _PAYLOAD_HEAD_UNPACK_FROM(body, 0)[0]
    start = PAYLOAD_HEAD_LEN + tlen
    if start > len(body):
        raise ProtocolError(
            "content type needs %d bytes but only %d remain"
            % (tlen, len(body) - PAYLOAD_HEAD_LEN)
        )
    try:
        content_type = bytes(body[PAYLOAD_HEAD_LEN:start]).decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError("content type is not valid UTF-8")
    return content_type, bytes(body[start:])


class Frame(object):
    """A decoded frame, for tests and tools (the runtime does not allocate these)."""

    __slots__ = ("kind", "request_id", "body", "flags")

    def __init__(self, kind, request_id, body, flags=0):
        self.kind = kind
        self.request_id = request_id
        self.body = body
        self.flags = flags

    @property
    def name(self):
        return KIND_NAMES.get(self.kind, "kind %d" % self.kind)

    def json(self):
        import json

        return json.loads(self.body.decode("utf-8"))

    def payload(self):
        """``(content_type, payload)`` of a RESPONSE or STREAM_CHUNK."""
        return decode_payload(self.body)

    def __repr__(self):
        body = self.body if len(self.body) <= 64 else self.body[:64] + b"..."
        return "Frame(%s, id=%d, %r)" % (self.name, self.request_id, body)


class FrameDecoder(object):
    """Incremental decoder: :meth:`feed` bytes, get back whole :class:`Frame` objects.

    Validates the header, the kind (``allowed_kinds``) and the bodies of the kinds with
    a fixed shape (empty bodies, payload bodies, REQUEST bodies, UTF-8 session ids).
    """

    def __init__(self, max_frame_bytes=DEFAULT_MAX_FRAME_BYTES, allowed_kinds=None):
        self.max_frame_bytes = max_frame_bytes
        self.allowed_kinds = allowed_kinds
        self._buf = bytearray()

    def feed(self, data):
        self._buf += data
        found, offset = split_frames(self._buf, 0, self.max_frame_bytes)
        frames = []
        for kind, rid, start, end, flags in found:
            frame = Frame(kind, rid, bytes(self._buf[start:end]), flags)
            check_frame(frame, self.allowed_kinds)
            frames.append(frame)
        del self._buf[:offset]
        return frames

    @property
    def pending(self):
        """Bytes received that do not yet make a whole frame."""
        return len(self._buf)


class FrameReader(object):
    """Incremental splitter: :meth:`feed` bytes, get back ``(kind, request_id, body)``
    tuples for the complete frames. Checks the header only (see :func:`split_frames`)."""

    def __init__(self, max_frame_bytes=DEFAULT_MAX_FRAME_BYTES):
        self.max_frame_bytes = max_frame_bytes
        self._buf = bytearray()

    def feed(self, data):
        buf = self._buf
        buf += data
        found, offset = split_frames(buf, 0, self.max_frame_bytes)
        frames = [(kind, rid, bytes(buf[start:end])) for kind, rid, start, end, _ in found]
        if offset:
            del buf[:offset]
        return frames


def check_frame(frame, allowed_kinds=None):
    """Raises :class:`ProtocolError` if a decoded frame's kind or body is invalid."""
    kind = frame.kind
    if kind not in KIND_NAMES:
        raise ProtocolError("unknown message kind %d" % kind)
    if allowed_kinds is not None and kind not in allowed_kinds:
        raise ProtocolError("unexpected %s frame" % KIND_NAMES[kind])
    body = frame.body
    if kind in EMPTY_BODY_KINDS:
        if body:
            raise ProtocolError(
                "malformed %s body: expected an empty body, got %d bytes"
                % (KIND_NAMES[kind], len(body))
            )
    elif kind == REQUEST:
        decode_request_with_context(body, frame.flags)
    elif kind in (RESPONSE, STREAM_CHUNK):
        decode_payload(body)
    elif kind == SESSION_CLOSE:
        try:
            body.decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError("malformed SESSION_CLOSE body: session id is not valid UTF-8")
    elif kind in (READY, ERROR):
        import json

        try:
            value = json.loads(body.decode("utf-8"))
        except ValueError as e:
            raise ProtocolError("malformed %s body: %s" % (KIND_NAMES[kind], e))
        if not isinstance(value, dict):
            raise ProtocolError("malformed %s body: not a JSON object" % KIND_NAMES[kind])
