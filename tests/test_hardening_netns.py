"""Hardening across real network namespaces: three pods on a bridge, each app bound to its own loopback.

Topology (all inside namespaces this module creates and deletes; nothing touches the host's network):

    hub:  bridge br0  ── veth ── web       10.200.0.2   app on 127.0.0.1:8080, sidecar outbound 127.0.0.1:9001
                      ── veth ── api       10.200.0.3   app on 127.0.0.1:8080, sidecar inbound 0.0.0.0:8443
                      ── veth ── intruder  10.200.0.4   a sidecar with a valid identity that api does not allow

Sidecars run as `ip netns exec NS python -m proxy run`; the test's own sockets join a namespace from a
thread (support.network.in_netns), so the test process itself never leaves the host namespace.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess

import pytest
from support.ca_cli import issue, run_ca
from support.certs import API, TD, WEB
from support.network import (
    App,
    bridged_namespaces,
    client_context,
    in_netns,
    plain_attempt,
    read_until_closed,
)
from support.polling import wait_until
from support.processes import Sidecar, denial, inbound_config, outbound_config

pytestmark = pytest.mark.e2e

INTRUDER = f"spiffe://{TD}/ns/prod/sa/intruder"
ADDRESSES = {"web": "10.200.0.2", "api": "10.200.0.3", "intruder": "10.200.0.4"}
APP_PORT, INBOUND_PORT, OUTBOUND_PORT = 8080, 8443, 9001


def _listen_loopback(port: int) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(64)
    return sock


def _connect(host: str, port: int) -> socket.socket:
    return socket.create_connection((host, port), timeout=5)


def _connect_error(ns: str, host: str, port: int) -> str:
    """How a plain TCP connect from ``ns`` to ``host:port`` ends: "connected" or the error's name."""
    def attempt():
        try:
            _connect(host, port).close()
            return "connected"
        except OSError as exc:
            return type(exc).__name__
    return in_netns(ns, attempt)


class Pods:
    """The namespaces, apps and sidecars of this module; ``close`` removes all of it."""

    def __init__(self, root):
        self.root = root
        tag = f"{os.getpid()}"
        self.ns = {name: f"mtls-{name}-{tag}" for name in ("hub", *ADDRESSES)}
        self.created: list[str] = []
        self.sidecars: dict[str, Sidecar] = {}
        self.apps: dict[str, App] = {}
        self.ids = {}

    def build_network(self) -> None:
        bridged_namespaces(self.ns, {pod: (f"{address}/24",) for pod, address in ADDRESSES.items()}, self.created)

    def start_sidecar(self, pod: str, name: str, config: str) -> Sidecar:
        side = Sidecar(self.root / pod, name, config, prefix=("ip", "netns", "exec", self.ns[pod]))
        self.sidecars[name] = side
        return side.wait_ready()

    def api_config(self) -> str:
        return inbound_config(self.ids["api"], f"127.0.0.1:{APP_PORT}", [WEB],
                              listen=f"0.0.0.0:{INBOUND_PORT}", extra="timeouts: {handshake: 5s}\n")

    def close(self) -> None:
        for side in self.sidecars.values():
            try:
                side.stop(timeout=10)
            except Exception:  # keep cleaning up
                pass
        for app in self.apps.values():
            app.close()
        for ns in reversed(self.created):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


@pytest.fixture(scope="module")
def pods(tmp_path_factory):
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("network namespaces need root and iproute2's `ip` (apt package iproute2)")
    root = tmp_path_factory.mktemp("pods")
    pods = Pods(root)
    try:
        try:
            pods.build_network()
        except RuntimeError as exc:
            if not pods.created:
                pytest.skip(f"cannot create network namespaces here: {exc}")
            raise
        ca_dir = root / "ca"
        run_ca("init", "--trust-domain", TD, ca_dir=ca_dir)
        pods.ids = {pod: issue(ca_dir, root / f"id-{pod}", f"spiffe://{TD}/ns/prod/sa/{pod}") for pod in ADDRESSES}
        for pod in ("web", "api"):
            pods.apps[pod] = App(in_netns(pods.ns[pod], _listen_loopback, APP_PORT))
        api_inbound = f"{ADDRESSES['api']}:{INBOUND_PORT}"
        pods.start_sidecar("api", "api", pods.api_config())
        pods.start_sidecar("web", "web", outbound_config(
            pods.ids["web"], {"api": api_inbound}, [API], listen=f"127.0.0.1:{OUTBOUND_PORT}"))
        pods.start_sidecar("intruder", "intruder", outbound_config(
            pods.ids["intruder"], {"api": api_inbound}, [API], listen=f"127.0.0.1:{OUTBOUND_PORT}"))
        yield pods
    finally:
        pods.close()


def _exchange(sock: socket.socket, payload: bytes) -> bytes:
    sock.sendall(payload)
    got = b""
    while len(got) < len(payload):
        data = sock.recv(65536)
        if not data:
            break
        got += data
    return got


def test_web_app_reaches_api_app_through_both_sidecars_across_namespaces(pods):
    before = pods.apps["api"].accepted
    conn = in_netns(pods.ns["web"], _connect, "127.0.0.1", OUTBOUND_PORT)
    with conn:
        assert _exchange(conn, b"hello api, from web") == b"hello api, from web"
    allowed = pods.sidecars["api"].wait_event(
        lambda e: e["event"] == "conn_allowed" and e["peer_id"] == WEB)
    assert allowed["peer_addr"].startswith(ADDRESSES["web"] + ":"), "the call crossed the bridge from web's address"
    assert pods.apps["api"].accepted == before + 1


