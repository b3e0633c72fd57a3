"""Talking to ``ca serve``: ``proxy enroll`` (first certificate) and the sidecar's automatic renewal.

Theory of operation
-------------------
Transport: HTTPS on trio, built like the data path. pyOpenSSL (TLS 1.3 only) drives a non-blocking
socket directly (``TlsStream``, shared with ``ca.serve``), h11 frames the HTTP/1.1 request and
response. OpenSSL verifies the service's chain against our trust bundle; after the handshake the
service's leaf must be an X.509-SVID for ``spiffe://TD/ca`` (TD: our own trust domain when renewing;
for enrollment, where we have no identity yet, the bundle is the trust anchor and any ``/ca`` ID it
vouches for is the service). No HTTP request is sent to anything else.

Renewal (``Renewer.run``, started by ``Sidecar.serve`` when ``identity.renew`` is set):

- due at ``not_before + (at ± 5%) * lifetime``; the jitter is drawn once per certificate, so a
  fleet issued together does not renew together, and a re-check never moves the date;
- an attempt makes a NEW P-256 key and a CSR, POSTs it to ``/v1/renew`` authenticated by the
  current certificate (mTLS), and checks the answer exactly as a reload would (``load_credentials``
  on temporary files next to the real ones: same ID, chain to our bundle, key matches);
- install: key and certificate are each written to a temporary file (0600 for the key from its
  first byte, fsync) and renamed into place. Two renames are not one atomic step, so while they
  happen ``Renewer.writing`` is set and the sidecar's file watcher skips its poll; the renewer then
  calls ``Sidecar.reload("renewal")`` itself, once, which also re-stamps the files. The watcher
  therefore never sees a new key next to the old certificate (no spurious ``reload_failed``);
- a failed attempt is logged (``renew_failed``: URL, reason, next try) and counted
  (``sidecar_renewals_total{result="failed"}``); retries back off exponentially from ~2% of the
  lifetime (0.2-2 s) to at most 5% of it (1 s-5 min), each delay with 50-100% jitter. Once the
  certificate is past halfway from its renewal point to its expiry with the last attempt failed,
  ``readiness_problems`` reports it and ``/readyz`` answers 503, before the certificate expires.

Cancellation: ``Renewer.run`` runs until cancelled; a cancelled attempt leaves no temporary file
behind and never leaves the key and certificate files out of step (the renames run in a thread
that trio waits for, and ``writing`` is cleared in a ``finally``).
"""

from __future__ import annotations

import errno
import json
import os
import random
import secrets
import socket
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TextIO
from urllib.parse import urlsplit

import h11
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from OpenSSL import SSL, crypto

from proxy.config import Endpoint, IdentityConfig
from proxy.credentials import CredentialError, load_credentials, roughly
from proxy.identity import SERVER, NotSvid, SpiffeId, svid_id
from proxy.netutil import close_socket, connect
from proxy.tls import TLS13_CIPHERSUITES, x509_error_text

SERVICE_PATH = "/ca"  # the CA service's ID is spiffe://TD/ca (ca.operations.service_id)
REQUEST_TIMEOUT = 10.0  # seconds for connect + handshake + request + response
MAX_RESPONSE_BYTES = 1024 * 1024
RECEIVE_BYTES = 65536
RECHECK_INTERVAL = 1.0  # seconds: how often the renewer looks at the (possibly reloaded) certificate
JITTER = 0.05  # renewal point: at ± this fraction of the lifetime
MIN_GAP_FRACTION = 0.05  # after a renewal, the next one waits at least this much of the new lifetime
BACKOFF_FIRST = (0.02, 0.2, 2.0)  # first retry delay: this fraction of the lifetime, clamped to [min, max] s
BACKOFF_CAP = (0.05, 1.0, 300.0)  # longest retry delay, likewise
PEM_CHAIN = "application/pem-certificate-chain"


