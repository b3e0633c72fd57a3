"""`ca serve` under a flood of idle TCP connections: renewals and enrollments keep being served.

2,000 connections that never send a byte are held against a real `ca serve` while a good client renews
and enrolls over fresh connections; the figures (success rate, p50/p99, the service's RSS before and
during) are printed, run with ``-s`` to see them.
"""

from __future__ import annotations

import http.client
import json
import ssl
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from support.ca_cli import issue, run_ca
from support.certs import TD, WEB
from support.flood import IdleFlood, Timings
from support.polling import DEADLINE, wait_until
from support.processes import CaService, vm_rss_kib

from ca.serve import MAX_OPEN_SOCKETS, MAX_PENDING_PER_SOURCE

pytestmark = pytest.mark.e2e

FLOOD = 2000
RENEWALS = 25
ENROLLMENTS = 5
LATENCY_BOUND = 5.0  # seconds: generous, a renewal takes milliseconds when served


def _csr() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    request = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(key, hashes.SHA256())
    return request.public_bytes(serialization.Encoding.PEM)


def _post(port: int, bundle: Path, path: str, body: bytes, ident: Path | None) -> int:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.load_verify_locations(bundle)
    if ident is not None:
        ctx.load_cert_chain(ident / "cert.pem", ident / "key.pem")
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=DEADLINE)
    try:
        conn.request("POST", path, body, {"content-type": "application/pkcs10"})
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def _gave_way(event: dict) -> bool:
    return event["event"] == "handshake_failed" and event["detail"].startswith("gave its place")


@pytest.mark.parametrize(
    "flood_source", ["127.0.0.2", "127.0.0.1"], ids=["flood-from-another-source", "flood-from-the-clients-source"]
)
def test_renewals_and_enrollments_are_served_while_2000_idle_connections_are_held(tmp_path, flood_source):
    ca_dir = tmp_path / "ca"
    run_ca("init", "--trust-domain", TD, ca_dir=ca_dir)
    web = issue(ca_dir, tmp_path / "web", WEB, "--ttl", "2h")
    tokens = [
        run_ca("token", f"spiffe://{TD}/ns/prod/sa/new{i}", ca_dir=ca_dir).stdout.strip() for i in range(ENROLLMENTS)
    ]
    bundle = ca_dir / "bundle.pem"
    service = CaService(ca_dir, tmp_path)
    try:
        assert _post(service.port, bundle, "/v1/renew", _csr(), web) == 200  # warmed up
        rss_before = vm_rss_kib(service.proc.pid)
        flood = IdleFlood(service.port, FLOOD, flood_source)
        try:
            # The service took every one of them and kept only its per-source budget of pending handshakes.
            wait_until(lambda: service.count(_gave_way) >= FLOOD - MAX_PENDING_PER_SOURCE, what="the flood accepted")
            rss_during = vm_rss_kib(service.proc.pid)
            seconds, successes = [], 0
            requests = [("/v1/renew", _csr(), web)] * RENEWALS + [
                ("/v1/enroll", json.dumps({"token": tok, "csr": _csr().decode()}).encode(), None) for tok in tokens
            ]
            for path, body, ident in requests:
                started = time.monotonic()
                try:
                    status = _post(service.port, bundle, path, body, ident)
                except OSError:
                    status = None
                seconds.append(time.monotonic() - started)
                successes += status == 200
            open_sockets = service.fd_count()
        finally:
            flood.close()
        timings = Timings(len(requests), successes, tuple(seconds))
        print(
            f"\nca serve, {FLOOD} idle TCP connections from {flood_source}: {timings.summary()}; "
            f"RSS {rss_before} KiB before, {rss_during} KiB during; {open_sockets} descriptors open"
        )
        assert timings.success_rate == 1.0, timings.summary()
        assert max(timings.seconds) < LATENCY_BOUND, timings.summary()
        assert open_sockets < MAX_OPEN_SOCKETS  # the flood did not turn into one descriptor per connection
    finally:
        service.stop()
