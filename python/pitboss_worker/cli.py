"""The worker process: ``python -m pitboss_worker`` (see ``__main__.py``).

Parses argv, starts the reaper, keeps the protocol channel away from user code,
installs the SIGTERM handler, loads the adapter, runs its start-up hooks, sends READY
and hands over to the :class:`~pitboss_worker.runtime.Runtime` until it is done, then
exits. The order matters and is written down in docs/PROTOCOL.md.
"""

import os
import sys

from . import hooks, signals
from .adapter import Adapter
from .protocol import DEFAULT_MAX_FRAME_BYTES
from .runtime import Runtime, _traceback_text

__all__ = ["main", "parse_args", "load_adapter", "UsageError"]

_USAGE = "usage: python -m pitboss_worker --adapter MODULE[:OBJECT] [--max-frame-bytes N] [--concurrency N]"


class UsageError(Exception):
    pass


def parse_args(argv):
    """Parses the worker's argv by hand (argparse costs about 20 ms of startup).

    Returns ``{"adapter": str, "max_frame_bytes": int, "concurrency": int}``; raises
    :class:`UsageError`.
    """
    opts = {"adapter": None, "max_frame_bytes": DEFAULT_MAX_FRAME_BYTES, "concurrency": 1}
    i = 0
    n = len(argv)
    while i < n:
        arg = argv[i]
        i += 1
        if arg in ("-h", "--help"):
            raise UsageError("")
        key, eq, value = arg.partition("=")
        if key not in ("--adapter", "--max-frame-bytes", "--concurrency"):
            raise UsageError("unknown argument %r" % arg)
        if not eq:
            if i >= n:
                raise UsageError("%s needs a value" % key)
            value = argv[i]
            i += 1
        if key == "--adapter":
            if not value or value.startswith(":"):
                raise UsageError("--adapter needs MODULE or MODULE:OBJECT, got %r" % value)
            opts["adapter"] = value
            continue
        try:
            number = int(value)
        except ValueError:
            raise UsageError("%s must be an integer, got %r" % (key, value))
        if key == "--max-frame-bytes":
            if not 256 <= number <= 0xFFFFFFFF:
                raise UsageError("--max-frame-bytes must be between 256 and 4294967295")
            opts["max_frame_bytes"] = number
        else:
            if number < 1:
                raise UsageError("--concurrency must be at least 1")
            opts["concurrency"] = number
    if not opts["adapter"]:
        raise UsageError("--adapter is required")
    return opts


def load_adapter(spec):
    """Imports ``MODULE:OBJECT`` (OBJECT may be dotted) or ``MODULE`` (its ``adapter``)."""
    module_name, _, attr = spec.partition(":")
    __import__(module_name)
    obj = sys.modules[module_name]
    path = attr or "adapter"
    for part in path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise LookupError("module %r has no attribute %r" % (module_name, path))
    if not isinstance(obj, Adapter):
        raise TypeError(
            "%s is a %s, not a pitboss_worker.Adapter" % (spec if attr else module_name + ".adapter", type(obj).__name__)
        )
    return obj


def _protect_stdio():
    """Keeps private duplicates of fds 0 and 1 for the protocol, then points fd 1 at
    stderr and fd 0 at /dev/null: nothing user code does can touch the channel."""
    proto_in = os.dup(0)  # os.dup() makes non-inheritable fds: children do not get them
    proto_out = os.dup(1)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    try:
        os.dup2(2, 1)
    except OSError:  # no stderr: discard
        os.dup2(devnull, 1)
    if devnull > 2:
        os.close(devnull)
    sys.stdout = sys.stderr
    return proto_in, proto_out


def main(argv=None):
    """Entry point of ``python -m pitboss_worker``. Returns only on a usage error."""
    try:
        opts = parse_args(sys.argv[1:] if argv is None else argv)
    except UsageError as e:
        sys.stderr.write("pitboss_worker: %s\n%s\n" % (e, _USAGE) if str(e) else _USAGE + "\n")
        return 2 if str(e) else 0
    # First, while this process has one thread and no private descriptor: the reaper
    # that kills this worker's process group when the worker dies (see reaper.py).
    from . import reaper

    reaper.start()
    proto_in, proto_out = _protect_stdio()
    signals.install_sigterm()
    try:
        adapter = load_adapter(opts["adapter"])
    except BaseException as e:
        if isinstance(e, SystemExit):
            raise
        sys.stderr.write(
            "pitboss_worker: cannot load adapter %r:\n%s" % (opts["adapter"], _traceback_text(e))
        )
        sys.stderr.flush()
        os._exit(1)
    runtime = Runtime(adapter, proto_in, proto_out, opts["max_frame_bytes"], opts["concurrency"])
    hooks.install(runtime)
    try:
        for hook in adapter._on_start:
            hook()
    except BaseException as e:
        if isinstance(e, SystemExit):
            raise
        sys.stderr.write("pitboss_worker: adapter start-up failed:\n%s" % _traceback_text(e))
        sys.stderr.flush()
        os._exit(1)
    if "logging" in sys.modules:
        # The adapter uses logging: its records reach pitboss's logs with the
        # request's id (log.py). Not imported otherwise (it costs start-up time).
        from . import log

        log.install()
    runtime.write(runtime.ready_frame())
    if any(c.is_async for c in adapter.commands.values()):
        runtime.start_loop(wait=False)
    runtime.start_reader()
    runtime.serve()
    # Clean exit: every request has its reply.
    runtime.close_sessions()
    _exit_now(0)


def _exit_now(status):
    """Exits without waiting for threads (user code may have started non-daemon
    ones), after the ``atexit`` handlers and a flush of the standard streams."""
    try:
        import atexit

        atexit._run_exitfuncs()
    except BaseException:
        pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            pass
    os._exit(status)
