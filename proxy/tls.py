"""TLS contexts built from credentials, and the verify callback that decides inside the handshake.

Theory of operation
-------------------
OpenSSL verifies the peer's chain against our bundle and calls ``_verify`` once per certificate,
from the root down to the leaf. The first error it reports (expired, unknown CA, wrong purpose...)
is recorded on the connection's ``PeerCheck`` and the handshake is aborted, which makes OpenSSL
send a fatal alert to the peer. When the leaf itself arrives with the chain verified, we apply the
trust store's rules to the path OpenSSL built (``mtls.trust``: the X.509-SVID profile, the leaf's
trust domain against the root's, each certificate against its issuer's CRL), then the listener's
policy. Refusing there, inside the handshake, means the peer receives a fatal alert instead of a
silent close, and no byte of application data is ever exchanged with a peer we have not authorized.

A peer that connects again with the same certificates gets the same verdict from the trust store's
rules, so the verdict is remembered per trust store, path and role (``_known_paths``; for resumed
sessions, per leaf and role, ``_resumed_leaves``): validity at the time of the handshake, CRL
freshness and the listener's policy are still checked on every handshake.

One pair of contexts exists per credential generation; a reload builds new ones and swaps them in,
so connections that already exist keep the SSL objects (and certificates) they started with.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from OpenSSL import SSL
from OpenSSL._util import ffi as _ffi
from OpenSSL._util import lib as _lib

from mtls import reasons
from mtls.spiffe import SpiffeId
from mtls.tlsio import present, tls13_context, trust
from mtls.trust import (
    MAX_INTERMEDIATES,
    IssuerCrls,
    TrustStore,
    VerifyError,
    chain_of,
    crl_stale_detail,
    validity,
)
from proxy.config import IdentityConfig

_GRACE_SETTING = "identity.crl_grace"
_SHARED_ISSUERS_MAX = 1024
_RESUMED_LEAVES_MAX = 1024
_KNOWN_PATHS_MAX = 1024


@dataclass(frozen=True, slots=True)
class CrlFreshness:
    """What a handshake does when a CRL of an issuer on the peer's path is past its next update by
    more than ``grace`` (``identity.crl_grace``): ``refuse`` it (``crl_stale``) or let it through,
    marked, to be counted. ``file`` is ``identity.crl``, for the message."""

    file: Path | None = None
    grace: timedelta = timedelta(hours=1)
    refuse: bool = True

    @classmethod
    def of(cls, identity: IdentityConfig) -> CrlFreshness:
        """What ``identity.crl``, ``identity.crl_grace`` and ``identity.crl_stale`` ask for."""
        return cls(identity.crl, timedelta(seconds=identity.crl_grace), identity.crl_stale == "refuse")

    def stale(self, trust: TrustStore, path: Sequence[x509.Certificate] | None, now: datetime) -> str | None:
        """Why the CRLs for ``path`` (None: any, for a resumed session) are too old to rely on at ``now``,
        or None (one comparison while every CRL is fresh: ``TrustStore.crl_stale``)."""
        return trust.crl_stale(path, now, self.grace, source=self.file, grace_setting=_GRACE_SETTING)

    def detail(self, found: IssuerCrls, now: datetime) -> str:
        """What ``stale`` says when it is the CRLs ``found`` that are too old."""
        return crl_stale_detail(found, now, self.grace, source=self.file, grace_setting=_GRACE_SETTING)


def _as_kept(leaf: x509.Certificate) -> x509.Certificate:
    """``leaf`` parsed anew from its DER: the same certificate without the extensions cryptography
    parsed and cached on it while the handshake checked it (about 2.5 KiB, which an idle connection
    would otherwise hold for its whole life)."""
    return x509.load_der_x509_certificate(leaf.public_bytes(Encoding.DER))


_shared_issuers: dict[x509.Certificate, x509.Certificate] = {}


def _shared(issuer: x509.Certificate) -> x509.Certificate:
    """One parsed copy of each CA certificate found on verified paths, for every connection whose path
    holds it: an idle connection then keeps its own leaf only, not a copy of its intermediates and root.
    Only verified paths come here, so it holds the CAs of trusted trust domains; bounded all the same."""
    if len(_shared_issuers) >= _SHARED_ISSUERS_MAX:
        _shared_issuers.clear()
    return _shared_issuers.setdefault(issuer, issuer)


# Paths that passed a trust store's own rules (``identify`` and ``check_vouched``), per store (the
# entry goes with the store, which a reload replaces), by (path, role): the ID and the copy of the
# path a connection keeps (leaf without parsed extensions, shared issuers). These rules depend on the
# certificates, the role and the store alone, except for time: a path seen again is checked for
# validity at the time of its handshake, and CRL freshness and the policy are asked every time.
_known_paths: weakref.WeakKeyDictionary[TrustStore, dict] = weakref.WeakKeyDictionary()


def _paths_known_to(trust: TrustStore) -> dict[tuple, tuple[SpiffeId, tuple[x509.Certificate, ...]]]:
    paths = _known_paths.get(trust)
    if paths is None:
        paths = _known_paths[trust] = {}
    return paths


# Leaves of resumed sessions that passed the X.509-SVID profile, by (certificate, role): the ID it
# names and its copy to keep (``_as_kept``). The profile depends on the certificate's bytes and the
# role alone, so a peer resuming again and again is not parsed and checked again each time; its
# validity at the time of each handshake still is. Bounded like ``_shared_issuers``.
_resumed_leaves: dict[tuple[x509.Certificate, str], tuple[SpiffeId, x509.Certificate]] = {}


class PeerCheck:
    """What the verify callback learned about one peer. Lives exactly as long as its connection.

    ``authorize`` is the listener's policy and ``trust`` the bundles and CRLs (``Credentials.trust``),
    both as they were when the connection was accepted. ``path`` is the peer's verified chain, leaf
    first (None for a resumed session), which a reload can check again with the new trust store.
    """

    __slots__ = (
        "role", "authorize", "trust", "audit", "crl_freshness", "failure", "peer_id", "decision", "serial",
        "not_after", "resumed", "path", "stale_crl", "leaf",
    )

    def __init__(
        self,
        role: str,
        authorize: Callable[[SpiffeId], reasons.Decision],
        trust: TrustStore,
        audit: bool = False,
        crl_freshness: CrlFreshness = CrlFreshness(),
    ):
        self.role = role  # CLIENT when the peer is a client (inbound), SERVER when it is a server
        self.authorize = authorize
        self.trust = trust
        self.audit = audit
        self.crl_freshness = crl_freshness
        self.stale_crl: str | None = None  # why the CRLs were too old, when crl_stale: warn let the peer through
        self.leaf: x509.Certificate | None = None  # the peer's leaf as presented, verified or not (for denials)
        self.failure: tuple[str, str] | None = None  # (reason code, detail)
        self.peer_id: SpiffeId | None = None
        self.decision: reasons.Decision | None = None
        self.serial: int | None = None
        self.not_after: datetime | None = None
        self.resumed = False
        self.path: tuple[x509.Certificate, ...] | None = None

    def fail(self, reason: str, detail: str) -> bool:
        if self.failure is None:
            self.failure = (reason, detail)
        return False

    def refused_by_openssl(self, code: int, depth: int, chain: Sequence[x509.Certificate]) -> None:
        """OpenSSL refused the chain with X509_V_ERR_* ``code`` at ``depth``: record why, in our words.

        OpenSSL checks name constraints after it showed us the leaf, so ``check_path`` may have
        accepted an ID that is refused now: it was not verified after all.
        """
        error = self.trust.refusal(code, depth, chain, role=self.role)
        self.peer_id = self.path = None
        if chain and self.leaf is None:
            self.leaf = chain[0]
        self.fail(error.reason, error.detail)

    def check_path(self, path: Sequence[x509.Certificate], now: datetime) -> bool:
        """The chain OpenSSL verified (leaf first): the trust store's rules (``TrustStore.check_path``),
        with the listener's policy asked between ``identify`` and ``check_vouched``, so that an ID this
        port does not allow is refused for that (the refusal names the port's rules) whatever its
        chain, and an allowed one, or any in audit mode, must still be vouched for by its own trust domain."""
        self._note(path[0])
        known_paths = _paths_known_to(self.trust)
        known = known_paths.get((tuple(path), self.role))
        if known is not None and all(validity(cert, now) is None for cert in path):
            peer_id, kept = known
        else:
            kept = None
        try:
            if kept is None:
                peer_id = self.trust.identify(path, role=self.role, now=now)
            stale = self.crl_freshness.stale(self.trust, path, now)
            if stale is not None:
                if self.crl_freshness.refuse:
                    return self.fail(reasons.CRL_STALE, stale)
                self.stale_crl = stale
            if not self._authorize(peer_id):
                return False
            if kept is None:
                self.trust.check_vouched(peer_id, path)
        except VerifyError as exc:
            self.peer_id = None  # not vouched for: no verified ID to log
            return self.fail(exc.reason, exc.detail)
        if kept is None:
            kept = (_as_kept(path[0]), *map(_shared, path[1:]))
            if len(known_paths) >= _KNOWN_PATHS_MAX:
                known_paths.clear()
            known_paths[kept, self.role] = (peer_id, kept)
        self.leaf = kept[0]
        self.path = kept
        return True

    def check_resumed(self, cert: x509.Certificate, now: datetime) -> bool:
        """A resumed session skipped the certificate exchange: check its stored peer certificate again.

        The session's ticket was sealed by a context of this same generation, so its chain was
        verified against this same trust store; what may have changed since is the time.
        """
        self._note(cert)
        known = _resumed_leaves.get((cert, self.role))
        if known is not None and validity(cert, now) is None:
            peer_id, kept = known
        else:
            try:
                peer_id = self.trust.check_leaf(cert, role=self.role, now=now)
            except VerifyError as exc:
                return self.fail(exc.reason, exc.detail)
            kept = _as_kept(cert)
            if len(_resumed_leaves) >= _RESUMED_LEAVES_MAX:
                _resumed_leaves.clear()
            _resumed_leaves[kept, self.role] = (peer_id, kept)  # kept as key too: no parsed extensions
        stale = self.crl_freshness.stale(self.trust, None, now)
        if stale is not None:
            if self.crl_freshness.refuse:
                return self.fail(reasons.CRL_STALE, stale)
            self.stale_crl = stale
        self.resumed = True
        if not self._authorize(peer_id):
            return False
        self.leaf = kept
        return True

    def _note(self, leaf: x509.Certificate) -> None:
        self.leaf = leaf
        self.serial = leaf.serial_number
        self.not_after = leaf.not_valid_after_utc

    def _authorize(self, peer_id: SpiffeId) -> bool:
        self.peer_id = peer_id
        decision = self.authorize(peer_id)
        self.decision = decision
        if decision.allowed or self.audit:
            return True
        return self.fail(decision.reason or reasons.IDENTITY_NOT_ALLOWED, decision.detail)


# The X509_V_ERR_* code we leave on the store context when *we* refuse a leaf; OpenSSL turns it
# into the fatal alert the peer receives (ssl_x509err2alert): handshake_failure for a policy
# refusal, bad_certificate for a non-SVID, certificate_revoked for a CRL hit, unknown_ca for a
# chain whose root does not vouch for the leaf's trust domain.
_X509_V_ERR_CERT_NOT_YET_VALID = 9
_X509_V_ERR_CERT_HAS_EXPIRED = 10
_X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY = 20
_X509_V_ERR_CRL_HAS_EXPIRED = 12
_X509_V_ERR_CERT_REVOKED = 23
_X509_V_ERR_CERT_REJECTED = 28
_X509_V_ERR_APPLICATION_VERIFICATION = 50
_REFUSAL_X509_ERRORS = {
    reasons.NOT_YET_VALID: _X509_V_ERR_CERT_NOT_YET_VALID,
    reasons.EXPIRED: _X509_V_ERR_CERT_HAS_EXPIRED,
    reasons.UNTRUSTED_CA: _X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY,
    reasons.REVOKED: _X509_V_ERR_CERT_REVOKED,
    reasons.NOT_SVID: _X509_V_ERR_CERT_REJECTED,
    reasons.CRL_STALE: _X509_V_ERR_CRL_HAS_EXPIRED,
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
            check.refused_by_openssl(_lib.X509_STORE_CTX_get_error(store_ctx), depth, chain_of(store_ctx))
            return 0
        if depth != 0:
            return 1
        if check.check_path(chain_of(store_ctx), datetime.now(timezone.utc)):
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
    ctx = tls13_context(tickets=tickets)
    ctx.set_mode(SSL.MODE_RELEASE_BUFFERS)  # idle relayed connections hold no TLS buffers
    present(ctx, creds.cert_chain, creds.key)
    trust(ctx, creds.trust.roots)  # every trusted trust domain's; the verifier binds each root to its own
    _lib.SSL_CTX_set_verify(ctx._context, verify_mode, _verify_callback)
    ctx.set_verify_depth(MAX_INTERMEDIATES)
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
