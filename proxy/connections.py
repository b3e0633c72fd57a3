"""Serving one accepted connection: handshake, decision, relay, closing line.

Theory of operation
-------------------
Inbound: TLS handshake under ``timeouts.handshake`` with the policy decided inside the handshake
(proxy/tls.py), then, and only then, connect to ``forward`` and relay. Outbound: connect to the
upstream, handshake and verify the server's SPIFFE ID before reading a single byte from the app,
then relay; the TLS session is kept for the next connections to resume as soon as the server's ticket
arrives (the relay thread reads it and hands the session to trio), while the first one is still open.

A handler works with the snapshot and session cache it was given when its connection was
accepted, so a reload never changes an open connection's TLS objects. The sidecar ends a
connection from outside by recording why on its ``Tracked`` and cancelling ``Tracked.scope``.

Who closes what: a handler owns its sockets from the call on and closes them in its ``finally``,
with RST when the relay ended in a reset, when it gives up after connecting, or when the
connection was revoked. After a record we refused (``protocol_error``) the TLS side closes with FIN
once our fatal alert had time to reach the peer; the app side is reset.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timezone

import trio
from cryptography import x509
from OpenSSL import SSL

from mtls import reasons
from mtls.endpoints import Endpoint, format_address, server_name_for
from mtls.sockets import close_socket, connect
from mtls.spiffe import SpiffeId
from mtls.trust import describe
from proxy.budgets import PER_SOURCE, WAITING, ConnectionSlots, PendingBudget
from proxy.config import HandshakeLimits, Limits
from proxy.decisions import RESET, Conn, DecisionLog
from proxy.handshake import HandshakeFailed, TlsSocket, await_first_record
from proxy.metrics import Metrics
from proxy.proxy_protocol import v2_header
from proxy.relay import (
    Link,
    ProtocolError,
    Reactor,
    Reset,
    abort_socket,
    relay,
    send_plain,
)
from proxy.snapshot import INBOUND, OUTBOUND, ListenerPolicy, Snapshot


class Tracked:
    """An open connection, as the sidecar's reload, idle reaper and drain see it."""

    __slots__ = ("conn", "peer_id", "serial", "path", "scope", "revoked_detail", "idle_detail", "evicted_detail",
                 "holds_slot", "link", "expires_at", "expiring", "checked_under")

    def __init__(self, conn: Conn):
        self.conn = conn  # replaced once an outbound connection knows its upstream's address
        # Set once the handshake authorized the peer, for reloads to check again: its ID, its leaf's
        # serial, and its verified chain (leaf first; None for a resumed session).
        self.peer_id: SpiffeId | None = None
        self.serial: int | None = None
        self.path: tuple[x509.Certificate, ...] | None = None
        self.scope = trio.CancelScope()
        self.revoked_detail: str | None = None  # set by a reload that no longer allows the peer
        self.idle_detail: str | None = None  # set by the idle reaper
        self.evicted_detail: str | None = None  # set when a newer unauthenticated connection took its place
        self.holds_slot = False  # counted in ConnectionSlots (outbound from accept, inbound once authorized)
        self.link: Link | None = None  # set while relaying
        # When the peer's chain expires (trio time; the scope's deadline), and which certificate of it
        # (its position on the path, and itself) expires first.
        self.expires_at: float | None = None
        self.expiring: tuple[int, x509.Certificate] | None = None
        # The snapshot whose rules last allowed the peer: the one it was accepted with, then that of
        # each reload that checked it again. A reload looks again only at what changed since.
        self.checked_under: Snapshot | None = None

    def peer_expired(self) -> bool:
        """The scope's deadline, the peer's certificate expiry, has come."""
        return self.expires_at is not None and trio.current_time() >= self.expires_at

    def ending(self, reason: str | None, detail: str | None) -> tuple[str | None, str | None]:
        """The reason and detail the close is logged with: a cut by a reload (policy_revoked), by the
        idle reaper, or at the peer's expiry wins over how the relay itself ended."""
        if self.revoked_detail is not None:
            return reasons.POLICY_REVOKED, self.revoked_detail
        if self.idle_detail is not None:
            return reasons.IDLE_TIMEOUT, self.idle_detail
        if self.peer_expired():
            return reasons.PEER_EXPIRED, self.expiry_detail()
        return reason, detail

    def expiry_detail(self) -> str:
        """The sentence of a close at the peer's expiry, made only then: naming the leaf parses its
        extensions, which an idle connection had better not keep (``PeerCheck`` keeps it without them)."""
        position, cert = self.expiring
        expiry = cert.not_valid_after_utc
        return f"peer {self.peer_id}: {describe(cert, position)} expired at {expiry:%Y-%m-%dT%H:%M:%SZ}"

    def cut_at_expiry(self, check) -> None:
        """Make the first expiry on the peer's verified chain (its leaf alone when the session was resumed)
        this connection's deadline: trio cancels it then, no per-byte or periodic check."""
        certs = check.path or (check.leaf,)
        self.expiring = min(enumerate(certs), key=lambda item: item[1].not_valid_after_utc)
        expiry = self.expiring[1].not_valid_after_utc
        self.expires_at = trio.current_time() + (expiry - datetime.now(timezone.utc)).total_seconds()
        self.scope.deadline = self.expires_at


