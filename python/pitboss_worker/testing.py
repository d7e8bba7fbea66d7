"""Test an adapter without pitboss: call its commands in-process, as pitboss would.

:class:`AdapterTester` runs the real worker runtime (the same code that serves
pitboss) on a pair of pipes inside the test's own process, and plays pitboss's side
of the protocol. So a command gets the same :class:`~pitboss_worker.Request` (payload,
content type, session state, deadline, request id, trace context, attempt, backend),
its result is encoded the same way (bytes, str, :class:`~pitboss_worker.Response` or
JSON), a streaming command's chunks come back one by one, an async command runs on
the runtime's event loop, cancellation reaches ``req.cancelled`` and async tasks, and
an exception becomes the same error pitboss would turn into a gRPC status. Works with
``unittest`` and pytest alike; standard library only::

    from pitboss_worker.testing import AdapterTester, CommandError
    from myadapter import adapter

    def test_echo():
        with AdapterTester(adapter) as t:
            assert t.call("echo", b"hi").payload == b"hi"
            assert t.call("add", {"a": 1, "b": 2}).json() == {"sum": 3}
            chunks = t.stream("count", {"n": 3})
            assert [c.json() for c in chunks] == [{"i": 0}, {"i": 1}, {"i": 2}]
            try:
                t.call("add", b"not json")
            except CommandError as e:
                assert e.kind == "invalid_request"  # INVALID_ARGUMENT through pitboss
"""

from __future__ import annotations

import importlib
import json
import os
import queue
import threading
from typing import Any, Dict, Iterator, List, Optional, Union

from .adapter import Adapter

# The wire code, the runtime and its loader are internal (unannotated, outside the
# typed API that mypy --strict checks): imported by name, so type checkers stop here.
P: Any = importlib.import_module(__package__ + ".protocol")

__all__ = ["AdapterTester", "Call", "CommandError", "Reply"]

#: What a call's payload may be given as: bytes as they are, a str as UTF-8, anything
#: else as JSON (with content type ``application/json``).
Payload = Union[bytes, bytearray, memoryview, str, Any]

_JSON = "application/json"
#: How long a call waits for its reply by default, in seconds (a test's safety net,
#: not a deadline the command sees: pass ``timeout=`` for that).
DEFAULT_WAIT = 30.0


class CommandError(Exception):
    """The command did not answer: the ``ERROR`` reply pitboss would have received.

    ``kind`` says how pitboss maps it (docs/ERRORS.md): ``"exception"`` (the command
    raised; UNKNOWN with ErrorInfo, counted against the backend), ``"invalid_request"``
    (it raised :class:`~pitboss_worker.InvalidRequest`; INVALID_ARGUMENT),
    ``"unknown_command"`` (NOT_FOUND), ``"cancelled"``, ``"response_too_large"``.
    ``type`` is the exception's class name, ``message`` its text, ``traceback`` the
    formatted traceback.
    """

    def __init__(self, command: str, kind: str, type: str, message: str, traceback: str) -> None:
        super().__init__("%s failed (%s): %s%s" % (command, kind, type + ": " if type else "", message))
        self.command = command
        self.kind = kind
        self.type = type
        self.message = message
        self.traceback = traceback


class Reply(object):
    """One reply (or one chunk of a stream): its payload and content type."""

    __slots__ = ("payload", "content_type")

    def __init__(self, payload: bytes, content_type: str) -> None:
        self.payload = payload
        self.content_type = content_type

    def json(self) -> Any:
        """The payload decoded as JSON."""
        return json.loads(self.payload.decode("utf-8"))

    def text(self) -> str:
        """The payload decoded as UTF-8."""
        return self.payload.decode("utf-8")

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Reply)
            and other.payload == self.payload
            and other.content_type == self.content_type
        )

    def __repr__(self) -> str:
        return "Reply(%r, content_type=%r)" % (self.payload[:64], self.content_type)


