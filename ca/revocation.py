"""Revoking certificates and signing the CRLs that say so (``ca revoke``, ``ca crl``).

A CRL is written inside the index transaction that changed what it lists, so concurrent
revocations produce CRL files in the order of their commits and none is lost.
"""

from __future__ import annotations

import re
import sqlite3
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ca.authority import Issuer, format_serial
from ca.errors import InputError, Refused
from ca.issuance import id_in_trust_domain
from ca.store import CRL, VALID, Record, StateDir
from mtls.files import write_atomically

_HEX = re.compile(r"[0-9a-f]+")


@dataclass(frozen=True)
class Revoked:
    newly_revoked: list[Record]
    untouched: list[Record]  # matched, but already revoked (or, when revoking by ID, expired)
    crl_path: Path


def parse_serial(text: str) -> int:
    """``4a:3f:..``, ``4A3F..`` or ``0x4a3f..`` -> int; InputError if it is not a positive hex number."""
    cleaned = text.strip().lower().replace(":", "").removeprefix("0x")
    if not _HEX.fullmatch(cleaned) or int(cleaned, 16) == 0:
        raise InputError(f"{text!r} is neither a certificate serial number (hex) nor a SPIFFE ID")
    return int(cleaned, 16)


def revoke(
    state: StateDir, target: str, *, reason: str, now: datetime, passphrase: bytes | None = None
) -> Revoked:
    """Revoke one serial, or every valid certificate of a SPIFFE ID, and rewrite DIR/crl.pem."""
    by_id = "://" in target or target.lower().startswith("spiffe:")
    serial = None if by_id else parse_serial(target)
    spiffe_id = str(id_in_trust_domain(target, state.trust_domain)) if by_id else None
    issuers = state.live_issuers(passphrase)  # a wrong passphrase is refused before the index changes
    with state.transaction() as db:
        matched = StateDir.find(db, serial=serial, spiffe_id=spiffe_id)
        if not matched:
            what = f"was issued for {spiffe_id}" if by_id else f"has serial {format_serial(serial)}"
            raise Refused(f"no certificate in {state.path} {what}")
        if by_id:
            chosen = [record for record in matched if record.status(now) == VALID]
        else:
            chosen = [record for record in matched if record.revoked_at is None]
        untouched = [record for record in matched if record not in chosen]
        if chosen:
            StateDir.mark_revoked(db, [record.serial for record in chosen], at=now, reason=reason)
            write_crls(state, db, issuers, now=now)
    return Revoked(chosen, untouched, state.file(CRL))


def refresh_crl(
    state: StateDir, *, now: datetime, passphrase: bytes | None = None
) -> x509.CertificateRevocationList:
    """Sign fresh CRLs (new number, next update in 24h), store them as DIR/crl.pem; return the current
    intermediate's (see ``write_crls`` for the others)."""
    issuers = state.live_issuers(passphrase)
    with state.transaction() as db:
        return write_crls(state, db, issuers, now=now)[0]


def write_crls(
    state: StateDir, db: sqlite3.Connection, issuers: Sequence[Issuer], *, now: datetime
) -> list[x509.CertificateRevocationList]:
    """Sign one CRL per issuer (current first) under one new CRL number, write DIR/crl.pem; inside ``db``'s
    transaction, so concurrent revocations produce CRL files in commit order.

    With one issuer the file is that CRL alone, as before any rotation. With several (after ``ca
    rotate``, until ``ca bundle --drop-old``), each CRL is preceded by its issuer's certificate: a
    sidecar whose own chain goes through the other intermediate has no other way to check that CRL's
    signature. Readers that want CRLs only (``openssl crl``, ``ca.inspection.read_crls``) skip the
    certificates.
    """
    number = StateDir.next_crl_number(db)
    crls = [
        issuer.crl(StateDir.revocations(db, now=now, issuer=issuer.cert.subject), number=number, now=now)
        for issuer in issuers
    ]
    pem = serialization.Encoding.PEM
    data = b"".join(
        (issuer.cert.public_bytes(pem) if len(issuers) > 1 else b"") + crl.public_bytes(pem)
        for issuer, crl in zip(issuers, crls)
    )
    write_atomically(state.file(CRL), data)
    return crls
