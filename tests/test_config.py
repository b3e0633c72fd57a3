"""proxy.config: the YAML contract, strictness, and one problem line per broken rule."""

from __future__ import annotations

import re
import string
import textwrap
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mtls.endpoints import Endpoint, parse_endpoint
from mtls.spiffe import parse_pattern
from proxy.config import (
    AdminConfig,
    ConfigError,
    Limits,
    LogConfig,
    RenewConfig,
    Timeouts,
    load_config,
    parse_config,
)
from proxy.config.yamlreader import MAX_NESTING

SOURCE = Path("config.yaml")
IDENTITY = "identity: {cert: cert.pem, key: key.pem, bundle: bundle.pem}\n"  # line 1 of most cases

DESIGN_EXAMPLE = """\
identity:
  cert: /run/identity/cert.pem      # leaf + intermediates
  key: /run/identity/key.pem
  bundle: /run/identity/bundle.pem  # trust roots, may hold several (CA rotation)
  crl: /run/identity/crl.pem        # optional
  renew: {url: https://ca:8443, at: 0.66}
inbound:
  - name: api
    listen: 0.0.0.0:8443
    forward: 127.0.0.1:8080         # or unix:/path/to/socket
    allow: [spiffe://example.org/ns/prod/sa/frontend, spiffe://example.org/ns/ops/*]
    mode: enforce
    proxy_protocol: false
outbound:
  - name: orders
    listen: 127.0.0.1:9001
    connect: orders.prod.svc:8443
    expect: [spiffe://example.org/ns/prod/sa/orders]
    server_name: orders.prod.svc
admin:
  listen: 127.0.0.1:15000
timeouts: {handshake: 10s, connect: 5s, idle: 1h, drain: 30s}
limits: {max_connections: 10000}
log: {level: info, format: json}
"""


