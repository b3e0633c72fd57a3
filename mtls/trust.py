"""Trust domains, their roots, the CRLs of their CAs, and THE verifier of certificate chains.

Theory of operation
-------------------
Every chain the project accepts (a peer in the sidecar's handshake, our own identity files in
``proxy check``, a certificate from enrollment, a chain given to ``ca verify``) passes two steps:

1. **The path.** OpenSSL builds a path from the leaf, through the intermediates it came with, to a
   root of one of the bundles, and checks signatures, CA flags, pathlen, key usage, name constraints
   (our intermediates may only name IDs of their own trust domain), purpose and critical
   extensions. In a handshake the TLS engine does this itself; ``build_path`` does it offline with
   the same OpenSSL, times unchecked (the caller's ``now`` decides those in step 2). An OpenSSL
   refusal becomes a reason code and a sentence in one place, ``refusal``.
2. **Our rules.** ``TrustStore.check_path`` on the path: ``identify`` (every certificate valid at
   ``now``; the leaf an X.509-SVID; no certificate on the path listed by a CRL of *its* issuer),
   then ``check_vouched`` (the leaf's trust domain has a bundle, and the path ends at a root of
   *that* bundle: a root vouches only for its own trust domain). The handshake asks the listener's
   policy between the two (``proxy.tls.PeerCheck``).

CRLs are bound when a store is built: a CRL counts only for the CA whose name and key signed it, and
only when that CA is a root or chains to one; the CA then serves the root's trust domain. A CRL of
another CA (another trust domain's, say) revokes nothing on a path it is not the issuer of.

A store is immutable and built once per reload, so a handshake does only lookups here. Pure: no
files, no clock (the caller passes ``now``); OpenSSL is used as a library, never for I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from types import MappingProxyType

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from OpenSSL import crypto
from OpenSSL._util import ffi as _ffi
from OpenSSL._util import lib as _lib

from mtls.durations import format_duration, roughly
from mtls.reasons import EXPIRED, NOT_SVID, NOT_YET_VALID, REVOKED, UNTRUSTED_CA
from mtls.spiffe import (
    CLIENT,
    SERVER,
    InvalidSpiffeId,
    NotSvid,
    SpiffeId,
    parse_spiffe_id,
    svid_id,
)

MAX_INTERMEDIATES = 4  # CA certificates between a leaf and its root
DEFAULT_CRL_GRACE = timedelta(hours=1)  # how long past its next update a CRL is still relied on, everywhere

# X509_V_FLAG_NO_CHECK_TIME from OpenSSL's x509_vfy.h; pyOpenSSL has no name for it.
_NO_CHECK_TIME = 0x200000
# What OpenSSL checks the leaf (and each CA's extendedKeyUsage) for, as in a TLS handshake.
_PURPOSES = {CLIENT: _lib.X509_PURPOSE_SSL_CLIENT, SERVER: _lib.X509_PURPOSE_SSL_SERVER}

# X509_V_ERR_* codes (OpenSSL's x509_vfy.h) that get a sentence of their own.
_UNABLE_TO_GET_ISSUER_CERT = 2
_CERT_SIGNATURE_FAILURE = 7
_CERT_NOT_YET_VALID = 9
_CERT_HAS_EXPIRED = 10
_DEPTH_ZERO_SELF_SIGNED_CERT = 18
_SELF_SIGNED_CERT_IN_CHAIN = 19
_UNABLE_TO_GET_ISSUER_CERT_LOCALLY = 20
_UNABLE_TO_VERIFY_LEAF_SIGNATURE = 21
_CERT_REVOKED = 23
_PATH_LENGTH_EXCEEDED = 25
_INVALID_PURPOSE = 26
_KEYUSAGE_NO_CERTSIGN = 32
_UNHANDLED_CRITICAL_EXTENSION = 34
_NAME_CONSTRAINT_ERRORS = (47, 48, 49, 51, 52, 53)  # permitted/excluded violation, unsupported forms
_EE_KEY_TOO_SMALL = 66
_INVALID_CA = 79
_NO_ISSUER = (_UNABLE_TO_GET_ISSUER_CERT, _UNABLE_TO_GET_ISSUER_CERT_LOCALLY, _UNABLE_TO_VERIFY_LEAF_SIGNATURE)
# Refusals that are about the leaf itself, when OpenSSL reports them at depth 0.
_LEAF_REFUSALS = (_INVALID_PURPOSE, _UNHANDLED_CRITICAL_EXTENSION, _EE_KEY_TOO_SMALL)


class VerifyError(Exception):
    """A chain we do not accept. ``reason`` is a reason code (mtls.reasons), ``detail`` one sentence.

    ``x509`` is set when OpenSSL refused the path, for messages that quote it.
    """

    def __init__(self, reason: str, detail: str, x509_failure: X509Failure | None = None):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.x509 = x509_failure


@dataclass(frozen=True)
class X509Failure:
    """OpenSSL's refusal of a path: its X509_V_ERR_* code and text, at which depth, on which certificate."""

    code: int
    text: str
    depth: int
    certificate: x509.Certificate | None


