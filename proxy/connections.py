"""Serving one accepted connection: handshake, decision, relay, closing line.

Theory of operation
-------------------
Inbound: TLS handshake under ``timeouts.handshake`` with the policy decided inside the handshake
(proxy/tls.py), then, and only then, connect to ``forward`` and relay. Outbound: connect to the
upstream, handshake and verify the server's SPIFFE ID before reading a single byte from the app,
then relay; the TLS session of a connection that ended well is kept for the next one to resume.

A handler works with the snapshot and session cache it was given when its connection was
accepted, so a reload never changes an open connection's TLS objects. The sidecar ends a
connection from outside by recording why on its ``Tracked`` and cancelling ``Tracked.scope``.

Who closes what: a handler owns its sockets from the call on and closes them in its ``finally``,
with RST when the relay ended in a reset, when it gives up after connecting, or when the
connection was revoked.
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
from proxy.decisions import RESET, Conn, DecisionLog
from proxy.handshake import HandshakeFailed, TlsSocket
from proxy.metrics import Metrics
from proxy.proxy_protocol import v2_header
from proxy.relay import Link, Reactor, Reset, abort_socket, relay, send_plain
from proxy.snapshot import INBOUND, OUTBOUND, ListenerPolicy, Snapshot


class Tracked:
    """An open connection, as the sidecar's reload, idle reaper and drain see it."""

    __slots__ = ("conn", "peer_id", "serial", "path", "scope", "revoked_detail", "idle_detail", "link")

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
        self.link: Link | None = None  # set while relaying


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

    def remember(self, listener: str, tls: TlsSocket) -> None:
        """Keep the connection's session (its tickets arrived while relaying) for the next connection,
        never longer than ``tls.session_lifetime`` nor past either side's certificate."""
        if not self._enabled:
            return
        session = tls.conn.get_session()
        server_cert = tls.conn.get_peer_certificate(as_cryptography=True)
        if session is None or server_cert is None:
            return
        now = datetime.now(timezone.utc)
        lifetime = min(
            self._max_lifetime,
            (server_cert.not_valid_after_utc - now).total_seconds(),
            (self._own_not_after - now).total_seconds(),
        )
        if lifetime > 0:
            self._sessions[listener] = (session, trio.current_time() + lifetime)


def _peer_address(sock: socket.socket) -> str | None:
    try:
        return format_address(sock.getpeername())
    except OSError:  # already reset by the other end
        return None


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
    """The inbound and outbound handlers and what they share.

    ``draining()`` tells whether the sidecar is shutting down: a connection cancelled then was cut
    by the drain deadline.
    """

    def __init__(self, decisions: DecisionLog, metrics: Metrics, reactor: Reactor, draining: Callable[[], bool]):
        self.decisions = decisions
        self.metrics = metrics
        self.reactor = reactor
        self.draining = draining

    async def inbound(self, tracked: Tracked, sock: socket.socket, addr, snapshot: Snapshot) -> None:
        lst = snapshot.inbound[tracked.conn.listener]
        started = trio.current_time()
        plain = None
        abort = False
        try:
            with tracked.scope:
                check = snapshot.policy(INBOUND, lst.name).peer_check()
                tls = TlsSocket(snapshot.contexts.server, sock, check, server_side=True)
                if not await self._handshake(tracked, tls, snapshot, started):
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
                abort = tracked.revoked_detail is not None
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
                await self._relay(tracked, tls, app, started)
                abort = tracked.revoked_detail is not None
                if not abort:
                    sessions.remember(target.name, tls)
        finally:
            _close(app, abort)
            if upstream is not None:
                _close(upstream, abort)

    async def _handshake(self, tracked: Tracked, tls: TlsSocket, snapshot: Snapshot, started: float) -> bool:
        """Handshake under the deadline; log the refusal and return False if the peer is not authorized."""
        try:
            await tls.handshake(snapshot.config.timeouts.handshake)
        except HandshakeFailed as exc:
            self.decisions.denied(
                tracked.conn, exc.reason, exc.detail, peer_id=tls.check.peer_id, duration=trio.current_time() - started
            )
            if exc.reason != reasons.HANDSHAKE_TIMEOUT:
                await tls.linger_after_refusal()
            return False
        self.metrics.handshake_seconds.observe(trio.current_time() - started)
        tracked.peer_id = tls.check.peer_id
        tracked.serial = tls.check.serial
        tracked.path = tls.check.path
        return True

    async def _relay(
        self, tracked: Tracked, tls: TlsSocket, plain: socket.socket, started: float, app: str | None = None
    ) -> None:
        """Relay and log the closing line. ``app`` (inbound only) is the app's address: an app that
        resets the connection before sending a single byte never served it (upstream_unreachable)."""
        link = tracked.link = Link()
        reason = detail = None
        try:
            await relay(self.reactor, tls, plain, link)
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
            if tracked.revoked_detail is not None:
                reason, detail = reasons.POLICY_REVOKED, tracked.revoked_detail
            elif tracked.idle_detail is not None:
                reason, detail = reasons.IDLE_TIMEOUT, tracked.idle_detail
            self.decisions.closed(tracked.conn, tracked.peer_id, link, trio.current_time() - started, reason, detail)
