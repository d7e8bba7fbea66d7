"""Unit tests of app.py, without pitboss: run them with

    PYTHONPATH="$(pitboss runtime)" python3 -m unittest test_app

(or `pip install "$(pitboss runtime)"` once, then plain `python3 -m unittest`).
"""

import json
import unittest

from pitboss_worker import InvalidRequest, Request

import app


def request(command: str, payload: object) -> Request:
    return Request(1, command, None, "application/json", json.dumps(payload).encode("utf-8"))


class AppTest(unittest.TestCase):
    def test_hello_greets_by_name(self) -> None:
        self.assertEqual(app.hello(request("hello", {"name": "ada"})), {"hello": "ada"})

    def test_hello_refuses_a_name_that_is_not_text(self) -> None:
        with self.assertRaises(InvalidRequest):
            app.hello(request("hello", {"name": 7}))

    def test_words_streams_each_word(self) -> None:
        self.assertEqual(list(app.words(request("words", "one two"))), ["one", "two"])

    def test_the_adapter_has_both_commands(self) -> None:
        self.assertEqual(sorted(app.adapter.commands), ["hello", "words"])


if __name__ == "__main__":
    unittest.main()