class Call(object):
    """A call that has been sent: wait for its reply, read its chunks, or cancel it."""

    def __init__(self, tester: "AdapterTester", frame_id: int, command: str) -> None:
        self._tester = tester
        self.frame_id = frame_id
        self.command = command
        self._frames: "queue.Queue[Any]" = queue.Queue()

    def cancel(self) -> None:
        """Sends ``CANCEL``, as pitboss does when the client goes away or the deadline
        passes: ``req.cancelled`` becomes True and an async command's task is
        cancelled. The call then ends with :class:`CommandError` of kind
        ``"cancelled"`` (or with its reply, if it was already finishing)."""
        self._tester._send(P.encode(P.CANCEL, self.frame_id))

    def _next(self, wait: float) -> Optional[Reply]:
        """The next chunk or reply; None at the end of a stream."""
        try:
            frame = self._frames.get(timeout=wait)
        except queue.Empty:
            raise TimeoutError("%s: no reply within %.1f s" % (self.command, wait)) from None
        if frame.kind in (P.RESPONSE, P.STREAM_CHUNK):
            content_type, payload = P.decode_payload(frame.body)
            return Reply(bytes(payload), content_type)
        if frame.kind == P.STREAM_END:
            return None
        if frame.kind == P.ERROR:
            e = json.loads(frame.body.decode("utf-8"))
            raise CommandError(
                self.command,
                e.get("kind", ""),
                e.get("type", ""),
                e.get("message", ""),
                e.get("traceback", ""),
            )
        raise AssertionError("unexpected %s frame for %s" % (P.KIND_NAMES[frame.kind], self.command))

    def result(self, wait: float = DEFAULT_WAIT) -> Reply:
        """The reply of a unary command; raises :class:`CommandError` if it failed."""
        reply = self._next(wait)
        if reply is None:
            raise AssertionError("%s streamed: use chunks() or AdapterTester.stream()" % self.command)
        return reply

    def __iter__(self) -> Iterator[Reply]:
        """A streaming command's chunks as they arrive; raises :class:`CommandError`
        where the stream failed."""
        while True:
            reply = self._next(DEFAULT_WAIT)
            if reply is None:
                return
            yield reply

    def chunks(self) -> List[Reply]:
        """All of a streaming command's chunks, once it ended."""
        return list(self)


