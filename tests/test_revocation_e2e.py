"""Revocation an operator can rely on, with real processes: a CRL past its next update (refused or
warned, at start and on reload, with /readyz and the metric), a CRL rolled back to an older one (the
reload is refused), and what a refused peer claimed to be."""

from __future__ import annotations

import os
import shutil
import urllib.error
import urllib.request
from datetime import datetime, timedelta, timezone

import pytest
from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families
from support.ca_cli import issue, run_ca
from support.certs import TD
from support.network import App, tls_client, tls_connection
from support.polling import wait_until
from support.processes import Sidecar, denial, identity_yaml

from ca.inspection import read_crls

pytestmark = pytest.mark.e2e

FRONTEND = f"spiffe://{TD}/ns/prod/sa/frontend"


@pytest.fixture(scope="module")
def ca(tmp_path_factory):
    root = tmp_path_factory.mktemp("revocation-pki")
    ca_dir = root / "ca"
    run_ca("init", "--trust-domain", TD, ca_dir=ca_dir)
    return root, ca_dir


def fresh(ca, name: str) -> os.PathLike:
    root, ca_dir = ca
    return issue(ca_dir, root / f"{name}-{os.urandom(4).hex()}", f"spiffe://{TD}/ns/prod/sa/{name}")


def signed_crl(ca, out, validity: str) -> x509.CertificateRevocationList:
    """`ca crl --validity V --out OUT`; the CRL of the current intermediate (the file's first)."""
    _, ca_dir = ca
    run_ca("crl", "--validity", validity, "--out", out, ca_dir=ca_dir)
    return read_crls(out)[0]


def wait_past(moment: datetime) -> None:
    wait_until(lambda: datetime.now(timezone.utc) > moment, 30, f"the clock past {moment}")


def replace_atomically(path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def sidecar(tmp_path, ca, crl, *, extra_identity: str = "") -> tuple[Sidecar, App]:
    ident = tmp_path / "identity"
    shutil.copytree(fresh(ca, "api"), ident)
    app = App()
    config = identity_yaml(ident, crl) + extra_identity + (
        f"inbound:\n  - name: api\n    listen: 127.0.0.1:0\n    forward: 127.0.0.1:{app.port}\n"
        f"    allow: [{FRONTEND}]\nadmin:\n  listen: 127.0.0.1:0\n"
    )
    return Sidecar(tmp_path, "api", config).wait_ready(), app


def readyz(side: Sidecar) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{side.ports['admin']}/readyz", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def metrics(side: Sidecar) -> dict[tuple, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{side.ports['admin']}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text) for sample in family.samples
    }


def issuer_label(crl: x509.CertificateRevocationList) -> tuple:
    return ("sidecar_crl_next_update_timestamp_seconds", (("issuer", crl.issuer.rfc4514_string()),))


def test_a_stale_crl_at_start_refuses_new_handshakes_naming_the_crl_and_says_not_ready(ca, tmp_path):
    crl_path = tmp_path / "crl.pem"
    crl = signed_crl(ca, crl_path, "1s")
    wait_past(crl.next_update_utc + timedelta(seconds=1))
    side, app = sidecar(tmp_path, ca, crl_path, extra_identity="  crl_grace: 1s\n")
    try:
        frontend = fresh(ca, "frontend")
        port, outcome = tls_client(frontend, side.ports["api"])
        assert outcome.startswith("error"), outcome
        refused = denial(side, port)
        assert refused["reason"] == "crl_stale"
        assert str(crl_path) in refused["detail"] and crl.issuer.rfc4514_string() in refused["detail"]
        assert "expired" in refused["detail"] and "ago" in refused["detail"]
        status, body = readyz(side)
        assert status == 503 and "past its next update" in body, body
        assert metrics(side)[issuer_label(crl)] == crl.next_update_utc.timestamp()
        side.wait_event(lambda e: e["event"] == "crl_stale" and e["level"] == "warning")
    finally:
        side.stop()
        app.close()


def test_with_crl_stale_warn_a_stale_crl_lets_peers_through_and_counts_them(ca, tmp_path):
    crl_path = tmp_path / "crl.pem"
    crl = signed_crl(ca, crl_path, "1s")
    wait_past(crl.next_update_utc + timedelta(seconds=1))
    side, app = sidecar(tmp_path, ca, crl_path, extra_identity="  crl_grace: 1s\n  crl_stale: warn\n")
    try:
        assert tls_client(fresh(ca, "frontend"), side.ports["api"], b"still")[1] == "data b'still'"
        counted = metrics(side)
        assert counted[("sidecar_crl_stale_accepted_total", (("direction", "inbound"), ("listener", "api")))] == 1
        assert readyz(side)[0] == 503
    finally:
        side.stop()
        app.close()


