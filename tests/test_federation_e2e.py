"""Trust domains with real processes and two independent `ca init`s: a root vouches only for its own
trust domain (the attack of a partner root minting our IDs, inbound, outbound and in `ca verify`),
federated peers allowed where listed, bad bundles refused at start and on reload, reload adding and
removing a trust domain."""

from __future__ import annotations

import http.client
import json
import os
import socket
import ssl
import subprocess
import threading
from datetime import timedelta

import pytest
from cryptography import x509
from support.ca_cli import issue, run_ca
from support.certs import FRONTEND, NOW, TD, Authority, key_pem, pem
from support.network import App, read_until_closed, tls_client, tls_connection
from support.processes import PY, Sidecar, denial, identity_yaml

from ca.authority import Issuer, Revocation, generate_key, make_intermediate

pytestmark = pytest.mark.e2e

PARTNER = "partner.org"
SHOP = f"spiffe://{PARTNER}/ns/shop/sa/web"


@pytest.fixture(scope="module")
def meshes(tmp_path_factory):
    """Two independent CAs (example.org, partner.org), each with an issued identity, and the partner's
    bundle in the SPIFFE format."""
    root = tmp_path_factory.mktemp("federation")
    ours, theirs = root / "ours", root / "theirs"
    run_ca("init", "--trust-domain", TD, ca_dir=ours)
    run_ca("init", "--trust-domain", PARTNER, ca_dir=theirs)
    run_ca("bundle", "--format", "spiffe", "--out", root / "partner.json", ca_dir=theirs)
    return root, ours, theirs


def ident(meshes, ca_dir, spiffe_id):
    root = meshes[0]
    return issue(ca_dir, root / f"id-{os.urandom(4).hex()}", spiffe_id)


def forged(meshes, spiffe_id=FRONTEND):
    """What a partner that turns hostile can do: its root signs an intermediate for *our* trust domain
    (name-constrained to it, as ours is) and that intermediate a leaf with one of our IDs."""
    root, _, theirs = meshes
    partner = Authority.from_state_dir(theirs)
    key = generate_key()
    intermediate = make_intermediate(TD, key, root=partner.root, root_key=partner.root_key,
                                     ttl=timedelta(days=30), now=NOW)
    evil = Authority(partner.root, partner.root_key, Issuer(intermediate, key, TD))
    leaf = evil.leaf(spiffe_id)
    out = root / f"forged-{os.urandom(4).hex()}"
    out.mkdir()
    (out / "cert.pem").write_bytes(pem(leaf.cert, intermediate))
    (out / "key.pem").write_bytes(key_pem(leaf.key))
    return out


def federated_config(ident_dir, app_port, allow, *, partner_bundle, crl=None, admin=True, extra=""):
    text = identity_yaml(ident_dir, crl) + (
        f"inbound:\n  - name: api\n    listen: 127.0.0.1:0\n    forward: 127.0.0.1:{app_port}\n"
        f"    allow: [{', '.join(allow)}]\n"
    )
    if partner_bundle is not None:
        text += f"trust_domains:\n  {PARTNER}: {{bundle: {partner_bundle}}}\n"
    if admin:
        text += "admin:\n  listen: 127.0.0.1:0\n"
    return text + extra


@pytest.fixture
def api(meshes, tmp_path):
    root, ours, _ = meshes
    app = App()
    me = ident(meshes, ours, f"spiffe://{TD}/ns/prod/sa/api")
    bundle = tmp_path / "partner.json"
    bundle.write_bytes((root / "partner.json").read_bytes())
    side = Sidecar(tmp_path, "api", federated_config(me, app.port, [FRONTEND, f"spiffe://{PARTNER}/ns/shop/*"],
                                                    partner_bundle=bundle)).wait_ready()
    yield side, me, app, bundle
    side.stop()
    app.close()


def admin_get(side, path):
    connection = http.client.HTTPConnection("127.0.0.1", side.ports["admin"], timeout=5)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read().decode()
    finally:
        connection.close()


