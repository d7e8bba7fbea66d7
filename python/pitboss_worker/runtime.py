"""The worker runtime: reads frames from pitboss, runs commands, writes replies.

Threads:

* the **reader** thread reads the protocol pipe in large chunks and splits them into
  frames. It answers ``PING`` at once (heartbeats keep working while a synchronous
  command runs), handles ``CANCEL`` at once, and queues ``REQUEST`` and
  ``SESSION_CLOSE`` for the executor;
* the **executor** (the main thread) takes queued work in batches, runs synchronous
  commands inline and writes a batch's replies with one ``os.write``: with several
  requests pipelined, each side pays one syscall per batch instead of one per request;
* an **asyncio loop** thread, started only if the adapter has ``async`` commands, runs
  those concurrently; they write their own replies (batched per loop iteration).

Every write to the protocol pipe goes through one lock and writes whole frames.

Exit: on ``SHUTDOWN`` or EOF of stdin, the runtime finishes what is queued and in
flight, closes session state, runs ``atexit`` handlers and exits 0. A synchronous
command that never returns blocks that; pitboss then kills the process. SIGTERM exits
at once with status 0. Malformed input from pitboss exits with status 2.
"""

import _signal  # the C module: ``import signal`` also builds its enums at startup
import collections
import os
import sys
import threading
import time

from . import protocol as P
from .adapter import Adapter, Cancelled, InvalidRequest, Request, Response, ResultError

__all__ = [
    "main",
    "Runtime",
    "load_adapter",
    "parse_args",
    "max_frame_bytes",
    "unsafe_protocol_fd",
    "unsafe_write_raw",
    "unsafe_close_protocol_output",
]

# Request states, guarded by Runtime._lock.
_QUEUED = 0
_RUNNING = 1  # a synchronous command on the executor
_ASYNC = 2  # handed to the asyncio loop
_DONE = 3

# Work items besides Request objects.
_SHUTDOWN = object()
_EOF = object()

#: The executor writes what it has collected once a batch has run this long (seconds),
#: so that a slow command does not hold back the replies of many fast ones behind it.
_FLUSH_AFTER = 0.001

_TEXT = b"text/plain; charset=utf-8"
_JSON = b"application/json"

_monotonic = time.monotonic
_write = os.write
_PAYLOAD_PACK = P.PAYLOAD_FRAME_HEADER.pack
_HEADER_PACK = P.HEADER.pack
_REQ_UNPACK_FROM = P.REQUEST_HEAD.unpack_from
_U32_UNPACK_FROM = P._U32.unpack_from

_RUNTIME = None  # the running Runtime, for the hooks below


# --------------------------------------------------------------------------- hooks


def max_frame_bytes():
    """The maximum frame size this worker was started with."""
    return _RUNTIME.max_frame_bytes if _RUNTIME is not None else P.DEFAULT_MAX_FRAME_BYTES


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


# --------------------------------------------------------------------------- helpers


def _die(message, status):
    """Reports on stderr and exits at once (any thread)."""
    try:
        os.write(2, ("pitboss_worker: %s\n" % message).encode("utf-8", "replace"))
    except OSError:
        pass
    os._exit(status)


def _bad_frame(detail):
    """Input from pitboss that breaks the protocol: report it and exit with status 2."""
    _die("bad frame from pitboss: %s; exiting" % detail, 2)


def _type_name(exc):
    cls = type(exc)
    module = getattr(cls, "__module__", None)
    name = getattr(cls, "__qualname__", cls.__name__)
    if module in (None, "builtins"):
        return name
    return "%s.%s" % (module, name)


def _message(exc):
    try:
        return str(exc)
    except Exception:
        return "<unprintable %s>" % type(exc).__name__


def _traceback_text(exc):
    import traceback

    tb = exc.__traceback__
    # Drop the runtime's own frames at the top: the user's code is what matters.
    skipped = tb
    while skipped is not None and skipped.tb_frame.f_code.co_filename == __file__:
        skipped = skipped.tb_next
    if skipped is not None:
        tb = skipped
    try:
        return "".join(traceback.format_exception(type(exc), exc, tb))
    except Exception:
        return "%s: %s\n" % (_type_name(exc), _message(exc))


# Error texts are cut to these lengths (characters): no exception, however verbose,
# makes a huge ERROR frame. A traceback keeps its end, where the error is.
_MAX_MESSAGE = 8 * 1024
_MAX_TRACEBACK = 32 * 1024


