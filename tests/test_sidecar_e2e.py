"""End to end: real `ca` identities, real `proxy run` processes, real sockets on loopback."""

from __future__ import annotations

import signal
import socket
import ssl
import threading

import pytest
from cryptography.x509.oid import ExtendedKeyUsageOID
from support.ca_cli import issue, run_ca
from support.certs import API, DAY, FRONTEND, NOW, TD, Authority
from support.network import App, echo_through, refused_port, tls_client, tls_connection
from support.polling import wait_until
from support.processes import Sidecar, denial, identity_yaml

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def pki(pki, tmp_path_factory):
    """conftest's pki, plus a revoked identity with the CRL that says so, and for each side (clients,
    servers) identities whose certificate breaks one rule: signed by that CA's key or by one nobody trusts."""
    out = tmp_path_factory.mktemp("sidecar-pki")
    ca_dir = pki["ca_dir"]
    revoked = issue(ca_dir, out / "revoked", f"spiffe://{TD}/ns/prod/sa/revoked")
    run_ca("revoke", f"spiffe://{TD}/ns/prod/sa/revoked", ca_dir=ca_dir)
    crl = out / "crl.pem"
    run_ca("crl", "--out", str(crl), ca_dir=ca_dir)
    ours = Authority.from_state_dir(ca_dir)
    untrusted = Authority.create("Untrusted")

    def bad_leaf(name, spiffe_id, signer=ours, **rules):
        return signer.write_identity(out / "bad" / name, signer.issue(spiffe_id, **rules)).directory

    def matrix(name, wrong_eku):
        spiffe_id = f"spiffe://{TD}/ns/prod/sa/{name}"
        return {
            "other_trust_domain": bad_leaf(f"otd-{name}", f"spiffe://other.org/ns/prod/sa/{name}"),
            "untrusted_ca": bad_leaf(f"untrusted-{name}", spiffe_id, untrusted),
            "expired": bad_leaf(f"expired-{name}", spiffe_id, not_before=NOW - 2 * DAY, not_after=NOW - DAY),
            "not_yet_valid": bad_leaf(f"nyv-{name}", spiffe_id, not_before=NOW + DAY, not_after=NOW + 2 * DAY),
            "two_uri_sans": bad_leaf(f"two-{name}", spiffe_id, uris=(spiffe_id, f"spiffe://{TD}/ns/prod/sa/other")),
            "no_uri_san": bad_leaf(f"nouri-{name}", spiffe_id, uris=()),
            "ca_cert_as_leaf": bad_leaf(f"ca-{name}", spiffe_id, is_ca=True),
            "wrong_eku": bad_leaf(f"eku-{name}", spiffe_id, eku=wrong_eku),
        }

    return {
        **pki, "ids": {**pki["ids"], "revoked": revoked}, "crl": crl,
        "bad_clients": matrix("frontend", (ExtendedKeyUsageOID.SERVER_AUTH,)),
        "bad_servers": matrix("api", (ExtendedKeyUsageOID.CLIENT_AUTH,)),
    }


def inbound_yaml(ident, forward_port, *, allow=(FRONTEND,), crl=None, extra="", name="api"):
    return identity_yaml(ident, crl) + (
        f"inbound:\n  - name: {name}\n    listen: 127.0.0.1:0\n    forward: 127.0.0.1:{forward_port}\n"
        f"    allow: [{', '.join(allow)}]\n{extra}"
    )


def outbound_yaml(ident, targets: dict[str, int], *, expect=(API,), crl=None, extra=""):
    text = identity_yaml(ident, crl) + "outbound:\n"
    for name, port in targets.items():
        text += (f"  - name: {name}\n    listen: 127.0.0.1:0\n    connect: 127.0.0.1:{port}\n"
                 f"    expect: [{', '.join(expect)}]\n")
    return text + extra


@pytest.fixture(scope="module")
def api_side(pki, tmp_path_factory):
    """The api pod: an echo app behind an inbound sidecar that allows only frontend, with the CRL."""
    app = App()
    side = Sidecar(tmp_path_factory.mktemp("api"), "api",
                   inbound_yaml(pki["ids"]["api"], app.port, crl=pki["crl"])).wait_ready()
    yield app, side
    side.stop()
    app.close()