@dataclass(frozen=True)
class VerifiedPath:
    spiffe_id: SpiffeId  # of the leaf
    path: tuple[x509.Certificate, ...]  # leaf first, the root of the leaf's trust domain last


@dataclass(frozen=True)
class Revoked:
    """A certificate on a path that a CRL of its issuer lists."""

    position: int  # on the path: 0 for the leaf
    certificate: x509.Certificate
    crl: x509.CertificateRevocationList
    entry: x509.RevokedCertificate

    @property
    def detail(self) -> str:
        try:
            reason = self.entry.extensions.get_extension_for_class(x509.CRLReason).value.reason.value
        except x509.ExtensionNotFound:
            reason = "unspecified"
        return (
            f"{describe(self.certificate, self.position)} was revoked at "
            f"{_time(self.entry.revocation_date_utc)} ({reason})"
        )


@dataclass(frozen=True)
class IssuerCrls:
    """The bound CRLs of one CA (serving one trust domain), with what freshness and rollback checks need.

    ``newest`` is the CRL with the highest CRL number (the last one when none has a number): its
    ``next_update`` says until when the CA vouches for this list, its ``number`` orders it.
    """

    trust_domain: str
    issuer: x509.Name
    signer_key: bytes  # the issuer's public key (DER SubjectPublicKeyInfo): a new CA of the same name is another
    serials: frozenset[int]
    crls: tuple[x509.CertificateRevocationList, ...]
    newest: x509.CertificateRevocationList

    @property
    def number(self) -> int | None:
        return crl_number(self.newest)

    @property
    def next_update(self) -> datetime | None:
        return self.newest.next_update_utc

    @property
    def issuer_name(self) -> str:
        return self.issuer.rfc4514_string()

    def due_before(self, moment: datetime) -> bool:
        """The CA's next update was due before ``moment`` (never, for a CRL with no next update)."""
        return self.next_update is not None and self.next_update < moment


