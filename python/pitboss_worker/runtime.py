"""The worker runtime: reads frames from pitboss, runs commands, writes replies.

Threads:

* the **reader** thread reads the protocol pipe in large chunks and splits it into
  frames. It answers PING at once (so heartbeats work while a synchronous command
  runs), marks cancelled requests, and queues everything else for the executor;
* the **executor** (the main thread) takes queued frames in batches, runs synchronous
  commands inline, and writes all of a batch's replies with one ``os.write``: with
  several requests pipelined, both sides then pay one syscall per batch;
* an **asyncio loop** thread, started only if the adapter has ``async`` commands,
  runs those concurrently; each writes its own reply.

Every write to the protocol pipe takes one lock and writes whole frames.
"""

import collections
import os
import signal
import sys
import threading

from . import protocol as P
from .adapter import Request, Response

_PROTO_OUT = None


def unsafe_protocol_fd():
    """The real protocol output fd. Only for fault-injection adapters that need to
    break the channel on purpose; anything written here must be valid frames."""
    return _PROTO_OUT


def _type_name(exc):
    cls = type(exc)
    if cls.__module__ in ("builtins", "__main__"):
        return cls.__qualname__
    return "%s.%s" % (cls.__module__, cls.__qualname__)


# Error bodies are cut to these sizes so that no exception, however verbose, can turn
# into a frame over the limit (which pitboss would treat as a protocol violation).
_MAX_MESSAGE = 8 * 1024
_MAX_TRACEBACK = 32 * 1024


def _cut(text, limit, keep_end=False):
    if len(text) <= limit:
        return text
    return "..." + text[-limit:] if keep_end else text[:limit] + "..."


def _error_frame(rid, kind, error_type="", message="", tb=""):
    import json
    body = json.dumps({"kind": kind, "type": _cut(error_type, 256), "message": _cut(message, _MAX_MESSAGE),
                       "traceback": _cut(tb, _MAX_TRACEBACK, keep_end=True)}).encode("utf-8")
    return P.encode(P.ERROR, rid, body)


def _exception_frame(rid, exc):
    import traceback
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return _error_frame(rid, "exception", _type_name(exc), str(exc), tb)


