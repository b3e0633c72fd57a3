"""Hardening: property-based inputs to the parsers that face operators and peers.

tests/test_config.py already feeds random YAML trees, mutated examples, random text and random bytes
to the config loader. Here: the SPIFFE ID and pattern parsers on any string (lone surrogates
included: that is what undecodable argv bytes become), config documents that follow the schema
closely enough to reach the deep validators, YAML's own traps (tags, anchors, alias bombs), and the
`ca` command line given an ID that is not UTF-8.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.ca_cli import run_ca
from support.certs import TD
from support.processes import PY

from mtls.spiffe import InvalidSpiffeId, parse_pattern, parse_spiffe_id
from proxy.config import ConfigError, parse_config

SOURCE = Path("/etc/proxy/config.yaml")

# Every code point, surrogates included (hypothesis leaves category Cs out by default).
ANY_CHARACTER = st.characters(min_codepoint=0, max_codepoint=0x10FFFF, blacklist_categories=())
ID_PIECES = st.sampled_from([
    "spiffe://", "SPIFFE://", "spiffe:", "//", "/", "example.org", "td", "ns", "prod", "sa", "web", "*", "/*",
    ".", "..", "%2F", "%", "?", "#", "@", ":", ":443", "user@", "A", "-", "_", "\x00", "\n", "\x7f", "\u00e9",
    "\ud800", "\udcff", "\U0001f600", "x" * 300, "a." * 130,
])


@st.composite
def near_ids(draw) -> str:
    """Strings built from the pieces of SPIFFE IDs: most land near a rule's edge."""
    return "".join(draw(st.lists(ID_PIECES | st.text(ANY_CHARACTER, max_size=4), min_size=1, max_size=12)))


ID_INPUTS = st.one_of(st.text(ANY_CHARACTER, max_size=80), near_ids(), st.just("spiffe://" + "a" * 2100))


@settings(max_examples=1500, deadline=None)
@given(ID_INPUTS, st.booleans())
def test_parse_spiffe_id_accepts_or_raises_only_invalid_spiffe_id(value, require_path):
    try:
        parsed = parse_spiffe_id(value, require_path=require_path)
    except InvalidSpiffeId as exc:
        assert exc.rule and isinstance(str(exc), str)
        return
    assert str(parsed) == value, "an accepted ID prints exactly as it was written"
    assert parse_spiffe_id(str(parsed)) == parsed
    assert len(value.encode("utf-8")) <= 2048


@settings(max_examples=1500, deadline=None)
@given(ID_INPUTS)
def test_parse_pattern_accepts_or_raises_only_invalid_spiffe_id(value):
    try:
        pattern = parse_pattern(value)
    except InvalidSpiffeId as exc:
        assert exc.rule
        return
    assert str(pattern) == value
    assert pattern.matches(pattern.base) is (not pattern.wildcard)


@pytest.mark.parametrize("value", [None, 42, b"spiffe://example.org/x", ["spiffe://example.org/x"], 1.5])
def test_parsers_refuse_values_that_are_not_strings_with_their_own_error(value):
    with pytest.raises(InvalidSpiffeId):
        parse_spiffe_id(value)
    with pytest.raises(InvalidSpiffeId):
        parse_pattern(value)


@pytest.mark.e2e
def test_ca_issue_refuses_an_id_that_is_not_utf8_with_one_line_and_exit_2(tmp_path):
    ca_dir = tmp_path / "ca"
    run_ca("init", "--trust-domain", TD, ca_dir=ca_dir)
    # argv bytes that are not UTF-8 reach Python as lone surrogates (PEP 383).
    proc = subprocess.run(
        [os.fsencode(PY), b"-m", b"ca", b"issue", b"spiffe://example.org/ns/\xff",
         b"--out", os.fsencode(tmp_path / "x")],
        env=dict(os.environ, CA_DIR=str(ca_dir)), capture_output=True, timeout=60,
    )
    stderr = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == 2, stderr
    assert "Traceback" not in stderr
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert not (tmp_path / "x").exists()


# --- config documents shaped like the schema, with hostile values -----------------------------------

HOSTILE_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(ANY_CHARACTER, max_size=20), near_ids(),
    st.sampled_from([
        "0.0.0.0:8443", "127.0.0.1:0", "127.0.0.1:65536", "[::1]:1", "[::1]", "::1:80", "unix:", "unix:rel",
        "unix:/s", "host:1", "-bad-:1", "10s", "0s", "-1s", "1e400s", "999999999999d", "1.5h", "0x10",
        "spiffe://example.org/*", "https://ca:8443", "http://ca", "enforce", "audit", "json", "text", "loud",
        "", " ", "~", "0", "-0", "1_000", "0o17", ".inf", ".nan", "2001-12-14", "yes", "on",
    ]),
)
VALUES = st.recursive(
    HOSTILE_SCALARS,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=8,
)


