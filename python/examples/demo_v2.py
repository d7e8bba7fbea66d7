"""The demo adapter's next version, for rollouts: ``demo_v2:adapter``.

Serves the same commands as ``demo`` (so calls can move between the two backends),
with two deliberate differences a migration would have:

* ``compute`` adds ``"engine": "v2"`` to its answer, so shadow mode reports a
  mismatch unless ``engine`` is in ``[shadow] ignore_fields``;
* ``version`` answers ``{"version": 2}`` (``demo`` answers 1).

``DEMO_V2_BROKEN`` in the worker's environment makes it misbehave, to rehearse an
automatic rollback or a fallback: ``raise`` (every call raises RuntimeError),
``keyerror`` (3 calls in 10 raise KeyError: a bug, not the caller's error),
``reject`` (3 calls in 10 raise InvalidRequest, which legacy would accept) or
``crash`` (every call kills the worker: a system failure).

``DEMO_V2_BROKEN_WHILE`` names a file: while it exists, every call raises
RuntimeError, so a test can make ``new`` start failing in the middle of a rollout.
"""

import os

from pitboss_worker import Adapter, InvalidRequest

adapter = Adapter("demo_v2")
_BROKEN = os.environ.get("DEMO_V2_BROKEN", "")
_BROKEN_WHILE = os.environ.get("DEMO_V2_BROKEN_WHILE", "")


def _args(req):
    return req.json() if req.payload else {}


_calls = [0]


def _misbehave():
    _calls[0] += 1
    if _BROKEN_WHILE and os.path.exists(_BROKEN_WHILE):
        raise RuntimeError("demo_v2 is broken on purpose (%s exists)" % _BROKEN_WHILE)
    if _BROKEN == "keyerror" and _calls[0] % 10 < 3:
        raise KeyError("total")  # a bug on 3 calls in 10: the command's fault
    if _BROKEN == "reject" and _calls[0] % 10 < 3:
        raise InvalidRequest("demo_v2 rejects this on purpose (DEMO_V2_BROKEN=reject)")
    if _BROKEN == "raise":
        raise RuntimeError("demo_v2 is broken on purpose (DEMO_V2_BROKEN=raise)")
    if _BROKEN == "crash":
        os._exit(3)


@adapter.command
def echo(req):
    """Return the payload unchanged."""
    _misbehave()
    return req.payload


@adapter.command
def compute(req):
    """The sum of i*i for i < n ({"n": N}, default 10000), computed the v2 way."""
    _misbehave()
    n = int(_args(req).get("n", 10000))
    if n < 0:
        raise InvalidRequest("n must be at least 0, not %d" % n)  # the caller's error
    return {"n": n, "sum": (n - 1) * n * (2 * n - 1) // 6, "engine": "v2"}


@adapter.session_state
def new_session(session_id):
    return {"count": 0}


@adapter.command
def counter(req):
    """Count the calls of this session."""
    _misbehave()
    if req.session is None:
        raise InvalidRequest("counter needs a session: send the request with a session id")
    req.session["count"] += 1
    return {"count": req.session["count"], "pid": os.getpid()}


@adapter.command
def stream(req):
    """Stream {"i": 0} .. {"i": n-1} ({"n": N}, default 3)."""
    _misbehave()
    for i in range(int(_args(req).get("n", 3))):
        yield {"i": i}


@adapter.command
def version(req):
    """Which adapter version answers: {"version": 2}."""
    _misbehave()
    return {"version": 2}


@adapter.command
def whoami(req):
    """The worker's process id: {"pid": pid}."""
    return {"pid": os.getpid()}
