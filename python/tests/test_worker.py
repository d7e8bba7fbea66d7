"""The runtime as a real subprocess serving examples/demo.py, driven over its pipes."""

import json
import os
import signal
import sys
import time
import unittest

from harness import TIMEOUT, WorkerProcess, json_of, payload_of, req_frame
from pitboss_worker import protocol as P


class DemoTestCase(unittest.TestCase):
    adapter = "examples.demo:adapter"
    args = ()
    env = None

    def setUp(self):
        self.w = WorkerProcess(self.adapter, self.args, self.env)
        self.addCleanup(self.w.kill)


class HandshakeTest(DemoTestCase):
    def test_ready(self):
        info = self.w.ready.json()
        self.assertEqual(self.w.ready.request_id, 0)
        self.assertEqual(info["protocol"], 1)
        self.assertEqual(info["pid"], self.w.pid)
        self.assertEqual(info["adapter"], "demo")
        self.assertEqual(info["python"], "%d.%d.%d" % sys.version_info[:3])
        commands = dict((c["name"], c) for c in info["commands"])
        self.assertEqual(set(commands), {"echo", "compute", "counter", "stream", "sleep", "whoami", "version"})
        self.assertEqual((commands["stream"]["streaming"], commands["stream"]["async"]), (True, False))
        self.assertEqual((commands["sleep"]["streaming"], commands["sleep"]["async"]), (False, True))
        self.assertEqual((commands["echo"]["streaming"], commands["echo"]["async"]), (False, False))
        self.assertEqual(commands["echo"]["doc"], "Return the payload unchanged, with its content type.")

    def test_module_form_of_the_adapter_argument(self):
        w = WorkerProcess("demo")  # examples/ is on PYTHONPATH: MODULE alone means MODULE:adapter
        self.addCleanup(w.kill)
        self.assertEqual(w.ready.json()["adapter"], "demo")


