"""Hardening: faults around the sidecar. The app is down or resets, descriptors run out, files are bad.

Real `proxy run` processes on loopback; every outcome is checked in the JSON log.
"""

from __future__ import annotations

import resource
import shutil
import socket
import struct
import subprocess
import textwrap
import threading

import pytest
from support.certs import API, FRONTEND
from support.network import (
    App,
    client_context,
    free_port,
    listening_ports,
    plain_attempt,
    refused_port,
    tls_attempt,
)
from support.polling import wait_until
from support.processes import (
    PY,
    Sidecar,
    denial,
    final_event,
    inbound_config,
    outbound_config,
)

pytestmark = pytest.mark.e2e


def good_request(side: Sidecar, pki, listener: str, payload: bytes = b"good client", timeout: float = 10) -> None:
    _, outcome = tls_attempt(client_context(pki["ids"]["frontend"]), side.ports[listener], payload, timeout=timeout)
    assert outcome == f"data {payload!r}", f"a good client must still be served, saw {outcome}"


class Resetter:
    """An app that accepts each connection and resets it: at once, or after reading the request."""

    def __init__(self, after_request: bool = False):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.after_request = after_request
        self.accepted = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            if self.after_request:
                conn.settimeout(10)
                try:
                    conn.recv(100)
                except OSError:
                    pass
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def broken_apps(pki, tmp_path_factory):
    """One sidecar, three inbound ports: an app that is down, one that accepts and resets, a good one."""
    holder, down_port = refused_port()
    resetters = {"resets": Resetter(), "reads-then-resets": Resetter(after_request=True)}
    echo = App()
    ident = pki["ids"]["api"]
    config = inbound_config(ident, f"127.0.0.1:{down_port}", [FRONTEND], name="down") + "".join(
        f"  - name: {name}\n    listen: 127.0.0.1:0\n    forward: 127.0.0.1:{port}\n    allow: [{FRONTEND}]\n"
        for name, port in (*((n, r.port) for n, r in resetters.items()), ("echo", echo.port))
    )
    side = Sidecar(tmp_path_factory.mktemp("broken-apps"), "api", config).wait_ready()
    yield {"side": side, "down_port": down_port, "resetters": resetters}
    side.stop()
    holder.close()
    for resetter in resetters.values():
        resetter.close()
    echo.close()


def test_app_down_client_sees_a_close_and_the_log_says_upstream_unreachable(pki, broken_apps):
    side = broken_apps["side"]
    local_port, outcome = tls_attempt(client_context(pki["ids"]["frontend"]), side.ports["down"])
    assert outcome in ("data b''",) or outcome.startswith("error"), outcome
    event = denial(side, local_port)
    assert event["reason"] == "upstream_unreachable", event
    assert f"127.0.0.1:{broken_apps['down_port']}" in event["detail"] and "refused" in event["detail"].lower()
    good_request(side, pki, "echo")


@pytest.mark.parametrize("listener", ["resets", "reads-then-resets"])
def test_app_that_accepts_and_resets_is_logged_upstream_unreachable(pki, broken_apps, listener):
    """Decision: an app that resets the connection before sending a single byte never served it, so
    the connection's closing line says upstream_unreachable (naming the app and the reset), exactly as
    when the app refuses the connect, whether the reset beats the sidecar's connect() or comes after
    the request was forwarded. The client sees a close."""
    side = broken_apps["side"]
    resetter = broken_apps["resetters"][listener]
    for attempt in range(3):  # "at once" races the sidecar's connect(); each attempt must be logged alike
        accepted_before = resetter.accepted
        local_port, outcome = tls_attempt(client_context(pki["ids"]["frontend"]), side.ports[listener])
        assert outcome in ("data b''",) or outcome.startswith("error"), outcome
        assert resetter.accepted == accepted_before + 1, "the app accepted the connection"
        event = final_event(side, local_port)
        assert event["reason"] == "upstream_unreachable", (attempt, event)
        assert "reset" in event["detail"].lower() and str(resetter.port) in event["detail"], event
    good_request(side, pki, "echo")


