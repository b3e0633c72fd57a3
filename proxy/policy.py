"""Who may talk to whom: a pure decision with a reason a human understands.

No ssl, no trio, no sockets: tests call these functions directly.
"""

from __future__ import annotations

from mtls.reasons import IDENTITY_NOT_ALLOWED, SERVER_IDENTITY_MISMATCH, Decision
from mtls.spiffe import PatternSet, SpiffeId

MAX_RULES_LISTED = 5  # a denial names a longer list by its size and the rules nearest the peer


def _rules_text(rules: PatternSet, peer: SpiffeId) -> str:
    """The rules as a denial names them: every one of a short list, else how many and the nearest.

    Every refused connection logs this, so its size must not grow with the list.
    """
    if len(rules) <= MAX_RULES_LISTED:
        return ", ".join(str(rule) for rule in rules)
    nearest = rules.nearest(peer)
    if not nearest:
        return f"{len(rules)} rules (none in trust domain {peer.trust_domain})"
    return f"{len(rules)} rules (nearest: {', '.join(str(rule) for rule in nearest)})"


def authorize_client(listener: str, allow: PatternSet, peer: SpiffeId) -> Decision:
    """Inbound: may ``peer`` connect to the port ``listener``?"""
    rule = allow.match(peer)
    if rule is None:
        return Decision(
            False,
            IDENTITY_NOT_ALLOWED,
            f"port {listener} allows {_rules_text(allow, peer)}; peer is {peer}",
        )
    return Decision(True, None, f"port {listener} allows {peer} by rule {rule}")


def authorize_server(listener: str, expect: PatternSet, server: SpiffeId) -> Decision:
    """Outbound: is ``server`` the upstream that ``listener`` expects?"""
    rule = expect.match(server)
    if rule is None:
        return Decision(
            False,
            SERVER_IDENTITY_MISMATCH,
            f"upstream {listener} expects {_rules_text(expect, server)}; server is {server}",
        )
    return Decision(True, None, f"upstream {listener} expects {rule}; server is {server}")
