"""What an admin does to a CA, as functions on a state directory; ``ca.cli`` only parses and prints.

Every operation validates all of its input before it loads a key or writes anything, so a refused
or invalid request leaves no trace. Errors are CaError subclasses whose message names the thing,
the value and the rule (see ``ca.errors``).
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Sequence

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from ca.authority import (
    CLOCK_SKEW,
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
    CA_FILES,
    CRL,
    GENERATIONS,
    INTERMEDIATE_CERT,
    INTERMEDIATE_KEY,
    ROOT_CERT,
    ROOT_KEY,
    VALID,
    CaGeneration,
    Record,
    StateDir,
)
from ca.verify import VerifyError, verify_svid_chain
from mtls.durations import format_duration
from mtls.files import KEY_MODE, PUBLIC_MODE, write_atomically
from mtls.spiffe import (
    CLIENT,
    InvalidSpiffeId,
    NotSvid,
    SpiffeId,
    parse_spiffe_id,
    svid_id,
    validate_trust_domain,
)

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


def load_issuer(state: StateDir, passphrase: bytes | None, generation: CaGeneration | None = None) -> Issuer:
    """The intermediate (the current one, or that of ``generation``) and its key, checked to belong together."""
    where = Path(".") if generation is None or generation.current else generation.directory.relative_to(state.path)
    cert = state.load_certificate(where / INTERMEDIATE_CERT)
    key = state.load_private_key(where / INTERMEDIATE_KEY, passphrase)
    raw = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*raw) != cert.public_key().public_bytes(*raw):
        raise InputError(
            f"{state.file(where / INTERMEDIATE_KEY)} is not the key of {state.file(where / INTERMEDIATE_CERT)}"
        )
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
    return parse_csr(_read(path, "CSR"), str(path))


def parse_csr(data: bytes, what: str = "the CSR") -> x509.CertificateSigningRequest:
    """A PEM (or DER) CSR whose signature proves possession of its key; InputError (code bad_csr) if not."""
    try:
        csr = (
            x509.load_pem_x509_csr(data) if b"-----BEGIN" in data else x509.load_der_x509_csr(data)
        )
    except ValueError:
        raise InputError(f"{what} is not a certificate signing request", code="bad_csr") from None
    try:
        valid = csr.is_signature_valid
    except (UnsupportedAlgorithm, TypeError, ValueError) as exc:
        raise InputError(f"cannot check the signature of CSR {what}: {exc}", code="bad_csr") from None
    if not valid:
        raise InputError(
            f"CSR {what} has a bad signature: it was not signed by the key it carries", code="bad_csr"
        )
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
    _refuse_service_id(parsed)
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
            write_atomically(issued.key_path, private_key_pem(key), mode=KEY_MODE)
        write_atomically(issued.cert_path, certificate_pem(cert, issuer.cert))
        write_atomically(issued.bundle_path, state.file(BUNDLE).read_bytes())
    except OSError as exc:
        raise CaError(
            f"issued serial {format_serial(cert.serial_number)} but could not write {exc.filename}: "
            f"{exc.strerror}; re-run after fixing it, and revoke that serial"
        ) from None
    return issued


def _refuse_service_id(spiffe_id: SpiffeId) -> None:
    if str(spiffe_id) == str(service_id(spiffe_id.trust_domain)):
        raise Refused(
            f"{spiffe_id} is reserved for the CA service ('ca serve'): a workload holding it could "
            "impersonate the CA to enrolling workloads"
        )


def _sign_and_insert(db, sign, spiffe_id: str, *, now: datetime) -> x509.Certificate:
    """``sign()`` until the serial is free, recording the certificate inside ``db``'s transaction."""
    for _ in range(_SERIAL_ATTEMPTS):
        cert = sign()
        if StateDir.insert(db, cert, spiffe_id, now=now):
            return cert
    raise CaError(f"could not find a free serial number in {_SERIAL_ATTEMPTS} attempts")


