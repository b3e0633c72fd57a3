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
  consuming happen in one SQLite transaction (``ca.enrollment.enroll``).
- ``GET /healthz``: 200 while the process serves (no client certificate needed).
- ``GET /v1/bundle`` (our roots as a SPIFFE bundle, ``ca bundle --format spiffe``) and ``GET /v1/crl``
  (crl.pem as it is): public data, no client certificate needed, with an ``ETag``; a request whose
  ``If-None-Match`` holds it gets 304 without a body. Sidecars keep their files current from these.
- ``GET /readyz``: 200 while the index answers a query; 503 ``database_unavailable`` while it does not
  (PostgreSQL down: renewals and enrollments get the same 503 and change nothing).

TLS: the service presents its own X.509-SVID, ``spiffe://TD/ca`` (plus ``--dns`` names), issued at
start-up by the intermediate of the oldest generation still in bundle.pem (after ``ca rotate``, the
old one until ``ca bundle --drop-old``: whoever holds only the old root can still authenticate the
service and fetch the new one from ``/v1/bundle``), recorded in the index, valid 24 h (capped by the
intermediate) and replaced at 2/3 of its life or as soon as ``ca rotate`` or ``ca bundle
--drop-old`` changes the CA's files (``STATE_CHECK_INTERVAL``); the certificate it replaces is
revoked (``superseded``), and ``ca bundle --drop-old`` does not wait for it. A client certificate is requested but optional
(enrollment has none); OpenSSL's verdict on it is deliberately ignored during the handshake and
the chain is verified afterwards against the bundle and the index, so that an expired or revoked
client gets a 403 with a reason rather than a bare TLS alert.

Concurrency: one task per connection, accepted at once (``mtls.sockets.accept_loop``) and bounded
in two stages, each an ``mtls.httpserve.Admission`` where the oldest connection not being answered
yields to a newcomer when a budget is full, so that idle sockets, however many, cannot keep a
renewal out:

- before its TLS handshake completes, a connection holds a *pending* place (``MAX_PENDING_HANDSHAKES``
  in all, ``MAX_PENDING_PER_SOURCE`` per source address) and has ``HANDSHAKE_TIMEOUT`` seconds from
  accept to complete it; no TLS object exists until its first bytes arrive;
- after it, a connection holds a place among ``MAX_CONNECTIONS`` (``MAX_CONNECTIONS_PER_SOURCE`` per
  source), keep-alive with ``EXCHANGE_DEADLINE`` per request, at most ``MAX_REQUESTS_PER_CONNECTION``
  requests and ``CONNECTION_LIFETIME`` seconds in all (``mtls.httpserve``). A connection is turned
  away (``connection_refused``) only when every place in its way is busy signing.

Signing and SQLite run in worker threads (at most ``WORKERS`` at once); the index's ``BEGIN IMMEDIATE`` transactions serialize the writers, so
concurrent renewals and enrollments never lose a record or spend a token twice.

