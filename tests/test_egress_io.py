"""The egress listener's I/O helpers: peeking at the app's ClientHello (the bytes stay in the socket, a slow
hello is awaited, a missing one times out) and the resolver of the rules' DNS names."""

from __future__ import annotations

import io
import ipaddress
import socket

import trio
import trio.testing
from support.network import client_hello

from mtls.events import EventLog
from proxy.egress import DNS_KEEP, DNS_REFRESH, Resolver, _peek_hello
from proxy.egress_rules import Attempt, parse_destination

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


class FakeDns(trio.abc.HostnameResolver):
    """Answers from a dict the test changes; a name missing from it fails like NXDOMAIN."""

    def __init__(self, answers: dict[str, list[str]]):
        self.answers = answers

    async def getaddrinfo(self, host, port, family=0, type=0, proto=0, flags=0):
        host = host.decode() if isinstance(host, bytes) else host  # trio hands over the IDNA-encoded name
        if host not in self.answers:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, 0)) for ip in self.answers[host]]

    async def getnameinfo(self, sockaddr, flags):
        raise NotImplementedError


def rules(*names: str):
    from proxy.egress_rules import EgressRule
    return tuple(EgressRule(i, parse_destination(f"{name}:443")) for i, name in enumerate(names))


async def test_resolver_keeps_an_address_for_a_while_after_dns_stops_naming_it(autojump_clock):
    dns = FakeDns({"api.example": ["192.0.2.1"]})
    trio.socket.set_custom_hostname_resolver(dns)
    try:
        resolver = Resolver(EventLog(stream=io.StringIO()))
        resolver.set_rules(rules("api.example"))
        async with trio.open_nursery() as nursery:
            await nursery.start(resolver.run)
            assert resolver.names_for(ipaddress.ip_address("192.0.2.1")) == ("api.example",)
            dns.answers["api.example"] = ["192.0.2.2"]  # round-robin: the app may still hold the old answer
            await trio.sleep(DNS_REFRESH + 1)
            assert resolver.addresses["api.example"] == {ipaddress.ip_address(a) for a in ("192.0.2.1", "192.0.2.2")}
            await trio.sleep(DNS_KEEP)
            assert resolver.addresses["api.example"] == {ipaddress.ip_address("192.0.2.2")}
            nursery.cancel_scope.cancel()
    finally:
        trio.socket.set_custom_hostname_resolver(None)


async def test_resolver_resolves_names_a_reload_adds_at_once_and_logs_failures(autojump_clock):
    trio.socket.set_custom_hostname_resolver(FakeDns({"new.example": ["192.0.2.9"]}))
    log = io.StringIO()
    try:
        resolver = Resolver(EventLog(stream=log))
        resolver.set_rules(rules("gone.example"))
        async with trio.open_nursery() as nursery:
            await nursery.start(resolver.run)
            assert '"event":"dns_failed","name":"gone.example"' in log.getvalue()
            resolver.set_rules(rules("new.example"))
            await trio.testing.wait_all_tasks_blocked()
            assert resolver.names_for(ipaddress.ip_address("192.0.2.9")) == ("new.example",)
            assert "gone.example" not in resolver.addresses
            nursery.cancel_scope.cancel()
    finally:
        trio.socket.set_custom_hostname_resolver(None)
