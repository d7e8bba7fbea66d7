"""An adapter module that fails while it is imported (tests/test_worker.py)."""


def _fail():
    raise ValueError("broken_adapter fails at import, on purpose")


_fail()
