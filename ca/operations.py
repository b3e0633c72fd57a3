"""What an admin does to a CA, as functions on a state directory; ``ca.cli`` only parses and prints.

Every operation validates all of its input before it loads a key or writes anything, so a refused
or invalid request leaves no trace. Errors are CaError subclasses whose message names the thing,
the value and the rule (see ``ca.errors``).
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Sequence

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from ca.authority import (
    Issuer,
    certificate_pem,
    format_serial,
    format_time,
    generate_key,
    key_type_name,
    make_intermediate,
    make_root,
    private_key_pem,
    validate_dns_name,
)
from ca.errors import CaError, InputError, Refused
from ca.store import (
    BUNDLE,
    CRL,
    INTERMEDIATE_CERT,
    INTERMEDIATE_KEY,
    KEY_MODE,
    VALID,
    Record,
    StateDir,
    write_file_atomically,
)
from proxy.durations import format_duration
from proxy.identity import InvalidSpiffeId, NotSvid, SpiffeId, parse_spiffe_id, svid_id, validate_trust_domain

_HEX = re.compile(r"[0-9a-f]+")
_PEM_CRL = re.compile(rb"-----BEGIN X509 CRL-----.+?-----END X509 CRL-----", re.DOTALL)
_SERIAL_ATTEMPTS = 5  # a 158-bit random serial colliding even once is already astronomically unlikely


# --- init ------------------------------------------------------------------------------------


def init_ca(
    directory: Path,
    *,
    trust_domain: str,
    key_type: str,
    root_ttl: timedelta,
    ttl: timedelta,
    passphrase: bytes | None,
    now: datetime,
) -> StateDir:
    """Create a root, an intermediate valid for ``ttl``, an empty CRL and the index in ``directory``."""
    if "://" in trust_domain:
        raise InputError(f"--trust-domain {trust_domain!r}: give the bare name, e.g. 'example.org'")
    try:
        validate_trust_domain(trust_domain)
    except InvalidSpiffeId as exc:
        raise InputError(f"invalid trust domain {trust_domain!r}: {exc.rule}") from None
    if ttl > root_ttl:
        raise InputError(
            f"--ttl {format_duration(ttl.total_seconds())} (the intermediate's lifetime) must not be longer "
            f"than --root-ttl {format_duration(root_ttl.total_seconds())}"
        )
    state = StateDir(directory)
    state.ensure_free()
    root_key = generate_key(key_type)
    root = make_root(trust_domain, root_key, ttl=root_ttl, now=now)
    intermediate_key = generate_key(key_type)
    intermediate = make_intermediate(
        trust_domain, intermediate_key, root=root, root_key=root_key, ttl=ttl, now=now
    )
    issuer = Issuer(intermediate, intermediate_key, trust_domain)
    state.create(
        trust_domain=trust_domain,
        key_type=key_type,
        root=root,
        root_key_pem=private_key_pem(root_key, passphrase),
        intermediate=intermediate,
        intermediate_key_pem=private_key_pem(intermediate_key, passphrase),
        crl=issuer.crl([], number=1, now=now),
    )
    return state


def load_issuer(state: StateDir, passphrase: bytes | None) -> Issuer:
    """The intermediate and its key, checked to belong together."""
    cert = state.load_certificate(INTERMEDIATE_CERT)
    key = state.load_private_key(INTERMEDIATE_KEY, passphrase)
    raw = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*raw) != cert.public_key().public_bytes(*raw):
        raise InputError(f"{state.file(INTERMEDIATE_KEY)} is not the key of {state.file(INTERMEDIATE_CERT)}")
    return Issuer(cert, key, state.trust_domain)


# --- issue -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Issued:
    cert: x509.Certificate
    spiffe_id: SpiffeId
    cert_path: Path
    key_path: Path | None  # None when the CSR's owner keeps the key
    bundle_path: Path


def workload_id(text: str, trust_domain: str) -> SpiffeId:
    """Parse a leaf ID and check it belongs to ``trust_domain``; InputError names the broken rule."""
    try:
        spiffe_id = parse_spiffe_id(text, require_path=True)
    except InvalidSpiffeId as exc:
        raise InputError(str(exc)) from None
    if spiffe_id.trust_domain != trust_domain:
        raise InputError(str(InvalidSpiffeId(text, f"outside this CA's trust domain {trust_domain!r}")))
    return spiffe_id


def default_out_dir(spiffe_id: SpiffeId) -> Path:
    """``./web`` for ``spiffe://td/ns/prod/sa/web``."""
    return Path(spiffe_id.path.rsplit("/", 1)[1])


