"""examples/faults.py: the worker survives what it should, and the faults that must
break the channel really do."""

import os
import signal
import tempfile
import time
import unittest

from harness import WorkerProcess, json_of, payload_of, req_frame
from pitboss_worker import protocol as P


def proc_state(pid):
    with open("/proc/%d/stat" % pid) as f:
        return f.read().rsplit(")", 1)[1].split()[0]


class FaultsTestCase(unittest.TestCase):
    env = None
    args = ()

    def setUp(self):
        self.w = WorkerProcess("examples.faults:adapter", self.args, self.env)
        self.addCleanup(self.w.kill)


class SurvivableTest(FaultsTestCase):
    def test_exception_is_structured_and_the_worker_keeps_serving(self):
        f = self.w.call("raise", b'{"type": "ValueError", "message": "bad input"}')
        self.assertEqual(f.kind, P.ERROR)
        body = f.json()
        self.assertEqual(body["kind"], "exception")
        self.assertEqual(body["type"], "ValueError")
        self.assertEqual(body["message"], "bad input")
        self.assertTrue(body["traceback"].startswith("Traceback (most recent call last)"), body["traceback"])
        self.assertIn("raise_", body["traceback"])
        self.assertNotIn("runtime.py", body["traceback"])
        self.assertEqual(json_of(self.w.call("pid")), {"pid": self.w.pid})
        body = self.w.call("raise", b'{"type": "KeyboardInterrupt", "message": "x"}').json()
        self.assertEqual(body["type"], "KeyboardInterrupt")
        self.assertEqual(json_of(self.w.call("pid")), {"pid": self.w.pid})

    def test_print_does_not_corrupt_the_channel(self):
        for _ in range(3):
            f = self.w.call("print")
            self.assertEqual(payload_of(f), ("text/plain; charset=utf-8", b"ok"))
        text = self.w.stderr_text(wait_for="sys.__stdout__")
        self.assertIn("faults: print() to sys.stdout", text)
        self.assertIn("faults: raw write to fd 1", text)
        self.assertIn("faults: write to sys.__stdout__", text)
        self.assertEqual(payload_of(self.w.call("echo", b"after"))[1], b"after")

    def test_ping_is_answered_while_a_sync_command_runs(self):
        # The command runs 10 s; the PONG must come long before (generous for a busy
        # machine: the runtime answers in milliseconds), then the command is cancelled.
        rid = self.w.request("sleep", b'{"seconds": 10}')
        start = time.monotonic()
        self.w.send(P.encode(P.PING, 41))
        f = self.w.recv()
        self.assertEqual((f.kind, f.request_id), (P.PONG, 41))
        self.assertLess(time.monotonic() - start, 3.0)
        self.w.send(P.encode(P.CANCEL, rid))
        self.assertEqual(self.w.replies([rid])[rid][0].json()["kind"], "cancelled")

    def test_a_slow_command_does_not_hold_back_earlier_replies(self):
        for _ in range(3):  # echo is then known to be fast; sleep is not
            self.w.call("echo", b"warm")
        fast, slow = self.w.new_id(), self.w.new_id()
        start = time.monotonic()
        self.w.send(req_frame(fast, "echo", b"x") + req_frame(slow, "sleep", b'{"seconds": 10}'))
        f = self.w.recv()
        self.assertEqual((f.request_id, f.kind), (fast, P.RESPONSE))
        self.assertLess(time.monotonic() - start, 3.0, "the echo waited for the 10 s command")
        self.w.send(P.encode(P.CANCEL, slow))
        self.assertEqual(self.w.replies([slow])[slow][0].json()["kind"], "cancelled")

    def test_cancel_of_a_running_sync_command_is_cooperative(self):
        rid = self.w.request("sleep", b'{"seconds": 30}')
        start = time.monotonic()
        self.w.send(P.encode(P.CANCEL, rid))
        f = self.w.replies([rid])[rid][0]
        self.assertEqual(f.json()["kind"], "cancelled")
        self.assertLess(time.monotonic() - start, 5)
        self.assertEqual(json_of(self.w.call("pid")), {"pid": self.w.pid})

    def test_cancel_of_a_queued_request_answers_at_once(self):
        first = self.w.new_id()
        queued = self.w.new_id()
        self.w.send(
            req_frame(first, "sleep", b'{"seconds": 1}')
            + req_frame(queued, "echo", b"never run")
            + P.encode(P.CANCEL, queued)
        )
        f = self.w.recv()
        self.assertEqual((f.request_id, f.kind), (queued, P.ERROR))
        self.assertEqual(f.json()["kind"], "cancelled")
        f = self.w.recv()
        self.assertEqual((f.request_id, f.kind), (first, P.RESPONSE))

    def test_cancel_of_an_async_sleep(self):
        rid = self.w.request("async_sleep", b'{"seconds": 30}')
        self.w.call("pid")
        self.w.send(P.encode(P.CANCEL, rid))
        self.assertEqual(self.w.replies([rid])[rid][0].json()["kind"], "cancelled")

    def test_count_and_alloc(self):
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "count")
            w = WorkerProcess("examples.faults:adapter", env={"PITBOSS_FAULT_COUNT_FILE": path})
            self.addCleanup(w.kill)
            for i in (1, 2, 2):
                self.assertEqual(json_of(w.call("count", b'{"id": %d}' % i)), {"id": i, "pid": w.pid})
            with open(path) as f:
                self.assertEqual(f.read(), "1 %d\n2 %d\n2 %d\n" % ((w.pid,) * 3))
        self.assertEqual(json_of(self.w.call("alloc", b'{"mb": 3}')), {"held_mb": 3})
        self.assertEqual(json_of(self.w.call("alloc", b'{"mb": 2}')), {"held_mb": 5})


