"""Worker threads that build big things (a snapshot, credentials with a large CRL) next to an event loop.

A worker thread holds the GIL while it runs Python code, and two things then stall the event loop:

- each system call of the loop lets the GIL go, and getting it back takes up to the switch interval
  (5 ms by default): a relayed echo costs a few of those;
- a cyclic garbage collection triggered by the worker's allocations scans every object of every
  open connection while holding the GIL (50-150 ms with 1,000 connections).

So while any worker started by ``run_in_worker`` runs, the interpreter switches threads every
``WORKER_SWITCH_INTERVAL`` and starts no automatic collection (what the worker allocates and drops
is freed by reference counting; the next collection after it sees the rest). The settings are
process-wide: they are taken when the first of overlapping workers starts and given back, as they
were before it, when the last one ends, however it ends.

The worker is never abandoned: like ``trio.to_thread.run_sync`` by default, a cancelled caller
still waits for the thread to finish (then sees the cancellation), so the settings never outlive
a worker and never come back while one still runs.
"""

from __future__ import annotations

import gc
import sys
import threading
from collections.abc import Callable
from typing import TypeVar

import trio

WORKER_SWITCH_INTERVAL = 0.0005  # seconds the event loop may wait for the GIL while a worker runs

T = TypeVar("T")

_lock = threading.Lock()  # the callers may be event loops in several threads
_running = 0  # workers started by run_in_worker that have not ended
_before: tuple[float, bool] = (0.0, True)  # switch interval and gc.isenabled() before the first of them


async def run_in_worker(fn: Callable[..., T], *args: object) -> T:
    """``fn(*args)`` in a worker thread, the loop kept responsive meanwhile (module docstring)."""
    _worker_started()
    try:
        return await trio.to_thread.run_sync(fn, *args)
    finally:
        _worker_ended()


def _worker_started() -> None:
    global _running, _before
    with _lock:
        if _running == 0:
            _before = (sys.getswitchinterval(), gc.isenabled())
            sys.setswitchinterval(WORKER_SWITCH_INTERVAL)
            gc.disable()
        _running += 1


def _worker_ended() -> None:
    global _running
    with _lock:
        _running -= 1
        if _running == 0:
            interval, collecting = _before
            sys.setswitchinterval(interval)
            if collecting:
                gc.enable()
