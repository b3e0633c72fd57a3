"""Reading the certificates, CRLs and CSRs handed to the CA (PEM or DER), and describing a certificate.

Every reader raises InputError naming the file and what is wrong with it; ``parse_csr`` also
checks that the CSR was signed by the key it carries (code ``bad_csr`` for ``ca serve``).
"""

from __future__ import annotations

import hashlib
import re
from datetime import datetime
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from ca.authority import format_serial, format_time, key_type_name
from ca.errors import InputError
from mtls.spiffe import NotSvid, svid_id

_PEM_CRL = re.compile(rb"-----BEGIN X509 CRL-----.+?-----END X509 CRL-----", re.DOTALL)


def read_file(path: Path, what: str) -> bytes:
    """The bytes of ``path``; InputError ``cannot read WHAT PATH: <why>`` if the system says no."""
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read {what} {path}: {exc.strerror}") from None


def read_certificates(path: Path, what: str = "certificate file") -> list[x509.Certificate]:
    """All certificates of a PEM file (or the one of a DER file), in file order; at least one."""
    data = read_file(path, what)
    try:
        if b"-----BEGIN" in data:
            return x509.load_pem_x509_certificates(data)
        return [x509.load_der_x509_certificate(data)]
    except ValueError:
        raise InputError(f"{what} {path} holds no readable certificate") from None


def read_crls(path: Path) -> list[x509.CertificateRevocationList]:
    """Every CRL of a PEM file (several may be concatenated, with certificates between them), or the one
    of a DER file."""
    data = read_file(path, "CRL file")
    try:
        if b"-----BEGIN" not in data:
            return [x509.load_der_x509_crl(data)]
        blocks = _PEM_CRL.findall(data)
        if not blocks:
            raise ValueError
        return [x509.load_pem_x509_crl(block) for block in blocks]
    except ValueError:
        raise InputError(f"CRL file {path} holds no readable CRL") from None


def read_csr(path: Path) -> x509.CertificateSigningRequest:
    """Load a PEM (or DER) CSR whose signature proves possession of its key."""
    return parse_csr(read_file(path, "CSR"), str(path))


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
        "dns_names": dns_names(cert),
        "ca": is_ca,
    }


def dns_names(cert: x509.Certificate) -> list[str]:
    """The DNS names of ``cert``'s subjectAltName (none if it has none, or one that cannot be parsed)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (x509.ExtensionNotFound, ValueError, x509.DuplicateExtension):
        return []
    return san.get_values_for_type(x509.DNSName)
