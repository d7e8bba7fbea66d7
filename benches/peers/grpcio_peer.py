"""The baseline peer: what a Python shop would build instead of pitboss.

A plain ``grpcio`` server for ``pitboss.v1.Bridge`` (``proto/pitboss/v1/bridge.proto``)
that hands every call to a ``concurrent.futures.ProcessPoolExecutor``. The worker
processes import the same adapter object as pitboss's workers (``--adapter
MODULE:OBJECT``, e.g. ``demo:adapter``) and run its commands with the same ``Request``
objects, converting results the same way as ``pitboss_worker/runtime.py`` does, so the
payloads are byte-identical to pitboss's:

* ``bytes`` (and bytearray/memoryview) pass through, with the request's content type;
* ``str`` is UTF-8, ``text/plain; charset=utf-8``;
* a ``pitboss_worker.Response`` keeps its payload and content type;
* anything else is JSON: ``json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))``,
  ``application/json``.

An empty ``content_type`` in the request becomes ``application/json``, as at pitboss's
edge.

Usage (from the repository root; ``benches/peers/setup.sh`` makes the venv)::

    PY=$(benches/peers/setup.sh)
    $PY benches/peers/grpcio_peer.py --adapter demo:adapter \\
        --python-path python --python-path python/examples --workers 4 --port 0

``--port 0`` picks a free port; once the server is ready (the pool's processes are
started and have imported the adapter) the peer prints ``LISTENING <port>`` on stdout.

Process layout (the simple thing, documented because it differs from pitboss):

* **Stateless calls** (no ``session_id``) go to ONE shared
  ``ProcessPoolExecutor(max_workers=N)``: the textbook idiom. Its N processes are
  started before ``LISTENING``.
* **Session calls**: a process pool has no affinity, so the peer keeps N more
  single-process executors, started lazily on the first session routed to each, and
  sends every call of a session to executor ``crc32(session_id) % N``. The session's
  state lives in that process, in a dict keyed by session id (created by the adapter's
  ``session_state`` factory, or a fresh dict, on the session's first call, and closed
  by ``CloseSession``). With sessions in use the peer thus runs up to 2N processes; the
  stateless benchmarks only ever touch the shared N. Sessions are not balanced by load
  (two busy sessions may hash to the same process) and never expire.
* **Async commands** (``async def``) run with ``asyncio.run`` in the worker process,
  one call at a time per process (no concurrency between async calls, unlike
  pitboss's per-worker event loop).
* **Streaming commands** (generators, sync or async) are run to completion in the
  worker process, which returns the list of chunks; the server then streams them.
  So a stream is BUFFERED: the first chunk arrives only after the last was produced,
  and an exception in the middle of a generator fails the call before any chunk is
  sent. A unary command called with ``ExecuteStream`` yields one chunk, as in pitboss.

What it does not do (see README.md): no supervision (a worker that dies breaks the
pool: every later call fails with UNAVAILABLE until restart), no deadline or
cancellation reaches a running command (a call past its deadline answers
DEADLINE_EXCEEDED, but the worker runs it to the end; only a still-queued call is
dropped), no heartbeats, no timeouts on hung workers, no rollout/backends, and every
request and result is pickled across the pool's pipes.

Errors map to the same codes as pitboss: unknown command NOT_FOUND, Python exception
UNKNOWN, bad request INVALID_ARGUMENT, cancelled CANCELLED, broken pool UNAVAILABLE;
the trailing metadata carries ``x-pitboss-error-class`` (and ``x-pitboss-python-type``).
``GetSession`` and ``ListCommands`` are served too (from the parent's own table and
its own import of the adapter).
"""

import json
import os
import sys
import time

# Nothing heavy at import time: with the ``spawn`` start method every worker process
# imports this file (as ``__mp_main__``). grpc is imported in main() only.

_HERE = os.path.dirname(os.path.abspath(__file__))
_REPO = os.path.dirname(os.path.dirname(_HERE))

# =========================================================================== worker side
# Runs in the pool's processes.

