"""Issuing leaves: ``ca issue`` for a workload, and the certificate ``ca serve`` presents.

Every leaf is signed and recorded in the index in one transaction (``sign_and_record``), so no
certificate exists that the index, and with it revocation, does not know about. ``issue``
validates all of its input before it loads a key or writes anything: a refused or invalid request
leaves no trace.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Sequence

from cryptography import x509

from ca.authority import (
    Issuer,
    PublicKey,
    certificate_pem,
    format_serial,
    generate_key,
    private_key_pem,
    validate_dns_name,
    workload_name,
)
from ca.errors import CaError, InputError, Refused
from ca.index import Transaction
from ca.inspection import read_csr
from ca.store import BUNDLE, StateDir
from mtls.files import KEY_MODE, write_atomically
from mtls.spiffe import InvalidSpiffeId, NotSvid, SpiffeId, parse_spiffe_id, svid_id

SERVICE_PATH = "/ca"
SERVICE_TTL = timedelta(hours=24)
_SERIAL_ATTEMPTS = 5  # a 158-bit random serial colliding even once is already astronomically unlikely


def id_in_trust_domain(text: str, trust_domain: str) -> SpiffeId:
    """Parse a leaf's ID and check it belongs to ``trust_domain``; InputError names the broken rule."""
    try:
        spiffe_id = parse_spiffe_id(text, require_path=True)
    except InvalidSpiffeId as exc:
        raise InputError(str(exc)) from None
    if spiffe_id.trust_domain != trust_domain:
        raise InputError(str(InvalidSpiffeId(text, f"outside this CA's trust domain {trust_domain!r}")))
    return spiffe_id


def workload_id(text: str, trust_domain: str) -> SpiffeId:
    """``id_in_trust_domain``, refusing the CA service's own ID: a workload must never hold it."""
    spiffe_id = id_in_trust_domain(text, trust_domain)
    if str(spiffe_id) == str(service_id(trust_domain)):
        raise Refused(
            f"{spiffe_id} is reserved for the CA service ('ca serve'): a workload holding it could "
            "impersonate the CA to enrolling workloads"
        )
    return spiffe_id


def service_id(trust_domain: str) -> SpiffeId:
    """The CA service's own X.509-SVID ID, ``spiffe://TD/ca``; reserved, ``ca issue`` refuses it."""
    return parse_spiffe_id(f"spiffe://{trust_domain}{SERVICE_PATH}", require_path=True)


def _checked_dns_names(names: Sequence[str]) -> list[str]:
    """``--dns`` values, each checked to be a DNS name fit for a SAN; InputError names the first that is not."""
    try:
        return [validate_dns_name(name) for name in names]
    except ValueError as exc:
        raise InputError(f"--dns: {exc}") from None


def within_intermediate(issuer: Issuer, ttl: timedelta, *, now: datetime) -> timedelta:
    """``ttl``, shortened to end when the intermediate does (for leaves the service issues unattended;
    an expired intermediate is then refused by ``Issuer.issue``, code ``ca_expired``)."""
    return min(ttl, issuer.cert.not_valid_after_utc - now)


def sign_and_record(
    db: Transaction,
    issuer: Issuer,
    spiffe_id: str,
    public_key: PublicKey,
    *,
    ttl: timedelta,
    now: datetime,
    dns_names: Sequence[str] = (),
    parent_serial: int | None = None,
) -> x509.Certificate:
    """Sign a leaf and record it in the index inside ``db``'s transaction (``parent_serial``: the
    certificate a renewal replaces); should its random serial be taken already, sign again. Whatever
    refuses the leaf (``Issuer.issue``) rolls the transaction back."""
    for _ in range(_SERIAL_ATTEMPTS):
        cert = issuer.issue(spiffe_id, public_key, ttl=ttl, now=now, dns_names=dns_names)
        if StateDir.insert(db, cert, spiffe_id, now=now, parent_serial=parent_serial):
            return cert
    raise CaError(f"could not find a free serial number in {_SERIAL_ATTEMPTS} attempts")


