"""API corners through a real worker serving tests/sample_adapter.py."""

import json
import unittest

from harness import WorkerProcess, json_of, payload_of, req_frame
from pitboss_worker import protocol as P


class SampleTest(unittest.TestCase):
    def setUp(self):
        self.w = WorkerProcess("sample_adapter", ["--max-frame-bytes", "65536", "--concurrency", "4"])
        self.addCleanup(self.w.kill)

    def test_result_types(self):
        self.assertEqual(payload_of(self.w.call("text")), ("text/plain; charset=utf-8", "héllo".encode()))
        self.assertEqual(payload_of(self.w.call("png")), ("image/png", b"\x89PNG"))
        self.assertEqual(payload_of(self.w.call("raw", content_type="x/y")), ("x/y", b"raw bytes"))
        body = self.w.call("not_json").json()
        # The command's fault, not the caller's: kind exception, type ResultError.
        self.assertEqual((body["kind"], body["type"]), ("exception", "pitboss_worker.ResultError"))

    def test_request_fields(self):
        rid = self.w.request("info", content_type="application/json", session_id="s9", timeout_ms=60000)
        info = json_of(self.w.replies([rid])[rid][0])
        self.assertTrue(50 < info["timeout"] <= 60, info)
        del info["timeout"]
        self.assertEqual(
            info,
            {"session_id": "s9", "command": "info", "request_id": rid,
             "content_type": "application/json", "cancelled": False},
        )
        self.assertIsNone(json_of(self.w.call("info"))["timeout"])

    def test_session_state_factory_and_close(self):
        def remember(sid, text):
            return json_of(self.w.call("remember", text, session_id=sid))

        self.assertEqual(remember("s1", "a"), ["a"])
        self.assertEqual(remember("s1", "b"), ["a", "b"])
        self.assertEqual(remember("s2", "c"), ["c"])
        self.w.send(P.encode(P.SESSION_CLOSE, 0, b"s1"))
        self.assertIn("closed session s1 with 2 items", self.w.stderr_text("closed session s1"))
        self.assertEqual(remember("s1", "d"), ["d"])
        # a clean exit closes the remaining sessions
        self.w.close_stdin()
        self.assertEqual(self.w.wait(), 0)
        text = self.w.stderr_text("closed session s2")
        self.assertIn("closed session s2 with 1 items", text)
        self.assertIn("closed session s1 with 1 items", text)

    def test_async_generator_streams(self):
        rid = self.w.request("agen", b'{"n": 4}')
        frames = self.w.replies([rid])[rid]
        self.assertEqual([f.kind for f in frames], [P.STREAM_CHUNK] * 4 + [P.STREAM_END])
        self.assertEqual([json_of(f) for f in frames[:4]], [{"i": i} for i in range(4)])

    def test_failing_stream_ends_with_an_error(self):
        rid = self.w.request("failing_stream")
        frames = self.w.replies([rid])[rid]
        self.assertEqual([f.kind for f in frames], [P.STREAM_CHUNK, P.ERROR])
        body = frames[1].json()
        self.assertEqual((body["type"], body["message"]), ("KeyError", "'boom'"))

    def test_oversized_chunk_ends_the_stream(self):
        rid = self.w.request("big_stream", b'{"n": 70000}')
        frames = self.w.replies([rid])[rid]
        self.assertEqual([f.kind for f in frames], [P.STREAM_CHUNK, P.ERROR])
        self.assertEqual(frames[1].json()["kind"], "response_too_large")
        f = self.w.call("big", b'{"n": 70000}')
        self.assertEqual(f.json()["kind"], "response_too_large")
        self.assertEqual(self.w.call("big", b'{"n": 60000}').kind, P.RESPONSE)

    def test_async_exception(self):
        body = self.w.call("async_fail").json()
        self.assertEqual((body["kind"], body["type"], body["message"]), ("exception", "RuntimeError", "async boom"))
        self.assertIn("async_fail", body["traceback"])

    def test_cancelled_exception(self):
        self.assertEqual(self.w.call("give_up").json()["kind"], "cancelled")

    def test_decorated_async_command(self):
        commands = dict((c["name"], c) for c in self.w.ready.json()["commands"])
        self.assertTrue(commands["wrapped_async"]["async"])
        self.assertEqual(payload_of(self.w.call("wrapped_async"))[1], b"wrapped")

    def test_the_loop_runs_alongside_sync_commands(self):
        waiting = self.w.request("wait_gate")
        opener = self.w.request("open_gate")
        got = self.w.replies([waiting, opener])
        self.assertEqual(payload_of(got[waiting][0])[1], b"opened")
        self.assertEqual(payload_of(got[opener][0])[1], b"ok")

    def test_child_processes_write_to_stderr_and_do_not_inherit_the_channel(self):
        info = json_of(self.w.call("child"))
        self.assertEqual(info["seen"], [], info)
        self.assertIn("sample: hello from a child", self.w.stderr_text("hello from a child"))
        self.assertEqual(payload_of(self.w.call("text"))[1], "héllo".encode())

    def test_input_sees_eof(self):
        self.assertEqual(payload_of(self.w.call("read_stdin"))[1], b"EOF")

    def test_duplicate_request_id_is_a_protocol_error(self):
        self.w.send(req_frame(5, "block", b'{"seconds": 30}') + req_frame(5, "text"))
        self.assertNotEqual(self.w.wait(), 0)
        self.assertIn("already in flight", self.w.stderr_text("already in flight"))


if __name__ == "__main__":
    unittest.main()
