"""The demo adapter: ``python -m pitboss_worker --adapter demo:adapter`` (with
``python/examples`` on PYTHONPATH), or ``examples.demo:adapter`` from ``python/``.

Commands: echo, compute, counter (per-session state), stream (streaming), sleep
(async), whoami, version (1 here, 2 in demo_v2: tells the rollout backends apart).
"""

import os

from pitboss_worker import Adapter, InvalidRequest

adapter = Adapter("demo")


def _args(req):
    """The JSON object in the payload, or {} for an empty payload."""
    return req.json() if req.payload else {}


@adapter.command
def echo(req):
    """Return the payload unchanged, with its content type."""
    return req.payload


@adapter.command
def compute(req):
    """A small CPU-bound job: the sum of i*i for i < n ({"n": N}, default 10000, about 0.5 ms)."""
    n = int(_args(req).get("n", 10000))
    if n < 0:
        raise InvalidRequest("n must be at least 0, not %d" % n)  # the caller's error
    total = 0
    for i in range(n):
        total += i * i
    return {"n": n, "sum": total}


@adapter.session_state
def new_session(session_id):
    return {"count": 0}


@adapter.command
def counter(req):
    """Count the calls of this session (state lives in the session's worker)."""
    if req.session is None:
        raise InvalidRequest("counter needs a session: send the request with a session id")
    req.session["count"] += 1
    return {"count": req.session["count"], "pid": os.getpid()}


@adapter.command
def stream(req):
    """Stream {"i": 0} .. {"i": n-1}, one chunk each ({"n": N}, default 3)."""
    for i in range(int(_args(req).get("n", 3))):
        yield {"i": i}


@adapter.command
async def sleep(req):
    """Sleep {"seconds": s} without blocking other requests, then return {"slept": s}."""
    import asyncio  # here, not at the top: the runtime imports asyncio (about 30 ms)
    # in the background after READY, so the worker is ready sooner

    seconds = _args(req).get("seconds", 0.1)
    await asyncio.sleep(float(seconds))
    return {"slept": seconds}


@adapter.command
def whoami(req):
    """The worker's process id: {"pid": pid}."""
    return {"pid": os.getpid()}


@adapter.command
def version(req):
    """Which adapter version answers: {"version": 1} (demo_v2 answers 2)."""
    return {"version": 1}
