"""SPIFFE IDs, allowlist patterns and their index, and reading the ID out of a verified X.509-SVID leaf.

Pure: no sockets, no ssl, no trio. Both the CA and the sidecar use these functions, so an ID the CA
would refuse to issue is also an ID the sidecar refuses to match.

The rules are those of the SPIFFE-ID specification (scheme ``spiffe``, a trust domain of
``[a-z0-9._-]``, path segments of ``[A-Za-z0-9._-]``, no empty, ``.`` or ``..`` segment, no trailing
slash, no query, fragment, port, userinfo or percent-encoding, at most 2048 bytes), plus our
decisions: upper case in the scheme or trust domain is rejected rather than lower-cased, a trust
domain is at most 255 bytes, and any control character (a trailing newline included) is rejected.
"""

from __future__ import annotations

import string
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

SCHEME_PREFIX = "spiffe://"
MAX_ID_BYTES = 2048
MAX_TRUST_DOMAIN_BYTES = 255
TRUST_DOMAIN_CHARS = frozenset(string.ascii_lowercase + string.digits + ".-_")
PATH_SEGMENT_CHARS = frozenset(string.ascii_letters + string.digits + ".-_")
MIN_RSA_BITS = 2048
ALLOWED_EC_CURVES = ("secp256r1", "secp384r1", "secp521r1")


class InvalidSpiffeId(ValueError):
    """An ID or pattern that breaks a rule. ``rule`` says which, in words."""

    def __init__(self, value: str, rule: str):
        self.value = value
        self.rule = rule
        super().__init__(f"invalid SPIFFE ID {value!r}: {rule}")


class NotSvid(ValueError):
    """A certificate that is not a usable X.509-SVID leaf; the message says why."""


@dataclass(frozen=True, slots=True)
class SpiffeId:
    trust_domain: str
    path: str  # "" for a trust-domain ID, else "/seg/seg"

    def __str__(self) -> str:
        return f"{SCHEME_PREFIX}{self.trust_domain}{self.path}"


def _check_characters(value: str) -> None:
    for ch in value:
        if ord(ch) < 0x20 or ord(ch) == 0x7F:
            raise InvalidSpiffeId(value, f"contains control character {ch!r}")
        if 0xD800 <= ord(ch) <= 0xDFFF:  # what bytes that are not UTF-8 become in argv (PEP 383)
            raise InvalidSpiffeId(value, "is not UTF-8 text (it contains a lone surrogate)")
    if len(value.encode("utf-8")) > MAX_ID_BYTES:
        raise InvalidSpiffeId(value, f"longer than {MAX_ID_BYTES} bytes")


def validate_trust_domain(value: str, *, original: str | None = None) -> str:
    """Return ``value`` if it is a valid trust domain name, else raise InvalidSpiffeId."""
    shown = value if original is None else original
    if not value:
        raise InvalidSpiffeId(shown, "trust domain is empty")
    if len(value.encode("utf-8")) > MAX_TRUST_DOMAIN_BYTES:
        raise InvalidSpiffeId(shown, f"trust domain is longer than {MAX_TRUST_DOMAIN_BYTES} bytes")
    if "@" in value:  # before the scan: in 'user:pw@host' the ':' is not a port
        raise InvalidSpiffeId(shown, "trust domain must not contain userinfo ('@')")
    for ch in value:
        if ch in TRUST_DOMAIN_CHARS:
            continue
        if ch in string.ascii_uppercase:
            raise InvalidSpiffeId(shown, "trust domain must be lower-case")
        if ch == ":":
            raise InvalidSpiffeId(shown, "trust domain must not contain a port (':')")
        if ch == "@":
            raise InvalidSpiffeId(shown, "trust domain must not contain userinfo ('@')")
        if ch == "%":
            raise InvalidSpiffeId(shown, "percent-encoding is not allowed")
        raise InvalidSpiffeId(
            shown, f"trust domain contains {ch!r}; only a-z, 0-9, '.', '-' and '_' are allowed"
        )
    return value


def _validate_path(value: str, path: str) -> None:
    if not path:
        return
    if path.endswith("/"):
        raise InvalidSpiffeId(value, "path must not end with '/'")
    for segment in path[1:].split("/"):
        if segment == "":
            raise InvalidSpiffeId(value, "path must not contain an empty segment ('//')")
        if segment in (".", ".."):
            raise InvalidSpiffeId(value, f"path must not contain a {segment!r} segment")
        for ch in segment:
            if ch in PATH_SEGMENT_CHARS:
                continue
            if ch == "%":
                raise InvalidSpiffeId(value, "percent-encoding is not allowed")
            raise InvalidSpiffeId(
                value,
                f"path segment {segment!r} contains {ch!r}; only A-Z, a-z, 0-9, '.', '-' and '_' are allowed",
            )


