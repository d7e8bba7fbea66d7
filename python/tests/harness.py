"""Plays the host: runs ``python -m pitboss_worker`` as a real subprocess and talks
frames to it over its pipes. Standard library only."""

import collections
import os
import select
import subprocess
import sys
import threading
import time

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
PYTHON_DIR = os.path.dirname(TESTS_DIR)
EXAMPLES_DIR = os.path.join(PYTHON_DIR, "examples")

if PYTHON_DIR not in sys.path:
    sys.path.insert(0, PYTHON_DIR)

from pitboss_worker import protocol as P  # noqa: E402

#: Generous: these are real processes on possibly slow, busy CI machines.
TIMEOUT = 15.0


class WorkerProcess(object):
    """One worker process. Frames are read with a timeout; stderr is collected."""

    def __init__(self, adapter="examples.demo:adapter", args=(), env=None, wait_ready=True, cwd=PYTHON_DIR):
        environ = dict(os.environ)
        environ.pop("PYTHONSTARTUP", None)
        environ["PYTHONUNBUFFERED"] = "1"
        environ["PYTHONPATH"] = os.pathsep.join([PYTHON_DIR, EXAMPLES_DIR, TESTS_DIR])
        environ.update(env or {})
        self.max_frame_bytes = P.DEFAULT_MAX_FRAME_BYTES
        args = list(args)
        if "--max-frame-bytes" in args:
            self.max_frame_bytes = int(args[args.index("--max-frame-bytes") + 1])
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pitboss_worker", "--adapter", adapter] + args,
            cwd=cwd,
            env=environ,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.pid = self.proc.pid
        self.decoder = P.FrameDecoder(self.max_frame_bytes, P.WORKER_KINDS)
        self.frames = collections.deque()
        self.eof = False
        self._stderr = []
        self._stderr_thread = threading.Thread(target=self._drain_stderr, daemon=True)
        self._stderr_thread.start()
        self._next_id = 1
        self.ready = None
        if wait_ready:
            self.ready = self.recv()
            if self.ready.kind != P.READY:
                raise AssertionError("first frame is not READY: %r" % (self.ready,))

    # -- plumbing

    def _drain_stderr(self):
        fd = self.proc.stderr.fileno()
        while True:
            try:
                data = os.read(fd, 65536)
            except OSError:
                return
            if not data:
                return
            self._stderr.append(data)

    def stderr_text(self, wait_for=None, timeout=TIMEOUT):
        """Everything the worker wrote to stderr so far; with ``wait_for``, waits until
        that text shows up (or the timeout passes)."""
        deadline = time.monotonic() + timeout
        while True:
            text = b"".join(self._stderr).decode("utf-8", "replace")
            if wait_for is None or wait_for in text or time.monotonic() > deadline:
                return text
            time.sleep(0.01)

    def send(self, data):
        view = memoryview(data)
        fd = self.proc.stdin.fileno()
        while view:
            n = os.write(fd, view)
            view = view[n:]

    def new_id(self):
        rid = self._next_id
        self._next_id += 1
        return rid

    def request(self, command, payload=b"", content_type="", session_id="", timeout_ms=0, rid=None, context=None):
        """Sends one REQUEST; returns its id. ``context``: a block from
        ``protocol.encode_context``."""
        if rid is None:
            rid = self.new_id()
        if isinstance(payload, str):
            payload = payload.encode("utf-8")
        self.send(req_frame(rid, command, payload, content_type, session_id, timeout_ms, context))
        return rid

    def _fill(self, deadline):
        """Reads more frames; False on EOF or timeout."""
        fd = self.proc.stdout.fileno()
        while not self.frames:
            if self.eof:
                return False
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            r, _, _ = select.select([fd], [], [], left)
            if not r:
                return False
            data = os.read(fd, 1 << 20)
            if not data:
                self.eof = True
                return False
            self.frames.extend(self.decoder.feed(data))
        return True

    def recv(self, timeout=TIMEOUT):
        """The next frame, whatever it is."""
        if not self._fill(time.monotonic() + timeout):
            raise AssertionError(
                "no frame within %.1f s (eof=%s); stderr:\n%s" % (timeout, self.eof, self.stderr_text())
            )
        return self.frames.popleft()

    def recv_raw(self, timeout=TIMEOUT):
        """Raw bytes from stdout (for tests of deliberately broken frames); b"" on EOF."""
        fd = self.proc.stdout.fileno()
        r, _, _ = select.select([fd], [], [], timeout)
        if not r:
            raise AssertionError("no output within %.1f s" % timeout)
        return os.read(fd, 1 << 20)

    def replies(self, ids, timeout=TIMEOUT):
        """Frames for the given request ids until each has its terminal frame.

        Returns ``{id: [frames]}``; frames for other ids are kept in ``self.other``.
        """
        want = set(ids)
        got = dict((i, []) for i in ids)
        if not hasattr(self, "other"):
            self.other = []
        deadline = time.monotonic() + timeout
        while want:
            left = deadline - time.monotonic()
            f = self.recv(max(left, 0.001))
            if f.request_id in want:
                got[f.request_id].append(f)
                if f.kind in (P.RESPONSE, P.ERROR, P.STREAM_END):
                    want.discard(f.request_id)
            else:
                self.other.append(f)
        return got

    def call(self, command, payload=b"", **kw):
        """Sends a request and returns its terminal frame (chunks are dropped)."""
        rid = self.request(command, payload, **kw)
        return self.replies([rid])[rid][-1]

    def close_stdin(self):
        try:
            self.proc.stdin.close()
        except OSError:
            pass

    def wait(self, timeout=TIMEOUT):
        """The exit status (negative for a signal)."""
        try:
            status = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError("worker did not exit within %.1f s; stderr:\n%s" % (timeout, self.stderr_text()))
        self._stderr_thread.join(timeout)  # everything it wrote is then in stderr_text()
        return status

    def alive(self):
        return self.proc.poll() is None

    def kill(self):
        if self.proc.poll() is None:
            try:
                self.proc.kill()
            except OSError:
                pass
        try:
            self.proc.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            pass
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass
        self._stderr_thread.join(TIMEOUT)
        try:
            self.proc.stderr.close()
        except OSError:
            pass


def req_frame(rid, command, payload=b"", content_type="", session_id=None, timeout_ms=0, context=None):
    """A REQUEST frame, with keyword defaults."""
    return P.encode_request(rid, command, session_id, content_type, timeout_ms, payload, context)


def payload_of(frame):
    """``(content_type, payload)`` of a RESPONSE or STREAM_CHUNK."""
    assert frame.kind in (P.RESPONSE, P.STREAM_CHUNK), frame
    return P.decode_payload(frame.body)


def json_of(frame):
    import json

    content_type, payload = payload_of(frame)
    assert content_type == "application/json", (content_type, payload)
    return json.loads(payload.decode("utf-8"))
