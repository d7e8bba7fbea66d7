"""The adapter API and the runtime's argv parsing (no processes)."""

import functools
import time
import unittest

import harness  # noqa: F401  (puts python/ on sys.path)
from pitboss_worker import Adapter, Cancelled, Request, Response
from pitboss_worker.cli import UsageError, load_adapter, parse_args


class CommandTest(unittest.TestCase):
    def test_kinds_are_detected(self):
        a = Adapter("t")

        @a.command
        def plain(req):
            """First line.
            continues here.

            Second paragraph."""
            return 1

        @a.command
        async def coro(req):
            return 1

        @a.command
        def gen(req):
            yield 1

        @a.command
        async def agen(req):
            yield 1

        def deco(f):
            @functools.wraps(f)
            def wrapper(req):
                return f(req)

            return wrapper

        @a.command
        @deco
        async def hidden(req):
            return 1

        @a.command(name="renamed", doc="Documented.", streaming=True)
        def lister(req):
            return [1, 2]

        kinds = dict((c["name"], (c["streaming"], c["async"])) for c in (x.describe() for x in a.commands.values()))
        self.assertEqual(
            kinds,
            {
                "plain": (False, False),
                "coro": (False, True),
                "gen": (True, False),
                "agen": (True, True),
                "hidden": (False, True),
                "renamed": (True, False),
            },
        )
        self.assertEqual(a.commands["plain"].doc, "First line. continues here.")
        self.assertEqual(a.commands["renamed"].doc, "Documented.")
        self.assertEqual(list(a.commands), ["plain", "coro", "gen", "agen", "hidden", "renamed"])
        # the decorator returns the function itself
        self.assertEqual(plain(None), 1)

    def test_duplicates_are_refused(self):
        a = Adapter("t")
        a.command(lambda req: 1, name="x")
        with self.assertRaises(ValueError):
            a.command(lambda req: 2, name="x")

    def test_session_state_and_on_start_register(self):
        a = Adapter("t")

        @a.session_state
        def make(sid):
            return sid

        @a.on_start
        def hook():
            pass

        self.assertIs(a._session_factory, make)
        self.assertEqual(a._on_start, [hook])


class RequestResponseTest(unittest.TestCase):
    def test_request(self):
        r = Request(3, "cmd", "s", "application/json", b'{"a": [1]}', time.monotonic() + 5)
        self.assertEqual(r.json(), {"a": [1]})
        self.assertTrue(4 < r.timeout <= 5)
        self.assertFalse(r.cancelled)
        self.assertIsNone(r.session)
        r.raise_if_cancelled()
        r._cancelled = True
        self.assertTrue(r.cancelled)
        with self.assertRaises(Cancelled):
            r.raise_if_cancelled()
        self.assertIsNone(Request(1, "c", None, "", b"").timeout)
        self.assertEqual(Request(1, "c", None, "", b"", time.monotonic() - 1).timeout, 0.0)
        self.assertIn("cmd", repr(r))

    def test_response_defaults(self):
        self.assertEqual(Response(b"x").content_type, "application/octet-stream")
        r = Response("é")
        self.assertEqual((r.payload, r.content_type), ("é".encode(), "text/plain; charset=utf-8"))
        r = Response(bytearray(b"ab"), content_type="image/png")
        self.assertEqual((r.payload, r.content_type), (b"ab", "image/png"))


class ArgsTest(unittest.TestCase):
    def test_parse(self):
        self.assertEqual(
            parse_args(["--adapter", "m:a", "--max-frame-bytes", "1024", "--concurrency=8"]),
            {"adapter": "m:a", "max_frame_bytes": 1024, "concurrency": 8},
        )
        self.assertEqual(parse_args(["--adapter=m"])["max_frame_bytes"], 16 * 1024 * 1024)
        self.assertEqual(parse_args(["--adapter=m"])["concurrency"], 1)
        for bad in (
            [],
            ["--adapter"],
            ["--adapter", ":x"],
            ["--adapter", "m", "--bogus", "1"],
            ["--adapter", "m", "--concurrency", "0"],
            ["--adapter", "m", "--max-frame-bytes", "ten"],
            ["--adapter", "m", "--max-frame-bytes", "10"],
        ):
            with self.assertRaises(UsageError, msg=repr(bad)):
                parse_args(bad)

    def test_load_adapter(self):
        import sample_adapter

        self.assertIs(load_adapter("sample_adapter"), sample_adapter.adapter)
        self.assertIs(load_adapter("sample_adapter:adapter"), sample_adapter.adapter)
        with self.assertRaises(LookupError):
            load_adapter("sample_adapter:nope")
        with self.assertRaises(TypeError):
            load_adapter("sample_adapter:make_state")
        with self.assertRaises(ImportError):
            load_adapter("surely_not_a_module_here")

    def test_hooks_outside_a_worker(self):
        from pitboss_worker import hooks

        self.assertIsNone(hooks.current())
        self.assertEqual(hooks.max_frame_bytes(), 16 * 1024 * 1024)
        self.assertIsNone(hooks.unsafe_protocol_fd())


if __name__ == "__main__":
    unittest.main()
