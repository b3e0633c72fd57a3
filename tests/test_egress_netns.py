"""Egress containment with real kernel rules, in network namespaces this module creates and deletes.

Topology (nothing touches the host's network):

    hub: bridge br0 ── veth ── app       10.77.0.2  the sidecar (uid 0, egress on 127.0.0.1:15001) and
                                                    the "app" (uid 65534, Debian's python3, stdlib only),
                                                    `proxy redirect --apply` in between
                    ── veth ── mesh      10.77.0.3  a sidecar with identity "orders" on 0.0.0.0:8443 -> echo
                    ── veth ── internet  10.77.0.4  a plain echo on 3333 (the "miner pool"), a TLS echo on 443

The app's connections are redirected to the sidecar, which originates mTLS to the mesh, lets TLS with
an allowed SNI through to 443 and resets the rest. The sidecar runs as root and the app as nobody: the
redirect excludes the sidecar's uid, so its own connections leave unredirected.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import pytest
import yaml
from support.ca_cli import issue
from support.certs import TD
from support.network import App, bridged_namespaces, in_netns
from support.polling import wait_until
from support.processes import Sidecar, identity_yaml, inbound_config

pytestmark = pytest.mark.e2e

ADDRESSES = {"app": "10.77.0.2", "mesh": "10.77.0.3", "internet": "10.77.0.4"}
IPV6 = {"app": "fd77::2", "mesh": "fd77::3", "internet": "fd77::4"}  # the listener is IPv4: IPv6 is refused
WEB = f"spiffe://{TD}/ns/prod/sa/web"
ORDERS = f"spiffe://{TD}/ns/prod/sa/orders"
MESH, MINER, TLS_SITE = f"{ADDRESSES['mesh']}:8443", f"{ADDRESSES['internet']}:3333", f"{ADDRESSES['internet']}:443"
MESH_NAME = "orders.mesh.test"  # in the app namespace's /etc/hosts (`ip netns exec` mounts /etc/netns/NS/hosts)
APP_PYTHON = "/usr/bin/python3"  # readable by uid 65534, unlike the test's own interpreter under /root

# What the app does, as uid 65534: one connection, one line of JSON about how it went.
APP_CLIENT = r"""
import json, socket, ssl, sys
mode, host, port, arg = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
out = {"connected": False, "got": "", "how": ""}
try:
    sock = socket.create_connection((host, port), timeout=15)
    out["connected"] = True
    payload = arg.encode()
    if mode == "tls":
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        sock = ctx.wrap_socket(sock, server_hostname=arg)
    sock.sendall(payload)
    got = b""
    while len(got) < len(payload):
        data = sock.recv(65536)
        if not data:
            break
        got += data
    out["got"] = got.decode(errors="replace")
    out["how"] = "echoed" if got == payload else "eof"
    if mode == "hold":
        print(json.dumps(out), flush=True)
        out["how"] = "eof" if not sock.recv(1) else "data"
except ConnectionResetError:
    out["how"] = "reset"
except socket.timeout:
    out["how"] = "timeout"
except (OSError, ssl.SSLError) as exc:
    out["how"] = type(exc).__name__
