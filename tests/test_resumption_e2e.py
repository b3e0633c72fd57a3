"""TLS 1.3 session resumption between our sidecars: faster, and never a way around a check."""

from __future__ import annotations

import socket
import ssl

import pytest
from support.certs import API, FRONTEND
from support.network import App, echo_through, recv_exactly
from support.polling import wait_until
from support.processes import Sidecar, denial, identity_yaml

pytestmark = pytest.mark.e2e

RESUME = "tls: {session_resumption: true, session_lifetime: 10m}\n"


def inbound(ids, app_port, allow_b=("spiffe://example.org/ns/other/*",)):
    return identity_yaml(ids["api"]) + (
        f"inbound:\n  - name: a\n    listen: 127.0.0.1:0\n    forward: 127.0.0.1:{app_port}\n    allow: [{FRONTEND}]\n"
        f"  - name: b\n    listen: 127.0.0.1:0\n    forward: 127.0.0.1:{app_port}\n    allow: [{', '.join(allow_b)}]\n"
        + RESUME
    )


def resumed_allowed(side) -> int:
    return side.count(lambda e: e["event"] == "conn_allowed" and "resumed TLS session" in (e.get("detail") or ""))


def outbound_to(tmp_path, ids, api):
    return Sidecar(tmp_path, "web", identity_yaml(ids["frontend"]) + (
        f"outbound:\n  - name: api\n    listen: 127.0.0.1:0\n    connect: 127.0.0.1:{api.ports['a']}\n"
        f"    expect: [{API}]\n" + RESUME)).wait_ready()


def test_sidecars_resume_sessions_and_a_reload_forces_a_full_handshake(ids, tmp_path):
    app = App()
    api = Sidecar(tmp_path, "api", inbound(ids, app.port)).wait_ready()
    web = outbound_to(tmp_path, ids, api)
    try:
        for i in range(5):
            assert echo_through(web.ports["api"], b"call %d" % i) == b"call %d" % i
        wait_until(lambda: api.count(lambda e: e["event"] == "conn_allowed") == 5, what="five decisions")
        assert resumed_allowed(api) == 4  # the first connection is a full handshake, the rest resume
        assert resumed_allowed(web) == 4
        api.config_path.write_text(api.config_path.read_text() + "\n")  # any reload invalidates tickets
        api.wait_event(lambda e: e["event"] == "reloaded")
        assert echo_through(web.ports["api"], b"after reload") == b"after reload"
        wait_until(lambda: api.count(lambda e: e["event"] == "conn_allowed") == 6, what="sixth decision")
        assert resumed_allowed(api) == 4
    finally:
        web.stop()
        api.stop()
        app.close()


def test_a_pooled_connection_shares_its_session_while_it_stays_open(ids, tmp_path):
    """web keeps the session when api's ticket arrives, not when the connection ends: a second
    connection resumes while the first (a pool's long-lived one) is still open and in use."""
    app = App()
    api = Sidecar(tmp_path, "api", inbound(ids, app.port)).wait_ready()
    web = outbound_to(tmp_path, ids, api)
    try:
        with socket.create_connection(("127.0.0.1", web.ports["api"]), timeout=10) as pooled:
            pooled.sendall(b"first")
            assert recv_exactly(pooled, 5) == b"first"  # api's tickets came before this echo
            assert echo_through(web.ports["api"], b"second") == b"second"
            wait_until(lambda: api.count(lambda e: e["event"] == "conn_allowed") == 2, what="two decisions")
            assert resumed_allowed(api) == 1
            assert resumed_allowed(web) == 1
            pooled.sendall(b"still open")
            assert recv_exactly(pooled, 10) == b"still open"
            wait_until(lambda: web.count(lambda e: e["event"] == "conn_closed") == 1, what="the second's close")
    finally:
        web.stop()
        api.stop()
        app.close()


def test_policy_is_checked_again_on_a_resumed_connection(ids, tmp_path):
    """A ticket from port a (which allows frontend) presented on port b (which does not) is refused."""
    app = App()
    api = Sidecar(tmp_path, "api", inbound(ids, app.port)).wait_ready()
    try:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        ctx.load_cert_chain(ids["frontend"] / "cert.pem", ids["frontend"] / "key.pem")
        with ctx.wrap_socket(socket.create_connection(("127.0.0.1", api.ports["a"]), timeout=10)) as first:
            first.sendall(b"hello")
            assert first.recv(10) == b"hello"  # tickets arrive before the echo
            session = first.session
        raw = socket.create_connection(("127.0.0.1", api.ports["b"]), timeout=10)
        local_port = raw.getsockname()[1]
        try:
            with ctx.wrap_socket(raw, session=session) as second:
                assert second.session_reused
                second.sendall(b"sneak in")
                assert second.recv(10) == b""
        except OSError:
            pass
        event = denial(api, local_port)
        assert event["reason"] == "identity_not_allowed"
        assert event["detail"].startswith("resumed session: port b allows")
    finally:
        api.stop()
        app.close()