_ADAPTER = None
_COMMANDS = {}
_SESSIONS = {}  # session id -> state (only in the session executors' processes)
_NEXT_ID = [0]
_JSON_ENCODE = None
_TEXT = "text/plain; charset=utf-8"
_JSON = "application/json"


def _load_adapter(spec):
    """Imports ``MODULE:OBJECT`` (OBJECT may be dotted) or ``MODULE`` (its ``adapter``)."""
    from pitboss_worker.adapter import Adapter

    module_name, _, attr = spec.partition(":")
    __import__(module_name)
    obj = sys.modules[module_name]
    for part in (attr or "adapter").split("."):
        obj = getattr(obj, part)
    if not isinstance(obj, Adapter):
        raise TypeError("%s is a %s, not a pitboss_worker.Adapter" % (spec, type(obj).__name__))
    return obj


def _child_init(paths, spec):
    """The executors' initializer: the same set-up as pitboss's worker start."""
    global _ADAPTER, _COMMANDS, _JSON_ENCODE
    for p in reversed(paths):
        if p not in sys.path:
            sys.path.insert(0, p)
    _JSON_ENCODE = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
    _ADAPTER = _load_adapter(spec)
    _COMMANDS = _ADAPTER.commands
    for hook in _ADAPTER._on_start:
        hook()


def _whoami(hold=0.0):
    if hold:
        time.sleep(hold)  # keeps this process busy so that the next task reaches another
    return os.getpid()


def _type_name(exc):
    cls = type(exc)
    module = getattr(cls, "__module__", None)
    name = getattr(cls, "__qualname__", cls.__name__)
    return name if module in (None, "builtins") else "%s.%s" % (module, name)


def _error(kind, exc=None, message=""):
    if exc is None:
        return ("error", kind, "", message, "", os.getpid())
    import traceback

    try:
        msg = str(exc)
    except Exception:
        msg = "<unprintable %s>" % type(exc).__name__
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return ("error", kind, _type_name(exc), msg[:8192], tb[-32768:], os.getpid())


def _encode(req, result):
    """(content_type, payload) of a result: the conversion of runtime.py's _result_frame."""
    from pitboss_worker.adapter import Response

    t = type(result)
    if t is bytes:
        return req.content_type, result
    if t is str:
        return _TEXT, result.encode("utf-8")
    if isinstance(result, Response):
        return result.content_type, result.payload
    if isinstance(result, (bytes, bytearray, memoryview)):
        return req.content_type, bytes(result)
    name = t.__name__
    if name in ("coroutine", "generator", "async_generator"):
        close = getattr(result, "close", None)
        if close is not None:
            close()
        raise TypeError(
            "command %r returned a %s object: declare it with 'async def' or as a "
            "generator function, or pass streaming=/is_async= to @adapter.command" % (req.command, name)
        )
    return _JSON, _JSON_ENCODE(result).encode("utf-8")


async def _await(obj):
    return await obj


async def _collect_async(req, obj):
    chunks = []
    if hasattr(obj, "__aiter__"):
        try:
            async for item in obj:
                chunks.append(_encode(req, item))
        finally:
            await obj.aclose()
    else:
        if hasattr(obj, "__await__"):
            obj = await obj
        for item in obj:
            chunks.append(_encode(req, item))
    return chunks


