"""Egress decisions: may the app reach this destination, and how? Pure: no sockets, no clock, no DNS.

An ``egress.allow`` rule names a destination (``to``: a DNS name, an IP address or a CIDR, with a
port or a port range) and says what to do with a connection to it:

- ``expect``: the sidecar originates mTLS to it and checks the server's SPIFFE ID (like ``outbound:``);
- ``sni``: the app's own TLS passes through, but only if its ClientHello names one of these servers;
- neither: plain TCP passes through.

The first rule whose ``to`` matches decides; an ``sni`` rule whose names do not match the
ClientHello is skipped, so a later rule may still admit the connection. ``decide`` is called once
without a ClientHello; when the answer is ``NEEDS_HELLO`` the caller peeks at the app's ClientHello
and calls it again with what it found. DNS names match the addresses the caller resolved for them
(``addresses``: name -> set of IP addresses); resolving is the caller's business.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Mapping, Union

from mtls.endpoints import format_host_port, is_dns_name
from mtls.spiffe import PatternSet

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

PLAIN, SNI, MTLS = "plain", "sni", "mtls"  # what an allowed connection becomes
_PORTS = re.compile(r"([0-9]{1,5})(?:-([0-9]{1,5}))?")

# Why a connection was refused: the values of sidecar_egress_denied_total's ``cause`` label (bounded).
NO_RULE = "no_rule"  # no rule names this address and port
SNI_NOT_ALLOWED = "sni_not_allowed"  # rules name it, but only for other TLS server names
NO_CLIENT_HELLO = "no_client_hello"  # rules name it for TLS only, and the app sent no usable ClientHello
CAUSES = (NO_RULE, SNI_NOT_ALLOWED, NO_CLIENT_HELLO)


@dataclass(frozen=True)
class Destination:
    """Where a rule allows connections to: exactly one of ``name`` and ``network``, and a port range."""

    name: str | None  # a DNS name, lower case
    network: IPNetwork | None
    first_port: int
    last_port: int

    def __str__(self) -> str:
        host = self.name or (str(self.network.network_address) if self.network.num_addresses == 1 else str(self.network))
        ports = str(self.first_port) if self.first_port == self.last_port else f"{self.first_port}-{self.last_port}"
        return f"[{host}]:{ports}" if ":" in host else f"{host}:{ports}"

    def matches(self, ip: IPAddress, port: int, addresses: Mapping[str, frozenset[IPAddress]]) -> bool:
        if not self.first_port <= port <= self.last_port:
            return False
        if self.network is not None:
            return ip in self.network
        return ip in addresses.get(self.name, frozenset())


def parse_destination(text: str) -> Destination:
    """``host:port`` or ``host:first-last``; host a DNS name, an IP, a CIDR, or either of the last two
    in brackets for IPv6 (``[2001:db8::/32]:443``). ValueError says what is wrong."""
    if text.startswith("["):
        host, close, ports = text[1:].partition("]:")
        if not close:
            raise ValueError(f"{text!r} is not [IPv6-address-or-CIDR]:port")
    else:
        host, colon, ports = text.rpartition(":")
        if not colon or not host:
            raise ValueError(f"{text!r} is not host:port (a port or a range such as 8000-8099 is required)")
        if ":" in host:
            raise ValueError(f"{text!r}: write an IPv6 address or CIDR in brackets, e.g. [2001:db8::/32]:443")
    first, last = _parse_ports(text, ports)
    if "/" in host or _is_ip(host):
        try:
            network = ipaddress.ip_network(host, strict=True)
        except ValueError as exc:
            raise ValueError(f"{text!r}: {host!r} is not an IP address or CIDR ({exc})") from None
        if text.startswith("[") and network.version != 6:
            raise ValueError(f"{text!r}: brackets are for IPv6 only")
        return Destination(None, network, first, last)
    name = host.lower().removesuffix(".")
    if text.startswith("[") or not is_dns_name(name):
        raise ValueError(f"{text!r}: {host!r} is neither an IP address, a CIDR, nor a DNS name")
    return Destination(name, None, first, last)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def _parse_ports(text: str, ports: str) -> tuple[int, int]:
    match = _PORTS.fullmatch(ports)
    if match is None:
        raise ValueError(f"{text!r}: {ports!r} is not a port (1-65535) or a range such as 8000-8099")
    first = int(match.group(1))
    last = int(match.group(2)) if match.group(2) else first
    if not 1 <= first <= last <= 65535:
        raise ValueError(f"{text!r}: ports must be 1 to 65535, the first of a range not above the last")
    return first, last


def parse_server_name(text: str) -> str:
    """An ``sni`` entry: a DNS name, or ``*.`` and a DNS name (one label, not the bare domain)."""
    name = text.lower().removesuffix(".")
    bare = name[2:] if name.startswith("*.") else name
    if not is_dns_name(bare) or "*" in bare:
        raise ValueError(f"{text!r} is not a DNS name or *.domain (SNI never carries an IP address)")
    return name


def sni_matches(allowed: str, sni: str) -> bool:
    sni = sni.lower().removesuffix(".")
    if allowed.startswith("*."):
        head, dot, rest = sni.partition(".")
        return bool(head) and bool(dot) and rest == allowed[2:]
    return sni == allowed


@dataclass(frozen=True)
class EgressRule:
    """One ``egress.allow`` entry. ``index`` is its position, for messages: ``egress.allow[2]``."""

    index: int
    to: Destination
    expect: PatternSet | None = None
    sni: tuple[str, ...] = ()

    @property
    def kind(self) -> str:
        return MTLS if self.expect else SNI if self.sni else PLAIN

    @property
    def label(self) -> str:
        return f"egress.allow[{self.index}]"

    def __str__(self) -> str:
        text = f"{self.label} (to {self.to}"
        if self.expect:
            text += ", expect " + ", ".join(str(p) for p in self.expect)
        if self.sni:
            text += ", sni " + ", ".join(self.sni)
        return text + ")"


@dataclass(frozen=True)
class Attempt:
    """One connection the app tried: the original destination, what we know of it, what it sent.

    ``names``: our rules' DNS names that resolved to ``ip``. ``hello``: whether the caller has
    looked for a ClientHello yet; ``sni`` the server name it carried (None: none found, or no SNI).
    ``hello_problem`` says why there is no SNI when the caller looked (timeout, not TLS...).
    """

    ip: IPAddress
    port: int
    names: tuple[str, ...] = ()
    hello: bool = False
    sni: str | None = None
    hello_problem: str | None = None

    @property
    def address(self) -> str:
        return format_host_port(str(self.ip), self.port)

    def describe(self) -> str:
        """``203.0.113.7:3333`` plus what else is known: ``(orders.prod.svc) SNI api.example``."""
        text = self.address
        if self.names:
            text += f" ({', '.join(self.names)})"
        if self.sni:
            text += f" SNI {self.sni}"
        return text


@dataclass(frozen=True)
class Verdict:
    """``rule`` is the admitting rule (None: refused, or ``needs_hello``). ``cause`` is one of CAUSES."""

    rule: EgressRule | None
    detail: str
    needs_hello: bool = False
    cause: str | None = None

    @property
    def allowed(self) -> bool:
        return self.rule is not None


NEEDS_HELLO = Verdict(None, "the decision needs the app's TLS ClientHello", needs_hello=True)


def decide(rules: tuple[EgressRule, ...], attempt: Attempt, addresses: Mapping[str, frozenset[IPAddress]]) -> Verdict:
    """Which rule admits ``attempt``, or why none does. See the module docstring for the order."""
    skipped: list[EgressRule] = []
    for rule in rules:
        if not rule.to.matches(attempt.ip, attempt.port, addresses):
            continue
        if not rule.sni:
            return Verdict(rule, f"egress to {attempt.describe()} allowed by {rule}")
        if not attempt.hello:
            return NEEDS_HELLO
        if attempt.sni is not None and any(sni_matches(name, attempt.sni) for name in rule.sni):
            return Verdict(rule, f"egress to {attempt.describe()} allowed by {rule}")
        skipped.append(rule)
    if not skipped:
        return Verdict(None, f"egress to {attempt.describe()}: no egress.allow rule names this destination",
                       cause=NO_RULE)
    names = sorted({name for rule in skipped for name in rule.sni})
    rules_text = ", ".join(rule.label for rule in skipped) + (" allows" if len(skipped) == 1 else " allow")
    if attempt.sni is None:
        return Verdict(None, f"egress to {attempt.describe()}: {rules_text} TLS to {', '.join(names)} only, "
                             f"and the app sent no server name ({attempt.hello_problem or 'no SNI in its ClientHello'})",
                       cause=NO_CLIENT_HELLO)
    return Verdict(None, f"egress to {attempt.describe()}: {rules_text} TLS to {', '.join(names)} only",
                   cause=SNI_NOT_ALLOWED)


def needed_rule(attempt: Attempt) -> str:
    """The ``egress.allow`` entry that would admit ``attempt``, as one line of YAML flow style."""
    host = attempt.names[0] if attempt.names else str(attempt.ip)
    text = f"to: {format_host_port(host, attempt.port)}"
    if attempt.sni:
        text += f", sni: [{attempt.sni}]"
    return "{" + text + "}"
