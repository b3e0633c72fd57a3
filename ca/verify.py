"""Verify an X.509-SVID chain and say why it fails with one of the contract's reason codes.

Theory of operation: cryptography's ``x509.verification`` verifier follows the Web PKI profile; it
refuses Ed25519 keys and URI name constraints, both of which our CA uses, and it reports failures as
free text. So this module walks the chain itself, in an order that gives the most useful reason:

1. build a path leaf -> intermediates -> a root from the bundle, checking every signature
   (``untrusted_ca``);
2. check each certificate's validity window (``expired`` / ``not_yet_valid``);
3. check that every issuer is a CA allowed to sign here: basicConstraints, keyUsage, pathlen,
   name constraints, no unknown critical extension (``untrusted_ca``);
4. check the leaf against the X.509-SVID rules with ``mtls.spiffe.svid_id`` (``not_svid``);
5. look every certificate up in the CRLs of its issuer (``revoked``); a CRL that claims to be from
   an issuer in the path but whose signature fails, or whose next update is past, raises CrlError;
6. match the leaf's ID against the expected patterns (``identity_not_allowed``).

Pure: no files, no clock; the caller passes ``now``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Sequence

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm

from ca.authority import format_serial, format_time

# The reason codes are shared with the sidecar: `ca verify` and a refused handshake agree.
from mtls.reasons import (
    EXPIRED,
    IDENTITY_NOT_ALLOWED,
    NOT_SVID,
    NOT_YET_VALID,
    REVOKED,
    UNTRUSTED_CA,
)
from mtls.spiffe import IdPattern, NotSvid, SpiffeId, first_match, svid_id

MAX_INTERMEDIATES = 4
# Extensions this module understands; any other extension marked critical fails the chain.
_HANDLED_EXTENSIONS = (
    x509.BasicConstraints,
    x509.KeyUsage,
    x509.ExtendedKeyUsage,
    x509.SubjectAlternativeName,
    x509.NameConstraints,
    x509.SubjectKeyIdentifier,
    x509.AuthorityKeyIdentifier,
)


class VerifyError(Exception):
    """The chain is not acceptable. ``reason`` is a contract reason code, ``detail`` a sentence."""

    def __init__(self, reason: str, detail: str):
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")


class CrlError(ValueError):
    """A CRL that cannot be trusted or used: bad signature, wrong issuer key, or stale."""


@dataclass(frozen=True)
class VerifiedSvid:
    spiffe_id: SpiffeId
    chain: tuple[x509.Certificate, ...]  # leaf first, trust anchor last
    crls_used: tuple[x509.CertificateRevocationList, ...]


def verify_svid_chain(
    leaf: x509.Certificate,
    intermediates: Sequence[x509.Certificate],
    roots: Sequence[x509.Certificate],
    *,
    now: datetime,
    crls: Sequence[x509.CertificateRevocationList] = (),
    role: str | None = None,
    allowed: Sequence[IdPattern] = (),
) -> VerifiedSvid:
    """Verify ``leaf`` (with the ``intermediates`` it came with) against the trust ``roots``.

    ``role`` is ``mtls.spiffe.CLIENT``/``SERVER`` or None (no EKU check); an empty ``allowed``
    accepts any ID. Raises VerifyError with the reason code, or CrlError for an unusable CRL.
    """
    chain = _build_chain(leaf, list(intermediates), list(roots))
    for position, cert in enumerate(chain):
        _check_validity(cert, position, now)
    for position, cert in enumerate(chain[1:], start=1):
        _check_issuer(cert, position, leaf)
    _check_critical_extensions(leaf, NOT_SVID, "the certificate")
    try:
        spiffe_id = svid_id(leaf, role)
    except NotSvid as exc:
        raise VerifyError(NOT_SVID, str(exc)) from None
    crls_used = _check_revocation(chain, crls, now)
    if allowed and first_match(tuple(allowed), spiffe_id) is None:
        raise VerifyError(
            IDENTITY_NOT_ALLOWED,
            f"expected {', '.join(map(str, allowed))}; certificate is {spiffe_id}",
        )
    return VerifiedSvid(spiffe_id, tuple(chain), crls_used)


def check_crl(crl: x509.CertificateRevocationList, issuer: x509.Certificate, now: datetime) -> None:
    """Raise CrlError unless ``crl`` is signed by ``issuer``'s key, which may sign CRLs, and is current."""
    name = issuer.subject.rfc4514_string()
    if crl.issuer != issuer.subject:
        raise CrlError(f"CRL is from '{crl.issuer.rfc4514_string()}', not from '{name}'")
    try:
        valid = crl.is_signature_valid(issuer.public_key())
    except (TypeError, ValueError, UnsupportedAlgorithm):
        valid = False
    if not valid:
        raise CrlError(f"CRL claims to be from '{name}' but its signature does not verify with that CA's key")
    usage = _extension(issuer, x509.KeyUsage)
    if usage is not None and not usage.crl_sign:
        raise CrlError(f"'{name}' is not allowed to sign CRLs (keyUsage lacks cRLSign)")
    next_update = crl.next_update_utc
    if next_update is None or now > next_update:
        due = "no next update" if next_update is None else f"next update was due at {format_time(next_update)}"
        raise CrlError(f"CRL from '{name}' is stale ({due}); fetch a fresh one")


