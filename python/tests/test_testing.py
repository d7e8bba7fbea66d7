"""pitboss_worker.testing: an adapter's commands called in-process, with the same
requests, replies, sessions, streams, errors and cancellation as through pitboss."""

import time
import unittest

from pitboss_worker import current_request
from pitboss_worker.testing import AdapterTester, CommandError, Reply

import sample_adapter


class AdapterTesterTest(unittest.TestCase):
    def setUp(self):
        self.t = AdapterTester(sample_adapter.adapter)
        self.addCleanup(self.t.close)

    def test_it_announces_the_commands_as_ready_does(self):
        self.assertIn("remember", self.t.commands)
        self.assertTrue(self.t.commands["agen"]["streaming"])
        self.assertTrue(self.t.commands["agen"]["async"])
        self.assertEqual(self.t.commands["text"]["doc"], "Returns a str.")

    def test_results_are_encoded_as_the_runtime_does(self):
        self.assertEqual(self.t.call("text"), Reply("héllo".encode(), "text/plain; charset=utf-8"))
        self.assertEqual(self.t.call("png"), Reply(b"\x89PNG", "image/png"))
        self.assertEqual(self.t.call("raw", content_type="x/y"), Reply(b"raw bytes", "x/y"))
        self.assertEqual(self.t.call("echo", b"\x00\x01"), Reply(b"\x00\x01", ""))
        # A JSON payload is sent as JSON, with its content type.
        echoed = self.t.call("echo", {"a": [1, 2]})
        self.assertEqual((echoed.json(), echoed.content_type), ({"a": [1, 2]}, "application/json"))
        with self.assertRaises(CommandError) as e:
            self.t.call("not_json")
        self.assertEqual((e.exception.kind, e.exception.type), ("exception", "pitboss_worker.ResultError"))

    def test_the_request_carries_the_context_pitboss_passes(self):
        info = self.t.call(
            "info",
            b"{}",
            content_type="application/json",
            session_id="s1",
            timeout=30,
            request_id="req-9",
            traceparent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            tracestate="k=v",
            attempt=2,
            backend="new",
        ).json()
        self.assertTrue(25 < info.pop("timeout") <= 30)
        self.assertEqual(
            info,
            {"session_id": "s1", "command": "info", "frame_id": info["frame_id"], "request_id": "req-9",
             "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
             "tracestate": "k=v", "trace_id": "0af7651916cd43dd8448eb211c80319c", "attempt": 2,
             "backend": "new", "content_type": "application/json", "cancelled": False},
        )
        defaults = self.t.call("info").json()
        self.assertEqual((defaults["request_id"], defaults["attempt"], defaults["backend"]), ("test-request", 1, None))
        self.assertIsNone(defaults["timeout"])
        with self.assertRaises(ValueError):
            self.t.start("info", backend="blue")

    def test_sessions_keep_state_until_closed(self):
        self.assertEqual(self.t.call("remember", "a", session_id="s").json(), ["a"])
        self.assertEqual(self.t.call("remember", "b", session_id="s").json(), ["a", "b"])
        self.assertEqual(self.t.call("remember", "x", session_id="other").json(), ["x"])
        self.t.close_session("s")
        self.assertEqual(self.t.call("remember", "c", session_id="s").json(), ["c"])

    def test_streams_sync_and_async_and_a_failing_one(self):
        chunks = self.t.stream("agen", {"n": 3})
        self.assertEqual([c.json() for c in chunks], [{"i": 0}, {"i": 1}, {"i": 2}])
        with self.assertRaises(CommandError) as e:
            self.t.call("async_fail")
        self.assertEqual((e.exception.kind, e.exception.type, e.exception.message), ("exception", "RuntimeError", "async boom"))
        self.assertIn("async boom", e.exception.traceback)

    def test_errors_carry_the_kind_pitboss_maps_to_a_status(self):
        with self.assertRaises(CommandError) as e:
            self.t.call("no_such_command")
        self.assertEqual(e.exception.kind, "unknown_command")
        with self.assertRaises(CommandError) as e:
            self.t.call("give_up")
        self.assertEqual(e.exception.kind, "cancelled")

    def test_cancellation_reaches_a_running_command(self):
        call = self.t.start("spin", {"seconds": 20})
        time.sleep(0.05)  # let it start; the assertion below does not depend on it
        call.cancel()
        started = time.monotonic()
        try:
            reply = call.result()
        except CommandError as e:
            self.assertEqual(e.kind, "cancelled")
        else:
            self.assertEqual(reply.json(), {"cancelled": True})
        self.assertLess(time.monotonic() - started, 15, "the cancel was seen, not the 20 s run")

    def test_current_request_is_the_call_being_served(self):
        self.assertIsNone(current_request())
        self.assertEqual(self.t.call("echo", b"x").payload, b"x")

    def test_a_closed_tester_says_so(self):
        self.t.close()
        with self.assertRaises(RuntimeError):
            self.t.call("echo")


class ExampleAdapterTest(unittest.TestCase):
    """The repo's demo adapter, tested with the helper as a user would test theirs."""

    def test_the_demo_adapter(self):
        with AdapterTester("examples.demo:adapter") as t:
            self.assertEqual(t.call("compute", {"n": 4}).json(), {"n": 4, "sum": 14})
            self.assertEqual(t.call("counter", session_id="s").json()["count"], 1)
            self.assertEqual(t.call("counter", session_id="s").json()["count"], 2)
            self.assertEqual([c.json() for c in t.stream("stream", {"n": 2})], [{"i": 0}, {"i": 1}])
            self.assertEqual(t.call("sleep", {"seconds": 0.01}).json(), {"slept": 0.01})
            with self.assertRaises(CommandError) as e:
                t.call("compute", {"n": -1})
            self.assertEqual(e.exception.kind, "invalid_request")


if __name__ == "__main__":
    unittest.main()
