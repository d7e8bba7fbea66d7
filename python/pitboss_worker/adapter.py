"""The adapter API: how user code registers commands and per-session state.

Nothing here imports asyncio, inspect or typing: command kinds are read from the
function's code flags, which costs nothing at startup, and the annotations are for
type checkers only (``typing`` costs about 15 ms to import; a worker starts in 40).
"""

from __future__ import annotations

import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Callable, Dict, List, Optional, Tuple, TypeVar, Union, overload

    #: A command: a function of a Request (sync, async, a generator or an async
    #: generator); what it returns is the reply.
    CommandFunc = Callable[["Request"], Any]
    F = TypeVar("F", bound=Callable[..., Any])
    S = TypeVar("S", bound=Callable[[str], Any])
    H = TypeVar("H", bound=Callable[[], Any])

# Code object flags (stable since Python 3.6).
_CO_GENERATOR = 0x20
_CO_COROUTINE = 0x80
_CO_ASYNC_GENERATOR = 0x200
_KIND_FLAGS = _CO_GENERATOR | _CO_COROUTINE | _CO_ASYNC_GENERATOR

_monotonic = time.monotonic


class Cancelled(Exception):
    """Raise it (or call :meth:`Request.raise_if_cancelled`) to stop a cancelled
    command; the runtime answers ``ERROR`` with kind ``cancelled``."""


class InvalidRequest(ValueError):
    """Raise it to say the caller's request is wrong (bad or missing input): pitboss
    answers ``INVALID_ARGUMENT`` (class ``invalid_request``), which is never retried and
    never counts against the backend. :meth:`Request.json` and :meth:`Request.text` raise
    it for a payload they cannot decode.

    Any other exception a command raises, ``ValueError`` and ``KeyError`` included, is
    the command failing to produce an answer: the backend's fault, not the caller's."""


InvalidRequest.__module__ = "pitboss_worker"


class ResultError(TypeError):
    """What the runtime reports when a command's result cannot be sent: it cannot be
    encoded as JSON, or it is a coroutine or generator from a function that was not
    declared as one. The command's fault, never the caller's."""


ResultError.__module__ = "pitboss_worker"


class Response(object):
    """A result with an explicit content type.

    ``payload`` is bytes-like or str (encoded as UTF-8). ``content_type`` defaults to
    ``application/octet-stream`` for bytes and ``text/plain; charset=utf-8`` for str::

        return Response(png_bytes, content_type="image/png")
    """

    __slots__ = ("payload", "content_type")

    def __init__(self, payload: Union[bytes, bytearray, memoryview, str], content_type: Optional[str] = None) -> None:
        if isinstance(payload, str):
            payload = payload.encode("utf-8")
            if content_type is None:
                content_type = "text/plain; charset=utf-8"
        elif type(payload) is not bytes:
            payload = bytes(payload)
        self.payload: bytes = payload
        self.content_type: str = "application/octet-stream" if content_type is None else content_type

    def __repr__(self) -> str:
        return "Response(<%d bytes>, content_type=%r)" % (len(self.payload), self.content_type)