def problems_in(text: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(text, SOURCE)
    return caught.value.problems


def dedent(text: str) -> str:
    return textwrap.dedent(text).lstrip("\n")


# --- what a valid file gives ------------------------------------------------------------------


def test_parses_the_design_example_into_dataclasses():
    config = parse_config(DESIGN_EXAMPLE, SOURCE)

    assert config.identity.cert == Path("/run/identity/cert.pem")
    assert config.identity.crl == Path("/run/identity/crl.pem")
    assert config.identity.renew == RenewConfig("https://ca:8443", 0.66)
    (api,) = config.inbound
    assert api.name == "api"
    assert api.listen == Endpoint("tcp", host="0.0.0.0", port=8443)
    assert api.forward == Endpoint("tcp", host="127.0.0.1", port=8080)
    assert api.allow.rules == (
        parse_pattern("spiffe://example.org/ns/prod/sa/frontend"),
        parse_pattern("spiffe://example.org/ns/ops/*"),
    )
    assert (api.mode, api.proxy_protocol) == ("enforce", False)
    (orders,) = config.outbound
    assert orders.connect == Endpoint("tcp", host="orders.prod.svc", port=8443)
    assert orders.expect.rules == (parse_pattern("spiffe://example.org/ns/prod/sa/orders"),)
    assert orders.server_name == "orders.prod.svc"
    assert config.admin == AdminConfig(Endpoint("tcp", host="127.0.0.1", port=15000))
    assert config.timeouts == Timeouts(handshake=10.0, connect=5.0, idle=3600.0, drain=30.0)
    assert config.limits == Limits(10000)
    assert config.log == LogConfig("info", "json")
    assert config.source == SOURCE


def test_defaults_apply_when_optional_sections_are_absent():
    config = parse_config(IDENTITY, SOURCE)

    assert (config.inbound, config.outbound, config.admin) == ((), (), None)
    assert config.timeouts == Timeouts()
    assert config.limits == Limits()
    assert config.log == LogConfig()
    assert config.identity.crl is None and config.identity.renew is None


def test_accepts_a_config_without_listeners_as_default_deny():
    config = parse_config(IDENTITY + "inbound: []\noutbound: []\n", SOURCE)

    assert config.inbound == () and config.outbound == ()


def test_treats_an_optional_key_with_no_value_as_absent():
    config = parse_config(IDENTITY + "admin:\ninbound:\ntimeouts:\n", SOURCE)

    assert config.admin is None and config.inbound == () and config.timeouts == Timeouts()


def test_defaults_inbound_mode_to_enforce_and_proxy_protocol_to_false():
    text = IDENTITY + "inbound: [{name: a, listen: 0.0.0.0:1, forward: 127.0.0.1:2, allow: [spiffe://td/x]}]\n"

    (inbound,) = parse_config(text, SOURCE).inbound

    assert (inbound.mode, inbound.proxy_protocol) == ("enforce", False)


def test_defaults_renew_at_to_two_thirds_of_the_lifetime():
    text = "identity: {cert: c, key: k, bundle: b, renew: {url: 'https://ca:8443'}}\n"

    assert parse_config(text, SOURCE).identity.renew == RenewConfig("https://ca:8443", 0.66)


def test_resolves_relative_identity_paths_against_the_config_directory(tmp_path):
    config = parse_config(IDENTITY, tmp_path / "etc" / "config.yaml")

    assert config.identity.cert == tmp_path / "etc" / "cert.pem"
    assert config.identity.bundle == tmp_path / "etc" / "bundle.pem"


def test_keeps_absolute_identity_paths(tmp_path):
    config = parse_config("identity: {cert: /a/c.pem, key: /a/k.pem, bundle: /a/b.pem}", tmp_path / "x.yaml")

    assert config.identity.key == Path("/a/k.pem")


def test_accepts_port_zero_on_listeners_and_never_reports_it_as_a_conflict():
    text = IDENTITY + dedent("""
        inbound:
          - {name: a, listen: 127.0.0.1:0, forward: 127.0.0.1:80, allow: [spiffe://td/x]}
          - {name: b, listen: 127.0.0.1:0, forward: 127.0.0.1:80, allow: [spiffe://td/x]}
        admin: {listen: 127.0.0.1:0}
    """)

    config = parse_config(text, SOURCE)

    assert [i.listen.port for i in config.inbound] == [0, 0]


def test_parses_audit_mode_and_proxy_protocol():
    text = IDENTITY + dedent("""
        inbound:
          - {name: a, listen: 0.0.0.0:1, forward: 'unix:/run/app.sock', allow: [spiffe://td/x],
             mode: audit, proxy_protocol: true}
    """)

    (inbound,) = parse_config(text, SOURCE).inbound

    assert (inbound.mode, inbound.proxy_protocol) == ("audit", True)
    assert inbound.forward == Endpoint("unix", path="/run/app.sock")


def test_accepts_an_ipv6_loopback_outbound_listener():
    text = IDENTITY + "outbound: [{name: o, listen: '[::1]:9001', connect: '[2001:db8::1]:443', expect: [spiffe://td/x]}]\n"

    (outbound,) = parse_config(text, SOURCE).outbound

    assert outbound.listen == Endpoint("tcp", host="::1", port=9001)
    assert outbound.server_name is None


# --- Endpoint ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "endpoint, text",
    [
        (Endpoint("tcp", host="127.0.0.1", port=8080), "127.0.0.1:8080"),
        (Endpoint("tcp", host="::1", port=443), "[::1]:443"),
        (Endpoint("tcp", host="orders.prod.svc", port=8443), "orders.prod.svc:8443"),
        (Endpoint("unix", path="/run/app.sock"), "unix:/run/app.sock"),
    ],
)
def test_endpoint_prints_as_operators_write_it(endpoint, text):
    assert str(endpoint) == text
    assert parse_endpoint(text, unix=True, hostname=True) == endpoint


@pytest.mark.parametrize(
    "text, options, complaint",
    [
        ("8080", {}, "is not host:port"),
        ("::1:443", {}, "write an IPv6 address in brackets"),
        ("[::1]443", {}, "is not [IPv6-address]:port"),
        ("[127.0.0.1]:443", {}, "is not an IPv6 address"),
        (":8443", {}, "the host is missing"),
        ("127.0.0.1:65536", {}, "is not a number from 0 to 65535"),
        ("127.0.0.1:http", {}, "is not a number from 0 to 65535"),
        ("localhost:80", {}, "is not an IP address"),
        ("bad_host!:80", {"hostname": True}, "neither an IPv4 address nor a valid host name"),
        ("unix:/run/x.sock", {}, "a unix socket is not allowed here"),
        ("unix:run/x.sock", {"unix": True}, "must be absolute"),
    ],
)
def test_parse_endpoint_refuses_malformed_addresses(text, options, complaint):
    with pytest.raises(ValueError, match=re.escape(complaint)):
        parse_endpoint(text, **options)


