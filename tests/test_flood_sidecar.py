"""Floods of unauthenticated connections against a real `proxy run`, while a good client is served.

Each flood holds idle TCP connections (connect, send nothing) from many loopback source addresses;
the good client connects from 127.0.0.1 and makes complete mTLS requests meanwhile. The figures
(success rate, p50/p99, RSS) are printed; run with ``-s`` to see them.
"""

from __future__ import annotations

import socket
import threading
import time

import pytest
from support.certs import API, FRONTEND
from support.flood import IdleFlood, Timings, raise_nofile
from support.network import App, client_context, read_until_closed, tls_attempt
from support.polling import wait_until
from support.processes import Sidecar, inbound_config, outbound_config, vm_rss_kib

pytestmark = pytest.mark.e2e

FLOOD = 3000  # idle connections, over FLOOD_SOURCES source addresses
FLOOD_SOURCES = 60
GOOD_REQUESTS = 60


def _source(i: int) -> str:
    return f"127.0.1.{1 + i % FLOOD_SOURCES}"


class Flooder(threading.Thread):
    """Opens ``count`` idle connections to ``port`` round-robin over the flood sources, then holds them."""

    def __init__(self, port: int, count: int):
        super().__init__(daemon=True)
        raise_nofile(count + 1024)
        self.port, self.count = port, count
        self.floods: list[IdleFlood] = []
        self.done = threading.Event()

    def run(self) -> None:
        try:
            for start in range(0, self.count, FLOOD_SOURCES):
                for i in range(start, min(start + FLOOD_SOURCES, self.count)):
                    self.floods.append(IdleFlood(self.port, 1, source=_source(i)))
        finally:
            self.done.set()

    def close(self) -> None:
        for flood in self.floods:
            flood.close()


def good_requests(port: int, ident, count: int, until: threading.Event | None = None) -> Timings:
    """``count`` complete requests (more while ``until`` is not set), each timed."""
    ctx = client_context(ident)
    seconds, successes, attempts = [], 0, 0
    while attempts < count or (until is not None and not until.is_set() and attempts < 20 * count):
        attempts += 1
        payload = f"good {attempts}".encode()
        started = time.monotonic()
        _, outcome = tls_attempt(ctx, port, payload)
        seconds.append(time.monotonic() - started)
        successes += outcome == f"data {payload!r}"
    return Timings(attempts, successes, tuple(seconds))