class Request(object):
    """What a command receives.

    * ``payload``: the request's bytes, untouched;
    * ``content_type``: the client's content type (str, may be empty);
    * ``command``: the command called;
    * ``session_id``: str, or None for a request without a session;
    * ``session``: the session's state object (see :meth:`Adapter.session_state`), or
      None without a session;
    * ``timeout``: seconds left before the deadline (never negative), or None;
    * ``cancelled``: True once pitboss has cancelled the request;
    * ``json()``: the payload decoded as JSON (:class:`InvalidRequest` if it is not).

    The call's context, as pitboss passes it:

    * ``request_id``: the call's id: the client's ``x-request-id``, else one pitboss
      made (and returned to the client in the response metadata); "" when pitboss sent
      none (a pitboss older than protocol revision 2);
    * ``traceparent``, ``tracestate``: the client's W3C trace context, or None;
      ``trace_id`` is the traceparent's trace id;
    * ``attempt``: 1 for the first try, 2 for the first retry, ...;
    * ``backend``: the rollout role serving it, ``"legacy"`` or ``"new"`` (or None);
    * ``frame_id``: the protocol's id for this request on this worker (an int).
    """

    __slots__ = (
        "frame_id",
        "command",
        "session_id",
        "content_type",
        "payload",
        "_deadline",
        "_cancelled",
        "_state",
        "_session",
        "_task",
        "_replied",
        "_ctx",
    )

    def __init__(
        self,
        frame_id: int,
        command: str,
        session_id: Optional[str],
        content_type: str,
        payload: bytes,
        deadline: Optional[float] = None,
        context: Union[bytes, Tuple[str, Optional[str], Optional[str], int, Optional[str]], None] = None,
    ) -> None:
        self.frame_id = frame_id
        self.command = command
        self.session_id = session_id
        self.content_type = content_type
        self.payload = payload
        self._deadline = deadline  # time.monotonic() value, or None
        self._cancelled = False
        self._state = 0  # runtime bookkeeping: queued / running / done
        self._session: Any = None
        self._task: Any = None
        self._replied = False
        # The context block as received (decoded on first use: most commands never
        # look), or already decoded: (request_id, traceparent, tracestate, attempt,
        # backend).
        self._ctx = context

    def _context(self) -> Tuple[str, Optional[str], Optional[str], int, Optional[str]]:
        ctx = self._ctx
        if isinstance(ctx, tuple):
            return ctx
        if ctx is None:
            decoded: Tuple[str, Optional[str], Optional[str], int, Optional[str]] = ("", None, None, 1, None)
        else:
            from .protocol import decode_context

            decoded = decode_context(ctx)
        self._ctx = decoded
        return decoded

    @property
    def request_id(self) -> str:
        return self._context()[0]

    @property
    def traceparent(self) -> Optional[str]:
        return self._context()[1]

    @property
    def tracestate(self) -> Optional[str]:
        return self._context()[2]

    @property
    def trace_id(self) -> Optional[str]:
        """The 32 hex digits of the traceparent's trace id, or None."""
        tp = self._context()[1]
        return tp[3:35] if tp is not None and len(tp) >= 35 else None

    @property
    def attempt(self) -> int:
        return self._context()[3]

    @property
    def backend(self) -> Optional[str]:
        return self._context()[4]

    @property
    def session(self) -> Any:
        return self._session

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    @property
    def timeout(self) -> Optional[float]:
        if self._deadline is None:
            return None
        left = self._deadline - _monotonic()
        return left if left > 0.0 else 0.0

    def json(self) -> Any:
        """The payload decoded as JSON (``json.loads``). A payload that is not JSON is
        the caller's error: it raises :class:`InvalidRequest` (a ``ValueError``)."""
        import json

        try:
            return json.loads(self.payload)
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
            raise InvalidRequest("the payload is not valid JSON: %s" % e) from e

    def text(self) -> str:
        """The payload decoded as UTF-8; raises :class:`InvalidRequest` if it is not."""
        try:
            return self.payload.decode("utf-8")
        except UnicodeDecodeError as e:
            raise InvalidRequest("the payload is not valid UTF-8: %s" % e) from e

    def raise_if_cancelled(self) -> None:
        """Raises :class:`Cancelled` if pitboss has cancelled this request."""
        if self._cancelled:
            raise Cancelled("request %s was cancelled" % (self.request_id or self.frame_id))

    def __repr__(self) -> str:
        return "Request(id=%r, command=%r, session_id=%r, content_type=%r, <%d bytes>)" % (
            self.request_id or self.frame_id,
            self.command,
            self.session_id,
            self.content_type,
            len(self.payload),
        )


def _code_flags(func: Any) -> int:
    """The code flags of a function, looking through ``functools.wraps`` wrappers,
    ``functools.partial`` and callable objects."""
    for _ in range(32):
        code = getattr(func, "__code__", None)
        if code is not None and code.co_flags & _KIND_FLAGS:
            return int(code.co_flags)
        nxt = getattr(func, "__wrapped__", None)
        if nxt is None:
            nxt = getattr(func, "func", None)  # functools.partial
        if nxt is None and code is None:
            nxt = getattr(getattr(func, "__call__", None), "__func__", None)
        if nxt is None or nxt is func:
            break
        func = nxt
    return 0


def _first_paragraph(doc: Optional[str]) -> str:
    if not doc:
        return ""
    lines = []
    for line in doc.strip().splitlines():
        line = line.strip()
        if not line:
            break
        lines.append(line)
    return " ".join(lines)