def test_outbound_upstream_down_app_sees_a_close_and_the_log_says_upstream_unreachable(pki, tmp_path):
    holder, down_port = refused_port()
    side = Sidecar(tmp_path, "web",
                   outbound_config(pki["ids"]["frontend"], {"api": f"127.0.0.1:{down_port}"}, [API])).wait_ready()
    try:
        local_port, got, how = plain_attempt(side.ports["api"], b"request")
        assert how != "timeout" and got == b""
        app_addr = f"127.0.0.1:{local_port}"  # outbound: the app's end; peer_addr would be the upstream's
        event = side.wait_event(lambda e: e["event"] == "conn_denied" and e.get("app_addr") == app_addr)
        assert event["reason"] == "upstream_unreachable", event
        assert f"127.0.0.1:{down_port}" in event["detail"]
    finally:
        side.stop()
        holder.close()


# --- descriptors run out ---------------------------------------------------------------------------

FD_LIMIT = 64


def _low_fd_limit() -> None:  # runs in the child between fork and exec
    resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT, FD_LIMIT))


def test_running_out_of_descriptors_is_logged_and_service_resumes_when_they_free_up(pki, tmp_path):
    app = App()
    side = Sidecar(tmp_path, "fds", inbound_config(pki["ids"]["api"], f"127.0.0.1:{app.port}", [FRONTEND],
                                                   extra="timeouts: {handshake: 60s}\n"
                                                         "limits: {handshakes: {per_source: 1000}}\n"),
                   preexec_fn=_low_fd_limit).wait_ready()
    hogs: list[socket.socket] = []
    result: dict = {}
    try:
        assert side.fd_count() < FD_LIMIT
        for _ in range(FD_LIMIT + 16):  # silent connections, each holding one sidecar descriptor
            hogs.append(socket.create_connection(("127.0.0.1", side.ports["api"]), timeout=10))
        event = side.wait_event(lambda e: e["event"] == "accept_failed", what="accept_failed")
        assert event["listener"] == "api" and "Too many open files" in event["detail"], event
        assert side.fd_count() == FD_LIMIT

        # A good client arriving now gets its TCP connection from the kernel's listen backlog, and
        # its ClientHello waits there, unanswered...
        connected = threading.Event()

        def late_client():
            ctx = client_context(pki["ids"]["frontend"])
            with socket.create_connection(("127.0.0.1", side.ports["api"]), timeout=20) as raw:
                connected.set()
                try:
                    with ctx.wrap_socket(raw) as tls:
                        tls.sendall(b"served after all")
                        result["outcome"] = tls.recv(100)
                except OSError as exc:
                    result["outcome"] = f"error {exc}"

        waiter = threading.Thread(target=late_client)
        waiter.start()
        assert connected.wait(10), "the kernel completes the TCP handshake from the backlog"
        assert side.fd_count() == FD_LIMIT and "outcome" not in result, f"no descriptor was free, yet: {result}"
        assert side.proc.poll() is None, "the sidecar must keep running without descriptors"

        # ...and is served once descriptors free up.
        for sock in hogs:
            sock.close()
        hogs.clear()
        waiter.join(20)
        assert result.get("outcome") == b"served after all", result
        good_request(side, pki, "api")
        assert side.count(lambda e: e["event"] == "accept_failed") >= 1
        refused = side.count(lambda e: e["event"] == "conn_denied" and e["reason"] == "handshake_failed")
        assert refused >= FD_LIMIT // 2, "the silent connections are accounted for when they close"
        assert side.proc.poll() is None
    finally:
        for sock in hogs:
            sock.close()
        side.stop()
        app.close()


# --- bad files at start: exit 2, every problem, no listener ---------------------------------------