class TrustStore:
    """The roots of each trust domain, and the CRLs bound to the CAs that signed them.

    ``bundles`` maps a trust domain to its roots (several during a CA rotation). ``crls`` are
    candidates: each is bound to the root, or to the CA of ``authorities`` (intermediates that came
    with a certificate or a CRL file) that chains to a root, whose name and key signed it; the
    others end up in ``rejected_crls``. Raises ValueError for a root listed under two trust domains.
    ``holder`` names who trusts these bundles in a refusal ("this sidecar trusts example.org").
    """

    def __init__(
        self,
        bundles: Mapping[str, Iterable[x509.Certificate]],
        *,
        crls: Iterable[x509.CertificateRevocationList] = (),
        authorities: Iterable[x509.Certificate] = (),
        holder: str = "this verifier",
    ):
        self.holder = holder
        self.bundles: Mapping[str, tuple[x509.Certificate, ...]] = MappingProxyType(
            {trust_domain: tuple(roots) for trust_domain, roots in bundles.items()}
        )
        domain_of_root: dict[x509.Certificate, str] = {}
        for trust_domain, roots in self.bundles.items():
            for root in roots:
                other = domain_of_root.setdefault(root, trust_domain)
                if other != trust_domain:
                    raise ValueError(
                        f"root {_name(root.subject)} is in the bundles of both {other} and {trust_domain}"
                    )
        self.roots = tuple(domain_of_root)
        self._domain_of_root = domain_of_root
        signers = [*domain_of_root.items(), *self._chained_authorities(list(authorities))]
        self._known_keys = {ca: _issuer_key(ca) for ca, _ in signers}  # so a handshake need not compute them
        accepted, rejected = [], []
        by_issuer: dict[tuple[str, bytes, bytes], list[x509.CertificateRevocationList]] = {}
        for crl in crls:
            bound = {(trust_domain, *self._key(ca)) for ca, trust_domain in signers if _signed_crl(crl, ca)}
            (accepted if bound else rejected).append(crl)
            for key in bound:
                by_issuer.setdefault(key, []).append(crl)
        self.crls = tuple(accepted)
        self.rejected_crls = tuple(rejected)
        self._by_issuer = {
            key: IssuerCrls(
                key[0], found[0].issuer, key[2], frozenset(entry.serial_number for crl in found for entry in crl),
                tuple(found), max(found, key=lambda crl: crl_number(crl) or 0),
            )
            for key, found in by_issuer.items()
        }
        due = [found.next_update for found in self._by_issuer.values() if found.next_update is not None]
        # Before this moment no bound CRL is past its next update: a handshake then needs one comparison.
        self.crls_fresh_until: datetime | None = min(due) if due else None

    def _chained_authorities(self, authorities: list[x509.Certificate]) -> list[tuple[x509.Certificate, str]]:
        """The CA certificates of ``authorities`` that chain to a root, each with the root's trust domain."""
        found = []
        for ca in authorities:
            if ca in self._domain_of_root or not _is_ca(ca):
                continue
            try:
                path = build_path(ca, authorities, self.roots)
            except VerifyError:
                continue
            found.append((ca, self._domain_of_root[path[-1]]))
        return found

    # --- lookups -------------------------------------------------------------------------------

    @property
    def revoked_serials(self) -> frozenset[int]:
        """Every serial any bound CRL lists, whoever issued it: a count for people, not a decision."""
        return frozenset().union(*(found.serials for found in self._by_issuer.values()))

    def crls_for(self, issuer: x509.Certificate, trust_domain: str) -> tuple[x509.CertificateRevocationList, ...]:
        """The bound CRLs of ``issuer`` (matched by name and key) serving ``trust_domain``."""
        found = self._by_issuer.get((trust_domain, *self._key(issuer)))
        return found.crls if found else ()

    @property
    def issuer_crls(self) -> tuple[IssuerCrls, ...]:
        """The bound CRLs grouped by the CA (and trust domain) they are bound to."""
        return tuple(self._by_issuer.values())

    def stale_crl(self, path: Sequence[x509.Certificate] | None, expired_before: datetime) -> IssuerCrls | None:
        """The CRLs of an issuer on a verified ``path`` (leaf's issuer first; None: of any issuer, for a
        resumed session) whose next update is before ``expired_before`` (the caller's now minus its
        grace), or None. Costs one comparison while every bound CRL is fresh."""
        if self.crls_fresh_until is None or expired_before <= self.crls_fresh_until:
            return None
        if path is None:
            issuers = list(self._by_issuer.values())
        else:
            trust_domain = self._domain_of_root.get(path[-1])
            issuers = [self._by_issuer.get((trust_domain, *self._key(ca))) for ca in path[1:]]
        for found in issuers:
            if found is not None and found.due_before(expired_before):
                return found
        return None

    def crl_stale(
        self, path: Sequence[x509.Certificate] | None, now: datetime, grace: timedelta, *, source: object,
        grace_setting: str,
    ) -> str | None:
        """The ``crl_stale`` verdict on a verified ``path`` at ``now``: the detail of the refusal when
        the CRLs of an issuer on it (None: of any issuer) are past their next update by more than
        ``grace``, else None. The sidecar's handshake, ``proxy check`` and ``ca verify`` all decide
        with this; ``source`` (the CRL file) and ``grace_setting`` (what set the grace) are for the words."""
        found = self.stale_crl(path, now - grace)
        if found is None:
            return None
        return crl_stale_detail(found, now, grace, source=source, grace_setting=grace_setting)

    def revocations(self, path: Sequence[x509.Certificate]) -> list[Revoked]:
        """Every certificate of a verified ``path`` (leaf first) that a CRL of its own issuer lists."""
        trust_domain = self._domain_of_root.get(path[-1])
        if not self._by_issuer or trust_domain is None:
            return []
        found = []
        for position, cert in enumerate(path[:-1]):
            crls = self._by_issuer.get((trust_domain, *self._key(path[position + 1])))
            if crls is None or cert.serial_number not in crls.serials:
                continue
            for crl in crls.crls:
                entry = crl.get_revoked_certificate_by_serial_number(cert.serial_number)
                if entry is not None:
                    found.append(Revoked(position, cert, crl, entry))
                    break
        return found

    def _key(self, ca: x509.Certificate) -> tuple[bytes, bytes]:
        known = self._known_keys.get(ca)
        return known if known is not None else _issuer_key(ca)

    # --- the verifier ----------------------------------------------------------------------------

    def verify(
        self,
        leaf: x509.Certificate,
        intermediates: Sequence[x509.Certificate],
        *,
        role: str | None,
        now: datetime,
    ) -> VerifiedPath:
        """Build the path of ``leaf`` (with the ``intermediates`` it came with) and apply our rules.

        ``role`` is CLIENT or SERVER (what the leaf must be allowed to authenticate as), or None.
        Raises VerifyError.
        """
        try:
            path = build_path(leaf, intermediates, self.roots, role=role)
        except VerifyError as exc:
            raise self._naming_missing_bundle(exc, leaf) from None
        return self.check_path(path, role=role, now=now)

    def check_path(self, path: Sequence[x509.Certificate], *, role: str | None, now: datetime) -> VerifiedPath:
        """Our rules for a ``path`` OpenSSL verified (leaf first, root last): ``identify``, then
        ``check_vouched``. Raise VerifyError."""
        spiffe_id = self.identify(path, role=role, now=now)
        self.check_vouched(spiffe_id, path)
        return VerifiedPath(spiffe_id, tuple(path))

    def identify(self, path: Sequence[x509.Certificate], *, role: str | None, now: datetime) -> SpiffeId:
        """The SPIFFE ID of a verified ``path``'s leaf, if our rules for the certificates hold, in this
        order: the length of the path; each one's validity at ``now``, leaf first; the X.509-SVID
        profile of the leaf; no certificate revoked by its issuer's CRL, leaf first. Raise VerifyError.

        The handshake asks the listener's policy about this ID before ``check_vouched``, so that an
        ID the port does not allow is refused for that, whatever root its chain ends at.
        """
        if len(path) - 2 > MAX_INTERMEDIATES:
            raise VerifyError(
                UNTRUSTED_CA, f"the chain has {len(path) - 2} intermediates; at most {MAX_INTERMEDIATES} are accepted"
            )
        for position, cert in enumerate(path):
            _check_validity(cert, position, now)
        spiffe_id = _svid(path[0], role)
        revoked = self.revocations(path)
        if revoked:
            raise VerifyError(REVOKED, revoked[0].detail)
        return spiffe_id

    def check_vouched(self, spiffe_id: SpiffeId, path: Sequence[x509.Certificate]) -> None:
        """Raise VerifyError (untrusted_ca) unless ``path`` ends at a root of the bundle of the trust
        domain of ``spiffe_id``, the ID of its leaf: a root vouches only for its own trust domain."""
        claimed = spiffe_id.trust_domain
        if claimed not in self.bundles:
            raise VerifyError(UNTRUSTED_CA, self._no_bundle(claimed))
        root = path[-1]
        vouching = self._domain_of_root.get(root)
        if vouching is None:
            raise VerifyError(
                UNTRUSTED_CA, f"the chain of {spiffe_id} ends at {_name(root.subject)}, which is in no trusted bundle"
            )
        if vouching != claimed:
            raise VerifyError(
                UNTRUSTED_CA,
                f"{spiffe_id} is in trust domain {claimed}, but its chain ends at {_name(root.subject)}, a root "
                f"of trust domain {vouching}; a root vouches only for its own trust domain",
            )

    @staticmethod
    def check_leaf(leaf: x509.Certificate, *, role: str | None, now: datetime) -> SpiffeId:
        """Our rules for a leaf whose path passed ``check_path`` with this same store before (a resumed
        TLS session): only time can have changed, so validity at ``now`` and the X.509-SVID profile."""
        _check_validity(leaf, 0, now)
        return _svid(leaf, role)

    def refusal(self, code: int, depth: int, chain: Sequence[x509.Certificate], *, role: str | None) -> VerifyError:
        """``refusal`` for this store's roots, naming the trust domain when the leaf's has no bundle."""
        error = refusal(code, depth, chain, role=role, roots=self.roots)
        return self._naming_missing_bundle(error, chain[0]) if chain else error

    def _no_bundle(self, trust_domain: str) -> str:
        trusted = ", ".join(sorted(self.bundles)) or "no trust domain"
        return f"no bundle for trust domain {trust_domain}; {self.holder} trusts {trusted}"

    def _naming_missing_bundle(self, error: VerifyError, leaf: x509.Certificate) -> VerifyError:
        """A chain that does not verify from a trust domain we have no bundle for: say that instead."""
        if error.reason != UNTRUSTED_CA:
            return error
        claimed = claimed_trust_domain(leaf)
        if claimed is None or claimed in self.bundles:
            return error
        return VerifyError(UNTRUSTED_CA, self._no_bundle(claimed), error.x509)

    @classmethod
    def for_leaf(
        cls,
        leaf: x509.Certificate,
        roots: Iterable[x509.Certificate],
        *,
        crls: Iterable[x509.CertificateRevocationList] = (),
        authorities: Iterable[x509.Certificate] = (),
        role: str | None = None,
    ) -> TrustStore:
        """A store for a tool handed one bundle that names no trust domain (``ca verify --bundle FILE``,
        ``proxy enroll --bundle``): its roots are taken as those of the trust domain ``leaf`` names.
        Raises VerifyError (not_svid) when the leaf names none."""
        trust_domain = claimed_trust_domain(leaf)
        if trust_domain is None:
            _svid(leaf, role)  # raises, saying why
            raise VerifyError(NOT_SVID, "the certificate names no SPIFFE ID")
        return cls({trust_domain: roots}, crls=crls, authorities=authorities)


