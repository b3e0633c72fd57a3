"""Durations as operators write them (``90s``, ``15m``, ``24h``, ``30d``, also ``500ms``) and as messages show them.

Pure."""

from __future__ import annotations

import re
from datetime import timedelta

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str) -> float:
    """Return seconds for a duration string, or raise ValueError saying what is accepted."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        raise ValueError(f"duration {text!r} needs a unit: write e.g. '{text}s'")
    match = _DURATION.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        raise ValueError(f"{text!r} is not a duration; use a number and a unit, e.g. 90s, 15m, 24h, 30d")
    seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    if seconds <= 0:
        raise ValueError(f"duration {text!r} must be greater than zero")
    return seconds


def format_duration(seconds: float) -> str:
    for unit in ("d", "h", "m"):
        size = _UNIT_SECONDS[unit]
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def roughly(delta: timedelta) -> str:
    """A time span in its two largest units, rounded down: ``29d 23h``, ``1h 59m``, ``3h``, ``30s``."""
    minutes, seconds = divmod(max(0, int(delta.total_seconds())), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    parts = [(days, "d"), (hours, "h"), (minutes, "m"), (seconds, "s")]
    while len(parts) > 1 and parts[0][0] == 0:
        parts.pop(0)
    return " ".join(f"{count}{unit}" for count, unit in parts[:2] if count) or "0s"
