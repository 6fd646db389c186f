"""Logging set-up of every command: ``CATALOG_LOG_FORMAT=text`` (the default, one readable line)
or ``json`` (one JSON object per line, for log shippers).

A JSON line always has ``time`` (UTC, ISO 8601 with milliseconds), ``level``, ``logger``,
``message``; when known, ``trace_id`` and ``span_id`` (the current span, with tracing on), the
call's ``method``, ``peer``, ``status`` and ``duration_ms`` (passed by the RPC layer as ``extra``),
and ``exception`` (the formatted traceback). Text lines add the same request fields after the
message. Nothing here runs per RPC unless a line is logged.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from core import tracing

# Fields a log call may pass with ``extra=`` that the formatters show.
REQUEST_FIELDS = ("method", "peer", "status", "duration_ms")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


def _context(record: logging.LogRecord) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    trace_id, span_id = tracing.current_ids()
    if trace_id:
        fields["trace_id"] = trace_id
        fields["span_id"] = span_id
    for name in REQUEST_FIELDS:
        value = record.__dict__.get(name)
        if value is not None and value != "":
            fields[name] = value
    return fields


class JsonFormatter(logging.Formatter):
    """One JSON object per record (see the module docstring for its fields)."""

    def format(self, record: logging.LogRecord) -> str:
        created = time.gmtime(record.created)
        line: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", created) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        line.update(_context(record))
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exception"] = record.exc_text
        return json.dumps(line, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """The plain format, with the request fields and trace id appended as ``key=value``."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = _context(record)
        if not fields:
            return text
        extra = " ".join(f"{k}={v}" for k, v in fields.items())
        head, sep, tail = text.partition("\n")  # keep a traceback below the first line
        return f"{head} [{extra}]{sep}{tail}"


def configure(level: str, fmt: str) -> None:
    """Root logging at ``level`` (DEBUG also enables the ``catalog.access`` log) in ``fmt``."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    logging.basicConfig(level=level.upper(), handlers=[handler])