# --- every rule names the file, the line and the key path -------------------------------------

LISTENER = "{name: %s, listen: %s, forward: 127.0.0.1:8080, allow: [spiffe://example.org/x]}"

# (name, YAML after the identity line, expected "line: key.path: message fragment")
CONFIG_ERRORS = [
    ("unknown top-level key", "inboud: []\n", "2: inboud: unknown key; did you mean 'inbound'?"),
    ("unknown key far from any known one", "zzz: 1\n", "2: zzz: unknown key; expected one of: identity, inbound"),
    ("unknown nested key", dedent("""
        inbound:
          - name: api
            listen: 0.0.0.0:8443
            forward: 127.0.0.1:8080
            allow: [spiffe://example.org/x]
            alow: [spiffe://example.org/y]
     """), "7: inbound[0].alow: unknown key; did you mean 'allow'?"),
    ("duplicate key", "log: {level: info}\nlog: {level: debug}\n", "3: log: duplicate key (first set on line 2)"),
    ("duplicate nested key", "timeouts:\n  idle: 1h\n  idle: 2h\n", "4: timeouts.idle: duplicate key (first set on line 3)"),
    ("missing required listener key", dedent("""
        inbound:
          - name: api
            listen: 0.0.0.0:8443
            allow: [spiffe://example.org/x]
     """), "3: inbound[0].forward: required key is missing"),
    ("required key without a value", dedent("""
        outbound:
          - name: o
            listen: 127.0.0.1:9001
            connect:
            expect: [spiffe://example.org/x]
     """), "5: outbound[0].connect: needs a value"),
    ("section of the wrong shape", "inbound: {name: api}\n", "2: inbound: expected a list, got a mapping"),
    ("listener of the wrong shape", "inbound: [api]\n", "2: inbound[0]: expected a mapping, got the string 'api'"),
    ("string where a boolean belongs", "inbound: [{name: a, listen: 0.0.0.0:1, forward: 127.0.0.1:2, "
     "allow: [spiffe://td/x], proxy_protocol: 'yes'}]\n",
     "2: inbound[0].proxy_protocol: expected true or false, got the string 'yes'"),
    ("boolean where a string belongs", "inbound: [{name: no, listen: 0.0.0.0:1, forward: 127.0.0.1:2, "
     "allow: [spiffe://td/x]}]\n", "2: inbound[0].name: expected a string, got the boolean no; quote it if you mean text"),
    ("date where a string belongs", "inbound: [{name: 2024-01-01, listen: 0.0.0.0:1, forward: 127.0.0.1:2, "
     "allow: [spiffe://td/x]}]\n", "2: inbound[0].name: expected a string, got the date 2024-01-01"),
    ("list where a string belongs", "admin: {listen: [127.0.0.1, 15000]}\n", "2: admin.listen: expected a string, got a list"),
    ("non-string key", "log:\n  1: x\n", "3: log: keys must be strings, got the number 1"),
    ("merge key", "base: &b {level: info}\nlog:\n  <<: *b\n", "4: log: YAML merge keys ('<<') are not supported"),
    ("invalid allow entry", "inbound:\n  - " + LISTENER.replace("example.org", "Example.org") % ("api", "0.0.0.0:1") + "\n",
     "3: inbound[0].allow[0]: 'spiffe://Example.org/x' is not a valid SPIFFE ID: trust domain must be lower-case"),
    ("allow entry that can never match", "inbound: [{name: a, listen: 0.0.0.0:1, forward: 127.0.0.1:2, "
     "allow: ['spiffe://example.org']}]\n", "2: inbound[0].allow[0]: 'spiffe://example.org' is not a valid SPIFFE ID: "
     "a trust-domain ID never matches a workload"),
    ("wildcard in the middle", "outbound: [{name: o, listen: 127.0.0.1:1, connect: h:2, "
     "expect: ['spiffe://td/*/x']}]\n", "2: outbound[0].expect[0]: 'spiffe://td/*/x' is not a valid SPIFFE ID: '*' is only"),
    ("empty allow list", "inbound: [{name: a, listen: 0.0.0.0:1, forward: 127.0.0.1:2, allow: []}]\n",
     "2: inbound[0].allow: must list at least one SPIFFE ID or pattern"),
    ("missing expect list", "outbound: [{name: o, listen: 127.0.0.1:1, connect: h:2}]\n",
     "2: outbound[0].expect: required key is missing"),
    ("allow given as a string", "inbound: [{name: a, listen: 0.0.0.0:1, forward: 127.0.0.1:2, "
     "allow: spiffe://td/x}]\n", "2: inbound[0].allow: expected a list, got the string 'spiffe://td/x'"),
    ("listener name that is not a metric label", "inbound: [" + LISTENER % ("Api", "0.0.0.0:1") + "]\n",
     "2: inbound[0].name: 'Api' is not a valid name"),
    ("listener name used twice", dedent("""
        inbound:
          - %s
        outbound:
          - {name: api, listen: 127.0.0.1:9001, connect: h:1, expect: [spiffe://td/x]}
     """ % (LISTENER % ("api", "0.0.0.0:1"))),
     "5: outbound[0].name: 'api' is already used by inbound[0] (line 3); listener names must be unique"),
    ("listen address used twice", dedent("""
        inbound:
          - %s
          - %s
     """ % (LISTENER % ("a", "127.0.0.1:8443"), LISTENER % ("b", "127.0.0.1:8443"))),
     "4: inbound[1].listen: 127.0.0.1:8443 overlaps inbound[0].listen (127.0.0.1:8443, line 3)"),
    ("wildcard listen overlapping a specific one", dedent("""
        inbound:
          - %s
        admin: {listen: 127.0.0.1:8443}
     """ % (LISTENER % ("a", "0.0.0.0:8443"))),
     "4: admin.listen: 127.0.0.1:8443 overlaps inbound[0].listen (0.0.0.0:8443, line 3)"),
    ("dual-stack wildcard overlapping IPv4", dedent("""
        inbound:
          - %s
          - %s
     """ % (LISTENER % ("a", "'[::]:8443'"), LISTENER % ("b", "10.0.0.1:8443"))),
     "4: inbound[1].listen: 10.0.0.1:8443 overlaps inbound[0].listen ([::]:8443, line 3)"),
    ("listen on a host name", "inbound: [" + LISTENER % ("a", "localhost:8443") + "]\n",
     "2: inbound[0].listen: 'localhost:8443': 'localhost' is not an IP address"),
    ("forward without a host", "inbound: [{name: a, listen: 0.0.0.0:1, forward: 8080, allow: [spiffe://td/x]}]\n",
     "2: inbound[0].forward: '8080' is not host:port or unix:PATH"),
    ("forward to a relative unix path", "inbound: [{name: a, listen: 0.0.0.0:1, forward: 'unix:app.sock', "
     "allow: [spiffe://td/x]}]\n", "2: inbound[0].forward: 'unix:app.sock': the unix socket path must be absolute"),
    ("outbound listening beyond loopback", "outbound: [{name: o, listen: 0.0.0.0:9001, connect: h:1, "
     "expect: [spiffe://td/x]}]\n", "2: outbound[0].listen: '0.0.0.0:9001' is not a loopback address: the app "
     "connects here in plaintext"),
    ("outbound connecting to a unix socket", "outbound: [{name: o, listen: 127.0.0.1:1, connect: 'unix:/x', "
     "expect: [spiffe://td/x]}]\n", "2: outbound[0].connect: 'unix:/x': a unix socket is not allowed here"),
    ("outbound connecting to port 0", "outbound: [{name: o, listen: 127.0.0.1:1, connect: 'h:0', "
     "expect: [spiffe://td/x]}]\n", "2: outbound[0].connect: 'h:0': port 0 cannot be connected to"),
    ("inbound forwarding to port 0", "inbound: [{name: a, listen: 0.0.0.0:1, forward: 127.0.0.1:0, "
     "allow: [spiffe://td/x]}]\n", "2: inbound[0].forward: '127.0.0.1:0': port 0 cannot be connected to"),
    ("SNI that is an IP address", "outbound: [{name: o, listen: 127.0.0.1:1, connect: h:2, "
     "expect: [spiffe://td/x], server_name: 10.0.0.1}]\n", "2: outbound[0].server_name: '10.0.0.1' is not a DNS name"),
    ("duration without a unit", "timeouts: {handshake: 10}\n", "2: timeouts.handshake: duration 10 needs a unit"),
    ("duration that is not one", "timeouts:\n  idle: forever\n", "3: timeouts.idle: 'forever' is not a duration"),
    ("zero duration", "timeouts: {drain: 0s}\n", "2: timeouts.drain: duration '0s' must be greater than zero"),
    ("zero max_connections", "limits: {max_connections: 0}\n", "2: limits.max_connections: 0 is not a positive"),
    ("fractional max_connections", "limits: {max_connections: 1.5}\n",
     "2: limits.max_connections: expected a whole number, got the number 1.5"),
    ("unknown log level", "log: {level: verbose}\n", "2: log.level: 'verbose' is not one of: debug, info, warning, error"),
    ("unknown log format", "log: {format: xml}\n", "2: log.format: 'xml' is not one of: json, text"),
    ("unknown mode", "inbound: [{name: a, listen: 0.0.0.0:1, forward: 127.0.0.1:2, allow: [spiffe://td/x], "
     "mode: permissive}]\n", "2: inbound[0].mode: 'permissive' is not one of: enforce, audit"),
]