def test_a_crl_going_stale_after_a_reload_is_logged_once_per_state_and_then_refused(ca, tmp_path):
    crl_path = tmp_path / "crl.pem"
    signed_crl(ca, crl_path, "24h")
    side, app = sidecar(tmp_path, ca, crl_path, extra_identity="  crl_grace: 2s\n")
    try:
        frontend = fresh(ca, "frontend")
        assert tls_client(frontend, side.ports["api"], b"fresh")[1] == "data b'fresh'"
        assert readyz(side)[0] == 200
        short = tmp_path / "short.pem"
        crl = signed_crl(ca, short, "1s")
        replace_atomically(crl_path, short.read_bytes())
        side.wait_event(lambda e: e["event"] == "reloaded")
        assert metrics(side)[issuer_label(crl)] == crl.next_update_utc.timestamp()
        side.wait_event(lambda e: e["event"] == "crl_stale" and "within identity.crl_grace" in e["detail"])
        side.wait_event(lambda e: e["event"] == "crl_stale" and "are refused (crl_stale)" in e["detail"])
        port, outcome = tls_client(frontend, side.ports["api"])
        assert denial(side, port)["reason"] == "crl_stale"
        assert readyz(side)[0] == 503
        assert side.count(lambda e: e["event"] == "crl_stale") == 2  # one per state, not one per check
        replace_atomically(crl_path, _fresh(ca, tmp_path))
        side.wait_event(lambda e: e["event"] == "crl_fresh")
        assert tls_client(frontend, side.ports["api"], b"again")[1] == "data b'again'"
        assert readyz(side)[0] == 200
    finally:
        side.stop()
        app.close()


def _fresh(ca, tmp_path) -> bytes:
    out = tmp_path / f"fresh-{os.urandom(3).hex()}.pem"
    signed_crl(ca, out, "24h")
    return out.read_bytes()


def test_a_rolled_back_crl_is_refused_on_reload_and_the_revoked_peer_stays_refused(ca, tmp_path):
    _, ca_dir = ca
    crl_path = tmp_path / "crl.pem"
    old = signed_crl(ca, tmp_path / "old.pem", "24h")
    shutil.copy(tmp_path / "old.pem", crl_path)
    side, app = sidecar(tmp_path, ca, crl_path)
    try:
        frontend = fresh(ca, "frontend")
        serial = format(x509.load_pem_x509_certificate((frontend / "cert.pem").read_bytes()).serial_number, "x")
        run_ca("revoke", serial, ca_dir=ca_dir)
        new = signed_crl(ca, tmp_path / "new.pem", "24h")
        replace_atomically(crl_path, (tmp_path / "new.pem").read_bytes())
        side.wait_event(lambda e: e["event"] == "reloaded")
        port, _ = tls_client(frontend, side.ports["api"])
        refused = denial(side, port)
        assert refused["reason"] == "revoked" and refused["peer_id"] is None
        assert (refused["claimed_id"], refused["claimed_serial"]) == (FRONTEND, serial)
        assert refused["claimed_issuer"] == new.issuer.rfc4514_string()

        replace_atomically(crl_path, (tmp_path / "old.pem").read_bytes())  # the genuine, older CRL
        failed = side.wait_event(lambda e: e["event"] == "reload_failed")
        numbers = (old.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number,
                   new.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number)
        assert f"CRL number {numbers[0]}, lower than number {numbers[1]}" in failed["detail"]
        port, _ = tls_client(frontend, side.ports["api"])
        assert denial(side, port)["reason"] == "revoked"
    finally:
        side.stop()
        app.close()


def test_an_open_connection_is_cut_when_the_peer_certificate_expires(ca, tmp_path):
    root, ca_dir = ca
    side, app = sidecar(tmp_path, ca, None)
    try:
        short = issue(ca_dir, root / f"short-{os.urandom(3).hex()}", FRONTEND, "--ttl", "4s")
        expiry = x509.load_pem_x509_certificate((short / "cert.pem").read_bytes()).not_valid_after_utc
        with tls_connection(short, side.ports["api"]) as conn:
            conn.sendall(b"before")
            assert conn.recv(100) == b"before"
            port = conn.getsockname()[1]
            closed = side.wait_event(
                lambda e: e["event"] == "conn_closed" and e.get("peer_addr") == f"127.0.0.1:{port}", 15,
                "the connection cut at the certificate's expiry",
            )
        assert closed["reason"] == "peer_expired" and closed["peer_id"] == FRONTEND
        assert f"expired at {expiry:%Y-%m-%dT%H:%M:%SZ}" in closed["detail"]
        assert datetime.fromisoformat(closed["ts"].replace("Z", "+00:00")) >= expiry
    finally:
        side.stop()
        app.close()
