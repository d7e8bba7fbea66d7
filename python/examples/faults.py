"""A fault-injection adapter: every way a worker can misbehave, on demand.

pitboss's tests use it to prove that a hostile or broken worker never takes the
service down. Not for production.

Environment switches, read at import:
  PITBOSS_FAULT_CRASH_ON_START=1   exit(3) during import: a crash loop
  PITBOSS_FAULT_IGNORE_SIGTERM=1   ignore SIGTERM (pitboss must escalate to SIGKILL)
  PITBOSS_FAULT_SLOW_START_MS=n    sleep n ms during import
  PITBOSS_FAULT_COUNT_FILE=path    the `count` command appends a line per execution
"""

import asyncio
import builtins
import os
import signal
import struct
import sys
import time

from pitboss_worker import Adapter
from pitboss_worker import protocol as P
from pitboss_worker.runtime import unsafe_protocol_fd

if os.environ.get("PITBOSS_FAULT_CRASH_ON_START") == "1":
    sys.stderr.write("faults: crashing at startup as asked\n")
    sys.stderr.flush()
    os._exit(3)

if os.environ.get("PITBOSS_FAULT_SLOW_START_MS"):
    time.sleep(int(os.environ["PITBOSS_FAULT_SLOW_START_MS"]) / 1000.0)

adapter = Adapter("faults")
_held = []


@adapter.on_start
def _maybe_ignore_sigterm():
    if os.environ.get("PITBOSS_FAULT_IGNORE_SIGTERM") == "1":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _args(req):
    return req.json() if req.payload else {}


@adapter.command
def echo(req):
    """Return the payload."""
    return req.payload


@adapter.command(name="raise")
def raise_(req):
    """Raise a builtin exception: {"type": "ValueError", "message": "..."}."""
    a = _args(req)
    exc_type = getattr(builtins, a.get("type", "RuntimeError"), RuntimeError)
    raise exc_type(a.get("message", "injected failure"))


@adapter.command(name="sleep")
def sleep_sync(req):
    """Sleep {"seconds": s} synchronously, stopping early when cancelled."""
    deadline = time.monotonic() + float(_args(req).get("seconds", 1))
    while time.monotonic() < deadline:
        if req.cancelled:
            return {"cancelled": True}
        time.sleep(0.01)
    return {"slept": True}


@adapter.command
async def async_sleep(req):
    """Sleep {"seconds": s} on the event loop."""
    await asyncio.sleep(float(_args(req).get("seconds", 1)))
    return {"slept": True}


@adapter.command
def hang(req):
    """Never return, and ignore cancellation."""
    while True:
        time.sleep(3600)


@adapter.command
def crash(req):
    """Exit the process at once with {"code": n} (default 1)."""
    sys.stderr.flush()
    os._exit(int(_args(req).get("code", 1)))


@adapter.command(name="print")
def print_(req):
    """Write to stdout in every way user code might; none of it may reach pitboss."""
    print("faults: print() to sys.stdout")
    sys.__stdout__.write("faults: sys.__stdout__\n")
    sys.__stdout__.flush()
    os.write(1, b"faults: raw write to fd 1\n")
    return "ok"


@adapter.command
def garbage(req):
    """Write an invalid frame (protocol version 99) to the real channel."""
    os.write(unsafe_protocol_fd(), struct.pack(">IBBHQ", 12, 99, 3, 0, req.request_id))
    return "sent garbage"


@adapter.command
def oversized(req):
    """Announce a 2 GiB frame on the real channel."""
    os.write(unsafe_protocol_fd(), struct.pack(">I", 0x7FFFFFFF) + b"\x01\x03\x00\x00")
    return "sent oversized"


@adapter.command
def unknown_id(req):
    """Answer a request id that pitboss never sent, then answer normally."""
    os.write(unsafe_protocol_fd(), P.encode_payload(P.RESPONSE, 0xDEADBEEF, "text/plain", b"?"))
    return "sent unknown id"


@adapter.command
def close_stdout(req):
    """Close the real channel but stay alive."""
    os.close(unsafe_protocol_fd())
    while True:
        time.sleep(3600)


@adapter.command
def freeze(req):
    """Stop the whole process (SIGSTOP): no more heartbeats."""
    os.kill(os.getpid(), signal.SIGSTOP)
    return "thawed"


@adapter.command
def alloc(req):
    """Allocate {"mb": n} MiB, touch every page, and keep it."""
    mb = int(_args(req).get("mb", 10))
    block = bytearray(mb * 1024 * 1024)
    for i in range(0, len(block), 4096):
        block[i] = 1
    _held.append(block)
    return {"held_mb": sum(len(b) for b in _held) // (1024 * 1024)}


@adapter.command
def count(req):
    """Record one execution of {"id": x} in $PITBOSS_FAULT_COUNT_FILE."""
    rid = _args(req).get("id")
    path = os.environ.get("PITBOSS_FAULT_COUNT_FILE")
    if path:
        with open(path, "a") as f:
            f.write("%s %d\n" % (rid, os.getpid()))
    return {"id": rid}


@adapter.command
def pid(req):
    """The worker's process id."""
    return {"pid": os.getpid()}


@adapter.command
def deadline(req):
    """The time left (seconds) that pitboss forwarded with the request, or null."""
    return {"timeout": req.timeout}


@adapter.command
def big(req):
    """Return {"bytes": n} bytes of payload (to exceed the frame limit on purpose)."""
    return b"x" * int(_args(req).get("bytes", 1024))
