"""Issuing and revoking on cryptography objects: no files, no database, no clock of its own.

The hierarchy is fixed and narrow: a root (``CA:TRUE, pathlen:1``) signs one online intermediate
(``CA:TRUE, pathlen:0``, name-constrained to the trust domain's URIs), and the intermediate signs
X.509-SVID leaves and the CRL. Every function takes ``now`` so tests can build certificates that are
expired or not yet valid without sleeping. Every issued leaf is checked with ``mtls.spiffe.svid_id``
before it is returned, so the CA cannot hand out a certificate the sidecar would refuse. A leaf's
subject (``O=TD, CN=web``) is for people reading access logs; its URI SAN is its only identity.
"""

from __future__ import annotations

import ipaddress
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Iterable, Union

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ca.errors import InputError, Refused
from ca.keycrypt import encrypted_pkcs8_pem
from mtls.durations import format_duration, roughly
from mtls.spiffe import InvalidSpiffeId, NotSvid, SpiffeId, parse_spiffe_id, svid_id

PrivateKey = Union[ec.EllipticCurvePrivateKey, ed25519.Ed25519PrivateKey, rsa.RSAPrivateKey]
PublicKey = Union[
    ec.EllipticCurvePublicKey, ed25519.Ed25519PublicKey, ed448.Ed448PublicKey, rsa.RSAPublicKey
]

KEY_TYPES = ("ec-p256", "ed25519", "rsa-3072")
DEFAULT_KEY_TYPE = "ec-p256"
CLOCK_SKEW = timedelta(minutes=1)  # not_before is backdated by this much (leaves: at most a tenth of their TTL)
CRL_LIFETIME = timedelta(hours=24)  # next_update of every CRL we sign
# RFC 5280 reasons that make sense for a workload certificate (no CA compromise, no hold).
REVOCATION_REASONS = (
    "unspecified",
    "keyCompromise",
    "affiliationChanged",
    "superseded",
    "cessationOfOperation",
    "privilegeWithdrawn",
)

_KEY_USAGE_BITS = (
    "digital_signature",
    "content_commitment",
    "key_encipherment",
    "data_encipherment",
    "key_agreement",
    "key_cert_sign",
    "crl_sign",
    "encipher_only",
    "decipher_only",
)


def _key_usage(*allowed: str) -> x509.KeyUsage:
    """A keyUsage extension with only the ``allowed`` bits set."""
    return x509.KeyUsage(**{bit: bit in allowed for bit in _KEY_USAGE_BITS})


_CA_KEY_USAGE = _key_usage("key_cert_sign", "crl_sign")
_LEAF_KEY_USAGE = _key_usage("digital_signature")
_LEAF_EKU = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])
_NAME_LIMIT = 64  # characters of an O or CN (RFC 5280: ub-organization-name, ub-common-name)
_DNS_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


def generate_key(key_type: str = DEFAULT_KEY_TYPE) -> PrivateKey:
    if key_type == "ec-p256":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    if key_type == "rsa-3072":
        return rsa.generate_private_key(public_exponent=65537, key_size=3072)
    raise ValueError(f"unknown key type {key_type!r}; choose one of {', '.join(KEY_TYPES)}")


def key_type_name(key: PublicKey | PrivateKey) -> str:
    """Name a key the way ``--key-type`` does: ``ec-p256``, ``ed25519``, ``rsa-3072`` (or ``rsa-2048`` ...)."""
    if isinstance(key, (ec.EllipticCurvePublicKey, ec.EllipticCurvePrivateKey)):
        return {"secp256r1": "ec-p256", "secp384r1": "ec-p384", "secp521r1": "ec-p521"}.get(
            key.curve.name, f"ec-{key.curve.name}"
        )
    if isinstance(key, (ed25519.Ed25519PublicKey, ed25519.Ed25519PrivateKey)):
        return "ed25519"
    if isinstance(key, (ed448.Ed448PublicKey, ed448.Ed448PrivateKey)):
        return "ed448"
    if isinstance(key, (rsa.RSAPublicKey, rsa.RSAPrivateKey)):
        return f"rsa-{key.key_size}"
    return type(key).__name__


def new_serial() -> int:
    """A random serial of exactly 159 bits: positive, below 2**159, always 40 hex digits."""
    return secrets.randbits(158) | (1 << 158)


def format_serial(serial: int) -> str:
    return format(serial, "x")