def crl_stale_detail(
    found: IssuerCrls, now: datetime, grace: timedelta, *, source: object, grace_setting: str
) -> str:
    """Why the CRLs ``found`` (past their next update by more than ``grace`` at ``now``) refuse new
    handshakes: the one sentence every verifier gives for ``crl_stale``."""
    due = found.next_update
    return (
        f"the CRL in {source} from '{found.issuer_name}' expired {roughly(now - due)} ago (next update was due at "
        f"{_time(due)}, {grace_setting} is {format_duration(grace.total_seconds())}); without a current CRL a "
        "revoked peer cannot be told apart: deliver a fresh CRL (ca crl)"
    )


# --- the path, by OpenSSL ------------------------------------------------------------------------


def build_path(
    leaf: x509.Certificate,
    intermediates: Sequence[x509.Certificate],
    roots: Sequence[x509.Certificate],
    *,
    role: str | None = None,
) -> tuple[x509.Certificate, ...]:
    """The path OpenSSL builds from ``leaf`` to one of ``roots`` (leaf first), times unchecked.

    ``role`` (CLIENT/SERVER) makes OpenSSL check purposes as the TLS handshake does. Raises
    VerifyError from ``refusal``.
    """
    store = crypto.X509Store()
    for root in roots:
        store.add_cert(crypto.X509.from_cryptography(root))
    store.set_flags(_NO_CHECK_TIME)
    if role is not None:
        _lib.X509_STORE_set_purpose(store._store, _PURPOSES[role])
    target = crypto.X509.from_cryptography(leaf)
    untrusted = [crypto.X509.from_cryptography(cert) for cert in intermediates]
    stack = _ffi.gc(_lib.sk_X509_new_null(), _lib.sk_X509_free)  # borrows the certificates above
    for cert in untrusted:
        _lib.sk_X509_push(stack, cert._x509)
    store_ctx = _ffi.gc(_lib.X509_STORE_CTX_new(), _lib.X509_STORE_CTX_free)
    if store_ctx == _ffi.NULL or _lib.X509_STORE_CTX_init(store_ctx, store._store, target._x509, stack) != 1:
        raise MemoryError("OpenSSL could not set up a certificate verification")
    verified = _lib.X509_verify_cert(store_ctx) == 1
    chain = chain_of(store_ctx)
    if verified:
        return tuple(chain)
    code = _lib.X509_STORE_CTX_get_error(store_ctx)
    depth = _lib.X509_STORE_CTX_get_error_depth(store_ctx)
    raise refusal(code, depth, chain, role=role, roots=roots)