def _issue_recorded(
    state: StateDir, issuer: Issuer, spiffe_id: str, public_key, *, ttl: timedelta, now: datetime,
    dns_names: Sequence[str] = (),
) -> x509.Certificate:
    """Sign and record in one transaction (the service's path: no files are written)."""
    with state.transaction() as db:
        return _sign_and_insert(
            db, lambda: issuer.issue(spiffe_id, public_key, ttl=ttl, now=now, dns_names=dns_names), spiffe_id,
            now=now,
        )


# --- rotate and drop-old -------------------------------------------------------------------------


@dataclass(frozen=True)
class Rotated:
    old: CaGeneration
    new: CaGeneration
    bundle: list[x509.Certificate]  # the roots in bundle.pem now: the old ones and the new one
    archive: Path


def _lifetime(cert: x509.Certificate) -> timedelta:
    """The TTL a CA certificate was made with (its validity minus the clock-skew backdating)."""
    return max(cert.not_valid_after_utc - cert.not_valid_before_utc - CLOCK_SKEW, timedelta(seconds=1))


def rotate(
    state: StateDir,
    *,
    now: datetime,
    passphrase: bytes | None = None,
    key_type: str | None = None,
    root_ttl: timedelta | None = None,
    ttl: timedelta | None = None,
) -> Rotated:
    """Make generation N+1 (a new root and intermediate) current, keep generation N trusted.

    Generation N's four files move to DIR/generations/N/; its root stays in bundle.pem next to the
    new one, so sidecars holding either kind of leaf keep verifying each other while workloads are
    re-issued one by one; its intermediate keeps signing a CRL for its leaves (crl.pem then holds
    one CRL per live generation). New leaves are signed by the new intermediate. Lifetimes and key
    type default to those of the current generation.

    Everything is generated and checked first; the files are then written inside one index
    transaction (which also serializes against revocations and a concurrent rotate). Should a write
    fail half-way, the previous generation is already complete in DIR/generations/N/.
    """
    old_issuers = live_issuers(state, passphrase)  # refuses a wrong passphrase before anything happens
    old_issuer = old_issuers[0]
    old_root = state.load_certificate(ROOT_CERT)
    key_type = key_type or state.key_type
    root_ttl = root_ttl or _lifetime(old_root)
    ttl = ttl or min(_lifetime(old_issuer.cert), root_ttl)
    if ttl > root_ttl:
        raise InputError(
            f"--ttl {format_duration(ttl.total_seconds())} (the intermediate's lifetime) must not be longer "
            f"than --root-ttl {format_duration(root_ttl.total_seconds())}"
        )
    with state.transaction() as db:
        number = StateDir.generation_number(db)
        trust_domain = state.trust_domain
        root_key = generate_key(key_type)
        root = make_root(trust_domain, root_key, ttl=root_ttl, now=now, generation=number + 1)
        intermediate_key = generate_key(key_type)
        intermediate = make_intermediate(
            trust_domain, intermediate_key, root=root, root_key=root_key, ttl=ttl, now=now, generation=number + 1
        )
        archive = state.file(GENERATIONS) / str(number)
        archive.mkdir(mode=0o700, parents=True, exist_ok=True)
        for name in CA_FILES:
            mode = KEY_MODE if name.endswith(".key") else PUBLIC_MODE
            write_atomically(archive / name, state.file(name).read_bytes(), mode=mode)
        bundle = [cert for cert in state.bundle_roots() if cert != root] + [root]
        pem = serialization.Encoding.PEM
        for name, data, mode in (
            (INTERMEDIATE_KEY, private_key_pem(intermediate_key, passphrase), KEY_MODE),
            (ROOT_KEY, private_key_pem(root_key, passphrase), KEY_MODE),
            (INTERMEDIATE_CERT, intermediate.public_bytes(pem), PUBLIC_MODE),
            (ROOT_CERT, root.public_bytes(pem), PUBLIC_MODE),
            (BUNDLE, certificate_pem(*bundle), PUBLIC_MODE),
        ):
            write_atomically(state.file(name), data, mode=mode)
        StateDir.set_meta(db, "generation", str(number + 1))
        StateDir.set_meta(db, "key_type", key_type)
        write_crls(state, db, [Issuer(intermediate, intermediate_key, trust_domain), *old_issuers], now=now)
    old = CaGeneration(number, archive, old_root, old_issuer.cert, False)
    new = CaGeneration(number + 1, state.path, root, intermediate, True)
    return Rotated(old, new, bundle, archive)