class ServiceError(Exception):
    """A request to the CA service did not yield a certificate.

    ``refused`` is True when the service answered (with ``status`` and, when it sent one, its JSON
    ``code``); False when it could not be reached, did not speak TLS/HTTP, or failed verification.
    """

    def __init__(self, detail: str, *, refused: bool = False, status: int | None = None, code: str | None = None):
        super().__init__(detail)
        self.detail = detail
        self.refused = refused
        self.status = status
        self.code = code


# --- TLS on a trio socket, for request/response traffic (shared with ca.serve) --------------------


class TlsStream:
    """A pyOpenSSL connection over a non-blocking stdlib socket, as a small trio byte stream.

    The pattern of ``proxy.handshake.TlsSocket``: OpenSSL reads and writes the socket itself and
    asks for readiness with WantRead/WantWrite. The caller owns ``sock``; ``aclose`` sends
    close_notify (best effort) and closes it. Cancellation leaves the connection unusable but
    never leaks the socket once ``aclose`` runs.
    """

    __slots__ = ("sock", "conn")

    def __init__(self, conn: SSL.Connection, sock: socket.socket):
        self.sock = sock
        self.conn = conn

    async def _retry(self, operation, *args):
        while True:
            try:
                return operation(*args)
            except SSL.WantReadError:
                await trio.lowlevel.wait_readable(self.sock)
            except SSL.WantWriteError:
                await trio.lowlevel.wait_writable(self.sock)

    async def handshake(self) -> None:
        await self._retry(self.conn.do_handshake)

    async def send_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            sent = await self._retry(self.conn.send, view[:16384].tobytes())
            view = view[sent:]

    async def receive_some(self, max_bytes: int = RECEIVE_BYTES) -> bytes:
        """Up to ``max_bytes``; b"" at the end of the stream (close_notify, or a TCP close)."""
        try:
            return await self._retry(self.conn.recv, max_bytes)
        except SSL.ZeroReturnError:
            return b""
        except SSL.SysCallError as exc:
            if exc.args and exc.args[0] in (-1, errno.ECONNRESET):
                return b""  # h11 then says whether the message was complete
            raise

    async def aclose(self) -> None:
        try:
            self.conn.shutdown()  # one close_notify; we do not wait for the peer's
        except (SSL.Error, OSError):
            pass
        close_socket(self.sock)


def ssl_failure_text(exc: Exception) -> str:
    if isinstance(exc, SSL.Error) and exc.args and isinstance(exc.args[0], list):
        reasons = [entry[2] for entry in exc.args[0] if len(entry) > 2 and entry[2]]
        if reasons:
            return "; ".join(reasons)
    if isinstance(exc, SSL.SysCallError):
        return "connection closed during the TLS handshake"
    return str(exc) or type(exc).__name__


def tls13_context() -> SSL.Context:
    """A TLS 1.3-only context with the settings of the data path (ciphersuites, no tickets, no compression)."""
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
    ctx.set_max_proto_version(SSL.TLS1_3_VERSION)
    ctx.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_NO_TICKET | SSL.OP_NO_RENEGOTIATION)
    ctx.set_tls13_ciphersuites(TLS13_CIPHERSUITES)
    return ctx


def _record_verify_error(conn: SSL.Connection, cert, errnum: int, depth: int, ok: int) -> bool:
    if not ok:
        notes = conn.get_app_data()
        if isinstance(notes, dict) and "verify_error" not in notes:
            notes["verify_error"] = f"{x509_error_text(errnum)} (chain depth {depth})"
    return bool(ok)


def client_context(
    roots: tuple[x509.Certificate, ...] | list[x509.Certificate],
    chain: tuple[x509.Certificate, ...] | None = None,
    key=None,
) -> SSL.Context:
    """TLS 1.3 client context: verifies the server against ``roots``; presents ``chain`` + ``key`` if given."""
    ctx = tls13_context()
    store = ctx.get_cert_store()
    for root in roots:
        store.add_cert(crypto.X509.from_cryptography(root))
    ctx.set_verify(SSL.VERIFY_PEER, _record_verify_error)
    if chain:
        ctx.use_certificate(chain[0])
        for intermediate in chain[1:]:
            ctx.add_extra_chain_cert(intermediate)
        ctx.use_privatekey(key)
        ctx.check_privatekey()
    return ctx


