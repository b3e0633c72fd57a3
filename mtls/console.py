"""What both command-line tools do the same way at their edge."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

READER_GONE = 1  # exit code when stdout's reader went away (`ca list | head -1`)


def run_command(command: Callable[[], int]) -> int:
    """Run ``command`` and return its exit code; a reader gone away ends it quietly.

    stdout is flushed here, not at interpreter exit, so that a closed pipe (``... | head -1``) is
    caught as BrokenPipeError: stdout is then pointed at /dev/null (the interpreter flushes it again
    at exit, which would fail again) and the exit code is ``READER_GONE``, with no traceback.
    """
    try:
        code = command()
        sys.stdout.flush()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return READER_GONE
    return code
