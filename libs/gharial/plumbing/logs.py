"""Structured logs: one JSON object per line on stderr, one line per event.

Every line has `ts` (UTC, ISO 8601), `level`, `service` and `event` (a short snake_case name such
as ``stream_opened``), plus the event's own fields (stream IDs, card IDs, durations). Log
collectors (Loki, Cloud Logging, `jq`) need no parsing rules for it.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

_SERVICE = "gharial"


class LogLevel(StrEnum):
    """The levels a service's --log-level flag accepts."""

    DEBUG = "DEBUG"
    INFO = "INFO"
    WARNING = "WARNING"
    ERROR = "ERROR"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "service": _SERVICE,
            "event": getattr(record, "event", None) or record.getMessage(),
        }
        line.update(getattr(record, "fields", {}))
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def configure_logging(service: str, level: str = "INFO") -> None:
    """Route every logger of the process to JSON lines on stderr, tagged with `service`."""
    global _SERVICE
    _SERVICE = service
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def parse_log_line(line: str) -> dict[str, Any]:
    """One line of a service's log as written by JsonFormatter; {} for anything else (how
    `gharial up` and the tests read ports and events from services they start)."""
    try:
        value = json.loads(line)
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def log_event(logger: logging.Logger, event: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log one event with its fields, e.g. ``log_event(log, "stream_opened", stream_id=7)``."""
    logger.log(level, event, extra={"event": event, "fields": fields})
