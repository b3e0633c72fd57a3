"""The admin endpoint of a real `proxy run` under a flood of 500 keep-alive connections pinging /healthz:
/readyz keeps answering within a second. Figures are printed; run with ``-s`` to see them."""

from __future__ import annotations

import http.client
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support.flood import Timings, raise_nofile
from support.network import App
from support.processes import Sidecar, identity_yaml, vm_rss_kib

pytestmark = pytest.mark.e2e

FLOOD = 500
PROBES = 50
LATENCY_BOUND = 1.0  # seconds: the bound for /readyz during the flood
FLOOD_SCRIPT = Path(__file__).parent / "support" / "keepalive_flood.py"
FRONTEND = "spiffe://example.org/ns/prod/sa/frontend"


def _readyz(port: int) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=LATENCY_BOUND * 5)
    try:
        conn.request("GET", "/readyz")
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def test_readyz_answers_within_a_second_during_a_flood_of_500_keep_alive_healthz_connections(ids, tmp_path):
    raise_nofile(FLOOD + 1024)
    app = App()
    config = identity_yaml(ids["api"]) + (
        f"inbound:\n  - name: api\n    listen: 127.0.0.1:0\n    forward: 127.0.0.1:{app.port}\n"
        f"    allow: [{FRONTEND}]\n"
        "admin:\n  listen: 127.0.0.1:0\n"
    )
    side = Sidecar(tmp_path, "api", config).wait_ready()
    flood = None
    try:
        port = side.ports["admin"]
        assert _readyz(port) == 200
        rss_before = vm_rss_kib(side.proc.pid)
        flood = subprocess.Popen(
            [sys.executable, str(FLOOD_SCRIPT), str(port), str(FLOOD), "/healthz"],
            stdout=subprocess.PIPE, text=True,
        )
        assert flood.stdout.readline().strip() == "flooding"  # every flood connection has been answered
        rss_during = vm_rss_kib(side.proc.pid)
        seconds, successes = [], 0
        for _ in range(PROBES):
            started = time.monotonic()
            try:
                successes += _readyz(port) == 200
            except OSError:
                pass
            seconds.append(time.monotonic() - started)
        flood.terminate()
        flood_counts = flood.communicate(timeout=30)[0].strip()
        timings = Timings(PROBES, successes, tuple(seconds))
        print(
            f"\nadmin, {FLOOD} keep-alive connections pinging /healthz ({flood_counts}): /readyz {timings.summary()}; "
            f"RSS {rss_before} KiB before, {rss_during} KiB during"
        )
        assert timings.success_rate == 1.0, timings.summary()
        assert max(timings.seconds) < LATENCY_BOUND, timings.summary()
    finally:
        if flood is not None and flood.poll() is None:
            flood.kill()
            flood.wait()
        side.stop()
        app.close()
