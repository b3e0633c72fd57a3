"""`proxy suggest`: decision logs in, allow rules out (no sockets; the round trip is in test_egress_netns)."""

from __future__ import annotations

import json

import yaml

from proxy.cli import main
from proxy.suggest import suggest

WEB = "spiffe://example.org/ns/prod/sa/web"
ORDERS = "spiffe://example.org/ns/prod/sa/orders"


def line(event: str, direction: str, **fields) -> str:
    return json.dumps({"ts": "2025-01-01T00:00:00.000Z", "level": "info", "event": event,
                       "listener": direction if direction == "egress" else "api", "direction": direction, **fields})


LOG = [
    # audit mode: a would_deny then the connection's conn_allowed, for each connection
    line("would_deny", "egress", peer_addr="203.0.113.9:3333", reason="egress_denied"),
    line("conn_allowed", "egress", peer_addr="203.0.113.9:3333", app_addr="10.0.0.2:40000"),
    line("conn_allowed", "egress", peer_addr="203.0.113.10:443", sni="a.example", app_addr="10.0.0.2:40001"),
    line("conn_allowed", "egress", peer_addr="203.0.113.10:443", sni="b.example", app_addr="10.0.0.2:40002"),
    line("conn_allowed", "egress", peer_addr="203.0.113.10:443", sni="a.example", app_addr="10.0.0.2:40003"),
    line("conn_allowed", "egress", peer_addr="10.0.0.5:8443", dst_name="orders.prod.svc", peer_id=ORDERS,
         app_addr="10.0.0.2:40004"),
    line("conn_closed", "egress", peer_addr="10.0.0.5:8443", peer_id=ORDERS),
    # enforce mode refused this one: suggested commented out
    line("conn_denied", "egress", peer_addr="198.51.100.1:4444", reason="egress_denied"),
    # a failure that says nothing about policy
    line("conn_denied", "egress", peer_addr="198.51.100.2:80", reason="upstream_unreachable"),
    line("conn_allowed", "inbound", peer_id=WEB, peer_addr="10.0.0.3:5555"),
    line("conn_allowed", "inbound", peer_id=WEB, peer_addr="10.0.0.3:5556"),
    line("conn_denied", "inbound", peer_addr="10.0.0.9:5557", reason="untrusted_ca"),
    "not json at all",
]


def test_suggestion_is_yaml_with_one_rule_per_destination_and_kind():
    parsed = yaml.safe_load(suggest(LOG, "sidecar.log"))
    assert parsed["egress"]["allow"] == [
        {"to": "203.0.113.10:443", "sni": ["a.example", "b.example"]},
        {"to": "203.0.113.9:3333"},
        {"to": "orders.prod.svc:8443", "expect": [ORDERS]},
    ]
    assert parsed["inbound"] == [{"name": "api", "allow": [WEB]}]


def test_suggestion_comments_counts_and_lists_refused_destinations_commented_out():
    text = suggest(LOG, "sidecar.log")
    assert "- to: 203.0.113.10:443  # 3 connections" in text
    assert "sni: [a.example, b.example]  # a.example 2, b.example 1" in text
    assert "# - to: 198.51.100.1:4444  # refused 1 connection" in text
    assert "198.51.100.2" not in text
    assert f"- {WEB}  # 2 connections" in text
    assert text.startswith("# Suggested by `proxy suggest` from sidecar.log: 8 connections")


def test_empty_log_suggests_nothing(tmp_path, capsys):
    log = tmp_path / "empty.log"
    log.write_text("")
    assert main(["suggest", "--log", str(log)]) == 0
    assert "nothing to suggest" in capsys.readouterr().out


def test_unreadable_log_is_a_usage_error(tmp_path, capsys):
    assert main(["suggest", "--log", str(tmp_path / "missing.log")]) == 2
    assert "cannot read" in capsys.readouterr().err
