"""A reload with a large allowlist and hundreds of open connections, as a real process: the data plane
and the admin endpoint keep answering while it runs, and what the new policy forbids is still cut.

To look at the sidecar *while* its reload runs, without guessing how long the reload takes, the
config file becomes a named pipe: the reload that opens it waits until the test writes the new
config into it, and the test checks /healthz and every held connection in that window.
"""

from __future__ import annotations

import http.client
import os
import signal
import socket
import ssl
from pathlib import Path

import pytest
from support.ca_cli import issue, run_ca
from support.certs import TD
from support.network import App, client_context
from support.polling import wait_until
from support.processes import PY, LoggedProcess, identity_yaml

pytestmark = pytest.mark.e2e

RULES = 10_000
CONNECTIONS = 300
KEPT = f"spiffe://{TD}/ns/scale/sa/client"
DOOMED = f"spiffe://{TD}/ns/scale/sa/doomed"  # allowed before the reload, not after


class HeldConfig:
    """Holds the next reload half-way: the config file becomes a named pipe, and the reload that
    opens it reads nothing until ``release`` writes the new config into it (and puts a regular file
    with that text back in its place, for the reloads after)."""

    def __init__(self, path: Path):
        self.path = path
        self.fd: int | None = None
        fifo = path.with_name(path.name + ".fifo")
        os.mkfifo(fifo)
        os.replace(fifo, path)

    def reader_waiting(self) -> bool:
        """Whether a reload has opened the pipe (it then waits for ``release``)."""
        try:
            self.fd = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK)  # ENXIO while nobody reads
        except OSError:
            return False
        return True

    def release(self, text: str) -> None:
        regular = self.path.with_name(self.path.name + ".new")
        regular.write_text(text)
        os.replace(regular, self.path)  # the reload already holds the pipe open
        if self.fd is not None:
            os.set_blocking(self.fd, True)
            with open(self.fd, "wb", buffering=0) as pipe:
                pipe.write(text.encode())
            self.fd = None


def config(ident: Path, app_port: int, allow: list[str]) -> str:
    rules = "".join(f"      - {rule}\n" for rule in allow)
    generated = "".join(f"      - spiffe://{TD}/ns/gen-{i % 100}/sa/svc-{i}/*\n" for i in range(RULES))
    return identity_yaml(ident) + (
        f"inbound:\n  - name: api\n    listen: 127.0.0.1:0\n    forward: 127.0.0.1:{app_port}\n    allow:\n"
        f"{rules}{generated}"
        "admin: {listen: 127.0.0.1:0}\n"
        "limits: {handshakes: {per_source: 1000}}\n"
    )


def healthz(port: int) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", "/healthz")
        return connection.getresponse().status
    finally:
        connection.close()


def echo(conn: ssl.SSLSocket, payload: bytes) -> bytes:
    conn.sendall(payload)
    received = b""
    while len(received) < len(payload):
        chunk = conn.recv(len(payload) - len(received))
        if not chunk:
            break
        received += chunk
    return received


def closed_by_peer(conn: ssl.SSLSocket) -> bool:
    try:
        return conn.recv(16) == b""
    except (ssl.SSLWantReadError, BlockingIOError):
        return False
    except OSError:
        return True


@pytest.fixture
def pki(tmp_path):
    ca_dir = tmp_path / "ca"
    run_ca("init", "--trust-domain", TD, ca_dir=ca_dir)
    return {name: issue(ca_dir, tmp_path / name, f"spiffe://{TD}/ns/scale/sa/{name}")
            for name in ("api", "client", "doomed")}


def test_reload_in_progress_stops_neither_relaying_nor_the_admin_endpoint(pki, tmp_path):
    app = App()
    config_path = tmp_path / "api.yaml"
    config_path.write_text(config(pki["api"], app.port, [KEPT, DOOMED]))
    side = LoggedProcess([PY, "-m", "proxy", "run", "-c", str(config_path)], tmp_path / "api.log")
    held: list[ssl.SSLSocket] = []
    gate = None
    try:
        side.wait_ready()
        kept_ctx, doomed_ctx = client_context(pki["client"]), client_context(pki["doomed"])
        doomed = []
        for index in range(CONNECTIONS):
            forbidden = index % 10 == 9
            conn = (doomed_ctx if forbidden else kept_ctx).wrap_socket(
                socket.create_connection(("127.0.0.1", side.ports["api"]), timeout=10))
            assert echo(conn, b"hello") == b"hello"
            (doomed if forbidden else held).append(conn)
        kept = list(held)
        held.extend(doomed)

        gate = HeldConfig(config_path)
        side.signal(signal.SIGHUP)
        wait_until(gate.reader_waiting, what="the reload to open the config")
        # The reload is in progress (its worker waits on the config): the event loop still serves.
        assert healthz(side.ports["admin"]) == 200
        for index, conn in enumerate(kept):
            assert echo(conn, b"during %d" % index) == b"during %d" % index
        assert not any(e["event"] in ("reloaded", "reload_failed") for e in side.events())

        gate.release(config(pki["api"], app.port, [KEPT]))
        side.wait_event(lambda e: e["event"] == "reloaded", what="reloaded")
        for conn in doomed:
            conn.setblocking(False)
        wait_until(lambda: all(closed_by_peer(conn) for conn in doomed), what="every forbidden connection cut")
        revoked = [e for e in side.events() if e["event"] == "conn_closed" and e.get("reason") == "policy_revoked"]
        assert len(revoked) == len(doomed)
        assert {e["peer_id"] for e in revoked} == {DOOMED}
        assert all("policy changed" in e["detail"] for e in revoked)
        for index, conn in enumerate(kept):
            assert echo(conn, b"after %d" % index) == b"after %d" % index
        assert healthz(side.ports["admin"]) == 200
    finally:
        for conn in held:
            conn.close()
        if gate is not None:
            gate.release(config(pki["api"], app.port, [KEPT]))
        side.stop()
        app.close()