def _cut(text, limit, keep_end=False):
    if len(text) <= limit:
        return text
    return "..." + text[-limit:] if keep_end else text[:limit] + "..."


class _TooLarge(Exception):
    pass


class Runtime(object):
    """Serves one adapter over a pair of file descriptors."""

    def __init__(self, adapter, in_fd, out_fd, max_frame_bytes=P.DEFAULT_MAX_FRAME_BYTES, concurrency=1):
        import json

        self.adapter = adapter
        self.commands = adapter.commands
        self.in_fd = in_fd
        self.out_fd = out_fd
        self.max_frame_bytes = max_frame_bytes
        #: How many requests pitboss may have in flight here (informational: the host
        #: enforces it).
        self.concurrency = concurrency
        self._json_dumps = json.dumps
        self._json_encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
        self._wlock = threading.Lock()
        self._out_closed = False
        # Request bookkeeping, shared by the reader, the executor and the loop.
        self._lock = threading.Lock()
        self._pending = {}  # request id -> Request, until its terminal frame is out
        self._shutting_down = False
        # Reader -> executor.
        self._work = collections.deque()
        self._cv = threading.Condition(threading.Lock())
        # Executor state.
        self._sessions = {}
        self._out = []
        self._costs = {}  # command name -> recent average run time (seconds)
        # Asyncio state (loop thread only, except _loop).
        self._loop = None
        self._loop_ready = None
        self._loop_error = None
        self._asyncio = None
        self._aout = []
        self._adone = []
        self._aflush_scheduled = False

    # ------------------------------------------------------------------ output

    def write(self, data):
        """Writes whole frames to pitboss (any thread)."""
        with self._wlock:
            if self._out_closed:
                return
            try:
                n = _write(self.out_fd, data)
                if n != len(data):
                    view = memoryview(data)
                    while n < len(view):
                        n += _write(self.out_fd, view[n:])
            except OSError as e:
                if self._out_closed:
                    return
                _die("cannot write to pitboss (%s); exiting" % e, 1)

    def close_output(self):
        with self._wlock:
            if not self._out_closed:
                self._out_closed = True
                try:
                    os.close(self.out_fd)
                except OSError:
                    pass

    def _flush(self):
        out = self._out
        if out:
            data = out[0] if len(out) == 1 else b"".join(out)
            out.clear()
            self.write(data)

    def error_frame(self, request_id, kind, error_type="", message="", traceback=""):
        body = {
            "kind": kind,
            "type": _cut(error_type, 256),
            "message": _cut(message, _MAX_MESSAGE),
            "traceback": _cut(traceback, _MAX_TRACEBACK, keep_end=True),
        }
        data = self._json_dumps(body).encode("utf-8")
        limit = self.max_frame_bytes - P.HEADER_LEN
        while len(data) > limit and (body["traceback"] or body["message"]):
            # Never send an oversized frame: shorten the longest field.
            key = "traceback" if len(body["traceback"]) >= len(body["message"]) else "message"
            text = body[key]
            body[key] = text[: len(text) // 2] + "...[truncated]" if len(text) > 32 else ""
            data = self._json_dumps(body).encode("utf-8")
        return P.encode(P.ERROR, request_id, data)

    def _exception_frame(self, request_id, exc):
        # An explicit InvalidRequest (raised by req.json() for a payload it cannot
        # decode, or by the adapter) is the caller's error; any other exception is the
        # command failing to produce an answer, which pitboss must not blame on the
        # caller (auto-rollback counts it).
        kind = "invalid_request" if isinstance(exc, InvalidRequest) else "exception"
        return self.error_frame(
            request_id, kind, _type_name(exc), _message(exc), _traceback_text(exc)
        )

    def _cancelled_frame(self, request_id, message="the request was cancelled"):
        return self.error_frame(request_id, "cancelled", "", message)

    def _result_frame(self, req, result, kind):
        """Encodes a command's result as a RESPONSE or STREAM_CHUNK frame."""
        t = type(result)
        if t is bytes:
            ct = req.content_type.encode("utf-8")
            payload = result
        elif t is str:
            ct = _TEXT
            payload = result.encode("utf-8")
        elif isinstance(result, Response):
            ct = result.content_type.encode("utf-8")
            payload = result.payload
        elif isinstance(result, (bytes, bytearray, memoryview)):
            ct = req.content_type.encode("utf-8")
            payload = bytes(result)
        else:
            name = t.__name__
            if name in ("coroutine", "generator", "async_generator"):
                close = getattr(result, "close", None)
                if close is not None:
                    close()
                raise ResultError(
                    "command %r returned a %s object: declare it with 'async def' or as a "
                    "generator function, or pass streaming=/is_async= to @adapter.command"
                    % (req.command, name)
                )
            ct = _JSON
            try:
                payload = self._json_encode(result).encode("utf-8")
            except (TypeError, ValueError) as e:
                # The command's fault, not the caller's: reported as such.
                raise ResultError("the result of %r cannot be encoded as JSON: %s" % (req.command, e)) from e
        length = P.HEADER_LEN + 2 + len(ct) + len(payload)
        if length > self.max_frame_bytes:
            raise _TooLarge(
                "the result of %r is %d bytes as a frame; the maximum frame size is %d bytes"
                % (req.command, length, self.max_frame_bytes)
            )
        if len(ct) > 0xFFFF:
            raise ResultError("the content type of the result of %r is longer than 65535 bytes" % req.command)
        return _PAYLOAD_PACK(length, 1, kind, 0, req.request_id, len(ct)) + ct + payload

    def _failure_frame(self, req, exc):
        """The ERROR frame for an exception raised while serving ``req``."""
        if isinstance(exc, _TooLarge):
            return self.error_frame(req.request_id, "response_too_large", "", str(exc))
        if req._cancelled or isinstance(exc, Cancelled):
            return self._cancelled_frame(req.request_id)
        return self._exception_frame(req.request_id, exc)

    # ------------------------------------------------------------------ reader thread

    def start_reader(self):
        t = threading.Thread(target=self._reader, name="pitboss-reader", daemon=True)
        t.start()
        return t

    def _reader(self):
        try:
            self._read_loop()
        except BaseException as e:  # a bug here must not leave a half-dead worker
            import traceback

            _die("reader thread failed:\n%s" % "".join(traceback.format_exception(type(e), e, e.__traceback__)), 70)

    def _read_loop(self):
        fd = self.in_fd
        limit = self.max_frame_bytes
        read = os.read
        split = P.split_frames
        buf = bytearray()
        need = 4  # bytes the first incomplete frame in buf needs
        while True:
            try:
                chunk = read(fd, 1 << 20)
            except OSError as e:
                os.write(2, ("pitboss_worker: reading stdin failed: %s\n" % e).encode())
                chunk = b""
            if not chunk:
                if buf:
                    _bad_frame("stdin closed in the middle of a frame")
                self._push(_EOF)
                return
            if buf:
                buf += chunk
                if len(buf) < need:
                    continue
                data = bytes(buf)
            else:
                data = chunk
            try:
                frames, offset = split(data, 0, limit)
            except P.ProtocolError as e:
                _bad_frame(str(e))
            if frames:
                self._dispatch(data, frames)
            rest = len(data) - offset
            if rest:
                buf = bytearray(data[offset:])
                need = 4 + _U32_UNPACK_FROM(data, offset)[0] if rest >= 4 else 4
            elif buf:
                buf = bytearray()

    def _push(self, item):
        with self._cv:
            self._work.append(item)
            self._cv.notify()

    def _dispatch(self, data, frames):
        """Handles the frames of one read (reader thread)."""
        now = _monotonic()
        work = []
        urgent = []  # PONGs and replies to cancelled queued requests
        dropped = []
        pending = self._pending
        with self._lock:
            for kind, rid, s, e in frames:
                if kind == 2:  # REQUEST
                    if e - s < 10:
                        _bad_frame("malformed REQUEST body: %d bytes" % (e - s))
                    clen, slen, tlen, timeout_ms = _REQ_UNPACK_FROM(data, s)
                    a = s + 10 + clen
                    b = a + slen
                    c = b + tlen
                    if c > e:
                        _bad_frame("malformed REQUEST body: string lengths exceed the body")
                    try:
                        command = data[s + 10 : a].decode("utf-8")
                        session_id = data[a:b].decode("utf-8") if slen else None
                        content_type = data[b:c].decode("utf-8") if tlen else ""
                    except UnicodeDecodeError:
                        _bad_frame("malformed REQUEST body: a string is not valid UTF-8")
                    if rid in pending:
                        _bad_frame("REQUEST id %d is already in flight" % rid)
                    if self._shutting_down:
                        urgent.append(
                            self.error_frame(rid, "bad_request", "", "the worker is shutting down")
                        )
                        continue
                    req = Request(
                        rid,
                        command,
                        session_id,
                        content_type,
                        data[c:e],
                        now + timeout_ms / 1000.0 if timeout_ms else None,
                    )
                    pending[rid] = req
                    work.append(req)
                elif kind == 8:  # PING
                    if e != s:
                        _bad_frame("malformed PING: non-empty body")
                    urgent.append(_HEADER_PACK(12, 1, 9, 0, rid))
                elif kind == 7:  # CANCEL
                    if e != s:
                        _bad_frame("malformed CANCEL: non-empty body")
                    req = pending.get(rid)
                    if req is None or req._cancelled:
                        continue  # already finished (or already cancelled): ignore
                    req._cancelled = True
                    state = req._state
                    if state == _QUEUED:
                        req._state = _DONE
                        urgent.append(self._cancelled_frame(rid, "cancelled before it started"))
                        dropped.append(rid)
                    elif state == _ASYNC:
                        self._loop.call_soon_threadsafe(self._cancel_task, req)
                    # _RUNNING: the flag is all Python can do for synchronous code.
                elif kind == 10:  # SESSION_CLOSE
                    try:
                        work.append((10, data[s:e].decode("utf-8")))
                    except UnicodeDecodeError:
                        _bad_frame("malformed SESSION_CLOSE: session id is not valid UTF-8")
                elif kind == 11:  # SHUTDOWN
                    if e != s:
                        _bad_frame("malformed SHUTDOWN: non-empty body")
                    if not self._shutting_down:
                        self._shutting_down = True
                        work.append(_SHUTDOWN)
                else:
                    _bad_frame("unexpected frame kind %d (%s)" % (kind, P.KIND_NAMES.get(kind, "unknown")))
        if urgent:
            self.write(b"".join(urgent))
        if dropped:
            # Only now, so that a drain waiting for _pending sees the replies written.
            with self._lock:
                for rid in dropped:
                    pending.pop(rid, None)
        if work:
            with self._cv:
                self._work.extend(work)
                self._cv.notify()

    # ------------------------------------------------------------------ executor

    def serve(self):
        """Runs queued work until SHUTDOWN or EOF, then waits for in-flight requests."""
        cv = self._cv
        while True:
            with cv:
                while not self._work:
                    cv.wait()
                items = self._work
                self._work = collections.deque()
            if self._run_batch(items):
                break
        self._drain()

    def _run_batch(self, items):
        """Runs queued work; collected replies go out in as few writes as possible.

        Replies are written before a command that is not known to be fast (its recent
        average is over _FLUSH_AFTER, or it has not run yet), once the batch has run
        for _FLUSH_AFTER, and at the end: pipelined fast commands share one write,
        and a slow command does not hold back the replies finished before it.
        """
        started = _monotonic()
        out = self._out
        costs = self._costs
        commands = self.commands
        for item in items:
            if type(item) is Request:
                name = item.command
                cost = costs.get(name)
                if out and (cost is None or cost > _FLUSH_AFTER):
                    self._flush()
                t0 = _monotonic()
                self._run_request(item)
                now = _monotonic()
                if name in commands:
                    costs[name] = now - t0 if cost is None else 0.75 * cost + 0.25 * (now - t0)
            elif item is _SHUTDOWN or item is _EOF:
                self._flush()
                return True
            else:
                self._close_session(item[1])
                now = _monotonic()
            if out and now - started > _FLUSH_AFTER:
                self._flush()
                started = _monotonic()
        self._flush()
        return False

    def _run_request(self, req):
        rid = req.request_id
        cmd = self.commands.get(req.command)
        if cmd is not None and cmd.is_async and self._loop is None:
            try:
                self.start_loop()  # started after READY; wait until it runs
            except BaseException as e:
                with self._lock:
                    if req._state == _QUEUED:
                        req._state = _DONE
                        del self._pending[rid]
                        self._out.append(self._exception_frame(rid, e))
                return
        with self._lock:
            if req._state != _QUEUED:
                return  # cancelled while queued; already answered
            if cmd is None:
                req._state = _DONE
                del self._pending[rid]
            else:
                req._state = _ASYNC if cmd.is_async else _RUNNING
        if cmd is None:
            self._out.append(
                self.error_frame(
                    rid,
                    "unknown_command",
                    "",
                    "unknown command %r; known commands: %s" % (req.command, ", ".join(self.commands)),
                )
            )
            return
        if req.session_id is not None:
            try:
                req._session = self._session_state(req.session_id)
            except BaseException as e:
                self._finish(req, self._exception_frame(rid, e))
                return
        if cmd.is_async:
            self._loop.call_soon_threadsafe(self._start_task, cmd, req)
            return
        if cmd.streaming:
            self._stream_sync(cmd, req)
            return
        try:
            frame = self._result_frame(req, cmd.func(req), 3)
            if req._cancelled:
                frame = self._cancelled_frame(rid)
        except BaseException as e:
            frame = self._failure_frame(req, e)
        self._finish(req, frame)

    def _finish(self, req, frame):
        with self._lock:
            req._state = _DONE
            self._pending.pop(req.request_id, None)
        self._out.append(frame)

    def _stream_sync(self, cmd, req):
        out = self._out
        it = None
        try:
            it = iter(cmd.func(req))
            for item in it:
                if req._cancelled:
                    break
                out.append(self._result_frame(req, item, 5))
                self._flush()  # a stream's chunks go out as they come
            if req._cancelled:
                frame = self._cancelled_frame(req.request_id)
            else:
                frame = _HEADER_PACK(12, 1, 6, 0, req.request_id)  # STREAM_END
        except BaseException as e:
            frame = self._failure_frame(req, e)
        close = getattr(it, "close", None)
        if close is not None:
            try:
                close()
            except BaseException as e:
                os.write(2, ("pitboss_worker: closing the generator of %r raised %s: %s\n" % (req.command, _type_name(e), _message(e))).encode("utf-8", "replace"))
        self._finish(req, frame)

    # ------------------------------------------------------------------ sessions

    def _session_state(self, session_id):
        sessions = self._sessions
        if session_id in sessions:
            return sessions[session_id]
        factory = self.adapter._session_factory
        state = factory(session_id) if factory is not None else {}
        sessions[session_id] = state
        return state

    def _close_session(self, session_id):
        state = self._sessions.pop(session_id, None)
        close = getattr(state, "close", None)
        if close is not None and callable(close):
            try:
                close()
            except BaseException as e:
                sys.stderr.write(
                    "pitboss_worker: close() of session %s raised %s\n%s"
                    % (session_id, _type_name(e), _traceback_text(e))
                )

    # ------------------------------------------------------------------ asyncio

    def start_loop(self, wait=True):
        """Starts the asyncio loop thread, which imports asyncio (about 30 ms, so only
        when the adapter has async commands). ``wait=False`` returns at once: ``main``
        starts it that way right after READY, so the import does not delay READY."""
        if self._loop_ready is None:
            self._loop_ready = threading.Event()
            threading.Thread(target=self._loop_main, name="pitboss-asyncio", daemon=True).start()
        if wait:
            self._loop_ready.wait()
            if self._loop is None:
                raise RuntimeError("the asyncio loop failed to start: %r" % (self._loop_error,))

    def _loop_main(self):
        try:
            import asyncio

            self._asyncio = asyncio
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            self._loop = loop
        except BaseException as e:
            self._loop_error = e
            self._loop_ready.set()
            raise
        loop.call_soon(self._loop_ready.set)
        loop.run_forever()

    def _start_task(self, cmd, req):
        # loop thread
        if req._cancelled:
            self._async_reply(req, self._cancelled_frame(req.request_id, "cancelled before it started"))
            return
        task = self._loop.create_task(self._run_async(cmd, req))
        req._task = task
        task.add_done_callback(lambda t, req=req: self._task_done(t, req))

    def _cancel_task(self, req):
        # loop thread
        task = req._task
        if task is not None and not task.done():
            task.cancel()

    def _task_done(self, task, req):
        # loop thread. The wrapper replies itself unless it was cancelled before its
        # first step (the coroutine never ran) or failed inside the runtime.
        if task.cancelled():
            exc = None
        else:
            exc = task.exception()
        if not req._replied:
            if exc is None:
                frame = self._cancelled_frame(req.request_id)
            else:
                frame = self._failure_frame(req, exc)
            self._async_reply(req, frame)

    async def _run_async(self, cmd, req):
        rid = req.request_id
        it = None
        try:
            obj = cmd.func(req)
            if cmd.streaming:
                if hasattr(obj, "__aiter__"):
                    it = obj
                    async for item in obj:
                        if req._cancelled:
                            break
                        self._async_emit(self._result_frame(req, item, 5))
                else:
                    if hasattr(obj, "__await__"):
                        obj = await obj
                    for item in obj:
                        if req._cancelled:
                            break
                        self._async_emit(self._result_frame(req, item, 5))
                frame = _HEADER_PACK(12, 1, 6, 0, rid)
            else:
                if hasattr(obj, "__await__"):
                    obj = await obj
                frame = self._result_frame(req, obj, 3)
            if req._cancelled:
                frame = self._cancelled_frame(rid)
        except self._asyncio.CancelledError:
            frame = self._cancelled_frame(rid)
        except BaseException as e:
            frame = self._failure_frame(req, e)
        if it is not None:
            try:
                await it.aclose()
            except BaseException:
                pass
        self._async_reply(req, frame)

    def _async_emit(self, frame):
        # loop thread: queue a frame, written once this loop iteration's work is done
        self._aout.append(frame)
        if not self._aflush_scheduled:
            self._aflush_scheduled = True
            self._loop.call_soon(self._async_flush)

    def _async_reply(self, req, frame):
        # loop thread: the terminal frame of an async request
        if req._replied:
            return
        req._replied = True
        self._adone.append(req)
        self._async_emit(frame)

    def _async_flush(self):
        self._aflush_scheduled = False
        out, self._aout = self._aout, []
        done, self._adone = self._adone, []
        if out:
            self.write(b"".join(out))
        if done:
            with self._lock:
                for req in done:
                    req._state = _DONE
                    self._pending.pop(req.request_id, None)

    # ------------------------------------------------------------------ exit

    def _drain(self):
        """Waits for the requests still in flight (async ones: sync ones are done)."""
        while True:
            with self._lock:
                if not self._pending:
                    return
            time.sleep(0.002)

    def close_sessions(self):
        for session_id in list(self._sessions):
            self._close_session(session_id)

    # ------------------------------------------------------------------ handshake

    def ready_frame(self):
        info = {
            "protocol": P.PROTOCOL_VERSION,
            "pid": os.getpid(),
            "adapter": self.adapter.name,
            "commands": [c.describe() for c in self.commands.values()],
            "python": "%d.%d.%d" % tuple(sys.version_info[:3]),
        }
        body = self._json_dumps(info, separators=(",", ":")).encode("utf-8")
        if len(body) + P.HEADER_LEN > self.max_frame_bytes:
            # Tiny frame limits: the docs are optional, the rest is not.
            for c in info["commands"]:
                c["doc"] = ""
            body = self._json_dumps(info, separators=(",", ":")).encode("utf-8")
        return P.encode(P.READY, 0, body)


# --------------------------------------------------------------------------- startup


_USAGE = "usage: python -m pitboss_worker --adapter MODULE[:OBJECT] [--max-frame-bytes N] [--concurrency N]"


class UsageError(Exception):
    pass


def parse_args(argv):
    """Parses the worker's argv by hand (argparse costs about 20 ms of startup).

    Returns ``{"adapter": str, "max_frame_bytes": int, "concurrency": int}``; raises
    :class:`UsageError`.
    """
    opts = {"adapter": None, "max_frame_bytes": P.DEFAULT_MAX_FRAME_BYTES, "concurrency": 1}
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


def _install_sigterm():
    _signal.signal(_signal.SIGTERM, _on_sigterm)
    try:
        r, w = os.pipe()
        os.set_blocking(w, False)
        _signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    except (OSError, ValueError):
        return
    threading.Thread(target=_watch_signals, args=(r,), name="pitboss-signals", daemon=True).start()


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
    global _RUNTIME
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
    _install_sigterm()
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
    _RUNTIME = runtime
    try:
        for hook in adapter._on_start:
            hook()
    except BaseException as e:
        if isinstance(e, SystemExit):
            raise
        sys.stderr.write("pitboss_worker: adapter start-up failed:\n%s" % _traceback_text(e))
        sys.stderr.flush()
        os._exit(1)
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