def chain_of(store_ctx) -> list[x509.Certificate]:
    """The path an OpenSSL X509_STORE_CTX holds (leaf first; partial while it is still being verified)."""
    stack = _lib.X509_STORE_CTX_get1_chain(store_ctx)
    if stack == _ffi.NULL:
        return []
    try:
        return [
            crypto.X509._from_raw_x509_ptr(_lib.sk_X509_value(stack, i)).to_cryptography()
            for i in range(_lib.sk_X509_num(stack))
        ]
    finally:
        _lib.sk_X509_free(stack)  # the certificates now belong to the X509 objects above


def x509_error_text(code: int) -> str:
    """OpenSSL's text for an X509_V_ERR_* code (``certificate has expired``)."""
    return _ffi.string(_lib.X509_verify_cert_error_string(code)).decode("ascii", "replace")


def refusal(
    code: int,
    depth: int,
    chain: Sequence[x509.Certificate],
    *,
    role: str | None,
    roots: Sequence[x509.Certificate],
) -> VerifyError:
    """OpenSSL's X509_V_ERR_* ``code`` at ``depth`` of ``chain`` (what it had built, leaf first) as
    a reason code and a sentence naming the certificate. ``roots`` are what the chain was checked
    against; ``role`` as in ``build_path``."""
    text = x509_error_text(code)
    cert = chain[depth] if depth < len(chain) else None
    failure = X509Failure(code, text, depth, cert)
    if cert is None:
        return VerifyError(UNTRUSTED_CA, f"certificate at chain depth {depth}: {text}", failure)
    described = describe(cert, depth)
    reason, detail = UNTRUSTED_CA, f"{described}: {text}"
    if code == _CERT_HAS_EXPIRED:
        reason, detail = EXPIRED, _validity_detail(cert, depth, EXPIRED)
    elif code == _CERT_NOT_YET_VALID:
        reason, detail = NOT_YET_VALID, _validity_detail(cert, depth, NOT_YET_VALID)
    elif code == _CERT_REVOKED:
        reason = REVOKED
    elif depth == 0 and code in _LEAF_REFUSALS:
        reason, detail = NOT_SVID, _leaf_refusal(cert, code, role, text)
    elif code in _NO_ISSUER:
        shown = ", ".join(_name(root.subject) for root in roots[:3]) or "no root"
        more = f" and {len(roots) - 3} more" if len(roots) > 3 else ""
        detail = (
            f"{described} was issued by {_name(cert.issuer)}, which does not chain to a trusted root "
            f"(bundle holds {shown}{more})"
        )
    elif code == _CERT_SIGNATURE_FAILURE:
        detail = f"the signature of {described} does not verify with the key of its issuer {_name(cert.issuer)}"
    elif code in (_DEPTH_ZERO_SELF_SIGNED_CERT, _SELF_SIGNED_CERT_IN_CHAIN):
        detail = f"{described} is self-signed and not a root of the bundle"
    elif code in (_INVALID_CA, _KEYUSAGE_NO_CERTSIGN):
        detail = _not_a_ca(cert, described) or detail
    elif code == _PATH_LENGTH_EXCEEDED:
        basic = _extension(cert, x509.BasicConstraints)
        if basic is not None and basic.path_length is not None:
            detail = (
                f"{described} allows {basic.path_length} intermediate(s) below it (pathlen), the chain has {depth - 1}"
            )
    elif code == _INVALID_PURPOSE:
        detail = f"{described} may not issue certificates for {role} authentication (extendedKeyUsage)"
    elif code == _UNHANDLED_CRITICAL_EXTENSION:
        detail = _critical_extensions(cert, described) or detail
    elif code in _NAME_CONSTRAINT_ERRORS:
        detail = _name_constraints(chain, depth) or detail
    return VerifyError(reason, detail, failure)


