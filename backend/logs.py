"""Log records that say which request and which tasks they belong to.

Under gunicorn's threads the lines of concurrent requests interleave; without the request id
(also sent back as ``X-Request-ID``, and taken from the caller's ``X-Request-ID`` when it sends
one) a failure cannot be traced from the user's error message to its log lines.

The ids are added by a log record factory rather than a handler filter, so every record
created during a request carries them whichever handler formats it (ours, gunicorn's,
pytest's): ``record.request_id`` and ``record.task_ids`` (``-`` / empty outside a request).
Work a request hands to another thread (the deferred predictions' worker) has no Flask request
context, so that thread sets the originating request's id and its task ids with ``log_context``,
which the factory reads when no request is active: its lines trace back to the request too.
``LOG_FORMAT=json`` writes one JSON object per line for log collectors.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
from collections.abc import Iterator, Sequence
from typing import Any

from flask import g, has_request_context

from backend.config import ConfigError

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(threadName)s] [req %(request_id)s%(task_ids_suffix)s] %(message)s"
LOG_FORMATS = ("text", "json")
MAX_TASK_IDS = 10  # a 1,000-task batch must not put 1,000 ids on every line

# (request id, task ids) of work done outside a Flask request on a request's behalf
_BACKGROUND: contextvars.ContextVar[tuple[str, Sequence[Any]] | None] = contextvars.ContextVar(
    "log_context", default=None
)


def _task_ids_text(task_ids: Sequence[Any]) -> str:
    shown = ",".join(str(t) for t in task_ids[:MAX_TASK_IDS])
    more = len(task_ids) - MAX_TASK_IDS
    return shown + (f",... (+{more})" if more > 0 else "")


def current_log_context() -> tuple[str, Sequence[Any]]:
    """The request id and task ids the log lines written here carry (``-`` and none outside
    a request or ``log_context``): what work handed to another thread takes along."""
    if has_request_context():
        return g.get("request_id", "-"), g.get("task_ids", [])
    return _BACKGROUND.get() or ("-", [])


@contextlib.contextmanager
def log_context(request_id: str, task_ids: Sequence[Any]) -> Iterator[None]:
    """Log lines written in the block outside a Flask request carry ``request_id`` and
    ``task_ids`` (a background thread working for a request)."""
    token = _BACKGROUND.set((request_id, task_ids))
    try:
        yield
    finally:
        _BACKGROUND.reset(token)


def install_request_context() -> None:
    """Make every new log record carry the current request's id and task ids (idempotent)."""
    previous = logging.getLogRecordFactory()
    if getattr(previous, "_adds_request_context", False):
        return

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        request_id, ids = current_log_context()
        task_ids = _task_ids_text(ids)
        record.request_id = request_id
        record.task_ids = task_ids
        record.task_ids_suffix = f" tasks {task_ids}" if task_ids else ""
        return record

    factory._adds_request_context = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(factory)


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, request and task ids."""

    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", "-"),
            "task_ids": getattr(record, "task_ids", ""),
            "thread": record.threadName,
        }
        if record.exc_info:
            payload["exception"] = self.formatException(record.exc_info)
        return json.dumps(payload, default=str)


def configure_logging(level: str, log_format: str = "text") -> None:
    """Root logging for the server: level, text or JSON lines, request context on every record."""
    if log_format not in LOG_FORMATS:
        raise ConfigError(f"LOG_FORMAT={log_format!r} is not one of {', '.join(LOG_FORMATS)}")
    install_request_context()
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), handlers=[handler], force=True)
