"""The egress listener: the app's redirected connections, decided by ``egress.allow``.

Theory of operation
-------------------
``proxy redirect`` makes the kernel send every outbound TCP connection of the app to this
listener; the connection's original destination is read back with ``SO_ORIGINAL_DST`` (IPv4) or
``IP6T_SO_ORIGINAL_DST`` (IPv6). Then, before a single byte of the app is read or forwarded:

1. The destination is decided by the rules (proxy/egress_rules.py). When the rules that name the
   destination allow TLS to certain server names only, the app's ClientHello is *peeked at*
   (``MSG_PEEK``: the bytes stay in the socket) until it is complete or ``timeouts.handshake`` runs
   out, and the decision is taken again with its SNI.
2. Refused (``mode: enforce``): the app's connection is reset at once, logged ``conn_denied``
   (reason ``egress_denied``) and counted in ``sidecar_egress_denied_total``. In ``mode: audit``
   it goes through as plain TCP, logged ``would_deny`` with the rule it would need.
3. Allowed by an ``expect`` rule: the sidecar originates mTLS to the destination and checks the
   server's SPIFFE ID exactly as an ``outbound:`` listener does (``Handlers.originate``).
   Otherwise the bytes pass through unchanged, the peeked ClientHello first.

DNS names in rules are resolved by ``Resolver``: by DNS (dnspython, the nameservers of
/etc/resolv.conf) when possible, so that each name is asked again when its answer's TTL runs out
and an address keeps matching until its TTL (plus ``DNS_GRACE``) has passed since an answer last
named it. dnspython does not read /etc/hosts: a name listed there, or one no nameserver answers
for, is resolved by the system resolver, which tells no TTL; ``SYSTEM_REFRESH`` and
``SYSTEM_KEEP`` stand in for it there. An address kept past the answer that named it serves an app
that resolved the name a moment before us (round-robin DNS).

A reload swaps the rules; ``revoke_disallowed`` then closes the open connections whose
destination the new rules no longer admit (``policy_revoked``).

Who closes what: ``handle`` owns the app's socket from the call on and closes it (with RST when it
refuses or aborts); the socket to the destination is its own as well.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import trio

from mtls import reasons
from mtls.endpoints import Endpoint
from mtls.events import EventLog
from mtls.reasons import Decision
from mtls.sockets import close_socket, connect
from proxy.clienthello import MAX_HELLO, Hello, NotClientHello, parse_client_hello
from proxy.config import EgressConfig
from proxy.connections import Handlers, SessionCache, Tracked, Upstream
from proxy.decisions import RESET, Conn
from proxy.egress_rules import (
    MTLS,
    NO_RULE,
    Attempt,
    EgressRule,
    IPAddress,
    Verdict,
    decide,
    needed_rule,
)
from proxy.metrics import Metrics
from proxy.relay import Link, abort_socket
from proxy.snapshot import EGRESS, Snapshot

if TYPE_CHECKING:
    import dns.asyncresolver

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h, on SOL_IP
IP6T_SO_ORIGINAL_DST = 80  # linux/netfilter_ipv6/ip6_tables.h, on SOL_IPV6
HOSTS_FILE = "/etc/hosts"
DNS_TTL_FLOOR = 1.0  # a name is asked again no sooner than this after an answer (a TTL of 0 would spin)
DNS_TTL_CAP = 300.0  # ... and no later than this, however long its TTL
DNS_GRACE = 2.0  # an address matches this long past its TTL: the app looks the name up, then connects
DNS_LIFETIME = 5.0  # how long one DNS resolution may wait for the nameservers
DNS_RETRY = 5.0  # after a name got no address (DNS said none, or no resolver answered)
SYSTEM_REFRESH = 30.0  # a name the system resolver answers for (no TTL told) is asked again this often
SYSTEM_KEEP = 300.0  # ... and an address it gave is kept this long after it last named it
DNS_FIRST_WAIT = 5.0  # at start-up, how long the listener waits for the rules' names to resolve
AUDIT_HELLO_WAIT = 0.5  # audit mode looks this long for a ClientHello to name the SNI a rule would need
_CHUNK = 64 * 1024


def original_destination(sock: socket.socket) -> tuple[IPAddress, int]:
    """Where the app meant to connect before the redirect. OSError (ENOENT) if it was not redirected."""
    if sock.family == socket.AF_INET6:
        raw = sock.getsockopt(socket.SOL_IPV6, IP6T_SO_ORIGINAL_DST, 28)
        port = struct.unpack_from("!H", raw, 2)[0]
        ip = ipaddress.IPv6Address(raw[8:24])
        return (ip.ipv4_mapped or ip), port
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port = struct.unpack_from("!H", raw, 2)[0]
    return ipaddress.IPv4Address(raw[4:8]), port


@dataclass(eq=False)
class _Followed:
    """One DNS name of the rules as the resolver follows it."""

    until: dict[IPAddress, float] = field(default_factory=dict)  # address -> trio time it stops matching
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    tried: trio.Event = field(default_factory=trio.Event)  # set when the first resolution has ended
    problem: str | None = None  # the kind of the current failure, so that each kind is logged once


class Resolver:
    """The addresses of the DNS names in ``egress.allow``, each name re-resolved as its TTL runs out.

    ``nameservers``: (address, port) pairs to ask instead of those of /etc/resolv.conf; an empty
    list leaves every name to the system resolver."""

    def __init__(self, log: EventLog, nameservers: Sequence[tuple[str, int]] | None = None):
        self.log = log
        self.names: frozenset[str] = frozenset()
        self.addresses: dict[str, frozenset[IPAddress]] = {}  # replaced, never changed in place
        self._dns = _dns_resolver(nameservers)
        self._followed: dict[str, _Followed] = {}
        self._wakeup = trio.Event()

    def set_rules(self, rules: tuple[EgressRule, ...]) -> None:
        """Resolve these rules' names from now on (at once, if any is new)."""
        self.names = frozenset(rule.to.name for rule in rules if rule.to.name is not None)
        self.addresses = {name: ips for name, ips in self.addresses.items() if name in self.names}
        self._wakeup.set()

    def names_for(self, ip: IPAddress) -> tuple[str, ...]:
        return tuple(sorted(name for name, ips in self.addresses.items() if ip in ips))

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Follow every name; report started once each was resolved once (waiting DNS_FIRST_WAIT
        at most), then follow the names reloads add, and drop those they remove."""
        async with trio.open_nursery() as nursery:
            self._follow_names(nursery)
            with trio.move_on_after(DNS_FIRST_WAIT) as first:
                for followed in list(self._followed.values()):
                    await followed.tried.wait()
            if first.cancelled_caught:
                self.log.emit("warning", "dns_slow", detail=f"not every egress.allow name resolved within "
                              f"{DNS_FIRST_WAIT:g}s; rules naming them match once they do")
            task_status.started()
            while True:
                await self._wakeup.wait()
                self._wakeup = trio.Event()
                self._follow_names(nursery)

    def _follow_names(self, nursery: trio.Nursery) -> None:
        for name, followed in list(self._followed.items()):
            if name not in self.names:
                self._followed.pop(name).scope.cancel()
            else:
                self._publish(name, followed)  # back, if a reload removed it and the next added it again
        for name in self.names - self._followed.keys():
            followed = self._followed[name] = _Followed()
            nursery.start_soon(self._follow, name, followed)

    async def _follow(self, name: str, followed: _Followed) -> None:
        """Resolve ``name`` whenever its answer runs out; in between, drop each address as it expires."""
        with followed.scope:
            while True:
                ask_again = await self._resolve(name, followed)
                followed.tried.set()
                self._publish(name, followed)
                while trio.current_time() < ask_again:
                    await trio.sleep_until(min([ask_again, *followed.until.values()]))
                    self._publish(name, followed)

    def _publish(self, name: str, followed: _Followed) -> None:
        if self._followed.get(name) is not followed:
            return  # a reload removed the name meanwhile
        now = trio.current_time()
        followed.until = {ip: until for ip, until in followed.until.items() if until > now}
        self.addresses = {**self.addresses, name: frozenset(followed.until)}

    async def _resolve(self, name: str, followed: _Followed) -> float:
        """Ask for ``name``'s addresses and note until when each matches; returns when to ask again."""
        if self._dns is None or name in await _hosts_names():
            return await self._ask_system(name, followed, dns_problem=None)
        import dns.exception  # loaded by _dns_resolver already; see there why not at the top
        import dns.resolver

        try:
            answers = await self._dns.resolve_name(name, search=True, lifetime=DNS_LIFETIME)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer) as exc:
            self._failed(name, followed, "no_address", str(exc), action=(
                f"keeping each of its last addresses until its TTL runs out; asking again every {DNS_RETRY:g}s"))
            return trio.current_time() + DNS_RETRY
        except (dns.exception.DNSException, OSError) as exc:  # no nameserver answered, or none usefully
            return await self._ask_system(name, followed, dns_problem=str(exc))
        followed.problem = None
        now = trio.current_time()
        ttls = []
        for answer in answers.values():  # A and AAAA, those that have records
            ttl = answer.chaining_result.minimum_ttl  # the shortest TTL along the CNAME chain, if any
            ttls.append(ttl)
            for record in answer:
                followed.until[ipaddress.ip_address(record.address)] = now + max(ttl, DNS_TTL_FLOOR) + DNS_GRACE
        return now + min(max(min(ttls), DNS_TTL_FLOOR), DNS_TTL_CAP)

    async def _ask_system(self, name: str, followed: _Followed, dns_problem: str | None) -> float:
        """The stdlib resolver (/etc/hosts, then the nameservers, as the C library does). It tells
        no TTL: the name is asked again in SYSTEM_REFRESH, an address kept SYSTEM_KEEP."""
        try:
            infos = await trio.socket.getaddrinfo(name, None, type=socket.SOCK_STREAM)
        except OSError as exc:
            detail = str(exc) if dns_problem is None else f"{dns_problem}; then the system resolver: {exc}"
            self._failed(name, followed, "failed", detail, action=(
                f"keeping each of its last addresses until it expires; asking again every {DNS_RETRY:g}s"))
            return trio.current_time() + DNS_RETRY
        if dns_problem is None:
            followed.problem = None
        else:
            self._failed(name, followed, "fallback", dns_problem, action=(
                f"resolved it with the system resolver (no TTL: asking again every {SYSTEM_REFRESH:g}s, "
                f"keeping an address {SYSTEM_KEEP:g}s) until DNS answers again"))
        now = trio.current_time()
        for info in infos:
            followed.until[ipaddress.ip_address(info[4][0])] = now + SYSTEM_KEEP
        return now + SYSTEM_REFRESH

    def _failed(self, name: str, followed: _Followed, kind: str, detail: str, action: str) -> None:
        """Log ``dns_failed`` when a name starts failing this way; a failure repeating is not news."""
        if followed.problem != kind:
            self.log.emit("warning", "dns_failed", name=name, detail=detail, action=action)
        followed.problem = kind


