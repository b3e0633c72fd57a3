"""The egress listener's I/O helpers: peeking at the app's ClientHello (the bytes stay in the socket, a slow
hello is awaited, a missing one times out). The resolver of the rules' DNS names: tests/test_egress_dns.py."""

from __future__ import annotations

import ipaddress
import socket

import trio
import trio.testing
from support.network import client_hello

from proxy.egress import _peek_hello
from proxy.egress_rules import Attempt

ATTEMPT = Attempt(ipaddress.ip_address("203.0.113.10"), 443)


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """(app side, sidecar side) of a loopback TCP connection; the sidecar side non-blocking, as accepted."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        app = socket.create_connection(listener.getsockname())
        sidecar, _ = listener.accept()
    sidecar.setblocking(False)
    return app, sidecar


async def test_hello_arriving_in_pieces_gives_its_sni_and_leaves_every_byte_in_the_socket():
    hello = client_hello("api.payments.example")
    app, sidecar = tcp_pair()
    with app, sidecar:
        async def trickle():
            for start in range(0, len(hello), 100):
                await trio.testing.wait_all_tasks_blocked()  # the peek waits for more before each piece
                app.sendall(hello[start:start + 100])

        async with trio.open_nursery() as nursery:
            nursery.start_soon(trickle)
            found = await _peek_hello(sidecar, ATTEMPT, timeout=5)
        assert found.hello and found.sni == "api.payments.example" and found.hello_problem is None
        assert sidecar.recv(65536) == hello, "nothing was consumed: the destination gets the same bytes"


async def test_plain_text_is_not_a_client_hello():
    app, sidecar = tcp_pair()
    with app, sidecar:
        app.sendall(b"login worker1 x\n")
        found = await _peek_hello(sidecar, ATTEMPT, timeout=5)
        assert found.sni is None and "not TLS" in found.hello_problem


async def test_app_that_stays_silent_times_out():
    app, sidecar = tcp_pair()
    with app, sidecar:
        found = await _peek_hello(sidecar, ATTEMPT, timeout=0.2)
        assert found.sni is None and "within 0.2s" in found.hello_problem


async def test_app_that_closes_mid_hello_is_reported_without_waiting_out_the_timeout():
    hello = client_hello("x.example")
    app, sidecar = tcp_pair()
    with sidecar:
        app.sendall(hello[:50])
        app.close()
        with trio.fail_after(2):
            found = await _peek_hello(sidecar, ATTEMPT, timeout=30)
        assert "closed the connection" in found.hello_problem
