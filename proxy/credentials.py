"""Load the sidecar's identity files into one immutable ``Credentials`` value.

Theory of operation: every configured file is opened and read exactly once per load (stat, then
bytes, then parse), so a load racing with a writer sees one snapshot of each file, and the stat taken
*before* reading lets a watcher notice any write that lands after it. Every check runs even when an
earlier one failed, and all problems are raised together in CredentialError, each naming the file and
what to do. Nothing here mutates shared state: a reload builds a new value, and the caller swaps it in
with one assignment, or keeps the old one when this raises.

The chain is checked by the shared verifier (``mtls.trust``), the one that decides about peers in the
handshake: its path is built by OpenSSL with time checks switched off, then validity and revocation
are decided by the trust store's rules for every certificate of the path and put in words here, all of
them, so an expired certificate gets a message saying which one and when. ``identity.bundle`` holds the
roots of our own trust domain (the one in our own SPIFFE ID), each ``trust_domains`` entry those of a
federated one; each file is PEM or a SPIFFE bundle (``mtls.bundles``) and its roots must not name another
trust domain. A peer is verified against the bundle of its own trust domain only. CRLs are bound to the
CA that signed them.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import MappingProxyType
from typing import Mapping, Sequence

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from mtls.bundles import (
    PEM,
    Bundle,
    BundleError,
    check_sequence,
    check_serves,
    parse_bundle,
)
from mtls.durations import roughly
from mtls.files import FileStamp
from mtls.reasons import EXPIRED, NOT_YET_VALID
from mtls.spiffe import NotSvid, SpiffeId, svid_id
from mtls.trust import TrustStore, VerifyError, build_path, validity
from proxy.config import IdentityConfig, TrustDomainConfig

EXPIRY_WARNING = timedelta(hours=24)
# OpenSSL verify errors meaning "no issuer found for this certificate".
_NO_ISSUER_ERRORS = (2, 20)  # X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT(_LOCALLY)

_CERTIFICATE = "CERTIFICATE"
_DER = serialization.Encoding.DER
_CRL = "X509 CRL"
_PRIVATE_KEY = "(?:EC |RSA |ENCRYPTED )?PRIVATE KEY"


@dataclass(frozen=True, eq=False)
class Credentials:
    """A consistent snapshot of our identity. Compared by identity: a reload makes a new object."""

    cert_chain: tuple[x509.Certificate, ...]  # leaf first, then intermediates, as in the cert file
    key: PrivateKeyTypes
    bundle: tuple[x509.Certificate, ...]  # trust roots of our trust domain (several during CA rotation)
    bundles: Mapping[str, Bundle]  # every trusted trust domain (ours and the federated ones) -> its bundle
    crls: tuple[x509.CertificateRevocationList, ...]  # only CRLs bound to a CA of a bundle
    trust: TrustStore  # bundles and CRLs as the verifier uses them: peers are checked against this
    spiffe_id: SpiffeId  # of our own leaf
    not_before: datetime  # leaf validity, UTC aware
    not_after: datetime
    config: IdentityConfig  # the paths these were read from
    files: Mapping[Path, FileStamp]  # stamp of each file, taken just before it was read

    @property
    def leaf(self) -> x509.Certificate:
        return self.cert_chain[0]

    @property
    def revoked_serials(self) -> frozenset[int]:
        """Every serial our CRLs list, for counting; whether a peer is revoked is ``trust``'s decision."""
        return self.trust.revoked_serials


class CredentialError(Exception):
    """Every problem found with the identity files, one sentence each.

    ``failed_bundles`` repeats those about trust bundle files, for readiness to name them.
    """

    def __init__(self, problems: list[str], failed_bundles: list[str] = ()):
        super().__init__("\n".join(problems))
        self.problems = list(problems)
        self.failed_bundles = list(failed_bundles)


