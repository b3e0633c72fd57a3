"""The verdict of ``ca verify`` (and of the renewal service on a presented chain).

The chain decision is the shared one (``mtls.trust``: the same verifier as the sidecar's handshake),
so ``ca verify`` and a sidecar agree about every certificate. The bundles are given per trust domain
(``--bundle TD=FILE``), or as one list of roots naming no trust domain (the renewal service's
bundle.pem): those are taken as the roots of the trust domain the leaf names. What this module adds is
what the command asks of its ``--crl`` input: a CRL that claims to be from a CA on the verified path
but is badly signed or stale is an input error (CrlError), not something to ignore.

Pure: no files, no clock; the caller passes ``now``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Mapping, Sequence

from cryptography import x509

from ca.authority import format_time
from mtls.reasons import IDENTITY_NOT_ALLOWED
from mtls.spiffe import IdPattern, PatternSet, SpiffeId
from mtls.trust import TrustStore, VerifyError


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
    roots: Sequence[x509.Certificate] | Mapping[str, Sequence[x509.Certificate]],
    *,
    now: datetime,
    crls: Sequence[x509.CertificateRevocationList] = (),
    role: str | None = None,
    allowed: Sequence[IdPattern] = (),
) -> VerifiedSvid:
    """Verify ``leaf`` (with the ``intermediates`` it came with) against the trust ``roots``: the
    roots of each trust domain, or a sequence of roots for the leaf's own trust domain.

    ``role`` is ``mtls.spiffe.CLIENT``/``SERVER`` or None (no EKU check); an empty ``allowed``
    accepts any ID. Raises VerifyError with the reason code (``identity_not_allowed`` last), or
    CrlError when every CRL that claims to be from a CA on the path is unusable.
    """
    current = [crl for crl in crls if not _stale(crl, now)]
    if isinstance(roots, Mapping):
        store = TrustStore(roots, crls=current, authorities=intermediates, holder="ca verify")
    else:
        store = TrustStore.for_leaf(leaf, roots, crls=current, authorities=intermediates, role=role)
    verified = store.verify(leaf, intermediates, role=role, now=now)
    crls_used = _usable_crls(store, verified.path, verified.spiffe_id.trust_domain, crls, now)
    if allowed and PatternSet(allowed).match(verified.spiffe_id) is None:
        raise VerifyError(
            IDENTITY_NOT_ALLOWED,
            f"expected {', '.join(map(str, allowed))}; certificate is {verified.spiffe_id}",
        )
    return VerifiedSvid(verified.spiffe_id, verified.path, crls_used)


def _stale(crl: x509.CertificateRevocationList, now: datetime) -> bool:
    return crl.next_update_utc is None or now > crl.next_update_utc


def _usable_crls(
    store: TrustStore,
    path: tuple[x509.Certificate, ...],
    trust_domain: str,
    crls: Sequence[x509.CertificateRevocationList],
    now: datetime,
) -> tuple[x509.CertificateRevocationList, ...]:
    """The CRLs the store used for the CAs on ``path``; CrlError for a CA whose every CRL is unusable.
    CRLs of CAs that are not on the path are ignored."""
    used: list[x509.CertificateRevocationList] = []
    for issuer in path[1:]:
        bound = store.crls_for(issuer, trust_domain)
        claimed = [crl for crl in crls if crl.issuer == issuer.subject]
        if claimed and not bound:
            raise _crl_problem(claimed[0], issuer, now)
        used.extend(bound)
    return tuple(used)


def _crl_problem(crl: x509.CertificateRevocationList, issuer: x509.Certificate, now: datetime) -> CrlError:
    """Why ``crl``, which names ``issuer``, is not usable: a wrong key, no cRLSign, or stale."""
    name = issuer.subject.rfc4514_string()
    try:
        valid = crl.is_signature_valid(issuer.public_key())
    except (TypeError, ValueError):
        valid = False
    if not valid:
        return CrlError(f"CRL claims to be from '{name}' but its signature does not verify with that CA's key")
    try:
        usage = issuer.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        usage = None
    if usage is not None and not usage.crl_sign:
        return CrlError(f"'{name}' is not allowed to sign CRLs (keyUsage lacks cRLSign)")
    next_update = crl.next_update_utc
    due = "no next update" if next_update is None else f"next update was due at {format_time(next_update)}"
    return CrlError(f"CRL from '{name}' is stale ({due}); fetch a fresh one")