# --- the HTTPS client ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ServiceUrl:
    """``https://host:port[/prefix]`` of a CA service."""

    text: str
    endpoint: Endpoint
    prefix: str  # path before /v1/..., without a trailing slash

    @classmethod
    def parse(cls, text: str) -> ServiceUrl:
        try:
            parts = urlsplit(text)
            port = parts.port or 443
            host = parts.hostname
        except ValueError as exc:
            raise ValueError(f"{text!r} is not a URL: {exc}") from None
        if parts.scheme != "https" or not host:
            raise ValueError(f"{text!r} is not an https:// URL")
        if parts.query or parts.fragment:
            raise ValueError(f"{text!r}: the CA service URL takes no query or fragment")
        return cls(text, Endpoint("tcp", host=host, port=port), parts.path.rstrip("/"))

    @property
    def server_name(self) -> str | None:
        """SNI for DNS names only; an IP address is not a valid server_name."""
        host = self.endpoint.host
        try:
            socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
            return None
        except OSError:
            return host


@dataclass(frozen=True)
class Answer:
    status: int
    content_type: str
    body: bytes

    def error(self) -> tuple[str | None, str]:
        """(code, detail) from a JSON error body ``{"error": code, "detail": ...}``, else the text."""
        try:
            data = json.loads(self.body)
            return str(data.get("error")), str(data.get("detail") or data.get("error"))
        except (ValueError, AttributeError):
            text = self.body.decode("utf-8", "replace").strip()[:200]
            return None, text or f"HTTP {self.status} without a body"


async def post(
    url: ServiceUrl,
    path: str,
    body: bytes,
    content_type: str,
    ctx: SSL.Context,
    *,
    expect_trust_domain: str | None,
    timeout: float = REQUEST_TIMEOUT,
) -> Answer:
    """POST ``body`` to ``url`` + ``path`` over TLS 1.3 and return the answer.

    The server must present an X.509-SVID chaining to the context's roots whose ID is
    ``spiffe://TD/ca`` (TD = ``expect_trust_domain``, or any when None). Raises ServiceError
    (refused=False) for every failure before a complete answer: the message names the URL.
    """
    where = url.text
    with trio.move_on_after(timeout):
        try:
            sock = await connect(url.endpoint, timeout)
        except OSError as exc:
            raise ServiceError(f"cannot connect to {where}: {exc.strerror or exc}", code="unreachable") from None
        notes: dict = {}
        conn = SSL.Connection(ctx, sock)
        conn.set_app_data(notes)
        if url.server_name:
            conn.set_tlsext_host_name(url.server_name.encode("idna"))
        conn.set_connect_state()
        stream = TlsStream(conn, sock)
        try:
            try:
                await stream.handshake()
            except (SSL.Error, OSError) as exc:
                why = notes.get("verify_error")
                if why:
                    raise ServiceError(
                        f"{where} presented a certificate that does not verify against our trust bundle: {why}",
                        code="untrusted_service",
                    ) from None
                raise ServiceError(f"TLS handshake with {where} failed: {ssl_failure_text(exc)}",
                                   code="handshake_failed") from None
            _check_service_identity(conn, where, expect_trust_domain)
            return await _exchange(stream, url, path, body, content_type)
        except (SSL.Error, OSError) as exc:
            raise ServiceError(f"connection to {where} failed: {ssl_failure_text(exc)}",
                               code="connection_lost") from None
        except h11.ProtocolError as exc:
            raise ServiceError(f"{where} did not answer like HTTP/1.1: {exc}", code="bad_answer") from None
        finally:
            with trio.CancelScope(shield=True):
                await stream.aclose()
    raise ServiceError(f"no answer from {where} within {timeout:g}s", code="timeout")