def load_credentials(
    identity: IdentityConfig,
    trust_domains: Sequence[TrustDomainConfig] = (),
    *,
    previous: Credentials | None = None,
    now: datetime | None = None,
) -> Credentials:
    """Read, parse and validate the identity files and the federated bundles; raise CredentialError
    listing every problem.

    Validation: each file readable, non-empty and complete PEM (a bundle may be a SPIFFE bundle); the
    key matches the leaf; the leaf is an X.509-SVID; the chain verifies against the bundle; every
    certificate on the path is valid at ``now``; each CRL is signed by a CA on our path or in the
    bundle; none of ours is revoked; each federated bundle is for a trust domain other than ours, its
    roots name no other one, and its ``spiffe_sequence`` is not older than ``previous``'s; no CRL
    is older than ``previous``'s of the same CA (``crl_rollbacks``). Expiry within a day is not a problem here; see ``expiry_warnings``.
    """
    now = _utc(now)
    problems: list[str] = []
    stamps: dict[Path, FileStamp] = {}

    cert_data = _read_file(identity.cert, "certificate", "identity.cert", problems, stamps)
    key_data = _read_file(identity.key, "private key", "identity.key", problems, stamps)
    bundle_data = _read_file(identity.bundle, "trust bundle", "identity.bundle", problems, stamps)
    failed_bundles = problems[-1:] if bundle_data is None else []
    crl_data = _read_file(identity.crl, "CRL", "identity.crl", problems, stamps) if identity.crl else None

    chain = _certificates(identity.cert, cert_data, problems)
    key = _private_key(identity.key, key_data, problems)
    before = len(problems)
    own_bundle = _own_bundle(identity.bundle, bundle_data, problems)
    failed_bundles += problems[before:]
    bundle = own_bundle.roots if own_bundle is not None else ()
    crls = _crls(identity.crl, crl_data, problems) if identity.crl else ()
    federated = _federated_bundles(trust_domains, previous, problems, failed_bundles, stamps)

    spiffe_id = None
    if chain:
        spiffe_id = _leaf_id(identity.cert, chain, problems)
        if key is not None and not _same_public_key(chain[0], key):
            problems.append(
                f"{identity.key}: this private key does not belong to the certificate in {identity.cert}; "
                "install the key that was issued together with that certificate"
            )
    trusted_roots = _check_bundle(identity.bundle, bundle, problems)
    path = _verified_path(identity, chain, trusted_roots, problems) if chain and trusted_roots else None
    for cert in path or chain:
        _check_validity(identity.bundle if cert in bundle else identity.cert, cert, now, problems)
    trust = None
    bundles: dict[str, Bundle] = {}
    if spiffe_id is not None:  # the bundle is our trust domain's: without our ID, CRLs cannot be bound
        own = spiffe_id.trust_domain
        if own_bundle is not None:
            _check_own_bundle(identity.bundle, own_bundle, own, previous, problems, failed_bundles)
            bundles[own] = replace(own_bundle, roots=tuple(trusted_roots))
        if own in federated:
            problems.append(
                f"trust_domains.{own}: that is our own trust domain (the one in {identity.cert}); "
                "its roots go in identity.bundle"
            )
        bundles.update((name, found) for name, found in federated.items() if name != own)
        authorities = tuple(path or chain[1:])
        if identity.crl and crl_data is not None:
            authorities += _crl_file_authorities(identity.crl, crl_data)
        try:
            trust = TrustStore(
                {name: found.roots for name, found in bundles.items()}, crls=crls, authorities=authorities,
                holder="this sidecar",
            )
        except ValueError as exc:  # one root under two trust domains
            problems.append(f"trust bundles: {exc}; a root vouches for one trust domain only")
            trust = None
        if path is not None and trust is not None:  # else no CA of ours is known to chain to the bundle
            _report_untrusted_crls(identity, crls, trust, problems)
            _check_not_revoked(identity, path, trust, problems)
        if previous is not None and trust is not None:
            problems.extend(crl_rollbacks(identity, previous.trust, trust))

    if problems:
        raise CredentialError(problems, failed_bundles)
    leaf = chain[0]
    return Credentials(
        cert_chain=chain,
        key=key,
        bundle=bundle,
        bundles=MappingProxyType(bundles),
        crls=trust.crls,
        trust=trust,
        spiffe_id=spiffe_id,
        not_before=leaf.not_valid_before_utc,
        not_after=leaf.not_valid_after_utc,
        config=identity,
        files=MappingProxyType(stamps),
    )


def expiry_warnings(
    creds: Credentials, now: datetime | None = None, *, within: timedelta = EXPIRY_WARNING
) -> list[str]:
    """Things that will break soon: certificates expiring within ``within`` or their last third of life (or expired
    since the load), and trust roots in the bundle that expire. (What a stale CRL does: ``proxy.check``.)"""
    now = _utc(now)
    warnings = []
    for position, cert in enumerate(creds.cert_chain):
        what = f"our certificate for {creds.spiffe_id}" if position == 0 else f"intermediate {_subject(cert)}"
        warning = _expiry_warning(what, cert, now, within, "renew it")
        if warning:
            warnings.append(f"{creds.config.cert}: {warning}")
    for cert in creds.bundle:
        warning = _expiry_warning(f"trust root {_subject(cert)}", cert, now, within,
                                  "peers chaining to it will be refused; rotate the CA (ca rotate)")
        if warning:
            warnings.append(f"{creds.config.bundle}: {warning}")
    return warnings