@pytest.mark.parametrize("yaml_text, expected", [c[1:] for c in CONFIG_ERRORS], ids=[c[0] for c in CONFIG_ERRORS])
def test_rejects_broken_rule_with_line_number_and_key_path(yaml_text, expected):
    problems = problems_in(IDENTITY + yaml_text)

    assert any(p.startswith(f"config.yaml:{expected}") for p in problems), problems


@pytest.mark.parametrize(
    "text, expected",
    [
        ("inbound: []\n", "config.yaml:1: identity: required key is missing"),
        ("identity: {cert: c, key: k}\n", "config.yaml:1: identity.bundle: required key is missing"),
        ("identity: /run/identity\n", "config.yaml:1: identity: expected a mapping, got the string '/run/identity'"),
        ("identity: {cert: '', key: k, bundle: b}\n", "config.yaml:1: identity.cert: '' is not a file path"),
        ("identity:\n  cert: |\n    -----BEGIN CERTIFICATE-----\n    MIIB\n  key: k\n  bundle: b\n",
         "config.yaml:2: identity.cert: '-----BEGIN CERTIFICATE-----\\nMIIB\\n' is not a file path (did you paste"),
        ("identity: {cert: c, key: k, bundle: b, renew: {url: 'http://ca:8443'}}\n",
         "config.yaml:1: identity.renew.url: 'http://ca:8443' is not an https:// URL"),
        ("identity: {cert: c, key: k, bundle: b, renew: {url: 'https://ca', at: 1}}\n",
         "config.yaml:1: identity.renew.at: 1 is not between 0 and 1 (exclusive)"),
        ("identity: {cert: c, key: k, bundle: b, renew: {url: 'https://ca', at: soon}}\n",
         "config.yaml:1: identity.renew.at: expected a number, got the string 'soon'"),
        ("identity: {cert: c, key: k, bundle: b, renew: {at: 0.5}}\n",
         "config.yaml:1: identity.renew.url: required key is missing"),
    ],
)
def test_rejects_missing_or_malformed_identity_section(text, expected):
    assert any(p.startswith(expected) for p in problems_in(text)), problems_in(text)