# Runs `python -m proxy run` exactly, with an audit hook that reports every socket.bind on stderr.
AUDITED_RUN = textwrap.dedent("""
    import runpy, sys
    def hook(event, args):
        if event == "socket.bind":
            sys.stderr.write(f"AUDIT socket.bind {args[1]!r}\\n")
    sys.addaudithook(hook)
    sys.argv = ["proxy", "run", "-c", sys.argv[1]]
    runpy.run_module("proxy", run_name="__main__")
""")


def _start_audited(config) -> subprocess.Popen:
    return subprocess.Popen([PY, "-c", AUDITED_RUN, str(config)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _bad_identity(pki, directory):
    """cert.pem is not PEM; key.pem belongs to another identity; bundle.pem does not exist."""
    directory.mkdir()
    (directory / "cert.pem").write_text("this is not a certificate\n")
    shutil.copy(pki["ids"]["frontend"] / "key.pem", directory / "key.pem")
    return directory


FILE_PROBLEMS = ("cert.pem: no PEM block", "bundle.pem: trust bundle file does not exist")


@pytest.mark.parametrize("with_config_errors", [False, True], ids=["bad_files", "bad_files_and_bad_keys"])
def test_bad_files_at_start_exit_2_listing_every_problem_and_open_no_listener(pki, tmp_path, with_config_errors):
    ident = _bad_identity(pki, tmp_path / "identity")
    port, admin_port = free_port(), free_port()
    config = tmp_path / "bad.yaml"
    text = (
        f"identity:\n  cert: {ident}/cert.pem\n  key: {ident}/key.pem\n  bundle: {ident}/bundle.pem\n"
        f"inbound:\n  - name: api\n    listen: 127.0.0.1:{port}\n    forward: 127.0.0.1:8080\n"
        f"    allow: [{FRONTEND}]\n"
        f"admin:\n  listen: 127.0.0.1:{admin_port}\n"
    )
    if with_config_errors:
        text += "timeouts: {handshake: soon}\nlimits: {max_connections: 10, colour: blue}\n"
    config.write_text(text)

    proc = _start_audited(config)
    seen_listening = set()

    def exited() -> bool:  # and meanwhile, every 5 ms, which of its ports listen
        seen_listening.update(listening_ports() & {port, admin_port})
        return proc.poll() is not None

    wait_until(exited, timeout=30, what="proxy run to exit on the bad config", interval=0.005)
    stdout, stderr = proc.communicate(timeout=30)

    assert proc.returncode == 2, stderr
    assert not seen_listening, f"ports {seen_listening} were listening"
    assert "AUDIT socket.bind" not in stderr, f"a socket was bound before the refusal:\n{stderr}"
    for problem in FILE_PROBLEMS:
        assert problem in stderr, f"{problem!r} missing from:\n{stderr}"
    expected = 2
    if with_config_errors:
        assert "timeouts.handshake" in stderr and "limits.colour" in stderr, stderr
        expected = 4
    problem_lines = [line for line in stderr.splitlines() if line.startswith("proxy: ") and "not started" not in line]
    assert len(problem_lines) >= expected, f"every problem must be listed, got:\n{stderr}"
    assert f"not started: {len(problem_lines)} problem(s)" in stderr


def test_listen_port_taken_at_start_exits_2_and_binds_nothing_else(pki, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        busy = taken.getsockname()[1]
        free = free_port()
        config = tmp_path / "busy.yaml"
        config.write_text(
            inbound_config(pki["ids"]["api"], "127.0.0.1:8080", [FRONTEND], listen=f"127.0.0.1:{free}")
            + f"  - name: busy\n    listen: 127.0.0.1:{busy}\n    forward: 127.0.0.1:8080\n    allow: [{FRONTEND}]\n"
        )
        proc = subprocess.run([PY, "-m", "proxy", "run", "-c", str(config)], capture_output=True, text=True,
                              timeout=30)
        assert proc.returncode == 2, proc.stderr
        assert f"busy: cannot listen on 127.0.0.1:{busy}" in proc.stderr
        assert free not in listening_ports()
        with socket.socket() as probe:  # the other listener's port was released, not left half-open
            probe.bind(("127.0.0.1", free))