# --- the attack -----------------------------------------------------------------------------------


def test_a_partner_root_minting_our_id_is_refused_inbound(meshes, api):
    side = api[0]
    port, outcome = tls_client(forged(meshes), side.ports["api"])
    assert outcome.startswith("error"), outcome
    event = denial(side, port)
    assert event["reason"] == "untrusted_ca"
    assert event["detail"].startswith(f"{FRONTEND} is in trust domain {TD}, but its chain ends at ")
    assert f"a root of trust domain {PARTNER}; a root vouches only for its own trust domain" in event["detail"]


def test_the_partners_own_ids_are_allowed_where_listed(meshes, api):
    side = api[0]
    shop = ident(meshes, meshes[2], SHOP)
    assert tls_client(shop, side.ports["api"], b"federated")[1] == "data b'federated'"
    other = ident(meshes, meshes[2], f"spiffe://{PARTNER}/ns/other/sa/db")
    port, outcome = tls_client(other, side.ports["api"])
    assert denial(side, port)["reason"] == "identity_not_allowed"


def test_a_peer_of_a_trust_domain_without_bundle_is_refused_naming_it(meshes, api, tmp_path):
    side = api[0]
    stranger = Authority.from_library("other.org")
    files = stranger.write_identity(tmp_path / "stranger", stranger.leaf("spiffe://other.org/ns/x/sa/y"))
    port, _ = tls_client(files.directory, side.ports["api"])
    event = denial(side, port)
    assert (event["reason"], event["detail"]) == (
        "untrusted_ca", f"no bundle for trust domain other.org; this sidecar trusts {TD}, {PARTNER}",
    )


def test_a_partner_crl_listing_our_serial_revokes_nothing_of_ours(meshes, tmp_path):
    root, ours, theirs = meshes
    frontend = ident(meshes, ours, FRONTEND)
    serial = x509_serial(frontend)
    partner = Authority.from_state_dir(theirs)
    hostile_crl = partner.issuer.crl([Revocation(serial, NOW - timedelta(minutes=5), "keyCompromise")],
                                     number=99, now=NOW)
    run_ca("crl", "--out", tmp_path / "ours.crl", ca_dir=ours)
    # Our CRL, then the partner's intermediate and its CRL listing our frontend's serial.
    crl_file = tmp_path / "crl.pem"
    crl_file.write_bytes((tmp_path / "ours.crl").read_bytes() + pem(partner.intermediate, hostile_crl))
    app = App()
    me = ident(meshes, ours, f"spiffe://{TD}/ns/prod/sa/api")
    side = Sidecar(tmp_path, "api", federated_config(me, app.port, [FRONTEND], partner_bundle=root / "partner.json",
                                                    crl=crl_file, admin=False)).wait_ready()
    try:
        assert tls_client(frontend, side.ports["api"], b"still ours")[1] == "data b'still ours'"
    finally:
        side.stop()
        app.close()


def x509_serial(ident_dir) -> int:
    return x509.load_pem_x509_certificate((ident_dir / "cert.pem").read_bytes()).serial_number


class ForgedServer:
    """A TLS server (stdlib ssl, in a thread) presenting ``ident_dir``'s certificate; echoes one read."""

    def __init__(self, ident_dir):
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(ident_dir / "cert.pem", ident_dir / "key.pem")
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                raw, _ = self.sock.accept()
            except OSError:
                return
            try:
                with self.ctx.wrap_socket(raw, server_side=True) as conn:
                    conn.sendall(conn.recv(100))
            except (OSError, ssl.SSLError):
                pass

    def close(self):
        self.sock.close()