class SessionCache:
    """Outbound TLS sessions to resume: per listener, the last good one, until it expires.

    One cache goes with one snapshot: the sidecar starts an empty one on every reload, so no
    session made under another identity, bundle, CRL or policy is ever resumed.
    """

    def __init__(self, snapshot: Snapshot):
        self._enabled = snapshot.config.tls.session_resumption
        self._max_lifetime = snapshot.config.tls.session_lifetime
        self._own_not_after = snapshot.creds.not_after
        self._sessions: dict[str, tuple[SSL.Session, float]] = {}  # listener -> (session, trio time it expires)

    def offer(self, listener: str, tls: TlsSocket) -> None:
        """Before the handshake: ask to resume the listener's session, if it has a fresh one."""
        cached = self._sessions.get(listener)
        if cached is not None and cached[1] > trio.current_time():
            tls.conn.set_session(cached[0])

    def forget(self, listener: str) -> None:
        self._sessions.pop(listener, None)

    def keeper(self, listener: str, tls: TlsSocket, tracked: Tracked) -> Callable[[SSL.Session], None] | None:
        """What the relay hands the connection's session to (in trio) once the server's ticket made it
        resumable; None when resumption is off (the relay then watches for nothing)."""
        server_not_after = tls.check.not_after  # of the server certificate the handshake checked
        if not self._enabled or server_not_after is None:
            return None

        def keep(session: SSL.Session) -> None:
            if tracked.revoked_detail is None:  # a reload may have cut it between the ticket and now
                self.remember(listener, session, server_not_after)

        return keep

    def remember(self, listener: str, session: SSL.Session, server_not_after: datetime) -> None:
        """Keep ``session`` for the next connections, never longer than ``tls.session_lifetime`` nor
        past either side's certificate."""
        now = datetime.now(timezone.utc)
        lifetime = min(
            self._max_lifetime,
            (server_not_after - now).total_seconds(),
            (self._own_not_after - now).total_seconds(),
        )
        if lifetime > 0:
            self._sessions[listener] = (session, trio.current_time() + lifetime)


def _peer_address(sock: socket.socket) -> str | None:
    try:
        return format_address(sock.getpeername())
    except OSError:  # already reset by the other end
        return None


def _source_of(peer_addr: str | None) -> str:
    """The source address of ``host:port`` (``[v6]:port``), the key of the per-source budget."""
    if peer_addr is None:
        return "?"
    return peer_addr.rsplit(":", 1)[0].strip("[]")


def _close(sock: socket.socket, abort: bool) -> None:
    if abort:
        abort_socket(sock)
    close_socket(sock)


