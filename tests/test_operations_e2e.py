"""What an operator sees of a real `proxy run`: /metrics counts, /readyz, `proxy health`, audit mode, PROXY v2."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import urllib.request

import pytest
from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families
from support.certs import FRONTEND, TD
from support.network import App, read_header, tls_client
from support.polling import wait_until
from support.processes import Sidecar, denial, identity_yaml

pytestmark = pytest.mark.e2e

INTRUDER = f"spiffe://{TD}/ns/prod/sa/intruder"


def scrape(port: int) -> dict[tuple, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples, name, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def api_sidecar(tmp_path, ids, app_port, *, extra_listener="", name="api"):
    config = identity_yaml(ids["api"]) + (
        f"inbound:\n  - name: api\n    listen: 127.0.0.1:0\n    forward: 127.0.0.1:{app_port}\n"
        f"    allow: [{FRONTEND}]\n{extra_listener}"
        "admin:\n  listen: 127.0.0.1:0\n"
    )
    return Sidecar(tmp_path, name, config).wait_ready()


def test_metrics_count_a_known_mix_of_allowed_and_denied_connections_exactly(ids, tmp_path):
    app = App()
    side = api_sidecar(tmp_path, ids, app.port)
    try:
        port = side.ports["api"]
        for _ in range(3):
            assert tls_client(ids["frontend"], port, b"12345")[1] == "data b'12345'"
        for _ in range(2):
            denial(side, tls_client(ids["intruder"], port)[0])
        denial(side, tls_client(None, port)[0])
        wait_until(lambda: side.count(lambda e: e["event"] == "conn_closed") == 3, what="three closes")
        samples = scrape(side.ports["admin"])
        labels = {"listener": "api", "direction": "inbound"}
        assert value(samples, "sidecar_connections_total", result="allowed", **labels) == 3
        assert value(samples, "sidecar_connections_total", result="denied", **labels) == 3
        assert value(samples, "sidecar_denials_total", reason="identity_not_allowed", **labels) == 2
        assert value(samples, "sidecar_denials_total", reason="no_client_cert", **labels) == 1
        assert value(samples, "sidecar_bytes_total", flow="in", **labels) == 15
        assert value(samples, "sidecar_bytes_total", flow="out", **labels) == 15
        assert value(samples, "sidecar_active_connections", **labels) == 0
        assert value(samples, "sidecar_handshake_seconds_count") == 3
        leaf = x509.load_pem_x509_certificate((ids["api"] / "cert.pem").read_bytes())
        assert value(samples, "sidecar_identity_expiry_timestamp_seconds") == leaf.not_valid_after_utc.timestamp()
    finally:
        side.stop()
        app.close()


def test_readyz_and_proxy_health_report_ready(ids, tmp_path):
    app = App()
    side = api_sidecar(tmp_path, ids, app.port)
    try:
        admin = f"127.0.0.1:{side.ports['admin']}"
        with urllib.request.urlopen(f"http://{admin}/readyz", timeout=5) as response:
            assert response.status == 200
        proc = subprocess.run([sys.executable, "-m", "proxy", "health", "--admin", admin],
                              capture_output=True, text=True, timeout=30)
        assert proc.returncode == 0, proc.stderr
    finally:
        side.stop()
        app.close()


def test_audit_mode_lets_a_would_be_denial_through_and_logs_and_counts_it(ids, tmp_path):
    app = App()
    audit = (f"  - name: audited\n    listen: 127.0.0.1:0\n    forward: 127.0.0.1:{app.port}\n"
             f"    allow: [{FRONTEND}]\n    mode: audit\n")
    side = api_sidecar(tmp_path, ids, app.port, extra_listener=audit)
    try:
        assert tls_client(ids["intruder"], side.ports["audited"], b"audit me")[1] == "data b'audit me'"
        event = side.wait_event(lambda e: e["event"] == "would_deny")
        assert event["reason"] == "identity_not_allowed" and event["peer_id"] == INTRUDER
        assert "audit mode lets this through" in event["detail"]
        samples = scrape(side.ports["admin"])
        assert value(samples, "sidecar_audit_would_deny_total", listener="audited", direction="inbound",
                     reason="identity_not_allowed") == 1
        # the enforcing port next to it still refuses the same peer
        denial(side, tls_client(ids["intruder"], side.ports["api"])[0])
    finally:
        side.stop()
        app.close()


class ProxyProtocolApp:
    """An app that reads a PROXY v2 header with a parser we did not write, then echoes."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.headers = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        conn, _ = self.sock.accept()
        with conn:
            self.headers.append(read_header(conn))
            try:
                while data := conn.recv(65536):
                    conn.sendall(data)
            except OSError:
                pass  # the test client may close without close_notify: the sidecar then resets us

    def close(self):
        self.sock.close()


def test_proxy_protocol_tells_the_app_the_peer_address_and_spiffe_id(ids, tmp_path):
    from proxy.proxy_protocol import PP2_TYPE_SPIFFE_ID

    app = ProxyProtocolApp()
    config = identity_yaml(ids["api"]) + (
        f"inbound:\n  - name: api\n    listen: 127.0.0.1:0\n    forward: 127.0.0.1:{app.port}\n"
        f"    allow: [{FRONTEND}]\n    proxy_protocol: true\n"
    )
    side = Sidecar(tmp_path, "pp", config).wait_ready()
    try:
        local_port, outcome = tls_client(ids["frontend"], side.ports["api"], b"payload")
        assert outcome == "data b'payload'"
        header = app.headers[0]
        assert header.source[1] == local_port
        assert header.dest[1] == side.ports["api"]
        assert header.tlv[PP2_TYPE_SPIFFE_ID] == FRONTEND.encode()
    finally:
        side.stop()
        app.close()
