"""An adapter written with full type hints: test_types.py checks it with mypy --strict,
which also checks the public API it uses (pitboss_worker, its py.typed)."""

from typing import Iterator, Optional
from pitboss_worker import Adapter, Request, Response, current_request

adapter = Adapter("typed")

@adapter.command
def hello(req: Request) -> Response:
    rid: str = req.request_id
    tp: Optional[str] = req.traceparent
    a: int = req.attempt
    cur: Optional[Request] = current_request()
    return Response(rid + str(tp) + str(a) + str(cur), "text/plain")

@adapter.command(name="s", streaming=True)
def stream(req: Request) -> Iterator[bytes]:
    yield req.payload

@adapter.session_state
def new(session_id: str) -> "dict[str, int]":
    return {}

# The testing helper is typed too: a user's adapter tests pass mypy --strict.
from typing import List
from pitboss_worker.testing import AdapterTester, Call, CommandError, Reply

def check_with_the_tester() -> None:
    with AdapterTester(adapter) as t:
        r: Reply = t.call("hello", {"a": 1}, session_id="s", timeout=1.5, attempt=2)
        body: bytes = r.payload
        chunks: List[Reply] = t.stream("s", b"x")
        pending: Call = t.start("hello")
        pending.cancel()
        try:
            pending.result()
        except CommandError as e:
            kind: str = e.kind
            print(body, chunks, kind)