class Worker:
    def __init__(self, adapter, in_fd, out_fd, max_frame_bytes=P.DEFAULT_MAX_FRAME_BYTES,
                 concurrency=1):
        self.adapter = adapter
        self.commands = adapter.commands
        self.in_fd = in_fd
        self.out_fd = out_fd
        self.max_frame_bytes = max_frame_bytes
        self.concurrency = concurrency
        self._write_lock = threading.Lock()
        self._queue = collections.deque()
        self._cond = threading.Condition()
        self._requests = {}  # request id -> Request, until its terminal frame
        self._sessions = {}
        self._tasks = {}  # request id -> asyncio task
        self._async_inflight = 0
        self._async_idle = threading.Condition()
        self._loop = None

    # === output ===

    def write(self, data):
        view = memoryview(data)
        with self._write_lock:
            while view:
                n = os.write(self.out_fd, view)
                view = view[n:]

    def _encode_result(self, req, result, kind=P.RESPONSE):
        if isinstance(result, Response):
            ct, payload = result.content_type, result.payload
        elif isinstance(result, (bytes, bytearray, memoryview)):
            ct, payload = req.content_type or "application/octet-stream", bytes(result)
        elif isinstance(result, str):
            ct, payload = "text/plain; charset=utf-8", result.encode("utf-8")
        else:
            import json
            ct = "application/json"
            payload = json.dumps(result, separators=(",", ":")).encode("utf-8")
        if len(payload) + len(ct) + 14 > self.max_frame_bytes:
            return _error_frame(req.request_id, "response_too_large", "", (
                "result of %d bytes exceeds the maximum frame size of %d bytes"
                % (len(payload), self.max_frame_bytes)))
        return P.encode_payload(kind, req.request_id, ct, payload)

    # === sessions ===

    def session_state(self, session_id):
        state = self._sessions.get(session_id)
        if state is None:
            factory = self.adapter._session_factory
            state = factory(session_id) if factory is not None else {}
            self._sessions[session_id] = state
        return state

    def close_session(self, session_id):
        state = self._sessions.pop(session_id, None)
        close = getattr(state, "close", None)
        if callable(close):
            try:
                close()
            except Exception as exc:  # user code: report, never die
                sys.stderr.write("session %s close() raised %s: %s\n" % (session_id, _type_name(exc), exc))

    # === reader thread ===

    def read_loop(self):
        reader = P.FrameReader(self.max_frame_bytes)
        queue, cond = self._queue, self._cond
        while True:
            try:
                data = os.read(self.in_fd, 1 << 20)
            except OSError:
                data = b""
            if not data:
                with cond:
                    queue.append((P.SHUTDOWN, 0, None))
                    cond.notify()
                return
            try:
                frames = reader.feed(data)
            except P.ProtocolError as exc:
                self._fatal("bad frame from pitboss: %s" % exc)
                return
            batch = []
            pongs = []
            for kind, rid, body in frames:
                if kind == P.REQUEST:
                    try:
                        command, session_id, ct, timeout_ms, payload = P.decode_request(body)
                    except P.ProtocolError as exc:
                        self._fatal("bad REQUEST from pitboss: %s" % exc)
                        return
                    req = Request(rid, command, session_id, ct,
                                  timeout_ms / 1000.0 if timeout_ms else None, payload, self)
                    self._requests[rid] = req
                    batch.append((P.REQUEST, rid, req))
                elif kind == P.PING:
                    pongs.append(P.encode(P.PONG, rid))
                elif kind == P.CANCEL:
                    self._cancel(rid)
                elif kind == P.SESSION_CLOSE:
                    batch.append((P.SESSION_CLOSE, 0, body.decode("utf-8", "replace")))
                elif kind == P.SHUTDOWN:
                    batch.append((P.SHUTDOWN, 0, None))
                else:
                    self._fatal("unexpected %s frame from pitboss" % P.KIND_NAMES.get(kind, kind))
                    return
            if pongs:
                self.write(b"".join(pongs))
            if batch:
                with cond:
                    queue.extend(batch)
                    cond.notify()

    def _cancel(self, rid):
        req = self._requests.get(rid)
        if req is None:
            return  # already finished: ignore
        req.cancelled = True
        task = self._tasks.get(rid)
        if task is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(task.cancel)

    def _fatal(self, message):
        sys.stderr.write("pitboss_worker: %s; exiting\n" % message)
        sys.stderr.flush()
        os._exit(2)

    # === executor (main thread) ===

    def run(self):
        """Serves until SHUTDOWN or EOF, then waits for async commands and returns."""
        if any(c.is_async for c in self.commands.values()):
            self._start_loop()
        threading.Thread(target=self.read_loop, name="pitboss-reader", daemon=True).start()
        queue, cond = self._queue, self._cond
        while True:
            with cond:
                while not queue:
                    cond.wait()
                items = list(queue)
                queue.clear()
            out = []
            for kind, rid, item in items:
                if kind == P.REQUEST:
                    self._execute(item, out)
                elif kind == P.SESSION_CLOSE:
                    self.close_session(item)
                else:  # SHUTDOWN or EOF
                    if out:
                        self.write(b"".join(out))
                    self._wait_async()
                    return
            if out:
                self.write(b"".join(out))

    def _execute(self, req, out):
        rid = req.request_id
        cmd = self.commands.get(req.command)
        if cmd is None:
            self._requests.pop(rid, None)
            out.append(_error_frame(rid, "unknown_command", "", "unknown command %r; known commands: %s"
                                    % (req.command, ", ".join(sorted(self.commands)))))
            return
        if req.cancelled:
            self._requests.pop(rid, None)
            out.append(_error_frame(rid, "cancelled", "", "cancelled before it started"))
            return
        if cmd.is_async:
            self._submit_async(cmd, req)
            return
        try:
            if cmd.streaming:
                if out:  # keep replies in order and send them before a long stream
                    self.write(b"".join(out))
                    del out[:]
                self._stream_sync(cmd, req)
            else:
                out.append(self._encode_result(req, cmd.func(req)))
        except Exception as exc:
            out.append(_exception_frame(rid, exc))
        finally:
            self._requests.pop(rid, None)

    def _stream_sync(self, cmd, req):
        for item in cmd.func(req):
            if req.cancelled:
                self.write(_error_frame(req.request_id, "cancelled", "", "cancelled while streaming"))
                return
            self.write(self._encode_result(req, item, P.STREAM_CHUNK))
        self.write(P.encode(P.STREAM_END, req.request_id))

    # === asyncio ===

    def _start_loop(self):
        import asyncio
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run_loop():
            asyncio.set_event_loop(self._loop)
            self._loop.call_soon(ready.set)
            self._loop.run_forever()

        threading.Thread(target=run_loop, name="pitboss-asyncio", daemon=True).start()
        ready.wait()

    def _submit_async(self, cmd, req):
        import asyncio
        with self._async_idle:
            self._async_inflight += 1
        asyncio.run_coroutine_threadsafe(self._run_async(cmd, req), self._loop)

    async def _run_async(self, cmd, req):
        import asyncio
        rid = req.request_id
        self._tasks[rid] = asyncio.current_task()
        try:
            if req.cancelled:
                raise asyncio.CancelledError()
            if cmd.streaming:
                async for item in cmd.func(req):
                    self.write(self._encode_result(req, item, P.STREAM_CHUNK))
                self.write(P.encode(P.STREAM_END, rid))
            else:
                result = await cmd.func(req)
                self.write(self._encode_result(req, result))
        except asyncio.CancelledError:
            self.write(_error_frame(rid, "cancelled", "", "cancelled"))
        except Exception as exc:
            self.write(_exception_frame(rid, exc))
        finally:
            self._tasks.pop(rid, None)
            self._requests.pop(rid, None)
            with self._async_idle:
                self._async_inflight -= 1
                self._async_idle.notify_all()

    def _wait_async(self):
        with self._async_idle:
            while self._async_inflight:
                self._async_idle.wait()