@dataclass(frozen=True)
class Blocker:
    """An unexpired, unrevoked certificate that still chains to a root about to be dropped."""

    record: Record
    root: x509.Certificate


@dataclass(frozen=True)
class Dropped:
    dropped: list[x509.Certificate]  # roots removed from bundle.pem
    kept: list[x509.Certificate]  # roots still in it
    forced_past: list[Blocker]  # certificates that chain to a dropped root (only with force)


class DropRefused(Refused):
    """``ca bundle --drop-old`` without --force while certificates still chain to an old root."""

    def __init__(self, blockers: list[Blocker]):
        self.blockers = blockers
        roots = sorted({blocker.root.subject.rfc4514_string() for blocker in blockers})
        super().__init__(
            f"refusing to drop {', '.join(repr(root) for root in roots)} from the bundle: "
            f"{len(blockers)} unexpired, unrevoked certificate(s) still chain to it (listed on stdout); "
            "re-issue them from the new intermediate (or revoke them), or pass --force",
            code="certificates_still_chain",
        )


def _generation_of(cert: x509.Certificate, generations: Sequence[CaGeneration]) -> CaGeneration | None:
    for generation in generations:
        if cert.issuer == generation.intermediate.subject:
            try:
                cert.verify_directly_issued_by(generation.intermediate)
            except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
                continue
            return generation
    return None


def drop_old_roots(state: StateDir, *, now: datetime, force: bool = False, passphrase: bytes | None = None) -> Dropped:
    """Remove every root but the current one from bundle.pem, and their CRLs from crl.pem.

    Refuses (DropRefused, listing them) while unexpired, unrevoked certificates of the index still
    chain to a root being dropped: the workloads holding them would be refused by every sidecar
    that receives the new bundle. ``force`` drops anyway and returns those certificates.
    """
    generations = state.generations()
    current_root = generations[0].root
    roots = state.bundle_roots()
    dropped = [root for root in roots if root != current_root]
    kept = [root for root in roots if root == current_root] or [current_root]
    blockers = []
    for record, cert in state.valid_certificates(now):
        generation = _generation_of(cert, generations)
        if generation is not None and generation.root in dropped:
            blockers.append(Blocker(record, generation.root))
    if not dropped:
        return Dropped([], kept, [])
    if blockers and not force:
        raise DropRefused(blockers)
    issuer = load_issuer(state, passphrase)  # the one generation left; a wrong passphrase changes nothing
    with state.transaction() as db:
        write_atomically(state.file(BUNDLE), certificate_pem(*kept))
        write_crls(state, db, [issuer], now=now)
    return Dropped(dropped, kept, blockers)


# --- the CA service: its identity, renewal, enrollment tokens --------------------------------------

SERVICE_PATH = "/ca"
SERVICE_TTL = timedelta(hours=24)
TOKEN_PREFIX = "mst1_"  # recognisable by secret scanners; "mtls-sidecar token, version 1"
DEFAULT_ENROLL_CERT_TTL = timedelta(hours=24)


def service_id(trust_domain: str) -> SpiffeId:
    """The CA service's own X.509-SVID ID, ``spiffe://TD/ca``; reserved, ``ca issue`` refuses it."""
    return parse_spiffe_id(f"spiffe://{trust_domain}{SERVICE_PATH}", require_path=True)