def read_csr(path: Path) -> x509.CertificateSigningRequest:
    """Load a PEM (or DER) CSR whose signature proves possession of its key."""
    data = _read(path, "CSR")
    try:
        csr = (
            x509.load_pem_x509_csr(data) if b"-----BEGIN" in data else x509.load_der_x509_csr(data)
        )
    except ValueError:
        raise InputError(f"{path} is not a certificate signing request") from None
    try:
        valid = csr.is_signature_valid
    except (UnsupportedAlgorithm, TypeError, ValueError) as exc:
        raise InputError(f"cannot check the signature of CSR {path}: {exc}") from None
    if not valid:
        raise InputError(f"CSR {path} has a bad signature: it was not signed by the key it carries")
    return csr


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
    try:
        dns_names = [validate_dns_name(name) for name in dns_names]
    except ValueError as exc:
        raise InputError(f"--dns: {exc}") from None
    csr = read_csr(csr_path) if csr_path is not None else None
    out_dir = out_dir if out_dir is not None else default_out_dir(parsed)
    _check_out_dir(out_dir, parsed)
    issuer = load_issuer(state, passphrase)
    key = None if csr is not None else generate_key(state.key_type)
    public_key = csr.public_key() if csr is not None else key.public_key()

    def sign() -> x509.Certificate:  # refusals (TTL, weak key) surface here, before anything is written
        try:
            return issuer.issue(str(parsed), public_key, ttl=ttl, now=now, dns_names=dns_names)
        except InvalidSpiffeId as exc:
            raise InputError(str(exc)) from None

    cert = sign()
    try:
        out_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create --out {out_dir}: {exc.strerror}") from None
    attempts = 1
    while not state.add(cert, str(parsed), now=now):
        if attempts == _SERIAL_ATTEMPTS:
            raise CaError(f"could not find a free serial number in {_SERIAL_ATTEMPTS} attempts")
        cert, attempts = sign(), attempts + 1
    issued = Issued(
        cert=cert,
        spiffe_id=parsed,
        cert_path=out_dir / "cert.pem",
        key_path=None if key is None else out_dir / "key.pem",
        bundle_path=out_dir / "bundle.pem",
    )
    try:
        if key is not None:
            write_file_atomically(issued.key_path, private_key_pem(key), mode=KEY_MODE)
        write_file_atomically(issued.cert_path, certificate_pem(cert, issuer.cert))
        write_file_atomically(issued.bundle_path, state.file(BUNDLE).read_bytes())
    except OSError as exc:
        raise CaError(
            f"issued serial {format_serial(cert.serial_number)} but could not write {exc.filename}: "
            f"{exc.strerror}; re-run after fixing it, and revoke that serial"
        ) from None
    return issued


# --- revoke and CRL --------------------------------------------------------------------------


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
    """Revoke one serial, or every valid certificate of a SPIFFE ID, and rewrite DIR/crl.pem.

    The CRL is written inside the index transaction, so concurrent revocations produce CRLs in the
    order of their commits and none is lost.
    """
    by_id = "://" in target or target.lower().startswith("spiffe:")
    serial = None if by_id else parse_serial(target)
    spiffe_id = str(workload_id(target, state.trust_domain)) if by_id else None
    issuer = load_issuer(state, passphrase)
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
            crl = issuer.crl(StateDir.revocations(db, now=now), number=StateDir.next_crl_number(db), now=now)
            write_file_atomically(state.file(CRL), crl.public_bytes(serialization.Encoding.PEM))
    return Revoked(chosen, untouched, state.file(CRL))


def refresh_crl(
    state: StateDir, *, now: datetime, passphrase: bytes | None = None
) -> x509.CertificateRevocationList:
    """Sign a fresh CRL (new number, next update in 24h), store it as DIR/crl.pem and return it."""
    issuer = load_issuer(state, passphrase)
    with state.transaction() as db:
        crl = issuer.crl(StateDir.revocations(db, now=now), number=StateDir.next_crl_number(db), now=now)
        write_file_atomically(state.file(CRL), crl.public_bytes(serialization.Encoding.PEM))
    return crl


# --- reading and describing certificates ---------------------------------------------------------


def _read(path: Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read {what} {path}: {exc.strerror}") from None


def read_certificates(path: Path, what: str = "certificate file") -> list[x509.Certificate]:
    """All certificates of a PEM file (or the one of a DER file), in file order; at least one."""
    data = _read(path, what)
    try:
        if b"-----BEGIN" in data:
            return x509.load_pem_x509_certificates(data)
        return [x509.load_der_x509_certificate(data)]
    except ValueError:
        raise InputError(f"{what} {path} holds no readable certificate") from None


def read_crls(path: Path) -> list[x509.CertificateRevocationList]:
    """Every CRL of a PEM file (several may be concatenated), or the one of a DER file."""
    data = _read(path, "CRL file")
    try:
        if b"-----BEGIN" not in data:
            return [x509.load_der_x509_crl(data)]
        blocks = _PEM_CRL.findall(data)
        if not blocks:
            raise ValueError
        return [x509.load_pem_x509_crl(block) for block in blocks]
    except ValueError:
        raise InputError(f"CRL file {path} holds no readable CRL") from None


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the DER, as ``openssl x509 -fingerprint -sha256`` prints it."""
    digest = hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest().upper()
    return ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))


def describe(cert: x509.Certificate, *, now: datetime) -> dict:
    """What ``ca inspect`` shows: identity (or why there is none), serial, names, validity, key, fingerprint."""
    try:
        spiffe_id: str | None = str(svid_id(cert))
        not_svid = None
    except NotSvid as exc:
        spiffe_id, not_svid = None, str(exc)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns_names = san.get_values_for_type(x509.DNSName)
    except (x509.ExtensionNotFound, ValueError, x509.DuplicateExtension):
        dns_names = []
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if now < cert.not_valid_before_utc:
        status = "not_yet_valid"
    elif now > cert.not_valid_after_utc:
        status = "expired"
    else:
        status = "valid"
    return {
        "spiffe_id": spiffe_id,
        "not_svid": not_svid,
        "serial": format_serial(cert.serial_number),
        "subject": cert.subject.rfc4514_string(),
        "issuer": cert.issuer.rfc4514_string(),
        "not_before": format_time(cert.not_valid_before_utc),
        "not_after": format_time(cert.not_valid_after_utc),
        "status": status,
        "key_type": key_type_name(cert.public_key()),
        "sha256_fingerprint": fingerprint(cert),
        "dns_names": dns_names,
        "ca": is_ca,
    }
