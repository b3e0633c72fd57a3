"""DecisionLog: the decision lines and the metrics that count them."""

from __future__ import annotations

import io
import json

import pytest

from mtls import reasons
from mtls.events import EventLog
from mtls.reasons import Decision
from mtls.spiffe import parse_spiffe_id
from proxy.decisions import RESET, Conn, DecisionLog
from proxy.metrics import Metrics
from proxy.relay import Link

API = parse_spiffe_id("spiffe://example.org/ns/prod/sa/api")
OUTBOUND = Conn("api", "outbound", peer_addr="10.0.0.7:8443", app_addr="127.0.0.1:51000")


@pytest.fixture
def decisions():
    return DecisionLog(EventLog("info", "json", io.StringIO()), Metrics())


def lines(decisions: DecisionLog) -> list[dict]:
    return [json.loads(line) for line in decisions.log.stream.getvalue().splitlines()]


def sample(decisions: DecisionLog, name: str, **labels) -> float | None:
    return decisions.metrics.registry.get_sample_value(name, labels)


def test_every_line_names_the_remote_end_in_peer_addr_and_the_app_in_app_addr(decisions):
    decisions.allowed(OUTBOUND, API, Decision(True, None, "upstream api expects it"), resumed=False)
    (line,) = lines(decisions)
    assert (line["event"], line["peer_addr"], line["app_addr"]) == ("conn_allowed", "10.0.0.7:8443", "127.0.0.1:51000")
    assert list(line)[3:9] == ["listener", "direction", "peer_id", "peer_addr", "app_addr", "reason"]


def test_inbound_lines_name_the_tls_client_and_leave_app_addr_out(decisions):
    decisions.denied(Conn("api", "inbound", peer_addr="10.0.3.7:48468"), reasons.NO_CLIENT_CERT, "no certificate")
    (line,) = lines(decisions)
    assert line["peer_addr"] == "10.0.3.7:48468" and "app_addr" not in line


def test_a_failure_is_counted_as_error_and_a_refusal_as_denied(decisions):
    decisions.denied(OUTBOUND, reasons.UPSTREAM_UNREACHABLE, "upstream down", duration=0.5)
    decisions.denied(OUTBOUND, reasons.SERVER_IDENTITY_MISMATCH, "not the one", peer_id=API)
    assert sample(decisions, "sidecar_connections_total", listener="api", direction="outbound", result="error") == 1
    assert sample(decisions, "sidecar_connections_total", listener="api", direction="outbound", result="denied") == 1
    first, second = lines(decisions)
    assert (first["event"], first["peer_id"], first["duration_s"], first["bytes_in"]) == ("conn_denied", None, 0.5, 0)
    assert second["peer_id"] == str(API)


def test_audit_mode_logs_would_deny_before_the_allowed_line(decisions):
    refused = Decision(False, reasons.IDENTITY_NOT_ALLOWED, "port api allows nobody")
    decisions.allowed(OUTBOUND, API, refused, resumed=True)
    would, allowed = lines(decisions)
    assert would["event"] == "would_deny" and would["detail"] == "audit mode lets this through: port api allows nobody"
    assert allowed["detail"] == "port api allows nobody (resumed TLS session)"
    labels = {"listener": "api", "direction": "outbound", "reason": reasons.IDENTITY_NOT_ALLOWED}
    assert sample(decisions, "sidecar_audit_would_deny_total", **labels) == 1


async def test_a_reset_closes_with_reason_null_and_counts_no_denial(decisions):  # Link reads the trio clock
    link = Link()
    link.bytes_in, link.bytes_out = 5, 7
    decisions.closed(OUTBOUND, API, link, 1.25, RESET, "tls side: connection closed by peer")
    (line,) = lines(decisions)
    assert (line["level"], line["reason"], line["bytes_in"], line["bytes_out"]) == ("info", None, 5, 7)
    assert sample(decisions, "sidecar_bytes_total", listener="api", direction="outbound", flow="out") == 7
    assert sample(decisions, "sidecar_denials_total", listener="api", direction="outbound", reason=RESET) is None


@pytest.mark.parametrize("reason", [reasons.REVOKED, reasons.UNTRUSTED_CA, reasons.EXPIRED, reasons.CRL_STALE])
def test_a_refused_certificate_logs_what_it_claims_marked_unverified(decisions, authority, reason):
    leaf = authority.issue("spiffe://example.org/ns/prod/sa/stolen").cert
    decisions.denied(Conn("api", "inbound", peer_addr="10.0.3.7:48468"), reason, "refused", leaf=leaf)
    (line,) = lines(decisions)
    assert line["peer_id"] is None
    assert line["claimed_id"] == "spiffe://example.org/ns/prod/sa/stolen"
    assert line["claimed_serial"] == f"{leaf.serial_number:x}"
    assert line["claimed_issuer"] == authority.intermediate.subject.rfc4514_string()


def test_a_policy_refusal_of_a_verified_peer_logs_no_claim(decisions, authority):
    leaf = authority.issue("spiffe://example.org/ns/prod/sa/api").cert
    decisions.denied(OUTBOUND, reasons.SERVER_IDENTITY_MISMATCH, "not the one", peer_id=API, leaf=leaf)
    (line,) = lines(decisions)
    assert "claimed_id" not in line and line["peer_id"] == str(API)