def _leaf_refusal(leaf: x509.Certificate, code: int, role: str | None, text: str) -> str:
    """Why the X.509-SVID rules refuse a leaf OpenSSL refused for ``code``, in their words."""
    if code == _UNHANDLED_CRITICAL_EXTENSION:
        return _critical_extensions(leaf, describe(leaf, 0)) or f"{describe(leaf, 0)}: {text}"
    try:
        svid_id(leaf, role)
    except NotSvid as exc:
        return str(exc)
    return f"{describe(leaf, 0)}: {text}"


def _not_a_ca(cert: x509.Certificate, described: str) -> str | None:
    basic = _extension(cert, x509.BasicConstraints)
    if basic is None or not basic.ca:
        return f"{described} is not a CA (basicConstraints CA:TRUE missing)"
    usage = _extension(cert, x509.KeyUsage)
    if usage is not None and not usage.key_cert_sign:
        return f"{described} may not sign certificates (keyUsage lacks keyCertSign)"
    return None


def _critical_extensions(cert: x509.Certificate, described: str) -> str | None:
    try:
        unknown = [
            ext.oid.dotted_string
            for ext in cert.extensions
            if ext.critical and isinstance(ext.value, x509.UnrecognizedExtension)
        ]
    except (ValueError, x509.DuplicateExtension):
        return None
    if not unknown:
        return None
    return f"{described} has an unsupported critical extension {', '.join(unknown)}"