def _check_service_identity(conn: SSL.Connection, where: str, trust_domain: str | None) -> SpiffeId:
    peer = conn.get_peer_certificate()
    if peer is None:
        raise ServiceError(f"{where} presented no certificate", code="untrusted_service")
    try:
        server_id = svid_id(peer.to_cryptography(), SERVER)
    except NotSvid as exc:
        raise ServiceError(f"{where} presented a certificate that is not an X.509-SVID: {exc}",
                           code="untrusted_service") from None
    domain_ok = trust_domain is None or server_id.trust_domain == trust_domain
    if server_id.path != SERVICE_PATH or not domain_ok:
        expected = f"spiffe://{trust_domain or 'TD'}{SERVICE_PATH}"
        raise ServiceError(f"{where} is {server_id}, not the CA service ({expected})", code="untrusted_service")
    return server_id


async def _exchange(stream: TlsStream, url: ServiceUrl, path: str, body: bytes, content_type: str) -> Answer:
    client = h11.Connection(h11.CLIENT)
    host = url.endpoint.host if url.endpoint.port == 443 else f"{url.endpoint}"
    request = h11.Request(
        method="POST",
        target=f"{url.prefix}{path}",
        headers=[
            ("host", host),
            ("content-type", content_type),
            ("content-length", str(len(body))),
            ("accept", f"{PEM_CHAIN}, application/json"),
            ("connection", "close"),
            ("user-agent", "mtls-sidecar-proxy"),
        ],
    )
    await stream.send_all(client.send(request) + client.send(h11.Data(data=body)) + client.send(h11.EndOfMessage()))
    response = None
    received = bytearray()
    while True:
        event = client.next_event()
        if event is h11.NEED_DATA:
            client.receive_data(await stream.receive_some())
            continue
        if isinstance(event, h11.Response):
            response = event
        elif isinstance(event, h11.Data):
            received += event.data
            if len(received) > MAX_RESPONSE_BYTES:
                raise ServiceError(f"{url.text} sent more than {MAX_RESPONSE_BYTES} bytes")
        elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
            break
    if response is None:
        raise ServiceError(f"{url.text} closed the connection without an answer")
    headers = {name.decode("ascii").lower(): value.decode("latin-1") for name, value in response.headers}
    return Answer(response.status_code, headers.get("content-type", ""), bytes(received))


# --- keys, CSRs, files ----------------------------------------------------------------------------


def new_key_and_csr() -> tuple[ec.EllipticCurvePrivateKey, bytes]:
    """A fresh P-256 key and a PEM CSR over it (empty subject: the CA decides the identity)."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(key, hashes.SHA256())
    return key, csr.public_bytes(serialization.Encoding.PEM)


def key_pem(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def write_temporary(path: Path, data: bytes, mode: int) -> Path:
    """``data`` in a new file next to ``path`` with ``mode`` from its first byte, fsynced; its name."""
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        temporary.unlink(missing_ok=True)
        raise
    os.close(fd)
    return temporary


def fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Temporary file (mode from the first byte), fsync, rename over ``path``, fsync the directory."""
    temporary = write_temporary(path, data, mode)
    try:
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def _chain_from(answer: Answer, where: str) -> list[x509.Certificate]:
    try:
        chain = x509.load_pem_x509_certificates(answer.body)
    except ValueError:
        chain = []
    if not chain:
        raise ServiceError(f"{where} answered 200 but sent no PEM certificate chain")
    return chain


def _same_key(cert: x509.Certificate, key) -> bool:
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    return cert.public_key().public_bytes(*spki) == key.public_key().public_bytes(*spki)


# --- proxy enroll ---------------------------------------------------------------------------------