def test_reports_the_example_from_the_issue_verbatim():
    text = dedent("""
        identity:
          cert: cert.pem
          key: key.pem
          bundle: bundle.pem
        inbound:
          - name: api
            listen: 0.0.0.0:8443
            forward: 127.0.0.1:8080
            allow: [spiffe://example.org/ns/prod/sa/frontend]
          - name: admin-api
            listen: 0.0.0.0:9443
            forward: 127.0.0.1:9080
            allow:
              - spiffe://Example.org/x
    """)

    assert problems_in(text) == [
        "config.yaml:14: inbound[1].allow[0]: 'spiffe://Example.org/x' is not a valid SPIFFE ID: "
        "trust domain must be lower-case"
    ]


def test_reports_every_problem_at_once_sorted_by_line():
    text = dedent("""
        identity: {cert: c, key: k, bundle: b}
        log: {level: loud}
        inbound:
          - {name: A, listen: 0.0.0.0:1, forward: 2, allow: []}
        limits: {max_connections: -1}
    """)

    problems = problems_in(text)

    assert [p.split(": ")[0:2] for p in problems] == [
        ["config.yaml:2", "log.level"],
        ["config.yaml:4", "inbound[0].name"],
        ["config.yaml:4", "inbound[0].forward"],
        ["config.yaml:4", "inbound[0].allow"],
        ["config.yaml:5", "limits.max_connections"],
    ]


