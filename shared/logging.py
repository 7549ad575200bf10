"""Structured JSON logging with a request/job id, shared by the gateway and the workers.

One line of JSON per event: `ts`, `level`, `logger`, `event` (the message), the bound context
(`request_id`, `job_id`) and the event's own fields passed as `extra={"fields": {...}}`.
What never goes into a log line: image bytes, file names, tokens, keys, client-supplied text.
Fields are whitelisted by type (numbers, booleans, short identifiers); anything else is dropped,
so a careless call cannot leak a payload.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import time
from collections.abc import Mapping
from types import MappingProxyType

# The default is read-only: bind() and clear() always set a new mapping, never mutate one.
_context: contextvars.ContextVar[Mapping[str, str]] = contextvars.ContextVar(
    "m2fp_log_context", default=MappingProxyType({})
)
_SAFE_TEXT = re.compile(r"^[A-Za-z0-9_.:/\-]{0,80}$")


def bind(**fields: str) -> None:
    """Attach fields (request_id, job_id, ...) to every log line of this context."""
    _context.set({**_context.get(), **{k: v for k, v in fields.items() if v is not None}})


def clear() -> None:
    """Drop the bound context (end of a request or task)."""
    _context.set({})


def _safe(value: object) -> object | None:
    if isinstance(value, bool | int | float) or value is None:
        return value
    if isinstance(value, str) and _SAFE_TEXT.match(value):
        return value
    return None


class JsonFormatter(logging.Formatter):
    """Formats records as one JSON object per line with only safe fields."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage() if not record.args else record.msg,
        }
        line.update(_context.get())
        for key, value in (getattr(record, "fields", None) or {}).items():
            safe = _safe(value)
            if safe is not None or value is None:
                line[key] = safe
        if record.exc_info:
            # The exception type only: messages of library exceptions can carry paths or data.
            line["exc_type"] = record.exc_info[0].__name__ if record.exc_info[0] else None
        return json.dumps(line, separators=(",", ":"))


def configure_logging(level: str = "INFO", stream=None) -> None:
    """Route the root logger to one JSON handler (idempotent)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_m2fp", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler._m2fp = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level)
    logging.Formatter.converter = time.gmtime


def event(logger: logging.Logger, name: str, level: int = logging.INFO, **fields: object) -> None:
    """Log one structured event: `event(log, "job_done", seconds=1.2)`."""
    logger.log(level, name, extra={"fields": fields})