def enroll_main(url: str, token: str, bundle: Path, out: Path, out_stream: TextIO, err_stream: TextIO) -> int:
    """``proxy enroll``: trade a one-time token for a first certificate; write OUT/cert.pem, key.pem, bundle.pem.

    Exit 0; 1 if the service refused (one line with its reason); 2 for bad input, or when the
    service cannot be reached or verified (one line naming the URL).
    """

    def fail(code: int, message: str) -> int:
        print(f"proxy enroll: {message}", file=err_stream)
        return code

    try:
        service = ServiceUrl.parse(url)
    except ValueError as exc:
        return fail(2, f"--url {exc}")
    try:
        bundle_data = bundle.read_bytes()
        roots = x509.load_pem_x509_certificates(bundle_data)
    except OSError as exc:
        return fail(2, f"cannot read --bundle {bundle}: {exc.strerror or exc}")
    except ValueError:
        return fail(2, f"--bundle {bundle} holds no PEM certificate")
    if out.exists() and not out.is_dir():
        return fail(2, f"--out {out} exists and is not a directory")
    key, csr_pem = new_key_and_csr()
    body = json.dumps({"token": token, "csr": csr_pem.decode("ascii")}).encode()
    ctx = client_context(roots)
    try:
        answer = trio.run(
            lambda: post(service, "/v1/enroll", body, "application/json", ctx, expect_trust_domain=None)
        )
    except ServiceError as exc:
        return fail(2, exc.detail)
    if answer.status != 200:
        code, detail = answer.error()
        answered = f"{answer.status} {code}" if code else str(answer.status)
        return fail(1, f"{url} refused the enrollment ({answered}): {detail}")
    try:
        chain = _chain_from(answer, url)
        spiffe_id = _check_issued(chain, key, roots, url)
    except ServiceError as exc:
        return fail(2, exc.detail)
    try:
        out.mkdir(mode=0o700, parents=True, exist_ok=True)
        pem = serialization.Encoding.PEM
        write_atomically(out / "key.pem", key_pem(key), mode=0o600)
        write_atomically(out / "cert.pem", b"".join(cert.public_bytes(pem) for cert in chain))
        write_atomically(out / "bundle.pem", bundle_data)
    except OSError as exc:
        return fail(2, f"enrolled at {url} but cannot write {exc.filename or out}: {exc.strerror or exc}")
    leaf = chain[0]
    print(
        f"enrolled {spiffe_id} (serial {leaf.serial_number:x}, expires "
        f"{leaf.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}) into {out}: cert.pem, key.pem (0600), bundle.pem",
        file=out_stream,
    )
    return 0


def _check_issued(chain: list[x509.Certificate], key, roots, where: str) -> SpiffeId:
    """The returned certificate must be an SVID over our key that chains to ``roots``."""
    leaf = chain[0]
    if not _same_key(leaf, key):
        raise ServiceError(f"{where} returned a certificate for another key than the one we sent")
    try:
        spiffe_id = svid_id(leaf)
    except NotSvid as exc:
        raise ServiceError(f"{where} returned a certificate that is not an X.509-SVID: {exc}") from None
    store = crypto.X509Store()
    for root in roots:
        store.add_cert(crypto.X509.from_cryptography(root))
    context = crypto.X509StoreContext(
        store, crypto.X509.from_cryptography(leaf), [crypto.X509.from_cryptography(c) for c in chain[1:]]
    )
    try:
        context.verify_certificate()
    except crypto.X509StoreContextError as exc:
        raise ServiceError(f"{where} returned a certificate that does not verify against the bundle: {exc}") from None
    return spiffe_id


# --- the sidecar's renewer ------------------------------------------------------------------------


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


