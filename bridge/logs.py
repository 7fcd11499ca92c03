"""Logging to stderr: JSON that Cloud Logging understands (`severity`, `message`), or text."""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone
from typing import Any

from bridge.events import rfc3339

# Cloud Logging's severities include Python's level names; anything else is DEFAULT.
_SEVERITIES = frozenset({"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"})
# What every LogRecord carries; anything else on a record came from `extra=`.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: Cloud Logging takes `severity` and `message` from it (the Ops
    Agent once its journald receiver parses JSON, see docs/operations.md), and every `extra=`
    field becomes a top-level key (`jsonPayload.event_id`), filterable without parsing text."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "severity": record.levelname if record.levelname in _SEVERITIES else "DEFAULT",
            "message": record.getMessage(),
            "time": rfc3339(datetime.fromtimestamp(record.created, timezone.utc)),
            "logger": record.name,
        }
        for name, value in vars(record).items():
            if name not in _STANDARD:
                entry.setdefault(name, value)  # never over the four above
        if record.exc_info:
            entry["stack_trace"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def configure(fmt: str, level: str) -> None:
    # Neither format shows the caller's file and line, the thread or the process: not working
    # them out for each record (the logging HOWTO's "Optimization") halves the cost of the two
    # lines an event logs.
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # The Pub/Sub client logs each retry at DEBUG/INFO; ours say it once per failure class.
    for noisy in ("google", "urllib3", "grpc"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))