print(json.dumps(out), flush=True)
"""


class TlsEcho:
    """A TLS echo server on a listening socket; counts raw TCP connections before any TLS."""

    def __init__(self, sock: socket.socket, ident: Path):
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(ident / "cert.pem", ident / "key.pem")
        self.sock = sock
        self.accepted = 0
        self.server_names: list[str | None] = []
        self.ctx.sni_callback = lambda conn, name, ctx: self.server_names.append(name)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    def _echo(self, conn: socket.socket) -> None:
        try:
            with self.ctx.wrap_socket(conn, server_side=True) as tls:
                while data := tls.recv(65536):
                    tls.sendall(data)
        except (OSError, ssl.SSLError):
            pass

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


def _listen(address: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((address, port))
    sock.listen(64)
    return sock


class Net:
    """The namespaces, servers and sidecars of this module; ``close`` removes all of it."""

    def __init__(self, root: Path):
        self.root = root
        self.ns = {name: f"egress-{name}-{os.getpid()}" for name in ("hub", *ADDRESSES)}
        self.created: list[str] = []
        self.sidecars: list[Sidecar] = []
        self.servers: list = []
        self.created_files: list[Path] = []

    def build(self) -> None:
        hosts = Path("/etc/netns") / self.ns["app"] / "hosts"
        self.created_files.append(hosts.parent if hosts.parent.parent.exists() else hosts.parent.parent)
        hosts.parent.mkdir(parents=True)
        hosts.write_text(f"127.0.0.1 localhost\n{ADDRESSES['mesh']} {MESH_NAME}\n")
        bridged_namespaces(
            self.ns, {name: (f"{address}/24", f"{IPV6[name]}/64") for name, address in ADDRESSES.items()}, self.created
        )

    def exec_in(self, name: str) -> tuple[str, ...]:
        return ("ip", "netns", "exec", self.ns[name])

    def sidecar(self, pod: str, name: str, config: str) -> Sidecar:
        side = Sidecar(self.root / pod, name, config, prefix=self.exec_in(pod))
        self.sidecars.append(side)
        return side.wait_ready()

    def app(self, mode: str, target: str, arg: str) -> dict:
        """One connection made by the app (uid 65534 in the app namespace); how it went."""
        host, port = target.rsplit(":", 1)
        done = subprocess.run(
            [*self.exec_in("app"), "setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
             APP_PYTHON, "-c", APP_CLIENT, mode, host, port, arg],
            capture_output=True, text=True, timeout=60,
        )
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout.splitlines()[-1])

    def close(self) -> None:
        for side in self.sidecars:
            try:
                side.stop(timeout=10)
            except Exception:  # keep cleaning up
                pass
        for server in self.servers:
            server.close()
        for ns in reversed(self.created):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        for directory in self.created_files:
            shutil.rmtree(directory, ignore_errors=True)


def _egress_config(ident: Path, allow: list[dict], mode: str = "enforce") -> str:
    return identity_yaml(ident) + yaml.safe_dump({
        "admin": {"listen": "127.0.0.1:15000"},
        "timeouts": {"handshake": "3s"},
        "egress": {"listen": "127.0.0.1:15001", "mode": mode, "allow": allow},
    })


ENFORCED = [
    {"to": f"{MESH_NAME}:8443", "expect": [ORDERS]},
    {"to": TLS_SITE, "sni": ["allowed.example"]},
]


@pytest.fixture(scope="module")
def net(tmp_path_factory, pki):
    if os.geteuid() != 0:
        pytest.skip("network namespaces and packet redirection need root")
    for tool in ("ip", "nft", "setpriv"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is missing: .ci/run installs iproute2, nftables and util-linux")
    root = tmp_path_factory.mktemp("egress")
    net = Net(root)
    try:
        net.build()
        ids = {name: issue(pki["ca_dir"], root / f"id-{name}", f"spiffe://{TD}/ns/prod/sa/{name}")
               for name in ("web", "orders", "site")}
        net.servers.append(App(in_netns(net.ns["mesh"], _listen, "127.0.0.1", 8080)))
        net.miner = App(in_netns(net.ns["internet"], _listen, ADDRESSES["internet"], 3333))
        net.miner6 = App(in_netns(net.ns["internet"], _listen, IPV6["internet"], 3333))
        net.site = TlsEcho(in_netns(net.ns["internet"], _listen, ADDRESSES["internet"], 443), ids["site"])
        net.servers += [net.miner, net.miner6, net.site]
        net.sidecar("mesh", "orders", inbound_config(ids["orders"], "127.0.0.1:8080", [WEB], listen="0.0.0.0:8443"))
        net.web = net.sidecar("app", "web", _egress_config(ids["web"], ENFORCED))
        net.ids = ids
        redirect = subprocess.run(
            [*net.exec_in("app"), sys.executable, "-m", "proxy", "redirect", "--apply", "--uid", "0",
             "-c", str(net.web.config_path)], capture_output=True, text=True, timeout=60)
        assert redirect.returncode == 0, redirect.stderr
        yield net
    finally:
        net.close()


def _metrics(net: Net) -> str:
    def fetch():
        return urllib.request.urlopen("http://127.0.0.1:15000/metrics", timeout=5).read().decode()
    return in_netns(net.ns["app"], fetch)


def _reload(net: Net, config: str) -> None:
    before = net.web.count(lambda e: e["event"] == "reloaded")
    net.web.config_path.write_text(config)
    net.web.signal(signal.SIGHUP)
    wait_until(lambda: net.web.count(lambda e: e["event"] == "reloaded") > before, what="reload")


def test_app_reaches_the_mesh_through_mtls_with_the_server_id_checked(net):
    assert net.app("plain", MESH, "ping orders") == {"connected": True, "got": "ping orders", "how": "echoed"}
    allowed = net.web.wait_event(lambda e: e["event"] == "conn_allowed" and e["direction"] == "egress"
                                 and e.get("peer_id") == ORDERS)
    assert allowed["peer_addr"] == MESH and allowed["rule"] == "egress.allow[0]"
    assert allowed["dst_name"] == MESH_NAME, "the rule's DNS name resolved to the address the app dialled"


def test_mesh_server_with_another_id_is_refused(net):
    try:
        _reload(net, _egress_config(net.ids["web"], [{"to": MESH, "expect": [f"spiffe://{TD}/ns/prod/sa/payments"]}]))
        assert net.app("plain", MESH, "to the wrong server")["got"] == ""
        denied = net.web.wait_event(lambda e: e["event"] == "conn_denied" and e["direction"] == "egress"
                                    and e["reason"] == "server_identity_mismatch")
        assert denied["peer_id"] == ORDERS and "payments" in denied["detail"]
    finally:
        _reload(net, _egress_config(net.ids["web"], ENFORCED))


def test_refusal_names_the_dns_name_that_resolved_to_the_destination(net):
    net.app("plain", f"{ADDRESSES['mesh']}:9999", "wrong port")
    denied = net.web.wait_event(lambda e: e["event"] == "conn_denied" and e["peer_addr"].endswith(":9999"))
    assert denied["dst_name"] == MESH_NAME and f"{ADDRESSES['mesh']}:9999 ({MESH_NAME})" in denied["detail"]


def test_sidecars_own_connection_to_the_mesh_is_not_redirected(net):
    net.app("plain", MESH, "again")
    mesh = net.sidecars[0]
    seen = mesh.wait_event(lambda e: e["event"] == "conn_allowed" and e.get("peer_id") == WEB)
    assert seen["peer_addr"].startswith(ADDRESSES["app"] + ":"), "it left the app namespace, not looped back"


def test_miner_pool_connect_is_reset_logged_and_counted_and_never_arrives(net):
    before = net.miner.accepted
    result = net.app("plain", MINER, "login x")
    assert result["how"] in ("reset", "eof") and result["got"] == ""
    denied = net.web.wait_event(lambda e: e["event"] == "conn_denied" and e["peer_addr"] == MINER)
    assert denied["direction"] == "egress" and denied["reason"] == "egress_denied"
    assert MINER in denied["detail"]
    assert 'sidecar_egress_denied_total{cause="no_rule",mode="enforce"}' in _metrics(net)
    assert net.miner.accepted == before, "the pool never saw a connection"


def test_the_sidecars_uid_reaches_the_internet_directly(net):
    before = net.miner.accepted
    conn = in_netns(net.ns["app"], socket.create_connection, (ADDRESSES["internet"], 3333), 5)
    conn.close()
    wait_until(lambda: net.miner.accepted == before + 1, what="a direct connection from uid 0")


def test_ipv6_is_refused_outright_for_the_app_and_open_to_the_sidecars_uid(net):
    result = net.app("plain", f"{IPV6['internet']}:3333", "over ipv6")
    assert result["connected"] is False and result["how"] == "ConnectionRefusedError"
    assert net.miner6.accepted == 0
    conn = in_netns(net.ns["app"], socket.create_connection, (IPV6["internet"], 3333), 5)
    conn.close()
    wait_until(lambda: net.miner6.accepted == 1, what="a direct IPv6 connection from uid 0")


def test_tls_with_an_allowed_sni_passes_through_untouched(net):
    assert net.app("tls", TLS_SITE, "allowed.example")["how"] == "echoed"
    assert "allowed.example" in net.site.server_names, "the app's own ClientHello reached the site"


def test_tls_with_another_sni_is_reset_before_the_site_gets_a_byte(net):
    before = net.site.accepted
    result = net.app("tls", TLS_SITE, "exfil.example")
    assert result["how"] not in ("echoed", "timeout")
    denied = net.web.wait_event(lambda e: e["event"] == "conn_denied" and e.get("sni") == "exfil.example")
    assert "allowed.example" in denied["detail"] and TLS_SITE in denied["detail"]
    assert 'cause="sni_not_allowed"' in _metrics(net)
    assert net.site.accepted == before


def test_audit_then_suggest_gives_a_config_that_admits_exactly_what_was_seen(net):
    try:
        _reload(net, _egress_config(net.ids["web"], [], mode="audit"))
        assert net.app("plain", MINER, "audit 1")["how"] == "echoed"
        assert net.app("tls", TLS_SITE, "learned.example")["how"] == "echoed"
        would = net.web.wait_event(lambda e: e["event"] == "would_deny" and e.get("sni") == "learned.example")
        assert "sni: [learned.example]" in would["detail"]
        audit_log = net.root / "audit.log"  # the log of the audit period only, as an operator would cut it
        lines = net.web.log_path.read_text().splitlines()
        reloads = [i for i, text in enumerate(lines) if '"event":"reloaded"' in text]
        audit_log.write_text("\n".join(lines[reloads[-1]:]) + "\n")
        suggested = subprocess.run([sys.executable, "-m", "proxy", "suggest", "--log", str(audit_log)],
                                   capture_output=True, text=True, timeout=60, check=True).stdout
        (net.root / "suggested.yaml").write_text(suggested)
        allow = yaml.safe_load(suggested)["egress"]["allow"]
        assert allow == [{"to": MINER}, {"to": TLS_SITE, "sni": ["learned.example"]}]
        _reload(net, _egress_config(net.ids["web"], allow))
        assert net.app("plain", MINER, "enforced")["how"] == "echoed"
        assert net.app("tls", TLS_SITE, "learned.example")["how"] == "echoed"
        assert net.app("tls", TLS_SITE, "unseen.example")["how"] not in ("echoed", "timeout")
    finally:
        _reload(net, _egress_config(net.ids["web"], ENFORCED))


def test_reload_closes_open_connections_to_a_destination_no_longer_allowed(net):
    try:
        _reload(net, _egress_config(net.ids["web"], [*ENFORCED, {"to": MINER}]))
        host, port = MINER.rsplit(":", 1)
        holder = subprocess.Popen(
            [*net.exec_in("app"), "setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
             APP_PYTHON, "-c", APP_CLIENT, "hold", host, port, "held"], stdout=subprocess.PIPE, text=True)
        assert json.loads(holder.stdout.readline())["how"] == "echoed"
        _reload(net, _egress_config(net.ids["web"], ENFORCED))
        closed = net.web.wait_event(lambda e: e["event"] == "conn_closed" and e.get("reason") == "policy_revoked")
        assert closed["peer_addr"] == MINER and "no egress.allow rule" in closed["detail"]
        assert json.loads(holder.stdout.readline())["how"] in ("reset", "eof")
        holder.wait(10)
    finally:
        _reload(net, _egress_config(net.ids["web"], ENFORCED))
