"""The worker runtime: reads frames from pitboss, runs commands, writes replies.

Threads:

* the **main thread** reads the protocol pipe in large chunks whenever it has nothing
  queued, splits them into frames, answers ``PING`` and handles ``CANCEL`` at once, and
  runs the requests it read itself, in order (no hand-off to another thread: under
  pitboss most requests arrive alone, and a hand-off cost more than the request). It
  runs synchronous commands inline and writes a batch's replies with one ``os.write``:
  with several requests pipelined, each side pays one syscall per batch instead of one
  per request;
* the **standby reader** (``pitboss-reader``) reads while the main thread is busy:
  when the main thread has run work for ``_TAKEOVER_AFTER`` (5 ms) without anyone
  reading, it takes over reading, answers ``PING`` and handles ``CANCEL`` at once
  (heartbeats keep working while a synchronous command runs, and a request queued
  behind it can be cancelled), and queues ``REQUEST`` and ``SESSION_CLOSE`` for the
  main thread. When the main thread has nothing left to run, the next work the
  standby reads goes to it together with the reader role. The standby watches on a
  5 ms timer while requests come, and sleeps until woken after a tick without any;
* an **asyncio loop** thread, started only if the adapter has ``async`` commands, runs
  those concurrently; they write their own replies (batched per loop iteration).

Every write to the protocol pipe goes through one lock and writes whole frames.

Exit: on ``SHUTDOWN`` or EOF of stdin, the runtime finishes what is queued and in
flight, closes session state, runs ``atexit`` handlers and exits 0. A synchronous
command that never returns blocks that; pitboss then kills the process. SIGTERM exits
at once with status 0 (``signals.py``). Malformed input from pitboss exits with
status 2.

The wire format is ``protocol``'s: this module decodes and encodes frames with its
constants and precompiled structs only. The process around the runtime (argv, stdio,
signals, start-up and exit) is ``cli.py``; the fault-injection hooks are ``hooks.py``.
"""

import os
import sys
import threading
import time

from . import context as _context
from . import protocol as P
from .adapter import Cancelled, InvalidRequest, Request, Response, ResultError
from .protocol import (
    CANCEL,
    HEADER_LEN,
    MAX_STRING_BYTES,
    PAYLOAD_HEAD_LEN,
    PING,
    PONG,
    PROTOCOL_VERSION,
    REQUEST,
    RESPONSE,
    SESSION_CLOSE,
    SHUTDOWN,
    STREAM_CHUNK,
    STREAM_END,
)

__all__ = ["Runtime"]

# Request states, guarded by Runtime._lock.
_QUEUED = 0
_RUNNING = 1  # a synchronous command on the main thread
_ASYNC = 2  # handed to the asyncio loop
_DONE = 3

# Work items besides Request objects.
_SHUTDOWN = object()
_EOF = object()

# Holders of the reader role.
_MAIN = "main"
_STANDBY = "standby"

#: While the main thread runs work it read itself, nobody reads the input; the standby
#: reader takes over reading once that has lasted this long (seconds), so PINGs and
#: CANCELs wait at most about twice this (plus a GIL switch interval) behind a command.
_TAKEOVER_AFTER = 0.005

#: Bytes asked of one read: a pipe holds 64 KiB unless enlarged, so one read rarely
#: returns more. Asking for 1 MiB made malloc use mmap for the buffer: three more
#: syscalls (mmap, mremap, munmap) per read.
_READ_SIZE = 64 * 1024

#: The main thread writes what it has collected once a batch has run this long (seconds),
#: so that a slow command does not hold back the replies of many fast ones behind it.
_FLUSH_AFTER = 0.001

_TEXT = b"text/plain; charset=utf-8"
_JSON = b"application/json"

_monotonic = time.monotonic
_get_ident = threading.get_ident
#: Thread id -> the Request its synchronous command serves (context.py).
_serving = _context.serving
_write = os.write
_read = os.read
_split_frames = P.split_frames

# Fast paths, bound once: frames are encoded and decoded per request.
#: A RESPONSE or STREAM_CHUNK header, content_type_len included, in one pack.
_pack_payload_header = P.PAYLOAD_FRAME_HEADER.pack
#: A whole frame of a kind whose body is empty (PONG, STREAM_END): the header alone.
_pack_header = P.HEADER.pack
#: A REQUEST body decoded in place, in the buffer the frames were read into.
_decode_request_at = P.decode_request_at
_unpack_length_from = P.LENGTH_PREFIX.unpack_from

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