def test_intruder_cannot_reach_either_app_directly(pods):
    intruder = pods.ns["intruder"]
    # Positive control: the network works, the api sidecar's port is reachable from the intruder pod...
    assert _connect_error(intruder, ADDRESSES["api"], INBOUND_PORT) == "connected"
    # ...but the apps listen on their own loopback only, and web's outbound port is loopback-only too.
    assert _connect_error(intruder, ADDRESSES["api"], APP_PORT) == "ConnectionRefusedError"
    assert _connect_error(intruder, ADDRESSES["web"], APP_PORT) == "ConnectionRefusedError"
    assert _connect_error(intruder, ADDRESSES["web"], OUTBOUND_PORT) == "ConnectionRefusedError"


def test_intruder_with_a_valid_but_unlisted_identity_is_refused_by_api_sidecar(pods):
    api_side, intruder_side = pods.sidecars["api"], pods.sidecars["intruder"]
    before = pods.apps["api"].accepted
    local_port, got, how = in_netns(pods.ns["intruder"], plain_attempt, OUTBOUND_PORT, b"let me in")
    assert got == b"" and how != "timeout"
    denied = api_side.wait_event(lambda e: e["event"] == "conn_denied" and e.get("peer_id") == INTRUDER)
    assert denied["reason"] == "identity_not_allowed"
    assert denied["peer_addr"].startswith(ADDRESSES["intruder"] + ":")
    assert WEB in denied["detail"] and INTRUDER in denied["detail"]
    # In TLS 1.3 the client's handshake ends before the server has judged its certificate, so the
    # intruder's sidecar logs the refusal when the alert arrives, as its connection's closing line.
    app_addr = f"127.0.0.1:{local_port}"  # outbound: the app's end; peer_addr is api's sidecar
    refused = intruder_side.wait_event(
        lambda e: e["event"] in ("conn_denied", "conn_closed") and e.get("app_addr") == app_addr)
    assert refused["peer_addr"].startswith(ADDRESSES["api"] + ":")
    assert refused["reason"] == "handshake_failed"
    assert refused["detail"] == "remote refused us: alert handshake_failure"
    assert pods.apps["api"].accepted == before, "not even a TCP connect reached api's app"


def test_intruder_without_a_certificate_is_refused_by_api_sidecar(pods):
    before = pods.apps["api"].accepted
    local_port, outcome = in_netns(pods.ns["intruder"], _tls_from, ADDRESSES["api"], INBOUND_PORT)
    assert outcome.startswith("error") and "certificate required" in outcome.lower(), outcome
    event = denial(pods.sidecars["api"], local_port, host=ADDRESSES["intruder"])
    assert event["reason"] == "no_client_cert"
    assert pods.apps["api"].accepted == before


def _tls_from(host: str, port: int) -> tuple[int, str]:
    import ssl

    raw = socket.create_connection((host, port), timeout=10)
    local_port = raw.getsockname()[1]
    try:
        with client_context(None).wrap_socket(raw) as tls:
            tls.sendall(b"hello")
            return local_port, f"data {tls.recv(100)!r}"
    except (ssl.SSLError, OSError) as exc:
        return local_port, f"error {exc}"
    finally:
        raw.close()


def test_killing_api_sidecar_mid_stream_closes_web_app_connection_and_a_restarted_sidecar_serves(pods):
    web_side = pods.sidecars["web"]
    conn = in_netns(pods.ns["web"], _connect, "127.0.0.1", OUTBOUND_PORT)
    local_port = conn.getsockname()[1]
    with conn:
        assert _exchange(conn, b"before the crash") == b"before the crash"
        old = pods.sidecars.pop("api")
        old.proc.send_signal(signal.SIGKILL)  # a node failing, not a graceful stop
        old.proc.wait(10)
        old.stop()
        got, how = read_until_closed(conn, 10)
    assert how in ("eof", "reset"), f"web's app must see its connection closed, not left hanging ({how})"
    assert got == b""
    app_addr = f"127.0.0.1:{local_port}"  # outbound: the app's end
    event = web_side.wait_event(lambda e: e["event"] == "conn_closed" and e.get("app_addr") == app_addr)
    assert event["bytes_in"] == len(b"before the crash")
    assert event["detail"] and "tls side" in event["detail"], f"web's sidecar must say why: {event}"

    restarted = pods.start_sidecar("api", "api-restarted", pods.api_config())
    conn = wait_until(lambda: _try_connect_and_exchange(pods), 20, "web to reach api through the restarted sidecar")
    assert conn == b"after the restart"
    restarted.wait_event(lambda e: e["event"] == "conn_allowed" and e["peer_id"] == WEB)
    assert web_side.proc.poll() is None


def _try_connect_and_exchange(pods) -> bytes | None:
    conn = in_netns(pods.ns["web"], _connect, "127.0.0.1", OUTBOUND_PORT)
    with conn:
        try:
            got = _exchange(conn, b"after the restart")
        except OSError:
            return None
    return got or None