def crl_rollbacks(identity: IdentityConfig, in_force: TrustStore, new: TrustStore) -> list[str]:
    """Why the CRLs of ``new`` may not replace those ``in_force``: a CRL of the same CA (name and key)
    with a lower CRL number than the one in force, or the same number and other content. A CRL only
    ever moves forward; an older one, however genuine, would un-revoke what was revoked since."""
    current = {(i.trust_domain, i.issuer, i.signer_key): i for i in in_force.issuer_crls}
    problems = []
    for issuer in new.issuer_crls:
        old = current.get((issuer.trust_domain, issuer.issuer, issuer.signer_key))
        if old is None or old.number is None or issuer.number is None:
            continue
        what = f"{identity.crl}: the CRL from {_name(issuer.issuer)} has CRL number {issuer.number}"
        keep = f"keeping CRL number {old.number}; install the CA's current CRL (ca crl)"
        if issuer.number < old.number:
            problems.append(f"{what}, lower than number {old.number} already in force (an old copy?); {keep}")
        elif issuer.number == old.number and issuer.newest.public_bytes(_DER) != old.newest.public_bytes(_DER):
            problems.append(f"{what}, the number already in force, but different content; {keep}")
    return problems


# --- reading files ----------------------------------------------------------------------------


def _read_file(
    path: Path, what: str, setting: str, problems: list[str], stamps: dict[Path, FileStamp]
) -> bytes | None:
    try:
        with open(path, "rb") as file:
            stamps[path] = FileStamp.of(os.fstat(file.fileno()))
            data = file.read()
    except FileNotFoundError:
        problems.append(f"{path}: {what} file does not exist; check {setting} in the config")
        return None
    except PermissionError:
        problems.append(f"{path}: cannot read the {what} file: permission denied for this user")
        return None
    except OSError as exc:
        problems.append(f"{path}: cannot read the {what} file: {exc.strerror or exc}")
        return None
    if not data.strip():
        problems.append(f"{path}: {what} file is empty; is it still being written?")
        return None
    return data


def _pem_blocks(path: Path, data: bytes, label: str, what: str, problems: list[str]) -> list[bytes]:
    """The complete PEM blocks whose label matches the regex ``label``; a problem if there are none or
    the last one is cut off (a file caught half-written)."""
    text = data.decode("ascii", errors="replace")
    begins = list(re.finditer(rf"-----BEGIN ({label})-----", text))
    blocks = []
    for begin in begins:
        end = text.find(f"-----END {begin.group(1)}-----", begin.end())
        if end < 0:
            break
        blocks.append(text[begin.start() : end].encode() + f"-----END {begin.group(1)}-----\n".encode())
    if not begins:
        problems.append(f"{path}: {_no_pem_reason(data, text)}; expected a PEM {what}")
    elif not blocks:
        problems.append(f"{path}: no complete PEM {what} block; is the file half-written?")
    elif len(blocks) < len(begins):
        problems.append(f"{path}: the last PEM {what} block has no END line; is the file half-written?")
    return blocks if len(blocks) == len(begins) else []


def _no_pem_reason(data: bytes, text: str) -> str:
    if data[:1] == b"\x30":
        return "looks like binary DER, not PEM"
    labels = sorted(set(re.findall(r"-----BEGIN ([A-Z0-9 ]+)-----", text)))
    if labels:
        return f"holds only {', '.join(labels)} blocks"
    return "no PEM block found"


def _certificates(path: Path, data: bytes | None, problems: list[str]) -> tuple[x509.Certificate, ...]:
    return _parsed(path, data, _CERTIFICATE, "certificate", x509.load_pem_x509_certificate, problems)


def _crls(path: Path, data: bytes | None, problems: list[str]) -> tuple[x509.CertificateRevocationList, ...]:
    return _parsed(path, data, _CRL, "CRL", x509.load_pem_x509_crl, problems)


def _parsed(path: Path, data: bytes | None, label: str, what: str, load, problems: list[str]) -> tuple:
    """Every PEM block of ``data`` labelled ``label``, parsed with ``load``; nothing if one fails."""
    if data is None:
        return ()
    items = []
    blocks = _pem_blocks(path, data, label, what, problems)
    for number, block in enumerate(blocks, 1):
        try:
            items.append(load(block))
        except ValueError as exc:
            problems.append(f"{path}: {what} #{number} cannot be parsed: {exc}")
    return tuple(items) if len(items) == len(blocks) else ()


