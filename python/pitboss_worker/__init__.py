"""pitboss_worker: the Python side of pitboss. Standard library only, Python 3.9+.

Write an adapter::

    from pitboss_worker import Adapter

    adapter = Adapter("demo")

    @adapter.command
    def echo(req):
        return req.payload

and pitboss runs it as ``python -m pitboss_worker --adapter mymodule:adapter``.
See python/README.md for the whole API.
"""

from .adapter import Adapter, Cancelled, InvalidRequest, Request, Response, ResultError
from .context import current_request
from .protocol import PROTOCOL_REVISION, PROTOCOL_VERSION

__all__ = [
    "Adapter",
    "Cancelled",
    "InvalidRequest",
    "Request",
    "Response",
    "ResultError",
    "current_request",
    "PROTOCOL_VERSION",
    "PROTOCOL_REVISION",
]
#: pitboss's version (Cargo.toml), which this runtime ships with; pitboss checks the
#: protocol (PROTOCOL_VERSION, announced in READY with this) when a worker starts.
__version__ = "0.1.0"