def format_time(moment: datetime) -> str:
    """ISO 8601 UTC with a ``Z``, to the second: ``2026-11-28T10:00:00Z``."""
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def validate_dns_name(name: str) -> str:
    """Return ``name`` if it is a DNS name fit for a SAN (``*.`` may be the first label), else raise ValueError."""
    try:
        ipaddress.ip_address(name)
    except ValueError:
        pass
    else:
        raise ValueError(f"DNS name {name!r} is an IP address; only DNS names are supported")
    labels = name.split(".")
    if labels[0] == "*" and len(labels) > 1:
        labels = labels[1:]
    if len(name) > 253 or not all(_DNS_LABEL.fullmatch(label) for label in labels):
        raise ValueError(
            f"{name!r} is not a DNS name (labels of letters, digits and '-', separated by '.', at most 253 bytes)"
        )
    return name


def private_key_pem(key: PrivateKey, passphrase: bytes | None = None) -> bytes:
    """PKCS#8 PEM; with ``passphrase``, encrypted as ``ca.keycrypt`` says (PBKDF2, 600,000 rounds)."""
    if passphrase:
        return encrypted_pkcs8_pem(key, passphrase)
    plain = serialization.NoEncryption()
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, plain)


def certificate_pem(*certs: x509.Certificate) -> bytes:
    return b"".join(cert.public_bytes(serialization.Encoding.PEM) for cert in certs)


def _signature_hash(key: PrivateKey) -> hashes.HashAlgorithm | None:
    if isinstance(key, (ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey)):
        return None  # EdDSA signs the message itself
    return hashes.SHA256()


def _name(organization: str, common_name: str) -> x509.Name:
    """``O=organization, CN=common_name``, each cut to the length X.509 allows."""
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, _at_most(_NAME_LIMIT, organization)),
            x509.NameAttribute(NameOID.COMMON_NAME, _at_most(_NAME_LIMIT, common_name)),
        ]
    )


def _at_most(limit: int, text: str) -> str:
    """``text``, or its first ``limit - 3`` characters and ``...`` when it is longer than ``limit``."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _ca_name(trust_domain: str, role: str, generation: int = 1) -> x509.Name:
    """``O=TD, CN=mtls-sidecar root CA``; after ``ca rotate``, ``... root CA 2``, ``... root CA 3``.

    Each generation gets its own names so that a CRL, an ``issuer`` field or an error message says
    which generation it belongs to (and OpenSSL never has to pick between two CAs of the same name).
    """
    suffix = "" if generation == 1 else f" {generation}"
    return _name(trust_domain, f"mtls-sidecar {role}{suffix}")


def workload_name(spiffe_id: SpiffeId) -> str:
    """The ID's last path segment: ``web`` for ``spiffe://td/ns/prod/sa/web``."""
    return spiffe_id.path.rsplit("/", 1)[1]


def _leaf_name(spiffe_id: SpiffeId) -> x509.Name:
    """``O=TD, CN=<workload name>``: for people reading access logs (nginx, haproxy and stunnel show the
    client's subject). Nothing reads it for identity; the URI SAN is the only identity."""
    return _name(spiffe_id.trust_domain, workload_name(spiffe_id))


def _ski(cert: x509.Certificate) -> x509.SubjectKeyIdentifier:
    return cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value


def make_root(
    trust_domain: str, key: PrivateKey, *, ttl: timedelta, now: datetime, generation: int = 1
) -> x509.Certificate:
    """A self-signed root for ``trust_domain``, valid from ``now`` (minus clock skew) for ``ttl``.

    ``generation`` counts rotations (``ca rotate``): 1 for the root made by ``ca init``.
    """
    name = _ca_name(trust_domain, "root CA", generation)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(new_serial())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + ttl)
        .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
        .add_extension(_CA_KEY_USAGE, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, _signature_hash(key))
    )


def make_intermediate(
    trust_domain: str,
    key: PrivateKey,
    *,
    root: x509.Certificate,
    root_key: PrivateKey,
    ttl: timedelta,
    now: datetime,
    generation: int = 1,
) -> x509.Certificate:
    """The online CA: ``pathlen:0``, and a URI name constraint so it can only name IDs in ``trust_domain``."""
    not_after = now + ttl
    if not_after > root.not_valid_after_utc:
        raise InputError(
            f"an intermediate valid for {format_duration(ttl.total_seconds())} would outlive the root, "
            f"which expires at {format_time(root.not_valid_after_utc)}"
        )
    return (
        x509.CertificateBuilder()
        .subject_name(_ca_name(trust_domain, "intermediate CA", generation))
        .issuer_name(root.subject)
        .public_key(key.public_key())
        .serial_number(new_serial())
        .not_valid_before(max(now - CLOCK_SKEW, root.not_valid_before_utc))
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_CA_KEY_USAGE, critical=True)
        .add_extension(
            x509.NameConstraints(
                permitted_subtrees=[x509.UniformResourceIdentifier(trust_domain)], excluded_subtrees=None
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(_ski(root)), critical=False
        )
        .sign(root_key, _signature_hash(root_key))
    )


