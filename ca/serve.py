"""``ca serve``: the renewal and enrollment service, HTTPS (TLS 1.3) on trio with h11.

Theory of operation
-------------------
Endpoints (bodies at most ``MAX_BODY_BYTES``; errors are JSON ``{"error": CODE, "detail": TEXT}``):

- ``POST /v1/renew``, body a PEM CSR. Authenticated by the client certificate of the TLS
  connection, which must chain to DIR/bundle.pem (any root in it: during a rotation both) and be in
  the index, neither revoked nor expired (403 otherwise, ``error`` the reason code). The answer
  (200, ``application/pem-certificate-chain``) is a new leaf for the *same* SPIFFE ID over the CSR's
  key (the CSR's names are ignored, its signature must verify: 400 ``bad_csr``), then the current
  intermediate; its lifetime is the one the old certificate was issued with, capped at the
  intermediate's expiry; its DNS names are the old certificate's.
- ``POST /v1/enroll``, body ``{"token": ..., "csr": PEM}``: the first certificate of the ID the
  token (``ca token``) was made for. A token works once: lookup, check, signing, recording and
  consuming happen in one SQLite transaction (``ca.operations.enroll``).
- ``GET /healthz``: 200 while the process serves (no client certificate needed).

TLS: the service presents its own X.509-SVID, ``spiffe://TD/ca`` (plus ``--dns`` names), issued by
the current intermediate at start-up, recorded in the index, valid 24 h (capped by the
intermediate) and replaced at 2/3 of its life or as soon as ``ca rotate`` installs a new
intermediate (``STATE_CHECK_INTERVAL``); the certificate it replaces is revoked (``superseded``),
so it never holds up ``ca bundle --drop-old``. A client certificate is requested but optional
(enrollment has none); OpenSSL's verdict on it is deliberately ignored during the handshake and
the chain is verified afterwards against the bundle and the index, so that an expired or revoked
client gets a 403 with a reason rather than a bare TLS alert.

Concurrency: one task per connection (at most ``MAX_CONNECTIONS``; more wait in the backlog),
keep-alive with ``EXCHANGE_DEADLINE`` per request. Signing and SQLite run in worker threads (at
most ``WORKERS`` at once); the index's ``BEGIN IMMEDIATE`` transactions serialize the writers, so
concurrent renewals and enrollments never lose a record or spend a token twice.

Logs: one JSON line per request on stderr (``event: "request"``, with ``decision``: issued, refused
or error, the reason code, the peer and the result), plus ``listening``, ``ready``,
``service_certificate``, ``handshake_failed`` and ``stopped``. SIGTERM or SIGINT: stop accepting,
let requests in flight finish for up to ``DRAIN_TIMEOUT`` seconds, exit 0.
"""

from __future__ import annotations

import json
import signal
import socket
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from http import HTTPStatus
from pathlib import Path
from typing import Sequence

import h11
import trio
from cryptography import x509
from OpenSSL import SSL

from ca import operations
from ca.authority import (
    Issuer,
    certificate_pem,
    format_serial,
    format_time,
    generate_key,
)
from ca.errors import CaError, InputError, Refused
from ca.store import BUNDLE, INTERMEDIATE_CERT, INTERMEDIATE_KEY, StateDir
from mtls.endpoints import format_address, parse_endpoint
from mtls.events import EventLog
from mtls.sockets import bound_address, close_socket, listen_socket
from mtls.tlsio import PEM_CHAIN, TlsStream, ssl_failure_text, tls13_context

MAX_CONNECTIONS = 256
WORKERS = 8  # threads signing and writing the index at once
HANDSHAKE_TIMEOUT = 10.0
EXCHANGE_DEADLINE = 10.0  # seconds for a client to send one request and take its answer
MAX_HEAD_BYTES = 8 * 1024
MAX_BODY_BYTES = 64 * 1024
RECEIVE_BYTES = 16 * 1024
STATE_CHECK_INTERVAL = 1.0
DRAIN_TIMEOUT = 5.0
JSON = "application/json"

