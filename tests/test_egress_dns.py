"""The resolver of egress.allow's DNS names: by DNS, a name is asked again when its TTL runs out and an address
DNS stops naming stops matching once its TTL has passed; names in /etc/hosts, and names no nameserver answers
for, go to the system resolver (no TTL: fixed refresh and keep times).

The DNS tests run a small authoritative server on loopback UDP (``Zone``) on the real clock, with TTLs of 1-2 s;
the system-resolver tests stand a fake in for the C library and run on trio's autojump clock."""

from __future__ import annotations

import io
import ipaddress
import socket

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest
import trio
import trio.testing
from support.polling import wait_until_async

from mtls.events import EventLog
from proxy.egress import DNS_GRACE, SYSTEM_KEEP, SYSTEM_REFRESH, Resolver
from proxy.egress_rules import Attempt, EgressRule, decide, parse_destination

# A DNS server on loopback and real TTLs of 1-2 s: seconds of wall clock, so not in the unit loop.
pytestmark = pytest.mark.e2e

NAME = "svc.dns.test"
OLD, NEW = ipaddress.ip_address("10.9.0.1"), ipaddress.ip_address("10.9.0.2")


class Zone:
    """An authoritative DNS server on loopback UDP. ``records``: name -> (TTL, IPv4 addresses), changed by the
    test at will; other names get NXDOMAIN, other record types an empty answer; ``rcode`` set answers every
    query with that error instead. ``answered``: (trio time, name, addresses) of each A query."""

    def __init__(self, sock: trio.socket.SocketType):
        self.sock = sock
        self.address = sock.getsockname()
        self.records: dict[str, tuple[int, list[str]]] = {}
        self.rcode: int | None = None
        self.answered: list[tuple[float, str, frozenset]] = []

    async def serve(self) -> None:
        with self.sock:
            while True:
                data, peer = await self.sock.recvfrom(4096)
                await self.sock.sendto(self._answer(dns.message.from_wire(data)).to_wire(), peer)

    def _answer(self, query: dns.message.Message) -> dns.message.Message:
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        question = query.question[0]
        name = question.name.to_text(omit_final_dot=True).lower()
        if self.rcode is not None:
            response.set_rcode(self.rcode)
        elif name not in self.records:
            response.set_rcode(dns.rcode.NXDOMAIN)
        elif question.rdtype == dns.rdatatype.A:
            ttl, ips = self.records[name]
            response.answer.append(dns.rrset.from_text_list(question.name, ttl, "IN", "A", ips))
            self.answered.append((trio.current_time(), name, frozenset(map(ipaddress.ip_address, ips))))
        return response

    def last_named(self, ip) -> float:
        return max(at for at, _, ips in self.answered if ip in ips)


@pytest.fixture
async def zone(nursery):
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    await sock.bind(("127.0.0.1", 0))
    zone = Zone(sock)
    nursery.start_soon(zone.serve)
    return zone


def rules(*names: str) -> tuple[EgressRule, ...]:
    return tuple(EgressRule(i, parse_destination(f"{name}:443")) for i, name in enumerate(names))


async def started(nursery, log: io.StringIO, nameservers, *names: str) -> Resolver:
    resolver = Resolver(EventLog(stream=log), nameservers=nameservers)
    resolver.set_rules(rules(*names))
    await nursery.start(resolver.run)
    return resolver


async def test_a_name_is_asked_again_when_its_ttl_runs_out(nursery, zone):
    zone.records[NAME] = (2, [str(OLD)])
    resolver = await started(nursery, io.StringIO(), [zone.address], NAME)
    assert resolver.addresses[NAME] == {OLD}
    zone.records[NAME] = (2, [str(OLD), str(NEW)])
    await wait_until_async(lambda: NEW in resolver.addresses[NAME], timeout=5, what="the new address to match")
    first, second = [at for at, name, _ in zone.answered if name == NAME][:2]
    assert 2.0 <= second - first < 3.0, "asked again once the 2 s TTL ran out, not before, not much later"
    assert resolver.names_for(NEW) == (NAME,)


