"""The sidecar's HTTPS client for ``ca serve`` (renewal and enrollment), and the keys it sends.

Transport: ``mtls.tlsio`` (TLS 1.3, OpenSSL on the socket), h11 frames the HTTP/1.1 request and
response. OpenSSL verifies the service's chain against our trust bundle; after the handshake the
service's leaf must be an X.509-SVID for ``spiffe://TD/ca`` (TD: our own trust domain when renewing;
for enrollment, where we have no identity yet, the bundle is the trust anchor and any ``/ca`` ID it
vouches for is the service). No HTTP request is sent to anything else.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import partial
from urllib.parse import urlsplit

import h11
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from OpenSSL import SSL

from mtls.endpoints import Endpoint, server_name_for
from mtls.httpserve import PEM_CHAIN, next_event
from mtls.reasons import NOT_SVID
from mtls.sockets import connect
from mtls.spiffe import SERVER, SpiffeId
from mtls.tlsio import TlsStream, present, ssl_error_text, tls13_context, trust
from mtls.trust import TrustStore, VerifyError, x509_error_text

SERVICE_PATH = "/ca"  # the CA service's ID is spiffe://TD/ca (ca.issuance.service_id)
REQUEST_TIMEOUT = 10.0  # seconds for connect + handshake + request + response
MAX_RESPONSE_BYTES = 1024 * 1024


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
    trust(ctx, roots)
    ctx.set_verify(SSL.VERIFY_PEER, _record_verify_error)
    if chain:
        present(ctx, chain, key)
    return ctx


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
        return server_name_for(self.endpoint.host)


@dataclass(frozen=True)
class Answer:
    status: int
    content_type: str
    body: bytes
    etag: str | None = None

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
    request = _Request("POST", path, body, (("content-type", content_type), ("accept", f"{PEM_CHAIN}, application/json")))
    return await _ask(url, request, ctx, partial(_check_service_identity, trust_domain=expect_trust_domain), timeout)


async def get(
    url: ServiceUrl,
    path: str,
    ctx: SSL.Context,
    *,
    expect_id: SpiffeId,
    etag: str | None = None,
    timeout: float = REQUEST_TIMEOUT,
) -> Answer:
    """GET ``url`` + ``path`` over TLS 1.3 from a server whose X.509-SVID (chaining to the context's
    roots) is ``expect_id``; with ``etag``, a 304 answer means the content is unchanged. Raises
    ServiceError as ``post`` does."""
    headers = (("if-none-match", etag),) if etag else ()
    return await _ask(url, _Request("GET", path, b"", headers), ctx, partial(_check_exact_identity, expected=expect_id),
                      timeout)


@dataclass(frozen=True)
class _Request:
    method: str
    path: str
    body: bytes
    headers: tuple[tuple[str, str], ...]


async def _ask(url: ServiceUrl, request: _Request, ctx: SSL.Context, check_identity, timeout: float) -> Answer:
    """One request over a new TLS 1.3 connection, after ``check_identity(conn, where)`` accepted the server."""
    where = url.text
    with trio.move_on_after(timeout):
        try:
            sock = await connect(url.endpoint, timeout)
        except OSError as exc:
            raise ServiceError(f"cannot connect to {where}: {exc.strerror or exc}", code="unreachable") from None
        notes: dict = {}  # _record_verify_error's
        stream = TlsStream(ctx, sock, server_side=False, server_name=url.server_name, app_data=notes)
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
                raise ServiceError(f"TLS handshake with {where} failed: {ssl_error_text(exc)}",
                                   code="handshake_failed") from None
            check_identity(stream.conn, where)
            return await _exchange(stream, url, request)
        except (SSL.Error, OSError) as exc:
            raise ServiceError(f"connection to {where} failed: {ssl_error_text(exc)}",
                               code="connection_lost") from None
        except h11.ProtocolError as exc:
            raise ServiceError(f"{where} did not answer like HTTP/1.1: {exc}", code="bad_answer") from None
        finally:
            with trio.CancelScope(shield=True):
                await stream.aclose()
    raise ServiceError(f"no answer from {where} within {timeout:g}s", code="timeout")


def _check_service_identity(conn: SSL.Connection, where: str, trust_domain: str | None) -> SpiffeId:
    """The service's chain, as OpenSSL verified it against our bundle, must pass the shared verifier's
    rules, and its leaf must name the CA service of ``trust_domain`` (any trust domain when None)."""
    server_id = _verified_server_id(conn, where)
    domain_ok = trust_domain is None or server_id.trust_domain == trust_domain
    if server_id.path != SERVICE_PATH or not domain_ok:
        expected = f"spiffe://{trust_domain or 'TD'}{SERVICE_PATH}"
        raise ServiceError(f"{where} is {server_id}, not the CA service ({expected})", code="untrusted_service")
    return server_id


def _check_exact_identity(conn: SSL.Connection, where: str, expected: SpiffeId) -> SpiffeId:
    server_id = _verified_server_id(conn, where)
    if server_id != expected:
        raise ServiceError(f"{where} is {server_id}, not {expected}", code="untrusted_service")
    return server_id


def _verified_server_id(conn: SSL.Connection, where: str) -> SpiffeId:
    """The ID of the server's chain, as OpenSSL verified it against the context's roots, once it
    passed the shared verifier's rules."""
    chain = conn.get_verified_chain(as_cryptography=True)
    if not chain:
        raise ServiceError(f"{where} presented no certificate", code="untrusted_service")
    try:
        # The root OpenSSL ended at is one of our bundle's; the ID's trust domain is checked below.
        rules = TrustStore.for_leaf(chain[0], chain[-1:], role=SERVER)
        server_id = rules.check_path(chain, role=SERVER, now=datetime.now(timezone.utc)).spiffe_id
    except VerifyError as exc:
        what = "that is not an X.509-SVID" if exc.reason == NOT_SVID else "we do not accept"
        raise ServiceError(f"{where} presented a certificate {what}: {exc.detail}", code="untrusted_service") from None
    return server_id


async def _exchange(stream: TlsStream, url: ServiceUrl, request: _Request) -> Answer:
    client = h11.Connection(h11.CLIENT)
    host = url.endpoint.host if url.endpoint.port == 443 else f"{url.endpoint}"
    head = h11.Request(
        method=request.method,
        target=f"{url.prefix}{request.path}",
        headers=[
            ("host", host),
            *request.headers,
            ("content-length", str(len(request.body))),
            ("connection", "close"),
            ("user-agent", "mtls-sidecar-proxy"),
        ],
    )
    data = client.send(head)
    if request.body:
        data += client.send(h11.Data(data=request.body))
    await stream.send_all(data + client.send(h11.EndOfMessage()))
    response = None
    received = bytearray()
    while True:
        event = await next_event(stream, client)
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
    return Answer(response.status_code, headers.get("content-type", ""), bytes(received), headers.get("etag"))


def new_key_and_csr() -> tuple[ec.EllipticCurvePrivateKey, bytes]:
    """A fresh P-256 key and a PEM CSR over it (empty subject: the CA decides the identity)."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(key, hashes.SHA256())
    return key, csr.public_bytes(serialization.Encoding.PEM)


def key_pem(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def chain_from(answer: Answer, where: str) -> list[x509.Certificate]:
    try:
        chain = x509.load_pem_x509_certificates(answer.body)
    except ValueError:
        chain = []
    if not chain:
        raise ServiceError(f"{where} answered 200 but sent no PEM certificate chain")
    return chain


def same_key(cert: x509.Certificate, key) -> bool:
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    return cert.public_key().public_bytes(*spki) == key.public_key().public_bytes(*spki)
