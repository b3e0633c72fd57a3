"""In-memory X.509-SVID certificates for tests, built with `cryptography` (ECDSA P-256).

A ``TestAuthority`` is a root plus an intermediate (``CA:TRUE, pathlen:0``) that signs leaves in the
X.509-SVID profile: ``CA:FALSE`` (critical), one URI SAN, keyUsage digitalSignature (critical), EKU
serverAuth+clientAuth, SKI/AKI. Keyword arguments let a test break exactly one of those rules.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

NOW = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)  # real time, so certs also work in live TLS
SECOND = dt.timedelta(seconds=1)
MINUTE = dt.timedelta(minutes=1)
HOUR = dt.timedelta(hours=1)
DAY = dt.timedelta(days=1)


@dataclass(frozen=True)
class Issued:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _ca_cert(subject: str, key, issuer: Issued | None, path_length: int | None) -> x509.Certificate:
    signer_key = issuer.key if issuer else key
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer.cert.subject if issuer else _name(subject))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - 365 * DAY)
        .not_valid_after(NOW + 3650 * DAY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signer_key.public_key()), critical=False
        )
    )
    return builder.sign(signer_key, hashes.SHA256())


class TestAuthority:
    """A root and an intermediate; ``issue`` signs SVID leaves, ``crl`` signs revocation lists."""

    __test__ = False  # not a pytest test class

    def __init__(self, name: str = "Test"):
        root_key = new_key()
        self.root = Issued(_ca_cert(f"{name} Root CA", root_key, None, path_length=None), root_key)
        intermediate_key = new_key()
        self.intermediate = Issued(
            _ca_cert(f"{name} Intermediate CA", intermediate_key, self.root, path_length=0),
            intermediate_key,
        )

    def issue(
        self,
        spiffe_id: str = "spiffe://example.org/ns/prod/sa/web",
        *,
        not_before: dt.datetime = NOW - DAY,
        not_after: dt.datetime = NOW + 30 * DAY,
        uris: tuple[str, ...] | None = None,
        is_ca: bool = False,
        key: ec.EllipticCurvePrivateKey | None = None,
        subject: str | None = None,
    ) -> Issued:
        """``subject`` is the CN, by default the ID's last segment; "" gives an empty subject, like our CA."""
        key = key or new_key()
        uris = (spiffe_id,) if uris is None else uris
        subject = spiffe_id.rsplit("/", 1)[-1] if subject is None else subject
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(subject) if subject else x509.Name([]))
            .issuer_name(self.intermediate.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=is_ca, crl_sign=False,
                    encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.intermediate.key.public_key()),
                critical=False,
            )
        )
        if uris:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]),
                critical=False,
            )
        return Issued(builder.sign(self.intermediate.key, hashes.SHA256()), key)

    def crl(
        self,
        revoked_serials: tuple[int, ...] = (),
        *,
        signer: Issued | None = None,
        next_update: dt.datetime = NOW + 7 * DAY,
    ) -> x509.CertificateRevocationList:
        """A CRL naming the intermediate as issuer; ``signer`` lets a test sign it with the wrong key."""
        signer = signer or self.intermediate
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.intermediate.cert.subject)
            .last_update(NOW - DAY)
            .next_update(next_update)
        )
        for serial in revoked_serials:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(NOW - HOUR).build()
            )
        return builder.sign(signer.key, hashes.SHA256())


def cert_pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def key_pem(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def crl_pem(crl: x509.CertificateRevocationList) -> bytes:
    return crl.public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True)
class IdentityFiles:
    cert: Path
    key: Path
    bundle: Path
    crl: Path | None


def write_identity(
    directory: Path,
    authority: TestAuthority,
    leaf: Issued,
    *,
    crl: x509.CertificateRevocationList | None = None,
) -> IdentityFiles:
    """Write cert.pem (leaf + intermediate), key.pem, bundle.pem (root) and optionally crl.pem."""
    directory.mkdir(parents=True, exist_ok=True)
    files = IdentityFiles(
        directory / "cert.pem", directory / "key.pem", directory / "bundle.pem",
        directory / "crl.pem" if crl is not None else None,
    )
    files.cert.write_bytes(cert_pem(leaf.cert, authority.intermediate.cert))
    files.key.write_bytes(key_pem(leaf.key))
    files.bundle.write_bytes(cert_pem(authority.root.cert))
    if crl is not None:
        files.crl.write_bytes(crl_pem(crl))
    return files