# Reason codes (CaError.code) and the HTTP status they answer with; anything else refused is 403.
_STATUS = {
    "bad_csr": 400,
    "bad_request": 400,
    "ca_expired": 503,
}


@dataclass(frozen=True)
class Reply:
    status: int
    body: bytes
    content_type: str = JSON
    headers: tuple[tuple[str, str], ...] = ()
    decision: str | None = None  # issued | refused | error, for the log
    fields: tuple[tuple[str, object], ...] = ()  # more for the log line


def json_error(
    status: int, code: str, detail: str, *, decision: str = "refused", headers: tuple[tuple[str, str], ...] = ()
) -> Reply:
    body = json.dumps({"error": code, "detail": detail}).encode() + b"\n"
    return Reply(status, body, headers=headers, decision=decision, fields=(("reason", code), ("detail", detail)))


def _stamp(path: Path) -> tuple:
    try:
        st = path.stat()
    except OSError:
        return ("missing",)
    return (st.st_ino, st.st_dev, st.st_mtime_ns, st.st_size)


@dataclass(frozen=True)
class ServiceState:
    """What a connection needs, swapped as one value when the CA's files change."""

    issuer: Issuer
    roots: tuple[x509.Certificate, ...]
    context: SSL.Context
    cert: x509.Certificate  # the service's own certificate
    stamps: tuple
    replace_at: float  # unix time at 2/3 of the service certificate's life


def _server_context(cert: x509.Certificate, chain: Sequence[x509.Certificate], key) -> SSL.Context:
    ctx = tls13_context()
    ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    ctx.use_certificate(cert)
    for intermediate in chain:
        ctx.add_extra_chain_cert(intermediate)
    ctx.use_privatekey(key)
    ctx.check_privatekey()
    # Request a client certificate, accept any at the TLS layer: see the module docstring.
    ctx.set_verify(SSL.VERIFY_PEER, lambda conn, cert, errnum, depth, ok: True)
    return ctx


