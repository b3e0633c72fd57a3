"""Egress decisions without sockets: rule syntax, the decision order, ClientHello parsing, the config section."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
from support.certs import NOW, WEB
from support.network import client_hello

from mtls.spiffe import PatternSet, parse_pattern
from proxy.check import run_check
from proxy.clienthello import Hello, NeedMore, NotClientHello, parse_client_hello
from proxy.config import ConfigError, parse_config
from proxy.egress_rules import (
    NO_CLIENT_HELLO,
    NO_RULE,
    SNI_NOT_ALLOWED,
    Attempt,
    EgressRule,
    decide,
    needed_rule,
    parse_destination,
    parse_server_name,
)

IP = ipaddress.ip_address
ORDERS = "spiffe://example.org/ns/prod/sa/orders"


def rule(index: int, to: str, *, expect: tuple[str, ...] = (), sni: tuple[str, ...] = ()) -> EgressRule:
    patterns = PatternSet(parse_pattern(p) for p in expect) if expect else None
    return EgressRule(index, parse_destination(to), patterns, tuple(parse_server_name(n) for n in sni))


RULES = (
    rule(0, "orders.prod.svc:8443", expect=(ORDERS,)),
    rule(1, "203.0.113.10:443", sni=("api.payments.example", "*.cdn.example")),
    rule(2, "10.20.0.0/16:5432"),
    rule(3, "[2001:db8::/32]:8000-8099"),
    rule(4, "198.51.100.7:443"),
)
RESOLVED = {"orders.prod.svc": frozenset({IP("10.0.0.5")})}


def attempt(ip: str, port: int, **kw) -> Attempt:
    return Attempt(IP(ip), port, **kw)


# --- destinations -------------------------------------------------------------------------------


@pytest.mark.parametrize("text, shown", [
    ("orders.prod.svc:8443", "orders.prod.svc:8443"),
    ("ORDERS.prod.svc.:8443", "orders.prod.svc:8443"),
    ("10.20.0.0/16:5432", "10.20.0.0/16:5432"),
    ("10.20.0.7:1-1024", "10.20.0.7:1-1024"),
    ("[2001:db8::/32]:443", "[2001:db8::/32]:443"),
    ("[2001:db8::1]:443", "[2001:db8::1]:443"),
])
def test_destinations_parse_and_print_as_written(text, shown):
    assert str(parse_destination(text)) == shown


@pytest.mark.parametrize("text, words", [
    ("orders.prod.svc", "port"),
    ("10.20.0.1/16:5432", "host bits"),
    ("2001:db8::1:443", "brackets"),
    ("[10.0.0.0/8]:443", "IPv6 only"),
    ("a.example:0", "1 to 65535"),
    ("a.example:9-3", "not above the last"),
    ("a.example:http", "not a port"),
    ("bad_name!:443", "neither"),
])
def test_bad_destinations_say_what_is_wrong(text, words):
    with pytest.raises(ValueError, match=words):
        parse_destination(text)


def test_server_names_refuse_ip_addresses_and_inner_wildcards():
    assert parse_server_name("*.CDN.example") == "*.cdn.example"
    for bad in ("1.2.3.4", "a.*.example", "*"):
        with pytest.raises(ValueError):
            parse_server_name(bad)


# --- decisions ---------------------------------------------------------------------------------


def test_dns_rule_matches_the_addresses_its_name_resolved_to():
    verdict = decide(RULES, attempt("10.0.0.5", 8443, names=("orders.prod.svc",)), RESOLVED)
    assert verdict.rule is RULES[0] and verdict.rule.kind == "mtls"


def test_dns_rule_does_not_match_before_its_name_resolved():
    assert decide(RULES, attempt("10.0.0.5", 8443), {}).cause == NO_RULE


def test_cidr_rule_matches_inside_and_only_on_its_port():
    assert decide(RULES, attempt("10.20.3.4", 5432), RESOLVED).rule is RULES[2]
    assert decide(RULES, attempt("10.20.3.4", 5433), RESOLVED).cause == NO_RULE
    assert decide(RULES, attempt("10.21.0.1", 5432), RESOLVED).cause == NO_RULE


def test_port_range_rule_matches_ipv6_inside_the_range():
    assert decide(RULES, attempt("2001:db8::9", 8050), RESOLVED).rule is RULES[3]
    assert decide(RULES, attempt("2001:db8::9", 8100), RESOLVED).cause == NO_RULE


def test_unlisted_destination_is_refused_without_waiting_for_a_client_hello():
    verdict = decide(RULES, attempt("203.0.113.66", 3333), RESOLVED)
    assert not verdict.allowed and not verdict.needs_hello and verdict.cause == NO_RULE
    assert "203.0.113.66:3333" in verdict.detail


def test_sni_rule_asks_for_the_client_hello_first():
    assert decide(RULES, attempt("203.0.113.10", 443), RESOLVED).needs_hello


def test_sni_rule_admits_a_listed_name_and_a_wildcard_subdomain():
    for sni in ("api.payments.example", "img.cdn.example"):
        verdict = decide(RULES, attempt("203.0.113.10", 443, hello=True, sni=sni), RESOLVED)
        assert verdict.rule is RULES[1], sni


def test_wildcard_sni_does_not_admit_the_bare_domain_or_deeper_names():
    for sni in ("cdn.example", "a.b.cdn.example"):
        verdict = decide(RULES, attempt("203.0.113.10", 443, hello=True, sni=sni), RESOLVED)
        assert verdict.cause == SNI_NOT_ALLOWED, sni


def test_sni_refusal_names_the_destination_the_sni_and_the_allowed_names():
    verdict = decide(RULES, attempt("203.0.113.10", 443, hello=True, sni="evil.example"), RESOLVED)
    assert verdict.cause == SNI_NOT_ALLOWED
    assert "203.0.113.10:443 SNI evil.example" in verdict.detail
    assert "api.payments.example" in verdict.detail and "egress.allow[1]" in verdict.detail


def test_missing_client_hello_is_refused_with_the_reason():
    verdict = decide(RULES, attempt("203.0.113.10", 443, hello=True, hello_problem="no complete TLS ClientHello"),
                     RESOLVED)
    assert verdict.cause == NO_CLIENT_HELLO and "no complete TLS ClientHello" in verdict.detail


def test_a_later_plain_rule_admits_what_an_earlier_sni_rule_skipped():
    rules = (rule(0, "198.51.100.7:443", sni=("a.example",)), rule(1, "198.51.100.0/24:443"))
    verdict = decide(rules, attempt("198.51.100.7", 443, hello=True, sni="b.example"), {})
    assert verdict.rule is rules[1]


def test_needed_rule_prefers_our_dns_name_and_carries_the_sni():
    assert needed_rule(attempt("203.0.113.66", 3333)) == "{to: 203.0.113.66:3333}"
    assert needed_rule(attempt("10.0.0.5", 443, names=("x.example",), sni="x.example")) == \
        "{to: x.example:443, sni: [x.example]}"


# --- ClientHello -------------------------------------------------------------------------------


def test_client_hello_gives_its_sni_when_complete():
    assert parse_client_hello(client_hello("api.payments.example")) == Hello("api.payments.example")


def test_partial_client_hello_asks_for_exactly_the_rest():
    hello = client_hello("x.example")
    assert parse_client_hello(hello[:3]) == NeedMore(5)
    assert parse_client_hello(hello[:10]) == NeedMore(len(hello))


def test_client_hello_split_over_two_records_is_reassembled():
    hello = client_hello("split.example")
    body = hello[5:]
    half = len(body) // 2
    records = b"".join(b"\x16\x03\x01" + len(part).to_bytes(2, "big") + part for part in (body[:half], body[half:]))
    assert parse_client_hello(records[:-1]) == NeedMore(len(records))
    assert parse_client_hello(records) == Hello("split.example")


def test_plain_text_is_not_a_client_hello():
    with pytest.raises(NotClientHello, match="GET / HTTP"):
        parse_client_hello(b"GET / HTTP/1.1\r\n\r\n")


# --- the config section ------------------------------------------------------------------------


IDENTITY = "identity: {cert: c.pem, key: k.pem, bundle: b.pem}\n"


def test_egress_section_reads_into_rules():
    config = parse_config(IDENTITY + (
        "egress:\n  listen: 127.0.0.1:15001\n  mode: audit\n  allow:\n"
        f"    - {{to: orders.prod.svc:8443, expect: [{ORDERS}]}}\n"
        "    - {to: api.payments.example:443, sni: [api.payments.example]}\n"
        "    - {to: 10.20.0.0/16:5432}\n"
    ), Path("/etc/sidecar.yaml"))
    assert config.egress.mode == "audit" and config.egress.listen.port == 15001
    assert [r.kind for r in config.egress.allow] == ["mtls", "sni", "plain"]


def test_config_without_egress_has_none():
    assert parse_config(IDENTITY, Path("/etc/sidecar.yaml")).egress is None


def test_egress_problems_are_each_reported_with_their_line():
    with pytest.raises(ConfigError) as caught:
        parse_config(IDENTITY + (
            "admin: {listen: 127.0.0.1:15001}\n"
            "egress:\n  listen: 0.0.0.0:15001\n  mode: deny\n  allow:\n"
            "    - {to: orders.prod.svc}\n"
            "    - {to: x.example:443, sni: [x.example], expect: [spiffe://example.org/x]}\n"
            "inbound:\n  - {name: egress, listen: 127.0.0.1:8443, forward: 127.0.0.1:8080, allow: [spiffe://a/b]}\n"
        ), Path("/etc/sidecar.yaml"))
    text = str(caught.value)
    assert ":4: egress.listen: '0.0.0.0:15001' is not a loopback address" in text
    assert "egress.listen: 0.0.0.0:15001 overlaps admin.listen" in text
    assert ":5: egress.mode: 'deny' is not one of" in text
    assert ":7: egress.allow[0].to:" in text
    assert ":8: egress.allow[1]: a rule takes 'expect'" in text
    assert "inbound[0].name: 'egress' is the egress listener's name" in text


def test_proxy_check_lists_the_egress_listener_and_its_rules(tmp_path, authority):
    authority.write_identity(tmp_path, authority.issue(WEB))
    config = tmp_path / "config.yaml"
    config.write_text(IDENTITY.replace("c.pem", "cert.pem").replace("k.pem", "key.pem").replace("b.pem", "bundle.pem")
                      + "egress:\n  listen: 127.0.0.1:15001\n  allow:\n    - {to: 10.20.0.0/16:5432}\n")
    ok, lines = run_check(config, now=NOW)
    assert ok, lines
    assert "egress: 127.0.0.1:15001, 1 rule; any other destination is reset" in lines
    assert "  egress.allow[0] (to 10.20.0.0/16:5432)" in lines
