"""proxy.policy: who may talk to whom, decided by pure functions on (listener, rules, peer ID).

No sockets and no certificates: the decision and its sentence, for many rule lists and peers.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mtls.reasons import IDENTITY_NOT_ALLOWED, SERVER_IDENTITY_MISMATCH
from mtls.spiffe import PatternSet, parse_pattern, parse_spiffe_id
from proxy.policy import authorize_client, authorize_server

WEB = "spiffe://example.org/ns/prod/sa/web"


def rules(*patterns: str) -> PatternSet:
    return PatternSet(parse_pattern(pattern) for pattern in patterns)


def peer(spiffe_id: str):
    return parse_spiffe_id(spiffe_id)


# Each case: the allowlist, the peer, whether it may connect.
CASES = [
    pytest.param([WEB], WEB, True, id="exact-id"),
    pytest.param([WEB], "spiffe://example.org/ns/prod/sa/api", False, id="exact-id-names-no-other"),
    pytest.param([WEB], "spiffe://example.org/ns/prod/sa/web/x", False, id="exact-id-names-no-child"),
    pytest.param([WEB], "spiffe://other.org/ns/prod/sa/web", False, id="same-path-other-trust-domain"),
    pytest.param(["spiffe://example.org/ns/prod/*"], WEB, True, id="wildcard-below"),
    pytest.param(["spiffe://example.org/ns/prod/*"], "spiffe://example.org/ns/prod", False, id="wildcard-not-itself"),
    pytest.param(["spiffe://example.org/ns/prod/*"], "spiffe://example.org/ns/production/x", False,
                 id="wildcard-whole-segments-only"),
    pytest.param(["spiffe://example.org/ns/prod/*"], "spiffe://other.org/ns/prod/sa/web", False,
                 id="wildcard-own-trust-domain-only"),
    pytest.param(["spiffe://example.org/*"], WEB, True, id="whole-trust-domain"),
    pytest.param(["spiffe://example.org/*"], "spiffe://example.org.evil/ns/prod/sa/web", False,
                 id="whole-trust-domain-not-a-lookalike"),
    pytest.param(["spiffe://example.org/ns/dev/*", WEB], WEB, True, id="second-rule"),
    pytest.param(["spiffe://example.org/ns/dev/*", "spiffe://other.org/*"], WEB, False, id="no-rule"),
]


@pytest.mark.parametrize(("allow", "spiffe_id", "allowed"), CASES)
def test_a_client_is_allowed_exactly_when_a_rule_matches_it(allow, spiffe_id, allowed):
    decision = authorize_client("api", rules(*allow), peer(spiffe_id))
    assert decision.allowed is allowed
    assert decision.reason == (None if allowed else IDENTITY_NOT_ALLOWED)


@pytest.mark.parametrize(("expect", "spiffe_id", "allowed"), CASES)
def test_a_server_is_accepted_exactly_when_a_rule_matches_it(expect, spiffe_id, allowed):
    decision = authorize_server("api", rules(*expect), peer(spiffe_id))
    assert decision.allowed is allowed
    assert decision.reason == (None if allowed else SERVER_IDENTITY_MISMATCH)


def test_an_allowed_client_is_logged_with_the_rule_that_let_it_in():
    decision = authorize_client("api", rules("spiffe://example.org/ns/dev/*", "spiffe://example.org/ns/prod/*"),
                                peer(WEB))
    assert decision.detail == f"port api allows {WEB} by rule spiffe://example.org/ns/prod/*"


def test_the_first_matching_rule_in_config_order_is_the_one_named():
    decision = authorize_client("api", rules("spiffe://example.org/*", WEB), peer(WEB))
    assert decision.detail.endswith("by rule spiffe://example.org/*")


def test_a_denied_client_is_told_the_port_its_rules_and_who_it_is():
    decision = authorize_client("api", rules("spiffe://example.org/ns/dev/*", "spiffe://example.org/ns/ops/sa/x"),
                                peer(WEB))
    assert decision.detail == (
        f"port api allows spiffe://example.org/ns/dev/*, spiffe://example.org/ns/ops/sa/x; peer is {WEB}"
    )


def test_an_accepted_server_is_logged_with_the_expectation_it_met():
    decision = authorize_server("orders", rules("spiffe://example.org/ns/prod/*"), peer(WEB))
    assert decision.detail == f"upstream orders expects spiffe://example.org/ns/prod/*; server is {WEB}"


def test_a_mismatched_server_names_the_upstream_its_expectation_and_the_server():
    decision = authorize_server("orders", rules("spiffe://example.org/ns/prod/sa/orders"), peer(WEB))
    assert decision.detail == f"upstream orders expects spiffe://example.org/ns/prod/sa/orders; server is {WEB}"


def test_an_empty_rule_list_allows_nobody():
    assert not authorize_client("api", rules(), peer(WEB)).allowed
    assert not authorize_server("api", rules(), peer(WEB)).allowed


def test_the_decision_depends_on_the_rules_and_the_peer_only():
    allow = rules(WEB)
    first = authorize_client("api", allow, peer(WEB))
    assert authorize_client("api", allow, peer(WEB)) == first
    assert authorize_client("api", rules("spiffe://example.org/ns/prod/sa/api"), peer(WEB)) != first


SEGMENTS = st.sampled_from(["ns", "prod", "dev", "sa", "web", "api", "x"])
PATHS = st.lists(SEGMENTS, min_size=1, max_size=4).map(lambda parts: "/" + "/".join(parts))
DOMAINS = st.sampled_from(["example.org", "other.org"])
IDS = st.builds(lambda domain, path: f"spiffe://{domain}{path}", DOMAINS, PATHS)
PATTERNS = st.one_of(IDS, st.builds(lambda domain, path: f"spiffe://{domain}{path}/*", DOMAINS, PATHS),
                     DOMAINS.map(lambda domain: f"spiffe://{domain}/*"))


@given(st.lists(PATTERNS, max_size=6), IDS)
def test_both_directions_allow_exactly_the_peers_some_rule_matches(patterns, spiffe_id):
    parsed = [parse_pattern(pattern) for pattern in patterns]
    expected = any(rule.matches(peer(spiffe_id)) for rule in parsed)
    assert authorize_client("api", PatternSet(parsed), peer(spiffe_id)).allowed is expected
    assert authorize_server("api", PatternSet(parsed), peer(spiffe_id)).allowed is expected
