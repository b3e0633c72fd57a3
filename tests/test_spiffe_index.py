"""PatternSet: the indexed allowlist decides exactly as a walk of the list in config order would.

The reference for one rule is ``IdPattern.matches`` (its own table is in test_ca_spiffe_ids.py);
the reference for a list is the first rule that matches, in order.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from mtls.spiffe import (
    NEAREST_RULES,
    IdPattern,
    PatternSet,
    SpiffeId,
    parse_pattern,
    parse_spiffe_id,
)


def _first_by_walking(rules: list[IdPattern], peer: SpiffeId) -> IdPattern | None:
    return next((rule for rule in rules if rule.matches(peer)), None)


def _segments(path: str) -> list[str]:
    return path.split("/")[1:]


def _nearest_by_sorting(rules: list[IdPattern], peer: SpiffeId) -> tuple[IdPattern, ...]:
    """Same trust domain, most leading path segments in common with the peer, then config order."""

    def shared(rule: IdPattern) -> int:
        count = 0
        for mine, theirs in zip(_segments(rule.base.path), _segments(peer.path)):
            if mine != theirs:
                break
            count += 1
        return count

    ranked = sorted(
        (position for position, rule in enumerate(rules) if rule.base.trust_domain == peer.trust_domain),
        key=lambda position: (-shared(rules[position]), position),
    )
    return tuple(rules[position] for position in ranked[:NEAREST_RULES])


# Few trust domains and segment names, so that rules and peers share prefixes and collide often.
_DOMAINS = st.sampled_from(["a.org", "b.org"])
_PATHS = st.lists(st.sampled_from(["x", "y", "z"]), max_size=4).map(lambda segments: "".join("/" + s for s in segments))


@st.composite
def _rules(draw) -> str:
    domain, path, wildcard = draw(_DOMAINS), draw(_PATHS), draw(st.booleans())
    if wildcard or not path:  # a trust-domain ID alone is not a valid exact rule
        return f"spiffe://{domain}{path}/*"
    return f"spiffe://{domain}{path}"


_ALLOWLISTS = st.lists(_rules().map(parse_pattern), min_size=1, max_size=40)
_PEERS = st.builds(SpiffeId, st.sampled_from(["a.org", "b.org", "c.org"]), _PATHS)


@given(_ALLOWLISTS, _PEERS)
def test_match_is_the_first_matching_rule_in_config_order(rules, peer):
    assert PatternSet(rules).match(peer) is _first_by_walking(rules, peer)


@given(_ALLOWLISTS, _PEERS)
def test_nearest_ranks_by_shared_leading_segments_then_config_order(rules, peer):
    assert PatternSet(rules).nearest(peer) == _nearest_by_sorting(rules, peer)


def _set(*rules: str) -> PatternSet:
    return PatternSet(parse_pattern(rule) for rule in rules)


def _id(value: str) -> SpiffeId:
    return parse_spiffe_id(value)


def test_exact_rule_matches_only_that_id():
    rules = _set("spiffe://td/ns/prod/sa/web")
    assert rules.match(_id("spiffe://td/ns/prod/sa/web")) == parse_pattern("spiffe://td/ns/prod/sa/web")
    assert rules.match(_id("spiffe://td/ns/prod/sa/web2")) is None
    assert rules.match(_id("spiffe://td/ns/prod/sa/web/x")) is None
    assert rules.match(_id("spiffe://td/ns/prod/sa")) is None


def test_prefix_rule_matches_one_or_more_further_segments_only():
    rules = _set("spiffe://td/ns/prod/*")
    assert rules.match(_id("spiffe://td/ns/prod/x")) is not None
    assert rules.match(_id("spiffe://td/ns/prod/sa/x")) is not None
    assert rules.match(_id("spiffe://td/ns/prod")) is None
    assert rules.match(_id("spiffe://td/ns/production/x")) is None


def test_whole_trust_domain_rule_matches_every_workload_but_not_the_domain_itself():
    rules = _set("spiffe://td/*")
    assert rules.match(_id("spiffe://td/anything/at/all")) is not None
    assert rules.match(_id("spiffe://td")) is None
    assert rules.match(_id("spiffe://tdx/a")) is None


def test_rule_of_another_trust_domain_never_matches():
    rules = _set("spiffe://td/ns/prod/*", "spiffe://td/ns/prod/sa/web")
    assert rules.match(_id("spiffe://other/ns/prod/sa/web")) is None
    assert rules.nearest(_id("spiffe://other/ns/prod/sa/web")) == ()


def test_earlier_rule_wins_when_several_match():
    prefix_first = _set("spiffe://td/ns/*", "spiffe://td/ns/prod/sa/web")
    exact_first = _set("spiffe://td/ns/prod/sa/web", "spiffe://td/ns/*")
    web = _id("spiffe://td/ns/prod/sa/web")
    assert str(prefix_first.match(web)) == "spiffe://td/ns/*"
    assert str(exact_first.match(web)) == "spiffe://td/ns/prod/sa/web"


def test_nearest_prefers_the_longest_shared_path():
    rules = _set("spiffe://td/ns/dev/*", "spiffe://td/ns/prod/*", "spiffe://td/other", "spiffe://td/ns/prod/sa/db")
    nearest = rules.nearest(_id("spiffe://td/ns/prod/sa/web"))
    assert [str(rule) for rule in nearest] == [
        "spiffe://td/ns/prod/sa/db", "spiffe://td/ns/prod/*", "spiffe://td/ns/dev/*",
    ]


def test_iterates_in_config_order_and_compares_by_rules():
    rules = _set("spiffe://td/b", "spiffe://td/a/*")
    assert [str(rule) for rule in rules] == ["spiffe://td/b", "spiffe://td/a/*"]
    assert len(rules) == 2
    assert rules == _set("spiffe://td/b", "spiffe://td/a/*")
    assert rules != _set("spiffe://td/a/*", "spiffe://td/b")