class Service:
    def __init__(self, state: StateDir, *, passphrase: bytes | None, dns_names: Sequence[str], log: EventLog):
        self.state = state
        self.passphrase = passphrase
        self.dns_names = list(dns_names)
        self.log = log
        self.current: ServiceState | None = None
        self.workers = trio.CapacityLimiter(WORKERS)
        self.open = 0
        self.idle = trio.Event()
        self.idle.set()

    # --- the service's own state --------------------------------------------------------------

    def _stamps(self) -> tuple:
        return tuple(_stamp(self.state.file(name)) for name in (INTERMEDIATE_CERT, INTERMEDIATE_KEY, BUNDLE))

    def refresh(self, now: datetime | None = None) -> bool:
        """(Worker thread.) Rebuild the state if the CA files changed or our certificate is due.

        True if a new state was swapped in. Raises CaError when the CA cannot serve at all.
        """
        now = now or datetime.now(timezone.utc).replace(microsecond=0)
        old = self.current
        stamps = self._stamps()
        new_ca = old is None or stamps[:2] != old.stamps[:2]
        due = old is None or new_ca or now.timestamp() >= old.replace_at
        if not due and stamps == old.stamps:
            return False
        issuer = operations.load_issuer(self.state, self.passphrase) if new_ca else old.issuer
        roots = tuple(self.state.bundle_roots())
        if due:
            key = generate_key("ec-p256")
            cert = operations.issue_service_cert(
                self.state, issuer, key.public_key(), now=now, dns_names=self.dns_names
            )
            context = _server_context(cert, [issuer.cert], key)
            start, end = cert.not_valid_before_utc.timestamp(), cert.not_valid_after_utc.timestamp()
            replace_at = start + (end - start) * 2 / 3
        else:
            cert, context, replace_at = old.cert, old.context, old.replace_at
        self.current = ServiceState(issuer, roots, context, cert, stamps, replace_at)
        if due:
            self.log.emit(
                "info", "service_certificate", spiffe_id=str(operations.service_id(self.state.trust_domain)),
                serial=format_serial(cert.serial_number), issuer=cert.issuer.rfc4514_string(),
                expires=format_time(cert.not_valid_after_utc), dns_names=self.dns_names,
            )
        if due and old is not None:
            self._retire(old.cert, now)
        return True

    def _retire(self, cert: x509.Certificate, now: datetime) -> None:
        try:
            operations.revoke(
                self.state, format_serial(cert.serial_number), reason="superseded", now=now,
                passphrase=self.passphrase,
            )
        except CaError as exc:
            self.log.emit(
                "warning", "retire_failed", serial=format_serial(cert.serial_number),
                detail=f"could not revoke the replaced service certificate: {exc}",
            )

    async def watch_state(self) -> None:
        """Pick up ``ca rotate`` / ``ca bundle --drop-old`` and replace our certificate when due."""
        while True:
            await trio.sleep(STATE_CHECK_INTERVAL)
            try:
                await trio.to_thread.run_sync(self.refresh, limiter=self.workers)
            except CaError as exc:
                self.log.emit("error", "refresh_failed", detail=str(exc), action="still serving with the last state")

    # --- connections --------------------------------------------------------------------------

    async def serve(self, sock: socket.socket, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Accept on ``sock`` (listening, non-blocking) until SIGTERM/SIGINT; then drain and return.

        Who closes what: ``sock`` is closed when accepting stops; each connection's socket by its task.
        """
        slots = trio.Semaphore(MAX_CONNECTIONS)
        async with trio.open_nursery() as root:
            root.start_soon(self.watch_state)
            stop = trio.Event()
            root.start_soon(self._signals, stop)
            async with trio.open_nursery() as connections:
                async with trio.open_nursery() as accepting:
                    accepting.start_soon(self._accept_loop, sock, slots, connections)
                    task_status.started()
                    await stop.wait()
                    accepting.cancel_scope.cancel()
                close_socket(sock)
                self.log.emit("info", "draining", open_connections=self.open, drain_s=DRAIN_TIMEOUT)
                with trio.move_on_after(DRAIN_TIMEOUT):
                    await self.idle.wait()
                connections.cancel_scope.cancel()
            root.cancel_scope.cancel()

    async def _signals(self, stop: trio.Event) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                self.log.emit("info", "shutdown", signal=signal.Signals(signum).name)
                stop.set()
                return

    async def _accept_loop(self, lsock: socket.socket, slots: trio.Semaphore, nursery: trio.Nursery) -> None:
        await slots.acquire()
        while True:
            try:
                raw, addr = lsock.accept()
            except BlockingIOError:
                await trio.lowlevel.wait_readable(lsock)
                continue
            except OSError as exc:  # out of descriptors, an aborted connection: log, breathe, go on
                self.log.emit("error", "accept_failed", detail=exc.strerror or str(exc))
                await trio.sleep(0.1)
                continue
            raw.setblocking(False)
            self.open += 1
            self.idle = trio.Event() if self.idle.is_set() else self.idle
            nursery.start_soon(self._connection, raw, format_address(addr), slots)
            await slots.acquire()

    async def _connection(self, raw: socket.socket, peer_addr: str, slots: trio.Semaphore) -> None:
        """Handshake, then requests until the client closes or stalls. Never raises but Cancelled."""
        tls = TlsStream(SSL.Connection(self.current.context, raw), raw)
        tls.conn.set_accept_state()
        try:
            with trio.move_on_after(HANDSHAKE_TIMEOUT) as scope:
                try:
                    await tls.handshake()
                except (SSL.Error, OSError) as exc:
                    self.log.emit("info", "handshake_failed", peer_addr=peer_addr, detail=ssl_failure_text(exc))
                    return
            if scope.cancelled_caught:
                self.log.emit("info", "handshake_failed", peer_addr=peer_addr,
                              detail=f"no complete TLS handshake within {HANDSHAKE_TIMEOUT:g}s")
                return
            chain = _peer_chain(tls.conn)
            conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
            while True:
                keep_open = False
                with trio.move_on_after(EXCHANGE_DEADLINE):
                    keep_open = await self._exchange(tls, conn, chain, peer_addr)
                if not keep_open:
                    return
                conn.start_next_cycle()
        except (SSL.Error, OSError):
            pass  # the client went away mid-request
        except Exception as exc:  # a bug: this connection ends, the service goes on
            self.log.emit("error", "internal_error", peer_addr=peer_addr, detail=f"{type(exc).__name__}: {exc}")
        finally:
            with trio.CancelScope(shield=True):
                await tls.aclose()
            slots.release()
            self.open -= 1
            if self.open == 0:
                self.idle.set()

    async def _exchange(self, tls: TlsStream, conn: h11.Connection, chain, peer_addr: str) -> bool:
        """One request and its reply; True if the connection may carry another."""
        started = time.monotonic()
        try:
            request, body = await _read_request(tls, conn)
        except h11.RemoteProtocolError as exc:
            reply = json_error(exc.error_status_hint, "bad_request", str(exc))
            await _send(tls, conn, reply, extra=(("connection", "close"),))
            self._log_request(None, peer_addr, chain, reply, started)
            return False
        if request is None:
            return False
        reply = await self._reply(request, body, chain)
        await _send(tls, conn, reply)
        self._log_request(request, peer_addr, chain, reply, started)
        return conn.our_state is h11.DONE and conn.their_state is h11.DONE

    async def _reply(self, request: h11.Request, body: bytes, chain) -> Reply:
        path = request.target.partition(b"?")[0].decode("ascii", "replace")
        routes = {"/v1/renew": (b"POST", self._renew), "/v1/enroll": (b"POST", self._enroll),
                  "/healthz": (b"GET", None)}
        if path not in routes:
            return json_error(404, "not_found", f"no such endpoint {path!r}; try POST /v1/renew or /v1/enroll")
        method, handler = routes[path]
        if request.method != method:
            return json_error(
                405, "method_not_allowed", f"{path} takes {method.decode()}", headers=(("allow", method.decode()),)
            )
        if handler is None:
            return Reply(200, b"ok\n", "text/plain; charset=utf-8")
        now = datetime.now(timezone.utc).replace(microsecond=0)
        try:
            return await trio.to_thread.run_sync(handler, body, chain, now, limiter=self.workers)
        except CaError as exc:
            status = _STATUS.get(exc.code, 400 if isinstance(exc, InputError) else 403)
            if not isinstance(exc, (Refused, InputError)):
                status = 500
            return json_error(status, exc.code, str(exc), decision="error" if status >= 500 else "refused")
        except Exception as exc:
            self.log.emit("error", "internal_error", path=path, detail=f"{type(exc).__name__}: {exc}")
            return json_error(500, "internal_error", "the CA failed to answer; see its log", decision="error")

    # --- handlers (worker threads; they sign with the newest state, e.g. right after a rotation) ---

    def _renew(self, body: bytes, chain, now: datetime) -> Reply:
        if not chain:
            raise Refused(
                "no client certificate: renewal is authenticated by the current certificate (mTLS)",
                code="no_client_cert",
            )
        csr = operations.parse_csr(body)
        cert = operations.renew(self.state, self.current.issuer, chain, self.current.roots, csr, now=now)
        return self._issued(cert)

    def _enroll(self, body: bytes, chain, now: datetime) -> Reply:
        try:
            request = json.loads(body)
        except ValueError:
            raise InputError('the body is not JSON; send {"token": "...", "csr": "-----BEGIN ..."}') from None
        if not isinstance(request, dict) or not isinstance(request.get("token"), str) or not isinstance(
            request.get("csr"), str
        ):
            raise InputError('the body must be a JSON object {"token": "...", "csr": "-----BEGIN ..."}')
        csr = operations.parse_csr(request["csr"].encode("utf-8", "replace"))
        cert, _ = operations.enroll(self.state, self.current.issuer, request["token"], csr, now=now)
        return self._issued(cert)

    def _issued(self, cert: x509.Certificate) -> Reply:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        spiffe_id = san.get_values_for_type(x509.UniformResourceIdentifier)[0]
        return Reply(
            200, certificate_pem(cert, self.current.issuer.cert), PEM_CHAIN, decision="issued",
            fields=(("spiffe_id", spiffe_id), ("serial", format_serial(cert.serial_number)),
                    ("expires", format_time(cert.not_valid_after_utc))),
        )

    def _log_request(self, request, peer_addr, chain, reply: Reply, started: float) -> None:
        peer_id = peer_serial = None
        if chain:
            peer_serial = format_serial(chain[0].serial_number)
            try:
                san = chain[0].extensions.get_extension_for_class(x509.SubjectAlternativeName).value
                uris = san.get_values_for_type(x509.UniformResourceIdentifier)
                peer_id = uris[0] if len(uris) == 1 else None
            except (x509.ExtensionNotFound, ValueError):
                pass
        fields = dict(reply.fields)
        self.log.emit(
            "info" if reply.status < 400 else "warning" if reply.status < 500 else "error",
            "request",
            method=request.method.decode("ascii", "replace") if request else None,
            path=request.target.decode("ascii", "replace") if request else None,
            peer_addr=peer_addr, peer_id=peer_id, peer_serial=peer_serial, status=reply.status,
            decision=reply.decision, duration_s=round(time.monotonic() - started, 6), **fields,
        )


def _peer_chain(conn: SSL.Connection) -> list[x509.Certificate]:
    """The client's leaf, then the intermediates it sent (on a server, OpenSSL lists them apart)."""
    leaf = conn.get_peer_certificate()
    if leaf is None:
        return []
    chain = [leaf.to_cryptography()]
    for cert in conn.get_peer_cert_chain() or []:
        parsed = cert.to_cryptography()
        if parsed != chain[0]:
            chain.append(parsed)
    return chain


async def _read_request(tls: TlsStream, conn: h11.Connection) -> tuple[h11.Request | None, bytes]:
    """The next request and its body; (None, b"") if the client closed first. Raises RemoteProtocolError."""
    request = await _next_event(tls, conn)
    if isinstance(request, h11.ConnectionClosed):
        return None, b""
    body = bytearray()
    while isinstance(event := await _next_event(tls, conn), h11.Data):
        body += event.data
        if len(body) > MAX_BODY_BYTES:
            raise h11.RemoteProtocolError(f"request body over {MAX_BODY_BYTES} bytes", error_status_hint=413)
    return request, bytes(body)


async def _next_event(tls: TlsStream, conn: h11.Connection):
    while (event := conn.next_event()) is h11.NEED_DATA:
        conn.receive_data(await tls.receive_some(RECEIVE_BYTES))
    return event


async def _send(tls: TlsStream, conn: h11.Connection, reply: Reply, extra=()) -> None:
    headers = [
        ("content-type", reply.content_type),
        ("content-length", str(len(reply.body))),
        ("cache-control", "no-store"),
        *reply.headers,
        *extra,
    ]
    data = conn.send(h11.Response(status_code=reply.status, reason=HTTPStatus(reply.status).phrase, headers=headers))
    data += conn.send(h11.Data(data=reply.body)) + conn.send(h11.EndOfMessage())
    await tls.send_all(data)


def serve_main(state: StateDir, *, listen: str, dns_names: Sequence[str], passphrase: bytes | None) -> int:
    """``ca serve``: start (refusing bad input with InputError), serve until SIGTERM/SIGINT, return 0."""
    try:
        endpoint = parse_endpoint(listen, hostname=True)
    except ValueError as exc:
        raise InputError(f"--listen {exc}") from None
    log = EventLog("info", "json", sys.stderr)
    service = Service(state, passphrase=passphrase, dns_names=dns_names, log=log)
    service.refresh()  # the issuer, our certificate: every problem is reported before we listen
    try:
        sock = listen_socket(endpoint)
    except OSError as exc:
        raise InputError(f"cannot listen on {endpoint}: {exc.strerror or exc}") from None
    log.emit("info", "listening", address=bound_address(sock))
    current = service.current
    log.emit(
        "info", "ready", spiffe_id=str(operations.service_id(state.trust_domain)),
        serial=format_serial(current.cert.serial_number), trust_roots=len(current.roots),
    )
    trio.run(service.serve, sock)
    log.emit("info", "stopped")
    return 0