def parse_spiffe_id(value: str, *, require_path: bool = False) -> SpiffeId:
    """Parse and validate a SPIFFE ID.

    ``require_path=True`` is for workload (leaf) IDs, which must name more than the trust domain.
    Raises InvalidSpiffeId naming the first rule the value breaks.
    """
    if not isinstance(value, str):
        raise InvalidSpiffeId(repr(value), "must be a string")
    _check_characters(value)
    if not value.startswith(SCHEME_PREFIX):
        if value[: len(SCHEME_PREFIX)].lower() == SCHEME_PREFIX:
            raise InvalidSpiffeId(value, "scheme must be lower-case 'spiffe://'")
        if "://" not in value:
            raise InvalidSpiffeId(value, "must start with 'spiffe://'")
        raise InvalidSpiffeId(value, "scheme must be 'spiffe'")
    rest = value[len(SCHEME_PREFIX) :]
    if "?" in rest:
        raise InvalidSpiffeId(value, "query ('?') is not allowed")
    if "#" in rest:
        raise InvalidSpiffeId(value, "fragment ('#') is not allowed")
    trust_domain, slash, path = rest.partition("/")
    path = slash + path
    validate_trust_domain(trust_domain, original=value)
    _validate_path(value, path)
    if require_path and not path:
        raise InvalidSpiffeId(value, "a workload ID must have a path after the trust domain")
    return SpiffeId(trust_domain, path)


@dataclass(frozen=True, slots=True)
class IdPattern:
    """An allowlist entry: an exact ID, or ``spiffe://td/prefix/*`` matching one or more further segments."""

    base: SpiffeId
    wildcard: bool

    def matches(self, peer: SpiffeId) -> bool:
        if peer.trust_domain != self.base.trust_domain:
            return False
        if not self.wildcard:
            return peer.path == self.base.path
        return peer.path.startswith(self.base.path + "/") and len(peer.path) > len(self.base.path) + 1

    def __str__(self) -> str:
        return f"{self.base}/*" if self.wildcard else str(self.base)


def parse_pattern(value: str) -> IdPattern:
    """Parse an allow/expect entry. A pattern that could never match a workload ID is refused."""
    if not isinstance(value, str):
        raise InvalidSpiffeId(repr(value), "must be a string")
    if value.endswith("/*"):
        base = parse_spiffe_id(value[:-2])
        return IdPattern(base, wildcard=True)
    if "*" in value:
        raise InvalidSpiffeId(value, "'*' is only allowed as the whole last segment ('/*')")
    try:
        base = parse_spiffe_id(value, require_path=True)
    except InvalidSpiffeId as exc:
        if exc.rule.startswith("a workload ID must have a path"):
            raise InvalidSpiffeId(
                value,
                "a trust-domain ID never matches a workload; write 'spiffe://TD/*' to allow the whole trust domain",
            ) from None
        raise
    return IdPattern(base, wildcard=False)


# --- allowlists ---------------------------------------------------------------------------------

NEAREST_RULES = 3  # the most rules PatternSet.nearest names


class _Node:
    """One path (a trust domain's root, or one more segment) in the trie of one trust domain's rules."""

    __slots__ = ("children", "exact", "wildcard", "first_rules")

    def __init__(self) -> None:
        self.children: dict[str, _Node] = {}
        self.exact: int | None = None  # position of the first rule naming exactly this path
        self.wildcard: int | None = None  # position of the first rule '<this path>/*'
        # Positions of the first NEAREST_RULES rules at or below this path, in config order. Enough:
        # nearest() climbs from the deepest node it reaches, and the c rules it took below this node
        # are all under it, so at least NEAREST_RULES - c of these are new, which is what it lacks.
        self.first_rules: list[int] = []

    def keep(self, position: int) -> None:
        if len(self.first_rules) < NEAREST_RULES:
            self.first_rules.append(position)

    def child(self, segment: str) -> _Node:
        node = self.children.get(segment)
        if node is None:
            node = self.children[segment] = _Node()
        return node


def _segments(path: str) -> list[str]:
    """``"/ns/prod"`` -> ``["ns", "prod"]``; ``""`` (the trust domain itself) -> ``[]``."""
    return path.split("/")[1:]


