"""`proxy demo` is what `make demo` runs: it must work on a fresh machine and explain both calls."""

import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e


def test_demo_shows_one_allowed_and_one_denied_call_and_exits_zero():
    proc = subprocess.run([sys.executable, "-m", "proxy", "demo"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "frontend got: api says hello" in proc.stdout
    assert "reason: identity_not_allowed: port api allows spiffe://example.org/ns/prod/sa/frontend" in proc.stdout
    assert "connections the api app saw from the intruder: 0" in proc.stdout
