"""Structured event log: one line per event on stderr, JSON or text.

Connection decisions use the fields listed in docs/reference.md ("The decision log").
"""

from __future__ import annotations

import json
import sys
from datetime import datetime, timezone
from typing import TextIO

LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}


def _timestamp() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class EventLog:
    def __init__(self, level: str = "info", fmt: str = "json", stream: TextIO | None = None):
        self.threshold = LEVELS[level]
        self.fmt = fmt
        self.stream = stream if stream is not None else sys.stderr

    def configure(self, level: str, fmt: str) -> None:
        self.threshold = LEVELS[level]
        self.fmt = fmt

    def enabled(self, level: str) -> bool:
        return LEVELS[level] >= self.threshold

    def emit(self, level: str, event: str, **fields) -> None:
        if LEVELS[level] < self.threshold:
            return
        record = {"ts": _timestamp(), "level": level, "event": event}
        record.update(fields)
        if self.fmt == "json":
            line = json.dumps(record, separators=(",", ":"), default=str)
        else:
            extras = " ".join(f"{k}={v}" if not isinstance(v, str) or " " not in v else f'{k}="{v}"' for k, v in fields.items() if v is not None)
            line = f"{record['ts']} {level.upper():7} {event} {extras}".rstrip()
        try:
            self.stream.write(line + "\n")
            self.stream.flush()
        except (OSError, ValueError):
            pass  # a closed or full stderr must never take the data path down
