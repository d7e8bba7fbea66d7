"""The demo adapter that pitboss serves by default.

Commands: echo, compute, counter (per-session state), stream, sleep (async), whoami.
"""

import asyncio
import os

from pitboss_worker import Adapter

adapter = Adapter("demo")


@adapter.command
def echo(req):
    """Return the payload unchanged, with its content type."""
    return req.payload


@adapter.command
def compute(req):
    """A small CPU-bound job: the sum of squares below n (default 20000, about 0.5 ms)."""
    n = int(req.json().get("n", 20000)) if req.payload else 20000
    total = 0
    for i in range(n):
        total += i * i
    return {"n": n, "sum": total}


@adapter.session_state
def new_session(session_id):
    return {"count": 0}


@adapter.command
def counter(req):
    """Count the calls of this session: state that lives in the session's worker."""
    state = req.session if req.session is not None else {"count": 0}
    state["count"] += 1
    return {"count": state["count"], "pid": os.getpid(), "session_id": req.session_id}


@adapter.command
def stream(req):
    """Stream n chunks {"i": 0} .. {"i": n-1} (default 10)."""
    n = int(req.json().get("n", 10)) if req.payload else 10
    for i in range(n):
        yield {"i": i}


@adapter.command
async def sleep(req):
    """Sleep for {"seconds": s} without blocking other requests, then answer."""
    seconds = float(req.json().get("seconds", 0.1))
    await asyncio.sleep(seconds)
    return {"slept": seconds}


@adapter.command
def whoami(req):
    """The worker's process id."""
    return {"pid": os.getpid()}