def issue_service_cert(
    state: StateDir, issuer: Issuer, public_key, *, now: datetime, dns_names: Sequence[str] = ()
) -> x509.Certificate:
    """The certificate ``ca serve`` presents: ``spiffe://TD/ca`` (plus ``dns_names``), recorded in the index,
    valid for SERVICE_TTL or until the intermediate expires, whichever comes first."""
    ttl = min(SERVICE_TTL, issuer.cert.not_valid_after_utc - now)
    if ttl <= timedelta(0):
        raise Refused(
            f"the intermediate CA expired at {format_time(issuer.cert.not_valid_after_utc)}; rotate the CA",
            code="ca_expired",
        )
    try:
        dns_names = [validate_dns_name(name) for name in dns_names]
    except ValueError as exc:
        raise InputError(f"--dns: {exc}") from None
    return _issue_recorded(
        state, issuer, str(service_id(state.trust_domain)), public_key, ttl=ttl, now=now, dns_names=dns_names
    )


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
    intermediate's expiry) and keeps its DNS names. Raises Refused with ``code`` a reason code.
    """
    if not chain:
        raise Refused("no client certificate: renewal is authenticated by the current one", code="no_client_cert")
    leaf, *intermediates = chain
    try:
        verified = verify_svid_chain(leaf, intermediates, roots, now=now, role=CLIENT)
    except VerifyError as exc:
        raise Refused(exc.detail, code=exc.reason) from None
    remaining = issuer.cert.not_valid_after_utc - now
    if remaining <= timedelta(0):
        raise Refused(
            f"the intermediate CA expired at {format_time(issuer.cert.not_valid_after_utc)}; rotate the CA",
            code="ca_expired",
        )
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns_names = san.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        dns_names = []
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
        ttl = min(max(record.not_after - record.issued_at, timedelta(seconds=1)), remaining)
        return _sign_and_insert(
            db, lambda: issuer.issue(spiffe_id, csr.public_key(), ttl=ttl, now=now, dns_names=dns_names),
            spiffe_id, now=now,
        )


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
    _refuse_service_id(parsed)
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
    happen in one BEGIN IMMEDIATE transaction: two requests with the same token cannot both win, and
    a refused or failed issuance leaves the token unused. Returns (certificate, SPIFFE ID).
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
        remaining = issuer.cert.not_valid_after_utc - now
        ttl = min(timedelta(seconds=found.cert_ttl_s), remaining)
        if ttl <= timedelta(0):
            raise Refused("the intermediate CA has expired; rotate the CA", code="ca_expired")
        cert = _sign_and_insert(
            db, lambda: issuer.issue(found.spiffe_id, csr.public_key(), ttl=ttl, now=now), found.spiffe_id, now=now,
        )
        StateDir.mark_token_used(db, digest, at=now, serial=cert.serial_number)
    return cert, found.spiffe_id


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
    issuers = live_issuers(state, passphrase)  # a wrong passphrase is refused before the index changes
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
    issuers = live_issuers(state, passphrase)
    with state.transaction() as db:
        return write_crls(state, db, issuers, now=now)[0]


def live_issuers(state: StateDir, passphrase: bytes | None) -> list[Issuer]:
    """The intermediates of every live generation (see ``ca.store``), current first, keys loaded."""
    return [load_issuer(state, passphrase, generation) for generation in state.live_generations()]


def write_crls(
    state: StateDir, db, issuers: Sequence[Issuer], *, now: datetime
) -> list[x509.CertificateRevocationList]:
    """Sign one CRL per issuer (current first) under one new CRL number, write DIR/crl.pem; inside ``db``'s
    transaction, so concurrent revocations produce CRL files in commit order.

    With one issuer the file is that CRL alone, as before any rotation. With several (after ``ca
    rotate``, until ``ca bundle --drop-old``), each CRL is preceded by its issuer's certificate: a
    sidecar whose own chain goes through the other intermediate has no other way to check that CRL's
    signature. Readers that want CRLs only (``openssl crl``, our ``read_crls``) skip the certificates.
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