class PatternSet:
    """An allowlist (``allow`` or ``expect``) indexed so that matching costs as much for 10,000 rules as for 1.

    Each trust domain's rules form a trie by path segment. ``match`` walks the peer's path down it
    once, meeting every ``/*`` rule above the peer and the exact rule naming it: the cost grows with
    the peer's depth, not with the list. It reports the same rule a walk of the list in config
    order would (the first that matches), since an allowed decision names it.

    Iterating yields the rules in config order; two sets are equal when their rules are.
    """

    __slots__ = ("rules", "_domains")

    def __init__(self, rules: Iterable[IdPattern]):
        self.rules = tuple(rules)
        self._domains: dict[str, _Node] = {}
        for position, rule in enumerate(self.rules):
            node = self._domains.get(rule.base.trust_domain)
            if node is None:
                node = self._domains[rule.base.trust_domain] = _Node()
            node.keep(position)
            for segment in _segments(rule.base.path):
                node = node.child(segment)
                node.keep(position)
            if rule.wildcard and node.wildcard is None:
                node.wildcard = position
            elif not rule.wildcard and node.exact is None:
                node.exact = position

    def match(self, peer: SpiffeId) -> IdPattern | None:
        """The first rule in config order that matches ``peer``, or None."""
        node = self._domains.get(peer.trust_domain)
        if node is None:
            return None
        first: int | None = None
        for segment in _segments(peer.path):
            if node.wildcard is not None and (first is None or node.wildcard < first):
                first = node.wildcard  # a '/*' rule above the peer: the peer has this segment more
            node = node.children.get(segment)
            if node is None:
                break
        else:
            if node.exact is not None and (first is None or node.exact < first):
                first = node.exact
        return None if first is None else self.rules[first]

    def nearest(self, peer: SpiffeId) -> tuple[IdPattern, ...]:
        """Up to NEAREST_RULES rules of ``peer``'s trust domain, those sharing the most leading path
        segments with it first, then in config order; none when no rule names its trust domain."""
        node = self._domains.get(peer.trust_domain)
        if node is None:
            return ()
        trail = [node]
        for segment in _segments(peer.path):
            node = node.children.get(segment)
            if node is None:
                break
            trail.append(node)
        chosen: list[int] = []
        for node in reversed(trail):
            chosen += [position for position in node.first_rules if position not in chosen]
        return tuple(self.rules[position] for position in chosen[:NEAREST_RULES])

    def __iter__(self) -> Iterator[IdPattern]:
        return iter(self.rules)

    def __len__(self) -> int:
        return len(self.rules)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PatternSet) and self.rules == other.rules

    def __hash__(self) -> int:
        return hash(self.rules)

    def __repr__(self) -> str:
        return f"PatternSet({[str(rule) for rule in self.rules]!r})"


# --- X.509-SVID leaf checks --------------------------------------------------------------------

CLIENT = "client"
SERVER = "server"


def _check_key_strength(cert: x509.Certificate) -> None:
    key = cert.public_key()
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise NotSvid(f"RSA key of {key.key_size} bits is below the {MIN_RSA_BITS}-bit minimum")
    elif isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name not in ALLOWED_EC_CURVES:
            raise NotSvid(f"elliptic curve {key.curve.name} is not allowed (use P-256, P-384 or P-521)")
    elif not isinstance(key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
        raise NotSvid(f"key type {type(key).__name__} is not allowed")


def svid_id(cert: x509.Certificate, role: str | None = None) -> SpiffeId:
    """Return the SPIFFE ID of an X.509-SVID leaf, or raise NotSvid saying which rule it breaks.

    ``role`` is CLIENT or SERVER: when the leaf has an extendedKeyUsage, it must allow that role.
    The chain itself is not checked here; call this on a leaf whose chain has been verified.
    """
    try:
        basic = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        basic = None
    if basic is not None and basic.ca:
        raise NotSvid("certificate is a CA certificate (basicConstraints CA:TRUE), not a workload leaf")
    try:
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        raise NotSvid("leaf has no keyUsage extension (X.509-SVID requires digitalSignature)") from None
    if usage.key_cert_sign or usage.crl_sign:
        raise NotSvid("leaf keyUsage includes keyCertSign or cRLSign")
    if not usage.digital_signature:
        raise NotSvid("leaf keyUsage lacks digitalSignature")
    if role is not None:
        try:
            eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        except x509.ExtensionNotFound:
            eku = None
        wanted = ExtendedKeyUsageOID.CLIENT_AUTH if role == CLIENT else ExtendedKeyUsageOID.SERVER_AUTH
        if eku is not None and wanted not in eku:
            raise NotSvid(f"leaf extendedKeyUsage does not allow {role} authentication ({role}Auth)")
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise NotSvid("leaf has no subjectAltName, so no SPIFFE ID") from None
    except (ValueError, x509.DuplicateExtension) as exc:
        raise NotSvid(f"leaf subjectAltName cannot be parsed: {exc}") from None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1:
        raise NotSvid(f"leaf must have exactly one URI SAN, it has {len(uris)}")
    try:
        spiffe_id = parse_spiffe_id(uris[0], require_path=True)
    except InvalidSpiffeId as exc:
        raise NotSvid(f"URI SAN {uris[0]!r} is not a workload SPIFFE ID: {exc.rule}") from None
    _check_key_strength(cert)
    return spiffe_id
