"""pitboss_worker: the Python side of pitboss. Standard library only.

Write an adapter::

    from pitboss_worker import Adapter

    adapter = Adapter("demo")

    @adapter.command
    def echo(req):
        return req.payload

and pitboss runs it as ``python -m pitboss_worker --adapter mymodule:adapter``.
See python/README.md.
"""

from .adapter import Adapter, Request, Response

__all__ = ["Adapter", "Request", "Response"]
__version__ = "0.1.0"
