"""Hooks into the running worker, for adapters and for tests of pitboss itself.

``max_frame_bytes()`` is safe for any adapter. The ``unsafe_*`` hooks exist for fault
injection only (``examples/faults.py``): they reach past the runtime to the protocol
channel, and what they write can make pitboss kill the worker.

The CLI (``cli.main``) registers the :class:`~pitboss_worker.runtime.Runtime` it starts
with :func:`install`; outside a worker process there is none and the hooks say so.
"""

from .protocol import DEFAULT_MAX_FRAME_BYTES

__all__ = [
    "current",
    "max_frame_bytes",
    "unsafe_protocol_fd",
    "unsafe_write_raw",
    "unsafe_close_protocol_output",
]

_RUNTIME = None  # the running Runtime, set once by install()


def install(runtime):
    """Makes ``runtime`` the one the hooks act on (the CLI, once it is built)."""
    global _RUNTIME
    _RUNTIME = runtime


def current():
    """The running Runtime, or None when not running under ``python -m pitboss_worker``."""
    return _RUNTIME


def max_frame_bytes():
    """The maximum frame size this worker was started with."""
    return _RUNTIME.max_frame_bytes if _RUNTIME is not None else DEFAULT_MAX_FRAME_BYTES


def unsafe_protocol_fd():
    """UNSAFE, for fault injection only: the real protocol output fd.

    Anything written there goes straight to pitboss; bytes that are not a valid frame
    make pitboss kill this worker. None when not running under the runtime.
    """
    return _RUNTIME.out_fd if _RUNTIME is not None else None


def unsafe_write_raw(data):
    """UNSAFE, for fault injection only: writes ``data`` as is to the protocol channel,
    under the channel's write lock (so it is not interleaved with other frames)."""
    _RUNTIME.write(bytes(data))


def unsafe_close_protocol_output():
    """UNSAFE, for fault injection only: closes the protocol output fd. pitboss sees
    EOF; the runtime silently drops everything it would write afterwards."""
    _RUNTIME.close_output()
