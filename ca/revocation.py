"""Revoking certificates and signing the CRLs that say so (``ca revoke``, ``ca crl``).

A CRL is written inside the index transaction that changed what it lists, so concurrent
revocations produce CRL files in the order of their commits and none is lost.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ca.authority import CRL_LIFETIME, Issuer, format_serial
from ca.errors import CaError, InputError, Refused
from ca.index import Transaction
from ca.inspection import read_crls
from ca.issuance import id_in_trust_domain
from ca.store import CRL, ROOT_CERT, ROOT_KEY, VALID, CaGeneration, Record, StateDir
from mtls.files import write_atomically

_HEX = re.compile(r"[0-9a-f]+")
CRL_VALIDITY = "crl_validity"  # meta key: seconds from a CRL's signing to its next update, as last chosen


@dataclass(frozen=True)
class Revoked:
    newly_revoked: list[Record]
    untouched: list[Record]  # matched, but already revoked (or, when revoking by ID, expired)
    crl_path: Path
    renewals: list[Record]  # renewed from a newly revoked one (transitively), revoked with it, same reason


def parse_serial(text: str) -> int:
    """``4a:3f:..``, ``4A3F..`` or ``0x4a3f..`` -> int; InputError if it is not a positive hex number."""
    cleaned = text.strip().lower().replace(":", "").removeprefix("0x")
    if not _HEX.fullmatch(cleaned) or int(cleaned, 16) == 0:
        raise InputError(f"{text!r} is neither a certificate serial number (hex) nor a SPIFFE ID")
    return int(cleaned, 16)


@dataclass(frozen=True)
class Target:
    """What one ``ca revoke`` argument (or one line of ``--from``) names: a serial, or a SPIFFE ID (every
    valid certificate of it). ``where`` prefixes its errors (``FILE line 7: ``)."""

    serial: int | None
    spiffe_id: str | None
    where: str = ""

    @classmethod
    def parse(cls, text: str, trust_domain: str, where: str = "") -> "Target":
        if "://" in text or text.lower().startswith("spiffe:"):
            return cls(None, str(id_in_trust_domain(text, trust_domain)), where)
        return cls(parse_serial(text), None, where)


def revoke(
    state: StateDir, target: str, *, reason: str, now: datetime, passphrase: bytes | None = None
) -> Revoked:
    """Revoke one serial, or every valid certificate of a SPIFFE ID, and rewrite DIR/crl.pem."""
    targets = [Target.parse(target, state.trust_domain)]
    return revoke_targets(state, targets, reason=reason, now=now, passphrase=passphrase)


def parse_target_lines(text: str, source: str, trust_domain: str) -> list[Target]:
    """``ca revoke --from``: one serial or SPIFFE ID per line; blank lines and ``#`` comments are skipped.

    The first bad line refuses the whole text (InputError naming ``source`` and the line number)."""
    targets = []
    for number, line in enumerate(text.splitlines(), start=1):
        entry = line.split("#", 1)[0].strip()  # '#' is never part of a serial or a SPIFFE ID
        if not entry:
            continue
        where = f"{source} line {number}: "
        try:
            targets.append(Target.parse(entry, trust_domain, where))
        except CaError as exc:
            raise type(exc)(f"{where}{exc}; nothing was revoked", code=exc.code) from None
    if not targets:
        raise InputError(f"{source} names no certificate (one serial or SPIFFE ID per line); nothing was revoked")
    return targets


def revoke_targets(
    state: StateDir, targets: Sequence[Target], *, reason: str, now: datetime, passphrase: bytes | None = None
) -> Revoked:
    """Revoke everything ``targets`` name, in one index transaction that signs one set of CRLs.

    A target that matches no certificate refuses them all (the transaction is rolled back)."""
    issuers = state.live_issuers(passphrase)  # a wrong passphrase is refused before the index changes
    with state.transaction() as db:
        chosen: dict[int, Record] = {}
        matched_only: dict[int, Record] = {}
        for target in targets:
            matched = StateDir.find(db, serial=target.serial, spiffe_id=target.spiffe_id)
            if not matched:
                what = (
                    f"was issued for {target.spiffe_id}" if target.serial is None
                    else f"has serial {format_serial(target.serial)}"
                )
                refusal = f"{target.where}no certificate in {state.path} {what}"
                raise Refused(refusal + "; nothing was revoked" if target.where else refusal)
            for record in matched:
                revocable = record.status(now) == VALID if target.serial is None else record.revoked_at is None
                (chosen if revocable else matched_only)[record.serial] = record
        untouched = [record for serial, record in matched_only.items() if serial not in chosen]
        renewals = _renewed_from(db, list(chosen))
        if chosen:
            StateDir.mark_revoked(db, [*chosen, *(record.serial for record in renewals)], at=now, reason=reason)
            write_crls(state, db, issuers, now=now, passphrase=passphrase)
    return Revoked(list(chosen.values()), untouched, state.file(CRL), renewals)


def _renewed_from(db, serials: list[int]) -> list[Record]:
    """Every unrevoked certificate renewed from one of ``serials``, from a renewal of one, and so on.

    A renewal is bought with the certificate it replaces; whoever holds a stolen key could renew it
    before it is revoked, so revoking a certificate must reach every certificate descended from it."""
    found, seen, frontier = [], set(serials), list(serials)
    while frontier:
        children = [child for child in StateDir.renewals_of(db, frontier) if child.serial not in seen]
        seen.update(child.serial for child in children)
        found += [child for child in children if child.revoked_at is None]
        frontier = [child.serial for child in children]
    return found


def refresh_crl(
    state: StateDir, *, now: datetime, validity: timedelta | None = None, passphrase: bytes | None = None
) -> x509.CertificateRevocationList:
    """Sign fresh CRLs (new number, next update in ``validity``), store them as DIR/crl.pem; return the
    current intermediate's (see ``write_crls`` for the others). A ``validity`` given is remembered
    for every CRL signed later (``ca revoke``, ``ca serve``); None uses the remembered one."""
    issuers = state.live_issuers(passphrase)
    with state.transaction() as db:
        if validity is not None:
            StateDir.set_meta(db, CRL_VALIDITY, str(int(validity.total_seconds())))
        return write_crls(state, db, issuers, now=now, passphrase=passphrase)[0]


def crl_due(state: StateDir, now: datetime) -> bool:
    """DIR/crl.pem has less than a third of its validity left (or cannot be read): time to sign anew."""
    try:
        crls = read_crls(state.file(CRL))
    except CaError:
        return True
    return any(
        crl.next_update_utc is None or now >= crl.next_update_utc - (crl.next_update_utc - crl.last_update_utc) / 3
        for crl in crls
    )


def write_crls(
    state: StateDir,
    db: Transaction,
    issuers: Sequence[Issuer],
    *,
    now: datetime,
    passphrase: bytes | None,
) -> list[x509.CertificateRevocationList]:
    """Sign one CRL per intermediate (current first) and one per root over its intermediates, under one
    new CRL number, valid for the remembered validity (``ca crl --validity``, else 24h), and write them
    to DIR/crl.pem; inside ``db``'s transaction, so concurrent revocations produce CRL files in commit
    order.

    The roots' CRLs list no revoked intermediate (this CA never revokes one: ``ca rotate`` replaces
    it), but verifiers that check every link (``openssl verify -crl_check_all``, nginx ``ssl_crl``,
    haproxy ``crl-file``) refuse a chain when any CA on it has no CRL, so each root signs one.

    With one generation the file is the intermediate's CRL and the root's. With several (after ``ca
    rotate``, until ``ca bundle --drop-old``), each intermediate's CRL is preceded by its certificate:
    a sidecar whose own chain goes through the other intermediate has no other way to check that
    CRL's signature. Readers that want CRLs only (``openssl crl``, ``ca.inspection.read_crls``) skip
    the certificates.
    """
    number = StateDir.next_crl_number(db)
    remembered = db.execute("SELECT value FROM meta WHERE key = ?", (CRL_VALIDITY,)).fetchone()
    validity = timedelta(seconds=int(remembered["value"])) if remembered else CRL_LIFETIME
    generations = state.generations(db)
    crls = [
        issuer.crl(
            StateDir.revocations(db, now=now, issuer=issuer.cert.subject), number=number, now=now, validity=validity
        )
        for issuer in issuers
    ]
    roots = [_root_signer(state, _generation_of(issuer, generations), passphrase) for issuer in issuers]
    root_crls = [root.crl([], number=number, now=now, validity=validity) for root in roots]
    pem = serialization.Encoding.PEM
    data = b"".join(
        (issuer.cert.public_bytes(pem) if len(issuers) > 1 else b"") + crl.public_bytes(pem)
        for issuer, crl in zip(issuers, crls)
    ) + b"".join(crl.public_bytes(pem) for crl in root_crls)
    write_atomically(state.file(CRL), data)
    return crls + root_crls


def _generation_of(issuer: Issuer, generations: Sequence[CaGeneration]) -> CaGeneration:
    for generation in generations:
        if generation.intermediate == issuer.cert:
            return generation
    raise InputError(f"no CA generation in the state directory holds the intermediate {issuer.cert.subject.rfc4514_string()}")


def _root_signer(state: StateDir, generation: CaGeneration, passphrase: bytes | None) -> Issuer:
    """The root of ``generation`` with its key, as the signer of the CRL over its intermediates."""
    where = generation.directory.relative_to(state.path)
    key = state.load_private_key(where / ROOT_KEY, passphrase)
    raw = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*raw) != generation.root.public_key().public_bytes(*raw):
        raise InputError(f"{state.file(where / ROOT_KEY)} is not the key of {state.file(where / ROOT_CERT)}")
    return Issuer(generation.root, key, state.trust_domain)