def _name_constraints(chain: Sequence[x509.Certificate], depth: int) -> str | None:
    """Which CA above ``chain[depth]`` constrains its names, and which of its names that is."""
    cert = chain[depth]
    try:
        san = _extension(cert, x509.SubjectAlternativeName)
    except (ValueError, x509.DuplicateExtension):
        san = None
    names = []
    if san is not None:
        names = [_uri_host(uri) for uri in san.get_values_for_type(x509.UniformResourceIdentifier)]
        names += san.get_values_for_type(x509.DNSName)
    for position in range(depth + 1, len(chain)):
        constraints = _extension(chain[position], x509.NameConstraints)
        if constraints is None:
            continue
        permitted = [str(tree.value) for tree in constraints.permitted_subtrees or ()]
        excluded = [str(tree.value) for tree in constraints.excluded_subtrees or ()]
        rules = "; ".join(
            [f"permit only {', '.join(permitted)}"] * bool(permitted) + [f"exclude {', '.join(excluded)}"] * bool(excluded)
        )
        shown = ", ".join(f"'{name}'" for name in names) or "the names of this certificate"
        return f"{describe(chain[position], position)} may not issue for {shown} (name constraints {rules})"
    return None


def _uri_host(uri: str) -> str:
    authority = uri.partition("://")[2]
    for stop in "/?#":
        authority = authority.partition(stop)[0]
    return authority.rpartition("@")[2].partition(":")[0].lower()


