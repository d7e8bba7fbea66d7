"""A fault-injection adapter: every way a worker can misbehave, on demand.

pitboss's tests use it to prove that a broken or hostile worker never takes the
service down. Not for production. Payloads are JSON objects (an empty payload is {}).

Environment switches, read at import:

  PITBOSS_FAULT_CRASH_ON_START=1   os._exit(3) during import: a crash loop
  PITBOSS_FAULT_SLOW_START_MS=n    sleep n ms during import
  PITBOSS_FAULT_IGNORE_SIGTERM=1   ignore SIGTERM (pitboss must escalate to SIGKILL);
                                   set from an on_start hook, i.e. after the runtime
                                   has installed its own SIGTERM handler
  PITBOSS_FAULT_COUNT_FILE=path    the `count` command appends a line per execution
"""

import asyncio
import builtins
import os
import signal
import sys
import threading
import time

from pitboss_worker import Adapter, InvalidRequest
from pitboss_worker import protocol as P
from pitboss_worker import hooks

if os.environ.get("PITBOSS_FAULT_CRASH_ON_START") == "1":
    sys.stderr.write("faults: crashing at start-up as asked (PITBOSS_FAULT_CRASH_ON_START)\n")
    sys.stderr.flush()
    os._exit(3)

if os.environ.get("PITBOSS_FAULT_SLOW_START_MS"):
    time.sleep(int(os.environ["PITBOSS_FAULT_SLOW_START_MS"]) / 1000.0)

adapter = Adapter("faults")
_held = []  # memory kept alive by `alloc`


@adapter.on_start
def _maybe_ignore_sigterm():
    if os.environ.get("PITBOSS_FAULT_IGNORE_SIGTERM") == "1":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _args(req):
    return req.json() if req.payload else {}


@adapter.command
def echo(req):
    """Return the payload unchanged."""
    return req.payload


@adapter.command(name="raise")
def raise_(req):
    """Raise a builtin exception: {"type": "ValueError", "message": "..."}; the type
    "InvalidRequest" raises pitboss_worker.InvalidRequest (the caller's error)."""
    a = _args(req)
    if a.get("type") == "InvalidRequest":
        raise InvalidRequest(a.get("message", "injected caller error"))
    exc_type = getattr(builtins, a.get("type", "RuntimeError"), None)
    if not (isinstance(exc_type, type) and issubclass(exc_type, BaseException)):
        raise TypeError("%r is not a builtin exception type" % a.get("type"))
    raise exc_type(a.get("message", "injected failure"))


@adapter.command
def unserializable(req):
    """Return a value JSON cannot encode (a set): the command's fault."""
    return {"ids": {1, 2}}


@adapter.command(name="sleep")
def sleep_sync(req):
    """Sleep {"seconds": s} synchronously in 10 ms steps, stopping early when cancelled."""
    seconds = _args(req).get("seconds", 1)
    deadline = time.monotonic() + float(seconds)
    while time.monotonic() < deadline:
        if req.cancelled:
            return {"cancelled": True}
        time.sleep(0.01)
    return {"slept": seconds}


@adapter.command
async def async_sleep(req):
    """Sleep {"seconds": s} on the event loop (cancellable)."""
    seconds = _args(req).get("seconds", 1)
    await asyncio.sleep(float(seconds))
    return {"slept": seconds}


@adapter.command
def hang(req):
    """Never return, ignoring cancellation."""
    while True:
        time.sleep(3600)


@adapter.command
def crash(req):
    """Exit the process at once: {"code": n} (default 1)."""
    sys.stderr.flush()
    os._exit(int(_args(req).get("code", 1)))


@adapter.command(name="print")
def print_(req):
    """Write to stdout in every way user code might; none of it reaches the channel."""
    print("faults: print() to sys.stdout")
    os.write(1, b"faults: raw write to fd 1\n")
    sys.__stdout__.write("faults: write to sys.__stdout__\n")
    sys.__stdout__.flush()
    return "ok"


@adapter.command
def garbage(req):
    """Write an invalid frame (protocol version 99) to the real channel, then return."""
    hooks.unsafe_write_raw(P.HEADER.pack(P.HEADER_LEN, 99, P.RESPONSE, 0, req.frame_id))
    return "sent garbage"


