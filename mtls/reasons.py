"""The reason codes a refused or closed connection is logged with, and a decision as a value.

Pure. The sidecar's handshake, its decision log, ``proxy check`` and ``ca verify`` all name a
refusal with one of these codes, so an operator sees the same word for the same cause everywhere.
The list is the one in docs/reference.md ("Reason codes").
"""

from __future__ import annotations

from dataclasses import dataclass

NO_CLIENT_CERT = "no_client_cert"
UNTRUSTED_CA = "untrusted_ca"
EXPIRED = "expired"
NOT_YET_VALID = "not_yet_valid"
REVOKED = "revoked"
NOT_SVID = "not_svid"
IDENTITY_NOT_ALLOWED = "identity_not_allowed"
SERVER_IDENTITY_MISMATCH = "server_identity_mismatch"
HANDSHAKE_TIMEOUT = "handshake_timeout"
HANDSHAKE_FAILED = "handshake_failed"
PROTOCOL_ERROR = "protocol_error"
UPSTREAM_UNREACHABLE = "upstream_unreachable"
CONNECTION_LIMIT = "connection_limit"
POLICY_REVOKED = "policy_revoked"
IDLE_TIMEOUT = "idle_timeout"
EGRESS_DENIED = "egress_denied"
CRL_STALE = "crl_stale"
PEER_EXPIRED = "peer_expired"


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    reason: str | None  # a reason code when not allowed
    detail: str
