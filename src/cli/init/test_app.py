"""Tests of app.py, without pitboss: pitboss_worker.testing runs the real worker
runtime in this process, so each call gets the same request, reply encoding,
sessions, streams and errors as through pitboss. Run them with

    PYTHONPATH="$(pitboss runtime)" python3 -m unittest test_app

(or `pip install "$(pitboss runtime)"` once, then plain `python3 -m unittest`).
"""

import unittest

from pitboss_worker.testing import AdapterTester, CommandError

from app import adapter


class AppTest(unittest.TestCase):
    def setUp(self) -> None:
        self.app = AdapterTester(adapter)
        self.addCleanup(self.app.close)

    def test_hello_greets_by_name(self) -> None:
        reply = self.app.call("hello", {"name": "ada"})
        self.assertEqual(reply.json(), {"hello": "ada"})
        self.assertEqual(reply.content_type, "application/json")

    def test_hello_refuses_a_name_that_is_not_text(self) -> None:
        # pitboss answers this with INVALID_ARGUMENT.
        with self.assertRaises(CommandError) as e:
            self.app.call("hello", {"name": 7})
        self.assertEqual(e.exception.kind, "invalid_request")

    def test_words_streams_each_word(self) -> None:
        chunks = self.app.stream("words", '"one two"')  # a JSON string
        self.assertEqual([c.text() for c in chunks], ["one", "two"])

    def test_the_adapter_has_both_commands(self) -> None:
        self.assertEqual(sorted(self.app.commands), ["hello", "words"])


if __name__ == "__main__":
    unittest.main()
