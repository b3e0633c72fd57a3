"""The CA's own certificates, one generation (a root and its intermediate) at a time.

``ca init`` makes generation 1. ``ca rotate`` makes generation N+1 current and keeps N trusted: its
root stays in bundle.pem and its intermediate keeps signing a CRL for its leaves, while workloads are
re-issued. ``ca bundle --drop-old`` then retires every old root (see ``ca.store`` for the layout).
"""

from __future__ import annotations

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
    PrivateKey,
    certificate_pem,
    generate_key,
    make_intermediate,
    make_root,
    private_key_pem,
)
from ca.errors import InputError, Refused
from ca.issuance import service_id
from ca.revocation import write_crls
from ca.store import (
    BUNDLE,
    CA_FILES,
    GENERATIONS,
    INTERMEDIATE_CERT,
    INTERMEDIATE_KEY,
    ROOT_CERT,
    ROOT_KEY,
    CaGeneration,
    Record,
    StateDir,
)
from mtls.bundles import DEFAULT_REFRESH_HINT, spiffe_bundle_json
from mtls.durations import format_duration
from mtls.files import KEY_MODE, PUBLIC_MODE, write_atomically
from mtls.spiffe import InvalidSpiffeId, validate_trust_domain


def _check_lifetimes(*, root_ttl: timedelta, ttl: timedelta) -> None:
    if ttl > root_ttl:
        raise InputError(
            f"--ttl {format_duration(ttl.total_seconds())} (the intermediate's lifetime) must not be longer "
            f"than --root-ttl {format_duration(root_ttl.total_seconds())}"
        )


def _make_generation(
    trust_domain: str, key_type: str, *, root_ttl: timedelta, ttl: timedelta, now: datetime, number: int
) -> tuple[x509.Certificate, PrivateKey, Issuer]:
    """Generation ``number``: a new root valid for ``root_ttl``, and an intermediate under it valid for
    ``ttl``, with their new keys. Returns (root, root key, the intermediate as an Issuer)."""
    root_key = generate_key(key_type)
    root = make_root(trust_domain, root_key, ttl=root_ttl, now=now, generation=number)
    intermediate_key = generate_key(key_type)
    intermediate = make_intermediate(
        trust_domain, intermediate_key, root=root, root_key=root_key, ttl=ttl, now=now, generation=number
    )
    return root, root_key, Issuer(intermediate, intermediate_key, trust_domain)


# --- init --------------------------------------------------------------------------------------


def init_ca(
    directory: Path,
    *,
    trust_domain: str,
    key_type: str,
    root_ttl: timedelta,
    ttl: timedelta,
    passphrase: bytes | None,
    now: datetime,
    db: str | None = None,
) -> StateDir:
    """Create a root, an intermediate valid for ``ttl``, an empty CRL and the index (at ``db``, by default
    DIR/ca.db) in ``directory``."""
    if "://" in trust_domain:
        raise InputError(f"--trust-domain {trust_domain!r}: give the bare name, e.g. 'example.org'")
    try:
        validate_trust_domain(trust_domain)
    except InvalidSpiffeId as exc:
        raise InputError(f"invalid trust domain {trust_domain!r}: {exc.rule}") from None
    _check_lifetimes(root_ttl=root_ttl, ttl=ttl)
    state = StateDir(directory, db)
    state.ensure_free()
    root, root_key, issuer = _make_generation(trust_domain, key_type, root_ttl=root_ttl, ttl=ttl, now=now, number=1)
    state.create(
        trust_domain=trust_domain,
        key_type=key_type,
        root=root,
        root_key_pem=private_key_pem(root_key, passphrase),
        intermediate=issuer.cert,
        intermediate_key_pem=private_key_pem(issuer.key, passphrase),
        crls=[issuer.crl([], number=1, now=now), Issuer(root, root_key, trust_domain).crl([], number=1, now=now)],
    )
    return state


