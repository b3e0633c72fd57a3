"""No survivors: a renewal records the certificate it replaced, and revoking that one revokes every
certificate renewed from it (real processes: `ca serve`, a sidecar renewing its own certificate, `ca
revoke` on the parent, the peer's sidecar refusing the child); `ca serve` revokes the service certificate
of its previous run and never lets its CRL go stale."""

from __future__ import annotations

import json
from datetime import datetime, timedelta

import pytest
from cryptography import x509
from support.ca_cli import issue, run_ca
from support.certs import API, FRONTEND, TD
from support.network import App, echo_through
from support.processes import CaService, Sidecar, identity_yaml

from ca.inspection import read_crls

pytestmark = pytest.mark.e2e


def serial_of(ident) -> str:
    return format(x509.load_pem_x509_certificate((ident / "cert.pem").read_bytes()).serial_number, "x")


def listed(ca_dir) -> dict[str, dict]:
    return {entry["serial"].replace(":", "").lower(): entry
            for entry in json.loads(run_ca("list", "--json", ca_dir=ca_dir).stdout)}


def test_revoking_a_renewed_certificate_revokes_its_renewal_and_the_peer_refuses_it(tmp_path):
    ca_dir = tmp_path / "ca"
    run_ca("init", "--trust-domain", TD, ca_dir=ca_dir)
    service = CaService(ca_dir, tmp_path)
    api_ident = issue(ca_dir, tmp_path / "api", API)
    front_ident = issue(ca_dir, tmp_path / "frontend", FRONTEND, "--ttl", "2m")
    parent = serial_of(front_ident)
    crl = tmp_path / "crl.pem"
    run_ca("crl", "--out", crl, ca_dir=ca_dir)
    app = App()
    api = Sidecar(tmp_path, "api", identity_yaml(api_ident, crl) + (
        f"inbound:\n  - name: api\n    listen: 127.0.0.1:0\n    forward: 127.0.0.1:{app.port}\n"
        f"    allow: [{FRONTEND}]\n")).wait_ready()
    # renews within seconds ('at': the fraction of the lifetime after which to renew, plus jitter), and again
    # and again: whatever it holds when the parent is revoked descends from the parent
    front = Sidecar(tmp_path, "front", identity_yaml(front_ident) + f"  renew: {{url: '{service.url}', at: 0.0001}}\n" + (
        f"outbound:\n  - name: api\n    listen: 127.0.0.1:0\n    connect: 127.0.0.1:{api.ports['api']}\n"
        f"    expect: [{API}]\n")).wait_ready()
    try:
        front.wait_event(lambda e: e["event"] == "reloaded" and e.get("trigger") == "renewal", what="the renewal")
        child = serial_of(front_ident)
        assert child != parent
        entries = listed(ca_dir)
        assert entries[child]["parent_serial"].replace(":", "").lower() == parent
        assert entries[parent]["parent_serial"] is None
        assert echo_through(front.ports["api"], b"renewed") == b"renewed"

        revoked = run_ca("revoke", parent, "--reason", "keyCompromise", ca_dir=ca_dir).stdout
        assert "renewed from" in revoked
        entries = listed(ca_dir)
        assert (entries[child]["status"], entries[child]["reason"]) == ("revoked", "keyCompromise")
        run_ca("crl", "--out", crl, ca_dir=ca_dir)
        entries = listed(ca_dir)
        api.wait_event(lambda e: e["event"] == "reloaded", what="the api sidecar reloading the CRL")
        with pytest.raises(ConnectionError):  # the api sidecar refuses; the frontend's resets the app
            assert echo_through(front.ports["api"], b"survivor?") == b""
        refused = api.wait_event(lambda e: e["event"] == "conn_denied", what="the child refused")
        assert refused["reason"] == "revoked"
        lineage, serial = [], refused["claimed_serial"]
        while serial is not None:
            lineage.append(serial)
            parent_of = entries[serial]["parent_serial"]
            serial = parent_of.replace(":", "").lower() if parent_of else None
        assert lineage[-1] == parent and child in lineage
        assert all(entries[serial]["status"] == "revoked" for serial in lineage)
    finally:
        front.stop()
        api.stop()
        service.stop()
        app.close()


def test_ca_serve_revokes_the_service_certificate_of_its_previous_run(tmp_path):
    ca_dir = tmp_path / "ca"
    run_ca("init", "--trust-domain", TD, ca_dir=ca_dir)
    first = CaService(ca_dir, tmp_path)
    first_serial = first.wait_event(lambda e: e["event"] == "ready")["serial"]
    first.stop()
    second = CaService(ca_dir, tmp_path)
    try:
        second_serial = second.wait_event(lambda e: e["event"] == "ready")["serial"]
        entries = listed(ca_dir)
        norm = lambda serial: serial.replace(":", "").lower()  # noqa: E731
        assert (entries[norm(first_serial)]["status"], entries[norm(first_serial)]["reason"]) == ("revoked", "superseded")
        assert entries[norm(second_serial)]["status"] == "valid"
    finally:
        second.stop()


def test_ca_serve_signs_the_crl_again_before_a_third_of_its_validity_is_left(tmp_path):
    ca_dir = tmp_path / "ca"
    run_ca("init", "--trust-domain", TD, ca_dir=ca_dir)
    run_ca("crl", "--validity", "6s", ca_dir=ca_dir)
    first = read_crls(ca_dir / "crl.pem")[0]
    service = CaService(ca_dir, tmp_path)
    try:
        signed = service.wait_event(lambda e: e["event"] == "crl_signed", 15, "the CRL signed again")
        again = read_crls(ca_dir / "crl.pem")[0]
        number = again.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
        assert signed["number"] == number > first.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
        # signed when at most a third (2 s) was left, never after it went stale; the same 6 s validity again
        assert datetime.fromisoformat(signed["ts"].replace("Z", "+00:00")) < first.next_update_utc
        assert again.next_update_utc - first.next_update_utc < timedelta(seconds=8)
    finally:
        service.stop()
