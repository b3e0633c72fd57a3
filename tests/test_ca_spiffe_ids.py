"""SPIFFE ID and pattern rules, from the SPIFFE-ID specification and the decisions in docs/reference.md.

The table is the spec read rule by rule: scheme, trust domain (characters, case, port, userinfo,
length), path (segments, '.', '..', empty, trailing slash, characters), no query/fragment/
percent-encoding, at most 2048 bytes, and no control character anywhere (a trailing newline too).
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from support.ca_cli import assert_one_line_error, files_under, run_ca

from mtls.spiffe import InvalidSpiffeId, parse_pattern, parse_spiffe_id

TD_255 = "a" * 251 + ".org"
LONGEST = "spiffe://example.org/" + "a" * (2048 - len("spiffe://example.org/"))

VALID_IDS = [
    "spiffe://example.org",  # a trust-domain ID: valid, but not for a workload
    "spiffe://example.org/ns/prod/sa/web",
    "spiffe://example.org/a",
    "spiffe://example.org/a.b/c-d/e_f",
    "spiffe://example.org/.hidden",  # only '.' and '..' themselves are forbidden
    "spiffe://example.org/..a/a..",
    "spiffe://example.org/-/_/...",
    "spiffe://example.org/UPPER/Case/Path",  # case matters only in scheme and trust domain
    "spiffe://example.org/0/123",
    "spiffe://my-domain_1.example.org/x",
    "spiffe://localhost/x",
    "spiffe://1.2.3.4/x",  # digits and dots are trust-domain characters
    "spiffe://td/x",
    f"spiffe://{TD_255}/x",  # trust domain of exactly 255 bytes
    LONGEST,  # exactly 2048 bytes
]

INVALID_IDS = [
    ("", "must start with 'spiffe://'"),
    ("example.org/a", "must start with 'spiffe://'"),
    (" spiffe://example.org/a", "scheme must be 'spiffe'"),  # the scheme is ' spiffe'
    ("spiffe:/example.org/a", "must start with 'spiffe://'"),
    ("spiffe:example.org/a", "must start with 'spiffe://'"),
    ("http://example.org/a", "scheme must be 'spiffe'"),
    ("spiffes://example.org/a", "scheme must be 'spiffe'"),
    ("SPIFFE://example.org/a", "scheme must be lower-case"),
    ("Spiffe://example.org/a", "scheme must be lower-case"),
    ("spiffe://", "trust domain is empty"),
    ("spiffe:///a", "trust domain is empty"),
    ("spiffe://Example.org/a", "trust domain must be lower-case"),
    ("spiffe://EXAMPLE.ORG", "trust domain must be lower-case"),
    ("spiffe://example.org:8443/a", "must not contain a port"),
    ("spiffe://example.org:/a", "must not contain a port"),
    ("spiffe://user@example.org/a", "must not contain userinfo"),
    ("spiffe://user:secret@example.org/a", "must not contain userinfo"),
    ("spiffe://[::1]/a", "trust domain contains '['"),
    ("spiffe://exa mple.org/a", "trust domain contains ' '"),
    ("spiffe://exämple.org/a", "trust domain contains 'ä'"),
    ("spiffe://exa%6dple.org/a", "percent-encoding is not allowed"),
    (f"spiffe://{'a' * 252}.org/x", "trust domain is longer than 255 bytes"),
    ("spiffe://example.org/a?x=1", "query ('?') is not allowed"),
    ("spiffe://example.org?x", "query ('?') is not allowed"),
    ("spiffe://example.org/a#frag", "fragment ('#') is not allowed"),
    ("spiffe://example.org/", "path must not end with '/'"),
    ("spiffe://example.org/a/", "path must not end with '/'"),
    ("spiffe://example.org//a", "empty segment"),
    ("spiffe://example.org/a//b", "empty segment"),
    ("spiffe://example.org/.", "must not contain a '.' segment"),
    ("spiffe://example.org/a/./b", "must not contain a '.' segment"),
    ("spiffe://example.org/..", "must not contain a '..' segment"),
    ("spiffe://example.org/a/../b", "must not contain a '..' segment"),
    ("spiffe://example.org/a%20b", "percent-encoding is not allowed"),
    ("spiffe://example.org/%2e%2e", "percent-encoding is not allowed"),
    ("spiffe://example.org/a b", "contains ' '"),
    ("spiffe://example.org/a*", "contains '*'"),
    ("spiffe://example.org/a:b", "contains ':'"),
    ("spiffe://example.org/a@b", "contains '@'"),
    ("spiffe://example.org/é", "contains 'é'"),
    ("spiffe://example.org/a\u2028", "contains '\\u2028'"),
    ("spiffe://example.org/a\n", "control character '\\n'"),
    ("spiffe://example.org/a\r\n", "control character '\\r'"),
    ("spiffe://example.org/a\x00b", "control character '\\x00'"),
    ("spiffe://example.org/a\tb", "control character '\\t'"),
    ("spiffe://exam\x1bple.org/a", "control character '\\x1b'"),
    ("spiffe://example.org/a\x7f", "control character '\\x7f'"),
    (LONGEST + "a", "longer than 2048 bytes"),
    ("spiffe://example.org/" + "é" * 1014, "longer than 2048 bytes"),  # 2049 bytes, 1035 characters
]


def test_table_has_at_least_forty_ids():
    assert len(VALID_IDS) + len(INVALID_IDS) >= 40


@pytest.mark.parametrize("value", VALID_IDS)
def test_accepts_valid_id(value):
    parsed = parse_spiffe_id(value)
    assert str(parsed) == value


@pytest.mark.parametrize(("value", "rule"), INVALID_IDS)
def test_rejects_invalid_id_naming_the_rule(value, rule):
    with pytest.raises(InvalidSpiffeId) as caught:
        parse_spiffe_id(value)
    assert rule in caught.value.rule
    assert str(caught.value) == f"invalid SPIFFE ID {value!r}: {caught.value.rule}"


def test_workload_id_requires_a_path():
    with pytest.raises(InvalidSpiffeId, match="must have a path"):
        parse_spiffe_id("spiffe://example.org", require_path=True)


def test_id_splits_into_trust_domain_and_path():
    parsed = parse_spiffe_id("spiffe://example.org/ns/prod/sa/web")
    assert (parsed.trust_domain, parsed.path) == ("example.org", "/ns/prod/sa/web")


_SEGMENT = st.text(alphabet="abcXYZ019._-", min_size=1, max_size=12).filter(lambda s: s not in (".", ".."))


@given(st.lists(_SEGMENT, min_size=1, max_size=8))
def test_any_id_built_from_valid_segments_round_trips(segments):
    value = "spiffe://example.org/" + "/".join(segments)
    assert str(parse_spiffe_id(value, require_path=True)) == value


# --- patterns ----------------------------------------------------------------------------------

PATTERN_CASES = [
    ("spiffe://td/ns/prod/*", "spiffe://td/ns/prod/sa/x", True),
    ("spiffe://td/ns/prod/*", "spiffe://td/ns/prod/x", True),
    ("spiffe://td/ns/prod/*", "spiffe://td/ns/prod", False),
    ("spiffe://td/ns/prod/*", "spiffe://td/ns/production/x", False),
    ("spiffe://td/ns/prod/*", "spiffe://other/ns/prod/x", False),
    ("spiffe://td/ns/prod/*", "spiffe://td/ns/PROD/x", False),
    ("spiffe://td/*", "spiffe://td/anything/at/all", True),
    ("spiffe://td/*", "spiffe://td", False),
    ("spiffe://td/*", "spiffe://tdx/a", False),
    ("spiffe://td/ns/prod/sa/web", "spiffe://td/ns/prod/sa/web", True),
    ("spiffe://td/ns/prod/sa/web", "spiffe://td/ns/prod/sa/web2", False),
    ("spiffe://td/ns/prod/sa/web", "spiffe://td/ns/prod/sa/web/x", False),
]


@pytest.mark.parametrize(("pattern", "peer", "expected"), PATTERN_CASES)
def test_pattern_matches_exact_id_or_further_segments(pattern, peer, expected):
    assert parse_pattern(pattern).matches(parse_spiffe_id(peer)) is expected


@pytest.mark.parametrize(
    ("pattern", "rule"),
    [
        ("spiffe://td/ns/*/web", "only allowed as the whole last segment"),
        ("spiffe://td/ns/pro*", "only allowed as the whole last segment"),
        ("spiffe://*/ns", "only allowed as the whole last segment"),
        ("spiffe://td", "never matches a workload"),
        ("spiffe://TD/*", "trust domain must be lower-case"),
        ("spiffe://td//*", "must not end with '/'"),
    ],
)
def test_rejects_pattern_that_cannot_match(pattern, rule):
    with pytest.raises(InvalidSpiffeId, match=rule.replace("*", r"\*")):
        parse_pattern(pattern)


# --- the same rules at the CLI ------------------------------------------------------------------


@pytest.mark.e2e
def test_issue_refuses_invalid_id_naming_the_rule_and_writes_nothing(tmp_path):
    assert run_ca("init", "--trust-domain", "example.org", cwd=tmp_path).returncode == 0
    before = files_under(tmp_path)
    result = run_ca("issue", "spiffe://example.org/a/", "--out", "out", cwd=tmp_path, check=False)
    message = assert_one_line_error(result, 2)
    assert message == "ca: invalid SPIFFE ID 'spiffe://example.org/a/': path must not end with '/'"
    assert files_under(tmp_path) == before
