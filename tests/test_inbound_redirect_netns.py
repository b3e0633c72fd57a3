"""Inbound redirection (`proxy redirect --inbound`) with real kernel rules, in network namespaces this
module creates and deletes; once with nftables, once with iptables.

Topology (nothing touches the host's network):

    hub: bridge br0 ── veth ── app     10.76.0.2, fd76::2  an app listening on 0.0.0.0:8080 (and one on
                                                           [::]:8080, IPv6 only), the sidecar in front:
                                                           inbound "web" 0.0.0.0:8443 -> 127.0.0.1:8080,
                                                           `proxy redirect --apply --egress --inbound`
                    ── veth ── client  10.76.0.3, fd76::3  plaintext and mTLS clients

Without the rules a client reaches the app's port directly, in plaintext. With them, TCP arriving at
the app's port from outside meets the sidecar's TLS listener; the sidecar's own forward to
127.0.0.1:8080 is created locally and reaches the app. The listener is IPv4, so IPv6 to the app's
port is refused. Egress rules sit in the same tables (the sidecar runs as uid 0, the uid they exempt).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from support.ca_cli import issue
from support.certs import TD
from support.network import App, bridged_namespaces, client_context, in_netns, read_until_closed, tls_exchange
from support.processes import Sidecar, identity_yaml

pytestmark = pytest.mark.e2e

APP, CLIENT = "10.76.0.2", "10.76.0.3"
APP6, CLIENT6 = "fd76::2", "fd76::3"
APP_PORT, LISTEN_PORT = 8080, 8443
FRONTEND = f"spiffe://{TD}/ns/prod/sa/frontend"
STRANGER = f"spiffe://{TD}/ns/prod/sa/stranger"
NFT, IPTABLES = "nft", "iptables"


def _listen(address: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if ":" in address:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # 0.0.0.0:8080 is the other app
    sock.bind((address, port))
    sock.listen(64)
    return sock


def _connect(host: str, port: int, source: str) -> socket.socket:
    """A TCP connection from ``source`` (bound first: the sidecar logs the client's address)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.settimeout(10)
    try:
        sock.bind((source, 0))
        sock.connect((host, port))
    except OSError:
        sock.close()
        raise
    return sock


class Pod:
    """The namespaces, the apps and the sidecar; ``close`` removes all of it."""

    def __init__(self, root: Path, backend: str):
        self.root = root
        self.backend = backend
        self.ns = {name: f"inbound-{name}-{os.getpid()}" for name in ("hub", "app", "client")}
        self.created: list[str] = []
        self.apps: list[App] = []
        self.sidecar: Sidecar | None = None

    def redirect(self, *args: str) -> subprocess.CompletedProcess:
        """`proxy redirect ARGS` in the app namespace."""
        return subprocess.run(
            ["ip", "netns", "exec", self.ns["app"], sys.executable, "-m", "proxy", "redirect", *args,
             "--backend", self.backend], capture_output=True, text=True, timeout=60)

    def apply(self) -> None:
        done = self.redirect("--apply", "--egress", "--inbound", "--uid", "0", "-c", str(self.sidecar.config_path))
        assert done.returncode == 0, done.stderr

    def rules(self) -> str:
        """Our rules in the app namespace, as the kernel lists them."""
        def listing(*argv: str) -> str:
            return subprocess.run(["ip", "netns", "exec", self.ns["app"], *argv],
                                  capture_output=True, text=True, timeout=30).stdout
        nft = "".join(listing("nft", "list", "table", family, "mtls_sidecar") for family in ("ip", "ip6"))
        saved = listing("iptables-save") + listing("ip6tables-save")
        return "\n".join(sorted([*nft.splitlines(), *(line for line in saved.splitlines() if "MTLS_SIDECAR" in line)]))

    def from_client(self, host: str, port: int = APP_PORT) -> socket.socket:
        return in_netns(self.ns["client"], _connect, host, port, CLIENT6 if ":" in host else CLIENT)

    def close(self) -> None:
        if self.sidecar is not None:
            try:
                self.sidecar.stop(timeout=10)
            except Exception:  # keep cleaning up
                pass
        for app in self.apps:
            app.close()
        for ns in reversed(self.created):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


@pytest.fixture(scope="module", params=[NFT, IPTABLES])
def pod(request, tmp_path_factory, pki):
    if os.geteuid() != 0:
        pytest.skip("network namespaces and packet redirection need root")
    needed = {NFT: ("ip", "nft"), IPTABLES: ("ip", "iptables", "ip6tables", "iptables-save")}[request.param]
    for tool in needed:
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is missing: .ci/run installs iproute2, nftables and iptables")
    root = tmp_path_factory.mktemp(f"inbound-{request.param}")
    pod = Pod(root, request.param)
    try:
        bridged_namespaces(pod.ns, {"app": (f"{APP}/24", f"{APP6}/64"), "client": (f"{CLIENT}/24", f"{CLIENT6}/64")},
                           pod.created)
        pod.ids = {name: issue(pki["ca_dir"], root / f"id-{name}", f"spiffe://{TD}/ns/prod/sa/{name}")
                   for name in ("web", "frontend", "stranger")}
        pod.app = App(in_netns(pod.ns["app"], _listen, "0.0.0.0", APP_PORT))
        pod.app6 = App(in_netns(pod.ns["app"], _listen, "::", APP_PORT))
        pod.apps += [pod.app, pod.app6]
        config = identity_yaml(pod.ids["web"]) + yaml.safe_dump({
            "inbound": [{"name": "web", "listen": f"0.0.0.0:{LISTEN_PORT}", "forward": f"127.0.0.1:{APP_PORT}",
                         "allow": [FRONTEND]}],
            "egress": {"listen": "127.0.0.1:15001", "allow": []},
            "timeouts": {"handshake": "3s"},
        })
        pod.sidecar = Sidecar(root / "web", "web", config, prefix=("ip", "netns", "exec", pod.ns["app"]))
        pod.sidecar.wait_ready()
        # Before the rules: the app's port is open to plaintext from outside, around the sidecar.
        assert _plaintext(pod, APP) == (b"ping", "eof") and pod.app.accepted == 1
        pod.apply()
        yield pod
    finally:
        pod.close()


def _plaintext(pod: Pod, host: str, payload: bytes = b"ping") -> tuple[bytes, str]:
    """Send ``payload`` in plaintext to the app's port from the client, half-close: (what came back, how it ended)."""
    with pod.from_client(host) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        return read_until_closed(sock, 10)


def _tls_refusal(got: bytes) -> bool:
    """What a TLS server answers to plaintext: nothing, or a TLS alert record (content type 21)."""
    return got == b"" or got[:3] == b"\x15\x03\x03"


def _mtls(pod: Pod, ident: str, payload: bytes = b"hello") -> tuple[int, str]:
    """An mTLS client presenting ``ident``, to the app's port from the client: (local port, what happened)."""
    sock = pod.from_client(APP)
    return sock.getsockname()[1], tls_exchange(client_context(pod.ids[ident]), sock, payload)


def _event(pod: Pod, name: str, local_port: int) -> dict:
    return pod.sidecar.wait_event(lambda e: e["event"] == name and e.get("peer_addr") == f"{CLIENT}:{local_port}",
                                  what=f"{name} of {CLIENT}:{local_port}")


def test_plaintext_to_the_app_port_meets_the_tls_listener_and_never_reaches_the_app(pod):
    before = pod.app.accepted
    sock = pod.from_client(APP)
    local_port = sock.getsockname()[1]
    with sock:
        sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
        got, how = read_until_closed(sock, 10)
    assert _tls_refusal(got) and how in ("eof", "reset")
    denied = _event(pod, "conn_denied", local_port)
    assert denied["listener"] == "web" and denied["reason"] == "handshake_failed"
    assert pod.app.accepted == before, "the app never saw the plaintext connection"


def test_mtls_with_an_allowed_id_reaches_the_app_through_the_sidecar(pod):
    before = pod.app.accepted
    local_port, outcome = _mtls(pod, "frontend")
    assert outcome == "data b'hello'"
    allowed = _event(pod, "conn_allowed", local_port)
    assert allowed["listener"] == "web" and allowed["peer_id"] == FRONTEND
    assert pod.app.accepted == before + 1


def test_disallowed_id_is_refused_at_the_app_port(pod):
    before = pod.app.accepted
    local_port, outcome = _mtls(pod, "stranger")
    assert outcome.startswith("error")
    denied = _event(pod, "conn_denied", local_port)
    assert denied["reason"] == "identity_not_allowed" and denied["peer_id"] == STRANGER
    assert pod.app.accepted == before


def test_the_sidecars_forward_is_not_redirected_back_to_it(pod):
    """The sidecar's forward to 127.0.0.1:8080 reaches the app once; no connection of the sidecar comes
    back to its listener (every connection it logs is the client's), and local connections stay direct."""
    before, logged = pod.app.accepted, len(pod.sidecar.events())
    local_port, outcome = _mtls(pod, "frontend", b"once")
    assert outcome == "data b'once'"
    _event(pod, "conn_closed", local_port)
    new = [e for e in pod.sidecar.events()[logged:] if "peer_addr" in e]
    assert {e["peer_addr"] for e in new} == {f"{CLIENT}:{local_port}"}
    assert pod.app.accepted == before + 1
    for host in ("127.0.0.1", APP):  # a process of the pod itself: created locally, not redirected
        conn = in_netns(pod.ns["app"], socket.create_connection, (host, APP_PORT), 5)
        conn.sendall(b"local")
        conn.shutdown(socket.SHUT_WR)
        assert read_until_closed(conn, 10) == (b"local", "eof")
        conn.close()
    assert pod.app.accepted == before + 3


def test_ipv6_to_the_app_port_is_refused(pod):
    with pytest.raises(ConnectionRefusedError):
        pod.from_client(APP6)
    assert pod.app6.accepted == 0


def test_applying_twice_leaves_one_copy_and_traffic_as_it_was(pod):
    once = pod.rules()
    assert once
    pod.apply()
    assert pod.rules() == once
    before = pod.app.accepted
    assert _mtls(pod, "frontend")[1] == "data b'hello'"
    assert _tls_refusal(_plaintext(pod, APP)[0])
    assert pod.app.accepted == before + 1


def test_remove_restores_direct_access(pod):
    try:
        done = pod.redirect("--remove")
        assert done.returncode == 0, done.stderr
        assert pod.rules() == ""
        before = pod.app.accepted
        assert _plaintext(pod, APP) == (b"ping", "eof") and pod.app.accepted == before + 1
        assert _plaintext(pod, APP6) == (b"ping", "eof") and pod.app6.accepted == 1
    finally:
        pod.apply()
