"""The one certificate factory: ``Authority``, a root and the CA certificate that signs under it.

Three ways to get an authority:

    Authority.create("Test")          built here with cryptography: 'CN=Test Root CA' over 'CN=Test Intermediate CA'
    Authority.from_library(...)       built by ca.authority (make_root, make_intermediate), as `ca init` builds it
    Authority.from_state_dir(ca_dir)  the root and intermediate that a real `ca init` wrote, to forge leaves
                                      that the sidecars trusting that CA are then shown

and two kinds of leaf, both returned as ``Issued(cert, key)``:

    authority.leaf(spiffe_id, now=, ttl=)  signed by ca.authority's ``Issuer.issue``: the profile `ca issue` writes
    authority.issue(spiffe_id, ...)        built here field by field as an X.509-SVID, where each keyword
                                           breaks one rule (validity, URI SANs, CA flag, key usage, EKU, key, subject)

``write_identity`` puts a leaf where a sidecar reads one: cert.pem (leaf, then the chain), key.pem, bundle.pem.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import NamedTuple

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ca.authority import Issuer, PrivateKey, generate_key, make_intermediate, make_root

# The suite's one clock reading. It is real time, so certificates built around it also work in live TLS
# against real processes; code under test that takes a clock is given it as an explicit ``now``.
NOW = datetime.now(timezone.utc).replace(microsecond=0)
SECOND = timedelta(seconds=1)
MINUTE = timedelta(minutes=1)
HOUR = timedelta(hours=1)
DAY = timedelta(days=1)

TD = "example.org"
WEB = f"spiffe://{TD}/ns/prod/sa/web"
API = f"spiffe://{TD}/ns/prod/sa/api"
FRONTEND = f"spiffe://{TD}/ns/prod/sa/frontend"

SVID_EKU = (ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH)


class Issued(NamedTuple):
    """A certificate and its private key (unpacks as ``cert, key``)."""

    cert: x509.Certificate
    key: PrivateKey


@dataclass(frozen=True)
class IdentityFiles:
    """Where ``write_identity`` put an identity; ``crl`` is None when it wrote none."""

    directory: Path
    cert: Path
    key: Path
    bundle: Path
    crl: Path | None


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def pem(*items: x509.Certificate | x509.CertificateRevocationList) -> bytes:
    """Certificates and CRLs as one PEM text, in the order given."""
    return b"".join(item.public_bytes(serialization.Encoding.PEM) for item in items)


def key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def write_pem(path: Path, *items: x509.Certificate | x509.CertificateRevocationList) -> Path:
    path.write_bytes(pem(*items))
    return path


def _hash_for(key: PrivateKey) -> hashes.HashAlgorithm | None:
    return None if isinstance(key, (ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey)) else hashes.SHA256()


def _common_name(text: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, text)])


def _key_usage(*, digital_signature: bool, cert_sign: bool, crl_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=cert_sign, crl_sign=crl_sign,
        encipher_only=False, decipher_only=False,
    )


def _ca_certificate(
    subject: x509.Name, key: PrivateKey, *, signer: Issued | None, path_length: int | None
) -> x509.Certificate:
    """A CA certificate over ``key``, signed by ``signer`` (self-signed when None)."""
    signer_key = signer.key if signer else key
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(signer.cert.subject if signer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - 365 * DAY)
        .not_valid_after(NOW + 3650 * DAY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(_key_usage(digital_signature=False, cert_sign=True, crl_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(signer_key.public_key()), critical=False)
        .sign(signer_key, _hash_for(signer_key))
    )


def _load_key(path: Path) -> PrivateKey:
    return serialization.load_pem_private_key(path.read_bytes(), None)


@dataclass(frozen=True)
class Authority:
    """A root and the CA that signs leaves and CRLs under it (``issuer``, a ca.authority ``Issuer``).

    ``parents`` are the CA certificates between the issuer and the root: empty for an authority whose
    issuer is the intermediate, the intermediate (and up) for a ``sub_authority``.
    """

    root: x509.Certificate
    root_key: PrivateKey
    issuer: Issuer
    parents: tuple[x509.Certificate, ...] = ()

    @classmethod
    def create(cls, name: str = "Test", *, trust_domain: str = TD) -> Authority:
        """'CN={name} Root CA' (no path length limit) over 'CN={name} Intermediate CA' (pathlen:0),
        P-256, valid from a year before ``NOW`` to ten years after. Two authorities made with the same
        name have the same names and different keys."""
        root_key, intermediate_key = new_key(), new_key()
        root = _ca_certificate(_common_name(f"{name} Root CA"), root_key, signer=None, path_length=None)
        intermediate = _ca_certificate(
            _common_name(f"{name} Intermediate CA"), intermediate_key,
            signer=Issued(root, root_key), path_length=0,
        )
        return cls(root, root_key, Issuer(intermediate, intermediate_key, trust_domain))

    @classmethod
    def from_library(
        cls, trust_domain: str = TD, *, now: datetime = NOW, key_type: str = "ec-p256", ttl: timedelta = 365 * DAY
    ) -> Authority:
        """A root (ten years) and an intermediate (``ttl``) made at ``now`` by ca.authority, as `ca init` makes them."""
        root_key = generate_key(key_type)
        root = make_root(trust_domain, root_key, ttl=3650 * DAY, now=now)
        key = generate_key(key_type)
        intermediate = make_intermediate(trust_domain, key, root=root, root_key=root_key, ttl=ttl, now=now)
        return cls(root, root_key, Issuer(intermediate, key, trust_domain))

    @classmethod
    def from_state_dir(cls, ca_dir: Path) -> Authority:
        """The current root and intermediate of a `ca` state directory with unencrypted keys."""
        intermediate = x509.load_pem_x509_certificate((ca_dir / "intermediate.pem").read_bytes())
        (trust_domain,) = intermediate.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
        return cls(
            x509.load_pem_x509_certificate((ca_dir / "root.pem").read_bytes()),
            _load_key(ca_dir / "root.key"),
            Issuer(intermediate, _load_key(ca_dir / "intermediate.key"), trust_domain.value),
        )

    @property
    def intermediate(self) -> x509.Certificate:
        """The CA certificate that signs (for a sub-authority: the sub-CA)."""
        return self.issuer.cert

    @property
    def chain(self) -> tuple[x509.Certificate, ...]:
        """What a peer sends after its leaf: the issuer, then the CAs above it, without the root."""
        return (self.issuer.cert, *self.parents)

    def sub_authority(self, path_length: int | None = None) -> Authority:
        """A CA certificate signed by this authority's issuer, which an intermediate's pathlen:0 forbids."""
        key = new_key()
        cert = _ca_certificate(
            _common_name("Sub-intermediate CA"), key,
            signer=Issued(self.issuer.cert, self.issuer.key), path_length=path_length,
        )
        return Authority(self.root, self.root_key, Issuer(cert, key, self.issuer.trust_domain), self.chain)

    def leaf(self, spiffe_id: str = WEB, *, now: datetime = NOW, ttl: timedelta = DAY) -> Issued:
        """A fresh P-256 key certified by ca.authority's ``Issuer.issue`` at ``now`` for ``ttl``."""
        key = generate_key()
        return Issued(self.issuer.issue(spiffe_id, key.public_key(), ttl=ttl, now=now), key)

    def issue(
        self,
        spiffe_id: str = WEB,
        *,
        uris: tuple[str, ...] | None = None,
        not_before: datetime = NOW - DAY,
        not_after: datetime = NOW + 30 * DAY,
        is_ca: bool = False,
        key_cert_sign: bool = False,
        eku: tuple[x509.ObjectIdentifier, ...] = SVID_EKU,
        key: PrivateKey | None = None,
        subject: str | None = None,
    ) -> Issued:
        """An X.509-SVID for ``spiffe_id`` built here, signed by the issuer; each keyword breaks one rule.

        ``uris`` replaces the URI SANs (``()``: none); ``is_ca`` makes it CA:TRUE; ``key_cert_sign`` adds that
        key usage; ``eku`` replaces the extended key usages (``()``: no extension); ``key`` is the leaf's key
        (default: a fresh P-256 key); ``subject`` is the CN, by default the ID's last segment, and ``""``
        gives an empty subject (the SAN is then critical, as RFC 5280 requires).
        """
        key = key or new_key()
        uris = (spiffe_id,) if uris is None else uris
        subject = spiffe_id.rsplit("/", 1)[-1] if subject is None else subject
        builder = (
            x509.CertificateBuilder()
            .subject_name(_common_name(subject) if subject else x509.Name([]))
            .issuer_name(self.issuer.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
            .add_extension(
                _key_usage(digital_signature=True, cert_sign=key_cert_sign or is_ca, crl_sign=False), critical=True
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.issuer.key.public_key()), critical=False
            )
        )
        if eku:
            builder = builder.add_extension(x509.ExtendedKeyUsage(list(eku)), critical=False)
        if uris:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri) for uri in uris]),
                critical=not subject,
            )
        return Issued(builder.sign(self.issuer.key, _hash_for(self.issuer.key)), key)

    def crl(
        self,
        revoked_serials: tuple[int, ...] = (),
        *,
        signed_by: Authority | None = None,
        next_update: datetime = NOW + 7 * DAY,
        number: int | None = None,
    ) -> x509.CertificateRevocationList:
        """A CRL in the issuer's name, revoking ``revoked_serials`` an hour before ``NOW``, with CRL number
        ``number`` if given; ``signed_by`` signs it with another authority's key instead (a forgery)."""
        signer = (signed_by or self).issuer.key
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.issuer.cert.subject)
            .last_update(NOW - DAY)
            .next_update(next_update)
        )
        if number is not None:
            builder = builder.add_extension(x509.CRLNumber(number), critical=False)
        for serial in revoked_serials:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(NOW - HOUR).build()
            )
        return builder.sign(signer, _hash_for(signer))

    def write_identity(
        self, directory: Path, leaf: Issued, *, crl: x509.CertificateRevocationList | None = None
    ) -> IdentityFiles:
        """cert.pem (``leaf``, then this authority's chain), key.pem, bundle.pem (the root), crl.pem if given."""
        directory.mkdir(parents=True, exist_ok=True)
        files = IdentityFiles(
            directory, directory / "cert.pem", directory / "key.pem", directory / "bundle.pem",
            directory / "crl.pem" if crl is not None else None,
        )
        write_pem(files.cert, leaf.cert, *self.chain)
        files.key.write_bytes(key_pem(leaf.key))
        write_pem(files.bundle, self.root)
        if crl is not None:
            write_pem(files.crl, crl)
        return files