def test_a_partner_root_minting_our_id_is_refused_outbound(meshes, tmp_path):
    root, ours, _ = meshes
    server = ForgedServer(forged(meshes, f"spiffe://{TD}/ns/prod/sa/db"))
    me = ident(meshes, ours, FRONTEND)
    config = identity_yaml(me) + (
        f"outbound:\n  - name: db\n    listen: 127.0.0.1:0\n    connect: 127.0.0.1:{server.port}\n"
        f"    expect: [spiffe://{TD}/ns/prod/sa/db]\n"
        f"trust_domains:\n  {PARTNER}: {{bundle: {root / 'partner.json'}}}\n"
    )
    side = Sidecar(tmp_path, "client", config).wait_ready()
    try:
        with socket.create_connection(("127.0.0.1", side.ports["db"]), timeout=10) as app:
            app.sendall(b"x")
            assert read_until_closed(app, 10) in ((b"", "eof"), (b"", "reset"))
        event = side.wait_event(lambda e: e["event"] == "conn_denied" and e["listener"] == "db")
        assert event["reason"] == "untrusted_ca"
        assert f"a root of trust domain {PARTNER}" in event["detail"]
    finally:
        side.stop()
        server.close()


def test_ca_verify_refuses_the_forged_certificate_even_with_one_combined_bundle(meshes, tmp_path):
    root, ours, theirs = meshes
    fake = forged(meshes)
    combined = tmp_path / "combined.pem"
    combined.write_bytes((ours / "bundle.pem").read_bytes() + (theirs / "bundle.pem").read_bytes())
    for bundles in (["--bundle", combined],
                    ["--bundle", f"{TD}={ours / 'bundle.pem'}", "--bundle", f"{PARTNER}={root / 'partner.json'}"]):
        result = run_ca("verify", fake / "cert.pem", *bundles, "--expect", FRONTEND, check=False)
        assert result.returncode == 1, result.stderr
        assert result.stdout.startswith(f"untrusted_ca: {FRONTEND} is in trust domain {TD}, but its chain ends at")
        assert f"a root of trust domain {PARTNER}" in result.stdout


# --- bad bundles: at start, on reload -------------------------------------------------------------


def bad_bundles(meshes):
    root, ours, _ = meshes
    good = json.loads((root / "partner.json").read_text())
    wrong_use = dict(good, keys=[dict(good["keys"][0], use="sig")])
    return {
        "wrong trust domain": ((ours / "bundle.pem").read_bytes(), "is a root of trust domain example.org, not of partner.org"),
        "wrong use": (json.dumps(wrong_use).encode(), "keys[0] has use 'sig'"),
        "truncated JSON": ((root / "partner.json").read_bytes()[:100], "is not valid JSON"),
    }