def _extension(cert: x509.Certificate, kind: type) -> object | None:
    try:
        return cert.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None


def _describe(cert: x509.Certificate, position: int) -> str:
    if position == 0:
        try:
            san = _extension(cert, x509.SubjectAlternativeName)
        except (ValueError, x509.DuplicateExtension):
            san = None
        uris = san.get_values_for_type(x509.UniformResourceIdentifier) if san is not None else []
        named = f" ({uris[0]})" if len(uris) == 1 else ""
        return f"certificate serial {format_serial(cert.serial_number)}{named}"
    return f"CA certificate '{cert.subject.rfc4514_string()}'"


def _signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


def _build_chain(
    leaf: x509.Certificate, intermediates: list[x509.Certificate], roots: list[x509.Certificate]
) -> list[x509.Certificate]:
    if leaf in roots:
        return [leaf]
    path = _path_to_root(leaf, intermediates, roots, used=())
    if path is not None:
        return [leaf, *path]
    issuer = leaf.issuer.rfc4514_string()
    shown = ", ".join(f"'{root.subject.rfc4514_string()}'" for root in roots[:3])
    more = f" and {len(roots) - 3} more" if len(roots) > 3 else ""
    raise VerifyError(
        UNTRUSTED_CA,
        f"{_describe(leaf, 0)} was issued by '{issuer}', which does not chain to a trusted root "
        f"(bundle holds {shown}{more})",
    )


def _path_to_root(
    cert: x509.Certificate,
    intermediates: list[x509.Certificate],
    roots: list[x509.Certificate],
    used: tuple[x509.Certificate, ...],
) -> list[x509.Certificate] | None:
    """Depth-first search for issuers up to a root; each intermediate at most once, at most MAX deep."""
    for root in roots:
        if _signed_by(cert, root):
            return [root]
    if len(used) == MAX_INTERMEDIATES:
        return None
    for candidate in intermediates:
        if candidate not in used and candidate != cert and _signed_by(cert, candidate):
            rest = _path_to_root(candidate, intermediates, roots, (*used, candidate))
            if rest is not None:
                return [candidate, *rest]
    return None


def _check_validity(cert: x509.Certificate, position: int, now: datetime) -> None:
    if now < cert.not_valid_before_utc:
        raise VerifyError(
            NOT_YET_VALID,
            f"{_describe(cert, position)} is not valid before {format_time(cert.not_valid_before_utc)}",
        )
    if now > cert.not_valid_after_utc:
        raise VerifyError(
            EXPIRED, f"{_describe(cert, position)} expired at {format_time(cert.not_valid_after_utc)}"
        )


def _check_critical_extensions(cert: x509.Certificate, reason: str, described: str) -> None:
    for ext in cert.extensions:
        if ext.critical and not isinstance(ext.value, _HANDLED_EXTENSIONS):
            raise VerifyError(
                reason, f"{described} has an unsupported critical extension {ext.oid.dotted_string}"
            )


