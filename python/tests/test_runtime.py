"""Unit tests of the worker runtime, standard library only.

Run from python/:  python3 -m unittest discover -s tests -v

The protocol tests are pure; the worker tests run `python -m pitboss_worker` as a real
subprocess and drive it with frames over its pipes, as pitboss does.
"""

import json
import os
import select
import signal
import struct
import subprocess
import sys
import time
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
PYTHON_DIR = os.path.dirname(HERE)
sys.path.insert(0, PYTHON_DIR)

from pitboss_worker import protocol as P  # noqa: E402
from pitboss_worker.adapter import Adapter  # noqa: E402
from pitboss_worker.cli import parse_args  # noqa: E402

TIMEOUT = 20.0


class ProtocolTest(unittest.TestCase):
    def test_header_layout(self):
        frame = P.encode(P.CANCEL, 0x0102)
        self.assertEqual(frame, bytes([0, 0, 0, 12, 1, 7, 0, 0, 0, 0, 0, 0, 0, 0, 1, 2]))

    def test_request_round_trip(self):
        frame = P.encode_request(9, "echo", "s-1", "application/json", 1500, b"\x00\xffpayload")
        [(kind, rid, body)] = P.FrameReader().feed(frame)
        self.assertEqual((kind, rid), (P.REQUEST, 9))
        self.assertEqual(P.decode_request(body), ("echo", "s-1", "application/json", 1500, b"\x00\xffpayload"))

    def test_payload_round_trip_and_no_session(self):
        frame = P.encode_request(1, "x", None, "", 0, b"")
        [(_, _, body)] = P.FrameReader().feed(frame)
        self.assertEqual(P.decode_request(body)[1], None)
        chunk = P.encode_payload(P.STREAM_CHUNK, 3, "text/plain", b"abc")
        [(kind, rid, body)] = P.FrameReader().feed(chunk)
        self.assertEqual((kind, rid, P.decode_payload(body)), (P.STREAM_CHUNK, 3, ("text/plain", b"abc")))

    def test_frames_split_anywhere_are_reassembled(self):
        stream = b"".join(P.encode_request(i, "echo", None, "t", 0, b"x" * i) for i in range(1, 20))
        reader = P.FrameReader()
        got = []
        for i in range(0, len(stream), 7):
            got += reader.feed(stream[i:i + 7])
        self.assertEqual([rid for _, rid, _ in got], list(range(1, 20)))

    def test_bad_frames_are_rejected(self):
        with self.assertRaises(P.ProtocolError):
            P.FrameReader(max_frame_bytes=1024).feed(struct.pack(">IBBHQ", 5000, 1, 2, 0, 1))
        with self.assertRaises(P.ProtocolError):
            P.FrameReader().feed(struct.pack(">IBBHQ", 12, 99, 2, 0, 1))
        with self.assertRaises(P.ProtocolError):
            P.FrameReader().feed(struct.pack(">IBBHQ", 3, 1, 2, 0, 1))
        with self.assertRaises(P.ProtocolError):
            P.decode_request(struct.pack(">HHHI", 50, 0, 0, 0) + b"short")

    def test_argument_parsing(self):
        opts = parse_args(["--adapter", "m:a", "--max-frame-bytes=2048", "--concurrency", "4"])
        self.assertEqual(opts, {"adapter": "m:a", "max_frame_bytes": 2048, "concurrency": 4})


class AdapterTest(unittest.TestCase):
    def test_command_kinds_are_detected(self):
        a = Adapter("t")

        @a.command
        def plain(req):
            """Doc line.

            More."""

        @a.command(name="gen")
        def generator(req):
            yield 1

        @a.command
        async def coro(req):
            return 1

        self.assertEqual(a.commands["plain"].describe(),
                         {"name": "plain", "streaming": False, "async": False, "doc": "Doc line."})
        self.assertTrue(a.commands["gen"].streaming)
        self.assertTrue(a.commands["coro"].is_async)
        with self.assertRaises(ValueError):
            a.command(name="plain")(lambda req: None)


