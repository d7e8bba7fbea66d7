"""Which request the running code serves, for :func:`current_request` and the log
records an adapter writes (``log.py``).

The runtime notes the request of a synchronous command in :data:`serving`, by thread
(one dict store before and one after each command: nothing else is paid per
request), and an async command's in a :class:`contextvars.ContextVar` that each
asyncio task has its own copy of.
"""

from __future__ import annotations

import threading

TYPE_CHECKING = False
if TYPE_CHECKING:
    from contextvars import ContextVar
    from typing import Any, Dict, Optional

    from .adapter import Request

__all__ = ["current_request"]

#: Thread id -> the Request whose synchronous command runs on that thread, or None.
serving: Dict[Optional[int], Optional[Request]] = {}
#: The Request of the running async command (each task sets its own), once the
#: runtime's asyncio loop has started.
task_request: ContextVar[Optional[Request]] = None  # type: ignore[assignment]


def enable_tasks() -> None:
    """Creates :data:`task_request` (on the loop thread, when the loop starts)."""
    global task_request
    if task_request is None:
        import contextvars

        task_request = contextvars.ContextVar("pitboss_request", default=None)


def current_request() -> Optional[Request]:
    """The request the calling code serves: the command's own (sync or async), from
    inside it or from code it calls on the same thread or task; None elsewhere (a
    thread the command started, outside any command)."""
    var: Any = task_request
    if var is not None:
        req = var.get()
        if req is not None:
            return req  # type: ignore[no-any-return]
    return serving.get(threading.get_ident())
