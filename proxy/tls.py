"""TLS contexts built from credentials, and the verify callback that decides inside the handshake.

Theory of operation
-------------------
OpenSSL verifies the peer's chain against our bundle and calls ``_verify`` once per certificate,
from the root down to the leaf. The first error it reports (expired, unknown CA, wrong purpose...)
is recorded on the connection's ``PeerCheck`` and the handshake is aborted, which makes OpenSSL
send a fatal alert to the peer. When the leaf itself arrives with the chain verified, we apply our
own rules: the CRL serials we loaded, the X.509-SVID profile, then the listener's policy. Refusing
there, inside the handshake, means the peer receives a fatal alert instead of a silent close, and
no byte of application data is ever exchanged with a peer we have not authorized.

One pair of contexts exists per credential generation; a reload builds new ones and swaps them in,
so connections that already exist keep the SSL objects (and certificates) they started with.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509
from OpenSSL import SSL, crypto
from OpenSSL._util import ffi as _ffi
from OpenSSL._util import lib as _lib

from mtls import reasons
from mtls.spiffe import NotSvid, SpiffeId, svid_id
from mtls.tlsio import TLS13_CIPHERSUITES, x509_error_text

MAX_CHAIN_DEPTH = 4

# OpenSSL X509_V_ERR_* codes that map to our reason codes; anything else is untrusted_ca.
_X509_ERROR_REASONS = {
    9: reasons.NOT_YET_VALID,  # X509_V_ERR_CERT_NOT_YET_VALID
    10: reasons.EXPIRED,  # X509_V_ERR_CERT_HAS_EXPIRED
    23: reasons.REVOKED,  # X509_V_ERR_CERT_REVOKED
    26: reasons.NOT_SVID,  # X509_V_ERR_INVALID_PURPOSE (wrong extendedKeyUsage)
    66: reasons.NOT_SVID,  # X509_V_ERR_EE_KEY_TOO_SMALL
}


class PeerCheck:
    """What the verify callback learned about one peer. Lives exactly as long as its connection.

    ``authorize`` is the listener's policy as it was when the connection was accepted.
    """

    __slots__ = (
        "role", "authorize", "revoked_serials", "audit", "failure", "peer_id", "decision", "serial", "not_after",
        "resumed",
    )

    def __init__(
        self,
        role: str,
        authorize: Callable[[SpiffeId], reasons.Decision],
        revoked_serials: frozenset[int],
        audit: bool = False,
    ):
        self.role = role  # CLIENT when the peer is a client (inbound), SERVER when it is a server
        self.authorize = authorize
        self.revoked_serials = revoked_serials
        self.audit = audit
        self.failure: tuple[str, str] | None = None  # (reason code, detail)
        self.peer_id: SpiffeId | None = None
        self.decision: reasons.Decision | None = None
        self.serial: int | None = None
        self.not_after: datetime | None = None
        self.resumed = False

    def check_resumed(self, cert: x509.Certificate, now: datetime) -> bool:
        """A resumed session skipped the certificate exchange: check its stored peer certificate again."""
        if now >= cert.not_valid_after_utc:
            return self.fail(reasons.EXPIRED, "peer certificate has expired")
        if now < cert.not_valid_before_utc:
            return self.fail(reasons.NOT_YET_VALID, "peer certificate is not yet valid")
        self.resumed = True
        return self.check_leaf(cert)

    def fail(self, reason: str, detail: str) -> bool:
        if self.failure is None:
            self.failure = (reason, detail)
        return False

    def check_leaf(self, cert: x509.Certificate) -> bool:
        self.serial = cert.serial_number
        self.not_after = cert.not_valid_after_utc
        if cert.serial_number in self.revoked_serials:
            return self.fail(reasons.REVOKED, f"certificate serial {cert.serial_number:x} is listed on the CRL")
        try:
            peer_id = svid_id(cert, self.role)
        except NotSvid as exc:
            return self.fail(reasons.NOT_SVID, str(exc))
        self.peer_id = peer_id
        decision = self.authorize(peer_id)
        self.decision = decision
        if decision.allowed or self.audit:
            return True
        return self.fail(decision.reason or reasons.IDENTITY_NOT_ALLOWED, decision.detail)


# The X509_V_ERR_* code we leave on the store context when *we* refuse a leaf; OpenSSL turns it
# into the fatal alert the peer receives (ssl_x509err2alert): handshake_failure for a policy
# refusal, bad_certificate for a non-SVID, certificate_revoked for a CRL hit.
_X509_V_ERR_CERT_REJECTED = 28
_X509_V_ERR_CERT_REVOKED = 23
_X509_V_ERR_APPLICATION_VERIFICATION = 50
_REFUSAL_X509_ERRORS = {
    reasons.REVOKED: _X509_V_ERR_CERT_REVOKED,
    reasons.NOT_SVID: _X509_V_ERR_CERT_REJECTED,
}


def _verify(ok: int, store_ctx) -> int:
    """OpenSSL verify callback (installed with SSL_CTX_set_verify, not pyOpenSSL's wrapper).

    pyOpenSSL's wrapper cannot set the store context's error, so a refusal of ours would reach
    the peer as an ``internal_error`` alert; here we set a meaningful X509_V_ERR_* first.
    """
    check: PeerCheck | None = None
    try:
        ssl = _lib.X509_STORE_CTX_get_ex_data(store_ctx, _lib.SSL_get_ex_data_X509_STORE_CTX_idx())
        check = SSL.Connection._reverse_mapping[ssl].get_app_data()
        depth = _lib.X509_STORE_CTX_get_error_depth(store_ctx)
        if not ok:
            errno = _lib.X509_STORE_CTX_get_error(store_ctx)
            reason = _X509_ERROR_REASONS.get(errno, reasons.UNTRUSTED_CA)
            where = "peer certificate" if depth == 0 else f"certificate at chain depth {depth}"
            check.fail(reason, f"{where}: {x509_error_text(errno)}")
            return 0
        if depth != 0:
            return 1
        raw = _lib.X509_STORE_CTX_get_current_cert(store_ctx)
        _lib.X509_up_ref(raw)
        if check.check_leaf(crypto.X509._from_raw_x509_ptr(raw).to_cryptography()):
            return 1
        reason = check.failure[0] if check.failure else reasons.HANDSHAKE_FAILED
        _lib.X509_STORE_CTX_set_error(
            store_ctx, _REFUSAL_X509_ERRORS.get(reason, _X509_V_ERR_APPLICATION_VERIFICATION)
        )
        return 0
    except Exception as exc:  # never let an exception cross into OpenSSL: fail closed
        if check is not None:
            check.fail(reasons.HANDSHAKE_FAILED, f"internal error while verifying the peer: {exc!r}")
        _lib.X509_STORE_CTX_set_error(store_ctx, _X509_V_ERR_APPLICATION_VERIFICATION)
        return 0


_verify_callback = _ffi.callback("int (*)(int, X509_STORE_CTX *)", _verify)


@dataclass(frozen=True)
class TlsContexts:
    """The server and client contexts of one credential generation."""

    server: SSL.Context
    client: SSL.Context


def _base_context(creds, verify_mode: int, *, tickets: bool = False) -> SSL.Context:
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
    ctx.set_max_proto_version(SSL.TLS1_3_VERSION)
    ctx.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_NO_RENEGOTIATION | (0 if tickets else SSL.OP_NO_TICKET))
    ctx.set_mode(SSL.MODE_RELEASE_BUFFERS)
    ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    ctx.set_tls13_ciphersuites(TLS13_CIPHERSUITES)
    ctx.use_certificate(creds.cert_chain[0])
    for intermediate in creds.cert_chain[1:]:
        ctx.add_extra_chain_cert(intermediate)
    ctx.use_privatekey(creds.key)
    ctx.check_privatekey()
    store = ctx.get_cert_store()
    for root in creds.bundle:
        store.add_cert(crypto.X509.from_cryptography(root))
    _lib.SSL_CTX_set_verify(ctx._context, verify_mode, _verify_callback)
    ctx.set_verify_depth(MAX_CHAIN_DEPTH)
    return ctx


def session_lifetime(creds, configured: float, now: datetime) -> int:
    """Seconds a resumable session may live: never past our own certificate's expiry."""
    remaining = (creds.not_after - now).total_seconds()
    return max(0, int(min(configured, remaining)))


def build_contexts(creds, resumption_lifetime: int = 0) -> TlsContexts:
    """Server context (client certificate required) and client context from loaded credentials.

    ``resumption_lifetime`` > 0 lets the server issue TLS 1.3 session tickets valid that long.
    The tickets are sealed with a key OpenSSL generates for this context alone, so building new
    contexts (every reload: new certificate, bundle, CRL or policy) invalidates every ticket
    issued before. A resumed peer skips the certificate exchange, so the handshake code checks
    the certificate stored in the session again (``PeerCheck.check_resumed``).
    """
    server = _base_context(
        creds, SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, tickets=resumption_lifetime > 0
    )
    server.set_session_id(b"mtls-sidecar")
    if resumption_lifetime > 0:
        server.set_timeout(resumption_lifetime)
    client = _base_context(creds, SSL.VERIFY_PEER, tickets=resumption_lifetime > 0)
    return TlsContexts(server=server, client=client)