class Worker:
    """A real worker process driven over its pipes."""

    def __init__(self, adapter="demo:adapter", env=None, max_frame=P.DEFAULT_MAX_FRAME_BYTES):
        full_env = dict(os.environ)
        full_env["PYTHONPATH"] = os.pathsep.join([PYTHON_DIR, os.path.join(PYTHON_DIR, "examples")])
        full_env.update(env or {})
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pitboss_worker", "--adapter", adapter, "--max-frame-bytes", str(max_frame)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=full_env)
        self.reader = P.FrameReader()
        self.pending = []
        try:
            kind, _, body = self.next_frame()
        except AssertionError:
            self.close()
            raise
        assert kind == P.READY, kind
        self.ready = json.loads(body)

    def send(self, data):
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def request(self, rid, command, payload=b"{}", session=None, ct="application/json"):
        if not isinstance(payload, bytes):
            payload = json.dumps(payload).encode()
        self.send(P.encode_request(rid, command, session, ct, 0, payload))

    def next_frame(self, timeout=TIMEOUT):
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while not self.pending:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError("no frame within %.1f s" % timeout)
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                data = os.read(fd, 1 << 16)
                if not data:
                    raise AssertionError("worker closed stdout; stderr: %r" % self.proc.stderr.read())
                self.pending += self.reader.feed(data)
        return self.pending.pop(0)

    def reply(self, rid):
        kind, got, body = self.next_frame()
        assert got == rid, (got, rid, kind)
        if kind == P.RESPONSE:
            ct, payload = P.decode_payload(body)
            return kind, ct, payload
        return kind, None, json.loads(body) if kind == P.ERROR else body

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            try:
                f.close()
            except Exception:
                pass


