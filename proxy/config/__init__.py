"""The sidecar's YAML config, read into frozen dataclasses.

``yamlreader`` is a strict, line-numbered YAML reader that knows nothing of our keys; ``schema``
says which sections and keys exist and reads each one with it; ``model`` holds the result.
"""

from proxy.config.model import (
    AdminConfig,
    Config,
    ConfigError,
    EgressConfig,
    HandshakeLimits,
    IdentityConfig,
    InboundConfig,
    Limits,
    LogConfig,
    OutboundConfig,
    RenewConfig,
    SyncConfig,
    Timeouts,
    TlsConfig,
    TrustDomainConfig,
)
from proxy.config.schema import load_config, parse_config

__all__ = [
    "AdminConfig", "Config", "ConfigError", "EgressConfig", "HandshakeLimits", "IdentityConfig", "InboundConfig",
    "Limits", "LogConfig",
    "OutboundConfig", "RenewConfig", "SyncConfig", "Timeouts", "TlsConfig", "TrustDomainConfig", "load_config",
    "parse_config",
]