# --- ca issue ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Issued:
    cert: x509.Certificate
    spiffe_id: SpiffeId
    cert_path: Path
    key_path: Path | None  # None when the CSR's owner keeps the key
    bundle_path: Path


def default_out_dir(spiffe_id: SpiffeId) -> Path:
    """``./web`` for ``spiffe://td/ns/prod/sa/web``."""
    return Path(workload_name(spiffe_id))


def issue(
    state: StateDir,
    spiffe_id: str,
    *,
    ttl: timedelta,
    now: datetime,
    out_dir: Path | None = None,
    dns_names: Sequence[str] = (),
    csr_path: Path | None = None,
    passphrase: bytes | None = None,
) -> Issued:
    """Issue, record, then write OUT/cert.pem (leaf + intermediate), OUT/key.pem (0600), OUT/bundle.pem.

    With ``csr_path`` the CSR's key is certified and no key is written; the identity always comes
    from ``spiffe_id``, never from the CSR. The record is committed before the files are written, so
    no certificate exists that the index (and revocation) does not know about.
    """
    parsed = workload_id(spiffe_id, state.trust_domain)
    dns_names = _checked_dns_names(dns_names)
    csr = read_csr(csr_path) if csr_path is not None else None
    out_dir = out_dir if out_dir is not None else default_out_dir(parsed)
    _check_out_dir(out_dir, parsed)
    issuer = state.load_issuer(passphrase)
    key = None if csr is not None else generate_key(state.key_type)
    public_key = csr.public_key() if csr is not None else key.public_key()
    with state.transaction() as db:  # a refusal (TTL, weak key) or no --out directory rolls it back
        cert = sign_and_record(db, issuer, str(parsed), public_key, ttl=ttl, now=now, dns_names=dns_names)
        try:
            out_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise InputError(f"cannot create --out {out_dir}: {exc.strerror}") from None
    issued = Issued(
        cert=cert,
        spiffe_id=parsed,
        cert_path=out_dir / "cert.pem",
        key_path=None if key is None else out_dir / "key.pem",
        bundle_path=out_dir / "bundle.pem",
    )
    try:
        if key is not None:
            write_atomically(issued.key_path, private_key_pem(key), mode=KEY_MODE)
        write_atomically(issued.cert_path, certificate_pem(cert, issuer.cert))
        write_atomically(issued.bundle_path, state.file(BUNDLE).read_bytes())
    except OSError as exc:
        raise CaError(
            f"issued serial {format_serial(cert.serial_number)} but could not write {exc.filename}: "
            f"{exc.strerror}; re-run after fixing it, and revoke that serial"
        ) from None
    return issued


def _check_out_dir(out_dir: Path, spiffe_id: SpiffeId) -> None:
    """Refuse to overwrite another workload's identity; replacing the same ID's files is a renewal."""
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"--out {out_dir} exists and is not a directory")
    if out_dir.is_dir() and not os.access(out_dir, os.W_OK | os.X_OK):
        raise InputError(f"--out {out_dir} is not writable")
    existing = out_dir / "cert.pem"
    if not existing.exists():
        return
    try:
        holder: str | None = str(svid_id(x509.load_pem_x509_certificate(existing.read_bytes())))
    except (OSError, ValueError, NotSvid):
        holder = None
    if holder != str(spiffe_id):
        held = f"holds {holder}" if holder else "is not an X.509-SVID"
        raise Refused(f"{existing} {held}, not {spiffe_id}; choose another --out or remove it")


# --- the service's own certificate ----------------------------------------------------------------


def issue_service_cert(
    state: StateDir, issuer: Issuer, public_key: PublicKey, *, now: datetime, dns_names: Sequence[str] = ()
) -> x509.Certificate:
    """The certificate ``ca serve`` presents: ``spiffe://TD/ca`` (plus ``dns_names``), recorded in the index,
    valid for SERVICE_TTL or until the intermediate expires, whichever comes first."""
    dns_names = _checked_dns_names(dns_names)
    with state.transaction() as db:
        return sign_and_record(
            db, issuer, str(service_id(state.trust_domain)), public_key,
            ttl=within_intermediate(issuer, SERVICE_TTL, now=now), now=now, dns_names=dns_names,
        )