def _dns_resolver(nameservers: Sequence[tuple[str, int]] | None) -> dns.asyncresolver.Resolver | None:
    """A DNS resolver asking ``nameservers``, or those of /etc/resolv.conf (with its search list);
    None when there are none: then the system resolver answers for every name."""
    # dnspython costs about 4 MiB of resident memory: imported here, it is loaded only by a sidecar
    # that has an egress section (the one place a Resolver is made), not by every `proxy run`.
    import dns.asyncresolver
    import dns.name
    import dns.nameserver
    import dns.resolver

    if nameservers is None:
        try:
            return dns.asyncresolver.Resolver()
        except (dns.resolver.NoResolverConfiguration, ValueError):  # no nameserver, or none readable
            return None
    if not nameservers:
        return None
    resolver = dns.asyncresolver.Resolver(configure=False)
    resolver.nameservers = [dns.nameserver.Do53Nameserver(host, port) for host, port in nameservers]
    resolver.domain = dns.name.root  # no search domain guessed from the host name
    return resolver


async def _hosts_names() -> frozenset[str]:
    """The names /etc/hosts gives addresses to, in lower case (re-read each time: it is small)."""
    try:
        text = await trio.Path(HOSTS_FILE).read_text(errors="replace")
    except OSError:
        return frozenset()
    return frozenset(name.lower().rstrip(".") for line in text.splitlines()
                     for name in line.split("#", 1)[0].split()[1:])