def _check_issuer(ca: x509.Certificate, position: int, leaf: x509.Certificate) -> None:
    """``ca`` signs the certificate below it; ``position - 1`` intermediates sit between it and the leaf."""
    described = _describe(ca, position)
    basic = _extension(ca, x509.BasicConstraints)
    if basic is None or not basic.ca:
        raise VerifyError(UNTRUSTED_CA, f"{described} is not a CA (basicConstraints CA:TRUE missing)")
    usage = _extension(ca, x509.KeyUsage)
    if usage is not None and not usage.key_cert_sign:
        raise VerifyError(UNTRUSTED_CA, f"{described} may not sign certificates (keyUsage lacks keyCertSign)")
    if basic.path_length is not None and position - 1 > basic.path_length:
        raise VerifyError(
            UNTRUSTED_CA,
            f"{described} allows {basic.path_length} intermediate(s) below it (pathlen), "
            f"the chain has {position - 1}",
        )
    _check_critical_extensions(ca, UNTRUSTED_CA, described)
    constraints = _extension(ca, x509.NameConstraints)
    if constraints is not None:
        _check_name_constraints(constraints, described, leaf)


def _uri_host(uri: str) -> str:
    authority = uri.partition("://")[2]
    for stop in "/?#":
        authority = authority.partition(stop)[0]
    return authority.rpartition("@")[2].partition(":")[0].lower()


def _host_within(host: str, constraint: str, *, dns: bool) -> bool:
    """RFC 5280 4.2.1.10: URI constraint '.x' means subdomains of x, 'x' the host x; DNS constraint 'x' both."""
    constraint = constraint.lower()
    if constraint.startswith("."):
        return host.endswith(constraint)
    if dns:
        return constraint == "" or host == constraint or host.endswith("." + constraint)
    return host == constraint


def _check_name_constraints(constraints: x509.NameConstraints, described: str, leaf: x509.Certificate) -> None:
    """Apply URI and DNS name constraints to the leaf's SANs; any other constraint type fails closed."""
    san = _extension(leaf, x509.SubjectAlternativeName)
    names: list[tuple[type, str]] = []
    if san is not None:
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
        names += [(x509.UniformResourceIdentifier, _uri_host(uri)) for uri in uris]
        names += [(x509.DNSName, dns.lower()) for dns in san.get_values_for_type(x509.DNSName)]
    both = ((constraints.permitted_subtrees, True), (constraints.excluded_subtrees, False))
    for subtrees, permitted in both:
        for kind in {type(tree) for tree in subtrees or ()}:
            if kind not in (x509.UniformResourceIdentifier, x509.DNSName):
                raise VerifyError(
                    UNTRUSTED_CA, f"{described} has a {kind.__name__} name constraint, which is not supported"
                )
            hosts = [host for name_kind, host in names if name_kind is kind]
            trees = [tree.value for tree in subtrees if isinstance(tree, kind)]
            for host in hosts:
                inside = any(_host_within(host, tree, dns=kind is x509.DNSName) for tree in trees)
                if inside != permitted:
                    raise VerifyError(
                        UNTRUSTED_CA,
                        f"{described} may not issue for '{host}' (name constraints "
                        f"{'permit only' if permitted else 'exclude'} {', '.join(trees)})",
                    )


def _check_revocation(
    chain: list[x509.Certificate], crls: Sequence[x509.CertificateRevocationList], now: datetime
) -> tuple[x509.CertificateRevocationList, ...]:
    used: list[x509.CertificateRevocationList] = []
    for position, cert in enumerate(chain[:-1]):
        issuer = chain[position + 1]
        claimed = [crl for crl in crls if crl.issuer == issuer.subject]
        if not claimed:
            continue
        problems: list[CrlError] = []
        for crl in claimed:
            try:
                check_crl(crl, issuer, now)
            except CrlError as exc:
                problems.append(exc)
                continue
            used.append(crl)
            entry = crl.get_revoked_certificate_by_serial_number(cert.serial_number)
            if entry is not None:
                raise VerifyError(REVOKED, _revocation_detail(cert, position, entry))
        if len(problems) == len(claimed):
            raise problems[0]
    return tuple(used)


def _revocation_detail(cert: x509.Certificate, position: int, entry: x509.RevokedCertificate) -> str:
    try:
        reason = entry.extensions.get_extension_for_class(x509.CRLReason).value.reason.value
    except x509.ExtensionNotFound:
        reason = "unspecified"
    return f"{_describe(cert, position)} was revoked at {format_time(entry.revocation_date_utc)} ({reason})"