def _maybe(draw, value):
    """The schema's value most of the time, something hostile otherwise."""
    return draw(st.one_of(st.just(value), VALUES)) if draw(st.integers(0, 3)) == 0 else value


@st.composite
def schema_shaped_configs(draw) -> dict:
    def field(value):
        return draw(VALUES) if draw(st.integers(0, 2)) == 0 else value

    identity = {"cert": field("cert.pem"), "key": field("key.pem"), "bundle": field("bundle.pem")}
    if draw(st.booleans()):
        identity["crl"] = field("crl.pem")
    if draw(st.booleans()):
        identity["renew"] = {"url": field("https://ca:8443"), "at": field(0.66)}
    doc: dict = {"identity": _maybe(draw, identity)}
    doc["inbound"] = [
        {"name": field(f"in{i}"), "listen": field("0.0.0.0:8443"), "forward": field("127.0.0.1:8080"),
         "allow": field([field("spiffe://example.org/ns/prod/*")]), "mode": field("enforce"),
         "proxy_protocol": field(False)}
        for i in range(draw(st.integers(0, 2)))
    ]
    doc["outbound"] = [
        {"name": field(f"out{i}"), "listen": field("127.0.0.1:9001"), "connect": field("api.prod.svc:8443"),
         "expect": field([field("spiffe://example.org/ns/prod/sa/api")]), "server_name": field("api.prod.svc")}
        for i in range(draw(st.integers(0, 2)))
    ]
    doc["admin"] = {"listen": field("127.0.0.1:15000")}
    doc["timeouts"] = {k: field(v) for k, v in {"handshake": "10s", "connect": "5s", "idle": "1h", "drain": 30}.items()}
    doc["limits"] = {"max_connections": field(10000)}
    doc["log"] = {"level": field("info"), "format": field("json")}
    for key in draw(st.lists(st.sampled_from(sorted(doc)), max_size=3, unique=True)):
        del doc[key]
    return doc


def _only_config_error(text: str) -> None:
    try:
        parse_config(text, SOURCE)
    except ConfigError as exc:
        assert exc.problems and all(isinstance(p, str) and p.startswith(str(SOURCE)) for p in exc.problems)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(schema_shaped_configs())
def test_schema_shaped_configs_with_hostile_values_only_raise_config_error(document):
    _only_config_error(yaml.safe_dump(document, allow_unicode=True))


YAML_TRAPS = st.sampled_from([
    "identity: !!python/object/apply:os.system ['true']\n",
    "identity: !!python/name:os.system\n",
    "identity: !!binary aGVsbG8=\n",
    "identity: !custom {cert: a}\n",
    "identity: &id {cert: a, key: b, bundle: c}\ninbound: [*id, *id]\n",
    "identity: {cert: a, key: b, bundle: c}\ninbound:\n  - &x {name: a, listen: '127.0.0.1:0', forward: '127.0.0.1:1', "
    "allow: [spiffe://td/x]}\n  - *x\n",
    "identity: &a [*a]\n",
    "? [complex, key]\n: value\n",
    "identity: {cert: a, key: b, bundle: c}\nlog: {level: !!int '1'}\n",
    "identity: {cert: a, key: b, bundle: c}\ntimeouts: {handshake: !!float '1e999'}\n",
    "identity: {cert: a, key: b, bundle: c}\nlimits: {max_connections: !!int '0x_'}\n",
    "%YAML 1.1\n---\nidentity: {cert: a, key: b, bundle: c}\n",
    "%TAG ! tag:evil.example,2000:\n---\nidentity: !x {cert: a}\n",
    "identity: {cert: a, key: b, bundle: c}\n...\n---\nidentity: {}\n",
    "\ufeffidentity: {cert: a, key: b, bundle: c}\n",
])


@settings(max_examples=300, deadline=None)
@given(YAML_TRAPS, st.text(ANY_CHARACTER, max_size=6), st.integers(0, 200))
def test_yaml_tags_anchors_and_directives_only_raise_config_error(trap, noise, position):
    position = min(position, len(trap))
    _only_config_error(trap)
    _only_config_error(trap[:position] + noise + trap[position:])


def test_an_alias_bomb_is_refused_quickly():
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]  # 10**9 leaves if expanded
    text = "\n".join(lines) + "\nidentity: {cert: *a8, key: *a8, bundle: *a8}\ninbound: *a8\noutbound: *a8\n"
    started = time.monotonic()
    with pytest.raises(ConfigError):
        parse_config(text, SOURCE)
    assert time.monotonic() - started < 5, "aliases must not be expanded into a billion nodes"
