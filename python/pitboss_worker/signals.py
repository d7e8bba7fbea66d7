"""SIGTERM makes the worker exit at once with status 0. pitboss asks a worker to
stop with a SHUTDOWN frame first; SIGTERM comes after the grace period (see
docs/PROTOCOL.md).

Uses the C module ``_signal``: ``import signal`` also builds its enums at start-up.
"""

import _signal
import os
import threading

__all__ = ["install_sigterm"]


def _on_sigterm(signum, frame):
    try:
        os.write(2, b"pitboss_worker: SIGTERM, exiting\n")
    except OSError:
        pass
    os._exit(0)


def _watch_signals(fd):
    # Python runs signal handlers on the main thread, between bytecodes: a main thread
    # stuck in C code would delay SIGTERM. The C-level handler also writes the signal
    # number to the wakeup fd, so this thread sees it at once.
    while True:
        try:
            data = os.read(fd, 64)
        except OSError:
            return
        if not data:
            return
        if _signal.SIGTERM in data and _signal.getsignal(_signal.SIGTERM) is _on_sigterm:
            _on_sigterm(_signal.SIGTERM, None)


def install_sigterm():
    """Installs the SIGTERM handler and the thread that runs it without waiting for
    the main thread (main thread only, before the adapter is imported)."""
    _signal.signal(_signal.SIGTERM, _on_sigterm)
    try:
        r, w = os.pipe()
        os.set_blocking(w, False)
        _signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    except (OSError, ValueError):
        return
    threading.Thread(target=_watch_signals, args=(r,), name="pitboss-signals", daemon=True).start()