class AdapterTester(object):
    """Serves ``adapter`` (an :class:`~pitboss_worker.Adapter`, or ``"module:attr"``)
    with the real runtime, in this process, until :meth:`close` (or the end of a
    ``with`` block). Its ``@adapter.on_start`` hooks run first, as in a worker.

    ``commands`` is what the worker announces in ``READY``: name -> ``{"streaming",
    "async", "doc"}``.
    """

    def __init__(
        self,
        adapter: Union[Adapter, str],
        *,
        max_frame_bytes: int = P.DEFAULT_MAX_FRAME_BYTES,
        run_on_start: bool = True,
    ) -> None:
        load_adapter: Any = importlib.import_module(__package__ + ".cli").load_adapter
        Runtime: Any = importlib.import_module(__package__ + ".runtime").Runtime

        self.adapter: Adapter = load_adapter(adapter) if isinstance(adapter, str) else adapter
        if run_on_start:
            for hook in self.adapter._on_start:
                hook()
        to_worker_r, self._to_worker = os.pipe()
        self._from_worker, from_worker_w = os.pipe()
        self._runtime: Any = Runtime(self.adapter, to_worker_r, from_worker_w, max_frame_bytes)
        self._worker_fds = (to_worker_r, from_worker_w)
        self._decoder = P.FrameDecoder(max_frame_bytes, P.WORKER_KINDS)
        self._calls: Dict[int, Call] = {}
        self._lock = threading.Lock()
        self._next_id = 1
        self._closed = False
        self._ready: "queue.Queue[Any]" = queue.Queue()
        self._reader = threading.Thread(target=self._read, name="pitboss-tester", daemon=True)
        self._reader.start()
        runtime = self._runtime
        runtime.write(runtime.ready_frame())
        if any(c.is_async for c in self.adapter.commands.values()):
            runtime.start_loop(wait=True)
        self._server = threading.Thread(target=self._serve, name="pitboss-runtime", daemon=True)
        self._server.start()
        ready = json.loads(self._ready.get(timeout=DEFAULT_WAIT).body.decode("utf-8"))
        self.commands: Dict[str, Dict[str, Any]] = {
            c["name"]: {k: v for k, v in c.items() if k != "name"} for c in ready["commands"]
        }

    # -- the calls

    def start(
        self,
        command: str,
        payload: Payload = b"",
        *,
        content_type: Optional[str] = None,
        session_id: Optional[str] = None,
        timeout: Optional[float] = None,
        request_id: str = "test-request",
        traceparent: Optional[str] = None,
        tracestate: Optional[str] = None,
        attempt: int = 1,
        backend: Optional[str] = None,
    ) -> Call:
        """Sends one request and returns at once; see :meth:`call` for the arguments."""
        if backend not in P.BACKENDS:
            raise ValueError("backend must be 'legacy', 'new' or None, not %r" % (backend,))
        body, default_type = _encode_payload(payload)
        with self._lock:
            if self._closed:
                raise RuntimeError("the AdapterTester is closed")
            frame_id = self._next_id
            self._next_id += 1
            call = Call(self, frame_id, command)
            self._calls[frame_id] = call
        context = P.encode_context(request_id, traceparent, tracestate, attempt, backend)
        timeout_ms = 0 if timeout is None else max(1, int(timeout * 1000))
        self._send(
            P.encode_request(
                frame_id,
                command,
                session_id or "",
                default_type if content_type is None else content_type,
                timeout_ms,
                body,
                context,
            )
        )
        return call

    def call(self, command: str, payload: Payload = b"", **options: Any) -> Reply:
        """Calls a unary (or async) command and returns its reply; raises
        :class:`CommandError` when it fails.

        ``payload``: bytes as they are, a str as UTF-8, anything else as JSON.
        ``content_type``: the client's (default ``application/json`` for a JSON
        payload, else ""). ``session_id``: calls with the same id share the session's
        state (``@adapter.session_state``). ``timeout``: seconds until the call's
        deadline (``req.timeout``). ``request_id``, ``traceparent``, ``tracestate``,
        ``attempt``, ``backend``: the call's context as pitboss passes it.
        """
        return self.start(command, payload, **options).result()

    def stream(self, command: str, payload: Payload = b"", **options: Any) -> List[Reply]:
        """Calls a streaming command and returns all its chunks (arguments as
        :meth:`call`); raises :class:`CommandError` where the stream failed."""
        return self.start(command, payload, **options).chunks()

    def close_session(self, session_id: str) -> None:
        """Ends a session, as pitboss does on CloseSession or its TTL: its state is
        dropped (and closed, if it has a ``close()`` method)."""
        self._send(P.encode(P.SESSION_CLOSE, 0, session_id.encode("utf-8")))

    # -- life cycle

    def close(self) -> None:
        """Sends ``SHUTDOWN`` and waits for in-flight commands to finish."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._send(P.encode(P.SHUTDOWN))
        self._server.join(DEFAULT_WAIT)
        # EOF for the runtime's reading thread, then its end of the pipe once that
        # thread is gone (closing a descriptor it still reads would make it fail).
        os.close(self._to_worker)
        standby = self._runtime._standby_thread
        if standby is not None:
            standby.join(DEFAULT_WAIT)
        if standby is None or not standby.is_alive():
            os.close(self._worker_fds[0])
        self._reader.join(DEFAULT_WAIT)
        os.close(self._from_worker)

    def __enter__(self) -> "AdapterTester":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing

    def _send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.write(self._to_worker, view)
            view = view[n:]

    def _serve(self) -> None:
        runtime = self._runtime
        try:
            runtime.serve()
            runtime.close_sessions()
        finally:
            runtime.close_output()

    def _read(self) -> None:
        while True:
            try:
                data = os.read(self._from_worker, 1 << 20)
            except OSError:
                return
            if not data:
                return
            for frame in self._decoder.feed(data):
                if frame.kind == P.READY:
                    self._ready.put(frame)
                    continue
                with self._lock:
                    call = self._calls.get(frame.request_id)
                    if frame.kind in (P.RESPONSE, P.ERROR, P.STREAM_END):
                        self._calls.pop(frame.request_id, None)
                if call is not None:
                    call._frames.put(frame)


def _encode_payload(payload: Payload) -> "tuple[bytes, str]":
    """A payload's bytes and the content type that goes with them by default."""
    if isinstance(payload, (bytes, bytearray, memoryview)):
        return bytes(payload), ""
    if isinstance(payload, str):
        return payload.encode("utf-8"), "text/plain; charset=utf-8"
    return json.dumps(payload).encode("utf-8"), _JSON
