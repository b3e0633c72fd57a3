"""The running sidecar: listeners, reload, revocation of open connections, idle reaper, drain.

Theory of operation
-------------------
Everything a new connection needs is one immutable ``Snapshot`` (proxy/snapshot.py). A reload
loads a complete new snapshot off to the side and, only if every part of it loads and validates,
replaces ``Sidecar.snapshot`` (and starts an empty outbound session cache) in one step; a failed
reload changes nothing. Each connection is served with the snapshot current when it was accepted
(proxy/connections.py), so open connections keep the TLS objects they started with. After a
successful reload every open connection is checked again against the new policy and CRL; those no
longer allowed are cancelled and logged ``policy_revoked``.

Reloads come from SIGHUP, from the file watcher (the config and identity files changed) and from
the renewer, which writes the new key and certificate through ``install_identity``. Those three
take ``files_lock``, so no reload ever reads a new key next to the old certificate.

Who closes what: the accept loop owns a socket until it hands it to the listener's
``on_connection`` (made by ``_accepted``), which closes it at once over the connection limit or
starts the handler that closes it. ``serve`` closes the listening sockets when it drains.
"""

from __future__ import annotations

import signal
import socket
from collections.abc import Callable
from functools import partial
from pathlib import Path

import trio

from mtls import reasons
from mtls.endpoints import format_address
from mtls.events import EventLog
from mtls.files import FileStamp
from mtls.sockets import accept_loop, bound_address, close_socket, listen_socket
from proxy.admin import serve_admin
from proxy.config import Config, IdentityConfig
from proxy.connections import Handlers, SessionCache, Tracked
from proxy.credentials import Credentials
from proxy.decisions import Conn, DecisionLog
from proxy.metrics import Metrics
from proxy.relay import Reactor, abort_socket
from proxy.snapshot import INBOUND, OUTBOUND, Snapshot, StartupError, load_snapshot

FILE_POLL_INTERVAL = 0.5
READY_MIN_REMAINING = 60.0  # seconds of certificate life (or a tenth of it) below which /readyz says not ready


def _listener_layout(config: Config) -> list[tuple[str, str, str]]:
    return sorted(
        [(INBOUND, lst.name, str(lst.listen)) for lst in config.inbound]
        + [(OUTBOUND, lst.name, str(lst.listen)) for lst in config.outbound]
    )