class Command(object):
    """One registered command (internal; see :meth:`Adapter.command`)."""

    __slots__ = ("name", "func", "is_async", "streaming", "doc")

    def __init__(
        self,
        name: str,
        func: CommandFunc,
        doc: Optional[str] = None,
        streaming: Optional[bool] = None,
        is_async: Optional[bool] = None,
    ) -> None:
        flags = _code_flags(func)
        if is_async is None:
            is_async = bool(flags & (_CO_COROUTINE | _CO_ASYNC_GENERATOR))
        if streaming is None:
            streaming = bool(flags & (_CO_GENERATOR | _CO_ASYNC_GENERATOR))
        self.name = name
        self.func = func
        self.is_async = bool(is_async)
        self.streaming = bool(streaming)
        self.doc = _first_paragraph(getattr(func, "__doc__", None) if doc is None else doc)

    def describe(self) -> Dict[str, Any]:
        return {
            "name": self.name,
            "streaming": self.streaming,
            "async": self.is_async,
            "doc": self.doc,
        }

    def __repr__(self) -> str:
        return "Command(%r, streaming=%r, async=%r)" % (self.name, self.streaming, self.is_async)


class Adapter(object):
    """A named set of commands that pitboss serves.

    ::

        adapter = Adapter("demo")

        @adapter.command
        def echo(req):
            return req.payload
    """

    def __init__(self, name: str = "adapter") -> None:
        self.name = str(name)
        self.commands: Dict[str, Command] = {}  # name -> Command, in registration order
        self._session_factory: Optional[Callable[[str], Any]] = None
        self._on_start: List[Callable[[], Any]] = []

    if TYPE_CHECKING:

        @overload
        def command(self, func: F) -> F: ...

        @overload
        def command(
            self,
            func: None = None,
            name: Optional[str] = None,
            doc: Optional[str] = None,
            streaming: Optional[bool] = None,
            is_async: Optional[bool] = None,
        ) -> Callable[[F], F]: ...

    def command(
        self,
        func: Optional[F] = None,
        name: Optional[str] = None,
        doc: Optional[str] = None,
        streaming: Optional[bool] = None,
        is_async: Optional[bool] = None,
    ) -> Union[F, Callable[[F], F]]:
        """Registers a command: ``@adapter.command`` or ``@adapter.command(name=..., doc=...)``.

        * a plain function is a unary command, run on the main thread;
        * ``async def`` runs on the worker's asyncio loop, concurrently with others;
        * a generator function (or ``async def`` generator) streams: each yielded item
          is one ``STREAM_CHUNK``.

        ``streaming`` and ``is_async`` override the detection (for example for a
        decorated function that hides what it is). ``doc`` defaults to the first
        paragraph of the docstring. Returns the function unchanged.
        """

        def register(f: F) -> F:
            cmd = Command(name or f.__name__, f, doc, streaming, is_async)
            if not cmd.name:
                raise ValueError("a command needs a name")
            if len(cmd.name.encode("utf-8")) > 0xFFFF:
                raise ValueError("command name is too long")
            if cmd.name in self.commands:
                raise ValueError("command %r is registered twice" % cmd.name)
            self.commands[cmd.name] = cmd
            return f

        if func is not None:
            if not callable(func):
                raise TypeError("@adapter.command takes keyword arguments, e.g. name=...")
            return register(func)
        return register

    def session_state(self, factory: S) -> S:
        """Registers the per-session state factory (use as a decorator).

        ``factory(session_id)`` is called when a request with that session id first
        reaches this worker; the object it returns is ``req.session`` for every request
        of the session. If the object has a ``close()`` method, it is called on
        ``SESSION_CLOSE`` and when the worker exits cleanly. Without a factory each
        session gets a fresh ``dict``.
        """
        self._session_factory = factory
        return factory

    def on_start(self, func: H) -> H:
        """Registers ``func()`` to run once the runtime is set up (protocol fds saved,
        stdout redirected, SIGTERM handler installed), just before ``READY``. Use it
        for set-up that must override the runtime's defaults."""
        self._on_start.append(func)
        return func

    def __repr__(self) -> str:
        return "Adapter(%r, commands=%r)" % (self.name, list(self.commands))