@dataclass(frozen=True, slots=True)
class Revocation:
    serial: int
    revoked_at: datetime
    reason: str  # one of REVOCATION_REASONS


@dataclass(frozen=True)
class Issuer:
    """The online intermediate with its key: signs workload leaves and the CRL."""

    cert: x509.Certificate
    key: PrivateKey
    trust_domain: str

    def issue(
        self,
        spiffe_id: str,
        public_key: PublicKey,
        *,
        ttl: timedelta,
        now: datetime,
        dns_names: Iterable[str] = (),
        serial: int | None = None,
    ) -> x509.Certificate:
        """Sign an X.509-SVID for ``spiffe_id`` over ``public_key``.

        Raises InvalidSpiffeId for an invalid ID or one outside the trust domain, Refused when the
        intermediate has expired (code ``ca_expired``) or the leaf would outlive it (it is never
        silently shortened), InputError for a DNS name or key the X.509-SVID profile does not accept.

        ``not_before`` is backdated for clock skew by ``CLOCK_SKEW``, or by a tenth of ``ttl`` when
        that is less: a 10-second certificate backdated a whole minute would have most of its
        validity in the past, and a renewer computing "2/3 of the lifetime" from ``not_before``
        would find it due before it was issued.
        """
        parsed = parse_spiffe_id(spiffe_id, require_path=True)
        if parsed.trust_domain != self.trust_domain:
            raise InvalidSpiffeId(spiffe_id, f"outside this CA's trust domain {self.trust_domain!r}")
        ca_expires = self.cert.not_valid_after_utc
        if now >= ca_expires:
            raise Refused(
                f"the intermediate CA expired at {format_time(ca_expires)}; rotate the CA", code="ca_expired"
            )
        not_after = now + ttl
        if not_after > ca_expires:
            raise Refused(
                f"a certificate valid for {format_duration(ttl.total_seconds())} would outlive the "
                f"intermediate CA, which expires at {format_time(ca_expires)} "
                f"(in {roughly(ca_expires - now)}); use a shorter TTL"
            )
        try:
            names = [x509.UniformResourceIdentifier(str(parsed))]
            names += [x509.DNSName(validate_dns_name(name)) for name in dns_names]
        except ValueError as exc:
            raise InputError(str(exc)) from None
        leaf = (
            x509.CertificateBuilder()
            .subject_name(_leaf_name(parsed))
            .issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(serial if serial is not None else new_serial())
            .not_valid_before(max(now - min(CLOCK_SKEW, ttl / 10), self.cert.not_valid_before_utc))
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_LEAF_KEY_USAGE, critical=True)
            .add_extension(_LEAF_EKU, critical=False)
            # The subject is not empty, so RFC 5280 (4.2.1.6) wants the SAN non-critical.
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(_ski(self.cert)),
                critical=False,
            )
            .sign(self.key, _signature_hash(self.key))
        )
        try:
            svid_id(leaf)
        except NotSvid as exc:
            raise InputError(f"key not acceptable for an X.509-SVID: {exc}") from None
        return leaf

    def crl(
        self, revocations: Iterable[Revocation], *, number: int, now: datetime, validity: timedelta = CRL_LIFETIME
    ) -> x509.CertificateRevocationList:
        """A CRL listing ``revocations``, valid until ``now + validity``.

        Linear in the number of revocations: the entries go to the builder as one list.
        (``add_revoked_certificate`` returns a new builder holding a copy of the list, so calling it
        once per entry costs quadratic time: 11 s for 100,000 entries.)
        """
        entries = [_revoked_entry(revocation) for revocation in revocations]
        return (
            x509.CertificateRevocationListBuilder(revoked_certificates=entries)
            .issuer_name(self.cert.subject)
            .last_update(now - min(CLOCK_SKEW, validity))
            .next_update(now + validity)
            .add_extension(x509.CRLNumber(number), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(_ski(self.cert)),
                critical=False,
            )
            .sign(self.key, _signature_hash(self.key))
        )


def _revoked_entry(revocation: Revocation) -> x509.RevokedCertificate:
    entry = x509.RevokedCertificateBuilder().serial_number(revocation.serial).revocation_date(revocation.revoked_at)
    if revocation.reason != "unspecified":  # RFC 5280 5.3.1: omit rather than say unspecified
        entry = entry.add_extension(_CRL_REASONS[revocation.reason], critical=False)
    return entry.build()


_CRL_REASONS = {reason: x509.CRLReason(x509.ReasonFlags(reason)) for reason in REVOCATION_REASONS}