#: The files whose frames a traceback leaves out at its top: the runtime's and the
#: CLI's (which loads the adapter and runs its start-up hooks).
_OWN_FILES = frozenset((__file__, os.path.join(os.path.dirname(__file__), "cli.py")))


def _traceback_text(exc):
    import traceback

    tb = exc.__traceback__
    # Drop the runtime's own frames at the top: the user's code is what matters.
    skipped = tb
    while skipped is not None and skipped.tb_frame.f_code.co_filename in _OWN_FILES:
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
        # Request bookkeeping, shared by the two reading threads, the main thread and the loop.
        self._lock = threading.Lock()
        self._pending = {}  # request id -> Request, until its terminal frame is out
        self._shutting_down = False
        # Who reads and what is queued, guarded by _cv (see serve and _standby_loop).
        self._cv = threading.Condition(threading.Lock())
        self._work = []  # read but not yet taken by the main thread
        # _MAIN or _STANDBY while a thread holds the reader role; the main thread's
        # until serve() starts, so that the standby does not read the first requests.
        self._reader = _MAIN
        self._main_idle = False  # the main thread waits for work
        self._vacant_since = 0.0  # when the main thread last started work unread
        self._starts = 0  # how many times it did
        self._parked = False  # the standby reader sleeps until woken
        self._eof = False  # the input has ended: nobody reads any more
        self._done = False  # SHUTDOWN or EOF has been run: the main thread drains
        self._standby_thread = None
        self._rbuf = bytearray()  # the start of an incomplete frame (reader role)
        self._rneed = P.PREFIX_LEN  # bytes the incomplete frame in _rbuf needs
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
        limit = self.max_frame_bytes - HEADER_LEN
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
        """Encodes a command's result as a ``kind`` (RESPONSE or STREAM_CHUNK) frame."""
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
        length = HEADER_LEN + PAYLOAD_HEAD_LEN + len(ct) + len(payload)
        if length > self.max_frame_bytes:
            raise _TooLarge(
                "the result of %r is %d bytes as a frame; the maximum frame size is %d bytes"
                % (req.command, length, self.max_frame_bytes)
            )
        if len(ct) > MAX_STRING_BYTES:
            raise ResultError("the content type of the result of %r is longer than 65535 bytes" % req.command)
        return _pack_payload_header(length, PROTOCOL_VERSION, kind, 0, req.frame_id, len(ct)) + ct + payload

    def _failure_frame(self, req, exc):
        """The ERROR frame for an exception raised while serving ``req``."""
        if isinstance(exc, _TooLarge):
            return self.error_frame(req.frame_id, "response_too_large", "", str(exc))
        if req._cancelled or isinstance(exc, Cancelled):
            return self._cancelled_frame(req.frame_id)
        return self._exception_frame(req.frame_id, exc)

    # ------------------------------------------------------------------ reading

    def start_reader(self):
        """Starts the standby reader thread (once): it reads the input while the main
        thread runs a command for longer than _TAKEOVER_AFTER."""
        if self._standby_thread is None:
            t = threading.Thread(target=self._standby, name="pitboss-reader", daemon=True)
            self._standby_thread = t
            t.start()
        return self._standby_thread

    def _read_once(self):
        """Reads the input once (the thread holding the reader role only) and handles
        the frames read: PING and CANCEL at once, the rest is returned as work to run
        in order ([] if none). At the end of the input: ``[_EOF]``."""
        try:
            chunk = _read(self.in_fd, _READ_SIZE)
        except OSError as e:
            os.write(2, ("pitboss_worker: reading stdin failed: %s\n" % e).encode())
            chunk = b""
        buf = self._rbuf
        if not chunk:
            if buf:
                _bad_frame("stdin closed in the middle of a frame")
            return [_EOF]
        if buf:
            buf += chunk
            if len(buf) < self._rneed:
                return []
            data = bytes(buf)
        else:
            data = chunk
        try:
            frames, offset = _split_frames(data, 0, self.max_frame_bytes)
        except P.ProtocolError as e:
            _bad_frame(str(e))
        work = self._dispatch(data, frames) if frames else []
        rest = len(data) - offset
        if rest:
            self._rbuf = bytearray(data[offset:])
            need = P.PREFIX_LEN
            if rest >= need:
                need += _unpack_length_from(data, offset)[0]
            self._rneed = need
        elif buf:
            self._rbuf = bytearray()
        return work

    def _standby(self):
        try:
            self._standby_loop()
        except BaseException as e:  # a bug here must not leave a half-dead worker
            import traceback

            _die("reader thread failed:\n%s" % "".join(traceback.format_exception(type(e), e, e.__traceback__)), 70)

    def _standby_loop(self):
        """The standby reader: takes the reader role when the main thread has run
        work for _TAKEOVER_AFTER without anyone reading (or after SHUTDOWN), reads
        while the main thread is busy, and gives the role back with the next work
        it reads once the main thread is idle."""
        cv = self._cv
        read_once = self._read_once
        after = _TAKEOVER_AFTER
        seen = -1
        while True:
            with cv:
                while True:
                    if self._eof:
                        return
                    if self._reader is None:
                        if self._done or self._main_idle:
                            break
                        left = self._vacant_since + after - _monotonic()
                        if left <= 0:
                            break
                        cv.wait(left)
                    elif self._starts != seen:
                        # The main thread reads and has run work since the last look:
                        # look again soon, without being woken.
                        seen = self._starts
                        cv.wait(after)
                    else:
                        # Quiet: sleep until the main thread wakes us as it starts work.
                        self._parked = True
                        cv.wait()
                        self._parked = False
                self._reader = _STANDBY
            while True:
                work = read_once()
                if not work:
                    continue
                with cv:
                    eof = work[-1] is _EOF
                    if eof:
                        self._eof = True
                    if self._done:
                        # Nothing runs any more: SESSION_CLOSE after SHUTDOWN is ignored.
                        if eof:
                            return
                        continue
                    self._work.extend(work)
                    if self._main_idle:
                        # Hand the work and the reader role to the main thread: it runs
                        # the work and then reads on itself.
                        self._main_idle = False
                        self._reader = None
                        self._vacant_since = _monotonic()
                        self._starts += 1
                        cv.notify_all()
                        break
                    if eof:
                        return

    def _dispatch(self, data, frames):
        """Handles the frames of one read (by the thread holding the reader role).

        Answers PING and handles CANCEL at once; returns the work to run, in order."""
        now = _monotonic()
        work = []
        urgent = []  # PONGs and replies to cancelled queued requests
        dropped = []
        pending = self._pending
        with self._lock:
            for kind, rid, s, e, flags in frames:
                if kind == REQUEST:
                    try:
                        command, session_id, content_type, timeout_ms, c, ctx = _decode_request_at(data, s, e, flags)
                    except P.ProtocolError as error:
                        _bad_frame("malformed REQUEST body: %s" % error)
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
                        ctx,
                    )
                    pending[rid] = req
                    work.append(req)
                elif kind == PING:
                    if e != s:
                        _bad_frame("malformed PING: non-empty body")
                    urgent.append(_pack_header(HEADER_LEN, PROTOCOL_VERSION, PONG, 0, rid))
                elif kind == CANCEL:
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
                elif kind == SESSION_CLOSE:
                    try:
                        work.append((SESSION_CLOSE, data[s:e].decode("utf-8")))
                    except UnicodeDecodeError:
                        _bad_frame("malformed SESSION_CLOSE: session id is not valid UTF-8")
                elif kind == SHUTDOWN:
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
        return work

    # ------------------------------------------------------------------ executor

    def serve(self):
        """Reads and runs work until SHUTDOWN or EOF, then waits for in-flight requests.

        The main thread reads the input itself whenever no work is queued, and runs the
        work it read at once: no hand-off to another thread on the common path. While
        it runs, nobody reads; the standby reader takes over reading if that lasts
        _TAKEOVER_AFTER, and gives the role back later (see _standby_loop).
        """
        self.start_reader()
        cv = self._cv
        read_once = self._read_once
        run_batch = self._run_batch
        while True:
            with cv:
                items = self._work
                if items:
                    self._work = []
                elif (self._reader is None or self._reader is _MAIN) and not self._eof:
                    self._reader = _MAIN
                else:
                    self._main_idle = True
                    while not self._work and (self._reader is not None or self._eof):
                        cv.wait()
                    self._main_idle = False
                    continue
            if not items:
                try:
                    items = read_once()
                    while not items:
                        items = read_once()
                except Exception as e:
                    import traceback

                    _die("reading failed:\n%s" % "".join(traceback.format_exception(type(e), e, e.__traceback__)), 70)
                with cv:
                    self._reader = None
                    if items[-1] is _EOF:
                        self._eof = True
                    self._vacant_since = _monotonic()
                    self._starts += 1
                    if self._parked:
                        cv.notify_all()
            if run_batch(items):
                break
        with cv:
            # The standby reader reads on (PINGs, late requests) while in-flight
            # async requests finish.
            self._done = True
            cv.notify_all()
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
        rid = req.frame_id
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
        serving = _serving
        serving[_get_ident()] = req
        try:
            frame = self._result_frame(req, cmd.func(req), RESPONSE)
            if req._cancelled:
                frame = self._cancelled_frame(rid)
        except BaseException as e:
            frame = self._failure_frame(req, e)
        serving[_get_ident()] = None
        self._finish(req, frame)

    def _finish(self, req, frame):
        with self._lock:
            req._state = _DONE
            self._pending.pop(req.frame_id, None)
        self._out.append(frame)

    def _stream_sync(self, cmd, req):
        out = self._out
        it = None
        _serving[_get_ident()] = req
        try:
            it = iter(cmd.func(req))
            for item in it:
                if req._cancelled:
                    break
                out.append(self._result_frame(req, item, STREAM_CHUNK))
                self._flush()  # a stream's chunks go out as they come
            if req._cancelled:
                frame = self._cancelled_frame(req.frame_id)
            else:
                frame = _pack_header(HEADER_LEN, PROTOCOL_VERSION, STREAM_END, 0, req.frame_id)
        except BaseException as e:
            frame = self._failure_frame(req, e)
        close = getattr(it, "close", None)
        if close is not None:
            try:
                close()
            except BaseException as e:
                os.write(2, ("pitboss_worker: closing the generator of %r raised %s: %s\n" % (req.command, _type_name(e), _message(e))).encode("utf-8", "replace"))
        _serving[_get_ident()] = None
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
            _context.enable_tasks()
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
            self._async_reply(req, self._cancelled_frame(req.frame_id, "cancelled before it started"))
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
                frame = self._cancelled_frame(req.frame_id)
            else:
                frame = self._failure_frame(req, exc)
            self._async_reply(req, frame)

    async def _run_async(self, cmd, req):
        rid = req.frame_id
        it = None
        # This task's own context (a copy): its log records name its request.
        _context.task_request.set(req)
        try:
            obj = cmd.func(req)
            if cmd.streaming:
                if hasattr(obj, "__aiter__"):
                    it = obj
                    async for item in obj:
                        if req._cancelled:
                            break
                        self._async_emit(self._result_frame(req, item, STREAM_CHUNK))
                else:
                    if hasattr(obj, "__await__"):
                        obj = await obj
                    for item in obj:
                        if req._cancelled:
                            break
                        self._async_emit(self._result_frame(req, item, STREAM_CHUNK))
                frame = _pack_header(HEADER_LEN, PROTOCOL_VERSION, STREAM_END, 0, rid)
            else:
                if hasattr(obj, "__await__"):
                    obj = await obj
                frame = self._result_frame(req, obj, RESPONSE)
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
                    self._pending.pop(req.frame_id, None)

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
        from . import __version__

        info = {
            "protocol": P.PROTOCOL_VERSION,
            "revision": P.PROTOCOL_REVISION,
            "runtime": __version__,
            "pid": os.getpid(),
            "adapter": self.adapter.name,
            "commands": [c.describe() for c in self.commands.values()],
            "python": "%d.%d.%d" % tuple(sys.version_info[:3]),
        }
        body = self._json_dumps(info, separators=(",", ":")).encode("utf-8")
        if len(body) + HEADER_LEN > self.max_frame_bytes:
            # Tiny frame limits: the docs are optional, the rest is not.
            for c in info["commands"]:
                c["doc"] = ""
            body = self._json_dumps(info, separators=(",", ":")).encode("utf-8")
        return P.encode(P.READY, 0, body)