class Sidecar:
    """One sidecar process: its listeners, its open connections and the current snapshot."""

    def __init__(self, config_path: Path, snapshot: Snapshot, log: EventLog, metrics: Metrics):
        self.config_path = config_path
        self.snapshot = snapshot
        self.sessions = SessionCache(snapshot)  # replaced together with the snapshot
        self.log = log
        self.metrics = metrics
        self.decisions = DecisionLog(log, metrics)
        self.open: set[Tracked] = set()
        self.bound: dict[str, str] = {}  # listener name -> bound address
        self.listen_sockets: dict[str, socket.socket] = {}
        self.draining = False
        self.files_lock = trio.Lock()  # held while the identity files are rewritten, and by every reload from them
        self.renewer = None  # a proxy.renewer.Renewer while serve runs one
        self._idle = trio.Event()
        self._file_stamps = self._stamp_files(snapshot)
        self._update_identity_metrics()

    # --- start-up and shutdown ----------------------------------------------------------------

    def bind(self) -> None:
        """Bind every listener before serving any; raise StartupError naming each failure."""
        problems = []
        config = self.snapshot.config
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

    async def serve(
        self, admin_sock: socket.socket | None = None, renewer=None, *, task_status=trio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve until SIGTERM/SIGINT, then drain. SIGHUP and file changes reload.

        ``renewer`` (a proxy.renewer.Renewer, when ``identity.renew`` is set) runs alongside, and
        its state counts for readiness.
        """
        reactor = Reactor()  # the data phase of every relayed connection; closed when its task ends
        handlers = Handlers(self.decisions, self.metrics, reactor, lambda: self.draining)
        self.renewer = renewer
        async with trio.open_nursery() as root:
            async with trio.open_nursery() as conn_nursery:
                async with trio.open_nursery() as accept_nursery:
                    config = self.snapshot.config
                    for direction, listeners in ((INBOUND, config.inbound), (OUTBOUND, config.outbound)):
                        for lst in listeners:
                            on_connection = self._accepted(lst.name, direction, conn_nursery, handlers)
                            accept_nursery.start_soon(
                                partial(accept_loop, self.listen_sockets[lst.name], on_connection, self.log,
                                        listener=lst.name)
                            )
                    if admin_sock is not None:
                        root.start_soon(serve_admin, admin_sock, self)
                    root.start_soon(self._watch_files)
                    root.start_soon(self._reap_idle)
                    root.start_soon(reactor.run)
                    if renewer is not None:
                        root.start_soon(renewer.run)
                    stop = trio.Event()
                    root.start_soon(self._signals, stop)
                    for name, address in self.bound.items():
                        self.log.emit("info", "listening", listener=name, address=address)
                    if admin_sock is not None:
                        self.log.emit("info", "listening", listener="admin", address=bound_address(admin_sock))
                    creds = self.snapshot.creds
                    self.log.emit("info", "ready", spiffe_id=str(creds.spiffe_id), expires=creds.not_after.isoformat())
                    task_status.started(self)
                    await stop.wait()
                    self.draining = True
                    accept_nursery.cancel_scope.cancel()
                for sock in self.listen_sockets.values():
                    close_socket(sock)
                drain = self.snapshot.config.timeouts.drain
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
                    async with self.files_lock:
                        self.reload("SIGHUP")
                else:
                    self.log.emit("info", "shutdown", signal=signal.Signals(signum).name)
                    stop.set()

    # --- connections --------------------------------------------------------------------------

    def _accepted(self, name: str, direction: str, nursery: trio.Nursery, handlers: Handlers) -> Callable:
        """The accept loop's ``on_connection`` for one listener: refuse over the limit, else serve."""

        def on_connection(sock: socket.socket, addr) -> None:
            if direction == INBOUND:
                conn = Conn(name, direction, peer_addr=format_address(addr))
            else:
                conn = Conn(name, direction, peer_addr=None, app_addr=format_address(addr))
            limit = self.snapshot.config.limits.max_connections
            if len(self.open) >= limit:
                abort_socket(sock)
                sock.close()
                self.decisions.denied(
                    conn, reasons.CONNECTION_LIMIT,
                    f"{len(self.open)} connections open, limits.max_connections is {limit}",
                )
                return
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            tracked = Tracked(conn)
            self.open.add(tracked)
            self._idle = trio.Event() if self._idle.is_set() else self._idle
            self.metrics.active.labels(name, direction).inc()
            if direction == INBOUND:
                nursery.start_soon(self._guard, handlers.inbound, tracked, sock, addr, self.snapshot)
            else:
                nursery.start_soon(self._guard, handlers.outbound, tracked, sock, self.snapshot, self.sessions)

        return on_connection

    async def _guard(self, handler, tracked: Tracked, *args) -> None:
        """Run one connection's handler; a bug in it closes that connection, never the sidecar."""
        try:
            await handler(tracked, *args)
        except Exception as exc:  # fail closed for this connection, keep serving the others
            conn = tracked.conn
            app = {"app_addr": conn.app_addr} if conn.app_addr is not None else {}
            self.log.emit(
                "error", "internal_error", listener=conn.listener, direction=conn.direction,
                peer_addr=conn.peer_addr, **app, detail=f"{type(exc).__name__}: {exc}",
            )
        finally:
            self.open.discard(tracked)
            self.metrics.active.labels(tracked.conn.listener, tracked.conn.direction).dec()
            if not self.open:
                self._idle.set()

    # --- reload ---------------------------------------------------------------------------------

    def reload(self, trigger: str) -> bool:
        """Load everything anew; swap it in only if all of it is valid. Never raises.

        Callers that reload because of the identity files hold ``files_lock``.
        """
        try:
            new = load_snapshot(self.config_path)
            if _listener_layout(new.config) != _listener_layout(self.snapshot.config):
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
        self.snapshot = new
        self.sessions = SessionCache(new)
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

    def _revoke_disallowed(self, snapshot: Snapshot) -> None:
        """Cancel the open connections whose peer the new policy or CRL refuses."""
        for tracked in list(self.open):
            if tracked.peer_id is None:
                continue
            listener_policy = snapshot.policy(tracked.conn.direction, tracked.conn.listener)
            detail = listener_policy.refusal(tracked.peer_id, tracked.serial, tracked.path)
            if detail is not None:
                tracked.revoked_detail = detail
                tracked.scope.cancel()

    def current_identity(self) -> tuple[IdentityConfig, Credentials]:
        """The identity section and the credentials loaded from it, both from the current snapshot."""
        return self.snapshot.config.identity, self.snapshot.creds

    async def install_identity(self, write: Callable[[], None]) -> bool:
        """Run ``write`` (blocking: it replaces the identity files) in a thread, then reload once.

        ``files_lock`` is held throughout, so the file watcher never sees the files half-written,
        and the whole step is shielded from cancellation: the files are never left out of step.
        An OSError from ``write`` propagates (and nothing is reloaded); else the reload's result.
        """
        with trio.CancelScope(shield=True):
            async with self.files_lock:
                await trio.to_thread.run_sync(write)
                return self.reload("renewal")  # re-stamps the files: the watcher sees no change

    def _stamp_files(self, snapshot: Snapshot) -> dict[Path, FileStamp | None]:
        """The identity files as they were just before they were read, and the config file."""
        return {**snapshot.creds.files, self.config_path: FileStamp.now(self.config_path)}

    async def _watch_files(self) -> None:
        """Poll the files the config names; reload when any of them changes (symlink swaps included)."""
        while True:
            await trio.sleep(FILE_POLL_INTERVAL)
            async with self.files_lock:  # waits while the renewer swaps key and certificate
                changed = [str(p) for p, stamp in self._file_stamps.items() if FileStamp.now(p) != stamp]
                if changed and not self.reload("file change: " + ", ".join(changed)):
                    # Remember what we saw, so one bad write is reported once, not every poll.
                    self._file_stamps = {p: FileStamp.now(p) for p in self._file_stamps}

    async def _reap_idle(self) -> None:
        """Close relayed connections that moved no byte either way for ``timeouts.idle``.

        One task looks at every open connection now and then, instead of a timer per connection:
        timing each wait would cost the data path more than the work it guards.
        """
        while True:
            idle = self.snapshot.config.timeouts.idle
            await trio.sleep(max(0.05, min(1.0, idle / 10)))
            now = trio.current_time()
            for tracked in list(self.open):
                link = tracked.link
                if link is not None and now - link.last_activity >= idle and tracked.idle_detail is None:
                    tracked.idle_detail = f"no bytes either way for {idle:g}s"
                    tracked.scope.cancel()

    # --- health ---------------------------------------------------------------------------------

    def _update_identity_metrics(self) -> None:
        self.metrics.identity_expiry.set(self.snapshot.creds.not_after.timestamp())

    def readiness_problems(self, now_timestamp: float) -> list[str]:
        problems = []
        creds = self.snapshot.creds
        remaining = creds.not_after.timestamp() - now_timestamp
        if remaining <= 0:
            problems.append(f"identity {creds.spiffe_id} expired at {creds.not_after.isoformat()}")
        elif remaining < min(READY_MIN_REMAINING, (creds.not_after - creds.not_before).total_seconds() / 10):
            problems.append(f"identity {creds.spiffe_id} expires in {remaining:.0f}s")
        if creds.not_before.timestamp() > now_timestamp:
            problems.append(f"identity {creds.spiffe_id} is not valid before {creds.not_before.isoformat()}")
        config = self.snapshot.config
        for lst in (*config.inbound, *config.outbound):
            if lst.name not in self.bound:
                problems.append(f"listener {lst.name} is not bound")
        if self.draining:
            problems.append("draining: shutting down")
        if self.renewer is not None:
            problems.extend(self.renewer.readiness_problems(now_timestamp))
        return problems