async def test_an_address_dns_stops_naming_stops_matching_once_its_ttl_has_passed(nursery, zone):
    zone.records[NAME] = (1, [str(OLD), str(NEW)])
    resolver = await started(nursery, io.StringIO(), [zone.address], NAME)
    allows = lambda ip: decide(rules(NAME), Attempt(ip, 443), resolver.addresses).allowed  # noqa: E731
    assert allows(OLD) and allows(NEW)
    zone.records[NAME] = (1, [str(OLD)])

    def dropped() -> bool:
        assert allows(OLD), "the address DNS still names keeps matching throughout"
        return not allows(NEW)

    await wait_until_async(dropped, timeout=10, what="the dropped address to stop matching")
    gone = trio.current_time()
    kept = gone - zone.last_named(NEW)
    assert 1 + DNS_GRACE <= kept < 1 + DNS_GRACE + 1.0, f"kept {kept:.2f}s after DNS last named it"
    assert len([name for _, name, _ in zone.answered if name == NAME]) >= 3, "asked every second meanwhile"


async def test_names_in_etc_hosts_are_left_to_the_system_resolver(nursery, zone):
    resolver = await started(nursery, io.StringIO(), [zone.address], "localhost")
    assert ipaddress.ip_address("127.0.0.1") in resolver.addresses["localhost"]
    assert zone.answered == [], "DNS was not asked for a name /etc/hosts gives"


async def test_a_name_dns_does_not_know_has_no_address_and_is_logged_once(nursery, zone):
    log = io.StringIO()
    resolver = await started(nursery, log, [zone.address], "nowhere.dns.test")
    assert resolver.addresses["nowhere.dns.test"] == frozenset()
    assert log.getvalue().count('"event":"dns_failed","name":"nowhere.dns.test"') == 1
    assert "does not exist" in log.getvalue()


class FakeSystemResolver(trio.abc.HostnameResolver):
    """Stands in for the C library's getaddrinfo: answers from a dict the test changes; a name missing from it
    fails like NXDOMAIN."""

    def __init__(self, answers: dict[str, list[str]]):
        self.answers = answers

    async def getaddrinfo(self, host, port, family=0, type=0, proto=0, flags=0):
        host = host.decode() if isinstance(host, bytes) else host  # trio hands over the IDNA-encoded name
        if host not in self.answers:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, 0)) for ip in self.answers[host]]

    async def getnameinfo(self, sockaddr, flags):
        raise NotImplementedError


@pytest.fixture
async def system_resolver():  # async: the custom resolver is trio's, per run
    fake = FakeSystemResolver({})
    trio.socket.set_custom_hostname_resolver(fake)
    yield fake
    trio.socket.set_custom_hostname_resolver(None)


async def test_when_no_nameserver_answers_the_system_resolver_does(nursery, zone, system_resolver):
    zone.rcode = dns.rcode.SERVFAIL
    system_resolver.answers[NAME] = ["192.0.2.7"]
    log = io.StringIO()
    resolver = await started(nursery, log, [zone.address], NAME)
    assert resolver.addresses[NAME] == {ipaddress.ip_address("192.0.2.7")}
    assert '"event":"dns_failed","name":"svc.dns.test"' in log.getvalue()
    assert "resolved it with the system resolver" in log.getvalue()


async def test_system_resolver_keeps_an_address_for_a_while_after_it_stops_naming_it(
        autojump_clock, nursery, system_resolver):
    system_resolver.answers["api.example"] = ["192.0.2.1"]
    resolver = await started(nursery, io.StringIO(), [], "api.example")  # no nameservers: the system resolver
    assert resolver.names_for(ipaddress.ip_address("192.0.2.1")) == ("api.example",)
    system_resolver.answers["api.example"] = ["192.0.2.2"]  # round-robin: the app may still hold the old answer
    await trio.sleep(SYSTEM_REFRESH + 1)
    assert resolver.addresses["api.example"] == {ipaddress.ip_address(a) for a in ("192.0.2.1", "192.0.2.2")}
    await trio.sleep(SYSTEM_KEEP)
    assert resolver.addresses["api.example"] == {ipaddress.ip_address("192.0.2.2")}


async def test_names_a_reload_adds_are_resolved_at_once_and_failures_logged(autojump_clock, nursery, system_resolver):
    system_resolver.answers["new.example"] = ["192.0.2.9"]
    log = io.StringIO()
    resolver = await started(nursery, log, [], "gone.example")
    assert '"event":"dns_failed","name":"gone.example"' in log.getvalue()
    resolver.set_rules(rules("new.example"))
    await trio.testing.wait_all_tasks_blocked()
    assert resolver.names_for(ipaddress.ip_address("192.0.2.9")) == ("new.example",)
    assert "gone.example" not in resolver.addresses