@dataclass(frozen=True)
class Upstream:
    """Where an originated mTLS connection goes and whom it must find there. ``name`` keys the TLS
    session cache and names the upstream in messages (an outbound listener, or an egress rule)."""

    name: str
    connect: Endpoint
    server_name: str | None
    policy: ListenerPolicy


class Handlers:
    """The inbound and outbound handlers and what they share, admission included (proxy/budgets.py).

    ``draining()`` tells whether the sidecar is shutting down: a connection cancelled then was cut
    by the drain deadline. ``admit`` and ``release`` bracket every connection the sidecar accepts.
    """

    def __init__(self, decisions: DecisionLog, metrics: Metrics, reactor: Reactor, draining: Callable[[], bool]):
        self.decisions = decisions
        self.metrics = metrics
        self.reactor = reactor
        self.draining = draining
        self.slots = ConnectionSlots()
        self.pending: dict[str, PendingBudget] = {}  # inbound listener -> its unauthenticated connections

    # --- admission ------------------------------------------------------------------------------

    def admit(self, tracked: Tracked, source: str | None, limits: Limits) -> str | None:
        """At accept: why the connection is refused (it then takes nothing), or None once admitted.

        Outbound takes an established slot now. Inbound takes none until authorized (``_authorized``):
        it is refused only if its listener could not take it even then, else it joins the listener's
        pending budget, where older unauthenticated connections may have to yield to it.
        """
        conn = tracked.conn
        refusal = self.slots.refusal(conn.listener, limits.max_connections, limits.per_listener)
        if refusal is not None:
            return refusal
        if conn.direction != INBOUND:
            self.slots.take(conn.listener)
            tracked.holds_slot = True
            return None
        budget = self.pending.setdefault(conn.listener, PendingBudget())
        hs = limits.handshakes
        self._evict(budget.arrive(tracked, source or "?", per_source=hs.per_source, waiting=hs.waiting), hs)
        self._count_pending(conn.listener, budget)
        return None

    def release(self, tracked: Tracked) -> None:
        """The connection's handler ended: whatever it held is free again."""
        self._handshake_over(tracked)
        if tracked.holds_slot:
            self.slots.give_back(tracked.conn.listener)
            tracked.holds_slot = False

    def _handshake_over(self, tracked: Tracked) -> None:
        """An inbound connection no longer counts as pending (it may have already left)."""
        budget = self.pending.get(tracked.conn.listener)
        if budget is not None:
            budget.leave(tracked)
            self._count_pending(tracked.conn.listener, budget)

    def _evict(self, evicted: list, hs: HandshakeLimits) -> None:
        for victim, budget_name in evicted:
            conn = victim.conn
            bound = getattr(hs, budget_name)
            if budget_name == PER_SOURCE:
                why = f"{bound} unauthenticated connections from {_source_of(conn.peer_addr)} at once"
            elif budget_name == WAITING:
                why = f"{bound} connections on port {conn.listener} waiting for a ClientHello"
            else:
                why = f"{bound} handshakes in progress on port {conn.listener}"
            victim.evicted_detail = (f"{why} (limits.handshakes.{budget_name}): the oldest, this one, "
                                     "yielded to a newer connection")
            victim.scope.cancel()
            self.metrics.handshake_evictions.labels(conn.listener, budget_name).inc()

    def _count_pending(self, listener: str, budget: PendingBudget) -> None:
        self.metrics.handshakes_pending.labels(listener, WAITING).set(budget.waiting)
        self.metrics.handshakes_pending.labels(listener, "handshaking").set(budget.handshaking)

    async def inbound(self, tracked: Tracked, sock: socket.socket, addr, snapshot: Snapshot) -> None:
        lst = snapshot.inbound[tracked.conn.listener]
        started = trio.current_time()
        plain = None
        abort = False
        try:
            with tracked.scope:
                if not await self._first_record(tracked, sock, snapshot, started):
                    return
                budget = self.pending[lst.name]
                hs = snapshot.config.limits.handshakes
                self._evict(budget.start_handshake(tracked, per_listener=hs.per_listener), hs)
                check = snapshot.policy(INBOUND, lst.name).peer_check()
                tls = TlsSocket(snapshot.contexts.server, sock, check, server_side=True)
                authorized = await self._handshake(tracked, tls, snapshot, started)
                if not authorized or not self._authorized(tracked, snapshot, started):
                    abort = authorized  # refused after the handshake: reset, no close_notify
                    return
                try:
                    plain = await connect(lst.forward, snapshot.config.timeouts.connect)
                except OSError as exc:
                    self.decisions.denied(
                        tracked.conn, reasons.UPSTREAM_UNREACHABLE,
                        f"app at {lst.forward} for port {lst.name}: {exc.strerror or exc}",
                        peer_id=check.peer_id, duration=trio.current_time() - started,
                    )
                    abort = True
                    return
                self.decisions.allowed(tracked.conn, check.peer_id, check.decision, resumed=check.resumed)
                if lst.proxy_protocol:
                    header = v2_header(addr, sock.getsockname(), str(check.peer_id))
                    try:
                        await send_plain(plain, memoryview(header))
                    except Reset as exc:
                        self.decisions.closed(
                            tracked.conn, tracked.peer_id, Link(), trio.current_time() - started, RESET,
                            f"app side: {exc.detail}",
                        )
                        abort = True
                        return
                await self._relay(tracked, tls, plain, started, app=str(lst.forward))
                abort = tracked.revoked_detail is not None or tracked.peer_expired()
            if tracked.evicted_detail is not None:
                abort = True
                self.decisions.denied(tracked.conn, reasons.CONNECTION_LIMIT, tracked.evicted_detail,
                                      duration=trio.current_time() - started)
        finally:
            _close(sock, abort)
            if plain is not None:
                _close(plain, abort)

    async def outbound(self, tracked: Tracked, app: socket.socket, snapshot: Snapshot, sessions: SessionCache) -> None:
        lst = snapshot.outbound[tracked.conn.listener]
        upstream = Upstream(lst.name, lst.connect, lst.server_name or server_name_for(lst.connect.host),
                            snapshot.policy(OUTBOUND, lst.name))
        await self.originate(tracked, app, snapshot, sessions, upstream)

    async def originate(
        self, tracked: Tracked, app: socket.socket, snapshot: Snapshot, sessions: SessionCache, target: Upstream
    ) -> None:
        """Connect to ``target``, handshake and check its server's ID, then relay ``app`` to it.
        The outbound listeners' path, and the egress listener's for its ``expect`` rules."""
        started = trio.current_time()
        upstream = None
        abort = False
        try:
            with tracked.scope:
                try:
                    upstream = await connect(target.connect, snapshot.config.timeouts.connect)
                except OSError as exc:
                    self.decisions.denied(
                        tracked.conn, reasons.UPSTREAM_UNREACHABLE,
                        f"upstream {target.connect} for {target.name}: {exc.strerror or exc}",
                        duration=trio.current_time() - started,
                    )
                    abort = True
                    return
                tracked.conn = replace(tracked.conn, peer_addr=_peer_address(upstream))
                tls = TlsSocket(
                    snapshot.contexts.client, upstream, target.policy.peer_check(),
                    server_side=False, server_name=target.server_name,
                )
                sessions.offer(target.name, tls)
                if not await self._handshake(tracked, tls, snapshot, started):
                    sessions.forget(target.name)
                    abort = True
                    return
                check = tls.check
                self.decisions.allowed(tracked.conn, check.peer_id, check.decision, resumed=check.resumed)
                await self._relay(tracked, tls, app, started, on_session=sessions.keeper(target.name, tls, tracked))
                abort = tracked.revoked_detail is not None or tracked.peer_expired()
        finally:
            if tracked.revoked_detail is not None or tracked.peer_expired():
                sessions.forget(target.name)  # the server is no longer one to resume with
            _close(app, abort)
            if upstream is not None:
                _close(upstream, abort)

    def _authorized(self, tracked: Tracked, snapshot: Snapshot, started: float) -> bool:
        """An inbound peer passed the handshake: take its established slot, or refuse it (logged)."""
        limits = snapshot.config.limits
        listener = tracked.conn.listener
        refusal = self.slots.refusal(listener, limits.max_connections, limits.per_listener)
        if refusal is not None:
            self.decisions.denied(tracked.conn, reasons.CONNECTION_LIMIT, refusal, peer_id=tracked.peer_id,
                                  duration=trio.current_time() - started)
            return False
        self.slots.take(listener)
        tracked.holds_slot = True
        return True

    async def _first_record(self, tracked: Tracked, sock: socket.socket, snapshot: Snapshot, started: float) -> bool:
        """Wait, without a TLS object, for the client's first record; False (logged) if the deadline passes."""
        timeout = snapshot.config.timeouts.handshake
        with trio.move_on_at(started + timeout):
            await await_first_record(sock)
            return True
        self.decisions.denied(
            tracked.conn, reasons.HANDSHAKE_TIMEOUT,
            f"no complete TLS handshake within {timeout:g}s (not even a ClientHello)",
            duration=trio.current_time() - started,
        )
        return False

    async def _handshake(self, tracked: Tracked, tls: TlsSocket, snapshot: Snapshot, started: float) -> bool:
        """Handshake by the deadline that started at accept; log the refusal and return False if the peer
        is not authorized."""
        try:
            timeout = snapshot.config.timeouts.handshake
            await tls.handshake(timeout, started + timeout)
        except HandshakeFailed as exc:
            self._handshake_over(tracked)  # decided: from now on it can no longer be evicted
            self.decisions.denied(
                tracked.conn, exc.reason, exc.detail, peer_id=tls.check.peer_id, duration=trio.current_time() - started,
                leaf=tls.check.leaf,
            )
            if exc.reason != reasons.HANDSHAKE_TIMEOUT:
                await tls.linger_after_refusal()
            return False
        self._handshake_over(tracked)
        self.metrics.handshake_seconds.observe(trio.current_time() - started)
        if tls.check.stale_crl is not None:  # identity.crl_stale: warn let it through
            self.metrics.crl_stale_accepted.labels(tracked.conn.listener, tracked.conn.direction).inc()
        tracked.peer_id = tls.check.peer_id
        tracked.serial = tls.check.serial
        tracked.path = tls.check.path
        tracked.cut_at_expiry(tls.check)
        return True

    async def _relay(
        self, tracked: Tracked, tls: TlsSocket, plain: socket.socket, started: float, app: str | None = None,
        on_session: Callable[[SSL.Session], None] | None = None,
    ) -> None:
        """Relay and log the closing line. ``app`` (inbound only) is the app's address: an app that
        resets the connection before sending a single byte never served it (upstream_unreachable).
        ``on_session`` (outbound only): see ``relay``."""
        link = tracked.link = Link()
        reason = detail = None
        try:
            await relay(self.reactor, tls, plain, link, on_session)
        except ProtocolError as exc:
            reason, detail = reasons.PROTOCOL_ERROR, f"{exc.side} side: {exc.detail}"
            abort_socket(plain)
            await tls.linger_after_refusal()  # our fatal alert must reach the peer, not an RST
        except Reset as exc:
            reason, detail = RESET, f"{exc.side} side: {exc.detail}"
            if exc.side == "tls" and exc.alert and not link.bytes_in:
                reason, detail = reasons.HANDSHAKE_FAILED, f"remote refused us: alert {exc.alert}"
            elif exc.side == "plain" and app is not None and not link.bytes_out:
                reason = reasons.UPSTREAM_UNREACHABLE
                detail = (f"app at {app} for port {tracked.conn.listener} reset the connection "
                          f"before answering: {exc.detail}")
            abort_socket(tls.sock)
            abort_socket(plain)
        except trio.Cancelled:
            if self.draining():
                detail = "drain timeout reached"
            raise
        finally:
            reason, detail = tracked.ending(reason, detail)
            self.decisions.closed(tracked.conn, tracked.peer_id, link, trio.current_time() - started, reason, detail)
