"""Bundles and CRLs kept current from `ca serve` (proxy/sync.py), with real processes: two meshes
(a.org, b.org), two `ca init`s, each `ca serve` publishing its bundle; their sidecars call each other
with the partner's bundle fetched from the partner's endpoint, pick up a rotated partner root without
a restart, refuse a bundle whose sequence goes back, and cut a connection after `ca revoke`."""

from __future__ import annotations

import http.client
import os
import shutil
import socket
import sqlite3
import time

import pytest
from support.ca_cli import issue, run_ca
from support.network import App, echo_through, free_port, tls_connection
from support.polling import wait_until
from support.processes import CaService, Sidecar

pytestmark = pytest.mark.e2e

A, B = "a.org", "b.org"


class Mesh:
    """One trust domain: its CA directory, its `ca serve`, a sidecar with a workload identity, its app."""

    def __init__(self, root, trust_domain):
        self.root = root / trust_domain
        self.trust_domain = trust_domain
        self.ca_dir = self.root / "ca"
        run_ca("init", "--trust-domain", trust_domain, ca_dir=self.ca_dir)
        self.service = CaService(self.ca_dir, self.root.parent)
        self.ident = self.root / "identity"
        shutil.copytree(issue(self.ca_dir, self.root / "issued", self.id("api")), self.ident)
        run_ca("crl", "--out", self.ident / "crl.pem", ca_dir=self.ca_dir)
        self.app = App()
        self.inbound_port = free_port()
        self.side: Sidecar | None = None

    def id(self, name: str) -> str:
        return f"spiffe://{self.trust_domain}/ns/prod/sa/{name}"

    def start(self, partner: Mesh) -> Sidecar:
        """The sidecar: inbound from the partner's api and our own ns/prod, outbound to the partner's
        inbound; our bundle and CRL synced from our `ca serve`, the partner's bundle from theirs,
        starting from the bundle the operator handed over (`ca bundle --format spiffe`)."""
        partner_bundle = self.ident / f"{partner.trust_domain}.json"
        run_ca("bundle", "--format", "spiffe", "--out", partner_bundle, ca_dir=partner.ca_dir)
        config = (
            f"identity:\n  cert: {self.ident}/cert.pem\n  key: {self.ident}/key.pem\n"
            f"  bundle: {self.ident}/bundle.pem\n  crl: {self.ident}/crl.pem\n"
            f"  sync: {{url: '{self.service.url}', every: 1s}}\n"
            f"trust_domains:\n  {partner.trust_domain}: {{bundle: {partner_bundle}, endpoint: '{partner.service.url}', "
            "every: 1s}\n"
            f"inbound:\n  - name: api\n    listen: 127.0.0.1:{self.inbound_port}\n    forward: 127.0.0.1:{self.app.port}\n"
            f"    allow: [{partner.id('api')}, spiffe://{self.trust_domain}/ns/prod/*]\n"
            f"outbound:\n  - name: partner\n    listen: 127.0.0.1:0\n    connect: 127.0.0.1:{partner.inbound_port}\n"
            f"    expect: [{partner.id('api')}]\n"
            "admin:\n  listen: 127.0.0.1:0\n"
        )
        self.side = Sidecar(self.root, "sidecar", config).wait_ready()
        return self.side

    def metrics(self) -> str:
        connection = http.client.HTTPConnection("127.0.0.1", self.side.ports["admin"], timeout=5)
        try:
            connection.request("GET", "/metrics")
            return connection.getresponse().read().decode()
        finally:
            connection.close()

    def stop(self) -> None:
        if self.side is not None:
            self.side.stop()
        self.service.stop()
        self.app.close()


@pytest.fixture
def meshes(tmp_path):
    a, b = Mesh(tmp_path, A), Mesh(tmp_path, B)
    try:
        a.start(b)
        b.start(a)
        yield a, b
    finally:
        a.stop()
        b.stop()