def test_config_error_reads_as_one_problem_per_line():
    error = ConfigError(["a.yaml:1: x: bad", "a.yaml:2: y: worse"])

    assert str(error) == "a.yaml:1: x: bad\na.yaml:2: y: worse"


def test_config_error_keeps_the_identity_section_when_only_it_is_valid():
    text = IDENTITY + "log: {level: loud}\n"

    with pytest.raises(ConfigError) as caught:
        parse_config(text, SOURCE)

    assert caught.value.identity is not None
    assert caught.value.identity.key.name == "key.pem"


def test_config_error_has_no_identity_when_that_section_is_broken():
    with pytest.raises(ConfigError) as caught:
        parse_config("identity: {cert: c, key: k, bundle: b, crl: [x]}\n", SOURCE)

    assert caught.value.identity is None


# --- files that are not a config at all -------------------------------------------------------


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", "---\n", "~\n"])
def test_rejects_an_empty_file_clearly(text):
    assert problems_in(text) == [
        "config.yaml:1: the file has no settings; it needs at least an 'identity' section"
    ]


@pytest.mark.parametrize("text, kind", [("- a\n- b\n", "a list"), ("just words\n", "the string 'just words'")])
def test_rejects_a_top_level_that_is_not_a_mapping(text, kind):
    (problem,) = problems_in(text)

    assert problem.startswith("config.yaml:1: the top level must be a mapping of sections")
    assert problem.endswith(f"got {kind}")


def test_reports_a_yaml_syntax_error_on_one_line_with_its_line_number():
    text = IDENTITY + "inbound:\n  - name: api\n    listen: [0.0.0.0:8443\n"

    (problem,) = problems_in(text)

    assert problem.startswith("config.yaml:5: YAML syntax error: ")
    assert "\n" not in problem


def test_rejects_several_yaml_documents_in_one_file():
    (problem,) = problems_in(IDENTITY + "---\n" + IDENTITY)

    assert problem == ("config.yaml:2: YAML syntax error: expected a single document in the stream, "
                       "but found another document")


def test_rejects_absurdly_deep_nesting_without_crashing():
    (problem,) = problems_in("x: " + "[" * 5000 + "]" * 5000)

    assert "YAML" in problem


@pytest.mark.parametrize("style", ["flow", "block"])
def test_refuses_collections_nested_past_the_limit_on_the_line_where_it_happens(style):
    levels = MAX_NESTING  # inside the top-level mapping: one level too many
    if style == "flow":
        text = IDENTITY + "x:\n  " + "[" * levels + "]" * levels + "\n"
        line = 3
    else:
        text = IDENTITY + "x:\n" + "".join("  " * depth + "-\n" for depth in range(1, levels + 1))
        line = 2 + levels

    assert problems_in(text) == [
        f"config.yaml:{line}: YAML syntax error: collections nested more than {MAX_NESTING} levels deep; "
        "a config needs a handful"
    ]


def test_nesting_up_to_the_limit_is_left_to_the_schema():
    levels = MAX_NESTING - 1

    (problem,) = problems_in(IDENTITY + "x: " + "[" * levels + "]" * levels + "\n")

    assert problem.startswith("config.yaml:2: x: unknown key")


def test_load_config_reports_a_missing_file(tmp_path):
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path / "nope.yaml")

    assert caught.value.problems == [f"{tmp_path / 'nope.yaml'}: cannot read the config file: No such file or directory"]