@pytest.fixture(scope="module")
def frontend_side(pki, api_side, tmp_path_factory):
    side = Sidecar(tmp_path_factory.mktemp("frontend"), "frontend",
                   outbound_yaml(pki["ids"]["frontend"], {"api": api_side[1].ports["api"]})).wait_ready()
    yield side
    side.stop()


# --- allowed traffic ---------------------------------------------------------------------------


def test_frontend_reaches_api_app_through_both_sidecars(api_side, frontend_side):
    assert echo_through(frontend_side.ports["api"], b"hello api") == b"hello api"
    allowed = api_side[1].wait_event(lambda e: e["event"] == "conn_allowed")
    assert allowed["peer_id"] == FRONTEND and allowed["direction"] == "inbound"
    closed = api_side[1].wait_event(lambda e: e["event"] == "conn_closed" and e["bytes_in"] == 9)
    assert closed["bytes_out"] == 9 and closed["listener"] == "api"


def test_half_close_forwards_eof_and_the_reply_still_flows_back(frontend_side):
    payload = bytes(range(256)) * 8192  # 2 MiB, several scratch buffers' worth
    assert echo_through(frontend_side.ports["api"], payload, timeout=30) == payload


def test_outbound_logs_the_alert_when_the_server_refuses_our_identity(pki, api_side, tmp_path):
    side = Sidecar(tmp_path, "intruder", outbound_yaml(pki["ids"]["intruder"], {"api": api_side[1].ports["api"]}))
    side.wait_ready()
    try:
        accepted_before = api_side[0].accepted
        try:
            echo_through(side.ports["api"], b"let me in")
        except OSError:
            pass
        event = side.wait_event(lambda e: e["event"] == "conn_closed" and e.get("reason"))
        assert event["reason"] == "handshake_failed"
        assert event["detail"] == "remote refused us: alert handshake_failure"
        denied = api_side[1].wait_event(lambda e: e.get("peer_id") == f"spiffe://{TD}/ns/prod/sa/intruder")
        assert denied["reason"] == "identity_not_allowed"
        assert "port api allows spiffe://example.org/ns/prod/sa/frontend" in denied["detail"]
        assert api_side[0].accepted == accepted_before
    finally:
        side.stop()


# --- inbound refusal matrix ----------------------------------------------------------------------

INBOUND_CASES = {
    "unlisted_id": "identity_not_allowed",
    "other_trust_domain": "identity_not_allowed",
    "untrusted_ca": "untrusted_ca",
    "expired": "expired",
    "not_yet_valid": "not_yet_valid",
    "revoked": "revoked",
    "two_uri_sans": "not_svid",
    "no_uri_san": "not_svid",
    "ca_cert_as_leaf": "not_svid",
    "wrong_eku": "not_svid",
}


@pytest.mark.parametrize("case", sorted(INBOUND_CASES))
def test_inbound_refuses_bad_client_certificate_before_touching_the_app(pki, api_side, case):
    app, side = api_side
    ident = {"unlisted_id": pki["ids"]["intruder"], "revoked": pki["ids"]["revoked"]}.get(case) \
        or pki["bad_clients"][case]
    before = app.accepted
    local_port, outcome = tls_client(ident, side.ports["api"])
    event = denial(side, local_port)
    assert event["reason"] == INBOUND_CASES[case], event
    assert event["detail"]
    assert outcome.startswith("error"), f"client should see a TLS alert or close, saw {outcome}"
    assert app.accepted == before, "a refused peer must not cause even a TCP connect to the app"


def test_inbound_refuses_client_without_certificate(api_side):
    app, side = api_side
    before = app.accepted
    local_port, outcome = tls_client(None, side.ports["api"])
    assert denial(side, local_port)["reason"] == "no_client_cert"
    assert "alert" in outcome or "CERTIFICATE_REQUIRED" in outcome.upper(), outcome
    assert app.accepted == before


def test_inbound_refuses_plain_tcp_client(api_side):
    app, side = api_side
    before = app.accepted
    with socket.create_connection(("127.0.0.1", side.ports["api"]), timeout=10) as s:
        local_port = s.getsockname()[1]
        s.sendall(b"GET / HTTP/1.1\r\nHost: api\r\n\r\n")
        try:
            while s.recv(4096):
                pass
        except OSError:
            pass
    assert denial(side, local_port)["reason"] == "handshake_failed"
    assert app.accepted == before


# --- outbound refusal matrix ---------------------------------------------------------------------

