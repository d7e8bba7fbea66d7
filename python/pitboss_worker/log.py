"""An adapter's ``logging`` records in pitboss's logs, with the request they belong to.

When the adapter uses the standard :mod:`logging` module and leaves the root logger
without handlers (as most do), the runtime installs :class:`PitbossHandler` on it
just before READY (and raises the root level from the default WARNING to INFO). Each
record becomes one line on stderr that pitboss parses: pitboss logs it under the
target ``pitboss::adapter`` with its level, logger name and message, the worker's id,
and the request id and trace id of the call it was written during (JSON logs
included). An adapter that configures logging itself keeps its own handlers; adding
``PitbossHandler()`` to them brings the same.

The runtime does not import :mod:`logging` itself (about 15 ms at start-up): only an
adapter that imported it gets the handler.
"""

from __future__ import annotations

import json
import logging
import os

from .context import current_request

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Dict

__all__ = ["PitbossHandler", "install", "MARK"]

#: The first character of a structured line (ASCII record separator): pitboss
#: parses such a line as a record; any other stderr line is logged as text.
MARK = "\x1e"
#: Longest line written, in bytes: pitboss cuts stderr lines at 8 KiB.
MAX_LINE = 8000

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


class PitbossHandler(logging.Handler):
    """Writes each record as one structured line on stderr (fd 2), for pitboss."""

    def __init__(self, level: int = logging.NOTSET) -> None:
        super().__init__(level)
        self._formatter = logging.Formatter()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
            if record.exc_info:
                message += "\n" + self._formatter.formatException(record.exc_info)
            if record.stack_info:
                message += "\n" + self._formatter.formatStack(record.stack_info)
            fields: Dict[str, str] = {
                "level": record.levelname,
                "logger": record.name,
                "message": message,
            }
            req = current_request()
            if req is not None:
                if req.request_id:
                    fields["request_id"] = req.request_id
                trace_id = req.trace_id
                if trace_id:
                    fields["trace_id"] = trace_id
            line = (MARK + _dumps(fields) + "\n").encode("utf-8", "replace")
            while len(line) > MAX_LINE and len(fields["message"]) > 16:
                text = fields["message"]
                fields["message"] = text[: len(text) * 3 // 4] + "...[truncated]"
                line = (MARK + _dumps(fields) + "\n").encode("utf-8", "replace")
            os.write(2, line)
        except Exception:
            self.handleError(record)


def install() -> bool:
    """Puts :class:`PitbossHandler` on the root logger unless it has handlers
    already; returns whether it did. Raises the root level from WARNING (Python's
    default) to INFO, so ``log.info(...)`` reaches pitboss's logs."""
    root = logging.getLogger()
    if root.handlers:
        return False
    root.addHandler(PitbossHandler())
    if root.level == logging.WARNING:
        root.setLevel(logging.INFO)
    return True