def _private_key(path: Path, data: bytes | None, problems: list[str]) -> PrivateKeyTypes | None:
    if data is None:
        return None
    blocks = _pem_blocks(path, data, _PRIVATE_KEY, "private key", problems)
    if not blocks:
        return None
    if len(blocks) > 1:
        problems.append(f"{path}: holds {len(blocks)} private keys; it must hold exactly one")
        return None
    try:
        return serialization.load_pem_private_key(blocks[0], password=None)
    except TypeError:  # cryptography's way of saying "encrypted, and no password given"
        problems.append(f"{path}: the private key is encrypted; the sidecar needs an unencrypted key "
                        "(protect it with file mode 0600 instead)")
    except (ValueError, UnsupportedAlgorithm) as exc:
        problems.append(f"{path}: the private key cannot be parsed: {exc}")
    return None


# --- checks -----------------------------------------------------------------------------------


def _leaf_id(path: Path, chain: tuple[x509.Certificate, ...], problems: list[str]) -> SpiffeId | None:
    try:
        return svid_id(chain[0], role=None)
    except NotSvid as exc:
        hint = ""
        if _is_ca(chain[0]) and not all(_is_ca(cert) for cert in chain):
            hint = "; the workload certificate must come first in the file, then its intermediates"
        problems.append(f"{path}: the first certificate is not an X.509-SVID: {exc}{hint}")
        return None


def _same_public_key(cert: x509.Certificate, key: PrivateKeyTypes) -> bool:
    def spki(public_key) -> bytes:
        return public_key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    return spki(cert.public_key()) == spki(key.public_key())


def _own_bundle(path: Path, data: bytes | None, problems: list[str]) -> Bundle | None:
    """identity.bundle: PEM (with the PEM reader's detailed messages) or a SPIFFE bundle; None if unusable."""
    if data is None:
        return None
    if data.lstrip()[:1] == b"{":
        try:
            return parse_bundle(data)
        except BundleError as exc:
            problems.append(f"{path}: {exc}")
            return None
    roots = _certificates(path, data, problems)
    return Bundle(roots, PEM) if roots else None


def _check_own_bundle(
    path: Path, bundle: Bundle, own: str, previous: Credentials | None, problems: list[str], failed: list[str]
) -> None:
    try:
        check_serves(bundle, own)
        if previous is not None and own in previous.bundles:
            check_sequence(bundle, previous.bundles[own])
    except BundleError as exc:
        problem = (
            f"{path}: {exc} (identity.bundle holds the roots of our own trust domain {own}; "
            "another trust domain's roots go under trust_domains)"
        )
        problems.append(problem)
        failed.append(problem)


def _federated_bundles(
    trust_domains: Sequence[TrustDomainConfig],
    previous: Credentials | None,
    problems: list[str],
    failed: list[str],
    stamps: dict[Path, FileStamp],
) -> dict[str, Bundle]:
    """The bundle of each ``trust_domains`` entry; a problem (also in ``failed``) for each unusable one."""
    found = {}
    for domain in trust_domains:
        setting = f"trust_domains.{domain.name}.bundle"
        before = len(problems)
        data = _read_file(domain.bundle, f"trust bundle of {domain.name}", setting, problems, stamps)
        if data is not None:
            try:
                bundle = parse_bundle(data)
                check_serves(bundle, domain.name)
                if previous is not None and domain.name in previous.bundles:
                    check_sequence(bundle, previous.bundles[domain.name])
                found[domain.name] = bundle
            except BundleError as exc:
                problems.append(f"{domain.bundle}: trust bundle of {domain.name} ({setting}): {exc}")
        failed.extend(problems[before:])
    return found


def _check_bundle(path: Path, bundle: tuple[x509.Certificate, ...], problems: list[str]) -> list[x509.Certificate]:
    """The bundle's CA certificates; a problem for each certificate that is not a CA."""
    roots = []
    for number, cert in enumerate(bundle, 1):
        if _is_ca(cert):
            roots.append(cert)
        else:
            problems.append(
                f"{path}: certificate #{number} ({_subject(cert)}) is not a CA certificate; the bundle must "
                "hold trust roots (the CA's bundle.pem), not a workload certificate"
            )
    return roots