@dataclass
class _Open:
    """An open egress connection as reload sees it: what the app attempted and how it was admitted."""

    attempt: Attempt
    kind: str  # the admitting rule's kind (plain, sni, mtls), or "audit" when audit mode let it through


class Egress:
    """Serves the egress listener's connections; ``handlers`` originates mTLS for ``expect`` rules."""

    def __init__(self, handlers: Handlers, log: EventLog, metrics: Metrics, snapshot: Snapshot):
        self.handlers = handlers
        self.decisions = handlers.decisions
        self.metrics = metrics
        self.resolver = Resolver(log)
        self.open: dict[Tracked, _Open] = {}
        self.resolver.set_rules(_config(snapshot).allow)

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """The DNS refresh; started (first answers in) before the listener takes connections."""
        await self.resolver.run(task_status=task_status)

    async def handle(self, tracked: Tracked, app: socket.socket, snapshot: Snapshot, sessions: SessionCache) -> None:
        started = trio.current_time()
        try:
            await self._decide_and_serve(tracked, app, snapshot, sessions, started)
        except BaseException:
            close_socket(app)  # a no-op when a step below closed it already
            raise

    async def _decide_and_serve(self, tracked: Tracked, app: socket.socket, snapshot: Snapshot,
                                sessions: SessionCache, started: float) -> None:
        config = _config(snapshot)
        try:
            ip, port = original_destination(app)
            direct = (str(ip), port) == app.getsockname()[:2]
        except OSError as exc:
            ip, port, direct = None, None, f"no original destination: {exc.strerror or exc}"
        if direct:  # never relay such a connection: to ourselves it would loop
            why = direct if isinstance(direct, str) else "it was made to the egress listener itself"
            self._refuse(tracked, app, Verdict(None, f"connection not redirected by `proxy redirect`: {why}",
                                               cause=NO_RULE), started)
            return
        attempt = Attempt(ip, port, self.resolver.names_for(ip))
        tracked.conn = replace(tracked.conn, peer_addr=attempt.address)
        verdict = decide(config.allow, attempt, self.resolver.addresses)
        if verdict.needs_hello or (not verdict.allowed and config.mode == "audit"):
            wait = snapshot.config.timeouts.handshake if verdict.needs_hello else AUDIT_HELLO_WAIT
            attempt = await _peek_hello(app, attempt, wait)
            verdict = decide(config.allow, attempt, self.resolver.addresses)
        elif not verdict.allowed:
            attempt = _hello_already_sent(app, attempt)  # names the SNI in the log if it is there
        tracked.conn = _with_fields(tracked.conn, attempt, verdict.rule)
        if not verdict.allowed and config.mode == "enforce":
            self._refuse(tracked, app, verdict, started)
            return
        if not verdict.allowed:
            self.metrics.egress_denied.labels(verdict.cause, "audit").inc()
            self.decisions.would_deny(tracked.conn, None, Decision(
                False, reasons.EGRESS_DENIED, f"{verdict.detail}; it would need {needed_rule(attempt)}"))
        self.open[tracked] = _Open(attempt, verdict.rule.kind if verdict.allowed else "audit")
        try:
            if verdict.allowed and verdict.rule.kind == MTLS:
                await self.handlers.originate(tracked, app, snapshot, sessions, self._upstream(verdict.rule, attempt, snapshot))
            else:
                await self._pass_through(tracked, app, attempt, snapshot, started)
        finally:
            del self.open[tracked]

    def revoke_disallowed(self, snapshot: Snapshot) -> None:
        """After a reload: take the new rules, and close open connections they no longer admit."""
        config = _config(snapshot)
        self.resolver.set_rules(config.allow)
        for tracked, opened in list(self.open.items()):
            detail = self._refusal(tracked, opened, config, snapshot)
            if detail is not None:
                tracked.revoked_detail = detail
                tracked.scope.cancel()

    def _refusal(self, tracked: Tracked, opened: _Open, config: EgressConfig, snapshot: Snapshot) -> str | None:
        if config.mode == "audit":
            return None
        verdict = decide(config.allow, opened.attempt, self.resolver.addresses)
        if not verdict.allowed:
            return "egress rules changed: " + verdict.detail
        if verdict.rule.kind != opened.kind:
            return f"egress rules changed: {verdict.rule} now admits this destination as {verdict.rule.kind}"
        if verdict.rule.kind == MTLS and tracked.peer_id is not None:
            return snapshot.policy(EGRESS, verdict.rule.label).refusal(tracked.peer_id, tracked.serial, tracked.path)
        return None

    def _upstream(self, rule: EgressRule, attempt: Attempt, snapshot: Snapshot) -> Upstream:
        """mTLS to the original destination; SNI is the rule's DNS name (none for an IP or CIDR rule)."""
        return Upstream(
            name=f"{rule.label}@{attempt.address}", connect=Endpoint("tcp", host=str(attempt.ip), port=attempt.port),
            server_name=rule.to.name, policy=snapshot.policy(EGRESS, rule.label),
        )

    def _refuse(self, tracked: Tracked, app: socket.socket, verdict: Verdict, started: float) -> None:
        """Reset the app's connection at once (no byte read or sent), log and count it."""
        abort_socket(app)
        close_socket(app)
        self.metrics.egress_denied.labels(verdict.cause, "enforce").inc()
        self.decisions.denied(tracked.conn, reasons.EGRESS_DENIED, verdict.detail,
                              duration=trio.current_time() - started)

    async def _pass_through(self, tracked: Tracked, app: socket.socket, attempt: Attempt, snapshot: Snapshot,
                            started: float) -> None:
        """Connect to the original destination and copy bytes both ways until both sides are done."""
        upstream = None
        abort = False
        try:
            with tracked.scope:
                destination = Endpoint("tcp", host=str(attempt.ip), port=attempt.port)
                try:
                    upstream = await connect(destination, snapshot.config.timeouts.connect)
                except OSError as exc:
                    self.decisions.denied(tracked.conn, reasons.UPSTREAM_UNREACHABLE,
                                          f"egress to {attempt.describe()}: {exc.strerror or exc}",
                                          duration=trio.current_time() - started)
                    abort = True
                    return
                self.decisions.allowed(tracked.conn, None, None, resumed=False)
                await self._copy(tracked, app, upstream, started)
                abort = tracked.revoked_detail is not None
        finally:
            if abort:
                abort_socket(app)
            close_socket(app)
            if upstream is not None:
                if abort:
                    abort_socket(upstream)
                close_socket(upstream)

    async def _copy(self, tracked: Tracked, app: socket.socket, upstream: socket.socket, started: float) -> None:
        """Copy both ways until both directions end, or one side breaks (then both are reset).
        Cancellation (revoked, idle, drain) propagates; the closing line is logged either way."""
        link = tracked.link = Link()
        broken: list[str] = []
        reason = detail = None
        try:
            async with trio.open_nursery() as nursery:
                for source, sink, flow in ((app, upstream, "out"), (upstream, app, "in")):
                    nursery.start_soon(_pump, source, sink, link, flow, broken, nursery.cancel_scope)
            if broken:
                reason, detail = RESET, broken[0]
                abort_socket(app)
                abort_socket(upstream)
        except BaseException:  # cancelled, possibly inside an exception group from the nursery
            if self.handlers.draining():
                detail = "drain timeout reached"
            raise
        finally:
            reason, detail = tracked.ending(reason, detail)
            self.decisions.closed(tracked.conn, None, link, trio.current_time() - started, reason, detail)


