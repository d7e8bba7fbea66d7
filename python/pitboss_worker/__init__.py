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

__all__ = ["Adapter", "Cancelled", "InvalidRequest", "Request", "Response", "ResultError"]
__version__ = "0.1.0"
