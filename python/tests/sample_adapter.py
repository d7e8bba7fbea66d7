"""An adapter for the runtime's tests: the corners of the API that the examples do not
reach. Loaded as ``sample_adapter`` (the module form: its ``adapter`` attribute)."""

import asyncio
import functools
import logging
import sys
import threading

from pitboss_worker import Adapter, Cancelled, Response

adapter = Adapter("sample")
log = logging.getLogger("sample.log")

# Set by the tests' `block` command, released by `release`.
_gate = threading.Event()


class State(object):
    def __init__(self, session_id):
        self.session_id = session_id
        self.items = []

    def close(self):
        sys.stderr.write("sample: closed session %s with %d items\n" % (self.session_id, len(self.items)))


@adapter.session_state
def make_state(session_id):
    return State(session_id)


@adapter.command
def remember(req):
    """Appends the payload to the session's list; returns the list."""
    req.session.items.append(req.text())
    return req.session.items


@adapter.command(name="text", doc="Returns a str.")
def text_(req):
    return "héllo"


@adapter.command
def png(req):
    return Response(b"\x89PNG", content_type="image/png")


@adapter.command
def raw(req):
    return bytearray(b"raw bytes")


@adapter.command
def info(req):
    return {
        "timeout": req.timeout,
        "session_id": req.session_id,
        "command": req.command,
        "frame_id": req.frame_id,
        "request_id": req.request_id,
        "traceparent": req.traceparent,
        "tracestate": req.tracestate,
        "trace_id": req.trace_id,
        "attempt": req.attempt,
        "backend": req.backend,
        "content_type": req.content_type,
        "cancelled": req.cancelled,
    }


@adapter.command
def not_json(req):
    return object()


@adapter.command
def big(req):
    return b"x" * int(req.json()["n"])


@adapter.command
def big_stream(req):
    yield "small"
    yield b"y" * int(req.json()["n"])
    yield "never sent"


@adapter.command
def failing_stream(req):
    yield {"i": 0}
    raise KeyError("boom")


@adapter.command
async def agen(req):
    for i in range(int(req.json()["n"])):
        await asyncio.sleep(0)
        yield {"i": i}


@adapter.command
async def async_fail(req):
    await asyncio.sleep(0)
    raise RuntimeError("async boom")


@adapter.command
def give_up(req):
    raise Cancelled("the command gave up")


def _logged(func):
    @functools.wraps(func)
    def wrapper(req):
        return func(req)

    return wrapper


@adapter.command
@_logged
async def wrapped_async(req):
    await asyncio.sleep(0)
    return "wrapped"


@adapter.command
async def wait_gate(req):
    """Waits on the loop until the synchronous `open_gate` has run."""
    for _ in range(3000):
        if _gate.is_set():
            return "opened"
        await asyncio.sleep(0.01)
    raise TimeoutError("the gate never opened")


@adapter.command
def open_gate(req):
    _gate.set()
    return "ok"


@adapter.command
def block(req):
    """Blocks the executor for {"seconds": s}."""
    import time

    time.sleep(float(req.json()["seconds"]))
    return "done"


@adapter.command
def read_stdin(req):
    """input() must see EOF (fd 0 is /dev/null), not the protocol."""
    try:
        return input()
    except EOFError:
        return "EOF"


@adapter.command
def child(req):
    """Runs a child process that prints to its stdout and reports which of the
    runtime's protocol fds it can see (none: they are close-on-exec)."""
    import subprocess

    from pitboss_worker import hooks

    proto = [hooks.current().in_fd, hooks.current().out_fd]
    code = (
        "import os, sys\n"
        "print('sample: hello from a child')\n"
        "seen = []\n"
        "for fd in map(int, sys.argv[1:]):\n"
        "    try:\n"
        "        os.fstat(fd)\n"
        "        seen.append(fd)\n"
        "    except OSError:\n"
        "        pass\n"
        "sys.stderr.write(' '.join(map(str, seen)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code] + [str(fd) for fd in proto], stderr=subprocess.PIPE, check=True
    )
    return {"seen": [int(x) for x in out.stderr.split()], "protocol_fds": proto}


@adapter.command
def spin(req):
    """Busy-loops in Python code (the GIL held between bytecodes) for {"seconds": s},
    or until cancelled: {"spun": s} or {"cancelled": true}."""
    import time

    deadline = time.monotonic() + float(req.json()["seconds"])
    n = 0
    while time.monotonic() < deadline:
        n += 1
        if n % 1000 == 0 and req.cancelled:
            return {"cancelled": True}
    return {"spun": req.json()["seconds"]}


@adapter.command
def where(req):
    """The thread this synchronous command runs on."""
    t = threading.current_thread()
    return {"main": t is threading.main_thread(), "name": t.name}


@adapter.command
def log_it(req):
    """Logs the payload as text at INFO, with an exception's traceback at ERROR too."""
    log.info("sync says %s", req.text())
    try:
        raise KeyError("boom")
    except KeyError:
        log.exception("and a traceback")
    return "logged"


@adapter.command
async def alog(req):
    await asyncio.sleep(0.01)
    log.warning("async says %s", req.text())
    return "logged"


@adapter.command
def echo(req):
    return req.payload
