"""One log line per session event, human-readable or JSON lines.

Every line carries the session id and peer so an administrator can follow one
connection with ``grep``.  Callers pass structured fields; secrets are never
among them (DESIGN.md rule 10), and values are quoted so a hostile user name
cannot forge a second log line.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

LOGGER_NAME = "mailbag"
logger = logging.getLogger(LOGGER_NAME)

#: Fields added to every line of this process (``worker=3`` in a worker process), so
#: the one log stream that all workers share still says who wrote each line.
_process_fields: dict[str, Any] = {}


def set_process_fields(**fields: Any) -> None:
    """Tag every later log line of this process with ``fields`` (e.g. ``worker=2``)."""
    _process_fields.clear()
    _process_fields.update(fields)


def _quote(value: object) -> str:
    text = str(value)
    # str methods, not a loop per character: three log lines per session add up.
    if text.isprintable() and text and " " not in text and '"' not in text and "=" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """``2026-11-27T18:00:00Z info login session=3f2a peer=127.0.0.1:5000 user=demo``."""

    _second = -1
    _stamp = ""

    def format(self, record: logging.LogRecord) -> str:
        second = int(record.created)
        if second != self._second:  # one strftime per second, not per line
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(second))
            self._second = second
        stamp = self._stamp
        fields: dict[str, Any] = getattr(record, "fields", {})
        parts = [stamp, record.levelname.lower(), record.getMessage()]
        parts += [f"{k}={_quote(v)}" for k, v in fields.items() if v is not None]
        return " ".join(parts)


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log shippers."""

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = getattr(record, "fields", {})
        data = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "event": record.getMessage(),
        }
        data.update({k: v for k, v in fields.items() if v is not None})
        return json.dumps(data, ensure_ascii=False, default=str)


def setup_logging(level: str = "info", fmt: str = "text") -> None:
    """Send mailbag's log to stderr in the chosen format."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    logger.handlers[:] = [handler]
    logger.setLevel(level.upper())
    logger.propagate = False
    # Neither formatter shows threads, processes or the calling source line; the
    # logging docs' "Optimization" section: skip collecting them for every record.
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging._srcfile = None  # documented there: no caller lookup per record


def log_event(event: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log one event with structured fields."""
    if logger.isEnabledFor(level):
        if _process_fields:
            fields = {**fields, **_process_fields}
        logger.log(level, event, extra={"fields": fields})
