"""The running sidecar: listeners, one handler per connection, reload, drain.

Theory of operation
-------------------
Everything a new connection needs (config, credentials, TLS contexts) is one immutable
``Generation``. A reload builds a complete new generation off to the side and, only if every part
of it loads and validates, replaces ``Sidecar.generation`` in one assignment; a failed reload
changes nothing. Each handler reads the generation once, when its connection is accepted, so open
connections keep the TLS objects they started with. After a successful reload every open
connection is re-authorized against the new policy and CRL; those no longer allowed are cancelled
and logged ``policy_revoked``.

Inbound: accept, TLS handshake under ``timeouts.handshake`` with the policy decided inside the
handshake (proxy/tls.py), then, and only then, connect to ``forward`` and relay. Outbound: accept
the app's plaintext connection, connect to the upstream, handshake and verify the server's
SPIFFE ID before reading a single byte from the app, then relay.

Who closes what: the accept loop owns a socket until it starts a handler; from then on the
handler closes it in its ``finally``, with RST when the relay ended in a reset.
"""

from __future__ import annotations

import errno
import signal
import socket
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

import trio
from OpenSSL import SSL

from mtls import reasons
from mtls.endpoints import format_address, server_name_for
from mtls.events import EventLog
from mtls.files import FileStamp
from mtls.sockets import bound_address, close_socket, connect, listen_socket
from mtls.spiffe import CLIENT, SERVER, SpiffeId
from proxy import policy
from proxy.config import Config, ConfigError, InboundConfig, OutboundConfig, load_config
from proxy.credentials import CredentialError, Credentials, load_credentials
from proxy.handshake import HandshakeFailed, TlsSocket
from proxy.metrics import Metrics
from proxy.proxy_protocol import v2_header
from proxy.relay import Link, Reactor, Reset, abort_socket, relay, send_plain
from proxy.tls import PeerCheck, TlsContexts, build_contexts, session_lifetime

INBOUND = "inbound"
OUTBOUND = "outbound"
FILE_POLL_INTERVAL = 0.5
ACCEPT_BACKOFF = 0.05
READY_MIN_REMAINING = 60.0  # seconds of certificate life (or a tenth of it) below which /readyz says not ready

# Results for sidecar_connections_total: refusals by identity or policy are "denied", the rest "error".
_ERROR_REASONS = {reasons.HANDSHAKE_TIMEOUT, reasons.HANDSHAKE_FAILED, reasons.UPSTREAM_UNREACHABLE}


