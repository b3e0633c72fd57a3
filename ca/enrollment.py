"""How a workload gets certificates without an admin at hand: a one-time token (``ca token``) buys
the first one (``POST /v1/enroll``), the current certificate buys the next (``POST /v1/renew``).

Each check, the signing and the recording happen in one ``BEGIN IMMEDIATE`` transaction, so two
requests with the same token cannot both win and a refused request changes nothing. Refusals are
Refused with ``code`` a reason code, which ``ca serve`` puts in its JSON error.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Sequence

from cryptography import x509

from ca.authority import Issuer, format_serial, format_time
from ca.errors import InputError, Refused
from ca.inspection import dns_names
from ca.issuance import sign_and_record, within_intermediate, workload_id
from ca.store import StateDir
from ca.verify import verify_svid_chain
from mtls.spiffe import CLIENT, SpiffeId
from mtls.trust import VerifyError

TOKEN_PREFIX = "mst1_"  # recognisable by secret scanners; "mtls-sidecar token, version 1"
DEFAULT_ENROLL_CERT_TTL = timedelta(hours=24)


@dataclass(frozen=True)
class IssuedToken:
    token: str
    spiffe_id: SpiffeId
    expires_at: datetime
    cert_ttl: timedelta


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def create_token(
    state: StateDir, spiffe_id: str, *, ttl: timedelta, now: datetime,
    cert_ttl: timedelta = DEFAULT_ENROLL_CERT_TTL,
) -> IssuedToken:
    """A one-time enrollment token for ``spiffe_id``, usable until ``now + ttl``; only its hash is stored."""
    parsed = workload_id(spiffe_id, state.trust_domain)
    if ttl <= timedelta(0) or cert_ttl <= timedelta(0):
        raise InputError("--ttl and --cert-ttl must be longer than zero")
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)  # 256 random bits
    with state.transaction() as db:
        StateDir.add_token(
            db, hash_token(token), str(parsed), cert_ttl_s=int(cert_ttl.total_seconds()), now=now,
            expires_at=now + ttl,
        )
    return IssuedToken(token, parsed, now + ttl, cert_ttl)


def enroll(
    state: StateDir, issuer: Issuer, token: str, csr: x509.CertificateSigningRequest, *, now: datetime
) -> tuple[x509.Certificate, str]:
    """The first certificate of the workload a token was made for, over the key of ``csr``.

    Looking the token up, checking it, signing, recording the certificate and marking the token used
    happen in one transaction: a refused or failed issuance leaves the token unused. Returns
    (certificate, SPIFFE ID).
    """
    if not isinstance(token, str) or not token.startswith(TOKEN_PREFIX) or len(token) > 256:
        raise Refused("not an enrollment token (they start with 'mst1_'; see 'ca token')", code="invalid_token")
    digest = hash_token(token)
    with state.transaction() as db:
        found = StateDir.find_token(db, digest)
        if found is None:
            raise Refused("unknown token: this CA did not make it (or it was made for another CA)",
                          code="invalid_token")
        if found.used_at is not None:
            raise Refused(
                f"token for {found.spiffe_id} was already used at {format_time(found.used_at)} "
                f"(serial {found.used_serial}); tokens work once: make a new one with 'ca token'",
                code="token_used",
            )
        if now > found.expires_at:
            raise Refused(
                f"token for {found.spiffe_id} expired at {format_time(found.expires_at)}; make a new one",
                code="token_expired",
            )
        ttl = within_intermediate(issuer, timedelta(seconds=found.cert_ttl_s), now=now)
        cert = sign_and_record(db, issuer, found.spiffe_id, csr.public_key(), ttl=ttl, now=now)
        StateDir.mark_token_used(db, digest, at=now, serial=cert.serial_number)
    return cert, found.spiffe_id


def renew(
    state: StateDir,
    issuer: Issuer,
    chain: Sequence[x509.Certificate],
    roots: Sequence[x509.Certificate],
    csr: x509.CertificateSigningRequest,
    *,
    now: datetime,
) -> x509.Certificate:
    """A new certificate for the key of ``csr`` and the SPIFFE ID of ``chain[0]``, the caller's current
    certificate (the CSR's names are ignored).

    The caller's chain must verify against ``roots`` (the bundle) and its leaf must be in the index,
    neither revoked nor expired: passive revocation, a revoked or expired certificate cannot renew.
    The new certificate has the lifetime the old one was issued with (capped, not refused, at the
    intermediate's expiry) and keeps its DNS names.
    """
    if not chain:
        raise Refused("no client certificate: renewal is authenticated by the current one", code="no_client_cert")
    leaf, *intermediates = chain
    try:
        verified = verify_svid_chain(leaf, intermediates, roots, now=now, role=CLIENT)
    except VerifyError as exc:
        raise Refused(exc.detail, code=exc.reason) from None
    spiffe_id = str(verified.spiffe_id)
    with state.transaction() as db:  # the index check and the new record see one state of the index
        found = StateDir.find(db, serial=leaf.serial_number)
        if not found or found[0].spiffe_id != spiffe_id:
            raise Refused(
                f"certificate serial {format_serial(leaf.serial_number)} ({spiffe_id}) is not in this CA's index",
                code="unknown_certificate",
            )
        record = found[0]
        if record.revoked_at is not None:
            raise Refused(
                f"certificate serial {format_serial(record.serial)} ({record.spiffe_id}) was revoked at "
                f"{format_time(record.revoked_at)} ({record.reason}); it cannot renew: enroll anew",
                code="revoked",
            )
        if now > record.not_after:
            raise Refused(
                f"certificate serial {format_serial(record.serial)} ({record.spiffe_id}) expired at "
                f"{format_time(record.not_after)}; it cannot renew: enroll anew",
                code="expired",
            )
        lifetime = max(record.not_after - record.issued_at, timedelta(seconds=1))
        return sign_and_record(
            db, issuer, spiffe_id, csr.public_key(), ttl=within_intermediate(issuer, lifetime, now=now), now=now,
            dns_names=dns_names(leaf), parent_serial=record.serial,
        )