def _verified_path(
    identity: IdentityConfig,
    chain: tuple[x509.Certificate, ...],
    roots: list[x509.Certificate],
    problems: list[str],
) -> tuple[x509.Certificate, ...] | None:
    """The path leaf -> root that OpenSSL builds (times unchecked), or None after recording why not."""
    try:
        return build_path(chain[0], chain[1:], roots)
    except VerifyError as exc:
        failure = exc.x509
        at = _subject(failure.certificate) if failure.certificate is not None else "?"
        hint = ""
        if failure.code in _NO_ISSUER_ERRORS:
            if len(chain) == 1:
                hint = "; the file holds only the leaf: append its intermediate CA certificate"
            else:
                hint = f"; is {identity.bundle} the bundle of the CA that issued this certificate?"
        problems.append(
            f"{identity.cert}: the chain does not verify against {identity.bundle}: {failure.text} "
            f"(at {at}, depth {failure.depth}){hint}"
        )
        return None


def _check_validity(path: Path, cert: x509.Certificate, now: datetime, problems: list[str]) -> None:
    what = "certificate" if not _is_ca(cert) else "CA certificate"
    reason = validity(cert, now)
    if reason == EXPIRED:
        problems.append(
            f"{path}: {what} {_subject(cert)} expired {_when(cert.not_valid_after_utc)} "
            f"({roughly(now - cert.not_valid_after_utc)} ago); install a renewed one"
        )
    elif reason == NOT_YET_VALID:
        problems.append(
            f"{path}: {what} {_subject(cert)} is not valid until {_when(cert.not_valid_before_utc)} "
            f"(in {roughly(cert.not_valid_before_utc - now)}); check this machine's clock"
        )


def _report_untrusted_crls(
    identity: IdentityConfig,
    crls: tuple[x509.CertificateRevocationList, ...],
    trust: TrustStore,
    problems: list[str],
) -> None:
    """A problem for each CRL the trust store could not bind to a CA of our bundle: it cannot be trusted."""
    for number, crl in enumerate(crls, 1):
        if any(crl is rejected for rejected in trust.rejected_crls):
            problems.append(
                f"{identity.crl}: CRL #{number} (issuer {_name(crl.issuer)}) is not signed by any CA in "
                f"{identity.cert} or {identity.bundle}, so it cannot be trusted; fetch it from our CA (ca crl)"
            )


def _crl_file_authorities(path: Path, data: bytes) -> tuple[x509.Certificate, ...]:
    """CA certificates that travel in the CRL file: ``ca crl`` puts each intermediate before its CRL
    while a rotation keeps two generations trusted, so that the CRL of the other generation's
    intermediate can be bound to it. The trust store uses only those that chain to our bundle."""
    found = []
    for block in _pem_blocks(path, data, _CERTIFICATE, "certificate", []):
        try:
            found.append(x509.load_pem_x509_certificate(block))
        except ValueError:
            continue
    return tuple(found)


def _check_not_revoked(
    identity: IdentityConfig, path: tuple[x509.Certificate, ...], trust: TrustStore, problems: list[str]
) -> None:
    for revoked in trust.revocations(path):
        cert = revoked.certificate
        what = "our own certificate" if revoked.position == 0 else f"our intermediate {_subject(cert)}"
        problems.append(
            f"{identity.crl}: {what} (serial {cert.serial_number:x}) is revoked by the CRL from "
            f"{_name(revoked.crl.issuer)}; install a newly issued certificate"
        )


# --- small helpers ----------------------------------------------------------------------------


def _utc(now: datetime | None) -> datetime:
    return datetime.now(timezone.utc) if now is None else now.astimezone(timezone.utc)


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except (x509.ExtensionNotFound, ValueError):
        return False


def _name(name: x509.Name) -> str:
    return repr(name.rfc4514_string())


def _subject(cert: x509.Certificate) -> str:
    """How a message names a certificate: its subject, else (our CA leaves it empty) its URI SAN."""
    if cert.subject.rfc4514_string():
        return _name(cert.subject)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    except (x509.ExtensionNotFound, x509.DuplicateExtension, ValueError):
        uris = []
    return uris[0] if uris else f"with serial {cert.serial_number:x}"


def _when(moment: datetime) -> str:
    return f"at {moment:%Y-%m-%dT%H:%M:%SZ}"


def _expiry_warning(what: str, cert: x509.Certificate, now: datetime, within: timedelta, advice: str) -> str | None:
    """Warn within ``within`` of expiry, or in the last third of a shorter life: a fresh 24-hour
    certificate (the ``ca issue`` default) is not "expiring", one with 7 hours left is."""
    expires = cert.not_valid_after_utc
    if expires <= now:
        return f"{what} expired {_when(expires)}; {advice}"
    if expires - now <= min(within, (expires - cert.not_valid_before_utc) / 3):
        return f"{what} expires {_when(expires)}, in {roughly(expires - now)}; {advice}"
    return None