# --- our rules, one by one ---------------------------------------------------------------------


def validity(cert: x509.Certificate, now: datetime) -> str | None:
    """EXPIRED or NOT_YET_VALID when ``now`` is outside ``cert``'s validity, else None."""
    if now < cert.not_valid_before_utc:
        return NOT_YET_VALID
    if now > cert.not_valid_after_utc:
        return EXPIRED
    return None


def _check_validity(cert: x509.Certificate, position: int, now: datetime) -> None:
    reason = validity(cert, now)
    if reason is not None:
        raise VerifyError(reason, _validity_detail(cert, position, reason))


def _validity_detail(cert: x509.Certificate, position: int, reason: str) -> str:
    if reason == EXPIRED:
        return f"{describe(cert, position)} expired at {_time(cert.not_valid_after_utc)}"
    return f"{describe(cert, position)} is not valid before {_time(cert.not_valid_before_utc)}"


def _svid(leaf: x509.Certificate, role: str | None) -> SpiffeId:
    try:
        return svid_id(leaf, role)
    except NotSvid as exc:
        raise VerifyError(NOT_SVID, str(exc)) from None


def claimed_trust_domain(cert: x509.Certificate) -> str | None:
    """The trust domain of the SPIFFE ID ``cert`` names, read before anything about it is checked
    (to say which bundle it needs); None when it names none."""
    try:
        san = _extension(cert, x509.SubjectAlternativeName)
    except (ValueError, x509.DuplicateExtension):
        return None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier) if san is not None else []
    if len(uris) != 1:
        return None
    try:
        return parse_spiffe_id(uris[0]).trust_domain
    except InvalidSpiffeId:
        return None


def describe(cert: x509.Certificate, position: int) -> str:
    """How a sentence names the certificate at ``position`` of a path (0: the leaf)."""
    if position == 0:
        uri = claimed_uri(cert)
        named = f" ({uri})" if uri else ""
        return f"certificate serial {cert.serial_number:x}{named}"
    return f"{'CA certificate' if _is_ca(cert) else 'certificate'} {_name(cert.subject)}"


def claimed_uri(cert: x509.Certificate) -> str | None:
    try:
        san = _extension(cert, x509.SubjectAlternativeName)
    except (ValueError, x509.DuplicateExtension):
        return None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier) if san is not None else []
    return uris[0] if len(uris) == 1 else None


# --- small helpers ------------------------------------------------------------------------------


def _extension(cert: x509.Certificate, kind: type) -> object | None:
    try:
        return cert.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        basic = _extension(cert, x509.BasicConstraints)
    except (ValueError, x509.DuplicateExtension):
        return False
    return basic is not None and basic.ca


def _issuer_key(ca: x509.Certificate) -> tuple[bytes, bytes]:
    """A CA as CRLs are bound to it: its name and its public key."""
    spki = ca.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return ca.subject.public_bytes(), spki


def _signed_crl(crl: x509.CertificateRevocationList, ca: x509.Certificate) -> bool:
    """``ca`` signed ``crl``: same name, a valid signature by its key, and (if it has a keyUsage) cRLSign."""
    if crl.issuer != ca.subject:
        return False
    usage = _extension(ca, x509.KeyUsage)
    if usage is not None and not usage.crl_sign:
        return False
    try:
        return crl.is_signature_valid(ca.public_key())
    except (TypeError, ValueError, UnsupportedAlgorithm, InvalidSignature):
        return False


def crl_number(crl: x509.CertificateRevocationList) -> int | None:
    """The CRL number extension's value (RFC 5280 5.2.3), or None when the CRL has none."""
    try:
        return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    except (x509.ExtensionNotFound, ValueError, x509.DuplicateExtension):
        return None


def _name(name: x509.Name) -> str:
    return f"'{name.rfc4514_string()}'"


def _time(moment: datetime) -> str:
    return f"{moment:%Y-%m-%dT%H:%M:%SZ}"
