"""A decision's detail names a short allowlist in full and summarizes a long one, so its size is bounded."""

from __future__ import annotations

from mtls.reasons import IDENTITY_NOT_ALLOWED, SERVER_IDENTITY_MISMATCH
from mtls.spiffe import (
    MAX_ID_BYTES,
    NEAREST_RULES,
    PatternSet,
    parse_pattern,
    parse_spiffe_id,
)
from proxy.policy import MAX_RULES_LISTED, authorize_client, authorize_server

INTRUDER = parse_spiffe_id("spiffe://example.org/ns/prod/sa/intruder")


def _set(rules: list[str]) -> PatternSet:
    return PatternSet(parse_pattern(rule) for rule in rules)


def _many(count: int) -> list[str]:
    return [f"spiffe://example.org/ns/team{n}/*" for n in range(count)]


def test_denial_lists_every_rule_of_a_short_allowlist():
    rules = _many(MAX_RULES_LISTED)
    decision = authorize_client("api", _set(rules), INTRUDER)
    assert (decision.allowed, decision.reason) == (False, IDENTITY_NOT_ALLOWED)
    assert decision.detail == f"port api allows {', '.join(rules)}; peer is {INTRUDER}"


def test_denial_summarizes_a_long_allowlist_by_its_size_and_the_rules_nearest_the_peer():
    rules = [*_many(MAX_RULES_LISTED), "spiffe://example.org/ns/prod/web/*", "spiffe://example.org/ns/prod/sa/db"]
    decision = authorize_client("api", _set(rules), INTRUDER)
    assert decision.detail == (
        f"port api allows {len(rules)} rules (nearest: spiffe://example.org/ns/prod/sa/db, "
        f"spiffe://example.org/ns/prod/web/*, spiffe://example.org/ns/team0/*); peer is {INTRUDER}"
    )


def test_summary_says_when_no_rule_names_the_peers_trust_domain():
    stranger = parse_spiffe_id("spiffe://other.org/ns/prod/sa/web")
    decision = authorize_client("api", _set(_many(10)), stranger)
    assert decision.detail == f"port api allows 10 rules (none in trust domain other.org); peer is {stranger}"


def test_outbound_denial_summarizes_a_long_expect_list_the_same_way():
    decision = authorize_server("orders", _set(_many(10)), INTRUDER)
    assert (decision.allowed, decision.reason) == (False, SERVER_IDENTITY_MISMATCH)
    assert decision.detail == (
        "upstream orders expects 10 rules (nearest: spiffe://example.org/ns/team0/*, spiffe://example.org/ns/team1/*, "
        f"spiffe://example.org/ns/team2/*); server is {INTRUDER}"
    )


def test_denial_detail_does_not_grow_with_the_allowlist():
    decision = authorize_client("api", _set(_many(10_000)), INTRUDER)
    assert decision.detail.startswith("port api allows 10000 rules (nearest: ")
    # At most NEAREST_RULES rules and the peer, each at most MAX_ID_BYTES (+ "/*"), plus the words.
    assert len(decision.detail) < (NEAREST_RULES + 1) * (MAX_ID_BYTES + 2) + 100
    assert len(decision.detail) < 300  # with these short IDs


def test_allowed_decision_names_the_first_matching_rule_of_a_long_allowlist():
    rules = [*_many(10_000), "spiffe://example.org/ns/prod/*", "spiffe://example.org/ns/prod/sa/intruder"]
    decision = authorize_client("api", _set(rules), INTRUDER)
    assert decision.allowed
    assert decision.detail == f"port api allows {INTRUDER} by rule spiffe://example.org/ns/prod/*"
