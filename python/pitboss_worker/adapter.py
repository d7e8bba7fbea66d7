"""The adapter API: how user code registers commands and session state."""

import inspect


class Response:
    """A result with an explicit content type: ``return Response(b"...", "image/png")``."""

    __slots__ = ("payload", "content_type")

    def __init__(self, payload, content_type="application/octet-stream"):
        if isinstance(payload, str):
            payload = payload.encode("utf-8")
        self.payload = bytes(payload)
        self.content_type = content_type


class Request:
    """What a command receives.

    Attributes: ``payload`` (bytes, untouched), ``content_type``, ``command``,
    ``session_id`` (or None), ``request_id``, ``timeout`` (seconds left when the request
    was sent, or None) and ``cancelled`` (True once pitboss has cancelled the request;
    long synchronous commands may check it and stop early).
    """

    __slots__ = ("request_id", "command", "session_id", "content_type", "timeout",
                 "payload", "_worker", "cancelled", "_session")

    def __init__(self, request_id, command, session_id, content_type, timeout, payload, worker=None):
        self.request_id = request_id
        self.command = command
        self.session_id = session_id
        self.content_type = content_type
        self.timeout = timeout
        self.payload = payload
        self._worker = worker
        self.cancelled = False
        self._session = None

    @property
    def session(self):
        """The state object of this request's session, created on first use by the
        adapter's ``session_state`` factory. None for requests without a session."""
        if self._session is None and self.session_id is not None and self._worker is not None:
            self._session = self._worker.session_state(self.session_id)
        return self._session

    def json(self):
        """The payload decoded as JSON."""
        import json
        return json.loads(self.payload)

    def text(self):
        return self.payload.decode("utf-8")


class Command:
    __slots__ = ("name", "func", "is_async", "streaming", "doc")

    def __init__(self, name, func, doc=None):
        self.name = name
        self.func = func
        self.is_async = inspect.iscoroutinefunction(func) or inspect.isasyncgenfunction(func)
        self.streaming = inspect.isgeneratorfunction(func) or inspect.isasyncgenfunction(func)
        self.doc = (doc if doc is not None else (inspect.getdoc(func) or "")).strip()

    def describe(self):
        return {"name": self.name, "streaming": self.streaming, "async": self.is_async,
                "doc": self.doc.split("\n\n")[0]}


class Adapter:
    """A named set of commands.

    >>> adapter = Adapter("demo")
    >>> @adapter.command
    ... def echo(req):
    ...     return req.payload
    """

    def __init__(self, name="adapter"):
        self.name = name
        self.commands = {}
        self._session_factory = None
        self._on_start = []

    def command(self, func=None, name=None, doc=None):
        """Registers a command. Use as ``@adapter.command`` or
        ``@adapter.command(name="other", doc="...")``.

        A plain function is a unary command; ``async def`` runs on an asyncio loop so that
        several can be in flight; a generator (or async generator) streams each item it
        yields as one chunk.
        """
        def register(f):
            cmd = Command(name or f.__name__, f, doc)
            if cmd.name in self.commands:
                raise ValueError("command %r is registered twice" % cmd.name)
            self.commands[cmd.name] = cmd
            return f
        if func is not None:
            return register(func)
        return register

    def session_state(self, factory):
        """Registers the factory of per-session state: called with the session id when a
        session's first request reaches this worker. If the object has ``close()``, it is
        called when the session is closed or expires."""
        self._session_factory = factory
        return factory

    def on_start(self, func):
        """Registers a function called once the runtime is set up, just before READY."""
        self._on_start.append(func)
        return func