class FakeServer:
    """A TLS (or plain) server presenting a chosen certificate; records app bytes it receives."""

    def __init__(self, ident=None):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.received = 0
        self.ctx = None
        if ident is not None:
            self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self.ctx.load_cert_chain(ident / "cert.pem", ident / "key.pem")
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            try:
                conn.settimeout(10)
                if self.ctx is None:
                    conn.sendall(b"SSH-2.0-OpenSSH_9.0\r\n")
                    continue
                with self.ctx.wrap_socket(conn, server_side=True) as tls:
                    while data := tls.recv(65536):
                        self.received += len(data)
            except (OSError, ssl.SSLError):
                pass
            finally:
                conn.close()


OUTBOUND_CASES = {
    "unlisted_id": "server_identity_mismatch",
    "other_trust_domain": "server_identity_mismatch",
    "untrusted_ca": "untrusted_ca",
    "expired": "expired",
    "not_yet_valid": "not_yet_valid",
    "revoked": "revoked",
    "two_uri_sans": "not_svid",
    "no_uri_san": "not_svid",
    "ca_cert_as_leaf": "not_svid",
    "wrong_eku": "not_svid",
    "plain_tcp_server": "handshake_failed",
}


@pytest.fixture(scope="module")
def outbound_matrix(pki, tmp_path_factory):
    servers = {}
    for case in OUTBOUND_CASES:
        ident = {"unlisted_id": pki["ids"]["intruder"], "revoked": pki["ids"]["revoked"],
                 "plain_tcp_server": None}.get(case, pki["bad_servers"].get(case))
        servers[case] = FakeServer(ident)
    side = Sidecar(
        tmp_path_factory.mktemp("outbound"), "web",
        outbound_yaml(pki["ids"]["frontend"], {c.replace("_", "-"): s.port for c, s in servers.items()},
                      crl=pki["crl"]),
    ).wait_ready()
    yield servers, side
    side.stop()


@pytest.mark.parametrize("case", sorted(OUTBOUND_CASES))
def test_outbound_refuses_bad_server_and_sends_no_app_byte(outbound_matrix, case):
    servers, side = outbound_matrix
    name = case.replace("_", "-")
    try:
        with socket.create_connection(("127.0.0.1", side.ports[name]), timeout=10) as s:
            s.sendall(b"app secret that must not leave")
            while s.recv(4096):
                pass
    except OSError:
        pass  # a reset is a fine way to be told no
    event = side.wait_event(lambda e: e["event"] == "conn_denied" and e["listener"] == name)
    assert event["reason"] == OUTBOUND_CASES[case], event
    assert servers[case].received == 0
    if case == "unlisted_id":
        assert API in event["detail"] and "sa/intruder" in event["detail"]


# --- timeouts, limits, resources, signals ------------------------------------------------------


def test_slowloris_is_cut_at_handshake_timeout_while_good_client_is_served(pki, tmp_path):
    app = App()
    side = Sidecar(tmp_path, "slow", inbound_yaml(pki["ids"]["api"], app.port,
                                                  extra="timeouts: {handshake: 1s}\n")).wait_ready()
    try:
        silent = socket.create_connection(("127.0.0.1", side.ports["api"]))
        trickle = socket.create_connection(("127.0.0.1", side.ports["api"]))
        trickle.sendall(b"\x16")  # the first byte of a ClientHello record, then nothing
        local_port, outcome = tls_client(pki["ids"]["frontend"], side.ports["api"], b"good")
        assert outcome == "data b'good'"
        for s in (silent, trickle):
            event = denial(side, s.getsockname()[1])
            assert event["reason"] == "handshake_timeout"
            assert event["duration_s"] >= 1.0
            s.close()
    finally:
        side.stop()
        app.close()


def test_connection_limit_refuses_new_connections_and_keeps_open_ones(pki, tmp_path):
    app = App()
    side = Sidecar(tmp_path, "limit", inbound_yaml(pki["ids"]["api"], app.port,
                                                   extra="limits: {max_connections: 2}\n")).wait_ready()
    held = []
    try:
        for _ in range(2):
            s = tls_connection(pki["ids"]["frontend"], side.ports["api"])
            s.sendall(b"x")
            assert s.recv(1) == b"x"
            held.append(s)
        local_port, _ = tls_client(pki["ids"]["frontend"], side.ports["api"])
        event = denial(side, local_port)
        assert event["reason"] == "connection_limit"
        for s in held:
            s.sendall(b"still here")
            assert s.recv(100) == b"still here"
    finally:
        for s in held:
            s.close()
        side.stop()
        app.close()