def _run(command, payload, content_type, session_id, stream):
    """Runs one command. Returns a picklable tuple, never raises:

    * ``("ok", content_type, payload, pid)``
    * ``("stream", [(content_type, payload), ...], pid)``
    * ``("error", kind, python_type, message, traceback, pid)``
    """
    from pitboss_worker.adapter import Cancelled, Request

    cmd = _COMMANDS.get(command)
    if cmd is None:
        return _error(
            "unknown_command",
            message="unknown command %r; known commands: %s" % (command, ", ".join(_COMMANDS)),
        )
    if cmd.streaming and not stream:
        return _error(
            "invalid_request", message="command %r streams its result; call it with ExecuteStream" % command
        )
    _NEXT_ID[0] += 1
    req = Request(_NEXT_ID[0], command, session_id, content_type, payload)
    try:
        if session_id is not None:
            state = _SESSIONS.get(session_id)
            if state is None and session_id not in _SESSIONS:
                factory = _ADAPTER._session_factory
                state = factory(session_id) if factory is not None else {}
                _SESSIONS[session_id] = state
            req._session = state
        if cmd.streaming:
            obj = cmd.func(req)
            if cmd.is_async or hasattr(obj, "__aiter__") or hasattr(obj, "__await__"):
                import asyncio

                chunks = asyncio.run(_collect_async(req, obj))
            else:
                it = iter(obj)
                try:
                    chunks = [_encode(req, item) for item in it]
                finally:
                    close = getattr(it, "close", None)
                    if close is not None:
                        close()
            return ("stream", chunks, os.getpid())
        if cmd.is_async:
            import asyncio

            obj = cmd.func(req)
            if hasattr(obj, "__await__"):
                obj = asyncio.run(obj if type(obj).__name__ == "coroutine" else _await(obj))
            ct, body = _encode(req, obj)
        else:
            ct, body = _encode(req, cmd.func(req))
        if stream:
            return ("stream", [(ct, body)], os.getpid())
        return ("ok", ct, body, os.getpid())
    except Cancelled as e:
        return _error("cancelled", message=str(e) or "the request was cancelled")
    except BaseException as e:  # noqa: B902 -- like the runtime: report, never die
        return _error("exception", e)


def _close_session(session_id):
    state = _SESSIONS.pop(session_id, None)
    close = getattr(state, "close", None)
    if close is not None and callable(close):
        try:
            close()
        except BaseException as e:
            sys.stderr.write("grpcio_peer: close() of session %s raised %s: %s\n" % (session_id, _type_name(e), e))
    return True


# =========================================================================== server side


def _load_stubs(proto_dir):
    """Generates the Python stubs from the .proto into a temp dir (removed at exit)."""
    import atexit
    import shutil
    import tempfile

    from grpc_tools import protoc

    out = tempfile.mkdtemp(prefix="pitboss-peer-stubs-")
    atexit.register(shutil.rmtree, out, True)
    include = os.path.join(os.path.dirname(protoc.__file__), "_proto")
    rc = protoc.main(
        [
            "protoc",
            "-I",
            proto_dir,
            "-I",
            include,
            "--python_out",
            out,
            "--grpc_python_out",
            out,
            os.path.join(proto_dir, "pitboss", "v1", "bridge.proto"),
        ]
    )
    if rc != 0:
        raise SystemExit("grpcio_peer: protoc failed on %s" % proto_dir)
    sys.path.insert(0, out)
    from pitboss.v1 import bridge_pb2, bridge_pb2_grpc

    return bridge_pb2, bridge_pb2_grpc