class Renewer:
    """Keeps the sidecar's certificate renewed from ``identity.renew.url`` (see the module docstring)."""

    def __init__(self, sidecar, *, rng: random.Random | None = None, clock=time.time):
        self.sidecar = sidecar
        self.rng = rng or random.Random()
        self.clock = clock
        self.writing = False  # True while key.pem and cert.pem are being swapped: the watcher waits
        self.failures = 0  # failed attempts in a row, for the current certificate
        self.failing_since: float | None = None
        self.last_error: str | None = None
        self._failed_serial: int | None = None
        self._retry_at = 0.0
        self._not_before_next = 0.0  # no new attempt before this (after a success)
        self._jitter: dict[int, float] = {}

    # --- schedule ------------------------------------------------------------------------------

    def renewal_time(self, creds, at: float) -> float:
        """When ``creds``' certificate is due: ``at`` ± JITTER of its lifetime after not_before."""
        serial = creds.leaf.serial_number
        if serial not in self._jitter:
            self._jitter = {serial: self.rng.uniform(-JITTER, JITTER)}  # forget older certificates
        start = creds.not_before.timestamp()
        lifetime = creds.not_after.timestamp() - start
        fraction = min(max(at + self._jitter[serial], 0.01), 0.98)
        return start + fraction * lifetime

    def _backoff(self, lifetime: float) -> float:
        fraction, low, high = BACKOFF_FIRST
        first = min(max(lifetime * fraction, low), high)
        fraction, low, high = BACKOFF_CAP
        cap = min(max(lifetime * fraction, low), high)
        delay = min(cap, first * 2 ** (self.failures - 1))
        return delay * self.rng.uniform(0.5, 1.0)

    def readiness_problems(self, now: float) -> list[str]:
        """Not ready once renewal has failed past halfway from the renewal point to expiry."""
        gen = self.sidecar.generation
        renew, creds = gen.config.identity.renew, gen.creds
        if renew is None or self.failing_since is None or self._failed_serial != creds.leaf.serial_number:
            return []
        due = self.renewal_time(creds, renew.at)
        expires = creds.not_after.timestamp()
        if now < due + (expires - due) / 2:
            return []
        left = roughly(creds.not_after - datetime.fromtimestamp(now, timezone.utc))
        return [
            f"certificate renewal failing since {_iso(self.failing_since)} ({self.failures} attempts; last: "
            f"{self.last_error}); certificate expires in {left}"
        ]

    # --- the task ------------------------------------------------------------------------------

    async def run(self) -> None:
        """Renew whenever due, for as long as the sidecar runs (until cancelled)."""
        while True:
            gen = self.sidecar.generation
            renew = gen.config.identity.renew
            if renew is None:  # a reload removed it
                await trio.sleep(RECHECK_INTERVAL)
                continue
            creds = gen.creds
            now = self.clock()
            if self._failed_serial == creds.leaf.serial_number:
                due = self._retry_at
            else:
                due = max(self.renewal_time(creds, renew.at), self._not_before_next)
            if now < due:
                await trio.sleep(min(due - now, RECHECK_INTERVAL))
                continue
            await self.attempt(gen)

    async def attempt(self, gen) -> bool:
        """One renewal: request, check, install, reload. Never raises (but Cancelled)."""
        renew, creds = gen.config.identity.renew, gen.creds
        started = self.clock()
        lifetime = creds.not_after.timestamp() - creds.not_before.timestamp()
        log, metrics = self.sidecar.log, self.sidecar.metrics
        try:
            try:
                new_serial, not_after = await self._renew(gen)
            except ServiceError:
                raise
            except Exception as exc:  # a bug or an unexpected OS error: this attempt fails, the sidecar runs on
                raise ServiceError(f"internal error: {type(exc).__name__}: {exc}", code="internal_error") from exc
        except ServiceError as exc:
            self.failures = self.failures + 1 if self._failed_serial == creds.leaf.serial_number else 1
            self._failed_serial = creds.leaf.serial_number
            if self.failures == 1:
                self.failing_since = started
            self.last_error = exc.detail
            delay = self._backoff(lifetime)
            self._retry_at = self.clock() + delay
            metrics.renewals.labels("failed").inc()
            reason = exc.code or ("refused" if exc.refused else "failed")
            log.emit(
                "error", "renew_failed", url=renew.url, reason=reason,
                detail=exc.detail, spiffe_id=str(creds.spiffe_id), serial=f"{creds.leaf.serial_number:x}",
                attempt=self.failures, retry_in_s=round(delay, 3),
                expires_in_s=round(creds.not_after.timestamp() - self.clock(), 3),
            )
            return False
        self.failures = 0
        self.failing_since = None
        self.last_error = None
        self._failed_serial = None
        self._not_before_next = self.clock() + MIN_GAP_FRACTION * max(not_after - self.clock(), 0.0)
        metrics.renewals.labels("ok").inc()
        log.emit(
            "info", "renewed", url=renew.url, spiffe_id=str(creds.spiffe_id),
            previous_serial=f"{creds.leaf.serial_number:x}", serial=f"{new_serial:x}",
            expires=_iso(not_after), duration_s=round(self.clock() - started, 3),
        )
        return True

    async def _renew(self, gen) -> tuple[int, float]:
        identity: IdentityConfig = gen.config.identity
        creds = gen.creds
        try:
            service = ServiceUrl.parse(identity.renew.url)
        except ValueError as exc:
            raise ServiceError(str(exc), code="bad_url") from None
        key, csr_pem = await trio.to_thread.run_sync(new_key_and_csr)
        ctx = client_context(creds.bundle, creds.cert_chain, creds.key)
        answer = await post(
            service, "/v1/renew", csr_pem, "application/pkcs10", ctx,
            expect_trust_domain=creds.spiffe_id.trust_domain,
        )
        if answer.status != 200:
            code, detail = answer.error()
            raise ServiceError(f"{service.text} answered {answer.status}: {detail}", refused=True,
                               status=answer.status, code=code)
        chain = _chain_from(answer, service.text)
        if not _same_key(chain[0], key):
            raise ServiceError(f"{service.text} returned a certificate for another key than the one we sent",
                               code="bad_answer")
        pem = serialization.Encoding.PEM
        cert_data = b"".join(cert.public_bytes(pem) for cert in chain)
        staged = await trio.to_thread.run_sync(self._stage, identity, cert_data, key_pem(key), creds.spiffe_id)
        if not await self._install_and_reload(staged):
            raise ServiceError("the renewed certificate was written but the reload failed (see reload_failed)",
                               code="reload_failed")
        leaf = chain[0]
        return leaf.serial_number, leaf.not_valid_after_utc.timestamp()

    @staticmethod
    def _stage(identity: IdentityConfig, cert_data: bytes, key_data: bytes, spiffe_id: SpiffeId):
        """Write both files next to their final names and validate them as a reload would (thread)."""
        try:
            cert_tmp = write_temporary(identity.cert, cert_data, 0o644)
        except OSError as exc:
            raise ServiceError(f"cannot write next to {identity.cert}: {exc.strerror or exc}",
                               code="write_failed") from None
        try:
            key_tmp = write_temporary(identity.key, key_data, 0o600)
        except OSError as exc:
            cert_tmp.unlink(missing_ok=True)
            raise ServiceError(f"cannot write next to {identity.key}: {exc.strerror or exc}",
                               code="write_failed") from None
        staged = IdentityConfig(cert_tmp, key_tmp, identity.bundle, identity.crl, identity.renew)
        try:
            creds = load_credentials(staged)
            if creds.spiffe_id != spiffe_id:
                raise CredentialError([f"the CA returned a certificate for {creds.spiffe_id}, not {spiffe_id}"])
        except CredentialError as exc:
            cert_tmp.unlink(missing_ok=True)
            key_tmp.unlink(missing_ok=True)
            raise ServiceError("the renewed certificate does not load: " + "; ".join(exc.problems),
                               code="bad_answer") from None
        return identity, cert_tmp, key_tmp

    async def _install_and_reload(self, staged) -> bool:
        """Rename key and certificate into place, then reload once; the watcher waits meanwhile."""
        identity, cert_tmp, key_tmp = staged

        def swap() -> None:
            try:
                os.replace(key_tmp, identity.key)
                os.replace(cert_tmp, identity.cert)
            finally:
                key_tmp.unlink(missing_ok=True)
                cert_tmp.unlink(missing_ok=True)
            for directory in {identity.key.parent, identity.cert.parent}:
                fsync_directory(directory)

        self.writing = True
        try:
            with trio.CancelScope(shield=True):  # never leave the two files out of step
                try:
                    await trio.to_thread.run_sync(swap)
                except OSError as exc:
                    raise ServiceError(f"cannot replace {exc.filename}: {exc.strerror or exc}",
                                       code="write_failed") from None
            return self.sidecar.reload("renewal")  # re-stamps the files: the watcher sees no change
        finally:
            self.writing = False
