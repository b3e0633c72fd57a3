"""Who may talk to whom: a pure decision with a reason a human understands.

No ssl, no trio, no sockets: tests call these functions directly.
"""

from __future__ import annotations

from mtls.reasons import IDENTITY_NOT_ALLOWED, SERVER_IDENTITY_MISMATCH, Decision
from mtls.spiffe import IdPattern, SpiffeId, first_match


def _rules_text(patterns: tuple[IdPattern, ...]) -> str:
    return ", ".join(str(p) for p in patterns)


def authorize_client(listener: str, allow: tuple[IdPattern, ...], peer: SpiffeId) -> Decision:
    """Inbound: may ``peer`` connect to the port ``listener``?"""
    rule = first_match(allow, peer)
    if rule is None:
        return Decision(
            False,
            IDENTITY_NOT_ALLOWED,
            f"port {listener} allows {_rules_text(allow)}; peer is {peer}",
        )
    return Decision(True, None, f"port {listener} allows {peer} by rule {rule}")


def authorize_server(listener: str, expect: tuple[IdPattern, ...], server: SpiffeId) -> Decision:
    """Outbound: is ``server`` the upstream that ``listener`` expects?"""
    rule = first_match(expect, server)
    if rule is None:
        return Decision(
            False,
            SERVER_IDENTITY_MISMATCH,
            f"upstream {listener} expects {_rules_text(expect)}; server is {server}",
        )
    return Decision(True, None, f"upstream {listener} expects {rule}; server is {server}")