def _config(snapshot: Snapshot) -> EgressConfig:
    config = snapshot.config.egress
    assert config is not None, "the egress listener runs only with an egress section"
    return config


def _with_fields(conn: Conn, attempt: Attempt, rule: EgressRule | None) -> Conn:
    """The connection's lines name the destination's DNS name, the SNI and the rule that admitted it."""
    return replace(conn, extra=(
        ("dst_name", ", ".join(attempt.names) or None), ("sni", attempt.sni),
        ("rule", rule.label if rule is not None else None),
    ))


async def _pump(source: socket.socket, sink: socket.socket, link: Link, flow: str, broken: list[str],
                scope: trio.CancelScope) -> None:
    """Copy ``source`` to ``sink`` until EOF, then half-close ``sink``. A failure on either socket is
    recorded in ``broken`` and cancels ``scope`` (the other direction) too."""
    names = ("app", "destination") if flow == "out" else ("destination", "app")
    while True:
        try:
            data = source.recv(_CHUNK)
        except BlockingIOError:
            await trio.lowlevel.wait_readable(source)
            continue
        except OSError as exc:
            broken.append(f"{names[0]} side: {exc.strerror or exc}")
            scope.cancel()
            return
        if not data:
            try:
                sink.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            return
        view = memoryview(data)
        while view:
            try:
                view = view[sink.send(view):]
            except BlockingIOError:
                await trio.lowlevel.wait_writable(sink)
            except OSError as exc:
                broken.append(f"{names[1]} side: {exc.strerror or exc}")
                scope.cancel()
                return
        if flow == "out":
            link.bytes_out += len(data)
        else:
            link.bytes_in += len(data)
        link.last_activity = time.monotonic()  # the clock of proxy.relay.Link