class ChannelBreakingTest(FaultsTestCase):
    def test_garbage_reaches_the_real_channel(self):
        rid = self.w.request("garbage")
        data = b""
        while len(data) < 16:
            data += self.w.recv_raw()
        with self.assertRaises(P.ProtocolError):
            P.FrameDecoder().feed(data)
        self.assertEqual(data[:16], P.HEADER.pack(12, 99, P.RESPONSE, 0, rid))

    def test_oversized_header_reaches_the_real_channel(self):
        w = WorkerProcess("examples.faults:adapter", ["--max-frame-bytes", "4096"])
        self.addCleanup(w.kill)
        w.request("oversized")
        data = w.recv_raw()
        with self.assertRaises(P.ProtocolError) as cm:
            P.FrameDecoder(4096).feed(data)
        self.assertIn("4097 bytes exceeds", str(cm.exception))

    def test_unknown_id(self):
        rid = self.w.request("unknown_id")
        f = self.w.recv()
        self.assertEqual((f.kind, f.request_id), (P.RESPONSE, 0xDEADBEEF))
        f = self.w.recv()
        self.assertEqual((f.kind, f.request_id), (P.RESPONSE, rid))

    def test_close_stdout_gives_eof_while_the_process_lives(self):
        self.w.request("close_stdout")
        self.assertEqual(self.w.recv_raw(), b"")
        self.w.send(P.encode(P.PING, 1))  # answered into the void, not a crash
        self.assertTrue(self.w.alive())
        os.kill(self.w.pid, signal.SIGTERM)
        self.assertEqual(self.w.wait(), 0)

    def test_crash(self):
        self.w.request("crash", b'{"code": 7}')
        self.assertEqual(self.w.wait(), 7)

    def test_freeze_stops_the_process(self):
        self.w.request("freeze")
        deadline = time.monotonic() + 10
        while proc_state(self.w.pid) != "T" and time.monotonic() < deadline:
            time.sleep(0.01)
        self.assertEqual(proc_state(self.w.pid), "T")
        self.w.kill()
        self.assertEqual(self.w.proc.returncode, -signal.SIGKILL)

    def test_hang_is_stopped_by_sigterm(self):
        self.w.request("hang")
        self.w.send(P.encode(P.PING, 3))  # the reader still answers
        self.assertEqual(self.w.recv().kind, P.PONG)
        os.kill(self.w.pid, signal.SIGTERM)
        self.assertEqual(self.w.wait(), 0)


class StartupFaultsTest(unittest.TestCase):
    def test_crash_on_start(self):
        w = WorkerProcess("examples.faults:adapter", env={"PITBOSS_FAULT_CRASH_ON_START": "1"}, wait_ready=False)
        self.addCleanup(w.kill)
        self.assertEqual(w.wait(), 3)
        self.assertEqual(w.proc.stdout.read(), b"")

    def test_slow_start(self):
        start = time.monotonic()
        w = WorkerProcess("examples.faults:adapter", env={"PITBOSS_FAULT_SLOW_START_MS": "300"})
        self.addCleanup(w.kill)
        self.assertGreaterEqual(time.monotonic() - start, 0.3)

    def test_ignore_sigterm(self):
        w = WorkerProcess("examples.faults:adapter", env={"PITBOSS_FAULT_IGNORE_SIGTERM": "1"})
        self.addCleanup(w.kill)
        os.kill(w.pid, signal.SIGTERM)
        w.send(P.encode(P.PING, 5))
        f = w.recv()
        self.assertEqual((f.kind, f.request_id), (P.PONG, 5))
        self.assertEqual(json_of(w.call("pid")), {"pid": w.pid})
        self.assertTrue(w.alive())
        w.kill()
        self.assertEqual(w.proc.returncode, -signal.SIGKILL)


if __name__ == "__main__":
    unittest.main()