def _parse_args(argv):
    import argparse

    p = argparse.ArgumentParser(description="grpcio + ProcessPoolExecutor peer of pitboss (a benchmark baseline)")
    p.add_argument("--adapter", required=True, help="MODULE:OBJECT, e.g. demo:adapter")
    p.add_argument("--python-path", action="append", default=[], metavar="DIR",
                   help="prepended to sys.path here and in the workers (repeatable)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes in the pool (N)")
    p.add_argument("--grpc-threads", type=int, default=None, help="gRPC handler threads (default 2*N)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=50052, help="0: pick a free port, print LISTENING <port>")
    p.add_argument("--proto-dir", default=os.path.join(_REPO, "proto"))
    p.add_argument("--start-method", default="spawn", choices=["spawn", "forkserver", "fork"],
                   help="multiprocessing start method (fork is unsafe once grpc threads run)")
    args = p.parse_args(argv)
    if args.workers < 1:
        p.error("--workers must be at least 1")
    if args.grpc_threads is None:
        args.grpc_threads = 2 * args.workers
    if args.grpc_threads < 1:
        p.error("--grpc-threads must be at least 1")
    args.python_path = [os.path.abspath(d) for d in args.python_path]
    return args


def main(argv=None):
    args = _parse_args(sys.argv[1:] if argv is None else argv)
    for d in reversed(args.python_path):
        sys.path.insert(0, d)

    import multiprocessing
    import signal
    import threading
    import uuid
    import zlib
    from concurrent import futures
    from concurrent.futures.process import BrokenProcessPool

    import grpc

    pb, pb_grpc = _load_stubs(args.proto_dir)
    adapter = _load_adapter(args.adapter)  # for ListCommands; the workers load their own
    ctx = multiprocessing.get_context(args.start_method)
    n = args.workers
    initargs = (args.python_path, args.adapter)

    def new_executor(workers):
        return futures.ProcessPoolExecutor(
            max_workers=workers, mp_context=ctx, initializer=_child_init, initargs=initargs
        )

    pool = new_executor(n)
    session_executors = [None] * n
    session_lock = threading.Lock()
    sessions = {}  # session id -> pb.Session

    def session_executor(session_id):
        i = zlib.crc32(session_id.encode("utf-8")) % n
        with session_lock:
            ex = session_executors[i]
            if ex is None:
                ex = session_executors[i] = new_executor(1)
            return ex

    # Start the shared pool's N processes (spawned on demand: N submits at once start N)
    # and wait until each has imported the adapter and answered, so LISTENING means
    # ready: rounds of N tasks that hold their process a little, until N pids answered.
    t0 = time.monotonic()
    pids = set()
    hold = 0.02
    while len(pids) < n and time.monotonic() - t0 < 60:
        pids.update(f.result() for f in [pool.submit(_whoami, hold) for _ in range(n)])
        hold = min(hold * 2, 1.0)
    sys.stderr.write(
        "grpcio_peer: %d worker processes ready in %.2fs (pids %s), adapter %s, %d gRPC threads\n"
        % (n, time.monotonic() - t0, sorted(pids), args.adapter, args.grpc_threads)
    )

    max_msg = 16 * 1024 * 1024  # pitboss's default max frame size

    def fail(context, code, kind, message, python_type=""):
        md = [("x-pitboss-error-class", kind), ("x-pitboss-backend", "peer")]
        if python_type:
            md.append(("x-pitboss-python-type", python_type))
        context.set_trailing_metadata(tuple(md))
        context.abort(code, message)

    def remaining(context):
        t = context.time_remaining()  # huge (not None) when the client set no deadline
        return None if t is None or t > 1e6 else t

    codes = {
        "unknown_command": grpc.StatusCode.NOT_FOUND,
        "invalid_request": grpc.StatusCode.INVALID_ARGUMENT,
        "exception": grpc.StatusCode.UNKNOWN,
        "cancelled": grpc.StatusCode.CANCELLED,
    }

    def call(request, context, stream):
        """Submits one call and waits for it; returns the worker's tuple or aborts."""
        if not request.command:
            fail(context, grpc.StatusCode.INVALID_ARGUMENT, "invalid_request", "command must not be empty")
        session_id = request.session_id or None
        if session_id is not None:
            if session_id not in sessions:
                fail(context, grpc.StatusCode.NOT_FOUND, "session_not_found", "session %r not found" % session_id)
            ex = session_executor(session_id)
        else:
            ex = pool
        try:
            fut = ex.submit(
                _run, request.command, request.payload, request.content_type or _JSON, session_id, stream
            )
        except (BrokenProcessPool, RuntimeError) as e:
            fail(context, grpc.StatusCode.UNAVAILABLE, "worker_crashed", "the process pool is broken: %s" % e)
        context.add_callback(fut.cancel)  # drops it if still queued; a running call runs on
        try:
            out = fut.result(timeout=remaining(context))
        except futures.TimeoutError:
            fut.cancel()
            fail(context, grpc.StatusCode.DEADLINE_EXCEEDED, "deadline_exceeded", "deadline exceeded")
        except futures.CancelledError:
            fail(context, grpc.StatusCode.CANCELLED, "cancelled", "the request was cancelled")
        except BrokenProcessPool as e:
            fail(context, grpc.StatusCode.UNAVAILABLE, "worker_crashed", "a worker process died: %s" % e)
        if out[0] == "error":
            _, kind, ptype, message, tb, pid = out
            if kind == "exception":
                message = "python exception in command %r on pid-%d: %s: %s" % (request.command, pid, ptype, message)
            fail(context, codes.get(kind, grpc.StatusCode.INTERNAL), kind, message, ptype)
        return out

    class Bridge(pb_grpc.BridgeServicer):
        def Execute(self, request, context):
            _, ct, body, pid = call(request, context, False)
            return pb.ExecuteResponse(
                payload=body, content_type=ct, backend="peer", worker_id="pid-%d" % pid, attempts=1
            )

        def ExecuteStream(self, request, context):
            _, chunks, pid = call(request, context, True)
            last = len(chunks) - 1
            for i, (ct, body) in enumerate(chunks):
                if i < last:
                    yield pb.ExecuteChunk(payload=body, content_type=ct)
                else:
                    yield pb.ExecuteChunk(
                        payload=body, content_type=ct, last=True, backend="peer",
                        worker_id="pid-%d" % pid, attempts=1,
                    )
            if not chunks:
                yield pb.ExecuteChunk(last=True, backend="peer", worker_id="pid-%d" % pid, attempts=1)

        def CreateSession(self, request, context):
            sid = request.session_id or uuid.uuid4().hex
            if len(sid) > 128 or not all(c.isascii() and (c.isalnum() or c in "-_.:") for c in sid):
                fail(context, grpc.StatusCode.INVALID_ARGUMENT, "invalid_request",
                     "session id may contain only ASCII letters, digits and - _ . : (1 to 128 bytes)")
            with session_lock:
                if sid in sessions:
                    fail(context, grpc.StatusCode.ALREADY_EXISTS, "invalid_request", "session %r exists" % sid)
                sessions[sid] = None  # reserved
            try:
                pid = session_executor(sid).submit(_whoami).result(timeout=remaining(context))
            except Exception as e:
                with session_lock:
                    sessions.pop(sid, None)
                fail(context, grpc.StatusCode.UNAVAILABLE, "worker_crashed", "cannot start the session's worker: %s" % e)
            s = pb.Session(session_id=sid, backend="peer", worker_id="pid-%d" % pid, metadata=dict(request.metadata))
            s.created_at.GetCurrentTime()
            with session_lock:
                sessions[sid] = s
            return s

        def GetSession(self, request, context):
            s = sessions.get(request.session_id)
            if s is None:
                fail(context, grpc.StatusCode.NOT_FOUND, "session_not_found", "session %r not found" % request.session_id)
            return s

        def CloseSession(self, request, context):
            sid = request.session_id
            with session_lock:
                s = sessions.pop(sid, None)
            if s is None:
                fail(context, grpc.StatusCode.NOT_FOUND, "session_not_found", "session %r not found" % sid)
            try:
                session_executor(sid).submit(_close_session, sid).result(timeout=remaining(context))
            except Exception as e:
                fail(context, grpc.StatusCode.UNAVAILABLE, "worker_crashed", "closing the session failed: %s" % e)
            return pb.CloseSessionResponse()

        def ListCommands(self, request, context):
            return pb.ListCommandsResponse(
                commands=[
                    pb.CommandInfo(name=c.name, streaming=c.streaming, is_async=c.is_async, doc=c.doc, backends=["peer"])
                    for c in adapter.commands.values()
                ]
            )

    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=args.grpc_threads),
        options=[("grpc.max_send_message_length", max_msg), ("grpc.max_receive_message_length", max_msg)],
    )
    pb_grpc.add_BridgeServicer_to_server(Bridge(), server)
    port = server.add_insecure_port("%s:%d" % (args.host, args.port))
    if port == 0:
        raise SystemExit("grpcio_peer: cannot bind %s:%d" % (args.host, args.port))
    server.start()

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    sys.stdout.write("LISTENING %d\n" % port)
    sys.stdout.flush()
    sys.stderr.write("grpcio_peer: serving pitboss.v1.Bridge on %s:%d\n" % (args.host, port))
    while not stop.wait(3600):
        pass
    sys.stderr.write("grpcio_peer: stopping\n")
    server.stop(grace=2).wait()
    pool.shutdown(wait=True, cancel_futures=True)
    for ex in session_executors:
        if ex is not None:
            ex.shutdown(wait=True, cancel_futures=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
