"""Hot reload with real processes: SIGHUP and file changes, all-or-nothing, policy applied to open connections."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys

import pytest
from support.ca_cli import issue, run_ca
from support.certs import FRONTEND, TD, WEB
from support.network import App, tls_client, tls_connection
from support.polling import wait_until
from support.processes import Sidecar, denial, identity_yaml

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def ca(tmp_path_factory):
    root = tmp_path_factory.mktemp("reload-pki")
    ca_dir = root / "ca"
    run_ca("init", "--trust-domain", TD, ca_dir=ca_dir)
    return root, ca_dir


def fresh(ca, name, spiffe_id):
    root, ca_dir = ca
    out = root / f"{name}-{os.urandom(4).hex()}"
    return issue(ca_dir, out, spiffe_id)


def replace_atomically(path, data: bytes):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def api_config(ident_dir, app_port, allow, crl=None):
    return identity_yaml(ident_dir, crl) + (
        f"inbound:\n  - name: api\n    listen: 127.0.0.1:0\n    forward: 127.0.0.1:{app_port}\n"
        f"    allow: [{', '.join(allow)}]\n"
    )


@pytest.fixture
def api(ca, tmp_path):
    """An api sidecar whose identity files live in a directory the test may rewrite."""
    ident = tmp_path / "identity"
    shutil.copytree(fresh(ca, "api", f"spiffe://{TD}/ns/prod/sa/api"), ident)
    app = App()
    side = Sidecar(tmp_path, "api", api_config(ident, app.port, [FRONTEND, WEB])).wait_ready()
    yield side, ident, app
    side.stop()
    app.close()


def reload_events(side, kind):
    return side.count(lambda e: e["event"] == kind)


def test_sighup_reloads_a_new_certificate_for_new_connections(ca, api):
    side, ident, _ = api
    new = fresh(ca, "api", f"spiffe://{TD}/ns/prod/sa/api")
    replace_atomically(ident / "key.pem", (new / "key.pem").read_bytes())
    replace_atomically(ident / "cert.pem", (new / "cert.pem").read_bytes())
    side.signal(signal.SIGHUP)
    side.wait_event(lambda e: e["event"] == "reloaded")
    frontend = fresh(ca, "frontend", FRONTEND)
    assert tls_client(frontend, side.ports["api"], b"new cert")[1] == "data b'new cert'"


@pytest.mark.parametrize("damage", ["empty cert file", "key that does not match", "half-written PEM"])
def test_failed_reload_keeps_the_old_identity_serving(ca, api, damage):
    side, ident, _ = api
    if damage == "empty cert file":
        (ident / "cert.pem").write_bytes(b"")
    elif damage == "key that does not match":
        other = fresh(ca, "other", f"spiffe://{TD}/ns/prod/sa/other")
        (ident / "key.pem").write_bytes((other / "key.pem").read_bytes())
    else:
        data = (ident / "cert.pem").read_bytes()
        (ident / "cert.pem").write_bytes(data[: len(data) // 2])
    failed = side.wait_event(lambda e: e["event"] == "reload_failed", what="reload_failed")
    assert "file change" in failed["trigger"]
    assert str(ident) in failed["detail"]
    frontend = fresh(ca, "frontend", FRONTEND)
    assert tls_client(frontend, side.ports["api"], b"still me")[1] == "data b'still me'"


def test_kubernetes_style_symlink_swap_is_picked_up(ca, tmp_path):
    """Secret volumes: files are symlinks into ..data, which is itself a symlink swapped atomically."""
    volume = tmp_path / "volume"
    first = volume / "..2026_01"
    shutil.copytree(fresh(ca, "api", f"spiffe://{TD}/ns/prod/sa/api"), first)
    (volume / "..data").symlink_to(first.name)
    for name in ("cert.pem", "key.pem", "bundle.pem"):
        (volume / name).symlink_to(f"..data/{name}")
    app = App()
    side = Sidecar(tmp_path, "k8s", api_config(volume, app.port, [FRONTEND])).wait_ready()
    try:
        second = volume / "..2026_02"
        shutil.copytree(fresh(ca, "api", f"spiffe://{TD}/ns/prod/sa/api"), second)
        (volume / "..data_tmp").symlink_to(second.name)
        os.replace(volume / "..data_tmp", volume / "..data")
        event = side.wait_event(lambda e: e["event"] == "reloaded", timeout=5, what="reload after symlink swap")
        assert "file change" in event["trigger"]
    finally:
        side.stop()
        app.close()


def test_open_connection_streams_through_twenty_rotations_without_losing_a_byte(ca, api):
    side, ident, _ = api
    frontend = fresh(ca, "frontend", FRONTEND)
    conn = tls_connection(frontend, side.ports["api"])
    received = bytearray()
    sent = bytearray()

    # One thread reads and writes the TLS socket (an ssl.SSLSocket must not be used from two threads at
    # once). Each chunk is still on its way through the sidecar and the app while the reload happens:
    # its echo is read only after the sidecar has reloaded.
    for rotation in range(20):
        chunk = bytes([rotation]) * 50_000
        conn.sendall(chunk)
        sent += chunk
        new = fresh(ca, "api", f"spiffe://{TD}/ns/prod/sa/api")
        replace_atomically(ident / "key.pem", (new / "key.pem").read_bytes())
        replace_atomically(ident / "cert.pem", (new / "cert.pem").read_bytes())
        side.signal(signal.SIGHUP)
        wait_until(lambda: reload_events(side, "reloaded") >= rotation + 1, what=f"rotation {rotation + 1}")
        while len(received) < len(sent):
            data = conn.recv(65536)
            assert data, f"connection closed after {len(received)} of {len(sent)} bytes"
            received += data
    conn.sendall(b"end")
    sent += b"end"
    while len(received) < len(sent):
        received += conn.recv(65536)
    conn.close()
    assert bytes(received) == bytes(sent)


def test_policy_change_closes_connections_no_longer_allowed_and_keeps_the_rest(ca, api):
    side, ident, app = api
    frontend = tls_connection(fresh(ca, "frontend", FRONTEND), side.ports["api"])
    web = tls_connection(fresh(ca, "web", WEB), side.ports["api"])
    for conn in (frontend, web):
        conn.sendall(b"hi")
        assert conn.recv(10) == b"hi"
    side.config_path.write_text(api_config(ident, app.port, [FRONTEND]))
    event = side.wait_event(lambda e: e["event"] == "conn_closed" and e.get("reason") == "policy_revoked")
    assert event["peer_id"] == WEB
    assert "policy changed" in event["detail"]
    with pytest.raises((ConnectionError, OSError)):
        web.sendall(b"more")
        if web.recv(10) == b"":
            raise ConnectionError("closed")
    frontend.sendall(b"still allowed")
    assert frontend.recv(100) == b"still allowed"
    frontend.close()
    web.close()


def test_revocation_reaching_the_sidecar_cuts_open_connections_and_new_handshakes(ca, tmp_path):
    root, ca_dir = ca
    ident = tmp_path / "identity"
    shutil.copytree(fresh(ca, "api", f"spiffe://{TD}/ns/prod/sa/api"), ident)
    crl_path = tmp_path / "crl.pem"
    run_ca("crl", "--out", str(crl_path), ca_dir=ca_dir)
    victim_id = f"spiffe://{TD}/ns/prod/sa/victim-{os.urandom(3).hex()}"
    victim = fresh(ca, "victim", victim_id)
    app = App()
    side = Sidecar(tmp_path, "crl", api_config(ident, app.port, [f"spiffe://{TD}/ns/prod/*"], crl=crl_path))
    side.wait_ready()
    try:
        conn = tls_connection(victim, side.ports["api"])
        conn.sendall(b"before")
        assert conn.recv(10) == b"before"
        run_ca("revoke", victim_id, "--reason", "keyCompromise", ca_dir=ca_dir)
        fresh_crl = tmp_path / "crl.new"
        run_ca("crl", "--out", str(fresh_crl), ca_dir=ca_dir)
        os.replace(fresh_crl, crl_path)  # "the CRL reaches the sidecar": a file copy
        event = side.wait_event(lambda e: e.get("reason") == "policy_revoked", timeout=2.5, what="cut within 2 s")
        assert event["peer_id"] == victim_id and "CRL" in event["detail"]
        local_port, _ = tls_client(victim, side.ports["api"])
        assert denial(side, local_port)["reason"] == "revoked"
        conn.close()
    finally:
        side.stop()
        app.close()


def test_reload_failure_is_counted_and_named_and_nothing_changes(ca, api):
    side, ident, app = api
    side.config_path.write_text(api_config(ident, app.port, ["spiffe://Example.org/x"]))
    failed = side.wait_event(lambda e: e["event"] == "reload_failed")
    assert "inbound[0].allow[0]" in failed["detail"]
    frontend = fresh(ca, "frontend", FRONTEND)
    assert tls_client(frontend, side.ports["api"], b"old policy")[1] == "data b'old policy'"


def test_a_config_nested_past_the_limit_is_refused_by_check_and_by_a_running_sidecar(ca, api):
    """Composing YAML recurses once per level (on the C stack, with libyaml): a config nested 100,000
    levels deep is refused in one line before that, and the sidecar keeps its last good config."""
    side, ident, app = api
    frontend = tls_connection(fresh(ca, "frontend", FRONTEND), side.ports["api"])
    frontend.sendall(b"before")
    assert frontend.recv(10) == b"before"
    deep = "[" * 100_000 + "]" * 100_000
    side.config_path.write_text(api_config(ident, app.port, [FRONTEND]) + f"log: {deep}\n")

    failed = side.wait_event(lambda e: e["event"] == "reload_failed", what="reload_failed")
    check = subprocess.run([sys.executable, "-m", "proxy", "check", "-c", str(side.config_path)],
                           capture_output=True, text=True, timeout=60)

    line = len(api_config(ident, app.port, [FRONTEND]).splitlines()) + 1
    problem = f"{side.config_path}:{line}: YAML syntax error: "  # our limit or libyaml's, whichever comes first
    assert failed["detail"].startswith(problem) and "nest" in failed["detail"] and "\n" not in failed["detail"]
    assert check.returncode == 1 and check.stderr.splitlines()[0] == failed["detail"], check.stderr
    web = fresh(ca, "web", WEB)  # the new config would refuse it: still the old one
    assert tls_client(web, side.ports["api"], b"old config")[1] == "data b'old config'"
    frontend.sendall(b"after")
    assert frontend.recv(10) == b"after"
    frontend.close()