class RequestTest(DemoTestCase):
    def test_echo_round_trip_is_byte_exact(self):
        payload = bytes(range(256)) * 300
        f = self.w.call("echo", payload, content_type="application/octet-stream")
        self.assertEqual(f.kind, P.RESPONSE)
        self.assertEqual(payload_of(f), ("application/octet-stream", payload))
        f = self.w.call("echo", b"", content_type="")
        self.assertEqual(payload_of(f), ("", b""))

    def test_json_results(self):
        self.assertEqual(json_of(self.w.call("compute", b'{"n": 10}')), {"n": 10, "sum": 285})
        self.assertEqual(json_of(self.w.call("whoami")), {"pid": self.w.pid})

    def test_eight_pipelined_requests(self):
        ids = list(range(100, 108))
        self.w.send(b"".join(req_frame(i, "echo", b"n%d" % i, "text/plain") for i in ids))
        got = self.w.replies(ids)
        for i in ids:
            self.assertEqual(len(got[i]), 1)
            self.assertEqual(payload_of(got[i][0]), ("text/plain", b"n%d" % i))

    def test_many_pipelined_requests_in_one_write(self):
        ids = list(range(1, 2001))
        self.w.send(b"".join(req_frame(i, "echo", b"%d" % i) for i in ids))
        got = self.w.replies(ids)
        self.assertEqual(sorted(got), ids)
        self.assertTrue(all(payload_of(v[0])[1] == b"%d" % k for k, v in got.items()))

    def test_streaming(self):
        rid = self.w.request("stream", b'{"n": 5}')
        frames = self.w.replies([rid])[rid]
        self.assertEqual([f.kind for f in frames], [P.STREAM_CHUNK] * 5 + [P.STREAM_END])
        self.assertEqual([json_of(f)["i"] for f in frames[:5]], [0, 1, 2, 3, 4])

    def test_async_commands_run_concurrently(self):
        # Three 1 s sleeps: 3 s one after another, about 1 s concurrently (the bound
        # leaves a busy machine 1.5 s).
        start = time.monotonic()
        ids = [self.w.request("sleep", b'{"seconds": 1.0}') for _ in range(3)]
        got = self.w.replies(ids)
        elapsed = time.monotonic() - start
        for i in ids:
            self.assertEqual(json_of(got[i][0]), {"slept": 1.0})
        self.assertLess(elapsed, 2.5, "three 1 s sleeps took %.3f s" % elapsed)

    def test_sync_commands_are_served_while_async_ones_sleep(self):
        slow = self.w.request("sleep", b'{"seconds": 1.0}')
        fast = self.w.request("echo", b"quick")
        f = self.w.recv()
        self.assertEqual((f.request_id, f.kind), (fast, P.RESPONSE))
        self.assertEqual(self.w.replies([slow])[slow][0].kind, P.RESPONSE)

    def test_unknown_command(self):
        f = self.w.call("nope")
        self.assertEqual(f.kind, P.ERROR)
        body = f.json()
        self.assertEqual(body["kind"], "unknown_command")
        self.assertIn("nope", body["message"])
        for name in ("echo", "compute", "stream"):
            self.assertIn(name, body["message"])
        self.assertEqual(payload_of(self.w.call("echo", b"still here"))[1], b"still here")

    def test_exception_in_user_code(self):
        # A payload req.json() cannot decode is the caller's error.
        f = self.w.call("compute", b"not json")
        self.assertEqual(f.kind, P.ERROR)
        body = f.json()
        self.assertEqual(body["kind"], "invalid_request")
        self.assertEqual(body["type"], "pitboss_worker.InvalidRequest")
        self.assertIn("not valid JSON", body["message"])
        self.assertIn("Traceback (most recent call last)", body["traceback"])
        self.assertIn("demo.py", body["traceback"])
        self.assertEqual(json_of(self.w.call("whoami")), {"pid": self.w.pid})

    def test_sessions_are_separate_and_close_drops_state(self):
        def count(sid):
            return json_of(self.w.call("counter", session_id=sid))["count"]

        self.assertEqual([count("a"), count("a"), count("b"), count("a")], [1, 2, 1, 3])
        self.w.send(P.encode(P.SESSION_CLOSE, 0, b"a"))
        self.assertEqual(count("a"), 1)
        self.assertEqual(count("b"), 2)
        self.w.send(P.encode(P.SESSION_CLOSE, 0, b"never-seen"))  # ignored
        f = self.w.call("counter")  # no session: the caller's error
        self.assertEqual((f.json()["kind"], f.json()["type"]), ("invalid_request", "pitboss_worker.InvalidRequest"))

    def test_cancel_of_an_async_command(self):
        rid = self.w.request("sleep", b'{"seconds": 30}')
        self.assertEqual(json_of(self.w.call("whoami"))["pid"], self.w.pid)  # it has started
        start = time.monotonic()
        self.w.send(P.encode(P.CANCEL, rid))
        f = self.w.replies([rid])[rid][0]
        self.assertLess(time.monotonic() - start, 5)
        self.assertEqual(f.kind, P.ERROR)
        self.assertEqual(f.json()["kind"], "cancelled")
        # a CANCEL for a finished request is ignored
        self.w.send(P.encode(P.CANCEL, rid) + P.encode(P.PING, 99))
        f = self.w.recv()
        self.assertEqual((f.kind, f.request_id), (P.PONG, 99))

    def test_cancel_before_the_async_task_runs(self):
        # REQUEST and CANCEL in one write: cancelled before (or just as) it starts
        rid = self.w.new_id()
        self.w.send(req_frame(rid, "sleep", b'{"seconds": 30}') + P.encode(P.CANCEL, rid))
        frames = self.w.replies([rid])[rid]
        self.assertEqual([f.kind for f in frames], [P.ERROR])
        self.assertEqual(frames[0].json()["kind"], "cancelled")


