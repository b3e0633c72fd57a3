"""Waiting without sleeping blindly: poll a condition until it holds or a deadline passes."""

from __future__ import annotations

import time

import trio

POLL_INTERVAL = 0.01  # seconds between two looks at the condition, unless a caller samples faster
DEADLINE = 20.0  # seconds: how long any single wait in the suite may take before the test fails


def wait_until(predicate, timeout: float = DEADLINE, what: str = "condition", interval: float = POLL_INTERVAL):
    """Call ``predicate`` until it returns something truthy, and return that; fail after ``timeout`` seconds."""
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


async def wait_until_async(predicate, timeout: float = DEADLINE, what: str = "condition"):
    """``wait_until`` inside trio: the event loop keeps running between two looks at ``predicate``."""
    with trio.move_on_after(timeout):
        while True:
            value = predicate()
            if value:
                return value
            await trio.sleep(POLL_INTERVAL)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