class StartupError(Exception):
    """The sidecar cannot start; ``problems`` lists every reason."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class Generation:
    config: Config
    creds: Credentials
    contexts: TlsContexts
    inbound: dict[str, InboundConfig]
    outbound: dict[str, OutboundConfig]
    # Outbound listener name -> (TLS session to resume, trio time it expires). It belongs to the
    # generation, so a reload (new identity, bundle, CRL or policy) starts with no session at all.
    sessions: dict[str, tuple[SSL.Session, float]] = field(default_factory=dict)


def load_generation(config_path: Path) -> Generation:
    """Load config, credentials and TLS contexts; raise StartupError listing every problem."""
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        problems = list(exc.problems)
        if exc.identity is not None:  # that section is valid: list its files' problems too, as `proxy check` does
            try:
                load_credentials(exc.identity)
            except CredentialError as cred_exc:
                problems.extend(cred_exc.problems)
        raise StartupError(problems) from None
    try:
        creds = load_credentials(config.identity)
    except CredentialError as exc:
        raise StartupError(list(exc.problems)) from None
    lifetime = 0
    if config.tls.session_resumption:
        lifetime = session_lifetime(creds, config.tls.session_lifetime, datetime.now(timezone.utc))
    try:
        contexts = build_contexts(creds, lifetime)
    except Exception as exc:  # OpenSSL refusing a key or certificate we already validated
        raise StartupError([f"{config.identity.cert}: TLS setup failed: {exc}"]) from None
    return Generation(
        config=config,
        creds=creds,
        contexts=contexts,
        inbound={lst.name: lst for lst in config.inbound},
        outbound={lst.name: lst for lst in config.outbound},
    )


def _listener_layout(config: Config) -> list[tuple[str, str, str]]:
    return sorted(
        [(INBOUND, lst.name, str(lst.listen)) for lst in config.inbound]
        + [(OUTBOUND, lst.name, str(lst.listen)) for lst in config.outbound]
    )


class Tracked:
    """An open connection, as reload and drain see it."""

    __slots__ = ("listener", "direction", "peer_id", "serial", "scope", "revoked_detail", "idle_detail", "link")

    def __init__(self, listener: str, direction: str):
        self.listener = listener
        self.direction = direction
        self.peer_id: SpiffeId | None = None
        self.serial: int | None = None
        self.scope = trio.CancelScope()
        self.revoked_detail: str | None = None
        self.idle_detail: str | None = None
        self.link: Link | None = None  # set while relaying


class Sidecar:
    def __init__(self, config_path: Path, generation: Generation, log: EventLog, metrics: Metrics):
        self.config_path = config_path
        self.generation = generation
        self.log = log
        self.metrics = metrics
        self.open: set[Tracked] = set()
        self.bound: dict[str, str] = {}  # listener name -> bound address
        self.listen_sockets: dict[str, socket.socket] = {}
        self.draining = False
        self.reactor: Reactor | None = None  # the data phase of every relayed connection, while serving
        self._idle = trio.Event()
        self.renewer = None  # a proxy.renewer.Renewer while identity.renew is set (started by serve)
        self._file_stamps = self._stamp_files(generation)
        self._update_identity_metrics()

    # --- start-up ---------------------------------------------------------------------------

    def bind(self) -> None:
        """Bind every listener before serving any; raise StartupError naming each failure."""
        problems = []
        config = self.generation.config
        for direction, listeners in ((INBOUND, config.inbound), (OUTBOUND, config.outbound)):
            for index, lst in enumerate(listeners):
                try:
                    sock = listen_socket(lst.listen)
                except OSError as exc:
                    problems.append(
                        f"{direction}[{index}] {lst.name}: cannot listen on {lst.listen}: {exc.strerror or exc}"
                    )
                    continue
                self.listen_sockets[lst.name] = sock
                self.bound[lst.name] = bound_address(sock)
        if problems:
            for sock in self.listen_sockets.values():
                sock.close()
            raise StartupError(problems)

    async def serve(self, admin_sock: socket.socket | None = None, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Serve until SIGTERM/SIGINT, then drain. SIGHUP and file changes reload."""
        self.reactor = Reactor()
        async with trio.open_nursery() as root:
            connections = trio.open_nursery()
            async with connections as conn_nursery:
                async with trio.open_nursery() as accept_nursery:
                    gen = self.generation
                    for lst in gen.config.inbound:
                        accept_nursery.start_soon(self._accept_loop, lst.name, INBOUND, conn_nursery)
                    for lst in gen.config.outbound:
                        accept_nursery.start_soon(self._accept_loop, lst.name, OUTBOUND, conn_nursery)
                    if admin_sock is not None:
                        from proxy.admin import serve_admin

                        root.start_soon(serve_admin, admin_sock, self)
                    root.start_soon(self._watch_files)
                    root.start_soon(self._reap_idle)
                    root.start_soon(self.reactor.run)
                    if gen.config.identity.renew is not None:
                        from proxy.renewer import Renewer

                        self.renewer = Renewer(self)
                        root.start_soon(self.renewer.run)
                    stop = trio.Event()
                    root.start_soon(self._signals, stop)
                    for name, address in self.bound.items():
                        self.log.emit("info", "listening", listener=name, address=address)
                    if admin_sock is not None:
                        self.log.emit("info", "listening", listener="admin", address=bound_address(admin_sock))
                    self.log.emit(
                        "info", "ready", spiffe_id=str(gen.creds.spiffe_id),
                        expires=gen.creds.not_after.isoformat(),
                    )
                    task_status.started(self)
                    await stop.wait()
                    self.draining = True
                    accept_nursery.cancel_scope.cancel()
                for sock in self.listen_sockets.values():
                    close_socket(sock)
                drain = self.generation.config.timeouts.drain
                self.log.emit("info", "draining", open_connections=len(self.open), drain_s=drain)
                with trio.move_on_after(drain):
                    if self.open:
                        await self._idle.wait()
                conn_nursery.cancel_scope.cancel()
            self.log.emit("info", "stopped")
            root.cancel_scope.cancel()

    async def _signals(self, stop: trio.Event) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                if signum == signal.SIGHUP:
                    self.reload("SIGHUP")
                else:
                    self.log.emit("info", "shutdown", signal=signal.Signals(signum).name)
                    stop.set()

    # --- accepting --------------------------------------------------------------------------

    async def _accept_loop(self, name: str, direction: str, nursery: trio.Nursery) -> None:
        lsock = self.listen_sockets[name]
        handler = self._handle_inbound if direction == INBOUND else self._handle_outbound
        out_of_fds_logged = False
        while True:
            try:
                sock, addr = lsock.accept()
            except BlockingIOError:
                await trio.lowlevel.wait_readable(lsock)
                continue
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    if not out_of_fds_logged:
                        self.log.emit(
                            "error", "accept_failed", listener=name,
                            detail=f"{exc.strerror}; new connections wait until descriptors free up",
                        )
                        out_of_fds_logged = True
                    await trio.sleep(ACCEPT_BACKOFF)
                    continue
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue
                raise
            out_of_fds_logged = False
            sock.setblocking(False)
            peer_addr = format_address(addr)
            if len(self.open) >= self.generation.config.limits.max_connections:
                abort_socket(sock)
                sock.close()
                self._refuse(
                    name, direction, peer_addr, None, reasons.CONNECTION_LIMIT,
                    f"{len(self.open)} connections open, limits.max_connections is "
                    f"{self.generation.config.limits.max_connections}",
                )
                continue
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            tracked = Tracked(name, direction)
            self.open.add(tracked)
            self._idle = trio.Event() if self._idle.is_set() else self._idle
            self.metrics.active.labels(name, direction).inc()
            nursery.start_soon(self._guard, handler, tracked, sock, addr, peer_addr)

    async def _guard(self, handler, tracked: Tracked, sock: socket.socket, addr, peer_addr: str) -> None:
        """Run one connection's handler; a bug in it closes that connection, never the sidecar."""
        try:
            await handler(tracked, sock, addr, peer_addr)
        except Exception as exc:  # fail closed for this connection, keep serving the others
            self.log.emit(
                "error", "internal_error", listener=tracked.listener, direction=tracked.direction,
                peer_addr=peer_addr, detail=f"{type(exc).__name__}: {exc}",
            )

    def _finish(self, tracked: Tracked) -> None:
        self.open.discard(tracked)
        self.metrics.active.labels(tracked.listener, tracked.direction).dec()
        if not self.open:
            self._idle.set()

    # --- decisions --------------------------------------------------------------------------

    def _refuse(self, listener, direction, peer_addr, peer_id, reason, detail, duration=None) -> None:
        result = "error" if reason in _ERROR_REASONS else "denied"
        self.metrics.connections.labels(listener, direction, result).inc()
        self.metrics.denials.labels(listener, direction, reason).inc()
        self.log.emit(
            "warning", "conn_denied", listener=listener, direction=direction,
            peer_id=str(peer_id) if peer_id else None, peer_addr=peer_addr, reason=reason, detail=detail,
            bytes_in=0, bytes_out=0, duration_s=None if duration is None else round(duration, 6),
        )

    def _allowed(self, tracked: Tracked, peer_addr: str, check: PeerCheck) -> None:
        decision = check.decision
        self.metrics.connections.labels(tracked.listener, tracked.direction, "allowed").inc()
        if decision is not None and not decision.allowed:
            self.metrics.would_deny.labels(tracked.listener, tracked.direction, decision.reason).inc()
            self.log.emit(
                "warning", "would_deny", listener=tracked.listener, direction=tracked.direction,
                peer_id=str(check.peer_id), peer_addr=peer_addr, reason=decision.reason,
                detail=f"audit mode lets this through: {decision.detail}",
            )
        if self.log.enabled("info"):
            self.log.emit(
                "info", "conn_allowed", listener=tracked.listener, direction=tracked.direction,
                peer_id=str(check.peer_id), peer_addr=peer_addr, reason=None,
                detail=(decision.detail if decision is not None else "")
                + (" (resumed TLS session)" if check.resumed else ""),
            )

    def _closed(self, tracked: Tracked, peer_addr: str, link: Link, started: float, reason, detail) -> None:
        m = self.metrics
        m.bytes.labels(tracked.listener, tracked.direction, "in").inc(link.bytes_in)
        m.bytes.labels(tracked.listener, tracked.direction, "out").inc(link.bytes_out)
        if reason is not None and reason != "reset":
            m.denials.labels(tracked.listener, tracked.direction, reason).inc()
        level = "info" if reason in (None, "reset") else "warning"
        self.log.emit(
            level, "conn_closed", listener=tracked.listener, direction=tracked.direction,
            peer_id=str(tracked.peer_id) if tracked.peer_id else None, peer_addr=peer_addr,
            reason=reason if reason != "reset" else None, detail=detail,
            bytes_in=link.bytes_in, bytes_out=link.bytes_out,
            duration_s=round(trio.current_time() - started, 6),
        )

    # --- handlers ---------------------------------------------------------------------------

    async def _handshake(self, tracked, tls: TlsSocket, gen: Generation, peer_addr: str, started: float) -> bool:
        try:
            await tls.handshake(gen.config.timeouts.handshake)
        except HandshakeFailed as exc:
            self._refuse(
                tracked.listener, tracked.direction, peer_addr, tls.check.peer_id, exc.reason, exc.detail,
                trio.current_time() - started,
            )
            if exc.reason != reasons.HANDSHAKE_TIMEOUT:
                await tls.linger_after_refusal()
            return False
        self.metrics.handshake_seconds.observe(trio.current_time() - started)
        tracked.peer_id = tls.check.peer_id
        tracked.serial = tls.check.serial
        return True

    async def _handle_inbound(self, tracked: Tracked, sock: socket.socket, addr, peer_addr: str) -> None:
        gen = self.generation
        lst = gen.inbound[tracked.listener]
        started = trio.current_time()
        plain = None
        abort = False
        try:
            with tracked.scope:
                check = PeerCheck(
                    CLIENT, partial(policy.authorize_client, lst.name, lst.allow),
                    gen.creds.revoked_serials, audit=lst.mode == "audit",
                )
                tls = TlsSocket(gen.contexts.server, sock, check, server_side=True)
                if not await self._handshake(tracked, tls, gen, peer_addr, started):
                    return
                try:
                    plain = await connect(lst.forward, gen.config.timeouts.connect)
                except OSError as exc:
                    self._refuse(
                        lst.name, INBOUND, peer_addr, check.peer_id, reasons.UPSTREAM_UNREACHABLE,
                        f"app at {lst.forward} for port {lst.name}: {exc.strerror or exc}",
                        trio.current_time() - started,
                    )
                    abort = True
                    return
                self._allowed(tracked, peer_addr, check)
                if lst.proxy_protocol:
                    header = v2_header(addr, sock.getsockname(), str(check.peer_id))
                    try:
                        await send_plain(plain, memoryview(header))
                    except Reset as exc:
                        self._closed(tracked, peer_addr, Link(), started, "reset", f"app side: {exc.detail}")
                        abort = True
                        return
                await self._relay(tracked, tls, plain, peer_addr, started, gen, app=lst.forward)
                abort = tracked.revoked_detail is not None
        finally:
            self._close(sock, abort)
            if plain is not None:
                self._close(plain, abort)
            self._finish(tracked)

    async def _handle_outbound(self, tracked: Tracked, app: socket.socket, addr, peer_addr: str) -> None:
        gen = self.generation
        lst = gen.outbound[tracked.listener]
        started = trio.current_time()
        upstream = None
        abort = False
        try:
            with tracked.scope:
                try:
                    upstream = await connect(lst.connect, gen.config.timeouts.connect)
                except OSError as exc:
                    self._refuse(
                        lst.name, OUTBOUND, peer_addr, None, reasons.UPSTREAM_UNREACHABLE,
                        f"upstream {lst.connect} for {lst.name}: {exc.strerror or exc}",
                        trio.current_time() - started,
                    )
                    abort = True
                    return
                check = PeerCheck(
                    SERVER, partial(policy.authorize_server, lst.name, lst.expect), gen.creds.revoked_serials,
                )
                tls = TlsSocket(
                    gen.contexts.client, upstream, check, server_side=False,
                    server_name=lst.server_name or server_name_for(lst.connect.host),
                )
                cached = gen.sessions.get(lst.name)
                if cached is not None and cached[1] > trio.current_time():
                    tls.conn.set_session(cached[0])
                if not await self._handshake(tracked, tls, gen, peer_addr, started):
                    gen.sessions.pop(lst.name, None)
                    abort = True
                    return
                self._allowed(tracked, peer_addr, check)
                await self._relay(tracked, tls, app, peer_addr, started, gen)
                abort = tracked.revoked_detail is not None
                if gen.config.tls.session_resumption and not abort:
                    self._remember_session(gen, lst.name, tls)
        finally:
            self._close(app, abort)
            if upstream is not None:
                self._close(upstream, abort)
            self._finish(tracked)

    async def _relay(self, tracked, tls, plain, peer_addr, started, gen, app=None) -> None:
        """Relay and log the closing line. ``app`` (inbound only) is the app's address: an app that
        resets the connection before sending a single byte never served it (upstream_unreachable)."""
        link = tracked.link = Link()
        reason = detail = None
        try:
            await relay(self.reactor, tls, plain, link)
        except Reset as exc:
            reason, detail = "reset", f"{exc.side} side: {exc.detail}"
            if exc.side == "tls" and exc.detail.startswith("remote sent alert") and not link.bytes_in:
                reason, detail = reasons.HANDSHAKE_FAILED, "remote refused us: " + exc.detail.split("sent ", 1)[1]
            elif exc.side == "plain" and app is not None and not link.bytes_out:
                reason = reasons.UPSTREAM_UNREACHABLE
                detail = (f"app at {app} for port {tracked.listener} reset the connection "
                          f"before answering: {exc.detail}")
            abort_socket(tls.sock)
            abort_socket(plain)
        finally:
            if tracked.revoked_detail is not None:
                reason, detail = reasons.POLICY_REVOKED, tracked.revoked_detail
            elif tracked.idle_detail is not None:
                reason, detail = reasons.IDLE_TIMEOUT, tracked.idle_detail
            elif tracked.scope.cancel_called and reason is None and self.draining:
                detail = "drain timeout reached"
            self._closed(tracked, peer_addr, link, started, reason, detail)

    def _remember_session(self, gen: Generation, listener: str, tls: TlsSocket) -> None:
        """Keep the connection's session (its tickets arrived while relaying) for the next connection."""
        session = tls.conn.get_session()
        if session is None or tls.check.not_after is None:
            return
        now = datetime.now(timezone.utc)
        lifetime = min(
            gen.config.tls.session_lifetime,
            (tls.check.not_after - now).total_seconds(),
            (gen.creds.not_after - now).total_seconds(),
        )
        if lifetime > 0:
            gen.sessions[listener] = (session, trio.current_time() + lifetime)

    def _close(self, sock: socket.socket, abort: bool) -> None:
        if abort:
            abort_socket(sock)
        close_socket(sock)

    # --- reload -----------------------------------------------------------------------------

    def reload(self, trigger: str) -> bool:
        """Load everything anew; swap it in only if all of it is valid. Never raises."""
        try:
            new = load_generation(self.config_path)
            if _listener_layout(new.config) != _listener_layout(self.generation.config):
                raise StartupError(
                    ["listeners were added, removed or moved; restart the sidecar to change listen addresses"]
                )
        except StartupError as exc:
            self.metrics.reloads.labels("failed").inc()
            self.log.emit(
                "error", "reload_failed", trigger=trigger, detail="; ".join(exc.problems),
                action="still serving with the last good configuration and identity",
            )
            return False
        self.generation = new
        self.log.configure(new.config.log.level, new.config.log.format)
        self._file_stamps = self._stamp_files(new)
        self._update_identity_metrics()
        self.metrics.reloads.labels("ok").inc()
        self.log.emit(
            "info", "reloaded", trigger=trigger, spiffe_id=str(new.creds.spiffe_id),
            expires=new.creds.not_after.isoformat(),
        )
        self._revoke_disallowed(new)
        return True

    def _revoke_disallowed(self, gen: Generation) -> None:
        for tracked in list(self.open):
            if tracked.peer_id is None:
                continue
            detail = None
            if tracked.serial is not None and tracked.serial in gen.creds.revoked_serials:
                detail = f"peer {tracked.peer_id} certificate serial {tracked.serial:x} is now on the CRL"
            elif tracked.direction == INBOUND:
                lst = gen.inbound[tracked.listener]
                decision = policy.authorize_client(lst.name, lst.allow, tracked.peer_id)
                if not decision.allowed and lst.mode == "enforce":
                    detail = "policy changed: " + decision.detail
            else:
                lst = gen.outbound[tracked.listener]
                decision = policy.authorize_server(lst.name, lst.expect, tracked.peer_id)
                if not decision.allowed:
                    detail = "policy changed: " + decision.detail
            if detail is not None:
                tracked.revoked_detail = detail
                tracked.scope.cancel()

    async def _reap_idle(self) -> None:
        """Close relayed connections that moved no byte either way for ``timeouts.idle``.

        One task looks at every open connection now and then, instead of a timer per connection:
        timing each wait would cost the data path more than the work it guards.
        """
        while True:
            idle = self.generation.config.timeouts.idle
            await trio.sleep(max(0.05, min(1.0, idle / 10)))
            now = trio.current_time()
            for tracked in list(self.open):
                link = tracked.link
                if link is not None and now - link.last_activity >= idle and tracked.idle_detail is None:
                    tracked.idle_detail = f"no bytes either way for {idle:g}s"
                    tracked.scope.cancel()

    def _stamp_files(self, gen: Generation) -> dict[Path, FileStamp | None]:
        """The identity files as they were just before they were read, and the config file."""
        return {**gen.creds.files, self.config_path: FileStamp.now(self.config_path)}

    async def _watch_files(self) -> None:
        """Poll the files the config names; reload when any of them changes (symlink swaps included)."""
        while True:
            await trio.sleep(FILE_POLL_INTERVAL)
            if self.renewer is not None and self.renewer.writing:
                continue  # key and cert are being swapped; the renewer reloads once both are in place
            changed = [str(p) for p, stamp in self._file_stamps.items() if FileStamp.now(p) != stamp]
            if changed:
                if not self.reload("file change: " + ", ".join(changed)):
                    # Remember what we saw, so one bad write is reported once, not every poll.
                    self._file_stamps = {p: FileStamp.now(p) for p in self._file_stamps}

    # --- health -----------------------------------------------------------------------------

    def _update_identity_metrics(self) -> None:
        self.metrics.identity_expiry.set(self.generation.creds.not_after.timestamp())

    def readiness_problems(self, now_timestamp: float) -> list[str]:
        problems = []
        creds = self.generation.creds
        remaining = creds.not_after.timestamp() - now_timestamp
        if remaining <= 0:
            problems.append(f"identity {creds.spiffe_id} expired at {creds.not_after.isoformat()}")
        elif remaining < min(READY_MIN_REMAINING, (creds.not_after - creds.not_before).total_seconds() / 10):
            problems.append(f"identity {creds.spiffe_id} expires in {remaining:.0f}s")
        if creds.not_before.timestamp() > now_timestamp:
            problems.append(f"identity {creds.spiffe_id} is not valid before {creds.not_before.isoformat()}")
        config = self.generation.config
        for lst in (*config.inbound, *config.outbound):
            if lst.name not in self.bound:
                problems.append(f"listener {lst.name} is not bound")
        if self.draining:
            problems.append("draining: shutting down")
        if self.renewer is not None:
            problems.extend(self.renewer.readiness_problems(now_timestamp))
        return problems