# --- rotate ------------------------------------------------------------------------------------


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
    old_issuers = state.live_issuers(passphrase)  # refuses a wrong passphrase before anything happens
    old_issuer = old_issuers[0]
    old_root = state.load_certificate(ROOT_CERT)
    key_type = key_type or state.key_type
    root_ttl = root_ttl or _lifetime(old_root)
    ttl = ttl or min(_lifetime(old_issuer.cert), root_ttl)
    _check_lifetimes(root_ttl=root_ttl, ttl=ttl)
    with state.transaction() as db:
        number = StateDir.generation_number(db)
        root, root_key, issuer = _make_generation(
            state.trust_domain, key_type, root_ttl=root_ttl, ttl=ttl, now=now, number=number + 1
        )
        archive = state.file(GENERATIONS) / str(number)
        archive.mkdir(mode=0o700, parents=True, exist_ok=True)
        for name in CA_FILES:
            mode = KEY_MODE if name.endswith(".key") else PUBLIC_MODE
            write_atomically(archive / name, state.file(name).read_bytes(), mode=mode)
        bundle = [cert for cert in state.bundle_roots() if cert != root] + [root]
        pem = serialization.Encoding.PEM
        for name, data, mode in (
            (INTERMEDIATE_KEY, private_key_pem(issuer.key, passphrase), KEY_MODE),
            (ROOT_KEY, private_key_pem(root_key, passphrase), KEY_MODE),
            (INTERMEDIATE_CERT, issuer.cert.public_bytes(pem), PUBLIC_MODE),
            (ROOT_CERT, root.public_bytes(pem), PUBLIC_MODE),
            (BUNDLE, certificate_pem(*bundle), PUBLIC_MODE),
        ):
            write_atomically(state.file(name), data, mode=mode)
        StateDir.set_meta(db, "generation", str(number + 1))
        StateDir.set_meta(db, "key_type", key_type)
        _next_bundle_sequence(db)
        write_crls(state, db, [issuer, *old_issuers], now=now, passphrase=passphrase)
    old = CaGeneration(number, archive, old_root, old_issuer.cert, False)
    new = CaGeneration(number + 1, state.path, root, issuer.cert, True)
    return Rotated(old, new, bundle, archive)


# --- bundle --drop-old -------------------------------------------------------------------------


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
    service = str(service_id(state.trust_domain))  # ca serve replaces its own as soon as bundle.pem changes
    for record, cert in state.valid_certificates(now):
        if record.spiffe_id == service:
            continue
        generation = _generation_of(cert, generations)
        if generation is not None and generation.root in dropped:
            blockers.append(Blocker(record, generation.root))
    if not dropped:
        return Dropped([], kept, [])
    if blockers and not force:
        raise DropRefused(blockers)
    issuer = state.load_issuer(passphrase)  # the one generation left; a wrong passphrase changes nothing
    with state.transaction() as db:
        write_atomically(state.file(BUNDLE), certificate_pem(*kept))
        _next_bundle_sequence(db)
        write_crls(state, db, [issuer], now=now, passphrase=passphrase)
    return Dropped(dropped, kept, blockers)


# --- the bundle as a SPIFFE bundle -------------------------------------------------------------

_BUNDLE_SEQUENCE = "bundle_sequence"  # meta key: bumped whenever bundle.pem changes (init's bundle is 1)


def _next_bundle_sequence(db) -> None:
    row = db.execute("SELECT value FROM meta WHERE key = ?", (_BUNDLE_SEQUENCE,)).fetchone()
    StateDir.set_meta(db, _BUNDLE_SEQUENCE, str((int(row["value"]) if row else 1) + 1))


def spiffe_bundle(state: StateDir) -> bytes:
    """bundle.pem as a SPIFFE bundle (JWK Set): its roots, and a ``spiffe_sequence`` that grows each
    time ``ca rotate`` or ``ca bundle --drop-old`` changes the roots, so consumers can refuse an older one."""
    roots = state.bundle_roots()
    with state.index.reading() as db:  # not StateDir.meta: a running ca serve must see each change
        row = db.execute("SELECT value FROM meta WHERE key = ?", (_BUNDLE_SEQUENCE,)).fetchone()
    sequence = int(row["value"]) if row else 1
    return spiffe_bundle_json(roots, sequence=sequence, refresh_hint=DEFAULT_REFRESH_HINT)