def _load_adapter(spec):
    import importlib
    module_name, _, attr = spec.partition(":")
    module = importlib.import_module(module_name)
    obj = getattr(module, attr or "adapter", None)
    if obj is None:
        raise SystemExit("pitboss_worker: %s has no attribute %r" % (module_name, attr or "adapter"))
    if not hasattr(obj, "commands"):
        raise SystemExit("pitboss_worker: %s is not an Adapter" % spec)
    return obj


def _usage(message):
    sys.stderr.write("pitboss_worker: %s\nusage: python -m pitboss_worker --adapter MODULE:OBJECT "
                     "[--max-frame-bytes N] [--concurrency N]\n" % message)
    sys.exit(64)


def parse_args(argv):
    """Hand-rolled on purpose: importing argparse costs about 20 ms of startup."""
    opts = {"adapter": None, "max_frame_bytes": P.DEFAULT_MAX_FRAME_BYTES, "concurrency": 1}
    it = iter(argv)
    for arg in it:
        key, eq, value = arg.partition("=")
        if key not in ("--adapter", "--max-frame-bytes", "--concurrency"):
            _usage("unknown argument %r" % arg)
        if not eq:
            value = next(it, None)
            if value is None:
                _usage("%s needs a value" % key)
        if key == "--adapter":
            opts["adapter"] = value
        else:
            try:
                number = int(value)
            except ValueError:
                _usage("%s must be an integer, got %r" % (key, value))
            if number < 1:
                _usage("%s must be positive" % key)
            opts["max_frame_bytes" if key == "--max-frame-bytes" else "concurrency"] = number
    if not opts["adapter"]:
        _usage("--adapter is required")
    return opts


def main(argv=None):
    global _PROTO_OUT
    opts = parse_args(sys.argv[1:] if argv is None else argv)
    # Keep private handles on the channel, then make fds 0 and 1 harmless before any
    # user code runs: print(), C extensions writing to fd 1, and input() cannot touch it.
    proto_in = os.dup(0)
    proto_out = os.dup(1)
    _PROTO_OUT = proto_out
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))

    adapter = _load_adapter(opts["adapter"])
    worker = Worker(adapter, proto_in, proto_out, opts["max_frame_bytes"], opts["concurrency"])
    for hook in getattr(adapter, "_on_start", ()):
        hook()
    import json
    ready = {
        "protocol": P.PROTOCOL_VERSION,
        "pid": os.getpid(),
        "adapter": adapter.name,
        "commands": [c.describe() for c in adapter.commands.values()],
        "python": "%d.%d.%d" % sys.version_info[:3],
    }
    worker.write(P.encode(P.READY, 0, json.dumps(ready).encode("utf-8")))
    worker.run()
    return 0
