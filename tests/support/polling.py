"""Waiting without sleeping blindly: poll a condition until it holds or a deadline passes."""

from __future__ import annotations

import time

DEADLINE = 20.0  # seconds: how long any single wait in the suite may take before the test fails


def wait_until(predicate, timeout: float = DEADLINE, what: str = "condition"):
    """Call ``predicate`` until it returns something truthy, and return that; fail after ``timeout`` seconds."""
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)  # polling interval of a deadline loop, not a fixed wait