@adapter.command
def oversized(req):
    """Write a frame header announcing more than --max-frame-bytes to the real channel."""
    too_big = hooks.max_frame_bytes() + 1
    hooks.unsafe_write_raw(P.HEADER.pack(too_big, P.PROTOCOL_VERSION, P.RESPONSE, 0, req.frame_id))
    return "sent oversized"


@adapter.command
def unknown_id(req):
    """Answer request id 0xDEADBEEF, which pitboss never sent, then return normally."""
    hooks.unsafe_write_raw(P.encode_payload(P.RESPONSE, 0xDEADBEEF, "text/plain", b"?"))
    return "sent unknown id"


@adapter.command
def close_stdout(req):
    """Close the real protocol output but stay alive, blocked forever."""
    hooks.unsafe_close_protocol_output()
    threading.Event().wait()


@adapter.command
def freeze(req):
    """SIGSTOP the whole process: no more heartbeats."""
    os.kill(os.getpid(), signal.SIGSTOP)
    return "thawed"


@adapter.command
def alloc(req):
    """Allocate {"mb": n} MiB (default 10), touch every page and keep it: {"held_mb": total}."""
    mb = int(_args(req).get("mb", 10))
    block = bytearray(mb * 1024 * 1024)
    block[::4096] = b"\x01" * len(range(0, len(block), 4096))
    _held.append(block)
    return {"held_mb": sum(len(b) for b in _held) // (1024 * 1024)}


@adapter.command
def count(req):
    """Record one execution of {"id": x}: appends "x pid" to $PITBOSS_FAULT_COUNT_FILE,
    then sleeps {"sleep": s} seconds (default 0), so a test can kill it mid-request.
    With {"sleep_first": s} it sleeps only on the first execution of that id."""
    args = _args(req)
    rid = args.get("id")
    path = os.environ.get("PITBOSS_FAULT_COUNT_FILE")
    if path and args.get("sleep_first"):
        # Slow only on the first execution of this id (in any worker).
        seen = os.path.exists(path) and any(l.split(" ")[0] == str(rid) for l in open(path))
        if not seen:
            with open(path, "a") as f:
                f.write("%s %d\n" % (rid, os.getpid()))
            time.sleep(float(args["sleep_first"]))
            return {"id": rid, "pid": os.getpid(), "slow": True}
    if path:
        with open(path, "a") as f:
            f.write("%s %d\n" % (rid, os.getpid()))
    if args.get("sleep"):
        time.sleep(float(args["sleep"]))
    return {"id": rid, "pid": os.getpid()}


@adapter.command
def pid(req):
    """The worker's process id: {"pid": pid}."""
    return {"pid": os.getpid()}


@adapter.command
def deadline(req):
    """The time left (seconds) that pitboss forwarded with the request, or null."""
    return {"timeout": req.timeout}


@adapter.command
def big(req):
    """Return {"bytes": n} bytes of payload (to exceed the frame limit on purpose)."""
    return b"x" * int(_args(req).get("bytes", 1024))


@adapter.command
def chunks(req):
    """Stream {"n": N} chunks {"i": 0} .. {"i": N-1}, sleeping {"sleep": s} between them."""
    args = _args(req)
    pause = float(args.get("sleep", 0))
    for i in range(int(args.get("n", 3))):
        if pause:
            time.sleep(pause)
        yield {"i": i}


@adapter.command
def tally(req):
    """Count this session's calls: {"n": calls so far in this session, "pid": pid}."""
    if req.session is None:
        raise InvalidRequest("tally needs a session")  # the caller's error
    req.session["n"] = req.session.get("n", 0) + 1
    return {"n": req.session["n"], "pid": os.getpid()}


@adapter.command
def spawn_child(req):
    """Start a child that would outlive the worker: {"how": "fork" | "popen"}.
    Returns {"pid": ...}. The child sleeps 300 s."""
    how = _args(req).get("how", "fork")
    if how == "popen":
        import subprocess

        return {"pid": subprocess.Popen(["sleep", "300"]).pid}
    pid = os.fork()
    if pid == 0:
        try:
            time.sleep(300)
        finally:
            os._exit(0)
    return {"pid": pid}


@adapter.command
def big_stream(req):
    """Stream {"n": N} chunks of {"bytes": n} bytes each."""
    args = _args(req)
    for _ in range(int(args.get("n", 2))):
        yield b"x" * int(args.get("bytes", 1024))