def test_descriptors_return_to_baseline_after_thousands_of_aborted_connections(pki, tmp_path):
    app = App()
    side = Sidecar(tmp_path, "fds", inbound_yaml(pki["ids"]["api"], app.port)).wait_ready()
    try:
        baseline = side.fd_count()
        for _ in range(2000):
            s = socket.create_connection(("127.0.0.1", side.ports["api"]))
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            s.close()
        wait_until(lambda: side.fd_count() <= baseline, what=f"fd count back to {baseline}")
        assert tls_client(pki["ids"]["frontend"], side.ports["api"], b"alive")[1] == "data b'alive'"
    finally:
        side.stop()
        app.close()


def test_sigterm_drains_open_connections_then_exits_zero(pki, tmp_path):
    app = App()
    side = Sidecar(tmp_path, "drain", inbound_yaml(pki["ids"]["api"], app.port,
                                                   extra="timeouts: {drain: 20s}\n")).wait_ready()
    conn = tls_connection(pki["ids"]["frontend"], side.ports["api"])
    conn.sendall(b"before")
    assert conn.recv(100) == b"before"
    side.signal(signal.SIGTERM)
    side.wait_event(lambda e: e["event"] == "draining")
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", side.ports["api"]), timeout=5).close()
    conn.sendall(b"during drain")
    assert conn.recv(100) == b"during drain"
    conn.close()
    assert side.proc.wait(15) == 0
    side.stop()
    app.close()


def test_connection_still_open_at_the_drain_deadline_is_closed_and_says_so(pki, tmp_path):
    app = App()
    side = Sidecar(tmp_path, "deadline", inbound_yaml(pki["ids"]["api"], app.port,
                                                      extra="timeouts: {drain: 1s}\n")).wait_ready()
    conn = tls_connection(pki["ids"]["frontend"], side.ports["api"])
    try:
        conn.sendall(b"held")
        assert conn.recv(100) == b"held"
        side.signal(signal.SIGTERM)
        assert side.proc.wait(15) == 0
        closed = side.wait_event(lambda e: e["event"] == "conn_closed")
        assert closed["detail"] == "drain timeout reached" and closed["reason"] is None
        assert closed["duration_s"] >= 1.0
    finally:
        conn.close()
        side.stop()
        app.close()


def test_upstream_unreachable_is_logged_and_client_sees_a_close(pki, tmp_path):
    holder, port = refused_port()
    side = Sidecar(tmp_path, "down", inbound_yaml(pki["ids"]["api"], port)).wait_ready()
    try:
        local_port, outcome = tls_client(pki["ids"]["frontend"], side.ports["api"])
        event = denial(side, local_port)
        assert event["reason"] == "upstream_unreachable"
        assert f"127.0.0.1:{port}" in event["detail"]
        assert outcome.startswith("error") or outcome == "data b''"
    finally:
        side.stop()
        holder.close()


def test_idle_connection_is_closed_at_idle_timeout(pki, tmp_path):
    app = App()
    side = Sidecar(tmp_path, "idle", inbound_yaml(pki["ids"]["api"], app.port,
                                                  extra="timeouts: {idle: 1s}\n")).wait_ready()
    try:
        conn = tls_connection(pki["ids"]["frontend"], side.ports["api"])
        conn.sendall(b"once")
        assert conn.recv(100) == b"once"
        event = side.wait_event(lambda e: e["event"] == "conn_closed" and e.get("reason") == "idle_timeout")
        assert event["peer_id"] == FRONTEND
        assert conn.recv(100) == b""  # the sidecar closed it
        conn.close()
    finally:
        side.stop()
        app.close()


def test_run_with_bad_config_exits_2_and_lists_every_problem(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text(
        "identity:\n  cert: /nonexistent/cert.pem\n  key: /nonexistent/key.pem\n  bundle: /nonexistent/b.pem\n"
        "inbound:\n  - name: api\n    listen: 127.0.0.1:0\n    forward: 127.0.0.1:1\n"
        "    allow: ['spiffe://Example.org/x']\n    colour: blue\n"
    )
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "proxy", "run", "-c", str(config)],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert "inbound[0].allow[0]" in proc.stderr and "lower-case" in proc.stderr
    assert "colour" in proc.stderr