def metric(side: Sidecar, name: str, **labels: str) -> float:
    """One sample of the sidecar's /metrics (0 when absent)."""
    with socket.create_connection(("127.0.0.1", side.ports["admin"]), timeout=10) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\nhost: admin\r\nconnection: close\r\n\r\n")
        text, _ = read_until_closed(sock, 10)
    wanted = ",".join(f'{key}="{value}"' for key, value in sorted(labels.items()))
    for line in text.decode().splitlines():
        if line.startswith(f"{name}{{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
        if line.startswith(f"{name} ") and not wanted:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


ADMIN = "admin: {listen: 127.0.0.1:0}\n"


def test_a_good_client_is_served_while_thousands_of_idle_connections_flood_its_port(pki, tmp_path):
    app = App()
    # A small waiting budget, so the flood overflows it and the oldest idle connections keep yielding.
    side = Sidecar(tmp_path, "flooded", inbound_config(
        pki["ids"]["api"], f"127.0.0.1:{app.port}", [FRONTEND],
        extra=ADMIN + "limits: {handshakes: {waiting: 1000}}\n",
    )).wait_ready()
    flooder = Flooder(side.ports["api"], FLOOD)
    try:
        rss_before = vm_rss_kib(side.proc.pid)
        flooder.start()
        timings = good_requests(side.ports["api"], pki["ids"]["frontend"], GOOD_REQUESTS, until=flooder.done)
        flooder.done.wait(60)
        rss_during = vm_rss_kib(side.proc.pid)
        evicted = wait_until(lambda: metric(side, "sidecar_handshake_evictions_total", budget="waiting"), 20,
                             "evictions counted")
        print(f"\nidle flood of {FLOOD} connections from {FLOOD_SOURCES} sources (waiting budget 1000): "
              f"good client {timings.summary()}; RSS {rss_before / 1024:.1f} MiB before, "
              f"{rss_during / 1024:.1f} MiB during; {evicted:.0f} evicted")
        assert timings.success_rate >= 0.95, timings.summary()
        assert timings.percentile(0.99) < 2.0, timings.summary()
        assert evicted >= FLOOD - 1000 - 100  # the rest were evicted (a few may still be being accepted)
        assert app.accepted == timings.successes, "no flood connection ever reached the app"
        assert side.proc.poll() is None
    finally:
        flooder.close()
        side.stop()
        app.close()


def test_an_inbound_flood_leaves_outbound_listeners_their_connections(pki, tmp_path):
    """With max_connections 50, idle connections on the public port once took every slot."""
    app = App()
    upstream = Sidecar(tmp_path, "orders", inbound_config(pki["ids"]["api"], f"127.0.0.1:{app.port}",
                                                          [FRONTEND])).wait_ready()
    web = Sidecar(tmp_path, "web", outbound_config(
        pki["ids"]["frontend"], {"orders": f"127.0.0.1:{upstream.ports['api']}"}, [API],
        extra=(f"inbound:\n  - name: public\n    listen: 127.0.0.1:0\n    forward: 127.0.0.1:{app.port}\n"
               f"    allow: [{FRONTEND}]\n" + ADMIN + "limits: {max_connections: 50}\n"),
    )).wait_ready()
    flooder = Flooder(web.ports["public"], 500)
    try:
        flooder.run()  # all 500 held before the app calls out
        wait_until(lambda: metric(web, "sidecar_handshakes_pending", listener="public", stage="waiting") >= 400,
                   20, "the flood to be accepted")
        timings = Timings(0, 0, ())
        seconds, ok = [], 0
        for i in range(20):
            started = time.monotonic()
            with socket.create_connection(("127.0.0.1", web.ports["orders"]), timeout=10) as sock:
                sock.sendall(f"call {i}".encode())
                sock.shutdown(socket.SHUT_WR)
                got, _ = read_until_closed(sock, 10)
            seconds.append(time.monotonic() - started)
            ok += got == f"call {i}".encode()
        timings = Timings(20, ok, tuple(seconds))
        print(f"\noutbound calls behind an inbound flood of 500 (max_connections 50): {timings.summary()}")
        assert timings.success_rate == 1.0, timings.summary()
        assert not web.count(lambda e: e.get("reason") == "connection_limit" and e.get("direction") == "outbound")
    finally:
        flooder.close()
        web.stop()
        upstream.stop()
        app.close()


def test_the_per_source_budget_evicts_that_sources_oldest_connection(pki, tmp_path):
    app = App()
    side = Sidecar(tmp_path, "budget", inbound_config(
        pki["ids"]["api"], f"127.0.0.1:{app.port}", [FRONTEND],
        extra=ADMIN + "limits: {handshakes: {per_source: 4}}\n",
    )).wait_ready()
    held: list[socket.socket] = []
    try:
        for _ in range(4):
            held.append(socket.create_connection(("127.0.0.1", side.ports["api"]), timeout=10))
        wait_until(lambda: metric(side, "sidecar_handshakes_pending", listener="api", stage="waiting") == 4,
                   20, "4 connections waiting")
        oldest_port = held[0].getsockname()[1]
        newcomer = socket.create_connection(("127.0.0.1", side.ports["api"]), timeout=10)
        held.append(newcomer)

        _, how = read_until_closed(held[0], 10)
        assert how in ("eof", "reset"), how
        event = side.wait_event(lambda e: e["event"] == "conn_denied" and e["peer_addr"] == f"127.0.0.1:{oldest_port}")
        assert event["reason"] == "connection_limit"
        assert "limits.handshakes.per_source" in event["detail"] and "oldest" in event["detail"], event
        assert metric(side, "sidecar_handshake_evictions_total", listener="api", budget="per_source") == 1
        assert metric(side, "sidecar_handshakes_pending", listener="api", stage="waiting") == 4
        # Another source is not touched by this one's budget, and a good client still gets through.
        with socket.socket() as raw:
            raw.settimeout(10)
            raw.bind(("127.0.0.2", 0))
            raw.connect(("127.0.0.1", side.ports["api"]))
            with client_context(pki["ids"]["frontend"]).wrap_socket(raw) as tls:
                tls.sendall(b"still served")
                assert tls.recv(100) == b"still served"
        for sock in held[1:]:
            sock.setblocking(False)
            with pytest.raises(BlockingIOError):
                sock.recv(1)  # still open: nothing to read, no EOF
    finally:
        for sock in held:
            sock.close()
        side.stop()
        app.close()