Logs: one JSON line per request on stderr (``event: "request"``, with ``decision``: issued, refused
or error, the reason code, the peer and the result), plus ``listening``, ``ready``,
``service_certificate``, ``handshake_failed``, ``connection_refused`` and ``stopped``. SIGTERM or SIGINT: stop accepting,
let requests in flight finish for up to ``DRAIN_TIMEOUT`` seconds, exit 0.
"""

from __future__ import annotations

import hashlib
import json
import signal
import socket
import sys
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from functools import partial
from typing import Callable, Sequence

import trio
from cryptography import x509
from OpenSSL import SSL

from ca import enrollment, generations, inspection, issuance, revocation
from ca.authority import (
    Issuer,
    certificate_pem,
    format_serial,
    format_time,
    generate_key,
)
from ca.errors import CaError, InputError, Refused
from ca.store import BUNDLE, CRL, INTERMEDIATE_CERT, INTERMEDIATE_KEY, StateDir
from mtls.endpoints import format_address, parse_endpoint
from mtls.events import EventLog
from mtls.files import FileStamp, write_atomically
from mtls.httpserve import (
    JSON,
    PEM_CHAIN,
    TEXT,
    Admission,
    Limits,
    Reply,
    Request,
    Ticket,
    serve_requests,
)
from mtls.sockets import accept_loop, bound_address, close_socket, listen_socket
from mtls.tlsio import TlsStream, present, ssl_error_text, tls13_context

MAX_PENDING_HANDSHAKES = 256
MAX_PENDING_PER_SOURCE = 32
MAX_CONNECTIONS = 256  # with a completed handshake
MAX_CONNECTIONS_PER_SOURCE = 64
CONNECTION_LIFETIME = 60.0  # seconds, however many requests
MAX_REQUESTS_PER_CONNECTION = 100
WORKERS = 8  # threads signing and writing the index at once
HANDSHAKE_TIMEOUT = 10.0
EXCHANGE_DEADLINE = 10.0  # seconds for a client to send one request and take its answer
MAX_HEAD_BYTES = 8 * 1024
MAX_BODY_BYTES = 64 * 1024
LIMITS = Limits(
    max_head_bytes=MAX_HEAD_BYTES, max_body_bytes=MAX_BODY_BYTES, exchange_deadline=EXCHANGE_DEADLINE,
    connection_lifetime=CONNECTION_LIFETIME, max_requests=MAX_REQUESTS_PER_CONNECTION,
)
# Descriptors: every admitted connection, plus those evicted whose task has not closed them yet.
MAX_OPEN_SOCKETS = MAX_PENDING_HANDSHAKES + MAX_CONNECTIONS + 64
STATE_CHECK_INTERVAL = 1.0
DRAIN_TIMEOUT = 5.0
PEM_FILE = "application/x-pem-file"  # GET /v1/crl
SERVICE_SIGNER_MARGIN = timedelta(hours=1)
# In the state directory: the serial of the certificate this directory's `ca serve` presented last, so
# that the next run revokes it (superseded) instead of leaving it valid beside its own.
LAST_SERVICE_SERIAL = "serve.serial"

# Reason codes (CaError.code) and the HTTP status they answer with; anything else refused is 403.
_STATUS = {
    "bad_csr": 400,
    "bad_request": 400,
    "ca_expired": 503,
    "database_unavailable": 503,  # PostgreSQL down or unreachable: nothing was written, ask again later
}


def json_error(
    status: int, code: str, detail: str, *, decision: str = "refused", headers: tuple[tuple[str, str], ...] = ()
) -> Reply:
    """``{"error": code, "detail": detail}``; the request's log line gets ``decision`` (refused | error)."""
    body = json.dumps({"error": code, "detail": detail}).encode() + b"\n"
    return Reply(
        status, body, JSON, headers, log_fields=(("decision", decision), ("reason", code), ("detail", detail))
    )


def _malformed(status: int, detail: str) -> Reply:
    """The answer to a request h11 could not parse, or too large (431, 413)."""
    return json_error(status, "bad_request", detail)


@dataclass(frozen=True)
class ServiceState:
    """What a connection needs, swapped as one value when the CA's files change."""

    issuer: Issuer
    roots: tuple[x509.Certificate, ...]
    context: SSL.Context
    cert: x509.Certificate  # the service's own certificate
    stamps: tuple
    replace_at: float  # unix time at 2/3 of the service certificate's life


