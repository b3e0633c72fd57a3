"""The verdict of ``ca verify`` (and of the renewal service on a presented chain).

The chain decision is the shared one (``mtls.trust``: the same verifier as the sidecar's handshake),
so ``ca verify`` and a sidecar agree about every certificate. The bundles are given per trust domain
(``--bundle TD=FILE``), or as one list of roots naming no trust domain (the renewal service's
bundle.pem): those are taken as the roots of the trust domain the leaf names. A CRL past its next update
by more than the grace is the sidecar's ``crl_stale`` refusal (``TrustStore.crl_stale``), after
``revoked``. What this module adds is what the command asks of its ``--crl`` input: a CRL that claims
to be from a CA on the verified path but is badly signed is an input error (CrlError), not something
to ignore.

Pure: no files, no clock; the caller passes ``now``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Mapping, Sequence

from cryptography import x509

from mtls.reasons import CRL_STALE, IDENTITY_NOT_ALLOWED
from mtls.spiffe import IdPattern, PatternSet, SpiffeId
from mtls.trust import DEFAULT_CRL_GRACE, TrustStore, VerifyError


class CrlError(ValueError):
    """A CRL that cannot be trusted or used: bad signature, wrong issuer key, or no cRLSign."""


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
    crl_file: Path | None = None,
    crl_grace: timedelta = DEFAULT_CRL_GRACE,
    role: str | None = None,
    allowed: Sequence[IdPattern] = (),
) -> VerifiedSvid:
    """Verify ``leaf`` (with the ``intermediates`` it came with) against the trust ``roots``: the
    roots of each trust domain, or a sequence of roots for the leaf's own trust domain.

    ``crls`` came from ``crl_file`` (named in a ``crl_stale`` refusal); one past its next update by
    more than ``crl_grace`` refuses the chain as the sidecar does. ``role`` is
    ``mtls.spiffe.CLIENT``/``SERVER`` or None (no EKU check); an empty ``allowed`` accepts any ID.
    Raises VerifyError with the reason code (``identity_not_allowed`` last), or CrlError when every
    CRL that claims to be from a CA on the path is unusable.
    """
    if isinstance(roots, Mapping):
        store = TrustStore(roots, crls=crls, authorities=intermediates, holder="ca verify")
    else:
        store = TrustStore.for_leaf(leaf, roots, crls=crls, authorities=intermediates, role=role)
    verified = store.verify(leaf, intermediates, role=role, now=now)
    crls_used = _usable_crls(store, verified.path, verified.spiffe_id.trust_domain, crls)
    stale = store.crl_stale(verified.path, now, crl_grace, source=crl_file, grace_setting="--crl-grace")
    if stale is not None:
        raise VerifyError(CRL_STALE, stale)
    if allowed and PatternSet(allowed).match(verified.spiffe_id) is None:
        raise VerifyError(
            IDENTITY_NOT_ALLOWED,
            f"expected {', '.join(map(str, allowed))}; certificate is {verified.spiffe_id}",
        )
    return VerifiedSvid(verified.spiffe_id, verified.path, crls_used)


def _usable_crls(
    store: TrustStore,
    path: tuple[x509.Certificate, ...],
    trust_domain: str,
    crls: Sequence[x509.CertificateRevocationList],
) -> tuple[x509.CertificateRevocationList, ...]:
    """The CRLs the store used for the CAs on ``path``; CrlError for a CA whose every CRL is unusable.
    CRLs of CAs that are not on the path are ignored."""
    used: list[x509.CertificateRevocationList] = []
    for issuer in path[1:]:
        bound = store.crls_for(issuer, trust_domain)
        claimed = [crl for crl in crls if crl.issuer == issuer.subject]
        if claimed and not bound:
            raise _crl_problem(claimed[0], issuer)
        used.extend(bound)
    return tuple(used)


def _crl_problem(crl: x509.CertificateRevocationList, issuer: x509.Certificate) -> CrlError:
    """Why ``crl``, which names ``issuer``, is not bound to it: a wrong key, else no cRLSign (the store
    binds a CRL its issuer signed and may sign)."""
    name = issuer.subject.rfc4514_string()
    try:
        valid = crl.is_signature_valid(issuer.public_key())
    except (TypeError, ValueError):
        valid = False
    if not valid:
        return CrlError(f"CRL claims to be from '{name}' but its signature does not verify with that CA's key")
    return CrlError(f"'{name}' is not allowed to sign CRLs (keyUsage lacks cRLSign)")
