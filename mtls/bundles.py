"""Trust bundle files: PEM, or a SPIFFE bundle (a JWK Set, SPIFFE Trust Domain and Bundle §4).

A bundle holds the roots (X.509 authorities) of one trust domain. The file names no trust domain:
the config (or the command line) says which one it is for, and ``check_serves`` refuses roots that
say they belong to another. The SPIFFE form::

    {"keys": [{"use": "x509-svid", "kty": "EC", "crv": "P-256", "x": "...", "y": "...",
               "x5c": ["<base64 DER of the root>"]}],
     "spiffe_sequence": 3, "spiffe_refresh_hint": 300}

Reading is strict about what matters for trust: every ``x509-svid`` key has exactly one ``x5c``
certificate, a CA, whose public key is the JWK's own; a key of any other ``use`` than ``x509-svid``
or ``jwt-svid`` is an error (``jwt-svid`` keys are skipped: the sidecar verifies no JWT-SVIDs); no
X.509 authority at all is an error. ``spiffe_sequence`` lets a consumer refuse an older bundle
(``check_sequence``). Pure: bytes in, values out.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from mtls.spiffe import InvalidSpiffeId, parse_spiffe_id, validate_trust_domain

PEM = "pem"
SPIFFE = "spiffe"
FORMATS = (PEM, SPIFFE)
X509_SVID = "x509-svid"
JWT_SVID = "jwt-svid"
DEFAULT_REFRESH_HINT = 300  # seconds: how often a consumer should fetch the bundle again

_CURVES = {"secp256r1": ("P-256", 32), "secp384r1": ("P-384", 48), "secp521r1": ("P-521", 66)}


class BundleError(ValueError):
    """A bundle that cannot be used; the message says what is wrong, without the file name."""


@dataclass(frozen=True)
class Bundle:
    roots: tuple[x509.Certificate, ...]
    format: str  # PEM or SPIFFE
    sequence: int | None = None  # spiffe_sequence (SPIFFE form only, when present)
    refresh_hint: int | None = None  # spiffe_refresh_hint in seconds (SPIFFE form only, when present)


def parse_bundle(data: bytes) -> Bundle:
    """A bundle from the bytes of a file: a JSON object is a SPIFFE bundle, anything else PEM.

    Raises BundleError. The roots are not checked against a trust domain here (``check_serves``).
    """
    if data.lstrip()[:1] == b"{":
        return _parse_spiffe(data)
    return _parse_pem(data)


def _parse_pem(data: bytes) -> Bundle:
    if data[:1] == b"\x30":  # one DER certificate, as some tools export a root
        try:
            return _checked_pem_roots((x509.load_der_x509_certificate(data),))
        except ValueError as exc:
            raise BundleError(f"binary data that is not a DER certificate: {exc}") from None
    if b"-----BEGIN CERTIFICATE-----" not in data:
        if data.lstrip()[:1] == b"[":
            raise BundleError("a JSON array is not a bundle; a SPIFFE bundle is a JSON object with 'keys'")
        raise BundleError("neither PEM certificates nor a SPIFFE bundle (JSON object) found")
    if data.count(b"-----BEGIN CERTIFICATE-----") != data.count(b"-----END CERTIFICATE-----"):
        raise BundleError("the last PEM certificate has no END line; is the file half-written?")
    try:
        roots = tuple(x509.load_pem_x509_certificates(data))
    except ValueError as exc:
        raise BundleError(f"a PEM certificate cannot be parsed: {exc}") from None
    return _checked_pem_roots(roots)


def _checked_pem_roots(roots: tuple[x509.Certificate, ...]) -> Bundle:
    for number, cert in enumerate(roots, 1):
        problem = _not_a_ca(cert)
        if problem:
            raise BundleError(f"certificate #{number} ({_subject(cert)}) {problem}; a bundle holds CA certificates")
    return Bundle(roots, PEM)


def _parse_spiffe(data: bytes) -> Bundle:
    try:
        document = json.loads(data)
    except UnicodeDecodeError:
        raise BundleError("the SPIFFE bundle is not UTF-8 text") from None
    except ValueError as exc:
        raise BundleError(f"the SPIFFE bundle is not valid JSON ({exc}); is the file truncated?") from None
    if not isinstance(document, dict):
        raise BundleError("a SPIFFE bundle is a JSON object with 'keys'")
    keys = document.get("keys")
    if not isinstance(keys, list):
        raise BundleError("the SPIFFE bundle has no 'keys' list")
    sequence = _optional_count(document, "spiffe_sequence")
    refresh_hint = _optional_count(document, "spiffe_refresh_hint")
    roots = []
    for index, key in enumerate(keys):
        where = f"keys[{index}]"
        if not isinstance(key, dict):
            raise BundleError(f"{where} is not a JSON object")
        use = key.get("use")
        if use == JWT_SVID:
            continue
        if use != X509_SVID:
            raise BundleError(
                f"{where} has use {use!r}; an X.509 authority in a SPIFFE bundle has use 'x509-svid'"
            )
        roots.append(_x509_authority(key, where))
    if not roots:
        raise BundleError("the SPIFFE bundle has no key with use 'x509-svid': it holds no X.509 root")
    return Bundle(tuple(roots), SPIFFE, sequence, refresh_hint)


def _optional_count(document: dict, name: str) -> int | None:
    value = document.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise BundleError(f"{name} is {value!r}; it must be a non-negative integer")
    return value


def _x509_authority(key: dict, where: str) -> x509.Certificate:
    chain = key.get("x5c")
    if not isinstance(chain, list) or len(chain) != 1 or not isinstance(chain[0], str):
        raise BundleError(f"{where}: an x509-svid key needs 'x5c' with exactly one base64 certificate")
    try:
        cert = x509.load_der_x509_certificate(base64.b64decode(chain[0], validate=True))
    except (binascii.Error, ValueError) as exc:
        raise BundleError(f"{where}: x5c[0] is not a base64 DER certificate: {exc}") from None
    problem = _not_a_ca(cert)
    if problem:
        raise BundleError(f"{where}: x5c[0] ({_subject(cert)}) {problem}; a bundle holds CA certificates")
    expected = _jwk_public(cert)
    given = {name: key[name] for name in expected if name in key}
    if given != {name: expected[name] for name in given} or key.get("kty", expected["kty"]) != expected["kty"]:
        raise BundleError(f"{where}: the key parameters do not match the public key of the certificate in x5c")
    return cert


def spiffe_bundle_json(
    roots: Sequence[x509.Certificate], *, sequence: int, refresh_hint: int = DEFAULT_REFRESH_HINT
) -> bytes:
    """``roots`` as a SPIFFE bundle document (JSON, newline-terminated)."""
    keys = [
        {"use": X509_SVID, **_jwk_public(root), "x5c": [base64.b64encode(root.public_bytes(serialization.Encoding.DER)).decode()]}
        for root in roots
    ]
    document = {"keys": keys, "spiffe_sequence": sequence, "spiffe_refresh_hint": refresh_hint}
    return json.dumps(document, indent=2).encode() + b"\n"


def bundle_pem(roots: Sequence[x509.Certificate]) -> bytes:
    return b"".join(root.public_bytes(serialization.Encoding.PEM) for root in roots)


def check_serves(bundle: Bundle, trust_domain: str) -> None:
    """Raise BundleError when a root says it belongs to another trust domain than ``trust_domain``.

    A root says so with a SPIFFE ID in its URI SAN (``spiffe://TD``), a URI name constraint, or an
    organization (O) that is a trust domain name, as the roots ``ca init`` makes. A root that says
    nothing is taken at the configuration's word.
    """
    for number, root in enumerate(bundle.roots, 1):
        declared = declared_trust_domains(root)
        if declared and trust_domain not in declared:
            raise BundleError(
                f"root #{number} ({_subject(root)}) is a root of trust domain {', '.join(sorted(declared))}, "
                f"not of {trust_domain}; is this the bundle of another trust domain?"
            )


def declared_trust_domains(root: x509.Certificate) -> set[str]:
    """The trust domains a CA certificate names itself (see ``check_serves``); empty when none."""
    found = set()
    try:
        san = root.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
            try:
                found.add(parse_spiffe_id(uri).trust_domain)
            except InvalidSpiffeId:
                pass
    except (x509.ExtensionNotFound, ValueError):
        pass
    try:
        constraints = root.extensions.get_extension_for_class(x509.NameConstraints).value
        for tree in constraints.permitted_subtrees or ():
            if isinstance(tree, x509.UniformResourceIdentifier) and is_trust_domain(tree.value):
                found.add(tree.value.lower())
    except (x509.ExtensionNotFound, ValueError):
        pass
    for attribute in root.subject.get_attributes_for_oid(x509.NameOID.ORGANIZATION_NAME):
        if isinstance(attribute.value, str) and is_trust_domain(attribute.value):
            found.add(attribute.value)
    return found


def check_sequence(new: Bundle, old: Bundle) -> None:
    """Raise BundleError when ``new`` would replace ``old`` with an older ``spiffe_sequence``."""
    if new.sequence is not None and old.sequence is not None and new.sequence < old.sequence:
        raise BundleError(
            f"spiffe_sequence {new.sequence} is older than the {old.sequence} in force; refusing to go back"
        )


# --- small helpers ------------------------------------------------------------------------------


def is_trust_domain(text: str) -> bool:
    """A valid trust domain name with a dot in it (``example.org``), as roots and options name them."""
    if "." not in text:
        return False
    try:
        validate_trust_domain(text)
    except InvalidSpiffeId:
        return False
    return True


def _not_a_ca(cert: x509.Certificate) -> str | None:
    try:
        basic = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except (x509.ExtensionNotFound, ValueError):
        return "is not a CA (no basicConstraints)"
    return None if basic.ca else "is not a CA (basicConstraints CA:FALSE)"


def _jwk_public(cert: x509.Certificate) -> dict[str, str]:
    """The JWK public-key members (RFC 7518 §6, RFC 8037) of ``cert``'s key."""
    key = cert.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name in _CURVES:
        crv, size = _CURVES[key.curve.name]
        numbers = key.public_numbers()
        return {"kty": "EC", "crv": crv, "x": _b64url(numbers.x, size), "y": _b64url(numbers.y, size)}
    if isinstance(key, rsa.RSAPublicKey):
        numbers = key.public_numbers()
        return {"kty": "RSA", "n": _b64url(numbers.n), "e": _b64url(numbers.e)}
    if isinstance(key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
        raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        crv = "Ed25519" if isinstance(key, ed25519.Ed25519PublicKey) else "Ed448"
        return {"kty": "OKP", "crv": crv, "x": base64.urlsafe_b64encode(raw).rstrip(b"=").decode()}
    raise BundleError(f"{_subject(cert)} has a {type(key).__name__}, which a JWK cannot carry here")


def _b64url(number: int, size: int | None = None) -> str:
    raw = number.to_bytes(size or max(1, (number.bit_length() + 7) // 8), "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _subject(cert: x509.Certificate) -> str:
    return repr(cert.subject.rfc4514_string())