def _server_context(chain: Sequence[x509.Certificate], key) -> SSL.Context:
    ctx = tls13_context()
    present(ctx, chain, key)
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
        self.pending = Admission(MAX_PENDING_HANDSHAKES, MAX_PENDING_PER_SOURCE)
        self.established = Admission(MAX_CONNECTIONS, MAX_CONNECTIONS_PER_SOURCE)
        self.open = 0
        self.idle = trio.Event()
        self.idle.set()
        self.refresh_now = trio.Event()  # SIGHUP: re-read the CA's state without waiting for the next check

    # --- the service's own state --------------------------------------------------------------

    def _stamps(self) -> tuple:
        return tuple(FileStamp.now(self.state.file(name)) for name in (INTERMEDIATE_CERT, INTERMEDIATE_KEY, BUNDLE))

    def refresh(self, now: datetime | None = None) -> bool:
        """(Worker thread.) Sign the CRLs anew when due; rebuild the state if the CA files changed or our
        certificate is due (revoking the one it replaces, or the previous run's).

        True if a new state was swapped in. Raises CaError when the CA cannot serve at all.
        """
        now = now or datetime.now(timezone.utc).replace(microsecond=0)
        self.state.sync_shared_files()  # PostgreSQL: another replica's rotation or CRL reaches DIR here
        self._keep_crl_fresh(now)
        old = self.current
        stamps = self._stamps()
        new_ca = old is None or stamps[:2] != old.stamps[:2]
        new_bundle = old is not None and stamps[2] != old.stamps[2]  # rotate or drop-old: maybe another signer
        due = old is None or new_ca or new_bundle or now.timestamp() >= old.replace_at
        if not due and stamps == old.stamps:
            return False
        issuer = self.state.load_issuer(self.passphrase) if new_ca else old.issuer
        roots = tuple(self.state.bundle_roots())
        if due:
            key = generate_key("ec-p256")
            signer = self._service_signer(issuer, now)
            cert = issuance.issue_service_cert(
                self.state, signer, key.public_key(), now=now, dns_names=self.dns_names
            )
            context = _server_context([cert, signer.cert], key)
            start, end = cert.not_valid_before_utc.timestamp(), cert.not_valid_after_utc.timestamp()
            replace_at = start + (end - start) * 2 / 3
        else:
            cert, context, replace_at = old.cert, old.context, old.replace_at
        self.current = ServiceState(issuer, roots, context, cert, stamps, replace_at)
        if due:
            self.log.emit(
                "info", "service_certificate", spiffe_id=str(issuance.service_id(self.state.trust_domain)),
                serial=format_serial(cert.serial_number), issuer=cert.issuer.rfc4514_string(),
                expires=format_time(cert.not_valid_after_utc), dns_names=self.dns_names,
            )
        if due:
            previous = old.cert.serial_number if old is not None else self._last_run_serial()
            write_atomically(self.state.file(LAST_SERVICE_SERIAL), f"{format_serial(cert.serial_number)}\n".encode())
            if previous is not None and previous != cert.serial_number:
                self._retire(previous, now)
        return True

    def _last_run_serial(self) -> int | None:
        """The service certificate of the previous run in this directory, if it left its serial."""
        try:
            return revocation.parse_serial(self.state.file(LAST_SERVICE_SERIAL).read_text())
        except (OSError, InputError):
            return None

    def _keep_crl_fresh(self, now: datetime) -> None:
        """Sign the CRLs anew when less than a third of their validity is left, so that a running CA
        never lets verifiers see a stale CRL."""
        if not revocation.crl_due(self.state, now):
            return
        crl = revocation.refresh_crl(self.state, now=now, passphrase=self.passphrase)
        number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
        self.log.emit("info", "crl_signed", crl=str(self.state.file(CRL)), number=number,
                      next_update=format_time(crl.next_update_utc))

    def _service_signer(self, current: Issuer, now: datetime) -> Issuer:
        """The intermediate of the oldest generation still in bundle.pem (and valid for an hour more),
        else ``current``: during a rotation, clients that hold only the old root (a federated
        sidecar fetching ``/v1/bundle``) still authenticate the service, and fetch the new root."""
        for issuer in reversed(self.state.live_issuers(self.passphrase)):
            if issuer.cert.not_valid_after_utc > now + SERVICE_SIGNER_MARGIN:
                return issuer
        return current

    def _retire(self, serial: int, now: datetime) -> None:
        """Revoke a service certificate ours replaced (superseded): nobody may present it any more."""
        try:
            revocation.revoke(
                self.state, format_serial(serial), reason="superseded", now=now, passphrase=self.passphrase,
            )
        except CaError as exc:
            self.log.emit(
                "warning", "retire_failed", serial=format_serial(serial),
                detail=f"could not revoke the replaced service certificate: {exc}",
            )

    async def watch_state(self) -> None:
        """Pick up ``ca rotate`` / ``ca bundle --drop-old`` and replace our certificate when due."""
        while True:
            with trio.move_on_after(STATE_CHECK_INTERVAL):
                await self.refresh_now.wait()
            self.refresh_now = trio.Event()
            try:
                await trio.to_thread.run_sync(self.refresh, limiter=self.workers)
            except CaError as exc:
                self.log.emit("error", "refresh_failed", detail=str(exc), action="still serving with the last state")

    # --- connections --------------------------------------------------------------------------

    async def serve(self, sock: socket.socket, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Accept on ``sock`` (listening, non-blocking) until SIGTERM/SIGINT; then drain and return.

        Who closes what: ``sock`` is closed when accepting stops; each connection's socket by its task.
        """
        slots = trio.Semaphore(MAX_OPEN_SOCKETS)
        async with trio.open_nursery() as root:
            root.start_soon(self.watch_state)
            stop = trio.Event()
            await root.start(self._signals, stop)  # signals handled before we say ready
            async with trio.open_nursery() as connections:
                async with trio.open_nursery() as accepting:
                    accepting.start_soon(partial(
                        accept_loop, sock, partial(self._start_connection, connections, slots), self.log,
                        listener="ca serve", slots=slots,
                    ))
                    current = self.current
                    self.log.emit(
                        "info", "ready", spiffe_id=str(issuance.service_id(self.state.trust_domain)),
                        serial=format_serial(current.cert.serial_number), trust_roots=len(current.roots),
                    )
                    task_status.started()
                    await stop.wait()
                    accepting.cancel_scope.cancel()
                close_socket(sock)
                self.log.emit("info", "draining", open_connections=self.open, drain_s=DRAIN_TIMEOUT)
                with trio.move_on_after(DRAIN_TIMEOUT):
                    await self.idle.wait()
                connections.cancel_scope.cancel()
            root.cancel_scope.cancel()

    async def _signals(self, stop: trio.Event, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """SIGTERM/SIGINT: stop. SIGHUP, which operators send to reload: re-read the CA's state now
        (``watch_state`` also does every STATE_CHECK_INTERVAL), instead of the default of dying.
        Started (``task_status``) once the handlers are installed, which ``ready`` waits for."""
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            task_status.started()
            async for signum in signals:
                if signum == signal.SIGHUP:
                    self.log.emit("info", "reload_requested", signal="SIGHUP")
                    self.refresh_now.set()
                    continue
                self.log.emit("info", "shutdown", signal=signal.Signals(signum).name)
                stop.set()
                return

    def _start_connection(self, nursery: trio.Nursery, slots: trio.Semaphore, raw: socket.socket, addr) -> None:
        """(accept_loop's hand-over.) Count the connection open, give it a pending place (the oldest
        pending one of its source, or of all, may yield) and start its task, which owns ``raw``."""
        self.open += 1
        self.idle = trio.Event() if self.idle.is_set() else self.idle
        source = str(addr[0]) if isinstance(addr, tuple) else "local"
        pending = self.pending.admit(source)  # never None: a pending place is never busy, so one always yields
        nursery.start_soon(self._connection, raw, format_address(addr), source, pending, slots)

    async def _connection(
        self, raw: socket.socket, peer_addr: str, source: str, pending: Ticket, slots: trio.Semaphore
    ) -> None:
        """Handshake, then requests until the client closes or stalls. Never raises but Cancelled."""
        tls = None
        try:
            tls = await self._handshake(raw, peer_addr, pending)
            if tls is None:
                return
            place = self.established.admit(source)
            if place is None:
                self.log.emit(
                    "warning", "connection_refused", peer_addr=peer_addr,
                    detail=f"all {MAX_CONNECTIONS} connections ({MAX_CONNECTIONS_PER_SOURCE} per source) are busy "
                    "signing; retry shortly",
                )
                return
            chain = _peer_chain(tls.conn)
            with place.cancel_scope:
                try:
                    await serve_requests(
                        tls, partial(self._reply, chain=chain), LIMITS, malformed=_malformed,
                        served=partial(self._log_request, peer_addr, chain), ticket=place,
                    )
                finally:
                    place.release()
        except (SSL.Error, OSError):
            pass  # the client went away mid-request
        except Exception as exc:  # a bug: this connection ends, the service goes on
            self.log.emit("error", "internal_error", peer_addr=peer_addr, detail=f"{type(exc).__name__}: {exc}")
        finally:
            with trio.CancelScope(shield=True):
                if tls is not None:
                    await tls.aclose()
                else:
                    close_socket(raw)
            slots.release()
            self.open -= 1
            if self.open == 0:
                self.idle.set()

    async def _handshake(self, raw: socket.socket, peer_addr: str, pending: Ticket) -> TlsStream | None:
        """The TLS stream once the handshake is complete, or None (logged ``handshake_failed``).

        The client has ``HANDSHAKE_TIMEOUT`` seconds from accept, in its ``pending`` place; the TLS
        object is made only when its first bytes arrive (an idle socket costs no OpenSSL memory).
        """
        detail = ""
        try:
            with pending.cancel_scope:
                pending.cancel_scope.deadline = trio.current_time() + HANDSHAKE_TIMEOUT
                try:
                    await trio.lowlevel.wait_readable(raw)
                    tls = TlsStream(self.current.context, raw, server_side=True)
                    await tls.handshake()
                    return tls
                except (SSL.Error, OSError) as exc:
                    detail = ssl_error_text(exc)
        finally:
            pending.release()
        if pending.evicted:
            detail = (
                f"gave its place to a newer connection: {MAX_PENDING_HANDSHAKES} pending handshakes "
                f"({MAX_PENDING_PER_SOURCE} per source) is the limit"
            )
        elif pending.cancel_scope.cancelled_caught:
            detail = f"no complete TLS handshake within {HANDSHAKE_TIMEOUT:g}s"
        self.log.emit("info", "handshake_failed", peer_addr=peer_addr, detail=detail)
        return None

    async def _reply(self, request: Request, chain) -> Reply:
        path = request.path
        published = {"/v1/bundle": self._bundle_document, "/v1/crl": self._crl_document}
        if path in published:
            if request.method != "GET":
                return json_error(405, "method_not_allowed", f"{path} takes GET", headers=(("allow", "GET"),))
            return await trio.to_thread.run_sync(
                _conditional, published[path], request.header("if-none-match"), limiter=self.workers
            )
        routes = {"/v1/renew": ("POST", self._renew), "/v1/enroll": ("POST", self._enroll),
                  "/healthz": ("GET", None), "/readyz": ("GET", self._ready)}
        if path not in routes:
            return json_error(404, "not_found", f"no such endpoint {path!r}; try POST /v1/renew or /v1/enroll")
        method, handler = routes[path]
        if request.method != method:
            return json_error(405, "method_not_allowed", f"{path} takes {method}", headers=(("allow", method),))
        if handler is None:
            return Reply(200, b"ok\n", TEXT)
        now = datetime.now(timezone.utc).replace(microsecond=0)
        try:
            return await trio.to_thread.run_sync(handler, request.body, chain, now, limiter=self.workers)
        except CaError as exc:
            status = _STATUS.get(exc.code, 400 if isinstance(exc, InputError) else 403)
            if not isinstance(exc, (Refused, InputError)) and exc.code not in _STATUS:
                status = 500
            return json_error(status, exc.code, str(exc), decision="error" if status >= 500 else "refused")
        except Exception as exc:
            self.log.emit("error", "internal_error", path=path, detail=f"{type(exc).__name__}: {exc}")
            return json_error(500, "internal_error", "the CA failed to answer; see its log", decision="error")

    # --- handlers (worker threads; they sign with the newest state, e.g. right after a rotation) ---

    def _ready(self, body: bytes, chain, now: datetime) -> Reply:
        """200 while the index answers; 503 ``database_unavailable`` (with why) while it does not."""
        self.state.check_index()
        return Reply(200, f"ready: index {self.state.index}\n".encode(), TEXT)

    def _bundle_document(self) -> tuple[bytes, str]:
        """Our roots (bundle.pem) as a SPIFFE bundle."""
        return generations.spiffe_bundle(self.state), JSON

    def _crl_document(self) -> tuple[bytes, str]:
        """crl.pem as ``ca`` last wrote it."""
        return self.state.file(CRL).read_bytes(), PEM_FILE

    def _renew(self, body: bytes, chain, now: datetime) -> Reply:
        if not chain:
            raise Refused(
                "no client certificate: renewal is authenticated by the current certificate (mTLS)",
                code="no_client_cert",
            )
        csr = inspection.parse_csr(body)
        cert = enrollment.renew(self.state, self.current.issuer, chain, self.current.roots, csr, now=now)
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
        csr = inspection.parse_csr(request["csr"].encode("utf-8", "replace"))
        cert, _ = enrollment.enroll(self.state, self.current.issuer, request["token"], csr, now=now)
        return self._issued(cert)

    def _issued(self, cert: x509.Certificate) -> Reply:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        spiffe_id = san.get_values_for_type(x509.UniformResourceIdentifier)[0]
        return Reply(
            200, certificate_pem(cert, self.current.issuer.cert), PEM_CHAIN,
            log_fields=(
                ("decision", "issued"), ("spiffe_id", spiffe_id), ("serial", format_serial(cert.serial_number)),
                ("expires", format_time(cert.not_valid_after_utc)),
            ),
        )

    def _log_request(self, peer_addr: str, chain, request: Request | None, reply: Reply, seconds: float) -> None:
        """The ``request`` log line: who asked what, and the reply's ``decision`` and other ``log_fields``."""
        peer_id = peer_serial = None
        if chain:
            peer_serial = format_serial(chain[0].serial_number)
            try:
                san = chain[0].extensions.get_extension_for_class(x509.SubjectAlternativeName).value
                uris = san.get_values_for_type(x509.UniformResourceIdentifier)
                peer_id = uris[0] if len(uris) == 1 else None
            except (x509.ExtensionNotFound, ValueError):
                pass
        fields = dict(reply.log_fields)
        decision = fields.pop("decision", None)
        self.log.emit(
            "info" if reply.status < 400 else "warning" if reply.status < 500 else "error",
            "request",
            method=request.method if request else None,
            path=request.target if request else None,
            peer_addr=peer_addr, peer_id=peer_id, peer_serial=peer_serial, status=reply.status,
            decision=decision, duration_s=round(seconds, 6), **fields,
        )


def _conditional(read: Callable[[], tuple[bytes, str]], if_none_match: str | None) -> Reply:
    """(Worker thread.) Public data (``GET /v1/bundle``, ``/v1/crl``; no client certificate needed)
    with an ``ETag`` (a hash of the content): 304 without a body when the client already holds it."""
    try:
        body, content_type = read()
    except (OSError, CaError) as exc:
        return json_error(503, "unavailable", f"cannot read what to publish: {exc}", decision="error")
    etag = f'"{hashlib.sha256(body).hexdigest()[:32]}"'
    headers = (("etag", etag),)
    held = {tag.strip() for tag in (if_none_match or "").split(",")}
    if etag in held or "*" in held:
        return Reply(304, b"", content_type, headers, log_fields=(("decision", "not_modified"),))
    return Reply(200, body, content_type, headers, log_fields=(("decision", "published"),))


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
    trio.run(service.serve, sock)  # says ``ready`` once its signal handlers and accept loop are in place
    log.emit("info", "stopped")
    return 0