def test_load_config_reports_bytes_that_are_not_utf8(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_bytes(IDENTITY.encode() + b"log: {level: \xff}\n")

    with pytest.raises(ConfigError, match=r"config.yaml:2: the config file is not UTF-8 text"):
        load_config(path)


def test_messages_name_the_file_as_it_was_given(tmp_path, monkeypatch):
    (tmp_path / "config.yaml").write_text(IDENTITY + "bogus: 1\n")
    monkeypatch.chdir(tmp_path)

    with pytest.raises(ConfigError) as caught:
        load_config("config.yaml")

    assert caught.value.problems[0].startswith("config.yaml:2: bogus: unknown key")


def test_load_config_reads_a_valid_file(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(DESIGN_EXAMPLE)

    config = load_config(path)

    assert config.source == path and config.inbound[0].name == "api"


# --- robustness -------------------------------------------------------------------------------

KNOWN_KEYS = [
    "identity", "cert", "key", "bundle", "crl", "renew", "url", "at", "inbound", "outbound", "name",
    "listen", "forward", "connect", "allow", "expect", "mode", "proxy_protocol", "server_name", "admin",
    "timeouts", "handshake", "idle", "drain", "limits", "max_connections", "log", "level", "format",
]
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True),
    st.text(max_size=30),
    st.sampled_from([
        "0.0.0.0:8443", "127.0.0.1:0", "[::1]:1", "unix:/s", "h:1", "10s", "1h", "0.5",
        "spiffe://example.org/x", "spiffe://td/*", "https://ca", "enforce", "audit", "json", "debug",
    ]),
)
DOCUMENTS = st.recursive(
    SCALARS,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.one_of(st.sampled_from(KNOWN_KEYS), st.text(max_size=8)), children, max_size=6),
    ),
    max_leaves=30,
)


def _parse_only_raises_config_error(text: str) -> None:
    try:
        parse_config(text, SOURCE)
    except ConfigError as exc:
        assert exc.problems and all(isinstance(p, str) and p for p in exc.problems)


@settings(max_examples=400, deadline=None)
@given(DOCUMENTS)
def test_random_yaml_documents_only_ever_raise_config_error(document):
    _parse_only_raises_config_error(yaml.safe_dump(document))


@pytest.mark.skipif(not yaml.__with_libyaml__, reason="PyYAML without libyaml composes in Python only")
@settings(max_examples=300, deadline=None)
@given(DOCUMENTS, st.sampled_from([False, True]))
def test_libyaml_composes_the_same_nodes_with_the_same_lines_as_pure_python(document, flow):
    text = yaml.safe_dump(document, default_flow_style=flow)

    assert node_tree(yaml.compose(text, Loader=yaml.CSafeLoader)) == node_tree(yaml.compose(text, Loader=yaml.SafeLoader))


def node_tree(node):
    """What the config reader looks at in a node: kind, tag, value and line, recursively."""
    if node is None:
        return None
    if isinstance(node.value, str):
        inner = node.value
    elif isinstance(node, yaml.MappingNode):
        inner = [(node_tree(key), node_tree(value)) for key, value in node.value]
    else:
        inner = [node_tree(item) for item in node.value]
    return type(node).__name__, node.tag, inner, node.start_mark.line


@st.composite
def mutated_design_examples(draw) -> str:
    """The design example with a few characters replaced, inserted or deleted."""
    text = list(DESIGN_EXAMPLE)
    for _ in range(draw(st.integers(1, 4))):
        position = draw(st.integers(0, len(text) - 1))
        action = draw(st.sampled_from(["replace", "insert", "delete"]))
        if action == "delete":
            del text[position]
            continue
        piece = draw(st.sampled_from(list("[]{}:-&*!|>'\"%@#,? \n\taZ09./~") + [
            "!!int ", "!!float ", "!!bool ", "!!binary ", "!foo ", "&a ", "*a ", "<<: ", "!!seq ", "\\ud800"]))
        text[position : position + (action == "replace")] = [piece]
    return "".join(text)


@settings(max_examples=400, deadline=None)
@given(mutated_design_examples())
def test_mutated_design_examples_only_ever_raise_config_error(text):
    _parse_only_raises_config_error(text)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=string.printable + "[]{}:-&*!|>'\"%@`#,?\u00e9\ud800\x00", max_size=200))
def test_random_text_only_ever_raises_config_error(text):
    _parse_only_raises_config_error(text)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=200))
def test_random_bytes_in_a_file_only_ever_raise_config_error(tmp_path, data):
    path = tmp_path / "config.yaml"
    path.write_bytes(data)
    try:
        load_config(path)
    except ConfigError as exc:
        assert exc.problems