@pytest.mark.parametrize("damage", ["wrong trust domain", "wrong use", "truncated JSON"])
def test_a_bad_federated_bundle_stops_the_start(meshes, tmp_path, damage):
    data, expected = bad_bundles(meshes)[damage]
    bundle = tmp_path / "partner.json"
    bundle.write_bytes(data)
    me = ident(meshes, meshes[1], f"spiffe://{TD}/ns/prod/sa/api")
    config = tmp_path / "api.yaml"
    config.write_text(federated_config(me, 9, [FRONTEND], partner_bundle=bundle, admin=False))
    result = subprocess.run([PY, "-m", "proxy", "run", "-c", config], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert f"proxy: {bundle}: trust bundle of {PARTNER} (trust_domains.{PARTNER}.bundle): " in result.stderr
    assert expected in result.stderr


@pytest.mark.parametrize("damage", ["wrong trust domain", "wrong use", "truncated JSON", "sequence backwards"])
def test_a_bad_federated_bundle_on_reload_keeps_the_old_one_and_readyz_names_it(meshes, api, damage):
    side, _, _, bundle = api
    if damage == "sequence backwards":
        document = json.loads(bundle.read_text())
        bundle.write_text(json.dumps(dict(document, spiffe_sequence=document["spiffe_sequence"] + 5)))
        side.wait_event(lambda e: e["event"] == "reloaded")
        data, expected = json.dumps(document).encode(), "older than the"
    else:
        data, expected = bad_bundles(meshes)[damage]
    tmp = bundle.with_name("partner.json.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, bundle)
    event = side.wait_event(lambda e: e["event"] == "reload_failed")
    assert f"trust bundle of {PARTNER}" in event["detail"] and expected in event["detail"]
    status, body = admin_get(side, "/readyz")
    assert status == 503
    assert f"a trust bundle failed to load (still verifying with the last good one): {bundle}" in body
    shop = ident(meshes, meshes[2], SHOP)
    assert tls_client(shop, side.ports["api"], b"old bundle")[1] == "data b'old bundle'"


# --- reload: adding, removing a trust domain --------------------------------------------------------


def test_removing_a_trust_domain_closes_its_open_connections_and_refuses_new_ones(meshes, api):
    side, me, app, _ = api
    shop_ident = ident(meshes, meshes[2], SHOP)
    shop = tls_connection(shop_ident, side.ports["api"])
    frontend = tls_connection(ident(meshes, meshes[1], FRONTEND), side.ports["api"])
    for conn in (shop, frontend):
        conn.sendall(b"hi")
        assert conn.recv(10) == b"hi"
    assert 'sidecar_trust_bundle_roots{trust_domain="partner.org"} 1.0' in admin_get(side, "/metrics")[1]
    side.config_path.write_text(federated_config(me, app.port, [FRONTEND, f"spiffe://{PARTNER}/ns/shop/*"],
                                                 partner_bundle=None))
    event = side.wait_event(lambda e: e["event"] == "conn_closed" and e.get("reason") == "policy_revoked")
    assert event["peer_id"] == SHOP
    assert event["detail"] == f"peer {SHOP}: no bundle for trust domain {PARTNER}; this sidecar trusts {TD}"
    frontend.sendall(b"still here")
    assert frontend.recv(100) == b"still here"
    port, _ = tls_client(shop_ident, side.ports["api"])
    assert denial(side, port)["detail"] == f"no bundle for trust domain {PARTNER}; this sidecar trusts {TD}"
    metrics = admin_get(side, "/metrics")[1]
    assert 'trust_domain="partner.org"' not in metrics and 'sidecar_trust_bundle_roots{trust_domain="example.org"} 1.0' in metrics


def test_a_resumed_session_does_not_outlive_the_removal_of_its_trust_domain(meshes, tmp_path):
    root, ours, theirs = meshes
    app = App()
    me = ident(meshes, ours, f"spiffe://{TD}/ns/prod/sa/api")
    allow = [FRONTEND, f"spiffe://{PARTNER}/ns/shop/*"]
    resume = "tls: {session_resumption: true, session_lifetime: 10m}\n"
    side = Sidecar(tmp_path, "api", federated_config(me, app.port, allow, partner_bundle=root / "partner.json",
                                                    admin=False, extra=resume)).wait_ready()
    try:
        shop = ident(meshes, theirs, SHOP)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        ctx.load_cert_chain(shop / "cert.pem", shop / "key.pem")
        with ctx.wrap_socket(socket.create_connection(("127.0.0.1", side.ports["api"]), timeout=10)) as first:
            first.sendall(b"hello")
            assert first.recv(10) == b"hello"  # the ticket arrived before the echo
            session = first.session
        side.config_path.write_text(federated_config(me, app.port, allow, partner_bundle=None, admin=False,
                                                     extra=resume))
        side.wait_event(lambda e: e["event"] == "reloaded")
        raw = socket.create_connection(("127.0.0.1", side.ports["api"]), timeout=10)
        local_port = raw.getsockname()[1]
        try:
            with ctx.wrap_socket(raw, session=session) as second:
                assert not second.session_reused
                second.sendall(b"resume?")
                assert second.recv(10) == b""
        except OSError:
            pass
        assert denial(side, local_port)["detail"] == f"no bundle for trust domain {PARTNER}; this sidecar trusts {TD}"
    finally:
        side.stop()
        app.close()
