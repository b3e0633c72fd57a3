"""What a valid config file becomes: one frozen dataclass per section, gathered in ``Config``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mtls.endpoints import Endpoint
from mtls.spiffe import PatternSet
from mtls.trust import DEFAULT_CRL_GRACE as TRUST_DEFAULT_CRL_GRACE
from proxy.egress_rules import EgressRule

DEFAULT_RENEW_AT = 0.66
DEFAULT_CRL_GRACE = TRUST_DEFAULT_CRL_GRACE.total_seconds()
DEFAULT_SYNC_EVERY = 60.0
CRL_STALE_MODES = ("refuse", "warn")


@dataclass(frozen=True)
class RenewConfig:
    url: str
    at: float = DEFAULT_RENEW_AT  # renew when this fraction of the lifetime has passed, 0 < at < 1


@dataclass(frozen=True)
class IdentityConfig:
    cert: Path
    key: Path
    bundle: Path
    crl: Path | None
    renew: RenewConfig | None
    crl_stale: str = "refuse"  # past next update + crl_grace: "refuse" new handshakes, or "warn" and count them
    crl_grace: float = DEFAULT_CRL_GRACE  # seconds a CRL may be past its next update before crl_stale applies
    sync: SyncConfig | None = None  # keep bundle and crl current from a ca serve


@dataclass(frozen=True)
class SyncConfig:
    """``identity.sync``: fetch the bundle and CRL from ``ca serve`` at ``url`` every ``every`` seconds."""

    url: str
    every: float = DEFAULT_SYNC_EVERY


@dataclass(frozen=True)
class TrustDomainConfig:
    """``trust_domains.NAME``: a federated trust domain, its bundle file, and optionally the SPIFFE
    bundle endpoint (``https_spiffe``) that keeps that file current."""

    name: str
    bundle: Path
    endpoint: str | None = None  # https:// URL serving the bundle (ca serve's /v1/bundle)
    endpoint_id: str | None = None  # the SPIFFE ID the endpoint must present (default spiffe://NAME/ca)
    every: float | None = None  # seconds between fetches; None: the bundle's spiffe_refresh_hint


@dataclass(frozen=True)
class InboundConfig:
    name: str
    listen: Endpoint
    forward: Endpoint
    allow: PatternSet
    mode: str  # "enforce" | "audit"
    proxy_protocol: bool


@dataclass(frozen=True)
class OutboundConfig:
    name: str
    listen: Endpoint
    connect: Endpoint
    expect: PatternSet
    server_name: str | None


@dataclass(frozen=True)
class EgressConfig:
    """Egress containment: where the app's redirected connections arrive, and where they may go."""

    listen: Endpoint
    mode: str  # "enforce" | "audit" (let everything through, log what would be refused)
    allow: tuple[EgressRule, ...]

    @property
    def name(self) -> str:
        """The listener's name in logs and metrics (no inbound or outbound listener may take it)."""
        return "egress"


@dataclass(frozen=True)
class AdminConfig:
    listen: Endpoint


@dataclass(frozen=True)
class Timeouts:
    handshake: float = 10.0
    connect: float = 5.0
    idle: float = 3600.0
    drain: float = 30.0


@dataclass(frozen=True)
class HandshakeLimits:
    """Unauthenticated connections, per inbound listener. When a bound is reached, the oldest connection
    it bounds yields to the new one (closed, logged ``connection_limit``): an attacker's stalled
    connections are always older than a good peer's, which completes in milliseconds."""

    per_listener: int = 256  # handshakes in progress (ClientHello received, an OpenSSL object each)
    per_source: int = 64  # unauthenticated connections from one source address, waiting or handshaking
    waiting: int = 4096  # accepted connections whose first TLS record has not arrived yet (a few KiB each)


@dataclass(frozen=True)
class Limits:
    """``max_connections`` counts established connections (authorized inbound, outbound from accept) over
    all listeners; ``per_listener`` (None: no bound of its own) caps any one listener, so that a busy one
    leaves room for the others. Handshakes in progress take no slot: ``handshakes`` bounds them."""

    max_connections: int = 10000
    per_listener: int | None = None
    handshakes: HandshakeLimits = HandshakeLimits()


@dataclass(frozen=True)
class TlsConfig:
    """TLS 1.3 session resumption between sidecars (off by default: every connection is a full handshake)."""

    session_resumption: bool = False
    session_lifetime: float = 3600.0  # also capped by the certificates' remaining life


@dataclass(frozen=True)
class LogConfig:
    level: str = "info"
    format: str = "json"


@dataclass(frozen=True)
class Config:
    """The whole file. Each field but ``source`` is one top-level section, named as in the YAML."""

    identity: IdentityConfig
    inbound: tuple[InboundConfig, ...]
    outbound: tuple[OutboundConfig, ...]
    admin: AdminConfig | None
    timeouts: Timeouts
    limits: Limits
    log: LogConfig
    source: Path  # the config file, as given to load_config / parse_config
    tls: TlsConfig = TlsConfig()
    egress: EgressConfig | None = None
    trust_domains: tuple[TrustDomainConfig, ...] = ()  # federated trust domains, besides our own


class ConfigError(Exception):
    """Every problem found in a config file, one ``FILE:LINE: key.path: message`` string each.

    ``identity`` is the identity section when that section alone was valid, so ``proxy check`` can
    go on to report problems with the certificate files in the same run.
    """

    def __init__(self, problems: list[str], identity: IdentityConfig | None = None):
        super().__init__("\n".join(problems))
        self.problems = list(problems)
        self.identity = identity
