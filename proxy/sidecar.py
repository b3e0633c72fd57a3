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

A reload never holds up the event loop for long: the new snapshot is read and built in a worker
thread (``load_snapshot`` is file reads and pure work; ``mtls.workers.run_in_worker`` keeps the
loop's waits for the GIL short meanwhile), swapped in with one assignment,
and the open connections are checked again in slices of ``RECHECK_SLICE`` with a checkpoint between them. A
connection's check looks only at what changed since the rules that last allowed it
(``ListenerPolicy.changed_since``), and asks the policy once per peer ID and listener. Reloads run
one at a time; the requests that arrive while one runs are answered together by the next.

Reloads come from SIGHUP, from the file watcher (the config and identity files changed) and from
the renewer, which writes the new key and certificate through ``install_identity``. A reload reads
the files under ``files_lock``, which the renewer holds while it writes, so no reload ever reads a
new key next to the old certificate.

Who closes what: the accept loop owns a socket until it hands it to the listener's
``on_connection`` (made by ``_accepted``), which closes it at once when admission refuses it
(``Handlers.admit``, proxy/budgets.py) or starts the handler that closes it. ``serve`` closes the listening sockets when it drains.
"""

from __future__ import annotations

import signal
import socket
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from functools import cache, partial
from pathlib import Path

import trio

from mtls import reasons
from mtls.durations import format_duration, roughly
from mtls.endpoints import format_address
from mtls.events import EventLog
from mtls.files import FileStamp
from mtls.sockets import accept_loop, bound_address, close_socket, listen_socket
from mtls.workers import run_in_worker
from proxy.admin import serve_admin
from proxy.config import Config, IdentityConfig
from proxy.connections import Handlers, SessionCache, Tracked
from proxy.credentials import Credentials
from proxy.decisions import Conn, DecisionLog
from proxy.egress import Egress
from proxy.metrics import Metrics
from proxy.relay import Reactor, abort_socket
from proxy.snapshot import (
    EGRESS,
    INBOUND,
    OUTBOUND,
    Changed,
    Snapshot,
    StartupError,
    load_snapshot,
)
from proxy.sync import Syncer

FILE_POLL_INTERVAL = 0.5
CRL_CHECK_INTERVAL = 1.0  # how often the CRLs' next updates are compared with the clock, for the log line
RECHECK_SLICE = 200  # open connections checked again between two checkpoints of a reload
READY_MIN_REMAINING = 60.0  # seconds of certificate life (or a tenth of it) below which /readyz says not ready


def _listeners(config: Config) -> tuple[tuple[str, tuple], ...]:
    """(direction, listeners) for every kind of listener: inbound, outbound and the egress listener."""
    return (INBOUND, config.inbound), (OUTBOUND, config.outbound), (EGRESS, (config.egress,) if config.egress else ())


def _listener_layout(config: Config) -> list[tuple[str, str, str]]:
    return sorted((direction, lst.name, str(lst.listen)) for direction, listeners in _listeners(config) for lst in listeners)


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
        self.files_lock = trio.Lock()  # held while the identity files are rewritten, and while a reload reads them
        self._reload_lock = trio.Lock()  # one reload at a time (``reload``)
        self._reload_triggers: list[str] = []  # of the requests the next reload answers
        self._reloads_requested = 0  # requests so far
        self._reloads_begun = 0  # requests that a reload which has begun answers
        self._reloads_done = 0  # requests that a finished reload answered
        self._reload_ok = True  # how the last reload ended
        self.renewer = None  # a proxy.renewer.Renewer while serve runs one
        self.egress: Egress | None = None  # while serve runs, with an egress section
        self._idle = trio.Event()
        self._file_stamps = self._stamp_files(snapshot, FileStamp.now(config_path))
        self.failed_bundles: list[str] = []  # why the last reload could not load a trust bundle (for /readyz)
        self._crl_state: tuple[tuple[str, str], ...] = ()  # (issuer, effect) of the last crl_stale line
        self._update_identity_metrics()

    # --- start-up and shutdown ----------------------------------------------------------------

    def bind(self) -> None:
        """Bind every listener before serving any; raise StartupError naming each failure."""
        problems = []
        config = self.snapshot.config
        for direction, listeners in _listeners(config):
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
                    if config.egress is not None:
                        self.egress = Egress(handlers, self.log, self.metrics, self.snapshot)
                        await root.start(self.egress.run)  # the rules' DNS names resolved before serving
                    for direction, listeners in _listeners(config):
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
                    syncer = Syncer(lambda: (self.snapshot.config, self.snapshot.creds), self.install_identity,
                                    self.log, self.metrics)
                    root.start_soon(syncer.run)
                    root.start_soon(self._watch_crl_freshness)
                    root.start_soon(reactor.run)
                    if renewer is not None:
                        root.start_soon(renewer.run)
                    stop = trio.Event()
                    await root.start(self._signals, stop, root)  # signals handled before we say ready
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

    async def _signals(self, stop: trio.Event, nursery: trio.Nursery, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """SIGHUP reloads in a task of its own, so that SIGTERM is heard while a reload runs. Started
        (``task_status``) once the handlers are installed: a SIGHUP after ``ready`` never kills us."""
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            task_status.started()
            async for signum in signals:
                if signum == signal.SIGHUP:
                    nursery.start_soon(self.reload, "SIGHUP")
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
            tracked = Tracked(conn)
            tracked.checked_under = self.snapshot  # the handler below authorizes the peer under its rules
            refusal = handlers.admit(tracked, addr[0] if isinstance(addr, tuple) else None, self.snapshot.config.limits)
            if refusal is not None:
                abort_socket(sock)
                sock.close()
                self.decisions.denied(conn, reasons.CONNECTION_LIMIT, refusal)
                return
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.open.add(tracked)
            self._idle = trio.Event() if self._idle.is_set() else self._idle
            self.metrics.active.labels(name, direction).inc()
            if direction == INBOUND:
                nursery.start_soon(self._guard, handlers, handlers.inbound, tracked, sock, addr, self.snapshot)
            elif direction == EGRESS:
                nursery.start_soon(
                    self._guard, handlers, self.egress.handle, tracked, sock, self.snapshot, self.sessions
                )
            else:
                nursery.start_soon(
                    self._guard, handlers, handlers.outbound, tracked, sock, self.snapshot, self.sessions
                )

        return on_connection

    async def _guard(self, handlers: Handlers, handler, tracked: Tracked, *args) -> None:
        """Run one connection's handler; a bug in it closes that connection, never the sidecar.
        Whatever the connection held in ``handlers``' admission is released when it ends."""
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
            handlers.release(tracked)
            self.open.discard(tracked)
            self.metrics.active.labels(tracked.conn.listener, tracked.conn.direction).dec()
            if not self.open:
                self._idle.set()

    # --- reload ---------------------------------------------------------------------------------

    async def reload(self, trigger: str) -> bool:
        """Load everything anew; swap it in only if all of it is valid. Never raises; True if it did.

        Reloads run one at a time. This waits for the reload in progress, if any; the requests made
        meanwhile are all answered by the one reload that starts next, which names their triggers.
        Never call it holding ``files_lock``: the reload takes it to read the files.
        """
        return await self._reload_for(self._want_reload(trigger))

    def _want_reload(self, trigger: str) -> int:
        """Ask for a reload that reads the files after this moment; the request's number."""
        self._reload_triggers.append(trigger)
        self._reloads_requested += 1
        return self._reloads_requested

    async def _reload_for(self, request: int) -> bool:
        """Wait for a reload that began after request number ``request``; run it if none has."""
        async with self._reload_lock:
            if self._reloads_begun >= request:
                return self._reload_ok
            answering = self._reloads_begun = self._reloads_requested
            trigger = "; ".join(dict.fromkeys(self._reload_triggers))  # each trigger once, in order
            self._reload_triggers = []
            with trio.CancelScope(shield=True):  # a reload swapped in is also applied to every open connection
                self._reload_ok = await self._reload_now(trigger)
            self._reloads_done = answering
            return self._reload_ok

    async def _reload_now(self, trigger: str) -> bool:
        async with self.files_lock:  # the renewer is not half-way through rewriting the files
            config_stamp = FileStamp.now(self.config_path)  # before reading: a write during the read is seen next poll
            try:
                new = await run_in_worker(self._load_next, self.snapshot)
            except StartupError as exc:
                self.failed_bundles = exc.failed_bundles
                self.metrics.reloads.labels("failed").inc()
                self.log.emit(
                    "error", "reload_failed", trigger=trigger, detail="; ".join(exc.problems),
                    action="still serving with the last good configuration and identity",
                )
                # Remember what was seen, so that one bad write is reported once, not at every poll.
                self._file_stamps = {p: FileStamp.now(p) for p in self._file_stamps}
                return False
            self.snapshot = new  # with the session cache, in one step: no checkpoint between them
            self.sessions = SessionCache(new)
            self._file_stamps = self._stamp_files(new, config_stamp)
        self.failed_bundles = []
        self.log.configure(new.config.log.level, new.config.log.format)
        self._update_identity_metrics()
        self.metrics.reloads.labels("ok").inc()
        self.log.emit(
            "info", "reloaded", trigger=trigger, spiffe_id=str(new.creds.spiffe_id),
            expires=new.creds.not_after.isoformat(),
        )
        await self._revoke_disallowed(new)
        self.check_crl_freshness(datetime.now(timezone.utc))
        return True

    def _load_next(self, current: Snapshot) -> Snapshot:
        """The snapshot to swap in after ``current``, or StartupError. Runs in a worker thread.

        Any other exception (a bug, or a library refusing input we did not foresee) is turned into a
        StartupError too: a failed reload keeps the last good state, it never ends the sidecar.
        """
        try:
            new = load_snapshot(self.config_path, previous=current)
        except StartupError:
            raise
        except Exception as exc:
            raise StartupError([f"{self.config_path}: reload failed unexpectedly: {type(exc).__name__}: {exc}"]) from exc
        if _listener_layout(new.config) != _listener_layout(current.config):
            raise StartupError(
                ["listeners were added, removed or moved; restart the sidecar to change listen addresses"]
            )
        return new

    async def _revoke_disallowed(self, snapshot: Snapshot) -> None:
        """Cancel the open connections whose peer the new policy or CRL refuses.

        RECHECK_SLICE connections at a time, with a checkpoint between slices. For each, only what
        changed since the snapshot that last allowed it is checked again (once per pair of snapshots
        and listener), and the policy is asked once per peer ID and listener.
        """
        changes: dict[tuple[int, str, str], Changed] = {}
        decide = {key: cache(listener_policy.authorize) for key, listener_policy in snapshot.policies.items()}
        if self.egress is not None:
            self.egress.revoke_disallowed(snapshot)  # egress connections are decided by their destination
        for count, tracked in enumerate(list(self.open), 1):
            if count % RECHECK_SLICE == 0:
                await trio.sleep(0)
            if tracked.conn.direction == EGRESS:
                continue
            earlier = tracked.checked_under
            if tracked.peer_id is None or tracked.revoked_detail is not None or earlier is snapshot:
                continue
            key = (tracked.conn.direction, tracked.conn.listener)
            listener_policy = snapshot.policy(*key)
            change_key = (id(earlier), *key)
            changed = changes.get(change_key)
            if changed is None:
                before = earlier.policies.get(key) if earlier is not None else None
                changed = changes[change_key] = listener_policy.changed_since(before)
            if changed.rules or changed.trust:
                detail = listener_policy.refusal(
                    tracked.peer_id, tracked.serial, tracked.path, changed=changed, decide=decide[key]
                )
                if detail is not None:
                    tracked.revoked_detail = detail
                    tracked.scope.cancel()
                    continue
            tracked.checked_under = snapshot

    def current_identity(self) -> tuple[IdentityConfig, Credentials]:
        """The identity section and the credentials loaded from it, both from the current snapshot."""
        return self.snapshot.config.identity, self.snapshot.creds

    async def install_identity(self, write: Callable[[], None], trigger: str = "renewal") -> bool:
        """Run ``write`` (blocking: it replaces the identity files) in a thread, then reload once.

        ``files_lock`` is held throughout, so the file watcher never sees the files half-written,
        and the whole step is shielded from cancellation: the files are never left out of step.
        An OSError from ``write`` propagates (and nothing is reloaded); else the reload's result.
        """
        with trio.CancelScope(shield=True):
            async with self.files_lock:
                await run_in_worker(write)  # a sync's write loads the credentials first: a large CRL takes long
                request = self._want_reload(trigger)  # before the watcher can see the new files
            return await self._reload_for(request)  # re-stamps the files: the watcher sees no change

    def _stamp_files(self, snapshot: Snapshot, config_stamp: FileStamp | None) -> dict[Path, FileStamp | None]:
        """The identity files as they were just before they were read, and the config file's ``config_stamp``."""
        return {**snapshot.creds.files, self.config_path: config_stamp}

    async def _watch_files(self) -> None:
        """Poll the files the config names; reload when any of them changes (symlink swaps included)."""
        while True:
            await trio.sleep(FILE_POLL_INTERVAL)
            async with self.files_lock:  # waits while the renewer swaps key and certificate
                if self._reloads_requested > self._reloads_done:
                    continue  # a reload that will read the files is on its way; it re-stamps them
                changed = [str(p) for p, stamp in self._file_stamps.items() if FileStamp.now(p) != stamp]
                request = self._want_reload("file change: " + ", ".join(changed)) if changed else None
            if request is not None:
                await self._reload_for(request)

    async def _reap_idle(self) -> None:
        """Close relayed connections that moved no byte either way for ``timeouts.idle``.

        One task looks at every open connection now and then, instead of a timer per connection:
        timing each wait would cost the data path more than the work it guards.
        """
        while True:
            idle = self.snapshot.config.timeouts.idle
            await trio.sleep(max(0.05, min(1.0, idle / 10)))
            now = time.monotonic()  # the clock of Link.last_activity, which the relay thread writes
            for tracked in list(self.open):
                link = tracked.link
                if link is not None and now - link.last_activity >= idle and tracked.idle_detail is None:
                    tracked.idle_detail = f"no bytes either way for {idle:g}s"
                    tracked.scope.cancel()

    async def _watch_crl_freshness(self) -> None:
        """Log ``crl_stale`` (warning) when a CRL goes past its next update or past the grace, and
        ``crl_fresh`` when none is any more: once per change, whether time or a reload changed it.
        The handshakes decide on their own (``proxy.tls.CrlFreshness``); this is for people."""
        while True:
            self.check_crl_freshness(datetime.now(timezone.utc))
            await trio.sleep(CRL_CHECK_INTERVAL)

    def check_crl_freshness(self, now: datetime) -> None:
        stale = self._stale_crls(now)
        state = tuple((issuer, effect) for issuer, effect, _ in stale)
        if state == self._crl_state:
            return
        self._crl_state = state
        crl = str(self.snapshot.config.identity.crl)
        if stale:
            self.log.emit("warning", "crl_stale", crl=crl, detail="; ".join(sentence for _, _, sentence in stale))
        else:
            self.log.emit("info", "crl_fresh", crl=crl, detail="every loaded CRL is before its next update")

    def stale_crls(self, now: datetime) -> list[str]:
        """One sentence per loaded CRL past its next update, saying what new handshakes get."""
        return [sentence for _, _, sentence in self._stale_crls(now)]

    def _stale_crls(self, now: datetime) -> list[tuple[str, str, str]]:
        """(issuer, effect, sentence) for each loaded CRL past its next update; the first two are the
        state whose change is logged, the sentence also says how long ago."""
        identity = self.snapshot.config.identity
        found = []
        for issuer in self.snapshot.creds.trust.issuer_crls:
            due = issuer.next_update
            if due is None or due >= now:
                continue
            if now - due <= timedelta(seconds=identity.crl_grace):
                effect = f"within identity.crl_grace ({format_duration(identity.crl_grace)}): peers still accepted"
            elif identity.crl_stale == "refuse":
                effect = "past identity.crl_grace: new handshakes through it are refused (crl_stale)"
            else:
                effect = "past identity.crl_grace: new handshakes through it are accepted and counted (crl_stale: warn)"
            found.append((
                issuer.issuer_name, effect,
                f"the CRL from '{issuer.issuer_name}' in {identity.crl} is past its next update "
                f"(due at {due:%Y-%m-%dT%H:%M:%SZ}, {roughly(now - due)} ago); {effect}",
            ))
        return found

    # --- health ---------------------------------------------------------------------------------

    def _update_identity_metrics(self) -> None:
        self.metrics.identity_expiry.set(self.snapshot.creds.not_after.timestamp())
        self.metrics.trust_bundle_roots.clear()  # trust domains no longer trusted disappear
        for trust_domain, bundle in self.snapshot.creds.bundles.items():
            self.metrics.trust_bundle_roots.labels(trust_domain).set(len(bundle.roots))
        self.metrics.crl_next_update.clear()  # issuers of CRLs no longer loaded disappear
        for issuer in self.snapshot.creds.trust.issuer_crls:
            if issuer.next_update is not None:
                self.metrics.crl_next_update.labels(issuer.issuer_name).set(issuer.next_update.timestamp())

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
        problems.extend(self.stale_crls(datetime.fromtimestamp(now_timestamp, timezone.utc)))
        problems.extend(
            f"a trust bundle failed to load (still verifying with the last good one): {problem}"
            for problem in self.failed_bundles
        )
        if self.draining:
            problems.append("draining: shutting down")
        if self.renewer is not None:
            problems.extend(self.renewer.readiness_problems(now_timestamp))
        return problems