# --- peeking at the ClientHello ---------------------------------------------------------------


def _hello_already_sent(sock: socket.socket, attempt: Attempt) -> Attempt:
    """The attempt with the SNI of a ClientHello already waiting in the socket, without waiting for one."""
    try:
        data = sock.recv(MAX_HELLO, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        found = parse_client_hello(data)
    except (OSError, NotClientHello):
        return attempt
    return replace(attempt, sni=found.sni) if isinstance(found, Hello) else attempt


async def _peek_hello(sock: socket.socket, attempt: Attempt, timeout: float) -> Attempt:
    """Wait up to ``timeout`` for the app's complete ClientHello, leaving every byte in the socket.

    ``SO_RCVLOWAT`` makes the socket readable only once as many bytes as the parse needs have
    arrived, so the wait does not spin on the bytes already there. Cancellation propagates.
    """
    sni, problem, seen = None, None, -1
    try:
        with trio.move_on_after(timeout) as waited:
            need = 5
            while True:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, need)
                await trio.lowlevel.wait_readable(sock)
                try:
                    data = sock.recv(MAX_HELLO, socket.MSG_PEEK)
                except BlockingIOError:
                    continue
                if not data or len(data) == seen:
                    problem = "the app closed the connection before a complete ClientHello"
                    break
                seen = len(data)
                found = parse_client_hello(data)
                if isinstance(found, Hello):
                    sni = found.sni
                    problem = None if sni else "its ClientHello names no server (no SNI)"
                    break
                need = found.total
        if waited.cancelled_caught:
            problem = f"no complete TLS ClientHello within {timeout:g}s"
    except NotClientHello as exc:
        problem = str(exc)
    except OSError as exc:
        problem = f"the app's connection failed: {exc.strerror or exc}"
    finally:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
        except OSError as exc:
            if exc.errno != errno.EBADF:
                raise
    return replace(attempt, hello=True, sni=sni, hello_problem=problem)
