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
            {"session_id": "s9", "command": "info", "frame_id": rid, "request_id": "",
             "traceparent": None, "tracestate": None, "trace_id": None, "attempt": 1,
             "backend": None, "content_type": "application/json", "cancelled": False},
        )
        self.assertIsNone(json_of(self.w.call("info"))["timeout"])

    def test_request_context(self):
        ctx = P.encode_context(
            "req-42", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", "k=v", 2, "new"
        )
        rid = self.w.request("info", b"{}", session_id="s9", context=ctx)
        info = json_of(self.w.replies([rid])[rid][0])
        self.assertEqual(
            (info["request_id"], info["traceparent"], info["tracestate"], info["attempt"], info["backend"]),
            ("req-42", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", "k=v", 2, "new"),
        )
        self.assertEqual(info["trace_id"], "0af7651916cd43dd8448eb211c80319c")
        self.assertEqual((info["frame_id"], info["session_id"]), (rid, "s9"))
        # The payload starts after the context block.
        rid = self.w.request("echo", b"after the context", context=P.encode_context("x"))
        self.assertEqual(payload_of(self.w.replies([rid])[rid][0])[1], b"after the context")

    def test_ready_announces_the_revision_and_the_runtime_version(self):
        import pitboss_worker

        ready = self.w.ready.json()
        self.assertEqual(ready["protocol"], P.PROTOCOL_VERSION)
        self.assertEqual(ready["revision"], P.PROTOCOL_REVISION)
        self.assertEqual(ready["runtime"], pitboss_worker.__version__)

    def test_log_records_are_structured_lines_with_the_request_id(self):
        tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        a = self.w.request("log_it", b"one", context=P.encode_context("rid-sync", tp))
        b = self.w.request("alog", b"two", context=P.encode_context("rid-async"))
        self.w.replies([a, b])
        text = self.w.stderr_text("async says two")
        records = [json.loads(l[1:]) for l in text.split("\n") if l.startswith("\x1e")]
        by_message = {r["message"].splitlines()[0]: r for r in records}
        self.assertEqual(
            by_message["sync says one"],
            {"level": "INFO", "logger": "sample.log", "message": "sync says one",
             "request_id": "rid-sync", "trace_id": "0af7651916cd43dd8448eb211c80319c"},
        )
        self.assertIn("KeyError: 'boom'", by_message["and a traceback"]["message"])
        self.assertEqual(by_message["and a traceback"]["level"], "ERROR")
        self.assertEqual(
            by_message["async says two"],
            {"level": "WARNING", "logger": "sample.log", "message": "async says two",
             "request_id": "rid-async"},
        )

    def test_malformed_contexts_and_stray_flags_are_protocol_errors(self):
        good = req_frame(1, "echo", b"x", context=P.encode_context("r"))
        # context_len pointing past the end of the body
        bad = bytearray(good)
        at = 16 + P.REQUEST_HEAD_LEN + len(b"echo")
        bad[at : at + 2] = b"\xff\xff"
        self.w.send(bytes(bad))
        self.assertNotEqual(self.w.wait(), 0)
        self.assertIn("malformed request context", self.w.stderr_text("malformed request context"))
        w = WorkerProcess("sample_adapter", [])
        self.addCleanup(w.kill)
        w.send(P.HEADER.pack(P.HEADER_LEN, P.PROTOCOL_VERSION, P.PING, P.FLAG_CONTEXT, 1))
        self.assertNotEqual(w.wait(), 0)
        self.assertIn("reserved flags", w.stderr_text("reserved flags"))

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