class WorkerTest(unittest.TestCase):
    def setUp(self):
        self.w = None

    def tearDown(self):
        if self.w is not None:
            self.w.close()

    def start(self, *args, **kwargs):
        self.w = Worker(*args, **kwargs)
        return self.w

    def test_ready_lists_commands(self):
        w = self.start()
        self.assertEqual(w.ready["protocol"], 1)
        self.assertEqual(w.ready["pid"], w.proc.pid)
        names = {c["name"]: c for c in w.ready["commands"]}
        self.assertTrue(names["stream"]["streaming"])
        self.assertTrue(names["sleep"]["async"])
        self.assertIn("echo", names)

    def test_echo_passes_bytes_through(self):
        w = self.start()
        raw = bytes(range(256))
        w.request(1, "echo", raw, ct="application/octet-stream")
        self.assertEqual(w.reply(1), (P.RESPONSE, "application/octet-stream", raw))

    def test_pipelined_requests_all_answer(self):
        w = self.start()
        w.send(b"".join(P.encode_request(i, "echo", None, "t", 0, b"%d" % i) for i in range(1, 9)))
        got = {}
        for _ in range(8):
            kind, rid, body = w.next_frame()
            self.assertEqual(kind, P.RESPONSE)
            got[rid] = P.decode_payload(body)[1]
        self.assertEqual(got, {i: b"%d" % i for i in range(1, 9)})

    def test_streaming(self):
        w = self.start()
        w.request(5, "stream", {"n": 3})
        frames = [w.next_frame() for _ in range(4)]
        self.assertEqual([f[0] for f in frames], [P.STREAM_CHUNK] * 3 + [P.STREAM_END])
        self.assertEqual([json.loads(P.decode_payload(f[2])[1])["i"] for f in frames[:3]], [0, 1, 2])

    def test_async_commands_run_concurrently(self):
        w = self.start()
        # Three 1 s sleeps: one after another they take 3 s; concurrently about 1 s
        # (the bound leaves a busy machine 1.5 s).
        start = time.monotonic()
        for i in (1, 2, 3):
            w.request(i, "sleep", {"seconds": 1.0})
        got = {w.next_frame()[1] for _ in range(3)}
        self.assertEqual(got, {1, 2, 3})
        self.assertLess(time.monotonic() - start, 2.5)

    def test_exceptions_are_structured_and_the_worker_lives_on(self):
        w = self.start("faults:adapter")
        w.request(1, "raise", {"type": "ValueError", "message": "nope"})
        kind, _, err = w.reply(1)
        self.assertEqual(kind, P.ERROR)
        self.assertEqual((err["kind"], err["type"], err["message"]), ("exception", "ValueError", "nope"))
        self.assertIn("Traceback", err["traceback"])
        w.request(2, "missing")
        kind, _, err = w.reply(2)
        self.assertEqual(err["kind"], "unknown_command")
        self.assertIn("echo", err["message"])
        w.request(3, "echo", b"alive")
        self.assertEqual(w.reply(3)[2], b"alive")

    def test_caller_errors_are_told_apart_from_failures_of_the_command(self):
        # The caller's fault (kind invalid_request): a payload the command cannot
        # decode, or an explicit pitboss_worker.InvalidRequest (subclasses included).
        # The command's own fault (kind exception): anything else it raises after the
        # payload was accepted, KeyError included, and a result that cannot be encoded.
        w = self.start("faults:adapter")
        w.request(1, "sleep", b"not json")
        kind, _, err = w.reply(1)
        self.assertEqual(kind, P.ERROR)
        self.assertEqual((err["kind"], err["type"]), ("invalid_request", "pitboss_worker.InvalidRequest"))
        self.assertIn("not valid JSON", err["message"])
        w.request(2, "raise", {"type": "InvalidRequest", "message": "n must be positive"})
        err = w.reply(2)[2]
        self.assertEqual((err["kind"], err["message"]), ("invalid_request", "n must be positive"))
        w.request(3, "raise", {"type": "KeyError", "message": "k"})
        err = w.reply(3)[2]
        self.assertEqual((err["kind"], err["type"]), ("exception", "KeyError"))
        w.request(4, "raise", {"type": "ValueError", "message": "v"})
        self.assertEqual(w.reply(4)[2]["kind"], "exception")
        w.request(5, "unserializable")
        err = w.reply(5)[2]
        self.assertEqual((err["kind"], err["type"]), ("exception", "pitboss_worker.ResultError"))
        self.assertIn("'unserializable'", err["message"])
        self.assertIn("not JSON serializable", err["message"])
        w.request(6, "echo", b"alive")
        self.assertEqual(w.reply(6)[2], b"alive")

    def test_print_does_not_touch_the_channel(self):
        w = self.start("faults:adapter")
        w.request(1, "print")
        self.assertEqual(w.reply(1)[2], b"ok")
        w.request(2, "echo", b"still framed")
        self.assertEqual(w.reply(2)[2], b"still framed")
        w.send(P.encode(P.SHUTDOWN, 0))
        self.assertEqual(w.proc.wait(TIMEOUT), 0)
        err = w.proc.stderr.read().decode()
        self.assertIn("print() to sys.stdout", err)
        self.assertIn("raw write to fd 1", err)

    def test_session_state_and_close(self):
        w = self.start()
        for rid, sid, want in [(1, "a", 1), (2, "a", 2), (3, "b", 1), (4, "a", 3)]:
            w.request(rid, "counter", session=sid)
            self.assertEqual(json.loads(w.reply(rid)[2])["count"], want)
        w.send(P.encode(P.SESSION_CLOSE, 0, b"a"))
        w.request(5, "counter", session="a")
        self.assertEqual(json.loads(w.reply(5)[2])["count"], 1)

    def test_cancel_an_async_command(self):
        w = self.start()
        w.request(1, "sleep", {"seconds": 30})
        time.sleep(0.2)  # let it start; the cancel must work either way
        w.send(P.encode(P.CANCEL, 1))
        kind, _, err = w.reply(1)
        self.assertEqual((kind, err["kind"]), (P.ERROR, "cancelled"))

    def test_cancel_a_cooperative_sync_command(self):
        w = self.start("faults:adapter")
        w.request(1, "sleep", {"seconds": 30})
        w.send(P.encode(P.CANCEL, 1))
        kind, _, payload = w.reply(1)
        self.assertIn(kind, (P.RESPONSE, P.ERROR))

    def test_ping_is_answered_while_a_sync_command_runs(self):
        w = self.start("faults:adapter")
        w.request(1, "sleep", {"seconds": 1.0})
        w.send(P.encode(P.PING, 77))
        kind, rid, _ = w.next_frame(timeout=0.8)
        self.assertEqual((kind, rid), (P.PONG, 77))
        self.assertEqual(w.reply(1)[0], P.RESPONSE)

    def test_response_too_large(self):
        w = self.start("faults:adapter", max_frame=4096)
        w.request(1, "big", {"bytes": 3000})
        self.assertEqual(w.reply(1)[2], b"x" * 3000)
        # A result over the limit becomes an error, never an oversized frame.
        w.request(2, "big", {"bytes": 5000})
        kind, _, err = w.reply(2)
        self.assertEqual((kind, err["kind"]), (P.ERROR, "response_too_large"))
        # A huge exception message is cut to fit a normal frame limit.
        w.close()
        w = self.start("faults:adapter")
        w.request(3, "raise", {"type": "ValueError", "message": "m" * 100000})
        kind, _, err = w.reply(3)
        self.assertEqual(kind, P.ERROR)
        self.assertLess(len(err["message"]), 9 * 1024)

    def test_exit_on_eof_shutdown_and_sigterm(self):
        w = self.start()
        w.proc.stdin.close()
        self.assertEqual(w.proc.wait(TIMEOUT), 0)
        w.close()
        w = self.start()
        w.send(P.encode(P.SHUTDOWN, 0))
        self.assertEqual(w.proc.wait(TIMEOUT), 0)
        w.close()
        w = self.start()
        w.proc.send_signal(signal.SIGTERM)
        self.assertEqual(w.proc.wait(TIMEOUT), 0)

    def test_a_bad_frame_from_the_host_exits_non_zero(self):
        w = self.start()
        w.send(struct.pack(">IBBHQ", 12, 42, 2, 0, 1))
        self.assertNotEqual(w.proc.wait(TIMEOUT), 0)
        self.assertIn(b"bad frame", w.proc.stderr.read())

    def test_crash_on_start(self):
        with self.assertRaises(AssertionError):
            Worker("faults:adapter", env={"PITBOSS_FAULT_CRASH_ON_START": "1"})


if __name__ == "__main__":
    unittest.main()