class ExitTest(DemoTestCase):
    def test_eof_finishes_in_flight_work_then_exits_0(self):
        rid = self.w.request("sleep", b'{"seconds": 0.2}')
        self.w.close_stdin()
        self.assertEqual(json_of(self.w.replies([rid])[rid][0]), {"slept": 0.2})
        self.assertEqual(self.w.wait(), 0)

    def test_shutdown_finishes_in_flight_work_then_exits_0(self):
        rid = self.w.request("sleep", b'{"seconds": 0.2}')
        self.w.send(P.encode(P.SHUTDOWN))
        late = self.w.request("echo", b"too late")
        got = self.w.replies([rid, late])
        self.assertEqual(json_of(got[rid][0]), {"slept": 0.2})
        self.assertEqual(got[late][0].json()["kind"], "bad_request")
        self.assertEqual(self.w.wait(), 0)

    def test_sigterm_exits_promptly(self):
        rid = self.w.request("sleep", b'{"seconds": 30}')
        self.assertEqual(json_of(self.w.call("whoami"))["pid"], self.w.pid)
        start = time.monotonic()
        os.kill(self.w.pid, signal.SIGTERM)
        self.assertEqual(self.w.wait(), 0)
        self.assertLess(time.monotonic() - start, 5)
        self.assertIn("SIGTERM", self.w.stderr_text())
        del rid

    def test_malformed_input_exits_non_zero(self):
        self.w.send(struct_frame(99))
        self.assertNotEqual(self.w.wait(), 0)
        self.assertIn("version 99", self.w.stderr_text("version 99"))

    def test_worker_kinds_from_the_host_exit_non_zero(self):
        self.w.send(P.encode_payload(P.RESPONSE, 1, "", b""))
        self.assertNotEqual(self.w.wait(), 0)
        self.assertIn("unexpected frame kind 3", self.w.stderr_text("unexpected"))

    def test_oversized_input_exits_non_zero(self):
        self.w.send(b"\xff\xff\xff\xff")
        self.assertNotEqual(self.w.wait(), 0)
        self.assertIn("exceeds the maximum", self.w.stderr_text("exceeds"))

    def test_malformed_request_body_exits_non_zero(self):
        self.w.send(P.encode(P.REQUEST, 1, b"\x00\x05\x00\x00\x00\x00\x00\x00\x00\x00ab"))
        self.assertNotEqual(self.w.wait(), 0)
        self.assertIn("REQUEST", self.w.stderr_text("REQUEST"))


def struct_frame(version):
    return P.HEADER.pack(12, version, P.PING, 0, 1)


class BadAdapterTest(unittest.TestCase):
    def test_missing_adapter_exits_non_zero_without_ready(self):
        w = WorkerProcess("surely_missing_module:adapter", wait_ready=False)
        self.addCleanup(w.kill)
        self.assertEqual(w.wait(), 1)
        self.assertIn("ModuleNotFoundError", w.stderr_text())
        self.assertEqual(w.proc.stdout.read(), b"")

    def test_an_adapter_failing_at_import_gets_a_traceback_from_its_own_code(self):
        w = WorkerProcess("broken_adapter:adapter", wait_ready=False)
        self.addCleanup(w.kill)
        self.assertEqual(w.wait(), 1)
        text = w.stderr_text()
        self.assertIn("cannot load adapter", text)
        self.assertIn("broken_adapter.py", text)
        self.assertIn("ValueError: broken_adapter fails at import, on purpose", text)
        # The worker's own frames (argv, loading) are left out of the traceback.
        self.assertNotIn("cli.py", text)
        self.assertNotIn("runtime.py", text)
        self.assertEqual(w.proc.stdout.read(), b"")

    def test_usage_error(self):
        w = WorkerProcess("x", ["--bogus"], wait_ready=False)
        self.addCleanup(w.kill)
        self.assertEqual(w.wait(), 2)
        self.assertIn("usage", w.stderr_text())


if __name__ == "__main__":
    unittest.main()