def synced(mesh: Mesh, source: str, after: int = 0, **fields) -> dict:
    """The first ``sync_updated`` line of ``source`` after the first ``after`` of them, matching ``fields``."""
    def found():
        lines = [e for e in mesh.side.events() if e["event"] == "sync_updated" and e["source"] == source]
        return next((e for e in lines[after:] if all(e.get(k) == v for k, v in fields.items())), None)

    return wait_until(found, 20, f"{source} synced on {mesh.trust_domain}")


def test_sidecars_of_two_meshes_call_each_other_with_bundles_from_the_endpoints(meshes):
    a, b = meshes
    assert echo_through(a.side.ports["partner"], b"a to b") == b"a to b"
    assert echo_through(b.side.ports["partner"], b"b to a") == b"b to a"
    # Each fetched the partner's bundle, and its own bundle and CRL: all as handed over, so unchanged.
    wait_until(lambda: 'sidecar_sync_total{result="unchanged"}' in a.metrics(), 20, "a's first syncs")
    assert 'sidecar_trust_bundle_roots{trust_domain="b.org"} 1.0' in a.metrics()
    assert not [e for e in a.side.events() if e["event"] in ("sync_failed", "sync_refused")]


def test_a_rotated_partner_root_is_picked_up_without_a_restart(meshes):
    a, b = meshes
    run_ca("rotate", ca_dir=b.ca_dir)
    event = synced(a, f"trust_domains.{B}.endpoint", sequence=2)
    assert event["files"] == [str(a.ident / f"{B}.json")]
    assert 'sidecar_trust_bundle_roots{trust_domain="b.org"} 2.0' in a.metrics()
    synced(b, "identity.sync")  # b's own bundle now holds the new root too (and its CRL both intermediates')
    renewed = issue(b.ca_dir, b.root / "renewed", b.id("api"))  # from the new intermediate
    for name in ("key.pem", "cert.pem"):
        tmp = b.ident / f"{name}.tmp"
        tmp.write_bytes((renewed / name).read_bytes())
        os.replace(tmp, b.ident / name)
    b.side.wait_event(lambda e: e["event"] == "reloaded" and "file change" in e["trigger"])
    assert echo_through(a.side.ports["partner"], b"new root") == b"new root"
    assert a.side.count(lambda e: e["event"] == "ready") == 1  # never restarted


def test_a_bundle_whose_sequence_goes_back_is_refused_and_the_file_kept(meshes):
    a, b = meshes
    run_ca("rotate", ca_dir=b.ca_dir)
    synced(a, f"trust_domains.{B}.endpoint", sequence=2)
    kept = (a.ident / f"{B}.json").read_bytes()
    with sqlite3.connect(b.ca_dir / "ca.db") as db:  # a CA restored from an old backup, say
        db.execute("UPDATE meta SET value = '1' WHERE key = 'bundle_sequence'")
    event = a.side.wait_event(lambda e: e["event"] == "sync_refused", timeout=20)
    assert event["source"] == f"trust_domains.{B}.endpoint"
    assert event["detail"] == "spiffe_sequence 1 is older than the 2 in force; refusing to go back"
    assert 'sidecar_sync_total{result="refused"}' in a.metrics()
    assert (a.ident / f"{B}.json").read_bytes() == kept
    assert echo_through(a.side.ports["partner"], b"still") == b"still"


def test_ca_revoke_reaches_a_synced_sidecar_and_cuts_the_open_connection(meshes):
    a, _ = meshes
    web = issue(a.ca_dir, a.root / "web", a.id("web"))
    conn = tls_connection(web, a.inbound_port)
    conn.sendall(b"hi")
    assert conn.recv(10) == b"hi"
    started = time.monotonic()
    run_ca("revoke", a.id("web"), ca_dir=a.ca_dir)
    event = a.side.wait_event(lambda e: e["event"] == "conn_closed" and e.get("reason") == "policy_revoked",
                              timeout=20)
    assert event["peer_id"] == a.id("web")
    assert time.monotonic() - started < 1 + 2 + 2  # every + 2 s, and the time ca revoke takes
    conn.settimeout(5)
    with pytest.raises((ConnectionError, OSError, socket.timeout)):
        conn.sendall(b"more")
        if conn.recv(10) == b"":
            raise ConnectionError("closed")
